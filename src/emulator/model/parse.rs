//! The four operations' request bodies, parsed against the model's constraints.

use serde_json::{Map, Value};

use crate::emulator::error::ApiError;

use super::*;

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
        let (quantity, quantity_as_decimal) =
            quantity_members(v, alloc, "AllocatedUsageQuantity", &item_path)?;
        if quantity.is_none() && quantity_as_decimal.is_none() {
            v.push(None, &quantity_path, "must not be null");
        }
        let quantity = quantity.unwrap_or(0);
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
        out.push(Allocation {
            quantity,
            quantity_as_decimal,
            tags,
        });
    }
    Ok(Some(out))
}

/// A quantity and its decimal twin (`Name` and `NameAsDecimal`): at most one may be sent. The
/// decimal comes back canonical, and the whole quantity then holds its whole part.
fn quantity_members(
    v: &mut Violations,
    obj: &Map<String, Value>,
    name: &str,
    prefix: &str,
) -> Result<(Option<i64>, Option<String>), ApiError> {
    let whole = int_member(obj, name)?;
    if let Some(q) = whole {
        check_range(v, q, &member_path(prefix, name), 0, Some(MAX_INT));
    }
    let decimal_name = format!("{name}AsDecimal");
    let decimal = optional_string(v, obj, &decimal_name, prefix, &DECIMAL_QUANTITY)?;
    let decimal = decimal.and_then(|d| decimal_micros(&d));
    if whole.is_some() && decimal.is_some() {
        return Err(ApiError::new(
            "ValidationException",
            format!("You can't specify both {name} and {decimal_name}."),
        ));
    }
    Ok(match decimal {
        Some(micros) => (Some(micros / MICROS_PER_UNIT), Some(decimal_text(micros))),
        None => (whole, None),
    })
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
    let (usage_quantity, usage_quantity_as_decimal) =
        quantity_members(&mut v, obj, "UsageQuantity", "")?;
    let usage_quantity = usage_quantity.unwrap_or(0);
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
    Ok(MeterUsageInput {
        product_code,
        timestamp: timestamp.unwrap_or_default(),
        usage_dimension,
        usage_quantity,
        usage_quantity_as_decimal,
        dry_run,
        usage_allocations,
        client_token,
    })
}

pub fn parse_batch_meter_usage(body: &Value) -> Result<BatchMeterUsageInput, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let product_code = optional_string(&mut v, obj, "ProductCode", "", &PRODUCT_CODE)?
        .filter(|code| !code.is_empty());
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
                let (quantity, quantity_as_decimal) =
                    quantity_members(&mut v, rec, "Quantity", &prefix)?;
                let quantity = quantity.unwrap_or(0);
                let usage_allocations = parse_allocations(&mut v, rec, &prefix)?;
                let license_arn =
                    optional_string(&mut v, rec, "LicenseArn", &prefix, &LICENSE_ARN)?;
                usage_records.push(UsageRecordInput {
                    timestamp: timestamp.unwrap_or_default(),
                    customer_identifier,
                    customer_aws_account_id,
                    dimension,
                    quantity,
                    quantity_as_decimal,
                    usage_allocations,
                    license_arn,
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
            min: 0,
            max: None,
            pattern: Some((NON_EMPTY_PATTERN, non_empty)),
        },
    )?;
    v.into_result()?;
    Ok(ResolveCustomerInput { registration_token })
}
