//! Delivery: every sealed record goes out as exactly one MeterUsage, retried until AWS confirms.
//!
//! Each record carries a ClientToken derived from product, dimension, hour and instance, and
//! is sent byte-for-byte the same on every attempt, so a retry after a lost response gets the
//! original MeteringRecordId back instead of a second charge.
//!
//! Retries live here only (SDK retries are off). Throttling, server faults and transport
//! failures back off with decorrelated jitter on the injected clock (a throttle from a tenth
//! of the spread, [`throttle_backoff`]); other errors are logged
//! at ERROR once and retried at the longest back-off. A record whose timestamp leaves the
//! service's 6-hour window is dead-lettered: kept in the ledger, counted in metrics, shown in
//! status.
//!
//! Fleet manners: a buyer's whole fleet shares the account's 10 MeterUsage calls a second.
//! A sealed hour is first sent at this agent's offset in `[0, sending.spread)` after the hour
//! closes ([`spread_offset`], from the ledger's instance id, so a restart keeps its slot); the
//! shutdown flush ignores it, and so does a record the flush sealed early but did not send. Every call, retries included, first takes a slot from one
//! [`RateLimiter`] (`sending.max_calls_per_second`).
//!
//! The sender reads and updates its records through [`RecordStore`]: the agent's is the
//! [`Ledger`]; the fleet simulation's largest runs use a store in memory, so the same sending
//! code runs without a ledger per simulated agent.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_marketplacemetering::primitives::DateTime;
use aws_sdk_marketplacemetering::types::{Tag, UsageAllocation};
use aws_sdk_marketplacemetering::Client;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::aws::CallFailure;
use crate::backoff::{retry_with, Backoff, RetryError};
use crate::clock::{rfc3339, unix_millis, unix_seconds, SharedClock, HOUR_SECS};
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::model::{Delivery, RecordState, StoredRecord, REPORT_WINDOW_SECS};
use crate::rate::RateLimiter;
use crate::status::StatusBoard;

/// What the sender needs of its records: the pending ones, oldest first, and a place for each
/// delivery outcome (as [`Ledger::record_delivery`]: a failure or final outcome applies only
/// to a record still pending).
pub trait RecordStore: Send + Sync + 'static {
    fn pending_records(
        &self,
    ) -> impl Future<Output = Result<Vec<StoredRecord>, LedgerError>> + Send;

    fn record_delivery(
        &self,
        hour: i64,
        dimension: &str,
        delivery: Delivery,
        now: i64,
    ) -> impl Future<Output = Result<(), LedgerError>> + Send;
}

impl RecordStore for Ledger {
    async fn pending_records(&self) -> Result<Vec<StoredRecord>, LedgerError> {
        Ledger::pending_records(self).await
    }

    async fn record_delivery(
        &self,
        hour: i64,
        dimension: &str,
        delivery: Delivery,
        now: i64,
    ) -> Result<(), LedgerError> {
        Ledger::record_delivery(self, hour, dimension, delivery, now).await
    }
}

/// This agent's send offset in `[0, spread)`: a uniform hash of the ledger's instance id
/// scaled onto the spread, in whole milliseconds. The same id always gets the same offset.
pub fn spread_offset(instance_id: &str, spread: Duration) -> Duration {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"meterd spread\0")
        .chain_update(instance_id.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let spread_ms = spread.as_millis().min(u128::from(u64::MAX));
    // `hash / 2^64` is uniform in [0, 1); times the spread, truncated, stays below it.
    let offset_ms = (u128::from(u64::from_be_bytes(first)) * spread_ms) >> 64;
    Duration::from_millis(u64::try_from(offset_ms).unwrap_or(0))
}

/// How one pass over the pending records ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// Nothing is pending any more (or nothing is due yet: see [`Sender::next_due`]).
    Done,
    /// Something failed in a way worth retrying soon.
    RetrySoon,
    /// The service throttled a call: the fleet has spent the account's quota for now.
    Throttled,
    /// Only errors that retrying soon will not fix remain; try again at the longest back-off.
    RetryLate,
}

pub struct Sender<S = Ledger> {
    pub client: Client,
    /// Where the records come from and their outcomes go (the ledger in the agent).
    pub store: S,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub status: Arc<StatusBoard>,
    pub product_code: String,
    pub backoff: Backoff,
    /// After a ThrottlingException ([`throttle_backoff`]).
    pub throttle: Backoff,
    /// Every MeterUsage waits here first.
    pub limiter: Arc<RateLimiter>,
    /// How long after its hour closes a sealed record is first due ([`spread_offset`]).
    pub offset: Duration,
    /// Records whose current permanent error was already logged at ERROR.
    logged: std::sync::Mutex<HashSet<(i64, String, String)>>,
    /// Epoch milliseconds when the earliest record the last pass held back becomes due.
    next_due: std::sync::Mutex<Option<i64>>,
}

/// How the sender paces its calls: retries, the call limit and the spread offset.
pub struct Pacing {
    pub backoff: Backoff,
    pub limiter: Arc<RateLimiter>,
    pub offset: Duration,
    /// `sending.spread`: a throttled call waits at least a tenth of it ([`throttle_backoff`]).
    pub spread: Duration,
}

/// The back-off after a ThrottlingException: decorrelated jitter from a floor of a tenth of
/// the spread (at least `backoff`'s initial delay, at most a third of its cap, so the first
/// retry still draws from a range three times the floor wide), capped like `backoff`.
/// A throttle says the account's quota is spent by the fleet right now, and the fleet's sends
/// for the hour span the spread: a retry one to three seconds later lands in the same crowded
/// seconds and is throttled again, one a tenth of the spread later lands where the crowd has
/// moved on. With the spread off the floor is the initial delay, as for any other failure.
pub fn throttle_backoff(backoff: Backoff, spread: Duration) -> Backoff {
    // Agents throttled in the same second must not retry in the same second again.
    let floor = (spread / 10).min(backoff.max() / 3).max(backoff.initial());
    Backoff::try_new(floor, backoff.max()).unwrap_or(backoff)
}

/// Whether a pass holds back records whose hour closed less than the offset ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    Honour,
    /// The shutdown flush: everything goes now.
    Ignore,
}

impl<S: RecordStore> Sender<S> {
    pub fn new(
        client: Client,
        store: S,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
        product_code: String,
        pacing: Pacing,
    ) -> Self {
        Self {
            client,
            store,
            clock,
            metrics,
            status,
            product_code,
            backoff: pacing.backoff,
            throttle: throttle_backoff(pacing.backoff, pacing.spread),
            limiter: pacing.limiter,
            offset: pacing.offset,
            logged: Default::default(),
            next_due: Default::default(),
        }
    }

    /// Delivers until stopped, waking when `wake` is notified (a new seal), a held-back
    /// record falls due, or a back-off ends. Every wait is on the injected clock.
    pub async fn run(&self, wake: Arc<Notify>, stop: CancellationToken) {
        let mut previous: Option<Duration> = None;
        loop {
            // A stop ends a pass before its next call (a call in flight is finished and
            // recorded), so a long pass at the call limit does not hold up the shutdown's seal
            // and flush.
            let pass = self.pass(Spread::Honour, Some(&stop)).await;
            if stop.is_cancelled() {
                return;
            }
            let now = self.clock.now();
            let due = self.next_due().map(crate::clock::from_unix_millis);
            // After a refusal of one record, a newly sealed hour is sent once due; after a
            // throttle or an outage, the back-off holds for every record.
            let (until, new_seal_wakes) = match pass {
                Ok(Pass::Done) => {
                    previous = None;
                    (due, true)
                }
                Ok(pass @ (Pass::RetrySoon | Pass::Throttled)) => {
                    let backoff = if pass == Pass::Throttled {
                        &self.throttle
                    } else {
                        &self.backoff
                    };
                    let last = previous.unwrap_or(backoff.initial()).max(backoff.initial());
                    let d = backoff.decorrelated(last, &mut rand::thread_rng());
                    previous = Some(d);
                    (Some(now + d), false)
                }
                Ok(Pass::RetryLate) => {
                    let late = now + self.backoff.max();
                    (Some(due.map_or(late, |d| d.min(late))), true)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read or update pending records");
                    (Some(now + self.backoff.max()), false)
                }
            };
            let sleep = async {
                match until {
                    Some(t) => self.clock.sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sleep => {}
                _ = wake.notified(), if new_seal_wakes => {}
            }
        }
    }

    /// When the earliest record the last pass held back for the spread falls due.
    pub fn next_due(&self) -> Option<i64> {
        *self.next_due.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Retries passes until nothing is pending or `budget` is spent (the shutdown flush,
    /// which ignores the spread).
    pub async fn drain(&self, budget: Duration) -> Result<Pass, LedgerError> {
        /// Why one flush pass did not finish the flush.
        enum Unfinished {
            Left(Pass),
            OutOfTime,
            Ledger(LedgerError),
        }
        // The budget is the orchestrator's grace period: real time, which a step of the wall
        // clock does not shorten (`Clock::monotonic`). The waits between passes are on the
        // injected clock like every other wait.
        let deadline = self.clock.monotonic() + budget;
        let flushed = retry_with(
            &self.clock,
            |attempt, _, now| {
                let delay = self
                    .backoff
                    .delay(attempt - 1, &mut rand::thread_rng())
                    .min(self.backoff.initial() * 4);
                (self.clock.monotonic() + delay < deadline).then_some(now + delay)
            },
            |unfinished| matches!(unfinished, Unfinished::Left(_)),
            |_, _, _| {},
            |_| async {
                tokio::select! {
                    biased;
                    pass = self.pass(Spread::Ignore, None) => match pass {
                        Ok(Pass::Done) => Ok(()),
                        Ok(pass) => Err(Unfinished::Left(pass)),
                        Err(e) => Err(Unfinished::Ledger(e)),
                    },
                    () = self.clock.sleep_monotonic(deadline) => Err(Unfinished::OutOfTime),
                }
            },
        )
        .await;
        match flushed {
            Ok(()) => Ok(Pass::Done),
            Err(RetryError::Exhausted {
                last: Unfinished::Left(pass),
                ..
            }) => Ok(pass),
            Err(RetryError::Permanent(Unfinished::Ledger(e))) => Err(e),
            Err(_) => Ok(Pass::RetrySoon),
        }
    }

    /// One attempt at every pending record, oldest first; with [`Spread::Honour`], only
    /// those whose hour closed at least the offset ago (the rest set [`Self::next_due`]).
    /// A `stop` ends the pass before its next call (waiting for a slot of the call limit
    /// included); the records left stay pending.
    async fn pass(
        &self,
        spread: Spread,
        stop: Option<&CancellationToken>,
    ) -> Result<Pass, LedgerError> {
        let pending = self.store.pending_records().await?;
        self.metrics.records_pending.set(pending.len() as i64);
        let now_ms = unix_millis(self.clock.now());
        let offset_ms = i64::try_from(self.offset.as_millis()).unwrap_or(i64::MAX);
        let mut next_due: Option<i64> = None;
        let mut result = Pass::Done;
        for record in pending {
            let closes = record.hour.saturating_add(HOUR_SECS);
            let due = closes.saturating_mul(1000).saturating_add(offset_ms);
            // Only the hourly seal is spread: a record sealed before its hour closed (by a
            // shutdown flush that did not finish) goes out at once, as the flush would have.
            let hourly = record.sealed_at >= closes;
            if spread == Spread::Honour && hourly && due > now_ms {
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
                continue;
            }
            let Some(delivered) = self.deliver(&record, stop).await? else {
                break;
            };
            match delivered {
                Pass::Done => {}
                pass @ (Pass::RetrySoon | Pass::Throttled) => {
                    result = pass;
                    break;
                }
                Pass::RetryLate => result = Pass::RetryLate,
            }
        }
        *self.next_due.lock().unwrap_or_else(|e| e.into_inner()) = next_due;
        Ok(result)
    }

    /// One attempt at `record`; `None` when `stop` came while it waited for its call slot.
    async fn deliver(
        &self,
        record: &StoredRecord,
        stop: Option<&CancellationToken>,
    ) -> Result<Option<Pass>, LedgerError> {
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
                self.store
                    .record_delivery(record.hour, &record.dimension, Delivery::Final { state: RecordState::Dead, error }, now)
                    .await?;
                self.metrics.records_dead_lettered.inc();
                return Ok(Some(Pass::Done));
            }
            if !self.call_slot(stop).await {
                return Ok(None);
            }
            let outcome = self.meter_usage(record).await;
            let now = unix_seconds(self.clock.now());
            match outcome {
                Ok(metering_record_id) => {
                    self.store
                        .record_delivery(record.hour, &record.dimension, Delivery::Sent { metering_record_id: metering_record_id.clone() }, now)
                        .await?;
                    self.metrics.record_sent(&record.dimension, record.quantity);
                    self.status.update_sender(|s| {
                        s.last_success_at = Some(rfc3339(now));
                        s.consecutive_failures = 0;
                    });
                    tracing::info!(quantity = record.quantity, %metering_record_id, "record accepted");
                    Ok(Some(Pass::Done))
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
                        self.store
                            .record_delivery(record.hour, &record.dimension, Delivery::Final { state: RecordState::Duplicate, error: text }, now)
                            .await?;
                        self.metrics.records_duplicate.inc();
                        return Ok(Some(Pass::Done));
                    }
                    self.store
                        .record_delivery(record.hour, &record.dimension, Delivery::Failed { error: text.clone() }, now)
                        .await?;
                    if failure.code_is("ThrottlingException") {
                        tracing::warn!(error = %text, "MeterUsage throttled: the account's quota is in use; will retry later");
                        Ok(Some(Pass::Throttled))
                    } else if failure.is_retryable() {
                        tracing::warn!(error = %text, "MeterUsage failed; will retry");
                        Ok(Some(Pass::RetrySoon))
                    } else {
                        let key = (record.hour, record.dimension.clone(), code);
                        let first = self.logged.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
                        if first {
                            tracing::error!(error = %text, "MeterUsage refused the record; retrying until the 6-hour window closes. Fix the cause (see the error) to get it billed");
                        }
                        Ok(Some(Pass::RetryLate))
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Waits for a slot of the call limit; `false` when `stop` came first.
    async fn call_slot(&self, stop: Option<&CancellationToken>) -> bool {
        match stop {
            Some(stop) => tokio::select! {
                biased;
                _ = stop.cancelled() => false,
                () = self.limiter.acquire(&self.clock) => true,
            },
            None => {
                self.limiter.acquire(&self.clock).await;
                true
            }
        }
    }

    /// One MeterUsage call for `record`; the caller has its call slot.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_deterministic_and_inside_the_spread() {
        let spread = Duration::from_secs(300);
        let a = spread_offset("3f2a9c0e-instance", spread);
        assert_eq!(a, spread_offset("3f2a9c0e-instance", spread));
        assert!(a < spread);
        assert_ne!(a, spread_offset("3f2a9c0e-instancf", spread));
        assert_eq!(spread_offset("anything", Duration::ZERO), Duration::ZERO);
        assert!(spread_offset("x", Duration::from_millis(1)) < Duration::from_millis(1));
    }

    /// 20,000 ids over 50 buckets of a 5-minute spread: chi-square with 49 degrees of freedom
    /// stays below 85 (p ≈ 0.001), and no bucket is far from its 400.
    #[test]
    fn offsets_are_uniform_across_instance_ids() {
        let spread = Duration::from_secs(300);
        let (n, buckets) = (20_000u32, 50usize);
        let mut counts = vec![0u32; buckets];
        for _ in 0..n {
            let id = uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string();
            let offset = spread_offset(&id, spread);
            let b = (offset.as_millis() * buckets as u128 / spread.as_millis()) as usize;
            counts[b.min(buckets - 1)] += 1;
        }
        let expected = f64::from(n) / buckets as f64;
        let chi2: f64 = counts
            .iter()
            .map(|c| (f64::from(*c) - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 85.0, "chi-square {chi2:.1}: {counts:?}");
        assert!(counts.iter().all(|c| (300..=500).contains(c)), "{counts:?}");
    }

    #[test]
    fn a_throttle_backs_off_from_a_tenth_of_the_spread() {
        let b = Backoff::try_new(Duration::from_secs(1), Duration::from_secs(300)).expect("valid");
        let t = throttle_backoff(b, Duration::from_secs(300));
        assert_eq!((t.initial(), t.max()), (Duration::from_secs(30), b.max()));
        // Decorrelated from the floor: the first retry is 30 s to 90 s later.
        assert_eq!(
            t.decorrelated_with_jitter(t.initial(), 0.0),
            Duration::from_secs(30)
        );
        assert_eq!(
            t.decorrelated_with_jitter(t.initial(), 1.0),
            Duration::from_secs(90)
        );
        assert_eq!(
            throttle_backoff(b, Duration::ZERO),
            b,
            "spread off: as any failure"
        );
        assert_eq!(
            throttle_backoff(b, Duration::from_secs(5)).initial(),
            b.initial()
        );
        let long = throttle_backoff(b, Duration::from_secs(3600));
        assert_eq!(
            (long.initial(), long.max()),
            (Duration::from_secs(100), b.max()),
            "never past a third of the cap"
        );
    }

    #[test]
    fn a_throttle_back_off_keeps_its_jitter_at_every_spread() {
        let defaults =
            Backoff::try_new(Duration::from_secs(1), Duration::from_secs(300)).expect("valid");
        let short_cap =
            Backoff::try_new(Duration::from_secs(1), Duration::from_secs(30)).expect("valid");
        let narrow =
            Backoff::try_new(Duration::from_secs(2), Duration::from_secs(3)).expect("valid");
        for b in [defaults, short_cap, narrow] {
            for minutes in [0, 1, 5, 10, 30, 50] {
                let t = throttle_backoff(b, Duration::from_secs(minutes * 60));
                let (low, high) = (
                    t.decorrelated_with_jitter(t.initial(), 0.0),
                    t.decorrelated_with_jitter(t.initial(), 1.0),
                );
                assert!(
                    high >= (low * 3).min(b.max()) && high > low,
                    "spread {minutes} min, back-off {b:?}: the first retry draws from {low:?}..{high:?}"
                );
                assert!(t.initial() >= b.initial() && t.max() == b.max());
            }
        }
    }

    #[tokio::test]
    async fn a_restarted_ledger_keeps_its_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spread = Duration::from_secs(300);
        let ledger = Ledger::open(dir.path(), "prod-a", 1_800_000_000).expect("open");
        let first = spread_offset(&ledger.identity().instance_id, spread);
        ledger.closed().await;
        let again = Ledger::open(dir.path(), "prod-a", 1_800_003_600).expect("reopen");
        assert_eq!(spread_offset(&again.identity().instance_id, spread), first);
        let other = tempfile::tempdir().expect("tempdir");
        let stranger = Ledger::open(other.path(), "prod-a", 1_800_000_000).expect("open");
        assert_ne!(
            stranger.identity().instance_id,
            again.identity().instance_id,
            "each ledger has its own slot"
        );
    }
}
