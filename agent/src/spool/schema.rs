//! The file: its schema and migrations, opening it (application id, version, integrity
//! check, pragmas, migrating), and moving a corrupt one aside.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use crate::config::WhenFull;
use crate::flow::LiveState;

use super::budget::{checkpoint_pages, wal_limit_bytes};
use super::{
    AgentState, CACHE_KIB, FileId, IndexGuard, SourceState, Spool, SpoolError, SpoolLock,
    SpoolOptions, sqlite,
};

/// Identifies our files (`PRAGMA application_id`, "ESP1").
pub(super) const APPLICATION_ID: i32 = 0x4553_5031;

/// Small pages: fewer bytes rewritten around each flush's few KiB of new data.
pub(super) const PAGE_SIZE: u32 = 1024;

/// Schema migrations, applied in order; `user_version` counts those applied.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE series (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    unit TEXT,
    tags TEXT NOT NULL,
    UNIQUE (name, tags)
);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    partition INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE TABLE partitions (
    partition INTEGER PRIMARY KEY,
    seconds INTEGER NOT NULL,
    max_id INTEGER NOT NULL,
    rows INTEGER NOT NULL
);
CREATE TABLE sinks (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    active INTEGER NOT NULL,
    last_success_ms INTEGER,
    last_error TEXT,
    last_error_ms INTEGER,
    retrying_since_ms INTEGER,
    next_attempt_ms INTEGER
);
CREATE TABLE parts (
    sink TEXT NOT NULL,
    partition INTEGER NOT NULL,
    part INTEGER NOT NULL,
    after_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    planned_ms INTEGER NOT NULL,
    delivered_ms INTEGER,
    PRIMARY KEY (sink, partition, part)
) WITHOUT ROWID;
"#,
    r#"
ALTER TABLE series ADD COLUMN first_partition INTEGER;
ALTER TABLE series ADD COLUMN first_id INTEGER;
"#,
    r#"
ALTER TABLE parts ADD COLUMN dropped_ms INTEGER;
"#,
    // Each series' newest committed device timestamp (see `marks` in mod.rs).
    r#"
CREATE TABLE marks (series INTEGER PRIMARY KEY, device_ms INTEGER NOT NULL);
"#,
    // Late rows wait for their sink's grace (see `LateParts`); wide columns fixed per partition.
    r#"
ALTER TABLE batches ADD COLUMN committed_ms INTEGER;
ALTER TABLE parts ADD COLUMN seen_id INTEGER;
ALTER TABLE parts ADD COLUMN series_upto INTEGER;
ALTER TABLE sinks ADD COLUMN late_grace_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sinks ADD COLUMN late_max_rows INTEGER NOT NULL DEFAULT 0;
"#,
    // The counters as one JSON row of `meta` beside the agent's state and `next_id`, so
    // that a flush rewrites one page for the three (a table of their own was a page
    // more a commit); `counters` stays, as a view, for readers.
    r#"
INSERT OR REPLACE INTO meta (key, value)
    SELECT 'counters', json_group_object(name, value) FROM counters;
DROP TABLE counters;
CREATE VIEW counters (name, value) AS
    SELECT key, value FROM json_each((SELECT value FROM meta WHERE key = 'counters'));
"#,
];

/// A corrupt spool found at start and moved aside, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// When, Unix ms.
    pub at_ms: i64,
    /// Where the damaged file went (kept for forensics).
    pub moved_to: PathBuf,
    /// What was wrong.
    pub reason: String,
}

impl Spool {
    /// Takes the spool's lock ([`SpoolLock`]), then opens (creating or migrating) the
    /// spool and registers the configured sinks. A corrupt file is moved aside (with its
    /// WAL), kept for forensics, and a fresh spool started in its place; `status` shows
    /// the event from then on. A spool another process holds is refused
    /// ([`SpoolError::InUse`]) before anything is opened, migrated or moved.
    pub fn open(path: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        let lock = SpoolLock::take(path)?;
        let guard = IndexGuard::take(path)?;
        let (conn, recovery) = match open_file(path, &options) {
            Err(SpoolError::Corrupt { reason, .. }) => {
                let moved_to = move_aside(path, "corrupt", crate::clock::now_ms())?;
                tracing::error!(
                    spool = %path.display(),
                    moved_to = %moved_to.display(),
                    reason = %reason,
                    "the spool is corrupt: moved aside, starting a fresh one (windows it held are in the moved file)"
                );
                let conn = open_file(path, &options)?;
                let recovery = Recovery {
                    at_ms: crate::clock::now_ms(),
                    moved_to,
                    reason,
                };
                (conn, Some(recovery))
            }
            other => (other?, None),
        };
        let mut spool = Spool::new(conn, path, options, lock, guard)?;
        if let Some(recovery) = recovery {
            spool.set_meta("recovered", &recovery)?;
        }
        spool.fit_at_open()?;
        Ok(spool)
    }

    fn new(
        conn: Connection,
        path: &Path,
        options: SpoolOptions,
        lock: SpoolLock,
        guard: IndexGuard,
    ) -> Result<Spool, SpoolError> {
        let next_id = next_id(&conn).map_err(sqlite(path))?;
        // Unknown (it vanished this instant): the next flush finds the path changed.
        let file = FileId::of_path(path).ok().flatten().unwrap_or_default();
        let spool = Spool {
            conn,
            path: path.to_owned(),
            file,
            lock,
            guard,
            state: new_state(&options),
            options,
            series_ids: HashMap::new(),
            next_id,
        };
        spool.write_state()?;
        Ok(spool)
    }

    /// Writes `meta(key)` as JSON.
    pub(super) fn set_meta(&self, key: &str, value: &impl Serialize) -> Result<(), SpoolError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = ?2",
                [key, &serde_json::to_string(value).unwrap_or_default()],
            )
            .map_err(self.err())?;
        Ok(())
    }
}

/// The id the next window gets: past every id issued, stored or not.
pub(super) fn next_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT MAX(COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'next_id'), 1),
                    COALESCE((SELECT MAX(id) + 1 FROM batches), 1))",
        [],
        |r| r.get(0),
    )
}

/// Opens the file: checks (application id, version, integrity), pragmas, migrations,
/// the configured sinks.
pub(super) fn open_file(path: &Path, options: &SpoolOptions) -> Result<Connection, SpoolError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Durably: SQLite syncs the spool's folder when it creates the WAL, but not
        // the folders above it, which hold the spool folder's own entry.
        crate::durable::create_dir_all(dir).map_err(|source| SpoolError::Folder {
            path: dir.to_owned(),
            source,
        })?;
    }
    super::check_index(path)?;
    let err = |source: rusqlite::Error| corrupt_or(path, source);
    let conn = Connection::open(path).map_err(&err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(&err)?;
    let found: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(&err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(&err)?;
    if found != APPLICATION_ID && (found != 0 || version != 0) {
        return Err(SpoolError::Foreign {
            path: path.to_owned(),
            found,
        });
    }
    if version as usize > MIGRATIONS.len() {
        return Err(SpoolError::TooNew {
            path: path.to_owned(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    if version == 0 {
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(&err)?;
    } else {
        // Every page once (a few seconds for a spool of hundreds of MB on an SD card):
        // damage found now is moved aside instead of failing a flush later.
        let verdict: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(&err)?;
        if verdict != "ok" {
            return Err(SpoolError::Corrupt {
                path: path.to_owned(),
                reason: format!("integrity check: {verdict}"),
            });
        }
    }
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(&err)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)
        .map_err(&err)?;
    // The WAL's share of the disk bound (see budget.rs): checkpoint after this many
    // pages, and cut a WAL that outgrew it back to it once checkpointed.
    let checkpoint = checkpoint_pages(options.budget_bytes);
    conn.pragma_update(None, "wal_autocheckpoint", checkpoint as i64)
        .map_err(&err)?;
    conn.pragma_update(
        None,
        "journal_size_limit",
        wal_limit_bytes(checkpoint) as i64,
    )
    .map_err(&err)?;
    let mut conn = conn;
    let tx = conn.transaction().map_err(&err)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql).map_err(&err)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(&err)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(&err)?;
    tx.execute("UPDATE sinks SET active = 0", [])
        .map_err(&err)?;
    for (name, kind) in &options.sinks {
        let late = options.late_parts(name);
        tx.execute(
            "INSERT INTO sinks (name, kind, active, late_grace_ms, late_max_rows)
             VALUES (?1, ?2, 1, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET kind = ?2, active = 1, late_grace_ms = ?3,
               late_max_rows = ?4",
            params![name, kind, late.grace_ms, late.max_rows],
        )
        .map_err(&err)?;
    }
    tx.commit().map_err(&err)?;
    Ok(conn)
}

/// The agent's state as it starts.
fn new_state(options: &SpoolOptions) -> AgentState {
    let now = crate::clock::now_ms();
    AgentState {
        device: options.device.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        started_ms: now,
        heartbeat_ms: now,
        stopped: false,
        window_seconds: options.window_seconds,
        partition_seconds: options.partition_seconds,
        grace_ms: options.grace_ms,
        budget_bytes: options.budget_bytes,
        when_full: match options.when_full {
            WhenFull::DropOldest => "drop_oldest".to_owned(),
            WhenFull::StopSampling => "stop_sampling".to_owned(),
        },
        samples_per_second: 0.0,
        series: 0,
        open_windows: 0,
        sources: options
            .sources
            .iter()
            .map(|(name, kind)| SourceState {
                name: name.clone(),
                kind: (*kind).to_owned(),
                last_problem: None,
            })
            .collect(),
        live: options
            .live
            .iter()
            .map(|(name, kind)| LiveState::new(name, kind))
            .collect(),
        clock: Default::default(),
    }
}

/// A SQLite error, or [`SpoolError::Corrupt`] when it says the file is damaged.
fn corrupt_or(path: &Path, source: rusqlite::Error) -> SpoolError {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    match source.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => SpoolError::Corrupt {
            path: path.to_owned(),
            reason: source.to_string(),
        },
        _ => SpoolError::Sqlite {
            path: path.to_owned(),
            source,
        },
    }
}

/// Renames the spool and its WAL to `NAME.WHY-MILLIS` (and `-wal`); returns the new
/// name of the spool. The lock file and `NAME-shm` (the guard, `index.rs`: edgespool's
/// index is in /dev/shm) stay.
pub(super) fn move_aside(path: &Path, why: &str, now_ms: i64) -> Result<PathBuf, SpoolError> {
    let mut moved = path.as_os_str().to_owned();
    moved.push(format!(".{why}-{now_ms}"));
    let moved = PathBuf::from(moved);
    for suffix in ["", "-wal"] {
        let with = |p: &Path| {
            let mut name = p.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        match std::fs::rename(with(path), with(&moved)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
            Err(source) => {
                return Err(SpoolError::MoveAside {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(moved)
}
