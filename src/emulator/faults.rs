//! Fault injection: throttling, 5xx, added latency, dropped connections, downtime and
//! unprocessed batch records, per operation, from a seeded RNG.
//!
//! Each authenticated call of an enabled operation draws exactly one number from the RNG (and
//! one more per batch record), so a given seed and call sequence always produce the same faults. A faulted call is decided
//! before the operation runs, so it changes no stored state.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::ConfigError;
use super::model::Operation;

/// Faults for every operation (`all`), optionally replaced per operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultProfile {
    #[serde(default)]
    pub all: FaultRule,
    /// A rule here replaces `all` for that operation.
    #[serde(default)]
    pub operations: BTreeMap<Operation, FaultRule>,
    /// When set, the fault RNG is reseeded as the profile is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl FaultProfile {
    /// `rule` for every operation.
    pub fn every(rule: FaultRule) -> Self {
        Self {
            all: rule,
            ..Self::default()
        }
    }

    /// `rule` for one operation, the others untouched.
    pub fn only(operation: Operation, rule: FaultRule) -> Self {
        Self {
            operations: BTreeMap::from([(operation, rule)]),
            ..Self::default()
        }
    }

    /// The same profile, reseeding the fault RNG as it is applied.
    pub fn seeded(self, seed: u64) -> Self {
        Self {
            seed: Some(seed),
            ..self
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// Share of calls answered `ThrottlingException` (400).
    #[serde(default)]
    pub throttle_rate: f64,
    /// Share of calls answered `InternalServiceErrorException` (500).
    #[serde(default)]
    pub error_rate: f64,
    /// Share of calls whose connection is closed without a response.
    #[serde(default)]
    pub drop_rate: f64,
    /// BatchMeterUsage only: share of records returned in `UnprocessedRecords`.
    #[serde(default)]
    pub unprocessed_rate: f64,
    /// Delay before answering, in emulator-clock time.
    #[serde(default, with = "humantime_serde")]
    pub latency: Option<Duration>,
    /// The operation answers `ServiceUnavailable` (503) for this long (emulator clock) from
    /// the moment the profile is applied.
    #[serde(default, with = "humantime_serde")]
    pub down_for: Option<Duration>,
}

impl FaultRule {
    /// The operation answers `ServiceUnavailable` for `duration` from when it is applied.
    pub fn down(duration: Duration) -> Self {
        Self {
            down_for: Some(duration),
            ..Self::default()
        }
    }
}

/// The longest `latency` or `down_for` a rule may have. Longer ones are configuration
/// errors, so no fault time can overflow a clock.
pub const MAX_FAULT_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

impl FaultRule {
    fn problems(&self, scope: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, rate) in [
            ("throttle_rate", self.throttle_rate),
            ("error_rate", self.error_rate),
            ("drop_rate", self.drop_rate),
            ("unprocessed_rate", self.unprocessed_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                problems.push(format!(
                    "faults.{scope}.{name}: must be within 0..=1, got {rate}"
                ));
            }
        }
        let sum = self.throttle_rate + self.error_rate + self.drop_rate;
        if sum > 1.0 + 1e-9 {
            problems.push(format!(
                "faults.{scope}: throttle_rate + error_rate + drop_rate must not exceed 1, got {sum}"
            ));
        }
        for (name, duration) in [("latency", self.latency), ("down_for", self.down_for)] {
            if let Some(d) = duration.filter(|d| *d > MAX_FAULT_DURATION) {
                problems.push(format!(
                    "faults.{scope}.{name}: at most {}, got {}",
                    humantime::format_duration(MAX_FAULT_DURATION),
                    humantime::format_duration(d)
                ));
            }
        }
        problems
    }
}

impl FaultProfile {
    pub fn rule(&self, op: Operation) -> &FaultRule {
        self.operations.get(&op).unwrap_or(&self.all)
    }

    /// Every problem, each naming its field (`faults.all.down_for: at most 7days, got ...`).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.all.problems("all");
        for (op, rule) in &self.operations {
            problems.extend(rule.problems(&format!("operations.{}", op.name())));
        }
        problems
    }

    /// The one check a profile passes before it is applied, from the configuration file,
    /// the admin API or [`super::EmulatorHandle::try_set_faults`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// A fault the emulator injected into a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectedFault {
    Down,
    Dropped,
    Throttled,
    ServerError,
    /// Some batch records went to `UnprocessedRecords`.
    Unprocessed {
        records: usize,
    },
}

/// What to do to one call before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    pub latency: Option<Duration>,
    pub fault: Option<InjectedFault>,
}

pub(crate) struct FaultInjector {
    profile: FaultProfile,
    /// Per operation, the end of its downtime; `None` is past the clock's range: for ever.
    down_until: BTreeMap<Operation, Option<SystemTime>>,
    rng: StdRng,
}

impl FaultInjector {
    pub fn new(profile: FaultProfile, seed: u64, now: SystemTime) -> Result<Self, ConfigError> {
        let mut injector = Self {
            profile: FaultProfile::default(),
            down_until: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed),
        };
        injector.set(profile, now)?;
        Ok(injector)
    }

    pub fn profile(&self) -> &FaultProfile {
        &self.profile
    }

    /// Validates `profile` and applies it from `now`; an invalid one changes nothing.
    pub fn set(&mut self, profile: FaultProfile, now: SystemTime) -> Result<(), ConfigError> {
        profile.validate()?;
        if let Some(seed) = profile.seed {
            self.rng = StdRng::seed_from_u64(seed);
        }
        self.down_until.clear();
        for op in Operation::ALL {
            if let Some(down_for) = profile.rule(op).down_for {
                self.down_until.insert(op, now.checked_add(down_for));
            }
        }
        self.profile = profile;
        Ok(())
    }

    pub fn decide(&mut self, op: Operation, now: SystemTime) -> Decision {
        let rule = self.profile.rule(op);
        let latency = rule.latency.filter(|d| !d.is_zero());
        let draw: f64 = self.rng.gen();
        let down = self
            .down_until
            .get(&op)
            .is_some_and(|until| until.is_none_or(|until| now < until));
        let fault = if down {
            Some(InjectedFault::Down)
        } else if draw < rule.drop_rate {
            Some(InjectedFault::Dropped)
        } else if draw < rule.drop_rate + rule.throttle_rate {
            Some(InjectedFault::Throttled)
        } else if draw < rule.drop_rate + rule.throttle_rate + rule.error_rate {
            Some(InjectedFault::ServerError)
        } else {
            None
        };
        Decision { latency, fault }
    }

    /// One draw per batch record: should it be left unprocessed?
    pub fn unprocessed(&mut self, op: Operation) -> bool {
        let rate = self.profile.rule(op).unprocessed_rate;
        let draw: f64 = self.rng.gen();
        draw < rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn same_seed_same_faults() {
        let rule = FaultRule {
            throttle_rate: 0.3,
            error_rate: 0.2,
            drop_rate: 0.1,
            ..FaultRule::default()
        };
        let run = |seed| {
            let mut f = FaultInjector::new(FaultProfile::every(rule.clone()), seed, at(0))
                .expect("valid profile");
            (0..200)
                .map(|_| f.decide(Operation::MeterUsage, at(0)).fault)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn rates_are_respected() {
        let rule = FaultRule {
            throttle_rate: 0.25,
            error_rate: 0.25,
            ..FaultRule::default()
        };
        let mut f = FaultInjector::new(FaultProfile::every(rule), 1, at(0)).expect("valid profile");
        let n = 4000;
        let (mut throttled, mut errors) = (0, 0);
        for _ in 0..n {
            match f.decide(Operation::RegisterUsage, at(0)).fault {
                Some(InjectedFault::Throttled) => throttled += 1,
                Some(InjectedFault::ServerError) => errors += 1,
                None => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        // Expected 1000 each; 5 standard deviations is about 137.
        assert!((863..=1137).contains(&throttled), "{throttled}");
        assert!((863..=1137).contains(&errors), "{errors}");
    }

    #[test]
    fn down_lasts_for_the_given_clock_time_per_operation() {
        let mut p = FaultProfile::default();
        p.operations.insert(
            Operation::MeterUsage,
            FaultRule {
                down_for: Some(Duration::from_secs(30)),
                ..FaultRule::default()
            },
        );
        let mut f = FaultInjector::new(p, 0, at(100)).expect("valid profile");
        assert_eq!(
            f.decide(Operation::MeterUsage, at(129)).fault,
            Some(InjectedFault::Down)
        );
        assert_eq!(f.decide(Operation::RegisterUsage, at(129)).fault, None);
        assert_eq!(f.decide(Operation::MeterUsage, at(130)).fault, None);
    }

    #[test]
    fn rates_out_of_range_are_problems() {
        let p = FaultProfile::every(FaultRule {
            throttle_rate: 0.7,
            error_rate: 0.7,
            drop_rate: -0.1,
            ..FaultRule::default()
        });
        assert_eq!(p.problems().len(), 2, "{:?}", p.problems());
    }

    #[test]
    fn fault_durations_are_bounded_and_named() {
        let mut p = FaultProfile::every(FaultRule {
            latency: Some(MAX_FAULT_DURATION),
            down_for: Some(MAX_FAULT_DURATION),
            ..FaultRule::default()
        });
        p.validate().expect("the bound itself is allowed");
        p.all.down_for = Some(Duration::from_secs(500_000_000_000 * 365 * 86400));
        p.operations.insert(
            Operation::MeterUsage,
            FaultRule {
                latency: MAX_FAULT_DURATION.checked_add(Duration::from_secs(1)),
                ..FaultRule::default()
            },
        );
        let problems = p.validate().expect_err("too long").problems;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("faults.all.down_for: at most 7days"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("faults.operations.MeterUsage.latency: at most 7days"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_invalid_profile_changes_nothing() {
        let mut f = FaultInjector::new(FaultProfile::default(), 0, at(0)).expect("valid");
        let huge = FaultProfile::every(FaultRule {
            down_for: Some(Duration::MAX),
            ..FaultRule::default()
        });
        assert!(f.set(huge.clone(), at(0)).is_err());
        assert_eq!(f.profile(), &FaultProfile::default());
        assert_eq!(f.decide(Operation::MeterUsage, at(0)).fault, None);
        assert!(FaultInjector::new(huge, 0, at(0)).is_err());
    }

    /// The latest time `SystemTime` can hold.
    fn end_of_time() -> SystemTime {
        let (mut t, mut step) = (UNIX_EPOCH, Duration::MAX);
        while !step.is_zero() {
            match t.checked_add(step) {
                Some(later) => t = later,
                None => step /= 2,
            }
        }
        t
    }

    #[test]
    fn a_downtime_past_the_end_of_the_clock_lasts_for_ever() {
        // An hour before the clock's end, even a bounded down_for overflows: no panic, down
        // for ever.
        let start = end_of_time()
            .checked_sub(Duration::from_secs(3600))
            .expect("an hour before the end");
        let rule = FaultRule {
            down_for: Some(MAX_FAULT_DURATION),
            ..FaultRule::default()
        };
        let mut f = FaultInjector::new(FaultProfile::every(rule), 0, start).expect("valid");
        assert_eq!(
            f.decide(Operation::MeterUsage, end_of_time()).fault,
            Some(InjectedFault::Down)
        );
    }
}
