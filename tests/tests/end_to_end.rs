//! End to end: the built binary against a fake sysfs tree and a loopback HTTP server,
//! with the output tree read back by serde_json and `status --json`.

use std::path::Path;
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, T0, edgespool, find_source, ndjson_count, purpleair_body, read_tree,
    source_status, status_json, table_source, try_status_json, wait_for, write_file,
};
use serde_json::Value;

const W1_SLAVE: &str =
    "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";

fn empty_table() -> String {
    purpleair_body(&[])
}

/// Writes a configuration: the `[agent]` table, the given sources, a local sink at `out`.
fn write_config(
    dir: &Path,
    window: &str,
    partition: &str,
    sources: &str,
    out: &Path,
) -> std::path::PathBuf {
    let text = format!(
        r#"
[agent]
device_id = "e2e"
spool = "{spool}"
window = "{window}"
partition = "{partition}"
grace = "0s"

{sources}

[[sinks]]
kind = "local"
name = "archive"
path = "{out}"
retry_max = "2s"
late_grace = "0s"
"#,
        spool = dir.join("spool.db").display(),
        out = out.display(),
    );
    let path = dir.join("edgespool.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A configuration with the HTTP table source, plus whatever `extra` adds.
fn config(dir: &Path, url: &str, window: &str, extra: &str) -> std::path::PathBuf {
    let sources = format!(
        "{}
{extra}",
        table_source(url, &["pm", "Temperature", "Voc"])
    );
    write_config(dir, window, "1m", &sources, &dir.join("out"))
}

fn rows_of<'a>(files: &'a [edgespool_tests::OutputFile], key_suffix: &str) -> &'a [Value] {
    files
        .iter()
        .find(|f| f.key.ends_with(key_suffix))
        .map(|f| f.rows.as_slice())
        .unwrap_or_else(|| {
            panic!(
                "no file ending {key_suffix} in {:?}",
                files.iter().map(|f| &f.key).collect::<Vec<_>>()
            )
        })
}

fn row<'a>(rows: &'a [Value], series: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["series"] == series)
        .unwrap_or_else(|| panic!("no row for {series} in {rows:?}"))
}

#[test]
fn sysfs_files_and_a_purpleair_table_land_row_by_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = dir.path().join("sysroot");
    write_file(&sys, "sys/class/hwmon/hwmon0/temp1_input", "48312\n");
    write_file(
        &sys,
        "sys/bus/w1/devices/28-0316a2790c2f/w1_slave",
        W1_SLAVE,
    );
    write_file(
        &sys,
        "sys/bus/iio/devices/iio:device0/in_humidityrelative_input",
        "45200\n",
    );
    let body = purpleair_body(&[
        (44071, T0 + 5, 1.0, 70.0),
        (59873, T0 + 5, 10.0, 80.0),
        (44071, T0 + 8, 3.0, 72.0),
        (59873, T0 + 8, 30.0, 82.0),
    ]);
    let next_minute = purpleair_body(&[(44071, T0 + 65, 5.0, 74.0)]);
    let server = JsonServer::start(vec![body, next_minute], empty_table());
    let sensors = format!(
        r#"
[[sources]]
kind = "sysfs"
name = "bme"
root = "{root}"
interval = "500ms"
[[sources.files]]
field = "cpu"
path = "/sys/class/hwmon/hwmon0/temp1_input"
scale = 0.001
unit = "celsius"
[[sources.files]]
field = "probe"
path = "/sys/bus/w1/devices/28-0316a2790c2f/w1_slave"
scale = 0.001
unit = "celsius"
[[sources.files]]
field = "humidity"
path = "/sys/bus/iio/devices/iio:device0/in_humidityrelative_input"
scale = 0.001
unit = "percent"
"#,
        root = sys.display()
    );
    let config = config(dir.path(), &server.url, "10s", &sensors);
    let out = dir.path().join("out");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    let part0 = "e2e-20260102T0300-part-0000.ndjson";
    let part_next = "e2e-20260102T0301-part-0000.ndjson";
    wait_for("both past partitions", Duration::from_secs(60), || {
        let files = read_tree(&out);
        let keys: Vec<&str> = files.iter().map(|f| f.key.as_str()).collect();
        (keys.iter().any(|k| k.ends_with(part0)) && keys.iter().any(|k| k.ends_with(part_next)))
            .then_some(())
    });
    // A late reading for the first window, after its partition was delivered.
    server.push(purpleair_body(&[(44071, T0 + 7, 100.0, 71.0)]));
    let part1 = "e2e-20260102T0300-part-0001.ndjson";
    wait_for("the late part", Duration::from_secs(60), || {
        read_tree(&out)
            .iter()
            .any(|f| f.key.ends_with(part1))
            .then_some(())
    });
    // Sysfs samples are stamped now: wait for the current minute to close (≤ 62 s).
    let files = wait_for(
        "a partition with sysfs rows",
        Duration::from_secs(90),
        || {
            let files = read_tree(&out);
            files
                .iter()
                .any(|f| f.rows.iter().any(|r| r["series"] == "bme.cpu"))
                .then_some(files)
        },
    );

    let first = rows_of(&files, part0);
    assert!(
        files
            .iter()
            .any(|f| f.key == format!("device=e2e/year=2026/month=1/day=2/hour=3/{part0}")),
        "Hive-style key, plain integers"
    );
    assert_eq!(
        first.len(),
        4,
        "two sensors × two numeric columns; null Voc skipped: {first:?}"
    );
    let pm = row(first, "pa.44071.pm");
    assert!(pm.get("device").is_none(), "the device is in the key: {pm}");
    assert_eq!(pm["unit"], "ug/m3");
    assert_eq!(pm["tags"]["id"], "44071");
    assert_eq!(pm["window_start"], "2026-01-02T03:00:00Z");
    assert_eq!(pm["window_end"], "2026-01-02T03:00:10Z");
    assert_eq!(
        (pm["count"].as_u64(), pm["min"].as_f64(), pm["max"].as_f64()),
        (Some(2), Some(1.0), Some(3.0))
    );
    assert_eq!(
        (pm["mean"].as_f64(), pm["median"].as_f64()),
        (Some(2.0), Some(2.0))
    );
    assert_eq!(pm["stdev"].as_f64(), Some(std::f64::consts::SQRT_2));
    assert_eq!(
        (pm["first"].as_f64(), pm["last"].as_f64()),
        (Some(1.0), Some(3.0))
    );
    let temp = row(first, "pa.59873.Temperature");
    assert_eq!(
        (temp["mean"].as_f64(), temp["unit"].is_null()),
        (Some(81.0), true)
    );

    let next = rows_of(&files, part_next);
    assert_eq!(next.len(), 2);
    let single = row(next, "pa.44071.pm");
    assert_eq!(
        (single["count"].as_u64(), single["stdev"].is_null()),
        (Some(1), true)
    );
    assert_eq!(single["window_start"], "2026-01-02T03:01:00Z");

    let late = rows_of(&files, part1);
    assert_eq!(
        late.len(),
        2,
        "only the late rows, never the old ones again: {late:?}"
    );
    assert_eq!(row(late, "pa.44071.pm")["mean"].as_f64(), Some(100.0));
    assert_eq!(
        row(late, "pa.44071.pm")["window_start"],
        "2026-01-02T03:00:00Z"
    );

    for (series, value) in [
        ("bme.cpu", 48.312),
        ("bme.probe", 23.125),
        ("bme.humidity", 45.2),
    ] {
        let rows: Vec<&Value> = files
            .iter()
            .flat_map(|f| &f.rows)
            .filter(|r| r["series"] == series)
            .collect();
        assert!(!rows.is_empty(), "{series} landed");
        for r in rows {
            assert_eq!(
                (r["min"].as_f64(), r["max"].as_f64(), r["mean"].as_f64()),
                (Some(value), Some(value), Some(value)),
                "{r}"
            );
            assert_eq!(
                r["unit"],
                if series == "bme.humidity" {
                    "percent"
                } else {
                    "celsius"
                }
            );
        }
    }
    assert!(
        files.iter().all(|f| f.key.ends_with(".ndjson")),
        "no stray files: {files:?}"
    );

    let status = agent.status();
    assert_eq!(status["daemon"]["state"], "running", "{status}");
    assert_eq!(status["device"], "e2e");
    let pa = source_status(&status, "pa");
    assert_eq!(
        (pa["errors"].as_u64(), pa["invalid"].as_u64()),
        (Some(0), Some(0)),
        "{pa}"
    );
    assert_eq!(pa["samples"].as_u64(), Some(4 + 4 + 2 + 2), "{pa}");
    let bme = source_status(&status, "bme");
    assert_eq!(bme["errors"].as_u64(), Some(0), "{bme}");
    assert!(bme["samples"].as_u64() >= Some(3), "{bme}");
    assert_eq!(
        status["counters"]["late_samples"].as_u64(),
        Some(2),
        "{status}"
    );
    let sink = &status["sinks"][0];
    assert_eq!(
        (sink["name"].as_str(), sink["state"].as_str()),
        (Some("archive"), Some("ok"))
    );
    // A file is in the folder a moment before its delivery is recorded (and another
    // minute may close meanwhile): the count and the files, read until they agree.
    wait_for(
        "every file counted delivered",
        Duration::from_secs(30),
        || {
            let status = agent.try_status()?;
            let files = read_tree(&out).len() as u64;
            (status["sinks"][0]["delivered_parts"].as_u64()? == files).then_some(())
        },
    );

    let exit = agent.terminate();
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    let after = status_json(&config);
    assert_eq!(after["daemon"]["state"], "stopped");
}

#[test]
fn kill_9_mid_stream_then_restart_delivers_every_committed_window_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bodies: Vec<String> = (0..60)
        .map(|i: i64| {
            let at = T0 + i * 60 + 10;
            purpleair_body(&[(1, at, i as f64, 0.5), (2, at, i as f64 + 0.25, 1.5)])
        })
        .collect();
    let server = JsonServer::start(bodies, empty_table());
    let config = config(dir.path(), &server.url, "1s", "");
    let out = dir.path().join("out");
    let log = dir.path().join("agent.log");

    for files_before_kill in [8, 20, 35] {
        let agent = Agent::start(&config, &log);
        wait_for("files before the kill", Duration::from_secs(60), || {
            (ndjson_count(&read_tree(&out)) >= files_before_kill).then_some(())
        });
        agent.kill9();
        assert_eq!(status_json(&config)["daemon"]["state"], "not running");
    }
    let agent = Agent::start(&config, &log);
    wait_for("every body served", Duration::from_secs(120), || {
        server.exhausted().then_some(())
    });
    // Two flushes after the last body everything served is committed; then it is delivered.
    let mut heartbeats = vec![agent.status()["daemon"]["heartbeat"].clone()];
    wait_for(
        "two more flushes and every partition delivered",
        Duration::from_secs(60),
        || {
            let status = agent.try_status()?;
            let heartbeat = status["daemon"]["heartbeat"].clone();
            if heartbeats.last() != Some(&heartbeat) {
                heartbeats.push(heartbeat);
            }
            let idle = status["sinks"][0]["pending_rows"] == 0 && status["spool"]["rows"] == 0;
            (heartbeats.len() >= 3 && idle).then_some(())
        },
    );
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");

    let files = read_tree(&out);
    let status = status_json(&config);
    let rows: Vec<&Value> = files.iter().flat_map(|f| &f.rows).collect();
    let mut seen = std::collections::BTreeSet::new();
    for r in &rows {
        let key = (r["series"].to_string(), r["window_start"].to_string());
        assert!(seen.insert(key.clone()), "window delivered twice: {key:?}");
    }
    let counted: u64 = rows
        .iter()
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(
        counted,
        status["counters"]["samples"]
            .as_u64()
            .expect("samples counter"),
        "every sample the spool committed is in the output exactly once"
    );
    assert!(
        files.iter().all(|f| f.key.ends_with("-part-0000.ndjson")),
        "no late parts"
    );
    assert!(
        files.len() >= 35,
        "most partitions arrived: {}",
        files.len()
    );
    assert_eq!(status["spool"]["rows"], 0, "delivered rows leave the spool");
    assert!(server.served() == 60);
}

#[test]
fn bad_input_is_counted_and_the_agent_keeps_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = dir.path().join("sysroot");
    let vanishing = write_file(&sys, "sys/class/hwmon/hwmon0/temp1_input", "41000\n");
    let secret = write_file(dir.path(), "api-key", "topsecret-123\n");
    let glitch = format!(
        r#"{{"fields":["ID","pm","age","Label","Temperature","Voc","last_seen"],"data":[],[44071,1.0,1,"x",70,null,{T0}]]}}"#
    );
    let bodies = vec![
        "<html><body>502 Bad Gateway</body></html>".to_owned(),
        r#"{"fields":["ID","pm""#.to_owned(),
        glitch,
        purpleair_body(&[(44071, T0 + 1, 9.0, 60.0)]),
    ];
    let server = JsonServer::start(bodies, empty_table());
    let extra = format!(
        r#"
[[sources]]
kind = "sysfs"
name = "hw"
root = "{root}"
interval = "200ms"
[[sources.files]]
field = "temp"
path = "sys/class/hwmon/hwmon0/temp1_input"
"#,
        root = sys.display()
    );
    let config = config(dir.path(), &server.url, "1s", &extra);
    let text = std::fs::read_to_string(&config).expect("config");
    let with_secret = text.replace(
        "interval = \"100ms\"",
        &format!(
            "interval = \"100ms\"\nheader_files = {{ \"X-API-Key\" = \"{}\" }}",
            secret.display()
        ),
    );
    std::fs::write(&config, with_secret).expect("config");
    let mut agent = Agent::start(&config, &dir.path().join("agent.log"));

    wait_for("hw samples flushed", Duration::from_secs(30), || {
        let status = agent.try_status()?;
        (find_source(&status, "hw")?["samples"].as_u64() > Some(0)).then_some(())
    });
    std::fs::remove_file(&vanishing).expect("the sensor goes away");
    let status = wait_for(
        "the three bad bodies and the vanished file counted",
        Duration::from_secs(30),
        || {
            let status = agent.try_status()?;
            let pa = find_source(&status, "pa")?;
            let hw = find_source(&status, "hw")?;
            (pa["errors"].as_u64() == Some(3)
                && hw["errors"].as_u64() >= Some(1)
                && server.exhausted())
            .then_some(status)
        },
    );
    let hw = source_status(&status, "hw");
    let hw_error = hw["last_error"].as_str().expect("hw last error");
    assert_eq!(
        hw_error,
        format!(
            "cannot read {}: No such file or directory (os error 2)",
            vanishing.display()
        )
    );
    let pa = source_status(&status, "pa");
    assert!(
        pa["last_error"]
            .as_str()
            .expect("pa last error")
            .starts_with("response is not valid JSON: key must be a string at line 1 column"),
        "{pa}"
    );
    let log = agent.log_text();
    for expected in [
        "response is not valid JSON: expected value at line 1 column 1",
        "response is not valid JSON: EOF while parsing a list at line 1 column 20",
        "response is not valid JSON: key must be a string at line 1 column 79",
    ] {
        assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    }
    assert!(agent.is_running(), "bad input never stops the agent");

    // The good body after the bad ones still lands.
    let out = dir.path().join("out");
    let files = wait_for(
        "the valid body's partition",
        Duration::from_secs(30),
        || {
            let files = read_tree(&out);
            files
                .iter()
                .any(|f| f.key.ends_with("e2e-20260102T0300-part-0000.ndjson"))
                .then_some(files)
        },
    );
    let rows = rows_of(&files, "e2e-20260102T0300-part-0000.ndjson");
    assert_eq!(row(rows, "pa.44071.pm")["mean"].as_f64(), Some(9.0));

    let check = edgespool(&["check-config", "--config", config.to_str().expect("utf-8")]);
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(printed.contains("X-API-Key=<secret>"), "{printed}");
    let status_text = serde_json::to_string(&agent.status()).expect("json");
    agent.terminate();
    let log = std::fs::read_to_string(dir.path().join("agent.log")).expect("log");
    for place in [&log, &status_text, &printed.to_string()] {
        assert!(
            !place.contains("topsecret-123"),
            "the secret leaked: {place}"
        );
    }
}

fn check_config_error(text: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).expect("write");
    let out = edgespool(&["check-config", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1), "a bad config fails");
    let run = edgespool(&["run", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(run.status.code(), Some(1), "run refuses it too");
    String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "bad.toml")
}

const GOOD: &str = "[agent]\nspool = \"/tmp/never-used/spool.db\"\n\n[[sources]]\nkind = \"system\"\n\n[[sinks]]\nkind = \"local\"\npath = \"/tmp/never-used/out\"\n";

#[test]
fn config_errors_name_file_line_and_column() {
    assert_eq!(
        check_config_error(
            &GOOD.replace("kind = \"system\"", "kind = \"system\"\nintreval = \"1s\"")
        ),
        "error: bad.toml:6:1: unknown field `intreval`, expected one of `name`, `interval`, `timeout`, `root`\n"
    );
    assert_eq!(
        check_config_error(&GOOD.replace("[agent]\n", "[agent]\nwindow = \"ten seconds\"\n")),
        "error: bad.toml:2:10: invalid duration \"ten seconds\" (expected number at 0); write it like \"500ms\", \"10s\", \"5m\" or \"1h\"\n"
    );
    let missing = format!(
        "{GOOD}\n[[sources]]\nkind = \"http\"\nname = \"api\"\nurl = \"http://127.0.0.1:9/\"\nheader_files = {{ Authorization = \"/nonexistent/token\" }}\n[[sources.fields]]\nname = \"x\"\npointer = \"/x\"\n"
    );
    assert_eq!(
        check_config_error(&missing),
        "error: bad.toml:15:34: cannot read secret file /nonexistent/token: No such file or directory (os error 2)\n"
    );
}

#[test]
fn check_config_prints_what_would_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, GOOD).expect("write");
    let out = edgespool(&["check-config", "--config", path.to_str().expect("utf-8")]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("configuration is valid"), "{text}");
    assert!(
        text.contains("windows    60s, partitions 3600s, grace 1m"),
        "{text}"
    );
    assert!(
        text.contains("source     system (system) every 1s, timeout 5s"),
        "{text}"
    );
}

/// The sysfs source `hw` with two sensor files, plus whatever `extra` adds.
fn sysfs_config(dir: &Path, window: &str, sink_path: &Path, extra: &str) -> std::path::PathBuf {
    let root = dir.join("sysroot");
    write_file(&root, "sys/class/hwmon/hwmon0/temp1_input", "40500\n");
    write_file(&root, "sys/class/hwmon/hwmon0/temp2_input", "41500\n");
    let sources = format!(
        r#"
[[sources]]
kind = "sysfs"
name = "hw"
root = "{root}"
interval = "200ms"
[[sources.files]]
field = "t1"
path = "sys/class/hwmon/hwmon0/temp1_input"
[[sources.files]]
field = "t2"
path = "sys/class/hwmon/hwmon0/temp2_input"

{extra}
"#,
        root = root.display(),
    );
    let partition = if window == "1h" { "1h" } else { "1m" };
    write_config(dir, window, partition, &sources, sink_path)
}

#[test]
fn sigint_flushes_the_open_windows_before_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Hour-long windows: nothing closes while the agent runs.
    let config = sysfs_config(dir.path(), "1h", &dir.path().join("out"), "");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    wait_for("a few samples read", Duration::from_secs(20), || {
        agent.log_text().contains("edgespool started").then_some(())
    });
    // What is awaited here is time itself: a few 200 ms ticks, invisible until a flush.
    std::thread::sleep(Duration::from_secs(1));
    let before = agent.status();
    assert_eq!(before["spool"]["rows"], 0, "no window has closed yet");
    let exit = agent.interrupt();
    assert!(exit.success(), "{exit:?}");
    let after = status_json(&config);
    assert_eq!(after["daemon"]["state"], "stopped");
    assert_eq!(
        after["spool"]["rows"], 2,
        "both open windows were flushed: {after}"
    );
    let samples = source_status(&after, "hw")["samples"]
        .as_u64()
        .expect("samples");
    assert!(samples >= 2, "{after}");
    assert_eq!(
        after["counters"]["samples"].as_u64(),
        Some(samples),
        "every sample read is in a committed window"
    );
}

#[test]
fn a_hung_http_source_never_delays_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("bound").port();
    let hung = format!(
        r#"
[[sources]]
kind = "http"
name = "hung"
url = "http://127.0.0.1:{port}/"
interval = "1s"
timeout = "1s"
[[sources.fields]]
name = "x"
pointer = "/x"
"#
    );
    let config = sysfs_config(dir.path(), "1s", &dir.path().join("out"), &hung);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let status = wait_for(
        "three timeouts of the hung source",
        Duration::from_secs(30),
        || {
            let status = agent.try_status()?;
            (find_source(&status, "hung")?["errors"].as_u64() >= Some(3)).then_some(status)
        },
    );
    let hung = source_status(&status, "hung");
    let error = hung["last_error"].as_str().expect("a last error");
    assert!(
        error.contains("timed out") || error.contains("timeout"),
        "{error}"
    );
    // Three hung seconds or more: the 200 ms sysfs source kept its pace meanwhile.
    let hw = source_status(&status, "hw")["samples"]
        .as_u64()
        .expect("hw samples");
    assert!(
        hw >= 2 * 3 * 3,
        "sysfs kept sampling (2 files, 5 ticks/s): {hw} in {status}"
    );
    drop(listener);
    agent.terminate();
}

#[test]
fn a_failing_sink_retries_and_catches_up_without_losing_a_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The sink's folder cannot be made while a file stands where a folder should be.
    let blocker = dir.path().join("usb");
    std::fs::write(&blocker, "not a folder").expect("blocker");
    let out = blocker.join("out");
    let bodies = (0..5)
        .map(|i| purpleair_body(&[(7, T0 + i * 60, i as f64, 0.0)]))
        .collect();
    let server = JsonServer::start(bodies, empty_table());
    let config = sysfs_config(
        dir.path(),
        "1s",
        &out,
        &table_source(&server.url, &["pm", "Temperature", "Voc"]),
    );
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    let status = wait_for(
        "the sink retrying with partitions pending",
        Duration::from_secs(30),
        || {
            let status = agent.try_status()?;
            let sink = &status["sinks"][0];
            (sink["state"] == "retrying" && sink["pending_partitions"].as_u64() >= Some(5))
                .then_some(status)
        },
    );
    let sink = &status["sinks"][0];
    assert!(
        sink["retrying_since"].is_string() && sink["next_attempt"].is_string(),
        "{sink}"
    );
    let error = sink["last_error"].as_str().expect("last error");
    assert!(
        error.starts_with(&format!("archive: cannot create {}: ", out.display())),
        "{error}"
    );
    assert_eq!(
        source_status(&status, "hw")["errors"].as_u64(),
        Some(0),
        "sampling goes on"
    );

    std::fs::remove_file(&blocker).expect("the disk comes back");
    let files = wait_for("the backlog delivered", Duration::from_secs(30), || {
        let files = read_tree(&out);
        (ndjson_count(&files) >= 5).then_some(files)
    });
    let pa: Vec<f64> = files
        .iter()
        .flat_map(|f| &f.rows)
        .filter(|r| r["series"] == "pa.7.pm")
        .map(|r| r["mean"].as_f64().expect("mean"))
        .collect();
    assert_eq!(
        pa,
        vec![0.0, 1.0, 2.0, 3.0, 4.0],
        "every past partition once, oldest first"
    );
    let status = agent.status();
    assert_eq!(status["sinks"][0]["state"], "ok", "{status}");
    let text = edgespool(&["status", "--config", config.to_str().expect("utf-8")]);
    let human = String::from_utf8_lossy(&text.stdout);
    assert!(human.contains("daemon    running, pid"), "{human}");
    assert!(human.contains("archive      local   ok;"), "{human}");
    assert!(human.contains("hw           sysfs   "), "{human}");
    agent.terminate();
}

/// `edgespool sensors` on a fake sysfs tree: its listing, and its snippet pasted into a
/// configuration samples every sensor it found, in its unit.
#[test]
fn sensors_lists_a_fake_tree_and_its_snippet_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = dir.path().join("device");
    write_file(
        &sys,
        "sys/class/thermal/thermal_zone0/type",
        "cpu-thermal\n",
    );
    write_file(&sys, "sys/class/thermal/thermal_zone0/temp", "48312\n");
    write_file(&sys, "sys/class/hwmon/hwmon1/name", "ina219\n");
    write_file(&sys, "sys/class/hwmon/hwmon1/in1_input", "5012\n");
    write_file(&sys, "sys/class/hwmon/hwmon1/in1_label", "VBUS\n");
    write_file(&sys, "sys/bus/iio/devices/iio:device0/name", "bme280\n");
    write_file(
        &sys,
        "sys/bus/iio/devices/iio:device0/in_temp_input",
        "21370\n",
    );
    write_file(&sys, "sys/bus/iio/devices/iio:device1/name", "ads1015\n");
    write_file(
        &sys,
        "sys/bus/iio/devices/iio:device1/in_voltage0_raw",
        "1000\n",
    );
    write_file(
        &sys,
        "sys/bus/iio/devices/iio:device1/in_voltage_scale",
        "2\n",
    );
    write_file(
        &sys,
        "sys/bus/w1/devices/28-0316a2790c2f/w1_slave",
        W1_SLAVE,
    );

    let out = edgespool(&["sensors", "--root", &sys.display().to_string()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("Sensors under {}:", sys.display()));
    for expected in [
        "thermal cpu_thermal         48.312 celsius         /sys/class/thermal/thermal_zone0/temp",
        "hwmon   ina219_vbus         5.012 volt             /sys/class/hwmon/hwmon1/in1_input",
        "iio     bme280_temp         21.37 celsius          /sys/bus/iio/devices/iio:device0/in_temp_input",
        "iio     ads1015_voltage0    2 volt                 /sys/bus/iio/devices/iio:device1/in_voltage0_raw",
        "w1      w1_28_0316a2790c2f  23.125 celsius         /sys/bus/w1/devices/28-0316a2790c2f/w1_slave",
    ] {
        assert!(
            lines.iter().any(|l| l.trim() == expected),
            "{expected:?} in\n{text}"
        );
    }

    let snippet = &text[text.find("[[sources]]").expect("a snippet")..];
    let body = format!(
        "{snippet}\n[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{}\"\nlate_grace = \"0s\"\n",
        dir.path().join("out").display()
    );
    let config = edgespool_tests::write_agent_config(dir.path(), &body);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    // The first partition closes within a minute: then every sensor's windows land.
    let rows = wait_for(
        "a partition of every sensor",
        Duration::from_secs(120),
        || {
            let rows: Vec<serde_json::Value> = read_tree(&dir.path().join("out"))
                .into_iter()
                .flat_map(|f| f.rows)
                .collect();
            let series: std::collections::BTreeSet<&str> =
                rows.iter().filter_map(|r| r["series"].as_str()).collect();
            (series.len() == 5).then_some(rows)
        },
    );
    agent.interrupt();
    for (series, mean, unit) in [
        ("board.cpu_thermal", 48.312, "celsius"),
        ("board.ina219_vbus", 5.012, "volt"),
        ("board.bme280_temp", 21.37, "celsius"),
        ("board.ads1015_voltage0", 2.0, "volt"),
        ("board.w1_28_0316a2790c2f", 23.125, "celsius"),
    ] {
        let row = rows
            .iter()
            .find(|r| r["series"] == series)
            .unwrap_or_else(|| panic!("{series} in {rows:?}"));
        let got = row["mean"].as_f64().expect("a mean");
        assert!((got - mean).abs() < 1e-9, "{series}: {got} != {mean}");
        assert_eq!(row["unit"], unit, "{series}");
    }
    let status = status_json(&config);
    assert_eq!(status["sources"][0]["errors"], 0, "{status}");
    assert_eq!(status["sources"][0]["invalid"], 0, "{status}");
}

/// The quick configuration: a fake thermal zone sampled every second into `dir/out`.
fn thermal_config(dir: &Path) -> std::path::PathBuf {
    let body = format!(
        "{}\n{}",
        edgespool_tests::thermal_source(dir, "1s"),
        edgespool_tests::out_sink(dir)
    );
    edgespool_tests::write_agent_config(dir, &body)
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): READY=1 once running, WATCHDOG=1 at half
/// the watchdog period while flushes commit, STOPPING=1 at SIGTERM; read from a notify
/// socket of the test's own, as systemd would.
#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = thermal_config(dir.path());
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let agent = Agent::start_with_env(
        &config,
        &dir.path().join("agent.log"),
        &[
            ("NOTIFY_SOCKET", &socket_path.display().to_string()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut buffer = [0u8; 512];
    let mut next = || {
        let n = socket.recv(&mut buffer).expect("a notification in time");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1\nSTATUS=sampling: 1 sources, 1 sinks\n");
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(next(), "WATCHDOG=1\n");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(700),
        "every 200 ms: {elapsed:?}"
    );
    assert_eq!(agent.terminate().code(), Some(0));
    // Sent before the final flush, so it is already waiting in the socket.
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let rest: Vec<String> = std::iter::from_fn(|| {
        let n = socket.recv(&mut buffer).ok()?;
        Some(String::from_utf8_lossy(&buffer[..n]).into_owned())
    })
    .take(20)
    .collect();
    assert!(
        rest.iter()
            .any(|m| m == "STOPPING=1\nSTATUS=flushing open windows\n"),
        "{rest:?}"
    );
}

/// A spool that is not a database (a card that lost power mid-write and came back with
/// garbage) is moved aside, kept, and the agent starts afresh and says so in `status`.
#[test]
fn a_corrupt_spool_is_moved_aside_loudly_and_sampling_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = thermal_config(dir.path());
    let garbage = vec![0x5a_u8; 64 * 1024];
    std::fs::write(dir.path().join("spool.db"), &garbage).expect("write garbage");
    let log = dir.path().join("agent.log");
    let agent = Agent::start(&config, &log);
    let status = wait_for(
        "a flush in the fresh spool",
        Duration::from_secs(30),
        || {
            // Until the agent has moved the garbage aside, status cannot read it.
            let status = try_status_json(&config)?;
            (status["counters"]["samples"].as_u64() > Some(0)).then_some(status)
        },
    );
    let recovered = &status["spool"]["recovered"];
    assert_eq!(recovered["reason"], "file is not a database", "{status}");
    let moved = recovered["moved_to"].as_str().expect("moved_to");
    assert_eq!(std::fs::read(moved).expect("kept for forensics"), garbage);
    let text = edgespool(&["status", "--config", &config.display().to_string()]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("RECOVERED") && text.contains(moved), "{text}");
    assert!(
        agent
            .log_text()
            .contains("the spool is corrupt: moved aside")
    );
    assert_eq!(agent.terminate().code(), Some(0));
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(path: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(path).expect("mkdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .ok()?;
        status.success().then(|| SmallFs(path.to_owned()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// The spool on a file system that fills up (ENOSPC): the agent keeps running, keeps the
/// closed windows in memory, commits them once space returns, and the archive ends up
/// with every window of the outage, once, from an intact spool.
#[test]
fn a_full_file_system_loses_no_window_and_corrupts_nothing() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "SKIPPED a_full_file_system_loses_no_window_and_corrupts_nothing: mounting a small tmpfs needs root"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small");
    let _fs = SmallFs::mount(&small, "4m").expect("mount a 4 MiB tmpfs");
    let out = dir.path().join("out");
    let text = format!(
        "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"1s\"\npartition = \"1m\"\ngrace = \"0s\"\n\n{}\n{}",
        small.join("spool.db").display(),
        edgespool_tests::thermal_source(dir.path(), "200ms"),
        edgespool_tests::out_sink(dir.path())
    );
    let config = dir.path().join("edgespool.toml");
    std::fs::write(&config, text).expect("write config");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let spool = small.join("spool.db");
    wait_for("the spool", Duration::from_secs(30), || {
        spool.exists().then_some(())
    });
    wait_for("a first flush", Duration::from_secs(30), || {
        (try_status_json(&config)?["counters"]["samples"].as_u64() > Some(0)).then_some(())
    });

    // Fill the file system to the last byte.
    let filler = small.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).expect("create filler");
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.write_all(&[0u8; 1]);
        let _ = file.sync_all();
    }
    let full_at = unix_now();
    wait_for("three failed commits", Duration::from_secs(30), || {
        (agent
            .log_text()
            .matches("spool commit failed: windows kept in memory")
            .count()
            >= 3)
            .then_some(())
    });
    std::fs::remove_file(&filler).expect("free the space");
    let freed_at = unix_now();
    wait_for("commits again", Duration::from_secs(30), || {
        agent
            .log_text()
            .contains("the spool is writable again: kept windows committed")
            .then_some(())
    });

    // Once the partition after the outage is uploaded, every second is in the archive.
    let starts = wait_for("the outage's partitions", Duration::from_secs(150), || {
        let mut starts: Vec<i64> = read_tree(&out)
            .into_iter()
            .flat_map(|f| f.rows)
            .filter(|r| r["series"] == "board.cpu")
            .map(|r| chrono_seconds(r["window_start"].as_str().expect("window_start")))
            .collect();
        starts.sort_unstable();
        (starts.last().is_some_and(|&last| last > freed_at + 1)).then_some(starts)
    });
    assert_eq!(agent.terminate().code(), Some(0));
    let first = starts[0];
    assert!(first < full_at, "the archive starts before the outage");
    let expected: Vec<i64> = (first..=*starts.last().expect("rows")).collect();
    assert_eq!(starts, expected, "every window once, none missing");
    let status = status_json(&config);
    assert_eq!(status["counters"]["lost_rows"], 0, "{status}");
    let check = std::process::Command::new(edgespool_tests::python())
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])",
        ])
        .arg(&spool)
        .output()
        .expect("python runs");
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ok");
}

/// Unix seconds of an RFC 3339 time ("2026-11-23T17:04:05Z").
fn chrono_seconds(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text)
        .expect("an RFC 3339 time")
        .timestamp()
}
