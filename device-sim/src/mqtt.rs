//! One MQTT client, whichever protocol version: a thin layer over rumqttc's
//! 3.1.1 and 5 clients so the fleet and the ingest benchmark are written
//! once.
//!
//! rumqttc facts this layer is built around:
//! - The event loop must be polled continuously, and awaiting
//!   `client.publish` from the task that polls can deadlock (the request
//!   channel is full until the loop runs). Callers here only use the
//!   non-blocking `try_*` calls and keep their own outbox.
//! - `EventLoop::poll` is not cancel-safe in every state (a request taken
//!   from the channel can be half written). [`Link`] therefore keeps the
//!   in-progress poll in a future it owns, so a caller may `select!` on
//!   [`Link::next`] together with timers and never drop a poll half way.
//! - Unacknowledged QoS 1 publishes are dropped by rumqttc when the broker
//!   answers CONNACK with `session_present = false` (always the case on a
//!   different gateway). [`Link`] takes them out of the event loop when the
//!   connection fails and puts them back after the next CONNACK, so nothing
//!   a device sent is lost across a failover.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet as Packet5};
use rumqttc::{Packet as Packet4, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Largest packet a simulated client accepts. Buffers grow only as needed,
/// so a generous limit costs nothing until a large packet arrives; the
/// gateway itself refuses payloads over 64 KiB.
pub const MAX_INCOMING_PACKET: usize = 128 * 1024;
/// Largest packet a simulated client sends (its messages are small).
pub const MAX_OUTGOING_PACKET: usize = 16 * 1024;

/// Which MQTT version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5.
    V5,
}

/// A broker address, `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerAddr {
    /// Parses `host:port` (IPv6 as `[::1]:1883`).
    pub fn parse(s: &str) -> Result<BrokerAddr, String> {
        let s = s.trim();
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
        })
    }

    /// Parses a comma-separated list of `host:port`.
    pub fn parse_list(s: &str) -> Result<Vec<BrokerAddr>, String> {
        let list: Vec<BrokerAddr> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(BrokerAddr::parse)
            .collect::<Result<_, _>>()?;
        if list.is_empty() {
            return Err("give at least one host:port".into());
        }
        Ok(list)
    }
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// TLS towards the gateways: trust the CA certificates of a PEM file (and
/// present no client certificate). The broker address's host is the name
/// the server's certificate must carry (an IP address is checked against
/// its IP addresses).
#[derive(Clone)]
pub struct Tls(Arc<tokio_rustls::rustls::ClientConfig>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// Trusts the CA certificates (PEM) in `ca_file`.
    pub fn trusting(ca_file: &std::path::Path) -> anyhow::Result<Tls> {
        use anyhow::Context as _;
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        use tokio_rustls::rustls;
        let what = || format!("reading the CA certificates in {}", ca_file.display());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file).with_context(what)? {
            roots.add(cert.with_context(what)?).with_context(what)?;
        }
        if roots.is_empty() {
            anyhow::bail!("{} holds no CA certificate (PEM)", ca_file.display());
        }
        // ring: the gateway's provider too (builds with the C compiler alone).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls(Arc::new(config)))
    }

    fn transport(&self) -> rumqttc::Transport {
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(self.0.clone()))
    }
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// MQTT version.
    pub protocol: Protocol,
    /// Client id (a device id for Entente).
    pub client_id: String,
    /// Username and password; `None` connects anonymously.
    pub credentials: Option<(String, String)>,
    /// Keep-alive interval (at least one second).
    pub keep_alive: Duration,
    /// Whether the broker should forget the session on disconnect. Devices
    /// use persistent sessions (`false`).
    pub clean_session: bool,
    /// Unacknowledged QoS 1 publishes allowed at once; also sizes rumqttc's
    /// per-client tables, so keep it small.
    pub inflight: u16,
    /// Capacity of the request channel between the client handle and the
    /// event loop.
    pub channel_capacity: usize,
    /// Longest wait for a connection attempt (TCP connect to CONNACK),
    /// whole seconds (at least one).
    pub attempt_timeout: Duration,
    /// TLS, if the broker's listener speaks it.
    pub tls: Option<Tls>,
}

impl ClientSettings {
    fn attempt_timeout_secs(&self) -> u64 {
        self.attempt_timeout.as_secs().max(1)
    }
}

/// What the event loop reported, protocol-independent.
#[derive(Debug, Clone, PartialEq)]
pub enum Ev {
    /// The broker accepted the connection.
    ConnAck {
        /// Whether the broker resumed an earlier session.
        session_present: bool,
    },
    /// A subscription was answered; `ok` is false if any filter was refused.
    SubAck {
        /// Every filter was granted.
        ok: bool,
    },
    /// A message arrived.
    Publish {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Bytes,
    },
    /// The broker acknowledged one of our QoS 1 publishes. Brokers that
    /// acknowledge on receipt do so in order; an Entente gateway does once
    /// the message is committed, in order for a device's reported state, but
    /// a command result may be acknowledged before an earlier report.
    PubAck,
    /// Anything else (pings, outgoing packets).
    Other,
}

/// Why a non-blocking request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// The handle that queues requests for the event loop.
#[derive(Debug, Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Queues a QoS 1 publish; `Busy` if the request channel is full.
    pub fn try_publish(&self, topic: &str, payload: &[u8]) -> Result<(), Busy> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .map_err(|_| Busy),
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    Bytes::copy_from_slice(payload),
                )
                .map_err(|_| Busy),
        }
    }

    /// Queues one SUBSCRIBE with all `filters` at QoS 1.
    pub fn try_subscribe(&self, filters: &[String]) -> Result<(), Busy> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                )
                .map_err(|_| Busy),
            Client::V5(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| Filter::new(f.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)),
                )
                .map_err(|_| Busy),
        }
    }

    /// Queues a DISCONNECT.
    pub fn try_disconnect(&self) -> Result<(), Busy> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|_| Busy),
            Client::V5(c) => c.try_disconnect().map_err(|_| Busy),
        }
    }
}

/// A rumqttc event loop, either version.
pub enum Conn {
    /// MQTT 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<rumqttc::v5::EventLoop>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::V4(_) => f.write_str("Conn::V4"),
            Conn::V5(_) => f.write_str("Conn::V5"),
        }
    }
}

/// Unacknowledged publishes carried from a failed connection to the next.
#[derive(Debug, Default)]
enum Carry {
    #[default]
    None,
    V4(Vec<rumqttc::Request>),
    V5(Vec<rumqttc::v5::Request>),
}

fn options_v4(s: &ClientSettings, addr: &BrokerAddr) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(s.client_id.clone(), addr.host.clone(), addr.port);
    o.set_keep_alive(s.keep_alive.max(Duration::from_secs(1)))
        .set_clean_session(s.clean_session || s.client_id.is_empty())
        .set_inflight(s.inflight.max(1))
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    if let Some((u, p)) = &s.credentials {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(tls) = &s.tls {
        o.set_transport(tls.transport());
    }
    o
}

fn options_v5(s: &ClientSettings, addr: &BrokerAddr) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(s.client_id.clone(), addr.host.clone(), addr.port);
    o.set_keep_alive(s.keep_alive.max(Duration::from_secs(1)))
        .set_clean_start(s.clean_session)
        .set_outgoing_inflight_upper_limit(s.inflight.max(1))
        .set_max_packet_size(Some(MAX_INCOMING_PACKET as u32))
        .set_connection_timeout(s.attempt_timeout_secs());
    if !s.clean_session {
        // MQTT 5 keeps a session only while its expiry interval runs.
        o.set_session_expiry_interval(Some(24 * 3600));
    }
    if let Some((u, p)) = &s.credentials {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(tls) = &s.tls {
        o.set_transport(tls.transport());
    }
    o
}

/// Creates a client handle and its (not yet connected) event loop.
pub fn new_client(settings: &ClientSettings, addr: &BrokerAddr) -> (Client, Conn) {
    let cap = settings.channel_capacity.max(1);
    match settings.protocol {
        Protocol::V4 => {
            let (c, mut el) = rumqttc::AsyncClient::new(options_v4(settings, addr), cap);
            el.network_options
                .set_connection_timeout(settings.attempt_timeout_secs());
            (Client::V4(c), Conn::V4(Box::new(el)))
        }
        Protocol::V5 => {
            let (c, el) = rumqttc::v5::AsyncClient::new(options_v5(settings, addr), cap);
            (Client::V5(c), Conn::V5(Box::new(el)))
        }
    }
}

fn suback_ok_v4(codes: &[SubscribeReasonCode]) -> bool {
    codes
        .iter()
        .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
}

fn suback_ok_v5(codes: &[rumqttc::v5::mqttbytes::v5::SubscribeReasonCode]) -> bool {
    codes.iter().all(|c| {
        matches!(
            c,
            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
        )
    })
}

impl Conn {
    /// Polls the event loop once (connecting first if need be).
    pub async fn poll(&mut self) -> Result<Ev, String> {
        match self {
            Conn::V4(el) => {
                use rumqttc::Event;
                match el.poll().await {
                    Ok(Event::Incoming(Packet4::ConnAck(a))) => Ok(Ev::ConnAck {
                        session_present: a.session_present,
                    }),
                    Ok(Event::Incoming(Packet4::SubAck(a))) => Ok(Ev::SubAck {
                        ok: suback_ok_v4(&a.return_codes),
                    }),
                    Ok(Event::Incoming(Packet4::Publish(p))) => Ok(Ev::Publish {
                        topic: p.topic,
                        payload: p.payload,
                    }),
                    Ok(Event::Incoming(Packet4::PubAck(_))) => Ok(Ev::PubAck),
                    Ok(_) => Ok(Ev::Other),
                    Err(e) => Err(e.to_string()),
                }
            }
            Conn::V5(el) => {
                use rumqttc::v5::Event;
                match el.poll().await {
                    Ok(Event::Incoming(Packet5::ConnAck(a))) => Ok(Ev::ConnAck {
                        session_present: a.session_present,
                    }),
                    Ok(Event::Incoming(Packet5::SubAck(a))) => Ok(Ev::SubAck {
                        ok: suback_ok_v5(&a.return_codes),
                    }),
                    Ok(Event::Incoming(Packet5::Publish(p))) => Ok(Ev::Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                    }),
                    Ok(Event::Incoming(Packet5::PubAck(_))) => Ok(Ev::PubAck),
                    Ok(_) => Ok(Ev::Other),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    /// Points the next connection attempt at `addr` (the session state and
    /// queued requests are kept).
    pub fn set_address(&mut self, settings: &ClientSettings, addr: &BrokerAddr) {
        match self {
            Conn::V4(el) => el.mqtt_options = options_v4(settings, addr),
            Conn::V5(el) => el.options = options_v5(settings, addr),
        }
    }

    /// After a failed poll: takes the publishes rumqttc moved to its pending
    /// queue (unacknowledged, or still queued), dropping everything else
    /// (subscriptions are renewed on every connection; acks and pings are
    /// per connection).
    fn take_unacked(&mut self) -> Carry {
        match self {
            Conn::V4(el) => Carry::V4(
                el.pending
                    .drain(..)
                    .filter(|r| matches!(r, rumqttc::Request::Publish(_)))
                    .collect(),
            ),
            Conn::V5(el) => Carry::V5(
                el.pending
                    .drain(..)
                    .filter(|r| matches!(r, rumqttc::v5::Request::Publish(_)))
                    .collect(),
            ),
        }
    }

    /// After a CONNACK: queues the carried publishes first, in their order.
    fn restore(&mut self, carry: Carry) {
        match (self, carry) {
            (Conn::V4(el), Carry::V4(reqs)) => prepend(&mut el.pending, reqs),
            (Conn::V5(el), Carry::V5(reqs)) => prepend(&mut el.pending, reqs),
            _ => {}
        }
    }
}

fn prepend<T>(queue: &mut VecDeque<T>, items: Vec<T>) {
    for item in items.into_iter().rev() {
        queue.push_front(item);
    }
}

/// What one [`Link::next`] produced.
#[derive(Debug)]
pub struct Polled {
    /// The event, or why the connection failed.
    pub event: Result<Ev, String>,
    /// When this poll began a connection attempt (after waiting for the
    /// connect gate), if it did.
    pub connect_started: Option<Instant>,
}

type PollFuture = Pin<Box<dyn Future<Output = (Conn, Polled)> + Send>>;

/// An event loop driven one event at a time, safe to use in `select!`.
///
/// The poll in progress lives in a future owned by the link: if the caller's
/// `next()` is dropped (another `select!` branch won), the poll goes on at
/// the next call. Connection attempts first take a permit of the shared
/// connect gate, which bounds how many devices handshake at once.
pub struct Link {
    conn: Option<Conn>,
    fut: Option<PollFuture>,
    gate: Option<Arc<Semaphore>>,
    connected: bool,
    carry: Carry,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("connected", &self.connected)
            .field("polling", &self.fut.is_some())
            .finish()
    }
}

impl Link {
    /// A link over `conn`; connection attempts take a permit of `gate`.
    pub fn new(conn: Conn, gate: Option<Arc<Semaphore>>) -> Link {
        Link {
            conn: Some(conn),
            fut: None,
            gate,
            connected: false,
            carry: Carry::None,
        }
    }

    /// Whether the last event left the connection up.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The next event. Cancel-safe: see the type's docs.
    pub async fn next(&mut self) -> Polled {
        if self.fut.is_none() {
            let Some(mut conn) = self.conn.take() else {
                // Unreachable by construction (the connection is either
                // here or inside the future); wait forever rather than panic.
                return std::future::pending().await;
            };
            let gate = if self.connected {
                None
            } else {
                self.gate.clone()
            };
            let connecting = !self.connected;
            self.fut = Some(Box::pin(async move {
                let _permit = match gate {
                    Some(g) => g.acquire_owned().await.ok(),
                    None => None,
                };
                let connect_started = connecting.then(Instant::now);
                let event = conn.poll().await;
                (
                    conn,
                    Polled {
                        event,
                        connect_started,
                    },
                )
            }));
        }
        let Some(fut) = self.fut.as_mut() else {
            return std::future::pending().await;
        };
        let (mut conn, polled) = fut.await;
        self.fut = None;
        match &polled.event {
            Ok(Ev::ConnAck { .. }) => {
                self.connected = true;
                conn.restore(std::mem::take(&mut self.carry));
            }
            Err(_) => {
                self.connected = false;
                // A failure before CONNACK adds nothing to the earlier carry,
                // which goes first: it is older.
                self.carry = match (std::mem::take(&mut self.carry), conn.take_unacked()) {
                    (Carry::V4(mut old), Carry::V4(new)) => {
                        old.extend(new);
                        Carry::V4(old)
                    }
                    (Carry::V5(mut old), Carry::V5(new)) => {
                        old.extend(new);
                        Carry::V5(old)
                    }
                    (Carry::None, new) => new,
                    (old, _) => old,
                };
            }
            Ok(_) => {}
        }
        self.conn = Some(conn);
        polled
    }

    /// Points the next connection attempt at `addr`. Only between polls
    /// (returns false while a poll is in progress).
    pub fn set_address(&mut self, settings: &ClientSettings, addr: &BrokerAddr) -> bool {
        match self.conn.as_mut() {
            Some(c) if self.fut.is_none() => {
                c.set_address(settings, addr);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse() {
        assert_eq!(
            BrokerAddr::parse("127.0.0.1:1883"),
            Ok(BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1883
            })
        );
        let v6 = BrokerAddr::parse("[::1]:1884").expect("v6");
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:1884");
        assert!(BrokerAddr::parse("localhost").is_err());
        assert!(BrokerAddr::parse(":1883").is_err());
        assert!(BrokerAddr::parse("h:99999").is_err());
        let list = BrokerAddr::parse_list("a:1, b:2,").expect("list");
        assert_eq!(list.len(), 2);
        assert!(BrokerAddr::parse_list(" , ").is_err());
    }

    #[test]
    fn prepend_keeps_order_before_existing_items() {
        let mut q: VecDeque<u32> = VecDeque::from(vec![9]);
        prepend(&mut q, vec![1, 2, 3]);
        assert_eq!(q, VecDeque::from(vec![1, 2, 3, 9]));
    }
}
