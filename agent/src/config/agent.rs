//! The `[agent]` table: the device, the spool, the windows and the clock, with their defaults.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::durations::{Seconds, duration};
use super::{quoted, valid_key_part};

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

/// An error of the `[agent]` table: the key whose value is at fault (none: the table),
/// and the message.
pub(super) type AgentError = (Option<&'static str>, String);

/// The smallest `disk_budget`: an empty spool takes a few dozen KiB, and a budget must
/// leave room for the partitions that are filling.
const LEAST_BUDGET: u64 = 1024 * 1024;

/// The largest `disk_budget`: the spool is one SQLite file of 1 KiB pages, and SQLite
/// holds at most 2^32 − 2 pages in a file, so a spool never grows past 4 TiB.
const MOST_BUDGET: u64 = 4 * 1024 * 1024 * 1024 * 1024;

/// The device id: `agent.device_id`, or the host name `host` gives; either must be a
/// plain name, since it names folders and files of the object keys (`device=…`).
pub(super) fn device_id(
    agent: &AgentConfig,
    host: impl FnOnce() -> String,
) -> Result<String, AgentError> {
    if let Some(id) = &agent.device_id {
        return match valid_key_part(id) {
            Ok(()) => Ok(id.clone()),
            Err(why) => Err((
                Some("device_id"),
                format!("agent.device_id {} {why}", quoted(id)),
            )),
        };
    }
    let host = host();
    match valid_key_part(&host) {
        Ok(()) => Ok(host),
        Err(why) => Err((
            None,
            format!(
                "agent.device_id is not set and the host name {} cannot stand for it: a device id {why}; set agent.device_id",
                quoted(&host)
            ),
        )),
    }
}

/// The checks on the `[agent]` table that its types cannot make.
pub(super) fn validate_agent(agent: &AgentConfig) -> Result<(), AgentError> {
    let (window, partition) = (agent.window.get(), agent.partition.get());
    if partition % window != 0 {
        return Err((
            None,
            format!(
                "agent.partition ({partition}s) must be a whole multiple of agent.window ({window}s)"
            ),
        ));
    }
    if partition % 60 != 0 {
        return Err((
            None,
            format!(
                "agent.partition ({partition}s) must be a whole number of minutes: object keys name partitions to the minute"
            ),
        ));
    }
    if 86_400 % partition != 0 {
        return Err((
            None,
            format!(
                "agent.partition ({partition}s) must divide a day evenly (e.g. 1m, 10m, 1h, 6h, 24h)"
            ),
        ));
    }
    let budget = agent.disk_budget.as_u64();
    if !(LEAST_BUDGET..=MOST_BUDGET).contains(&budget) {
        return Err((
            Some("disk_budget"),
            format!(
                "agent.disk_budget ({}) must be at least 1 MiB and at most 4 TiB (the most an SQLite spool of 1 KiB pages can hold)",
                agent.disk_budget.display().iec()
            ),
        ));
    }
    check_spool(&agent.spool).map_err(|why| {
        (
            Some("spool"),
            format!(
                "agent.spool {} {why}",
                quoted(&agent.spool.to_string_lossy())
            ),
        )
    })
}

/// The spool is a regular file, or nothing yet in a folder that is or can be created;
/// nothing is created here.
fn check_spool(path: &Path) -> Result<(), String> {
    let text = path.as_os_str().as_encoded_bytes();
    if text.is_empty() {
        return Err(
            "is empty; give the path of the spool file, e.g. \"/var/lib/edgespool/spool.db\""
                .to_owned(),
        );
    }
    if text.ends_with(b"/") || path.file_name().is_none() {
        return Err(
            "names a folder; give the path of a file in it, e.g. \"/var/lib/edgespool/spool.db\""
                .to_owned(),
        );
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => return Ok(()),
        Ok(meta) if meta.is_dir() => {
            return Err(format!(
                "is a folder; give the path of a file in it, e.g. {:?}",
                path.join("spool.db").to_string_lossy()
            ));
        }
        Ok(meta) => {
            let what = file_type(&meta.file_type());
            return Err(format!(
                "is {what}, not a regular file: the spool is an SQLite file (with -wal and -shm files beside it); give a path that is a regular file or does not exist yet"
            ));
        }
        Err(_) => {}
    }
    // Nothing there (or nothing this user may see): the nearest folder that exists must
    // be a folder, for the spool's folders to be created under it.
    for dir in path.ancestors().skip(1) {
        if dir.as_os_str().is_empty() {
            break;
        }
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => break,
            Ok(meta) => {
                return Err(format!(
                    "cannot be created: {} is {}, not a folder",
                    dir.display(),
                    file_type(&meta.file_type())
                ));
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// What a file that is not a regular file is, for errors.
fn file_type(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a folder"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_fifo() {
        "a named pipe"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_file() {
        "a file"
    } else {
        "a special file"
    }
}
