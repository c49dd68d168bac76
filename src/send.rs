//! Delivery: every sealed record goes out as exactly one MeterUsage, retried until AWS confirms.
//!
//! Each record carries a ClientToken derived from product, dimension, hour and instance, and
//! is sent byte-for-byte the same on every attempt, so a retry after a lost response gets the
//! original MeteringRecordId back instead of a second charge.
//!
//! Retries live here only (SDK retries are off). Throttling, server faults and transport
//! failures back off exponentially with jitter; other errors are logged at ERROR once and
//! retried at the longest back-off. A record whose timestamp leaves the service's 6-hour
//! window is dead-lettered: kept in the ledger, counted in metrics, shown in status.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_marketplacemetering::primitives::DateTime;
use aws_sdk_marketplacemetering::types::{Tag, UsageAllocation};
use aws_sdk_marketplacemetering::Client;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::aws::CallFailure;
use crate::backoff::Backoff;
use crate::clock::{rfc3339, unix_seconds, SharedClock};
use crate::ledger::{Delivery, Ledger, LedgerError, RecordState, StoredRecord, REPORT_WINDOW_SECS};
use crate::metrics::Metrics;
use crate::status::StatusBoard;

/// How one pass over the pending records ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// Nothing is pending any more.
    Done,
    /// Something failed in a way worth retrying soon.
    RetrySoon,
    /// Only errors that retrying soon will not fix remain; try again at the longest back-off.
    RetryLate,
}

pub struct Sender {
    pub client: Client,
    pub ledger: Ledger,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub status: Arc<StatusBoard>,
    pub product_code: String,
    pub backoff: Backoff,
    /// Records whose current permanent error was already logged at ERROR.
    logged: std::sync::Mutex<HashSet<(i64, String, String)>>,
}

impl Sender {
    pub fn new(
        client: Client,
        ledger: Ledger,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
        product_code: String,
        backoff: Backoff,
    ) -> Self {
        Self {
            client,
            ledger,
            clock,
            metrics,
            status,
            product_code,
            backoff,
            logged: Default::default(),
        }
    }

    /// Delivers until stopped, waking when `wake` is notified (a new seal) or a back-off ends.
    pub async fn run(&self, wake: Arc<Notify>, stop: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            // After a refusal of one record, a newly sealed hour is sent at once; after a
            // throttle or an outage, the back-off holds for every record.
            let (delay, new_seal_wakes) = match self.pass().await {
                Ok(Pass::Done) => {
                    attempt = 0;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = wake.notified() => continue,
                    }
                }
                Ok(Pass::RetrySoon) => {
                    let d = self.backoff.delay(attempt, &mut rand::thread_rng());
                    attempt = attempt.saturating_add(1);
                    (d, false)
                }
                Ok(Pass::RetryLate) => (self.backoff.max(), true),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read or update pending records");
                    (self.backoff.max(), false)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                _ = wake.notified(), if new_seal_wakes => {}
            }
        }
    }

    /// Retries passes until nothing is pending or `budget` is spent (the shutdown flush).
    pub async fn drain(&self, budget: Duration) -> Result<Pass, LedgerError> {
        let deadline = tokio::time::Instant::now() + budget;
        let mut attempt = 0u32;
        loop {
            let pass = self.pass().await?;
            if pass == Pass::Done {
                return Ok(pass);
            }
            let delay = self
                .backoff
                .delay(attempt, &mut rand::thread_rng())
                .min(self.backoff.initial() * 4);
            attempt = attempt.saturating_add(1);
            if tokio::time::Instant::now() + delay >= deadline {
                return Ok(pass);
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt at every pending record, oldest first.
    pub async fn pass(&self) -> Result<Pass, LedgerError> {
        let pending = self.ledger.pending_records().await?;
        self.metrics.records_pending.set(pending.len() as i64);
        let mut result = Pass::Done;
        for record in pending {
            match self.deliver(&record).await? {
                Pass::Done => {}
                Pass::RetrySoon => return Ok(Pass::RetrySoon),
                Pass::RetryLate => result = Pass::RetryLate,
            }
        }
        Ok(result)
    }

    async fn deliver(&self, record: &StoredRecord) -> Result<Pass, LedgerError> {
        let span = tracing::info_span!("send", dimension = %record.dimension, hour = %rfc3339(record.hour));
        async {
            let now = unix_seconds(self.clock.now());
            if now >= record.timestamp + REPORT_WINDOW_SECS {
                let error = format!(
                    "not confirmed within the service's 6-hour window (timestamp {}); last error: {}",
                    rfc3339(record.timestamp),
                    record.last_error.as_deref().unwrap_or("none")
                );
                tracing::error!(quantity = record.quantity, %error, "record dead-lettered: this usage was not billed; it stays in the ledger for reconciliation");
                self.ledger
                    .record_delivery(record.hour, &record.dimension, Delivery::Final { state: RecordState::Dead, error }, now)
                    .await?;
                self.metrics.records_dead_lettered.inc();
                return Ok(Pass::Done);
            }
            let outcome = self.meter_usage(record).await;
            let now = unix_seconds(self.clock.now());
            match outcome {
                Ok(metering_record_id) => {
                    self.ledger
                        .record_delivery(record.hour, &record.dimension, Delivery::Sent { metering_record_id: metering_record_id.clone() }, now)
                        .await?;
                    self.metrics.record_sent(&record.dimension, record.quantity);
                    self.status.update_sender(|s| {
                        s.last_success_at = Some(rfc3339(now));
                        s.consecutive_failures = 0;
                    });
                    tracing::info!(quantity = record.quantity, %metering_record_id, "record accepted");
                    Ok(Pass::Done)
                }
                Err(failure) => {
                    let code = failure.code.clone().unwrap_or_else(|| "transport".to_owned());
                    self.metrics.send_failure(&code);
                    let text = failure.to_string();
                    self.status.update_sender(|s| {
                        s.last_error = Some(text.clone());
                        s.consecutive_failures += 1;
                    });
                    if failure.code_is("DuplicateRequestException") {
                        tracing::error!(error = %text, "the service holds a different record for this dimension-hour; this record is not retried. Check for a second agent sharing this instance identity");
                        self.ledger
                            .record_delivery(record.hour, &record.dimension, Delivery::Final { state: RecordState::Duplicate, error: text }, now)
                            .await?;
                        self.metrics.records_duplicate.inc();
                        return Ok(Pass::Done);
                    }
                    self.ledger
                        .record_delivery(record.hour, &record.dimension, Delivery::Failed { error: text.clone() }, now)
                        .await?;
                    if failure.is_retryable() {
                        tracing::warn!(error = %text, "MeterUsage failed; will retry");
                        Ok(Pass::RetrySoon)
                    } else {
                        let key = (record.hour, record.dimension.clone(), code);
                        let first = self.logged.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
                        if first {
                            tracing::error!(error = %text, "MeterUsage refused the record; retrying until the 6-hour window closes. Fix the cause (see the error) to get it billed");
                        }
                        Ok(Pass::RetryLate)
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn meter_usage(&self, record: &StoredRecord) -> Result<String, CallFailure> {
        let quantity = i32::try_from(record.quantity)
            .map_err(|_| local_failure("quantity exceeds the service maximum"))?;
        let mut request = self
            .client
            .meter_usage()
            .product_code(&self.product_code)
            .timestamp(DateTime::from_secs(record.timestamp))
            .usage_dimension(&record.dimension)
            .usage_quantity(quantity)
            .client_token(&record.client_token);
        if let Some(allocations) = &record.allocations {
            for a in allocations {
                let tags = if a.tags.is_empty() {
                    None
                } else {
                    Some(
                        a.tags
                            .iter()
                            .map(|(k, v)| Tag::builder().key(k).value(v).build())
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| local_failure(&e.to_string()))?,
                    )
                };
                let quantity = i32::try_from(a.quantity)
                    .map_err(|_| local_failure("allocation exceeds the service maximum"))?;
                let allocation = UsageAllocation::builder()
                    .allocated_usage_quantity(quantity)
                    .set_tags(tags)
                    .build()
                    .map_err(|e| local_failure(&e.to_string()))?;
                request = request.usage_allocations(allocation);
            }
        }
        match request.send().await {
            Ok(out) => Ok(out.metering_record_id.unwrap_or_default()),
            Err(e) => Err(CallFailure::from_sdk(&e)),
        }
    }
}

fn local_failure(message: &str) -> CallFailure {
    CallFailure {
        code: Some("LocalValidation".to_owned()),
        message: message.to_owned(),
        status: None,
    }
}
