//! A minimal HTTP/1 client for the agent's local API, used by `meterd report`, `status` and
//! `health` (images without curl still get health checks).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::config::Config;

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

/// Sends one request and returns the status and body.
pub async fn call(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    token: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    tokio::time::timeout(timeout, async {
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
        let response = match target {
            Target::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
                send(stream, request).await?
            }
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path.as_str()).await?;
                send(stream, request).await?
            }
        };
        Ok(response)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer from meterd within {timeout:?}"))?
}

async fn send<S>(stream: S, request: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
