//! `kind = "serial"`: a device on a serial line (USB or the Pi's UART) that prints a line
//! per reading. Its settings, their checks (each at the value at fault) and its parsing.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use toml::Spanned;
use toml::de::DeValue;

use super::durations::duration;
use super::located::{Located, value_span};
use super::source::{Repeats, SourceConfig, SourceKind};
use super::tables::without_kind;

/// `kind = "serial"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSource {
    /// Source name (required).
    pub name: String,
    /// How often the lines read are handed to the aggregator (default 1s); each line is
    /// stamped when it arrives (or with its own time), not at the hand-over.
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// Timeout of one hand-over (default 5s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The port, best a stable `/dev/serial/by-id/…` name (`/dev/ttyUSB0` and
    /// `/dev/ttyACM0` may swap on the next boot); the Pi's UART is `/dev/serial0`.
    pub port: PathBuf,
    /// Bits per second (default 9600).
    #[serde(default = "default_baud")]
    pub baud: NonZeroU32,
    /// Data bits: 5, 6, 7 or 8 (default 8).
    #[serde(default = "default_data_bits", deserialize_with = "data_bits")]
    pub data_bits: u8,
    /// Parity: "none" (default), "odd" or "even".
    #[serde(default)]
    pub parity: Parity,
    /// Stop bits: 1 (default) or 2.
    #[serde(default = "default_stop_bits", deserialize_with = "stop_bits")]
    pub stop_bits: u8,
    /// Flow control: "none" (default), "software" (XON/XOFF) or "hardware" (RTS/CTS).
    #[serde(default)]
    pub flow_control: FlowControl,
    /// How a line is read: "plotter", "csv", "json" or "regex".
    pub format: LineFormat,
    /// For "plotter" and "csv": the names of the values by position ("" or "_" skips
    /// one). A plotter's unnamed values are otherwise `value1`, `value2`, …
    #[serde(default)]
    pub columns: Vec<String>,
    /// For "regex": a regular expression whose named groups (`(?P<spo2>…)`) are the
    /// fields.
    #[serde(default)]
    pub regex: Option<String>,
    /// Scale, offset and unit of some fields; for "json" the fields themselves, each by
    /// JSON pointer.
    #[serde(default)]
    pub fields: Vec<SerialField>,
    /// The device's own time in each line; without it lines are stamped on arrival.
    #[serde(default)]
    pub timestamp: Option<SerialTimestamp>,
    /// The longest line taken (default 4 KiB): a longer one is dropped up to its newline
    /// and counted invalid.
    #[serde(default = "default_max_line")]
    pub max_line: bytesize::ByteSize,
    /// Warn (an error of the source, in `status`) when no line came for this long while
    /// the port is open; unset: no warning.
    #[serde(default, deserialize_with = "optional_duration")]
    pub silence: Option<Duration>,
    /// Most series this source makes (default 1000): a plotter's new labels beyond it are
    /// dropped and counted in `series_dropped`.
    #[serde(default = "default_max_series")]
    pub max_series: NonZeroU32,
    /// What a device-stamped line whose series and timestamp equal those of one already
    /// taken is (default "drop": a repeat, dropped and counted; "keep": a sample).
    #[serde(default)]
    pub repeats: Repeats,
}

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Odd parity.
    Odd,
    /// Even parity.
    Even,
}

/// Flow control of a serial line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    /// None.
    #[default]
    None,
    /// XON/XOFF characters.
    Software,
    /// The RTS/CTS lines.
    Hardware,
}

/// How a serial source reads a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    /// Numbers separated by spaces, commas or tabs, optionally `label:value`, as the
    /// Arduino Serial Plotter reads them.
    Plotter,
    /// Comma-separated values named by `columns`.
    Csv,
    /// One JSON object per line; `fields` by JSON pointer.
    Json,
    /// A regular expression; each named group is a field.
    Regex,
}

/// One `[[sources.fields]]` entry of a serial source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialField {
    /// The field (the series is `source.name`): a plotter label or column name, a CSV
    /// column, a regex group, or the name of a JSON field.
    pub name: String,
    /// For "json": the JSON pointer to the number, e.g. "/sensor/pm2_5".
    #[serde(default)]
    pub pointer: Option<String>,
    /// Multiplies the value.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Added after scaling.
    #[serde(default)]
    pub offset: f64,
    /// The unit, carried into the output.
    #[serde(default)]
    pub unit: Option<String>,
}

/// `[sources.timestamp]` of a serial source: the device's own time in each line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialTimestamp {
    /// Where it is: a regex group, a CSV or plotter column, or a JSON pointer.
    pub field: String,
    /// A chrono strftime format ("%m/%d/%y %H:%M:%S"); without it, RFC 3339 with an
    /// offset or a number of epoch seconds (ms, µs, ns by magnitude).
    #[serde(default)]
    pub format: Option<String>,
    /// The offset from UTC of the device's clock, for a format without `%z`: "+01:00",
    /// "-05:00" (default "+00:00", UTC). A fixed offset: a clock that follows summer time
    /// needs its offset changed, or better a device set to UTC.
    #[serde(default)]
    pub utc_offset: Option<String>,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_baud() -> NonZeroU32 {
    NonZeroU32::new(9600).unwrap_or(NonZeroU32::MIN)
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_scale() -> f64 {
    1.0
}
fn default_max_line() -> bytesize::ByteSize {
    bytesize::ByteSize::kib(4)
}
fn default_max_series() -> NonZeroU32 {
    NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN)
}

fn data_bits<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
    let bits = i64::deserialize(deserializer)?;
    match bits {
        5..=8 => Ok(bits as u8),
        _ => Err(de::Error::custom(format!(
            "data_bits must be 5, 6, 7 or 8, not {bits}"
        ))),
    }
}

fn stop_bits<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
    let bits = i64::deserialize(deserializer)?;
    match bits {
        1 | 2 => Ok(bits as u8),
        _ => Err(de::Error::custom(format!(
            "stop_bits must be 1 or 2, not {bits}"
        ))),
    }
}

fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

/// Reads a `utc_offset`: "+01:00", "-0530", "Z" or "UTC".
pub fn parse_utc_offset(text: &str) -> Result<chrono::FixedOffset, String> {
    let bad = || format!("utc_offset {text:?} is not an offset like \"+01:00\" or \"-05:00\"");
    if matches!(text, "Z" | "UTC" | "utc") {
        return chrono::FixedOffset::east_opt(0).ok_or_else(bad);
    }
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err(bad()),
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let hours: i32 = digits[..2].parse().map_err(|_| bad())?;
    let minutes: i32 = digits[2..].parse().map_err(|_| bad())?;
    if hours > 23 || minutes > 59 {
        return Err(bad());
    }
    chrono::FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60)).ok_or_else(bad)
}

/// Whether a strftime format has an offset of its own (`%z`, `%:z`, `%#z`).
pub fn format_has_offset(format: &str) -> bool {
    format.contains("%z") || format.contains("%:z") || format.contains("%#z")
}

/// The named groups of a regex, or why it cannot serve.
pub fn regex_groups(pattern: &str) -> Result<Vec<String>, String> {
    let regex =
        regex_lite::Regex::new(pattern).map_err(|err| format!("regex does not compile: {err}"))?;
    let groups: Vec<String> = regex.capture_names().flatten().map(str::to_owned).collect();
    if groups.is_empty() {
        return Err(
            "regex has no named group: name each value it captures, like (?P<spo2>[0-9-]+)"
                .to_owned(),
        );
    }
    Ok(groups)
}

/// Parses a `kind = "serial"` table and checks it, each error at the value at fault.
pub(super) fn parse_serial(table: Spanned<DeValue<'_>>) -> Result<SourceConfig, Located> {
    let span = table.span();
    let at = |key: &str| value_span(&table, key).or(Some(span.clone()));
    let (regex_at, timestamp_at, columns_at, port_at) =
        (at("regex"), at("timestamp"), at("columns"), at("port"));
    let format_at = at("format");
    // Each `[[sources.fields]]` entry's own span, for an error about that field.
    let field_spans: Vec<std::ops::Range<usize>> = match table.get_ref() {
        DeValue::Table(t) => match t.get("fields").map(|v| v.get_ref()) {
            Some(DeValue::Array(items)) => items.iter().map(|item| item.span()).collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let fields_at = at("fields");
    let s: SerialSource = without_kind(table)?;
    let name = &s.name;
    let fail = |at: &Option<std::ops::Range<usize>>, why: String| {
        (at.clone(), format!("source {name:?}: {why}"))
    };
    if s.port.as_os_str().is_empty() {
        return Err(fail(
            &port_at,
            "port must name a device, e.g. /dev/serial/by-id/…".into(),
        ));
    }
    if s.interval.is_zero() || s.timeout.is_zero() {
        return Err(fail(
            &Some(span.clone()),
            "interval and timeout must be above zero".into(),
        ));
    }
    if s.max_line.as_u64() < 16 || s.max_line.as_u64() > 1 << 20 {
        return Err(fail(
            &Some(span.clone()),
            "max_line must be from 16 B to 1 MiB".into(),
        ));
    }
    if s.format != LineFormat::Regex && s.regex.is_some() {
        return Err(fail(
            &regex_at,
            "regex is only for format = \"regex\"".into(),
        ));
    }
    if !matches!(s.format, LineFormat::Plotter | LineFormat::Csv) && !s.columns.is_empty() {
        return Err(fail(
            &columns_at,
            "columns is only for format = \"plotter\" or \"csv\"".into(),
        ));
    }
    // The names a line of this format can hold, where they are known in advance.
    let known: Option<Vec<String>> = match s.format {
        LineFormat::Plotter => None,
        LineFormat::Csv => {
            if s.columns.is_empty() {
                return Err(fail(
                    &format_at,
                    "format = \"csv\" needs columns = [\"…\", …]".into(),
                ));
            }
            Some(s.columns.clone())
        }
        LineFormat::Json => {
            if s.fields.is_empty() {
                return Err(fail(
                    &format_at,
                    "format = \"json\" needs [[sources.fields]], each with a pointer".into(),
                ));
            }
            None
        }
        LineFormat::Regex => {
            let Some(pattern) = &s.regex else {
                return Err(fail(
                    &format_at,
                    "format = \"regex\" needs regex = '…'".into(),
                ));
            };
            Some(regex_groups(pattern).map_err(|why| fail(&regex_at, why))?)
        }
    };
    for (i, field) in s.fields.iter().enumerate() {
        let fields_at = field_spans.get(i).cloned().or(fields_at.clone());
        let has_pointer = field.pointer.is_some();
        if s.format == LineFormat::Json {
            match &field.pointer {
                None => {
                    return Err(fail(
                        &fields_at,
                        format!("field {:?} needs a pointer (format = \"json\")", field.name),
                    ));
                }
                Some(p) if !(p.is_empty() || p.starts_with('/')) => {
                    return Err(fail(
                        &fields_at,
                        format!("JSON pointer {p:?} must be empty or start with '/'"),
                    ));
                }
                Some(_) => {}
            }
        } else if has_pointer {
            return Err(fail(
                &fields_at,
                format!(
                    "field {:?}: pointer is only for format = \"json\"",
                    field.name
                ),
            ));
        }
        if let Some(known) = &known
            && !known.contains(&field.name)
        {
            let what = if s.format == LineFormat::Regex {
                "a named group of the regex"
            } else {
                "one of the columns"
            };
            return Err(fail(
                &fields_at,
                format!(
                    "field {:?} is not {what} ({})",
                    field.name,
                    known.join(", ")
                ),
            ));
        }
    }
    if let Some(stamp) = &s.timestamp {
        if let Some(known) = &known
            && !known.contains(&stamp.field)
        {
            return Err(fail(
                &timestamp_at,
                format!(
                    "timestamp field {:?} is not in the line ({})",
                    stamp.field,
                    known.join(", ")
                ),
            ));
        }
        if s.format == LineFormat::Json && !(stamp.field.is_empty() || stamp.field.starts_with('/'))
        {
            return Err(fail(
                &timestamp_at,
                format!(
                    "timestamp field {:?}: a JSON pointer starts with '/'",
                    stamp.field
                ),
            ));
        }
        if let Some(format) = &stamp.format {
            use chrono::format::{Item, StrftimeItems};
            if StrftimeItems::new(format).any(|item| matches!(item, Item::Error)) {
                return Err(fail(
                    &timestamp_at,
                    format!("timestamp format {format:?} is not a strftime format"),
                ));
            }
        }
        if let Some(offset) = &stamp.utc_offset {
            parse_utc_offset(offset).map_err(|why| fail(&timestamp_at, why))?;
        }
    }
    Ok(SourceConfig {
        name: s.name.clone(),
        interval: s.interval,
        timeout: s.timeout,
        repeats: s.repeats,
        kind: SourceKind::Serial(Box::new(s)),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;

    /// The error of a configuration whose serial source has `settings` after its name.
    fn error_of(settings: &str) -> String {
        let text = format!(
            "[agent]\nspool = \"/x.db\"\n\n[[sources]]\nkind = \"serial\"\nname = \"oxi\"\n{settings}\n\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n"
        );
        Config::parse(&text, Path::new("edgespool.toml"))
            .expect_err("this configuration must be rejected")
            .to_string()
    }

    const PORT: &str = "port = \"/dev/serial/by-id/usb-x\"\n";

    #[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
    #[test]
    fn serial_settings_are_checked_at_the_value_at_fault() {
        let cases = [
            (
                format!("{PORT}format = \"plotter\"\nbaud_rate = 9600"),
                "edgespool.toml:9:1: unknown field `baud_rate`, expected one of",
            ),
            (
                format!("{PORT}format = \"plotter\"\nparity = \"mark\""),
                "edgespool.toml:9:10: unknown variant `mark`, expected one of `none`, `odd`, `even`",
            ),
            (
                format!("{PORT}format = \"plotter\"\ndata_bits = 9"),
                "edgespool.toml:9:13: data_bits must be 5, 6, 7 or 8, not 9",
            ),
            (
                format!("{PORT}format = \"plotter\"\nstop_bits = 3"),
                "edgespool.toml:9:13: stop_bits must be 1 or 2, not 3",
            ),
            (
                format!("{PORT}format = \"morse\""),
                "edgespool.toml:8:10: unknown variant `morse`, expected one of `plotter`, `csv`, `json`, `regex`",
            ),
            (
                format!("{PORT}format = \"regex\"\nregex = '^SPO2=(?P<spo2>[0-9+)%'"),
                "edgespool.toml:9:9: source \"oxi\": regex does not compile: ",
            ),
            (
                format!("{PORT}format = \"regex\"\nregex = '^SPO2=([0-9]+)%'"),
                "edgespool.toml:9:9: source \"oxi\": regex has no named group: name each value it captures, like (?P<spo2>[0-9-]+)",
            ),
            (
                format!("{PORT}format = \"regex\""),
                "edgespool.toml:8:10: source \"oxi\": format = \"regex\" needs regex = '…'",
            ),
            (
                format!("{PORT}format = \"csv\""),
                "edgespool.toml:8:10: source \"oxi\": format = \"csv\" needs columns = [\"…\", …]",
            ),
            (
                format!(
                    "{PORT}format = \"regex\"\nregex = 'SPO2=(?P<spo2>[0-9]+)'\n[[sources.fields]]\nname = \"spo2\"\n[[sources.fields]]\nname = \"bpm\""
                ),
                "edgespool.toml:12:1: source \"oxi\": field \"bpm\" is not a named group of the regex (spo2)",
            ),
            (
                format!("{PORT}format = \"json\"\n[[sources.fields]]\nname = \"cpm\""),
                "edgespool.toml:9:1: source \"oxi\": field \"cpm\" needs a pointer (format = \"json\")",
            ),
            (
                format!(
                    "{PORT}format = \"csv\"\ncolumns = [\"t\", \"v\"]\n[sources.timestamp]\nfield = \"time\""
                ),
                "edgespool.toml:10:1: source \"oxi\": timestamp field \"time\" is not in the line (t, v)",
            ),
            (
                format!(
                    "{PORT}format = \"plotter\"\n[sources.timestamp]\nfield = \"t\"\nformat = \"%Q\""
                ),
                "edgespool.toml:9:1: source \"oxi\": timestamp format \"%Q\" is not a strftime format",
            ),
            (
                format!(
                    "{PORT}format = \"plotter\"\n[sources.timestamp]\nfield = \"t\"\nutc_offset = \"CET\""
                ),
                "edgespool.toml:9:1: source \"oxi\": utc_offset \"CET\" is not an offset like \"+01:00\" or \"-05:00\"",
            ),
            (
                "format = \"plotter\"".to_owned(),
                "edgespool.toml:4:1: missing field `port`",
            ),
            (
                format!("{PORT}format = \"plotter\"\nsilence = \"soon\""),
                "edgespool.toml:9:11: invalid duration \"soon\"",
            ),
        ];
        for (settings, want) in cases {
            let got = error_of(&settings);
            assert!(
                got.starts_with(want),
                "{settings}\n got: {got}\nwant: {want}"
            );
        }
    }

    #[cfg_attr(not(feature = "full"), ignore = "names kinds the lean set lacks")]
    #[test]
    fn a_serial_source_defaults_to_9600_8n1_without_flow_control() {
        let text = "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"serial\"\nname = \"oxi\"\nport = \"/dev/serial0\"\nformat = \"plotter\"\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n";
        let config = Config::parse(text, Path::new("x.toml")).expect("valid");
        let super::super::SourceKind::Serial(s) = &config.sources[0].kind else {
            panic!("a serial source");
        };
        assert_eq!(
            (
                s.baud.get(),
                s.data_bits,
                s.parity,
                s.stop_bits,
                s.flow_control
            ),
            (9600, 8, super::Parity::None, 1, super::FlowControl::None)
        );
        assert_eq!((s.max_line.as_u64(), s.silence), (4096, None));
        assert_eq!(
            config.sources[0].interval,
            std::time::Duration::from_secs(1)
        );
    }

    #[test]
    fn utc_offsets_read_with_or_without_a_colon() {
        let east = |s| super::parse_utc_offset(s).map(|o| o.local_minus_utc());
        assert_eq!(east("+01:00"), Ok(3600));
        assert_eq!(east("-0530"), Ok(-19800));
        assert_eq!(east("Z"), Ok(0));
        assert!(east("+24:00").is_err() && east("1:00").is_err());
    }
}
