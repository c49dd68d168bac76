use super::*;
use crate::exit::Exit;

fn failure(code: &str) -> CallFailure {
    CallFailure {
        code: Some(code.to_owned()),
        message: "m".to_owned(),
        status: Some(400),
    }
}

#[test]
fn each_documented_answer_has_its_exit_code() {
    for (code, exit) in [
        ("NoEntitlementsAllowedException", Exit::NotEntitled),
        ("ResourceNotFoundException", Exit::NotEntitled),
        ("AccessDeniedException", Exit::Configuration),
        ("AuthorizationException", Exit::Configuration),
        ("ValidationException", Exit::Configuration),
        ("InvalidParameterValueException", Exit::Configuration),
        ("RedirectException", Exit::Configuration),
        ("SomethingNew", Exit::ServiceRefused),
    ] {
        assert_eq!(classify("sku", failure(code)).exit_code(), exit, "{code}");
    }
    assert!(failure("RateLimitExceededException").is_retryable());
    assert!(!failure("NoEntitlementsAllowedException").is_retryable());
}
