//! MQTT end to end: the built binary subscribed to a real Mosquitto broker, fed by
//! mosquitto_pub, its output read back from a local folder.

use std::path::Path;
use std::time::Duration;

use edgespool_tests::{
    Agent, COUNT_SUBSCRIPTION, MqttBroker, find_live_sink, live_sink_status, publish_counting,
    read_tree, samples_of, source_status, wait_for, write_agent_config,
};
use serde_json::Value;

const TASMOTA: &str = include_str!("../../agent/testdata/tasmota-sensor.json");
const ZIGBEE: &str = include_str!("../../agent/testdata/zigbee2mqtt.json");

fn config(dir: &Path, broker: &MqttBroker) -> std::path::PathBuf {
    let body = format!(
        r#"
[[sources]]
kind = "mqtt"
name = "mqtt"
url = "mqtt://127.0.0.1:{port}"
client_id = "edgespool-e2e"
interval = "200ms"

[[sources.subscriptions]]
topic = "tele/+/SENSOR"
payload = "flatten"
series = "{{topic.1}}.{{field}}"

[[sources.subscriptions]]
topic = "zigbee2mqtt/+"
payload = "flatten"
series = "{{topic.1}}.{{field}}"
timestamp = "/last_seen"

[[sources.subscriptions]]
topic = "shellies/+/sensor/temperature"
payload = "number"
series = "{{topic.1}}.temperature"
unit = "celsius"

{count}
[[sinks]]
kind = "local"
name = "archive"
path = "{out}"
late_grace = "0s"
"#,
        port = broker.port,
        out = dir.join("out").display(),
        count = COUNT_SUBSCRIPTION,
    );
    write_agent_config(dir, &body)
}

fn rows(dir: &Path) -> Vec<Value> {
    read_tree(&dir.join("out"))
        .into_iter()
        .flat_map(|f| f.rows)
        .collect()
}

#[test]
fn payload_shapes_restarts_and_garbage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = MqttBroker::start();
    let config = config(dir.path(), &broker);
    let log = dir.path().join("agent.log");
    let agent = Agent::start(&config, &log);
    wait_for("the agent connected", Duration::from_secs(30), || {
        agent
            .log_text()
            .contains("subscribed at the MQTT broker")
            .then_some(())
    });

    // Device payloads, as Tasmota, zigbee2mqtt and Shelly send them.
    broker.publish("tele/plug1/SENSOR", 1, &[TASMOTA.trim()]);
    broker.publish("zigbee2mqtt/kitchen", 1, &[ZIGBEE.trim()]);
    broker.publish("shellies/ht1/sensor/temperature", 1, &["21.50", "NaN"]);
    // Garbage: not JSON, binary, huge.
    broker.publish("tele/plug1/SENSOR", 1, &["{not json"]);
    broker.publish_bytes("shellies/ht1/sensor/temperature", &[0xff, 0xfe, 0x00, 0x01]);
    broker.publish_bytes("tele/plug1/SENSOR", &vec![b'7'; 300 * 1024]);

    // Counting messages with event times an hour after T0 (their partitions close at
    // once): 200, a broker restart, 100 more while the agent reconnects, an agent
    // restart, 50 more while it is away.
    publish_counting(&broker, 0, 200);
    broker.restart();
    publish_counting(&broker, 200, 100);
    wait_for("300 counted", Duration::from_secs(60), || {
        (samples_of(&rows(dir.path()), "mqtt.count.a.v") == 300).then_some(())
    });
    agent.terminate();
    publish_counting(&broker, 300, 50);
    let agent = Agent::start(&config, &log);

    // The zigbee2mqtt message is stamped by its own last_seen: 14:05:33Z on 2026-11-21.
    let landed = wait_for("every message landed", Duration::from_secs(120), || {
        let rows = rows(dir.path());
        (samples_of(&rows, "mqtt.count.a.v") == 350
            && samples_of(&rows, "mqtt.plug1.BME280.Temperature") == 1
            && samples_of(&rows, "mqtt.ht1.temperature") == 1)
            .then_some(rows)
    });
    let kitchen: Vec<&Value> = landed
        .iter()
        .filter(|r| r["series"] == "mqtt.kitchen.temperature")
        .collect();
    assert_eq!(kitchen.len(), 1, "{kitchen:?}");
    assert_eq!(kitchen[0]["window_start"], "2026-11-21T14:05:33Z");
    assert_eq!(kitchen[0]["mean"], 21.52);
    let zigbee_fields: Vec<&str> = landed
        .iter()
        .filter_map(|r| r["series"].as_str())
        .filter(|s| s.starts_with("mqtt.kitchen."))
        .collect();
    assert!(
        !zigbee_fields
            .iter()
            .any(|s| s.contains("update") || s.contains("last_seen")),
        "strings and the timestamp are not fields: {zigbee_fields:?}"
    );
    let plug = landed
        .iter()
        .find(|r| r["series"] == "mqtt.plug1.BME280.Pressure")
        .expect("a Tasmota field");
    assert_eq!(plug["mean"], 1013.2);
    let shelly = landed
        .iter()
        .find(|r| r["series"] == "mqtt.ht1.temperature")
        .expect("a Shelly reading");
    assert_eq!(
        (shelly["mean"].as_f64(), &shelly["unit"]),
        (Some(21.5), &Value::from("celsius"))
    );

    let status = agent.status();
    let source = source_status(&status, "mqtt").clone();
    assert_eq!(source["invalid"], 3, "not JSON, binary, huge: {source}");
    assert_eq!(status["counters"]["non_finite"], 1, "NaN: {status}");
    let log = std::fs::read_to_string(&log).expect("log");
    assert!(
        log.contains("tele/+/SENSOR: message on tele/plug1/SENSOR is not JSON"),
        "{log}"
    );
    assert!(log.contains("shellies/+/sensor/temperature: message on shellies/ht1/sensor/temperature is not UTF-8 text"));
    assert!(log.contains("of 307200 bytes is over max_payload (262144 bytes)"));
    agent.terminate();
}

/// The agent's live feed to `broker`, with a local archive, fed by an MQTT counting
/// source (event times) and, if given, a sysfs tree.
fn feed_config(
    dir: &Path,
    broker: &MqttBroker,
    max_age: &str,
    sysfs: Option<&Path>,
) -> std::path::PathBuf {
    let sysfs = sysfs.map_or(String::new(), |root| {
        format!(
            "[[sources]]\nkind = \"sysfs\"\nname = \"board\"\nroot = \"{}\"\ninterval = \"250ms\"\n[[sources.files]]\nfield = \"temp\"\npath = \"/temp\"\n",
            root.display()
        )
    });
    let body = format!(
        r#"
[[sources]]
kind = "mqtt"
name = "mqtt"
url = "mqtt://127.0.0.1:{port}"
client_id = "edgespool-e2e-in"
interval = "200ms"
{count}
{sysfs}
[[sinks]]
kind = "local"
name = "archive"
path = "{out}"
late_grace = "0s"

[[sinks]]
kind = "mqtt"
name = "dashboard"
url = "mqtt://127.0.0.1:{port}"
retain = true
max_age = "{max_age}"
"#,
        port = broker.port,
        out = dir.join("out").display(),
        count = COUNT_SUBSCRIPTION,
    );
    write_agent_config(dir, &body)
}

/// The live feed `dashboard` of a status; fails the test if it is not there.
fn feed_status(status: &Value) -> Value {
    live_sink_status(status, "dashboard").clone()
}

/// The live feed `dashboard` of the agent's status, or `None` while the agent has not
/// reported it yet; for polls.
fn try_feed_status(agent: &Agent) -> Option<Value> {
    find_live_sink(&agent.try_status()?, "dashboard").cloned()
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

fn rfc3339(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .expect("a valid time")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[test]
fn live_feed_publishes_windows_skips_old_ones_and_leaves_a_last_will() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = MqttBroker::start();
    let subscriber = broker.subscribe("edgespool/#", "e2e-watcher");
    let config = feed_config(dir.path(), &broker, "10m", None);
    let log = dir.path().join("agent.log");
    let agent = Agent::start(&config, &log);
    wait_for("online", Duration::from_secs(30), || {
        subscriber
            .messages()
            .contains(&("edgespool/e2e/availability".into(), "online".into()))
            .then_some(())
    });
    wait_for("the source connected", Duration::from_secs(30), || {
        agent
            .log_text()
            .contains("source=mqtt session_present")
            .then_some(())
    });

    // Three samples 30 s ago (one window; milliseconds apart, else the second and third
    // would repeat the first), and one two hours ago (older than max_age).
    let recent = now_s() - 30;
    let old = now_s() - 7200;
    let ms = |n: i64| recent * 1000 + n * 100;
    broker.publish(
        "count/a",
        1,
        &[
            &format!("{{\"t\":{},\"v\":1}}", ms(1)),
            &format!("{{\"t\":{},\"v\":2}}", ms(2)),
            &format!("{{\"t\":{},\"v\":3}}", ms(3)),
            &format!("{{\"t\":{old},\"v\":5}}"),
        ],
    );
    let topic = "edgespool/e2e/mqtt.count.a.v";
    let message = wait_for("the window published", Duration::from_secs(30), || {
        subscriber
            .messages()
            .into_iter()
            .find(|(t, _)| t == topic)
            .map(|(_, payload)| payload)
    });
    let window: Value = serde_json::from_str(&message).expect("a JSON payload");
    assert_eq!(window["device"], "e2e");
    assert_eq!(window["series"], "mqtt.count.a.v");
    assert_eq!(window["window_start"], rfc3339(recent));
    assert_eq!(window["window_end"], rfc3339(recent + 1));
    assert_eq!(
        (
            &window["count"],
            &window["min"],
            &window["max"],
            &window["mean"]
        ),
        (
            &Value::from(3),
            &Value::from(1.0),
            &Value::from(3.0),
            &Value::from(2.0)
        )
    );
    assert_eq!(
        (&window["median"], &window["stdev"]),
        (&Value::from(2.0), &Value::from(1.0))
    );
    // Retained for a dashboard that subscribes later.
    assert_eq!(broker.retained(topic), Some(message.clone()));

    let feed = wait_for("the counts in status", Duration::from_secs(30), || {
        let feed = try_feed_status(&agent)?;
        (feed["skipped"] == 1 && feed["published"] == 1).then_some(feed)
    });
    assert_eq!(feed["state"], "connected", "{feed}");
    assert_eq!(feed["kind"], "mqtt");
    // The old window is skipped by the feed, not by the archive.
    let archived = wait_for("the old window archived", Duration::from_secs(60), || {
        read_tree(&dir.path().join("out"))
            .into_iter()
            .flat_map(|f| f.rows)
            .find(|r| r["window_start"] == rfc3339(old))
    });
    assert_eq!(archived["mean"], 5.0);
    let published: Vec<(String, String)> = subscriber
        .messages()
        .into_iter()
        .filter(|(t, _)| t == topic)
        .collect();
    assert_eq!(published.len(), 1, "only the recent window: {published:?}");

    // kill -9: no goodbye, so the broker publishes the last will.
    agent.kill9();
    wait_for("the last will", Duration::from_secs(30), || {
        (subscriber.messages().last()
            == Some(&("edgespool/e2e/availability".into(), "offline".into())))
        .then_some(())
    });
    assert_eq!(
        broker.retained("edgespool/e2e/availability").as_deref(),
        Some("offline")
    );
}

#[test]
fn live_feed_after_an_outage_skips_what_grew_old_and_accounts_for_every_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sys = dir.path().join("sys");
    std::fs::create_dir_all(&sys).expect("mkdir");
    std::fs::write(sys.join("temp"), "41\n").expect("write");
    let mut broker = MqttBroker::start();
    let subscriber = broker.subscribe("edgespool/#", "e2e-watcher");
    let config = feed_config(dir.path(), &broker, "3s", Some(&sys));
    let log = dir.path().join("agent.log");
    let agent = Agent::start(&config, &log);
    let published_before = wait_for("a few windows published", Duration::from_secs(30), || {
        let feed = try_feed_status(&agent)?;
        let published = feed["published"].as_u64().unwrap_or(0);
        (published >= 3).then_some(published)
    });

    // The broker goes away long enough for windows to grow older than max_age.
    broker.stop();
    wait_for(
        "windows skipped in the outage",
        Duration::from_secs(60),
        || {
            let feed = try_feed_status(&agent)?;
            (feed["state"] == "disconnected" && feed["skipped"].as_u64() >= Some(4)).then_some(())
        },
    );
    let during = feed_status(&agent.status());
    assert!(
        during["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("MQTT connection: ")),
        "{during}"
    );
    broker.start_again();
    wait_for("publishing again", Duration::from_secs(60), || {
        let feed = try_feed_status(&agent)?;
        (feed["state"] == "connected" && feed["published"].as_u64() >= Some(published_before + 3))
            .then_some(())
    });
    assert_eq!(agent.terminate().code(), Some(0));

    // Every window the spool committed was either published or skipped, once.
    let status = edgespool_tests::status_json(&config);
    let feed = feed_status(&status);
    let (published, skipped) = (
        feed["published"].as_u64().expect("published"),
        feed["skipped"].as_u64().expect("skipped"),
    );
    let archived = read_tree(&dir.path().join("out"))
        .into_iter()
        .flat_map(|f| f.rows)
        .filter(|r| r["series"] == "board.temp")
        .count() as u64;
    let held = status["spool"]["rows"].as_u64().expect("rows held");
    assert_eq!(published + skipped, archived + held, "{status}");
    assert!(skipped >= 4, "{feed}");
    assert_eq!(feed["queued"], 0);
    assert_eq!(feed["state"], "disconnected", "said goodbye: {feed}");

    // The subscriber (a persistent session, so it also gets what the broker queued for
    // it while it reconnected) saw each published window, and a clean goodbye. QoS 1 is
    // at least once: a message in flight when the broker stopped may come twice.
    wait_for("the goodbye", Duration::from_secs(30), || {
        (subscriber.messages().last()
            == Some(&("edgespool/e2e/availability".into(), "offline".into())))
        .then_some(())
    });
    let mut windows: Vec<String> = subscriber
        .messages()
        .into_iter()
        .filter(|(t, _)| t == "edgespool/e2e/board.temp")
        .map(|(_, payload)| {
            let v: Value = serde_json::from_str(&payload).expect("JSON");
            assert_eq!(v["mean"], 41.0);
            v["window_start"].as_str().expect("start").to_owned()
        })
        .collect();
    let received = windows.len();
    windows.sort();
    windows.dedup();
    assert_eq!(windows.len() as u64, published, "{feed}");
    assert!(received - windows.len() <= 2, "{received} received");
}
