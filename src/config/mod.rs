//! The agent's configuration: TOML, unknown keys rejected, every problem reported at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::Aggregation;

mod validate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlatformSetting {
    #[default]
    Auto,
    Ecs,
    Eks,
    Ec2,
}

impl PlatformSetting {
    /// The platform this setting names; `None` for `auto` (detect it).
    pub fn named(self) -> Option<crate::platform::Platform> {
        use crate::platform::Platform;
        match self {
            PlatformSetting::Auto => None,
            PlatformSetting::Ecs => Some(Platform::Ecs),
            PlatformSetting::Eks => Some(Platform::Eks),
            PlatformSetting::Ec2 => Some(Platform::Ec2),
        }
    }
}

/// How the product is priced, which decides the calls meterd makes (README: pricing models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Pricing {
    /// Per task or pod hour: RegisterUsage at start-up; AWS meters the hours itself.
    #[serde(rename = "hourly")]
    Hourly,
    /// Custom dimensions: MeterUsage every hour; its DryRun is the start-up check.
    #[serde(rename = "custom")]
    Custom,
    /// Both: RegisterUsage at start-up, then MeterUsage every hour.
    #[serde(rename = "hourly+custom")]
    HourlyCustom,
    /// A contract: CheckoutLicense with AWS License Manager at start-up (`[contract]`).
    #[serde(rename = "contract")]
    Contract,
    /// A contract, plus MeterUsage every hour for custom dimensions.
    #[serde(rename = "contract+custom")]
    ContractCustom,
}

impl Pricing {
    pub fn as_str(self) -> &'static str {
        match self {
            Pricing::Hourly => "hourly",
            Pricing::Custom => "custom",
            Pricing::HourlyCustom => "hourly+custom",
            Pricing::Contract => "contract",
            Pricing::ContractCustom => "contract+custom",
        }
    }

    /// Whether the entitlement is a License Manager checkout.
    pub fn checks_out(self) -> bool {
        matches!(self, Pricing::Contract | Pricing::ContractCustom)
    }

    /// Whether containers call RegisterUsage at start-up.
    pub fn registers(self) -> bool {
        matches!(self, Pricing::Hourly | Pricing::HourlyCustom)
    }

    /// Whether there are custom dimensions to meter every hour.
    pub fn meters(self) -> bool {
        matches!(
            self,
            Pricing::Custom | Pricing::HourlyCustom | Pricing::ContractCustom
        )
    }
}

impl std::fmt::Display for Pricing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Pricing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hourly" => Ok(Pricing::Hourly),
            "custom" => Ok(Pricing::Custom),
            "hourly+custom" => Ok(Pricing::HourlyCustom),
            "contract" => Ok(Pricing::Contract),
            "contract+custom" => Ok(Pricing::ContractCustom),
            other => Err(format!(
                "unknown pricing {other:?}; expected \"hourly\", \"custom\", \"hourly+custom\", \"contract\" or \"contract+custom\""
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub product_code: String,
    pub pricing: Pricing,
    #[serde(default)]
    pub platform: PlatformSetting,
    #[serde(default)]
    pub metering: MeteringConfig,
    #[serde(default)]
    pub registration: RegistrationConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub aws: AwsConfig,
    #[serde(default)]
    pub sending: SendingConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub contract: ContractConfig,
}

/// `[contract]`: what contract pricing checks out from AWS License Manager at start-up.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContractConfig {
    /// The product's SKU in License Manager (the listing's product id).
    #[serde(default)]
    pub product_sku: String,
    /// The license issuer's key fingerprint: AWS Marketplace's unless a seller's own issuer.
    #[serde(default = "marketplace_fingerprint")]
    pub key_fingerprint: String,
    /// `provisional` (floating: returned to the pool by check-in or expiry; meterd extends it
    /// and checks it in on shutdown) or `perpetual` (drawn down for good).
    #[serde(default = "provisional")]
    pub checkout_type: String,
    #[serde(default)]
    pub entitlements: Vec<ContractEntitlement>,
    /// License Manager for Anywhere (a buyer outside AWS): the file holding the buyer's
    /// license token. With it, the License Manager calls are signed with the credentials of
    /// `role_arn`, got through GetAccessToken and AssumeRoleWithWebIdentity.
    #[serde(default)]
    pub license_token_file: String,
    /// The role the license token's access token assumes (`AWSLicenseManagerConsumptionRole`).
    #[serde(default)]
    pub role_arn: String,
}

/// One entitlement to check out: a feature (`unit = "None"`, no count) or `count` units.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContractEntitlement {
    pub name: String,
    #[serde(default = "count_unit")]
    pub unit: String,
    #[serde(default)]
    pub count: Option<i64>,
}

fn marketplace_fingerprint() -> String {
    crate::entitlement::contract::MARKETPLACE_KEY_FINGERPRINT.to_owned()
}
fn provisional() -> String {
    "provisional".to_owned()
}
fn count_unit() -> String {
    "Count".to_owned()
}

impl Default for ContractConfig {
    fn default() -> Self {
        Self {
            product_sku: String::new(),
            key_fingerprint: marketplace_fingerprint(),
            checkout_type: provisional(),
            entitlements: Vec::new(),
            license_token_file: String::new(),
            role_arn: String::new(),
        }
    }
}

/// Entitlements `[contract]` may list.
pub const MAX_CONTRACT_ENTITLEMENTS: usize = 20;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringConfig {
    #[serde(default)]
    pub dimensions: Vec<String>,
    #[serde(default)]
    pub tag_keys: Vec<String>,
    #[serde(default = "yes")]
    pub report_zero: bool,
    #[serde(default = "default_max_allocations")]
    pub max_allocations: usize,
    /// Dimension → "sum" | "max" | "last" | "unique"; unlisted dimensions sum. Read as text
    /// so that an unknown aggregation is reported with every other problem.
    #[serde(default)]
    pub aggregation: BTreeMap<String, String>,
    /// Dimension → units per hour that meterd records itself for every hour it runs.
    #[serde(default)]
    pub heartbeat: BTreeMap<String, i64>,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            dimensions: Vec::new(),
            tag_keys: Vec::new(),
            report_zero: true,
            max_allocations: default_max_allocations(),
            aggregation: BTreeMap::new(),
            heartbeat: BTreeMap::new(),
        }
    }
}

impl MeteringConfig {
    /// The aggregation of every configured dimension (validated configurations only name
    /// known aggregations; anything else reads as the default, `sum`).
    pub fn aggregations(&self) -> BTreeMap<String, Aggregation> {
        self.dimensions
            .iter()
            .map(|d| {
                let a = self
                    .aggregation
                    .get(d)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_default();
                (d.clone(), a)
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    /// Replaced by `pricing`; read only to say what to write instead.
    #[serde(default, skip_serializing)]
    pub enabled: Option<bool>,
    #[serde(default = "one")]
    pub public_key_version: u32,
    #[serde(default)]
    pub public_key_files: Vec<PathBuf>,
    /// How long start-up may keep retrying throttling and transient failures.
    #[serde(default = "default_startup_budget", with = "humantime_serde")]
    pub startup_budget: Duration,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            public_key_version: 1,
            public_key_files: Vec::new(),
            startup_budget: default_startup_budget(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub unix_socket: String,
    #[serde(default)]
    pub auth_token_file: String,
    /// Time allowed after SIGTERM to drain, seal the open hour and send it.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace_period: Duration,
    /// Concurrent connections across both listeners; further connections wait in the kernel
    /// backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Serve a non-loopback `listen` address with no `auth_token_file`: any client on the
    /// network can then post usage. Off unless set explicitly.
    #[serde(default)]
    pub insecure_allow_unauthenticated_network: bool,
    /// An address serving only GET `/metrics`, `/healthz` and `/readyz`, without a token, for
    /// a Prometheus that scrapes over the network (the chart's PodMonitor). Empty: none.
    #[serde(default)]
    pub metrics_listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            unix_socket: String::new(),
            auth_token_file: String::new(),
            grace_period: default_grace(),
            max_connections: default_max_connections(),
            insecure_allow_unauthenticated_network: false,
            metrics_listen: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// A damaged ledger at start-up is moved aside (`meterd ledger quarantine`) and the agent
    /// starts empty, with an ERROR and `meterd_ledger_quarantined_files`. Off: refuse, exit 74.
    #[serde(default)]
    pub quarantine_damaged: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
            quarantine_damaged: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub endpoint_url: String,
}

/// How sealed records are delivered. The defaults suit production.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SendingConfig {
    /// Wait after an hour closes before sealing it, so requests received just before the
    /// boundary land in their own hour.
    #[serde(default = "default_seal_delay", with = "humantime_serde")]
    pub seal_delay: Duration,
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Per-call timeout for MeterUsage.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub call_timeout: Duration,
    /// A sealed hour is first sent at this agent's offset in `[0, spread)` after the hour
    /// closes, derived from the ledger's instance id (`send::spread_offset`); `"0s"`: at once.
    #[serde(default = "default_spread", with = "humantime_serde")]
    pub spread: Duration,
    /// At most this many MeterUsage calls in any rolling second, retries included.
    #[serde(default = "default_max_calls_per_second")]
    pub max_calls_per_second: u32,
}

impl Default for SendingConfig {
    fn default() -> Self {
        Self {
            seal_delay: default_seal_delay(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            call_timeout: default_call_timeout(),
            spread: default_spread(),
            max_calls_per_second: default_max_calls_per_second(),
        }
    }
}

/// Longest `sending.spread`: an hour's sends still start within the next hour.
pub const MAX_SPREAD: Duration = Duration::from_secs(50 * 60);
/// Largest `sending.max_calls_per_second` (the account's whole MeterUsage quota is 10).
pub const MAX_CALLS_PER_SECOND: u32 = 1000;

fn default_spread() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_max_calls_per_second() -> u32 {
    2
}

/// When `metering_health` in `/v1/status` leaves `ok`: how long the oldest unsent record has
/// been due (its hour's close plus the agent's spread offset). An application that fails closed reads it; meterd itself stops nothing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_warn_after", with = "humantime_serde")]
    pub warn_after: Duration,
    #[serde(default = "default_degraded_after", with = "humantime_serde")]
    pub degraded_after: Duration,
    /// At least 2 h: AWS asks AMI products never to fail closed sooner.
    #[serde(default = "default_failing_after", with = "humantime_serde")]
    pub failing_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            warn_after: default_warn_after(),
            degraded_after: default_degraded_after(),
            failing_after: default_failing_after(),
        }
    }
}

/// The audit trail of final outcomes (`crate::audit`, docs/reconciliation.md).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// An absolute path: each final outcome appended as a JSON line, fsynced. Empty: none.
    #[serde(default)]
    pub file: String,
    /// Each final outcome also as a log event (target `meterd::audit`, INFO).
    #[serde(default)]
    pub log: bool,
}

/// `health.failing_after` bounds: not before 2 h (AWS's rule for AMI products), and not after a
/// record can still be unsent (it is dead-lettered 6 h after its hour starts, 5 h after it
/// closes).
pub const MIN_FAILING_AFTER: Duration = Duration::from_secs(2 * 3600);
pub const MAX_FAILING_AFTER: Duration = Duration::from_secs(5 * 3600);

fn default_warn_after() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_degraded_after() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_failing_after() -> Duration {
    Duration::from_secs(4 * 3600)
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn default_max_allocations() -> usize {
    500
}
fn default_startup_budget() -> Duration {
    Duration::from_secs(300)
}
fn default_listen() -> String {
    "127.0.0.1:8377".to_owned()
}
fn default_grace() -> Duration {
    Duration::from_secs(25)
}
fn default_max_connections() -> usize {
    1024
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/meterd")
}
fn default_seal_delay() -> Duration {
    Duration::from_secs(2)
}
fn default_initial_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}
fn default_call_timeout() -> Duration {
    Duration::from_secs(20)
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration{}:\n  - {}", source_name.as_deref().map(|s| format!(" in {s}")).unwrap_or_default(), problems.join("\n  - "))]
pub struct ConfigError {
    pub source_name: Option<String>,
    pub problems: Vec<String>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: Some(path.display().to_string()),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Self::from_toml_str(&text).map_err(|mut e| {
            e.source_name = Some(path.display().to_string());
            e
        })
    }

    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            source_name: None,
            problems: vec![e.to_string().trim().replace('\n', "\n    ")],
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                source_name: None,
                problems,
            })
        }
    }
}

impl Config {
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.server.listen.parse().ok()
    }

    /// The bearer token from `server.auth_token_file`, trimmed; `None` when none is set. The
    /// file must be a regular file of at most [`MAX_TOKEN_FILE_BYTES`] with a token in it.
    pub fn auth_token(&self) -> std::io::Result<Option<String>> {
        use std::io::{Error, ErrorKind, Read};
        let path = match self.server.auth_token_file.as_str() {
            "" => return Ok(None),
            path => path,
        };
        // Checked before opening: opening a FIFO would block.
        if !std::fs::metadata(path)?.is_file() {
            return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
        }
        let file = std::fs::File::open(path)?;
        let mut text = String::new();
        file.take(MAX_TOKEN_FILE_BYTES + 1)
            .read_to_string(&mut text)?;
        if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("larger than {MAX_TOKEN_FILE_BYTES} bytes"),
            ));
        }
        match text.trim() {
            "" => Err(Error::new(ErrorKind::InvalidData, "the file is empty")),
            token => Ok(Some(token.to_owned())),
        }
    }
}

/// The largest auth token file read.
pub const MAX_TOKEN_FILE_BYTES: u64 = 4096;
/// Bounds of durations, so that no configured value can overflow a clock.
pub const MAX_GRACE_PERIOD: Duration = Duration::from_secs(3600);
pub const MAX_STARTUP_BUDGET: Duration = Duration::from_secs(24 * 3600);
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(300);

fn check_duration(
    problems: &mut Vec<String>,
    key: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) {
    if value < min || value > max {
        problems.push(format!(
            "{key} must be {} to {}, got {}",
            humantime::format_duration(min),
            humantime::format_duration(max),
            humantime::format_duration(value)
        ));
    }
}

/// An endpoint is an `http` or `https` URL with a host.
fn check_endpoint_url(url: &str) -> Result<(), String> {
    match url.split_once("://") {
        Some(("http" | "https", _)) => {}
        Some((other, _)) => return Err(format!("the scheme must be http or https, not {other}")),
        None => return Err("not a URL with a scheme, such as https://".to_owned()),
    }
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL names no host".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
