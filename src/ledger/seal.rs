//! The seal transaction: a closed hour's counters become its records, on disk, in the writer's
//! group. What the records hold is computed by [`crate::seal`] (pure functions); when hours
//! are sealed is decided by [`crate::seal::schedule`]; the housekeeping that follows each seal
//! is [`super::retention`].

use rusqlite::{params, Connection};

use super::queries::{run_seconds_of, usage_rows};
use super::{retention, LedgerError, LedgerIdentity};
use crate::clock::{hour_floor, HOUR_SECS};
use crate::model::REPORT_WINDOW_SECS;
use crate::seal::{self, SealPolicy};

/// Sealing produced these records; `folded_tag_sets` feeds a warning and a metric.
#[derive(Debug, Clone, Default)]
pub struct SealOutcome {
    pub hours: Vec<i64>,
    pub records: usize,
    pub folded_tag_sets: usize,
    /// Rows recorded under another aggregation than the configured one; not billed.
    pub ignored_rows: usize,
}

/// Seals every unsealed hour before `end_exclusive` (the [`Command::Seal`] of
/// [`Ledger::seal_through`](super::Ledger::seal_through)), then runs the retention step, both in
/// one savepoint of the group's transaction: the hours, their records and the housekeeping are
/// committed together or not at all, and a failure here leaves the rest of the group alone.
///
/// [`Command::Seal`]: super::writer::Command::Seal
pub(super) fn seal_in(
    tx: &mut rusqlite::Transaction<'_>,
    identity: &LedgerIdentity,
    floor: i64,
    end_exclusive: i64,
    now: i64,
    policy: &SealPolicy,
) -> Result<SealOutcome, LedgerError> {
    let sql = |e: rusqlite::Error| LedgerError::from_sqlite(&e);
    let sp = tx.savepoint().map_err(sql)?;
    // Step 1: the hours become records.
    let (outcome, next_unsealed) = seal_hours(&sp, identity, floor, end_exclusive, now, policy)?;
    // Step 2, in the same savepoint (as it always ran): forget what can no longer matter.
    retention::forget_expired(&sp, next_unsealed.max(floor), now).map_err(sql)?;
    sp.commit().map_err(sql)?;
    Ok(outcome)
}

/// Writes the records and `sealed_hours` rows of every unsealed hour before `end_exclusive`;
/// returns what was sealed and the first hour left unsealed. Hours that are empty and out of
/// the service's window are sealed without records.
fn seal_hours(
    sp: &Connection,
    identity: &LedgerIdentity,
    floor: i64,
    end_exclusive: i64,
    now: i64,
    policy: &SealPolicy,
) -> Result<(SealOutcome, i64), LedgerError> {
    let sql = |e: rusqlite::Error| LedgerError::from_sqlite(&e);
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
        let rows = usage_rows(sp, hour).map_err(sql)?;
        let ran = run_seconds_of(sp, hour).map_err(sql)?;
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
    Ok((outcome, hour))
}

#[cfg(test)]
mod tests {
    use crate::clock::{hour_floor, HOUR_SECS};
    use crate::ledger::test_support::*;
    use crate::ledger::Ledger;

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
}
