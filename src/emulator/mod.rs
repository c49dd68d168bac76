//! A faithful AWS Marketplace Metering Service, for tests and for sellers (`meterd emulator`).
//!
//! - [`config`]: products, keys, customers, tokens and faults, from TOML or [`EmulatorConfig::demo`].
//! - [`model`]: the API model's request shapes and constraint checks (`ValidationException`).
//! - [`ops`]: the four operations' rules and the stored records.
//! - [`sigv4`]: Authorization header checking; the access key id is the caller identity.
//! - [`jwt`]: RegisterUsage's PS256 token and the published public keys.
//! - [`faults`]: seeded fault injection.
//! - `server`: the HTTP protocol and the admin API under `/_emulator/`.
//! - [`cli`]: `meterd emulator`.
//!
//! Time comes from an injected [`SharedClock`], so tests move hours with a `ManualClock`.

pub mod cli;
pub mod config;
pub mod error;
pub mod faults;
pub mod jwt;
pub mod model;
pub mod ops;
mod server;
pub mod sigv4;

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
pub use ops::{CallRecord, Outcome, StoredMeterRecord};

/// A running emulator. Dropping it without [`EmulatorHandle::shutdown`] stops it too.
pub struct EmulatorHandle {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    task: Option<JoinHandle<()>>,
}

/// Validates `config`, loads or generates the signing keys, binds `listen` and serves.
pub async fn start(
    config: EmulatorConfig,
    clock: SharedClock,
    listen: SocketAddr,
) -> anyhow::Result<EmulatorHandle> {
    config.validate()?;
    let keys = config.keys.clone();
    let seed = config.seed;
    let keyring = tokio::task::spawn_blocking(move || jwt::Keyring::from_config(&keys, seed))
        .await
        .context("loading signing keys")??;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the emulator to {listen}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let now = clock.now();
    let faults = faults::FaultInjector::new(config.faults.clone(), config.seed, now);
    let shared = Arc::new(server::Shared {
        service: ops::Service::new(config, keyring),
        faults: Mutex::new(faults),
        clock,
        cancel: CancellationToken::new(),
    });
    let task = tokio::spawn(server::serve(listener, shared.clone()));
    tracing::info!(%addr, "metering emulator listening");
    Ok(EmulatorHandle {
        addr,
        shared,
        task: Some(task),
    })
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

    /// Every protocol call received (the newest [`ops::MAX_CALLS_KEPT`]).
    pub fn calls(&self) -> Vec<CallRecord> {
        self.shared.service.calls()
    }

    /// Replaces the fault profile, as `POST /_emulator/faults` does. Invalid rates are
    /// rejected with the list of problems.
    pub fn try_set_faults(&self, profile: FaultProfile) -> Result<(), ConfigError> {
        let problems = profile.problems();
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let now = self.shared.clock.now();
        self.shared.faults().set(profile, now);
        Ok(())
    }

    /// Replaces the fault profile; an invalid profile is logged and ignored.
    pub fn set_faults(&self, profile: FaultProfile) {
        if let Err(e) = self.try_set_faults(profile) {
            tracing::warn!(error = %e, "fault profile rejected");
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
