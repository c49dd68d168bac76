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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::clock::{rfc3339, unix_seconds, SharedClock};
use crate::config::Config;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{unsent_age_seconds, DiskSpace, Metrics};
use crate::model::{
    self, Aggregation, Event, Measure, TagSet, DISTINCT_MAX_CHARS, MAX_QUANTITY, MAX_TAG_KEYS,
};
use crate::serve::{read_body, BodyError, Slot};
use crate::status::{MeteringHealth, StatusBoard};

pub const MAX_BODY_BYTES: usize = 1024 * 1024;
pub const MAX_BATCH_EVENTS: usize = 10_000;
pub const MAX_ID_CHARS: usize = 128;

/// One event as it arrives on the wire.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEvent {
    dimension: Option<String>,
    quantity: Option<serde_json::Number>,
    tags: Option<UniqueTags>,
    id: Option<String>,
    distinct: Option<String>,
}

/// An event's tags; a key given twice is refused, like a field given twice.
#[derive(Debug, Default)]
struct UniqueTags(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueTags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueTags;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tag keys to string values")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<UniqueTags, M::Error> {
                let mut tags = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, String>()? {
                    if tags.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "tag key {key:?} is given twice"
                        )));
                    }
                    tags.insert(key, value);
                }
                Ok(UniqueTags(tags))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A body is one event or `{"events": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBody {
    dimension: Option<String>,
    quantity: Option<serde_json::Number>,
    tags: Option<UniqueTags>,
    id: Option<String>,
    distinct: Option<String>,
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

/// What events may say: the configured dimensions, their aggregations and tag keys.
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    pub dimensions: HashSet<String>,
    pub tag_keys: HashSet<String>,
    /// Dimensions that do not sum; a dimension not listed sums.
    pub aggregation: HashMap<String, Aggregation>,
    /// Dimensions meterd records itself (`metering.heartbeat`): no events are taken for them.
    pub heartbeat: HashSet<String>,
}

impl Vocabulary {
    pub fn from_config(config: &Config) -> Self {
        Self {
            dimensions: config.metering.dimensions.iter().cloned().collect(),
            tag_keys: config.metering.tag_keys.iter().cloned().collect(),
            aggregation: config
                .metering
                .aggregations()
                .into_iter()
                .filter(|(_, a)| *a != Aggregation::Sum)
                .collect(),
            heartbeat: config.metering.heartbeat.keys().cloned().collect(),
        }
    }

    pub fn aggregation_of(&self, dimension: &str) -> Aggregation {
        self.aggregation.get(dimension).copied().unwrap_or_default()
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
        || wire.id.is_some()
        || wire.distinct.is_some();
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
            distinct: wire.distinct,
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
        "distinct" => "bad_distinct",
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
    if vocabulary.heartbeat.contains(&dimension) {
        return Err((
            "dimension",
            format!("dimension {dimension:?} is recorded by meterd itself (metering.heartbeat: units for every hour the agent runs) and takes no posted events"),
        ));
    }
    let aggregation = vocabulary.aggregation_of(&dimension);
    let measure = if aggregation == Aggregation::Unique {
        let Some(value) = event.distinct else {
            return Err((
                "distinct",
                format!("distinct is required: {dimension:?} counts distinct values (metering.aggregation = \"unique\")"),
            ));
        };
        let n = value.chars().count();
        if n == 0 || n > DISTINCT_MAX_CHARS {
            return Err((
                "distinct",
                format!("distinct must be 1 to {DISTINCT_MAX_CHARS} characters, got {n}"),
            ));
        }
        // An event is one occurrence of its value; a quantity would suggest it counts more.
        if let Some(q) = event.quantity.filter(|q| q.as_i64() != Some(1)) {
            return Err((
                "quantity",
                format!("quantity {q}: an event of the unique dimension {dimension:?} is one occurrence of its distinct value, so quantity must be absent or 1"),
            ));
        }
        Measure::Unique(value)
    } else {
        if event.distinct.is_some() {
            return Err((
                "distinct",
                format!("distinct is only for unique dimensions; {dimension:?} aggregates by {aggregation}"),
            ));
        }
        let quantity = parse_quantity(event.quantity)?;
        Measure::of(aggregation, quantity).ok_or(("quantity", "no quantity".to_owned()))?
    };
    let tags: TagSet = event.tags.unwrap_or_default().0;
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
        measure,
        id: event.id,
    })
}

/// A quantity: a whole number from 0 to 2147483647.
fn parse_quantity(quantity: Option<serde_json::Number>) -> Result<i64, (&'static str, String)> {
    let quantity = quantity.ok_or(("quantity", "quantity is required".to_owned()))?;
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
    Ok(quantity)
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
    /// How long a body may take to arrive ([`crate::serve::BODY_READ_TIMEOUT`]).
    pub body_read_timeout: Duration,
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

/// DNS-rebinding guard: the request's authority (its `Host`, or the authority of an
/// absolute-form target) must name loopback or the address we listen on. The authority is
/// parsed strictly (RFC 3986 host and an optional numeric port, nothing else), so names such
/// as `[::1]evil.com` or `127.0.0.1:8377/evil` are refused.
pub fn host_allowed(authority: &str, listen_ip: Option<IpAddr>) -> bool {
    let Some(host) = authority_host(authority) else {
        return false;
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || Some(ip) == listen_ip.filter(|l| !l.is_unspecified()),
        Err(_) => false,
    }
}

/// The host part of `host[:port]` or `[v6][:port]`, or `None` when it is not exactly that.
fn authority_host(authority: &str) -> Option<&str> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest.split_once(']')?;
            v6.parse::<Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (v6, port)
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if let Some(port) = port {
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return None;
        }
    }
    let reg_name = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    (authority.starts_with('[') || reg_name(host)).then_some(host)
}

/// The authority a request names: an absolute-form target's, else its one `Host` header.
/// `Err` when it names two (RFC 9112: 400).
fn request_authority(req: &Request<Incoming>) -> Result<Option<&str>, ()> {
    if let Some(authority) = req.uri().authority() {
        return Ok(Some(authority.as_str()));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(());
    }
    Ok(first.and_then(|h| h.to_str().ok()))
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

    /// OpenMetrics when the scraper accepts it, else the text format 0.0.4 (`crate::metrics`).
    async fn metrics_response(&self, headers: &header::HeaderMap) -> Response<Body> {
        let now = unix_seconds(self.clock.now());
        let health = match self.ledger.stats().await {
            Ok(stats) => {
                self.metrics.observe_ledger(&stats, now);
                let age = unsent_age_seconds(stats.oldest_pending_hour, now);
                MeteringHealth::of(age, &self.config.health)
            }
            Err(_) => MeteringHealth::Degraded,
        };
        self.metrics.observe_health(health);
        self.metrics
            .observe_entitlement(&self.status.entitlement().state);
        self.metrics
            .ledger_writable
            .set(i64::from(self.status.ledger_writable()));
        let dir = self.ledger.path().parent().unwrap_or(self.ledger.path());
        self.metrics.observe_disk(DiskSpace::of(dir));
        let quarantined = crate::ledger::quarantined_ledgers(&self.config.state.dir).len();
        self.metrics
            .ledger_quarantined_files
            .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
        let openmetrics = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        let commits = self.ledger.commit_stats();
        let (body, content_type) = if openmetrics {
            (
                self.metrics.render(commits),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            (
                self.metrics.render_text(commits),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        resp
    }

    async fn post_usage(&self, req: Request<Incoming>) -> Response<Body> {
        let started = std::time::Instant::now();
        let resp = self.post_usage_timed(req).await;
        self.metrics
            .ingest_request_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        resp
    }

    async fn post_usage_timed(&self, req: Request<Incoming>) -> Response<Body> {
        match self.ingest(req).await {
            Ok(resp) => resp,
            Err(rejection) => {
                self.metrics.reject(rejection.reason);
                let mut resp = error_response(&rejection);
                if rejection.status == StatusCode::REQUEST_TIMEOUT {
                    // The rest of the body may still come: do not read it as a next request.
                    resp.headers_mut().insert(
                        header::CONNECTION,
                        header::HeaderValue::from_static("close"),
                    );
                }
                resp
            }
        }
    }

    async fn ingest(&self, req: Request<Incoming>) -> Result<Response<Body>, Rejection> {
        if !self.config.pricing.meters() {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "no_custom_dimensions",
                if self.config.pricing.checks_out() {
                    "this product is priced by contract (pricing = \"contract\"): it has no custom dimensions, so meterd takes no usage; pricing = \"contract+custom\" meters dimensions as well"
                } else {
                    "this product is priced per task or pod hour (pricing = \"hourly\"): it has no custom dimensions, so meterd takes no usage; AWS meters the hours itself"
                },
            ));
        }
        if !self.accepting.load(Ordering::Acquire) {
            return Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "meterd is shutting down; retry against the next instance",
            ));
        }
        let body = self.json_body(req).await?;
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
            Err(e @ LedgerError::DistinctCapExceeded { .. }) => Err(Rejection::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "distinct_cap",
                format!("{e}; counts already accepted are unchanged, and the next hour takes new values again"),
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
    async fn entitlements(&self) -> Response<Body> {
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
    async fn floating(&self, req: Request<Incoming>, checkout: bool) -> Response<Body> {
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

    async fn status(&self) -> Response<Body> {
        let now = unix_seconds(self.clock.now());
        let ledger = self.ledger.stats().await;
        // A ledger that cannot be read shows no proof that usage is going out: degraded.
        let (health, unsent_seconds) = match &ledger {
            Ok(s) => {
                let age = unsent_age_seconds(s.oldest_pending_hour, now);
                (MeteringHealth::of(age, &self.config.health), Some(age))
            }
            Err(_) => (MeteringHealth::Degraded, None),
        };
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
                "pricing": self.config.pricing,
                "platform": self.status.platform,
                "ready": self.status.is_ready(),
                "metering_health": health,
                "oldest_unsent_age_seconds": unsent_seconds,
                "entitlement": self.status.entitlement(),
                "open_hour": rfc3339(self.ledger.open_hour(now)),
                "first_start": rfc3339(identity.first_start),
                "records": records,
                "sender": self.status.sender(),
                "sending": {
                    "spread_seconds": self.config.sending.spread.as_secs_f64(),
                    "offset_seconds": crate::send::spread_offset(&identity.instance_id, self.config.sending.spread).as_secs_f64(),
                    "max_calls_per_second": self.config.sending.max_calls_per_second,
                },
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

fn bearer_matches(headers: &header::HeaderMap, token: &[u8]) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    // RFC 9110: the scheme name is case-insensitive.
    let value = value.as_bytes();
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"Bearer ") && bool::from(given.ct_eq(token))
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
            ..Vocabulary::default()
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
        assert_eq!(one[0].measure, Measure::Sum(3));
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
            ("{not json", "malformed_json", "key must be a string"),
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
            (r#"{"events":[]}"#, "batch_size", "1 to 10000 events, got 0"),
            (
                r#"{"dimension":"requests","quantity":1,"tags":{"tenant":"a","tenant":"b"}}"#,
                "malformed_json",
                "tag key \"tenant\" is given twice",
            ),
            (
                r#"{"events":[{"dimension":"requests","quantity":1,"tags":{"tenant":"a","tenant":"a"}}]}"#,
                "malformed_json",
                "given twice",
            ),
            (
                r#"{"dimension":"requests","quantity":1,"quantity":2}"#,
                "malformed_json",
                "duplicate field",
            ),
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

    fn agg_vocab() -> Vocabulary {
        let names = ["requests", "peak", "hosts", "users", "pods"];
        Vocabulary {
            dimensions: names.iter().map(|s| s.to_string()).collect(),
            tag_keys: ["tenant"].iter().map(|s| s.to_string()).collect(),
            aggregation: [
                ("peak", Aggregation::Max),
                ("hosts", Aggregation::Last),
                ("users", Aggregation::Unique),
            ]
            .map(|(d, a)| (d.to_owned(), a))
            .into(),
            heartbeat: ["pods".to_owned()].into(),
        }
    }

    #[test]
    fn each_aggregation_gets_its_measure_and_distinct_is_only_for_unique() {
        let events = parse_usage(
            br#"{"events":[
                {"dimension":"requests","quantity":3},
                {"dimension":"peak","quantity":9},
                {"dimension":"hosts","quantity":4},
                {"dimension":"users","distinct":"alice","tags":{"tenant":"a"}},
                {"dimension":"users","distinct":"bob","quantity":1,"id":"e1"}]}"#,
            &agg_vocab(),
        )
        .expect("valid");
        let measures: Vec<&Measure> = events.iter().map(|e| &e.measure).collect();
        assert_eq!(
            measures,
            [
                &Measure::Sum(3),
                &Measure::Max(9),
                &Measure::Last(4),
                &Measure::Unique("alice".into()),
                &Measure::Unique("bob".into())
            ]
        );
        let single = parse_usage(br#"{"dimension":"users","distinct":"carol"}"#, &agg_vocab())
            .expect("a single unique event");
        assert_eq!(single[0].measure, Measure::Unique("carol".into()));
        let long = "x".repeat(DISTINCT_MAX_CHARS + 1);
        let ok = "é".repeat(DISTINCT_MAX_CHARS);
        parse_usage(
            format!(r#"{{"dimension":"users","distinct":"{ok}"}}"#).as_bytes(),
            &agg_vocab(),
        )
        .expect("256 characters");
        let cases = [
            (
                r#"{"dimension":"users"}"#.to_owned(),
                "distinct",
                "distinct is required",
            ),
            (
                r#"{"dimension":"users","quantity":1}"#.to_owned(),
                "distinct",
                "distinct is required",
            ),
            (
                r#"{"dimension":"users","distinct":""}"#.to_owned(),
                "distinct",
                "1 to 256 characters, got 0",
            ),
            (
                format!(r#"{{"dimension":"users","distinct":"{long}"}}"#),
                "distinct",
                "got 257",
            ),
            (
                r#"{"dimension":"users","distinct":"a","quantity":2}"#.to_owned(),
                "quantity",
                "must be absent or 1",
            ),
            (
                r#"{"dimension":"users","distinct":"a","quantity":0}"#.to_owned(),
                "quantity",
                "must be absent or 1",
            ),
            (
                r#"{"dimension":"requests","quantity":1,"distinct":"a"}"#.to_owned(),
                "distinct",
                "only for unique dimensions; \"requests\" aggregates by sum",
            ),
            (
                r#"{"dimension":"peak","quantity":1,"distinct":"a"}"#.to_owned(),
                "distinct",
                "aggregates by max",
            ),
            (r#"{"dimension":"peak"}"#.to_owned(), "quantity", "required"),
            (
                r#"{"dimension":"hosts","quantity":-1}"#.to_owned(),
                "quantity",
                "negative",
            ),
            (
                r#"{"dimension":"pods","quantity":1}"#.to_owned(),
                "dimension",
                "\"pods\" is recorded by meterd itself",
            ),
        ];
        for (body, field, needle) in cases {
            let r = parse_usage(body.as_bytes(), &agg_vocab()).expect_err(&body);
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(r.details[0].field, field, "{body}: {r:?}");
            assert!(r.details[0].problem.contains(needle), "{body}: {r:?}");
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
    fn the_bearer_scheme_is_case_insensitive() {
        let token = b"s3cret";
        let matches = |value: &str| {
            let req = Request::builder()
                .header(header::AUTHORIZATION, value)
                .body(())
                .expect("request");
            bearer_matches(req.headers(), token)
        };
        for ok in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "bEaReR s3cret",
        ] {
            assert!(matches(ok), "{ok}");
        }
        for bad in [
            "Bearer s3cre",
            "Bearer  s3cret",
            "Basic s3cret",
            "Bearers3cret",
            "Bear",
            "",
        ] {
            assert!(!matches(bad), "{bad}");
        }
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
            assert!(host_allowed(ok, None), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8377",
            "10.0.0.1:8377",
            "0.0.0.0:8377",
            "",
            // Strict authority: a host and an optional numeric port, nothing else.
            "[::1]evil.com",
            "[::1].evil.com",
            "[::1]:8377evil",
            "127.0.0.1:18377/evil",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:+80",
            "localhost:80:80",
            "localhost@evil.example",
            "user@localhost",
            "[localhost]",
            "local host",
        ] {
            assert!(!host_allowed(bad, None), "{bad}");
        }
        let pod_ip: IpAddr = "10.1.2.3".parse().expect("ip");
        assert!(host_allowed("10.1.2.3:8377", Some(pod_ip)));
    }
}
