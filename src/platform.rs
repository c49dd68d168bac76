//! Where the agent runs (ECS, EKS, EC2) and where its AWS credentials come from.
//!
//! Detection, in order:
//! 1. A configured platform wins; nothing is probed.
//! 2. **ECS** (including Fargate): `ECS_CONTAINER_METADATA_URI_V4` or `ECS_CONTAINER_METADATA_URI`.
//! 3. **EKS** (including Fargate): `KUBERNETES_SERVICE_HOST`. IRSA (`AWS_WEB_IDENTITY_TOKEN_FILE`
//!    with `AWS_ROLE_ARN`) is recorded as the credential source, not required for detection.
//! 4. **EC2**: an IMDSv2 round trip (PUT a session token, then GET the instance id) within a
//!    short timeout. The endpoint is `AWS_EC2_METADATA_SERVICE_ENDPOINT` or
//!    `http://169.254.169.254`; `AWS_EC2_METADATA_DISABLED=true` skips the probe.
//! 5. Otherwise **Unknown**.
//!
//! The environment is a parameter ([`Env`]), so tests never read or change the process
//! environment, and the IMDS endpoint is explicit in [`ImdsSettings`], so tests probe only a
//! loopback server.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use serde::{Deserialize, Serialize};

use crate::http_client::{self, Authority, Connect};

/// A read-only view of environment variables.
pub type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Send + Sync);

/// The process environment, for production use.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Where the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Ecs,
    Eks,
    Ec2,
    Unknown,
}

impl Platform {
    /// Whether AWS accepts RegisterUsage here. It never does on EC2; on an unknown platform
    /// the call is left to AWS to answer.
    pub fn allows_register_usage(self) -> bool {
        !matches!(self, Platform::Ec2)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Ecs => "ecs",
            Platform::Eks => "eks",
            Platform::Ec2 => "ec2",
            Platform::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ecs" | "fargate" => Ok(Platform::Ecs),
            "eks" => Ok(Platform::Eks),
            "ec2" | "ami" => Ok(Platform::Ec2),
            "unknown" => Ok(Platform::Unknown),
            other => Err(format!(
                "unknown platform {other:?}; expected ecs, eks, ec2 or unknown"
            )),
        }
    }
}

/// What decided the platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum DetectedBy {
    Configured,
    EnvVar(String),
    Imds,
    Nothing,
}

/// Where the SDK's default chain will find credentials, as far as the environment tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialSource {
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    StaticEnv,
    /// IRSA: `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`.
    WebIdentity,
    /// `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`: the ECS task role.
    EcsTaskRole,
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`: a container credential endpoint (EKS Pod
    /// Identity, or ECS Anywhere and similar).
    ContainerEndpoint,
    /// `AWS_PROFILE`: a shared config profile.
    Profile,
    /// Nothing in the environment: the SDK falls back to the instance role through IMDS.
    InstanceRoleOrNone,
}

impl CredentialSource {
    pub fn from_env(env: Env<'_>) -> Self {
        let set = |name: &str| env(name).is_some_and(|v| !v.trim().is_empty());
        if set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY") {
            CredentialSource::StaticEnv
        } else if set("AWS_WEB_IDENTITY_TOKEN_FILE") && set("AWS_ROLE_ARN") {
            CredentialSource::WebIdentity
        } else if set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            CredentialSource::EcsTaskRole
        } else if set("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
            CredentialSource::ContainerEndpoint
        } else if set("AWS_PROFILE") {
            CredentialSource::Profile
        } else {
            CredentialSource::InstanceRoleOrNone
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            CredentialSource::StaticEnv => "static keys from AWS_ACCESS_KEY_ID",
            CredentialSource::WebIdentity => "IRSA (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN)",
            CredentialSource::EcsTaskRole => {
                "ECS task role (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)"
            }
            CredentialSource::ContainerEndpoint => {
                "container credential endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI)"
            }
            CredentialSource::Profile => "shared config profile (AWS_PROFILE)",
            CredentialSource::InstanceRoleOrNone => {
                "none in the environment; the SDK will try the instance role through IMDS"
            }
        }
    }
}

/// A credential set-up AWS Marketplace metering does not support on this platform, with the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialWarning {
    pub problem: String,
    pub fix: String,
}

/// Warnings for the credential source on this platform: EKS without IRSA, ECS without a task
/// role, long-term keys anywhere.
pub fn credential_warnings(platform: Platform, source: CredentialSource) -> Vec<CredentialWarning> {
    let warn = |problem: &str, fix: &str| CredentialWarning {
        problem: problem.to_owned(),
        fix: fix.to_owned(),
    };
    let mut out = Vec::new();
    match (platform, source) {
        (Platform::Eks, CredentialSource::WebIdentity) => {}
        (Platform::Eks, CredentialSource::ContainerEndpoint) => out.push(warn(
            "EKS without IRSA: credentials come from a container endpoint (EKS Pod Identity?), \
             which AWS Marketplace metering does not support",
            "annotate the pod's service account with eks.amazonaws.com/role-arn (IRSA) for a \
             role with the AWSMarketplaceMeteringRegisterUsage policy",
        )),
        (Platform::Eks, _) => out.push(warn(
            "EKS without IRSA (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN are not both set); \
             the node role and long-term keys are not supported for metering",
            "annotate the pod's service account with eks.amazonaws.com/role-arn (IRSA) for a \
             role with the AWSMarketplaceMeteringRegisterUsage policy",
        )),
        (Platform::Ecs, CredentialSource::EcsTaskRole | CredentialSource::ContainerEndpoint) => {}
        (Platform::Ecs, _) => out.push(warn(
            "ECS without a task role (neither AWS_CONTAINER_CREDENTIALS_RELATIVE_URI nor \
             AWS_CONTAINER_CREDENTIALS_FULL_URI is set)",
            "set taskRoleArn in the task definition to a role with the \
             AWSMarketplaceMeteringRegisterUsage policy",
        )),
        (Platform::Ec2, CredentialSource::StaticEnv) => out.push(warn(
            "EC2 with long-term keys in the environment instead of the instance role",
            "attach an instance profile whose role has the AWSMarketplaceMeteringRegisterUsage \
             policy, and remove AWS_ACCESS_KEY_ID from the environment",
        )),
        _ => {}
    }
    out
}

/// How to reach the EC2 instance metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsSettings {
    /// Base URL, `http://host[:port]`; only plain HTTP is spoken.
    pub endpoint: String,
    /// Budget for the whole probe (token and GET).
    pub timeout: Duration,
    /// `AWS_EC2_METADATA_DISABLED=true`: never probe.
    pub disabled: bool,
}

/// The IMDS address AWS documents; used only when no override is configured.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// Default probe budget: IMDS answers in milliseconds where it exists.
pub const DEFAULT_IMDS_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest IMDS response read.
const MAX_IMDS_BODY: usize = 4096;

impl ImdsSettings {
    /// From `AWS_EC2_METADATA_SERVICE_ENDPOINT` and `AWS_EC2_METADATA_DISABLED`.
    pub fn from_env(env: Env<'_>) -> Self {
        let endpoint = env("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_IMDS_ENDPOINT.to_owned());
        let disabled =
            env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        Self {
            endpoint,
            timeout: DEFAULT_IMDS_TIMEOUT,
            disabled,
        }
    }
}

/// Why the IMDS probe found no instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS probing is disabled (AWS_EC2_METADATA_DISABLED)")]
    Disabled,
    #[error("IMDS endpoint {0:?} is not an http://host[:port] URL")]
    BadEndpoint(String),
    #[error("IMDS did not answer within {0:?}")]
    Timeout(Duration),
    #[error("IMDS unreachable: {0}")]
    Unreachable(String),
    #[error("IMDS answered {step} with HTTP {status}")]
    Status { step: &'static str, status: u16 },
}

/// The result of detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlatformInfo {
    pub platform: Platform,
    pub detected_by: DetectedBy,
    pub credentials: CredentialSource,
    /// The EC2 instance id when IMDS answered.
    pub instance_id: Option<String>,
}

impl PlatformInfo {
    pub fn credential_warnings(&self) -> Vec<CredentialWarning> {
        credential_warnings(self.platform, self.credentials)
    }
}

/// Detection from environment variables alone (steps 2 and 3).
pub fn detect_from_env(env: Env<'_>) -> Option<(Platform, DetectedBy)> {
    let set = |name: &str| env(name).is_some_and(|v| !v.trim().is_empty());
    for var in [
        "ECS_CONTAINER_METADATA_URI_V4",
        "ECS_CONTAINER_METADATA_URI",
    ] {
        if set(var) {
            return Some((Platform::Ecs, DetectedBy::EnvVar(var.to_owned())));
        }
    }
    if set("KUBERNETES_SERVICE_HOST") {
        return Some((
            Platform::Eks,
            DetectedBy::EnvVar("KUBERNETES_SERVICE_HOST".to_owned()),
        ));
    }
    None
}

/// Decides the platform: the configured one, else environment variables, else IMDSv2.
pub async fn detect(
    configured: Option<Platform>,
    env: Env<'_>,
    imds: &ImdsSettings,
) -> PlatformInfo {
    let credentials = CredentialSource::from_env(env);
    if let Some(platform) = configured {
        return PlatformInfo {
            platform,
            detected_by: DetectedBy::Configured,
            credentials,
            instance_id: None,
        };
    }
    if let Some((platform, detected_by)) = detect_from_env(env) {
        return PlatformInfo {
            platform,
            detected_by,
            credentials,
            instance_id: None,
        };
    }
    match imds_instance_id(imds).await {
        Ok(id) => PlatformInfo {
            platform: Platform::Ec2,
            detected_by: DetectedBy::Imds,
            credentials,
            instance_id: Some(id),
        },
        Err(e) => {
            tracing::debug!(error = %e, "no EC2 instance metadata");
            PlatformInfo {
                platform: Platform::Unknown,
                detected_by: DetectedBy::Nothing,
                credentials,
                instance_id: None,
            }
        }
    }
}

/// IMDSv2: PUT `/latest/api/token`, then GET `/latest/meta-data/instance-id` with the token,
/// all within `settings.timeout`.
pub async fn imds_instance_id(settings: &ImdsSettings) -> Result<String, ImdsError> {
    if settings.disabled {
        return Err(ImdsError::Disabled);
    }
    let authority = imds_authority(&settings.endpoint)?;
    let probe = async {
        let token = imds_request(
            &authority,
            http::Method::PUT,
            "/latest/api/token",
            ("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
            "token PUT",
            settings.timeout,
        )
        .await?;
        imds_request(
            &authority,
            http::Method::GET,
            "/latest/meta-data/instance-id",
            ("x-aws-ec2-metadata-token", token.trim()),
            "instance-id GET",
            settings.timeout,
        )
        .await
    };
    tokio::time::timeout(settings.timeout, probe)
        .await
        .map_err(|_| ImdsError::Timeout(settings.timeout))?
        .map(|id| id.trim().to_owned())
}

fn imds_authority(endpoint: &str) -> Result<Authority, ImdsError> {
    let bad = || ImdsError::BadEndpoint(endpoint.to_owned());
    let uri: http::Uri = endpoint.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    Authority::of(&uri).ok_or_else(bad)
}

async fn imds_request(
    authority: &Authority,
    method: http::Method,
    path: &str,
    header: (&str, &str),
    step: &'static str,
    timeout: Duration,
) -> Result<String, ImdsError> {
    let unreachable = |e: &dyn fmt::Display| ImdsError::Unreachable(format!("{step}: {e}"));
    let connect_to = authority.socket_address();
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority.host_port())
        .header(header.0, header.1)
        .body(Empty::<Bytes>::new())
        .map_err(|e| unreachable(&e))?;
    let answer = http_client::send(Connect::Tcp(&connect_to), request, MAX_IMDS_BODY, timeout)
        .await
        .map_err(|e| match e {
            http_client::HttpError::Timeout(_) => ImdsError::Timeout(timeout),
            e => unreachable(&e),
        })?;
    let status = answer.status.as_u16();
    if status != 200 {
        return Err(ImdsError::Status { step, status });
    }
    String::from_utf8(answer.body.unwrap_or_default().to_vec()).map_err(|e| unreachable(&e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    pub(crate) fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + Send + Sync {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    /// An IMDS settings value aimed at a loopback port nobody listens on.
    pub(crate) async fn dead_imds() -> ImdsSettings {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        ImdsSettings {
            endpoint: format!("http://{addr}"),
            timeout: Duration::from_millis(500),
            disabled: false,
        }
    }

    /// A loopback IMDSv2: token on PUT, instance id on GET with the right token.
    pub(crate) async fn fake_imds(require_token: bool) -> (ImdsSettings, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = match (req.method().as_str(), req.uri().path()) {
                            ("PUT", "/latest/api/token")
                                if req
                                    .headers()
                                    .contains_key("x-aws-ec2-metadata-token-ttl-seconds") =>
                            {
                                (200, "tok-123")
                            }
                            ("GET", "/latest/meta-data/instance-id")
                                if !require_token
                                    || req
                                        .headers()
                                        .get("x-aws-ec2-metadata-token")
                                        .is_some_and(|t| t == "tok-123") =>
                            {
                                (200, "i-0123456789abcdef0")
                            }
                            ("GET", _) => (401, ""),
                            _ => (405, ""),
                        };
                        async move {
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (
            ImdsSettings {
                endpoint: format!("http://{addr}/"),
                timeout: Duration::from_secs(2),
                disabled: false,
            },
            hits,
        )
    }

    #[tokio::test]
    async fn ecs_is_detected_from_task_metadata_variables() {
        let imds = dead_imds().await;
        for var in [
            "ECS_CONTAINER_METADATA_URI_V4",
            "ECS_CONTAINER_METADATA_URI",
        ] {
            let env = env_of(&[
                (var, "http://169.254.170.2/v4/abc"),
                (
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    "/v2/credentials/x",
                ),
            ]);
            let info = detect(None, &env, &imds).await;
            assert_eq!(info.platform, Platform::Ecs);
            assert_eq!(info.detected_by, DetectedBy::EnvVar(var.to_owned()));
            assert_eq!(info.credentials, CredentialSource::EcsTaskRole);
            assert!(info.credential_warnings().is_empty());
        }
    }

    #[tokio::test]
    async fn eks_is_detected_and_irsa_recorded() {
        let imds = dead_imds().await;
        let env = env_of(&[
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token"),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/meterd"),
        ]);
        let info = detect(None, &env, &imds).await;
        assert_eq!(info.platform, Platform::Eks);
        assert_eq!(info.credentials, CredentialSource::WebIdentity);
        assert!(info.credential_warnings().is_empty());
    }

    #[tokio::test]
    async fn eks_without_irsa_and_ecs_without_task_role_warn_with_a_fix() {
        let imds = dead_imds().await;
        let env = env_of(&[("KUBERNETES_SERVICE_HOST", "10.0.0.1")]);
        let warnings = detect(None, &env, &imds).await.credential_warnings();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].problem.contains("IRSA") && warnings[0].fix.contains("role-arn"));

        let env = env_of(&[
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            ),
        ]);
        let warnings = detect(None, &env, &imds).await.credential_warnings();
        assert!(warnings[0].problem.contains("Pod Identity"), "{warnings:?}");

        let env = env_of(&[("ECS_CONTAINER_METADATA_URI_V4", "http://x")]);
        let warnings = detect(None, &env, &imds).await.credential_warnings();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].fix.contains("taskRoleArn"));
    }

    #[tokio::test]
    async fn ec2_is_detected_through_imdsv2_on_loopback() {
        let (imds, hits) = fake_imds(true).await;
        let env = env_of(&[]);
        let info = detect(None, &env, &imds).await;
        assert_eq!(info.platform, Platform::Ec2);
        assert_eq!(info.detected_by, DetectedBy::Imds);
        assert_eq!(info.instance_id.as_deref(), Some("i-0123456789abcdef0"));
        assert_eq!(hits.load(Ordering::SeqCst), 2, "one PUT and one GET");
    }

    #[tokio::test]
    async fn nothing_answering_means_unknown() {
        let imds = dead_imds().await;
        let info = detect(None, &env_of(&[]), &imds).await;
        assert_eq!(info.platform, Platform::Unknown);
        assert_eq!(info.detected_by, DetectedBy::Nothing);
    }

    #[tokio::test]
    async fn imds_that_never_answers_times_out_quickly() {
        // Accepts connections but never replies.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let imds = ImdsSettings {
            endpoint: format!("http://{addr}"),
            timeout: Duration::from_millis(200),
            disabled: false,
        };
        assert_eq!(
            imds_instance_id(&imds).await,
            Err(ImdsError::Timeout(Duration::from_millis(200)))
        );
    }

    #[tokio::test]
    async fn configured_platform_overrides_detection_without_probing() {
        let (imds, hits) = fake_imds(true).await;
        let env = env_of(&[("KUBERNETES_SERVICE_HOST", "10.0.0.1")]);
        let info = detect(Some(Platform::Ecs), &env, &imds).await;
        assert_eq!(info.platform, Platform::Ecs);
        assert_eq!(info.detected_by, DetectedBy::Configured);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn imds_settings_come_from_the_environment() {
        let env = env_of(&[
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                "http://127.0.0.1:1338/",
            ),
            ("AWS_EC2_METADATA_DISABLED", "TRUE"),
        ]);
        let s = ImdsSettings::from_env(&env);
        assert_eq!(s.endpoint, "http://127.0.0.1:1338/");
        assert!(s.disabled);
        let s = ImdsSettings::from_env(&env_of(&[]));
        assert_eq!(s.endpoint, DEFAULT_IMDS_ENDPOINT);
        assert!(!s.disabled);
        let authority = imds_authority("http://127.0.0.1:1338/").expect("an http endpoint");
        assert_eq!(authority.host_port(), "127.0.0.1:1338");
        let v6 = imds_authority("http://[fd00:ec2::254]/").expect("an IPv6 endpoint");
        assert_eq!(v6.host_port(), "[fd00:ec2::254]:80");
        assert_eq!(v6.socket_address(), "fd00:ec2::254:80");
        assert!(imds_authority("https://example.com").is_err());
    }

    #[tokio::test]
    async fn disabled_imds_is_never_contacted() {
        let (mut imds, hits) = fake_imds(true).await;
        imds.disabled = true;
        let info = detect(None, &env_of(&[]), &imds).await;
        assert_eq!(info.platform, Platform::Unknown);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn platform_parses_and_ec2_never_registers() {
        assert_eq!("EKS".parse::<Platform>(), Ok(Platform::Eks));
        assert_eq!("fargate".parse::<Platform>(), Ok(Platform::Ecs));
        assert!("mainframe".parse::<Platform>().is_err());
        assert!(!Platform::Ec2.allows_register_usage());
        assert!(Platform::Eks.allows_register_usage());
        assert_eq!(
            serde_json::to_string(&Platform::Ec2).expect("json"),
            "\"ec2\""
        );
    }
}
