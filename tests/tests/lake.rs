//! The output tree read as a data lake: pandas, pyarrow.dataset, polars and DuckDB (from
//! `$EDGESPOOL_PYTHON`, which scripts/test.sh makes) read what two agents wrote into one
//! folder, with no option beyond hive partitioning (the wide layout, whose columns grew,
//! with the one option per reader that docs/formats.md gives), and DuckDB folds the late
//! parts with the merge SQL of docs/formats.md.
//!
//! The rows come from an HTTP table source whose rows carry their own timestamps: one
//! reading per hour of 9 December 2025 and of 5 January 2026, so that the tree holds
//! hours 0 to 23, days below and above 10 and months 1 and 12. Those partitions are long
//! closed: each goes out as soon as it is committed. Then each agent is restarted and
//! fed late readings for hours 0 to 9 of 5 January: a second reading of sensor 7 in a
//! window already delivered, a sensor 11 never seen before, and sensor 9's newest
//! reading again (a repeat, dropped): each of those hours gets a `part-0001`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, S3Server, purpleair_body, python, read_tree, s3_sink, settle, source_status,
    status_json, write_file,
};
use serde_json::Value;

/// 2025-12-09T00:00:00Z and 2026-01-05T00:00:00Z.
const DAYS: [i64; 2] = [1_765_238_400, 1_767_571_200];

/// The two devices, each its own agent writing into the same folders.
const DEVICES: [&str; 2] = ["pi-a", "pi-b"];

/// The trees each agent writes: prefix, then the sink's format keys.
const TREES: [(&str, &str); 6] = [
    ("parquet", "format = \"parquet\""),
    ("wide", "format = \"parquet\"\nlayout = \"wide\""),
    ("ndjson", "format = \"ndjson\""),
    ("ndjson_gz", "format = \"ndjson\"\ncompression = \"gzip\""),
    ("csv", "format = \"csv\""),
    ("csv_gz", "format = \"csv\"\ncompression = \"gzip\""),
];

/// One body per hour of both days, sensors 7 and 9 at the same second (one window);
/// the values of device `d` start at `1000 d`.
fn bodies(device: usize) -> Vec<String> {
    DAYS.iter()
        .flat_map(|day| (0..24).map(move |h| day + h * 3600 + 60))
        .enumerate()
        .map(|(i, t)| {
            let v = (device * 1000 + i) as f64;
            purpleair_body(&[(7, t, v, 20.0), (9, t, v + 0.5, 21.0)])
        })
        .collect()
}

/// The late readings of device `device`, after the first 48 hours were delivered: for
/// hours 0-9 of 5 January, sensor 7 half a second after its reading (the same 1 s window)
/// and sensor 11 a quarter of a second after it; then sensor 9's newest reading (hour 23)
/// again with other values, a repeat.
fn late_bodies(device: usize) -> Vec<String> {
    let mut bodies: Vec<String> = (0..LATE_HOURS)
        .map(|h| {
            let t = (DAYS[1] + h * 3600 + 60) as f64;
            let v = (device * 1000 + 24) as f64 + h as f64;
            body_at(&[
                (7, t + 0.5, v + 0.25, 22.0),
                (11, t + 0.25, v + 0.125, 23.0),
            ])
        })
        .collect();
    bodies.push(body_at(&[(9, (DAYS[1] + 23 * 3600 + 60) as f64, 5.0, 5.0)]));
    bodies
}

/// Hours of 5 January that get late readings.
const LATE_HOURS: i64 = 10;

/// The samples of [`late_bodies`] that are kept: two columns of two sensors, each hour.
const LATE_SAMPLES: u64 = LATE_HOURS as u64 * 4;

/// The repeats of [`late_bodies`]: sensor 9's two columns at its mark.
const REPEATS: u64 = 2;

/// [`purpleair_body`] with `last_seen` in fractional seconds.
fn body_at(rows: &[(u32, f64, f64, f64)]) -> String {
    let data: Vec<Value> = rows
        .iter()
        .map(|(id, seen, pm, temperature)| {
            serde_json::json!([id, pm, 1, "Label", temperature, null, seen])
        })
        .collect();
    serde_json::json!({
        "fields": ["ID", "pm", "age", "Label", "Temperature", "Voc", "last_seen"],
        "data": data,
    })
    .to_string()
}

/// `device`'s agent: 1 s windows in hourly partitions, the table source `pa` on `url`,
/// then `sinks`.
fn agent_config(dir: &Path, device: &str, url: &str, sinks: &str) -> PathBuf {
    let text = format!(
        "[agent]\ndevice_id = \"{device}\"\nspool = \"{}\"\nwindow = \"1s\"\npartition = \"1h\"\ngrace = \"0s\"\n\n\
         [[sources]]\nkind = \"http\"\nname = \"pa\"\nurl = \"{url}\"\ninterval = \"100ms\"\ntimeout = \"2s\"\n\
         [sources.table]\nkey = \"ID\"\ncolumns = [\"pm\", \"Temperature\"]\ntimestamp_column = \"last_seen\"\n{sinks}",
        dir.join(format!("{device}.db")).display()
    );
    write_file(dir, &format!("{device}.toml"), &text)
}

/// Local sinks for [`TREES`] under `out`; late rows go at once (`late_grace = "0s"`), so
/// that the late readings of an hour make its `part-0001` before the agent stops.
fn local_sinks(out: &Path) -> String {
    TREES
        .iter()
        .map(|(prefix, keys)| {
            format!(
                "\n[[sinks]]\nkind = \"local\"\nname = \"{prefix}\"\npath = \"{}\"\nprefix = \"{prefix}\"\n{keys}\nlate_grace = \"0s\"\n",
                out.display()
            )
        })
        .collect()
}

/// An agent fed by its own HTTP table server.
struct Run {
    server: JsonServer,
    config: PathBuf,
    agent: Agent,
}

/// Starts `device`'s agent, its source serving `bodies`.
fn start(dir: &Path, device: &str, bodies: Vec<String>, sinks: &str) -> Run {
    let server = JsonServer::start(bodies, purpleair_body(&[]));
    let config = agent_config(dir, device, &server.url, sinks);
    let agent = Agent::start(&config, &dir.join(format!("{device}.log")));
    Run {
        server,
        config,
        agent,
    }
}

/// Waits until every body was served and every row delivered, stops the agent and checks
/// that it read `samples` samples in its lifetime, `repeats` of them repeats.
fn finish(run: Run, samples: u64, repeats: u64) {
    let Run {
        server,
        config,
        agent,
    } = run;
    settle(agent, Duration::from_secs(120), || server.exhausted());
    let status = status_json(&config);
    let pa = source_status(&status, "pa");
    assert_eq!(
        (&pa["samples"], &pa["repeats"]),
        (&samples.into(), &repeats.into()),
        "{pa}"
    );
}

/// Both devices' agents at once, into the same folders under `dir/out`, the sinks of
/// [`TREES`]; 48 hours, two sensors, two columns each. Then, restarted,
/// [`late_bodies`]: a late part for each of hours 0-9 of 5 January.
fn make_tree(dir: &Path) -> PathBuf {
    let out = dir.join("out");
    let sinks = local_sinks(&out);
    for (feed, samples, repeats) in [
        (bodies as fn(usize) -> Vec<String>, 48 * 4, 0),
        (late_bodies, 48 * 4 + LATE_SAMPLES + REPEATS, REPEATS),
    ] {
        let runs: Vec<Run> = DEVICES
            .iter()
            .enumerate()
            .map(|(d, device)| start(dir, device, feed(d), &sinks))
            .collect();
        for run in runs {
            finish(run, samples, repeats);
        }
    }
    out
}

/// Reads the tree with every reader and prints what each saw, as JSON. `argv[2]` is the
/// DuckDB merge SQL of docs/formats.md, run over every `long` tree.
const READERS: &str = r#"
import glob, json, re, sys
import duckdb, pandas as pd, polars as pl, pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq
# A query slower than 2 s (a loaded machine) would print a progress bar into the JSON.
duckdb.execute("SET enable_progress_bar = false")
root, merge_sql = sys.argv[1], sys.argv[2]
PARTS = ["year", "month", "day", "hour"]
TIMES = ["window_start", "first_time", "last_time"]
out = {}

def attempt(key, read):
    try:
        out[key] = read()
    except Exception as e:
        out[key] = {"error": f"{type(e).__name__}: {e}"}

def files(tree, ext):
    return sorted(glob.glob(f"{root}/{tree}/**/*.{ext}", recursive=True))

def pandas_types(df, columns):
    def one(c):
        t = df[c].dtype
        if isinstance(t, pd.CategoricalDtype):
            return f"category[{t.categories.dtype}]"
        return str(t)
    return {c: one(c) for c in columns}

def duck(q, columns):
    types = duckdb.sql(f"SELECT {', '.join(f'typeof({c})' for c in columns)} {q} LIMIT 1").fetchall()[0]
    seen = {
        "rows": duckdb.sql(f"SELECT count(*) {q}").fetchall()[0][0],
        "types": dict(zip(columns, types)),
        "devices": [r[0] for r in duckdb.sql(f"SELECT DISTINCT device {q} ORDER BY 1").fetchall()],
    }
    try:
        seen["before_10"] = duckdb.sql(f"SELECT count(*) {q} WHERE hour < 10").fetchall()[0][0]
    except Exception as e:
        seen["before_10"] = f"{type(e).__name__}: {e}"
    return seen

def merged(reader, path):
    # The documented merge, on another reader as docs/formats.md says for text.
    source = re.search(r"read_parquet\('out/\*\*/\*\.parquet',[^)]*\)", merge_sql).group(0)
    extra = {"read_parquet": ", file_row_number = true", "read_json": "",
             "read_csv": ", types = {'stdev': 'DOUBLE'}"}[reader]
    sql = merge_sql.replace(source, f"{reader}('{path}', hive_partitioning = true, filename = true{extra})")
    if reader != "read_parquet":
        sql = sql.replace(", file_row_number", "")
    windows, samples, total = duckdb.sql(
        f"SELECT count(*), sum(count), sum(count * mean) FROM ({sql})").fetchall()[0]
    return {"windows": windows, "samples": samples, "total": total}

def counts(columns, rows):
    # Samples in a wide table: every count_ column summed, nulls skipped.
    return sum(r[c] or 0 for r in rows for c in columns if c.startswith("count_"))

# The long layout: no option beyond hive partitioning.
columns = ["device", *PARTS, *TIMES, "count"]
def pandas():
    df = pd.read_parquet(f"{root}/parquet")
    return {
        "rows": len(df),
        "types": pandas_types(df, columns),
        "devices": sorted(str(d) for d in df["device"].unique()),
        "hours": sorted(int(h) for h in df["hour"].unique()),
        "months": sorted(int(m) for m in df["month"].unique()),
    }
attempt("pandas parquet", pandas)
def arrow():
    t = ds.dataset(f"{root}/parquet", format="parquet", partitioning="hive").to_table()
    return {"rows": t.num_rows, "types": {c: str(t.schema.field(c).type) for c in columns}}
attempt("pyarrow parquet", arrow)
def polars():
    p = pl.read_parquet(f"{root}/parquet/**/*.parquet", hive_partitioning=True)
    return {"rows": p.height, "types": {c: str(p.schema[c]) for c in columns}}
attempt("polars parquet", polars)
q = f"FROM read_parquet('{root}/parquet/**/*.parquet', hive_partitioning = true)"
attempt("duckdb parquet", lambda: duck(q, columns))
attempt("merged parquet", lambda: merged("read_parquet", f"{root}/parquet/**/*.parquet"))

# The wide layout, whose late parts have sensor 11's columns: the one option per reader.
wide = f"{root}/wide"
paths = files("wide", "parquet")
columns = ["device", *PARTS, "window_start", "count_pa_7_pm", "count_pa_11_pm"]
def wide_pandas():
    plain = pd.read_parquet(wide)
    d = ds.dataset(wide, format="parquet", partitioning="hive")
    schema = pa.unify_schemas([d.schema] + [pq.read_schema(f) for f in d.files])
    df = pd.read_parquet(wide, schema=schema)
    return {
        "rows": len(df),
        "types": pandas_types(df, columns),
        "samples": int(sum(df[c].sum() for c in df.columns if c.startswith("count_"))),
        "plain_has_11": "count_pa_11_pm" in plain.columns,
    }
attempt("pandas wide", wide_pandas)
def wide_arrow():
    plain = ds.dataset(wide, format="parquet", partitioning="hive")
    schema = pa.unify_schemas([plain.schema] + [pq.read_schema(f) for f in plain.files])
    t = ds.dataset(wide, format="parquet", partitioning="hive", schema=schema).to_table()
    return {
        "rows": t.num_rows,
        "types": {c: str(t.schema.field(c).type) for c in columns},
        "samples": counts(t.column_names, t.to_pylist()),
        "plain_has_11": "count_pa_11_pm" in plain.to_table().column_names,
    }
attempt("pyarrow wide", wide_arrow)
def wide_polars():
    p = pl.concat([pl.scan_parquet(f, hive_partitioning=True) for f in paths],
                  how="diagonal_relaxed").collect()
    try:
        pl.read_parquet(f"{wide}/**/*.parquet", hive_partitioning=True)
        plain = "read"
    except Exception as e:
        plain = type(e).__name__
    return {"rows": p.height, "types": {c: str(p.schema[c]) for c in columns},
            "samples": counts(p.columns, p.to_dicts()), "plain": plain}
attempt("polars wide", wide_polars)
def wide_duck():
    q = f"FROM read_parquet('{wide}/**/*.parquet', hive_partitioning = true, union_by_name = true)"
    seen = duck(q, columns)
    names = [c for c in duckdb.sql(f"SELECT * {q} LIMIT 0").columns if c.startswith("count_")]
    seen["samples"] = duckdb.sql(f"SELECT {' + '.join(f'coalesce(sum({c}), 0)' for c in names)} {q}").fetchall()[0][0]
    return seen
attempt("duckdb wide", wide_duck)

for tree in ["parquet", "wide"]:
    def alone():
        one = files(tree, "parquet")[0]
        meta = pq.read_metadata(one).metadata or {}
        return {
            "columns": pq.read_schema(one).names,
            "device": meta.get(b"edgespool.device", b"").decode(),
            "path_device": one.split("/device=")[1].split("/")[0],
        }
    attempt(f"file {tree}", alone)

for tree, ext in [("ndjson", "ndjson"), ("ndjson_gz", "ndjson.gz"), ("csv", "csv"), ("csv_gz", "csv.gz")]:
    paths = files(tree, ext)
    columns = ["device", *PARTS, *TIMES, "count"]
    json_format = "ndjson" in ext
    reader = "read_json" if json_format else "read_csv"
    q = f"FROM {reader}('{root}/{tree}/**/*.{ext}', hive_partitioning = true)"
    def duck_text():
        seen = duck(q, columns)
        seen["files"] = len(paths)
        seen["samples"] = duckdb.sql(f"SELECT sum(count) {q}").fetchall()[0][0]
        return seen
    attempt(f"duckdb {tree}", duck_text)
    attempt(f"merged {tree}", lambda: merged(reader, f"{root}/{tree}/**/*.{ext}"))
    # pandas, file by file, the compression inferred from the extension.
    def pandas():
        df = pd.concat([pd.read_json(f, lines=True) if json_format else pd.read_csv(f) for f in paths])
        return {"rows": len(df), "count": str(df["count"].dtype), "columns": sorted(df.columns)}
    attempt(f"pandas {tree}", pandas)
    def arrow():
        t = ds.dataset(f"{root}/{tree}", format="json" if json_format else "csv", partitioning="hive").to_table()
        return {"rows": t.num_rows, "types": {c: str(t.schema.field(c).type) for c in ["device", *PARTS, "count"]}}
    attempt(f"pyarrow {tree}", arrow)
print(json.dumps(out, default=str))
"#;

/// The merge SQL of docs/formats.md: the block that starts `-- One row per window (DuckDB)`.
fn documented_merge_sql() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/formats.md");
    let docs = std::fs::read_to_string(&path).expect("docs/formats.md reads");
    let start = docs
        .find("```sql\n-- One row per window (DuckDB)\n")
        .expect("docs/formats.md gives the DuckDB merge SQL");
    let block = &docs[start + "```sql\n".len()..];
    let end = block.find("```").expect("the block ends");
    block[..end].trim().trim_end_matches(';').to_owned()
}

fn read_with_every_reader(root: &Path) -> Value {
    let python = python();
    let run = Command::new(&python)
        .args([
            "-c",
            READERS,
            &root.display().to_string(),
            &documented_merge_sql(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run the suite with scripts/test.sh"));
    assert!(
        run.status.success(),
        "a reader failed (scripts/test.sh installs pandas, pyarrow, polars and DuckDB):\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "the readers printed no JSON ({e}): {}",
            String::from_utf8_lossy(&run.stdout)
        )
    })
}

fn types(value: &Value, columns: &[&str]) -> Vec<String> {
    columns
        .iter()
        .map(|c| {
            value["types"][c]
                .as_str()
                .unwrap_or_else(|| panic!("no type for {c}: {value}"))
                .to_owned()
        })
        .collect()
}

/// The values of the readings `bodies` hold, repeats left out: the sum of `pm` and
/// `Temperature` over every row, and how many values.
fn fed(bodies: &[String]) -> (f64, u64) {
    let mut sum = 0.0;
    let mut n = 0;
    for body in bodies {
        let body: Value = serde_json::from_str(body).expect("a body");
        for row in body["data"].as_array().expect("rows") {
            sum += row[1].as_f64().expect("pm") + row[4].as_f64().expect("Temperature");
            n += 2;
        }
    }
    (sum, n)
}

#[test]
fn every_reader_reads_the_tree_as_one_table_with_integer_partitions_on_every_date() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = make_tree(dir.path());
    let seen = read_with_every_reader(&out);
    let report = serde_json::to_string_pretty(&seen).expect("json");
    let at = |key: &str| {
        seen.get(key)
            .unwrap_or_else(|| panic!("no {key} in {report}"))
            .clone()
    };
    let parts = ["year", "month", "day", "hour"];
    let times = ["window_start", "first_time", "last_time"];
    let hours: Vec<u64> = (0..24).collect();
    // Per device: 48 hours × 2 sensors × 2 columns in part-0000, then in the late parts
    // a row per late hour for sensor 7's and sensor 11's two columns.
    let late_rows = 2 * LATE_HOURS as u64 * 4;
    let long_rows = 2 * 48 * 4 + late_rows;
    // One row per window: sensor 7's late rows fold into the windows they came late to.
    let windows = 2 * 48 * 4 + late_rows / 2;
    let wide_rows = 2 * 48 + 2 * LATE_HOURS as u64;
    let (total, values) = DEVICES
        .iter()
        .enumerate()
        .map(|(d, _)| {
            let late = late_bodies(d);
            let (a, n) = fed(&bodies(d));
            let (b, m) = fed(&late[..late.len() - 1]);
            (a + b, n + m)
        })
        .fold((0.0, 0), |(s, n), (a, m)| (s + a, n + m));
    assert_eq!(values, long_rows, "every value a row of one sample");

    // The long layout, with no option: late parts are rows like any other.
    let pandas = at("pandas parquet");
    assert_eq!(pandas["rows"], long_rows, "pandas: {report}");
    assert_eq!(pandas["devices"], serde_json::json!(DEVICES), "{report}");
    assert_eq!(pandas["hours"], serde_json::json!(hours), "{report}");
    assert_eq!(pandas["months"], serde_json::json!([1, 12]), "{report}");
    assert_eq!(
        types(&pandas, &parts),
        vec!["category[int32]"; 4],
        "{report}"
    );
    assert_eq!(
        types(&pandas, &[&times[..], &["count"]].concat()),
        [
            "datetime64[us, UTC]",
            "datetime64[us, UTC]",
            "datetime64[us, UTC]",
            "int64"
        ],
        "{report}"
    );
    let arrow = at("pyarrow parquet");
    assert_eq!(arrow["rows"], long_rows, "{report}");
    assert_eq!(types(&arrow, &parts), vec!["int32"; 4], "{report}");
    assert_eq!(
        types(&arrow, &[&["device"][..], &times, &["count"]].concat()),
        [
            "string",
            "timestamp[us, tz=UTC]",
            "timestamp[us, tz=UTC]",
            "timestamp[us, tz=UTC]",
            "int64"
        ],
        "{report}"
    );
    let polars = at("polars parquet");
    assert_eq!(polars["rows"], long_rows, "{report}");
    assert_eq!(types(&polars, &parts), vec!["Int64"; 4], "{report}");
    let utc = "Datetime(time_unit='us', time_zone='UTC')";
    assert_eq!(
        types(&polars, &[&["device"][..], &times, &["count"]].concat()),
        ["String", utc, utc, utc, "Int64"],
        "{report}"
    );
    let tz = "TIMESTAMP WITH TIME ZONE";
    for tree in ["parquet", "ndjson", "ndjson_gz", "csv", "csv_gz"] {
        let duck = at(&format!("duckdb {tree}"));
        assert_eq!(duck["rows"], long_rows, "{tree}: {report}");
        assert_eq!(types(&duck, &parts), vec!["BIGINT"; 4], "{tree}: {report}");
        assert_eq!(
            types(&duck, &[&["device"][..], &times, &["count"]].concat()),
            ["VARCHAR", tz, tz, tz, "BIGINT"],
            "{tree}: {report}"
        );
        // Hours 0-9 of both days, and the late parts (all in hours 0-9).
        assert_eq!(
            duck["before_10"],
            2 * 2 * 10 * 4 + late_rows,
            "WHERE hour < 10, {tree}: {report}"
        );
        assert_eq!(duck["devices"], serde_json::json!(DEVICES), "{report}");
        // The merge of docs/formats.md: one row per window, every sample once.
        let merged = at(&format!("merged {tree}"));
        assert_eq!(
            (&merged["windows"], &merged["samples"]),
            (&windows.into(), &values.into()),
            "{tree}: {report}"
        );
        let sum = merged["total"].as_f64().expect("a total");
        assert!(
            (sum - total).abs() <= 1e-12 * total,
            "{tree}: {sum} vs {total}"
        );
    }

    // The wide layout: sensor 11's columns are in the late parts only. Read plainly,
    // pyarrow and pandas drop them and polars fails; with the one option each, every
    // column is there.
    let samples = |reader: &Value| reader["samples"].as_u64();
    let pandas = at("pandas wide");
    assert_eq!(pandas["rows"], wide_rows, "{report}");
    assert_eq!(pandas["plain_has_11"], false, "{report}");
    assert_eq!(samples(&pandas), Some(values), "{report}");
    // Given the unified schema, pandas takes the partition columns' types from it.
    assert_eq!(types(&pandas, &parts), vec!["int32"; 4], "{report}");
    assert_eq!(
        types(
            &pandas,
            &["window_start", "count_pa_7_pm", "count_pa_11_pm"]
        ),
        ["datetime64[us, UTC]", "int64", "float64"],
        "count_pa_11_pm has nulls, which pandas holds as NaN: {report}"
    );
    let arrow = at("pyarrow wide");
    assert_eq!(arrow["rows"], wide_rows, "{report}");
    assert_eq!(arrow["plain_has_11"], false, "{report}");
    assert_eq!(samples(&arrow), Some(values), "{report}");
    assert_eq!(types(&arrow, &parts), vec!["int32"; 4], "{report}");
    assert_eq!(
        types(
            &arrow,
            &["device", "window_start", "count_pa_7_pm", "count_pa_11_pm"]
        ),
        ["string", "timestamp[us, tz=UTC]", "int64", "int64"],
        "{report}"
    );
    let polars = at("polars wide");
    assert_eq!(polars["rows"], wide_rows, "{report}");
    assert_eq!(polars["plain"], "SchemaError", "{report}");
    assert_eq!(samples(&polars), Some(values), "{report}");
    assert_eq!(types(&polars, &parts), vec!["Int64"; 4], "{report}");
    assert_eq!(
        types(
            &polars,
            &["device", "window_start", "count_pa_7_pm", "count_pa_11_pm"]
        ),
        ["String", utc, "Int64", "Int64"],
        "{report}"
    );
    let duck = at("duckdb wide");
    assert_eq!(duck["rows"], wide_rows, "{report}");
    assert_eq!(samples(&duck), Some(values), "{report}");
    assert_eq!(types(&duck, &parts), vec!["BIGINT"; 4], "{report}");
    assert_eq!(
        types(
            &duck,
            &["device", "window_start", "count_pa_7_pm", "count_pa_11_pm"]
        ),
        ["VARCHAR", tz, "BIGINT", "BIGINT"],
        "{report}"
    );
    assert_eq!(
        duck["before_10"],
        2 * 2 * 10 + 2 * LATE_HOURS as u64,
        "WHERE hour < 10: {report}"
    );
    assert_eq!(duck["devices"], serde_json::json!(DEVICES), "{report}");

    for tree in ["parquet", "wide"] {
        let file = at(&format!("file {tree}"));
        let columns: Vec<&str> = file["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for partition in ["device", "year", "month", "day", "hour"] {
            assert!(!columns.contains(&partition), "{tree}: {columns:?}");
        }
        assert_eq!(file["device"], file["path_device"], "{report}");
    }

    for tree in ["ndjson", "ndjson_gz", "csv", "csv_gz"] {
        let duck = at(&format!("duckdb {tree}"));
        assert_eq!(
            duck["files"],
            2 * 48 + 2 * LATE_HOURS as u64,
            "a part per device and hour, and a late part per late hour: {report}"
        );
        assert_eq!(duck["samples"], values, "{report}");
        let pandas = at(&format!("pandas {tree}"));
        assert_eq!(pandas["rows"], long_rows, "{tree}: {report}");
        assert_eq!(pandas["count"], "int64", "{tree}: {report}");
        assert!(
            !pandas["columns"]
                .as_array()
                .expect("columns")
                .contains(&Value::from("device")),
            "{tree}: the device is in the key only: {report}"
        );
        let arrow = at(&format!("pyarrow {tree}"));
        assert_eq!(arrow["rows"], long_rows, "{tree}: {report}");
        assert_eq!(types(&arrow, &parts), vec!["int32"; 4], "{tree}: {report}");
        assert_eq!(
            types(&arrow, &["device", "count"]),
            ["string", "int64"],
            "{report}"
        );
    }

    // The gzip files are gzip, and the plain ones are not; late parts are there.
    let files = read_tree(&out);
    let gz: Vec<&str> = files
        .iter()
        .map(|f| f.key.as_str())
        .filter(|k| k.ends_with(".gz"))
        .collect();
    assert_eq!(gz.len(), 2 * (2 * 48 + 2 * LATE_HOURS as usize), "{gz:?}");
    assert!(
        gz.iter()
            .any(|k| k.contains("/year=2025/month=12/day=9/hour=0/")),
        "{gz:?}"
    );
    assert!(
        gz.iter().any(|k| k.ends_with(
            "ndjson_gz/device=pi-b/year=2026/month=1/day=5/hour=9/pi-b-20260105T0900-part-0001.ndjson.gz"
        )),
        "{gz:?}"
    );
    for key in &gz {
        let bytes = std::fs::read(out.join(key)).expect("read");
        assert_eq!(bytes[..2], [0x1f, 0x8b], "{key}");
    }
}

#[test]
fn padded_keys_keep_the_earlier_folders_for_an_existing_lake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let sinks = format!(
        "\n[[sinks]]\nkind = \"local\"\nname = \"old\"\npath = \"{}\"\nkeys = \"padded\"\n",
        out.display()
    );
    finish(
        start(dir.path(), "pi-a", bodies(0)[..12].to_vec(), &sinks),
        12 * 4,
        0,
    );
    let keys: Vec<String> = read_tree(&out).into_iter().map(|f| f.key).collect();
    assert_eq!(keys.len(), 12, "{keys:?}");
    assert_eq!(
        keys[0],
        "device=pi-a/year=2025/month=12/day=09/hour=00/pi-a-20251209T0000-part-0000.ndjson"
    );
    assert_eq!(
        keys[11],
        "device=pi-a/year=2025/month=12/day=09/hour=11/pi-a-20251209T1100-part-0000.ndjson"
    );
}

/// Each object's Content-Type and Content-Encoding as boto3 sees them; the bucket is
/// mirrored to `argv[3]`.
const HEADS: &str = r#"
import boto3, json, os, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
found = {}
for o in s3.list_objects_v2(Bucket=sys.argv[2]).get("Contents", []):
    head = s3.head_object(Bucket=sys.argv[2], Key=o["Key"])
    found[o["Key"]] = [head.get("ContentType", ""), head.get("ContentEncoding", "")]
    path = os.path.join(sys.argv[3], o["Key"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s3.download_file(sys.argv[2], o["Key"], path)
print(json.dumps(found))
"#;

#[test]
fn compressed_objects_keep_their_content_type_and_say_their_content_encoding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&dir.path().join("s3.log"));
    s3.create_bucket("lake");
    let secret = write_file(dir.path(), "s3-secret", "test\n");
    let sinks = [
        s3_sink(
            &s3,
            "gz",
            "prefix = \"gz\"\nformat = \"ndjson\"\ncompression = \"gzip\"",
        ),
        s3_sink(
            &s3,
            "zst",
            "prefix = \"zst\"\nformat = \"csv\"\ncompression = \"zstd\"",
        ),
    ]
    .concat()
    .replace("{secret_file}", &secret.display().to_string());
    finish(
        start(dir.path(), "pi-a", bodies(0)[..3].to_vec(), &sinks),
        3 * 4,
        0,
    );

    let mirror = dir.path().join("mirror");
    let python = python();
    let run = Command::new(&python)
        .args([
            "-c",
            HEADS,
            &s3.endpoint,
            "lake",
            &mirror.display().to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let heads: Value = serde_json::from_slice(&run.stdout).expect("json");
    let heads = heads.as_object().expect("an object per key");
    assert_eq!(heads.len(), 6, "{heads:?}");
    let expect = |key: &str, head: [&str; 2]| {
        assert_eq!(heads.get(key), Some(&serde_json::json!(head)), "{heads:?}");
    };
    expect(
        "gz/device=pi-a/year=2025/month=12/day=9/hour=0/pi-a-20251209T0000-part-0000.ndjson.gz",
        ["application/x-ndjson", "gzip"],
    );
    expect(
        "zst/device=pi-a/year=2025/month=12/day=9/hour=2/pi-a-20251209T0200-part-0000.csv.zst",
        ["text/csv; charset=utf-8; header=present", "zstd"],
    );
    // Read back as they are, the compression told by the extension.
    let rows = edgespool_tests::duckdb(
        &mirror,
        "SELECT (SELECT sum(count) FROM read_json('{root}/gz/**/*.ndjson.gz', hive_partitioning = true)),
                (SELECT sum(count) FROM read_csv('{root}/zst/**/*.csv.zst', hive_partitioning = true)),
                (SELECT max(hour) FROM read_csv('{root}/zst/**/*.csv.zst', hive_partitioning = true))",
    );
    assert_eq!(
        rows,
        vec![vec![Value::from(12), Value::from(12), Value::from(2)]]
    );
}
