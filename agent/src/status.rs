//! `edgespool status`: what is going on, read from the spool alone.
//!
//! It opens the spool read-only, so it works whether the daemon runs or not and needs no
//! port. The daemon writes its state with every flush (one per window length), so the
//! heartbeat is at most a window old while it runs.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::clock;
use crate::spool::{AgentState, SpoolError, SpoolReader};

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Device id.
    pub device: Option<String>,
    /// edgespool version of the daemon that last wrote the spool.
    pub version: Option<String>,
    /// The daemon: running, stopped, not responding or not running.
    pub daemon: Daemon,
    /// The spool file and its budget.
    pub spool: SpoolStatus,
    /// Series and sample rate of the last flush interval.
    pub sampling: Sampling,
    /// The wall clock, as of the last flush.
    pub clock: Option<ClockStatus>,
    /// Each source.
    pub sources: Vec<SourceStatus>,
    /// Each configured sink that receives partitions.
    pub sinks: Vec<SinkStatus>,
    /// Each live feed (an `mqtt` sink).
    pub live_sinks: Vec<LiveSinkStatus>,
    /// Lifetime counters of the aggregator and the spool.
    pub counters: Counters,
}

/// The daemon's liveness.
#[derive(Debug, Serialize)]
pub struct Daemon {
    /// "running", "stopped", "not responding", "not running" or "never ran".
    pub state: String,
    /// Its process id.
    pub pid: Option<u32>,
    /// When it started (RFC 3339).
    pub started: Option<String>,
    /// Its last heartbeat (RFC 3339).
    pub heartbeat: Option<String>,
    /// Seconds since that heartbeat.
    pub heartbeat_age_seconds: Option<f64>,
}

/// The spool file.
#[derive(Debug, Serialize)]
pub struct SpoolStatus {
    /// Its path.
    pub path: String,
    /// Bytes of pages in use.
    pub used_bytes: u64,
    /// Bytes on disk, WAL included.
    pub file_bytes: u64,
    /// The budget.
    pub budget_bytes: Option<u64>,
    /// The full-disk policy.
    pub when_full: Option<String>,
    /// Windows held (not yet delivered everywhere).
    pub rows: i64,
    /// Distinct series ever stored.
    pub series_known: i64,
    /// A corrupt spool found at start and moved aside (the last time it happened).
    pub recovered: Option<RecoveryStatus>,
    /// The spool file found deleted or replaced under the running agent and rewritten
    /// from its open database (the last time it happened).
    pub restored: Option<RestoredStatus>,
}

/// The spool file deleted or replaced under the running agent, and put back.
#[derive(Debug, Serialize)]
pub struct RestoredStatus {
    /// When it was found and put back (RFC 3339).
    pub at: String,
    /// "deleted" or "replaced".
    pub found: String,
    /// Where the file that had replaced it went (kept, as found).
    pub moved_to: Option<String>,
    /// Windows the rewritten spool held.
    pub rows: i64,
}

/// A corrupt spool moved aside.
#[derive(Debug, Serialize)]
pub struct RecoveryStatus {
    /// When (RFC 3339).
    pub at: String,
    /// Where the damaged file is now.
    pub moved_to: String,
    /// What was wrong with it.
    pub reason: String,
}

/// Sampling figures from the last flush.
#[derive(Debug, Serialize)]
pub struct Sampling {
    /// Series that closed a window in the last flush.
    pub series: usize,
    /// Samples per second over the last flush interval.
    pub samples_per_second: f64,
    /// Windows open in memory.
    pub open_windows: usize,
    /// Window length, seconds.
    pub window_seconds: Option<u32>,
    /// Partition length, seconds.
    pub partition_seconds: Option<u32>,
}

/// The wall clock.
#[derive(Debug, Serialize)]
pub struct ClockStatus {
    /// "synchronised", "waiting" (samples held for a time service to synchronise it),
    /// "unsynchronised" (trusted as it is) or "trusted" (`clock = "trust"`).
    pub state: String,
    /// Since when (RFC 3339).
    pub since: String,
    /// Samples held until it is synchronised.
    pub held_samples: u64,
    /// Jumps of the wall clock seen since the daemon started.
    pub jumps: u64,
    /// The last jump: when (RFC 3339).
    pub last_jump_at: Option<String>,
    /// By how many seconds (negative: backwards).
    pub last_jump_seconds: Option<f64>,
}

/// One source.
#[derive(Debug, Serialize)]
pub struct SourceStatus {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Samples taken (lifetime).
    pub samples: u64,
    /// Values that were present but unusable (lifetime).
    pub invalid: u64,
    /// Failed samplings or reads (lifetime).
    pub errors: u64,
    /// Samples dropped because their series would have been beyond the source's
    /// `max_series` (lifetime).
    pub series_dropped: u64,
    /// Device-stamped samples dropped because they repeat a reading already taken (same
    /// series and timestamp; lifetime).
    pub repeats: u64,
    /// `null` values, which make no sample (lifetime).
    pub nulls: u64,
    /// NaN or ±Inf values, which make no sample (lifetime).
    pub not_finite: u64,
    /// The latest problem.
    pub last_error: Option<String>,
    /// When (RFC 3339).
    pub last_error_at: Option<String>,
}

/// One sink.
#[derive(Debug, Serialize)]
pub struct SinkStatus {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// "ok", "retrying" or "idle" (nothing delivered yet).
    pub state: String,
    /// Rows waiting for it.
    pub pending_rows: i64,
    /// Partitions with rows waiting for it.
    pub pending_partitions: i64,
    /// The oldest of those (RFC 3339).
    pub oldest_pending: Option<String>,
    /// Parts delivered (lifetime).
    pub delivered_parts: i64,
    /// Late rows (for partitions it already has a part of) waiting to go out together
    /// as one part: counted in `pending_rows` too.
    pub late_waiting: i64,
    /// When the oldest of them has waited the sink's `late_grace` (RFC 3339).
    pub late_due: Option<String>,
    /// The last delivery (RFC 3339).
    pub last_success: Option<String>,
    /// The last error, without secrets.
    pub last_error: Option<String>,
    /// When (RFC 3339).
    pub last_error_at: Option<String>,
    /// Failing since (RFC 3339), while retrying.
    pub retrying_since: Option<String>,
    /// The next attempt (RFC 3339), while retrying.
    pub next_attempt: Option<String>,
}

/// One live feed.
#[derive(Debug, Serialize)]
pub struct LiveSinkStatus {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// "connected", "disconnected" or "connecting" (never connected yet).
    pub state: String,
    /// Connected or disconnected since (RFC 3339).
    pub since: Option<String>,
    /// Windows published (lifetime).
    pub published: u64,
    /// Windows skipped: older than `max_age` when their turn came, or the feed too far
    /// behind (lifetime).
    pub skipped: u64,
    /// Windows waiting for the broker.
    pub queued: u64,
    /// The last publication (RFC 3339).
    pub last_published: Option<String>,
    /// The last error, without secrets.
    pub last_error: Option<String>,
    /// When (RFC 3339).
    pub last_error_at: Option<String>,
}

/// Lifetime counters.
#[derive(Debug, Serialize)]
pub struct Counters {
    /// Samples taken in by the aggregator.
    pub samples: u64,
    /// NaN or infinite values dropped, of every source.
    pub non_finite: u64,
    /// Samples that arrived after their window was flushed (kept, as late rows).
    pub late_samples: u64,
    /// Samples dropped because too many windows were open.
    pub overflow: u64,
    /// Windows dropped by the disk budget policy.
    pub dropped_rows: u64,
    /// Windows lost because the spool could not be written (a full disk) for longer than
    /// memory could hold them.
    pub lost_rows: u64,
    /// Samples the agent stamped after the clock went back, moved to the next open window
    /// so that no window is written twice.
    pub clamped_samples: u64,
    /// Samples held for the clock beyond the limit, dropped.
    pub held_dropped_samples: u64,
    /// Windows that had more values than the median keeps (`MAX_VALUES_PER_WINDOW`):
    /// their median is that of the first values kept; every other statistic is of all.
    pub capped_windows: u64,
}

/// Reads the status from a spool file.
pub fn read(path: &Path, now_ms: i64) -> Result<Status, SpoolError> {
    let reader = SpoolReader::open(path)?;
    let state = reader.agent_state()?;
    let counters = reader.counters()?;
    let (rows, series_known, used_bytes) = reader.totals()?;
    let sinks = reader.sinks()?;
    let recovered = reader.recovery()?.map(|r| RecoveryStatus {
        at: clock::rfc3339_ms(r.at_ms),
        moved_to: r.moved_to.display().to_string(),
        reason: r.reason,
    });
    let restored = reader.restored()?.map(|r| RestoredStatus {
        at: clock::rfc3339_ms(r.at_ms),
        found: r.found,
        moved_to: r.moved_to.map(|p| p.display().to_string()),
        rows: r.rows,
    });
    let file_bytes = [path.to_owned(), wal_path(path)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum::<u64>();
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    let time = |ms: Option<i64>| ms.map(clock::rfc3339_ms);

    let daemon = daemon(state.as_ref(), now_ms);
    let sources = state
        .as_ref()
        .map(|s| s.sources.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|s| SourceStatus {
            name: s.name.clone(),
            kind: s.kind.clone(),
            samples: count(&format!("source.{}.samples", s.name)),
            invalid: count(&format!("source.{}.invalid", s.name)),
            errors: count(&format!("source.{}.errors", s.name)),
            series_dropped: count(&format!("source.{}.series_dropped", s.name)),
            repeats: count(&format!("source.{}.repeats", s.name)),
            nulls: count(&format!("source.{}.nulls", s.name)),
            not_finite: count(&format!("source.{}.not_finite", s.name)),
            last_error: s.last_problem.as_ref().map(|p| p.message.clone()),
            last_error_at: time(s.last_problem.as_ref().map(|p| p.at_ms)),
        })
        .collect::<Vec<SourceStatus>>();
    // Sources count NaN and ±Inf; the aggregator counts any that reach it (none should).
    let non_finite =
        count("samples.non_finite") + sources.iter().map(|s| s.not_finite).sum::<u64>();
    let sinks = sinks
        .into_iter()
        .map(|s| SinkStatus {
            state: if s.retrying_since_ms.is_some() {
                "retrying"
            } else if s.last_success_ms.is_some() {
                "ok"
            } else {
                "idle"
            }
            .to_owned(),
            pending_rows: s.pending_rows,
            pending_partitions: s.pending_partitions,
            oldest_pending: s.oldest_pending.map(clock::rfc3339),
            delivered_parts: s.delivered_parts,
            late_waiting: s.late_waiting,
            late_due: time(s.late_due_ms),
            last_success: time(s.last_success_ms),
            last_error: s.last_error,
            last_error_at: time(s.last_error_ms),
            retrying_since: time(s.retrying_since_ms),
            next_attempt: time(s.next_attempt_ms),
            name: s.name,
            kind: s.kind,
        })
        .collect();
    let live_sinks = state
        .as_ref()
        .map(|s| s.live.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|f| LiveSinkStatus {
            name: f.name.clone(),
            kind: f.kind.clone(),
            state: match (f.connected, f.since_ms) {
                (true, _) => "connected",
                (false, Some(_)) => "disconnected",
                (false, None) => "connecting",
            }
            .to_owned(),
            since: time(f.since_ms),
            published: count(&format!("sink.{}.published", f.name)),
            skipped: count(&format!("sink.{}.skipped", f.name)),
            queued: f.queued,
            last_published: time(f.last_published_ms),
            last_error: f.last_problem.as_ref().map(|p| p.message.clone()),
            last_error_at: time(f.last_problem.as_ref().map(|p| p.at_ms)),
        })
        .collect();
    Ok(Status {
        device: state.as_ref().map(|s| s.device.clone()),
        version: state.as_ref().map(|s| s.version.clone()),
        daemon,
        spool: SpoolStatus {
            path: path.display().to_string(),
            used_bytes,
            file_bytes,
            budget_bytes: state.as_ref().map(|s| s.budget_bytes),
            when_full: state.as_ref().map(|s| s.when_full.clone()),
            rows,
            series_known,
            recovered,
            restored,
        },
        sampling: Sampling {
            series: state.as_ref().map_or(0, |s| s.series),
            samples_per_second: state.as_ref().map_or(0.0, |s| s.samples_per_second),
            open_windows: state.as_ref().map_or(0, |s| s.open_windows),
            window_seconds: state.as_ref().map(|s| s.window_seconds),
            partition_seconds: state.as_ref().map(|s| s.partition_seconds),
        },
        clock: state
            .as_ref()
            .filter(|s| !s.clock.state.is_empty())
            .map(|s| {
                let c = &s.clock;
                ClockStatus {
                    state: c.state.clone(),
                    since: clock::rfc3339_ms(c.since_ms),
                    held_samples: c.held,
                    jumps: c.jumps,
                    last_jump_at: c.last_jump.map(|(at, _)| clock::rfc3339_ms(at)),
                    last_jump_seconds: c.last_jump.map(|(_, by)| by as f64 / 1000.0),
                }
            }),
        sources,
        sinks,
        live_sinks,
        counters: Counters {
            samples: count("samples"),
            non_finite,
            late_samples: count("samples.late"),
            overflow: count("samples.overflow"),
            dropped_rows: count("rows.dropped"),
            lost_rows: count("rows.lost"),
            clamped_samples: count("samples.clamped"),
            held_dropped_samples: count("samples.held_dropped"),
            capped_windows: count("windows.capped"),
        },
    })
}

fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

/// Whether the daemon lives: its pid exists and its heartbeat is at most two windows old.
fn daemon(state: Option<&AgentState>, now_ms: i64) -> Daemon {
    let Some(state) = state else {
        return Daemon {
            state: "never ran".into(),
            pid: None,
            started: None,
            heartbeat: None,
            heartbeat_age_seconds: None,
        };
    };
    let age_ms = (now_ms - state.heartbeat_ms).max(0);
    let fresh = age_ms <= 2 * i64::from(state.window_seconds) * 1000 + 10_000;
    let pid_alive = rustix::process::Pid::from_raw(state.pid as i32)
        .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok());
    let word = match (state.stopped, pid_alive, fresh) {
        (true, _, _) => "stopped",
        (false, true, true) => "running",
        (false, true, false) => "not responding",
        (false, false, _) => "not running",
    };
    Daemon {
        state: word.into(),
        pid: Some(state.pid),
        started: Some(clock::rfc3339_ms(state.started_ms)),
        heartbeat: Some(clock::rfc3339_ms(state.heartbeat_ms)),
        heartbeat_age_seconds: Some(age_ms as f64 / 1000.0),
    }
}

/// "3s", "4m", "2h", "5d".
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn ago(rfc3339: &Option<String>, now_ms: i64) -> String {
    rfc3339
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            format!(
                "{} ago",
                age((now_ms - t.timestamp_millis()) as f64 / 1000.0)
            )
        })
        .unwrap_or_else(|| "never".into())
}

/// The status as a person reads it.
pub fn render(status: &Status, now_ms: i64) -> String {
    let mut out = String::new();
    let device = status.device.as_deref().unwrap_or("(unknown)");
    let version = status
        .version
        .as_deref()
        .unwrap_or(env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "edgespool {version}, device {device}");
    let d = &status.daemon;
    let _ = match (&d.pid, d.heartbeat_age_seconds) {
        (Some(pid), Some(hb)) => writeln!(
            out,
            "daemon    {}, pid {pid}, last heartbeat {} ago, started {}",
            d.state,
            age(hb),
            d.started.as_deref().unwrap_or("?")
        ),
        _ => writeln!(out, "daemon    {}", d.state),
    };
    let s = &status.spool;
    let budget = s
        .budget_bytes
        .map(|b| {
            format!(
                " of {} budget ({})",
                bytes(b),
                s.when_full.as_deref().unwrap_or("?")
            )
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "spool     {}: {} used{budget}, {} on disk, {} windows held",
        s.path,
        bytes(s.used_bytes),
        bytes(s.file_bytes),
        s.rows
    );
    if let Some(r) = &s.recovered {
        let _ = writeln!(
            out,
            "spool     RECOVERED {}: the spool was corrupt ({}); moved to {}, with the windows it held; a fresh spool started",
            r.at, r.reason, r.moved_to
        );
    }
    if let Some(r) = &s.restored {
        let replaced = match &r.moved_to {
            Some(moved) => format!("replaced by another file (moved to {moved})"),
            None => "deleted".to_owned(),
        };
        let _ = writeln!(
            out,
            "spool     RESTORED {}: the spool file was {replaced} while the agent ran; rewritten from the open database with the {} windows it held",
            r.at, r.rows
        );
    }
    let m = &status.sampling;
    let _ = writeln!(
        out,
        "sampling  {} series, {:.1} samples/s, {} windows open, {}s windows, {}s partitions",
        m.series,
        m.samples_per_second,
        m.open_windows,
        m.window_seconds.unwrap_or(0),
        m.partition_seconds.unwrap_or(0)
    );
    if let Some(c) = &status.clock {
        let mut line = match c.state.as_str() {
            "waiting" => format!(
                "clock     waiting since {} for a time service to synchronise it: {} samples held",
                c.since, c.held_samples
            ),
            "unsynchronised" => format!(
                "clock     unsynchronised since {}, trusted as it is",
                c.since
            ),
            other => format!("clock     {other} since {}", c.since),
        };
        if let (Some(at), Some(by)) = (&c.last_jump_at, c.last_jump_seconds) {
            let _ = write!(line, "; {} jumps, the last {by:+}s at {at}", c.jumps);
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "sources");
    for src in &status.sources {
        let problem = match &src.last_error {
            Some(e) => format!("; last error {}: {e}", ago(&src.last_error_at, now_ms)),
            None => String::new(),
        };
        let mut dropped = match src.series_dropped {
            0 => String::new(),
            n => format!(", {n} dropped over max_series"),
        };
        for (n, what) in [
            (src.repeats, "repeats dropped"),
            (src.nulls, "null values"),
            (src.not_finite, "NaN/Inf values"),
        ] {
            if n > 0 {
                let _ = write!(dropped, ", {n} {what}");
            }
        }
        let _ = writeln!(
            out,
            "  {:<12} {:<7} {} samples, {} invalid, {} errors{dropped}{problem}",
            src.name, src.kind, src.samples, src.invalid, src.errors
        );
    }
    let _ = writeln!(out, "sinks");
    for sink in &status.sinks {
        let mut line = format!("  {:<12} {:<7} {}", sink.name, sink.kind, sink.state);
        if let Some(since) = &sink.retrying_since {
            let _ = write!(line, " since {since}");
            if let Some(next) = &sink.next_attempt {
                let _ = write!(line, ", next attempt {next}");
            }
        }
        let _ = write!(line, "; {} rows pending", sink.pending_rows);
        if let Some(oldest) = &sink.oldest_pending {
            let _ = write!(
                line,
                " in {} partitions, oldest {oldest}",
                sink.pending_partitions
            );
        }
        if sink.late_waiting > 0 {
            let _ = write!(line, " ({} of them late", sink.late_waiting);
            if let Some(due) = &sink.late_due {
                let _ = write!(line, ", waiting until {due}");
            }
            line.push(')');
        }
        let _ = write!(
            line,
            "; {} parts delivered, last {}",
            sink.delivered_parts,
            ago(&sink.last_success, now_ms)
        );
        if let Some(err) = &sink.last_error {
            let _ = write!(
                line,
                "; last error {}: {err}",
                ago(&sink.last_error_at, now_ms)
            );
        }
        let _ = writeln!(out, "{line}");
    }
    for feed in &status.live_sinks {
        let mut line = format!("  {:<12} {:<7} live, {}", feed.name, feed.kind, feed.state);
        if let Some(since) = &feed.since {
            let _ = write!(line, " since {since}");
        }
        let _ = write!(
            line,
            "; {} windows published, last {}; {} skipped; {} queued",
            feed.published,
            ago(&feed.last_published, now_ms),
            feed.skipped,
            feed.queued
        );
        if let Some(err) = &feed.last_error {
            let _ = write!(
                line,
                "; last error {}: {err}",
                ago(&feed.last_error_at, now_ms)
            );
        }
        let _ = writeln!(out, "{line}");
    }
    let c = &status.counters;
    let _ = writeln!(
        out,
        "counters  {} samples, {} non-finite dropped, {} late, {} overflow, {} windows dropped by the disk budget, {} lost to an unwritable spool, {} moved past a clock jump",
        c.samples,
        c.non_finite,
        c.late_samples,
        c.overflow,
        c.dropped_rows,
        c.lost_rows,
        c.clamped_samples
    );
    let _ = writeln!(
        out,
        "medians   {} windows over {} values: their median is of the first {} to arrive",
        c.capped_windows,
        crate::flow::MAX_VALUES_PER_WINDOW,
        crate::flow::MAX_VALUES_PER_WINDOW
    );
    out
}

fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(3.4), "3s");
        assert_eq!(age(600.0), "10m");
        assert_eq!(age(3.0 * 3600.0), "3h");
        assert_eq!(age(4.0 * 86_400.0), "4d");
    }
}
