//! `meterd demo`: the real agent pipeline against the embedded emulator, one hour per minute.
//!
//! It starts the emulator and the agent in-process on loopback with a shared scaled clock,
//! posts usage from a small load generator, prints each record as the emulator accepts it,
//! then shuts the agent down (flushing the open hour) and checks that every acknowledged count
//! was billed exactly once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use http::{Method, StatusCode};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, Listeners, RunContext};
use crate::aws::AwsSettings;
use crate::clock::{hour_floor, rfc3339, unix_seconds, ScaledClock, SharedClock, HOUR_SECS};
use crate::config::{Config, Pricing};
use crate::emulator::{self, EmulatorConfig};
use crate::local_client::{self, Target};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Demo hours to run before the final flush.
    #[arg(long, default_value_t = 3)]
    pub hours: u32,
    /// How much faster than real time the demo clock runs (60: an hour per minute).
    #[arg(long, default_value_t = 60.0)]
    pub time_scale: f64,
    /// Where the agent's local API listens; the demo prints curl commands for it.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Do not generate load; post usage yourself with the printed curl command.
    #[arg(long)]
    pub no_load: bool,
    /// The pricing model to show: hourly (RegisterUsage only), custom (MeterUsage, its DryRun
    /// at start-up), hourly+custom (both), contract (a License Manager checkout) or
    /// contract+custom.
    #[arg(long, default_value = "hourly+custom")]
    pub pricing: Pricing,
}

const DEMO_ACCESS_KEY: &str = "AKIAMETERDDEMO000001";
const DEMO_SECRET_KEY: &str = "meterd-demo-secret-key";
const TENANTS: [&str; 3] = ["acme", "globex", "initech"];

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.hours >= 1, "--hours must be at least 1");
    anyhow::ensure!(
        args.time_scale.is_finite() && (1.0..=3600.0).contains(&args.time_scale),
        "--time-scale must be between 1 and 3600"
    );
    // Start a little before an hour boundary so the first seal comes quickly.
    let start = SystemTime::now();
    let clock: SharedClock = ScaledClock::new(start, args.time_scale);
    let work = tempfile::tempdir().context("cannot create a temporary directory")?;

    let emulator = emulator::start(
        EmulatorConfig::demo(),
        clock.clone(),
        "127.0.0.1:0".parse()?,
    )
    .await
    .context("cannot start the emulator")?;
    let key_path = work.path().join("emulator-v1.pem");
    std::fs::write(
        &key_path,
        emulator
            .public_key_pem(1)
            .context("the demo emulator has no key for version 1")?,
    )?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let agent_addr = listener.local_addr()?;
    let config = Config::from_toml_str(&format!(
        r#"
product_code = "{product}"
pricing = "{pricing}"
platform = "auto"
{metering}
[registration]
public_key_files = [{key:?}]
[server]
listen = "{agent_addr}"
grace_period = "20s"
[state]
dir = {state:?}
[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
[sending]
seal_delay = "30s"
initial_backoff = "100ms"
max_backoff = "2s"
{contract}
"#,
        product = emulator::config::DEMO_PRODUCT_CODE,
        pricing = args.pricing,
        metering = if args.pricing.meters() {
            "[metering]\ndimensions = [\"requests\", \"gigabytes\"]\ntag_keys = [\"tenant\"]"
        } else {
            ""
        },
        // The emulator's demo license: a Tier feature and a pool of 10 Seats.
        contract = if args.pricing.checks_out() {
            format!(
                "[contract]\nproduct_sku = \"{}\"\n[[contract.entitlements]]\nname = \"Tier\"\nunit = \"None\"\n[[contract.entitlements]]\nname = \"Seats\"\ncount = 2\n",
                emulator::config::DEMO_PRODUCT_CODE
            )
        } else {
            String::new()
        },
        key = key_path.display().to_string(),
        state = work.path().join("state").display().to_string(),
        endpoint = emulator.endpoint_url(),
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    let settings = AwsSettings {
        region: Some("us-east-1".to_owned()),
        endpoint_url: Some(emulator.endpoint_url()),
        static_credentials: Some((DEMO_ACCESS_KEY.to_owned(), DEMO_SECRET_KEY.to_owned())),
        operation_timeout: Some(Duration::from_secs(10)),
    };
    let shutdown = CancellationToken::new();
    let mut ctx = RunContext::new(clock.clone(), shutdown.clone());
    ctx.aws = Some(settings);
    // Not on ECS, EKS or EC2: detection finds nothing, and IMDS is never probed.
    ctx.env = Some(Arc::new(|name| {
        (name == "AWS_EC2_METADATA_DISABLED").then(|| "true".to_owned())
    }));
    let agent_task = tokio::spawn(agent::run(
        config,
        Some(Listeners {
            tcp: Some(listener),
            unix: None,
            metrics: None,
        }),
        ctx,
    ));

    println!(
        "meterd demo: emulator at {}, agent at http://{agent_addr}",
        emulator.endpoint_url()
    );
    println!(
        "meterd demo: one hour passes every {:.0} s; running {} hours",
        3600.0 / args.time_scale,
        args.hours
    );
    if args.pricing.meters() {
        println!("meterd demo: post usage yourself with:");
        println!("  curl -s -H 'Content-Type: application/json' -d '{{\"dimension\":\"requests\",\"quantity\":5,\"tags\":{{\"tenant\":\"acme\"}}}}' http://{agent_addr}/v1/usage");
    }

    let target = Target::Tcp(agent_addr.to_string());
    wait_ready(&target, &agent_task).await?;
    println!(
        "meterd demo: pricing = \"{}\": {}",
        args.pricing,
        match args.pricing {
            Pricing::Hourly => "agent registered with RegisterUsage (PS256 token verified) and is ready; AWS meters the task hours itself, so no usage is posted and no MeterUsage is sent",
            Pricing::Custom => "agent passed the MeterUsage DryRun (the entitlement check for custom pricing) and is ready",
            Pricing::HourlyCustom => "agent registered with RegisterUsage (PS256 token verified) and is ready",
            Pricing::Contract | Pricing::ContractCustom => "agent checked out the demo license's entitlements from the emulator's License Manager and is ready (GET /v1/entitlements shows them)",
        }
    );

    if args.pricing.checks_out() {
        let (status, body) = local_client::call(
            &target,
            Method::GET,
            "/v1/entitlements",
            None,
            None,
            Duration::from_secs(5),
        )
        .await?;
        println!(
            "meterd demo: GET /v1/entitlements ({status}): {}",
            String::from_utf8_lossy(&body)
        );
    }

    let acknowledged = Arc::new(AtomicI64::new(0));
    let load_stop = CancellationToken::new();
    let load = (!args.no_load && args.pricing.meters()).then(|| {
        tokio::spawn(generate_load(
            target.clone(),
            acknowledged.clone(),
            load_stop.clone(),
        ))
    });

    let first_hour = hour_floor(unix_seconds(clock.now()));
    let last_hour = first_hour + i64::from(args.hours - 1) * HOUR_SECS;
    let mut shown = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        shown = print_new_records(&emulator, shown);
        if agent_task.is_finished() {
            break;
        }
        if unix_seconds(clock.now()) >= last_hour + HOUR_SECS - 60 {
            break;
        }
    }
    load_stop.cancel();
    if let Some(load) = load {
        let _ = load.await;
    }
    println!("meterd demo: stopping the agent (SIGTERM path): the open hour is sealed and sent");
    shutdown.cancel();
    agent_task
        .await
        .context("agent task")?
        .map_err(|e| anyhow::anyhow!("agent: {e}"))?;
    print_new_records(&emulator, shown);

    let calls = emulator.calls();
    let count = |op: &str| calls.iter().filter(|c| c.operation == op).count();
    println!(
        "meterd demo: calls the emulator saw: RegisterUsage {}, MeterUsage {} (records {})",
        count("RegisterUsage"),
        count("MeterUsage"),
        emulator.records().len()
    );
    if args.pricing.checks_out() {
        let consumptions = emulator.license_consumptions();
        let checked_in = consumptions.iter().filter(|c| c.checked_in).count();
        println!(
            "meterd demo: License Manager: {} checkout(s), {checked_in} checked in at shutdown (the seats are back in the pool)",
            consumptions.len()
        );
        anyhow::ensure!(
            checked_in == consumptions.len(),
            "a license consumption was left checked out: this is a bug, please report it"
        );
    }
    let billed: i64 = emulator.records().iter().map(|r| r.quantity).sum();
    let acked = acknowledged.load(Ordering::Relaxed);
    println!("meterd demo: acknowledged {acked} units; the emulator billed {billed} units across {} records", emulator.records().len());
    emulator.shutdown().await;
    anyhow::ensure!(
        acked == billed,
        "acknowledged {acked} but billed {billed}: this is a bug, please report it"
    );
    println!("meterd demo: every acknowledged unit was billed exactly once");
    Ok(())
}

async fn wait_ready(
    target: &Target,
    agent_task: &tokio::task::JoinHandle<Result<(), agent::AgentError>>,
) -> anyhow::Result<()> {
    for _ in 0..200 {
        if agent_task.is_finished() {
            anyhow::bail!("the agent stopped during start-up");
        }
        if let Ok((StatusCode::OK, _)) = local_client::call(
            target,
            Method::GET,
            "/readyz",
            None,
            None,
            Duration::from_secs(2),
        )
        .await
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the agent did not become ready within 10 s")
}

async fn generate_load(target: Target, acknowledged: Arc<AtomicI64>, stop: CancellationToken) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let events: Vec<serde_json::Value> = {
            let mut rng = rand::thread_rng();
            (0..rng.gen_range(1..20))
                .map(|_| {
                    n += 1;
                    let dimension = if rng.gen_bool(0.8) { "requests" } else { "gigabytes" };
                    let mut e = serde_json::json!({"dimension": dimension, "quantity": rng.gen_range(1..10), "id": format!("demo-{n}")});
                    if rng.gen_bool(0.7) {
                        e["tags"] = serde_json::json!({"tenant": TENANTS[rng.gen_range(0..TENANTS.len())]});
                    }
                    e
                })
                .collect()
        };
        let sum: i64 = events.iter().filter_map(|e| e["quantity"].as_i64()).sum();
        let body = serde_json::json!({"events": events})
            .to_string()
            .into_bytes();
        if let Ok((StatusCode::OK, _)) = local_client::call(
            &target,
            Method::POST,
            "/v1/usage",
            Some(body),
            None,
            Duration::from_secs(10),
        )
        .await
        {
            acknowledged.fetch_add(sum, Ordering::Relaxed);
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

fn print_new_records(emulator: &emulator::EmulatorHandle, shown: usize) -> usize {
    let records = emulator.records();
    for r in records.iter().skip(shown) {
        let mut allocations: BTreeMap<String, i64> = BTreeMap::new();
        for a in &r.allocations {
            let name = a
                .tags
                .as_ref()
                .map(|tags| {
                    tags.iter()
                        .map(|t| t.value.clone())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "untagged".to_owned());
            allocations.insert(name, a.quantity);
        }
        let split = if allocations.is_empty() {
            String::new()
        } else {
            format!(
                "  [{}]",
                allocations
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        };
        println!(
            "meterd demo: AWS accepted {} {:<9} = {:>6}{split}  (record {})",
            rfc3339(r.hour),
            r.dimension,
            r.quantity,
            r.metering_record_id
        );
    }
    records.len()
}
