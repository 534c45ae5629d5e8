//! Helpers for the tests of hostile or careless servers (`tests/hostile.rs`): an HTTP
//! server on any loopback address that records what it is sent, and a proxy in front of
//! PostgreSQL ([`crate::PgServer`], whose `set_method` picks what it asks clients for)
//! that records what clients send and can hold their `CREATE TABLE` statements to release them at once.
//!
//! Everything started here is stopped on drop.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How an [`HttpStub`] answers one request.
pub enum Answer {
    /// 302 Found to this `Location`.
    Redirect(String),
    /// 200 with this JSON body.
    Json(String),
}

/// One request an [`HttpStub`] received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Path and query.
    pub url: String,
    /// Every header, names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Received {
    /// The value of header `name` (lower case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP server on `ip`, a free port, answering by path (without the query) and
/// recording every request.
pub struct HttpStub {
    /// `http://IP:PORT`.
    pub base: String,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpStub {
    /// Starts serving; `answer` maps a path to the answer (404 for `None`).
    pub fn start(ip: &str, answer: impl Fn(&str) -> Option<Answer> + Send + 'static) -> HttpStub {
        let server = tiny_http::Server::http(format!("{ip}:0"))
            .unwrap_or_else(|e| panic!("cannot listen on {ip}: {e}"));
        let port = server.server_addr().to_ip().expect("an IP listener").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(50)) else {
                        continue;
                    };
                    let url = request.url().to_owned();
                    let headers = request
                        .headers()
                        .iter()
                        .map(|h| {
                            (
                                h.field.as_str().as_str().to_ascii_lowercase(),
                                h.value.as_str().to_owned(),
                            )
                        })
                        .collect();
                    received.lock().expect("record lock").push(Received {
                        url: url.clone(),
                        headers,
                    });
                    let path = url.split('?').next().unwrap_or_default();
                    let header = |name: &str, value: &str| {
                        tiny_http::Header::from_bytes(name, value).expect("a valid header")
                    };
                    let _ = match answer(path) {
                        Some(Answer::Redirect(to)) => request.respond(
                            tiny_http::Response::empty(302).with_header(header("Location", &to)),
                        ),
                        Some(Answer::Json(body)) => request.respond(
                            tiny_http::Response::from_string(body)
                                .with_header(header("Content-Type", "application/json")),
                        ),
                        None => request.respond(tiny_http::Response::empty(404)),
                    };
                }
            })
        };
        HttpStub {
            base: format!("http://{ip}:{port}"),
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("record lock").clone()
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Holds the first wave of `CREATE TABLE` statements until `wave` of them wait, or
/// `patience` has passed since the first, then lets everything through.
struct Gate {
    wave: usize,
    patience: Duration,
    state: Mutex<(usize, Option<Instant>, bool)>,
    opened: Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut state = self.state.lock().expect("gate lock");
        if state.2 {
            return;
        }
        state.0 += 1;
        let first = *state.1.get_or_insert_with(Instant::now);
        if state.0 >= self.wave {
            state.2 = true;
            self.opened.notify_all();
            return;
        }
        while !state.2 {
            let left = (first + self.patience).saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.2 = true;
                self.opened.notify_all();
                break;
            }
            state = self.opened.wait_timeout(state, left).expect("gate lock").0;
        }
    }

    fn held(&self) -> usize {
        self.state.lock().expect("gate lock").0
    }
}

/// What clients sent through a [`PgTap`].
#[derive(Default)]
struct Sent {
    /// Every byte.
    bytes: Vec<u8>,
    /// The type byte of every message after the startup message.
    kinds: Vec<u8>,
}

/// A proxy on a free loopback port in front of a PostgreSQL server that records every
/// byte clients send and can gate `CREATE TABLE` ([`PgTap::with_gate`]). It reads the
/// client side as the protocol frames it; servers behind it must have TLS off.
pub struct PgTap {
    /// The port to connect to instead of the server's.
    pub port: u16,
    sent: Arc<Mutex<Sent>>,
    gate: Option<Arc<Gate>>,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl PgTap {
    /// A recording proxy to `upstream`.
    pub fn start(upstream: u16) -> PgTap {
        PgTap::start_gated(upstream, None)
    }

    /// A recording proxy that holds simple queries holding `CREATE TABLE` until `wave`
    /// of them wait (or `patience` passed since the first), the first time only: so that
    /// sessions that would create a table at once really do.
    pub fn with_gate(upstream: u16, wave: usize, patience: Duration) -> PgTap {
        PgTap::start_gated(
            upstream,
            Some(Arc::new(Gate {
                wave,
                patience,
                state: Mutex::new((0, None, false)),
                opened: Condvar::new(),
            })),
        )
    }

    fn start_gated(upstream: u16, gate: Option<Arc<Gate>>) -> PgTap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("local addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let sent = Arc::new(Mutex::new(Sent::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (sent, stop, streams, gate) = (
                Arc::clone(&sent),
                Arc::clone(&stop),
                Arc::clone(&streams),
                gate.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let client = match listener.accept() {
                        Ok((client, _)) => client,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(_) => break,
                    };
                    let _ = client.set_nonblocking(false);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                        client.try_clone(),
                        server.try_clone(),
                        client.try_clone(),
                        server.try_clone(),
                    ) else {
                        continue;
                    };
                    streams.lock().expect("streams lock").extend([c3, s3]);
                    let (sent, gate) = (Arc::clone(&sent), gate.clone());
                    std::thread::spawn(move || client_to_server(client, server, &sent, gate));
                    std::thread::spawn(move || {
                        let (mut from, mut to) = (s2, c2);
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            })
        };
        PgTap {
            port,
            sent,
            gate,
            stop,
            streams,
            thread: Some(thread),
        }
    }

    /// Whether clients sent `needle` (anywhere, in any message) so far.
    pub fn saw(&self, needle: &[u8]) -> bool {
        self.sent
            .lock()
            .expect("record lock")
            .bytes
            .windows(needle.len())
            .any(|w| w == needle)
    }

    /// How many messages of type `kind` clients sent (`b'p'`: a password, or a SASL
    /// response).
    pub fn messages(&self, kind: u8) -> usize {
        let sent = self.sent.lock().expect("record lock");
        sent.kinds.iter().filter(|&&k| k == kind).count()
    }

    /// How many `CREATE TABLE` statements the gate held (or counted) in its first wave.
    pub fn held(&self) -> usize {
        self.gate.as_ref().map_or(0, |g| g.held())
    }
}

impl Drop for PgTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for stream in self.streams.lock().expect("streams lock").iter() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Forwards one client's messages, recording them; frames: untyped (length, code, …)
/// until the startup message, then type, length, body.
fn client_to_server(
    mut client: TcpStream,
    mut server: TcpStream,
    sent: &Mutex<Sent>,
    gate: Option<Arc<Gate>>,
) {
    const SSL_REQUEST: u32 = 80_877_103;
    const GSS_REQUEST: u32 = 80_877_104;
    let mut started = false;
    loop {
        let typed = started;
        let mut head = vec![0u8; if typed { 5 } else { 4 }];
        if client.read_exact(&mut head).is_err() {
            break;
        }
        let at = head.len() - 4;
        let length = u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let mut body = vec![0u8; (length as usize).saturating_sub(4)];
        if client.read_exact(&mut body).is_err() {
            break;
        }
        if !typed {
            let code = body
                .get(..4)
                .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            started = code != SSL_REQUEST && code != GSS_REQUEST;
        } else if let Some(gate) = &gate
            && head[0] == b'Q'
            && body.windows(12).any(|w| w == b"CREATE TABLE")
        {
            gate.pass();
        }
        let mut message = head;
        message.extend_from_slice(&body);
        {
            let mut sent = sent.lock().expect("record lock");
            sent.bytes.extend_from_slice(&message);
            if typed {
                sent.kinds.push(message[0]);
            }
        }
        if server.write_all(&message).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}

/// The `postgres` sink `name` to `127.0.0.1:port` as role `edgespool`, the password in
/// `password_file`, plus `extra` keys (no `sslmode`: the default unless `extra` sets one).
pub fn pg_sink_via(port: u16, name: &str, password_file: &Path, extra: &str) -> String {
    format!(
        "[[sinks]]\nkind = \"postgres\"\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         user = \"edgespool\"\ndbname = \"postgres\"\npassword_file = \"{}\"\n\
         connect_timeout = \"2s\"\nretry_max = \"1s\"\n{extra}\n",
        password_file.display()
    )
}
