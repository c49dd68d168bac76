//! Delivery outcomes: how the sender's attempts change a sealed record. A record leaves
//! `pending` once, to `sent`, `dead` or `duplicate`; nothing else about it ever changes.

use rusqlite::params;

use crate::model::Delivery;

/// Records one delivery attempt of the record of (`hour`, `dimension`) ([`Delivery`]); a
/// failure or final outcome applies only to a record still pending.
pub(super) fn deliver_in(
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
    use crate::clock::HOUR_SECS;
    use crate::ledger::test_support::*;
    use crate::model::{Delivery, RecordState};

    #[tokio::test]
    async fn delivery_states_are_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = sealed_first_hour(dir.path()).await;
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
}
