//! Who is billed: a record's license, a product's customers, and ResolveCustomer.

use std::time::SystemTime;

use serde_json::{json, Value};

use crate::emulator::config::{CustomerConfig, LicenseConfig, ProductConfig};
use crate::emulator::error::ApiError;
use crate::emulator::model::{ResolveCustomerInput, UsageRecordInput};

use super::*;

impl Service {
    /// The license a record names, if it is one this emulator granted to the record's customer
    /// (and, when the request names a product, for that product).
    pub(super) fn license_for(
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

    pub(super) fn customer(
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
}
