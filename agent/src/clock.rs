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
