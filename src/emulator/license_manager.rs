//! AWS License Manager as contract pricing uses it (botocore's
//! `license-manager/2018-08-01/service-2.json`): CheckoutLicense, CheckInLicense,
//! ExtendLicenseConsumption, GetLicense, ListReceivedLicenses and GetAccessToken, on the
//! emulator's endpoint (`X-Amz-Target: AWSLicenseManager.<Operation>`, SigV4 scope
//! `license-manager`), over the licenses of `[[licenses]]`.
//!
//! - A license is visible to the account it was granted to (the caller's account: the role's
//!   for temporary credentials, else `quotas.accounts`), within its activation period.
//! - A PROVISIONAL checkout holds its units until checked in or until it expires
//!   (`provisional_ttl` after the checkout or the last extension, on the emulator's clock); a
//!   PERPETUAL one draws them down for good. A checkout past an entitlement's `max_count`
//!   (units held plus drawn down) answers `NoEntitlementsAllowedException` unless the
//!   entitlement allows overage.
//! - Errors are `{"__type", "Message"}` (the model's member name), 400, and 500 for
//!   `ServerInternalException`.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::config::{EmulatorConfig, EntitlementConfig, LicenseConfig};
use super::error::ApiError;
use super::jwt::Keyring;
use super::model::{
    as_object, bool_member, int_member, list_member, member_path, optional_string, required_string,
    root, string_member, StringRule, Violations, LICENSE_ARN,
};
use crate::clock::{rfc3339, unix_seconds};

mod checkout;

pub(crate) use checkout::checkout;

/// The model's entitlement units (`EntitlementUnit`).
pub const UNITS: [&str; 27] = [
    "Count",
    "None",
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
];

/// The model's minimum length of `SignedToken`.
const SIGNED_TOKEN_MIN: usize = 4096;

fn error(error_type: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(error_type, message)
}

pub fn server_internal() -> ApiError {
    ApiError::with_status(
        "ServerInternalException",
        "The server experienced an internal error. Try again.",
        500,
    )
}

pub fn rate_limited() -> ApiError {
    error(
        "RateLimitExceededException",
        "Too many requests have been submitted. Try again after a brief wait.",
    )
}

fn not_found(what: &str) -> ApiError {
    error("ResourceNotFoundException", what)
}

/// One checked-out (or drawn-down) entitlement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckedOut {
    pub name: String,
    pub unit: String,
    /// A counted unit's amount; a feature's value.
    pub value: Option<String>,
    /// The units this holds against `max_count` (0 for a feature).
    pub amount: i64,
}

/// A license consumption, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consumption {
    pub token: String,
    pub license_arn: String,
    pub account: String,
    pub checkout_type: String,
    pub entitlements: Vec<CheckedOut>,
    pub node_id: Option<String>,
    pub issued_at: i64,
    /// PROVISIONAL: when the units return to the pool unless extended (epoch seconds).
    pub expires_at: Option<i64>,
    pub checked_in: bool,
    pub extensions: u32,
}

impl Consumption {
    /// Whether it still holds its units at `now`: not checked in and (PROVISIONAL) not
    /// expired. A PERPETUAL checkout holds them for good.
    pub fn holds(&self, now: i64) -> bool {
        !self.checked_in && self.expires_at.is_none_or(|e| now < e)
    }
}

/// The License Manager state: consumptions and the checkouts' ClientTokens.
pub struct Licenses {
    consumptions: BTreeMap<String, Consumption>,
    /// (account, ClientToken) → (the request's meaning, its answer).
    client_tokens: HashMap<(String, String), (String, Value)>,
    rng: StdRng,
}

impl Licenses {
    pub fn new(seed: Option<u64>) -> Self {
        Self {
            consumptions: BTreeMap::new(),
            client_tokens: HashMap::new(),
            rng: match seed {
                Some(s) => StdRng::seed_from_u64(s ^ 0x6c69_6365_6e73),
                None => StdRng::from_entropy(),
            },
        }
    }

    pub fn consumptions(&self) -> Vec<Consumption> {
        self.consumptions.values().cloned().collect()
    }

    /// Units of `entitlement` on `license` held at `now` (PROVISIONAL and PERPETUAL).
    pub fn in_use(&self, license: &str, entitlement: &str, now: i64) -> i64 {
        self.consumptions
            .values()
            .filter(|c| c.license_arn == license && c.holds(now))
            .flat_map(|c| &c.entitlements)
            .filter(|e| e.name == entitlement)
            .map(|e| e.amount)
            .sum()
    }

    fn new_token(&mut self) -> String {
        let bytes: [u8; 16] = self.rng.gen();
        format!("lct-{}", hex::encode(bytes))
    }
}

/// The licenses `account` may use at `now`.
fn visible<'a>(
    config: &'a EmulatorConfig,
    account: &'a str,
    now: SystemTime,
) -> impl Iterator<Item = &'a LicenseConfig> + 'a {
    config.licenses.iter().filter(move |l| {
        l.customer_aws_account_id == account
            && l.begins_at.is_none_or(|b| now >= b)
            && l.ends_at.is_none_or(|e| now < e)
    })
}

const ANY_STRING: StringRule = StringRule {
    min: 0,
    max: None,
    pattern: None,
};

fn non_blank(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(char::is_whitespace)
}

/// `ClientToken` and `TokenString`: `\S+` (every character not white space), bounded.
const CLIENT_TOKEN: StringRule = StringRule {
    min: 0,
    max: Some(2048),
    pattern: Some(("\\S+", non_blank)),
};
const TOKEN_STRING: StringRule = StringRule {
    min: 0,
    max: Some(4096),
    pattern: Some(("\\S+", non_blank)),
};

/// An `EntitlementData` as asked for.
struct Wanted {
    name: String,
    unit: String,
    value: Option<String>,
}

fn parse_entitlements(
    v: &mut Violations,
    obj: &Map<String, Value>,
) -> Result<Vec<Wanted>, ApiError> {
    let mut out = Vec::new();
    match list_member(obj, "Entitlements")? {
        None => v.push(None, "entitlements", "must not be null"),
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                let prefix = format!("entitlements.{}.member", i + 1);
                let e = as_object(item, "EntitlementData")?;
                let name = required_string(v, e, "Name", &prefix, &ANY_STRING)?;
                let unit = required_string(v, e, "Unit", &prefix, &ANY_STRING)?;
                if !unit.is_empty() && !UNITS.contains(&unit.as_str()) {
                    v.push(
                        Some(&unit),
                        &member_path(&prefix, "Unit"),
                        &format!("must satisfy enum value set: [{}]", UNITS.join(", ")),
                    );
                }
                let value = string_member(e, "Value")?;
                out.push(Wanted { name, unit, value });
            }
        }
    }
    Ok(out)
}

fn entitlement_json(e: &EntitlementConfig) -> Value {
    let mut out = json!({
        "Name": e.name,
        "Unit": e.unit,
        "Overage": e.overage,
        "AllowCheckIn": e.allow_check_in,
    });
    if let Some(max) = e.max_count {
        out["MaxCount"] = json!(max);
    }
    if let Some(value) = &e.value {
        out["Value"] = json!(value);
    }
    out
}

/// A `License` (GetLicense) or `GrantedLicense` (ListReceivedLicenses).
fn license_json(l: &LicenseConfig, config: &EmulatorConfig, granted: bool) -> Value {
    let mut out = json!({
        "LicenseArn": l.arn,
        "LicenseName": format!("{} contract", l.product_code),
        "ProductName": l.product_code,
        "ProductSKU": l.sku(),
        "Issuer": {"Name": "AWS/Marketplace", "KeyFingerprint": l.issuer_fingerprint},
        "HomeRegion": config.region,
        "Status": "AVAILABLE",
        "Validity": {
            "Begin": l.begins_at.map_or_else(|| rfc3339(0), |b| rfc3339(unix_seconds(b))),
        },
        "Beneficiary": l.customer_aws_account_id,
        "Entitlements": l.entitlements.iter().map(entitlement_json).collect::<Vec<_>>(),
        "ConsumptionConfiguration": {
            "RenewType": "None",
            "ProvisionalConfiguration": {
                "MaxTimeToLiveInMinutes": (l.provisional_ttl.as_secs() / 60).max(1),
            },
        },
        "Version": "1",
    });
    if let Some(end) = l.ends_at {
        out["Validity"]["End"] = json!(rfc3339(unix_seconds(end)));
    }
    if granted {
        out["ReceivedMetadata"] = json!({
            "ReceivedStatus": "ACTIVE",
            "AllowedOperations": ["CheckoutLicense", "CheckInLicense", "ExtendConsumptionLicense"],
            "GrantType": "BuyerGrant",
        });
    }
    out
}

fn consumption_token(obj: &Map<String, Value>) -> Result<String, ApiError> {
    let mut v = Violations::default();
    let token = required_string(&mut v, obj, "LicenseConsumptionToken", "", &ANY_STRING)?;
    v.into_result()?;
    Ok(token)
}

/// CheckInLicense: returns a PROVISIONAL checkout's units to the pool.
pub(crate) fn check_in(
    config: &EmulatorConfig,
    state: &mut Licenses,
    account: &str,
    body: &Value,
    now: SystemTime,
) -> Result<Value, ApiError> {
    let token = consumption_token(root(body)?)?;
    let at = unix_seconds(now);
    let Some(c) = state
        .consumptions
        .get_mut(&token)
        .filter(|c| c.account == account)
    else {
        return Err(not_found("The license consumption token was not found."));
    };
    if !c.holds(at) {
        return Err(error(
            "ConflictException",
            "The license consumption was already checked in or has expired.",
        ));
    }
    let allows_check_in = config.license(&c.license_arn).is_some_and(|l| {
        c.entitlements.iter().all(|held| {
            l.entitlements
                .iter()
                .any(|e| e.name == held.name && e.allow_check_in)
        })
    });
    if c.checkout_type != "PROVISIONAL" || !allows_check_in {
        return Err(error(
            "ConflictException",
            "This license consumption cannot be checked in.",
        ));
    }
    c.checked_in = true;
    Ok(json!({}))
}

/// ExtendLicenseConsumption: a PROVISIONAL checkout lasts another `provisional_ttl` from now.
pub(crate) fn extend(
    config: &EmulatorConfig,
    state: &mut Licenses,
    account: &str,
    body: &Value,
    now: SystemTime,
) -> Result<Value, ApiError> {
    let obj = root(body)?;
    let token = consumption_token(obj)?;
    let dry_run = bool_member(obj, "DryRun")?.unwrap_or(false);
    let at = unix_seconds(now);
    let Some(c) = state
        .consumptions
        .get_mut(&token)
        .filter(|c| c.account == account && c.holds(at) && c.checkout_type == "PROVISIONAL")
    else {
        return Err(not_found(
            "The license consumption token was not found, or it was checked in or has expired.",
        ));
    };
    let ttl = config
        .license(&c.license_arn)
        .map_or(3600, |l| l.provisional_ttl.as_secs() as i64);
    let expires = at.saturating_add(ttl);
    if !dry_run {
        c.expires_at = Some(expires);
        c.extensions = c.extensions.saturating_add(1);
    }
    Ok(json!({
        "LicenseConsumptionToken": token,
        "Expiration": rfc3339(c.expires_at.unwrap_or(expires)),
    }))
}

/// GetLicense.
pub(crate) fn get_license(
    config: &EmulatorConfig,
    account: &str,
    body: &Value,
    now: SystemTime,
) -> Result<Value, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let arn = required_string(&mut v, obj, "LicenseArn", "", &LICENSE_ARN)?;
    optional_string(&mut v, obj, "Version", "", &ANY_STRING)?;
    v.into_result()?;
    match visible(config, account, now).find(|l| l.arn == arn) {
        Some(l) => Ok(json!({ "License": license_json(l, config, false) })),
        None => Err(error(
            "InvalidParameterValueException",
            "The license was not found in this account.",
        )),
    }
}

/// ListReceivedLicenses: the caller's licenses, filtered by ARN or by `ProductSKU`,
/// `Fingerprint`, `IssuerName` or `Beneficiary`, `MaxResults` (1–100) a page.
pub(crate) fn list_received(
    config: &EmulatorConfig,
    account: &str,
    body: &Value,
    now: SystemTime,
) -> Result<Value, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let max = int_member(obj, "MaxResults")?;
    if let Some(n) = max {
        super::model::check_range(&mut v, n, "maxResults", 1, Some(100));
    }
    let next = optional_string(&mut v, obj, "NextToken", "", &ANY_STRING)?;
    let arns: Option<Vec<String>> = list_member(obj, "LicenseArns")?.map(|items| {
        items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect()
    });
    let mut filters: Vec<(String, Vec<String>)> = Vec::new();
    for (i, item) in list_member(obj, "Filters")?
        .into_iter()
        .flatten()
        .enumerate()
    {
        let f = as_object(item, "Filter")?;
        let name = string_member(f, "Name")?.unwrap_or_default();
        let values = list_member(f, "Values")?
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect();
        if !["ProductSKU", "Fingerprint", "IssuerName", "Beneficiary"].contains(&name.as_str()) {
            v.push(
                Some(&name),
                &format!("filters.{}.member.name", i + 1),
                "must be one of ProductSKU, Fingerprint, IssuerName, Beneficiary",
            );
        }
        filters.push((name, values));
    }
    v.into_result()?;
    let matches = |l: &LicenseConfig| {
        arns.as_ref().is_none_or(|a| a.contains(&l.arn))
            && filters.iter().all(|(name, values)| {
                let field = match name.as_str() {
                    "ProductSKU" => l.sku(),
                    "Fingerprint" => l.issuer_fingerprint.as_str(),
                    "IssuerName" => "AWS/Marketplace",
                    _ => l.customer_aws_account_id.as_str(),
                };
                values.iter().any(|value| value == field)
            })
    };
    let all: Vec<&LicenseConfig> = visible(config, account, now)
        .filter(|l| matches(l))
        .collect();
    let start = match next.as_deref() {
        None => 0,
        Some(t) => t.parse::<usize>().map_err(|_| {
            error(
                "InvalidParameterValueException",
                "The NextToken is not valid.",
            )
        })?,
    };
    let page = usize::try_from(max.unwrap_or(100)).unwrap_or(100);
    let end = start.saturating_add(page).min(all.len());
    let licenses: Vec<Value> = all
        .get(start..end)
        .unwrap_or_default()
        .iter()
        .map(|l| license_json(l, config, true))
        .collect();
    let mut out = json!({ "Licenses": licenses });
    if end < all.len() {
        out["NextToken"] = json!(end.to_string());
    }
    Ok(out)
}

/// GetAccessToken: a license token (`[[license_tokens]]`) for a short-lived access token,
/// the web identity AssumeRoleWithWebIdentity takes (License Manager for Anywhere).
pub(crate) fn get_access_token(
    config: &EmulatorConfig,
    keyring: &Keyring,
    body: &Value,
    now: SystemTime,
) -> Result<Value, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let token = required_string(&mut v, obj, "Token", "", &TOKEN_STRING)?;
    if let Some(items) = list_member(obj, "TokenProperties")? {
        if items.len() > 3 {
            v.push(
                Some(&format!("[{} items]", items.len())),
                "tokenProperties",
                "must have length less than or equal to 3",
            );
        }
    }
    v.into_result()?;
    let Some(license) = config
        .license_tokens
        .iter()
        .find(|t| t.token == token)
        .and_then(|t| config.license(&t.license_arn))
    else {
        return Err(error(
            "AccessDeniedException",
            "The license token is not valid.",
        ));
    };
    let Some(key) = keyring.first() else {
        return Err(server_internal());
    };
    let at = unix_seconds(now);
    let claims = json!({
        "sub": license.customer_aws_account_id,
        "aud": "sts.amazonaws.com",
        "licenseArn": license.arn,
        "iat": at,
        "exp": at + 3600,
    });
    let access = key.sign_claims(&claims).map_err(|_| server_internal())?;
    Ok(json!({ "AccessToken": access }))
}

#[cfg(test)]
mod tests;
