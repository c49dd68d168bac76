//! What the ledger's unit tests share: an hour, events, policies, reopening, the private dir.

use std::path::{Path, PathBuf};

use super::{Ledger, LedgerError, LedgerIdentity, LEDGER_FILE, PRIVATE_DIR};
use crate::clock::HOUR_SECS;
use crate::model::{Event, Measure, TagSet, UsageRow};
use crate::seal::SealPolicy;

pub(crate) const H: i64 = 1_800_000_000 - 1_800_000_000 % HOUR_SECS;

pub(crate) fn policy() -> SealPolicy {
    SealPolicy {
        dimensions: vec!["requests".into(), "gigabytes".into()],
        report_zero: true,
        max_allocations: 500,
        ..SealPolicy::default()
    }
}

pub(crate) fn event(dimension: &str, quantity: i64, id: Option<&str>) -> Event {
    Event {
        dimension: dimension.into(),
        tags: TagSet::new(),
        measure: Measure::Sum(quantity),
        id: id.map(str::to_owned),
    }
}

/// `name` in the private directory of the state dir `dir`, which is created (0700) if missing.
pub(crate) fn in_private(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let private = dir.join(PRIVATE_DIR);
    if !private.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .expect("private dir");
    }
    private.join(name)
}

pub(crate) fn total(rows: &[UsageRow], dimension: &str) -> i64 {
    rows.iter()
        .filter(|r| r.dimension == dimension)
        .map(|r| r.quantity)
        .sum()
}

pub(crate) fn unique(value: &str, id: Option<&str>) -> Event {
    Event {
        dimension: "u".into(),
        tags: TagSet::new(),
        measure: Measure::Unique(value.to_owned()),
        id: id.map(str::to_owned),
    }
}

pub(crate) async fn reopen(dir: &Path, now: i64) -> Ledger {
    // The writer thread exits once the last handle is gone; wait for the lock to free.
    loop {
        match Ledger::open(dir, "prod-a", now) {
            Ok(l) => break l,
            Err(LedgerError::Locked(_)) => tokio::task::yield_now().await,
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

pub(crate) fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Waits until no writer thread holds the lock of the state dir `dir`.
pub(crate) fn wait_unlocked(dir: &Path) {
    let private = std::fs::File::open(dir.join(PRIVATE_DIR)).expect("private dir");
    while private.try_lock().is_err() {
        std::thread::yield_now();
    }
}

pub(crate) fn refused(result: Result<Ledger, LedgerError>, what: &str) -> String {
    match result {
        Err(LedgerError::Unsafe(why)) => why,
        Err(e) => panic!("{what}: refused for another reason: {e}"),
        Ok(_) => panic!("{what}: opened"),
    }
}

/// A ledger with 7 requests in hour H, in the old layout's place in `dir`.
pub(crate) async fn old_layout_ledger(dir: &Path) -> LedgerIdentity {
    let build = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(build.path(), "prod-a", H).expect("open");
    ledger
        .append(vec![event("requests", 7, None)], H)
        .await
        .expect("append");
    let identity = ledger.identity().clone();
    drop(ledger);
    wait_unlocked(build.path());
    for suffix in ["", "-wal", "-shm"] {
        let from = in_private(build.path(), &format!("{LEDGER_FILE}{suffix}"));
        if from.exists() {
            std::fs::rename(from, dir.join(format!("{LEDGER_FILE}{suffix}"))).expect("move");
        }
    }
    identity
}

/// A new ledger in the state dir `dir` whose first hour, H, is sealed: two pending zero records
/// (`requests`, `gigabytes`).
pub(crate) async fn sealed_first_hour(dir: &Path) -> Ledger {
    let ledger = Ledger::open(dir, "prod-a", H).expect("open");
    ledger
        .seal_through(H + HOUR_SECS, H + HOUR_SECS, policy())
        .await
        .expect("seal");
    ledger
}
