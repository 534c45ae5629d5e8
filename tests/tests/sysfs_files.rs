//! The sysfs source keeps its files open and reads them again from offset 0: one open
//! descriptor per file in /proc/PID/fd, the soft open-file limit raised to the hard one,
//! and a file renamed over or removed and made again read with its new value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespool_tests::{Agent, find_source, out_sink, read_tree, wait_for, write_file};

/// What the agent's descriptors point to, counted by target (`… (deleted)` for a file
/// no longer linked).
fn open_files(agent: &Agent) -> BTreeMap<String, usize> {
    let fds = PathBuf::from(format!("/proc/{}/fd", agent.pid().as_raw_nonzero()));
    let mut targets = BTreeMap::new();
    for entry in std::fs::read_dir(&fds).expect("the agent's fd folder reads") {
        let Ok(entry) = entry else { continue };
        if let Ok(target) = std::fs::read_link(entry.path()) {
            *targets
                .entry(target.to_string_lossy().into_owned())
                .or_insert(0) += 1;
        }
    }
    targets
}

/// The soft and hard "Max open files" of /proc/PID/limits.
fn open_file_limits(agent: &Agent) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid().as_raw_nonzero()))
        .expect("the agent's limits read");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[3].to_owned(), words[4].to_owned())
}

/// The last values the output folder holds for `series` (window by window, sorted).
fn last_values(dir: &Path, series: &str) -> Vec<f64> {
    let mut rows: Vec<(String, f64)> = read_tree(&dir.join("out"))
        .iter()
        .flat_map(|f| &f.rows)
        .filter(|r| r["series"] == series)
        .filter_map(|r| Some((r["window_start"].as_str()?.to_owned(), r["last"].as_f64()?)))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.into_iter().map(|(_, v)| v).collect()
}

#[test]
fn sysfs_files_stay_open_and_are_read_anew_when_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("device");
    let t1 = write_file(&root, "sys/class/hwmon/hwmon0/temp1_input", "1000\n");
    let t2 = write_file(&root, "sys/class/hwmon/hwmon0/temp2_input", "2000\n");
    let config = dir.path().join("edgespool.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"1s\"\npartition = \"1m\"\ngrace = \"0s\"\n\n\
             [[sources]]\nkind = \"sysfs\"\nname = \"hw\"\nroot = \"{}\"\ninterval = \"200ms\"\n\
             [[sources.files]]\nfield = \"t1\"\npath = \"/sys/class/hwmon/hwmon0/temp1_input\"\nscale = 0.001\n\
             [[sources.files]]\nfield = \"t2\"\npath = \"/sys/class/hwmon/hwmon0/temp2_input\"\nscale = 0.001\n\n{}",
            dir.path().join("spool.db").display(),
            root.display(),
            out_sink(dir.path())
        ),
    )
    .expect("write config");
    let agent = Agent::start(&config, &dir.path().join("agent.log"));

    wait_for("samples of both files", Duration::from_secs(60), || {
        let status = agent.try_status()?;
        let samples = find_source(&status, "hw")?["samples"].as_u64()?;
        (samples >= 10).then_some(())
    });
    let (t1_name, t2_name) = (t1.display().to_string(), t2.display().to_string());
    let open = open_files(&agent);
    assert_eq!(
        (open.get(&t1_name), open.get(&t2_name)),
        (Some(&1), Some(&1)),
        "one kept descriptor per file after many reads: {open:?}"
    );
    let (soft, hard) = open_file_limits(&agent);
    assert_eq!(
        soft, hard,
        "the soft open-file limit is raised to the hard one"
    );

    // temp1: a new file renamed over it; temp2: removed, then made again.
    let staged = write_file(&root, "sys/class/hwmon/hwmon0/temp1_input.new", "5000\n");
    std::fs::rename(&staged, &t1).expect("rename over");
    std::fs::remove_file(&t2).expect("unplugged");
    wait_for(
        "the removed file counted as an error",
        Duration::from_secs(30),
        || {
            let status = agent.try_status()?;
            let errors = find_source(&status, "hw")?["errors"].as_u64()?;
            (errors > 0).then_some(())
        },
    );
    write_file(&root, "sys/class/hwmon/hwmon0/temp2_input", "6000\n");

    // The old descriptors are closed, the new files kept open in their place.
    wait_for("the new files kept open", Duration::from_secs(30), || {
        let open = open_files(&agent);
        let deleted = open
            .keys()
            .any(|k| k.ends_with("(deleted)") && k.contains("hwmon0"));
        (!deleted && open.get(&t1_name) == Some(&1) && open.get(&t2_name) == Some(&1)).then_some(())
    });
    // And their values land.
    wait_for("the new values delivered", Duration::from_secs(150), || {
        let (a, b) = (
            last_values(dir.path(), "hw.t1"),
            last_values(dir.path(), "hw.t2"),
        );
        (a.last() == Some(&5.0) && b.last() == Some(&6.0)).then_some(())
    });
    let (a, b) = (
        last_values(dir.path(), "hw.t1"),
        last_values(dir.path(), "hw.t2"),
    );
    assert_eq!(a.first(), Some(&1.0), "{a:?}");
    assert_eq!(b.first(), Some(&2.0), "{b:?}");
    agent.terminate();
}
