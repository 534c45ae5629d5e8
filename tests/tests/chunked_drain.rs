//! A part much larger than a chunk, drained in chunks: to a local folder as Parquet (a
//! row group per chunk) and to S3 as NDJSON in a multipart upload of more than one part,
//! read back by pyarrow, DuckDB and pandas (readers we did not write) with exact counts
//! and values, one file per part, and the same bytes when the part is delivered again
//! after a crash between the upload and its record.
//!
//! The backlog: 30 table bodies of 500 sensors (two columns each), stamped at the first
//! 30 seconds of 2026-01-02T03:00Z, so 30,000 one-second windows in one closed minute
//! partition. A first agent spools them behind a sink that cannot deliver (a port that
//! nothing listens on) and stops; the agent under test then starts with the sink alone,
//! so its first part is the whole partition.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, S3Server, T0, find_sink, free_port, purpleair_body, python, s3_sink,
    s3_sink_at, table_source, wait_for, write_agent_config, write_file,
};
use serde_json::Value;

const SENSORS: u32 = 500;
const SECONDS: i64 = 30;
/// Rows of the partition: a window per sensor, column and second.
const ROWS: u64 = SENSORS as u64 * 2 * SECONDS as u64;
/// 2,000 rows a chunk: two window starts (1,000 series each), 15 chunks.
const CHUNK_ROWS: u64 = 2_000;

/// Body `k`: every sensor at second `k`, pm = 100 × id + k, Temperature = k.
fn body(k: i64) -> String {
    let rows: Vec<(u32, i64, f64, f64)> = (1..=SENSORS)
        .map(|id| (id, T0 + k, f64::from(id) * 100.0 + k as f64, k as f64))
        .collect();
    purpleair_body(&rows)
}

/// The sum of every pm window's mean, and of every Temperature window's.
fn expected_sums() -> (f64, f64) {
    let ids: f64 = (1..=SENSORS).map(f64::from).sum();
    let ks: f64 = (0..SECONDS).map(|k| k as f64).sum();
    (
        ids * 100.0 * SECONDS as f64 + ks * f64::from(SENSORS),
        ks * f64::from(SENSORS),
    )
}

fn config(dir: &Path, url: &str, sinks: &str) -> PathBuf {
    let secret = write_file(dir, "credentials/s3-secret", "test\n");
    let sinks = sinks.replace("{secret_file}", &secret.display().to_string());
    write_agent_config(
        dir,
        &format!("{}\n{sinks}", table_source(url, &["pm", "Temperature"])),
    )
}

/// Spools the backlog behind a sink that cannot deliver, then stops the agent (SIGTERM
/// commits every window). Returns the table server (serving empty bodies from now on).
fn spool_the_backlog(dir: &Path) -> JsonServer {
    let server = JsonServer::start((0..SECONDS).map(body).collect(), purpleair_body(&[]));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gate = config(dir, &server.url, &s3_sink_at(&dead, "gate", ""));
    let agent = Agent::start(&gate, &dir.join("spool-agent.log"));
    wait_for("every body served", Duration::from_secs(60), || {
        server.exhausted().then_some(())
    });
    // Two flushes after the last body: its samples reached the aggregator.
    let first = wait_for("a flush", Duration::from_secs(30), || {
        agent.try_status()?["daemon"]["heartbeat"]
            .as_str()
            .map(str::to_owned)
    });
    wait_for("two more flushes", Duration::from_secs(30), || {
        let now = agent.try_status()?["daemon"]["heartbeat"]
            .as_str()?
            .to_owned();
        (now > first).then_some(())
    });
    assert!(agent.terminate().success(), "a clean stop");
    server
}

/// Runs the agent under test on `config` until it kills itself right after the upload
/// (before recording it), then again until the sink has delivered its one part.
fn deliver_twice(dir: &Path, config: &Path, sink: &str, after_first: impl FnOnce()) {
    let log = dir.join("agent.log");
    let point = format!("after-upload:{sink}");
    let mut agent = Agent::start_with_env(config, &log, &[("EDGESPOOL_FAILPOINT", &point)]);
    wait_for(
        "the agent killed at the failpoint",
        Duration::from_secs(120),
        || (!agent.is_running()).then_some(()),
    );
    after_first();
    let agent = Agent::start(config, &log);
    wait_for("the part recorded", Duration::from_secs(120), || {
        let status = agent.try_status()?;
        let sink = find_sink(&status, sink)?;
        (sink["delivered_parts"] == 1 && sink["pending_rows"] == 0).then_some(())
    });
    assert!(agent.terminate().success(), "a clean stop");
}

/// Every file below `root`, relative paths and bytes.
fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let key = path
                    .strip_prefix(root)
                    .expect("below")
                    .display()
                    .to_string();
                out.push((key, std::fs::read(&path).expect("readable")));
            }
        }
    }
    out.sort();
    out
}

/// Reads `file` with pyarrow, DuckDB and pandas; prints, per reader, rows, distinct
/// (series, window_start), the sums of `mean` for pm and Temperature, and for Parquet
/// the row groups.
const READ: &str = r#"
import json, sys
path, kind = sys.argv[1], sys.argv[2]
out = {}
def sums(series, means):
    pm = sum(m for s, m in zip(series, means) if s.endswith(".pm"))
    t = sum(m for s, m in zip(series, means) if s.endswith(".Temperature"))
    return pm, t
if kind == "parquet":
    import pyarrow.parquet as pq, duckdb
    duckdb.execute("SET enable_progress_bar = false")
    table = pq.read_table(path)
    series, starts, means = (table.column(c).to_pylist() for c in ("series", "window_start", "mean"))
    out["pyarrow"] = [table.num_rows, len(set(zip(series, starts))), *sums(series, means)]
    out["row_groups"] = pq.ParquetFile(path).metadata.num_row_groups
    rel = duckdb.sql(f"SELECT count(*), count(DISTINCT (series, window_start)), "
                     f"sum(mean) FILTER (WHERE series LIKE '%.pm'), "
                     f"sum(mean) FILTER (WHERE series LIKE '%.Temperature') FROM read_parquet('{path}')")
    out["duckdb"] = list(rel.fetchall()[0])
else:
    import pandas as pd
    frame = pd.read_json(path, lines=True)
    pairs = len(set(zip(frame["series"], frame["window_start"])))
    out["pandas"] = [len(frame), pairs, *sums(list(frame["series"]), list(frame["mean"]))]
print(json.dumps(out, default=float))
"#;

fn read_back(path: &Path, kind: &str) -> Value {
    let python = python();
    let out = Command::new(&python)
        .args(["-c", READ, &path.display().to_string(), kind])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; run the suite with scripts/test.sh"));
    assert!(
        out.status.success(),
        "the readers failed (scripts/test.sh installs pyarrow, DuckDB and pandas): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the readers printed JSON")
}

fn assert_every_row(reader: &Value, name: &str) {
    let (pm, t) = expected_sums();
    let got = reader
        .as_array()
        .unwrap_or_else(|| panic!("{name}: {reader}"));
    assert_eq!(got[0].as_u64(), Some(ROWS), "{name}: every row");
    assert_eq!(got[1].as_u64(), Some(ROWS), "{name}: each window once");
    assert_eq!(got[2].as_f64(), Some(pm), "{name}: the pm values exactly");
    assert_eq!(
        got[3].as_f64(),
        Some(t),
        "{name}: the Temperature values exactly"
    );
}

const KEY: &str = "device=e2e/year=2026/month=1/day=2/hour=3/e2e-20260102T0300-part-0000";

#[test]
fn a_part_of_many_chunks_lands_in_a_local_folder_as_one_parquet_file_of_a_row_group_per_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spool_the_backlog(dir.path());
    let out = dir.path().join("out");
    let sink = format!(
        "[[sinks]]\nkind = \"local\"\nname = \"disk\"\npath = \"{}\"\nformat = \"parquet\"\n\
         late_grace = \"0s\"\nchunk_rows = {CHUNK_ROWS}\n",
        out.display()
    );
    let config = config(dir.path(), &server.url, &sink);
    let mut first = Vec::new();
    deliver_twice(dir.path(), &config, "disk", || first = files(&out));
    let second = files(&out);
    let key = format!("{KEY}.parquet");
    assert_eq!(
        first.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        [key.as_str()],
        "one file, no staging file left"
    );
    assert_eq!(
        second, first,
        "delivered again: the same bytes under the same key"
    );
    let read = read_back(&out.join(&key), "parquet");
    assert_every_row(&read["pyarrow"], "pyarrow");
    assert_every_row(&read["duckdb"], "duckdb");
    assert_eq!(
        read["row_groups"].as_u64(),
        Some(ROWS / CHUNK_ROWS),
        "a row group per chunk of {CHUNK_ROWS} rows"
    );
}

#[test]
fn a_part_of_many_chunks_goes_to_s3_as_one_multipart_object_of_several_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&dir.path().join("s3.log"));
    s3.create_bucket("lake");
    let server = spool_the_backlog(dir.path());
    // NDJSON, about 330 bytes a row: some 10 MB, two parts of 5 MiB (S3's smallest).
    let sink = s3_sink(
        &s3,
        "lake",
        &format!("format = \"ndjson\"\npart_size = \"5 MiB\"\nchunk_rows = {CHUNK_ROWS}"),
    );
    let config = config(dir.path(), &server.url, &sink);
    let (one, two) = (dir.path().join("mirror-1"), dir.path().join("mirror-2"));
    deliver_twice(dir.path(), &config, "lake", || s3.mirror("lake", &one));
    s3.mirror("lake", &two);
    let objects = s3.list("lake");
    let key = format!("{KEY}.ndjson");
    assert_eq!(
        objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
        [key.as_str()],
        "one object, for the one part"
    );
    assert!(
        objects[0].etag.ends_with("-2"),
        "a multipart upload of two parts: {:?}",
        objects[0]
    );
    let (first, second) = (files(&one), files(&two));
    assert_eq!(first.len(), 1);
    assert_eq!(
        second, first,
        "delivered again: the same bytes under the same key"
    );
    assert_every_row(&read_back(&two.join(&key), "ndjson")["pandas"], "pandas");
}
