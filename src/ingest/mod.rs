//! The local HTTP API: `POST /v1/usage` and the read-only endpoints.
//!
//! Served on the TCP listener and on the optional Unix socket. A request is acknowledged with
//! 200 only after the ledger has fsynced every event in it; a request that fails validation is
//! refused whole with a 4xx naming each bad event, and nothing of it is recorded.
//!
//! Bounds: bodies up to 1 MiB that arrive within 10 s (else 408), batches up to 10,000 events,
//! `server.max_connections` connections across both listeners plus a few slots reserved for
//! health probes ([`crate::serve`]), and the ledger's queue (requests wait for room:
//! back-pressure, not loss).

mod entitlements;
mod guard;
mod observe;
mod parse;
mod usage;

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::serve::{read_body, BodyError, Slot};
use crate::status::StatusBoard;

pub use guard::host_allowed;
use guard::{bearer_matches, request_authority};
pub use parse::{parse_usage, EventProblem, Rejection, Vocabulary};

pub const MAX_BODY_BYTES: usize = 1024 * 1024;
pub const MAX_BATCH_EVENTS: usize = 10_000;
pub const MAX_ID_CHARS: usize = 128;

/// Everything a request handler needs.
pub struct Api {
    pub config: Arc<Config>,
    pub vocabulary: Vocabulary,
    pub ledger: Ledger,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub status: Arc<StatusBoard>,
    /// Cleared at shutdown: new requests then get 503.
    pub accepting: AtomicBool,
    pub auth_token: Option<Vec<u8>>,
    /// `server.listen`'s address, parsed once: a Host naming it is accepted too.
    pub listen_ip: Option<IpAddr>,
    /// How long a body may take to arrive ([`crate::serve::BODY_READ_TIMEOUT`]).
    pub body_read_timeout: Duration,
    /// This agent's offset in `sending.spread` (`send::spread_offset` of its instance id).
    pub send_offset: Duration,
    /// Contract pricing: the checkout holder, once start-up has checked out.
    pub contract: std::sync::OnceLock<Arc<crate::entitlement::contract::ContractHolder>>,
}

type Body = Full<Bytes>;

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(r: &Rejection) -> Response<Body> {
    json_response(r.status, &json!({"error": r.error, "details": r.details}))
}

/// Where a request came from: the Unix socket is not reachable by a browser, so its Host is
/// not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Unix,
    /// `server.metrics_listen`: read-only, for a scraper on the network.
    Metrics,
}

impl Api {
    pub async fn handle(&self, req: Request<Incoming>, via: Via, slot: Slot) -> Response<Body> {
        if via == Via::Metrics {
            return self.handle_read_only(req).await;
        }
        if via == Via::Tcp {
            let Ok(host) = request_authority(&req) else {
                self.metrics.reject("host");
                return error_response(&Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "host",
                    "the request names more than one Host",
                ));
            };
            if !host.is_some_and(|h| host_allowed(h, self.listen_ip)) {
                self.metrics.reject("host");
                return error_response(&Rejection::new(
                    StatusCode::FORBIDDEN,
                    "host",
                    format!(
                        "Host {:?} is not a loopback name; meterd answers only localhost",
                        host.unwrap_or("")
                    ),
                ));
            }
        }
        let path = req.uri().path().to_owned();
        let open = matches!(path.as_str(), "/healthz" | "/readyz");
        if slot == Slot::Probe && !open {
            // Every regular slot is held; this one is kept for health probes.
            self.metrics.reject("busy");
            let mut resp = error_response(&Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "every connection slot is taken; retry shortly",
            ));
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return resp;
        }
        if !open {
            if let Some(token) = &self.auth_token {
                if !bearer_matches(req.headers(), token) {
                    self.metrics.reject("unauthorized");
                    let mut resp = error_response(&Rejection::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "missing or wrong bearer token",
                    ));
                    resp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer"),
                    );
                    return resp;
                }
            }
        }
        match (req.method(), path.as_str()) {
            (&Method::POST, "/v1/usage") => self.post_usage(req).await,
            (&Method::GET, "/v1/usage/current") => self.current_usage().await,
            (&Method::GET, "/v1/status") => self.status().await,
            (&Method::GET, "/v1/entitlements") => self.entitlements().await,
            (&Method::POST, "/v1/entitlements/checkout") => self.floating(req, true).await,
            (&Method::POST, "/v1/entitlements/checkin") => self.floating(req, false).await,
            (&Method::GET, "/healthz") => {
                json_response(StatusCode::OK, &json!({"status": "alive"}))
            }
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/metrics") => self.metrics_response(req.headers()).await,
            (
                _,
                "/v1/usage"
                | "/v1/usage/current"
                | "/v1/status"
                | "/v1/entitlements"
                | "/v1/entitlements/checkout"
                | "/v1/entitlements/checkin"
                | "/healthz"
                | "/readyz"
                | "/metrics",
            ) => {
                let mut resp = error_response(&Rejection::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method",
                    format!("{} is not allowed on {path}", req.method()),
                ));
                // RFC 9110: a 405 names the methods the resource supports.
                let allow = match path.as_str() {
                    "/v1/usage" | "/v1/entitlements/checkout" | "/v1/entitlements/checkin" => {
                        "POST"
                    }
                    _ => "GET",
                };
                resp.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static(allow));
                resp
            }
            _ => error_response(&Rejection::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {path}"),
            )),
        }
    }

    /// The metrics listener: no usage, no status, so neither a token nor the Host guard.
    async fn handle_read_only(&self, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => self.metrics_response(req.headers()).await,
            (&Method::GET, "/healthz") => {
                json_response(StatusCode::OK, &json!({"status": "alive"}))
            }
            (&Method::GET, "/readyz") => self.readyz(),
            (_, path) => error_response(&Rejection::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {path}: the metrics listener serves GET /metrics, /healthz and /readyz"),
            )),
        }
    }
    /// A JSON request's body: `application/json`, within the size and time bounds.
    async fn json_body(&self, req: Request<Incoming>) -> Result<Bytes, Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(Rejection::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_type",
                format!("Content-Type must be application/json, got {content_type:?}"),
            ));
        }
        let (parts, body) = req.into_parts();
        read_body(&parts.headers, body, MAX_BODY_BYTES, self.body_read_timeout)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { .. } => Rejection::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("{e}; split it into smaller batches"),
                ),
                BodyError::Timeout(_) => Rejection::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("{e}; nothing of this request was recorded"),
                ),
                BodyError::Read(_) => {
                    Rejection::new(StatusCode::BAD_REQUEST, "body_read", e.to_string())
                }
            })
    }
}
