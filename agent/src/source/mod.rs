//! Sources: where samples come from.
//!
//! Each configured source runs in its own task ([`SourceTask`]), ticking at its own
//! interval with its own timeout: a slow or failing source never delays the others, and
//! a missed tick is skipped rather than bursted. A source kind only implements
//! [`Source::sample`]; counting, timeouts and logging live here, once. Problems are
//! counted one by one and logged at most once a minute per kind ([`report`]).
//!
//! No value is no sample, in every source alike: a `null` (in a JSON body, a table cell,
//! an MQTT payload) and a NaN or ±Inf (a numeric string such as `"NaN"`, a file reading
//! `nan`, a scale that overflows) make no sample and are counted per source, as
//! `nulls` and `not_finite`; neither is an invalid value nor a problem.

pub(crate) mod http;
mod kept;
#[cfg(feature = "listen")]
mod line_protocol;
#[cfg(feature = "listen")]
pub mod listen;
pub(crate) mod mqtt;
#[cfg(feature = "serial")]
pub(crate) mod serial;
mod sysfs;
pub use kept::raise_open_file_limit;
pub(crate) use sysfs::parse_file;
mod report;
mod system;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tracing::{debug, warn};

use crate::clock;
use crate::config::{Repeats, SourceConfig, SourceKind};
use crate::flow::{Sample, Sampled, Series, SourceStats, Stamp};
use report::{Kind, Line, Reports};

/// What one sampling produced: samples, and the problems met on the way.
#[derive(Debug, Default)]
pub struct Batch {
    /// When the sampling started, in Unix milliseconds: the default timestamp.
    pub now_ms: i64,
    /// The samples read.
    pub samples: Vec<Sample>,
    /// Values that were present but unusable (not a number, failed CRC, bad timestamp).
    pub invalid: Vec<String>,
    /// Reads that failed outright for part of the source (e.g. one vanished file).
    pub errors: Vec<String>,
    /// Samples dropped because their series would pass the source's `max_series`.
    pub series_dropped: u64,
    /// What the first of them was, for the log and `status` (made once per batch).
    pub series_refused: Option<String>,
    /// `null` values met: no sample.
    pub nulls: u64,
    /// NaN or ±Inf values met: no sample.
    pub not_finite: u64,
}

impl Batch {
    /// A sample read now (stamped with the sampling's start).
    fn push_now(&mut self, series: &Arc<Series>, value: f64) {
        self.push(series, Stamp::Own(self.now_ms), value);
    }

    /// Counts a sample dropped for a series beyond `max` (`series`, the name it would
    /// have had, is made only for the first of a batch).
    fn refuse(&mut self, max: u32, series: impl FnOnce() -> String) {
        self.series_dropped += 1;
        if self.series_refused.is_none() {
            self.series_refused = Some(format!(
                "max_series ({max}) reached: {} and other new series are not made",
                series()
            ));
        }
    }

    /// A sample with its own stamp; a NaN or ±Inf value makes none and is counted.
    fn push(&mut self, series: &Arc<Series>, stamp: Stamp, value: f64) {
        if !value.is_finite() {
            self.not_finite += 1;
            return;
        }
        let (timestamp_ms, own_clock) = match stamp {
            Stamp::Own(ms) => (ms, true),
            Stamp::Device(ms) => (ms, false),
        };
        self.samples.push(Sample {
            series: Arc::clone(series),
            timestamp_ms,
            value,
            own_clock,
        });
    }
}

/// Why a whole sampling failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    /// An HTTP request failed.
    #[error("request failed: {reason}")]
    Http { reason: String },
    /// The response or file was not what the configuration says it is.
    #[error("{reason}")]
    Parse { reason: String },
}

/// A kind of source: produces one batch of samples per tick.
#[async_trait::async_trait]
pub trait Source: Send {
    /// Reads once, adding samples and per-value problems to `batch`.
    async fn sample(&mut self, batch: &mut Batch) -> Result<(), SourceError>;
}

/// Builds the source a configuration entry describes.
pub fn build(config: &SourceConfig, spool_path: &Path) -> Result<Box<dyn Source>, SourceError> {
    Ok(match &config.kind {
        SourceKind::System(s) => Box::new(system::SystemSource::new(&config.name, s, spool_path)),
        SourceKind::Sysfs(s) => Box::new(sysfs::SysfsSource::new(&config.name, s)),
        SourceKind::Http(s) => Box::new(http::HttpSource::new(&config.name, s, config.timeout)?),
        SourceKind::Mqtt(s) => Box::new(mqtt::MqttSource::new(&config.name, s)?),
        // Design: a server is no sampled source; `run` starts it as a task of its own.
        SourceKind::Listen(_) => {
            return Err(SourceError::Parse {
                reason: "a listen source is served by listen::ListenServer, not sampled".into(),
            });
        }
        #[cfg(feature = "serial")]
        SourceKind::Serial(s) => Box::new(serial::SerialSource::new(&config.name, s)?),
        // The configuration refuses a kind this build lacks; this is the last guard.
        #[cfg(not(feature = "serial"))]
        SourceKind::Serial(_) => {
            return Err(SourceError::Parse {
                reason: "this build of edgespool has no serial source".into(),
            });
        }
    })
}

/// The task that drives one source.
pub struct SourceTask {
    source: Box<dyn Source>,
    interval: Duration,
    timeout: Duration,
    stats: Arc<SourceStats>,
    keep_repeats: bool,
    samples: mpsc::Sender<Sampled>,
    shutdown: watch::Receiver<bool>,
}

impl SourceTask {
    /// Wires a source to the aggregator's channel.
    pub fn new(
        config: &SourceConfig,
        source: Box<dyn Source>,
        stats: Arc<SourceStats>,
        samples: mpsc::Sender<Sampled>,
        shutdown: watch::Receiver<bool>,
    ) -> SourceTask {
        SourceTask {
            source,
            interval: config.interval,
            timeout: config.timeout,
            stats,
            keep_repeats: config.repeats == Repeats::Keep,
            samples,
            shutdown,
        }
    }

    /// Samples at every tick until shutdown.
    pub async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let name = self.stats.name.clone();
        let mut reports = Reports::new(REPORT_PERIOD);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.shutdown.changed() => return,
            }
            let at = std::time::Instant::now();
            let mut batch = Batch {
                now_ms: clock::now_ms(),
                ..Batch::default()
            };
            let now_ms = batch.now_ms;
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(self.timeout, self.source.sample(&mut batch)) => outcome,
                _ = self.shutdown.changed() => return,
            };
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(err)) => Some(err.to_string()),
                Err(_) => Some(format!(
                    "timed out after {}",
                    humantime::format_duration(self.timeout)
                )),
            };
            let stats = &self.stats;
            if let Some(message) = failure {
                stats.count_error();
                stats.problem(now_ms, message.clone());
                log(&name, reports.note(Kind::Failed, at, 1, message));
                failing = true;
            } else if failing {
                debug!(source = %name, "sampling works again");
                failing = false;
            }
            let problems = [
                (Kind::Read, std::mem::take(&mut batch.errors)),
                (Kind::Invalid, std::mem::take(&mut batch.invalid)),
            ];
            for (kind, messages) in problems {
                let last = messages.len().saturating_sub(1);
                for (i, message) in messages.into_iter().enumerate() {
                    match kind {
                        Kind::Read => stats.count_error(),
                        _ => stats.count_invalid(),
                    }
                    if i == last {
                        // Design: `status` shows the latest; one copy per batch, not per value.
                        stats.problem(now_ms, message.clone());
                    }
                    log(&name, reports.note(kind, at, 1, message));
                }
            }
            if batch.series_dropped > 0 {
                stats.count_series_dropped(batch.series_dropped);
                if let Some(message) = batch.series_refused.take() {
                    stats.problem(now_ms, message.clone());
                    let line = reports.note(Kind::SeriesDropped, at, batch.series_dropped, message);
                    log(&name, line);
                }
            }
            for line in reports.due(at) {
                log(&name, Some(line));
            }
            stats.count_samples(batch.samples.len() as u64);
            stats.count_no_value(batch.nulls, batch.not_finite);
            // Design: a batch travels whole, so one response is aggregated in one flush.
            if !batch.samples.is_empty() {
                let sampled = Sampled {
                    samples: batch.samples,
                    now_ms,
                    at,
                    source: Some(Arc::clone(&self.stats)),
                    keep_repeats: self.keep_repeats,
                };
                if self.samples.send(sampled).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// How often each kind of problem of a source may be logged.
const REPORT_PERIOD: Duration = Duration::from_secs(60);

/// Writes a rate-limited line, if there is one.
fn log(source: &str, line: Option<Line>) {
    let Some(Line {
        kind,
        message,
        more,
        first,
    }) = line
    else {
        return;
    };
    let what = match kind {
        Kind::Failed => "sampling failed",
        Kind::Read => "read failed",
        Kind::Invalid => "invalid value",
        Kind::SeriesDropped if first => {
            "too many series: samples of further series are dropped and counted"
        }
        Kind::SeriesDropped => "samples of further series dropped",
    };
    if more == 0 {
        warn!(source = %source, error = %message, "{what}");
    } else {
        warn!(source = %source, error = %message, "{what} ({more} more since the last report)");
    }
}

/// Reads a timestamp from JSON: RFC 3339 text with an offset, or a number of seconds
/// (milliseconds when its magnitude is 1e11 or more: seconds would be past the year
/// 5138) since the Unix epoch, negative before it. Every form floors to the
/// millisecond, so an instant belongs to the window, hour and year it is in: RFC 3339's
/// digits past the millisecond and a number's past the third decimal of a second are
/// dropped towards the past (`23:59:59.9996Z` is `23:59:59.999Z`, -0.0004 s is -1 ms).
pub fn parse_timestamp(value: &serde_json::Value) -> Result<i64, String> {
    let ms = match value {
        serde_json::Value::Number(n) => {
            epoch_ms(n).ok_or_else(|| format!("timestamp {n} is not a time"))?
        }
        serde_json::Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            // Whole seconds floor, and the fraction is positive: a floor to the ms.
            .map(|t| t.timestamp_millis())
            .map_err(|_| {
                if chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").is_ok() {
                    format!("timestamp {text:?} has no UTC offset, so its instant is unknown")
                } else {
                    format!("timestamp {text:?} is not RFC 3339")
                }
            })?,
        other => {
            return Err(format!(
                "timestamp {other} is neither a number nor a string"
            ));
        }
    };
    if ms < EARLIEST_MS {
        return Err(format!("timestamp {value} is before the year 1"));
    }
    Ok(ms)
}

/// 0001-01-01T00:00:00Z in Unix ms: the earliest timestamp taken.
const EARLIEST_MS: i64 = -62_135_596_800_000;

/// The unit of an epoch number, told by its magnitude, as the power of ten that makes it
/// milliseconds: seconds below 1e11 (until the year 5138), milliseconds below 1e14,
/// microseconds below 1e17, nanoseconds above (InfluxDB's and Go's default precision).
fn ms_scale(magnitude: f64) -> i32 {
    if magnitude < 1e11 {
        3
    } else if magnitude < 1e14 {
        0
    } else if magnitude < 1e17 {
        -3
    } else {
        -6
    }
}

/// A JSON number of epoch seconds, milliseconds, microseconds or nanoseconds (by its
/// magnitude, see [`ms_scale`]), floored to the millisecond.
///
/// Design: a fraction is read from the number's decimal digits, not from its `f64`:
/// 1700000000.123 is 1700000000.12299990654 as an `f64`, and a float floor of that
/// times 1000 could give ...122. serde_json prints an `f64` as the shortest decimal that
/// reads back as it, which is the text the device sent whenever that had at most 15
/// significant digits.
fn epoch_ms(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return match ms_scale(i.unsigned_abs() as f64) {
            3 => i.checked_mul(1000),
            0 => Some(i),
            // Microseconds or nanoseconds: floor division, towards the past.
            scale => Some(i.div_euclid(10_i64.pow(scale.unsigned_abs()))),
        };
    }
    let x = n.as_f64().filter(|x| x.is_finite())?;
    let text = n.to_string();
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    // digits × 10^scale is the magnitude, in ms.
    let scale = exponent - fraction.len() as i32 + ms_scale(x.abs());
    let magnitude = if scale >= 0 {
        digits.checked_mul(10u128.checked_pow(scale as u32)?)?
    } else {
        let divisor = 10u128
            .checked_pow(scale.unsigned_abs())
            .unwrap_or(u128::MAX);
        let (quotient, remainder) = (digits / divisor, digits % divisor);
        // Towards the past: a negative instant with a fraction goes one ms further back.
        quotient + u128::from(negative && remainder != 0)
    };
    let magnitude = i64::try_from(magnitude).ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_read_as_seconds_milliseconds_or_rfc3339() {
        assert_eq!(
            parse_timestamp(&json!(1_700_000_000)),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_timestamp(&json!(1_700_000_000_123_i64)),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            parse_timestamp(&json!(1_700_000_000.5)),
            Ok(1_700_000_000_500)
        );
        assert_eq!(
            parse_timestamp(&json!(1_700_000_000.123)),
            Ok(1_700_000_000_123)
        );
        assert_eq!(parse_timestamp(&json!(-1.5)), Ok(-1_500));
        assert_eq!(
            parse_timestamp(&json!(-62_135_596_801_i64)),
            Err("timestamp -62135596801 is before the year 1".into())
        );
        assert_eq!(
            parse_timestamp(&json!("2026-11-21T15:05:33+01:00")),
            Ok(1_795_269_933_000)
        );
        assert_eq!(
            parse_timestamp(&json!("2026-11-21T14:05:33")),
            Err(
                "timestamp \"2026-11-21T14:05:33\" has no UTC offset, so its instant is unknown"
                    .into()
            )
        );
        assert!(parse_timestamp(&json!(true)).is_err());
    }

    /// 2025-12-31T23:59:59.9996Z, less than a millisecond before a year's end, in every
    /// form a source takes: each floors to 23:59:59.999, in 2025.
    #[test]
    fn epoch_microseconds_and_nanoseconds_floor_to_the_millisecond() {
        // 2026-12-31T23:59:59.9996Z: the last millisecond of the year, not the next year.
        let last_ms = 1_798_761_599_999;
        assert_eq!(
            parse_timestamp(&json!(1_798_761_599_999_600_i64)),
            Ok(last_ms)
        );
        assert_eq!(
            parse_timestamp(&json!(1_798_761_599_999_600_000_i64)),
            Ok(last_ms)
        );
        assert_eq!(parse_timestamp(&json!(1.7987615999996e15)), Ok(last_ms));
        // Before 1970, towards the past: -1.5 ms in microseconds is -2 ms.
        assert_eq!(
            parse_timestamp(&json!(-100_000_000_001_500_i64)),
            Ok(-100_000_000_002)
        );
        assert_eq!(
            parse_timestamp(&json!(1_700_000_000_123_456_789_i64)),
            Ok(1_700_000_000_123)
        );
    }

    #[test]
    fn every_timestamp_form_floors_to_the_millisecond() {
        const LAST_MS_OF_2025: i64 = 1_767_225_599_999;
        let forms = [
            json!(1_767_225_599.999_6_f64),
            json!(1_767_225_599_999.6_f64),
            json!("2025-12-31T23:59:59.9996Z"),
            json!("2025-12-31T23:59:59.999999999Z"),
            json!("2026-01-01T00:59:59.9996+01:00"),
            json!("2025-12-31T18:59:59.9996-05:00"),
        ];
        for form in &forms {
            assert_eq!(parse_timestamp(form), Ok(LAST_MS_OF_2025), "{form}");
        }
        // Before the epoch too: towards the past, not towards zero.
        for form in [json!(-0.0004_f64), json!("1969-12-31T23:59:59.9996Z")] {
            assert_eq!(parse_timestamp(&form), Ok(-1), "{form}");
        }
        assert_eq!(parse_timestamp(&json!(-1e-3_f64)), Ok(-1));
        assert_eq!(
            parse_timestamp(&json!(-120_000_000_000_i64)),
            Ok(-120_000_000_000)
        );
        assert_eq!(parse_timestamp(&json!(-1.5e11_f64)), Ok(-150_000_000_000));
        assert_eq!(parse_timestamp(&json!(1e12_f64)), Ok(1_000_000_000_000));
    }
}
