//! `POST /v1/usage` bodies: parsing and validation never panic, and whatever is accepted is
//! within the documented bounds.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meterd::ingest::{parse_usage, Vocabulary, MAX_BATCH_EVENTS, MAX_ID_CHARS};
use meterd::model::{Aggregation, Measure, DISTINCT_MAX_CHARS};

fn vocabulary() -> &'static Vocabulary {
    static V: OnceLock<Vocabulary> = OnceLock::new();
    V.get_or_init(|| Vocabulary {
        dimensions: ["requests", "gigabytes", "peak", "hosts", "users", "pods"]
            .map(String::from)
            .into(),
        tag_keys: ["tenant", "region"].map(String::from).into(),
        aggregation: [
            ("peak", Aggregation::Max),
            ("hosts", Aggregation::Last),
            ("users", Aggregation::Unique),
        ]
        .map(|(d, a)| (d.to_owned(), a))
        .into(),
        heartbeat: ["pods".to_owned()].into(),
    })
}

fuzz_target!(|body: &[u8]| {
    let vocabulary = vocabulary();
    match parse_usage(body, vocabulary) {
        Ok(events) => {
            assert!(!events.is_empty() && events.len() <= MAX_BATCH_EVENTS);
            for e in &events {
                assert!(vocabulary.dimensions.contains(&e.dimension));
                assert!(!vocabulary.heartbeat.contains(&e.dimension));
                assert_eq!(
                    e.measure.aggregation(),
                    vocabulary.aggregation_of(&e.dimension)
                );
                match &e.measure {
                    Measure::Sum(q) | Measure::Max(q) | Measure::Last(q) => {
                        assert!((0..=i64::from(i32::MAX)).contains(q))
                    }
                    Measure::Unique(v) => {
                        assert!((1..=DISTINCT_MAX_CHARS).contains(&v.chars().count()))
                    }
                }
                assert!(e.tags.len() <= 5);
                assert!(e.tags.keys().all(|k| vocabulary.tag_keys.contains(k)));
                assert!(e.id.as_ref().is_none_or(|id| {
                    let n = id.chars().count();
                    (1..=MAX_ID_CHARS).contains(&n)
                }));
            }
        }
        Err(rejection) => {
            assert!(rejection.status.is_client_error());
            assert!(!rejection.error.is_empty());
        }
    }
});
