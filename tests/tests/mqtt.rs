//! MQTT end to end: the built binary subscribed to a real Mosquitto broker, fed by
//! mosquitto_pub, its output read back from a local folder.

use std::path::Path;
use std::time::Duration;

use edgespool_tests::{Agent, MqttBroker, T0, read_tree, wait_for, write_agent_config};
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

[[sources.subscriptions]]
topic = "count/#"
payload = "json"
timestamp = "/t"
[[sources.subscriptions.fields]]
name = "v"
pointer = "/v"

[[sinks]]
kind = "local"
name = "archive"
path = "{out}"
"#,
        port = broker.port,
        out = dir.join("out").display(),
    );
    write_agent_config(dir, &body)
}

fn rows(dir: &Path) -> Vec<Value> {
    read_tree(&dir.join("out"))
        .into_iter()
        .flat_map(|f| f.rows)
        .collect()
}

fn samples_of(rows: &[Value], series: &str) -> u64 {
    rows.iter()
        .filter(|r| r["series"] == series)
        .map(|r| r["count"].as_u64().expect("count"))
        .sum()
}

/// `n` counting messages, one per second of event time from `T0 + 3600 + from`.
fn counting(from: i64, n: i64) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("{{\"t\":{},\"v\":1}}", T0 + 3600 + i))
        .collect()
}

fn publish_counting(broker: &MqttBroker, from: i64, n: i64) {
    let messages = counting(from, n);
    let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
    broker.publish("count/a", 1, &refs);
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
            .contains("connected to the MQTT broker")
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
    let source = status["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "mqtt"))
        .expect("the mqtt source")
        .clone();
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
