//! The flow's shared types: what the stages hand each other, and nothing of the stages.
//!
//! ```text
//!  source ──Sampled (Sample of a Series)──▶ aggregate ──Flush (WindowRow, counts)──▶ spool
//!                                               │                                    │
//!                                               └──committed WindowRows──▶ live feeds └──▶ sinks
//! ```
//!
//! Every stage may use this module; it uses none of them (only [`crate::clock`]'s report
//! type). What crosses a stage boundary is defined here, so imports point one way:
//! `source` ← `aggregate` ← `spool` ← `sink`, each stage knowing only those upstream
//! of itself and this module.
//!
//! - this file: [`Series`], [`Sample`] and [`Sampled`] (sources to the aggregator),
//!   [`Stats`] and [`WindowRow`] (a closed window, from the aggregator to every output),
//!   [`Problem`];
//! - [`flush`]: the counters a flush carries to the spool;
//! - [`live`]: the plumbing from the aggregator to live feeds, and their reports.

pub mod flush;
pub mod live;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use flush::{AggregateCounts, Commit, CommitFailed, Flush, SourceDeltas, SourceStats};
pub use live::{LiveLink, LiveReport, LiveState, LiveStats};

/// A named stream of numbers: `source.field`, with optional tags and a unit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Series {
    /// `source.field`.
    pub name: String,
    /// Extra identifying labels (e.g. a sensor id of a table row).
    pub tags: BTreeMap<String, String>,
    /// The unit of the values, if known.
    pub unit: Option<String>,
}

impl Series {
    /// A series without tags.
    pub fn new(name: impl Into<String>, unit: Option<&str>) -> Series {
        Series {
            name: name.into(),
            tags: BTreeMap::new(),
            unit: unit.map(str::to_owned),
        }
    }
}

/// One reading of one series.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What was read.
    pub series: Arc<Series>,
    /// When it was read (or when the device says it was), in Unix milliseconds.
    pub timestamp_ms: i64,
    /// The value: finite (a source counts null, NaN and ±Inf and passes none on; the
    /// aggregator counts and drops any that still arrive).
    pub value: f64,
    /// Whether `timestamp_ms` is this agent's clock (when it read or received the value)
    /// rather than the device's own time: only such stamps are held while the clock is
    /// not synchronised, and kept from reopening a written window (see [`crate::clock`]).
    pub own_clock: bool,
}

/// Where a sample's time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// This agent's clock, Unix ms: when it read or received the value.
    Own(i64),
    /// The device's own time, Unix ms (a timestamp in the payload).
    Device(i64),
}

/// One sampling's samples on their way to the aggregator, with when it was taken (the
/// wall and the monotonic clock at the same instant): the aggregator may hold the
/// samples on the agent's own clock and restamp them from `at` (see [`crate::clock`]).
#[derive(Debug)]
pub struct Sampled {
    /// The samples.
    pub samples: Vec<Sample>,
    /// The wall clock when the sampling started, Unix ms.
    pub now_ms: i64,
    /// The monotonic clock then.
    pub at: std::time::Instant,
    /// The source's counters, where the aggregator counts the repeats it drops.
    pub source: Option<Arc<SourceStats>>,
    /// Whether the source keeps repeated readings (`repeats = "keep"`): its device-stamped
    /// samples are then taken whatever their timestamps.
    pub keep_repeats: bool,
}

/// The latest thing that went wrong with a source, for `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// When, in Unix milliseconds.
    pub at_ms: i64,
    /// What, without secrets.
    pub message: String,
}

/// Values a window keeps for its median: the first this many to arrive (by arrival, not
/// by timestamp). A window with more has the median of those, and is counted
/// (`windows.capped`, `status`); every other statistic is of all its values.
pub const MAX_VALUES_PER_WINDOW: usize = 100_000;

/// The aggregates of one series over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Number of finite samples.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// What the `f64` mean leaves out: the exact mean is `mean + mean_rest` to about
    /// twice `f64`'s precision. Kept in the spool, not written to any output; it lets a
    /// merge of two windows with a large offset (values near 1.7e9 a few hundredths
    /// apart) pool their standard deviations without losing the difference of the means.
    pub mean_rest: f64,
    /// Sample standard deviation (n-1); `None` for a single sample.
    pub stdev: Option<f64>,
    /// Median; the mean of the middle two for an even count.
    pub median: f64,
    /// The value with the earliest timestamp.
    pub first: f64,
    /// Its timestamp, Unix ms.
    pub first_ms: i64,
    /// The value with the latest timestamp.
    pub last: f64,
    /// Its timestamp, Unix ms.
    pub last_ms: i64,
}

impl Stats {
    /// The statistics of two sets of samples of one window taken together (a window and
    /// its late rows; `self` is the one that arrived first). Count, min, max, mean and
    /// standard deviation are those of all the samples (the pooled variance, computed
    /// around `self`'s mean, with both means to twice `f64`'s precision); the median is
    /// the count-weighted mean of the two medians, an approximation. `first` is the value
    /// with the earlier `first_ms`, `last` the one with the later `last_ms`; on a tie
    /// `first` is `self`'s and `last` is `other`'s, as for samples of one window that
    /// share a timestamp (the first to arrive is `first`, the last to arrive is `last`).
    pub fn merge(&self, other: &Stats) -> Stats {
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        // Design: the difference of the means, rests included, is small and exact
        // enough even where the means themselves are 1.7e9; everything is computed
        // from it, around `self`'s mean.
        let delta = (other.mean - self.mean) + (other.mean_rest - self.mean_rest);
        let (mean, mean_rest) = two_sum(self.mean, self.mean_rest + delta * (nb / n));
        let m2 = |s: &Stats| s.stdev.map_or(0.0, |d| d * d * (s.count as f64 - 1.0));
        let pooled = m2(self) + m2(other) + delta * delta * (na * nb / n);
        let (first, first_ms) = if other.first_ms < self.first_ms {
            (other.first, other.first_ms)
        } else {
            (self.first, self.first_ms)
        };
        let (last, last_ms) = if other.last_ms >= self.last_ms {
            (other.last, other.last_ms)
        } else {
            (self.last, self.last_ms)
        };
        Stats {
            count: self.count + other.count,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
            mean,
            mean_rest,
            stdev: (n > 1.0).then(|| (pooled.max(0.0) / (n - 1.0)).sqrt()),
            median: (self.median * na + other.median * nb) / n,
            first,
            first_ms,
            last,
            last_ms,
        }
    }
}

/// `a + b` rounded, and what the rounding left out (Knuth's TwoSum: exact).
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let sum = a + b;
    let b_part = sum - a;
    let a_part = sum - b_part;
    (sum, (a - a_part) + (b - b_part))
}

#[cfg(test)]
impl Stats {
    /// The statistics of one sample, at time 0.
    pub(crate) fn single(value: f64) -> Stats {
        Stats::single_at(value, 0)
    }

    /// The statistics of one sample at `ms`.
    pub(crate) fn single_at(value: f64, ms: i64) -> Stats {
        Stats {
            count: 1,
            min: value,
            max: value,
            mean: value,
            mean_rest: 0.0,
            stdev: None,
            median: value,
            first: value,
            first_ms: ms,
            last: value,
            last_ms: ms,
        }
    }
}

/// One closed window of one series: a row of the spool and of every output.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    /// The series.
    pub series: Arc<Series>,
    /// Window start, Unix seconds (a multiple of `seconds`).
    pub start: i64,
    /// Window length in seconds.
    pub seconds: u32,
    /// The aggregates.
    pub stats: Stats,
}

impl WindowRow {
    /// Window end, Unix seconds (exclusive).
    pub fn end(&self) -> i64 {
        self.start + i64::from(self.seconds)
    }
}
