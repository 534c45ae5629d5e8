//! The MQTT connection settings the source and the sink share.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, Transport};

use crate::config::{self, Secret, SecretFile};

/// Where and how to connect to a broker.
pub struct Broker<'a> {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]`.
    pub url: &'a str,
    /// The client id.
    pub client_id: String,
    /// User name and password (or the file holding it).
    pub username: Option<&'a str>,
    pub password: &'a Option<Secret>,
    pub password_file: &'a Option<SecretFile>,
    /// CA certificates for `mqtts://`; default: the system's.
    pub ca_file: Option<&'a Path>,
    pub keep_alive: Duration,
    pub clean_session: bool,
}

impl Broker<'_> {
    /// rumqttc's options for this broker; the error text never holds a secret.
    pub fn options(&self) -> Result<MqttOptions, String> {
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
