//! The agent's root: one `run` that takes everything from outside (configuration, listeners,
//! clock, an optional override of the AWS settings, shutdown token), so tests drive the whole
//! agent in-process.
//!
//! Order of events: build what depends only on configuration ([`Prepared`], the AWS clients
//! among it) → open the ledger → serve the local API (alive, not ready) → establish
//! entitlement → ready (and `READY=1` to systemd) → seal each hour as it closes and send it →
//! on shutdown: refuse new requests, drain in-flight ones, seal the open hour, send it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::aws::{build_client, AwsSettings};
use crate::clock::{from_unix_seconds, rfc3339, unix_seconds, SharedClock, HOUR_SECS};
use crate::config::Config;
use crate::entitlement::contract::ContractHolder;
use crate::entitlement::{self, Backoff, DryRunPolicy, EntitlementError, Keyring};
use crate::exit::Exit;
use crate::ingest::{Api, Via, Vocabulary};
use crate::ledger::{Ledger, LedgerError, SealPolicy};
use crate::metrics::Metrics;
use crate::platform::{self};
use crate::seal::schedule::{report_seal, seal_loop};
use crate::send::Sender;
use crate::serve::{serve, ConnectionLimits, ServeSettings};
use crate::status::{EntitlementStatus, StatusBoard};
pub use crate::transport::{Listeners, UnixSocket};

mod admission;
use admission::establish_entitlement;
#[cfg(test)]
use admission::{entitlement_route, Route};

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
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl AgentError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> Exit {
        match self {
            AgentError::Ledger(_) | AgentError::FinalSeal(_) | AgentError::Audit(_) => Exit::Ledger,
            AgentError::Entitlement(e) => e.exit_code(),
            AgentError::Listen { .. } => Exit::Listen,
            AgentError::Keyring(_) | AgentError::Config(_) => Exit::BadConfig,
        }
    }
}

/// Everything the agent builds from its configuration alone. It is built before anything is
/// created or served, so a configuration that cannot run fails first; `check-config` builds
/// the same.
pub struct Prepared {
    /// How to reach AWS: `[aws]` and `sending.call_timeout`, unless the run context overrides it.
    pub aws: AwsSettings,
    pub keyring: Keyring,
    pub backoff: Backoff,
    pub seal_policy: SealPolicy,
    pub auth_token: Option<Vec<u8>>,
}

impl Prepared {
    /// Builds from `config`; `aws` overrides the AWS settings taken from it (tests, the demo).
    pub fn build(config: &Config, aws: Option<AwsSettings>) -> Result<Self, AgentError> {
        entitlement::check_product_code(&config.product_code).map_err(|reason| {
            EntitlementError::ProductCodeNotAllowed {
                product_code: config.product_code.clone(),
                reason,
            }
        })?;
        let locked = entitlement::baked::BAKED.refusals(config);
        if !locked.is_empty() {
            return Err(EntitlementError::Locked(locked).into());
        }
        let keyring = Keyring::load(
            &config.registration.public_key_files,
            config.registration.public_key_version,
        )?;
        let backoff = Backoff::try_new(config.sending.initial_backoff, config.sending.max_backoff)
            .map_err(|e| AgentError::Config(format!("sending back-off: {e}")))?;
        let auth_token = config
            .auth_token()
            .map_err(|e| {
                AgentError::Config(format!(
                    "cannot read server.auth_token_file {}: {e}",
                    config.server.auth_token_file
                ))
            })?
            .map(String::into_bytes);
        Ok(Self {
            aws: aws.unwrap_or_else(|| AwsSettings::from_config(config)),
            keyring,
            backoff,
            seal_policy: SealPolicy {
                dimensions: config.metering.dimensions.clone(),
                report_zero: config.metering.report_zero,
                max_allocations: config.metering.max_allocations,
                aggregation: config.metering.aggregations(),
                heartbeat: config.metering.heartbeat.clone(),
            },
            auth_token,
        })
    }
}

pub type EnvFn = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Everything the agent takes from outside besides configuration and listeners.
pub struct RunContext {
    pub clock: SharedClock,
    pub shutdown: CancellationToken,
    /// Environment for platform detection; `None` reads the process environment.
    pub env: Option<EnvFn>,
    /// How long a request body may take to arrive.
    pub body_read_timeout: Duration,
    /// Called once the API is serving, with live handles; for tests and the demo.
    pub on_started: Option<Box<dyn FnOnce(Handles) + Send>>,
    /// AWS settings for every client (Metering Service, License Manager); `None`: `[aws]`,
    /// `sending.call_timeout` and the SDK's credential chain ([`AwsSettings::from_config`]).
    pub aws: Option<AwsSettings>,
}

impl RunContext {
    pub fn new(clock: SharedClock, shutdown: CancellationToken) -> Self {
        Self {
            clock,
            shutdown,
            env: None,
            body_read_timeout: crate::serve::BODY_READ_TIMEOUT,
            on_started: None,
            aws: None,
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
    mut ctx: RunContext,
) -> Result<(), AgentError> {
    let prepared = Prepared::build(&config, ctx.aws.take())?;
    let client = build_client(&prepared.aws).await;
    let config = Arc::new(config);
    let clock = ctx.clock.clone();
    let ledger = open_ledger(&config, unix_seconds(clock.now()))?;
    tracing::info!(
        ledger = %ledger.path().display(),
        first_start = %rfc3339(ledger.identity().first_start),
        "ledger open"
    );
    let audit = crate::audit::AuditTrail::open(&config.audit, ledger.clone())?;
    let mut listeners = match listeners {
        Some(l) => l,
        None => Listeners::bind(&config).await?,
    };

    let env: EnvFn = ctx
        .env
        .clone()
        .unwrap_or_else(|| Arc::new(platform::process_env));
    // A locked build's platform family overrides configuration and detection.
    let baked = entitlement::baked::BAKED;
    let configured_platform = baked.forced_platform().or(config.platform.named());
    let mut imds = platform::ImdsSettings::from_env(&*env);
    imds.disabled |= !baked.may_probe_imds();
    let platform_info = platform::detect(configured_platform, &*env, &imds).await;
    for warning in platform_info.credential_warnings() {
        tracing::warn!(problem = %warning.problem, fix = %warning.fix, "credentials");
    }
    let platform = platform_info.platform;

    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(StatusBoard::new(
        platform.as_str().to_owned(),
        ledger.writable_flag(),
    ));
    let Prepared {
        aws,
        keyring,
        backoff,
        seal_policy: policy,
        auth_token,
    } = prepared;
    // This agent's slot in the spread: the sender waits for it, status and health count from it.
    let send_offset =
        crate::send::spread_offset(&ledger.identity().instance_id, config.sending.spread);
    let api = Arc::new(Api {
        send_offset,
        config: config.clone(),
        vocabulary: Vocabulary::from_config(&config),
        ledger: ledger.clone(),
        clock: clock.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        accepting: true.into(),
        auth_token,
        listen_ip: config.listen_addr().map(|a| a.ip()),
        body_read_timeout: ctx.body_read_timeout,
        contract: std::sync::OnceLock::new(),
    });

    let http_stop = CancellationToken::new();
    let settings = ServeSettings {
        drain_timeout: (config.server.grace_period / 3).max(Duration::from_secs(1)),
        ..ServeSettings::default()
    };
    // One bound for both listeners, plus slots kept for health probes.
    let limits = ConnectionLimits::new(config.server.max_connections, crate::serve::PROBE_SLOTS);
    let handler = |via: Via| {
        let api = api.clone();
        move |req, slot| {
            let api = api.clone();
            async move { Ok::<_, std::convert::Infallible>(api.handle(req, via, slot).await) }
        }
    };
    let mut servers = JoinSet::new();
    let tcp = [
        (listeners.tcp.take(), Via::Tcp, "serving the local API"),
        (listeners.metrics.take(), Via::Metrics, "serving metrics"),
    ];
    for (listener, via, what) in tcp {
        let Some(listener) = listener else { continue };
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "{what}");
        }
        let span = tracing::info_span!(
            "http",
            via = if via == Via::Tcp { "tcp" } else { "metrics" }
        );
        servers.spawn(
            serve(
                listener,
                limits.clone(),
                settings,
                http_stop.clone(),
                handler(via),
            )
            .instrument(span),
        );
    }
    if let Some(unix) = listeners.unix.as_mut().and_then(UnixSocket::take_listener) {
        tracing::info!(path = %config.server.unix_socket, "serving the local API");
        servers.spawn(
            serve(
                unix,
                limits.clone(),
                settings,
                http_stop.clone(),
                handler(Via::Unix),
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
        client.clone(),
        ledger.clone(),
        clock.clone(),
        metrics.clone(),
        status.clone(),
        config.product_code.clone(),
        crate::send::Pacing {
            backoff,
            limiter: Arc::new(crate::rate::RateLimiter::new(
                config.sending.max_calls_per_second,
            )),
            offset: send_offset,
            spread: config.sending.spread,
        },
    ));

    // Entitlement decides whether metering starts at all.
    let admission = establish_entitlement(
        &config,
        platform,
        &client,
        &keyring,
        &clock,
        DryRunPolicy::default(),
        &status,
        &metrics,
        &ledger,
        &aws,
    );
    tokio::pin!(admission);
    let mut background_check: Option<tokio::task::JoinHandle<Result<(), EntitlementError>>>;
    let contract: Option<Arc<ContractHolder>>;
    tokio::select! {
        _ = ctx.shutdown.cancelled() => {
            tracing::info!("shutdown before entitlement was established; nothing is sealed or sent");
            stop_intake(&api, &http_stop, &mut servers).await;
            return Ok(());
        }
        result = &mut admission => match result {
            Ok(admitted) => {
                background_check = admitted.background_check;
                contract = admitted.contract;
                if let Some(holder) = &contract {
                    let _ = api.contract.set(holder.clone());
                }
            }
            Err(e) => {
                status.set_entitlement(EntitlementStatus::failed(&e));
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
    let meters = config.pricing.meters();
    if let Some(holder) = &contract {
        let (holder, stop, status) = (holder.clone(), workers_stop.clone(), status.clone());
        workers.spawn(
            async move {
                holder
                    .keep_alive(stop, |e| {
                        tracing::error!("the license checkout could not be renewed: {e}");
                        status.set_entitlement(EntitlementStatus::failed(&e));
                    })
                    .await
            }
            .instrument(tracing::info_span!("contract")),
        );
    }
    // A JoinSet, so the task ends with the agent (its ledger handle goes with it).
    let mut audit_task = JoinSet::new();
    // Heartbeat dimensions bill the time from here (entitled and metering) to the exit.
    let run_timer = (meters && !policy.heartbeat.is_empty())
        .then(|| Arc::new(RunTimer::new(ledger.clone(), clock.clone())));
    if meters {
        workers.spawn(
            seal_loop(
                ledger.clone(),
                clock.clone(),
                policy.clone(),
                config.sending.seal_delay,
                wake.clone(),
                metrics.clone(),
                run_timer.clone(),
                workers_stop.clone(),
            )
            .instrument(tracing::info_span!("seal")),
        );
        if let Some(timer) = &run_timer {
            workers.spawn(
                heartbeat_loop(timer.clone(), clock.clone(), workers_stop.clone())
                    .instrument(tracing::info_span!("heartbeat")),
            );
        }
        workers.spawn(watch_writable(
            ledger.clone(),
            clock.clone(),
            workers_stop.clone(),
        ));
        if let Some(trail) = audit {
            audit_task.spawn(
                trail
                    .run(workers_stop.clone())
                    .instrument(tracing::info_span!("audit")),
            );
        }
        {
            let sender = sender.clone();
            let (wake, stop) = (wake.clone(), workers_stop.clone());
            workers.spawn(
                async move { sender.run(wake, stop).await }
                    .instrument(tracing::info_span!("sender")),
            );
        }
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
    if !meters {
        if let Some(holder) = &contract {
            holder.release().await;
        }
        tracing::info!(pricing = %config.pricing, "no custom dimensions: nothing to seal or send; exiting");
        return Ok(());
    }

    if let Some(timer) = &run_timer {
        // The open hour's heartbeat seconds up to now, before it is sealed.
        if let Err(e) = timer.record().await {
            tracing::warn!(error = %e, "could not record the last running seconds for the heartbeat dimensions");
        }
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
    // The flush paces itself on the injected clock; the grace period is real time (the
    // orchestrator's kill), so it bounds the flush whatever that clock says.
    let drained = tokio::time::timeout(budget, sender.drain(budget)).await;
    match drained.unwrap_or(Ok(crate::send::Pass::RetrySoon)) {
        Ok(crate::send::Pass::Done) if unsealed.is_none() => {
            tracing::info!("all records delivered; exiting")
        }
        Ok(crate::send::Pass::Done) => tracing::info!("all sealed records delivered"),
        Ok(_) => tracing::warn!("records still undelivered at the end of the grace period; they stay in the ledger and are sent on the next start"),
        Err(e) => tracing::error!(error = %e, "final delivery could not read the ledger"),
    }
    // The outcomes of the final flush go into the audit trail too.
    if let Some(Ok(mut trail)) = audit_task.join_next().await {
        if let Err(e) = trail.export().await {
            tracing::error!(error = %e, "the final outcomes could not be written to the audit trail; they are written at the next start");
        }
    }
    // The license consumption last, within the grace period: its units return to the pool.
    if let Some(holder) = &contract {
        holder.release().await;
    }
    match unsealed {
        Some(e) => Err(AgentError::FinalSeal(e)),
        None => Ok(()),
    }
}

/// Opens the ledger; a damaged one is refused (exit 74) unless `state.quarantine_damaged`
/// moves it aside, loudly, for an empty start.
fn open_ledger(config: &Config, now: i64) -> Result<Ledger, LedgerError> {
    let (dir, product) = (&config.state.dir, &config.product_code);
    match Ledger::open(dir, product, now) {
        Err(LedgerError::Corrupt {
            path,
            detail,
            damaged: true,
        }) if config.state.quarantine_damaged => {
            let moved = crate::ledger::quarantine(dir, now)?;
            tracing::error!(
                ledger = %path,
                %detail,
                quarantined_as = %moved.display(),
                "THE LEDGER WAS DAMAGED AND IS QUARANTINED; starting with an empty ledger. Usage still unsent in the old file is not billed until recovered: meterd records --ledger <quarantined file> (docs/durable-state.md)"
            );
            Ledger::open(dir, product, now)
        }
        other => other,
    }
}

/// New requests get 503; in-flight ones finish (each listener drains within its timeout).
async fn stop_intake(api: &Api, http_stop: &CancellationToken, servers: &mut JoinSet<()>) {
    api.accepting.store(false, Ordering::Release);
    http_stop.cancel();
    while servers.join_next().await.is_some() {}
}

/// How often the running time is recorded for heartbeat dimensions: a crash loses at most
/// this much of it. Records fall on whole minutes, so one falls on every hour boundary.
pub const HEARTBEAT_INTERVAL_SECS: i64 = 60;

/// The agent's running time, recorded in the ledger for the heartbeat dimensions
/// (`metering.heartbeat`). It counts from when it is made; each record covers the time since
/// the last one. The wall clock is trusted forwards; after a step back nothing is recorded
/// until it passes the last recorded instant again, so no second is billed twice.
pub struct RunTimer {
    ledger: Ledger,
    clock: SharedClock,
    /// The instant (epoch seconds) up to which running time is recorded.
    recorded_to: tokio::sync::Mutex<i64>,
}

impl RunTimer {
    pub fn new(ledger: Ledger, clock: SharedClock) -> Self {
        let now = unix_seconds(clock.now());
        Self {
            ledger,
            clock,
            recorded_to: tokio::sync::Mutex::new(now),
        }
    }

    /// Records the running time since the last record, durably. A failed record is retried
    /// with the next one (nothing is skipped).
    pub async fn record(&self) -> Result<(), LedgerError> {
        let mut recorded_to = self.recorded_to.lock().await;
        let now = unix_seconds(self.clock.now());
        if now > *recorded_to {
            self.ledger.record_run(*recorded_to, now).await?;
            *recorded_to = now;
        }
        Ok(())
    }
}

/// Records the running time on every whole minute of the injected clock.
async fn heartbeat_loop(timer: Arc<RunTimer>, clock: SharedClock, stop: CancellationToken) {
    loop {
        let now = unix_seconds(clock.now());
        let next = (now.div_euclid(HEARTBEAT_INTERVAL_SECS) + 1) * HEARTBEAT_INTERVAL_SECS;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = clock.sleep_until(from_unix_seconds(next)) => {}
        }
        if let Err(e) = timer.record().await {
            tracing::warn!(error = %e, "could not record running time for the heartbeat dimensions; retrying at the next interval");
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

fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "could not notify systemd");
        }
    }
}

#[cfg(test)]
mod tests;
