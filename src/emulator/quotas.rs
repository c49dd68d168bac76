//! The Metering Service's per-account quotas: MeterUsage 10, BatchMeterUsage 10 and
//! RegisterUsage 5 calls a second per AWS account and region (ResolveCustomer is not limited).
//!
//! Each account and operation has a token bucket ([`crate::rate::TokenBucket`]) of
//! `rate × burst_seconds` tokens refilled at `rate` a second, on the emulator's clock; a call
//! with no token is answered `ThrottlingException`. The account is the caller's access key id
//! looked up in `quotas.accounts`; unmapped keys share `quotas.default_account`. Every call is
//! counted per second as accepted or throttled, so a test reads the peak rate from
//! `GET /_emulator/rates`.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::model::Operation;
use crate::clock::unix_seconds;
use crate::rate::TokenBucket;

/// Seconds of counts kept per account and operation (the oldest are dropped): 48 hours.
pub const MAX_SECONDS_KEPT: usize = 48 * 3600;
/// The largest rate or burst the configuration accepts.
pub const MAX_RATE: u32 = 100_000;

/// `[quotas]` of the emulator's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Off: no call is throttled for its rate (counts are still kept).
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "ten")]
    pub meter_usage: u32,
    #[serde(default = "ten")]
    pub batch_meter_usage: u32,
    #[serde(default = "five")]
    pub register_usage: u32,
    /// A bucket holds this many seconds of its rate: a call may follow an idle second at once.
    #[serde(default = "one")]
    pub burst_seconds: u32,
    /// Access key id → 12-digit account id.
    #[serde(default)]
    pub accounts: BTreeMap<String, String>,
    /// The account of every access key not in `accounts`.
    #[serde(default = "default_account")]
    pub default_account: String,
}

fn yes() -> bool {
    true
}
fn ten() -> u32 {
    10
}
fn five() -> u32 {
    5
}
fn one() -> u32 {
    1
}
fn default_account() -> String {
    "000000000000".to_owned()
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            meter_usage: ten(),
            batch_meter_usage: ten(),
            register_usage: five(),
            burst_seconds: one(),
            accounts: BTreeMap::new(),
            default_account: default_account(),
        }
    }
}

impl QuotaConfig {
    /// The same quotas, not enforced.
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Calls a second for `op`; `None`: not limited.
    pub fn rate(&self, op: Operation) -> Option<u32> {
        match op {
            Operation::MeterUsage => Some(self.meter_usage),
            Operation::BatchMeterUsage => Some(self.batch_meter_usage),
            Operation::RegisterUsage => Some(self.register_usage),
            Operation::ResolveCustomer => None,
        }
    }

    pub fn account_of(&self, access_key_id: &str) -> &str {
        self.accounts
            .get(access_key_id)
            .map_or(self.default_account.as_str(), String::as_str)
    }

    /// Every problem, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("quotas.meter_usage", self.meter_usage),
            ("quotas.batch_meter_usage", self.batch_meter_usage),
            ("quotas.register_usage", self.register_usage),
        ] {
            if !(1..=MAX_RATE).contains(&value) {
                problems.push(format!("{key} must be 1 to {MAX_RATE} calls a second"));
            }
        }
        if !(1..=60).contains(&self.burst_seconds) {
            problems.push("quotas.burst_seconds must be 1 to 60".to_owned());
        }
        let account_ok = |a: &str| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit());
        if !account_ok(&self.default_account) {
            problems.push(format!(
                "quotas.default_account {:?} is not a 12-digit account id",
                self.default_account
            ));
        }
        for (key, account) in &self.accounts {
            if !account_ok(account) {
                problems.push(format!(
                    "quotas.accounts: {key:?} maps to {account:?}, not a 12-digit account id"
                ));
            }
        }
        problems
    }
}

/// One second's calls of one account and operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SecondCount {
    /// Epoch seconds on the emulator's clock.
    pub second: i64,
    pub accepted: u32,
    pub throttled: u32,
}

/// What `GET /_emulator/rates` reports for one account and operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OperationRates {
    /// The quota in calls a second (absent when unlimited).
    pub quota: Option<u32>,
    pub burst: Option<u32>,
    pub accepted: u64,
    pub throttled: u64,
    /// The most calls accepted in one second of the emulator's clock.
    pub peak_accepted_per_second: u32,
    /// The most calls (accepted and throttled) received in one second.
    pub peak_calls_per_second: u32,
    /// Per second with any call, oldest first (the last [`MAX_SECONDS_KEPT`]).
    pub seconds: Vec<SecondCount>,
}

#[derive(Debug, Default)]
struct Series {
    accepted: u64,
    throttled: u64,
    seconds: std::collections::VecDeque<SecondCount>,
}

impl Series {
    fn count(&mut self, second: i64, accepted: bool) {
        if accepted {
            self.accepted += 1;
        } else {
            self.throttled += 1;
        }
        // Calls arrive in clock order, except after a step back: those join the newest second.
        let newest = self.seconds.back().map(|s| s.second);
        if newest.is_none_or(|n| second > n) {
            if self.seconds.len() >= MAX_SECONDS_KEPT {
                self.seconds.pop_front();
            }
            self.seconds.push_back(SecondCount {
                second,
                ..SecondCount::default()
            });
        }
        if let Some(last) = self.seconds.back_mut() {
            if accepted {
                last.accepted = last.accepted.saturating_add(1);
            } else {
                last.throttled = last.throttled.saturating_add(1);
            }
        }
    }
}

/// The buckets and counts, behind the server's lock.
#[derive(Debug)]
pub struct Quotas {
    config: QuotaConfig,
    buckets: HashMap<(String, Operation), TokenBucket>,
    series: BTreeMap<(String, Operation), Series>,
}

impl Quotas {
    pub fn new(config: QuotaConfig) -> Self {
        Self {
            config,
            buckets: HashMap::new(),
            series: BTreeMap::new(),
        }
    }

    /// Takes a token for a call of `op` by `access_key_id` at `now`; false: throttle it.
    /// Either way the call is counted.
    pub fn admit(&mut self, access_key_id: &str, op: Operation, now: SystemTime) -> bool {
        let account = self.config.account_of(access_key_id).to_owned();
        self.admit_account(account, op, now)
    }

    /// The account `access_key_id` belongs to (`quotas.accounts`, else the default).
    pub fn account_of(&self, access_key_id: &str) -> &str {
        self.config.account_of(access_key_id)
    }

    /// [`Quotas::admit`] for a caller whose account is known: temporary credentials carry
    /// their role's account, so a fleet on rotating keys shares its account's quota.
    pub fn admit_account(&mut self, account: String, op: Operation, now: SystemTime) -> bool {
        let accepted = match (self.config.enabled, self.config.rate(op)) {
            (true, Some(rate)) => {
                let burst = rate.saturating_mul(self.config.burst_seconds);
                self.buckets
                    .entry((account.clone(), op))
                    .or_insert_with(|| TokenBucket::new(rate, burst))
                    .try_take(now)
                    .is_ok()
            }
            _ => true,
        };
        self.series
            .entry((account, op))
            .or_default()
            .count(unix_seconds(now), accepted);
        accepted
    }

    /// Every call counted so far, accepted or throttled.
    pub fn total(&self) -> u64 {
        self.series
            .values()
            .map(|s| s.accepted.saturating_add(s.throttled))
            .sum()
    }

    /// Per account, per operation name.
    pub fn rates(&self) -> BTreeMap<String, BTreeMap<String, OperationRates>> {
        let mut out: BTreeMap<String, BTreeMap<String, OperationRates>> = BTreeMap::new();
        for ((account, op), series) in &self.series {
            let quota = self.config.rate(*op).filter(|_| self.config.enabled);
            out.entry(account.clone()).or_default().insert(
                op.name().to_owned(),
                OperationRates {
                    quota,
                    burst: quota.map(|q| q.saturating_mul(self.config.burst_seconds)),
                    accepted: series.accepted,
                    throttled: series.throttled,
                    peak_accepted_per_second: series
                        .seconds
                        .iter()
                        .map(|s| s.accepted)
                        .max()
                        .unwrap_or(0),
                    peak_calls_per_second: series
                        .seconds
                        .iter()
                        .map(|s| s.accepted.saturating_add(s.throttled))
                        .max()
                        .unwrap_or(0),
                    seconds: series.seconds.iter().copied().collect(),
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::from_unix_seconds;
    use std::time::Duration;

    #[test]
    fn each_account_has_its_own_buckets_and_counts() {
        let mut config = QuotaConfig::default();
        config
            .accounts
            .insert("AKIAFLEETA".into(), "111111111111".into());
        let mut q = Quotas::new(config);
        let t = from_unix_seconds(1_000);
        let a: Vec<bool> = (0..12)
            .map(|_| q.admit("AKIAFLEETA", Operation::MeterUsage, t))
            .collect();
        assert_eq!(
            a.iter().filter(|ok| **ok).count(),
            10,
            "burst of one second"
        );
        // Two unmapped keys share the default account's bucket.
        let b = (0..3)
            .filter(|i| q.admit(&format!("AKIAOTHER{i}"), Operation::RegisterUsage, t))
            .count();
        let c = (0..3)
            .filter(|i| q.admit(&format!("AKIAMORE{i}"), Operation::RegisterUsage, t))
            .count();
        assert_eq!(b + c, 5);
        assert!(q.admit("AKIAFLEETA", Operation::ResolveCustomer, t));
        // A second later, ten more.
        let later = t + Duration::from_secs(1);
        assert_eq!(
            (0..11)
                .filter(|_| q.admit("AKIAFLEETA", Operation::MeterUsage, later))
                .count(),
            10
        );
        let rates = q.rates();
        let meter = &rates["111111111111"]["MeterUsage"];
        assert_eq!((meter.accepted, meter.throttled), (20, 3));
        assert_eq!(meter.peak_accepted_per_second, 10);
        assert_eq!(meter.peak_calls_per_second, 12);
        assert_eq!(meter.seconds.len(), 2);
        assert_eq!((meter.quota, meter.burst), (Some(10), Some(10)));
        let register = &rates["000000000000"]["RegisterUsage"];
        assert_eq!((register.accepted, register.throttled), (5, 1));
    }

    #[test]
    fn off_counts_but_never_throttles() {
        let mut q = Quotas::new(QuotaConfig::off());
        let t = from_unix_seconds(1_000);
        assert!((0..100).all(|_| q.admit("AKID", Operation::MeterUsage, t)));
        assert_eq!(
            q.rates()["000000000000"]["MeterUsage"].peak_accepted_per_second,
            100
        );
    }

    #[test]
    fn every_bound_names_its_key() {
        let config = QuotaConfig {
            meter_usage: 0,
            burst_seconds: 61,
            default_account: "12".into(),
            accounts: BTreeMap::from([("AKID".into(), "x".into())]),
            ..QuotaConfig::default()
        };
        let problems = config.problems().join("\n");
        for key in [
            "quotas.meter_usage",
            "quotas.burst_seconds",
            "quotas.default_account",
            "quotas.accounts",
        ] {
            assert!(problems.contains(key), "{key}: {problems}");
        }
        assert!(QuotaConfig::default().problems().is_empty());
    }
}
