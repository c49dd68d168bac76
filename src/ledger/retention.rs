//! Retention: what the ledger forgets, and when.
//!
//! One step, [`forget_expired`], deletes every row that can no longer matter. It runs right
//! after each seal and inside the seal's savepoint ([`super::seal`]), so a seal and its
//! housekeeping are committed together; nothing else in the ledger deletes rows.

use rusqlite::{params, Connection};

use crate::clock::HOUR_SECS;
use crate::model::EVENT_ID_RETENTION_SECS;

/// Usage counters of sealed hours are kept this long for inspection.
const USAGE_RETENTION_SECS: i64 = 24 * HOUR_SECS;

/// Delivered or dead records are kept this long for `meterd records`.
const RECORD_RETENTION_SECS: i64 = 7 * 24 * HOUR_SECS;

/// Deletes, as of `now`, with every hour before `sealed_before` sealed:
/// - event ids older than [`EVENT_ID_RETENTION_SECS`] (an id can count again after that);
/// - the counters and running time of sealed hours older than [`USAGE_RETENTION_SECS`];
/// - the distinct values of every sealed hour;
/// - records with a final outcome older than [`RECORD_RETENTION_SECS`] (pending records stay
///   until they are delivered or dead).
pub(super) fn forget_expired(c: &Connection, sealed_before: i64, now: i64) -> rusqlite::Result<()> {
    c.execute(
        "DELETE FROM event_ids WHERE accepted_at <= ?1",
        [now - EVENT_ID_RETENTION_SECS],
    )?;
    for table in ["usage", "gauges", "run_seconds"] {
        c.execute(
            &format!("DELETE FROM {table} WHERE hour < ?1 AND hour < ?2"),
            params![sealed_before, now - USAGE_RETENTION_SECS],
        )?;
    }
    // Distinct values are the bulk of a `unique` dimension's data and mean nothing once their
    // hour is sealed: they go with the seal, which bounds their disk use to the open hours.
    c.execute(
        "DELETE FROM distinct_values WHERE hour < ?1",
        [sealed_before],
    )?;
    c.execute(
        "DELETE FROM records WHERE state != 'pending' AND hour < ?1",
        [now - RECORD_RETENTION_SECS],
    )?;
    Ok(())
}
