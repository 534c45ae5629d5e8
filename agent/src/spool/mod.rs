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
//! 3. *Acknowledge*: once the sink says the part is durable at the destination (a file
//!    fsynced with its folders, a store's success answer, a COMMIT), `delivered_ms` is
//!    set (without an fsync: if a power cut loses it, and the deletion below with it, the
//!    planned part is sent again and the sink takes it as a no-op). When every
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
//!
//! # Files
//! - `mod.rs`: this design, [`SpoolError`], [`SpoolOptions`], the [`Spool`] writer itself.
//! - `schema.rs`: the schema and its migrations; opening the file (checks, pragmas,
//!   migrating) and moving a corrupt one aside ([`Recovery`]).
//! - `writer.rs`: a [`Flush`](crate::flow::Flush) and committing it: batches, series, counters, the agent's
//!   state; live feeds' reports; the clean stop.
//! - `delivery.rs`: planning a sink's parts ([`Plan`], [`PartPlan`]), recording
//!   deliveries (deleting what every sink has) and failures.
//! - `budget.rs`: the bytes used, and dropping the oldest partitions at the budget.
//! - `thread.rs`: the single writer thread behind [`SpoolHandle`].
//! - `reader.rs`: [`SpoolReader`] and what it reads: parts, [`AgentState`], counters,
//!   totals, [`SinkRecord`]s.
//! - `tests.rs`: the unit tests.

mod budget;
mod delivery;
mod reader;
mod schema;
mod thread;
mod writer;

pub use delivery::{MAX_PART_ROWS, PartPlan, PartRows, Plan};
pub use reader::{AgentState, SinkRecord, SourceState, SpoolReader};
pub use schema::Recovery;
pub use thread::{SpoolHandle, SpoolThread};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;

use crate::config::WhenFull;
use crate::flow::Series;

/// SQLite's page cache per connection, in KiB (kept small for the Pi).
const CACHE_KIB: i64 = 512;

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
    /// The configured live feeds (see [`crate::flow::LiveStats`]): (name, kind word).
    pub live: Vec<(String, &'static str)>,
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
    fn err(&self) -> impl Fn(rusqlite::Error) -> SpoolError + '_ {
        sqlite(&self.path)
    }
}

#[cfg(test)]
mod tests;
