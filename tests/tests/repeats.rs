//! A reading is counted once (DESIGN.md, invariant 6): an HTTP API polled far faster
//! than its sensor updates returns the same event-timestamped reading again and again,
//! and keeps returning the last one across a restart of the agent. Each reading lands
//! once, the repeats are counted in `status`, and a genuinely late reading after the
//! restart is still kept, as a late row. The built binary against a loopback API; the
//! output read back from the local sink's NDJSON files.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use edgespool_tests::{
    Agent, COUNT_SUBSCRIPTION, MqttBroker, T0, archive_sink, edgespool, find_source, read_tree,
    source_status, status_json, table_source, wait_for, write_agent_config, write_file,
};
use serde_json::{Value, json};

/// An API whose answer the test changes, counting how often the current one was served.
struct ChangingApi {
    url: String,
    now: Arc<Mutex<(String, usize)>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ChangingApi {
    fn start(body: String) -> ChangingApi {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("a free loopback port");
        let port = server.server_addr().to_ip().expect("an IP listener").port();
        let now = Arc::new(Mutex::new((body, 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (now, stop) = (Arc::clone(&now), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(50)) else {
                        continue;
                    };
                    let body = {
                        let mut now = now.lock().expect("lock");
                        now.1 += 1;
                        now.0.clone()
                    };
                    let header = tiny_http::Header::from_bytes("Content-Type", "application/json")
                        .expect("a valid header");
                    let _ =
                        request.respond(tiny_http::Response::from_string(body).with_header(header));
                }
            })
        };
        ChangingApi {
            url: format!("http://127.0.0.1:{port}/data.json"),
            now,
            stop,
            thread: Some(thread),
        }
    }

    /// Answers `body` from now on.
    fn set(&self, body: String) {
        *self.now.lock().expect("lock") = (body, 0);
    }

    /// How often the current answer was served.
    fn served(&self) -> usize {
        self.now.lock().expect("lock").1
    }
}

impl Drop for ChangingApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A table answer: sensor 7's readings `(seconds after T0, pm)` (Temperature = pm + 20,
/// Voc null), and sensor 8, whose pm is "NaN" and whose other channels are null.
fn readings(of_7: &[(i64, f64)]) -> String {
    let mut data: Vec<Value> = of_7
        .iter()
        .map(|(at, pm)| json!([7, pm, pm + 20.0, null, T0 + at]))
        .collect();
    data.push(json!([8, "NaN", null, null, T0 + 5]));
    json!({
        "fields": ["ID", "pm", "Temperature", "Voc", "last_seen"],
        "data": data,
    })
    .to_string()
}

fn config(dir: &Path, url: &str) -> std::path::PathBuf {
    // 10 s windows, 1 min partitions: every reading's partition (2026-01-02) closes as soon
    // as it is committed, so a reading taken twice would come back as a late part.
    write_file(
        dir,
        "edgespool.toml",
        &format!(
            "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"10s\"\npartition = \"1m\"\ngrace = \"0s\"\n\n{}\n{}",
            dir.join("spool.db").display(),
            table_source(url, &["pm", "Temperature", "Voc"]),
            archive_sink(dir),
        ),
    )
}

/// The key suffix of part `part` of the partition `minute` minutes after T0.
fn part(minute: i64, part: u32) -> String {
    format!("e2e-20260102T03{minute:02}-part-{part:04}.ndjson")
}

fn has_part(dir: &Path, minute: i64, n: u32) -> bool {
    let want = part(minute, n);
    read_tree(&dir.join("archive"))
        .iter()
        .any(|f| f.key.ends_with(&want))
}

/// Serves `body` until it was polled at least `polls` times and the partition `minute` has
/// its part `n` in the archive (so that polls went on after its window was written).
fn serve_until_delivered(api: &ChangingApi, dir: &Path, body: String, minute: i64, n: u32) {
    api.set(body);
    wait_for(
        &format!("part {n} of minute {minute}, after polls"),
        Duration::from_secs(90),
        || (api.served() >= 10 && has_part(dir, minute, n)).then_some(()),
    );
    // And polls after it was delivered, too.
    let served = api.served();
    wait_for("more polls", Duration::from_secs(30), || {
        (api.served() >= served + 10).then_some(())
    });
}

fn repeats_of(config: &Path) -> u64 {
    source_status(&status_json(config), "pa")["repeats"]
        .as_u64()
        .expect("status --json has a repeats count per source")
}

#[test]
fn an_api_polled_faster_than_it_updates_lands_each_reading_once_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = ChangingApi::start(readings(&[(5, 1.0)]));
    let config = config(dir.path(), &api.url);
    let log = dir.path().join("agent.log");
    let agent = Agent::start(&config, &log);

    // One reading a minute, each polled many times; minute 2 has two readings of one
    // window (a device that sends its last two).
    serve_until_delivered(&api, dir.path(), readings(&[(5, 1.0)]), 0, 0);
    serve_until_delivered(&api, dir.path(), readings(&[(65, 2.0)]), 1, 0);
    serve_until_delivered(&api, dir.path(), readings(&[(125, 3.0), (127, 4.0)]), 2, 0);
    serve_until_delivered(&api, dir.path(), readings(&[(185, 5.0)]), 3, 0);
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
    let before = repeats_of(&config);
    assert!(before >= 2 * 4 * 15, "repeats before the restart: {before}");

    // The API still answers the last reading: the first polls after the restart are
    // repeats of a reading already committed. Then it adds an older reading it had not
    // sent (a backlog): a late row, kept.
    let agent = Agent::start(&config, &log);
    let served = api.served();
    wait_for("polls after the restart", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        let running =
            status["daemon"]["state"] == "running" && find_source(&status, "pa").is_some();
        (running && api.served() >= served + 10).then_some(())
    });
    serve_until_delivered(&api, dir.path(), readings(&[(185, 5.0), (182, 9.0)]), 3, 1);
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");

    let files = read_tree(&dir.path().join("archive"));
    let keys: Vec<&str> = files.iter().map(|f| f.key.as_str()).collect();
    let expected: Vec<String> = [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1)]
        .iter()
        .map(|&(m, n)| part(m, n))
        .collect();
    assert_eq!(
        keys.len(),
        expected.len(),
        "one part per minute, and one late part for the backlog reading: {keys:?}"
    );
    for want in &expected {
        assert!(
            keys.iter().any(|k| k.ends_with(want.as_str())),
            "{want} in {keys:?}"
        );
    }
    // Per window: as many samples as distinct readings, with their values.
    let mut windows: Vec<(String, String, u64, f64, f64)> = files
        .iter()
        .flat_map(|f| &f.rows)
        .map(|r| {
            (
                r["series"].as_str().expect("series").to_owned(),
                r["window_start"].as_str().expect("window_start").to_owned(),
                r["count"].as_u64().expect("count"),
                r["first"].as_f64().expect("first"),
                r["last"].as_f64().expect("last"),
            )
        })
        .collect();
    windows.sort_by(|a, b| (&a.0, &a.1, a.3.to_bits()).cmp(&(&b.0, &b.1, b.3.to_bits())));
    let pm: Vec<(&str, u64, f64, f64)> = windows
        .iter()
        .filter(|w| w.0 == "pa.7.pm")
        .map(|w| (w.1.as_str(), w.2, w.3, w.4))
        .collect();
    assert_eq!(
        pm,
        [
            ("2026-01-02T03:00:00Z", 1, 1.0, 1.0),
            ("2026-01-02T03:01:00Z", 1, 2.0, 2.0),
            ("2026-01-02T03:02:00Z", 2, 3.0, 4.0),
            ("2026-01-02T03:03:00Z", 1, 5.0, 5.0),
            ("2026-01-02T03:03:00Z", 1, 9.0, 9.0),
        ],
        "{windows:?}"
    );
    let series: std::collections::BTreeSet<&str> = windows.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(
        series.into_iter().collect::<Vec<_>>(),
        ["pa.7.Temperature", "pa.7.pm"],
        "null and NaN make no series"
    );

    // The counters: repeats across the restart; every sample produced either landed or
    // was a repeat; null and NaN counted, not invalid.
    let status = status_json(&config);
    let pa = source_status(&status, "pa");
    let count = |name: &str| {
        pa[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} in {pa}"))
    };
    assert!(
        count("repeats") >= before + 2 * 20,
        "repeats after the restart: {pa}"
    );
    let landed: u64 = windows.iter().map(|w| w.2).sum();
    assert_eq!(landed, 12, "{windows:?}");
    assert_eq!(count("samples"), landed + count("repeats"), "{pa}");
    assert_eq!(count("invalid"), 0, "{pa}");
    assert!(count("not_finite") >= 50, "one NaN per poll: {pa}");
    assert!(
        count("nulls") >= 3 * count("not_finite"),
        "three nulls per poll: {pa}"
    );
    assert_eq!(
        status["counters"]["non_finite"],
        count("not_finite"),
        "{status}"
    );
    // The text says the same.
    let text = edgespool(&["status", "--config", config.to_str().expect("utf-8")]);
    let text = String::from_utf8_lossy(&text.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("pa "))
        .unwrap_or_else(|| panic!("a line for pa in {text}"));
    let shown = format!(
        ", {} repeats dropped, {} null values, {} NaN/Inf values",
        count("repeats"),
        count("nulls"),
        count("not_finite")
    );
    assert!(line.contains(&shown), "{line:?} shows {shown:?}");
}

/// A device that resends (or a broker that delivers a message again) over MQTT: the
/// same message twice, the same time with another value, and the last one again while
/// the agent is away, queued by the broker for its kept session.
#[test]
fn an_mqtt_message_sent_again_counts_once_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = MqttBroker::start();
    let config = write_agent_config(
        dir.path(),
        &format!(
            "[[sources]]\nkind = \"mqtt\"\nname = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\n\
             client_id = \"edgespool-repeats\"\ninterval = \"200ms\"\n{COUNT_SUBSCRIPTION}\n{}",
            archive_sink(dir.path()),
            port = broker.port,
        ),
    );
    let log = dir.path().join("agent.log");
    let connected = |agent: &Agent, times: usize| {
        wait_for("the agent connected", Duration::from_secs(30), || {
            (agent
                .log_text()
                .matches("subscribed at the MQTT broker")
                .count()
                >= times)
                .then_some(())
        });
    };
    let repeats_at_least = |agent: &Agent, n: u64| {
        wait_for(&format!("{n} repeats"), Duration::from_secs(60), || {
            let status = agent.try_status()?;
            (find_source(&status, "mqtt")?["repeats"].as_u64()? >= n).then_some(())
        });
    };
    // In two partitions: one flushed before the other arrives is not a late part.
    let (first, second) = (T0 + 3600 + 1, T0 + 3600 + 62);
    let agent = Agent::start(&config, &log);
    connected(&agent, 1);
    broker.publish(
        "count/a",
        1,
        &[
            &format!("{{\"t\":{first},\"v\":1}}"),
            &format!("{{\"t\":{first},\"v\":1}}"),
            &format!("{{\"t\":{second},\"v\":2}}"),
            &format!("{{\"t\":{first},\"v\":9}}"),
        ],
    );
    repeats_at_least(&agent, 2);
    assert!(agent.terminate().success());
    broker.publish("count/a", 1, &[&format!("{{\"t\":{second},\"v\":2}}")]);
    let agent = Agent::start(&config, &log);
    connected(&agent, 2);
    repeats_at_least(&agent, 3);
    assert!(agent.terminate().success());

    let files = read_tree(&dir.path().join("archive"));
    assert!(
        files.iter().all(|f| f.key.ends_with("-part-0000.ndjson")),
        "no late part: {:?}",
        files.iter().map(|f| &f.key).collect::<Vec<_>>()
    );
    let rows: Vec<Value> = files.into_iter().flat_map(|f| f.rows).collect();
    let got: Vec<(u64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["count"].as_u64().expect("count"),
                r["mean"].as_f64().expect("mean"),
            )
        })
        .collect();
    assert_eq!(got, [(1, 1.0), (1, 2.0)], "the first value stays: {rows:?}");
    let status = status_json(&config);
    let source = source_status(&status, "mqtt");
    // (A message whose acknowledgement the stop cut off comes again: one more repeat.)
    let repeats = source["repeats"].as_u64().expect("repeats");
    assert!(repeats >= 3, "{source}");
    assert_eq!(source["samples"], 2 + repeats, "{source}");
}
