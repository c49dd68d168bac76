//! `meterd listing-check`: the pre-listing test AWS Marketplace asks sellers for.
//!
//! Before a custom-metered product is published, AWS asks for one metering record for every
//! pricing dimension, sent from the seller's account in us-east-1, and the MeteringRecordIds
//! in the request to seller operations. This runs that test the way the agent would meter:
//! it shows the platform, credentials and region, runs the MeterUsage DryRun for every
//! dimension, and with `--send` sends one record per dimension for the last closed hour and
//! prints the ids and the region. Like the product's limited (preview) listing, it does not
//! verify entitlement: no RegisterUsage, no ledger.

use std::fmt::Write as _;

use aws_sdk_marketplacemetering::primitives::DateTime;
use aws_sdk_marketplacemetering::Client;

use crate::aws::CallFailure;
use crate::backoff::{retry, Backoff, RetryError};
use crate::clock::{hour_floor, rfc3339, unix_seconds, SharedClock, HOUR_SECS};
use crate::config::Config;
use crate::entitlement::dry_run::dry_run_call;
use crate::platform::{self, Env, ImdsSettings, Platform};

/// The region AWS asks the pre-listing records to come from.
pub const LISTING_REGION: &str = "us-east-1";
/// Attempts per call when the service throttles or fails.
const ATTEMPTS: u32 = 4;

/// One dimension's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimensionResult {
    pub dimension: String,
    pub dry_run: Result<(), String>,
    /// With `--send`: the MeteringRecordId, or why there is none.
    pub record: Option<Result<String, String>>,
}

/// What `listing-check` found, ready to print.
#[derive(Debug, Clone)]
pub struct ListingReport {
    pub platform: Platform,
    pub credentials: String,
    pub region: Option<String>,
    /// The hour the records were sent for (the last closed one).
    pub hour: i64,
    pub dimensions: Vec<DimensionResult>,
    pub problems: Vec<String>,
}

impl ListingReport {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
            && self
                .dimensions
                .iter()
                .all(|d| d.dry_run.is_ok() && d.record.as_ref().is_none_or(|r| r.is_ok()))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "platform     {}", self.platform);
        let _ = writeln!(out, "credentials  {}", self.credentials);
        let _ = writeln!(
            out,
            "region       {}",
            self.region.as_deref().unwrap_or("(none resolved)")
        );
        for d in &self.dimensions {
            let dry = match &d.dry_run {
                Ok(()) => "dry run ok".to_owned(),
                Err(e) => format!("dry run FAILED: {e}"),
            };
            let sent = match &d.record {
                None => String::new(),
                Some(Ok(id)) => format!("  {}  MeteringRecordId {id}", rfc3339(self.hour)),
                Some(Err(e)) => format!("  record FAILED: {e}"),
            };
            let _ = writeln!(out, "dimension    {:<24} {dry}{sent}", d.dimension);
        }
        for p in &self.problems {
            let _ = writeln!(out, "problem      {p}");
        }
        if self.passed() && self.dimensions.iter().any(|d| d.record.is_some()) {
            let _ = writeln!(
                out,
                "\nFor AWS Marketplace seller operations: one record per dimension, sent from region {} for {}:",
                self.region.as_deref().unwrap_or("?"),
                rfc3339(self.hour)
            );
            for d in &self.dimensions {
                if let Some(Ok(id)) = &d.record {
                    let _ = writeln!(out, "  {}: {id}", d.dimension);
                }
            }
        }
        out
    }
}

/// Runs the check; with `send`, one MeterUsage of `quantity` per dimension for the last
/// closed hour.
pub async fn listing_check(
    config: &Config,
    client: &Client,
    clock: &SharedClock,
    env: Env<'_>,
    send: bool,
    quantity: i32,
) -> ListingReport {
    let info = platform::detect(None, env, &ImdsSettings::from_env(env)).await;
    let region = client.config().region().map(|r| r.to_string());
    let mut problems = Vec::new();
    if !config.pricing.meters() {
        problems.push(format!(
            "pricing = \"{}\" has no custom dimensions: there is nothing to send; AWS tests RegisterUsage by running the product",
            config.pricing
        ));
    }
    match region.as_deref() {
        Some(LISTING_REGION) => {}
        Some(other) => problems.push(format!(
            "the region is {other}; AWS asks for the pre-listing records from {LISTING_REGION} (set AWS_REGION={LISTING_REGION})"
        )),
        None => problems.push(format!("no region resolved; set AWS_REGION={LISTING_REGION}")),
    }
    let now = unix_seconds(clock.now());
    let hour = hour_floor(now) - HOUR_SECS;
    let mut dimensions = Vec::new();
    for dimension in &config.metering.dimensions {
        let dry_run = retried(clock, || async {
            dry_run_call(client, &config.product_code, dimension, clock.now())
                .await
                .0
        })
        .await
        .map_err(|f| f.to_string());
        let mut record = None;
        if send && dry_run.is_ok() {
            // One token per record: a retry after a lost answer gets the same record back.
            let token = uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string();
            let sent = retried(clock, || {
                meter_once(
                    client,
                    &config.product_code,
                    dimension,
                    hour,
                    quantity,
                    &token,
                )
            })
            .await;
            record = Some(sent.map_err(|f| f.to_string()));
        }
        dimensions.push(DimensionResult {
            dimension: dimension.clone(),
            dry_run,
            record,
        });
    }
    ListingReport {
        platform: info.platform,
        credentials: info.credentials.describe().to_owned(),
        region,
        hour,
        dimensions,
        problems,
    }
}

/// Throttling and transient failures are tried a few times, on the clock.
async fn retried<T, F, Fut>(clock: &SharedClock, op: F) -> Result<T, CallFailure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CallFailure>>,
{
    retry(
        clock,
        &Backoff::default(),
        Some(ATTEMPTS),
        None,
        CallFailure::is_retryable,
        |attempt, failure, _| tracing::warn!(attempt, "will retry: {failure}"),
        op,
    )
    .await
    .map_err(RetryError::into_inner)
}

/// One MeterUsage for `hour` with `token` as its ClientToken.
async fn meter_once(
    client: &Client,
    product_code: &str,
    dimension: &str,
    hour: i64,
    quantity: i32,
    token: &str,
) -> Result<String, CallFailure> {
    client
        .meter_usage()
        .client_token(token)
        .product_code(product_code)
        .usage_dimension(dimension)
        .usage_quantity(quantity)
        .timestamp(DateTime::from_secs(hour))
        .send()
        .await
        .map(|out| out.metering_record_id.unwrap_or_default())
        .map_err(|e| CallFailure::from_sdk(&e))
}
