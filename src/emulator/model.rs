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

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ApiError;

/// The four operations of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Operation {
    RegisterUsage,
    MeterUsage,
    BatchMeterUsage,
    ResolveCustomer,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::RegisterUsage,
        Operation::MeterUsage,
        Operation::BatchMeterUsage,
        Operation::ResolveCustomer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::RegisterUsage => "RegisterUsage",
            Operation::MeterUsage => "MeterUsage",
            Operation::BatchMeterUsage => "BatchMeterUsage",
            Operation::ResolveCustomer => "ResolveCustomer",
        }
    }

    /// Parses the `X-Amz-Target` header value.
    pub fn from_target(target: &str) -> Option<Self> {
        let name = target.strip_prefix("AWSMPMeteringService.")?;
        Self::ALL.into_iter().find(|op| op.name() == name)
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
const ACCOUNT_ID_PATTERN: &str = "^[0-9]+$";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

/// One usage allocation as sent. Tag rules are checked later, by the operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub quantity: i64,
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
    pub usage_quantity: i64,
    pub dry_run: bool,
    pub usage_allocations: Option<Vec<Allocation>>,
    pub client_token: Option<String>,
    /// The members that define the request for ClientToken comparison (all but the token).
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub struct UsageRecordInput {
    pub timestamp: f64,
    pub customer_identifier: Option<String>,
    pub customer_aws_account_id: Option<String>,
    pub dimension: String,
    pub quantity: i64,
    pub usage_allocations: Option<Vec<Allocation>>,
    /// The record as sent, echoed back in `Results` and `UnprocessedRecords`.
    pub raw: Value,
}

#[derive(Debug, Clone)]
pub struct BatchMeterUsageInput {
    pub product_code: String,
    pub usage_records: Vec<UsageRecordInput>,
}

#[derive(Debug, Clone)]
pub struct ResolveCustomerInput {
    pub registration_token: String,
}

/// Collects constraint violations so that all are reported at once, as AWS does.
#[derive(Default)]
struct Violations(Vec<String>);

impl Violations {
    fn push(&mut self, value: Option<&str>, path: &str, constraint: &str) {
        let shown = match value {
            Some(v) => format!("Value '{v}'"),
            None => "Value null".to_owned(),
        };
        self.0.push(format!(
            "{shown} at '{path}' failed to satisfy constraint: Member {constraint}"
        ));
    }

    fn into_result(self) -> Result<(), ApiError> {
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

fn member_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        lower_first(name)
    } else {
        format!("{prefix}.{}", lower_first(name))
    }
}

fn as_object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, ApiError> {
    value
        .as_object()
        .ok_or_else(|| ApiError::serialization(format!("Expected an object for {what}")))
}

/// Reads an optional member, treating JSON `null` as absent.
fn member<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn string_member(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match member(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::serialization(format!(
            "STRING_VALUE expected for member {name}"
        ))),
    }
}

fn int_member(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
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

fn bool_member(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
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

fn list_member<'a>(
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
type Pattern = (&'static str, fn(&str) -> bool);

struct StringRule {
    min: usize,
    max: Option<usize>,
    pattern: Option<Pattern>,
}

fn check_string(v: &mut Violations, value: &str, path: &str, rule: &StringRule) {
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

fn required_string(
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

fn optional_string(
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

fn check_range(v: &mut Violations, value: i64, path: &str, min: i64, max: Option<i64>) {
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

fn account_id_ok(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

const PRODUCT_CODE: StringRule = StringRule {
    min: 1,
    max: Some(255),
    pattern: Some((PRODUCT_CODE_PATTERN, product_code_ok)),
};
const DIMENSION: StringRule = StringRule {
    min: 1,
    max: Some(255),
    pattern: None,
};

/// Tag keys and values: `^[a-zA-Z0-9+ -=._:\/@]+$`, where ` -=` is the range space..'='.
pub fn tag_text_ok(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || (' '..='=').contains(&c) || "+._:/@".contains(c))
}

fn parse_allocations(
    v: &mut Violations,
    obj: &Map<String, Value>,
    prefix: &str,
) -> Result<Option<Vec<Allocation>>, ApiError> {
    let Some(items) = list_member(obj, "UsageAllocations")? else {
        return Ok(None);
    };
    let path = member_path(prefix, "UsageAllocations");
    if items.is_empty() {
        v.push(
            Some("[]"),
            &path,
            "must have length greater than or equal to 1",
        );
    }
    if items.len() > MODEL_MAX_ALLOCATIONS {
        v.push(
            Some(&format!("[{} items]", items.len())),
            &path,
            &format!("must have length less than or equal to {MODEL_MAX_ALLOCATIONS}"),
        );
    }
    let mut out = Vec::with_capacity(items.len().min(MODEL_MAX_ALLOCATIONS));
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}.{}.member", i + 1);
        let alloc = as_object(item, "UsageAllocation")?;
        let quantity_path = member_path(&item_path, "AllocatedUsageQuantity");
        let quantity = match int_member(alloc, "AllocatedUsageQuantity")? {
            Some(q) => {
                check_range(v, q, &quantity_path, 0, Some(MAX_INT));
                q
            }
            None => {
                v.push(None, &quantity_path, "must not be null");
                0
            }
        };
        let tags = match list_member(alloc, "Tags")? {
            None => None,
            Some(tag_items) => {
                let mut tags = Vec::with_capacity(tag_items.len());
                for tag in tag_items {
                    let tag = as_object(tag, "Tag")?;
                    // Tag content rules answer InvalidTagException (see the module doc);
                    // a missing Key or Value is a plain model violation.
                    let key = string_member(tag, "Key")?;
                    let value = string_member(tag, "Value")?;
                    let tag_path = format!(
                        "{}.{}.member",
                        member_path(&item_path, "Tags"),
                        tags.len() + 1
                    );
                    if key.is_none() {
                        v.push(None, &member_path(&tag_path, "Key"), "must not be null");
                    }
                    if value.is_none() {
                        v.push(None, &member_path(&tag_path, "Value"), "must not be null");
                    }
                    tags.push(Tag {
                        key: key.unwrap_or_default(),
                        value: value.unwrap_or_default(),
                    });
                }
                Some(tags)
            }
        };
        out.push(Allocation { quantity, tags });
    }
    Ok(Some(out))
}

fn root(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    as_object(body, "the request body")
}

pub fn parse_register_usage(body: &Value) -> Result<RegisterUsageInput, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let product_code = required_string(&mut v, obj, "ProductCode", "", &PRODUCT_CODE)?;
    let version = match int_member(obj, "PublicKeyVersion")? {
        Some(n) => {
            check_range(&mut v, n, "publicKeyVersion", 1, Some(MAX_INT));
            n
        }
        None => {
            v.push(None, "publicKeyVersion", "must not be null");
            1
        }
    };
    let nonce = optional_string(
        &mut v,
        obj,
        "Nonce",
        "",
        &StringRule {
            min: 0,
            max: Some(255),
            pattern: None,
        },
    )?;
    v.into_result()?;
    Ok(RegisterUsageInput {
        product_code,
        public_key_version: u32::try_from(version).unwrap_or(u32::MAX),
        nonce,
    })
}

pub fn parse_meter_usage(body: &Value) -> Result<MeterUsageInput, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let product_code = required_string(&mut v, obj, "ProductCode", "", &PRODUCT_CODE)?;
    let timestamp = timestamp_member(obj, "Timestamp")?;
    if timestamp.is_none() {
        v.push(None, "timestamp", "must not be null");
    }
    let usage_dimension = required_string(&mut v, obj, "UsageDimension", "", &DIMENSION)?;
    let usage_quantity = int_member(obj, "UsageQuantity")?.unwrap_or(0);
    check_range(&mut v, usage_quantity, "usageQuantity", 0, Some(MAX_INT));
    let dry_run = bool_member(obj, "DryRun")?.unwrap_or(false);
    let usage_allocations = parse_allocations(&mut v, obj, "")?;
    let client_token = optional_string(
        &mut v,
        obj,
        "ClientToken",
        "",
        &StringRule {
            min: 1,
            max: Some(64),
            pattern: None,
        },
    )?;
    v.into_result()?;
    let mut without_token = obj.clone();
    without_token.remove("ClientToken");
    Ok(MeterUsageInput {
        product_code,
        timestamp: timestamp.unwrap_or_default(),
        usage_dimension,
        usage_quantity,
        dry_run,
        usage_allocations,
        client_token,
        fingerprint: Value::Object(without_token).to_string(),
    })
}

pub fn parse_batch_meter_usage(body: &Value) -> Result<BatchMeterUsageInput, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let product_code = required_string(&mut v, obj, "ProductCode", "", &PRODUCT_CODE)?;
    let items = list_member(obj, "UsageRecords")?;
    let mut usage_records = Vec::new();
    match items {
        None => v.push(None, "usageRecords", "must not be null"),
        Some(items) => {
            if items.len() > MAX_BATCH_RECORDS {
                v.push(
                    Some(&format!("[{} items]", items.len())),
                    "usageRecords",
                    &format!("must have length less than or equal to {MAX_BATCH_RECORDS}"),
                );
            }
            for (i, item) in items.iter().enumerate() {
                let prefix = format!("usageRecords.{}.member", i + 1);
                let rec = as_object(item, "UsageRecord")?;
                let timestamp = timestamp_member(rec, "Timestamp")?;
                if timestamp.is_none() {
                    v.push(None, &member_path(&prefix, "Timestamp"), "must not be null");
                }
                let customer_identifier = optional_string(
                    &mut v,
                    rec,
                    "CustomerIdentifier",
                    &prefix,
                    &StringRule {
                        min: 0,
                        max: Some(255),
                        pattern: None,
                    },
                )?;
                let customer_aws_account_id = optional_string(
                    &mut v,
                    rec,
                    "CustomerAWSAccountId",
                    &prefix,
                    &StringRule {
                        min: 1,
                        max: Some(255),
                        pattern: Some((ACCOUNT_ID_PATTERN, account_id_ok)),
                    },
                )?;
                let dimension = required_string(&mut v, rec, "Dimension", &prefix, &DIMENSION)?;
                let quantity = int_member(rec, "Quantity")?.unwrap_or(0);
                check_range(
                    &mut v,
                    quantity,
                    &member_path(&prefix, "Quantity"),
                    0,
                    Some(MAX_INT),
                );
                let usage_allocations = parse_allocations(&mut v, rec, &prefix)?;
                usage_records.push(UsageRecordInput {
                    timestamp: timestamp.unwrap_or_default(),
                    customer_identifier,
                    customer_aws_account_id,
                    dimension,
                    quantity,
                    usage_allocations,
                    raw: item.clone(),
                });
            }
        }
    }
    v.into_result()?;
    Ok(BatchMeterUsageInput {
        product_code,
        usage_records,
    })
}

pub fn parse_resolve_customer(body: &Value) -> Result<ResolveCustomerInput, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let registration_token = required_string(
        &mut v,
        obj,
        "RegistrationToken",
        "",
        &StringRule {
            min: 1,
            max: None,
            pattern: None,
        },
    )?;
    v.into_result()?;
    Ok(ResolveCustomerInput { registration_token })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error_type(r: Result<impl fmt::Debug, ApiError>) -> String {
        r.expect_err("should fail").error_type
    }

    #[test]
    fn target_names_all_four_operations() {
        for op in Operation::ALL {
            let target = format!("AWSMPMeteringService.{op}");
            assert_eq!(Operation::from_target(&target), Some(op));
        }
        assert_eq!(Operation::from_target("AWSMPMeteringService.Nope"), None);
        assert_eq!(Operation::from_target("MeterUsage"), None);
    }

    #[test]
    fn tag_pattern_is_the_documented_character_class() {
        for ok in ["a", "Z9", "a b", "!\"#$%&'()*,-./;<=", "k+._:/@"] {
            assert!(tag_text_ok(ok), "{ok:?} should pass");
        }
        for bad in ["", ">", "?", "a~", "é", "a\tb", "[x]"] {
            assert!(!tag_text_ok(bad), "{bad:?} should fail");
        }
    }

    #[test]
    fn meter_usage_reports_every_violation_at_once() {
        let err = parse_meter_usage(&json!({"ProductCode": "bad code!", "UsageQuantity": -1}))
            .expect_err("invalid");
        assert_eq!(err.error_type, "ValidationException");
        assert!(
            err.message.starts_with("4 validation errors detected: "),
            "{}",
            err.message
        );
        assert!(err.message.contains("Value 'bad code!' at 'productCode'"));
        assert!(err.message.contains(
            "Value null at 'timestamp' failed to satisfy constraint: Member must not be null"
        ));
        assert!(err.message.contains("Value null at 'usageDimension'"));
        assert!(err.message.contains("Value '-1' at 'usageQuantity'"));
    }

    #[test]
    fn wrong_json_types_are_serialization_errors() {
        assert_eq!(
            error_type(parse_meter_usage(&json!({"ProductCode": 5}))),
            "SerializationException"
        );
        assert_eq!(
            error_type(parse_meter_usage(
                &json!({"ProductCode": "p", "Timestamp": "2024-01-01", "UsageDimension": "d"})
            )),
            "SerializationException"
        );
        assert_eq!(
            error_type(parse_resolve_customer(&json!([]))),
            "SerializationException"
        );
    }

    #[test]
    fn client_token_is_excluded_from_the_fingerprint() {
        let a = parse_meter_usage(
            &json!({"ProductCode": "p", "Timestamp": 1, "UsageDimension": "d", "ClientToken": "a"}),
        )
        .expect("valid");
        let b = parse_meter_usage(
            &json!({"ProductCode": "p", "Timestamp": 1, "UsageDimension": "d", "ClientToken": "b"}),
        )
        .expect("valid");
        assert_eq!(a.fingerprint, b.fingerprint);
    }
}
