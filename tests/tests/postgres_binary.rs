//! PostgreSQL end to end: every column of the rows the agent loads with `COPY … (FORMAT
//! binary)` reads back with psql as it was measured: extreme and subnormal floats, NULLs
//! (no unit, no standard deviation of a single sample), tags as jsonb, the windows' and
//! the samples' times to the millisecond; and the same rows in the local sink's NDJSON
//! (the text path, from the same spool).
//!
//! The samples are pushed to a listen source in line protocol with their own times in
//! January 2026, so their partition closes as soon as it is committed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edgespool_tests::{
    Agent, PgServer, T0, archive_sink, free_port, pg_sink, read_tree, wait_for, write_agent_config,
    write_pg_password,
};
use serde_json::Value;

/// The rows as psql prints them, a line each: the columns joined by `|`.
const SELECT_ROWS: &str = "SELECT series, coalesce(unit, 'NULL'),
       tags = '{\"floor\": \"2\", \"room\": \"kitchen\"}'::jsonb OR tags = '{}'::jsonb, tags::text,
       extract(epoch FROM window_start)::bigint, window_seconds, count, min, max, mean,
       coalesce(stdev::text, 'NULL'), median, first, last,
       (extract(epoch FROM first_time) * 1000)::bigint,
       (extract(epoch FROM last_time) * 1000)::bigint
     FROM edgespool_windows ORDER BY series, window_start";

/// POSTs line protocol to the listen source; the HTTP status, `None` before the source
/// serves (the connection refused).
fn try_write_lines(port: u16, dir: &Path, lines: &str) -> Option<u16> {
    let body = dir.join("lines.txt");
    std::fs::write(&body, lines).expect("write the body");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("http://127.0.0.1:{port}/api/v2/write?precision=ms"))
        .output()
        .expect("curl runs");
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("an HTTP status"),
    )
}

fn float(text: &str) -> f64 {
    text.parse()
        .unwrap_or_else(|_| panic!("{text:?} is a float"))
}

#[test]
fn every_column_loaded_in_the_binary_format_reads_back_as_measured_and_as_the_text_path_has_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = PgServer::start();
    let port = free_port();
    let password = write_pg_password(dir.path());
    let sinks = format!("{}{}", pg_sink(&pg, "db", ""), archive_sink(dir.path()))
        .replace("{password_file}", &password.display().to_string());
    let config = write_agent_config(
        dir.path(),
        &format!(
            "[[sources]]\nkind = \"listen\"\nname = \"push\"\naddress = \"127.0.0.1:{port}\"\n\n{sinks}"
        ),
    );
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let ms = T0 * 1000;
    // Second 0: a subnormal and 2.5 (tagged); second 1: the most negative double, alone;
    // an untagged series: 0.1, 0.2 and 0.3 in second 0.
    let lines = format!(
        "env,room=kitchen,floor=2 t=5e-324 {}\nenv,room=kitchen,floor=2 t=2.5 {}\n\
         env,room=kitchen,floor=2 t=-1.7976931348623157e308 {}\n\
         bare v=0.1 {}\nbare v=0.2 {}\nbare v=0.3 {}\n",
        ms + 100,
        ms + 900,
        ms + 1250,
        ms + 10,
        ms + 20,
        ms + 30
    );
    let status = wait_for("the listen source serving", Duration::from_secs(60), || {
        try_write_lines(port, dir.path(), &lines)
    });
    assert_eq!(status, 204, "the lines taken");
    let text = wait_for(
        "three windows in PostgreSQL",
        Duration::from_secs(60),
        || {
            let text = pg.try_psql("postgres", SELECT_ROWS)?;
            (text.lines().count() == 3).then_some(text)
        },
    );
    agent.terminate();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    let (bare, env0, env1) = (&rows[0], &rows[1], &rows[2]);

    assert_eq!(
        bare[..8],
        [
            "push.bare.v",
            "NULL",
            "t",
            "{}",
            &T0.to_string(),
            "1",
            "3",
            "0.1"
        ],
        "{text}"
    );
    assert_eq!(
        [
            float(bare[8]),
            float(bare[11]),
            float(bare[12]),
            float(bare[13])
        ],
        [0.3, 0.2, 0.1, 0.3],
        "max, median, first, last"
    );
    assert_eq!(
        bare[14..],
        [(ms + 10).to_string(), (ms + 30).to_string()],
        "first and last time, to the millisecond"
    );

    assert_eq!(
        env0[..7],
        [
            "push.env.t",
            "NULL",
            "t",
            "{\"room\": \"kitchen\", \"floor\": \"2\"}",
            &T0.to_string(),
            "1",
            "2"
        ],
        "{text}"
    );
    assert_eq!(float(env0[7]), 5e-324, "a subnormal, exactly");
    assert_eq!(float(env0[7]).to_bits(), 1);
    assert_eq!(
        [float(env0[8]), float(env0[12]), float(env0[13])],
        [2.5, 5e-324, 2.5]
    );
    assert_eq!(env0[14..], [(ms + 100).to_string(), (ms + 900).to_string()]);

    assert_eq!(env1[4], (T0 + 1).to_string());
    assert_eq!(env1[6], "1");
    assert_eq!(env1[10], "NULL", "no standard deviation of one sample");
    for i in [7, 8, 9, 11, 12, 13] {
        assert_eq!(
            float(env1[i]),
            -1.797_693_134_862_315_7e308,
            "column {i}: {text}"
        );
    }

    // The text path: the local sink's NDJSON rows of the same spool, row for row.
    let archive: Vec<Value> = read_tree(&dir.path().join("archive"))
        .into_iter()
        .flat_map(|f| f.rows)
        .collect();
    assert_eq!(archive.len(), 3, "{archive:?}");
    for row in &rows {
        let start = row[4].parse::<i64>().expect("seconds");
        let json = archive
            .iter()
            .find(|r| {
                r["series"] == row[0]
                    && r["window_start"]
                        .as_str()
                        .is_some_and(|s| s.ends_with(&format!(":0{}Z", start - T0)))
            })
            .unwrap_or_else(|| panic!("{row:?} in the archive: {archive:?}"));
        assert_eq!(json["count"].as_u64(), row[6].parse().ok(), "{row:?}");
        for (i, name) in [(7, "min"), (8, "max"), (9, "mean"), (11, "median")] {
            let (a, b) = (float(row[i]), json[name].as_f64().expect("a number"));
            assert!(
                a == b || (a - b).abs() <= 1e-15 * a.abs().max(b.abs()),
                "{name}: {a} in PostgreSQL, {b} in the NDJSON"
            );
        }
        match json["stdev"].as_f64() {
            None => assert_eq!(row[10], "NULL"),
            Some(b) => {
                let a = float(row[10]);
                assert!((a - b).abs() <= 1e-15 * b.abs(), "stdev {a} against {b}");
            }
        }
    }
}
