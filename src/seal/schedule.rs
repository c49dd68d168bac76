//! When hours are sealed: the agent's hourly seal loop and what it reports.
//!
//! An hour is sealed `sending.seal_delay` after it closes (on the injected clock), together
//! with every closed hour left unsealed from before a restart; a failed seal is retried after
//! 5 s. The shutdown flush (in `agent::run`) seals the open hour and reports through
//! [`report_seal`] too. What a seal computes is in [`crate::seal`]; the transaction that stores
//! it (and the retention step that runs with it) is `Ledger::seal_through` in `ledger/seal.rs`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent::RunTimer;
use crate::clock::{from_unix_seconds, hour_floor, rfc3339, unix_seconds, SharedClock, HOUR_SECS};
use crate::ledger::{Ledger, SealOutcome};
use crate::metrics::Metrics;
use crate::seal::SealPolicy;

/// Seals each hour shortly after it closes (and any closed hours left from before a restart).
#[allow(clippy::too_many_arguments)]
pub async fn seal_loop(
    ledger: Ledger,
    clock: SharedClock,
    policy: SealPolicy,
    seal_delay: Duration,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    run_timer: Option<Arc<RunTimer>>,
    stop: CancellationToken,
) {
    let delay = i64::try_from(seal_delay.as_secs()).unwrap_or(0);
    loop {
        if let Some(timer) = &run_timer {
            // The closing hours' running time is complete before they are sealed.
            if let Err(e) = timer.record().await {
                tracing::warn!(error = %e, "could not record running time before sealing");
            }
        }
        let now = unix_seconds(clock.now());
        let closed_before = hour_floor(now - delay);
        let next_check = match ledger
            .seal_through(closed_before, now, policy.clone())
            .await
        {
            Ok(outcome) => {
                if !outcome.hours.is_empty() {
                    report_seal(&outcome, &metrics);
                    wake.notify_one();
                }
                from_unix_seconds(closed_before + HOUR_SECS + delay)
            }
            Err(e) => {
                tracing::error!(error = %e, "sealing failed; retrying shortly");
                clock.now() + Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = clock.sleep_until(next_check) => {}
        }
    }
}

/// Counts and logs what a seal produced: each sealed hour at INFO, folded tag sets and rows
/// of another aggregation at WARN.
pub fn report_seal(outcome: &SealOutcome, metrics: &Metrics) {
    metrics.records_sealed.inc_by(outcome.records as u64);
    metrics
        .tag_sets_folded
        .inc_by(outcome.folded_tag_sets as u64);
    for hour in &outcome.hours {
        tracing::info!(hour = %rfc3339(*hour), "hour sealed");
    }
    if outcome.ignored_rows > 0 {
        tracing::warn!(
            rows = outcome.ignored_rows,
            "usage recorded under another aggregation than the configured one (metering.aggregation or metering.heartbeat changed within the hour) was not billed"
        );
    }
    if outcome.folded_tag_sets > 0 {
        tracing::warn!(
            folded = outcome.folded_tag_sets,
            "tag sets beyond metering.max_allocations were folded into the untagged allocation"
        );
    }
}
