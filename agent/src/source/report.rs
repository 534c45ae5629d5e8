//! Rate-limited warnings of a source: at most a few log lines per kind of problem per
//! period (a minute), the next carrying how many more there were since the previous line.
//!
//! - A source that meets a bad value once a second, or a publisher sending a thousand
//!   different bad payloads, must not fill the journal: every occurrence is counted
//!   (the source's counters, `status`), a line a minute says what and how many.
//! - The first occurrences of a kind in a period are logged at once, up to its burst
//!   ([`Kind::burst`]: three different bad payloads in a row are each shown, dropped
//!   series once); later ones wait for the period to end, and go out then in one line
//!   even if no new problem comes (see [`Reports::due`]).
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

    /// How many lines of this kind a period may hold.
    pub fn burst(self) -> u32 {
        match self {
            // One condition (the cap is reached), however many samples it drops.
            Kind::SeriesDropped => 1,
            _ => 3,
        }
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
    /// When the current period of this kind began (with its first line).
    period_start: Option<Instant>,
    /// Lines written in it.
    lines: u32,
    /// Whether a line of this kind was ever written.
    logged: bool,
    /// Occurrences not logged since the last line.
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
    /// A limiter allowing [`Kind::burst`] lines per kind per `period`.
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
        let over = held
            .period_start
            .is_none_or(|start| now.saturating_duration_since(start) >= period);
        if over {
            held.period_start = Some(now);
            held.lines = 0;
        }
        if held.lines >= kind.burst() {
            held.unlogged += count;
            held.latest = Some(message);
            return None;
        }
        let first = !held.logged;
        let more = held.unlogged + count - 1;
        held.lines += 1;
        held.logged = true;
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
            let start = held.period_start?;
            if held.unlogged == 0 || now.saturating_duration_since(start) < period {
                return None;
            }
            let message = held.latest.take()?;
            let more = held.unlogged - 1;
            // The line opens the next period.
            held.period_start = Some(now);
            held.lines = 1;
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
    fn a_few_problems_are_logged_at_once_and_the_rest_once_a_minute_with_their_count() {
        let t0 = Instant::now();
        let mut reports = Reports::new(MINUTE);
        let mut logged = Vec::new();
        for i in 0..40 {
            let at = t0 + Duration::from_millis(i * 100);
            if let Some(line) = reports.note(Kind::Invalid, at, 1, format!("bad {i}")) {
                logged.push((line.message, line.more, line.first));
            }
        }
        assert_eq!(
            logged,
            [
                ("bad 0".to_owned(), 0, true),
                ("bad 1".to_owned(), 0, false),
                ("bad 2".to_owned(), 0, false),
            ]
        );
        assert_eq!(reports.due(t0 + Duration::from_secs(59)).count(), 0);
        let lines: Vec<Line> = reports.due(t0 + MINUTE).collect();
        assert_eq!(
            lines,
            [Line {
                kind: Kind::Invalid,
                message: "bad 39".into(),
                more: 36,
                first: false,
            }]
        );
        // Nothing held: nothing due. The summary opened a period: two more fit in it.
        assert_eq!(reports.due(t0 + 3 * MINUTE).count(), 0);
        let next = |reports: &mut Reports, secs, text: &str| {
            let at = t0 + MINUTE + Duration::from_secs(secs);
            reports
                .note(Kind::Invalid, at, 1, text.into())
                .map(|l| l.more)
        };
        assert_eq!(next(&mut reports, 1, "x"), Some(0));
        assert_eq!(next(&mut reports, 2, "y"), Some(0));
        assert_eq!(next(&mut reports, 3, "z"), None);
        assert_eq!(
            next(&mut reports, 60, "w"),
            Some(1),
            "a new period: z and w"
        );
    }

    #[test]
    fn each_kind_has_its_own_minute_and_dropped_series_one_line() {
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
