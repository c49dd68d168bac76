//! CheckoutLicense: the checks, the units held or drawn down, and the signed token.

use std::time::SystemTime;

use serde_json::{json, Value};

use crate::clock::{rfc3339, unix_seconds};
use crate::emulator::config::{EmulatorConfig, LicenseConfig};
use crate::emulator::error::ApiError;
use crate::emulator::jwt::Keyring;
use crate::emulator::model::{optional_string, required_string, root, Violations};

use super::*;

/// CheckoutLicense.
pub(crate) fn checkout(
    config: &EmulatorConfig,
    state: &mut Licenses,
    keyring: &Keyring,
    account: &str,
    body: &Value,
    now: SystemTime,
) -> Result<Value, ApiError> {
    let obj = root(body)?;
    let mut v = Violations::default();
    let sku = required_string(&mut v, obj, "ProductSKU", "", &ANY_STRING)?;
    let checkout_type = required_string(&mut v, obj, "CheckoutType", "", &ANY_STRING)?;
    if !checkout_type.is_empty() && !["PROVISIONAL", "PERPETUAL"].contains(&checkout_type.as_str())
    {
        v.push(
            Some(&checkout_type),
            "checkoutType",
            "must satisfy enum value set: [PROVISIONAL, PERPETUAL]",
        );
    }
    let fingerprint = required_string(&mut v, obj, "KeyFingerprint", "", &ANY_STRING)?;
    let wanted = parse_entitlements(&mut v, obj)?;
    let client_token = required_string(&mut v, obj, "ClientToken", "", &CLIENT_TOKEN)?;
    let beneficiary = optional_string(&mut v, obj, "Beneficiary", "", &ANY_STRING)?;
    let node_id = optional_string(&mut v, obj, "NodeId", "", &ANY_STRING)?;
    v.into_result()?;

    let meaning = format!(
        "{sku}|{checkout_type}|{fingerprint}|{:?}|{beneficiary:?}|{node_id:?}",
        wanted
            .iter()
            .map(|w| (&w.name, &w.unit, &w.value))
            .collect::<Vec<_>>()
    );
    let key = (account.to_owned(), client_token.clone());
    if let Some((first, answer)) = state.client_tokens.get(&key) {
        return if *first == meaning {
            Ok(answer.clone())
        } else {
            Err(error(
                "ValidationException",
                "The ClientToken was used for another checkout.",
            ))
        };
    }
    if beneficiary.as_deref().is_some_and(|b| b != account) {
        return Err(error(
            "AccessDeniedException",
            "The beneficiary is not the caller's account.",
        ));
    }
    let Some(license) = visible(config, account, now)
        .find(|l| l.sku() == sku && l.issuer_fingerprint == fingerprint)
    else {
        return Err(not_found(
            "No license was found for the ProductSKU and KeyFingerprint in this account.",
        ));
    };
    let at = unix_seconds(now);
    let mut checked = Vec::with_capacity(wanted.len());
    for w in &wanted {
        let Some(entitlement) = license
            .entitlements
            .iter()
            .find(|e| e.name == w.name && e.unit == w.unit)
        else {
            return Err(error(
                "NoEntitlementsAllowedException",
                format!("The license has no entitlement {} in {}.", w.name, w.unit),
            ));
        };
        if entitlement.unit == "None" {
            if w.value.is_some() && w.value != entitlement.value {
                return Err(error(
                    "NoEntitlementsAllowedException",
                    format!("The license's {} is not {:?}.", w.name, w.value),
                ));
            }
            checked.push(CheckedOut {
                name: w.name.clone(),
                unit: w.unit.clone(),
                value: entitlement.value.clone(),
                amount: 0,
            });
            continue;
        }
        let amount = match w.value.as_deref() {
            None => 1,
            Some(text) => match text.parse::<i64>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(error(
                        "InvalidParameterValueException",
                        format!("The value of {} must be a positive whole number.", w.name),
                    ))
                }
            },
        };
        if let Some(max) = entitlement.max_count.filter(|_| !entitlement.overage) {
            let held = state.in_use(&license.arn, &w.name, at);
            if held.saturating_add(amount) > max {
                return Err(error(
                    "NoEntitlementsAllowedException",
                    format!(
                        "{} {} of {} are in use; {amount} more exceed the license's {max}.",
                        held, w.unit, w.name
                    ),
                ));
            }
        }
        checked.push(CheckedOut {
            name: w.name.clone(),
            unit: w.unit.clone(),
            value: Some(amount.to_string()),
            amount,
        });
    }
    let provisional = checkout_type == "PROVISIONAL";
    let expires_at =
        provisional.then(|| at.saturating_add(license.provisional_ttl.as_secs() as i64));
    let token = state.new_token();
    let allowed: Vec<Value> = checked
        .iter()
        .map(|c| {
            let mut e = json!({"Name": c.name, "Unit": c.unit});
            if let Some(value) = &c.value {
                e["Value"] = json!(value);
            }
            e
        })
        .collect();
    let signed = signed_token(keyring, license, &token, &allowed, at, expires_at)?;
    let mut answer = json!({
        "CheckoutType": checkout_type,
        "LicenseConsumptionToken": token,
        "EntitlementsAllowed": allowed,
        "SignedToken": signed,
        "IssuedAt": rfc3339(at),
        "LicenseArn": license.arn,
    });
    if let Some(exp) = expires_at {
        answer["Expiration"] = json!(rfc3339(exp));
    }
    if let Some(node) = &node_id {
        answer["NodeId"] = json!(node);
    }
    state.consumptions.insert(
        token.clone(),
        Consumption {
            token,
            license_arn: license.arn.clone(),
            account: account.to_owned(),
            checkout_type,
            entitlements: checked,
            node_id,
            issued_at: at,
            expires_at,
            checked_in: false,
            extensions: 0,
        },
    );
    state.client_tokens.insert(key, (meaning, answer.clone()));
    Ok(answer)
}

/// The checkout as a PS256 JWT signed with the emulator's RegisterUsage key, padded to the
/// model's minimum length.
fn signed_token(
    keyring: &Keyring,
    license: &LicenseConfig,
    token: &str,
    allowed: &[Value],
    issued_at: i64,
    expires_at: Option<i64>,
) -> Result<String, ApiError> {
    let Some(key) = keyring.first() else {
        return Err(server_internal());
    };
    let mut claims = json!({
        "licenseArn": license.arn,
        "productSKU": license.sku(),
        "keyFingerprint": license.issuer_fingerprint,
        "licenseConsumptionToken": token,
        "entitlementsAllowed": allowed,
        "iat": issued_at,
        "padding": "",
    });
    if let Some(exp) = expires_at {
        claims["exp"] = json!(exp);
    }
    let jwt = key.sign_claims(&claims).map_err(|_| server_internal())?;
    if jwt.len() >= SIGNED_TOKEN_MIN {
        return Ok(jwt);
    }
    // Base64 grows by 4/3: pad the claims enough to pass the minimum.
    claims["padding"] = json!("0".repeat((SIGNED_TOKEN_MIN - jwt.len()) * 3 / 4 + 4));
    key.sign_claims(&claims).map_err(|_| server_internal())
}
