//! Wall-clock helpers: Unix milliseconds in, RFC 3339 out.

use chrono::{DateTime, SecondsFormat, Utc};

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// RFC 3339 in UTC with a `Z`, to the second ("2026-11-23T12:00:00Z").
pub fn rfc3339(seconds: i64) -> String {
    DateTime::<Utc>::from_timestamp(seconds, 0)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("@{seconds}"))
}

/// RFC 3339 in UTC of a millisecond instant, to the millisecond.
pub fn rfc3339_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("@{ms}ms"))
}

/// Where systemd-timesyncd says it has synchronised the clock (the file `synchronized`
/// appears); `EDGESPOOL_TIMESYNC_DIR` points elsewhere (tests), and then only that folder
/// is consulted.
const TIMESYNC_DIR: &str = "/run/systemd/timesync";

/// A change of the wall clock against the monotonic clock larger than this is a jump.
const JUMP_MS: i64 = 2_000;

/// What the agent knows of its wall clock, as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClockReport {
    /// "synchronised", "waiting" (for a time service to synchronise it: samples held),
    /// "unsynchronised" (no time service, or the wait ran out: trusted as it is) or
    /// "trusted" (`clock = "trust"`).
    pub state: String,
    /// Since when (Unix ms).
    pub since_ms: i64,
    /// Samples held for a synchronised clock.
    pub held: u64,
    /// Jumps seen since start.
    pub jumps: u64,
    /// The last jump: when (Unix ms, after it) and by how much (ms; negative: backwards).
    pub last_jump: Option<(i64, i64)>,
}

/// Whether the clock is synchronised: `Some(true)` or `Some(false)` when something
/// tells, `None` when no time service runs here.
pub fn synchronised() -> Option<bool> {
    if let Some(dir) = std::env::var_os("EDGESPOOL_TIMESYNC_DIR") {
        let dir = std::path::Path::new(&dir);
        return dir.is_dir().then(|| dir.join("synchronized").exists());
    }
    let timesyncd = std::path::Path::new(TIMESYNC_DIR);
    if timesyncd.join("synchronized").exists() || kernel_synchronised() {
        return Some(true);
    }
    // A time service that will synchronise the clock: worth waiting for.
    let service = timesyncd.is_dir()
        || std::path::Path::new("/run/chrony").is_dir()
        || std::path::Path::new("/run/ntpd.pid").exists();
    service.then_some(false)
}

/// The kernel's view (adjtimex): an NTP daemon that disciplines the clock clears
/// STA_UNSYNC.
fn kernel_synchronised() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's state into `tx`.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

/// The aggregator's view of the clock: whether to hold the samples it stamps, and the
/// jumps it saw.
#[derive(Debug)]
pub struct ClockWatch {
    policy: crate::config::ClockPolicy,
    wait: std::time::Duration,
    started: std::time::Instant,
    last_check: Option<std::time::Instant>,
    holding: bool,
    /// Wall minus monotonic, at the last observation.
    offset: Option<i64>,
    origin: std::time::Instant,
    report: ClockReport,
}

impl ClockWatch {
    /// A watch; `check` says whether the clock is synchronised (see [`synchronised`]).
    pub fn new(policy: crate::config::ClockPolicy, wait: std::time::Duration) -> ClockWatch {
        let now = std::time::Instant::now();
        let mut watch = ClockWatch {
            policy,
            wait,
            started: now,
            last_check: None,
            holding: false,
            offset: None,
            origin: now,
            report: ClockReport {
                since_ms: now_ms(),
                ..ClockReport::default()
            },
        };
        watch.refresh(synchronised);
        watch
    }

    /// Whether samples the agent stamps must be held now. Looks at the clock's state at
    /// most once a second (`check` gives it).
    pub fn holding(&mut self, check: impl FnOnce() -> Option<bool>) -> bool {
        let due = self
            .last_check
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if due {
            self.refresh(check);
        }
        self.holding
    }

    fn refresh(&mut self, check: impl FnOnce() -> Option<bool>) {
        self.last_check = Some(std::time::Instant::now());
        let (state, holding) = match self.policy {
            crate::config::ClockPolicy::Trust => ("trusted", false),
            crate::config::ClockPolicy::Auto => match check() {
                Some(true) => ("synchronised", false),
                Some(false) if self.started.elapsed() < self.wait => ("waiting", true),
                _ => ("unsynchronised", false),
            },
        };
        if self.report.state != state {
            match state {
                "waiting" => tracing::warn!(
                    wait = ?self.wait,
                    "the clock is not synchronised yet: holding the samples this agent stamps until it is"
                ),
                "unsynchronised" if self.holding => {
                    tracing::warn!("the clock is still not synchronised: trusting it as it is")
                }
                "synchronised" if self.holding => {
                    tracing::info!("the clock is synchronised: stamping the held samples")
                }
                _ => {}
            }
            self.report.state = state.to_owned();
            self.report.since_ms = now_ms();
        }
        self.holding = holding;
    }

    /// Notes a sampling's wall time and monotonic instant; a change of their difference
    /// beyond `JUMP_MS` is a jump (logged, counted). Returns the jump in ms, if any.
    pub fn observe(&mut self, wall_ms: i64, at: std::time::Instant) -> Option<i64> {
        let mono_ms = at.saturating_duration_since(self.origin).as_millis() as i64;
        let offset = wall_ms - mono_ms;
        let jump = self
            .offset
            .map(|last| offset - last)
            .filter(|d| d.abs() > JUMP_MS);
        self.offset = Some(offset);
        if let Some(by) = jump {
            self.report.jumps += 1;
            self.report.last_jump = Some((wall_ms, by));
            tracing::warn!(
                by_ms = by,
                "the wall clock jumped: later samples this agent stamps never reopen a window already written"
            );
        }
        jump
    }

    /// The state for `status`, with `held` samples waiting.
    pub fn report(&self, held: u64) -> ClockReport {
        ClockReport {
            held,
            ..self.report.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClockPolicy;
    use std::time::{Duration, Instant};

    #[test]
    fn waits_for_a_time_service_but_not_forever_nor_without_one() {
        let mut watch = ClockWatch::new(ClockPolicy::Auto, Duration::from_secs(3600));
        watch.last_check = None;
        assert!(
            watch.holding(|| Some(false)),
            "a time service, not synced yet"
        );
        assert_eq!(watch.report(7).state, "waiting");
        assert_eq!(watch.report(7).held, 7);
        watch.last_check = None;
        assert!(!watch.holding(|| Some(true)));
        assert_eq!(watch.report(0).state, "synchronised");
        watch.last_check = None;
        assert!(
            !watch.holding(|| None),
            "no time service: nothing to wait for"
        );
        assert_eq!(watch.report(0).state, "unsynchronised");

        let mut impatient = ClockWatch::new(ClockPolicy::Auto, Duration::ZERO);
        impatient.last_check = None;
        assert!(!impatient.holding(|| Some(false)), "the wait ran out");
        let mut trusting = ClockWatch::new(ClockPolicy::Trust, Duration::from_secs(3600));
        trusting.last_check = None;
        assert!(!trusting.holding(|| Some(false)));
        assert_eq!(trusting.report(0).state, "trusted");
    }

    #[test]
    fn a_jump_is_a_change_of_wall_against_monotonic_time() {
        let mut watch = ClockWatch::new(ClockPolicy::Trust, Duration::ZERO);
        let t0 = Instant::now();
        assert_eq!(watch.observe(1_000_000, t0), None);
        assert_eq!(watch.observe(1_001_000, t0 + Duration::from_secs(1)), None);
        assert_eq!(
            watch.observe(941_000, t0 + Duration::from_secs(1)),
            Some(-60_000),
            "a minute back"
        );
        assert_eq!(
            watch.observe(1_100_000, t0 + Duration::from_secs(2)),
            Some(158_000)
        );
        let report = watch.report(0);
        assert_eq!(
            (report.jumps, report.last_jump),
            (2, Some((1_100_000, 158_000)))
        );
    }
}
