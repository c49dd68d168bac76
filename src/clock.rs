//! Wall-clock time as a dependency.
//!
//! Hour boundaries are UTC wall-clock time, which `tokio::time::pause()` cannot move, so every
//! component that cares about hours takes a [`SharedClock`]. Production uses [`SystemClock`];
//! tests use [`ManualClock`] and move time explicitly; demos use [`ScaledClock`].

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
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
    changed: watch::Sender<SystemTime>,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Arc<Self> {
        let (changed, _) = watch::channel(start);
        Arc::new(Self {
            now: Mutex::new(start),
            changed,
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
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sleep_until(&self, deadline: SystemTime) -> SleepFuture<'_> {
        let mut changes = self.changed.subscribe();
        Box::pin(async move {
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

    #[test]
    fn manual_clock_can_jump_backwards() {
        let clock = ManualClock::at_unix(10_000);
        clock.rewind(Duration::from_secs(600));
        assert_eq!(unix_seconds(clock.now()), 9_400);
    }
}
