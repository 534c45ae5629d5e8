//! The one TOML file that configures the agent: `[agent]`, `[[sources]]` and `[[sinks]]`.
//!
//! Every error names the file, the line and the column of the key or value at fault.
//! Secrets (HTTP headers and query values) may be written as `${ENV_VAR}` or read from
//! a file named by a `*_files` table (for systemd's `LoadCredential=`); they are resolved
//! here, once, and only ever printed as `<secret>`.
//!
//! The files: `agent.rs` the `[agent]` table, `source.rs` the `[[sources]]`, `sink.rs` the
//! `[[sinks]]`, `serial.rs` the serial source, `store.rs` each object store's keys and the file formats, `broker.rs` the MQTT connection both share, `listen.rs` the `listen` source's server, `secret.rs` secrets,
//! `durations.rs` durations, `located.rs` errors and their positions, `tables.rs` the
//! splitting of `[[sources]]` and `[[sinks]]` tables.

mod agent;
mod broker;
mod durations;
mod features;
mod listen;
mod located;
mod secret;
mod serial;
mod sink;
mod source;
mod store;
mod tables;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

pub use self::agent::{AgentConfig, ClockPolicy, WhenFull};
pub use self::broker::MqttConnection;
pub use self::durations::Seconds;
pub use self::listen::{DEFAULT_LISTEN_ADDRESS, ListenSource, listen_address};
pub use self::located::ConfigError;
pub use self::secret::{Secret, SecretFile, one_secret};
pub use self::serial::{
    FlowControl, LineFormat, Parity, SerialField, SerialSource, SerialTimestamp, format_has_offset,
    parse_utc_offset,
};
pub use self::sink::{
    Deliver, MqttSink, ObjectSink, PostgresSink, SinkConfig, SinkKind, SslMode, Store,
};
pub use self::source::{
    FileFormat, HttpSource, JsonField, MqttSource, MqttSubscription, Payload, Redirects, Repeats,
    SourceConfig, SourceKind, SysfsFile, SysfsSource, SystemSource, TableConfig,
};
pub use self::store::{
    AzureStore, Compression, Format, GcsStore, Keys, Layout, LocalStore, S3Store,
};

use self::agent::{device_id, validate_agent};
use self::located::{byte_line_column, key_span, line_column, read_file, text_of, value_span};
use self::secret::env_error_offset;
use self::sink::{parse_sink, validate_sink};
use self::source::{parse_source, validate_source};
use self::tables::take_array;

/// The commented example shipped with the binary (`edgespool example-config`).
pub const EXAMPLE: &str = include_str!("../../../deploy/quickstart.toml");

/// Where `run`, `status` and `check-config` look when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/edgespool/edgespool.toml";

/// The whole configuration, resolved and validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `[agent]` table.
    pub agent: AgentConfig,
    /// The `[[sources]]`, in file order.
    pub sources: Vec<SourceConfig>,
    /// The `[[sinks]]`, in file order.
    pub sinks: Vec<SinkConfig>,
    /// `agent.device_id`, or the host name it defaults to, checked.
    device: String,
}

/// The `[agent]` part of the file as written (sources and sinks are read one by one).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Root {
    agent: Option<AgentConfig>,
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse_bytes(&read_file(path)?, path)
    }

    /// Parses and validates the bytes of a configuration file, which must be UTF-8 text;
    /// `path` only names it in errors.
    pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Config, ConfigError> {
        let text = text_of(bytes).map_err(|(offset, message)| {
            let (line, column) = byte_line_column(bytes, offset);
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        })?;
        Config::parse(text, path)
    }

    /// Parses and validates configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_as(text, path, host_name)
    }

    /// [`Config::parse`], with `host` giving the host name (tests give their own).
    fn parse_as(
        text: &str,
        path: &Path,
        host: impl FnOnce() -> String,
    ) -> Result<Config, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| {
            let offset = span.map_or(0, |span| {
                let raw = text.get(span.clone()).unwrap_or_default();
                span.start + env_error_offset(raw, &message).unwrap_or(0)
            });
            let (line, column) = line_column(text, offset);
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
        let agent_table = root.get("agent").cloned();
        let agent = Root::deserialize(toml::de::Deserializer::from(Spanned::new(
            0..text.len(),
            root,
        )))
        .map_err(from_toml)?
        .agent
        .ok_or_else(|| at(None, "missing [agent] table".to_owned()))?;
        // An error of the agent table points at the value at fault, or at `[agent]`.
        let agent_at = |key: Option<&str>, message: String| {
            let value = key.and_then(|key| agent_table.as_ref().and_then(|t| value_span(t, key)));
            at(value.or_else(|| key_span(text, "[agent]")), message)
        };
        let device = device_id(&agent, host).map_err(|(key, msg)| agent_at(key, msg))?;
        validate_agent(&agent).map_err(|(key, msg)| agent_at(key, msg))?;

        let mut config = Config {
            agent,
            sources: Vec::new(),
            sinks: Vec::new(),
            device,
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

    /// The device id: `agent.device_id`, or this machine's host name when none is
    /// configured.
    pub fn device_id(&self) -> String {
        self.device.clone()
    }

    /// Checks what the types alone cannot, across the tables.
    fn validate(&self) -> Result<(), String> {
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

/// What a name that ends up in object keys, folder names, series names or `status` must
/// be: the device id and the names of sources and sinks.
const NAME_RULE: &str = "must be 1 to 64 characters: letters, digits, '-', '_' and '.', starting with a letter or digit";

/// Names that end up in object keys and series names stay plain: never `.` or `..` (a
/// folder of its own), never a leading `.` or `_` (files that readers of a data lake,
/// pyarrow or Spark, skip as hidden), never `/` or `#`.
fn valid_key_part(text: &str) -> Result<(), &'static str> {
    let mut chars = text.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && text.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(NAME_RULE) }
}

/// A name as an error quotes it: the first 40 characters of a long one.
fn quoted(name: &str) -> String {
    let count = name.chars().count();
    if count <= 40 {
        format!("{name:?}")
    } else {
        let head: String = name.chars().take(40).collect();
        format!("{head:?}… ({count} characters)")
    }
}

/// This machine's host name, for the default device id, with what a device id may not
/// hold replaced by `_`.
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
mod tests;
