//! Live feeds: sinks that get each flush's windows as they close, not closed partitions.
//!
//! The aggregator hands every committed flush to each feed through a bounded channel
//! ([`LiveLink`]) and never waits for one. A feed counts what it published and what it
//! skipped in a [`LiveStats`]; the aggregator takes those counts into every flush, so they
//! reach the spool (and `status`) in the transaction it writes anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Problem, WindowRow};

/// Flushes a feed may have waiting in its channel before the aggregator skips one for it.
const LINK_CAPACITY: usize = 16;

/// A feed's state as `status` shows it (kept in the spool's agent state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    /// Sink name.
    pub name: String,
    /// Kind word.
    pub kind: String,
    /// Whether the feed is connected.
    pub connected: bool,
    /// Since when it is connected or disconnected (Unix ms).
    pub since_ms: Option<i64>,
    /// Windows waiting to be published.
    pub queued: u64,
    /// The last window handed to the broker (Unix ms).
    pub last_published_ms: Option<i64>,
    /// The latest problem.
    pub last_problem: Option<Problem>,
}

impl LiveState {
    /// A feed that has not connected yet.
    pub fn new(name: &str, kind: &str) -> LiveState {
        LiveState {
            name: name.to_owned(),
            kind: kind.to_owned(),
            connected: false,
            since_ms: None,
            queued: 0,
            last_published_ms: None,
            last_problem: None,
        }
    }
}

/// A feed's counts since the previous report, and its state now.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveReport {
    /// Windows published.
    pub published: u64,
    /// Windows skipped (too old, or the feed too far behind).
    pub skipped: u64,
    /// The state.
    pub state: LiveState,
}

/// The counters and state one feed shares with the aggregator.
#[derive(Debug)]
pub struct LiveStats {
    published: AtomicU64,
    skipped: AtomicU64,
    state: Mutex<LiveState>,
}

impl LiveStats {
    /// A feed not yet connected.
    pub fn new(name: &str, kind: &str) -> LiveStats {
        LiveStats {
            published: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            state: Mutex::new(LiveState::new(name, kind)),
        }
    }

    /// Counts windows published at `now_ms`.
    pub fn published(&self, windows: u64, now_ms: i64) {
        self.published.fetch_add(windows, Ordering::Relaxed);
        self.update(|s| s.last_published_ms = Some(now_ms));
    }

    /// Counts windows skipped.
    pub fn skipped(&self, windows: u64) {
        self.skipped.fetch_add(windows, Ordering::Relaxed);
    }

    /// Changes the state.
    pub fn update(&self, change: impl FnOnce(&mut LiveState)) {
        if let Ok(mut state) = self.state.lock() {
            change(&mut state);
        }
    }

    /// Takes the counts since the last report, resetting them.
    pub fn report(&self) -> LiveReport {
        let state = match self.state.lock() {
            Ok(state) => state.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        LiveReport {
            published: self.published.swap(0, Ordering::Relaxed),
            skipped: self.skipped.swap(0, Ordering::Relaxed),
            state,
        }
    }
}

/// The aggregator's end of one feed.
pub struct LiveLink {
    sender: mpsc::Sender<Arc<Vec<WindowRow>>>,
    /// The feed's counters.
    pub stats: Arc<LiveStats>,
}

impl LiveLink {
    /// A link and the feed's end of it.
    pub fn new(stats: Arc<LiveStats>) -> (LiveLink, mpsc::Receiver<Arc<Vec<WindowRow>>>) {
        let (sender, receiver) = mpsc::channel(LINK_CAPACITY);
        (LiveLink { sender, stats }, receiver)
    }

    /// Hands committed windows to the feed without waiting; a feed that is that far
    /// behind (or gone) has them counted as skipped.
    pub fn send(&self, rows: &Arc<Vec<WindowRow>>) {
        if rows.is_empty() {
            return;
        }
        if self.sender.try_send(Arc::clone(rows)).is_err() {
            self.stats.skipped(rows.len() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Series, Stats};

    fn rows(n: usize) -> Arc<Vec<WindowRow>> {
        let series = Arc::new(Series::new("s.x", None));
        let stats = Stats::single(1.0);
        Arc::new(
            (0..n)
                .map(|i| WindowRow {
                    series: Arc::clone(&series),
                    start: i as i64 * 60,
                    seconds: 60,
                    stats: stats.clone(),
                })
                .collect(),
        )
    }

    #[test]
    fn a_feed_too_far_behind_has_flushes_counted_as_skipped() {
        let stats = Arc::new(LiveStats::new("feed", "mqtt"));
        let (link, mut receiver) = LiveLink::new(Arc::clone(&stats));
        for _ in 0..LINK_CAPACITY {
            link.send(&rows(3));
        }
        assert_eq!(stats.report().skipped, 0, "the channel holds them");
        link.send(&rows(5));
        link.send(&rows(0));
        let report = stats.report();
        assert_eq!((report.published, report.skipped), (0, 5));
        assert_eq!(receiver.try_recv().map(|r| r.len()).ok(), Some(3));
        drop(receiver);
        link.send(&rows(2));
        assert_eq!(stats.report().skipped, 2, "a feed that is gone skips too");
    }

    #[test]
    fn a_report_takes_the_counts_and_keeps_the_state() {
        let stats = LiveStats::new("feed", "mqtt");
        stats.published(4, 1_000);
        stats.skipped(1);
        stats.update(|s| s.connected = true);
        let first = stats.report();
        assert_eq!((first.published, first.skipped), (4, 1));
        assert_eq!(first.state.last_published_ms, Some(1_000));
        let second = stats.report();
        assert_eq!((second.published, second.skipped), (0, 0));
        assert!(second.state.connected);
    }
}
