//! Entitlement at start-up: RegisterUsage with a fresh nonce, PS256 verification against the
//! keyring, and the MeterUsage DryRun used by custom metering without RegisterUsage.
//!
//! - [`keyring`]: trusted public keys, bundled from `keys/*.pem` at build time plus run-time
//!   files; `meterd keys` prints [`Keyring::report`].
//! - [`verify()`]: the RegisterUsage JWT check (PS256 only; trusted key of the asked version;
//!   product code, nonce and version equal what was sent).
//! - [`register()`]: RegisterUsage at start-up with retries inside a start-up budget.
//! - [`contract::checkout()`]: contract pricing's CheckoutLicense with License Manager.
//! - [`dry_run_check_with()`]: MeterUsage `DryRun=true`, with the container and AMI failure policies.
//! - [`doctor()`]: the `meterd doctor` report.
//! - [`Backoff`]: exponential back-off with jitter, used by the retry loops here.
//!
//! # Exit codes
//!
//! Every fatal outcome is an [`EntitlementError`]; [`EntitlementError::exit_code`] maps each
//! class to one [`Exit`] (the table is in [`crate::exit`] and README.md).

pub mod baked;
pub mod contract;
pub mod doctor;
pub mod dry_run;
pub mod keyring;
pub mod nonce;
pub mod register;
pub mod verify;

#[cfg(test)]
pub(crate) mod test_support;

use std::time::Duration;

use crate::aws::CallFailure;
use crate::exit::Exit;

pub use crate::backoff::{Backoff, BackoffError};
pub use doctor::{doctor, CheckStatus, ContractProbe, DoctorCheck, DoctorInputs, DoctorReport};
pub use dry_run::{dry_run_check_with, DryRunMode, DryRunPassed, DryRunPolicy};
pub use keyring::{KeyEntry, Keyring, KeyringError, KeysReport};
pub use nonce::{new_nonce, NONCE_BYTES};
pub use register::{
    register, register_observed, Entitlement, KeyRotation, RegistrationSettings, RetryEvent,
};
pub use verify::{verify, Expected, VerifiedRegistration, VerifyError};

/// The product code baked in at build time (`METERD_PRODUCT_CODE=... cargo build`), if any.
pub const BAKED_PRODUCT_CODE: Option<&str> = option_env!("METERD_PRODUCT_CODE");

/// Refuses a configured product code that differs from the one baked in at build time, so a
/// Helm value cannot swap in a free product's code. With nothing baked in, anything passes.
pub fn check_product_code(configured: &str) -> Result<(), String> {
    check_product_code_against(BAKED_PRODUCT_CODE, configured)
}

fn check_product_code_against(baked: Option<&str>, configured: &str) -> Result<(), String> {
    match baked.filter(|b| !b.is_empty()) {
        Some(baked) if baked != configured => Err(format!(
            "product code {configured:?} is not the one this binary was built for ({baked:?}); \
             fix: remove the product_code setting or set it to {baked:?}, or rebuild with \
             METERD_PRODUCT_CODE set to the product you sell"
        )),
        _ => Ok(()),
    }
}

/// Why the agent cannot start metering. Each message names the cause and the fix.
/// Where start-up stands with entitlement: the one entitlement state of the agent.
#[derive(Debug, Clone, Copy, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntitlementState {
    /// RegisterUsage or the DryRun check has not passed yet.
    Pending,
    /// RegisterUsage returned a token that verified.
    Entitled,
    /// No RegisterUsage (EC2, or registration disabled); the DryRun check passed.
    PermissionsVerified,
    /// No RegisterUsage; the DryRun check is still being retried (AMI products stay up).
    Unverified,
    /// Start-up or the contract's renewal failed fatally; the agent is not ready.
    Failed,
}

impl EntitlementState {
    pub fn as_str(&self) -> &'static str {
        match self {
            EntitlementState::Pending => "pending",
            EntitlementState::Entitled => "entitled",
            EntitlementState::PermissionsVerified => "permissions_verified",
            EntitlementState::Unverified => "unverified",
            EntitlementState::Failed => "failed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EntitlementError {
    #[error(
        "the customer is not entitled to product {product_code:?} (CustomerNotEntitledException: \
         {message}); fix: the customer must subscribe to the product in AWS Marketplace, \
         from the AWS account that runs this task or pod"
    )]
    NotEntitled {
        product_code: String,
        message: String,
    },

    #[error(
        "AWS does not support RegisterUsage on this platform ({detail}); fix: run the product \
         on Amazon ECS, Amazon EKS or AWS Fargate, or, for an AMI or EC2 product, set \
         pricing = \"custom\" and use custom metering"
    )]
    PlatformNotSupported { detail: String },

    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Locked(Vec<baked::LockedSetting>),

    #[error("pricing = \"{pricing}\" cannot run on {platform}: {reason}")]
    PricingNotOnPlatform {
        pricing: &'static str,
        platform: &'static str,
        reason: &'static str,
    },

    #[error(
        "product code {product_code:?} is not valid for this call (InvalidProductCodeException: \
         {message}); fix: configure the product code AWS Marketplace gave you for this product"
    )]
    InvalidProductCode {
        product_code: String,
        message: String,
    },

    #[error(
        "the Metering Service rejected the region {region} ({code}: {message}); fix: call the \
         endpoint of the region the task or pod runs in (leave the region unset so the SDK \
         takes it from the environment, or set AWS_REGION to the resource's region)"
    )]
    InvalidRegion {
        region: String,
        code: String,
        message: String,
    },

    #[error(
        "PublicKeyVersion {version} is not valid for this product \
         (InvalidPublicKeyVersionException: {message}); fix: set \
         registration.public_key_version to the version of the key AWS gave you"
    )]
    InvalidPublicKeyVersion { version: u32, message: String },

    #[error(
        "the keyring holds no key for PublicKeyVersion {version}; fix: add the public key AWS \
         gave you as keys/v{version}.pem (or keys/v{version}-<name>.pem) and rebuild, or \
         list it in registration.public_key_files"
    )]
    NoTrustedKey { version: u32 },

    #[error(
        "the RegisterUsage token failed verification: {0}; fix: check that the keyring holds \
         the public key AWS gave you for this product and version (`meterd keys`); if it \
         does, the response did not come from AWS Marketplace: check the endpoint setting \
         and any proxy between the agent and AWS"
    )]
    Verification(#[from] VerifyError),

    #[error("the agent's credentials may not call {operation} ({code}: {message}); fix: {fix}")]
    Credentials {
        operation: &'static str,
        code: String,
        message: String,
        fix: &'static str,
    },

    #[error(
        "usage dimension {dimension:?} is not a dimension of product {product_code:?} \
         ({message}); fix: configure the dimension API names listed for the product in the \
         AWS Marketplace Management Portal"
    )]
    InvalidDimension {
        product_code: String,
        dimension: String,
        message: String,
    },

    #[error("product code {product_code:?} is refused: {reason}")]
    ProductCodeNotAllowed {
        product_code: String,
        reason: String,
    },

    #[error("{operation} failed with {failure}; fix: {fix}")]
    ServiceRefused {
        operation: &'static str,
        failure: CallFailure,
        fix: &'static str,
    },

    #[error(
        "{operation} did not succeed within the start-up budget of {}: {attempts} attempts, \
         the last failed with {last}; fix: check network access to the Metering Service \
         endpoint and its health, or raise the start-up budget",
        humantime::format_duration(*budget)
    )]
    BudgetExhausted {
        operation: &'static str,
        budget: Duration,
        attempts: u32,
        last: CallFailure,
    },

    #[error(
        "{operation} kept failing for {} ({attempts} attempts); giving up: {last}",
        humantime::format_duration(*elapsed)
    )]
    GaveUp {
        operation: &'static str,
        elapsed: Duration,
        attempts: u32,
        last: Box<EntitlementError>,
    },

    #[error(
        "no contract license for product SKU {product_sku:?} in this account ({code}: \
         {message}); fix: the buyer must accept the product's contract offer in AWS \
         Marketplace (and the license grant in License Manager) from the account that runs \
         this task or pod, with the entitlements configured in [contract]"
    )]
    NoContract {
        product_sku: String,
        code: String,
        message: String,
    },

    #[error(
        "License Manager refused the checkout's configuration ({code}: {message}); fix: check \
         contract.product_sku, contract.key_fingerprint and the entitlements' names and units \
         against the product's listing, and call the license's home region"
    )]
    ContractConfiguration { code: String, message: String },

    #[error("the ledger could not keep the license checkout: {0}; fix: see the ledger's error (disk, permissions)")]
    Held(String),

    #[error("the operating system's random source failed: {0}; fix: check /dev/urandom or getrandom(2) in the container's sandbox")]
    Random(String),
}

impl EntitlementError {
    /// The process exit code for this error's class ([`crate::exit`] has the table).
    pub fn exit_code(&self) -> Exit {
        match self {
            EntitlementError::NotEntitled { .. } | EntitlementError::NoContract { .. } => {
                Exit::NotEntitled
            }
            EntitlementError::Verification(_) => Exit::VerificationFailed,
            EntitlementError::PlatformNotSupported { .. }
            | EntitlementError::PricingNotOnPlatform { .. }
            | EntitlementError::Locked(_)
            | EntitlementError::InvalidProductCode { .. }
            | EntitlementError::InvalidRegion { .. }
            | EntitlementError::InvalidPublicKeyVersion { .. }
            | EntitlementError::NoTrustedKey { .. }
            | EntitlementError::Credentials { .. }
            | EntitlementError::InvalidDimension { .. }
            | EntitlementError::ProductCodeNotAllowed { .. }
            | EntitlementError::ContractConfiguration { .. } => Exit::Configuration,
            EntitlementError::ServiceRefused { .. } => Exit::ServiceRefused,
            EntitlementError::BudgetExhausted { .. } => Exit::TransientBudget,
            EntitlementError::GaveUp { last, .. } => last.exit_code(),
            EntitlementError::Random(_) => Exit::Internal,
            EntitlementError::Held(_) => Exit::Ledger,
        }
    }

    /// A short stable name for the class, for logs, metrics and `/v1/status`.
    pub fn class(&self) -> &'static str {
        match self.exit_code() {
            Exit::NotEntitled => "not_entitled",
            Exit::VerificationFailed => "verification_failed",
            Exit::Configuration => "configuration",
            Exit::TransientBudget => "transient_budget_exhausted",
            Exit::ServiceRefused => "service_refused",
            _ => "internal",
        }
    }
}

/// Logs a start-up failure once, with its class and exit code, and passes it on.
pub(crate) fn log_failure<T>(result: Result<T, EntitlementError>) -> Result<T, EntitlementError> {
    if let Err(e) = &result {
        tracing::error!(
            class = e.class(),
            exit_code = e.exit_code().as_code(),
            "entitlement failed: {e}"
        );
    }
    result
}

/// Which call a failure came from; decides the wording of its fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    RegisterUsage,
    MeterUsageDryRun,
}

impl Operation {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Operation::RegisterUsage => "RegisterUsage",
            Operation::MeterUsageDryRun => "MeterUsage (DryRun)",
        }
    }
}

/// Turns a non-retryable service answer into the error that names its cause and fix.
pub(crate) fn classify_fatal(
    op: Operation,
    failure: CallFailure,
    product_code: &str,
    public_key_version: u32,
    dimension: Option<&str>,
    region: &str,
) -> EntitlementError {
    let code = failure.code.clone().unwrap_or_default();
    let message = failure.message.clone();
    match code.as_str() {
        "CustomerNotEntitledException" => EntitlementError::NotEntitled {
            product_code: product_code.to_owned(),
            message,
        },
        "PlatformNotSupportedException" => EntitlementError::PlatformNotSupported {
            detail: format!("PlatformNotSupportedException: {message}"),
        },
        "InvalidProductCodeException" => EntitlementError::InvalidProductCode {
            product_code: product_code.to_owned(),
            message,
        },
        "InvalidRegionException" | "InvalidEndpointRegionException" => {
            EntitlementError::InvalidRegion {
                region: region.to_owned(),
                code,
                message,
            }
        }
        "InvalidPublicKeyVersionException" => EntitlementError::InvalidPublicKeyVersion {
            version: public_key_version,
            message,
        },
        "InvalidUsageDimensionException" => EntitlementError::InvalidDimension {
            product_code: product_code.to_owned(),
            dimension: dimension.unwrap_or_default().to_owned(),
            message,
        },
        "AccessDeniedException" | "UnauthorizedException" | "AccessDenied" => {
            EntitlementError::Credentials {
                operation: op.name(),
                code,
                message,
                fix: "grant the task role, IRSA role or instance role the actions \
                      aws-marketplace:MeterUsage and aws-marketplace:RegisterUsage (the managed \
                      policy AWSMarketplaceMeteringRegisterUsage)",
            }
        }
        "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "ExpiredTokenException"
        | "MissingAuthenticationTokenException"
        | "IncompleteSignature" => EntitlementError::Credentials {
            operation: op.name(),
            code,
            message,
            fix: "give the agent valid AWS credentials: IRSA on EKS, the task role on ECS, the \
                  instance role on EC2; also check the host clock (`meterd doctor` shows the \
                  skew), since a clock off by more than 5 minutes breaks request signing",
        },
        "" => EntitlementError::ServiceRefused {
            operation: op.name(),
            failure,
            fix: "the Metering Service endpoint could not be reached or did not answer; check \
                  network access (VPC endpoint, NAT, proxy, security groups) to the endpoint \
                  of this region",
        },
        "DisabledApiException" => EntitlementError::ServiceRefused {
            operation: op.name(),
            failure,
            fix: "the Metering Service API is disabled for this account or product; contact \
                  AWS Marketplace seller support",
        },
        _ => EntitlementError::ServiceRefused {
            operation: op.name(),
            failure,
            fix: "see the error message; if it persists, run `meterd doctor` and contact AWS \
                  Marketplace seller support",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baked_product_code_refuses_a_different_configured_code() {
        assert!(check_product_code_against(Some("prod-a"), "prod-a").is_ok());
        let err = check_product_code_against(Some("prod-a"), "free-b").unwrap_err();
        assert!(err.contains("prod-a") && err.contains("free-b"), "{err}");
        assert!(check_product_code_against(None, "anything").is_ok());
        assert!(check_product_code_against(Some(""), "anything").is_ok());
    }

    #[test]
    fn each_fatal_class_has_its_own_exit_code_and_none_is_64() {
        let fail = |code: &str| CallFailure {
            code: Some(code.to_owned()),
            message: "m".to_owned(),
            status: Some(400),
        };
        let classify = |code: &str| {
            classify_fatal(
                Operation::RegisterUsage,
                fail(code),
                "p",
                1,
                None,
                "eu-west-1",
            )
            .exit_code()
        };
        assert_eq!(classify("CustomerNotEntitledException"), Exit::NotEntitled);
        for code in [
            "PlatformNotSupportedException",
            "InvalidProductCodeException",
            "InvalidRegionException",
            "InvalidPublicKeyVersionException",
            "AccessDeniedException",
        ] {
            assert_eq!(classify(code), Exit::Configuration, "{code}");
        }
        assert_eq!(classify("DisabledApiException"), Exit::ServiceRefused);
        let verification = EntitlementError::Verification(VerifyError::NoSignature);
        assert_eq!(verification.exit_code(), Exit::VerificationFailed);
    }

    #[test]
    fn fatal_messages_name_cause_and_fix() {
        let err = classify_fatal(
            Operation::RegisterUsage,
            CallFailure {
                code: Some("InvalidRegionException".into()),
                message: "wrong region".into(),
                status: Some(400),
            },
            "p",
            1,
            None,
            "eu-west-1",
        );
        let text = err.to_string();
        assert!(
            text.contains("eu-west-1") && text.contains("fix:"),
            "{text}"
        );
    }
}
