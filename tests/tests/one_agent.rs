//! One agent per spool, and a spool that stays the agent's: a second agent on the same
//! spool refuses to start and names the first one's pid; `kill -9` leaves no stale lock;
//! a spool file deleted under the running agent is put back with everything it held.

use std::collections::BTreeSet;
use std::time::Duration;

use edgespool_tests::two_sensors::{
    Refused, assert_each_window_once, two_sensors, two_sensors_config, wait_until_all_delivered,
};
use edgespool_tests::{
    Agent, JsonServer, edgespool, purpleair_body, read_tree, status_json, try_status_json, wait_for,
};

/// Each minute's windows came in one part: `part-0000`, none redone in a second part.
fn assert_one_part_per_partition(out: &std::path::Path) {
    let files = read_tree(out);
    let keys: Vec<&str> = files.iter().map(|f| f.key.as_str()).collect();
    assert!(
        keys.iter().all(|k| k.ends_with("-part-0000.ndjson")),
        "one part per partition: {keys:?}"
    );
}

#[test]
fn a_second_agent_on_the_same_spool_refuses_to_start_and_kill_9_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = JsonServer::start((0..10).map(two_sensors).collect(), purpleair_body(&[]));
    let config = two_sensors_config(dir.path(), &server.url);
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
    let mut second = Refused::start(&config, &stderr);
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
        server.push(two_sensors(i));
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
            let status = try_status_json(&config)?;
            let pid_now = status["daemon"]["pid"].as_u64()?;
            (pid_now != pid && status["daemon"]["state"] == "running").then_some(())
        },
    );
    for i in 20..30 {
        server.push(two_sensors(i));
    }
    wait_until_all_delivered(&server, &config);
    let exit = third.terminate();
    assert!(exit.success(), "{exit:?}");
    let minutes = assert_each_window_once(&out, &config);
    assert_one_part_per_partition(&out);
    // kill -9 may take the windows still open in memory, nothing committed: the minutes
    // delivered before it and every one after the restart are there.
    let expected: BTreeSet<i64> = (0..12).chain(20..30).collect();
    assert!(minutes.is_superset(&expected), "{minutes:?}");
}

#[test]
fn a_spool_deleted_under_the_running_agent_is_put_back_and_loses_no_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = JsonServer::start((0..10).map(two_sensors).collect(), purpleair_body(&[]));
    let config = two_sensors_config(dir.path(), &server.url);
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
        server.push(two_sensors(i));
    }
    let status = wait_for(
        "status to show the spool put back",
        Duration::from_secs(30),
        || {
            let status = try_status_json(&config)?;
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
    let exit = Refused::start(&config, &stderr).exit(Duration::from_secs(20));
    assert!(!exit.success(), "{exit:?}");
    let message = std::fs::read_to_string(&stderr).expect("stderr");
    assert!(
        message.contains("is in use by another edgespool"),
        "{message}"
    );

    for i in 20..30 {
        server.push(two_sensors(i));
    }
    wait_until_all_delivered(&server, &config);
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
    let minutes = assert_each_window_once(&out, &config);
    assert_one_part_per_partition(&out);
    assert_eq!(minutes, (0..30).collect(), "before and after the deletion");
    let after = status_json(&config);
    assert_eq!(after["daemon"]["state"], "stopped", "{after}");
}
