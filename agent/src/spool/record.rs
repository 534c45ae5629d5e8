//! A batch's record: the windows of one flush in one partition, as one postcard blob.
//!
//! ```text
//! version 2 (this edgespool):  0x00 0x02 postcard(Vec<StoredWindow>)
//! version 1 (before):          postcard(Vec<StoredWindowV1>)
//! ```
//!
//! A version 1 record starts with the number of its windows, never 0, so a leading 0
//! marks a versioned record. Version 2 adds the times of `first` and `last` (as
//! milliseconds from the window's start) and the mean's rest
//! ([`Stats::mean_rest`]). A version 1 record, written by
//! an earlier edgespool and not yet delivered at the upgrade, reads with both times at
//! the window's start (unknown) and no rest.

use serde::{Deserialize, Serialize};

use crate::flow::Stats;

/// The version this edgespool writes.
const VERSION: u8 = 2;

/// One window as a batch stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StoredWindow {
    /// `series.id`.
    pub(super) series: i64,
    /// Window start minus partition start, seconds.
    pub(super) offset: u32,
    /// Window length, seconds.
    pub(super) seconds: u32,
    /// The aggregates.
    stats: StoredStats,
}

/// [`Stats`] as a version 2 record holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredStats {
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    mean_rest: f64,
    stdev: Option<f64>,
    median: f64,
    first: f64,
    /// `first_ms` minus the window's start in ms.
    first_after: i64,
    last: f64,
    /// `last_ms` minus the window's start in ms.
    last_after: i64,
}

/// One window of a version 1 record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StoredWindowV1 {
    pub(super) series: i64,
    pub(super) offset: u32,
    pub(super) seconds: u32,
    pub(super) stats: StatsV1,
}

/// The statistics of a version 1 record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StatsV1 {
    pub(super) count: u64,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) mean: f64,
    pub(super) stdev: Option<f64>,
    pub(super) median: f64,
    pub(super) first: f64,
    pub(super) last: f64,
}

impl StoredWindow {
    /// A window starting at `start` (Unix seconds) of partition `partition`.
    pub(super) fn new(
        series: i64,
        partition: i64,
        start: i64,
        seconds: u32,
        stats: &Stats,
    ) -> StoredWindow {
        let start_ms = start.saturating_mul(1000);
        StoredWindow {
            series,
            offset: (start - partition) as u32,
            seconds,
            stats: StoredStats {
                count: stats.count,
                min: stats.min,
                max: stats.max,
                mean: stats.mean,
                mean_rest: stats.mean_rest,
                stdev: stats.stdev,
                median: stats.median,
                first: stats.first,
                first_after: stats.first_ms.saturating_sub(start_ms),
                last: stats.last,
                last_after: stats.last_ms.saturating_sub(start_ms),
            },
        }
    }

    /// The statistics, for a window of partition `partition`.
    pub(super) fn stats(&self, partition: i64) -> Stats {
        let start_ms = (partition + i64::from(self.offset)).saturating_mul(1000);
        let s = &self.stats;
        Stats {
            count: s.count,
            min: s.min,
            max: s.max,
            mean: s.mean,
            mean_rest: s.mean_rest,
            stdev: s.stdev,
            median: s.median,
            first: s.first,
            first_ms: start_ms.saturating_add(s.first_after),
            last: s.last,
            last_ms: start_ms.saturating_add(s.last_after),
        }
    }
}

impl From<StoredWindowV1> for StoredWindow {
    fn from(old: StoredWindowV1) -> StoredWindow {
        let s = old.stats;
        StoredWindow {
            series: old.series,
            offset: old.offset,
            seconds: old.seconds,
            stats: StoredStats {
                count: s.count,
                min: s.min,
                max: s.max,
                mean: s.mean,
                mean_rest: 0.0,
                stdev: s.stdev,
                median: s.median,
                first: s.first,
                first_after: 0,
                last: s.last,
                last_after: 0,
            },
        }
    }
}

/// The record of some windows.
pub(super) fn encode(windows: &[StoredWindow]) -> Vec<u8> {
    let out = vec![0, VERSION];
    // A Vec of plain structs always serializes.
    postcard::to_extend(windows, out).unwrap_or_default()
}

/// The windows of a record of any version.
pub(super) fn decode(record: &[u8]) -> Result<Vec<StoredWindow>, String> {
    match record {
        [0, VERSION, rest @ ..] => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        [0, version, ..] => Err(format!(
            "record version {version} is newer than this edgespool knows ({VERSION})"
        )),
        _ => postcard::from_bytes::<Vec<StoredWindowV1>>(record)
            .map(|old| old.into_iter().map(StoredWindow::from).collect())
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Stats {
        Stats {
            count: 3,
            min: 1.0,
            max: 3.0,
            mean: 1_700_000_000.123,
            mean_rest: 1.5e-8,
            stdev: Some(1.0),
            median: 2.0,
            first: 1.0,
            first_ms: 1_700_000_000_001,
            last: 3.0,
            last_ms: 1_700_000_059_999,
        }
    }

    #[test]
    fn a_record_keeps_the_times_of_first_and_last() {
        let window = StoredWindow::new(7, 1_699_999_200, 1_700_000_000, 60, &stats());
        let bytes = encode(std::slice::from_ref(&window));
        assert_eq!(&bytes[..2], &[0, 2]);
        let back = decode(&bytes).expect("decodes");
        assert_eq!(back, vec![window]);
        let s = back[0].stats(1_699_999_200);
        assert_eq!(
            (s.first_ms, s.last_ms),
            (1_700_000_000_001, 1_700_000_059_999)
        );
        assert_eq!(s.mean_rest, 1.5e-8);
    }

    #[test]
    fn a_record_of_the_previous_version_still_reads() {
        // What edgespool wrote before records had a version: postcard of the old shape.
        let old = vec![StoredWindowV1 {
            series: 3,
            offset: 120,
            seconds: 60,
            stats: StatsV1 {
                count: 2,
                min: 1.0,
                max: 3.0,
                mean: 2.0,
                stdev: Some(std::f64::consts::SQRT_2),
                median: 2.0,
                first: 1.0,
                last: 3.0,
            },
        }];
        let bytes = postcard::to_allocvec(&old).expect("encodes");
        assert_eq!(bytes[0], 1, "the old shape starts with its window count");
        let back = decode(&bytes).expect("an old record decodes");
        assert_eq!(
            (back[0].series, back[0].offset, back[0].seconds),
            (3, 120, 60)
        );
        let s = back[0].stats(3_600);
        assert_eq!((s.count, s.mean, s.first, s.last), (2, 2.0, 1.0, 3.0));
        assert_eq!((s.first_ms, s.last_ms), (3_720_000, 3_720_000));
    }

    #[test]
    fn a_record_of_a_newer_version_is_refused() {
        assert_eq!(
            decode(&[0, 9, 1]),
            Err("record version 9 is newer than this edgespool knows (2)".into())
        );
    }

    #[test]
    fn a_window_takes_at_most_87_bytes() {
        // Large ids and counts, a day-long window, every statistic present.
        let mut s = stats();
        s.count = 1 << 40;
        s.first_ms = 1_700_000_000_000;
        s.last_ms = 1_700_000_000_000 + 86_399_999;
        let window = StoredWindow::new(1 << 40, 1_699_999_200, 1_700_000_000, 86_400, &s);
        let bytes = encode(std::slice::from_ref(&window));
        // The version (2 bytes), the count of windows (1), the window: 87.
        assert_eq!(bytes.len(), 2 + 1 + 87, "{} bytes", bytes.len());
    }
}
