//! The `[agent]` table: the device, the spool, the windows and the clock, with their defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::durations::{Seconds, duration};

/// The `[agent]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Names this device in object keys and rows; defaults to the host name.
    #[serde(default)]
    pub device_id: Option<String>,
    /// The SQLite spool file.
    #[serde(default = "default_spool")]
    pub spool: PathBuf,
    /// Length of the aggregation windows, in whole seconds ("60s").
    #[serde(default = "default_window")]
    pub window: Seconds,
    /// Length of an uploaded partition, in whole seconds ("1h"); a multiple of `window`
    /// that divides a day.
    #[serde(default = "default_partition")]
    pub partition: Seconds,
    /// How long a partition stays open for stragglers once its last window is flushed
    /// (which is 2 s after its end).
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub grace: Duration,
    /// The most the spool may hold on disk ("256 MiB").
    #[serde(default = "default_budget")]
    pub disk_budget: bytesize::ByteSize,
    /// What to do when the spool reaches `disk_budget`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Whether to wait for a synchronised clock before stamping samples.
    #[serde(default)]
    pub clock: ClockPolicy,
    /// The longest wait for the clock to be synchronised (default 10m); after it the
    /// clock is trusted as it is.
    #[serde(default = "default_clock_wait", deserialize_with = "duration")]
    pub clock_wait: Duration,
}

fn default_clock_wait() -> Duration {
    Duration::from_secs(600)
}

/// Whether the agent trusts an unsynchronised clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockPolicy {
    /// Hold the samples the agent stamps while a time service (systemd-timesyncd,
    /// chrony, ntpd) has not synchronised the clock yet, up to `clock_wait`, then stamp
    /// them by how long ago they were taken. Without a time service, trust the clock.
    #[default]
    Auto,
    /// Always trust the clock (a real-time clock, GPS time, a container).
    Trust,
}

/// The full-disk policy of the spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest spooled windows, delivered or not, to make room for new ones.
    #[default]
    DropOldest,
    /// Keep what is spooled and discard new windows until there is room again.
    StopSampling,
}

fn default_spool() -> PathBuf {
    PathBuf::from("/var/lib/edgespool/spool.db")
}
fn default_window() -> Seconds {
    Seconds::new(60)
}
fn default_partition() -> Seconds {
    Seconds::new(3600)
}
fn default_grace() -> Duration {
    Duration::from_secs(60)
}
fn default_budget() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(256)
}
