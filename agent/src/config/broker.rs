//! The MQTT connection keys an MQTT source and an MQTT sink share, and their checks.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::durations::duration;
use super::secret::{Secret, SecretFile, one_secret};

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

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn default_qos() -> u8 {
    1
}

/// The checks an MQTT source and an MQTT sink share: `what` is "source" or "sink".
pub(super) fn validate_broker(
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
    let keep_alive = connection.keep_alive.as_secs_f64();
    if !(5.0..=65535.0).contains(&keep_alive) {
        return Err(format!(
            "{what} {name:?}: keep_alive must be between 5s and 65535s"
        ));
    }
    one_secret("password", &connection.password, &connection.password_file)?;
    Ok(())
}
