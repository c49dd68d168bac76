//! Contract pricing: `GET /v1/entitlements` and the floating checkout/checkin handlers.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::{error_response, json_response, Api, Body, Rejection};

impl Api {
    fn no_contract(&self) -> Rejection {
        Rejection::new(
            StatusCode::NOT_FOUND,
            "no_contract",
            format!(
                "pricing = \"{}\" has no license entitlements (contract pricing has)",
                self.config.pricing
            ),
        )
    }

    /// Contract pricing: what the buyer is entitled to, from the license checkout meterd holds
    /// (the application gates features on it), and the application's floating checkouts.
    /// Other pricing models have none: 404.
    pub(super) async fn entitlements(&self) -> Response<Body> {
        if !self.config.pricing.checks_out() {
            return error_response(&self.no_contract());
        }
        let Some(holder) = self.contract.get() else {
            return error_response(&Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_entitled_yet",
                "no license checkout is held (start-up has not checked out yet)",
            ));
        };
        let floating = holder.floating().await;
        match holder.held() {
            Some(held) => json_response(
                StatusCode::OK,
                &json!({
                    "license_arn": held.license_arn,
                    "checkout_type": held.checkout_type,
                    "entitlements": held.entitlements,
                    "expiration": held.expiration,
                    "issued_at": held.issued_at,
                    "floating": floating,
                }),
            ),
            None => error_response(&Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_entitled_yet",
                "no license checkout is held (start-up has not checked out, or it was checked in)",
            )),
        }
    }

    /// `POST /v1/entitlements/checkout` (`checkout`) and `/checkin`: the application takes and
    /// gives back units of a floating entitlement through meterd, which extends them and checks
    /// them in when it stops.
    pub(super) async fn floating(&self, req: Request<Incoming>, checkout: bool) -> Response<Body> {
        let result = async {
            if !self.config.pricing.checks_out() {
                return Err(self.no_contract());
            }
            let Some(holder) = self.contract.get() else {
                return Err(Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_entitled_yet",
                    "start-up has not checked out the license yet",
                ));
            };
            let body = self.json_body(req).await?;
            let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    format!("not JSON: {e}"),
                )
            })?;
            let bad =
                |msg: &str| Rejection::new(StatusCode::BAD_REQUEST, "bad_request", msg.to_owned());
            use crate::entitlement::contract::FloatingError as E;
            let to_rejection = |e: E| {
                let status = match &e {
                    E::NoneLeft { .. } => StatusCode::CONFLICT,
                    E::NotHeld(_) => StatusCode::NOT_FOUND,
                    E::Unavailable(_) | E::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
                    E::Refused(_) => StatusCode::BAD_GATEWAY,
                };
                Rejection::new(status, "floating", e.to_string())
            };
            if checkout {
                let name = value["name"]
                    .as_str()
                    .filter(|n| !n.is_empty() && n.len() <= 255)
                    .ok_or_else(|| {
                        bad("\"name\" must be the entitlement's name (1 to 255 characters)")
                    })?;
                let unit = match &value["unit"] {
                    serde_json::Value::Null => "Count",
                    v => v.as_str().ok_or_else(|| bad("\"unit\" must be a string"))?,
                };
                if !aws_sdk_licensemanager::types::EntitlementDataUnit::values().contains(&unit)
                    || unit == "None"
                {
                    return Err(bad(
                        "\"unit\" must be a counted License Manager unit (Count, Gigabytes, ...)",
                    ));
                }
                let count = match &value["count"] {
                    serde_json::Value::Null => 1,
                    v => v
                        .as_i64()
                        .filter(|c| (1..=1_000_000).contains(c))
                        .ok_or_else(|| bad("\"count\" must be a whole number from 1 to 1000000"))?,
                };
                let id = match &value["id"] {
                    serde_json::Value::Null => None,
                    v => Some(
                        v.as_str()
                            .filter(|id| {
                                (1..=64).contains(&id.len())
                                    && id
                                        .chars()
                                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                            })
                            .ok_or_else(|| {
                                bad("\"id\" must be 1 to 64 characters of A-Z a-z 0-9 - _ . :")
                            })?,
                    ),
                };
                let held = holder
                    .checkout_floating(name, unit, count, id)
                    .await
                    .map_err(to_rejection)?;
                Ok(json_response(StatusCode::OK, &json!(held)))
            } else {
                let token = value["token"]
                    .as_str()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        bad("\"token\" must be a token from /v1/entitlements/checkout")
                    })?;
                holder
                    .check_in_floating(token)
                    .await
                    .map_err(to_rejection)?;
                Ok(json_response(StatusCode::OK, &json!({"checked_in": token})))
            }
        }
        .await;
        result.unwrap_or_else(|r| {
            self.metrics.reject(r.reason);
            error_response(&r)
        })
    }
}
