//! The `[[sources]]`: what every source has, each kind's settings, their checks and
//! their parsing.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeValue;

use super::broker::{MqttConnection, default_qos, validate_broker};
use super::durations::duration;
use super::listen::{ListenSource, validate_listen};
use super::located::{Located, value_span};
use super::secret::{Secret, SecretFile};
use super::tables::{field_names, kind_of, split_table, without_kind};
use super::{quoted, valid_key_part};

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_scale() -> f64 {
    1.0
}

/// What every source has, whatever its kind.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The first part of every series name of this source (`name.field`).
    pub name: String,
    /// How often it is sampled; a missed tick is skipped.
    pub interval: Duration,
    /// How long one sampling may take before it counts as an error.
    pub timeout: Duration,
    /// What to do with a device-stamped sample that repeats a reading already taken
    /// (`drop` for the kinds without a `repeats` key: they stamp samples themselves).
    pub repeats: Repeats,
    /// The kind and its settings.
    pub kind: SourceKind,
}

/// The kinds of source.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// CPU temperature, load, memory and spool disk space of this machine.
    System(SystemSource),
    /// Numbers read from files (hwmon, thermal, IIO, 1-wire).
    Sysfs(SysfsSource),
    /// A JSON API polled over HTTP.
    Http(Box<HttpSource>),
    /// Topics of an MQTT broker.
    Mqtt(Box<MqttSource>),
    /// An HTTP server devices push to (InfluxDB line protocol, JSON).
    Listen(Box<ListenSource>),
    /// Lines of a device on a serial port.
    Serial(Box<super::serial::SerialSource>),
}

impl SourceKind {
    /// The `kind = "…"` word of this source.
    pub fn word(&self) -> &'static str {
        match self {
            SourceKind::System(_) => "system",
            SourceKind::Sysfs(_) => "sysfs",
            SourceKind::Http(_) => "http",
            SourceKind::Mqtt(_) => "mqtt",
            SourceKind::Listen(_) => "listen",
            SourceKind::Serial(_) => "serial",
        }
    }
}

/// `kind = "system"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemSource {
    /// Source name; defaults to "system".
    #[serde(default)]
    pub name: Option<String>,
    /// Sampling interval (default 1s).
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// Timeout of one sampling (default 5s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The folder that holds `proc/` and `sys/` (default "/"), for tests and containers.
    #[serde(default = "default_root")]
    pub root: PathBuf,
}

fn default_root() -> PathBuf {
    PathBuf::from("/")
}

/// `kind = "sysfs"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysfsSource {
    /// Source name (required).
    pub name: String,
    /// Sampling interval (default 1s).
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// Timeout of one sampling (default 5s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Folder the `path` of every file is taken under (default "/").
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// The files to read, one field each.
    pub files: Vec<SysfsFile>,
}

/// One `[[sources.files]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysfsFile {
    /// The field name (the series is `source.field`).
    pub field: String,
    /// The file, under the source's `root`.
    pub path: PathBuf,
    /// How to read it; by default `w1_slave` for files of that name, else `number`.
    #[serde(default)]
    pub format: Option<FileFormat>,
    /// Multiplies the raw number (e.g. 0.001 for millidegrees).
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Added after scaling.
    #[serde(default)]
    pub offset: f64,
    /// The unit of the scaled value, carried into the output.
    #[serde(default)]
    pub unit: Option<String>,
}

/// How a sysfs file holds its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One number, as hwmon, thermal, IIO and 1-wire `temperature` files hold.
    Number,
    /// The DS18B20 two-line format: CRC check ending in YES, then `t=` millidegrees.
    W1Slave,
}

/// `kind = "http"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSource {
    /// Source name (required).
    pub name: String,
    /// Polling interval (default 1s).
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// Timeout of one request, body included (default 5s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The URL, `http://` or `https://`.
    pub url: String,
    /// Query parameters; values may be `${ENV_VAR}` and are treated as secrets.
    #[serde(default)]
    pub query: BTreeMap<String, Secret>,
    /// Request headers; values may be `${ENV_VAR}` and are treated as secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Request headers whose values are read from files (systemd credentials).
    #[serde(default)]
    pub header_files: BTreeMap<String, SecretFile>,
    /// Fields taken from a JSON object by JSON pointer.
    #[serde(default)]
    pub fields: Vec<JsonField>,
    /// JSON pointer to each sample's own timestamp (RFC 3339, or epoch seconds or
    /// milliseconds); without it samples are stamped when the response arrives.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// A table response: a header of field names and rows of positional values.
    #[serde(default)]
    pub table: Option<TableConfig>,
    /// Which redirects are followed (default "same_origin": those that stay on the
    /// URL's scheme, host and port).
    #[serde(default)]
    pub redirects: Redirects,
    /// Most series this source makes (default 1000): a table's rows beyond it (new key
    /// values) are dropped and counted in `series_dropped`.
    #[serde(default = "default_max_series")]
    pub max_series: NonZeroU32,
    /// What a device-stamped sample whose series and timestamp equal those of one already
    /// taken is (default "drop": a repeat, dropped and counted; "keep": a sample like any
    /// other, for devices that send several values per timestamp).
    #[serde(default)]
    pub repeats: Repeats,
}

/// Which HTTP redirects a source follows, at most [`Redirects::MAX`] in a row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redirects {
    /// Those to the same scheme, host and port as `url`; one elsewhere is an error, so
    /// that the headers and the query never reach another server.
    #[default]
    SameOrigin,
    /// None: a redirect is an error of the source.
    None,
    /// Any, to any host: the configured headers go along (only `Authorization` and
    /// cookies are dropped on the way to another host).
    Any,
}

/// What a repeated reading is: a device-stamped sample whose series and timestamp equal
/// those of one already taken (see docs/formats.md, "Repeated readings").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Repeats {
    /// A repeat: dropped and counted (`repeats` in `status`); the first value stays.
    #[default]
    Drop,
    /// A sample like any other.
    Keep,
}

impl Redirects {
    /// The most redirects followed in a row.
    pub const MAX: usize = 5;
}

/// `kind = "mqtt"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    /// Source name (required).
    pub name: String,
    /// How often received messages are handed to the aggregator and acknowledged
    /// (default 100ms).
    #[serde(default = "default_handover", deserialize_with = "duration")]
    pub interval: Duration,
    /// Timeout of one hand-over (default 5s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The broker and how to connect to it (split from the same table).
    #[serde(skip)]
    pub connection: MqttConnection,
    /// 0 or 1 (default 1).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Largest payload taken; longer ones are counted invalid and acknowledged
    /// (default 256 KiB).
    #[serde(default = "default_max_payload")]
    pub max_payload: bytesize::ByteSize,
    /// Largest message the broker may send this client (MQTT 5 Maximum Packet Size,
    /// default 4 × `max_payload`, at least 1 MiB, at most 256 MiB): the broker drops a
    /// larger one without sending it. Also the most memory one message takes.
    #[serde(default)]
    pub max_packet: Option<bytesize::ByteSize>,
    /// Most series this source makes (default 1000): samples of further series (new
    /// topics or fields) are dropped and counted in `series_dropped`.
    #[serde(default = "default_max_series")]
    pub max_series: NonZeroU32,
    /// What a device-stamped sample whose series and timestamp equal those of one already
    /// taken is (default "drop": a repeat, dropped and counted; "keep": a sample like any
    /// other, for devices that send several values per timestamp).
    #[serde(default)]
    pub repeats: Repeats,
    /// What to subscribe to.
    pub subscriptions: Vec<MqttSubscription>,
}

impl MqttSource {
    /// The Maximum Packet Size announced to the broker, in bytes.
    pub fn max_packet_bytes(&self) -> u32 {
        let bytes = match self.max_packet {
            Some(size) => size.as_u64(),
            None => self.max_payload.as_u64().saturating_mul(4).max(1 << 20),
        };
        bytes.min(MAX_PACKET_LIMIT) as u32
    }
}

/// The largest packet MQTT can carry (a remaining length of 268,435,455 bytes): 256 MiB.
pub const MAX_PACKET_LIMIT: u64 = 268_435_455;

pub(super) fn default_max_series() -> NonZeroU32 {
    NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN)
}

fn default_handover() -> Duration {
    Duration::from_millis(100)
}
fn default_max_payload() -> bytesize::ByteSize {
    bytesize::ByteSize::kib(256)
}

/// How a payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// A plain number (`21.5`).
    Number,
    /// A JSON object; `fields` take values by pointer.
    Json,
    /// A JSON object whose every numeric leaf is a field (`BME280.Temperature`).
    Flatten,
}

/// One `[[sources.subscriptions]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSubscription {
    /// A topic filter, with `+` and `#` wildcards.
    pub topic: String,
    /// How payloads are read.
    pub payload: Payload,
    /// The series name after `source.`: `{topic}` (the topic's levels joined by `.`),
    /// `{topic.N}` (level N, from 0) and `{field}`. Default `{topic}` for numbers,
    /// `{topic}.{field}` otherwise.
    #[serde(default)]
    pub series: Option<String>,
    /// For `payload = "json"`: the fields.
    #[serde(default)]
    pub fields: Vec<JsonField>,
    /// JSON pointer to the sample's own time (RFC 3339 with an offset, or epoch seconds
    /// or milliseconds); without it, the time the message arrived.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// For `payload = "flatten"`: booleans as 0 and 1 (default false: skipped).
    #[serde(default)]
    pub booleans: bool,
    /// Unit of a plain number or of every flattened field.
    #[serde(default)]
    pub unit: Option<String>,
}

/// One `[[sources.fields]]` entry of an HTTP source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonField {
    /// The field name (the series is `source.field`).
    pub name: String,
    /// JSON pointer to the number, e.g. "/sensor/pm2_5".
    pub pointer: String,
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

/// `[sources.table]`: responses shaped like PurpleAir's `{"fields": [...], "data": [[...], ...]}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// JSON pointer to the array of column names (default "/fields").
    #[serde(default = "default_fields_pointer")]
    pub fields_pointer: String,
    /// JSON pointer to the array of rows (default "/data").
    #[serde(default = "default_rows_pointer")]
    pub rows_pointer: String,
    /// The column whose value names the row (e.g. "ID"): one series per row and column,
    /// `source.{key}.{column}`, tagged `{key column}={value}`.
    pub key: String,
    /// The numeric columns to take.
    pub columns: Vec<String>,
    /// Units of some of those columns.
    #[serde(default)]
    pub units: BTreeMap<String, String>,
    /// The column holding each row's own timestamp (RFC 3339 or epoch seconds/milliseconds).
    #[serde(default)]
    pub timestamp_column: Option<String>,
}

fn default_fields_pointer() -> String {
    "/fields".to_owned()
}
fn default_rows_pointer() -> String {
    "/data".to_owned()
}

/// The checks on one source that its types cannot make.
pub(super) fn validate_source(source: &SourceConfig) -> Result<(), String> {
    let name = &source.name;
    if source.interval.is_zero() || source.timeout.is_zero() {
        return Err(format!(
            "source {name:?}: interval and timeout must be above zero"
        ));
    }
    match &source.kind {
        SourceKind::System(_) => Ok(()),
        SourceKind::Sysfs(sysfs) => {
            if sysfs.files.is_empty() {
                return Err(format!(
                    "source {name:?}: list at least one [[sources.files]]"
                ));
            }
            Ok(())
        }
        SourceKind::Http(http) => {
            let url = reqwest::Url::parse(&http.url)
                .map_err(|err| format!("source {name:?}: invalid url: {err}"))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!(
                    "source {name:?}: url must start with http:// or https://"
                ));
            }
            if http.fields.is_empty() && http.table.is_none() {
                return Err(format!(
                    "source {name:?}: give [[sources.fields]] or a [sources.table]"
                ));
            }
            let pointers = http
                .fields
                .iter()
                .map(|f| &f.pointer)
                .chain(&http.timestamp)
                .chain(
                    http.table
                        .iter()
                        .flat_map(|t| [&t.fields_pointer, &t.rows_pointer]),
                );
            for pointer in pointers {
                if !(pointer.is_empty() || pointer.starts_with('/')) {
                    return Err(format!(
                        "source {name:?}: JSON pointer {pointer:?} must be empty or start with '/'"
                    ));
                }
            }
            Ok(())
        }
        SourceKind::Mqtt(mqtt) => validate_mqtt(name, mqtt),
        // Checked as it is parsed, where the address's position is known.
        SourceKind::Listen(_) => Ok(()),
        // Checked as it is parsed, each error at its value (config/serial.rs).
        SourceKind::Serial(_) => Ok(()),
    }
}

fn validate_mqtt(name: &str, mqtt: &MqttSource) -> Result<(), String> {
    validate_broker("source", name, &mqtt.connection, mqtt.qos)?;
    if let Some(max_packet) = mqtt.max_packet
        && (max_packet < mqtt.max_payload || max_packet.as_u64() > MAX_PACKET_LIMIT)
    {
        return Err(format!(
            "source {name:?}: max_packet must be at least max_payload ({}) and at most 256 MiB",
            mqtt.max_payload
        ));
    }
    if mqtt.subscriptions.is_empty() {
        return Err(format!(
            "source {name:?}: list at least one [[sources.subscriptions]]"
        ));
    }
    for sub in &mqtt.subscriptions {
        let topic = &sub.topic;
        let levels: Vec<&str> = topic.split('/').collect();
        let bad_hash = levels.iter().enumerate().any(|(i, l)| {
            (l.contains('#') && (*l != "#" || i + 1 != levels.len()))
                || (l.contains('+') && *l != "+")
        });
        if topic.is_empty() || bad_hash {
            return Err(format!(
                "source {name:?}: topic filter {topic:?}: `+` must be a whole level and `#` the whole last level"
            ));
        }
        if sub.payload == Payload::Json && sub.fields.is_empty() {
            return Err(format!(
                "source {name:?}: topic {topic:?}: payload = \"json\" needs [[sources.subscriptions.fields]]"
            ));
        }
        let pointers = sub.fields.iter().map(|f| &f.pointer).chain(&sub.timestamp);
        for pointer in pointers {
            if !(pointer.is_empty() || pointer.starts_with('/')) {
                return Err(format!(
                    "source {name:?}: JSON pointer {pointer:?} must be empty or start with '/'"
                ));
            }
        }
        if let Some(template) = &sub.series {
            let mut rest = template.as_str();
            while let Some(open) = rest.find('{') {
                let close = rest[open..]
                    .find('}')
                    .ok_or_else(|| format!("source {name:?}: series {template:?}: unclosed {{"))?;
                let var = &rest[open + 1..open + close];
                let known = var == "topic"
                    || var == "field"
                    || var
                        .strip_prefix("topic.")
                        .is_some_and(|n| n.parse::<usize>().is_ok());
                if !known {
                    return Err(format!(
                        "source {name:?}: series {template:?}: unknown {{{var}}}; use {{topic}}, {{topic.N}} or {{field}}"
                    ));
                }
                rest = &rest[open + close + 1..];
            }
        }
    }
    Ok(())
}

/// Parses one `[[sources]]` table and checks its name, at its value.
pub(super) fn parse_source(table: Spanned<DeValue<'_>>) -> Result<SourceConfig, Located> {
    let name_at = value_span(&table, "name").or(Some(table.span()));
    let source = parse_kind(table)?;
    let name = &source.name;
    valid_key_part(name).map_err(|why| (name_at, format!("source name {} {why}", quoted(name))))?;
    Ok(source)
}

fn parse_kind(table: Spanned<DeValue<'_>>) -> Result<SourceConfig, Located> {
    let span = table.span();
    let kind = kind_of(
        &table,
        "sources",
        "\"system\", \"sysfs\", \"http\", \"mqtt\", \"serial\", \"listen\"",
    )?;
    let kind_span = value_span(&table, "kind").unwrap_or(span.clone());
    if let Some(feature) = super::features::missing_source(&kind) {
        return Err((
            Some(kind_span),
            super::features::not_in_build("source kind", &kind, feature),
        ));
    }
    Ok(match kind.as_str() {
        "system" => {
            let s: SystemSource = without_kind(table)?;
            SourceConfig {
                name: s.name.clone().unwrap_or_else(|| "system".to_owned()),
                interval: s.interval,
                timeout: s.timeout,
                repeats: Repeats::Drop,
                kind: SourceKind::System(s),
            }
        }
        "sysfs" => {
            let s: SysfsSource = without_kind(table)?;
            SourceConfig {
                name: s.name.clone(),
                interval: s.interval,
                timeout: s.timeout,
                repeats: Repeats::Drop,
                kind: SourceKind::Sysfs(s),
            }
        }
        "http" => {
            let s: HttpSource = without_kind(table)?;
            SourceConfig {
                name: s.name.clone(),
                interval: s.interval,
                timeout: s.timeout,
                repeats: s.repeats,
                kind: SourceKind::Http(Box::new(s)),
            }
        }
        "mqtt" => {
            let fields = [field_names::<MqttConnection>(), field_names::<MqttSource>()];
            let [connection, rest] = split_table(table, fields, "source", &kind)?;
            let mut s: MqttSource = without_kind(rest)?;
            s.connection = without_kind(connection)?;
            SourceConfig {
                name: s.name.clone(),
                interval: s.interval,
                timeout: s.timeout,
                repeats: s.repeats,
                kind: SourceKind::Mqtt(Box::new(s)),
            }
        }
        "listen" => {
            let address_at = value_span(&table, "address");
            let s: ListenSource = without_kind(table)?;
            validate_listen(&s.name, &s).map_err(|(at_address, why)| {
                let at = if at_address { address_at.clone() } else { None };
                (at.or(Some(span.clone())), why)
            })?;
            SourceConfig {
                name: s.name.clone(),
                interval: default_interval(),
                timeout: s.timeout,
                repeats: s.repeats,
                kind: SourceKind::Listen(Box::new(s)),
            }
        }
        "serial" => super::serial::parse_serial(table)?,
        other => {
            return Err((
                Some(kind_span),
                format!(
                    "unknown source kind {other:?}; expected one of \"system\", \"sysfs\", \"http\", \"mqtt\", \"serial\", \"listen\""
                ),
            ));
        }
    })
}
