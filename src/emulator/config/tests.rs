use super::*;

#[test]
fn demo_is_valid() {
    EmulatorConfig::demo()
        .validate()
        .expect("demo config is valid");
}

#[test]
fn unknown_fields_are_rejected() {
    let err = EmulatorConfig::from_toml_str("regoin = \"us-east-1\"").expect_err("typo");
    assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = r#"
        region = "US EAST"
        max_usage_allocations = 3000
        [[products]]
        code = "bad code"
        dimensions = []
        [[customers]]
        identifier = "c"
        aws_account_id = "12ab"
        product_code = "nope"
        [faults.all]
        throttle_rate = 1.5
    "#;
    let err = EmulatorConfig::from_toml_str(text).expect_err("invalid");
    let err = err.downcast::<ConfigError>().expect("a ConfigError");
    assert_eq!(err.problems.len(), 8, "{:#?}", err.problems);
}

#[test]
fn a_product_has_at_most_24_dimensions() {
    let mut config = EmulatorConfig::demo();
    config.products[0].dimensions = (0..24).map(|i| format!("d{i}")).collect();
    assert!(config.validate().is_ok());
    config.products[0].dimensions.push("d24".to_owned());
    assert!(config.validate().is_err());
}

#[test]
fn full_example_parses() {
    let text = r#"
        region = "eu-west-1"
        seed = 7
        timestamp_future_skew = "1m"
        max_usage_allocations = 2500
        signature_max_skew = "15m"
        disabled_operations = ["BatchMeterUsage"]
        [credentials]
        AKIDEXAMPLE = "secret"
        [[products]]
        code = "prod-x"
        dimensions = ["a"]
        entitlement = "platform_not_supported"
        [[keys]]
        version = 2
        expired_at = "2024-01-01T00:00:00Z"
        [[customers]]
        identifier = "c1"
        aws_account_id = "123456789012"
        product_code = "prod-x"
        [[registration_tokens]]
        token = "t1"
        customer_identifier = "c1"
        expires_at = "2030-01-01T00:00:00Z"
        [faults.all]
        throttle_rate = 0.1
        latency = "250ms"
        [faults.operations.MeterUsage]
        error_rate = 0.5
        down_for = "30s"
    "#;
    let config = EmulatorConfig::from_toml_str(text).expect("valid");
    assert_eq!(
        config.products[0].entitlement,
        Entitlement::PlatformNotSupported
    );
    assert_eq!(config.faults.all.latency, Some(Duration::from_millis(250)));
    assert_eq!(config.disabled_operations, vec![Operation::BatchMeterUsage]);
}

#[test]
fn durations_are_bounded_with_the_field_named() {
    let text = r#"
        timestamp_future_skew = "500000000000years"
        timestamp_max_age = "367days"
        signature_max_skew = "366days"
        [faults.all]
        down_for = "500000000000years"
        [faults.operations.MeterUsage]
        latency = "8days"
    "#;
    let err = EmulatorConfig::from_toml_str(text).expect_err("too long");
    let err = err.downcast::<ConfigError>().expect("a ConfigError");
    let fields: Vec<&str> = err
        .problems
        .iter()
        .filter_map(|p| p.split(':').next())
        .collect();
    assert_eq!(
        fields,
        [
            "timestamp_future_skew",
            "timestamp_max_age",
            "faults.all.down_for",
            "faults.operations.MeterUsage.latency"
        ],
        "{:#?}",
        err.problems
    );
}
