//! The spool's unit tests: delivery, recovery, the budget, and a model-based proptest.

use super::*;
use crate::flow::{Flush, Stats, WindowRow};

fn options(sinks: &[&str]) -> SpoolOptions {
    SpoolOptions {
        device: "pi-test".into(),
        window_seconds: 60,
        partition_seconds: 3600,
        grace_ms: 0,
        budget_bytes: 64 * 1024 * 1024,
        when_full: WhenFull::DropOldest,
        sources: Vec::new(),
        sinks: sinks.iter().map(|s| (s.to_string(), "local")).collect(),
        live: Vec::new(),
        late: HashMap::new(),
        each_flush: Default::default(),
    }
}

fn row(series: &str, start: i64, value: f64) -> WindowRow {
    WindowRow {
        series: Arc::new(Series::new(series, Some("celsius"))),
        start,
        seconds: 60,
        stats: Stats::single(value),
    }
}

/// A window of readings that no record version writes shorter than about 80 bytes
/// (none equal to another, none with few decimals), its mean `value`: for the tests
/// that fill a budget.
fn wide_row(series: &str, start: i64, value: f64) -> WindowRow {
    let third = 1.0 / 3.0;
    let mut stats = Stats::single(value);
    stats.count = 3;
    (stats.min, stats.max, stats.median) =
        (value - third, value + 2.0 * third, value - 0.1 * third);
    (stats.first, stats.last) = (value + 0.3 * third, value - 0.7 * third);
    stats.stdev = Some(third);
    stats.mean_rest = 1e-17;
    WindowRow {
        stats,
        ..row(series, start, value)
    }
}

fn flush(rows: Vec<WindowRow>) -> Flush {
    Flush::of_rows(rows, 0)
}

/// Delivers every ready part of `sink`, returning (partition, part, values) per part.
fn drain(
    spool: &mut Spool,
    reader: &mut SpoolReader,
    sink: &str,
    now_ms: i64,
) -> Vec<(i64, u32, Vec<f64>)> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        match spool.plan(sink, now_ms).expect("plan") {
            Plan::Ready(plan) => {
                let rows = reader.read_part(&plan, false).expect("read").rows;
                out.push((
                    plan.partition,
                    plan.part,
                    rows.iter().map(|r| r.stats.mean).collect(),
                ));
                spool.delivered(&plan, now_ms).expect("deliver");
            }
            Plan::Wait(_) => return out,
        }
    }
    panic!("drain did not finish");
}

#[test]
fn a_flush_kept_for_a_full_disk_takes_the_next_in_and_stays_bounded() {
    let mut kept = flush(vec![row("s.a", 0, 1.0), row("s.a", 60, 2.0)]);
    kept.aggregate.samples = 2;
    let mut newer = flush(vec![row("s.a", 120, 3.0)]);
    newer.aggregate.samples = 1;
    newer.now_ms = 180_000;
    newer.open_windows = 4;
    kept.absorb(newer);
    let starts: Vec<i64> = kept.rows.iter().map(|r| r.start).collect();
    assert_eq!(starts, [0, 60, 120]);
    assert_eq!(
        (kept.aggregate.samples, kept.now_ms, kept.open_windows),
        (3, 180_000, 4)
    );
    assert_eq!(kept.keep_newest(2), 1, "the oldest goes first");
    let starts: Vec<i64> = kept.rows.iter().map(|r| r.start).collect();
    assert_eq!(starts, [60, 120]);
    assert_eq!(kept.keep_newest(2), 0);
}

#[test]
fn a_damaged_spool_is_moved_aside_and_a_fresh_one_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    {
        let mut spool = Spool::open(&path, options(&["a"])).expect("open");
        for hour in 0..40 {
            let rows = (0..60)
                .map(|m| row(&format!("s.{m}"), hour * 3600 + m * 60, 1.0))
                .collect();
            spool.commit(&flush(rows)).expect("commit");
        }
    }
    // Dropping the writer checkpointed the WAL: damage pages 4 to 12 of the file.
    let mut bytes = std::fs::read(&path).expect("read");
    let size = bytes.len();
    assert!(size > 16 * 1024, "{size} bytes");
    bytes[3 * 1024..12 * 1024].fill(0xAA);
    std::fs::write(&path, &bytes).expect("write");

    let spool = Spool::open(&path, options(&["a"])).expect("a fresh spool");
    drop(spool);
    let reader = SpoolReader::open(&path).expect("reader");
    let recovery = reader.recovery().expect("read").expect("recorded");
    assert!(
        recovery.reason == "database disk image is malformed"
            || recovery.reason.starts_with("integrity check: "),
        "{}",
        recovery.reason
    );
    assert_eq!(
        std::fs::metadata(&recovery.moved_to).expect("kept").len(),
        size as u64
    );
    assert!(
        recovery
            .moved_to
            .display()
            .to_string()
            .starts_with(&format!("{}.corrupt-", path.display()))
    );
    assert_eq!(reader.totals().expect("totals").0, 0, "a fresh spool");
}

#[test]
fn a_file_that_is_no_database_is_moved_aside_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    std::fs::write(&path, "half-written garbage ".repeat(500)).expect("write");
    Spool::open(&path, options(&["a"])).expect("a fresh spool");
    let recovery = SpoolReader::open(&path)
        .and_then(|r| r.recovery())
        .expect("read")
        .expect("recorded");
    assert_eq!(recovery.reason, "file is not a database");
    let kept = std::fs::read_to_string(&recovery.moved_to).expect("kept");
    assert!(kept.starts_with("half-written garbage"));
}

#[test]
fn a_partition_waits_for_its_end_plus_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut opts = options(&["a"]);
    opts.grace_ms = 30_000;
    let mut spool = Spool::open(&path, opts).expect("open");
    spool
        .commit(&flush(vec![row("s.t", 3600, 1.0)]))
        .expect("commit");
    assert_eq!(
        spool.plan("a", 7_200_000 + 29_999).expect("plan"),
        Plan::Wait(Some(7_230_000))
    );
    assert!(matches!(
        spool.plan("a", 7_230_000).expect("plan"),
        Plan::Ready(_)
    ));
}

#[test]
fn late_rows_go_to_a_new_part_not_over_the_old_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush(vec![row("s.t", 0, 1.0), row("s.t", 60, 2.0)]))
        .expect("commit");
    assert_eq!(
        drain(&mut spool, &mut reader, "a", i64::MAX / 4),
        vec![(0, 0, vec![1.0, 2.0])]
    );
    spool
        .commit(&flush(vec![row("s.t", 120, 3.0)]))
        .expect("late commit");
    assert_eq!(
        drain(&mut spool, &mut reader, "a", i64::MAX / 4),
        vec![(0, 1, vec![3.0])]
    );
}

#[test]
fn a_part_planned_before_a_crash_is_sent_again_with_the_same_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let first = {
        let mut spool = Spool::open(&path, options(&["a"])).expect("open");
        spool
            .commit(&flush(vec![row("s.t", 0, 1.0)]))
            .expect("commit");
        let Plan::Ready(plan) = spool.plan("a", i64::MAX / 4).expect("plan") else {
            panic!("a part is ready");
        };
        plan
    }; // dropped without `delivered`: the crash
    let mut spool = Spool::open(&path, options(&["a"])).expect("reopen");
    spool
        .commit(&flush(vec![row("s.t", 60, 2.0)]))
        .expect("a late row meanwhile");
    let Plan::Ready(again) = spool.plan("a", i64::MAX / 4).expect("plan") else {
        panic!("the planned part is still due");
    };
    assert_eq!(again, first);
    let mut reader = SpoolReader::open(&path).expect("reader");
    assert_eq!(reader.read_part(&again, false).expect("read").rows.len(), 1);
}

#[test]
fn a_wide_column_set_is_every_series_known_at_the_first_plan_and_the_same_on_retry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    let names =
        |rows: &PartRows| -> Vec<String> { rows.series.iter().map(|s| s.name.clone()).collect() };
    // Hour 0 holds s.a; s.b first appears in hour 1, s.c in hour 2.
    spool
        .commit(&flush(vec![row("s.a", 0, 1.0), row("s.b", 3600, 2.0)]))
        .expect("commit");
    let Plan::Ready(hour0) = spool.plan("a", i64::MAX / 4).expect("plan") else {
        panic!("hour 0 is ready");
    };
    // Planned, not delivered; meanwhile s.c appears, with a late row for hour 0.
    spool
        .commit(&flush(vec![row("s.c", 0, 3.0), row("s.c", 7200, 3.0)]))
        .expect("commit");
    let first_try = reader.read_part(&hour0, true).expect("read");
    assert_eq!(
        names(&first_try),
        ["s.a", "s.b"],
        "hours 0 and 1 were planned together, when s.a and s.b were known; s.c came after"
    );
    let retry = reader.read_part(&hour0, true).expect("read");
    assert_eq!(
        names(&retry),
        names(&first_try),
        "a retry has the same columns"
    );
    spool.delivered(&hour0, 0).expect("deliver");
    let Plan::Ready(hour1) = spool.plan("a", i64::MAX / 4).expect("plan") else {
        panic!("hour 1");
    };
    let hour1_rows = reader.read_part(&hour1, true).expect("read");
    assert_eq!(
        names(&hour1_rows),
        ["s.a", "s.b"],
        "the same columns as hour 0"
    );
    assert_eq!(hour1_rows.rows.len(), 1);
    spool.delivered(&hour1, 0).expect("deliver");
    let Plan::Ready(hour0_late) = spool.plan("a", i64::MAX / 4).expect("plan") else {
        panic!("the late part of hour 0");
    };
    assert_eq!((hour0_late.partition, hour0_late.part), (0, 1));
    let late = reader.read_part(&hour0_late, true).expect("read");
    assert_eq!(
        names(&late),
        ["s.a", "s.b"],
        "a partition's later parts keep its first part's columns (the encoder adds s.c, \
         which only its own late row brings)"
    );
    assert_eq!(late.rows.len(), 1);
    spool.delivered(&hour0_late, 0).expect("deliver");
    let Plan::Ready(hour2) = spool.plan("a", i64::MAX / 4).expect("plan") else {
        panic!("hour 2");
    };
    assert_eq!(
        names(&reader.read_part(&hour2, true).expect("read")),
        ["s.a", "s.b", "s.c"],
        "series keep their columns in later partitions"
    );
}

#[test]
fn rows_are_deleted_only_once_every_sink_has_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a", "b"])).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush(vec![row("s.t", 0, 1.0)]))
        .expect("commit");
    drain(&mut spool, &mut reader, "a", i64::MAX / 4);
    assert_eq!(reader.totals().expect("totals").0, 1, "b still wants it");
    let b = reader
        .sinks()
        .expect("sinks")
        .into_iter()
        .find(|s| s.name == "b")
        .expect("b");
    assert_eq!((b.pending_rows, b.oldest_pending), (1, Some(0)));
    drain(&mut spool, &mut reader, "b", i64::MAX / 4);
    assert_eq!(reader.totals().expect("totals").0, 0);
}

#[test]
fn reopening_keeps_windows_counters_and_series() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    {
        let mut spool = Spool::open(&path, options(&["a"])).expect("open");
        let mut f = flush(vec![row("s.t", 0, 1.0)]);
        f.aggregate.non_finite = 3;
        spool.commit(&f).expect("commit");
    }
    let mut spool = Spool::open(&path, options(&["a"])).expect("reopen");
    let mut f = flush(vec![row("s.t", 60, 2.0)]);
    f.aggregate.non_finite = 2;
    spool.commit(&f).expect("commit");
    let reader = SpoolReader::open(&path).expect("reader");
    assert_eq!(reader.totals().expect("totals").0, 2);
    assert_eq!(
        reader.counters().expect("counters")["samples.non_finite"],
        5
    );
    assert_eq!(spool.series_ids.len(), 1);
}

#[test]
fn a_foreign_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.db");
    let conn = Connection::open(&path).expect("create");
    conn.execute_batch("PRAGMA application_id = 7; CREATE TABLE t (x);")
        .expect("schema");
    drop(conn);
    let err = Spool::open(&path, options(&["a"])).err().expect("refused");
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not an edgespool spool (application id 0x7)",
            path.display()
        )
    );
}

#[test]
fn drop_oldest_keeps_the_spool_under_its_budget_and_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut opts = options(&["a"]);
    opts.budget_bytes = 128 * 1024;
    let mut spool = Spool::open(&path, opts).expect("open");
    for hour in 0..100 {
        let rows = (0..60)
            .map(|m| wide_row(&format!("s.{}", m % 10), hour * 3600 + m * 60, m as f64))
            .collect();
        spool.commit(&flush(rows)).expect("commit");
    }
    assert!(spool.used_bytes().expect("used") <= 128 * 1024);
    let reader = SpoolReader::open(&path).expect("reader");
    let dropped = reader.counters().expect("counters")["rows.dropped"];
    let (held, _, _) = reader.totals().expect("totals");
    assert_eq!(
        dropped as i64 + held,
        100 * 60,
        "every row is either held or counted as dropped"
    );
    assert!(dropped > 0);
}

#[derive(Debug, Clone)]
enum Op {
    Commit(Vec<(u8, u16)>),
    /// Deliver to a sink what it has at this hour (sink "a" takes the open partition).
    Deliver(u8, u8),
    Reopen,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        proptest::collection::vec((0u8..3, 0u16..600), 0..8).prop_map(Op::Commit),
        (0u8..2, 0u8..12).prop_map(|(sink, hour)| Op::Deliver(sink, hour)),
        Just(Op::Reopen),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Beside a model that is just a list of committed rows: every sink receives each
    /// committed row exactly once, whatever the interleaving of commits, deliveries
    /// and restarts.
    #[test]
    fn every_committed_row_reaches_every_sink_once(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spool.db");
        let opts = || {
            let mut opts = options(&["a", "b"]);
            opts.each_flush.insert("a".to_owned());
            opts
        };
        let mut spool = Spool::open(&path, opts()).expect("open");
        let mut reader = SpoolReader::open(&path).expect("reader");
        let mut model: Vec<f64> = Vec::new();
        let mut received: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut next_value = 0.0;
        for op in ops {
            match op {
                Op::Commit(rows) => {
                    let rows: Vec<WindowRow> = rows.into_iter().map(|(s, minute)| {
                        next_value += 1.0;
                        model.push(next_value);
                        wide_row(&format!("s.{s}"), i64::from(minute) * 60, next_value)
                    }).collect();
                    spool.commit(&flush(rows)).expect("commit");
                }
                Op::Deliver(sink, hour) => {
                    let name = ["a", "b"][sink as usize];
                    let now_ms = i64::from(hour) * HOUR_MS + 1_000;
                    for (_, _, values) in drain(&mut spool, &mut reader, name, now_ms) {
                        received[sink as usize].extend(values);
                    }
                }
                Op::Reopen => {
                    drop(spool);
                    spool = Spool::open(&path, opts()).expect("reopen");
                }
            }
        }
        for (sink, got) in received.iter_mut().enumerate() {
            for (_, _, values) in drain(&mut spool, &mut reader, ["a", "b"][sink], i64::MAX / 4) {
                got.extend(values);
            }
            got.sort_by(f64::total_cmp);
            proptest::prop_assert_eq!(&*got, &model[..]);
        }
        proptest::prop_assert_eq!(reader.totals().expect("totals").0, 0);
    }
}

#[test]
fn a_second_writer_is_refused_before_it_opens_or_moves_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let _first = SpoolLock::take(&path).expect("the first writer's lock");
    // Garbage that a writer would move aside as corrupt: the second must not touch it.
    std::fs::write(&path, "in use, not corrupt ".repeat(100)).expect("write");
    let err = Spool::open(&path, options(&["a"])).err().expect("refused");
    assert!(
        matches!(&err, SpoolError::InUse { path: p, pid: Some(pid) } if p == &path && *pid == std::process::id()),
        "{err}"
    );
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter()
            .all(|name| name == "spool.db" || name == "spool.db.lock"),
        "{left:?}"
    );
    assert!(
        std::fs::read_to_string(&path)
            .expect("still there")
            .starts_with("in use")
    );
}

/// Every row of `sink` still to deliver, read through a fresh reader at `path`.
fn drain_fresh(spool: &mut Spool, path: &Path, sink: &str) -> Vec<f64> {
    let mut reader = SpoolReader::open(path).expect("a reader on the path");
    let mut values: Vec<f64> = drain(spool, &mut reader, sink, i64::MAX / 4)
        .into_iter()
        .flat_map(|(_, _, v)| v)
        .collect();
    values.sort_by(f64::total_cmp);
    values
}

#[test]
fn a_spool_deleted_under_the_writer_is_put_back_at_the_next_flush_with_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush(vec![row("s.x", 0, 1.0), row("s.x", 60, 2.0)]))
        .expect("commit");
    let delivered = drain(&mut spool, &mut reader, "a", i64::MAX / 4);
    assert_eq!(delivered.len(), 1);
    spool
        .commit(&flush(vec![row("s.x", 3600, 3.0), row("s.y", 3660, 4.0)]))
        .expect("commit");
    let before = spool.file;
    for suffix in ["", "-wal", "-shm"] {
        std::fs::remove_file(format!("{}{suffix}", path.display())).expect("rm");
    }
    spool
        .commit(&flush(vec![row("s.y", 7200, 5.0)]))
        .expect("the next flush puts the spool back");
    assert_ne!(spool.file, before);
    assert_eq!(FileId::of_path(&path).expect("stat"), Some(spool.file));
    assert_eq!(
        drain_fresh(&mut spool, &path, "a"),
        [3.0, 4.0, 5.0],
        "the undelivered rows, and the new one, once; the delivered ones not again"
    );
    let restored = SpoolReader::open(&path)
        .and_then(|r| r.restored())
        .expect("read")
        .expect("recorded for status");
    assert_eq!((restored.found.as_str(), restored.rows), ("deleted", 2));
    assert_eq!(restored.moved_to, None);
    // The put-back file is the spool from now on: reopening it keeps the ids growing.
    drop(spool);
    let mut spool = Spool::open(&path, options(&["a"])).expect("reopen");
    spool
        .commit(&flush(vec![row("s.x", 7260, 6.0)]))
        .expect("commit");
    assert_eq!(drain_fresh(&mut spool, &path, "a"), [6.0]);
}

#[test]
fn a_spool_replaced_under_the_writer_is_moved_aside_and_the_open_one_put_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    spool
        .commit(&flush(vec![row("s.x", 0, 1.0)]))
        .expect("commit");
    let other = dir.path().join("other");
    std::fs::write(&other, "someone else's file").expect("write");
    std::fs::rename(&other, &path).expect("replace the spool");
    spool
        .commit(&flush(vec![row("s.x", 60, 2.0)]))
        .expect("commit");
    let restored = SpoolReader::open(&path)
        .and_then(|r| r.restored())
        .expect("read")
        .expect("recorded");
    assert_eq!(restored.found, "replaced");
    let moved = restored.moved_to.expect("where the other file went");
    assert!(
        moved
            .display()
            .to_string()
            .starts_with(&format!("{}.replaced-", path.display()))
    );
    assert_eq!(
        std::fs::read_to_string(&moved).expect("kept"),
        "someone else's file"
    );
    assert_eq!(drain_fresh(&mut spool, &path, "a"), [1.0, 2.0]);
}

#[test]
fn a_writer_whose_lock_another_took_commits_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    std::fs::remove_file(lock_path(&path)).expect("rm the lock file");
    let _other = SpoolLock::take(&path).expect("another agent takes the new lock file");
    let err = spool
        .commit(&flush(vec![row("s.x", 0, 1.0)]))
        .expect_err("the spool is the other agent's now");
    assert!(matches!(err, SpoolError::InUse { .. }), "{err}");
    let reader = SpoolReader::open(&path).expect("reader");
    assert_eq!(reader.totals().expect("totals").0, 0);
}

/// Bytes of the spool's files on disk: the database and its WAL.
fn files_on_disk(path: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .map(|suffix| {
            std::fs::metadata(format!("{}{suffix}", path.display())).map_or(0, |m| m.len())
        })
        .sum()
}

#[test]
fn a_long_outage_drops_the_oldest_windows_in_small_steps_and_the_rest_goes_once() {
    const SERIES: i64 = 200;
    const MINUTES: i64 = 420;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let budget = 1024 * 1024;
    let mut opts = options(&["a"]);
    opts.budget_bytes = budget;
    let mut spool = Spool::open(&path, opts).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    let bound = files_bound(budget, SERIES as u64);
    let value = |minute: i64, series: i64| (minute * 1000 + series) as f64;
    let (mut dropped, mut largest_file, mut first_planned) = (0u64, 0u64, None);
    for minute in 0..MINUTES {
        // One flush: the minute's window of every series, all in one partition.
        let rows = (0..SERIES)
            .map(|s| wide_row(&format!("s.{s}"), minute * 60, value(minute, s)))
            .collect();
        spool.commit(&flush(rows)).expect("commit");
        let held_before = reader.totals().expect("totals").0 as u64 + SERIES as u64;
        // The counter is absent until the first drop.
        let now = reader
            .counters()
            .expect("counters")
            .get("rows.dropped")
            .copied()
            .unwrap_or(0);
        let step = now - dropped;
        assert!(
            step * 4 < held_before,
            "a drop step of {step} windows out of {held_before} is not small"
        );
        dropped = now;
        let size = files_on_disk(&path);
        largest_file = largest_file.max(size);
        assert!(
            size <= bound,
            "after minute {minute}: {size} bytes on disk, over the bound of {bound}"
        );
        // The sink is down: the uploader plans what is closed and never delivers it.
        if let Plan::Ready(plan) = spool.plan("a", (minute + 1) * 60_000).expect("plan") {
            first_planned.get_or_insert(plan);
        }
    }
    assert!(
        largest_file > budget * 9 / 10,
        "the budget was reached ({largest_file} bytes)"
    );
    assert!(dropped > 0 && dropped % SERIES as u64 == 0, "{dropped}");
    // Whole flushes went, oldest first: the first `cut` minutes.
    let cut = (dropped / SERIES as u64) as i64;
    assert!(
        cut > MINUTES / 2,
        "the outage outgrew the budget several times"
    );
    let first_planned = first_planned.expect("hour 0 was planned while the sink was down");
    assert_eq!(
        (first_planned.partition, first_planned.part),
        (0, 0),
        "the oldest part"
    );
    assert!(
        reader
            .read_part(&first_planned, false)
            .expect("a dropped part reads")
            .rows
            .is_empty(),
        "a planned part whose rows were dropped reads as empty: nothing goes out under its key"
    );
    // The sink is back: everything not dropped arrives, once.
    let parts = drain(&mut spool, &mut reader, "a", i64::MAX / 4);
    let mut got: Vec<f64> = parts.iter().flat_map(|(_, _, v)| v.clone()).collect();
    got.sort_by(f64::total_cmp);
    let mut expected: Vec<f64> = (cut..MINUTES)
        .flat_map(|m| (0..SERIES).map(move |s| value(m, s)))
        .collect();
    expected.sort_by(f64::total_cmp);
    assert_eq!(got.len(), expected.len(), "kept windows, each once");
    assert!(got == expected, "exactly the newest windows arrive");
    let mut keys: Vec<(i64, u32)> = parts.iter().map(|(p, n, _)| (*p, *n)).collect();
    keys.dedup();
    assert_eq!(keys.len(), parts.len(), "no part key twice");
    assert!(
        !keys.contains(&(0, 0)),
        "the dropped part 0 of hour 0 is not sent"
    );
    assert_eq!(reader.totals().expect("totals").0, 0);
    assert!(files_on_disk(&path) <= bound);
}

#[test]
fn each_series_mark_is_committed_with_its_windows_and_only_grows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    {
        let mut spool = Spool::open(&path, options(&["a"])).expect("open");
        let mut f = flush(vec![row("s.t", 0, 1.0), row("s.u", 0, 2.0)]);
        f.marks = vec![(Arc::clone(&f.rows[0].series), 50_000)];
        spool.commit(&f).expect("commit");
        // A late row's older timestamp does not move the mark back.
        let mut f = flush(vec![row("s.t", 0, 3.0)]);
        f.marks = vec![(Arc::clone(&f.rows[0].series), 20_000)];
        spool.commit(&f).expect("commit");
    }
    let spool = Spool::open(&path, options(&["a"])).expect("reopen");
    assert_eq!(
        spool.marks().expect("marks"),
        [(Series::new("s.t", Some("celsius")), 50_000)]
    );
}

/// Makes at `path` the spool of an edgespool from before the migration whose SQL holds
/// `marker` (the migrations before it), `fill`ed before its version is set.
fn old_spool(path: &std::path::Path, marker: &str, fill: impl FnOnce(&Connection)) {
    let before = schema::MIGRATIONS
        .iter()
        .position(|sql| sql.contains(marker))
        .unwrap_or_else(|| panic!("a migration with {marker:?}"));
    let conn = Connection::open(path).expect("create raw");
    conn.pragma_update(None, "page_size", schema::PAGE_SIZE)
        .expect("page size");
    for sql in &schema::MIGRATIONS[..before] {
        conn.execute_batch(sql).expect("an old migration");
    }
    fill(&conn);
    conn.pragma_update(None, "user_version", before as i64)
        .expect("version");
    conn.pragma_update(None, "application_id", schema::APPLICATION_ID)
        .expect("application id");
}

#[test]
fn a_spool_of_schema_version_3_opens_and_keeps_marks_from_then_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    // The spool of an edgespool from before marks: the migrations before theirs.
    old_spool(&path, "CREATE TABLE marks", |_| {});
    let mut spool = Spool::open(&path, options(&["a"])).expect("an old spool opens");
    assert!(spool.marks().expect("marks").is_empty());
    let mut f = flush(vec![row("s.t", 0, 1.0)]);
    f.marks = vec![(Arc::clone(&f.rows[0].series), 7_000)];
    spool.commit(&f).expect("commit");
    assert_eq!(spool.marks().expect("marks").len(), 1);
    let version: i64 = spool
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version as usize, schema::MIGRATIONS.len());
}

#[test]
fn a_spool_of_schema_version_5_keeps_its_counters_in_the_row_beside_the_agents_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    // The spool of an edgespool whose counters had a table of their own.
    old_spool(&path, "DROP TABLE counters", |conn| {
        conn.execute_batch(
            "INSERT INTO counters (name, value) VALUES ('samples', 6000), ('rows.dropped', 12),
               ('sink.a.parts_pruned', 3);
             INSERT INTO meta (key, value) VALUES ('next_id', '41');",
        )
        .expect("an old spool's counters");
    });
    let mut spool = Spool::open(&path, options(&["a"])).expect("an old spool opens");
    let reader = SpoolReader::open(&path).expect("reader");
    let carried: Vec<(String, u64)> = reader.counters().expect("counters").into_iter().collect();
    assert_eq!(
        carried,
        [
            ("rows.dropped".to_owned(), 12),
            ("samples".to_owned(), 6000),
            ("sink.a.parts_pruned".to_owned(), 3)
        ],
        "the migration carries every counter over"
    );
    assert_eq!(spool.next_id, 41, "and leaves next_id as it was");
    let mut f = flush(vec![row("s.t", 0, 1.0)]);
    f.aggregate.samples = 60;
    f.aggregate.non_finite = 2;
    spool.commit(&f).expect("commit");
    let counters = reader.counters().expect("counters");
    assert_eq!(counters["samples"], 6060);
    assert_eq!(counters["samples.non_finite"], 2);
    assert_eq!(
        reader.sinks().expect("sinks")[0].delivered_parts,
        3,
        "status still counts the pruned parts"
    );
    let tables: i64 = spool
        .conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'counters' AND type = 'table'",
            [],
            |r| r.get(0),
        )
        .expect("schema");
    assert_eq!(tables, 0, "no table of counters left: they live in meta");
    drop(spool);
    let spool = Spool::open(&path, options(&["a"])).expect("reopen");
    drop(spool);
    assert_eq!(
        SpoolReader::open(&path)
            .expect("reader")
            .counters()
            .expect("counters")["samples"],
        6060,
        "and they survive a reopening"
    );
}

const HOUR_MS: i64 = 3_600_000;

/// The test options with late rows of sink "a" waiting `grace_ms`, at most `max_rows`.
fn late_options(grace_ms: i64, max_rows: i64) -> SpoolOptions {
    let mut opts = options(&["a"]);
    opts.late
        .insert("a".to_owned(), LateParts { grace_ms, max_rows });
    opts
}

fn flush_at(rows: Vec<WindowRow>, now_ms: i64) -> Flush {
    Flush::of_rows(rows, now_ms)
}

fn late_waiting(reader: &SpoolReader) -> (i64, Option<i64>) {
    let sinks = reader.sinks().expect("sinks");
    (sinks[0].late_waiting, sinks[0].late_due_ms)
}

#[test]
fn late_rows_of_several_flushes_go_out_as_one_part_once_the_oldest_waited_the_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let grace = 2 * HOUR_MS;
    let mut spool = Spool::open(&path, late_options(grace, 10_000)).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush_at(
            vec![row("s.t", 0, 1.0), row("s.t", 60, 2.0)],
            120_000,
        ))
        .expect("commit");
    assert_eq!(
        drain(&mut spool, &mut reader, "a", HOUR_MS),
        vec![(0, 0, vec![1.0, 2.0])],
        "a partition's first part does not wait for the late grace"
    );
    // Three flushes bring stragglers for hour 0; hour 1 fills meanwhile.
    for (i, at) in [10_000, 70_000, 130_000].into_iter().enumerate() {
        let straggler = row(
            if i == 1 { "s.u" } else { "s.t" },
            120 + 60 * i as i64,
            3.0 + i as f64,
        );
        spool
            .commit(&flush_at(
                vec![straggler, row("s.t", 3600 + 60 * i as i64, 9.0)],
                HOUR_MS + at,
            ))
            .expect("late commit");
        assert_eq!(
            spool.plan("a", HOUR_MS + at + 1).expect("plan"),
            Plan::Wait(Some(2 * HOUR_MS)),
            "hour 1 is not closed yet; the late rows wait"
        );
    }
    assert_eq!(late_waiting(&reader), (3, Some(HOUR_MS + 10_000 + grace)));
    assert_eq!(
        drain(&mut spool, &mut reader, "a", 2 * HOUR_MS),
        vec![(3600, 0, vec![9.0, 9.0, 9.0])],
        "hour 1 goes when it closes; hour 0's late rows still wait"
    );
    assert_eq!(
        spool.plan("a", 2 * HOUR_MS).expect("plan"),
        Plan::Wait(Some(HOUR_MS + 10_000 + grace))
    );
    assert_eq!(
        drain(&mut spool, &mut reader, "a", HOUR_MS + 10_000 + grace),
        vec![(0, 1, vec![3.0, 4.0, 5.0])],
        "one part, not three"
    );
    assert_eq!(late_waiting(&reader), (0, None));
    assert_eq!(reader.totals().expect("totals").0, 0, "all delivered");
}

#[test]
fn late_rows_go_at_once_when_as_many_as_the_cap_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, late_options(HOUR_MS, 3)).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush_at(vec![row("s.t", 0, 1.0)], 60_000))
        .expect("commit");
    assert_eq!(drain(&mut spool, &mut reader, "a", HOUR_MS).len(), 1);
    for (i, value) in [2.0, 3.0].into_iter().enumerate() {
        spool
            .commit(&flush_at(
                vec![row("s.t", 60 * (i as i64 + 1), value)],
                HOUR_MS + 1000,
            ))
            .expect("late commit");
        assert!(drain(&mut spool, &mut reader, "a", HOUR_MS + 2000).is_empty());
    }
    spool
        .commit(&flush_at(vec![row("s.u", 0, 4.0)], HOUR_MS + 3000))
        .expect("the third late row");
    assert_eq!(
        drain(&mut spool, &mut reader, "a", HOUR_MS + 3000),
        vec![(0, 1, vec![4.0, 2.0, 3.0])],
        "the cap sends them long before the grace is over"
    );
}

#[test]
fn late_rows_keep_waiting_across_a_restart_and_their_plan_is_the_same_after_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let opts = || late_options(HOUR_MS, 10_000);
    {
        let mut spool = Spool::open(&path, opts()).expect("open");
        let mut reader = SpoolReader::open(&path).expect("reader");
        spool
            .commit(&flush_at(vec![row("s.t", 0, 1.0)], 60_000))
            .expect("commit");
        assert_eq!(drain(&mut spool, &mut reader, "a", HOUR_MS).len(), 1);
        spool
            .commit(&flush_at(vec![row("s.t", 60, 2.0)], HOUR_MS + 5_000))
            .expect("late commit");
    } // stopped (or killed: the late row is committed)
    let first = {
        let mut spool = Spool::open(&path, opts()).expect("reopen");
        assert_eq!(
            spool.plan("a", HOUR_MS + 6_000).expect("plan"),
            Plan::Wait(Some(2 * HOUR_MS + 5_000)),
            "the wait counts from the commit, not from the restart"
        );
        spool
            .commit(&flush_at(vec![row("s.t", 120, 3.0)], HOUR_MS + 7_000))
            .expect("another late commit");
        let Plan::Ready(plan) = spool.plan("a", 2 * HOUR_MS + 5_000).expect("plan") else {
            panic!("the late part is due");
        };
        assert_eq!((plan.part, plan.rows), (1, 2));
        plan
    }; // killed between planning and delivering
    let mut spool = Spool::open(&path, opts()).expect("reopen");
    spool
        .commit(&flush_at(vec![row("s.t", 180, 4.0)], 2 * HOUR_MS + 9_000))
        .expect("a late row after the plan");
    let Plan::Ready(again) = spool.plan("a", 2 * HOUR_MS + 10_000).expect("plan") else {
        panic!("the planned part is still due");
    };
    assert_eq!(again, first, "the same rows under the same part");
    let mut reader = SpoolReader::open(&path).expect("reader");
    let rows: Vec<f64> = reader
        .read_part(&again, false)
        .expect("read")
        .rows
        .iter()
        .map(|r| r.stats.mean)
        .collect();
    assert_eq!(rows, [2.0, 3.0]);
    spool
        .delivered(&again, 2 * HOUR_MS + 10_000)
        .expect("deliver");
    assert_eq!(
        spool.plan("a", 2 * HOUR_MS + 10_000).expect("plan"),
        Plan::Wait(Some(3 * HOUR_MS + 9_000)),
        "the row after the plan waits for a part of its own"
    );
}

#[test]
fn the_rest_of_a_partition_cut_by_the_part_size_is_no_late_row_and_goes_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut opts = late_options(HOUR_MS, 10_000);
    // Parts of at most 10 KiB of records: about two flushes of 60 windows.
    opts.budget_bytes = 160 * 1024;
    let mut spool = Spool::open(&path, opts).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    for flush_no in 0..10 {
        let rows = (0..60)
            .map(|m| {
                wide_row(
                    &format!("s.{m}"),
                    60 * flush_no,
                    (flush_no * 100 + m) as f64,
                )
            })
            .collect();
        spool
            .commit(&flush_at(rows, 60_000 * (flush_no + 1)))
            .expect("commit");
    }
    let parts = drain(&mut spool, &mut reader, "a", HOUR_MS);
    assert!(
        parts.len() > 2,
        "the partition was cut: {} parts",
        parts.len()
    );
    assert_eq!(
        parts.iter().map(|(_, _, v)| v.len()).sum::<usize>(),
        600,
        "every row went, none waited for the late grace"
    );
}

#[test]
fn the_budget_drops_waiting_late_rows_oldest_first_and_they_never_go_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut opts = late_options(1000 * HOUR_MS, 10_000);
    opts.budget_bytes = 128 * 1024;
    let mut spool = Spool::open(&path, opts).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush_at(vec![wide_row("s.t", 0, -1.0)], 60_000))
        .expect("commit");
    assert_eq!(drain(&mut spool, &mut reader, "a", HOUR_MS).len(), 1);
    spool
        .commit(&flush_at(vec![wide_row("s.t", 60, -2.0)], HOUR_MS + 1000))
        .expect("a late row");
    assert_eq!(late_waiting(&reader).0, 1);
    // The sink goes down for a long outage: nothing more is planned.
    for hour in 1..100 {
        let rows = (0..60)
            .map(|m| wide_row(&format!("s.{}", m % 10), hour * 3600 + m * 60, m as f64))
            .collect();
        spool
            .commit(&flush_at(rows, hour * HOUR_MS + 1000))
            .expect("commit");
    }
    assert!(spool.used_bytes().expect("used") <= 128 * 1024);
    let dropped = reader.counters().expect("counters")["rows.dropped"];
    assert!(dropped > 0);
    assert_eq!(
        late_waiting(&reader),
        (0, None),
        "the oldest windows went first"
    );
    let held = reader.totals().expect("totals").0;
    assert_eq!(dropped as i64 + held, 99 * 60 + 1);
    let parts = drain(&mut spool, &mut reader, "a", i64::MAX / 4);
    assert!(
        parts.iter().all(|(partition, _, _)| *partition > 0),
        "nothing more of hour 0: {:?}",
        parts.first()
    );
    assert_eq!(
        parts.iter().map(|(_, _, v)| v.len() as i64).sum::<i64>(),
        held,
        "the rest arrives, once"
    );
}

#[test]
fn late_rows_committed_before_the_clock_went_back_do_not_wait_for_it_to_catch_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, late_options(HOUR_MS, 10_000)).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush_at(vec![row("s.t", 0, 1.0)], 60_000))
        .expect("commit");
    assert_eq!(drain(&mut spool, &mut reader, "a", HOUR_MS).len(), 1);
    spool
        .commit(&flush_at(vec![row("s.t", 60, 2.0)], 5 * HOUR_MS))
        .expect("a late row, stamped by a clock running hours ahead");
    assert_eq!(
        drain(&mut spool, &mut reader, "a", HOUR_MS + 1000),
        vec![(0, 1, vec![2.0])],
        "the clock went back: the row goes at once"
    );
}

/// The test options with sinks "db" (each flush) and "archive" (closed partitions).
fn each_flush_options() -> SpoolOptions {
    let mut opts = options(&["db", "archive"]);
    opts.each_flush.insert("db".to_owned());
    opts
}

fn ready(spool: &mut Spool, sink: &str, now_ms: i64) -> PartPlan {
    match spool.plan(sink, now_ms).expect("plan") {
        Plan::Ready(plan) => plan,
        other => panic!("a part for {sink} at {now_ms}: {other:?}"),
    }
}

fn means(reader: &mut SpoolReader, plan: &PartPlan) -> Vec<f64> {
    let rows = reader.read_part(plan, false).expect("read").rows;
    rows.iter().map(|r| r.stats.mean).collect()
}

fn parts_of(spool: &Spool, sink: &str) -> Vec<(i64, u32)> {
    let mut stmt = spool
        .conn
        .prepare("SELECT partition, part FROM parts WHERE sink = ?1 ORDER BY partition, part")
        .expect("prepare");
    stmt.query_map([sink], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[test]
fn an_each_flush_sink_gets_the_open_partition_per_flush_and_a_crash_sends_the_same_part() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, each_flush_options()).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush_at(
            vec![row("s.t", 0, 1.0), row("s.t", 60, 2.0)],
            121_000,
        ))
        .expect("commit");
    let first = ready(&mut spool, "db", 121_000);
    assert_eq!((first.partition, first.part, first.rows), (0, 0, 2));
    assert_eq!(means(&mut reader, &first), [1.0, 2.0]);
    assert_eq!(
        spool.plan("archive", 121_000).expect("plan"),
        Plan::Wait(Some(HOUR_MS)),
        "the archive waits for the hour to close"
    );
    spool.delivered(&first, 121_500).expect("deliver");
    assert_eq!(
        spool.plan("db", 121_500).expect("plan"),
        Plan::Wait(None),
        "nothing new: the sink waits for the next flush"
    );

    // The next flush's row is the next part; the agent dies before recording it.
    spool
        .commit(&flush_at(vec![row("s.t", 120, 3.0)], 181_000))
        .expect("commit");
    let second = ready(&mut spool, "db", 181_000);
    assert_eq!(
        (second.part, second.after_id, second.rows),
        (1, first.last_id, 1)
    );
    drop(spool);
    let mut spool = Spool::open(&path, each_flush_options()).expect("reopen");
    spool
        .commit(&flush_at(vec![row("s.t", 180, 4.0)], 241_000))
        .expect("a flush after the restart");
    let again = ready(&mut spool, "db", 241_000);
    assert_eq!(
        again, second,
        "the same part, the same rows: the sink's key says loaded"
    );
    assert_eq!(means(&mut reader, &again), [3.0]);
    spool.delivered(&again, 241_500).expect("deliver");
    let third = ready(&mut spool, "db", 241_500);
    assert_eq!((third.part, means(&mut reader, &third)), (2, vec![4.0]));
    spool.delivered(&third, 241_600).expect("deliver");
    assert_eq!(
        reader.totals().expect("totals").0,
        4,
        "the archive has none of them yet: every row is kept"
    );

    // The hour closes: the archive gets it whole, in one part.
    assert_eq!(
        drain(&mut spool, &mut reader, "archive", HOUR_MS),
        vec![(0, 0, vec![1.0, 2.0, 3.0, 4.0])]
    );
    assert_eq!(
        reader.totals().expect("totals").0,
        0,
        "both sinks have them"
    );
    // A late row of hour 0: a part for each sink, the database's at once.
    spool
        .commit(&flush_at(vec![row("s.t", 240, 5.0)], HOUR_MS + 100_000))
        .expect("late commit");
    assert_eq!(
        drain(&mut spool, &mut reader, "db", HOUR_MS + 100_000),
        vec![(0, 3, vec![5.0])]
    );
    assert_eq!(
        drain(&mut spool, &mut reader, "archive", HOUR_MS + 100_000),
        vec![(0, 1, vec![5.0])]
    );
    // Delivered parts between a partition's first and last are pruned; status counts them.
    assert_eq!(parts_of(&spool, "db"), [(0, 0), (0, 3)]);
    let db = reader
        .sinks()
        .expect("sinks")
        .into_iter()
        .find(|s| s.name == "db")
        .expect("db");
    assert_eq!((db.delivered_parts, db.pending_rows), (4, 0));
}

#[test]
fn a_backlog_goes_as_one_part_per_partition_not_one_per_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, each_flush_options()).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    // The database is down for two hours and a half: nothing is planned meanwhile.
    for minute in 0..150 {
        spool
            .commit(&flush_at(
                vec![row("s.t", minute * 60, minute as f64)],
                (minute * 60 + 61) * 1000,
            ))
            .expect("commit");
    }
    let parts: Vec<(i64, u32, usize)> = drain(&mut spool, &mut reader, "db", 9_061_000)
        .into_iter()
        .map(|(partition, part, values)| (partition, part, values.len()))
        .collect();
    assert_eq!(
        parts,
        [(0, 0, 60), (3600, 0, 60), (7200, 0, 30)],
        "two closed hours whole, and the open one's rows so far"
    );
    spool
        .commit(&flush_at(vec![row("s.t", 9000, 150.0)], 9_061_000))
        .expect("commit");
    assert_eq!(
        drain(&mut spool, &mut reader, "db", 9_061_000),
        vec![(7200, 1, vec![150.0])],
        "then each flush"
    );
}

#[test]
fn a_part_read_in_chunks_keeps_each_window_start_whole_with_its_late_rows_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    // Three flushes (batches) of one part: start 0, start 60, then a late row of start 0
    // (a series only it brings) with one of start 120.
    spool
        .commit(&flush(vec![row("s.b", 0, 1.0), row("s.a", 0, 2.0)]))
        .expect("commit");
    spool
        .commit(&flush(vec![row("s.a", 60, 3.0), row("s.b", 60, 4.0)]))
        .expect("commit");
    spool
        .commit(&flush(vec![row("s.c", 0, 5.0), row("s.a", 120, 6.0)]))
        .expect("commit");
    let Plan::Ready(plan) = spool.plan("a", i64::MAX / 4).expect("plan") else {
        panic!("hour 0 is ready");
    };
    let key = |r: &WindowRow| (r.start, r.series.name.clone(), r.stats.mean);
    let whole: Vec<_> = reader
        .read_part(&plan, true)
        .expect("read")
        .rows
        .iter()
        .map(key)
        .collect();
    let chunked = |reader: &mut SpoolReader, chunk_rows| {
        let reading = reader.begin_part(&plan, true, chunk_rows).expect("begin");
        let chunks: Vec<Vec<_>> = (0..reading.chunks())
            .map(|i| {
                let rows = reader.read_chunk(&reading, i).expect("chunk");
                assert_eq!(rows.capacity(), rows.len(), "room for its rows alone");
                let a = rows.iter().find(|r| r.series.name == "s.a").expect("s.a");
                assert!(Arc::ptr_eq(
                    &a.series,
                    &Series::new("s.a", Some("celsius")).shared()
                ));
                rows.iter().map(key).collect()
            })
            .collect();
        reader.end_part();
        let wide: Vec<String> = reading
            .wide_series()
            .iter()
            .map(|s| s.name.clone())
            .collect();
        (reading.rows(), chunks, wide)
    };
    let (rows, chunks, wide) = chunked(&mut reader, 3);
    assert_eq!(rows, 6);
    assert_eq!(
        chunks,
        [
            vec![
                (0, "s.a".to_owned(), 2.0),
                (0, "s.b".to_owned(), 1.0),
                (0, "s.c".to_owned(), 5.0),
            ],
            vec![
                (60, "s.a".to_owned(), 3.0),
                (60, "s.b".to_owned(), 4.0),
                (120, "s.a".to_owned(), 6.0),
            ],
        ],
        "whole window starts per chunk, the late row of start 0 with its start"
    );
    assert_eq!(
        wide,
        ["s.a", "s.b", "s.c"],
        "the wide columns include the series only a late row brings"
    );
    assert_eq!(chunks.concat(), whole, "the order of the whole part");
    let (_, small, _) = chunked(&mut reader, 1);
    assert_eq!(
        small.iter().map(Vec::len).collect::<Vec<_>>(),
        [3, 2, 1],
        "a start with more rows than a chunk is one chunk, never split"
    );
    assert_eq!(small.concat(), whole);
    assert_eq!(
        chunked(&mut reader, 3).1,
        chunks,
        "a retry reads the same chunks"
    );
}

#[test]
fn a_part_whose_rows_go_while_it_is_read_in_chunks_fails_rather_than_comes_short() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    let mut reader = SpoolReader::open(&path).expect("reader");
    spool
        .commit(&flush(vec![row("s.a", 0, 1.0)]))
        .expect("commit");
    spool
        .commit(&flush(vec![row("s.a", 60, 2.0)]))
        .expect("commit");
    let Plan::Ready(plan) = spool.plan("a", i64::MAX / 4).expect("plan") else {
        panic!("hour 0 is ready");
    };
    let reading = reader.begin_part(&plan, false, 1).expect("begin");
    assert_eq!(reading.chunks(), 2);
    let first = reader.read_chunk(&reading, 0).expect("chunk 0");
    assert_eq!(first.len(), 1);
    // The rows are deleted while the reader is half-way (as the disk budget deletes a
    // part's rows); the writer commits meanwhile, with no reader holding the WAL.
    spool.delivered(&plan, 0).expect("deliver");
    spool
        .commit(&flush(vec![row("s.a", 3600, 3.0)]))
        .expect("commit");
    let err = reader
        .read_chunk(&reading, 1)
        .expect_err("the second batch is gone");
    reader.end_part();
    assert!(
        err.to_string().ends_with(
            "is unreadable: deleted while its part was read (the disk budget dropped it)"
        ),
        "{err}"
    );
}

/// A minute of 60 readings of series `i`: steady for even `i` (a fan, a voltage), varying
/// in the third decimal for odd `i` (a temperature), as the aggregator gives them.
fn minute_of(i: i64, minute: i64) -> Stats {
    let values: Vec<f64> = (0..60)
        .map(|s| {
            let wobble = if i % 2 == 0 {
                0
            } else {
                (minute * 61 + s * 7919 + i) % 97 - 48
            };
            (20_000 + i * 37 + wobble) as f64 * 0.001
        })
        .collect();
    let n = values.len() as f64;
    let steady = values.iter().all(|v| *v == values[0]);
    let mean = if steady {
        values[0]
    } else {
        values.iter().sum::<f64>() / n
    };
    let m2: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    let start_ms = minute * 60_000;
    Stats {
        count: 60,
        min: sorted[0],
        max: sorted[59],
        mean,
        mean_rest: 0.0,
        stdev: Some(if steady { 0.0 } else { (m2 / (n - 1.0)).sqrt() }),
        median: (sorted[29] + sorted[30]) / 2.0,
        first: values[0],
        first_ms: start_ms + 120,
        last: values[59],
        last_ms: start_ms + 59_120,
    }
}

#[test]
fn a_flush_of_100_windows_appends_about_8_pages_to_the_wal() {
    // The spool's disk writes per flush (docs/benchmarks.md): each WAL frame is a page
    // of the database that the flush's transaction touched. Version 2 records of these
    // windows took 13 frames a flush (7 KB of record); version 3 records take 8 (3 KB).
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    let wal = dir.path().join("spool.db-wal");
    let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let series: Vec<Arc<Series>> = (0..100)
        .map(|i| Arc::new(Series::new(format!("hw.t{i}"), Some("celsius"))))
        .collect();
    let mut frames = Vec::new();
    for minute in 0..40 {
        let rows = series
            .iter()
            .enumerate()
            .map(|(i, s)| WindowRow {
                series: Arc::clone(s),
                start: minute * 60,
                seconds: 60,
                stats: minute_of(i as i64, minute),
            })
            .collect();
        let mut f = flush_at(rows, (minute * 60 + 61) * 1000);
        f.aggregate.samples = 6000;
        let before = wal_len();
        spool.commit(&f).expect("commit");
        let after = wal_len();
        assert!(
            after > before,
            "no checkpoint in this test (flush {minute})"
        );
        frames.push((after - before) / (u64::from(schema::PAGE_SIZE) + 24));
    }
    // The first flushes register the series and grow the B-trees.
    let steady = &frames[5..];
    let most = steady.iter().max().copied().unwrap_or(0);
    let total: u64 = steady.iter().sum();
    assert!(
        most <= 10 && 2 * total <= 17 * steady.len() as u64,
        "WAL frames per flush: {steady:?}"
    );
}

/// The (partition, part, rows) of a batch.
fn batch_parts(batch: &Batch) -> Vec<(i64, u32, i64)> {
    match batch {
        Batch::Ready(plans) => plans
            .iter()
            .map(|p| (p.partition, p.part, p.rows))
            .collect(),
        Batch::Wait(_) => Vec::new(),
    }
}

#[test]
fn a_backlog_is_planned_in_batches_of_whole_parts_bounded_by_rows_and_sent_again_after_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let now = i64::MAX / 4;
    let first = {
        let mut spool = Spool::open(&path, options(&["pg"])).expect("open");
        // Five hourly partitions of two windows each, in one flush.
        let rows = (0..5)
            .flat_map(|h| {
                [
                    row("s.t", h * 3600, h as f64),
                    row("s.t", h * 3600 + 60, 0.5),
                ]
            })
            .collect();
        spool.commit(&flush(rows)).expect("commit");
        let first = spool.plan_batch("pg", now, 16, 5).expect("plan");
        assert_eq!(batch_parts(&first), [(0, 0, 2), (3600, 0, 2)]);
        first
    }; // dropped without `delivered_all`: the crash
    let mut spool = Spool::open(&path, options(&["pg"])).expect("reopen");
    let reader = SpoolReader::open(&path).expect("reader");
    let again = spool.plan_batch("pg", now, 16, 5).expect("plan");
    assert_eq!(again, first, "the same parts, the same rows");
    let Batch::Ready(plans) = again else {
        panic!("ready");
    };
    spool.delivered_all(&plans, now).expect("delivered");
    assert_eq!(reader.totals().expect("totals").0, 6, "their rows deleted");
    // A part larger than the bound still goes, alone; at most `max_parts` parts.
    let one = spool.plan_batch("pg", now, 16, 1).expect("plan");
    assert_eq!(batch_parts(&one), [(7200, 0, 2)]);
    let Batch::Ready(plans) = one else {
        panic!("ready");
    };
    spool.delivered_all(&plans, now).expect("delivered");
    let two = spool.plan_batch("pg", now, 2, 100).expect("plan");
    assert_eq!(batch_parts(&two), [(10800, 0, 2), (14400, 0, 2)]);
    let Batch::Ready(plans) = two else {
        panic!("ready");
    };
    spool.delivered_all(&plans, now).expect("delivered");
    assert_eq!(
        spool.plan_batch("pg", now, 16, 100).expect("plan"),
        Batch::Wait(None)
    );
    assert_eq!(reader.totals().expect("totals").0, 0);
    // A late row of a partition delivered: its part 1 goes, one part per partition.
    spool
        .commit(&flush(vec![
            row("s.t", 120, 9.0),
            row("s.t", 3600 + 120, 9.0),
        ]))
        .expect("late rows");
    assert_eq!(
        batch_parts(&spool.plan_batch("pg", now, 16, 100).expect("plan")),
        [(0, 1, 1), (3600, 1, 1)]
    );
}

/// Frames in the WAL of `path` (1 KiB pages, a 24-byte header each, after its own 32).
fn wal_frames(path: &Path) -> u64 {
    let wal = std::fs::metadata(format!("{}-wal", path.display())).map_or(0, |m| m.len());
    wal.saturating_sub(32) / (PAGE_BYTES + 24)
}

const PAGE_BYTES: u64 = 1024;

#[test]
fn a_flush_writes_the_wal_index_to_dev_shm_and_few_frames_to_the_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path, options(&["a"])).expect("open");
    let series: Vec<String> = (0..100).map(|i| format!("hw.t{i}")).collect();
    let minute = |spool: &mut Spool, m: i64| {
        let rows = series
            .iter()
            .map(|s| row(s, m * 60, 40.0 + m as f64))
            .collect();
        let mut f = flush(rows);
        f.aggregate.samples = 6000;
        f.now_ms = (m + 1) * 60_000;
        spool.commit(&f).expect("commit");
    };
    // The first flush registers the series; then steady flushes of 100 windows.
    minute(&mut spool, 0);
    let before = wal_frames(&path);
    for m in 1..=20 {
        minute(&mut spool, m);
    }
    let per_flush = (wal_frames(&path) - before) as f64 / 20.0;
    eprintln!("WAL frames per flush of 100 windows: {per_flush}");
    // Page 1, `meta` (the state, next_id and the counters), the `batches` interior page,
    // `partitions`, the record's overflow page and its new leaf: 6 (5.65 measured).
    assert!(
        per_flush <= 6.0,
        "WAL frames per flush of 100 windows: {per_flush}"
    );
    let index = index_path(spool.file);
    assert!(
        std::fs::metadata(&index).is_ok_and(|m| m.len() >= 32 * 1024),
        "the WAL index is in /dev/shm ({}): this build's SQLite has SQLITE_SHM_DIRECTORY",
        index.display()
    );
    assert_eq!(
        std::fs::metadata(guard_path(&path)).map(|m| m.len()).ok(),
        Some(0),
        "nothing of the index beside the spool, only the empty guard"
    );
    drop(spool);
    assert!(
        !index.exists(),
        "a clean close removes the index from /dev/shm"
    );
}

#[test]
fn a_spool_whose_index_name_holds_a_link_another_user_could_plant_is_not_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.db");
    std::fs::write(&path, b"").expect("an empty spool");
    let index = index_path(FileId::of_path(&path).expect("stat").expect("there"));
    // An index left at this name by a killed test whose spool had this inode before.
    let _ = std::fs::remove_file(&index);
    std::os::unix::fs::symlink(dir.path().join("theirs"), &index).expect("plant");
    let opened = Spool::open(&path, options(&["a"]));
    let _ = std::fs::remove_file(&index);
    let Err(err) = opened else {
        panic!("opened through a planted link");
    };
    assert!(matches!(err, SpoolError::IndexNotOurs { .. }), "{err}");
}

#[tokio::test]
async fn the_work_count_follows_commits_and_recorded_deliveries() {
    use crate::flow::Commit;
    let dir = tempfile::tempdir().expect("temp dir");
    let spool = Spool::open(&dir.path().join("spool.db"), options(&["a"])).expect("a fresh spool");
    let (handle, thread) = SpoolHandle::spawn(spool);
    let (commits, work) = (handle.commits(), handle.work());
    let committed = handle.commit(flush(vec![row("t", 0, 1.0)])).await;
    assert!(committed.is_ok(), "commit");
    assert_eq!((*commits.borrow(), *work.borrow()), (1, 1), "a commit");
    let Plan::Ready(plan) = handle.plan("a", 7_200_000).await.expect("plan") else {
        panic!("the hour is over: its part is ready");
    };
    assert_eq!(*work.borrow(), 1, "planning is no work");
    handle.delivered(&plan, 7_200_000).await.expect("deliver");
    assert_eq!(
        (*commits.borrow(), *work.borrow()),
        (1, 2),
        "a delivery recorded is work, not a commit of a flush"
    );
    drop(handle);
    thread.join();
}
