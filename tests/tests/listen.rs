//! The listen source end to end: the built binary serving HTTP, written to by clients we
//! did not write — the `influxdb-client` Python package (line protocol, plain and gzip,
//! with timestamps) and `curl` (JSON, NDJSON, raw line protocol) — and the windows that
//! land in a local sink, with the source's counters in `status`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgespool_tests::{
    Agent, T0, find_source, free_port, python, read_tree, settle, source_status, wait_for,
    write_agent_config,
};
use serde_json::Value;

const TOKEN: &str = "listen-test-token-4f2a";

/// Writes with the `influxdb-client` package: argv url, token, first second. Prints one
/// JSON object per write: its name, the HTTP status (204 for success) and the body of
/// an error.
const INFLUX_CLIENT: &str = r#"
import json, sys
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

url, token, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3])

def write(name, token, gzip, records, precision):
    with InfluxDBClient(url=url, token=token, org="home", enable_gzip=gzip) as client:
        api = client.write_api(write_options=SYNCHRONOUS)
        try:
            api.write(bucket="oximeter", org="home", record=records, write_precision=precision)
            print(json.dumps({"name": name, "status": 204, "body": ""}))
        except ApiException as err:
            print(json.dumps({"name": name, "status": err.status, "body": err.body}))

# Ten readings a second apart in nanoseconds, plain; a string field on each.
plain = [Point("oximeter").tag("probe", "finger").field("spo2", 90 + i).field("bpm", 60.5 + i)
         .field("state", "ok").time((t0 + i) * 1_000_000_000 + 999_999, WritePrecision.NS)
         for i in range(10)]
write("plain", token, False, plain, WritePrecision.NS)
# Ten more, gzip, in milliseconds, ten seconds later.
gz = [Point("oximeter").tag("probe", "finger").field("spo2", 80 + i).field("bpm", 70.0)
      .time((t0 + 10 + i) * 1000 + 250, WritePrecision.MS) for i in range(10)]
write("gzip", token, True, gz, WritePrecision.MS)
# A partial batch: lines 1 and 3 are good, line 2 is not.
partial = "partial v=1 %d\npartial v=oops %d\npartial v=3 %d" % (t0 + 30, t0 + 31, t0 + 32)
write("partial", token, False, partial, WritePrecision.S)
# A fully bad batch.
write("all_bad", token, False, "allbad v=\nallbad,t v=1", WritePrecision.S)
# The right lines with a wrong token.
write("wrong_token", "not-" + token, False, "intruder v=1 %d" % (t0 + 33), WritePrecision.S)
"#;

/// A listen source `push` on `port` with a token, JSON fields for `/samples`, a body limit
/// of 64 KiB; a local sink in `out/`.
fn config(dir: &Path, port: u16) -> PathBuf {
    let body = format!(
        r#"
[[sources]]
kind = "listen"
name = "push"
address = "127.0.0.1:{port}"
token_file = "{token_file}"
max_body = "64 KiB"
timestamp = "/t"
[[sources.fields]]
name = "spo2"
pointer = "/spo2"
unit = "%"
[[sources.fields]]
name = "bpm"
pointer = "/pulse/bpm"

[[sinks]]
kind = "local"
name = "archive"
path = "{out}"
late_grace = "0s"
"#,
        token_file = dir.join("token").display(),
        out = dir.join("out").display(),
    );
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).expect("write the token file");
    write_agent_config(dir, &body)
}

/// `curl` posting `body` (a file) to `path` with extra arguments; the status and the body.
fn curl(port: u16, path: &str, body: &Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("the status line");
    (
        code.trim().parse().expect("an HTTP status"),
        body.to_owned(),
    )
}

/// Rows of `series` (with `tags`, if given): (window start, count, mean).
fn windows(rows: &[Value], series: &str) -> Vec<(String, u64, f64)> {
    let mut got: Vec<(String, u64, f64)> = rows
        .iter()
        .filter(|r| r["series"] == series)
        .map(|r| {
            (
                r["window_start"].as_str().expect("start").to_owned(),
                r["count"].as_u64().expect("count"),
                r["mean"].as_f64().expect("mean"),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    got
}

fn utc(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .expect("a time")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[test]
fn pushed_line_protocol_and_json_land_as_windows_and_bad_writes_do_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let config = config(dir.path(), port);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let t0 = T0 + 3600;
    let ping = dir.path().join("empty");
    std::fs::write(&ping, "").expect("write");
    wait_for("the server to answer", Duration::from_secs(30), || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{port}/ping"))
            .output()
            .ok()?;
        (out.stdout == b"204").then_some(())
    });

    // The InfluxDB client library, as a device's writer would use it.
    let out = Command::new(python())
        .args(["-c", INFLUX_CLIENT])
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(TOKEN)
        .arg(t0.to_string())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "the influxdb-client script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let answer = |name: &str| -> (u64, Value) {
        let a = answers
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("no answer {name} in {answers:?}"));
        let body = a["body"].as_str().unwrap_or("");
        let body = serde_json::from_str(body).unwrap_or(Value::Null);
        (a["status"].as_u64().expect("a status"), body)
    };
    assert_eq!(answer("plain").0, 204);
    assert_eq!(answer("gzip").0, 204);
    assert_eq!(
        answer("partial"),
        (
            400,
            serde_json::json!({
                "code": "invalid",
                "message": "line 2: field \"v\": \"oops\" is not a number, boolean or string; partial write: 2 of 3 lines taken"
            })
        )
    );
    assert_eq!(
        answer("all_bad"),
        (
            400,
            serde_json::json!({
                "code": "invalid",
                "message": "line 1: field \"v\": the value is missing (and 1 more bad line); no line taken"
            })
        )
    );
    let (status, body) = answer("wrong_token");
    assert_eq!(status, 401);
    assert_eq!(body["code"], "unauthorized");

    // curl: NDJSON and a JSON array to /samples, stamped by /t.
    let ndjson = dir.path().join("samples.ndjson");
    let lines: Vec<String> = (0..4)
        .map(|i| {
            format!(
                "{{\"t\": {}, \"spo2\": {}, \"pulse\": {{\"bpm\": {}}}}}",
                t0 + 40 + i,
                95 + i,
                70 + 2 * i
            )
        })
        .collect();
    std::fs::write(&ndjson, lines.join("\n") + "\n").expect("write");
    let bearer = format!("Authorization: Bearer {TOKEN}");
    assert_eq!(
        curl(port, "/samples", &ndjson, &["-H", &bearer]),
        (204, String::new())
    );
    let array = dir.path().join("samples.json");
    std::fs::write(
        &array,
        format!(
            "[{{\"t\": \"{}\", \"spo2\": 99, \"pulse\": {{\"bpm\": null}}}}]",
            utc(t0 + 50)
        ),
    )
    .expect("write");
    assert_eq!(
        curl(port, "/samples", &array, &["-H", &bearer]),
        (204, String::new())
    );
    // No token at all: refused.
    assert_eq!(curl(port, "/samples", &ndjson, &[]).0, 401);
    // Over max_body (64 KiB): refused whole, before and after decompression.
    let huge = dir.path().join("huge.lp");
    let text: String = (0..4000)
        .map(|i| format!("huge v={i} {}\n", t0 + 55))
        .collect();
    assert!(text.len() > 64 * 1024);
    std::fs::write(&huge, &text).expect("write");
    let token = format!("Authorization: Token {TOKEN}");
    let (status, body) = curl(port, "/api/v2/write?precision=s", &huge, &["-H", &token]);
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["message"],
        "the body is over max_body (65536 bytes); nothing taken, send smaller batches"
    );
    let gz = dir.path().join("huge.lp.gz");
    let gzip = Command::new("gzip")
        .arg("-kc")
        .arg(&huge)
        .output()
        .expect("gzip runs");
    assert!(gzip.stdout.len() < 64 * 1024, "compresses well");
    std::fs::write(&gz, &gzip.stdout).expect("write");
    let (status, body) = curl(
        port,
        "/write?db=home&precision=s",
        &gz,
        &["-H", "Content-Encoding: gzip", "-u", &format!("me:{TOKEN}")],
    );
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["error"],
        "the decompressed body is over max_body (65536 bytes); nothing taken, send smaller batches"
    );

    // Landed: 20 (plain), 20 (gzip), 2 (partial), 8 (NDJSON), 1 (the array; its null is none).
    let expected = 20 + 20 + 2 + 8 + 1;
    wait_for("the samples counted", Duration::from_secs(30), || {
        let status = agent.try_status()?;
        let push = find_source(&status, "push")?;
        // The error counters are kept apart from the samples': wait for all.
        let counted = push["errors"].as_u64()? >= 4 && push["invalid"].as_u64()? >= 13;
        (push["samples"].as_u64()? == expected && counted).then_some(())
    });
    let status = agent.status();
    let push = source_status(&status, "push");
    assert_eq!(push["kind"], "listen");
    // 10 string fields, line 2 of the partial batch, the 2 lines of the bad one.
    assert_eq!(push["invalid"], 13, "{push}");
    // The wrong token, the missing one, the two oversized bodies.
    assert_eq!(push["errors"], 4, "{push}");
    assert_eq!(push["nulls"], 1, "{push}");
    assert!(
        !agent.log_text().contains(TOKEN),
        "the token is never logged"
    );
    let config_path = config.clone();
    settle(agent, Duration::from_secs(60), || {
        edgespool_tests::try_status_json(&config_path)
            .and_then(|s| find_source(&s, "push")?["samples"].as_u64())
            == Some(expected)
    });

    let rows: Vec<Value> = read_tree(&dir.path().join("out"))
        .into_iter()
        .flat_map(|f| f.rows)
        .collect();
    let spo2 = windows(&rows, "push.oximeter.spo2");
    let want: Vec<(String, u64, f64)> = (0..10)
        .map(|i| (utc(t0 + i), 1, (90 + i) as f64))
        .chain((0..10).map(|i| (utc(t0 + 10 + i), 1, (80 + i) as f64)))
        .collect();
    assert_eq!(spo2, want);
    let bpm = windows(&rows, "push.oximeter.bpm");
    let mean: f64 = bpm.iter().map(|w| w.2).sum::<f64>() / bpm.len() as f64;
    let want_mean = ((0..10).map(|i| 60.5 + i as f64).sum::<f64>() + 700.0) / 20.0;
    assert_eq!((bpm.len(), mean), (20, want_mean));
    let tagged = rows
        .iter()
        .find(|r| r["series"] == "push.oximeter.spo2")
        .expect("a row");
    assert_eq!(tagged["tags"]["probe"], "finger");
    assert_eq!(
        windows(&rows, "push.partial.v"),
        [(utc(t0 + 30), 1, 1.0), (utc(t0 + 32), 1, 3.0)]
    );
    let pushed: Vec<(String, u64, f64)> = (0..4)
        .map(|i| (utc(t0 + 40 + i), 1, (95 + i) as f64))
        .chain([(utc(t0 + 50), 1, 99.0)])
        .collect();
    assert_eq!(windows(&rows, "push.spo2"), pushed);
    let pulse: Vec<(String, u64, f64)> = (0..4)
        .map(|i| (utc(t0 + 40 + i), 1, (70 + 2 * i) as f64))
        .collect();
    assert_eq!(windows(&rows, "push.bpm"), pulse);
    for refused in ["allbad", "intruder", "huge"] {
        assert!(
            !rows.iter().any(|r| r["series"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("push.{refused}.")))),
            "nothing of {refused} lands"
        );
    }
    assert!(
        !rows.iter().any(|r| r["series"] == "push.oximeter.state"),
        "string fields are not recorded"
    );
}

/// Writes with the InfluxDB 1 client (`influxdb` package): argv port, password, first
/// second. Five points by `/write` with basic auth and gzip, then one with a wrong
/// password; prints the status of each write.
const INFLUX_1_CLIENT: &str = r#"
import json, sys
from influxdb import InfluxDBClient
from influxdb.exceptions import InfluxDBClientError

port, password, t0 = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def write(password, points):
    client = InfluxDBClient(host="127.0.0.1", port=port, username="me", password=password,
                            database="home", gzip=True)
    try:
        client.write_points(points, time_precision="s")
        return 204
    except InfluxDBClientError as err:
        return err.code

room = [{"measurement": "room", "tags": {"floor": "1"}, "fields": {"temp": 20.0 + i, "on": True},
         "time": t0 + i} for i in range(5)]
print(json.dumps({"room": write(password, room),
                  "wrong": write("wrong", [{"measurement": "intruder", "fields": {"v": 1.0},
                                            "time": t0}])}))
"#;

#[test]
fn an_influxdb_1_client_writes_with_basic_auth_and_gzip() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let config = config(dir.path(), port);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let t0 = T0 + 7200;
    wait_for("the server to answer", Duration::from_secs(30), || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{port}/ping"))
            .output()
            .ok()?;
        (out.stdout == b"204").then_some(())
    });
    let out = Command::new(python())
        .args(["-c", INFLUX_1_CLIENT])
        .arg(port.to_string())
        .arg(TOKEN)
        .arg(t0.to_string())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "the influxdb script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answers, serde_json::json!({"room": 204, "wrong": 401}));
    // Five temperatures and five booleans (as 1).
    wait_for("the samples counted", Duration::from_secs(30), || {
        let status = agent.try_status()?;
        (find_source(&status, "push")?["samples"].as_u64()? == 10).then_some(())
    });
    let config_path = config.clone();
    settle(agent, Duration::from_secs(60), || {
        edgespool_tests::try_status_json(&config_path)
            .and_then(|s| find_source(&s, "push")?["errors"].as_u64())
            == Some(1)
    });
    let rows: Vec<Value> = read_tree(&dir.path().join("out"))
        .into_iter()
        .flat_map(|f| f.rows)
        .collect();
    let temps: Vec<(String, u64, f64)> =
        (0..5).map(|i| (utc(t0 + i), 1, 20.0 + i as f64)).collect();
    assert_eq!(windows(&rows, "push.room.temp"), temps);
    let on: Vec<(String, u64, f64)> = (0..5).map(|i| (utc(t0 + i), 1, 1.0)).collect();
    assert_eq!(windows(&rows, "push.room.on"), on);
    assert!(!rows.iter().any(|r| r["series"] == "push.intruder.v"));
}

#[test]
fn a_listen_source_on_another_machine_s_address_needs_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let body = "[[sources]]\nkind = \"listen\"\nname = \"push\"\naddress = \"0.0.0.0:8086\"\n\n[[sinks]]\nkind = \"local\"\nname = \"a\"\npath = \"/tmp/x\"\n";
    let config = write_agent_config(dir.path(), body);
    let out = edgespool_tests::edgespool(&["check-config", "--config", &config.to_string_lossy()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:11:11: source \"push\": address 0.0.0.0:8086 is reachable from other machines: give a `token` (or `token_file`) that writers must send",
            config.display()
        )),
        "{stderr}"
    );
}
