//! The MQTT sink: each closed window's aggregates, as JSON, to a topic per series.
//!
//! A live feed (see [`super::live`]): it gets every flush as it is committed, keeps the
//! windows it could not publish yet in a bounded queue, and publishes them once the broker
//! is reachable, oldest first. A window that ended longer ago than `max_age` is skipped and
//! counted instead: after an outage, dashboards get the present, not a replay of history
//! (the partition sinks deliver that). On connecting it publishes a retained `online` to
//! the availability topic; the broker publishes the retained last will, `offline`, when
//! the connection dies without a goodbye (a crash, `kill -9`, a power cut); a clean stop
//! publishes `offline` itself.
//!
//! "Published" counts windows handed to a live connection. With a persistent session
//! (the default) rumqttc sends QoS 1 messages that were in flight when the connection
//! broke again after reconnecting.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::SinkError;
use super::encode::json_record;
use crate::broker::{self, reconnect_delay};
use crate::clock;
use crate::config::MqttSink as MqttConfig;
use crate::flow::{LiveStats, Problem, Series, WindowRow};
use crate::spool::SpoolHandle;

/// Windows kept for a broker that is away, beyond which the oldest are skipped (about
/// 100 bytes each).
const MAX_QUEUED: usize = 10_000;

/// Requests handed to the client at once (its channel's capacity).
const HANDED: usize = 64;

/// How long a stopping feed may take to publish what it has and say goodbye.
const GOODBYE: Duration = Duration::from_secs(3);

/// One MQTT sink's task.
pub struct MqttFeed {
    name: String,
    device: String,
    options: MqttOptions,
    topic: String,
    availability: Option<String>,
    qos: QoS,
    retain: bool,
    max_age_ms: i64,
    stats: Arc<LiveStats>,
    rows: mpsc::Receiver<Arc<Vec<WindowRow>>>,
    spool: SpoolHandle,
}

/// What the loop knows of the connection.
#[derive(Default)]
struct Connection {
    connected: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

impl MqttFeed {
    /// Sets the feed up (nothing connects before [`MqttFeed::run`]).
    pub fn new(
        name: &str,
        config: &MqttConfig,
        device: &str,
        stats: Arc<LiveStats>,
        rows: mpsc::Receiver<Arc<Vec<WindowRow>>>,
        spool: SpoolHandle,
    ) -> Result<MqttFeed, SinkError> {
        let client_id = || format!("edgespool-{device}-{name}");
        let mut options =
            broker::options(&config.connection, client_id).map_err(|reason| SinkError::Setup {
                sink: name.to_owned(),
                reason,
            })?;
        let availability = (!config.availability_topic.is_empty())
            .then(|| config.availability_topic.replace("{device}", device));
        if let Some(topic) = &availability {
            options.set_last_will(LastWill::new(topic, "offline", QoS::AtLeastOnce, true));
        }
        Ok(MqttFeed {
            name: name.to_owned(),
            device: device.to_owned(),
            options,
            topic: config.topic.replace("{device}", device),
            availability,
            qos: if config.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            retain: config.retain,
            max_age_ms: config.max_age.as_millis() as i64,
            stats,
            rows,
            spool,
        })
    }

    /// Publishes windows until the aggregator is gone, then says goodbye and reports.
    pub async fn run(mut self) {
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), HANDED);
        let mut queue: VecDeque<WindowRow> = VecDeque::new();
        // Each series' newest window published: only a newer one replaces the retained
        // message (a late row of an older window goes out unretained).
        let mut newest: HashMap<Arc<Series>, i64> = HashMap::new();
        let mut link = Connection::default();
        let mut stopping: Option<Instant> = None;
        loop {
            if link.connected {
                self.publish(&client, &mut queue, &mut newest);
            }
            self.stats.update(|s| s.queued = queue.len() as u64);
            if stopping.is_some() && queue.is_empty() {
                break;
            }
            let retry = sleep_until(link.retry_at);
            let give_up = sleep_until(stopping);
            tokio::select! {
                event = eventloop.poll(), if link.retry_at.is_none() => {
                    self.on_event(event, &client, &mut link);
                }
                _ = retry => link.retry_at = None,
                batch = self.rows.recv(), if stopping.is_none() => match batch {
                    Some(rows) => {
                        queue.extend(rows.iter().cloned());
                        self.prune(&mut queue, clock::now_ms());
                    }
                    None => stopping = Some(Instant::now() + GOODBYE),
                },
                _ = give_up => break,
            }
        }
        if !queue.is_empty() {
            warn!(sink = %self.name, windows = queue.len(), "stopping before these windows could be published");
            self.stats.skipped(queue.len() as u64);
            self.stats.update(|s| s.queued = 0);
        }
        if link.connected {
            self.goodbye(&client, &mut eventloop).await;
            let now = clock::now_ms();
            self.stats.update(|s| {
                s.connected = false;
                s.since_ms = Some(now);
            });
        }
        self.spool.report(vec![self.stats.report()]).await;
    }

    /// Hands queued windows to the client while it has room.
    fn publish(
        &self,
        client: &AsyncClient,
        queue: &mut VecDeque<WindowRow>,
        newest: &mut HashMap<Arc<Series>, i64>,
    ) {
        let now = clock::now_ms();
        self.prune(queue, now);
        let mut published = 0;
        while let Some(row) = queue.front() {
            let topic = self
                .topic
                .replace("{series}", &topic_level(&row.series.name));
            let mut payload = Vec::with_capacity(320);
            json_record(&mut payload, &self.device, row);
            let latest = newest
                .get(&row.series)
                .is_none_or(|&start| row.start > start);
            if client
                .try_publish(topic, self.qos, self.retain && latest, payload)
                .is_err()
            {
                break;
            }
            if latest {
                newest.insert(Arc::clone(&row.series), row.start);
            }
            queue.pop_front();
            published += 1;
        }
        if published > 0 {
            self.stats.published(published, now);
        }
    }

    /// Skips windows older than `max_age`, and the oldest beyond [`MAX_QUEUED`].
    fn prune(&self, queue: &mut VecDeque<WindowRow>, now_ms: i64) {
        let before = queue.len();
        let oldest_end = now_ms - self.max_age_ms;
        queue.retain(|row| row.end() * 1000 >= oldest_end);
        let excess = queue.len().saturating_sub(MAX_QUEUED);
        queue.drain(..excess);
        let skipped = before - queue.len();
        if skipped > 0 {
            self.stats.skipped(skipped as u64);
            info!(sink = %self.name, windows = skipped, "skipped windows older than max_age");
        }
    }

    fn on_event(
        &self,
        event: Result<Event, rumqttc::ConnectionError>,
        client: &AsyncClient,
        link: &mut Connection,
    ) {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                link.connected = true;
                link.failures = 0;
                let now = clock::now_ms();
                self.stats.update(|s| {
                    s.connected = true;
                    s.since_ms = Some(now);
                });
                info!(sink = %self.name, session_present = ack.session_present, "connected to the MQTT broker");
                if let Some(topic) = &self.availability {
                    // First in the client's queue: ahead of every window.
                    let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "online");
                }
            }
            Ok(_) => {}
            Err(err) => {
                let message = format!("MQTT connection: {}", crate::with_causes(&err));
                let now = clock::now_ms();
                let news = link.connected || link.failures == 0;
                link.connected = false;
                link.failures = link.failures.saturating_add(1);
                let delay = reconnect_delay(link.failures);
                link.retry_at = Some(Instant::now() + delay);
                self.stats.update(|s| {
                    if s.connected || s.since_ms.is_none() {
                        s.since_ms = Some(now);
                    }
                    s.connected = false;
                    s.last_problem = Some(Problem {
                        at_ms: now,
                        message: message.clone(),
                    });
                });
                if news {
                    warn!(sink = %self.name, error = %message, retry_in = ?delay, "MQTT broker unreachable");
                }
            }
        }
    }

    /// Publishes `offline` and disconnects, within [`GOODBYE`].
    async fn goodbye(&self, client: &AsyncClient, eventloop: &mut EventLoop) {
        if let Some(topic) = &self.availability {
            let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "offline");
        }
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(GOODBYE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Waits until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A series name as topic text: `+` and `#` (wildcards) and NUL become `_`.
fn topic_level(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains(['+', '#', '\0']) {
        name.replace(['+', '#', '\0'], "_").into()
    } else {
        name.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_never_reach_a_topic() {
        assert_eq!(topic_level("plug.ENERGY.Power"), "plug.ENERGY.Power");
        assert_eq!(topic_level("a+b#c"), "a_b_c");
    }
}
