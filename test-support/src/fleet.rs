//! The fleet simulations' oracle (issue 16): a seeded quantity per agent, dimension and hour,
//! and the check that the service billed each exactly once. Shared by the in-process fleets
//! (`tests/agent/fleet.rs`, `tests/agent/senders.rs`) and the fleet of real processes
//! (`tests/reliability.rs`).

use std::collections::BTreeMap;

use meterd::emulator::EmulatorHandle;

/// What a fleet posted: (access key id, hour, dimension) → quantity.
pub type FleetOracle = BTreeMap<(String, i64, String), i64>;

/// Every unit the oracle holds, by (agent, hour, dimension), was billed in exactly one record,
/// counting the records of hours before `until`.
pub fn assert_billed_once(emulator: &EmulatorHandle, oracle: &FleetOracle, until: i64) {
    let mut billed: FleetOracle = BTreeMap::new();
    for r in emulator.records().into_iter().filter(|r| r.hour < until) {
        let key = (r.identity.clone(), r.hour, r.dimension.clone());
        assert!(
            billed.insert(key.clone(), r.quantity).is_none(),
            "two records for {key:?}"
        );
    }
    assert_eq!(
        billed.len(),
        oracle.len(),
        "one record per agent, dimension and hour"
    );
    assert!(&billed == oracle, "every unit billed once, none lost");
}

/// The next usage quantity, 1 to 1,000, from a seeded LCG (the same fleet every run).
pub fn next_quantity(seed: &mut u64) -> i64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) as i64 % 1000 + 1
}

/// What a fleet simulation saw of one hour's records.
#[derive(Debug, Clone, Copy)]
pub struct HourDelivered {
    pub records: u64,
    pub dead_letters: u64,
    /// Records neither sent nor dead (0 where a simulation tells them by `last_accepted_after`).
    pub unsent: u64,
    /// Seconds from the hour's close until its last record was accepted (`i64::MAX`: never).
    pub last_accepted_after: i64,
}

/// The checks every fleet makes of each hour: all `expected` records there, none
/// dead-lettered or left unsent, the last accepted within `bound_secs` of the close.
pub fn assert_hour_delivered(i: usize, hour: HourDelivered, expected: u64, bound_secs: i64) {
    assert_eq!(hour.records, expected, "hour {i}: {hour:?}");
    assert_eq!(
        (hour.dead_letters, hour.unsent),
        (0, 0),
        "hour {i}: {hour:?}"
    );
    assert!(
        hour.last_accepted_after <= bound_secs,
        "hour {i}: the last record was accepted {} s after the close (bound {bound_secs} s)",
        hour.last_accepted_after
    );
}
