//! Verification of the RegisterUsage token.
//!
//! A token is accepted only if all of these hold, checked in this order:
//! 1. It is at most [`MAX_TOKEN_BYTES`] long, is three base64url segments joined by dots, and
//!    its header segment is at most [`MAX_HEADER_BYTES`] long (huge input is refused before
//!    any decoding).
//! 2. Its header is a JSON object whose `alg` is exactly `PS256` and which has no `crit`.
//!    `none`, `HS*`, `RS*` and everything else are refused here, before any key is touched,
//!    which rules out algorithm-confusion attacks. Header fields such as `kid`, `jwk`, `jku`
//!    and `x5u` are ignored: keys come only from the keyring.
//! 3. The signature verifies (via `jsonwebtoken` and `rsa`) under one of the keyring's keys for
//!    the PublicKeyVersion that was asked for; each such key is tried.
//! 4. The claims equal what was sent: product code, nonce and public key version. Both
//!    spellings are read (`productCode`/`ProductCode`, `nonce`/`Nonce`,
//!    `publicKeyVersion`/`PublicKeyVersion`); if both spellings are present they must agree.
//!    The version may arrive as a JSON integer or as a string of decimal digits; either way
//!    its value must equal the version asked for. No `exp` is required (AWS tokens carry only
//!    `iat`); `exp`, `nbf` and `aud` are not checked.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::Serialize;
use serde_json::{Map, Value};

use super::keyring::Keyring;

/// Longest token accepted, in bytes. AWS tokens are under 1 KiB (a 3072-bit signature is
/// 512 base64 characters).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest encoded header segment accepted, in bytes.
pub const MAX_HEADER_BYTES: usize = 512;

/// What the token must say: the values sent in the RegisterUsage request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub product_code: String,
    pub nonce: String,
    pub public_key_version: u32,
}

/// A verified registration: the token's non-secret claims and the key that verified it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifiedRegistration {
    pub product_code: String,
    pub public_key_version: u32,
    /// The nonce sent for this start; single-use, so not secret once answered.
    pub nonce: String,
    /// The token's `iat` (epoch seconds), when present.
    pub issued_at: Option<i64>,
    /// Fingerprint of the keyring key that verified the signature.
    pub key_fingerprint: String,
    /// Source of that key (`bundled:v1.pem` or a path).
    pub key_source: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("RegisterUsage returned no Signature")]
    NoSignature,
    #[error("token is {len} bytes, more than the {max} accepted")]
    TooLarge { len: usize, max: usize },
    #[error("token header segment is {len} bytes, more than the {max} accepted")]
    HeaderTooLarge { len: usize, max: usize },
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("malformed token: the {part} segment is not valid base64url")]
    BadBase64 { part: &'static str },
    #[error("malformed token: the {part} is not a JSON object")]
    NotJsonObject { part: &'static str },
    #[error("token algorithm {alg} is refused: only PS256 (RSA-PSS with SHA-256) is accepted")]
    AlgorithmRefused { alg: String },
    #[error("token header marks extensions as critical ({0}); none are supported")]
    CriticalHeader(String),
    #[error("the keyring holds no key for PublicKeyVersion {version}")]
    NoKeyForVersion { version: u32 },
    #[error(
        "signature does not verify under any of the {tried} trusted key(s) for PublicKeyVersion \
         {version}"
    )]
    BadSignature { version: u32, tried: usize },
    #[error("claim {claim} is missing")]
    MissingClaim { claim: &'static str },
    #[error("claim {claim} has the wrong type: {detail}")]
    BadClaimType { claim: &'static str, detail: String },
    #[error("claims {claim} and its other spelling disagree")]
    ConflictingClaim { claim: &'static str },
    #[error("product code claim is {actual:?}, but {expected:?} was registered")]
    ProductCodeMismatch { expected: String, actual: String },
    #[error(
        "nonce claim does not match the nonce sent for this start (a replayed or foreign token)"
    )]
    NonceMismatch,
    #[error("public key version claim is {actual}, but {expected} was asked for")]
    KeyVersionMismatch { expected: u32, actual: u64 },
    #[error("token rejected by the JWT library: {0}")]
    Library(String),
}

/// Verifies a RegisterUsage token against the keyring and the values sent.
pub fn verify(
    token: &str,
    keyring: &Keyring,
    expected: &Expected,
) -> Result<VerifiedRegistration, VerifyError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(VerifyError::NoSignature);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(VerifyError::TooLarge {
            len: token.len(),
            max: MAX_TOKEN_BYTES,
        });
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(VerifyError::Malformed(format!(
            "expected 3 dot-separated segments (header.payload.signature), found {}",
            parts.len()
        )));
    }
    let (header_b64, payload_b64, signature_b64) = (parts[0], parts[1], parts[2]);
    if header_b64.len() > MAX_HEADER_BYTES {
        return Err(VerifyError::HeaderTooLarge {
            len: header_b64.len(),
            max: MAX_HEADER_BYTES,
        });
    }

    // The header decides everything that follows, so it is checked before any key is used.
    let header = decode_object(header_b64, "header")?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "PS256" => {}
        Some(Value::String(alg)) => return Err(VerifyError::AlgorithmRefused { alg: alg.clone() }),
        Some(other) => {
            return Err(VerifyError::AlgorithmRefused {
                alg: other.to_string(),
            })
        }
        None => {
            return Err(VerifyError::AlgorithmRefused {
                alg: "(missing)".to_owned(),
            })
        }
    }
    if let Some(crit) = header.get("crit") {
        return Err(VerifyError::CriticalHeader(crit.to_string()));
    }
    // Well-formed payload and signature segments, for precise messages.
    decode_object(payload_b64, "payload")?;
    if signature_b64.is_empty() || URL_SAFE_NO_PAD.decode(signature_b64).is_err() {
        return Err(VerifyError::BadBase64 { part: "signature" });
    }

    let version = expected.public_key_version;
    let mut validation = Validation::new(Algorithm::PS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;

    let mut tried = 0;
    let mut verified = None;
    for key in keyring.for_version(version) {
        tried += 1;
        match jsonwebtoken::decode::<Value>(token, &key.decoding, &validation) {
            Ok(data) => {
                verified = Some((key, data.claims));
                break;
            }
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {}
            Err(e) => return Err(VerifyError::Library(e.to_string())),
        }
    }
    if tried == 0 {
        return Err(VerifyError::NoKeyForVersion { version });
    }
    let Some((key, claims)) = verified else {
        return Err(VerifyError::BadSignature { version, tried });
    };
    let Value::Object(claims) = claims else {
        return Err(VerifyError::NotJsonObject { part: "payload" });
    };

    let product_code = string_claim(&claims, "productCode", "ProductCode")?;
    if product_code != expected.product_code {
        return Err(VerifyError::ProductCodeMismatch {
            expected: expected.product_code.clone(),
            actual: product_code,
        });
    }
    let nonce = string_claim(&claims, "nonce", "Nonce")?;
    if !constant_time_eq(nonce.as_bytes(), expected.nonce.as_bytes()) {
        return Err(VerifyError::NonceMismatch);
    }
    let claimed_version = version_claim(&claims)?;
    if claimed_version != u64::from(version) {
        return Err(VerifyError::KeyVersionMismatch {
            expected: version,
            actual: claimed_version,
        });
    }
    let issued_at = claims.get("iat").and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
    });

    Ok(VerifiedRegistration {
        product_code,
        public_key_version: version,
        nonce,
        issued_at,
        key_fingerprint: key.fingerprint.clone(),
        key_source: key.source.clone(),
    })
}

fn decode_object(segment: &str, part: &'static str) -> Result<Map<String, Value>, VerifyError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| VerifyError::BadBase64 { part })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(VerifyError::NotJsonObject { part }),
    }
}

/// The claim under either spelling; both present must agree.
fn either<'a>(
    claims: &'a Map<String, Value>,
    camel: &'static str,
    pascal: &'static str,
) -> Result<&'a Value, VerifyError> {
    match (claims.get(camel), claims.get(pascal)) {
        (Some(a), Some(b)) if a != b => Err(VerifyError::ConflictingClaim { claim: camel }),
        (Some(v), _) | (None, Some(v)) => Ok(v),
        (None, None) => Err(VerifyError::MissingClaim { claim: camel }),
    }
}

fn string_claim(
    claims: &Map<String, Value>,
    camel: &'static str,
    pascal: &'static str,
) -> Result<String, VerifyError> {
    match either(claims, camel, pascal)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(VerifyError::BadClaimType {
            claim: camel,
            detail: format!("expected a string, found {other}"),
        }),
    }
}

fn version_claim(claims: &Map<String, Value>) -> Result<u64, VerifyError> {
    let bad = |detail: String| VerifyError::BadClaimType {
        claim: "publicKeyVersion",
        detail,
    };
    match either(claims, "publicKeyVersion", "PublicKeyVersion")? {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| bad(format!("expected a positive integer, found {n}"))),
        Value::String(s)
            if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse()
                .map_err(|_| bad(format!("expected an integer, found {s:?}")))
        }
        other => Err(bad(format!("expected an integer, found {other}"))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entitlement::test_support::{
        claims, sign_ps256, sign_rsa, test_keyring, trusted_key, trusted_public_pem, untrusted_key,
    };
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const PRODUCT: &str = "prod-abc123";
    const NONCE: &str = "5f1e0c3b9a7d4e2f8a6b1c0d9e8f7a6b5f1e0c3b9a7d4e2f8a6b1c0d9e8f7a6b";

    fn expected() -> Expected {
        Expected {
            product_code: PRODUCT.to_owned(),
            nonce: NONCE.to_owned(),
            public_key_version: 1,
        }
    }

    fn b64(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    fn good_token() -> String {
        sign_ps256(trusted_key(), &claims(PRODUCT, NONCE, 1))
    }

    #[test]
    fn a_genuine_token_verifies_and_reports_the_key() {
        let ring = test_keyring(1);
        let got = verify(&good_token(), &ring, &expected()).expect("verifies");
        assert_eq!(got.product_code, PRODUCT);
        assert_eq!(got.nonce, NONCE);
        assert_eq!(got.public_key_version, 1);
        assert_eq!(got.issued_at, Some(1_700_000_000));
        assert_eq!(got.key_fingerprint, ring.entries()[0].fingerprint);
        assert_eq!(got.key_source, "test:trusted");
    }

    #[test]
    fn pascal_case_claims_are_accepted() {
        let token = sign_ps256(
            trusted_key(),
            &json!({"ProductCode": PRODUCT, "Nonce": NONCE, "PublicKeyVersion": 1, "iat": 1}),
        );
        verify(&token, &test_keyring(1), &expected()).expect("PascalCase verifies");
    }

    #[test]
    fn version_as_a_digit_string_is_accepted_but_must_match() {
        let token = sign_ps256(
            trusted_key(),
            &json!({"productCode": PRODUCT, "nonce": NONCE, "publicKeyVersion": "1"}),
        );
        verify(&token, &test_keyring(1), &expected()).expect("string version verifies");
        let token = sign_ps256(
            trusted_key(),
            &json!({"productCode": PRODUCT, "nonce": NONCE, "publicKeyVersion": "01x"}),
        );
        assert!(matches!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::BadClaimType { .. })
        ));
    }

    #[test]
    fn disagreeing_spellings_are_refused() {
        let token = sign_ps256(
            trusted_key(),
            &json!({"productCode": PRODUCT, "ProductCode": "free", "nonce": NONCE,
                    "publicKeyVersion": 1}),
        );
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::ConflictingClaim {
                claim: "productCode"
            })
        );
    }

    #[test]
    fn a_second_trusted_key_of_the_version_is_tried() {
        let mut ring = Keyring::empty();
        ring.add_pem(
            1,
            "other",
            &crate::entitlement::test_support::untrusted_public_pem(),
        )
        .expect("add");
        ring.add_pem(1, "right", &trusted_public_pem())
            .expect("add");
        let got = verify(&good_token(), &ring, &expected()).expect("second key verifies");
        assert_eq!(got.key_source, "right");
    }

    // ---- attack suite: one test per attack ----

    #[test]
    fn attack_token_signed_by_an_untrusted_key_is_refused() {
        let token = sign_ps256(untrusted_key(), &claims(PRODUCT, NONCE, 1));
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::BadSignature {
                version: 1,
                tried: 1
            })
        );
    }

    #[test]
    fn attack_alg_none_is_refused() {
        let token = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims(PRODUCT, NONCE, 1))
        );
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::AlgorithmRefused {
                alg: "none".to_owned()
            })
        );
        // With a junk signature segment too.
        let token = format!("{token}AAAA");
        assert!(matches!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::AlgorithmRefused { .. })
        ));
    }

    #[test]
    fn attack_hs256_with_the_public_key_as_hmac_secret_is_refused() {
        let pem = trusted_public_pem();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(PRODUCT, NONCE, 1),
            &EncodingKey::from_secret(pem.as_bytes()),
        )
        .expect("sign hs256");
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::AlgorithmRefused {
                alg: "HS256".to_owned()
            })
        );
    }

    #[test]
    fn attack_rs256_signed_with_the_right_key_is_refused() {
        let token = sign_rsa(Algorithm::RS256, trusted_key(), &claims(PRODUCT, NONCE, 1));
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::AlgorithmRefused {
                alg: "RS256".to_owned()
            })
        );
    }

    #[test]
    fn attack_wrong_nonce_is_refused() {
        let token = sign_ps256(trusted_key(), &claims(PRODUCT, "attacker-chosen", 1));
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::NonceMismatch)
        );
    }

    #[test]
    fn attack_token_replayed_from_an_earlier_start_is_refused() {
        // A genuine token, correctly signed, for the nonce of an earlier start.
        let earlier_nonce = crate::entitlement::new_nonce().expect("nonce");
        let earlier = sign_ps256(trusted_key(), &claims(PRODUCT, &earlier_nonce, 1));
        let earlier_expected = Expected {
            nonce: earlier_nonce,
            ..expected()
        };
        verify(&earlier, &test_keyring(1), &earlier_expected).expect("valid at its own start");
        let now = Expected {
            nonce: crate::entitlement::new_nonce().expect("nonce"),
            ..expected()
        };
        assert_eq!(
            verify(&earlier, &test_keyring(1), &now),
            Err(VerifyError::NonceMismatch)
        );
    }

    #[test]
    fn attack_wrong_product_code_is_refused() {
        let token = sign_ps256(trusted_key(), &claims("free-product", NONCE, 1));
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::ProductCodeMismatch {
                expected: PRODUCT.to_owned(),
                actual: "free-product".to_owned()
            })
        );
    }

    #[test]
    fn attack_wrong_key_version_is_refused() {
        // Signed by a key trusted for version 1, but claiming version 2.
        let token = sign_ps256(trusted_key(), &claims(PRODUCT, NONCE, 2));
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::KeyVersionMismatch {
                expected: 1,
                actual: 2
            })
        );
        // And a key trusted only for version 2 does not verify a version-1 request.
        assert_eq!(
            verify(&good_token(), &test_keyring(2), &expected()),
            Err(VerifyError::NoKeyForVersion { version: 1 })
        );
    }

    #[test]
    fn attack_malformed_two_parts_is_refused() {
        let token = good_token();
        let two = token.rsplit_once('.').expect("three parts").0;
        assert!(matches!(
            verify(two, &test_keyring(1), &expected()),
            Err(VerifyError::Malformed(_))
        ));
        let four = format!("{token}.AAAA");
        assert!(matches!(
            verify(&four, &test_keyring(1), &expected()),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn attack_malformed_bad_base64_is_refused() {
        let token = good_token();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = "not*base64!".to_owned();
        assert_eq!(
            verify(&parts.join("."), &test_keyring(1), &expected()),
            Err(VerifyError::BadBase64 { part: "payload" })
        );
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[2] = "%%%".to_owned();
        assert_eq!(
            verify(&parts.join("."), &test_keyring(1), &expected()),
            Err(VerifyError::BadBase64 { part: "signature" })
        );
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[0] = URL_SAFE_NO_PAD.encode("[1,2]");
        assert_eq!(
            verify(&parts.join("."), &test_keyring(1), &expected()),
            Err(VerifyError::NotJsonObject { part: "header" })
        );
    }

    #[test]
    fn attack_malformed_huge_header_is_refused() {
        let header = json!({"alg": "PS256", "typ": "JWT", "pad": "x".repeat(4000)});
        let token = format!("{}.{}.AAAA", b64(&header), b64(&claims(PRODUCT, NONCE, 1)));
        assert!(matches!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::HeaderTooLarge { .. })
        ));
        let huge = "A".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(
            verify(&huge, &test_keyring(1), &expected()),
            Err(VerifyError::TooLarge { .. })
        ));
    }

    #[test]
    fn attack_crit_header_is_refused() {
        let header = json!({"alg": "PS256", "crit": ["b64"], "b64": false});
        let token = format!("{}.{}.AAAA", b64(&header), b64(&claims(PRODUCT, NONCE, 1)));
        assert!(matches!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::CriticalHeader(_))
        ));
    }

    #[test]
    fn tampered_payload_fails_the_signature() {
        let token = good_token();
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(&claims("other-product", NONCE, 1)),
            parts[2]
        );
        assert!(matches!(
            verify(&forged, &test_keyring(1), &expected()),
            Err(VerifyError::BadSignature { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_is_refused_without_panicking(input in ".{0,600}") {
            proptest::prop_assert!(verify(&input, &test_keyring(1), &expected()).is_err());
        }

        #[test]
        fn arbitrary_segments_are_refused_without_panicking(
            header in "[A-Za-z0-9_-]{0,80}",
            payload in "[A-Za-z0-9_-]{0,80}",
            signature in "[A-Za-z0-9_-]{0,80}",
        ) {
            let token = format!("{header}.{payload}.{signature}");
            proptest::prop_assert!(verify(&token, &test_keyring(1), &expected()).is_err());
        }

        #[test]
        fn any_other_algorithm_is_refused_before_key_use(alg in "[A-Za-z0-9]{0,8}") {
            proptest::prop_assume!(alg != "PS256");
            let token = format!(
                "{}.{}.AAAA",
                b64(&json!({"alg": alg})),
                b64(&claims(PRODUCT, NONCE, 1))
            );
            // An empty keyring: refusing must not depend on any key.
            proptest::prop_assert_eq!(
                verify(&token, &Keyring::empty(), &expected()),
                Err(VerifyError::AlgorithmRefused { alg })
            );
        }
    }

    #[test]
    fn missing_claims_are_named() {
        let token = sign_ps256(
            trusted_key(),
            &json!({"productCode": PRODUCT, "nonce": NONCE}),
        );
        assert_eq!(
            verify(&token, &test_keyring(1), &expected()),
            Err(VerifyError::MissingClaim {
                claim: "publicKeyVersion"
            })
        );
    }
}
