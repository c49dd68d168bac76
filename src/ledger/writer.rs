//! The writer thread: it owns the write connection, drains the queue into groups of at most
//! [`MAX_GROUP`] commands, applies each group in one transaction and commits once (group
//! commit), then answers every command of the group with the commit's result and checkpoints
//! the WAL if due ([`super::checkpoint`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::append::{append_in, run_in, Folded, Increments};
use super::checkpoint::WAL_PAGES;
use super::deliver::deliver_in;
use super::seal::{seal_in, SealOutcome};
use super::{AppendOutcome, CommitStats, LedgerError, LedgerIdentity};
use crate::clock::HOUR_SECS;
use crate::model::Delivery;
use crate::seal::SealPolicy;

/// Commands applied in one transaction at most.
const MAX_GROUP: usize = 1024;

/// Commands waiting for the writer; senders wait when it is full (back-pressure).
pub(super) const QUEUE_DEPTH: usize = 4096;

pub(super) enum Command {
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

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) identity: LedgerIdentity,
    pub(super) sealed_floor: Arc<AtomicI64>,
    pub(super) counters: Counters,
    pub(super) stats: Arc<CommitStats>,
    /// WAL size (pages) at which the next checkpoint runs.
    pub(super) checkpoint_at_pages: i32,
    pub(super) last_checkpoint: Instant,
    pub(super) writable: Arc<AtomicBool>,
}

/// What the writer keeps in memory between groups.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Cached totals per hour and dimension, for the hourly cap.
    pub(super) totals: HashMap<i64, HashMap<String, i64>>,
    /// Cached number of distinct values per `unique` dimension-hour, for their bound.
    pub(super) distinct: HashMap<(i64, String), i64>,
    /// The receive sequence of the next event (orders `max` ties and `last`). Sequences
    /// consumed by a group that failed are skipped, never reused.
    pub(super) next_seq: i64,
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
    pub(super) fn run(mut self, mut commands: mpsc::Receiver<Command>) {
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
        self.stats.commands.fetch_add(n, Ordering::Relaxed);
        self.writable.store(commit.is_ok(), Ordering::Release);
        match &commit {
            Ok(()) => {
                // Counted with the commit, so commit seconds ÷ commits is a successful commit's time.
                self.stats
                    .commit_nanos
                    .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::checkpoint::CHECKPOINT_PAGES;
    use crate::ledger::test_support::*;
    use crate::ledger::{ledger_path, open_connection, Ledger};
    use crate::model::{Event, MAX_QUANTITY};
    use rusqlite::OpenFlags;

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
}
