//! The in-process rig: a manual clock, an emulator on loopback and its key, the agent's test
//! configuration, and time driven by the clock's sleepers.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meterd::clock::{from_unix_seconds, rfc3339, unix_seconds, Clock, ManualClock, SharedClock};
use meterd::config::Config;
use meterd::emulator::{self, EmulatorConfig, EmulatorHandle};

use crate::{agent_toml, emulator_and_key, eventually, AgentToml, InProcessAgent, PATIENCE};

/// The static access key of the in-process agents.
pub const ACCESS_KEY: &str = "AKIATESTAGENT0000001";

/// `[sending]` of the in-process agents: the default back-offs (1 s, at most 5 min), no
/// spread, and no call limit to speak of. Tests move time by the clock, so back-offs stay real.
const SENDING: &str =
    "seal_delay = \"1s\"\ncall_timeout = \"5s\"\nspread = \"0s\"\nmax_calls_per_second = 1000";

/// Real time [`Harness::drive_until`] may take before it fails.
const DRIVE_PATIENCE: Duration = Duration::from_secs(60);

/// Longest real wait, after a jump, for the woken tasks to go back to sleep.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// For a fleet ([`Harness::settle_quiet`]): how long the sleepers must stay unchanged, with
/// none due, for a jump that left fewer of them to count as settled. Many agents stop sleeping
/// as they finish an hour; waiting [`SETTLE_MAX`] for each would take minutes. A busy task
/// (a commit on a loaded machine) may take longer than this, so the clock may run ahead of
/// it: only for simulations whose bounds have room for that.
pub const SETTLE_QUIET: Duration = Duration::from_millis(50);

/// A manual clock shared by the agent and an emulator (unless a test gives the emulator its
/// own), a temporary directory with the emulator's public key and the agent's state.
pub struct Harness {
    pub clock: Arc<ManualClock>,
    pub emulator: EmulatorHandle,
    pub dir: tempfile::TempDir,
    pub key_path: PathBuf,
    /// How long an unchanged, short sleeper count must last for a jump to count as settled;
    /// [`SETTLE_MAX`] (wait for every woken task to sleep again) unless a fleet sets
    /// [`SETTLE_QUIET`].
    pub settle_quiet: Duration,
}

impl Harness {
    /// The demo emulator and the agent on one clock starting at `start` (epoch seconds).
    pub async fn new(start: i64) -> Self {
        Self::with_emulator(start, EmulatorConfig::demo()).await
    }

    pub async fn with_emulator(start: i64, emulator_config: EmulatorConfig) -> Self {
        let clock = ManualClock::at_unix(start);
        Self::on_clocks(clock.clone(), clock, emulator_config).await
    }

    /// The agent on `clock`, the emulator (the service's time) on `service_clock`.
    pub async fn on_clocks(
        clock: Arc<ManualClock>,
        service_clock: SharedClock,
        emulator_config: EmulatorConfig,
    ) -> Self {
        let (emulator, dir, key_path) = emulator_and_key(emulator_config, service_clock).await;
        Self {
            clock,
            emulator,
            dir,
            key_path,
            settle_quiet: SETTLE_MAX,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The agent's test configuration with these extra `[server]` lines.
    pub fn config(&self, extra: &str) -> Config {
        self.config_with(extra, None)
    }

    /// [`Self::config`] with these `[metering]` lines.
    pub fn config_with(&self, extra: &str, metering: Option<&str>) -> Config {
        let text = agent_toml(&AgentToml {
            key: &self.key_path,
            state: &self.state_dir(),
            endpoint: &self.emulator.endpoint_url(),
            listen: "127.0.0.1:0",
            server_extra: extra,
            metering,
            sending: SENDING,
        });
        Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the agent on the rig's clock and waits until it is ready.
    pub async fn start_agent(&self, config: Config) -> InProcessAgent {
        self.start_agent_on(config, self.clock.clone()).await
    }

    /// [`Self::start_agent`] on another clock.
    pub async fn start_agent_on(&self, config: Config, clock: SharedClock) -> InProcessAgent {
        let agent = self.spawn_agent_on(config, clock).await;
        eventually("the agent ready", PATIENCE, async || {
            agent.handles.status.is_ready()
        })
        .await;
        agent
    }

    /// Starts the agent without waiting for it to become ready.
    pub async fn spawn_agent(&self, config: Config) -> InProcessAgent {
        self.spawn_agent_on(config, self.clock.clone()).await
    }

    async fn spawn_agent_on(&self, config: Config, clock: SharedClock) -> InProcessAgent {
        InProcessAgent::spawn(
            config,
            clock,
            &self.emulator.endpoint_url(),
            ACCESS_KEY,
            Duration::from_secs(5),
        )
        .await
    }

    /// Runs `stopping` (an agent's shutdown) while the service refuses the final flush:
    /// the flush retries on the agent's clock, so after each call it makes, the grace
    /// period passes on that clock.
    pub async fn stop_while_refused(
        &self,
        stopping: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) {
        let stopping = tokio::spawn(stopping);
        let mut seen = self.emulator.calls_counted();
        while !stopping.is_finished() {
            eventually("the flush calls the service", PATIENCE, async || {
                stopping.is_finished() || self.emulator.calls_counted() > seen
            })
            .await;
            seen = self.emulator.calls_counted();
            self.clock.advance(grace);
        }
        stopping.await.expect("stop task");
    }

    /// MeterUsage records the emulator accepted, by (hour, dimension).
    pub fn billed(&self) -> BTreeMap<(i64, String), emulator::StoredMeterRecord> {
        let mut out = BTreeMap::new();
        for r in self.emulator.records() {
            let key = (r.hour, r.dimension.clone());
            assert!(
                out.insert(key.clone(), r).is_none(),
                "two records for {key:?}"
            );
        }
        out
    }

    /// Sets the clock to `t` (epoch seconds).
    pub fn advance_to(&self, t: i64) {
        self.clock.set(from_unix_seconds(t));
    }

    /// Moves time until `cond` holds: while it does not, the clock jumps to the next sleeper's
    /// deadline (never past `limit`, epoch seconds) and the tasks it woke run until they sleep
    /// again. Back-offs, the send limit and the emulator's latency all wait on this clock.
    pub async fn drive_until(&self, what: &str, limit: i64, cond: impl AsyncFnMut() -> bool) {
        self.drive_until_within(what, from_unix_seconds(limit), DRIVE_PATIENCE, cond)
            .await;
    }

    /// [`Self::drive_until`] with a limit in clock time and `patience` of real time (a large
    /// fleet takes longer than one agent).
    pub async fn drive_until_within(
        &self,
        what: &str,
        limit: SystemTime,
        patience: Duration,
        mut cond: impl AsyncFnMut() -> bool,
    ) {
        let started = tokio::time::Instant::now();
        let mut sleeping = 0;
        loop {
            self.settle(sleeping).await;
            if cond().await {
                return;
            }
            sleeping = self.clock.sleepers();
            if self.clock.advance_to_next(limit).is_none() {
                // Nothing sleeps until the limit: what is left runs concurrently.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                started.elapsed() < patience,
                "{what}: not after {patience:?} of real time, the clock at {} (limit {})",
                rfc3339(unix_seconds(self.clock.now())),
                rfc3339(unix_seconds(limit)),
            );
        }
    }

    /// Moves the clock to `t` (epoch seconds) through every sleeper's deadline before it,
    /// letting the woken tasks run at each, as time would pass.
    pub async fn drive_to(&self, t: i64) {
        self.drive_to_observing(from_unix_seconds(t), DRIVE_PATIENCE, || {})
            .await;
    }

    /// [`Self::drive_to`] a time, calling `each` after every move (to watch what changes).
    pub async fn drive_to_observing(
        &self,
        at: SystemTime,
        patience: Duration,
        mut each: impl FnMut(),
    ) {
        let what = format!("the clock at {}", rfc3339(unix_seconds(at)));
        self.drive_until_within(&what, at, patience, async || {
            each();
            if self.clock.next_deadline().is_none_or(|d| d > at) && self.clock.now() < at {
                self.clock.set(at);
            }
            self.clock.now() >= at
        })
        .await;
        self.settle(0).await;
    }

    /// Waits (briefly, on real time) until no due sleeper is left and at least `sleeping`
    /// sleepers are back: the tasks a jump woke have done their work and sleep again. A task
    /// that ends instead (or stops sleeping, as an agent with nothing left to send) leaves the
    /// count short: it waits [`SETTLE_MAX`], or for a fleet the sleepers staying the same for
    /// [`Harness::settle_quiet`].
    async fn settle(&self, sleeping: usize) {
        let started = tokio::time::Instant::now();
        let mut seen = (usize::MAX, usize::MAX);
        let mut quiet_since = started;
        loop {
            tokio::task::yield_now().await;
            let now = (self.clock.sleepers(), self.clock.due_sleepers());
            let (sleepers, due) = now;
            if due == 0 && sleepers >= sleeping {
                return;
            }
            if now != seen {
                (seen, quiet_since) = (now, tokio::time::Instant::now());
            } else if due == 0 && quiet_since.elapsed() >= self.settle_quiet {
                return;
            }
            if started.elapsed() > SETTLE_MAX {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// What a retrying operation is given to announce its next attempt's time.
pub type Announce = Box<dyn Fn(SystemTime) + Send + Sync>;

/// Drives a retrying operation by its observer: runs `start(announce)` in a task and, each
/// time it announces a retry, calls `on_retry` with the retries so far and sets `clock` to the
/// announced time. Returns the operation's result and the number of retries.
pub async fn drive_retries<T, Fut>(
    clock: &ManualClock,
    start: impl FnOnce(Announce) -> Fut,
    mut on_retry: impl FnMut(usize),
) -> (T, usize)
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SystemTime>();
    let task = tokio::spawn(start(Box::new(move |at| {
        let _ = tx.send(at);
    })));
    let mut retries = 0;
    while let Some(at) = rx.recv().await {
        retries += 1;
        on_retry(retries);
        clock.set(at);
    }
    (task.await.expect("the retrying task"), retries)
}
