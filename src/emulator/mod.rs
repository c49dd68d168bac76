//! A faithful AWS Marketplace Metering Service, for tests and for sellers (`meterd emulator`).
//!
//! - [`config`]: products, keys, customers, tokens and faults, from TOML or [`EmulatorConfig::demo`].
//! - [`model`]: the API model's request shapes and constraint checks (`ValidationException`).
//! - [`ops`]: the four operations' rules and the stored records.
//! - [`sigv4`]: Authorization header checking; the access key id is the caller identity,
//!   or for temporary credentials their role session.
//! - [`credentials`]: a minimal STS and an ECS-style container credentials endpoint.
//! - [`jwt`]: RegisterUsage's PS256 token and the published public keys.
//! - [`faults`]: seeded fault injection.
//! - [`quotas`]: the per-account call quotas (token buckets) and the per-second counts.
//! - `server`: the HTTP protocol and the admin API under `/_emulator/`.
//! - [`cli`]: `meterd emulator`.
//!
//! Time comes from an injected [`SharedClock`], so tests move hours with a `ManualClock`.

pub mod cli;
pub mod config;
pub mod credentials;
pub mod error;
pub mod faults;
pub mod jwt;
pub mod model;
pub mod ops;
pub mod quotas;
mod server;
pub mod sigv4;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;

pub use cli::{run_cli, EmulatorArgs};
pub use config::{ConfigError, EmulatorConfig, Entitlement};
pub use faults::{FaultProfile, FaultRule, InjectedFault};
pub use jwt::PublicKeyInfo;
pub use model::{Allocation, Operation, Tag};
pub use ops::{CallRecord, DoubleBilled, Outcome, StoredMeterRecord};

/// A running emulator. Dropping it without [`EmulatorHandle::shutdown`] stops it too.
pub struct EmulatorHandle {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    task: Option<JoinHandle<()>>,
}

/// Validates `config` and loads or generates the signing keys: everything but the socket.
fn build(config: EmulatorConfig, clock: SharedClock) -> anyhow::Result<server::Shared> {
    config.validate()?;
    let seed = config.seed.unwrap_or(0);
    let keyring = jwt::Keyring::from_config(&config.keys, seed)?;
    let faults = faults::FaultInjector::new(config.faults.clone(), seed, clock.now())?;
    let quotas = quotas::Quotas::new(config.quotas.clone());
    Ok(server::Shared {
        service: ops::Service::new(config, keyring),
        faults: Mutex::new(faults),
        quotas: Mutex::new(quotas),
        temporary: credentials::TemporaryCredentials::default(),
        clock,
        cancel: CancellationToken::new(),
    })
}

/// Validates `config`, loads or generates the signing keys, binds `listen` and serves.
pub async fn start(
    config: EmulatorConfig,
    clock: SharedClock,
    listen: SocketAddr,
) -> anyhow::Result<EmulatorHandle> {
    config.validate()?;
    let shared = tokio::task::spawn_blocking(move || build(config, clock))
        .await
        .context("loading signing keys")??;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the emulator to {listen}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let shared = Arc::new(shared);
    let task = tokio::spawn(server::serve(listener, shared.clone()));
    tracing::info!(%addr, "metering emulator listening");
    Ok(EmulatorHandle {
        addr,
        shared,
        task: Some(task),
    })
}

/// The emulator without a socket: one request in, its answer out, synchronously. It runs
/// the path a served request takes once its body is read (the admin API; the protocol's
/// target, SigV4, fault decisions, JSON, the model's checks and the operations), except that
/// an injected latency is recorded and not waited for. For fuzzing and in-process checks.
pub struct Offline {
    shared: server::Shared,
}

/// What [`Offline::call`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: bytes::Bytes,
}

/// A request that HTTP/1 parsing refuses before the emulator sees it (hyper answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid HTTP request: {0}")]
pub struct NotHttp(pub String);

impl Offline {
    /// Validates `config` and loads or generates its keys, as [`start`] does.
    pub fn new(config: EmulatorConfig, clock: SharedClock) -> anyhow::Result<Self> {
        Ok(Self {
            shared: build(config, clock)?,
        })
    }

    /// Answers one request; `Ok(None)` when fault injection drops the connection.
    pub fn call(
        &self,
        method: &[u8],
        target: &[u8],
        headers: &[(&[u8], &[u8])],
        body: &[u8],
    ) -> Result<Option<OfflineAnswer>, NotHttp> {
        let bad = |e: &dyn std::fmt::Display| NotHttp(e.to_string());
        let mut request = http::Request::builder()
            .method(http::Method::from_bytes(method).map_err(|e| bad(&e))?)
            .uri(http::Uri::try_from(target).map_err(|e| bad(&e))?)
            .body(())
            .map_err(|e| bad(&e))?;
        for (name, value) in headers {
            request.headers_mut().append(
                http::HeaderName::from_bytes(name).map_err(|e| bad(&e))?,
                http::HeaderValue::from_bytes(value).map_err(|e| bad(&e))?,
            );
        }
        let (parts, ()) = request.into_parts();
        let body =
            (body.len() <= server::MAX_BODY_BYTES).then(|| bytes::Bytes::copy_from_slice(body));
        let Ok(response) = server::answer_now(&self.shared, server::ReadRequest { parts, body })
        else {
            return Ok(None);
        };
        let (parts, body) = response.into_parts();
        Ok(Some(OfflineAnswer {
            status: parts.status.as_u16(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: server::body_bytes(body),
        }))
    }

    /// Accepted MeterUsage records, in arrival order.
    pub fn records(&self) -> Vec<StoredMeterRecord> {
        self.shared.service.meter_records()
    }
}

impl EmulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL` or an SDK's endpoint setting.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The SPKI PEM (`BEGIN PUBLIC KEY`) of a RegisterUsage key version.
    pub fn public_key_pem(&self, version: u32) -> Option<String> {
        self.shared
            .service
            .keyring
            .get(version)
            .map(|k| k.public_pem.clone())
    }

    pub fn public_keys(&self) -> Vec<PublicKeyInfo> {
        self.shared.service.keyring.public_keys()
    }

    /// Accepted MeterUsage records, in arrival order.
    pub fn records(&self) -> Vec<StoredMeterRecord> {
        self.shared.service.meter_records()
    }

    /// Accepted BatchMeterUsage records, in arrival order.
    pub fn batch_records(&self) -> Vec<StoredMeterRecord> {
        self.shared.service.batch_records()
    }

    /// Customer-hours metered both by ProductCode and by LicenseArn (billed twice).
    pub fn double_billed(&self) -> Vec<DoubleBilled> {
        self.shared.service.double_billed()
    }

    /// Every protocol call received (the newest [`ops::MAX_CALLS_KEPT`]).
    pub fn calls(&self) -> Vec<CallRecord> {
        self.shared.service.calls()
    }

    /// Calls accepted and throttled per second, per account and operation name, as
    /// `GET /_emulator/rates` reports them.
    pub fn rates(&self) -> BTreeMap<String, BTreeMap<String, quotas::OperationRates>> {
        self.shared.quotas().rates()
    }

    /// How many protocol calls passed SigV4 so far (cheap: for polling).
    pub fn calls_counted(&self) -> u64 {
        self.shared.quotas().total()
    }

    /// Replaces the fault profile through the same validation as `POST /_emulator/faults`
    /// (rates, durations at most [`faults::MAX_FAULT_DURATION`]); an invalid profile
    /// changes nothing and its problems are returned.
    pub fn try_set_faults(&self, profile: FaultProfile) -> Result<(), ConfigError> {
        self.shared.set_faults(profile)
    }

    /// [`Self::try_set_faults`] for tests, whose profiles are literals.
    ///
    /// # Panics
    ///
    /// On an invalid profile, naming its problems: a test's mistake, not to be ignored.
    pub fn set_faults(&self, profile: FaultProfile) {
        if let Err(e) = self.try_set_faults(profile) {
            panic!("{e}");
        }
    }

    /// Changes how RegisterUsage and MeterUsage answer for a product from now on.
    pub fn set_entitlement(
        &self,
        product_code: &str,
        entitlement: Entitlement,
    ) -> anyhow::Result<()> {
        self.shared
            .service
            .set_entitlement(product_code, entitlement)
            .map_err(anyhow::Error::msg)
    }

    /// Adds a ResolveCustomer registration token for a configured customer.
    pub fn add_registration_token(
        &self,
        token: config::RegistrationTokenConfig,
    ) -> anyhow::Result<()> {
        self.shared
            .service
            .add_registration_token(token)
            .map_err(anyhow::Error::msg)
    }

    /// Stops accepting, lets in-flight calls finish and closes idle connections.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "emulator task ended abnormally");
            }
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}
