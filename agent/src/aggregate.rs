//! The aggregator: samples in, closed window rows out.
//!
//! Tumbling windows aligned to multiples of the window length since the Unix epoch, in
//! UTC. Per series and window: count, min, max, mean, sample standard deviation (n-1,
//! as pandas; none for a single sample), median (the mean of the middle two for an even
//! count), first and last (by sample time). Non-finite values are counted and dropped.
//!
//! [`Aggregator`] is pure: it takes `now` as an argument and does no I/O, so it is tested
//! without a runtime. [`AggregateTask`] drives it and hands closed windows to the spool,
//! one transaction per window length.
//!
//! A window closes [`SETTLE_MS`] after its end. A sample whose window was already flushed
//! still counts: it opens the window again and is flushed at the next flush as a late
//! row, never dropped.
//!
//! A reading is counted once (DESIGN.md, invariant 6): a sample on its device's clock whose
//! series and timestamp equal those of one already taken is a *repeat*, dropped (the
//! first value stays) and counted for its source, unless the source keeps repeats.
//! What is needed to tell: exact per open window (its accumulator keeps the timestamps
//! taken, beside the values), and in [`Readings`] the newest [`RECENT_READINGS`]
//! committed timestamps per series beyond, and each series' *mark* (its newest
//! committed device timestamp), which the spool keeps across restarts.
//!
//! Memory: a sample of an open window costs 8 bytes (its value), in room grown once to
//! the count of the series' previous window; the device timestamps, of an open window
//! and remembered, are runs of a fixed step: 16 bytes a run, one for a device that
//! stamps at a steady rate, and never more than 4 bytes a timestamp (see [`Recent`]).
//! Samples on the agent's own clock are never repeats.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use crate::clock::{self, ClockWatch};
use crate::flow::{
    AggregateCounts, Commit, CommitFailed, Flush, LiveLink, Sample, Sampled, Series, SourceStats,
    Stats, WindowRow,
};

/// How long after its end a window waits for samples still in flight.
pub const SETTLE_MS: i64 = 1_000;

/// Windows open at once, beyond which new series' samples are dropped (and counted).
pub const MAX_OPEN_WINDOWS: usize = 100_000;

/// Closed windows kept in memory while the spool cannot be written (a full disk), beyond
/// which the oldest are dropped (and counted).
pub const MAX_UNWRITTEN: usize = 100_000;

/// Samples held while the clock is not synchronised, beyond which the oldest are dropped
/// (and counted): 100 series at 1 Hz for about 17 minutes.
pub const MAX_HELD: usize = 100_000;

pub use crate::flow::MAX_VALUES_PER_WINDOW;

/// A compensated sum (Neumaier's variant of Kahan's): the running sum and what its
/// roundings left out, so that the result is as if summed in twice `f64`'s precision.
#[derive(Debug, Clone, Copy, Default)]
struct Sum {
    sum: f64,
    rest: f64,
}

impl Sum {
    fn add(&mut self, x: f64) {
        let (sum, rest) = crate::flow::two_sum(self.sum, x);
        self.sum = sum;
        self.rest += rest;
    }

    fn value(self) -> f64 {
        self.sum + self.rest
    }
}

/// Count, mean (with its rest, see [`Stats::mean_rest`]) and the sum of squared
/// deviations of some values.
#[derive(Debug, Clone, Copy)]
struct Moments {
    count: u64,
    mean: f64,
    mean_rest: f64,
    m2: f64,
}

impl Moments {
    /// Two passes over the values, with compensated sums: the mean (the sum to about
    /// twice `f64`'s precision, divided with its remainder), then the squared deviations
    /// from it.
    fn of(values: &[f64]) -> Moments {
        let n = values.len() as f64;
        let mut sum = Sum::default();
        values.iter().for_each(|&x| sum.add(x));
        let quotient = sum.value() / n;
        // What the quotient leaves of the sum: the fused multiply-add rounds only once.
        let remainder = (-quotient).mul_add(n, sum.sum) + sum.rest;
        let (mean, mean_rest) = crate::flow::two_sum(quotient, remainder / n);
        let (mut d1, mut d2) = (Sum::default(), Sum::default());
        for &x in values {
            let d = (x - mean) - mean_rest;
            d1.add(d);
            d2.add(d * d);
        }
        let d1 = d1.value();
        Moments {
            count: values.len() as u64,
            mean,
            mean_rest,
            m2: (d2.value() - d1 * d1 / n).max(0.0),
        }
    }

    /// Both sets of values together (the pooled sum of squares, around `self`'s mean).
    fn pool(self, other: Moments) -> Moments {
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let delta = (other.mean - self.mean) + (other.mean_rest - self.mean_rest);
        let (mean, mean_rest) = crate::flow::two_sum(self.mean, self.mean_rest + delta * (nb / n));
        Moments {
            count: self.count + other.count,
            mean,
            mean_rest,
            m2: self.m2 + other.m2 + delta * delta * (na * nb / n),
        }
    }
}

/// Device timestamps remembered per open window to tell repeats, as many as the values
/// kept for the median; beyond them a window's further samples are taken unchecked (a
/// repeat among them counts twice: nothing is dropped that was not known to be taken).
pub const MAX_READINGS_PER_WINDOW: usize = MAX_VALUES_PER_WINDOW;

/// Device timestamps of flushed windows remembered per series (the newest): a sample
/// of a flushed window with one of them is a repeat; one older than all of them, when
/// the series has this many, is taken (a late row).
pub const RECENT_READINGS: usize = 128;

/// Sorted device timestamps (ms) in little room: offsets from a base in 32 bits while
/// they span less than about 49 days (a series' recent readings do), full otherwise.
#[derive(Debug, Clone)]
enum Stamps {
    Narrow { base: i64, offsets: Vec<u32> },
    Wide(Vec<i64>),
}

impl Default for Stamps {
    fn default() -> Stamps {
        Stamps::Narrow {
            base: 0,
            offsets: Vec::new(),
        }
    }
}

impl Stamps {
    fn len(&self) -> usize {
        match self {
            Stamps::Narrow { offsets, .. } => offsets.len(),
            Stamps::Wide(all) => all.len(),
        }
    }

    /// Where `t` is, or would be inserted to keep the order.
    fn search(&self, t: i64) -> Result<usize, usize> {
        match self {
            Stamps::Narrow { base, offsets } => match u32::try_from(t - base) {
                Ok(offset) => offsets.binary_search(&offset),
                Err(_) if t < *base => Err(0),
                Err(_) => Err(offsets.len()),
            },
            Stamps::Wide(all) => all.binary_search(&t),
        }
    }

    /// Inserts `t` at `at` (from [`Stamps::search`]), widening the base or the
    /// representation when `t` does not fit.
    fn insert(&mut self, at: usize, t: i64) {
        if let Stamps::Narrow { base, offsets } = self {
            if offsets.is_empty() {
                *base = t;
            }
            if let Ok(offset) = u32::try_from(t - *base) {
                offsets.insert(at, offset);
                return;
            }
            let newest = offsets.last().map_or(t, |&o| *base + i64::from(o)).max(t);
            let oldest = (*base).min(t);
            if u32::try_from(newest - oldest).is_ok() {
                // Rebased on the oldest: every offset stays exact.
                let shift = (*base - oldest) as u32;
                offsets.iter_mut().for_each(|o| *o += shift);
                *base = oldest;
                offsets.insert(at, (t - oldest) as u32);
                return;
            }
            let all: Vec<i64> = offsets.iter().map(|&o| *base + i64::from(o)).collect();
            *self = Stamps::Wide(all);
        }
        if let Stamps::Wide(all) = self {
            all.insert(at, t);
        }
    }

    /// The oldest.
    fn first(&self) -> Option<i64> {
        match self {
            Stamps::Narrow { base, offsets } => offsets.first().map(|&o| *base + i64::from(o)),
            Stamps::Wide(all) => all.first().copied(),
        }
    }

    /// Each, oldest first.
    fn for_each(&self, mut f: impl FnMut(i64)) {
        match self {
            Stamps::Narrow { base, offsets } => {
                offsets.iter().for_each(|&o| f(*base + i64::from(o)));
            }
            Stamps::Wide(all) => all.iter().copied().for_each(f),
        }
    }

    /// Bytes held on the heap.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        match self {
            Stamps::Narrow { offsets, .. } => offsets.capacity() * size_of::<u32>(),
            Stamps::Wide(all) => all.capacity() * size_of::<i64>(),
        }
    }

    fn remove_first(&mut self) {
        match self {
            Stamps::Narrow { offsets, .. } => {
                offsets.remove(0);
            }
            Stamps::Wide(all) => {
                all.remove(0);
            }
        }
    }
}

/// Device timestamps a fixed step apart: `first`, `first + step`, … (`count` of them;
/// `step` means nothing while `count` is 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: i64,
    step: u32,
    count: u32,
}

impl Run {
    fn last(&self) -> i64 {
        self.first + i64::from(self.step) * i64::from(self.count - 1)
    }

    /// Takes `t` (not in the run) at its end or its start when it is a step away (any
    /// step for a run of one); `false` when it does not fit.
    fn join(&mut self, t: i64) -> bool {
        let gap = if t > self.last() {
            t - self.last()
        } else if t < self.first {
            self.first - t
        } else {
            return false;
        };
        let fits = if self.count == 1 {
            u32::try_from(gap).is_ok_and(|step| {
                self.step = step;
                true
            })
        } else {
            gap == i64::from(self.step)
        };
        if fits {
            self.first = self.first.min(t);
            self.count += 1;
        }
        fits
    }

    fn has(&self, t: i64) -> bool {
        t == self.first
            || (self.count > 1
                && self.step > 0
                && t > self.first
                && t <= self.last()
                && (t - self.first) % i64::from(self.step) == 0)
    }
}

/// Runs a set of `len` timestamps may take before they are kept one by one: no more
/// bytes than their offsets of 4 bytes would take (two runs at least).
fn max_runs(len: usize) -> usize {
    (len * size_of::<u32>() / size_of::<Run>()).max(2)
}

/// Device timestamps (a sorted set): as arithmetic runs while they fall on few of them,
/// one by one ([`Stamps`]) once they do not. A series' remembered readings, and those
/// taken in an open window (as offsets from its start).
///
/// Design: a device that stamps its readings at a steady rate gives one run, held in
/// place (nothing on the heap for the newest 128 readings, not 512 bytes; for a 60 s
/// window at 1 Hz, not 240); one whose
/// stamps jitter takes at most what the offsets would, then is kept as offsets. Either
/// way the set is exact.
#[derive(Debug, Clone)]
enum Recent {
    /// One run, in place (the steady case: nothing on the heap).
    One(Run),
    Runs {
        runs: Vec<Run>,
        len: usize,
    },
    Each(Stamps),
}

impl Default for Recent {
    fn default() -> Recent {
        Recent::Runs {
            runs: Vec::new(),
            len: 0,
        }
    }
}

impl Recent {
    fn len(&self) -> usize {
        match self {
            Recent::One(run) => run.count as usize,
            Recent::Runs { len, .. } => *len,
            Recent::Each(stamps) => stamps.len(),
        }
    }

    fn contains(&self, t: i64) -> bool {
        match self {
            Recent::Runs { runs, .. } => {
                let after = runs.partition_point(|r| r.first <= t);
                after > 0 && runs[after - 1].has(t)
            }
            Recent::Each(stamps) => stamps.search(t).is_ok(),
            Recent::One(run) => run.has(t),
        }
    }

    /// The oldest.
    fn first(&self) -> Option<i64> {
        match self {
            Recent::One(run) => Some(run.first),
            Recent::Runs { runs, .. } => runs.first().map(|r| r.first),
            Recent::Each(stamps) => stamps.first(),
        }
    }

    /// Adds `t`, which is not there yet.
    fn insert(&mut self, t: i64) {
        match self {
            Recent::Each(stamps) => {
                if let Err(at) = stamps.search(t) {
                    stamps.insert(at, t);
                }
            }
            Recent::One(run) => {
                if !run.join(t) {
                    let mut runs = vec![*run];
                    add_to_runs(&mut runs, t);
                    let len = runs.iter().map(|r| r.count as usize).sum();
                    *self = Recent::Runs { runs, len };
                }
            }
            Recent::Runs { runs, len: 0 } => {
                debug_assert!(runs.is_empty());
                *self = Recent::One(Run {
                    first: t,
                    step: 0,
                    count: 1,
                });
            }
            Recent::Runs { runs, len } => {
                *len += 1;
                add_to_runs(runs, t);
                if runs.len() > max_runs(*len) {
                    let mut stamps = Stamps::default();
                    for run in runs.iter() {
                        for i in 0..run.count {
                            let at = stamps.len();
                            stamps.insert(at, run.first + i64::from(run.step) * i64::from(i));
                        }
                    }
                    *self = Recent::Each(stamps);
                }
            }
        }
    }

    /// Each, oldest first.
    fn for_each(&self, mut f: impl FnMut(i64)) {
        match self {
            Recent::One(run) => {
                (0..run.count).for_each(|i| f(run.first + i64::from(run.step) * i64::from(i)));
            }
            Recent::Runs { runs, .. } => {
                for run in runs {
                    (0..run.count).for_each(|i| f(run.first + i64::from(run.step) * i64::from(i)));
                }
            }
            Recent::Each(stamps) => stamps.for_each(f),
        }
    }

    /// The newest.
    fn last(&self) -> Option<i64> {
        match self {
            Recent::One(run) => Some(run.last()),
            Recent::Runs { runs, .. } => runs.last().map(Run::last),
            Recent::Each(stamps) => {
                let mut last = None;
                stamps.for_each(|t| last = Some(t));
                last
            }
        }
    }

    fn remove_first(&mut self) {
        match self {
            Recent::One(run) if run.count == 1 => *self = Recent::default(),
            Recent::One(run) => {
                run.first += i64::from(run.step);
                run.count -= 1;
            }
            Recent::Runs { runs, len } => {
                let Some(run) = runs.first_mut() else {
                    return;
                };
                *len -= 1;
                if run.count == 1 {
                    runs.remove(0);
                } else {
                    run.first += i64::from(run.step);
                    run.count -= 1;
                }
            }
            Recent::Each(stamps) => stamps.remove_first(),
        }
    }

    /// Bytes held on the heap.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        match self {
            Recent::One(_) => 0,
            Recent::Runs { runs, .. } => runs.capacity() * size_of::<Run>(),
            Recent::Each(stamps) => stamps.heap_bytes(),
        }
    }
}

/// Adds `t` (not in any run) to sorted, disjoint runs: at the end of the run before it
/// or the start of the one after it when it is a step away, else as a run of its own
/// (splitting the run it falls inside).
fn add_to_runs(runs: &mut Vec<Run>, t: i64) {
    let at = runs.partition_point(|r| r.first < t);
    if at > 0 {
        let before = runs[at - 1];
        if t < before.last() {
            let step = i64::from(before.step);
            let low = ((t - before.first) / step) as u32 + 1;
            runs[at - 1].count = low;
            let high = Run {
                first: before.first + step * i64::from(low),
                step: before.step,
                count: before.count - low,
            };
            let single = Run {
                first: t,
                step: 0,
                count: 1,
            };
            reserve_runs(runs, 2);
            runs.splice(at..at, [single, high]);
            return;
        }
        if runs[at - 1].join(t) {
            return;
        }
    }
    if runs.get_mut(at).is_some_and(|run| run.join(t)) {
        return;
    }
    reserve_runs(runs, 1);
    runs.insert(
        at,
        Run {
            first: t,
            step: 0,
            count: 1,
        },
    );
}

/// Room for `more` runs: exactly while there are few (a steady series has one), then
/// doubling.
fn reserve_runs(runs: &mut Vec<Run>, more: usize) {
    if runs.capacity() - runs.len() >= more {
        return;
    }
    let want = if runs.len() < 2 {
        more
    } else {
        runs.len().max(more)
    };
    runs.reserve_exact(want);
}

/// The device timestamps taken of one series. Those of its open windows are kept by
/// their [`Accumulator`]s.
#[derive(Debug, Default)]
struct Readings {
    /// The newest device timestamps of flushed windows, at most [`RECENT_READINGS`],
    /// sorted. After a restart, the mark alone.
    committed: Recent,
    /// The newest device timestamp committed: the mark the spool has (or is given with
    /// the next flush).
    mark: Option<i64>,
}

impl Readings {
    /// Whether `timestamp_ms` was taken in a flushed window.
    fn has(&self, timestamp_ms: i64) -> bool {
        self.committed.contains(timestamp_ms)
    }

    /// Moves the timestamps of the window at `start`, flushed, to the committed ones;
    /// returns the series' new mark if the window moved it on (a late row's older
    /// readings do not).
    fn commit(&mut self, start: i64, offsets: &Recent) -> Option<i64> {
        let newest = offsets.last().map(|o| start * 1000 + o);
        offsets.for_each(|offset| self.remember(start * 1000 + offset));
        let newest = newest.filter(|&n| self.mark.is_none_or(|m| n > m))?;
        self.mark = Some(newest);
        Some(newest)
    }

    /// Remembers one committed timestamp, keeping the newest [`RECENT_READINGS`].
    fn remember(&mut self, timestamp_ms: i64) {
        if self.committed.contains(timestamp_ms) {
            return;
        }
        if self.committed.len() >= RECENT_READINGS {
            if self
                .committed
                .first()
                .is_some_and(|oldest| timestamp_ms < oldest)
            {
                return;
            }
            self.committed.remove_first();
        }
        self.committed.insert(timestamp_ms);
    }
}

/// What became of a sample given to [`Aggregator::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Taken into its window (or counted by the aggregator: non-finite, overflow).
    Taken,
    /// A repeat of a reading already taken: dropped, for the caller to count.
    Repeat,
}

/// Values beyond the cap: compensated sums of their deviations from `shift` (the mean of
/// the kept values) and of the squares of those.
#[derive(Debug, Clone, Copy)]
struct Tail {
    shift: (f64, f64),
    count: u64,
    d1: Sum,
    d2: Sum,
}

impl Tail {
    fn add(&mut self, x: f64) {
        let d = (x - self.shift.0) - self.shift.1;
        self.count += 1;
        self.d1.add(d);
        self.d2.add(d * d);
    }

    fn moments(self) -> Moments {
        let n = self.count as f64;
        let d1 = self.d1.value();
        let (mean, rest) = crate::flow::two_sum(self.shift.0, self.shift.1 + d1 / n);
        Moments {
            count: self.count,
            mean,
            mean_rest: rest,
            m2: (self.d2.value() - d1 * d1 / n).max(0.0),
        }
    }
}

/// Running aggregates of one open window.
///
/// Design: mean and standard deviation come from the kept values at the end, in two
/// passes with compensated sums (Welford's running update loses about half the digits of
/// the standard deviation on values near 1.7e9 that differ by hundredths). Values beyond
/// the cap are summed around the kept values' mean and pooled with them.
#[derive(Debug, Clone)]
struct Accumulator {
    count: u64,
    min: f64,
    max: f64,
    first: (i64, f64),
    last: (i64, f64),
    values: Vec<f64>,
    /// The device timestamps taken (of sources checked for repeats), as ms from the
    /// window's start; at most [`MAX_READINGS_PER_WINDOW`].
    stamps: Recent,
    /// Once the cap is reached: the values beyond it (boxed: few windows reach it).
    tail: Option<Box<Tail>>,
    /// The values the series' previous window kept: the room `values`
    /// grow to at once (see [`grow`]).
    expect: usize,
}

/// Makes room for one more item: a small start, then at once the `expect`ed length (the
/// series' previous window), then doubling as usual beyond it.
///
/// Design: exact room at a steady rate (60 values, not 64), allocated once; the start
/// is small because around a window's end the next window opens while this one is still
/// full, and the closing window's storage is what the next one grows into.
fn grow<T>(items: &mut Vec<T>, expect: usize) {
    const START: usize = 4;
    let (len, capacity) = (items.len(), items.capacity());
    if len < capacity {
        return;
    }
    let want = if capacity < START {
        START.min(expect.max(1))
    } else if len < expect {
        expect
    } else {
        2 * len
    };
    items.reserve_exact(want - len);
}

impl Accumulator {
    /// A window's first value, with room for `expect` values (the series' previous
    /// window kept as many: at a steady rate the storage is allocated once, exactly).
    fn new(timestamp_ms: i64, value: f64, expect: usize) -> Accumulator {
        let mut values = Vec::new();
        grow(&mut values, expect);
        values.push(value);
        Accumulator {
            count: 1,
            min: value,
            max: value,
            first: (timestamp_ms, value),
            last: (timestamp_ms, value),
            values,
            stamps: Recent::default(),
            tail: None,
            expect,
        }
    }

    /// Whether the device timestamp `offset` (ms from the window's start) was taken.
    fn has(&self, offset: u32) -> bool {
        self.stamps.contains(i64::from(offset))
    }

    /// Notes a device timestamp taken (ms from the window's start), with room for as
    /// many as values are kept.
    fn note(&mut self, offset: u32) {
        if self.stamps.len() >= MAX_READINGS_PER_WINDOW {
            return;
        }
        if !self.stamps.contains(i64::from(offset)) {
            self.stamps.insert(i64::from(offset));
        }
    }

    /// Bytes held on the heap by this window's kept values and timestamps.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.values.capacity() * size_of::<f64>()
            + self.stamps.heap_bytes()
            + self.tail.as_ref().map_or(0, |_| size_of::<Tail>())
    }

    /// Adds a value; `true` when this is the first one beyond `cap` (the window is
    /// capped from now on).
    fn add(&mut self, timestamp_ms: i64, value: f64, cap: usize) -> bool {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        if timestamp_ms < self.first.0 {
            self.first = (timestamp_ms, value);
        }
        if timestamp_ms >= self.last.0 {
            self.last = (timestamp_ms, value);
        }
        if self.values.len() < cap {
            grow(&mut self.values, self.expect);
            self.values.push(value);
            return false;
        }
        let capped = self.tail.is_none();
        let tail = self.tail.get_or_insert_with(|| {
            let kept = Moments::of(&self.values);
            Box::new(Tail {
                shift: (kept.mean, kept.mean_rest),
                count: 0,
                d1: Sum::default(),
                d2: Sum::default(),
            })
        });
        tail.add(value);
        capped
    }

    fn finish(mut self) -> Stats {
        let mut moments = Moments::of(&self.values);
        if let Some(tail) = self.tail {
            moments = moments.pool((*tail).moments());
        }
        let stdev = (self.count > 1).then(|| (moments.m2 / (self.count - 1) as f64).sqrt());
        Stats {
            count: self.count,
            min: self.min,
            max: self.max,
            mean: moments.mean,
            mean_rest: moments.mean_rest,
            stdev,
            median: median(&mut self.values),
            first: self.first.1,
            first_ms: self.first.0,
            last: self.last.1,
            last_ms: self.last.0,
        }
    }
}

/// The median of finite values (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let mid = n / 2;
    let (_, upper, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        upper
    } else {
        let lower = values[..mid]
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        (lower + upper) / 2.0
    }
}

/// What the aggregator keeps of a series' flushed windows.
#[derive(Debug, Clone, Copy)]
struct Flushed {
    /// The latest window start flushed.
    start: i64,
    /// The values the window flushed last kept.
    kept: usize,
}

/// The open windows of every series.
#[derive(Debug)]
pub struct Aggregator {
    window_ms: i64,
    /// The open windows by start (seconds), each with its series' accumulators.
    // Design: a table per window rather than one keyed by series and start: around a
    // window's end both it and the next are open, and one table would stay sized for
    // twice the series; a window's own table is freed whole when it is flushed.
    open: BTreeMap<i64, HashMap<Arc<Series>, Accumulator>>,
    /// How many windows `open` holds, over all starts.
    open_count: usize,
    /// The newest window flushed (its start) and its series: the room the table of a
    /// window after it starts with (a late row's table starts small).
    last_window: (i64, usize),
    /// Per series: the latest window start flushed (a sample at or before it is late)
    /// and the values its window kept (the room the next window starts with).
    flushed: HashMap<Arc<Series>, Flushed>,
    /// Device timestamps taken, per series with device-stamped samples.
    readings: HashMap<Arc<Series>, Readings>,
    /// Marks advanced since the last [`Aggregator::take_marks`].
    marks: HashMap<Arc<Series>, i64>,
    counts: AggregateCounts,
    /// Values kept per window ([`MAX_VALUES_PER_WINDOW`]; smaller in tests).
    values_cap: usize,
}

impl Aggregator {
    /// An aggregator of `window_seconds`-long windows.
    pub fn new(window_seconds: u32) -> Aggregator {
        Aggregator {
            window_ms: i64::from(window_seconds) * 1000,
            open: BTreeMap::new(),
            open_count: 0,
            last_window: (i64::MIN, 0),
            flushed: HashMap::new(),
            readings: HashMap::new(),
            marks: HashMap::new(),
            counts: AggregateCounts::default(),
            values_cap: MAX_VALUES_PER_WINDOW,
        }
    }

    /// An aggregator that keeps at most `cap` values per window for the median.
    #[cfg(test)]
    pub(crate) fn with_values_cap(window_seconds: u32, cap: usize) -> Aggregator {
        Aggregator {
            values_cap: cap.max(1),
            ..Aggregator::new(window_seconds)
        }
    }

    /// Takes in the marks the spool kept (each series' newest committed device
    /// timestamp): a sample with a series' mark is a repeat after a restart too.
    pub fn restore_marks(&mut self, marks: impl IntoIterator<Item = (Series, i64)>) {
        for (series, mark) in marks {
            let readings = self.readings.entry(series.shared()).or_default();
            readings.remember(mark);
            readings.mark = readings.mark.max(Some(mark));
        }
    }

    /// The marks advanced since the last call (series whose flushed windows held
    /// device-stamped samples, with their newest committed device timestamp).
    pub fn take_marks(&mut self) -> Vec<(Arc<Series>, i64)> {
        // Taken whole, not drained: a drained table keeps its room (16 bytes a series)
        // until the next flush refills it.
        let mut marks: Vec<_> = std::mem::take(&mut self.marks).into_iter().collect();
        marks.sort();
        marks
    }

    /// Adds one sample to its window. A sample on the agent's own clock never reopens a
    /// window already written: after the clock went back, it moves to the window after
    /// the last one written for its series (counted), so a jump creates no second row
    /// for a window. A device's own timestamp is kept as it is (a late row), unless it
    /// repeats a reading already taken ([`Pushed::Repeat`]).
    pub fn push(&mut self, sample: Sample) -> Pushed {
        self.push_from(sample, false)
    }

    /// [`Aggregator::push`] for a source that keeps repeats or not (`repeats = "keep"`).
    pub fn push_from(&mut self, mut sample: Sample, keep_repeats: bool) -> Pushed {
        let mut start = sample.timestamp_ms.div_euclid(self.window_ms) * self.window_ms / 1000;
        let checked = !sample.own_clock && !keep_repeats;
        if checked && self.is_repeat(&sample.series, start, sample.timestamp_ms) {
            return Pushed::Repeat;
        }
        self.counts.samples += 1;
        if !sample.value.is_finite() {
            self.counts.non_finite += 1;
            return Pushed::Taken;
        }
        let flushed = self.flushed.get(&sample.series).copied();
        if let Some(last) = flushed
            && start <= last.start
        {
            if sample.own_clock {
                start = last.start + self.window_ms / 1000;
                sample.timestamp_ms = start * 1000;
                self.counts.clamped += 1;
            } else {
                self.counts.late += 1;
            }
        }
        let full = self.open_count >= MAX_OPEN_WINDOWS;
        let room = if start > self.last_window.0 {
            self.last_window.1
        } else {
            0
        };
        let window = self
            .open
            .entry(start)
            .or_insert_with(|| HashMap::with_capacity(room));
        let acc = if let Some(acc) = window.get_mut(&sample.series) {
            if acc.add(sample.timestamp_ms, sample.value, self.values_cap) {
                self.counts.capped += 1;
            }
            acc
        } else if full {
            if window.is_empty() {
                self.open.remove(&start);
            }
            self.counts.overflow += 1;
            return Pushed::Taken;
        } else {
            self.open_count += 1;
            let expect = flushed.map_or(1, |f| f.kept).min(self.values_cap);
            window.entry(sample.series).or_insert(Accumulator::new(
                sample.timestamp_ms,
                sample.value,
                expect,
            ))
        };
        if checked {
            acc.note((sample.timestamp_ms - start * 1000) as u32);
        }
        Pushed::Taken
    }

    /// Whether a device-stamped reading of `series` at `timestamp_ms` (in the window at
    /// `start`) was taken already.
    fn is_repeat(&self, series: &Arc<Series>, start: i64, timestamp_ms: i64) -> bool {
        self.open
            .get(&start)
            .and_then(|window| window.get(series))
            .is_some_and(|acc| acc.has((timestamp_ms - start * 1000) as u32))
            || self
                .readings
                .get(series)
                .is_some_and(|r| r.has(timestamp_ms))
    }

    /// Removes and returns every window that has closed by `now_ms`, ordered by start
    /// and series.
    pub fn take_closed(&mut self, now_ms: i64) -> Vec<WindowRow> {
        let window_ms = self.window_ms;
        let closed = |start: i64| start * 1000 + window_ms + SETTLE_MS <= now_ms;
        let mut windows = Vec::new();
        while let Some(entry) = self.open.first_entry() {
            if !closed(*entry.key()) {
                break;
            }
            windows.push(entry.remove_entry());
        }
        self.finish(windows)
    }

    /// Removes and returns every open window, closed or not (at shutdown).
    pub fn take_all(&mut self) -> Vec<WindowRow> {
        let windows = std::mem::take(&mut self.open).into_iter().collect();
        self.finish(windows)
    }

    /// The counters since the last call, resetting them.
    pub fn take_counts(&mut self) -> AggregateCounts {
        std::mem::take(&mut self.counts)
    }

    /// How many windows are open.
    pub fn open_windows(&self) -> usize {
        self.open_count
    }

    /// Bytes the open windows hold on the heap for their kept values and timestamps,
    /// and how many values they keep.
    #[cfg(test)]
    fn kept_heap(&self) -> (usize, usize) {
        self.open
            .values()
            .flat_map(|w| w.values())
            .fold((0, 0), |(bytes, kept), acc| {
                (bytes + acc.heap_bytes(), kept + acc.values.len())
            })
    }

    fn finish(&mut self, windows: Vec<(i64, HashMap<Arc<Series>, Accumulator>)>) -> Vec<WindowRow> {
        let seconds = (self.window_ms / 1000) as u32;
        let mut rows = Vec::with_capacity(windows.iter().map(|(_, w)| w.len()).sum());
        for (start, window) in windows {
            self.open_count -= window.len();
            if start >= self.last_window.0 {
                self.last_window = (start, window.len());
            }
            for (series, acc) in window {
                let kept = acc.values.len();
                let last = self
                    .flushed
                    .entry(Arc::clone(&series))
                    .or_insert(Flushed { start, kept });
                if start >= last.start {
                    *last = Flushed { start, kept };
                }
                let newest = (acc.stamps.len() > 0)
                    .then(|| self.readings.entry(Arc::clone(&series)).or_default())
                    .and_then(|r| r.commit(start, &acc.stamps));
                if let Some(newest) = newest {
                    let mark = self.marks.entry(Arc::clone(&series)).or_insert(newest);
                    *mark = (*mark).max(newest);
                }
                rows.push(WindowRow {
                    series,
                    start,
                    seconds,
                    stats: acc.finish(),
                });
            }
        }
        rows.sort_by(|a, b| (a.start, &a.series).cmp(&(b.start, &b.series)));
        rows
    }
}

/// The stage that owns the aggregator: receives samples, flushes closed windows to the
/// spool once per window length, and everything on shutdown. While the clock is not
/// synchronised it holds the samples the agent stamped (see [`ClockWatch`]) and stamps
/// them once it is, by how long ago they were taken.
pub struct AggregateTask {
    aggregator: Aggregator,
    clock: ClockWatch,
    held: VecDeque<Sampled>,
    held_samples: usize,
    samples: mpsc::Receiver<Sampled>,
    spool: Box<dyn Commit>,
    sources: Vec<Arc<SourceStats>>,
    live: Vec<LiveLink>,
    /// A flush the spool could not commit, tried again with the next one.
    unwritten: Option<Flush>,
    shutdown: watch::Receiver<bool>,
}

impl AggregateTask {
    /// Wires the aggregator between the sources' channel and the spool.
    pub fn new(
        window_seconds: u32,
        clock: ClockWatch,
        samples: mpsc::Receiver<Sampled>,
        spool: Box<dyn Commit>,
        sources: Vec<Arc<SourceStats>>,
        live: Vec<LiveLink>,
        shutdown: watch::Receiver<bool>,
    ) -> AggregateTask {
        AggregateTask {
            aggregator: Aggregator::new(window_seconds),
            clock,
            held: VecDeque::new(),
            held_samples: 0,
            samples,
            spool,
            sources,
            live,
            unwritten: None,
            shutdown,
        }
    }

    /// Runs until shutdown, then flushes every open window.
    pub async fn run(mut self) {
        let window_ms = self.aggregator.window_ms;
        loop {
            let wait = next_flush_in(clock::now_ms(), window_ms);
            tokio::select! {
                batch = self.samples.recv() => match batch {
                    Some(batch) => self.take(batch),
                    None => break,
                },
                _ = tokio::time::sleep(wait) => {
                    if !self.clock.holding(clock::synchronised) {
                        self.release();
                    }
                    let now = clock::now_ms();
                    let rows = self.aggregator.take_closed(now);
                    self.flush(rows, now).await;
                }
                _ = self.shutdown.changed() => break,
            }
        }
        // Take what the sources already sent, then everything still open; samples still
        // held for the clock are stamped by it as it is.
        while let Ok(batch) = self.samples.try_recv() {
            self.take(batch);
        }
        if !self.held.is_empty() {
            tracing::warn!(
                samples = self.held_samples,
                "stopping before the clock was synchronised: held samples stamped by the clock as it is"
            );
            self.release();
        }
        let rows = self.aggregator.take_all();
        let count = rows.len();
        self.flush(rows, clock::now_ms()).await;
        info!(rows = count, "flushed open windows at shutdown");
    }

    /// Takes one sampling in: the device's timestamps as they are; the agent's own
    /// stamps now, or held while the clock is not synchronised.
    fn take(&mut self, mut batch: Sampled) {
        self.clock.observe(batch.now_ms, batch.at);
        let keep = batch.keep_repeats;
        if !self.clock.holding(clock::synchronised) {
            self.release();
            let samples = std::mem::take(&mut batch.samples);
            self.push_counted(samples, keep, batch.source.as_deref());
            return;
        }
        let (own, device): (Vec<Sample>, Vec<Sample>) =
            batch.samples.drain(..).partition(|s| s.own_clock);
        self.push_counted(device, keep, batch.source.as_deref());
        self.held_samples += own.len();
        batch.samples = own;
        self.held.push_back(batch);
        while self.held_samples > MAX_HELD {
            let Some(oldest) = self.held.pop_front() else {
                break;
            };
            self.held_samples -= oldest.samples.len();
            self.aggregator.counts.held_dropped += oldest.samples.len() as u64;
        }
    }

    /// Pushes one source's samples, counting the repeats dropped for it.
    fn push_counted(&mut self, samples: Vec<Sample>, keep: bool, source: Option<&SourceStats>) {
        let mut repeats = 0;
        for sample in samples {
            if self.aggregator.push_from(sample, keep) == Pushed::Repeat {
                repeats += 1;
            }
        }
        if let Some(source) = source.filter(|_| repeats > 0) {
            source.count_repeats(repeats as u64);
        }
    }

    /// Starts from the marks the spool kept (see [`Aggregator::restore_marks`]).
    pub fn restore_marks(mut self, marks: impl IntoIterator<Item = (Series, i64)>) -> Self {
        self.aggregator.restore_marks(marks);
        self
    }

    /// Stamps the held samples by the clock now: each sampling moves to now less how
    /// long ago it was taken (by the monotonic clock), its samples with it.
    fn release(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let (now_ms, now) = (clock::now_ms(), std::time::Instant::now());
        for batch in std::mem::take(&mut self.held) {
            let taken = now_ms - now.saturating_duration_since(batch.at).as_millis() as i64;
            let shift = taken - batch.now_ms;
            for mut sample in batch.samples {
                sample.timestamp_ms += shift;
                // The agent's own stamps: never repeats.
                self.aggregator.push(sample);
            }
        }
        self.held_samples = 0;
    }

    /// Commits closed windows, then hands them to the live feeds. When the spool cannot
    /// be written (a full disk), the flush is kept and committed with the next one.
    async fn flush(&mut self, rows: Vec<WindowRow>, now_ms: i64) {
        let mut flush = Flush {
            rows,
            now_ms,
            aggregate: self.aggregator.take_counts(),
            sources: self
                .sources
                .iter()
                .map(|s| (Arc::clone(s), s.take_deltas()))
                .collect(),
            open_windows: self.aggregator.open_windows(),
            live: self.live.iter().map(|l| l.stats.report()).collect(),
            clock: self.clock.report(self.held_samples as u64),
            marks: self.aggregator.take_marks(),
        };
        let retried = self.unwritten.is_some();
        if let Some(mut pending) = self.unwritten.take() {
            pending.absorb(flush);
            flush = pending;
        }
        let for_feeds =
            (!self.live.is_empty() && !flush.rows.is_empty()).then(|| Arc::new(flush.rows.clone()));
        let rows = flush.rows.len();
        match self.spool.commit(flush).await {
            Ok(()) => {
                if retried {
                    info!(rows, "the spool is writable again: kept windows committed");
                }
                for link in &self.live {
                    for_feeds.iter().for_each(|rows| link.send(rows));
                }
            }
            Err(CommitFailed {
                error: err,
                flush: Some(mut flush),
            }) => {
                let lost = flush.keep_newest(MAX_UNWRITTEN);
                flush.aggregate.lost += lost as u64;
                error!(
                    error = %err,
                    kept = flush.rows.len(),
                    lost,
                    "spool commit failed: windows kept in memory and tried again at the next flush"
                );
                self.unwritten = Some(flush);
            }
            Err(CommitFailed {
                error: err,
                flush: None,
            }) => {
                error!(error = %err, rows, "spool commit failed: these windows are lost")
            }
        }
    }
}

/// Time until the next flush: window boundaries plus [`SETTLE_MS`].
fn next_flush_in(now_ms: i64, window_ms: i64) -> Duration {
    let phase = (now_ms - SETTLE_MS).rem_euclid(window_ms);
    Duration::from_millis((window_ms - phase) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_statistics_equal_those_of_all_the_samples() {
        let a = Stats {
            count: 3,
            min: 1.0,
            max: 3.0,
            mean: 2.0,
            stdev: Some(1.0),
            median: 2.0,
            first: 1.0,
            last: 3.0,
            ..Stats::single_at(0.0, 10)
        };
        let b = Stats {
            count: 2,
            min: 4.0,
            max: 5.0,
            mean: 4.5,
            stdev: Some(std::f64::consts::FRAC_1_SQRT_2),
            median: 4.5,
            first: 4.0,
            last: 5.0,
            ..Stats::single_at(0.0, 20)
        };
        let m = a.merge(&b);
        assert_eq!((m.count, m.min, m.max, m.mean), (5, 1.0, 5.0, 3.0));
        assert!((m.stdev.expect("n > 1") - 2.5_f64.sqrt()).abs() < 1e-12);
        assert_eq!((m.first, m.last), (1.0, 5.0));
        let one = Stats {
            count: 1,
            stdev: None,
            ..a.clone()
        };
        let two = one.merge(&one);
        assert_eq!((two.count, two.stdev), (2, Some(0.0)));
    }

    fn sample(series: &Arc<Series>, timestamp_ms: i64, value: f64) -> Sample {
        Sample {
            series: Arc::clone(series),
            timestamp_ms,
            value,
            own_clock: false,
        }
    }

    fn own(series: &Arc<Series>, timestamp_ms: i64, value: f64) -> Sample {
        Sample {
            own_clock: true,
            ..sample(series, timestamp_ms, value)
        }
    }

    fn stats_of(values: &[f64]) -> Stats {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(60);
        for (i, v) in values.iter().enumerate() {
            agg.push(sample(&series, i as i64, *v));
        }
        let mut rows = agg.take_closed(i64::MAX / 2);
        assert_eq!(rows.len(), 1, "one window");
        rows.remove(0).stats
    }

    #[test]
    fn the_agents_own_stamps_never_reopen_a_written_window() {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(60);
        for t in [0, 20_000, 40_000] {
            agg.push(own(&series, t, 1.0));
        }
        let first = agg.take_closed(61_000);
        assert_eq!(first.len(), 1);
        // The clock goes back 30 s: the agent's stamps land in the next window instead.
        agg.push(own(&series, 35_000, 2.0));
        agg.push(own(&series, 70_000, 3.0));
        let counts = agg.take_counts();
        assert_eq!((counts.clamped, counts.late), (1, 0));
        let second = agg.take_closed(121_000);
        assert_eq!(second.len(), 1);
        assert_eq!((second[0].start, second[0].stats.count), (60, 2));
        assert_eq!(second[0].stats.first, 2.0);
        // A device's own timestamp is its own: kept, as a late row.
        agg.push(sample(&series, 35_000, 4.0));
        assert_eq!(agg.take_counts().late, 1);
        assert_eq!(agg.take_closed(181_000)[0].start, 0);
    }

    #[test]
    fn a_repeated_reading_is_taken_once_in_an_open_window() {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(60);
        let pushed: Vec<Pushed> = [
            (10_000, 1.0),
            (10_000, 1.0),
            // Out of order inside the window: a reading of its own, not a repeat.
            (5_000, 3.0),
            // Same time, another value: the first stays.
            (10_000, 2.0),
            (5_000, 3.0),
            (20_000, 5.0),
        ]
        .into_iter()
        .map(|(t, v)| agg.push(sample(&series, t, v)))
        .collect();
        use Pushed::{Repeat, Taken};
        assert_eq!(pushed, [Taken, Repeat, Taken, Repeat, Repeat, Taken]);
        let rows = agg.take_closed(61_000);
        let s = &rows[0].stats;
        assert_eq!((s.count, s.mean, s.first, s.last), (3, 3.0, 3.0, 5.0));
        assert_eq!(agg.take_counts().samples, 3);
        assert_eq!(agg.take_marks(), [(Arc::clone(&series), 20_000)]);
    }

    #[test]
    fn after_its_window_is_written_a_resend_is_a_repeat_and_a_late_reading_a_late_row() {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(60);
        agg.push(sample(&series, 10_000, 1.0));
        agg.push(sample(&series, 30_000, 2.0));
        assert_eq!(agg.take_closed(61_000).len(), 1);
        // The same readings again (a fast poll, a redelivery): repeats, nothing late.
        assert_eq!(agg.push(sample(&series, 10_000, 1.0)), Pushed::Repeat);
        assert_eq!(agg.push(sample(&series, 30_000, 2.0)), Pushed::Repeat);
        assert_eq!(agg.take_counts().late, 0);
        assert!(agg.take_closed(121_000).is_empty(), "no second row");
        assert_eq!(agg.take_marks(), [(Arc::clone(&series), 30_000)]);
        // A reading the window never had (a station's backlog): a late row.
        assert_eq!(agg.push(sample(&series, 20_000, 7.0)), Pushed::Taken);
        assert_eq!(agg.take_counts().late, 1);
        let late = agg.take_closed(181_000);
        assert_eq!((late[0].start, late[0].stats.count), (0, 1));
        assert!(
            agg.take_marks().is_empty(),
            "an older reading leaves the mark"
        );
        // And once written, it too is known.
        assert_eq!(agg.push(sample(&series, 20_000, 7.0)), Pushed::Repeat);
    }

    #[test]
    fn the_agents_own_stamps_and_sources_that_keep_repeats_are_never_repeats() {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(60);
        for _ in 0..3 {
            assert_eq!(agg.push(own(&series, 10_000, 1.0)), Pushed::Taken);
            assert_eq!(
                agg.push_from(sample(&series, 20_000, 2.0), true),
                Pushed::Taken
            );
        }
        assert_eq!(agg.take_closed(61_000)[0].stats.count, 6);
        assert!(agg.take_marks().is_empty(), "nothing to remember");
    }

    #[test]
    fn a_restart_knows_each_series_mark_and_takes_older_readings_as_late_rows() {
        let series = Arc::new(Series::new("s.x", Some("ug/m3")));
        let mut agg = Aggregator::new(60);
        agg.restore_marks([(Series::new("s.x", Some("ug/m3")), 30_000)]);
        assert_eq!(agg.push(sample(&series, 30_000, 2.0)), Pushed::Repeat);
        assert_eq!(agg.push(sample(&series, 20_000, 9.0)), Pushed::Taken);
        assert_eq!(agg.push(sample(&series, 40_000, 3.0)), Pushed::Taken);
        assert_eq!(agg.push(sample(&series, 40_000, 3.0)), Pushed::Repeat);
        let other = Arc::new(Series::new("s.y", None));
        assert_eq!(agg.push(sample(&other, 30_000, 2.0)), Pushed::Taken);
        let rows = agg.take_all();
        assert_eq!(rows.iter().map(|r| r.stats.count).sum::<u64>(), 3);
        assert_eq!(
            agg.take_marks(),
            [(Arc::clone(&series), 40_000), (Arc::clone(&other), 30_000)]
        );
    }

    #[test]
    fn flushed_readings_are_remembered_up_to_the_bound_and_older_ones_taken_again() {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(1);
        let n = RECENT_READINGS as i64 + 10;
        for i in 0..n {
            agg.push(sample(&series, i * 1000, i as f64));
        }
        assert_eq!(agg.take_all().len(), n as usize);
        // The newest RECENT_READINGS are known; the ten before them are not any more.
        for i in 10..n {
            assert_eq!(
                agg.push(sample(&series, i * 1000, 0.0)),
                Pushed::Repeat,
                "{i}"
            );
        }
        assert_eq!(agg.push(sample(&series, 9_000, 0.0)), Pushed::Taken);
        assert_eq!(agg.take_counts().late, 1);
    }

    #[test]
    fn a_steady_series_keeps_eight_bytes_per_sample_and_its_timestamps_as_one_run() {
        // 100 device-stamped series at 1 Hz in 60 s windows: the second window's values
        // have exactly the room the first one needed, its timestamps are one run.
        let series: Vec<_> = (0..100)
            .map(|i| Arc::new(Series::new(format!("s.x{i}"), None)))
            .collect();
        let mut agg = Aggregator::new(60);
        let push_window = |agg: &mut Aggregator, window: i64| {
            for second in 0..60 {
                for s in &series {
                    let t = 1_700_000_040_000 + (window * 60 + second) * 1000;
                    assert_eq!(agg.push(sample(s, t, second as f64)), Pushed::Taken);
                }
            }
        };
        push_window(&mut agg, 0);
        assert_eq!(agg.take_closed(1_700_000_040_000 + 62_000).len(), 100);
        push_window(&mut agg, 1);
        let (bytes, kept) = agg.kept_heap();
        assert_eq!(kept, 6_000);
        assert_eq!(
            bytes,
            kept * size_of::<f64>(),
            "a value per sample, no spare room; the timestamps one run in place"
        );
        let remembered: usize = agg
            .readings
            .values()
            .map(|r| r.committed.heap_bytes())
            .sum();
        assert_eq!(
            remembered, 0,
            "60 readings a second apart: one run per series, in place"
        );
        assert_eq!(agg.take_marks().len(), 100);
        assert_eq!(agg.marks.capacity(), 0, "no table kept between flushes");
        // Repeats are still told in the open window and in the flushed one.
        let t = 1_700_000_040_000 + 61 * 1000;
        assert_eq!(agg.push(sample(&series[7], t, 0.0)), Pushed::Repeat);
        assert_eq!(
            agg.push(sample(&series[7], t - 60_000, 0.0)),
            Pushed::Repeat
        );
    }

    #[test]
    fn remembered_readings_far_apart_are_kept_exactly() {
        let mut stamps = Stamps::default();
        let far = 1i64 << 40;
        for t in [far, 5, far + 7, -far, 6] {
            let Err(at) = stamps.search(t) else {
                panic!("{t} is new");
            };
            stamps.insert(at, t);
        }
        for t in [-far, 5, 6, far, far + 7] {
            assert!(stamps.search(t).is_ok(), "{t} remembered");
        }
        for t in [-far + 1, 4, 7, far + 6, far - 1] {
            assert!(stamps.search(t).is_err(), "{t} never taken");
        }
        assert!(matches!(stamps, Stamps::Wide(_)));
        // Close together they stay narrow, whatever the order they came in.
        let mut near = Stamps::default();
        for t in [far + 9, far + 3, far + 4_000_000_000, far] {
            let Err(at) = near.search(t) else {
                panic!("{t} is new");
            };
            near.insert(at, t);
        }
        assert!(matches!(near, Stamps::Narrow { .. }));
        for t in [far, far + 3, far + 9, far + 4_000_000_000] {
            assert!(near.search(t).is_ok(), "{t} remembered");
        }
        near.remove_first();
        assert!(near.search(far).is_err());
        assert_eq!(near.len(), 3);
    }

    #[test]
    fn readings_that_jitter_are_kept_one_by_one_in_the_room_of_offsets() {
        let mut readings = Readings::default();
        // A reading every second, each a few ms off the second.
        let stamps: Vec<i64> = (0..200)
            .map(|i| 1_700_000_000_000 + i * 1000 + (i * i * 7) % 11)
            .collect();
        for &t in &stamps {
            readings.remember(t);
        }
        assert!(matches!(readings.committed, Recent::Each(_)));
        assert_eq!(readings.committed.len(), RECENT_READINGS);
        assert!(
            readings.committed.heap_bytes() <= RECENT_READINGS * size_of::<u32>() * 2,
            "{} bytes",
            readings.committed.heap_bytes()
        );
        let kept = &stamps[stamps.len() - RECENT_READINGS..];
        for &t in &stamps {
            assert_eq!(readings.has(t), kept.contains(&t), "{t}");
            assert!(!readings.has(t + 1));
        }
    }

    #[test]
    fn a_run_split_by_a_reading_between_its_steps_keeps_every_reading() {
        let taken = [0, 10, 20, 30, 40, 15, 45, 5, -5];
        let mut runs = Vec::new();
        for t in taken {
            add_to_runs(&mut runs, t);
        }
        assert!(
            runs.len() < taken.len(),
            "fewer runs than readings: {runs:?}"
        );
        assert!(
            runs.windows(2).all(|w| w[0].last() < w[1].first),
            "{runs:?}"
        );
        let mut recent = Recent::Runs {
            runs,
            len: taken.len(),
        };
        for t in -10..=50 {
            assert_eq!(recent.contains(t), taken.contains(&t), "{t}");
        }
        recent.remove_first();
        assert!(!recent.contains(-5));
        assert_eq!(recent.first(), Some(0));
        assert_eq!(recent.last(), Some(45));
        let mut each = Vec::new();
        recent.for_each(|t| each.push(t));
        assert_eq!(each, [0, 5, 10, 15, 20, 30, 40, 45]);
    }

    proptest::proptest! {
        #[test]
        fn remembered_readings_are_the_newest_of_a_plain_set(
            steps in proptest::collection::vec((0i64..4, 0i64..3_000), 1..400),
            far in proptest::bool::ANY,
        ) {
            // Mostly a steady second with gaps, resends, jitter and late readings; now
            // and then a jump of years.
            let mut readings = Readings::default();
            let mut model = std::collections::BTreeSet::new();
            let mut t = 1_700_000_000_000i64;
            for (kind, x) in steps {
                let stamp = match kind {
                    0 => { t += 1000; t }
                    1 => { t += x; t }
                    2 => t - x,
                    _ if far => { t += x << 34; t }
                    _ => t - 1000 * (x % 7),
                };
                readings.remember(stamp);
                if !model.contains(&stamp) {
                    let full = model.len() >= RECENT_READINGS;
                    let oldest = model.first().copied();
                    if !(full && oldest.is_some_and(|o| stamp < o)) {
                        if full {
                            model.pop_first();
                        }
                        model.insert(stamp);
                    }
                }
                proptest::prop_assert_eq!(readings.committed.len(), model.len());
                proptest::prop_assert_eq!(readings.committed.first(), model.first().copied());
                for probe in [stamp, stamp - 1, stamp + 1, stamp - 1000, stamp + 1000] {
                    proptest::prop_assert_eq!(readings.has(probe), model.contains(&probe), "{}", probe);
                }
            }
            for &kept in &model {
                proptest::prop_assert!(readings.has(kept));
            }
        }
    }

    #[test]
    fn an_mqtt_message_delivered_twice_counts_once() {
        let text = "[agent]\nspool = \"/x.db\"\n[[sources]]\nkind = \"mqtt\"\nname = \"m\"\nurl = \"mqtt://127.0.0.1\"\n[[sources.subscriptions]]\ntopic = \"j/#\"\npayload = \"json\"\ntimestamp = \"/t\"\n[[sources.subscriptions.fields]]\nname = \"v\"\npointer = \"/v\"\n[[sinks]]\nkind = \"local\"\npath = \"/x\"\n";
        let config =
            crate::config::Config::parse(text, std::path::Path::new("t.toml")).expect("valid");
        let crate::config::SourceKind::Mqtt(mqtt) = &config.sources[0].kind else {
            panic!("an mqtt source");
        };
        let payload = b"{\"t\": 1767322805, \"v\": 4.5}";
        // A QoS 1 redelivery after a reconnect: a new packet, the same message.
        let mut agg = Aggregator::new(60);
        let mut pushed = Vec::new();
        for _ in 0..2 {
            let batch = crate::source::mqtt::read_message("m", mqtt, "j/a", payload);
            for s in batch.samples {
                pushed.push(agg.push(s));
            }
        }
        assert_eq!(pushed, [Pushed::Taken, Pushed::Repeat]);
        let rows = agg.take_all();
        assert_eq!((rows.len(), rows[0].stats.count), (1, 1));
    }

    #[test]
    fn three_values_give_mean_median_and_stdev() {
        let s = stats_of(&[1.0, 2.0, 3.0]);
        assert_eq!(
            (s.count, s.mean, s.median, s.stdev),
            (3, 2.0, 2.0, Some(1.0))
        );
        assert_eq!((s.min, s.max, s.first, s.last), (1.0, 3.0, 1.0, 3.0));
    }

    #[test]
    fn an_even_count_takes_the_mean_of_the_middle_two() {
        let s = stats_of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.median, 2.5);
        let stdev = s.stdev.expect("four samples have a stdev");
        assert!((stdev - 1.290_994_4).abs() < 1e-7, "{stdev}");
        assert_eq!((s.first, s.last), (4.0, 2.0));
    }

    #[test]
    fn one_sample_has_no_stdev() {
        let s = stats_of(&[7.5]);
        assert_eq!((s.count, s.stdev, s.median), (1, None, 7.5));
    }

    #[test]
    fn non_finite_values_are_counted_and_dropped() {
        let s = stats_of(&[1.0, f64::NAN, f64::INFINITY, 3.0]);
        assert_eq!((s.count, s.mean), (2, 2.0));
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(60);
        agg.push(sample(&series, 0, f64::NEG_INFINITY));
        assert_eq!(agg.take_counts().non_finite, 1);
        assert!(agg.take_closed(i64::MAX / 2).is_empty());
    }

    #[test]
    fn windows_align_to_the_epoch_and_close_after_settling() {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(10);
        agg.push(sample(&series, 1_700_000_003_000, 1.0));
        agg.push(sample(&series, 1_700_000_011_000, 2.0));
        assert!(
            agg.take_closed(1_700_000_010_999).is_empty(),
            "still settling"
        );
        let rows = agg.take_closed(1_700_000_011_000);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].start, rows[0].end()),
            (1_700_000_000, 1_700_000_010)
        );
        assert_eq!(agg.open_windows(), 1);
    }

    #[test]
    fn a_late_sample_is_flushed_again_not_dropped() {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(10);
        agg.push(sample(&series, 5_000, 1.0));
        assert_eq!(agg.take_closed(20_000).len(), 1);
        agg.push(sample(&series, 15_000, 2.0));
        assert_eq!(
            agg.take_counts().late,
            0,
            "a later window of the same series is not late"
        );
        agg.push(sample(&series, 6_000, 9.0));
        let late: Vec<WindowRow> = agg
            .take_closed(30_000)
            .into_iter()
            .filter(|r| r.start == 0)
            .collect();
        assert_eq!(late.len(), 1);
        assert_eq!(
            (late[0].start, late[0].stats.count, late[0].stats.mean),
            (0, 1, 9.0)
        );
        assert_eq!(agg.take_counts().late, 1);
    }

    #[test]
    fn negative_timestamps_align_downwards() {
        let series = Arc::new(Series::new("s.x", None));
        let mut agg = Aggregator::new(60);
        agg.push(sample(&series, -1, 1.0));
        assert_eq!(agg.take_all()[0].start, -60);
    }

    #[test]
    fn flushes_fall_on_window_boundaries_plus_settle() {
        assert_eq!(next_flush_in(60_000, 60_000), Duration::from_millis(1_000));
        assert_eq!(next_flush_in(61_000, 60_000), Duration::from_millis(60_000));
        assert_eq!(next_flush_in(61_500, 60_000), Duration::from_millis(59_500));
    }

    proptest::proptest! {
        #[test]
        fn stats_match_a_naive_computation(values in proptest::collection::vec(-1e6f64..1e6, 1..200)) {
            let s = stats_of(&values);
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            proptest::prop_assert!((s.mean - mean).abs() <= 1e-6 * mean.abs().max(1.0));
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let mid = sorted.len() / 2;
            let median = if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 };
            proptest::prop_assert_eq!(s.median, median);
            proptest::prop_assert_eq!(s.min, sorted[0]);
            proptest::prop_assert_eq!(s.max, sorted[sorted.len() - 1]);
            if values.len() > 1 {
                let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
                let stdev = s.stdev.expect("n > 1");
                proptest::prop_assert!((stdev - var.sqrt()).abs() <= 1e-6 * var.sqrt().max(1.0));
            }
        }
    }
}
