//! The append path: what ingest's requests (and the agent's running time) add to the ledger.
//!
//! [`Folded::new`] prepares a request on the caller's thread (canonical tag keys, the events
//! without an id folded per counter); the writer then checks it in [`append_in`] (ids, the
//! hourly cap, the distinct-value bound, inside a [`RequestSavepoint`] when it writes ids or
//! values) and adds what counts to the group's [`Increments`], written once per counter before
//! the commit. [`run_in`] records the agent's running time for the heartbeat dimensions.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::writer::Counters;
use super::{AppendOutcome, LedgerError};
use crate::clock::{hour_floor, HOUR_SECS};
use crate::model::{
    self, attributed_hour, Aggregation, Event, Measure, TagSet, EVENT_ID_RETENTION_SECS,
    MAX_DISTINCT_PER_HOUR, MAX_QUANTITY,
};

#[cfg(test)]
mod tests;

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
pub(super) struct Folded {
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
    pub(super) fn new(events: Vec<Event>) -> Self {
        // Index the distinct (dimension, tags) first, borrowing, so a tag set repeated in a
        // batch is serialized to its canonical key once.
        let (slots, distinct_keys) = index_keys(&events);
        let keys: Vec<_> = distinct_keys
            .into_iter()
            .map(|(dimension, tags, aggregation)| {
                (dimension.to_owned(), model::tagset_key(tags), aggregation)
            })
            .collect();
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

type KeyRef<'e> = (&'e str, &'e TagSet, Aggregation);

/// Requests up to this many events find their distinct keys by comparison, without hashing:
/// most requests hold one event, and hashing its tag set cost more than the rest of the fold.
const LINEAR_INDEX_MAX: usize = 16;

/// Each event's slot among the distinct (dimension, tags, aggregation) keys, and those keys in
/// slot order (first occurrence first).
fn index_keys(events: &[Event]) -> (Vec<usize>, Vec<KeyRef<'_>>) {
    fn key_of(event: &Event) -> KeyRef<'_> {
        (
            event.dimension.as_str(),
            &event.tags,
            event.measure.aggregation(),
        )
    }
    let mut keys: Vec<KeyRef<'_>> = Vec::new();
    let slots = if events.len() <= LINEAR_INDEX_MAX {
        events
            .iter()
            .map(|event| {
                let key = key_of(event);
                keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                    keys.push(key);
                    keys.len() - 1
                })
            })
            .collect()
    } else {
        let mut index: HashMap<KeyRef<'_>, usize> = HashMap::new();
        events
            .iter()
            .map(|event| {
                let key = key_of(event);
                *index.entry(key).or_insert_with(|| {
                    keys.push(key);
                    keys.len() - 1
                })
            })
            .collect()
    };
    (slots, keys)
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
pub(super) struct Increments(HashMap<(i64, String, String, Aggregation), Fold>);

impl Increments {
    fn add(&mut self, key: (i64, String, String, Aggregation), fold: Fold) {
        match self.0.get_mut(&key) {
            Some(f) => f.merge(fold),
            None => {
                self.0.insert(key, fold);
            }
        }
    }

    pub(super) fn write(&mut self, tx: &rusqlite::Transaction<'_>) -> Result<(), LedgerError> {
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
pub(super) fn append_in(
    tx: &mut rusqlite::Transaction<'_>,
    counters: &mut Counters,
    increments: &mut Increments,
    floor: i64,
    events: Folded,
    received_at: i64,
) -> Result<AppendOutcome, LedgerError> {
    let hour = attributed_hour(received_at, floor);
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
pub(super) fn run_in(
    tx: &rusqlite::Transaction<'_>,
    floor: i64,
    from: i64,
    to: i64,
) -> rusqlite::Result<()> {
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
