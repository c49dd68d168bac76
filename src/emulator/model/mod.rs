//! Request shapes of the API model (`service-2.json`) and their constraint checks.
//!
//! Model constraints (required members, lengths, patterns, ranges, list sizes) are answered
//! the way AWS's JSON 1.1 front end answers them for every service: `ValidationException`,
//! HTTP 400, `"N validation error(s) detected: Value ... at 'member' failed to satisfy
//! constraint: ..."`, all problems in one message. A member of the wrong JSON type gives
//! `SerializationException`. Unknown members are ignored, as AWS does.
//!
//! Two groups are exceptions, because the service documents its own errors for them (API
//! Reference and Seller Guide): everything about tags gives `InvalidTagException`, and too
//! many allocations (above the configured limit, at most the model's 2500) gives
//! `InvalidUsageAllocationsException`. Those checks live in [`super::ops`].

mod parse;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ApiError;

pub use parse::{
    parse_batch_meter_usage, parse_meter_usage, parse_register_usage, parse_resolve_customer,
};

/// The operations served: the Metering Service's four and License Manager's six (contract
/// pricing). Fault rules, quotas and the call log are per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Operation {
    RegisterUsage,
    MeterUsage,
    BatchMeterUsage,
    ResolveCustomer,
    CheckoutLicense,
    CheckInLicense,
    ExtendLicenseConsumption,
    GetLicense,
    ListReceivedLicenses,
    GetAccessToken,
}

/// Which AWS API an operation belongs to: its target prefix and signing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Metering,
    LicenseManager,
}

impl Api {
    pub fn target_prefix(self) -> &'static str {
        match self {
            Api::Metering => "AWSMPMeteringService.",
            Api::LicenseManager => "AWSLicenseManager.",
        }
    }

    /// The SigV4 credential scope's service.
    pub fn signing_name(self) -> &'static str {
        match self {
            Api::Metering => "aws-marketplace",
            Api::LicenseManager => "license-manager",
        }
    }
}

impl Operation {
    pub const ALL: [Operation; 10] = [
        Operation::RegisterUsage,
        Operation::MeterUsage,
        Operation::BatchMeterUsage,
        Operation::ResolveCustomer,
        Operation::CheckoutLicense,
        Operation::CheckInLicense,
        Operation::ExtendLicenseConsumption,
        Operation::GetLicense,
        Operation::ListReceivedLicenses,
        Operation::GetAccessToken,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::RegisterUsage => "RegisterUsage",
            Operation::MeterUsage => "MeterUsage",
            Operation::BatchMeterUsage => "BatchMeterUsage",
            Operation::ResolveCustomer => "ResolveCustomer",
            Operation::CheckoutLicense => "CheckoutLicense",
            Operation::CheckInLicense => "CheckInLicense",
            Operation::ExtendLicenseConsumption => "ExtendLicenseConsumption",
            Operation::GetLicense => "GetLicense",
            Operation::ListReceivedLicenses => "ListReceivedLicenses",
            Operation::GetAccessToken => "GetAccessToken",
        }
    }

    pub fn api(self) -> Api {
        match self {
            Operation::RegisterUsage
            | Operation::MeterUsage
            | Operation::BatchMeterUsage
            | Operation::ResolveCustomer => Api::Metering,
            _ => Api::LicenseManager,
        }
    }

    /// Whether a call may come without a signature: GetAccessToken, whose license token is
    /// the caller's only credential (License Manager for Anywhere).
    pub fn may_be_unsigned(self) -> bool {
        self == Operation::GetAccessToken
    }

    /// Parses the `X-Amz-Target` header value.
    pub fn from_target(target: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|op| target.strip_prefix(op.api().target_prefix()) == Some(op.name()))
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub const MAX_INT: i64 = 2_147_483_647;
pub const MODEL_MAX_ALLOCATIONS: usize = 2500;
pub const MAX_BATCH_RECORDS: usize = 25;
const PRODUCT_CODE_PATTERN: &str = "^[-a-zA-Z0-9/=:_.@]*$";
const DECIMAL_QUANTITY_PATTERN: &str = "^(0|[1-9][0-9]{0,9})(\\.[0-9]{1,6})?$";
const NON_EMPTY_PATTERN: &str = "[\\s\\S]+";
const LICENSE_ARN_PATTERN: &str = "^arn:aws[a-zA-Z-]*:[A-Za-z0-9][A-Za-z0-9_/.-]{0,62}:[A-Za-z0-9_/.-]{0,63}:[A-Za-z0-9_/.-]{0,63}:[A-Za-z0-9][A-Za-z0-9:_/+=,@.-]{0,1023}$";
const ACCOUNT_ID_PATTERN: &str = "^[0-9]+$";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

/// Millionths of a unit: the `…AsDecimal` quantities carry up to 6 fraction digits.
pub const MICROS_PER_UNIT: i64 = 1_000_000;

/// The model's decimal quantity: `^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$`, at most 17
/// characters; its value in millionths.
pub fn decimal_micros(text: &str) -> Option<i64> {
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (text, None),
    };
    let whole_ok = whole == "0"
        || (!whole.is_empty()
            && whole.len() <= 10
            && !whole.starts_with('0')
            && whole.bytes().all(|b| b.is_ascii_digit()));
    let fraction_ok = fraction
        .is_none_or(|f| (1..=6).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()));
    if !whole_ok || !fraction_ok || text.len() > 17 {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let fraction = fraction.unwrap_or("");
    let padded: i64 = format!("{fraction:0<6}").parse().ok()?;
    whole.checked_mul(MICROS_PER_UNIT)?.checked_add(padded)
}

/// A value in millionths as the shortest decimal: `17`, `17.42`.
pub fn decimal_text(micros: i64) -> String {
    let (whole, fraction) = (micros / MICROS_PER_UNIT, micros % MICROS_PER_UNIT);
    if fraction == 0 {
        whole.to_string()
    } else {
        let digits = format!("{fraction:06}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// A quantity's value in millionths: the decimal member when it was sent, else the whole one.
pub fn quantity_micros(whole: i64, decimal: Option<&str>) -> i64 {
    decimal
        .and_then(decimal_micros)
        .unwrap_or_else(|| whole.saturating_mul(MICROS_PER_UNIT))
}

/// One usage allocation as sent. Tag rules are checked later, by the operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// `AllocatedUsageQuantity`; for a decimal allocation, its whole part.
    pub quantity: i64,
    /// `AllocatedUsageQuantityAsDecimal`, canonical (`17.0` is `17`), when it was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity_as_decimal: Option<String>,
    /// `None` when the member was absent (the untagged bucket).
    pub tags: Option<Vec<Tag>>,
}

#[derive(Debug, Clone)]
pub struct RegisterUsageInput {
    pub product_code: String,
    pub public_key_version: u32,
    pub nonce: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MeterUsageInput {
    pub product_code: String,
    pub timestamp: f64,
    pub usage_dimension: String,
    /// `UsageQuantity` (the model's default 0); for a decimal report, its whole part.
    pub usage_quantity: i64,
    /// `UsageQuantityAsDecimal`, canonical, when it was sent.
    pub usage_quantity_as_decimal: Option<String>,
    pub dry_run: bool,
    pub usage_allocations: Option<Vec<Allocation>>,
    pub client_token: Option<String>,
}

impl MeterUsageInput {
    /// What the request means, for ClientToken reuse: every member but the token, after the
    /// model's defaults (no quantity is 0, no DryRun is false) and with the allocations and
    /// their tags as sets, so the same report written another way compares equal.
    pub fn meaning(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{:?}",
            self.product_code,
            self.timestamp,
            self.usage_dimension,
            quantity_micros(
                self.usage_quantity,
                self.usage_quantity_as_decimal.as_deref()
            ),
            self.dry_run,
            normalized_allocations(self.usage_allocations.as_deref().unwrap_or_default())
        )
    }
}

/// Allocations in a canonical order (tags sorted, then allocations sorted), so that equal
/// sets compare equal.
/// Quantities by value (in millionths), so `17` and `"17.00"` compare equal.
pub fn normalized_allocations(allocations: &[Allocation]) -> Vec<(Vec<Tag>, i64)> {
    let mut out: Vec<(Vec<Tag>, i64)> = allocations
        .iter()
        .map(|a| {
            let mut tags = a.tags.clone().unwrap_or_default();
            tags.sort();
            (tags, a.micros())
        })
        .collect();
    out.sort();
    out
}

#[derive(Debug, Clone)]
pub struct UsageRecordInput {
    pub timestamp: f64,
    pub customer_identifier: Option<String>,
    pub customer_aws_account_id: Option<String>,
    pub dimension: String,
    /// `Quantity`; for a decimal record, its whole part.
    pub quantity: i64,
    /// `QuantityAsDecimal`, canonical, when it was sent.
    pub quantity_as_decimal: Option<String>,
    pub usage_allocations: Option<Vec<Allocation>>,
    /// The granted license the record is for (concurrent agreements): names the product and
    /// the agreement, in place of the request's ProductCode.
    pub license_arn: Option<String>,
    /// The record as sent, echoed back in `Results` and `UnprocessedRecords`.
    pub raw: Value,
}

#[derive(Debug, Clone)]
pub struct BatchMeterUsageInput {
    /// Optional since the concurrent-agreements model: license-based batches leave it out
    /// (or send it empty, which the model's minimum length 0 lets botocore do).
    pub product_code: Option<String>,
    pub usage_records: Vec<UsageRecordInput>,
}

#[derive(Debug, Clone)]
pub struct ResolveCustomerInput {
    pub registration_token: String,
}

/// Collects constraint violations so that all are reported at once, as AWS does.
#[derive(Default)]
pub(super) struct Violations(Vec<String>);

impl Violations {
    pub(super) fn push(&mut self, value: Option<&str>, path: &str, constraint: &str) {
        let shown = match value {
            Some(v) => format!("Value '{v}'"),
            None => "Value null".to_owned(),
        };
        self.0.push(format!(
            "{shown} at '{path}' failed to satisfy constraint: Member {constraint}"
        ));
    }

    pub(super) fn into_result(self) -> Result<(), ApiError> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(ApiError::new(
                "ValidationException",
                format!("1 validation error detected: {}", self.0[0]),
            )),
            n => Err(ApiError::new(
                "ValidationException",
                format!("{n} validation errors detected: {}", self.0.join("; ")),
            )),
        }
    }
}

/// Length as AWS counts it (UTF-16 code units, like a Java string).
fn aws_len(s: &str) -> usize {
    s.encode_utf16().count()
}

fn lower_first(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

pub(super) fn member_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        lower_first(name)
    } else {
        format!("{prefix}.{}", lower_first(name))
    }
}

pub(super) fn as_object<'a>(
    value: &'a Value,
    what: &str,
) -> Result<&'a Map<String, Value>, ApiError> {
    value
        .as_object()
        .ok_or_else(|| ApiError::serialization(format!("Expected an object for {what}")))
}

/// Reads an optional member, treating JSON `null` as absent.
fn member<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

pub(super) fn string_member(
    obj: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, ApiError> {
    match member(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::serialization(format!(
            "STRING_VALUE expected for member {name}"
        ))),
    }
}

pub(super) fn int_member(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match member(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
            ApiError::serialization(format!(
                "NUMBER_VALUE can not be converted to an Integer for member {name}"
            ))
        }),
        Some(_) => Err(ApiError::serialization(format!(
            "NUMBER_VALUE expected for member {name}"
        ))),
    }
}

pub(super) fn bool_member(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match member(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::serialization(format!(
            "BOOLEAN_VALUE expected for member {name}"
        ))),
    }
}

/// Timestamps are epoch seconds, possibly with a fraction.
fn timestamp_member(obj: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match member(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::serialization(format!("Invalid timestamp for member {name}"))),
        Some(_) => Err(ApiError::serialization(format!(
            "NUMBER_VALUE expected for timestamp member {name}"
        ))),
    }
}

pub(super) fn list_member<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Vec<Value>>, ApiError> {
    match member(obj, name) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(ApiError::serialization(format!(
            "Expected a list for member {name}"
        ))),
    }
}

/// A regular expression as the model writes it, and the check that implements it.
pub(super) type Pattern = (&'static str, fn(&str) -> bool);

pub(super) struct StringRule {
    pub(super) min: usize,
    pub(super) max: Option<usize>,
    pub(super) pattern: Option<Pattern>,
}

pub(super) fn check_string(v: &mut Violations, value: &str, path: &str, rule: &StringRule) {
    let len = aws_len(value);
    if len < rule.min {
        v.push(
            Some(value),
            path,
            &format!("must have length greater than or equal to {}", rule.min),
        );
    }
    if let Some(max) = rule.max {
        if len > max {
            v.push(
                Some(value),
                path,
                &format!("must have length less than or equal to {max}"),
            );
        }
    }
    if let Some((pattern, matches)) = rule.pattern {
        if !matches(value) {
            v.push(
                Some(value),
                path,
                &format!("must satisfy regular expression pattern: {pattern}"),
            );
        }
    }
}

pub(super) fn required_string(
    v: &mut Violations,
    obj: &Map<String, Value>,
    name: &str,
    prefix: &str,
    rule: &StringRule,
) -> Result<String, ApiError> {
    let path = member_path(prefix, name);
    match string_member(obj, name)? {
        Some(s) => {
            check_string(v, &s, &path, rule);
            Ok(s)
        }
        None => {
            v.push(None, &path, "must not be null");
            Ok(String::new())
        }
    }
}

pub(super) fn optional_string(
    v: &mut Violations,
    obj: &Map<String, Value>,
    name: &str,
    prefix: &str,
    rule: &StringRule,
) -> Result<Option<String>, ApiError> {
    let s = string_member(obj, name)?;
    if let Some(s) = &s {
        check_string(v, s, &member_path(prefix, name), rule);
    }
    Ok(s)
}

pub(super) fn check_range(v: &mut Violations, value: i64, path: &str, min: i64, max: Option<i64>) {
    let shown = value.to_string();
    if value < min {
        v.push(
            Some(&shown),
            path,
            &format!("must have value greater than or equal to {min}"),
        );
    }
    if let Some(max) = max {
        if value > max {
            v.push(
                Some(&shown),
                path,
                &format!("must have value less than or equal to {max}"),
            );
        }
    }
}

fn product_code_ok(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-/=:_.@".contains(c))
}

fn decimal_quantity_ok(s: &str) -> bool {
    decimal_micros(s).is_some()
}

fn non_empty(s: &str) -> bool {
    !s.is_empty()
}

/// The model's LicenseArn pattern: `arn:aws…:service:region:account:resource`.
pub(crate) fn license_arn_ok(s: &str) -> bool {
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = parts[..] else {
        return false;
    };
    let plain = |c: char| c.is_ascii_alphanumeric() || "_/.-".contains(c);
    let first_alnum = |t: &str| t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    arn == "arn"
        && partition
            .strip_prefix("aws")
            .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_alphabetic() || c == '-'))
        && first_alnum(service)
        && service.len() <= 63
        && service.chars().all(plain)
        && region.len() <= 63
        && region.chars().all(plain)
        && account.len() <= 63
        && account.chars().all(plain)
        && first_alnum(resource)
        && resource.len() <= 1024
        && resource
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":_/+=,@.-".contains(c))
}

fn account_id_ok(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

/// Minimum length 0 since the concurrent-agreements model (it was 1).
const PRODUCT_CODE: StringRule = StringRule {
    min: 0,
    max: Some(255),
    pattern: Some((PRODUCT_CODE_PATTERN, product_code_ok)),
};
const DIMENSION: StringRule = StringRule {
    min: 1,
    max: Some(255),
    pattern: Some((NON_EMPTY_PATTERN, non_empty)),
};
const DECIMAL_QUANTITY: StringRule = StringRule {
    min: 1,
    max: Some(17),
    pattern: Some((DECIMAL_QUANTITY_PATTERN, decimal_quantity_ok)),
};
/// A pattern-only shape: a violation names the pattern, never a length.
pub(super) const LICENSE_ARN: StringRule = StringRule {
    min: 0,
    max: None,
    pattern: Some((LICENSE_ARN_PATTERN, license_arn_ok)),
};

/// Tag keys and values: `^[a-zA-Z0-9+ -=._:\/@]+$`, where ` -=` is the range space..'='.
pub fn tag_text_ok(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || (' '..='=').contains(&c) || "+._:/@".contains(c))
}

impl Allocation {
    pub fn micros(&self) -> i64 {
        quantity_micros(self.quantity, self.quantity_as_decimal.as_deref())
    }
}

pub(super) fn root(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    as_object(body, "the request body")
}

#[cfg(test)]
mod tests;
