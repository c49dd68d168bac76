//! Rates on the injected clock: the agent's send limit and the emulator's quotas.
//!
//! - [`CallWindow`]: at most `n` calls in any rolling second. The agent waits on it
//!   ([`RateLimiter`]) before every MeterUsage, retries included (`sending.max_calls_per_second`).
//! - [`TokenBucket`]: a bucket of `burst` tokens refilled at `rate` a second, which refuses
//!   instead of waiting; the emulator's per-account quotas.
//!
//! Both take `now` as an argument, so they are pure and tested without a clock; a clock that
//! steps back never makes either wait longer than one second's worth.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crate::clock::SharedClock;

const SECOND: Duration = Duration::from_secs(1);

/// At most `limit` calls in any rolling second (a call at `t` counts until `t + 1 s`).
#[derive(Debug, Clone)]
pub struct CallWindow {
    limit: usize,
    /// The times of the last calls, oldest first; never more than `limit`.
    recent: VecDeque<SystemTime>,
}

impl CallWindow {
    /// `limit` is at least 1.
    pub fn new(limit: u32) -> Self {
        let limit = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
        Self {
            limit,
            recent: VecDeque::with_capacity(limit.min(1024)),
        }
    }

    /// Takes a slot at `now`, or says how long until one frees.
    pub fn try_take(&mut self, now: SystemTime) -> Result<(), Duration> {
        // A slot taken "in the future" (the clock stepped back) frees as if taken now.
        for t in self.recent.iter_mut() {
            if *t > now {
                *t = now;
            }
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t).unwrap_or_default() >= SECOND)
        {
            self.recent.pop_front();
        }
        if self.recent.len() < self.limit {
            self.recent.push_back(now);
            return Ok(());
        }
        let oldest = self.recent.front().copied().unwrap_or(now);
        Err(SECOND.saturating_sub(now.duration_since(oldest).unwrap_or_default()))
    }
}

/// The agent's one limiter for MeterUsage: waits on the injected clock for a slot.
#[derive(Debug)]
pub struct RateLimiter {
    window: std::sync::Mutex<CallWindow>,
}

impl RateLimiter {
    pub fn new(calls_per_second: u32) -> Self {
        Self {
            window: std::sync::Mutex::new(CallWindow::new(calls_per_second)),
        }
    }

    /// Returns once a call may be made now; the caller makes it straight away.
    pub async fn acquire(&self, clock: &SharedClock) {
        loop {
            let now = clock.now();
            let wait = self
                .window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_take(now);
            match wait {
                Ok(()) => return,
                // Monotonic: a step back of the wall clock does not stretch the wait.
                Err(wait) => clock.sleep_monotonic(clock.monotonic() + wait).await,
            }
        }
    }
}

/// A token bucket: `burst` tokens, refilled continuously at `rate` a second, starting full.
/// Exact in nanoseconds (the time the bucket will next be full is all it keeps).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Time one token takes to refill.
    interval: Duration,
    /// The bucket's depth as time: `burst × interval`.
    depth: Duration,
    /// When the bucket is full again; `None` until the first call.
    full_at: Option<SystemTime>,
}

impl TokenBucket {
    /// `rate` and `burst` are at least 1.
    pub fn new(rate: u32, burst: u32) -> Self {
        let interval = SECOND / rate.max(1);
        Self {
            interval,
            depth: interval * burst.max(1),
            full_at: None,
        }
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn try_take(&mut self, now: SystemTime) -> Result<(), Duration> {
        // A clock step back leaves the bucket at most empty as of now, so it refills from now
        // on: never a refusal longer than one token's interval.
        if let Some(full_at) = self.full_at {
            if full_at
                .duration_since(now)
                .is_ok_and(|owed| owed > self.depth)
            {
                self.full_at = Some(now + self.depth);
            }
        }
        // Time still owed before the bucket is full.
        let owed = self
            .full_at
            .and_then(|t| t.duration_since(now).ok())
            .unwrap_or_default();
        let after = owed + self.interval;
        if after > self.depth {
            return Err(after - self.depth);
        }
        self.full_at = Some(now + after);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{from_unix_seconds, ManualClock};
    use proptest::prelude::*;
    use std::sync::Arc;

    fn at(ms: u64) -> SystemTime {
        from_unix_seconds(1_000) + Duration::from_millis(ms)
    }

    /// Calls made in every rolling second of `times` (sorted).
    fn max_in_any_second(times: &[SystemTime]) -> usize {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| t.duration_since(times[i]).unwrap_or_default() < SECOND)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn window_allows_the_limit_then_says_when_a_slot_frees() {
        let mut w = CallWindow::new(2);
        assert_eq!(w.try_take(at(0)), Ok(()));
        assert_eq!(w.try_take(at(100)), Ok(()));
        assert_eq!(w.try_take(at(400)), Err(Duration::from_millis(600)));
        assert_eq!(w.try_take(at(999)), Err(Duration::from_millis(1)));
        assert_eq!(w.try_take(at(1000)), Ok(()));
        assert_eq!(w.try_take(at(1050)), Err(Duration::from_millis(50)));
    }

    #[test]
    fn window_after_a_clock_step_back_waits_at_most_a_second() {
        let mut w = CallWindow::new(1);
        assert_eq!(w.try_take(at(10_000)), Ok(()));
        let wait = w.try_take(at(0)).expect_err("the slot is taken");
        assert!(wait <= SECOND, "{wait:?}");
    }

    proptest! {
        /// Whatever the arrival pattern, a caller that waits as told never exceeds the limit
        /// in any rolling second, and is never told to wait when a slot is free.
        #[test]
        fn window_never_exceeds_its_limit(
            limit in 1u32..20,
            gaps in proptest::collection::vec(0u64..700, 1..200),
        ) {
            let mut w = CallWindow::new(limit);
            let mut now = at(0);
            let mut made = Vec::new();
            for gap in gaps {
                now += Duration::from_millis(gap);
                loop {
                    match w.try_take(now) {
                        Ok(()) => { made.push(now); break; }
                        Err(wait) => {
                            prop_assert!(!wait.is_zero() && wait <= SECOND);
                            now += wait;
                        }
                    }
                }
            }
            prop_assert!(max_in_any_second(&made) <= limit as usize);
        }

        /// A bucket accepts at most `burst + rate × t` calls in any span `t`, and a steady
        /// caller at the rate is never refused.
        #[test]
        fn bucket_accepts_burst_plus_rate(
            rate in 1u32..50,
            burst in 1u32..50,
            gaps in proptest::collection::vec(0u64..300, 1..300),
        ) {
            let mut b = TokenBucket::new(rate, burst);
            let mut now = at(0);
            let mut accepted = Vec::new();
            for gap in gaps {
                now += Duration::from_millis(gap);
                if b.try_take(now).is_ok() {
                    accepted.push(now);
                }
            }
            for (i, start) in accepted.iter().enumerate() {
                for (j, end) in accepted.iter().enumerate().skip(i) {
                    let span = end.duration_since(*start).unwrap_or_default();
                    let allowed = burst as f64 + rate as f64 * span.as_secs_f64() + 1e-6;
                    prop_assert!(((j - i + 1) as f64) <= allowed, "{} calls in {span:?}", j - i + 1);
                }
            }
            let mut steady = TokenBucket::new(rate, burst);
            for k in 0..100u32 {
                prop_assert!(steady.try_take(at(0) + SECOND / rate * k).is_ok());
            }
        }
    }

    #[test]
    fn a_bucket_refills_from_now_after_the_clock_steps_back() {
        let mut b = TokenBucket::new(10, 10);
        let t = at(10_000_000);
        for _ in 0..10 {
            b.try_take(t).expect("the burst");
        }
        assert!(b.try_take(t).is_err(), "empty");
        // Ten minutes back: empty as of then, one token a tenth of a second later.
        let back = t - Duration::from_secs(600);
        assert_eq!(b.try_take(back), Err(Duration::from_millis(100)));
        assert!(b.try_take(back + Duration::from_millis(100)).is_ok());
        let refilled = back + Duration::from_secs(2);
        for _ in 0..10 {
            b.try_take(refilled).expect("full again a second later");
        }
    }

    #[test]
    fn bucket_refuses_past_its_burst_and_refills_at_its_rate() {
        let mut b = TokenBucket::new(10, 10);
        for _ in 0..10 {
            assert_eq!(b.try_take(at(0)), Ok(()));
        }
        assert_eq!(b.try_take(at(0)), Err(Duration::from_millis(100)));
        assert_eq!(b.try_take(at(50)), Err(Duration::from_millis(50)));
        assert_eq!(b.try_take(at(100)), Ok(()));
        assert!(b.try_take(at(100)).is_err());
        // Idle for a while, it is full again (never fuller).
        for _ in 0..10 {
            assert_eq!(b.try_take(at(60_000)), Ok(()));
        }
        assert!(b.try_take(at(60_000)).is_err());
    }

    #[tokio::test]
    async fn limiter_waits_on_the_injected_clock() {
        let clock = ManualClock::at_unix(1_000);
        let shared: SharedClock = clock.clone();
        let limiter = Arc::new(RateLimiter::new(2));
        limiter.acquire(&shared).await;
        limiter.acquire(&shared).await;
        let third = {
            let (limiter, shared) = (limiter.clone(), shared.clone());
            tokio::spawn(async move { limiter.acquire(&shared).await })
        };
        // Real time passes; the clock does not: the third call waits.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished());
        clock.advance(Duration::from_millis(999));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished());
        clock.advance(Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("woke once the clock moved a second")
            .expect("task ok");
        assert_eq!(shared.now(), from_unix_seconds(1_001));
    }
}
