//! PostgreSQL end to end: the built binary against a real server started per test, the
//! table read back with psql.
//!
//! Rows come from an HTTP table source whose rows carry their own timestamps in January
//! 2026: their partitions close as soon as they are committed.

use std::io::Write;
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, PG_PASSWORD, PG_TOTALS_SQL, PgServer, T0, archive_sink, find_sink, minute,
    ndjson_count, ndjson_totals, pg_sink, pg_table_config, purpleair_body, read_tree, sink_status,
    status_json, wait_for, write_file,
};
use serde_json::Value;

/// Rows in the table; 0 before it exists.
fn count(pg: &PgServer) -> usize {
    pg.try_psql("postgres", "SELECT count(*) FROM edgespool_windows")
        .map_or(0, |n| n.parse().expect("a count"))
}

#[test]
fn partitions_load_once_through_an_outage_a_restart_mid_load_and_late_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pg = PgServer::start();
    let server = JsonServer::start((0..3).map(minute).collect(), purpleair_body(&[]));
    let sinks = format!("{}{}", pg_sink(&pg, "db", ""), archive_sink(dir.path()));
    let config = pg_table_config(dir.path(), &server.url, &sinks);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    wait_for("minutes 0-2 in PostgreSQL", Duration::from_secs(60), || {
        (count(&pg) == 12).then_some(())
    });
    let columns = pg.psql(
        "postgres",
        "SELECT column_name || ' ' || data_type FROM information_schema.columns
         WHERE table_name = 'edgespool_windows' ORDER BY ordinal_position",
    );
    assert!(
        columns.starts_with("device text\nseries text\nunit text\ntags jsonb\nwindow_start timestamp with time zone\nwindow_seconds integer\ncount bigint\nmin double precision"),
        "{columns}"
    );
    let key = pg.psql(
        "postgres",
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index
         WHERE indrelid = 'edgespool_windows'::regclass ORDER BY indisprimary DESC",
    );
    assert!(
        key.contains("(device, series, window_start)") && key.contains("(window_start)"),
        "{key}"
    );

    // The server goes down; minutes 3-5 arrive meanwhile and wait in the spool.
    pg.stop();
    for i in 3..6 {
        server.push(minute(i));
    }
    let status = wait_for(
        "the sink retrying with minutes 3-5 pending",
        Duration::from_secs(60),
        || {
            let status = agent.try_status()?;
            let db = find_sink(&status, "db")?;
            (db["state"] == "retrying" && db["pending_partitions"] == 3).then_some(status)
        },
    );
    let error = sink_status(&status, "db")["last_error"]
        .as_str()
        .expect("an error");
    assert!(
        error.starts_with(&format!(
            "db: postgres://127.0.0.1:{}/postgres: error connecting to server",
            pg.port
        )),
        "{error}"
    );
    wait_for("the archive not held back", Duration::from_secs(30), || {
        (ndjson_count(&read_tree(&dir.path().join("archive"))) == 6).then_some(())
    });
    pg.restart();
    wait_for("minutes 3-5 in PostgreSQL", Duration::from_secs(60), || {
        (count(&pg) == 24).then_some(())
    });

    // A restart in the middle of a load: a session holds a lock on the table, so the
    // agent's load of minute 6 waits inside its transaction; the server restarts then.
    let mut session = pg.session("postgres");
    let stdin = session.stdin.as_mut().expect("stdin");
    writeln!(
        stdin,
        "BEGIN; LOCK TABLE edgespool_windows IN ACCESS EXCLUSIVE MODE;"
    )
    .expect("lock");
    stdin.flush().expect("flush");
    server.push(minute(6));
    wait_for(
        "the load waiting for the lock",
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
    let loads_mid = pg.psql("postgres", "SELECT count(*) FROM edgespool_loads");
    pg.restart();
    let _ = session.kill();
    let _ = session.wait();
    assert_eq!(
        loads_mid, "6",
        "the waiting load's bookkeeping is not visible"
    );
    wait_for(
        "minute 6 loaded after the restart",
        Duration::from_secs(60),
        || (count(&pg) == 28).then_some(()),
    );

    // A straggler for a window already loaded is merged into its row, not dropped and
    // not duplicated. (Half a second into the window: one at T0 + 60 itself would repeat
    // minute 1's reading.)
    let at = (T0 + 60).to_string();
    let straggler = purpleair_body(&[(7, T0 + 60, 100.0, 0.0)]).replace(&at, &format!("{at}.5"));
    server.push(straggler);
    wait_for("the late part loaded", Duration::from_secs(30), || {
        let loads = pg.try_psql(
            "postgres",
            "SELECT count(*) FROM edgespool_loads WHERE part = 1",
        )?;
        (loads == "1").then_some(())
    });
    assert_eq!(count(&pg), 28, "merged, not added");
    let merged = pg.psql(
        "postgres",
        "SELECT count, min, max, mean, round(stdev::numeric, 6) FROM edgespool_windows
         WHERE series = 'pa.7.pm' AND window_start = '2026-01-02T03:01:00Z'",
    );
    assert_eq!(merged, "2|1|100|50.5|70.003571");

    wait_for("every sink caught up", Duration::from_secs(30), || {
        let status = agent.try_status()?;
        status["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .all(|s| s["pending_rows"] == 0)
            .then_some(())
    });
    agent.terminate();
    assert_eq!(
        pg.psql("postgres", PG_TOTALS_SQL),
        ndjson_totals(&dir.path().join("archive")),
        "PostgreSQL holds every sample the archive holds, once"
    );
    let log = std::fs::read_to_string(dir.path().join("agent.log")).expect("log");
    assert!(!log.contains(PG_PASSWORD), "the password never shows");
}

#[test]
fn a_crash_after_the_commit_and_kills_at_random_points_never_duplicate_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    let server = JsonServer::start(vec![minute(0)], purpleair_body(&[]));
    let sinks = format!("{}{}", pg_sink(&pg, "db", ""), archive_sink(dir.path()));
    let config = pg_table_config(dir.path(), &server.url, &sinks);
    let log = dir.path().join("agent.log");

    // Killed after the load committed, before the spool recorded it.
    let mut agent =
        Agent::start_with_env(&config, &log, &[("EDGESPOOL_FAILPOINT", "after-upload:db")]);
    wait_for(
        "the agent killed at the failpoint",
        Duration::from_secs(60),
        || (!agent.is_running()).then_some(()),
    );
    drop(agent);
    let loaded = count(&pg).to_string();
    let status = status_json(&config);
    let pending = |status: &Value| {
        status["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .map(|s| s["pending_partitions"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(
        sink_status(&status, "db")["pending_partitions"],
        1,
        "the delivery was not recorded: {status}"
    );

    // Restarts and kill -9 at varied instants while minutes 1-4 arrive.
    for i in 1..5 {
        server.push(minute(i));
        let agent = Agent::start(&config, &log);
        std::thread::sleep(Duration::from_millis(150 * i as u64));
        agent.kill9();
    }
    let agent = Agent::start(&config, &log);
    // kill -9 may lose the windows open in memory (a body served, not yet flushed): what
    // counts is that both sinks hold the same, spooled rows, each once.
    wait_for(
        "everything spooled delivered",
        Duration::from_secs(60),
        || {
            let status = agent.try_status()?;
            (server.exhausted() && pending(&status) == 0).then_some(())
        },
    );
    agent.terminate();
    assert_eq!(loaded, "4", "minute 0 was committed before the crash");
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
    let log = std::fs::read_to_string(&log).expect("log");
    assert!(
        log.contains("part 0 of 2026-01-02T03:00:00Z (loaded before)"),
        "the replay was recognised"
    );
}

#[test]
fn bad_connection_settings_give_clear_errors_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    let server = JsonServer::start(vec![minute(0)], purpleair_body(&[]));
    let wrong = write_file(dir.path(), "credentials/wrong", "not-the-password\n");
    // A table of that name made by someone else, with another shape.
    pg.psql(
        "postgres",
        "CREATE TABLE readings (device text, series text, window_start timestamptz, mean text)",
    );
    let sinks = [
        pg_sink(&pg, "other_table", "table = \"readings\""),
        pg_sink(&pg, "wrong_password", "").replace("{password_file}", &wrong.display().to_string()),
        pg_sink(&pg, "no_such_host", "").replace("127.0.0.1", "no-such-host.invalid"),
        pg_sink(&pg, "tls_required", "").replace("sslmode = \"disable\"", "sslmode = \"require\""),
        archive_sink(dir.path()),
    ]
    .concat();
    let config = pg_table_config(dir.path(), &server.url, &sinks);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let status = wait_for(
        "four sinks failing, the archive delivered",
        Duration::from_secs(60),
        || {
            let status = agent.try_status()?;
            let failing = [
                "wrong_password",
                "no_such_host",
                "tls_required",
                "other_table",
            ]
            .iter()
            .all(|name| {
                find_sink(&status, name)
                    .is_some_and(|s| s["state"] == "retrying" && s["pending_partitions"] == 1)
            });
            (failing && find_sink(&status, "archive")?["state"] == "ok").then_some(status)
        },
    );
    let error = |name: &str| {
        sink_status(&status, name)["last_error"]
            .as_str()
            .expect("error")
            .to_owned()
    };
    let port = pg.port;
    assert_eq!(
        error("wrong_password"),
        format!(
            "wrong_password: postgres://127.0.0.1:{port}/postgres: db error: FATAL: password authentication failed for user \"edgespool\""
        )
    );
    let unknown = error("no_such_host");
    assert!(
        unknown.starts_with(&format!(
            "no_such_host: postgres://no-such-host.invalid:{port}/postgres: error connecting to server: "
        )),
        "{unknown}"
    );
    assert_eq!(
        error("tls_required"),
        format!(
            "tls_required: postgres://127.0.0.1:{port}/postgres: error performing TLS handshake: server does not support TLS"
        )
    );
    assert_eq!(
        error("other_table"),
        format!(
            "other_table: postgres://127.0.0.1:{port}/postgres: table public.readings exists with another shape: \
             column unit is missing; column tags is missing; column window_seconds is missing; \
             column count is missing; column min is missing; column max is missing; \
             column mean is text, expected double precision; column stdev is missing; \
             column median is missing; column first is missing; column last is missing; \
             column loaded_at is missing"
        )
    );
    assert_eq!(
        pg.psql("postgres", "SELECT count(*) FROM readings"),
        "0",
        "the other table is left alone"
    );
    assert_eq!(sink_status(&status, "archive")["state"], "ok", "{status}");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT to_regclass('edgespool_windows') IS NULL"
        ),
        "t",
        "nothing was written"
    );
    agent.terminate();
}
