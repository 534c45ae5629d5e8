//! One right answer per window: a window whose late samples came after its partition was
//! delivered has a row in each of several parts, and the DuckDB merge SQL of
//! docs/formats.md ("One row per window: merging late parts"), run as the docs give it,
//! folds them into the rows PostgreSQL holds for the same agent, which merges them in
//! place, and into what the samples fed give computed exactly (Python's `fractions`).
//!
//! One agent, two HTTP table sources with device timestamps to the millisecond in January
//! 2026 (10 s windows, 1 min partitions: they close as soon as they are committed), a
//! local Parquet sink with `late_grace = "0s"` (each round of stragglers its own part) and
//! a PostgreSQL sink. Source `pa` drops repeats (one is fed); `pk` keeps them, so that
//! its late samples can tie a window's first or last time, and the tie rule is checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, PG_PASSWORD, PgServer, T0, find_sink, pg_sink, python, read_tree,
    source_status, status_json, try_status_json, wait_for, write_file,
};
use serde_json::{Value, json};

/// One sample fed: its source, sensor, time in ms since the epoch, value and round.
#[derive(Debug, Clone, Copy)]
struct Fed {
    source: &'static str,
    sensor: u32,
    ms: i64,
    value: f64,
    round: usize,
}

/// The start of minute `minute`, window `window` (10 s), in ms.
fn window_ms(minute: i64, window: i64) -> i64 {
    (T0 + minute * 60 + window * 10) * 1000
}

/// A value with three decimals, different for every `i` (a short decimal, which every
/// JSON parser, the agent's too, reads as the nearest `f64`).
fn value(i: usize) -> f64 {
    let k = 20_000 + (i * 3_701) % 10_007;
    format!("{}.{:03}", k / 1000, k % 1000)
        .parse()
        .expect("a decimal")
}

/// The three rounds. Round 0 is every window of `pa`'s minutes 0 and 1 (sensors 7 and 9)
/// and `pk`'s minute 2 (sensor 7), one to four samples each, except `pa.7.pm`'s window 3
/// of minute 0; rounds 1 and 2 are late: before a window's first sample, after its last,
/// between them, a window seen only now, single samples (a part whose `stdev` is null),
/// one repeat of `pa` (same time, another value: dropped) and, for `pk`, samples at the
/// very millisecond of a window's first and last.
fn rounds() -> Vec<Vec<Fed>> {
    let mut i = 0;
    let mut next = |source, sensor, ms, round| {
        i += 1;
        Fed {
            source,
            sensor,
            ms,
            value: value(i),
            round,
        }
    };
    let mut first = Vec::new();
    for (source, minutes, sensors) in [("pa", 0..2, &[7, 9][..]), ("pk", 2..3, &[7][..])] {
        for minute in minutes {
            for &sensor in sensors {
                for window in 0..6 {
                    if (source, minute, sensor, window) == ("pa", 0, 7, 3) {
                        continue;
                    }
                    let start = window_ms(minute, window);
                    let offsets: &[i64] = match window % 3 {
                        0 => &[2_000],
                        1 => &[2_000, 3_250, 7_125],
                        _ => &[2_000, 3_250, 4_501, 7_125],
                    };
                    for offset in offsets {
                        first.push(next(source, sensor, start + offset, 0));
                    }
                }
            }
        }
    }
    let mut second = Vec::new();
    for minute in 0..2 {
        for window in 0..6 {
            let start = window_ms(minute, window);
            if window % 2 == 0 {
                second.push(next("pa", 7, start + 500, 1));
                second.push(next("pa", 7, start + 9_500, 1));
            } else {
                second.push(next("pa", 9, start + 5_123, 1));
            }
        }
    }
    // The window round 0 left out: a single sample, its only row.
    second.push(next("pa", 7, window_ms(0, 3) + 6_000, 1));
    // A repeat: the time of a round-0 sample, another value.
    second.push(next("pa", 9, window_ms(0, 1) + 2_000, 1));
    for window in 0..6 {
        second.push(next("pk", 7, window_ms(2, window) + 8_000, 1));
    }
    let mut third = Vec::new();
    for window in 0..6 {
        third.push(next("pa", 7, window_ms(0, window) + 1_000, 2));
        third.push(next("pa", 9, window_ms(1, window) + 9_900, 2));
        let start = window_ms(2, window);
        if window < 4 {
            // The first's and the last's very millisecond.
            third.push(next("pk", 7, start + 2_000, 2));
            third.push(next("pk", 7, start + 8_000, 2));
        } else {
            third.push(next("pk", 7, start + 9_000, 2));
        }
    }
    vec![first, second, third]
}

/// A table body of `source`'s samples in `round`: rows of (ID, pm, last_seen with its
/// milliseconds as decimals).
fn body(round: &[Fed], source: &str) -> String {
    let data: Vec<String> = round
        .iter()
        .filter(|f| f.source == source)
        .map(|f| {
            let seen = format!("{}.{:03}", f.ms.div_euclid(1000), f.ms.rem_euclid(1000));
            format!("[{}, {}, {seen}]", f.sensor, json!(f.value))
        })
        .collect();
    format!(
        "{{\"fields\": [\"ID\", \"pm\", \"last_seen\"], \"data\": [{}]}}",
        data.join(", ")
    )
}

fn source(name: &str, url: &str, repeats: &str) -> String {
    format!(
        "\n[[sources]]\nkind = \"http\"\nname = \"{name}\"\nurl = \"{url}\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nrepeats = \"{repeats}\"\n\
         [sources.table]\nkey = \"ID\"\ncolumns = [\"pm\"]\ntimestamp_column = \"last_seen\"\n"
    )
}

fn config(dir: &Path, pa: &str, pk: &str, pg: &PgServer) -> PathBuf {
    let password = write_file(dir, "credentials/pg", &format!("{PG_PASSWORD}\n"));
    let text = format!(
        "[agent]\ndevice_id = \"pi-merge\"\nspool = \"{}\"\nwindow = \"10s\"\npartition = \"1m\"\ngrace = \"0s\"\n\
         {}{}\n[[sinks]]\nkind = \"local\"\nname = \"lake\"\npath = \"{}\"\nformat = \"parquet\"\nlate_grace = \"0s\"\nretry_max = \"1s\"\n{}",
        dir.join("spool.db").display(),
        source("pa", pa, "drop"),
        source("pk", pk, "keep"),
        dir.join("out").display(),
        pg_sink(pg, "db", "").replace("{password_file}", &password.display().to_string()),
    );
    write_file(dir, "edgespool.toml", &text)
}

/// The merge SQL of docs/formats.md: the block that starts `-- One row per window (DuckDB)`.
fn documented_merge_sql() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/formats.md");
    let docs = std::fs::read_to_string(&path).expect("docs/formats.md reads");
    let start = docs
        .find("```sql\n-- One row per window (DuckDB)\n")
        .expect("docs/formats.md gives the DuckDB merge SQL");
    let block = &docs[start + "```sql\n".len()..];
    let end = block.find("```").expect("the block ends");
    let sql = block[..end].trim().trim_end_matches(';').to_owned();
    assert!(sql.contains("'out/**/*.parquet'"), "{sql}");
    sql
}

/// Runs the documented SQL over the tree with DuckDB, and the same windows computed
/// exactly from the samples fed; prints both, with every float as its shortest decimal
/// (parsed by Rust exactly), and what a naive query sees.
const MERGE: &str = r#"
import json, math, statistics, sys
from fractions import Fraction
import duckdb
args = json.load(sys.stdin)
root, sql, fed = args["root"], args["sql"], args["fed"]
sql = sql.replace("'out/**/*.parquet'", f"'{root}/**/*.parquet'")
def num(x):
    return None if x is None else repr(float(x))
merged = duckdb.sql(f"""
    SELECT device, series, epoch_ms(window_start), count, min, max, mean, stdev, median,
           first, epoch_ms(first_time), last, epoch_ms(last_time)
    FROM ({sql}) ORDER BY device, series, window_start""").fetchall()
duck = [[d, s, w, n, *map(num, (lo, hi, mean, sd, med, first)), ft, num(last), lt]
        for d, s, w, n, lo, hi, mean, sd, med, first, ft, last, lt in merged]
types = duckdb.sql(f"SELECT typeof(count), typeof(mean), typeof(first_time) FROM ({sql}) LIMIT 1").fetchall()[0]
tree = f"read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
naive_rows = duckdb.sql(f"SELECT count(*) FROM {tree}").fetchall()[0][0]
naive_mean = duckdb.sql(f"""SELECT series, epoch_ms(window_start), avg(mean) FROM {tree}
                            GROUP BY ALL ORDER BY ALL""").fetchall()

# Exactly, from the samples fed: a repeat of a source that drops them is dropped (the
# first value stays); a window's part is its round.
taken, windows = set(), {}
for arrival, (source, sensor, ms, value, rnd, repeats) in enumerate(fed):
    series = f"{source}.{sensor}.pm"
    if repeats == "drop" and (series, ms) in taken:
        continue
    taken.add((series, ms))
    start = ms - ms % 10_000
    windows.setdefault((series, start), []).append((ms, arrival, Fraction(value), rnd))
exact = []
for (series, start), samples in sorted(windows.items()):
    xs = [x for _, _, x, _ in samples]
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    rounds = {}
    for _, _, x, rnd in samples:
        rounds.setdefault(rnd, []).append(x)
    median = sum(len(v) * statistics.median(v) for v in rounds.values()) / n
    first = min(samples, key=lambda s: (s[0], s[1]))
    last = max(samples, key=lambda s: (s[0], s[1]))
    exact.append(["pi-merge", series, start, n, num(min(xs)), num(max(xs)), num(mean), num(sd),
                  num(median), num(first[2]), first[0], num(last[2]), last[0]])
print(json.dumps({"duck": duck, "exact": exact, "types": types, "naive_rows": naive_rows,
                  "naive_mean": [[s, w, num(m)] for s, w, m in naive_mean],
                  "samples": sum(len(v) for v in windows.values())}))
"#;

/// Runs the Spark SQL of docs/formats.md (the block that reads `input_file_name()`) over
/// the tree with pyspark, and prints its rows as [`MERGE`] prints DuckDB's.
const SPARK: &str = r#"
import json, re, sys
from pyspark.sql import SparkSession
root, docs = sys.argv[1], open(sys.argv[2]).read()
sql = [b for b in re.findall(r"```sql\n(.*?)```", docs, re.S) if "input_file_name()" in b][0]
spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .config("spark.sql.session.timeZone", "UTC").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
spark.read.parquet(root).createOrReplaceTempView("edgespool_windows")
spark.sql(sql).createOrReplaceTempView("merged")
rows = spark.sql("""SELECT device, series, unix_millis(window_start), count, min, max, mean,
    stdev, median, first, unix_millis(first_time), last, unix_millis(last_time)
    FROM merged ORDER BY device, series, window_start""").collect()
num = lambda x: None if x is None else repr(float(x))
print(json.dumps([[r[0], r[1], r[2], r[3], *map(num, r[4:10]), r[10], num(r[11]), r[12]] for r in rows]))
spark.stop()
"#;

/// A merged window: key, count, then the f64 columns and the two times.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    count: i64,
    /// min, max, mean, stdev, median, first, last.
    floats: [Option<f64>; 7],
    /// first_time, last_time, in ms.
    times: [i64; 2],
}

type Key = (String, String, i64);

fn float(text: Option<&str>) -> Option<f64> {
    text.filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap_or_else(|e| panic!("{t:?}: {e}")))
}

/// Rows as `[device, series, window_ms, count, min, max, mean, stdev, median, first,
/// first_ms, last, last_ms]`, floats as text.
fn windows(rows: impl Iterator<Item = Vec<Option<String>>>) -> BTreeMap<Key, Window> {
    rows.map(|r| {
        let int = |i: usize| -> i64 {
            r[i].as_deref()
                .expect("an integer column")
                .parse()
                .expect("an integer")
        };
        let f = |i: usize| float(r[i].as_deref());
        let key = (
            r[0].clone().expect("device"),
            r[1].clone().expect("series"),
            int(2),
        );
        let window = Window {
            count: int(3),
            floats: [f(4), f(5), f(6), f(7), f(8), f(9), f(11)],
            times: [int(10), int(12)],
        };
        (key, window)
    })
    .collect()
}

fn json_rows(value: &Value) -> impl Iterator<Item = Vec<Option<String>>> + '_ {
    value.as_array().expect("rows").iter().map(|row| {
        row.as_array()
            .expect("a row")
            .iter()
            .map(|v| match v {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            })
            .collect()
    })
}

/// `left` and `right` agree: exactly on counts, min, max, first, last and their times;
/// within 1e-12 relative on mean, stdev and median.
fn assert_same(what: &str, left: &BTreeMap<Key, Window>, right: &BTreeMap<Key, Window>) {
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        right.keys().collect::<Vec<_>>(),
        "{what}: the same windows"
    );
    for (key, a) in left {
        let b = &right[key];
        assert_eq!((a.count, a.times), (b.count, b.times), "{what} {key:?}");
        for (i, name) in ["min", "max", "mean", "stdev", "median", "first", "last"]
            .iter()
            .enumerate()
        {
            match (a.floats[i], b.floats[i]) {
                (Some(x), Some(y)) if [2, 3, 4].contains(&i) => {
                    let scale = x.abs().max(y.abs()).max(f64::MIN_POSITIVE);
                    assert!(
                        (x - y).abs() / scale <= 1e-12,
                        "{what} {key:?} {name}: {x} vs {y}"
                    );
                }
                (x, y) => assert_eq!(x, y, "{what} {key:?} {name}: {a:?} vs {b:?}"),
            }
        }
    }
}

#[test]
fn the_documented_merge_folds_late_parts_into_the_rows_postgres_merged_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    let rounds = rounds();
    let pa = JsonServer::start(Vec::new(), body(&[], "pa"));
    let pk = JsonServer::start(Vec::new(), body(&[], "pk"));
    let config = config(dir.path(), &pa.url, &pk.url, &pg);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let out = dir.path().join("out");

    // Each round is delivered to both sinks before the next is served: 3 partitions in
    // round 0, then a part for each again in rounds 1 and 2.
    for (n, round) in rounds.iter().enumerate() {
        pa.push(body(round, "pa"));
        pk.push(body(round, "pk"));
        let parts = 3 * (n + 1);
        wait_for(
            &format!("round {n} in both sinks"),
            Duration::from_secs(90),
            || {
                let files = read_tree(&out);
                let parquet = files.iter().filter(|f| f.key.ends_with(".parquet")).count();
                // PostgreSQL gets its parts as they are committed (`deliver = "each_flush"`)
                // and keeps one loads row per partition: its sink has nothing pending once
                // the folder holds the round.
                let status = try_status_json(&config)?;
                let db = find_sink(&status, "db")?;
                (parquet == parts && db["pending_rows"] == 0 && db["state"] == "ok").then_some(())
            },
        );
    }
    let keys: Vec<String> = read_tree(&out).into_iter().map(|f| f.key).collect();
    for minute in 0..3 {
        for part in 0..3 {
            let name = format!("pi-merge-20260102T030{minute}-part-000{part}.parquet");
            assert!(
                keys.iter()
                    .any(|k| k == &format!("device=pi-merge/year=2026/month=1/day=2/hour=3/{name}")),
                "{name} in {keys:?}"
            );
        }
    }
    let status = status_json(&config);
    assert_eq!(source_status(&status, "pa")["repeats"], 1, "{status}");
    assert_eq!(source_status(&status, "pk")["repeats"], 0, "{status}");

    let postgres = pg.psql(
        "postgres",
        "SELECT device, series, (extract(epoch FROM window_start) * 1000)::bigint, count,
                min, max, mean, stdev, median,
                first, (extract(epoch FROM first_time) * 1000)::bigint,
                last, (extract(epoch FROM last_time) * 1000)::bigint
         FROM edgespool_windows ORDER BY device, series, window_start",
    );
    let postgres = windows(postgres.lines().map(|line| {
        line.split('|')
            .map(|c| (!c.is_empty()).then(|| c.to_owned()))
            .collect()
    }));

    let fed: Vec<Value> = rounds
        .iter()
        .flatten()
        .map(|f| {
            let repeats = if f.source == "pa" { "drop" } else { "keep" };
            json!([f.source, f.sensor, f.ms, f.value, f.round, repeats])
        })
        .collect();
    let input = json!({
        "root": out.display().to_string(),
        "sql": documented_merge_sql(),
        "fed": fed,
    });
    let python = python();
    let mut child = Command::new(&python)
        .args(["-c", MERGE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run the suite with scripts/test.sh"));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(input.to_string().as_bytes())
            .expect("the script reads its input");
    }
    let run = child.wait_with_output().expect("the script ends");
    assert!(
        run.status.success(),
        "the merge failed (scripts/test.sh installs DuckDB):\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: Value = serde_json::from_slice(&run.stdout).expect("the script printed JSON");
    let duck = windows(json_rows(&seen["duck"]));
    let exact = windows(json_rows(&seen["exact"]));

    // 3 series; pa.7.pm has all 12 windows (the one round 0 left out came in round 1).
    assert_eq!(duck.len(), 12 + 12 + 6, "{duck:?}");
    assert_eq!(
        seen["types"],
        json!(["BIGINT", "DOUBLE", "TIMESTAMP WITH TIME ZONE"])
    );
    // Fed: every sample but the repeat.
    let samples: i64 = duck.values().map(|w| w.count).sum();
    assert_eq!(
        samples,
        rounds.iter().map(Vec::len).sum::<usize>() as i64 - 1
    );
    assert_eq!(seen["samples"], samples);
    assert_same("DuckDB vs PostgreSQL", &duck, &postgres);
    assert_same("DuckDB vs the samples", &duck, &exact);
    assert_same("PostgreSQL vs the samples", &postgres, &exact);

    // The windows that had late parts are what the merge is for: a naive query counts
    // their rows, and weighs their means alike.
    let naive_rows = seen["naive_rows"].as_u64().expect("a count");
    assert_eq!(naive_rows, 29 + 19 + 18, "a row per window and part");
    assert!(naive_rows > duck.len() as u64);
    let naive_wrong = json_rows(&seen["naive_mean"])
        .filter(|r| {
            let key = ("pi-merge".to_owned(), r[0].clone().expect("series"), {
                r[1].as_deref().expect("ms").parse::<i64>().expect("ms")
            });
            let mean = float(r[2].as_deref()).expect("a mean");
            let right = exact[&key].floats[2].expect("a mean");
            (mean - right).abs() > 1e-9 * right.abs()
        })
        .count();
    assert!(
        naive_wrong >= 12,
        "avg(mean) is wrong for {naive_wrong} windows"
    );

    // The tie rule: pk's windows 0-3 got a late sample at their first's and their last's
    // very millisecond. first stays round 0's, last is round 2's.
    for window in 0..4 {
        let start = window_ms(2, window);
        let at = |round: usize, ms: i64| {
            rounds[round]
                .iter()
                .find(|f| f.source == "pk" && f.ms == ms)
                .expect("fed")
                .value
        };
        let merged = &duck[&("pi-merge".to_owned(), "pk.7.pm".to_owned(), start)];
        assert_eq!(
            (merged.floats[5], merged.floats[6]),
            (Some(at(0, start + 2_000)), Some(at(2, start + 8_000))),
            "pk window {window}: {merged:?}"
        );
        assert_eq!(merged.times, [start + 2_000, start + 8_000]);
    }
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");

    // The Spark SQL too, where a Python with pyspark (and a Java) is given: the suite
    // leaves it out, as pyspark would add more than a minute to each run.
    let Some(spark) = std::env::var_os("EDGESPOOL_PYSPARK") else {
        eprintln!("SKIPPED: the Spark merge SQL (EDGESPOOL_PYSPARK names a Python with pyspark)");
        return;
    };
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/formats.md");
    let run = Command::new(&spark)
        .args(["-c", SPARK])
        .arg(&out)
        .arg(&docs)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {spark:?}: {e}"));
    assert!(
        run.status.success(),
        "the Spark merge failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let rows: Value = serde_json::from_slice(&run.stdout).expect("the Spark script printed JSON");
    assert_same("Spark vs PostgreSQL", &windows(json_rows(&rows)), &postgres);
}
