//! The one TOML file that configures the agent: `[agent]`, `[[sources]]` and `[[sinks]]`.
//!
//! Every error names the file, the line and the column of the key or value at fault.
//! Secrets (HTTP headers and query values) may be written as `${ENV_VAR}` or read from
//! a file named by a `*_files` table (for systemd's `LoadCredential=`); they are resolved
//! here, once, and only ever printed as `<secret>`.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// The commented example shipped with the binary (`edgespool example-config`).
pub const EXAMPLE: &str = include_str!("../../deploy/quickstart.toml");

/// Where `run`, `status` and `check-config` look when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/edgespool/edgespool.toml";

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A syntax error, an unknown key, a bad value or a failed check.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The whole configuration, resolved and validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `[agent]` table.
    pub agent: AgentConfig,
    /// The `[[sources]]`, in file order.
    pub sources: Vec<SourceConfig>,
    /// The `[[sinks]]`, in file order.
    pub sinks: Vec<SinkConfig>,
}

/// The `[agent]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Names this device in object keys and rows; defaults to the host name.
    #[serde(default)]
    pub device_id: Option<String>,
    /// The SQLite spool file.
    #[serde(default = "default_spool")]
    pub spool: PathBuf,
    /// Length of the aggregation windows, in whole seconds ("60s").
    #[serde(default = "default_window")]
    pub window: Seconds,
    /// Length of an uploaded partition, in whole seconds ("1h"); a multiple of `window`
    /// that divides a day.
    #[serde(default = "default_partition")]
    pub partition: Seconds,
    /// How long a partition stays open for stragglers once its last window is flushed
    /// (which is 2 s after its end).
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub grace: Duration,
    /// The most the spool may hold on disk ("256 MiB").
    #[serde(default = "default_budget")]
    pub disk_budget: bytesize::ByteSize,
    /// What to do when the spool reaches `disk_budget`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Whether to wait for a synchronised clock before stamping samples.
    #[serde(default)]
    pub clock: ClockPolicy,
    /// The longest wait for the clock to be synchronised (default 10m); after it the
    /// clock is trusted as it is.
    #[serde(default = "default_clock_wait", deserialize_with = "duration")]
    pub clock_wait: Duration,
}

fn default_clock_wait() -> Duration {
    Duration::from_secs(600)
}

/// Whether the agent trusts an unsynchronised clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockPolicy {
    /// Hold the samples the agent stamps while a time service (systemd-timesyncd,
    /// chrony, ntpd) has not synchronised the clock yet, up to `clock_wait`, then stamp
    /// them by how long ago they were taken. Without a time service, trust the clock.
    #[default]
    Auto,
    /// Always trust the clock (a real-time clock, GPS time, a container).
    Trust,
}

/// The full-disk policy of the spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest spooled windows, delivered or not, to make room for new ones.
    #[default]
    DropOldest,
    /// Keep what is spooled and discard new windows until there is room again.
    StopSampling,
}

/// A duration in whole seconds, written like "10s", "1m" or "1h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub NonZeroU32);

impl Seconds {
    /// The number of seconds.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    fn new(seconds: u32) -> Self {
        Seconds(NonZeroU32::new(seconds).unwrap_or(NonZeroU32::MIN))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let d = duration(deserializer)?;
        if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > u64::from(u32::MAX) {
            return Err(de::Error::custom(format!(
                "expected a whole number of seconds of at least 1s, got {}",
                humantime::format_duration(d)
            )));
        }
        Ok(Seconds::new(d.as_secs() as u32))
    }
}

/// Deserializes "250ms", "10s", "5m" or "1h 30m".
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|err| {
        de::Error::custom(format!(
            "invalid duration {text:?} ({err}); write it like \"500ms\", \"10s\", \"5m\" or \"1h\""
        ))
    })
}

fn default_spool() -> PathBuf {
    PathBuf::from("/var/lib/edgespool/spool.db")
}
fn default_window() -> Seconds {
    Seconds::new(60)
}
fn default_partition() -> Seconds {
    Seconds::new(3600)
}
fn default_grace() -> Duration {
    Duration::from_secs(60)
}
fn default_budget() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(256)
}
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
}

impl SourceKind {
    /// The `kind = "…"` word of this source.
    pub fn word(&self) -> &'static str {
        match self {
            SourceKind::System(_) => "system",
            SourceKind::Sysfs(_) => "sysfs",
            SourceKind::Http(_) => "http",
            SourceKind::Mqtt(_) => "mqtt",
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
    /// Largest payload taken; longer ones are counted invalid (default 256 KiB).
    #[serde(default = "default_max_payload")]
    pub max_payload: bytesize::ByteSize,
    /// What to subscribe to.
    pub subscriptions: Vec<MqttSubscription>,
}

/// The connection keys an MQTT source and an MQTT sink share.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConnection {
    /// The broker: `mqtt://host[:1883]` or `mqtts://host[:8883]`.
    pub url: String,
    /// Client id (default `edgespool-{name}` for a source, `edgespool-{device}-{name}`
    /// for a sink); the broker keeps the session under it.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (secret).
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<SecretFile>,
    /// CA certificates (PEM) for `mqtts://`; default: the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Keep-alive (default 30s).
    #[serde(default = "default_keep_alive", deserialize_with = "duration")]
    pub keep_alive: Duration,
    /// Start a new session at every connection (default false: the broker keeps the
    /// session while the agent is away: QoS 1 messages queued for a source, messages in
    /// flight from a sink).
    #[serde(default)]
    pub clean_session: bool,
}

fn default_handover() -> Duration {
    Duration::from_millis(100)
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_qos() -> u8 {
    1
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
    /// Parquet compression.
    pub compression: Compression,
    /// Longest wait between two retries.
    pub retry_max: Duration,
    /// Timeout of one request to a remote store.
    pub timeout: Duration,
    /// Objects larger than this go up as multipart uploads, in parts of this size.
    pub part_size: u64,
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
    /// Only for Parquet (default "zstd").
    #[serde(default)]
    compression: Option<Compression>,
    /// Default 5m.
    #[serde(default = "default_retry_max", deserialize_with = "duration")]
    retry_max: Duration,
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
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_part_size() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(8)
}

/// `kind = "local"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalStore {
    /// The folder the object tree is written under (created when missing).
    pub path: PathBuf,
}

/// `kind = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Store {
    /// The bucket.
    pub bucket: String,
    /// The region (default: `AWS_REGION` / `AWS_DEFAULT_REGION`, else "us-east-1").
    #[serde(default)]
    pub region: Option<String>,
    /// The endpoint of an S3-compatible store (`https://…`, or `http://…` for plain HTTP).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `https://endpoint/bucket/key` (true, the default) rather than
    /// `https://bucket.endpoint/key`.
    #[serde(default = "yes")]
    pub path_style: bool,
    /// Access key; without one, the standard AWS environment variables, web identity or
    /// the instance profile are used.
    #[serde(default)]
    pub access_key_id: Option<Secret>,
    #[serde(default)]
    pub access_key_id_file: Option<SecretFile>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    #[serde(default)]
    pub secret_access_key_file: Option<SecretFile>,
    #[serde(default)]
    pub session_token: Option<Secret>,
    #[serde(default)]
    pub session_token_file: Option<SecretFile>,
}

fn yes() -> bool {
    true
}

/// `kind = "gcs"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsStore {
    /// The bucket.
    pub bucket: String,
    /// A service account key (JSON) given inline, usually as `${ENV_VAR}`.
    #[serde(default)]
    pub service_account_key: Option<Secret>,
    /// A service account key file; without either, application default credentials
    /// (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's file, the metadata server) are used.
    #[serde(default)]
    pub service_account_key_file: Option<SecretFile>,
}

/// `kind = "azure"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureStore {
    /// The storage account.
    pub account: String,
    /// The container.
    pub container: String,
    /// The account's access key.
    #[serde(default)]
    pub access_key: Option<Secret>,
    #[serde(default)]
    pub access_key_file: Option<SecretFile>,
    /// A shared access signature (the query string, without `?`).
    #[serde(default)]
    pub sas_token: Option<Secret>,
    #[serde(default)]
    pub sas_token_file: Option<SecretFile>,
    /// A service principal: client id, secret and tenant. Without any credential, the
    /// `AZURE_*` environment variables or the managed identity are used.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<Secret>,
    #[serde(default)]
    pub client_secret_file: Option<SecretFile>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// The blob endpoint, for Azurite or a sovereign cloud (`http://…` for plain HTTP).
    #[serde(default)]
    pub endpoint: Option<String>,
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
}

fn default_pg_schema() -> String {
    "public".to_owned()
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

/// One secret given inline (`key`) or as a file (`key_file`), not both.
pub fn one_secret<'a>(
    key: &str,
    inline: &'a Option<Secret>,
    file: &'a Option<SecretFile>,
) -> Result<Option<&'a Secret>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("give `{key}` or `{key}_file`, not both")),
        (Some(s), None) => Ok(Some(s)),
        (None, Some(f)) => Ok(Some(&f.secret)),
        (None, None) => Ok(None),
    }
}

/// Output file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per line (`.ndjson`).
    Ndjson,
    /// JSON Text Sequences, RFC 7464 (`.json-seq`).
    JsonSeq,
    /// Comma-separated values with a header line (`.csv`).
    Csv,
    /// Apache Parquet (`.parquet`).
    Parquet,
}

impl Format {
    /// The `format = "…"` word.
    pub fn word(self) -> &'static str {
        match self {
            Format::Ndjson => "ndjson",
            Format::JsonSeq => "json_seq",
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        }
    }
}

/// How rows are laid out in a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// One row per series and window.
    #[default]
    Long,
    /// One row per window, columns `{stat}_{series}`.
    Wide,
}

/// Parquet compression codecs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Zstandard (level 3).
    #[default]
    Zstd,
    /// Snappy.
    Snappy,
    /// No compression.
    None,
}

/// A secret string, given literally or as `${ENV_VAR}`; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        expand_env(&text, |name| std::env::var(name).ok())
            .map(Secret)
            .map_err(de::Error::custom)
    }
}

/// Replaces every `${NAME}` by the variable's value; `$${` stands for a literal `${`.
fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| "unterminated ${ in value".to_owned())?;
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("invalid environment variable name {name:?}"));
            }
            let value =
                lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A secret read from a file when the configuration is loaded (trailing newline removed).
#[derive(Clone)]
pub struct SecretFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// What it holds.
    pub secret: Secret,
}

impl fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret from {}>", self.path.display())
    }
}

impl<'de> Deserialize<'de> for SecretFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = PathBuf::deserialize(deserializer)?;
        let text = std::fs::read_to_string(&path).map_err(|err| {
            de::Error::custom(format!("cannot read secret file {}: {err}", path.display()))
        })?;
        let secret = Secret(text.trim_end_matches(['\n', '\r']).to_owned());
        Ok(SecretFile { path, secret })
    }
}

/// The `[agent]` part of the file as written (sources and sinks are read one by one).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Root {
    agent: Option<AgentConfig>,
}

/// What `kind` a `[[sources]]` or `[[sinks]]` table says.
#[derive(Deserialize)]
struct KindOnly<'a> {
    #[serde(borrow)]
    kind: Option<Spanned<std::borrow::Cow<'a, str>>>,
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_column(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let from_toml = |err: toml::de::Error| at(err.span(), err.message().to_owned());

        let mut root = DeTable::parse(text).map_err(from_toml)?.into_inner();
        let sources = take_array(&mut root, "sources").map_err(|(span, msg)| at(span, msg))?;
        let sinks = take_array(&mut root, "sinks").map_err(|(span, msg)| at(span, msg))?;
        let agent = Root::deserialize(toml::de::Deserializer::from(Spanned::new(
            0..text.len(),
            root,
        )))
        .map_err(from_toml)?
        .agent
        .ok_or_else(|| at(None, "missing [agent] table".to_owned()))?;

        let mut config = Config {
            agent,
            sources: Vec::new(),
            sinks: Vec::new(),
        };
        let mut names: BTreeMap<String, ()> = BTreeMap::new();
        for table in sources {
            let span = table.span();
            let source = parse_source(table).map_err(|(span, msg)| at(span, msg))?;
            if names.insert(source.name.clone(), ()).is_some() {
                return Err(at(
                    Some(span),
                    format!(
                        "two sources are named {:?}; give each its own name",
                        source.name
                    ),
                ));
            }
            validate_source(&source).map_err(|msg| at(Some(span.clone()), msg))?;
            config.sources.push(source);
        }
        names.clear();
        for table in sinks {
            let span = table.span();
            let sink = parse_sink(table).map_err(|(span, msg)| at(span, msg))?;
            if names.insert(sink.name.clone(), ()).is_some() {
                return Err(at(
                    Some(span),
                    format!(
                        "two sinks are named {:?}; give each its own name",
                        sink.name
                    ),
                ));
            }
            validate_sink(&sink).map_err(|msg| at(Some(span.clone()), msg))?;
            config.sinks.push(sink);
        }
        config
            .validate()
            .map_err(|msg| at(key_span(text, "[agent]"), msg))?;
        Ok(config)
    }

    /// The device id, or this machine's host name when none is configured.
    pub fn device_id(&self) -> String {
        self.agent.device_id.clone().unwrap_or_else(host_name)
    }

    /// Checks what the types alone cannot.
    fn validate(&self) -> Result<(), String> {
        let agent = &self.agent;
        if let Some(id) = &agent.device_id {
            valid_key_part(id).map_err(|why| format!("agent.device_id {id:?} {why}"))?;
        }
        let (window, partition) = (agent.window.get(), agent.partition.get());
        if partition % window != 0 {
            return Err(format!(
                "agent.partition ({partition}s) must be a whole multiple of agent.window ({window}s)"
            ));
        }
        if partition % 60 != 0 {
            return Err(format!(
                "agent.partition ({partition}s) must be a whole number of minutes: object keys name partitions to the minute"
            ));
        }
        if 86_400 % partition != 0 {
            return Err(format!(
                "agent.partition ({partition}s) must divide a day evenly (e.g. 1m, 10m, 1h, 6h, 24h)"
            ));
        }
        if agent.disk_budget.as_u64() < 1024 * 1024 {
            return Err(format!(
                "agent.disk_budget ({}) must be at least 1 MiB",
                agent.disk_budget
            ));
        }
        if self.sources.is_empty() {
            return Err("no [[sources]]: add at least one, e.g. kind = \"system\"".to_owned());
        }
        if self.sinks.is_empty() {
            return Err("no [[sinks]]: add at least one, e.g. kind = \"local\"".to_owned());
        }
        if self.sinks.iter().all(|s| s.kind.is_live()) {
            return Err(
                "an mqtt sink is a live feed that keeps nothing: add a sink that keeps the windows, e.g. kind = \"local\""
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// The checks on one sink that its types cannot make.
fn validate_sink(sink: &SinkConfig) -> Result<(), String> {
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
            one_secret(
                "service_account_key",
                &gcs.service_account_key,
                &gcs.service_account_key_file,
            )?;
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

/// The checks on one source that its types cannot make.
fn validate_source(source: &SourceConfig) -> Result<(), String> {
    let name = &source.name;
    valid_key_part(name).map_err(|why| format!("source name {name:?} {why}"))?;
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
    }
}

/// The checks an MQTT source and an MQTT sink share: `what` is "source" or "sink".
fn validate_broker(
    what: &str,
    name: &str,
    connection: &MqttConnection,
    qos: u8,
) -> Result<(), String> {
    let parsed = reqwest::Url::parse(&connection.url)
        .map_err(|err| format!("{what} {name:?}: invalid url: {err}"))?;
    if !matches!(parsed.scheme(), "mqtt" | "mqtts") || parsed.host_str().is_none() {
        return Err(format!(
            "{what} {name:?}: url must be mqtt://host[:port] or mqtts://host[:port]"
        ));
    }
    if qos > 1 {
        return Err(format!("{what} {name:?}: qos must be 0 or 1"));
    }
    one_secret("password", &connection.password, &connection.password_file)?;
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

fn validate_mqtt(name: &str, mqtt: &MqttSource) -> Result<(), String> {
    validate_broker("source", name, &mqtt.connection, mqtt.qos)?;
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

/// Names that end up in object keys and series names stay plain.
fn valid_key_part(text: &str) -> Result<(), &'static str> {
    let ok = !text.is_empty()
        && text.len() <= 128
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 128 characters of letters, digits, '-', '_' and '.'")
    }
}

type Located = (Option<Range<usize>>, String);

/// Removes `key` from the root table and returns its tables, each with its span.
fn take_array<'i>(root: &mut DeTable<'i>, key: &str) -> Result<Vec<Spanned<DeValue<'i>>>, Located> {
    let Some(value) = root.remove(key) else {
        return Ok(Vec::new());
    };
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => Ok(items.iter().cloned().collect()),
        _ => Err((
            Some(span),
            format!("`{key}` must be an array of tables: write [[{key}]]"),
        )),
    }
}

/// Reads the `kind` of a source or sink table, with its span for errors.
fn kind_of<'i>(table: &Spanned<DeValue<'i>>, what: &str, kinds: &str) -> Result<String, Located> {
    let kind = KindOnly::deserialize(ValueDeserializer::from(table.clone())).map_err(located)?;
    match kind.kind {
        Some(kind) => Ok(kind.into_inner().into_owned()),
        None => Err((
            Some(table.span()),
            format!("this [[{what}]] has no `kind`; expected one of {kinds}"),
        )),
    }
}

fn located(err: toml::de::Error) -> Located {
    (err.span(), err.message().to_owned())
}

/// Deserializes `T` from a table after removing its `kind` key.
fn without_kind<'de, T: Deserialize<'de>>(table: Spanned<DeValue<'de>>) -> Result<T, Located> {
    let span = table.span();
    let mut value = table.into_inner();
    if let DeValue::Table(t) = &mut value {
        t.remove("kind");
    }
    T::deserialize(ValueDeserializer::from(Spanned::new(span, value))).map_err(located)
}

fn parse_source(table: Spanned<DeValue<'_>>) -> Result<SourceConfig, Located> {
    let span = table.span();
    let kind = kind_of(
        &table,
        "sources",
        "\"system\", \"sysfs\", \"http\", \"mqtt\"",
    )?;
    let kind_span = kind_value_span(&table).unwrap_or(span);
    Ok(match kind.as_str() {
        "system" => {
            let s: SystemSource = without_kind(table)?;
            SourceConfig {
                name: s.name.clone().unwrap_or_else(|| "system".to_owned()),
                interval: s.interval,
                timeout: s.timeout,
                kind: SourceKind::System(s),
            }
        }
        "sysfs" => {
            let s: SysfsSource = without_kind(table)?;
            SourceConfig {
                name: s.name.clone(),
                interval: s.interval,
                timeout: s.timeout,
                kind: SourceKind::Sysfs(s),
            }
        }
        "http" => {
            let s: HttpSource = without_kind(table)?;
            SourceConfig {
                name: s.name.clone(),
                interval: s.interval,
                timeout: s.timeout,
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
                kind: SourceKind::Mqtt(Box::new(s)),
            }
        }
        other => {
            return Err((
                Some(kind_span),
                format!(
                    "unknown source kind {other:?}; expected one of \"system\", \"sysfs\", \"http\", \"mqtt\""
                ),
            ));
        }
    })
}

fn parse_sink(table: Spanned<DeValue<'_>>) -> Result<SinkConfig, Located> {
    let span = table.span();
    let kinds = "\"local\", \"s3\", \"gcs\", \"azure\", \"postgres\", \"mqtt\"";
    let kind = kind_of(&table, "sinks", kinds)?;
    let kind_span = kind_value_span(&table).unwrap_or(span.clone());
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
    if common.compression.is_some() && format != Format::Parquet {
        return Err((
            Some(span),
            format!(
                "`compression` applies to format = \"parquet\" only (this sink writes {})",
                format.word()
            ),
        ));
    }
    Ok(SinkConfig {
        name: common.name.unwrap_or_else(|| kind.clone()),
        kind: SinkKind::Object(Box::new(ObjectSink {
            prefix: common.prefix,
            format,
            layout: common.layout,
            compression: common.compression.unwrap_or_default(),
            retry_max: common.retry_max,
            timeout: transfer.timeout,
            part_size: transfer.part_size.as_u64(),
            store,
        })),
    })
}

/// Splits a table's keys among `N` structs by their field names; a key none of them has
/// is an error at that key, listing every key the kind accepts.
fn split_table<'i, const N: usize>(
    table: Spanned<DeValue<'i>>,
    groups: [&[&str]; N],
    what: &str,
    kind: &str,
) -> Result<[Spanned<DeValue<'i>>; N], Located> {
    let span = table.span();
    let mut out: [DeTable<'i>; N] = std::array::from_fn(|_| DeTable::new());
    if let DeValue::Table(entries) = table.into_inner() {
        for (key, value) in entries {
            let name: &str = key.get_ref();
            if name == "kind" {
                continue;
            }
            match groups.iter().position(|g| g.contains(&name)) {
                Some(i) => {
                    out[i].insert(key, value);
                }
                None => {
                    let mut known: Vec<&str> =
                        groups.iter().flat_map(|g| g.iter().copied()).collect();
                    known.sort_unstable();
                    let known: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
                    return Err((
                        Some(key.span()),
                        format!(
                            "unknown key `{name}` for a {what} of kind {kind:?}; expected one of {}",
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    Ok(out.map(|t| Spanned::new(span.clone(), DeValue::Table(t))))
}

/// The field names a struct's `Deserialize` asks for.
fn field_names<T: de::DeserializeOwned>() -> &'static [&'static str] {
    match T::deserialize(FieldProbe) {
        Err(FieldList(fields)) => fields,
        Ok(_) => &[],
    }
}

/// A deserializer that only learns which fields a struct has.
struct FieldProbe;

#[derive(Debug)]
struct FieldList(&'static [&'static str]);

impl fmt::Display for FieldList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fields {:?}", self.0)
    }
}

impl std::error::Error for FieldList {}

impl de::Error for FieldList {
    fn custom<T: fmt::Display>(_: T) -> Self {
        FieldList(&[])
    }
}

impl<'de> Deserializer<'de> for FieldProbe {
    type Error = FieldList;

    fn deserialize_any<V: de::Visitor<'de>>(self, _: V) -> Result<V::Value, FieldList> {
        Err(FieldList(&[]))
    }

    fn deserialize_struct<V: de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, FieldList> {
        Err(FieldList(fields))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn kind_value_span(table: &Spanned<DeValue<'_>>) -> Option<Range<usize>> {
    match table.get_ref() {
        DeValue::Table(t) => t.get("kind").map(|v| v.span()),
        _ => None,
    }
}

/// The span of the first occurrence of `needle`, to point at a table header.
fn key_span(text: &str, needle: &str) -> Option<Range<usize>> {
    text.find(needle).map(|at| at..at + needle.len())
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// This machine's host name, for the default device id.
pub fn host_name() -> String {
    let name = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "edgespool".to_owned()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[agent]
device_id = "pi-1"
spool = "/tmp/x/spool.db"

[[sources]]
kind = "system"

[[sinks]]
kind = "local"
path = "/tmp/x/out"
"#;

    fn error_of(text: &str) -> String {
        Config::parse(text, Path::new("edgespool.toml"))
            .expect_err("this configuration must be rejected")
            .to_string()
    }

    fn with_sink(sink: &str) -> String {
        MINIMAL.replace("[[sinks]]\nkind = \"local\"\npath = \"/tmp/x/out\"\n", sink)
    }

    #[test]
    fn an_s3_sink_gets_the_lake_defaults() {
        let text = with_sink("[[sinks]]\nkind = \"s3\"\nbucket = \"lake\"\n");
        let config = Config::parse(&text, Path::new("x.toml")).expect("valid");
        let sink = &config.sinks[0];
        assert_eq!(sink.name, "s3");
        let SinkKind::Object(object) = &sink.kind else {
            panic!("an object sink");
        };
        assert_eq!(
            (object.format, object.layout, object.compression),
            (Format::Parquet, Layout::Long, Compression::Zstd)
        );
        assert_eq!(object.part_size, 8 * 1024 * 1024);
        assert_eq!(object.timeout, Duration::from_secs(30));
        let Store::S3(s3) = &object.store else {
            panic!("an s3 store: {object:?}");
        };
        assert!(s3.path_style && s3.endpoint.is_none() && s3.access_key_id.is_none());
    }

    #[test]
    fn an_unknown_sink_key_lists_what_that_kind_accepts() {
        let text = with_sink("[[sinks]]\nkind = \"gcs\"\nbucket = \"b\"\n  endpoint = \"x\"\n");
        assert_eq!(
            error_of(&text),
            "edgespool.toml:12:3: unknown key `endpoint` for a sink of kind \"gcs\"; expected one of \
             `bucket`, `compression`, `format`, `layout`, `name`, `part_size`, `prefix`, `retry_max`, \
             `service_account_key`, `service_account_key_file`, `timeout`"
        );
        let text = with_sink("[[sinks]]\nkind = \"local\"\npath = \"/o\"\ntimeout = \"1s\"\n");
        assert!(
            error_of(&text).starts_with(
                "edgespool.toml:12:1: unknown key `timeout` for a sink of kind \"local\""
            ),
            "a local folder has no request timeout"
        );
    }

    #[test]
    fn sink_settings_that_cannot_work_are_refused() {
        let cases = [
            (
                "kind = \"local\"\npath = \"/o\"\ncompression = \"snappy\"",
                "`compression` applies to format = \"parquet\" only (this sink writes ndjson)",
            ),
            (
                "kind = \"s3\"\nbucket = \"b\"\nendpoint = \"minio:9000\"",
                "sink \"s3\": endpoint \"minio:9000\" must start with https:// or http://",
            ),
            (
                "kind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"a\"",
                "sink \"s3\": give both access_key_id and secret_access_key, or neither (to use the environment or the instance profile)",
            ),
            (
                "kind = \"azure\"\naccount = \"a\"\ncontainer = \"c\"\nclient_id = \"i\"",
                "sink \"azure\": a service principal needs client_id, client_secret and tenant_id",
            ),
            (
                "kind = \"s3\"\nbucket = \"b\"\npart_size = \"1 MiB\"",
                "sink \"s3\": part_size must be at least 5 MiB (the smallest part S3 accepts)",
            ),
        ];
        for (sink, message) in cases {
            let error = error_of(&with_sink(&format!("[[sinks]]\n{sink}\n")));
            assert!(error.ends_with(message), "{error}");
        }
    }

    #[test]
    fn an_mqtt_sink_is_a_live_feed_and_is_checked() {
        let local = "[[sinks]]\nkind = \"local\"\npath = \"/tmp/x/out\"\n";
        let feed = "[[sinks]]\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"\n";
        let config = Config::parse(&with_sink(&format!("{local}{feed}")), Path::new("x.toml"))
            .expect("valid");
        let SinkKind::Mqtt(mqtt) = &config.sinks[1].kind else {
            panic!("an mqtt sink");
        };
        assert_eq!(config.sinks[1].name, "mqtt");
        assert!(config.sinks[1].kind.is_live() && !config.sinks[0].kind.is_live());
        assert_eq!(
            (mqtt.topic.as_str(), mqtt.availability_topic.as_str()),
            (
                "edgespool/{device}/{series}",
                "edgespool/{device}/availability"
            )
        );
        assert_eq!(
            (mqtt.qos, mqtt.retain, mqtt.max_age.as_secs()),
            (1, false, 600)
        );
        assert!(
            error_of(&with_sink(feed)).ends_with(
                "an mqtt sink is a live feed that keeps nothing: add a sink that keeps the windows, e.g. kind = \"local\""
            )
        );
        let cases = [
            (
                "topic = \"pi/{host}/{series}\"",
                "sink \"mqtt\": topic \"pi/{host}/{series}\": unknown {host}; use {device} or {series}",
            ),
            (
                "availability_topic = \"pi/{series}/up\"",
                "sink \"mqtt\": availability_topic \"pi/{series}/up\": unknown {series}; use {device}",
            ),
            (
                "topic = \"pi/+/{series}\"",
                "sink \"mqtt\": topic \"pi/+/{series}\": a topic to publish to has no wildcards",
            ),
            ("qos = 2", "sink \"mqtt\": qos must be 0 or 1"),
        ];
        for (keys, message) in cases {
            let error = error_of(&with_sink(&format!("{local}{feed}{keys}\n")));
            assert!(error.ends_with(message), "{error}");
        }
        let url = error_of(&with_sink(&format!(
            "{local}[[sinks]]\nkind = \"mqtt\"\nurl = \"tcp://broker\"\n"
        )));
        assert!(
            url.ends_with("sink \"mqtt\": url must be mqtt://host[:port] or mqtts://host[:port]"),
            "{url}"
        );
    }

    #[test]
    fn a_postgres_sink_is_checked() {
        let ok = with_sink("[[sinks]]\nkind = \"postgres\"\nurl = \"postgres://pi@db/sensors\"\n");
        let config = Config::parse(&ok, Path::new("x.toml")).expect("valid");
        let SinkKind::Postgres(pg) = &config.sinks[0].kind else {
            panic!("a postgres sink");
        };
        assert_eq!(
            (pg.schema.as_str(), pg.table.as_str(), pg.sslmode),
            ("public", "edgespool_windows", SslMode::Prefer)
        );
        let cases = [
            (
                "host = \"db\"\ntable = \"Windows\"",
                "table \"Windows\" must be a lower-case SQL name: letters, digits and _, not starting with a digit",
            ),
            ("dbname = \"x\"", "sink \"postgres\": give `url` or `host`"),
            (
                "host = \"db\"\nca_file = \"/ca.pem\"",
                "sink \"postgres\": ca_file is used only with sslmode = \"verify-full\"",
            ),
        ];
        for (keys, message) in cases {
            let error = error_of(&with_sink(&format!(
                "[[sinks]]\nkind = \"postgres\"\n{keys}\n"
            )));
            assert!(error.ends_with(message), "{error}");
        }
        let bad =
            with_sink("[[sinks]]\nkind = \"postgres\"\nhost = \"db\"\nsslmode = \"verify-ca\"\n");
        assert!(
            error_of(&bad).contains("unknown variant `verify-ca`"),
            "{}",
            error_of(&bad)
        );
    }

    #[test]
    fn mqtt_subscriptions_are_checked() {
        let source = |sub: &str| {
            MINIMAL.replace(
                "kind = \"system\"",
                &format!("kind = \"mqtt\"\nname = \"m\"\nurl = \"mqtt://127.0.0.1\"\n[[sources.subscriptions]]\n{sub}"),
            )
        };
        let ok = source(
            "topic = \"tele/+/SENSOR\"\npayload = \"flatten\"\nseries = \"{topic.1}.{field}\"",
        );
        Config::parse(&ok, Path::new("x.toml")).expect("valid");
        let cases = [
            (
                "topic = \"a/#/b\"\npayload = \"number\"",
                "topic filter \"a/#/b\": `+` must be a whole level and `#` the whole last level",
            ),
            (
                "topic = \"a/b+\"\npayload = \"number\"",
                "topic filter \"a/b+\": `+` must be a whole level and `#` the whole last level",
            ),
            (
                "topic = \"a\"\npayload = \"json\"",
                "topic \"a\": payload = \"json\" needs [[sources.subscriptions.fields]]",
            ),
            (
                "topic = \"a\"\npayload = \"number\"\nseries = \"{device}\"",
                "series \"{device}\": unknown {device}; use {topic}, {topic.N} or {field}",
            ),
        ];
        for (sub, message) in cases {
            let error = error_of(&source(sub));
            assert!(error.ends_with(message), "{error}");
        }
        let http = MINIMAL.replace(
            "kind = \"system\"",
            "kind = \"mqtt\"\nname = \"m\"\nurl = \"http://x\"\nsubscriptions = []",
        );
        assert!(error_of(&http).ends_with("url must be mqtt://host[:port] or mqtts://host[:port]"));
    }

    #[test]
    fn a_secret_given_twice_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "k\n").expect("write");
        let sink = format!(
            "[[sinks]]\nkind = \"azure\"\naccount = \"a\"\ncontainer = \"c\"\naccess_key = \"x\"\naccess_key_file = \"{}\"\n",
            file.display()
        );
        assert!(
            error_of(&with_sink(&sink))
                .ends_with("give `access_key` or `access_key_file`, not both")
        );
    }

    #[test]
    fn a_minimal_config_gets_its_defaults() {
        let config = Config::parse(MINIMAL, Path::new("x.toml")).expect("valid");
        assert_eq!(config.agent.window.get(), 60);
        assert_eq!(config.agent.partition.get(), 3600);
        assert_eq!(config.agent.grace, Duration::from_secs(60));
        assert_eq!(config.agent.when_full, WhenFull::DropOldest);
        assert_eq!(config.sources[0].name, "system");
        assert_eq!(config.sources[0].interval, Duration::from_secs(1));
        assert_eq!(config.sinks[0].name, "local");
        assert_eq!(config.device_id(), "pi-1");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let config = Config::parse(EXAMPLE, Path::new("quickstart.toml")).expect("valid");
        assert_eq!(config.agent.window.get(), 10);
        assert_eq!(config.agent.partition.get(), 60);
    }

    #[test]
    fn an_unknown_key_names_file_line_and_column() {
        let text = MINIMAL.replace(
            "kind = \"system\"",
            "kind = \"system\"\n  intreval = \"2s\"",
        );
        assert_eq!(
            error_of(&text),
            "edgespool.toml:8:3: unknown field `intreval`, expected one of `name`, `interval`, `timeout`, `root`"
        );
    }

    #[test]
    fn an_unknown_agent_key_is_located_too() {
        let text = MINIMAL.replace("device_id", "devise_id");
        let err = error_of(&text);
        assert!(
            err.starts_with("edgespool.toml:3:1: unknown field `devise_id`"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_duration_is_explained() {
        let text = MINIMAL.replace("spool =", "window = \"10 parsecs\"\nspool =");
        let err = error_of(&text);
        assert!(
            err.starts_with("edgespool.toml:4:10: invalid duration \"10 parsecs\""),
            "{err}"
        );
    }

    #[test]
    fn a_window_must_be_whole_seconds() {
        let text = MINIMAL.replace("spool =", "window = \"1500ms\"\nspool =");
        assert_eq!(
            error_of(&text),
            "edgespool.toml:4:10: expected a whole number of seconds of at least 1s, got 1s 500ms"
        );
    }

    #[test]
    fn a_partition_must_hold_whole_windows() {
        let text = MINIMAL.replace("spool =", "window = \"7s\"\nspool =");
        assert_eq!(
            error_of(&text),
            "edgespool.toml:2:1: agent.partition (3600s) must be a whole multiple of agent.window (7s)"
        );
    }

    #[test]
    fn a_partition_is_a_whole_number_of_minutes() {
        let text = MINIMAL.replace("spool =", "window = \"10s\"\npartition = \"30s\"\nspool =");
        assert_eq!(
            error_of(&text),
            "edgespool.toml:2:1: agent.partition (30s) must be a whole number of minutes: object keys name partitions to the minute"
        );
    }

    #[test]
    fn an_unknown_kind_points_at_the_kind() {
        let text = MINIMAL.replace("kind = \"system\"", "kind = \"sistem\"");
        assert_eq!(
            error_of(&text),
            "edgespool.toml:7:8: unknown source kind \"sistem\"; expected one of \"system\", \"sysfs\", \"http\", \"mqtt\""
        );
    }

    #[test]
    fn a_missing_secret_file_is_an_error_naming_it() {
        let text = format!(
            "{MINIMAL}\n[[sources]]\nkind = \"http\"\nname = \"api\"\nurl = \"http://127.0.0.1:1/\"\nheader_files = {{ \"X-API-Key\" = \"/nonexistent/edgespool-key\" }}\n[[sources.fields]]\nname = \"a\"\npointer = \"/a\"\n"
        );
        let err = error_of(&text);
        assert!(
            err.starts_with(
                "edgespool.toml:17:32: cannot read secret file /nonexistent/edgespool-key: No such file"
            ),
            "{err}"
        );
    }

    #[test]
    fn secrets_expand_from_the_environment_and_never_print() {
        let lookup = |name: &str| (name == "API_KEY").then(|| "s3cr3t".to_owned());
        assert_eq!(
            expand_env("Bearer ${API_KEY}", lookup).as_deref(),
            Ok("Bearer s3cr3t")
        );
        assert_eq!(
            expand_env("cost $5 $${X}", lookup).as_deref(),
            Ok("cost $5 ${X}")
        );
        assert_eq!(
            expand_env("${MISSING}", lookup),
            Err("environment variable MISSING is not set".to_owned())
        );
        assert_eq!(format!("{:?}", Secret("s3cr3t".into())), "<secret>");
    }

    #[test]
    fn a_broken_toml_file_is_located() {
        let err = error_of("[agent\ndevice_id = 1");
        assert!(err.starts_with("edgespool.toml:1:"), "{err}");
    }

    #[test]
    fn two_sources_may_not_share_a_name() {
        let text = format!("{MINIMAL}\n[[sources]]\nkind = \"system\"\n");
        assert_eq!(
            error_of(&text),
            "edgespool.toml:13:1: two sources are named \"system\"; give each its own name"
        );
    }
}
