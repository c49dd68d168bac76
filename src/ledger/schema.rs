//! The ledger's schema and the file's life cycle: atomic creation, the checks a ledger must
//! pass before the writer opens it, and migration from older schema versions (see the design
//! note in [`super`] for the tables and the versions).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{files, open_connection, LedgerError, LedgerIdentity, LEDGER_FILE};
use crate::clock::HOUR_SECS;

/// Version 2 added `gauges`, `distinct_values` and `run_seconds`; a version 1 ledger is
/// migrated forward at open ([`migrate`]).
pub(super) const SCHEMA_VERSION: i64 = 2;

/// A new ledger is built under this name beside the final one, then renamed.
pub(super) const NEW_LEDGER_FILE: &str = "ledger.sqlite3.new";

enum SchemaError {
    Sql(rusqlite::Error),
    Version(i64),
    Missing(&'static str),
    Product(String),
}

impl From<rusqlite::Error> for SchemaError {
    fn from(e: rusqlite::Error) -> Self {
        SchemaError::Sql(e)
    }
}

/// Creates a new ledger atomically: built beside the final path, then renamed into place.
/// So `ledger.sqlite3` either does not exist or holds the whole schema and its meta rows, and
/// a `ledger.sqlite3` without them can only be damage, which is refused, never re-initialised.
pub(super) fn create_ledger(
    dir: &files::PrivateDir,
    product_code: &str,
    now: i64,
) -> Result<(), LedgerError> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        LedgerError::Unavailable(format!("cannot create the ledger ({what}): {e}"))
    };
    // Leftovers of a first start that was interrupted before the rename hold nothing.
    for leftover in [NEW_LEDGER_FILE, "ledger.sqlite3.new-journal"] {
        if dir.remove(leftover)? {
            tracing::warn!(file = %dir.path().join(leftover).display(), "removed a ledger left half-created by an interrupted first start");
        }
    }
    let fresh = dir.path().join(NEW_LEDGER_FILE);
    // Created here (0600, no link followed); SQLite then opens the empty file as a new database.
    let (file, id) = dir.create(NEW_LEDGER_FILE)?;
    {
        let before = files::descriptors_on(id)?;
        let conn = open_connection(&fresh, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| LedgerError::from_sqlite(&e))?;
        files::expect_opened(&fresh, id, before)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| LedgerError::from_sqlite(&e))?;
        create_schema(&conn, product_code, now).map_err(|e| LedgerError::from_sqlite(&e))?;
    }
    // Closed only after SQLite's connection: closing a descriptor drops the POSIX locks that
    // this process holds on the file.
    file.sync_all().map_err(|e| unavailable("fsync", &e))?;
    drop(file);
    dir.rename(NEW_LEDGER_FILE, LEDGER_FILE)?;
    dir.sync()
}

/// The tables and meta rows, in one transaction.
fn create_schema(c: &Connection, product_code: &str, now: i64) -> rusqlite::Result<()> {
    c.execute_batch(
        "BEGIN;
         CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE usage (
             hour INTEGER NOT NULL, dimension TEXT NOT NULL, tags TEXT NOT NULL,
             quantity INTEGER NOT NULL CHECK (quantity >= 0),
             PRIMARY KEY (hour, dimension, tags)) WITHOUT ROWID;
         CREATE TABLE event_ids (id TEXT PRIMARY KEY, accepted_at INTEGER NOT NULL) WITHOUT ROWID;
         CREATE INDEX event_ids_by_age ON event_ids (accepted_at);
         CREATE TABLE sealed_hours (hour INTEGER PRIMARY KEY, sealed_at INTEGER NOT NULL);
         CREATE TABLE records (
             hour INTEGER NOT NULL, dimension TEXT NOT NULL,
             quantity INTEGER NOT NULL CHECK (quantity BETWEEN 0 AND 2147483647),
             allocations TEXT, timestamp INTEGER NOT NULL, client_token TEXT NOT NULL,
             state TEXT NOT NULL CHECK (state IN ('pending','sent','dead','duplicate')),
             attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
             metering_record_id TEXT, sealed_at INTEGER NOT NULL, sent_at INTEGER,
             updated_at INTEGER NOT NULL,
             PRIMARY KEY (hour, dimension)) WITHOUT ROWID;
         CREATE INDEX records_pending ON records (state, hour);",
    )?;
    c.execute_batch(V2_TABLES)?;
    let instance_id = {
        use rand::RngCore;
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        hex::encode(bytes)
    };
    let inserted = (|| {
        let mut insert = c.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
        insert.execute(["schema_version", &SCHEMA_VERSION.to_string()])?;
        insert.execute(["instance_id", &instance_id])?;
        insert.execute(["first_start", &now.to_string()])?;
        insert.execute(["product_code", product_code])?;
        c.execute_batch("COMMIT")
    })();
    if inserted.is_err() {
        let _ = c.execute_batch("ROLLBACK");
    }
    inserted
}

/// The tables that schema version 2 added, created idempotently (`IF NOT EXISTS`): by a new
/// ledger's schema and by the migration of a version 1 ledger.
const V2_TABLES: &str = "
    CREATE TABLE IF NOT EXISTS gauges (
        hour INTEGER NOT NULL, dimension TEXT NOT NULL,
        aggregation TEXT NOT NULL CHECK (aggregation IN ('max','last')), tags TEXT NOT NULL,
        value INTEGER NOT NULL CHECK (value BETWEEN 0 AND 2147483647), seq INTEGER NOT NULL,
        PRIMARY KEY (hour, dimension, aggregation, tags)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS distinct_values (
        hour INTEGER NOT NULL, dimension TEXT NOT NULL, value TEXT NOT NULL, tags TEXT NOT NULL,
        PRIMARY KEY (hour, dimension, value)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS run_seconds (
        hour INTEGER PRIMARY KEY, seconds INTEGER NOT NULL CHECK (seconds BETWEEN 0 AND 3600));";

/// Brings a ledger of schema version `from` to [`SCHEMA_VERSION`] in one transaction: either
/// the new tables and the new version are both there, or neither (a crash mid-way leaves a
/// version 1 ledger, migrated again at the next open).
pub(super) fn migrate(c: &Connection, from: i64) -> rusqlite::Result<()> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    let migrated = (|| {
        if from < 2 {
            c.execute_batch(V2_TABLES)?;
        }
        c.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
            [SCHEMA_VERSION.to_string()],
        )?;
        c.execute_batch("COMMIT")
    })();
    if migrated.is_err() {
        let _ = c.execute_batch("ROLLBACK");
    }
    migrated
}

/// The checks a ledger passes on a read-only connection before the writer opens it, so that
/// nothing is ever written to a damaged file: `quick_check`, the meta rows, a schema version
/// this meterd reads, the product. Returns the identity and the schema version.
pub(super) fn validate(
    check: &Connection,
    path: &Path,
    product_code: &str,
) -> Result<(LedgerIdentity, i64), LedgerError> {
    let corrupt = |e: &dyn std::fmt::Display| LedgerError::Corrupt {
        path: path.display().to_string(),
        detail: e.to_string(),
        damaged: true,
    };
    let verdict: String = check
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| corrupt(&e))?;
    if verdict != "ok" {
        return Err(corrupt(&verdict));
    }
    read_identity(check, product_code).map_err(|e| match e {
        SchemaError::Sql(e) => corrupt(&e),
        SchemaError::Version(v) => LedgerError::Corrupt {
            path: path.display().to_string(),
            detail: format!(
                "schema version {v}; this meterd reads versions 1 to {SCHEMA_VERSION} (a newer meterd wrote it: run that one, or a newer one)"
            ),
            damaged: false,
        },
        SchemaError::Missing(what) => corrupt(&format!("meta entry {what} is missing")),
        SchemaError::Product(found) => LedgerError::ProductMismatch {
            path: path.display().to_string(),
            found,
            expected: product_code.to_owned(),
        },
    })
}

/// The identity stored in `meta` and the schema version; a ledger without them is corrupt.
fn read_identity(c: &Connection, product_code: &str) -> Result<(LedgerIdentity, i64), SchemaError> {
    let get = |key: &'static str| -> Result<String, SchemaError> {
        c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?
            .ok_or(SchemaError::Missing(key))
    };
    let version: i64 = get("schema_version")?
        .parse()
        .map_err(|_| SchemaError::Missing("schema_version"))?;
    if !(1..=SCHEMA_VERSION).contains(&version) {
        return Err(SchemaError::Version(version));
    }
    let found = get("product_code")?;
    if found != product_code {
        return Err(SchemaError::Product(found));
    }
    let identity = LedgerIdentity {
        instance_id: get("instance_id")?,
        first_start: get("first_start")?
            .parse()
            .map_err(|_| SchemaError::Missing("first_start"))?,
        product_code: found,
    };
    Ok((identity, version))
}

/// The next receive sequence: above every sequence stored, so `last` and `max` ties keep
/// their order across restarts.
pub(super) fn load_next_seq(c: &Connection) -> rusqlite::Result<i64> {
    let last: Option<i64> = c.query_row("SELECT MAX(seq) FROM gauges", [], |r| r.get(0))?;
    Ok(last.unwrap_or(0) + 1)
}

pub(super) fn load_floor(c: &Connection) -> rusqlite::Result<i64> {
    let last: Option<i64> = c.query_row("SELECT MAX(hour) FROM sealed_hours", [], |r| r.get(0))?;
    Ok(last.map(|h| h + HOUR_SECS).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;
    use crate::ledger::{ledger_path, Ledger};

    #[tokio::test]
    async fn a_version_1_ledger_is_migrated_forward_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        ledger
            .append(vec![event("requests", 7, None)], H)
            .await
            .expect("append");
        let identity = ledger.identity().clone();
        ledger.closed().await;
        // Back to the version 1 schema: no new tables, version 1.
        let conn = Connection::open(ledger_path(dir.path())).expect("connection");
        conn.execute_batch(
            "DROP TABLE gauges; DROP TABLE distinct_values; DROP TABLE run_seconds;
             UPDATE meta SET value = '1' WHERE key = 'schema_version';",
        )
        .expect("downgrade");
        drop(conn);
        let ledger = reopen(dir.path(), H + 5).await;
        assert_eq!(ledger.identity().instance_id, identity.instance_id);
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            7
        );
        ledger
            .append(vec![unique("a", None), unique("a", None)], H + 6)
            .await
            .expect("the new tables are there");
        ledger.record_run(H, H + 60).await.expect("run");
        let version: String = ledger
            .read(|c| {
                c.query_row(
                    "SELECT value FROM meta WHERE key = 'schema_version'",
                    [],
                    |r| r.get(0),
                )
            })
            .await
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION.to_string());
        ledger.closed().await;
        // A ledger of a newer meterd is refused, untouched.
        let conn = Connection::open(ledger_path(dir.path())).expect("connection");
        conn.execute(
            "UPDATE meta SET value = '3' WHERE key = 'schema_version'",
            [],
        )
        .expect("bump");
        drop(conn);
        let err = Ledger::open(dir.path(), "prod-a", H).expect_err("newer");
        assert!(
            matches!(&err, LedgerError::Corrupt { detail, .. } if detail.contains("schema version 3")),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_ledger_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = in_private(dir.path(), LEDGER_FILE);
        std::fs::write(
            &path,
            b"this is not a database, it is a sentence of garbage bytes....",
        )
        .expect("write");
        let before = std::fs::read(&path).expect("read");
        let err = Ledger::open(dir.path(), "prod-a", H).expect_err("corrupt");
        assert!(matches!(err, LedgerError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), before);
    }

    #[test]
    fn an_empty_or_half_made_ledger_is_refused_and_a_half_created_one_is_replaced() {
        // Creation is atomic (build, then rename), so an empty ledger.sqlite3 is damage.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(in_private(dir.path(), LEDGER_FILE), b"").expect("write");
        let err = Ledger::open(dir.path(), "prod-a", H).expect_err("empty is corrupt");
        assert!(matches!(err, LedgerError::Corrupt { .. }), "{err}");
        assert_eq!(
            std::fs::read(in_private(dir.path(), LEDGER_FILE))
                .expect("read")
                .len(),
            0
        );
        // Tables without their meta rows cannot come from meterd: refused, never re-made.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = in_private(dir.path(), LEDGER_FILE);
        Connection::open(&path)
            .and_then(|c| {
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);")
            })
            .expect("half schema");
        let before = std::fs::read(&path).expect("read");
        let err = Ledger::open(dir.path(), "prod-a", H).expect_err("corrupt");
        assert!(matches!(err, LedgerError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), before);
        // A first start interrupted before the rename leaves only the side file: start anew.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(in_private(dir.path(), NEW_LEDGER_FILE), b"half written").expect("write");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("fresh ledger");
        assert_eq!(ledger.identity().first_start, H);
        assert!(!in_private(dir.path(), NEW_LEDGER_FILE).exists());
    }

    #[test]
    fn a_ledger_of_another_product_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Ledger::open(dir.path(), "prod-a", H).expect("open"));
        // The writer thread releases the lock when it ends: wait for that, not for a time.
        wait_unlocked(dir.path());
        let err = Ledger::open(dir.path(), "prod-b", H).expect_err("mismatch");
        assert!(matches!(err, LedgerError::ProductMismatch { .. }), "{err}");
    }
}
