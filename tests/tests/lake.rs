//! The output tree read as a data lake: pandas, pyarrow.dataset, polars and DuckDB (from
//! `$EDGESPOOL_PYTHON`, which scripts/test.sh makes) read what two agents wrote into one
//! folder, with no option beyond hive partitioning.
//!
//! The rows come from an HTTP table source whose rows carry their own timestamps: one
//! reading per hour of 9 December 2025 and of 5 January 2026, so that the tree holds
//! hours 0 to 23, days below and above 10 and months 1 and 12. Those partitions are long
//! closed: each goes out as soon as it is committed.

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

/// Local sinks for [`TREES`] under `out`.
fn local_sinks(out: &Path) -> String {
    TREES
        .iter()
        .map(|(prefix, keys)| {
            format!(
                "\n[[sinks]]\nkind = \"local\"\nname = \"{prefix}\"\npath = \"{}\"\nprefix = \"{prefix}\"\n{keys}\n",
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
/// that it took `samples` samples.
fn finish(run: Run, samples: u64) {
    let Run {
        server,
        config,
        agent,
    } = run;
    settle(agent, Duration::from_secs(120), || server.exhausted());
    let status = status_json(&config);
    assert_eq!(source_status(&status, "pa")["samples"], samples);
}

/// Both devices' agents at once, into the same folders under `dir/out`, the sinks of
/// [`TREES`]; 48 hours, two sensors, two columns each.
fn make_tree(dir: &Path) -> PathBuf {
    let out = dir.join("out");
    let sinks = local_sinks(&out);
    let runs: Vec<Run> = DEVICES
        .iter()
        .enumerate()
        .map(|(d, device)| start(dir, device, bodies(d), &sinks))
        .collect();
    for run in runs {
        finish(run, 48 * 4);
    }
    out
}

/// Reads the tree with every reader and prints what each saw, as JSON.
const READERS: &str = r#"
import glob, json, sys
import duckdb, pandas as pd, polars as pl, pyarrow.dataset as ds, pyarrow.parquet as pq
root = sys.argv[1]
PARTS = ["year", "month", "day", "hour"]
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

for tree, count in [("parquet", "count"), ("wide", "count_pa_7_pm")]:
    columns = ["device", *PARTS, "window_start", count]
    def pandas():
        df = pd.read_parquet(f"{root}/{tree}")
        return {
            "rows": len(df),
            "types": pandas_types(df, columns),
            "devices": sorted(str(d) for d in df["device"].unique()),
            "hours": sorted(int(h) for h in df["hour"].unique()),
            "months": sorted(int(m) for m in df["month"].unique()),
        }
    attempt(f"pandas {tree}", pandas)
    def arrow():
        t = ds.dataset(f"{root}/{tree}", format="parquet", partitioning="hive").to_table()
        return {"rows": t.num_rows, "types": {c: str(t.schema.field(c).type) for c in columns}}
    attempt(f"pyarrow {tree}", arrow)
    def polars():
        p = pl.read_parquet(f"{root}/{tree}/**/*.parquet", hive_partitioning=True)
        return {"rows": p.height, "types": {c: str(p.schema[c]) for c in columns}}
    attempt(f"polars {tree}", polars)
    q = f"FROM read_parquet('{root}/{tree}/**/*.parquet', hive_partitioning = true)"
    attempt(f"duckdb {tree}", lambda: duck(q, columns))
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
    columns = ["device", *PARTS, "window_start", "count"]
    json = "ndjson" in ext
    reader = "read_json" if json else "read_csv"
    q = f"FROM {reader}('{root}/{tree}/**/*.{ext}', hive_partitioning = true)"
    def duck_text():
        seen = duck(q, columns)
        seen["files"] = len(paths)
        seen["samples"] = duckdb.sql(f"SELECT sum(count) {q}").fetchall()[0][0]
        return seen
    attempt(f"duckdb {tree}", duck_text)
    # pandas, file by file, the compression inferred from the extension.
    def pandas():
        df = pd.concat([pd.read_json(f, lines=True) if json else pd.read_csv(f) for f in paths])
        return {"rows": len(df), "count": str(df["count"].dtype), "columns": sorted(df.columns)}
    attempt(f"pandas {tree}", pandas)
    def arrow():
        t = ds.dataset(f"{root}/{tree}", format="json" if json else "csv", partitioning="hive").to_table()
        return {"rows": t.num_rows, "types": {c: str(t.schema.field(c).type) for c in columns}}
    attempt(f"pyarrow {tree}", arrow)
print(__import__("json").dumps(out, default=str))
"#;

fn read_with_every_reader(root: &Path) -> Value {
    let python = python();
    let run = Command::new(&python)
        .args(["-c", READERS, &root.display().to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run the suite with scripts/test.sh"));
    assert!(
        run.status.success(),
        "a reader failed (scripts/test.sh installs pandas, pyarrow, polars and DuckDB):\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).expect("the readers printed JSON")
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
    let hours: Vec<u64> = (0..24).collect();

    for tree in ["parquet", "wide"] {
        // Long: two devices × 48 hours × 4 series; wide: one row per window.
        let rows = if tree == "parquet" { 384 } else { 96 };
        let count = if tree == "parquet" {
            "count"
        } else {
            "count_pa_7_pm"
        };
        let pandas = at(&format!("pandas {tree}"));
        assert_eq!(pandas["rows"], rows, "pandas {tree}: {report}");
        assert_eq!(pandas["devices"], serde_json::json!(DEVICES), "{report}");
        assert_eq!(pandas["hours"], serde_json::json!(hours), "{report}");
        assert_eq!(pandas["months"], serde_json::json!([1, 12]), "{report}");
        assert_eq!(
            types(&pandas, &parts),
            vec!["category[int32]"; 4],
            "pandas {tree}: {report}"
        );
        assert_eq!(
            types(&pandas, &["window_start", count]),
            ["datetime64[us, UTC]", "int64"],
            "pandas {tree}: {report}"
        );
        let arrow = at(&format!("pyarrow {tree}"));
        assert_eq!(arrow["rows"], rows, "{report}");
        assert_eq!(types(&arrow, &parts), vec!["int32"; 4], "{report}");
        assert_eq!(
            types(&arrow, &["device", "window_start", count]),
            ["string", "timestamp[us, tz=UTC]", "int64"],
            "{report}"
        );
        let polars = at(&format!("polars {tree}"));
        assert_eq!(polars["rows"], rows, "{report}");
        assert_eq!(types(&polars, &parts), vec!["Int64"; 4], "{report}");
        assert_eq!(
            types(&polars, &["device", "window_start", count]),
            [
                "String",
                "Datetime(time_unit='us', time_zone='UTC')",
                "Int64"
            ],
            "{report}"
        );
        let duck = at(&format!("duckdb {tree}"));
        assert_eq!(duck["rows"], rows, "{report}");
        assert_eq!(types(&duck, &parts), vec!["BIGINT"; 4], "{report}");
        assert_eq!(
            types(&duck, &["device", "window_start", count]),
            ["VARCHAR", "TIMESTAMP WITH TIME ZONE", "BIGINT"],
            "{report}"
        );
        assert_eq!(
            duck["before_10"],
            rows / 24 * 10,
            "WHERE hour < 10: {report}"
        );
        assert_eq!(duck["devices"], serde_json::json!(DEVICES), "{report}");
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
            2 * 48,
            "one part per device and hour: {report}"
        );
        assert_eq!(duck["rows"], 384, "{tree}: {report}");
        assert_eq!(duck["samples"], 2 * 48 * 4, "{report}");
        assert_eq!(types(&duck, &parts), vec!["BIGINT"; 4], "{tree}: {report}");
        assert_eq!(
            types(&duck, &["device", "window_start", "count"]),
            ["VARCHAR", "TIMESTAMP WITH TIME ZONE", "BIGINT"],
            "{tree}: {report}"
        );
        assert_eq!(duck["before_10"], 160, "WHERE hour < 10: {report}");
        let pandas = at(&format!("pandas {tree}"));
        assert_eq!(pandas["rows"], 384, "{tree}: {report}");
        assert_eq!(pandas["count"], "int64", "{tree}: {report}");
        assert!(
            !pandas["columns"]
                .as_array()
                .expect("columns")
                .contains(&Value::from("device")),
            "{tree}: the device is in the key only: {report}"
        );
        let arrow = at(&format!("pyarrow {tree}"));
        assert_eq!(arrow["rows"], 384, "{tree}: {report}");
        assert_eq!(types(&arrow, &parts), vec!["int32"; 4], "{tree}: {report}");
        assert_eq!(
            types(&arrow, &["device", "count"]),
            ["string", "int64"],
            "{report}"
        );
    }

    // The gzip files are gzip, and the plain ones are not.
    let files = read_tree(&out);
    let gz: Vec<&str> = files
        .iter()
        .map(|f| f.key.as_str())
        .filter(|k| k.ends_with(".gz"))
        .collect();
    assert_eq!(gz.len(), 2 * 2 * 48, "{gz:?}");
    assert!(
        gz.iter()
            .any(|k| k.contains("/year=2025/month=12/day=9/hour=0/")),
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
