//! The one small HTTP/1 client: one request over a fresh TCP or Unix-socket connection, with a
//! timeout and a bounded body. Used by the local API client (`meterd report`, `status`,
//! `health`), the IMDS probe and doctor's `Date` probe.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;
use hyper_util::rt::TokioIo;

/// A URL's authority, parsed once: the `Host` forms and the socket address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    original: String,
    host_port: String,
}

impl Authority {
    /// The authority of `uri`, port 80 when it names none.
    pub fn of(uri: &http::Uri) -> Option<Self> {
        let authority = uri.authority()?;
        Some(Self {
            original: authority.as_str().to_owned(),
            host_port: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
        })
    }

    /// The authority as written in the URL.
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// `host:port`, an IPv6 host in brackets.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    /// The address to connect to: `host:port` without the brackets of an IPv6 host.
    pub fn socket_address(&self) -> String {
        self.host_port.replace(['[', ']'], "")
    }
}

/// Where to connect.
#[derive(Debug, Clone, Copy)]
pub enum Connect<'a> {
    /// `host:port`.
    Tcp(&'a str),
    /// A Unix socket path.
    Unix(&'a str),
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("{0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// What came back.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// At most `max_body` bytes; `None` when the body was not read (`max_body` 0).
    pub body: Option<Bytes>,
}

/// Sends `request` to `to` over a new connection and reads at most `max_body` bytes of the
/// answer (none with `max_body` 0, for a probe that wants only headers), all within `timeout`.
pub async fn send<B>(
    to: Connect<'_>,
    request: Request<B>,
    max_body: usize,
    timeout: Duration,
) -> Result<Answer, HttpError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let exchange = async {
        match to {
            Connect::Tcp(address) => {
                let stream = tokio::net::TcpStream::connect(address).await?;
                exchange(stream, request, max_body).await
            }
            Connect::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await?;
                exchange(stream, request, max_body).await
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

async fn exchange<S, B>(
    stream: S,
    request: Request<B>,
    max_body: usize,
) -> Result<Answer, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let answer = async {
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = if max_body == 0 {
            None
        } else {
            Some(
                Limited::new(body, max_body)
                    .collect()
                    .await
                    .map_err(HttpError::Body)?
                    .to_bytes(),
            )
        };
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
    .await;
    conn.abort();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_defaults_the_port_and_strips_brackets_only_for_the_socket() {
        let a = Authority::of(&"http://[::1]/x".parse().expect("uri")).expect("authority");
        assert_eq!(a.as_str(), "[::1]");
        assert_eq!(a.host_port(), "[::1]:80");
        assert_eq!(a.socket_address(), "::1:80");
        let b = Authority::of(&"http://127.0.0.1:1338/".parse().expect("uri")).expect("authority");
        assert_eq!(b.host_port(), "127.0.0.1:1338");
        assert!(Authority::of(&"/relative".parse().expect("uri")).is_none());
    }
}
