//! Wall-clock time as a dependency.
//!
//! Hour boundaries are UTC wall-clock time, which `tokio::time::pause()` cannot move, so every
//! component that cares about hours takes a [`SharedClock`]. Production uses [`SystemClock`];
//! tests use [`ManualClock`] and move time explicitly; demos use [`ScaledClock`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// Seconds in an hour: the metering granularity.
pub const HOUR_SECS: i64 = 3600;

/// Longest real sleep taken in one go, so a wall-clock jump is noticed promptly.
const MAX_REAL_SLEEP: Duration = Duration::from_secs(1);

pub type SleepFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of wall-clock time that can also wait for a wall-clock instant.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;

    /// Resolves once `now() >= deadline`. Wall-clock jumps are honoured within about a second.
    fn sleep_until(&self, deadline: SystemTime) -> SleepFuture<'_>;

    /// Waits for `duration` of this clock's time.
    fn sleep(&self, duration: Duration) -> SleepFuture<'_> {
        let deadline = self.now() + duration;
        self.sleep_until(deadline)
    }

    /// Time that never steps, since an arbitrary origin: for budgets such as the shutdown's
    /// grace period, which the orchestrator counts in real time whatever the wall clock does.
    /// Real monotonic time unless a clock says otherwise (the manual clock: its own time).
    fn monotonic(&self) -> Duration {
        monotonic_origin().elapsed()
    }

    /// Resolves once `monotonic() >= until`.
    fn sleep_monotonic(&self, until: Duration) -> SleepFuture<'_> {
        Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
            monotonic_origin() + until,
        )))
    }
}

/// The origin of [`Clock::monotonic`] for clocks on real time.
fn monotonic_origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

pub type SharedClock = Arc<dyn Clock>;

/// Whole seconds since the Unix epoch; times before 1970 clamp to 0.
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch; times before 1970 clamp to 0.
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The `SystemTime` for epoch milliseconds; negative clamps to the epoch.
pub fn from_unix_millis(epoch_millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(epoch_millis).unwrap_or(0))
}

/// The start (epoch seconds) of the UTC hour containing `epoch_secs`.
pub fn hour_floor(epoch_secs: i64) -> i64 {
    epoch_secs.div_euclid(HOUR_SECS) * HOUR_SECS
}

/// The `SystemTime` for whole epoch seconds.
pub fn from_unix_seconds(epoch_secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(epoch_secs).unwrap_or(0))
}

/// RFC 3339 UTC text for epoch seconds, e.g. `2026-11-22T10:00:00Z`.
pub fn rfc3339(epoch_secs: i64) -> String {
    humantime::format_rfc3339_seconds(from_unix_seconds(epoch_secs)).to_string()
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: SystemTime) -> SleepFuture<'_> {
        Box::pin(async move {
            loop {
                let Ok(left) = deadline.duration_since(SystemTime::now()) else {
                    return;
                };
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left.min(MAX_REAL_SLEEP)).await;
            }
        })
    }
}

/// A clock that moves only when told to. Sleepers wake when it is advanced past their deadline.
/// It knows its sleepers: a test can jump to the next deadline instead of guessing a step.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
    changed: watch::Sender<SystemTime>,
    sleepers: Mutex<Sleepers>,
}

/// The deadlines of pending `sleep_until` futures, by a registration number.
#[derive(Debug, Default)]
struct Sleepers {
    next_id: u64,
    deadlines: BTreeMap<u64, SystemTime>,
}

/// Removes a sleeper's deadline when its future completes or is dropped.
struct SleeperGuard<'a> {
    sleepers: &'a Mutex<Sleepers>,
    id: u64,
}

impl Drop for SleeperGuard<'_> {
    fn drop(&mut self) {
        let mut sleepers = self.sleepers.lock().unwrap_or_else(|e| e.into_inner());
        sleepers.deadlines.remove(&self.id);
    }
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Arc<Self> {
        let (changed, _) = watch::channel(start);
        Arc::new(Self {
            now: Mutex::new(start),
            changed,
            sleepers: Mutex::default(),
        })
    }

    /// Starts at whole epoch seconds.
    pub fn at_unix(epoch_secs: i64) -> Arc<Self> {
        Self::new(from_unix_seconds(epoch_secs))
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
        self.changed.send_replace(*now);
    }

    /// Sets the time, forwards or backwards (a wall-clock jump).
    pub fn set(&self, to: SystemTime) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = to;
        self.changed.send_replace(to);
    }

    /// Moves time backwards (a wall-clock step back).
    pub fn rewind(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now -= by;
        self.changed.send_replace(*now);
    }

    /// The earliest deadline of a pending sleeper that is still in the future.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        let now = self.now();
        self.lock_sleepers()
            .deadlines
            .values()
            .filter(|d| **d > now)
            .min()
            .copied()
    }

    /// The deadlines of every pending sleeper, earliest first.
    pub fn deadlines(&self) -> Vec<SystemTime> {
        let mut all: Vec<SystemTime> = self.lock_sleepers().deadlines.values().copied().collect();
        all.sort();
        all
    }

    /// How many pending sleepers are already due (woken, not yet run to completion).
    pub fn due_sleepers(&self) -> usize {
        let now = self.now();
        self.lock_sleepers()
            .deadlines
            .values()
            .filter(|d| **d <= now)
            .count()
    }

    /// Jumps to the next sleeper's deadline if it is no later than `limit`, and returns the
    /// new time; `None` (the clock unchanged) when no sleeper is due by then.
    pub fn advance_to_next(&self, limit: SystemTime) -> Option<SystemTime> {
        let next = self.next_deadline().filter(|d| *d <= limit)?;
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have moved the clock meanwhile; never move it backwards here.
        if *now < next {
            *now = next;
            self.changed.send_replace(next);
        }
        Some(*now)
    }

    fn lock_sleepers(&self) -> std::sync::MutexGuard<'_, Sleepers> {
        self.sleepers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, deadline: SystemTime) -> SleeperGuard<'_> {
        let mut sleepers = self.lock_sleepers();
        let id = sleepers.next_id;
        sleepers.next_id += 1;
        sleepers.deadlines.insert(id, deadline);
        SleeperGuard {
            sleepers: &self.sleepers,
            id,
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The manual time itself: tests move budgets with the clock. It only steps when a test
    /// sets it back; a budget then lasts longer, never shorter.
    fn monotonic(&self) -> Duration {
        self.now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }

    fn sleep_monotonic(&self, until: Duration) -> SleepFuture<'_> {
        self.sleep_until(UNIX_EPOCH + until)
    }

    fn sleep_until(&self, deadline: SystemTime) -> SleepFuture<'_> {
        let mut changes = self.changed.subscribe();
        let guard = self.register(deadline);
        Box::pin(async move {
            let _registered = guard;
            loop {
                if *changes.borrow_and_update() >= deadline {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

/// Wall time that runs `scale` times faster than real time from a starting instant.
/// For demos only: with `scale = 60`, one hour passes in one minute.
#[derive(Debug)]
pub struct ScaledClock {
    origin_wall: SystemTime,
    origin_real: Instant,
    scale: f64,
}

impl ScaledClock {
    pub fn new(origin_wall: SystemTime, scale: f64) -> Arc<Self> {
        Arc::new(Self {
            origin_wall,
            origin_real: Instant::now(),
            scale: if scale.is_finite() && scale > 0.0 {
                scale
            } else {
                1.0
            },
        })
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> SystemTime {
        self.origin_wall + self.origin_real.elapsed().mul_f64(self.scale)
    }

    fn sleep_until(&self, deadline: SystemTime) -> SleepFuture<'_> {
        Box::pin(async move {
            loop {
                let Ok(left) = deadline.duration_since(self.now()) else {
                    return;
                };
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left.div_f64(self.scale).min(MAX_REAL_SLEEP)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_floor_rounds_down_to_the_hour() {
        assert_eq!(hour_floor(7199), 3600);
        assert_eq!(hour_floor(7200), 7200);
        assert_eq!(hour_floor(-1), -3600);
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(3600), "1970-01-01T01:00:00Z");
    }

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_only_when_advanced_past_deadline() {
        let clock = ManualClock::at_unix(1_000);
        let sleeper = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.sleep_until(from_unix_seconds(1_010)).await })
        };
        clock.advance(Duration::from_secs(5));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("sleeper woke")
            .expect("sleeper task ok");
    }

    #[tokio::test]
    async fn manual_clock_knows_its_next_deadline_and_forgets_dropped_sleepers() {
        let clock = ManualClock::at_unix(1_000);
        assert_eq!(clock.next_deadline(), None);
        let late = clock.sleep_until(from_unix_seconds(1_030));
        let soon = clock.sleep_until(from_unix_seconds(1_010));
        assert_eq!(clock.next_deadline(), Some(from_unix_seconds(1_010)));
        assert_eq!(
            clock.deadlines(),
            [from_unix_seconds(1_010), from_unix_seconds(1_030)]
        );
        drop(soon);
        assert_eq!(clock.next_deadline(), Some(from_unix_seconds(1_030)));
        // A completed sleeper is forgotten too.
        clock.set(from_unix_seconds(1_030));
        assert_eq!(clock.due_sleepers(), 1);
        tokio::time::timeout(Duration::from_secs(5), late)
            .await
            .expect("due sleeper completes");
        assert_eq!((clock.next_deadline(), clock.due_sleepers()), (None, 0));
    }

    #[tokio::test]
    async fn advance_to_next_jumps_to_the_earliest_sleeper_but_never_past_the_limit() {
        let clock = ManualClock::at_unix(1_000);
        let sleeper = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.sleep_until(from_unix_seconds(1_300)).await })
        };
        while clock.next_deadline().is_none() {
            tokio::task::yield_now().await;
        }
        assert_eq!(clock.advance_to_next(from_unix_seconds(1_299)), None);
        assert_eq!(unix_seconds(clock.now()), 1_000, "not moved past the limit");
        assert_eq!(
            clock.advance_to_next(from_unix_seconds(1_300)),
            Some(from_unix_seconds(1_300))
        );
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("sleeper woke at its deadline")
            .expect("sleeper task ok");
        assert_eq!(clock.advance_to_next(from_unix_seconds(9_999)), None);
        assert_eq!(unix_seconds(clock.now()), 1_300);
    }

    #[test]
    fn manual_clock_can_jump_backwards() {
        let clock = ManualClock::at_unix(10_000);
        clock.rewind(Duration::from_secs(600));
        assert_eq!(unix_seconds(clock.now()), 9_400);
    }

    #[tokio::test]
    async fn a_budget_on_a_fast_clock_lasts_in_real_time() {
        // One real second is an hour on this clock; a 100 ms budget must still take 100 ms.
        let clock = ScaledClock::new(from_unix_seconds(1_000), 3_600.0);
        let wall_before = clock.now();
        let real_before = Instant::now();
        clock
            .sleep_monotonic(clock.monotonic() + Duration::from_millis(100))
            .await;
        assert!(real_before.elapsed() >= Duration::from_millis(100));
        let wall = clock.now().duration_since(wall_before).unwrap_or_default();
        assert!(
            wall >= Duration::from_secs(300),
            "{wall:?} of wall time passed"
        );
    }

    #[tokio::test]
    async fn a_manual_clock_budget_moves_with_the_clock() {
        let clock = ManualClock::at_unix(1_000);
        let start = clock.monotonic();
        assert_eq!(start, Duration::from_secs(1_000));
        let waiting = {
            let clock = clock.clone();
            tokio::spawn(
                async move { clock.sleep_monotonic(start + Duration::from_secs(30)).await },
            )
        };
        clock.advance(Duration::from_secs(29));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the budget ends when the clock reaches it")
            .expect("sleeper task ok");
    }
}
