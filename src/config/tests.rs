use super::*;

const MINIMAL: &str = r#"
product_code = "prod-1234abcd"
pricing = "custom"
[metering]
dimensions = ["requests", "gigabytes"]
"#;

#[test]
fn minimal_config_takes_defaults() {
    let c = Config::from_toml_str(MINIMAL).expect("valid");
    assert!(c.metering.report_zero);
    assert_eq!(c.metering.max_allocations, 500);
    assert_eq!(c.server.listen, "127.0.0.1:8377");
    assert_eq!(c.server.grace_period, Duration::from_secs(25));
    assert_eq!(c.pricing, Pricing::Custom);
}

#[test]
fn unknown_keys_are_errors() {
    let err = Config::from_toml_str(&format!("{MINIMAL}report_zeroo = true\n"))
        .expect_err("typo must fail");
    assert!(err.to_string().contains("report_zeroo"), "{err}");
    let err =
        Config::from_toml_str(&MINIMAL.replace("[metering]", "[metering]\nreport_zro = false"))
            .expect_err("typo must fail");
    assert!(err.to_string().contains("report_zro"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
product_code = "bad code!"
pricing = "custom"
[metering]
dimensions = []
tag_keys = ["a","b","c","d","e","f"]
max_allocations = 0
[server]
listen = "nowhere"
"#;
    let err = Config::from_toml_str(text).expect_err("invalid");
    assert_eq!(err.problems.len(), 5, "{err}");
}

#[test]
fn a_back_off_the_sender_would_refuse_is_a_config_error() {
    for (sending, named) in [
        ("max_backoff = \"2h\"", "longer than the 1 h"),
        ("initial_backoff = \"0s\"", "greater than zero"),
        (
            "initial_backoff = \"10m\"\nmax_backoff = \"1m\"",
            "longer than its cap",
        ),
    ] {
        let err =
            Config::from_toml_str(&format!("{MINIMAL}[sending]\n{sending}\n")).expect_err(sending);
        assert!(err.to_string().contains(named), "{sending}: {err}");
    }
    let ok = Config::from_toml_str(&format!("{MINIMAL}[sending]\nmax_backoff = \"1h\"\n"))
        .expect("1h is allowed");
    assert_eq!(ok.sending.max_backoff, Duration::from_secs(3600));
}

#[test]
fn health_thresholds_never_fail_before_two_hours_and_keep_their_order() {
    for (health, named) in [
        (
            "failing_after = \"1h59m\"",
            "health.failing_after must be 2h to 5h",
        ),
        (
            "failing_after = \"6h\"",
            "health.failing_after must be 2h to 5h",
        ),
        (
            "warn_after = \"30s\"",
            "health.warn_after must be at least 1m",
        ),
        (
            "degraded_after = \"4h30m\"",
            "health.warn_after, health.degraded_after and health.failing_after must not decrease",
        ),
        (
            "warn_after = \"3h\"\ndegraded_after = \"2h\"",
            "health.warn_after, health.degraded_after and health.failing_after must not decrease",
        ),
    ] {
        let err =
            Config::from_toml_str(&format!("{MINIMAL}[health]\n{health}\n")).expect_err(health);
        assert!(err.to_string().contains(named), "{health}: {err}");
    }
    let ok = Config::from_toml_str(&format!(
        "{MINIMAL}[health]\nwarn_after = \"2h\"\ndegraded_after = \"2h\"\nfailing_after = \"2h\"\n"
    ))
    .expect("2h for all is allowed");
    assert_eq!(ok.health.failing_after, MIN_FAILING_AFTER);
    let d = Config::from_toml_str(MINIMAL).expect("valid").health;
    assert_eq!(
        (d.warn_after, d.degraded_after, d.failing_after),
        (
            Duration::from_secs(1800),
            Duration::from_secs(7200),
            Duration::from_secs(14400)
        )
    );
}

#[test]
fn every_number_duration_and_url_is_bounded() {
    let cases = [
        (
            "[server]\nmax_connections = 2305843009213693952",
            "server.max_connections must be 1 to 65536",
        ),
        (
            "[server]\nmax_connections = 0",
            "server.max_connections must be 1 to 65536",
        ),
        (
            "[registration]\nstartup_budget = \"500000000000years\"",
            "registration.startup_budget must be 0s to 1day",
        ),
        (
            "[server]\ngrace_period = \"500000000000years\"",
            "server.grace_period must be 1s to 1h",
        ),
        (
            "[server]\ngrace_period = \"0s\"",
            "server.grace_period must be 1s to 1h",
        ),
        (
            "[sending]\ncall_timeout = \"0s\"",
            "sending.call_timeout must be 1s to 5m",
        ),
        (
            "[sending]\nspread = \"51m\"",
            "sending.spread must be at most 50m",
        ),
        (
            "[sending]\nmax_calls_per_second = 0",
            "sending.max_calls_per_second must be 1 to 1000",
        ),
        (
            "[sending]\nmax_calls_per_second = 1001",
            "sending.max_calls_per_second must be 1 to 1000",
        ),
        (
            "[sending]\ncall_timeout = \"1h\"",
            "sending.call_timeout must be 1s to 5m",
        ),
        (
            "[aws]\nendpoint_url = \"file:///etc/passwd\"",
            "scheme must be http or https, not file",
        ),
        (
            "[aws]\nendpoint_url = \"::::not a url\"",
            "aws.endpoint_url \"::::not a url\": not a URL with a scheme",
        ),
        (
            "[aws]\nendpoint_url = \"localhost:4566\"",
            "aws.endpoint_url",
        ),
        ("[aws]\nendpoint_url = \"http://\"", "aws.endpoint_url"),
    ];
    for (section, named) in cases {
        let err = Config::from_toml_str(&format!("{MINIMAL}{section}\n")).expect_err(section);
        assert!(err.to_string().contains(named), "{section}: {err}");
    }
    for ok in [
        "[aws]\nendpoint_url = \"http://127.0.0.1:4566\"",
        "[aws]\nendpoint_url = \"https://metering.marketplace.us-east-1.amazonaws.com\"",
        "[server]\nmax_connections = 65536\ngrace_period = \"1h\"",
        "[registration]\nstartup_budget = \"0s\"",
    ] {
        Config::from_toml_str(&format!("{MINIMAL}{ok}\n")).expect(ok);
    }
    // All at once.
    let err = Config::from_toml_str(&format!(
        "{MINIMAL}[server]\nmax_connections = 0\ngrace_period = \"0s\"\n[sending]\ncall_timeout = \"0s\"\n[aws]\nendpoint_url = \"file:///x\"\n"
    ))
    .expect_err("four problems");
    assert_eq!(err.problems.len(), 4, "{err}");
}

#[test]
fn a_network_listen_needs_a_token_or_an_explicit_opt_in() {
    let open = format!("{MINIMAL}[server]\nlisten = \"0.0.0.0:8377\"\n");
    let err = Config::from_toml_str(&open).expect_err("no token on the network");
    assert!(
        err.to_string()
            .contains("insecure_allow_unauthenticated_network"),
        "{err}"
    );
    let err = Config::from_toml_str(&format!("{MINIMAL}[server]\nlisten = \"[::]:8377\"\n"))
        .expect_err("no token on the network");
    assert!(
        err.to_string().contains("reachable from the network"),
        "{err}"
    );
    Config::from_toml_str(&format!(
        "{open}insecure_allow_unauthenticated_network = true\n"
    ))
    .expect("explicit opt-in");
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write");
    let with_token = format!(
        "{open}auth_token_file = {:?}\n",
        token.display().to_string()
    );
    let c = Config::from_toml_str(&with_token).expect("a token makes it safe");
    assert_eq!(c.auth_token().expect("readable").as_deref(), Some("s3cret"));
    Config::from_toml_str(&format!("{MINIMAL}[server]\nlisten = \"127.0.0.2:8377\"\n"))
        .expect("any loopback address is fine");
}

#[test]
fn the_token_file_is_capped_and_must_be_a_regular_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big");
    std::fs::write(&big, "x".repeat(MAX_TOKEN_FILE_BYTES as usize + 1)).expect("write");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "  \n").expect("write");
    for (path, named) in [
        (big.display().to_string(), "larger than 4096 bytes"),
        (empty.display().to_string(), "empty"),
        ("/dev/zero".to_owned(), "not a regular file"),
        (dir.path().display().to_string(), "not a regular file"),
    ] {
        let text = format!("{MINIMAL}[server]\nauth_token_file = {path:?}\n");
        let err = Config::from_toml_str(&text).expect_err(&path);
        assert!(err.to_string().contains(named), "{path}: {err}");
    }
}

#[test]
fn pricing_decides_the_dimensions_and_the_platforms() {
    let hourly = "product_code = \"prod-1234abcd\"\npricing = \"hourly\"\n";
    let c = Config::from_toml_str(hourly).expect("hourly needs no [metering]");
    assert!(c.metering.dimensions.is_empty());
    assert!(c.pricing.registers() && !c.pricing.meters());
    Config::from_toml_str(&format!("{hourly}[metering]\ndimensions = []\n"))
        .expect("an empty list is the same");
    let err = Config::from_toml_str(&format!("{hourly}[metering]\ndimensions = [\"pods\"]\n"))
        .expect_err("hourly with dimensions");
    assert!(
        err.to_string().contains("has no custom dimensions"),
        "{err}"
    );
    let err =
        Config::from_toml_str(&format!("{hourly}platform = \"ec2\"\n")).expect_err("hourly on EC2");
    assert!(
        err.to_string().contains("cannot run on platform = \"ec2\""),
        "{err}"
    );
    for pricing in ["custom", "hourly+custom"] {
        let text = format!("product_code = \"prod-1234abcd\"\npricing = \"{pricing}\"\n");
        let err = Config::from_toml_str(&text).expect_err("no dimensions");
        assert!(
            err.to_string()
                .contains("needs metering.dimensions to list 1 to 24"),
            "{err}"
        );
        let c = Config::from_toml_str(&format!("{text}[metering]\ndimensions = [\"users\"]\n"))
            .expect("valid");
        assert!(c.pricing.meters());
    }
    let err = Config::from_toml_str("product_code = \"prod-1234abcd\"\n").expect_err("no pricing");
    assert!(err.to_string().contains("pricing"), "{err}");
    let err = Config::from_toml_str("product_code = \"prod-1234abcd\"\npricing = \"flat\"\n")
        .expect_err("unknown pricing");
    assert!(err.to_string().contains("hourly+custom"), "{err}");
}

#[test]
fn registration_enabled_says_what_to_write_instead() {
    for (enabled, instead) in [
        ("true", "pricing = \"hourly+custom\""),
        ("false", "pricing = \"custom\""),
    ] {
        let err = Config::from_toml_str(&format!("{MINIMAL}[registration]\nenabled = {enabled}\n"))
            .expect_err("enabled is gone");
        let text = err.to_string();
        assert!(
            text.contains("registration.enabled is replaced") && text.contains(instead),
            "{text}"
        );
    }
}

#[test]
fn aggregation_and_heartbeat_are_checked_with_every_other_problem() {
    let text = r#"
product_code = "prod-1234abcd"
pricing = "custom"
[metering]
dimensions = ["requests", "users", "peak", "hosts", "pods"]
aggregation = { users = "unique", peak = "max", hosts = "last", requests = "sum" }
heartbeat = { pods = 1 }
"#;
    let c = Config::from_toml_str(text).expect("valid");
    let a = c.metering.aggregations();
    assert_eq!(a["requests"], Aggregation::Sum);
    assert_eq!(a["users"], Aggregation::Unique);
    assert_eq!(a["peak"], Aggregation::Max);
    assert_eq!(a["hosts"], Aggregation::Last);
    assert_eq!(a["pods"], Aggregation::Sum, "unlisted dimensions sum");
    assert_eq!(c.metering.heartbeat["pods"], 1);

    let bad = r#"
product_code = "bad code!"
pricing = "custom"
[metering]
dimensions = ["requests", "users"]
aggregation = { nope = "max", users = "median", requests = "max" }
heartbeat = { requests = 0, ghost = 1 }
"#;
    let err = Config::from_toml_str(bad).expect_err("invalid");
    let text = err.to_string();
    for needed in [
        "product_code",
        "metering.aggregation: \"nope\" is not one of metering.dimensions",
        "metering.aggregation.users: unknown aggregation \"median\"",
        "metering.heartbeat.requests must be 1 to 2147483647",
        "metering.heartbeat: \"ghost\" is not one of metering.dimensions",
        "\"requests\" is recorded by meterd itself",
    ] {
        assert!(text.contains(needed), "{needed}: {text}");
    }
    assert_eq!(err.problems.len(), 6, "{err}");
}

#[test]
fn durations_are_human() {
    let c = Config::from_toml_str(&format!("{MINIMAL}[server]\ngrace_period = \"40s\"\n"))
        .expect("valid");
    assert_eq!(c.server.grace_period, Duration::from_secs(40));
}
