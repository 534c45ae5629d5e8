//! Crash points for the crash tests: `EDGESPOOL_FAILPOINT=NAME` makes the agent kill
//! itself with SIGKILL when it reaches the point `NAME`, exactly as `kill -9` or a power
//! cut would at that instant. Unset (always, outside tests), a point costs one load of a
//! cached value.
//!
//! Points:
//! - `after-upload`: a part was written to a sink, its delivery not yet recorded;
//!   `after-upload:NAME` for the sink named NAME only.

use std::sync::OnceLock;

/// The variable that arms a point.
pub const VARIABLE: &str = "EDGESPOOL_FAILPOINT";

/// Dies here if this point is armed, for any subject or for this one.
pub fn point(name: &str, subject: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let Some(armed) = ARMED.get_or_init(|| std::env::var(VARIABLE).ok()) else {
        return;
    };
    let hit = match armed.split_once(':') {
        Some((point, only)) => point == name && only == subject,
        None => armed == name,
    };
    if hit {
        tracing::warn!(
            point = name,
            subject,
            "failpoint reached: killing the process"
        );
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
