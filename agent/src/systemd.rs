//! Talking to systemd (`Type=notify`): ready, watchdog, stopping. Outside systemd
//! (no `NOTIFY_SOCKET`) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tracing::{debug, warn};

/// Tells systemd the agent is up (the spool is open and the sources started).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the agent is stopping (flushing its windows).
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("flushing open windows"),
    ]);
}

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(states) {
        warn!(error = %err, "cannot notify systemd");
    }
}

/// Feeds systemd's watchdog (`WatchdogSec=`) at half its period for as long as the spool
/// keeps committing flushes: when no flush has been committed for `stale_after` (the
/// aggregator or the spool is stuck, a hung SD card), feeding stops and systemd restarts
/// the agent. Returns at once when the watchdog is off.
pub async fn watchdog(mut commits: watch::Receiver<u64>, stale_after: Duration) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let tick = (period / 2).max(Duration::from_millis(100));
    debug!(?period, ?stale_after, "feeding the systemd watchdog");
    let mut last_commit = tokio::time::Instant::now();
    let mut interval = tokio::time::interval(tick);
    loop {
        interval.tick().await;
        if commits.has_changed().unwrap_or(false) {
            commits.borrow_and_update();
            last_commit = tokio::time::Instant::now();
        }
        let quiet = last_commit.elapsed();
        if quiet <= stale_after {
            send(&[NotifyState::Watchdog]);
        } else {
            warn!(quiet = ?quiet, "no flush committed for too long: not feeding the watchdog");
        }
    }
}
