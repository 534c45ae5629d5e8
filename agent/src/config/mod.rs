//! The one TOML file that configures the agent: `[agent]`, `[[sources]]` and `[[sinks]]`.
//!
//! Every error names the file, the line and the column of the key or value at fault.
//! Secrets (HTTP headers and query values) may be written as `${ENV_VAR}` or read from
//! a file named by a `*_files` table (for systemd's `LoadCredential=`); they are resolved
//! here, once, and only ever printed as `<secret>`.
//!
//! The files: `agent.rs` the `[agent]` table, `source.rs` the `[[sources]]`, `sink.rs` the
//! `[[sinks]]`, `store.rs` each object store's keys and the file formats, `broker.rs` the MQTT connection both share, `secret.rs` secrets,
//! `durations.rs` durations, `located.rs` errors and their positions, `tables.rs` the
//! splitting of `[[sources]]` and `[[sinks]]` tables.

mod agent;
mod broker;
mod durations;
mod located;
mod secret;
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
pub use self::located::ConfigError;
pub use self::secret::{Secret, SecretFile, one_secret};
pub use self::sink::{MqttSink, ObjectSink, PostgresSink, SinkConfig, SinkKind, SslMode, Store};
pub use self::source::{
    FileFormat, HttpSource, JsonField, MqttSource, MqttSubscription, Payload, Redirects,
    SourceConfig, SourceKind, SysfsFile, SysfsSource, SystemSource, TableConfig,
};
pub use self::store::{AzureStore, Compression, Format, GcsStore, Layout, LocalStore, S3Store};

use self::located::{key_span, line_column};
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
mod tests;
