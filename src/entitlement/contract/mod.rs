//! Contract pricing: the start-up CheckoutLicense with AWS License Manager.
//!
//! A contract product checks its entitlement with License Manager instead of RegisterUsage:
//! CheckoutLicense for the configured entitlements of the product's SKU, issued by AWS
//! Marketplace's key fingerprint. What it answers follows RegisterUsage's rules:
//!
//! | answer | outcome | exit |
//! | --- | --- | ---: |
//! | the entitlements | ready | – |
//! | `NoEntitlementsAllowedException`, `ResourceNotFoundException` | not entitled (no license, or not these entitlements) | 77 |
//! | `AccessDeniedException`, `AuthorizationException` | the role may not check out | 78 |
//! | `ValidationException`, `InvalidParameterValueException`, `RedirectException`, `UnsupportedDigitalSignatureMethodException` | configuration (SKU, fingerprint, units, region) | 78 |
//! | `RateLimitExceededException`, `ServerInternalException`, 5xx, network | retried within the start-up budget, then | 75 |
//! | anything else | the service refused | 69 |
//!
//! The ClientToken comes from the caller, so a restart that checks out again with the same
//! token gets the same consumption back instead of a second one (no seat leaks across a crash
//! between the checkout and its answer).

use std::time::{Duration, SystemTime};

use aws_sdk_licensemanager::types::{CheckoutType, EntitlementData, EntitlementDataUnit};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{log_failure, Backoff, EntitlementError};
use crate::aws::CallFailure;
use crate::backoff::{retry, RetryError};
use crate::clock::SharedClock;

/// AWS Marketplace's issuer key fingerprint, which every Marketplace license carries.
pub const MARKETPLACE_KEY_FINGERPRINT: &str = "aws:294406891311:AWS/Marketplace:issuer-fingerprint";

/// One entitlement to check out: a feature (`unit = "None"`) or `count` units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedEntitlement {
    pub name: String,
    pub unit: String,
    /// Units to check out; `None` for a feature.
    pub count: Option<i64>,
}

/// What the start-up checkout needs.
#[derive(Debug, Clone)]
pub struct ContractSettings {
    pub product_sku: String,
    pub key_fingerprint: String,
    pub entitlements: Vec<WantedEntitlement>,
    /// PROVISIONAL (floating: returned by check-in or expiry) or PERPETUAL (drawn down).
    pub perpetual: bool,
    /// Stable across restarts of this instance (see the module doc).
    pub client_token: String,
    pub startup_budget: Duration,
    pub backoff: Backoff,
}

/// One entitlement the checkout allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedEntitlement {
    pub name: String,
    pub unit: String,
    pub value: Option<String>,
}

/// A successful checkout: what `GET /v1/entitlements` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContractCheckout {
    pub license_arn: String,
    pub checkout_type: String,
    pub consumption_token: String,
    pub entitlements: Vec<AllowedEntitlement>,
    /// RFC 3339, as License Manager gives it; `None` for PERPETUAL.
    pub expiration: Option<String>,
    pub issued_at: Option<String>,
    pub attempts: u32,
}

fn entitlement_data(w: &WantedEntitlement) -> Result<EntitlementData, EntitlementError> {
    let mut builder = EntitlementData::builder()
        .name(&w.name)
        .unit(EntitlementDataUnit::from(w.unit.as_str()));
    if let Some(count) = w.count {
        builder = builder.value(count.to_string());
    }
    builder
        .build()
        .map_err(|e| EntitlementError::ContractConfiguration {
            code: "ValidationException".to_owned(),
            message: e.to_string(),
        })
}

/// Checks out the contract's entitlements; see the module doc for the outcomes.
pub async fn checkout(
    client: &aws_sdk_licensemanager::Client,
    settings: &ContractSettings,
    clock: &SharedClock,
) -> Result<ContractCheckout, EntitlementError> {
    checkout_observed(client, settings, clock, &|_| {}).await
}

/// [`checkout`], telling `observer` the time of each retry before waiting for it (tests move
/// the clock there).
pub async fn checkout_observed(
    client: &aws_sdk_licensemanager::Client,
    settings: &ContractSettings,
    clock: &SharedClock,
    observer: &(dyn Fn(SystemTime) + Send + Sync),
) -> Result<ContractCheckout, EntitlementError> {
    log_failure(checkout_inner(client, settings, clock, observer).await)
}

async fn checkout_inner(
    client: &aws_sdk_licensemanager::Client,
    settings: &ContractSettings,
    clock: &SharedClock,
    observer: &(dyn Fn(SystemTime) + Send + Sync),
) -> Result<ContractCheckout, EntitlementError> {
    let wanted = settings
        .entitlements
        .iter()
        .map(entitlement_data)
        .collect::<Result<Vec<_>, _>>()?;
    let kind = if settings.perpetual {
        CheckoutType::Perpetual
    } else {
        CheckoutType::Provisional
    };
    let deadline: SystemTime = clock.now() + settings.startup_budget;
    let mut attempts = 0u32;
    let op = || {
        attempts += 1;
        let request = client
            .checkout_license()
            .product_sku(&settings.product_sku)
            .checkout_type(kind.clone())
            .key_fingerprint(&settings.key_fingerprint)
            .set_entitlements(Some(wanted.clone()))
            .client_token(&settings.client_token);
        async move { request.send().await.map_err(|e| CallFailure::from_sdk(&e)) }
    };
    let answered = retry(
        clock,
        &settings.backoff,
        None,
        Some(deadline),
        CallFailure::is_retryable,
        |attempt, failure, next| {
            warn!(attempt, "CheckoutLicense will retry: {failure}");
            observer(next);
        },
        op,
    )
    .await;
    let output = match answered {
        Ok(output) => output,
        Err(RetryError::Permanent(failure)) => {
            return Err(classify(&settings.product_sku, failure))
        }
        Err(RetryError::Exhausted { attempts, last }) => {
            return Err(EntitlementError::BudgetExhausted {
                operation: "CheckoutLicense",
                budget: settings.startup_budget,
                attempts,
                last,
            })
        }
    };
    let checkout = ContractCheckout {
        license_arn: output.license_arn().unwrap_or_default().to_owned(),
        checkout_type: output
            .checkout_type()
            .map_or_else(|| kind.as_str().to_owned(), |t| t.as_str().to_owned()),
        consumption_token: output
            .license_consumption_token()
            .unwrap_or_default()
            .to_owned(),
        entitlements: output
            .entitlements_allowed()
            .iter()
            .map(|e| AllowedEntitlement {
                name: e.name().to_owned(),
                unit: e.unit().as_str().to_owned(),
                value: e.value().map(str::to_owned),
            })
            .collect(),
        expiration: output.expiration().map(str::to_owned),
        issued_at: output.issued_at().map(str::to_owned),
        attempts,
    };
    info!(
        license = %checkout.license_arn,
        checkout_type = %checkout.checkout_type,
        entitlements = checkout.entitlements.len(),
        attempts,
        "CheckoutLicense: entitled"
    );
    Ok(checkout)
}

/// A permanent CheckoutLicense failure as the agent's fatal error (module doc table).
fn classify(product_sku: &str, failure: CallFailure) -> EntitlementError {
    let code = failure.code.clone().unwrap_or_default();
    match code.as_str() {
        "NoEntitlementsAllowedException" | "ResourceNotFoundException" => {
            EntitlementError::NoContract {
                product_sku: product_sku.to_owned(),
                code,
                message: failure.message,
            }
        }
        "AccessDeniedException" | "AuthorizationException" => EntitlementError::Credentials {
            operation: "CheckoutLicense",
            code,
            message: failure.message,
            fix: "give the task or pod role license-manager:CheckoutLicense, \
                  license-manager:CheckInLicense, license-manager:ExtendLicenseConsumption, \
                  license-manager:GetLicense and license-manager:ListReceivedLicenses",
        },
        "ValidationException"
        | "InvalidParameterValueException"
        | "RedirectException"
        | "UnsupportedDigitalSignatureMethodException" => EntitlementError::ContractConfiguration {
            code,
            message: failure.message,
        },
        _ => EntitlementError::ServiceRefused {
            operation: "CheckoutLicense",
            failure,
            fix: "check License Manager's health in the region; the answer is not one \
                  CheckoutLicense documents",
        },
    }
}

/// What `meterd doctor` finds of the contract's license, without checking anything out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LicenseFinding {
    /// The license is visible and has every configured entitlement.
    Found { license_arn: String },
    /// No license for the SKU and fingerprint in this account.
    NoLicense,
    /// The license lacks these configured entitlements (name and unit).
    Missing {
        license_arn: String,
        missing: Vec<String>,
    },
    /// ListReceivedLicenses failed.
    Failed(CallFailure),
}

/// ListReceivedLicenses for the SKU and fingerprint: is the license visible, and does it have
/// every entitlement `wanted` names (by name and unit)?
pub async fn find_license(
    client: &aws_sdk_licensemanager::Client,
    product_sku: &str,
    key_fingerprint: &str,
    wanted: &[WantedEntitlement],
) -> LicenseFinding {
    use aws_sdk_licensemanager::types::Filter;
    let filter = |name: &str, value: &str| Filter::builder().name(name).values(value).build();
    let listed = client
        .list_received_licenses()
        .filters(filter("ProductSKU", product_sku))
        .filters(filter("Fingerprint", key_fingerprint))
        .send()
        .await;
    let out = match listed {
        Ok(out) => out,
        Err(e) => return LicenseFinding::Failed(CallFailure::from_sdk(&e)),
    };
    let Some(license) = out.licenses().first() else {
        return LicenseFinding::NoLicense;
    };
    let license_arn = license.license_arn().unwrap_or_default().to_owned();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|w| {
            !license
                .entitlements()
                .iter()
                .any(|e| e.name() == w.name && e.unit().as_str() == w.unit)
        })
        .map(|w| format!("{} ({})", w.name, w.unit))
        .collect();
    if missing.is_empty() {
        LicenseFinding::Found { license_arn }
    } else {
        LicenseFinding::Missing {
            license_arn,
            missing,
        }
    }
}

mod holder;
pub use holder::{ContractHolder, Floating, FloatingError};

#[cfg(test)]
mod tests;

/// License Manager's client: credentials from the license token for a buyer outside AWS
/// (`contract.license_token_file`), else from the SDK's chain (or the given settings).
pub async fn license_client(
    config: &crate::config::Config,
    settings: &crate::aws::AwsSettings,
) -> aws_sdk_licensemanager::Client {
    let c = &config.contract;
    if c.license_token_file.is_empty() {
        crate::aws::build_license_client(settings).await
    } else {
        let settings = crate::aws::AwsSettings {
            static_credentials: None,
            ..settings.clone()
        };
        crate::aws::build_license_client_from_token(
            &settings,
            std::path::Path::new(&c.license_token_file),
            &c.role_arn,
        )
        .await
    }
}

/// `[contract]`'s entitlements as checkouts ask for them (a counted unit defaults to 1).
pub fn wanted_entitlements(config: &crate::config::Config) -> Vec<WantedEntitlement> {
    config
        .contract
        .entitlements
        .iter()
        .map(|e| WantedEntitlement {
            name: e.name.clone(),
            unit: e.unit.clone(),
            count: e.count.or((e.unit != "None").then_some(1)),
        })
        .collect()
}
