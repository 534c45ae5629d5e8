//! The spool's syncs from outside: a running agent with 100 series calls fsync once per
//! flush (the WAL's, at the commit), counted with strace attached to it for ten flushes.
//! Without strace (or where it may not attach) the test says `SKIPPED: …` and passes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgespool_tests::{Agent, try_status_json, wait_for, write_file};

const SERIES: usize = 100;

/// strace attached to a process, detached (SIGTERM) and waited for on drop.
struct Strace(Option<Child>);

impl Strace {
    fn stop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why strace cannot count here, if it cannot.
fn strace_missing() -> Option<String> {
    match Command::new("strace")
        .args(["-qq", "-f", "-e", "trace=none", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!("strace cannot trace here ({status})")),
        Err(e) => Some(format!("strace is not installed ({e})")),
    }
}

fn sysfs_source(dir: &Path) -> String {
    let root = dir.join("device");
    let mut text = format!(
        "[[sources]]\nkind = \"sysfs\"\nname = \"hw\"\nroot = \"{}\"\ninterval = \"500ms\"\n",
        root.display()
    );
    for i in 0..SERIES {
        write_file(&root, &format!("sys/hw/t{i}"), &format!("{}\n", 40_000 + i));
        text.push_str(&format!(
            "[[sources.files]]\nfield = \"t{i}\"\npath = \"/sys/hw/t{i}\"\nscale = 0.001\n"
        ));
    }
    text
}

fn rows(config: &Path) -> Option<i64> {
    try_status_json(config)?["spool"]["rows"].as_i64()
}

#[test]
fn a_flush_of_100_windows_costs_one_fsync() {
    if let Some(reason) = strace_missing() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // Hourly partitions: nothing is planned or delivered in the few seconds traced, but
    // for an hour's end falling in them (one plan, allowed for below).
    let config = dir.path().join("edgespool.toml");
    let text = format!(
        "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"1s\"\npartition = \"1h\"\ngrace = \"0s\"\n\n{}\n[[sinks]]\nkind = \"local\"\nname = \"out\"\npath = \"{}\"\n",
        dir.path().join("spool.db").display(),
        sysfs_source(dir.path()),
        dir.path().join("out").display()
    );
    std::fs::write(&config, text).expect("write config");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));
    let before = wait_for("the first windows", Duration::from_secs(60), || {
        rows(&config).filter(|r| *r >= SERIES as i64)
    });
    let pid = std::fs::read_to_string(dir.path().join("spool.db.lock")).expect("the lock file");
    let log = dir.path().join("strace.log");
    let mut strace = Strace(Some(
        Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-ttt",
                "-y",
                "-e",
                "trace=fsync,fdatasync",
                "-o",
            ])
            .arg(&log)
            .args(["-p", pid.trim()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace starts"),
    ));
    // Attached once it has written its first line or the agent's next flushes went by.
    let attached = Instant::now();
    wait_for("ten flushes", Duration::from_secs(120), || {
        let now = rows(&config)?;
        (now >= before + 11 * SERIES as i64 && attached.elapsed() > Duration::from_secs(2))
            .then_some(())
    });
    strace.stop();
    let after = wait_for("the status after", Duration::from_secs(30), || {
        rows(&config)
    });
    // Flushes between the two looks at the status: the traced ones are at most these.
    let flushes = (after - before) / SERIES as i64 + 1;
    let traced = std::fs::read_to_string(&log).expect("strace wrote its log");
    let spool = dir.path().join("spool.db").display().to_string();
    let syncs = |file: &str| -> Vec<&str> {
        traced
            .lines()
            .filter(|l| l.contains("sync(") && l.contains(&format!("<{file}>")))
            .collect()
    };
    // The WAL's syncs by flush: those less than 300 ms apart belong to one.
    let mut times: Vec<f64> = syncs(&format!("{spool}-wal"))
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    times.sort_by(f64::total_cmp);
    let mut per_flush = vec![1];
    for pair in times.windows(2) {
        match per_flush.last_mut() {
            Some(n) if pair[1] - pair[0] < 0.3 => *n += 1,
            _ => per_flush.push(1),
        }
    }
    let wal = times.len() as i64;
    assert!(
        per_flush.len() >= 9 && wal <= flushes + 1,
        "{wal} fsyncs of the WAL in at most {flushes} flushes:\n{traced}"
    );
    // An hour's end may fall in the traced seconds: its plan is a commit of its own.
    assert!(
        per_flush.iter().filter(|n| **n > 1).count() <= 1,
        "fsyncs of the WAL per flush: {per_flush:?}"
    );
    let file = syncs(&spool);
    assert!(
        file.is_empty(),
        "the database file is not synced in steady state (no checkpoint): {file:?}"
    );
    assert!(agent.terminate().success());
}
