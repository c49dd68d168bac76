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

#[test]
fn text_format_names_each_counter_by_its_samples_and_drops_openmetrics_lines() {
    let m = Metrics::new();
    m.record_sent("requests", 7);
    m.observe_ledger(
        &LedgerStats {
            pending: 2,
            oldest_pending_hour: Some(7200),
            last_sent_at: Some(5000),
            ..LedgerStats::default()
        },
        90,
    );
    let text = m.render_text(&CommitStats::default());
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE meterd_records_sent_total counter\n"),
        "{text}"
    );
    assert!(text.contains("# HELP meterd_records_sent_total "), "{text}");
    assert!(
        text.contains("# TYPE meterd_records_pending gauge\n"),
        "{text}"
    );
    assert!(
        text.contains("meterd_usage_units_sent_total{dimension=\"requests\"} 7"),
        "{text}"
    );
    assert!(
        text.contains("meterd_aws_calls_total{operation=\"MeterUsage\",outcome=\"success\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("meterd_ledger_records{state=\"pending\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("meterd_ledger_records{state=\"dead\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("meterd_oldest_unsent_record_age_seconds 90"),
        "{text}"
    );
    assert!(
        text.contains("meterd_last_successful_send_timestamp_seconds 5000"),
        "{text}"
    );
    assert!(
        text.contains("meterd_entitlement_state{state=\"pending\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("meterd_entitlement_state{state=\"entitled\"} 0"),
        "{text}"
    );
    // Every sample line belongs to the family declared just before it.
    let mut family = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap_or_default().to_owned();
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| *b == family)
                .unwrap_or(name);
            assert_eq!(base, family, "{line}");
        }
    }
}

#[test]
fn unsent_age_counts_from_when_the_oldest_pending_record_fell_due() {
    let none = Duration::ZERO;
    assert_eq!(unsent_age_seconds(None, none, 10_000), 0);
    assert_eq!(unsent_age_seconds(Some(3600), none, 7200), 0);
    assert_eq!(unsent_age_seconds(Some(3600), none, 7000), 0);
    assert_eq!(unsent_age_seconds(Some(3600), none, 7260), 60);
    // Held back for a 45-minute offset in the spread: not late until 45 minutes past the close.
    let offset = Duration::from_secs(2700);
    assert_eq!(unsent_age_seconds(Some(3600), offset, 7200 + 2700), 0);
    assert_eq!(unsent_age_seconds(Some(3600), offset, 7200 + 2760), 60);
    assert_eq!(
        unsent_age_seconds(Some(i64::MAX), offset, 0),
        0,
        "no overflow"
    );
}

/// Every series name the agent exports: each family's samples (`_total` for a counter,
/// `_bucket`, `_sum` and `_count` for a histogram).
fn exported_names() -> HashSet<String> {
    let mut names = HashSet::new();
    for line in Metrics::new().render_text(&CommitStats::default()).lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
        if kind == "histogram" {
            for s in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{s}"));
            }
        } else {
            names.insert(name.to_owned());
        }
    }
    names
}

/// `meterd_…` identifiers in a text (a PromQL expression, a dashboard, a rules file).
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("meterd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let before = rest[..i].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let exported = exported_names();
    assert!(
        exported.contains("meterd_records_sent_total"),
        "{exported:?}"
    );
    assert!(exported.contains("meterd_ingest_request_duration_seconds_bucket"));
    assert!(
        !exported.contains("meterd_records_sent"),
        "a counter is named by its samples"
    );
    let dashboard = include_str!("../../deploy/grafana/meterd-dashboard.json");
    let rules = include_str!("../../helm/meterd/files/prometheus-rules.yaml");
    let json: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for panel in panels {
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .collect();
        assert!(
            exprs.iter().any(|e| !metric_names(e).is_empty()),
            "panel {} queries no meterd metric",
            panel["title"]
        );
    }
    for (what, text) in [("dashboard", dashboard), ("alert rules", rules)] {
        let named = metric_names(text);
        assert!(!named.is_empty(), "{what}");
        for name in named {
            assert!(
                exported.contains(&name),
                "the {what} name {name}, which the agent does not export"
            );
        }
    }
    assert_eq!(
        metric_names("x{a=\"b\"} + meterd_a_total/meterd_b"),
        ["meterd_a_total", "meterd_b"]
    );
    assert!(metric_names("not_meterd_x").is_empty());
}
