//! Prometheus metrics. Names follow `meterd_<noun>_<unit>_total`; labels stay low-cardinality
//! (a reason or an error code, never a tag value or a customer).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::ledger::CommitStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: String,
}

pub struct Metrics {
    registry: Registry,
    pub events_accepted: Counter,
    pub events_duplicate: Counter,
    pub requests_rejected: Family<Reason, Counter>,
    pub ledger_errors: Family<Reason, Counter>,
    pub ledger_commits: Counter,
    pub ledger_commands: Counter,
    pub ledger_commit_seconds: Counter<f64, AtomicU64>,
    pub ledger_checkpoints: Counter,
    pub ledger_checkpoint_failures: Counter,
    pub ledger_wal_pages: Gauge,
    pub records_sealed: Counter,
    pub records_sent: Counter,
    pub send_failures: Family<Code, Counter>,
    pub records_dead_lettered: Counter,
    pub records_duplicate: Counter,
    pub tag_sets_folded: Counter,
    pub records_pending: Gauge,
    pub entitled: Gauge,
    pub public_key_rotation_timestamp_seconds: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            events_accepted: Counter::default(),
            events_duplicate: Counter::default(),
            requests_rejected: Family::default(),
            ledger_errors: Family::default(),
            ledger_commits: Counter::default(),
            ledger_commands: Counter::default(),
            ledger_commit_seconds: Counter::default(),
            ledger_checkpoints: Counter::default(),
            ledger_checkpoint_failures: Counter::default(),
            ledger_wal_pages: Gauge::default(),
            records_sealed: Counter::default(),
            records_sent: Counter::default(),
            send_failures: Family::default(),
            records_dead_lettered: Counter::default(),
            records_duplicate: Counter::default(),
            tag_sets_folded: Counter::default(),
            records_pending: Gauge::default(),
            entitled: Gauge::default(),
            public_key_rotation_timestamp_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "meterd_events_accepted",
            "Usage events counted",
            m.events_accepted.clone(),
        );
        registry.register(
            "meterd_events_duplicate",
            "Usage events acknowledged again by id but not counted",
            m.events_duplicate.clone(),
        );
        registry.register(
            "meterd_requests_rejected",
            "Ingest requests refused, by reason",
            m.requests_rejected.clone(),
        );
        registry.register(
            "meterd_ledger_errors",
            "Ledger writes that failed, by reason",
            m.ledger_errors.clone(),
        );
        registry.register(
            "meterd_ledger_commits",
            "Ledger transactions committed (one fsync each)",
            m.ledger_commits.clone(),
        );
        registry.register(
            "meterd_ledger_commands",
            "Ledger commands applied (requests, seals, deliveries)",
            m.ledger_commands.clone(),
        );
        registry.register(
            "meterd_ledger_commit_seconds",
            "Time spent committing ledger transactions, fsync included",
            m.ledger_commit_seconds.clone(),
        );
        registry.register(
            "meterd_ledger_checkpoints",
            "WAL checkpoints run by the ledger writer",
            m.ledger_checkpoints.clone(),
        );
        registry.register(
            "meterd_ledger_checkpoint_failures",
            "WAL checkpoints that failed (commits stay durable in the WAL; the WAL grows)",
            m.ledger_checkpoint_failures.clone(),
        );
        registry.register(
            "meterd_ledger_wal_pages",
            "Pages in the ledger's write-ahead log after the last commit",
            m.ledger_wal_pages.clone(),
        );
        registry.register(
            "meterd_records_sealed",
            "Dimension-hour records sealed",
            m.records_sealed.clone(),
        );
        registry.register(
            "meterd_records_sent",
            "Records confirmed by MeterUsage",
            m.records_sent.clone(),
        );
        registry.register(
            "meterd_send_failures",
            "MeterUsage attempts that failed, by error code",
            m.send_failures.clone(),
        );
        registry.register(
            "meterd_records_dead_lettered",
            "Records given up after the 6-hour window",
            m.records_dead_lettered.clone(),
        );
        registry.register(
            "meterd_records_duplicate",
            "Records refused by the service as duplicates",
            m.records_duplicate.clone(),
        );
        registry.register(
            "meterd_tag_sets_folded",
            "Tag sets folded into the untagged bucket at max_allocations",
            m.tag_sets_folded.clone(),
        );
        registry.register(
            "meterd_records_pending",
            "Sealed records not yet confirmed",
            m.records_pending.clone(),
        );
        registry.register(
            "meterd_entitled",
            "1 once RegisterUsage (or the DryRun check) passed",
            m.entitled.clone(),
        );
        registry.register(
            "meterd_public_key_rotation_timestamp_seconds",
            "PublicKeyRotationTimestamp from RegisterUsage; 0 when the key version is current",
            m.public_key_rotation_timestamp_seconds.clone(),
        );
        Metrics { registry, ..m }
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

    pub fn send_failure(&self, code: &str) {
        self.send_failures
            .get_or_create(&Code {
                code: code.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_total_suffix_and_labels() {
        let m = Metrics::new();
        m.events_accepted.inc_by(3);
        m.reject("unknown_dimension");
        let stats = CommitStats::default();
        stats.commit_nanos.store(1_500_000_000, Ordering::Relaxed);
        stats.checkpoints.store(4, Ordering::Relaxed);
        stats.wal_pages.store(17, Ordering::Relaxed);
        let text = m.render(&stats);
        assert!(text.contains("meterd_ledger_checkpoints_total 4"), "{text}");
        assert!(text.contains("meterd_ledger_wal_pages 17"), "{text}");
        assert!(
            text.contains("meterd_ledger_commit_seconds_total 1.5"),
            "{text}"
        );
        assert!(text.contains("meterd_events_accepted_total 3"), "{text}");
        assert!(
            text.contains("meterd_requests_rejected_total{reason=\"unknown_dimension\"} 1"),
            "{text}"
        );
    }
}
