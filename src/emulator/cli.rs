//! `meterd emulator`: serves the emulator until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;

use super::config::{ConfigError, EmulatorConfig};
use crate::clock::{ScaledClock, SharedClock, SystemClock};

/// The fastest `--time-scale`: an hour a second.
pub const MAX_TIME_SCALE: f64 = 3600.0;

/// Flags of `meterd emulator`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Serve a local AWS Marketplace Metering Service emulator (AWS JSON 1.1 over HTTP)"
)]
pub struct EmulatorArgs {
    /// Address to serve on. Port 0 picks a free port; the chosen address is printed as
    /// `meterd emulator listening on http://ADDR` and written to --addr-file.
    #[arg(long, default_value = "127.0.0.1:8478", env = "METERD_EMULATOR_LISTEN")]
    pub listen: SocketAddr,

    /// TOML configuration (products, dimensions, entitlements, customers, registration
    /// tokens, keys, credentials, region, faults). Without it the demo product
    /// `prod-demo1234` (dimensions `requests`, `gigabytes`, region us-east-1) is served.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Seed for fault injection and generated ids and keys; overrides the file's `seed`.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Region of the endpoint and of the caller's resources; overrides the file's `region`.
    #[arg(long)]
    pub region: Option<String>,

    /// Accept this access key id and secret and verify signatures (repeatable). Adds to the
    /// file's `[credentials]`. Without any, every well-formed SigV4 header is accepted.
    #[arg(long = "credential", value_name = "ACCESS_KEY_ID:SECRET")]
    pub credentials: Vec<String>,

    /// For demos only: run the emulator clock this many times faster than real time
    /// (60 makes an hour pass in a minute; 1 to 3600). Never use it for billing tests.
    #[arg(long, value_name = "FACTOR")]
    pub time_scale: Option<f64>,

    /// For demos: the emulator clock's starting time (RFC 3339), e.g. 2026-01-01T00:00:00Z.
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339)]
    pub start_time: Option<SystemTime>,

    /// Write the RegisterUsage public key (SPKI PEM) of --public-key-version to this file,
    /// for the agent to trust.
    #[arg(long, value_name = "PATH")]
    pub public_key_out: Option<PathBuf>,

    /// Which PublicKeyVersion --public-key-out writes.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub public_key_version: u32,

    /// Write the endpoint URL (`http://ADDR`) to this file once listening.
    #[arg(long, value_name = "PATH")]
    pub addr_file: Option<PathBuf>,
}

fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{e} (expected e.g. 2026-01-01T00:00:00Z)"))
}

impl EmulatorArgs {
    /// The configuration these flags describe, validated. Errors are [`ConfigError`]s
    /// (exit code 64) or file errors.
    pub fn load_config(&self) -> anyhow::Result<EmulatorConfig> {
        let mut config = match &self.config {
            Some(path) => EmulatorConfig::load(path)?,
            None => EmulatorConfig {
                quotas: super::quotas::QuotaConfig {
                    default_account: super::config::DEMO_BUYER_ACCOUNT.to_owned(),
                    ..super::quotas::QuotaConfig::default()
                },
                ..EmulatorConfig::demo()
            },
        };
        let mut problems = Vec::new();
        if let Some(seed) = self.seed {
            config.seed = Some(seed);
        }
        if let Some(region) = &self.region {
            config.region = region.clone();
        }
        for credential in &self.credentials {
            match credential.split_once(':') {
                Some((key, secret)) if !key.is_empty() && !secret.is_empty() => {
                    config.credentials.insert(key.to_owned(), secret.to_owned());
                }
                _ => problems.push(format!(
                    "--credential {credential:?} must be ACCESS_KEY_ID:SECRET"
                )),
            }
        }
        if let Some(scale) = self.time_scale {
            // Bounded as `meterd demo` bounds it: a scaled clock multiplies real time by it.
            if !(scale.is_finite() && (1.0..=MAX_TIME_SCALE).contains(&scale)) {
                problems.push(format!(
                    "--time-scale must be between 1 and {MAX_TIME_SCALE}, got {scale}"
                ));
            }
        }
        if let Err(e) = config.validate() {
            problems.extend(e.problems);
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems }.into());
        }
        Ok(config)
    }

    fn clock(&self) -> SharedClock {
        match (self.time_scale, self.start_time) {
            (None, None) => Arc::new(SystemClock),
            (scale, start) => {
                ScaledClock::new(start.unwrap_or_else(SystemTime::now), scale.unwrap_or(1.0))
            }
        }
    }
}

/// Runs `meterd emulator` until SIGINT or SIGTERM.
pub async fn run_cli(args: EmulatorArgs) -> anyhow::Result<()> {
    let config = args.load_config()?;
    if args.time_scale.is_some() {
        tracing::warn!(
            scale = args.time_scale,
            "emulator clock is scaled: for demos only"
        );
    }
    let handle = super::start(config, args.clock(), args.listen).await?;
    if let Some(path) = &args.public_key_out {
        let pem = handle
            .public_key_pem(args.public_key_version)
            .with_context(|| {
                format!(
                    "--public-key-version {} is not configured",
                    args.public_key_version
                )
            })?;
        std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %path.display(), version = args.public_key_version, "public key written");
    }
    let url = handle.endpoint_url();
    if let Some(path) = &args.addr_file {
        std::fs::write(path, format!("{url}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("meterd emulator listening on {url}");
    crate::signals::first_stop().await;
    tracing::info!("shutting down the emulator");
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EmulatorArgs,
    }

    #[test]
    fn flags_parse_and_override_the_demo() {
        let cli = Cli::try_parse_from([
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--seed",
            "9",
            "--credential",
            "AKID:secret",
            "--region",
            "eu-west-1",
        ])
        .expect("parses");
        let config = cli.args.load_config().expect("valid");
        assert_eq!(config.seed, Some(9));
        assert_eq!(config.region, "eu-west-1");
        assert_eq!(
            config.credentials.get("AKID").map(String::as_str),
            Some("secret")
        );
    }

    #[test]
    fn bad_flags_are_config_errors() {
        let cli = Cli::try_parse_from(["emulator", "--credential", "nocolon", "--time-scale=-1"])
            .expect("parses");
        let err = cli.args.load_config().expect_err("invalid");
        let err = err.downcast::<ConfigError>().expect("ConfigError");
        assert_eq!(err.problems.len(), 2);
    }

    #[test]
    fn time_scale_is_bounded() {
        for (scale, ok) in [
            ("1", true),
            ("3600", true),
            ("1e300", false),
            ("0.5", false),
        ] {
            let cli = Cli::try_parse_from(["emulator", &format!("--time-scale={scale}")])
                .expect("parses");
            assert_eq!(cli.args.load_config().is_ok(), ok, "--time-scale={scale}");
        }
    }
}
