//! The disk budget: the bytes the spool's pages use, dropping the oldest windows to stay
//! under it (`drop_oldest`; `stop_sampling` is applied where a flush is committed, in
//! `writer.rs`), and the bound on the files that follows from it.
//!
//! Design: the unit of a drop is a batch (one flush's windows of one partition), taken in
//! order of partition, then id: the oldest data first, in steps that bring the used pages
//! from just over the budget down to [`LOW_WATER_PERCENT`] of it. A part planned for a
//! sink and not delivered yet is dropped whole or not at all, and is then marked dropped
//! (`parts.dropped_ms`): it may have reached its sink already (an answer lost), so its
//! rows must never go out again under another part, nor a part of other content under
//! its key. Parts are planned at most [`part_bytes_cap`] large, so a whole part stays a
//! small step. Freed pages stay in the file and the next flushes reuse them: the file
//! does not shrink, but it never grows past the most the pages ever held, which is the
//! budget plus one flush. Nothing is vacuumed in normal operation (SD cards); only a file
//! found more than an eighth over its budget at start (the budget lowered, or a spool of
//! an older edgespool) is compacted, once, after the drop.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tracing::{info, warn};

use super::schema::PAGE_SIZE;
use super::writer::add_counters;
use super::{Spool, SpoolError, sqlite};

/// A drop step brings the used pages down to this share of the budget, in percent.
pub const LOW_WATER_PERCENT: u64 = 90;

/// SQLite's default checkpoint threshold, in pages: the most the WAL holds before it is
/// copied back, for a budget of 8 MiB and more.
const MOST_CHECKPOINT_PAGES: u64 = 1000;

/// The fewest pages between checkpoints, however small the budget.
const LEAST_CHECKPOINT_PAGES: u64 = 64;

/// What a WAL frame adds to its page, and the WAL file's own header, in bytes.
const FRAME_HEADER: u64 = 24;
const WAL_HEADER: u64 = 32;

/// The most bytes one window takes in a batch, its share of the batch's row and page
/// rounding included (a window's record is at most 88 bytes (version 3), `record.rs`).
pub const WINDOW_BYTES: u64 = 100;

/// Pages the WAL gathers before a checkpoint: an eighth of the budget, between 64 and
/// SQLite's default of 1000.
pub(super) fn checkpoint_pages(budget_bytes: u64) -> u64 {
    (budget_bytes / 8 / u64::from(PAGE_SIZE)).clamp(LEAST_CHECKPOINT_PAGES, MOST_CHECKPOINT_PAGES)
}

/// The bytes of a WAL of `pages` frames.
pub(super) fn wal_limit_bytes(pages: u64) -> u64 {
    WAL_HEADER + pages * (u64::from(PAGE_SIZE) + FRAME_HEADER)
}

/// The most record bytes one planned part holds (at least one batch): a sixteenth of the
/// budget, so that dropping a planned part whole is a small step.
pub(super) fn part_bytes_cap(budget_bytes: u64) -> u64 {
    budget_bytes / 16
}

/// The most bytes the spool's files (database and `-wal`; the WAL index, 32 KiB, is in
/// /dev/shm, and `-shm` beside the spool stays empty)
/// take under a budget while flushes hold at most `flush_windows` windows:
///
/// ```text
/// bound = budget + F + 32 KiB + (C + F/1024 + budget/1 MiB + 32) × 1048 + 32
///         F = 100 B × flush_windows   (the flush that crosses the budget goes in first)
///         C = checkpoint_pages(budget) = clamp(budget / 8 KiB, 64, 1000)
/// ```
///
/// The database never holds more pages than the budget plus one flush (and a few pages
/// the agent's state and the B-trees take while a transaction runs: the 32 KiB); the WAL
/// is checkpointed once it holds C pages, so it holds at most C pages plus one
/// transaction: a flush (F/1024 pages) or a drop step (a free-list page per 254 pages
/// dropped: at most budget/1 MiB) and a few dozen pages of B-trees. That holds while no
/// reader keeps one snapshot open across checkpoints (readers here hold one for a query).
pub fn files_bound(budget_bytes: u64, flush_windows: u64) -> u64 {
    let flush = WINDOW_BYTES * flush_windows;
    let transaction = flush / u64::from(PAGE_SIZE) + budget_bytes / (1024 * 1024) + 32;
    budget_bytes + flush + 32 * 1024 + wal_limit_bytes(checkpoint_pages(budget_bytes) + transaction)
}

/// What one drop step took.
#[derive(Debug, Default)]
struct Step {
    windows: i64,
    parts: usize,
    oldest: Option<i64>,
    newest: Option<i64>,
}

impl Spool {
    /// Bytes of pages in use (the file minus its free pages).
    pub fn used_bytes(&self) -> Result<u64, SpoolError> {
        used_bytes(&self.conn).map_err(self.err())
    }

    /// Over the budget: deletes the oldest windows (whole batches, whole planned parts)
    /// until the used pages are at most [`LOW_WATER_PERCENT`] of the budget, in one
    /// transaction, counted and logged once.
    pub(super) fn enforce_budget(&mut self, now_ms: i64) -> Result<(), SpoolError> {
        let budget = self.options.budget_bytes;
        let before = self.used_bytes()?;
        if before <= budget {
            return Ok(());
        }
        let low_water = budget / 100 * LOW_WATER_PERCENT;
        let path = self.path.clone();
        let err = sqlite(&path);
        let tx = self.conn.transaction().map_err(&err)?;
        let mut step = Step::default();
        let mut used = before;
        while used > low_water {
            let Some(cut) = next_cut(&tx, used - low_water).map_err(&err)? else {
                break;
            };
            if drop_through(&tx, cut, now_ms, &mut step).map_err(&err)? == 0 {
                break;
            }
            used = used_bytes(&tx).map_err(&err)?;
        }
        add_counters(&tx, &[("rows.dropped".to_owned(), step.windows as u64)]).map_err(&err)?;
        tx.commit().map_err(&err)?;
        if step.windows > 0 {
            warn!(
                windows = step.windows,
                planned_parts = step.parts,
                oldest_partition = %step.oldest.map(crate::clock::rfc3339).unwrap_or_default(),
                newest_partition = %step.newest.map(crate::clock::rfc3339).unwrap_or_default(),
                used_before = before,
                used_after = used,
                budget,
                "spool is at its disk budget: dropped the oldest windows (when_full = drop_oldest)"
            );
        }
        Ok(())
    }

    /// At start: the budget enforced, and a file more than an eighth over its budget
    /// (the budget lowered, a spool of an older edgespool) compacted once, so that the
    /// bound of [`files_bound`] holds from then on.
    pub(super) fn fit_at_open(&mut self) -> Result<(), SpoolError> {
        if self.options.when_full == crate::config::WhenFull::DropOldest {
            self.enforce_budget(crate::clock::now_ms())?;
        }
        let budget = self.options.budget_bytes;
        let err = sqlite(&self.path);
        let file = file_bytes(&self.conn).map_err(&err)?;
        if file > budget + budget / 8 {
            self.conn.execute_batch("VACUUM").map_err(&err)?;
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(&err)?;
            info!(
                before = file,
                after = file_bytes(&self.conn).map_err(&err)?,
                budget,
                "the spool file was larger than its disk budget allows: compacted (once)"
            );
        }
        Ok(())
    }
}

/// The batch through which the oldest batches hold about `need` bytes: (partition, id).
fn next_cut(tx: &Transaction<'_>, need: u64) -> rusqlite::Result<Option<(i64, i64)>> {
    let mut stmt = tx.prepare_cached(
        "SELECT partition, id, length(record) FROM batches ORDER BY partition, id",
    )?;
    let mut batches = stmt.query([])?;
    let (mut gathered, mut cut) = (0u64, None);
    while let Some(batch) = batches.next()? {
        let (partition, id, len): (i64, i64, i64) = (batch.get(0)?, batch.get(1)?, batch.get(2)?);
        cut = Some((partition, id));
        // A row's cell and its share of the last overflow page besides the record.
        gathered += len.max(0) as u64 + 64;
        if gathered >= need {
            break;
        }
    }
    Ok(cut)
}

/// Deletes every batch up to `cut` in (partition, id) order, widened so that no part
/// planned and not delivered is cut in two; marks those parts dropped; keeps
/// `partitions` right. Returns the windows deleted.
fn drop_through(
    tx: &Transaction<'_>,
    (partition, mut upto): (i64, i64),
    now_ms: i64,
    step: &mut Step,
) -> rusqlite::Result<i64> {
    // Widen to the end of every undelivered part (of any sink) the cut falls into; one
    // sink's part can reach into another's, hence the loop.
    loop {
        let further: Option<i64> = tx
            .query_row(
                "SELECT MAX(last_id) FROM parts
                 WHERE partition = ?1 AND delivered_ms IS NULL AND dropped_ms IS NULL
                   AND after_id < ?2 AND last_id > ?2",
                params![partition, upto],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        match further {
            Some(id) => upto = id,
            None => break,
        }
    }
    let per_partition: Vec<(i64, i64)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT partition, SUM(rows) FROM batches
             WHERE partition < ?1 OR (partition = ?1 AND id <= ?2)
             GROUP BY partition ORDER BY partition",
        )?;
        stmt.query_map(params![partition, upto], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    tx.execute(
        "DELETE FROM batches WHERE partition < ?1 OR (partition = ?1 AND id <= ?2)",
        params![partition, upto],
    )?;
    let mut windows = 0;
    for &(p, rows) in &per_partition {
        tx.execute(
            "UPDATE partitions SET rows = rows - ?2 WHERE partition = ?1",
            params![p, rows],
        )?;
        windows += rows;
    }
    tx.execute(
        "DELETE FROM partitions WHERE partition <= ?1 AND rows <= 0",
        [partition],
    )?;
    step.parts += tx.execute(
        "UPDATE parts SET dropped_ms = ?3
         WHERE delivered_ms IS NULL AND dropped_ms IS NULL
           AND (partition < ?1 OR (partition = ?1 AND last_id <= ?2))",
        params![partition, upto, now_ms],
    )?;
    step.windows += windows;
    if let (Some(first), Some(last)) = (per_partition.first(), per_partition.last()) {
        step.oldest.get_or_insert(first.0);
        step.newest = Some(last.0);
    }
    Ok(windows)
}

pub(super) fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok((pages - free).max(0) as u64 * size.max(0) as u64)
}

/// Bytes of the database's pages, free ones included (its size once checkpointed).
fn file_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok(pages.max(0) as u64 * size.max(0) as u64)
}
