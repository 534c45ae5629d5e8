//! The wide layout read as one table by pyarrow.dataset, polars and DuckDB (readers we did
//! not write, from `$EDGESPOOL_PYTHON`), with hive partitioning: partitions planned together have the same columns
//! even where a series appears later, so the readers need no option; where a series first
//! appears after a partition was delivered, the one option per reader that docs/formats.md
//! gives reads every column.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, T0, purpleair_body, python, read_tree, table_source, wait_for,
    write_agent_config,
};
use serde_json::Value;

/// Reads `root`'s Parquet files with each reader, as docs/formats.md shows, with hive
/// partitioning: `plain` with no other option, `merged` with the one option that reads
/// columns that grew. Prints, per
/// reader, the column names and the rows, or the error.
const READERS: &str = r#"
import glob, json, sys
root, mode = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(root + "/**/*.parquet", recursive=True))
out = {}
def run(name, read):
    try:
        columns, rows = read()
        out[name] = {"columns": sorted(columns), "rows": rows}
    except Exception as e:
        out[name] = {"error": type(e).__name__ + ": " + str(e)[:300]}
def pyarrow_read():
    import pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq
    if mode == "plain":
        table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    else:
        first = ds.dataset(root, format="parquet", partitioning="hive")
        schema = pa.unify_schemas([first.schema] + [pq.read_schema(f) for f in first.files])
        table = ds.dataset(root, format="parquet", partitioning="hive", schema=schema).to_table()
    return table.column_names, table.to_pylist()
def polars_read():
    import polars as pl
    if mode == "plain":
        frame = pl.read_parquet(root + "/**/*.parquet", hive_partitioning=True)
    else:
        frame = pl.concat([pl.scan_parquet(f, hive_partitioning=True) for f in files], how="diagonal_relaxed").collect()
    return frame.columns, frame.to_dicts()
def duckdb_read():
    import duckdb
    option = "" if mode == "plain" else ", union_by_name = true"
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true{option})")
    return rel.columns, [dict(zip(rel.columns, r)) for r in rel.fetchall()]
run("pyarrow", pyarrow_read)
run("polars", polars_read)
run("duckdb", duckdb_read)
print(json.dumps(out, default=str))
"#;

fn read_with_each(root: &Path, mode: &str) -> Value {
    let python = python();
    let out = Command::new(&python)
        .args(["-c", READERS, &root.display().to_string(), mode])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run the suite with scripts/test.sh"));
    assert!(
        out.status.success(),
        "the readers failed (scripts/test.sh installs pyarrow, polars and DuckDB): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the readers printed JSON")
}

/// The sum of a column over every row a reader returned (nulls skipped).
fn sum(reader: &Value, column: &str) -> f64 {
    reader["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r[column].as_f64())
        .sum()
}

/// Every row a reader returned has the device and the hour from the path.
fn assert_partition(name: &str, reader: &Value) {
    for row in reader["rows"].as_array().expect("rows") {
        assert_eq!(
            (&row["device"], &row["hour"]),
            (&Value::from("e2e"), &Value::from(3)),
            "{name}: {row}"
        );
    }
}

fn has_columns(reader: &Value, columns: &[&str]) -> bool {
    let got = reader["columns"].as_array().expect("columns");
    columns.iter().all(|c| got.iter().any(|g| g == c))
}

#[test]
fn wide_files_of_a_device_read_as_one_table_and_a_series_added_later_with_one_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Minute 0 holds sensor 7; sensor 9 first appears in minute 1; both arrive at once
    // (a device's backlog, or the sink back after an outage).
    let server = JsonServer::start(
        vec![purpleair_body(&[
            (7, T0 + 5, 1.0, 0.0),
            (7, T0 + 65, 2.0, 0.0),
            (9, T0 + 70, 4.0, 0.0),
        ])],
        purpleair_body(&[]),
    );
    let out = dir.path().join("out");
    let body = format!(
        "{}\n[[sinks]]\nkind = \"local\"\nname = \"lake\"\npath = \"{}\"\nformat = \"parquet\"\nlayout = \"wide\"\nretry_max = \"1s\"\n",
        table_source(&server.url, &["pm"]),
        out.display()
    );
    let config = write_agent_config(dir.path(), &body);
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let parquet_files = |n: usize| {
        let out = out.clone();
        move || {
            let files = read_tree(&out);
            let parquet = files.iter().filter(|f| f.key.ends_with(".parquet")).count();
            (parquet == n).then_some(())
        }
    };
    wait_for("minutes 0 and 1", Duration::from_secs(60), parquet_files(2));

    let both = [
        "mean_pa_7_pm",
        "mean_pa_9_pm",
        "count_pa_9_pm",
        "window_start",
        "device",
        "hour",
    ];
    let plain = read_with_each(&out, "plain");
    for name in ["pyarrow", "polars", "duckdb"] {
        let reader = &plain[name];
        assert!(
            reader["error"].is_null() && has_columns(reader, &both),
            "{name} reads both files whole with no option: {reader}"
        );
        assert_eq!(reader["rows"].as_array().map(Vec::len), Some(3), "{name}");
        assert_partition(name, reader);
        assert_eq!(sum(reader, "mean_pa_9_pm"), 4.0, "{name}: {reader}");
        assert_eq!(sum(reader, "mean_pa_7_pm"), 3.0, "{name}: {reader}");
    }

    // Sensor 11 first appears once minutes 0 and 1 are delivered: only minute 2's file
    // has its columns. The option each reader needs for that reads every column.
    server.push(purpleair_body(&[(11, T0 + 125, 8.0, 0.0)]));
    wait_for("minute 2", Duration::from_secs(60), parquet_files(3));
    let merged = read_with_each(dir.path().join("out").as_path(), "merged");
    for name in ["pyarrow", "polars", "duckdb"] {
        let reader = &merged[name];
        assert!(
            reader["error"].is_null()
                && has_columns(reader, &[&both[..], &["mean_pa_11_pm"]].concat()),
            "{name} reads the grown columns with its documented option: {reader}"
        );
        assert_eq!(reader["rows"].as_array().map(Vec::len), Some(4), "{name}");
        assert_partition(name, reader);
        assert_eq!(sum(reader, "mean_pa_11_pm"), 8.0, "{name}: {reader}");
        assert_eq!(sum(reader, "count_pa_9_pm"), 1.0, "{name}: {reader}");
    }
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
}
