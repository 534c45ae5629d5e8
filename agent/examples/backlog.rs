//! Fills a spool with a backlog, as if the agent had been offline: `HOURS` hours of
//! `SERIES` series in 60 s windows, ending at 2026-01-01T00:00Z, for the drain benchmark
//! (scripts/bench-drain.sh). Written as the agent writes it: one flush (one batch) per
//! window, holding that window of every series. The values depend on the series and
//! the window alone, so two backlogs of the same size are the same rows, and two drains
//! of them land the same bytes.
//!
//!     cargo run --release --example backlog -- SPOOL [HOURS] [SERIES]

mod common;

use edgespool::config::WhenFull;
use edgespool::flow::WindowRow;
use edgespool::spool::{Spool, SpoolOptions};

use common::{Spread, flush};

/// 2026-01-01T00:00:00Z: the backlog's end, in the past, so its partitions are closed.
const END: i64 = 1_767_225_600;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: backlog SPOOL [HOURS] [SERIES]")?;
    let hours: i64 = args.next().map_or(Ok(168), |a| a.parse())?;
    let series_count: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let window = 60_i64;
    let options = SpoolOptions {
        device: "bench".into(),
        window_seconds: window as u32,
        partition_seconds: 3600,
        grace_ms: 0,
        budget_bytes: 16 << 30,
        when_full: WhenFull::DropOldest,
        sources: Vec::new(),
        sinks: Vec::new(),
        live: Vec::new(),
        late: Default::default(),
        each_flush: Default::default(),
    };
    let mut spool = Spool::open(std::path::Path::new(&path), options)?;
    let series = common::series(series_count);
    let spread = Spread {
        count: 60,
        half_range: 0.5,
        stdev: 0.29,
        first_ms: 0,
        last_ms: window * 1000 - 1,
    };
    let start = END - hours * 3600;
    let mut total = 0usize;
    for window_start in (start..END).step_by(window as usize) {
        let rows: Vec<WindowRow> = series
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = 20.0 + i as f64 * 0.1 + ((window_start / window) % 600) as f64 * 0.01;
                common::window(s, window_start, window as u32, v, &spread)
            })
            .collect();
        total += rows.len();
        // One flush per window, as the agent commits each window as it closes.
        spool.commit(&flush(rows, (window_start + window) * 1000))?;
    }
    println!("{total} windows from {start} to {END} in {path}");
    Ok(())
}
