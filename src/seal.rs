//! Sealing: a closed hour's counters become one record per configured dimension.
//!
//! Pure functions only; the ledger calls them inside the transaction that persists the result,
//! so a sealed record exists on disk before its first send and never changes afterwards.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::TagSet;

/// One counter row of an hour: a dimension and tag set with its total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub dimension: String,
    pub tags: TagSet,
    pub quantity: i64,
}

/// A bucket of a record's quantity. Empty `tags` is the untagged bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub quantity: i64,
    pub tags: TagSet,
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
}

/// Seals `hour`: one record per dimension in `dimensions` (zero records only if `report_zero`).
pub fn seal_hour(
    hour: i64,
    rows: &[UsageRow],
    dimensions: &[String],
    report_zero: bool,
    max_allocations: usize,
) -> Vec<SealedRecord> {
    let mut by_dimension: BTreeMap<&str, Vec<&UsageRow>> = BTreeMap::new();
    for row in rows {
        by_dimension.entry(&row.dimension).or_default().push(row);
    }
    dimensions
        .iter()
        .filter_map(|dimension| {
            let rows = by_dimension.remove(dimension.as_str()).unwrap_or_default();
            let quantity: i64 = rows.iter().map(|r| r.quantity).sum();
            if quantity == 0 && !report_zero {
                return None;
            }
            let (allocations, folded_tag_sets) = allocate(&rows, max_allocations);
            Some(SealedRecord {
                hour,
                dimension: dimension.clone(),
                quantity,
                allocations,
                folded_tag_sets,
            })
        })
        .collect()
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
        UsageRow {
            dimension: dimension.to_owned(),
            tags: tags(t),
            quantity,
        }
    }

    fn dims() -> Vec<String> {
        vec!["requests".to_owned(), "gigabytes".to_owned()]
    }

    #[test]
    fn one_record_per_dimension_with_zeroes() {
        let recs = seal_hour(3600, &[row("requests", &[], 5)], &dims(), true, 500);
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
        let recs = seal_hour(3600, &[row("requests", &[], 5)], &dims(), false, 500);
        assert_eq!(recs.len(), 1);
    }

    #[test]
    fn untagged_usage_joins_tagged_as_an_allocation_without_tags() {
        let rows = [
            row("requests", &[("tenant", "a")], 3),
            row("requests", &[("tenant", "b")], 4),
            row("requests", &[], 2),
        ];
        let recs = seal_hour(0, &rows, &dims(), true, 500);
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
                .map(|((d, tenant), quantity)| UsageRow {
                    dimension: ["requests", "gigabytes", "other"][usize::from(d)].to_owned(),
                    tags: tenant
                        .map(|t| tags(&[("tenant", &t.to_string())]))
                        .unwrap_or_default(),
                    quantity,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn allocations_sum_to_quantity_are_unique_and_bounded(
            rows in arb_rows(),
            max in 1usize..60,
            report_zero: bool,
        ) {
            let recs = seal_hour(7200, &rows, &dims(), report_zero, max);
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
