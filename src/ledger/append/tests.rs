//! The append path: ids, the hourly cap, the distinct-value bound, running time.

use super::super::test_support::*;
use crate::clock::HOUR_SECS;
use crate::ledger::{Ledger, LedgerError, SealPolicy};
use crate::model::{
    Aggregation, Event, EVENT_ID_RETENTION_SECS, MAX_DISTINCT_PER_HOUR, MAX_QUANTITY,
};
use std::collections::BTreeMap;

#[tokio::test]
async fn event_ids_count_once_within_seven_hours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
    let first = ledger
        .append(
            vec![
                event("requests", 5, Some("e1")),
                event("requests", 5, Some("e1")),
            ],
            H,
        )
        .await
        .expect("append");
    assert_eq!((first.accepted, first.duplicates), (1, 1));
    let again = ledger
        .append(vec![event("requests", 5, Some("e1"))], H + 60)
        .await
        .expect("append");
    assert_eq!((again.accepted, again.duplicates), (0, 1));
    assert_eq!(
        total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
        5
    );
    let later = H + EVENT_ID_RETENTION_SECS + 1;
    let after = ledger
        .append(vec![event("requests", 5, Some("e1"))], later)
        .await
        .expect("append");
    assert_eq!(after.accepted, 1, "an id older than 7 hours counts again");
}

#[tokio::test]
async fn folded_requests_count_ids_once_and_skip_keys_of_duplicates_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
    let tagged = |dimension: &str, quantity, tenant: &str, id: Option<&str>| Event {
        tags: [("tenant".to_owned(), tenant.to_owned())].into(),
        ..event(dimension, quantity, id)
    };
    let out = ledger
        .append(
            vec![
                tagged("requests", 0, "t1", None),
                tagged("requests", 2, "t1", Some("e1")),
                tagged("requests", 3, "t1", Some("e1")),
                tagged("requests", 4, "t2", None),
                event("gigabytes", 1, Some("e2")),
            ],
            H,
        )
        .await
        .expect("append");
    assert_eq!((out.accepted, out.duplicates), (4, 1));
    let again = ledger
        .append(
            vec![
                tagged("requests", 5, "t9", Some("e1")),
                event("gigabytes", 1, Some("e2")),
            ],
            H + 1,
        )
        .await
        .expect("append");
    assert_eq!((again.accepted, again.duplicates), (0, 2));
    let rows = ledger.usage_of_hour(H).await.expect("usage");
    let quantities: Vec<(String, Option<String>, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.dimension.clone(),
                r.tags.get("tenant").cloned(),
                r.quantity,
            )
        })
        .collect();
    assert_eq!(
        quantities,
        vec![
            ("gigabytes".to_owned(), None, 1),
            ("requests".to_owned(), Some("t1".to_owned()), 2),
            ("requests".to_owned(), Some("t2".to_owned()), 4),
        ],
        "a key whose only events were duplicates gets no row"
    );
}

#[tokio::test]
async fn hourly_cap_rejects_the_whole_request_and_keeps_earlier_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
    ledger
        .append(vec![event("requests", MAX_QUANTITY - 1, None)], H)
        .await
        .expect("append");
    let err = ledger
        .append(
            vec![event("gigabytes", 1, Some("g")), event("requests", 2, None)],
            H,
        )
        .await
        .expect_err("over the cap");
    assert!(
        matches!(err, LedgerError::HourlyCapExceeded { .. }),
        "{err}"
    );
    let rows = ledger.usage_of_hour(H).await.expect("usage");
    assert_eq!(total(&rows, "requests"), MAX_QUANTITY - 1);
    assert_eq!(
        total(&rows, "gigabytes"),
        0,
        "rejected request left nothing behind"
    );
    // The rejected id was not remembered either.
    let ok = ledger
        .append(vec![event("gigabytes", 1, Some("g"))], H)
        .await
        .expect("append");
    assert_eq!(ok.accepted, 1);
    ledger
        .append(vec![event("requests", 1, None)], H)
        .await
        .expect("exactly at the cap");
}

#[tokio::test]
async fn a_unique_dimension_hour_holds_at_most_the_bound_and_refuses_whole_requests_beyond() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
    let full: Vec<Event> = (0..MAX_DISTINCT_PER_HOUR)
        .map(|i| unique(&format!("user-{i}"), None))
        .collect();
    ledger.append(full, H + 1).await.expect("up to the bound");
    let over = vec![
        event("requests", 5, Some("r1")),
        unique("user-0", None),
        unique("someone-new", Some("n1")),
    ];
    let err = ledger
        .append(over.clone(), H + 2)
        .await
        .expect_err("one more");
    assert_eq!(
        err,
        LedgerError::DistinctCapExceeded {
            dimension: "u".into(),
            hour: H,
            limit: MAX_DISTINCT_PER_HOUR
        }
    );
    assert!(err.to_string().contains("at most 100000"), "{err}");
    // Nothing of the refused request was kept: not its sum, not its ids.
    assert_eq!(
        total(&ledger.usage_of_hour(H).await.expect("usage"), "requests"),
        0
    );
    ledger
        .append(
            vec![unique("user-7", None), event("requests", 1, Some("r1"))],
            H + 3,
        )
        .await
        .expect("values already counted are fine, and the id was not remembered");
    // The bound holds after a restart too (the count is read from disk).
    drop(ledger);
    let ledger = reopen(dir.path(), H + 4).await;
    ledger
        .append(vec![unique("someone-new", None)], H + 4)
        .await
        .expect_err("still full");
    let next = ledger
        .append(over, H + HOUR_SECS + 1)
        .await
        .expect("the next hour takes new values");
    assert_eq!(
        (next.accepted, next.duplicates),
        (2, 1),
        "r1 was counted at H+3"
    );
    let rows = ledger.usage_of_hour(H).await.expect("usage");
    assert_eq!(total(&rows, "u"), MAX_DISTINCT_PER_HOUR);
    // Sealed, the hour's distinct values are deleted; the record keeps the count.
    let policy = SealPolicy {
        dimensions: vec!["u".into()],
        aggregation: BTreeMap::from([("u".to_owned(), Aggregation::Unique)]),
        report_zero: true,
        max_allocations: 500,
        ..SealPolicy::default()
    };
    ledger
        .seal_through(H + HOUR_SECS, H + HOUR_SECS + 5, policy)
        .await
        .expect("seal");
    let record = &ledger.pending_records().await.expect("records")[0];
    assert_eq!(record.quantity, MAX_DISTINCT_PER_HOUR);
    assert_eq!(
        total(&ledger.usage_of_hour(H).await.expect("usage"), "u"),
        0
    );
}

#[tokio::test]
async fn running_time_is_split_into_hours_capped_and_never_added_to_a_sealed_hour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(dir.path(), "prod-a", H).expect("open");
    ledger.record_run(H + 600, H + 1800).await.expect("run");
    ledger
        .record_run(H + 3000, H + HOUR_SECS + 120)
        .await
        .expect("across the boundary");
    assert_eq!(ledger.run_seconds(H).await.expect("seconds"), 1200 + 600);
    assert_eq!(
        ledger.run_seconds(H + HOUR_SECS).await.expect("seconds"),
        120
    );
    ledger.record_run(H, H + 2 * HOUR_SECS).await.expect("run");
    assert_eq!(
        ledger.run_seconds(H).await.expect("seconds"),
        3600,
        "capped"
    );
    ledger
        .seal_through(H + HOUR_SECS, H + HOUR_SECS + 5, policy())
        .await
        .expect("seal");
    ledger
        .record_run(H + 3500, H + HOUR_SECS + 10)
        .await
        .expect("run");
    assert_eq!(ledger.run_seconds(H).await.expect("seconds"), 3600);
    assert_eq!(
        ledger.run_seconds(H + HOUR_SECS).await.expect("seconds"),
        3600,
        "the part in the sealed hour was dropped"
    );
}

#[test]
fn small_and_large_requests_index_their_keys_alike() {
    use super::{index_keys, LINEAR_INDEX_MAX};
    use crate::model::{Measure, TagSet};
    // Five keys, repeated: two dimensions × tenants, and one `max` with the same dimension
    // and tags as a sum (a different key).
    let events: Vec<Event> = (0..3 * LINEAR_INDEX_MAX)
        .map(|i| {
            let mut e = event(if i % 2 == 0 { "a" } else { "b" }, 1, None);
            e.tags = TagSet::from([("tenant".to_owned(), format!("t{}", i % 3))]);
            if i % 5 == 0 {
                e.measure = Measure::Max(1);
            }
            e
        })
        .collect();
    for n in [1, 2, LINEAR_INDEX_MAX, LINEAR_INDEX_MAX + 1, events.len()] {
        let batch = &events[..n];
        let (slots, keys) = index_keys(batch);
        let key = |e: &Event| (e.dimension.clone(), e.tags.clone(), e.measure.aggregation());
        let mut expected: Vec<_> = Vec::new();
        for e in batch {
            if !expected.contains(&key(e)) {
                expected.push(key(e));
            }
        }
        let got: Vec<_> = keys
            .iter()
            .map(|(d, t, a)| (d.to_string(), (*t).clone(), *a))
            .collect();
        assert_eq!(got, expected, "{n} events: keys in first-occurrence order");
        for (e, slot) in batch.iter().zip(&slots) {
            assert_eq!(got[*slot], key(e), "{n} events");
        }
    }
}
