//! The disk budget: the bytes the spool's pages use, and dropping the oldest partitions
//! to stay under it (`drop_oldest`; `stop_sampling` is applied where a flush is committed,
//! in `writer.rs`).

use rusqlite::{Connection, OptionalExtension};
use tracing::warn;

use super::writer::add_counters;
use super::{Spool, SpoolError, sqlite};

impl Spool {
    /// Bytes of pages in use (the file minus its free pages).
    pub fn used_bytes(&self) -> Result<u64, SpoolError> {
        used_bytes(&self.conn).map_err(self.err())
    }

    /// Deletes the oldest partitions until the used pages fit the budget.
    pub(super) fn enforce_budget(&mut self) -> Result<(), SpoolError> {
        let budget = self.options.budget_bytes;
        let err = sqlite(&self.path);
        let mut used = self.used_bytes()?;
        while used > budget {
            let oldest: Option<(i64, i64)> = self
                .conn
                .query_row(
                    "SELECT partition, rows FROM partitions ORDER BY partition LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(&err)?;
            let Some((partition, dropped)) = oldest else {
                break;
            };
            let tx = self.conn.transaction().map_err(&err)?;
            tx.execute("DELETE FROM batches WHERE partition = ?1", [partition])
                .map_err(&err)?;
            tx.execute("DELETE FROM partitions WHERE partition = ?1", [partition])
                .map_err(&err)?;
            add_counters(&tx, &[("rows.dropped".to_owned(), dropped as u64)]).map_err(&err)?;
            tx.commit().map_err(&err)?;
            warn!(
                partition = %crate::clock::rfc3339(partition),
                rows = dropped,
                budget,
                "spool is at its disk budget: dropped the oldest partition (when_full = drop_oldest)"
            );
            used = self.used_bytes()?;
        }
        Ok(())
    }
}

pub(super) fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok((pages - free).max(0) as u64 * size.max(0) as u64)
}
