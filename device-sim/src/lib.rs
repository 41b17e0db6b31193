//! Simulated Entente devices and load generators.
//!
//! - [`fleet`]: many devices in one process, one task each, answering
//!   commands, applying desired state, reporting, churning and failing over.
//! - [`bench`]: operator-side load — commands over REST at a fixed rate,
//!   followed to the device and to their committed result.
//! - [`ingest`]: MQTT ingest throughput and publish → PUBACK latency,
//!   against Entente or any broker.
//! - [`run`]: a fleet kept running, with connection rate and memory per
//!   device on both sides.
//!
//! The binary `device-sim` exposes them as subcommands ([`cli`]).
#![deny(missing_docs)]

pub mod backoff;
pub mod bench;
pub mod cli;
pub mod creds;
pub mod device;
pub mod fleet;
pub mod ingest;
pub mod job;
pub mod mqtt;
pub mod rest;
pub mod rng;
pub mod run;
pub mod sse;
pub mod stats;
pub mod status;

/// Sleeps until `t`, or forever when `None` (an optional timer for
/// `select!`).
pub(crate) async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
