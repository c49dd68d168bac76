use super::*;
use crate::emulator::config::DEMO_LICENSE_ARN;

fn holds(expires_at: Option<i64>, checked_in: bool) -> Consumption {
    Consumption {
        token: "t".into(),
        license_arn: DEMO_LICENSE_ARN.into(),
        account: "111122223333".into(),
        checkout_type: "PROVISIONAL".into(),
        entitlements: vec![],
        node_id: None,
        issued_at: 0,
        expires_at,
        checked_in,
        extensions: 0,
    }
}

#[test]
fn a_consumption_holds_until_checked_in_or_expired() {
    assert!(holds(Some(100), false).holds(99));
    assert!(!holds(Some(100), false).holds(100));
    assert!(!holds(Some(100), true).holds(0));
    assert!(holds(None, false).holds(i64::MAX));
}

#[test]
fn the_demo_license_is_valid_and_has_a_feature_and_a_pool() {
    let config = EmulatorConfig::demo();
    config.validate().expect("valid");
    let license = config.license(DEMO_LICENSE_ARN).expect("demo license");
    assert!(license.entitlements.iter().any(|e| e.unit == "None"));
    assert!(license.entitlements.iter().any(|e| e.max_count.is_some()));
}
