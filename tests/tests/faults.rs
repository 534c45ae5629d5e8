//! Reliability proofs: kill -9 at random instants, connections that fail at random on
//! the way to S3, PostgreSQL and the MQTT broker, and a day-long outage. Each ends with
//! the sinks holding every committed window exactly once, read back by DuckDB and psql.
//!
//! The loops run a reduced count by default (CI); `scripts/test.sh --long` runs the full
//! counts (`EDGESPOOL_FAULT_ROUNDS=full`). Every test prints its `EDGESPOOL_SEED`, which
//! replays its random choices.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::two_sensors::two_sensors;
use edgespool_tests::{
    Agent, COUNT_SUBSCRIPTION, Chaos, FaultProxy, JsonServer, MqttBroker, PG_PASSWORD,
    PG_TOTALS_SQL, PgServer, S3Server, T0, archive_sink, duckdb, fault_rounds, find_sink,
    ndjson_totals, pg_sink_at, purpleair_body, read_tree, s3_sink_at, settle, status_json,
    table_source, wait_for, write_agent_config, write_file,
};
use serde_json::Value;

/// The HTTP table source on `url`, `sources` more, and `sinks`; the secrets' files filled in.
fn write_config(dir: &Path, url: &str, sources: &str, sinks: &str) -> PathBuf {
    let password = write_file(dir, "credentials/pg", &format!("{PG_PASSWORD}\n"));
    let secret = write_file(dir, "credentials/s3", "test-secret\n");
    let sinks = sinks
        .replace("{password_file}", &password.display().to_string())
        .replace("{secret_file}", &secret.display().to_string());
    write_agent_config(
        dir,
        &format!(
            "{}\n{sources}\n{sinks}",
            table_source(url, &["pm", "Temperature"])
        ),
    )
}

/// Per series "series|samples|sum of mean × count" of the Parquet objects in the bucket,
/// formatted as [`ndjson_totals`] does; and the windows held more than once.
fn parquet_totals(s3: &S3Server, dir: &Path) -> (String, Vec<Vec<Value>>) {
    let lake = dir.join("lake");
    let _ = std::fs::remove_dir_all(&lake);
    s3.mirror("lake", &lake);
    let totals = duckdb(
        &lake,
        "SELECT series, sum(count)::BIGINT, sum(mean * count) FROM read_parquet('{root}/**/*.parquet')
         GROUP BY series ORDER BY series",
    );
    let text = totals
        .iter()
        .map(|r| {
            let sum = r[2].as_f64().expect("sum");
            format!("{}|{}|{sum}", r[0].as_str().expect("series"), r[1])
        })
        .collect::<Vec<_>>()
        .join("\n");
    let twice = duckdb(
        &lake,
        "SELECT series, window_start, count(*) FROM read_parquet('{root}/**/*.parquet')
         GROUP BY ALL HAVING count(*) > 1",
    );
    (text, twice)
}

/// Windows the archive holds more than once.
fn archive_twice(dir: &Path) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    read_tree(&dir.join("archive"))
        .iter()
        .flat_map(|f| &f.rows)
        .map(|r| format!("{} {}", r["series"], r["window_start"]))
        .filter(|key| !seen.insert(key.clone()))
        .collect()
}

const PG_TWICE_SQL: &str = "SELECT count(*) FROM (SELECT 1 FROM edgespool_windows
                            GROUP BY device, series, window_start HAVING count(*) > 1) d";

/// The archive, the bucket and the table hold the same windows, each once, and as many
/// samples as the spool committed.
fn assert_exactly_once(dir: &Path, config: &Path, s3: &S3Server, pg: &PgServer) -> String {
    assert_eq!(
        archive_twice(dir),
        Vec::<String>::new(),
        "archive duplicates"
    );
    let archive = ndjson_totals(&dir.join("archive"));
    let (parquet, twice) = parquet_totals(s3, dir);
    assert_eq!(twice, Vec::<Vec<Value>>::new(), "bucket duplicates");
    assert_eq!(parquet, archive, "the bucket holds what the archive holds");
    assert_eq!(pg.psql("postgres", PG_TWICE_SQL), "0", "table duplicates");
    assert_eq!(pg.psql("postgres", PG_TOTALS_SQL), archive, "the table too");
    let status = status_json(config);
    let archived: u64 = archive
        .lines()
        .map(|l| {
            l.split('|')
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .expect("n")
        })
        .sum();
    assert_eq!(
        Some(archived),
        status["counters"]["samples"].as_u64(),
        "every committed sample, once: {status}"
    );
    archive
}

/// kill -9 at random instants while the agent samples and uploads to a folder, S3 and
/// PostgreSQL; then a clean run. Nothing committed is lost or delivered twice.
#[test]
fn kill_9_at_random_instants_loses_and_duplicates_nothing() {
    let kills = fault_rounds(10, 50);
    let mut chaos = Chaos::new("kill_9_at_random_instants");
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&dir.path().join("s3.log"));
    s3.create_bucket("lake");
    let pg = PgServer::start();
    let minutes = (kills as i64 * 8).max(60);
    let server = JsonServer::start((0..minutes).map(two_sensors).collect(), purpleair_body(&[]));
    let sinks = format!(
        "{}{}{}",
        archive_sink(dir.path()),
        s3_sink_at(&s3.endpoint, "lake", ""),
        pg_sink_at(pg.port, "db", "")
    );
    let config = write_config(dir.path(), &server.url, "", &sinks);
    let log = dir.path().join("agent.log");
    for _ in 0..kills {
        let agent = Agent::start(&config, &log);
        // The random instant itself: from start-up to well into sampling and uploading.
        std::thread::sleep(Duration::from_millis(chaos.between(50, 2_500)));
        agent.kill9();
    }
    let agent = Agent::start(&config, &log);
    settle(agent, Duration::from_secs(180), || server.exhausted());
    let totals = assert_exactly_once(dir.path(), &config, &s3, &pg);
    assert!(totals.contains("pa.1.pm|"), "{totals}");
    // A kill in the first instants can come before start-up is done (more often on a
    // busy machine), so not every run logs its start; most must, or the kills proved
    // nothing.
    let log = std::fs::read_to_string(&log).expect("log");
    let started = log.matches("edgespool started").count();
    assert!(
        started > kills / 2 && started <= kills + 1,
        "most runs started: {started} of {}",
        kills + 1
    );
}

/// Connections to S3, PostgreSQL and the broker dropped, stalled, cut and reset at random
/// (S3 also answered 503) while data flows; once the network calms down, every window is
/// in every sink once and every QoS 1 message was counted once.
#[test]
fn faulty_connections_to_every_server_lose_and_duplicate_nothing() {
    let batches = fault_rounds(6, 30);
    let mut chaos = Chaos::new("faulty_connections");
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&dir.path().join("s3.log"));
    s3.create_bucket("lake");
    let pg = PgServer::start();
    let broker = MqttBroker::start();
    let s3_proxy = FaultProxy::start(s3.port(), true, chaos.next_u64());
    let pg_proxy = FaultProxy::start(pg.port, false, chaos.next_u64());
    let mqtt_proxy = FaultProxy::start(broker.port, false, chaos.next_u64());
    let minutes = batches as i64 * 5;
    let server = JsonServer::start((0..minutes).map(two_sensors).collect(), purpleair_body(&[]));
    let mqtt = format!(
        r#"
[[sources]]
kind = "mqtt"
name = "mqtt"
url = "mqtt://127.0.0.1:{port}"
client_id = "edgespool-faults"
keep_alive = "5s"
{count}"#,
        port = mqtt_proxy.port,
        count = COUNT_SUBSCRIPTION,
    );
    let sinks = format!(
        "{}{}{}",
        archive_sink(dir.path()),
        s3_sink_at(&format!("http://127.0.0.1:{}", s3_proxy.port), "lake", ""),
        pg_sink_at(pg_proxy.port, "db", "")
    );
    let config = write_config(dir.path(), &server.url, &mqtt, &sinks);
    let log = dir.path().join("agent.log");
    let agent = Agent::start(&config, &log);
    wait_for(
        "the MQTT source subscribed",
        Duration::from_secs(60),
        || {
            agent
                .log_text()
                .contains("subscribed at the MQTT broker source=mqtt")
                .then_some(())
        },
    );

    // Counting messages, stamped an hour after T0, one batch at a time while the proxies
    // misbehave.
    let per_batch = 40;
    for batch in 0..batches {
        let messages: Vec<String> = (0..per_batch)
            .map(|i| {
                let t = T0 + 3600 + (batch * per_batch + i) as i64;
                format!("{{\"t\":{t},\"v\":1}}")
            })
            .collect();
        let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
        broker.publish("count/a", 1, &refs);
        std::thread::sleep(Duration::from_millis(chaos.between(500, 3_000)));
    }
    for proxy in [&s3_proxy, &pg_proxy, &mqtt_proxy] {
        assert!(proxy.faults() > 0, "the proxy harmed no connection");
        proxy.calm();
    }
    let published = (batches * per_batch) as u64;
    let counted = |dir: &Path| -> u64 {
        read_tree(&dir.join("archive"))
            .iter()
            .flat_map(|f| &f.rows)
            .filter(|r| r["series"] == "mqtt.count.a.v")
            .map(|r| r["count"].as_u64().expect("count"))
            .sum()
    };
    settle(agent, Duration::from_secs(240), || {
        server.exhausted() && counted(dir.path()) >= published
    });
    let totals = assert_exactly_once(dir.path(), &config, &s3, &pg);
    assert!(
        totals.contains(&format!("mqtt.count.a.v|{published}|{published}")),
        "every QoS 1 message counted once: {totals}"
    );
    eprintln!(
        "faults injected: s3 {}, postgres {}, mqtt {}",
        s3_proxy.faults(),
        pg_proxy.faults(),
        mqtt_proxy.faults()
    );
}

/// A sink away for a (simulated) day: samples stamped across 24 hourly partitions pile
/// up in the spool, and all of them arrive, oldest first, once it is back.
#[test]
fn a_day_long_outage_is_delivered_completely_once_the_sink_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s3 = S3Server::start(&dir.path().join("s3.log"));
    s3.create_bucket("lake");
    s3.stop();
    // Four readings an hour for 24 hours, ten sensors each.
    let bodies: Vec<String> = (0..96)
        .map(|q: i64| {
            let at = T0 + q * 900;
            let rows: Vec<(u32, i64, f64, f64)> =
                (1..=10).map(|id| (id, at, q as f64, id as f64)).collect();
            purpleair_body(&rows)
        })
        .collect();
    let server = JsonServer::start(bodies, purpleair_body(&[]));
    let sinks = s3_sink_at(&s3.endpoint, "lake", "");
    let text = format!(
        "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"60s\"\npartition = \"1h\"\ngrace = \"0s\"\n{}\n[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{}\"\nlate_grace = \"0s\"\n{}",
        dir.path().join("spool.db").display(),
        table_source(&server.url, &["pm", "Temperature"]),
        dir.path().join("archive").display(),
        sinks.replace(
            "{secret_file}",
            &write_file(dir.path(), "credentials/s3", "x\n")
                .display()
                .to_string()
        )
    );
    let config = dir.path().join("edgespool.toml");
    std::fs::write(&config, text).expect("write config");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let waiting = wait_for("24 partitions waiting", Duration::from_secs(120), || {
        let status = agent.try_status()?;
        let lake = find_sink(&status, "lake")?.clone();
        (server.exhausted() && lake["pending_partitions"] == 24 && lake["state"] == "retrying")
            .then_some(lake)
    });
    assert_eq!(waiting["pending_rows"], 96 * 10 * 2, "{waiting}");
    assert_eq!(waiting["oldest_pending"], "2026-01-02T03:00:00Z");
    s3.restart();
    s3.create_bucket("lake");
    settle(agent, Duration::from_secs(120), || true);
    let objects = s3.list("lake");
    let hours: Vec<&str> = objects
        .iter()
        .map(|o| o.key.as_str())
        .filter(|k| k.ends_with("-part-0000.parquet"))
        .collect();
    assert_eq!(hours.len(), 24, "{hours:?}");
    assert_eq!(objects.len(), 24, "no second parts: {objects:?}");
    let (parquet, twice) = parquet_totals(&s3, dir.path());
    assert!(twice.is_empty(), "{twice:?}");
    assert_eq!(parquet, ndjson_totals(&dir.path().join("archive")));
}
