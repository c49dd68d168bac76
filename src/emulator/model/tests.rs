use super::*;
use serde_json::json;

fn error_type(r: Result<impl fmt::Debug, ApiError>) -> String {
    r.expect_err("should fail").error_type
}

#[test]
fn target_names_every_operation_under_its_service() {
    for op in Operation::ALL {
        let target = format!("{}{op}", op.api().target_prefix());
        assert_eq!(Operation::from_target(&target), Some(op));
    }
    assert_eq!(Operation::from_target("AWSMPMeteringService.Nope"), None);
    assert_eq!(Operation::from_target("MeterUsage"), None);
    // Each operation under its own service only.
    assert_eq!(Operation::from_target("AWSLicenseManager.MeterUsage"), None);
    assert_eq!(
        Operation::from_target("AWSMPMeteringService.CheckoutLicense"),
        None
    );
}

#[test]
fn tag_pattern_is_the_documented_character_class() {
    for ok in ["a", "Z9", "a b", "!\"#$%&'()*,-./;<=", "k+._:/@"] {
        assert!(tag_text_ok(ok), "{ok:?} should pass");
    }
    for bad in ["", ">", "?", "a~", "é", "a\tb", "[x]"] {
        assert!(!tag_text_ok(bad), "{bad:?} should fail");
    }
}

#[test]
fn meter_usage_reports_every_violation_at_once() {
    let err = parse_meter_usage(&json!({"ProductCode": "bad code!", "UsageQuantity": -1}))
        .expect_err("invalid");
    assert_eq!(err.error_type, "ValidationException");
    assert!(
        err.message.starts_with("4 validation errors detected: "),
        "{}",
        err.message
    );
    assert!(err.message.contains("Value 'bad code!' at 'productCode'"));
    assert!(err.message.contains(
        "Value null at 'timestamp' failed to satisfy constraint: Member must not be null"
    ));
    assert!(err.message.contains("Value null at 'usageDimension'"));
    assert!(err.message.contains("Value '-1' at 'usageQuantity'"));
}

#[test]
fn wrong_json_types_are_serialization_errors() {
    assert_eq!(
        error_type(parse_meter_usage(&json!({"ProductCode": 5}))),
        "SerializationException"
    );
    assert_eq!(
        error_type(parse_meter_usage(
            &json!({"ProductCode": "p", "Timestamp": "2024-01-01", "UsageDimension": "d"})
        )),
        "SerializationException"
    );
    assert_eq!(
        error_type(parse_resolve_customer(&json!([]))),
        "SerializationException"
    );
}

#[test]
fn client_token_is_excluded_from_the_meaning() {
    let a = parse_meter_usage(
        &json!({"ProductCode": "p", "Timestamp": 1, "UsageDimension": "d", "ClientToken": "a"}),
    )
    .expect("valid");
    let b = parse_meter_usage(
        &json!({"ProductCode": "p", "Timestamp": 1, "UsageDimension": "d", "ClientToken": "b"}),
    )
    .expect("valid");
    assert_eq!(a.meaning(), b.meaning());
}

#[test]
fn decimal_quantities_follow_the_model_pattern() {
    for (text, micros) in [
        ("0", Some(0)),
        ("17", Some(17_000_000)),
        ("17.42", Some(17_420_000)),
        ("17.000001", Some(17_000_001)),
        ("9999999999.999999", Some(9_999_999_999_999_999)),
        ("017", None),
        ("17.", None),
        (".5", None),
        ("17.1234567", None),
        ("-1", None),
        ("1e3", None),
        ("99999999999", None),
        ("", None),
    ] {
        assert_eq!(decimal_micros(text), micros, "{text:?}");
    }
    assert_eq!(decimal_text(17_420_000), "17.42");
    assert_eq!(decimal_text(17_000_000), "17");
    assert_eq!(decimal_text(1), "0.000001");
}

/// The same report written another way means the same; another value does not.
#[test]
fn meaning_follows_defaults_and_sets_not_bytes() {
    let meaning = |body: Value| parse_meter_usage(&body).expect("valid").meaning();
    let base = json!({"ProductCode": "p", "Timestamp": 1, "UsageDimension": "d"});
    let with = |extra: Value| {
        let mut b = base.clone();
        if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        b
    };
    assert_eq!(
        meaning(base.clone()),
        meaning(with(json!({"UsageQuantity": 0})))
    );
    assert_eq!(
        meaning(base.clone()),
        meaning(with(json!({"DryRun": false})))
    );
    assert_eq!(
        meaning(base.clone()),
        meaning(with(json!({"Timestamp": 1.0})))
    );
    let a1 = json!({"Tags": [{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}], "AllocatedUsageQuantity": 1});
    let a1_swapped = json!({"AllocatedUsageQuantity": 1, "Tags": [{"Key": "b", "Value": "2"}, {"Key": "a", "Value": "1"}]});
    let a2 = json!({"Tags": [{"Key": "a", "Value": "3"}], "AllocatedUsageQuantity": 2});
    assert_eq!(
        meaning(with(
            json!({"UsageQuantity": 3, "UsageAllocations": [a1.clone(), a2.clone()]})
        )),
        meaning(with(
            json!({"UsageQuantity": 3, "UsageAllocations": [a2.clone(), a1_swapped]})
        )),
    );
    assert_ne!(
        meaning(base.clone()),
        meaning(with(json!({"UsageQuantity": 1})))
    );
    assert_ne!(
        meaning(base.clone()),
        meaning(with(json!({"DryRun": true})))
    );
    assert_ne!(
        meaning(with(
            json!({"UsageQuantity": 3, "UsageAllocations": [a1.clone(), a2]})
        )),
        meaning(with(
            json!({"UsageQuantity": 3, "UsageAllocations": [a1, json!({"Tags": [{"Key": "a", "Value": "4"}], "AllocatedUsageQuantity": 2})]})
        )),
    );
}
