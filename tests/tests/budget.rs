//! The disk budget from outside: an agent with a 1 MiB budget, a thousand series and a
//! sink it cannot write to outgrows its budget several times; it drops the oldest
//! windows, says so in `status`, keeps its files on disk within the stated bound, and
//! once the sink works it delivers exactly the newest windows, each once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgespool_tests::{Agent, read_tree, try_status_json, wait_for, write_file};

const SERIES: usize = 1000;
const BUDGET: u64 = 1024 * 1024;

/// The bound configuration.md states for the spool's files (database and WAL) under a
/// budget, while one flush holds `flush_windows` windows.
fn stated_bound(budget: u64, flush_windows: u64) -> u64 {
    let flush = 100 * flush_windows;
    let checkpoint = (budget / 8 / 1024).clamp(64, 1000);
    let transaction = flush / 1024 + budget / (1024 * 1024) + 32;
    budget + flush + 32 * 1024 + 32 + (checkpoint + transaction) * (1024 + 24)
}

/// A fake sysfs tree of `SERIES` number files under `dir/device`, and the source `probe`
/// (series `probe.f0` …) reading them twice a window, so that no window goes empty. The
/// scale makes every reading a number of many decimals: with [`Wobble`] changing them,
/// no statistic of a window is written shorter than its 8 bytes.
fn probe_source(dir: &Path) -> String {
    let root = dir.join("device");
    let mut text = format!(
        "[[sources]]\nkind = \"sysfs\"\nname = \"probe\"\nroot = \"{}\"\ninterval = \"500ms\"\n",
        root.display()
    );
    for i in 0..SERIES {
        write_file(&root, &format!("sys/probe/f{i}"), &probe_value(i, 0));
        text.push_str(&format!(
            "[[sources.files]]\nfield = \"f{i}\"\npath = \"/sys/probe/f{i}\"\nscale = 0.000123456789\n"
        ));
    }
    text
}

/// What probe file `i` holds at tick `tick`: always 10 bytes, so that it is rewritten in
/// place (a reader sees an old or a new number, never an empty file).
fn probe_value(i: usize, tick: u64) -> String {
    format!(
        "{:09}\n",
        (i as u64 * 7919 + tick * 104_729) % 1_000_000_000
    )
}

/// Rewrites the probe files every 300 ms while it lives, so that the two readings of a
/// window differ: windows about 75 bytes each in the spool, as a varying sensor's take.
struct Wobble {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Wobble {
    fn start(dir: &Path) -> Wobble {
        let root = dir.join("device/sys/probe");
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let mut tick = 0;
            while !s.load(Ordering::Relaxed) {
                tick += 1;
                for i in 0..SERIES {
                    let path = root.join(format!("f{i}"));
                    if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) {
                        let _ = file.write_at(probe_value(i, tick).as_bytes(), 0);
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Wobble {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Wobble {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One quiet series for the second run, so that the spool empties once delivered.
fn idle_source(dir: &Path) -> String {
    let root = dir.join("device");
    write_file(&root, "sys/idle/value", "1\n");
    format!(
        "[[sources]]\nkind = \"sysfs\"\nname = \"idle\"\nroot = \"{}\"\ninterval = \"10s\"\n[[sources.files]]\nfield = \"v\"\npath = \"/sys/idle/value\"\n",
        root.display()
    )
}

fn config(dir: &Path, file: &str, source: &str) -> PathBuf {
    let text = format!(
        "[agent]\ndevice_id = \"e2e\"\nspool = \"{}\"\nwindow = \"1s\"\npartition = \"1m\"\ngrace = \"1s\"\ndisk_budget = \"1 MiB\"\n\n{source}\n[[sinks]]\nkind = \"local\"\nname = \"out\"\npath = \"{}\"\nretry_max = \"1s\"\nlate_grace = \"0s\"\n",
        dir.join("spool.db").display(),
        dir.join("out").display()
    );
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Samples the size of the spool's files (database and WAL) every 50 ms; the largest
/// seen so far is read from the returned counter.
struct SizeWatch {
    largest: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SizeWatch {
    fn start(spool: PathBuf) -> SizeWatch {
        let largest = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (Arc::clone(&largest), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let size: u64 = ["", "-wal"]
                    .iter()
                    .map(|suffix| {
                        std::fs::metadata(format!("{}{suffix}", spool.display()))
                            .map_or(0, |m| m.len())
                    })
                    .sum();
                l.fetch_max(size, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        SizeWatch {
            largest,
            stop,
            thread: Some(thread),
        }
    }

    fn largest(&self) -> u64 {
        self.largest.load(Ordering::Relaxed)
    }
}

impl Drop for SizeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn dropped(status: &serde_json::Value) -> Option<u64> {
    status["counters"]["dropped_rows"].as_u64()
}

#[test]
fn a_sink_down_past_the_budget_keeps_the_newest_windows_and_the_files_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    // A file where the sink's folder should be: no one, root included, can write there.
    std::fs::write(&out, "not a folder").expect("block the sink");
    let outage = config(dir.path(), "outage.toml", &probe_source(dir.path()));
    let watch = SizeWatch::start(dir.path().join("spool.db"));
    let wobble = Wobble::start(dir.path());
    let started = Instant::now();
    let agent = Agent::start(&outage, &dir.path().join("agent.log"));
    let mut last_look = Instant::now();
    // About 75 bytes a window, a thousand a second: the budget is full every ~14 s.
    // Stop a few seconds before a minute ends, so that the last partition closes soon.
    wait_for(
        "the outage to outgrow the budget three times",
        Duration::from_secs(150),
        || {
            // `status` is a process of its own: every 2 s is enough on two cores.
            if last_look.elapsed() < Duration::from_secs(2) {
                return None;
            }
            last_look = Instant::now();
            let status = try_status_json(&outage)?;
            let second = chrono::Utc::now().timestamp().rem_euclid(60);
            (dropped(&status)? >= 30_000 && (45..=55).contains(&second)).then_some(())
        },
    );
    let stopped = agent.terminate();
    drop(wobble);
    assert!(stopped.success(), "{stopped:?}");
    let outage_seconds = started.elapsed().as_secs();

    std::fs::remove_file(&out).expect("the sink works again");
    let calm = config(dir.path(), "calm.toml", &idle_source(dir.path()));
    let agent = Agent::start(&calm, &dir.path().join("agent.log"));
    let status = wait_for(
        "every window kept to be delivered",
        Duration::from_secs(90),
        || {
            if last_look.elapsed() < Duration::from_secs(1) {
                return None;
            }
            last_look = Instant::now();
            let status = try_status_json(&calm)?;
            (status["spool"]["rows"].as_i64()? < 20).then_some(status)
        },
    );
    drop(agent);
    let largest = watch.largest();
    drop(watch);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    let dropped = dropped(&status).expect("the counter");
    assert!(dropped > 0, "status counts the dropped windows: {status}");
    let steps = log.matches("dropped the oldest windows").count();
    assert!(
        steps >= 3,
        "{steps} drop steps logged over a {outage_seconds} s outage"
    );
    let bound = stated_bound(BUDGET, SERIES as u64);
    assert!(
        largest <= bound,
        "the spool's files reached {largest} bytes, over the stated bound of {bound}"
    );

    // Window starts per probe series, as delivered.
    let mut starts: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in read_tree(&out).iter().flat_map(|f| &f.rows) {
        let series = row["series"].as_str().expect("series");
        if !series.starts_with("probe.") {
            continue;
        }
        let start = row["window_start"].as_str().expect("window_start");
        let start = chrono::DateTime::parse_from_rfc3339(start)
            .expect("RFC 3339")
            .timestamp();
        starts.entry(series.to_owned()).or_default().push(start);
    }
    assert_eq!(starts.len(), SERIES, "every series kept some windows");
    // Every series is read in the same sampling, so a tick the machine was too busy for
    // leaves the same gap in all of them: the windows some series has are the reference
    // each series must hold between its first and its last, and such gaps must be rare.
    let all: std::collections::BTreeSet<i64> = starts.values().flatten().copied().collect();
    let (oldest, newest) = (
        *all.first().expect("some windows"),
        *all.last().expect("some windows"),
    );
    let span = (newest - oldest + 1) as usize;
    assert!(
        all.len() * 20 >= span * 19,
        "windows missing for every series: {} of {span} seconds",
        span - all.len()
    );
    let mut firsts = Vec::new();
    let mut lasts = Vec::new();
    let mut delivered = 0;
    for (series, list) in &mut starts {
        list.sort_unstable();
        let n = list.len();
        list.dedup();
        assert_eq!(list.len(), n, "{series}: a window delivered twice");
        let (first, last) = (list[0], list[n - 1]);
        let expected: Vec<i64> = all.range(first..=last).copied().collect();
        assert_eq!(
            *list, expected,
            "{series}: a window missing between the first kept ({first}) and the last ({last})"
        );
        firsts.push(first);
        lasts.push(last);
        delivered += n;
    }
    let spread = |v: &[i64]| v.iter().max().expect("some") - v.iter().min().expect("some");
    assert!(
        spread(&firsts) <= 1,
        "the oldest windows went for every series alike: first kept {:?}..{:?}",
        firsts.iter().min(),
        firsts.iter().max()
    );
    assert!(
        spread(&lasts) <= 1,
        "the newest windows of every series arrived"
    );
    assert!(
        (delivered as u64) < dropped * 2,
        "{delivered} delivered, {dropped} dropped: the budget holds the newest ~14 s"
    );
}
