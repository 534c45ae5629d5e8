//! The MQTT source: subscribes to topics of a broker and turns payloads into samples.
//!
//! A background task owns the connection (rumqttc's event loop): it reconnects with
//! backoff, subscribes when the broker has no session for us, parses each message and
//! parks the samples. Every tick, [`Source::sample`] hands what is parked to the
//! aggregator and only then acknowledges the QoS 1 messages (manual acks): a message the
//! agent never handed over is redelivered by the broker, in this session or the next.
//! A redelivery of a message already handed over (the acknowledgement was lost with the
//! connection) is recognised by its packet id and content and not counted again.
//!
//! No message stops the subscription, whatever its size. The client speaks MQTT 5 and
//! announces a Maximum Packet Size (`max_packet`): the broker drops a larger message
//! without sending it (and behaves as if delivered, so it never comes again). A message
//! up to that size is read whole (so `max_packet` bounds the memory one message takes);
//! one with a payload over `max_payload` is counted invalid and acknowledged like any
//! other. Every new series counts against the source's `max_series`; samples of series
//! beyond it are dropped and counted.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop};
use serde_json::Value;

use super::http::{event_time, number};
use super::{Batch, Series, Source, SourceError, Stamp};
use crate::broker::{self, reconnect_delay};
use crate::clock;
use crate::config::{MqttSource as MqttConfig, MqttSubscription, Payload};

/// The most QoS 1 messages the broker may send before the agent acknowledges them
/// (MQTT 5 Receive Maximum): per hand-over `interval` at most this many come.
// Design: only their samples wait for the hand-over (their payloads are dropped once
// read), so this bounds a hand-over's size, not the memory of the messages.
const RECEIVE_MAXIMUM: u16 = 1000;

/// What the connection task has received and not yet handed over.
#[derive(Default)]
struct Parked {
    batch: Batch,
    /// Messages to acknowledge once their samples are handed over (packet ids only).
    acks: Vec<Publish>,
    /// Connection problems since the last hand-over.
    errors: Vec<String>,
}

pub struct MqttSource {
    parked: Arc<Mutex<Parked>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MqttSource {
    /// Connects in the background; must be called inside the runtime.
    pub fn new(name: &str, config: &MqttConfig) -> Result<MqttSource, SourceError> {
        let parse = |reason: String| SourceError::Parse { reason };
        let mut options = broker::options_v5(&config.connection, || format!("edgespool-{name}"))
            .map_err(parse)?;
        options
            .set_manual_acks(true)
            // Design: the broker drops larger messages for this client (MQTT 5, 3.1.2.25);
            // smaller ones over `max_payload` are read, counted and acknowledged.
            .set_max_packet_size(Some(config.max_packet_bytes()))
            .set_receive_maximum(Some(RECEIVE_MAXIMUM));
        let (client, eventloop) = AsyncClient::new(options, 1024);
        let parked = Arc::new(Mutex::new(Parked::default()));
        let reader = Reader::new(name, config);
        let task = tokio::spawn(connection(
            eventloop,
            client.clone(),
            reader,
            Arc::clone(&parked),
        ));
        Ok(MqttSource {
            parked,
            client,
            task,
        })
    }
}

#[async_trait::async_trait]
impl Source for MqttSource {
    async fn sample(&mut self, batch: &mut Batch) -> Result<(), SourceError> {
        let (taken, acks, errors) = {
            let Ok(mut parked) = self.parked.lock() else {
                return Err(SourceError::Parse {
                    reason: "the MQTT connection task failed".into(),
                });
            };
            let parked = &mut *parked;
            (
                std::mem::take(&mut parked.batch),
                std::mem::take(&mut parked.acks),
                std::mem::take(&mut parked.errors),
            )
        };
        batch.samples.extend(taken.samples);
        batch.invalid.extend(taken.invalid);
        batch.errors.extend(taken.errors);
        batch.series_dropped += taken.series_dropped;
        batch.nulls += taken.nulls;
        batch.not_finite += taken.not_finite;
        if batch.series_refused.is_none() {
            batch.series_refused = taken.series_refused;
        }
        // The samples go to the aggregator when this returns: the broker may forget them.
        // (The broker sends at most RECEIVE_MAXIMUM unacknowledged messages, fewer if
        // its own limit is lower, so this hand-over interval bounds the rate.)
        for publish in &acks {
            if self.client.ack(publish).await.is_err() {
                break;
            }
        }
        match errors.last() {
            Some(last) => Err(SourceError::Parse {
                reason: last.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// Runs the connection until the source is dropped.
async fn connection(
    mut eventloop: EventLoop,
    client: AsyncClient,
    mut reader: Reader,
    parked: Arc<Mutex<Parked>>,
) {
    let mut failures: u32 = 0;
    // Whether the broker acknowledged our subscriptions (in the session it keeps): a
    // connection lost between SUBSCRIBE and SUBACK leaves a session without them.
    let mut subscribed = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                tracing::info!(source = %reader.source, session_present = ack.session_present, "connected to the MQTT broker");
                if !ack.session_present {
                    // A new session: the broker forgot earlier deliveries too.
                    reader.handed.clear();
                    subscribed = false;
                }
                if !subscribed {
                    let filters = reader
                        .subscriptions
                        .iter()
                        .map(|s| Filter::new(s.topic.clone(), reader.qos));
                    let _ = client.subscribe_many(filters.collect::<Vec<_>>()).await;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if !subscribed {
                    // From here the broker keeps what the topics get for this session,
                    // through any reconnection: what was published before is not ours.
                    tracing::info!(source = %reader.source, topics = reader.subscriptions.len(), "subscribed at the MQTT broker");
                }
                subscribed = true;
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let Ok(mut parked) = parked.lock() else {
                    return;
                };
                let parked = &mut *parked;
                reader.read(&publish, &mut parked.batch);
                if publish.qos != QoS::AtMostOnce {
                    // The packet id acknowledges it: the payload is let go now.
                    parked.acks.push(Publish {
                        qos: publish.qos,
                        pkid: publish.pkid,
                        ..Publish::default()
                    });
                }
            }
            Ok(_) => {}
            Err(err) => {
                let message = connection_error(&err);
                if let Ok(mut parked) = parked.lock() {
                    // Unacknowledged messages of a lost connection come again.
                    parked.acks.clear();
                    parked.errors.push(message);
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(reconnect_delay(failures)).await;
            }
        }
    }
}

/// What a connection error says, with a hint where the cause is known.
fn connection_error(err: &ConnectionError) -> String {
    let text = format!("MQTT connection: {}", crate::with_causes(err));
    match err {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::UnsupportedProtocolVersion
            | ConnectReturnCode::RefusedProtocolVersion,
        ) => format!("{text} (the MQTT source needs a broker that speaks MQTT 5)"),
        _ => text,
    }
}

/// Turns messages into samples.
struct Reader {
    source: String,
    qos: QoS,
    max_payload: usize,
    subscriptions: Vec<MqttSubscription>,
    /// Per subscription: series by topic, then field.
    series: Vec<HashMap<String, HashMap<String, Arc<Series>>>>,
    /// Series made, of all subscriptions, and the most that may be.
    made: usize,
    max_series: u32,
    /// Per packet id, a digest of the last message handed over with it: a redelivery
    /// (DUP) of the same message is not counted twice.
    handed: HashMap<u16, u64>,
}

impl Reader {
    fn new(name: &str, config: &MqttConfig) -> Reader {
        Reader {
            source: name.to_owned(),
            qos: if config.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            max_payload: config.max_payload.as_u64() as usize,
            subscriptions: config.subscriptions.clone(),
            series: vec![HashMap::new(); config.subscriptions.len()],
            made: 0,
            max_series: config.max_series.get(),
            handed: HashMap::new(),
        }
    }

    fn read(&mut self, publish: &Publish, batch: &mut Batch) {
        let now = clock::now_ms();
        if publish.qos != QoS::AtMostOnce {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            publish.topic.hash(&mut hasher);
            publish.payload.hash(&mut hasher);
            let digest = hasher.finish();
            if publish.dup && self.handed.get(&publish.pkid) == Some(&digest) {
                return;
            }
            self.handed.insert(publish.pkid, digest);
        }
        // MQTT topics are UTF-8 (brokers check it).
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        let Some(index) = self
            .subscriptions
            .iter()
            .position(|s| matches(&s.topic, topic))
        else {
            return;
        };
        // Disjoint borrows: the subscription is read while its series cache grows.
        let sub = &self.subscriptions[index];
        let mut names = SeriesNames {
            source: &self.source,
            sub,
            cache: &mut self.series[index],
            made: &mut self.made,
            max: self.max_series,
        };
        let filter = &sub.topic;
        if publish.payload.len() > self.max_payload {
            batch.invalid.push(format!(
                "{filter}: message on {topic} of {} bytes is over max_payload ({} bytes)",
                publish.payload.len(),
                self.max_payload
            ));
            return;
        }
        let Ok(text) = std::str::from_utf8(&publish.payload) else {
            batch
                .invalid
                .push(format!("{filter}: message on {topic} is not UTF-8 text"));
            return;
        };
        match sub.payload {
            // A plain `null` is no value, as in JSON.
            Payload::Number if text.trim() == "null" => batch.nulls += 1,
            Payload::Number => match text.trim().parse::<f64>() {
                Ok(value) => {
                    if let Some(series) = names.get(topic, "", sub.unit.as_deref(), batch) {
                        batch.push(&series, Stamp::Own(now), value);
                    }
                }
                Err(_) => batch.invalid.push(format!(
                    "{filter}: message on {topic} is not a number: {:?}",
                    clip(text)
                )),
            },
            Payload::Json | Payload::Flatten => {
                let doc: Value = match serde_json::from_str(text) {
                    Ok(doc) => doc,
                    Err(err) => {
                        batch.invalid.push(format!(
                            "{filter}: message on {topic} is not JSON ({err}): {:?}",
                            clip(text)
                        ));
                        return;
                    }
                };
                let at = match &sub.timestamp {
                    Some(pointer) => event_time(&doc, pointer, now, batch),
                    None => Stamp::Own(now),
                };
                if sub.payload == Payload::Json {
                    for field in &sub.fields {
                        let value = match doc.pointer(&field.pointer) {
                            Some(Value::Number(n)) => n.as_f64(),
                            Some(other) => {
                                number(other, &format!("{topic} {}", field.pointer), batch)
                            }
                            None => {
                                batch
                                    .invalid
                                    .push(format!("{filter}: no {topic} {}", field.pointer));
                                continue;
                            }
                        };
                        let Some(v) = value else { continue };
                        if let Some(series) =
                            names.get(topic, &field.name, field.unit.as_deref(), batch)
                        {
                            batch.push(&series, at, v * field.scale + field.offset);
                        }
                    }
                } else {
                    let mut leaves = BTreeMap::new();
                    batch.nulls += flatten(&doc, String::new(), sub.booleans, &mut leaves);
                    if let Some(pointer) = &sub.timestamp {
                        leaves.remove(&pointer.trim_start_matches('/').replace('/', "."));
                    }
                    for (field, value) in leaves {
                        if let Some(series) = names.get(topic, &field, sub.unit.as_deref(), batch) {
                            batch.push(&series, at, value);
                        }
                    }
                }
            }
        }
    }
}

/// The series of one subscription, made once per topic and field, at most `max` of
/// the source's subscriptions together.
struct SeriesNames<'a> {
    source: &'a str,
    sub: &'a MqttSubscription,
    cache: &'a mut HashMap<String, HashMap<String, Arc<Series>>>,
    made: &'a mut usize,
    max: u32,
}

impl SeriesNames<'_> {
    /// Looked up without allocating; made (and named) the first time; `None` (counted
    /// in `batch`) for a new series beyond `max`.
    fn get(
        &mut self,
        topic: &str,
        field: &str,
        unit: Option<&str>,
        batch: &mut Batch,
    ) -> Option<Arc<Series>> {
        if let Some(series) = self.cache.get(topic).and_then(|f| f.get(field)) {
            return Some(Arc::clone(series));
        }
        if *self.made >= self.max as usize {
            batch.refuse(self.max, || self.name(topic, field));
            return None;
        }
        *self.made += 1;
        let series = Series::new(self.name(topic, field), unit).shared();
        self.cache
            .entry(topic.to_owned())
            .or_default()
            .insert(field.to_owned(), Arc::clone(&series));
        Some(series)
    }

    /// The name of the series of `field` of a message on `topic`.
    fn name(&self, topic: &str, field: &str) -> String {
        let template =
            self.sub
                .series
                .as_deref()
                .unwrap_or(if self.sub.payload == Payload::Number {
                    "{topic}"
                } else {
                    "{topic}.{field}"
                });
        format!("{}.{}", self.source, expand(template, topic, field))
    }
}

/// The first 80 characters of a payload, for an error message.
fn clip(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Whether a topic matches a filter with `+` and `#`.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for want in filter.split('/') {
        if want == "#" {
            return true;
        }
        match levels.next() {
            Some(level) if want == "+" || want == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Expands `{topic}`, `{topic.N}` and `{field}`; topic levels are joined by `.`.
pub fn expand(template: &str, topic: &str, field: &str) -> String {
    let levels: Vec<&str> = topic.split('/').collect();
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let var = &rest[open + 1..open + close];
        match var {
            "topic" => out.push_str(&levels.join(".")),
            "field" => out.push_str(field),
            _ => {
                let n = var
                    .strip_prefix("topic.")
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(level) = n.and_then(|n| levels.get(n)) {
                    out.push_str(level);
                }
            }
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    // An empty {field} (a plain number) leaves no dangling dot.
    out.trim_matches('.').replace("..", ".")
}

/// Every numeric leaf of a JSON value, by its path joined with `.`; returns how many
/// leaves were `null` (no value, counted by the caller).
fn flatten(value: &Value, path: String, booleans: bool, out: &mut BTreeMap<String, f64>) -> u64 {
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.insert(path, v);
            }
            0
        }
        Value::Bool(b) if booleans => {
            out.insert(path, if *b { 1.0 } else { 0.0 });
            0
        }
        Value::Null => 1,
        Value::Object(map) => map
            .iter()
            .map(|(key, inner)| {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                flatten(inner, path, booleans, out)
            })
            .sum(),
        _ => 0,
    }
}

/// Reads one message as the source would (for the fuzz targets): the samples, invalid
/// values and errors it gives.
pub(crate) fn read_message(name: &str, config: &MqttConfig, topic: &str, payload: &[u8]) -> Batch {
    let mut reader = Reader::new(name, config);
    let publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec(), None);
    let mut batch = Batch::default();
    reader.read(&publish, &mut batch);
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_payloads_own_time_is_the_devices() {
        let text = "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"mqtt\"\nname = \"m\"\nurl = \"mqtt://127.0.0.1\"\n[[sources.subscriptions]]\ntopic = \"n/#\"\npayload = \"number\"\n[[sources.subscriptions]]\ntopic = \"j/#\"\npayload = \"json\"\ntimestamp = \"/t\"\n[[sources.subscriptions.fields]]\nname = \"v\"\npointer = \"/v\"\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n";
        let config =
            crate::config::Config::parse(text, std::path::Path::new("t.toml")).expect("valid");
        let crate::config::SourceKind::Mqtt(mqtt) = &config.sources[0].kind else {
            panic!("an mqtt source");
        };
        let stamps = |topic: &str, payload: &str| -> Vec<(i64, bool)> {
            read_message("m", mqtt, topic, payload.as_bytes())
                .samples
                .iter()
                .map(|s| (s.timestamp_ms, s.own_clock))
                .collect()
        };
        // A plain number is stamped on arrival: the agent's clock.
        let number = stamps("n/a", "21.5");
        assert_eq!(number.len(), 1);
        assert!(number[0].1, "{number:?}");
        // A payload's own time is the device's; a bad one falls back to arrival.
        assert_eq!(
            stamps("j/a", "{\"t\": 1767322800, \"v\": 1}"),
            vec![(1_767_322_800_000, false)]
        );
        let fallback = stamps("j/a", "{\"t\": \"yesterday\", \"v\": 1}");
        assert!(fallback[0].1, "{fallback:?}");
    }

    #[test]
    fn series_beyond_max_series_are_dropped_and_counted_known_ones_go_on() {
        let text = "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"mqtt\"\nname = \"m\"\nurl = \"mqtt://127.0.0.1\"\nmax_series = 3\nmax_payload = \"1 KiB\"\n[[sources.subscriptions]]\ntopic = \"n/#\"\npayload = \"number\"\n[[sources.subscriptions]]\ntopic = \"f/#\"\npayload = \"flatten\"\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n";
        let config =
            crate::config::Config::parse(text, std::path::Path::new("t.toml")).expect("valid");
        let crate::config::SourceKind::Mqtt(mqtt) = &config.sources[0].kind else {
            panic!("an mqtt source");
        };
        let mut reader = Reader::new("m", mqtt);
        let mut batch = Batch::default();
        let mut read = |topic: &str, payload: &str, batch: &mut Batch| {
            reader.read(
                &Publish::new(topic, QoS::AtMostOnce, payload.to_owned(), None),
                batch,
            );
        };
        read("n/a", "1", &mut batch);
        // Two subscriptions share the cap: a and b of this message make series 2 and 3.
        read("f/x", "{\"a\": 1, \"b\": 2, \"c\": 3}", &mut batch);
        read("n/b", "4", &mut batch);
        read("n/a", "5", &mut batch);
        let got: Vec<(&str, f64)> = batch
            .samples
            .iter()
            .map(|s| (s.series.name.as_str(), s.value))
            .collect();
        assert_eq!(
            got,
            [
                ("m.n.a", 1.0),
                ("m.f.x.a", 1.0),
                ("m.f.x.b", 2.0),
                ("m.n.a", 5.0)
            ]
        );
        assert_eq!(batch.series_dropped, 2);
        assert_eq!(
            batch.series_refused.as_deref(),
            Some("max_series (3) reached: m.f.x.c and other new series are not made")
        );
        // A payload over max_payload is counted invalid, whatever it holds.
        let big = "1".repeat(2000);
        read("n/a", &big, &mut batch);
        assert_eq!(batch.samples.len(), 4);
        assert!(
            batch.invalid[0].ends_with("of 2000 bytes is over max_payload (1024 bytes)"),
            "{:?}",
            batch.invalid
        );
    }

    #[test]
    fn null_nan_and_infinity_make_no_sample_and_are_counted_alike() {
        let text = "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"mqtt\"\nname = \"m\"\nurl = \"mqtt://127.0.0.1\"\n[[sources.subscriptions]]\ntopic = \"n/#\"\npayload = \"number\"\n[[sources.subscriptions]]\ntopic = \"j/#\"\npayload = \"json\"\n[[sources.subscriptions.fields]]\nname = \"v\"\npointer = \"/v\"\n[[sources.subscriptions]]\ntopic = \"f/#\"\npayload = \"flatten\"\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n";
        let config =
            crate::config::Config::parse(text, std::path::Path::new("t.toml")).expect("valid");
        let crate::config::SourceKind::Mqtt(mqtt) = &config.sources[0].kind else {
            panic!("an mqtt source");
        };
        let counts = |topic: &str, payload: &str| {
            let batch = read_message("m", mqtt, topic, payload.as_bytes());
            assert!(batch.invalid.is_empty(), "{payload}: {:?}", batch.invalid);
            (batch.samples.len(), batch.nulls, batch.not_finite)
        };
        assert_eq!(counts("n/a", "null"), (0, 1, 0));
        assert_eq!(counts("n/a", "NaN"), (0, 0, 1));
        assert_eq!(counts("n/a", " -inf\n"), (0, 0, 1));
        assert_eq!(counts("n/a", "21.5"), (1, 0, 0));
        assert_eq!(counts("j/a", "{\"v\": null}"), (0, 1, 0));
        assert_eq!(counts("j/a", "{\"v\": \"Infinity\"}"), (0, 0, 1));
        assert_eq!(
            counts("f/a", "{\"x\": null, \"y\": {\"z\": null}, \"w\": 2}"),
            (1, 2, 0)
        );
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(matches("tele/+/SENSOR", "tele/plug1/SENSOR"));
        assert!(!matches("tele/+/SENSOR", "tele/plug1/STATE"));
        assert!(!matches("tele/+/SENSOR", "tele/a/b/SENSOR"));
        assert!(matches("zigbee2mqtt/#", "zigbee2mqtt/kitchen"));
        assert!(matches("zigbee2mqtt/#", "zigbee2mqtt/kitchen/availability"));
        assert!(matches("a/#", "a"));
        assert!(!matches("a/b", "a/b/c"));
    }

    #[test]
    fn series_names_come_from_topic_levels_and_fields() {
        assert_eq!(
            expand(
                "{topic.1}.{field}",
                "tele/plug1/SENSOR",
                "BME280.Temperature"
            ),
            "plug1.BME280.Temperature"
        );
        assert_eq!(
            expand("{topic}", "shellies/ht-1/sensor/temperature", ""),
            "shellies.ht-1.sensor.temperature"
        );
        assert_eq!(expand("{topic}.{field}", "x/y", ""), "x.y");
    }

    #[test]
    fn a_tasmota_payload_flattens_to_its_numbers() {
        let text = include_str!("../../testdata/tasmota-sensor.json");
        let doc: Value = serde_json::from_str(text).expect("json");
        let mut leaves = BTreeMap::new();
        flatten(&doc, String::new(), false, &mut leaves);
        let keys: Vec<&str> = leaves.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "BME280.DewPoint",
                "BME280.Humidity",
                "BME280.Pressure",
                "BME280.Temperature",
                "DS18B20.Temperature"
            ]
        );
    }
}
