//! BatchMeterUsage: per-record checks, billing by ProductCode or by LicenseArn.

use std::time::SystemTime;

use serde_json::{json, Value};

use crate::clock::hour_floor;
use crate::emulator::error::ApiError;
use crate::emulator::model::{normalized_allocations, quantity_micros, BatchMeterUsageInput};
use crate::emulator::sigv4::Caller;

use super::*;

impl Service {
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
                identity: caller.identity.clone(),
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
}
