//! The agent's configuration: TOML, unknown keys rejected, every problem reported at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{
    self, Aggregation, MAX_ALLOCATIONS_CEILING, MAX_DIMENSIONS, MAX_QUANTITY, MAX_TAG_KEYS,
};
use crate::serve::MAX_CONNECTIONS_CEILING;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlatformSetting {
    #[default]
    Auto,
    Ecs,
    Eks,
    Ec2,
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

/// When `metering_health` in `/v1/status` leaves `ok`: how long the oldest unsent record's hour
/// has been closed. An application that fails closed reads it; meterd itself stops nothing.
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

    /// All semantic problems; empty when the configuration is usable.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = model::check_product_code(&self.product_code) {
            problems.push(e);
        }
        if let Some(enabled) = self.registration.enabled {
            problems.push(format!(
                "registration.enabled is replaced by the top-level pricing key: remove it and set {}",
                if enabled {
                    "pricing = \"hourly+custom\" (RegisterUsage at start-up, then MeterUsage every hour) or pricing = \"hourly\" (RegisterUsage only)"
                } else {
                    "pricing = \"custom\" (MeterUsage only, its DryRun checks entitlement at start-up)"
                }
            ));
        }
        let m = &self.metering;
        problems.extend(self.contract_problems());
        if self.pricing == Pricing::Contract {
            if !m.dimensions.is_empty() {
                problems.push(format!(
                    "pricing = \"contract\" has no custom dimensions, but metering.dimensions lists {}; remove them, or set pricing = \"contract+custom\"",
                    m.dimensions.len()
                ));
            }
        } else if !self.pricing.meters() {
            if !m.dimensions.is_empty() {
                problems.push(format!(
                    "pricing = \"hourly\" has no custom dimensions (AWS meters the task hours itself), but metering.dimensions lists {}; remove them, or set pricing = \"hourly+custom\"",
                    m.dimensions.len()
                ));
            }
            if self.platform == PlatformSetting::Ec2 {
                problems.push(
                    "pricing = \"hourly\" cannot run on platform = \"ec2\": RegisterUsage does not work on EC2, and AWS meters an AMI's hourly price itself, so an AMI product with hourly pricing only needs no meterd".to_owned(),
                );
            }
        } else if m.dimensions.is_empty() || m.dimensions.len() > MAX_DIMENSIONS {
            problems.push(format!(
                "pricing = \"{}\" needs metering.dimensions to list 1 to {MAX_DIMENSIONS} custom dimensions, got {}",
                self.pricing,
                m.dimensions.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for d in &m.dimensions {
            if d.is_empty() || d.len() > 255 {
                problems.push(format!(
                    "metering.dimensions: {d:?} must be 1 to 255 characters"
                ));
            }
            if !seen.insert(d) {
                problems.push(format!("metering.dimensions: {d:?} is listed twice"));
            }
        }
        if m.tag_keys.len() > MAX_TAG_KEYS {
            problems.push(format!(
                "metering.tag_keys lists {} keys; the service allows at most {MAX_TAG_KEYS}",
                m.tag_keys.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for k in &m.tag_keys {
            if let Err(e) = model::check_tag_text("key", k, model::TAG_KEY_MAX_LEN) {
                problems.push(format!("metering.tag_keys: {e}"));
            }
            if !seen.insert(k) {
                problems.push(format!("metering.tag_keys: {k:?} is listed twice"));
            }
        }
        let configured: BTreeSet<&String> = m.dimensions.iter().collect();
        for (dimension, aggregation) in &m.aggregation {
            if !configured.contains(dimension) {
                problems.push(format!(
                    "metering.aggregation: {dimension:?} is not one of metering.dimensions"
                ));
            }
            if let Err(e) = aggregation.parse::<Aggregation>() {
                problems.push(format!("metering.aggregation.{dimension}: {e}"));
            }
        }
        for (dimension, units) in &m.heartbeat {
            if !configured.contains(dimension) {
                problems.push(format!(
                    "metering.heartbeat: {dimension:?} is not one of metering.dimensions"
                ));
            }
            if !(1..=MAX_QUANTITY).contains(units) {
                problems.push(format!(
                    "metering.heartbeat.{dimension} must be 1 to {MAX_QUANTITY} units per hour, got {units}"
                ));
            }
            if m.aggregation.contains_key(dimension) {
                problems.push(format!(
                    "metering.heartbeat: {dimension:?} is recorded by meterd itself, so it takes no metering.aggregation; remove one of the two"
                ));
            }
        }
        if m.max_allocations == 0 || m.max_allocations > MAX_ALLOCATIONS_CEILING {
            problems.push(format!(
                "metering.max_allocations must be 1 to {MAX_ALLOCATIONS_CEILING}, got {}",
                m.max_allocations
            ));
        }
        if self.registration.public_key_version == 0 {
            problems.push("registration.public_key_version must be at least 1".to_owned());
        }
        for f in &self.registration.public_key_files {
            if !f.is_file() {
                problems.push(format!(
                    "registration.public_key_files: {} is not a readable file",
                    f.display()
                ));
            }
        }
        if self.server.listen.is_empty() && self.server.unix_socket.is_empty() {
            problems.push("server: set listen, unix_socket, or both".to_owned());
        }
        if !self.server.listen.is_empty() && self.server.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "server.listen {:?} is not an address like 127.0.0.1:8377",
                self.server.listen
            ));
        }
        if !self.server.auth_token_file.is_empty() {
            if let Err(e) = self.auth_token() {
                problems.push(format!(
                    "server.auth_token_file {}: {e}",
                    self.server.auth_token_file
                ));
            }
        }
        if let Some(addr) = self.listen_addr() {
            if !addr.ip().is_loopback()
                && self.server.auth_token_file.is_empty()
                && !self.server.insecure_allow_unauthenticated_network
            {
                problems.push(format!(
                    "server.listen {addr} is reachable from the network but server.auth_token_file is not set, so anyone who can reach it could post usage; set auth_token_file, listen on loopback, or set server.insecure_allow_unauthenticated_network = true"
                ));
            }
        }
        if !(1..=MAX_CONNECTIONS_CEILING).contains(&self.server.max_connections) {
            problems.push(format!(
                "server.max_connections must be 1 to {MAX_CONNECTIONS_CEILING}, got {}",
                self.server.max_connections
            ));
        }
        check_duration(
            &mut problems,
            "server.grace_period",
            self.server.grace_period,
            Duration::from_secs(1),
            MAX_GRACE_PERIOD,
        );
        check_duration(
            &mut problems,
            "registration.startup_budget",
            self.registration.startup_budget,
            Duration::ZERO,
            MAX_STARTUP_BUDGET,
        );
        check_duration(
            &mut problems,
            "sending.call_timeout",
            self.sending.call_timeout,
            Duration::from_secs(1),
            MAX_CALL_TIMEOUT,
        );
        if !self.aws.endpoint_url.is_empty() {
            if let Err(e) = check_endpoint_url(&self.aws.endpoint_url) {
                problems.push(format!("aws.endpoint_url {:?}: {e}", self.aws.endpoint_url));
            }
        }
        if self.state.dir.as_os_str().is_empty() {
            problems.push("state.dir must be set".to_owned());
        }
        let s = &self.sending;
        // The sender's own rules, so a schedule it would refuse is reported here, not replaced.
        if let Err(e) = crate::backoff::Backoff::try_new(s.initial_backoff, s.max_backoff) {
            problems.push(format!(
                "sending.initial_backoff / sending.max_backoff: {e} (initial above zero, at most max, max at most 1h)"
            ));
        }
        if s.seal_delay > Duration::from_secs(600) {
            problems.push("sending.seal_delay must be at most 10m".to_owned());
        }
        if s.spread > MAX_SPREAD {
            problems.push(format!(
                "sending.spread must be at most {} (\"0s\" turns it off)",
                humantime::format_duration(MAX_SPREAD)
            ));
        }
        if !(1..=MAX_CALLS_PER_SECOND).contains(&s.max_calls_per_second) {
            problems.push(format!(
                "sending.max_calls_per_second must be 1 to {MAX_CALLS_PER_SECOND}"
            ));
        }
        if !self.server.metrics_listen.is_empty()
            && self.server.metrics_listen.parse::<SocketAddr>().is_err()
        {
            problems.push(format!(
                "server.metrics_listen {:?} is not an address like 0.0.0.0:9377",
                self.server.metrics_listen
            ));
        }
        if !self.audit.file.is_empty() && !Path::new(&self.audit.file).is_absolute() {
            problems.push(format!(
                "audit.file {:?} must be an absolute path",
                self.audit.file
            ));
        }
        let h = &self.health;
        check_duration(
            &mut problems,
            "health.failing_after",
            h.failing_after,
            MIN_FAILING_AFTER,
            MAX_FAILING_AFTER,
        );
        if h.warn_after < Duration::from_secs(60) {
            problems.push("health.warn_after must be at least 1m".to_owned());
        }
        if !(h.warn_after <= h.degraded_after && h.degraded_after <= h.failing_after) {
            problems.push(
                "health.warn_after, health.degraded_after and health.failing_after must not decrease"
                    .to_owned(),
            );
        }
        problems
    }

    /// `[contract]`: required and checked for contract pricing, refused otherwise.
    fn contract_problems(&self) -> Vec<String> {
        let c = &self.contract;
        let mut problems = Vec::new();
        if !self.pricing.checks_out() {
            if !c.product_sku.is_empty() || !c.entitlements.is_empty() {
                problems.push(format!(
                    "[contract] is for pricing = \"contract\" or \"contract+custom\", not \"{}\"; remove it or change the pricing",
                    self.pricing
                ));
            }
            return problems;
        }
        if c.product_sku.is_empty() || c.product_sku.len() > 255 {
            problems.push(format!(
                "contract.product_sku must be the product's SKU in License Manager (1 to 255 characters), got {:?}",
                c.product_sku
            ));
        }
        if c.key_fingerprint.is_empty() {
            problems.push(
                "contract.key_fingerprint must not be empty (AWS Marketplace's is the default)"
                    .to_owned(),
            );
        }
        if !["provisional", "perpetual"].contains(&c.checkout_type.as_str()) {
            problems.push(format!(
                "contract.checkout_type must be \"provisional\" or \"perpetual\", got {:?}",
                c.checkout_type
            ));
        }
        if c.entitlements.is_empty() || c.entitlements.len() > MAX_CONTRACT_ENTITLEMENTS {
            problems.push(format!(
                "contract.entitlements must list 1 to {MAX_CONTRACT_ENTITLEMENTS} entitlements to check out, got {}",
                c.entitlements.len()
            ));
        }
        match (c.license_token_file.is_empty(), c.role_arn.is_empty()) {
            (true, true) => {}
            (false, false) => {
                if !Path::new(&c.license_token_file).is_absolute() {
                    problems.push(format!(
                        "contract.license_token_file {:?} must be an absolute path",
                        c.license_token_file
                    ));
                }
                let role = c.role_arn.split(':').collect::<Vec<_>>();
                let is_role = role.len() == 6
                    && role[0] == "arn"
                    && role[1].starts_with("aws")
                    && role[2] == "iam"
                    && role[4].len() == 12
                    && role[4].bytes().all(|b| b.is_ascii_digit())
                    && role[5].starts_with("role/");
                if !is_role {
                    problems.push(format!(
                        "contract.role_arn {:?} is not a role ARN (arn:aws:iam::123456789012:role/AWSLicenseManagerConsumptionRole)",
                        c.role_arn
                    ));
                }
            }
            _ => problems.push(
                "contract.license_token_file and contract.role_arn go together (License Manager for Anywhere): set both or neither"
                    .to_owned(),
            ),
        }
        let mut names = BTreeSet::new();
        for e in &c.entitlements {
            if e.name.is_empty() || e.name.len() > 255 || !names.insert(e.name.as_str()) {
                problems.push(format!(
                    "contract.entitlements: name {:?} must be 1 to 255 characters and listed once",
                    e.name
                ));
            }
            if !aws_sdk_licensemanager::types::EntitlementDataUnit::values()
                .contains(&e.unit.as_str())
            {
                problems.push(format!(
                    "contract.entitlements {:?}: unit {:?} is not a License Manager unit (Count, None, Gigabytes, ...)",
                    e.name, e.unit
                ));
            }
            match (e.unit.as_str(), e.count) {
                ("None", Some(_)) => problems.push(format!(
                    "contract.entitlements {:?}: a feature (unit \"None\") has no count",
                    e.name
                )),
                (_, Some(n)) if !(1..=1_000_000_000).contains(&n) => problems.push(format!(
                    "contract.entitlements {:?}: count must be 1 to 1000000000, got {n}",
                    e.name
                )),
                _ => {}
            }
        }
        problems
    }

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
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
product_code = "prod-1234abcd"
pricing = "custom"
[metering]
dimensions = ["requests", "gigabytes"]
"#;

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::from_toml_str(MINIMAL).expect("valid");
        assert!(c.metering.report_zero);
        assert_eq!(c.metering.max_allocations, 500);
        assert_eq!(c.server.listen, "127.0.0.1:8377");
        assert_eq!(c.server.grace_period, Duration::from_secs(25));
        assert_eq!(c.pricing, Pricing::Custom);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_toml_str(&format!("{MINIMAL}report_zeroo = true\n"))
            .expect_err("typo must fail");
        assert!(err.to_string().contains("report_zeroo"), "{err}");
        let err =
            Config::from_toml_str(&MINIMAL.replace("[metering]", "[metering]\nreport_zro = false"))
                .expect_err("typo must fail");
        assert!(err.to_string().contains("report_zro"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
product_code = "bad code!"
pricing = "custom"
[metering]
dimensions = []
tag_keys = ["a","b","c","d","e","f"]
max_allocations = 0
[server]
listen = "nowhere"
"#;
        let err = Config::from_toml_str(text).expect_err("invalid");
        assert_eq!(err.problems.len(), 5, "{err}");
    }

    #[test]
    fn a_back_off_the_sender_would_refuse_is_a_config_error() {
        for (sending, named) in [
            ("max_backoff = \"2h\"", "longer than the 1 h"),
            ("initial_backoff = \"0s\"", "greater than zero"),
            (
                "initial_backoff = \"10m\"\nmax_backoff = \"1m\"",
                "longer than its cap",
            ),
        ] {
            let err = Config::from_toml_str(&format!("{MINIMAL}[sending]\n{sending}\n"))
                .expect_err(sending);
            assert!(err.to_string().contains(named), "{sending}: {err}");
        }
        let ok = Config::from_toml_str(&format!("{MINIMAL}[sending]\nmax_backoff = \"1h\"\n"))
            .expect("1h is allowed");
        assert_eq!(ok.sending.max_backoff, Duration::from_secs(3600));
    }

    #[test]
    fn health_thresholds_never_fail_before_two_hours_and_keep_their_order() {
        for (health, named) in [
            ("failing_after = \"1h59m\"", "health.failing_after must be 2h to 5h"),
            ("failing_after = \"6h\"", "health.failing_after must be 2h to 5h"),
            ("warn_after = \"30s\"", "health.warn_after must be at least 1m"),
            (
                "degraded_after = \"4h30m\"",
                "health.warn_after, health.degraded_after and health.failing_after must not decrease",
            ),
            (
                "warn_after = \"3h\"\ndegraded_after = \"2h\"",
                "health.warn_after, health.degraded_after and health.failing_after must not decrease",
            ),
        ] {
            let err = Config::from_toml_str(&format!("{MINIMAL}[health]\n{health}\n"))
                .expect_err(health);
            assert!(err.to_string().contains(named), "{health}: {err}");
        }
        let ok = Config::from_toml_str(&format!(
            "{MINIMAL}[health]\nwarn_after = \"2h\"\ndegraded_after = \"2h\"\nfailing_after = \"2h\"\n"
        ))
        .expect("2h for all is allowed");
        assert_eq!(ok.health.failing_after, MIN_FAILING_AFTER);
        let d = Config::from_toml_str(MINIMAL).expect("valid").health;
        assert_eq!(
            (d.warn_after, d.degraded_after, d.failing_after),
            (
                Duration::from_secs(1800),
                Duration::from_secs(7200),
                Duration::from_secs(14400)
            )
        );
    }

    #[test]
    fn every_number_duration_and_url_is_bounded() {
        let cases = [
            (
                "[server]\nmax_connections = 2305843009213693952",
                "server.max_connections must be 1 to 65536",
            ),
            (
                "[server]\nmax_connections = 0",
                "server.max_connections must be 1 to 65536",
            ),
            (
                "[registration]\nstartup_budget = \"500000000000years\"",
                "registration.startup_budget must be 0s to 1day",
            ),
            (
                "[server]\ngrace_period = \"500000000000years\"",
                "server.grace_period must be 1s to 1h",
            ),
            (
                "[server]\ngrace_period = \"0s\"",
                "server.grace_period must be 1s to 1h",
            ),
            (
                "[sending]\ncall_timeout = \"0s\"",
                "sending.call_timeout must be 1s to 5m",
            ),
            (
                "[sending]\nspread = \"51m\"",
                "sending.spread must be at most 50m",
            ),
            (
                "[sending]\nmax_calls_per_second = 0",
                "sending.max_calls_per_second must be 1 to 1000",
            ),
            (
                "[sending]\nmax_calls_per_second = 1001",
                "sending.max_calls_per_second must be 1 to 1000",
            ),
            (
                "[sending]\ncall_timeout = \"1h\"",
                "sending.call_timeout must be 1s to 5m",
            ),
            (
                "[aws]\nendpoint_url = \"file:///etc/passwd\"",
                "scheme must be http or https, not file",
            ),
            (
                "[aws]\nendpoint_url = \"::::not a url\"",
                "aws.endpoint_url \"::::not a url\": not a URL with a scheme",
            ),
            (
                "[aws]\nendpoint_url = \"localhost:4566\"",
                "aws.endpoint_url",
            ),
            ("[aws]\nendpoint_url = \"http://\"", "aws.endpoint_url"),
        ];
        for (section, named) in cases {
            let err = Config::from_toml_str(&format!("{MINIMAL}{section}\n")).expect_err(section);
            assert!(err.to_string().contains(named), "{section}: {err}");
        }
        for ok in [
            "[aws]\nendpoint_url = \"http://127.0.0.1:4566\"",
            "[aws]\nendpoint_url = \"https://metering.marketplace.us-east-1.amazonaws.com\"",
            "[server]\nmax_connections = 65536\ngrace_period = \"1h\"",
            "[registration]\nstartup_budget = \"0s\"",
        ] {
            Config::from_toml_str(&format!("{MINIMAL}{ok}\n")).expect(ok);
        }
        // All at once.
        let err = Config::from_toml_str(&format!(
            "{MINIMAL}[server]\nmax_connections = 0\ngrace_period = \"0s\"\n[sending]\ncall_timeout = \"0s\"\n[aws]\nendpoint_url = \"file:///x\"\n"
        ))
        .expect_err("four problems");
        assert_eq!(err.problems.len(), 4, "{err}");
    }

    #[test]
    fn a_network_listen_needs_a_token_or_an_explicit_opt_in() {
        let open = format!("{MINIMAL}[server]\nlisten = \"0.0.0.0:8377\"\n");
        let err = Config::from_toml_str(&open).expect_err("no token on the network");
        assert!(
            err.to_string()
                .contains("insecure_allow_unauthenticated_network"),
            "{err}"
        );
        let err = Config::from_toml_str(&format!("{MINIMAL}[server]\nlisten = \"[::]:8377\"\n"))
            .expect_err("no token on the network");
        assert!(
            err.to_string().contains("reachable from the network"),
            "{err}"
        );
        Config::from_toml_str(&format!(
            "{open}insecure_allow_unauthenticated_network = true\n"
        ))
        .expect("explicit opt-in");
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").expect("write");
        let with_token = format!(
            "{open}auth_token_file = {:?}\n",
            token.display().to_string()
        );
        let c = Config::from_toml_str(&with_token).expect("a token makes it safe");
        assert_eq!(c.auth_token().expect("readable").as_deref(), Some("s3cret"));
        Config::from_toml_str(&format!("{MINIMAL}[server]\nlisten = \"127.0.0.2:8377\"\n"))
            .expect("any loopback address is fine");
    }

    #[test]
    fn the_token_file_is_capped_and_must_be_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(MAX_TOKEN_FILE_BYTES as usize + 1)).expect("write");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "  \n").expect("write");
        for (path, named) in [
            (big.display().to_string(), "larger than 4096 bytes"),
            (empty.display().to_string(), "empty"),
            ("/dev/zero".to_owned(), "not a regular file"),
            (dir.path().display().to_string(), "not a regular file"),
        ] {
            let text = format!("{MINIMAL}[server]\nauth_token_file = {path:?}\n");
            let err = Config::from_toml_str(&text).expect_err(&path);
            assert!(err.to_string().contains(named), "{path}: {err}");
        }
    }

    #[test]
    fn pricing_decides_the_dimensions_and_the_platforms() {
        let hourly = "product_code = \"prod-1234abcd\"\npricing = \"hourly\"\n";
        let c = Config::from_toml_str(hourly).expect("hourly needs no [metering]");
        assert!(c.metering.dimensions.is_empty());
        assert!(c.pricing.registers() && !c.pricing.meters());
        Config::from_toml_str(&format!("{hourly}[metering]\ndimensions = []\n"))
            .expect("an empty list is the same");
        let err = Config::from_toml_str(&format!("{hourly}[metering]\ndimensions = [\"pods\"]\n"))
            .expect_err("hourly with dimensions");
        assert!(
            err.to_string().contains("has no custom dimensions"),
            "{err}"
        );
        let err = Config::from_toml_str(&format!("{hourly}platform = \"ec2\"\n"))
            .expect_err("hourly on EC2");
        assert!(
            err.to_string().contains("cannot run on platform = \"ec2\""),
            "{err}"
        );
        for pricing in ["custom", "hourly+custom"] {
            let text = format!("product_code = \"prod-1234abcd\"\npricing = \"{pricing}\"\n");
            let err = Config::from_toml_str(&text).expect_err("no dimensions");
            assert!(
                err.to_string()
                    .contains("needs metering.dimensions to list 1 to 24"),
                "{err}"
            );
            let c = Config::from_toml_str(&format!("{text}[metering]\ndimensions = [\"users\"]\n"))
                .expect("valid");
            assert!(c.pricing.meters());
        }
        let err =
            Config::from_toml_str("product_code = \"prod-1234abcd\"\n").expect_err("no pricing");
        assert!(err.to_string().contains("pricing"), "{err}");
        let err = Config::from_toml_str("product_code = \"prod-1234abcd\"\npricing = \"flat\"\n")
            .expect_err("unknown pricing");
        assert!(err.to_string().contains("hourly+custom"), "{err}");
    }

    #[test]
    fn registration_enabled_says_what_to_write_instead() {
        for (enabled, instead) in [
            ("true", "pricing = \"hourly+custom\""),
            ("false", "pricing = \"custom\""),
        ] {
            let err =
                Config::from_toml_str(&format!("{MINIMAL}[registration]\nenabled = {enabled}\n"))
                    .expect_err("enabled is gone");
            let text = err.to_string();
            assert!(
                text.contains("registration.enabled is replaced") && text.contains(instead),
                "{text}"
            );
        }
    }

    #[test]
    fn aggregation_and_heartbeat_are_checked_with_every_other_problem() {
        let text = r#"
product_code = "prod-1234abcd"
pricing = "custom"
[metering]
dimensions = ["requests", "users", "peak", "hosts", "pods"]
aggregation = { users = "unique", peak = "max", hosts = "last", requests = "sum" }
heartbeat = { pods = 1 }
"#;
        let c = Config::from_toml_str(text).expect("valid");
        let a = c.metering.aggregations();
        assert_eq!(a["requests"], Aggregation::Sum);
        assert_eq!(a["users"], Aggregation::Unique);
        assert_eq!(a["peak"], Aggregation::Max);
        assert_eq!(a["hosts"], Aggregation::Last);
        assert_eq!(a["pods"], Aggregation::Sum, "unlisted dimensions sum");
        assert_eq!(c.metering.heartbeat["pods"], 1);

        let bad = r#"
product_code = "bad code!"
pricing = "custom"
[metering]
dimensions = ["requests", "users"]
aggregation = { nope = "max", users = "median", requests = "max" }
heartbeat = { requests = 0, ghost = 1 }
"#;
        let err = Config::from_toml_str(bad).expect_err("invalid");
        let text = err.to_string();
        for needed in [
            "product_code",
            "metering.aggregation: \"nope\" is not one of metering.dimensions",
            "metering.aggregation.users: unknown aggregation \"median\"",
            "metering.heartbeat.requests must be 1 to 2147483647",
            "metering.heartbeat: \"ghost\" is not one of metering.dimensions",
            "\"requests\" is recorded by meterd itself",
        ] {
            assert!(text.contains(needed), "{needed}: {text}");
        }
        assert_eq!(err.problems.len(), 6, "{err}");
    }

    #[test]
    fn durations_are_human() {
        let c = Config::from_toml_str(&format!("{MINIMAL}[server]\ngrace_period = \"40s\"\n"))
            .expect("valid");
        assert_eq!(c.server.grace_period, Duration::from_secs(40));
    }
}
