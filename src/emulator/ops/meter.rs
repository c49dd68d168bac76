//! RegisterUsage and MeterUsage.

use std::time::SystemTime;

use serde_json::{json, Value};

use crate::clock::{hour_floor, unix_millis};
use crate::emulator::config::Entitlement;
use crate::emulator::error::ApiError;
use crate::emulator::model::{
    normalized_allocations, quantity_micros, MeterUsageInput, RegisterUsageInput,
};
use crate::emulator::sigv4::Caller;

use super::*;

impl Service {
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
                .insert((caller.identity.clone(), input.product_code.clone()));
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
        let identity = caller.identity.clone();
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
}
