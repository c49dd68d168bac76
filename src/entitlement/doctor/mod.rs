//! `meterd doctor`: checks the deployment and says how to fix each problem.
//!
//! It reports the platform and credential source, the region and endpoint, the product code,
//! whether the keyring holds a key for the configured version, whether a MeterUsage DryRun
//! passes, and the clock skew against the endpoint's HTTP `Date` header. The skew is read from
//! the DryRun's response (a signed HTTPS call works for every endpoint); when there is none
//! and the endpoint is plain `http://` (the emulator), from a plain `GET /`.
//!
//! Doctor makes one attempt of each call and never retries.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_sdk_marketplacemetering::primitives::{DateTime, DateTimeFormat};
use bytes::Bytes;
use http_body_util::Empty;
use serde::Serialize;

use crate::config::Pricing;

use super::keyring::Keyring;
use super::{check_product_code, classify_fatal, Operation};
use crate::clock::SharedClock;
use crate::http_client::{self, Authority, Connect};
use crate::platform::{detect, DetectedBy, Env, ImdsSettings, Platform};

/// Skew above which SigV4 signing fails (AWS allows 5 minutes).
const SKEW_FAIL: Duration = Duration::from_secs(300);
/// Skew worth a warning: hour boundaries and timestamps drift.
const SKEW_WARN: Duration = Duration::from_secs(30);
/// Budget for the plain HTTP `Date` request.
const PLAIN_HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything doctor looks at, as plain values; the caller maps configuration onto them.
pub struct DoctorInputs<'a> {
    pub product_code: &'a str,
    /// A configured dimension for the DryRun; `None` skips the DryRun.
    pub dimension: Option<&'a str>,
    /// The region the client uses (`None`: unresolved).
    pub region: Option<&'a str>,
    /// The endpoint override, if any; otherwise the regional AWS endpoint is shown.
    pub endpoint: Option<&'a str>,
    pub public_key_version: u32,
    /// The configured pricing model, which decides the route checked.
    pub pricing: Pricing,
    pub configured_platform: Option<Platform>,
    pub keyring: &'a Keyring,
    pub client: &'a aws_sdk_marketplacemetering::Client,
    pub clock: &'a SharedClock,
    pub env: Env<'a>,
    pub imds: ImdsSettings,
    /// Contract pricing: License Manager and `[contract]`, to see the license.
    pub contract: Option<ContractProbe<'a>>,
}

/// What the contract check needs (`pricing = "contract"`).
pub struct ContractProbe<'a> {
    pub client: &'a aws_sdk_licensemanager::Client,
    pub product_sku: &'a str,
    pub key_fingerprint: &'a str,
    pub entitlements: &'a [super::contract::WantedEntitlement],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl CheckStatus {
    fn label(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "FAIL",
            CheckStatus::Skip => "skip",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DoctorCheck {
    pub name: &'static str,
    pub status: CheckStatus,
    pub detail: String,
    /// How to fix it, for `Warn` and `Fail`.
    pub fix: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DoctorReport {
    pub platform: Platform,
    pub region: Option<String>,
    pub endpoint: String,
    /// Endpoint time minus local time, in seconds, when measured.
    pub clock_skew_seconds: Option<i64>,
    pub checks: Vec<DoctorCheck>,
}

impl DoctorReport {
    /// No check failed (warnings allowed).
    pub fn is_healthy(&self) -> bool {
        self.checks.iter().all(|c| c.status != CheckStatus::Fail)
    }

    pub fn check(&self, name: &str) -> Option<&DoctorCheck> {
        self.checks.iter().find(|c| c.name == name)
    }

    pub fn render(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(
                f,
                "[{:<4}] {:<12} {}",
                check.status.label(),
                check.name,
                check.detail
            )?;
            if let Some(fix) = &check.fix {
                writeln!(f, "{:20}fix: {fix}", "")?;
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == CheckStatus::Fail)
            .count();
        let warned = self
            .checks
            .iter()
            .filter(|c| c.status == CheckStatus::Warn)
            .count();
        if failed == 0 && warned == 0 {
            writeln!(f, "all checks passed")
        } else {
            writeln!(f, "{failed} problem(s), {warned} warning(s)")
        }
    }
}

fn check(
    name: &'static str,
    status: CheckStatus,
    detail: String,
    fix: Option<&str>,
) -> DoctorCheck {
    DoctorCheck {
        name,
        status,
        detail,
        fix: fix.map(str::to_owned),
    }
}

/// Runs every check; never fails as a whole.
pub async fn doctor(inputs: DoctorInputs<'_>) -> DoctorReport {
    let mut checks = Vec::new();

    // Platform and credentials.
    let info = detect(inputs.configured_platform, inputs.env, &inputs.imds).await;
    let how = match &info.detected_by {
        DetectedBy::Configured => "configured".to_owned(),
        DetectedBy::EnvVar(var) => format!("detected from {var}"),
        DetectedBy::Imds => format!(
            "detected through IMDSv2, instance {}",
            info.instance_id.as_deref().unwrap_or("?")
        ),
        DetectedBy::Nothing => "nothing detected".to_owned(),
    };
    if info.platform == Platform::Unknown {
        checks.push(check(
            "platform",
            CheckStatus::Warn,
            format!("unknown ({how})"),
            Some("set `platform` (ecs, eks or ec2) in the configuration"),
        ));
    } else {
        checks.push(check(
            "platform",
            CheckStatus::Ok,
            format!("{} ({how})", info.platform),
            None,
        ));
    }
    checks.push(pricing_route(inputs.pricing, info.platform));
    if let Some(probe) = &inputs.contract {
        checks.push(contract_check(probe).await);
    }
    let warnings = info.credential_warnings();
    if warnings.is_empty() {
        checks.push(check(
            "credentials",
            CheckStatus::Ok,
            info.credentials.describe().to_owned(),
            None,
        ));
    }
    for w in warnings {
        checks.push(check(
            "credentials",
            CheckStatus::Warn,
            format!("{}: {}", info.credentials.describe(), w.problem),
            Some(&w.fix),
        ));
    }

    // Region and endpoint.
    let region = inputs.region.map(str::to_owned);
    let endpoint = match (inputs.endpoint, inputs.region) {
        (Some(e), _) => e.to_owned(),
        (None, Some(r)) => format!("https://metering.marketplace.{r}.amazonaws.com"),
        (None, None) => "(no region, no endpoint)".to_owned(),
    };
    match inputs.region {
        Some(r) => checks.push(check(
            "region",
            CheckStatus::Ok,
            format!("{r}, endpoint {endpoint}"),
            None,
        )),
        None => checks.push(check(
            "region",
            CheckStatus::Fail,
            "no region resolved".to_owned(),
            Some(
                "set AWS_REGION to the region the task, pod or instance runs in (never a \
                 fixed default)",
            ),
        )),
    }

    // Product code.
    match check_product_code(inputs.product_code) {
        Ok(()) => checks.push(check(
            "product",
            CheckStatus::Ok,
            format!("product code {}", inputs.product_code),
            None,
        )),
        Err(reason) => checks.push(DoctorCheck {
            name: "product",
            status: CheckStatus::Fail,
            detail: format!("product code {} refused", inputs.product_code),
            fix: Some(reason),
        }),
    }

    // Keyring.
    let version = inputs.public_key_version;
    let keys: Vec<_> = inputs.keyring.for_version(version).collect();
    if keys.is_empty() {
        checks.push(check(
            "keyring",
            if inputs.pricing.registers() && info.platform != Platform::Ec2 {
                CheckStatus::Fail
            } else {
                CheckStatus::Warn
            },
            format!("no trusted key for PublicKeyVersion {version}"),
            Some(&format!(
                "add the public key AWS gave you with the product code as keys/v{version}.pem \
                 (or keys/v{version}-<name>.pem) and rebuild, or list it in \
                 registration.public_key_files"
            )),
        ));
    } else {
        let list: Vec<String> = keys
            .iter()
            .map(|k| format!("{} ({})", k.fingerprint, k.source))
            .collect();
        checks.push(check(
            "keyring",
            CheckStatus::Ok,
            format!("{} key(s) for v{version}: {}", keys.len(), list.join(", ")),
            None,
        ));
    }

    // DryRun, and the endpoint's Date from its response.
    let mut server_date = None;
    match inputs.dimension.filter(|_| inputs.pricing.meters()) {
        None => checks.push(check(
            "dryrun",
            CheckStatus::Skip,
            if inputs.pricing.meters() {
                "no dimension configured".to_owned()
            } else {
                format!(
                    "pricing = \"{}\" meters no custom dimension",
                    inputs.pricing
                )
            },
            None,
        )),
        Some(dimension) => {
            let (result, date) = super::dry_run::dry_run_call(
                inputs.client,
                inputs.product_code,
                dimension,
                inputs.clock.now(),
            )
            .await;
            server_date = date;
            match result {
                Ok(()) => checks.push(check(
                    "dryrun",
                    CheckStatus::Ok,
                    format!("MeterUsage DryRun for {dimension} passed"),
                    None,
                )),
                Err(failure) => {
                    let err = classify_fatal(
                        Operation::MeterUsageDryRun,
                        failure,
                        inputs.product_code,
                        version,
                        Some(dimension),
                        inputs.region.unwrap_or("(unset)"),
                    );
                    let text = err.to_string();
                    let (detail, fix) = match text.split_once("; fix: ") {
                        Some((d, f)) => (d.to_owned(), Some(f.to_owned())),
                        None => (text, None),
                    };
                    checks.push(DoctorCheck {
                        name: "dryrun",
                        status: CheckStatus::Fail,
                        detail,
                        fix,
                    });
                }
            }
        }
    }
    if server_date.is_none() {
        if let Some(e) = inputs.endpoint.filter(|e| e.starts_with("http://")) {
            server_date = plain_http_date(e).await;
        }
    }

    // Clock skew.
    let local = inputs.clock.now();
    let skew = server_date.and_then(|d| skew_seconds(&d, local));
    match skew {
        None => checks.push(check(
            "clock",
            CheckStatus::Skip,
            "skew unknown: the endpoint sent no Date header".to_owned(),
            None,
        )),
        Some(s) => {
            let abs = Duration::from_secs(s.unsigned_abs());
            let detail = format!("local clock is {} the endpoint's", describe_skew(s));
            let fix = "synchronise the host clock (chrony or systemd-timesyncd with the Amazon \
                       Time Sync Service, 169.254.169.123)";
            if abs > SKEW_FAIL {
                checks.push(check("clock", CheckStatus::Fail, detail, Some(fix)));
            } else if abs > SKEW_WARN {
                checks.push(check("clock", CheckStatus::Warn, detail, Some(fix)));
            } else {
                checks.push(check("clock", CheckStatus::Ok, detail, None));
            }
        }
    }

    DoctorReport {
        platform: info.platform,
        region,
        endpoint,
        clock_skew_seconds: skew,
        checks,
    }
}

fn describe_skew(s: i64) -> String {
    match s {
        0 => "level with".to_owned(),
        s if s > 0 => format!("{s} s behind"),
        s => format!("{} s ahead of", -s),
    }
}

/// Endpoint time minus local time, in whole seconds.
fn skew_seconds(http_date: &str, local: SystemTime) -> Option<i64> {
    let server = DateTime::from_str(http_date.trim(), DateTimeFormat::HttpDate).ok()?;
    let local = DateTime::from(local);
    Some(server.secs() - local.secs())
}

/// `GET /` on a plain-HTTP endpoint, for its `Date` header.
async fn plain_http_date(endpoint: &str) -> Option<String> {
    let uri: http::Uri = endpoint.parse().ok()?;
    let authority = Authority::of(&uri)?;
    let request = http::Request::builder()
        .method(http::Method::GET)
        .uri("/")
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())
        .ok()?;
    let address = authority.socket_address();
    let answer = http_client::send(Connect::Tcp(&address), request, 0, PLAIN_HTTP_TIMEOUT)
        .await
        .ok()?;
    answer
        .headers
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .map(str::to_owned)
}

/// Contract pricing: the license is visible and has the configured entitlements (nothing is
/// checked out).
async fn contract_check(probe: &ContractProbe<'_>) -> DoctorCheck {
    use super::contract::{find_license, LicenseFinding};
    match find_license(
        probe.client,
        probe.product_sku,
        probe.key_fingerprint,
        probe.entitlements,
    )
    .await
    {
        LicenseFinding::Found { license_arn } => check(
            "contract",
            CheckStatus::Ok,
            format!("license {license_arn} has every entitlement in [contract]"),
            None,
        ),
        LicenseFinding::NoLicense => check(
            "contract",
            CheckStatus::Fail,
            format!(
                "no license for product SKU {:?} from issuer {:?} in this account",
                probe.product_sku, probe.key_fingerprint
            ),
            Some("the buyer accepts the contract offer (and the license grant in License Manager) from this account; check contract.product_sku"),
        ),
        LicenseFinding::Missing {
            license_arn,
            missing,
        } => check(
            "contract",
            CheckStatus::Fail,
            format!("license {license_arn} lacks {}", missing.join(", ")),
            Some("configure in [contract] the entitlement names and units the listing has"),
        ),
        LicenseFinding::Failed(failure) => check(
            "contract",
            CheckStatus::Fail,
            format!("ListReceivedLicenses failed: {failure}"),
            Some("give the role license-manager:ListReceivedLicenses (and the checkout permissions: README, pricing models)"),
        ),
    }
}

/// The calls the pricing model makes on this platform, and whether it can run there.
fn pricing_route(pricing: Pricing, platform: Platform) -> DoctorCheck {
    let ec2 = platform == Platform::Ec2;
    let (status, detail, fix) = match (pricing, ec2) {
        (Pricing::Hourly, true) => (
            CheckStatus::Fail,
            "hourly on EC2: RegisterUsage does not work on EC2 and there is nothing to meter",
            Some("AWS meters an AMI's hourly price itself; for custom dimensions set pricing = \"custom\""),
        ),
        (Pricing::Hourly, false) => (
            CheckStatus::Ok,
            "hourly: RegisterUsage at start-up (the agent calls it; doctor does not register), no MeterUsage",
            None,
        ),
        (Pricing::Custom, false) => (
            CheckStatus::Ok,
            "custom: the MeterUsage DryRun at start-up (any error but throttling stops the task), then MeterUsage every hour",
            None,
        ),
        (Pricing::Custom | Pricing::HourlyCustom, true) => (
            CheckStatus::Ok,
            "custom on EC2 (AMI rules): MeterUsage every hour, its DryRun retried in the background, never failing closed within 2 hours",
            None,
        ),
        (Pricing::HourlyCustom, false) => (
            CheckStatus::Ok,
            "hourly+custom: RegisterUsage at start-up, then MeterUsage every hour",
            None,
        ),
        (Pricing::Contract, _) => (
            CheckStatus::Ok,
            "contract: CheckoutLicense with AWS License Manager at start-up (extended while it runs, checked in on shutdown), no MeterUsage",
            None,
        ),
        (Pricing::ContractCustom, _) => (
            CheckStatus::Ok,
            "contract+custom: CheckoutLicense with AWS License Manager at start-up, then MeterUsage every hour",
            None,
        ),
    };
    check("pricing", status, detail.to_owned(), fix)
}

/// `meterd doctor`: builds the inputs from the configuration, prints the report; true when
/// no check failed.
pub async fn doctor_for_config(config: &crate::config::Config) -> anyhow::Result<bool> {
    let settings = crate::aws::AwsSettings {
        operation_timeout: Some(Duration::from_secs(10)),
        ..crate::aws::AwsSettings::from_config(config)
    };
    let client = crate::aws::build_client(&settings).await;
    let keyring = Keyring::load(
        &config.registration.public_key_files,
        config.registration.public_key_version,
    )?;
    let region = client.config().region().map(|r| r.to_string());
    let clock: SharedClock = std::sync::Arc::new(crate::clock::SystemClock);
    let env = crate::platform::process_env;
    let license_client = if config.pricing.checks_out() {
        Some(crate::entitlement::contract::license_client(config, &settings).await)
    } else {
        None
    };
    let wanted = crate::entitlement::contract::wanted_entitlements(config);
    let report = doctor(DoctorInputs {
        product_code: &config.product_code,
        dimension: config.metering.dimensions.first().map(String::as_str),
        region: region.as_deref(),
        endpoint: Some(config.aws.endpoint_url.as_str()).filter(|e| !e.is_empty()),
        public_key_version: config.registration.public_key_version,
        pricing: config.pricing,
        configured_platform: config.platform.named(),
        keyring: &keyring,
        client: &client,
        clock: &clock,
        env: &env,
        imds: ImdsSettings::from_env(&env),
        contract: license_client.as_ref().map(|client| ContractProbe {
            client,
            product_sku: &config.contract.product_sku,
            key_fingerprint: &config.contract.key_fingerprint,
            entitlements: &wanted,
        }),
    })
    .await;
    print!("{report}");
    Ok(report.is_healthy())
}

#[cfg(test)]
mod tests;
