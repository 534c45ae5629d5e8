//! MQTT limits end to end: no message stalls a subscription, whatever its size; a
//! publisher cannot make endless series; bad payloads do not flood the log. The built
//! binary against a real Mosquitto broker.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{
    Agent, COUNT_SUBSCRIPTION, MqttBroker, T0, find_source, publish_counting, read_tree,
    samples_of, wait_for, write_agent_config,
};
use serde_json::Value;

/// An MQTT source `lim` with `keys`: `count/#` read as JSON stamped by `/t` (an hour
/// after T0: partitions close at once), `probe/#` as numbers; a local sink in `out/`.
fn config(dir: &Path, broker: &MqttBroker, keys: &str) -> PathBuf {
    let body = format!(
        r#"
[[sources]]
kind = "mqtt"
name = "lim"
url = "mqtt://127.0.0.1:{port}"
client_id = "edgespool-limits"
interval = "100ms"
{keys}
{count}
[[sources.subscriptions]]
topic = "probe/#"
payload = "number"

[[sinks]]
kind = "local"
name = "archive"
path = "{out}"
late_grace = "0s"
"#,
        count = COUNT_SUBSCRIPTION,
        port = broker.port,
        out = dir.join("out").display(),
    );
    write_agent_config(dir, &body)
}

/// Starts the agent and waits until its subscriptions work (a probe comes through).
fn start_subscribed(config: &Path, log: &Path, broker: &MqttBroker) -> Agent {
    let agent = Agent::start(config, log);
    wait_for("the subscriptions to work", Duration::from_secs(30), || {
        if !broker.try_publish("probe/x", 1, &["1"]) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
        let status = agent.try_status()?;
        (find_source(&status, "lim")?["samples"].as_u64()? > 0).then_some(())
    });
    agent
}

/// The source's counter `name` in a status.
fn counter(status: &Value, name: &str) -> u64 {
    find_source(status, "lim")
        .and_then(|s| s[name].as_u64())
        .unwrap_or(0)
}

/// Every row of the output.
fn rows(dir: &Path) -> Vec<Value> {
    read_tree(&dir.join("out"))
        .into_iter()
        .flat_map(|f| f.rows)
        .collect()
}

/// The lines of the agent's log that hold `text`.
fn lines_with(log: &Path, text: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(text))
        .map(str::to_owned)
        .collect()
}

/// Publishes many messages at QoS 1 over one MQTT 3.1.1 connection (mosquitto_pub takes
/// one topic per run): CONNECT, the PUBLISHes, their PUBACKs read, DISCONNECT.
fn publish_many(port: u16, messages: &[(String, String)]) {
    fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { byte | 0x80 } else { byte });
            if n == 0 {
                return;
            }
        }
    }
    fn string(text: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the broker accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    let mut connect = Vec::new();
    string("MQTT", &mut connect);
    connect.extend_from_slice(&[4, 0x02, 0, 30]); // 3.1.1, clean session, keep-alive 30 s
    string("edgespool-test-publisher", &mut connect);
    let mut packets = vec![0x10];
    remaining_length(connect.len(), &mut packets);
    packets.extend_from_slice(&connect);
    for (i, (topic, payload)) in messages.iter().enumerate() {
        let mut body = Vec::new();
        string(topic, &mut body);
        body.extend_from_slice(&((i % 65535 + 1) as u16).to_be_bytes());
        body.extend_from_slice(payload.as_bytes());
        packets.push(0x32); // PUBLISH, QoS 1
        remaining_length(body.len(), &mut packets);
        packets.extend_from_slice(&body);
    }
    stream.write_all(&packets).expect("the messages are sent");
    // CONNACK, then a PUBACK per message: 4 bytes each.
    let mut acks = vec![0; 4 * (messages.len() + 1)];
    stream
        .read_exact(&mut acks)
        .expect("the broker acknowledges every message");
    assert_eq!(
        &acks[..4],
        &[0x20, 2, 0, 0],
        "the broker accepted the connection"
    );
    stream.write_all(&[0xe0, 0]).expect("DISCONNECT");
}

#[test]
fn a_huge_message_neither_stalls_the_subscription_nor_comes_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = MqttBroker::start();
    // max_packet is left at its default: 4 × max_payload, at least 1 MiB.
    let config = config(dir.path(), &broker, "max_payload = \"64 KiB\"");
    let log = dir.path().join("agent.log");
    let agent = start_subscribed(&config, &log, &broker);

    // Ten messages, 20 MB (over max_packet: the broker drops it for this client), 512 KiB
    // (over max_payload, within max_packet: read, counted invalid, acknowledged), ten more.
    publish_counting(&broker, 0, 10);
    broker.publish_bytes("count/a", &vec![b'7'; 20_000_000]);
    broker.publish_bytes("count/a", &vec![b'7'; 512 * 1024]);
    publish_counting(&broker, 10, 10);
    wait_for("the twenty around them", Duration::from_secs(90), || {
        (samples_of(&rows(dir.path()), "lim.count.a.v") == 20).then_some(())
    });
    let status = wait_for("the big one counted", Duration::from_secs(30), || {
        let status = agent.try_status()?;
        (counter(&status, "invalid") == 1).then_some(status)
    });
    assert_eq!(
        counter(&status, "errors"),
        0,
        "no connection error: {status}"
    );
    assert_eq!(
        lines_with(&log, "connected to the MQTT broker").len(),
        1,
        "one connection, no reconnect loop"
    );
    assert_eq!(
        lines_with(&log, "of 524288 bytes is over max_payload (65536 bytes)").len(),
        1
    );
    agent.terminate();

    // After a restart neither comes again: the session resumes with ten new messages.
    let agent = Agent::start(&config, &log);
    wait_for("the agent reconnected", Duration::from_secs(30), || {
        (lines_with(&log, "connected to the MQTT broker").len() == 2).then_some(())
    });
    publish_counting(&broker, 20, 10);
    wait_for("the ten after the restart", Duration::from_secs(90), || {
        (samples_of(&rows(dir.path()), "lim.count.a.v") == 30).then_some(())
    });
    // Anything redelivered would have come before the new messages.
    let status = agent.status();
    assert_eq!(counter(&status, "invalid"), 1, "{status}");
    assert_eq!(counter(&status, "errors"), 0, "{status}");
    assert_eq!(lines_with(&log, "connected to the MQTT broker").len(), 2);
    agent.terminate();
}

#[test]
fn a_publisher_of_endless_topics_gets_max_series_and_one_log_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = MqttBroker::start();
    // The probe takes one series of the hundred.
    let config = config(dir.path(), &broker, "max_series = 101");
    let log = dir.path().join("agent.log");
    let agent = start_subscribed(&config, &log, &broker);

    let messages: Vec<(String, String)> = (0..2000)
        .map(|i| {
            let payload = format!("{{\"t\":{},\"v\":{i}}}", T0 + 3600 + i);
            (format!("count/t{i}"), payload)
        })
        .collect();
    publish_many(broker.port, &messages);
    let status = wait_for("1900 samples dropped", Duration::from_secs(120), || {
        let status = agent.try_status()?;
        (counter(&status, "series_dropped") == 1900).then_some(status)
    });
    let series = wait_for("a hundred series", Duration::from_secs(90), || {
        let mut series: Vec<String> = rows(dir.path())
            .iter()
            .filter_map(|r| r["series"].as_str())
            .filter(|s| s.starts_with("lim.count."))
            .map(str::to_owned)
            .collect();
        series.sort();
        series.dedup();
        (series.len() >= 100).then_some(series)
    });
    assert_eq!(series.len(), 100, "{series:?}");
    // The first hundred topics, in the order they came.
    assert!(series.contains(&"lim.count.t0.v".to_owned()), "{series:?}");
    assert!(series.contains(&"lim.count.t99.v".to_owned()), "{series:?}");
    assert_eq!(counter(&status, "invalid"), 0, "{status}");
    let text = edgespool_tests::edgespool(&["status", "--config", config.to_str().expect("utf-8")]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("1900 dropped over max_series"), "{text}");
    let capped = lines_with(&log, "too many series");
    assert_eq!(capped.len(), 1, "{capped:?}");
    assert!(capped[0].contains("max_series (101) reached"), "{capped:?}");
    assert!(lines_with(&log, "samples of further series dropped").is_empty());
    agent.terminate();
}

#[test]
fn many_different_bad_payloads_make_a_few_counted_log_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = MqttBroker::start();
    let config = config(dir.path(), &broker, "");
    let log = dir.path().join("agent.log");
    let agent = start_subscribed(&config, &log, &broker);

    let bad: Vec<String> = (0..500).map(|i| format!("{{broken {i}")).collect();
    let refs: Vec<&str> = bad.iter().map(String::as_str).collect();
    broker.publish("count/a", 1, &refs);
    wait_for("500 counted invalid", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        (counter(&status, "invalid") == 500).then_some(())
    });
    // The first three at once; the rest in one line when the minute since is over.
    let lines = wait_for("the minute's report", Duration::from_secs(90), || {
        let lines = lines_with(&log, "invalid value");
        (lines.len() >= 4).then_some(lines)
    });
    assert_eq!(
        lines.len(),
        4,
        "the first lines: {:?}",
        &lines[..5.min(lines.len())]
    );
    for (i, line) in lines[..3].iter().enumerate() {
        assert!(line.contains(&format!("{{broken {i}")), "{line}");
        assert!(!line.contains("more since"), "{line}");
    }
    assert!(
        lines[3].contains("invalid value (496 more since the last report)"),
        "{lines:?}"
    );
    assert!(lines[3].contains("{broken 499"), "{lines:?}");
    agent.terminate();
}
