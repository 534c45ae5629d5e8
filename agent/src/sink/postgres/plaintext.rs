//! Connecting so that the password never crosses the network in the clear.
//!
//! With `sslmode = "prefer"` a server (or whoever answers in its place) may decline TLS
//! and then ask for the password as it is (`password`) or as an MD5 hash that can be
//! replayed and broken offline; tokio-postgres would send either. So the sink opens the
//! TCP stream itself and hands tokio-postgres a [`PasswordGuard`] over it, which reads
//! what the server says while the connection is not encrypted:
//!
//! ```text
//! client                              server          the guard
//! SSLRequest (8 bytes)          ──▶
//!                               ◀──   'S'             TLS follows: stops watching
//!                               ◀──   'N'             plaintext: watches messages
//! StartupMessage                ──▶
//!                               ◀──   'R' len code    code 3 (cleartext) or 5 (MD5):
//!                                                     the read fails, nothing is sent
//!                                                     code 0 (ok): stops watching
//! ```
//!
//! Backend messages are a type byte and a big-endian `int32` length that counts itself
//! but not the type byte. SCRAM (code 10) sends no password and stays allowed.
//! `sslmode = "disable"` does not come here: it says in so many words that plaintext is
//! fine. A Unix socket does not leave the machine and is not guarded.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslNegotiation};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config as PgConfig};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a server asked for the password over an unencrypted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Asked {
    /// `AuthenticationCleartextPassword`.
    Cleartext,
    /// `AuthenticationMD5Password`.
    Md5,
}

/// The refusal a guarded connection fails with.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the server at {server} asked for the password {how} over an unencrypted connection; \
     refused (use TLS, or set sslmode = \"disable\" to allow it)",
    how = match asked { Asked::Cleartext => "in clear text", Asked::Md5 => "as an MD5 hash" }
)]
pub(crate) struct PlaintextRefused {
    /// `host:port` as connected to.
    pub server: String,
    /// How it asked.
    pub asked: Asked,
}

/// What the guard expects next from the server; pure, fed the bytes as they arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Watch {
    /// The one-byte answer to SSLRequest.
    SslAnswer,
    /// A message header (type, length): `have` of its 5 bytes so far.
    Header { bytes: [u8; 5], have: usize },
    /// The code of an authentication request: `have` of its 4 bytes; `rest` bytes of
    /// the message follow it.
    AuthCode {
        bytes: [u8; 4],
        have: usize,
        rest: usize,
    },
    /// The rest of a message, skipped.
    Skip(usize),
    /// Encrypted, or authenticated: nothing more to watch.
    Done,
    /// The password was asked for in the clear.
    Refused(Asked),
}

impl Watch {
    /// Reads `bytes`, the next the server sent; `Some` once it asked for a password in
    /// the clear (and ever after).
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Option<Asked> {
        while !bytes.is_empty() {
            match self {
                Watch::Done => return None,
                Watch::Refused(asked) => return Some(*asked),
                Watch::SslAnswer => {
                    // tokio-postgres takes anything but 'S' as "no TLS" and reads on.
                    *self = if bytes[0] == b'S' {
                        Watch::Done
                    } else {
                        Watch::Header {
                            bytes: [0; 5],
                            have: 0,
                        }
                    };
                    bytes = &bytes[1..];
                }
                Watch::Header {
                    bytes: header,
                    have,
                } => {
                    let take = (5 - *have).min(bytes.len());
                    header[*have..*have + take].copy_from_slice(&bytes[..take]);
                    *have += take;
                    bytes = &bytes[take..];
                    if *have == 5 {
                        let length =
                            u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                        // The length counts its own 4 bytes; a shorter one is garbage
                        // that tokio-postgres will refuse itself.
                        let body = (length as usize).saturating_sub(4);
                        *self = if header[0] == b'R' && body >= 4 {
                            Watch::AuthCode {
                                bytes: [0; 4],
                                have: 0,
                                rest: body - 4,
                            }
                        } else {
                            Watch::Skip(body)
                        };
                    }
                }
                Watch::AuthCode {
                    bytes: code,
                    have,
                    rest,
                } => {
                    let take = (4 - *have).min(bytes.len());
                    code[*have..*have + take].copy_from_slice(&bytes[..take]);
                    *have += take;
                    bytes = &bytes[take..];
                    if *have == 4 {
                        *self = match u32::from_be_bytes(*code) {
                            0 => Watch::Done,
                            3 => Watch::Refused(Asked::Cleartext),
                            5 => Watch::Refused(Asked::Md5),
                            _ => Watch::Skip(*rest),
                        };
                    }
                }
                Watch::Skip(left) => {
                    let take = (*left).min(bytes.len());
                    *left -= take;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        *self = Watch::Header {
                            bytes: [0; 5],
                            have: 0,
                        };
                    }
                }
            }
        }
        match self {
            Watch::Refused(asked) => Some(*asked),
            _ => None,
        }
    }
}

/// A stream to a PostgreSQL server that fails the read carrying a request for the
/// password in the clear, before tokio-postgres sees it, and every write after it.
pub(crate) struct PasswordGuard<S> {
    inner: S,
    watch: Watch,
    server: String,
}

impl<S> PasswordGuard<S> {
    /// Guards `inner`, a connection to `server` on which SSLRequest will be sent first
    /// (`ssl_request`), or on which TLS starts at once.
    pub(crate) fn new(inner: S, server: String, ssl_request: bool) -> PasswordGuard<S> {
        PasswordGuard {
            inner,
            watch: if ssl_request {
                Watch::SslAnswer
            } else {
                Watch::Done
            },
            server,
        }
    }

    fn refused(&self, asked: Asked) -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            PlaintextRefused {
                server: self.server.clone(),
                asked,
            },
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PasswordGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Watch::Refused(asked) = self.watch {
            return Poll::Ready(Err(self.refused(asked)));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        if let Some(asked) = this.watch.feed(&buf.filled()[before..]) {
            // The request does not reach tokio-postgres.
            buf.set_filled(before);
            return Poll::Ready(Err(this.refused(asked)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PasswordGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Watch::Refused(asked) = self.watch {
            return Poll::Ready(Err(self.refused(asked)));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Watch::Refused(asked) = self.watch {
            return Poll::Ready(Err(self.refused(asked)));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The refusal inside an error of tokio-postgres, if that is why it failed.
pub(crate) fn refusal(err: &tokio_postgres::Error) -> Option<&PlaintextRefused> {
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        if let Some(refused) = inner.downcast_ref::<PlaintextRefused>() {
            return Some(refused);
        }
        // io::Error::source skips the error it wraps; get_ref gives it.
        if let Some(wrapped) = inner
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|e| e.downcast_ref::<PlaintextRefused>())
        {
            return Some(wrapped);
        }
        cause = inner.source();
    }
    None
}

/// The TLS side of one connection to `host`, over a guarded `S`.
fn connector<S>(
    tls: &mut MakeRustlsConnect,
    host: &str,
) -> Result<<MakeRustlsConnect as MakeTlsConnect<PasswordGuard<S>>>::TlsConnect, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    MakeTlsConnect::<PasswordGuard<S>>::make_tls_connect(tls, host)
        .map_err(|e| format!("TLS for {host}: {}", crate::with_causes(&e)))
}

/// Connects as `pg` says (its hosts in order, each address of each), with TLS as its
/// `sslmode` asks, through a [`PasswordGuard`]; the connection is spawned. The whole
/// handshake is bounded by the connect timeout. Errors are spelled out, without the
/// password.
pub(crate) async fn connect(pg: &PgConfig, mut tls: MakeRustlsConnect) -> Result<Client, String> {
    let limit = pg
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let ssl_request = pg.get_ssl_negotiation() != SslNegotiation::Direct;
    let hosts = pg.get_hosts();
    let count = hosts.len().max(pg.get_hostaddrs().len());
    let mut last = String::new();
    for i in 0..count {
        let port = pg
            .get_ports()
            .get(i)
            .or(pg.get_ports().first())
            .copied()
            .unwrap_or(5432);
        let host = hosts.get(i);
        #[cfg(unix)]
        if let Some(Host::Unix(dir)) = host {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let attempt = async {
                let stream = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|e| format!("error connecting to server: {e}"))?;
                // PostgreSQL has no TLS on Unix sockets; the password stays on the machine.
                let (client, connection) = pg
                    .connect_raw(stream, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| crate::with_causes(&e))?;
                tokio::spawn(connection);
                Ok::<Client, String>(client)
            };
            match tokio::time::timeout(limit, attempt).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("no answer from {} within {limit:?}", path.display()),
            }
            continue;
        }
        let name = match host {
            Some(Host::Tcp(name)) => Some(name.as_str()),
            _ => None,
        };
        let address = match (pg.get_hostaddrs().get(i), name) {
            (Some(ip), _) => ip.to_string(),
            (None, Some(name)) => name.to_owned(),
            (None, None) => continue,
        };
        let addresses = match tokio::net::lookup_host((address.as_str(), port)).await {
            Ok(found) => found.collect::<Vec<_>>(),
            Err(e) => {
                last = format!("error connecting to server: {address}: {e}");
                continue;
            }
        };
        for addr in addresses {
            let connector = connector::<tokio::net::TcpStream>(&mut tls, name.unwrap_or(&address))?;
            let attempt = async {
                let socket = match addr {
                    std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                    std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
                }
                .and_then(|s| {
                    s.set_keepalive(pg.get_keepalives())?;
                    s.set_nodelay(true)?;
                    Ok(s)
                })
                .map_err(|e| format!("error connecting to server: {e}"))?;
                let stream = socket
                    .connect(addr)
                    .await
                    .map_err(|e| format!("error connecting to server: {e}"))?;
                let guarded = PasswordGuard::new(stream, addr.to_string(), ssl_request);
                let (client, connection) =
                    pg.connect_raw(guarded, connector)
                        .await
                        .map_err(|e| match refusal(&e) {
                            Some(refused) => refused.to_string(),
                            None => crate::with_causes(&e),
                        })?;
                tokio::spawn(connection);
                Ok::<Client, String>(client)
            };
            match tokio::time::timeout(limit, attempt).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("no answer from {addr} within {limit:?}"),
            }
        }
    }
    if last.is_empty() {
        last = "no address to connect to".to_owned();
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend message: type, length, body.
    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        message(b'R', &body)
    }

    /// Feeds `bytes` in pieces of `step` bytes.
    fn fed(bytes: &[u8], step: usize) -> Option<Asked> {
        let mut watch = Watch::SslAnswer;
        let mut seen = None;
        for piece in bytes.chunks(step) {
            seen = seen.or(watch.feed(piece));
        }
        seen
    }

    #[test]
    fn a_password_asked_for_without_tls_is_seen_however_the_bytes_arrive() {
        let notice = message(b'N', b"SNOTICE\0Mhello\0\0");
        for (code, asked) in [(3, Asked::Cleartext), (5, Asked::Md5)] {
            let mut bytes = b"N".to_vec();
            bytes.extend(&notice);
            bytes.extend(auth(code, if code == 5 { b"salt" } else { b"" }));
            for step in [1, 2, 3, 7, bytes.len()] {
                assert_eq!(fed(&bytes, step), Some(asked), "code {code} step {step}");
            }
        }
    }

    #[test]
    fn tls_scram_and_trust_pass() {
        // TLS: whatever follows is encrypted and not read.
        let mut tls = b"S".to_vec();
        tls.extend(auth(3, b""));
        assert_eq!(fed(&tls, 1), None);
        // SCRAM over plaintext: SASL (10), continue (11), final (12), ok (0); then a
        // cleartext request would be nonsense and is no longer watched.
        let mut scram = b"N".to_vec();
        scram.extend(auth(10, b"SCRAM-SHA-256\0\0"));
        scram.extend(auth(11, b"r=abc,s=xyz,i=4096"));
        scram.extend(auth(12, b"v=proof"));
        scram.extend(auth(0, b""));
        scram.extend(message(b'S', b"server_version\x0016\0"));
        scram.extend(auth(3, b""));
        for step in [1, 5, scram.len()] {
            assert_eq!(fed(&scram, step), None, "step {step}");
        }
        let mut trust = b"N".to_vec();
        trust.extend(auth(0, b""));
        assert_eq!(fed(&trust, 4), None);
    }

    #[test]
    fn the_refusal_says_why_and_what_to_set() {
        let refused = PlaintextRefused {
            server: "127.0.0.1:5433".to_owned(),
            asked: Asked::Cleartext,
        };
        assert_eq!(
            refused.to_string(),
            "the server at 127.0.0.1:5433 asked for the password in clear text over an \
             unencrypted connection; refused (use TLS, or set sslmode = \"disable\" to allow it)"
        );
    }

    /// A fake server that declines TLS and asks for the password (`code` 3 or 5); what
    /// the client sent after its startup message comes back once the client gave up.
    async fn declining_server(mut server: tokio::io::DuplexStream, code: u32) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut request = [0; 8];
        server.read_exact(&mut request).await.expect("SSLRequest");
        assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47], "an SSLRequest");
        server.write_all(b"N").await.expect("answer");
        let mut length = [0; 4];
        server
            .read_exact(&mut length)
            .await
            .expect("startup length");
        let mut startup = vec![0; u32::from_be_bytes(length) as usize - 4];
        server.read_exact(&mut startup).await.expect("startup");
        let salt: &[u8] = if code == 5 { b"salt" } else { b"" };
        server
            .write_all(&auth(code, salt))
            .await
            .expect("auth request");
        let mut after = Vec::new();
        let _ = server.read_to_end(&mut after).await;
        after
    }

    #[tokio::test]
    async fn tokio_postgres_never_sends_the_password_through_the_guard() {
        for code in [3, 5] {
            let (client_end, server_end) = tokio::io::duplex(4096);
            let server = tokio::spawn(declining_server(server_end, code));
            let mut pg = PgConfig::new();
            pg.user("pi").password("hunter2-secret").dbname("db");
            pg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
            let mut tls = MakeRustlsConnect::new(
                rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            );
            let connector =
                connector::<tokio::io::DuplexStream>(&mut tls, "localhost").expect("a connector");
            let guarded = PasswordGuard::new(client_end, "127.0.0.1:5433".to_owned(), true);
            let err = match pg.connect_raw(guarded, connector).await {
                Ok(_) => panic!("code {code}: connected"),
                Err(e) => e,
            };
            let refused = refusal(&err).expect("refused by the guard");
            assert_eq!(refused.server, "127.0.0.1:5433");
            let after_startup = server.await.expect("server ran");
            assert_eq!(after_startup, b"", "code {code}: nothing after the startup");
        }
    }
}
