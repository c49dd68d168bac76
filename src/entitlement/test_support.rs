//! Test-only helpers: RSA keys generated once per test process, token signing, and a tiny
//! loopback stand-in for the Metering Service (AWS JSON 1.1 over HTTP on 127.0.0.1).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::RsaPrivateKey;
use serde_json::{json, Value};

use crate::aws::{build_client, AwsSettings};
use crate::clock::ManualClock;
use crate::entitlement::RetryEvent;

fn generate(bits: usize) -> RsaPrivateKey {
    RsaPrivateKey::new(&mut rand::thread_rng(), bits).expect("rsa keygen")
}

/// The key the tests' keyring trusts.
pub(crate) fn trusted_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| generate(2048))
}

/// A key nobody trusts.
pub(crate) fn untrusted_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| generate(2048))
}

pub(crate) fn public_pem(key: &RsaPrivateKey) -> String {
    key.to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("encode public key")
}

pub(crate) fn trusted_public_pem() -> String {
    public_pem(trusted_key())
}

pub(crate) fn untrusted_public_pem() -> String {
    public_pem(untrusted_key())
}

/// A keyring trusting [`trusted_key`] for `version` and nothing else.
pub(crate) fn test_keyring(version: u32) -> crate::entitlement::Keyring {
    let mut ring = crate::entitlement::Keyring::empty();
    ring.add_pem(version, "test:trusted", &trusted_public_pem())
        .expect("test key joins the keyring");
    ring
}

/// Signs `claims` with `alg` (an RSA algorithm) under `key`.
pub(crate) fn sign_rsa(alg: Algorithm, key: &RsaPrivateKey, claims: &Value) -> String {
    let der = key.to_pkcs1_der().expect("pkcs1 der");
    let mut header = Header::new(alg);
    header.typ = Some("JWT".to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_der(der.as_bytes())).expect("sign")
}

pub(crate) fn sign_ps256(key: &RsaPrivateKey, claims: &Value) -> String {
    sign_rsa(Algorithm::PS256, key, claims)
}

/// The claims AWS puts in a RegisterUsage token (camelCase, as shipped integrations read).
pub(crate) fn claims(product_code: &str, nonce: &str, version: u32) -> Value {
    json!({
        "productCode": product_code,
        "publicKeyVersion": version,
        "nonce": nonce,
        "iat": 1_700_000_000,
    })
}

/// How the stub answers one request: (HTTP status, JSON body), from the request body.
pub(crate) type Reply = Arc<dyn Fn(&Value) -> (u16, Value) + Send + Sync>;

pub(crate) fn error_reply(status: u16, code: &str) -> Reply {
    let code = code.to_owned();
    Arc::new(move |_| {
        (
            status,
            json!({"__type": code, "message": format!("stub says {code}")}),
        )
    })
}

/// A RegisterUsage success signed by `key`, echoing the request's nonce.
pub(crate) fn register_ok(key: &'static RsaPrivateKey, rotation: Option<f64>) -> Reply {
    Arc::new(move |req| {
        let product = req["ProductCode"].as_str().unwrap_or_default();
        let nonce = req["Nonce"].as_str().unwrap_or_default();
        let version = req["PublicKeyVersion"].as_u64().unwrap_or(0) as u32;
        let token = sign_ps256(key, &claims(product, nonce, version));
        let mut body = json!({ "Signature": token });
        if let Some(ts) = rotation {
            body["PublicKeyRotationTimestamp"] = json!(ts);
        }
        (200, body)
    })
}

/// One request as the stub saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub target: String,
    pub body: Value,
}

/// A loopback Metering Service stand-in: answers from a script, then from a fallback.
pub(crate) struct Stub {
    pub addr: SocketAddr,
    script: Arc<Mutex<VecDeque<Reply>>>,
    fallback: Arc<Mutex<Reply>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Stub {
    pub(crate) async fn start(fallback: Reply) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let script: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        let fallback = Arc::new(Mutex::new(fallback));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (s, f, v) = (script.clone(), fallback.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, f, v) = (s.clone(), f.clone(), v.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (s, f, v) = (s.clone(), f.clone(), v.clone());
                        async move {
                            let target = req
                                .headers()
                                .get("x-amz-target")
                                .and_then(|t| t.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let body = req.into_body().collect().await?.to_bytes();
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            v.lock().expect("seen").push(Seen {
                                target,
                                body: body.clone(),
                            });
                            let reply = s
                                .lock()
                                .expect("script")
                                .pop_front()
                                .unwrap_or_else(|| f.lock().expect("fallback").clone());
                            let (status, out) = reply(&body);
                            let response = hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-amz-json-1.1")
                                .header("date", "Sun, 22 Nov 2026 10:00:00 GMT")
                                .body(Full::new(Bytes::from(out.to_string())))
                                .expect("response");
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Stub {
            addr,
            script,
            fallback,
            seen,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues replies used before the fallback, in order.
    pub(crate) fn push(&self, reply: Reply) {
        self.script.lock().expect("script").push_back(reply);
    }

    pub(crate) fn set_fallback(&self, reply: Reply) {
        *self.fallback.lock().expect("fallback") = reply;
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// An SDK client aimed at this stub, with fixed credentials and region.
    pub(crate) async fn client(&self) -> aws_sdk_marketplacemetering::Client {
        build_client(&AwsSettings {
            region: Some("us-east-2".to_owned()),
            endpoint_url: Some(self.url()),
            static_credentials: Some(("AKIDTEST".to_owned(), "secret".to_owned())),
            operation_timeout: Some(Duration::from_secs(10)),
        })
        .await
    }
}

/// What a retrying operation is given to announce each retry.
pub(crate) type Observer = Box<dyn Fn(&RetryEvent) + Send + Sync>;

/// Drives a retrying operation by its observer: runs `start(observer)` in a task and, at
/// each announced retry, calls `on_event` and sets `clock` to the retry's time. Returns the
/// result and every event. (The integration tests' twin is `meterd_test_support::drive_retries`;
/// unit tests cannot link that crate.)
pub(crate) async fn drive_observed<T, Fut>(
    clock: &ManualClock,
    start: impl FnOnce(Observer) -> Fut,
    mut on_event: impl FnMut(&RetryEvent),
) -> (T, Vec<RetryEvent>)
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RetryEvent>();
    let task = tokio::spawn(start(Box::new(move |e: &RetryEvent| {
        let _ = tx.send(e.clone());
    })));
    let mut events = Vec::new();
    while let Some(event) = rx.recv().await {
        on_event(&event);
        clock.set(event.next_attempt_at);
        events.push(event);
    }
    (task.await.expect("the retrying task"), events)
}
