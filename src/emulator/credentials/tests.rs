use super::*;

#[test]
fn role_arns_parse_only_when_well_formed() {
    let r = RoleArn::parse("arn:aws:iam::123456789012:role/path/meterd").expect("valid");
    assert_eq!((r.account, r.name), ("123456789012", "meterd"));
    for bad in [
        "arn:aws:iam::12345:role/x",
        "arn:aws:iam::123456789012:user/x",
        "arn:aws:iam::123456789012:role/",
        "arn:aws:s3:::bucket",
        "",
    ] {
        assert!(RoleArn::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn forms_decode_plus_and_percent() {
    let f = parse_form(b"Action=GetCallerIdentity&Version=2011-06-15&A=a+b%2Fc&B");
    assert_eq!(f["A"], "a b/c");
    assert_eq!(f["B"], "");
    assert_eq!(f["Action"], "GetCallerIdentity");
}

#[test]
fn a_pods_session_is_its_uid_whatever_the_session_name() {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.sig",
        b64(serde_json::json!({"alg": "RS256"})),
        b64(
            serde_json::json!({"sub": "system:serviceaccount:ns:sa", "kubernetes.io": {"pod": {"uid": "u-1"}}})
        )
    );
    let claims = web_identity_claims(&token).expect("claims");
    assert_eq!(claims.sub.as_deref(), Some("system:serviceaccount:ns:sa"));
    assert_eq!(
        claims.kubernetes.and_then(|k| k.pod).and_then(|p| p.uid),
        Some("u-1".to_owned())
    );
    assert!(web_identity_claims("not-a-jwt").is_none());
    assert!(web_identity_claims("a.%%%.c").is_none());
    let role = RoleArn::parse("arn:aws:iam::123456789012:role/meterd").expect("valid");
    let one = role_session(&role, "web-identity-token-1", "u-1");
    let two = role_session(&role, "web-identity-token-2", "u-1");
    assert_eq!(one.identity, two.identity);
    assert_ne!(one.arn, two.arn);
    assert!(one.user_id.starts_with("AROA") && one.user_id.ends_with(":web-identity-token-1"));
}

#[test]
fn xml_text_is_escaped() {
    assert_eq!(xml_escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
}

#[test]
fn the_store_stays_bounded() {
    let store = TemporaryCredentials::default();
    let role = RoleArn::parse("arn:aws:iam::123456789012:role/meterd").expect("valid");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let first = store.issue(role_session(&role, "s", "t"), now, Duration::from_secs(60));
    assert!(first.access_key_id.starts_with("ASIA") && first.access_key_id.len() == 20);
    let later = now + Duration::from_secs(120);
    store.lock().extend((0..MAX_ISSUED).map(|i| {
        (
            format!("K{i}"),
            Issued {
                secret: String::new(),
                session_token: String::new(),
                expires: later + Duration::from_secs(i as u64),
                session: role_session(&role, "s", "t"),
            },
        )
    }));
    store.issue(
        role_session(&role, "s", "t"),
        later,
        Duration::from_secs(60),
    );
    let issued = store.lock();
    assert_eq!(issued.len(), MAX_ISSUED);
    assert!(!issued.contains_key(&first.access_key_id));
    assert!(
        !issued.contains_key("K0"),
        "the earliest to expire went first"
    );
}
