//! The emulator's TOML configuration: products, keys, customers, tokens, faults.
//!
//! Every problem is reported at once ([`ConfigError`]) before any socket is bound.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::credentials::TemporaryCredentialsConfig;
use super::faults::FaultProfile;
use super::model::{Operation, MODEL_MAX_ALLOCATIONS};
use super::quotas::QuotaConfig;

/// The demo's signing key for PublicKeyVersion 1. It is public on purpose: it signs only
/// emulator tokens, and a fixed key lets an agent trust the demo across restarts.
pub const DEMO_SIGNING_KEY_PEM: &str = include_str!("demo-signing-key.pem");
pub const DEMO_PRODUCT_CODE: &str = "prod-demo1234";
/// The demo buyer's account: the demo customer's, the demo license's, and the account of every
/// access key the demo configuration does not map (so a first try sees the demo license).
pub const DEMO_BUYER_ACCOUNT: &str = "111122223333";
/// The demo license's token for GetAccessToken (License Manager for Anywhere).
pub const DEMO_LICENSE_TOKEN: &str = "demo-license-token";
/// The demo customer's license for the demo product (concurrent agreements; contract
/// pricing: a `Tier` feature and 10 floating `Seats`).
pub const DEMO_LICENSE_ARN: &str =
    "arn:aws:license-manager::111122223333:license:l-demo0000000000000000000000000001";

/// The longest `timestamp_future_skew`, `timestamp_max_age` or `signature_max_skew`: a year
/// keeps every usage Timestamp the emulator accepts within what its hour arithmetic holds.
pub const MAX_TIME_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

/// The emulator's whole configuration. See `docs/emulator.md` for an annotated example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorConfig {
    /// The region of the endpoint and of the caller's resources.
    #[serde(default = "default_region")]
    pub region: String,
    /// Seeds fault injection, generated keys and MeteringRecordIds, so runs are reproducible.
    /// Without it the ids are random (two fresh emulators never hand out the same ones), and
    /// faults and generated keys use seed 0.
    #[serde(default)]
    pub seed: Option<u64>,
    /// How far in the future a usage Timestamp may be.
    #[serde(default = "default_future_skew", with = "humantime_serde")]
    pub timestamp_future_skew: Duration,
    /// How old a MeterUsage Timestamp may be (AWS: 6 hours).
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub timestamp_max_age: Duration,
    /// How old a BatchMeterUsage record's Timestamp may be: 24 hours in the newest SDK models
    /// (botocore 1.44, the JS SDK v3), 6 hours in the API model given with the project. Either
    /// way, a record for the previous billing month is refused from 06:00 UTC on the 1st.
    #[serde(default = "default_batch_max_age", with = "humantime_serde")]
    pub batch_timestamp_max_age: Duration,
    /// Allocations allowed per usage record (AWS documents 500; the model allows 2500).
    #[serde(default = "default_max_allocations")]
    pub max_usage_allocations: usize,
    /// When set, a SigV4 `X-Amz-Date` further than this from the emulator clock is rejected.
    #[serde(default, with = "humantime_serde")]
    pub signature_max_skew: Option<Duration>,
    /// Access key id → secret. When empty, any well-formed SigV4 header is accepted.
    #[serde(default)]
    pub credentials: BTreeMap<String, String>,
    /// STS and the container credentials endpoint ([`super::credentials`]).
    #[serde(default)]
    pub temporary_credentials: TemporaryCredentialsConfig,
    #[serde(default)]
    pub products: Vec<ProductConfig>,
    /// RegisterUsage signing keys by PublicKeyVersion. Empty means one generated version 1.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// SaaS customers for BatchMeterUsage and ResolveCustomer.
    #[serde(default)]
    pub customers: Vec<CustomerConfig>,
    /// Granted licenses (concurrent agreements): a BatchMeterUsage record may name one with
    /// `LicenseArn` in place of the request's ProductCode.
    #[serde(default)]
    pub licenses: Vec<LicenseConfig>,
    /// License tokens for GetAccessToken (buyers outside AWS).
    #[serde(default)]
    pub license_tokens: Vec<LicenseTokenConfig>,
    #[serde(default)]
    pub registration_tokens: Vec<RegistrationTokenConfig>,
    #[serde(default)]
    pub faults: FaultProfile,
    /// Operations answered `DisabledApiException` ("The API is disabled in the Region").
    #[serde(default)]
    pub disabled_operations: Vec<Operation>,
    /// Per-account call quotas (on by default: 10, 10 and 5 a second).
    #[serde(default)]
    pub quotas: QuotaConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    pub code: String,
    /// How the product is listed: `hourly` products have no dimensions (AWS meters the task
    /// hours), so MeterUsage for them answers `InvalidUsageDimensionException`.
    #[serde(default)]
    pub pricing: ProductPricing,
    #[serde(default)]
    pub dimensions: Vec<String>,
    #[serde(default)]
    pub entitlement: Entitlement,
}

/// A listing's pricing model, as meterd's `pricing` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProductPricing {
    #[serde(rename = "hourly")]
    Hourly,
    #[serde(rename = "custom")]
    Custom,
    #[default]
    #[serde(rename = "hourly+custom")]
    HourlyCustom,
}

/// How RegisterUsage (and MeterUsage's entitlement check) answers for a product.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entitlement {
    #[default]
    Entitled,
    /// `CustomerNotEntitledException` on each identity's first RegisterUsage, and on every
    /// MeterUsage.
    NotEntitled,
    /// `PlatformNotSupportedException` on each identity's first RegisterUsage.
    PlatformNotSupported,
    /// `InvalidRegionException` on every RegisterUsage (the task runs in another region).
    WrongRegion,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub version: u32,
    /// PEM private key (PKCS#8 or PKCS#1). Without it (or `private_key_pem`) a key is generated.
    #[serde(default)]
    pub private_key_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    /// From this instant the version counts as expired: RegisterUsage still signs with it
    /// and adds `PublicKeyRotationTimestamp`.
    #[serde(default, with = "humantime_serde")]
    pub expired_at: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerConfig {
    pub identifier: String,
    pub aws_account_id: String,
    pub product_code: String,
    #[serde(default = "yes")]
    pub subscribed: bool,
}

/// One license granted to a buyer's account for a product (one agreement): what
/// BatchMeterUsage's `LicenseArn` names, and what License Manager's CheckoutLicense checks out
/// (contract pricing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseConfig {
    pub arn: String,
    pub customer_aws_account_id: String,
    pub product_code: String,
    /// Returned by ResolveCustomer in `Metadata.AgreementId`.
    #[serde(default)]
    pub agreement_id: Option<String>,
    /// The activation period: usage outside it answers `InvalidLicenseException`, and
    /// CheckoutLicense finds no license.
    #[serde(default, with = "humantime_serde")]
    pub begins_at: Option<SystemTime>,
    #[serde(default, with = "humantime_serde")]
    pub ends_at: Option<SystemTime>,
    /// License Manager's `ProductSKU` (default: the product code).
    #[serde(default)]
    pub product_sku: Option<String>,
    /// The issuer's key fingerprint a checkout must name (default: AWS Marketplace's).
    #[serde(default = "marketplace_fingerprint")]
    pub issuer_fingerprint: String,
    /// What the buyer is entitled to (License Manager entitlements).
    #[serde(default)]
    pub entitlements: Vec<EntitlementConfig>,
    /// How long a PROVISIONAL checkout lasts without ExtendLicenseConsumption
    /// (`ProvisionalConfiguration.MaxTimeToLiveInMinutes`; AWS: 60 minutes).
    #[serde(default = "default_provisional_ttl", with = "humantime_serde")]
    pub provisional_ttl: Duration,
}

impl LicenseConfig {
    pub fn sku(&self) -> &str {
        self.product_sku.as_deref().unwrap_or(&self.product_code)
    }
}

/// AWS Marketplace's issuer, as a CheckoutLicense for a Marketplace product names it.
pub const MARKETPLACE_ISSUER_FINGERPRINT: &str =
    "aws:294406891311:AWS/Marketplace:issuer-fingerprint";

fn marketplace_fingerprint() -> String {
    MARKETPLACE_ISSUER_FINGERPRINT.to_owned()
}
fn default_provisional_ttl() -> Duration {
    Duration::from_secs(3600)
}

/// One entitlement of a license: a feature (`unit = "None"`, with a `value` such as a tier)
/// or a quantity (`Count`, `Gigabytes`, …) of which `max_count` may be checked out at once
/// (PROVISIONAL, returned to the pool by check-in or expiry) or drawn down for good
/// (PERPETUAL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitlementConfig {
    pub name: String,
    #[serde(default = "count_unit")]
    pub unit: String,
    #[serde(default)]
    pub max_count: Option<i64>,
    #[serde(default)]
    pub value: Option<String>,
    /// Checkouts past `max_count` are allowed.
    #[serde(default)]
    pub overage: bool,
    #[serde(default = "yes")]
    pub allow_check_in: bool,
}

fn count_unit() -> String {
    "Count".to_owned()
}

/// A license token a buyer outside AWS holds (License Manager for Anywhere): GetAccessToken
/// exchanges it for an access token for AssumeRoleWithWebIdentity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseTokenConfig {
    pub token: String,
    pub license_arn: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationTokenConfig {
    pub token: String,
    pub customer_identifier: String,
    #[serde(default, with = "humantime_serde")]
    pub expires_at: Option<SystemTime>,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_future_skew() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_max_age() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn default_batch_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_allocations() -> usize {
    500
}
fn yes() -> bool {
    true
}

/// Every problem found in a configuration. A CLI maps this to exit code 64 (`EX_USAGE`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid emulator configuration:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            region: default_region(),
            seed: None,
            timestamp_future_skew: default_future_skew(),
            timestamp_max_age: default_max_age(),
            batch_timestamp_max_age: default_batch_max_age(),
            max_usage_allocations: default_max_allocations(),
            signature_max_skew: None,
            credentials: BTreeMap::new(),
            temporary_credentials: TemporaryCredentialsConfig::default(),
            products: Vec::new(),
            keys: Vec::new(),
            customers: Vec::new(),
            licenses: Vec::new(),
            license_tokens: Vec::new(),
            registration_tokens: Vec::new(),
            faults: FaultProfile::default(),
            disabled_operations: Vec::new(),
            quotas: QuotaConfig::default(),
        }
    }
}

impl EmulatorConfig {
    /// A demo product `prod-demo1234` (dimensions `requests`, `gigabytes`) in us-east-1,
    /// entitled, signed with the fixed demo key as PublicKeyVersion 1, with two SaaS
    /// customers (the first with the license [`DEMO_LICENSE_ARN`]) and registration tokens
    /// `demo-token-1` … `demo-token-3`. No credential check, and quotas counted but not
    /// enforced: tests make many calls at one instant of a manual clock (`meterd emulator`
    /// without a file turns them on).
    pub fn demo() -> Self {
        Self {
            products: vec![ProductConfig {
                code: DEMO_PRODUCT_CODE.to_owned(),
                pricing: ProductPricing::HourlyCustom,
                dimensions: vec!["requests".to_owned(), "gigabytes".to_owned()],
                entitlement: Entitlement::Entitled,
            }],
            keys: vec![KeyConfig {
                version: 1,
                private_key_path: None,
                private_key_pem: Some(DEMO_SIGNING_KEY_PEM.to_owned()),
                expired_at: None,
            }],
            customers: vec![
                CustomerConfig {
                    identifier: "cust-demo-1".to_owned(),
                    aws_account_id: "111122223333".to_owned(),
                    product_code: DEMO_PRODUCT_CODE.to_owned(),
                    subscribed: true,
                },
                CustomerConfig {
                    identifier: "cust-demo-unsubscribed".to_owned(),
                    aws_account_id: "444455556666".to_owned(),
                    product_code: DEMO_PRODUCT_CODE.to_owned(),
                    subscribed: false,
                },
            ],
            licenses: vec![LicenseConfig {
                arn: DEMO_LICENSE_ARN.to_owned(),
                customer_aws_account_id: "111122223333".to_owned(),
                product_code: DEMO_PRODUCT_CODE.to_owned(),
                agreement_id: Some("agmt-demo1234".to_owned()),
                begins_at: None,
                ends_at: None,
                product_sku: None,
                issuer_fingerprint: marketplace_fingerprint(),
                entitlements: vec![
                    EntitlementConfig {
                        name: "Tier".to_owned(),
                        unit: "None".to_owned(),
                        max_count: None,
                        value: Some("Premium".to_owned()),
                        overage: false,
                        allow_check_in: true,
                    },
                    EntitlementConfig {
                        name: "Seats".to_owned(),
                        unit: "Count".to_owned(),
                        max_count: Some(10),
                        value: None,
                        overage: false,
                        allow_check_in: true,
                    },
                ],
                provisional_ttl: default_provisional_ttl(),
            }],
            license_tokens: vec![LicenseTokenConfig {
                token: DEMO_LICENSE_TOKEN.to_owned(),
                license_arn: DEMO_LICENSE_ARN.to_owned(),
            }],
            registration_tokens: (1..=3)
                .map(|i| RegistrationTokenConfig {
                    token: format!("demo-token-{i}"),
                    customer_identifier: "cust-demo-1".to_owned(),
                    expires_at: None,
                })
                .collect(),
            quotas: QuotaConfig {
                default_account: DEMO_BUYER_ACCOUNT.to_owned(),
                ..QuotaConfig::off()
            },
            ..Self::default()
        }
    }

    /// Parses and validates TOML.
    pub fn from_toml_str(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text).context("parsing emulator configuration")?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file. Relative key paths are relative to its folder.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading emulator configuration {}", path.display()))?;
        let mut config: Self = toml::from_str(&text)
            .with_context(|| format!("parsing emulator configuration {}", path.display()))?;
        if let Some(dir) = path.parent() {
            for key in &mut config.keys {
                if let Some(p) = &key.private_key_path {
                    if p.is_relative() {
                        key.private_key_path = Some(dir.join(p));
                    }
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn license(&self, arn: &str) -> Option<&LicenseConfig> {
        self.licenses.iter().find(|l| l.arn == arn)
    }

    pub fn product(&self, code: &str) -> Option<&ProductConfig> {
        self.products.iter().find(|p| p.code == code)
    }

    /// Checks everything and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.region.is_empty()
            || !self
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            problems.push(format!("region {:?} is not a region name", self.region));
        }
        if !(1..=MODEL_MAX_ALLOCATIONS).contains(&self.max_usage_allocations) {
            problems.push(format!(
                "max_usage_allocations must be 1..={MODEL_MAX_ALLOCATIONS}, got {}",
                self.max_usage_allocations
            ));
        }
        problems.extend(self.quotas.problems());
        if self.timestamp_max_age.is_zero() {
            problems.push("timestamp_max_age must be positive".to_owned());
        }
        if self.batch_timestamp_max_age.is_zero() {
            problems.push("batch_timestamp_max_age must be positive".to_owned());
        }
        for (name, window) in [
            ("timestamp_future_skew", Some(self.timestamp_future_skew)),
            ("timestamp_max_age", Some(self.timestamp_max_age)),
            (
                "batch_timestamp_max_age",
                Some(self.batch_timestamp_max_age),
            ),
            ("signature_max_skew", self.signature_max_skew),
        ] {
            if let Some(d) = window.filter(|d| *d > MAX_TIME_WINDOW) {
                problems.push(format!(
                    "{name}: at most {}, got {}",
                    humantime::format_duration(MAX_TIME_WINDOW),
                    humantime::format_duration(d)
                ));
            }
        }
        for (key, secret) in &self.credentials {
            if key.is_empty() || key.contains(['/', ' ', ',', '=']) {
                problems.push(format!("credential access key id {key:?} is malformed"));
            }
            if secret.is_empty() {
                problems.push(format!("credential {key:?} has an empty secret"));
            }
        }
        self.temporary_credentials.validate(&mut problems);
        let mut codes = BTreeSet::new();
        for product in &self.products {
            let code = &product.code;
            if code.is_empty()
                || code.len() > 255
                || !code
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-/=:_.@".contains(c))
            {
                problems.push(format!(
                    "product code {code:?} does not match the model's pattern"
                ));
            }
            if !codes.insert(code.as_str()) {
                problems.push(format!("product {code:?} is listed twice"));
            }
            if product.pricing == ProductPricing::Hourly {
                if !product.dimensions.is_empty() {
                    problems.push(format!(
                        "product {code:?} is priced hourly: it has no dimensions"
                    ));
                }
            } else if product.dimensions.is_empty() || product.dimensions.len() > 24 {
                problems.push(format!("product {code:?} needs 1 to 24 dimensions"));
            }
            let mut dims = BTreeSet::new();
            for dim in &product.dimensions {
                if dim.is_empty() || dim.len() > 255 {
                    problems.push(format!(
                        "product {code:?}: dimension {dim:?} must be 1-255 characters"
                    ));
                }
                if !dims.insert(dim.as_str()) {
                    problems.push(format!(
                        "product {code:?}: dimension {dim:?} is listed twice"
                    ));
                }
            }
        }
        let mut versions = BTreeSet::new();
        for key in &self.keys {
            if key.version == 0 {
                problems.push("key version must be at least 1".to_owned());
            }
            if !versions.insert(key.version) {
                problems.push(format!("key version {} is listed twice", key.version));
            }
            if key.private_key_path.is_some() && key.private_key_pem.is_some() {
                problems.push(format!(
                    "key version {}: give private_key_path or private_key_pem, not both",
                    key.version
                ));
            }
            if let Some(path) = &key.private_key_path {
                if !path.is_file() {
                    problems.push(format!(
                        "key version {}: {} is not a readable file",
                        key.version,
                        path.display()
                    ));
                }
            }
        }
        let mut customers = BTreeSet::new();
        for c in &self.customers {
            if c.identifier.is_empty() || c.identifier.len() > 255 {
                problems.push(format!(
                    "customer identifier {:?} must be 1-255 characters",
                    c.identifier
                ));
            }
            if !customers.insert(c.identifier.as_str()) {
                problems.push(format!("customer {:?} is listed twice", c.identifier));
            }
            if c.aws_account_id.is_empty()
                || !c.aws_account_id.chars().all(|ch| ch.is_ascii_digit())
            {
                problems.push(format!(
                    "customer {:?}: aws_account_id must be digits",
                    c.identifier
                ));
            }
            if self.product(&c.product_code).is_none() {
                problems.push(format!(
                    "customer {:?}: product {:?} is not configured",
                    c.identifier, c.product_code
                ));
            }
        }
        let mut arns = BTreeSet::new();
        for l in &self.licenses {
            if !super::model::license_arn_ok(&l.arn) {
                problems.push(format!("license {:?} is not a license ARN", l.arn));
            }
            if !arns.insert(l.arn.as_str()) {
                problems.push(format!("license {:?} is listed twice", l.arn));
            }
            if l.customer_aws_account_id.is_empty()
                || !l
                    .customer_aws_account_id
                    .chars()
                    .all(|ch| ch.is_ascii_digit())
            {
                problems.push(format!(
                    "license {:?}: customer_aws_account_id must be digits",
                    l.arn
                ));
            }
            if self.product(&l.product_code).is_none() {
                problems.push(format!(
                    "license {:?}: product {:?} is not configured",
                    l.arn, l.product_code
                ));
            }
            if let (Some(begins), Some(ends)) = (l.begins_at, l.ends_at) {
                if ends <= begins {
                    problems.push(format!(
                        "license {:?}: ends_at is not after begins_at",
                        l.arn
                    ));
                }
            }
            if l.provisional_ttl.is_zero() || l.provisional_ttl > MAX_TIME_WINDOW {
                problems.push(format!(
                    "license {:?}: provisional_ttl must be between 1s and 366 days",
                    l.arn
                ));
            }
            let mut names = BTreeSet::new();
            for e in &l.entitlements {
                if e.name.is_empty() || !names.insert(e.name.as_str()) {
                    problems.push(format!(
                        "license {:?}: entitlement {:?} is empty or listed twice",
                        l.arn, e.name
                    ));
                }
                if !super::license_manager::UNITS.contains(&e.unit.as_str()) {
                    problems.push(format!(
                        "license {:?}: entitlement {:?} has unit {:?}, not one of the model's units",
                        l.arn, e.name, e.unit
                    ));
                }
                if e.max_count.is_some_and(|m| m < 0) {
                    problems.push(format!(
                        "license {:?}: entitlement {:?}: max_count must not be negative",
                        l.arn, e.name
                    ));
                }
            }
        }
        for t in &self.license_tokens {
            if t.token.is_empty() || self.license(&t.license_arn).is_none() {
                problems.push(format!(
                    "license token {:?}: empty, or license {:?} is not configured",
                    t.token, t.license_arn
                ));
            }
        }
        let mut tokens = BTreeSet::new();
        for t in &self.registration_tokens {
            if t.token.is_empty() {
                problems.push("a registration token is empty".to_owned());
            }
            if !tokens.insert(t.token.as_str()) {
                problems.push(format!("registration token {:?} is listed twice", t.token));
            }
            if !customers.contains(t.customer_identifier.as_str()) {
                problems.push(format!(
                    "registration token {:?}: customer {:?} is not configured",
                    t.token, t.customer_identifier
                ));
            }
        }
        problems.extend(self.faults.problems());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

#[cfg(test)]
mod tests;
