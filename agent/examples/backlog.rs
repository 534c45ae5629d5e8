//! Fills a spool with a backlog, as if the agent had been offline: `DAYS` days of
//! `SERIES` series in 60 s windows, ending an hour ago, for the drain benchmark
//! (scripts/bench-drain.sh).
//!
//!     cargo run --release --example backlog -- SPOOL [DAYS] [SERIES]

use std::sync::Arc;

use edgespool::config::WhenFull;
use edgespool::flow::{AggregateCounts, Flush, Series, Stats, WindowRow};
use edgespool::spool::{Spool, SpoolOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: backlog SPOOL [DAYS] [SERIES]")?;
    let days: i64 = args.next().map_or(Ok(7), |a| a.parse())?;
    let series_count: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let window = 60_i64;
    let options = SpoolOptions {
        device: "bench".into(),
        window_seconds: window as u32,
        partition_seconds: 3600,
        grace_ms: 0,
        budget_bytes: 4 << 30,
        when_full: WhenFull::DropOldest,
        sources: Vec::new(),
        sinks: Vec::new(),
        live: Vec::new(),
        late: Default::default(),
        each_flush: Default::default(),
    };
    let mut spool = Spool::open(std::path::Path::new(&path), options)?;
    let series: Vec<Arc<Series>> = (0..series_count)
        .map(|i| Arc::new(Series::new(format!("hw.t{i}"), Some("celsius"))))
        .collect();
    let now = edgespool::clock::now_ms() / 1000;
    let end = (now / 3600 - 1) * 3600;
    let start = end - days * 86_400;
    let mut rows = Vec::new();
    let mut total = 0usize;
    for window_start in (start..end).step_by(window as usize) {
        for (i, s) in series.iter().enumerate() {
            let v = 20.0 + i as f64 * 0.1 + ((window_start / window) % 600) as f64 * 0.01;
            rows.push(WindowRow {
                series: Arc::clone(s),
                start: window_start,
                seconds: window as u32,
                stats: Stats {
                    count: 60,
                    min: v - 0.5,
                    max: v + 0.5,
                    mean: v,
                    mean_rest: 0.0,
                    stdev: Some(0.29),
                    median: v,
                    first: v - 0.1,
                    first_ms: window_start * 1000,
                    last: v + 0.1,
                    last_ms: (window_start + window) * 1000 - 1,
                },
            });
        }
        // One flush per simulated hour, as an agent with hourly partitions would commit
        // them (in 60 flushes; one here, to be quick).
        if (window_start + window) % 3600 == 0 {
            total += rows.len();
            spool.commit(&Flush {
                rows: std::mem::take(&mut rows),
                now_ms: (window_start + window) * 1000,
                aggregate: AggregateCounts::default(),
                sources: Vec::new(),
                open_windows: 0,
                live: Vec::new(),
                clock: Default::default(),
                marks: Vec::new(),
            })?;
        }
    }
    println!("{total} windows from {start} to {end} in {path}");
    Ok(())
}
