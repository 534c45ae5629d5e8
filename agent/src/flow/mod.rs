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

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

pub use flush::{AggregateCounts, Commit, CommitFailed, Flush, SourceDeltas, SourceStats};
pub use live::{LiveLink, LiveReport, LiveState, LiveStats};

/// A named stream of numbers: `source.field`, with optional tags and a unit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Series {
    /// `source.field`.
    pub name: String,
    /// Extra identifying labels (e.g. a sensor id of a table row).
    pub tags: Tags,
    /// The unit of the values, if known.
    pub unit: Option<String>,
}

/// Every series the agent has named, each once: see [`Series::shared`].
static SHARED: LazyLock<Mutex<HashSet<Arc<Series>>>> = LazyLock::new(Default::default);

impl Series {
    /// A series without tags.
    pub fn new(name: impl Into<String>, unit: Option<&str>) -> Series {
        Series {
            name: name.into(),
            tags: Tags::default(),
            unit: unit.map(str::to_owned),
        }
    }

    /// The agent's one copy of this series: the same `Arc` for equal series, whoever
    /// asks (a source naming it, the spool reader loading it for a sink, the marks read
    /// at start).
    ///
    /// Design: one table for the process rather than one per stage: at 10,000 pushed
    /// series the source's and the reader's copies were 7 MB apart. The table keeps
    /// every series it was given for the agent's life, as the sources' own tables and the
    /// reader's cache do anyway (a source's series are bounded by its `max_series`, the
    /// reader's by the spool).
    pub fn shared(self) -> Arc<Series> {
        let mut table = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = table.get(&self) {
            return Arc::clone(series);
        }
        let series = Arc::new(self);
        table.insert(Arc::clone(&series));
        series
    }
}

/// A series' tags: key and value pairs sorted by key, each key once; as a JSON object
/// they read as a map.
///
/// Design: a sorted vector holding exactly its pairs, not a `BTreeMap`, whose first
/// node holds room for eleven (544 bytes for one tag, at every series of a table or a
/// line-protocol source); the order, equality and hash are those of the map's.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tags(Vec<(String, String)>);

impl Tags {
    /// Sets `key` to `value` (replacing its value if the key is there).
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value) = (key.into(), value.into());
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
            Ok(at) => self.0[at].1 = value,
            Err(at) => {
                self.0.reserve_exact(1);
                self.0.insert(at, (key, value));
            }
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|at| &self.0[at].1)
    }

    /// The pairs, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// The values, in the order of their keys.
    pub fn values(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(_, v)| v)
    }

    /// How many tags.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes held on the heap: the pairs' room and their strings'.
    pub fn heap_bytes(&self) -> usize {
        self.0.capacity() * size_of::<(String, String)>()
            + self
                .0
                .iter()
                .map(|(k, v)| k.capacity() + v.capacity())
                .sum::<usize>()
    }
}

impl std::ops::Index<&str> for Tags {
    type Output = String;

    fn index(&self, key: &str) -> &String {
        self.get(key).expect("the tag is there")
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Tags {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Tags {
        let mut tags = Tags::default();
        for (k, v) in pairs {
            tags.insert(k, v);
        }
        tags
    }
}

impl std::fmt::Debug for Tags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Tags {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Tags {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Tags, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(deserializer)?;
        let mut pairs = Vec::with_capacity(map.len());
        pairs.extend(map);
        Ok(Tags(pairs))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(name: &str, pairs: &[(&str, &str)]) -> Series {
        let mut series = Series::new(name, Some("C"));
        for (k, v) in pairs {
            series.tags.insert(*k, *v);
        }
        series
    }

    #[test]
    fn tags_read_order_and_compare_as_the_map_they_replaced() {
        let pairs = [("site", "b"), ("id", "44071"), ("room", "a"), ("id", "7")];
        let tags: Tags = pairs.iter().copied().collect();
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(tags.len(), 3);
        assert_eq!(tags["id"], "7", "a key set again takes the new value");
        assert_eq!(tags.get("none"), None);
        let json = serde_json::to_string(&tags).expect("tags serialize");
        assert_eq!(json, serde_json::to_string(&map).expect("a map serializes"));
        assert_eq!(json, r#"{"id":"7","room":"a","site":"b"}"#);
        assert_eq!(format!("{tags:?}"), format!("{map:?}"));
        let back: Tags = serde_json::from_str(r#"{"site":"b","id":"7","room":"a"}"#)
            .expect("a JSON object of strings");
        assert_eq!(back, tags);
        assert!(tags.iter().map(|(k, _)| k).is_sorted());
        assert_eq!(
            tags.values().collect::<Vec<_>>(),
            map.values().collect::<Vec<_>>()
        );
        // Series sort as they did with a map of tags (the rows of a file are in this order).
        let sets: [&[(&str, &str)]; 5] = [
            &[],
            &[("a", "1")],
            &[("a", "1"), ("b", "0")],
            &[("a", "2")],
            &[("b", "")],
        ];
        for x in sets {
            for y in sets {
                let as_tags = tagged("s", x).cmp(&tagged("s", y));
                let as_maps = BTreeMap::from_iter(x.iter().copied())
                    .cmp(&BTreeMap::from_iter(y.iter().copied()));
                assert_eq!(as_tags, as_maps, "{x:?} against {y:?}");
            }
        }
    }

    #[test]
    fn a_series_with_one_tag_holds_its_strings_and_one_pair() {
        let (series, held) = crate::heap_tests::held_by(|| {
            Arc::new(tagged("listen.bench.value", &[("sensor", "s00042")]))
        });
        assert_eq!(series.tags.heap_bytes(), size_of::<(String, String)>() + 12);
        // The Arc and its series, the name, the unit, the pair and its two strings: a
        // map of tags took a 544-byte node for the one pair.
        let expected = 2 * size_of::<usize>()
            + size_of::<Series>()
            + "listen.bench.value".len()
            + "C".len()
            + series.tags.heap_bytes();
        assert_eq!(held, expected as isize);
    }

    #[test]
    fn equal_series_are_one_copy_whoever_names_them() {
        let pairs = [("sensor", "s-shared-1")];
        let from_source = tagged("push.m.v", &pairs).shared();
        let from_reader = tagged("push.m.v", &pairs).shared();
        assert!(Arc::ptr_eq(&from_source, &from_reader));
        let other = tagged("push.m.v", &[("sensor", "s-shared-2")]).shared();
        assert!(!Arc::ptr_eq(&from_source, &other));
        assert_eq!(other.tags["sensor"], "s-shared-2");
    }
}
