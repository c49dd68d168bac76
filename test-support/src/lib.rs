//! The harness meterd's integration test binaries share, compiled once as a workspace crate
//! (a dev-dependency of meterd). Time in the in-process tests moves by the injected clock:
//! [`Harness::drive_until`] jumps a [`meterd::clock::ManualClock`] to its next sleeper's
//! deadline; [`eventually`] polls on real time for work that runs concurrently.
#![forbid(unsafe_code)]

mod binary;
mod fleet;
mod harness;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use meterd::agent::{self, AgentError, Handles, Listeners, RunContext};
use meterd::aws::AwsSettings;
use meterd::clock::{SharedClock, HOUR_SECS};
use meterd::config::Config;
use meterd::emulator::{self, EmulatorConfig, EmulatorHandle};
use meterd::ledger::StoredRecord;
use meterd::local_client::{self, Target};

pub use binary::{agent_command, agent_command_without_keys, sigterm, wait_ready, BinaryRig};
pub use fleet::{
    assert_billed_once, assert_hour_delivered, next_quantity, FleetOracle, HourDelivered,
};
pub use harness::{drive_retries, Announce, Harness, ACCESS_KEY, SETTLE_QUIET};

/// The emulator's demo product, which every harness meters.
pub const PRODUCT: &str = emulator::config::DEMO_PRODUCT_CODE;

/// An hour boundary well clear of anything real: 2027-01-15T08:00:00Z.
pub const H0: i64 = 1_800_000_000 - 1_800_000_000 % HOUR_SECS;

/// How long [`eventually`] waits, unless a test says otherwise.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How often [`eventually`] looks again.
const POLL: Duration = Duration::from_millis(1);

/// Polls `cond` on real time until it holds, for work that happens concurrently (a request in
/// flight, the ledger's writer); fails naming `what` after `patience`. Time the agent waits on
/// its clock is moved by [`Harness::drive_until`] instead.
///
/// `cond` returns a future (an `async ||` closure that only borrows, or `move || async move`),
/// so the wait stays `Send` inside a spawned task.
pub async fn eventually<F, Fut>(what: &str, patience: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {patience:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits ([`PATIENCE`] of real time) until the emulator holds at least `n` MeterUsage
/// records: what a test expects billed once the clock has closed the hours.
pub async fn billed_at_least(emulator: &EmulatorHandle, what: &str, n: usize) {
    eventually(what, PATIENCE, async || emulator.records().len() >= n).await;
}

/// The error codes of the MeterUsage calls the emulator answered with an error, in order.
pub fn meter_usage_errors(emulator: &EmulatorHandle) -> Vec<String> {
    emulator
        .calls()
        .iter()
        .filter(|c| c.operation == "MeterUsage")
        .filter_map(|c| c.error_type().map(str::to_owned))
        .collect()
}

/// The service refused no MeterUsage call.
pub fn assert_no_meter_usage_errors(emulator: &EmulatorHandle) {
    let errors = meter_usage_errors(emulator);
    assert!(errors.is_empty(), "the service refused records: {errors:?}");
}

/// One request to an agent's local API (with a bearer `token` when given): the status and
/// the JSON answer, or the answer's text as a JSON string.
pub async fn request(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let (status, bytes) =
        local_client::call(target, method, path, body, token, Duration::from_secs(10))
            .await
            .expect("request");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

/// What differs between the harnesses' agent configurations.
pub struct AgentToml<'a> {
    /// The emulator's public key, trusted in addition to the bundled keyring.
    pub key: &'a Path,
    pub state: &'a Path,
    pub endpoint: &'a str,
    pub listen: &'a str,
    /// Extra lines for `[server]`.
    pub server_extra: &'a str,
    /// The lines of `[sending]`.
    pub sending: &'a str,
    /// The lines of `[metering]`; `None`: the demo product's two dimensions and two tag keys.
    pub metering: Option<&'a str>,
}

/// `[metering]` of [`agent_toml`] unless a harness says otherwise.
pub const DEMO_METERING: &str =
    "dimensions = [\"requests\", \"gigabytes\"]\ntag_keys = [\"tenant\", \"region\"]";

/// The emulator's demo product with `more` dimensions besides `requests` and `gigabytes`.
pub fn emulator_with_dimensions(more: &[&str]) -> EmulatorConfig {
    let mut config = EmulatorConfig::demo();
    config.products[0]
        .dimensions
        .extend(more.iter().map(|d| (*d).to_owned()));
    config
}

/// An agent configuration for the demo product against the emulator.
pub fn agent_toml(t: &AgentToml<'_>) -> String {
    format!(
        r#"
product_code = "{PRODUCT}"
pricing = "hourly+custom"
platform = "ecs"
[metering]
{metering}
[registration]
public_key_files = [{key:?}]
[server]
listen = "{listen}"
grace_period = "10s"
{server_extra}
[state]
dir = {state:?}
[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
[sending]
{sending}
"#,
        key = t.key.display().to_string(),
        state = t.state.display().to_string(),
        listen = t.listen,
        server_extra = t.server_extra,
        endpoint = t.endpoint,
        sending = t.sending,
        metering = t.metering.unwrap_or(DEMO_METERING),
    )
}

/// The agent run in-process (`agent::run`) on a loopback listener, against an emulator.
pub struct InProcessAgent {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), AgentError>>,
    pub handles: Handles,
}

impl InProcessAgent {
    /// Starts the agent with static credentials `access_key` and returns once it runs (it may
    /// not be ready yet). Binds the Unix socket when the configuration names one.
    pub async fn spawn(
        config: Config,
        clock: SharedClock,
        endpoint: &str,
        access_key: &str,
        call_timeout: Duration,
    ) -> Self {
        Self::spawn_with(config, clock, endpoint, access_key, call_timeout, |_| {}).await
    }

    /// [`Self::spawn`], with a last say over the run context.
    pub async fn spawn_with(
        config: Config,
        clock: SharedClock,
        endpoint: &str,
        access_key: &str,
        call_timeout: Duration,
        customize: impl FnOnce(&mut RunContext),
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let settings = AwsSettings {
            region: Some("us-east-1".into()),
            endpoint_url: Some(endpoint.to_owned()),
            static_credentials: Some((access_key.into(), "secret".into())),
            operation_timeout: Some(call_timeout),
        };
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut ctx = RunContext::new(clock, shutdown.clone());
        ctx.aws = Some(settings);
        ctx.env = Some(Arc::new(|_| None));
        ctx.on_started = Some(Box::new(move |h| {
            let _ = tx.send(h);
        }));
        customize(&mut ctx);
        let unix = match config.server.unix_socket.as_str() {
            "" => None,
            path => Some(agent::UnixSocket::bind(Path::new(path)).expect("bind unix socket")),
        };
        let task = tokio::spawn(agent::run(
            config,
            Some(Listeners {
                tcp: Some(listener),
                unix,
                metrics: None,
            }),
            ctx,
        ));
        let handles = rx.await.expect("agent started");
        Self {
            addr,
            shutdown,
            task,
            handles,
        }
    }

    pub fn target(&self) -> Target {
        Target::Tcp(self.addr.to_string())
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        request(&self.target(), method, path, body, None).await
    }

    /// GET `path`: the JSON answer, or the text as a JSON string.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, body: Value) -> (StatusCode, Value) {
        self.post_raw(body.to_string().into_bytes()).await
    }

    /// POST /v1/usage with these bytes: the JSON answer, or the text as a JSON string.
    pub async fn post_raw(&self, body: Vec<u8>) -> (StatusCode, Value) {
        self.call(Method::POST, "/v1/usage", Some(body)).await
    }

    pub async fn records(&self) -> Vec<StoredRecord> {
        self.handles
            .ledger
            .recent_records(10_000)
            .await
            .expect("records")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("agent task")
            .expect("agent exits cleanly");
        // The ledger's lock goes with its writer thread: wait for it, so a restart can take it.
        self.handles.ledger.closed().await;
    }
}

/// An emulator on a loopback port, and a temporary directory holding its public key (version 1)
/// at the returned path, for an agent to trust.
pub async fn emulator_and_key(
    config: EmulatorConfig,
    clock: SharedClock,
) -> (EmulatorHandle, tempfile::TempDir, PathBuf) {
    let emulator = emulator::start(config, clock, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("emulator starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("emulator-v1.pem");
    std::fs::write(&key, emulator.public_key_pem(1).expect("key v1")).expect("key file");
    (emulator, dir, key)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
