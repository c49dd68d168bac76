//! The local HTTP API: `POST /v1/usage` and the read-only endpoints.
//!
//! Served on the TCP listener and on the optional Unix socket. A request is acknowledged with
//! 200 only after the ledger has fsynced every event in it; a request that fails validation is
//! refused whole with a 4xx naming each bad event, and nothing of it is recorded.
//!
//! Bounds: bodies up to 1 MiB, batches up to 10,000 events, `server.max_connections`
//! connections (further ones wait in the kernel backlog), and the ledger's queue (requests wait
//! for room: back-pressure, not loss).

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clock::{rfc3339, unix_seconds, SharedClock};
use crate::config::Config;
use crate::ledger::{Event, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::model::{self, TagSet, MAX_QUANTITY, MAX_TAG_KEYS};
use crate::status::StatusBoard;

pub const MAX_BODY_BYTES: usize = 1024 * 1024;
pub const MAX_BATCH_EVENTS: usize = 10_000;
pub const MAX_ID_CHARS: usize = 128;

/// One event as it arrives on the wire.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEvent {
    dimension: Option<String>,
    quantity: Option<serde_json::Number>,
    tags: Option<BTreeMap<String, String>>,
    id: Option<String>,
}

/// A body is one event or `{"events": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBody {
    dimension: Option<String>,
    quantity: Option<serde_json::Number>,
    tags: Option<BTreeMap<String, String>>,
    id: Option<String>,
    events: Option<Vec<WireEvent>>,
}

/// A refused request: the status, a summary, and one entry per bad event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    /// Low-cardinality reason for the metric.
    pub reason: &'static str,
    pub error: String,
    pub details: Vec<EventProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventProblem {
    pub index: usize,
    pub field: &'static str,
    pub problem: String,
}

impl Rejection {
    fn new(status: StatusCode, reason: &'static str, error: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            error: error.into(),
            details: Vec::new(),
        }
    }
}

/// What events may say: the configured dimensions and tag keys.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    pub dimensions: HashSet<String>,
    pub tag_keys: HashSet<String>,
}

impl Vocabulary {
    pub fn from_config(config: &Config) -> Self {
        Self {
            dimensions: config.metering.dimensions.iter().cloned().collect(),
            tag_keys: config.metering.tag_keys.iter().cloned().collect(),
        }
    }
}

/// Parses and validates a `POST /v1/usage` body: all events valid, or a rejection naming each
/// bad one.
pub fn parse_usage(body: &[u8], vocabulary: &Vocabulary) -> Result<Vec<Event>, Rejection> {
    let wire: WireBody = serde_json::from_slice(body).map_err(|e| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not a valid usage request: {e}"),
        )
    })?;
    let single = wire.dimension.is_some()
        || wire.quantity.is_some()
        || wire.tags.is_some()
        || wire.id.is_some();
    let events = match (wire.events, single) {
        (Some(_), true) => {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                "send either one event or {\"events\": [...]}, not both",
            ))
        }
        (Some(events), false) => {
            if events.is_empty() || events.len() > MAX_BATCH_EVENTS {
                return Err(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "batch_size",
                    format!(
                        "events must hold 1 to {MAX_BATCH_EVENTS} events, got {}",
                        events.len()
                    ),
                ));
            }
            events
        }
        (None, _) => vec![WireEvent {
            dimension: wire.dimension,
            quantity: wire.quantity,
            tags: wire.tags,
            id: wire.id,
        }],
    };
    let mut problems = Vec::new();
    let mut valid = Vec::with_capacity(events.len());
    for (index, event) in events.into_iter().enumerate() {
        match validate_event(event, vocabulary) {
            Ok(e) => valid.push(e),
            Err((field, problem)) => problems.push(EventProblem {
                index,
                field,
                problem,
            }),
        }
    }
    if problems.is_empty() {
        return Ok(valid);
    }
    let reason = match problems[0].field {
        "dimension" => "unknown_dimension",
        "quantity" => "bad_quantity",
        "tags" => "bad_tags",
        _ => "bad_event",
    };
    Err(Rejection {
        status: StatusCode::BAD_REQUEST,
        reason,
        error: format!(
            "{} of the request's events {} invalid; nothing was recorded",
            problems.len(),
            if problems.len() == 1 { "is" } else { "are" }
        ),
        details: problems,
    })
}

fn validate_event(
    event: WireEvent,
    vocabulary: &Vocabulary,
) -> Result<Event, (&'static str, String)> {
    let dimension = event
        .dimension
        .ok_or(("dimension", "dimension is required".to_owned()))?;
    if !vocabulary.dimensions.contains(&dimension) {
        let mut known: Vec<&String> = vocabulary.dimensions.iter().collect();
        known.sort();
        return Err((
            "dimension",
            format!("unknown dimension {dimension:?}; configured dimensions are {known:?}"),
        ));
    }
    let quantity = event
        .quantity
        .ok_or(("quantity", "quantity is required".to_owned()))?;
    let quantity = match quantity.as_i64() {
        Some(q) if (0..=MAX_QUANTITY).contains(&q) => q,
        Some(q) if q < 0 => return Err(("quantity", format!("quantity {q} is negative"))),
        _ if quantity.is_f64() => {
            return Err((
                "quantity",
                format!("quantity {quantity} is not a whole number"),
            ))
        }
        _ => {
            return Err((
                "quantity",
                format!("quantity {quantity} is larger than {MAX_QUANTITY}"),
            ))
        }
    };
    let tags: TagSet = event.tags.unwrap_or_default();
    if tags.len() > MAX_TAG_KEYS {
        return Err((
            "tags",
            format!(
                "{} tag keys given; at most {MAX_TAG_KEYS} are allowed",
                tags.len()
            ),
        ));
    }
    for (key, value) in &tags {
        if !vocabulary.tag_keys.contains(key) {
            let mut known: Vec<&String> = vocabulary.tag_keys.iter().collect();
            known.sort();
            return Err((
                "tags",
                format!("tag key {key:?} is not in metering.tag_keys {known:?}"),
            ));
        }
        model::check_tag_text("value", value, model::TAG_VALUE_MAX_LEN)
            .map_err(|e| ("tags", format!("{e} (key {key:?})")))?;
    }
    if let Some(id) = &event.id {
        let n = id.chars().count();
        if n == 0 || n > MAX_ID_CHARS {
            return Err((
                "id",
                format!("id must be 1 to {MAX_ID_CHARS} characters, got {n}"),
            ));
        }
    }
    Ok(Event {
        dimension,
        tags,
        quantity,
        id: event.id,
    })
}

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
}

/// DNS-rebinding guard: the Host must name loopback (or the address we listen on).
pub fn host_allowed(host: Option<&str>, listen_ip: Option<IpAddr>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || Some(ip) == listen_ip.filter(|l| !l.is_unspecified()),
        Err(_) => false,
    }
}

impl Api {
    pub async fn handle(&self, req: Request<Incoming>, via: Via) -> Response<Body> {
        if via == Via::Tcp {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            if !host_allowed(host, self.listen_ip) {
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
        if !open {
            if let Some(token) = &self.auth_token {
                if !bearer_matches(&req, token) {
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
            (&Method::GET, "/healthz") => {
                json_response(StatusCode::OK, &json!({"status": "alive"}))
            }
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/metrics") => {
                if let Ok(stats) = self.ledger.stats().await {
                    self.metrics.records_pending.set(stats.pending);
                }
                let mut resp = Response::new(Full::new(Bytes::from(
                    self.metrics.render(self.ledger.commit_stats()),
                )));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            }
            (
                _,
                "/v1/usage" | "/v1/usage/current" | "/v1/status" | "/healthz" | "/readyz"
                | "/metrics",
            ) => {
                let mut resp = error_response(&Rejection::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method",
                    format!("{} is not allowed on {path}", req.method()),
                ));
                // RFC 9110: a 405 names the methods the resource supports.
                let allow = if path == "/v1/usage" { "POST" } else { "GET" };
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

    async fn post_usage(&self, req: Request<Incoming>) -> Response<Body> {
        match self.ingest(req).await {
            Ok(resp) => resp,
            Err(rejection) => {
                self.metrics.reject(rejection.reason);
                error_response(&rejection)
            }
        }
    }

    async fn ingest(&self, req: Request<Incoming>) -> Result<Response<Body>, Rejection> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "meterd is shutting down; retry against the next instance",
            ));
        }
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
        let too_large = || {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body exceeds {MAX_BODY_BYTES} bytes; split it into smaller batches"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
            return Err(too_large());
        }
        let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    Rejection::new(
                        StatusCode::BAD_REQUEST,
                        "body_read",
                        format!("could not read the body: {e}"),
                    )
                }
            })?
            .to_bytes();
        let events = parse_usage(&body, &self.vocabulary)?;
        let received_at = unix_seconds(self.clock.now());
        match self.ledger.append(events, received_at).await {
            Ok(outcome) => {
                self.metrics.events_accepted.inc_by(outcome.accepted as u64);
                self.metrics
                    .events_duplicate
                    .inc_by(outcome.duplicates as u64);
                // Written directly: this is the hot path, and a `json!` map costs allocations.
                let body = format!(
                    r#"{{"accepted":{},"duplicates":{}}}"#,
                    outcome.accepted, outcome.duplicates
                );
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                Ok(resp)
            }
            Err(e @ LedgerError::HourlyCapExceeded { .. }) => Err(Rejection::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "hourly_cap",
                format!("{e}; counts already accepted are unchanged"),
            )),
            Err(e) => {
                let (status, reason) = match e {
                    LedgerError::Full(_) => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
                    _ => (StatusCode::SERVICE_UNAVAILABLE, "ledger_unavailable"),
                };
                self.metrics.ledger_error(reason);
                tracing::error!(error = %e, "usage not recorded: the ledger refused the write");
                Err(Rejection::new(
                    status,
                    reason,
                    format!("{e}; nothing of this request was recorded, retry later"),
                ))
            }
        }
    }

    async fn current_usage(&self) -> Response<Body> {
        let hour = self.ledger.open_hour(unix_seconds(self.clock.now()));
        match self.ledger.usage_of_hour(hour).await {
            Ok(rows) => {
                let usage: Vec<_> = rows
                    .iter()
                    .map(|r| json!({"dimension": r.dimension, "tags": r.tags, "quantity": r.quantity}))
                    .collect();
                json_response(
                    StatusCode::OK,
                    &json!({"hour": rfc3339(hour), "usage": usage}),
                )
            }
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": e.to_string(), "details": []}),
            ),
        }
    }

    async fn status(&self) -> Response<Body> {
        let now = unix_seconds(self.clock.now());
        let ledger = self.ledger.stats().await;
        let (ledger_json, records) = match &ledger {
            Ok(s) => (
                json!({"path": self.ledger.path(), "size_bytes": s.size_bytes, "writable": self.status.ledger_writable()}),
                json!({"pending": s.pending, "sent": s.sent, "dead_letter": s.dead, "duplicate": s.duplicate, "last_error": s.last_error}),
            ),
            Err(e) => (
                json!({"path": self.ledger.path(), "error": e.to_string(), "writable": false}),
                serde_json::Value::Null,
            ),
        };
        let identity = self.ledger.identity();
        json_response(
            StatusCode::OK,
            &json!({
                "product_code": self.config.product_code,
                "platform": self.status.platform,
                "ready": self.status.is_ready(),
                "entitlement": self.status.entitlement(),
                "open_hour": rfc3339(self.ledger.open_hour(now)),
                "first_start": rfc3339(identity.first_start),
                "records": records,
                "sender": self.status.sender(),
                "ledger": ledger_json,
            }),
        )
    }

    fn readyz(&self) -> Response<Body> {
        if self.status.is_ready() {
            json_response(StatusCode::OK, &json!({"ready": true}))
        } else {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "ready": false,
                    "entitlement": self.status.entitlement().state,
                    "ledger_writable": self.status.ledger_writable(),
                }),
            )
        }
    }
}

fn bearer_matches(req: &Request<Incoming>, token: &[u8]) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = value.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    bool::from(given.ct_eq(token))
}

/// A listening socket the API can be served on.
pub trait Acceptor: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Acceptor for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&mut self) -> std::io::Result<Self::Stream> {
        let (stream, _) = self.accept().await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&mut self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Serves one listener until `stop` fires, then lets in-flight requests finish (up to
/// `drain_timeout`). At most `max_connections` connections are served at once.
pub async fn serve<A: Acceptor>(
    api: Arc<Api>,
    mut listener: A,
    via: Via,
    max_connections: usize,
    stop: CancellationToken,
    drain_timeout: Duration,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            s = listener.accept_stream() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of file descriptors and similar: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let api = api.clone();
        let service = service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req, via).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the drain timeout");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocabulary {
        Vocabulary {
            dimensions: ["requests", "gigabytes"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            tag_keys: ["tenant"].iter().map(|s| s.to_string()).collect(),
        }
    }

    fn reject(body: &str) -> Rejection {
        parse_usage(body.as_bytes(), &vocab()).expect_err(body)
    }

    #[test]
    fn single_event_and_batch_parse() {
        let one = parse_usage(
            br#"{"dimension":"requests","quantity":3,"tags":{"tenant":"acme"},"id":"evt-1"}"#,
            &vocab(),
        )
        .expect("valid");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].quantity, 3);
        assert_eq!(one[0].tags.get("tenant").map(String::as_str), Some("acme"));
        let batch = parse_usage(
            br#"{"events":[{"dimension":"requests","quantity":0},{"dimension":"gigabytes","quantity":2147483647}]}"#,
            &vocab(),
        )
        .expect("valid");
        assert_eq!(batch.len(), 2);
    }

    #[test]
    fn each_bad_input_is_named() {
        let cases = [
            ("{not json", "malformed_json", ""),
            (
                r#"{"dimension":"nope","quantity":1}"#,
                "unknown_dimension",
                "unknown dimension",
            ),
            (
                r#"{"dimension":"requests","quantity":-1}"#,
                "bad_quantity",
                "negative",
            ),
            (
                r#"{"dimension":"requests","quantity":1.5}"#,
                "bad_quantity",
                "whole number",
            ),
            (
                r#"{"dimension":"requests","quantity":2147483648}"#,
                "bad_quantity",
                "larger than",
            ),
            (r#"{"dimension":"requests"}"#, "bad_quantity", "required"),
            (
                r#"{"dimension":"requests","quantity":1,"tags":{"colour":"red"}}"#,
                "bad_tags",
                "not in metering.tag_keys",
            ),
            (
                r#"{"dimension":"requests","quantity":1,"tags":{"tenant":"a>b"}}"#,
                "bad_tags",
                "contains",
            ),
            (
                r#"{"dimension":"requests","quantity":1,"tags":{"tenant":""}}"#,
                "bad_tags",
                "empty",
            ),
            (
                r#"{"dimension":"requests","quantity":1,"tags":{"a":"1","b":"1","c":"1","d":"1","e":"1","f":"1"}}"#,
                "bad_tags",
                "at most 5",
            ),
            (r#"{"events":[]}"#, "batch_size", ""),
            (
                r#"{"dimension":"requests","quantity":1,"extra":true}"#,
                "malformed_json",
                "extra",
            ),
        ];
        for (body, reason, needle) in cases {
            let r = reject(body);
            assert_eq!(r.reason, reason, "{body}: {r:?}");
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
            let text = format!("{} {:?}", r.error, r.details);
            assert!(text.contains(needle), "{body}: {text}");
        }
    }

    #[test]
    fn one_bad_event_rejects_the_batch_and_names_its_index() {
        let r = reject(
            r#"{"events":[{"dimension":"requests","quantity":1},{"dimension":"requests","quantity":-4},{"dimension":"x","quantity":1}]}"#,
        );
        let indexes: Vec<usize> = r.details.iter().map(|d| d.index).collect();
        assert_eq!(indexes, vec![1, 2]);
    }

    #[test]
    fn host_guard_accepts_only_loopback_names() {
        for ok in [
            "localhost",
            "localhost:8377",
            "127.0.0.1:8377",
            "[::1]:8377",
            "127.1.2.3",
        ] {
            assert!(host_allowed(Some(ok), None), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8377",
            "10.0.0.1:8377",
            "0.0.0.0:8377",
            "",
        ] {
            assert!(!host_allowed(Some(bad), None), "{bad}");
        }
        assert!(!host_allowed(None, None));
        let pod_ip: IpAddr = "10.1.2.3".parse().expect("ip");
        assert!(host_allowed(Some("10.1.2.3:8377"), Some(pod_ip)));
    }
}
