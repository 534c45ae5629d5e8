//! A real power cut: the spool and the local folder on a file system that forgets every
//! write not fsynced ([`PowerCutFs`]). kill -9 keeps the page cache and proves nothing of
//! this; here the agent is killed and what was not synced is thrown away in the same
//! instant, at random instants while it samples, commits and delivers.
//!
//! The loop runs 10 cuts by default (CI), 50 with `EDGESPOOL_FAULT_ROUNDS=full`
//! (`scripts/test.sh --long`). It prints its `EDGESPOOL_SEED`, which replays its choices.
//! Without FUSE (no `/dev/fuse`, not root, no `fusermount3`) it says `SKIPPED` and why.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use edgespool_tests::powercut::{Luck, PowerCutFs};
use edgespool_tests::two_sensors::two_sensors;
use edgespool_tests::{
    Agent, Chaos, JsonServer, edgespool, fault_rounds, purpleair_body, settle, table_source,
    wait_for,
};
use serde_json::Value;

/// The samples the spool says it committed (`status --json`), if it can be read.
fn committed_samples(config: &Path) -> Result<u64, String> {
    let config = config.to_str().expect("utf-8 path");
    let out = edgespool(&["status", "--config", config, "--json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let status: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    status["counters"]["samples"]
        .as_u64()
        .ok_or_else(|| format!("no samples counter in {status}"))
}

/// Every file below `root`: (relative path, bytes).
fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let key = path
                    .strip_prefix(root)
                    .expect("below root")
                    .display()
                    .to_string();
                found.push((key, std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    found.sort();
    found
}

fn is_staging(key: &str) -> bool {
    key.rsplit_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The output's rows, and what is wrong with any file under its final name (empty,
/// cut short, not NDJSON windows); staging files (`…#N`) are listed apart.
struct Output {
    rows: Vec<Value>,
    files: usize,
    broken: Vec<String>,
    staging: Vec<String>,
}

fn read_output(root: &Path) -> Output {
    let mut output = Output {
        rows: Vec::new(),
        files: 0,
        broken: Vec::new(),
        staging: Vec::new(),
    };
    for (key, bytes) in files(root) {
        if is_staging(&key) {
            output.staging.push(key);
            continue;
        }
        output.files += 1;
        if bytes.is_empty() {
            output.broken.push(format!("{key}: empty"));
            continue;
        }
        if !bytes.ends_with(b"\n") {
            output
                .broken
                .push(format!("{key}: cut short at {} bytes", bytes.len()));
            continue;
        }
        for line in String::from_utf8_lossy(&bytes).lines() {
            match serde_json::from_str::<Value>(line) {
                Ok(row) if row["series"].is_string() && row["count"].is_u64() => {
                    output.rows.push(row);
                }
                _ => output
                    .broken
                    .push(format!("{key}: not a window row: {line:?}")),
            }
        }
    }
    output
}

/// Cuts the power at random instants while the agent samples, commits and delivers to a
/// local folder; both the spool and the folder are on the forgetting file system. After
/// every cut no file under its final name is empty or short, and the spool still holds
/// every sample it said it had committed; at the end every committed window is in the
/// folder exactly once.
#[test]
fn a_power_cut_at_random_instants_loses_no_committed_window_and_leaves_no_short_file() {
    if let Some(reason) = PowerCutFs::unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let cuts = fault_rounds(10, 50);
    let mut chaos = Chaos::new("power_cut");
    let dir = tempfile::tempdir().expect("tempdir");
    let (disk, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
    std::fs::create_dir_all(&disk).expect("mkdir disk");
    std::fs::create_dir_all(&mnt).expect("mkdir mnt");
    let mut fs = match PowerCutFs::mount(&disk, &mnt) {
        Ok(fs) => fs,
        Err(err) => {
            eprintln!("SKIPPED: cannot mount the power-cut file system: {err}");
            return;
        }
    };
    let archive = fs.path().join("archive");
    let server = JsonServer::start(Vec::new(), purpleair_body(&[]));
    let config = dir.path().join("edgespool.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice_id = \"e2e\"\nspool = \"{spool}\"\nwindow = \"1s\"\npartition = \"1m\"\ngrace = \"0s\"\n{source}\n[[sinks]]\nkind = \"local\"\nname = \"archive\"\npath = \"{archive}\"\nretry_max = \"1s\"\nlate_grace = \"0s\"\n",
            spool = fs.path().join("spool/spool.db").display(),
            source = table_source(&server.url, &["pm", "Temperature"]),
            archive = archive.display(),
        ),
    )
    .expect("write config");
    let log = dir.path().join("agent.log");

    let mut fed: i64 = 0;
    let mut committed = 0u64;
    let (mut dirty_files, mut dirty_folders, mut written_back) = (0, 0, 0);
    for round in 1..=cuts {
        for _ in 0..chaos.between(2, 12) {
            server.push(two_sensors(fed));
            fed += 1;
        }
        let agent = Agent::start(&config, &log);
        // The random instant: half the time a moment from start-up to well into sampling,
        // committing and delivering; half the time a change that matters to the medium
        // (a name made, moved or removed, an fsync), which lands inside deliveries and
        // commits far more often.
        // `before`: what the spool said it had committed, read wholly before the cut.
        // Never after: a commit whose fsync the cut refused has its frames in the WAL
        // all the same, and a reader recovering the WAL would count it.
        let (instant, before) = if chaos.between(0, 2) == 0 {
            let ms = chaos.between(50, 2_500);
            std::thread::sleep(Duration::from_millis(ms));
            let before = committed_samples(&config).ok();
            (format!("{ms} ms in, at change {}", fs.changes()), before)
        } else {
            let change = chaos.between(1, 80);
            let mut before = None;
            fs.freeze_after(change);
            wait_for("the armed change", Duration::from_secs(60), || {
                if fs.frozen() {
                    return Some(());
                }
                let seen = committed_samples(&config).ok();
                if !fs.frozen() {
                    before = seen.or(before);
                }
                None
            });
            (format!("at change {change}"), before)
        };
        // What the kernel wrote back on its own before the cut: in a third of the cuts a
        // journal commit took every folder's names, and each file's bytes one time in four.
        let folders = chaos.between(0, 3) == 0;
        let mut file = || chaos.between(0, 4) == 0;
        let luck = Luck {
            folders,
            file: &mut file,
        };
        let cut = fs
            .cut(|| agent.kill9(), luck)
            .expect("the power cut: unmount, write the medium, mount again");
        dirty_files += cut.dirty_files;
        dirty_folders += cut.dirty_folders;
        written_back += cut.written_back;

        let output = read_output(&archive);
        assert!(
            output.broken.is_empty(),
            "after cut {round}, files under their final name are broken: {:#?}",
            output.broken
        );
        let after = committed_samples(&config);
        if let Some(before) = before.filter(|&n| n > 0) {
            let spool: Vec<(String, usize)> = files(&fs.path().join("spool"))
                .into_iter()
                .map(|(name, bytes)| (name, bytes.len()))
                .collect();
            match &after {
                Ok(after) => assert!(
                    *after >= before,
                    "after cut {round} ({instant}) the spool holds {after} samples, it said {before} before; spool files {spool:?}"
                ),
                Err(err) => panic!(
                    "after cut {round} ({instant}) the spool (which said {before} samples) does not open: {err}; spool files {spool:?}"
                ),
            }
        }
        committed = committed.max(before.unwrap_or(0));
        eprintln!(
            "cut {round} ({instant}): {before:?} samples committed before, {after:?} after; unsynced {} files and {} folders ({} written back{}); {} files, {} rows, {} staging files in the folder",
            cut.dirty_files,
            cut.dirty_folders,
            cut.written_back,
            if folders {
                ", the folders among them"
            } else {
                ""
            },
            output.files,
            output.rows.len(),
            output.staging.len(),
        );
    }

    // Power back for good: everything committed must reach the folder, once.
    let agent = Agent::start(&config, &log);
    settle(agent, Duration::from_secs(180), || server.exhausted());

    let output = read_output(&archive);
    assert!(
        output.broken.is_empty(),
        "broken files: {:#?}",
        output.broken
    );
    assert!(
        output.staging.is_empty(),
        "staging files left: {:?}",
        output.staging
    );
    let mut seen = BTreeSet::new();
    let twice: Vec<String> = output
        .rows
        .iter()
        .map(|r| format!("{} {}", r["series"], r["window_start"]))
        .filter(|key| !seen.insert(key.clone()))
        .collect();
    assert_eq!(twice, Vec::<String>::new(), "windows delivered twice");
    let series: BTreeSet<&str> = output
        .rows
        .iter()
        .filter_map(|r| r["series"].as_str())
        .collect();
    assert!(
        series.iter().all(|s| s.starts_with("pa.")),
        "unexpected series: {series:?}"
    );
    let samples: u64 = output
        .rows
        .iter()
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    let final_committed = committed_samples(&config).expect("the spool opens");
    assert!(
        final_committed >= committed,
        "the spool lost samples: {final_committed} < {committed}"
    );
    assert_eq!(
        samples, final_committed,
        "every committed sample is in the folder, once"
    );
    assert!(samples <= fed as u64 * 4, "no more than was fed");
    let (file_syncs, folder_syncs) = fs.syncs();
    eprintln!(
        "power_cut: {cuts} cuts; {fed} readings fed, {final_committed} samples committed (at least {committed} before the cuts), {} windows in {} files checked once each; unsynced {dirty_files} files and {dirty_folders} folders at the cuts ({written_back} written back); {file_syncs} file and {folder_syncs} folder fsyncs",
        output.rows.len(),
        output.files,
    );
}
