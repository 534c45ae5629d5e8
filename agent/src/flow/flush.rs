//! What a flush carries from the aggregator to the spool besides its windows: the
//! aggregator's counters and each source's, gathered since the previous flush.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Problem;

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
}

impl SourceDeltas {
    /// Adds another interval's counts.
    pub fn add(&mut self, other: &SourceDeltas) {
        self.samples += other.samples;
        self.invalid += other.invalid;
        self.errors += other.errors;
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
            last_problem: Mutex::new(None),
        }
    }

    /// Takes the counts since the last call, resetting them.
    pub fn take_deltas(&self) -> SourceDeltas {
        SourceDeltas {
            samples: self.samples.swap(0, Ordering::Relaxed),
            invalid: self.invalid.swap(0, Ordering::Relaxed),
            errors: self.errors.swap(0, Ordering::Relaxed),
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

    /// Records a problem; says whether it is news worth a log line (a new message).
    pub fn problem(&self, at_ms: i64, message: String) -> bool {
        let Ok(mut last) = self.last_problem.lock() else {
            return true;
        };
        let news = last.as_ref().is_none_or(|p| p.message != message);
        *last = Some(Problem { at_ms, message });
        news
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
    /// Samples held for a synchronised clock beyond [`MAX_HELD`], dropped.
    pub held_dropped: u64,
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
    }
}
