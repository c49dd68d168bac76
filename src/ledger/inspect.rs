//! Read-only inspection for `meterd records`: the ledger of a state directory (without the
//! agent's lock, creating nothing, following no link) or a ledger file itself (a quarantined
//! one, a copy).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::queries::query_records;
use super::{files, ledger_path, open_connection, LedgerError, LEDGER_FILE};
use crate::model::StoredRecord;

/// Reads records straight from the ledger of the state directory `dir`, without the lock: for
/// `meterd records`. It finds the ledger where the agent keeps it (or where an agent of the old
/// layout left it), follows no link to it, creates nothing and may run as another user.
pub fn read_records_at(dir: &Path, limit: i64) -> Result<Vec<StoredRecord>, LedgerError> {
    read_records_filtered(dir, &RecordFilter::newest(limit))
}

/// Which records `meterd records` prints: hours in `[since, until)`, newest first, at most
/// `limit`.
#[derive(Debug, Clone, Copy)]
pub struct RecordFilter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub limit: i64,
}

impl RecordFilter {
    pub fn newest(limit: i64) -> Self {
        Self {
            since: None,
            until: None,
            limit,
        }
    }
}

/// [`read_records_at`] with a filter.
pub fn read_records_filtered(
    dir: &Path,
    filter: &RecordFilter,
) -> Result<Vec<StoredRecord>, LedgerError> {
    let at = files::PrivateDir::open_for_reading(dir)?;
    let path = at.path().join(LEDGER_FILE);
    let Some(file) = at.inspect(LEDGER_FILE)? else {
        return Err(LedgerError::Unavailable(format!(
            "no ledger at {}",
            ledger_path(dir).display()
        )));
    };
    let before = files::descriptors_on(file)?;
    let conn = open_connection(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| LedgerError::from_sqlite(&e))?;
    files::expect_opened(&path, file, before)?;
    query_filtered(&conn, filter)
}

/// Reads records from the ledger file `path` itself (a quarantined ledger, a copy), read-only:
/// for `meterd records --ledger`. The file is never written.
pub fn read_records_of_file(
    path: &Path,
    filter: &RecordFilter,
) -> Result<Vec<StoredRecord>, LedgerError> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| LedgerError::Unavailable(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(LedgerError::Unavailable(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let conn = open_connection(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| LedgerError::from_sqlite(&e))?;
    query_filtered(&conn, filter)
}

fn query_filtered(conn: &Connection, f: &RecordFilter) -> Result<Vec<StoredRecord>, LedgerError> {
    query_records(
        conn,
        "WHERE hour >= ?1 AND hour < ?2 ORDER BY hour DESC, dimension LIMIT ?3",
        [
            f.since.unwrap_or(i64::MIN),
            f.until.unwrap_or(i64::MAX),
            f.limit,
        ],
    )
    .map_err(|e| LedgerError::from_sqlite(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test]
    async fn records_are_read_where_the_agent_keeps_them_and_never_through_a_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        old_layout_ledger(dir.path()).await;
        // Not moved yet (no agent of this version ran): read in the old place.
        assert!(read_records_at(dir.path(), 10)
            .expect("old layout")
            .is_empty());
        let _ledger = sealed_first_hour(dir.path()).await;
        assert_eq!(read_records_at(dir.path(), 10).expect("records").len(), 2);

        let other = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(
            ledger_path(dir.path()),
            in_private(other.path(), LEDGER_FILE),
        )
        .expect("symlink");
        let err = read_records_at(other.path(), 10).expect_err("a link");
        assert!(matches!(err, LedgerError::Unsafe(_)), "{err}");
    }
}
