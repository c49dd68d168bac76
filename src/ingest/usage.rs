//! `POST /v1/usage` (timed, validated, acknowledged after the ledger's fsync) and `GET /v1/usage/current`.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::clock::{rfc3339, unix_seconds};
use crate::ledger::LedgerError;

use super::{error_response, json_response, parse_usage, Api, Body, Rejection};

impl Api {
    pub(super) async fn post_usage(&self, req: Request<Incoming>) -> Response<Body> {
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

    pub(super) async fn current_usage(&self) -> Response<Body> {
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
}
