//! Admission at start-up: the entitlement check each pricing model needs on each platform
//! (`entitlement_route`), and the contract's License Manager client.

use std::sync::Arc;

use aws_sdk_marketplacemetering::Client;
use tracing::Instrument;

use crate::aws::AwsSettings;
use crate::clock::SharedClock;
use crate::config::{Config, Pricing};
use crate::entitlement::contract::{
    license_client, wanted_entitlements, ContractHolder, ContractSettings,
};
use crate::entitlement::{
    self, Backoff, DryRunMode, DryRunPolicy, EntitlementError, EntitlementState, Keyring,
    RegistrationSettings,
};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::platform::Platform;
use crate::status::{DryRunProgress, EntitlementDetails, EntitlementStatus, StatusBoard};

/// The start-up check of a pricing model on a platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// RegisterUsage, with the PS256 token verified.
    Register,
    /// The MeterUsage DryRun: fatal on any error but throttling (containers), or the AMI's
    /// background check that never fails closed within 2 hours.
    DryRun(DryRunMode),
    /// Contract pricing: CheckoutLicense with License Manager, on any platform.
    Contract,
}

/// README's pricing table: `hourly` and `hourly+custom` register on containers; `custom` and
/// everything on EC2 meters, with the DryRun as its check; `hourly` on EC2 has nothing to do.
pub(super) fn entitlement_route(
    pricing: Pricing,
    platform: Platform,
) -> Result<Route, EntitlementError> {
    if pricing.checks_out() {
        return Ok(Route::Contract);
    }
    if platform == Platform::Ec2 {
        if !pricing.meters() {
            return Err(EntitlementError::PricingNotOnPlatform {
                pricing: pricing.as_str(),
                platform: "EC2",
                reason: "RegisterUsage does not work on EC2, and AWS meters an AMI's hourly price itself; set platform to ecs or eks if this is a container",
            });
        }
        return Ok(Route::DryRun(DryRunMode::Ami));
    }
    if pricing.registers() {
        Ok(Route::Register)
    } else {
        Ok(Route::DryRun(DryRunMode::Container))
    }
}

/// The start-up check the pricing model needs on this platform (README: pricing models):
/// RegisterUsage for `hourly` and `hourly+custom` containers, the MeterUsage DryRun for
/// `custom` containers, and on EC2 the AMI's DryRun, which never fails closed within 2 hours.
/// Returns a background task when an AMI product starts before its check has passed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn establish_entitlement(
    config: &Config,
    platform: Platform,
    client: &Client,
    keyring: &Keyring,
    clock: &SharedClock,
    dry_run_policy: DryRunPolicy,
    status: &Arc<StatusBoard>,
    metrics: &Arc<Metrics>,
    ledger: &Ledger,
    aws: &AwsSettings,
) -> Result<Admission, EntitlementError> {
    let mode = match entitlement_route(config.pricing, platform)? {
        Route::Contract => {
            let holder = Arc::new(contract_holder(config, ledger, clock, aws).await);
            let checkout = counted(
                metrics,
                "CheckoutLicense",
                holder
                    .establish(&|_| metrics.call("CheckoutLicense", "retried"))
                    .await,
            )?;
            metrics.entitled.set(1);
            status.set_entitlement(EntitlementStatus {
                state: EntitlementState::Entitled,
                details: EntitlementDetails::Contract(Box::new(checkout)),
            });
            return Ok(Admission {
                background_check: None,
                contract: Some(holder),
            });
        }
        Route::Register => {
            let mut settings = RegistrationSettings::new(
                config.product_code.clone(),
                config.registration.public_key_version,
                platform,
            );
            settings.startup_budget = config.registration.startup_budget;
            let entitlement = counted(
                metrics,
                "RegisterUsage",
                entitlement::register_observed(
                    client,
                    &settings,
                    keyring,
                    clock,
                    &count_attempts(metrics, "RegisterUsage"),
                )
                .await,
            )?;
            metrics.entitled.set(1);
            if let Some(rotation) = &entitlement.key_rotation {
                metrics
                    .public_key_rotation_timestamp_seconds
                    .set(rotation.timestamp);
            }
            status.set_entitlement(EntitlementStatus {
                state: EntitlementState::Entitled,
                details: EntitlementDetails::Registered(Box::new(entitlement)),
            });
            return Ok(Admission::default());
        }
        Route::DryRun(mode) => mode,
    };
    let dimension = config
        .metering
        .dimensions
        .first()
        .cloned()
        .unwrap_or_default();
    let mut policy = dry_run_policy;
    policy.container_budget = config.registration.startup_budget;
    if mode == DryRunMode::Container {
        let passed = entitlement::dry_run_check_with(
            client,
            &config.product_code,
            &dimension,
            mode,
            clock,
            &policy,
            &count_attempts(metrics, DRY_RUN),
        )
        .await;
        let passed = counted(metrics, DRY_RUN, passed)?;
        metrics.entitled.set(1);
        status.set_entitlement(EntitlementStatus {
            state: EntitlementState::PermissionsVerified,
            details: EntitlementDetails::DryRunPassed(passed),
        });
        return Ok(Admission::default());
    }
    // AMI: keep accepting and persisting usage while the check retries; fail closed only
    // when the policy gives up (never sooner than 2 hours).
    status.set_entitlement(EntitlementStatus {
        state: EntitlementState::Unverified,
        details: EntitlementDetails::DryRunInProgress {
            dry_run: DryRunProgress::InProgress,
        },
    });
    let (client, product_code, clock, status, metrics) = (
        client.clone(),
        config.product_code.clone(),
        clock.clone(),
        status.clone(),
        metrics.clone(),
    );
    let handle = tokio::spawn(
        async move {
            let passed = entitlement::dry_run_check_with(
                &client,
                &product_code,
                &dimension,
                mode,
                &clock,
                &policy,
                &count_attempts(&metrics, DRY_RUN),
            )
            .await;
            let passed = counted(&metrics, DRY_RUN, passed)?;
            metrics.entitled.set(1);
            status.set_entitlement(EntitlementStatus {
                state: EntitlementState::PermissionsVerified,
                details: EntitlementDetails::DryRunPassed(passed),
            });
            Ok(())
        }
        .instrument(tracing::info_span!("dry_run")),
    );
    Ok(Admission {
        background_check: Some(handle),
        contract: None,
    })
}

/// What start-up admitted the agent with.
#[derive(Default)]
pub(super) struct Admission {
    /// The AMI's DryRun, still retrying in the background.
    pub(super) background_check: Option<tokio::task::JoinHandle<Result<(), EntitlementError>>>,
    /// Contract pricing: the checkout held for the agent's life.
    pub(super) contract: Option<Arc<ContractHolder>>,
}

/// Contract pricing's holder: `[contract]`, the License Manager client from `[aws]`, and the
/// ledger that keeps the checkout (`GET /v1/entitlements` reads the holder).
pub(super) async fn contract_holder(
    config: &Config,
    ledger: &Ledger,
    clock: &SharedClock,
    aws: &AwsSettings,
) -> ContractHolder {
    let c = &config.contract;
    let settings = ContractSettings {
        product_sku: c.product_sku.clone(),
        key_fingerprint: c.key_fingerprint.clone(),
        entitlements: wanted_entitlements(config),
        perpetual: c.checkout_type == "perpetual",
        client_token: String::new(),
        startup_budget: config.registration.startup_budget,
        backoff: Backoff::default(),
    };
    let client = license_client(config, aws).await;
    ContractHolder::new(client, settings, ledger.clone(), clock.clone())
}

/// The `operation` label of the start-up DryRun in `meterd_aws_calls_total`.
pub(super) const DRY_RUN: &str = "MeterUsageDryRun";

/// Counts each failed start-up attempt that is retried, by its error code.
pub(super) fn count_attempts<'a>(
    metrics: &'a Metrics,
    operation: &'static str,
) -> impl Fn(&entitlement::RetryEvent) + Send + Sync + 'a {
    move |e| metrics.call(operation, e.failure.code.as_deref().unwrap_or("transport"))
}

/// Counts the start-up check's last call: `success`, or the class of the final failure.
pub(super) fn counted<T>(
    metrics: &Metrics,
    operation: &str,
    result: Result<T, EntitlementError>,
) -> Result<T, EntitlementError> {
    metrics.call(
        operation,
        result.as_ref().map_or_else(|e| e.class(), |_| "success"),
    );
    result
}
