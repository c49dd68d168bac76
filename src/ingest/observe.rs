//! The read-only state: `/metrics`, `/v1/status` and `/readyz`.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::clock::{rfc3339, unix_seconds};
use crate::metrics::{unsent_age_seconds, DiskSpace};
use crate::status::MeteringHealth;

use super::{json_response, Api, Body};

impl Api {
    /// How overdue the oldest unsent record is ([`unsent_age_seconds`]).
    fn unsent_age(&self, stats: &crate::ledger::LedgerStats, now: i64) -> i64 {
        unsent_age_seconds(stats.oldest_pending_hour, self.send_offset, now)
    }

    /// OpenMetrics when the scraper accepts it, else the text format 0.0.4 (`crate::metrics`).
    pub(super) async fn metrics_response(&self, headers: &header::HeaderMap) -> Response<Body> {
        let now = unix_seconds(self.clock.now());
        let health = match self.ledger.stats().await {
            Ok(stats) => {
                let age = self.unsent_age(&stats, now);
                self.metrics.observe_ledger(&stats, age);
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
    pub(super) async fn status(&self) -> Response<Body> {
        let now = unix_seconds(self.clock.now());
        let ledger = self.ledger.stats().await;
        // A ledger that cannot be read shows no proof that usage is going out: degraded.
        let (health, unsent_seconds) = match &ledger {
            Ok(s) => {
                let age = self.unsent_age(s, now);
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
                    "offset_seconds": self.send_offset.as_secs_f64(),
                    "max_calls_per_second": self.config.sending.max_calls_per_second,
                },
                "ledger": ledger_json,
            }),
        )
    }

    pub(super) fn readyz(&self) -> Response<Body> {
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
