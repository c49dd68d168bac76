//! WAL checkpoints, run by the writer between groups (after their replies went out).
//!
//! SQLite's own checkpoint inside COMMIT is off (`wal_autocheckpoint = 0`, set at open); the
//! WAL hook [`note_wal_pages`] records how many pages the WAL holds after each commit, and
//! [`Writer::checkpoint_if_due`] copies it back once it holds [`CHECKPOINT_PAGES`] or a second
//! has passed, so the WAL restarts at its beginning instead of growing.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::writer::Writer;

/// The writer checkpoints once the WAL holds this many pages (1 MiB at 4 KiB a page)...
pub(super) const CHECKPOINT_PAGES: i32 = 256;

/// ...or once this long has passed since its last checkpoint and the WAL is not empty.
const CHECKPOINT_MAX_AGE: Duration = Duration::from_secs(1);

thread_local! {
    /// Pages in the WAL after the writer's last commit, from SQLite's WAL hook (the hook is a
    /// plain function, and the writer commits only on its own thread).
    pub(super) static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

pub(super) fn note_wal_pages(
    _: &rusqlite::hooks::Wal,
    pages: std::ffi::c_int,
) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

impl Writer {
    /// Copies the WAL back into the database between groups, after their replies went out.
    ///
    /// SQLite restarts the WAL from its beginning only when a write transaction starts after a
    /// checkpoint that copied every frame. A checkpoint on another connection never gets there
    /// under steady load (frames keep arriving while it runs), so the WAL would grow without
    /// bound and every commit would extend the file; here nothing commits in between.
    pub(super) fn checkpoint_if_due(&mut self) {
        let pages = WAL_PAGES.get();
        let due = pages >= self.checkpoint_at_pages
            || (pages > 0 && self.last_checkpoint.elapsed() >= CHECKPOINT_MAX_AGE);
        if !due {
            return;
        }
        self.last_checkpoint = Instant::now();
        let result = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            });
        match result {
            Ok((0, in_wal, copied)) if copied >= in_wal => {
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                WAL_PAGES.set(0);
                self.checkpoint_at_pages = CHECKPOINT_PAGES;
            }
            Ok((_, in_wal, copied)) => {
                // Another connection holds the checkpoint, or a reader still needs older
                // frames: try again once the WAL has grown further.
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    in_wal,
                    copied,
                    "WAL checkpoint was partial: a reader is behind or another connection checkpoints"
                );
                self.checkpoint_at_pages = pages.saturating_add(CHECKPOINT_PAGES);
            }
            Err(e) => {
                self.stats
                    .checkpoint_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, wal_pages = pages, "WAL checkpoint failed; commits stay durable in the WAL, retrying later");
                self.checkpoint_at_pages = pages.saturating_add(CHECKPOINT_PAGES);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;
    use crate::ledger::{ledger_path, Ledger};
    use crate::model::{Event, Measure, TagSet};
    use rusqlite::Connection;
    use std::path::Path;

    /// Events that each add a new, long tag set: every commit writes fresh pages.
    fn fresh_rows(request: usize, count: usize) -> Vec<Event> {
        (0..count)
            .map(|i| Event {
                dimension: "requests".into(),
                tags: TagSet::from([(
                    "tenant".to_owned(),
                    format!("tenant-{request:05}-{i:03}-{}", "x".repeat(120)),
                )]),
                measure: Measure::Sum(1),
                id: None,
            })
            .collect()
    }

    fn wal_bytes(dir: &Path) -> u64 {
        std::fs::metadata(in_private(dir, "ledger.sqlite3-wal")).map_or(0, |m| m.len())
    }

    #[tokio::test]
    async fn the_wal_stays_bounded_under_continuous_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        // 500 commits of 40 new rows: several MiB of pages in all, with no pause between them.
        for request in 0..500 {
            ledger
                .append(fresh_rows(request, 40), H + 10)
                .await
                .expect("append");
        }
        let stats = ledger.commit_stats();
        assert!(stats.checkpoints.load(Ordering::Relaxed) >= 1);
        assert_eq!(stats.checkpoint_failures.load(Ordering::Relaxed), 0);
        let db = std::fs::metadata(ledger_path(dir.path()))
            .expect("db")
            .len();
        let wal = wal_bytes(dir.path());
        assert!(db + wal > 4 << 20, "the test wrote only {} bytes", db + wal);
        assert!(
            wal < 2 << 20,
            "the WAL grew to {wal} bytes; checkpoints should restart it at 1 MiB"
        );
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            500 * 40
        );
    }

    #[tokio::test]
    async fn a_reader_holding_old_frames_delays_the_wal_restart_without_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        ledger
            .append(fresh_rows(0, 10), H + 10)
            .await
            .expect("append");
        // A reader (say `sqlite3` on the file) keeps a snapshot open.
        let reader = Connection::open(ledger_path(dir.path())).expect("reader");
        reader.execute_batch("BEGIN").expect("begin");
        let rows: i64 = reader
            .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
            .expect("read");
        assert_eq!(rows, 10);
        for request in 1..120 {
            ledger
                .append(fresh_rows(request, 40), H + 10)
                .await
                .expect("append while a reader is behind");
        }
        let stats = ledger.commit_stats();
        let pinned = stats.wal_pages.load(Ordering::Relaxed);
        assert!(pinned > CHECKPOINT_PAGES as u64, "WAL pages {pinned}");
        assert_eq!(stats.checkpoint_failures.load(Ordering::Relaxed), 0);
        reader.execute_batch("COMMIT").expect("end read");
        drop(reader);
        for request in 120..240 {
            ledger
                .append(fresh_rows(request, 40), H + 10)
                .await
                .expect("append");
        }
        let after = stats.wal_pages.load(Ordering::Relaxed);
        assert!(
            after < CHECKPOINT_PAGES as u64 * 2,
            "the WAL did not restart once the reader left: {after} pages (was {pinned})"
        );
        assert_eq!(
            total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
            10 + 239 * 40
        );
    }
}
