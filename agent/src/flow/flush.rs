//! What a flush carries from the aggregator to the spool: the closed windows, the
//! aggregator's counters and each source's gathered since the previous flush, and the
//! live feeds' reports; and [`Commit`], the aggregator's end of the spool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{LiveReport, Problem, Series, WindowRow};

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
    /// Per series whose closed windows in `rows` hold device-stamped samples: the newest
    /// device timestamp committed (its mark, kept in the spool so that a restart does not
    /// take that reading again; see invariant 6).
    pub marks: Vec<(Arc<Series>, i64)>,
}

impl Flush {
    /// A flush of `rows` at `now_ms` with nothing else in it (no counts, no sources, no
    /// marks): what the tools that fill a spool and the tests commit.
    pub fn of_rows(rows: Vec<WindowRow>, now_ms: i64) -> Flush {
        Flush {
            rows,
            now_ms,
            aggregate: AggregateCounts::default(),
            sources: Vec::new(),
            open_windows: 0,
            live: Vec::new(),
            clock: Default::default(),
            marks: Vec::new(),
        }
    }

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
        for (series, mark) in newer.marks {
            match self.marks.iter_mut().find(|(s, _)| *s == series) {
                Some((_, kept)) => *kept = (*kept).max(mark),
                None => self.marks.push((series, mark)),
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

/// Why a flush was not committed, with the flush given back when it still exists (the
/// spool could not write it) so that it can be tried again with the next one.
pub struct CommitFailed {
    /// What went wrong.
    pub error: Box<dyn std::error::Error + Send + Sync>,
    /// The flush, unless it went with a spool that is gone.
    pub flush: Option<Flush>,
}

/// Where the aggregator commits its flushes: the spool's writer in the agent.
// Design: a trait so that the aggregator, upstream of the spool, names no spool type.
#[async_trait::async_trait]
pub trait Commit: Send + Sync {
    /// Commits a flush in one transaction.
    async fn commit(&self, flush: Flush) -> Result<(), CommitFailed>;
}

/// Counters of one source, shared between its task and the flushes that persist them.
#[derive(Debug)]
pub struct SourceStats {
    /// The source's name.
    pub name: String,
    /// Its `kind` word.
    pub kind: &'static str,
    samples: AtomicU64,
    invalid: AtomicU64,
    errors: AtomicU64,
    series_dropped: AtomicU64,
    repeats: AtomicU64,
    nulls: AtomicU64,
    not_finite: AtomicU64,
    last_problem: Mutex<Option<Problem>>,
}

/// Counts gathered since the previous flush.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SourceDeltas {
    /// Samples produced.
    pub samples: u64,
    /// Unusable values.
    pub invalid: u64,
    /// Failed reads.
    pub errors: u64,
    /// Samples dropped because they would have made a series beyond `max_series`.
    pub series_dropped: u64,
    /// Device-stamped samples dropped as repeats of a reading already taken.
    pub repeats: u64,
    /// `null` values: no sample, counted.
    pub nulls: u64,
    /// NaN or ±Inf values: no sample, counted.
    pub not_finite: u64,
}

impl SourceDeltas {
    /// Adds another interval's counts.
    pub fn add(&mut self, other: &SourceDeltas) {
        self.samples += other.samples;
        self.invalid += other.invalid;
        self.errors += other.errors;
        self.series_dropped += other.series_dropped;
        self.repeats += other.repeats;
        self.nulls += other.nulls;
        self.not_finite += other.not_finite;
    }
}

impl SourceStats {
    /// Fresh counters for a source.
    pub fn new(name: &str, kind: &'static str) -> SourceStats {
        SourceStats {
            name: name.to_owned(),
            kind,
            samples: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            series_dropped: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            nulls: AtomicU64::new(0),
            not_finite: AtomicU64::new(0),
            last_problem: Mutex::new(None),
        }
    }

    /// Takes the counts since the last call, resetting them.
    pub fn take_deltas(&self) -> SourceDeltas {
        SourceDeltas {
            samples: self.samples.swap(0, Ordering::Relaxed),
            invalid: self.invalid.swap(0, Ordering::Relaxed),
            errors: self.errors.swap(0, Ordering::Relaxed),
            series_dropped: self.series_dropped.swap(0, Ordering::Relaxed),
            repeats: self.repeats.swap(0, Ordering::Relaxed),
            nulls: self.nulls.swap(0, Ordering::Relaxed),
            not_finite: self.not_finite.swap(0, Ordering::Relaxed),
        }
    }

    /// The latest problem, if any.
    pub fn last_problem(&self) -> Option<Problem> {
        self.last_problem.lock().map(|p| p.clone()).unwrap_or(None)
    }

    /// Counts samples produced.
    pub fn count_samples(&self, samples: u64) {
        self.samples.fetch_add(samples, Ordering::Relaxed);
    }

    /// Counts a failed read.
    pub fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an unusable value.
    pub fn count_invalid(&self) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts samples dropped for a series beyond the source's `max_series`.
    pub fn count_series_dropped(&self, samples: u64) {
        self.series_dropped.fetch_add(samples, Ordering::Relaxed);
    }

    /// Counts repeated readings dropped.
    pub fn count_repeats(&self, samples: u64) {
        self.repeats.fetch_add(samples, Ordering::Relaxed);
    }

    /// Counts `null` values and NaN or ±Inf values, which make no sample.
    pub fn count_no_value(&self, nulls: u64, not_finite: u64) {
        self.nulls.fetch_add(nulls, Ordering::Relaxed);
        self.not_finite.fetch_add(not_finite, Ordering::Relaxed);
    }

    /// Records the latest problem, for `status`.
    pub fn problem(&self, at_ms: i64, message: String) {
        if let Ok(mut last) = self.last_problem.lock() {
            *last = Some(Problem { at_ms, message });
        }
    }
}

/// Counters the aggregator keeps, taken at every flush.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AggregateCounts {
    /// Samples taken in.
    pub samples: u64,
    /// NaN or infinite values, dropped.
    pub non_finite: u64,
    /// Samples for windows already flushed (flushed again, as late rows).
    pub late: u64,
    /// Samples dropped because too many windows were open.
    pub overflow: u64,
    /// Closed windows dropped because the spool could not be written for too long.
    pub lost: u64,
    /// Samples the agent stamped into a window already written (the clock went back),
    /// moved to the next open window of their series instead.
    pub clamped: u64,
    /// Samples held for a synchronised clock beyond the aggregator's `MAX_HELD`, dropped.
    pub held_dropped: u64,
    /// Windows that reached the aggregator's `MAX_VALUES_PER_WINDOW` (their median is of
    /// the values kept).
    pub capped: u64,
}

impl AggregateCounts {
    /// Adds another interval's counts.
    pub fn add(&mut self, other: &AggregateCounts) {
        self.samples += other.samples;
        self.non_finite += other.non_finite;
        self.late += other.late;
        self.overflow += other.overflow;
        self.lost += other.lost;
        self.clamped += other.clamped;
        self.held_dropped += other.held_dropped;
        self.capped += other.capped;
    }
}
