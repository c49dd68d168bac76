//! The agent's root: one `run` that takes everything from outside (configuration, listeners,
//! clock, Metering Service client, shutdown token), so tests drive the whole agent in-process.
//!
//! Order of events: open the ledger → serve the local API (alive, not ready) → establish
//! entitlement → ready (and `READY=1` to systemd) → seal each hour as it closes and send it →
//! on shutdown: refuse new requests, drain in-flight ones, seal the open hour, send it.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_marketplacemetering::Client;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::{from_unix_seconds, hour_floor, rfc3339, unix_seconds, SharedClock, HOUR_SECS};
use crate::config::{Config, PlatformSetting};
use crate::entitlement::{
    self, Backoff, DryRunMode, DryRunPolicy, EntitlementError, Keyring, RegistrationSettings,
};
use crate::ingest::{self, Api, Via, Vocabulary};
use crate::ledger::{Ledger, LedgerError, SealPolicy};
use crate::metrics::Metrics;
use crate::platform::{self, Platform};
use crate::send::Sender;
use crate::status::{EntitlementState, EntitlementStatus, StatusBoard};

/// The ledger could not be opened or used (`EX_IOERR`).
pub const EXIT_LEDGER: i32 = 74;
/// A listener could not be bound (`EX_OSERR`).
pub const EXIT_LISTEN: i32 = 71;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Shutdown could not seal the open hour: its usage is in the ledger, unbilled until an
    /// agent starts on it again, so the exit is not a success.
    #[error("the final flush could not seal the open hour: {0}; its usage stays in the ledger and is sealed and sent at the next start on this state directory")]
    FinalSeal(LedgerError),
    #[error(transparent)]
    Entitlement(#[from] EntitlementError),
    #[error("cannot listen on {what}: {detail}")]
    Listen { what: String, detail: String },
    #[error("cannot load the keyring: {0}")]
    Keyring(#[from] crate::entitlement::KeyringError),
}

impl AgentError {
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Ledger(_) | AgentError::FinalSeal(_) => EXIT_LEDGER,
            AgentError::Entitlement(e) => e.exit_code(),
            AgentError::Listen { .. } => EXIT_LISTEN,
            AgentError::Keyring(_) => crate::config::EXIT_BAD_CONFIG,
        }
    }
}

/// The sockets the local API is served on.
#[derive(Debug, Default)]
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixListener>,
}

impl Listeners {
    /// Binds what the configuration asks for. The Unix socket gets mode 0660.
    pub async fn bind(config: &Config) -> Result<Self, AgentError> {
        let mut listeners = Listeners::default();
        if let Some(addr) = config.listen_addr() {
            listeners.tcp =
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|e| AgentError::Listen {
                            what: addr.to_string(),
                            detail: e.to_string(),
                        })?,
                );
        }
        if !config.server.unix_socket.is_empty() {
            listeners.unix = Some(bind_unix(&PathBuf::from(&config.server.unix_socket))?);
        }
        Ok(listeners)
    }
}

/// Binds the local API's Unix socket with mode 0660, replacing a stale socket file.
pub fn bind_unix(path: &std::path::Path) -> Result<UnixListener, AgentError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |detail: String| AgentError::Listen {
        what: path.display().to_string(),
        detail,
    };
    // A socket left by a previous run is replaced; any other file is not touched.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(|e| err(e.to_string()))?;
        } else {
            return Err(err("a file that is not a socket is in the way".to_owned()));
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

pub type EnvFn = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Everything the agent takes from outside besides configuration and listeners.
pub struct RunContext {
    pub clock: SharedClock,
    pub client: Client,
    pub shutdown: CancellationToken,
    /// Trusted keys; `None` loads the bundled keyring plus `registration.public_key_files`.
    pub keyring: Option<Keyring>,
    /// Environment for platform detection; `None` reads the process environment.
    pub env: Option<EnvFn>,
    /// Overrides the DryRun timings (tests use short back-offs).
    pub dry_run_policy: Option<DryRunPolicy>,
    /// Called once the API is serving, with live handles; for tests and the demo.
    pub on_started: Option<Box<dyn FnOnce(Handles) + Send>>,
}

impl RunContext {
    pub fn new(clock: SharedClock, client: Client, shutdown: CancellationToken) -> Self {
        Self {
            clock,
            client,
            shutdown,
            keyring: None,
            env: None,
            dry_run_policy: None,
            on_started: None,
        }
    }
}

/// Live handles into a running agent.
#[derive(Clone)]
pub struct Handles {
    pub ledger: Ledger,
    pub status: Arc<StatusBoard>,
    pub metrics: Arc<Metrics>,
}

/// Runs the agent until `ctx.shutdown` fires and the final flush is done, or a fatal error.
/// With `listeners` of `None`, binds what the configuration names, after taking the ledger
/// lock (so a second agent is told about the lock, not about a busy port).
pub async fn run(
    config: Config,
    listeners: Option<Listeners>,
    ctx: RunContext,
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let clock = ctx.clock.clone();
    let ledger = Ledger::open(
        &config.state.dir,
        &config.product_code,
        unix_seconds(clock.now()),
    )?;
    tracing::info!(
        ledger = %ledger.path().display(),
        first_start = %rfc3339(ledger.identity().first_start),
        "ledger open"
    );
    let listeners = match listeners {
        Some(l) => l,
        None => Listeners::bind(&config).await?,
    };

    let env: EnvFn = ctx
        .env
        .clone()
        .unwrap_or_else(|| Arc::new(platform::process_env));
    let configured_platform = configured_platform(config.platform);
    let platform_info = platform::detect(
        configured_platform,
        &*env,
        &platform::ImdsSettings::from_env(&*env),
    )
    .await;
    for warning in platform_info.credential_warnings() {
        tracing::warn!(problem = %warning.problem, fix = %warning.fix, "credentials");
    }
    let platform = platform_info.platform;

    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(StatusBoard::new(
        platform.as_str().to_owned(),
        ledger.writable_flag(),
    ));
    let auth_token = config
        .auth_token()
        .map_err(|e| AgentError::Listen {
            what: config.server.auth_token_file.clone(),
            detail: format!("cannot read the auth token: {e}"),
        })?
        .map(String::into_bytes);
    let api = Arc::new(Api {
        config: config.clone(),
        vocabulary: Vocabulary::from_config(&config),
        ledger: ledger.clone(),
        clock: clock.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        accepting: true.into(),
        auth_token,
        listen_ip: config.listen_addr().map(|a| a.ip()),
    });

    let http_stop = CancellationToken::new();
    let drain = (config.server.grace_period / 3).max(Duration::from_secs(1));
    let mut servers = JoinSet::new();
    if let Some(tcp) = listeners.tcp {
        if let Ok(addr) = tcp.local_addr() {
            tracing::info!(%addr, "serving the local API");
        }
        servers.spawn(
            ingest::serve(
                api.clone(),
                tcp,
                Via::Tcp,
                config.server.max_connections,
                http_stop.clone(),
                drain,
            )
            .instrument(tracing::info_span!("http", via = "tcp")),
        );
    }
    if let Some(unix) = listeners.unix {
        tracing::info!(path = %config.server.unix_socket, "serving the local API");
        servers.spawn(
            ingest::serve(
                api.clone(),
                unix,
                Via::Unix,
                config.server.max_connections,
                http_stop.clone(),
                drain,
            )
            .instrument(tracing::info_span!("http", via = "unix")),
        );
    }
    if let Some(on_started) = ctx.on_started {
        on_started(Handles {
            ledger: ledger.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
        });
    }

    let sender = Arc::new(Sender::new(
        ctx.client.clone(),
        ledger.clone(),
        clock.clone(),
        metrics.clone(),
        status.clone(),
        config.product_code.clone(),
        Backoff::try_new(config.sending.initial_backoff, config.sending.max_backoff)
            .unwrap_or_default(),
    ));
    let policy = SealPolicy {
        dimensions: config.metering.dimensions.clone(),
        report_zero: config.metering.report_zero,
        max_allocations: config.metering.max_allocations,
    };

    // Entitlement decides whether metering starts at all.
    let keyring = match ctx.keyring {
        Some(k) => k,
        None => Keyring::load(
            &config.registration.public_key_files,
            config.registration.public_key_version,
        )
        .map_err(AgentError::Keyring)?,
    };
    let admission = establish_entitlement(
        &config,
        platform,
        &ctx.client,
        &keyring,
        &clock,
        ctx.dry_run_policy.clone().unwrap_or_default(),
        &status,
        &metrics,
    );
    tokio::pin!(admission);
    let mut background_check: Option<tokio::task::JoinHandle<Result<(), EntitlementError>>>;
    tokio::select! {
        _ = ctx.shutdown.cancelled() => {
            tracing::info!("shutdown before entitlement was established; nothing is sealed or sent");
            stop_intake(&api, &http_stop, &mut servers).await;
            return Ok(());
        }
        result = &mut admission => match result {
            Ok(check) => background_check = check,
            Err(e) => {
                status.set_entitlement(EntitlementStatus { state: EntitlementState::Failed, details: serde_json::json!({"error": e.to_string()}) });
                stop_intake(&api, &http_stop, &mut servers).await;
                return Err(e.into());
            }
        }
    }
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    tracing::info!(product_code = %config.product_code, platform = platform.as_str(), "ready");

    let workers_stop = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let mut workers = JoinSet::new();
    workers.spawn(
        seal_loop(
            ledger.clone(),
            clock.clone(),
            policy.clone(),
            config.sending.seal_delay,
            wake.clone(),
            metrics.clone(),
            workers_stop.clone(),
        )
        .instrument(tracing::info_span!("seal")),
    );
    workers.spawn(watch_writable(
        ledger.clone(),
        clock.clone(),
        workers_stop.clone(),
    ));
    {
        let sender = sender.clone();
        let (wake, stop) = (wake.clone(), workers_stop.clone());
        workers.spawn(
            async move { sender.run(wake, stop).await }.instrument(tracing::info_span!("sender")),
        );
    }

    let fatal = async {
        match background_check.take() {
            Some(handle) => match handle.await {
                Ok(Err(e)) => Some(e),
                _ => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    let fatal = tokio::select! {
        _ = ctx.shutdown.cancelled() => None,
        e = fatal => e,
    };

    // Shutdown: stop intake, drain, seal the open hour, send.
    let deadline = tokio::time::Instant::now() + config.server.grace_period;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: refusing new requests and draining in-flight ones");
    stop_intake(&api, &http_stop, &mut servers).await;
    workers_stop.cancel();
    while workers.join_next().await.is_some() {}
    if let Some(e) = fatal {
        return Err(e.into());
    }

    let now = unix_seconds(clock.now());
    let open_hour = ledger.open_hour(now);
    // Records sealed earlier are still sent when the open hour cannot be sealed; the failure
    // is the run's result (logged once, by whoever handles it).
    let unsealed = match ledger
        .seal_through(open_hour + HOUR_SECS, now, policy)
        .await
    {
        Ok(outcome) => {
            report_seal(&outcome, &metrics);
            tracing::info!(hour = %rfc3339(open_hour), "sealed the open hour for the final flush");
            None
        }
        Err(e) => Some(e),
    };
    let budget = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .saturating_sub(Duration::from_millis(500));
    match sender.drain(budget).await {
        Ok(crate::send::Pass::Done) if unsealed.is_none() => {
            tracing::info!("all records delivered; exiting")
        }
        Ok(crate::send::Pass::Done) => tracing::info!("all sealed records delivered"),
        Ok(_) => tracing::warn!("records still undelivered at the end of the grace period; they stay in the ledger and are sent on the next start"),
        Err(e) => tracing::error!(error = %e, "final delivery could not read the ledger"),
    }
    match unsealed {
        Some(e) => Err(AgentError::FinalSeal(e)),
        None => Ok(()),
    }
}

/// New requests get 503; in-flight ones finish (each listener drains within its timeout).
async fn stop_intake(api: &Api, http_stop: &CancellationToken, servers: &mut JoinSet<()>) {
    api.accepting.store(false, Ordering::Release);
    http_stop.cancel();
    while servers.join_next().await.is_some() {}
}

fn configured_platform(setting: PlatformSetting) -> Option<Platform> {
    match setting {
        PlatformSetting::Auto => None,
        PlatformSetting::Ecs => Some(Platform::Ecs),
        PlatformSetting::Eks => Some(Platform::Eks),
        PlatformSetting::Ec2 => Some(Platform::Ec2),
    }
}

/// RegisterUsage (containers) or the MeterUsage DryRun (EC2/AMI, or registration disabled).
/// Returns a background task when an AMI product starts before its check has passed.
#[allow(clippy::too_many_arguments)]
async fn establish_entitlement(
    config: &Config,
    platform: Platform,
    client: &Client,
    keyring: &Keyring,
    clock: &SharedClock,
    dry_run_policy: DryRunPolicy,
    status: &Arc<StatusBoard>,
    metrics: &Arc<Metrics>,
) -> Result<Option<tokio::task::JoinHandle<Result<(), EntitlementError>>>, EntitlementError> {
    entitlement::check_product_code(&config.product_code).map_err(|reason| {
        EntitlementError::ProductCodeNotAllowed {
            product_code: config.product_code.clone(),
            reason,
        }
    })?;
    if config.registration.enabled && platform.allows_register_usage() {
        let mut settings = RegistrationSettings::new(
            config.product_code.clone(),
            config.registration.public_key_version,
            platform,
        );
        settings.startup_budget = config.registration.startup_budget;
        let entitlement = entitlement::register(client, &settings, keyring, clock).await?;
        metrics.entitled.set(1);
        if let Some(rotation) = &entitlement.key_rotation {
            metrics
                .public_key_rotation_timestamp_seconds
                .set(rotation.timestamp);
        }
        status.set_entitlement(EntitlementStatus {
            state: EntitlementState::Entitled,
            details: serde_json::to_value(&entitlement).unwrap_or_default(),
        });
        return Ok(None);
    }
    let dimension = config
        .metering
        .dimensions
        .first()
        .cloned()
        .unwrap_or_default();
    let mode = if platform == Platform::Ec2 {
        DryRunMode::Ami
    } else {
        DryRunMode::Container
    };
    let mut policy = dry_run_policy;
    policy.container_budget = config.registration.startup_budget;
    if mode == DryRunMode::Container {
        let passed = entitlement::dry_run_check_with(
            client,
            &config.product_code,
            &dimension,
            mode,
            clock,
            &policy,
            &|_| {},
        )
        .await?;
        metrics.entitled.set(1);
        status.set_entitlement(EntitlementStatus {
            state: EntitlementState::PermissionsVerified,
            details: serde_json::to_value(&passed).unwrap_or_default(),
        });
        return Ok(None);
    }
    // AMI: keep accepting and persisting usage while the check retries; fail closed only
    // when the policy gives up (never sooner than 2 hours).
    status.set_entitlement(EntitlementStatus {
        state: EntitlementState::Unverified,
        details: serde_json::json!({"dry_run": "in progress"}),
    });
    let (client, product_code, clock, status, metrics) = (
        client.clone(),
        config.product_code.clone(),
        clock.clone(),
        status.clone(),
        metrics.clone(),
    );
    let handle = tokio::spawn(
        async move {
            let passed = entitlement::dry_run_check_with(
                &client,
                &product_code,
                &dimension,
                mode,
                &clock,
                &policy,
                &|_| {},
            )
            .await?;
            metrics.entitled.set(1);
            status.set_entitlement(EntitlementStatus {
                state: EntitlementState::PermissionsVerified,
                details: serde_json::to_value(&passed).unwrap_or_default(),
            });
            Ok(())
        }
        .instrument(tracing::info_span!("dry_run")),
    );
    Ok(Some(handle))
}

/// Seals each hour shortly after it closes (and any closed hours left from before a restart).
async fn seal_loop(
    ledger: Ledger,
    clock: SharedClock,
    policy: SealPolicy,
    seal_delay: Duration,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let delay = i64::try_from(seal_delay.as_secs()).unwrap_or(0);
    loop {
        let now = unix_seconds(clock.now());
        let closed_before = hour_floor(now - delay);
        let next_check = match ledger
            .seal_through(closed_before, now, policy.clone())
            .await
        {
            Ok(outcome) => {
                if !outcome.hours.is_empty() {
                    report_seal(&outcome, &metrics);
                    wake.notify_one();
                }
                from_unix_seconds(closed_before + HOUR_SECS + delay)
            }
            Err(e) => {
                tracing::error!(error = %e, "sealing failed; retrying shortly");
                clock.now() + Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = clock.sleep_until(next_check) => {}
        }
    }
}

/// How often a ledger that refused a write is tried again with a small write.
const WRITABLE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Readiness follows the ledger's last write. A sidecar that is not ready gets no traffic, so
/// after a failed write the ledger is tried with a small write of its own until one succeeds.
async fn watch_writable(ledger: Ledger, clock: SharedClock, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = clock.sleep_until(clock.now() + WRITABLE_CHECK_INTERVAL) => {}
        }
        if !ledger.writable() {
            if let Err(e) = ledger.check_writable(unix_seconds(clock.now())).await {
                tracing::warn!(error = %e, "the ledger still refuses writes");
            }
        }
    }
}

fn report_seal(outcome: &crate::ledger::SealOutcome, metrics: &Metrics) {
    metrics.records_sealed.inc_by(outcome.records as u64);
    metrics
        .tag_sets_folded
        .inc_by(outcome.folded_tag_sets as u64);
    for hour in &outcome.hours {
        tracing::info!(hour = %rfc3339(*hour), "hour sealed");
    }
    if outcome.folded_tag_sets > 0 {
        tracing::warn!(
            folded = outcome.folded_tag_sets,
            "tag sets beyond metering.max_allocations were folded into the untagged allocation"
        );
    }
}

fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "could not notify systemd");
        }
    }
}

/// `meterd doctor`: prints the report; true when no check failed.
pub async fn doctor(config: &Config) -> anyhow::Result<bool> {
    let client = crate::aws::build_client(&crate::aws::AwsSettings {
        region: Some(config.aws.region.clone()),
        endpoint_url: Some(config.aws.endpoint_url.clone()),
        static_credentials: None,
        operation_timeout: Some(Duration::from_secs(10)),
    })
    .await;
    let keyring = Keyring::load(
        &config.registration.public_key_files,
        config.registration.public_key_version,
    )?;
    let region = client.config().region().map(|r| r.to_string());
    let clock: SharedClock = Arc::new(crate::clock::SystemClock);
    let env = platform::process_env;
    let report = entitlement::doctor(entitlement::DoctorInputs {
        product_code: &config.product_code,
        dimension: config.metering.dimensions.first().map(String::as_str),
        region: region.as_deref(),
        endpoint: Some(config.aws.endpoint_url.as_str()).filter(|e| !e.is_empty()),
        public_key_version: config.registration.public_key_version,
        registration_enabled: config.registration.enabled,
        configured_platform: configured_platform(config.platform),
        keyring: &keyring,
        client: &client,
        clock: &clock,
        env: &env,
        imds: platform::ImdsSettings::from_env(&env),
    })
    .await;
    print!("{report}");
    Ok(report.is_healthy())
}
