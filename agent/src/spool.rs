//! The spool: a SQLite file that holds closed windows until every sink has them.
//!
//! # Design constraints
//! - SD cards wear out: one transaction per flush (one per window length, never one per
//!   sample), and in it one row per partition holding all its windows as one compact
//!   postcard blob (no per-window keys or index entries), 1 KiB pages, and state written
//!   only with a flush. A flush of 100 windows costs about 21 KB of disk writes, WAL and
//!   checkpoint included, where a row per window cost 35 KB.
//! - Power loss at any instant loses nothing committed: WAL mode with `synchronous=FULL`,
//!   so a commit is one append to the WAL and one fsync.
//! - One writer: [`Spool`] lives on its own thread behind [`SpoolHandle`]; the uploaders
//!   and `edgespool status` read through their own connections ([`SpoolReader`]).
//! - Nothing is delivered twice in effect, nothing is overwritten: a part of a partition
//!   is *planned* (its row range fixed and committed) before it is sent, so a retry after
//!   a crash sends exactly the same rows under the same key.
//!
//! # Schema (version 2)
//! ```text
//! meta(key TEXT PK, value TEXT)                  'agent': state as JSON (heartbeat, pid, config);
//!                                                'next_id': the next window id
//! counters(name TEXT PK, value INTEGER)          lifetime counters, added to at each flush
//! series(id INTEGER PK, name, unit, tags,       tags as canonical JSON; UNIQUE(name, tags);
//!        first_partition, first_id)              where and in which flush it was first
//!                                                seen (v2; NULL for series older than v2)
//! batches(id INTEGER PK, partition, rows,        the windows one flush closed in one
//!         record BLOB)                           partition: `rows` windows with ids
//!                                                id-rows+1 ..= id; record = postcard of
//!                                                [StoredWindow]. Window ids are issued by the
//!                                                spool, only grow and are never reused.
//! partitions(partition PK, seconds, max_id, rows) what each partition holds now
//! sinks(name PK, kind, active, last_success_ms,  per-sink outcome, for status
//!       last_error, last_error_ms, retrying_since_ms, next_attempt_ms)
//! parts(sink, partition, part, after_id, last_id, rows, planned_ms, delivered_ms)
//!       PK(sink, partition, part): part N of a partition for a sink holds the windows
//!       of that partition with after_id < id <= last_id
//! ```
//!
//! # Delivery bookkeeping
//! 1. *Plan*: for a sink, the oldest partitions (up to 16 in one transaction) that are
//!    closed (their end plus the grace period has passed) and hold windows with ids above
//!    the sink's last planned part get a new part row each: `after_id` = that last id, `last_id` = the highest id now
//!    there. Rows that arrive later (late data) have higher ids: they go to the next part.
//! 2. *Send*: the uploader reads exactly the rows of the part and writes them under a key
//!    made from the partition and part number.
//! 3. *Acknowledge*: `delivered_ms` is set (without an fsync: if a power cut loses it,
//!    the planned part is sent again and the sink takes it as a no-op). When every
//!    active sink has a partition's rows up to some id, the rows up to that id are
//!    deleted. Part rows are kept, so numbering
//!    never restarts and `part-0000` is never written twice with other content.
//!
//! # Recovery after a crash
//! SQLite's WAL makes every flush atomic. A planned part without `delivered_ms` is sent
//! again, same rows, same key, same bytes: the sink overwrites an identical object or
//! its rows conflict and are ignored. Windows still open in memory are the only loss.
//!
//! # Corrupt file
//! At start the spool is opened and, unless new, checked (`PRAGMA quick_check`). A file
//! SQLite calls malformed or not a database is renamed to `NAME.corrupt-MILLIS` with its
//! WAL, kept, logged as an error, and a fresh spool takes its place; the event stays in
//! `meta('recovered')` for `status`. Another program's SQLite file is refused instead.
//!
//! # Full disk
//! The spool's used pages are held under `disk_budget` by a [`WhenFull`] policy:
//! `DropOldest` deletes the oldest partitions whatever their delivery state,
//! `StopSampling` discards new windows; both count what they dropped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::aggregate::{AggregateCounts, Stats, WindowRow};
use crate::config::WhenFull;
use crate::sink::{LiveReport, LiveState};
use crate::source::{Problem, Series, SourceDeltas, SourceStats};

/// Identifies our files (`PRAGMA application_id`, "ESP1").
const APPLICATION_ID: i32 = 0x4553_5031;

/// Small pages: fewer bytes rewritten around each flush's few KiB of new data.
const PAGE_SIZE: u32 = 1024;

/// SQLite's page cache per connection, in KiB (kept small for the Pi).
const CACHE_KIB: i64 = 512;

/// How many closed partitions one planning transaction fixes parts for.
const PLAN_AHEAD: usize = 16;

/// The most rows one part holds; a larger backlog of one partition becomes more parts.
pub const MAX_PART_ROWS: i64 = 200_000;

/// Schema migrations, applied in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE series (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    unit TEXT,
    tags TEXT NOT NULL,
    UNIQUE (name, tags)
);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    partition INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE TABLE partitions (
    partition INTEGER PRIMARY KEY,
    seconds INTEGER NOT NULL,
    max_id INTEGER NOT NULL,
    rows INTEGER NOT NULL
);
CREATE TABLE sinks (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    active INTEGER NOT NULL,
    last_success_ms INTEGER,
    last_error TEXT,
    last_error_ms INTEGER,
    retrying_since_ms INTEGER,
    next_attempt_ms INTEGER
);
CREATE TABLE parts (
    sink TEXT NOT NULL,
    partition INTEGER NOT NULL,
    part INTEGER NOT NULL,
    after_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    planned_ms INTEGER NOT NULL,
    delivered_ms INTEGER,
    PRIMARY KEY (sink, partition, part)
) WITHOUT ROWID;
"#,
    r#"
ALTER TABLE series ADD COLUMN first_partition INTEGER;
ALTER TABLE series ADD COLUMN first_id INTEGER;
"#,
];

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// SQLite failed.
    #[error("spool {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The folder for the spool could not be made.
    #[error("cannot create the spool folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is some other SQLite database.
    #[error("{path} is not an edgespool spool (application id {found:#x})")]
    Foreign { path: PathBuf, found: i32 },
    /// The file exists but the agent has not finished creating it.
    #[error("{path} holds no spool yet: the agent is still creating it")]
    NotReady { path: PathBuf },
    /// The file was written by a newer edgespool.
    #[error("{path} has schema version {found}, newer than this edgespool knows ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    /// A stored record could not be decoded.
    #[error("spool {path}: the batch ending at window {id} is unreadable: {reason}")]
    Record {
        path: PathBuf,
        id: i64,
        reason: String,
    },
    /// The spool thread is gone (the agent is shutting down).
    #[error("the spool has stopped")]
    Stopped,
    /// The file is damaged (SQLite says so, or its integrity check fails).
    #[error("spool {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A corrupt spool could not be moved aside.
    #[error("cannot move the corrupt spool {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A corrupt spool found at start and moved aside, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// When, Unix ms.
    pub at_ms: i64,
    /// Where the damaged file went (kept for forensics).
    pub moved_to: PathBuf,
    /// What was wrong.
    pub reason: String,
}

/// What the spool needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// This device's id.
    pub device: String,
    /// Window length in seconds.
    pub window_seconds: u32,
    /// Partition length in seconds.
    pub partition_seconds: u32,
    /// Grace period after a partition's end, in milliseconds.
    pub grace_ms: i64,
    /// Most bytes of used pages.
    pub budget_bytes: u64,
    /// Policy at the budget.
    pub when_full: WhenFull,
    /// The configured sources: (name, kind word).
    pub sources: Vec<(String, &'static str)>,
    /// The configured sinks that receive partitions: (name, kind word).
    pub sinks: Vec<(String, &'static str)>,
    /// The configured live feeds (see [`crate::sink::LiveStats`]): (name, kind word).
    pub live: Vec<(String, &'static str)>,
}

/// The agent's state as `status` reads it, rewritten at every flush.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// Device id.
    pub device: String,
    /// edgespool version.
    pub version: String,
    /// Process id of the daemon.
    pub pid: u32,
    /// When the daemon started, Unix ms.
    pub started_ms: i64,
    /// The last flush, Unix ms.
    pub heartbeat_ms: i64,
    /// Set when the daemon stopped cleanly.
    pub stopped: bool,
    /// Window length, seconds.
    pub window_seconds: u32,
    /// Partition length, seconds.
    pub partition_seconds: u32,
    /// Grace period, ms.
    pub grace_ms: i64,
    /// Disk budget, bytes.
    pub budget_bytes: u64,
    /// Full-disk policy word.
    pub when_full: String,
    /// Samples per second over the last flush interval.
    pub samples_per_second: f64,
    /// Series seen in the last flush interval.
    pub series: usize,
    /// Windows open in memory at the last flush.
    pub open_windows: usize,
    /// Each source's latest problem.
    pub sources: Vec<SourceState>,
    /// Each live feed's state.
    #[serde(default)]
    pub live: Vec<LiveState>,
    /// The clock's state at the last flush.
    #[serde(default)]
    pub clock: crate::clock::ClockReport,
}

/// One source as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceState {
    /// Name.
    pub name: String,
    /// Kind word.
    pub kind: String,
    /// The latest problem, if any.
    pub last_problem: Option<Problem>,
}

/// One flush: closed windows and the counters gathered since the previous flush.
pub struct Flush {
    /// Closed windows.
    pub rows: Vec<WindowRow>,
    /// When, Unix ms.
    pub now_ms: i64,
    /// The aggregator's counters since the previous flush.
    pub aggregate: AggregateCounts,
    /// Each source's counters since the previous flush.
    pub sources: Vec<(Arc<SourceStats>, SourceDeltas)>,
    /// Windows still open in memory.
    pub open_windows: usize,
    /// Each live feed's counts since the previous flush, and its state.
    pub live: Vec<LiveReport>,
    /// The clock's state.
    pub clock: crate::clock::ClockReport,
}

impl Flush {
    /// Takes a newer flush into one that could not be committed: its rows after these,
    /// its counts added, its state.
    pub fn absorb(&mut self, newer: Flush) {
        self.rows.extend(newer.rows);
        self.now_ms = newer.now_ms;
        self.aggregate.add(&newer.aggregate);
        for (stats, deltas) in newer.sources {
            match self
                .sources
                .iter_mut()
                .find(|(s, _)| Arc::ptr_eq(s, &stats))
            {
                Some((_, kept)) => kept.add(&deltas),
                None => self.sources.push((stats, deltas)),
            }
        }
        for report in newer.live {
            match self
                .live
                .iter_mut()
                .find(|r| r.state.name == report.state.name)
            {
                Some(kept) => {
                    kept.published += report.published;
                    kept.skipped += report.skipped;
                    kept.state = report.state;
                }
                None => self.live.push(report),
            }
        }
        self.open_windows = newer.open_windows;
        self.clock = newer.clock;
    }

    /// Drops the oldest windows beyond `max`; returns how many.
    pub fn keep_newest(&mut self, max: usize) -> usize {
        let excess = self.rows.len().saturating_sub(max);
        self.rows.drain(..excess);
        excess
    }
}

/// A part planned for a sink: the rows it holds are fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartPlan {
    /// The sink.
    pub sink: String,
    /// Partition start, Unix seconds.
    pub partition: i64,
    /// Partition length, seconds.
    pub seconds: u32,
    /// Part number, from 0.
    pub part: u32,
    /// Rows with ids above this…
    pub after_id: i64,
    /// …up to and including this.
    pub last_id: i64,
    /// How many rows that was when planned.
    pub rows: i64,
}

/// What a planned part holds.
#[derive(Debug)]
pub struct PartRows {
    /// The rows, ordered by window start and series.
    pub rows: Vec<WindowRow>,
    /// The series that get columns in a wide file of this part (sorted).
    pub series: Vec<Arc<Series>>,
}

/// What a sink should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Send this part.
    Ready(PartPlan),
    /// Nothing to send before this instant (Unix ms), or before new data if `None`.
    Wait(Option<i64>),
}

/// One window as a batch stores it.
#[derive(Debug, Serialize, Deserialize)]
struct StoredWindow {
    /// `series.id`.
    series: i64,
    /// Window start minus partition start, seconds.
    offset: u32,
    /// Window length, seconds.
    seconds: u32,
    /// The aggregates.
    stats: Stats,
}

/// The writer. Only [`SpoolHandle`]'s thread holds one.
pub struct Spool {
    conn: Connection,
    path: PathBuf,
    options: SpoolOptions,
    series_ids: HashMap<Arc<Series>, i64>,
    /// The id the next window gets (persisted in `meta` with every flush).
    next_id: i64,
    state: AgentState,
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> SpoolError + '_ {
    move |source| SpoolError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

impl Spool {
    /// Opens (creating or migrating) the spool and registers the configured sinks. A
    /// corrupt file is moved aside (with its WAL), kept for forensics, and a fresh spool
    /// started in its place; `status` shows the event from then on.
    pub fn open(path: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        match Spool::open_checked(path, options.clone()) {
            Err(SpoolError::Corrupt { reason, .. }) => {
                let moved_to = move_aside(path, crate::clock::now_ms())?;
                tracing::error!(
                    spool = %path.display(),
                    moved_to = %moved_to.display(),
                    reason = %reason,
                    "the spool is corrupt: moved aside, starting a fresh one (windows it held are in the moved file)"
                );
                let spool = Spool::open_checked(path, options)?;
                let recovery = Recovery {
                    at_ms: crate::clock::now_ms(),
                    moved_to,
                    reason,
                };
                spool
                    .conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('recovered', ?1)
                         ON CONFLICT (key) DO UPDATE SET value = ?1",
                        [serde_json::to_string(&recovery).unwrap_or_default()],
                    )
                    .map_err(spool.err())?;
                Ok(spool)
            }
            other => other,
        }
    }

    fn open_checked(path: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SpoolError::Folder {
                path: dir.to_owned(),
                source,
            })?;
        }
        let err = |source: rusqlite::Error| corrupt_or(path, source);
        let conn = Connection::open(path).map_err(&err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(&err)?;
        let found: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(&err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(&err)?;
        if found != APPLICATION_ID && (found != 0 || version != 0) {
            return Err(SpoolError::Foreign {
                path: path.to_owned(),
                found,
            });
        }
        if version as usize > MIGRATIONS.len() {
            return Err(SpoolError::TooNew {
                path: path.to_owned(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        if version == 0 {
            conn.pragma_update(None, "page_size", PAGE_SIZE)
                .map_err(&err)?;
        } else {
            // Every page once (a few seconds for a spool of hundreds of MB on an SD card):
            // damage found now is moved aside instead of failing a flush later.
            let verdict: String = conn
                .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
                .map_err(&err)?;
            if verdict != "ok" {
                return Err(SpoolError::Corrupt {
                    path: path.to_owned(),
                    reason: format!("integrity check: {verdict}"),
                });
            }
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(&err)?;
        let mut conn = conn;
        let tx = conn.transaction().map_err(&err)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).map_err(&err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(&err)?;
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(&err)?;
        tx.execute("UPDATE sinks SET active = 0", [])
            .map_err(&err)?;
        for (name, kind) in &options.sinks {
            tx.execute(
                "INSERT INTO sinks (name, kind, active) VALUES (?1, ?2, 1)
                 ON CONFLICT (name) DO UPDATE SET kind = ?2, active = 1",
                params![name, kind],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;

        let now = crate::clock::now_ms();
        let state = AgentState {
            device: options.device.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_ms: now,
            heartbeat_ms: now,
            stopped: false,
            window_seconds: options.window_seconds,
            partition_seconds: options.partition_seconds,
            grace_ms: options.grace_ms,
            budget_bytes: options.budget_bytes,
            when_full: match options.when_full {
                WhenFull::DropOldest => "drop_oldest".to_owned(),
                WhenFull::StopSampling => "stop_sampling".to_owned(),
            },
            samples_per_second: 0.0,
            series: 0,
            open_windows: 0,
            sources: options
                .sources
                .iter()
                .map(|(name, kind)| SourceState {
                    name: name.clone(),
                    kind: (*kind).to_owned(),
                    last_problem: None,
                })
                .collect(),
            live: options
                .live
                .iter()
                .map(|(name, kind)| LiveState::new(name, kind))
                .collect(),
            clock: Default::default(),
        };
        let next_id: i64 = conn
            .query_row(
                "SELECT MAX(COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'next_id'), 1),
                            COALESCE((SELECT MAX(id) + 1 FROM batches), 1))",
                [],
                |r| r.get(0),
            )
            .map_err(&err)?;
        let spool = Spool {
            conn,
            path: path.to_owned(),
            options,
            series_ids: HashMap::new(),
            next_id,
            state,
        };
        spool.write_state()?;
        Ok(spool)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> SpoolError + '_ {
        sqlite(&self.path)
    }

    fn write_state(&self) -> Result<(), SpoolError> {
        let json = serde_json::to_string(&self.state).unwrap_or_default();
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('agent', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = ?1",
                [json],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Commits one flush in one transaction: windows, counters and the heartbeat. On
    /// failure nothing of it is stored, and the writer's own bookkeeping (window ids, the
    /// series cache) is as before.
    pub fn commit(&mut self, flush: &Flush) -> Result<(), SpoolError> {
        let next_id = self.next_id;
        let result = self.commit_flush(flush);
        if result.is_err() {
            self.next_id = next_id;
            // Series registered in the rolled-back transaction are not in the file.
            self.series_ids.clear();
        }
        result
    }

    fn commit_flush(&mut self, flush: &Flush) -> Result<(), SpoolError> {
        let over = self.used_bytes()? > self.options.budget_bytes;
        let path = self.path.clone();
        let err = sqlite(&path);
        let partition_seconds = i64::from(self.options.partition_seconds);
        let tx = self.conn.transaction().map_err(&err)?;
        let mut counters: Vec<(String, u64)> = vec![
            ("samples".into(), flush.aggregate.samples),
            ("samples.non_finite".into(), flush.aggregate.non_finite),
            ("samples.late".into(), flush.aggregate.late),
            ("samples.overflow".into(), flush.aggregate.overflow),
            ("rows.lost".into(), flush.aggregate.lost),
            ("samples.clamped".into(), flush.aggregate.clamped),
            ("samples.held_dropped".into(), flush.aggregate.held_dropped),
        ];
        if over && self.options.when_full == WhenFull::StopSampling {
            counters.push(("rows.dropped".into(), flush.rows.len() as u64));
            if !flush.rows.is_empty() {
                warn!(
                    rows = flush.rows.len(),
                    budget = self.options.budget_bytes,
                    "spool is at its disk budget: new windows discarded (when_full = stop_sampling)"
                );
            }
        } else {
            let mut by_partition: BTreeMap<i64, Vec<StoredWindow>> = BTreeMap::new();
            // Series this process had not met yet, by the partition of their first row:
            // a new one gets that batch's id as `first_id` below.
            let mut met: Vec<(i64, i64)> = Vec::new();
            for row in &flush.rows {
                let partition = row.start.div_euclid(partition_seconds) * partition_seconds;
                let series = match self.series_ids.get(&row.series) {
                    Some(&id) => id,
                    None => {
                        let id = series_id(&tx, &mut self.series_ids, &row.series, partition)
                            .map_err(&err)?;
                        met.push((id, partition));
                        id
                    }
                };
                by_partition
                    .entry(partition)
                    .or_default()
                    .push(StoredWindow {
                        series,
                        offset: (row.start - partition) as u32,
                        seconds: row.seconds,
                        stats: row.stats.clone(),
                    });
            }
            for (partition, windows) in by_partition {
                let rows = windows.len() as i64;
                let id = self.next_id + rows - 1;
                self.next_id += rows;
                let record = postcard::to_allocvec(&windows).unwrap_or_default();
                tx.prepare_cached(
                    "INSERT INTO batches (id, partition, rows, record) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut insert| insert.execute(params![id, partition, rows, record]))
                .map_err(&err)?;
                tx.execute(
                    "INSERT INTO partitions (partition, seconds, max_id, rows) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (partition) DO UPDATE SET max_id = ?3, rows = rows + ?4",
                    params![partition, partition_seconds, id, rows],
                )
                .map_err(&err)?;
                for (series, _) in met.iter().filter(|(_, p)| *p == partition) {
                    // Only a series registered just now has no first_id yet.
                    tx.execute(
                        "UPDATE series SET first_id = ?1 WHERE id = ?2 AND first_id IS NULL
                         AND first_partition = ?3",
                        params![id, series, partition],
                    )
                    .map_err(&err)?;
                }
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('next_id', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = ?1",
                [self.next_id.to_string()],
            )
            .map_err(&err)?;
        }
        for (stats, deltas) in &flush.sources {
            let name = &stats.name;
            counters.push((format!("source.{name}.samples"), deltas.samples));
            counters.push((format!("source.{name}.invalid"), deltas.invalid));
            counters.push((format!("source.{name}.errors"), deltas.errors));
        }
        live_counters(&flush.live, &mut counters);
        add_counters(&tx, &counters).map_err(&err)?;

        let elapsed_ms = (flush.now_ms - self.state.heartbeat_ms).max(1);
        let state = &mut self.state;
        state.samples_per_second = flush.aggregate.samples as f64 * 1000.0 / elapsed_ms as f64;
        state.heartbeat_ms = flush.now_ms;
        let mut seen: Vec<&Arc<Series>> = flush.rows.iter().map(|r| &r.series).collect();
        seen.sort();
        seen.dedup();
        state.series = seen.len();
        state.open_windows = flush.open_windows;
        state.sources = flush
            .sources
            .iter()
            .map(|(s, _)| SourceState {
                name: s.name.clone(),
                kind: s.kind.to_owned(),
                last_problem: s.last_problem(),
            })
            .collect();
        state.live = flush.live.iter().map(|r| r.state.clone()).collect();
        state.clock = flush.clock.clone();
        let json = serde_json::to_string(&self.state).unwrap_or_default();
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'agent'", [json])
            .map_err(&err)?;
        tx.commit().map_err(&err)?;

        if self.options.when_full == WhenFull::DropOldest {
            self.enforce_budget()?;
        }
        Ok(())
    }

    /// Records live feeds' last counts and states (a feed's final report, after the last
    /// flush).
    pub fn report(&mut self, reports: &[LiveReport]) -> Result<(), SpoolError> {
        let path = self.path.clone();
        let err = sqlite(&path);
        let mut counters = Vec::new();
        live_counters(reports, &mut counters);
        for report in reports {
            match self
                .state
                .live
                .iter_mut()
                .find(|s| s.name == report.state.name)
            {
                Some(state) => *state = report.state.clone(),
                None => self.state.live.push(report.state.clone()),
            }
        }
        let json = serde_json::to_string(&self.state).unwrap_or_default();
        let tx = self.conn.transaction().map_err(&err)?;
        add_counters(&tx, &counters).map_err(&err)?;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'agent'", [json])
            .map_err(&err)?;
        tx.commit().map_err(&err)
    }

    /// Marks a clean stop, so that `status` says "stopped" rather than "not responding".
    pub fn mark_stopped(&mut self) -> Result<(), SpoolError> {
        self.state.stopped = true;
        self.write_state()
    }

    /// Bytes of pages in use (the file minus its free pages).
    pub fn used_bytes(&self) -> Result<u64, SpoolError> {
        used_bytes(&self.conn).map_err(self.err())
    }

    /// Deletes the oldest partitions until the used pages fit the budget.
    fn enforce_budget(&mut self) -> Result<(), SpoolError> {
        let budget = self.options.budget_bytes;
        let err = sqlite(&self.path);
        let mut used = self.used_bytes()?;
        while used > budget {
            let oldest: Option<(i64, i64)> = self
                .conn
                .query_row(
                    "SELECT partition, rows FROM partitions ORDER BY partition LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(&err)?;
            let Some((partition, dropped)) = oldest else {
                break;
            };
            let tx = self.conn.transaction().map_err(&err)?;
            tx.execute("DELETE FROM batches WHERE partition = ?1", [partition])
                .map_err(&err)?;
            tx.execute("DELETE FROM partitions WHERE partition = ?1", [partition])
                .map_err(&err)?;
            add_counters(&tx, &[("rows.dropped".to_owned(), dropped as u64)]).map_err(&err)?;
            tx.commit().map_err(&err)?;
            warn!(
                partition = %crate::clock::rfc3339(partition),
                rows = dropped,
                budget,
                "spool is at its disk budget: dropped the oldest partition (when_full = drop_oldest)"
            );
            used = self.used_bytes()?;
        }
        Ok(())
    }

    /// Plans the next part for `sink`, or says how long there is nothing to send.
    pub fn plan(&mut self, sink: &str, now_ms: i64) -> Result<Plan, SpoolError> {
        let err = sqlite(&self.path);
        let pending = self
            .conn
            .query_row(
                "SELECT p.partition, p.seconds, t.part, t.after_id, t.last_id, t.rows
                 FROM parts t JOIN partitions p ON p.partition = t.partition
                 WHERE t.sink = ?1 AND t.delivered_ms IS NULL
                 ORDER BY t.partition, t.part LIMIT 1",
                [sink],
                |r| {
                    Ok(PartPlan {
                        sink: sink.to_owned(),
                        partition: r.get(0)?,
                        seconds: r.get(1)?,
                        part: r.get(2)?,
                        after_id: r.get(3)?,
                        last_id: r.get(4)?,
                        rows: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(&err)?;
        if let Some(plan) = pending {
            return Ok(Plan::Ready(plan));
        }
        // A planned part whose partition was dropped for the budget: nothing to send.
        self.conn
            .execute(
                "UPDATE parts SET delivered_ms = ?2 WHERE sink = ?1 AND delivered_ms IS NULL",
                params![sink, now_ms],
            )
            .map_err(&err)?;

        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT p.partition, p.seconds, d.done, d.next_part FROM partitions p
                 LEFT JOIN (SELECT partition, MAX(last_id) AS done, MAX(part) + 1 AS next_part
                            FROM parts WHERE sink = ?1 GROUP BY partition) d
                   ON d.partition = p.partition
                 WHERE p.max_id > COALESCE(d.done, 0)
                 ORDER BY p.partition",
            )
            .map_err(&err)?;
        let grace = self.options.grace_ms;
        let mut candidates = stmt
            .query_map([sink], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                    r.get::<_, Option<u32>>(3)?.unwrap_or(0),
                ))
            })
            .map_err(&err)?;
        let mut wait_until: Option<i64> = None;
        let mut chosen = Vec::new();
        for candidate in &mut candidates {
            let (partition, seconds, done, next_part) = candidate.map_err(&err)?;
            let ready_ms = (partition + i64::from(seconds)) * 1000 + grace;
            if ready_ms <= now_ms {
                chosen.push((partition, seconds, done, next_part));
                if chosen.len() == PLAN_AHEAD {
                    break;
                }
            } else {
                wait_until = Some(wait_until.map_or(ready_ms, |w: i64| w.min(ready_ms)));
            }
        }
        drop(candidates);
        drop(stmt);
        // Several closed partitions are planned in one transaction (one fsync), then
        // sent one by one, oldest first.
        let tx = self.conn.transaction().map_err(&err)?;
        let mut first = None;
        for (partition, seconds, after_id, part) in chosen {
            // Whole batches, up to MAX_PART_ROWS windows (at least one batch).
            let (mut rows, mut last_id) = (0i64, None);
            {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id, rows FROM batches WHERE partition = ?1 AND id > ?2 ORDER BY id",
                    )
                    .map_err(&err)?;
                let mut batches = stmt.query(params![partition, after_id]).map_err(&err)?;
                while let Some(batch) = batches.next().map_err(&err)? {
                    let (id, n): (i64, i64) =
                        (batch.get(0).map_err(&err)?, batch.get(1).map_err(&err)?);
                    if last_id.is_some() && rows + n > MAX_PART_ROWS {
                        break;
                    }
                    rows += n;
                    last_id = Some(id);
                }
            }
            let Some(last_id) = last_id else {
                continue;
            };
            tx.execute(
                "INSERT INTO parts (sink, partition, part, after_id, last_id, rows, planned_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![sink, partition, part, after_id, last_id, rows, now_ms],
            )
            .map_err(&err)?;
            first.get_or_insert(PartPlan {
                sink: sink.to_owned(),
                partition,
                seconds,
                part,
                after_id,
                last_id,
                rows,
            });
        }
        tx.commit().map_err(&err)?;
        Ok(first.map_or(Plan::Wait(wait_until), Plan::Ready))
    }

    /// Records that a part was delivered, and deletes rows every active sink now has.
    pub fn delivered(&mut self, plan: &PartPlan, now_ms: i64) -> Result<(), SpoolError> {
        // Without an fsync of its own: a delivery record lost to a power cut only makes
        // the (durably planned) part go again, which every sink takes as a no-op; the
        // next synced commit makes it durable with everything before it in the WAL.
        let path = self.path.clone();
        let err = sqlite(&path);
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(&err)?;
        let result = self.record_delivery(plan, now_ms);
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        result
    }

    fn record_delivery(&mut self, plan: &PartPlan, now_ms: i64) -> Result<(), SpoolError> {
        let err = sqlite(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        tx.execute(
            "UPDATE parts SET delivered_ms = ?4 WHERE sink = ?1 AND partition = ?2 AND part = ?3",
            params![plan.sink, plan.partition, plan.part, now_ms],
        )
        .map_err(&err)?;
        tx.execute(
            "UPDATE sinks SET last_success_ms = ?2, retrying_since_ms = NULL, next_attempt_ms = NULL
             WHERE name = ?1",
            params![plan.sink, now_ms],
        )
        .map_err(&err)?;
        // The id up to which every active sink has this partition.
        let everyone_has: Option<i64> = tx
            .query_row(
                "SELECT MIN(COALESCE((SELECT MAX(last_id) FROM parts t
                                      WHERE t.sink = s.name AND t.partition = ?1
                                        AND t.delivered_ms IS NOT NULL), 0))
                 FROM sinks s WHERE s.active = 1",
                [plan.partition],
                |r| r.get(0),
            )
            .map_err(&err)?;
        if let Some(upto) = everyone_has.filter(|&id| id > 0) {
            let deleted: i64 = tx
                .query_row(
                    "SELECT COALESCE(SUM(rows), 0) FROM batches WHERE partition = ?1 AND id <= ?2",
                    params![plan.partition, upto],
                    |r| r.get(0),
                )
                .map_err(&err)?;
            tx.execute(
                "DELETE FROM batches WHERE partition = ?1 AND id <= ?2",
                params![plan.partition, upto],
            )
            .map_err(&err)?;
            tx.execute(
                "UPDATE partitions SET rows = rows - ?2 WHERE partition = ?1",
                params![plan.partition, deleted],
            )
            .map_err(&err)?;
            tx.execute(
                "DELETE FROM partitions WHERE partition = ?1 AND rows <= 0",
                [plan.partition],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(())
    }

    /// Records a failed attempt of a sink, for `status`.
    pub fn failed(
        &mut self,
        sink: &str,
        error: &str,
        now_ms: i64,
        next_attempt_ms: i64,
    ) -> Result<(), SpoolError> {
        self.conn
            .execute(
                "UPDATE sinks SET last_error = ?2, last_error_ms = ?3,
                   retrying_since_ms = COALESCE(retrying_since_ms, ?3), next_attempt_ms = ?4
                 WHERE name = ?1",
                params![sink, error, now_ms, next_attempt_ms],
            )
            .map_err(self.err())?;
        Ok(())
    }
}

/// A SQLite error, or [`SpoolError::Corrupt`] when it says the file is damaged.
fn corrupt_or(path: &Path, source: rusqlite::Error) -> SpoolError {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    match source.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => SpoolError::Corrupt {
            path: path.to_owned(),
            reason: source.to_string(),
        },
        _ => SpoolError::Sqlite {
            path: path.to_owned(),
            source,
        },
    }
}

/// Renames the spool and its WAL and shared-memory files to `NAME.corrupt-MILLIS`
/// (`-wal`, `-shm`); returns the new name of the spool.
fn move_aside(path: &Path, now_ms: i64) -> Result<PathBuf, SpoolError> {
    let mut moved = path.as_os_str().to_owned();
    moved.push(format!(".corrupt-{now_ms}"));
    let moved = PathBuf::from(moved);
    for suffix in ["", "-wal", "-shm"] {
        let with = |p: &Path| {
            let mut name = p.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        match std::fs::rename(with(path), with(&moved)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
            Err(source) => {
                return Err(SpoolError::MoveAside {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(moved)
}

/// Registers a series this process has not met (once per series and process) with the
/// partition of its first window (its `first_id` is set once that window's batch has an
/// id), and caches its id.
fn series_id(
    tx: &rusqlite::Transaction<'_>,
    cache: &mut HashMap<Arc<Series>, i64>,
    series: &Arc<Series>,
    first_partition: i64,
) -> rusqlite::Result<i64> {
    let tags = serde_json::to_string(&series.tags).unwrap_or_else(|_| "{}".to_owned());
    tx.execute(
        "INSERT INTO series (name, unit, tags, first_partition) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name, tags) DO UPDATE SET unit = ?2",
        params![series.name, series.unit, tags, first_partition],
    )?;
    let id = tx.query_row(
        "SELECT id FROM series WHERE name = ?1 AND tags = ?2",
        params![series.name, tags],
        |r| r.get(0),
    )?;
    cache.insert(Arc::clone(series), id);
    Ok(id)
}

/// The counters of live feeds' reports: `sink.{name}.published` and `.skipped`.
fn live_counters(reports: &[LiveReport], counters: &mut Vec<(String, u64)>) {
    for report in reports {
        let name = &report.state.name;
        counters.push((format!("sink.{name}.published"), report.published));
        counters.push((format!("sink.{name}.skipped"), report.skipped));
    }
}

fn add_counters(
    tx: &rusqlite::Transaction<'_>,
    counters: &[(String, u64)],
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO counters (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + ?2",
    )?;
    for (name, delta) in counters.iter().filter(|(_, d)| *d > 0) {
        stmt.execute(params![name, *delta as i64])?;
    }
    Ok(())
}

fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok((pages - free).max(0) as u64 * size.max(0) as u64)
}

enum Command {
    Commit(
        Box<Flush>,
        oneshot::Sender<Result<(), (SpoolError, Box<Flush>)>>,
    ),
    Plan(String, i64, oneshot::Sender<Result<Plan, SpoolError>>),
    Delivered(PartPlan, i64, oneshot::Sender<Result<(), SpoolError>>),
    Failed(String, String, i64, i64),
    Report(Vec<LiveReport>),
}

/// The async face of the single writer thread.
#[derive(Clone)]
pub struct SpoolHandle {
    commands: mpsc::Sender<Command>,
    commits: watch::Receiver<u64>,
    path: PathBuf,
}

/// The writer thread; joining it closes the database cleanly.
pub struct SpoolThread(JoinHandle<()>);

impl SpoolThread {
    /// Waits for the writer to finish (all handles dropped).
    pub fn join(self) {
        if self.0.join().is_err() {
            warn!("the spool thread panicked");
        }
    }
}

impl SpoolHandle {
    /// Moves the spool onto its own thread.
    pub fn spawn(mut spool: Spool) -> (SpoolHandle, SpoolThread) {
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        let (commits_tx, commits) = watch::channel(0u64);
        let path = spool.path.clone();
        let thread = std::thread::Builder::new()
            .name("spool".into())
            .spawn(move || {
                while let Some(command) = rx.blocking_recv() {
                    match command {
                        Command::Commit(flush, reply) => {
                            let result = match spool.commit(&flush) {
                                Ok(()) => {
                                    commits_tx.send_modify(|n| *n += 1);
                                    Ok(())
                                }
                                Err(err) => Err((err, flush)),
                            };
                            let _ = reply.send(result);
                        }
                        Command::Plan(sink, now, reply) => {
                            let _ = reply.send(spool.plan(&sink, now));
                        }
                        Command::Delivered(plan, now, reply) => {
                            let _ = reply.send(spool.delivered(&plan, now));
                        }
                        Command::Report(reports) => {
                            if let Err(err) = spool.report(&reports) {
                                warn!(error = %err, "could not record a live feed's report");
                            }
                        }
                        Command::Failed(sink, error, now, next) => {
                            if let Err(err) = spool.failed(&sink, &error, now, next) {
                                warn!(error = %err, "could not record a sink failure");
                            }
                        }
                    }
                }
                if let Err(err) = spool.mark_stopped() {
                    warn!(error = %err, "could not mark the spool stopped");
                }
                info!(path = %spool.path.display(), "spool closed");
            })
            .expect("the OS lets us start one thread");
        (
            SpoolHandle {
                commands: tx,
                commits,
                path,
            },
            SpoolThread(thread),
        )
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Increments at every successful commit.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Command,
    ) -> Result<T, SpoolError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }

    /// Commits a flush; on failure gives it back (unless the spool thread is gone).
    pub async fn commit(&self, flush: Flush) -> Result<(), (SpoolError, Option<Flush>)> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(command)) = self
            .commands
            .send(Command::Commit(Box::new(flush), tx))
            .await
        {
            let flush = match command {
                Command::Commit(flush, _) => Some(*flush),
                _ => None,
            };
            return Err((SpoolError::Stopped, flush));
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((err, flush))) => Err((err, Some(*flush))),
            Err(_) => Err((SpoolError::Stopped, None)),
        }
    }

    /// Plans the next part of a sink.
    pub async fn plan(&self, sink: &str, now_ms: i64) -> Result<Plan, SpoolError> {
        self.ask(|tx| Command::Plan(sink.to_owned(), now_ms, tx))
            .await
    }

    /// Records a delivery.
    pub async fn delivered(&self, plan: &PartPlan, now_ms: i64) -> Result<(), SpoolError> {
        self.ask(|tx| Command::Delivered(plan.clone(), now_ms, tx))
            .await
    }

    /// Records live feeds' final reports (fire and forget).
    pub async fn report(&self, reports: Vec<LiveReport>) {
        let _ = self.commands.send(Command::Report(reports)).await;
    }

    /// Records a failed attempt (fire and forget).
    pub async fn failed(&self, sink: &str, error: &str, now_ms: i64, next_attempt_ms: i64) {
        let command = Command::Failed(sink.to_owned(), error.to_owned(), now_ms, next_attempt_ms);
        let _ = self.commands.send(command).await;
    }
}

/// A read-only connection: the uploaders' and `status`'s.
pub struct SpoolReader {
    conn: Connection,
    path: PathBuf,
    series: HashMap<i64, Arc<Series>>,
}

/// One sink as the spool sees it.
#[derive(Debug, Clone, Serialize)]
pub struct SinkRecord {
    /// Name.
    pub name: String,
    /// Kind word.
    pub kind: String,
    /// Last delivery, Unix ms.
    pub last_success_ms: Option<i64>,
    /// Last error text.
    pub last_error: Option<String>,
    /// When it happened, Unix ms.
    pub last_error_ms: Option<i64>,
    /// Failing since, Unix ms; `None` when the last attempt succeeded.
    pub retrying_since_ms: Option<i64>,
    /// When the next attempt is due, Unix ms.
    pub next_attempt_ms: Option<i64>,
    /// Rows not yet delivered to it.
    pub pending_rows: i64,
    /// Partitions with rows not yet delivered to it.
    pub pending_partitions: i64,
    /// The oldest of those, Unix seconds.
    pub oldest_pending: Option<i64>,
    /// Parts delivered.
    pub delivered_parts: i64,
}

impl SpoolReader {
    /// Opens the spool read-only.
    pub fn open(path: &Path) -> Result<SpoolReader, SpoolError> {
        let err = sqlite(path);
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(&err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(&err)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(&err)?;
        let found: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(&err)?;
        if found != APPLICATION_ID {
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(&err)?;
            return Err(if found == 0 && version == 0 {
                SpoolError::NotReady {
                    path: path.to_owned(),
                }
            } else {
                SpoolError::Foreign {
                    path: path.to_owned(),
                    found,
                }
            });
        }
        Ok(SpoolReader {
            conn,
            path: path.to_owned(),
            series: HashMap::new(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> SpoolError + '_ {
        sqlite(&self.path)
    }

    /// The rows of a planned part, ordered by window start, series and id, and the series
    /// a wide file of it gives columns to: every series first seen in this partition or
    /// an earlier one, in a flush this part includes. That set is the same for every
    /// partition while the configured series are, and the same for a retried part.
    /// The set is read only `with_series` (for a wide layout); otherwise it is empty.
    pub fn read_part(
        &mut self,
        plan: &PartPlan,
        with_series: bool,
    ) -> Result<PartRows, SpoolError> {
        let rows = self.read_rows(plan)?;
        if !with_series {
            return Ok(PartRows {
                rows,
                series: Vec::new(),
            });
        }
        let ids: Vec<i64> = self
            .conn
            .prepare_cached(
                "SELECT id FROM series
                 WHERE COALESCE(first_partition, 0) <= ?1 AND COALESCE(first_id, 0) <= ?2
                 ORDER BY id",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![plan.partition, plan.last_id], |r| r.get(0))?
                    .collect()
            })
            .map_err(self.err())?;
        let mut series = Vec::with_capacity(ids.len());
        for id in ids {
            series.push(self.series(id)?);
        }
        series.sort();
        Ok(PartRows { rows, series })
    }

    fn read_rows(&mut self, plan: &PartPlan) -> Result<Vec<WindowRow>, SpoolError> {
        let path = self.path.clone();
        let err = sqlite(&path);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, rows, record FROM batches
                 WHERE partition = ?1 AND id > ?2 AND id <= ?3 ORDER BY id",
            )
            .map_err(&err)?;
        let raw: Vec<(i64, i64, Vec<u8>)> = stmt
            .query_map(params![plan.partition, plan.after_id, plan.last_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(&err)?
            .collect::<Result<_, _>>()
            .map_err(&err)?;
        drop(stmt);
        let mut rows = Vec::new();
        for (last_id, count, record) in raw {
            let windows: Vec<StoredWindow> =
                postcard::from_bytes(&record).map_err(|e| SpoolError::Record {
                    path: self.path.clone(),
                    id: last_id,
                    reason: e.to_string(),
                })?;
            let first_id = last_id - count + 1;
            for (id, window) in (first_id..).zip(windows) {
                let series = self.series(window.series)?;
                let row = WindowRow {
                    series,
                    start: plan.partition + i64::from(window.offset),
                    seconds: window.seconds,
                    stats: window.stats,
                };
                rows.push((id, row));
            }
        }
        rows.sort_by(|(ia, a), (ib, b)| (a.start, &a.series, ia).cmp(&(b.start, &b.series, ib)));
        Ok(rows.into_iter().map(|(_, row)| row).collect())
    }

    fn series(&mut self, id: i64) -> Result<Arc<Series>, SpoolError> {
        if let Some(series) = self.series.get(&id) {
            return Ok(Arc::clone(series));
        }
        let (name, unit, tags): (String, Option<String>, String) = self
            .conn
            .query_row(
                "SELECT name, unit, tags FROM series WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(self.err())?;
        let series = Arc::new(Series {
            name,
            unit,
            tags: serde_json::from_str(&tags).unwrap_or_default(),
        });
        self.series.insert(id, Arc::clone(&series));
        Ok(series)
    }

    /// The agent's state as last flushed, if the daemon ever ran.
    pub fn agent_state(&self) -> Result<Option<AgentState>, SpoolError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'agent'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// The last corrupt spool moved aside at start, if any.
    pub fn recovery(&self) -> Result<Option<Recovery>, SpoolError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'recovered'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Every lifetime counter.
    pub fn counters(&self) -> Result<BTreeMap<String, u64>, SpoolError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, value FROM counters ORDER BY name")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Rows and series held, and used bytes.
    pub fn totals(&self) -> Result<(i64, i64, u64), SpoolError> {
        let rows = self
            .conn
            .query_row("SELECT COALESCE(SUM(rows), 0) FROM partitions", [], |r| {
                r.get(0)
            })
            .map_err(self.err())?;
        let series = self
            .conn
            .query_row("SELECT COUNT(*) FROM series", [], |r| r.get(0))
            .map_err(self.err())?;
        let used = used_bytes(&self.conn).map_err(self.err())?;
        Ok((rows, series, used))
    }

    /// Every active sink with its backlog.
    pub fn sinks(&self) -> Result<Vec<SinkRecord>, SpoolError> {
        let err = self.err();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, kind, last_success_ms, last_error, last_error_ms, retrying_since_ms,
                        next_attempt_ms,
                        (SELECT COUNT(*) FROM parts t WHERE t.sink = s.name AND t.delivered_ms IS NOT NULL)
                 FROM sinks s WHERE active = 1 ORDER BY name",
            )
            .map_err(&err)?;
        let mut sinks: Vec<SinkRecord> = stmt
            .query_map([], |r| {
                Ok(SinkRecord {
                    name: r.get(0)?,
                    kind: r.get(1)?,
                    last_success_ms: r.get(2)?,
                    last_error: r.get(3)?,
                    last_error_ms: r.get(4)?,
                    retrying_since_ms: r.get(5)?,
                    next_attempt_ms: r.get(6)?,
                    pending_rows: 0,
                    pending_partitions: 0,
                    oldest_pending: None,
                    delivered_parts: r.get(7)?,
                })
            })
            .map_err(&err)?
            .collect::<Result<_, _>>()
            .map_err(&err)?;
        let mut pending = self
            .conn
            .prepare(
                "SELECT p.partition,
                        (SELECT COALESCE(SUM(rows), 0) FROM batches w WHERE w.partition = p.partition
                           AND w.id > COALESCE((SELECT MAX(last_id) FROM parts t
                               WHERE t.sink = ?1 AND t.partition = p.partition
                                 AND t.delivered_ms IS NOT NULL), 0)) AS n
                 FROM partitions p ORDER BY p.partition",
            )
            .map_err(&err)?;
        for sink in &mut sinks {
            let per_partition = pending
                .query_map([&sink.name], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(&err)?;
            for item in per_partition {
                let (partition, n) = item.map_err(&err)?;
                if n > 0 {
                    sink.pending_rows += n;
                    sink.pending_partitions += 1;
                    sink.oldest_pending.get_or_insert(partition);
                }
            }
        }
        Ok(sinks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Stats;

    fn options(sinks: &[&str]) -> SpoolOptions {
        SpoolOptions {
            device: "pi-test".into(),
            window_seconds: 60,
            partition_seconds: 3600,
            grace_ms: 0,
            budget_bytes: 64 * 1024 * 1024,
            when_full: WhenFull::DropOldest,
            sources: Vec::new(),
            sinks: sinks.iter().map(|s| (s.to_string(), "local")).collect(),
            live: Vec::new(),
        }
    }

    fn row(series: &str, start: i64, value: f64) -> WindowRow {
        WindowRow {
            series: Arc::new(Series::new(series, Some("celsius"))),
            start,
            seconds: 60,
            stats: Stats {
                count: 1,
                min: value,
                max: value,
                mean: value,
                stdev: None,
                median: value,
                first: value,
                last: value,
            },
        }
    }

    fn flush(rows: Vec<WindowRow>) -> Flush {
        Flush {
            rows,
            now_ms: 0,
            aggregate: AggregateCounts::default(),
            sources: Vec::new(),
            open_windows: 0,
            live: Vec::new(),
            clock: Default::default(),
        }
    }

    /// Delivers every ready part of `sink`, returning (partition, part, values) per part.
    fn drain(
        spool: &mut Spool,
        reader: &mut SpoolReader,
        sink: &str,
        now_ms: i64,
    ) -> Vec<(i64, u32, Vec<f64>)> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            match spool.plan(sink, now_ms).expect("plan") {
                Plan::Ready(plan) => {
                    let rows = reader.read_part(&plan, false).expect("read").rows;
                    out.push((
                        plan.partition,
                        plan.part,
                        rows.iter().map(|r| r.stats.mean).collect(),
                    ));
                    spool.delivered(&plan, now_ms).expect("deliver");
                }
                Plan::Wait(_) => return out,
            }
        }
        panic!("drain did not finish");
    }

    #[test]
    fn a_flush_kept_for_a_full_disk_takes_the_next_in_and_stays_bounded() {
        let mut kept = flush(vec![row("s.a", 0, 1.0), row("s.a", 60, 2.0)]);
        kept.aggregate.samples = 2;
        let mut newer = flush(vec![row("s.a", 120, 3.0)]);
        newer.aggregate.samples = 1;
        newer.now_ms = 180_000;
        newer.open_windows = 4;
        kept.absorb(newer);
        let starts: Vec<i64> = kept.rows.iter().map(|r| r.start).collect();
        assert_eq!(starts, [0, 60, 120]);
        assert_eq!(
            (kept.aggregate.samples, kept.now_ms, kept.open_windows),
            (3, 180_000, 4)
        );
        assert_eq!(kept.keep_newest(2), 1, "the oldest goes first");
        let starts: Vec<i64> = kept.rows.iter().map(|r| r.start).collect();
        assert_eq!(starts, [60, 120]);
        assert_eq!(kept.keep_newest(2), 0);
    }

    #[test]
    fn a_damaged_spool_is_moved_aside_and_a_fresh_one_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        {
            let mut spool = Spool::open(&path, options(&["a"])).expect("open");
            for hour in 0..40 {
                let rows = (0..60)
                    .map(|m| row(&format!("s.{m}"), hour * 3600 + m * 60, 1.0))
                    .collect();
                spool.commit(&flush(rows)).expect("commit");
            }
        }
        // Dropping the writer checkpointed the WAL: damage pages 4 to 12 of the file.
        let mut bytes = std::fs::read(&path).expect("read");
        let size = bytes.len();
        assert!(size > 16 * 1024, "{size} bytes");
        bytes[3 * 1024..12 * 1024].fill(0xAA);
        std::fs::write(&path, &bytes).expect("write");

        let spool = Spool::open(&path, options(&["a"])).expect("a fresh spool");
        drop(spool);
        let reader = SpoolReader::open(&path).expect("reader");
        let recovery = reader.recovery().expect("read").expect("recorded");
        assert!(
            recovery.reason == "database disk image is malformed"
                || recovery.reason.starts_with("integrity check: "),
            "{}",
            recovery.reason
        );
        assert_eq!(
            std::fs::metadata(&recovery.moved_to).expect("kept").len(),
            size as u64
        );
        assert!(
            recovery
                .moved_to
                .display()
                .to_string()
                .starts_with(&format!("{}.corrupt-", path.display()))
        );
        assert_eq!(reader.totals().expect("totals").0, 0, "a fresh spool");
    }

    #[test]
    fn a_file_that_is_no_database_is_moved_aside_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        std::fs::write(&path, "half-written garbage ".repeat(500)).expect("write");
        Spool::open(&path, options(&["a"])).expect("a fresh spool");
        let recovery = SpoolReader::open(&path)
            .and_then(|r| r.recovery())
            .expect("read")
            .expect("recorded");
        assert_eq!(recovery.reason, "file is not a database");
        let kept = std::fs::read_to_string(&recovery.moved_to).expect("kept");
        assert!(kept.starts_with("half-written garbage"));
    }

    #[test]
    fn a_partition_waits_for_its_end_plus_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let mut opts = options(&["a"]);
        opts.grace_ms = 30_000;
        let mut spool = Spool::open(&path, opts).expect("open");
        spool
            .commit(&flush(vec![row("s.t", 3600, 1.0)]))
            .expect("commit");
        assert_eq!(
            spool.plan("a", 7_200_000 + 29_999).expect("plan"),
            Plan::Wait(Some(7_230_000))
        );
        assert!(matches!(
            spool.plan("a", 7_230_000).expect("plan"),
            Plan::Ready(_)
        ));
    }

    #[test]
    fn late_rows_go_to_a_new_part_not_over_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let mut spool = Spool::open(&path, options(&["a"])).expect("open");
        let mut reader = SpoolReader::open(&path).expect("reader");
        spool
            .commit(&flush(vec![row("s.t", 0, 1.0), row("s.t", 60, 2.0)]))
            .expect("commit");
        assert_eq!(
            drain(&mut spool, &mut reader, "a", i64::MAX / 4),
            vec![(0, 0, vec![1.0, 2.0])]
        );
        spool
            .commit(&flush(vec![row("s.t", 120, 3.0)]))
            .expect("late commit");
        assert_eq!(
            drain(&mut spool, &mut reader, "a", i64::MAX / 4),
            vec![(0, 1, vec![3.0])]
        );
    }

    #[test]
    fn a_part_planned_before_a_crash_is_sent_again_with_the_same_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let first = {
            let mut spool = Spool::open(&path, options(&["a"])).expect("open");
            spool
                .commit(&flush(vec![row("s.t", 0, 1.0)]))
                .expect("commit");
            let Plan::Ready(plan) = spool.plan("a", i64::MAX / 4).expect("plan") else {
                panic!("a part is ready");
            };
            plan
        }; // dropped without `delivered`: the crash
        let mut spool = Spool::open(&path, options(&["a"])).expect("reopen");
        spool
            .commit(&flush(vec![row("s.t", 60, 2.0)]))
            .expect("a late row meanwhile");
        let Plan::Ready(again) = spool.plan("a", i64::MAX / 4).expect("plan") else {
            panic!("the planned part is still due");
        };
        assert_eq!(again, first);
        let mut reader = SpoolReader::open(&path).expect("reader");
        assert_eq!(reader.read_part(&again, false).expect("read").rows.len(), 1);
    }

    #[test]
    fn a_wide_column_set_holds_earlier_series_and_is_the_same_on_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let mut spool = Spool::open(&path, options(&["a"])).expect("open");
        let mut reader = SpoolReader::open(&path).expect("reader");
        let names = |rows: &PartRows| -> Vec<String> {
            rows.series.iter().map(|s| s.name.clone()).collect()
        };
        // Hour 0 holds s.a; s.b first appears in hour 1, s.c in hour 2.
        spool
            .commit(&flush(vec![row("s.a", 0, 1.0), row("s.b", 3600, 2.0)]))
            .expect("commit");
        let Plan::Ready(hour0) = spool.plan("a", i64::MAX / 4).expect("plan") else {
            panic!("hour 0 is ready");
        };
        // Planned, not delivered; meanwhile s.c appears, with a late row for hour 0.
        spool
            .commit(&flush(vec![row("s.c", 0, 3.0), row("s.c", 7200, 3.0)]))
            .expect("commit");
        let first_try = reader.read_part(&hour0, true).expect("read");
        assert_eq!(
            names(&first_try),
            ["s.a"],
            "s.b starts later; s.c came after the plan"
        );
        spool.delivered(&hour0, 0).expect("deliver");
        // Hour 1 was planned together with hour 0, before s.c existed.
        let Plan::Ready(hour1) = spool.plan("a", i64::MAX / 4).expect("plan") else {
            panic!("hour 1");
        };
        let hour1_rows = reader.read_part(&hour1, true).expect("read");
        assert_eq!(
            names(&hour1_rows),
            ["s.a", "s.b"],
            "hour 1 was committed before s.c existed"
        );
        assert_eq!(hour1_rows.rows.len(), 1);
        spool.delivered(&hour1, 0).expect("deliver");
        let Plan::Ready(hour0_late) = spool.plan("a", i64::MAX / 4).expect("plan") else {
            panic!("the late part of hour 0");
        };
        assert_eq!((hour0_late.partition, hour0_late.part), (0, 1));
        assert_eq!(
            names(&reader.read_part(&hour0_late, true).expect("read")),
            ["s.a", "s.c"]
        );
        spool.delivered(&hour0_late, 0).expect("deliver");
        let Plan::Ready(hour2) = spool.plan("a", i64::MAX / 4).expect("plan") else {
            panic!("hour 2");
        };
        assert_eq!(
            names(&reader.read_part(&hour2, true).expect("read")),
            ["s.a", "s.b", "s.c"],
            "series keep their columns in later partitions"
        );
    }

    #[test]
    fn rows_are_deleted_only_once_every_sink_has_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let mut spool = Spool::open(&path, options(&["a", "b"])).expect("open");
        let mut reader = SpoolReader::open(&path).expect("reader");
        spool
            .commit(&flush(vec![row("s.t", 0, 1.0)]))
            .expect("commit");
        drain(&mut spool, &mut reader, "a", i64::MAX / 4);
        assert_eq!(reader.totals().expect("totals").0, 1, "b still wants it");
        let b = reader
            .sinks()
            .expect("sinks")
            .into_iter()
            .find(|s| s.name == "b")
            .expect("b");
        assert_eq!((b.pending_rows, b.oldest_pending), (1, Some(0)));
        drain(&mut spool, &mut reader, "b", i64::MAX / 4);
        assert_eq!(reader.totals().expect("totals").0, 0);
    }

    #[test]
    fn reopening_keeps_windows_counters_and_series() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        {
            let mut spool = Spool::open(&path, options(&["a"])).expect("open");
            let mut f = flush(vec![row("s.t", 0, 1.0)]);
            f.aggregate.non_finite = 3;
            spool.commit(&f).expect("commit");
        }
        let mut spool = Spool::open(&path, options(&["a"])).expect("reopen");
        let mut f = flush(vec![row("s.t", 60, 2.0)]);
        f.aggregate.non_finite = 2;
        spool.commit(&f).expect("commit");
        let reader = SpoolReader::open(&path).expect("reader");
        assert_eq!(reader.totals().expect("totals").0, 2);
        assert_eq!(
            reader.counters().expect("counters")["samples.non_finite"],
            5
        );
        assert_eq!(spool.series_ids.len(), 1);
    }

    #[test]
    fn a_foreign_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("other.db");
        let conn = Connection::open(&path).expect("create");
        conn.execute_batch("PRAGMA application_id = 7; CREATE TABLE t (x);")
            .expect("schema");
        drop(conn);
        let err = Spool::open(&path, options(&["a"])).err().expect("refused");
        assert_eq!(
            err.to_string(),
            format!(
                "{} is not an edgespool spool (application id 0x7)",
                path.display()
            )
        );
    }

    #[test]
    fn drop_oldest_keeps_the_spool_under_its_budget_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let mut opts = options(&["a"]);
        opts.budget_bytes = 128 * 1024;
        let mut spool = Spool::open(&path, opts).expect("open");
        for hour in 0..100 {
            let rows = (0..60)
                .map(|m| row(&format!("s.{}", m % 10), hour * 3600 + m * 60, m as f64))
                .collect();
            spool.commit(&flush(rows)).expect("commit");
        }
        assert!(spool.used_bytes().expect("used") <= 128 * 1024);
        let reader = SpoolReader::open(&path).expect("reader");
        let dropped = reader.counters().expect("counters")["rows.dropped"];
        let (held, _, _) = reader.totals().expect("totals");
        assert_eq!(
            dropped as i64 + held,
            100 * 60,
            "every row is either held or counted as dropped"
        );
        assert!(dropped > 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Commit(Vec<(u8, u16)>),
        Deliver(u8),
        Reopen,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::collection::vec((0u8..3, 0u16..600), 0..8).prop_map(Op::Commit),
            (0u8..2).prop_map(Op::Deliver),
            Just(Op::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Beside a model that is just a list of committed rows: every sink receives each
        /// committed row exactly once, whatever the interleaving of commits, deliveries
        /// and restarts.
        #[test]
        fn every_committed_row_reaches_every_sink_once(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("spool.db");
            let mut spool = Spool::open(&path, options(&["a", "b"])).expect("open");
            let mut reader = SpoolReader::open(&path).expect("reader");
            let mut model: Vec<f64> = Vec::new();
            let mut received: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            let mut next_value = 0.0;
            for op in ops {
                match op {
                    Op::Commit(rows) => {
                        let rows: Vec<WindowRow> = rows.into_iter().map(|(s, minute)| {
                            next_value += 1.0;
                            model.push(next_value);
                            row(&format!("s.{s}"), i64::from(minute) * 60, next_value)
                        }).collect();
                        spool.commit(&flush(rows)).expect("commit");
                    }
                    Op::Deliver(sink) => {
                        let name = ["a", "b"][sink as usize];
                        for (_, _, values) in drain(&mut spool, &mut reader, name, i64::MAX / 4) {
                            received[sink as usize].extend(values);
                        }
                    }
                    Op::Reopen => {
                        drop(spool);
                        spool = Spool::open(&path, options(&["a", "b"])).expect("reopen");
                    }
                }
            }
            for (sink, got) in received.iter_mut().enumerate() {
                for (_, _, values) in drain(&mut spool, &mut reader, ["a", "b"][sink], i64::MAX / 4) {
                    got.extend(values);
                }
                got.sort_by(f64::total_cmp);
                proptest::prop_assert_eq!(&*got, &model[..]);
            }
            proptest::prop_assert_eq!(reader.totals().expect("totals").0, 0);
        }
    }
}
