//! Temporary credentials on the emulator's own listener: a minimal STS
//! (`AssumeRoleWithWebIdentity`, `GetCallerIdentity`; the Query protocol, form-encoded POST
//! with XML answers, model `sts/2011-06-15`) and an ECS-style container credentials endpoint
//! (`GET /v2/credentials/{task}` with the task's `Authorization` token).
//!
//! Issued keys are checked by [`super::sigv4`] with their session token. Their caller
//! identity is the role session (one pod or task), not the rotating access key id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use rand::distributions::{Alphanumeric, DistString, Distribution, Uniform};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::server::{ReadRequest, Shared};
use super::sigv4;

/// Issued credentials kept at once; the earliest to expire are dropped first.
pub const MAX_ISSUED: usize = 100_000;
/// STS's bounds for `DurationSeconds`.
const MIN_DURATION: Duration = Duration::from_secs(900);
const MAX_DURATION: Duration = Duration::from_secs(12 * 3600);
const STS_VERSION: &str = "2011-06-15";
const STS_XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
pub const STS_SERVICE: &str = "sts";

/// `[temporary_credentials]` in the emulator's TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemporaryCredentialsConfig {
    /// Lifetime of issued credentials without `DurationSeconds` (STS: 1 hour), and of every
    /// container credential.
    #[serde(default = "default_duration", with = "humantime_serde")]
    pub duration: Duration,
    /// Tasks served at `/v2/credentials/{id}`.
    #[serde(default)]
    pub tasks: Vec<ContainerTask>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerTask {
    pub id: String,
    pub role_arn: String,
    /// What `AWS_CONTAINER_AUTHORIZATION_TOKEN` holds.
    pub authorization_token: String,
}

fn default_duration() -> Duration {
    Duration::from_secs(3600)
}

impl Default for TemporaryCredentialsConfig {
    fn default() -> Self {
        Self {
            duration: default_duration(),
            tasks: Vec::new(),
        }
    }
}

impl TemporaryCredentialsConfig {
    pub(crate) fn validate(&self, problems: &mut Vec<String>) {
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            problems.push("temporary_credentials.duration must be 1s..=12h".to_owned());
        }
        let mut ids = std::collections::BTreeSet::new();
        for task in &self.tasks {
            if task.id.is_empty()
                || !task
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                problems.push(format!("task id {:?} must be [A-Za-z0-9-_.]+", task.id));
            }
            if !ids.insert(task.id.as_str()) {
                problems.push(format!("task {:?} is listed twice", task.id));
            }
            if RoleArn::parse(&task.role_arn).is_none() {
                problems.push(format!(
                    "task {:?}: role_arn {:?} is not arn:aws:iam::ACCOUNT:role/NAME",
                    task.id, task.role_arn
                ));
            }
            if task.authorization_token.is_empty() {
                problems.push(format!("task {:?}: empty authorization_token", task.id));
            }
        }
    }
}

/// An IAM role ARN, `arn:aws:iam::ACCOUNT:role/[PATH/]NAME`.
struct RoleArn<'a> {
    account: &'a str,
    name: &'a str,
}

impl<'a> RoleArn<'a> {
    fn parse(arn: &'a str) -> Option<Self> {
        let rest = arn.strip_prefix("arn:aws:iam::")?;
        let (account, resource) = rest.split_once(':')?;
        let path = resource.strip_prefix("role/")?;
        let name = path.rsplit('/').next()?;
        let valid = |c: char| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c);
        (account.len() == 12
            && account.chars().all(|c| c.is_ascii_digit())
            && !name.is_empty()
            && name.len() <= 64
            && name.chars().all(valid))
        .then_some(Self { account, name })
    }
}

/// Who holds a set of issued credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The instance the metering rules key on: `ACCOUNT:assumed-role/ROLE/SUBJECT`, where
    /// SUBJECT is the web identity token's pod uid (else its `sub`) or the task id.
    pub identity: String,
    /// `GetCallerIdentity`'s `Arn`, `UserId` and `Account`.
    pub arn: String,
    pub user_id: String,
    pub account: String,
}

#[derive(Clone)]
pub struct Issued {
    pub secret: String,
    pub session_token: String,
    pub expires: SystemTime,
    pub session: Session,
}

/// The credentials issued so far, by access key id.
#[derive(Default)]
pub struct TemporaryCredentials {
    issued: Mutex<HashMap<String, Issued>>,
}

/// A new credential set, as the endpoints answer it.
struct NewCredentials {
    access_key_id: String,
    secret: String,
    session_token: String,
    expires: SystemTime,
}

impl TemporaryCredentials {
    pub fn get(&self, access_key_id: &str) -> Option<Issued> {
        self.lock().get(access_key_id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Issued>> {
        self.issued.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn issue(&self, session: Session, now: SystemTime, lifetime: Duration) -> NewCredentials {
        let mut rng = rand::thread_rng();
        let key_chars = Uniform::from(0..32usize);
        const BASE32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let suffix: String = (0..16)
            .map(|_| char::from(BASE32[key_chars.sample(&mut rng)]))
            .collect();
        let mut token = [0u8; 96];
        rand::Rng::fill(&mut rng, &mut token[..]);
        let fresh = NewCredentials {
            access_key_id: format!("ASIA{suffix}"),
            secret: Alphanumeric.sample_string(&mut rng, 40),
            session_token: base64::engine::general_purpose::STANDARD.encode(token),
            expires: now.checked_add(lifetime).unwrap_or(now),
        };
        let mut issued = self.lock();
        if issued.len() >= MAX_ISSUED {
            issued.retain(|_, i| i.expires > now);
        }
        while issued.len() >= MAX_ISSUED {
            let Some(first) = issued
                .iter()
                .min_by_key(|(_, i)| i.expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            issued.remove(&first);
        }
        issued.insert(
            fresh.access_key_id.clone(),
            Issued {
                secret: fresh.secret.clone(),
                session_token: fresh.session_token.clone(),
                expires: fresh.expires,
                session,
            },
        );
        fresh
    }
}

type HttpResponse = Response<Full<Bytes>>;

/// The hook in the emulator's router: STS (a form-encoded POST without `X-Amz-Target`) and
/// the container endpoint; `None` for everything else.
pub(crate) fn route(shared: &Shared, req: &ReadRequest) -> Option<HttpResponse> {
    let parts = &req.parts;
    if parts.method == Method::GET {
        let task = parts.uri.path().strip_prefix("/v2/credentials/")?;
        return Some(container(shared, req, task));
    }
    let form = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if parts.method != Method::POST || !form || parts.headers.contains_key("x-amz-target") {
        return None;
    }
    Some(match sts(shared, req) {
        Ok(xml) => xml_response(StatusCode::OK, xml),
        Err(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            let kind = if e.status >= 500 {
                "Receiver"
            } else {
                "Sender"
            };
            xml_response(
                status,
                format!(
                    "<ErrorResponse xmlns=\"{STS_XMLNS}\"><Error><Type>{kind}</Type><Code>{}</Code><Message>{}</Message></Error><RequestId>{}</RequestId></ErrorResponse>",
                    xml_escape(&e.error_type),
                    xml_escape(&e.message),
                    request_id()
                ),
            )
        }
    })
}

fn request_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

fn xml_response(status: StatusCode, body: String) -> HttpResponse {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/xml")
        .header("x-amzn-requestid", request_id())
        .body(Full::new(Bytes::from(body)))
        .expect("static headers form a valid response")
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static headers form a valid response")
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `application/x-www-form-urlencoded` pairs; the last value of a repeated name wins.
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let decode = |s: &str| sigv4::percent_decode(&s.replace('+', " "));
            (decode(k), decode(v))
        })
        .collect()
}

fn sts_error(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

/// STS's `ValidationError` for one parameter's length (the model's `min`/`max`).
fn required<'a>(
    form: &'a HashMap<String, String>,
    name: &str,
    len: std::ops::RangeInclusive<usize>,
) -> Result<&'a str, ApiError> {
    let member = {
        let mut c = name.chars();
        c.next()
            .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
            .unwrap_or_default()
    };
    let Some(value) = form.get(name) else {
        return Err(sts_error(
            "ValidationError",
            format!("1 validation error detected: Value null at '{member}' failed to satisfy constraint: Member must not be null"),
        ));
    };
    let n = value.chars().count();
    if !len.contains(&n) {
        let bound = if n < *len.start() {
            format!("greater than or equal to {}", len.start())
        } else {
            format!("less than or equal to {}", len.end())
        };
        return Err(sts_error(
            "ValidationError",
            format!("1 validation error detected: Value at '{member}' failed to satisfy constraint: Member must have length {bound}"),
        ));
    }
    Ok(value)
}

fn sts(shared: &Shared, req: &ReadRequest) -> Result<String, ApiError> {
    let Some(body) = req.body.as_deref() else {
        return Err(sts_error(
            "ValidationError",
            "The request must be smaller than 1 MiB.",
        ));
    };
    let form = parse_form(body);
    let action = form.get("Action").map(String::as_str).unwrap_or("");
    if form.get("Version").map(String::as_str) != Some(STS_VERSION) {
        return Err(sts_error(
            "InvalidAction",
            format!("Could not find operation {action} for version NO_VERSION_SPECIFIED"),
        ));
    }
    let now = shared.clock.now();
    let (name, result) = match action {
        "AssumeRoleWithWebIdentity" => ("AssumeRoleWithWebIdentity", assume(shared, &form, now)?),
        "GetCallerIdentity" => (
            "GetCallerIdentity",
            caller_identity(shared, req, body, now)?,
        ),
        other => {
            return Err(sts_error(
                "InvalidAction",
                format!("Could not find operation {other} for version {STS_VERSION}"),
            ))
        }
    };
    Ok(format!(
        "<{name}Response xmlns=\"{STS_XMLNS}\"><{name}Result>{result}</{name}Result><ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata></{name}Response>",
        request_id()
    ))
}

/// The claims of a web identity token that the emulator reads. The signature is not checked:
/// the emulator trusts any identity provider.
#[derive(Deserialize)]
struct WebIdentityClaims {
    sub: Option<String>,
    aud: Option<serde_json::Value>,
    iss: Option<String>,
    exp: Option<f64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    pod: Option<KubernetesPod>,
}

#[derive(Deserialize)]
struct KubernetesPod {
    uid: Option<String>,
}

fn web_identity_claims(token: &str) -> Option<WebIdentityClaims> {
    let mut parts = token.trim().split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn assume(
    shared: &Shared,
    form: &HashMap<String, String>,
    now: SystemTime,
) -> Result<String, ApiError> {
    let role_arn = required(form, "RoleArn", 20..=2048)?;
    let session_name = required(form, "RoleSessionName", 2..=64)?;
    let token = required(form, "WebIdentityToken", 4..=20000)?;
    if !session_name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
    {
        return Err(sts_error(
            "ValidationError",
            "1 validation error detected: Value at 'roleSessionName' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]*",
        ));
    }
    let config = &shared.service.config.temporary_credentials;
    let lifetime = match form.get("DurationSeconds") {
        None => config.duration,
        Some(s) => match s.parse::<u64>().map(Duration::from_secs) {
            Ok(d) if (MIN_DURATION..=MAX_DURATION).contains(&d) => d,
            _ => {
                return Err(sts_error(
                    "ValidationError",
                    "1 validation error detected: Value at 'durationSeconds' failed to satisfy constraint: Member must have value between 900 and 43200",
                ))
            }
        },
    };
    let Some(role) = RoleArn::parse(role_arn) else {
        return Err(sts_error("ValidationError", "Request ARN is invalid"));
    };
    let claims = web_identity_claims(token).ok_or_else(|| {
        sts_error(
            "InvalidIdentityToken",
            "Couldn't parse the web identity token",
        )
    })?;
    let Some(sub) = claims.sub.filter(|s| !s.is_empty()) else {
        return Err(sts_error(
            "InvalidIdentityToken",
            "The web identity token has no sub claim",
        ));
    };
    if let Some(exp) = claims.exp {
        let now_secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        if exp <= now_secs {
            return Err(sts_error("ExpiredTokenException", "Token expired"));
        }
    }
    let subject = claims
        .kubernetes
        .and_then(|k| k.pod)
        .and_then(|p| p.uid)
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| sub.clone());
    let session = role_session(&role, session_name, &subject);
    let assumed = format!(
        "<AssumedRoleUser><Arn>{}</Arn><AssumedRoleId>{}</AssumedRoleId></AssumedRoleUser>",
        xml_escape(&session.arn),
        xml_escape(&session.user_id)
    );
    let fresh = shared.temporary.issue(session, now, lifetime);
    let audience = match claims.aud {
        Some(serde_json::Value::String(a)) => a,
        Some(serde_json::Value::Array(a)) => a
            .first()
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    };
    Ok(format!(
        "<Credentials><AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey><SessionToken>{}</SessionToken><Expiration>{}</Expiration></Credentials>\
         <SubjectFromWebIdentityToken>{}</SubjectFromWebIdentityToken>{assumed}<Provider>{}</Provider><Audience>{}</Audience>",
        fresh.access_key_id,
        fresh.secret,
        fresh.session_token,
        rfc3339(fresh.expires),
        xml_escape(&sub),
        xml_escape(claims.iss.as_deref().unwrap_or_default()),
        xml_escape(&audience),
    ))
}

/// The session of `role` for one pod or task (`subject`), named `session_name` as STS shows it.
fn role_session(role: &RoleArn<'_>, session_name: &str, subject: &str) -> Session {
    // A stable stand-in for the role's unique id (AROA…).
    let digest = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        format!("{}:{}", role.account, role.name),
    ));
    let role_id: String = digest
        .iter()
        .take(9)
        .map(|b| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[usize::from(b % 32)]))
        .collect();
    Session {
        identity: format!("{}:assumed-role/{}/{subject}", role.account, role.name),
        arn: format!(
            "arn:aws:sts::{}:assumed-role/{}/{session_name}",
            role.account, role.name
        ),
        user_id: format!("AROA{role_id}:{session_name}"),
        account: role.account.to_owned(),
    }
}

fn caller_identity(
    shared: &Shared,
    req: &ReadRequest,
    body: &[u8],
    now: SystemTime,
) -> Result<String, ApiError> {
    let signed = req.signed(body);
    let config = &shared.service.config;
    let verified = sigv4::verify_with(
        &signed,
        STS_SERVICE,
        &config.credentials,
        Some(&shared.temporary),
        now,
        config.signature_max_skew,
    )?;
    let session = verified.session.unwrap_or_else(|| {
        // A long-term key's account is the one its quotas are counted in.
        let account = shared
            .quotas()
            .account_of(&verified.caller.identity)
            .to_owned();
        Session {
            arn: format!("arn:aws:iam::{account}:user/{}", verified.caller.identity),
            user_id: verified.caller.identity.clone(),
            identity: verified.caller.identity,
            account,
        }
    });
    Ok(format!(
        "<Arn>{}</Arn><UserId>{}</UserId><Account>{}</Account>",
        xml_escape(&session.arn),
        xml_escape(&session.user_id),
        xml_escape(&session.account)
    ))
}

/// `GET /v2/credentials/{task}`: fresh credentials for the task's role on every call.
fn container(shared: &Shared, req: &ReadRequest, task_id: &str) -> HttpResponse {
    let config = &shared.service.config.temporary_credentials;
    let fail = |status: StatusCode, code: &str, message: &str| {
        json_response(
            status,
            &serde_json::json!({"code": code, "message": message}),
        )
    };
    let Some(task) = config.tasks.iter().find(|t| t.id == task_id) else {
        return fail(
            StatusCode::NOT_FOUND,
            "NotFound",
            "no such task; see [temporary_credentials] tasks",
        );
    };
    let Some(given) = req.parts.headers.get(http::header::AUTHORIZATION) else {
        return fail(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the Authorization header (AWS_CONTAINER_AUTHORIZATION_TOKEN) is missing",
        );
    };
    if !bool::from(given.as_bytes().ct_eq(task.authorization_token.as_bytes())) {
        return fail(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "the Authorization header does not match the task's token",
        );
    }
    let Some(role) = RoleArn::parse(&task.role_arn) else {
        return fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "role_arn is invalid",
        );
    };
    let now = shared.clock.now();
    let session = role_session(&role, &task.id, &task.id);
    let fresh = shared.temporary.issue(session, now, config.duration);
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "AccessKeyId": fresh.access_key_id,
            "SecretAccessKey": fresh.secret,
            "Token": fresh.session_token,
            "Expiration": rfc3339(fresh.expires),
            "RoleArn": task.role_arn,
        }),
    )
}

#[cfg(test)]
mod tests;
