//! The agent driven in-process against the emulator, with a manual clock shared by both.
#![cfg(feature = "emulator")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use meterd::aws::{build_client, AwsSettings};
use meterd::clock::{Clock, HOUR_SECS};
use meterd::config::Config;
use meterd::emulator::{self, EmulatorConfig, FaultProfile, FaultRule};
use meterd::local_client::{self, Target};

#[path = "agent/fleet.rs"]
mod fleet;
use meterd_test_support as support;

use support::{eventually, Harness, ACCESS_KEY, H0, PATIENCE, PRODUCT};

type Agent = support::InProcessAgent;

fn ev(dimension: &str, quantity: i64, tenant: Option<&str>) -> Value {
    match tenant {
        Some(t) => json!({"dimension": dimension, "quantity": quantity, "tags": {"tenant": t}}),
        None => json!({"dimension": dimension, "quantity": quantity}),
    }
}

fn allocations(r: &emulator::StoredMeterRecord) -> BTreeMap<String, i64> {
    r.allocations
        .iter()
        .map(|a| {
            let name = a
                .tags
                .as_ref()
                .map(|t| {
                    t.iter()
                        .map(|t| format!("{}={}", t.key, t.value))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "-".into());
            (name, a.quantity)
        })
        .collect()
}

/// Faults that throttle `operation` at `rate` (0 to 1).
fn throttling(operation: emulator::Operation, rate: f64) -> FaultProfile {
    FaultProfile::only(
        operation,
        FaultRule {
            throttle_rate: rate,
            ..FaultRule::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hours_two_dimensions_exactly_one_record_each() {
    let h = Harness::new(H0 + 600).await;
    let agent = h.start_agent(h.config("")).await;

    let (status, body) = agent
        .post(json!({"events": [ev("requests", 3, Some("a")), ev("requests", 4, Some("b")), ev("requests", 2, None), ev("gigabytes", 5, None)]}))
        .await;
    assert_eq!(
        (status, body["accepted"].as_i64()),
        (StatusCode::OK, Some(4)),
        "{body}"
    );
    agent.post(ev("requests", 1, Some("a"))).await;

    h.advance_to(H0 + HOUR_SECS + 300);
    eventually("hour 0 billed", PATIENCE, async || h.billed().len() == 2).await;

    agent.post(ev("requests", 7, Some("c"))).await;
    h.advance_to(H0 + 2 * HOUR_SECS + 300);
    eventually("hour 1 billed", PATIENCE, async || h.billed().len() == 4).await;
    // Hour 2 has no usage at all.
    h.advance_to(H0 + 3 * HOUR_SECS + 300);
    eventually("hour 2 billed", PATIENCE, async || h.billed().len() == 6).await;

    let billed = h.billed();
    let get = |hour: i64, d: &str| {
        billed
            .get(&(H0 + hour * HOUR_SECS, d.to_owned()))
            .unwrap_or_else(|| panic!("no record for hour {hour} {d}"))
    };
    let r = get(0, "requests");
    assert_eq!(r.quantity, 10);
    assert_eq!(
        allocations(r),
        BTreeMap::from([
            ("tenant=a".into(), 4),
            ("tenant=b".into(), 4),
            ("-".into(), 2)
        ])
    );
    assert_eq!(
        r.timestamp as i64,
        H0 + 600,
        "timestamp not before the agent first started"
    );
    let g = get(0, "gigabytes");
    assert_eq!(
        (g.quantity, g.allocations.len()),
        (5, 0),
        "no tags: no allocations"
    );
    let r1 = get(1, "requests");
    assert_eq!((r1.quantity, r1.timestamp as i64), (7, H0 + HOUR_SECS));
    assert_eq!(allocations(r1), BTreeMap::from([("tenant=c".into(), 7)]));
    assert_eq!(
        get(1, "gigabytes").quantity,
        0,
        "zero record for an idle dimension"
    );
    for d in ["requests", "gigabytes"] {
        let z = get(2, d);
        assert_eq!(
            (z.quantity, z.allocations.len()),
            (0, 0),
            "zero record for an empty hour"
        );
    }
    let meter_calls = h
        .emulator
        .calls()
        .iter()
        .filter(|c| c.operation == "MeterUsage")
        .count();
    assert_eq!(meter_calls, 6, "one MeterUsage per dimension-hour");
    support::assert_no_meter_usage_errors(&h.emulator);
    // Every record carried a ClientToken.
    assert!(billed
        .values()
        .all(|r| r.client_token.as_deref().is_some_and(|t| t.len() == 64)));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_errors_and_two_hours_down_still_bill_each_hour_once() {
    let h = Harness::new(H0 + 300).await;
    let agent = h.start_agent(h.config("")).await;
    let flaky = FaultRule {
        throttle_rate: 0.5,
        error_rate: 0.2,
        ..FaultRule::default()
    };
    let meter_only =
        |rule: FaultRule| FaultProfile::only(emulator::Operation::MeterUsage, rule).seeded(7);
    h.emulator.set_faults(meter_only(flaky.clone()));

    let mut expected: BTreeMap<(i64, String), i64> = BTreeMap::new();
    for hour in 0..5 {
        let start = H0 + hour * HOUR_SECS;
        // Time passes through every wait, as it would: sealed hours are retried meanwhile.
        h.drive_to(start + 600).await;
        let q = 10 + hour;
        agent
            .post(json!({"events": [ev("requests", q, Some("x")), ev("gigabytes", 1, None)]}))
            .await;
        expected.insert((start, "requests".into()), q);
        expected.insert((start, "gigabytes".into()), 1);
        if hour == 1 {
            // Down for two simulated hours from 01:10, on top of throttling and 500s.
            h.emulator.set_faults(meter_only(FaultRule {
                down_for: Some(Duration::from_secs(2 * 3600)),
                ..flaky.clone()
            }));
        }
    }
    h.advance_to(H0 + 5 * HOUR_SECS + 600);
    // Back-off waits run on the agent's clock: it jumps from one to the next, and hour 0
    // (stamped 00:05) is still inside the six-hour window at the limit.
    h.drive_until("all five hours billed", H0 + 6 * HOUR_SECS, async || {
        h.billed().len() == 10
    })
    .await;
    let billed: BTreeMap<(i64, String), i64> = h
        .billed()
        .into_iter()
        .map(|(k, r)| (k, r.quantity))
        .collect();
    assert_eq!(billed, expected);
    let errors = support::meter_usage_errors(&h.emulator);
    assert!(
        errors.iter().any(|e| e == "ThrottlingException"),
        "faults were injected: {errors:?}"
    );
    assert!(
        errors.iter().any(|e| e == "InternalServiceErrorException"),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .all(|e| e != "DuplicateRequestException" && e != "IdempotencyConflictException"),
        "{errors:?}"
    );
    // The emulator stores a record just before the agent hears back; let the agent settle.
    eventually("nothing pending", PATIENCE, async || {
        agent.get("/v1/status").await.1["records"]["pending"] == 0
    })
    .await;
    let (_, status) = agent.get("/v1/status").await;
    assert_eq!(status["records"]["sent"], 10, "{status}");
    assert_eq!(status["records"]["dead_letter"], 0, "{status}");
    // The final flush of the open hour still meets the faults: its retries run on the clock.
    h.stop_while_refused(agent.stop(), Duration::from_secs(10))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_past_the_six_hour_window_is_dead_lettered_and_visible() {
    let h = Harness::new(H0 + 300).await;
    let agent = h.start_agent(h.config("")).await;
    h.emulator.set_faults(FaultProfile::only(
        emulator::Operation::MeterUsage,
        FaultRule::down(Duration::from_secs(8 * 3600)),
    ));
    agent.post(ev("requests", 42, None)).await;
    h.advance_to(H0 + HOUR_SECS + 60);
    eventually("first failed attempt", PATIENCE, async || {
        !support::meter_usage_errors(&h.emulator).is_empty()
    })
    .await;
    // Six hours after the record's timestamp (00:05), it can no longer be reported.
    h.advance_to(H0 + 300 + 6 * HOUR_SECS + 60);
    let dead = || async {
        let (_, status) = agent.get("/v1/status").await;
        status["records"]["dead_letter"].as_i64().unwrap_or(0)
    };
    // The retry after the jump waits its back-off on the agent's clock.
    h.drive_until(
        "hour 0 dead-lettered",
        H0 + 300 + 7 * HOUR_SECS,
        async || dead().await >= 2,
    )
    .await;
    let (_, metrics) = agent.get("/metrics").await;
    let text = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains("meterd_records_dead_lettered_total 2"),
        "{text}"
    );
    let records = agent
        .handles
        .ledger
        .recent_records(100)
        .await
        .expect("records");
    let lost: Vec<_> = records.iter().filter(|r| r.hour == H0).collect();
    assert_eq!(lost.len(), 2);
    assert!(lost
        .iter()
        .all(|r| r.state == meterd::ledger::RecordState::Dead && r.last_error.is_some()));
    assert_eq!(
        lost.iter().map(|r| r.quantity).sum::<i64>(),
        42,
        "dead letters keep the usage for reconciliation"
    );
    assert!(h.billed().is_empty());
    let grace = h.config("").server.grace_period;
    h.stop_while_refused(
        async move {
            agent.shutdown.cancel();
            let _ = agent.task.await;
        },
        grace,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_named_4xx_and_changes_nothing() {
    let h = Harness::new(H0 + 300).await;
    let agent = h.start_agent(h.config("")).await;
    agent
        .post(json!({"events": [ev("requests", 5, Some("a")), ev("gigabytes", 2, None)]}))
        .await;
    let (_, before) = agent.get("/v1/usage/current").await;

    let big_batch = json!({"events": vec![ev("requests", 1, None); 10_001]});
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST, "not a valid usage request"),
        (json!({"dimension": "bogus", "quantity": 1}).to_string().into_bytes(), StatusCode::BAD_REQUEST, "unknown dimension"),
        (json!({"dimension": "requests", "quantity": -3}).to_string().into_bytes(), StatusCode::BAD_REQUEST, "negative"),
        (br#"{"dimension":"requests","quantity":2.5}"#.to_vec(), StatusCode::BAD_REQUEST, "whole number"),
        (json!({"dimension": "requests", "quantity": 2_147_483_648_i64}).to_string().into_bytes(), StatusCode::BAD_REQUEST, "larger than"),
        (json!({"dimension": "requests", "quantity": 1, "tags": {"colour": "red"}}).to_string().into_bytes(), StatusCode::BAD_REQUEST, "not in metering.tag_keys"),
        (json!({"dimension": "requests", "quantity": 1, "tags": {"tenant": "a?b"}}).to_string().into_bytes(), StatusCode::BAD_REQUEST, "contains"),
        (json!({"dimension": "requests", "quantity": 1, "tags": {"tenant": "a", "region": "b", "k3": "c", "k4": "d", "k5": "e", "k6": "f"}}).to_string().into_bytes(), StatusCode::BAD_REQUEST, "at most 5"),
        (json!({"events": [ev("requests", 1, None), ev("requests", -1, None)]}).to_string().into_bytes(), StatusCode::BAD_REQUEST, "\"index\":1"),
        (big_batch.to_string().into_bytes(), StatusCode::BAD_REQUEST, "1 to 10000 events"),
        (vec![b' '; 1024 * 1024 + 1], StatusCode::PAYLOAD_TOO_LARGE, "exceeds"),
        (json!({"dimension": "requests", "quantity": 2_147_483_647_i64}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "at most 2147483647"),
    ];
    for (body, want, needle) in cases {
        let (status, reply) = agent.post_raw(body).await;
        assert_eq!(status, want, "{reply}");
        assert!(
            reply.to_string().contains(needle),
            "{needle:?} not in {reply}"
        );
    }
    // Wrong content type.
    let (status, bytes) = {
        let mut stream = tokio::net::TcpStream::connect(agent.addr)
            .await
            .expect("connect");
        raw_exchange(&mut stream, "POST /v1/usage HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").await
    };
    assert_eq!(status, 415, "{bytes}");
    assert!(bytes.contains("application/json"), "{bytes}");

    let (_, after) = agent.get("/v1/usage/current").await;
    assert_eq!(before, after, "rejected requests changed the ledger");
    agent.stop().await;
}

async fn raw_exchange(stream: &mut tokio::net::TcpStream, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

const AGG_METERING: &str = r#"dimensions = ["requests", "peak", "hosts", "users"]
tag_keys = ["tenant"]
aggregation = { peak = "max", hosts = "last", users = "unique" }"#;

fn agg_ev(dimension: &str, quantity: i64, tenant: Option<&str>, id: &str) -> Value {
    let mut e = ev(dimension, quantity, tenant);
    e["id"] = json!(id);
    e
}

fn user(value: &str, tenant: Option<&str>, id: Option<&str>) -> Value {
    let mut e = json!({"dimension": "users", "distinct": value});
    if let Some(t) = tenant {
        e["tags"] = json!({"tenant": t});
    }
    if let Some(id) = id {
        e["id"] = json!(id);
    }
    e
}

/// max, last and unique through the whole agent and the emulator: one record per
/// dimension-hour, allocations that add up, ids that change nothing when replayed, the
/// shutdown flush of the open hour, and the 400s that name `distinct`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_aggregation_bills_one_record_per_hour_with_allocations_that_add_up() {
    let h = Harness::with_emulator(
        H0 + 600,
        support::emulator_with_dimensions(&["peak", "hosts", "users"]),
    )
    .await;
    let agent = h.start_agent(h.config_with("", Some(AGG_METERING))).await;
    let batch = json!({"events": [
        agg_ev("peak", 5, Some("a"), "p1"),
        agg_ev("peak", 9, Some("b"), "p2"),
        agg_ev("peak", 9, Some("a"), "p3"),
        agg_ev("hosts", 4, Some("a"), "h1"),
        agg_ev("hosts", 2, Some("b"), "h2"),
        agg_ev("requests", 3, Some("a"), "r1"),
        user("alice", Some("a"), Some("u1")),
        user("bob", Some("b"), None),
        user("alice", Some("b"), None),
        user("carol", None, None),
    ]});
    let (status, body) = agent.post(batch.clone()).await;
    assert_eq!(
        (status, body["accepted"].as_i64()),
        (StatusCode::OK, Some(10)),
        "{body}"
    );
    // A replay of the ids changes no value: not the max, not the last, not the distinct count.
    let replay = json!({"events": [
        agg_ev("peak", 50, Some("c"), "p1"),
        agg_ev("hosts", 40, Some("c"), "h1"),
        user("dave", Some("c"), Some("u1")),
    ]});
    let (status, body) = agent.post(replay).await;
    assert_eq!(
        (status, body["duplicates"].as_i64()),
        (StatusCode::OK, Some(3)),
        "{body}"
    );
    // Refusals name the field; nothing of them is recorded.
    for (bad, field) in [
        (
            json!({"dimension": "requests", "quantity": 1, "distinct": "x"}),
            "distinct",
        ),
        (json!({"dimension": "users", "quantity": 1}), "distinct"),
        (
            json!({"dimension": "users", "distinct": "x", "quantity": 3}),
            "quantity",
        ),
    ] {
        let (status, body) = agent.post(bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["details"][0]["field"], field, "{bad}: {body}");
    }
    let (_, current) = agent.get("/v1/usage/current").await;
    assert!(
        current["usage"].as_array().is_some_and(|u| u.len() >= 7),
        "{current}"
    );

    h.advance_to(H0 + HOUR_SECS + 300);
    eventually("hour 0 billed", PATIENCE, async || h.billed().len() == 4).await;
    let billed = h.billed();
    let get = |hour: i64, d: &str| billed[&(H0 + hour * HOUR_SECS, d.to_owned())].clone();
    let peak = get(0, "peak");
    assert_eq!(peak.quantity, 9);
    assert_eq!(
        allocations(&peak),
        BTreeMap::from([("tenant=b".into(), 9)]),
        "the max goes to the tag set that reached it first"
    );
    let hosts = get(0, "hosts");
    assert_eq!(
        (hosts.quantity, allocations(&hosts)),
        (2, BTreeMap::from([("tenant=b".into(), 2)]))
    );
    let users = get(0, "users");
    assert_eq!(users.quantity, 3, "alice, bob, carol");
    assert_eq!(
        allocations(&users),
        BTreeMap::from([
            ("tenant=a".into(), 1),
            ("tenant=b".into(), 1),
            ("-".into(), 1)
        ]),
        "alice counts for her first tag set"
    );
    for r in [&peak, &hosts, &users] {
        assert_eq!(
            r.allocations.iter().map(|a| a.quantity).sum::<i64>(),
            r.quantity
        );
    }
    assert_eq!(get(0, "requests").quantity, 3);

    // Hour 1: a lower max, and the shutdown flush seals the open hour.
    agent
        .post(json!({"events": [ev("peak", 2, None), ev("hosts", 7, None), user("alice", None, None)]}))
        .await;
    agent.stop().await;
    let billed = h.billed();
    assert_eq!(
        billed.len(),
        8,
        "the open hour was sealed and sent at shutdown"
    );
    let get = |d: &str| billed[&(H0 + HOUR_SECS, d.to_owned())].clone();
    assert_eq!(
        (
            get("peak").quantity,
            get("hosts").quantity,
            get("users").quantity
        ),
        (2, 7, 1)
    );
    assert!(
        get("peak").allocations.is_empty(),
        "untagged: no allocations"
    );
    support::assert_no_meter_usage_errors(&h.emulator);
}

/// A heartbeat dimension across three hours, with a crash (the agent dropped with no
/// shutdown, as kill -9) and a restart ten minutes later in the first hour, and a SIGTERM
/// flush in the third: each hour bills `round(units × seconds run / 3600)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_bills_running_time_across_a_crash_a_restart_and_a_shutdown() {
    let h = Harness::with_emulator(H0 + 600, support::emulator_with_dimensions(&["pods"])).await;
    let metering = "dimensions = [\"requests\", \"pods\"]\nheartbeat = { pods = 60 }";
    let config = || h.config_with("", Some(metering));
    let agent = h.start_agent(config()).await;
    let (status, body) = agent.post(ev("pods", 1, None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["details"][0]["field"], "dimension", "{body}");
    assert!(
        body["details"][0]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("\"pods\"")),
        "{body}"
    );

    // 20 minutes run, recorded on the minute; then the process dies without a shutdown.
    h.advance_to(H0 + 1800);
    let ledger = &agent.handles.ledger;
    eventually("1,200 run seconds recorded", PATIENCE, async || {
        ledger.run_seconds(H0).await.expect("seconds") == 1200
    })
    .await;
    agent.task.abort();
    let _ = agent.task.await;
    agent.handles.ledger.closed().await;

    // Down for 10 minutes, then up for the rest of hour 0, all of hour 1 and 22.5 minutes
    // of hour 2, which ends with SIGTERM.
    h.advance_to(H0 + 2400);
    let agent = h.start_agent(config()).await;
    h.advance_to(H0 + HOUR_SECS + 300);
    eventually("hour 0 billed", PATIENCE, async || h.billed().len() == 2).await;
    h.advance_to(H0 + 2 * HOUR_SECS + 300);
    eventually("hour 1 billed", PATIENCE, async || h.billed().len() == 4).await;
    h.advance_to(H0 + 2 * HOUR_SECS + 1350);
    agent.stop().await;
    let billed = h.billed();
    let pods = |hour: i64| billed[&(H0 + hour * HOUR_SECS, "pods".to_owned())].quantity;
    assert_eq!(pods(0), 40, "2,400 s of 3,600: 60 × 2/3");
    assert_eq!(pods(1), 60, "a full hour is exactly the units");
    assert_eq!(pods(2), 23, "1,350 s: 22.5, rounded half up");
    assert_eq!(billed[&(H0, "requests".to_owned())].quantity, 0);
    support::assert_no_meter_usage_errors(&h.emulator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_the_open_hour_and_a_restart_carries_usage_forward() {
    let h = Harness::new(H0 + 600).await;
    let agent = h.start_agent(h.config("")).await;
    agent.post(ev("requests", 8, Some("a"))).await;
    agent.stop().await;
    let billed = h.billed();
    assert_eq!(
        billed.len(),
        2,
        "the open hour was sealed and sent at shutdown"
    );
    assert_eq!(billed[&(H0, "requests".to_owned())].quantity, 8);

    // Restart within the same hour: that hour is reported, so new usage goes to the next.
    h.advance_to(H0 + 1200);
    let agent = h.start_agent(h.config("")).await;
    let (_, current) = agent.get("/v1/usage/current").await;
    assert_eq!(
        current["hour"],
        meterd::clock::rfc3339(H0 + HOUR_SECS),
        "{current}"
    );
    agent.post(ev("requests", 5, None)).await;
    h.advance_to(H0 + 2 * HOUR_SECS + 60);
    eventually("the carried hour billed", PATIENCE, async || {
        h.billed().len() == 4
    })
    .await;
    let billed = h.billed();
    assert_eq!(
        billed[&(H0, "requests".to_owned())].quantity,
        8,
        "the reported hour never changes"
    );
    assert_eq!(billed[&(H0 + HOUR_SECS, "requests".to_owned())].quantity, 5);
    support::assert_no_meter_usage_errors(&h.emulator);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_api_guards_host_token_and_socket_mode() {
    let h = Harness::new(H0 + 300).await;
    let token_path = h.dir.path().join("token");
    std::fs::write(&token_path, "s3cret-token\n").expect("token");
    let socket = h.dir.path().join("meterd.sock");
    let agent = h
        .start_agent(h.config(&format!(
            "auth_token_file = {:?}\nunix_socket = {:?}",
            token_path.display().to_string(),
            socket.display().to_string()
        )))
        .await;
    // DNS rebinding: a foreign Host is refused even with the right token.
    let mut stream = tokio::net::TcpStream::connect(agent.addr)
        .await
        .expect("connect");
    let (status, _) = raw_exchange(&mut stream, "GET /v1/status HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: Bearer s3cret-token\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 403);
    // No token, wrong token, right token.
    assert_eq!(agent.get("/v1/status").await.0, StatusCode::UNAUTHORIZED);
    let target = Target::Tcp(agent.addr.to_string());
    let wrong = support::request(
        &target,
        Method::GET,
        "/v1/status",
        None,
        Some("s3cret-tokeX"),
    )
    .await;
    assert_eq!(wrong.0, StatusCode::UNAUTHORIZED);
    let right = support::request(
        &target,
        Method::GET,
        "/v1/status",
        None,
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(right.0, StatusCode::OK);
    // Health endpoints stay open for probes.
    assert_eq!(agent.get("/readyz").await.0, StatusCode::OK);
    // The Unix socket: mode 0660, same routes, same token rule.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    let unix = Target::Unix(socket.display().to_string());
    let body = ev("requests", 2, None).to_string().into_bytes();
    let (status, _) = local_client::call(
        &unix,
        Method::POST,
        "/v1/usage",
        Some(body),
        Some("s3cret-token"),
        Duration::from_secs(5),
    )
    .await
    .expect("call");
    assert_eq!(status, StatusCode::OK);
    agent.stop().await;
}

/// Reads one HTTP answer's status line from a stream, within 5 s.
async fn status_of(stream: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_cannot_hold_the_api_and_probes_are_always_answered() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::new(H0 + 300).await;
    let agent = Agent::spawn_with(
        h.config("max_connections = 2"),
        h.clock.clone(),
        &h.emulator.endpoint_url(),
        ACCESS_KEY,
        Duration::from_secs(5),
        |ctx| ctx.body_read_timeout = Duration::from_millis(500),
    )
    .await;
    eventually("agent ready", PATIENCE, async || {
        agent.handles.status.is_ready()
    })
    .await;
    // Two clients take both slots: headers sent, then the body stalls.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(agent.addr)
            .await
            .expect("connect");
        s.write_all(b"POST /v1/usage HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"dim")
            .await
            .expect("write");
        stalled.push(s);
    }
    // Probes are still answered, on a slot kept for them; anything else there is told to wait.
    let mut probe = tokio::net::TcpStream::connect(agent.addr)
        .await
        .expect("connect");
    probe
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(
        status_of(&mut probe).await,
        200,
        "readyz while every slot is held"
    );
    let mut busy = tokio::net::TcpStream::connect(agent.addr)
        .await
        .expect("connect");
    busy.write_all(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(
        status_of(&mut busy).await,
        503,
        "a non-probe request on a probe slot"
    );
    // The stalled bodies get 408 and free their slots; nothing of them was recorded.
    for s in &mut stalled {
        assert_eq!(status_of(s).await, 408);
    }
    let (status, body) = agent.post(ev("requests", 4, None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, current) = agent.get("/v1/usage/current").await;
    assert_eq!(current["usage"][0]["quantity"], 4, "{current}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_is_parsed_strictly() {
    let h = Harness::new(H0 + 300).await;
    let agent = h.start_agent(h.config("")).await;
    let cases = [
        // Two Host headers: RFC 9112 wants 400.
        (
            "GET /v1/status HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n",
            400,
        ),
        ("GET /v1/status HTTP/1.1\r\nHost: [::1]evil.com\r\n", 403),
        ("GET /v1/status HTTP/1.1\r\nHost: [::1].evil.com\r\n", 403),
        // An absolute-form target's authority is the one that counts.
        (
            "GET http://evil.example/v1/status HTTP/1.1\r\nHost: localhost\r\n",
            403,
        ),
        (
            "GET http://localhost/v1/status HTTP/1.1\r\nHost: localhost\r\n",
            200,
        ),
        ("GET /v1/status HTTP/1.1\r\nHost: localhost\r\n", 200),
    ];
    for (head, want) in cases {
        let mut stream = tokio::net::TcpStream::connect(agent.addr)
            .await
            .expect("connect");
        let (status, text) =
            raw_exchange(&mut stream, &format!("{head}Connection: close\r\n\r\n")).await;
        assert_eq!(status, want, "{head:?}: {text}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_cannot_take_over_a_live_socket_and_a_clean_exit_removes_it() {
    let h = Harness::new(H0 + 300).await;
    let socket = h.dir.path().join("meterd.sock");
    let agent = h
        .start_agent(h.config(&format!("unix_socket = {:?}", socket.display().to_string())))
        .await;
    let err = meterd::agent::UnixSocket::bind(&socket).expect_err("the socket is live");
    assert_eq!(err.exit_code().as_code(), 71, "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&socket.display().to_string()) && text.contains("another process"),
        "{text}"
    );
    // The first agent still answers on its socket.
    let unix = Target::Unix(socket.display().to_string());
    let (status, _) = local_client::call(
        &unix,
        Method::GET,
        "/readyz",
        None,
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("the first agent still answers");
    assert_eq!(status, StatusCode::OK);
    agent.stop().await;
    assert!(!socket.exists(), "a clean exit removes the socket");
    // A socket left by a process that died (nothing listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    assert!(socket.exists());
    let again = meterd::agent::UnixSocket::bind(&socket).expect("a stale socket is replaced");
    drop(again);
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_ids_count_once_under_concurrent_retries() {
    let h = Harness::new(H0 + 300).await;
    let agent = Arc::new(h.start_agent(h.config("")).await);
    let mut tasks = Vec::new();
    for client in 0..64 {
        let agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                // Every client sends ids 0..40 of a shared pool, so each id arrives many times.
                let id = format!("evt-{}", (client * 10 + i) % 40);
                let (status, _) = agent
                    .post(json!({"dimension": "requests", "quantity": 1, "id": id}))
                    .await;
                assert_eq!(status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let (_, current) = agent.get("/v1/usage/current").await;
    assert_eq!(current["usage"][0]["quantity"], 40, "{current}");
    let agent = Arc::try_unwrap(agent).unwrap_or_else(|_| panic!("agent still shared"));
    agent.stop().await;
    assert_eq!(h.billed()[&(H0, "requests".to_owned())].quantity, 40);
}

/// Runs an agent that must fail at start-up; returns its exit code and whether it was ever ready.
async fn fatal_start(h: &Harness, config: Config) -> (u8, bool) {
    let agent = h.spawn_agent(config).await;
    let ever_ready = std::cell::Cell::new(false);
    eventually("the agent to stop", PATIENCE, async || {
        ever_ready.set(ever_ready.get() || agent.handles.status.is_ready());
        agent.task.is_finished()
    })
    .await;
    let ever_ready = ever_ready.get();
    let err = agent
        .task
        .await
        .expect("task")
        .expect_err("start-up must fail");
    (
        err.exit_code().as_code(),
        ever_ready || agent.handles.status.is_ready(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fatal_entitlement_class_exits_with_its_code_and_never_turns_ready() {
    let cases: [(&str, Option<emulator::Entitlement>, &str, u8); 5] = [
        (
            "not entitled",
            Some(emulator::Entitlement::NotEntitled),
            "",
            77,
        ),
        (
            "platform not supported",
            Some(emulator::Entitlement::PlatformNotSupported),
            "",
            78,
        ),
        (
            "wrong region",
            Some(emulator::Entitlement::WrongRegion),
            "",
            78,
        ),
        ("untrusted signing key", None, "untrusted", 65),
        ("unknown key version", None, "version", 78),
    ];
    for (name, entitlement, tweak, code) in cases {
        let h = Harness::new(H0 + 300).await;
        if let Some(e) = entitlement {
            h.emulator
                .set_entitlement(PRODUCT, e)
                .expect("set entitlement");
        }
        let mut config = h.config("");
        match tweak {
            "untrusted" => config.registration.public_key_files.clear(),
            "version" => config.registration.public_key_version = 9,
            _ => {}
        }
        let (exit, ever_ready) = fatal_start(&h, config).await;
        assert_eq!(exit, code, "{name}");
        assert!(!ever_ready, "{name}: the agent turned ready");
        assert!(h.billed().is_empty(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_registration_retries_and_ends_ready() {
    let h = Harness::new(H0 + 300).await;
    let throttle = |rate| throttling(emulator::Operation::RegisterUsage, rate);
    h.emulator.set_faults(throttle(1.0));
    let agent = h.spawn_agent(h.config("")).await;
    let throttled = || {
        h.emulator
            .calls()
            .iter()
            .filter(|c| c.error_type() == Some("ThrottlingException"))
            .count()
    };
    eventually("a throttled RegisterUsage", PATIENCE, async || {
        throttled() >= 1
    })
    .await;
    assert!(
        !agent.handles.status.is_ready(),
        "not ready while registration is retrying"
    );
    h.emulator.set_faults(throttle(0.0));
    // Back-off waits run on the agent's clock: move it on until the retry happens.
    h.drive_until("ready after the retry", H0 + HOUR_SECS, async || {
        agent.handles.status.is_ready()
    })
    .await;
    let (_, status) = agent.get("/v1/status").await;
    assert_eq!(status["entitlement"]["state"], "entitled", "{status}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ami_product_keeps_taking_usage_while_its_dry_run_retries() {
    let h = Harness::new(H0 + 300).await;
    h.emulator.set_faults(FaultProfile::only(
        emulator::Operation::MeterUsage,
        FaultRule::down(Duration::from_secs(3600)),
    ));
    let mut config = h.config("");
    config.platform = meterd::config::PlatformSetting::Ec2;
    let agent = h.start_agent(config).await;
    let (_, status) = agent.get("/v1/status").await;
    assert_eq!(status["entitlement"]["state"], "unverified", "{status}");
    let (code, _) = agent.post(ev("requests", 4, None)).await;
    assert_eq!(
        code,
        StatusCode::OK,
        "usage is accepted and persisted meanwhile"
    );
    // Past the emulator's downtime (01:05) the DryRun passes, before the two hours after
    // which an AMI fails closed.
    h.drive_until("the DryRun passed", H0 + 2 * HOUR_SECS, async || {
        agent.get("/v1/status").await.1["entitlement"]["state"] == "permissions_verified"
    })
    .await;
    assert!(
        h.emulator
            .calls()
            .iter()
            .all(|c| c.operation != "RegisterUsage"),
        "RegisterUsage is never attempted on EC2"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_priced_container_exits_when_the_dry_run_is_refused() {
    let h = Harness::new(H0 + 300).await;
    h.emulator
        .set_entitlement(PRODUCT, emulator::Entitlement::NotEntitled)
        .expect("set entitlement");
    let mut config = h.config("");
    config.pricing = meterd::config::Pricing::Custom;
    let (exit, ever_ready) = fatal_start(&h, config).await;
    assert_eq!(exit, 77);
    assert!(!ever_ready);
    assert!(
        h.emulator
            .calls()
            .iter()
            .any(|c| c.operation == "MeterUsage"),
        "the DryRun was made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_refusal_is_an_error_in_status_and_not_retried_forever() {
    let h = Harness::new(H0 + 300).await;
    // Another writer with our identity already reported hour 0 with a different quantity.
    let intruder = build_client(&AwsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(h.emulator.endpoint_url()),
        static_credentials: Some((ACCESS_KEY.into(), "secret".into())),
        operation_timeout: Some(Duration::from_secs(5)),
    })
    .await;
    intruder
        .meter_usage()
        .product_code(PRODUCT)
        .timestamp(aws_sdk_marketplacemetering::primitives::DateTime::from_secs(H0))
        .usage_dimension("requests")
        .usage_quantity(99)
        .send()
        .await
        .expect("the intruding record");
    let agent = h.start_agent(h.config("")).await;
    agent.post(ev("requests", 5, None)).await;
    h.advance_to(H0 + HOUR_SECS + 60);
    eventually("the refusal recorded", PATIENCE, async || {
        let (_, status) = agent.get("/v1/status").await;
        status["records"]["duplicate"] == 1 && status["records"]["pending"] == 0
    })
    .await;
    let (_, status) = agent.get("/v1/status").await;
    assert!(
        status["records"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("DuplicateRequestException"),
        "{status}"
    );
    let (_, metrics) = agent.get("/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("meterd_records_duplicate_total 1"),
        "{metrics}"
    );
    // It is not retried: one refused attempt for that record, however long we wait.
    h.advance_to(H0 + 2 * HOUR_SECS + 60);
    // The intruder's hour-0 record, our hour-0 zero for gigabytes, and both of hour 1.
    eventually("hour 1 billed", PATIENCE, async || h.billed().len() == 4).await;
    let refused = support::meter_usage_errors(&h.emulator)
        .iter()
        .filter(|e| *e == "DuplicateRequestException")
        .count();
    assert_eq!(refused, 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_does_not_hold_back_the_next_hour() {
    let h = Harness::new(H0 + 300).await;
    let mut config = h.config("");
    // The service does not know this dimension: each of its records is refused, not throttled.
    config.metering.dimensions.push("unlisted".into());
    // Longer than the wait below, on the agent's clock: only the new seal can end it.
    config.sending.max_backoff = Duration::from_secs(3600);
    let agent = h.start_agent(config).await;
    agent.post(ev("requests", 5, None)).await;
    h.advance_to(H0 + HOUR_SECS + 60);
    eventually("hour 0 billed and its refusal seen", PATIENCE, async || {
        h.billed().contains_key(&(H0, "requests".to_owned()))
            && support::meter_usage_errors(&h.emulator)
                .iter()
                .any(|e| e == "InvalidUsageDimensionException")
    })
    .await;
    agent.post(ev("requests", 7, None)).await;
    // The sender now waits out its longest back-off (1 hour from about 01:01) for the refused
    // record; the seal of hour 1 (at 02:00:01) must still be sent right away.
    h.advance_to(H0 + 2 * HOUR_SECS + 30);
    eventually("hour 1 billed", PATIENCE, async || {
        h.billed()
            .get(&(H0 + HOUR_SECS, "requests".to_owned()))
            .is_some_and(|r| r.quantity == 7)
    })
    .await;
    let (_, status) = agent.get("/v1/status").await;
    assert!(
        status["records"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("InvalidUsageDimensionException"),
        "{status}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_version_warns_in_status_and_metrics_but_runs() {
    let mut config = EmulatorConfig::demo();
    let expired_at = meterd::clock::from_unix_seconds(H0 - 86_400);
    for key in &mut config.keys {
        key.expired_at = Some(expired_at);
    }
    assert!(!config.keys.is_empty());
    let h = Harness::with_emulator(H0 + 300, config).await;
    let agent = h.start_agent(h.config("")).await;
    let (_, status) = agent.get("/v1/status").await;
    assert_eq!(status["entitlement"]["state"], "entitled", "{status}");
    assert_eq!(
        status["entitlement"]["details"]["key_rotation"]["timestamp"],
        H0 - 86_400,
        "{status}"
    );
    let (_, metrics) = agent.get("/metrics").await;
    let expected = format!(
        "meterd_public_key_rotation_timestamp_seconds {}",
        H0 - 86_400
    );
    assert!(
        metrics.as_str().unwrap_or_default().contains(&expected),
        "{metrics}"
    );
    agent.stop().await;
}

/// The calls the emulator saw, by kind: RegisterUsage, MeterUsage DryRuns, real MeterUsage,
/// and anything else.
fn call_counts(h: &Harness) -> (usize, usize, usize, usize) {
    let (mut register, mut dry_run, mut meter, mut other) = (0, 0, 0, 0);
    for c in h.emulator.calls() {
        match (c.operation.as_str(), &c.outcome) {
            ("RegisterUsage", _) => register += 1,
            ("MeterUsage", emulator::Outcome::Error { error_type, .. })
                if error_type == "DryRunOperation" =>
            {
                dry_run += 1
            }
            ("MeterUsage", _) => meter += 1,
            _ => other += 1,
        }
    }
    (register, dry_run, meter, other)
}

/// Each pricing model, on each platform where it is valid, makes exactly the calls AWS
/// documents: `hourly` RegisterUsage only; `custom` the DryRun, then MeterUsage; `hourly+custom`
/// RegisterUsage, then MeterUsage; on EC2 (AMI) no RegisterUsage, the DryRun and MeterUsage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pricing_model_makes_exactly_the_documented_calls() {
    use meterd::config::{PlatformSetting, Pricing};
    let cases = [
        (Pricing::Hourly, PlatformSetting::Ecs),
        (Pricing::Hourly, PlatformSetting::Eks),
        (Pricing::Custom, PlatformSetting::Ecs),
        (Pricing::Custom, PlatformSetting::Eks),
        (Pricing::Custom, PlatformSetting::Ec2),
        (Pricing::HourlyCustom, PlatformSetting::Ecs),
        (Pricing::HourlyCustom, PlatformSetting::Eks),
        (Pricing::HourlyCustom, PlatformSetting::Ec2),
    ];
    for (pricing, platform) in cases {
        let what = format!("{pricing} on {platform:?}");
        let h = Harness::new(H0 + 300).await;
        let mut config = h.config("");
        config.pricing = pricing;
        config.platform = platform;
        if !pricing.meters() {
            config.metering.dimensions.clear();
        }
        let ec2 = platform == PlatformSetting::Ec2;
        let agent = h.start_agent(config).await;
        // Containers are ready only after their check; an AMI is ready at once and checks in
        // the background.
        let (register, dry_run, _, _) = call_counts(&h);
        if !ec2 {
            assert_eq!(
                (register, dry_run),
                (
                    usize::from(pricing.registers()),
                    usize::from(pricing == Pricing::Custom)
                ),
                "{what}: the check before ready"
            );
        }
        let (status, body) = agent.post(ev("requests", 3, None)).await;
        if pricing.meters() {
            assert_eq!(status, StatusCode::OK, "{what}: {body}");
        } else {
            assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("no custom dimensions"),
                "{what}: {body}"
            );
        }
        if ec2 {
            eventually("the AMI's DryRun", PATIENCE, async || {
                agent.handles.status.entitlement().state
                    == meterd::entitlement::EntitlementState::PermissionsVerified
            })
            .await;
        }
        h.advance_to(H0 + HOUR_SECS + 60);
        if pricing.meters() {
            eventually("the first hour billed", PATIENCE, async || {
                h.emulator.records().len() == 2
            })
            .await;
        }
        agent.stop().await;
        let (register, dry_run, meter, other) = call_counts(&h);
        let expected = (
            usize::from(pricing.registers() && !ec2),
            usize::from(pricing.meters() && (ec2 || pricing == Pricing::Custom)),
            // Two dimensions, the closed hour and the open hour flushed at stop.
            if pricing.meters() { 4 } else { 0 },
            0,
        );
        assert_eq!((register, dry_run, meter, other), expected, "{what}");
        if pricing.meters() {
            let billed = h.billed();
            assert_eq!(billed[&(H0, "requests".to_owned())].quantity, 3, "{what}");
        }
    }
}

/// `hourly` pricing that is not entitled exits 77 and never turns ready, like any container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hourly_product_that_is_not_entitled_exits_77() {
    let h = Harness::new(H0 + 300).await;
    h.emulator
        .set_entitlement(PRODUCT, emulator::Entitlement::NotEntitled)
        .expect("set entitlement");
    let mut config = h.config("");
    config.pricing = meterd::config::Pricing::Hourly;
    config.metering.dimensions.clear();
    let (exit, ever_ready) = fatal_start(&h, config).await;
    assert_eq!(exit, 77);
    assert!(!ever_ready);
    assert_eq!(call_counts(&h), (1, 0, 0, 0));
}

/// `sending.spread`: the closed hour goes out at the agent's offset after the hour, not
/// before; the offset is in `/v1/status` and survives a restart; the shutdown flush ignores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spread_holds_the_hourly_send_until_the_agents_offset_and_the_flush_ignores_it() {
    let h = Harness::new(H0 + 300).await;
    let mut config = h.config("");
    config.sending.spread = Duration::from_secs(1800);
    let agent = h.start_agent(config.clone()).await;
    let (_, status) = agent.get("/v1/status").await;
    let offset_ms = (status["sending"]["offset_seconds"]
        .as_f64()
        .expect("offset")
        * 1000.0)
        .round() as u64;
    assert_eq!(status["sending"]["spread_seconds"], 1800.0, "{status}");
    let want = meterd::send::spread_offset(
        &agent.handles.ledger.identity().instance_id,
        Duration::from_secs(1800),
    );
    assert_eq!(Duration::from_millis(offset_ms), want, "{status}");
    assert!(
        want >= Duration::from_secs(3),
        "this ledger's offset {want:?} is too small to tell apart from the seal delay"
    );
    agent.post(ev("requests", 4, None)).await;
    let due = meterd::clock::from_unix_seconds(H0 + HOUR_SECS) + want;
    let meter_calls = || {
        h.emulator
            .calls()
            .iter()
            .filter(|c| c.operation == "MeterUsage")
            .count()
    };
    h.clock.set(due - Duration::from_secs(1));
    eventually("hour 0 sealed", PATIENCE, async || {
        agent.handles.ledger.sealed_floor() >= H0 + HOUR_SECS
    })
    .await;
    eventually("the sender to wait for the offset", PATIENCE, async || {
        h.clock.deadlines().contains(&due)
    })
    .await;
    assert_eq!(meter_calls(), 0, "nothing is sent before the offset");
    h.clock.set(due);
    eventually("hour 0 billed at the offset", PATIENCE, async || {
        h.billed().len() == 2
    })
    .await;

    // Hour 1 would be due at 02:00 + offset; a shutdown flush sends it at once.
    agent.post(ev("requests", 6, None)).await;
    h.clock.set(due + Duration::from_secs(60));
    agent.stop().await;
    let billed = h.billed();
    assert_eq!(billed.len(), 4, "{billed:?}");
    assert_eq!(billed[&(H0 + HOUR_SECS, "requests".to_owned())].quantity, 6);

    let again = h.start_agent(config).await;
    let (_, status) = again.get("/v1/status").await;
    assert_eq!(
        status["sending"]["offset_seconds"].as_f64(),
        Some(want.as_secs_f64()),
        "a restart keeps its slot: {status}"
    );
    again.stop().await;
}

// ------------------------------------------------ credentials from the emulator's flows

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/meterd";

/// An emulator that accepts only credentials it issued (a long-term key is configured that
/// nobody uses), living 5 s, with one container task.
fn issued_credentials_only() -> EmulatorConfig {
    let mut config = EmulatorConfig::demo();
    config.credentials = BTreeMap::from([("AKIDNOBODYUSES".to_owned(), "x".to_owned())]);
    config.temporary_credentials.duration = Duration::from_secs(5);
    config.temporary_credentials.tasks = vec![meterd::emulator::credentials::ContainerTask {
        id: "task-1".to_owned(),
        role_arn: ROLE_ARN.to_owned(),
        authorization_token: "task-1-token".to_owned(),
    }];
    config
}

/// An unsigned EKS-style projected token for pod `uid` (the emulator reads its claims only).
fn pod_token(uid: &str) -> String {
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        b64(json!({"alg": "RS256", "kid": "k"})),
        b64(json!({
            "sub": "system:serviceaccount:billing:meterd",
            "aud": ["sts.amazonaws.com"],
            "kubernetes.io": {"pod": {"name": "meterd-0", "uid": uid}},
        }))
    )
}

/// The real binary (credential variables are process-global) on an emulator that accepts
/// only credentials it issued, living 5 s: the Rust SDK's cache refreshes 10 s before expiry
/// less a jitter under 5 s, so every call fetches new keys, a rotation inside the hour.
/// `flow` sets the chain's variables.
async fn agent_on_issued_credentials(
    flow: impl FnOnce(&support::BinaryRig, &mut tokio::process::Command),
) -> (
    Vec<meterd::emulator::StoredMeterRecord>,
    Vec<meterd::emulator::CallRecord>,
) {
    let config = issued_credentials_only();
    let sending = "";
    let rig = support::BinaryRig::with_metering(
        Arc::new(meterd::clock::SystemClock),
        "",
        sending,
        config,
        None,
    )
    .await;
    let mut cmd = support::agent_command_without_keys(
        env!("CARGO_BIN_EXE_meterd"),
        &rig.config_path,
        rig.dir.path(),
    );
    flow(&rig, &mut cmd);
    let mut child = cmd.spawn().expect("spawn meterd");
    support::wait_ready(&rig.addr, &mut child).await;
    let body = json!({"events": [
        {"dimension": "requests", "quantity": 5},
        {"dimension": "gigabytes", "quantity": 2},
    ]});
    let (status, _) = rig.post(&body).await;
    assert_eq!(status, StatusCode::OK);
    // SIGTERM: the agent sends the open hour before it exits.
    support::sigterm(&child);
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("exits within grace")
        .expect("wait");
    assert!(
        exit.status.success(),
        "{}: {}",
        exit.status,
        String::from_utf8_lossy(&exit.stderr)
    );
    (rig.emulator.records(), rig.emulator.calls())
}

/// One instance, every call on issued (ASIA…) keys, and more than one key in the hour.
fn assert_one_instance_across_rotation(
    records: &[meterd::emulator::StoredMeterRecord],
    calls: &[meterd::emulator::CallRecord],
    identity: &str,
) {
    let mut quantities: Vec<(String, i64)> = records
        .iter()
        .map(|r| (r.dimension.clone(), r.quantity))
        .collect();
    quantities.sort();
    assert_eq!(
        quantities,
        [("gigabytes".to_owned(), 2), ("requests".to_owned(), 5)]
    );
    assert!(
        records.iter().all(|r| r.identity == identity),
        "{records:?}"
    );
    assert_eq!(records[0].hour, records[1].hour);
    let ops: Vec<&str> = calls.iter().map(|c| c.operation.as_str()).collect();
    assert_eq!(
        ops,
        ["RegisterUsage", "MeterUsage", "MeterUsage"],
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|c| c.outcome == meterd::emulator::Outcome::Ok),
        "{calls:?}"
    );
    let keys: std::collections::BTreeSet<&str> =
        calls.iter().filter_map(|c| c.identity.as_deref()).collect();
    assert!(keys.iter().all(|k| k.starts_with("ASIA")), "{keys:?}");
    assert!(keys.len() >= 2, "the credentials rotated: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_starts_and_sends_on_irsa_credentials_from_the_emulator() {
    let (records, calls) = agent_on_issued_credentials(|rig, cmd| {
        let token_file = rig.dir.path().join("eks-token");
        std::fs::write(&token_file, pod_token("pod-uid-7")).expect("token file");
        cmd.env("AWS_WEB_IDENTITY_TOKEN_FILE", &token_file)
            .env("AWS_ROLE_ARN", ROLE_ARN)
            .env("AWS_ENDPOINT_URL_STS", rig.emulator.endpoint_url());
    })
    .await;
    assert_one_instance_across_rotation(
        &records,
        &calls,
        "123456789012:assumed-role/meterd/pod-uid-7",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_starts_and_sends_on_ecs_task_role_credentials_from_the_emulator() {
    let (records, calls) = agent_on_issued_credentials(|rig, cmd| {
        cmd.env(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!("{}/v2/credentials/task-1", rig.emulator.endpoint_url()),
        )
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN", "task-1-token");
    })
    .await;
    assert_one_instance_across_rotation(
        &records,
        &calls,
        "123456789012:assumed-role/meterd/task-1",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metering_health_walks_through_each_level_while_the_service_is_down_and_back_to_ok() {
    let h = Harness::new(H0 + 300).await;
    let agent = h.start_agent(h.config("")).await;
    h.emulator.set_faults(FaultProfile::only(
        emulator::Operation::MeterUsage,
        FaultRule::down(Duration::from_secs(24 * 3600)),
    ));
    let health = || async {
        let (_, status) = agent.get("/v1/status").await;
        (
            status["metering_health"].as_str().unwrap_or("?").to_owned(),
            status["oldest_unsent_age_seconds"].as_i64().unwrap_or(-1),
        )
    };
    let metric = || async {
        let (_, metrics) = agent.get("/metrics").await;
        let text = metrics.as_str().unwrap_or_default().to_owned();
        text.lines()
            .find(|l| l.starts_with("meterd_metering_health{") && l.ends_with(" 1"))
            .unwrap_or_default()
            .to_owned()
    };
    agent.post(ev("requests", 5, None)).await;
    assert_eq!(health().await, ("ok".to_owned(), 0), "nothing sealed yet");

    // Hour 0 closes and its records fail to send.
    let closed = H0 + HOUR_SECS;
    h.advance_to(closed + 60);
    eventually("a failed MeterUsage", PATIENCE, async || {
        !support::meter_usage_errors(&h.emulator).is_empty()
    })
    .await;
    assert_eq!(health().await, ("ok".to_owned(), 60));
    for (after, level) in [
        (29 * 60, "ok"),
        (30 * 60, "warn"),
        (2 * HOUR_SECS - 1, "warn"),
        (2 * HOUR_SECS, "degraded"),
        (4 * HOUR_SECS - 1, "degraded"),
        (4 * HOUR_SECS, "failing"),
    ] {
        h.advance_to(closed + after);
        assert_eq!(
            health().await,
            (level.to_owned(), after),
            "{after} s unsent"
        );
        assert_eq!(
            metric().await,
            format!("meterd_metering_health{{level=\"{level}\"}} 1")
        );
    }
    eventually(
        "the sender to keep trying while down",
        PATIENCE,
        async || support::meter_usage_errors(&h.emulator).len() >= 2,
    )
    .await;

    h.emulator.set_faults(FaultProfile::default());
    h.advance_to(closed + 4 * HOUR_SECS + 60);
    // Hour 0 (stamped 00:05) is still inside the six-hour window at the limit.
    h.drive_until("every hour billed", closed + 5 * HOUR_SECS, async || {
        h.billed().len() == 2 * 5
    })
    .await;
    eventually("health back to ok", PATIENCE, async || {
        health().await == ("ok".to_owned(), 0)
    })
    .await;
    assert_eq!(metric().await, "meterd_metering_health{level=\"ok\"} 1");
    assert_eq!(h.billed()[&(H0, "requests".to_owned())].quantity, 5);
    agent.stop().await;
}

/// The audit file's lines, parsed; each must be whole JSON.
fn audit_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_holds_one_final_line_per_billed_record_across_faults_and_a_crash() {
    let h = Harness::new(H0 + 300).await;
    let audit = h.dir.path().join("audit.jsonl");
    let extra = format!(
        "[audit]\nfile = {:?}\nlog = true",
        audit.display().to_string()
    );
    let agent = h.start_agent(h.config(&extra)).await;
    h.emulator.set_faults(
        FaultProfile::only(
            emulator::Operation::MeterUsage,
            FaultRule {
                throttle_rate: 0.4,
                error_rate: 0.3,
                ..FaultRule::default()
            },
        )
        .seeded(11),
    );
    for hour in 0..3 {
        h.advance_to(H0 + hour * HOUR_SECS + 600);
        agent
            .post(json!({"events": [ev("requests", 10 + hour, Some("x")), ev("gigabytes", hour, None)]}))
            .await;
    }
    h.advance_to(H0 + 3 * HOUR_SECS + 60);
    // Throttled calls back off on the injected clock: move it while waiting.
    h.drive_until("three hours billed", H0 + 3 * HOUR_SECS + 600, async || {
        h.billed().len() == 6
    })
    .await;
    // Killed at once: outcomes final in the ledger need not be in the file yet.
    agent.task.abort();
    let _ = agent.task.await;
    agent.handles.ledger.closed().await;
    let before_restart = audit_lines(&audit).len();
    assert!(before_restart <= 6, "{before_restart}");

    h.advance_to(H0 + 3 * HOUR_SECS + 600);
    let agent = h.start_agent(h.config(&extra)).await;
    agent.post(ev("requests", 7, None)).await;
    h.advance_to(H0 + 4 * HOUR_SECS + 60);
    h.drive_until("hour 3 billed", H0 + 4 * HOUR_SECS + 900, async || {
        h.billed().len() == 8
    })
    .await;
    h.advance_to(H0 + 4 * HOUR_SECS + 900);
    agent.post(ev("gigabytes", 2, None)).await;
    agent.stop().await;

    let billed = h.billed();
    assert_eq!(billed.len(), 10, "hours 0 to 3 and the flushed hour 4");
    let lines = audit_lines(&audit);
    let mut seen = std::collections::BTreeSet::new();
    for line in &lines {
        let key = line["record_key"].as_str().expect("record_key").to_owned();
        assert!(seen.insert(key), "a record twice: {line}");
        let hour = meterd::clock::unix_seconds(
            humantime::parse_rfc3339(line["hour"].as_str().expect("hour")).expect("rfc3339"),
        );
        let dimension = line["dimension"].as_str().expect("dimension").to_owned();
        let record = billed
            .get(&(hour, dimension))
            .unwrap_or_else(|| panic!("not billed: {line}"));
        assert_eq!(line["state"], "sent", "{line}");
        assert_eq!(line["quantity"], record.quantity, "{line}");
        assert_eq!(
            line["metering_record_id"],
            record.metering_record_id.as_str(),
            "{line}"
        );
        assert_eq!(
            Some(line["record_key"].as_str().unwrap_or_default()),
            record.client_token.as_deref()
        );
        assert!(line["attempts"].as_i64().unwrap_or(0) >= 1, "{line}");
    }
    assert_eq!(
        lines.len(),
        billed.len(),
        "one line per billed record, none missing"
    );
    assert!(
        support::meter_usage_errors(&h.emulator)
            .iter()
            .any(|e| e == "ThrottlingException"),
        "faults were injected"
    );
}

/// Closed hours sent on the injected clock, by the agent in-process with meterd's own client
/// (`AwsSettings::from_config`: the SDK chain). The chain reads process-global variables, so
/// each flow runs [`child_sends_closed_hours_on_issued_credentials`] in a process of its own.
#[test]
fn closed_hours_are_sent_on_irsa_and_ecs_credentials_in_processes_of_their_own() {
    for flow in ["irsa", "ecs"] {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "child_sends_closed_hours_on_issued_credentials",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("METERD_TEST_CREDENTIAL_FLOW", flow)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("credential flow {flow}: ok")),
            "{flow}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
#[ignore = "a child of closed_hours_are_sent_on_irsa_and_ecs_credentials_in_processes_of_their_own"]
async fn child_sends_closed_hours_on_issued_credentials() {
    let Ok(flow) = std::env::var("METERD_TEST_CREDENTIAL_FLOW") else {
        panic!(
            "run by closed_hours_are_sent_on_irsa_and_ecs_credentials_in_processes_of_their_own"
        );
    };
    // The injected clock runs years before the wall clock, which the SDK's credential cache
    // reads: every issued credential looks expired to it, so every call fetches new keys,
    // valid on the emulator's clock however far the test moves it.
    const P0: i64 = 1_600_000_000 - 1_600_000_000 % HOUR_SECS;
    let h = Harness::with_emulator(P0 + 600, issued_credentials_only()).await;
    let url = h.emulator.endpoint_url();
    // This process runs this one test on one thread: nothing else reads the environment.
    let identity = match flow.as_str() {
        "irsa" => {
            let token_file = h.dir.path().join("eks-token");
            std::fs::write(&token_file, pod_token("pod-uid-9")).expect("token file");
            std::env::set_var("AWS_WEB_IDENTITY_TOKEN_FILE", &token_file);
            std::env::set_var("AWS_ROLE_ARN", ROLE_ARN);
            std::env::set_var("AWS_ENDPOINT_URL_STS", &url);
            "123456789012:assumed-role/meterd/pod-uid-9"
        }
        _ => {
            std::env::set_var(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("{url}/v2/credentials/task-1"),
            );
            std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN", "task-1-token");
            "123456789012:assumed-role/meterd/task-1"
        }
    };
    let config = h.config("");
    let from_config = AwsSettings::from_config(&config);
    let agent = Agent::spawn_with(
        config,
        h.clock.clone(),
        &url,
        "AKIDNOTUSED",
        Duration::from_secs(5),
        move |ctx| ctx.aws = Some(from_config),
    )
    .await;
    eventually("agent ready", PATIENCE, async || {
        agent.handles.status.is_ready()
    })
    .await;
    agent.post(ev("requests", 3, None)).await;
    h.advance_to(P0 + HOUR_SECS + 300);
    eventually("hour 0 billed", PATIENCE, async || h.billed().len() == 2).await;
    agent.post(ev("gigabytes", 4, None)).await;
    h.advance_to(P0 + 2 * HOUR_SECS + 300);
    eventually("hour 1 billed", PATIENCE, async || h.billed().len() == 4).await;
    agent.stop().await;

    let billed = h.billed();
    let quantities: Vec<(i64, &str, i64)> = billed
        .values()
        .map(|r| ((r.hour - P0) / HOUR_SECS, r.dimension.as_str(), r.quantity))
        .collect();
    assert_eq!(
        quantities,
        [
            (0, "gigabytes", 0),
            (0, "requests", 3),
            (1, "gigabytes", 4),
            (1, "requests", 0),
            // The open hour, flushed at stop.
            (2, "gigabytes", 0),
            (2, "requests", 0)
        ]
    );
    assert!(
        billed.values().all(|r| r.identity == identity),
        "{billed:?}"
    );
    let calls = h.emulator.calls();
    assert!(calls.iter().all(|c| c.error_type().is_none()), "{calls:?}");
    let keys: std::collections::BTreeSet<&str> =
        calls.iter().filter_map(|c| c.identity.as_deref()).collect();
    assert!(keys.iter().all(|k| k.starts_with("ASIA")), "{keys:?}");
    assert!(keys.len() >= 2, "the credentials rotated: {keys:?}");
    println!("credential flow {flow}: ok");
}

// ---------------------------------------------------------------- contract pricing

/// A contract-priced agent for the emulator's demo license (every key is the demo buyer's):
/// the Tier feature and `seats` of its pool of 10.
fn contract_config(h: &Harness, seats: i64) -> Config {
    let mut config = h.config("");
    config.pricing = meterd::config::Pricing::Contract;
    config.metering.dimensions.clear();
    config.metering.tag_keys.clear();
    config.contract = meterd::config::ContractConfig {
        product_sku: PRODUCT.to_owned(),
        entitlements: vec![
            meterd::config::ContractEntitlement {
                name: "Tier".to_owned(),
                unit: "None".to_owned(),
                count: None,
            },
            meterd::config::ContractEntitlement {
                name: "Seats".to_owned(),
                unit: "Count".to_owned(),
                count: Some(seats),
            },
        ],
        ..meterd::config::ContractConfig::default()
    };
    assert_eq!(config.problems(), Vec::<String>::new());
    config
}

fn consumptions(h: &Harness) -> Vec<emulator::license_manager::Consumption> {
    h.emulator.license_consumptions()
}

/// Contract pricing: ready once CheckoutLicense answers, the entitlements at
/// `GET /v1/entitlements`, the checkout extended before it expires (so it outlives its first
/// hour), and checked in at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_agent_checks_out_extends_and_checks_in() {
    let h = Harness::new(H0 + 300).await;
    let agent = h.start_agent(contract_config(&h, 3)).await;
    let (status, body) = agent.get("/v1/entitlements").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checkout_type"], "PROVISIONAL");
    assert_eq!(body["license_arn"], emulator::config::DEMO_LICENSE_ARN);
    assert_eq!(
        body["entitlements"],
        json!([
            {"name": "Tier", "unit": "None", "value": "Premium"},
            {"name": "Seats", "unit": "Count", "value": "3"},
        ])
    );
    let (status, usage) = agent.post(ev("requests", 1, None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        usage["error"]
            .as_str()
            .is_some_and(|e| e.contains("contract")),
        "{usage}"
    );
    assert_eq!(consumptions(&h).len(), 1);

    // Extended at half its hour, it still holds after the first hour.
    h.advance_to(H0 + 300 + 1800);
    eventually("the extension", PATIENCE, async || {
        consumptions(&h).first().is_some_and(|c| c.extensions >= 1)
    })
    .await;
    h.advance_to(H0 + 300 + 3600 + 60);
    let now = H0 + 300 + 3600 + 60;
    assert!(consumptions(&h)[0].holds(now), "{:?}", consumptions(&h));
    assert!(agent.handles.status.is_ready());

    agent.stop().await;
    let after = consumptions(&h);
    assert_eq!(after.len(), 1);
    assert!(after[0].checked_in, "checked in at shutdown: {after:?}");
    assert_eq!(
        h.emulator
            .calls()
            .iter()
            .filter(|c| c.operation == "RegisterUsage")
            .count(),
        0
    );
}

/// A crash (the task aborted, nothing checked in) and a restart: the agent extends the
/// checkout the ledger names instead of taking more seats; a clean stop then returns them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_contract_agent_reuses_its_checkout_and_leaks_no_seat() {
    let h = Harness::new(H0 + 300).await;
    let config = contract_config(&h, 6);
    let agent = h.start_agent(config.clone()).await;
    agent.task.abort();
    let _ = agent.task.await;
    agent.handles.ledger.closed().await;
    assert!(!consumptions(&h)[0].checked_in);

    h.advance_to(H0 + 600);
    let again = h.start_agent(config.clone()).await;
    let held = consumptions(&h);
    assert_eq!(held.len(), 1, "no second checkout: {held:?}");
    assert_eq!(held[0].extensions, 1, "the held checkout was extended");
    again.stop().await;
    let after = consumptions(&h);
    assert_eq!(after.len(), 1);
    assert!(after[0].checked_in);

    // The next start checks out anew (the checked-in token is not reused).
    h.advance_to(H0 + 900);
    let third = h.start_agent(config).await;
    let now = consumptions(&h);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.iter().any(|c| c.holds(H0 + 900)));
    third.stop().await;
}

/// No license, or more seats than the pool has left: exit 77, never ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_agent_without_its_entitlements_exits_77() {
    let mut emulator_config = EmulatorConfig::demo();
    emulator_config
        .quotas
        .accounts
        .insert(ACCESS_KEY.to_owned(), "999988887777".to_owned());
    let h = Harness::with_emulator(H0 + 300, emulator_config).await;
    let (exit, ever_ready) = fatal_start(&h, contract_config(&h, 1)).await;
    assert_eq!(
        (exit, ever_ready),
        (77, false),
        "another account has no license"
    );

    let h = Harness::new(H0 + 300).await;
    let (exit, ever_ready) = fatal_start(&h, contract_config(&h, 11)).await;
    assert_eq!((exit, ever_ready), (77, false), "11 seats of a pool of 10");
    assert!(consumptions(&h).is_empty());
}

/// A record the shutdown flush sealed early but could not send (the service was down) goes
/// out at once after a restart, spread or not: only the hourly seal waits for the offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_sealed_record_left_unsent_goes_out_at_once_after_a_restart() {
    let h = Harness::new(H0 + 300).await;
    let mut config = h.config("");
    config.sending.spread = Duration::from_secs(1800);
    config.server.grace_period = Duration::from_secs(1);
    let agent = h.start_agent(config.clone()).await;
    agent.post(ev("requests", 4, None)).await;
    h.emulator.set_faults(FaultProfile::every(FaultRule {
        error_rate: 1.0,
        ..FaultRule::default()
    }));
    h.stop_while_refused(agent.stop(), config.server.grace_period)
        .await;
    assert!(h.billed().is_empty(), "the service refused the flush");

    h.emulator.set_faults(FaultProfile::default());
    let again = h.start_agent(config).await;
    // The clock stays in hour 0: an hourly record would wait until 01:00 plus the offset.
    eventually("the flushed record sent", PATIENCE, async || {
        h.billed().len() == 2
    })
    .await;
    assert_eq!(h.billed()[&(H0, "requests".to_owned())].quantity, 4);
    again.stop().await;
}

async fn take(agent: &Agent, count: i64, id: Option<&str>) -> (StatusCode, Value) {
    let mut body = json!({"name": "Seats", "count": count});
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    agent
        .call(
            Method::POST,
            "/v1/entitlements/checkout",
            Some(body.to_string().into_bytes()),
        )
        .await
}

async fn give_back(agent: &Agent, token: &str) -> (StatusCode, Value) {
    agent
        .call(
            Method::POST,
            "/v1/entitlements/checkin",
            Some(json!({"token": token}).to_string().into_bytes()),
        )
        .await
}

/// Floating seats for the application: two agents share the license's pool of 10 (each holds
/// 3 itself); the last seat goes to whoever asks first, a check-in frees seats for the other,
/// a retried request with the same id is the same checkout, a crash and a restart keep the
/// application's seats (extended, not taken again), and a stop checks everything in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_compete_for_floating_seats_and_none_leaks() {
    let h = Harness::new(H0 + 300).await;
    let config_a = contract_config(&h, 3);
    let mut config_b = contract_config(&h, 3);
    config_b.state.dir = h.dir.path().join("state-b");
    let a = h.start_agent(config_a.clone()).await;
    let b = h.start_agent(config_b).await;

    let (status, first) = take(&a, 3, Some("req-1")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, again) = take(&a, 3, Some("req-1")).await;
    assert_eq!(
        again["token"], first["token"],
        "the same id is the same checkout"
    );
    let (status, refused) = take(&b, 2, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "9 of 10 are held: {refused}");
    let (status, last) = take(&b, 1, None).await;
    assert_eq!(status, StatusCode::OK, "the last seat: {last}");
    let (status, _) = take(&a, 1, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "the pool is empty");

    let token = first["token"].as_str().expect("token").to_owned();
    let (status, body) = give_back(&a, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = give_back(&a, &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no longer held");
    let (status, _) = take(&b, 2, None).await;
    assert_eq!(status, StatusCode::OK, "the returned seats");

    // A takes the last seat, crashes, and restarts: its seat is still held, once.
    let (status, kept) = take(&a, 1, Some("req-2")).await;
    assert_eq!(status, StatusCode::OK, "{kept}");
    let (status, _) = take(&b, 1, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "all 10 held");
    a.task.abort();
    let _ = a.task.await;
    a.handles.ledger.closed().await;
    let held_before = consumptions(&h).iter().filter(|c| !c.checked_in).count();
    let a = h.start_agent(config_a).await;
    assert_eq!(
        consumptions(&h).iter().filter(|c| !c.checked_in).count(),
        held_before,
        "no new checkout at the restart"
    );
    let (_, listed) = a.get("/v1/entitlements").await;
    assert_eq!(listed["floating"][0]["token"], kept["token"], "{listed}");

    a.stop().await;
    b.stop().await;
    let left: Vec<_> = consumptions(&h)
        .into_iter()
        .filter(|c| !c.checked_in)
        .collect();
    assert!(left.is_empty(), "nothing stays checked out: {left:?}");
}

/// License Manager for Anywhere: a buyer outside AWS has no credential chain, only a license
/// token. meterd exchanges it (GetAccessToken, unsigned; AssumeRoleWithWebIdentity for the
/// consumption role) and checks out with the role's temporary credentials; the emulator
/// takes no other signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anywhere_buyer_checks_out_with_credentials_from_its_license_token() {
    let mut emulator_config = EmulatorConfig::demo();
    emulator_config.credentials = BTreeMap::from([("AKIDNOBODYUSES".to_owned(), "x".to_owned())]);
    let h = Harness::with_emulator(H0 + 300, emulator_config).await;
    let token_file = h.dir.path().join("license-token");
    std::fs::write(&token_file, emulator::config::DEMO_LICENSE_TOKEN).expect("token file");
    let mut config = contract_config(&h, 1);
    config.contract.license_token_file = token_file.display().to_string();
    config.contract.role_arn =
        "arn:aws:iam::111122223333:role/AWSLicenseManagerConsumptionRole".to_owned();
    assert_eq!(config.problems(), Vec::<String>::new());
    let agent = h.start_agent(config).await;
    let (status, body) = agent.get("/v1/entitlements").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let calls = h.emulator.calls();
    let op = |name: &str| calls.iter().find(|c| c.operation == name).cloned();
    let exchange = op("GetAccessToken").expect("the token was exchanged");
    assert_eq!(exchange.identity, None, "GetAccessToken goes unsigned");
    let checkout = op("CheckoutLicense").expect("checked out");
    assert!(
        checkout
            .identity
            .as_deref()
            .is_some_and(|k| k.starts_with("ASIA")),
        "signed with the role's temporary credentials: {checkout:?}"
    );
    let held = consumptions(&h);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].account, "111122223333");
    agent.stop().await;
    assert!(consumptions(&h)[0].checked_in);

    // A config with one of the two keys is refused, naming both.
    let mut half = contract_config(&h, 1);
    half.contract.license_token_file = token_file.display().to_string();
    assert!(half
        .problems()
        .iter()
        .any(|p| p.contains("contract.license_token_file and contract.role_arn")));
}

/// A PERPETUAL checkout draws units down for good: the agent is ready on it, a restart reuses
/// it from the ledger instead of drawing down again, and a stop does not check it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_perpetual_checkout_is_drawn_down_once_across_restarts() {
    let h = Harness::new(H0 + 300).await;
    let mut config = contract_config(&h, 4);
    config.contract.checkout_type = "perpetual".to_owned();
    let agent = h.start_agent(config.clone()).await;
    let (_, body) = agent.get("/v1/entitlements").await;
    assert_eq!(body["checkout_type"], "PERPETUAL", "{body}");
    assert_eq!(body["expiration"], Value::Null);
    agent.stop().await;
    let after = consumptions(&h);
    assert_eq!(after.len(), 1);
    assert!(!after[0].checked_in, "a drawdown is not checked in");

    h.advance_to(H0 + 10 * HOUR_SECS);
    let again = h.start_agent(config).await;
    assert_eq!(consumptions(&h).len(), 1, "no second drawdown");
    // 4 of 10 seats drawn down for good: 7 more do not fit.
    let (status, _) = take(&again, 7, None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = take(&again, 6, None).await;
    assert_eq!(status, StatusCode::OK);
    again.stop().await;
}

/// Issue 16: a throttled MeterUsage waits at least a tenth of the spread (30 s of a 5-minute
/// spread, at most three times that) before it tries again, on the agent's clock; with a
/// floor of the 1 s initial back-off the retry would come 1 to 3 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_meter_usage_retries_a_tenth_of_the_spread_later() {
    let h = Harness::new(H0 + 300).await;
    let mut config = h.config("");
    config.sending.spread = Duration::from_secs(300);
    config.sending.initial_backoff = Duration::from_secs(1);
    config.sending.max_backoff = Duration::from_secs(300);
    let agent = h.start_agent(config).await;
    let throttle = |rate| throttling(emulator::Operation::MeterUsage, rate);
    h.emulator.set_faults(throttle(1.0));
    agent.post(ev("requests", 3, None)).await;
    // The agent's loops asleep, the sender not (nothing sealed yet).
    let idle = h.clock.sleepers();
    // Past any offset in the spread: the record is due.
    h.advance_to(H0 + HOUR_SECS + 300);
    let meter_calls = || {
        h.emulator
            .calls()
            .into_iter()
            .filter(|c| c.operation == "MeterUsage")
            .collect::<Vec<_>>()
    };
    // The throttle made, the sender back in its back-off (one sleeper more than when idle);
    // the clock only moves after that, so the gap is the back-off alone.
    eventually(
        "a throttled MeterUsage and the back-off",
        PATIENCE,
        async || {
            !meter_calls().is_empty() && h.clock.due_sleepers() == 0 && h.clock.sleepers() > idle
        },
    )
    .await;
    h.emulator.set_faults(throttle(0.0));
    // Two records: `requests` and the zero record of the other dimension.
    h.drive_until("the hour billed", H0 + HOUR_SECS + 900, async || {
        h.billed().len() == 2
    })
    .await;
    let calls = meter_calls();
    assert_eq!(
        calls.len(),
        3,
        "one throttled call, two accepted: {calls:?}"
    );
    assert_eq!(calls[0].error_type(), Some("ThrottlingException"));
    assert_eq!((calls[1].error_type(), calls[2].error_type()), (None, None));
    let gap = calls[1].time_ms - calls[0].time_ms;
    assert!(
        (30_000..=91_000).contains(&gap),
        "the retry came {gap} ms after the throttle"
    );
    agent.stop().await;
}

/// A SIGTERM in the middle of a long pass at the call limit (a backlog after an outage) seals
/// the open hour at once: the pass ends between calls and the flush takes over, instead of
/// the shutdown waiting for the pass (at one call a second, ten records are ten seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_long_pass_seals_the_open_hour_at_once() {
    let h = Harness::new(H0 + 300).await;
    let mut config = h.config("");
    config.sending.max_calls_per_second = 1;
    // Long enough for the flush to send all twelve at one a second.
    config.server.grace_period = Duration::from_secs(60);
    let agent = h.start_agent(config).await;
    h.emulator.set_faults(FaultProfile::only(
        emulator::Operation::MeterUsage,
        FaultRule::down(Duration::from_secs(5 * HOUR_SECS as u64)),
    ));
    for hour in 0..5 {
        h.advance_to(H0 + hour * HOUR_SECS + 600);
        agent.post(ev("requests", 1 + hour, None)).await;
    }
    // The service is back at 05:05; the backlog is ten records (five hours, two dimensions).
    h.emulator.set_faults(FaultProfile::default());
    h.advance_to(H0 + 5 * HOUR_SECS + 600);
    agent.post(ev("requests", 9, None)).await;
    h.drive_until(
        "the backlog's first record billed",
        H0 + 6 * HOUR_SECS,
        async || !h.billed().is_empty(),
    )
    .await;
    assert!(
        h.billed().len() < 6,
        "the pass is still going: {:?}",
        h.billed().len()
    );
    let stopped_at = h.clock.now();
    let (ledger, task) = (agent.handles.ledger.clone(), agent.task);
    agent.shutdown.cancel();
    // With the clock standing still: a pass that went on would wait on it for its next call.
    eventually("the open hour sealed", PATIENCE, async || {
        ledger.sealed_floor() > H0 + 5 * HOUR_SECS
    })
    .await;
    assert_eq!(h.clock.now(), stopped_at);
    h.drive_until("the agent stopped", H0 + 6 * HOUR_SECS, async || {
        task.is_finished()
    })
    .await;
    task.await
        .expect("agent task")
        .expect("agent exits cleanly");
    assert_eq!(h.billed().len(), 12, "backlog and open hour all flushed");
    assert_eq!(
        h.billed()[&(H0 + 5 * HOUR_SECS, "requests".to_owned())].quantity,
        9
    );
}

/// With a spread, a record held back for the agent's offset is not late: the unsent age (in
/// status and metrics) and the metering health count from when it falls due, so a 50-minute
/// spread does not warn every hour by design.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unsent_age_counts_from_the_agents_slot_in_the_spread() {
    let h = Harness::new(H0 + 300).await;
    let mut config = h.config("");
    config.sending.spread = Duration::from_secs(50 * 60);
    let agent = h.start_agent(config).await;
    // The service down: the record stays pending past its slot.
    h.emulator.set_faults(FaultProfile::only(
        emulator::Operation::MeterUsage,
        FaultRule::down(Duration::from_secs(24 * 3600)),
    ));
    agent.post(ev("requests", 5, None)).await;
    let (_, status) = agent.get("/v1/status").await;
    let offset = status["sending"]["offset_seconds"]
        .as_f64()
        .expect("offset") as i64;
    let due = H0 + HOUR_SECS + offset;
    let observed = async |at: i64| {
        h.advance_to(at);
        let (_, status) = agent.get("/v1/status").await;
        let (_, metrics) = agent.get("/metrics").await;
        let gauge = metrics
            .as_str()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("meterd_oldest_unsent_record_age_seconds "))
            .unwrap_or("?")
            .to_owned();
        (
            status["metering_health"].as_str().unwrap_or("?").to_owned(),
            status["oldest_unsent_age_seconds"].as_i64().unwrap_or(-1),
            gauge,
        )
    };
    eventually("the hour sealed", PATIENCE, async || {
        h.advance_to(H0 + HOUR_SECS + 5);
        agent.handles.ledger.sealed_floor() > H0
    })
    .await;
    assert_eq!(observed(due).await, ("ok".into(), 0, "0".into()), "due now");
    let warn = due + 30 * 60;
    assert_eq!(
        observed(warn - 1).await,
        ("ok".into(), 30 * 60 - 1, "1799".into())
    );
    assert_eq!(
        observed(warn).await,
        ("warn".into(), 30 * 60, "1800".into())
    );
    h.stop_while_refused(agent.stop(), Duration::from_secs(10))
        .await;
}
