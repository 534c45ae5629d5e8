//! Files per partition and bytes per file for a simulated day with stragglers, through the
//! real spool (its planning of parts, `late_grace` and `late_max_rows`) and the real
//! Parquet encoder, for the late-rows benchmark (scripts/bench-late.sh).
//!
//! One device, `SERIES` series in 60 s windows, hourly partitions, a flush a minute.
//! Every flush brings the minute's windows and, with a chance of 40%, one to three
//! stragglers: a window of a random series from a random minute of the last three hours
//! (a sensor that buffers readings and sends them again when its radio is back). The
//! uploader plans and delivers everything due after each flush, as an agent whose sink
//! is always up; the day ends with three quiet hours so that every late row goes out.
//!
//!     cargo run --example late_files -- SPOOL LATE_GRACE_SECONDS [SERIES] [SEED]

mod common;

use std::collections::BTreeMap;

use edgespool::config::{Compression, Format, Layout, WhenFull};
use edgespool::sink::{Encoding, Part, encode};
use edgespool::spool::{LateParts, Plan, Spool, SpoolOptions, SpoolReader};

/// xorshift64*: the same day for the same seed, without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A straggler's window as the day's: 12 samples, between 2 s and 57 s of the minute.
const SPREAD: common::Spread = common::Spread {
    count: 12,
    half_range: 0.4,
    stdev: 0.21,
    first_ms: 2_000,
    last_ms: 57_000,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: late_files SPOOL LATE_GRACE_SECONDS [SERIES] [SEED]")?;
    let grace_s: i64 = args.next().ok_or("LATE_GRACE_SECONDS")?.parse()?;
    let series_count: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let seed: u64 = args.next().map_or(Ok(15), |a| a.parse())?;
    let _ = std::fs::remove_file(&path);
    let sink = "lake".to_owned();
    let options = SpoolOptions {
        device: "bench".into(),
        window_seconds: 60,
        partition_seconds: 3600,
        // The agent's default `grace` of 60 s, plus the 2 s before the last window is in.
        grace_ms: 62_000,
        budget_bytes: 256 << 20,
        when_full: WhenFull::DropOldest,
        sources: Vec::new(),
        sinks: vec![(sink.clone(), "s3")],
        live: Vec::new(),
        late: [(
            sink.clone(),
            LateParts {
                grace_ms: grace_s * 1000,
                max_rows: 10_000,
            },
        )]
        .into(),
        each_flush: Default::default(),
    };
    let mut spool = Spool::open(std::path::Path::new(&path), options)?;
    let mut reader = SpoolReader::open(std::path::Path::new(&path))?;
    let series = common::series(series_count);
    let encoding = Encoding {
        format: Format::Parquet,
        layout: Layout::Long,
        compression: Compression::Zstd,
    };
    let mut rng = Rng(seed.max(1));
    let day_start: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
    // (partition, part) → (rows, bytes)
    let mut files: BTreeMap<(i64, u32), (usize, usize)> = BTreeMap::new();
    let (mut stragglers, mut windows) = (0usize, 0usize);
    for minute in 0..(27 * 60) {
        let start = day_start + minute * 60;
        let now_ms = (start + 62) * 1000;
        let mut rows = Vec::new();
        if minute < 24 * 60 {
            for (i, s) in series.iter().enumerate() {
                rows.push(common::window(
                    s,
                    start,
                    60,
                    20.0 + i as f64 + minute as f64 * 0.01,
                    &SPREAD,
                ));
            }
            if minute >= 60 && rng.below(10) < 4 {
                for _ in 0..=rng.below(3) {
                    let back = 1 + rng.below(180.min(minute as u64)) as i64;
                    let s = &series[rng.below(series_count as u64) as usize];
                    rows.push(common::window(s, start - back * 60, 60, -1.0, &SPREAD));
                    stragglers += 1;
                }
            }
        }
        windows += rows.len();
        spool.commit(&common::flush(rows, now_ms))?;
        while let Plan::Ready(plan) = spool.plan(&sink, now_ms)? {
            let part = reader.read_part(&plan, false)?;
            let bytes = encode(
                encoding,
                &Part {
                    device: "bench",
                    rows: &part.rows,
                    series: &part.series,
                },
            )?;
            files.insert((plan.partition, plan.part), (part.rows.len(), bytes.len()));
            spool.delivered(&plan, now_ms)?;
        }
    }
    let partitions: BTreeMap<i64, usize> = files.keys().fold(BTreeMap::new(), |mut m, (p, _)| {
        *m.entry(*p).or_default() += 1;
        m
    });
    let mut sizes: Vec<usize> = files.values().map(|(_, b)| *b).collect();
    sizes.sort_unstable();
    let total: usize = sizes.iter().sum();
    let tiny = files.values().filter(|(rows, _)| *rows <= 2).count();
    let delivered: usize = files.values().map(|(rows, _)| *rows).sum();
    println!(
        "late_grace {grace_s} s: {windows} windows ({stragglers} stragglers), {delivered} delivered; \
         {} partitions, {} files: {:.1} files per partition (most {}), {} files of <= 2 rows; \
         bytes per file: mean {}, median {}; {} bytes in all",
        partitions.len(),
        files.len(),
        files.len() as f64 / partitions.len().max(1) as f64,
        partitions.values().max().unwrap_or(&0),
        tiny,
        total / files.len().max(1),
        sizes.get(sizes.len() / 2).unwrap_or(&0),
        total
    );
    Ok(())
}
