use super::*;
use crate::clock::ManualClock;
use crate::entitlement::test_support::{error_reply, test_keyring, Stub};
use crate::platform::tests::{dead_imds, env_of};

// The stub's Date header: Sun, 22 Nov 2026 10:00:00 GMT.
const STUB_DATE: i64 = 1_795_341_600;

async fn run(
    stub: &Stub,
    env: &(dyn Fn(&str) -> Option<String> + Send + Sync),
    local: i64,
    keyring: &Keyring,
    pricing: Pricing,
) -> DoctorReport {
    let client = stub.client().await;
    let clock: SharedClock = ManualClock::at_unix(local);
    let url = stub.url();
    doctor(DoctorInputs {
        product_code: "prod-abc123",
        dimension: Some("requests"),
        region: Some("us-east-2"),
        endpoint: Some(&url),
        public_key_version: 1,
        pricing,
        configured_platform: None,
        keyring,
        client: &client,
        clock: &clock,
        env,
        imds: dead_imds().await,
        contract: None,
    })
    .await
}

#[test]
fn stub_date_constant_is_right() {
    assert_eq!(
        skew_seconds(
            "Sun, 22 Nov 2026 10:00:00 GMT",
            crate::clock::from_unix_seconds(STUB_DATE)
        ),
        Some(0)
    );
}

#[tokio::test]
async fn healthy_eks_deployment_passes_every_check() {
    let stub = Stub::start(error_reply(400, "DryRunOperation")).await;
    let env = env_of(&[
        ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token"),
        ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/meterd"),
    ]);
    let report = run(
        &stub,
        &env,
        STUB_DATE - 2,
        &test_keyring(1),
        Pricing::HourlyCustom,
    )
    .await;
    assert!(report.is_healthy(), "{report}");
    assert_eq!(report.platform, Platform::Eks);
    assert_eq!(report.clock_skew_seconds, Some(2));
    assert_eq!(
        report.check("dryrun").map(|c| c.status),
        Some(CheckStatus::Ok)
    );
    assert_eq!(
        report.check("keyring").map(|c| c.status),
        Some(CheckStatus::Ok)
    );
    let text = report.render();
    assert!(text.contains("all checks passed"), "{text}");
}

#[tokio::test]
async fn each_problem_comes_with_its_fix() {
    let stub = Stub::start(error_reply(400, "AccessDeniedException")).await;
    let env = env_of(&[("KUBERNETES_SERVICE_HOST", "10.0.0.1")]);
    let report = run(
        &stub,
        &env,
        STUB_DATE + 600,
        &test_keyring(2),
        Pricing::HourlyCustom,
    )
    .await;
    assert!(!report.is_healthy());
    let creds = report.check("credentials").expect("credentials check");
    assert_eq!(creds.status, CheckStatus::Warn);
    assert!(creds.detail.contains("IRSA"));
    let dryrun = report.check("dryrun").expect("dryrun check");
    assert_eq!(dryrun.status, CheckStatus::Fail);
    assert!(dryrun
        .fix
        .as_deref()
        .is_some_and(|f| f.contains("AWSMarketplaceMeteringRegisterUsage")));
    let keyring = report.check("keyring").expect("keyring check");
    assert_eq!(keyring.status, CheckStatus::Fail);
    assert!(keyring
        .fix
        .as_deref()
        .is_some_and(|f| f.contains("keys/v1-<name>.pem")));
    let clock = report.check("clock").expect("clock check");
    assert_eq!(
        clock.status,
        CheckStatus::Fail,
        "10 minutes ahead breaks signing"
    );
    assert!(clock.detail.contains("600 s ahead"), "{}", clock.detail);
    for c in &report.checks {
        if matches!(c.status, CheckStatus::Warn | CheckStatus::Fail) {
            assert!(c.fix.is_some(), "{} has no fix", c.name);
        }
    }
    println!("{report}");
}

#[tokio::test]
async fn hourly_pricing_on_ec2_is_a_problem() {
    let stub = Stub::start(error_reply(400, "DryRunOperation")).await;
    let client = stub.client().await;
    let clock: SharedClock = ManualClock::at_unix(STUB_DATE);
    let env = env_of(&[]);
    let url = stub.url();
    let ring = test_keyring(1);
    let report = doctor(DoctorInputs {
        product_code: "prod-abc123",
        dimension: None,
        region: Some("us-east-2"),
        endpoint: Some(&url),
        public_key_version: 1,
        pricing: Pricing::Hourly,
        configured_platform: Some(Platform::Ec2),
        keyring: &ring,
        client: &client,
        clock: &clock,
        env: &env,
        imds: dead_imds().await,
        contract: None,
    })
    .await;
    let route = report.check("pricing").expect("pricing check");
    assert_eq!(route.status, CheckStatus::Fail);
    assert!(route.detail.contains("hourly on EC2"), "{}", route.detail);
    assert_eq!(
        report.check("dryrun").map(|c| c.status),
        Some(CheckStatus::Skip)
    );
    // Skew still measured with a plain GET on the http:// endpoint.
    assert_eq!(report.clock_skew_seconds, Some(0));
}

#[test]
fn every_pricing_route_is_described_and_only_hourly_on_ec2_fails() {
    for pricing in [Pricing::Hourly, Pricing::Custom, Pricing::HourlyCustom] {
        for platform in [Platform::Ecs, Platform::Eks, Platform::Ec2] {
            let c = pricing_route(pricing, platform);
            let fails = pricing == Pricing::Hourly && platform == Platform::Ec2;
            assert_eq!(
                c.status == CheckStatus::Fail,
                fails,
                "{pricing} on {platform}"
            );
            assert_eq!(
                c.detail.contains("RegisterUsage at start-up"),
                pricing.registers() && platform != Platform::Ec2,
                "{pricing} on {platform}: {}",
                c.detail
            );
            assert_eq!(
                c.detail.contains("MeterUsage every hour"),
                pricing.meters(),
                "{pricing} on {platform}: {}",
                c.detail
            );
        }
    }
}
