//! The service's error answers: `{"__type": ..., "message": ...}` with an HTTP status.

use serde::Serialize;

/// One error answer of the Metering Service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct ApiError {
    pub error_type: String,
    pub message: String,
    pub status: u16,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "__type")]
    error_type: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(error_type: &str, message: impl Into<String>) -> Self {
        let status = if error_type == "InternalServiceErrorException" {
            500
        } else {
            400
        };
        Self::with_status(error_type, message, status)
    }

    pub fn with_status(error_type: &str, message: impl Into<String>, status: u16) -> Self {
        Self {
            error_type: error_type.to_owned(),
            message: message.into(),
            status,
        }
    }

    pub fn body(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error_type: &self.error_type,
            message: &self.message,
        })
        .expect("a struct of two strings serialises")
    }

    pub fn serialization(message: impl Into<String>) -> Self {
        Self::new("SerializationException", message)
    }

    pub fn internal() -> Self {
        Self::new(
            "InternalServiceErrorException",
            "An internal error has occurred. Retry your request.",
        )
    }

    pub fn throttling() -> Self {
        Self::new("ThrottlingException", "Rate exceeded")
    }

    pub fn unavailable() -> Self {
        Self::with_status(
            "ServiceUnavailable",
            "The service is unavailable. Please try again later.",
            503,
        )
    }
}
