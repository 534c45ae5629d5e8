//! The listen source: an HTTP server that devices push samples to.
//!
//! - `POST /api/v2/write` (InfluxDB 2) and `POST /write` (InfluxDB 1) take line
//!   protocol ([`super::line_protocol`]), plain or gzip, so Telegraf's influxdb outputs,
//!   ESPHome, Tasmota and the InfluxDB client libraries write here unchanged; the series
//!   is `{source}.{measurement}.{field}`, the tags its tags. `POST /samples` takes a JSON
//!   object, an array of them or NDJSON, fields by pointer as the http source reads them.
//!   `GET /ping`, `GET /health` and `POST /query` answer as InfluxDB would, for writers
//!   that check the server first or create their database.
//! - Nothing accepted is lost: a request is answered 204 only once its samples are in
//!   the aggregator's channel; when the channel stays full for `timeout`, it is answered
//!   503 with `Retry-After` and nothing of it is taken, so the writer sends it again.
//! - A bad line does not spoil the others: the good lines of a request are taken, and
//!   the answer (400) names the first bad line, why it is bad and how many were taken.
//!   A request with a wrong or missing token (401), a body over `max_body` before or
//!   after decompression (413) or more than `max_lines` lines (413) is refused whole.
//! - Every refusal and bad line is counted in `status` (`errors`, `invalid`) and logged
//!   at most a few times a minute ([`super::report`]); the token never is.
//! - Each connection is a task; a request is parsed in one go, without awaiting, with
//!   the source's series names locked (so connections share one `max_series`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::http::{event_time, number};
use super::line_protocol::{FieldValue, Point, Precision, is_blank, parse_line};
use super::report::{Kind, Line, Reports};
use super::{Batch, EARLIEST_MS, REPORT_PERIOD, SourceError, log};
use crate::clock;
use crate::config::{JsonField, ListenSource, Repeats, listen_address};
use crate::flow::{Sampled, Series, SourceStats, Stamp};

/// How long a writer is asked to wait before sending again when the aggregator is busy.
const RETRY_AFTER_SECONDS: &str = "5";

/// The server of one listen source, bound and ready to run.
pub struct ListenServer {
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

/// What every connection of the source uses.
struct Shared {
    name: String,
    token: Option<String>,
    max_body: usize,
    max_lines: usize,
    timeout: Duration,
    booleans: bool,
    keep_repeats: bool,
    /// `POST /samples`: the fields and their series, and the timestamp pointer.
    json_fields: Vec<(JsonField, Arc<Series>)>,
    timestamp: Option<String>,
    names: Mutex<Names>,
    reports: Mutex<Reports>,
    stats: Arc<SourceStats>,
    samples: mpsc::Sender<Sampled>,
    stopping: watch::Receiver<bool>,
}

impl ListenServer {
    /// Binds the source's address; must be called inside the runtime.
    pub fn bind(
        name: &str,
        config: &ListenSource,
        stats: Arc<SourceStats>,
        samples: mpsc::Sender<Sampled>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<ListenServer, SourceError> {
        let parse = |reason: String| SourceError::Parse { reason };
        let address = listen_address(config).map_err(parse)?;
        let listener = std::net::TcpListener::bind(address)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|err| parse(format!("cannot listen on {address}: {err}")))?;
        let shared = Shared::new(name, config, stats, samples, shutdown.clone());
        Ok(ListenServer {
            listener,
            shared: Arc::new(shared),
            shutdown,
        })
    }

    /// The address served (with the port the system chose for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until shutdown; requests under way are answered first.
    pub async fn run(mut self) {
        if let Some(address) = self.local_addr() {
            info!(source = %self.shared.name, %address, "listening for line protocol and JSON");
        }
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let shared = Arc::clone(&self.shared);
                        connections.spawn(serve(stream, peer, shared, self.shutdown.clone()));
                    }
                    Err(err) => {
                        // Out of file descriptors, typically: wait, do not spin.
                        warn!(source = %self.shared.name, error = %err, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = self.shutdown.changed() => break,
            }
        }
        drop(self.listener);
        while connections.join_next().await.is_some() {}
    }
}

impl Shared {
    fn new(
        name: &str,
        config: &ListenSource,
        stats: Arc<SourceStats>,
        samples: mpsc::Sender<Sampled>,
        stopping: watch::Receiver<bool>,
    ) -> Shared {
        let json_fields = config
            .fields
            .iter()
            .map(|f| {
                let series = Series::new(format!("{name}.{}", f.name), f.unit.as_deref());
                (f.clone(), series.shared())
            })
            .collect();
        Shared {
            name: name.to_owned(),
            token: config.token().map(|t| t.expose().to_owned()),
            max_body: usize::try_from(config.max_body.as_u64()).unwrap_or(usize::MAX),
            max_lines: config.max_lines.get() as usize,
            timeout: config.timeout,
            booleans: config.booleans,
            keep_repeats: config.repeats == Repeats::Keep,
            json_fields,
            timestamp: config.timestamp.clone(),
            names: Mutex::new(Names {
                source: name.to_owned(),
                by_key: HashMap::new(),
                made: 0,
                max: config.max_series.get(),
            }),
            reports: Mutex::new(Reports::new(REPORT_PERIOD)),
            stats,
            samples,
            stopping,
        }
    }
}

/// Serves one connection until it closes, or until shutdown once its request is answered.
async fn serve(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let timeout = shared.timeout;
    let service = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(shared.handle(req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(timeout, conn).await;
        }
    }
}

/// The endpoints that take samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `/api/v2/write`.
    V2,
    /// `/write`.
    V1,
    /// `/samples`.
    Json,
}

/// A request answered with an error (counted in `errors`) and nothing of it taken.
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

impl Shared {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let endpoint = match (req.method(), path) {
            (&Method::POST, "/api/v2/write") => Endpoint::V2,
            (&Method::POST, "/write") => Endpoint::V1,
            (&Method::POST, "/samples") => Endpoint::Json,
            (&Method::GET | &Method::HEAD, "/ping") => return empty(StatusCode::NO_CONTENT),
            (&Method::GET, "/health") => {
                let body = serde_json::json!({"name": "edgespool", "status": "pass"});
                return json(StatusCode::OK, body.to_string());
            }
            (&Method::GET | &Method::POST, "/query") => {
                if let Err(refusal) = self.authorize(req.headers(), &query(&req), peer) {
                    return self.refuse(Endpoint::V1, refusal);
                }
                // Writers that create their database first (Telegraf's influxdb output).
                let body = serde_json::json!({"results": [{"statement_id": 0}]});
                return json(StatusCode::OK, body.to_string());
            }
            (_, "/api/v2/write" | "/write" | "/samples" | "/query" | "/ping" | "/health") => {
                return error(
                    Endpoint::V2,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed: write with POST",
                );
            }
            _ => {
                return error(
                    Endpoint::V2,
                    StatusCode::NOT_FOUND,
                    "not found: write to /api/v2/write, /write or /samples",
                );
            }
        };
        match self.write(endpoint, req, peer).await {
            Ok(None) => empty(StatusCode::NO_CONTENT),
            Ok(Some(partial)) => error(endpoint, StatusCode::BAD_REQUEST, &partial),
            Err(refusal) => self.refuse(endpoint, refusal),
        }
    }

    /// Takes one write: `Ok(None)` when every line was taken, `Ok(Some(why))` when some
    /// were bad (the good ones are taken).
    async fn write(
        &self,
        endpoint: Endpoint,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Option<String>, Refusal> {
        let received = clock::now_ms();
        let at = Instant::now();
        let query = query(&req);
        self.authorize(req.headers(), &query, peer)?;
        let precision = match query.iter().find(|(k, _)| k == "precision") {
            Some((_, p)) if endpoint != Endpoint::Json => {
                Precision::parse(p).map_err(|why| Refusal::new(StatusCode::BAD_REQUEST, why))?
            }
            _ => Precision::Nanoseconds,
        };
        if endpoint == Endpoint::Json && self.json_fields.is_empty() {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                format!(
                    "source {:?} has no [[sources.fields]]: /samples takes nothing",
                    self.name
                ),
            ));
        }
        let body = self.body(req).await?;
        let text = std::str::from_utf8(&body).map_err(|err| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not UTF-8: {err}"),
            )
        })?;
        let mut batch = Batch {
            now_ms: received,
            ..Batch::default()
        };
        let read = match endpoint {
            Endpoint::Json => self.read_json(text, &mut batch),
            _ => {
                let Ok(mut names) = self.names.lock() else {
                    return Err(Refusal::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "a request task failed",
                    ));
                };
                read_lines(
                    text,
                    precision,
                    self.booleans,
                    self.max_lines,
                    &mut names,
                    &mut batch,
                )
            }
        };
        let read = read.map_err(|_| {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "more than {} lines in one request (max_lines); nothing taken, send smaller batches",
                    self.max_lines
                ),
            )
        })?;
        self.hand_over(&mut batch, received, at).await?;
        // Counted only once taken: a refused request is sent again.
        self.account(&mut batch, &read, at);
        Ok(read.first_bad.as_ref().map(|(line, why)| {
            let more = match read.bad - 1 {
                0 => String::new(),
                1 => " (and 1 more bad line)".to_owned(),
                n => format!(" (and {n} more bad lines)"),
            };
            let taken = match read.taken {
                0 => "no line taken".to_owned(),
                n => format!(
                    "partial write: {n} of {} lines taken",
                    read.taken + read.bad
                ),
            };
            format!("line {line}: {why}{more}; {taken}")
        }))
    }

    /// Checks the token a request offers.
    fn authorize(
        &self,
        headers: &HeaderMap,
        query: &[(String, String)],
        peer: SocketAddr,
    ) -> Result<(), Refusal> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        match offered_token(headers, query) {
            Some(offered) if same(offered.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                format!("request from {} refused: wrong token", peer.ip()),
            )),
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "request from {} refused: no token (send Authorization: Token …)",
                    peer.ip()
                ),
            )),
        }
    }

    /// The body, decompressed, at most `max_body` bytes either way.
    async fn body(&self, req: Request<Incoming>) -> Result<Bytes, Refusal> {
        let max = self.max_body;
        let too_large = |what: &str| {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{what} is over max_body ({max} bytes); nothing taken, send smaller batches"
                ),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(too_large("the body"));
        }
        let encoding = req
            .headers()
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
        let collected =
            tokio::time::timeout(self.timeout, Limited::new(req.into_body(), max).collect()).await;
        let body = match collected {
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the body did not arrive within {}",
                        humantime::format_duration(self.timeout)
                    ),
                ));
            }
            Ok(Err(err)) if err.is::<LengthLimitError>() => return Err(too_large("the body")),
            Ok(Err(err)) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("the body could not be read: {err}"),
                ));
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        match encoding.as_deref() {
            None | Some("identity" | "") => Ok(body),
            Some("gzip" | "x-gzip") => {
                use std::io::Read;
                let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max));
                let decoder = flate2::read::MultiGzDecoder::new(&body[..]);
                decoder
                    .take(max as u64 + 1)
                    .read_to_end(&mut out)
                    .map_err(|err| {
                        Refusal::new(
                            StatusCode::BAD_REQUEST,
                            format!("the gzip body is broken: {err}"),
                        )
                    })?;
                if out.len() > max {
                    return Err(too_large("the decompressed body"));
                }
                Ok(Bytes::from(out))
            }
            Some(other) => Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding {other:?} is not taken; send gzip or plain text"),
            )),
        }
    }

    /// Reads `POST /samples`: one JSON object, an array of them, or one per line.
    fn read_json(&self, text: &str, batch: &mut Batch) -> Result<Read, usize> {
        let mut docs: Vec<(String, Result<Value, String>)> = Vec::new();
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    docs.push((format!("sample {}", i + 1), Ok(item)));
                }
            }
            Ok(doc) => docs.push(("line 1".to_owned(), Ok(doc))),
            Err(_) => {
                for (i, line) in text.split('\n').enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let doc = serde_json::from_str::<Value>(line)
                        .map_err(|err| format!("not JSON ({err})"));
                    docs.push((format!("line {}", i + 1), doc));
                }
            }
        }
        if docs.len() > self.max_lines {
            return Err(docs.len());
        }
        let mut read = Read::default();
        for (place, doc) in docs {
            let doc = match doc {
                Ok(doc @ Value::Object(_)) => doc,
                Ok(_) => {
                    read.bad_line(place, "not a JSON object".to_owned());
                    continue;
                }
                Err(why) => {
                    read.bad_line(place, why);
                    continue;
                }
            };
            read.taken += 1;
            let stamp = match &self.timestamp {
                Some(pointer) => event_time(&doc, pointer, batch.now_ms, batch),
                None => Stamp::Own(batch.now_ms),
            };
            for (field, series) in &self.json_fields {
                match doc.pointer(&field.pointer) {
                    None => batch
                        .invalid
                        .push(format!("{place}: no value at {}", field.pointer)),
                    Some(value) => {
                        let at = format!("{place} {}", field.pointer);
                        if let Some(x) = number(value, &at, batch) {
                            batch.push(series, stamp, x * field.scale + field.offset);
                        }
                    }
                }
            }
        }
        Ok(read)
    }
}

impl Shared {
    /// Hands the samples to the aggregator, waiting up to `timeout` for room in its
    /// channel; they are counted then. A refusal leaves them all out.
    async fn hand_over(
        &self,
        batch: &mut Batch,
        received: i64,
        at: Instant,
    ) -> Result<(), Refusal> {
        if batch.samples.is_empty() {
            return Ok(());
        }
        let busy = |why: &str| Refusal::new(StatusCode::SERVICE_UNAVAILABLE, why);
        if *self.stopping.borrow() {
            return Err(busy("edgespool is stopping; send again later"));
        }
        let permit = match tokio::time::timeout(self.timeout, self.samples.reserve()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(busy("edgespool is stopping; send again later")),
            Err(_) => {
                return Err(busy(
                    "the aggregator is busy; nothing taken, send again later",
                ));
            }
        };
        // Design: the aggregator drains its channel once, when asked to stop; a permit
        // granted by that drain is too late. Checked again after the wait, the send that
        // follows (no await between) is before the aggregator sees the stop (the runtime
        // has one thread), so its drain takes the samples.
        if *self.stopping.borrow() {
            return Err(busy("edgespool is stopping; send again later"));
        }
        self.stats.count_samples(batch.samples.len() as u64);
        permit.send(Sampled {
            samples: std::mem::take(&mut batch.samples),
            now_ms: received,
            at,
            source: Some(Arc::clone(&self.stats)),
            keep_repeats: self.keep_repeats,
        });
        Ok(())
    }

    /// Counts and logs what a taken request met: bad lines, unusable values, series
    /// beyond the cap, nulls.
    fn account(&self, batch: &mut Batch, read: &Read, at: Instant) {
        let stats = &self.stats;
        let now_ms = batch.now_ms;
        stats.count_no_value(batch.nulls, batch.not_finite);
        let Ok(mut reports) = self.reports.lock() else {
            return;
        };
        let mut invalid = std::mem::take(&mut batch.invalid);
        if let Some((line, why)) = &read.first_bad {
            for _ in 1..read.bad {
                stats.count_invalid();
            }
            invalid.push(format!("line {line}: {why}"));
        }
        let last = invalid.len().saturating_sub(1);
        for (i, message) in invalid.into_iter().enumerate() {
            stats.count_invalid();
            if i == last {
                stats.problem(now_ms, message.clone());
            }
            log(&self.name, reports.note(Kind::Invalid, at, 1, message));
        }
        if batch.series_dropped > 0 {
            stats.count_series_dropped(batch.series_dropped);
            if let Some(message) = batch.series_refused.take() {
                stats.problem(now_ms, message.clone());
                let line = reports.note(Kind::SeriesDropped, at, batch.series_dropped, message);
                log(&self.name, line);
            }
        }
        for line in reports.due(at) {
            log(&self.name, Some(line));
        }
    }

    /// Answers a refused request, counting it.
    fn refuse(&self, endpoint: Endpoint, refusal: Refusal) -> Response<Full<Bytes>> {
        let at = Instant::now();
        self.stats.count_error();
        self.stats.problem(clock::now_ms(), refusal.message.clone());
        if let Ok(mut reports) = self.reports.lock()
            && let Some(line) = reports.note(Kind::Failed, at, 1, refusal.message.clone())
        {
            let Line { message, more, .. } = line;
            if more == 0 {
                warn!(source = %self.name, error = %message, "request refused");
            } else {
                warn!(source = %self.name, error = %message, "request refused ({more} more since the last report)");
            }
        }
        let mut response = error(endpoint, refusal.status, &refusal.message);
        if refusal.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        if refusal.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Token realm=\"edgespool\""),
            );
        }
        response
    }
}

/// What a request's lines came to.
#[derive(Debug, Default, PartialEq)]
struct Read {
    /// Lines (or JSON samples) taken.
    taken: u64,
    /// Lines refused as bad.
    bad: u64,
    /// The first of them (its number or place) and why.
    first_bad: Option<(String, String)>,
}

impl Read {
    fn bad_line(&mut self, place: String, why: String) {
        self.bad += 1;
        if self.first_bad.is_none() {
            self.first_bad = Some((place, why));
        }
    }
}

/// A series key's fields and their series.
type Fields = Vec<(Box<str>, Arc<Series>)>;

/// The series a source's line protocol has made: by series key (measurement and tags as
/// written), then field.
///
/// Design: a key's fields in a short vector searched in order, not a table per key (a
/// point has a few fields; an inner table with one entry held about 160 bytes at each of
/// 10,000 keys); the key and field names boxed to their length.
struct Names {
    source: String,
    by_key: HashMap<Box<str>, Fields>,
    made: usize,
    max: u32,
}

impl Names {
    /// The series of one field of a point, made on first use unless `max_series` is reached.
    fn get(&mut self, point: &Point<'_>, field: &str, batch: &mut Batch) -> Option<Arc<Series>> {
        let known = self.by_key.get(point.key).and_then(|fields| {
            fields
                .iter()
                .find(|(f, _)| &**f == field)
                .map(|(_, series)| Arc::clone(series))
        });
        if known.is_some() {
            return known;
        }
        let name = format!("{}.{}.{field}", self.source, point.measurement);
        if self.made >= self.max as usize {
            batch.refuse(self.max, || name);
            return None;
        }
        let mut series = Series::new(name, None);
        for (k, v) in &point.tags {
            series.tags.insert(k.as_ref(), v.as_ref());
        }
        let series = series.shared();
        self.made += 1;
        let fields = self.by_key.entry(point.key.into()).or_default();
        fields.reserve_exact(1);
        fields.push((field.into(), Arc::clone(&series)));
        Some(series)
    }

    /// Bytes the names hold on the heap, the series' own left out.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let entry = size_of::<(Box<str>, Fields)>() + 1;
        self.by_key.capacity() * entry
            + self
                .by_key
                .iter()
                .map(|(key, fields)| {
                    key.len()
                        + fields.capacity() * size_of::<(Box<str>, Arc<Series>)>()
                        + fields.iter().map(|(f, _)| f.len()).sum::<usize>()
                })
                .sum::<usize>()
    }
}

/// Reads a body of line protocol into `batch`: every good line's numeric fields become
/// samples; bad lines are noted in the answer. `Err` with the count when there are more
/// than `max_lines` lines (nothing is taken then).
fn read_lines(
    text: &str,
    precision: Precision,
    booleans: bool,
    max_lines: usize,
    names: &mut Names,
    batch: &mut Batch,
) -> Result<Read, usize> {
    let mut read = Read::default();
    let mut points = 0usize;
    for (index, line) in text.split('\n').enumerate() {
        if is_blank(line) {
            continue;
        }
        points += 1;
        if points > max_lines {
            batch.samples.clear();
            return Err(points);
        }
        let number = index + 1;
        let point = match parse_line(line) {
            Ok(point) => point,
            Err(why) => {
                read.bad_line(number.to_string(), why);
                continue;
            }
        };
        let stamp = match point.timestamp {
            None => Stamp::Own(batch.now_ms),
            Some(t) => match precision.to_ms(t).filter(|&ms| ms >= EARLIEST_MS) {
                Some(ms) => Stamp::Device(ms),
                None => {
                    read.bad_line(
                        number.to_string(),
                        format!("timestamp {t} is out of range for precision {precision:?}"),
                    );
                    continue;
                }
            },
        };
        read.taken += 1;
        for (field, value) in &point.fields {
            let x = match *value {
                FieldValue::Float(x) => x,
                FieldValue::Integer(i) => i as f64,
                FieldValue::Unsigned(u) => u as f64,
                FieldValue::Boolean(b) if booleans => f64::from(u8::from(b)),
                FieldValue::Boolean(_) => continue,
                FieldValue::String => {
                    batch.invalid.push(format!(
                        "line {number}: field {field:?} of {:?} is a string: not recorded",
                        point.measurement
                    ));
                    continue;
                }
            };
            if let Some(series) = names.get(&point, field, batch) {
                batch.push(&series, stamp, x);
            }
        }
    }
    Ok(read)
}

/// Reads a body of line protocol as a request to a source named `fuzz` is read, every
/// series allowed: for the fuzz target ([`crate::fuzzing::line_protocol`]).
#[doc(hidden)]
pub fn read_for_fuzzing(text: &str, precision: &str) -> Batch {
    let mut names = Names {
        source: "fuzz".to_owned(),
        by_key: HashMap::new(),
        made: 0,
        max: u32::MAX,
    };
    let mut batch = Batch::default();
    let precision = Precision::parse(precision).unwrap_or(Precision::Nanoseconds);
    let _ = read_lines(text, precision, true, usize::MAX, &mut names, &mut batch);
    batch
}

/// The query parameters of a request, decoded.
fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    let text = req.uri().query().unwrap_or("");
    form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The token a request offers: `Authorization: Token …` or `Bearer …` (InfluxDB 2),
/// the password of `Basic …` or of the `p` query parameter (InfluxDB 1).
fn offered_token<'a>(
    headers: &'a HeaderMap,
    query: &'a [(String, String)],
) -> Option<Cow<'a, str>> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") {
            return Some(Cow::Borrowed(rest));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let password = text.split_once(':').map_or("", |(_, p)| p).to_owned();
            return Some(Cow::Owned(password));
        }
        return Some(Cow::Borrowed(""));
    }
    query
        .iter()
        .find(|(k, _)| k == "p")
        .map(|(_, p)| Cow::Borrowed(p.as_str()))
}

/// Whether two tokens are equal, in a time that does not depend on where they differ.
fn same(offered: &[u8], expected: &[u8]) -> bool {
    let mut diff = offered.len() ^ expected.len();
    for i in 0..offered.len().max(expected.len()) {
        let a = offered.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
    }
    std::hint::black_box(diff) == 0
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// An error as InfluxDB's clients show it: `{"code": …, "message": …}` (InfluxDB 2) or
/// `{"error": …}` (InfluxDB 1).
fn error(endpoint: Endpoint, status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = match endpoint {
        Endpoint::V1 => serde_json::json!({ "error": message }),
        Endpoint::V2 | Endpoint::Json => {
            let code = match status {
                StatusCode::BAD_REQUEST => "invalid",
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::NOT_FOUND => "not found",
                StatusCode::METHOD_NOT_ALLOWED => "method not allowed",
                StatusCode::PAYLOAD_TOO_LARGE => "request too large",
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type",
                StatusCode::SERVICE_UNAVAILABLE => "unavailable",
                _ => "internal error",
            };
            serde_json::json!({ "code": code, "message": message })
        }
    };
    json(status, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(max: u32) -> Names {
        Names {
            source: "push".to_owned(),
            by_key: HashMap::new(),
            made: 0,
            max,
        }
    }

    fn read(text: &str, precision: &str, names: &mut Names) -> (Read, Batch) {
        let mut batch = Batch {
            now_ms: 5_000,
            ..Batch::default()
        };
        let precision = Precision::parse(precision).expect("a precision");
        let read = read_lines(text, precision, true, 10, names, &mut batch).expect("few lines");
        (read, batch)
    }

    #[test]
    fn lines_make_series_of_measurement_and_field_with_their_tags_and_times() {
        let mut names = names(100);
        let text = "cpu,host=a usage=1.5,n=3i,ok=t,state=\"up\" 1700000000123456789\n\
                    \n# comment\n\
                    cpu,host=b usage=2 1700000000999999999\n\
                    spo2 value=97u\n";
        let (read, batch) = read(text, "ns", &mut names);
        assert_eq!(
            read,
            Read {
                taken: 3,
                bad: 0,
                first_bad: None
            }
        );
        let got: Vec<(String, String, i64, bool, f64)> = batch
            .samples
            .iter()
            .map(|s| {
                let tags = format!("{:?}", s.series.tags);
                (
                    s.series.name.clone(),
                    tags,
                    s.timestamp_ms,
                    s.own_clock,
                    s.value,
                )
            })
            .collect();
        let host = |h: &str| format!("{{\"host\": \"{h}\"}}");
        assert_eq!(
            got,
            vec![
                (
                    "push.cpu.usage".into(),
                    host("a"),
                    1_700_000_000_123,
                    false,
                    1.5
                ),
                (
                    "push.cpu.n".into(),
                    host("a"),
                    1_700_000_000_123,
                    false,
                    3.0
                ),
                (
                    "push.cpu.ok".into(),
                    host("a"),
                    1_700_000_000_123,
                    false,
                    1.0
                ),
                (
                    "push.cpu.usage".into(),
                    host("b"),
                    1_700_000_000_999,
                    false,
                    2.0
                ),
                ("push.spo2.value".into(), "{}".into(), 5_000, true, 97.0),
            ]
        );
        assert_eq!(
            batch.invalid,
            ["line 1: field \"state\" of \"cpu\" is a string: not recorded"]
        );
        // The two hosts' usage are two series of one name; the same line again makes none.
        assert_eq!(names.made, 5);
        let _ = self::read("cpu,host=a usage=7", "ns", &mut names);
        assert_eq!(names.made, 5);
    }

    #[test]
    fn bad_lines_are_numbered_and_the_good_ones_taken() {
        let mut names = names(100);
        let text = "m v=1 1\nm v=oops 2\n\nm 3\nm v=4 4\n";
        let (read, batch) = read(text, "s", &mut names);
        assert_eq!(read.taken, 2);
        assert_eq!(read.bad, 2);
        assert_eq!(
            read.first_bad,
            Some((
                "2".to_owned(),
                "field \"v\": \"oops\" is not a number, boolean or string".to_owned()
            ))
        );
        let times: Vec<i64> = batch.samples.iter().map(|s| s.timestamp_ms).collect();
        assert_eq!(times, [1_000, 4_000]);
        let (read, batch) = self::read("m v=1 9223372036854775807", "s", &mut names);
        assert_eq!(
            read.first_bad.map(|(_, why)| why),
            Some("timestamp 9223372036854775807 is out of range for precision Seconds".into())
        );
        assert!(batch.samples.is_empty());
    }

    #[test]
    fn more_lines_than_max_lines_take_nothing() {
        let mut names = names(100);
        let text = "m v=1\n".repeat(11);
        let mut batch = Batch::default();
        let got = read_lines(
            &text,
            Precision::Nanoseconds,
            true,
            10,
            &mut names,
            &mut batch,
        );
        assert_eq!(got, Err(11));
        assert!(batch.samples.is_empty());
    }

    #[test]
    fn a_tagged_series_costs_its_name_tables_little_beyond_its_strings() {
        // 10,000 series of one tag, as bench-scale.sh pushes them: what the names keep
        // per series (their tables, the series and the one shared copy's slot).
        let mut names = names(20_000);
        let text: String = (0..10_000)
            .map(|i| format!("heap,sensor=h{i:05} value=1 1700000000000\n"))
            .collect();
        let mut batch = Batch::default();
        let (read, held) = crate::heap_tests::held_by(|| {
            read_lines(
                &text,
                Precision::Milliseconds,
                true,
                usize::MAX,
                &mut names,
                &mut batch,
            )
        });
        assert_eq!(read.map(|r| r.taken), Ok(10_000));
        let held = held - (batch.samples.capacity() * size_of::<crate::flow::Sample>()) as isize;
        let per_series = held / 10_000;
        // Before: an inner table per key (about 160 bytes) and a 544-byte tag map node.
        assert!(per_series < 400, "{per_series} bytes per series");
        assert!(
            names.heap_bytes() / 10_000 < 150,
            "{} bytes",
            names.heap_bytes()
        );
        assert_eq!(batch.samples[42].series.tags["sensor"], "h00042");
    }

    #[test]
    fn series_beyond_max_series_are_dropped_and_counted() {
        let mut names = names(2);
        let (_, batch) = read("m,id=1 a=1,b=2,c=3\nm,id=2 a=1", "ns", &mut names);
        assert_eq!(batch.samples.len(), 2);
        assert_eq!(batch.series_dropped, 2);
        assert_eq!(
            batch.series_refused.as_deref(),
            Some("max_series (2) reached: push.m.c and other new series are not made")
        );
    }

    fn listen_config(extra: &str) -> ListenSource {
        let text = format!(
            "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"listen\"\nname = \"push\"\n{extra}\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n"
        );
        let config =
            crate::config::Config::parse(&text, std::path::Path::new("t.toml")).expect("valid");
        let crate::config::SourceKind::Listen(listen) = &config.sources[0].kind else {
            panic!("a listen source");
        };
        (**listen).clone()
    }

    fn sampled(n: usize) -> Batch {
        let series = Arc::new(Series::new("push.m.v", None));
        let mut batch = Batch::default();
        for i in 0..n {
            batch.push(&series, Stamp::Own(i as i64), 1.0);
        }
        batch
    }

    #[tokio::test]
    async fn a_full_aggregator_channel_is_answered_503_and_nothing_is_taken() {
        let config = listen_config("timeout = \"50ms\"");
        let stats = Arc::new(SourceStats::new("push", "listen"));
        let (tx, mut rx) = mpsc::channel(1);
        let (_stop, stopping) = watch::channel(false);
        let shared = Shared::new("push", &config, Arc::clone(&stats), tx, stopping);
        // The first fills the channel; the second finds no room within the timeout.
        shared
            .hand_over(&mut sampled(2), 0, Instant::now())
            .await
            .unwrap_or_else(|r| panic!("room for the first: {}", r.message));
        let mut second = sampled(3);
        let refused = shared
            .hand_over(&mut second, 0, Instant::now())
            .await
            .expect_err("no room for the second");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            refused.message,
            "the aggregator is busy; nothing taken, send again later"
        );
        let response = shared.refuse(Endpoint::V2, refused);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        assert_eq!(second.samples.len(), 3, "the refused samples are not taken");
        let deltas = stats.take_deltas();
        assert_eq!((deltas.samples, deltas.errors), (2, 1));
        // Once the aggregator takes the first, the second goes.
        assert_eq!(rx.recv().await.map(|s| s.samples.len()), Some(2));
        shared
            .hand_over(&mut second, 0, Instant::now())
            .await
            .unwrap_or_else(|r| panic!("room now: {}", r.message));
        assert_eq!(rx.recv().await.map(|s| s.samples.len()), Some(3));
    }

    #[tokio::test]
    async fn a_stopping_agent_takes_no_more() {
        let config = listen_config("");
        let stats = Arc::new(SourceStats::new("push", "listen"));
        let (tx, mut rx) = mpsc::channel(8);
        let (stop, stopping) = watch::channel(false);
        let shared = Shared::new("push", &config, stats, tx, stopping);
        stop.send(true).expect("a receiver");
        let refused = shared
            .hand_over(&mut sampled(1), 0, Instant::now())
            .await
            .expect_err("stopping");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(rx.try_recv().is_err(), "nothing handed over");
    }

    #[tokio::test]
    async fn a_stop_while_waiting_for_room_takes_nothing() {
        let config = listen_config("");
        let stats = Arc::new(SourceStats::new("push", "listen"));
        let (tx, mut rx) = mpsc::channel(1);
        let (stop, stopping) = watch::channel(false);
        let shared = Shared::new("push", &config, stats, tx, stopping);
        shared
            .hand_over(&mut sampled(1), 0, Instant::now())
            .await
            .unwrap_or_else(|r| panic!("room for the first: {}", r.message));
        // The second waits for room; the stop comes, and the aggregator's drain makes room.
        let mut second = sampled(2);
        let waiting = shared.hand_over(&mut second, 0, Instant::now());
        let (handed, drained) = tokio::join!(waiting, async {
            tokio::task::yield_now().await;
            stop.send(true).expect("a receiver");
            rx.recv().await.map(|s| s.samples.len())
        });
        assert_eq!(drained, Some(1));
        let refused = handed.expect_err("too late for the drain");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(rx.try_recv().is_err(), "nothing after the drain");
    }

    #[test]
    fn listen_config_errors_point_at_the_address() {
        let text = "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"listen\"\nname = \"push\"\naddress = \"pi.local:80\"\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n";
        let err = crate::config::Config::parse(text, std::path::Path::new("t.toml"))
            .expect_err("not an IP address");
        assert_eq!(
            err.to_string(),
            "t.toml:6:11: source \"push\": address \"pi.local:80\" is not an IP address and port, e.g. \"127.0.0.1:8086\" or \"0.0.0.0:8086\""
        );
        let text = text.replace(
            "pi.local:80",
            "127.0.0.1:8086\"\ntoken = \"a\"\ntoken_file = \"/dev/null",
        );
        let err =
            crate::config::Config::parse(&text, std::path::Path::new("t.toml")).expect_err("both");
        assert_eq!(
            err.to_string(),
            "t.toml:3:1: source \"push\": give `token` or `token_file`, not both"
        );
    }

    #[test]
    fn tokens_are_taken_from_each_scheme_and_compared_whole() {
        let mut headers = HeaderMap::new();
        let none: [(String, String); 0] = [];
        assert_eq!(offered_token(&headers, &none), None);
        for (value, token) in [
            ("Token s3cret", "s3cret"),
            ("Bearer s3cret", "s3cret"),
            ("Basic dTpzM2NyZXQ=", "s3cret"),
            ("Digest x", ""),
        ] {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(
                offered_token(&headers, &none).as_deref(),
                Some(token),
                "{value}"
            );
        }
        let query = [
            ("u".to_owned(), "me".to_owned()),
            ("p".to_owned(), "pw".to_owned()),
        ];
        assert_eq!(
            offered_token(&HeaderMap::new(), &query).as_deref(),
            Some("pw")
        );
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cre", b"s3cret"));
        assert!(!same(b"s3cret!", b"s3cret"));
        assert!(!same(b"", b"s3cret"));
        assert!(!same(b"s3creT", b"s3cret"));
    }
}
