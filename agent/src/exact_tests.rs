//! Statistics against an exact computation: random samples through the timestamp parser,
//! the aggregator, the spool (written and read back) and a merge, compared with integer
//! arithmetic done here; and the time rule at window, hour and year edges.
//!
//! Values are drawn on a grid, `offset + j × 2^-q` with integers `j`, so that every
//! value is an exact `f64` and the exact mean and variance follow from sums of `j` and
//! `j²` in `i128`. Times are drawn in microseconds and written as the sources read them
//! (epoch seconds with decimals, RFC 3339 with a fraction, with an offset); the
//! reference floors them to the millisecond with integer division.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::aggregate::{Aggregator, Pushed};
use crate::flow::{Flush, Sample, Series, Stats, WindowRow};
use crate::source::parse_timestamp;
use crate::spool::{Plan, Spool, SpoolOptions, SpoolReader};

/// Samples that share a timestamp are ties here, as a source with `repeats = "keep"` takes
/// them; one pass of the random test takes the same arrivals with repeats dropped, the
/// default, against a reference that keeps the first of each millisecond.
const KEEP_TIES: bool = true;

const WINDOW: u32 = 60;
const PARTITION: u32 = 3600;

fn options() -> SpoolOptions {
    SpoolOptions {
        device: "pi-exact".into(),
        window_seconds: WINDOW,
        partition_seconds: PARTITION,
        grace_ms: 0,
        budget_bytes: 64 * 1024 * 1024,
        when_full: crate::config::WhenFull::DropOldest,
        sources: Vec::new(),
        sinks: vec![("a".into(), "local")],
        live: Vec::new(),
        late: std::collections::HashMap::new(),
        each_flush: Default::default(),
    }
}

fn flush(rows: Vec<WindowRow>) -> Flush {
    Flush::of_rows(rows, 0)
}

/// Commits each set of rows as its own flush, then reads back every part of sink `a`:
/// (partition, rows) per part, rows in the order the part holds them.
fn through_the_spool(flushes: Vec<Vec<WindowRow>>) -> Vec<(i64, Vec<WindowRow>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options()).expect("open");
    for rows in flushes {
        spool.commit(&flush(rows)).expect("commit");
    }
    let mut reader = SpoolReader::open(&path).expect("reader");
    let mut parts = Vec::new();
    for _ in 0..100 {
        match spool.plan("a", i64::MAX / 4).expect("plan") {
            Plan::Ready(plan) => {
                let rows = reader.read_part(&plan, false).expect("read").rows;
                parts.push((plan.partition, rows));
                spool.delivered(&plan, i64::MAX / 4).expect("delivered");
            }
            Plan::Wait(_) => return parts,
        }
    }
    panic!("the spool kept planning parts");
}

/// One drawn sample: its time in µs, its grid value `j` (`None`: NaN), arrival index.
#[derive(Debug, Clone, Copy)]
struct Drawn {
    micros: i64,
    j: Option<i64>,
    arrival: usize,
}

/// The timestamp text or number a source would read for an instant in µs.
fn timestamp_json(micros: i64, form: u32) -> serde_json::Value {
    let seconds = micros.div_euclid(1_000_000);
    let fraction = micros.rem_euclid(1_000_000);
    match form {
        // Epoch seconds with six decimals (a negative instant written with its sign).
        0 => {
            let text = if micros < 0 {
                let m = -micros;
                format!("-{}.{:06}", m / 1_000_000, m % 1_000_000)
            } else {
                format!("{seconds}.{fraction:06}")
            };
            serde_json::from_str(&text).expect("a JSON number")
        }
        // RFC 3339 in UTC with a microsecond fraction.
        1 => {
            let t = chrono::DateTime::from_timestamp(seconds, fraction as u32 * 1000)
                .expect("in range");
            serde_json::Value::String(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        }
        // RFC 3339 at +05:30.
        _ => {
            let zone = chrono::FixedOffset::east_opt(5 * 3600 + 1800).expect("offset");
            let t = chrono::DateTime::from_timestamp(seconds, fraction as u32 * 1000)
                .expect("in range")
                .with_timezone(&zone);
            serde_json::Value::String(t.format("%Y-%m-%dT%H:%M:%S%.6f%:z").to_string())
        }
    }
}

/// What the statistics of some samples must be, from integers.
struct Exact {
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    stdev: Option<f64>,
    median: f64,
    /// (time in ms, value) of the first and the last by time, ties by arrival.
    first: (i64, f64),
    last: (i64, f64),
}

fn exact(samples: &[Drawn], offset: f64, q: i32) -> Exact {
    let value = |j: i64| offset + j as f64 * 2f64.powi(-q);
    let mut finite: Vec<Drawn> = samples.iter().copied().filter(|s| s.j.is_some()).collect();
    finite.sort_by_key(|s| s.arrival);
    let js: Vec<i64> = finite.iter().map(|s| s.j.expect("finite")).collect();
    let n = js.len() as i128;
    let sum: i128 = js.iter().map(|&j| i128::from(j)).sum();
    let squares: i128 = js.iter().map(|&j| i128::from(j) * i128::from(j)).sum();
    let scale = 2f64.powi(-q);
    // mean = offset + sum / n × scale; the f64 below is within an ulp of it.
    let mean = offset + (sum as f64 / n as f64) * scale;
    let stdev = (n > 1).then(|| {
        let numerator = n * squares - sum * sum;
        ((numerator as f64 / (n * (n - 1)) as f64).sqrt()) * scale
    });
    let mut sorted = js.clone();
    sorted.sort_unstable();
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        value(sorted[mid])
    } else {
        (value(sorted[mid - 1]) + value(sorted[mid])) / 2.0
    };
    let ms = |s: &Drawn| s.micros.div_euclid(1000);
    let earliest = finite.iter().map(ms).min().expect("a finite sample");
    let latest = finite.iter().map(ms).max().expect("a finite sample");
    // First by time, the earliest arrival among ties; last by time, the latest arrival.
    let first = finite.iter().find(|s| ms(s) == earliest).expect("there");
    let last = finite
        .iter()
        .rev()
        .find(|s| ms(s) == latest)
        .expect("there");
    Exact {
        count: js.len() as u64,
        min: value(sorted[0]),
        max: value(sorted[sorted.len() - 1]),
        mean,
        stdev,
        median,
        first: (earliest, value(first.j.expect("finite"))),
        last: (latest, value(last.j.expect("finite"))),
    }
}

fn close(got: f64, want: f64, relative: f64) -> bool {
    (got - want).abs() <= relative * want.abs().max(f64::MIN_POSITIVE)
}

/// Checks every statistic but the median, which merges only approximate.
fn check(what: &str, got: &Stats, want: &Exact, spread: f64) {
    assert_eq!(got.count, want.count, "{what}: count");
    assert_eq!((got.min, got.max), (want.min, want.max), "{what}: min, max");
    // The reference mean is itself rounded twice: within 2 ulps of the exact one.
    assert!(
        (got.mean - want.mean).abs() <= 4.5e-16 * want.mean.abs() + 1e-15 * spread,
        "{what}: mean {} against {}",
        got.mean,
        want.mean
    );
    match (got.stdev, want.stdev) {
        (Some(g), Some(0.0)) => assert!(g.abs() <= 1e-12 * spread, "{what}: stdev {g}"),
        (Some(g), Some(w)) => assert!(close(g, w, 1e-12), "{what}: stdev {g} against {w}"),
        (g, w) => assert_eq!(g, w, "{what}: stdev"),
    }
    assert_eq!((got.first_ms, got.first), want.first, "{what}: first");
    assert_eq!((got.last_ms, got.last), want.last, "{what}: last");
}

/// Offsets and grid steps (2^-q) that keep every value an exact `f64`.
const GRIDS: [(f64, i32); 6] = [
    (0.0, 20),
    (1_000.0, 20),
    (1_700_000_000.0, 20),
    (-42_000_000.0, 20),
    (1_099_511_627_776.0, 8),
    (0.0, 0),
];

#[test]
fn random_samples_match_an_exact_computation_through_the_aggregator_the_spool_and_a_merge() {
    let seed = std::env::var("EDGESPOOL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("EDGESPOOL_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..120 {
        let (offset, q) = GRIDS[rng.random_range(0..GRIDS.len())];
        let span: i64 = [2, 50, 1_000_000, 1 << 30][rng.random_range(0..4)];
        // A window just before a year's end, or before the epoch.
        let window_start: i64 = [1_767_225_540, -60, 1_782_305_940][rng.random_range(0..3)];
        let n = rng.random_range(1..300);
        let base = window_start * 1_000_000;
        let mut drawn: Vec<Drawn> = (0..n)
            .map(|arrival| {
                let micros = match rng.random_range(0..4) {
                    // A hair before the window's end (and the hour's, the year's).
                    0 => base + 60_000_000 - rng.random_range(1..1000),
                    // Its very start.
                    1 => base + rng.random_range(0..1000),
                    // A few distinct instants: ties.
                    2 => base + 1_000_000 * rng.random_range(0..3),
                    _ => base + rng.random_range(0..60_000_000),
                };
                let j = (!rng.random_bool(0.03)).then(|| rng.random_range(-span..=span));
                Drawn { micros, j, arrival }
            })
            .collect();
        if drawn.iter().all(|d| d.j.is_none()) {
            drawn[0].j = Some(1);
        }
        let value = |d: &Drawn| d.j.map_or(f64::NAN, |j| offset + j as f64 * 2f64.powi(-q));
        let spread = span as f64 * 2f64.powi(-q);
        let series = Arc::new(Series::new("s.x", None));
        let sample = |d: &Drawn, form: u32| Sample {
            series: Arc::clone(&series),
            timestamp_ms: parse_timestamp(&timestamp_json(d.micros, form)).expect("parses"),
            value: value(d),
            own_clock: false,
        };
        // Out of order: arrival is a shuffle of time order... and the index says which.
        drawn.sort_by_key(|d| d.micros);
        drawn.shuffle(&mut rng);
        for (i, d) in drawn.iter_mut().enumerate() {
            d.arrival = i;
        }
        let forms: Vec<u32> = drawn.iter().map(|_| rng.random_range(0..3)).collect();

        // The whole window through the aggregator.
        let mut all = Aggregator::new(WINDOW);
        drawn.iter().zip(&forms).for_each(|(d, &f)| {
            all.push_from(sample(d, f), KEEP_TIES);
        });
        let nan = drawn.iter().filter(|d| d.j.is_none()).count() as u64;
        assert_eq!(all.take_counts().non_finite, nan, "round {round}");
        let rows = all.take_all();
        assert_eq!(rows.len(), 1, "round {round}: one window, [start, end)");
        assert_eq!(rows[0].start, window_start, "round {round}");
        let whole = exact(&drawn, offset, q);
        check(
            &format!("round {round} aggregated"),
            &rows[0].stats,
            &whole,
            spread,
        );
        assert_eq!(rows[0].stats.median, whole.median, "round {round}: median");

        // The same arrivals from a source that drops repeats (the default): of each
        // millisecond the first finite sample to arrive is taken, and every later sample
        // of that millisecond, whatever its value, is a repeat; a NaN is counted, not taken.
        let mut dropping = Aggregator::new(WINDOW);
        let repeats = drawn
            .iter()
            .zip(&forms)
            .filter(|(d, f)| dropping.push_from(sample(d, **f), !KEEP_TIES) == Pushed::Repeat)
            .count();
        let mut taken_ms = std::collections::HashSet::new();
        let kept: Vec<Drawn> = drawn
            .iter()
            .filter(|d| {
                let ms = d.micros.div_euclid(1000);
                let fresh = !taken_ms.contains(&ms);
                if fresh && d.j.is_some() {
                    taken_ms.insert(ms);
                }
                fresh
            })
            .copied()
            .collect();
        assert_eq!(repeats, drawn.len() - kept.len(), "round {round}: repeats");
        let rows = dropping.take_all();
        let once = exact(&kept, offset, q);
        check(
            &format!("round {round} repeats dropped"),
            &rows[0].stats,
            &once,
            spread,
        );
        assert_eq!(rows[0].stats.median, once.median, "round {round}: median");

        // Two random groups, each aggregated on its own, both through the spool, merged.
        let in_a: Vec<bool> = drawn.iter().map(|_| rng.random_bool(0.5)).collect();
        let group = |want: bool| -> Vec<Drawn> {
            drawn
                .iter()
                .zip(&in_a)
                .filter(|(_, a)| **a == want)
                .map(|(d, _)| *d)
                .collect()
        };
        let (a, b) = (group(true), group(false));
        let aggregate = |part: &[Drawn]| -> Vec<WindowRow> {
            let mut agg = Aggregator::new(WINDOW);
            for d in part {
                agg.push_from(sample(d, forms[d.arrival]), KEEP_TIES);
            }
            agg.take_all()
        };
        let parts = through_the_spool(vec![aggregate(&a), aggregate(&b)]);
        let window_partition = window_start.div_euclid(i64::from(PARTITION)) * i64::from(PARTITION);
        assert!(
            parts.iter().all(|(p, _)| *p == window_partition),
            "round {round}"
        );
        let read: Vec<&WindowRow> = parts.iter().flat_map(|(_, rows)| rows).collect();
        let finite = |g: &[Drawn]| g.iter().any(|d| d.j.is_some());
        let groups: Vec<&[Drawn]> = [&a[..], &b[..]].into_iter().filter(|g| finite(g)).collect();
        assert_eq!(read.len(), groups.len(), "round {round}: a row per group");
        for (row, g) in read.iter().zip(&groups) {
            check(
                &format!("round {round} read back"),
                &row.stats,
                &exact(g, offset, q),
                spread,
            );
        }
        let merged = read[1..]
            .iter()
            .fold(read[0].stats.clone(), |acc, row| acc.merge(&row.stats));
        // The merge's first: the earliest time; on a tie, the first row's (A's) sample.
        let mut want = exact(&drawn, offset, q);
        if groups.len() == 2 {
            let (ea, eb) = (exact(groups[0], offset, q), exact(groups[1], offset, q));
            want.first = if eb.first.0 < ea.first.0 {
                eb.first
            } else {
                ea.first
            };
            want.last = if eb.last.0 >= ea.last.0 {
                eb.last
            } else {
                ea.last
            };
            let (na, nb) = (ea.count as f64, eb.count as f64);
            want.median = (ea.median * na + eb.median * nb) / (na + nb);
        }
        check(&format!("round {round} merged"), &merged, &want, spread);
        assert!(
            close(merged.median, want.median, 1e-12),
            "round {round}: merged median"
        );
    }
}

/// `x` as `k × 2^-22` (values in [2^30, 2^31) are).
fn units_of_2_22(x: f64) -> i128 {
    let k = x * 4_194_304.0;
    assert_eq!(k.fract(), 0.0);
    k as i128
}

#[test]
fn stdev_is_exact_on_values_near_1_7e9_stepping_a_hundredth() {
    let values: Vec<f64> = (0..20_000).map(|i| 1.7e9 + 0.01 * f64::from(i)).collect();
    let series = Arc::new(Series::new("meter.wh", None));
    let mut agg = Aggregator::new(3600);
    for (i, v) in values.iter().enumerate() {
        agg.push(Sample {
            series: Arc::clone(&series),
            timestamp_ms: i as i64 * 100,
            value: *v,
            own_clock: false,
        });
    }
    let stats = agg.take_all().remove(0).stats;
    // Exactly, in units of 2^-22 taken from the first value.
    let ks: Vec<i128> = values.iter().map(|&v| units_of_2_22(v)).collect();
    let (k0, n) = (ks[0], ks.len() as i128);
    let sum: i128 = ks.iter().map(|k| k - k0).sum();
    let squares: i128 = ks.iter().map(|k| (k - k0) * (k - k0)).sum();
    let var = (n * squares - sum * sum) as f64 / (n * (n - 1)) as f64;
    let stdev = var.sqrt() / 4_194_304.0;
    let got = stats.stdev.expect("many values");
    assert!(
        close(got, stdev, 1e-12),
        "stdev {got} against {stdev}: relative error {:e}",
        (got - stdev).abs() / stdev
    );
    // The mean is the exact one correctly rounded: within half a unit (2^-22) of it.
    let mean_units = units_of_2_22(stats.mean);
    let error = (mean_units * n - (k0 * n + sum)).abs();
    assert!(2 * error <= n, "the mean is {error}/{n} units of 2^-22 off");
    // And pooled from two halves (a window and its late rows) just as well.
    let mut halves = [Aggregator::new(3600), Aggregator::new(3600)];
    for (i, v) in values.iter().enumerate() {
        halves[usize::from(i % 3 == 0)].push(Sample {
            series: Arc::clone(&series),
            timestamp_ms: i as i64 * 100,
            value: *v,
            own_clock: false,
        });
    }
    let [mut a, mut b] = halves;
    let merged = a.take_all()[0].stats.merge(&b.take_all()[0].stats);
    let got = merged.stdev.expect("many values");
    assert!(
        close(got, stdev, 1e-12),
        "merged stdev {got} against {stdev}"
    );
    assert_eq!(merged.mean, stats.mean);
}

/// Instants less than a millisecond before an edge, in every form a source reads: each
/// is in the earlier window, hour and year, through the aggregator, the spool's
/// partitions and the object key.
#[test]
fn a_sample_a_hair_before_an_edge_stays_before_it_in_every_path() {
    use serde_json::json;
    let edges = [
        // A year's end (and an hour's, a window's).
        (
            1_767_225_599_999_i64,
            vec![
                json!(1_767_225_599.999_6_f64),
                json!(1_767_225_599_999.6_f64),
                json!("2025-12-31T23:59:59.9996Z"),
                json!("2026-01-01T01:59:59.99999+02:00"),
            ],
            "year=2025/month=12/day=31/hour=23/",
        ),
        // An hour's end in June.
        (
            1_781_877_599_999,
            vec![
                json!(1_781_877_599.999_51_f64),
                json!(1_781_877_599_999.9_f64),
                json!("2026-06-19T13:59:59.9999999Z"),
                json!("2026-06-19T09:59:59.9996-04:00"),
            ],
            "year=2026/month=6/day=19/hour=13/",
        ),
        // A minute's end before the epoch: floored, not truncated towards zero.
        (
            -1,
            vec![json!(-0.0004_f64), json!("1969-12-31T23:59:59.9996Z")],
            "year=1969/month=12/day=31/hour=23/",
        ),
    ];
    let series = Arc::new(Series::new("s.x", None));
    for (want_ms, forms, key) in edges {
        let window = (want_ms.div_euclid(1000) + 1) - 60;
        for form in forms {
            let ms = parse_timestamp(&form).expect("parses");
            assert_eq!(ms, want_ms, "{form}");
            let mut agg = Aggregator::new(WINDOW);
            agg.push(Sample {
                series: Arc::clone(&series),
                timestamp_ms: ms,
                value: 1.0,
                own_clock: false,
            });
            let rows = agg.take_all();
            assert_eq!(rows[0].start, window, "{form}: the window [start, end)");
            let parts = through_the_spool(vec![rows]);
            let partition = parts[0].0;
            assert_eq!(
                partition,
                window - window.rem_euclid(3600),
                "{form}: the hour"
            );
            let object = crate::sink::object_key(
                "",
                "pi",
                partition,
                0,
                "ndjson",
                crate::config::Keys::Unpadded,
            );
            assert!(object.contains(key), "{form}: {object}");
        }
    }
}

#[test]
fn a_window_past_the_value_cap_has_the_median_of_its_first_values_and_is_counted() {
    // The real aggregator with a cap of 10 in place of MAX_VALUES_PER_WINDOW.
    let series = Arc::new(Series::new("s.x", None));
    let mut agg = Aggregator::with_values_cap(WINDOW, 10);
    // 25 values in the first window, arriving newest first; 10 in the next (at the cap).
    let drawn: Vec<Drawn> = (0..25)
        .map(|i| Drawn {
            micros: (24 - i) * 1_000_000,
            j: Some((i * 7) % 25),
            arrival: i as usize,
        })
        .collect();
    for d in &drawn {
        agg.push(Sample {
            series: Arc::clone(&series),
            timestamp_ms: d.micros / 1000,
            value: d.j.expect("finite") as f64 + 1.7e9,
            own_clock: false,
        });
    }
    for i in 0..10 {
        agg.push(Sample {
            series: Arc::clone(&series),
            timestamp_ms: 60_000 + i,
            value: i as f64,
            own_clock: false,
        });
    }
    let counts = agg.take_counts();
    assert_eq!(counts.capped, 1, "one window went past the cap");
    let rows = agg.take_all();
    let capped = &rows[0].stats;
    // Every statistic but the median is of all 25 values.
    check("capped", capped, &exact(&drawn, 1.7e9, 0), 25.0);
    // The median is that of the first 10 to arrive: j = 0, 7, 14, 21, 3, 10, 17, 24, 6, 13.
    assert_eq!(capped.median, 1.7e9 + 11.5);
    assert_eq!(exact(&drawn[..10], 1.7e9, 0).median, 1.7e9 + 11.5);
    assert_eq!(rows[1].stats.median, 4.5, "a window at the cap is whole");

    // The count reaches the spool's lifetime counters and `status`, text and JSON.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options()).expect("open");
    for _ in 0..2 {
        let mut f = flush(Vec::new());
        f.aggregate = counts.clone();
        spool.commit(&f).expect("commit");
    }
    let status = crate::status::read(&path, 0).expect("status");
    assert_eq!(status.counters.capped_windows, 2);
    let json = serde_json::to_value(&status).expect("json");
    assert_eq!(json["counters"]["capped_windows"], 2);
    let text = crate::status::render(&status, 0);
    assert!(
        text.contains(
            "medians   2 windows over 100000 values: their median is of the first 100000 to arrive"
        ),
        "{text}"
    );
}

#[test]
fn a_late_row_earlier_in_time_holds_the_merged_first() {
    let series = Arc::new(Series::new("s.x", None));
    let sample = |ms: i64, value: f64| Sample {
        series: Arc::clone(&series),
        timestamp_ms: ms,
        value,
        own_clock: false,
    };
    let mut agg = Aggregator::new(WINDOW);
    agg.push_from(sample(30_000, 1.0), KEEP_TIES);
    agg.push_from(sample(40_000, 2.0), KEEP_TIES);
    let written = agg.take_closed(62_000);
    // Late samples reopen the written window, one before its first and one at its last.
    agg.push_from(sample(5_000, 3.0), KEEP_TIES);
    agg.push_from(sample(40_000, 4.0), KEEP_TIES);
    let late = agg.take_closed(63_000);
    assert_eq!(
        (late[0].start, late[0].stats.first_ms, late[0].stats.last_ms),
        (0, 5_000, 40_000)
    );
    let parts = through_the_spool(vec![written, late]);
    let rows = &parts[0].1;
    assert_eq!(rows.len(), 2, "the window and its late row");
    let merged = rows[0].stats.merge(&rows[1].stats);
    assert_eq!((merged.first, merged.first_ms), (3.0, 5_000));
    // A tie at the last time: the later row's, as the later arrival in one window.
    assert_eq!((merged.last, merged.last_ms), (4.0, 40_000));
    assert_eq!((merged.count, merged.mean), (4, 2.5));
}

/// The aggregator against Python's `statistics` (exact fractions inside), on arbitrary
/// `f64` values with a large offset. Python comes from `$EDGESPOOL_PYTHON` (the test
/// venv) or `python3`; without either the test says so and passes.
#[test]
fn statistics_match_pythons_statistics_module() {
    let python = std::env::var("EDGESPOOL_PYTHON").unwrap_or_else(|_| "python3".into());
    let seed = std::env::var("EDGESPOOL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("EDGESPOOL_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let series = Arc::new(Series::new("s.x", None));
    let mut windows: Vec<Vec<f64>> = Vec::new();
    let mut agg = Aggregator::new(WINDOW);
    for w in 0..20 {
        let offset: f64 = [1.7e9, -3.3e7, 0.0, 6.02e23, 1e-9][w % 5];
        let spread = offset.abs().max(1.0) * [1e-9, 1e-6, 1.0][w % 3];
        let values: Vec<f64> = (0..rng.random_range(2..500))
            .map(|_| offset + spread * (rng.random::<f64>() - 0.5))
            .collect();
        for (i, v) in values.iter().enumerate() {
            agg.push(Sample {
                series: Arc::clone(&series),
                timestamp_ms: w as i64 * 60_000 + i as i64,
                value: *v,
                own_clock: false,
            });
        }
        windows.push(values);
    }
    let rows = agg.take_all();
    let input: String = windows
        .iter()
        .map(|vs| {
            vs.iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(" ")
                + "\n"
        })
        .collect();
    let script = "import sys, statistics\n\
                  for line in sys.stdin:\n    \
                      xs = [float(x) for x in line.split()]\n    \
                      print(repr(statistics.mean(xs)), repr(statistics.stdev(xs)), repr(statistics.median(xs)))\n";
    let child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        println!("SKIPPED: no {python} to compare with");
        return;
    };
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to python");
    let out = child.wait_with_output().expect("python ran");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(text.lines().count(), rows.len());
    for (row, line) in rows.iter().zip(text.lines()) {
        let want: Vec<f64> = line
            .split(' ')
            .map(|x| x.parse().expect("a float"))
            .collect();
        let s = &row.stats;
        let what = format!("window {}", row.start);
        assert!(
            close(s.mean, want[0], 2.3e-16),
            "{what}: mean {} against {}",
            s.mean,
            want[0]
        );
        let stdev = s.stdev.expect("two values or more");
        assert!(
            close(stdev, want[1], 1e-12),
            "{what}: stdev {stdev} against {}",
            want[1]
        );
        assert_eq!(s.median, want[2], "{what}: median");
    }
}

/// A batch an earlier edgespool wrote (its record in the unversioned shape, as bytes)
/// and had not delivered at the upgrade: read and delivered as it is.
#[test]
fn a_spool_batch_of_the_previous_version_is_read_and_delivered_after_an_upgrade() {
    // postcard of [{series 1, offset 120, seconds 60, stats {count 2, min 1, max 3,
    // mean 2, stdev √2, median 2, first 1, last 3}}], as the previous version wrote it.
    const OLD_RECORD: &str = "0102783c02000000000000f03f0000000000000840000000000000004001cd3b7f669ea0f63f0000000000000040000000000000f03f0000000000000840";
    let old: Vec<u8> = (0..OLD_RECORD.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&OLD_RECORD[i..i + 2], 16).expect("hex"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let partition = 36_000;
    {
        let mut spool = Spool::open(&path, options()).expect("open");
        let row = WindowRow {
            series: Arc::new(Series::new("s.old", None)),
            start: partition + 120,
            seconds: 60,
            stats: Stats::single(0.0),
        };
        spool.commit(&flush(vec![row])).expect("commit");
    }
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    let changed = conn
        .execute("UPDATE batches SET record = ?1", [&old])
        .expect("the old record in place");
    assert_eq!(changed, 1);
    drop(conn);
    let mut spool = Spool::open(&path, options()).expect("reopen after the upgrade");
    let mut reader = SpoolReader::open(&path).expect("reader");
    let Plan::Ready(plan) = spool.plan("a", i64::MAX / 4).expect("plan") else {
        panic!("the old batch is ready to deliver");
    };
    let rows = reader
        .read_part(&plan, false)
        .expect("an old record reads")
        .rows;
    assert_eq!(rows.len(), 1);
    let s = &rows[0].stats;
    assert_eq!(
        (rows[0].series.name.as_str(), rows[0].start),
        ("s.old", partition + 120)
    );
    assert_eq!((s.count, s.min, s.max, s.mean), (2, 1.0, 3.0, 2.0));
    assert_eq!(
        (s.stdev, s.median, s.first, s.last),
        (Some(std::f64::consts::SQRT_2), 2.0, 1.0, 3.0)
    );
    // Its times were not kept: the window's start.
    assert_eq!((s.first_ms, s.last_ms), (36_120_000, 36_120_000));
    use crate::config::{Compression, Format, Layout};
    let encoding = crate::sink::Encoding {
        format: Format::Ndjson,
        layout: Layout::Long,
        compression: Compression::None,
    };
    let part = crate::sink::Part {
        device: "pi",
        rows: &rows,
        series: &[],
    };
    let line =
        String::from_utf8(crate::sink::encode(encoding, &part).expect("encodes")).expect("utf-8");
    assert!(
        line.ends_with("\"first\":1.0,\"last\":3.0,\"first_time\":\"1970-01-01T10:02:00.000Z\",\"last_time\":\"1970-01-01T10:02:00.000Z\"}\n"),
        "{line}"
    );
    spool.delivered(&plan, i64::MAX / 4).expect("delivered");
}
