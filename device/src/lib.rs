//! `entente-device`: what a device embeds to talk to Entente gateways over
//! MQTT — the contract of `entente-protocol` (docs/ARCHITECTURE.md, "Devices
//! over MQTT" and "The device library") with the parts every device needs
//! done right:
//!
//! - **Connection**: client id = username = the device id, password = its
//!   secret (or a client certificate over TLS), a persistent session, a
//!   list of gateways tried in turn with jittered exponential back-off
//!   (bounded), QoS 1 subscriptions renewed on every connection.
//! - **Commands** as typed values ([`Command`]), delivered to the
//!   application **once** although the gateway delivers them at least once
//!   (de-duplicated by id, with bounded memory); the application answers
//!   through the device ([`Device::accept`], [`Device::succeed`],
//!   [`Device::fail`]) and the library sends the answers until the gateway
//!   acknowledges them (QoS 1, sent again after a reconnect, even to
//!   another gateway). A redelivered command that already has a result gets
//!   the same result again, without the application seeing it.
//! - **Shadow**: the desired state the gateway holds, the state the device
//!   reported, and the difference ([`Event::Delta`]); reported patches
//!   ([`Device::report`]) are merged (JSON merge patch) into one message per
//!   short window, and while offline.
//! - **Refusals as typed errors** ([`Error`], [`Refusal`]): bad
//!   credentials, not authorized, a server busy or throttling, a refused
//!   subscription or message.
//! - **Hostile input**: nothing the network sends makes it panic; every
//!   queue is bounded (see [`Config`]).
//!
//! The message handling is a pure state machine, [`state::DeviceState`]
//! (no I/O; property-tested with arbitrary topics and payloads); [`Device`]
//! moves messages between it and one rumqttc connection ([`mqtt`]).
//!
//! ```no_run
//! use entente_device::{Config, Device, Event};
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), entente_device::Error> {
//! let config = Config::new("valve-7", "its-secret", ["127.0.0.1:1883", "127.0.0.1:2883"])?;
//! let mut device = Device::new(config)?;
//! loop {
//!     match device.next_event().await {
//!         Event::Command(cmd) => {
//!             device.accept(&cmd.id)?;
//!             device.succeed(&cmd.id, json!({ "done": cmd.name }))?;
//!         }
//!         Event::Delta(delta) => device.report(serde_json::Value::Object(delta.state))?,
//!         _ => {}
//!     }
//! }
//! # }
//! ```
#![deny(missing_docs)]

pub mod backoff;
mod config;
mod device;
mod error;
pub mod mqtt;
pub mod rng;
pub mod state;

pub use config::{Config, Counters};
pub use device::{Connected, Device, Disconnected, Event};
pub use error::{Error, Refusal};
pub use mqtt::{BrokerAddr, Protocol, Tls};
pub use state::{Command, Delta, MessageKind};

/// Sleeps until `t`, or forever when `None` (an optional timer for
/// `select!`).
pub(crate) async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
