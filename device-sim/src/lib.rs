//! Simulated Entente devices and load generators.
//!
//! - [`fleet`]: many devices in one process, one task each, each a device of
//!   the device library (`entente-device`), answering commands, applying
//!   desired state, reporting, churning and failing over.
//! - [`bench`]: operator-side load — commands over REST at a fixed rate,
//!   followed to the device and to their committed result.
//! - [`ingest`]: MQTT ingest throughput and publish → PUBACK latency,
//!   against Entente or any broker.
//! - [`run`]: a fleet kept running, with connection rate and memory per
//!   device on both sides.
//!
//! The binary `device-sim` exposes them as subcommands ([`cli`]).
#![deny(missing_docs)]

pub mod bench;
pub mod cli;
pub mod creds;
pub mod device;
pub mod fleet;
pub mod ingest;
pub mod job;
pub mod rest;
pub mod run;
pub mod sse;
pub mod stats;
pub mod status;

/// The MQTT layer, back-off and generator are the device library's.
pub use entente_device::{backoff, mqtt, rng};

/// Sleeps until `t`, or forever when `None` (an optional timer for
/// `select!`).
pub(crate) async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
