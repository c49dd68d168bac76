//! The four operations' rules and the emulator's stored state.
//!
//! Each operation takes the caller and `now` explicitly and either answers or changes state,
//! never both halfway: every check runs before the first write.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::config::{
    CustomerConfig, EmulatorConfig, Entitlement, LicenseConfig, ProductConfig,
    RegistrationTokenConfig,
};
use super::error::ApiError;
use super::faults::InjectedFault;
use super::jwt::Keyring;
use super::model::{
    decimal_text, normalized_allocations, quantity_micros, tag_text_ok, Allocation,
    BatchMeterUsageInput, MeterUsageInput, RegisterUsageInput, ResolveCustomerInput,
    UsageRecordInput,
};
use super::sigv4::Caller;
use crate::clock::{hour_floor, unix_millis};

/// Calls kept for `calls()`; older ones are dropped first.
pub const MAX_CALLS_KEPT: usize = 100_000;

const MAX_TAGS_PER_ALLOCATION: usize = 5;
const MAX_DISTINCT_TAG_KEYS: usize = 5;

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

fn invalid_tag(detail: &str) -> ApiError {
    error(
        "InvalidTagException",
        format!("The tag is invalid, or the number of tags is greater than 5. {detail}"),
    )
}

fn invalid_allocations(detail: String) -> ApiError {
    error("InvalidUsageAllocationsException", detail)
}

/// The allocation and tag rules shared by MeterUsage and BatchMeterUsage.
/// `quantity` in millionths; `decimal`: the record's quantity was sent as a decimal, and its
/// allocations must be too (and integer ones with an integer record).
pub fn check_allocations(
    allocations: Option<&[Allocation]>,
    quantity: i64,
    decimal: bool,
    limit: usize,
) -> Result<(), ApiError> {
    let Some(allocations) = allocations else {
        return Ok(());
    };
    if allocations
        .iter()
        .any(|a| a.quantity_as_decimal.is_some() != decimal)
    {
        return Err(invalid_allocations(
            "Allocations must use the same type of quantity as the usage record: AllocatedUsageQuantity \
             with an integer quantity, AllocatedUsageQuantityAsDecimal with a decimal one."
                .to_owned(),
        ));
    }
    if allocations.len() > limit {
        return Err(invalid_allocations(format!(
            "The usage allocation objects are invalid, or the number of allocations is greater than {limit} for a single usage record."
        )));
    }
    let mut distinct_keys = BTreeSet::new();
    for allocation in allocations {
        let Some(tags) = &allocation.tags else {
            continue;
        };
        if tags.is_empty() {
            return Err(invalid_tag("Tags, when given, must hold at least 1 tag."));
        }
        if tags.len() > MAX_TAGS_PER_ALLOCATION {
            return Err(invalid_tag(&format!(
                "An allocation has {} tags; at most {MAX_TAGS_PER_ALLOCATION} are allowed.",
                tags.len()
            )));
        }
        let mut keys_here = BTreeSet::new();
        for tag in tags {
            let key_len = tag.key.encode_utf16().count();
            let value_len = tag.value.encode_utf16().count();
            if !(1..=100).contains(&key_len) || !tag_text_ok(&tag.key) {
                return Err(invalid_tag(&format!(
                    "Tag key '{}' must be 1-100 characters matching ^[a-zA-Z0-9+ -=._:\\/@]+$.",
                    tag.key
                )));
            }
            if !(1..=256).contains(&value_len) || !tag_text_ok(&tag.value) {
                return Err(invalid_tag(&format!(
                    "Tag value '{}' must be 1-256 characters matching ^[a-zA-Z0-9+ -=._:\\/@]+$.",
                    tag.value
                )));
            }
            if !keys_here.insert(tag.key.as_str()) {
                return Err(invalid_tag(&format!(
                    "Tag key '{}' appears twice in one allocation.",
                    tag.key
                )));
            }
            distinct_keys.insert(tag.key.as_str());
        }
    }
    if distinct_keys.len() > MAX_DISTINCT_TAG_KEYS {
        return Err(invalid_tag(&format!(
            "The allocations use {} distinct tag keys; at most {MAX_DISTINCT_TAG_KEYS} are allowed.",
            distinct_keys.len()
        )));
    }
    let mut tag_sets = BTreeSet::new();
    for (tags, _) in normalized_allocations(allocations) {
        if !tag_sets.insert(tags) {
            return Err(invalid_allocations(
                "Each usage allocation must have a unique set of tags.".to_owned(),
            ));
        }
    }
    let sum: i64 = allocations.iter().map(Allocation::micros).sum();
    if sum != quantity {
        return Err(invalid_allocations(format!(
            "The sum of allocated usage quantities ({}) is not equal to the usage quantity ({}).",
            decimal_text(sum),
            decimal_text(quantity)
        )));
    }
    Ok(())
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

    pub fn register_usage(
        &self,
        input: &RegisterUsageInput,
        caller: &Caller,
        now: SystemTime,
    ) -> Result<Value, ApiError> {
        let wrong_region = || {
            error(
                "InvalidRegionException",
                "RegisterUsage must be called in the same AWS Region the ECS task was launched in. \
                 This prevents a container from hardcoding a Region (e.g. withRegion(\"us-east-1\") when calling RegisterUsage.",
            )
        };
        if caller.region != self.config.region {
            return Err(wrong_region());
        }
        if self.config.product(&input.product_code).is_none() {
            return Err(invalid_product());
        }
        let Some(key) = self.keyring.get(input.public_key_version) else {
            return Err(error(
                "InvalidPublicKeyVersionException",
                "Public Key version is invalid.",
            ));
        };
        {
            let mut state = self.state();
            let entitlement = state
                .entitlement
                .get(&input.product_code)
                .copied()
                .unwrap_or_default();
            if entitlement == Entitlement::WrongRegion {
                return Err(wrong_region());
            }
            let first = state
                .registered
                .insert((caller.access_key_id.clone(), input.product_code.clone()));
            match entitlement {
                Entitlement::NotEntitled if first => {
                    return Err(error(
                        "CustomerNotEntitledException",
                        "Exception thrown when the customer does not have a valid subscription for the product.",
                    ))
                }
                Entitlement::PlatformNotSupported if first => {
                    return Err(error(
                        "PlatformNotSupportedException",
                        "AWS Marketplace does not support metering usage from the underlying platform. \
                         Currently, Amazon ECS, Amazon EKS, and AWS Fargate are supported.",
                    ))
                }
                _ => {}
            }
        }
        let iat = unix_millis(now) / 1000;
        let signature = key
            .sign(
                &input.product_code,
                input.public_key_version,
                input.nonce.as_deref(),
                iat,
            )
            .map_err(|e| {
                tracing::error!(error = %e, "signing the RegisterUsage token failed");
                ApiError::internal()
            })?;
        let mut response = json!({ "Signature": signature });
        if let Some(expired_at) = key.expired_at.filter(|_| key.is_expired(now)) {
            response["PublicKeyRotationTimestamp"] = json!(unix_millis(expired_at) / 1000);
        }
        Ok(response)
    }

    pub fn meter_usage(
        &self,
        input: &MeterUsageInput,
        caller: &Caller,
        now: SystemTime,
    ) -> Result<Value, ApiError> {
        if caller.region != self.config.region {
            return Err(error(
                "InvalidEndpointRegionException",
                "The endpoint being called is in a AWS Region different from your EC2 instance, ECS task, or EKS pod. \
                 The Region of the Metering Service endpoint and the AWS Region of the resource must match.",
            ));
        }
        let product = self
            .config
            .product(&input.product_code)
            .ok_or_else(invalid_product)?;
        if !product.dimensions.contains(&input.usage_dimension) {
            return Err(invalid_dimension());
        }
        let micros = quantity_micros(
            input.usage_quantity,
            input.usage_quantity_as_decimal.as_deref(),
        );
        check_allocations(
            input.usage_allocations.as_deref(),
            micros,
            input.usage_quantity_as_decimal.is_some(),
            self.config.max_usage_allocations,
        )?;
        self.check_timestamp(input.timestamp, now)?;
        let mut state = self.state();
        if state.entitlement.get(&product.code) == Some(&Entitlement::NotEntitled) {
            return Err(error(
                "CustomerNotEntitledException",
                "Exception thrown when the customer does not have a valid subscription for the product.",
            ));
        }
        if input.dry_run {
            return Err(error(
                "DryRunOperation",
                "Request would have succeeded, but DryRun flag is set.",
            ));
        }
        let identity = caller.access_key_id.clone();
        if let Some(token) = &input.client_token {
            if let Some(used) = state.client_tokens.get(&(identity.clone(), token.clone())) {
                if used.meaning != input.meaning() {
                    return Err(error(
                        "IdempotencyConflictException",
                        "The ClientToken is being used for multiple requests with different parameters.",
                    ));
                }
                return Ok(json!({ "MeteringRecordId": used.metering_record_id }));
            }
        }
        let hour = hour_floor(input.timestamp.floor() as i64);
        let key = (
            identity.clone(),
            input.product_code.clone(),
            input.usage_dimension.clone(),
            hour,
        );
        let allocations = input.usage_allocations.clone().unwrap_or_default();
        let id = match state.meter_index.get(&key) {
            Some(&i) => {
                let existing = &state.meter_records[i];
                if existing.micros() != micros
                    || normalized_allocations(&existing.allocations)
                        != normalized_allocations(&allocations)
                {
                    return Err(error(
                        "DuplicateRequestException",
                        "A metering record has already been emitted by the same EC2 instance, ECS task, or EKS pod \
                         for the given {usageDimension, timestamp} with a different usageQuantity.",
                    ));
                }
                existing.metering_record_id.clone()
            }
            None => {
                let id = new_id(&mut state.ids);
                state.meter_records.push(StoredMeterRecord {
                    identity: identity.clone(),
                    product_code: input.product_code.clone(),
                    dimension: input.usage_dimension.clone(),
                    hour,
                    timestamp: input.timestamp,
                    quantity: input.usage_quantity,
                    quantity_as_decimal: input.usage_quantity_as_decimal.clone(),
                    allocations,
                    metering_record_id: id.clone(),
                    client_token: input.client_token.clone(),
                    customer_identifier: None,
                    customer_aws_account_id: None,
                    license_arn: None,
                });
                let index = state.meter_records.len() - 1;
                state.meter_index.insert(key, index);
                id
            }
        };
        if let Some(token) = &input.client_token {
            state.client_tokens.insert(
                (identity, token.clone()),
                TokenUse {
                    meaning: input.meaning(),
                    metering_record_id: id.clone(),
                },
            );
        }
        Ok(json!({ "MeteringRecordId": id }))
    }

    /// `unprocessed[i]` (drawn by fault injection) leaves record `i` unprocessed.
    ///
    /// A record is billed either to the request's ProductCode and its customer (the legacy
    /// integration) or to its own `LicenseArn` (concurrent agreements, no ProductCode needed).
    /// The two are deduplicated apart, as AWS does, so metering the same customer, dimension
    /// and hour both ways bills it twice: both are accepted, and the pair is listed in
    /// [`Service::double_billed`].
    pub fn batch_meter_usage(
        &self,
        input: &BatchMeterUsageInput,
        caller: &Caller,
        now: SystemTime,
        unprocessed: &[bool],
    ) -> Result<Value, ApiError> {
        let request_product = match &input.product_code {
            Some(code) => Some(self.config.product(code).ok_or_else(invalid_product)?),
            None => None,
        };
        let mut billed = Vec::with_capacity(input.usage_records.len());
        for record in &input.usage_records {
            if customer_identifier(record).is_some() == record.customer_aws_account_id.is_some() {
                return Err(error(
                    "InvalidCustomerIdentifierException",
                    "Each usage record needs exactly one of CustomerIdentifier and CustomerAWSAccountId; \
                     they are mutually exclusive.",
                ));
            }
            let (product, license) =
                match &record.license_arn {
                    Some(arn) => {
                        let license = self.license_for(arn, record, request_product)?;
                        let product = self
                            .config
                            .product(&license.product_code)
                            .ok_or_else(invalid_product)?;
                        (product, Some(license))
                    }
                    None => match request_product {
                        Some(product) => (product, None),
                        None => return Err(error(
                            "ValidationException",
                            "A usage record without a LicenseArn needs the request's ProductCode.",
                        )),
                    },
                };
            if !product.dimensions.contains(&record.dimension) {
                return Err(invalid_dimension());
            }
            check_allocations(
                record.usage_allocations.as_deref(),
                quantity_micros(record.quantity, record.quantity_as_decimal.as_deref()),
                record.quantity_as_decimal.is_some(),
                self.config.max_usage_allocations,
            )?;
            billed.push((product, license));
        }
        for record in &input.usage_records {
            self.check_batch_timestamp(record.timestamp, now)?;
        }
        for (record, (_, license)) in input.usage_records.iter().zip(&billed) {
            if let Some(license) = license {
                let at = from_unix_secs_f64(record.timestamp);
                let active = license.begins_at.is_none_or(|b| at >= b)
                    && license.ends_at.is_none_or(|e| at < e);
                if !active {
                    return Err(invalid_license(
                        "The usage is outside the license's activation period.",
                    ));
                }
            }
        }
        let mut state = self.state();
        let mut results = Vec::new();
        let mut left = Vec::new();
        for (i, (record, (product, license))) in input.usage_records.iter().zip(&billed).enumerate()
        {
            if unprocessed.get(i).copied().unwrap_or(false) {
                left.push(record.raw.clone());
                continue;
            }
            let customer = self.customer(
                &product.code,
                customer_identifier(record),
                record.customer_aws_account_id.as_deref(),
            );
            let hour = hour_floor(record.timestamp.floor() as i64);
            let (identifier, account, key) = match license {
                // The license is the entitlement: its account is the customer.
                Some(license) => (
                    customer.map(|c| c.identifier.clone()),
                    license.customer_aws_account_id.clone(),
                    BatchKey::License {
                        account: license.customer_aws_account_id.clone(),
                        license_arn: license.arn.clone(),
                        dimension: record.dimension.clone(),
                        hour,
                    },
                ),
                None => {
                    let Some(customer) = customer.filter(|c| c.subscribed) else {
                        results.push(
                            json!({"UsageRecord": record.raw, "Status": "CustomerNotSubscribed"}),
                        );
                        continue;
                    };
                    (
                        Some(customer.identifier.clone()),
                        customer.aws_account_id.clone(),
                        BatchKey::Product {
                            customer: customer.identifier.clone(),
                            product_code: product.code.clone(),
                            dimension: record.dimension.clone(),
                            hour,
                        },
                    )
                }
            };
            let allocations = record.usage_allocations.clone().unwrap_or_default();
            if let Some(&j) = state.batch_index.get(&key) {
                let existing = &state.batch_records[j];
                if existing.micros()
                    == quantity_micros(record.quantity, record.quantity_as_decimal.as_deref())
                    && normalized_allocations(&existing.allocations)
                        == normalized_allocations(&allocations)
                {
                    results.push(json!({
                        "UsageRecord": record.raw,
                        "MeteringRecordId": existing.metering_record_id,
                        "Status": "Success",
                    }));
                } else {
                    results.push(json!({"UsageRecord": record.raw, "Status": "DuplicateRecord"}));
                }
                continue;
            }
            let id = new_id(&mut state.ids);
            let stored = StoredMeterRecord {
                identity: caller.access_key_id.clone(),
                product_code: product.code.clone(),
                dimension: record.dimension.clone(),
                hour,
                timestamp: record.timestamp,
                quantity: record.quantity,
                quantity_as_decimal: record.quantity_as_decimal.clone(),
                allocations,
                metering_record_id: id.clone(),
                client_token: None,
                customer_identifier: identifier,
                customer_aws_account_id: Some(account),
                license_arn: license.map(|l| l.arn.clone()),
            };
            // The same customer, product, dimension and hour billed the other way as well.
            let twin = state
                .batch_records
                .iter()
                .find(|r| {
                    r.license_arn.is_some() != stored.license_arn.is_some()
                        && r.customer_aws_account_id == stored.customer_aws_account_id
                        && r.product_code == stored.product_code
                        && r.dimension == stored.dimension
                        && r.hour == stored.hour
                })
                .map(|r| r.metering_record_id.clone());
            if let Some(twin) = twin {
                tracing::warn!(
                    account = stored.customer_aws_account_id.as_deref().unwrap_or_default(),
                    product = %stored.product_code,
                    dimension = %stored.dimension,
                    hour = stored.hour,
                    "the same customer and hour metered by ProductCode and by LicenseArn: billed twice"
                );
                state.double_billed.push(DoubleBilled {
                    customer_aws_account_id: stored
                        .customer_aws_account_id
                        .clone()
                        .unwrap_or_default(),
                    product_code: stored.product_code.clone(),
                    dimension: stored.dimension.clone(),
                    hour,
                    metering_record_ids: [twin, id.clone()],
                });
            }
            state.batch_records.push(stored);
            let index = state.batch_records.len() - 1;
            state.batch_index.insert(key, index);
            results.push(json!({
                "UsageRecord": record.raw,
                "MeteringRecordId": id,
                "Status": "Success",
            }));
        }
        Ok(json!({ "Results": results, "UnprocessedRecords": left }))
    }

    /// The license a record names, if it is one this emulator granted to the record's customer
    /// (and, when the request names a product, for that product).
    fn license_for(
        &self,
        arn: &str,
        record: &UsageRecordInput,
        request_product: Option<&ProductConfig>,
    ) -> Result<&LicenseConfig, ApiError> {
        let license = self
            .config
            .license(arn)
            .ok_or_else(|| invalid_license("The LicenseArn is not a granted license."))?;
        let account = match (customer_identifier(record), &record.customer_aws_account_id) {
            (_, Some(account)) => Some(account.clone()),
            (Some(id), None) => self
                .config
                .customers
                .iter()
                .find(|c| c.identifier == id && c.product_code == license.product_code)
                .map(|c| c.aws_account_id.clone()),
            (None, None) => None,
        };
        if account.as_deref() != Some(license.customer_aws_account_id.as_str()) {
            return Err(invalid_license(
                "The LicenseArn does not match the customer.",
            ));
        }
        if request_product.is_some_and(|p| p.code != license.product_code) {
            return Err(invalid_license(
                "The LicenseArn is for another product than the request's ProductCode.",
            ));
        }
        Ok(license)
    }

    /// Pairs of records that bill the same customer, dimension and hour twice (once by
    /// ProductCode, once by LicenseArn).
    pub fn double_billed(&self) -> Vec<DoubleBilled> {
        self.state().double_billed.clone()
    }

    fn customer(
        &self,
        product_code: &str,
        identifier: Option<&str>,
        account_id: Option<&str>,
    ) -> Option<&CustomerConfig> {
        self.config.customers.iter().find(|c| {
            c.product_code == product_code
                && match (identifier, account_id) {
                    (Some(id), _) => c.identifier == id,
                    (None, Some(account)) => c.aws_account_id == account,
                    (None, None) => false,
                }
        })
    }

    pub fn resolve_customer(
        &self,
        input: &ResolveCustomerInput,
        now: SystemTime,
    ) -> Result<Value, ApiError> {
        let mut state = self.state();
        let Some(token) = state.tokens.get(&input.registration_token).cloned() else {
            return Err(error(
                "InvalidTokenException",
                "Registration token is invalid.",
            ));
        };
        let expired = token.expires_at.is_some_and(|at| now >= at);
        if expired || state.used_tokens.contains(&token.token) {
            return Err(error(
                "ExpiredTokenException",
                "The submitted registration token has expired. This can happen if the buyer's browser takes too long \
                 to redirect to your page, the buyer has resubmitted the registration token, or your application \
                 has held on to the registration token for too long.",
            ));
        }
        let Some(customer) = self
            .config
            .customers
            .iter()
            .find(|c| c.identifier == token.customer_identifier)
        else {
            return Err(error(
                "InvalidTokenException",
                "Registration token is invalid.",
            ));
        };
        state.used_tokens.insert(token.token.clone());
        let mut result = json!({
            "CustomerIdentifier": customer.identifier,
            "CustomerAWSAccountId": customer.aws_account_id,
            "ProductCode": customer.product_code,
        });
        // Concurrent agreements: the customer's license for the product, and its agreement.
        if let Some(license) = self.config.licenses.iter().find(|l| {
            l.customer_aws_account_id == customer.aws_account_id
                && l.product_code == customer.product_code
        }) {
            result["LicenseArn"] = json!(license.arn);
            if let Some(agreement) = &license.agreement_id {
                result["Metadata"] = json!({ "AgreementId": agreement });
            }
        }
        Ok(result)
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
mod tests {
    use super::*;
    use crate::emulator::model::{Tag, MICROS_PER_UNIT};

    fn alloc(quantity: i64, tags: &[(&str, &str)]) -> Allocation {
        Allocation {
            quantity,
            quantity_as_decimal: None,
            tags: if tags.is_empty() {
                None
            } else {
                Some(
                    tags.iter()
                        .map(|(k, v)| Tag {
                            key: (*k).into(),
                            value: (*v).into(),
                        })
                        .collect(),
                )
            },
        }
    }

    fn check(allocs: &[Allocation], quantity: i64) -> Result<(), String> {
        check_allocations(Some(allocs), quantity * MICROS_PER_UNIT, false, 500)
            .map_err(|e| e.error_type)
    }

    #[test]
    fn allocation_rules_table() {
        let five: Vec<(String, String)> =
            (0..5).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let five: Vec<(&str, &str)> = five.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let six: Vec<(String, String)> =
            (0..6).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let six: Vec<(&str, &str)> = six.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let long_key = "k".repeat(101);
        let long_value = "v".repeat(257);
        type Case<'a> = (&'a str, Vec<Allocation>, i64, Result<(), &'a str>);
        let cases: Vec<Case> = vec![
            (
                "sum equals quantity",
                vec![alloc(3, &[("a", "1")]), alloc(2, &[])],
                5,
                Ok(()),
            ),
            (
                "sum differs",
                vec![alloc(3, &[("a", "1")]), alloc(1, &[])],
                5,
                Err("InvalidUsageAllocationsException"),
            ),
            (
                "duplicate tag sets",
                vec![
                    alloc(1, &[("a", "1"), ("b", "2")]),
                    alloc(1, &[("b", "2"), ("a", "1")]),
                ],
                2,
                Err("InvalidUsageAllocationsException"),
            ),
            (
                "two untagged buckets",
                vec![alloc(1, &[]), alloc(1, &[])],
                2,
                Err("InvalidUsageAllocationsException"),
            ),
            ("five tags ok", vec![alloc(1, &five)], 1, Ok(())),
            (
                "six tags",
                vec![alloc(1, &six)],
                1,
                Err("InvalidTagException"),
            ),
            (
                "six distinct keys across list",
                vec![alloc(1, &five), alloc(1, &[("k5", "v")])],
                2,
                Err("InvalidTagException"),
            ),
            (
                "key too long",
                vec![alloc(1, &[(&long_key, "v")])],
                1,
                Err("InvalidTagException"),
            ),
            (
                "key max length",
                vec![alloc(1, &[(&long_key[..100], "v")])],
                1,
                Ok(()),
            ),
            (
                "value too long",
                vec![alloc(1, &[("k", &long_value)])],
                1,
                Err("InvalidTagException"),
            ),
            (
                "value max length",
                vec![alloc(1, &[("k", &long_value[..256])])],
                1,
                Ok(()),
            ),
            (
                "key bad char",
                vec![alloc(1, &[("k?", "v")])],
                1,
                Err("InvalidTagException"),
            ),
            (
                "value bad char",
                vec![alloc(1, &[("k", "v>")])],
                1,
                Err("InvalidTagException"),
            ),
            (
                "range space..= allowed",
                vec![alloc(1, &[("a b!#", "x,y;z<")])],
                1,
                Ok(()),
            ),
            (
                "empty tag list",
                vec![Allocation {
                    quantity: 1,
                    quantity_as_decimal: None,
                    tags: Some(vec![]),
                }],
                1,
                Err("InvalidTagException"),
            ),
            (
                "same key twice in one allocation",
                vec![alloc(1, &[("a", "1"), ("a", "2")])],
                1,
                Err("InvalidTagException"),
            ),
        ];
        for (name, allocs, quantity, want) in cases {
            assert_eq!(
                check(&allocs, quantity),
                want.map_err(str::to_owned),
                "{name}"
            );
        }
    }

    #[test]
    fn allocation_count_limit_is_configurable() {
        let allocs: Vec<Allocation> = (0..3)
            .map(|i| alloc(1, &[("k", &format!("v{i}"))]))
            .collect();
        let three = 3 * MICROS_PER_UNIT;
        assert!(check_allocations(Some(&allocs), three, false, 3).is_ok());
        let err = check_allocations(Some(&allocs), three, false, 2).expect_err("over limit");
        assert_eq!(err.error_type, "InvalidUsageAllocationsException");
        assert!(err.message.contains("greater than 2"));
    }

    #[test]
    fn ids_are_uuid_shaped_and_reproducible() {
        let a = new_id(&mut StdRng::seed_from_u64(1));
        let b = new_id(&mut StdRng::seed_from_u64(1));
        assert_eq!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
