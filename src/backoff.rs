//! Exponential back-off with jitter, for every retry loop (start-up and delivery).
//!
//! The delay before retry `attempt` (0-based) starts from `base = min(max, initial * 2^attempt)`
//! and is jittered uniformly into `[base / 2, base]` ("equal jitter"): never more than `max`,
//! never less than half of `initial`, so retries neither stampede nor stall.
//!
//! Throttling uses "decorrelated jitter" instead ([`Backoff::decorrelated`]): each delay is
//! drawn uniformly from `[initial, 3 × previous]`, capped at `max`, so a fleet throttled in the
//! same second spreads out rather than retrying in lockstep.

use std::future::Future;
use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::clock::SharedClock;

/// Longest cap accepted: a start-up retry never waits more than an hour at a time.
pub const MAX_BACKOFF_CAP: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackoffError {
    #[error("back-off initial delay must be greater than zero")]
    ZeroInitial,
    #[error("back-off initial delay {initial:?} is longer than its cap {max:?}")]
    InitialAboveMax { initial: Duration, max: Duration },
    #[error("back-off cap {0:?} is longer than the 1 h allowed")]
    CapTooLong(Duration),
}

/// A validated back-off schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// `0 < initial <= max <= 1 h`.
    pub fn try_new(initial: Duration, max: Duration) -> Result<Self, BackoffError> {
        if initial.is_zero() {
            return Err(BackoffError::ZeroInitial);
        }
        if initial > max {
            return Err(BackoffError::InitialAboveMax { initial, max });
        }
        if max > MAX_BACKOFF_CAP {
            return Err(BackoffError::CapTooLong(max));
        }
        Ok(Self { initial, max })
    }

    /// 1 s doubling up to 30 s: the container start-up default.
    pub fn startup_default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }

    pub fn initial(&self) -> Duration {
        self.initial
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The un-jittered delay before retry `attempt` (0-based): `min(max, initial * 2^attempt)`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The delay for `attempt` with jitter `unit` in `[0, 1]` (clamped):
    /// `base / 2 + unit * base / 2`.
    pub fn delay_with_jitter(&self, attempt: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let base = self.base_delay(attempt);
        let half = base / 2;
        (half + (base - half).mul_f64(unit)).min(self.max)
    }

    /// The delay for `attempt`, jittered with `rng`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        self.delay_with_jitter(attempt, rng.gen::<f64>())
    }

    /// Decorrelated jitter with `unit` in `[0, 1]` (clamped): `initial + unit × (high −
    /// initial)` where `high = min(max, 3 × previous)`, never below `initial`. Start with
    /// `previous = initial`.
    pub fn decorrelated_with_jitter(&self, previous: Duration, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let high = previous.saturating_mul(3).min(self.max).max(self.initial);
        (self.initial + (high - self.initial).mul_f64(unit)).min(self.max)
    }

    /// The delay after `previous` with decorrelated jitter from `rng`.
    pub fn decorrelated<R: Rng + ?Sized>(&self, previous: Duration, rng: &mut R) -> Duration {
        self.decorrelated_with_jitter(previous, rng.gen::<f64>())
    }
}

/// How [`retry`] or [`retry_with`] ended without success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryError<E> {
    /// The operation failed in a way another attempt will not change.
    Permanent(E),
    /// Transient failures until the attempts or the deadline ran out; the last one.
    Exhausted { attempts: u32, last: E },
}

impl<E> RetryError<E> {
    pub fn into_inner(self) -> E {
        match self {
            RetryError::Permanent(e) | RetryError::Exhausted { last: e, .. } => e,
        }
    }
}

/// How the delay before the next attempt is drawn from a [`Backoff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Equal jitter on `initial × 2^attempt` ([`Backoff::delay`]).
    Exponential,
    /// Decorrelated jitter from the previous delay ([`Backoff::decorrelated`]): throttling.
    Decorrelated,
}

/// The times of successive retries: a [`Backoff`] paced one way, stopping after
/// `max_attempts` attempts or when the next attempt would start after `deadline`.
#[derive(Debug, Clone)]
pub struct Schedule {
    backoff: Backoff,
    pacing: Pacing,
    max_attempts: Option<u32>,
    deadline: Option<SystemTime>,
    previous: Duration,
}

impl Schedule {
    pub fn new(
        backoff: Backoff,
        pacing: Pacing,
        max_attempts: Option<u32>,
        deadline: Option<SystemTime>,
    ) -> Self {
        Self {
            backoff,
            pacing,
            max_attempts,
            deadline,
            previous: backoff.initial(),
        }
    }

    /// When attempt `attempt + 1` starts after attempt `attempt` (1-based) failed at `now`,
    /// or `None` when the attempts or the deadline ran out.
    pub fn next_after(&mut self, attempt: u32, now: SystemTime) -> Option<SystemTime> {
        let delay = match self.pacing {
            Pacing::Exponential => self
                .backoff
                .delay(attempt.saturating_sub(1), &mut rand::thread_rng()),
            Pacing::Decorrelated => self
                .backoff
                .decorrelated(self.previous, &mut rand::thread_rng()),
        };
        self.previous = delay;
        let next = now.checked_add(delay)?;
        let out_of_attempts = self.max_attempts.is_some_and(|m| attempt >= m);
        let past_deadline = self.deadline.is_some_and(|d| next > d);
        (!out_of_attempts && !past_deadline).then_some(next)
    }
}

/// Calls `op` until it succeeds, fails permanently (`is_transient` false), makes
/// `max_attempts` attempts, or would start its next attempt after `deadline`. Between
/// attempts it waits the jittered back-off on the injected clock, so tests move time instead
/// of waiting, and tells `on_retry` (attempt number, failure, next attempt's time) first.
pub async fn retry<T, E, F, Fut>(
    clock: &SharedClock,
    backoff: &Backoff,
    max_attempts: Option<u32>,
    deadline: Option<SystemTime>,
    is_transient: impl Fn(&E) -> bool,
    on_retry: impl FnMut(u32, &E, SystemTime),
    mut op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut schedule = Schedule::new(*backoff, Pacing::Exponential, max_attempts, deadline);
    retry_with(
        clock,
        |attempt, _: &E, now| schedule.next_after(attempt, now),
        is_transient,
        on_retry,
        |_| op(),
    )
    .await
}

/// The one retry loop. Calls `op` with the attempt number (1-based) until it succeeds or
/// fails permanently (`is_transient` false); after a transient failure at `now`,
/// `next_attempt(attempt, failure, now)` gives the next attempt's time (`None`: give up,
/// [`RetryError::Exhausted`]), `on_retry` hears of it, and the wait is on the injected clock.
/// `now` is the wall time at the first attempt plus the clock's monotonic time since, so
/// budgets and waits count time that passed, whatever steps the wall clock takes meanwhile.
pub async fn retry_with<T, E, F, Fut>(
    clock: &SharedClock,
    mut next_attempt: impl FnMut(u32, &E, SystemTime) -> Option<SystemTime>,
    is_transient: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(u32, &E, SystemTime),
    mut op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    // Time as the retries see it: the wall clock at the start moved on by monotonic time, so
    // a step of the wall clock (NTP at boot) neither cuts a budget short nor stretches a wait.
    let (start, start_monotonic) = (clock.now(), clock.monotonic());
    let steady_now = || start + clock.monotonic().saturating_sub(start_monotonic);
    let mut attempt = 0u32;
    loop {
        attempt = attempt.saturating_add(1);
        let failure = match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) if !is_transient(&e) => return Err(RetryError::Permanent(e)),
            Err(e) => e,
        };
        let now = steady_now();
        let Some(next) = next_attempt(attempt, &failure, now) else {
            return Err(RetryError::Exhausted {
                attempts: attempt,
                last: failure,
            });
        };
        on_retry(attempt, &failure, next);
        let wait = next.duration_since(now).unwrap_or_default();
        clock.sleep_monotonic(clock.monotonic() + wait).await;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::startup_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock, SleepFuture};
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    /// A wall clock a test steps forward while monotonic time (and every wait) runs on a
    /// manual clock: NTP correcting the time at boot.
    struct SteppedClock {
        monotonic: Arc<ManualClock>,
        step: Mutex<Duration>,
    }

    impl Clock for SteppedClock {
        fn now(&self) -> SystemTime {
            self.monotonic.now() + *self.step.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn sleep_until(&self, deadline: SystemTime) -> SleepFuture<'_> {
            let step = *self.step.lock().unwrap_or_else(|e| e.into_inner());
            self.monotonic.sleep_until(deadline - step)
        }

        fn monotonic(&self) -> Duration {
            self.monotonic.monotonic()
        }

        fn sleep_monotonic(&self, until: Duration) -> SleepFuture<'_> {
            self.monotonic.sleep_monotonic(until)
        }
    }

    #[tokio::test]
    async fn a_wall_clock_step_neither_ends_a_budget_nor_skips_a_wait() {
        let s = Duration::from_secs;
        let monotonic = ManualClock::at_unix(1_000);
        let stepped = Arc::new(SteppedClock {
            monotonic: monotonic.clone(),
            step: Mutex::new(Duration::ZERO),
        });
        let clock: SharedClock = stepped.clone();
        let attempts_at = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (clock, attempts_at, monotonic) =
                (clock.clone(), attempts_at.clone(), monotonic.clone());
            async move {
                let b = Backoff::try_new(s(1), s(8)).expect("valid");
                let deadline = clock.now() + s(60);
                retry(
                    &clock,
                    &b,
                    None,
                    Some(deadline),
                    |_: &()| true,
                    |attempt, _, _| {
                        if attempt == 1 {
                            // Two hours forward, during the first wait.
                            *stepped.step.lock().unwrap_or_else(|e| e.into_inner()) = s(7_200);
                        }
                    },
                    || {
                        let mut at = attempts_at.lock().unwrap_or_else(|e| e.into_inner());
                        at.push(monotonic.monotonic());
                        let n = at.len();
                        async move {
                            if n < 3 {
                                Err(())
                            } else {
                                Ok(n)
                            }
                        }
                    },
                )
                .await
            }
        });
        let far = crate::clock::from_unix_seconds(10_000);
        while !task.is_finished() {
            monotonic.advance_to_next(far);
            tokio::task::yield_now().await;
        }
        let result = task.await.expect("task");
        assert_eq!(
            result,
            Ok(3),
            "the 60 s budget is not spent by a step of the wall clock"
        );
        let at = attempts_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        assert!(
            at.windows(2).all(|w| w[1] - w[0] >= s(1) / 2),
            "every wait lasts its back-off (equal jitter: at least half of 1 s): {at:?}"
        );
    }

    #[test]
    fn constructor_refuses_invalid_schedules() {
        let s = Duration::from_secs;
        assert_eq!(
            Backoff::try_new(Duration::ZERO, s(1)),
            Err(BackoffError::ZeroInitial)
        );
        assert!(matches!(
            Backoff::try_new(s(10), s(1)),
            Err(BackoffError::InitialAboveMax { .. })
        ));
        assert!(matches!(
            Backoff::try_new(s(1), s(7200)),
            Err(BackoffError::CapTooLong(_))
        ));
        assert!(Backoff::try_new(s(1), s(1)).is_ok());
    }

    #[test]
    fn base_delay_doubles_then_caps() {
        let b = Backoff::try_new(Duration::from_secs(1), Duration::from_secs(30)).expect("valid");
        let got: Vec<u64> = (0..8).map(|a| b.base_delay(a).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(b.base_delay(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn a_schedule_stops_at_its_attempts_or_its_deadline() {
        let s = Duration::from_secs;
        let b = Backoff::try_new(s(1), s(8)).expect("valid");
        let t0 = std::time::UNIX_EPOCH + s(1_000);
        let mut by_attempts = Schedule::new(b, Pacing::Exponential, Some(3), None);
        assert!(by_attempts
            .next_after(1, t0)
            .is_some_and(|t| t <= t0 + s(1)));
        assert!(by_attempts
            .next_after(2, t0)
            .is_some_and(|t| t >= t0 + s(1)));
        assert_eq!(by_attempts.next_after(3, t0), None);
        let mut by_deadline = Schedule::new(b, Pacing::Decorrelated, None, Some(t0 + s(10)));
        let next = by_deadline.next_after(1, t0).expect("inside the deadline");
        assert!(next >= t0 + s(1) && next <= t0 + s(3));
        assert_eq!(by_deadline.next_after(2, t0 + s(10)), None);
    }

    proptest! {
        #[test]
        fn jittered_delay_stays_within_bounds(
            initial_ms in 1u64..=600_000,
            extra_ms in 0u64..=3_000_000,
            attempt in any::<u32>(),
            unit in any::<f64>(),
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = Duration::from_millis((initial_ms + extra_ms).min(3_600_000));
            let b = Backoff::try_new(initial, max).expect("valid by construction");
            let d = b.delay_with_jitter(attempt, unit);
            prop_assert!(d <= max, "{d:?} > cap {max:?}");
            prop_assert!(d >= initial / 2, "{d:?} < half the initial delay {initial:?}");
            prop_assert!(d >= b.base_delay(attempt) / 2);
            prop_assert!(d <= b.base_delay(attempt));
        }

        #[test]
        fn decorrelated_delay_stays_within_bounds(
            initial_ms in 1u64..=600_000,
            extra_ms in 0u64..=3_000_000,
            previous_ms in 0u64..=4_000_000,
            unit in any::<f64>(),
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = Duration::from_millis((initial_ms + extra_ms).min(3_600_000));
            let b = Backoff::try_new(initial, max).expect("valid by construction");
            let previous = Duration::from_millis(previous_ms);
            let d = b.decorrelated_with_jitter(previous, unit);
            prop_assert!(d >= initial && d <= max, "{d:?} outside [{initial:?}, {max:?}]");
            prop_assert!(d <= (previous * 3).max(initial), "{d:?} above 3 × {previous:?}");
        }

        #[test]
        fn base_delay_never_decreases(
            initial_ms in 1u64..=600_000,
            extra_ms in 0u64..=3_000_000,
            attempt in 0u32..200,
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = Duration::from_millis((initial_ms + extra_ms).min(3_600_000));
            let b = Backoff::try_new(initial, max).expect("valid by construction");
            prop_assert!(b.base_delay(attempt) <= b.base_delay(attempt + 1));
        }

        #[test]
        fn constructor_accepts_exactly_the_valid_schedules(
            initial_ms in 0u64..=4_000_000,
            max_ms in 0u64..=4_000_000,
        ) {
            let r = Backoff::try_new(Duration::from_millis(initial_ms), Duration::from_millis(max_ms));
            let valid = initial_ms > 0 && initial_ms <= max_ms && max_ms <= 3_600_000;
            prop_assert_eq!(r.is_ok(), valid);
        }
    }
}
