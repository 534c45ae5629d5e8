//! The spool: a SQLite file that holds closed windows until every sink has them.
//!
//! # Design constraints
//! - SD cards wear out: one transaction per flush (one per window length, never one per
//!   sample), and in it one row per partition holding all its windows as one compact
//!   postcard blob (no per-window keys or index entries), 1 KiB pages, and state written
//!   only with a flush; each statistic of a window written short (`record.rs`, version 3:
//!   17 bytes a steady window, 45 a varying one). A flush of 100 windows 60 s apart appends
//!   6 pages to the WAL (page 1, `meta` with the state, `next_id` and the counters, the
//!   `batches` interior page and its new leaf, the record's overflow page, `partitions`)
//!   and dirties 2 or 3 pages of 4 KiB of it (the kernel's `write_bytes`,
//!   docs/benchmarks.md), where version 2 records took 13 pages. The WAL's
//!   index is in `/dev/shm` (a tmpfs), not beside the spool, where it cost 5 more pages
//!   of 4 KiB a flush: see `index.rs`.
//! - Power loss at any instant loses nothing committed: WAL mode with `synchronous=FULL`,
//!   so a commit is one append to the WAL and one fsync.
//! - One writer: [`Spool`] lives on its own thread behind [`SpoolHandle`]; the uploaders
//!   and `edgespool status` read through their own connections ([`SpoolReader`]).
//! - One agent per spool: the writer holds an exclusive `flock` on `NAME.lock`
//!   ([`SpoolLock`]), taken before anything opens, migrates or moves the spool.
//! - edgespool alone on a live spool: the writer holds a write lock over `NAME-shm`
//!   ([`IndexGuard`]), where another build of SQLite would keep its own index of the
//!   WAL, so that such a program fails (`locking protocol`) instead of reading beside
//!   an index it cannot see; an agent does not start while one has the spool open.
//! - Nothing is delivered twice in effect, nothing is overwritten: a part of a partition
//!   is *planned* (its row range fixed and committed) before it is sent, so a retry after
//!   a crash sends exactly the same rows under the same key.
//!
//! # Schema (version 6)
//! ```text
//! meta(key TEXT PK, value TEXT)                  'agent': state as JSON (heartbeat, pid, config);
//!                                                'next_id': the next window id;
//!                                                'counters' (v6): the lifetime counters as
//!                                                one JSON object, added to at each flush;
//!                                                'recovered', 'restored': the last corrupt
//!                                                file moved aside, the last file put back
//!                                                (a flush rewrites 'agent', 'next_id' and
//!                                                'counters': one page, small rows side by side)
//! counters(name, value)                          a view of meta('counters'), a row a counter
//!                                                (a table of its own before v6: a page more
//!                                                a commit; the migration moves its rows)
//! series(id INTEGER PK, name, unit, tags,       tags as canonical JSON; UNIQUE(name, tags);
//!        first_partition, first_id)              where and in which flush it was first
//!                                                seen (v2; NULL for series older than v2)
//! batches(id INTEGER PK, partition, rows,        the windows one flush closed in one
//!         record BLOB, committed_ms)             partition: `rows` windows with ids
//!                                                id-rows+1 ..= id; record = 0x00 0x03 and
//!                                                the windows, each statistic written short
//!                                                (`record.rs`: the versions; an older
//!                                                edgespool's version 2 and unversioned
//!                                                records still read). Window ids are issued by the
//!                                                spool, only grow and are never reused.
//!                                                committed_ms (v5): the flush's time
//! partitions(partition PK, seconds, max_id, rows) what each partition holds now
//! sinks(name PK, kind, active, last_success_ms,  per-sink outcome, for status;
//!       last_error, last_error_ms, retrying_since_ms, next_attempt_ms,
//!       late_grace_ms, late_max_rows)            (v5) its [`LateParts`], as configured
//! parts(sink, partition, part, after_id, last_id, rows, planned_ms, delivered_ms,
//!       dropped_ms, seen_id, series_upto)
//!       PK(sink, partition, part): part N of a partition for a sink holds the windows
//!       of that partition with after_id < id <= last_id; dropped_ms (v3): the disk
//!       budget dropped it whole before it was delivered (see Full disk); seen_id (v5):
//!       the partition's max_id when planned (rows above it came later: late rows);
//!       series_upto (v5): the highest series id then (part 0's fixes the wide columns)
//! marks(series INTEGER PK, device_ms)            (v4) per series with device-stamped
//!                                                samples: the newest device timestamp
//!                                                committed (its mark), never lowered
//! ```
//!
//! # Marks
//! A reading is counted once (DESIGN.md, invariant 6). The aggregator knows the device
//! timestamps it took while it runs; the spool keeps, per series, the newest of those in
//! windows it committed, so that the first poll after a restart does not take the last
//! reading again. A flush carries the marks its windows advanced
//! ([`Flush::marks`](crate::flow::Flush)); they are written in the flush's transaction
//! (`MAX` of the old and the new: a late row never moves a mark back), one small row per
//! series keyed by the series' id: no commit or fsync of their own, a page or two per
//! flush. [`Spool::marks`] reads them at the start for the aggregator. A flush the disk
//! budget discards (`StopSampling`) writes no marks, as it writes no windows.
//!
//! # Delivery bookkeeping
//! 1. *Plan*: for a sink, the oldest partitions (up to 16 in one transaction) that are
//!    closed (their end plus the grace period has passed) and hold windows with ids above
//!    the sink's last planned part get a new part row each: `after_id` = that last id, `last_id` = the highest id now
//!    there. Rows that arrive later (late data) have higher ids: they go to the next part.
//!    Late rows (ids above the sink's last `seen_id` for the partition) wait for the sink's
//!    [`LateParts`]: until the oldest was committed `late_grace` ago, or `late_max_rows`
//!    or a part's bytes of them wait; then they are planned as one part. Waiting rows are
//!    committed batches like any other (a restart keeps them and their `committed_ms`;
//!    the budget drops them oldest first). What was there at the last plan but did not
//!    fit in its part goes at once.
//! 2. *Send*: the uploader reads exactly the rows of the part and writes them under a key
//!    made from the partition and part number. A sink that takes several parts at once
//!    (PostgreSQL, [`Spool::plan_batch`]) gets the pending parts that follow the first
//!    (one per partition, up to a number of rows) and writes them all or none; their
//!    deliveries are then recorded in one transaction (`delivered_all`).
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
//! # One agent per spool
//! `Spool::open` first takes an exclusive, non-blocking `flock(2)` on `NAME.lock` beside
//! the spool and writes its pid into it; a second agent gets
//! [`SpoolError::InUse`] ("the spool NAME is in use by another edgespool (pid N); stop it
//! first") before it opens, migrates or moves aside anything. The kernel releases the
//! lock when the holder dies, so `kill -9` leaves no stale lock; the file stays, naming
//! the last holder. `status` and `check-config` never take it. The lock file is not the
//! spool's: a corrupt spool is moved aside without it. Why a file of its own and not the
//! spool: see `lock.rs`.
//!
//! # The file deleted or replaced under the agent
//! At every flush (and at the stop) the writer compares, with one `stat` each, what the
//! spool's path and the lock file's path name with the files it holds (device and
//! inode). The lock file is taken again if it went. A spool path naming nothing (deleted)
//! or another file (replaced: that file is moved aside as `NAME.replaced-MILLIS` with its
//! `-wal`, kept) gets a fresh copy of the open database (`VACUUM INTO`), which the
//! writer then opens; the event is logged as an error and kept in `meta('restored')` for
//! `status` (`spool RESTORED …`). Nothing committed is lost, nothing delivered goes again
//! (the parts are in the copy). Uploaders' readers check that they read the writer's
//! file ([`SpoolHandle::file`]) and open it again when it changed. If another agent
//! took the lock meanwhile (the lock file deleted, then taken), this one commits nothing
//! more and stops with an error. Details in `follow.rs`.
//!
//! # Full disk
//! The spool's used pages (the file minus its free pages) are held under `disk_budget`
//! by a [`WhenFull`] policy; both count what they dropped in `counters('rows.dropped')`
//! (`status`: windows dropped by the disk budget).
//! - `StopSampling`: a flush that finds the spool over its budget is discarded.
//! - `DropOldest`: a flush that leaves the spool over its budget is followed by one
//!   *drop step*, one transaction and one log line with its count: the oldest batches,
//!   in order of partition then id (the oldest windows, whatever their delivery state;
//!   the partition being written last), are deleted until the used pages are at most
//!   90% of the budget ([`LOW_WATER_PERCENT`]). `partitions.rows` is lowered (a row at 0
//!   is deleted, `max_id` stays). A part planned for a sink and not delivered is never
//!   cut: the step widens to take it whole, marks it `dropped_ms`, and it is never sent
//!   (its number and rows are never used again; the next part starts after its
//!   `last_id`). It may have reached its sink already, its answer lost: then the sink
//!   has it whole, and nothing else is ever written under its key, so no window is
//!   delivered twice or overwritten. A reader checks the mark after reading a part's
//!   rows (the mark and the deletion are one transaction): a dropped part reads as
//!   empty, and the uploader sends nothing. Planned parts hold at most a sixteenth of
//!   the budget of records, so a step stays small: at most 10% of the budget plus one
//!   part.
//! - The files: freed pages stay in the file (its free list) and the next flushes reuse
//!   them, so the database never grows past the most its pages ever held: the budget
//!   plus one flush. The writer checkpoints the WAL every eighth of the budget (64 to
//!   1000 pages, `wal_autocheckpoint`) and cuts a WAL that grew past that back to it
//!   (`journal_size_limit`). Database plus WAL stay within [`files_bound`]:
//!   `budget + F + 32 KiB + (C + F/1024 + budget/1 MiB + 32) × 1048 + 32` bytes, with
//!   F = 100 bytes per window of the largest flush and C the checkpoint pages. Nothing
//!   is vacuumed in normal operation (SD cards); a file found at start more than an
//!   eighth over its budget (the budget lowered, a spool of an older edgespool) is
//!   compacted once (`VACUUM`) after the drop step.
//!
//! # Files
//! - `mod.rs`: this design, [`SpoolError`], [`SpoolOptions`], the [`Spool`] writer itself.
//! - `schema.rs`: the schema and its migrations; opening the file (checks, pragmas,
//!   migrating) and moving a corrupt one aside ([`Recovery`]).
//! - `writer.rs`: a [`Flush`](crate::flow::Flush) and committing it: batches, series, counters, the agent's
//!   state; live feeds' reports; the clean stop.
//! - `delivery.rs`: planning a sink's parts ([`Plan`], [`PartPlan`]), recording
//!   deliveries (deleting what every sink has) and failures.
//! - `budget.rs`: the bytes used, drop steps of the oldest windows at the budget, and
//!   the bound on the files ([`files_bound`]).
//! - `lock.rs`: [`SpoolLock`], one agent per spool; [`FileId`], which file a path names.
//! - `index.rs`: the WAL index in `/dev/shm` ([`index_path`]) and [`IndexGuard`], other
//!   programs' SQLite kept out of the live spool.
//! - `follow.rs`: the spool file deleted or replaced under the agent, put back
//!   ([`Restored`]).
//! - `thread.rs`: the single writer thread behind [`SpoolHandle`].
//! - `record.rs`: a batch's record, its versions.
//! - `reader.rs`: [`SpoolReader`] and what it reads: parts, [`AgentState`], counters,
//!   totals, [`SinkRecord`]s.
//! - `tests.rs`: the unit tests.

mod budget;
mod delivery;
mod follow;
mod index;
mod lock;
mod reader;
mod record;
mod schema;
mod thread;
mod writer;

pub use budget::{LOW_WATER_PERCENT, WINDOW_BYTES, files_bound};
pub use delivery::{Batch, LateParts, MAX_PART_ROWS, PartPlan, PartRows, Plan};
pub use follow::Restored;
pub use index::{DMS_OFFSET, INDEX_DIRECTORY, IndexGuard, check_index, guard_path, index_path};
pub use lock::{AtPath, FileId, SpoolLock, lock_path};
pub use reader::{AgentState, PartReading, SinkRecord, SourceState, SpoolReader};
pub use schema::Recovery;
pub use thread::{SpoolHandle, SpoolThread};

use std::collections::{HashMap, HashSet};
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
    /// Another process holds the spool's lock: one agent per spool.
    #[error(
        "the spool {path} is in use by another edgespool ({}); stop it first",
        holder(.pid)
    )]
    InUse { path: PathBuf, pid: Option<u32> },
    /// Another program's SQLite has the spool open (it holds a lock on `NAME-shm`).
    #[error(
        "the spool {spool} is open in another program (it holds a lock on {guard}): close it (an sqlite3 shell, a script) and start the agent again; `edgespool status` reads a spool safely"
    )]
    OpenElsewhere { spool: PathBuf, guard: PathBuf },
    /// `NAME-shm` could not be made or locked.
    #[error("cannot guard the spool's index with {path}: {source}")]
    IndexGuard {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Something this agent did not make sits where its WAL index goes.
    #[error(
        "the spool's WAL index {path} is not this agent's ({why}): another user may have made it; remove it and start the agent again"
    )]
    IndexNotOurs { path: PathBuf, why: String },
    /// The folder of the WAL index cannot take it.
    #[error(
        "the spool's WAL index goes in {path}, which this process cannot write: {source}; it must be a tmpfs the agent and `edgespool status` share"
    )]
    IndexDirectory {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The lock file could not be made, locked or written.
    #[error("cannot lock the spool with {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The path does not name the file the writer has open (yet): a reader waits.
    #[error(
        "the spool {path} is not the file the agent writes (deleted or replaced): waiting for the agent to put it back"
    )]
    NotTheWriters { path: PathBuf },
    /// The spool file was deleted or replaced under the agent and could not be put back.
    #[error("cannot put the spool back at {path}: {reason}")]
    Restore { path: PathBuf, reason: String },
}

fn holder(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    }
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
    /// How each sink's late rows wait to go out together; a sink not named here sends
    /// them at once ([`LateParts::AT_ONCE`]).
    pub late: HashMap<String, LateParts>,
    /// The sinks that take parts of the open partition (`deliver = "each_flush"`): the
    /// rows committed since their last part, at every plan. The others wait for a
    /// partition to close.
    pub each_flush: HashSet<String>,
}

impl SpoolOptions {
    /// How `sink`'s late rows wait.
    pub fn late_parts(&self, sink: &str) -> LateParts {
        self.late.get(sink).copied().unwrap_or(LateParts::AT_ONCE)
    }

    /// Whether `sink` takes parts of the open partition.
    pub fn each_flush(&self, sink: &str) -> bool {
        self.each_flush.contains(sink)
    }
}

/// The writer. Only [`SpoolHandle`]'s thread holds one.
pub struct Spool {
    conn: Connection,
    path: PathBuf,
    /// The file `conn` has open (compared with what `path` names at every flush).
    file: FileId,
    /// This agent's claim on the spool.
    lock: SpoolLock,
    /// Other programs' SQLite kept out of the live spool (`index.rs`).
    guard: IndexGuard,
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
