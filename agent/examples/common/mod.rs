//! What the benchmark examples share (`backlog`, `late_files`): the series they name,
//! the windows they write and a flush of them as the agent commits one.

use std::sync::Arc;

use edgespool::flow::{Flush, Series, Stats, WindowRow};

/// `count` series `hw.t0`, `hw.t1`, … in degrees Celsius, as a sysfs source names them.
pub fn series(count: usize) -> Vec<Arc<Series>> {
    (0..count)
        .map(|i| Arc::new(Series::new(format!("hw.t{i}"), Some("celsius"))))
        .collect()
}

/// How a window's samples lie around its value.
pub struct Spread {
    /// Samples in the window.
    pub count: u64,
    /// The minimum and maximum are this far below and above the value.
    pub half_range: f64,
    /// The standard deviation.
    pub stdev: f64,
    /// The first and last sample's time, in ms after the window's start.
    pub first_ms: i64,
    pub last_ms: i64,
}

/// One window of `series` at `start` (Unix seconds) with mean and median `value`; the
/// first sample 0.1 below it, the last 0.1 above.
pub fn window(
    series: &Arc<Series>,
    start: i64,
    seconds: u32,
    value: f64,
    spread: &Spread,
) -> WindowRow {
    WindowRow {
        series: Arc::clone(series),
        start,
        seconds,
        stats: Stats {
            count: spread.count,
            min: value - spread.half_range,
            max: value + spread.half_range,
            mean: value,
            mean_rest: 0.0,
            stdev: Some(spread.stdev),
            median: value,
            first: value - 0.1,
            first_ms: start * 1000 + spread.first_ms,
            last: value + 0.1,
            last_ms: start * 1000 + spread.last_ms,
        },
    }
}

/// A flush of `rows` at `now_ms` with nothing else in it.
pub fn flush(rows: Vec<WindowRow>, now_ms: i64) -> Flush {
    Flush::of_rows(rows, now_ms)
}
