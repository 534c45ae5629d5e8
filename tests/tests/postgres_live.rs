//! PostgreSQL live: with `deliver = "each_flush"` (the default) the windows of each flush
//! are in the table long before their partition closes, and neither a crash between a
//! part's COMMIT and its record in the spool nor a `kill -9` mid-stream duplicates any: after the restart the table holds every spooled window once, the
//! same windows as an archive that waited for the partition.
//!
//! The agent samples a fake sysfs thermal zone every 250 ms on its own clock, in 5 s
//! windows and 2 min partitions (so that the archive, which gets closed partitions, is
//! the reference within the test's time).

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{
    Agent, PG_PASSWORD, PgServer, archive_sink, find_sink, pg_sink, read_tree, status_json,
    thermal_source, try_status_json, wait_for, write_pg_password,
};

const PARTITION_S: i64 = 120;

fn write_config(dir: &Path, pg: &PgServer) -> PathBuf {
    let password = write_pg_password(dir);
    let sinks = format!("{}{}", pg_sink(pg, "db", ""), archive_sink(dir))
        .replace("{password_file}", &password.display().to_string());
    let text = format!(
        "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"5s\"\npartition = \"2m\"\ngrace = \"0s\"\n\n{}\n{sinks}\n",
        dir.join("spool.db").display(),
        thermal_source(dir, "250ms"),
    );
    let path = dir.join("edgespool.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// Windows in the table whose partition has not ended yet (by the server's clock).
fn rows_of_open_partitions(pg: &PgServer) -> Option<u64> {
    pg.try_psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM edgespool_windows
             WHERE floor(extract(epoch FROM window_start) / {PARTITION_S}) =
                   floor(extract(epoch FROM now()) / {PARTITION_S})"
        ),
    )?
    .parse()
    .ok()
}

fn count(pg: &PgServer) -> u64 {
    pg.try_psql("postgres", "SELECT count(*) FROM edgespool_windows")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn windows_land_each_flush_and_a_kill_9_mid_stream_duplicates_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    let config = write_config(dir.path(), &pg);
    let log = dir.path().join("agent.log");

    // Killed right after its first part's COMMIT, before the spool recorded it.
    let mut crashed =
        Agent::start_with_env(&config, &log, &[("EDGESPOOL_FAILPOINT", "after-upload:db")]);
    wait_for(
        "the agent killed at the failpoint",
        Duration::from_secs(60),
        || (!crashed.is_running()).then_some(()),
    );
    drop(crashed);
    let first = count(&pg);
    assert!(first > 0, "the first flush's part was committed");
    let status = status_json(&config);
    assert_eq!(
        find_sink(&status, "db").expect("db")["delivered_parts"],
        0,
        "its delivery was not recorded: {status}"
    );
    let agent = Agent::start(&config, &log);
    wait_for("the part sent again", Duration::from_secs(30), || {
        agent.log_text().contains("(loaded before)").then_some(())
    });

    // Windows of the partition still open: only a per-flush delivery puts them there.
    let live = wait_for(
        "windows of the open partition in PostgreSQL",
        Duration::from_secs(60),
        || rows_of_open_partitions(&pg).filter(|&n| n >= 2),
    );
    assert!(live >= 2);
    let status = agent.status();
    let db = find_sink(&status, "db").expect("db");
    let archive = find_sink(&status, "archive").expect("archive");
    assert!(
        db["delivered_parts"].as_u64().unwrap_or(0) >= 1,
        "parts of the open partition: {status}"
    );
    assert!(
        archive["pending_rows"].as_u64().unwrap_or(0) >= live,
        "the archive waits for the partition; the spool keeps the rows for it: {status}"
    );

    // kill -9 mid-stream, as more flushes land.
    let before = count(&pg);
    wait_for("another flush loaded", Duration::from_secs(30), || {
        (count(&pg) > before).then_some(())
    });
    agent.kill9();
    let agent = Agent::start(&config, &log);
    // The reference: the archive, once it has the partition the restart happened in.
    let restarted = chrono::Utc::now().timestamp();
    let reference_end = (restarted / PARTITION_S + 1) * PARTITION_S;
    let archive_root = dir.path().join("archive");
    let cut = wait_for(
        "the archive has the partition of the restart",
        Duration::from_secs(PARTITION_S as u64 + 90),
        || archived_until(&archive_root).filter(|&end| end >= reference_end),
    );
    let status = wait_for("the database caught up", Duration::from_secs(30), || {
        let status = try_status_json(&config)?;
        let db = find_sink(&status, "db")?;
        (db["state"] == "ok" && db["pending_rows"] == 0).then_some(status)
    });
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
    let db = find_sink(&status, "db").expect("db");
    let archive = find_sink(&status, "archive").expect("archive");
    assert!(
        db["delivered_parts"].as_u64() > archive["delivered_parts"].as_u64(),
        "a part per flush against a part per partition: {status}"
    );
    assert_eq!(
        status["spool"]["rows"], archive["pending_rows"],
        "the spool keeps exactly what the archive still wants: {status}"
    );

    // Every window the archive has, the table has, once, with the same samples.
    let windows = |rows: Vec<String>| rows.join("\n");
    let mut archived: Vec<String> = read_tree(&archive_root)
        .iter()
        .flat_map(|f| &f.rows)
        .map(|row| {
            let start = chrono::DateTime::parse_from_rfc3339(
                row["window_start"].as_str().expect("window_start"),
            )
            .expect("RFC 3339")
            .timestamp();
            format!(
                "{}|{start}|{}",
                row["series"].as_str().expect("series"),
                row["count"].as_u64().expect("count")
            )
        })
        .collect();
    archived.sort();
    let loaded = pg.psql(
        "postgres",
        &format!(
            "SELECT series || '|' || extract(epoch FROM window_start)::bigint || '|' || count
             FROM edgespool_windows WHERE window_start < to_timestamp({cut}) ORDER BY 1"
        ),
    );
    let mut loaded: Vec<String> = loaded.lines().map(str::to_owned).collect();
    loaded.sort();
    assert!(archived.len() >= 2, "{archived:?}");
    assert_eq!(windows(loaded), windows(archived));
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) - count(DISTINCT partition_start) FROM edgespool_loads"
        ),
        "0",
        "one loads record per partition, however many flushes it took"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains(PG_PASSWORD));
}

/// The end (Unix seconds) of the newest partition the archive holds.
fn archived_until(root: &Path) -> Option<i64> {
    read_tree(root)
        .iter()
        .flat_map(|f| &f.rows)
        .filter_map(|row| {
            let start = row["window_start"].as_str()?;
            chrono::DateTime::parse_from_rfc3339(start)
                .ok()
                .map(|t| t.timestamp())
        })
        .map(|start| (start / PARTITION_S + 1) * PARTITION_S)
        .max()
}
