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
    loader.load().await
}

/// The Metering Service client.
pub async fn build_client(settings: &AwsSettings) -> Client {
    Client::new(&sdk_config(settings).await)
}

/// The License Manager client (contract pricing), from the same settings.
pub async fn build_license_client(settings: &AwsSettings) -> aws_sdk_licensemanager::Client {
    aws_sdk_licensemanager::Client::new(&sdk_config(settings).await)
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
