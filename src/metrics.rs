//! Prometheus metrics.
//!
//! Naming rule (checked by `promtool check metrics` in CI, `scripts/prometheus-checks.sh`):
//! `meterd_<noun>[_<unit>]`, with the unit in base units (`_seconds`, `_bytes`) whenever the
//! value has one, `_timestamp_seconds` for a Unix time, and `_total` on counters only (the
//! encoder adds it). A gauge that counts things (`meterd_ledger_records`) has no unit; a gauge
//! that is 0 or 1 says whether something holds (`meterd_entitled`, `meterd_ledger_writable`),
//! and a family of them has exactly one series at 1 (`meterd_entitlement_state`,
//! `meterd_metering_health`). Labels stay low-cardinality: a state, an operation, an outcome or
//! error code, a configured dimension; never a tag value or a customer.
//!
//! When gauges change: the ledger's (records by state, `meterd_records_pending`, the unsent
//! age, the last send, sizes, free space, quarantined files, writability) and the health and
//! entitlement-state families are read afresh on each scrape; `meterd_records_pending` is also
//! set by the send loop; `meterd_ledger_wal_pages` and the writer's counters are copied from the
//! ledger writer at each scrape; `meterd_entitled` and
//! `meterd_public_key_rotation_timestamp_seconds` are set by the start-up entitlement check
//! (and its retries) and not cleared.
//!
//! `/metrics` answers OpenMetrics to a scraper that asks for it (Prometheus does) and the
//! classic text format 0.0.4 otherwise ([`Metrics::render_text`]), which is what `promtool`
//! and `curl` read.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::clock::HOUR_SECS;
use crate::entitlement::EntitlementState;
use crate::ledger::{CommitStats, LedgerStats};
use crate::status::MeteringHealth;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Level {
    pub level: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Call {
    pub operation: String,
    /// `success`, the service's error code, or `transport`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DimensionLabel {
    pub dimension: String,
}

/// Every entitlement state, so that each has a series (0 or 1).
const ENTITLEMENT_STATES: [EntitlementState; 5] = [
    EntitlementState::Pending,
    EntitlementState::Entitled,
    EntitlementState::PermissionsVerified,
    EntitlementState::Unverified,
    EntitlementState::Failed,
];
const RECORD_STATES: [&str; 4] = ["pending", "sent", "dead", "duplicate"];

/// Space on the file system that holds the ledger.
#[derive(Debug, Clone, Copy)]
pub struct DiskSpace {
    pub avail_bytes: u64,
    pub size_bytes: u64,
}

impl DiskSpace {
    /// `statvfs` of `path`; `None` when it cannot be read.
    pub fn of(path: &std::path::Path) -> Option<DiskSpace> {
        let s = rustix::fs::statvfs(path).ok()?;
        Some(DiskSpace {
            avail_bytes: s.f_bavail.saturating_mul(s.f_frsize),
            size_bytes: s.f_blocks.saturating_mul(s.f_frsize),
        })
    }
}

/// Seconds since the oldest unsent record fell due: its hour's close plus this agent's spread
/// `offset` (before that, holding it back is the plan, not a delay). 0 when nothing is pending.
pub fn unsent_age_seconds(oldest_pending_hour: Option<i64>, offset: Duration, now: i64) -> i64 {
    let offset = i64::try_from(offset.as_secs()).unwrap_or(i64::MAX);
    oldest_pending_hour.map_or(0, |hour| {
        now.saturating_sub(hour.saturating_add(HOUR_SECS).saturating_add(offset))
            .max(0)
    })
}

pub struct Metrics {
    registry: Registry,
    pub events_accepted: Counter,
    pub events_duplicate: Counter,
    pub requests_rejected: Family<Reason, Counter>,
    pub ingest_request_duration_seconds: Histogram,
    pub ledger_errors: Family<Reason, Counter>,
    pub ledger_commits: Counter,
    pub ledger_commands: Counter,
    pub ledger_commit_seconds: Counter<f64, AtomicU64>,
    pub ledger_checkpoints: Counter,
    pub ledger_checkpoint_failures: Counter,
    pub ledger_wal_pages: Gauge,
    pub ledger_writable: Gauge,
    pub ledger_size_bytes: Gauge,
    pub ledger_filesystem_avail_bytes: Gauge,
    pub ledger_filesystem_size_bytes: Gauge,
    pub ledger_records: Family<State, Gauge>,
    pub ledger_quarantined_files: Gauge,
    pub records_sealed: Counter,
    pub records_sent: Counter,
    pub usage_units_sent: Family<DimensionLabel, Counter>,
    pub send_failures: Family<Code, Counter>,
    pub records_dead_lettered: Counter,
    pub records_duplicate: Counter,
    pub tag_sets_folded: Counter,
    pub records_pending: Gauge,
    pub oldest_unsent_record_age_seconds: Gauge,
    pub last_successful_send_timestamp_seconds: Gauge,
    pub aws_calls: Family<Call, Counter>,
    pub metering_health: Family<Level, Gauge>,
    pub entitled: Gauge,
    pub entitlement_state: Family<State, Gauge>,
    pub public_key_rotation_timestamp_seconds: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            events_accepted: Counter::default(),
            events_duplicate: Counter::default(),
            requests_rejected: Family::default(),
            ingest_request_duration_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            ledger_errors: Family::default(),
            ledger_commits: Counter::default(),
            ledger_commands: Counter::default(),
            ledger_commit_seconds: Counter::default(),
            ledger_checkpoints: Counter::default(),
            ledger_checkpoint_failures: Counter::default(),
            ledger_wal_pages: Gauge::default(),
            ledger_writable: Gauge::default(),
            ledger_size_bytes: Gauge::default(),
            ledger_filesystem_avail_bytes: Gauge::default(),
            ledger_filesystem_size_bytes: Gauge::default(),
            ledger_records: Family::default(),
            ledger_quarantined_files: Gauge::default(),
            records_sealed: Counter::default(),
            records_sent: Counter::default(),
            usage_units_sent: Family::default(),
            send_failures: Family::default(),
            records_dead_lettered: Counter::default(),
            records_duplicate: Counter::default(),
            tag_sets_folded: Counter::default(),
            records_pending: Gauge::default(),
            oldest_unsent_record_age_seconds: Gauge::default(),
            last_successful_send_timestamp_seconds: Gauge::default(),
            aws_calls: Family::default(),
            metering_health: Family::default(),
            entitled: Gauge::default(),
            entitlement_state: Family::default(),
            public_key_rotation_timestamp_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "meterd_events_accepted",
            "Usage events counted",
            m.events_accepted.clone(),
        );
        r.register(
            "meterd_events_duplicate",
            "Usage events acknowledged again by id but not counted",
            m.events_duplicate.clone(),
        );
        r.register(
            "meterd_requests_rejected",
            "Ingest requests refused, by reason",
            m.requests_rejected.clone(),
        );
        r.register(
            "meterd_ingest_request_duration_seconds",
            "Time to answer POST /v1/usage, the ledger commit included",
            m.ingest_request_duration_seconds.clone(),
        );
        r.register(
            "meterd_ledger_errors",
            "Ledger writes that failed, by reason",
            m.ledger_errors.clone(),
        );
        r.register(
            "meterd_ledger_commits",
            "Ledger transactions committed (one fsync each); a failed commit is not counted",
            m.ledger_commits.clone(),
        );
        r.register(
            "meterd_ledger_commands",
            "Ledger commands the writer ran (requests, seals, deliveries), those of a failed commit included",
            m.ledger_commands.clone(),
        );
        r.register(
            "meterd_ledger_commit_seconds",
            "Time spent committing ledger transactions, fsync included (failed commits too)",
            m.ledger_commit_seconds.clone(),
        );
        r.register(
            "meterd_ledger_checkpoints",
            "WAL checkpoints run by the ledger writer",
            m.ledger_checkpoints.clone(),
        );
        r.register(
            "meterd_ledger_checkpoint_failures",
            "WAL checkpoints that failed (commits stay durable in the WAL; the WAL grows)",
            m.ledger_checkpoint_failures.clone(),
        );
        r.register(
            "meterd_ledger_wal_pages",
            "Pages in the ledger's write-ahead log after the last commit",
            m.ledger_wal_pages.clone(),
        );
        r.register(
            "meterd_ledger_writable",
            "1 while the ledger's last write succeeded; 0 after a failed write (readiness is off)",
            m.ledger_writable.clone(),
        );
        r.register(
            "meterd_ledger_size_bytes",
            "Size of the ledger file and its write-ahead log",
            m.ledger_size_bytes.clone(),
        );
        r.register(
            "meterd_ledger_filesystem_avail_bytes",
            "Bytes available to the agent on the file system holding the ledger",
            m.ledger_filesystem_avail_bytes.clone(),
        );
        r.register(
            "meterd_ledger_filesystem_size_bytes",
            "Size of the file system holding the ledger",
            m.ledger_filesystem_size_bytes.clone(),
        );
        r.register(
            "meterd_ledger_records",
            "Sealed records kept in the ledger, by delivery state (pending, sent, dead, duplicate)",
            m.ledger_records.clone(),
        );
        r.register(
            "meterd_ledger_quarantined_files",
            "Quarantined (damaged, moved aside) ledgers in the state directory; their unsent usage needs recovery",
            m.ledger_quarantined_files.clone(),
        );
        r.register(
            "meterd_records_sealed",
            "Dimension-hour records sealed",
            m.records_sealed.clone(),
        );
        r.register(
            "meterd_records_sent",
            "Records confirmed by MeterUsage",
            m.records_sent.clone(),
        );
        r.register(
            "meterd_usage_units_sent",
            "Units confirmed by MeterUsage, by dimension",
            m.usage_units_sent.clone(),
        );
        r.register(
            "meterd_send_failures",
            "MeterUsage attempts that failed, by error code",
            m.send_failures.clone(),
        );
        r.register(
            "meterd_records_dead_lettered",
            "Records given up after the 6-hour window",
            m.records_dead_lettered.clone(),
        );
        r.register(
            "meterd_records_duplicate",
            "Records refused by the service as duplicates",
            m.records_duplicate.clone(),
        );
        r.register(
            "meterd_tag_sets_folded",
            "Tag sets folded into the untagged bucket at max_allocations",
            m.tag_sets_folded.clone(),
        );
        r.register(
            "meterd_records_pending",
            "Sealed records not yet confirmed",
            m.records_pending.clone(),
        );
        r.register(
            "meterd_oldest_unsent_record_age_seconds",
            "Seconds since the oldest unsent record fell due (its hour's close plus the spread offset); 0 when nothing is pending",
            m.oldest_unsent_record_age_seconds.clone(),
        );
        r.register(
            "meterd_last_successful_send_timestamp_seconds",
            "Unix time of the last record confirmed by MeterUsage (from the ledger); 0 if none",
            m.last_successful_send_timestamp_seconds.clone(),
        );
        r.register(
            "meterd_aws_calls",
            "Calls to AWS by operation (MeterUsage, RegisterUsage, MeterUsageDryRun, CheckoutLicense) and outcome (success, an error code or class, transport; retried for a checkout retry)",
            m.aws_calls.clone(),
        );
        r.register(
            "meterd_metering_health",
            "1 for the current metering_health level of /v1/status (ok, warn, degraded, failing)",
            m.metering_health.clone(),
        );
        r.register(
            "meterd_entitled",
            "1 once the start-up entitlement check passed (RegisterUsage, the DryRun check, or the contract's license checkout)",
            m.entitled.clone(),
        );
        r.register(
            "meterd_entitlement_state",
            "1 for the current entitlement state, 0 for the others",
            m.entitlement_state.clone(),
        );
        r.register(
            "meterd_public_key_rotation_timestamp_seconds",
            "PublicKeyRotationTimestamp from RegisterUsage; 0 when it gave none (the key version is current) or was not called",
            m.public_key_rotation_timestamp_seconds.clone(),
        );
        for state in RECORD_STATES {
            m.ledger_records
                .get_or_create(&State {
                    state: state.to_owned(),
                })
                .set(0);
        }
        m.observe_entitlement(&EntitlementState::Pending);
        m.observe_health(MeteringHealth::Ok);
        m.ledger_writable.set(1);
        Metrics { registry: r, ..m }
    }

    /// Sets the gauges read from the ledger at scrape time; `unsent_age` from
    /// [`unsent_age_seconds`].
    pub fn observe_ledger(&self, stats: &LedgerStats, unsent_age: i64) {
        self.records_pending.set(stats.pending);
        for (state, n) in
            RECORD_STATES
                .iter()
                .zip([stats.pending, stats.sent, stats.dead, stats.duplicate])
        {
            self.ledger_records
                .get_or_create(&State {
                    state: (*state).to_owned(),
                })
                .set(n);
        }
        self.oldest_unsent_record_age_seconds.set(unsent_age);
        self.last_successful_send_timestamp_seconds
            .set(stats.last_sent_at.unwrap_or(0));
        self.ledger_size_bytes.set(clamp(stats.size_bytes));
    }

    pub fn observe_disk(&self, disk: Option<DiskSpace>) {
        if let Some(d) = disk {
            self.ledger_filesystem_avail_bytes.set(clamp(d.avail_bytes));
            self.ledger_filesystem_size_bytes.set(clamp(d.size_bytes));
        }
    }

    pub fn observe_health(&self, current: MeteringHealth) {
        for level in MeteringHealth::ALL {
            self.metering_health
                .get_or_create(&Level {
                    level: level.as_str().to_owned(),
                })
                .set(i64::from(level == current));
        }
    }

    pub fn observe_entitlement(&self, current: &EntitlementState) {
        for state in ENTITLEMENT_STATES {
            let value = i64::from(&state == current);
            self.entitlement_state
                .get_or_create(&State {
                    state: state.as_str().to_owned(),
                })
                .set(value);
        }
    }

    /// Prometheus text exposition, refreshing counters kept by the ledger writer.
    pub fn render(&self, commits: &CommitStats) -> String {
        self.ledger_commits
            .inner()
            .store(commits.commits.load(Ordering::Relaxed), Ordering::Relaxed);
        self.ledger_commands
            .inner()
            .store(commits.commands.load(Ordering::Relaxed), Ordering::Relaxed);
        self.ledger_checkpoints.inner().store(
            commits.checkpoints.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.ledger_checkpoint_failures.inner().store(
            commits.checkpoint_failures.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.ledger_wal_pages
            .set(i64::try_from(commits.wal_pages.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        let commit_seconds = commits.commit_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        self.ledger_commit_seconds
            .inner()
            .store(commit_seconds.to_bits(), Ordering::Relaxed);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// [`Self::render`] in the text format 0.0.4: a counter's HELP and TYPE name its `_total`
    /// samples, and OpenMetrics' `# UNIT` and `# EOF` lines go.
    pub fn render_text(&self, commits: &CommitStats) -> String {
        to_text_format(&self.render(commits))
    }

    pub fn reject(&self, reason: &str) {
        self.requests_rejected
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn ledger_error(&self, reason: &str) {
        self.ledger_errors
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// One call to the Metering Service and how it ended.
    pub fn call(&self, operation: &str, outcome: &str) {
        self.aws_calls
            .get_or_create(&Call {
                operation: operation.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A MeterUsage attempt that failed with `code`.
    pub fn send_failure(&self, code: &str) {
        self.call("MeterUsage", code);
        self.send_failures
            .get_or_create(&Code {
                code: code.to_owned(),
            })
            .inc();
    }

    /// A record MeterUsage confirmed.
    pub fn record_sent(&self, dimension: &str, quantity: i64) {
        self.call("MeterUsage", "success");
        self.records_sent.inc();
        self.usage_units_sent
            .get_or_create(&DimensionLabel {
                dimension: dimension.to_owned(),
            })
            .inc_by(u64::try_from(quantity).unwrap_or(0));
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_text_format(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
