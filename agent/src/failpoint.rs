//! Crash points for the crash tests: `EDGESPOOL_FAILPOINT=NAME` makes the agent kill
//! itself with SIGKILL when it reaches the point `NAME`, exactly as `kill -9` or a power
//! cut would at that instant. Unset (always, outside tests), a point costs one load of a
//! cached value.
//!
//! Points:
//! - `after-upload`: a part was written to its sink, its delivery not yet recorded.

use std::sync::OnceLock;

/// The variable that arms a point.
pub const VARIABLE: &str = "EDGESPOOL_FAILPOINT";

/// Dies here if this point is armed.
pub fn point(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var(VARIABLE).ok());
    if armed.as_deref() == Some(name) {
        tracing::warn!(point = name, "failpoint reached: killing the process");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
