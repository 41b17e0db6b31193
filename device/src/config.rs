//! How a device connects and how large its queues are.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::Error;
use crate::mqtt::{BrokerAddr, Protocol, Tls};
use crate::state::MessageKind;

/// A device's settings. [`Config::new`] fills in the defaults; every field
/// may be changed before [`Device::new`](crate::Device::new), which checks
/// them.
#[derive(Debug, Clone)]
pub struct Config {
    /// The device id: client id and user name (a registered device; no
    /// `/`, `+` or `#`).
    pub device_id: String,
    /// Its secret; `None` to log in by client certificate alone (over TLS
    /// with [`Tls::with_client_certificate`]).
    pub password: Option<String>,
    /// The gateways' MQTT addresses, tried in turn: the device starts at
    /// [`Config::first_gateway`] and moves to the next one whenever a
    /// connection fails or is lost.
    pub gateways: Arc<[BrokerAddr]>,
    /// Index of the first gateway tried (a fleet spreads its devices).
    pub first_gateway: usize,
    /// MQTT 3.1.1 (default) or 5.
    pub protocol: Protocol,
    /// TLS (the gateways' TLS listener), if set.
    pub tls: Option<Tls>,
    /// Keep-alive interval (at least 1 s; default 30 s).
    pub keep_alive: Duration,
    /// Longest connection attempt, TCP connect to CONNACK (default 30 s).
    pub attempt_timeout: Duration,
    /// First reconnect delay (default 100 ms); each failure doubles it.
    pub backoff_base: Duration,
    /// Longest reconnect delay (default 5 s). Each delay is drawn from
    /// `[d/2, d]` so devices that lost a gateway together do not come back
    /// together.
    pub backoff_max: Duration,
    /// Unacknowledged QoS 1 messages at once (default 8). rumqttc sizes its
    /// per-connection tables by it: keep it small in a large fleet.
    pub inflight: u16,
    /// Requests between the device and its connection's event loop
    /// (default 8).
    pub channel_capacity: usize,
    /// Messages waiting to be handed to the connection (answers, reports
    /// and repeated results); past it [`Device::accept`](crate::Device::accept)
    /// and friends return [`Error::QueueFull`] (default 256).
    pub outbox_limit: usize,
    /// Commands remembered for de-duplication, with their results
    /// (default 64). A redelivery comes on the next connection; a command
    /// forgotten is delivered to the application again.
    pub dedup_capacity: usize,
    /// Reported patches made within this window are sent as one message
    /// (default 50 ms; zero: at once). While offline they are merged until
    /// the next connection whatever the window.
    pub report_window: Duration,
    /// Seed of the back-off jitter (default: derived from the device id).
    pub seed: u64,
    /// A gate shared by many devices: each connection attempt holds a
    /// permit, bounding the handshakes in progress at once (a fleet).
    pub connect_gate: Option<Arc<Semaphore>>,
    /// Counters to add this device's traffic to (shared by a fleet, or
    /// read for metrics).
    pub counters: Option<Arc<Counters>>,
}

impl Config {
    /// A device `device_id` logging in with `password` to `gateways`
    /// (`host:port`, IPv6 as `[::1]:1883`), everything else as documented
    /// on the fields.
    pub fn new<I, S>(device_id: &str, password: &str, gateways: I) -> Result<Config, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let gateways = gateways
            .into_iter()
            .map(|g| BrokerAddr::parse(g.as_ref()).map_err(Error::Config))
            .collect::<Result<Vec<_>, _>>()?;
        let config = Config::with_addresses(device_id, Some(password), gateways.into());
        config.check()?;
        Ok(config)
    }

    /// Like [`Config::new`] with parsed addresses (and no password if
    /// `None`); not checked until [`Device::new`](crate::Device::new).
    pub fn with_addresses(
        device_id: &str,
        password: Option<&str>,
        gateways: Arc<[BrokerAddr]>,
    ) -> Config {
        Config {
            device_id: device_id.to_string(),
            password: password.map(str::to_string),
            gateways,
            first_gateway: 0,
            protocol: Protocol::V4,
            tls: None,
            keep_alive: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            inflight: 8,
            channel_capacity: 8,
            outbox_limit: 256,
            dedup_capacity: 64,
            report_window: Duration::from_millis(50),
            seed: seed_of(device_id),
            connect_gate: None,
            counters: None,
        }
    }

    /// Checks the settings, saying which one is wrong.
    pub fn check(&self) -> Result<(), Error> {
        let id = &self.device_id;
        if id.is_empty() || id.contains(['/', '+', '#']) || id.len() > 256 {
            return Err(Error::Config(format!(
                "device id {:?}: 1 to 256 characters, no '/', '+' or '#'",
                id.chars().take(64).collect::<String>()
            )));
        }
        if self.gateways.is_empty() {
            return Err(Error::Config("give at least one gateway address".into()));
        }
        if self.password.is_none() && self.tls.is_none() {
            return Err(Error::Config(
                "without a password the device needs TLS with a client certificate".into(),
            ));
        }
        if self.outbox_limit == 0 || self.dedup_capacity == 0 || self.inflight == 0 {
            return Err(Error::Config(
                "outbox_limit, dedup_capacity and inflight must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A stable seed from the device id (FNV-1a), so devices differ.
fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What one device or a whole fleet sent and got, counted as it happens
/// (relaxed atomics: read them for statistics and metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages handed to the connection, by [`MessageKind::index`].
    pub sent: [AtomicU64; 3],
    /// Messages the gateway acknowledged, by kind (approximate by kind if
    /// a gateway refuses one and it is matched late; exact in total).
    pub delivered: [AtomicU64; 3],
    /// Messages the gateway refused (MQTT 5 PUBACK reason codes).
    pub refused: AtomicU64,
    /// Commands delivered to the application.
    pub commands: AtomicU64,
    /// Redelivered commands the library answered or dropped itself.
    pub duplicates: AtomicU64,
    /// Incoming messages the library could not use (malformed, unknown
    /// topics).
    pub ignored: AtomicU64,
    /// Reported patches merged into another message before it was sent.
    pub reports_coalesced: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages of `kind` sent.
    pub fn sent(&self, kind: MessageKind) -> u64 {
        self.sent[kind.index()].load(Ordering::Relaxed)
    }

    /// Messages of `kind` acknowledged.
    pub fn delivered(&self, kind: MessageKind) -> u64 {
        self.delivered[kind.index()].load(Ordering::Relaxed)
    }
}
