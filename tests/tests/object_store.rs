//! Object storage end to end: the built binary against a real S3-compatible server
//! (moto), with the objects listed and read back by boto3 and DuckDB.
//!
//! Rows come from an HTTP table source whose rows carry their own timestamps in January
//! 2026: their partitions are closed as soon as they are committed, so a test makes a
//! backlog of several partitions in seconds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, S3Object, S3Server, T0, duckdb, find_sink, minute, ndjson_count,
    purpleair_body, read_tree, s3_sink, sink_status, status_json, table_source, wait_for,
    write_agent_config, write_file,
};
use serde_json::Value;

/// The access key every test sink uses; the point is that it never shows.
const SECRET: &str = "s3cr3t-never-logged";

/// A configuration with the HTTP table source `pa` polling `url` and the given sinks.
fn write_config(dir: &Path, url: &str, sinks: &str) -> PathBuf {
    let secret = write_file(dir, "credentials/s3-secret", &format!("{SECRET}\n"));
    let sinks = sinks.replace("{secret_file}", &secret.display().to_string());
    write_agent_config(
        dir,
        &format!("{}\n{sinks}", table_source(url, &["pm", "Temperature"])),
    )
}

fn keys_under<'a>(objects: &'a [S3Object], prefix: &str) -> Vec<&'a str> {
    objects
        .iter()
        .map(|o| o.key.as_str())
        .filter(|k| k.starts_with(prefix))
        .collect()
}

/// The key of part `part` of minute `i`'s partition under `prefix` ("" for none).
fn key(prefix: &str, i: i64, part: u32, ext: &str) -> String {
    let lead = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    format!(
        "{lead}device=e2e/year=2026/month=1/day=2/hour=3/e2e-20260102T03{i:02}-part-{part:04}.{ext}"
    )
}

#[test]
fn an_outage_of_the_store_delays_nothing_else_and_every_partition_lands_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s3 = S3Server::start(&dir.path().join("s3.log"));
    s3.create_bucket("lake");
    let server = JsonServer::start((0..3).map(minute).collect(), purpleair_body(&[]));
    let archive = dir.path().join("archive");
    let sinks = [
        s3_sink(&s3, "lake", "prefix = \"parquet\""),
        s3_sink(&s3, "table", "prefix = \"csv\"\nformat = \"csv\""),
        s3_sink(
            &s3,
            "wide",
            "prefix = \"wide\"\nformat = \"ndjson\"\nlayout = \"wide\"",
        ),
        format!(
            "[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{}\"\nlate_grace = \"0s\"\n",
            archive.display()
        ),
    ]
    .concat();
    let config = write_config(dir.path(), &server.url, &sinks);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    // Minutes 0-2 go up while the store is there.
    let before = wait_for("minutes 0-2 in the bucket", Duration::from_secs(60), || {
        let objects = s3.try_list("lake")?;
        (objects.len() == 9).then_some(objects)
    });
    for (prefix, ext) in [("parquet", "parquet"), ("csv", "csv"), ("wide", "ndjson")] {
        let expected: Vec<String> = (0..3).map(|i| key(prefix, i, 0, ext)).collect();
        assert_eq!(keys_under(&before, prefix), expected);
    }
    let content_types: Vec<(&str, &str)> = before
        .iter()
        .filter(|o| o.key.contains("T0300"))
        .map(|o| (o.key.as_str(), o.content_type.as_str()))
        .collect();
    assert_eq!(
        content_types,
        [
            (
                key("csv", 0, 0, "csv").as_str(),
                "text/csv; charset=utf-8; header=present"
            ),
            (
                key("parquet", 0, 0, "parquet").as_str(),
                "application/vnd.apache.parquet"
            ),
            (key("wide", 0, 0, "ndjson").as_str(), "application/x-ndjson"),
        ]
    );
    let lake = dir.path().join("lake");
    s3.mirror("lake", &lake);

    // The store goes away; minutes 3-5 arrive meanwhile.
    s3.stop();
    for i in 3..6 {
        server.push(minute(i));
    }
    let status = wait_for(
        "the bucket sinks retrying with minutes 3-5 pending",
        Duration::from_secs(60),
        || {
            let status = agent.try_status()?;
            ["lake", "table", "wide"]
                .iter()
                .all(|name| {
                    find_sink(&status, name)
                        .is_some_and(|s| s["state"] == "retrying" && s["pending_partitions"] == 3)
                })
                .then_some(status)
        },
    );
    let lake_sink = sink_status(&status, "lake");
    assert!(lake_sink["retrying_since"].is_string(), "{lake_sink}");
    let error = lake_sink["last_error"].as_str().expect("a last error");
    assert!(
        error.starts_with(&format!(
            "lake: cannot write {}: ",
            key("parquet", 3, 0, "parquet")
        )),
        "the oldest pending part is retried first: {error}"
    );
    // The local archive is not held back by the bucket.
    wait_for(
        "minutes 0-5 in the archive",
        Duration::from_secs(30),
        || (ndjson_count(&read_tree(&archive)) == 6).then_some(()),
    );
    assert_eq!(sink_status(&agent.status(), "archive")["state"], "ok");

    // The store comes back, empty (moto keeps objects in memory): what reaches it now is
    // exactly what was pending, nothing that was delivered before the outage.
    s3.restart();
    s3.create_bucket("lake");
    let after = wait_for("minutes 3-5 in the bucket", Duration::from_secs(60), || {
        let objects = s3.try_list("lake")?;
        (objects.len() == 9).then_some(objects)
    });
    for (prefix, ext) in [("parquet", "parquet"), ("csv", "csv"), ("wide", "ndjson")] {
        let expected: Vec<String> = (3..6).map(|i| key(prefix, i, 0, ext)).collect();
        assert_eq!(
            keys_under(&after, prefix),
            expected,
            "each pending partition once"
        );
    }

    // Late rows for minute 1 go to its next part, never over part-0000.
    server.push(purpleair_body(&[(7, T0 + 60 + 15, 100.0, 0.0)]));
    let late = wait_for("the late part of minute 1", Duration::from_secs(30), || {
        let objects = s3.try_list("lake")?;
        (objects.len() == 12).then_some(objects)
    });
    assert!(
        keys_under(&late, "parquet").contains(&key("parquet", 1, 1, "parquet").as_str()),
        "{late:?}"
    );
    let status = wait_for("every sink caught up", Duration::from_secs(30), || {
        let status = agent.try_status()?;
        status["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .all(|s| s["state"] == "ok" && s["pending_rows"] == 0)
            .then_some(status)
    });
    s3.mirror("lake", &lake);
    agent.terminate();

    // The secret never shows: not in the log, not in status.
    let log = std::fs::read_to_string(dir.path().join("agent.log")).expect("log");
    assert!(!log.contains(SECRET) && !status.to_string().contains(SECRET));

    // Read everything back with DuckDB and compare with the archive's NDJSON.
    let mut expected: Vec<(String, String, u64, f64)> = read_tree(&archive)
        .iter()
        .flat_map(|f| &f.rows)
        .map(|r| {
            (
                r["series"].as_str().expect("series").to_owned(),
                r["window_start"].as_str().expect("start").to_owned(),
                r["count"].as_u64().expect("count"),
                r["mean"].as_f64().expect("mean"),
            )
        })
        .collect();
    expected.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        expected.len(),
        6 * 4 + 2,
        "six minutes of two sensors with two columns, and two late rows"
    );
    let as_tuples = |rows: Vec<Vec<Value>>| -> Vec<(String, String, u64, f64)> {
        rows.into_iter()
            .map(|r| {
                (
                    r[0].as_str().expect("series").to_owned(),
                    r[1].as_str().expect("start").to_owned(),
                    r[2].as_u64().expect("count"),
                    r[3].as_f64().expect("mean"),
                )
            })
            .collect()
    };
    let parquet = duckdb(
        &lake,
        "SELECT series, strftime(window_start AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ'), count, mean
         FROM read_parquet('{root}/parquet/**/*.parquet', hive_partitioning = true)
         ORDER BY series, window_start",
    );
    assert_eq!(
        as_tuples(parquet),
        expected,
        "Parquet holds what the archive holds"
    );
    let csv = duckdb(
        &lake,
        "SELECT series, strftime(window_start AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ'), count, mean
         FROM read_csv('{root}/csv/**/*.csv', hive_partitioning = true)
         ORDER BY series, window_start",
    );
    assert_eq!(as_tuples(csv), expected, "CSV holds what the archive holds");

    // Types and partition columns, as a lake query sees them.
    let types = duckdb(
        &lake,
        "SELECT DISTINCT typeof(window_start), typeof(count), typeof(mean), typeof(stdev),
                typeof(tags), device, year, month, day, hour
         FROM read_parquet('{root}/parquet/**/*.parquet', hive_partitioning = true)",
    );
    assert_eq!(
        types,
        vec![vec![
            Value::from("TIMESTAMP WITH TIME ZONE"),
            Value::from("BIGINT"),
            Value::from("DOUBLE"),
            Value::from("DOUBLE"),
            Value::from("MAP(VARCHAR, VARCHAR)"),
            Value::from("e2e"),
            Value::from(2026),
            // Plain integers in the keys: DuckDB reads integers.
            Value::from(1),
            Value::from(2),
            Value::from(3),
        ]]
    );
    let tags = duckdb(
        &lake,
        "SELECT DISTINCT series, tags['id'] FROM read_parquet('{root}/parquet/**/*.parquet')
         ORDER BY series",
    );
    assert_eq!(
        tags[0],
        vec![Value::from("pa.7.Temperature"), Value::from("7")]
    );

    // The wide layout: a row per window, a column per statistic and series.
    let wide = duckdb(
        &lake,
        "SELECT count(*), sum(count_pa_7_pm), sum(count_pa_9_pm), max(mean_pa_7_pm)
         FROM read_json_auto('{root}/wide/**/*.ndjson', hive_partitioning = true)",
    );
    let windows_with = |series: &str| expected.iter().filter(|r| r.0 == series).count();
    let starts: std::collections::BTreeSet<&str> = expected.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        wide,
        vec![vec![
            Value::from(starts.len()),
            Value::from(windows_with("pa.7.pm")),
            Value::from(windows_with("pa.9.pm")),
            Value::from(100.0),
        ]]
    );
}

#[test]
fn a_crash_between_upload_and_bookkeeping_leaves_exactly_one_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&dir.path().join("s3.log"));
    s3.create_bucket("lake");
    let server = JsonServer::start(vec![minute(0)], purpleair_body(&[]));
    let config = write_config(dir.path(), &server.url, &s3_sink(&s3, "lake", ""));
    let log = dir.path().join("agent.log");
    let mut agent =
        Agent::start_with_env(&config, &log, &[("EDGESPOOL_FAILPOINT", "after-upload")]);
    wait_for(
        "the agent killed at the failpoint",
        Duration::from_secs(60),
        || (!agent.is_running()).then_some(()),
    );
    let first = s3.list("lake");
    assert_eq!(first.len(), 1, "the object was written: {first:?}");
    assert_eq!(first[0].key, key("", 0, 0, "parquet"));
    let status = status_json(&config);
    assert_eq!(
        (
            sink_status(&status, "lake")["pending_partitions"].as_u64(),
            sink_status(&status, "lake")["delivered_parts"].as_u64()
        ),
        (Some(1), Some(0)),
        "its delivery was not recorded: {status}"
    );
    drop(agent);

    let agent = Agent::start(&config, &log);
    wait_for(
        "the part recorded as delivered",
        Duration::from_secs(60),
        || {
            let status = agent.try_status()?;
            (find_sink(&status, "lake")?["delivered_parts"] == 1).then_some(())
        },
    );
    let second = s3.list("lake");
    assert_eq!(
        second, first,
        "the same key with the same bytes (same ETag): one copy"
    );
    agent.terminate();
}

#[test]
fn a_large_partition_goes_up_as_a_multipart_upload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&dir.path().join("s3.log"));
    s3.create_bucket("lake");
    // 12,000 sensors, two columns each: 24,000 rows, about 7 MB of NDJSON.
    let rows: Vec<(u32, i64, f64, f64)> = (0..12_000)
        .map(|id| (id, T0, f64::from(id), 20.0))
        .collect();
    let server = JsonServer::start(vec![purpleair_body(&rows)], purpleair_body(&[]));
    let sinks = s3_sink(&s3, "lake", "format = \"ndjson\"\npart_size = \"5 MiB\"");
    let config = write_config(dir.path(), &server.url, &sinks);
    // 24,000 series, above the default `max_series` of 1,000.
    let text = std::fs::read_to_string(&config).expect("the config");
    let text = text.replace("[sources.table]", "max_series = 24000\n[sources.table]");
    std::fs::write(&config, text).expect("write the config");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let objects = wait_for("the large object", Duration::from_secs(120), || {
        let objects = s3.try_list("lake")?;
        (!objects.is_empty()).then_some(objects)
    });
    assert_eq!(objects.len(), 1, "{objects:?}");
    let object = &objects[0];
    assert!(object.size > 5 * 1024 * 1024, "{object:?}");
    assert!(
        object.etag.ends_with("-2"),
        "uploaded in two parts of at most 5 MiB: {object:?}"
    );
    let lake = dir.path().join("lake");
    s3.mirror("lake", &lake);
    let counted = duckdb(
        &lake,
        "SELECT count(*), count(DISTINCT series), sum(mean) FROM read_json_auto('{root}/**/*.ndjson')",
    );
    let sum_of_ids: f64 = (0..12_000).map(f64::from).sum();
    assert_eq!(
        counted,
        vec![vec![
            Value::from(24_000),
            Value::from(24_000),
            Value::from(sum_of_ids + 20.0 * 12_000.0)
        ]]
    );
    agent.terminate();
}
