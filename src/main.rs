//! The `meterd` command line: a thin layer over the library.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use meterd::agent::{self, RunContext};
use meterd::aws::{build_client, AwsSettings};
use meterd::clock::{rfc3339, SystemClock};
use meterd::config::Config;
use meterd::exit::Exit;
use meterd::local_client::{self, Target};

#[derive(Parser)]
#[command(
    name = "meterd",
    version,
    about = "Metering agent for AWS Marketplace sellers"
)]
struct Cli {
    /// Log format: human-readable, or one JSON object per line (the container default).
    #[arg(
        long,
        global = true,
        env = "METERD_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `meterd=debug` (RUST_LOG syntax).
    #[arg(long, global = true, env = "METERD_LOG", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        env = "METERD_CONFIG",
        default_value = "/etc/meterd/meterd.toml"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Move a damaged ledger aside (renamed with the time, never deleted) so the agent can
    /// start empty; prints the new name. Refused while an agent runs.
    Quarantine(ConfigArg),
}

#[derive(Subcommand)]
enum Command {
    /// Ledger maintenance.
    Ledger {
        #[command(subcommand)]
        action: LedgerCommand,
    },
    /// Run the agent: register, take usage on the local API, seal and send every hour.
    Run(ConfigArg),
    /// Post one usage count to the running agent.
    Report {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        dimension: String,
        #[arg(long)]
        quantity: i64,
        /// A tag as key=value; repeat for several.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Idempotency key: a retried report with the same id counts once.
        #[arg(long)]
        id: Option<String>,
    },
    /// Print the running agent's status as JSON.
    Status(ConfigArg),
    /// Exit 0 when the running agent is ready (for container health checks).
    Health(ConfigArg),
    /// Validate a configuration file and print every problem.
    CheckConfig(ConfigArg),
    /// List sealed records from the ledger: hour, dimension, quantity, state, record id.
    Records {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value_t = 48)]
        limit: i64,
        /// Print JSON instead of a table (the same as --format json).
        #[arg(long)]
        json: bool,
        /// table, json or csv.
        #[arg(long, value_enum, default_value_t = RecordsFormat::Table)]
        format: RecordsFormat,
        /// Only hours at or after this time (RFC 3339, e.g. 2026-11-22T10:00:00Z).
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Only hours before this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// Read this ledger file instead of the configured one (a quarantined ledger).
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
    /// List the trusted public keys with their SHA-256 fingerprints.
    Keys {
        /// Also load the configuration's `registration.public_key_files`.
        #[arg(long, env = "METERD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check platform, credentials, region, endpoint, clock skew, permissions and keys.
    Doctor(ConfigArg),
    /// The pre-listing test: the DryRun for every dimension, and with --send one record per
    /// dimension for the last closed hour, with the MeteringRecordIds for seller operations.
    ListingCheck {
        #[command(flatten)]
        config: ConfigArg,
        /// Send the records (without it, only the DryRuns run).
        #[arg(long)]
        send: bool,
        /// The quantity of each record sent.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..))]
        quantity: i32,
    },
    /// Serve the Metering Service emulator.
    #[cfg(feature = "emulator")]
    Emulator(meterd::emulator::EmulatorArgs),
    /// Run the real agent against the embedded emulator, with one hour passing per minute.
    #[cfg(feature = "emulator")]
    Demo(meterd::demo::DemoArgs),
    /// Not in this build: the emulator (cargo feature `emulator`).
    #[cfg(not(feature = "emulator"))]
    Emulator(NotBuilt),
    /// Not in this build: the demo needs the emulator (cargo feature `emulator`).
    #[cfg(not(feature = "emulator"))]
    Demo(NotBuilt),
}

/// Whatever arguments a command this build leaves out was given.
#[cfg(not(feature = "emulator"))]
#[derive(clap::Args, Debug)]
struct NotBuilt {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _args: Vec<String>,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("meterd: {e}");
        Exit::BadConfig.into()
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` print to stdout and succeed; anything else is a usage error.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    init_logging(cli.log_format, &cli.log_level);
    if meterd::entitlement::baked::BAKED.is_locked() {
        // A locked build talks only to AWS: the SDK ignores endpoint URLs from the environment
        // and the shared config files (aws.endpoint_url is checked by the build step). Set
        // here, before any thread exists.
        for var in meterd::entitlement::baked::ENDPOINT_ENV_VARS {
            if std::env::var_os(var).is_some() {
                tracing::warn!(variable = var, "ignored: a locked build sends only to AWS");
            }
        }
        std::env::set_var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meterd: cannot start the runtime: {e}");
            return Exit::Failure.into();
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run(c) => run(&c.config).await,
            Command::Report {
                config,
                dimension,
                quantity,
                tags,
                id,
            } => report(&config.config, dimension, quantity, tags, id).await,
            Command::Status(c) => status(&c.config).await,
            Command::Health(c) => health(&c.config).await,
            Command::CheckConfig(c) => match load_config(&c.config) {
                // The same build step `run` takes before it creates or serves anything.
                Ok(config) => match agent::Prepared::build(&config, None) {
                    Err(e) => {
                        eprintln!("meterd: {}: {e}", c.config.display());
                        Exit::from(&e).into()
                    }
                    Ok(_) => {
                        println!(
                            "{}: valid (product {}, {} dimensions)",
                            c.config.display(),
                            config.product_code,
                            config.metering.dimensions.len()
                        );
                        Exit::Ok.into()
                    }
                },
                Err(code) => code,
            },
            Command::Records {
                config,
                limit,
                json,
                format,
                since,
                until,
                ledger,
            } => {
                let format = if json { RecordsFormat::Json } else { format };
                let filter = meterd::ledger::RecordFilter {
                    since,
                    until,
                    limit,
                };
                records(&config.config, ledger.as_deref(), &filter, format)
            }
            Command::Keys { config } => keys(config.as_deref()),
            Command::Ledger {
                action: LedgerCommand::Quarantine(c),
            } => quarantine(&c.config),
            Command::Doctor(c) => doctor(&c.config).await,
            Command::ListingCheck {
                config,
                send,
                quantity,
            } => listing_check(&config.config, send, quantity).await,
            #[cfg(feature = "emulator")]
            Command::Emulator(args) => match meterd::emulator::run_cli(args).await {
                Ok(()) => Exit::Ok.into(),
                Err(e) => {
                    eprintln!("meterd emulator: {e:#}");
                    if e.downcast_ref::<meterd::emulator::ConfigError>().is_some() {
                        Exit::BadConfig.into()
                    } else {
                        Exit::Failure.into()
                    }
                }
            },
            #[cfg(feature = "emulator")]
            Command::Demo(args) => match meterd::demo::run(args).await {
                Ok(()) => Exit::Ok.into(),
                Err(e) => {
                    eprintln!("meterd demo: {e:#}");
                    Exit::Failure.into()
                }
            },
            #[cfg(not(feature = "emulator"))]
            Command::Emulator(_) | Command::Demo(_) => {
                eprintln!(
                    "meterd: this binary was built without the emulator (cargo feature `emulator`), as the production image is; \
                     run the emulator and the demo from a development build (cargo run -- emulator)"
                );
                Exit::BadConfig.into()
            }
        }
    })
}

async fn run(config_path: &Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let shutdown = CancellationToken::new();
    let grace = config.server.grace_period;
    tokio::spawn(meterd::signals::watch_agent(shutdown.clone(), grace));
    let ctx = RunContext::new(Arc::new(SystemClock), shutdown);
    match agent::run(config, None, ctx).await {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            let exit = Exit::from(&e);
            tracing::error!(exit_code = exit.as_code(), "meterd stopped: {e}");
            exit.into()
        }
    }
}

/// The agent's bearer token for a subcommand, or the exit code after saying why it is unreadable.
fn auth_token(command: &str, config: &Config) -> Result<Option<String>, ExitCode> {
    config.auth_token().map_err(|e| {
        eprintln!(
            "{command}: cannot read server.auth_token_file {:?}: {e}",
            config.server.auth_token_file
        );
        Exit::Failure.into()
    })
}

async fn report(
    config_path: &Path,
    dimension: String,
    quantity: i64,
    tags: Vec<(String, String)>,
    id: Option<String>,
) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut event = serde_json::json!({"dimension": dimension, "quantity": quantity});
    if !tags.is_empty() {
        event["tags"] = serde_json::Value::Object(
            tags.into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect(),
        );
    }
    if let Some(id) = id {
        event["id"] = serde_json::Value::String(id);
    }
    let token = match auth_token("meterd report", &config) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let request = AgentRequest {
        command: "meterd report",
        method: Method::POST,
        path: "/v1/usage",
        body: Some(event.to_string().into_bytes()),
        token,
        timeout: Duration::from_secs(30),
    };
    match ask_agent(&config, request).await {
        Ok(body) => {
            println!("{}", String::from_utf8_lossy(&body));
            Exit::Ok.into()
        }
        Err(code) => code,
    }
}

/// One request of a `meterd` subcommand to the running agent.
struct AgentRequest {
    command: &'static str,
    method: Method,
    path: &'static str,
    body: Option<Vec<u8>>,
    token: Option<String>,
    timeout: Duration,
}

/// The body of the agent's 200, or the exit code after saying on stderr what went wrong.
async fn ask_agent(config: &Config, r: AgentRequest) -> Result<Bytes, ExitCode> {
    let target = Target::from_config(config);
    match local_client::call(
        &target,
        r.method,
        r.path,
        r.body,
        r.token.as_deref(),
        r.timeout,
    )
    .await
    {
        Ok((StatusCode::OK, body)) => Ok(body),
        Ok((status, body)) => {
            eprintln!(
                "{}: {status}: {}",
                r.command,
                String::from_utf8_lossy(&body)
            );
            Err(Exit::Failure.into())
        }
        Err(e) => {
            eprintln!("{}: cannot reach the agent: {e:#}", r.command);
            Err(Exit::Failure.into())
        }
    }
}

async fn status(config_path: &Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let token = match auth_token("meterd status", &config) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let request = AgentRequest {
        command: "meterd status",
        method: Method::GET,
        path: "/v1/status",
        body: None,
        token,
        timeout: Duration::from_secs(10),
    };
    match ask_agent(&config, request).await {
        Ok(body) => {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                Err(_) => println!("{}", String::from_utf8_lossy(&body)),
            }
            Exit::Ok.into()
        }
        Err(code) => code,
    }
}

async fn health(config_path: &Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let request = AgentRequest {
        command: "meterd health: not ready",
        method: Method::GET,
        path: "/readyz",
        body: None,
        token: None,
        timeout: Duration::from_secs(5),
    };
    match ask_agent(&config, request).await {
        Ok(_) => Exit::Ok.into(),
        Err(code) => code,
    }
}

fn quarantine(config_path: &Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let now = meterd::clock::unix_seconds(std::time::SystemTime::now());
    match meterd::ledger::quarantine(&config.state.dir, now) {
        Ok(moved) => {
            println!("{}", moved.display());
            eprintln!(
                "meterd ledger quarantine: moved the ledger to {}; the next start creates an empty one. Its unsent usage: meterd records --ledger {}",
                moved.display(),
                moved.display()
            );
            Exit::Ok.into()
        }
        Err(e) => {
            eprintln!("meterd ledger quarantine: {e}");
            Exit::Ledger.into()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RecordsFormat {
    Table,
    Json,
    Csv,
}

fn parse_time(text: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{e}; expected RFC 3339, e.g. 2026-11-22T10:00:00Z"))?;
    Ok(meterd::clock::unix_seconds(t))
}

fn records(
    config_path: &Path,
    ledger: Option<&Path>,
    filter: &meterd::ledger::RecordFilter,
    format: RecordsFormat,
) -> ExitCode {
    let read = match ledger {
        Some(path) => meterd::ledger::read_records_of_file(path, filter),
        None => match load_config(config_path) {
            Ok(c) => meterd::ledger::read_records_filtered(&c.state.dir, filter),
            Err(code) => return code,
        },
    };
    let records = match read {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meterd records: {e}");
            return Exit::Failure.into();
        }
    };
    match format {
        RecordsFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&records).unwrap_or_default()
        ),
        RecordsFormat::Csv => print!("{}", records_csv(&records)),
        RecordsFormat::Table => print_table(records),
    }
    Exit::Ok.into()
}

fn state_name(state: meterd::ledger::RecordState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn records_csv(records: &[meterd::ledger::StoredRecord]) -> String {
    fn field(text: &str) -> String {
        if text.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text.to_owned()
        }
    }
    let mut out = String::from(
        "hour,dimension,quantity,state,attempts,metering_record_id,last_error,timestamp,sealed_at,updated_at,record_key,allocations\n",
    );
    for r in records {
        let allocations = r
            .allocations
            .as_ref()
            .map(|a| serde_json::to_string(a).unwrap_or_default())
            .unwrap_or_default();
        let row = [
            rfc3339(r.hour),
            r.dimension.clone(),
            r.quantity.to_string(),
            state_name(r.state),
            r.attempts.to_string(),
            r.metering_record_id.clone().unwrap_or_default(),
            r.last_error.clone().unwrap_or_default(),
            rfc3339(r.timestamp),
            rfc3339(r.sealed_at),
            rfc3339(r.updated_at),
            r.client_token.clone(),
            allocations,
        ];
        let row: Vec<String> = row.iter().map(|f| field(f)).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

fn print_table(records: Vec<meterd::ledger::StoredRecord>) {
    println!(
        "{:<21} {:<24} {:>12} {:<10} {:>8}  METERING RECORD ID / LAST ERROR",
        "HOUR", "DIMENSION", "QUANTITY", "STATE", "ATTEMPTS"
    );
    for r in records {
        let state = state_name(r.state);
        let detail = r.metering_record_id.or(r.last_error).unwrap_or_default();
        println!(
            "{:<21} {:<24} {:>12} {:<10} {:>8}  {}",
            rfc3339(r.hour),
            r.dimension,
            r.quantity,
            state,
            r.attempts,
            detail
        );
    }
}

fn keys(config_path: Option<&Path>) -> ExitCode {
    let (files, version) = match config_path.filter(|p| p.exists()) {
        Some(p) => match load_config(p) {
            Ok(c) => (
                c.registration.public_key_files,
                c.registration.public_key_version,
            ),
            Err(code) => return code,
        },
        None => (Vec::new(), 1),
    };
    match meterd::entitlement::Keyring::load(&files, version) {
        Ok(keyring) => {
            print!("{}", keyring.report().render());
            println!("{}", meterd::entitlement::baked::BAKED.describe());
            Exit::Ok.into()
        }
        Err(e) => {
            eprintln!("meterd keys: {e}");
            Exit::BadConfig.into()
        }
    }
}

async fn listing_check(config_path: &Path, send: bool, quantity: i32) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let client = build_client(&AwsSettings::from_config(&config)).await;
    let clock: meterd::clock::SharedClock = Arc::new(SystemClock);
    let report = meterd::listing::listing_check(
        &config,
        &client,
        &clock,
        &meterd::platform::process_env,
        send,
        quantity,
    )
    .await;
    print!("{}", report.render());
    if report.passed() {
        Exit::Ok.into()
    } else {
        Exit::Failure.into()
    }
}

async fn doctor(config_path: &Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match meterd::entitlement::doctor::doctor_for_config(&config).await {
        Ok(true) => Exit::Ok.into(),
        Ok(false) => Exit::Failure.into(),
        Err(e) => {
            eprintln!("meterd doctor: {e:#}");
            Exit::Failure.into()
        }
    }
}
