//! The spool file deleted or replaced under the running agent, found at the next flush
//! and put back from the database the writer still has open, so that nothing is lost.
//!
//! Once per flush (one `stat` of the spool and one of its lock file, never per sample)
//! the writer compares what the path names with the file it has open:
//! - *gone* (deleted, or renamed away): a stray `-wal` file at the path is removed (it
//!   is the open database's, whose every page the writer still reads through its own
//!   descriptors, or debris; a new file must not start with it);
//! - *replaced* (another file is there): that file is moved aside with its `-wal` as
//!   `NAME.replaced-MILLIS`, kept, like a corrupt one;
//!
//! then `VACUUM INTO` the path writes a fresh, consistent copy of the open database
//! (every undelivered partition, the delivery bookkeeping, counters and series), the
//! writer opens it, closes the old connection without its checkpoint-on-close (which
//! would delete `NAME-wal` by name, the new file's by then), and records the event in
//! `meta('restored')` for `status`, with an error in the log. The lock file and the
//! guard `NAME-shm` follow the same way ([`super::SpoolLock::follow`],
//! [`super::IndexGuard::follow`]); the WAL index itself is named by the file's inode
//! (`index.rs`), so the new file gets a new one.

use std::path::PathBuf;

use rusqlite::Connection;
use rusqlite::config::DbConfig;
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use super::schema::{move_aside, open_file};
use super::{AtPath, FileId, Spool, SpoolError};

/// The spool file found deleted or replaced under the running agent and rewritten from
/// the open database, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restored {
    /// When, Unix ms.
    pub at_ms: i64,
    /// What was found at the path: "deleted" (nothing) or "replaced" (another file).
    pub found: String,
    /// Where the file found at the path went, when it was replaced (kept, as found).
    pub moved_to: Option<PathBuf>,
    /// Windows the rewritten spool holds (every one not yet delivered everywhere).
    pub rows: i64,
}

impl Spool {
    /// Once per flush: checks that the lock file and the spool file are still the ones
    /// this writer holds, and puts them back if not. Only losing the lock to another
    /// process ([`SpoolError::InUse`]) is an error the caller must act on; any other
    /// failure is logged, and the writer goes on in the file it has open, trying again
    /// at the next flush.
    pub(super) fn follow(&mut self) -> Result<(), SpoolError> {
        match self.lock.follow() {
            Ok(AtPath::Same) => {}
            Ok(found) => warn!(
                lock = %self.lock.path().display(),
                found = ?found,
                "the spool's lock file was deleted or replaced: locked it again"
            ),
            Err(err @ SpoolError::InUse { .. }) => {
                error!(error = %err, "another edgespool took the spool's lock: this agent stops writing");
                return Err(err);
            }
            Err(err) => error!(error = %err, "cannot take the spool's lock again"),
        }
        if let Err(err) = self.restore() {
            error!(
                spool = %self.path.display(),
                error = %err,
                "the spool file is not the one the agent writes, and it could not be put back: windows are kept in the open file until it can"
            );
        }
        if let Err(err) = self.guard.follow() {
            error!(
                guard = %self.guard.path().display(),
                error = %err,
                "cannot guard the spool's index again: other programs' SQLite is not kept out until it can"
            );
        }
        Ok(())
    }

    /// Puts the open database back at the path if the path no longer names it.
    fn restore(&mut self) -> Result<(), SpoolError> {
        let failed = |reason: String| SpoolError::Restore {
            path: self.path.clone(),
            reason,
        };
        let found = FileId::of_path(&self.path).map_err(|e| failed(e.to_string()))?;
        let at_path = AtPath::compare(self.file, found);
        let now = crate::clock::now_ms();
        let moved_to = match at_path {
            AtPath::Same => return Ok(()),
            AtPath::Replaced => Some(move_aside(&self.path, "replaced", now)?),
            AtPath::Gone => {
                // `NAME-shm` is the guard (`index.rs`), kept or made again by `follow`.
                let mut stray = self.path.as_os_str().to_owned();
                stray.push("-wal");
                match std::fs::remove_file(&stray) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(failed(format!(
                            "cannot remove {}: {e}",
                            PathBuf::from(stray).display()
                        )));
                    }
                    _ => {}
                }
                None
            }
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::durable::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
        }
        let target = self
            .path
            .to_str()
            .ok_or_else(|| failed("the path is not UTF-8".to_owned()))?;
        self.conn
            .execute("VACUUM INTO ?1", [target])
            .map_err(self.err())?;
        let conn = open_file(&self.path, &self.options)?;
        let old = std::mem::replace(&mut self.conn, conn);
        // Closing the old connection must not checkpoint: that ends by deleting
        // `NAME-wal` by name, which is the new connection's now.
        let _ = old.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
        close(old);
        self.file = FileId::of_path(&self.path)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.next_id = self
            .next_id
            .max(super::schema::next_id(&self.conn).map_err(self.err())?);
        let rows: i64 = self
            .conn
            .query_row("SELECT COALESCE(SUM(rows), 0) FROM partitions", [], |r| {
                r.get(0)
            })
            .map_err(self.err())?;
        let restored = Restored {
            at_ms: now,
            found: match at_path {
                AtPath::Replaced => "replaced",
                _ => "deleted",
            }
            .to_owned(),
            moved_to: moved_to.clone(),
            rows,
        };
        self.set_meta("restored", &restored)?;
        self.write_state()?;
        error!(
            spool = %self.path.display(),
            found = %restored.found,
            moved_to = ?moved_to,
            rows,
            "the spool file was deleted or replaced under the running agent: rewrote it from the open database, nothing lost"
        );
        Ok(())
    }
}

fn close(conn: Connection) {
    if let Err((_, err)) = conn.close() {
        warn!(error = %err, "the old spool connection did not close cleanly");
    }
}
