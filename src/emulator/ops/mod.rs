//! The four operations' rules and the emulator's stored state.
//!
//! Each operation takes the caller and `now` explicitly and either answers or changes state,
//! never both halfway: every check runs before the first write.

mod allocations;
mod batch;
mod customers;
mod meter;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::{EmulatorConfig, Entitlement, RegistrationTokenConfig};
use super::error::ApiError;
use super::faults::InjectedFault;
use super::jwt::Keyring;
use super::model::{quantity_micros, Allocation, UsageRecordInput};
use crate::clock::unix_millis;

pub use allocations::check_allocations;

/// Calls kept for `calls()`; older ones are dropped first.
pub const MAX_CALLS_KEPT: usize = 100_000;

/// An accepted usage record (MeterUsage, or one BatchMeterUsage record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMeterRecord {
    /// The caller's access key id: one EC2 instance, ECS task or EKS pod.
    pub identity: String,
    pub product_code: String,
    pub dimension: String,
    /// The Timestamp rounded down to the hour, epoch seconds.
    pub hour: i64,
    /// The Timestamp as sent, epoch seconds.
    pub timestamp: f64,
    /// The quantity; for a decimal one (`…AsDecimal`), its whole part.
    pub quantity: i64,
    /// The decimal quantity, canonical (`17.00` is `17`), when it was sent as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity_as_decimal: Option<String>,
    pub allocations: Vec<Allocation>,
    pub metering_record_id: String,
    pub client_token: Option<String>,
    /// BatchMeterUsage only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_identifier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_aws_account_id: Option<String>,
    /// A BatchMeterUsage record billed to a license (concurrent agreements).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license_arn: Option<String>,
}

impl StoredMeterRecord {
    /// The quantity's value in millionths (decimal or whole, compared by value).
    pub fn micros(&self) -> i64 {
        quantity_micros(self.quantity, self.quantity_as_decimal.as_deref())
    }
}

/// The same customer, product, dimension and hour metered by ProductCode and by LicenseArn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DoubleBilled {
    pub customer_aws_account_id: String,
    pub product_code: String,
    pub dimension: String,
    pub hour: i64,
    /// The product-based record's id and the license-based one's, in the order they came.
    pub metering_record_ids: [String; 2],
}

/// What BatchMeterUsage deduplicates on: the legacy key, or the concurrent-agreements one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BatchKey {
    Product {
        customer: String,
        product_code: String,
        dimension: String,
        hour: i64,
    },
    License {
        account: String,
        license_arn: String,
        dimension: String,
        hour: i64,
    },
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Error {
        error_type: String,
        status: u16,
    },
    /// The connection was closed without a response.
    Dropped,
}

/// One call the emulator received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The operation name, or the raw `X-Amz-Target` when it named none.
    pub operation: String,
    /// The access key id from the Authorization header, when there was one.
    pub identity: Option<String>,
    /// Emulator-clock time the call arrived, epoch milliseconds.
    pub time_ms: i64,
    pub outcome: Outcome,
    pub fault: Option<InjectedFault>,
    pub added_latency_ms: u64,
}

impl CallRecord {
    pub fn error_type(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Error { error_type, .. } => Some(error_type),
            _ => None,
        }
    }
}

struct TokenUse {
    /// [`MeterUsageInput::meaning`] of the first request with the token.
    meaning: String,
    metering_record_id: String,
}

type HourKey = (String, String, String, i64);

struct State {
    entitlement: HashMap<String, Entitlement>,
    meter_records: Vec<StoredMeterRecord>,
    meter_index: HashMap<HourKey, usize>,
    client_tokens: HashMap<(String, String), TokenUse>,
    batch_records: Vec<StoredMeterRecord>,
    batch_index: HashMap<BatchKey, usize>,
    double_billed: Vec<DoubleBilled>,
    registered: HashSet<(String, String)>,
    tokens: BTreeMap<String, RegistrationTokenConfig>,
    used_tokens: HashSet<String>,
    calls: VecDeque<CallRecord>,
    ids: StdRng,
}

pub(crate) struct Service {
    pub config: EmulatorConfig,
    pub keyring: Keyring,
    state: Mutex<State>,
}

fn now_secs(now: SystemTime) -> f64 {
    unix_millis(now) as f64 / 1000.0
}

fn error(error_type: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(error_type, message)
}

fn invalid_product() -> ApiError {
    error(
        "InvalidProductCodeException",
        "The product code passed does not match the product code used for publishing the product.",
    )
}

fn invalid_dimension() -> ApiError {
    error(
        "InvalidUsageDimensionException",
        "The usage dimension does not match one of the UsageDimensions associated with products.",
    )
}

fn invalid_license(detail: &str) -> ApiError {
    error(
        "InvalidLicenseException",
        format!(
            "{detail} Ensure the LicenseArn is valid, matches the customer, and usage is within the license activation period."
        ),
    )
}

fn from_unix_secs_f64(secs: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs_f64(secs.max(0.0))
}

/// The start of the UTC month holding `epoch_secs`, in epoch seconds.
fn month_start(epoch_secs: i64) -> i64 {
    let days = epoch_secs.div_euclid(86_400);
    let (year, month, _) = civil_from_days(days);
    days_from_civil(year, month, 1) * 86_400
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The billing month's grace: records for the previous month are taken until 06:00 UTC on
/// the 1st.
const MONTH_GRACE_SECS: i64 = 6 * 3600;

fn timestamp_out_of_bounds() -> ApiError {
    error(
        "TimestampOutOfBoundsException",
        "The timestamp value passed in the meterUsage() is out of allowed range.",
    )
}

impl Service {
    pub fn new(config: EmulatorConfig, keyring: Keyring) -> Self {
        let state = State {
            entitlement: config
                .products
                .iter()
                .map(|p| (p.code.clone(), p.entitlement))
                .collect(),
            meter_records: Vec::new(),
            meter_index: HashMap::new(),
            client_tokens: HashMap::new(),
            batch_records: Vec::new(),
            batch_index: HashMap::new(),
            double_billed: Vec::new(),
            registered: HashSet::new(),
            tokens: config
                .registration_tokens
                .iter()
                .map(|t| (t.token.clone(), t.clone()))
                .collect(),
            used_tokens: HashSet::new(),
            calls: VecDeque::new(),
            ids: match config.seed {
                Some(seed) => StdRng::seed_from_u64(seed.wrapping_add(0x6d65_7465_7264)),
                None => StdRng::from_entropy(),
            },
        };
        Self {
            config,
            keyring,
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// MeterUsage's window: at most `timestamp_max_age` old, at most `timestamp_future_skew`
    /// ahead.
    fn check_timestamp(&self, timestamp: f64, now: SystemTime) -> Result<(), ApiError> {
        let now = now_secs(now);
        let too_old = now - timestamp > self.config.timestamp_max_age.as_secs_f64();
        let too_new = timestamp - now > self.config.timestamp_future_skew.as_secs_f64();
        if too_old || too_new {
            Err(timestamp_out_of_bounds())
        } else {
            Ok(())
        }
    }

    /// BatchMeterUsage's window: at most `batch_timestamp_max_age` old (an age equal to it
    /// is too old), at most `timestamp_future_skew` ahead, and not in an earlier billing month
    /// once that month's grace is over.
    fn check_batch_timestamp(&self, timestamp: f64, now: SystemTime) -> Result<(), ApiError> {
        let now = now_secs(now);
        let too_old = now - timestamp >= self.config.batch_timestamp_max_age.as_secs_f64();
        let too_new = timestamp - now > self.config.timestamp_future_skew.as_secs_f64();
        let this_month = month_start(now.floor() as i64);
        let closed_month = (timestamp.floor() as i64) < this_month
            && (now.floor() as i64) >= this_month + MONTH_GRACE_SECS;
        if too_old || too_new || closed_month {
            Err(timestamp_out_of_bounds())
        } else {
            Ok(())
        }
    }

    /// Pairs of records that bill the same customer, dimension and hour twice (once by
    /// ProductCode, once by LicenseArn).
    pub fn double_billed(&self) -> Vec<DoubleBilled> {
        self.state().double_billed.clone()
    }

    pub fn meter_records(&self) -> Vec<StoredMeterRecord> {
        self.state().meter_records.clone()
    }

    pub fn batch_records(&self) -> Vec<StoredMeterRecord> {
        self.state().batch_records.clone()
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        self.state().calls.iter().cloned().collect()
    }

    pub fn record_call(&self, call: CallRecord) {
        let mut state = self.state();
        if state.calls.len() >= MAX_CALLS_KEPT {
            state.calls.pop_front();
        }
        state.calls.push_back(call);
    }

    pub fn set_entitlement(
        &self,
        product_code: &str,
        entitlement: Entitlement,
    ) -> Result<(), String> {
        if self.config.product(product_code).is_none() {
            return Err(format!("product {product_code:?} is not configured"));
        }
        self.state()
            .entitlement
            .insert(product_code.to_owned(), entitlement);
        Ok(())
    }

    pub fn add_registration_token(&self, token: RegistrationTokenConfig) -> Result<(), String> {
        if token.token.is_empty() {
            return Err("the token is empty".to_owned());
        }
        if !self
            .config
            .customers
            .iter()
            .any(|c| c.identifier == token.customer_identifier)
        {
            return Err(format!(
                "customer {:?} is not configured",
                token.customer_identifier
            ));
        }
        let mut state = self.state();
        if state.tokens.contains_key(&token.token) {
            return Err(format!("token {:?} exists already", token.token));
        }
        state.tokens.insert(token.token.clone(), token);
        Ok(())
    }
}

/// The record's CustomerIdentifier when it names one. The model allows an empty string, and
/// SDKs whose model marks the member required send `""` beside a `CustomerAWSAccountId`.
fn customer_identifier(record: &UsageRecordInput) -> Option<&str> {
    record
        .customer_identifier
        .as_deref()
        .filter(|s| !s.is_empty())
}

/// A UUID-shaped (version 4) id from the seeded generator.
fn new_id(rng: &mut StdRng) -> String {
    uuid::Builder::from_random_bytes(rng.gen())
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests;
