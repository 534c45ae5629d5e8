//! The MQTT connection settings the source and the sink share.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, Transport};

use crate::config::{self, MqttConnection, Secret, SecretFile};

/// rumqttc's options for a connection (with `default_client_id` when it names none);
/// the error text never holds a secret.
pub fn options(
    connection: &MqttConnection,
    default_client_id: impl FnOnce() -> String,
) -> Result<MqttOptions, String> {
    let client_id = connection
        .client_id
        .clone()
        .unwrap_or_else(default_client_id);
    Broker {
        url: &connection.url,
        client_id,
        username: connection.username.as_deref(),
        password: &connection.password,
        password_file: &connection.password_file,
        ca_file: connection.ca_file.as_deref(),
        keep_alive: connection.keep_alive,
        clean_session: connection.clean_session,
    }
    .options()
}

struct Broker<'a> {
    url: &'a str,
    client_id: String,
    username: Option<&'a str>,
    password: &'a Option<Secret>,
    password_file: &'a Option<SecretFile>,
    ca_file: Option<&'a Path>,
    keep_alive: Duration,
    clean_session: bool,
}

impl Broker<'_> {
    fn options(&self) -> Result<MqttOptions, String> {
        let url = reqwest::Url::parse(self.url).map_err(|e| e.to_string())?;
        let tls = url.scheme() == "mqtts";
        let host = url.host_str().unwrap_or("localhost").to_owned();
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        let mut options = MqttOptions::new(self.client_id.clone(), host, port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(self.clean_session);
        if let Some(user) = self.username {
            let password = config::one_secret("password", self.password, self.password_file)?
                .map(|s| s.expose().to_owned())
                .unwrap_or_default();
            options.set_credentials(user, password);
        }
        if tls {
            let roots = crate::ca_roots(self.ca_file)?;
            let tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
            ));
        }
        Ok(options)
    }
}

/// The wait before reconnection attempt `failures` (from 1): 1 s doubling to 30 s.
pub fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1 << failures.clamp(1, 6))
        .min(Duration::from_secs(30))
}
