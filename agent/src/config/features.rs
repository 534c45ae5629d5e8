//! Which kinds this build holds: a kind whose cargo feature was left out (a lean Pi
//! build, `deploy/build-pi.sh`) is refused where the configuration names it, rather
//! than failing once the agent runs.

/// The cargo feature a source kind needs, if this build was made without it.
pub(super) fn missing_source(kind: &str) -> Option<&'static str> {
    match kind {
        "listen" if cfg!(not(feature = "listen")) => Some("listen"),
        "serial" if cfg!(not(feature = "serial")) => Some("serial"),
        _ => None,
    }
}

/// The cargo feature a sink kind needs, if this build was made without it.
pub(super) fn missing_sink(kind: &str) -> Option<&'static str> {
    match kind {
        "s3" if cfg!(not(feature = "s3")) => Some("s3"),
        "gcs" if cfg!(not(feature = "gcs")) => Some("gcs"),
        "azure" if cfg!(not(feature = "azure")) => Some("azure"),
        "postgres" if cfg!(not(feature = "postgres")) => Some("postgres"),
        "mqtt" if cfg!(not(feature = "mqtt-sink")) => Some("mqtt-sink"),
        _ => None,
    }
}

/// The cargo feature a file format needs, if this build was made without it.
pub(super) fn missing_format(format: super::Format) -> Option<&'static str> {
    match format {
        super::Format::Parquet if cfg!(not(feature = "parquet")) => Some("parquet"),
        _ => None,
    }
}

/// The error for a kind (or format) that this build lacks.
pub(super) fn not_in_build(what: &str, word: &str, feature: &str) -> String {
    format!(
        "{what} {word:?} is not in this build of edgespool (built without the {feature:?} \
         feature); build with `--features {feature}` or use the full build (the .deb, \
         or `deploy/build-pi.sh --full`)"
    )
}
