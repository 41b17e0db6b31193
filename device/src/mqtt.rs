//! One MQTT client, whichever protocol version: a thin layer over rumqttc's
//! 3.1.1 and 5 clients, so [`Device`](crate::Device) (and load generators
//! such as `device-sim ingest`) are written once.
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

use crate::Error;

/// Largest packet a client accepts. Buffers grow only as needed,
/// so a generous limit costs nothing until a large packet arrives; the
/// gateway itself refuses payloads over 64 KiB.
pub const MAX_INCOMING_PACKET: usize = 128 * 1024;
/// Largest packet a client sends (a gateway refuses payloads over 64 KiB).
pub const MAX_OUTGOING_PACKET: usize = 66 * 1024;

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

/// TLS towards the gateways: trust the CA certificates of a PEM file and,
/// optionally, present a client certificate (the gateway's TLS listener
/// with `--mqtt-tls-client-ca` logs a device in by its registered
/// certificate fingerprint, without a password). The broker address's host
/// is the name the server's certificate must carry (an IP address is
/// checked against its IP addresses).
#[derive(Clone)]
pub struct Tls(Arc<tokio_rustls::rustls::ClientConfig>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

fn tls_error(file: &std::path::Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("TLS: {what} {}: {e}", file.display()))
}

impl Tls {
    /// Trusts the CA certificates (PEM) in `ca_file`; no client certificate.
    pub fn trusting(ca_file: &std::path::Path) -> Result<Tls, Error> {
        Tls::build(ca_file, None)
    }

    /// Trusts the CA certificates in `ca_file` and presents the certificate
    /// chain in `cert_file` (PEM, leaf first) with its private key in
    /// `key_file` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub fn with_client_certificate(
        ca_file: &std::path::Path,
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
    ) -> Result<Tls, Error> {
        Tls::build(ca_file, Some((cert_file, key_file)))
    }

    fn build(
        ca_file: &std::path::Path,
        client: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Tls, Error> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let reading = "reading the CA certificates in";
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(ca_file).map_err(|e| tls_error(ca_file, reading, e))?
        {
            let cert = cert.map_err(|e| tls_error(ca_file, reading, e))?;
            roots
                .add(cert)
                .map_err(|e| tls_error(ca_file, reading, e))?;
        }
        if roots.is_empty() {
            return Err(tls_error(ca_file, "no CA certificate (PEM) in", "empty"));
        }
        // ring: the gateway's provider too (builds with the C compiler alone).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS protocol versions: {e}")))?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert_file, key_file)) => {
                let reading = "reading the client certificate in";
                let chain = CertificateDer::pem_file_iter(cert_file)
                    .map_err(|e| tls_error(cert_file, reading, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls_error(cert_file, reading, e))?;
                if chain.is_empty() {
                    return Err(tls_error(cert_file, "no certificate (PEM) in", "empty"));
                }
                let key = PrivateKeyDer::from_pem_file(key_file)
                    .map_err(|e| tls_error(key_file, "reading the private key in", e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_error(key_file, "using the key in", e))?
            }
        };
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
    /// A subscription was answered.
    SubAck {
        /// The reason code of the first filter refused (3.1.1: 0x80), if
        /// any was.
        refused: Option<u8>,
    },
    /// A message arrived.
    Publish {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Bytes,
    },
    /// One of our QoS 1 publishes went out with this packet id (again, if
    /// the id was seen before: a retransmission).
    Sent {
        /// Its packet id.
        pkid: u16,
    },
    /// The broker acknowledged one of our QoS 1 publishes. Brokers that
    /// acknowledge on receipt do so in order; an Entente gateway does once
    /// the message is committed, in order for a device's reported state, but
    /// a command result may be acknowledged before an earlier report.
    PubAck {
        /// The packet id it answers.
        pkid: u16,
        /// Its reason code (MQTT 5; 0 = success, and always 0 in 3.1.1).
        reason: u8,
    },
    /// Anything else (pings, other outgoing packets).
    Other,
}

/// Why a connection attempt or a connection ended, as rumqttc reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The CONNACK refused the connection with this return code (3.1.1)
    /// or reason code (MQTT 5).
    Refused {
        /// The code.
        code: u8,
        /// Whether the code is an MQTT 5 reason code.
        v5: bool,
    },
    /// The broker sent DISCONNECT (MQTT 5) with this reason code.
    ServerDisconnect {
        /// The reason code.
        code: u8,
        /// Its Reason String, if it sent one.
        reason: Option<String>,
    },
    /// Anything else: network, TLS, timeouts, protocol errors.
    Other(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Refused { code, v5: false } => {
                write!(f, "connection refused, return code {code}")
            }
            LinkError::Refused { code, v5: true } => {
                write!(f, "connection refused, reason code {code:#04x}")
            }
            LinkError::ServerDisconnect { code, reason } => {
                write!(f, "the server disconnected, reason code {code:#04x}")?;
                if let Some(r) = reason {
                    write!(f, " ({r})")?;
                }
                Ok(())
            }
            LinkError::Other(e) => f.write_str(e),
        }
    }
}

fn connack_code_v4(c: rumqttc::ConnectReturnCode) -> u8 {
    use rumqttc::ConnectReturnCode as C;
    match c {
        C::Success => 0,
        C::RefusedProtocolVersion => 1,
        C::BadClientId => 2,
        C::ServiceUnavailable => 3,
        C::BadUserNamePassword => 4,
        C::NotAuthorized => 5,
    }
}

fn connack_code_v5(c: rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> u8 {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    match c {
        C::Success => 0x00,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => 0x84,
        C::BadClientId | C::ClientIdentifierNotValid => 0x85,
        C::ServiceUnavailable | C::ServerUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

fn link_error_v4(e: rumqttc::ConnectionError) -> LinkError {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(c) => LinkError::Refused {
            code: connack_code_v4(c),
            v5: false,
        },
        e => LinkError::Other(e.to_string()),
    }
}

fn link_error_v5(e: rumqttc::v5::ConnectionError) -> LinkError {
    use rumqttc::v5::{ConnectionError as E, StateError as S};
    match e {
        E::ConnectionRefused(c) | E::MqttState(S::ConnFail { reason: c }) => LinkError::Refused {
            code: connack_code_v5(c),
            v5: true,
        },
        E::MqttState(S::ServerDisconnect {
            reason_code,
            reason_string,
        }) => LinkError::ServerDisconnect {
            code: reason_code as u8,
            reason: reason_string,
        },
        e => LinkError::Other(e.to_string()),
    }
}

fn puback_code_v5(r: rumqttc::v5::mqttbytes::v5::PubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
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
    // As for 3.1.1 (`new_client`): no Nagle's algorithm.
    let mut net = o.network_options();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
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
            // A device's messages are small and each waits for its own
            // acknowledgement: Nagle's algorithm would hold a second one
            // until the first is ACKed, up to the broker's delayed-ACK
            // timeout (40 ms on Linux).
            el.network_options.set_tcp_nodelay(true);
            // rumqttc allocates its event queue for 100 events (14 KiB in
            // 3.1.1, 39 KiB in MQTT 5) per connection; it holds one or two
            // at a time here (polled one event at a time), so it starts
            // empty and grows only as needed.
            el.state.events = VecDeque::new();
            (Client::V4(c), Conn::V4(Box::new(el)))
        }
        Protocol::V5 => {
            let (c, mut el) = rumqttc::v5::AsyncClient::new(options_v5(settings, addr), cap);
            el.state.events = VecDeque::new();
            (Client::V5(c), Conn::V5(Box::new(el)))
        }
    }
}

fn suback_refused_v4(codes: &[SubscribeReasonCode]) -> Option<u8> {
    codes
        .iter()
        .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
        .map(|_| 0x80)
}

fn suback_refused_v5(codes: &[rumqttc::v5::mqttbytes::v5::SubscribeReasonCode]) -> Option<u8> {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
    codes.iter().find_map(|c| match c {
        R::Success(_) => None,
        R::Failure | R::Unspecified => Some(0x80),
        R::ImplementationSpecific => Some(0x83),
        R::NotAuthorized => Some(0x87),
        R::TopicFilterInvalid => Some(0x8F),
        R::PkidInUse => Some(0x91),
        R::QuotaExceeded => Some(0x97),
        R::SharedSubscriptionsNotSupported => Some(0x9E),
        R::SubscriptionIdNotSupported => Some(0xA1),
        R::WildcardSubscriptionsNotSupported => Some(0xA2),
    })
}

impl Conn {
    /// Polls the event loop once (connecting first if need be).
    pub async fn poll(&mut self) -> Result<Ev, LinkError> {
        match self {
            Conn::V4(el) => {
                use rumqttc::{Event, Outgoing};
                match el.poll().await {
                    Ok(Event::Incoming(Packet4::ConnAck(a))) => Ok(Ev::ConnAck {
                        session_present: a.session_present,
                    }),
                    Ok(Event::Incoming(Packet4::SubAck(a))) => Ok(Ev::SubAck {
                        refused: suback_refused_v4(&a.return_codes),
                    }),
                    Ok(Event::Incoming(Packet4::Publish(p))) => Ok(Ev::Publish {
                        topic: p.topic,
                        payload: p.payload,
                    }),
                    Ok(Event::Incoming(Packet4::PubAck(a))) => Ok(Ev::PubAck {
                        pkid: a.pkid,
                        reason: 0,
                    }),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                        Ok(Ev::Sent { pkid })
                    }
                    Ok(_) => Ok(Ev::Other),
                    Err(e) => Err(link_error_v4(e)),
                }
            }
            Conn::V5(el) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::Event;
                match el.poll().await {
                    Ok(Event::Incoming(Packet5::ConnAck(a))) => Ok(Ev::ConnAck {
                        session_present: a.session_present,
                    }),
                    Ok(Event::Incoming(Packet5::SubAck(a))) => Ok(Ev::SubAck {
                        refused: suback_refused_v5(&a.return_codes),
                    }),
                    Ok(Event::Incoming(Packet5::Publish(p))) => Ok(Ev::Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                    }),
                    Ok(Event::Incoming(Packet5::PubAck(a))) => Ok(Ev::PubAck {
                        pkid: a.pkid,
                        reason: puback_code_v5(a.reason),
                    }),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                        Ok(Ev::Sent { pkid })
                    }
                    Ok(_) => Ok(Ev::Other),
                    Err(e) => Err(link_error_v5(e)),
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
    pub event: Result<Ev, LinkError>,
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

    /// rumqttc's per-connection event queue is made for 100 events (14 KiB
    /// in 3.1.1, 39 KiB in MQTT 5); a client here starts with none, so a
    /// fleet of 10,000 does not hold them.
    #[test]
    fn a_new_client_holds_no_event_queue_of_a_hundred() {
        for protocol in [Protocol::V4, Protocol::V5] {
            let settings = ClientSettings {
                protocol,
                client_id: "d1".into(),
                credentials: Some(("d1".into(), "s".into())),
                keep_alive: Duration::from_secs(30),
                clean_session: false,
                inflight: 8,
                channel_capacity: 8,
                attempt_timeout: Duration::from_secs(5),
                tls: None,
            };
            let addr = BrokerAddr::parse("127.0.0.1:1").expect("addr");
            let capacity = match new_client(&settings, &addr).1 {
                Conn::V4(el) => el.state.events.capacity(),
                Conn::V5(el) => el.state.events.capacity(),
            };
            assert!(capacity < 8, "{protocol:?}: {capacity}");
        }
    }

    /// A client's socket has Nagle's algorithm off (TCP_NODELAY), in
    /// either protocol: found among this process's descriptors by the
    /// address a listener of the test saw it connect from.
    #[tokio::test]
    async fn a_client_connects_with_tcp_nodelay() {
        use std::os::fd::BorrowedFd;
        for protocol in [Protocol::V4, Protocol::V5] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let settings = ClientSettings {
                protocol,
                client_id: "d1".into(),
                credentials: None,
                keep_alive: Duration::from_secs(30),
                clean_session: true,
                inflight: 8,
                channel_capacity: 8,
                attempt_timeout: Duration::from_secs(5),
                tls: None,
            };
            let addr =
                BrokerAddr::parse(&listener.local_addr().expect("addr").to_string()).expect("addr");
            let (_client, mut conn) = new_client(&settings, &addr);
            let polling = tokio::spawn(async move { conn.poll().await.is_ok() });
            let (_server_side, from) = listener.accept().await.expect("accept");
            let mut found = None;
            for entry in std::fs::read_dir("/proc/self/fd").expect("fds") {
                let Ok(fd) = entry
                    .expect("fd")
                    .file_name()
                    .to_string_lossy()
                    .parse::<i32>()
                else {
                    continue;
                };
                // SAFETY: the descriptor is only queried (getsockname,
                // getsockopt), never closed or read through; the client's
                // stays open meanwhile (its connection is held by the
                // polling task). Another test thread may close one of the
                // others in between: the query then fails or names another
                // address, which does not match the client's.
                #[allow(unsafe_code)]
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                let sock = socket2::SockRef::from(&fd);
                if sock.local_addr().ok().and_then(|a| a.as_socket()) == Some(from) {
                    found = Some(sock.tcp_nodelay().expect("TCP_NODELAY"));
                }
            }
            polling.abort();
            assert_eq!(found, Some(true), "{protocol:?}: the client's socket");
        }
    }

    #[test]
    fn prepend_keeps_order_before_existing_items() {
        let mut q: VecDeque<u32> = VecDeque::from(vec![9]);
        prepend(&mut q, vec![1, 2, 3]);
        assert_eq!(q, VecDeque::from(vec![1, 2, 3, 9]));
    }
}
