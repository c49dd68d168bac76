//! Wall-clock time as a dependency.
//!
//! Hour boundaries are UTC wall-clock time, which `tokio::time::pause()` cannot move, so every
//! component that cares about hours takes a [`SharedClock`]. Production uses [`SystemClock`];
//! tests use [`ManualClock`] and move time explicitly; demos use [`ScaledClock`].

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// A clock that moves only when told to. Sleepers wake when it is moved to or past their
/// deadline, and only those: a move wakes the tasks whose deadline it passed, however many
/// others sleep. It knows its sleepers: a test can jump to the next deadline instead of
/// guessing a step.
#[derive(Debug)]
pub struct ManualClock {
    state: Mutex<ManualState>,
}

#[derive(Debug)]
struct ManualState {
    now: SystemTime,
    next_id: u64,
    /// Pending `sleep_until` futures by (deadline, registration number), each with the waker
    /// of the task that last polled it.
    sleepers: BTreeMap<(SystemTime, u64), Option<Waker>>,
}

impl ManualState {
    /// The key bound that includes every sleeper due at `t`.
    fn due_by(t: SystemTime) -> std::ops::RangeToInclusive<(SystemTime, u64)> {
        ..=(t, u64::MAX)
    }
}

/// One sleeper: registered from creation until it completes or is dropped.
struct ManualSleep<'a> {
    clock: &'a ManualClock,
    key: (SystemTime, u64),
}

impl Future for ManualSleep<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.clock.lock();
        if state.now >= self.key.0 {
            state.sleepers.remove(&self.key);
            return Poll::Ready(());
        }
        if let Some(waker) = state.sleepers.get_mut(&self.key) {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

impl Drop for ManualSleep<'_> {
    fn drop(&mut self) {
        self.clock.lock().sleepers.remove(&self.key);
    }
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ManualState {
                now: start,
                next_id: 0,
                sleepers: BTreeMap::new(),
            }),
        })
    }

    /// Starts at whole epoch seconds.
    pub fn at_unix(epoch_secs: i64) -> Arc<Self> {
        Self::new(from_unix_seconds(epoch_secs))
    }

    pub fn advance(&self, by: Duration) {
        self.move_with(|now| Some(now + by));
    }

    /// Sets the time, forwards or backwards (a wall-clock jump).
    pub fn set(&self, to: SystemTime) {
        self.move_with(|_| Some(to));
    }

    /// Moves time backwards (a wall-clock step back).
    pub fn rewind(&self, by: Duration) {
        self.move_with(|now| Some(now - by));
    }

    /// The earliest deadline of a pending sleeper that is still in the future.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        let state = self.lock();
        let after_now = (Bound::Excluded((state.now, u64::MAX)), Bound::Unbounded);
        state.sleepers.range(after_now).next().map(|(k, _)| k.0)
    }

    /// The deadlines of every pending sleeper, earliest first.
    pub fn deadlines(&self) -> Vec<SystemTime> {
        self.lock().sleepers.keys().map(|k| k.0).collect()
    }

    /// How many sleepers are pending, due or not.
    pub fn sleepers(&self) -> usize {
        self.lock().sleepers.len()
    }

    /// How many pending sleepers are already due (woken, not yet run to completion).
    pub fn due_sleepers(&self) -> usize {
        let state = self.lock();
        state.sleepers.range(ManualState::due_by(state.now)).count()
    }

    /// Jumps to the next sleeper's deadline if it is no later than `limit`, and returns the
    /// new time; `None` (the clock unchanged) when no sleeper is due by then.
    pub fn advance_to_next(&self, limit: SystemTime) -> Option<SystemTime> {
        let next = self.next_deadline().filter(|d| *d <= limit)?;
        // Another thread may have moved the clock meanwhile; never move it backwards here.
        Some(self.move_with(|now| (now < next).then_some(next)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the time to what `to` makes of it (`None`: unchanged), wakes the sleepers that are
    /// due at the new time, and returns it.
    fn move_with(&self, to: impl FnOnce(SystemTime) -> Option<SystemTime>) -> SystemTime {
        let (now, due) = {
            let mut state = self.lock();
            if let Some(t) = to(state.now) {
                state.now = t;
            }
            let now = state.now;
            let due: Vec<Waker> = state
                .sleepers
                .range_mut(ManualState::due_by(now))
                .filter_map(|(_, w)| w.take())
                .collect();
            (now, due)
        };
        for waker in due {
            waker.wake();
        }
        now
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.lock().now
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
        let key = {
            let mut state = self.lock();
            let key = (deadline, state.next_id);
            state.next_id += 1;
            state.sleepers.insert(key, None);
            key
        };
        Box::pin(ManualSleep { clock: self, key })
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

    /// Counts the wake-ups a sleeper gets.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_move_wakes_only_the_sleepers_it_makes_due() {
        let clock = ManualClock::at_unix(1_000);
        let mut soon = clock.sleep_until(from_unix_seconds(1_010));
        let mut late = clock.sleep_until(from_unix_seconds(1_030));
        let counts = [(); 2].map(|()| Arc::new(CountingWaker(0.into())));
        let wakes = |i: usize| counts[i].0.load(std::sync::atomic::Ordering::SeqCst);
        for (sleep, count) in [&mut soon, &mut late].into_iter().zip(&counts) {
            let waker = Waker::from(count.clone());
            assert!(sleep
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
        }
        clock.advance(Duration::from_secs(5));
        assert_eq!((wakes(0), wakes(1)), (0, 0), "nothing due yet");
        clock.advance(Duration::from_secs(5));
        assert_eq!((wakes(0), wakes(1)), (1, 0), "only the sleeper at 1010");
        // A step back: the woken sleeper polls again and waits anew.
        clock.rewind(Duration::from_secs(600));
        let waker = Waker::from(counts[0].clone());
        let mut cx = Context::from_waker(&waker);
        assert!(soon.as_mut().poll(&mut cx).is_pending(), "back before 1010");
        clock.set(from_unix_seconds(1_029));
        assert_eq!(
            (wakes(0), wakes(1)),
            (2, 0),
            "1029 passes 1010 again, not 1030"
        );
        clock.set(from_unix_seconds(1_030));
        assert_eq!((wakes(0), wakes(1)), (2, 1));
        assert!(soon.as_mut().poll(&mut cx).is_ready());
        assert!(late.as_mut().poll(&mut cx).is_ready());
        assert_eq!(clock.sleepers(), 0, "completed sleepers are forgotten");
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
