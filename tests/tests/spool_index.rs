//! The spool's WAL index lives in /dev/shm (edgespool's SQLite is built with
//! `SQLITE_SHM_DIRECTORY`), and programs that are not edgespool are kept out of a live
//! spool: Python's `sqlite3` (a reader we did not write) is refused while the agent runs
//! and reads the spool once it stopped; an agent does not start on a spool another
//! program has open; `NAME-shm` in the spool's folder stays empty while the agent
//! flushes; and with /dev/shm emptied (a reboot) the index is rebuilt from the WAL, so
//! every committed window still lands, once.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use edgespool_tests::two_sensors::{
    Refused, assert_each_window_once, each_window_once_so_far, two_sensors, two_sensors_config,
    wait_until_all_delivered,
};
use edgespool_tests::{
    Agent, JsonServer, purpleair_body, python, read_tree, status_json, wait_for,
};

/// Where edgespool's SQLite keeps the WAL index of `spool`: by its inode and device.
fn index_of(spool: &Path) -> PathBuf {
    let meta = std::fs::metadata(spool).expect("the spool exists");
    PathBuf::from(format!(
        "/dev/shm/sqlite-shm-{:x}-{:x}",
        meta.ino() as u32,
        meta.dev() as u32
    ))
}

/// The guard beside the spool: where another build of SQLite looks for the index.
fn guard_of(spool: &Path) -> PathBuf {
    PathBuf::from(format!("{}-shm", spool.display()))
}

/// Python's sqlite3 reading the spool: `read N` (delivered parts) or `refused: ERROR`.
const READ: &str = r#"
import sqlite3, sys
try:
    db = sqlite3.connect(sys.argv[1], timeout=1)
    print("read", db.execute("SELECT COUNT(*) FROM parts WHERE delivered_ms IS NOT NULL").fetchone()[0])
    db.close()
except sqlite3.Error as e:
    print("refused:", e)
"#;

fn python_reads(spool: &Path) -> String {
    let out = Command::new(python())
        .args(["-c", READ])
        .arg(spool)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Python's sqlite3 holding the spool open (after one read) until its stdin closes;
/// killed on drop.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Holder {
    fn start(spool: &Path) -> Holder {
        let script = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print("open", db.execute("SELECT COUNT(*) FROM parts").fetchone()[0], flush=True)
sys.stdin.read()
db.close()
"#;
        let mut child = Command::new(python())
            .args(["-c", script])
            .arg(spool)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python runs");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("python says it has the spool open");
        assert!(line.starts_with("open "), "{line:?}");
        Holder { child, stdin }
    }

    /// Closes its stdin: it closes the spool and exits.
    fn close(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("python exits");
        assert!(status.success(), "{status:?}");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn python_is_refused_while_the_agent_runs_and_reads_the_spool_once_it_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = JsonServer::start((0..10).map(two_sensors).collect(), purpleair_body(&[]));
    let config = two_sensors_config(dir.path(), &server.url);
    let out = dir.path().join("out");
    let spool = dir.path().join("spool.db");
    let mut agent = Agent::start(&config, &dir.path().join("agent.log"));
    wait_for("the first deliveries", Duration::from_secs(60), || {
        (read_tree(&out).len() >= 3).then_some(())
    });
    let index = index_of(&spool);
    assert!(
        std::fs::metadata(&index).is_ok_and(|m| m.len() >= 32 * 1024),
        "the WAL index is in /dev/shm: {}",
        index.display()
    );

    let answer = python_reads(&spool);
    assert_eq!(
        answer, "refused: locking protocol",
        "python's sqlite3 on a live spool"
    );
    assert!(agent.is_running(), "the agent goes on");
    assert_eq!(status_json(&config)["daemon"]["state"], "running");

    for i in 10..20 {
        server.push(two_sensors(i));
    }
    wait_until_all_delivered(&server, &config);
    assert_eq!(
        std::fs::metadata(guard_of(&spool)).map(|m| m.len()).ok(),
        Some(0),
        "no index was written beside the spool while it flushed"
    );
    let exit = agent.terminate();
    assert!(exit.success(), "{exit:?}");
    let minutes = assert_each_window_once(&out, &config);
    assert_eq!(minutes, (0..20).collect::<BTreeSet<i64>>());
    let files = read_tree(&out).len();
    assert_eq!(
        python_reads(&spool),
        format!("read {files}"),
        "the agent stopped, python's sqlite3 reads what it delivered"
    );
}

#[test]
fn an_agent_does_not_start_on_a_spool_another_program_has_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = JsonServer::start((0..3).map(two_sensors).collect(), purpleair_body(&[]));
    let config = two_sensors_config(dir.path(), &server.url);
    let spool = dir.path().join("spool.db");
    let out = dir.path().join("out");
    let agent = Agent::start(&config, &dir.path().join("first.log"));
    wait_for("a delivery", Duration::from_secs(60), || {
        (!read_tree(&out).is_empty()).then_some(())
    });
    assert!(agent.terminate().success());

    let holder = Holder::start(&spool);
    let stderr = dir.path().join("refused.stderr");
    let mut refused = Refused::start(&config, &stderr);
    let exit = refused.exit(Duration::from_secs(30));
    let message = std::fs::read_to_string(&stderr).expect("stderr");
    assert!(!exit.success(), "{exit:?}: {message}");
    assert!(
        message.contains(&format!(
            "the spool {} is open in another program (it holds a lock on {}): close it (an sqlite3 shell, a script) and start the agent again; `edgespool status` reads a spool safely",
            spool.display(),
            guard_of(&spool).display()
        )),
        "{message}"
    );

    holder.close();
    for i in 3..6 {
        server.push(two_sensors(i));
    }
    let agent = Agent::start(&config, &dir.path().join("second.log"));
    wait_until_all_delivered(&server, &config);
    assert!(agent.terminate().success());
    let minutes = assert_each_window_once(&out, &config);
    assert_eq!(minutes, (0..6).collect::<BTreeSet<i64>>());
}

#[test]
fn with_dev_shm_emptied_the_index_is_rebuilt_from_the_wal_and_every_window_lands_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = JsonServer::start((0..10).map(two_sensors).collect(), purpleair_body(&[]));
    let config = two_sensors_config(dir.path(), &server.url);
    let out = dir.path().join("out");
    let spool = dir.path().join("spool.db");
    let agent = Agent::start(&config, &dir.path().join("first.log"));
    // No checkpoint comes this soon (every 1000 pages): every commit, the deliveries'
    // records included, is in the WAL alone.
    wait_for("deliveries", Duration::from_secs(60), || {
        (read_tree(&out).len() >= 3).then_some(())
    });
    let before: BTreeSet<i64> = each_window_once_so_far(&out).minutes;
    // kill -9 keeps the WAL (no checkpoint) and leaves the index behind; a reboot then
    // empties /dev/shm.
    agent.kill9();
    let index = index_of(&spool);
    std::fs::remove_file(&index).expect("the index was in /dev/shm");
    assert!(
        std::fs::metadata(format!("{}-wal", spool.display())).is_ok_and(|m| m.len() > 0),
        "the committed windows are in the WAL only"
    );

    for i in 10..20 {
        server.push(two_sensors(i));
    }
    let agent = Agent::start(&config, &dir.path().join("second.log"));
    wait_until_all_delivered(&server, &config);
    assert!(index.exists(), "the index made again, from the WAL");
    assert!(agent.terminate().success());
    let minutes = assert_each_window_once(&out, &config);
    let expected: BTreeSet<i64> = before.iter().copied().chain(10..20).collect();
    assert!(minutes.is_superset(&expected), "{minutes:?}");
}
