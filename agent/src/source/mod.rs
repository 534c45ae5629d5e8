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
pub(crate) mod mqtt;
mod sysfs;
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
/// (milliseconds when it is too large to be seconds) since the Unix epoch.
pub fn parse_timestamp(value: &serde_json::Value) -> Result<i64, String> {
    match value {
        serde_json::Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if !x.is_finite() || x < 0.0 {
                return Err(format!("timestamp {n} is not a time"));
            }
            // Seconds until the year 5138; beyond that the number must be milliseconds.
            let ms = if x < 1e11 { x * 1000.0 } else { x };
            Ok(ms.round() as i64)
        }
        serde_json::Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| t.timestamp_millis())
            .map_err(|_| {
                if chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").is_ok() {
                    format!("timestamp {text:?} has no UTC offset, so its instant is unknown")
                } else {
                    format!("timestamp {text:?} is not RFC 3339")
                }
            }),
        other => Err(format!(
            "timestamp {other} is neither a number nor a string"
        )),
    }
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
}
