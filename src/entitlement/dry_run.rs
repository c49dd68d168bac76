//! The start-up MeterUsage DryRun for custom metering without RegisterUsage (EC2/AMI products,
//! or `registration.enabled = false`).
//!
//! The call is `MeterUsage` with `DryRun=true`, quantity 0 and the clock's current time. It
//! checks credentials and permissions only; success comes back as the error code
//! `DryRunOperation`.
//!
//! - **Container** ([`DryRunMode::Container`]): AWS's rule is that any error other than
//!   `ThrottlingException` at start-up terminates the container. So only throttling is
//!   retried, with back-off, within the start-up budget (5 min by default); everything else,
//!   including 5xx and network errors, is returned at once as fatal.
//! - **AMI/EC2** ([`DryRunMode::Ami`]): AWS asks to retry for up to 30 minutes with exponential
//!   back-off and never to fail closed in less than 2 hours. So every failure is retried:
//!   - for the first [`DryRunPolicy::ami_active_window`] (30 min) with exponential back-off;
//!   - then, degraded, once every [`DryRunPolicy::ami_probe_interval`] (10 min);
//!   - with a last attempt at the fail-closed time (2 h after the start, never earlier: a
//!     shorter configured value is raised to [`AMI_MIN_FAIL_CLOSED`]), after which the error is
//!     returned as [`EntitlementError::GaveUp`].
//!
//!   The agent should run the AMI check in a background task and keep accepting and persisting
//!   usage meanwhile; the task's result is the final word (`Ok` = permissions work; `Err` =
//!   2 hours of failure, fail closed with `exit_code()`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use aws_sdk_marketplacemetering::primitives::DateTime;
use serde::Serialize;
use tracing::{error, info, warn};

use super::register::RetryEvent;
use super::{classify_fatal, log_failure, EntitlementError, Operation};
use crate::aws::CallFailure;
use crate::backoff::{retry_with, Backoff, Pacing, RetryError, Schedule};
use crate::clock::{rfc3339, unix_seconds, SharedClock};

/// The error code that means "a real call would have been allowed".
pub const DRY_RUN_SUCCESS_CODE: &str = "DryRunOperation";
/// An AMI product never fails closed sooner than this after start-up.
pub const AMI_MIN_FAIL_CLOSED: Duration = Duration::from_secs(2 * 3600);

/// Which failure policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DryRunMode {
    /// ECS/EKS containers: anything but throttling is fatal.
    Container,
    /// EC2/AMI products: retry, fail closed no sooner than 2 hours.
    Ami,
}

/// Timings of the DryRun policies. The defaults follow AWS's guidance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunPolicy {
    /// Container mode: how long throttling may delay start-up.
    pub container_budget: Duration,
    /// Container mode back-off.
    pub container_backoff: Backoff,
    /// AMI mode back-off during the active window.
    pub ami_backoff: Backoff,
    /// AMI mode: how long to retry with exponential back-off (30 min).
    pub ami_active_window: Duration,
    /// AMI mode: the interval between attempts after the active window (10 min).
    pub ami_probe_interval: Duration,
    /// AMI mode: when to give up (2 h); values below [`AMI_MIN_FAIL_CLOSED`] are raised to it.
    pub ami_fail_closed_after: Duration,
}

impl Default for DryRunPolicy {
    fn default() -> Self {
        Self {
            container_budget: super::register::DEFAULT_STARTUP_BUDGET,
            container_backoff: Backoff::startup_default(),
            ami_backoff: Backoff::try_new(Duration::from_secs(2), Duration::from_secs(300))
                .expect("2 s to 5 min is a valid back-off"),
            ami_active_window: Duration::from_secs(30 * 60),
            ami_probe_interval: Duration::from_secs(10 * 60),
            ami_fail_closed_after: AMI_MIN_FAIL_CLOSED,
        }
    }
}

/// The DryRun passed: credentials and permissions work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DryRunPassed {
    pub mode: DryRunMode,
    pub attempts: u32,
    /// Epoch seconds on the clock.
    pub passed_at: i64,
    pub elapsed: Duration,
}

/// Checks MeterUsage permissions under `policy` (see the module docs), calling `observer`
/// before each wait.
pub async fn dry_run_check_with(
    client: &aws_sdk_marketplacemetering::Client,
    product_code: &str,
    dimension: &str,
    mode: DryRunMode,
    clock: &SharedClock,
    policy: &DryRunPolicy,
    observer: &(dyn Fn(&RetryEvent) + Send + Sync),
) -> Result<DryRunPassed, EntitlementError> {
    let region = client
        .config()
        .region()
        .map_or_else(|| "(unset)".to_owned(), |r| r.to_string());
    let fatal = |failure: CallFailure| {
        classify_fatal(
            Operation::MeterUsageDryRun,
            failure,
            product_code,
            0,
            Some(dimension),
            &region,
        )
    };
    let started = clock.now();
    let container_deadline = started + policy.container_budget;
    let active_until = started + policy.ami_active_window;
    let fail_closed_at = started + policy.ami_fail_closed_after.max(AMI_MIN_FAIL_CLOSED);
    let degraded = AtomicBool::new(false);
    let made = AtomicU32::new(0);
    // Decorrelated jitter, as for RegisterUsage.
    let mut container = Schedule::new(
        policy.container_backoff,
        Pacing::Decorrelated,
        None,
        Some(container_deadline),
    );
    let answered = retry_with(
        clock,
        |attempt, failure: &CallFailure, now| match mode {
            DryRunMode::Container => container.next_after(attempt, now),
            DryRunMode::Ami => {
                if now >= fail_closed_at {
                    return None;
                }
                let delay = if now < active_until {
                    policy
                        .ami_backoff
                        .delay(attempt - 1, &mut rand::thread_rng())
                } else {
                    if !degraded.load(Ordering::Relaxed) {
                        degraded.store(true, Ordering::Relaxed);
                        error!(
                            fail_closed_at = %rfc3339(unix_seconds(fail_closed_at)),
                            "MeterUsage DryRun has failed for {} ({failure}); usage is still \
                             accepted and stored, but the agent fails closed at {} unless this \
                             is fixed: {}",
                            humantime::format_duration(policy.ami_active_window),
                            rfc3339(unix_seconds(fail_closed_at)),
                            fatal(failure.clone()),
                        );
                    }
                    policy.ami_probe_interval
                };
                Some((now + delay).min(fail_closed_at))
            }
        },
        // Containers retry throttling only; an AMI retries everything until it fails closed.
        |failure| mode == DryRunMode::Ami || failure.code_is("ThrottlingException"),
        |attempt, failure, next| {
            warn!(
                attempt,
                mode = ?mode,
                next_attempt = %rfc3339(unix_seconds(next)),
                "MeterUsage DryRun failed, will retry: {failure}"
            );
            observer(&RetryEvent {
                operation: Operation::MeterUsageDryRun.name(),
                attempt,
                failure: failure.clone(),
                next_attempt_at: next,
                degraded: degraded.load(Ordering::Relaxed),
            });
        },
        |attempt| {
            made.store(attempt, Ordering::Relaxed);
            dry_run_once(client, product_code, dimension, clock.now())
        },
    )
    .await;
    let attempt = made.load(Ordering::Relaxed);
    let now = clock.now();
    let elapsed = now.duration_since(started).unwrap_or_default();
    let last = match answered {
        Ok(()) => {
            if attempt > 1 {
                info!(attempts = attempt, "MeterUsage DryRun passed after retries");
            } else {
                info!("MeterUsage DryRun passed");
            }
            return Ok(DryRunPassed {
                mode,
                attempts: attempt,
                passed_at: unix_seconds(now),
                elapsed,
            });
        }
        Err(RetryError::Permanent(failure)) => return log_failure(Err(fatal(failure))),
        Err(RetryError::Exhausted { last, .. }) => last,
    };
    let err = match mode {
        DryRunMode::Container => EntitlementError::BudgetExhausted {
            operation: Operation::MeterUsageDryRun.name(),
            budget: policy.container_budget,
            attempts: attempt,
            last,
        },
        // An AMI fails closed only here, after `ami_fail_closed_after` of failures.
        DryRunMode::Ami => EntitlementError::GaveUp {
            operation: Operation::MeterUsageDryRun.name(),
            elapsed,
            attempts: attempt,
            last: Box::new(if last.is_retryable() {
                EntitlementError::BudgetExhausted {
                    operation: Operation::MeterUsageDryRun.name(),
                    budget: elapsed,
                    attempts: attempt,
                    last,
                }
            } else {
                fatal(last)
            }),
        },
    };
    log_failure(Err(err))
}

/// One DryRun call: `Ok` when the service answers `DryRunOperation` (or, leniently, success).
async fn dry_run_once(
    client: &aws_sdk_marketplacemetering::Client,
    product_code: &str,
    dimension: &str,
    now: SystemTime,
) -> Result<(), CallFailure> {
    dry_run_call(client, product_code, dimension, now).await.0
}

/// One MeterUsage DryRun: `Ok` when the service answers `DryRunOperation` (or, leniently,
/// success), with the response's `Date` header when one came back. The start-up check,
/// `doctor` and `listing-check` all make it here.
pub(crate) async fn dry_run_call(
    client: &aws_sdk_marketplacemetering::Client,
    product_code: &str,
    dimension: &str,
    now: SystemTime,
) -> (Result<(), CallFailure>, Option<String>) {
    let sent = client
        .meter_usage()
        .product_code(product_code)
        .usage_dimension(dimension)
        .usage_quantity(0)
        .timestamp(DateTime::from(now))
        .dry_run(true)
        .send()
        .await;
    match sent {
        Ok(_) => {
            warn!("MeterUsage DryRun answered success instead of DryRunOperation; treating it as passed");
            (Ok(()), None)
        }
        Err(e) => {
            let date = e
                .raw_response()
                .and_then(|r| r.headers().get("date"))
                .map(str::to_owned);
            let failure = CallFailure::from_sdk(&e);
            if failure.code_is(DRY_RUN_SUCCESS_CODE) {
                (Ok(()), date)
            } else {
                (Err(failure), date)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{from_unix_seconds, Clock, ManualClock};
    use crate::entitlement::test_support::{drive_observed, error_reply, Observer, Stub};
    use crate::exit::Exit;
    use std::sync::Arc;

    const START: i64 = 1_800_000_000;

    /// Runs the check in a task, moving the clock to each announced retry time. `on_event`
    /// may change the stub's answers mid-run.
    async fn drive(
        stub: &Stub,
        mode: DryRunMode,
        clock: Arc<ManualClock>,
        mut on_event: impl FnMut(&RetryEvent, &Stub),
    ) -> (Result<DryRunPassed, EntitlementError>, Vec<RetryEvent>) {
        let client = stub.client().await;
        let shared: SharedClock = clock.clone();
        let start = |observer: Observer| async move {
            dry_run_check_with(
                &client,
                "prod-abc123",
                "requests",
                mode,
                &shared,
                &DryRunPolicy::default(),
                &observer,
            )
            .await
        };
        drive_observed(&clock, start, |e| on_event(e, stub)).await
    }

    fn elapsed(clock: &ManualClock) -> Duration {
        clock
            .now()
            .duration_since(from_unix_seconds(START))
            .expect("clock moved forward")
    }

    #[tokio::test]
    async fn dry_run_operation_is_success_and_the_request_is_a_dry_run() {
        let stub = Stub::start(error_reply(400, "DryRunOperation")).await;
        let clock = ManualClock::at_unix(START);
        let (result, events) = drive(&stub, DryRunMode::Container, clock, |_, _| {}).await;
        let passed = result.expect("passes");
        assert_eq!(passed.attempts, 1);
        assert!(events.is_empty());
        let seen = stub.seen();
        assert_eq!(seen[0].target, "AWSMPMeteringService.MeterUsage");
        assert_eq!(seen[0].body["DryRun"], true);
        assert_eq!(seen[0].body["UsageDimension"], "requests");
        assert_eq!(seen[0].body["Timestamp"].as_f64(), Some(START as f64));
    }

    #[tokio::test]
    async fn container_any_error_but_throttling_is_fatal_at_once() {
        for (code, exit) in [
            ("AccessDeniedException", Exit::Configuration),
            ("CustomerNotEntitledException", Exit::NotEntitled),
            ("InvalidProductCodeException", Exit::Configuration),
            ("InvalidUsageDimensionException", Exit::Configuration),
            ("InvalidEndpointRegionException", Exit::Configuration),
        ] {
            let stub = Stub::start(error_reply(400, code)).await;
            let clock = ManualClock::at_unix(START);
            let (result, events) = drive(&stub, DryRunMode::Container, clock, |_, _| {}).await;
            let err = result.unwrap_err();
            assert_eq!(err.exit_code(), exit, "{code}: {err}");
            assert!(events.is_empty(), "{code} is not retried in a container");
        }
        let stub = Stub::start(error_reply(500, "InternalServiceErrorException")).await;
        let (result, events) = drive(
            &stub,
            DryRunMode::Container,
            ManualClock::at_unix(START),
            |_, _| {},
        )
        .await;
        assert!(
            result.is_err() && events.is_empty(),
            "even 5xx is fatal in a container"
        );
    }

    #[tokio::test]
    async fn container_throttling_is_retried_then_passes() {
        let stub = Stub::start(error_reply(400, "DryRunOperation")).await;
        stub.push(error_reply(400, "ThrottlingException"));
        stub.push(error_reply(400, "ThrottlingException"));
        let (result, events) = drive(
            &stub,
            DryRunMode::Container,
            ManualClock::at_unix(START),
            |_, _| {},
        )
        .await;
        assert_eq!(result.expect("passes").attempts, 3);
        assert_eq!(events.len(), 2);
    }

    #[tokio::test]
    async fn container_throttling_beyond_the_budget_is_fatal() {
        let stub = Stub::start(error_reply(400, "ThrottlingException")).await;
        let clock = ManualClock::at_unix(START);
        let (result, _) = drive(&stub, DryRunMode::Container, clock.clone(), |_, _| {}).await;
        let err = result.unwrap_err();
        assert_eq!(err.exit_code(), Exit::TransientBudget);
        assert!(elapsed(&clock) <= Duration::from_secs(300));
    }

    #[tokio::test]
    async fn ami_never_fails_closed_before_two_hours() {
        let stub = Stub::start(error_reply(400, "AccessDeniedException")).await;
        let clock = ManualClock::at_unix(START);
        let two_hours = from_unix_seconds(START) + Duration::from_secs(7200);
        let (result, events) = drive(&stub, DryRunMode::Ami, clock.clone(), |e, _| {
            assert!(
                e.next_attempt_at <= two_hours,
                "no wait past the fail-closed time"
            );
        })
        .await;
        let err = result.unwrap_err();
        assert!(
            elapsed(&clock) >= Duration::from_secs(7200),
            "failed closed after only {:?}",
            elapsed(&clock)
        );
        assert!(matches!(err, EntitlementError::GaveUp { .. }), "{err}");
        assert_eq!(
            err.exit_code(),
            Exit::Configuration,
            "the last error's class"
        );
        // Exponential back-off in the first 30 minutes, then slow probes.
        let active: Vec<_> = events.iter().filter(|e| !e.degraded).collect();
        let degraded: Vec<_> = events.iter().filter(|e| e.degraded).collect();
        assert!(active.len() >= 5, "{} active retries", active.len());
        assert!(!degraded.is_empty());
        for pair in degraded.windows(2) {
            let gap = pair[1]
                .next_attempt_at
                .duration_since(pair[0].next_attempt_at)
                .expect("fwd");
            assert!(gap <= Duration::from_secs(600));
        }
        let last = events.last().expect("events");
        assert_eq!(
            last.next_attempt_at, two_hours,
            "a last attempt exactly at 2 h"
        );
        assert_eq!(stub.seen().len(), events.len() + 1);
    }

    #[tokio::test]
    async fn ami_recovers_when_permissions_are_fixed_late() {
        let stub = Stub::start(error_reply(400, "AccessDeniedException")).await;
        let clock = ManualClock::at_unix(START);
        let fixed_at = from_unix_seconds(START) + Duration::from_secs(100 * 60);
        let (result, events) = drive(&stub, DryRunMode::Ami, clock.clone(), |e, stub| {
            if e.next_attempt_at >= fixed_at {
                stub.set_fallback(error_reply(400, "DryRunOperation"));
            }
        })
        .await;
        let passed = result.expect("passes once the role is fixed");
        assert!(passed.elapsed >= Duration::from_secs(100 * 60));
        assert!(passed.elapsed < Duration::from_secs(7200));
        assert!(events.iter().any(|e| e.degraded));
    }

    #[tokio::test]
    async fn ami_fail_closed_floor_cannot_be_configured_lower() {
        let stub = Stub::start(error_reply(500, "InternalServiceErrorException")).await;
        let clock = ManualClock::at_unix(START);
        let client = stub.client().await;
        let shared: SharedClock = clock.clone();
        let policy = DryRunPolicy {
            ami_fail_closed_after: Duration::from_secs(60),
            ..DryRunPolicy::default()
        };
        let start = |observer: Observer| async move {
            dry_run_check_with(
                &client,
                "p",
                "d",
                DryRunMode::Ami,
                &shared,
                &policy,
                &observer,
            )
            .await
        };
        let (result, _) = drive_observed(&clock, start, |_| {}).await;
        let err = result.unwrap_err();
        assert!(elapsed(&clock) >= AMI_MIN_FAIL_CLOSED);
        assert_eq!(err.exit_code(), Exit::TransientBudget, "{err}");
    }
}
