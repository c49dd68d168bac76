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
