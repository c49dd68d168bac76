//! The one serve loop for every HTTP server meterd runs: the agent's local API (TCP and the
//! Unix socket) and the emulator. Connection hygiene lives here once:
//!
//! - **Bounded connections.** A [`ConnectionLimits`] is shared by all of a server's listeners,
//!   so `max_connections` bounds the whole server, not each listener. When every slot is
//!   taken, each listener holds one accepted connection until a slot frees, and further
//!   connections wait in the kernel backlog.
//! - **Reserved probe slots.** A few more slots serve only health probes: when every regular
//!   slot is held (by slow clients, say), `/healthz` and `/readyz` are still answered, so an
//!   orchestrator does not restart a healthy process. Any other request on such a slot gets
//!   503 and the connection closes.
//! - **Timeouts.** Request headers must arrive within [`ServeSettings::header_read_timeout`]
//!   (hyper's timer, which also closes idle keep-alive connections); a body must arrive within
//!   its own bound ([`read_body`]); TCP keep-alive finds dead peers.
//! - **Accept errors back off** (out of file descriptors, say) instead of spinning.
//! - **Graceful shutdown:** stop accepting, let in-flight requests finish within the drain
//!   timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a client may take to send a request's headers (and how long an idle keep-alive
/// connection is kept).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body once its headers arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive: idle time before the first probe.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// Slots beyond `max_connections` that serve only health probes.
pub const PROBE_SLOTS: usize = 4;
/// The most any server may be configured to serve at once.
pub const MAX_CONNECTIONS_CEILING: usize = 65_536;

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listening socket a server can be served on.
pub trait Acceptor: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(&mut self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Acceptor for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&mut self) -> std::io::Result<Self::Stream> {
        let (stream, _) = self.accept().await?;
        stream.set_nodelay(true)?;
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE))?;
        Ok(stream)
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&mut self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Which kind of slot a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A regular slot: any request.
    Regular,
    /// A reserved slot, taken only while every regular slot is held: health probes only.
    Probe,
}

/// The connection slots of one server, shared by all its listeners.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    regular: Arc<Semaphore>,
    probe: Arc<Semaphore>,
}

impl ConnectionLimits {
    /// `max_connections` regular slots (at least 1, at most [`MAX_CONNECTIONS_CEILING`]) and
    /// `probe_slots` reserved ones.
    pub fn new(max_connections: usize, probe_slots: usize) -> Self {
        Self {
            regular: Arc::new(Semaphore::new(
                max_connections.clamp(1, MAX_CONNECTIONS_CEILING),
            )),
            probe: Arc::new(Semaphore::new(probe_slots.min(MAX_CONNECTIONS_CEILING))),
        }
    }

    /// A regular slot when one is free, else a probe slot, else waits for either.
    async fn acquire(&self) -> (OwnedSemaphorePermit, Slot) {
        if let Ok(p) = self.regular.clone().try_acquire_owned() {
            return (p, Slot::Regular);
        }
        if let Ok(p) = self.probe.clone().try_acquire_owned() {
            return (p, Slot::Probe);
        }
        // The semaphores are never closed, so acquiring only waits.
        loop {
            tokio::select! {
                Ok(p) = self.regular.clone().acquire_owned() => return (p, Slot::Regular),
                Ok(p) = self.probe.clone().acquire_owned() => return (p, Slot::Probe),
                else => std::future::pending::<()>().await,
            }
        }
    }
}

/// Timeouts of one server.
#[derive(Debug, Clone, Copy)]
pub struct ServeSettings {
    pub header_read_timeout: Duration,
    /// After `stop`, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

pub type HttpResponse = Response<Full<Bytes>>;

/// Serves one listener until `stop` fires, then lets in-flight requests finish (up to the
/// drain timeout). `handler` answers each request; an `Err` closes the connection without an
/// answer (the emulator's dropped-connection fault).
pub async fn serve<A, H, Fut, E>(
    mut listener: A,
    limits: ConnectionLimits,
    settings: ServeSettings,
    stop: CancellationToken,
    handler: H,
) where
    A: Acceptor,
    H: Fn(Request<Incoming>, Slot) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<HttpResponse, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            s = listener.accept_stream() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                    // Out of file descriptors and similar: wait, and wait longer each time.
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = ACCEPT_BACKOFF_FIRST;
        // A slot is taken after accepting, so an idle listener holds none; while this
        // connection waits for one, the listener accepts nothing more.
        let (permit, slot) = tokio::select! {
            _ = stop.cancelled() => break,
            held = limits.acquire() => held,
        };
        let handler = handler.clone();
        let service = service_fn(move |req| handler(req, slot));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .keep_alive(slot == Slot::Regular)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(
            async move {
                let _permit = permit;
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("connection", ?slot)),
        );
    }
    drop(listener);
    if tokio::time::timeout(settings.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the drain timeout");
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("could not read the body: {0}")]
    Read(String),
}

/// Reads a whole body of at most `limit` bytes within `timeout`. A declared length over the
/// limit is refused before anything is read.
pub async fn read_body(
    headers: &http::HeaderMap,
    body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(BodyError::Timeout(timeout)),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge { limit })
        }
        Ok(Err(e)) => Err(BodyError::Read(e.to_string())),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// How many `/slow` requests are in the handler now, and the most there ever were.
    #[derive(Default)]
    struct InHandler {
        now: std::sync::atomic::AtomicUsize,
        peak: std::sync::atomic::AtomicUsize,
    }

    /// Answers `/slow` only after `release` fires; everything else at once, naming its slot.
    async fn start(
        limits: ConnectionLimits,
        settings: ServeSettings,
        release: CancellationToken,
    ) -> (std::net::SocketAddr, CancellationToken) {
        start_counting(limits, settings, release, Arc::default()).await
    }

    async fn start_counting(
        limits: ConnectionLimits,
        settings: ServeSettings,
        release: CancellationToken,
        in_handler: Arc<InHandler>,
    ) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            limits,
            settings,
            stop.clone(),
            move |req: Request<Incoming>, slot| {
                let (release, in_handler) = (release.clone(), in_handler.clone());
                async move {
                    if req.uri().path() == "/slow" {
                        use std::sync::atomic::Ordering::SeqCst;
                        let n = in_handler.now.fetch_add(1, SeqCst) + 1;
                        in_handler.peak.fetch_max(n, SeqCst);
                        release.cancelled().await;
                        in_handler.now.fetch_sub(1, SeqCst);
                    }
                    if req.uri().path() == "/body" {
                        let (parts, body) = req.into_parts();
                        let body =
                            read_body(&parts.headers, body, 1024, Duration::from_millis(200)).await;
                        let text = match body {
                            Ok(b) => format!("body {}", b.len()),
                            Err(e) => format!("error {e}"),
                        };
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))));
                    }
                    Ok(Response::new(Full::new(Bytes::from(format!("{slot:?}")))))
                }
            },
        ));
        (addr, stop)
    }

    async fn send(addr: std::net::SocketAddr, raw: &str) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(raw.as_bytes()).await.expect("write");
        s
    }

    async fn answer(mut s: TcpStream) -> String {
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("an answer in time")
            .expect("read");
        out
    }

    const GET_CLOSE: &str = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    const SLOW: &str = "GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn probes_are_answered_when_every_regular_slot_is_held() {
        let release = CancellationToken::new();
        let (addr, _stop) = start(
            ConnectionLimits::new(2, 1),
            ServeSettings::default(),
            release.clone(),
        )
        .await;
        // Both regular slots are taken by requests that do not finish. Connections are
        // accepted in the order they were made, so the next one finds no regular slot.
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(send(addr, SLOW).await);
        }
        let probe = answer(send(addr, GET_CLOSE).await).await;
        assert!(probe.ends_with("Probe"), "{probe}");
        release.cancel();
        for s in held {
            let a = answer(s).await;
            assert!(a.ends_with("Regular"), "{a}");
        }
        // Regular slots are free again: a new connection gets one.
        let after = answer(send(addr, GET_CLOSE).await).await;
        assert!(after.ends_with("Regular"), "{after}");
    }

    #[tokio::test]
    async fn limits_are_shared_by_every_listener_of_a_server() {
        let limits = ConnectionLimits::new(1, 0);
        let release = CancellationToken::new();
        let in_handler = Arc::new(InHandler::default());
        let settings = ServeSettings::default();
        let (a, _sa) = start_counting(
            limits.clone(),
            settings,
            release.clone(),
            in_handler.clone(),
        )
        .await;
        let (b, _sb) = start_counting(
            limits.clone(),
            settings,
            release.clone(),
            in_handler.clone(),
        )
        .await;
        // One slow request on each listener: with one slot between them, one waits.
        let mut first = send(a, SLOW).await;
        let mut second = send(b, SLOW).await;
        let (mut a_buf, mut b_buf) = ([0u8; 1], [0u8; 1]);
        let early = tokio::select! {
            r = first.read(&mut a_buf) => Some(r),
            r = second.read(&mut b_buf) => Some(r),
            _ = tokio::time::sleep(Duration::from_millis(300)) => None,
        };
        assert!(
            early.is_none(),
            "a slow request was answered before release"
        );
        assert_eq!(
            in_handler.peak.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "both listeners served a connection at once"
        );
        release.cancel();
        assert!(answer(first).await.ends_with("Regular"));
        assert!(answer(second).await.ends_with("Regular"));
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_refused_and_frees_its_slot() {
        let (addr, _stop) = start(
            ConnectionLimits::new(1, 0),
            ServeSettings::default(),
            CancellationToken::new(),
        )
        .await;
        let stalled = send(
            addr,
            "POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\nabc",
        )
        .await;
        let a = answer(stalled).await;
        assert!(a.contains("did not arrive within"), "{a}");
        // The only slot is free again.
        let b = answer(
            send(
                addr,
                "POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
            )
            .await,
        )
        .await;
        assert!(b.ends_with("body 3"), "{b}");
    }

    #[tokio::test]
    async fn headers_that_stall_close_the_connection() {
        let settings = ServeSettings {
            header_read_timeout: Duration::from_millis(200),
            ..ServeSettings::default()
        };
        let (addr, _stop) = start(
            ConnectionLimits::new(1, 0),
            settings,
            CancellationToken::new(),
        )
        .await;
        let half = send(addr, "GET / HTTP/1.1\r\nHost:").await;
        // hyper answers 408 (or closes): either way the slot is released.
        let _ = answer(half).await;
        let idle = TcpStream::connect(addr).await.expect("connect");
        let _ = answer(idle).await;
        let ok = answer(send(addr, GET_CLOSE).await).await;
        assert!(ok.ends_with("Regular"), "{ok}");
    }

    #[tokio::test]
    async fn accepted_tcp_connections_have_keepalive_and_nodelay() {
        let mut listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let stream = listener.accept_stream().await.expect("accept");
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"), "keep-alive is on");
        assert_eq!(
            sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            TCP_KEEPALIVE
        );
        assert!(stream.nodelay().expect("TCP_NODELAY"));
    }

    /// A listener whose accept fails a few times, then yields one stream.
    struct Flaky {
        failures: usize,
        stream: Option<tokio::io::DuplexStream>,
        attempts: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Acceptor for Flaky {
        type Stream = tokio::io::DuplexStream;
        async fn accept_stream(&mut self) -> std::io::Result<Self::Stream> {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.failures > 0 {
                self.failures -= 1;
                return Err(std::io::Error::from_raw_os_error(24)); // EMFILE
            }
            match self.stream.take() {
                Some(s) => Ok(s),
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_instead_of_spinning() {
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = Flaky {
            failures: usize::MAX,
            stream: None,
            attempts: attempts.clone(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            ConnectionLimits::new(1, 0),
            ServeSettings::default(),
            stop.clone(),
            |_req: Request<Incoming>, _slot| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            },
        ));
        // Ten seconds of failing accepts: 10+20+40+...+1000 ms, then one a second.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
        assert!((8..=20).contains(&n), "{n} accept attempts in 10 s");
        stop.cancel();
        task.await.expect("serve ends on stop");
    }
}
