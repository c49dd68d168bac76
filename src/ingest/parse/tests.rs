use super::*;

fn vocab() -> Vocabulary {
    Vocabulary {
        dimensions: ["requests", "gigabytes"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        tag_keys: ["tenant"].iter().map(|s| s.to_string()).collect(),
        ..Vocabulary::default()
    }
}

fn reject(body: &str) -> Rejection {
    parse_usage(body.as_bytes(), &vocab()).expect_err(body)
}

#[test]
fn single_event_and_batch_parse() {
    let one = parse_usage(
        br#"{"dimension":"requests","quantity":3,"tags":{"tenant":"acme"},"id":"evt-1"}"#,
        &vocab(),
    )
    .expect("valid");
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].measure, Measure::Sum(3));
    assert_eq!(one[0].tags.get("tenant").map(String::as_str), Some("acme"));
    let batch = parse_usage(
        br#"{"events":[{"dimension":"requests","quantity":0},{"dimension":"gigabytes","quantity":2147483647}]}"#,
        &vocab(),
    )
    .expect("valid");
    assert_eq!(batch.len(), 2);
}

#[test]
fn each_bad_input_is_named() {
    let cases = [
        ("{not json", "malformed_json", "key must be a string"),
        (
            r#"{"dimension":"nope","quantity":1}"#,
            "unknown_dimension",
            "unknown dimension",
        ),
        (
            r#"{"dimension":"requests","quantity":-1}"#,
            "bad_quantity",
            "negative",
        ),
        (
            r#"{"dimension":"requests","quantity":1.5}"#,
            "bad_quantity",
            "whole number",
        ),
        (
            r#"{"dimension":"requests","quantity":2147483648}"#,
            "bad_quantity",
            "larger than",
        ),
        (r#"{"dimension":"requests"}"#, "bad_quantity", "required"),
        (
            r#"{"dimension":"requests","quantity":1,"tags":{"colour":"red"}}"#,
            "bad_tags",
            "not in metering.tag_keys",
        ),
        (
            r#"{"dimension":"requests","quantity":1,"tags":{"tenant":"a>b"}}"#,
            "bad_tags",
            "contains",
        ),
        (
            r#"{"dimension":"requests","quantity":1,"tags":{"tenant":""}}"#,
            "bad_tags",
            "empty",
        ),
        (
            r#"{"dimension":"requests","quantity":1,"tags":{"a":"1","b":"1","c":"1","d":"1","e":"1","f":"1"}}"#,
            "bad_tags",
            "at most 5",
        ),
        (r#"{"events":[]}"#, "batch_size", "1 to 10000 events, got 0"),
        (
            r#"{"dimension":"requests","quantity":1,"tags":{"tenant":"a","tenant":"b"}}"#,
            "malformed_json",
            "tag key \"tenant\" is given twice",
        ),
        (
            r#"{"events":[{"dimension":"requests","quantity":1,"tags":{"tenant":"a","tenant":"a"}}]}"#,
            "malformed_json",
            "given twice",
        ),
        (
            r#"{"dimension":"requests","quantity":1,"quantity":2}"#,
            "malformed_json",
            "duplicate field",
        ),
        (
            r#"{"dimension":"requests","quantity":1,"extra":true}"#,
            "malformed_json",
            "extra",
        ),
    ];
    for (body, reason, needle) in cases {
        let r = reject(body);
        assert_eq!(r.reason, reason, "{body}: {r:?}");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        let text = format!("{} {:?}", r.error, r.details);
        assert!(text.contains(needle), "{body}: {text}");
    }
}

fn agg_vocab() -> Vocabulary {
    let names = ["requests", "peak", "hosts", "users", "pods"];
    Vocabulary {
        dimensions: names.iter().map(|s| s.to_string()).collect(),
        tag_keys: ["tenant"].iter().map(|s| s.to_string()).collect(),
        aggregation: [
            ("peak", Aggregation::Max),
            ("hosts", Aggregation::Last),
            ("users", Aggregation::Unique),
        ]
        .map(|(d, a)| (d.to_owned(), a))
        .into(),
        heartbeat: ["pods".to_owned()].into(),
    }
}

#[test]
fn each_aggregation_gets_its_measure_and_distinct_is_only_for_unique() {
    let events = parse_usage(
        br#"{"events":[
            {"dimension":"requests","quantity":3},
            {"dimension":"peak","quantity":9},
            {"dimension":"hosts","quantity":4},
            {"dimension":"users","distinct":"alice","tags":{"tenant":"a"}},
            {"dimension":"users","distinct":"bob","quantity":1,"id":"e1"}]}"#,
        &agg_vocab(),
    )
    .expect("valid");
    let measures: Vec<&Measure> = events.iter().map(|e| &e.measure).collect();
    assert_eq!(
        measures,
        [
            &Measure::Sum(3),
            &Measure::Max(9),
            &Measure::Last(4),
            &Measure::Unique("alice".into()),
            &Measure::Unique("bob".into())
        ]
    );
    let single = parse_usage(br#"{"dimension":"users","distinct":"carol"}"#, &agg_vocab())
        .expect("a single unique event");
    assert_eq!(single[0].measure, Measure::Unique("carol".into()));
    let long = "x".repeat(DISTINCT_MAX_CHARS + 1);
    let ok = "é".repeat(DISTINCT_MAX_CHARS);
    parse_usage(
        format!(r#"{{"dimension":"users","distinct":"{ok}"}}"#).as_bytes(),
        &agg_vocab(),
    )
    .expect("256 characters");
    let cases = [
        (
            r#"{"dimension":"users"}"#.to_owned(),
            "distinct",
            "distinct is required",
        ),
        (
            r#"{"dimension":"users","quantity":1}"#.to_owned(),
            "distinct",
            "distinct is required",
        ),
        (
            r#"{"dimension":"users","distinct":""}"#.to_owned(),
            "distinct",
            "1 to 256 characters, got 0",
        ),
        (
            format!(r#"{{"dimension":"users","distinct":"{long}"}}"#),
            "distinct",
            "got 257",
        ),
        (
            r#"{"dimension":"users","distinct":"a","quantity":2}"#.to_owned(),
            "quantity",
            "must be absent or 1",
        ),
        (
            r#"{"dimension":"users","distinct":"a","quantity":0}"#.to_owned(),
            "quantity",
            "must be absent or 1",
        ),
        (
            r#"{"dimension":"requests","quantity":1,"distinct":"a"}"#.to_owned(),
            "distinct",
            "only for unique dimensions; \"requests\" aggregates by sum",
        ),
        (
            r#"{"dimension":"peak","quantity":1,"distinct":"a"}"#.to_owned(),
            "distinct",
            "aggregates by max",
        ),
        (r#"{"dimension":"peak"}"#.to_owned(), "quantity", "required"),
        (
            r#"{"dimension":"hosts","quantity":-1}"#.to_owned(),
            "quantity",
            "negative",
        ),
        (
            r#"{"dimension":"pods","quantity":1}"#.to_owned(),
            "dimension",
            "\"pods\" is recorded by meterd itself",
        ),
    ];
    for (body, field, needle) in cases {
        let r = parse_usage(body.as_bytes(), &agg_vocab()).expect_err(&body);
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.details[0].field, field, "{body}: {r:?}");
        assert!(r.details[0].problem.contains(needle), "{body}: {r:?}");
    }
}

#[test]
fn one_bad_event_rejects_the_batch_and_names_its_index() {
    let r = reject(
        r#"{"events":[{"dimension":"requests","quantity":1},{"dimension":"requests","quantity":-4},{"dimension":"x","quantity":1}]}"#,
    );
    let indexes: Vec<usize> = r.details.iter().map(|d| d.index).collect();
    assert_eq!(indexes, vec![1, 2]);
}
