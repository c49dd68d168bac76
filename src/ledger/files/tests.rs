//! The ledger's files against the file system: the lock, links, ownership, modes, the move
//! from the old layout.

use std::path::Path;

use rusqlite::Connection;

use crate::ledger::test_support::*;
use crate::ledger::{ledger_path, read_records_at, Ledger, LedgerError, LEDGER_FILE, PRIVATE_DIR};

#[test]
fn a_second_process_is_locked_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Ledger::open(dir.path(), "prod-a", H).expect("open");
    let err = Ledger::open(dir.path(), "prod-a", H).expect_err("locked");
    assert!(matches!(err, LedgerError::Locked(_)), "{err}");
}

#[test]
fn a_deleted_lock_file_does_not_admit_a_second_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Ledger::open(dir.path(), "prod-a", H).expect("open");
    // The lock file of the layout before the private directory: nothing depends on it.
    let _ = std::fs::remove_file(dir.path().join("meterd.lock"));
    let err = Ledger::open(dir.path(), "prod-a", H).expect_err("still locked");
    assert!(matches!(err, LedgerError::Locked(_)), "{err}");
    // A second path to the same directory meets the same lock.
    let other = tempfile::tempdir().expect("tempdir");
    let alias = other.path().join("state");
    std::os::unix::fs::symlink(dir.path(), &alias).expect("symlink");
    let err = Ledger::open(&alias, "prod-a", H).expect_err("same directory");
    assert!(matches!(err, LedgerError::Locked(_)), "{err}");
}

#[tokio::test]
async fn a_ledger_linked_to_another_agents_ledger_is_refused() {
    let live = tempfile::tempdir().expect("tempdir");
    let agent = Ledger::open(live.path(), "prod-a", H).expect("open");
    let target = ledger_path(live.path());
    let link = |at: &Path| std::os::unix::fs::symlink(&target, at).expect("symlink");

    let other = tempfile::tempdir().expect("tempdir");
    link(&in_private(other.path(), LEDGER_FILE));
    let why = refused(Ledger::open(other.path(), "prod-a", H), "symlinked ledger");
    assert!(why.contains("symbolic link"), "{why}");

    // In the old place, where a ledger of the old layout would be moved from.
    let other = tempfile::tempdir().expect("tempdir");
    link(&other.path().join(LEDGER_FILE));
    let why = refused(
        Ledger::open(other.path(), "prod-a", H),
        "old-layout symlink",
    );
    assert!(why.contains("symbolic link"), "{why}");

    let other = tempfile::tempdir().expect("tempdir");
    std::fs::hard_link(&target, in_private(other.path(), LEDGER_FILE)).expect("hard link");
    let why = refused(Ledger::open(other.path(), "prod-a", H), "hard link");
    assert!(why.contains("hard links"), "{why}");
    std::fs::remove_file(in_private(other.path(), LEDGER_FILE)).expect("unlink");

    let other = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(
        live.path().join(PRIVATE_DIR),
        other.path().join(PRIVATE_DIR),
    )
    .expect("symlink");
    let why = refused(Ledger::open(other.path(), "prod-a", H), "symlinked dir");
    assert!(why.contains("symbolic link"), "{why}");

    // The live agent never noticed.
    agent
        .append(vec![event("requests", 1, None)], H)
        .await
        .expect("the live agent still writes");
    assert!(std::fs::symlink_metadata(&target)
        .expect("ledger")
        .is_file());
}

#[test]
fn planted_links_create_nothing_outside_the_state_dir() {
    let outside = tempfile::tempdir().expect("tempdir");
    let target = outside.path().join("created-through-a-link");
    for (planted, opens) in [
        ("meterd.lock", true),
        ("private", false),
        ("private/ledger.sqlite3", false),
        ("private/ledger.sqlite3-wal", false),
        ("private/ledger.sqlite3-shm", false),
        ("private/ledger.sqlite3-journal", false),
        // A leftover name of an interrupted first start is removed, never followed.
        ("private/ledger.sqlite3.new", true),
        ("private/ledger.sqlite3.new-journal", true),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        if planted.starts_with("private/") {
            in_private(dir.path(), "");
        }
        std::os::unix::fs::symlink(&target, dir.path().join(planted)).expect("symlink");
        let result = Ledger::open(dir.path(), "prod-a", H);
        if opens {
            result.unwrap_or_else(|e| panic!("{planted}: {e}"));
        } else {
            refused(result, planted);
        }
        assert!(
            std::fs::read_dir(outside.path())
                .expect("outside")
                .next()
                .is_none(),
            "a link at {planted} made meterd create a file outside the state dir"
        );
    }
}

#[test]
fn files_of_another_uid_are_refused_with_the_ledger_exit_code() {
    use std::os::unix::fs::chown;
    if euid() != 0 {
        println!("skipped: files_of_another_uid_are_refused needs root to chown to uid 65534");
        return;
    }
    let nobody = Some(65534);
    let make = || {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Ledger::open(dir.path(), "prod-a", H).expect("open"));
        wait_unlocked(dir.path());
        dir
    };
    let dir = make();
    chown(dir.path().join(PRIVATE_DIR), nobody, None).expect("chown");
    let why = refused(Ledger::open(dir.path(), "prod-a", H), "foreign dir");
    assert!(why.contains("uid 65534"), "{why}");

    let dir = make();
    chown(ledger_path(dir.path()), nobody, None).expect("chown");
    let result = Ledger::open(dir.path(), "prod-a", H);
    let err = result.as_ref().err().cloned().expect("refused");
    assert!(refused(result, "foreign ledger").contains("uid 65534"));
    assert_eq!(
        crate::agent::AgentError::from(err).exit_code(),
        crate::exit::Exit::Ledger
    );

    // Another user's WAL beside our ledger would be replayed into it.
    let dir = make();
    let wal = in_private(dir.path(), "ledger.sqlite3-wal");
    std::fs::write(&wal, b"").expect("wal");
    chown(&wal, nobody, None).expect("chown");
    refused(Ledger::open(dir.path(), "prod-a", H), "foreign WAL");

    // A ledger of the old layout that another user put there is not moved in.
    let dir = tempfile::tempdir().expect("tempdir");
    let old = dir.path().join(LEDGER_FILE);
    std::fs::write(&old, b"").expect("old ledger");
    chown(&old, nobody, None).expect("chown");
    refused(Ledger::open(dir.path(), "prod-a", H), "foreign old ledger");
    assert!(old.exists() && !ledger_path(dir.path()).exists());
}

#[tokio::test]
async fn a_world_writable_state_dir_works_through_a_private_dir_of_mode_0700() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().expect("tempdir");
    // A Kubernetes emptyDir.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open in a 0777 state dir");
    assert_eq!(ledger.path(), ledger_path(dir.path()));
    ledger
        .append(vec![event("requests", 1, None)], H)
        .await
        .expect("append");
    let private = dir.path().join(PRIVATE_DIR);
    assert_eq!(mode(&private), 0o700);
    for name in [LEDGER_FILE, "ledger.sqlite3-wal", "ledger.sqlite3-shm"] {
        let path = private.join(name);
        assert_eq!(mode(&path), 0o600, "{name}");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").uid(),
            euid(),
            "{name}"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        1,
        "only the private directory is created in state.dir"
    );
    // kubelet's fsGroup adds group write on every mount: narrowed at the next start.
    drop(ledger);
    wait_unlocked(dir.path());
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o2770)).expect("chmod");
    std::fs::set_permissions(
        private.join(LEDGER_FILE),
        std::fs::Permissions::from_mode(0o660),
    )
    .expect("chmod");
    let ledger = reopen(dir.path(), H).await;
    assert_eq!(mode(&private) & 0o777, 0o700);
    assert_eq!(mode(&private.join(LEDGER_FILE)), 0o600);
    assert_eq!(
        total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_is_released_when_the_writer_thread_ends_and_not_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
    // Another connection holds the write lock: the writer thread waits in its next group.
    let blocker = Connection::open(ledger_path(dir.path())).expect("connection");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("write lock");
    {
        let mut append = Box::pin(ledger.append(vec![event("requests", 1, None)], H));
        tokio::select! {
            biased;
            _ = &mut append => panic!("answered while the write lock is taken"),
            _ = std::future::ready(()) => {}
        }
    }
    // No handle is left, but the queued request is still being written.
    drop(ledger);
    let err = Ledger::open(dir.path(), "prod-a", H).expect_err("the writer still runs");
    assert!(matches!(err, LedgerError::Locked(_)), "{err}");
    blocker.execute_batch("ROLLBACK").expect("release");
    drop(blocker);
    // The writer thread commits the request, ends, and releases the lock.
    let ledger = reopen(dir.path(), H).await;
    assert_eq!(
        total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
        1
    );
}

#[tokio::test]
async fn a_ledger_of_the_old_layout_is_moved_into_the_private_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = old_layout_ledger(dir.path()).await;
    let old = dir.path().join(LEDGER_FILE);

    // An older meterd still running on it holds the old lock file: a second agent.
    let old_lock = std::fs::File::create(dir.path().join("meterd.lock")).expect("lock");
    old_lock.try_lock().expect("lock");
    let err = Ledger::open(dir.path(), "prod-a", H).expect_err("old agent runs");
    assert!(
        matches!(err, LedgerError::Locked(ref p) if p.ends_with("meterd.lock")),
        "{err}"
    );
    drop(old_lock);
    wait_unlocked(dir.path());
    assert!(old.exists(), "nothing moved while the old agent ran");

    // A planted link for the old lock file is refused, and nothing is created through it.
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::remove_file(dir.path().join("meterd.lock")).expect("unlink");
    std::os::unix::fs::symlink(outside.path().join("x"), dir.path().join("meterd.lock"))
        .expect("symlink");
    refused(Ledger::open(dir.path(), "prod-a", H), "linked old lock");
    wait_unlocked(dir.path());
    assert!(std::fs::read_dir(outside.path())
        .expect("dir")
        .next()
        .is_none());
    std::fs::remove_file(dir.path().join("meterd.lock")).expect("unlink");

    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("moved and opened");
    assert_eq!(ledger.identity().instance_id, identity.instance_id);
    assert_eq!(
        total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
        7
    );
    assert!(!old.exists());
    assert_eq!(mode(&ledger_path(dir.path())), 0o600);
    assert_eq!(read_records_at(dir.path(), 10).expect("records").len(), 0);

    // A ledger in both places: refused, both left where they are.
    drop(ledger);
    wait_unlocked(dir.path());
    std::fs::write(&old, b"another ledger").expect("old");
    let why = refused(Ledger::open(dir.path(), "prod-a", H), "two ledgers");
    assert!(why.contains("another one is at"), "{why}");
    assert_eq!(std::fs::read(&old).expect("old"), b"another ledger");
    assert!(ledger_path(dir.path()).exists());
}
