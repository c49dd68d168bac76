//! HTTP: the AWS JSON 1.1 protocol on `POST /` and the admin API under `/_emulator/`.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections ([`crate::serve`]: header and body timeouts,
//! accept back-off; further connections wait in the accept queue)
//! and request bodies smaller than 1 MiB (larger ones are answered `ValidationException`).

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::{Entitlement, RegistrationTokenConfig};
use super::error::ApiError;
use super::faults::{FaultInjector, FaultProfile, InjectedFault};
use super::model::{self, Operation};
use super::ops::{CallRecord, Outcome, Service};
use super::sigv4::{self, SignedRequest};
use crate::clock::{unix_millis, SharedClock};
use crate::serve::{read_body, BodyError, ConnectionLimits, ServeSettings, BODY_READ_TIMEOUT};

pub const MAX_CONNECTIONS: usize = 256;
/// BatchMeterUsage requests "must be less than 1 MB"; the emulator applies it to all.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
const JSON_CONTENT_TYPE: &str = "application/x-amz-json-1.1";

pub(crate) struct Shared {
    pub service: Service,
    pub faults: Mutex<FaultInjector>,
    pub clock: SharedClock,
    pub cancel: CancellationToken,
}

impl Shared {
    pub fn faults(&self) -> MutexGuard<'_, FaultInjector> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Returned by the service to make hyper close the connection without answering.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault injection")]
pub(crate) struct DropConnection;

type HttpResponse = Response<Full<Bytes>>;

/// Serves the emulator with the one serve loop ([`crate::serve`]) until `shared.cancel`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let stop = shared.cancel.clone();
    let limits = ConnectionLimits::new(MAX_CONNECTIONS, 0);
    crate::serve::serve(
        listener,
        limits,
        ServeSettings::default(),
        stop,
        move |req, _slot| handle(shared.clone(), req),
    )
    .await;
}

fn json_response(status: u16, body: String) -> HttpResponse {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, JSON_CONTENT_TYPE)
        .header("x-amzn-requestid", request_id())
        .body(Full::new(Bytes::from(body)))
        .expect("static headers form a valid response")
}

fn error_response(err: &ApiError) -> HttpResponse {
    json_response(err.status, err.body())
}

fn request_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<HttpResponse, DropConnection> {
    if req.uri().path().starts_with("/_emulator/") {
        return Ok(admin(&shared, req).await);
    }
    protocol(&shared, req).await
}

/// The access key id named in an Authorization header, unverified; for the call log.
fn claimed_identity(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let start = value.find("Credential=")? + "Credential=".len();
    let key = value[start..].split('/').next()?;
    Some(key.to_owned())
}

async fn protocol(shared: &Shared, req: Request<Incoming>) -> Result<HttpResponse, DropConnection> {
    let now = shared.clock.now();
    let (parts, body) = req.into_parts();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let op = Operation::from_target(&target).filter(|_| parts.method == Method::POST);
    let mut call = CallRecord {
        operation: op
            .map(|o| o.name().to_owned())
            .unwrap_or_else(|| target.clone()),
        identity: claimed_identity(&parts.headers),
        time_ms: unix_millis(now),
        outcome: Outcome::Ok,
        fault: None,
        added_latency_ms: 0,
    };
    let span = tracing::info_span!("emulator_call", operation = %call.operation, identity = call.identity.as_deref().unwrap_or("-"));
    let result = async {
        let body =
            match read_body(&parts.headers, body, MAX_BODY_BYTES - 1, BODY_READ_TIMEOUT).await {
                Ok(b) => b,
                // A body that does not arrive frees its connection without an answer.
                Err(BodyError::Timeout(_)) => return Err(DropConnection),
                Err(_) => {
                    return Ok(Err(ApiError::new(
                        "ValidationException",
                        format!("The request must be smaller than {MAX_BODY_BYTES} bytes."),
                    )))
                }
            };
        let Some(op) = op else {
            return Ok(Err(ApiError::new(
                "UnknownOperationException",
                format!("Unknown operation: {target:?}"),
            )));
        };
        let signed = SignedRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            body: &body,
        };
        let caller = match sigv4::verify(
            &signed,
            &shared.service.config.credentials,
            now,
            shared.service.config.signature_max_skew,
        ) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        if shared.service.config.disabled_operations.contains(&op) {
            return Ok(Err(ApiError::new(
                "DisabledApiException",
                "The API is disabled in the Region.",
            )));
        }
        let decision = shared.faults().decide(op, now);
        if let Some(latency) = decision.latency {
            call.added_latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
            tokio::select! {
                _ = shared.clock.sleep(latency) => {}
                _ = shared.cancel.cancelled() => {}
            }
        }
        call.fault = decision.fault;
        match decision.fault {
            Some(InjectedFault::Down) => return Ok(Err(ApiError::unavailable())),
            Some(InjectedFault::Throttled) => return Ok(Err(ApiError::throttling())),
            Some(InjectedFault::ServerError) => return Ok(Err(ApiError::internal())),
            Some(InjectedFault::Dropped) => return Err(DropConnection),
            Some(InjectedFault::Unprocessed { .. }) | None => {}
        }
        let value: Value = if body.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return Ok(Err(ApiError::serialization(format!(
                        "Malformed JSON body: {e}"
                    ))))
                }
            }
        };
        let now = shared.clock.now();
        let service = &shared.service;
        let answer = match op {
            Operation::RegisterUsage => model::parse_register_usage(&value)
                .and_then(|input| service.register_usage(&input, &caller, now)),
            Operation::MeterUsage => model::parse_meter_usage(&value)
                .and_then(|input| service.meter_usage(&input, &caller, now)),
            Operation::BatchMeterUsage => {
                model::parse_batch_meter_usage(&value).and_then(|input| {
                    let unprocessed: Vec<bool> = {
                        let mut faults = shared.faults();
                        input
                            .usage_records
                            .iter()
                            .map(|_| faults.unprocessed(op))
                            .collect()
                    };
                    let left = unprocessed.iter().filter(|u| **u).count();
                    if left > 0 {
                        call.fault = Some(InjectedFault::Unprocessed { records: left });
                    }
                    service.batch_meter_usage(&input, &caller, now, &unprocessed)
                })
            }
            Operation::ResolveCustomer => model::parse_resolve_customer(&value)
                .and_then(|input| service.resolve_customer(&input, now)),
        };
        Ok(answer)
    }
    .instrument(span.clone())
    .await;
    let response = match result {
        Err(DropConnection) => {
            call.outcome = Outcome::Dropped;
            None
        }
        Ok(Ok(value)) => Some(json_response(200, value.to_string())),
        Ok(Err(err)) => {
            call.outcome = Outcome::Error {
                error_type: err.error_type.clone(),
                status: err.status,
            };
            Some(error_response(&err))
        }
    };
    span.in_scope(|| match &call.outcome {
        Outcome::Ok => tracing::info!(fault = ?call.fault, "answered"),
        Outcome::Error { error_type, status } => {
            tracing::info!(error_type = %error_type, status, fault = ?call.fault, "answered with error")
        }
        Outcome::Dropped => tracing::info!("dropped the connection"),
    });
    shared.service.record_call(call);
    response.ok_or(DropConnection)
}

fn admin_json(status: StatusCode, value: &impl serde::Serialize) -> HttpResponse {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_owned());
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static headers form a valid response")
}

fn admin_error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    admin_json(status, &json!({ "error": message.into() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntitlementChange {
    product_code: String,
    entitlement: Entitlement,
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, HttpResponse> {
    let (parts, body) = req.into_parts();
    let bytes = read_body(&parts.headers, body, MAX_BODY_BYTES, BODY_READ_TIMEOUT)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { .. } => admin_error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            BodyError::Timeout(_) => admin_error(StatusCode::REQUEST_TIMEOUT, e.to_string()),
            BodyError::Read(_) => admin_error(StatusCode::BAD_REQUEST, e.to_string()),
        })?;
    serde_json::from_slice(&bytes).map_err(|e| admin_error(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn admin(shared: &Shared, req: Request<Incoming>) -> HttpResponse {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let service = &shared.service;
    match (method, path.as_str()) {
        (Method::GET, "/_emulator/health") => admin_json(
            StatusCode::OK,
            &json!({
                "status": "ok",
                "time": humantime::format_rfc3339_millis(shared.clock.now()).to_string(),
                "region": service.config.region,
            }),
        ),
        (Method::GET, "/_emulator/records") => admin_json(StatusCode::OK, &service.meter_records()),
        (Method::GET, "/_emulator/batch-records") => {
            admin_json(StatusCode::OK, &service.batch_records())
        }
        (Method::GET, "/_emulator/calls") => admin_json(StatusCode::OK, &service.calls()),
        (Method::GET, "/_emulator/public-keys") => {
            admin_json(StatusCode::OK, &service.keyring.public_keys())
        }
        (Method::GET, "/_emulator/faults") => {
            admin_json(StatusCode::OK, shared.faults().profile())
        }
        (Method::POST, "/_emulator/faults") => {
            let profile: FaultProfile = match read_json(req).await {
                Ok(p) => p,
                Err(r) => return r,
            };
            let problems = profile.problems();
            if !problems.is_empty() {
                return admin_error(StatusCode::BAD_REQUEST, problems.join("; "));
            }
            tracing::info!(?profile, "fault profile set");
            shared.faults().set(profile.clone(), shared.clock.now());
            admin_json(StatusCode::OK, &profile)
        }
        (Method::POST, "/_emulator/entitlement") => {
            let change: EntitlementChange = match read_json(req).await {
                Ok(c) => c,
                Err(r) => return r,
            };
            match service.set_entitlement(&change.product_code, change.entitlement) {
                Ok(()) => admin_json(StatusCode::OK, &json!({"product_code": change.product_code, "entitlement": change.entitlement})),
                Err(e) => admin_error(StatusCode::BAD_REQUEST, e),
            }
        }
        (Method::POST, "/_emulator/registration-tokens") => {
            let token: RegistrationTokenConfig = match read_json(req).await {
                Ok(t) => t,
                Err(r) => return r,
            };
            match service.add_registration_token(token.clone()) {
                Ok(()) => admin_json(StatusCode::CREATED, &token),
                Err(e) => admin_error(StatusCode::BAD_REQUEST, e),
            }
        }
        _ => admin_error(
            StatusCode::NOT_FOUND,
            "unknown admin endpoint; see GET /_emulator/{health,records,batch-records,calls,public-keys,faults}, \
             POST /_emulator/{faults,entitlement,registration-tokens}",
        ),
    }
}
