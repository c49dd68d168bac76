//! `POST /v1/usage` (timed, validated, acknowledged after the ledger's fsync) and `GET /v1/usage/current`.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::clock::{rfc3339, unix_seconds};
use crate::ledger::LedgerError;
use crate::model::UsageRow;

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

    /// The open hour's counters as `{"hour": …, "usage": [{"dimension", "quantity", "tags"}, …]}`,
    /// each row written into the answer as the reader steps through it ([`UsageJson`]).
    pub(super) async fn current_usage(&self) -> Response<Body> {
        let hour = self.ledger.open_hour(unix_seconds(self.clock.now()));
        let body = UsageJson::new(&rfc3339(hour));
        match self
            .ledger
            .fold_usage_of_hour(hour, body, |body, row| body.push(&row))
            .await
        {
            Ok(body) => {
                let mut resp = Response::new(Full::new(Bytes::from(body.finish())));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": e.to_string(), "details": []}),
            ),
        }
    }
}

/// The answer of `GET /v1/usage/current`, written a row at a time: the same bytes as
/// serializing `json!({"hour": …, "usage": [{"dimension", "tags", "quantity"}, …]})` (keys in
/// sorted order, serde_json's escaping), without a `serde_json::Value` per row. With 10,000
/// tag sets the rows and their `Value`s held about 35 MB at once, the agent's peak RSS; the
/// text itself is about 62 bytes a row.
struct UsageJson {
    out: Vec<u8>,
    rows: usize,
}

impl UsageJson {
    fn new(hour: &str) -> Self {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(br#"{"hour":"#);
        write_json(&mut out, hour);
        out.extend_from_slice(br#","usage":["#);
        Self { out, rows: 0 }
    }

    fn push(&mut self, row: &UsageRow) {
        if self.rows > 0 {
            self.out.push(b',');
        }
        self.rows += 1;
        self.out.extend_from_slice(br#"{"dimension":"#);
        write_json(&mut self.out, &row.dimension);
        self.out.extend_from_slice(br#","quantity":"#);
        self.out
            .extend_from_slice(row.quantity.to_string().as_bytes());
        self.out.extend_from_slice(br#","tags":"#);
        write_json(&mut self.out, &row.tags);
        self.out.push(b'}');
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(b"]}");
        self.out
    }
}

/// Strings and string maps always serialize; writing into a `Vec` cannot fail.
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        debug_assert!(false, "serializing a string or a tag set failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Aggregation, TagSet};

    fn row(dimension: &str, tags: &[(&str, &str)], quantity: i64) -> UsageRow {
        UsageRow {
            dimension: dimension.to_owned(),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<TagSet>(),
            quantity,
            aggregation: Aggregation::Sum,
            seq: 0,
        }
    }

    /// The rendering this answer had before it was streamed: a `json!` map per row.
    fn as_values(hour: &str, rows: &[UsageRow]) -> String {
        let usage: Vec<_> = rows
            .iter()
            .map(|r| json!({"dimension": r.dimension, "tags": r.tags, "quantity": r.quantity}))
            .collect();
        json!({"hour": hour, "usage": usage}).to_string()
    }

    fn streamed(hour: &str, rows: &[UsageRow]) -> String {
        let mut body = UsageJson::new(hour);
        for r in rows {
            body.push(r);
        }
        String::from_utf8(body.finish()).expect("utf-8")
    }

    #[test]
    fn the_streamed_answer_is_byte_for_byte_the_json_map_answer() {
        let hour = "2026-12-04T20:00:00Z";
        let cases: Vec<Vec<UsageRow>> = vec![
            vec![],
            vec![row("dim01", &[], 0)],
            vec![
                row("dim01", &[("tenant", "acme")], 3),
                row("dim01", &[("tenant", "t\"q\\\u{1}é"), ("a", "z")], -7),
                row("dim\u{7f}02", &[("b", ""), ("a", "x\ny")], i64::MAX),
            ],
        ];
        for rows in &cases {
            let got = streamed(hour, rows);
            assert_eq!(got, as_values(hour, rows));
            let parsed: serde_json::Value = serde_json::from_str(&got).expect("valid JSON");
            assert_eq!(parsed["usage"].as_array().map(Vec::len), Some(rows.len()));
        }
    }
}
