//! HTTP: the AWS JSON 1.1 protocol on `POST /`, the admin API under `/_emulator/`, and
//! [`super::credentials`]' STS and container endpoints.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections ([`crate::serve`]: header and body timeouts,
//! accept back-off; further connections wait in the accept queue)
//! and request bodies smaller than 1 MiB (larger ones are answered `ValidationException`).

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::config::{ConfigError, Entitlement, RegistrationTokenConfig};
use super::error::ApiError;
use super::faults::{Decision, FaultInjector, FaultProfile, InjectedFault};
use super::license_manager;
use super::model::{self, Api, Operation};
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
    pub quotas: Mutex<super::quotas::Quotas>,
    pub licenses: Mutex<super::license_manager::Licenses>,
    pub temporary: super::credentials::TemporaryCredentials,
    pub clock: SharedClock,
    pub cancel: CancellationToken,
}

impl Shared {
    pub fn faults(&self) -> MutexGuard<'_, FaultInjector> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn quotas(&self) -> MutexGuard<'_, super::quotas::Quotas> {
        self.quotas.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn licenses(&self) -> MutexGuard<'_, license_manager::Licenses> {
        self.licenses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validates a fault profile and applies it from the emulator clock's now: the one path
    /// for the admin API and [`super::EmulatorHandle::try_set_faults`].
    pub fn set_faults(&self, profile: FaultProfile) -> Result<(), ConfigError> {
        let now = self.clock.now();
        self.faults().set(profile, now)
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

/// License Manager's errors name their member `Message`, as its model does.
fn error_response_for(err: &ApiError, api: Api) -> HttpResponse {
    match api {
        Api::Metering => error_response(err),
        Api::LicenseManager => json_response(
            err.status,
            json!({"__type": err.error_type, "Message": err.message}).to_string(),
        ),
    }
}

fn request_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

/// A request as read off a connection.
pub(crate) struct ReadRequest {
    pub parts: http::request::Parts,
    /// `None` when the body was longer than [`MAX_BODY_BYTES`].
    pub body: Option<Bytes>,
}

impl ReadRequest {
    /// What SigV4 signs of this request, with `body` as its payload.
    pub fn signed<'a>(&'a self, body: &'a [u8]) -> SignedRequest<'a> {
        SignedRequest {
            method: self.parts.method.as_str(),
            path: self.parts.uri.path(),
            query: self.parts.uri.query(),
            headers: &self.parts.headers,
            body,
        }
    }
}

/// Whether the protocol waits out an injected latency on the emulator clock (`Clock`) or
/// only records it (`Skip`, for [`answer_now`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Latency {
    Clock,
    Skip,
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<HttpResponse, DropConnection> {
    let (parts, body) = req.into_parts();
    let body = match read_body(&parts.headers, body, MAX_BODY_BYTES, BODY_READ_TIMEOUT).await {
        Ok(b) => Some(b),
        // A body that does not arrive frees its connection without an answer.
        Err(BodyError::Timeout(_)) => return Err(DropConnection),
        Err(_) => None,
    };
    answer(&shared, ReadRequest { parts, body }, Latency::Clock).await
}

/// Everything after the body is read: the admin API, or the protocol from the
/// `X-Amz-Target` to the answer. With [`Latency::Skip`] it never waits on anything.
pub(crate) async fn answer(
    shared: &Shared,
    req: ReadRequest,
    latency: Latency,
) -> Result<HttpResponse, DropConnection> {
    let mut response = if req.parts.uri.path().starts_with("/_emulator/") {
        admin(shared, &req)
    } else if let Some(answered) = super::credentials::route(shared, &req) {
        answered
    } else {
        protocol(shared, req, latency).await?
    };
    // SDKs correct their clock skew from `Date`: it must be the emulator's clock, or a
    // shifted emulator with a signature skew check refuses every correctly-clocked client.
    let date = httpdate::fmt_http_date(shared.clock.now());
    if let Ok(value) = http::HeaderValue::from_str(&date) {
        response.headers_mut().insert(http::header::DATE, value);
    }
    Ok(response)
}

/// [`answer`] without waiting, synchronously: the protocol and admin paths exactly as
/// served, with an injected latency recorded but not waited for.
pub(crate) fn answer_now(
    shared: &Shared,
    req: ReadRequest,
) -> Result<HttpResponse, DropConnection> {
    let future = std::pin::pin!(answer(shared, req, Latency::Skip));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.poll(&mut cx) {
        std::task::Poll::Ready(answered) => answered,
        // Nothing on this path awaits without `Latency::Clock`.
        std::task::Poll::Pending => Ok(error_response(&ApiError::internal())),
    }
}

/// A response's bytes; a `Full` body is ready at once.
pub(crate) fn body_bytes(body: Full<Bytes>) -> Bytes {
    let future = std::pin::pin!(body.collect());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.poll(&mut cx) {
        std::task::Poll::Ready(Ok(collected)) => collected.to_bytes(),
        std::task::Poll::Ready(Err(never)) => match never {},
        std::task::Poll::Pending => Bytes::new(),
    }
}

/// The access key id named in an Authorization header, unverified; for the call log.
fn claimed_identity(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (_, rest) = value.split_once("Credential=")?;
    let key = rest.split('/').next()?;
    Some(key.to_owned())
}

/// Who a call is from: the signer, and the account it belongs to (the role's for temporary
/// credentials, else `quotas.accounts`).
struct Admitted {
    caller: sigv4::Caller,
    account: String,
}

/// Throttling as the operation's service answers it.
fn throttled(op: Operation) -> ApiError {
    match op.api() {
        Api::Metering => ApiError::throttling(),
        Api::LicenseManager => license_manager::rate_limited(),
    }
}

/// The operation's checks before any latency: body size, operation, SigV4, disabled
/// operations, the account's quota, then the fault decision (which is recorded in `call`).
fn admit(
    shared: &Shared,
    req: &ReadRequest,
    op: Option<Operation>,
    target: &str,
    now: SystemTime,
    call: &mut CallRecord,
) -> Result<(Operation, Admitted, Decision), ApiError> {
    let Some(body) = req.body.as_ref().filter(|b| b.len() < MAX_BODY_BYTES) else {
        return Err(ApiError::new(
            "ValidationException",
            format!("The request must be smaller than {MAX_BODY_BYTES} bytes."),
        ));
    };
    let Some(op) = op else {
        return Err(ApiError::new(
            "UnknownOperationException",
            format!("Unknown operation: {target:?}"),
        ));
    };
    let signed = req.signed(body);
    let unsigned =
        op.may_be_unsigned() && !req.parts.headers.contains_key(http::header::AUTHORIZATION);
    let verified = if unsigned {
        sigv4::Verified {
            caller: sigv4::Caller {
                identity: "anonymous".to_owned(),
                region: shared.service.config.region.clone(),
            },
            session: None,
        }
    } else {
        sigv4::verify_with(
            &signed,
            op.api().signing_name(),
            &shared.service.config.credentials,
            Some(&shared.temporary),
            now,
            shared.service.config.signature_max_skew,
        )?
    };
    let caller = verified.caller;
    if shared.service.config.disabled_operations.contains(&op) {
        return Err(ApiError::new(
            "DisabledApiException",
            "The API is disabled in the Region.",
        ));
    }
    // The account's quota, on the emulator's clock, before any injected fault.
    let (admitted, account) = {
        let mut quotas = shared.quotas();
        let account = match &verified.session {
            Some(session) => session.account.clone(),
            None => quotas.account_of(&caller.identity).to_owned(),
        };
        (quotas.admit_account(account.clone(), op, now), account)
    };
    if !admitted {
        return Err(throttled(op));
    }
    let decision = shared.faults().decide(op, now);
    if let Some(latency) = decision.latency {
        call.added_latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
    }
    call.fault = decision.fault;
    Ok((op, Admitted { caller, account }, decision))
}

/// The operation after any latency: the injected fault, the JSON body, the operation.
fn dispatch(
    shared: &Shared,
    body: &[u8],
    op: Operation,
    admitted: &Admitted,
    fault: Option<InjectedFault>,
    call: &mut CallRecord,
) -> Result<Result<Value, ApiError>, DropConnection> {
    let caller = &admitted.caller;
    let license_manager = op.api() == Api::LicenseManager;
    match fault {
        Some(InjectedFault::Down) => return Ok(Err(ApiError::unavailable())),
        Some(InjectedFault::Throttled) => return Ok(Err(throttled(op))),
        Some(InjectedFault::ServerError) if license_manager => {
            return Ok(Err(license_manager::server_internal()))
        }
        Some(InjectedFault::ServerError) => return Ok(Err(ApiError::internal())),
        Some(InjectedFault::Dropped) => return Err(DropConnection),
        Some(InjectedFault::Unprocessed { .. }) | None => {}
    }
    let value: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(body) {
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
            .and_then(|input| service.register_usage(&input, caller, now)),
        Operation::MeterUsage => model::parse_meter_usage(&value)
            .and_then(|input| service.meter_usage(&input, caller, now)),
        Operation::BatchMeterUsage => model::parse_batch_meter_usage(&value).and_then(|input| {
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
            service.batch_meter_usage(&input, caller, now, &unprocessed)
        }),
        Operation::ResolveCustomer => model::parse_resolve_customer(&value)
            .and_then(|input| service.resolve_customer(&input, now)),
        Operation::CheckoutLicense => license_manager::checkout(
            &service.config,
            &mut shared.licenses(),
            &service.keyring,
            &admitted.account,
            &value,
            now,
        ),
        Operation::CheckInLicense => license_manager::check_in(
            &service.config,
            &mut shared.licenses(),
            &admitted.account,
            &value,
            now,
        ),
        Operation::ExtendLicenseConsumption => license_manager::extend(
            &service.config,
            &mut shared.licenses(),
            &admitted.account,
            &value,
            now,
        ),
        Operation::GetLicense => {
            license_manager::get_license(&service.config, &admitted.account, &value, now)
        }
        Operation::ListReceivedLicenses => {
            license_manager::list_received(&service.config, &admitted.account, &value, now)
        }
        Operation::GetAccessToken => {
            license_manager::get_access_token(&service.config, &service.keyring, &value, now)
        }
    };
    Ok(answer)
}

/// Waits `latency` of emulator-clock time, or until shutdown. A deadline past the clock's
/// range waits for shutdown alone.
async fn wait_latency(shared: &Shared, latency: Duration) {
    let deadline = shared.clock.now().checked_add(latency);
    tokio::select! {
        _ = async {
            match deadline {
                Some(deadline) => shared.clock.sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        } => {}
        _ = shared.cancel.cancelled() => {}
    }
}

async fn protocol(
    shared: &Shared,
    req: ReadRequest,
    latency: Latency,
) -> Result<HttpResponse, DropConnection> {
    let now = shared.clock.now();
    let target = req
        .parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let op = Operation::from_target(&target).filter(|_| req.parts.method == Method::POST);
    let api = op.map_or(Api::Metering, Operation::api);
    let mut call = CallRecord {
        operation: op
            .map(|o| o.name().to_owned())
            .unwrap_or_else(|| target.clone()),
        identity: claimed_identity(&req.parts.headers),
        time_ms: unix_millis(now),
        outcome: Outcome::Ok,
        fault: None,
        added_latency_ms: 0,
    };
    let span = tracing::info_span!("emulator_call", operation = %call.operation, identity = call.identity.as_deref().unwrap_or("-"));
    let result = async {
        let (op, admitted, decision) = match admit(shared, &req, op, &target, now, &mut call) {
            Ok(admitted) => admitted,
            Err(e) => return Ok(Err(e)),
        };
        if let (Some(d), Latency::Clock) = (decision.latency, latency) {
            wait_latency(shared, d).await;
        }
        let body = req.body.as_deref().unwrap_or_default();
        dispatch(shared, body, op, &admitted, decision.fault, &mut call)
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
            Some(error_response_for(&err, api))
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

/// A JSON body, or the admin API's 413 or 400 answer.
fn read_json<T: serde::de::DeserializeOwned>(body: Option<&[u8]>) -> Result<T, Box<HttpResponse>> {
    let bytes = body.ok_or_else(|| admin_error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))?;
    serde_json::from_slice(bytes)
        .map_err(|e| Box::new(admin_error(StatusCode::BAD_REQUEST, e.to_string())))
}

/// RFC 3339 with milliseconds, or `None` outside its range (before 1970, after 9999).
fn rfc3339_millis(t: SystemTime) -> Option<String> {
    use std::fmt::Write;
    let mut text = String::new();
    write!(text, "{}", humantime::format_rfc3339_millis(t)).ok()?;
    Some(text)
}

fn admin(shared: &Shared, req: &ReadRequest) -> HttpResponse {
    let method = req.parts.method.clone();
    let path = req.parts.uri.path().trim_end_matches('/');
    let body = req.body.as_deref();
    let service = &shared.service;
    match (method, path) {
        (Method::GET, "/_emulator/health") => admin_json(
            StatusCode::OK,
            &json!({
                "status": "ok",
                "time": rfc3339_millis(shared.clock.now()),
                "region": service.config.region,
            }),
        ),
        (Method::GET, "/_emulator/records") => admin_json(StatusCode::OK, &service.meter_records()),
        (Method::GET, "/_emulator/batch-records") => {
            admin_json(StatusCode::OK, &service.batch_records())
        }
        (Method::GET, "/_emulator/double-billing") => {
            admin_json(StatusCode::OK, &service.double_billed())
        }
        (Method::GET, "/_emulator/license-consumptions") => {
            admin_json(StatusCode::OK, &shared.licenses().consumptions())
        }
        (Method::GET, "/_emulator/calls") => admin_json(StatusCode::OK, &service.calls()),
        (Method::GET, "/_emulator/rates") => admin_json(StatusCode::OK, &shared.quotas().rates()),
        (Method::GET, "/_emulator/public-keys") => {
            admin_json(StatusCode::OK, &service.keyring.public_keys())
        }
        (Method::GET, "/_emulator/faults") => {
            admin_json(StatusCode::OK, shared.faults().profile())
        }
        (Method::POST, "/_emulator/faults") => {
            let profile: FaultProfile = match read_json(body) {
                Ok(p) => p,
                Err(r) => return *r,
            };
            match shared.set_faults(profile.clone()) {
                Ok(()) => {
                    tracing::info!(?profile, "fault profile set");
                    admin_json(StatusCode::OK, &profile)
                }
                Err(e) => admin_error(StatusCode::BAD_REQUEST, e.problems.join("; ")),
            }
        }
        (Method::POST, "/_emulator/entitlement") => {
            let change: EntitlementChange = match read_json(body) {
                Ok(c) => c,
                Err(r) => return *r,
            };
            match service.set_entitlement(&change.product_code, change.entitlement) {
                Ok(()) => admin_json(StatusCode::OK, &json!({"product_code": change.product_code, "entitlement": change.entitlement})),
                Err(e) => admin_error(StatusCode::BAD_REQUEST, e),
            }
        }
        (Method::POST, "/_emulator/registration-tokens") => {
            let token: RegistrationTokenConfig = match read_json(body) {
                Ok(t) => t,
                Err(r) => return *r,
            };
            match service.add_registration_token(token.clone()) {
                Ok(()) => admin_json(StatusCode::CREATED, &token),
                Err(e) => admin_error(StatusCode::BAD_REQUEST, e),
            }
        }
        _ => admin_error(
            StatusCode::NOT_FOUND,
            "unknown admin endpoint; see GET /_emulator/{health,records,batch-records,calls,rates,public-keys,faults}, \
             POST /_emulator/{faults,entitlement,registration-tokens}",
        ),
    }
}
