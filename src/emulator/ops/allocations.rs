//! The allocation and tag rules of MeterUsage and BatchMeterUsage records.

use std::collections::BTreeSet;

use crate::emulator::error::ApiError;
use crate::emulator::model::{decimal_text, normalized_allocations, tag_text_ok, Allocation};

use super::error;

const MAX_TAGS_PER_ALLOCATION: usize = 5;
const MAX_DISTINCT_TAG_KEYS: usize = 5;
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

#[cfg(test)]
mod tests;
