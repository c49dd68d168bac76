//! The reliability suite: every acknowledged count is billed exactly once, under crashes,
//! faults, clock jumps, a full disk and concurrent retries, checked by an oracle.
//!
//! Run it with `scripts/reliability.sh` (short mode, CI) or `scripts/reliability.sh --long`
//! (releases). Every test here is `#[ignore]`d so that a plain `cargo test` stays quick and
//! needs neither libfaketime nor root; the script runs them with `--ignored`.
//!
//! The oracle records every count a client got a 200 for (`acked`) and compares it with what
//! the emulator accepted (`billed`), per dimension and per tenant tag:
//! - lost = acked − billed, where positive; must be 0.
//! - double-billed = billed − acked, where positive; must be 0.
//! - duplicates = (hour, dimension) keys accepted more than once, plus
//!   `DuplicateRequestException`/`IdempotencyConflictException` answers in the emulator's
//!   calls log; must be 0.
//!
//! Each test prints one `RELIABILITY scenario=… lost=… double_billed=… duplicates=…` line;
//! `docs/RELIABILITY.md` collects them.
//!
//! Knobs (the script sets them): `METERD_RELIABILITY_KILLS` (kill -9 iterations, default 20),
//! `METERD_RELIABILITY_HOURS` (simulated hours of the fault run, default 8),
//! `METERD_RELIABILITY_CLIENTS` (concurrent clients in the kill loop, default 8).
#![cfg(feature = "emulator")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::process::Child;

use meterd::clock::{
    from_unix_seconds, hour_floor, unix_seconds, Clock, ManualClock, ScaledClock, SharedClock,
    SystemClock, HOUR_SECS,
};
use meterd::config::Config;
use meterd::emulator::{
    self, EmulatorConfig, EmulatorHandle, FaultProfile, FaultRule, Operation, StoredMeterRecord,
};
use meterd::ledger::{RecordState, StoredRecord};
use meterd::local_client::{self, Target};

use meterd_test_support as support;

use support::{eventually, BinaryRig, Harness, H0};

const BIN: &str = env!("CARGO_BIN_EXE_meterd");
/// How long a wait on real time may take in this suite.
const PATIENCE: Duration = Duration::from_secs(60);
const ACCESS_KEY: &str = "AKIARELIABILITY00001";
const DIMENSIONS: [&str; 2] = ["requests", "gigabytes"];
/// The kill -9 loop also meters a `max` and a `unique` dimension.
const KILL9_DIMENSIONS: [&str; 4] = ["requests", "gigabytes", "peak", "users"];
const KILL9_METERING: &str = r#"dimensions = ["requests", "gigabytes", "peak", "users"]
tag_keys = ["tenant", "region"]
aggregation = { peak = "max", users = "unique" }"#;
/// `max` dimensions are checked by [`check_max`], not summed with the others.
const MAX_DIMENSION: &str = "peak";
const TENANTS: [&str; 3] = ["t0", "t1", "t2"];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The oracle

/// (dimension, tenant or "-") → quantity.
type Totals = BTreeMap<(String, String), i64>;

/// What clients were told: every count acknowledged with a 200.
#[derive(Default)]
struct Oracle {
    acked: Mutex<Totals>,
    requests: AtomicU64,
    attempts: AtomicU64,
    /// Events the agent reported as duplicates of an id it already held (retries).
    retried_ids: AtomicU64,
}

impl Oracle {
    fn ack(&self, totals: &Totals, duplicates: u64) {
        let mut acked = self.acked.lock().expect("oracle");
        for (k, q) in totals {
            *acked.entry(k.clone()).or_default() += q;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.retried_ids.fetch_add(duplicates, Ordering::Relaxed);
    }

    fn acked(&self) -> Totals {
        self.acked.lock().expect("oracle").clone()
    }
}

/// A batch of events with ids, and what it adds per (dimension, tenant).
fn random_batch(rng: &mut impl Rng, prefix: &str, max_events: usize) -> (Vec<u8>, Totals) {
    let n = rng.gen_range(1..=max_events);
    let mut totals = Totals::new();
    let events: Vec<Value> = (0..n)
        .map(|i| {
            let dimension = DIMENSIONS[usize::from(rng.gen_bool(0.3))];
            let q = rng.gen_range(0..100);
            let tenant = if rng.gen_bool(0.2) {
                None
            } else {
                Some(TENANTS[rng.gen_range(0..TENANTS.len())])
            };
            *totals
                .entry((dimension.to_owned(), tenant.unwrap_or("-").to_owned()))
                .or_default() += q;
            let mut e =
                json!({"dimension": dimension, "quantity": q, "id": format!("{prefix}-{i}")});
            if let Some(t) = tenant {
                e["tags"] = json!({"tenant": t});
            }
            e
        })
        .collect();
    (json!({"events": events}).to_string().into_bytes(), totals)
}

/// An acknowledged `max` event: its value and tenant, and the (fake) time its first attempt
/// was sent and its acknowledgement came, which bound the hour it was counted in.
#[derive(Debug, Clone)]
struct MaxAck {
    value: i64,
    tenant: String,
    sent: i64,
    acked: i64,
}

/// A batch of the kill -9 loop: [`random_batch`]'s sums, plus `max` events (returned apart
/// with their tenants) and `unique` events whose values never repeat outside the request (a
/// value may repeat inside it, under other tenants), so each distinct value counts once in
/// all: for its first occurrence's tenant, which the oracle adds to the totals.
fn kill9_batch(
    rng: &mut impl Rng,
    prefix: &str,
    max_events: usize,
) -> (Vec<u8>, Totals, Vec<(i64, String)>) {
    let (body, mut totals) = random_batch(rng, prefix, max_events);
    let mut body: Value = serde_json::from_slice(&body).expect("batch");
    let events = body["events"].as_array_mut().expect("events");
    let tenant = |rng: &mut dyn rand::RngCore| {
        if rng.gen_bool(0.2) {
            None
        } else {
            Some(TENANTS[rng.gen_range(0..TENANTS.len())])
        }
    };
    let tagged = |mut e: Value, t: Option<&str>| {
        if let Some(t) = t {
            e["tags"] = json!({"tenant": t});
        }
        e
    };
    let mut maxima = Vec::new();
    for i in 0..rng.gen_range(0..4) {
        let (value, t) = (rng.gen_range(0..10_000), tenant(rng));
        maxima.push((value, t.unwrap_or("-").to_owned()));
        let e =
            json!({"dimension": MAX_DIMENSION, "quantity": value, "id": format!("{prefix}-m{i}")});
        events.push(tagged(e, t));
    }
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..rng.gen_range(0..6) {
        let value = format!("{prefix}-v{}", rng.gen_range(0..3));
        let t = tenant(rng);
        first
            .entry(value.clone())
            .or_insert_with(|| t.unwrap_or("-").to_owned());
        let e = json!({"dimension": "users", "distinct": value, "id": format!("{prefix}-u{i}")});
        events.push(tagged(e, t));
    }
    for tenant in first.into_values() {
        *totals.entry(("users".to_owned(), tenant)).or_default() += 1;
    }
    (body.to_string().into_bytes(), totals, maxima)
}

/// The `max` oracle. Each acknowledged event was counted in one hour between the hours of its
/// first send and its acknowledgement (widened by `margin` fake seconds: the agent's clock
/// is libfaketime's, the client's the emulator's). Lost: an event whose every candidate hour
/// billed less than its value. Double-billed (or invented): an hour billed a value that no
/// acknowledged event of a candidate hour had, or with another tenant's allocation.
fn check_max(acks: &[MaxAck], records: &[StoredMeterRecord], margin: i64) -> (usize, usize, usize) {
    let billed: BTreeMap<i64, (i64, String)> = records
        .iter()
        .filter(|r| r.dimension == MAX_DIMENSION)
        .map(|r| {
            let tenant = r
                .allocations
                .iter()
                .find_map(|a| a.tags.as_ref()?.iter().find(|t| t.key == "tenant"))
                .map_or("-".to_owned(), |t| t.value.clone());
            (r.hour, (r.quantity, tenant))
        })
        .collect();
    let hours = |a: &MaxAck| hour_floor(a.sent - margin)..=hour_floor(a.acked + margin);
    let lost = acks
        .iter()
        .filter(|a| {
            !hours(a)
                .step_by(HOUR_SECS as usize)
                .any(|h| billed.get(&h).is_some_and(|(q, _)| *q >= a.value))
        })
        .count();
    let invented = billed
        .iter()
        .filter(|(hour, (q, tenant))| {
            *q > 0
                && !acks
                    .iter()
                    .any(|a| a.value == *q && &a.tenant == tenant && hours(a).contains(hour))
        })
        .count();
    let hours_with_max = billed.values().filter(|(q, _)| *q > 0).count();
    (lost, invented, hours_with_max)
}

/// Posts `body` until it is acknowledged (same ids on every attempt), then tells the oracle.
/// Gives up (fails the test) after `patience` of real time.
async fn post_until_acked(
    target: &Target,
    token: Option<&str>,
    body: &[u8],
    totals: &Totals,
    oracle: &Oracle,
    patience: Duration,
) {
    // A plain closure returning a future, so that a spawned client's future is `Send`.
    eventually("a request acknowledged", patience, move || async move {
        oracle.attempts.fetch_add(1, Ordering::Relaxed);
        let r = local_client::call(
            target,
            Method::POST,
            "/v1/usage",
            Some(body.to_vec()),
            token,
            Duration::from_secs(5),
        )
        .await;
        if let Ok((StatusCode::OK, reply)) = &r {
            let reply: Value = serde_json::from_slice(reply).unwrap_or(Value::Null);
            oracle.ack(totals, reply["duplicates"].as_u64().unwrap_or(0));
            return true;
        }
        if let Ok((status, reply)) = &r {
            // Only "not now" answers are retried; anything else is a bug in the test or agent.
            assert!(
                matches!(
                    *status,
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::INSUFFICIENT_STORAGE
                ),
                "unexpected answer {status}: {}",
                String::from_utf8_lossy(reply)
            );
        }
        false
    })
    .await;
}

/// Billed quantity per (dimension, tenant), from the emulator's accepted MeterUsage records.
fn billed_totals(records: &[StoredMeterRecord]) -> Totals {
    let mut out = Totals::new();
    for r in records.iter().filter(|r| r.dimension != MAX_DIMENSION) {
        if r.allocations.is_empty() {
            *out.entry((r.dimension.clone(), "-".into())).or_default() += r.quantity;
            continue;
        }
        for a in &r.allocations {
            let tenant = a
                .tags
                .as_ref()
                .and_then(|tags| tags.iter().find(|t| t.key == "tenant"))
                .map_or("-".to_owned(), |t| t.value.clone());
            *out.entry((r.dimension.clone(), tenant)).or_default() += a.quantity;
        }
    }
    out.retain(|_, q| *q != 0);
    out
}

fn dead_totals(records: &[StoredRecord]) -> i64 {
    records
        .iter()
        .filter(|r| r.state == RecordState::Dead)
        .map(|r| r.quantity)
        .sum()
}

/// The outcome figures of one scenario.
#[derive(Debug)]
struct Figures {
    acked: i64,
    billed: i64,
    dead_lettered: i64,
    lost: i64,
    double_billed: i64,
    duplicates: usize,
    records: usize,
    meter_calls: usize,
    faulted_calls: usize,
}

/// Compares the oracle with the emulator (and the dead letters, which are accounted for,
/// not lost), prints the figures and fails on any loss, double billing or duplicate.
fn settle(
    scenario: &str,
    iterations: usize,
    oracle: &Oracle,
    emulator: &EmulatorHandle,
    dead: &[StoredRecord],
) -> Figures {
    let acked = oracle.acked();
    acked_nonzero(&acked);
    let records = emulator.records();
    let billed = billed_totals(&records);
    let calls = emulator.calls();
    let mut keys = BTreeMap::new();
    for r in &records {
        *keys
            .entry((r.identity.clone(), r.hour, r.dimension.clone()))
            .or_insert(0usize) += 1;
    }
    let duplicate_keys = keys.values().filter(|n| **n > 1).count();
    let duplicate_answers = calls
        .iter()
        .filter(|c| {
            matches!(
                c.error_type(),
                Some("DuplicateRequestException" | "IdempotencyConflictException")
            )
        })
        .count();
    let dead_quantity = dead_totals(dead);
    let mut lost = 0;
    let mut double_billed = 0;
    let mut all: Vec<&(String, String)> = acked.keys().chain(billed.keys()).collect();
    all.sort();
    all.dedup();
    for k in all {
        let a = acked.get(k).copied().unwrap_or(0);
        let b = billed.get(k).copied().unwrap_or(0);
        if a > b {
            lost += a - b;
        } else {
            double_billed += b - a;
        }
    }
    // Dead letters are usage the service could no longer take: visible and kept, not lost.
    let lost = lost - dead_quantity;
    let figures = Figures {
        acked: acked.values().sum(),
        billed: billed.values().sum(),
        dead_lettered: dead_quantity,
        lost,
        double_billed,
        duplicates: duplicate_keys + duplicate_answers,
        records: records.len(),
        meter_calls: calls.iter().filter(|c| c.operation == "MeterUsage").count(),
        faulted_calls: calls
            .iter()
            .filter(|c| c.operation == "MeterUsage" && c.fault.is_some())
            .count(),
    };
    println!(
        "RELIABILITY scenario={scenario} iterations={iterations} requests_acked={} attempts={} retried_ids={} acked={} billed={} dead_lettered={} lost={} double_billed={} duplicates={} records={} meter_calls={} faulted_calls={}",
        oracle.requests.load(Ordering::Relaxed),
        oracle.attempts.load(Ordering::Relaxed),
        oracle.retried_ids.load(Ordering::Relaxed),
        figures.acked,
        figures.billed,
        figures.dead_lettered,
        figures.lost,
        figures.double_billed,
        figures.duplicates,
        figures.records,
        figures.meter_calls,
        figures.faulted_calls,
    );
    assert_eq!(
        figures.lost, 0,
        "{scenario}: acknowledged usage lost: acked {acked:?} billed {billed:?} dead {dead_quantity}"
    );
    assert_eq!(
        figures.double_billed, 0,
        "{scenario}: double billed: acked {acked:?} billed {billed:?}"
    );
    assert_eq!(figures.duplicates, 0, "{scenario}: duplicate records");
    figures
}

fn acked_nonzero(acked: &Totals) {
    assert!(
        acked.values().sum::<i64>() > 0,
        "the scenario acknowledged no usage"
    );
}

/// Every (dimension, hour) from the first to the last billed hour has exactly one record: no
/// hour skipped, none sent twice (the agent reports zero for idle hours).
fn assert_hours_contiguous(records: &[StoredMeterRecord]) -> (i64, i64) {
    assert_hours_contiguous_for(records, &DIMENSIONS)
}

fn assert_hours_contiguous_for(records: &[StoredMeterRecord], dimensions: &[&str]) -> (i64, i64) {
    let mut by_dim: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for r in records {
        by_dim.entry(r.dimension.as_str()).or_default().push(r.hour);
    }
    let mut span = (i64::MAX, i64::MIN);
    for &d in dimensions {
        let hours = by_dim
            .get_mut(d)
            .unwrap_or_else(|| panic!("no record for {d}"));
        hours.sort_unstable();
        for pair in hours.windows(2) {
            assert_eq!(
                pair[1] - pair[0],
                HOUR_SECS,
                "{d}: hours {} and {} are not consecutive (skipped or sent twice)",
                pair[0],
                pair[1]
            );
        }
        span = (span.0.min(hours[0]), span.1.max(hours[hours.len() - 1]));
    }
    span
}

// ---------------------------------------------------------------------------------------------
// The in-process rig (`support::Harness`): emulator and agent in this process, each with an
// injected clock.

type Agent = support::InProcessAgent;

/// Waits until nothing is pending in the ledger, moving `rig`'s clock for the sender's
/// back-offs and the emulator's latency, never past `limit`.
async fn settled(rig: &Harness, agent: &Agent, limit: i64) {
    rig.drive_until("nothing pending", limit, async || {
        agent.handles.ledger.stats().await.expect("stats").pending == 0
    })
    .await;
}

/// Waits until every hour before `end` is sealed.
async fn sealed_through(agent: &Agent, end: i64) {
    let ledger = &agent.handles.ledger;
    eventually("hours sealed", PATIENCE, async || {
        ledger.sealed_floor() >= end
    })
    .await;
}

/// Sends `n` acknowledged batches from one client with its own ids.
async fn send_batches(agent: &Agent, oracle: &Oracle, rng: &mut impl Rng, tag: &str, n: usize) {
    for i in 0..n {
        let (body, totals) = random_batch(rng, &format!("{tag}-{i}"), 10);
        post_until_acked(
            &agent.target(),
            None,
            &body,
            &totals,
            oracle,
            Duration::from_secs(30),
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Faults

/// Throttling, 5xx, added latency and dropped connections all the time, and the service down
/// for 5 hours in the middle: every hour is still billed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh"]
async fn faults_and_five_hours_down_deliver_everything_exactly_once() {
    let hours = env_usize("METERD_RELIABILITY_HOURS", 8).max(7) as i64;
    let world = Harness::new(H0 + 120).await;
    let clock = world.clock.clone();
    let agent = world.start_agent(world.config("")).await;
    let flaky = FaultRule {
        throttle_rate: 0.25,
        error_rate: 0.2,
        drop_rate: 0.15,
        latency: Some(Duration::from_secs(3)),
        ..FaultRule::default()
    };
    let meter_only = |rule: FaultRule| FaultProfile::only(Operation::MeterUsage, rule).seeded(11);
    world.emulator.set_faults(meter_only(flaky.clone()));

    // Emulator latency is emulator-clock time, like the sender's back-offs: the waits below
    // drive the clock from one sleeper's deadline to the next; hour boundaries are set.
    let oracle = Oracle::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut down_until: Option<i64> = None;
    for hour in 0..hours {
        let start = H0 + hour * HOUR_SECS;
        if unix_seconds(clock.now()) < start + 60 {
            clock.set(from_unix_seconds(start + 60));
        }
        send_batches(&agent, &oracle, &mut rng, &format!("h{hour}"), 5).await;
        // Once the service is back, give the sender time (the clock runs through the sender's
        // and the service's waits) before jumping ahead: an outage of up to 5 hours must cost
        // nothing.
        let near_end = start + HOUR_SECS - 5;
        if let Some(until) = down_until.filter(|u| *u < near_end) {
            world.drive_to(until.max(unix_seconds(clock.now()))).await;
        }
        if down_until.is_none_or(|until| unix_seconds(clock.now()) >= until) {
            settled(&world, &agent, near_end).await;
        }
        if hour == 1 {
            // Down for five hours from about 01:01, on top of the other faults.
            world.emulator.set_faults(meter_only(FaultRule {
                down_for: Some(Duration::from_secs(5 * 3600)),
                ..flaky.clone()
            }));
            down_until = Some(unix_seconds(clock.now()) + 5 * HOUR_SECS);
        }
        // Jump close to the end of the hour; the next hour's first step carries it over.
        if unix_seconds(clock.now()) < near_end {
            clock.set(from_unix_seconds(near_end));
        }
        send_batches(&agent, &oracle, &mut rng, &format!("h{hour}e"), 1).await;
    }
    let end = H0 + hours * HOUR_SECS + 60;
    if unix_seconds(clock.now()) < end {
        clock.set(from_unix_seconds(end));
    }
    let expected_records = 2 * hours as usize;
    world
        .drive_until("every hour billed", end + HOUR_SECS, async || {
            world.emulator.records().len() >= expected_records
        })
        .await;
    settled(&world, &agent, end + HOUR_SECS).await;
    let records = agent.records().await;
    let errors = support::meter_usage_errors(&world.emulator);
    for needed in [
        "ThrottlingException",
        "InternalServiceErrorException",
        "ServiceUnavailable",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needed)),
            "{needed} was never injected: {errors:?}"
        );
    }
    let calls = world.emulator.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.outcome == emulator::Outcome::Dropped),
        "no connection was dropped"
    );
    assert!(calls.iter().any(|c| c.added_latency_ms > 0));
    assert!(down_until.is_some());
    assert!(
        !errors.iter().any(|e| e == "TimestampOutOfBoundsException"),
        "{errors:?}"
    );
    assert!(records.iter().all(|r| r.state == RecordState::Sent));
    let (first, last) = assert_hours_contiguous(&world.emulator.records());
    assert_eq!((first, last), (H0, H0 + (hours - 1) * HOUR_SECS));
    settle(
        "faults_5h_down",
        hours as usize,
        &oracle,
        &world.emulator,
        &[],
    );
    agent.stop().await;
}

/// The service down for 7 hours: hours older than the 6-hour window when it returns are
/// dead-lettered, visible in status and metrics and kept in the ledger; the rest is billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh"]
async fn seven_hours_down_leaves_visible_dead_letters_and_drops_nothing_silently() {
    let world = Harness::new(H0 + 120).await;
    let clock = world.clock.clone();
    let agent = world.start_agent(world.config("")).await;
    world.emulator.set_faults(FaultProfile::only(
        Operation::MeterUsage,
        FaultRule::down(Duration::from_secs(7 * 3600)),
    ));
    let oracle = Oracle::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Usage in each of 9 hours; the service is down from 00:02 to 07:02.
    let meter_calls = || {
        world
            .emulator
            .calls()
            .iter()
            .filter(|c| c.operation == "MeterUsage")
            .count()
    };
    for hour in 0..9 {
        let tried = meter_calls();
        clock.set(from_unix_seconds(H0 + hour * HOUR_SECS + 600));
        send_batches(&agent, &oracle, &mut rng, &format!("d{hour}"), 3).await;
        // Once an hour is sealed, the sender tries (and fails) at least once an hour, as it
        // would in real time.
        if hour > 0 {
            let limit = H0 + (hour + 1) * HOUR_SECS - 60;
            world
                .drive_until("the sender to try this hour", limit, async || {
                    meter_calls() > tried
                })
                .await;
        }
    }
    clock.set(from_unix_seconds(H0 + 9 * HOUR_SECS + 60));
    sealed_through(&agent, H0 + 9 * HOUR_SECS).await;
    settled(&world, &agent, H0 + 10 * HOUR_SECS).await;
    let records = agent.records().await;
    let dead: Vec<StoredRecord> = records
        .iter()
        .filter(|r| r.state == RecordState::Dead)
        .cloned()
        .collect();
    // Hours 00:00 and 01:00 were older than 6 hours at 07:02 (and 02:00 too, at 08:00 when
    // the first retry after the outage may land); at least the first two are dead.
    assert!(dead.len() >= 4, "dead letters: {dead:?}");
    assert!(dead.iter().all(|r| r.last_error.is_some()));
    let (_, status) = agent.get("/v1/status").await;
    assert_eq!(
        status["records"]["dead_letter"].as_u64(),
        Some(dead.len() as u64),
        "{status}"
    );
    let (_, metrics) = agent.get("/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains(&format!(
            "meterd_records_dead_lettered_total {}",
            dead.len()
        )),
        "{metrics}"
    );
    // Nothing else: every record is either billed or dead, and the dead ones are not billed.
    assert!(records
        .iter()
        .all(|r| matches!(r.state, RecordState::Sent | RecordState::Dead)));
    let billed_keys: Vec<(i64, String)> = world
        .emulator
        .records()
        .iter()
        .map(|r| (r.hour, r.dimension.clone()))
        .collect();
    for d in &dead {
        assert!(!billed_keys.contains(&(d.hour, d.dimension.clone())));
    }
    let figures = settle("down_7h_dead_letter", 9, &oracle, &world.emulator, &dead);
    assert!(figures.dead_lettered > 0);
    agent.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Clock

/// The wall clock (agent and service alike) jumps forward 2 hours and back 10 minutes while
/// usage flows: every hour is billed once, none skipped, no timestamp out of bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh"]
async fn wall_clock_jumps_forward_and_back_bill_every_hour_once() {
    let world = Harness::new(H0 + 300).await;
    let clock = world.clock.clone();
    let agent = world.start_agent(world.config("")).await;
    let oracle = Oracle::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    send_batches(&agent, &oracle, &mut rng, "a", 5).await;
    // +2 h: from 00:05 to 02:05; hours 00 and 01 close at once.
    clock.set(from_unix_seconds(H0 + 2 * HOUR_SECS + 300));
    support::billed_at_least(&world.emulator, "hours 0 and 1 billed", 4).await;
    send_batches(&agent, &oracle, &mut rng, "b", 5).await;
    // Move to 03:05 (hour 02 closes and is billed), then −10 min back to 02:55.
    clock.set(from_unix_seconds(H0 + 3 * HOUR_SECS + 300));
    support::billed_at_least(&world.emulator, "hour 2 billed", 6).await;
    send_batches(&agent, &oracle, &mut rng, "c", 3).await;
    clock.set(from_unix_seconds(H0 + 3 * HOUR_SECS - 300));
    // Usage after the step back lands in an unsealed hour, never in the billed hour 02.
    send_batches(&agent, &oracle, &mut rng, "d", 5).await;
    let (_, current) = agent.get("/v1/usage/current").await;
    assert_eq!(
        current["hour"],
        meterd::clock::rfc3339(H0 + 3 * HOUR_SECS),
        "{current}"
    );
    // And again across a boundary: 03:55 → 04:05 → back to 03:58.
    clock.set(from_unix_seconds(H0 + 4 * HOUR_SECS - 300));
    send_batches(&agent, &oracle, &mut rng, "e", 3).await;
    clock.set(from_unix_seconds(H0 + 4 * HOUR_SECS + 300));
    support::billed_at_least(&world.emulator, "hour 3 billed", 8).await;
    clock.set(from_unix_seconds(H0 + 4 * HOUR_SECS - 120));
    send_batches(&agent, &oracle, &mut rng, "f", 3).await;
    clock.set(from_unix_seconds(H0 + 5 * HOUR_SECS + 60));
    support::billed_at_least(&world.emulator, "hour 4 billed", 10).await;
    settled(&world, &agent, unix_seconds(world.clock.now())).await;
    support::assert_no_meter_usage_errors(&world.emulator);
    let records = world.emulator.records();
    let (first, last) = assert_hours_contiguous(&records);
    assert_eq!((first, last), (H0, H0 + 4 * HOUR_SECS));
    for r in &records {
        assert!(
            r.timestamp as i64 >= r.hour && (r.timestamp as i64) < r.hour + HOUR_SECS,
            "timestamp outside its hour: {r:?}"
        );
    }
    settle("clock_jumps_shared", 2, &oracle, &world.emulator, &[]);
    agent.stop().await;
}

/// Only the agent's clock is wrong and gets corrected, while the service keeps true time:
/// 2 hours slow then stepped forward, later 10 minutes fast then stepped back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh"]
async fn agent_clock_corrections_keep_timestamps_in_bounds() {
    let truth = ManualClock::at_unix(H0 + 2 * HOUR_SECS + 300);
    let local = ManualClock::at_unix(H0 + 300);
    let world = Harness::on_clocks(local.clone(), truth.clone(), EmulatorConfig::demo()).await;
    let agent = world.start_agent(world.config("")).await;
    let oracle = Oracle::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    send_batches(&agent, &oracle, &mut rng, "slow", 5).await;
    // Hour 00 (agent time) closes while the agent is 2 h slow: sent 3 h late, in bounds.
    local.set(from_unix_seconds(H0 + HOUR_SECS + 60));
    truth.set(from_unix_seconds(H0 + 3 * HOUR_SECS + 60));
    support::billed_at_least(&world.emulator, "hour 0 billed", 2).await;
    send_batches(&agent, &oracle, &mut rng, "slow2", 3).await;
    // NTP steps the agent +2 h to the truth: 01:01 → 03:01; hours 01 and 02 close.
    local.set(from_unix_seconds(H0 + 3 * HOUR_SECS + 60));
    support::billed_at_least(&world.emulator, "hours 1 and 2 billed", 6).await;
    send_batches(&agent, &oracle, &mut rng, "ok", 3).await;
    // Later the agent runs 10 minutes fast: at true 03:55 it reads 04:05 and seals hour 03.
    truth.set(from_unix_seconds(H0 + 4 * HOUR_SECS - 300));
    local.set(from_unix_seconds(H0 + 4 * HOUR_SECS + 300));
    support::billed_at_least(&world.emulator, "hour 3 billed", 8).await;
    // Stepped back 10 minutes: usage now counts in hour 04, not in the billed hour 03.
    local.set(from_unix_seconds(H0 + 4 * HOUR_SECS - 300));
    send_batches(&agent, &oracle, &mut rng, "back", 5).await;
    truth.set(from_unix_seconds(H0 + 5 * HOUR_SECS + 60));
    local.set(from_unix_seconds(H0 + 5 * HOUR_SECS + 60));
    support::billed_at_least(&world.emulator, "hour 4 billed", 10).await;
    settled(&world, &agent, unix_seconds(world.clock.now())).await;
    support::assert_no_meter_usage_errors(&world.emulator);
    let (first, last) = assert_hours_contiguous(&world.emulator.records());
    assert_eq!((first, last), (H0, H0 + 4 * HOUR_SECS));
    settle(
        "clock_corrections_agent_only",
        2,
        &oracle,
        &world.emulator,
        &[],
    );
    agent.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Concurrency

/// 64 clients, each retrying its own requests and replaying ids other clients sent: each id
/// counts once, and the bill equals the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh"]
async fn sixty_four_clients_with_retried_ids_count_each_id_once() {
    let world = Harness::new(H0 + 300).await;
    let agent = Arc::new(world.start_agent(world.config("")).await);
    // An id's event is fixed by the id, so a replay from any client is the same event.
    fn event_of(id: usize) -> (Value, (String, String), i64) {
        let dimension = DIMENSIONS[id % 2];
        let tenant = TENANTS[id % 3];
        let q = (id % 97) as i64;
        (
            json!({"dimension": dimension, "quantity": q, "tags": {"tenant": tenant}, "id": format!("evt-{id}")}),
            (dimension.to_owned(), tenant.to_owned()),
            q,
        )
    }
    let counted: Arc<Mutex<BTreeMap<usize, bool>>> = Arc::default();
    let replays = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in 0..64usize {
        let (agent, counted, replays) = (agent.clone(), counted.clone(), replays.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(client as u64);
            for round in 0..10usize {
                let own: Vec<usize> = (0..5)
                    .map(|i| 10_000 + client * 100 + round * 5 + i)
                    .collect();
                // Replays of ids from a shared pool that every client sends.
                let shared: Vec<usize> = (0..3).map(|_| rng.gen_range(0..200)).collect();
                let ids: Vec<usize> = own.iter().chain(shared.iter()).copied().collect();
                let events: Vec<Value> = ids.iter().map(|id| event_of(*id).0).collect();
                let body = json!({"events": events}).to_string().into_bytes();
                // Each request is sent once or twice (a client retry after a lost answer).
                let sends = if rng.gen_bool(0.5) { 2 } else { 1 };
                for _ in 0..sends {
                    let (status, reply) = agent.post_raw(body.clone()).await;
                    assert_eq!(status, StatusCode::OK, "{reply}");
                    replays.fetch_add(reply["duplicates"].as_u64().unwrap_or(0), Ordering::Relaxed);
                    let mut counted = counted.lock().expect("counted");
                    for id in &ids {
                        counted.insert(*id, true);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let oracle = Oracle::default();
    {
        let counted = counted.lock().expect("counted");
        let mut totals = Totals::new();
        for id in counted.keys() {
            let (_, key, q) = event_of(*id);
            *totals.entry(key).or_default() += q;
        }
        oracle.ack(&totals, replays.load(Ordering::Relaxed));
        let expected_ids = counted.len() as u64;
        assert_eq!(
            agent.handles.metrics.events_accepted.get(),
            expected_ids,
            "each distinct id is accepted exactly once"
        );
    }
    let (_, current) = agent.get("/v1/usage/current").await;
    let current_total: i64 = current["usage"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["quantity"].as_i64()).sum())
        .unwrap_or(0);
    assert_eq!(current_total, oracle.acked().values().sum::<i64>());
    let agent = Arc::try_unwrap(agent).unwrap_or_else(|_| panic!("agent still shared"));
    agent.stop().await;
    settle("concurrency_64_clients", 64, &oracle, &world.emulator, &[]);
}

// ---------------------------------------------------------------------------------------------
// Storage: a tiny tmpfs that fills up

/// A tmpfs mounted for the test; unmounted on drop.
struct TinyFs {
    path: PathBuf,
}

impl TinyFs {
    fn mount(path: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN); scripts/reliability.sh runs as root in CI: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { path }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Fills the filesystem holding `dir` with a filler file until the kernel says no.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    for chunk in [64 * 1024, 4096, 512, 1] {
        let buf = vec![0xA5u8; chunk];
        for _ in 0..100_000 {
            if f.write_all(&buf).is_err() {
                break;
            }
        }
    }
    let _ = f.sync_all();
    path
}

/// The state dir on a 2 MiB tmpfs: when it is full, ingest answers 507 with a clear error and
/// records nothing; once space returns the same requests are acknowledged and everything
/// acknowledged is billed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh (root, for the tmpfs)"]
async fn full_disk_answers_507_loses_nothing_and_recovers() {
    let world = Harness::new(H0 + 300).await;
    let clock = world.clock.clone();
    let fs = TinyFs::mount(world.dir.path().join("tiny"), "2m");
    let state = fs.path.join("state");
    let mut config = world.config("");
    config.state.dir = state.clone();
    let agent = world.start_agent(config).await;
    let oracle = Oracle::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    send_batches(&agent, &oracle, &mut rng, "before", 20).await;

    let filler = fill(&fs.path);
    // Post until the ledger runs out of room (its WAL may have some slack first).
    let mut refused = None;
    let mut held: Vec<(Vec<u8>, Totals)> = Vec::new();
    for i in 0..2000 {
        let (body, totals) = random_batch(&mut rng, &format!("full-{i}"), 50);
        let (status, reply) = agent.post_raw(body.clone()).await;
        if status == StatusCode::OK {
            oracle.ack(&totals, 0);
            continue;
        }
        held.push((body, totals));
        refused = Some((status, reply));
        break;
    }
    let (status, reply) = refused.expect("the full disk was never noticed");
    assert!(
        status == StatusCode::INSUFFICIENT_STORAGE || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status} {reply}"
    );
    let error = reply["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("disk is full") && error.contains("nothing of this request was recorded"),
        "{error}"
    );
    // Still refused while full, and the agent says so.
    let (status, _) = agent.post_raw(held[0].0.clone()).await;
    assert_ne!(status, StatusCode::OK, "a write succeeded on a full disk");
    let (_, status_doc) = agent.get("/v1/status").await;
    assert_eq!(status_doc["ledger"]["writable"], false, "{status_doc}");
    assert_eq!(
        agent.get("/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (_, metrics) = agent.get("/metrics").await;
    assert!(
        metrics.as_str().unwrap_or_default().contains("disk_full"),
        "{metrics}"
    );
    // The hour closes while the disk is full: sealing may fail and is retried. The seal loop
    // (like every loop the jump woke) has tried once it sleeps on the clock again.
    let sleeping = clock.sleepers();
    clock.set(from_unix_seconds(H0 + HOUR_SECS + 30));
    eventually("the woken loops asleep again", PATIENCE, async || {
        clock.due_sleepers() == 0 && clock.sleepers() >= sleeping
    })
    .await;

    // Space returns: the refused request goes through with its ids, counted once.
    std::fs::remove_file(&filler).expect("free space");
    clock.advance(Duration::from_secs(10));
    for (body, totals) in &held {
        post_until_acked(
            &agent.target(),
            None,
            body,
            totals,
            &oracle,
            Duration::from_secs(30),
        )
        .await;
    }
    eventually("ready again", PATIENCE, async || {
        agent.handles.status.is_ready()
    })
    .await;
    send_batches(&agent, &oracle, &mut rng, "after", 5).await;

    // Full again with nothing else to write (no seal due, nothing to deliver): readiness comes
    // back by itself once space returns. A NotReady sidecar gets no traffic, so it must not
    // wait for a request to succeed.
    settled(&world, &agent, unix_seconds(world.clock.now())).await;
    let filler = fill(&fs.path);
    let mut refused = None;
    for i in 0..2000 {
        let (body, totals) = random_batch(&mut rng, &format!("full-again-{i}"), 50);
        if agent.post_raw(body.clone()).await.0 == StatusCode::OK {
            oracle.ack(&totals, 0);
        } else {
            refused = Some((body, totals));
            break;
        }
    }
    let (body, totals) = refused.expect("the full disk was never noticed");
    assert_eq!(
        agent.get("/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    std::fs::remove_file(&filler).expect("free space");
    clock.advance(Duration::from_secs(10));
    eventually("ready again before any request", PATIENCE, async || {
        agent.handles.status.is_ready()
    })
    .await;
    post_until_acked(
        &agent.target(),
        None,
        &body,
        &totals,
        &oracle,
        Duration::from_secs(30),
    )
    .await;
    clock.set(from_unix_seconds(H0 + 2 * HOUR_SECS + 30));
    support::billed_at_least(&world.emulator, "both hours billed", 4).await;
    settled(&world, &agent, unix_seconds(world.clock.now())).await;
    support::assert_no_meter_usage_errors(&world.emulator);
    settle("disk_full_tmpfs", 1, &oracle, &world.emulator, &[]);
    agent.stop().await;
    drop(fs);
}

// ---------------------------------------------------------------------------------------------
// The real binary

async fn bin_rig(clock: SharedClock, server_extra: &str) -> BinaryRig {
    let sending = "call_timeout = \"5s\"\nspread = \"0s\"\nmax_calls_per_second = 1000";
    BinaryRig::new(clock, server_extra, sending).await
}

async fn sigterm_and_wait(mut child: Child) -> (std::process::ExitStatus, String) {
    support::sigterm(&child);
    let mut stderr = child.stderr.take();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within the grace period")
        .expect("wait");
    let mut err = String::new();
    if let Some(e) = stderr.as_mut() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut err).await;
    }
    (status, err)
}

/// libfaketime's preload library, as Debian's `libfaketime` package installs it.
fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("libfaketime is not installed (apt-get install faketime); scripts/reliability.sh installs it")
        })
}

/// `@YYYY-MM-DD hh:mm:ss` for libfaketime (UTC; the child runs with TZ=UTC).
fn faketime_spec(t: SystemTime, speed: u32) -> String {
    let text = humantime::format_rfc3339_seconds(t).to_string();
    let text = text.trim_end_matches('Z').replace('T', " ");
    format!("@{text} x{speed}")
}

/// kill -9 at random moments while concurrent clients post usage with ids, with the agent's
/// wall clock (libfaketime, sped up) crossing hour boundaries during the loop. The emulator
/// runs in this process on a `ScaledClock` with the same origin and speed, so both agree on
/// the time; each restart's libfaketime start is read from that clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh (needs libfaketime)"]
async fn kill9_loop_across_hour_boundaries_loses_and_doubles_nothing() {
    const SPEED: u32 = 720; // an hour passes in 5 s
    let iterations = env_usize("METERD_RELIABILITY_KILLS", 20);
    let n_clients = env_usize("METERD_RELIABILITY_CLIENTS", 8);
    let preload = libfaketime();
    // Start 2 min (fake) before an hour boundary: the first one is crossed almost at once.
    let clock: SharedClock = ScaledClock::new(from_unix_seconds(H0 - 120), f64::from(SPEED));
    let s = BinaryRig::with_metering(
        clock.clone(),
        "",
        "call_timeout = \"5s\"",
        support::emulator_with_dimensions(&["peak", "users"]),
        Some(KILL9_METERING),
    )
    .await;
    let spawn = |clock: &SharedClock| {
        let mut cmd = s.command(BIN, ACCESS_KEY);
        cmd.env("LD_PRELOAD", &preload)
            .env("FAKETIME", faketime_spec(clock.now(), SPEED))
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_NO_CACHE", "1");
        cmd.spawn().expect("spawn agent")
    };
    let first_hour = hour_floor(unix_seconds(clock.now()));
    let mut child = spawn(&clock);
    support::wait_ready(&s.addr, &mut child).await;

    let oracle = Arc::new(Oracle::default());
    let max_acks = Arc::new(Mutex::new(Vec::<MaxAck>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..n_clients {
        let (oracle, stop, target) = (oracle.clone(), stop.clone(), Target::Tcp(s.addr.clone()));
        let (max_acks, clock) = (max_acks.clone(), clock.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + c as u64);
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let (body, totals, maxima) = kill9_batch(&mut rng, &format!("c{c}-{seq}"), 20);
                let sent = unix_seconds(clock.now());
                post_until_acked(
                    &target,
                    None,
                    &body,
                    &totals,
                    &oracle,
                    Duration::from_secs(60),
                )
                .await;
                let acked = unix_seconds(clock.now());
                max_acks
                    .lock()
                    .expect("max acks")
                    .extend(maxima.into_iter().map(|(value, tenant)| MaxAck {
                        value,
                        tenant,
                        sent,
                        acked,
                    }));
            }
        }));
    }

    let mut rng = rand::rngs::StdRng::from_entropy();
    for _ in 0..iterations {
        let pause = rng.gen_range(50..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reaped");
        child = spawn(&clock);
        support::wait_ready(&s.addr, &mut child).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    let last_hour = hour_floor(unix_seconds(clock.now()));
    let boundaries = (last_hour - first_hour) / HOUR_SECS;
    let (status, stderr) = sigterm_and_wait(child).await;
    assert!(status.success(), "SIGTERM exit status {status}: {stderr}");
    assert!(
        boundaries >= 2,
        "the loop crossed only {boundaries} hour boundaries"
    );

    let ledger = meterd::ledger::read_records_at(&s.state_dir(), 100_000).expect("ledger");
    assert!(
        ledger.iter().all(|r| r.state == RecordState::Sent),
        "records left undelivered: {:?}",
        ledger
            .iter()
            .filter(|r| r.state != RecordState::Sent)
            .collect::<Vec<_>>()
    );
    let records = s.emulator.records();
    let (first, last) = assert_hours_contiguous_for(&records, &KILL9_DIMENSIONS);
    assert!(last - first >= 2 * HOUR_SECS, "{first}..{last}");
    let acks = max_acks.lock().expect("max acks").clone();
    // 300 fake seconds are 0.4 s of real time: far more than a spawn's lag.
    let (max_lost, max_invented, max_hours) = check_max(&acks, &records, 300);
    println!(
        "RELIABILITY scenario=kill9_faketime_max events_acked={} hours_billed={max_hours} lost={max_lost} double_billed={max_invented}",
        acks.len()
    );
    assert!(
        !acks.is_empty() && max_hours >= 2,
        "the max dimension saw no usage"
    );
    assert_eq!((max_lost, max_invented), (0, 0), "max: lost or invented");
    let unique_acked: i64 = oracle
        .acked()
        .iter()
        .filter(|((d, _), _)| d == "users")
        .map(|(_, q)| q)
        .sum();
    let unique_billed: i64 = records
        .iter()
        .filter(|r| r.dimension == "users")
        .map(|r| r.quantity)
        .sum();
    println!(
        "RELIABILITY scenario=kill9_faketime_unique distinct_acked={unique_acked} billed={unique_billed}"
    );
    assert!(unique_acked > 0, "the unique dimension saw no usage");
    let errors = support::meter_usage_errors(&s.emulator);
    assert!(
        !errors.iter().any(|e| e == "TimestampOutOfBoundsException"),
        "{errors:?}"
    );
    println!(
        "RELIABILITY kill9 hour_boundaries={boundaries} billed_hours={}",
        (last - first) / HOUR_SECS + 1
    );
    settle("kill9_faketime", iterations, &oracle, &s.emulator, &[]);
}

/// A truncated or emptied ledger stops the agent at start with exit 74 and a clear message,
/// and the file is left exactly as it was (never silently reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh"]
async fn a_truncated_ledger_is_refused_with_exit_74_and_left_untouched() {
    let s = bin_rig(Arc::new(SystemClock), "").await;
    let mut child = s.command(BIN, ACCESS_KEY).spawn().expect("spawn");
    support::wait_ready(&s.addr, &mut child).await;
    // Enough usage for a ledger of several pages.
    let oracle = Oracle::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for i in 0..40 {
        let (body, totals) = random_batch(&mut rng, &format!("t{i}"), 50);
        post_until_acked(
            &Target::Tcp(s.addr.clone()),
            None,
            &body,
            &totals,
            &oracle,
            Duration::from_secs(30),
        )
        .await;
    }
    let (status, err) = sigterm_and_wait(child).await;
    assert!(status.success(), "{err}");
    let ledger = meterd::ledger::ledger_path(&s.state_dir());
    // Fold the WAL into the main file, so that the file alone is the whole ledger.
    {
        let conn = rusqlite::Connection::open(&ledger).expect("open the ledger");
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    let intact = std::fs::read(&ledger).expect("ledger");
    assert!(
        intact.len() >= 8 * 4096,
        "ledger only {} bytes",
        intact.len()
    );
    for (name, cut) in [
        ("half", intact.len() / 2),
        ("one page", 4096),
        ("a partial header", 60),
        ("nothing", 0),
    ] {
        std::fs::write(&ledger, &intact[..cut]).expect("truncate");
        for suffix in ["-wal", "-shm"] {
            let mut side = ledger.clone().into_os_string();
            side.push(suffix);
            let _ = std::fs::remove_file(side);
        }
        let out = s.command(BIN, ACCESS_KEY).output().await.expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(74),
            "ledger truncated to {name}: {stderr}"
        );
        assert!(
            stderr.contains("is corrupt or unreadable") && stderr.contains("left untouched"),
            "ledger truncated to {name}: {stderr}"
        );
        let after = std::fs::read(&ledger).expect("ledger");
        assert!(
            after == intact[..cut],
            "the ledger truncated to {name} was modified ({} bytes, now {})",
            cut,
            after.len()
        );
        println!("RELIABILITY scenario=truncated_ledger cut={name:?} exit=74 file_unchanged=true");
    }
    // Restored, it starts again and still holds everything.
    std::fs::write(&ledger, &intact).expect("restore");
    let mut child = s.command(BIN, ACCESS_KEY).spawn().expect("spawn");
    support::wait_ready(&s.addr, &mut child).await;
    let (status, err) = sigterm_and_wait(child).await;
    assert!(status.success(), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Security

#[test]
#[ignore = "reliability suite: scripts/reliability.sh"]
fn the_local_api_listens_on_loopback_by_default() {
    let config = Config::from_toml_str(
        "product_code = \"prod-demo1234\"\npricing = \"custom\"\n[metering]\ndimensions = [\"requests\"]\n",
    )
    .expect("minimal config");
    let addr = config.listen_addr().expect("a TCP listener by default");
    assert!(addr.ip().is_loopback(), "default listen {addr}");
    assert_eq!(addr.to_string(), "127.0.0.1:8377");
    assert!(config.server.unix_socket.is_empty());
}

/// With debug logging of every crate, neither the bearer token nor the AWS secret key appears
/// in the agent's output, through start-up, requests (right and wrong token), sending and
/// shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh"]
async fn no_secret_appears_in_debug_logs() {
    const TOKEN: &str = "tok-9f2c71d0e4b8a6-SECRET";
    const AWS_SECRET: &str = "aws-secret-3be1c9d7f05a42-SECRET";
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let emulator_clock: SharedClock = Arc::new(SystemClock);
    let s = bin_rig(
        emulator_clock,
        &format!("auth_token_file = {:?}", token_file.display().to_string()),
    )
    .await;
    let mut cmd = s.command(BIN, ACCESS_KEY);
    cmd.env("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        .env("METERD_LOG", "debug")
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdout = child.stdout.take();
    support::wait_ready(&s.addr, &mut child).await;
    let target = Target::Tcp(s.addr.clone());
    let body =
        json!({"dimension": "requests", "quantity": 5, "tags": {"tenant": "t0"}, "id": "x1"})
            .to_string()
            .into_bytes();
    let ok = local_client::call(
        &target,
        Method::POST,
        "/v1/usage",
        Some(body.clone()),
        Some(TOKEN),
        Duration::from_secs(5),
    )
    .await
    .expect("post");
    assert_eq!(ok.0, StatusCode::OK);
    let wrong = local_client::call(
        &target,
        Method::POST,
        "/v1/usage",
        Some(body),
        Some("not-the-token"),
        Duration::from_secs(5),
    )
    .await
    .expect("post");
    assert_eq!(wrong.0, StatusCode::UNAUTHORIZED);
    for path in ["/v1/status", "/metrics", "/v1/usage/current"] {
        let r = local_client::call(
            &target,
            Method::GET,
            path,
            None,
            Some(TOKEN),
            Duration::from_secs(5),
        )
        .await
        .expect("get");
        assert_eq!(r.0, StatusCode::OK, "{path}");
    }
    // SIGTERM: the open hour is sealed and sent (a SigV4-signed MeterUsage) before exit.
    let (status, stderr) = sigterm_and_wait(child).await;
    assert!(status.success(), "{stderr}");
    let mut out = String::new();
    if let Some(o) = stdout.as_mut() {
        use tokio::io::AsyncReadExt;
        let _ = o.read_to_string(&mut out).await;
    }
    assert_eq!(s.emulator.records().len(), 2, "the flush sent signed calls");
    let logs = format!("{out}{stderr}");
    assert!(
        logs.lines().count() > 20,
        "debug logging produced too little to be a test: {logs}"
    );
    for secret in [TOKEN, AWS_SECRET] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    // Nor a recognisable piece of either.
    assert!(!logs.contains("9f2c71d0e4b8a6") && !logs.contains("3be1c9d7f05a42"));
    println!(
        "RELIABILITY scenario=no_secret_in_logs log_lines={} secrets_found=0",
        logs.lines().count()
    );
}

// ---------------------------------------------------------------------------------------------
// Contract pricing: floating seats through kill -9

/// The real binary on contract pricing, killed with SIGKILL again and again while the
/// application takes floating seats through it (some requests cut off mid-way): after every
/// restart the license holds at most the agent's own checkout and one consumption per seat
/// request ever answered or in flight, never two of either; once the agent is gone for good,
/// no seat stays checked out past the consumptions' expiry (emulator clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh"]
async fn kill9_while_holding_floating_seats_leaks_and_doubles_no_seat() {
    let iterations = env_usize("METERD_RELIABILITY_KILLS", 20).min(30);
    let clock = ManualClock::new(SystemTime::now());
    let s = BinaryRig::new(clock.clone(), "", "spread = \"0s\"").await;
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let text = text
        .replace("pricing = \"hourly+custom\"", "pricing = \"contract\"")
        .replace(
            &format!("[metering]\n{}", support::DEMO_METERING),
            "[metering]",
        );
    let contract = format!(
        "\n[contract]\nproduct_sku = \"{}\"\n[[contract.entitlements]]\nname = \"Tier\"\nunit = \"None\"\n",
        support::PRODUCT
    );
    std::fs::write(&s.config_path, text + &contract).expect("contract config");

    let holding = |s: &BinaryRig| -> Vec<meterd::emulator::license_manager::Consumption> {
        let now = unix_seconds(clock.now());
        s.emulator
            .license_consumptions()
            .into_iter()
            .filter(|c| c.holds(now))
            .collect()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut asked = 0usize;
    for i in 0..iterations {
        let mut child = s.command(BIN, ACCESS_KEY).spawn().expect("spawn agent");
        support::wait_ready(&s.addr, &mut child).await;
        let held = holding(&s);
        let own = held
            .iter()
            .filter(|c| c.entitlements.iter().any(|e| e.name == "Tier"))
            .count();
        assert_eq!(
            own, 1,
            "iteration {i}: the agent's own checkout, once: {held:?}"
        );
        assert!(
            held.len() <= 1 + asked,
            "iteration {i}: {} consumptions for {asked} seat requests: {held:?}",
            held.len()
        );
        // A seat request, killed at a random point (before, during or after its answer).
        asked += 1;
        let body = json!({"name": "Seats", "count": 1, "id": format!("seat-{i}")}).to_string();
        let target = Target::Tcp(s.addr.clone());
        let request = tokio::spawn(async move {
            local_client::call(
                &target,
                Method::POST,
                "/v1/entitlements/checkout",
                Some(body.into_bytes()),
                None,
                Duration::from_secs(5),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..40))).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        let _ = request.await;
    }
    let held = holding(&s);
    assert!(held.len() <= 1 + asked, "{held:?}");
    // Gone for good: an hour and a minute later (the consumptions' lifetime), nothing holds.
    clock.advance(Duration::from_secs(3660));
    let left = holding(&s);
    assert!(left.is_empty(), "seats still checked out: {left:?}");
    println!(
        "RELIABILITY contract_kill9: {iterations} kills, {} consumptions in all, none held twice, none left",
        s.emulator.license_consumptions().len()
    );
}

// ---------------------------------------------------------------------------------------------
// A fleet of real processes (issue 16)

/// Wall time that the test moves for processes under libfaketime: real time plus an offset,
/// written as `+<seconds>` to the file that `FAKETIME_TIMESTAMP_FILE` names (libfaketime reads
/// it again on every call with `FAKETIME_NO_CACHE=1`; an offset without an `x` rate means the
/// same time in every process, whenever it started) and read by the emulator in this process,
/// so the agents and the service agree on the time. [`FakeWall::tick`], every 10 ms, makes it
/// run `speed` times faster than real time; [`FakeWall::jump_to`] moves it forward at once.
struct FakeWall {
    file: PathBuf,
    /// Fake minus real time, nanoseconds.
    offset_nanos: std::sync::atomic::AtomicI64,
    /// (fake time at `origin`, `origin`, speed): where [`FakeWall::tick`] aims.
    pace: Mutex<(SystemTime, std::time::Instant, f64)>,
}

impl FakeWall {
    fn start(file: PathBuf, at: SystemTime, speed: f64) -> Arc<Self> {
        let wall = Arc::new(Self {
            file,
            offset_nanos: Default::default(),
            pace: Mutex::new((at, std::time::Instant::now(), speed)),
        });
        wall.tick();
        wall
    }

    fn speed(&self) -> f64 {
        self.pace.lock().expect("pace").2
    }

    /// Sets the offset to where the pace says the time is, and writes it for libfaketime
    /// (renamed into place, so a reader never sees half a line).
    fn tick(&self) {
        let pace = self.pace.lock().expect("pace");
        let target = pace.0 + pace.1.elapsed().mul_f64(pace.2);
        let real = SystemTime::now();
        let offset = match target.duration_since(real) {
            Ok(ahead) => i64::try_from(ahead.as_nanos()).expect("offset"),
            Err(behind) => -i64::try_from(behind.duration().as_nanos()).expect("offset"),
        };
        self.offset_nanos.store(offset, Ordering::SeqCst);
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{:+.6}\n", offset as f64 / 1e9)).expect("faketime file");
        std::fs::rename(&tmp, &self.file).expect("faketime file");
    }

    /// Moves the time forward to `to` at once; it runs on from there at the same speed.
    fn jump_to(&self, to: SystemTime) {
        {
            let mut pace = self.pace.lock().expect("pace");
            assert!(to >= self.now(), "the fake wall only jumps forward");
            *pace = (to, std::time::Instant::now(), pace.2);
        }
        self.tick();
    }
}

impl Clock for FakeWall {
    fn now(&self) -> SystemTime {
        let offset = self.offset_nanos.load(Ordering::SeqCst);
        let real = SystemTime::now();
        if offset >= 0 {
            real + Duration::from_nanos(offset.unsigned_abs())
        } else {
            real - Duration::from_nanos(offset.unsigned_abs())
        }
    }

    fn sleep_until(&self, deadline: SystemTime) -> meterd::clock::SleepFuture<'_> {
        Box::pin(async move {
            while let Ok(left) = deadline.duration_since(self.now()) {
                if left.is_zero() {
                    return;
                }
                let real = left.div_f64(self.speed()).min(Duration::from_millis(10));
                tokio::time::sleep(real).await;
            }
        })
    }
}

/// One `meterd run` of the fleet.
struct FleetProcess {
    child: Child,
    addr: String,
    access_key: String,
    dir: PathBuf,
}

impl FleetProcess {
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Fails the test, with the agent's log, if it has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "agent {} exited with {status}: {}",
                self.access_key,
                self.stderr()
            );
        }
    }

    /// Records still pending in its ledger, from `/v1/status`.
    async fn pending(&self) -> Option<u64> {
        let target = Target::Tcp(self.addr.clone());
        let r = local_client::call(
            &target,
            Method::GET,
            "/v1/status",
            None,
            None,
            Duration::from_secs(5),
        )
        .await;
        let Ok((StatusCode::OK, body)) = r else {
            return None;
        };
        let status: Value = serde_json::from_slice(&body).ok()?;
        status["records"]["pending"].as_u64()
    }
}

/// Issue 16's fleet as real processes: 50 `meterd run` (the test binary; each its own state
/// dir, ledger, instance id and access key; the unmapped keys share the emulator's default
/// account and its quotas, MeterUsage 10 a second, RegisterUsage 5), the default `[sending]`
/// (spread 5 minutes, 2 calls a second), 3 dimensions, across two hour boundaries, against one
/// emulator in this process. The agents' wall clock is libfaketime's and the emulator's a
/// [`FakeWall`] on the same offset: it runs 10 times faster than real time while the fleet
/// starts and sends, and jumps over the quiet part of each hour. At that speed a wait of the
/// agent's (`SystemClock` looks again after at most 1 s of real time) ends up to 10 s of fake
/// time late and the 2-a-second limit spaces an agent's calls 5 fake seconds apart: slower,
/// never faster, than the settings. Every unit is billed exactly once, none is dead-lettered,
/// each hour's last record is accepted within spread + 5 minutes of its close, the service
/// never accepts more MeterUsage calls in one second than the quota, every agent registers and
/// none exits.
///
/// ```sh
/// cargo test --test reliability fifty_real_processes -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reliability suite: scripts/reliability.sh (needs libfaketime)"]
async fn fifty_real_processes_share_one_accounts_quota_across_two_hour_boundaries() {
    const AGENTS: usize = 50;
    const SPEED: f64 = 10.0;
    const HOURS: i64 = 2;
    const DIMS: [&str; 3] = ["requests", "gigabytes", "seats"];
    let spread = 300;
    let real_start = std::time::Instant::now();
    let preload = libfaketime();
    let wall_dir = tempfile::tempdir().expect("tempdir");
    // 20 minutes into the first hour.
    let wall = FakeWall::start(
        wall_dir.path().join("faketime.rc"),
        from_unix_seconds(H0 + 1200),
        SPEED,
    );
    let ticker = tokio::spawn({
        let wall = wall.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                wall.tick();
            }
        }
    });
    let mut emulator_config = support::emulator_with_dimensions(&["seats"]);
    emulator_config.quotas = meterd::emulator::quotas::QuotaConfig::default();
    let (emulator, dir, key) = support::emulator_and_key(emulator_config, wall.clone()).await;
    let metering = format!("dimensions = {DIMS:?}");

    // The rollout: every process at once.
    let t0 = wall.now();
    let mut fleet = Vec::with_capacity(AGENTS);
    for i in 0..AGENTS {
        let agent_dir = dir.path().join(format!("agent-{i}"));
        std::fs::create_dir_all(&agent_dir).expect("agent dir");
        let addr = format!("127.0.0.1:{}", support::free_port());
        let config_path = agent_dir.join("meterd.toml");
        std::fs::write(
            &config_path,
            support::agent_toml(&support::AgentToml {
                key: &key,
                state: &agent_dir.join("state"),
                endpoint: &emulator.endpoint_url(),
                listen: &addr,
                server_extra: "",
                sending: "",
                metering: Some(&metering),
            }),
        )
        .expect("config");
        let access_key = format!("AKIAPROC{i:012}");
        let log = std::fs::File::create(agent_dir.join("stderr.log")).expect("log file");
        let mut cmd = support::agent_command(BIN, &config_path, &agent_dir, &access_key);
        cmd.env("LD_PRELOAD", &preload)
            .env("FAKETIME_TIMESTAMP_FILE", &wall.file)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stderr(Stdio::from(log));
        fleet.push(FleetProcess {
            child: cmd.spawn().expect("spawn agent"),
            addr,
            access_key,
            dir: agent_dir,
        });
    }
    for p in &mut fleet {
        support::wait_ready(&p.addr, &mut p.child).await;
    }
    let all_ready_after = wall.now().duration_since(t0).unwrap_or_default();
    let account = "000000000000";
    let rates = emulator.rates();
    let register = &rates[account]["RegisterUsage"];
    let (register_accepted, register_throttled) = (register.accepted, register.throttled);
    assert!(register_accepted >= AGENTS as u64, "{register:?}");

    let mut oracle = support::FleetOracle::new();
    let mut seed = 16u64;
    let (mut waited_real, mut sent_by) = (Vec::new(), Vec::new());
    for hour in 0..HOURS {
        let hour_start = H0 + hour * HOUR_SECS;
        let close = hour_start + HOUR_SECS;
        let now = unix_seconds(wall.now());
        assert!(
            now >= hour_start && now < close - 120,
            "hour {hour}: the fleet posts at {now}, outside its hour"
        );
        for p in &fleet {
            let events: Vec<Value> = DIMS
                .iter()
                .map(|d| {
                    let q = support::next_quantity(&mut seed);
                    oracle.insert((p.access_key.clone(), hour_start, (*d).to_owned()), q);
                    json!({"dimension": d, "quantity": q})
                })
                .collect();
            let body = json!({ "events": events }).to_string().into_bytes();
            let r = local_client::call(
                &Target::Tcp(p.addr.clone()),
                Method::POST,
                "/v1/usage",
                Some(body),
                None,
                Duration::from_secs(5),
            )
            .await;
            assert!(matches!(r, Ok((StatusCode::OK, _))), "{r:?}");
        }
        // The quiet part of the hour is jumped over; the agents seal at the close + 2 s.
        wall.jump_to(from_unix_seconds(close - 10));
        let hour_real = std::time::Instant::now();
        let expected = AGENTS * DIMS.len();
        let (billed_all, calls_seen) =
            (std::cell::Cell::new(false), std::cell::Cell::new(u64::MAX));
        let fleet_cell = tokio::sync::Mutex::new(&mut fleet);
        eventually(
            &format!("hour {hour} billed and recorded by every agent"),
            Duration::from_secs(300),
            async || {
                let mut fleet = fleet_cell.lock().await;
                for p in fleet.iter_mut() {
                    p.assert_running();
                }
                // The records are counted again only once the service has heard more calls.
                let calls = emulator.calls_counted();
                if !billed_all.get() && calls != calls_seen.get() {
                    calls_seen.set(calls);
                    let billed = emulator
                        .records()
                        .iter()
                        .filter(|r| r.hour == hour_start)
                        .count();
                    billed_all.set(billed >= expected);
                }
                if !billed_all.get() {
                    return false;
                }
                for p in fleet.iter() {
                    if p.pending().await != Some(0) {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        waited_real.push(hour_real.elapsed().as_secs_f64());
        sent_by.push(unix_seconds(wall.now()));
        if hour + 1 < HOURS {
            // On to the next hour's usage, 20 minutes into it at most.
            let next = from_unix_seconds(close + 1200);
            if wall.now() < next {
                wall.jump_to(next);
            }
        }
    }
    // A minute on (nothing is pending), so the shutdown's calls fall in seconds of their own.
    wall.jump_to(wall.now() + Duration::from_secs(60));
    let end_fake = unix_seconds(wall.now());

    // None exited; each stops cleanly on SIGTERM.
    for p in &mut fleet {
        p.assert_running();
        support::sigterm(&p.child);
    }
    for p in &mut fleet {
        let status = tokio::time::timeout(Duration::from_secs(60), p.child.wait())
            .await
            .expect("exits within the grace period")
            .expect("wait");
        assert!(
            status.success(),
            "{}: {status}: {}",
            p.access_key,
            p.stderr()
        );
    }
    ticker.abort();

    struct Hour {
        records: u64,
        calls: u64,
        throttled: u64,
        peak_calls: u32,
        peak_accepted: u32,
        last_accepted_after: i64,
        dead: u64,
    }
    let mut hours: Vec<Hour> = (0..HOURS)
        .map(|_| Hour {
            records: 0,
            calls: 0,
            throttled: 0,
            peak_calls: 0,
            peak_accepted: 0,
            last_accepted_after: 0,
            dead: 0,
        })
        .collect();
    for p in &fleet {
        let ledger =
            meterd::ledger::read_records_at(&p.dir.join("state"), 100_000).expect("ledger");
        for r in ledger {
            let Some(hour) = hours.get_mut(((r.hour - H0) / HOUR_SECS) as usize) else {
                continue;
            };
            hour.records += 1;
            if r.state == RecordState::Dead {
                hour.dead += 1;
            }
            let close = r.hour + HOUR_SECS;
            let after = r.sent_at.map_or(i64::MAX, |t| t - close);
            hour.last_accepted_after = hour.last_accepted_after.max(after);
        }
    }
    // The service's calls from each hour's close until its records were all recorded as
    // sent; after the last, those of the shutdown's final flush (the open hour, unspread).
    let rates = emulator.rates();
    let meter = &rates[account]["MeterUsage"];
    let (mut flush_calls, mut flush_throttled) = (0u64, 0u64);
    for s in meter
        .seconds
        .iter()
        .filter(|s| s.second > sent_by[sent_by.len() - 1])
    {
        flush_calls += u64::from(s.accepted) + u64::from(s.throttled);
        flush_throttled += u64::from(s.throttled);
    }
    for (i, hour) in hours.iter_mut().enumerate() {
        let from = H0 + (i as i64 + 1) * HOUR_SECS;
        for s in meter
            .seconds
            .iter()
            .filter(|s| s.second >= from && s.second <= sent_by[i])
        {
            hour.calls += u64::from(s.accepted) + u64::from(s.throttled);
            hour.throttled += u64::from(s.throttled);
            hour.peak_calls = hour.peak_calls.max(s.accepted + s.throttled);
            hour.peak_accepted = hour.peak_accepted.max(s.accepted);
        }
    }
    println!(
        "RELIABILITY scenario=fleet_real_processes agents={AGENTS} dimensions={} speed={SPEED} all_ready_after_fake_s={:.1} register_calls={} register_throttled={register_throttled} shutdown_flush_calls={flush_calls} shutdown_flush_throttled={flush_throttled} fake_end={} real_s={:.0}",
        DIMS.len(),
        all_ready_after.as_secs_f64(),
        register_accepted + register_throttled,
        end_fake - H0,
        real_start.elapsed().as_secs_f64()
    );
    for (i, hour) in hours.iter().enumerate() {
        println!(
            "RELIABILITY fleet_real_processes hour={i} records={} calls={} throttled={} peak_calls_per_s={} peak_accepted_per_s={} last_accepted_after_close_s={} dead_letters={} real_s={:.1}",
            hour.records,
            hour.calls,
            hour.throttled,
            hour.peak_calls,
            hour.peak_accepted,
            hour.last_accepted_after,
            hour.dead,
            waited_real[i]
        );
    }
    support::assert_billed_once(&emulator, &oracle, H0 + HOURS * HOUR_SECS);
    let quota = meter.quota.expect("the MeterUsage quota is on");
    for (i, hour) in hours.iter().enumerate() {
        let delivered = support::HourDelivered {
            records: hour.records,
            dead_letters: hour.dead,
            unsent: 0,
            last_accepted_after: hour.last_accepted_after,
        };
        support::assert_hour_delivered(i, delivered, (AGENTS * DIMS.len()) as u64, spread + 300);
        assert!(
            hour.peak_accepted <= quota,
            "hour {i}: {} calls accepted in one second",
            hour.peak_accepted
        );
    }
}
