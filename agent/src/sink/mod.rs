//! Sinks: where closed partitions go, and the uploader that feeds each one.
//!
//! One [`Uploader`] runs per sink. It asks the spool for the oldest closed partition this
//! sink has not received, reads it in chunks and hands them to the sink, which encodes and
//! sends them as they come (a chunk in memory at a time, not the part), and only then
//! records the delivery. On
//! failure it retries the same part with capped exponential backoff and full jitter,
//! forever, oldest first; one sink being down never holds back another.

mod encode;
mod layout;
#[cfg(feature = "mqtt-sink")]
mod mqtt;
mod object;
#[cfg(feature = "postgres")]
mod postgres;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::clock;
use crate::config::{SinkConfig, SinkKind};
use crate::flow::{Series, WindowRow};
use crate::spool::{Batch, PartPlan, PartRows, Plan, SpoolHandle, SpoolReader};

pub use encode::{Encoder, Encoding, Part, content_encoding, content_type, encode, extension};
pub use layout::object_key;
#[cfg(feature = "mqtt-sink")]
pub use mqtt::MqttFeed;
#[cfg(feature = "postgres")]
pub use postgres::location as postgres_location;

/// Why a delivery failed. The message never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The store refused or failed the write.
    #[error("{sink}: cannot write {key}: {reason}")]
    Write {
        sink: String,
        key: String,
        reason: String,
    },
    /// The sink could not be set up.
    #[error("{sink}: {reason}")]
    Setup { sink: String, reason: String },
}

/// What a sink receives: the rows of one part of one partition, as they are read.
pub struct Delivery<'a> {
    /// The device id.
    pub device: &'a str,
    /// Which part.
    pub plan: &'a PartPlan,
    /// Its rows, ordered by window start and series, a chunk at a time.
    pub rows: Chunks,
    /// The series a wide file gives columns to: the partition's column set and the
    /// series of the part's rows (see [`crate::spool::SpoolReader::begin_part`]); empty
    /// unless the sink [wants](Sink::wants_series) them.
    pub series: &'a [Arc<Series>],
}

/// A part's rows, a chunk at a time, as the spool reader reads them (on a thread of its
/// own, one chunk ahead): whole window starts per chunk, in the order of the part. A
/// reader that stops early (an error, a panic) is an error, never a shorter part.
pub struct Chunks {
    chunks: tokio::sync::mpsc::Receiver<Result<Vec<WindowRow>, String>>,
    total: usize,
    seen: usize,
}

impl Chunks {
    /// Rows already in memory, cut into chunks of `chunk_rows` (whole window starts, as the
    /// spool reader cuts them): for tests, and for callers that have the rows.
    pub fn of(rows: Vec<WindowRow>, chunk_rows: usize) -> Chunks {
        let total = rows.len();
        let mut starts: Vec<Vec<WindowRow>> = Vec::new();
        for row in rows {
            match starts.last_mut() {
                Some(start) if start.last().is_some_and(|l| l.start == row.start) => {
                    start.push(row)
                }
                _ => starts.push(vec![row]),
            }
        }
        let mut chunks: Vec<Vec<WindowRow>> = Vec::new();
        for start in starts {
            match chunks.last_mut() {
                Some(chunk) if chunk.len() + start.len() <= chunk_rows.max(1) => {
                    chunk.extend(start)
                }
                _ => chunks.push(start),
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
        for chunk in chunks {
            let _ = tx.try_send(Ok(chunk));
        }
        Chunks {
            chunks: rx,
            total,
            seen: 0,
        }
    }

    /// How many rows the part holds.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The next chunk; `None` once every row came.
    pub async fn next(&mut self) -> Result<Option<Vec<WindowRow>>, String> {
        match self.chunks.recv().await {
            Some(Ok(chunk)) => {
                self.seen += chunk.len();
                Ok(Some(chunk))
            }
            Some(Err(message)) => Err(message),
            None if self.seen == self.total => Ok(None),
            None => Err(format!(
                "the spool reader stopped after {} of {} rows",
                self.seen, self.total
            )),
        }
    }

    /// Every remaining row, in one vector (for a sink that needs the part whole).
    pub async fn collect(mut self) -> Result<Vec<WindowRow>, String> {
        let mut rows = Vec::with_capacity(self.total - self.seen);
        while let Some(chunk) = self.next().await? {
            rows.extend(chunk);
        }
        Ok(rows)
    }
}

/// A destination. Writes must be idempotent: the same delivery twice leaves one copy.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Writes one part; returns where it went (for the log). It returns only once the
    /// part is durable at the destination (a local file fsynced with its folders, an
    /// object store's success answer, PostgreSQL's COMMIT): the uploader then records
    /// the delivery, and the spool deletes rows that every sink has.
    ///
    /// A sink whose [`batch_limit`](Sink::batch_limit) takes more than one part gets
    /// every part through [`deliver_parts`](Sink::deliver_parts) instead, and need not
    /// implement this: by default it refuses.
    async fn deliver(&self, delivery: Delivery<'_>) -> Result<String, SinkError> {
        Err(SinkError::Write {
            sink: delivery.plan.sink.clone(),
            key: format!(
                "part {} of {}",
                delivery.plan.part,
                clock::rfc3339(delivery.plan.partition)
            ),
            reason: "this sink takes parts in batches only".to_owned(),
        })
    }

    /// Whether a delivery needs [`Delivery::series`] (a wide layout does); reading that
    /// set costs a query per part, so other sinks get it empty.
    fn wants_series(&self) -> bool {
        false
    }

    /// How many parts (of distinct partitions) one [`deliver_parts`](Sink::deliver_parts)
    /// takes, and up to how many rows in all (a first part larger than that goes whole):
    /// `(1, _)`, the default, is a part at a time through [`deliver`](Sink::deliver).
    fn batch_limit(&self) -> (usize, i64) {
        (1, crate::spool::MAX_PART_ROWS)
    }

    /// Writes the parts `parts` reads, all or none durable when it returns (PostgreSQL:
    /// one transaction); each stays idempotent on its own, so a retry of some or all of
    /// them leaves one copy. Called only when [`batch_limit`](Sink::batch_limit) allows
    /// more than one part; by default, one [`deliver`](Sink::deliver) after another.
    async fn deliver_parts(&self, parts: &mut PartReader<'_>) -> Result<String, SinkError> {
        let mut location = String::new();
        while let Some((plan, part)) = parts.next().await.map_err(|reason| SinkError::Write {
            sink: parts.sink().to_owned(),
            key: "the spool".to_owned(),
            reason,
        })? {
            location = self
                .deliver(Delivery {
                    device: parts.device(),
                    plan: &plan,
                    rows: Chunks::of(part.rows, parts.chunk_rows()),
                    series: &part.series,
                })
                .await?;
        }
        Ok(location)
    }
}

/// The parts of a batch, read from the spool one after another as a sink asks for them:
/// one part's rows in memory at a time, however many parts the batch holds.
pub struct PartReader<'a> {
    uploader: &'a Uploader,
    plans: &'a [PartPlan],
    next: usize,
    reader: &'a mut Option<SpoolReader>,
    rows: usize,
}

impl PartReader<'_> {
    /// The device id.
    pub fn device(&self) -> &str {
        &self.uploader.device
    }

    /// The sink's name.
    pub fn sink(&self) -> &str {
        &self.uploader.name
    }

    /// The rows of a chunk the sink's configuration asks for.
    pub fn chunk_rows(&self) -> usize {
        self.uploader.chunk_rows
    }

    /// Every part of the batch, oldest first.
    pub fn plans(&self) -> &[PartPlan] {
        self.plans
    }

    /// The next part and its rows (a part the budget dropped meanwhile comes empty);
    /// `None` after the last.
    pub async fn next(&mut self) -> Result<Option<(PartPlan, PartRows)>, String> {
        let Some(plan) = self.plans.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        let part = self.uploader.read_part(plan, self.reader).await?;
        self.rows += part.rows.len();
        Ok(Some((plan.clone(), part)))
    }

    /// Back to the first part (a sink that loads the batch again another way).
    pub fn rewind(&mut self) {
        self.next = 0;
        self.rows = 0;
    }
}

/// Builds the sink a configuration entry describes; `None` for a live feed (see
/// [`MqttFeed`]).
pub fn build(config: &SinkConfig) -> Option<Arc<dyn Sink>> {
    match &config.kind {
        SinkKind::Object(object) => Some(Arc::new(object::ObjectSink::new(&config.name, object))),
        #[cfg(feature = "postgres")]
        SinkKind::Postgres(pg) => Some(Arc::new(postgres::PostgresSink::new(&config.name, pg))),
        // The configuration refuses a kind this build lacks: such a sink never gets here.
        #[cfg(not(feature = "postgres"))]
        SinkKind::Postgres(_) => None,
        SinkKind::Mqtt(_) => None,
    }
}

/// The retry policy of a sink.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay's ceiling.
    pub base: Duration,
    /// The largest delay.
    pub cap: Duration,
}

impl Backoff {
    /// Delay before retry number `attempt` (1 for the first retry): a uniformly random
    /// share (`unit` in [0, 1)) of min(cap, base × 2^(attempt-1)), at least 100 ms.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let ceiling = exp.min(self.cap);
        ceiling
            .mul_f64(unit.clamp(0.0, 1.0))
            .max(Duration::from_millis(100))
    }
}

/// The stage that feeds one sink from the spool.
pub struct Uploader {
    name: String,
    device: String,
    sink: Arc<dyn Sink>,
    spool: SpoolHandle,
    backoff: Backoff,
    /// Rows read from the spool at a time.
    chunk_rows: usize,
    /// Rows delivered since the allocator was last asked to give memory back: it is
    /// asked once the sink has nothing left to send (a backlog drained), not after each
    /// of a backlog's parts.
    unreleased: std::sync::atomic::AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

impl Uploader {
    /// Wires a sink to the spool.
    pub fn new(
        config: &SinkConfig,
        device: &str,
        sink: Arc<dyn Sink>,
        spool: SpoolHandle,
        shutdown: watch::Receiver<bool>,
    ) -> Uploader {
        let cap = config.kind.retry_max();
        Uploader {
            name: config.name.clone(),
            device: device.to_owned(),
            sink,
            spool,
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap,
            },
            chunk_rows: usize::try_from(config.kind.chunk_rows().get()).unwrap_or(usize::MAX),
            unreleased: Default::default(),
            shutdown,
        }
    }

    /// Delivers parts until shutdown.
    pub async fn run(mut self) {
        let mut commits = self.spool.commits();
        let mut reader: Option<SpoolReader> = None;
        let mut attempt: u32 = 0;
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            let (max_parts, max_rows) = self.sink.batch_limit();
            let outcome = if max_parts > 1 {
                self.send_batch(max_parts, max_rows, &mut reader).await
            } else {
                match self.spool.plan(&self.name, clock::now_ms()).await {
                    Ok(Plan::Ready(plan)) => self.send(&plan, &mut reader).await.map(|()| None),
                    Ok(Plan::Wait(until)) => Ok(Some(until)),
                    Err(err) => Err(err.to_string()),
                }
            };
            match outcome {
                Ok(None) => attempt = 0,
                Ok(Some(until)) => {
                    attempt = 0;
                    crate::memory::after_delivery(self.unreleased.swap(0, Relaxed));
                    let wait = until.map_or(Duration::from_secs(3600), |t| {
                        Duration::from_millis((t - clock::now_ms()).clamp(0, 3_600_000) as u64)
                    });
                    tokio::select! {
                        _ = commits.changed() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.changed() => return,
                    }
                }
                Err(message) => {
                    attempt = attempt.saturating_add(1);
                    let delay = self.backoff.delay(attempt, rand::random::<f64>());
                    let now = clock::now_ms();
                    self.spool
                        .failed(&self.name, &message, now, now + delay.as_millis() as i64)
                        .await;
                    warn!(sink = %self.name, error = %message, retry_in = ?delay, attempt, "delivery failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// Reads, sends and acknowledges one part.
    ///
    /// Design: the part is read in chunks (`chunk_rows`, whole window starts) on a
    /// blocking thread and handed to the sink through a channel of one chunk, a chunk
    /// read only once the sink took the one before ([`read_ahead`]): memory holds two
    /// chunks of rows (one encoded, one read), not the part.
    async fn send(&self, plan: &PartPlan, reader: &mut Option<SpoolReader>) -> Result<(), String> {
        let open = self.reader_of_writers_file(reader);
        let query = plan.clone();
        let with_series = self.sink.wants_series();
        let chunk_rows = self.chunk_rows;
        let (mut back, reading) = tokio::task::spawn_blocking(move || {
            let mut reader = open()?;
            let reading = reader.begin_part(&query, with_series, chunk_rows);
            Ok::<_, crate::spool::SpoolError>((reader, reading))
        })
        .await
        .map_err(|e| format!("spool reader failed: {e}"))?
        .map_err(|e| e.to_string())?;
        let reading = match reading {
            Ok(reading) => reading,
            Err(err) => {
                *reader = Some(back);
                return Err(err.to_string());
            }
        };
        let total = reading.rows();
        if total > 0 {
            let series = reading.wide_series().to_vec();
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let producer = tokio::task::spawn_blocking(move || {
                read_ahead(&tx, reading.chunks(), |index| {
                    back.read_chunk(&reading, index).map_err(|e| e.to_string())
                });
                back.end_part();
                back
            });
            let delivery = Delivery {
                device: &self.device,
                plan,
                rows: Chunks {
                    chunks: rx,
                    total,
                    seen: 0,
                },
                series: &series,
            };
            // The delivery (and its end of the channel) is dropped when `deliver`
            // returns, so the reader stops at its next chunk if the sink gave up.
            let delivered = self.sink.deliver(delivery).await;
            if let Ok(back) = producer.await {
                *reader = Some(back);
            }
            let location = delivered.map_err(|e| e.to_string())?;
            info!(sink = %self.name, rows = total, to = %location, "delivered");
            crate::failpoint::point("after-upload", &self.name);
            self.unreleased.fetch_add(total, Relaxed);
        } else {
            back.end_part();
            *reader = Some(back);
        }
        self.spool
            .delivered(plan, clock::now_ms())
            .await
            .map_err(|e| e.to_string())
    }
}

impl Uploader {
    /// Plans, reads, sends and acknowledges the parts a sink takes at once (see
    /// [`Sink::batch_limit`]); `Ok(Some(until))` when there is nothing to send.
    async fn send_batch(
        &self,
        max_parts: usize,
        max_rows: i64,
        reader: &mut Option<SpoolReader>,
    ) -> Result<Option<Option<i64>>, String> {
        let plans = match self
            .spool
            .plan_batch(&self.name, clock::now_ms(), max_parts, max_rows)
            .await
        {
            Ok(Batch::Ready(plans)) => plans,
            Ok(Batch::Wait(until)) => return Ok(Some(until)),
            Err(err) => return Err(err.to_string()),
        };
        let mut parts = PartReader {
            uploader: self,
            plans: &plans,
            next: 0,
            reader,
            rows: 0,
        };
        let location = self
            .sink
            .deliver_parts(&mut parts)
            .await
            .map_err(|e| e.to_string())?;
        if parts.rows > 0 {
            info!(sink = %self.name, rows = parts.rows, parts = plans.len(), to = %location, "delivered");
            crate::failpoint::point("after-upload", &self.name);
            self.unreleased.fetch_add(parts.rows, Relaxed);
        }
        self.spool
            .delivered_all(&plans, clock::now_ms())
            .await
            .map(|()| None)
            .map_err(|e| e.to_string())
    }

    /// What opens the spool reader for a read on a blocking thread: `reader`, taken, if
    /// it reads the writer's file, or a new one, which must.
    ///
    /// Design: the writer's file, asked for after the plan came back, so a plan made in a
    /// spool put back after a deletion (spool/follow.rs) is read from that file.
    fn reader_of_writers_file(
        &self,
        reader: &mut Option<SpoolReader>,
    ) -> impl FnOnce() -> Result<SpoolReader, crate::spool::SpoolError> + Send + 'static {
        let path = self.spool.path().to_owned();
        let writer_file = self.spool.file();
        let taken = reader.take().filter(|r| r.file() == Some(writer_file));
        move || {
            let reader = match taken {
                Some(r) => r,
                None => SpoolReader::open(&path)?,
            };
            if reader.file() != Some(writer_file) {
                return Err(crate::spool::SpoolError::NotTheWriters { path });
            }
            Ok(reader)
        }
    }

    /// Reads one whole part from the spool (off the runtime), with `reader` if it reads
    /// the writer's file, and puts the reader back.
    async fn read_part(
        &self,
        plan: &PartPlan,
        reader: &mut Option<SpoolReader>,
    ) -> Result<PartRows, String> {
        let open = self.reader_of_writers_file(reader);
        let query = plan.clone();
        let with_series = self.sink.wants_series();
        let (back, part) = tokio::task::spawn_blocking(move || {
            let mut reader = open()?;
            let part = reader.read_part(&query, with_series);
            Ok::<_, crate::spool::SpoolError>((reader, part))
        })
        .await
        .map_err(|e| format!("spool reader failed: {e}"))?
        .map_err(|e| e.to_string())?;
        *reader = Some(back);
        part.map_err(|e| e.to_string())
    }
}

/// Reads `chunks` chunks with `read` into `tx`, one ahead of the sink, and stops at an
/// error (sent on) or once the sink is gone.
///
/// Design: the channel's room is taken before a chunk is read, not after, so the next
/// chunk is read only once the sink took the last one: two chunks in memory (the one
/// the sink encodes and the one read meanwhile), not three (one more waiting in the
/// channel). At 10,000 series a chunk is 10,000 rows, some 3 MB.
fn read_ahead(
    tx: &tokio::sync::mpsc::Sender<Result<Vec<WindowRow>, String>>,
    chunks: usize,
    mut read: impl FnMut(usize) -> Result<Vec<WindowRow>, String>,
) {
    let runtime = tokio::runtime::Handle::current();
    for index in 0..chunks {
        let Ok(room) = runtime.block_on(tx.reserve()) else {
            break;
        };
        let chunk = read(index);
        let failed = chunk.is_err();
        room.send(chunk);
        if failed {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(start: i64) -> WindowRow {
        WindowRow {
            series: Arc::new(Series::new("s.a", None)),
            start,
            seconds: 60,
            stats: crate::flow::Stats::single(1.0),
        }
    }

    #[tokio::test]
    async fn a_spool_reader_that_stops_early_fails_the_delivery_rather_than_shorten_the_part() {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(Ok(vec![row(0)])).await.expect("sent");
        drop(tx);
        let mut chunks = Chunks {
            chunks: rx,
            total: 3,
            seen: 0,
        };
        assert_eq!(
            chunks.next().await.expect("a chunk").map(|c| c.len()),
            Some(1)
        );
        assert_eq!(
            chunks.next().await.err().as_deref(),
            Some("the spool reader stopped after 1 of 3 rows")
        );
    }

    #[tokio::test]
    async fn a_chunk_is_read_only_once_the_sink_took_the_one_before() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        const CHUNKS: usize = 5;
        let reads = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let counted = Arc::clone(&reads);
        let producer = tokio::task::spawn_blocking(move || {
            read_ahead(&tx, CHUNKS, |index| {
                counted.fetch_add(1, SeqCst);
                Ok(vec![row(60 * index as i64)])
            })
        });
        for taken in 1..=CHUNKS {
            let chunk = rx.recv().await.expect("a chunk").expect("rows");
            assert_eq!(chunk[0].start, 60 * (taken as i64 - 1));
            // While the sink holds this chunk the reader may read the next one, never
            // the one after it (which would be a third chunk in memory).
            let ahead = (taken + 1).min(CHUNKS);
            for _ in 0..50 {
                let read = reads.load(SeqCst);
                assert!(
                    read <= ahead,
                    "{read} chunks read while the sink holds chunk {taken}"
                );
                if read == ahead && taken % 2 == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            drop(chunk);
        }
        assert!(rx.recv().await.is_none(), "every chunk came");
        producer.await.expect("the reader ends");
        assert_eq!(reads.load(SeqCst), CHUNKS);
    }

    #[tokio::test]
    async fn rows_in_memory_are_cut_into_chunks_of_whole_window_starts() {
        let rows = vec![row(0), row(0), row(0), row(60), row(120), row(120)];
        let mut chunks = Chunks::of(rows, 2);
        let mut sizes = Vec::new();
        while let Some(chunk) = chunks.next().await.expect("a chunk") {
            sizes.push(chunk.len());
        }
        assert_eq!(sizes, [3, 1, 2]);
    }

    #[test]
    fn backoff_grows_exponentially_to_its_cap() {
        let b = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        };
        let top = |attempt| b.delay(attempt, 0.999_999_9);
        assert_eq!(top(1).as_secs(), 0);
        assert_eq!(top(2).as_millis(), 1_999);
        assert_eq!(top(5).as_millis(), 15_999);
        assert_eq!(top(9).as_secs(), 255);
        assert_eq!(top(10).as_secs(), 299);
        assert_eq!(top(40).as_secs(), 299);
        assert_eq!(
            b.delay(7, 0.0),
            Duration::from_millis(100),
            "full jitter has a floor"
        );
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(2));
    }
}
