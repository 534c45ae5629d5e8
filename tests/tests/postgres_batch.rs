//! PostgreSQL end to end: a backlog of closed partitions goes in one transaction (a part
//! per partition, each recorded in the loads table inside it), and a kill -9 after its
//! COMMIT or inside it neither duplicates nor loses a row.
//!
//! One poll of the HTTP table source serves six sensors whose rows carry times in six
//! different minutes of January 2026: one flush commits six closed partitions (of one
//! minute each), and the sink's next plan holds all six.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, PG_PASSWORD, PG_TOTALS_SQL, PgServer, T0, archive_sink, find_sink,
    ndjson_totals, pg_sink, pg_table_config, purpleair_body, sink_status, status_json, wait_for,
};
use serde_json::Value;

/// Sensors 1-6, sensor `i` read in minute `first + i - 1`: six partitions in one body.
fn backlog(first: i64) -> String {
    let rows: Vec<(u32, i64, f64, f64)> = (1..=6)
        .map(|i| {
            (
                i as u32,
                T0 + (first + i - 1) * 60 + 5,
                i as f64,
                20.0 + i as f64,
            )
        })
        .collect();
    purpleair_body(&rows)
}

/// The table source polling `url`, a `postgres` sink `db` on `pg` and the archive.
fn write_config(dir: &Path, url: &str, pg: &PgServer) -> PathBuf {
    let sinks = format!("{}{}", pg_sink(pg, "db", ""), archive_sink(dir));
    pg_table_config(dir, url, &sinks)
}

/// `SELECT count(*), count(DISTINCT xmin)` of a table: its rows, and the transactions
/// that wrote them.
fn rows_and_transactions(pg: &PgServer, table: &str) -> String {
    pg.psql(
        "postgres",
        &format!("SELECT count(*) || ' ' || count(DISTINCT xmin::text) FROM {table}"),
    )
}

/// The COPY statements into the table the server logged (see [`PgServer::log_statements`]).
fn copies(pg: &PgServer) -> usize {
    pg.log()
        .lines()
        .filter(|l| l.contains("COPY \"public\".\"edgespool_windows\""))
        .count()
}

fn pending(status: &Value) -> u64 {
    status["sinks"]
        .as_array()
        .expect("sinks")
        .iter()
        .map(|s| s["pending_partitions"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn a_backlog_goes_in_one_transaction_and_a_crash_after_its_commit_loads_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    pg.log_statements();
    let server = JsonServer::start(vec![backlog(0)], purpleair_body(&[]));
    let config = write_config(dir.path(), &server.url, &pg);
    let log = dir.path().join("agent.log");

    // Killed after the COMMIT of the six parts, before the spool recorded them.
    let mut agent =
        Agent::start_with_env(&config, &log, &[("EDGESPOOL_FAILPOINT", "after-upload:db")]);
    wait_for(
        "the agent killed at the failpoint",
        Duration::from_secs(60),
        || (!agent.is_running()).then_some(()),
    );
    drop(agent);
    assert_eq!(
        rows_and_transactions(&pg, "edgespool_windows"),
        "12 1",
        "six partitions of two series, in one transaction"
    );
    assert_eq!(
        rows_and_transactions(&pg, "edgespool_loads"),
        "6 1",
        "each part recorded, inside that transaction"
    );
    assert_eq!(copies(&pg), 1, "the six parts in one COPY: {}", pg.log());
    let recorded = pg.psql(
        "postgres",
        "SELECT count(*) FROM edgespool_loads l JOIN edgespool_windows w
         ON w.xmin::text = l.xmin::text",
    );
    assert_eq!(
        recorded, "72",
        "the loads rows and the data rows share their transaction"
    );
    let status = status_json(&config);
    assert_eq!(
        sink_status(&status, "db")["pending_partitions"],
        6,
        "the deliveries were not recorded: {status}"
    );

    // The restart sends the six parts again: each was loaded before, nothing goes twice.
    let agent = Agent::start(&config, &log);
    wait_for("everything delivered", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        (pending(&status) == 0 && find_sink(&status, "db")?["pending_rows"] == 0).then_some(())
    });
    agent.terminate();
    assert_eq!(rows_and_transactions(&pg, "edgespool_windows"), "12 1");
    assert_eq!(rows_and_transactions(&pg, "edgespool_loads"), "6 1");
    assert_eq!(copies(&pg), 1, "a replay of loaded parts makes no COPY");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT string_agg(rows::text, ',' ORDER BY partition_start) FROM edgespool_loads"
        ),
        "2,2,2,2,2,2"
    );
    assert_eq!(
        pg.psql("postgres", PG_TOTALS_SQL),
        ndjson_totals(&dir.path().join("archive")),
        "PostgreSQL holds every window the archive holds, once"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains(
            "edgespool_windows\" 6 parts of 2026-01-02T03:00:00Z to 2026-01-02T03:05:00Z (loaded before)"
        ),
        "the replay was recognised: {text}"
    );
    assert!(!text.contains(PG_PASSWORD), "the password never shows");
}

#[test]
fn a_kill_inside_the_transaction_of_a_backlog_loses_none_of_its_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    // Minute 0 first (the table made, one part), the backlog of minutes 1-6 later.
    let server = JsonServer::start(
        vec![purpleair_body(&[(9, T0 + 5, 1.0, 20.0)])],
        purpleair_body(&[]),
    );
    let config = write_config(dir.path(), &server.url, &pg);
    let log = dir.path().join("agent.log");
    let agent = Agent::start(&config, &log);
    wait_for("minute 0 loaded", Duration::from_secs(60), || {
        (pg.try_psql("postgres", "SELECT count(*) FROM edgespool_loads")? == "1").then_some(())
    });

    // A session holds a lock on the table: the backlog's COPY waits inside its
    // transaction, after the six loads rows went in; the agent dies there.
    let mut session = pg.session("postgres");
    let stdin = session.stdin.as_mut().expect("stdin");
    writeln!(
        stdin,
        "BEGIN; LOCK TABLE edgespool_windows IN ACCESS EXCLUSIVE MODE;"
    )
    .expect("lock");
    stdin.flush().expect("flush");
    wait_for("the lock held", Duration::from_secs(30), || {
        let held = pg.try_psql(
            "postgres",
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
             WHERE c.relname = 'edgespool_windows' AND l.mode = 'AccessExclusiveLock' AND l.granted",
        )?;
        (held == "1").then_some(())
    });
    server.push(backlog(1));
    wait_for(
        "the backlog's load waiting for the lock",
        Duration::from_secs(30),
        || {
            let waiting = pg.try_psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'edgespool' AND wait_event_type = 'Lock'",
            )?;
            (waiting == "1").then_some(())
        },
    );
    agent.kill9();
    writeln!(stdin, "ROLLBACK;").expect("unlock");
    stdin.flush().expect("flush");
    drop(session.stdin.take());
    let _ = session.wait();
    wait_for(
        "the killed agent's transaction rolled back",
        Duration::from_secs(30),
        || {
            let left = pg.try_psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edgespool'",
            )?;
            (left == "0").then_some(())
        },
    );
    assert_eq!(rows_and_transactions(&pg, "edgespool_windows"), "2 1");
    assert_eq!(
        rows_and_transactions(&pg, "edgespool_loads"),
        "1 1",
        "the backlog's loads rows went with its transaction"
    );

    let agent = Agent::start(&config, &log);
    wait_for("everything delivered", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        (server.exhausted() && pending(&status) == 0).then_some(())
    });
    agent.terminate();
    assert_eq!(
        rows_and_transactions(&pg, "edgespool_windows"),
        "14 2",
        "minute 0, then the six minutes of the backlog in one transaction"
    );
    assert_eq!(rows_and_transactions(&pg, "edgespool_loads"), "7 2");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM (SELECT 1 FROM edgespool_windows
             GROUP BY device, series, window_start HAVING count(*) > 1) d"
        ),
        "0"
    );
    assert_eq!(
        pg.psql("postgres", PG_TOTALS_SQL),
        ndjson_totals(&dir.path().join("archive"))
    );
}
