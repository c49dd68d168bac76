//! RegisterUsage at start-up.
//!
//! One call per start, each attempt with a fresh nonce, the configured ProductCode and
//! PublicKeyVersion, to the region the client was built for (the SDK takes it from the
//! environment; nothing here names a region). The answer's token must pass [`verify`].
//!
//! - **Fatal** (no retry): `CustomerNotEntitledException`, `PlatformNotSupportedException`,
//!   `InvalidProductCodeException`, `InvalidRegionException`,
//!   `InvalidPublicKeyVersionException`, a token that fails verification, credential and
//!   permission errors, and any other non-retryable answer.
//! - **Transient** ([`CallFailure::is_retryable`]: throttling, 5xx, network): retried with
//!   [`Backoff`]'s decorrelated jitter (a fleet rolling out at once spreads) until the start-up budget, measured on the [`Clock`], would be exceeded; then
//!   [`EntitlementError::BudgetExhausted`].
//! - On EC2 the call is never made: AWS does not support RegisterUsage there.
//!
//! [`Clock`]: crate::clock::Clock

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{info, warn};

use super::keyring::Keyring;
use super::nonce::new_nonce;
use super::verify::{verify, Expected, VerifiedRegistration, VerifyError};
use super::EntitlementState;
use super::{check_product_code, classify_fatal, log_failure, EntitlementError, Operation};
use crate::aws::CallFailure;
use crate::backoff::{retry_with, Backoff, Pacing, RetryError, Schedule};
use crate::clock::{rfc3339, unix_seconds, SharedClock};
use crate::platform::Platform;

/// Default start-up budget for containers.
pub const DEFAULT_STARTUP_BUDGET: Duration = Duration::from_secs(5 * 60);

/// What RegisterUsage needs; the lead maps configuration onto it.
#[derive(Debug, Clone)]
pub struct RegistrationSettings {
    pub product_code: String,
    pub public_key_version: u32,
    /// The resolved platform; RegisterUsage is refused locally on [`Platform::Ec2`].
    pub platform: Platform,
    /// How long transient failures may delay start-up, measured on the clock.
    pub startup_budget: Duration,
    pub backoff: Backoff,
}

impl RegistrationSettings {
    /// Settings with the default budget (5 min) and back-off (1 s doubling to 30 s).
    pub fn new(
        product_code: impl Into<String>,
        public_key_version: u32,
        platform: Platform,
    ) -> Self {
        Self {
            product_code: product_code.into(),
            public_key_version,
            platform,
            startup_budget: DEFAULT_STARTUP_BUDGET,
            backoff: Backoff::startup_default(),
        }
    }
}

/// One failed attempt that will be retried; for progress reporting and tests.
#[derive(Debug, Clone)]
pub struct RetryEvent {
    pub operation: &'static str,
    /// 1-based number of the attempt that failed.
    pub attempt: u32,
    pub failure: CallFailure,
    /// When the next attempt starts, on the clock.
    pub next_attempt_at: SystemTime,
    /// AMI DryRun only: past the active retry window, now probing slowly until fail-closed.
    pub degraded: bool,
}

/// The date AWS gave in `PublicKeyRotationTimestamp`: the key version has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRotation {
    pub timestamp: i64,
    pub rfc3339: String,
}

/// A successful registration, serializable for `/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entitlement {
    /// Always [`EntitlementState::Entitled`]; kept so `/v1/status` `details` keeps its shape.
    pub state: EntitlementState,
    /// The verified, non-secret claims and the key that verified them.
    pub claims: VerifiedRegistration,
    /// Epoch seconds on the agent's clock when the verified answer arrived.
    pub registered_at: i64,
    pub registered_at_rfc3339: String,
    pub key_fingerprint: String,
    /// Present when AWS says the public key version has expired.
    pub key_rotation: Option<KeyRotation>,
    /// Convenience flag for metrics: `key_rotation.is_some()`.
    pub key_rotation_due: bool,
    /// The region the client called.
    pub region: Option<String>,
    pub attempts: u32,
}

/// Registers this start with AWS Marketplace; see the module docs for the policy.
pub async fn register(
    client: &aws_sdk_marketplacemetering::Client,
    settings: &RegistrationSettings,
    keyring: &Keyring,
    clock: &SharedClock,
) -> Result<Entitlement, EntitlementError> {
    register_observed(client, settings, keyring, clock, &|_| {}).await
}

/// [`register`], calling `observer` before each back-off wait.
pub async fn register_observed(
    client: &aws_sdk_marketplacemetering::Client,
    settings: &RegistrationSettings,
    keyring: &Keyring,
    clock: &SharedClock,
    observer: &(dyn Fn(&RetryEvent) + Send + Sync),
) -> Result<Entitlement, EntitlementError> {
    log_failure(register_inner(client, settings, keyring, clock, observer).await)
}

async fn register_inner(
    client: &aws_sdk_marketplacemetering::Client,
    settings: &RegistrationSettings,
    keyring: &Keyring,
    clock: &SharedClock,
    observer: &(dyn Fn(&RetryEvent) + Send + Sync),
) -> Result<Entitlement, EntitlementError> {
    let product_code = settings.product_code.as_str();
    let version = settings.public_key_version;
    if !settings.platform.allows_register_usage() {
        return Err(EntitlementError::PlatformNotSupported {
            detail: format!(
                "the platform is {}; RegisterUsage was not attempted",
                settings.platform
            ),
        });
    }
    check_product_code(product_code).map_err(|reason| EntitlementError::ProductCodeNotAllowed {
        product_code: product_code.to_owned(),
        reason,
    })?;
    if !keyring.has_version(version) {
        return Err(EntitlementError::NoTrustedKey { version });
    }
    let region = client.config().region().map(|r| r.to_string());
    let version_i32 =
        i32::try_from(version).map_err(|_| EntitlementError::InvalidPublicKeyVersion {
            version,
            message: "larger than the API allows".to_owned(),
        })?;

    let deadline = clock.now() + settings.startup_budget;
    let mut schedule = Schedule::new(
        settings.backoff,
        // Decorrelated jitter: a fleet throttled at once does not retry in lockstep.
        Pacing::Decorrelated,
        None,
        Some(deadline),
    );
    let region = &region;
    let made = std::sync::atomic::AtomicU32::new(0);
    let made = &made;
    let answered = retry_with(
        clock,
        |attempt, _, now| schedule.next_after(attempt, now),
        |failed: &Failed| matches!(failed, Failed::Transient(_)),
        |attempt, failed, next| {
            let Failed::Transient(failure) = failed else {
                return;
            };
            let delay = next.duration_since(clock.now()).unwrap_or_default();
            warn!(
                attempt,
                retry_in = %humantime::format_duration(delay),
                "RegisterUsage failed, will retry: {failure}"
            );
            observer(&RetryEvent {
                operation: Operation::RegisterUsage.name(),
                attempt,
                failure: failure.clone(),
                next_attempt_at: next,
                degraded: false,
            });
        },
        |attempt| async move {
            made.store(attempt, std::sync::atomic::Ordering::Relaxed);
            let nonce =
                new_nonce().map_err(|e| Failed::Fatal(EntitlementError::Random(e.to_string())))?;
            let sent = client
                .register_usage()
                .product_code(product_code)
                .public_key_version(version_i32)
                .nonce(&nonce)
                .send()
                .await;
            match sent {
                Ok(output) => {
                    let token = output.signature().unwrap_or_default();
                    if token.is_empty() {
                        return Err(Failed::Fatal(VerifyError::NoSignature.into()));
                    }
                    let expected = Expected {
                        product_code: product_code.to_owned(),
                        nonce,
                        public_key_version: version,
                    };
                    let claims =
                        verify(token, keyring, &expected).map_err(|e| Failed::Fatal(e.into()))?;
                    let now = clock.now();
                    let key_rotation = output.public_key_rotation_timestamp().map(|ts| {
                        let timestamp = ts.secs();
                        KeyRotation {
                            timestamp,
                            rfc3339: rfc3339(timestamp),
                        }
                    });
                    if let Some(rotation) = &key_rotation {
                        warn!(
                            public_key_version = version,
                            rotation = %rotation.rfc3339,
                            "AWS reports PublicKeyVersion {version} expired at {}: ask AWS \
                             Marketplace for the new public key, add it to keys/ and set \
                             registration.public_key_version to its version",
                            rotation.rfc3339
                        );
                    }
                    info!(
                        product_code,
                        public_key_version = version,
                        key = %claims.key_fingerprint,
                        attempts = attempt,
                        "RegisterUsage verified: entitled"
                    );
                    let registered_at = unix_seconds(now);
                    Ok(Entitlement {
                        state: EntitlementState::Entitled,
                        key_fingerprint: claims.key_fingerprint.clone(),
                        claims,
                        registered_at,
                        registered_at_rfc3339: rfc3339(registered_at),
                        key_rotation_due: key_rotation.is_some(),
                        key_rotation,
                        region: region.clone(),
                        attempts: attempt,
                    })
                }
                Err(e) => {
                    let failure = CallFailure::from_sdk(&e);
                    if failure.is_retryable() {
                        Err(Failed::Transient(failure))
                    } else {
                        Err(Failed::Fatal(classify_fatal(
                            Operation::RegisterUsage,
                            failure,
                            product_code,
                            version,
                            None,
                            region.as_deref().unwrap_or("(unset)"),
                        )))
                    }
                }
            }
        },
    )
    .await;
    match answered {
        Ok(entitlement) => Ok(entitlement),
        Err(RetryError::Permanent(Failed::Fatal(e))) => Err(e),
        Err(
            RetryError::Permanent(Failed::Transient(last))
            | RetryError::Exhausted {
                last: Failed::Transient(last),
                ..
            },
        ) => Err(EntitlementError::BudgetExhausted {
            operation: Operation::RegisterUsage.name(),
            budget: settings.startup_budget,
            attempts: made.load(std::sync::atomic::Ordering::Relaxed),
            last,
        }),
        Err(RetryError::Exhausted {
            last: Failed::Fatal(e),
            ..
        }) => Err(e),
    }
}

/// How one RegisterUsage attempt failed: for good, or worth another attempt.
enum Failed {
    Fatal(EntitlementError),
    Transient(CallFailure),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::entitlement::test_support::{
        drive_observed, error_reply, register_ok, test_keyring, trusted_key, untrusted_key,
        Observer, Reply, Stub,
    };
    use crate::exit::Exit;
    use std::sync::{Arc, Mutex};

    const START: i64 = 1_800_000_000;

    fn settings() -> RegistrationSettings {
        RegistrationSettings::new("prod-abc123", 1, Platform::Eks)
    }

    /// Runs `register` in a task; whenever it announces a back-off wait, moves the clock to
    /// the announced time. Returns the result and the events seen.
    async fn drive(
        stub: &Stub,
        settings: RegistrationSettings,
        keyring: Keyring,
        clock: Arc<ManualClock>,
    ) -> (Result<Entitlement, EntitlementError>, Vec<RetryEvent>) {
        let client = stub.client().await;
        let shared: SharedClock = clock.clone();
        let start = |observer: Observer| async move {
            register_observed(&client, &settings, &keyring, &shared, &observer).await
        };
        drive_observed(&clock, start, |_| {}).await
    }

    #[tokio::test]
    async fn entitled_path_sends_a_fresh_nonce_and_verifies() {
        let stub = Stub::start(register_ok(trusted_key(), None)).await;
        let clock = ManualClock::at_unix(START);
        let (result, events) = drive(&stub, settings(), test_keyring(1), clock).await;
        let ent = result.expect("entitled");
        assert!(events.is_empty());
        assert_eq!(ent.state, EntitlementState::Entitled);
        assert_eq!(ent.registered_at, START);
        assert_eq!(ent.claims.product_code, "prod-abc123");
        assert_eq!(ent.region.as_deref(), Some("us-east-2"));
        assert!(!ent.key_rotation_due);
        let seen = stub.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].target, "AWSMPMeteringService.RegisterUsage");
        assert_eq!(seen[0].body["ProductCode"], "prod-abc123");
        assert_eq!(seen[0].body["PublicKeyVersion"], 1);
        let nonce = seen[0].body["Nonce"].as_str().expect("nonce sent");
        assert_eq!(nonce, ent.claims.nonce);
        assert!(nonce.len() >= 32);
        let json = serde_json::to_value(&ent).expect("serializes");
        assert_eq!(json["state"], "entitled");
    }

    #[tokio::test]
    async fn every_start_uses_a_new_nonce() {
        let stub = Stub::start(register_ok(trusted_key(), None)).await;
        let clock = ManualClock::at_unix(START);
        drive(&stub, settings(), test_keyring(1), clock.clone())
            .await
            .0
            .expect("first");
        drive(&stub, settings(), test_keyring(1), clock)
            .await
            .0
            .expect("second");
        let seen = stub.seen();
        assert_ne!(seen[0].body["Nonce"], seen[1].body["Nonce"]);
    }

    #[tokio::test]
    async fn a_token_replayed_from_an_earlier_start_is_fatal() {
        // The "service" answers every call with the token it issued for the first start.
        let first: Arc<Mutex<Option<serde_json::Value>>> = Arc::default();
        let saved = first.clone();
        let genuine = register_ok(trusted_key(), None);
        let replaying: Reply = Arc::new(move |req| {
            let mut slot = saved.lock().expect("slot");
            let answer = slot.get_or_insert_with(|| genuine(req).1).clone();
            (200, answer)
        });
        let stub = Stub::start(replaying).await;
        let clock = ManualClock::at_unix(START);
        drive(&stub, settings(), test_keyring(1), clock.clone())
            .await
            .0
            .expect("first start");
        let err = drive(&stub, settings(), test_keyring(1), clock)
            .await
            .0
            .unwrap_err();
        assert!(
            matches!(
                err,
                EntitlementError::Verification(VerifyError::NonceMismatch)
            ),
            "{err}"
        );
        assert_eq!(err.exit_code(), Exit::VerificationFailed);
    }

    #[tokio::test]
    async fn a_token_from_an_untrusted_key_is_fatal() {
        let stub = Stub::start(register_ok(untrusted_key(), None)).await;
        let err = drive(
            &stub,
            settings(),
            test_keyring(1),
            ManualClock::at_unix(START),
        )
        .await
        .0
        .unwrap_err();
        assert_eq!(err.exit_code(), Exit::VerificationFailed);
        assert_eq!(
            stub.seen().len(),
            1,
            "verification failures are not retried"
        );
    }

    #[tokio::test]
    async fn rotated_key_is_accepted_with_a_flag_and_date() {
        let stub = Stub::start(register_ok(trusted_key(), Some(1_790_000_000.0))).await;
        let ent = drive(
            &stub,
            settings(),
            test_keyring(1),
            ManualClock::at_unix(START),
        )
        .await
        .0
        .expect("still entitled");
        assert!(ent.key_rotation_due);
        let rotation = ent.key_rotation.expect("rotation reported");
        assert_eq!(rotation.timestamp, 1_790_000_000);
        assert_eq!(rotation.rfc3339, "2026-09-21T14:13:20Z");
    }

    #[tokio::test]
    async fn each_fatal_answer_has_its_class_and_is_not_retried() {
        let cases = [
            ("CustomerNotEntitledException", Exit::NotEntitled),
            ("PlatformNotSupportedException", Exit::Configuration),
            ("InvalidProductCodeException", Exit::Configuration),
            ("InvalidRegionException", Exit::Configuration),
            ("InvalidPublicKeyVersionException", Exit::Configuration),
        ];
        for (code, exit) in cases {
            let stub = Stub::start(error_reply(400, code)).await;
            let (result, events) = drive(
                &stub,
                settings(),
                test_keyring(1),
                ManualClock::at_unix(START),
            )
            .await;
            let err = result.unwrap_err();
            assert_eq!(err.exit_code(), exit, "{code}: {err}");
            assert!(err.to_string().contains("fix:"), "{code}: {err}");
            assert!(events.is_empty(), "{code} must not be retried");
            assert_eq!(stub.seen().len(), 1);
        }
    }

    #[tokio::test]
    async fn throttling_then_success_ends_entitled_with_fresh_nonces() {
        let stub = Stub::start(register_ok(trusted_key(), None)).await;
        stub.push(error_reply(400, "ThrottlingException"));
        stub.push(error_reply(500, "InternalServiceErrorException"));
        let clock = ManualClock::at_unix(START);
        let (result, events) = drive(&stub, settings(), test_keyring(1), clock.clone()).await;
        let ent = result.expect("entitled after retries");
        assert_eq!(ent.attempts, 3);
        assert_eq!(events.len(), 2);
        assert!(
            ent.registered_at > START,
            "time moved only by the manual clock"
        );
        let seen = stub.seen();
        let nonces: std::collections::HashSet<_> =
            seen.iter().map(|s| s.body["Nonce"].to_string()).collect();
        assert_eq!(nonces.len(), 3, "a fresh nonce per attempt");
    }

    #[tokio::test]
    async fn transient_failures_beyond_the_budget_exit_non_zero() {
        let stub = Stub::start(error_reply(400, "ThrottlingException")).await;
        let clock = ManualClock::at_unix(START);
        let (result, events) = drive(&stub, settings(), test_keyring(1), clock.clone()).await;
        let err = result.unwrap_err();
        assert_eq!(err.exit_code(), Exit::TransientBudget, "{err}");
        let elapsed = clock
            .now()
            .duration_since(crate::clock::from_unix_seconds(START))
            .expect("forward");
        assert!(
            elapsed <= DEFAULT_STARTUP_BUDGET,
            "never waits past the budget: {elapsed:?}"
        );
        assert!(
            elapsed >= DEFAULT_STARTUP_BUDGET / 2,
            "used the budget: {elapsed:?}"
        );
        assert!(events.len() >= 5);
        // Back-off grows.
        assert!(events
            .windows(2)
            .all(|w| w[0].next_attempt_at < w[1].next_attempt_at));
    }

    #[tokio::test]
    async fn network_errors_are_transient() {
        // Nothing listens on this port.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let client = crate::aws::build_client(&crate::aws::AwsSettings {
            region: Some("us-east-2".into()),
            endpoint_url: Some(format!("http://{addr}")),
            static_credentials: Some(("AKID".into(), "secret".into())),
            operation_timeout: Some(Duration::from_secs(5)),
        })
        .await;
        let clock = ManualClock::at_unix(START);
        let shared: SharedClock = clock.clone();
        let mut s = settings();
        s.startup_budget = Duration::from_secs(10);
        let start = |observer: Observer| async move {
            register_observed(&client, &s, &test_keyring(1), &shared, &observer).await
        };
        let (result, _) = drive_observed(&clock, start, |_| {}).await;
        let err = result.unwrap_err();
        assert_eq!(err.exit_code(), Exit::TransientBudget, "{err}");
    }

    #[tokio::test]
    async fn ec2_never_calls_register_usage() {
        let stub = Stub::start(register_ok(trusted_key(), None)).await;
        let mut s = settings();
        s.platform = Platform::Ec2;
        let err = drive(&stub, s, test_keyring(1), ManualClock::at_unix(START))
            .await
            .0
            .unwrap_err();
        assert!(matches!(err, EntitlementError::PlatformNotSupported { .. }));
        assert_eq!(err.exit_code(), Exit::Configuration);
        assert!(stub.seen().is_empty());
    }

    #[tokio::test]
    async fn no_key_for_the_version_fails_before_calling() {
        let stub = Stub::start(register_ok(trusted_key(), None)).await;
        let err = drive(
            &stub,
            settings(),
            test_keyring(2),
            ManualClock::at_unix(START),
        )
        .await
        .0
        .unwrap_err();
        assert!(matches!(err, EntitlementError::NoTrustedKey { version: 1 }));
        assert!(stub.seen().is_empty());
    }
}
