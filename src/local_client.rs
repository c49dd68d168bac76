//! A minimal HTTP/1 client for the agent's local API, used by `meterd report`, `status` and
//! `health` (images without curl still get health checks).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use crate::config::Config;
use crate::http_client::{self, Connect, HttpError};

/// Where the local API listens, as the configuration says. The Unix socket wins when set.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(String),
    Unix(String),
}

impl Target {
    pub fn from_config(config: &Config) -> Self {
        if !config.server.unix_socket.is_empty() {
            Target::Unix(config.server.unix_socket.clone())
        } else {
            Target::Tcp(config.server.listen.clone())
        }
    }
}

/// The largest answer read from the local API.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Sends one request and returns the status and body.
pub async fn call(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    token: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost");
    if body.is_some() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = token {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let to = match target {
        Target::Tcp(addr) => Connect::Tcp(addr),
        Target::Unix(path) => Connect::Unix(path),
    };
    match http_client::send(to, request, MAX_ANSWER_BYTES, timeout).await {
        Ok(answer) => Ok((answer.status, answer.body.unwrap_or_default())),
        Err(HttpError::Timeout(_)) => {
            Err(anyhow::anyhow!("no answer from meterd within {timeout:?}"))
        }
        Err(e) => Err(e.into()),
    }
}
