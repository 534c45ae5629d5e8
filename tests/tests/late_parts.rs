//! Late rows for a partition already delivered, end to end: device-stamped stragglers that
//! arrive over several flushes wait for the sink's `late_grace` (through a `kill -9`) and
//! land as one part; with `late_grace = "0s"` each flush's stragglers make a part of their
//! own, as before.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, OutputFile, T0, edgespool, find_sink, minute, purpleair_body, read_tree,
    table_source, try_status_json, wait_for, write_agent_config,
};
use serde_json::Value;

/// Sensor 7's and 9's `pm` (1 s windows, 1 min partitions) into a local folder `out`.
fn config(dir: &Path, url: &str, late: &str) -> PathBuf {
    let body = format!(
        "{}\n[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{}\"\nretry_max = \"1s\"\n{late}\n",
        table_source(url, &["pm"]),
        dir.join("out").display()
    );
    write_agent_config(dir, &body)
}

/// The files of partition 03:00 (minute 0), by part number.
fn minute_zero_parts(files: &[OutputFile]) -> Vec<(String, Vec<Value>)> {
    let mut parts: Vec<(String, Vec<Value>)> = files
        .iter()
        .filter(|f| f.key.contains("e2e-20260102T0300-part-"))
        .map(|f| {
            let name = f.key.rsplit('/').next().unwrap_or(&f.key).to_owned();
            (name, f.rows.clone())
        })
        .collect();
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    parts
}

/// Starts the agent on minutes 0 and 1 and waits until both partitions are delivered.
fn delivered_minutes(dir: &Path, late: &str) -> (JsonServer, Agent, PathBuf) {
    let server = JsonServer::start(vec![minute(0), minute(1)], purpleair_body(&[]));
    let config = config(dir, &server.url, late);
    let agent = Agent::start(&config, &dir.join("agent.log"));
    let out = dir.join("out");
    wait_for("minutes 0 and 1 delivered", Duration::from_secs(60), || {
        let files = read_tree(&out);
        let has = |name: &str| files.iter().any(|f| f.key.ends_with(name));
        (has("e2e-20260102T0300-part-0000.ndjson") && has("e2e-20260102T0301-part-0000.ndjson"))
            .then_some(())
    });
    (server, agent, config)
}

/// A straggler for minute 0: sensor 7 at second `second`, reading `100 + second`.
fn straggler(second: i64) -> String {
    purpleair_body(&[(7, T0 + second, 100.0 + second as f64, 0.0)])
}

fn archive(config: &Path) -> Option<Value> {
    let status = try_status_json(config)?;
    find_sink(&status, "archive").cloned()
}

fn means(rows: &[Value]) -> Vec<f64> {
    let mut means: Vec<f64> = rows.iter().filter_map(|r| r["mean"].as_f64()).collect();
    means.sort_by(f64::total_cmp);
    means
}

#[test]
fn stragglers_of_several_flushes_wait_for_the_late_grace_through_a_kill_and_land_as_one_part() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, agent, config) = delivered_minutes(dir.path(), "late_grace = \"30s\"");
    let out = dir.path().join("out");
    // Three stragglers, each committed in its own flush before the next is served.
    for (n, second) in [(1, 11), (2, 12), (3, 13)] {
        server.push(straggler(second));
        let sink = wait_for("the straggler waiting", Duration::from_secs(30), || {
            archive(&config).filter(|s| s["late_waiting"] == n)
        });
        assert!(sink["late_due"].is_string(), "{sink}");
        assert_eq!(
            minute_zero_parts(&read_tree(&out)).len(),
            1,
            "nothing more of minute 0 while its late rows wait"
        );
    }
    let text = edgespool(&["status", "--config", config.to_str().expect("utf-8 path")]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("(3 of them late, waiting until "), "{text}");
    // Killed while they wait: they are in the spool, and keep waiting after the restart.
    agent.kill9();
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let parts = wait_for("the late part", Duration::from_secs(90), || {
        let parts = minute_zero_parts(&read_tree(&out));
        (parts.len() > 1).then_some(parts)
    });
    // Two more flushes: nothing else follows.
    let mut heartbeats: Vec<Value> = Vec::new();
    wait_for("two more flushes", Duration::from_secs(30), || {
        let heartbeat = try_status_json(&config)?["daemon"]["heartbeat"].clone();
        if heartbeats.last() != Some(&heartbeat) {
            heartbeats.push(heartbeat);
        }
        (heartbeats.len() >= 3).then_some(())
    });
    let sink = archive(&config).expect("status");
    assert_eq!(
        (sink["late_waiting"].as_i64(), sink["pending_rows"].as_i64()),
        (Some(0), Some(0)),
        "{sink}"
    );
    let parts_now = minute_zero_parts(&read_tree(&out));
    assert_eq!(parts_now, parts, "one late part, no more");
    assert_eq!(
        parts
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        [
            "e2e-20260102T0300-part-0000.ndjson",
            "e2e-20260102T0300-part-0001.ndjson"
        ]
    );
    assert_eq!(
        means(&parts[1].1),
        [111.0, 112.0, 113.0],
        "the three flushes' stragglers, together"
    );
    assert_eq!(means(&parts[0].1), [0.0, 10.0], "part-0000 untouched");
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn with_a_late_grace_of_zero_each_flush_of_stragglers_is_a_part_as_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, agent, config) = delivered_minutes(dir.path(), "late_grace = \"0s\"");
    let out = dir.path().join("out");
    for (n, second) in [(1, 11), (2, 12), (3, 13)] {
        server.push(straggler(second));
        wait_for("the straggler's own part", Duration::from_secs(30), || {
            (minute_zero_parts(&read_tree(&out)).len() == n + 1).then_some(())
        });
    }
    let parts = minute_zero_parts(&read_tree(&out));
    let late: Vec<(&str, Vec<f64>)> = parts[1..]
        .iter()
        .map(|(name, rows)| (name.as_str(), means(rows)))
        .collect();
    assert_eq!(
        late,
        [
            ("e2e-20260102T0300-part-0001.ndjson", vec![111.0]),
            ("e2e-20260102T0300-part-0002.ndjson", vec![112.0]),
            ("e2e-20260102T0300-part-0003.ndjson", vec![113.0]),
        ]
    );
    assert_eq!(
        archive(&config).expect("status")["late_waiting"],
        0,
        "nothing waits"
    );
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
}
