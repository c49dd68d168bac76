//! Entitlement at start-up against the in-process emulator, on loopback, with a ManualClock
//! shared by the agent side and the emulator.
#![cfg(feature = "emulator")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meterd::aws::{build_client, AwsSettings};
use meterd::clock::{from_unix_seconds, Clock, ManualClock, SharedClock};
use meterd::emulator::{self, EmulatorConfig, EmulatorHandle, FaultProfile, FaultRule};
use meterd::entitlement::{
    dry_run_check_with, register_observed, DryRunMode, DryRunPolicy, Entitlement, EntitlementError,
    EntitlementState, Keyring, RegistrationSettings, RetryEvent, VerifyError,
};
use meterd::exit::Exit;
use meterd::platform::Platform;

use meterd_test_support::{drive_retries, Announce, H0, PRODUCT};

struct Rig {
    emu: EmulatorHandle,
    clock: Arc<ManualClock>,
}

async fn rig(config: EmulatorConfig) -> Rig {
    let clock = ManualClock::at_unix(H0);
    let shared: SharedClock = clock.clone();
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("loopback address");
    let emu = emulator::start(config, shared, addr)
        .await
        .expect("emulator starts");
    Rig { emu, clock }
}

impl Rig {
    async fn client(&self, region: &str, access_key: &str) -> aws_sdk_marketplacemetering::Client {
        build_client(&AwsSettings {
            region: Some(region.to_owned()),
            endpoint_url: Some(self.emu.endpoint_url()),
            static_credentials: Some((access_key.to_owned(), "secret".to_owned())),
            operation_timeout: Some(Duration::from_secs(10)),
        })
        .await
    }

    /// A keyring trusting the emulator's key for `version` (and the bundled keys).
    fn keyring(&self, version: u32) -> Keyring {
        let mut ring = Keyring::bundled().expect("bundled keys");
        let pem = self.emu.public_key_pem(1).expect("emulator key v1");
        ring.add_pem(version, "emulator:v1", &pem)
            .expect("emulator key parses");
        ring
    }

    /// Registers in a task, moving the shared clock to each announced retry time and calling
    /// `on_retry` with the number of retries so far.
    async fn register(
        &self,
        client: aws_sdk_marketplacemetering::Client,
        settings: RegistrationSettings,
        keyring: Keyring,
        mut on_retry: impl FnMut(usize, &EmulatorHandle),
    ) -> (Result<Entitlement, EntitlementError>, usize) {
        let shared: SharedClock = self.clock.clone();
        drive_retries(
            &self.clock,
            |announce| async move {
                let observer = move |e: &RetryEvent| announce(e.next_attempt_at);
                register_observed(&client, &settings, &keyring, &shared, &observer).await
            },
            |retries| on_retry(retries, &self.emu),
        )
        .await
    }
}

fn settings(version: u32) -> RegistrationSettings {
    RegistrationSettings::new(PRODUCT, version, Platform::Ecs)
}

#[tokio::test]
async fn entitled_path_against_the_emulator() {
    let rig = rig(EmulatorConfig::demo()).await;
    let client = rig.client("us-east-1", "AKIDENTITLED").await;
    let (result, retries) = rig
        .register(client, settings(1), rig.keyring(1), |_, _| {})
        .await;
    let ent = result.expect("entitled");
    assert_eq!(retries, 0);
    assert_eq!(ent.state, EntitlementState::Entitled);
    assert_eq!(ent.claims.product_code, PRODUCT);
    assert_eq!(ent.claims.key_source, "emulator:v1");
    assert_eq!(ent.registered_at, H0);
    assert!(!ent.key_rotation_due);
    let status = serde_json::to_value(&ent).expect("serializes for /v1/status");
    assert_eq!(status["state"], "entitled");
    assert_eq!(status["key_fingerprint"], ent.key_fingerprint.as_str());
}

#[tokio::test]
async fn the_shipped_keyring_does_not_trust_the_emulator() {
    // The emulator's demo key is public; a binary must never accept its tokens by default.
    let rig = rig(EmulatorConfig::demo()).await;
    let client = rig.client("us-east-1", "AKIDBUNDLED").await;
    let bundled = Keyring::bundled().expect("bundled keys");
    let (result, _) = rig.register(client, settings(1), bundled, |_, _| {}).await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            EntitlementError::Verification(VerifyError::BadSignature { .. })
        ),
        "{err}"
    );
    assert_eq!(err.exit_code(), Exit::VerificationFailed);
}

#[tokio::test]
async fn each_fatal_class_exits_with_its_code_against_the_emulator() {
    use meterd::emulator::Entitlement as Emu;
    for (state, exit) in [
        (Emu::NotEntitled, Exit::NotEntitled),
        (Emu::PlatformNotSupported, Exit::Configuration),
        (Emu::WrongRegion, Exit::Configuration),
    ] {
        let rig = rig(EmulatorConfig::demo()).await;
        rig.emu
            .set_entitlement(PRODUCT, state)
            .expect("set entitlement");
        let client = rig.client("us-east-1", "AKIDFATAL").await;
        let (result, retries) = rig
            .register(client, settings(1), rig.keyring(1), |_, _| {})
            .await;
        let err = result.unwrap_err();
        assert_eq!(err.exit_code(), exit, "{state:?}: {err}");
        assert_eq!(retries, 0, "{state:?} is not retried");
    }

    // A client in another region than the emulator's.
    let rig = rig(EmulatorConfig::demo()).await;
    let client = rig.client("eu-west-1", "AKIDREGION").await;
    let (result, _) = rig
        .register(client, settings(1), rig.keyring(1), |_, _| {})
        .await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, EntitlementError::InvalidRegion { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("eu-west-1"));

    // A product code the service does not know.
    let client = rig.client("us-east-1", "AKIDPRODUCT").await;
    let mut s = settings(1);
    s.product_code = "prod-unknown".to_owned();
    let (result, _) = rig.register(client, s, rig.keyring(1), |_, _| {}).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, EntitlementError::InvalidProductCode { .. }),
        "{err}"
    );
    assert_eq!(err.exit_code(), Exit::Configuration);

    // A key version the service does not have (the keyring trusts one, so the call is made).
    let client = rig.client("us-east-1", "AKIDVERSION").await;
    let (result, _) = rig
        .register(client, settings(9), rig.keyring(9), |_, _| {})
        .await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            EntitlementError::InvalidPublicKeyVersion { version: 9, .. }
        ),
        "{err}"
    );
    assert_eq!(err.exit_code(), Exit::Configuration);
}

#[tokio::test]
async fn throttling_followed_by_success_ends_entitled() {
    let rig = rig(EmulatorConfig::demo()).await;
    rig.emu.set_faults(FaultProfile::every(FaultRule {
        throttle_rate: 1.0,
        ..FaultRule::default()
    }));
    let client = rig.client("us-east-1", "AKIDTHROTTLE").await;
    let (result, retries) = rig
        .register(client, settings(1), rig.keyring(1), |n, emu| {
            if n == 3 {
                emu.set_faults(FaultProfile::default());
            }
        })
        .await;
    let ent = result.expect("entitled after throttling");
    assert_eq!(retries, 3);
    assert_eq!(ent.attempts, 4);
    assert!(ent.registered_at > H0);
}

#[tokio::test]
async fn a_service_that_stays_down_exhausts_the_budget() {
    let rig = rig(EmulatorConfig::demo()).await;
    rig.emu.set_faults(FaultProfile::every(FaultRule {
        error_rate: 1.0,
        ..FaultRule::default()
    }));
    let client = rig.client("us-east-1", "AKIDDOWN").await;
    let (result, retries) = rig
        .register(client, settings(1), rig.keyring(1), |_, _| {})
        .await;
    let err = result.unwrap_err();
    assert_eq!(err.exit_code(), Exit::TransientBudget, "{err}");
    assert!(retries >= 5);
    let waited = rig
        .clock
        .now()
        .duration_since(from_unix_seconds(H0))
        .expect("forward");
    assert!(waited <= Duration::from_secs(300), "{waited:?}");
}

#[tokio::test]
async fn an_expired_key_version_is_accepted_with_a_rotation_flag() {
    let mut config = EmulatorConfig::demo();
    config.keys[0].expired_at = Some(from_unix_seconds(H0 - 86_400));
    let rig = rig(config).await;
    let client = rig.client("us-east-1", "AKIDROTATE").await;
    let (result, _) = rig
        .register(client, settings(1), rig.keyring(1), |_, _| {})
        .await;
    let ent = result.expect("still entitled");
    assert!(ent.key_rotation_due);
    assert_eq!(
        ent.key_rotation.expect("rotation date").timestamp,
        H0 - 86_400
    );
}

/// Runs a DryRun check in a task, moving the shared clock to each announced retry time.
async fn dry_run(
    rig: &Rig,
    access_key: &str,
    mode: DryRunMode,
) -> Result<meterd::entitlement::DryRunPassed, EntitlementError> {
    let client = rig.client("us-east-1", access_key).await;
    let shared: SharedClock = rig.clock.clone();
    let start = |announce: Announce| async move {
        let observer = move |e: &RetryEvent| announce(e.next_attempt_at);
        dry_run_check_with(
            &client,
            PRODUCT,
            "requests",
            mode,
            &shared,
            &DryRunPolicy::default(),
            &observer,
        )
        .await
    };
    drive_retries(&rig.clock, start, |_| {}).await.0
}

#[tokio::test]
async fn dry_run_passes_against_the_emulator() {
    let rig = rig(EmulatorConfig::demo()).await;
    let passed = dry_run(&rig, "AKIDDRY", DryRunMode::Container)
        .await
        .expect("DryRunOperation is success");
    assert_eq!(passed.attempts, 1);
    assert!(rig.emu.records().is_empty(), "a DryRun stores nothing");
}

#[tokio::test]
async fn container_dry_run_for_an_unentitled_customer_is_fatal() {
    let rig = rig(EmulatorConfig::demo()).await;
    rig.emu
        .set_entitlement(PRODUCT, meterd::emulator::Entitlement::NotEntitled)
        .expect("set entitlement");
    let err = dry_run(&rig, "AKIDDRYNE", DryRunMode::Container)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), Exit::NotEntitled, "{err}");
    assert_eq!(rig.clock.now(), from_unix_seconds(H0), "no retry");
}

#[tokio::test]
async fn ami_dry_run_fails_closed_no_sooner_than_two_hours() {
    let rig = rig(EmulatorConfig::demo()).await;
    rig.emu.set_faults(FaultProfile::every(FaultRule {
        error_rate: 1.0,
        ..FaultRule::default()
    }));
    let err = dry_run(&rig, "AKIDAMI", DryRunMode::Ami).await.unwrap_err();
    let waited = rig
        .clock
        .now()
        .duration_since(from_unix_seconds(H0))
        .expect("forward");
    assert!(
        waited >= Duration::from_secs(7200),
        "failed closed after {waited:?}"
    );
    assert!(matches!(err, EntitlementError::GaveUp { .. }), "{err}");
    assert_eq!(err.exit_code(), Exit::TransientBudget);
}

#[test]
fn the_keyring_is_embedded_in_the_binary() {
    // The bundled keys are compiled in: this test binary itself holds keys/v1.pem's body, and
    // the bundled entry is the same key as the file.
    let pem = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/keys/v1.pem"))
        .expect("keys/v1.pem");
    let body_line = pem
        .lines()
        .find(|l| l.len() >= 60 && !l.starts_with("-----"))
        .expect("a base64 line");
    let exe = std::fs::read(std::env::current_exe().expect("exe")).expect("read own binary");
    assert!(
        exe.windows(body_line.len())
            .any(|w| w == body_line.as_bytes()),
        "keys/v1.pem is not inside the binary"
    );
    let ring = Keyring::bundled().expect("bundled keys parse");
    let v1 = ring
        .entries()
        .iter()
        .find(|e| e.source == "bundled:v1.pem")
        .expect("keys/v1.pem is embedded");
    assert_eq!((v1.version, v1.bits), (1, 3072));
    let mut from_file = Keyring::empty();
    from_file
        .add_file(
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/keys/v1.pem")),
            1,
        )
        .expect("file parses");
    assert_eq!(from_file.entries()[0].fingerprint, v1.fingerprint);
    let report = ring.report().render();
    assert!(report.contains(&v1.fingerprint), "{report}");
}

// ---------------------------------------------------------------- contract pricing

mod contract {
    use super::*;
    use meterd::entitlement::contract::{
        checkout_observed, ContractCheckout, ContractSettings, WantedEntitlement,
        MARKETPLACE_KEY_FINGERPRINT,
    };
    use meterd::entitlement::Backoff;

    async fn license_client(rig: &Rig, key: &str) -> aws_sdk_licensemanager::Client {
        meterd::aws::build_license_client(&AwsSettings {
            region: Some("us-east-1".to_owned()),
            endpoint_url: Some(rig.emu.endpoint_url()),
            static_credentials: Some((key.to_owned(), "secret".to_owned())),
            operation_timeout: Some(Duration::from_secs(10)),
        })
        .await
    }

    /// The demo configuration (every key the demo buyer's, who holds the demo license), with
    /// `AKIDSTRANGER` in an account without one.
    fn config() -> EmulatorConfig {
        let mut config = EmulatorConfig::demo();
        config
            .quotas
            .accounts
            .insert("AKIDSTRANGER".to_owned(), "999988887777".to_owned());
        config
    }

    fn settings(seats: i64, token: &str) -> ContractSettings {
        ContractSettings {
            product_sku: PRODUCT.to_owned(),
            key_fingerprint: MARKETPLACE_KEY_FINGERPRINT.to_owned(),
            entitlements: vec![
                WantedEntitlement {
                    name: "Tier".to_owned(),
                    unit: "None".to_owned(),
                    count: None,
                },
                WantedEntitlement {
                    name: "Seats".to_owned(),
                    unit: "Count".to_owned(),
                    count: Some(seats),
                },
            ],
            perpetual: false,
            client_token: token.to_owned(),
            startup_budget: Duration::from_secs(300),
            backoff: Backoff::default(),
        }
    }

    /// Checks out in a task, moving the shared clock to each announced retry.
    async fn run(
        rig: &Rig,
        client: aws_sdk_licensemanager::Client,
        settings: ContractSettings,
    ) -> (Result<ContractCheckout, EntitlementError>, usize) {
        let shared: SharedClock = rig.clock.clone();
        drive_retries(
            &rig.clock,
            |announce| async move {
                let observer = move |at: SystemTime| announce(at);
                checkout_observed(&client, &settings, &shared, &observer).await
            },
            |_| {},
        )
        .await
    }

    /// `meterd doctor`'s contract check: the license is seen, an entitlement it lacks is named,
    /// another account sees none; nothing is checked out.
    #[tokio::test]
    async fn find_license_sees_the_license_and_names_what_it_lacks() {
        use meterd::entitlement::contract::{find_license, LicenseFinding};
        let rig = rig(config()).await;
        let buyer = license_client(&rig, "AKIDBUYER").await;
        let wanted = settings(1, "-").entitlements;
        assert_eq!(
            find_license(&buyer, PRODUCT, MARKETPLACE_KEY_FINGERPRINT, &wanted).await,
            LicenseFinding::Found {
                license_arn: emulator::config::DEMO_LICENSE_ARN.to_owned()
            }
        );
        let mut lacking = wanted.clone();
        lacking.push(WantedEntitlement {
            name: "Cores".to_owned(),
            unit: "Count".to_owned(),
            count: Some(1),
        });
        assert_eq!(
            find_license(&buyer, PRODUCT, MARKETPLACE_KEY_FINGERPRINT, &lacking).await,
            LicenseFinding::Missing {
                license_arn: emulator::config::DEMO_LICENSE_ARN.to_owned(),
                missing: vec!["Cores (Count)".to_owned()],
            }
        );
        let stranger = license_client(&rig, "AKIDSTRANGER").await;
        assert_eq!(
            find_license(&stranger, PRODUCT, MARKETPLACE_KEY_FINGERPRINT, &wanted).await,
            LicenseFinding::NoLicense
        );
        assert_eq!(
            find_license(&buyer, PRODUCT, "aws:000000000000:someone-else", &wanted).await,
            LicenseFinding::NoLicense,
            "another issuer's fingerprint"
        );
        assert!(rig.emu.license_consumptions().is_empty());
    }

    #[tokio::test]
    async fn a_contract_checkout_returns_the_entitlements() {
        let rig = rig(config()).await;
        let client = license_client(&rig, "AKIDBUYER").await;
        let (out, retries) = run(&rig, client, settings(3, "instance-1/0")).await;
        let out = out.expect("entitled");
        assert_eq!(retries, 0);
        assert_eq!(out.license_arn, emulator::config::DEMO_LICENSE_ARN);
        assert_eq!(out.checkout_type, "PROVISIONAL");
        let got: Vec<(&str, Option<&str>)> = out
            .entitlements
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(got, [("Tier", Some("Premium")), ("Seats", Some("3"))]);
        assert!(out.expiration.is_some());
    }

    /// A restart that checks out again with the same ClientToken (the instance's) gets the
    /// same consumption: a crash between the checkout and its answer leaks no seat.
    #[tokio::test]
    async fn a_retried_checkout_with_the_same_token_holds_one_set_of_seats() {
        let rig = rig(config()).await;
        let client = license_client(&rig, "AKIDBUYER").await;
        let first = run(&rig, client.clone(), settings(6, "instance-1/0"))
            .await
            .0
            .expect("first");
        let again = run(&rig, client.clone(), settings(6, "instance-1/0"))
            .await
            .0
            .expect("again");
        assert_eq!(first.consumption_token, again.consumption_token);
        // 6 of 10 held once: 4 more fit, 5 would not.
        run(&rig, client.clone(), settings(4, "instance-2/0"))
            .await
            .0
            .expect("four");
        let (err, _) = run(&rig, client, settings(1, "instance-3/0")).await;
        assert_eq!(err.expect_err("full").exit_code(), Exit::NotEntitled);
        // The first checkout and the four: the retry made none, the refused one none.
        assert_eq!(rig.emu.license_consumptions().len(), 2);
    }

    #[tokio::test]
    async fn each_contract_failure_exits_with_its_code() {
        let rig = rig(config()).await;
        // Another account has no license: not entitled (77).
        let stranger = license_client(&rig, "AKIDSTRANGER").await;
        let (e, _) = run(&rig, stranger, settings(1, "s/0")).await;
        let e = e.expect_err("no license");
        assert_eq!(e.exit_code(), Exit::NotEntitled, "{e}");
        assert!(e.to_string().contains("ResourceNotFoundException"), "{e}");
        // An entitlement the license lacks: not entitled (77).
        let buyer = license_client(&rig, "AKIDBUYER").await;
        let mut lacking = settings(1, "b/0");
        lacking.entitlements[1].name = "Cores".to_owned();
        let (e, _) = run(&rig, buyer.clone(), lacking).await;
        assert_eq!(
            e.expect_err("no such entitlement").exit_code(),
            Exit::NotEntitled
        );
        // A unit the model does not know: configuration (78).
        let mut bad_unit = settings(1, "b/1");
        bad_unit.entitlements[1].unit = "Parsecs".to_owned();
        let (e, _) = run(&rig, buyer.clone(), bad_unit).await;
        assert_eq!(e.expect_err("unit").exit_code(), Exit::Configuration);
        // A count that is not a positive number: configuration (78).
        let (e, _) = run(&rig, buyer.clone(), settings(0, "b/2")).await;
        assert_eq!(e.expect_err("zero").exit_code(), Exit::Configuration);
        // Throttled for the whole budget, on the injected clock: 75; then it recovers.
        rig.emu.set_faults(FaultProfile::every(FaultRule {
            throttle_rate: 1.0,
            ..FaultRule::default()
        }));
        let (e, retries) = run(&rig, buyer.clone(), settings(1, "b/3")).await;
        let e = e.expect_err("throttled");
        assert_eq!(e.exit_code(), Exit::TransientBudget, "{e}");
        assert!(retries >= 3, "{retries} retries in 300 s of clock");
        rig.emu.set_faults(FaultProfile::default());
        let (ok, _) = run(&rig, buyer, settings(1, "b/3")).await;
        ok.expect("entitled once the throttling stops");
    }
}
