//! The durable ledger: SQLite in WAL mode with `synchronous = FULL`.
//!
//! # What is written, and when it is fsynced
//! One writer thread owns the write connection ([`writer`]). It drains every queued command,
//! applies them in one transaction and commits once: many requests share one fsync (group
//! commit). Each request is checked on its own and one that is refused changes nothing (a
//! request with ids or `unique` values writes them inside its own savepoint; a seal runs in a
//! savepoint of its own). Replies go out only after the commit returns, so an acknowledged
//! count is on disk.
//!
//! Work that needs no database (canonical tag keys, folding the events of a request without
//! an id) is done on the caller's thread before the command is queued, so the single writer
//! thread spends its time on SQL and fsync only.
//!
//! # Aggregations
//! Every event gets a receive sequence from the writer (a counter, continued after a restart
//! from the largest one stored), in the order the writer applies requests and, within one, in
//! request order. Per counter (hour, dimension, tag set) a group folds what its requests add
//! and writes it once before the commit: `sum` adds (`usage`); `max` keeps the largest value
//! and the sequence that first reached it, `last` the value with the largest sequence (one
//! upsert each into `gauges`, `WHERE excluded.value > value` / `WHERE excluded.seq > seq`).
//! `unique` values are written at once inside the request's savepoint with `INSERT OR IGNORE`
//! into `distinct_values`, whose key (hour, dimension, value) keeps the tag set of a value's
//! first occurrence; a request that would take a dimension-hour past
//! [`MAX_DISTINCT_PER_HOUR`](crate::model::MAX_DISTINCT_PER_HOUR) is refused whole ([`LedgerError::DistinctCapExceeded`]) and its
//! savepoint undoes its values and ids. An event whose id was already seen changes nothing,
//! whatever its aggregation. The hourly cap of 2147483647 applies to sums; a `max` or `last`
//! value is one quantity, and a `unique` count stays below its own bound.
//!
//! # Tables
//! - `meta(key, value)`: `schema_version`, `instance_id` (random, feeds the ClientToken),
//!   `first_start` (epoch seconds; no MeterUsage timestamp precedes it), `product_code`.
//! - `usage(hour, dimension, tags, quantity)`: per-hour `sum` counters; `tags` is the
//!   canonical JSON of the tag set (`{}` untagged).
//! - `gauges(hour, dimension, aggregation, tags, value, seq)`: per-hour `max` and `last`
//!   values per tag set, with the receive sequence that set them.
//! - `distinct_values(hour, dimension, value, tags)`: the distinct values of `unique`
//!   dimensions, each with the tag set of its first occurrence in the hour. At most
//!   [`MAX_DISTINCT_PER_HOUR`](crate::model::MAX_DISTINCT_PER_HOUR) rows per dimension-hour (each value at most 256 characters, a tag
//!   set at most 5 tags), deleted when the hour is sealed: the disk they take is bounded by the
//!   open hours, and memory holds one cached count per dimension-hour.
//! - `run_seconds(hour, seconds)`: how long the agent ran in each hour (at most 3600), for
//!   `metering.heartbeat` dimensions. The agent records it every minute of its clock and
//!   before each seal ([`Ledger::record_run`]), so a crash loses at most a minute; seconds of
//!   an hour already sealed are dropped.
//! - `event_ids(id, accepted_at)`: idempotency keys of the last 7 hours.
//! - `sealed_hours(hour, sealed_at)`: hours that are closed for good. Usage that arrives for a
//!   sealed hour (after a shutdown flush, or a clock step back) goes to the first unsealed hour.
//! - `records(hour, dimension, …, state)`: one per dimension-hour, written when the hour is
//!   sealed and never changed afterwards except for its delivery state:
//!   `pending` → `sent` | `dead` (window passed) | `duplicate` (service refused as duplicate).
//!
//! SQLite's own checkpoint inside COMMIT is off (`wal_autocheckpoint = 0`); the writer
//! checkpoints between groups, after their answers went out, so the WAL restarts at its
//! beginning instead of growing ([`checkpoint`]).
//!
//! # Retention
//! What can no longer matter is deleted by one named step, [`retention::forget_expired`]: event
//! ids older than [`EVENT_ID_RETENTION_SECS`](crate::model::EVENT_ID_RETENTION_SECS), counters and running time of sealed hours older
//! than a day, the distinct values of every sealed hour, and final records older than a week.
//! It runs right after each seal, inside the seal's savepoint ([`seal`]): a seal is committed
//! together with its housekeeping or not at all, and nothing else deletes rows.
//!
//! # Schema versions
//! Version 2 added `gauges`, `distinct_values` and `run_seconds`. A version 1 ledger is
//! migrated at open, after it passed the read-only checks: one transaction creates the tables
//! (`CREATE TABLE IF NOT EXISTS`, so a migration interrupted before its commit is simply done
//! again) and sets `schema_version` to 2; nothing in the old tables changes. A ledger of a
//! version newer than this meterd knows is refused (exit 74), untouched: an older meterd does
//! not read what it does not understand.
//!
//! # Recovery
//! A new ledger is built as `ledger.sqlite3.new` (schema and meta rows in one transaction),
//! fsynced and renamed into place, so `ledger.sqlite3` is whole or absent; a leftover `.new`
//! from an interrupted first start holds nothing and is replaced. SQLite's WAL replay restores
//! the last committed transaction. On open, `quick_check` must pass, the meta rows must be
//! there and the schema version must be one this meterd reads; otherwise the agent refuses to
//! start with a clear error and never resets the file. Pending records and closed-but-unsealed hours are picked
//! up by the normal seal and send loops.
//!
//! # Files, ownership and the lock
//! The ledger is `state.dir/private/ledger.sqlite3`, in a directory of mode 0700 that the agent
//! creates and must own; files are created 0600 and never through a symbolic link, and a file
//! or directory of another uid is refused. The lock is `flock` on that directory, taken at open
//! and owned by the writer thread, which releases it when it ends, after closing the write
//! connection. A ledger of the old layout (`state.dir/ledger.sqlite3`) is moved into the private
//! directory at the first start. The details, and why, are in [`files`].
//!
//! # Where the code is
//! - this module: the [`Ledger`] handle (open, the commands it queues, the reads it runs on
//!   its read connection), [`LedgerError`] and the ledger's own result types;
//! - [`writer`]: the writer thread, group commit and the commands; [`checkpoint`]: the WAL;
//! - [`schema`]: tables, atomic creation, validation at open, migration;
//! - [`files`]: the private directory, ownership, links and the lock;
//! - [`append`]: ingest's path (ids, caps, folding per counter, running time);
//! - [`seal`]: the seal transaction (the arithmetic is [`crate::seal`], the schedule
//!   [`crate::seal::schedule`]); [`retention`]: the housekeeping step that follows it;
//! - [`deliver`]: delivery outcomes; [`queries`]: row reads; [`inspect`]: `meterd records`
//!   without the lock; [`quarantine`]: moving a damaged ledger aside.
//!
//! The value types that cross modules ([`Event`], [`StoredRecord`], [`RecordState`], …) are in
//! [`crate::model`].

mod append;
mod checkpoint;
mod deliver;
mod files;
mod inspect;
mod quarantine;
mod queries;
mod retention;
mod schema;
mod seal;
mod writer;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use files::{ledger_path, PRIVATE_DIR};
pub use inspect::{read_records_at, read_records_filtered, read_records_of_file, RecordFilter};
pub use quarantine::{quarantine, quarantined_ledgers, QUARANTINE_PREFIX};
pub use seal::SealOutcome;

// Kept for `main.rs`, `agent.rs` and the integration tests, which other changes are
// restructuring at the same time; new code imports these from `crate::model` and `crate::seal`.
pub use crate::model::{RecordState, StoredRecord};
pub use crate::seal::SealPolicy;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::model::{attributed_hour, Delivery, Event, UnknownRecordState, UsageRow, MAX_QUANTITY};
use append::Folded;
use checkpoint::{note_wal_pages, CHECKPOINT_PAGES};
use schema::{create_ledger, load_floor, load_next_seq, migrate, SCHEMA_VERSION};
use writer::{Command, Counters, Writer, QUEUE_DEPTH};
/// The ledger's file name in the private directory (see [`ledger_path`]).
pub const LEDGER_FILE: &str = "ledger.sqlite3";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("the ledger's disk is full: {0}")]
    Full(String),
    #[error("the ledger cannot be written: {0}")]
    Unavailable(String),
    #[error("the ledger at {path} is corrupt or unreadable: {detail}. It was left untouched; restore it from a backup or move it aside to start empty (unsent usage in it would be lost)")]
    Corrupt {
        path: String,
        detail: String,
        /// Damage, which `state.quarantine_damaged` may move aside; false for a ledger of a
        /// newer schema, which is whole and must be left for the meterd that wrote it.
        damaged: bool,
    },
    #[error("another meterd process holds {0}; run one agent per state directory")]
    Locked(String),
    #[error("refusing the ledger's files: {0}")]
    Unsafe(String),
    #[error("the ledger at {path} belongs to product {found}, not {expected}; use a separate state directory per product")]
    ProductMismatch {
        path: String,
        found: String,
        expected: String,
    },
    #[error("dimension {dimension:?} would reach {would_be} in the hour starting {hour}; the service accepts at most {MAX_QUANTITY} per dimension-hour")]
    HourlyCapExceeded {
        dimension: String,
        hour: i64,
        would_be: i64,
    },
    #[error("unique dimension {dimension:?} already holds {limit} distinct values in the hour starting {hour}; meterd stores at most {limit} per dimension-hour, so this request's new values were not recorded")]
    DistinctCapExceeded {
        dimension: String,
        hour: i64,
        limit: i64,
    },
    #[error("the ledger holds a record it cannot read: {0} (a newer meterd or another program wrote it)")]
    UnknownRecordState(String),
    #[error("the ledger is shut down")]
    Closed,
}

impl LedgerError {
    fn from_sqlite(e: &rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        if let rusqlite::Error::FromSqlConversionFailure(_, _, inner) = e {
            if let Some(unknown) = inner.downcast_ref::<UnknownRecordState>() {
                return LedgerError::UnknownRecordState(unknown.to_string());
            }
        }
        match e.sqlite_error_code() {
            Some(C::DiskFull) => LedgerError::Full(e.to_string()),
            _ => LedgerError::Unavailable(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppendOutcome {
    pub accepted: usize,
    pub duplicates: usize,
    /// The hour (epoch seconds) the counted events were attributed to.
    pub hour: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LedgerStats {
    pub pending: i64,
    pub sent: i64,
    pub dead: i64,
    pub duplicate: i64,
    pub last_error: Option<String>,
    pub size_bytes: u64,
    /// The hour of the oldest pending record.
    pub oldest_pending_hour: Option<i64>,
    /// When MeterUsage last confirmed a record.
    pub last_sent_at: Option<i64>,
}

/// Facts fixed when the ledger was created.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerIdentity {
    pub instance_id: String,
    pub first_start: i64,
    pub product_code: String,
}

/// Commit counters, for the cost-of-durability metrics.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Transactions committed; one that failed counts in `failures` only.
    pub commits: AtomicU64,
    /// Commands run by the writer, those of failed transactions included.
    pub commands: AtomicU64,
    pub failures: AtomicU64,
    /// Time spent in COMMIT (the fsync), summed over the successful commits (`commits`).
    pub commit_nanos: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_failures: AtomicU64,
    /// Pages in the WAL after the last commit (0 right after a complete checkpoint).
    pub wal_pages: AtomicU64,
}

#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    /// Declared (so dropped) before `queue`: the writer thread, which ends once the queue is
    /// closed and then releases the lock, never outlives the read connection.
    reader: Mutex<Connection>,
    queue: mpsc::Sender<Command>,
    path: PathBuf,
    identity: LedgerIdentity,
    /// First hour not yet sealed (0 before the first seal).
    sealed_floor: Arc<AtomicI64>,
    commit_stats: Arc<CommitStats>,
    /// Whether the writer's last commit succeeded.
    writable: Arc<AtomicBool>,
    /// Closed when the writer thread ends, after it released the lock.
    writer_ended: tokio::sync::watch::Receiver<()>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn open_connection(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

impl Ledger {
    /// Opens (or creates) the ledger of the state directory `dir`, taking the agent's lock on
    /// its private directory (see [`files`]).
    pub fn open(dir: &Path, product_code: &str, now: i64) -> Result<Ledger, LedgerError> {
        let private = files::PrivateDir::open_locked(dir)?;
        let path = private.path().join(LEDGER_FILE);
        let corrupt = |e: &dyn std::fmt::Display| LedgerError::Corrupt {
            path: path.display().to_string(),
            detail: e.to_string(),
            damaged: true,
        };
        private.inspect_side_files(LEDGER_FILE)?;
        let file = match private.inspect(LEDGER_FILE)? {
            Some(id) => id,
            None => {
                create_ledger(&private, product_code, now)?;
                private.inspect(LEDGER_FILE)?.ok_or_else(|| {
                    LedgerError::Unavailable(format!("{} vanished after creation", path.display()))
                })?
            }
        };
        // SQLite opens by path: each connection's descriptor must be on the file just checked.
        let open_checked = |flags: OpenFlags| -> Result<rusqlite::Result<Connection>, LedgerError> {
            let before = files::descriptors_on(file)?;
            let conn = open_connection(&path, flags);
            if conn.is_ok() {
                files::expect_opened(&path, file, before)?;
            }
            Ok(conn)
        };
        // Validate on a read-only connection first: nothing is written to a damaged file.
        let (identity, version) = {
            let check =
                open_checked(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?
                    .map_err(|e| corrupt(&e))?;
            schema::validate(&check, &path, product_code)?
        };
        let writer =
            open_checked(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?
                .map_err(|e| LedgerError::from_sqlite(&e))?;
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| LedgerError::from_sqlite(&e))?;
        writer
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| LedgerError::from_sqlite(&e))?;
        if version < SCHEMA_VERSION {
            migrate(&writer, version).map_err(|e| LedgerError::from_sqlite(&e))?;
            tracing::info!(
                from = version,
                to = SCHEMA_VERSION,
                "ledger schema migrated"
            );
        }
        let floor = load_floor(&writer).map_err(|e| corrupt(&e))?;
        let next_seq = load_next_seq(&writer).map_err(|e| corrupt(&e))?;
        // The writer checkpoints between groups, after the replies (see `checkpoint_if_due`);
        // the hook replaces SQLite's own checkpoint inside COMMIT.
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| LedgerError::from_sqlite(&e))?;
        writer.wal_hook(Some(note_wal_pages));
        let reader =
            open_checked(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?
                .map_err(|e| LedgerError::from_sqlite(&e))?;
        // A first read opens the reader's WAL; both connections' side files must be ours.
        reader
            .query_row("SELECT COUNT(*) FROM meta", [], |r| r.get::<_, i64>(0))
            .map_err(|e| LedgerError::from_sqlite(&e))?;
        private.expect_side_files_open(2)?;

        let sealed_floor = Arc::new(AtomicI64::new(floor));
        let commit_stats = Arc::new(CommitStats::default());
        let writable = Arc::new(AtomicBool::new(true));
        let (queue, commands) = mpsc::channel(QUEUE_DEPTH);
        let writer_state = Writer {
            conn: writer,
            identity: identity.clone(),
            sealed_floor: sealed_floor.clone(),
            counters: Counters {
                next_seq,
                ..Counters::default()
            },
            stats: commit_stats.clone(),
            checkpoint_at_pages: CHECKPOINT_PAGES,
            last_checkpoint: Instant::now(),
            writable: writable.clone(),
        };
        let span = tracing::Span::current();
        let (ended, writer_ended) = tokio::sync::watch::channel(());
        std::thread::Builder::new()
            .name("meterd-ledger".to_owned())
            .spawn(move || {
                let _entered = span.enter();
                // The thread owns the lock: released when it ends, after the write connection
                // (consumed by `run`) is closed, and never while it still writes.
                let lock = private;
                writer_state.run(commands);
                drop(lock);
                drop(ended);
            })
            .map_err(|e| LedgerError::Unavailable(format!("cannot start writer thread: {e}")))?;

        Ok(Ledger {
            inner: Arc::new(Inner {
                queue,
                reader: Mutex::new(reader),
                path,
                identity,
                sealed_floor,
                commit_stats,
                writable,
                writer_ended,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Drops this handle and waits until the writer thread has ended and released the lock,
    /// which happens once every handle is gone: for an in-process restart on the same state
    /// directory (a process that exits releases the lock anyway).
    pub async fn closed(self) {
        let mut ended = self.inner.writer_ended.clone();
        drop(self);
        while ended.changed().await.is_ok() {}
    }

    pub fn identity(&self) -> &LedgerIdentity {
        &self.inner.identity
    }

    pub fn commit_stats(&self) -> &CommitStats {
        &self.inner.commit_stats
    }

    /// The first hour not yet sealed; usage is never attributed to an earlier hour.
    pub fn sealed_floor(&self) -> i64 {
        self.inner.sealed_floor.load(Ordering::Acquire)
    }

    /// The hour that usage received at `now` is counted in.
    pub fn open_hour(&self, now: i64) -> i64 {
        attributed_hour(now, self.sealed_floor())
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LedgerError>>) -> Command,
    ) -> Result<T, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(make(reply))
            .await
            .map_err(|_| LedgerError::Closed)?;
        answer.await.map_err(|_| LedgerError::Closed)?
    }

    /// Durably counts `events` (all or nothing); returns once the commit is fsynced.
    pub async fn append(
        &self,
        events: Vec<Event>,
        received_at: i64,
    ) -> Result<AppendOutcome, LedgerError> {
        let events = Folded::new(events);
        self.call(|reply| Command::Append {
            events,
            received_at,
            reply,
        })
        .await
    }

    /// Seals every unsealed hour that starts before `end_exclusive`, then runs the retention
    /// step, in the writer's next group ([`seal`]). Called by [`crate::seal::schedule`] each
    /// hour and by the shutdown flush; what a record holds is [`crate::seal::seal_hour`].
    pub async fn seal_through(
        &self,
        end_exclusive: i64,
        now: i64,
        policy: SealPolicy,
    ) -> Result<SealOutcome, LedgerError> {
        self.call(|reply| Command::Seal {
            end_exclusive,
            now,
            policy,
            reply,
        })
        .await
    }

    /// Whether the last commit succeeded: false after a failed write (say, a full disk) until
    /// a write succeeds again.
    pub fn writable(&self) -> bool {
        self.inner.writable.load(Ordering::Acquire)
    }

    /// Shares [`Ledger::writable`] with whoever reports it.
    pub fn writable_flag(&self) -> Arc<AtomicBool> {
        self.inner.writable.clone()
    }

    /// Durably records that the agent ran from `from` to `to` (epoch seconds), for the
    /// heartbeat dimensions: each hour's seconds are added up (at most 3600 an hour). Seconds
    /// of an hour already sealed are dropped: its record is final.
    pub async fn record_run(&self, from: i64, to: i64) -> Result<(), LedgerError> {
        self.call(|reply| Command::Heartbeat { from, to, reply })
            .await
    }

    /// Seconds the agent ran in `hour`, as recorded for the heartbeat dimensions.
    pub async fn run_seconds(&self, hour: i64) -> Result<i64, LedgerError> {
        self.read(move |c| queries::run_seconds_of(c, hour)).await
    }

    /// Makes a small write (a timestamp in `meta`), so a ledger that refused writes is seen to
    /// take them again without waiting for usage to arrive.
    pub async fn check_writable(&self, now: i64) -> Result<(), LedgerError> {
        self.call(|reply| Command::CheckWritable { now, reply })
            .await
    }

    /// Durably sets (`Some`) or removes (`None`) the agent state entry `key`: what must
    /// survive a crash besides usage, such as the License Manager checkouts held.
    pub async fn put_state(&self, key: &str, value: Option<String>) -> Result<(), LedgerError> {
        let key = format!("state.{key}");
        self.call(|reply| Command::PutState { key, value, reply })
            .await
    }

    /// The agent state entry `key`, if set.
    pub async fn state(&self, key: &str) -> Result<Option<String>, LedgerError> {
        let key = format!("state.{key}");
        self.read(move |c| queries::meta_value(c, &key)).await
    }

    pub async fn record_delivery(
        &self,
        hour: i64,
        dimension: &str,
        delivery: Delivery,
        now: i64,
    ) -> Result<(), LedgerError> {
        let dimension = dimension.to_owned();
        self.call(|reply| Command::Deliver {
            hour,
            dimension,
            delivery,
            now,
            reply,
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let inner = self.inner.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let conn = inner.reader.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn).map_err(|e| LedgerError::from_sqlite(&e))
        })
        .await
        .map_err(|e| LedgerError::Unavailable(format!("reader task failed: {e}")))?
    }

    /// Records not yet delivered, oldest first.
    pub async fn pending_records(&self) -> Result<Vec<StoredRecord>, LedgerError> {
        self.read(|c| {
            queries::query_records(c, "WHERE state = 'pending' ORDER BY hour, dimension", [])
        })
        .await
    }

    /// Records with a final outcome (sent, dead, duplicate), in the order they became final.
    pub async fn final_records(&self) -> Result<Vec<StoredRecord>, LedgerError> {
        self.read(|c| {
            queries::query_records(
                c,
                "WHERE state != 'pending' ORDER BY updated_at, hour, dimension",
                [],
            )
        })
        .await
    }

    /// The newest `limit` records, newest first.
    pub async fn recent_records(&self, limit: i64) -> Result<Vec<StoredRecord>, LedgerError> {
        self.read(move |c| {
            queries::query_records(c, "ORDER BY hour DESC, dimension LIMIT ?1", [limit])
        })
        .await
    }

    /// Counters of one hour.
    pub async fn usage_of_hour(&self, hour: i64) -> Result<Vec<UsageRow>, LedgerError> {
        self.read(move |c| queries::usage_rows(c, hour)).await
    }

    /// Folds the rows of [`Ledger::usage_of_hour`] into `acc` one at a time on the read
    /// connection, in the same order, without collecting them: with 10,000 tag sets in the
    /// hour the collected rows and a rendering of them held tens of megabytes at once, where a
    /// fold that writes each row out holds one.
    pub async fn fold_usage_of_hour<T: Send + 'static>(
        &self,
        hour: i64,
        mut acc: T,
        mut f: impl FnMut(&mut T, UsageRow) + Send + 'static,
    ) -> Result<T, LedgerError> {
        self.read(move |c| {
            queries::for_each_usage_row(c, hour, |row| f(&mut acc, row))?;
            Ok(acc)
        })
        .await
    }

    pub async fn stats(&self) -> Result<LedgerStats, LedgerError> {
        let path = self.inner.path.clone();
        let mut stats = self.read(queries::stats).await?;
        stats.size_bytes = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                std::fs::metadata(p).ok().map(|m| m.len())
            })
            .sum();
        Ok(stats)
    }
}
