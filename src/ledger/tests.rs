//! The ledger as a whole: what survives a reopen, and every aggregation against a reference
//! model across restarts and flushes.

use std::collections::BTreeMap;

use super::test_support::*;
use super::{AppendOutcome, Ledger};
use crate::clock::{hour_floor, HOUR_SECS};
use crate::model::{Aggregation, Event, Measure, TagSet};
use crate::seal::SealPolicy;

#[tokio::test]
async fn appended_counts_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        let out = ledger
            .append(
                vec![event("requests", 3, None), event("requests", 4, None)],
                H + 10,
            )
            .await
            .expect("append");
        assert_eq!(
            out,
            AppendOutcome {
                accepted: 2,
                duplicates: 0,
                hour: H
            }
        );
    }
    let ledger = reopen(dir.path(), H + 20).await;
    assert_eq!(ledger.identity().first_start, H);
    assert_eq!(
        total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
        7
    );
}

#[tokio::test]
async fn agent_state_survives_reopen_and_can_be_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
        assert_eq!(ledger.state("contract").await.expect("read"), None);
        ledger
            .put_state("contract", Some("{\"token\":\"t-1\"}".to_owned()))
            .await
            .expect("put");
    }
    let ledger = reopen(dir.path(), H + 20).await;
    assert_eq!(
        ledger.state("contract").await.expect("read").as_deref(),
        Some("{\"token\":\"t-1\"}")
    );
    // Entries live apart from the ledger's own meta keys.
    assert_eq!(ledger.state("instance_id").await.expect("read"), None);
    ledger.put_state("contract", None).await.expect("remove");
    assert_eq!(ledger.state("contract").await.expect("read"), None);
}

// -----------------------------------------------------------------------------------------
// Every aggregation against a reference model: random streams with duplicate ids, restarts
// without a seal (a kill -9: the ledger dropped and opened again) and shutdown flushes of
// the open hour; what is sealed must equal what the model computes from the acknowledged
// events, per dimension-hour and per allocation.

/// (dimension index, tenant, quantity, id, distinct value)
type Spec = (usize, Option<u8>, i64, Option<u8>, u8);

#[derive(Debug, Clone)]
enum Op {
    Post(Vec<Spec>),
    Advance(i64),
    Reopen,
    Flush,
}

const AGG_DIMS: [(&str, Aggregation); 4] = [
    ("s", Aggregation::Sum),
    ("m", Aggregation::Max),
    ("l", Aggregation::Last),
    ("u", Aggregation::Unique),
];

fn agg_policy() -> SealPolicy {
    SealPolicy {
        dimensions: AGG_DIMS.iter().map(|(d, _)| (*d).to_owned()).collect(),
        report_zero: true,
        max_allocations: 500,
        aggregation: AGG_DIMS
            .iter()
            .map(|(d, a)| ((*d).to_owned(), *a))
            .collect(),
        ..SealPolicy::default()
    }
}

fn tenant_tags(tenant: Option<u8>) -> TagSet {
    tenant
        .map(|t| TagSet::from([("tenant".to_owned(), format!("t{t}"))]))
        .unwrap_or_default()
}

fn spec_event((d, tenant, q, id, value): &Spec) -> Event {
    let (dimension, aggregation) = AGG_DIMS[*d];
    Event {
        dimension: dimension.to_owned(),
        tags: tenant_tags(*tenant),
        measure: Measure::of(aggregation, *q).unwrap_or(Measure::Unique(format!("v{value}"))),
        // Ids per dimension: one id names one event.
        id: id.map(|i| format!("{dimension}-{i}")),
    }
}

/// The reference: each aggregation's definition over the acknowledged events, in order.
#[derive(Default)]
struct Reference {
    seen: std::collections::HashSet<String>,
    floor: i64,
    sums: BTreeMap<(i64, &'static str), BTreeMap<TagSet, i64>>,
    /// (value, tags) of the first event that reached the hour's max / of the last event.
    gauges: BTreeMap<(i64, &'static str), (i64, TagSet)>,
    /// value → tag set of its first occurrence.
    distinct: BTreeMap<(i64, &'static str), BTreeMap<String, TagSet>>,
}

impl Reference {
    fn post(&mut self, specs: &[Spec], now: i64) {
        let hour = hour_floor(now).max(self.floor);
        for spec in specs {
            let event = spec_event(spec);
            if let Some(id) = &event.id {
                if !self.seen.insert(id.clone()) {
                    continue;
                }
            }
            let (dimension, _) = AGG_DIMS[spec.0];
            let key = (hour, dimension);
            match event.measure {
                Measure::Sum(q) => {
                    *self
                        .sums
                        .entry(key)
                        .or_default()
                        .entry(event.tags)
                        .or_default() += q
                }
                Measure::Max(q) => {
                    let g = self.gauges.entry(key).or_insert((-1, TagSet::new()));
                    if q > g.0 {
                        *g = (q, event.tags);
                    }
                }
                Measure::Last(q) => {
                    self.gauges.insert(key, (q, event.tags));
                }
                Measure::Unique(v) => {
                    self.distinct
                        .entry(key)
                        .or_default()
                        .entry(v)
                        .or_insert(event.tags);
                }
            }
        }
    }

    /// The expected quantity and allocations (tag set → quantity; `None` without tags).
    fn expected(&self, hour: i64, dimension: &'static str) -> (i64, Option<BTreeMap<TagSet, i64>>) {
        let key = (hour, dimension);
        let per_tags: BTreeMap<TagSet, i64> = match AGG_DIMS.iter().find(|(d, _)| *d == dimension) {
            Some((_, Aggregation::Sum)) => self.sums.get(&key).cloned().unwrap_or_default(),
            Some((_, Aggregation::Unique)) => {
                let mut counts = BTreeMap::new();
                for tags in self.distinct.get(&key).into_iter().flat_map(|m| m.values()) {
                    *counts.entry(tags.clone()).or_default() += 1;
                }
                counts
            }
            _ => self
                .gauges
                .get(&key)
                .map(|(v, tags)| BTreeMap::from([(tags.clone(), *v)]))
                .unwrap_or_default(),
        };
        let quantity = per_tags.values().sum();
        let per_tags: BTreeMap<TagSet, i64> =
            per_tags.into_iter().filter(|(_, q)| *q > 0).collect();
        let tagged = per_tags.keys().any(|t| !t.is_empty());
        (quantity, tagged.then_some(per_tags))
    }
}

fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let spec = (
        0usize..4,
        prop::option::of(0u8..3),
        0i64..50,
        prop::option::of(0u8..12),
        0u8..6,
    );
    prop_oneof![
        6 => prop::collection::vec(spec, 1..6).prop_map(Op::Post),
        2 => (1i64..1500).prop_map(Op::Advance),
        1 => Just(Op::Reopen),
        1 => Just(Op::Flush),
    ]
}

async fn run_model(ops: Vec<Op>) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prop_assert_eq;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut now = H + 10;
    let mut ledger = Ledger::open(dir.path(), "prod-a", now).expect("open");
    let mut reference = Reference::default();
    for op in ops {
        match op {
            Op::Post(specs) => {
                let events = specs.iter().map(spec_event).collect();
                let out = ledger.append(events, now).await.expect("append");
                prop_assert_eq!(out.hour, hour_floor(now).max(reference.floor));
                reference.post(&specs, now);
            }
            Op::Advance(seconds) => now += seconds,
            Op::Reopen => {
                ledger.closed().await;
                ledger = reopen(dir.path(), now).await;
            }
            Op::Flush => {
                let open = ledger.open_hour(now);
                ledger
                    .seal_through(open + HOUR_SECS, now, agg_policy())
                    .await
                    .expect("flush");
                reference.floor = open + HOUR_SECS;
            }
        }
    }
    let end = ledger.open_hour(now) + HOUR_SECS;
    ledger
        .seal_through(end, now, agg_policy())
        .await
        .expect("seal");
    let records = ledger.recent_records(10_000).await.expect("records");
    prop_assert_eq!(records.len() as i64, (end - H) / HOUR_SECS * 4);
    for record in records {
        let (dimension, _) = AGG_DIMS
            .iter()
            .find(|(d, _)| *d == record.dimension)
            .expect("a configured dimension");
        let (quantity, allocations) = reference.expected(record.hour, dimension);
        prop_assert_eq!(
            record.quantity,
            quantity,
            "{} at {}",
            dimension,
            record.hour
        );
        let billed = record.allocations.map(|a| {
            a.into_iter()
                .map(|a| (a.tags, a.quantity))
                .collect::<BTreeMap<_, _>>()
        });
        prop_assert_eq!(billed, allocations, "{} at {}", dimension, record.hour);
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(40))]
    #[test]
    fn every_aggregation_bills_what_the_reference_model_computes(
        ops in proptest::collection::vec(arb_op(), 1..24),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run_model(ops))?;
    }
}

#[tokio::test]
async fn folding_an_hours_usage_visits_the_rows_of_usage_of_hour_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
    let tagged = |mut e: Event, tenant: &str| {
        e.tags = [("tenant".to_owned(), tenant.to_owned())].into();
        e
    };
    let mut events: Vec<Event> = (0..50)
        .map(|i| tagged(event("requests", i, None), &format!("t{:02}", 49 - i)))
        .collect();
    events.push(tagged(unique("v1", None), "t07"));
    events.push(tagged(unique("v2", None), "t07"));
    events.push(event("gigabytes", 9, None));
    ledger.append(events, H + 1).await.expect("append");
    let rows = ledger.usage_of_hour(H).await.expect("usage");
    assert_eq!(
        rows.len(),
        52,
        "50 tenants, one unique tag set, one untagged row"
    );
    let folded = ledger
        .fold_usage_of_hour(H, Vec::new(), |acc, row| acc.push(row))
        .await
        .expect("fold");
    assert_eq!(folded, rows);
    let count = ledger
        .fold_usage_of_hour(H + HOUR_SECS, 0_usize, |n, _| *n += 1)
        .await
        .expect("fold of an empty hour");
    assert_eq!(count, 0);
}
