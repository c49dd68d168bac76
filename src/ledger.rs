//! The durable ledger: SQLite in WAL mode with `synchronous = FULL`.
//!
//! # What is written, and when it is fsynced
//! One writer thread owns the write connection. It drains every queued command, applies them
//! in one transaction (each command inside its own savepoint, so one failing request rolls
//! back alone) and commits once: many requests share one fsync (group commit). Replies go out
//! only after the commit returns, so an acknowledged count is on disk.
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
//! [`MAX_DISTINCT_PER_HOUR`] is refused whole ([`LedgerError::DistinctCapExceeded`]) and its
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
//!   [`MAX_DISTINCT_PER_HOUR`] rows per dimension-hour (each value at most 256 characters, a tag
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
//! beginning instead of growing (`Writer::checkpoint_if_due`).
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

mod files;

pub use files::{ledger_path, PRIVATE_DIR};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::clock::{hour_floor, HOUR_SECS};
use crate::model::{self, Aggregation, TagSet, MAX_DISTINCT_PER_HOUR, MAX_QUANTITY};
use crate::seal::{self, Allocation, UsageRow};

pub use crate::seal::SealPolicy;

/// Version 2 added `gauges`, `distinct_values` and `run_seconds`; a version 1 ledger is
/// migrated forward at open ([`migrate`]).
const SCHEMA_VERSION: i64 = 2;
/// The ledger's file name in the private directory (see [`ledger_path`]).
pub const LEDGER_FILE: &str = "ledger.sqlite3";
/// A new ledger is built under this name beside the final one, then renamed.
const NEW_LEDGER_FILE: &str = "ledger.sqlite3.new";
/// Idempotency keys are remembered this long.
pub const EVENT_ID_RETENTION_SECS: i64 = 7 * HOUR_SECS;
/// The service accepts timestamps at most this old.
pub const REPORT_WINDOW_SECS: i64 = 6 * HOUR_SECS;
/// Usage counters of sealed hours are kept this long for inspection.
const USAGE_RETENTION_SECS: i64 = 24 * HOUR_SECS;
/// Delivered or dead records are kept this long for `meterd records`.
const RECORD_RETENTION_SECS: i64 = 7 * 24 * HOUR_SECS;
/// Commands applied in one transaction at most.
const MAX_GROUP: usize = 1024;
/// Commands waiting for the writer; senders wait when it is full (back-pressure).
const QUEUE_DEPTH: usize = 4096;

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
    #[error("the ledger is shut down")]
    Closed,
}

impl LedgerError {
    fn from_sqlite(e: &rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code() {
            Some(C::DiskFull) => LedgerError::Full(e.to_string()),
            _ => LedgerError::Unavailable(e.to_string()),
        }
    }
}

/// One usage event, already validated by ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub dimension: String,
    pub tags: TagSet,
    /// What it says, in the terms of its dimension's aggregation.
    pub measure: Measure,
    pub id: Option<String>,
}

/// An event's value under its dimension's aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measure {
    /// Added to the hour's total.
    Sum(i64),
    /// The hour's value is the largest posted.
    Max(i64),
    /// The hour's value is the last posted.
    Last(i64),
    /// One occurrence of a distinct value; the hour's value is the number of distinct values.
    Unique(String),
}

impl Measure {
    pub fn aggregation(&self) -> Aggregation {
        match self {
            Measure::Sum(_) => Aggregation::Sum,
            Measure::Max(_) => Aggregation::Max,
            Measure::Last(_) => Aggregation::Last,
            Measure::Unique(_) => Aggregation::Unique,
        }
    }

    /// The measure of `quantity` under a numeric aggregation (`None` for `unique`).
    pub fn of(aggregation: Aggregation, quantity: i64) -> Option<Self> {
        match aggregation {
            Aggregation::Sum => Some(Measure::Sum(quantity)),
            Aggregation::Max => Some(Measure::Max(quantity)),
            Aggregation::Last => Some(Measure::Last(quantity)),
            Aggregation::Unique => None,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    Pending,
    Sent,
    Dead,
    Duplicate,
}

impl RecordState {
    fn as_str(self) -> &'static str {
        match self {
            RecordState::Pending => "pending",
            RecordState::Sent => "sent",
            RecordState::Dead => "dead",
            RecordState::Duplicate => "duplicate",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "sent" => RecordState::Sent,
            "dead" => RecordState::Dead,
            "duplicate" => RecordState::Duplicate,
            _ => RecordState::Pending,
        }
    }
}

/// A sealed record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredRecord {
    pub hour: i64,
    pub dimension: String,
    pub quantity: i64,
    pub allocations: Option<Vec<Allocation>>,
    pub timestamp: i64,
    pub client_token: String,
    pub state: RecordState,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub metering_record_id: Option<String>,
    pub sealed_at: i64,
    pub sent_at: Option<i64>,
    /// When the delivery state last changed (the final outcome's time once it is final).
    pub updated_at: i64,
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

/// Sealing produced these records; `folded_tag_sets` feeds a warning and a metric.
#[derive(Debug, Clone, Default)]
pub struct SealOutcome {
    pub hours: Vec<i64>,
    pub records: usize,
    pub folded_tag_sets: usize,
    /// Rows recorded under another aggregation than the configured one; not billed.
    pub ignored_rows: usize,
}

/// How a delivery attempt ended, as recorded.
#[derive(Debug, Clone)]
pub enum Delivery {
    Sent { metering_record_id: String },
    Failed { error: String },
    Final { state: RecordState, error: String },
}

/// What a request adds to one counter, folded per aggregation. `at` orders events: an index
/// within the request, turned into the writer's receive sequence when it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fold {
    Sum(i64),
    /// The largest value and where it was first reached.
    Max {
        value: i64,
        at: i64,
    },
    /// The latest value.
    Last {
        value: i64,
        at: i64,
    },
}

impl Fold {
    fn of(measure: &Measure, at: i64) -> Option<Fold> {
        match *measure {
            Measure::Sum(q) => Some(Fold::Sum(q)),
            Measure::Max(value) => Some(Fold::Max { value, at }),
            Measure::Last(value) => Some(Fold::Last { value, at }),
            Measure::Unique(_) => None,
        }
    }

    /// Combines two folds of the same counter (the same aggregation).
    fn merge(&mut self, other: Fold) {
        match (self, other) {
            (Fold::Sum(a), Fold::Sum(b)) => *a = a.saturating_add(b),
            (Fold::Max { value, at }, Fold::Max { value: v, at: t })
                if v > *value || (v == *value && t < *at) =>
            {
                (*value, *at) = (v, t);
            }
            (Fold::Last { value, at }, Fold::Last { value: v, at: t }) if t > *at => {
                (*value, *at) = (v, t);
            }
            // An earlier or smaller value changes nothing; keys carry the aggregation, so
            // folds of different kinds never meet.
            _ => {}
        }
    }

    /// The same fold with its order moved from the request's index to the receive sequence.
    fn sequenced(self, base: i64) -> Fold {
        match self {
            Fold::Sum(q) => Fold::Sum(q),
            Fold::Max { value, at } => Fold::Max {
                value,
                at: base + at,
            },
            Fold::Last { value, at } => Fold::Last {
                value,
                at: base + at,
            },
        }
    }
}

fn merge_into(slot: &mut Option<Fold>, fold: Fold) {
    match slot {
        Some(f) => f.merge(fold),
        None => *slot = Some(fold),
    }
}

/// A request's events as the writer needs them, prepared on the caller's thread.
#[derive(Debug)]
struct Folded {
    /// The request's distinct (dimension, canonical tag key, aggregation) triples.
    keys: Vec<(String, String, Aggregation)>,
    /// Per key: the fold of its numeric events without an id, or `None` when it has none.
    plain: Vec<Option<Fold>>,
    /// Numeric events with an id, in request order: (id, key index, fold).
    with_id: Vec<(String, usize, Fold)>,
    /// `unique` events in request order (the first occurrence decides a value's tag set):
    /// (id, key index, value).
    distinct: Vec<(Option<String>, usize, String)>,
    events: usize,
}

impl Folded {
    fn new(events: Vec<Event>) -> Self {
        // Index the distinct (dimension, tags) first, borrowing, so a tag set repeated in a
        // batch is serialized to its canonical key once.
        let mut index: HashMap<(&str, &TagSet, Aggregation), usize> = HashMap::new();
        let slots: Vec<usize> = events
            .iter()
            .map(|event| {
                let next = index.len();
                *index
                    .entry((
                        event.dimension.as_str(),
                        &event.tags,
                        event.measure.aggregation(),
                    ))
                    .or_insert(next)
            })
            .collect();
        let mut keys = vec![(String::new(), String::new(), Aggregation::Sum); index.len()];
        for ((dimension, tags, aggregation), i) in index {
            keys[i] = (dimension.to_owned(), model::tagset_key(tags), aggregation);
        }
        let mut plain: Vec<Option<Fold>> = vec![None; keys.len()];
        let mut with_id = Vec::new();
        let mut distinct = Vec::new();
        let count = events.len();
        for (at, (event, i)) in events.into_iter().zip(slots).enumerate() {
            let at = at as i64;
            match (event.measure, event.id) {
                (Measure::Unique(value), id) => distinct.push((id, i, value)),
                (measure, id) => {
                    let Some(fold) = Fold::of(&measure, at) else {
                        continue;
                    };
                    match id {
                        Some(id) => with_id.push((id, i, fold)),
                        None => merge_into(&mut plain[i], fold),
                    }
                }
            }
        }
        Folded {
            keys,
            plain,
            with_id,
            distinct,
            events: count,
        }
    }
}

enum Command {
    Append {
        events: Folded,
        received_at: i64,
        reply: oneshot::Sender<Result<AppendOutcome, LedgerError>>,
    },
    Seal {
        end_exclusive: i64,
        now: i64,
        policy: SealPolicy,
        reply: oneshot::Sender<Result<SealOutcome, LedgerError>>,
    },
    Deliver {
        hour: i64,
        dimension: String,
        delivery: Delivery,
        now: i64,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
    /// The agent ran from `from` to `to` (epoch seconds): heartbeat dimensions bill it.
    Heartbeat {
        from: i64,
        to: i64,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
    /// A small write, to learn whether the ledger takes writes again.
    CheckWritable {
        now: i64,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
    /// Sets (or, with `None`, removes) an agent state entry (`meta` key `state.<key>`).
    PutState {
        key: String,
        value: Option<String>,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
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
    pub commits: AtomicU64,
    pub commands: AtomicU64,
    pub failures: AtomicU64,
    /// Time spent in COMMIT (the fsync), summed over all commits.
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
            let verdict: String = check
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(|e| corrupt(&e))?;
            if verdict != "ok" {
                return Err(corrupt(&verdict));
            }
            read_identity(&check, product_code).map_err(|e| match e {
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
            })?
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
        hour_floor(now).max(self.sealed_floor())
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

    /// Seals every unsealed hour that starts before `end_exclusive`.
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
        self.read(move |c| run_seconds_of(c, hour)).await
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
        self.read(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [&key], |r| {
                r.get(0)
            })
            .optional()
        })
        .await
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
        self.read(|c| query_records(c, "WHERE state = 'pending' ORDER BY hour, dimension", []))
            .await
    }

    /// Records with a final outcome (sent, dead, duplicate), in the order they became final.
    pub async fn final_records(&self) -> Result<Vec<StoredRecord>, LedgerError> {
        self.read(|c| {
            query_records(
                c,
                "WHERE state != 'pending' ORDER BY updated_at, hour, dimension",
                [],
            )
        })
        .await
    }

    /// The newest `limit` records, newest first.
    pub async fn recent_records(&self, limit: i64) -> Result<Vec<StoredRecord>, LedgerError> {
        self.read(move |c| query_records(c, "ORDER BY hour DESC, dimension LIMIT ?1", [limit]))
            .await
    }

    /// Counters of one hour.
    pub async fn usage_of_hour(&self, hour: i64) -> Result<Vec<UsageRow>, LedgerError> {
        self.read(move |c| usage_rows(c, hour)).await
    }

    pub async fn stats(&self) -> Result<LedgerStats, LedgerError> {
        let path = self.inner.path.clone();
        let mut stats = self
            .read(|c| {
                let mut stats = LedgerStats::default();
                let mut stmt =
                    c.prepare_cached("SELECT state, COUNT(*) FROM records GROUP BY state")?;
                let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
                for row in rows {
                    let (state, n): (String, i64) = row?;
                    match RecordState::parse(&state) {
                        RecordState::Pending => stats.pending = n,
                        RecordState::Sent => stats.sent = n,
                        RecordState::Dead => stats.dead = n,
                        RecordState::Duplicate => stats.duplicate = n,
                    }
                }
                stats.last_error = c
                    .query_row(
                        "SELECT last_error FROM records WHERE last_error IS NOT NULL \
                         ORDER BY updated_at DESC LIMIT 1",
                        [],
                        |r| r.get(0),
                    )
                    .optional()?;
                (stats.oldest_pending_hour, stats.last_sent_at) = c.query_row(
                    "SELECT (SELECT MIN(hour) FROM records WHERE state = 'pending'), \
                     (SELECT MAX(sent_at) FROM records WHERE state = 'sent')",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok(stats)
            })
            .await?;
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

/// The prefix of a quarantined ledger's name: `ledger.sqlite3.quarantined-<UTC time>`.
pub const QUARANTINE_PREFIX: &str = "ledger.sqlite3.quarantined-";

/// Moves the ledger of `dir` aside, never deleting it: `ledger.sqlite3` and its side files
/// become `ledger.sqlite3.quarantined-<time>` (`-wal`, `-shm`), so the agent starts empty and
/// the old file stays readable (`meterd records --ledger`). Takes the agent's lock, so it
/// refuses while an agent runs. The side files move first and the ledger last; a move
/// interrupted between them is finished under the same name by the next run.
pub fn quarantine(dir: &Path, now: i64) -> Result<PathBuf, LedgerError> {
    let private = files::PrivateDir::open_locked(dir)?;
    if private.inspect(LEDGER_FILE)?.is_none() {
        return Err(LedgerError::Unavailable(format!(
            "no ledger at {} to quarantine",
            ledger_path(dir).display()
        )));
    }
    let names = quarantine_names(private.path())?;
    // A side file whose ledger is not beside it: an interrupted quarantine to finish.
    let orphan = names.iter().find_map(|n| {
        let base = n.strip_suffix("-wal").or_else(|| n.strip_suffix("-shm"))?;
        (!names.iter().any(|m| m == base)).then(|| base.to_owned())
    });
    let name = match orphan {
        Some(base) => base,
        None => {
            let stamp = rfc3339_compact(now);
            let mut name = format!("{QUARANTINE_PREFIX}{stamp}");
            let mut n = 1;
            while names.iter().any(|m| m.starts_with(&name)) {
                n += 1;
                name = format!("{QUARANTINE_PREFIX}{stamp}-{n}");
            }
            name
        }
    };
    for suffix in ["-wal", "-shm"] {
        let side = format!("{LEDGER_FILE}{suffix}");
        if private.inspect(&side)?.is_some() {
            private.rename(&side, &format!("{name}{suffix}"))?;
        }
    }
    private.rename(LEDGER_FILE, &name)?;
    private.sync()?;
    Ok(private.path().join(name))
}

/// Quarantined ledgers (not their side files) in the state directory's private directory:
/// the `meterd_ledger_quarantined_files` gauge, which alerts until someone moves them away.
pub fn quarantined_ledgers(dir: &Path) -> Vec<PathBuf> {
    let private = dir.join(PRIVATE_DIR);
    quarantine_names(&private)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
        .map(|n| private.join(n))
        .collect()
}

fn quarantine_names(private: &Path) -> Result<Vec<String>, LedgerError> {
    let entries = std::fs::read_dir(private)
        .map_err(|e| LedgerError::Unavailable(format!("{}: {e}", private.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(QUARANTINE_PREFIX))
        .collect();
    names.sort();
    Ok(names)
}

/// `2026-12-02T15:11:00Z` as `20261202T151100Z`, for file names.
fn rfc3339_compact(t: i64) -> String {
    crate::clock::rfc3339(t).replace(['-', ':'], "")
}

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

fn query_records<P: rusqlite::Params>(
    c: &Connection,
    tail: &str,
    params: P,
) -> rusqlite::Result<Vec<StoredRecord>> {
    let sql = format!(
        "SELECT hour, dimension, quantity, allocations, timestamp, client_token, state, attempts, \
         last_error, metering_record_id, sealed_at, sent_at, updated_at FROM records {tail}"
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map(params, |r| {
        let allocations: Option<String> = r.get(3)?;
        let state: String = r.get(6)?;
        Ok(StoredRecord {
            hour: r.get(0)?,
            dimension: r.get(1)?,
            quantity: r.get(2)?,
            allocations: match allocations {
                None => None,
                Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        3,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?),
            },
            timestamp: r.get(4)?,
            client_token: r.get(5)?,
            state: RecordState::parse(&state),
            attempts: r.get(7)?,
            last_error: r.get(8)?,
            metering_record_id: r.get(9)?,
            sealed_at: r.get(10)?,
            sent_at: r.get(11)?,
            updated_at: r.get(12)?,
        })
    })?;
    rows.collect()
}

/// Every counter of an hour: sums, the `max`/`last` gauges, and per tag set the number of
/// distinct values it brought first.
fn usage_rows(c: &Connection, hour: i64) -> rusqlite::Result<Vec<UsageRow>> {
    let mut stmt = c.prepare_cached(
        "SELECT dimension, tags, quantity, 'sum', 0 FROM usage WHERE hour = ?1 \
         UNION ALL SELECT dimension, tags, value, aggregation, seq FROM gauges WHERE hour = ?1 \
         UNION ALL SELECT dimension, tags, COUNT(*), 'unique', 0 FROM distinct_values \
         WHERE hour = ?1 GROUP BY dimension, tags \
         ORDER BY 1, 2, 4",
    )?;
    let conversion = |column: usize, e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, e)
    };
    let rows = stmt.query_map([hour], |r| {
        let tags: String = r.get(1)?;
        let aggregation: String = r.get(3)?;
        Ok(UsageRow {
            dimension: r.get(0)?,
            tags: model::tagset_from_key(&tags).map_err(|e| conversion(1, Box::new(e)))?,
            quantity: r.get(2)?,
            aggregation: aggregation
                .parse()
                .map_err(|e: String| conversion(3, e.into()))?,
            seq: r.get(4)?,
        })
    })?;
    rows.collect()
}

fn run_seconds_of(c: &Connection, hour: i64) -> rusqlite::Result<i64> {
    Ok(c.query_row(
        "SELECT seconds FROM run_seconds WHERE hour = ?1",
        [hour],
        |r| r.get(0),
    )
    .optional()?
    .unwrap_or(0))
}

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
fn create_ledger(dir: &files::PrivateDir, product_code: &str, now: i64) -> Result<(), LedgerError> {
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
fn migrate(c: &Connection, from: i64) -> rusqlite::Result<()> {
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
fn load_next_seq(c: &Connection) -> rusqlite::Result<i64> {
    let last: Option<i64> = c.query_row("SELECT MAX(seq) FROM gauges", [], |r| r.get(0))?;
    Ok(last.unwrap_or(0) + 1)
}

fn load_floor(c: &Connection) -> rusqlite::Result<i64> {
    let last: Option<i64> = c.query_row("SELECT MAX(hour) FROM sealed_hours", [], |r| r.get(0))?;
    Ok(last.map(|h| h + HOUR_SECS).unwrap_or(0))
}

struct Writer {
    conn: Connection,
    identity: LedgerIdentity,
    sealed_floor: Arc<AtomicI64>,
    counters: Counters,
    stats: Arc<CommitStats>,
    /// WAL size (pages) at which the next checkpoint runs.
    checkpoint_at_pages: i32,
    last_checkpoint: Instant,
    writable: Arc<AtomicBool>,
}

/// What the writer keeps in memory between groups.
#[derive(Debug, Default)]
struct Counters {
    /// Cached totals per hour and dimension, for the hourly cap.
    totals: HashMap<i64, HashMap<String, i64>>,
    /// Cached number of distinct values per `unique` dimension-hour, for their bound.
    distinct: HashMap<(i64, String), i64>,
    /// The receive sequence of the next event (orders `max` ties and `last`). Sequences
    /// consumed by a group that failed are skipped, never reused.
    next_seq: i64,
}

impl Counters {
    /// Caches may include increments of a group that was rolled back.
    fn forget(&mut self) {
        self.totals.clear();
        self.distinct.clear();
    }

    /// Counters of sealed hours are never capped again; keep the caches small.
    fn retain_from(&mut self, floor: i64) {
        self.totals.retain(|hour, _| *hour >= floor);
        self.distinct.retain(|(hour, _), _| *hour >= floor);
    }
}

/// The writer checkpoints once the WAL holds this many pages (1 MiB at 4 KiB a page)...
const CHECKPOINT_PAGES: i32 = 256;
/// ...or once this long has passed since its last checkpoint and the WAL is not empty.
const CHECKPOINT_MAX_AGE: Duration = Duration::from_secs(1);

thread_local! {
    /// Pages in the WAL after the writer's last commit, from SQLite's WAL hook (the hook is a
    /// plain function, and the writer commits only on its own thread).
    static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

fn note_wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

/// A reply to send once the group's commit is known.
enum Reply {
    Append(
        oneshot::Sender<Result<AppendOutcome, LedgerError>>,
        Result<AppendOutcome, LedgerError>,
    ),
    Seal(
        oneshot::Sender<Result<SealOutcome, LedgerError>>,
        Result<SealOutcome, LedgerError>,
    ),
    Deliver(
        oneshot::Sender<Result<(), LedgerError>>,
        Result<(), LedgerError>,
    ),
}

impl Reply {
    fn send(self, commit: &Result<(), LedgerError>) {
        // A receiver that went away (client disconnected) needs no answer.
        match self {
            Reply::Append(tx, r) => drop(tx.send(commit.clone().and(r))),
            Reply::Seal(tx, r) => drop(tx.send(commit.clone().and(r))),
            Reply::Deliver(tx, r) => drop(tx.send(commit.clone().and(r))),
        }
    }
}

impl Writer {
    fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Some(first) = commands.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match commands.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
            self.apply_group(std::mem::take(&mut group));
            self.checkpoint_if_due();
            self.stats.wal_pages.store(
                u64::try_from(WAL_PAGES.get()).unwrap_or(0),
                Ordering::Relaxed,
            );
        }
    }

    /// Copies the WAL back into the database between groups, after their replies went out.
    ///
    /// SQLite restarts the WAL from its beginning only when a write transaction starts after a
    /// checkpoint that copied every frame. A checkpoint on another connection never gets there
    /// under steady load (frames keep arriving while it runs), so the WAL would grow without
    /// bound and every commit would extend the file; here nothing commits in between.
    fn checkpoint_if_due(&mut self) {
        let pages = WAL_PAGES.get();
        let due = pages >= self.checkpoint_at_pages
            || (pages > 0 && self.last_checkpoint.elapsed() >= CHECKPOINT_MAX_AGE);
        if !due {
            return;
        }
        self.last_checkpoint = Instant::now();
        let result = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            });
        match result {
            Ok((0, in_wal, copied)) if copied >= in_wal => {
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                WAL_PAGES.set(0);
                self.checkpoint_at_pages = CHECKPOINT_PAGES;
            }
            Ok((_, in_wal, copied)) => {
                // Another connection holds the checkpoint, or a reader still needs older
                // frames: try again once the WAL has grown further.
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    in_wal,
                    copied,
                    "WAL checkpoint was partial: a reader is behind or another connection checkpoints"
                );
                self.checkpoint_at_pages = pages.saturating_add(CHECKPOINT_PAGES);
            }
            Err(e) => {
                self.stats
                    .checkpoint_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, wal_pages = pages, "WAL checkpoint failed; commits stay durable in the WAL, retrying later");
                self.checkpoint_at_pages = pages.saturating_add(CHECKPOINT_PAGES);
            }
        }
    }

    fn apply_group(&mut self, group: Vec<Command>) {
        let n = group.len() as u64;
        let mut took = Duration::ZERO;
        let floor_before = self.sealed_floor.load(Ordering::Acquire);
        let mut replies = Vec::with_capacity(group.len());
        let mut floor_after = floor_before;
        let commit = (|| -> Result<(), LedgerError> {
            let mut tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| LedgerError::from_sqlite(&e))?;
            let mut increments = Increments::default();
            for command in group {
                if matches!(command, Command::Seal { .. }) {
                    // Sealing reads the counters: they must hold every earlier request.
                    increments.write(&tx)?;
                }
                match command {
                    Command::Append {
                        events,
                        received_at,
                        reply,
                    } => {
                        let result = append_in(
                            &mut tx,
                            &mut self.counters,
                            &mut increments,
                            floor_after,
                            events,
                            received_at,
                        );
                        replies.push(Reply::Append(reply, result));
                    }
                    Command::Seal {
                        end_exclusive,
                        now,
                        policy,
                        reply,
                    } => {
                        let result = seal_in(
                            &mut tx,
                            &self.identity,
                            floor_after,
                            end_exclusive,
                            now,
                            &policy,
                        );
                        if let Ok(outcome) = &result {
                            if let Some(last) = outcome.hours.last() {
                                floor_after = floor_after.max(last + HOUR_SECS);
                            }
                        }
                        replies.push(Reply::Seal(reply, result));
                    }
                    Command::Deliver {
                        hour,
                        dimension,
                        delivery,
                        now,
                        reply,
                    } => {
                        let result = deliver_in(&tx, hour, &dimension, &delivery, now)
                            .map_err(|e| LedgerError::from_sqlite(&e));
                        replies.push(Reply::Deliver(reply, result));
                    }
                    Command::Heartbeat { from, to, reply } => {
                        let result = run_in(&tx, floor_after, from, to)
                            .map_err(|e| LedgerError::from_sqlite(&e));
                        replies.push(Reply::Deliver(reply, result));
                    }
                    Command::PutState { key, value, reply } => {
                        let result = match &value {
                            Some(v) => tx.execute(
                                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                                [&key, v],
                            ),
                            None => tx.execute("DELETE FROM meta WHERE key = ?1", [&key]),
                        }
                        .map(|_| ())
                        .map_err(|e| LedgerError::from_sqlite(&e));
                        replies.push(Reply::Deliver(reply, result));
                    }
                    Command::CheckWritable { now, reply } => {
                        let result = tx
                            .execute(
                                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_write_check', ?1)",
                                [now.to_string()],
                            )
                            .map(|_| ())
                            .map_err(|e| LedgerError::from_sqlite(&e));
                        replies.push(Reply::Deliver(reply, result));
                    }
                }
            }
            increments.write(&tx)?;
            let started = Instant::now();
            let result = tx.commit().map_err(|e| LedgerError::from_sqlite(&e));
            took = started.elapsed();
            result
        })();
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .commit_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.stats.commands.fetch_add(n, Ordering::Relaxed);
        self.writable.store(commit.is_ok(), Ordering::Release);
        match &commit {
            Ok(()) => {
                self.sealed_floor.store(floor_after, Ordering::Release);
                self.counters.retain_from(floor_after);
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "ledger commit failed; the affected requests were not acknowledged");
                self.counters.forget();
            }
        }
        for reply in replies {
            reply.send(&commit);
        }
    }
}

/// One request's savepoint, from cached statements (rusqlite's `savepoint()` formats and
/// parses its SQL on every call). Dropped without [`RequestSavepoint::release`], it rolls the
/// request back.
struct RequestSavepoint<'c> {
    conn: &'c Connection,
    released: bool,
}

impl<'c> RequestSavepoint<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("SAVEPOINT meterd_request")?
            .execute([])?;
        Ok(Self {
            conn,
            released: false,
        })
    }

    fn release(mut self) -> rusqlite::Result<()> {
        self.released = true;
        self.conn
            .prepare_cached("RELEASE meterd_request")?
            .execute([])
            .map(|_| ())
    }
}

impl Drop for RequestSavepoint<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let undone = self
            .conn
            .execute_batch("ROLLBACK TO meterd_request; RELEASE meterd_request");
        if undone.is_err() {
            // Roll back the whole group instead: its COMMIT then fails, so no request of the
            // group is acknowledged and nothing of this one is kept.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// The group's counter increments, folded per (hour, dimension, tags, aggregation) and written
/// in one upsert each: many requests for the same counter cost one row update.
#[derive(Default)]
struct Increments(HashMap<(i64, String, String, Aggregation), Fold>);

impl Increments {
    fn add(&mut self, key: (i64, String, String, Aggregation), fold: Fold) {
        match self.0.get_mut(&key) {
            Some(f) => f.merge(fold),
            None => {
                self.0.insert(key, fold);
            }
        }
    }

    fn write(&mut self, tx: &rusqlite::Transaction<'_>) -> Result<(), LedgerError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let sql = |e: rusqlite::Error| LedgerError::from_sqlite(&e);
        for ((hour, dimension, tags, aggregation), fold) in self.0.drain() {
            match fold {
                Fold::Sum(quantity) => tx
                    .prepare_cached(
                        "INSERT INTO usage (hour, dimension, tags, quantity) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (hour, dimension, tags) DO UPDATE SET quantity = quantity + excluded.quantity",
                    )
                    .and_then(|mut s| s.execute(params![hour, dimension, tags, quantity])),
                // max: the first to reach the largest value keeps it (sequences only grow);
                // last: the latest receive sequence wins.
                Fold::Max { value, at } | Fold::Last { value, at } => {
                    macro_rules! gauge_upsert {
                        ($wins:literal) => {
                            concat!(
                                "INSERT INTO gauges (hour, dimension, aggregation, tags, value, seq) \
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                                 ON CONFLICT (hour, dimension, aggregation, tags) DO UPDATE \
                                 SET value = excluded.value, seq = excluded.seq WHERE ",
                                $wins
                            )
                        };
                    }
                    let statement = if matches!(fold, Fold::Max { .. }) {
                        gauge_upsert!("excluded.value > gauges.value")
                    } else {
                        gauge_upsert!("excluded.seq > gauges.seq")
                    };
                    tx.prepare_cached(statement).and_then(|mut s| {
                        s.execute(params![hour, dimension, aggregation.as_str(), tags, value, at])
                    })
                }
            }
            .map_err(sql)?;
        }
        Ok(())
    }
}

/// Checks one request (ids, hourly cap, the distinct-value bound) and adds what counts to
/// `increments`. A refused request changes nothing. Numeric counters are written by
/// [`Increments::write`] before the commit, and a failure there fails the whole group;
/// distinct values are written at once, inside the request's savepoint.
fn append_in(
    tx: &mut rusqlite::Transaction<'_>,
    counters: &mut Counters,
    increments: &mut Increments,
    floor: i64,
    events: Folded,
    received_at: i64,
) -> Result<AppendOutcome, LedgerError> {
    let hour = hour_floor(received_at).max(floor);
    let sql = |e: rusqlite::Error| LedgerError::from_sqlite(&e);
    let mut duplicates = 0;
    // Every event gets a receive sequence: the request's base plus its index.
    let base = counters.next_seq;
    counters.next_seq = base.saturating_add(events.events as i64);
    // Per key: what this request adds, or `None` when none of its events counts.
    let mut folds = events.plain;
    // New distinct-value counts, cached once the request is known to count.
    let mut new_counts: Vec<((i64, String), i64)> = Vec::new();
    // Only ids and distinct values are written before the request is known to count; their
    // savepoint undoes them.
    let savepoint = if events.with_id.is_empty() && events.distinct.is_empty() {
        None
    } else {
        let sp = RequestSavepoint::begin(tx).map_err(sql)?;
        let mut seen = tx
            .prepare_cached("SELECT accepted_at FROM event_ids WHERE id = ?1")
            .map_err(sql)?;
        let mut remember = tx
            .prepare_cached("INSERT OR REPLACE INTO event_ids (id, accepted_at) VALUES (?1, ?2)")
            .map_err(sql)?;
        let mut first_time = |id: &str| -> Result<bool, LedgerError> {
            let previous: Option<i64> =
                seen.query_row([id], |r| r.get(0)).optional().map_err(sql)?;
            if previous.is_some_and(|at| at > received_at - EVENT_ID_RETENTION_SECS) {
                return Ok(false);
            }
            remember.execute(params![id, received_at]).map_err(sql)?;
            Ok(true)
        };
        for (id, key, fold) in &events.with_id {
            if first_time(id)? {
                merge_into(&mut folds[*key], *fold);
            } else {
                duplicates += 1;
            }
        }
        if !events.distinct.is_empty() {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO distinct_values (hour, dimension, value, tags) \
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(sql)?;
            let mut added: Vec<(&str, i64)> = Vec::new();
            for (id, key, value) in &events.distinct {
                if let Some(id) = id {
                    if !first_time(id)? {
                        duplicates += 1;
                        continue;
                    }
                }
                let (dimension, tags, _) = &events.keys[*key];
                let new = insert
                    .execute(params![hour, dimension, value, tags])
                    .map_err(sql)? as i64;
                match added.iter_mut().find(|(d, _)| d == dimension) {
                    Some((_, n)) => *n += new,
                    None => added.push((dimension, new)),
                }
            }
            let mut count = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM distinct_values WHERE hour = ?1 AND dimension = ?2",
                )
                .map_err(sql)?;
            for (dimension, new) in added {
                let key = (hour, dimension.to_owned());
                // A count missing from the cache is read after this request's inserts.
                let would_be = match counters.distinct.get(&key) {
                    Some(n) => n + new,
                    None => count
                        .query_row(params![hour, dimension], |r| r.get(0))
                        .map_err(sql)?,
                };
                if would_be > MAX_DISTINCT_PER_HOUR {
                    // Dropping the savepoint rolls this request's values and ids back.
                    return Err(LedgerError::DistinctCapExceeded {
                        dimension: dimension.to_owned(),
                        hour,
                        limit: MAX_DISTINCT_PER_HOUR,
                    });
                }
                new_counts.push((key, would_be));
            }
        }
        Some(sp)
    };
    // The hourly cap applies to sums; a `max` or `last` value is a single quantity, and a
    // `unique` count stays below its own bound.
    let mut per_dimension: Vec<(&str, i64)> = Vec::new();
    for ((dimension, _, _), fold) in events.keys.iter().zip(&folds) {
        let Some(Fold::Sum(q)) = fold else { continue };
        match per_dimension.iter_mut().find(|(d, _)| d == dimension) {
            Some((_, sum)) => *sum += q,
            None => per_dimension.push((dimension, *q)),
        }
    }
    let cached = counters.totals.get(&hour);
    let mut new_totals = Vec::with_capacity(per_dimension.len());
    for (dimension, adding) in per_dimension {
        // A total missing from the cache has no unwritten increments: every request that
        // counted towards it since the last commit failure cached it.
        let current = match cached.and_then(|c| c.get(dimension)) {
            Some(t) => *t,
            None => tx
                .query_row(
                    "SELECT COALESCE(SUM(quantity), 0) FROM usage WHERE hour = ?1 AND dimension = ?2",
                    params![hour, dimension],
                    |r| r.get(0),
                )
                .map_err(sql)?,
        };
        let would_be = current.saturating_add(adding);
        if would_be > MAX_QUANTITY {
            // Dropping the savepoint rolls this request's ids back.
            return Err(LedgerError::HourlyCapExceeded {
                dimension: dimension.to_owned(),
                hour,
                would_be,
            });
        }
        new_totals.push((dimension, would_be));
    }
    if let Some(sp) = savepoint {
        sp.release().map_err(sql)?;
    }
    counters.distinct.extend(new_counts);
    let cache = counters.totals.entry(hour).or_default();
    for (dimension, total) in new_totals {
        match cache.get_mut(dimension) {
            Some(t) => *t = total,
            None => {
                cache.insert(dimension.to_owned(), total);
            }
        }
    }
    for ((dimension, tags, aggregation), fold) in events.keys.into_iter().zip(folds) {
        if let Some(fold) = fold {
            increments.add((hour, dimension, tags, aggregation), fold.sequenced(base));
        }
    }
    Ok(AppendOutcome {
        accepted: events.events - duplicates,
        duplicates,
        hour,
    })
}

/// Adds the seconds of `[from, to)` to each unsealed hour they fall in (at most 3600 an hour).
fn run_in(tx: &rusqlite::Transaction<'_>, floor: i64, from: i64, to: i64) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO run_seconds (hour, seconds) VALUES (?1, ?2) \
         ON CONFLICT (hour) DO UPDATE SET seconds = MIN(3600, seconds + excluded.seconds)",
    )?;
    let mut at = from;
    while at < to {
        let hour = hour_floor(at);
        let end = to.min(hour + HOUR_SECS);
        if hour >= floor {
            upsert.execute(params![hour, end - at])?;
        }
        at = end;
    }
    Ok(())
}

fn seal_in(
    tx: &mut rusqlite::Transaction<'_>,
    identity: &LedgerIdentity,
    floor: i64,
    end_exclusive: i64,
    now: i64,
    policy: &SealPolicy,
) -> Result<SealOutcome, LedgerError> {
    let sql = |e: rusqlite::Error| LedgerError::from_sqlite(&e);
    let sp = tx.savepoint().map_err(sql)?;
    let start = if floor > 0 {
        floor
    } else {
        let oldest_usage: Option<i64> = sp
            .query_row(
                "SELECT MIN(hour) FROM (SELECT MIN(hour) AS hour FROM usage \
                 UNION ALL SELECT MIN(hour) FROM gauges \
                 UNION ALL SELECT MIN(hour) FROM distinct_values \
                 UNION ALL SELECT MIN(hour) FROM run_seconds)",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        let first = hour_floor(identity.first_start);
        oldest_usage.map_or(first, |h| h.min(first))
    };
    let mut outcome = SealOutcome::default();
    let mut hour = start;
    while hour < end_exclusive {
        let rows = usage_rows(&sp, hour).map_err(sql)?;
        let ran = run_seconds_of(&sp, hour).map_err(sql)?;
        let timestamp = seal::record_timestamp(hour, identity.first_start);
        let reportable = timestamp + REPORT_WINDOW_SECS > now;
        if !rows.is_empty() || ran > 0 || reportable {
            let records = seal::seal_hour(hour, &rows, ran, policy);
            let mut insert = sp
                .prepare_cached(
                    "INSERT INTO records (hour, dimension, quantity, allocations, timestamp, \
                     client_token, state, sealed_at, updated_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7)",
                )
                .map_err(sql)?;
            for record in &records {
                let allocations = match &record.allocations {
                    Some(a) => Some(
                        serde_json::to_string(a)
                            .map_err(|e| LedgerError::Unavailable(e.to_string()))?,
                    ),
                    None => None,
                };
                let token = seal::client_token(
                    &identity.product_code,
                    &record.dimension,
                    hour,
                    &identity.instance_id,
                );
                insert
                    .execute(params![
                        hour,
                        record.dimension,
                        record.quantity,
                        allocations,
                        timestamp,
                        token,
                        now
                    ])
                    .map_err(sql)?;
                outcome.records += 1;
                outcome.folded_tag_sets += record.folded_tag_sets;
                outcome.ignored_rows += record.ignored_rows;
            }
        }
        sp.execute(
            "INSERT INTO sealed_hours (hour, sealed_at) VALUES (?1, ?2)",
            params![hour, now],
        )
        .map_err(sql)?;
        outcome.hours.push(hour);
        hour += HOUR_SECS;
    }
    // Housekeeping: forget what can no longer matter.
    sp.execute(
        "DELETE FROM event_ids WHERE accepted_at <= ?1",
        [now - EVENT_ID_RETENTION_SECS],
    )
    .map_err(sql)?;
    for table in ["usage", "gauges", "run_seconds"] {
        sp.execute(
            &format!("DELETE FROM {table} WHERE hour < ?1 AND hour < ?2"),
            params![hour.max(floor), now - USAGE_RETENTION_SECS],
        )
        .map_err(sql)?;
    }
    // Distinct values are the bulk of a `unique` dimension's data and mean nothing once their
    // hour is sealed: they go with the seal, which bounds their disk use to the open hours.
    sp.execute(
        "DELETE FROM distinct_values WHERE hour < ?1",
        [hour.max(floor)],
    )
    .map_err(sql)?;
    sp.execute(
        "DELETE FROM records WHERE state != 'pending' AND hour < ?1",
        [now - RECORD_RETENTION_SECS],
    )
    .map_err(sql)?;
    sp.commit().map_err(sql)?;
    Ok(outcome)
}

fn deliver_in(
    tx: &rusqlite::Transaction<'_>,
    hour: i64,
    dimension: &str,
    delivery: &Delivery,
    now: i64,
) -> rusqlite::Result<()> {
    match delivery {
        Delivery::Sent { metering_record_id } => tx.execute(
            "UPDATE records SET state = 'sent', metering_record_id = ?3, sent_at = ?4, \
             attempts = attempts + 1, updated_at = ?4 WHERE hour = ?1 AND dimension = ?2",
            params![hour, dimension, metering_record_id, now],
        ),
        Delivery::Failed { error } => tx.execute(
            "UPDATE records SET attempts = attempts + 1, last_error = ?3, updated_at = ?4 \
             WHERE hour = ?1 AND dimension = ?2 AND state = 'pending'",
            params![hour, dimension, error, now],
        ),
        Delivery::Final { state, error } => tx.execute(
            "UPDATE records SET state = ?3, last_error = ?4, updated_at = ?5 \
             WHERE hour = ?1 AND dimension = ?2 AND state = 'pending'",
            params![hour, dimension, state.as_str(), error, now],
        ),
    }
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 1_800_000_000 - 1_800_000_000 % HOUR_SECS;

    fn policy() -> SealPolicy {
        SealPolicy {
            dimensions: vec!["requests".into(), "gigabytes".into()],
            report_zero: true,
            max_allocations: 500,
            ..SealPolicy::default()
        }
    }

    fn event(dimension: &str, quantity: i64, id: Option<&str>) -> Event {
        Event {
            dimension: dimension.into(),
            tags: TagSet::new(),
            measure: Measure::Sum(quantity),
            id: id.map(str::to_owned),
        }
    }

    /// `name` in the private directory of the state dir `dir`, which is created (0700) if missing.
    fn in_private(dir: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::DirBuilderExt;
        let private = dir.join(PRIVATE_DIR);
        if !private.exists() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&private)
                .expect("private dir");
        }
        private.join(name)
    }

    fn total(rows: &[UsageRow], dimension: &str) -> i64 {
        rows.iter()
            .filter(|r| r.dimension == dimension)
            .map(|r| r.quantity)
            .sum()
    }

    #[tokio::test]
    async fn appended_counts_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
            let out = ledger
                .append(
                    vec![event("requests", 3, None), event("requests", 4, None)],
                    H + 10,
                )
                .await
                .expect("append");
            assert_eq!(
                out,
                AppendOutcome {
                    accepted: 2,
                    duplicates: 0,
                    hour: H
                }
            );
        }
        let ledger = reopen(dir.path(), H + 20).await;
        assert_eq!(ledger.identity().first_start, H);
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            7
        );
    }

    #[tokio::test]
    async fn agent_state_survives_reopen_and_can_be_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
            assert_eq!(ledger.state("contract").await.expect("read"), None);
            ledger
                .put_state("contract", Some("{\"token\":\"t-1\"}".to_owned()))
                .await
                .expect("put");
        }
        let ledger = reopen(dir.path(), H + 20).await;
        assert_eq!(
            ledger.state("contract").await.expect("read").as_deref(),
            Some("{\"token\":\"t-1\"}")
        );
        // Entries live apart from the ledger's own meta keys.
        assert_eq!(ledger.state("instance_id").await.expect("read"), None);
        ledger.put_state("contract", None).await.expect("remove");
        assert_eq!(ledger.state("contract").await.expect("read"), None);
    }

    /// Events that each add a new, long tag set: every commit writes fresh pages.
    fn fresh_rows(request: usize, count: usize) -> Vec<Event> {
        (0..count)
            .map(|i| Event {
                dimension: "requests".into(),
                tags: TagSet::from([(
                    "tenant".to_owned(),
                    format!("tenant-{request:05}-{i:03}-{}", "x".repeat(120)),
                )]),
                measure: Measure::Sum(1),
                id: None,
            })
            .collect()
    }

    fn wal_bytes(dir: &Path) -> u64 {
        std::fs::metadata(in_private(dir, "ledger.sqlite3-wal")).map_or(0, |m| m.len())
    }

    #[tokio::test]
    async fn the_wal_stays_bounded_under_continuous_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        // 500 commits of 40 new rows: several MiB of pages in all, with no pause between them.
        for request in 0..500 {
            ledger
                .append(fresh_rows(request, 40), H + 10)
                .await
                .expect("append");
        }
        let stats = ledger.commit_stats();
        assert!(stats.checkpoints.load(Ordering::Relaxed) >= 1);
        assert_eq!(stats.checkpoint_failures.load(Ordering::Relaxed), 0);
        let db = std::fs::metadata(ledger_path(dir.path()))
            .expect("db")
            .len();
        let wal = wal_bytes(dir.path());
        assert!(db + wal > 4 << 20, "the test wrote only {} bytes", db + wal);
        assert!(
            wal < 2 << 20,
            "the WAL grew to {wal} bytes; checkpoints should restart it at 1 MiB"
        );
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            500 * 40
        );
    }

    #[tokio::test]
    async fn a_reader_holding_old_frames_delays_the_wal_restart_without_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        ledger
            .append(fresh_rows(0, 10), H + 10)
            .await
            .expect("append");
        // A reader (say `sqlite3` on the file) keeps a snapshot open.
        let reader = Connection::open(ledger_path(dir.path())).expect("reader");
        reader.execute_batch("BEGIN").expect("begin");
        let rows: i64 = reader
            .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
            .expect("read");
        assert_eq!(rows, 10);
        for request in 1..120 {
            ledger
                .append(fresh_rows(request, 40), H + 10)
                .await
                .expect("append while a reader is behind");
        }
        let stats = ledger.commit_stats();
        let pinned = stats.wal_pages.load(Ordering::Relaxed);
        assert!(pinned > CHECKPOINT_PAGES as u64, "WAL pages {pinned}");
        assert_eq!(stats.checkpoint_failures.load(Ordering::Relaxed), 0);
        reader.execute_batch("COMMIT").expect("end read");
        drop(reader);
        for request in 120..240 {
            ledger
                .append(fresh_rows(request, 40), H + 10)
                .await
                .expect("append");
        }
        let after = stats.wal_pages.load(Ordering::Relaxed);
        assert!(
            after < CHECKPOINT_PAGES as u64 * 2,
            "the WAL did not restart once the reader left: {after} pages (was {pinned})"
        );
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            10 + 239 * 40
        );
    }

    #[tokio::test]
    async fn event_ids_count_once_within_seven_hours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        let first = ledger
            .append(
                vec![
                    event("requests", 5, Some("e1")),
                    event("requests", 5, Some("e1")),
                ],
                H,
            )
            .await
            .expect("append");
        assert_eq!((first.accepted, first.duplicates), (1, 1));
        let again = ledger
            .append(vec![event("requests", 5, Some("e1"))], H + 60)
            .await
            .expect("append");
        assert_eq!((again.accepted, again.duplicates), (0, 1));
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            5
        );
        let later = H + EVENT_ID_RETENTION_SECS + 1;
        let after = ledger
            .append(vec![event("requests", 5, Some("e1"))], later)
            .await
            .expect("append");
        assert_eq!(after.accepted, 1, "an id older than 7 hours counts again");
    }

    #[tokio::test]
    async fn folded_requests_count_ids_once_and_skip_keys_of_duplicates_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        let tagged = |dimension: &str, quantity, tenant: &str, id: Option<&str>| Event {
            tags: [("tenant".to_owned(), tenant.to_owned())].into(),
            ..event(dimension, quantity, id)
        };
        let out = ledger
            .append(
                vec![
                    tagged("requests", 0, "t1", None),
                    tagged("requests", 2, "t1", Some("e1")),
                    tagged("requests", 3, "t1", Some("e1")),
                    tagged("requests", 4, "t2", None),
                    event("gigabytes", 1, Some("e2")),
                ],
                H,
            )
            .await
            .expect("append");
        assert_eq!((out.accepted, out.duplicates), (4, 1));
        let again = ledger
            .append(
                vec![
                    tagged("requests", 5, "t9", Some("e1")),
                    event("gigabytes", 1, Some("e2")),
                ],
                H + 1,
            )
            .await
            .expect("append");
        assert_eq!((again.accepted, again.duplicates), (0, 2));
        let rows = ledger.usage_of_hour(H).await.expect("usage");
        let quantities: Vec<(String, Option<String>, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r.dimension.clone(),
                    r.tags.get("tenant").cloned(),
                    r.quantity,
                )
            })
            .collect();
        assert_eq!(
            quantities,
            vec![
                ("gigabytes".to_owned(), None, 1),
                ("requests".to_owned(), Some("t1".to_owned()), 2),
                ("requests".to_owned(), Some("t2".to_owned()), 4),
            ],
            "a key whose only events were duplicates gets no row"
        );
    }

    #[tokio::test]
    async fn hourly_cap_rejects_the_whole_request_and_keeps_earlier_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        ledger
            .append(vec![event("requests", MAX_QUANTITY - 1, None)], H)
            .await
            .expect("append");
        let err = ledger
            .append(
                vec![event("gigabytes", 1, Some("g")), event("requests", 2, None)],
                H,
            )
            .await
            .expect_err("over the cap");
        assert!(
            matches!(err, LedgerError::HourlyCapExceeded { .. }),
            "{err}"
        );
        let rows = ledger.usage_of_hour(H).await.expect("usage");
        assert_eq!(total(&rows, "requests"), MAX_QUANTITY - 1);
        assert_eq!(
            total(&rows, "gigabytes"),
            0,
            "rejected request left nothing behind"
        );
        // The rejected id was not remembered either.
        let ok = ledger
            .append(vec![event("gigabytes", 1, Some("g"))], H)
            .await
            .expect("append");
        assert_eq!(ok.accepted, 1);
        ledger
            .append(vec![event("requests", 1, None)], H)
            .await
            .expect("exactly at the cap");
    }

    // -----------------------------------------------------------------------------------------
    // Every aggregation against a reference model: random streams with duplicate ids, restarts
    // without a seal (a kill -9: the ledger dropped and opened again) and shutdown flushes of
    // the open hour; what is sealed must equal what the model computes from the acknowledged
    // events, per dimension-hour and per allocation.

    /// (dimension index, tenant, quantity, id, distinct value)
    type Spec = (usize, Option<u8>, i64, Option<u8>, u8);

    #[derive(Debug, Clone)]
    enum Op {
        Post(Vec<Spec>),
        Advance(i64),
        Reopen,
        Flush,
    }

    const AGG_DIMS: [(&str, Aggregation); 4] = [
        ("s", Aggregation::Sum),
        ("m", Aggregation::Max),
        ("l", Aggregation::Last),
        ("u", Aggregation::Unique),
    ];

    fn agg_policy() -> SealPolicy {
        SealPolicy {
            dimensions: AGG_DIMS.iter().map(|(d, _)| (*d).to_owned()).collect(),
            report_zero: true,
            max_allocations: 500,
            aggregation: AGG_DIMS
                .iter()
                .map(|(d, a)| ((*d).to_owned(), *a))
                .collect(),
            ..SealPolicy::default()
        }
    }

    fn tenant_tags(tenant: Option<u8>) -> TagSet {
        tenant
            .map(|t| TagSet::from([("tenant".to_owned(), format!("t{t}"))]))
            .unwrap_or_default()
    }

    fn spec_event((d, tenant, q, id, value): &Spec) -> Event {
        let (dimension, aggregation) = AGG_DIMS[*d];
        Event {
            dimension: dimension.to_owned(),
            tags: tenant_tags(*tenant),
            measure: Measure::of(aggregation, *q).unwrap_or(Measure::Unique(format!("v{value}"))),
            // Ids per dimension: one id names one event.
            id: id.map(|i| format!("{dimension}-{i}")),
        }
    }

    /// The reference: each aggregation's definition over the acknowledged events, in order.
    #[derive(Default)]
    struct Reference {
        seen: std::collections::HashSet<String>,
        floor: i64,
        sums: BTreeMap<(i64, &'static str), BTreeMap<TagSet, i64>>,
        /// (value, tags) of the first event that reached the hour's max / of the last event.
        gauges: BTreeMap<(i64, &'static str), (i64, TagSet)>,
        /// value → tag set of its first occurrence.
        distinct: BTreeMap<(i64, &'static str), BTreeMap<String, TagSet>>,
    }

    use std::collections::BTreeMap;

    impl Reference {
        fn post(&mut self, specs: &[Spec], now: i64) {
            let hour = hour_floor(now).max(self.floor);
            for spec in specs {
                let event = spec_event(spec);
                if let Some(id) = &event.id {
                    if !self.seen.insert(id.clone()) {
                        continue;
                    }
                }
                let (dimension, _) = AGG_DIMS[spec.0];
                let key = (hour, dimension);
                match event.measure {
                    Measure::Sum(q) => {
                        *self
                            .sums
                            .entry(key)
                            .or_default()
                            .entry(event.tags)
                            .or_default() += q
                    }
                    Measure::Max(q) => {
                        let g = self.gauges.entry(key).or_insert((-1, TagSet::new()));
                        if q > g.0 {
                            *g = (q, event.tags);
                        }
                    }
                    Measure::Last(q) => {
                        self.gauges.insert(key, (q, event.tags));
                    }
                    Measure::Unique(v) => {
                        self.distinct
                            .entry(key)
                            .or_default()
                            .entry(v)
                            .or_insert(event.tags);
                    }
                }
            }
        }

        /// The expected quantity and allocations (tag set → quantity; `None` without tags).
        fn expected(
            &self,
            hour: i64,
            dimension: &'static str,
        ) -> (i64, Option<BTreeMap<TagSet, i64>>) {
            let key = (hour, dimension);
            let per_tags: BTreeMap<TagSet, i64> =
                match AGG_DIMS.iter().find(|(d, _)| *d == dimension) {
                    Some((_, Aggregation::Sum)) => self.sums.get(&key).cloned().unwrap_or_default(),
                    Some((_, Aggregation::Unique)) => {
                        let mut counts = BTreeMap::new();
                        for tags in self.distinct.get(&key).into_iter().flat_map(|m| m.values()) {
                            *counts.entry(tags.clone()).or_default() += 1;
                        }
                        counts
                    }
                    _ => self
                        .gauges
                        .get(&key)
                        .map(|(v, tags)| BTreeMap::from([(tags.clone(), *v)]))
                        .unwrap_or_default(),
                };
            let quantity = per_tags.values().sum();
            let per_tags: BTreeMap<TagSet, i64> =
                per_tags.into_iter().filter(|(_, q)| *q > 0).collect();
            let tagged = per_tags.keys().any(|t| !t.is_empty());
            (quantity, tagged.then_some(per_tags))
        }
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let spec = (
            0usize..4,
            prop::option::of(0u8..3),
            0i64..50,
            prop::option::of(0u8..12),
            0u8..6,
        );
        prop_oneof![
            6 => prop::collection::vec(spec, 1..6).prop_map(Op::Post),
            2 => (1i64..1500).prop_map(Op::Advance),
            1 => Just(Op::Reopen),
            1 => Just(Op::Flush),
        ]
    }

    async fn run_model(ops: Vec<Op>) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::prop_assert_eq;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut now = H + 10;
        let mut ledger = Ledger::open(dir.path(), "prod-a", now).expect("open");
        let mut reference = Reference::default();
        for op in ops {
            match op {
                Op::Post(specs) => {
                    let events = specs.iter().map(spec_event).collect();
                    let out = ledger.append(events, now).await.expect("append");
                    prop_assert_eq!(out.hour, hour_floor(now).max(reference.floor));
                    reference.post(&specs, now);
                }
                Op::Advance(seconds) => now += seconds,
                Op::Reopen => {
                    ledger.closed().await;
                    ledger = reopen(dir.path(), now).await;
                }
                Op::Flush => {
                    let open = ledger.open_hour(now);
                    ledger
                        .seal_through(open + HOUR_SECS, now, agg_policy())
                        .await
                        .expect("flush");
                    reference.floor = open + HOUR_SECS;
                }
            }
        }
        let end = ledger.open_hour(now) + HOUR_SECS;
        ledger
            .seal_through(end, now, agg_policy())
            .await
            .expect("seal");
        let records = ledger.recent_records(10_000).await.expect("records");
        prop_assert_eq!(records.len() as i64, (end - H) / HOUR_SECS * 4);
        for record in records {
            let (dimension, _) = AGG_DIMS
                .iter()
                .find(|(d, _)| *d == record.dimension)
                .expect("a configured dimension");
            let (quantity, allocations) = reference.expected(record.hour, dimension);
            prop_assert_eq!(
                record.quantity,
                quantity,
                "{} at {}",
                dimension,
                record.hour
            );
            let billed = record.allocations.map(|a| {
                a.into_iter()
                    .map(|a| (a.tags, a.quantity))
                    .collect::<BTreeMap<_, _>>()
            });
            prop_assert_eq!(billed, allocations, "{} at {}", dimension, record.hour);
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(40))]
        #[test]
        fn every_aggregation_bills_what_the_reference_model_computes(
            ops in proptest::collection::vec(arb_op(), 1..24),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(run_model(ops))?;
        }
    }

    fn unique(value: &str, id: Option<&str>) -> Event {
        Event {
            dimension: "u".into(),
            tags: TagSet::new(),
            measure: Measure::Unique(value.to_owned()),
            id: id.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn a_unique_dimension_hour_holds_at_most_the_bound_and_refuses_whole_requests_beyond() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        let full: Vec<Event> = (0..MAX_DISTINCT_PER_HOUR)
            .map(|i| unique(&format!("user-{i}"), None))
            .collect();
        ledger.append(full, H + 1).await.expect("up to the bound");
        let over = vec![
            event("requests", 5, Some("r1")),
            unique("user-0", None),
            unique("someone-new", Some("n1")),
        ];
        let err = ledger
            .append(over.clone(), H + 2)
            .await
            .expect_err("one more");
        assert_eq!(
            err,
            LedgerError::DistinctCapExceeded {
                dimension: "u".into(),
                hour: H,
                limit: MAX_DISTINCT_PER_HOUR
            }
        );
        assert!(err.to_string().contains("at most 100000"), "{err}");
        // Nothing of the refused request was kept: not its sum, not its ids.
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            0
        );
        ledger
            .append(
                vec![unique("user-7", None), event("requests", 1, Some("r1"))],
                H + 3,
            )
            .await
            .expect("values already counted are fine, and the id was not remembered");
        // The bound holds after a restart too (the count is read from disk).
        drop(ledger);
        let ledger = reopen(dir.path(), H + 4).await;
        ledger
            .append(vec![unique("someone-new", None)], H + 4)
            .await
            .expect_err("still full");
        let next = ledger
            .append(over, H + HOUR_SECS + 1)
            .await
            .expect("the next hour takes new values");
        assert_eq!(
            (next.accepted, next.duplicates),
            (2, 1),
            "r1 was counted at H+3"
        );
        let rows = ledger.usage_of_hour(H).await.expect("usage");
        assert_eq!(total(&rows, "u"), MAX_DISTINCT_PER_HOUR);
        // Sealed, the hour's distinct values are deleted; the record keeps the count.
        let policy = SealPolicy {
            dimensions: vec!["u".into()],
            aggregation: BTreeMap::from([("u".to_owned(), Aggregation::Unique)]),
            report_zero: true,
            max_allocations: 500,
            ..SealPolicy::default()
        };
        ledger
            .seal_through(H + HOUR_SECS, H + HOUR_SECS + 5, policy)
            .await
            .expect("seal");
        let record = &ledger.pending_records().await.expect("records")[0];
        assert_eq!(record.quantity, MAX_DISTINCT_PER_HOUR);
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "u"),
            0
        );
    }

    #[tokio::test]
    async fn running_time_is_split_into_hours_capped_and_never_added_to_a_sealed_hour() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        ledger.record_run(H + 600, H + 1800).await.expect("run");
        ledger
            .record_run(H + 3000, H + HOUR_SECS + 120)
            .await
            .expect("across the boundary");
        assert_eq!(ledger.run_seconds(H).await.expect("seconds"), 1200 + 600);
        assert_eq!(
            ledger.run_seconds(H + HOUR_SECS).await.expect("seconds"),
            120
        );
        ledger.record_run(H, H + 2 * HOUR_SECS).await.expect("run");
        assert_eq!(
            ledger.run_seconds(H).await.expect("seconds"),
            3600,
            "capped"
        );
        ledger
            .seal_through(H + HOUR_SECS, H + HOUR_SECS + 5, policy())
            .await
            .expect("seal");
        ledger
            .record_run(H + 3500, H + HOUR_SECS + 10)
            .await
            .expect("run");
        assert_eq!(ledger.run_seconds(H).await.expect("seconds"), 3600);
        assert_eq!(
            ledger.run_seconds(H + HOUR_SECS).await.expect("seconds"),
            3600,
            "the part in the sealed hour was dropped"
        );
    }

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

    async fn reopen(dir: &Path, now: i64) -> Ledger {
        // The writer thread exits once the last handle is gone; wait for the lock to free.
        loop {
            match Ledger::open(dir, "prod-a", now) {
                Ok(l) => break l,
                Err(LedgerError::Locked(_)) => tokio::task::yield_now().await,
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn one_group_sums_requests_refuses_one_alone_and_seals_what_came_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Ledger::open(dir.path(), "prod-a", H)
            .expect("open")
            .identity()
            .clone();
        let conn = open_connection(&ledger_path(dir.path()), OpenFlags::SQLITE_OPEN_READ_WRITE)
            .expect("connection");
        conn.pragma_update(None, "synchronous", "FULL")
            .expect("pragma");
        let mut writer = Writer {
            conn,
            identity,
            sealed_floor: Arc::new(AtomicI64::new(0)),
            counters: Counters::default(),
            stats: Arc::default(),
            checkpoint_at_pages: CHECKPOINT_PAGES,
            last_checkpoint: Instant::now(),
            writable: Arc::new(AtomicBool::new(true)),
        };
        let mut appends = Vec::new();
        let mut append = |events: Vec<Event>, received_at: i64| {
            let (reply, answer) = oneshot::channel();
            appends.push(answer);
            Command::Append {
                events: Folded::new(events),
                received_at,
                reply,
            }
        };
        let group = vec![
            append(vec![event("requests", 3, None)], H + 10),
            append(vec![event("requests", 4, None)], H + 11),
            append(vec![event("requests", MAX_QUANTITY, None)], H + 12),
            append(vec![event("requests", 5, Some("d"))], H + 13),
            append(vec![event("requests", 5, Some("d"))], H + 14),
        ];
        let after_seal = append(vec![event("requests", 1, None)], H + 20);
        let (reply, mut sealed) = oneshot::channel();
        let seal = Command::Seal {
            end_exclusive: H + HOUR_SECS,
            now: H + HOUR_SECS + 5,
            policy: policy(),
            reply,
        };
        writer.apply_group(group.into_iter().chain([seal, after_seal]).collect());
        drop(writer);

        let outcomes: Vec<_> = appends
            .iter_mut()
            .map(|a| a.try_recv().expect("answered"))
            .collect();
        let counted = |i: usize| outcomes[i].as_ref().map(|o| (o.accepted, o.hour)).ok();
        assert_eq!(counted(0), Some((1, H)));
        assert_eq!(counted(1), Some((1, H)));
        assert!(
            matches!(outcomes[2], Err(LedgerError::HourlyCapExceeded { .. })),
            "{:?}",
            outcomes[2]
        );
        assert_eq!(counted(3), Some((1, H)));
        assert_eq!(outcomes[4].as_ref().map(|o| o.duplicates).ok(), Some(1));
        assert_eq!(counted(5), Some((1, H + HOUR_SECS)), "after the seal");
        assert_eq!(
            sealed.try_recv().expect("sealed").expect("seal").hours,
            vec![H]
        );

        let ledger = reopen(dir.path(), H + HOUR_SECS).await;
        let records = ledger.pending_records().await.expect("records");
        let requests = records
            .iter()
            .find(|r| r.dimension == "requests")
            .expect("requests record");
        assert_eq!((requests.hour, requests.quantity), (H, 3 + 4 + 5));
        let next = ledger.usage_of_hour(H + HOUR_SECS).await.expect("usage");
        assert_eq!(total(&next, "requests"), 1);
    }

    #[tokio::test]
    async fn sealing_writes_one_record_per_dimension_and_carries_later_usage_forward() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H + 100).expect("open");
        ledger
            .append(vec![event("requests", 9, None)], H + 200)
            .await
            .expect("append");
        let sealed = ledger
            .seal_through(H + HOUR_SECS, H + HOUR_SECS + 5, policy())
            .await
            .expect("seal");
        assert_eq!((sealed.hours.clone(), sealed.records), (vec![H], 2));
        let records = ledger.pending_records().await.expect("pending");
        assert_eq!(records.len(), 2);
        let req = records
            .iter()
            .find(|r| r.dimension == "requests")
            .expect("requests");
        assert_eq!(
            (req.quantity, req.timestamp),
            (9, H + 100),
            "timestamp not before first start"
        );
        assert_eq!(ledger.sealed_floor(), H + HOUR_SECS);
        // A late or clock-stepped event for the sealed hour goes to the next one.
        let late = ledger
            .append(vec![event("requests", 1, None)], H + 3000)
            .await
            .expect("append");
        assert_eq!(late.hour, H + HOUR_SECS);
        // Sealing again is a no-op for the same range.
        let again = ledger
            .seal_through(H + HOUR_SECS, H + HOUR_SECS + 9, policy())
            .await
            .expect("seal");
        assert!(again.hours.is_empty());
    }

    #[tokio::test]
    async fn delivery_states_are_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        ledger
            .seal_through(H + HOUR_SECS, H + HOUR_SECS, policy())
            .await
            .expect("seal");
        ledger
            .record_delivery(
                H,
                "requests",
                Delivery::Failed {
                    error: "ThrottlingException: slow down".into(),
                },
                H + HOUR_SECS,
            )
            .await
            .expect("failed");
        ledger
            .record_delivery(
                H,
                "requests",
                Delivery::Sent {
                    metering_record_id: "rec-1".into(),
                },
                H + HOUR_SECS,
            )
            .await
            .expect("sent");
        ledger
            .record_delivery(
                H,
                "gigabytes",
                Delivery::Final {
                    state: RecordState::Dead,
                    error: "window passed".into(),
                },
                H + HOUR_SECS,
            )
            .await
            .expect("dead");
        let stats = ledger.stats().await.expect("stats");
        assert_eq!((stats.pending, stats.sent, stats.dead), (0, 1, 1));
        let recent = ledger.recent_records(10).await.expect("records");
        let req = recent
            .iter()
            .find(|r| r.dimension == "requests")
            .expect("requests");
        assert_eq!(
            (req.attempts, req.metering_record_id.as_deref()),
            (2, Some("rec-1"))
        );
    }

    #[tokio::test]
    async fn old_empty_hours_are_sealed_without_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        let now = H + 10 * HOUR_SECS;
        let out = ledger
            .seal_through(hour_floor(now), now, policy())
            .await
            .expect("seal");
        assert_eq!(out.hours.len(), 10);
        // Only hours still inside the 6-hour window get zero records: H+5h..H+9h at H+10h.
        assert_eq!(out.records, 2 * 5);
    }

    #[test]
    fn a_second_process_is_locked_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Ledger::open(dir.path(), "prod-a", H).expect("open");
        let err = Ledger::open(dir.path(), "prod-a", H).expect_err("locked");
        assert!(matches!(err, LedgerError::Locked(_)), "{err}");
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

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o7777
    }

    fn euid() -> u32 {
        rustix::process::geteuid().as_raw()
    }

    /// Waits until no writer thread holds the lock of the state dir `dir`.
    fn wait_unlocked(dir: &Path) {
        let private = std::fs::File::open(dir.join(PRIVATE_DIR)).expect("private dir");
        while private.try_lock().is_err() {
            std::thread::yield_now();
        }
    }

    fn refused(result: Result<Ledger, LedgerError>, what: &str) -> String {
        match result {
            Err(LedgerError::Unsafe(why)) => why,
            Err(e) => panic!("{what}: refused for another reason: {e}"),
            Ok(_) => panic!("{what}: opened"),
        }
    }

    #[test]
    fn a_deleted_lock_file_does_not_admit_a_second_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Ledger::open(dir.path(), "prod-a", H).expect("open");
        // The lock file of the layout before the private directory: nothing depends on it.
        let _ = std::fs::remove_file(dir.path().join("meterd.lock"));
        let err = Ledger::open(dir.path(), "prod-a", H).expect_err("still locked");
        assert!(matches!(err, LedgerError::Locked(_)), "{err}");
        // A second path to the same directory meets the same lock.
        let other = tempfile::tempdir().expect("tempdir");
        let alias = other.path().join("state");
        std::os::unix::fs::symlink(dir.path(), &alias).expect("symlink");
        let err = Ledger::open(&alias, "prod-a", H).expect_err("same directory");
        assert!(matches!(err, LedgerError::Locked(_)), "{err}");
    }

    #[tokio::test]
    async fn a_ledger_linked_to_another_agents_ledger_is_refused() {
        let live = tempfile::tempdir().expect("tempdir");
        let agent = Ledger::open(live.path(), "prod-a", H).expect("open");
        let target = ledger_path(live.path());
        let link = |at: &Path| std::os::unix::fs::symlink(&target, at).expect("symlink");

        let other = tempfile::tempdir().expect("tempdir");
        link(&in_private(other.path(), LEDGER_FILE));
        let why = refused(Ledger::open(other.path(), "prod-a", H), "symlinked ledger");
        assert!(why.contains("symbolic link"), "{why}");

        // In the old place, where a ledger of the old layout would be moved from.
        let other = tempfile::tempdir().expect("tempdir");
        link(&other.path().join(LEDGER_FILE));
        let why = refused(
            Ledger::open(other.path(), "prod-a", H),
            "old-layout symlink",
        );
        assert!(why.contains("symbolic link"), "{why}");

        let other = tempfile::tempdir().expect("tempdir");
        std::fs::hard_link(&target, in_private(other.path(), LEDGER_FILE)).expect("hard link");
        let why = refused(Ledger::open(other.path(), "prod-a", H), "hard link");
        assert!(why.contains("hard links"), "{why}");
        std::fs::remove_file(in_private(other.path(), LEDGER_FILE)).expect("unlink");

        let other = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(
            live.path().join(PRIVATE_DIR),
            other.path().join(PRIVATE_DIR),
        )
        .expect("symlink");
        let why = refused(Ledger::open(other.path(), "prod-a", H), "symlinked dir");
        assert!(why.contains("symbolic link"), "{why}");

        // The live agent never noticed.
        agent
            .append(vec![event("requests", 1, None)], H)
            .await
            .expect("the live agent still writes");
        assert!(std::fs::symlink_metadata(&target)
            .expect("ledger")
            .is_file());
    }

    #[test]
    fn planted_links_create_nothing_outside_the_state_dir() {
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().join("created-through-a-link");
        for (planted, opens) in [
            ("meterd.lock", true),
            ("private", false),
            ("private/ledger.sqlite3", false),
            ("private/ledger.sqlite3-wal", false),
            ("private/ledger.sqlite3-shm", false),
            ("private/ledger.sqlite3-journal", false),
            // A leftover name of an interrupted first start is removed, never followed.
            ("private/ledger.sqlite3.new", true),
            ("private/ledger.sqlite3.new-journal", true),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            if planted.starts_with("private/") {
                in_private(dir.path(), "");
            }
            std::os::unix::fs::symlink(&target, dir.path().join(planted)).expect("symlink");
            let result = Ledger::open(dir.path(), "prod-a", H);
            if opens {
                result.unwrap_or_else(|e| panic!("{planted}: {e}"));
            } else {
                refused(result, planted);
            }
            assert!(
                std::fs::read_dir(outside.path())
                    .expect("outside")
                    .next()
                    .is_none(),
                "a link at {planted} made meterd create a file outside the state dir"
            );
        }
    }

    #[test]
    fn files_of_another_uid_are_refused_with_the_ledger_exit_code() {
        use std::os::unix::fs::chown;
        if euid() != 0 {
            println!("skipped: files_of_another_uid_are_refused needs root to chown to uid 65534");
            return;
        }
        let nobody = Some(65534);
        let make = || {
            let dir = tempfile::tempdir().expect("tempdir");
            drop(Ledger::open(dir.path(), "prod-a", H).expect("open"));
            wait_unlocked(dir.path());
            dir
        };
        let dir = make();
        chown(dir.path().join(PRIVATE_DIR), nobody, None).expect("chown");
        let why = refused(Ledger::open(dir.path(), "prod-a", H), "foreign dir");
        assert!(why.contains("uid 65534"), "{why}");

        let dir = make();
        chown(ledger_path(dir.path()), nobody, None).expect("chown");
        let result = Ledger::open(dir.path(), "prod-a", H);
        let err = result.as_ref().err().cloned().expect("refused");
        assert!(refused(result, "foreign ledger").contains("uid 65534"));
        assert_eq!(
            crate::agent::AgentError::from(err).exit_code(),
            crate::agent::EXIT_LEDGER
        );

        // Another user's WAL beside our ledger would be replayed into it.
        let dir = make();
        let wal = in_private(dir.path(), "ledger.sqlite3-wal");
        std::fs::write(&wal, b"").expect("wal");
        chown(&wal, nobody, None).expect("chown");
        refused(Ledger::open(dir.path(), "prod-a", H), "foreign WAL");

        // A ledger of the old layout that another user put there is not moved in.
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join(LEDGER_FILE);
        std::fs::write(&old, b"").expect("old ledger");
        chown(&old, nobody, None).expect("chown");
        refused(Ledger::open(dir.path(), "prod-a", H), "foreign old ledger");
        assert!(old.exists() && !ledger_path(dir.path()).exists());
    }

    #[tokio::test]
    async fn a_world_writable_state_dir_works_through_a_private_dir_of_mode_0700() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        // A Kubernetes emptyDir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open in a 0777 state dir");
        assert_eq!(ledger.path(), ledger_path(dir.path()));
        ledger
            .append(vec![event("requests", 1, None)], H)
            .await
            .expect("append");
        let private = dir.path().join(PRIVATE_DIR);
        assert_eq!(mode(&private), 0o700);
        for name in [LEDGER_FILE, "ledger.sqlite3-wal", "ledger.sqlite3-shm"] {
            let path = private.join(name);
            assert_eq!(mode(&path), 0o600, "{name}");
            assert_eq!(
                std::fs::metadata(&path).expect("meta").uid(),
                euid(),
                "{name}"
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "only the private directory is created in state.dir"
        );
        // kubelet's fsGroup adds group write on every mount: narrowed at the next start.
        drop(ledger);
        wait_unlocked(dir.path());
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o2770)).expect("chmod");
        std::fs::set_permissions(
            private.join(LEDGER_FILE),
            std::fs::Permissions::from_mode(0o660),
        )
        .expect("chmod");
        let ledger = reopen(dir.path(), H).await;
        assert_eq!(mode(&private) & 0o777, 0o700);
        assert_eq!(mode(&private.join(LEDGER_FILE)), 0o600);
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lock_is_released_when_the_writer_thread_ends_and_not_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        // Another connection holds the write lock: the writer thread waits in its next group.
        let blocker = Connection::open(ledger_path(dir.path())).expect("connection");
        blocker
            .execute_batch("BEGIN IMMEDIATE")
            .expect("write lock");
        {
            let mut append = Box::pin(ledger.append(vec![event("requests", 1, None)], H));
            tokio::select! {
                biased;
                _ = &mut append => panic!("answered while the write lock is taken"),
                _ = std::future::ready(()) => {}
            }
        }
        // No handle is left, but the queued request is still being written.
        drop(ledger);
        let err = Ledger::open(dir.path(), "prod-a", H).expect_err("the writer still runs");
        assert!(matches!(err, LedgerError::Locked(_)), "{err}");
        blocker.execute_batch("ROLLBACK").expect("release");
        drop(blocker);
        // The writer thread commits the request, ends, and releases the lock.
        let ledger = reopen(dir.path(), H).await;
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            1
        );
    }

    /// A ledger with 7 requests in hour H, in the old layout's place in `dir`.
    async fn old_layout_ledger(dir: &Path) -> LedgerIdentity {
        let build = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(build.path(), "prod-a", H).expect("open");
        ledger
            .append(vec![event("requests", 7, None)], H)
            .await
            .expect("append");
        let identity = ledger.identity().clone();
        drop(ledger);
        wait_unlocked(build.path());
        for suffix in ["", "-wal", "-shm"] {
            let from = in_private(build.path(), &format!("{LEDGER_FILE}{suffix}"));
            if from.exists() {
                std::fs::rename(from, dir.join(format!("{LEDGER_FILE}{suffix}"))).expect("move");
            }
        }
        identity
    }

    #[tokio::test]
    async fn a_ledger_of_the_old_layout_is_moved_into_the_private_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = old_layout_ledger(dir.path()).await;
        let old = dir.path().join(LEDGER_FILE);

        // An older meterd still running on it holds the old lock file: a second agent.
        let old_lock = std::fs::File::create(dir.path().join("meterd.lock")).expect("lock");
        old_lock.try_lock().expect("lock");
        let err = Ledger::open(dir.path(), "prod-a", H).expect_err("old agent runs");
        assert!(
            matches!(err, LedgerError::Locked(ref p) if p.ends_with("meterd.lock")),
            "{err}"
        );
        drop(old_lock);
        wait_unlocked(dir.path());
        assert!(old.exists(), "nothing moved while the old agent ran");

        // A planted link for the old lock file is refused, and nothing is created through it.
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::remove_file(dir.path().join("meterd.lock")).expect("unlink");
        std::os::unix::fs::symlink(outside.path().join("x"), dir.path().join("meterd.lock"))
            .expect("symlink");
        refused(Ledger::open(dir.path(), "prod-a", H), "linked old lock");
        wait_unlocked(dir.path());
        assert!(std::fs::read_dir(outside.path())
            .expect("dir")
            .next()
            .is_none());
        std::fs::remove_file(dir.path().join("meterd.lock")).expect("unlink");

        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("moved and opened");
        assert_eq!(ledger.identity().instance_id, identity.instance_id);
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            7
        );
        assert!(!old.exists());
        assert_eq!(mode(&ledger_path(dir.path())), 0o600);
        assert_eq!(read_records_at(dir.path(), 10).expect("records").len(), 0);

        // A ledger in both places: refused, both left where they are.
        drop(ledger);
        wait_unlocked(dir.path());
        std::fs::write(&old, b"another ledger").expect("old");
        let why = refused(Ledger::open(dir.path(), "prod-a", H), "two ledgers");
        assert!(why.contains("another one is at"), "{why}");
        assert_eq!(std::fs::read(&old).expect("old"), b"another ledger");
        assert!(ledger_path(dir.path()).exists());
    }

    #[tokio::test]
    async fn records_are_read_where_the_agent_keeps_them_and_never_through_a_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        old_layout_ledger(dir.path()).await;
        // Not moved yet (no agent of this version ran): read in the old place.
        assert!(read_records_at(dir.path(), 10)
            .expect("old layout")
            .is_empty());
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        ledger
            .seal_through(H + HOUR_SECS, H + HOUR_SECS, policy())
            .await
            .expect("seal");
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
