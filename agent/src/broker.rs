//! The MQTT connection settings the source and the sink share.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, Transport};

use crate::config::{self, MqttConnection, Secret, SecretFile};

/// rumqttc's MQTT 3.1.1 options for a connection (with `default_client_id` when it names none);
/// the error text never holds a secret.
pub fn options(
    connection: &MqttConnection,
    default_client_id: impl FnOnce() -> String,
) -> Result<MqttOptions, String> {
    broker(connection, default_client_id).options()
}

/// rumqttc's MQTT 5 options for a connection (the source's: it announces a Maximum
/// Packet Size); as [`options`] otherwise.
pub fn options_v5(
    connection: &MqttConnection,
    default_client_id: impl FnOnce() -> String,
) -> Result<rumqttc::v5::MqttOptions, String> {
    broker(connection, default_client_id).options_v5()
}

fn broker(connection: &MqttConnection, default_client_id: impl FnOnce() -> String) -> Broker<'_> {
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

/// Where and how to connect, as both protocol versions take it.
struct Endpoint {
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
    transport: Option<Transport>,
}

impl Broker<'_> {
    fn endpoint(&self) -> Result<Endpoint, String> {
        let url = reqwest::Url::parse(self.url).map_err(|e| e.to_string())?;
        let tls = url.scheme() == "mqtts";
        let host = url.host_str().unwrap_or("localhost").to_owned();
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        let credentials = match self.username {
            Some(user) => {
                let password = config::one_secret("password", self.password, self.password_file)?
                    .map(|s| s.expose().to_owned())
                    .unwrap_or_default();
                Some((user.to_owned(), password))
            }
            None => None,
        };
        let transport = if tls {
            let roots = crate::ca_roots(self.ca_file)?;
            let tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
            ))
        } else {
            None
        };
        Ok(Endpoint {
            host,
            port,
            credentials,
            transport,
        })
    }

    fn options(&self) -> Result<MqttOptions, String> {
        let endpoint = self.endpoint()?;
        let mut options = MqttOptions::new(self.client_id.clone(), endpoint.host, endpoint.port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(self.clean_session);
        if let Some((user, password)) = endpoint.credentials {
            options.set_credentials(user, password);
        }
        if let Some(transport) = endpoint.transport {
            options.set_transport(transport);
        }
        Ok(options)
    }

    fn options_v5(&self) -> Result<rumqttc::v5::MqttOptions, String> {
        let endpoint = self.endpoint()?;
        let mut options =
            rumqttc::v5::MqttOptions::new(self.client_id.clone(), endpoint.host, endpoint.port);
        // rumqttc asserts at least 5 s; the configuration checks it too.
        options
            .set_keep_alive(self.keep_alive.max(Duration::from_secs(5)))
            .set_clean_start(self.clean_session);
        // Design: MQTT 5 ends a session with its connection unless it has an expiry; a
        // kept session (clean_session = false) never expires, as in MQTT 3.1.1.
        if !self.clean_session {
            options.set_session_expiry_interval(Some(u32::MAX));
        }
        if let Some((user, password)) = endpoint.credentials {
            options.set_credentials(user, password);
        }
        if let Some(transport) = endpoint.transport {
            options.set_transport(transport);
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
