//! Live state shared by the API, the sender and the start-up sequence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::entitlement::contract::ContractCheckout;
use crate::entitlement::{DryRunPassed, Entitlement, EntitlementState};

/// `metering_health` in `/v1/status`: how long usage has gone unsent, against `[health]`.
/// The application decides what to do at each level; meterd keeps running and retrying.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum MeteringHealth {
    Ok,
    Warn,
    Degraded,
    Failing,
}

impl MeteringHealth {
    pub const ALL: [MeteringHealth; 4] = [
        MeteringHealth::Ok,
        MeteringHealth::Warn,
        MeteringHealth::Degraded,
        MeteringHealth::Failing,
    ];

    /// The level for usage unsent for `unsent_seconds` (0 when nothing is pending).
    pub fn of(unsent_seconds: i64, thresholds: &crate::config::HealthConfig) -> Self {
        let past = |d: std::time::Duration| {
            unsent_seconds > 0 && u64::try_from(unsent_seconds).unwrap_or(0) >= d.as_secs()
        };
        if past(thresholds.failing_after) {
            MeteringHealth::Failing
        } else if past(thresholds.degraded_after) {
            MeteringHealth::Degraded
        } else if past(thresholds.warn_after) {
            MeteringHealth::Warn
        } else {
            MeteringHealth::Ok
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MeteringHealth::Ok => "ok",
            MeteringHealth::Warn => "warn",
            MeteringHealth::Degraded => "degraded",
            MeteringHealth::Failing => "failing",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EntitlementStatus {
    pub state: EntitlementState,
    pub details: EntitlementDetails,
}

/// `details` in `/v1/status`: the non-secret facts behind the state (claims, key
/// fingerprint, registration time, rotation timestamp). Untagged: each variant is the JSON
/// object it always was, `None` is `null`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EntitlementDetails {
    /// Nothing known yet.
    None,
    /// RegisterUsage verified.
    Registered(Box<Entitlement>),
    /// Contract pricing: the license checkout.
    Contract(Box<ContractCheckout>),
    /// The MeterUsage DryRun passed.
    DryRunPassed(DryRunPassed),
    /// AMI: the DryRun check is still being retried (`{"dry_run": "in progress"}`).
    DryRunInProgress { dry_run: DryRunProgress },
    /// Why entitlement failed (`{"error": "..."}`).
    Failed { error: String },
}

/// The one value of `details.dry_run` while the AMI DryRun check retries.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum DryRunProgress {
    #[serde(rename = "in progress")]
    InProgress,
}

impl EntitlementStatus {
    /// The `failed` state with its reason.
    pub fn failed(error: &impl std::fmt::Display) -> Self {
        Self {
            state: EntitlementState::Failed,
            details: EntitlementDetails::Failed {
                error: error.to_string(),
            },
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct SenderStatus {
    pub last_error: Option<String>,
    pub last_success_at: Option<String>,
    pub consecutive_failures: u64,
}

#[derive(Debug)]
pub struct StatusBoard {
    pub platform: String,
    entitlement: RwLock<EntitlementStatus>,
    sender: RwLock<SenderStatus>,
    ready: AtomicBool,
    /// The ledger's own flag ([`crate::ledger::Ledger::writable_flag`]).
    ledger_writable: Arc<AtomicBool>,
}

impl StatusBoard {
    pub fn new(platform: String, ledger_writable: Arc<AtomicBool>) -> Self {
        Self {
            platform,
            entitlement: RwLock::new(EntitlementStatus {
                state: EntitlementState::Pending,
                details: EntitlementDetails::None,
            }),
            sender: RwLock::new(SenderStatus::default()),
            ready: AtomicBool::new(false),
            ledger_writable,
        }
    }

    pub fn entitlement(&self) -> EntitlementStatus {
        self.entitlement
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_entitlement(&self, status: EntitlementStatus) {
        let admitted = matches!(
            status.state,
            EntitlementState::Entitled
                | EntitlementState::PermissionsVerified
                | EntitlementState::Unverified
        );
        *self.entitlement.write().unwrap_or_else(|e| e.into_inner()) = status;
        self.ready.store(admitted, Ordering::Release);
    }

    pub fn sender(&self) -> SenderStatus {
        self.sender
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update_sender(&self, f: impl FnOnce(&mut SenderStatus)) {
        f(&mut self.sender.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn ledger_writable(&self) -> bool {
        self.ledger_writable.load(Ordering::Acquire)
    }

    /// Ready: entitled (or admitted without RegisterUsage) and the ledger takes writes.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.ledger_writable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthConfig;

    #[test]
    fn details_serialize_as_the_objects_they_replaced() {
        let json = |d: EntitlementDetails| serde_json::to_value(d).expect("serializes");
        assert_eq!(json(EntitlementDetails::None), serde_json::Value::Null);
        assert_eq!(
            json(EntitlementDetails::DryRunInProgress {
                dry_run: DryRunProgress::InProgress
            }),
            serde_json::json!({"dry_run": "in progress"})
        );
        assert_eq!(
            json(EntitlementStatus::failed(&"boom").details),
            serde_json::json!({"error": "boom"})
        );
    }

    #[test]
    fn health_levels_follow_the_thresholds_and_never_fail_before_them() {
        let t = HealthConfig::default();
        let at = |s| MeteringHealth::of(s, &t);
        assert_eq!(at(0), MeteringHealth::Ok);
        assert_eq!(at(1799), MeteringHealth::Ok);
        assert_eq!(at(1800), MeteringHealth::Warn);
        assert_eq!(at(7199), MeteringHealth::Warn);
        assert_eq!(at(7200), MeteringHealth::Degraded);
        assert_eq!(at(14_399), MeteringHealth::Degraded);
        assert_eq!(at(14_400), MeteringHealth::Failing);
        assert_eq!(at(-5), MeteringHealth::Ok);
    }
}
