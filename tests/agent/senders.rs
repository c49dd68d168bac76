//! Sender-only agents for the largest fleet (issue 16): the real `send::Sender` (spread offset,
//! rate limit, retries, classification, dead letters) over records kept in memory instead of a
//! ledger, so 10,000 agents fit in one process. Each agent has its own instance id, store,
//! limiter and access key; all share one manual clock, which wakes only the agents whose
//! deadline a move passes. The driver moves the clock only when every agent with a pending
//! record is waiting on it, straight to the earliest deadline: the run's real time follows
//! the calls made, not the fleet's size.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use meterd::clock::unix_seconds;
use meterd::ledger::LedgerError;
use meterd::metrics::Metrics;
use meterd::model::{Delivery, RecordState, StoredRecord};
use meterd::rate::RateLimiter;
use meterd::send::{spread_offset, Pacing, RecordStore, Sender};
use meterd::status::StatusBoard;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::*;

/// One agent's records, as the ledger would hold them after its seals.
struct MemoryStore {
    records: std::sync::Mutex<Vec<StoredRecord>>,
    pending: AtomicUsize,
    /// Set by a seal, cleared by the sender's next pass.
    fresh: AtomicBool,
    /// ThrottlingException failures recorded, per hour.
    throttled: std::sync::Mutex<BTreeMap<i64, u64>>,
    settle: Arc<Notify>,
}

impl MemoryStore {
    fn seal(&self, records: Vec<StoredRecord>) {
        let mut all = self.records.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.fetch_add(records.len(), Ordering::SeqCst);
        all.extend(records);
        all.sort_by(|a, b| (a.hour, &a.dimension).cmp(&(b.hour, &b.dimension)));
        self.fresh.store(true, Ordering::SeqCst);
    }
}

impl RecordStore for MemoryStore {
    async fn pending_records(&self) -> Result<Vec<StoredRecord>, LedgerError> {
        self.fresh.store(false, Ordering::SeqCst);
        let all = self.records.lock().unwrap_or_else(|e| e.into_inner());
        Ok(all
            .iter()
            .filter(|r| r.state == RecordState::Pending)
            .cloned()
            .collect())
    }

    /// As the ledger's delivery transaction: a failure or final outcome applies only to a
    /// record still pending.
    async fn record_delivery(
        &self,
        hour: i64,
        dimension: &str,
        delivery: Delivery,
        now: i64,
    ) -> Result<(), LedgerError> {
        let mut all = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = all
            .iter_mut()
            .find(|r| r.hour == hour && r.dimension == dimension)
        else {
            return Ok(());
        };
        let was_pending = r.state == RecordState::Pending;
        match delivery {
            Delivery::Sent { metering_record_id } => {
                r.state = RecordState::Sent;
                r.metering_record_id = Some(metering_record_id);
                r.sent_at = Some(now);
                r.attempts += 1;
                r.updated_at = now;
            }
            Delivery::Failed { error } if was_pending => {
                if error.contains("ThrottlingException") {
                    *self
                        .throttled
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(hour)
                        .or_default() += 1;
                }
                r.attempts += 1;
                r.last_error = Some(error);
                r.updated_at = now;
            }
            Delivery::Final { state, error } if was_pending => {
                r.state = state;
                r.last_error = Some(error);
                r.updated_at = now;
            }
            _ => {}
        }
        if was_pending && r.state != RecordState::Pending {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
        // Any answer: the agent is about to wait on the clock again (its back-off or limit).
        self.settle.notify_one();
        Ok(())
    }
}

fn epoch_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

struct SenderAgent {
    key: String,
    instance_id: String,
    sender: Arc<Sender<MemoryStore>>,
    wake: Arc<Notify>,
}

impl SenderAgent {
    fn records(&self) -> std::sync::MutexGuard<'_, Vec<StoredRecord>> {
        self.sender
            .store
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// One hour of a sender-only run: the agents' view (calls are attempts recorded).
#[derive(Debug, Clone, Default)]
pub(super) struct SendersHour {
    pub records: u64,
    pub calls: u64,
    pub throttled: u64,
    pub last_accepted_after: i64,
    pub dead_letters: u64,
    pub unsent: u64,
}

#[derive(Debug, Clone, Default)]
pub(super) struct SendersRun {
    pub hours: Vec<SendersHour>,
    /// The service's MeterUsage calls (accepted + throttled) in its busiest second, and its
    /// most accepted in one second, over the whole run.
    pub peak_calls_per_second: u32,
    pub peak_accepted_per_second: u32,
    pub service_calls: u64,
    pub service_throttled: u64,
    /// Clock moves the driver made.
    pub steps: u64,
    pub real_seconds: f64,
}

pub(super) struct SendersSpec {
    pub agents: usize,
    pub dimensions: Vec<&'static str>,
    pub spread: Duration,
    pub hours: i64,
    /// The smallest clock move (coalesces deadlines closer than this).
    pub quantum: Duration,
}

/// Runs `spec.agents` sender-only agents across `spec.hours` hour boundaries with the
/// default `[sending]` settings apart from `spread`, and checks that every unit was billed
/// once (the emulator's records against what was sealed).
pub(super) async fn run_senders(spec: &SendersSpec) -> SendersRun {
    let real_start = std::time::Instant::now();
    let mut emulator_config = support::emulator_with_dimensions(&["seats", "cpus"]);
    emulator_config.quotas = meterd::emulator::quotas::QuotaConfig::default();
    let start = H0 + 1200;
    let h = Harness::with_emulator(start, emulator_config).await;
    // The agent's settings, read as the agent reads them.
    let text = support::agent_toml(&support::AgentToml {
        key: &h.key_path,
        state: &h.dir.path().join("unused"),
        endpoint: &h.emulator.endpoint_url(),
        listen: "127.0.0.1:0",
        server_extra: "",
        metering: None,
        sending: &format!(
            "spread = \"{}\"\ncall_timeout = \"10s\"",
            humantime::format_duration(spec.spread)
        ),
    });
    let config = Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let sending = &config.sending;
    let backoff = meterd::backoff::Backoff::try_new(sending.initial_backoff, sending.max_backoff)
        .expect("the default back-off is valid");

    // One connection pool for all (the emulator serves a bounded number of connections); each
    // agent signs with its own key.
    let base = build_client(&AwsSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(h.emulator.endpoint_url()),
        static_credentials: Some(("AKIAFLEETBASE0000000".into(), "secret".into())),
        operation_timeout: Some(sending.call_timeout),
    })
    .await;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .build_https();
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(StatusBoard::new(
        "test".into(),
        Arc::new(AtomicBool::new(true)),
    ));
    let settle = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut agents = Vec::with_capacity(spec.agents);
    for i in 0..spec.agents {
        let key = format!("AKIASEND{i:012}");
        let client = aws_sdk_marketplacemetering::Client::from_conf(
            base.config()
                .to_builder()
                .http_client(http.clone())
                .credentials_provider(aws_sdk_marketplacemetering::config::Credentials::new(
                    key.clone(),
                    "secret",
                    None,
                    None,
                    "fleet",
                ))
                .build(),
        );
        let instance_id = uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string();
        let store = MemoryStore {
            records: Default::default(),
            pending: AtomicUsize::new(0),
            fresh: AtomicBool::new(false),
            throttled: Default::default(),
            settle: settle.clone(),
        };
        let sender = Arc::new(Sender::new(
            client,
            store,
            h.clock.clone(),
            metrics.clone(),
            status.clone(),
            support::PRODUCT.to_owned(),
            Pacing {
                backoff,
                limiter: Arc::new(RateLimiter::new(sending.max_calls_per_second)),
                offset: spread_offset(&instance_id, sending.spread),
                spread: sending.spread,
            },
        ));
        let wake = Arc::new(Notify::new());
        tasks.spawn({
            let (sender, wake, stop) = (sender.clone(), wake.clone(), stop.clone());
            async move { sender.run(wake, stop).await }
        });
        agents.push(SenderAgent {
            key,
            instance_id,
            sender,
            wake,
        });
    }

    let mut oracle: BTreeMap<(String, i64, String), i64> = BTreeMap::new();
    let mut seed = 11u64;
    let seal_at = |hour: i64| H0 + (hour + 1) * HOUR_SECS + sending.seal_delay.as_secs() as i64;
    let give_up = H0 + (spec.hours + 6) * HOUR_SECS + 600;
    let mut next_seal = 0i64;
    let mut run = SendersRun::default();
    let mut sealed_real: Option<std::time::Instant> = None;
    loop {
        // Until every agent with a pending record waits on the clock (a seal's agents have
        // made their first pass), or 2 s of real time after a seal (an agent in a back-off
        // that a seal does not cut short).
        let next = loop {
            let mut pending = 0;
            let mut busy = false;
            for a in &agents {
                let store = &a.sender.store;
                if store.fresh.load(Ordering::SeqCst)
                    && sealed_real.is_some_and(|t| t.elapsed() < Duration::from_secs(2))
                {
                    busy = true;
                    break;
                }
                if store.pending.load(Ordering::SeqCst) > 0 {
                    pending += 1;
                }
            }
            // An agent with a pending record sleeps on the clock (its back-off, the spread or
            // the send limit) or is busy; one that has none does not sleep.
            if !busy && h.clock.due_sleepers() == 0 && h.clock.sleepers() >= pending {
                break h.clock.next_deadline().map(epoch_nanos);
            }
            tokio::select! {
                _ = settle.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        };
        let now = unix_seconds(h.clock.now());
        if next.is_none() && next_seal >= spec.hours {
            break;
        }
        assert!(now <= give_up, "the fleet did not drain");
        // The next deadline or seal, whichever comes first, at least a quantum on.
        let seal = (next_seal < spec.hours).then(|| {
            if now >= seal_at(next_seal) {
                h.clock.now()
            } else {
                meterd::clock::from_unix_seconds(seal_at(next_seal))
            }
        });
        let deadline = next.map(|n| UNIX_EPOCH + Duration::from_nanos(n));
        let target = match (seal, deadline) {
            (Some(s), Some(d)) => s.min(d.max(h.clock.now() + spec.quantum)),
            (Some(s), None) => s,
            (None, Some(d)) => d.max(h.clock.now() + spec.quantum),
            (None, None) => unreachable!("checked above"),
        };
        if target > h.clock.now() {
            h.clock.set(target);
            run.steps += 1;
        }
        let now = unix_seconds(h.clock.now());
        if next_seal < spec.hours && now >= seal_at(next_seal) {
            let hour = H0 + next_seal * HOUR_SECS;
            for a in &agents {
                let records = spec
                    .dimensions
                    .iter()
                    .map(|d| {
                        let quantity = super::next_quantity(&mut seed);
                        oracle.insert((a.key.clone(), hour, (*d).to_owned()), quantity);
                        StoredRecord {
                            hour,
                            dimension: (*d).to_owned(),
                            quantity,
                            allocations: None,
                            timestamp: hour,
                            client_token: meterd::seal::client_token(
                                support::PRODUCT,
                                d,
                                hour,
                                &a.instance_id,
                            ),
                            state: RecordState::Pending,
                            attempts: 0,
                            last_error: None,
                            metering_record_id: None,
                            sealed_at: now,
                            sent_at: None,
                            updated_at: now,
                        }
                    })
                    .collect();
                a.sender.store.seal(records);
                a.wake.notify_one();
            }
            next_seal += 1;
            sealed_real = Some(std::time::Instant::now());
        }
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}

    for hour in 0..spec.hours {
        let (start, end) = (H0 + hour * HOUR_SECS, H0 + (hour + 1) * HOUR_SECS);
        let mut report = SendersHour::default();
        for a in &agents {
            for r in a.records().iter().filter(|r| r.hour == start) {
                report.records += 1;
                report.calls += r.attempts as u64;
                match r.state {
                    RecordState::Dead => report.dead_letters += 1,
                    RecordState::Sent => {}
                    _ => report.unsent += 1,
                }
                let after = r.sent_at.map_or(i64::MAX, |t| t - end);
                report.last_accepted_after = report.last_accepted_after.max(after);
            }
            report.throttled += a
                .sender
                .store
                .throttled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&start)
                .copied()
                .unwrap_or(0);
        }
        run.hours.push(report);
    }
    let rates = h.emulator.rates();
    if let Some(meter) = rates
        .get("000000000000")
        .and_then(|account| account.get("MeterUsage"))
    {
        run.service_calls = meter.accepted + meter.throttled;
        run.service_throttled = meter.throttled;
        for s in &meter.seconds {
            run.peak_calls_per_second = run.peak_calls_per_second.max(s.accepted + s.throttled);
            run.peak_accepted_per_second = run.peak_accepted_per_second.max(s.accepted);
        }
    }
    super::assert_billed_once(&h.emulator, &oracle, i64::MAX);
    run.real_seconds = real_start.elapsed().as_secs_f64();
    run
}

pub(super) fn print_senders(label: &str, spec: &SendersSpec, run: &SendersRun) {
    println!(
        "senders {label}: {} sender-only agents x {} dimensions, spread {}: service MeterUsage calls {}, throttled {} ({:.1}%), peak calls/s {} (accepted {}); {} clock moves; {:.0} s real",
        spec.agents,
        spec.dimensions.len(),
        humantime::format_duration(spec.spread),
        run.service_calls,
        run.service_throttled,
        100.0 * run.service_throttled as f64 / run.service_calls.max(1) as f64,
        run.peak_calls_per_second,
        run.peak_accepted_per_second,
        run.steps,
        run.real_seconds
    );
    for (i, hour) in run.hours.iter().enumerate() {
        println!(
            "  hour {i}: records {}, calls {}, throttled {} ({:.1}%), calls/record {:.3}, last accepted {} s after close, dead letters {}, unsent {}",
            hour.records,
            hour.calls,
            hour.throttled,
            100.0 * hour.throttled as f64 / hour.calls.max(1) as f64,
            hour.calls as f64 / hour.records.max(1) as f64,
            hour.last_accepted_after,
            hour.dead_letters,
            hour.unsent
        );
    }
}
