//! The `[[sinks]]`: object-store sinks, PostgreSQL and the MQTT feed, their checks and
//! their parsing (each store's own keys and the file formats are in `store.rs`).

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeValue;

use super::broker::{MqttConnection, default_qos, validate_broker};
use super::durations::duration;
use super::located::{Located, value_span};
use super::secret::{Secret, SecretFile, one_secret};
use super::store::{AzureStore, Compression, Format, GcsStore, Keys, Layout, LocalStore, S3Store};
use super::tables::{field_names, kind_of, split_table, without_kind};
use super::{quoted, valid_key_part};

/// One `[[sinks]]` entry.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Names the sink in the spool's delivery records and in `status`.
    pub name: String,
    /// The kind and its settings.
    pub kind: SinkKind,
}

/// The kinds of sink.
#[derive(Debug, Clone)]
pub enum SinkKind {
    /// Objects in a store: a local folder, S3, GCS or Azure.
    Object(Box<ObjectSink>),
    /// Rows in a PostgreSQL table.
    Postgres(Box<PostgresSink>),
    /// A live feed of closed windows to an MQTT broker (not fed from partitions).
    Mqtt(Box<MqttSink>),
}

impl SinkKind {
    /// The `kind = "…"` word of this sink.
    pub fn word(&self) -> &'static str {
        match self {
            SinkKind::Object(object) => object.store.word(),
            SinkKind::Postgres(_) => "postgres",
            SinkKind::Mqtt(_) => "mqtt",
        }
    }

    /// Longest wait between two retries.
    pub fn retry_max(&self) -> Duration {
        match self {
            SinkKind::Object(object) => object.retry_max,
            SinkKind::Postgres(pg) => pg.retry_max,
            SinkKind::Mqtt(_) => Duration::from_secs(30),
        }
    }

    /// How long late rows wait and how many at most, for a sink that writes files (a
    /// part each); `None` where late rows merge in place (PostgreSQL) or are not kept.
    pub fn late_parts(&self) -> Option<(Duration, NonZeroU32)> {
        match self {
            SinkKind::Object(object) => Some((object.late_grace, object.late_max_rows)),
            SinkKind::Postgres(_) | SinkKind::Mqtt(_) => None,
        }
    }

    /// How many rows the uploader reads from the spool at a time.
    pub fn chunk_rows(&self) -> NonZeroU32 {
        match self {
            SinkKind::Object(object) => object.chunk_rows,
            SinkKind::Postgres(_) | SinkKind::Mqtt(_) => DEFAULT_CHUNK_ROWS,
        }
    }

    /// Whether the sink takes parts of the open partition, the windows of each flush
    /// soon after their commit (`deliver = "each_flush"`, PostgreSQL's default), rather
    /// than a partition once it has closed.
    pub fn delivers_each_flush(&self) -> bool {
        matches!(self, SinkKind::Postgres(pg) if pg.deliver == Deliver::EachFlush)
    }

    /// Whether the sink is a live feed of windows as they close rather than a receiver of
    /// closed partitions: the spool keeps no delivery records for it and holds nothing
    /// back for it.
    pub fn is_live(&self) -> bool {
        matches!(self, SinkKind::Mqtt(_))
    }
}

/// An object-store sink (`kind = "local"`, `"s3"`, `"gcs"` or `"azure"`): what every
/// backend shares, and the backend.
#[derive(Debug, Clone)]
pub struct ObjectSink {
    /// Key prefix inside the folder, bucket or container (default none).
    pub prefix: String,
    /// File format.
    pub format: Format,
    /// One row per series and window, or one per window.
    pub layout: Layout,
    /// Compression: Parquet's pages, or a text file as a whole.
    pub compression: Compression,
    /// How the partition folders spell the time.
    pub keys: Keys,
    /// Longest wait between two retries.
    pub retry_max: Duration,
    /// Timeout of one request to a remote store.
    pub timeout: Duration,
    /// Objects larger than this go up as multipart uploads, in parts of this size.
    pub part_size: u64,
    /// Late rows for a partition already delivered wait until the oldest has waited this
    /// long, then go out as one part (zero: with the next plan, a part per straggler).
    pub late_grace: Duration,
    /// …or until this many late rows wait for the partition.
    pub late_max_rows: NonZeroU32,
    /// How many rows the uploader reads from the spool and encodes at a time (a Parquet
    /// row group each); a window start's rows are never split.
    pub chunk_rows: NonZeroU32,
    /// Where the objects go.
    pub store: Store,
}

/// The object stores.
#[derive(Debug, Clone)]
pub enum Store {
    /// A folder of this machine.
    Local(LocalStore),
    /// Amazon S3 or an S3-compatible store.
    S3(S3Store),
    /// Google Cloud Storage.
    Gcs(GcsStore),
    /// Azure Blob Storage.
    Azure(AzureStore),
}

impl Store {
    /// The `kind = "…"` word.
    pub fn word(&self) -> &'static str {
        match self {
            Store::Local(_) => "local",
            Store::S3(_) => "s3",
            Store::Gcs(_) => "gcs",
            Store::Azure(_) => "azure",
        }
    }
}

/// The keys every object-store sink has.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectCommon {
    /// Sink name; defaults to the kind.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    prefix: String,
    /// Default: "ndjson" for `local`, "parquet" for the cloud stores.
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    layout: Layout,
    /// Default "zstd" for Parquet, "none" for the text formats.
    #[serde(default)]
    compression: Option<Compression>,
    /// Default "unpadded".
    #[serde(default)]
    keys: Keys,
    /// Default 5m.
    #[serde(default = "default_retry_max", deserialize_with = "duration")]
    retry_max: Duration,
    /// Default 1h.
    #[serde(default = "default_late_grace", deserialize_with = "duration")]
    late_grace: Duration,
    /// Default 10000.
    #[serde(default = "default_late_max_rows")]
    late_max_rows: NonZeroU32,
    /// Default 10000.
    #[serde(default = "default_chunk_rows")]
    chunk_rows: NonZeroU32,
}

/// The keys of the remote stores only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Transfer {
    /// Default 30s.
    #[serde(default = "default_request_timeout", deserialize_with = "duration")]
    timeout: Duration,
    /// Default 8 MiB.
    #[serde(default = "default_part_size")]
    part_size: bytesize::ByteSize,
}

fn default_retry_max() -> Duration {
    Duration::from_secs(300)
}
fn default_late_grace() -> Duration {
    Duration::from_secs(3600)
}
fn default_late_max_rows() -> NonZeroU32 {
    NonZeroU32::new(10_000).unwrap_or(NonZeroU32::MIN)
}
/// How many rows an uploader reads and encodes at a time unless its sink says otherwise.
pub const DEFAULT_CHUNK_ROWS: NonZeroU32 = NonZeroU32::new(10_000).expect("not zero");

fn default_chunk_rows() -> NonZeroU32 {
    DEFAULT_CHUNK_ROWS
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_part_size() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(8)
}

/// `kind = "mqtt"` among the sinks: each closed window's aggregates as a JSON message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSink {
    /// Sink name; defaults to "mqtt".
    #[serde(default)]
    pub name: Option<String>,
    /// The broker and how to connect to it (split from the same table).
    #[serde(skip)]
    pub connection: MqttConnection,
    /// Topic of each window's message: `{device}` and `{series}` are replaced (default
    /// `edgespool/{device}/{series}`).
    #[serde(default = "default_feed_topic")]
    pub topic: String,
    /// 0 or 1 (default 1).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Whether the broker keeps each series' latest window for new subscribers
    /// (default false).
    #[serde(default)]
    pub retain: bool,
    /// Retained `online` / `offline` (the last will) topic; `{device}` is replaced
    /// (default `edgespool/{device}/availability`; "" for none).
    #[serde(default = "default_availability_topic")]
    pub availability_topic: String,
    /// Windows that ended longer ago than this are skipped (counted), not published:
    /// after an outage the feed resumes with the present, not with history (default 10m).
    #[serde(default = "default_max_age", deserialize_with = "duration")]
    pub max_age: Duration,
}

fn default_feed_topic() -> String {
    "edgespool/{device}/{series}".to_owned()
}
fn default_availability_topic() -> String {
    "edgespool/{device}/availability".to_owned()
}
fn default_max_age() -> Duration {
    Duration::from_secs(600)
}

/// `kind = "postgres"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSink {
    /// Sink name; defaults to "postgres".
    #[serde(default)]
    pub name: Option<String>,
    /// A connection URL (`postgres://user@host:5432/db`) or key/value string
    /// (`host=… dbname=…`); a secret, since it may hold the password.
    #[serde(default)]
    pub url: Option<Secret>,
    /// Server host name or address (overrides the URL's).
    #[serde(default)]
    pub host: Option<String>,
    /// Server port (default 5432).
    #[serde(default)]
    pub port: Option<u16>,
    /// User name.
    #[serde(default)]
    pub user: Option<String>,
    /// Database name (default: the user name).
    #[serde(default)]
    pub dbname: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<SecretFile>,
    /// TLS: "disable", "prefer" (the default), "require" or "verify-full".
    #[serde(default)]
    pub sslmode: SslMode,
    /// CA certificates (PEM) for "verify-full"; default: the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Schema of the table (created when missing; default "public").
    #[serde(default = "default_pg_schema")]
    pub schema: String,
    /// The table (created when missing; default "edgespool_windows").
    #[serde(default = "default_pg_table")]
    pub table: String,
    /// Make a new table a TimescaleDB hypertable (needs the extension; default false).
    #[serde(default)]
    pub timescaledb: bool,
    /// Timeout of connecting (default 10s) and of each statement (6 × that).
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Longest wait between two retries (default 5m).
    #[serde(default = "default_retry_max", deserialize_with = "duration")]
    pub retry_max: Duration,
    /// When windows go to the table: "each_flush" (the default: the windows of each
    /// flush soon after they are committed) or "hourly" (a partition once it closed).
    #[serde(default)]
    pub deliver: Deliver,
    /// While a backlog drains, parts (each of its own partition) are loaded together in
    /// one transaction up to this many rows (default 100000; 1: a part per transaction).
    /// A part larger than this still goes whole.
    #[serde(default = "default_pg_transaction_rows")]
    pub transaction_rows: NonZeroU32,
}

/// When a PostgreSQL sink gets its windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deliver {
    /// The windows of each flush, as parts of the open partition (live dashboards).
    #[default]
    EachFlush,
    /// A partition once it has closed (its end plus the grace), as the object stores.
    Hourly,
}

fn default_pg_schema() -> String {
    "public".to_owned()
}
fn default_pg_transaction_rows() -> NonZeroU32 {
    NonZeroU32::new(100_000).expect("not zero")
}
fn default_pg_table() -> String {
    "edgespool_windows".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

/// How a PostgreSQL connection uses TLS, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without checking its certificate.
    #[default]
    Prefer,
    /// TLS or no connection, without checking the certificate.
    Require,
    /// TLS with the certificate checked against the CA and the host name.
    VerifyFull,
}

/// The checks on one sink that its types cannot make.
pub(super) fn validate_sink(sink: &SinkConfig) -> Result<(), String> {
    let name = &sink.name;
    let object = match &sink.kind {
        SinkKind::Object(object) => object,
        SinkKind::Postgres(pg) => return validate_postgres(name, pg),
        SinkKind::Mqtt(mqtt) => return validate_mqtt_sink(name, mqtt),
    };
    let endpoint = |url: &Option<String>| -> Result<(), String> {
        match url {
            Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => Err(
                format!("sink {name:?}: endpoint {url:?} must start with https:// or http://"),
            ),
            _ => Ok(()),
        }
    };
    match &object.store {
        Store::Local(_) => {}
        Store::S3(s3) => {
            endpoint(&s3.endpoint)?;
            let id = one_secret("access_key_id", &s3.access_key_id, &s3.access_key_id_file)?;
            let key = one_secret(
                "secret_access_key",
                &s3.secret_access_key,
                &s3.secret_access_key_file,
            )?;
            one_secret("session_token", &s3.session_token, &s3.session_token_file)?;
            if id.is_some() != key.is_some() {
                return Err(format!(
                    "sink {name:?}: give both access_key_id and secret_access_key, or neither (to use the environment or the instance profile)"
                ));
            }
        }
        Store::Gcs(gcs) => {
            endpoint(&gcs.endpoint)?;
            let key = one_secret(
                "service_account_key",
                &gcs.service_account_key,
                &gcs.service_account_key_file,
            )?;
            if gcs.anonymous && key.is_some() {
                return Err(format!(
                    "sink {name:?}: anonymous = true sends no credentials; remove the service account key or anonymous"
                ));
            }
        }
        Store::Azure(azure) => {
            endpoint(&azure.endpoint)?;
            one_secret("access_key", &azure.access_key, &azure.access_key_file)?;
            one_secret("sas_token", &azure.sas_token, &azure.sas_token_file)?;
            let secret = one_secret(
                "client_secret",
                &azure.client_secret,
                &azure.client_secret_file,
            )?;
            let principal = [
                azure.client_id.is_some(),
                secret.is_some(),
                azure.tenant_id.is_some(),
            ];
            if principal.contains(&true) && principal.contains(&false) {
                return Err(format!(
                    "sink {name:?}: a service principal needs client_id, client_secret and tenant_id"
                ));
            }
        }
    }
    if !matches!(object.store, Store::Local(_)) && object.part_size < 5 * 1024 * 1024 {
        return Err(format!(
            "sink {name:?}: part_size must be at least 5 MiB (the smallest part S3 accepts)"
        ));
    }
    Ok(())
}

fn validate_postgres(name: &str, pg: &PostgresSink) -> Result<(), String> {
    one_secret("password", &pg.password, &pg.password_file)?;
    if pg.url.is_none() && pg.host.is_none() {
        return Err(format!("sink {name:?}: give `url` or `host`"));
    }
    for (key, ident) in [("schema", &pg.schema), ("table", &pg.table)] {
        let mut chars = ident.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && ident.len() <= 63;
        if !valid {
            return Err(format!(
                "sink {name:?}: {key} {ident:?} must be a lower-case SQL name: letters, digits and _, not starting with a digit"
            ));
        }
    }
    if pg.ca_file.is_some() && pg.sslmode != SslMode::VerifyFull {
        return Err(format!(
            "sink {name:?}: ca_file is used only with sslmode = \"verify-full\""
        ));
    }
    Ok(())
}

fn validate_mqtt_sink(name: &str, mqtt: &MqttSink) -> Result<(), String> {
    validate_broker("sink", name, &mqtt.connection, mqtt.qos)?;
    for (key, template, vars) in [
        ("topic", &mqtt.topic, &["device", "series"][..]),
        (
            "availability_topic",
            &mqtt.availability_topic,
            &["device"][..],
        ),
    ] {
        if template.contains(['+', '#']) {
            return Err(format!(
                "sink {name:?}: {key} {template:?}: a topic to publish to has no wildcards"
            ));
        }
        let mut rest = template.as_str();
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("sink {name:?}: {key} {template:?}: unclosed {{"))?;
            let var = &rest[open + 1..open + close];
            if !vars.contains(&var) {
                let known: Vec<String> = vars.iter().map(|v| format!("{{{v}}}")).collect();
                return Err(format!(
                    "sink {name:?}: {key} {template:?}: unknown {{{var}}}; use {}",
                    known.join(" or ")
                ));
            }
            rest = &rest[open + close + 1..];
        }
    }
    if mqtt.topic.is_empty() {
        return Err(format!("sink {name:?}: topic must not be empty"));
    }
    Ok(())
}

/// Parses one `[[sinks]]` table and checks its name and prefix, at their values.
pub(super) fn parse_sink(table: Spanned<DeValue<'_>>) -> Result<SinkConfig, Located> {
    let at = |key: &str| value_span(&table, key).or(Some(table.span()));
    let (name_at, prefix_at) = (at("name"), at("prefix"));
    let sink = parse_kind(table)?;
    let name = &sink.name;
    valid_key_part(name).map_err(|why| (name_at, format!("sink name {} {why}", quoted(name))))?;
    if let SinkKind::Object(object) = &sink.kind {
        check_prefix(&object.prefix).map_err(|why| {
            (
                prefix_at,
                format!(
                    "sink {name:?}: prefix {} {why}; a prefix is plain segments separated by '/', e.g. \"lake/raw\": no leading '/', no empty, \".\" or \"..\" segment, no '\\' and no control characters",
                    quoted(&object.prefix)
                ),
            )
        })?;
    }
    Ok(sink)
}

/// What object_store's `Path::parse` would refuse in an object key made under `prefix`
/// (the sink would then fail every upload), and what would step out of it.
fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.starts_with('/') {
        return Err("starts with '/'");
    }
    if prefix.contains('\\') {
        return Err("holds a '\\'");
    }
    if prefix.chars().any(char::is_control) {
        return Err("holds a control character");
    }
    let path = prefix.strip_suffix('/').unwrap_or(prefix);
    if path.is_empty() {
        return Ok(());
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err("has an empty segment (\"//\")"),
            "." => return Err("has a \".\" segment"),
            ".." => return Err("has a \"..\" segment"),
            _ => {}
        }
    }
    Ok(())
}

fn parse_kind(table: Spanned<DeValue<'_>>) -> Result<SinkConfig, Located> {
    let span = table.span();
    let compression_at = value_span(&table, "compression").unwrap_or(span.clone());
    let kinds = "\"local\", \"s3\", \"gcs\", \"azure\", \"postgres\", \"mqtt\"";
    let kind = kind_of(&table, "sinks", kinds)?;
    let kind_span = value_span(&table, "kind").unwrap_or(span.clone());
    if let Some(feature) = super::features::missing_sink(&kind) {
        return Err((
            Some(kind_span),
            super::features::not_in_build("sink kind", &kind, feature),
        ));
    }
    let format_at = value_span(&table, "format").unwrap_or(kind_span.clone());
    if kind == "postgres" {
        let pg: PostgresSink = without_kind(table)?;
        return Ok(SinkConfig {
            name: pg.name.clone().unwrap_or_else(|| kind.clone()),
            kind: SinkKind::Postgres(Box::new(pg)),
        });
    }
    if kind == "mqtt" {
        let fields = [field_names::<MqttConnection>(), field_names::<MqttSink>()];
        let [connection, rest] = split_table(table, fields, "sink", &kind)?;
        let mut mqtt: MqttSink = without_kind(rest)?;
        mqtt.connection = without_kind(connection)?;
        return Ok(SinkConfig {
            name: mqtt.name.clone().unwrap_or_else(|| kind.clone()),
            kind: SinkKind::Mqtt(Box::new(mqtt)),
        });
    }
    let remote = kind != "local";
    let backend_fields = match kind.as_str() {
        "local" => field_names::<LocalStore>(),
        "s3" => field_names::<S3Store>(),
        "gcs" => field_names::<GcsStore>(),
        "azure" => field_names::<AzureStore>(),
        other => {
            return Err((
                Some(kind_span),
                format!("unknown sink kind {other:?}; expected one of {kinds}"),
            ));
        }
    };
    let transfer_fields = if remote {
        field_names::<Transfer>()
    } else {
        &[]
    };
    let [common, transfer, backend] = split_table(
        table,
        [
            field_names::<ObjectCommon>(),
            transfer_fields,
            backend_fields,
        ],
        "sink",
        &kind,
    )?;
    let common: ObjectCommon = without_kind(common)?;
    let transfer: Transfer = without_kind(transfer)?;
    let store = match kind.as_str() {
        "local" => Store::Local(without_kind(backend)?),
        "s3" => Store::S3(without_kind(backend)?),
        "gcs" => Store::Gcs(without_kind(backend)?),
        _ => Store::Azure(without_kind(backend)?),
    };
    let format = common.format.unwrap_or(if remote {
        Format::Parquet
    } else {
        Format::Ndjson
    });
    if let Some(feature) = super::features::missing_format(format) {
        return Err((
            Some(format_at),
            super::features::not_in_build("format", format.word(), feature),
        ));
    }
    let compression = match common.compression {
        Some(codec) if !codec.fits(format) => {
            let takes = if format == Format::Parquet {
                "\"zstd\", \"snappy\" or \"none\""
            } else {
                "\"gzip\", \"zstd\" or \"none\""
            };
            return Err((
                Some(compression_at),
                format!(
                    "compression {:?} does not apply to format = {:?}, which takes {takes}",
                    codec.word(),
                    format.word()
                ),
            ));
        }
        Some(codec) => codec,
        None if format == Format::Parquet => Compression::Zstd,
        None => Compression::None,
    };
    Ok(SinkConfig {
        name: common.name.unwrap_or_else(|| kind.clone()),
        kind: SinkKind::Object(Box::new(ObjectSink {
            prefix: common.prefix,
            format,
            layout: common.layout,
            compression,
            keys: common.keys,
            retry_max: common.retry_max,
            timeout: transfer.timeout,
            part_size: transfer.part_size.as_u64(),
            late_grace: common.late_grace,
            late_max_rows: common.late_max_rows,
            chunk_rows: common.chunk_rows,
            store,
        })),
    })
}
