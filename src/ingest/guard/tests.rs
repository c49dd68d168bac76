use super::*;

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let token = b"s3cret";
    let matches = |value: &str| {
        let req = Request::builder()
            .header(header::AUTHORIZATION, value)
            .body(())
            .expect("request");
        bearer_matches(req.headers(), token)
    };
    for ok in [
        "Bearer s3cret",
        "bearer s3cret",
        "BEARER s3cret",
        "bEaReR s3cret",
    ] {
        assert!(matches(ok), "{ok}");
    }
    for bad in [
        "Bearer s3cre",
        "Bearer  s3cret",
        "Basic s3cret",
        "Bearers3cret",
        "Bear",
        "",
    ] {
        assert!(!matches(bad), "{bad}");
    }
}

#[test]
fn host_guard_accepts_only_loopback_names() {
    for ok in [
        "localhost",
        "localhost:8377",
        "127.0.0.1:8377",
        "[::1]:8377",
        "127.1.2.3",
    ] {
        assert!(host_allowed(ok, None), "{ok}");
    }
    for bad in [
        "evil.example",
        "evil.example:8377",
        "10.0.0.1:8377",
        "0.0.0.0:8377",
        "",
        // Strict authority: a host and an optional numeric port, nothing else.
        "[::1]evil.com",
        "[::1].evil.com",
        "[::1]:8377evil",
        "127.0.0.1:18377/evil",
        "127.0.0.1:",
        "127.0.0.1:99999",
        "127.0.0.1:+80",
        "localhost:80:80",
        "localhost@evil.example",
        "user@localhost",
        "[localhost]",
        "local host",
    ] {
        assert!(!host_allowed(bad, None), "{bad}");
    }
    let pod_ip: IpAddr = "10.1.2.3".parse().expect("ip");
    assert!(host_allowed("10.1.2.3:8377", Some(pod_ip)));
}
