//! meterd: a metering agent for AWS Marketplace sellers.
//!
//! The crate follows the path of a usage count:
//!
//! - [`config`]: the agent's TOML configuration, validated in full before anything starts.
//! - [`ingest`]: the local HTTP API (`POST /v1/usage` and friends) on TCP and a Unix socket.
//! - [`ledger`]: the durable SQLite ledger with group commit; a 200 means fsynced.
//! - [`seal`]: turns a closed hour's counters into one record per dimension, with allocations;
//!   [`seal::schedule`] decides when each hour is sealed.
//! - [`send`]: delivers sealed records with MeterUsage, retrying until AWS confirms.
//! - [`entitlement`]: RegisterUsage at start-up and PS256 verification against the keyring.
//! - [`audit`]: each record's final outcome exported once as a JSON line and/or log event.
//! - [`agent`]: wires the above together under one root `run` and a cancellation token.
//!
//! Beside the agent: `emulator` (cargo feature `emulator`, on by default, off in the production
//! image), a faithful Metering Service for tests and sellers;
//! [`model`], the value types the steps share and the service's rules; [`clock`], wall-clock
//! time as a dependency; [`rate`], the send limit and the emulator's
//! quotas; [`aws`], the SDK client and error classes; [`exit`], every process exit code;
//! [`http_client`], the one small HTTP/1 client; [`signals`], the one signal handler;
//! [`transport`], the agent's listeners.

#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod aws;
pub mod backoff;
pub mod clock;
pub mod config;
#[cfg(feature = "emulator")]
pub mod demo;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod entitlement;
pub mod exit;
pub mod http_client;
pub mod ingest;
pub mod ledger;
pub mod listing;
pub mod local_client;
pub mod metrics;
pub mod model;
pub mod platform;
pub mod rate;
pub mod seal;
pub mod send;
pub mod serve;
pub mod signals;
pub mod status;
pub mod transport;
