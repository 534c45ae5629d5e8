//! Delivery bookkeeping: planning a sink's next part (its rows fixed before it is sent),
//! recording a delivery (and deleting what every active sink has), recording a failure.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use crate::flow::{Series, WindowRow};

use super::budget::part_bytes_cap;
use super::{Spool, SpoolError, sqlite};

/// How many closed partitions one planning transaction fixes parts for.
const PLAN_AHEAD: usize = 16;

/// The most rows one part holds; a larger backlog of one partition becomes more parts.
pub const MAX_PART_ROWS: i64 = 200_000;

/// How a sink's late rows (rows of a partition it already has a part of) wait, so that
/// stragglers go out as one part rather than a file each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateParts {
    /// Late rows wait until the oldest of them has waited this long, in ms (0: each
    /// plan sends what there is).
    pub grace_ms: i64,
    /// …or until this many of them wait (or a part's worth of bytes).
    pub max_rows: i64,
}

impl LateParts {
    /// Late rows go out with the next plan, as before `late_grace` existed.
    pub const AT_ONCE: LateParts = LateParts {
        grace_ms: 0,
        max_rows: MAX_PART_ROWS,
    };
}

/// The rows of a partition that a sink has a part of and that no part of it holds yet.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Unplanned {
    /// Windows.
    pub(super) rows: i64,
    /// Record bytes.
    pub(super) bytes: u64,
    /// When the oldest of them was committed (Unix ms; `None` for rows of an older spool).
    pub(super) oldest_ms: Option<i64>,
    /// Some were in the spool when the sink's last part was planned (a part cut at its
    /// size): the rest of a backlog, not late.
    pub(super) backlog: bool,
}

impl Unplanned {
    /// Until when these rows wait (Unix ms), or `None` if a part of them is due now:
    /// the oldest has waited `grace_ms`, or `max_rows` or a part's bytes wait, or they
    /// are no late rows (a backlog). Rows committed "in the future" (the clock went back
    /// since) go at once rather than wait for the clock to catch up.
    pub(super) fn due_ms(&self, late: LateParts, part_cap: u64, now_ms: i64) -> Option<i64> {
        if self.rows == 0
            || late.grace_ms <= 0
            || self.backlog
            || self.rows >= late.max_rows
            || self.bytes >= part_cap
        {
            return None;
        }
        let oldest = self.oldest_ms?;
        let due = oldest.saturating_add(late.grace_ms);
        (due > now_ms && oldest <= now_ms).then_some(due)
    }
}

/// What of `partition` a sink that has parts of it up to `done` has not had planned.
pub(super) fn unplanned(
    conn: &Connection,
    sink: &str,
    partition: i64,
    done: i64,
) -> rusqlite::Result<Unplanned> {
    let (rows, bytes, first_id): (i64, i64, Option<i64>) = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(rows), 0), COALESCE(SUM(length(record)), 0), MIN(id)
             FROM batches WHERE partition = ?1 AND id > ?2",
        )?
        .query_row(params![partition, done], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    let Some(first_id) = first_id else {
        return Ok(Unplanned::default());
    };
    let oldest_ms: Option<i64> = conn
        .prepare_cached("SELECT committed_ms FROM batches WHERE id = ?1")?
        .query_row([first_id], |r| r.get(0))?;
    // Parts planned by an older edgespool have no `seen_id`: their `last_id` stands in.
    let seen: Option<i64> = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(seen_id), MAX(last_id)) FROM parts
             WHERE sink = ?1 AND partition = ?2",
        )?
        .query_row(params![sink, partition], |r| r.get(0))?;
    Ok(Unplanned {
        rows,
        bytes: bytes.max(0) as u64,
        oldest_ms,
        backlog: seen.is_some_and(|seen| first_id <= seen),
    })
}

/// The counter of a sink's delivered parts whose rows [`prune_parts`] deleted.
pub(super) fn pruned_counter(sink: &str) -> String {
    format!("sink.{sink}.parts_pruned")
}

/// Deletes the delivered parts of `sink` in `partition` between its first and its last
/// (counted in [`pruned_counter`]), so that a sink that gets a part per flush keeps two
/// rows per partition, as many as one that gets a part per partition and its late part.
///
/// Design: what the spool needs of a partition's parts is in those two: the last holds
/// the highest `last_id`, `part` and `seen_id` (planning, deletion, `status`), the first
/// the wide columns' `series_upto`. Parts not delivered (pending, dropped) stay.
fn prune_parts(tx: &rusqlite::Transaction<'_>, sink: &str, partition: i64) -> rusqlite::Result<()> {
    let pruned = tx
        .prepare_cached(
            "DELETE FROM parts
             WHERE sink = ?1 AND partition = ?2 AND delivered_ms IS NOT NULL
               AND part > (SELECT MIN(part) FROM parts WHERE sink = ?1 AND partition = ?2)
               AND part < (SELECT MAX(part) FROM parts WHERE sink = ?1 AND partition = ?2)",
        )?
        .execute(params![sink, partition])?;
    if pruned > 0 {
        super::writer::add_counters(tx, &[(pruned_counter(sink), pruned as u64)])?;
    }
    Ok(())
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

/// A sink's parts planned and not yet delivered (nor dropped), oldest first, as
/// [`PartPlan::from_row`] reads them; `?1` is the sink.
const PENDING_PARTS: &str = "SELECT p.partition, p.seconds, t.part, t.after_id, t.last_id, t.rows
     FROM parts t JOIN partitions p ON p.partition = t.partition
     WHERE t.sink = ?1 AND t.delivered_ms IS NULL AND t.dropped_ms IS NULL
     ORDER BY t.partition, t.part";

impl PartPlan {
    /// A row of [`PENDING_PARTS`]: partition, seconds, part, after_id, last_id, rows.
    fn from_row(sink: &str, r: &rusqlite::Row<'_>) -> rusqlite::Result<PartPlan> {
        Ok(PartPlan {
            sink: sink.to_owned(),
            partition: r.get(0)?,
            seconds: r.get(1)?,
            part: r.get(2)?,
            after_id: r.get(3)?,
            last_id: r.get(4)?,
            rows: r.get(5)?,
        })
    }
}

/// What a planned part holds.
#[derive(Debug)]
pub struct PartRows {
    /// The rows, ordered by window start and series.
    pub rows: Vec<WindowRow>,
    /// The series that get columns in a wide file of this part (sorted).
    pub series: Vec<Arc<Series>>,
}

/// What a sink that loads several parts at once should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    /// Send these parts, oldest first, together.
    Ready(Vec<PartPlan>),
    /// Nothing to send before this instant (Unix ms), or before new data if `None`.
    Wait(Option<i64>),
}

/// What a sink should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Send this part.
    Ready(PartPlan),
    /// Nothing to send before this instant (Unix ms), or before new data if `None`.
    Wait(Option<i64>),
}

impl Spool {
    /// Plans the next part for `sink`, or says how long there is nothing to send.
    pub fn plan(&mut self, sink: &str, now_ms: i64) -> Result<Plan, SpoolError> {
        let err = sqlite(&self.path);
        let pending = self
            .conn
            .query_row(&format!("{PENDING_PARTS} LIMIT 1"), [sink], |r| {
                PartPlan::from_row(sink, r)
            })
            .optional()
            .map_err(&err)?;
        if let Some(plan) = pending {
            return Ok(Plan::Ready(plan));
        }
        // A planned part whose partition is gone (dropped for the budget by an older
        // edgespool, which did not mark its parts): nothing to send.
        self.conn
            .execute(
                "UPDATE parts SET dropped_ms = ?2
                 WHERE sink = ?1 AND delivered_ms IS NULL AND dropped_ms IS NULL",
                params![sink, now_ms],
            )
            .map_err(&err)?;

        // Design: per partition held, a lookup of the sink's parts by key, so a plan
        // costs what the spool holds, not the sink's history of parts.
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT partition, seconds, done, next_part FROM (
                   SELECT p.partition, p.seconds, p.max_id,
                     (SELECT MAX(t.last_id) FROM parts t
                      WHERE t.sink = ?1 AND t.partition = p.partition) AS done,
                     (SELECT MAX(t.part) + 1 FROM parts t
                      WHERE t.sink = ?1 AND t.partition = p.partition) AS next_part
                   FROM partitions p)
                 WHERE max_id > COALESCE(done, 0)
                 ORDER BY partition",
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
        let late = self.options.late_parts(sink);
        let each_flush = self.options.each_flush(sink);
        let part_cap = part_bytes_cap(self.options.budget_bytes);
        let mut wait = |until: i64| {
            wait_until = Some(wait_until.map_or(until, |w: i64| w.min(until)));
        };
        for candidate in &mut candidates {
            let (partition, seconds, done, next_part) = candidate.map_err(&err)?;
            let ready_ms = (partition + i64::from(seconds)) * 1000 + grace;
            let open = ready_ms > now_ms;
            if open && !each_flush {
                wait(ready_ms);
                continue;
            }
            // The open partition's rows since the sink's last part go as they are (a
            // sink that delivers each flush); no row of it is late yet.
            if next_part > 0 && !open {
                // Late rows for a partition this sink has a part of: they wait to go
                // out together (see `LateParts`).
                let waiting = unplanned(&self.conn, sink, partition, done).map_err(&err)?;
                if let Some(due_ms) = waiting.due_ms(late, part_cap, now_ms) {
                    wait(due_ms);
                    continue;
                }
            }
            chosen.push((partition, seconds, done, next_part));
            if chosen.len() == PLAN_AHEAD {
                break;
            }
        }
        drop(candidates);
        drop(stmt);
        // Several closed partitions are planned in one transaction (one fsync), then
        // sent one by one, oldest first.
        let tx = self.conn.transaction().map_err(&err)?;
        // The series known now: a wide file's columns (fixed by a partition's first
        // part, see `SpoolReader::read_part`).
        let series_upto: i64 = tx
            .query_row("SELECT COALESCE(MAX(id), 0) FROM series", [], |r| r.get(0))
            .map_err(&err)?;
        let mut first = None;
        for (partition, seconds, after_id, part) in chosen {
            // Whole batches, up to MAX_PART_ROWS windows and a sixteenth of the budget
            // (at least one batch): a part the budget drops goes whole (budget.rs).
            let (mut rows, mut bytes, mut last_id) = (0i64, 0u64, None);
            {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id, rows, length(record) FROM batches
                         WHERE partition = ?1 AND id > ?2 ORDER BY id",
                    )
                    .map_err(&err)?;
                let mut batches = stmt.query(params![partition, after_id]).map_err(&err)?;
                while let Some(batch) = batches.next().map_err(&err)? {
                    let (id, n, len): (i64, i64, i64) = (
                        batch.get(0).map_err(&err)?,
                        batch.get(1).map_err(&err)?,
                        batch.get(2).map_err(&err)?,
                    );
                    let len = len.max(0) as u64;
                    if last_id.is_some() && (rows + n > MAX_PART_ROWS || bytes + len > part_cap) {
                        break;
                    }
                    rows += n;
                    bytes += len;
                    last_id = Some(id);
                }
            }
            let Some(last_id) = last_id else {
                continue;
            };
            // `seen_id`: the partition's newest rows now; rows above it arrive after this
            // plan, late.
            tx.execute(
                "INSERT INTO parts (sink, partition, part, after_id, last_id, rows, planned_ms,
                                    seen_id, series_upto)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
                         (SELECT max_id FROM partitions WHERE partition = ?2), ?8)",
                params![
                    sink,
                    partition,
                    part,
                    after_id,
                    last_id,
                    rows,
                    now_ms,
                    series_upto
                ],
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

    /// Plans like [`Spool::plan`], then adds the parts planned (by the same plan or an
    /// earlier one) and not yet delivered that follow the first, oldest first, while
    /// they fit in `max_rows` (the first goes however large) and `max_parts`: a batch a
    /// sink loads in one transaction. Its parts are of distinct partitions (a partition
    /// has one pending part at a time), so each is recorded at the sink on its own.
    pub fn plan_batch(
        &mut self,
        sink: &str,
        now_ms: i64,
        max_parts: usize,
        max_rows: i64,
    ) -> Result<Batch, SpoolError> {
        let first = match self.plan(sink, now_ms)? {
            Plan::Ready(first) => first,
            Plan::Wait(until) => return Ok(Batch::Wait(until)),
        };
        let err = sqlite(&self.path);
        let mut rows = first.rows;
        let mut parts = vec![first];
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{PENDING_PARTS} LIMIT ?2"))
            .map_err(&err)?;
        let pending = stmt
            .query_map(params![sink, max_parts as i64], |r| {
                PartPlan::from_row(sink, r)
            })
            .map_err(&err)?;
        for plan in pending {
            let plan = plan.map_err(&err)?;
            if parts.iter().any(|p| p.partition == plan.partition) {
                continue;
            }
            if parts.len() >= max_parts || rows + plan.rows > max_rows {
                break;
            }
            rows += plan.rows;
            parts.push(plan);
        }
        Ok(Batch::Ready(parts))
    }

    /// Records that a part was delivered, and deletes rows every active sink now has.
    pub fn delivered(&mut self, plan: &PartPlan, now_ms: i64) -> Result<(), SpoolError> {
        self.delivered_all(std::slice::from_ref(plan), now_ms)
    }

    /// Records that parts were delivered (in one transaction: all or none of them), and
    /// deletes rows every active sink now has.
    pub fn delivered_all(&mut self, plans: &[PartPlan], now_ms: i64) -> Result<(), SpoolError> {
        // Without an fsync of its own: a delivery record lost to a power cut only makes
        // the (durably planned) part go again, which every sink takes as a no-op; the
        // next synced commit makes it durable with everything before it in the WAL.
        let path = self.path.clone();
        let err = sqlite(&path);
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(&err)?;
        let result = self.record_deliveries(plans, now_ms);
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        result
    }

    fn record_deliveries(&mut self, plans: &[PartPlan], now_ms: i64) -> Result<(), SpoolError> {
        let err = sqlite(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        for plan in plans {
            record_delivery(&tx, plan, now_ms).map_err(&err)?;
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

/// Records one delivered part inside `tx`, and deletes its partition's rows that every
/// active sink now has.
fn record_delivery(
    tx: &rusqlite::Transaction<'_>,
    plan: &PartPlan,
    now_ms: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE parts SET delivered_ms = ?4
         WHERE sink = ?1 AND partition = ?2 AND part = ?3 AND dropped_ms IS NULL",
        params![plan.sink, plan.partition, plan.part, now_ms],
    )?;
    tx.execute(
        "UPDATE sinks SET last_success_ms = ?2, retrying_since_ms = NULL, next_attempt_ms = NULL
         WHERE name = ?1",
        params![plan.sink, now_ms],
    )?;
    prune_parts(tx, &plan.sink, plan.partition)?;
    // The id up to which every active sink has this partition.
    let everyone_has: Option<i64> = tx.query_row(
        "SELECT MIN(COALESCE((SELECT MAX(last_id) FROM parts t
                                  WHERE t.sink = s.name AND t.partition = ?1
                                    AND t.delivered_ms IS NOT NULL), 0))
             FROM sinks s WHERE s.active = 1",
        [plan.partition],
        |r| r.get(0),
    )?;
    if let Some(upto) = everyone_has.filter(|&id| id > 0) {
        let deleted: i64 = tx.query_row(
            "SELECT COALESCE(SUM(rows), 0) FROM batches WHERE partition = ?1 AND id <= ?2",
            params![plan.partition, upto],
            |r| r.get(0),
        )?;
        tx.execute(
            "DELETE FROM batches WHERE partition = ?1 AND id <= ?2",
            params![plan.partition, upto],
        )?;
        tx.execute(
            "UPDATE partitions SET rows = rows - ?2 WHERE partition = ?1",
            params![plan.partition, deleted],
        )?;
        tx.execute(
            "DELETE FROM partitions WHERE partition = ?1 AND rows <= 0",
            [plan.partition],
        )?;
    }
    Ok(())
}
