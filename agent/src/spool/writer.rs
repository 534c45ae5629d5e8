//! The writer's flush: what one flush holds, and committing it in one transaction
//! (windows as batches, the series they name, counters, the agent's state).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rusqlite::{OptionalExtension, params};
use tracing::warn;

use crate::config::WhenFull;
use crate::flow::{Flush, LiveReport, Series};

use super::record::StoredWindow;
use super::{SourceState, Spool, SpoolError, sqlite};

impl Spool {
    pub(super) fn write_state(&self) -> Result<(), SpoolError> {
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
    /// series cache) is as before. First checks that the spool file and its lock are still
    /// this writer's (see `follow.rs`): a flush is never committed into a spool another
    /// agent took over ([`SpoolError::InUse`]).
    pub fn commit(&mut self, flush: &Flush) -> Result<(), SpoolError> {
        self.follow()?;
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
            ("windows.capped".into(), flush.aggregate.capped),
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
                    .push(StoredWindow::new(
                        series,
                        partition,
                        row.start,
                        row.seconds,
                        &row.stats,
                    ));
            }
            for (partition, windows) in by_partition {
                let rows = windows.len() as i64;
                let id = self.next_id + rows - 1;
                self.next_id += rows;
                let record = super::record::encode(&windows);
                tx.prepare_cached(
                    "INSERT INTO batches (id, partition, rows, record, committed_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .and_then(|mut insert| {
                    insert.execute(params![id, partition, rows, record, flush.now_ms])
                })
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
            // The marks of the series these windows hold: a few bytes each, in the
            // same transaction (no commit or fsync of their own).
            let mut mark = tx
                .prepare_cached(
                    "INSERT INTO marks (series, device_ms) VALUES (?1, ?2)
                     ON CONFLICT (series) DO UPDATE SET device_ms = MAX(device_ms, ?2)",
                )
                .map_err(&err)?;
            for (series, device_ms) in &flush.marks {
                if let Some(&id) = self.series_ids.get(series) {
                    mark.execute(params![id, device_ms]).map_err(&err)?;
                }
            }
        }
        for (stats, deltas) in &flush.sources {
            let name = &stats.name;
            counters.push((format!("source.{name}.samples"), deltas.samples));
            counters.push((format!("source.{name}.invalid"), deltas.invalid));
            counters.push((format!("source.{name}.errors"), deltas.errors));
            counters.push((
                format!("source.{name}.series_dropped"),
                deltas.series_dropped,
            ));
            counters.push((format!("source.{name}.repeats"), deltas.repeats));
            counters.push((format!("source.{name}.nulls"), deltas.nulls));
            counters.push((format!("source.{name}.not_finite"), deltas.not_finite));
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
            self.enforce_budget(crate::clock::now_ms())?;
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

    /// Each series' mark: its newest committed device timestamp, for the aggregator at
    /// start (see `marks` in the design above).
    pub fn marks(&self) -> Result<Vec<(Series, i64)>, SpoolError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT s.name, s.unit, s.tags, m.device_ms FROM marks m
                 JOIN series s ON s.id = m.series",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                let tags: String = r.get(2)?;
                let series = Series {
                    name: r.get(0)?,
                    unit: r.get(1)?,
                    tags: serde_json::from_str(&tags).unwrap_or_default(),
                };
                Ok((series, r.get(3)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.err())?;
        Ok(rows)
    }

    /// Marks a clean stop, so that `status` says "stopped" rather than "not responding".
    pub fn mark_stopped(&mut self) -> Result<(), SpoolError> {
        self.follow()?;
        self.state.stopped = true;
        self.write_state()
    }
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

/// Adds to the lifetime counters, inside `tx`: one JSON row, `meta('counters')`, on the
/// page of the agent's state (rewritten only when a delta is not 0).
pub(super) fn add_counters(
    tx: &rusqlite::Transaction<'_>,
    counters: &[(String, u64)],
) -> rusqlite::Result<()> {
    if counters.iter().all(|(_, delta)| *delta == 0) {
        return Ok(());
    }
    let json: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'counters'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let mut all: BTreeMap<String, u64> = match json.as_deref().map(serde_json::from_str) {
        None => BTreeMap::new(),
        Some(Ok(all)) => all,
        Some(Err(error)) => {
            warn!(error = %error, "the spool's counters are unreadable: counting again from 0");
            BTreeMap::new()
        }
    };
    for (name, delta) in counters.iter().filter(|(_, d)| *d > 0) {
        let value = all.entry(name.clone()).or_default();
        *value = value.saturating_add(*delta);
    }
    let json = serde_json::to_string(&all).unwrap_or_else(|_| "{}".to_owned());
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('counters', ?1)
         ON CONFLICT (key) DO UPDATE SET value = ?1",
        [json],
    )?;
    Ok(())
}
