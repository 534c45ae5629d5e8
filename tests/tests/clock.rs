//! The wall clock: jumps back and forth, and a Pi that boots a day behind until NTP
//! answers. The agent runs under libfaketime (its wall clock read from a file the test
//! rewrites; the monotonic clock untouched); the output is read back from a local folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{Agent, out_sink, read_tree, status_json, thermal_source, wait_for};
use serde_json::Value;

/// libfaketime, which scripts/test.sh installs (Debian's `faketime`).
fn libfaketime() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|dir| Path::new(dir).join("faketime/libfaketime.so.1"))
    .find(|p| p.exists())
    .expect("libfaketime (apt install faketime; scripts/test.sh does)")
}

/// A sysfs source sampled every 200 ms, 1 s windows, a local folder; `agent` adds keys.
fn config(dir: &Path, agent: &str) -> PathBuf {
    let text = format!(
        "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"1s\"\npartition = \"1m\"\ngrace = \"0s\"\n{agent}\n\n{}\n{}",
        dir.join("spool.db").display(),
        thermal_source(dir, "200ms"),
        out_sink(dir)
    );
    let path = dir.join("edgespool.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Sets the agent's clock offset ("+0", "-20s", "-1d") in one step: libfaketime reads
/// the file at every clock reading, and must never see it half-written.
fn set_offset(file: &Path, offset: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, format!("{offset}\n")).expect("write the offset");
    std::fs::rename(&next, file).expect("rename the offset");
}

/// Starts the agent with its wall clock offset by what `offset_file` says ("+0", "-20s").
fn start(config: &Path, dir: &Path, offset_file: &Path, extra: &[(&str, &str)]) -> Agent {
    let preload = libfaketime();
    let mut env = vec![
        ("LD_PRELOAD", preload.to_str().expect("utf-8")),
        (
            "FAKETIME_TIMESTAMP_FILE",
            offset_file.to_str().expect("utf-8"),
        ),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    env.extend_from_slice(extra);
    Agent::start_with_env(config, &dir.join("agent.log"), &env)
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

fn seconds(text: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text.as_str().expect("a time"))
        .expect("RFC 3339")
        .timestamp()
}

/// The windows of `board.cpu` in the folder: (start, count), sorted.
fn windows(dir: &Path) -> Vec<(i64, u64)> {
    let mut rows: Vec<(i64, u64)> = read_tree(&dir.join("out"))
        .iter()
        .flat_map(|f| &f.rows)
        .filter(|r| r["series"] == "board.cpu")
        .map(|r| {
            (
                seconds(&r["window_start"]),
                r["count"].as_u64().expect("count"),
            )
        })
        .collect();
    rows.sort_unstable();
    rows
}

/// Waits for `n` more flushes (heartbeats) of the agent.
fn flushes(agent: &Agent, n: usize) {
    let mut seen: Vec<Value> = Vec::new();
    wait_for("flushes", Duration::from_secs(30), || {
        let heartbeat = agent.try_status()?["daemon"]["heartbeat"].clone();
        if seen.last() != Some(&heartbeat) {
            seen.push(heartbeat);
        }
        (seen.len() > n).then_some(())
    });
}

/// The clock goes back 20 s, then forward 2 min: no window is written twice, no sample
/// is lost, and `status` tells of both jumps.
#[test]
fn a_clock_jump_back_and_forth_writes_no_window_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), "");
    let offset = dir.path().join("faketime");
    set_offset(&offset, "+0");
    let agent = start(&config, dir.path(), &offset, &[]);
    wait_for("the spool", Duration::from_secs(30), || {
        dir.path().join("spool.db").exists().then_some(())
    });
    flushes(&agent, 3);
    set_offset(&offset, "-20s");
    wait_for("the jump back seen", Duration::from_secs(30), || {
        let jump = agent.try_status()?["clock"]["last_jump_seconds"].as_f64();
        jump.filter(|s| (s + 20.0).abs() < 1.0).map(|_| ())
    });
    flushes(&agent, 4);
    set_offset(&offset, "+120s");
    wait_for("the jump forward seen", Duration::from_secs(30), || {
        let jump = agent.try_status()?["clock"]["last_jump_seconds"].as_f64();
        jump.filter(|s| (s - 140.0).abs() < 1.0).map(|_| ())
    });
    flushes(&agent, 3);
    let status = agent.status();
    assert_eq!(status["clock"]["jumps"], 2, "{status}");
    let clamped = status["counters"]["clamped_samples"].as_u64().expect("n");
    assert!(
        clamped > 0,
        "samples after the jump back moved on: {status}"
    );
    // Every partition before the jump forward is closed now: delivered.
    let before = now_s() + 100;
    let delivered = wait_for(
        "the partitions before the jump",
        Duration::from_secs(60),
        || {
            let rows = windows(dir.path());
            rows.last()
                .is_some_and(|&(start, _)| start > before - 160)
                .then_some(rows)
        },
    );
    assert_eq!(agent.terminate().code(), Some(0));
    let mut starts: Vec<i64> = delivered.iter().map(|&(s, _)| s).collect();
    starts.dedup();
    assert_eq!(
        starts.len(),
        delivered.len(),
        "a window written twice: {delivered:?}"
    );
    // The jump back made one longer window (the clamped samples), never a second row.
    assert!(
        delivered.iter().any(|&(_, count)| count > 6),
        "the clamped samples are in a window: {delivered:?}"
    );
}

/// A Pi without a real-time clock boots a day behind; systemd-timesyncd has not
/// synchronised yet. The agent holds what it samples, and once the clock is right it
/// stamps those samples by when they were really taken: nothing lands a day off.
#[test]
fn samples_held_until_the_clock_is_synchronised_get_the_right_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), "clock_wait = \"10m\"");
    let offset = dir.path().join("faketime");
    set_offset(&offset, "-1d");
    let timesync = dir.path().join("timesync");
    std::fs::create_dir_all(&timesync).expect("mkdir");
    let timesync_env = timesync.display().to_string();
    let agent = start(
        &config,
        dir.path(),
        &offset,
        &[("EDGESPOOL_TIMESYNC_DIR", &timesync_env)],
    );
    wait_for("the spool", Duration::from_secs(30), || {
        dir.path().join("spool.db").exists().then_some(())
    });
    let waiting = wait_for("samples held", Duration::from_secs(30), || {
        let status = agent.try_status()?;
        (status["clock"]["state"] == "waiting"
            && status["clock"]["held_samples"].as_u64() >= Some(15))
        .then_some(status)
    });
    let text = edgespool_tests::edgespool(&["status", "--config", &config.display().to_string()]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("clock     waiting since"),
        "{waiting}"
    );
    // NTP answers: the clock is stepped to the right time and timesyncd says so.
    let synced_at = now_s();
    set_offset(&offset, "+0");
    std::fs::write(timesync.join("synchronized"), "").expect("touch");
    wait_for("synchronised", Duration::from_secs(30), || {
        let status = agent.try_status()?;
        (status["clock"]["state"] == "synchronised" && status["clock"]["held_samples"] == 0)
            .then_some(())
    });
    let rows = wait_for(
        "the held samples delivered",
        Duration::from_secs(120),
        || {
            let rows = windows(dir.path());
            rows.iter()
                .any(|&(start, _)| start > synced_at + 1)
                .then_some(rows)
        },
    );
    assert_eq!(agent.terminate().code(), Some(0));
    let day_ago = synced_at - 86_400;
    assert!(
        rows.iter().all(|&(start, _)| start > day_ago + 3600),
        "nothing stamped a day off: {rows:?}"
    );
    // Samples taken while the clock was wrong sit in windows before the sync, at the
    // times they were taken (at 5 a second: 15 samples span 3 s or more).
    let before: u64 = rows
        .iter()
        .filter(|&&(start, _)| start < synced_at)
        .map(|&(_, count)| count)
        .sum();
    assert!(before >= 15, "held samples kept their own times: {rows:?}");
    let status = status_json(&config);
    assert_eq!(status["counters"]["held_dropped_samples"], 0);
}
