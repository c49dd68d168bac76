//! Sealing: a closed hour's counters become one record per configured dimension.
//!
//! Everything about sealing starts here. "Why was hour X (not) sealed, and with what?":
//! - *when*: [`schedule`], the hourly loop (`seal_loop`): each hour is sealed `sending.seal_delay`
//!   after it closes, closed hours left from before a restart at once, the open hour by the
//!   shutdown flush; it logs every sealed hour (`report_seal`).
//! - *what*: this module, pure functions: the quantity and allocations of each dimension-hour,
//!   the record timestamp and the ClientToken.
//! - *how it is stored*: the transaction in `ledger/seal.rs` (`Ledger::seal_through`), which calls
//!   [`seal_hour`] inside the transaction that persists the result, so a sealed record exists on
//!   disk before its first send and never changes afterwards; it then runs the ledger's
//!   retention step in the same transaction.
//!
//! # How each aggregation becomes a quantity and its UsageAllocations
//! The allocations of a record always add up to its quantity (a property test says so):
//! - `sum`: the quantity is the sum over every tag set; each tag set gets its own sum.
//! - `unique`: the quantity is the number of distinct values of the hour; each distinct value
//!   is attributed to the tag set of its first occurrence in the hour, so each tag set gets
//!   the number of values it brought first.
//! - `max`: the quantity is the largest quantity posted in the hour, over every tag set. The
//!   whole of it is attributed to the tag set of the event that first reached it (the
//!   earliest received, when several events reached the same value). A sum of per-tag-set
//!   maxima would not equal the hour's maximum, and a proportional split would bill a tag set
//!   for a level it never reached; the attribution says which usage set the bill.
//! - `last`: the quantity is the last quantity received before the hour closed, over every
//!   tag set, attributed to that event's tag set.
//!
//! As for sums, there are no allocations when the attributed usage carries no tags (or the
//! quantity is 0), and at most `max_allocations` (the smallest tag sets fold into the untagged
//! bucket).
//!
//! # Heartbeat dimensions
//! `metering.heartbeat` dimensions are recorded by meterd itself: the ledger accumulates the
//! seconds the agent ran in each hour, and the quantity is [`heartbeat_quantity`]:
//! `units × seconds / 3600` rounded half up, so a full hour is exactly `units`.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::clock::HOUR_SECS;
use crate::model::{Aggregation, Allocation, TagSet, UsageRow};

pub mod schedule;

/// What sealing needs besides the counters.
#[derive(Debug, Clone, Default)]
pub struct SealPolicy {
    pub dimensions: Vec<String>,
    pub report_zero: bool,
    pub max_allocations: usize,
    /// Per dimension; a dimension not listed sums.
    pub aggregation: BTreeMap<String, Aggregation>,
    /// Heartbeat dimensions and their units per hour.
    pub heartbeat: BTreeMap<String, i64>,
}

impl SealPolicy {
    pub fn aggregation_of(&self, dimension: &str) -> Aggregation {
        self.aggregation.get(dimension).copied().unwrap_or_default()
    }
}

/// What one MeterUsage call will carry for a dimension-hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    pub hour: i64,
    pub dimension: String,
    pub quantity: i64,
    /// `None` when no usage of the hour carried tags.
    pub allocations: Option<Vec<Allocation>>,
    /// Tag sets folded into the untagged bucket because of `max_allocations`.
    pub folded_tag_sets: usize,
    /// Rows of the dimension-hour recorded under another aggregation than the configured one
    /// (the configuration changed within the hour); they are not billed.
    pub ignored_rows: usize,
}

/// Seals `hour`: one record per dimension in `policy.dimensions` (zero records only if
/// `report_zero`). `run_seconds` is how long the agent ran in the hour (heartbeat dimensions).
pub fn seal_hour(
    hour: i64,
    rows: &[UsageRow],
    run_seconds: i64,
    policy: &SealPolicy,
) -> Vec<SealedRecord> {
    let mut by_dimension: BTreeMap<&str, Vec<&UsageRow>> = BTreeMap::new();
    for row in rows {
        by_dimension.entry(&row.dimension).or_default().push(row);
    }
    policy
        .dimensions
        .iter()
        .filter_map(|dimension| {
            let rows = by_dimension.remove(dimension.as_str()).unwrap_or_default();
            let (quantity, allocations, folded_tag_sets, ignored_rows) =
                match policy.heartbeat.get(dimension) {
                    Some(units) => (heartbeat_quantity(*units, run_seconds), None, 0, rows.len()),
                    None => {
                        let aggregation = policy.aggregation_of(dimension);
                        let (mine, other): (Vec<&UsageRow>, Vec<&UsageRow>) =
                            rows.into_iter().partition(|r| r.aggregation == aggregation);
                        let (quantity, basis) = measure(aggregation, &mine);
                        let (allocations, folded) = allocate(&basis, policy.max_allocations);
                        (quantity, allocations, folded, other.len())
                    }
                };
            if quantity == 0 && !policy.report_zero {
                return None;
            }
            Some(SealedRecord {
                hour,
                dimension: dimension.clone(),
                quantity,
                allocations,
                folded_tag_sets,
                ignored_rows,
            })
        })
        .collect()
}

/// A dimension-hour's quantity under `aggregation`, and the rows its allocations are made of
/// (see the module doc): every row for `sum` and `unique`, the one row that set the value for
/// `max` and `last`.
pub fn measure<'r>(aggregation: Aggregation, rows: &[&'r UsageRow]) -> (i64, Vec<&'r UsageRow>) {
    let winner = match aggregation {
        Aggregation::Sum | Aggregation::Unique => {
            return (rows.iter().map(|r| r.quantity).sum(), rows.to_vec())
        }
        // The largest value; of equal values the first reached (then the tags, so the choice
        // never depends on row order).
        Aggregation::Max => rows.iter().copied().max_by(|a, b| {
            a.quantity
                .cmp(&b.quantity)
                .then_with(|| b.seq.cmp(&a.seq))
                .then_with(|| b.tags.cmp(&a.tags))
        }),
        Aggregation::Last => rows
            .iter()
            .copied()
            .max_by(|a, b| a.seq.cmp(&b.seq).then_with(|| b.tags.cmp(&a.tags))),
    };
    match winner {
        Some(row) => (row.quantity, vec![row]),
        None => (0, Vec::new()),
    }
}

/// A heartbeat dimension's quantity for an hour in which the agent ran `seconds` (clamped to
/// 0..=3600): `units × seconds / 3600`, rounded half up. A full hour is exactly `units`; an
/// hour of 30 minutes at 1 unit is 1, of 29 minutes 59 seconds 0.
pub fn heartbeat_quantity(units: i64, seconds: i64) -> i64 {
    let seconds = i128::from(seconds.clamp(0, HOUR_SECS));
    let hour = i128::from(HOUR_SECS);
    let q = (i128::from(units.max(0)) * seconds * 2 + hour) / (2 * hour);
    i64::try_from(q).unwrap_or(i64::MAX)
}

/// Turns tag-set totals into UsageAllocations.
///
/// Without tagged usage there are no allocations. Otherwise each tag set with usage is an
/// allocation, the untagged usage is one more without tags, and when that exceeds
/// `max_allocations` the smallest tag sets fold into the untagged bucket.
pub fn allocate(rows: &[&UsageRow], max_allocations: usize) -> (Option<Vec<Allocation>>, usize) {
    let mut untagged: i64 = rows
        .iter()
        .filter(|r| r.tags.is_empty())
        .map(|r| r.quantity)
        .sum();
    let mut tagged: Vec<&UsageRow> = rows
        .iter()
        .copied()
        .filter(|r| !r.tags.is_empty() && r.quantity > 0)
        .collect();
    if tagged.is_empty() {
        return (None, 0);
    }
    // Largest first; ties broken by tags so the result is deterministic.
    tagged.sort_by(|a, b| {
        b.quantity
            .cmp(&a.quantity)
            .then_with(|| a.tags.cmp(&b.tags))
    });
    let max = max_allocations.max(1);
    let mut folded = 0;
    if tagged.len() + usize::from(untagged > 0) > max {
        let keep = max - 1;
        folded = tagged.len() - keep;
        untagged += tagged.drain(keep..).map(|r| r.quantity).sum::<i64>();
    }
    let mut allocations: Vec<Allocation> = tagged
        .into_iter()
        .map(|r| Allocation {
            quantity: r.quantity,
            tags: r.tags.clone(),
        })
        .collect();
    if untagged > 0 {
        allocations.push(Allocation {
            quantity: untagged,
            tags: TagSet::new(),
        });
    }
    (Some(allocations), folded)
}

/// The MeterUsage timestamp for an hour: its start, but never before the agent first started.
pub fn record_timestamp(hour: i64, first_start: i64) -> i64 {
    hour.max(first_start)
}

/// The idempotency token for a dimension-hour: the same on every attempt, on every restart.
pub fn client_token(product_code: &str, dimension: &str, hour: i64, instance_id: &str) -> String {
    let mut h = Sha256::new();
    for part in [product_code, dimension, &hour.to_string(), instance_id] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tags(pairs: &[(&str, &str)]) -> TagSet {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn row(dimension: &str, t: &[(&str, &str)], quantity: i64) -> UsageRow {
        UsageRow::sum(dimension, tags(t), quantity)
    }

    fn dims() -> Vec<String> {
        vec!["requests".to_owned(), "gigabytes".to_owned()]
    }

    fn policy(report_zero: bool, max_allocations: usize) -> SealPolicy {
        SealPolicy {
            dimensions: dims(),
            report_zero,
            max_allocations,
            ..SealPolicy::default()
        }
    }

    #[test]
    fn one_record_per_dimension_with_zeroes() {
        let recs = seal_hour(3600, &[row("requests", &[], 5)], 0, &policy(true, 500));
        assert_eq!(recs.len(), 2);
        assert_eq!(
            (recs[0].dimension.as_str(), recs[0].quantity),
            ("requests", 5)
        );
        assert_eq!(
            (recs[1].dimension.as_str(), recs[1].quantity),
            ("gigabytes", 0)
        );
        assert!(recs.iter().all(|r| r.allocations.is_none()));
    }

    #[test]
    fn no_zero_records_without_report_zero() {
        let recs = seal_hour(3600, &[row("requests", &[], 5)], 0, &policy(false, 500));
        assert_eq!(recs.len(), 1);
    }

    #[test]
    fn untagged_usage_joins_tagged_as_an_allocation_without_tags() {
        let rows = [
            row("requests", &[("tenant", "a")], 3),
            row("requests", &[("tenant", "b")], 4),
            row("requests", &[], 2),
        ];
        let recs = seal_hour(0, &rows, 0, &policy(true, 500));
        let allocs = recs[0].allocations.clone().expect("allocations");
        assert_eq!(recs[0].quantity, 9);
        assert_eq!(
            allocs,
            vec![
                Allocation {
                    quantity: 4,
                    tags: tags(&[("tenant", "b")])
                },
                Allocation {
                    quantity: 3,
                    tags: tags(&[("tenant", "a")])
                },
                Allocation {
                    quantity: 2,
                    tags: TagSet::new()
                },
            ]
        );
    }

    #[test]
    fn overflow_folds_smallest_tag_sets_into_untagged() {
        let rows = [
            row("requests", &[("tenant", "a")], 10),
            row("requests", &[("tenant", "b")], 1),
            row("requests", &[("tenant", "c")], 5),
        ];
        let refs: Vec<&UsageRow> = rows.iter().collect();
        let (allocs, folded) = allocate(&refs, 2);
        let allocs = allocs.expect("allocations");
        assert_eq!(folded, 2);
        assert_eq!(allocs.len(), 2);
        assert_eq!(allocs[0].tags, tags(&[("tenant", "a")]));
        assert_eq!(
            allocs[1],
            Allocation {
                quantity: 6,
                tags: TagSet::new()
            }
        );
    }

    #[test]
    fn timestamp_never_before_first_start() {
        assert_eq!(record_timestamp(3600, 3000), 3600);
        assert_eq!(record_timestamp(3600, 4000), 4000);
    }

    #[test]
    fn client_token_is_stable_and_distinct() {
        let a = client_token("p", "d", 3600, "i");
        assert_eq!(a, client_token("p", "d", 3600, "i"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, client_token("p", "d", 7200, "i"));
        assert_ne!(a, client_token("p", "e", 3600, "i"));
        assert_ne!(a, client_token("p", "d", 3600, "j"));
        // Length-prefixing keeps field boundaries apart.
        assert_ne!(
            client_token("ab", "c", 0, "i"),
            client_token("a", "bc", 0, "i")
        );
    }

    fn arb_rows() -> impl Strategy<Value = Vec<UsageRow>> {
        prop::collection::btree_map(
            (0u8..3, prop::option::of(0u16..400)),
            0i64..1_000_000,
            0..300,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|((d, tenant), quantity)| {
                    UsageRow::sum(
                        ["requests", "gigabytes", "other"][usize::from(d)],
                        tenant
                            .map(|t| tags(&[("tenant", &t.to_string())]))
                            .unwrap_or_default(),
                        quantity,
                    )
                })
                .collect()
        })
    }

    #[test]
    fn heartbeat_rounds_half_up_and_a_full_hour_is_exact() {
        assert_eq!(heartbeat_quantity(1, 3600), 1);
        assert_eq!(heartbeat_quantity(1, 1800), 1, "half an hour rounds up");
        assert_eq!(heartbeat_quantity(1, 1799), 0);
        assert_eq!(heartbeat_quantity(60, 2400), 40);
        assert_eq!(heartbeat_quantity(60, 1350), 23, "22.5 rounds up");
        assert_eq!(heartbeat_quantity(60, 0), 0);
        assert_eq!(
            heartbeat_quantity(60, 99_999),
            60,
            "never more than a full hour"
        );
        assert_eq!(heartbeat_quantity(2_147_483_647, 3600), 2_147_483_647);
    }

    #[test]
    fn max_goes_to_the_tag_set_that_first_reached_it_and_last_to_the_last_event() {
        let gauge = |t: &[(&str, &str)], quantity, seq, aggregation| UsageRow {
            dimension: "peak".into(),
            tags: tags(t),
            quantity,
            aggregation,
            seq,
        };
        let max = [
            gauge(&[("tenant", "a")], 7, 4, Aggregation::Max),
            gauge(&[("tenant", "b")], 9, 8, Aggregation::Max),
            gauge(&[("tenant", "c")], 9, 6, Aggregation::Max),
            gauge(&[], 3, 9, Aggregation::Max),
        ];
        let refs: Vec<&UsageRow> = max.iter().collect();
        let (q, basis) = measure(Aggregation::Max, &refs);
        assert_eq!((q, basis[0].tags.clone()), (9, tags(&[("tenant", "c")])));
        let (q, basis) = measure(Aggregation::Last, &refs);
        assert_eq!((q, basis[0].tags.clone()), (3, TagSet::new()));
        let policy = SealPolicy {
            dimensions: vec!["peak".into()],
            report_zero: true,
            max_allocations: 500,
            aggregation: BTreeMap::from([("peak".to_owned(), Aggregation::Max)]),
            ..SealPolicy::default()
        };
        let rec = &seal_hour(0, &max, 0, &policy)[0];
        assert_eq!(rec.quantity, 9);
        assert_eq!(
            rec.allocations,
            Some(vec![Allocation {
                quantity: 9,
                tags: tags(&[("tenant", "c")])
            }])
        );
        // Rows of another aggregation (a configuration changed within the hour) are not billed.
        let mixed = [max[0].clone(), row("peak", &[], 100)];
        let rec = &seal_hour(0, &mixed, 0, &policy)[0];
        assert_eq!((rec.quantity, rec.ignored_rows), (7, 1));
        // A heartbeat dimension bills the running time and nothing posted.
        let policy = SealPolicy {
            heartbeat: BTreeMap::from([("peak".to_owned(), 60)]),
            ..policy
        };
        let rec = &seal_hour(0, &mixed, 2400, &policy)[0];
        assert_eq!((rec.quantity, rec.allocations.clone()), (40, None));
    }

    /// Rows as the ledger keeps them for one aggregation: per tag set (and dimension), with
    /// distinct receive sequences.
    fn arb_rows_of(aggregation: Aggregation) -> impl Strategy<Value = Vec<UsageRow>> {
        prop::collection::btree_map(
            (0u8..2, prop::option::of(0u16..40)),
            (0i64..1_000, 0i64..1_000_000),
            0..60,
        )
        .prop_map(move |m| {
            m.into_iter()
                .enumerate()
                .map(|(i, ((d, tenant), (quantity, seq)))| UsageRow {
                    dimension: ["requests", "gigabytes"][usize::from(d)].to_owned(),
                    tags: tenant
                        .map(|t| tags(&[("tenant", &t.to_string())]))
                        .unwrap_or_default(),
                    quantity,
                    aggregation,
                    // Unique per row, as the writer's sequence is.
                    seq: seq * 1000 + i as i64,
                })
                .collect()
        })
    }

    fn arb_aggregation() -> impl Strategy<Value = Aggregation> {
        prop::sample::select(Aggregation::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn every_aggregation_allocates_exactly_its_quantity(
            (aggregation, rows) in arb_aggregation().prop_flat_map(|a| (Just(a), arb_rows_of(a))),
            max in 1usize..20,
        ) {
            let policy = SealPolicy {
                dimensions: dims(),
                report_zero: true,
                max_allocations: max,
                aggregation: dims().into_iter().map(|d| (d, aggregation)).collect(),
                ..SealPolicy::default()
            };
            for rec in seal_hour(7200, &rows, 0, &policy) {
                let mine: Vec<&UsageRow> = rows.iter().filter(|r| r.dimension == rec.dimension).collect();
                // The reference: the definitions, computed independently of `measure`.
                let expected = match aggregation {
                    Aggregation::Sum | Aggregation::Unique => mine.iter().map(|r| r.quantity).sum(),
                    Aggregation::Max => mine.iter().map(|r| r.quantity).max().unwrap_or(0),
                    Aggregation::Last => mine.iter().max_by_key(|r| r.seq).map_or(0, |r| r.quantity),
                };
                prop_assert_eq!(rec.quantity, expected);
                if let Some(allocs) = &rec.allocations {
                    prop_assert!(allocs.len() <= max);
                    prop_assert_eq!(allocs.iter().map(|a| a.quantity).sum::<i64>(), rec.quantity);
                    prop_assert!(allocs.iter().all(|a| a.quantity > 0));
                    if matches!(aggregation, Aggregation::Max | Aggregation::Last) {
                        prop_assert_eq!(allocs.len(), 1);
                        let winner = &allocs[0].tags;
                        let row = mine.iter().find(|r| &r.tags == winner).expect("a row of that tag set");
                        prop_assert_eq!(row.quantity, rec.quantity);
                        if aggregation == Aggregation::Max {
                            let first = mine.iter().filter(|r| r.quantity == rec.quantity).map(|r| r.seq).min();
                            prop_assert_eq!(Some(row.seq), first, "the first to reach the max");
                        }
                    }
                }
            }
        }

        #[test]
        fn heartbeat_is_monotone_bounded_and_exact_on_full_hours(units in 1i64..=2_147_483_647, a in 0i64..=3600, b in 0i64..=3600) {
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(heartbeat_quantity(units, lo) <= heartbeat_quantity(units, hi));
            prop_assert!(heartbeat_quantity(units, hi) <= units);
            prop_assert_eq!(heartbeat_quantity(units, 3600), units);
            // Within half a unit of the exact pro-rata value.
            let exact = units as f64 * hi as f64 / 3600.0;
            prop_assert!((heartbeat_quantity(units, hi) as f64 - exact).abs() <= 0.5 + 1e-6);
        }

        #[test]
        fn allocations_sum_to_quantity_are_unique_and_bounded(
            rows in arb_rows(),
            max in 1usize..60,
            report_zero: bool,
        ) {
            let recs = seal_hour(7200, &rows, 0, &policy(report_zero, max));
            for rec in &recs {
                let expected: i64 = rows.iter().filter(|r| r.dimension == rec.dimension).map(|r| r.quantity).sum();
                prop_assert_eq!(rec.quantity, expected);
                if let Some(allocs) = &rec.allocations {
                    prop_assert!(!allocs.is_empty());
                    prop_assert!(allocs.len() <= max);
                    prop_assert_eq!(allocs.iter().map(|a| a.quantity).sum::<i64>(), rec.quantity);
                    let unique: std::collections::BTreeSet<&TagSet> = allocs.iter().map(|a| &a.tags).collect();
                    prop_assert_eq!(unique.len(), allocs.len());
                    let tagged = rows.iter().filter(|r| r.dimension == rec.dimension && !r.tags.is_empty() && r.quantity > 0).count();
                    let kept = allocs.iter().filter(|a| !a.tags.is_empty()).count();
                    prop_assert_eq!(kept + rec.folded_tag_sets, tagged);
                } else {
                    prop_assert!(rows.iter().all(|r| r.dimension != rec.dimension || r.tags.is_empty() || r.quantity == 0));
                }
            }
            let names: Vec<&str> = recs.iter().map(|r| r.dimension.as_str()).collect();
            if report_zero { prop_assert_eq!(names, vec!["requests", "gigabytes"]); }
        }
    }
}
