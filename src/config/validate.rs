//! The semantic checks of a configuration: every problem found, reported together.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::model::{
    self, Aggregation, MAX_ALLOCATIONS_CEILING, MAX_DIMENSIONS, MAX_QUANTITY, MAX_TAG_KEYS,
};
use crate::serve::MAX_CONNECTIONS_CEILING;

use super::*;

impl Config {
    /// All semantic problems; empty when the configuration is usable.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = model::check_product_code(&self.product_code) {
            problems.push(e);
        }
        if let Some(enabled) = self.registration.enabled {
            problems.push(format!(
                "registration.enabled is replaced by the top-level pricing key: remove it and set {}",
                if enabled {
                    "pricing = \"hourly+custom\" (RegisterUsage at start-up, then MeterUsage every hour) or pricing = \"hourly\" (RegisterUsage only)"
                } else {
                    "pricing = \"custom\" (MeterUsage only, its DryRun checks entitlement at start-up)"
                }
            ));
        }
        let m = &self.metering;
        problems.extend(self.contract_problems());
        if self.pricing == Pricing::Contract {
            if !m.dimensions.is_empty() {
                problems.push(format!(
                    "pricing = \"contract\" has no custom dimensions, but metering.dimensions lists {}; remove them, or set pricing = \"contract+custom\"",
                    m.dimensions.len()
                ));
            }
        } else if !self.pricing.meters() {
            if !m.dimensions.is_empty() {
                problems.push(format!(
                    "pricing = \"hourly\" has no custom dimensions (AWS meters the task hours itself), but metering.dimensions lists {}; remove them, or set pricing = \"hourly+custom\"",
                    m.dimensions.len()
                ));
            }
            if self.platform == PlatformSetting::Ec2 {
                problems.push(
                    "pricing = \"hourly\" cannot run on platform = \"ec2\": RegisterUsage does not work on EC2, and AWS meters an AMI's hourly price itself, so an AMI product with hourly pricing only needs no meterd".to_owned(),
                );
            }
        } else if m.dimensions.is_empty() || m.dimensions.len() > MAX_DIMENSIONS {
            problems.push(format!(
                "pricing = \"{}\" needs metering.dimensions to list 1 to {MAX_DIMENSIONS} custom dimensions, got {}",
                self.pricing,
                m.dimensions.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for d in &m.dimensions {
            if d.is_empty() || d.len() > 255 {
                problems.push(format!(
                    "metering.dimensions: {d:?} must be 1 to 255 characters"
                ));
            }
            if !seen.insert(d) {
                problems.push(format!("metering.dimensions: {d:?} is listed twice"));
            }
        }
        if m.tag_keys.len() > MAX_TAG_KEYS {
            problems.push(format!(
                "metering.tag_keys lists {} keys; the service allows at most {MAX_TAG_KEYS}",
                m.tag_keys.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for k in &m.tag_keys {
            if let Err(e) = model::check_tag_text("key", k, model::TAG_KEY_MAX_LEN) {
                problems.push(format!("metering.tag_keys: {e}"));
            }
            if !seen.insert(k) {
                problems.push(format!("metering.tag_keys: {k:?} is listed twice"));
            }
        }
        let configured: BTreeSet<&String> = m.dimensions.iter().collect();
        for (dimension, aggregation) in &m.aggregation {
            if !configured.contains(dimension) {
                problems.push(format!(
                    "metering.aggregation: {dimension:?} is not one of metering.dimensions"
                ));
            }
            if let Err(e) = aggregation.parse::<Aggregation>() {
                problems.push(format!("metering.aggregation.{dimension}: {e}"));
            }
        }
        for (dimension, units) in &m.heartbeat {
            if !configured.contains(dimension) {
                problems.push(format!(
                    "metering.heartbeat: {dimension:?} is not one of metering.dimensions"
                ));
            }
            if !(1..=MAX_QUANTITY).contains(units) {
                problems.push(format!(
                    "metering.heartbeat.{dimension} must be 1 to {MAX_QUANTITY} units per hour, got {units}"
                ));
            }
            if m.aggregation.contains_key(dimension) {
                problems.push(format!(
                    "metering.heartbeat: {dimension:?} is recorded by meterd itself, so it takes no metering.aggregation; remove one of the two"
                ));
            }
        }
        if m.max_allocations == 0 || m.max_allocations > MAX_ALLOCATIONS_CEILING {
            problems.push(format!(
                "metering.max_allocations must be 1 to {MAX_ALLOCATIONS_CEILING}, got {}",
                m.max_allocations
            ));
        }
        if self.registration.public_key_version == 0 {
            problems.push("registration.public_key_version must be at least 1".to_owned());
        }
        for f in &self.registration.public_key_files {
            if !f.is_file() {
                problems.push(format!(
                    "registration.public_key_files: {} is not a readable file",
                    f.display()
                ));
            }
        }
        if self.server.listen.is_empty() && self.server.unix_socket.is_empty() {
            problems.push("server: set listen, unix_socket, or both".to_owned());
        }
        if !self.server.listen.is_empty() && self.server.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "server.listen {:?} is not an address like 127.0.0.1:8377",
                self.server.listen
            ));
        }
        if !self.server.auth_token_file.is_empty() {
            if let Err(e) = self.auth_token() {
                problems.push(format!(
                    "server.auth_token_file {}: {e}",
                    self.server.auth_token_file
                ));
            }
        }
        if let Some(addr) = self.listen_addr() {
            if !addr.ip().is_loopback()
                && self.server.auth_token_file.is_empty()
                && !self.server.insecure_allow_unauthenticated_network
            {
                problems.push(format!(
                    "server.listen {addr} is reachable from the network but server.auth_token_file is not set, so anyone who can reach it could post usage; set auth_token_file, listen on loopback, or set server.insecure_allow_unauthenticated_network = true"
                ));
            }
        }
        if !(1..=MAX_CONNECTIONS_CEILING).contains(&self.server.max_connections) {
            problems.push(format!(
                "server.max_connections must be 1 to {MAX_CONNECTIONS_CEILING}, got {}",
                self.server.max_connections
            ));
        }
        check_duration(
            &mut problems,
            "server.grace_period",
            self.server.grace_period,
            Duration::from_secs(1),
            MAX_GRACE_PERIOD,
        );
        check_duration(
            &mut problems,
            "registration.startup_budget",
            self.registration.startup_budget,
            Duration::ZERO,
            MAX_STARTUP_BUDGET,
        );
        check_duration(
            &mut problems,
            "sending.call_timeout",
            self.sending.call_timeout,
            Duration::from_secs(1),
            MAX_CALL_TIMEOUT,
        );
        if !self.aws.endpoint_url.is_empty() {
            if let Err(e) = check_endpoint_url(&self.aws.endpoint_url) {
                problems.push(format!("aws.endpoint_url {:?}: {e}", self.aws.endpoint_url));
            }
        }
        if self.state.dir.as_os_str().is_empty() {
            problems.push("state.dir must be set".to_owned());
        }
        let s = &self.sending;
        // The sender's own rules, so a schedule it would refuse is reported here, not replaced.
        if let Err(e) = crate::backoff::Backoff::try_new(s.initial_backoff, s.max_backoff) {
            problems.push(format!(
                "sending.initial_backoff / sending.max_backoff: {e} (initial above zero, at most max, max at most 1h)"
            ));
        }
        if s.seal_delay > Duration::from_secs(600) {
            problems.push("sending.seal_delay must be at most 10m".to_owned());
        }
        if s.spread > MAX_SPREAD {
            problems.push(format!(
                "sending.spread must be at most {} (\"0s\" turns it off)",
                humantime::format_duration(MAX_SPREAD)
            ));
        }
        if !(1..=MAX_CALLS_PER_SECOND).contains(&s.max_calls_per_second) {
            problems.push(format!(
                "sending.max_calls_per_second must be 1 to {MAX_CALLS_PER_SECOND}"
            ));
        }
        if !self.server.metrics_listen.is_empty()
            && self.server.metrics_listen.parse::<SocketAddr>().is_err()
        {
            problems.push(format!(
                "server.metrics_listen {:?} is not an address like 0.0.0.0:9377",
                self.server.metrics_listen
            ));
        }
        if !self.audit.file.is_empty() && !Path::new(&self.audit.file).is_absolute() {
            problems.push(format!(
                "audit.file {:?} must be an absolute path",
                self.audit.file
            ));
        }
        let h = &self.health;
        check_duration(
            &mut problems,
            "health.failing_after",
            h.failing_after,
            MIN_FAILING_AFTER,
            MAX_FAILING_AFTER,
        );
        if h.warn_after < Duration::from_secs(60) {
            problems.push("health.warn_after must be at least 1m".to_owned());
        }
        if !(h.warn_after <= h.degraded_after && h.degraded_after <= h.failing_after) {
            problems.push(
                "health.warn_after, health.degraded_after and health.failing_after must not decrease"
                    .to_owned(),
            );
        }
        problems
    }

    /// `[contract]`: required and checked for contract pricing, refused otherwise.
    fn contract_problems(&self) -> Vec<String> {
        let c = &self.contract;
        let mut problems = Vec::new();
        if !self.pricing.checks_out() {
            if !c.product_sku.is_empty() || !c.entitlements.is_empty() {
                problems.push(format!(
                    "[contract] is for pricing = \"contract\" or \"contract+custom\", not \"{}\"; remove it or change the pricing",
                    self.pricing
                ));
            }
            return problems;
        }
        if c.product_sku.is_empty() || c.product_sku.len() > 255 {
            problems.push(format!(
                "contract.product_sku must be the product's SKU in License Manager (1 to 255 characters), got {:?}",
                c.product_sku
            ));
        }
        if c.key_fingerprint.is_empty() {
            problems.push(
                "contract.key_fingerprint must not be empty (AWS Marketplace's is the default)"
                    .to_owned(),
            );
        }
        if !["provisional", "perpetual"].contains(&c.checkout_type.as_str()) {
            problems.push(format!(
                "contract.checkout_type must be \"provisional\" or \"perpetual\", got {:?}",
                c.checkout_type
            ));
        }
        if c.entitlements.is_empty() || c.entitlements.len() > MAX_CONTRACT_ENTITLEMENTS {
            problems.push(format!(
                "contract.entitlements must list 1 to {MAX_CONTRACT_ENTITLEMENTS} entitlements to check out, got {}",
                c.entitlements.len()
            ));
        }
        match (c.license_token_file.is_empty(), c.role_arn.is_empty()) {
            (true, true) => {}
            (false, false) => {
                if !Path::new(&c.license_token_file).is_absolute() {
                    problems.push(format!(
                        "contract.license_token_file {:?} must be an absolute path",
                        c.license_token_file
                    ));
                }
                let role = c.role_arn.split(':').collect::<Vec<_>>();
                let is_role = role.len() == 6
                    && role[0] == "arn"
                    && role[1].starts_with("aws")
                    && role[2] == "iam"
                    && role[4].len() == 12
                    && role[4].bytes().all(|b| b.is_ascii_digit())
                    && role[5].starts_with("role/");
                if !is_role {
                    problems.push(format!(
                        "contract.role_arn {:?} is not a role ARN (arn:aws:iam::123456789012:role/AWSLicenseManagerConsumptionRole)",
                        c.role_arn
                    ));
                }
            }
            _ => problems.push(
                "contract.license_token_file and contract.role_arn go together (License Manager for Anywhere): set both or neither"
                    .to_owned(),
            ),
        }
        let mut names = BTreeSet::new();
        for e in &c.entitlements {
            if e.name.is_empty() || e.name.len() > 255 || !names.insert(e.name.as_str()) {
                problems.push(format!(
                    "contract.entitlements: name {:?} must be 1 to 255 characters and listed once",
                    e.name
                ));
            }
            if !aws_sdk_licensemanager::types::EntitlementDataUnit::values()
                .contains(&e.unit.as_str())
            {
                problems.push(format!(
                    "contract.entitlements {:?}: unit {:?} is not a License Manager unit (Count, None, Gigabytes, ...)",
                    e.name, e.unit
                ));
            }
            match (e.unit.as_str(), e.count) {
                ("None", Some(_)) => problems.push(format!(
                    "contract.entitlements {:?}: a feature (unit \"None\") has no count",
                    e.name
                )),
                (_, Some(n)) if !(1..=1_000_000_000).contains(&n) => problems.push(format!(
                    "contract.entitlements {:?}: count must be 1 to 1000000000, got {n}",
                    e.name
                )),
                _ => {}
            }
        }
        problems
    }
}
