//! PostgreSQL merges by time: a table made by an earlier edgespool gets `first_time` and
//! `last_time` added (and the index on (series, window_start)), and late rows earlier in
//! time take `first`, later ones `last`.
//!
//! Rows come from an HTTP table source whose rows carry fractional epoch seconds in
//! January 2026 (1 s windows, 1 min partitions): their partitions close at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{
    Agent, JsonServer, PgServer, T0, pg_sink, table_source, wait_for, write_agent_config,
    write_pg_password,
};

fn write_config(dir: &Path, url: &str, sinks: &str) -> PathBuf {
    let password = write_pg_password(dir);
    let sinks = sinks.replace("{password_file}", &password.display().to_string());
    // Several values of one sensor may share a timestamp here (the tie below): the source
    // keeps repeats, as a device that sends several readings per timestamp needs.
    let source = table_source(url, &["pm"]).replace(
        "interval = \"100ms\"\n",
        "interval = \"100ms\"\nrepeats = \"keep\"\n",
    );
    write_agent_config(dir, &format!("{source}\n{sinks}"))
}

/// A table body: (sensor, last_seen as written, pm).
fn body(rows: &[(u32, &str, f64)]) -> String {
    let data: Vec<String> = rows
        .iter()
        .map(|(id, seen, pm)| format!("[{id}, {pm}, {seen}]"))
        .collect();
    format!(
        "{{\"fields\": [\"ID\", \"pm\", \"last_seen\"], \"data\": [{}]}}",
        data.join(", ")
    )
}

/// The table as edgespool made it before `first_time` and `last_time`.
const OLD_TABLE: &str = "CREATE TABLE public.edgespool_windows (
    device text NOT NULL, series text NOT NULL, unit text,
    tags jsonb NOT NULL DEFAULT '{}',
    window_start timestamp with time zone NOT NULL, window_seconds integer NOT NULL,
    count bigint NOT NULL,
    min double precision, max double precision, mean double precision,
    stdev double precision, median double precision,
    first double precision, last double precision,
    loaded_at timestamp with time zone NOT NULL DEFAULT now(),
    PRIMARY KEY (device, series, window_start))";

fn row(pg: &PgServer, series: &str, start: i64) -> Option<String> {
    pg.try_psql(
        "postgres",
        &format!(
            "SELECT count, first, last, round(mean::numeric, 6),
                    coalesce(to_char(first_time AT TIME ZONE 'UTC', 'HH24:MI:SS.MS'), 'null'),
                    coalesce(to_char(last_time AT TIME ZONE 'UTC', 'HH24:MI:SS.MS'), 'null')
             FROM edgespool_windows
             WHERE series = '{series}' AND window_start = to_timestamp({start})"
        ),
    )
    .filter(|r| !r.is_empty())
}

#[test]
fn an_old_table_gets_the_time_columns_and_late_rows_merge_first_and_last_by_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    pg.psql("postgres", OLD_TABLE);
    // A row an earlier edgespool loaded, for a window the agent will load into.
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO edgespool_windows (device, series, unit, window_start, window_seconds,
                 count, min, max, mean, stdev, median, first, last)
             VALUES ('e2e', 'pa.9.pm', 'ug/m3', to_timestamp({}), 1, 1, 5, 5, 5, NULL, 5, 5, 5)",
            T0 + 120
        ),
    );
    let (t60, t120, t179) = (T0 + 60, T0 + 120, T0 + 179);
    let first = body(&[
        (7, &format!("{t60}.5"), 1.0),
        (9, &format!("{t120}.5"), 2.0),
        // A hair before the end of a window, a minute and a partition: stays in them.
        (8, &format!("{t179}.9996"), 3.0),
    ]);
    let server = JsonServer::start(vec![first], body(&[]));
    let config = write_config(dir.path(), &server.url, &pg_sink(&pg, "db", ""));
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    wait_for("the first loads", Duration::from_secs(60), || {
        let loads = pg.try_psql("postgres", "SELECT count(*) FROM edgespool_loads")?;
        (loads == "2").then_some(())
    });
    let columns = pg.psql(
        "postgres",
        "SELECT column_name || ' ' || data_type FROM information_schema.columns
         WHERE table_name = 'edgespool_windows' AND column_name LIKE '%_time'
         ORDER BY column_name",
    );
    assert_eq!(
        columns,
        "first_time timestamp with time zone\nlast_time timestamp with time zone"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'edgespool_windows_series_window_start'"
        ),
        "CREATE INDEX edgespool_windows_series_window_start ON public.edgespool_windows USING btree (series, window_start)",
        "the old table gets the index for one series over all devices"
    );
    assert_eq!(
        row(&pg, "pa.7.pm", t60).as_deref(),
        Some("1|1|1|1.000000|03:01:00.500|03:01:00.500")
    );
    assert_eq!(
        row(&pg, "pa.8.pm", t179).as_deref(),
        Some("1|3|3|3.000000|03:02:59.999|03:02:59.999"),
        "floored to the millisecond, in the window that ends after it"
    );
    // The earlier edgespool's row had no times: it keeps its first, takes the new last.
    assert_eq!(
        row(&pg, "pa.9.pm", t120).as_deref(),
        Some("2|5|2|3.500000|null|03:02:00.500")
    );

    // Late samples of the window loaded first: one before its first, one after its last.
    server.push(body(&[
        (7, &format!("{t60}.25"), 10.0),
        (7, &format!("{t60}.75"), 20.0),
    ]));
    let merged = wait_for("the late part merged", Duration::from_secs(30), || {
        row(&pg, "pa.7.pm", t60).filter(|r| r.starts_with("3|"))
    });
    assert_eq!(merged, "3|10|20|10.333333|03:01:00.250|03:01:00.750");
    // And a late sample that ties the last time: the later load's value.
    server.push(body(&[(7, &format!("{t60}.75"), 30.0)]));
    let tied = wait_for("the tie merged", Duration::from_secs(30), || {
        row(&pg, "pa.7.pm", t60).filter(|r| r.starts_with("4|"))
    });
    assert_eq!(tied, "4|10|30|15.250000|03:01:00.250|03:01:00.750");
    agent.terminate();
    let log = std::fs::read_to_string(dir.path().join("agent.log")).expect("log");
    assert!(log.contains("added columns to the table"), "{log}");
    assert!(
        log.contains("added the index on (series, window_start)"),
        "{log}"
    );
}

/// The sample standard deviation of `values`, exactly (to the last rounding): every
/// value near 1.7e9 is a whole number of 2^-22, so the sums are exact in `i128`.
fn exact_stdev(values: &[f64]) -> f64 {
    let units: Vec<i128> = values
        .iter()
        .map(|v| {
            let k = v * 4_194_304.0;
            assert_eq!(k.fract(), 0.0, "{v} is a whole number of 2^-22");
            k as i128
        })
        .collect();
    let n = units.len() as i128;
    let sum: i128 = units.iter().sum();
    let squares: i128 = units.iter().map(|k| k * k).sum();
    let variance = (n * squares - sum * sum) as f64 / (n * (n - 1)) as f64;
    variance.sqrt() / 4_194_304.0
}

#[test]
fn a_late_merge_on_a_large_offset_keeps_the_standard_deviation_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    let t = T0 + 60;
    // An energy meter in Wh near 1.7e9, a hundredth apart: ten readings, then ten late.
    let text: Vec<String> = (0..20).map(|i| format!("1700000000.{i:02}")).collect();
    let values: Vec<f64> = text.iter().map(|v| v.parse().expect("a number")).collect();
    let at = |i: usize| format!("{t}.{:03}", i * 40);
    let readings = |range: std::ops::Range<usize>| -> String {
        let rows: Vec<(u32, String, &str)> = range.map(|i| (5, at(i), text[i].as_str())).collect();
        let data: Vec<String> = rows
            .iter()
            .map(|(id, seen, pm)| format!("[{id}, {pm}, {seen}]"))
            .collect();
        format!(
            "{{\"fields\": [\"ID\", \"pm\", \"last_seen\"], \"data\": [{}]}}",
            data.join(", ")
        )
    };
    let server = JsonServer::start(vec![readings(0..10)], body(&[]));
    let config = write_config(dir.path(), &server.url, &pg_sink(&pg, "db", ""));
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let query = format!(
        "SELECT count, mean, stdev, mean_rest FROM edgespool_windows
         WHERE series = 'pa.5.pm' AND window_start = to_timestamp({t})"
    );
    wait_for("the first ten loaded", Duration::from_secs(60), || {
        pg.try_psql("postgres", &query)
            .filter(|r| r.starts_with("10|"))
    });
    server.push(readings(10..20));
    let merged = wait_for("the late ten merged", Duration::from_secs(60), || {
        pg.try_psql("postgres", &query)
            .filter(|r| r.starts_with("20|"))
    });
    agent.terminate();
    let fields: Vec<f64> = merged
        .split('|')
        .map(|f| f.parse().expect("a number"))
        .collect();
    let want = exact_stdev(&values);
    let relative = (fields[2] - want).abs() / want;
    assert!(
        relative <= 1e-12,
        "stdev {} against {want}: {relative:e} relative ({merged})",
        fields[2]
    );
    let exact_mean: f64 = {
        let units: i128 = values.iter().map(|v| (v * 4_194_304.0) as i128).sum();
        (units as f64 / 20.0) / 4_194_304.0
    };
    assert!(
        (fields[1] - exact_mean).abs() <= 2.5e-7,
        "mean {} against {exact_mean}",
        fields[1]
    );
}
