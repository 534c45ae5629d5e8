//! Durations as written in the file: `Seconds` and the "250ms" / "10s" / "1h" deserializer.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// A duration in whole seconds, written like "10s", "1m" or "1h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub NonZeroU32);

impl Seconds {
    /// The number of seconds.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    pub(super) fn new(seconds: u32) -> Self {
        Seconds(NonZeroU32::new(seconds).unwrap_or(NonZeroU32::MIN))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let d = duration(deserializer)?;
        if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > u64::from(u32::MAX) {
            return Err(de::Error::custom(format!(
                "expected a whole number of seconds of at least 1s, got {}",
                humantime::format_duration(d)
            )));
        }
        Ok(Seconds::new(d.as_secs() as u32))
    }
}

/// Deserializes "250ms", "10s", "5m" or "1h 30m".
pub(super) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|err| {
        de::Error::custom(format!(
            "invalid duration {text:?} ({err}); write it like \"500ms\", \"10s\", \"5m\" or \"1h\""
        ))
    })
}
