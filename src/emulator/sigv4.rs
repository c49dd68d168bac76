//! SigV4 checking of incoming requests, with the errors AWS's JSON front end answers.
//!
//! The signature is recomputed over exactly the headers the client listed in
//! `SignedHeaders`. Messages follow AWS's (Troubleshooting Signature Version 4 errors).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::credentials::{Session, TemporaryCredentials};
use super::error::ApiError;

pub const SERVICE: &str = "aws-marketplace";
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Who signed a request, and for which region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller identity the metering rules key on: a long-term key's access key id, or
    /// for the emulator's temporary credentials their role session
    /// ([`super::credentials::Session::identity`]).
    pub identity: String,
    pub region: String,
}

#[derive(Debug, PartialEq, Eq)]
struct Authorization {
    access_key_id: String,
    date: String,
    region: String,
    service: String,
    terminator: String,
    signed_headers: Vec<String>,
    signature: String,
}

fn incomplete(message: impl Into<String>) -> ApiError {
    ApiError::new("IncompleteSignatureException", message)
}

fn parse_authorization(value: &str) -> Result<Authorization, ApiError> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(' '))
        .ok_or_else(|| {
            incomplete(format!(
                "Authorization header requires the {ALGORITHM} algorithm. Authorization={value}"
            ))
        })?;
    let mut parts: BTreeMap<&str, &str> = BTreeMap::new();
    for part in rest.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (k, v) = part.split_once('=').ok_or_else(|| {
            incomplete(format!(
                "Authorization header requires each component to be of the form key=value. Authorization={value}"
            ))
        })?;
        parts.insert(k.trim(), v.trim());
    }
    let mut missing = Vec::new();
    for required in ["Credential", "SignedHeaders", "Signature"] {
        if !parts.contains_key(required) {
            missing.push(format!(
                "Authorization header requires '{required}' parameter."
            ));
        }
    }
    if !missing.is_empty() {
        return Err(incomplete(format!(
            "{} Authorization={value}",
            missing.join(" ")
        )));
    }
    let credential = parts["Credential"];
    let scope: Vec<&str> = credential.split('/').collect();
    let [key, date, region, service, terminator] = scope.as_slice() else {
        return Err(incomplete(format!(
            "Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got '{credential}'"
        )));
    };
    Ok(Authorization {
        access_key_id: (*key).to_owned(),
        date: (*date).to_owned(),
        region: (*region).to_owned(),
        service: (*service).to_owned(),
        terminator: (*terminator).to_owned(),
        signed_headers: parts["SignedHeaders"]
            .split(';')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect(),
        signature: parts["Signature"].to_owned(),
    })
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex_value = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                out.push(hi * 16 + lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn canonical_query(query: Option<&str>) -> String {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return String::new();
    };
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A header's values as SigV4 canonicalises them (trimmed, inner whitespace collapsed, joined
/// with commas); `None` when absent. A value with a byte outside ASCII is `Err` with its
/// lossy text: SDKs sign only ASCII header values, and no check here slices non-ASCII text.
fn canonical_header_value(headers: &HeaderMap, name: &str) -> Option<Result<String, String>> {
    let mut values = Vec::new();
    let mut ascii = true;
    for v in headers.get_all(name) {
        ascii &= v.as_bytes().is_ascii();
        values.push(
            String::from_utf8_lossy(v.as_bytes())
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    if values.is_empty() {
        None
    } else if ascii {
        Some(Ok(values.join(",")))
    } else {
        Some(Err(values.join(",")))
    }
}

/// Parses `YYYYMMDD'T'HHMMSS'Z'`; anything else, non-ASCII text included, is `None`.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .filter(|d| d.iter().all(u8::is_ascii_digit))
            .and_then(|_| s.get(range))
    };
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        digits(0..4)?,
        digits(4..6)?,
        digits(6..8)?,
        digits(9..11)?,
        digits(11..13)?,
        digits(13..15)?
    );
    humantime::parse_rfc3339(&rfc).ok()
}

fn invalid_signature() -> ApiError {
    ApiError::new(
        "InvalidSignatureException",
        "The request signature we calculated does not match the signature you provided. \
         Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
    )
}

/// What the checker needs from a request.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Checks a request's SigV4 Authorization header for the Metering Service.
///
/// With an empty `credentials` map any well-formed header for the service is accepted.
pub fn verify(
    req: &SignedRequest<'_>,
    credentials: &BTreeMap<String, String>,
    now: SystemTime,
    max_skew: Option<Duration>,
) -> Result<Caller, ApiError> {
    verify_with(req, SERVICE, credentials, None, now, max_skew).map(|v| v.caller)
}

/// A verified caller, with its session when it signed with temporary credentials.
#[derive(Debug, Clone)]
pub struct Verified {
    pub caller: Caller,
    pub session: Option<Session>,
}

/// [`verify`] for `service`'s scope, also accepting the issued `temporary` credentials (with
/// their `X-Amz-Security-Token`, until they expire) whatever `credentials` holds.
pub fn verify_with(
    req: &SignedRequest<'_>,
    service: &str,
    credentials: &BTreeMap<String, String>,
    temporary: Option<&TemporaryCredentials>,
    now: SystemTime,
    max_skew: Option<Duration>,
) -> Result<Verified, ApiError> {
    let Some(header) = req.headers.get(http::header::AUTHORIZATION) else {
        return Err(ApiError::new(
            "MissingAuthenticationTokenException",
            "Request is missing Authentication Token",
        ));
    };
    let header = header
        .to_str()
        .map_err(|_| incomplete("Authorization header is not valid text"))?;
    let auth = parse_authorization(header)?;
    if auth.service != service {
        return Err(ApiError::new(
            "InvalidSignatureException",
            format!("Credential should be scoped to correct service: '{service}'. "),
        ));
    }
    if auth.terminator != "aws4_request" {
        return Err(ApiError::new(
            "InvalidSignatureException",
            format!(
                "Credential should be scoped with a valid terminator: 'aws4_request', not '{}'. ",
                auth.terminator
            ),
        ));
    }
    let amz_date = canonical_header_value(req.headers, "x-amz-date")
        .or_else(|| canonical_header_value(req.headers, "date"))
        .ok_or_else(|| {
            incomplete(format!(
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header. Authorization={header}"
            ))
        })?;
    let bad_date = |shown: &str| {
        incomplete(format!(
            "Date must be in ISO-8601 'basic format'. Got '{shown}'."
        ))
    };
    let amz_date = amz_date.map_err(|lossy| bad_date(&lossy))?;
    let signed_at = parse_amz_date(&amz_date).ok_or_else(|| bad_date(&amz_date))?;
    // A parsed date is 16 ASCII characters, so its first 8 are its YYYYMMDD.
    let day = amz_date.get(..8).unwrap_or(&amz_date);
    if auth.date != day {
        return Err(ApiError::new(
            "InvalidSignatureException",
            format!(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{day}', from '{amz_date}'.",
                auth.date,
            ),
        ));
    }
    if let Some(max_skew) = max_skew {
        let skew = now
            .duration_since(signed_at)
            .or_else(|_| signed_at.duration_since(now))
            .unwrap_or_default();
        if skew > max_skew {
            return Err(ApiError::new(
                "InvalidSignatureException",
                format!("Signature expired: {amz_date} is now earlier or later than the allowed skew of {}.", humantime::format_duration(max_skew)),
            ));
        }
    }
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(incomplete(
            "'Host' must be a 'SignedHeader' in the AWS Authorization.",
        ));
    }
    let mut caller = Caller {
        identity: auth.access_key_id.clone(),
        region: auth.region.clone(),
    };
    let unrecognized = || {
        ApiError::new(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    };
    let issued = temporary.and_then(|t| t.get(&auth.access_key_id));
    let (secret, session) = match issued {
        Some(issued) => {
            let token = req
                .headers
                .get("x-amz-security-token")
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !bool::from(token.ct_eq(issued.session_token.as_bytes())) {
                return Err(unrecognized());
            }
            if now >= issued.expires {
                return Err(ApiError::new(
                    "ExpiredTokenException",
                    "The security token included in the request is expired",
                ));
            }
            caller.identity = issued.session.identity.clone();
            (issued.secret, Some(issued.session))
        }
        None if credentials.is_empty() => {
            return Ok(Verified {
                caller,
                session: None,
            })
        }
        None => (
            credentials
                .get(&auth.access_key_id)
                .ok_or_else(unrecognized)?
                .clone(),
            None,
        ),
    };
    let expected = signature(req, &auth, &amz_date, &secret).ok_or_else(invalid_signature)?;
    if expected.as_bytes().ct_eq(auth.signature.as_bytes()).into() {
        Ok(Verified { caller, session })
    } else {
        Err(invalid_signature())
    }
}

fn signature(
    req: &SignedRequest<'_>,
    auth: &Authorization,
    amz_date: &str,
    secret: &str,
) -> Option<String> {
    let mut canonical_headers = String::new();
    for name in &auth.signed_headers {
        // A missing or non-ASCII signed header cannot match what an SDK signed.
        let value = canonical_header_value(req.headers, name)?.ok()?;
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        uri_encode(&percent_decode(req.path), true),
        canonical_query(req.query),
        canonical_headers,
        auth.signed_headers.join(";"),
        hex::encode(Sha256::digest(req.body)),
    );
    let scope = format!(
        "{}/{}/{}/{}",
        auth.date, auth.region, auth.service, auth.terminator
    );
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
    let k_region = hmac(&k_date, auth.region.as_bytes());
    let k_service = hmac(&k_region, auth.service.as_bytes());
    let k_signing = hmac(&k_service, auth.terminator.as_bytes());
    Some(hex::encode(hmac(&k_signing, string_to_sign.as_bytes())))
}

/// Signs requests the way an SDK does; for tests and tools that speak raw HTTP.
pub struct Signer<'a> {
    pub access_key_id: &'a str,
    pub secret: &'a str,
    pub region: &'a str,
}

impl Signer<'_> {
    /// Adds `X-Amz-Date` and `Authorization`, signing every header already present.
    pub fn sign(
        &self,
        headers: &mut HeaderMap,
        method: &str,
        path: &str,
        body: &[u8],
        at: SystemTime,
    ) {
        self.sign_scoped(headers, method, path, body, at, SERVICE, None);
    }

    /// [`Self::sign`] for `service`, adding and signing `X-Amz-Security-Token` when given.
    #[allow(clippy::too_many_arguments)]
    pub fn sign_scoped(
        &self,
        headers: &mut HeaderMap,
        method: &str,
        path: &str,
        body: &[u8],
        at: SystemTime,
        service: &str,
        session_token: Option<&str>,
    ) {
        if let Some(token) = session_token.and_then(|t| http::HeaderValue::from_str(t).ok()) {
            headers.insert("x-amz-security-token", token);
        }
        let stamp = humantime::format_rfc3339_seconds(at).to_string();
        let amz_date: String = stamp
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == 'T' || *c == 'Z')
            .collect();
        headers.insert(
            "x-amz-date",
            amz_date
                .parse()
                .expect("digits, T and Z are a valid header value"),
        );
        let mut signed_headers: Vec<String> =
            headers.keys().map(|k| k.as_str().to_owned()).collect();
        signed_headers.sort();
        signed_headers.dedup();
        let auth = Authorization {
            access_key_id: self.access_key_id.to_owned(),
            date: amz_date[..8].to_owned(),
            region: self.region.to_owned(),
            service: service.to_owned(),
            terminator: "aws4_request".to_owned(),
            signed_headers,
            signature: String::new(),
        };
        let req = SignedRequest {
            method,
            path,
            query: None,
            headers,
            body,
        };
        let sig =
            signature(&req, &auth, &amz_date, self.secret).expect("every signed header is present");
        let value = format!(
            "{ALGORITHM} Credential={}/{}/{}/{service}/aws4_request, SignedHeaders={}, Signature={sig}",
            self.access_key_id,
            auth.date,
            self.region,
            auth.signed_headers.join(";")
        );
        headers.insert(
            http::header::AUTHORIZATION,
            value.parse().expect("the Authorization value is ASCII"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> BTreeMap<String, String> {
        BTreeMap::from([("AKID".to_owned(), "s3cret".to_owned())])
    }

    fn signed(secret: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("host", "127.0.0.1:1234".parse().expect("valid"));
        headers.insert(
            "x-amz-target",
            "AWSMPMeteringService.MeterUsage".parse().expect("valid"),
        );
        Signer {
            access_key_id: "AKID",
            secret,
            region: "us-east-1",
        }
        .sign(
            &mut headers,
            "POST",
            "/",
            b"{}",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        headers
    }

    fn check(headers: &HeaderMap, body: &[u8]) -> Result<Caller, ApiError> {
        let req = SignedRequest {
            method: "POST",
            path: "/",
            query: None,
            headers,
            body,
        };
        verify(&req, &creds(), SystemTime::UNIX_EPOCH, None)
    }

    #[test]
    fn aws_documented_signing_key_example() {
        // The AWS General Reference example: secret wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY,
        // 20120215, us-east-1, iam.
        let k = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20120215");
        let k = hmac(&k, b"us-east-1");
        let k = hmac(&k, b"iam");
        let k = hmac(&k, b"aws4_request");
        assert_eq!(
            hex::encode(k),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn correct_secret_passes_and_names_the_caller() {
        let caller = check(&signed("s3cret"), b"{}").expect("valid signature");
        assert_eq!(
            caller,
            Caller {
                identity: "AKID".into(),
                region: "us-east-1".into()
            }
        );
    }

    #[test]
    fn wrong_secret_tampered_body_and_unknown_key_fail_like_aws() {
        assert_eq!(
            check(&signed("wrong"), b"{}").expect_err("bad").error_type,
            "InvalidSignatureException"
        );
        assert_eq!(
            check(&signed("s3cret"), b"{ }")
                .expect_err("bad")
                .error_type,
            "InvalidSignatureException"
        );
        let req_headers = signed("s3cret");
        let req = SignedRequest {
            method: "POST",
            path: "/",
            query: None,
            headers: &req_headers,
            body: b"{}",
        };
        let other = BTreeMap::from([("OTHER".to_owned(), "x".to_owned())]);
        assert_eq!(
            verify(&req, &other, SystemTime::UNIX_EPOCH, None)
                .expect_err("bad")
                .error_type,
            "UnrecognizedClientException"
        );
    }

    #[test]
    fn missing_or_malformed_headers() {
        let empty = HeaderMap::new();
        assert_eq!(
            check(&empty, b"").expect_err("missing").error_type,
            "MissingAuthenticationTokenException"
        );
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/aws-marketplace/aws4_request"
                .parse()
                .expect("valid"),
        );
        assert_eq!(
            check(&h, b"").expect_err("incomplete").error_type,
            "IncompleteSignatureException"
        );
        let mut h = signed("s3cret");
        let value = h["authorization"]
            .to_str()
            .expect("ascii")
            .replace("aws-marketplace", "s3");
        h.insert("authorization", value.parse().expect("valid"));
        assert_eq!(
            check(&h, b"{}").expect_err("service").error_type,
            "InvalidSignatureException"
        );
    }

    #[test]
    fn skew_is_checked_only_when_configured() {
        let h = signed("s3cret");
        let req = SignedRequest {
            method: "POST",
            path: "/",
            query: None,
            headers: &h,
            body: b"{}",
        };
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + 3600);
        assert!(verify(&req, &creds(), far, None).is_ok());
        assert!(verify(&req, &creds(), far, Some(Duration::from_secs(900))).is_err());
    }

    #[test]
    fn canonical_query_sorts_and_encodes() {
        assert_eq!(canonical_query(Some("b=2&a=x%20y&c")), "a=x%20y&b=2&c=");
    }

    #[test]
    fn a_non_ascii_date_is_an_incomplete_signature_not_a_panic() {
        // 16 bytes with 'T' at index 8 and 'Z' last, but a two-byte character at 3..5: byte
        // slicing of its text used to panic.
        let date = http::HeaderValue::from_bytes(b"202\xc3\xa9010T120000Z").expect("obs-text");
        for credentials in [BTreeMap::new(), creds()] {
            let mut h = signed("s3cret");
            h.insert("x-amz-date", date.clone());
            let req = SignedRequest {
                method: "POST",
                path: "/",
                query: None,
                headers: &h,
                body: b"{}",
            };
            let err = verify(&req, &credentials, SystemTime::UNIX_EPOCH, None).expect_err("bad");
            assert_eq!(err.error_type, "IncompleteSignatureException", "{err}");
            assert!(err.message.contains("ISO-8601 'basic format'"), "{err}");
        }
        for odd in [
            "2024010\u{e9}T12000Z",
            "20240101T1200\u{e9}",
            "2024-101T120000Z",
            "",
        ] {
            assert_eq!(parse_amz_date(odd), None, "{odd:?}");
        }
        assert!(parse_amz_date("20240101T120000Z").is_some());
    }

    #[test]
    fn a_non_ascii_signed_header_fails_the_signature() {
        let mut h = signed("s3cret");
        h.insert(
            "x-amz-target",
            http::HeaderValue::from_bytes(b"AWSMPMeteringService.\xff").expect("obs-text"),
        );
        assert_eq!(
            check(&h, b"{}").expect_err("bad").error_type,
            "InvalidSignatureException"
        );
    }

    #[test]
    fn the_credential_date_must_be_the_whole_day() {
        let mut h = signed("s3cret");
        let value = h["authorization"]
            .to_str()
            .expect("ascii")
            .replace("/20231114/", "/2023/");
        h.insert("authorization", value.parse().expect("valid"));
        let err = check(&h, b"{}").expect_err("bad");
        assert_eq!(err.error_type, "InvalidSignatureException");
        assert!(err.message.contains("'2023' != '20231114'"), "{err}");
    }
}
