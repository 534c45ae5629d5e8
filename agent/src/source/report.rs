//! Rate-limited warnings of a source: at most one log line per kind of problem per
//! period (a minute), carrying how many more there were since the previous line.
//!
//! - A source that meets a bad value once a second, or a publisher sending a thousand
//!   different bad payloads, must not fill the journal: every occurrence is counted
//!   (the source's counters, `status`), one line a minute says what and how many.
//! - The first occurrence of a kind is logged at once; later ones wait for the period to
//!   end, and go out then even if no new problem comes (see [`Reports::due`]).
//! - Pure: it takes `now` and does no I/O, so it is tested without a runtime.

use std::time::{Duration, Instant};

/// The kinds of problem a source reports, each limited on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole sampling failed (or the connection of a subscribing source).
    Failed,
    /// A read of part of the source failed.
    Read,
    /// A value was present but unusable.
    Invalid,
    /// Samples were dropped because their series would pass `max_series`.
    SeriesDropped,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Failed, Kind::Read, Kind::Invalid, Kind::SeriesDropped];

    fn index(self) -> usize {
        self as usize
    }
}

/// One line to log: a message standing for itself and `more` other occurrences since
/// the previous line of its kind; `first` for the first line of its kind.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// The kind.
    pub kind: Kind,
    /// The latest message of that kind.
    pub message: String,
    /// Occurrences beyond the one `message` describes, not logged.
    pub more: u64,
    /// Whether this is the first line of its kind.
    pub first: bool,
}

#[derive(Debug, Default)]
struct Held {
    /// When the last line of this kind was written.
    last_line: Option<Instant>,
    /// Occurrences since then, not logged.
    unlogged: u64,
    /// The latest of them.
    latest: Option<String>,
}

/// The rate limiter of one source.
#[derive(Debug)]
pub struct Reports {
    period: Duration,
    held: [Held; 4],
}

impl Reports {
    /// A limiter allowing one line per kind per `period`.
    pub fn new(period: Duration) -> Reports {
        Reports {
            period,
            held: Default::default(),
        }
    }

    /// Notes `count` occurrences of a problem described by `message` at `now`; gives
    /// the line to log now, if one is due.
    pub fn note(&mut self, kind: Kind, now: Instant, count: u64, message: String) -> Option<Line> {
        let period = self.period;
        let held = &mut self.held[kind.index()];
        let count = count.max(1);
        let due = held
            .last_line
            .is_none_or(|last| now.saturating_duration_since(last) >= period);
        if !due {
            held.unlogged += count;
            held.latest = Some(message);
            return None;
        }
        let first = held.last_line.is_none();
        let more = held.unlogged + count - 1;
        held.last_line = Some(now);
        held.unlogged = 0;
        held.latest = None;
        Some(Line {
            kind,
            message,
            more,
            first,
        })
    }

    /// The lines of held occurrences whose period has ended by `now`.
    pub fn due(&mut self, now: Instant) -> impl Iterator<Item = Line> + '_ {
        let period = self.period;
        Kind::ALL.into_iter().filter_map(move |kind| {
            let held = &mut self.held[kind.index()];
            let last = held.last_line?;
            if held.unlogged == 0 || now.saturating_duration_since(last) < period {
                return None;
            }
            let message = held.latest.take()?;
            let more = held.unlogged - 1;
            held.last_line = Some(now);
            held.unlogged = 0;
            Some(Line {
                kind,
                message,
                more,
                first: false,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_first_problem_is_logged_at_once_and_the_rest_once_a_minute_with_their_count() {
        let t0 = Instant::now();
        let mut reports = Reports::new(MINUTE);
        let line = reports
            .note(Kind::Invalid, t0, 1, "bad 0".into())
            .expect("the first is logged");
        assert_eq!(
            (line.message.as_str(), line.more, line.first),
            ("bad 0", 0, true)
        );
        for i in 1..=37 {
            let at = t0 + Duration::from_millis(i * 100);
            assert_eq!(reports.note(Kind::Invalid, at, 1, format!("bad {i}")), None);
        }
        assert_eq!(reports.due(t0 + Duration::from_secs(59)).count(), 0);
        let lines: Vec<Line> = reports.due(t0 + MINUTE).collect();
        assert_eq!(
            lines,
            [Line {
                kind: Kind::Invalid,
                message: "bad 37".into(),
                more: 36,
                first: false,
            }]
        );
        // Nothing held: nothing due; the next problem waits for its minute.
        assert_eq!(reports.due(t0 + 3 * MINUTE).count(), 0);
        assert_eq!(
            reports.note(
                Kind::Invalid,
                t0 + MINUTE + Duration::from_secs(1),
                1,
                "x".into()
            ),
            None
        );
        let line = reports
            .note(Kind::Invalid, t0 + 2 * MINUTE, 1, "y".into())
            .expect("a minute after the last line");
        assert_eq!((line.message.as_str(), line.more), ("y", 1));
    }

    #[test]
    fn each_kind_has_its_own_minute_and_counts_add_up() {
        let t0 = Instant::now();
        let mut reports = Reports::new(MINUTE);
        assert!(reports.note(Kind::Invalid, t0, 1, "a".into()).is_some());
        let line = reports
            .note(Kind::SeriesDropped, t0, 5, "cap".into())
            .expect("another kind is not held by the first");
        assert_eq!((line.more, line.first), (4, true));
        assert_eq!(
            reports.note(Kind::SeriesDropped, t0, 10, "cap".into()),
            None
        );
        assert_eq!(
            reports
                .note(Kind::Failed, t0, 1, "down".into())
                .map(|l| l.more),
            Some(0)
        );
        let line = reports
            .note(Kind::SeriesDropped, t0 + MINUTE, 3, "cap".into())
            .expect("a minute later");
        assert_eq!((line.more, line.first), (12, false));
    }
}
