//! The job several spool tests share: two sensors served as a table over HTTP, a minute
//! each body, into a `local` sink; and the checks that every window landed once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{
    JsonServer, T0, binary, purpleair_body, read_tree, status_json, table_source, try_status_json,
    wait_for, write_agent_config,
};

/// Minute `i` after [`T0`]: sensor 1 reads `i`, sensor 2 reads `i + 0.25` (sums stay
/// exact in every reader's floating point); four series, one window each, in
/// partition `i`.
pub fn two_sensors(i: i64) -> String {
    let at = T0 + i * 60 + 10;
    purpleair_body(&[(1, at, i as f64, 0.5), (2, at, i as f64 + 0.25, 1.5)])
}

/// The HTTP table source on `url` (columns `pm` and `Temperature`) and a `local` sink at
/// `dir/out`.
pub fn two_sensors_config(dir: &Path, url: &str) -> PathBuf {
    let body = format!(
        "{}\n[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{}\"\nretry_max = \"2s\"\nlate_grace = \"0s\"\n",
        table_source(url, &["pm", "Temperature"]),
        dir.join("out").display()
    );
    write_agent_config(dir, &body)
}

/// `edgespool run` whose exit status a test reads (an agent expected to refuse to
/// start); killed on drop if still alive. For an agent that runs: [`crate::Agent`].
pub struct Refused(Child);

impl Refused {
    /// Starts the agent on `config`, its standard error into the file `stderr`.
    pub fn start(config: &Path, stderr: &Path) -> Refused {
        let err = std::fs::File::create(stderr).expect("stderr file");
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("the agent starts");
        Refused(child)
    }

    /// Its exit status, once it exits (at most `timeout`).
    pub fn exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for("the agent to exit", timeout, || {
            self.0.try_wait().ok().flatten()
        })
    }
}

impl Drop for Refused {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until every queued body was served, two more flushes committed it, and every
/// partition was delivered.
pub fn wait_until_all_delivered(server: &JsonServer, config: &Path) {
    wait_for("every body served", Duration::from_secs(60), || {
        server.exhausted().then_some(())
    });
    let mut heartbeats: Vec<Value> = Vec::new();
    wait_for(
        "two more flushes and every partition delivered",
        Duration::from_secs(60),
        || {
            let status = try_status_json(config)?;
            let heartbeat = status["daemon"]["heartbeat"].clone();
            if heartbeats.last() != Some(&heartbeat) {
                heartbeats.push(heartbeat);
            }
            let idle = status["sinks"][0]["pending_rows"] == 0 && status["spool"]["rows"] == 0;
            (heartbeats.len() >= 3 && idle).then_some(())
        },
    );
}

/// The windows delivered to `out` so far, each checked to be there once: the minutes
/// after [`T0`] they are of, how many windows, and the samples they count.
pub struct Delivered {
    pub minutes: BTreeSet<i64>,
    pub windows: usize,
    pub samples: u64,
}

/// Reads `out` and fails the test on a window delivered twice.
pub fn each_window_once_so_far(out: &Path) -> Delivered {
    let mut seen = BTreeSet::new();
    let mut delivered = Delivered {
        minutes: BTreeSet::new(),
        windows: 0,
        samples: 0,
    };
    for row in read_tree(out).iter().flat_map(|f| &f.rows) {
        let key = (row["series"].to_string(), row["window_start"].to_string());
        assert!(seen.insert(key.clone()), "window delivered twice: {key:?}");
        let start =
            chrono::DateTime::parse_from_rfc3339(row["window_start"].as_str().expect("start"))
                .expect("RFC 3339");
        delivered
            .minutes
            .insert((start.timestamp() - T0).div_euclid(60));
        delivered.windows += 1;
        delivered.samples += row["count"].as_u64().expect("count");
    }
    delivered
}

/// Checks that `out` holds each window once, four series a minute, and every sample the
/// spool of `config` counted; returns the minutes delivered.
pub fn assert_each_window_once(out: &Path, config: &Path) -> BTreeSet<i64> {
    let delivered = each_window_once_so_far(out);
    assert_eq!(
        Some(delivered.samples),
        status_json(config)["counters"]["samples"].as_u64(),
        "every sample the spool counted is in the output exactly once"
    );
    // Two sensors, two columns: four series a minute.
    assert_eq!(
        delivered.windows,
        4 * delivered.minutes.len(),
        "{:?}",
        delivered.minutes
    );
    delivered.minutes
}
