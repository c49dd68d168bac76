//! Row reads shared by the [`Ledger`](super::Ledger) handle, the seal transaction and
//! `meterd records`: records, an hour's counters, running time, state entries, statistics.

use rusqlite::{Connection, OptionalExtension};

use super::LedgerStats;
use crate::model::{self, RecordState, StoredRecord, UsageRow};

pub(super) fn query_records<P: rusqlite::Params>(
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
            state: record_state(r, 6)?,
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
pub(super) fn usage_rows(c: &Connection, hour: i64) -> rusqlite::Result<Vec<UsageRow>> {
    let mut rows = Vec::new();
    for_each_usage_row(c, hour, |row| rows.push(row))?;
    Ok(rows)
}

/// The rows of [`usage_rows`], handed to `visit` one at a time as SQLite steps through them,
/// ordered by dimension, tags and aggregation. Nothing is collected: a reader that renders
/// each row (`GET /v1/usage/current`) holds one parsed row at a time, not the whole hour.
pub(super) fn for_each_usage_row(
    c: &Connection,
    hour: i64,
    mut visit: impl FnMut(UsageRow),
) -> rusqlite::Result<()> {
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
    let mut rows = stmt.query([hour])?;
    while let Some(r) = rows.next()? {
        let tags = r
            .get_ref(1)?
            .as_str()
            .map_err(|e| conversion(1, Box::new(e)))?;
        let aggregation = r
            .get_ref(3)?
            .as_str()
            .map_err(|e| conversion(3, Box::new(e)))?;
        visit(UsageRow {
            dimension: r.get(0)?,
            tags: model::tagset_from_key(tags).map_err(|e| conversion(1, Box::new(e)))?,
            quantity: r.get(2)?,
            aggregation: aggregation
                .parse()
                .map_err(|e: String| conversion(3, e.into()))?,
            seq: r.get(4)?,
        });
    }
    Ok(())
}

pub(super) fn run_seconds_of(c: &Connection, hour: i64) -> rusqlite::Result<i64> {
    Ok(c.query_row(
        "SELECT seconds FROM run_seconds WHERE hour = ?1",
        [hour],
        |r| r.get(0),
    )
    .optional()?
    .unwrap_or(0))
}

/// The counts per delivery state and the newest error, for `/v1/status` and the metrics
/// (the file size is added by the caller).
pub(super) fn stats(c: &Connection) -> rusqlite::Result<LedgerStats> {
    let mut stats = LedgerStats::default();
    let mut stmt = c.prepare_cached("SELECT state, COUNT(*) FROM records GROUP BY state")?;
    let rows = stmt.query_map([], |r| Ok((record_state(r, 0)?, r.get(1)?)))?;
    for row in rows {
        let (state, n): (RecordState, i64) = row?;
        match state {
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
}

/// The `meta` entry `key`, if set.
pub(super) fn meta_value(c: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

/// Column `column` of `row` as a [`RecordState`]; a state this meterd does not know is a
/// conversion error ([`LedgerError::from_sqlite`] turns it into
/// [`LedgerError::UnknownRecordState`]), never read as some other state.
fn record_state(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<RecordState> {
    let text: String = row.get(column)?;
    RecordState::try_from(text.as_str()).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

#[cfg(test)]
mod tests {
    use crate::clock::HOUR_SECS;
    use crate::ledger::test_support::*;
    use crate::ledger::{ledger_path, read_records_of_file, LedgerError, RecordFilter};

    #[tokio::test]
    async fn a_record_state_this_meterd_does_not_know_is_an_error_not_pending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = sealed_first_hour(dir.path()).await;
        ledger.closed().await;
        // Only something other than meterd could write it: the schema's CHECK refuses it.
        let conn = rusqlite::Connection::open(ledger_path(dir.path())).expect("connection");
        conn.pragma_update(None, "ignore_check_constraints", true)
            .expect("pragma");
        conn.execute(
            "UPDATE records SET state = 'refunded' WHERE dimension = 'requests'",
            [],
        )
        .expect("plant");
        drop(conn);
        let ledger = reopen(dir.path(), H + HOUR_SECS).await;
        let unknown = |e: LedgerError| match e {
            LedgerError::UnknownRecordState(why) => why,
            other => panic!("another error: {other}"),
        };
        let why = unknown(ledger.recent_records(10).await.expect_err("unknown"));
        assert!(why.contains("\"refunded\""), "{why}");
        unknown(ledger.stats().await.expect_err("unknown"));
        unknown(
            read_records_of_file(&ledger_path(dir.path()), &RecordFilter::newest(10))
                .expect_err("unknown"),
        );
        // Records in known states are still read where the query does not meet it.
        assert_eq!(ledger.pending_records().await.expect("pending").len(), 1);
    }
}
