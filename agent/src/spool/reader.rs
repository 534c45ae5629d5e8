//! The read-only side: [`SpoolReader`], the uploaders' and `status`'s connection, and what
//! it reads (a part's rows, the agent's state, counters, totals, sinks).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::flow::{LiveState, Problem, Series, WindowRow};

use super::budget::used_bytes;
use super::delivery::unplanned;
use super::record::StoredWindow;
use super::schema::APPLICATION_ID;
use super::{CACHE_KIB, FileId, PartPlan, PartRows, Recovery, Restored, SpoolError, sqlite};

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

/// A part being read in chunks (see [`SpoolReader::begin_part`]).
#[derive(Debug)]
pub struct PartReading {
    plan: PartPlan,
    batches: Vec<BatchIndex>,
    /// Each chunk's first and last window start, as offsets from the partition's start,
    /// and its rows.
    chunks: Vec<(u32, u32, usize)>,
    rows: usize,
    /// The spool's column set for the partition.
    series: Vec<Arc<Series>>,
    /// That and the series of the part's own rows.
    wide_series: Vec<Arc<Series>>,
}

/// Where a batch's rows fall: the window starts it holds.
#[derive(Debug)]
struct BatchIndex {
    last_id: i64,
    /// Window starts minus the partition's start, sorted.
    offsets: Vec<u32>,
}

impl PartReading {
    /// How many chunks the part is read in.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// How many rows the part holds (0 for a part the disk budget dropped).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The series a wide file of the part gives columns to, sorted (empty unless asked):
    /// the partition's column set and the series of the part's own rows.
    pub fn wide_series(&self) -> &[Arc<Series>] {
        &self.wide_series
    }
}

fn decode(path: &Path, id: i64, record: &[u8]) -> Result<Vec<StoredWindow>, SpoolError> {
    super::record::decode(record).map_err(|reason| SpoolError::Record {
        path: path.to_owned(),
        id,
        reason,
    })
}

/// A read-only connection: the uploaders' and `status`'s.
pub struct SpoolReader {
    conn: Connection,
    path: PathBuf,
    /// The file opened, if the path named the same one before and after.
    file: Option<FileId>,
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
    /// Late rows (of partitions it has a part of) that no part holds yet: waiting for
    /// `late_grace` to pass (or for the sink, while it is retrying).
    pub late_waiting: i64,
    /// When the oldest of them has waited `late_grace`, Unix ms.
    pub late_due_ms: Option<i64>,
}

impl SpoolReader {
    /// Opens the spool read-only.
    pub fn open(path: &Path) -> Result<SpoolReader, SpoolError> {
        let err = sqlite(path);
        let before = FileId::of_path(path).ok().flatten();
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
        let after = FileId::of_path(path).ok().flatten();
        Ok(SpoolReader {
            conn,
            path: path.to_owned(),
            file: before.filter(|_| before == after),
            series: HashMap::new(),
        })
    }

    /// The file this reader has open (`None` if the path changed while it opened).
    pub fn file(&self) -> Option<FileId> {
        self.file
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> SpoolError + '_ {
        sqlite(&self.path)
    }

    /// The rows of a planned part, ordered by window start, series and id, and the series
    /// a wide file of it gives columns to (see [`SpoolReader::begin_part`]): the whole
    /// part at once, for tests and small parts; the uploader reads it in chunks.
    pub fn read_part(
        &mut self,
        plan: &PartPlan,
        with_series: bool,
    ) -> Result<PartRows, SpoolError> {
        let reading = self.begin_part(plan, with_series, usize::MAX)?;
        let mut rows = Vec::with_capacity(reading.rows());
        let read = (0..reading.chunks()).try_for_each(|i| {
            rows.extend(self.read_chunk(&reading, i)?);
            Ok(())
        });
        self.end_part();
        read?;
        Ok(PartRows {
            rows,
            series: reading.series,
        })
    }

    /// Starts reading a planned part in chunks of about `chunk_rows` rows: indexes the
    /// part's batches (which window starts each holds and how many rows of each). Read
    /// the chunks with [`SpoolReader::read_chunk`], then call [`SpoolReader::end_part`].
    ///
    /// Design: a chunk is a run of whole window starts, so the rows come in the order a
    /// sort of the whole part gives (window start, series, id) and a wide row (all the
    /// series of one start) is never split. A chunk holds at most `chunk_rows` rows,
    /// or one window start's rows if that start alone has more. A batch is one flush,
    /// usually of one window start; one that holds late rows of earlier starts is
    /// decoded again for each chunk it has rows in. The chunks depend only on the rows
    /// and `chunk_rows`, so a retried part reads the same chunks.
    ///
    /// No read transaction is held across the chunks (it would keep the WAL from being
    /// reset for as long as an upload takes, and the spool's files over their bound).
    /// Nothing else changes a planned part's rows but the disk budget, which deletes
    /// them all and marks the part dropped in one transaction: the index is read first
    /// and the mark after it, so a part not dropped then was indexed whole, and a chunk
    /// whose batch has gone since fails ([`SpoolError::Record`]) rather than shortening
    /// the part; the retry then reads the part as dropped.
    ///
    /// The series a wide file gives columns to: every series the spool knew when the
    /// sink's first part of this partition was planned (`parts.series_upto`), so every
    /// part of a partition has the same columns, partitions planned together have the
    /// same columns, and a retried part the same bytes (for a first part planned by an
    /// older edgespool: every series first seen in this partition or an earlier one, in
    /// a flush this part includes); [`PartReading::wide_series`] adds the series of the
    /// part's own rows (a series that only a late row brings). It is read only
    /// `with_series` (for a wide layout); otherwise it is empty. A part the disk budget
    /// dropped reads as empty.
    pub fn begin_part(
        &mut self,
        plan: &PartPlan,
        with_series: bool,
        chunk_rows: usize,
    ) -> Result<PartReading, SpoolError> {
        self.end_part();
        self.index_part(plan, with_series, chunk_rows.max(1))
    }

    /// Ends a reading begun with [`SpoolReader::begin_part`] (ends any read transaction
    /// left open on this connection).
    pub fn end_part(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn index_part(
        &mut self,
        plan: &PartPlan,
        with_series: bool,
        chunk_rows: usize,
    ) -> Result<PartReading, SpoolError> {
        let mut reading = PartReading {
            plan: plan.clone(),
            batches: Vec::new(),
            chunks: Vec::new(),
            rows: 0,
            series: Vec::new(),
            wide_series: Vec::new(),
        };
        let path = self.path.clone();
        let err = sqlite(&path);
        let mut per_start: BTreeMap<u32, usize> = BTreeMap::new();
        let mut row_series: std::collections::BTreeSet<i64> = Default::default();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, record FROM batches
                 WHERE partition = ?1 AND id > ?2 AND id <= ?3 ORDER BY id",
            )
            .map_err(&err)?;
        let mut found = stmt
            .query(params![plan.partition, plan.after_id, plan.last_id])
            .map_err(&err)?;
        while let Some(row) = found.next().map_err(&err)? {
            let last_id: i64 = row.get(0).map_err(&err)?;
            let record =
                row.get_ref(1)
                    .map_err(&err)?
                    .as_blob()
                    .map_err(|e| SpoolError::Record {
                        path: path.clone(),
                        id: last_id,
                        reason: e.to_string(),
                    })?;
            let windows = decode(&path, last_id, record)?;
            let mut offsets: Vec<u32> = Vec::new();
            for window in &windows {
                *per_start.entry(window.offset).or_default() += 1;
                if !offsets.contains(&window.offset) {
                    offsets.push(window.offset);
                }
                if with_series {
                    row_series.insert(window.series);
                }
            }
            offsets.sort_unstable();
            reading.rows += windows.len();
            reading.batches.push(BatchIndex { last_id, offsets });
        }
        drop(found);
        drop(stmt);
        // Design: after the index (see `begin_part`): a drop deletes a part's rows and
        // marks it in one transaction.
        if self.dropped(plan)? {
            return Ok(PartReading {
                batches: Vec::new(),
                rows: 0,
                ..reading
            });
        }
        let mut chunk: Option<(u32, u32, usize)> = None;
        for (offset, rows) in per_start {
            match &mut chunk {
                Some((_, last, held)) if held.saturating_add(rows) <= chunk_rows => {
                    *last = offset;
                    *held += rows;
                }
                _ => {
                    reading.chunks.extend(chunk);
                    chunk = Some((offset, offset, rows));
                }
            }
        }
        reading.chunks.extend(chunk);
        if with_series {
            let ids = self.column_series(plan)?;
            let mut series = Vec::with_capacity(ids.len());
            for id in &ids {
                series.push(self.series(*id)?);
            }
            series.sort();
            let mut wide = series.clone();
            for id in row_series {
                if ids.binary_search(&id).is_err() {
                    wide.push(self.series(id)?);
                }
            }
            wide.sort();
            reading.series = series;
            reading.wide_series = wide;
        }
        Ok(reading)
    }

    /// The ids of the series a wide file of this part gives columns to beside its rows'.
    fn column_series(&self, plan: &PartPlan) -> Result<Vec<i64>, SpoolError> {
        let upto: Option<i64> = self
            .conn
            .query_row(
                "SELECT series_upto FROM parts WHERE sink = ?1 AND partition = ?2
                 ORDER BY part LIMIT 1",
                params![plan.sink, plan.partition],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?
            .flatten();
        match upto {
            Some(upto) => self
                .conn
                .prepare_cached("SELECT id FROM series WHERE id <= ?1 ORDER BY id")
                .and_then(|mut stmt| stmt.query_map([upto], |r| r.get(0))?.collect()),
            None => self
                .conn
                .prepare_cached(
                    "SELECT id FROM series
                     WHERE COALESCE(first_partition, 0) <= ?1 AND COALESCE(first_id, 0) <= ?2
                     ORDER BY id",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![plan.partition, plan.last_id], |r| r.get(0))?
                        .collect()
                }),
        }
        .map_err(self.err())
    }

    /// Whether the disk budget dropped this part (see `budget.rs`).
    fn dropped(&self, plan: &PartPlan) -> Result<bool, SpoolError> {
        self.conn
            .query_row(
                "SELECT dropped_ms IS NOT NULL FROM parts
                 WHERE sink = ?1 AND partition = ?2 AND part = ?3",
                params![plan.sink, plan.partition, plan.part],
                |r| r.get(0),
            )
            .optional()
            .map(|dropped| dropped.unwrap_or(false))
            .map_err(self.err())
    }

    /// Chunk `index` (from 0, below [`PartReading::chunks`]) of a part begun with
    /// [`SpoolReader::begin_part`]: its rows, ordered by window start, series and id.
    pub fn read_chunk(
        &mut self,
        reading: &PartReading,
        index: usize,
    ) -> Result<Vec<WindowRow>, SpoolError> {
        let Some(&(first, last, held)) = reading.chunks.get(index) else {
            return Ok(Vec::new());
        };
        let path = self.path.clone();
        let err = sqlite(&path);
        let partition = reading.plan.partition;
        // Design: room for exactly the chunk's rows (counted by the index), pushed in id
        // order (the batches are, and a batch's windows), so a stable sort by start and
        // series is the order by start, series and id with no id kept beside each row.
        let mut rows = Vec::with_capacity(held);
        for batch in &reading.batches {
            if !batch.offsets.iter().any(|o| (first..=last).contains(o)) {
                continue;
            }
            let record: Vec<u8> = self
                .conn
                .prepare_cached("SELECT record FROM batches WHERE id = ?1")
                .and_then(|mut stmt| stmt.query_row([batch.last_id], |r| r.get(0)).optional())
                .map_err(&err)?
                .ok_or_else(|| SpoolError::Record {
                    path: path.clone(),
                    id: batch.last_id,
                    reason: "deleted while its part was read (the disk budget dropped it)"
                        .to_owned(),
                })?;
            let windows = decode(&path, batch.last_id, &record)?;
            drop(record);
            for window in windows {
                if !(first..=last).contains(&window.offset) {
                    continue;
                }
                let series = self.series(window.series)?;
                let row = WindowRow {
                    series,
                    start: partition + i64::from(window.offset),
                    seconds: window.seconds,
                    stats: window.stats(partition),
                };
                rows.push(row);
            }
        }
        rows.sort_by(|a, b| (a.start, &a.series).cmp(&(b.start, &b.series)));
        Ok(rows)
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
        let series = Series {
            name,
            unit,
            tags: serde_json::from_str(&tags).unwrap_or_default(),
        }
        .shared();
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

    /// The last time the spool file was found deleted or replaced under the running
    /// agent and rewritten from its open database, if ever.
    pub fn restored(&self) -> Result<Option<Restored>, SpoolError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'restored'", [], |r| {
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
                          + COALESCE((SELECT value FROM counters
                                      WHERE name = 'sink.' || s.name || '.parts_pruned'), 0),
                        late_grace_ms
                 FROM sinks s WHERE active = 1 ORDER BY name",
            )
            .map_err(&err)?;
        let mut graces = Vec::new();
        let mut sinks: Vec<SinkRecord> = stmt
            .query_map([], |r| {
                graces.push(r.get::<_, i64>(8)?);
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
                    late_waiting: 0,
                    late_due_ms: None,
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
        drop(pending);
        let mut planned = self
            .conn
            .prepare(
                "SELECT t.partition, MAX(t.last_id) FROM parts t
                 JOIN partitions p ON p.partition = t.partition
                 WHERE t.sink = ?1 GROUP BY t.partition ORDER BY t.partition",
            )
            .map_err(&err)?;
        for (sink, grace_ms) in sinks.iter_mut().zip(graces) {
            let done: Vec<(i64, i64)> = planned
                .query_map([&sink.name], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(&err)?
                .collect::<Result<_, _>>()
                .map_err(&err)?;
            for (partition, done) in done {
                let waiting = unplanned(&self.conn, &sink.name, partition, done).map_err(&err)?;
                if waiting.rows == 0 || waiting.backlog {
                    continue;
                }
                sink.late_waiting += waiting.rows;
                if let Some(oldest) = waiting.oldest_ms {
                    let due = oldest.saturating_add(grace_ms);
                    sink.late_due_ms = Some(sink.late_due_ms.map_or(due, |d| d.min(due)));
                }
            }
        }
        Ok(sinks)
    }
}
