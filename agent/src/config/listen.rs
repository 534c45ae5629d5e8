//! `kind = "listen"`: the settings of the HTTP server that devices push samples to
//! (InfluxDB line protocol, JSON), and their checks.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use super::durations::duration;
use super::secret::{Secret, SecretFile, one_secret};
use super::source::{JsonField, Repeats};

/// Where a listen source serves by default: loopback only, InfluxDB's port.
pub const DEFAULT_LISTEN_ADDRESS: &str = "127.0.0.1:8086";

/// `kind = "listen"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSource {
    /// Source name (required): the first part of every series name.
    pub name: String,
    /// The address and port served (default "127.0.0.1:8086", loopback only); another
    /// address must be written here, and then needs a `token`.
    #[serde(default = "default_address")]
    pub address: String,
    /// The token writers must send (`Authorization: Token …` or `Bearer …`, or
    /// InfluxDB 1's password); `${ENV_VAR}` allowed. Without it, writers need none.
    #[serde(default)]
    pub token: Option<Secret>,
    /// The token read from a file (systemd credentials), instead of `token`.
    #[serde(default)]
    pub token_file: Option<SecretFile>,
    /// Largest request body taken, after gzip decompression too (default 10 MiB):
    /// a larger one is answered 413 and nothing of it is taken.
    #[serde(default = "default_max_body")]
    pub max_body: bytesize::ByteSize,
    /// Most lines (line protocol) or samples (NDJSON) of one request (default 100000):
    /// more is answered 413 and nothing of it is taken.
    #[serde(default = "default_max_lines")]
    pub max_lines: NonZeroU32,
    /// How long a request may take to send its body, and to wait for the aggregator
    /// when it is busy before being answered 503 (default 10s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Most series this source makes (default 1000): samples of further series are
    /// dropped and counted in `series_dropped`.
    #[serde(default = "super::source::default_max_series")]
    pub max_series: NonZeroU32,
    /// What a device-stamped sample repeating a reading already taken is (default
    /// "drop"; "keep" for writers that send several values per millisecond).
    #[serde(default)]
    pub repeats: Repeats,
    /// Boolean fields of line protocol as 1 and 0 (default true); false skips them.
    #[serde(default = "default_true")]
    pub booleans: bool,
    /// For `POST /samples` (JSON or NDJSON): the fields, by JSON pointer.
    #[serde(default)]
    pub fields: Vec<JsonField>,
    /// For `POST /samples`: JSON pointer to each sample's own time (RFC 3339, or epoch
    /// seconds, ms, µs or ns); without it, the time the request arrived.
    #[serde(default)]
    pub timestamp: Option<String>,
}

impl ListenSource {
    /// The token writers must send, if one is configured.
    pub fn token(&self) -> Option<&Secret> {
        one_secret("token", &self.token, &self.token_file)
            .ok()
            .flatten()
    }
}

fn default_address() -> String {
    DEFAULT_LISTEN_ADDRESS.to_owned()
}
fn default_max_body() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(10)
}
fn default_max_lines() -> NonZeroU32 {
    NonZeroU32::new(100_000).unwrap_or(NonZeroU32::MIN)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_true() -> bool {
    true
}

/// The address a listen source serves, or why it cannot be served.
pub fn listen_address(listen: &ListenSource) -> Result<SocketAddr, String> {
    listen.address.parse::<SocketAddr>().map_err(|_| {
        format!(
            "address {:?} is not an IP address and port, e.g. \"127.0.0.1:8086\" or \"0.0.0.0:8086\"",
            listen.address
        )
    })
}

/// The checks of a listen source that its types cannot make; the message, and whether
/// it is about the `address` (else the table).
pub(super) fn validate_listen(name: &str, listen: &ListenSource) -> Result<(), (bool, String)> {
    let token = one_secret("token", &listen.token, &listen.token_file)
        .map_err(|why| (false, format!("source {name:?}: {why}")))?;
    if token.is_some_and(|t| t.expose().is_empty()) {
        return Err((false, format!("source {name:?}: the token is empty")));
    }
    let address =
        listen_address(listen).map_err(|why| (true, format!("source {name:?}: {why}")))?;
    if !address.ip().is_loopback() && token.is_none() {
        return Err((
            true,
            format!(
                "source {name:?}: address {address} is reachable from other machines: give a `token` (or `token_file`) that writers must send"
            ),
        ));
    }
    if listen.timeout.is_zero() || listen.max_body.as_u64() == 0 {
        return Err((
            false,
            format!("source {name:?}: timeout and max_body must be above zero"),
        ));
    }
    let pointers = listen
        .fields
        .iter()
        .map(|f| &f.pointer)
        .chain(&listen.timestamp);
    for pointer in pointers {
        if !(pointer.is_empty() || pointer.starts_with('/')) {
            return Err((
                false,
                format!(
                    "source {name:?}: JSON pointer {pointer:?} must be empty or start with '/'"
                ),
            ));
        }
    }
    Ok(())
}
