//! The Grafana dashboard (`deploy/grafana/edgespool.json`) against the real PostgreSQL,
//! with an agent delivering live: each panel's and variable's SQL, its macros expanded as
//! Grafana's PostgreSQL data source does, returns the rows of the current minute. The
//! partition is an hour: only the sink's per-flush delivery puts those rows in the table.
//! The wide view of docs/postgres.md and the index on (series, window_start) are tested
//! here too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use edgespool_tests::{Agent, PG_PASSWORD, PgServer, pg_sink, wait_for, write_file};
use serde_json::Value;

/// Grafana's time range and interval, and the dashboard's variables as the user set them.
struct Query<'a> {
    /// RFC 3339, UTC, as Grafana writes `$__timeFrom()`.
    from: String,
    to: String,
    /// `$__interval`, e.g. `5s`.
    interval: &'a str,
    variables: &'a [(&'a str, &'a [&'a str])],
}

/// Seconds in a Grafana interval: `5s`, `'1m'`, `1h`, `1d`.
fn interval_seconds(text: &str) -> i64 {
    let text = text.trim().trim_matches('\'');
    let (number, unit) = text.split_at(text.len() - 1);
    let n: i64 = number
        .parse()
        .unwrap_or_else(|_| panic!("interval {text:?}"));
    n * match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => panic!("interval unit {other:?}"),
    }
}

/// The arguments of the macro call whose `(` is at the start of `rest`, and the text
/// after its `)`.
fn arguments(rest: &str) -> (Vec<String>, &str) {
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    let inner = &rest[1..i];
                    let args = if inner.trim().is_empty() {
                        Vec::new()
                    } else {
                        inner.split(',').map(|a| a.trim().to_owned()).collect()
                    };
                    return (args, &rest[i + 1..]);
                }
            }
            _ => {}
        }
    }
    panic!("unclosed macro call in {rest:?}");
}

/// Expands `sql` as Grafana does: template variables first (`$__interval`, multi-value
/// variables as `'a','b'`), then the PostgreSQL data source's macros:
/// `$__timeFilter(c)` → `c BETWEEN 'from' AND 'to'`, `$__timeFrom()` → `'from'`,
/// `$__timeTo()` → `'to'`, `$__timeGroup(c, '5m')` → `floor(extract(epoch from c)/300)*300`
/// and `$__timeGroupAlias` the same with `AS "time"`. Anything else left with a `$`
/// fails the test: the dashboard uses only what is expanded here.
fn expand(sql: &str, query: &Query) -> String {
    let mut text = sql.replace(
        "$__interval_ms",
        &(interval_seconds(query.interval) * 1000).to_string(),
    );
    text = text.replace("$__interval", query.interval);
    let mut variables: Vec<&(&str, &[&str])> = query.variables.iter().collect();
    variables.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, values) in variables {
        let quoted: Vec<String> = values
            .iter()
            .map(|v| format!("'{}'", v.replace('\'', "''")))
            .collect();
        text = text.replace(&format!("${{{name}}}"), &quoted.join(","));
        text = text.replace(&format!("${name}"), &quoted.join(","));
    }
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("$__") {
        out.push_str(&rest[..at]);
        let call = &rest[at + 3..];
        let name_len = call
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(call.len());
        let name = &call[..name_len];
        let (args, after) = arguments(&call[name_len..]);
        let group = |args: &[String]| {
            assert_eq!(args.len(), 2, "{name}({args:?})");
            let n = interval_seconds(&args[1]);
            format!("floor(extract(epoch from {})/{n})*{n}", args[0])
        };
        let expanded = match name {
            "timeFilter" => format!("{} BETWEEN '{}' AND '{}'", args[0], query.from, query.to),
            "timeFrom" => format!("'{}'", query.from),
            "timeTo" => format!("'{}'", query.to),
            "timeGroup" => group(&args),
            "timeGroupAlias" => format!("{} AS \"time\"", group(&args)),
            other => panic!("a macro this test does not expand: $__{other}"),
        };
        out.push_str(&expanded);
        rest = after;
    }
    out.push_str(rest);
    assert!(!out.contains('$'), "left unexpanded: {out}");
    out
}

#[test]
fn macros_expand_as_grafana_writes_them() {
    let query = Query {
        from: "2026-12-02T10:00:00Z".into(),
        to: "2026-12-02T11:00:00Z".into(),
        interval: "5s",
        variables: &[("device", &["pi-a", "o'neil"]), ("series", &["x.y"])],
    };
    assert_eq!(
        expand(
            "SELECT $__timeGroupAlias(window_start, $__interval), count(*) FROM t \
             WHERE $__timeFilter(window_start) AND device IN ($device) AND series IN ($series) \
             AND window_start > $__timeFrom() AND $__timeGroup(window_start, '1h') > 0",
            &query
        ),
        "SELECT floor(extract(epoch from window_start)/5)*5 AS \"time\", count(*) FROM t \
         WHERE window_start BETWEEN '2026-12-02T10:00:00Z' AND '2026-12-02T11:00:00Z' \
         AND device IN ('pi-a','o''neil') AND series IN ('x.y') \
         AND window_start > '2026-12-02T10:00:00Z' AND floor(extract(epoch from window_start)/3600)*3600 > 0"
    );
}

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/edgespool.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard is there");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// (panel title, its query's SQL) for every panel.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().expect("a title").to_owned();
            panel["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(move |t| {
                    (
                        title.clone(),
                        t["rawSql"].as_str().expect("raw SQL").to_owned(),
                    )
                })
        })
        .collect()
}

fn variable_query(dashboard: &Value, name: &str) -> String {
    dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .find(|v| v["name"] == name)
        .and_then(|v| v["query"].as_str())
        .unwrap_or_else(|| panic!("no variable {name}"))
        .to_owned()
}

/// The SQL block of docs/postgres.md that makes the wide view.
fn wide_view_sql() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/postgres.md");
    let text = std::fs::read_to_string(path).expect("docs/postgres.md");
    text.split("```sql")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("CREATE VIEW"))
        .expect("docs/postgres.md shows CREATE VIEW")
        .to_owned()
}

/// Writes `value` to `path` whole (a rename), as a sensor driver updates its file.
fn put(path: &Path, value: &str) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, value).expect("write");
    std::fs::rename(&staging, path).expect("rename");
}

/// A pulse oximeter as sysfs files: SpO2 and pulse change every 200 ms (for five
/// minutes at most) until it is dropped.
struct Oximeter {
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Oximeter {
    fn start(root: PathBuf) -> Oximeter {
        std::fs::create_dir_all(&root).expect("device folder");
        put(&root.join("spo2"), "97\n");
        put(&root.join("bpm"), "72\n");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let writer = std::thread::spawn(move || {
            for i in 0..1500u32 {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                put(&root.join("spo2"), &format!("{}\n", 94 + i % 6));
                put(&root.join("bpm"), &format!("{}\n", 60 + (i * 7) % 31));
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Oximeter {
            stop,
            writer: Some(writer),
        }
    }
}

impl Drop for Oximeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The agent: device `pi-a`, 5 s windows, hourly partitions, the oximeter's two files
/// sampled every second, into `pg` (`extra` keys on the sink).
fn write_config(dir: &Path, pg: &PgServer, extra: &str) -> PathBuf {
    let password = write_file(dir, "credentials/pg", &format!("{PG_PASSWORD}\n"));
    let sink = pg_sink(pg, "db", extra).replace("{password_file}", &password.display().to_string());
    let text = format!(
        r#"[agent]
device_id = "pi-a"
spool = "{spool}"
window = "5s"
partition = "1h"

[[sources]]
kind = "sysfs"
name = "oximeter"
root = "{root}"
interval = "1s"
[[sources.files]]
field = "spo2"
path = "/spo2"
unit = "%"
[[sources.files]]
field = "bpm"
path = "/bpm"
unit = "1/min"
{sink}
"#,
        spool = dir.join("spool.db").display(),
        root = dir.join("device").display(),
    );
    let path = dir.join("edgespool.toml");
    std::fs::write(&path, text).expect("config");
    path
}

fn now_range() -> (String, String) {
    let now = chrono::Utc::now();
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    (
        fmt(now - chrono::Duration::minutes(30)),
        fmt(now + chrono::Duration::seconds(1)),
    )
}

#[test]
fn every_panel_of_the_dashboard_shows_the_current_minute_from_a_live_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    let oximeter = Oximeter::start(dir.path().join("device"));
    let config = write_config(dir.path(), &pg, "");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let board = dashboard();
    let panels = panel_queries(&board);
    let titles: Vec<&str> = panels.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        titles,
        [
            "Mean, with min and max",
            "Newest value",
            "Windows per hour",
            "Lag"
        ]
    );
    let sql_of = |title: &str| -> String {
        panels
            .iter()
            .find(|(t, _)| t == title)
            .map(|(_, sql)| sql.clone())
            .expect("the panel")
    };
    let devices: &[&str] = &["pi-a"];
    let series: &[&str] = &["oximeter.spo2", "oximeter.bpm"];
    let variables = [("device", devices), ("series", series)];
    let run = |title: &str, check: &str| -> Option<String> {
        let (from, to) = now_range();
        let query = Query {
            from,
            to,
            interval: "5s",
            variables: &variables,
        };
        let panel = expand(&sql_of(title), &query);
        pg.try_psql("postgres", &format!("WITH panel AS ({panel}) {check}"))
    };

    // The time series: both series have a point in the current minute.
    let current = wait_for(
        "the current minute's windows in the mean panel",
        Duration::from_secs(90),
        || {
            let n = run(
                "Mean, with min and max",
                "SELECT count(DISTINCT metric) FROM panel
                 WHERE \"time\" >= extract(epoch FROM date_trunc('minute', now()))
                   AND min <= mean AND mean <= max",
            )?;
            (n == "2").then_some(n)
        },
    );
    assert_eq!(current, "2");
    // Another device's row in the current minute: listed by the variable, left out of
    // the panels that do not select it.
    pg.psql(
        "postgres",
        "INSERT INTO edgespool_windows (device, series, window_start, window_seconds, count,
             min, max, mean) VALUES ('pi-b', 'oximeter.spo2', date_trunc('second', now()), 5, 1, 42, 42, 42)",
    );
    let (from, to) = now_range();
    let all = Query {
        from,
        to,
        interval: "5s",
        variables: &[("device", &["pi-a", "pi-b"])],
    };
    assert_eq!(
        pg.psql("postgres", &expand(&variable_query(&board, "device"), &all)),
        "pi-a\npi-b"
    );
    let one = Query {
        variables: &[("device", devices)],
        ..all
    };
    assert_eq!(
        pg.psql("postgres", &expand(&variable_query(&board, "series"), &one)),
        "oximeter.bpm\noximeter.spo2"
    );

    // The lag: under two windows, as only a live delivery makes it.
    let lag = wait_for("a lag under two windows", Duration::from_secs(60), || {
        let lag = run("Lag", "SELECT metric || '|' || (lag < 10)::text FROM panel")?;
        (lag == "pi-a|true").then_some(lag)
    });
    assert_eq!(lag, "pi-a|true");

    // The newest value: each series' latest window's mean, of the current minute.
    let newest = wait_for(
        "the newest values of the current minute",
        Duration::from_secs(60),
        || {
            let n = run(
                "Newest value",
                "SELECT count(*) FROM panel p
                 WHERE p.\"time\" >= date_trunc('minute', now())
                   AND p.value = (SELECT w.mean FROM edgespool_windows w
                                  WHERE w.device || ' ' || w.series = p.metric
                                  ORDER BY w.window_start DESC LIMIT 1)",
            )?;
            (n == "2").then_some(n)
        },
    );
    assert_eq!(newest, "2");
    assert_eq!(
        run(
            "Newest value",
            "SELECT string_agg(metric, ',' ORDER BY metric) FROM panel"
        )
        .as_deref(),
        Some("pi-a oximeter.bpm,pi-a oximeter.spo2"),
        "pi-b is not selected"
    );

    // Windows per hour: this hour's windows of each series, as the table counts them.
    let per_hour = wait_for(
        "this hour's windows counted",
        Duration::from_secs(30),
        || {
            let n = run(
                "Windows per hour",
                "SELECT count(*) FROM panel p
                 WHERE p.\"time\" = extract(epoch FROM date_trunc('hour', now()))
                   AND p.windows > 0
                   AND p.windows = (SELECT count(*) FROM edgespool_windows w
                                    WHERE w.device || ' ' || w.series = p.metric
                                      AND w.window_start >= date_trunc('hour', now()))",
            )?;
            (n == "2").then_some(n)
        },
    );
    assert_eq!(per_hour, "2");

    // The wide view of docs/postgres.md: one row per device and window, SpO2 and pulse
    // side by side, each the mean of its series' window.
    pg.psql("postgres", &wide_view_sql());
    let wide = pg.psql(
        "postgres",
        "SELECT count(*), count(*) FILTER (WHERE v.spo2 = s.mean AND v.bpm = b.mean)
         FROM oximeter v
         JOIN edgespool_windows s ON s.device = v.device AND s.window_start = v.time
                                 AND s.series = 'oximeter.spo2'
         JOIN edgespool_windows b ON b.device = v.device AND b.window_start = v.time
                                 AND b.series = 'oximeter.bpm'
         WHERE v.device = 'pi-a'",
    );
    let (rows, right) = wide.split_once('|').expect("two counts");
    assert!(rows.parse::<u32>().expect("a count") > 0, "{wide}");
    assert_eq!(rows, right, "every row holds its windows' means");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) - count(DISTINCT (device, time)) FROM oximeter"
        ),
        "0",
        "one row per device and time"
    );

    // Several flushes, several parts of the hour.
    wait_for("three parts delivered", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        let db = edgespool_tests::find_sink(&status, "db")?;
        (db["delivered_parts"].as_u64()? >= 3).then_some(())
    });
    drop(oximeter);
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) - count(DISTINCT partition_start) FROM edgespool_loads"
        ),
        "0",
        "one loads record per hour, however many flushes it took"
    );
}

#[test]
fn one_series_over_all_devices_is_read_through_its_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    let oximeter = Oximeter::start(dir.path().join("device"));
    let config = write_config(dir.path(), &pg, "");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    wait_for("the table", Duration::from_secs(60), || {
        let n = pg.try_psql("postgres", "SELECT count(*) FROM edgespool_windows")?;
        (n != "0").then_some(())
    });
    drop(oximeter);
    agent.terminate();
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT indexdef FROM pg_indexes
             WHERE tablename = 'edgespool_windows' AND indexname = 'edgespool_windows_series_window_start'"
        ),
        "CREATE INDEX edgespool_windows_series_window_start ON public.edgespool_windows USING btree (series, window_start)"
    );
    // A fleet's table, loaded in time order: 40 devices, 25 series, 300 windows each.
    pg.psql(
        "postgres",
        "INSERT INTO edgespool_windows (device, series, window_start, window_seconds, count, mean)
         SELECT 'pi-' || d, 's.' || s, timestamptz '2026-01-01' + w * interval '1 minute', 60, 1, w
         FROM generate_series(1, 300) w, generate_series(1, 40) d, generate_series(1, 25) s;
         ANALYZE edgespool_windows",
    );
    // One series of every device over the day: without the index, a scan of the table.
    let plan = pg.psql(
        "postgres",
        "EXPLAIN SELECT device, window_start, mean FROM edgespool_windows
         WHERE series = 's.7'
           AND window_start BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-02T00:00:00Z'",
    );
    assert!(
        plan.contains("Index Scan on edgespool_windows_series_window_start")
            && plan.contains("Index Cond: ((series = 's.7'::text) AND (window_start >=")
            && !plan.contains("Seq Scan"),
        "{plan}"
    );
}
