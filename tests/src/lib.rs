//! Helpers for the end-to-end tests: run the built `edgespool` binary, serve JSON over
//! HTTP on a free loopback port, read the output tree back, and poll with bounds.
//!
//! Everything started here is stopped on drop, so a failing test leaves nothing behind.

pub mod cloud;
pub mod powercut;
pub mod two_sensors;

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod hostile;

/// The `edgespool` binary: `$EDGESPOOL_BIN`, else the one built beside this test.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EDGESPOOL_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("a test knows its own path");
    // target/<profile>/deps/<test> → target/<profile>/edgespool
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let bin = profile_dir.join("edgespool");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p edgespool), as scripts/test.sh does",
        bin.display()
    );
    bin
}

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Stops a server: `signal`, then at most `grace` to exit, then SIGKILL.
fn stop_child(child: Option<Child>, signal: rustix::process::Signal, grace: Duration) {
    let Some(mut child) = child else {
        return;
    };
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
    let deadline = Instant::now() + grace;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts a server with its output appended to `log` and waits (at most 60 s) until it
/// listens on `port`; `what` names it in a failure.
fn spawn_listening(mut command: Command, log: &Path, port: u16, what: &str) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("the server log opens");
    let child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log clones"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_for(
        &format!("{what} to listen"),
        Duration::from_secs(60),
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    child
}

/// Runs `edgespool ARGS…` to completion.
pub fn edgespool(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the edgespool binary starts")
}

/// Polls `check` every 100 ms until it gives a value or `timeout` passes.
///
/// `None` means "not there yet": `check` must never fail the test for what the agent
/// has not written yet (no spool, no state, a file still being written), so it uses the
/// `try_…` and `find_…` helpers; the assertions after the wait check the value it gave.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running agent; killed on drop if still alive.
pub struct Agent {
    child: Option<Child>,
    /// Its configuration file.
    pub config: PathBuf,
    /// Where its log goes.
    pub log: PathBuf,
}

impl Agent {
    /// Starts `edgespool run --config CONFIG`, appending its log to LOG.
    pub fn start(config: &Path, log: &Path) -> Agent {
        Agent::start_with_env(config, log, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Agent {
        let sink = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("the log file opens");
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(sink.try_clone().expect("log clones"))
            .stderr(sink)
            .spawn()
            .expect("the agent starts");
        Agent {
            child: Some(child),
            config: config.to_owned(),
            log: log.to_owned(),
        }
    }

    /// Its process id (for reading /proc/PID).
    pub fn pid(&self) -> rustix::process::Pid {
        let id = self.child.as_ref().expect("running").id();
        rustix::process::Pid::from_raw(id as i32).expect("a child has a pid")
    }

    /// kill -9: no chance to flush.
    pub fn kill9(mut self) {
        let _ = rustix::process::kill_process(self.pid(), rustix::process::Signal::KILL);
        let mut child = self.child.take().expect("running");
        let _ = child.wait();
    }

    /// SIGTERM, then waits (at most 30 s) for a clean exit.
    pub fn terminate(self) -> ExitStatus {
        self.stop(rustix::process::Signal::TERM)
    }

    /// SIGINT (Ctrl-C), then waits (at most 30 s) for a clean exit.
    pub fn interrupt(self) -> ExitStatus {
        self.stop(rustix::process::Signal::INT)
    }

    fn stop(mut self, signal: rustix::process::Signal) -> ExitStatus {
        let _ = rustix::process::kill_process(self.pid(), signal);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait works") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `status --json` of this agent's spool, once the agent has created it (≤ 10 s).
    /// Not for a `wait_for` poll: there, [`Agent::try_status`].
    pub fn status(&self) -> Value {
        wait_for("a readable spool", Duration::from_secs(10), || {
            self.try_status()
        })
    }

    /// `status --json` of this agent's spool, or `None` while it cannot be read yet (see
    /// [`try_status_json`]); for polls.
    pub fn try_status(&self) -> Option<Value> {
        try_status_json(&self.config)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run_status(config: &Path) -> Output {
    let config = config.to_str().expect("utf-8 path");
    edgespool(&["status", "--config", config, "--json"])
}

/// Waits until every source is drained (`drained`), nothing is pending for any sink and
/// two more flushes have passed since it was drained (before that, windows may still be
/// open in memory, which SIGTERM would commit but not deliver); then stops the agent
/// cleanly.
pub fn settle(agent: Agent, timeout: Duration, mut drained: impl FnMut() -> bool) {
    let mut heartbeats: Vec<Value> = Vec::new();
    wait_for("everything delivered", timeout, || {
        let status = agent.try_status()?;
        if !drained() {
            heartbeats.clear();
            return None;
        }
        let heartbeat = status["daemon"]["heartbeat"].clone();
        if heartbeats.last() != Some(&heartbeat) {
            heartbeats.push(heartbeat);
        }
        let pending: u64 = status["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .map(|s| s["pending_rows"].as_u64().unwrap_or(1))
            .sum();
        let idle = pending == 0 && status["spool"]["rows"] == 0;
        (heartbeats.len() >= 3 && idle).then_some(())
    });
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
}

/// `edgespool status --config CONFIG --json`, parsed; fails the test if status fails.
/// Not for a `wait_for` poll: there, [`try_status_json`].
pub fn status_json(config: &Path) -> Value {
    let out = run_status(config);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// [`status_json`], or `None` while status fails: the agent is still starting (no spool
/// yet, one not created to the end, a corrupt one not moved aside yet). A status that
/// succeeds prints JSON, or the test fails.
pub fn try_status_json(config: &Path) -> Option<Value> {
    let out = run_status(config);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("status --json prints JSON"))
}

fn find_named<'a>(status: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    status[list]
        .as_array()?
        .iter()
        .find(|item| item["name"] == name)
}

/// The source `name` of a `status --json`, or `None` before the agent has written its
/// state (`"daemon": {"state": "never ran"}` lists no source); for polls.
pub fn find_source<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    find_named(status, "sources", name)
}

/// The source `name` of a `status --json`; fails the test if it is not there.
pub fn source_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    find_source(status, name).unwrap_or_else(|| panic!("no source {name} in {status}"))
}

/// The sink `name` of a `status --json`, or `None` before the agent has recorded it;
/// for polls.
pub fn find_sink<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    find_named(status, "sinks", name)
}

/// The sink `name` of a `status --json`; fails the test if it is not there.
pub fn sink_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    find_sink(status, name).unwrap_or_else(|| panic!("no sink {name} in {status}"))
}

/// The live sink `name` of a `status --json`, or `None` before the agent has written its
/// state; for polls.
pub fn find_live_sink<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    find_named(status, "live_sinks", name)
}

/// The live sink `name` of a `status --json`; fails the test if it is not there.
pub fn live_sink_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    find_live_sink(status, name).unwrap_or_else(|| panic!("no live sink {name} in {status}"))
}

/// One output file: its path below the tree's root and its rows.
#[derive(Debug, Clone)]
pub struct OutputFile {
    /// Path relative to the root, with `/`.
    pub key: String,
    /// Its rows, parsed by serde_json.
    pub rows: Vec<Value>,
}

/// Every `.ndjson` file below `root`, sorted by key; other files are reported as keys
/// with no rows so that a stray temporary file shows up in assertions. A local sink
/// writes each file under a staging name (`….ndjson#N`) and renames it when complete:
/// a poll that counts files counts [`ndjson_count`], not every key.
pub fn read_tree(root: &Path) -> Vec<OutputFile> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let key = path
                .strip_prefix(root)
                .expect("below root")
                .to_string_lossy()
                .replace('\\', "/");
            let text = fs::read_to_string(&path).unwrap_or_default();
            let rows = if key.ends_with(".ndjson") {
                text.lines()
                    .map(|line| {
                        serde_json::from_str(line)
                            .unwrap_or_else(|e| panic!("{key}: bad line {line:?}: {e}"))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            files.push(OutputFile { key, rows });
        }
    }
    files.sort_by(|a, b| a.key.cmp(&b.key));
    files
}

/// How many of `files` are finished NDJSON files: one still being written (under its
/// staging name) is not there yet.
pub fn ndjson_count(files: &[OutputFile]) -> usize {
    files.iter().filter(|f| f.key.ends_with(".ndjson")).count()
}

/// A loopback HTTP server that answers each request with the next queued body, and with
/// `after` once the queue is empty.
pub struct JsonServer {
    /// Base URL, `http://127.0.0.1:PORT/`.
    pub url: String,
    queue: Arc<Mutex<VecDeque<String>>>,
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl JsonServer {
    /// Starts serving on a free port.
    pub fn start(bodies: Vec<String>, after: String) -> JsonServer {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("a free loopback port");
        let port = server.server_addr().to_ip().expect("an IP listener").port();
        let queue = Arc::new(Mutex::new(VecDeque::from(bodies)));
        let served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (queue, served, stop) =
                (Arc::clone(&queue), Arc::clone(&served), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(50)) else {
                        continue;
                    };
                    let next = queue.lock().expect("queue lock").pop_front();
                    let body = match next {
                        Some(body) => {
                            served.fetch_add(1, Ordering::SeqCst);
                            body
                        }
                        None => after.clone(),
                    };
                    let header = tiny_http::Header::from_bytes("Content-Type", "application/json")
                        .expect("a valid header");
                    let _ =
                        request.respond(tiny_http::Response::from_string(body).with_header(header));
                }
            })
        };
        JsonServer {
            url: format!("http://127.0.0.1:{port}/data.json"),
            queue,
            served,
            stop,
            thread: Some(thread),
        }
    }

    /// Queues one more body.
    pub fn push(&self, body: String) {
        self.queue.lock().expect("queue lock").push_back(body);
    }

    /// How many queued bodies were served.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Whether every queued body was served.
    pub fn exhausted(&self) -> bool {
        self.queue.lock().expect("queue lock").is_empty()
    }
}

impl Drop for JsonServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A PurpleAir-shaped table body with a `last_seen` epoch-seconds column.
pub fn purpleair_body(rows: &[(u32, i64, f64, f64)]) -> String {
    let data: Vec<Value> = rows
        .iter()
        .map(|(id, last_seen, pm, temperature)| {
            serde_json::json!([id, pm, 1, "Label", temperature, null, last_seen])
        })
        .collect();
    serde_json::json!({
        "version": "7.0.4",
        "fields": ["ID", "pm", "age", "Label", "Temperature", "Voc", "last_seen"],
        "data": data,
        "count": rows.len(),
    })
    .to_string()
}

/// Runs a DuckDB query (a reader we did not write) and returns its rows as JSON arrays.
///
/// Python comes from `$EDGESPOOL_PYTHON` (scripts/test.sh makes a venv with DuckDB) or
/// `python3`; the query's `{root}` is replaced by `root`.
pub fn duckdb(root: &Path, sql: &str) -> Vec<Vec<Value>> {
    let python = python();
    let sql = sql.replace("{root}", &root.display().to_string());
    // A query slower than 2 s (a loaded machine) would print a progress bar into the JSON.
    let script = "import duckdb, json, sys\nduckdb.execute(\"SET enable_progress_bar = false\")\nrows = duckdb.sql(sys.argv[1]).fetchall()\nprint(json.dumps([list(r) for r in rows], default=str))\n";
    let out = Command::new(&python)
        .args(["-c", script, &sql])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run the suite with scripts/test.sh"));
    assert!(
        out.status.success(),
        "DuckDB query failed (run the suite with scripts/test.sh, which installs DuckDB): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the query printed JSON")
}

/// Writes `text` to `root/relative`, creating folders.
pub fn write_file(root: &Path, relative: &str, text: &str) -> PathBuf {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().expect("a file has a folder")).expect("mkdir");
    fs::write(&path, text).expect("write");
    path
}

/// The test suite's Python: `$EDGESPOOL_PYTHON` (scripts/test.sh makes a venv with
/// DuckDB and moto), else `python3`.
pub fn python() -> String {
    std::env::var("EDGESPOOL_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// An S3 client for the tests, through boto3 (a client we did not write).
const S3_CLIENT: &str = r#"
import boto3, json, os, sys
from botocore.config import Config
endpoint, command, bucket = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test",
                  config=Config(retries={"max_attempts": 10, "mode": "standard"}))
if command == "mkbucket":
    s3.create_bucket(Bucket=bucket)
    print("[]")
elif command == "list":
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            head = s3.head_object(Bucket=bucket, Key=o["Key"])
            found.append({"key": o["Key"], "size": o["Size"], "etag": head["ETag"].strip('"'),
                          "content_type": head.get("ContentType", "")})
    print(json.dumps(found))
elif command == "mirror":
    target = sys.argv[4]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            path = os.path.join(target, o["Key"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, o["Key"], path)
    print("[]")
"#;

/// One object as the S3 server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its ETag, without quotes (`{md5}` or `{md5}-{parts}` for a multipart upload).
    pub etag: String,
    /// Its Content-Type.
    pub content_type: String,
}

/// A real S3-compatible server (moto in server mode) on a free loopback port; killed on
/// drop. Its objects live in its memory: a restart starts empty.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl S3Server {
    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server, logging to `log`, and waits until it answers.
    pub fn start(log: &Path) -> S3Server {
        let port = free_port();
        let mut server = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            log: log.to_owned(),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut moto = Command::new(python());
        moto.args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string());
        self.child = Some(spawn_listening(
            moto,
            &self.log,
            self.port,
            "moto (run the suite with scripts/test.sh, which installs it)",
        ));
    }

    /// Stops the server (SIGKILL): connections are refused until [`S3Server::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn client(&self, args: &[&str]) -> Value {
        self.try_client(args)
            .unwrap_or_else(|error| panic!("S3 client {args:?} failed: {error}"))
    }

    /// What the S3 client printed, or what it said on standard error if it failed.
    fn try_client(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(python())
            .args(["-c", S3_CLIENT, &self.endpoint])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("python runs");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).expect("the S3 client prints JSON"))
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        self.client(&["mkbucket", bucket]);
    }

    /// Every object of a bucket, sorted by key; fails the test if the server cannot list.
    /// Not for a `wait_for` poll: there, [`S3Server::try_list`].
    pub fn list(&self, bucket: &str) -> Vec<S3Object> {
        objects_of(&self.client(&["list", bucket]))
    }

    /// [`S3Server::list`], or `None` while the server cannot list the bucket (still
    /// starting after a restart, the bucket not made yet); for polls.
    pub fn try_list(&self, bucket: &str) -> Option<Vec<S3Object>> {
        self.try_client(&["list", bucket])
            .ok()
            .map(|listed| objects_of(&listed))
    }

    /// Downloads every object of a bucket below `dir`, keys as paths.
    pub fn mirror(&self, bucket: &str, dir: &Path) {
        self.client(&["mirror", bucket, dir.to_str().expect("utf-8 path")]);
    }
}

/// The objects the S3 client listed, sorted by key.
fn objects_of(listed: &Value) -> Vec<S3Object> {
    let mut objects: Vec<S3Object> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|o| S3Object {
            key: o["key"].as_str().expect("key").to_owned(),
            size: o["size"].as_u64().expect("size"),
            etag: o["etag"].as_str().expect("etag").to_owned(),
            content_type: o["content_type"].as_str().unwrap_or("").to_owned(),
        })
        .collect();
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    objects
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The password of the test PostgreSQL servers' `edgespool` role.
pub const PG_PASSWORD: &str = "pg-test-password";

/// A real PostgreSQL server in a temp dir on a free loopback port, with a role
/// `edgespool` (password [`PG_PASSWORD`]); stopped on drop. As root, it runs as the
/// `postgres` user (the server refuses to run as root).
pub struct PgServer {
    /// The port.
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

/// The folder of PostgreSQL's server programs.
fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("postgres").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server under /usr/lib/postgresql: run the suite with scripts/test.sh, which installs it")
    })
}

impl PgServer {
    /// initdb, then start.
    pub fn start() -> PgServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let owner = if rustix::process::geteuid().is_root() {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .expect("id runs");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("the postgres user exists")
            };
            Some((id("-u"), id("-g")))
        } else {
            None
        };
        let port = free_port();
        let mut server = PgServer {
            port,
            bin: pg_bin(),
            dir,
            owner,
            child: None,
        };
        let pwfile = server.dir.path().join("pw");
        fs::write(&pwfile, PG_PASSWORD).expect("write pwfile");
        if let Some((uid, gid)) = owner {
            for path in [server.dir.path(), pwfile.as_path()] {
                rustix::fs::chown(
                    path,
                    Some(rustix::process::Uid::from_raw(uid)),
                    Some(rustix::process::Gid::from_raw(gid)),
                )
                .expect("chown to postgres");
            }
        }
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(server.dir.path().join("data"))
            .args([
                "-U",
                "edgespool",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.spawn();
        server
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.stdin(Stdio::null()).current_dir(self.dir.path());
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        command
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log opens");
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdout(log.try_clone().expect("log clones"))
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(60),
            || {
                let out = self.psql_command("postgres", "SELECT 1").output().ok()?;
                out.status.success().then_some(())
            },
        );
    }

    /// Stops the server (fast shutdown: sessions are cut, open transactions roll back).
    pub fn stop(&mut self) {
        stop_child(
            self.child.take(),
            rustix::process::Signal::INT,
            Duration::from_secs(30),
        );
    }

    /// Starts it again on the same port, with its data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn psql_command(&self, db: &str, sql: &str) -> Command {
        let mut command = Command::new("psql");
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "edgespool",
                "-d",
                db,
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null());
        command
    }

    /// Makes the server log every statement from now on, in [`PgServer::log`] (the new
    /// setting waited for: a session started after this returns has it).
    pub fn log_statements(&self) {
        self.psql("postgres", "ALTER SYSTEM SET log_statement = 'all'");
        self.psql("postgres", "SELECT pg_reload_conf()");
        wait_for("log_statement = all", Duration::from_secs(30), || {
            (self.try_psql("postgres", "SHOW log_statement")? == "all").then_some(())
        });
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs SQL with psql (a client we did not write); rows as lines, columns `|`-separated.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.psql_command(db, sql).output().expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    /// [`PgServer::psql`] that gives `None` instead of failing (a table not made yet).
    pub fn try_psql(&self, db: &str, sql: &str) -> Option<String> {
        let out = self.psql_command(db, sql).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Asks TCP clients for `method` (`password`, `md5`, `scram-sha-256`) from now on,
    /// the role's password stored as `encryption` (`md5` or `scram-sha-256`). The
    /// server has TLS off, so `password` and `md5` are the clear-text methods a hostile
    /// server would ask for. The test's own psql keeps working: it sends the password
    /// whatever the method.
    pub fn set_method(&self, method: &str, encryption: &str) {
        self.psql(
            "postgres",
            &format!(
                "SET password_encryption = '{encryption}'; \
                 ALTER ROLE edgespool PASSWORD '{PG_PASSWORD}'"
            ),
        );
        let text = format!(
            "local all all trust\nhost all all 127.0.0.1/32 {method}\nhost all all ::1/128 {method}\n"
        );
        // Overwriting keeps the file's owner (postgres, when run as root).
        fs::write(self.dir.path().join("data/pg_hba.conf"), text).expect("write pg_hba.conf");
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// A psql session kept open, fed statements on its standard input.
    pub fn session(&self, db: &str) -> Child {
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "edgespool",
                "-d",
                db,
            ])
            .args(["-X", "-q"])
            .env("PGPASSWORD", PG_PASSWORD)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("psql starts")
    }

    /// The server's own log.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// 2026-01-02T03:00:00Z: partitions this old close as soon as they are committed.
pub const T0: i64 = 1_767_322_800;

/// The HTTP table source `pa` polling `url` every 100 ms, one series per sensor `ID`
/// and column, each row stamped by its `last_seen`.
pub fn table_source(url: &str, columns: &[&str]) -> String {
    let columns: Vec<String> = columns.iter().map(|c| format!("{c:?}")).collect();
    format!(
        r#"
[[sources]]
kind = "http"
name = "pa"
url = "{url}"
interval = "100ms"
timeout = "2s"
[sources.table]
key = "ID"
columns = [{columns}]
units = {{ pm = "ug/m3" }}
timestamp_column = "last_seen"
"#,
        columns = columns.join(", ")
    )
}

/// Writes `dir/edgespool.toml`: device `e2e`, 1 s windows, 1 min partitions, no grace,
/// the spool in `dir`, then `body` (sources and sinks).
pub fn write_agent_config(dir: &Path, body: &str) -> PathBuf {
    let text = format!(
        "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"1s\"\npartition = \"1m\"\ngrace = \"0s\"\n\n{body}\n",
        dir.join("spool.db").display()
    );
    let path = dir.join("edgespool.toml");
    fs::write(&path, text).expect("write config");
    path
}

/// Table rows at minute `i` after [`T0`]: sensor 7 reads `i`, sensor 9 reads `10 + i`.
pub fn minute(i: i64) -> String {
    purpleair_body(&[
        (7, T0 + i * 60, i as f64, 20.0 + i as f64),
        (9, T0 + i * 60 + 30, 10.0 + i as f64, 30.0),
    ])
}

/// Samples of `series` in window rows: the sum of their counts.
pub fn samples_of(rows: &[Value], series: &str) -> u64 {
    rows.iter()
        .filter(|r| r["series"] == series)
        .map(|r| r["count"].as_u64().expect("a window row has a count"))
        .sum()
}

/// `n` counting messages `{"t":…,"v":1}`, one per second of event time from
/// `T0 + 3600 + from` (an hour after [`T0`]: their partitions close at once).
pub fn counting(from: i64, n: i64) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("{{\"t\":{},\"v\":1}}", T0 + 3600 + i))
        .collect()
}

/// Publishes [`counting`] messages `from..from + n` to `count/a` at QoS 1.
pub fn publish_counting(broker: &MqttBroker, from: i64, n: i64) {
    let messages = counting(from, n);
    let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
    broker.publish("count/a", 1, &refs);
}

/// A real Mosquitto broker on a free loopback port, with persistence in a temp dir (so
/// that sessions and queued QoS 1 messages survive a restart); stopped on drop.
pub struct MqttBroker {
    /// The port.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl MqttBroker {
    /// Starts the broker and waits until it listens.
    pub fn start() -> MqttBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\n",
            dir.path().display()
        );
        if rustix::process::geteuid().is_root() {
            // Keep the persistence folder writable: do not drop to the mosquitto user.
            conf.push_str("user root\n");
        }
        fs::write(dir.path().join("mosquitto.conf"), conf).expect("write conf");
        let mut broker = MqttBroker {
            port,
            dir,
            child: None,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let mut mosquitto = Command::new("mosquitto");
        mosquitto
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"));
        self.child = Some(spawn_listening(
            mosquitto,
            &self.dir.path().join("broker.log"),
            self.port,
            "mosquitto (scripts/test.sh installs it)",
        ));
    }

    /// Stops the broker cleanly (SIGTERM: it saves its sessions and queues).
    pub fn stop(&mut self) {
        stop_child(
            self.child.take(),
            rustix::process::Signal::TERM,
            Duration::from_secs(10),
        );
    }

    /// Starts it again on the same port, with what it saved.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts a stopped broker again (see [`MqttBroker::stop`]).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        self.spawn();
    }

    /// The retained message of `topic`, if any (mosquitto_sub, at most 10 s).
    pub fn retained(&self, topic: &str) -> Option<String> {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", topic])
            .args(["--retained-only", "-C", "1", "-W", "10"])
            .stdin(Stdio::null())
            .output()
            .expect("mosquitto_sub runs");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!text.is_empty()).then_some(text)
    }

    /// A subscriber to `filter` (QoS 1, a persistent session under `id`) writing what it
    /// receives to a file; stopped on drop.
    pub fn subscribe(&self, filter: &str, id: &str) -> Subscriber {
        let path = self.dir.path().join(format!("{id}.received"));
        let file = fs::File::create(&path).expect("create the subscriber's file");
        let child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                filter,
            ])
            .args(["-q", "1", "-c", "-i", id, "-v"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub starts");
        let subscriber = Subscriber {
            path,
            child: Some(child),
        };
        // Subscribed once a marker published under the filter comes back.
        let marker = format!("{}/subscribed", filter.trim_end_matches("/#"));
        wait_for(
            "the subscriber to subscribe",
            Duration::from_secs(30),
            || {
                if !self.try_publish(&marker, 1, &["1"]) {
                    return None;
                }
                subscriber
                    .messages()
                    .iter()
                    .any(|(topic, _)| *topic == marker)
                    .then_some(())
            },
        );
        subscriber
    }

    /// Publishes each of `messages` to `topic` with mosquitto_pub (one connection,
    /// QoS `qos`); the messages must not hold line breaks. Fails the test if
    /// mosquitto_pub fails; not for a `wait_for` poll: there, [`MqttBroker::try_publish`].
    pub fn publish(&self, topic: &str, qos: u8, messages: &[&str]) {
        assert!(
            self.try_publish(topic, qos, messages),
            "mosquitto_pub to {topic} failed"
        );
    }

    /// [`MqttBroker::publish`], saying whether mosquitto_pub succeeded; for polls.
    pub fn try_publish(&self, topic: &str, qos: u8, messages: &[&str]) -> bool {
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", topic])
            .args(["-q", &qos.to_string(), "-l"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("mosquitto_pub starts");
        // A write fails only if mosquitto_pub has gone (it could not connect).
        let written = {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            messages
                .iter()
                .all(|message| writeln!(stdin, "{message}").is_ok())
        };
        let ended = child.wait().expect("mosquitto_pub ends");
        written && ended.success()
    }

    /// Publishes one message of arbitrary bytes.
    pub fn publish_bytes(&self, topic: &str, payload: &[u8]) {
        let file = self.dir.path().join("payload.bin");
        fs::write(&file, payload).expect("write payload");
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                topic,
                "-q",
                "1",
                "-f",
            ])
            .arg(&file)
            .status()
            .expect("mosquitto_pub runs");
        assert!(status.success(), "mosquitto_pub to {topic} failed");
    }
}

/// A running mosquitto_sub; see [`MqttBroker::subscribe`].
pub struct Subscriber {
    path: PathBuf,
    child: Option<Child>,
}

impl Subscriber {
    /// Every (topic, payload) received so far, in order: the lines mosquitto_sub has
    /// finished writing (a last line without its line break is not there yet).
    pub fn messages(&self) -> Vec<(String, String)> {
        let bytes = fs::read(&self.path).unwrap_or_default();
        let finished = bytes.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        String::from_utf8_lossy(&bytes[..finished])
            .lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(topic, payload)| (topic.to_owned(), payload.to_owned()))
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        stop_child(
            self.child.take(),
            rustix::process::Signal::TERM,
            Duration::from_secs(5),
        );
    }
}

impl Drop for MqttBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `postgres` sink on `pg` (password from `{password_file}`, to be replaced), plus
/// `extra` keys.
pub fn pg_sink(pg: &PgServer, name: &str, extra: &str) -> String {
    pg_sink_at(pg.port, name, extra)
}

/// [`pg_sink`] on another port (a proxy's).
pub fn pg_sink_at(port: u16, name: &str, extra: &str) -> String {
    format!(
        r#"
[[sinks]]
kind = "postgres"
name = "{name}"
host = "127.0.0.1"
port = {port}
user = "edgespool"
dbname = "postgres"
password_file = "{{password_file}}"
sslmode = "disable"
connect_timeout = "2s"
retry_max = "1s"
{extra}
"#,
    )
}

/// Writes `dir/credentials/pg`, holding [`PG_PASSWORD`]: the file a [`pg_sink`]'s
/// `{password_file}` names.
pub fn write_pg_password(dir: &Path) -> PathBuf {
    write_file(dir, "credentials/pg", &format!("{PG_PASSWORD}\n"))
}

/// Writes a configuration for the PostgreSQL tests: the HTTP table source polling `url`
/// (columns `pm` and `Temperature`, see [`table_source`]), then `sinks`, whose
/// `{password_file}` becomes [`write_pg_password`]'s file.
pub fn pg_table_config(dir: &Path, url: &str, sinks: &str) -> PathBuf {
    let password = write_pg_password(dir);
    let sinks = sinks.replace("{password_file}", &password.display().to_string());
    write_agent_config(
        dir,
        &format!("{}\n{sinks}", table_source(url, &["pm", "Temperature"])),
    )
}

/// A `local` sink named `archive` under `dir/archive`.
pub fn archive_sink(dir: &Path) -> String {
    format!(
        "[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{}\"\nretry_max = \"1s\"\nlate_grace = \"0s\"\n",
        dir.join("archive").display()
    )
}

/// Per series: total samples and the sum of mean × count, from NDJSON files under `root`.
pub fn ndjson_totals(root: &Path) -> String {
    let mut totals: std::collections::BTreeMap<String, (u64, f64)> = Default::default();
    for row in read_tree(root).iter().flat_map(|f| &f.rows) {
        let entry = totals
            .entry(row["series"].as_str().expect("series").to_owned())
            .or_default();
        let n = row["count"].as_u64().expect("count");
        entry.0 += n;
        entry.1 += row["mean"].as_f64().expect("mean") * n as f64;
    }
    totals
        .iter()
        .map(|(series, (n, sum))| format!("{series}|{n}|{sum}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The same totals from the PostgreSQL sink's table, as psql prints them.
pub const PG_TOTALS_SQL: &str =
    "SELECT series, sum(count), sum(mean * count) FROM edgespool_windows
                          GROUP BY series ORDER BY series";

/// An `s3` sink on `server`'s bucket `lake`, plus `extra` keys.
pub fn s3_sink(server: &S3Server, name: &str, extra: &str) -> String {
    s3_sink_at(&server.endpoint, name, extra)
}

/// [`s3_sink`] at another endpoint (a proxy's).
pub fn s3_sink_at(endpoint: &str, name: &str, extra: &str) -> String {
    format!(
        r#"
[[sinks]]
kind = "s3"
name = "{name}"
bucket = "lake"
endpoint = "{endpoint}"
region = "us-east-1"
access_key_id = "test"
secret_access_key_file = "{{secret_file}}"
retry_max = "1s"
timeout = "3s"
late_grace = "0s"
{extra}
"#,
    )
}

/// A small seeded random number generator (xorshift64*), so that a fault test can be
/// replayed: the seed comes from `EDGESPOOL_SEED` or the clock, and is printed.
pub struct Chaos(u64);

impl Chaos {
    /// A generator; `what` names the test in the printed seed.
    pub fn new(what: &str) -> Chaos {
        let seed = std::env::var("EDGESPOOL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{what}: EDGESPOOL_SEED={seed}");
        Chaos(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `low..high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low).max(1)
    }
}

/// How many rounds a fault loop runs: `EDGESPOOL_FAULT_ROUNDS` (scripts/test.sh --long
/// sets the full counts), else the reduced count CI runs.
pub fn fault_rounds(reduced: usize, full: usize) -> usize {
    match std::env::var("EDGESPOOL_FAULT_ROUNDS").as_deref() {
        Ok("full") => full,
        Ok(n) => n.parse().unwrap_or(reduced),
        Err(_) => reduced,
    }
}

/// What the fault proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Pass,
    /// Passes, then resets both sides after this long (if still chaotic then).
    Expire(Duration),
    Reset,
    CutAfter(u64),
    Stall(Duration),
    Unavailable,
}

/// A TCP proxy on a free loopback port in front of `upstream` that, while chaotic, drops,
/// stalls, resets and cuts connections at random (and, for HTTP, answers some with 503
/// itself); once calm, it passes everything. Stopped on drop.
pub struct FaultProxy {
    /// The port to connect to instead of the server's.
    pub port: u16,
    chaotic: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts the proxy, chaotic; `http` adds 503 answers to the faults.
    pub fn start(upstream: u16, http: bool, seed: u64) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("local addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let chaotic = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicUsize::new(0));
        let (c, s, f) = (Arc::clone(&chaotic), Arc::clone(&stop), Arc::clone(&faults));
        let thread = std::thread::spawn(move || {
            let mut chaos = Chaos(seed.max(1));
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => break,
                };
                let _ = client.set_nonblocking(false);
                let fault = if c.load(Ordering::Relaxed) {
                    match chaos.between(0, 100) {
                        0..40 => Fault::Expire(Duration::from_millis(chaos.between(500, 6_000))),
                        40..55 => Fault::Reset,
                        55..70 => Fault::CutAfter(chaos.between(0, 20_000)),
                        70..85 => Fault::Stall(Duration::from_millis(chaos.between(500, 4_000))),
                        _ if http => Fault::Unavailable,
                        _ => Fault::CutAfter(chaos.between(0, 2_000)),
                    }
                } else {
                    Fault::Pass
                };
                if fault != Fault::Pass {
                    f.fetch_add(1, Ordering::Relaxed);
                }
                let chaotic = Arc::clone(&c);
                std::thread::spawn(move || serve(client, upstream, fault, &chaotic));
            }
        });
        FaultProxy {
            port,
            chaotic,
            stop,
            faults,
            thread: Some(thread),
        }
    }

    /// From now on, pass every new connection untouched.
    pub fn calm(&self) {
        self.chaotic.store(false, Ordering::Relaxed);
    }

    /// Connections it has harmed so far.
    pub fn faults(&self) -> usize {
        self.faults.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Closes a socket with a reset (linger 0), as a crashed peer or a middlebox would.
fn reset(stream: &std::net::TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(stream, Some(Duration::ZERO));
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn serve(client: std::net::TcpStream, upstream: u16, fault: Fault, chaotic: &AtomicBool) {
    use std::io::{Read, Write};
    match fault {
        Fault::Reset => return reset(&client),
        Fault::Unavailable => {
            let mut client = client;
            let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = [0u8; 1024];
            let _ = client.read(&mut head);
            let _ = client.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
        Fault::Stall(pause) => std::thread::sleep(pause),
        Fault::Pass | Fault::CutAfter(_) | Fault::Expire(_) => {}
    }
    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
        return reset(&client);
    };
    let budget = Arc::new(AtomicUsize::new(match fault {
        Fault::CutAfter(n) => n as usize,
        _ => usize::MAX,
    }));
    let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
        let budget = Arc::clone(&budget);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let left =
                    budget.fetch_sub(n.min(budget.load(Ordering::Relaxed)), Ordering::Relaxed);
                let send = n.min(left);
                if to.write_all(&buffer[..send]).is_err() || send < n {
                    reset(&to);
                    reset(&from);
                    return;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        })
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return reset(&client);
    };
    let (Ok(c3), Ok(s3)) = (c2.try_clone(), s2.try_clone()) else {
        return reset(&client);
    };
    let up = pipe(client, server);
    let down = pipe(s2, c2);
    if let Fault::Expire(lifetime) = fault {
        // Polls the pipes' end rather than sleeping the whole lifetime.
        let deadline = Instant::now() + lifetime;
        while Instant::now() < deadline && !(up.is_finished() && down.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if chaotic.load(Ordering::Relaxed) && !(up.is_finished() && down.is_finished()) {
            reset(&c3);
            reset(&s3);
        }
    }
    let _ = up.join();
    let _ = down.join();
}

/// A fake thermal zone reading 48.312 °C under `dir/device`, and the `sysfs` source
/// `board` (series `board.cpu`) that samples it every `interval`.
pub fn thermal_source(dir: &Path, interval: &str) -> String {
    let root = dir.join("device");
    write_file(&root, "sys/class/thermal/thermal_zone0/temp", "48312\n");
    format!(
        "[[sources]]\nkind = \"sysfs\"\nname = \"board\"\nroot = \"{}\"\ninterval = \"{interval}\"\n[[sources.files]]\nfield = \"cpu\"\npath = \"/sys/class/thermal/thermal_zone0/temp\"\nscale = 0.001\n",
        root.display()
    )
}

/// A `local` sink writing to `dir/out`.
pub fn out_sink(dir: &Path) -> String {
    format!(
        "[[sinks]]\nkind = \"local\"\npath = \"{}\"\nlate_grace = \"0s\"\n",
        dir.join("out").display()
    )
}

/// The MQTT subscription the tests count with: `count/#`, JSON `{"t": seconds, "v": 1}`.
pub const COUNT_SUBSCRIPTION: &str = r#"
[[sources.subscriptions]]
topic = "count/#"
payload = "json"
timestamp = "/t"
[[sources.subscriptions.fields]]
name = "v"
pointer = "/v"
"#;
