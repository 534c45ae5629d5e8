//! One agent per spool, and a spool that stays the agent's: a second agent on the same
//! spool refuses to start and names the first one's pid; `kill -9` leaves no stale lock;
//! a spool file deleted under the running agent is put back with everything it held.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, T0, binary, edgespool, purpleair_body, read_tree, status_json, table_source,
    wait_for, write_agent_config,
};
use serde_json::Value;

/// Minute `i`: sensors 1 and 2, stamped inside minute `i` after [`T0`].
fn body(i: i64) -> String {
    let at = T0 + i * 60 + 10;
    purpleair_body(&[(1, at, i as f64, 0.5), (2, at, i as f64 + 0.25, 1.5)])
}

/// The HTTP table source and a `local` sink at `dir/out`.
fn config(dir: &Path, url: &str) -> PathBuf {
    let body = format!(
        "{}\n[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{}\"\nretry_max = \"2s\"\nlate_grace = \"0s\"\n",
        table_source(url, &["pm", "Temperature"]),
        dir.join("out").display()
    );
    write_agent_config(dir, &body)
}

/// `edgespool run` whose exit status a test reads; killed on drop if still alive.
struct Run(Child);

impl Run {
    fn start(config: &Path, stderr: &Path) -> Run {
        let err = std::fs::File::create(stderr).expect("stderr file");
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("the agent starts");
        Run(child)
    }

    /// Its exit status, once it exits (at most `timeout`).
    fn exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for("the second agent to exit", timeout, || {
            self.0.try_wait().ok().flatten()
        })
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `status --json`, or `None` while there is no readable spool.
fn try_status(config: &Path) -> Option<Value> {
    let config = config.to_str().expect("utf-8 path");
    let out = edgespool(&["status", "--config", config, "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Waits until every queued body was served, two more flushes committed it, and every
/// partition was delivered.
fn wait_until_all_delivered(server: &JsonServer, config: &Path) {
    wait_for("every body served", Duration::from_secs(60), || {
        server.exhausted().then_some(())
    });
    let mut heartbeats: Vec<Value> = Vec::new();
    wait_for(
        "two more flushes and every partition delivered",
        Duration::from_secs(60),
        || {
            let status = try_status(config)?;
            let heartbeat = status["daemon"]["heartbeat"].clone();
            if heartbeats.last() != Some(&heartbeat) {
                heartbeats.push(heartbeat);
            }
            let idle = status["sinks"][0]["pending_rows"] == 0 && status["spool"]["rows"] == 0;
            (heartbeats.len() >= 3 && idle).then_some(())
        },
    );
}

/// Checks that the output holds each window once and every sample the spool counted;
/// returns the minutes (after [`T0`]) it has a file of, each with its four series.
fn assert_each_window_once(out: &Path, config: &Path) -> BTreeSet<i64> {
    let files = read_tree(out);
    let status = status_json(config);
    let mut seen = BTreeSet::new();
    let mut counted = 0;
    for row in files.iter().flat_map(|f| &f.rows) {
        let key = (row["series"].to_string(), row["window_start"].to_string());
        assert!(seen.insert(key.clone()), "window delivered twice: {key:?}");
        counted += row["count"].as_u64().expect("count");
    }
    assert_eq!(
        Some(counted),
        status["counters"]["samples"].as_u64(),
        "every sample the spool counted is in the output exactly once"
    );
    let keys: Vec<&str> = files.iter().map(|f| f.key.as_str()).collect();
    assert!(
        keys.iter().all(|k| k.ends_with("-part-0000.ndjson")),
        "one part per partition: {keys:?}"
    );
    // Two sensors, two columns: four series a minute.
    assert_eq!(seen.len(), 4 * files.len(), "{seen:?}");
    files
        .iter()
        .flat_map(|f| &f.rows)
        .map(|r| {
            let start = chrono::DateTime::parse_from_rfc3339(
                r["window_start"].as_str().expect("window_start"),
            )
            .expect("RFC 3339");
            (start.timestamp() - T0).div_euclid(60)
        })
        .collect()
}

#[test]
fn a_second_agent_on_the_same_spool_refuses_to_start_and_kill_9_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = JsonServer::start((0..10).map(body).collect(), purpleair_body(&[]));
    let config = config(dir.path(), &server.url);
    let out = dir.path().join("out");
    let spool = dir.path().join("spool.db");
    let mut first = Agent::start(&config, &dir.path().join("first.log"));
    wait_for(
        "the first agent's deliveries",
        Duration::from_secs(60),
        || (read_tree(&out).len() >= 3).then_some(()),
    );
    let pid = first.status()["daemon"]["pid"]
        .as_u64()
        .expect("the first agent's pid");

    let stderr = dir.path().join("second.stderr");
    let mut second = Run::start(&config, &stderr);
    let exit = second.exit(Duration::from_secs(20));
    let message = std::fs::read_to_string(&stderr).expect("stderr");
    assert!(!exit.success(), "the second agent must fail: {exit:?}");
    assert!(
        message.contains(&format!(
            "the spool {} is in use by another edgespool (pid {pid}); stop it first",
            spool.display()
        )),
        "{message}"
    );
    assert!(first.is_running(), "the first agent goes on");
    let status = status_json(&config);
    assert_eq!(status["daemon"]["state"], "running", "{status}");
    assert_eq!(status["daemon"]["pid"].as_u64(), Some(pid));
    let check = edgespool(&["check-config", "--config", config.to_str().expect("utf-8")]);
    assert!(
        check.status.success(),
        "check-config works beside a running agent: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    for i in 10..20 {
        server.push(body(i));
    }
    wait_for("more deliveries", Duration::from_secs(60), || {
        (read_tree(&out).len() >= 12).then_some(())
    });
    first.kill9();
    // The lock file still names the dead agent; the kernel released its lock.
    let third = Agent::start(&config, &dir.path().join("third.log"));
    wait_for(
        "the new agent running on the spool",
        Duration::from_secs(30),
        || {
            let status = try_status(&config)?;
            let pid_now = status["daemon"]["pid"].as_u64()?;
            (pid_now != pid && status["daemon"]["state"] == "running").then_some(())
        },
    );
    for i in 20..30 {
        server.push(body(i));
    }
    wait_until_all_delivered(&server, &config);
    let exit = third.terminate();
    assert!(exit.success(), "{exit:?}");
    let minutes = assert_each_window_once(&out, &config);
    // kill -9 may take the windows still open in memory, nothing committed: the minutes
    // delivered before it and every one after the restart are there.
    let expected: BTreeSet<i64> = (0..12).chain(20..30).collect();
    assert!(minutes.is_superset(&expected), "{minutes:?}");
}

#[test]
fn a_spool_deleted_under_the_running_agent_is_put_back_and_loses_no_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = JsonServer::start((0..10).map(body).collect(), purpleair_body(&[]));
    let config = config(dir.path(), &server.url);
    let out = dir.path().join("out");
    let spool = dir.path().join("spool.db");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    wait_for(
        "deliveries before the deletion",
        Duration::from_secs(60),
        || (read_tree(&out).len() >= 4).then_some(()),
    );
    // As `rm spool.db*` would: the lock file goes too.
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let file = format!("{}{suffix}", spool.display());
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("rm {file}: {e}"),
            _ => {}
        }
    }
    for i in 10..20 {
        server.push(body(i));
    }
    let status = wait_for(
        "status to show the spool put back",
        Duration::from_secs(30),
        || {
            let status = try_status(&config)?;
            (!status["spool"]["restored"].is_null()).then_some(status)
        },
    );
    let restored = &status["spool"]["restored"];
    assert_eq!(restored["found"], "deleted", "{status}");
    assert!(restored["moved_to"].is_null(), "{status}");
    assert_eq!(status["daemon"]["state"], "running", "{status}");
    let text = edgespool(&["status", "--config", config.to_str().expect("utf-8")]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("RESTORED") && text.contains("deleted while the agent ran"),
        "{text}"
    );
    assert!(
        agent
            .log_text()
            .contains("the spool file was deleted or replaced under the running agent"),
        "{}",
        agent.log_text()
    );

    // The lock was taken again on a new lock file: a second agent is still refused.
    let stderr = dir.path().join("second.stderr");
    let exit = Run::start(&config, &stderr).exit(Duration::from_secs(20));
    assert!(!exit.success(), "{exit:?}");
    let message = std::fs::read_to_string(&stderr).expect("stderr");
    assert!(
        message.contains("is in use by another edgespool"),
        "{message}"
    );

    for i in 20..30 {
        server.push(body(i));
    }
    wait_until_all_delivered(&server, &config);
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
    let minutes = assert_each_window_once(&out, &config);
    assert_eq!(minutes, (0..30).collect(), "before and after the deletion");
    let after = status_json(&config);
    assert_eq!(after["daemon"]["state"], "stopped", "{after}");
}
