//! The real `meterd` binary: crash-safety under SIGKILL, SIGTERM flush, exit codes.
//!
//! The emulator runs in this test process (so it outlives every kill); the agent is a child.
//! `METERD_CRASH_ITERATIONS` sets the number of kills (default 20; the long mode uses 200).
#![cfg(feature = "emulator")]

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, StatusCode};
use rand::Rng;
use tokio::process::{Child, Command};

use meterd::clock::SystemClock;
use meterd::local_client::{self, Target};

use meterd_test_support as support;

use support::BinaryRig;

const BIN: &str = env!("CARGO_BIN_EXE_meterd");

async fn setup() -> BinaryRig {
    let sending = "spread = \"0s\"\nmax_calls_per_second = 1000\n";
    BinaryRig::new(Arc::new(SystemClock), "", sending).await
}

fn agent_command(config: &Path, cwd: &Path) -> Command {
    support::agent_command(BIN, config, cwd, "AKIACRASHTEST0000001")
}

/// `meterd run` on the rig, once it answers `/readyz`.
async fn spawn_ready(s: &BinaryRig) -> Child {
    let mut child = agent_command(&s.config_path, s.dir.path())
        .spawn()
        .expect("spawn");
    support::wait_ready(&s.addr, &mut child).await;
    child
}

/// Every acknowledged count is billed exactly once, however often the agent is SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let iterations: usize = std::env::var("METERD_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let s = setup().await;
    let mut child = spawn_ready(&s).await;

    // Oracle: acknowledged quantity per dimension. Clients retry an unacknowledged request
    // with the same id until it is acknowledged, as an application using ids would.
    let acked: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let sent_requests = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..8 {
        let (acked, stop, sent, addr) = (
            acked.clone(),
            stop.clone(),
            sent_requests.clone(),
            s.addr.clone(),
        );
        clients.push(tokio::spawn(async move {
            let target = Target::Tcp(addr);
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let (events, totals) = {
                    let mut rng = rand::thread_rng();
                    let n = rng.gen_range(1..20);
                    let mut totals: HashMap<String, i64> = HashMap::new();
                    let events: Vec<serde_json::Value> = (0..n)
                        .map(|i| {
                            let dimension = if rng.gen_bool(0.7) { "requests" } else { "gigabytes" };
                            let q = rng.gen_range(0..100);
                            *totals.entry(dimension.to_owned()).or_default() += q;
                            serde_json::json!({"dimension": dimension, "quantity": q, "id": format!("c{client}-{seq}-{i}"), "tags": {"tenant": format!("t{}", i % 3)}})
                        })
                        .collect();
                    (events, totals)
                };
                let body = serde_json::json!({"events": events}).to_string().into_bytes();
                loop {
                    sent.fetch_add(1, Ordering::Relaxed);
                    let r = local_client::call(&target, Method::POST, "/v1/usage", Some(body.clone()), None, Duration::from_secs(5)).await;
                    if let Ok((StatusCode::OK, _)) = r {
                        let mut acked = acked.lock().expect("oracle");
                        for (d, q) in &totals {
                            *acked.entry(d.clone()).or_default() += q;
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }

    for _ in 0..iterations {
        let pause = rand::thread_rng().gen_range(30..250);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reaped");
        child = spawn_ready(&s).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    support::sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within grace")
        .expect("wait");
    assert!(status.success(), "SIGTERM exit status {status}");

    let acked = acked.lock().expect("oracle").clone();
    let mut billed: HashMap<String, i64> = HashMap::new();
    for r in s.emulator.records() {
        *billed.entry(r.dimension.clone()).or_default() += r.quantity;
    }
    for d in ["requests", "gigabytes"] {
        assert_eq!(
            billed.get(d).copied().unwrap_or(0),
            acked.get(d).copied().unwrap_or(0),
            "dimension {d}: billed vs acknowledged after {iterations} kills"
        );
    }
    assert!(acked.values().sum::<i64>() > 0, "the test posted usage");
    let errors: Vec<String> = s
        .emulator
        .calls()
        .iter()
        .filter_map(|c| c.error_type().map(str::to_owned))
        .collect();
    assert!(
        errors.iter().all(|e| e != "DuplicateRequestException"),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_open_hour_and_a_second_process_is_refused() {
    let s = setup().await;
    let mut child = spawn_ready(&s).await;

    let second = agent_command(&s.config_path, s.dir.path())
        .output()
        .await
        .expect("second agent");
    assert_eq!(
        second.status.code(),
        Some(74),
        "a second agent on the same state dir exits with EX_IOERR"
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another meterd process holds"), "{stderr}");

    let report = std::process::Command::new(BIN)
        .args(["report", "--config"])
        .arg(&s.config_path)
        .args([
            "--dimension",
            "requests",
            "--quantity",
            "12",
            "--tag",
            "tenant=acme",
            "--id",
            "r-1",
        ])
        .output()
        .expect("meterd report");
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let health = meterd(&["health"], &s.config_path);
    assert!(health.status.success());

    support::sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exit in grace")
        .expect("wait");
    assert!(status.success(), "{status}");
    let records = s.emulator.records();
    assert_eq!(
        records.len(),
        2,
        "both dimensions of the open hour were sent before exit"
    );
    assert_eq!(records.iter().map(|r| r.quantity).sum::<i64>(), 12);

    let listed = meterd(&["records"], &s.config_path);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("requests") && text.contains("sent"), "{text}");
    for r in &records {
        assert!(text.contains(&r.metering_record_id), "{text}");
    }
}

/// A copy of the rig's configuration with its own state dir and a free port.
fn config_with_state(s: &BinaryRig, state: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let state_line = format!("dir = {:?}", s.state_dir().display().to_string());
    assert!(text.contains(&state_line), "{text}");
    let text = text
        .replace(
            &state_line,
            &format!("dir = {:?}", state.display().to_string()),
        )
        .replace(&s.addr, &format!("127.0.0.1:{}", support::free_port()));
    let path = state.with_extension("toml");
    std::fs::write(&path, text).expect("config");
    path
}

async fn refused_with_74(config: &Path, cwd: &Path, what: &str, says: &str) {
    let out = agent_command(config, cwd).output().await.expect("agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{what}: {stderr}");
    assert!(stderr.contains(says), "{what}: {stderr}");
}

/// The lock is on the ledger's private directory, and the ledger is opened only where it is:
/// neither deleting a lock file nor linking a ledger lets a second agent in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_second_agent_by_a_deleted_lock_file_a_linked_ledger_or_another_users_files() {
    let s = setup().await;
    let mut child = spawn_ready(&s).await;

    // The layout before the private directory locked this file.
    let _ = std::fs::remove_file(s.state_dir().join("meterd.lock"));
    refused_with_74(
        &s.config_path,
        s.dir.path(),
        "lock file deleted",
        "another meterd process holds",
    )
    .await;

    let live = meterd::ledger::ledger_path(&s.state_dir());
    assert!(live.is_file(), "{}", live.display());
    let linked = s.dir.path().join("linked");
    std::fs::create_dir_all(linked.join(meterd::ledger::PRIVATE_DIR)).expect("private dir");
    std::os::unix::fs::symlink(&live, meterd::ledger::ledger_path(&linked)).expect("symlink");
    std::os::unix::fs::symlink(&live, linked.join("ledger.sqlite3")).expect("symlink");
    refused_with_74(
        &config_with_state(&s, &linked),
        s.dir.path(),
        "ledger linked to a live agent's",
        "symbolic link",
    )
    .await;

    if rustix::process::geteuid().is_root() {
        let foreign = s.dir.path().join("foreign");
        std::fs::create_dir_all(foreign.join(meterd::ledger::PRIVATE_DIR)).expect("private dir");
        std::os::unix::fs::chown(foreign.join(meterd::ledger::PRIVATE_DIR), Some(65534), None)
            .expect("chown");
        refused_with_74(
            &config_with_state(&s, &foreign),
            s.dir.path(),
            "private dir of another uid",
            "belongs to uid 65534",
        )
        .await;
    } else {
        println!("skipped the other-uid case: it needs root to chown to uid 65534");
    }

    support::sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exit in grace")
        .expect("wait");
    assert!(status.success(), "{status}");
}

/// Usage the final flush cannot seal is not billed by this run: the exit says so (74), not 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_flush_that_cannot_seal_the_open_hour_exits_74() {
    let s = setup().await;
    let child = spawn_ready(&s).await;
    let body = serde_json::json!({"events": [{"dimension": "requests", "quantity": 5}]});
    let (status, _) = s.post(&body).await;
    assert_eq!(status, StatusCode::OK);
    // The open hour's counter now exceeds what one record can hold: sealing it fails.
    let ledger =
        rusqlite::Connection::open(meterd::ledger::ledger_path(&s.state_dir())).expect("ledger");
    let changed = ledger
        .execute(
            "UPDATE usage SET quantity = quantity + 2147483647 WHERE dimension = 'requests'",
            [],
        )
        .expect("update");
    assert_eq!(changed, 1);
    drop(ledger);

    support::sigterm(&child);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("exit in grace")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(stderr.contains("could not seal the open hour"), "{stderr}");
    assert!(!stderr.contains("all records delivered"), "{stderr}");
}

#[test]
fn a_bad_config_exits_64_naming_every_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "product_code = \"x y\"\npricing = \"custom\"\n[metering]\ndimensions = []\nreport_zro = true\n",
    )
    .expect("write");
    let out = meterd(&["check-config"], &path);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("report_zro"));
    std::fs::write(
        &path,
        "product_code = \"x y\"\npricing = \"custom\"\n[metering]\ndimensions = []\n",
    )
    .expect("write");
    let out = meterd(&["run"], &path);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("product_code") && err.contains("metering.dimensions"),
        "{err}"
    );
}

/// Everything that depends only on configuration is built before anything is created or
/// served: `check-config` finds what `run` would fail on, and `run` then creates no ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_cannot_run_fails_check_config_and_creates_nothing() {
    let s = setup().await;
    let good = std::fs::read_to_string(&s.config_path).expect("config");
    let garbage = s.dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n",
    )
    .expect("pem");
    let key_line = format!(
        "public_key_files = [{:?}]",
        s.dir.path().join("emulator-v1.pem").display().to_string()
    );
    assert!(good.contains(&key_line));
    let cases = [
        (
            good.replace(
                &key_line,
                &format!("public_key_files = [{:?}]", garbage.display().to_string()),
            ),
            "garbage.pem",
        ),
        (
            good.replace(
                "grace_period = \"10s\"",
                "grace_period = \"500000000000years\"",
            ),
            "server.grace_period",
        ),
        (
            good.replace(
                "grace_period = \"10s\"",
                "grace_period = \"10s\"\nmax_connections = 2305843009213693952",
            ),
            "server.max_connections",
        ),
        (
            good.replace(
                "[registration]",
                "[registration]\nstartup_budget = \"500000000000years\"",
            ),
            "registration.startup_budget",
        ),
        (
            good.replace("[sending]", "[sending]\ncall_timeout = \"0s\""),
            "sending.call_timeout",
        ),
        (
            good.replace(&s.emulator.endpoint_url(), "file:///etc/passwd"),
            "aws.endpoint_url",
        ),
        (
            good.replace(&s.addr, "0.0.0.0:0"),
            "insecure_allow_unauthenticated_network",
        ),
    ];
    for (text, named) in cases {
        assert_ne!(text, good, "{named}: the case changed nothing");
        std::fs::write(&s.config_path, &text).expect("config");
        let check = meterd(&["check-config"], &s.config_path);
        let err = String::from_utf8_lossy(&check.stderr);
        assert_eq!(
            check.status.code(),
            Some(64),
            "check-config, {named}: {err}"
        );
        assert!(err.contains(named), "check-config names {named}: {err}");
        let out = agent_command(&s.config_path, s.dir.path())
            .output()
            .await
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "run, {named}: {err}");
        assert!(
            !s.state_dir().exists(),
            "{named}: run created the state before failing: {err}"
        );
    }
    std::fs::write(&s.config_path, &good).expect("config");
    let check = meterd(&["check-config"], &s.config_path);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The keyring is in the binary: from an empty folder, with no key files configured, the agent
/// still finds a version-1 key and verifies against it (the emulator's token is signed by
/// another key, so verification fails with the verification exit code, not "no key").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyring_is_embedded_in_the_binary() {
    let empty = tempfile::tempdir().expect("tempdir");
    let keys = std::process::Command::new(BIN)
        .arg("keys")
        .current_dir(empty.path())
        .env_remove("METERD_CONFIG")
        .output()
        .expect("keys");
    assert!(keys.status.success());
    let listing = String::from_utf8_lossy(&keys.stdout);
    assert!(listing.contains("bundled"), "{listing}");

    let s = setup().await;
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let without_files = text.replace(
        &format!(
            "public_key_files = [{:?}]",
            s.dir.path().join("emulator-v1.pem").display().to_string()
        ),
        "public_key_files = []",
    );
    assert_ne!(text, without_files);
    std::fs::write(&s.config_path, without_files).expect("config");
    let out = agent_command(&s.config_path, empty.path())
        .env("METERD_LOG_FORMAT", "json")
        .output()
        .await
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(65),
        "verification ran against the bundled key: {err}"
    );
    // The container's log format: one JSON object per line, the failure at ERROR.
    let lines: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["level"] == "ERROR"), "{err}");
}

/// The pre-listing test: `listing-check` runs the DryRun for every dimension; with `--send` it
/// sends exactly one record per dimension for the last closed hour and prints their ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_check_sends_one_record_per_dimension_and_prints_the_ids() {
    let s = setup().await;
    let run = |send: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["listing-check", "--config"])
            .arg(&s.config_path)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_ACCESS_KEY_ID", "AKIALISTINGCHECK0001")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        if send {
            cmd.arg("--send");
        }
        cmd.output().expect("listing-check")
    };
    let dry = run(false);
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(
        dry.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert_eq!(text.matches("dry run ok").count(), 2, "{text}");
    assert!(s.emulator.records().is_empty(), "no record without --send");

    let sent = run(true);
    let text = String::from_utf8_lossy(&sent.stdout).into_owned();
    assert!(
        sent.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let records = s.emulator.records();
    let mut dims: Vec<&str> = records.iter().map(|r| r.dimension.as_str()).collect();
    dims.sort_unstable();
    assert_eq!(dims, ["gigabytes", "requests"], "one record per dimension");
    let now = meterd::clock::unix_seconds(std::time::SystemTime::now());
    let last_closed = meterd::clock::hour_floor(now) - 3600;
    for r in &records {
        assert_eq!(r.hour, last_closed, "the last closed hour");
        assert!(
            text.contains(&format!("{}: {}", r.dimension, r.metering_record_id)),
            "{text}"
        );
    }
    assert!(text.contains("sent from region us-east-1"), "{text}");
    let dry_runs = s
        .emulator
        .calls()
        .iter()
        .filter(|c| c.operation == "MeterUsage")
        .count();
    assert_eq!(dry_runs, 6, "two DryRuns per run and two records");
}

fn meterd(args: &[&str], config: &Path) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("meterd")
}

/// Damage the agent refuses: a meta row gone (the records stay readable).
fn damage(ledger: &Path) {
    let c = rusqlite::Connection::open(ledger).expect("open");
    c.execute("DELETE FROM meta WHERE key = 'instance_id'", [])
        .expect("damage");
}

/// A damaged ledger is refused (74) by default; `meterd ledger quarantine` moves it aside
/// intact, the agent starts empty, and the old file's records stay readable. Opted in, the
/// agent does the same at start-up and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_ledger_is_kept_intact_and_readable_and_the_agent_starts_empty() {
    let s = setup().await;
    let mut child = spawn_ready(&s).await;
    let report = meterd(
        &["report", "--dimension", "requests", "--quantity", "9"],
        &s.config_path,
    );
    assert!(report.status.success(), "{report:?}");
    support::sigterm(&child);
    let status = child.wait().await.expect("wait");
    assert!(status.success(), "{status}");
    let billed = s.emulator.records();
    assert_eq!(billed.len(), 2);

    let live = meterd::ledger::ledger_path(&s.state_dir());
    damage(&live);
    let damaged = std::fs::read(&live).expect("read");
    refused_with_74(
        &s.config_path,
        s.dir.path(),
        "damaged",
        "is corrupt or unreadable",
    )
    .await;
    assert_eq!(
        std::fs::read(&live).expect("read"),
        damaged,
        "refused untouched"
    );

    let out = meterd(&["ledger", "quarantine"], &s.config_path);
    assert!(out.status.success(), "{out:?}");
    let moved = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        moved
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(meterd::ledger::QUARANTINE_PREFIX)),
        "{}",
        moved.display()
    );
    assert_eq!(
        std::fs::read(&moved).expect("quarantined"),
        damaged,
        "intact"
    );
    assert!(!live.exists());

    child = spawn_ready(&s).await;
    let (_, metrics) = local_client::call(
        &Target::Tcp(s.addr.clone()),
        Method::GET,
        "/metrics",
        None,
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(
        metrics.contains("meterd_ledger_quarantined_files 1\n"),
        "{metrics}"
    );
    support::sigterm(&child);
    assert!(child.wait().await.expect("wait").success());
    assert_eq!(
        std::fs::read(&moved).expect("quarantined"),
        damaged,
        "still intact"
    );

    let moved_arg = moved.display().to_string();
    let out = meterd(
        &["records", "--ledger", &moved_arg, "--format", "json"],
        &s.config_path,
    );
    assert!(out.status.success(), "{out:?}");
    let old: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(old.len(), 2, "{old:?}");
    for r in &billed {
        assert!(
            old.iter()
                .any(|o| o["metering_record_id"] == r.metering_record_id.as_str()
                    && o["quantity"] == r.quantity
                    && o["state"] == "sent"),
            "{old:?}"
        );
    }
    let hour = meterd::clock::rfc3339(billed[0].hour);
    let after = meterd::clock::rfc3339(billed[0].hour + 3600);
    let out = meterd(
        &[
            "records", "--ledger", &moved_arg, "--format", "csv", "--since", &hour, "--until",
            &after,
        ],
        &s.config_path,
    );
    let csv = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(csv.lines().count(), 3, "a header and two records: {csv}");
    assert!(csv.starts_with("hour,dimension,quantity,state,"), "{csv}");
    let out = meterd(
        &[
            "records", "--ledger", &moved_arg, "--format", "csv", "--since", &after,
        ],
        &s.config_path,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "only the header"
    );

    // Opted in: the agent quarantines the damaged ledger itself and starts, loudly.
    damage(&live);
    let damaged = std::fs::read(&live).expect("read");
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let opted = s.dir.path().join("opted.toml");
    std::fs::write(
        &opted,
        text.replace("[state]\n", "[state]\nquarantine_damaged = true\n"),
    )
    .expect("config");
    let mut child = agent_command(&opted, s.dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    support::wait_ready(&s.addr, &mut child).await;
    support::sigterm(&child);
    let out = child.wait_with_output().await.expect("wait");
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("QUARANTINED"), "{log}");
    let quarantined = meterd::ledger::quarantined_ledgers(&s.state_dir());
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    assert!(
        quarantined
            .iter()
            .any(|q| std::fs::read(q).ok().as_ref() == Some(&damaged)),
        "the second damaged ledger is kept intact"
    );
}

/// `server.metrics_listen` serves the metrics for a scraper and nothing that takes usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_metrics_and_probes_only() {
    let s = setup().await;
    let metrics_addr = format!("127.0.0.1:{}", support::free_port());
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let config = s.dir.path().join("metrics.toml");
    std::fs::write(
        &config,
        text.replace(
            "[server]\n",
            &format!("[server]\nmetrics_listen = {metrics_addr:?}\n"),
        ),
    )
    .expect("config");
    let mut child = agent_command(&config, s.dir.path()).spawn().expect("spawn");
    support::wait_ready(&s.addr, &mut child).await;
    let at = Target::Tcp(metrics_addr.clone());
    let get = |method: Method, path: &'static str| {
        let at = at.clone();
        async move {
            local_client::call(&at, method, path, None, None, Duration::from_secs(5))
                .await
                .expect("call")
        }
    };
    let (status, body) = get(Method::GET, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&body).contains("meterd_events_accepted_total 0"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(get(Method::GET, "/readyz").await.0, StatusCode::OK);
    assert_eq!(
        get(Method::POST, "/v1/usage").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(Method::GET, "/v1/status").await.0,
        StatusCode::NOT_FOUND
    );
    support::sigterm(&child);
    assert!(child.wait().await.expect("wait").success());
}

/// The audit file after faults and a real kill -9: exactly one line per billed record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_has_one_line_per_billed_record_after_faults_and_sigkill() {
    let s = setup().await;
    let audit = s.dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let config = s.dir.path().join("audit.toml");
    std::fs::write(
        &config,
        format!(
            "{text}\n[audit]\nfile = {:?}\n",
            audit.display().to_string()
        ),
    )
    .expect("config");
    let faults = meterd::emulator::FaultProfile::only(
        meterd::emulator::Operation::MeterUsage,
        meterd::emulator::FaultRule {
            error_rate: 0.5,
            ..Default::default()
        },
    )
    .seeded(5);
    s.emulator.set_faults(faults);

    let spawn = || async {
        let mut child = agent_command(&config, s.dir.path()).spawn().expect("spawn");
        support::wait_ready(&s.addr, &mut child).await;
        child
    };
    let mut child = spawn().await;
    let report = meterd(
        &["report", "--dimension", "requests", "--quantity", "4"],
        &config,
    );
    assert!(report.status.success(), "{report:?}");
    // SIGTERM starts the flush; SIGKILL lands somewhere in it (sent, not yet exported, ...).
    support::sigterm(&child);
    let pause = rand::thread_rng().gen_range(5..80);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    let _ = child.start_kill();
    let _ = child.wait().await;

    child = spawn().await;
    support::eventually("the flushed hour billed", support::PATIENCE, async || {
        s.emulator.records().len() == 2
    })
    .await;
    let written = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .count()
    };
    support::eventually("both outcomes exported", support::PATIENCE, async || {
        written() >= 2
    })
    .await;
    // Killed again: nothing is written twice at the next start either.
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    child = spawn().await;
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;

    let billed = s.emulator.records();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let mut keys = std::collections::HashSet::new();
    for line in &lines {
        assert!(
            keys.insert(line["record_key"].as_str().unwrap_or_default().to_owned()),
            "twice: {line}"
        );
        assert!(
            billed.iter().any(
                |b| line["metering_record_id"] == b.metering_record_id.as_str()
                    && line["quantity"] == b.quantity
                    && b.client_token.as_deref() == line["record_key"].as_str()
            ),
            "{line} is not what the service holds: {billed:?}"
        );
    }
    assert_eq!(lines.len(), billed.len(), "{lines:?} vs {billed:?}");
}

#[test]
fn a_bad_command_line_exits_2_and_help_exits_0() {
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env_clear()
            .output()
            .expect("meterd runs")
    };
    let unknown = run(&["run", "--no-such-flag"]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("--no-such-flag"),
        "{unknown:?}"
    );
    assert_eq!(run(&["no-such-command"]).status.code(), Some(2));
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0), "{help:?}");
    assert!(String::from_utf8_lossy(&help.stdout).contains("run"));
}
