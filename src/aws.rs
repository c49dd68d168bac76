//! The one place that builds the Metering Service client and classifies its failures.
//!
//! SDK retries are turned off: meterd retries in exactly one layer (its own), deciding in
//! [`CallFailure::is_retryable`] which failures are worth another attempt.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_marketplacemetering::config::http::HttpResponse;
use aws_sdk_marketplacemetering::config::Credentials;
use aws_sdk_marketplacemetering::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_marketplacemetering::Client;

/// How to reach the Metering Service. Empty values fall back to the SDK's provider chains.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// Fixed credentials (the demo and tests); `None` uses the SDK chain (IRSA, ECS, IMDS, env).
    pub static_credentials: Option<(String, String)>,
    pub operation_timeout: Option<Duration>,
}

impl AwsSettings {
    /// The agent's settings: `[aws]`, the SDK's credential chain, `sending.call_timeout`.
    /// A locked test build without `aws.endpoint_url` talks to its baked endpoint.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let baked = crate::entitlement::baked::BAKED.baked_endpoint();
        let endpoint = match config.aws.endpoint_url.as_str() {
            "" => baked.unwrap_or_default().to_owned(),
            configured => configured.to_owned(),
        };
        Self {
            region: Some(config.aws.region.clone()),
            endpoint_url: Some(endpoint),
            static_credentials: None,
            operation_timeout: Some(config.sending.call_timeout),
        }
    }
}

/// The SDK configuration every client shares: SDK retries disabled (meterd retries itself),
/// timeouts, region, endpoint and credentials from `settings`.
async fn sdk_config(settings: &AwsSettings) -> aws_config::SdkConfig {
    loader(settings).load().await
}

fn loader(settings: &AwsSettings) -> aws_config::ConfigLoader {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_timeout(
                    settings
                        .operation_timeout
                        .unwrap_or(Duration::from_secs(30)),
                )
                .build(),
        );
    if let Some(region) = settings.region.as_deref().filter(|r| !r.is_empty()) {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = settings.endpoint_url.as_deref().filter(|u| !u.is_empty()) {
        loader = loader.endpoint_url(url);
    }
    if let Some((key, secret)) = &settings.static_credentials {
        loader = loader.credentials_provider(Credentials::new(
            key.clone(),
            secret.clone(),
            None,
            None,
            "meterd-static",
        ));
    }
    loader
}

/// The Metering Service client.
pub async fn build_client(settings: &AwsSettings) -> Client {
    Client::new(&sdk_config(settings).await)
}

/// The License Manager client (contract pricing), from the same settings.
pub async fn build_license_client(settings: &AwsSettings) -> aws_sdk_licensemanager::Client {
    aws_sdk_licensemanager::Client::new(&sdk_config(settings).await)
}

/// The License Manager client of a buyer outside AWS (License Manager for Anywhere): its
/// credentials come from the buyer's license token ([`LicenseTokenCredentials`]), not from
/// the SDK's chain; region and endpoint from `settings`.
pub async fn build_license_client_from_token(
    settings: &AwsSettings,
    token_file: &std::path::Path,
    role_arn: &str,
) -> aws_sdk_licensemanager::Client {
    let anonymous = loader(settings).no_credentials().load().await;
    let provider = LicenseTokenCredentials {
        token_file: token_file.to_owned(),
        role_arn: role_arn.to_owned(),
        // GetAccessToken is modelled as signed, but the token is the buyer's only credential.
        license_manager: aws_sdk_licensemanager::Client::from_conf(
            aws_sdk_licensemanager::config::Builder::from(&anonymous)
                .allow_no_auth()
                .build(),
        ),
        sts: aws_sdk_sts::Client::new(&anonymous),
    };
    let config = aws_sdk_licensemanager::config::Builder::from(&anonymous)
        .credentials_provider(provider)
        .build();
    aws_sdk_licensemanager::Client::from_conf(config)
}

/// Credentials from a License Manager license token, the way AWS describes it for buyers
/// without the AWS credential chain: the token (a file the buyer provides) goes to
/// GetAccessToken, unsigned; the access token to STS AssumeRoleWithWebIdentity for the role
/// (`AWSLicenseManagerConsumptionRole`); the role's temporary credentials sign the calls. The
/// SDK caches them and asks again before they expire.
#[derive(Debug)]
pub struct LicenseTokenCredentials {
    token_file: std::path::PathBuf,
    role_arn: String,
    license_manager: aws_sdk_licensemanager::Client,
    sts: aws_sdk_sts::Client,
}

impl LicenseTokenCredentials {
    async fn fetch(&self) -> aws_credential_types::provider::Result {
        use aws_credential_types::provider::error::CredentialsError;
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            CredentialsError::not_loaded(format!(
                "contract.license_token_file {}: {e}",
                self.token_file.display()
            ))
        })?;
        let access = self
            .license_manager
            .get_access_token()
            .token(token.trim())
            .send()
            .await
            .map_err(|e| {
                CredentialsError::provider_error(format!(
                    "GetAccessToken: {}",
                    CallFailure::from_sdk(&e)
                ))
            })?;
        let access = access.access_token().unwrap_or_default();
        let assumed = self
            .sts
            .assume_role_with_web_identity()
            .role_arn(&self.role_arn)
            .role_session_name("meterd")
            .web_identity_token(access)
            .send()
            .await
            .map_err(|e| {
                CredentialsError::provider_error(format!(
                    "AssumeRoleWithWebIdentity: {}",
                    CallFailure::from_sdk(&e)
                ))
            })?;
        let Some(c) = assumed.credentials() else {
            return Err(CredentialsError::provider_error(
                "AssumeRoleWithWebIdentity returned no credentials",
            ));
        };
        let expires = std::time::SystemTime::try_from(*c.expiration()).ok();
        Ok(aws_credential_types::Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_owned()),
            expires,
            "meterd-license-token",
        ))
    }
}

impl aws_credential_types::provider::ProvideCredentials for LicenseTokenCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(self.fetch())
    }
}

/// Why a call to the Metering Service did not succeed, reduced to what callers branch on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_deref().unwrap_or("transport error"))]
pub struct CallFailure {
    /// The service's error code (`__type`), or `None` for transport failures and timeouts.
    pub code: Option<String>,
    pub message: String,
    /// HTTP status when a response arrived.
    pub status: Option<u16>,
}

impl CallFailure {
    pub fn from_sdk<E>(err: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match err {
            SdkError::ServiceError(service) => {
                let inner = service.err();
                let status = Some(service.raw().status().as_u16());
                CallFailure {
                    code: inner.code().map(str::to_owned),
                    message: inner
                        .message()
                        .map(str::to_owned)
                        .unwrap_or_else(|| inner.to_string()),
                    status,
                }
            }
            other => CallFailure {
                code: None,
                message: DisplayErrorContext(other).to_string(),
                status: other.raw_response().map(|r| r.status().as_u16()),
            },
        }
    }

    pub fn code_is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// Throttling, server faults and transport failures are worth retrying; everything else
    /// is an answer that will not change by asking again. The status decides first: any 5xx
    /// (or 429) is transient whatever its code, so an unlisted server fault is not permanent.
    pub fn is_retryable(&self) -> bool {
        if self.status.is_some_and(|s| s >= 500 || s == 429) {
            return true;
        }
        match self.code.as_deref() {
            None => true,
            Some(code) => matches!(
                code,
                "ThrottlingException"
                    | "Throttling"
                    | "RateLimitExceededException"
                    | "TooManyRequestsException"
                    | "InternalServiceErrorException"
                    | "ServiceUnavailableException"
                    | "InternalFailure"
                    | "ServiceUnavailable"
                    | "RequestTimeout"
                    | "RequestTimeoutException"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: Option<&str>, status: Option<u16>) -> CallFailure {
        CallFailure {
            code: code.map(str::to_owned),
            message: "m".to_owned(),
            status,
        }
    }

    #[test]
    fn retryable_follows_the_status_then_the_code() {
        let table: &[(Option<&str>, Option<u16>, bool)] = &[
            // Transport failures and timeouts: no answer at all.
            (None, None, true),
            (None, Some(502), true),
            // Any 5xx, listed code or not.
            (Some("InternalServiceErrorException"), Some(500), true),
            (Some("SomeNewServerFault"), Some(500), true),
            (Some("SomeNewServerFault"), Some(503), true),
            (Some("InvalidProductCodeException"), Some(500), true),
            (None, Some(504), true),
            // Throttling, by code or by status.
            (Some("ThrottlingException"), Some(400), true),
            (Some("Throttling"), Some(400), true),
            (Some("TooManyRequestsException"), Some(429), true),
            (Some("Unlisted"), Some(429), true),
            // Answers that do not change by asking again.
            (Some("InvalidProductCodeException"), Some(400), false),
            (Some("InvalidUsageDimensionException"), Some(400), false),
            (Some("CustomerNotEntitledException"), Some(400), false),
            (Some("AccessDeniedException"), Some(403), false),
            (Some("UnrecognizedClientException"), Some(403), false),
            (Some("InvalidSignatureException"), Some(400), false),
            (Some("ValidationException"), Some(400), false),
            (Some("DuplicateRequestException"), Some(400), false),
            (Some("TimestampOutOfBoundsException"), Some(400), false),
            (Some("SomeNewClientError"), Some(400), false),
            (Some("SomeNewClientError"), Some(404), false),
        ];
        for &(code, status, retryable) in table {
            assert_eq!(
                failure(code, status).is_retryable(),
                retryable,
                "code {code:?} status {status:?}"
            );
        }
    }
}
