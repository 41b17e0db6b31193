//! MQTT 3.1.1 and 5 packets as the device endpoint sees them, over rumqttc's
//! packet codec (`mqttbytes`).
//!
//! rumqttc's codec reads and writes every packet in both directions with all
//! fields public (rumqttd's keeps a publish's QoS and packet id private, so a
//! server cannot write a QoS 1 publish with it). This module folds the two
//! protocol versions into one small vocabulary ([`Incoming`], [`Outgoing`])
//! so the connection logic is written once.
//!
//! Decoding is hostile-input safe: a decoder panic (there should be none) is
//! caught and reported as a malformed packet, never unwinding a connection
//! task.

use std::panic::AssertUnwindSafe;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, QoS, v4};
use rumqttc::v5::mqttbytes::{Error as V5Error, QoS as V5QoS, v5};

/// The protocol version a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// What a CONNECT carries that the endpoint uses.
#[derive(Debug, Clone)]
pub(crate) struct ConnectInfo {
    pub(crate) client_id: String,
    pub(crate) username: String,
    pub(crate) password: String,
    pub(crate) keep_alive: u16,
    pub(crate) clean: bool,
    pub(crate) has_will: bool,
    /// The client's Receive Maximum (MQTT 5; 3.1.1 clients get the default).
    pub(crate) receive_max: u16,
    /// The largest packet the client takes (MQTT 5's Maximum Packet Size;
    /// `None`: no limit but the protocol's).
    pub(crate) max_packet: Option<u32>,
    /// MQTT 5's Session Expiry Interval (seconds; 0 when absent: the
    /// session ends with the connection). 3.1.1 clients: 0.
    pub(crate) session_expiry: u32,
}

/// A packet from a device.
#[derive(Debug)]
pub(crate) enum Incoming {
    Connect(Box<ConnectInfo>),
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
    },
    PubAck(u16),
    PubRel(u16),
    /// Acknowledgements of QoS 2 messages the endpoint never sends.
    Ignored,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// The device said goodbye; an MQTT 5 device may change its Session
    /// Expiry Interval with it.
    Disconnect {
        session_expiry: Option<u32>,
    },
    /// A packet only a server sends (CONNACK, SUBACK, …) or AUTH.
    Unexpected(&'static str),
    /// An MQTT 5 feature the endpoint told the client (in its CONNACK) it
    /// does not support: a protocol error, ending the session with this
    /// reason (retained messages 0x9A, QoS 2 0x9B, topic aliases 0x94,
    /// shared subscriptions 0x9E, subscription identifiers 0xA1).
    Unsupported(CloseReason),
}

/// Why bytes could not be read as a packet.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// Not a whole packet yet.
    Incomplete,
    /// The packet is larger than the limit.
    TooLarge(usize),
    /// Not MQTT.
    Malformed(String),
}

/// Why a login is refused (mapped to each version's CONNACK code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Wrong or missing username or password.
    BadCredentials,
    /// Not allowed (a last will, say).
    NotAuthorized,
    /// The client id is not acceptable.
    BadClientId,
    /// Too many failed logins from this address or for this id.
    RateExceeded,
    /// The gateway cannot check logins now (no quorum, stopping).
    Unavailable,
}

/// Why the endpoint ends a session (sent as an MQTT 5 DISCONNECT reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The same device connected again (0x8E).
    TakenOver,
    /// The device was deleted or its secret rotated (0x98).
    Revoked,
    /// The gateway is stopping (0x8B).
    ShuttingDown,
    /// The gateway left the group (removed): connect to another one (0x9C).
    UseAnotherServer,
    /// No packet within 1.5 × the keep-alive (0x8D).
    KeepAliveTimeout,
    /// The device does not read what it is sent (0x97).
    SlowConsumer,
    /// A protocol violation (0x82).
    ProtocolError,
    /// A topic outside the device's own (0x87).
    NotAuthorized,
    /// A malformed packet (0x81).
    Malformed,
    /// A packet over the size limit (0x95).
    TooLarge,
    /// What the device sent could not be committed in time (0x89, server
    /// busy): it was not acknowledged, and the device sends it again when
    /// it reconnects.
    NotCommitted,
    /// A retained message: Retain Available is 0 (0x9A).
    RetainNotSupported,
    /// A QoS 2 message: Maximum QoS is 1 (0x9B).
    QosNotSupported,
    /// A topic alias: Topic Alias Maximum is 0 (0x94).
    TopicAliasInvalid,
    /// A shared subscription: Shared Subscription Available is 0 (0x9E).
    SharedNotSupported,
    /// A subscription identifier: Subscription Identifiers Available is 0
    /// (0xA1).
    SubscriptionIdsNotSupported,
}

/// How the endpoint answers a device's QoS 1 or 2 message once its fate is
/// known: the reason code of an MQTT 5 PUBACK or PUBREC (MQTT 3.1.1 has
/// none: every answer is a plain acknowledgement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckCode {
    /// What the message causes is committed, or it changes nothing (a
    /// duplicate) (0x00).
    Success,
    /// Refused for good: no such command for this device, or the device is
    /// gone (0x83, implementation specific error).
    Refused,
    /// Over a size limit (0x97, quota exceeded).
    TooLarge,
    /// Not the JSON its topic calls for (0x99, payload format invalid).
    Malformed,
}

/// A packet to a device.
#[derive(Debug)]
pub(crate) enum Outgoing<'a> {
    ConnAck {
        refusal: Option<Refusal>,
        session_present: bool,
        /// MQTT 5's Server Keep Alive: the keep-alive the client must use
        /// instead of the one it asked for.
        server_keep_alive: Option<u16>,
    },
    Publish {
        topic: &'a str,
        payload: &'a Bytes,
        qos: u8,
        pkid: u16,
    },
    PubAck(u16, AckCode),
    PubRec(u16, AckCode),
    PubComp(u16),
    /// Per filter: the granted QoS, or `None` for a filter refused for
    /// the session's quota of filters (3.1.1: 0x80, MQTT 5: 0x97).
    SubAck {
        pkid: u16,
        granted: &'a [Option<u8>],
    },
    /// Per filter: whether the session held it (MQTT 5: 0x00, else 0x11
    /// "no subscription existed"; 3.1.1 UNSUBACK has no codes).
    UnsubAck {
        pkid: u16,
        existed: &'a [bool],
    },
    PingResp,
    /// Written for MQTT 5 only (3.1.1 has no server DISCONNECT).
    Disconnect(CloseReason),
}

/// Limits the endpoint advertises to MQTT 5 clients in its CONNACK.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Advertised {
    pub(crate) receive_max: u16,
    pub(crate) max_packet: u32,
}

/// The protocol level of the CONNECT at the head of `buf`:
/// `Err(Incomplete)` until the bytes that say are there, `Malformed` if the
/// first packet is not a CONNECT. MQTT 3.1 (level 3) is reported as is, for
/// the caller to refuse.
pub(crate) fn connect_level(buf: &[u8]) -> Result<u8, ReadError> {
    let first = *buf.first().ok_or(ReadError::Incomplete)?;
    if first != 0x10 {
        return Err(ReadError::Malformed(format!(
            "the first packet must be CONNECT (got packet type {})",
            first >> 4
        )));
    }
    // Remaining length: 1–4 bytes.
    let mut i = 1;
    loop {
        let b = *buf.get(i).ok_or(ReadError::Incomplete)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(ReadError::Malformed("malformed remaining length".into()));
        }
    }
    let hi = *buf.get(i).ok_or(ReadError::Incomplete)?;
    let lo = *buf.get(i + 1).ok_or(ReadError::Incomplete)?;
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    if name_len > 6 {
        return Err(ReadError::Malformed("not an MQTT protocol name".into()));
    }
    buf.get(i + 2 + name_len)
        .copied()
        .ok_or(ReadError::Incomplete)
}

fn qos_num(q: QoS) -> u8 {
    q as u8
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn v5_qos(q: V5QoS) -> u8 {
    q as u8
}

fn v5_qos_of(n: u8) -> V5QoS {
    match n {
        0 => V5QoS::AtMostOnce,
        1 => V5QoS::AtLeastOnce,
        _ => V5QoS::ExactlyOnce,
    }
}

/// Reads the next packet from `buf` (consuming it) if a whole one is there.
pub(crate) fn read(
    version: Version,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Incoming, ReadError> {
    // The codec is not expected to panic; if it ever does on hostile bytes,
    // that is a malformed packet, not a dead task.
    let before = buf.len();
    let read = std::panic::catch_unwind(AssertUnwindSafe(|| match version {
        Version::V4 => read_v4(buf, max),
        Version::V5 => read_v5(buf, max),
    }))
    .unwrap_or_else(|_| Err(ReadError::Malformed("undecodable packet".into())));
    match read {
        // The codec took a whole packet, then found its contents shorter
        // than they claim (found by the arbitrary-bytes test: `74 04 …`, a
        // PUBCOMP-typed header): the packet is malformed. Waiting for more would read the
        // next bytes as a new packet, out of step with the stream.
        Err(ReadError::Incomplete) if buf.len() != before => Err(ReadError::Malformed(
            "a packet's contents are shorter than they claim".into(),
        )),
        other => other,
    }
}

fn read_v4(buf: &mut BytesMut, max: usize) -> Result<Incoming, ReadError> {
    let packet = match v4::Packet::read(buf, max) {
        Ok(p) => p,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Err(ReadError::Incomplete),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => return Err(ReadError::TooLarge(n)),
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    Ok(match packet {
        v4::Packet::Connect(c) => {
            let (username, password) = c
                .login
                .map(|l| (l.username, l.password))
                .unwrap_or_default();
            Incoming::Connect(Box::new(ConnectInfo {
                client_id: c.client_id,
                username,
                password,
                keep_alive: c.keep_alive,
                clean: c.clean_session,
                has_will: c.last_will.is_some(),
                receive_max: u16::MAX,
                max_packet: None,
                session_expiry: 0,
            }))
        }
        v4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: qos_num(p.qos),
            pkid: p.pkid,
        },
        v4::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        v4::Packet::PubRel(r) => Incoming::PubRel(r.pkid),
        v4::Packet::PubRec(_) | v4::Packet::PubComp(_) => Incoming::Ignored,
        v4::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos_num(f.qos)))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::Disconnect => Incoming::Disconnect {
            session_expiry: None,
        },
        v4::Packet::ConnAck(_) => Incoming::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Incoming::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Incoming::Unexpected("PINGRESP"),
    })
}

fn read_v5(buf: &mut BytesMut, max: usize) -> Result<Incoming, ReadError> {
    let limit = u32::try_from(max).unwrap_or(u32::MAX);
    let packet = match v5::Packet::read(buf, Some(limit)) {
        Ok(p) => p,
        Err(V5Error::InsufficientBytes(_)) => return Err(ReadError::Incomplete),
        Err(V5Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
            return Err(ReadError::TooLarge(pkt_size));
        }
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    Ok(match packet {
        v5::Packet::Connect(c, will, login) => {
            let (username, password) = login.map(|l| (l.username, l.password)).unwrap_or_default();
            let props = c.properties.as_ref();
            let receive_max = props
                .and_then(|p| p.receive_maximum)
                .filter(|&m| m > 0)
                .unwrap_or(u16::MAX);
            if props.and_then(|p| p.max_packet_size) == Some(0) {
                return Err(ReadError::Malformed("a Maximum Packet Size of 0".into()));
            }
            Incoming::Connect(Box::new(ConnectInfo {
                client_id: c.client_id,
                username,
                password,
                keep_alive: c.keep_alive,
                clean: c.clean_start,
                has_will: will.is_some(),
                receive_max,
                max_packet: props.and_then(|p| p.max_packet_size),
                session_expiry: props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
            }))
        }
        // What the CONNACK said is not available is a protocol error.
        v5::Packet::Publish(p) if p.retain => {
            Incoming::Unsupported(CloseReason::RetainNotSupported)
        }
        v5::Packet::Publish(p) if p.qos == V5QoS::ExactlyOnce => {
            Incoming::Unsupported(CloseReason::QosNotSupported)
        }
        v5::Packet::Publish(p)
            if p.properties
                .as_ref()
                .is_some_and(|pr| pr.topic_alias.is_some()) =>
        {
            Incoming::Unsupported(CloseReason::TopicAliasInvalid)
        }
        v5::Packet::Publish(p) => Incoming::Publish {
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| ReadError::Malformed("topic is not UTF-8".into()))?,
            payload: p.payload,
            qos: v5_qos(p.qos),
            pkid: p.pkid,
        },
        v5::Packet::Subscribe(s) if s.properties.as_ref().is_some_and(|p| p.id.is_some()) => {
            Incoming::Unsupported(CloseReason::SubscriptionIdsNotSupported)
        }
        v5::Packet::Subscribe(s) if s.filters.iter().any(|f| f.path.starts_with("$share/")) => {
            Incoming::Unsupported(CloseReason::SharedNotSupported)
        }
        v5::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        v5::Packet::PubRel(r) => Incoming::PubRel(r.pkid),
        v5::Packet::PubRec(_) | v5::Packet::PubComp(_) => Incoming::Ignored,
        v5::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, v5_qos(f.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::ConnAck(_) => Incoming::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Incoming::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Incoming::Unexpected("PINGRESP"),
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH"),
    })
}

fn v4_code(r: Option<Refusal>) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as C;
    match r {
        None => C::Success,
        Some(Refusal::BadCredentials) => C::BadUserNamePassword,
        Some(Refusal::NotAuthorized) => C::NotAuthorized,
        Some(Refusal::BadClientId) => C::BadClientId,
        Some(Refusal::RateExceeded | Refusal::Unavailable) => C::ServiceUnavailable,
    }
}

fn v5_code(r: Option<Refusal>) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match r {
        None => C::Success,
        Some(Refusal::BadCredentials) => C::BadUserNamePassword,
        Some(Refusal::NotAuthorized) => C::NotAuthorized,
        Some(Refusal::BadClientId) => C::ClientIdentifierNotValid,
        Some(Refusal::RateExceeded) => C::ConnectionRateExceeded,
        Some(Refusal::Unavailable) => C::ServerUnavailable,
    }
}

/// The Reason String sent with an MQTT 5 DISCONNECT (at most 100 bytes).
fn reason_text(r: CloseReason) -> &'static str {
    match r {
        CloseReason::TakenOver => "another connection with this client id took the session over",
        CloseReason::Revoked => "the device was deleted, disabled or its credentials changed",
        CloseReason::ShuttingDown => "the gateway is shutting down",
        CloseReason::UseAnotherServer => "this gateway is not serving devices; connect to another",
        CloseReason::KeepAliveTimeout => "no packet within 1.5 times the keep-alive",
        CloseReason::SlowConsumer => "too many messages waiting for this device",
        CloseReason::ProtocolError => "protocol error",
        CloseReason::NotAuthorized => "a topic outside this device's own",
        CloseReason::Malformed => "malformed packet",
        CloseReason::TooLarge => "packet larger than the maximum packet size",
        CloseReason::NotCommitted => "a message could not be committed in time; send it again",
        CloseReason::RetainNotSupported => "retained messages are not supported",
        CloseReason::QosNotSupported => "QoS 2 is not supported",
        CloseReason::TopicAliasInvalid => "topic aliases are not supported",
        CloseReason::SharedNotSupported => "shared subscriptions are not supported",
        CloseReason::SubscriptionIdsNotSupported => "subscription identifiers are not supported",
    }
}

fn v5_disconnect(r: CloseReason) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as D;
    match r {
        CloseReason::TakenOver => D::SessionTakenOver,
        CloseReason::Revoked => D::AdministrativeAction,
        CloseReason::ShuttingDown => D::ServerShuttingDown,
        CloseReason::UseAnotherServer => D::UseAnotherServer,
        CloseReason::KeepAliveTimeout => D::KeepAliveTimeout,
        CloseReason::SlowConsumer => D::QuotaExceeded,
        CloseReason::ProtocolError => D::ProtocolError,
        CloseReason::NotAuthorized => D::NotAuthorized,
        CloseReason::Malformed => D::MalformedPacket,
        CloseReason::TooLarge => D::PacketTooLarge,
        CloseReason::NotCommitted => D::ServerBusy,
        CloseReason::RetainNotSupported => D::RetainNotSupported,
        CloseReason::QosNotSupported => D::QoSNotSupported,
        CloseReason::TopicAliasInvalid => D::TopicAliasInvalid,
        CloseReason::SharedNotSupported => D::SharedSubscriptionNotSupported,
        CloseReason::SubscriptionIdsNotSupported => D::SubscriptionIdentifiersNotSupported,
    }
}

fn v5_puback(c: AckCode) -> v5::PubAckReason {
    match c {
        AckCode::Success => v5::PubAckReason::Success,
        AckCode::Refused => v5::PubAckReason::ImplementationSpecificError,
        AckCode::TooLarge => v5::PubAckReason::QuotaExceeded,
        AckCode::Malformed => v5::PubAckReason::PayloadFormatInvalid,
    }
}

fn v5_pubrec(c: AckCode) -> v5::PubRecReason {
    match c {
        AckCode::Success => v5::PubRecReason::Success,
        AckCode::Refused => v5::PubRecReason::ImplementationSpecificError,
        AckCode::TooLarge => v5::PubRecReason::QuotaExceeded,
        AckCode::Malformed => v5::PubRecReason::PayloadFormatInvalid,
    }
}

/// Appends `packet` to `out`. Writing into a buffer cannot fail but for a
/// packet the codec refuses (a topic too long); that is logged and skipped.
pub(crate) fn write(version: Version, packet: Outgoing<'_>, adv: Advertised, out: &mut BytesMut) {
    let r = match version {
        Version::V4 => write_v4(packet, out),
        Version::V5 => write_v5(packet, adv, out),
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "an MQTT packet could not be encoded; not sent");
    }
}

fn write_v4(packet: Outgoing<'_>, out: &mut BytesMut) -> Result<usize, String> {
    let e = |e: mqttbytes::Error| e.to_string();
    match packet {
        Outgoing::ConnAck {
            refusal,
            session_present,
            ..
        } => v4::ConnAck::new(v4_code(refusal), session_present && refusal.is_none())
            .write(out)
            .map_err(e),
        Outgoing::Publish {
            topic,
            payload,
            qos,
            pkid,
        } => {
            let p = v4::Publish {
                dup: false,
                qos: qos_of(qos),
                retain: false,
                topic: topic.to_string(),
                pkid,
                payload: payload.clone(),
            };
            p.write(out).map_err(e)
        }
        // 3.1.1 acknowledgements carry no reason: every answer is one.
        Outgoing::PubAck(pkid, _) => v4::PubAck::new(pkid).write(out).map_err(e),
        Outgoing::PubRec(pkid, _) => v4::PubRec::new(pkid).write(out).map_err(e),
        Outgoing::PubComp(pkid) => v4::PubComp::new(pkid).write(out).map_err(e),
        Outgoing::SubAck { pkid, granted } => {
            let codes = granted
                .iter()
                .map(|g| match g {
                    Some(q) => v4::SubscribeReasonCode::Success(qos_of(*q)),
                    None => v4::SubscribeReasonCode::Failure,
                })
                .collect();
            v4::SubAck::new(pkid, codes).write(out).map_err(e)
        }
        Outgoing::UnsubAck { pkid, .. } => v4::UnsubAck::new(pkid).write(out).map_err(e),
        Outgoing::PingResp => v4::PingResp.write(out).map_err(e),
        Outgoing::Disconnect(_) => Ok(0),
    }
}

fn write_v5(packet: Outgoing<'_>, adv: Advertised, out: &mut BytesMut) -> Result<usize, String> {
    let e = |e: V5Error| e.to_string();
    match packet {
        Outgoing::ConnAck {
            refusal,
            session_present,
            server_keep_alive,
        } => {
            let properties = refusal.is_none().then(|| v5::ConnAckProperties {
                receive_max: Some(adv.receive_max),
                max_qos: Some(1),
                retain_available: Some(0),
                max_packet_size: Some(adv.max_packet),
                topic_alias_max: Some(0),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                session_expiry_interval: None,
                assigned_client_identifier: None,
                reason_string: None,
                user_properties: Vec::new(),
                server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            v5::ConnAck {
                session_present: session_present && refusal.is_none(),
                code: v5_code(refusal),
                properties,
            }
            .write(out)
            .map_err(e)
        }
        Outgoing::Publish {
            topic,
            payload,
            qos,
            pkid,
        } => v5::Publish {
            dup: false,
            qos: v5_qos_of(qos),
            retain: false,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid,
            payload: payload.clone(),
            properties: None,
        }
        .write(out)
        .map_err(e),
        Outgoing::PubAck(pkid, code) => v5::PubAck {
            pkid,
            reason: v5_puback(code),
            properties: None,
        }
        .write(out)
        .map_err(e),
        Outgoing::PubRec(pkid, code) => v5::PubRec {
            pkid,
            reason: v5_pubrec(code),
            properties: None,
        }
        .write(out)
        .map_err(e),
        Outgoing::PubComp(pkid) => v5::PubComp::new(pkid, None).write(out).map_err(e),
        Outgoing::SubAck { pkid, granted } => {
            let return_codes = granted
                .iter()
                .map(|g| match g {
                    Some(q) => v5::SubscribeReasonCode::Success(v5_qos_of(*q)),
                    None => v5::SubscribeReasonCode::QuotaExceeded,
                })
                .collect();
            v5::SubAck {
                pkid,
                return_codes,
                properties: None,
            }
            .write(out)
            .map_err(e)
        }
        Outgoing::UnsubAck { pkid, existed } => v5::UnsubAck {
            pkid,
            reasons: existed
                .iter()
                .map(|&e| {
                    if e {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
            properties: None,
        }
        .write(out)
        .map_err(e),
        Outgoing::PingResp => v5::PingResp::write(out).map_err(e),
        // Written here: rumqttc's encoder gets the remaining length of a
        // DISCONNECT with a reason code wrong (with or without properties).
        // Reason code, then an empty property list.
        // The properties carry a Reason String: clients log it, and
        // paho-mqtt 2.1 reads the reason code only from a DISCONNECT
        // longer than two bytes.
        Outgoing::Disconnect(reason) => {
            let text = reason_text(reason).as_bytes();
            // Every text is short: all lengths fit in one byte.
            let props = 3 + text.len();
            let remaining = 2 + props;
            out.extend_from_slice(&[
                0xE0,
                remaining as u8,
                v5_disconnect(reason) as u8,
                props as u8,
                0x1F,
                0x00,
                text.len() as u8,
            ]);
            out.extend_from_slice(text);
            Ok(2 + remaining)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every refusal, every close reason and every acknowledgement code,
    /// listed through a match so that a new variant must be added here.
    fn every_refusal() -> Vec<Option<Refusal>> {
        let all = [
            Refusal::BadCredentials,
            Refusal::NotAuthorized,
            Refusal::BadClientId,
            Refusal::RateExceeded,
            Refusal::Unavailable,
        ];
        for r in all {
            match r {
                Refusal::BadCredentials
                | Refusal::NotAuthorized
                | Refusal::BadClientId
                | Refusal::RateExceeded
                | Refusal::Unavailable => {}
            }
        }
        std::iter::once(None).chain(all.map(Some)).collect()
    }

    fn every_close_reason() -> Vec<CloseReason> {
        use CloseReason as C;
        let all = [
            C::TakenOver,
            C::Revoked,
            C::ShuttingDown,
            C::UseAnotherServer,
            C::KeepAliveTimeout,
            C::SlowConsumer,
            C::ProtocolError,
            C::NotAuthorized,
            C::Malformed,
            C::TooLarge,
            C::NotCommitted,
            C::RetainNotSupported,
            C::QosNotSupported,
            C::TopicAliasInvalid,
            C::SharedNotSupported,
            C::SubscriptionIdsNotSupported,
        ];
        for r in all {
            match r {
                C::TakenOver
                | C::Revoked
                | C::ShuttingDown
                | C::UseAnotherServer
                | C::KeepAliveTimeout
                | C::SlowConsumer
                | C::ProtocolError
                | C::NotAuthorized
                | C::Malformed
                | C::TooLarge
                | C::NotCommitted
                | C::RetainNotSupported
                | C::QosNotSupported
                | C::TopicAliasInvalid
                | C::SharedNotSupported
                | C::SubscriptionIdsNotSupported => {}
            }
        }
        all.to_vec()
    }

    fn every_ack_code() -> Vec<AckCode> {
        let all = [
            AckCode::Success,
            AckCode::Refused,
            AckCode::TooLarge,
            AckCode::Malformed,
        ];
        for c in all {
            match c {
                AckCode::Success | AckCode::Refused | AckCode::TooLarge | AckCode::Malformed => {}
            }
        }
        all.to_vec()
    }

    /// The variable header and payload of the one packet in `out`.
    fn packet_body(out: &BytesMut) -> &[u8] {
        let (mut len, mut shift, mut i) = (0usize, 0, 1);
        loop {
            let b = out[i];
            len |= usize::from(b & 0x7F) << shift;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        assert_eq!(out.len(), i + len, "one packet: {out:?}");
        &out[i..]
    }

    /// The codes this endpoint writes are exactly those the device contract
    /// lists (`entente_protocol::reason_codes`, printed in the AsyncAPI
    /// document and the device guide), packet by packet, in both versions.
    #[test]
    fn the_codes_written_are_the_ones_the_contract_lists() {
        use entente_protocol::reason_codes::{ALL, Packet};
        use std::collections::BTreeSet;
        let adv = Advertised {
            receive_max: 10,
            max_packet: 1024,
        };
        let encode = |version, packet: Outgoing<'_>| {
            let mut out = BytesMut::new();
            write(version, packet, adv, &mut out);
            out
        };
        let mut written: [BTreeSet<(Packet, u8)>; 2] = Default::default();
        for (i, version) in [Version::V4, Version::V5].into_iter().enumerate() {
            let codes = &mut written[i];
            for refusal in every_refusal() {
                let out = encode(
                    version,
                    Outgoing::ConnAck {
                        refusal,
                        session_present: false,
                        server_keep_alive: None,
                    },
                );
                // Flags, then the code.
                codes.insert((Packet::Connack, packet_body(&out)[1]));
            }
            let granted = [Some(0), Some(1), None];
            let out = encode(
                version,
                Outgoing::SubAck {
                    pkid: 1,
                    granted: &granted,
                },
            );
            // Packet id, (MQTT 5: no properties), then a code per filter.
            let skip = if version == Version::V5 { 3 } else { 2 };
            for &c in &packet_body(&out)[skip..] {
                codes.insert((Packet::Suback, c));
            }
            if version == Version::V5 {
                let out = encode(
                    version,
                    Outgoing::UnsubAck {
                        pkid: 1,
                        existed: &[true, false],
                    },
                );
                for &c in &packet_body(&out)[3..] {
                    codes.insert((Packet::Unsuback, c));
                }
                for ack in every_ack_code() {
                    for out in [
                        encode(version, Outgoing::PubAck(1, ack)),
                        encode(version, Outgoing::PubRec(1, ack)),
                    ] {
                        // Packet id, then the code (absent: success).
                        let body = packet_body(&out);
                        codes.insert((Packet::Puback, body.get(2).copied().unwrap_or(0)));
                    }
                }
                for reason in every_close_reason() {
                    let out = encode(version, Outgoing::Disconnect(reason));
                    codes.insert((Packet::Disconnect, packet_body(&out)[0]));
                }
            }
        }
        // The endpoint refuses an MQTT 3.1 CONNECT itself (endpoint.rs).
        written[0].insert((
            Packet::Connack,
            v4::ConnectReturnCode::RefusedProtocolVersion as u8,
        ));
        let listed311: BTreeSet<_> = ALL
            .iter()
            .filter_map(|c| c.mqtt311.map(|n| (c.packet, n)))
            .collect();
        let listed5: BTreeSet<_> = ALL
            .iter()
            .filter_map(|c| c.mqtt5.map(|n| (c.packet, n)))
            .collect();
        assert_eq!(written[0], listed311, "MQTT 3.1.1");
        assert_eq!(written[1], listed5, "MQTT 5");
    }

    fn connect_bytes(level: u8) -> Vec<u8> {
        let mut c = v4::Connect::new("dev");
        c.set_login("dev", "pw");
        let mut buf = BytesMut::new();
        c.write(&mut buf).expect("encode");
        let mut v = buf.to_vec();
        // Fixed header (2 bytes here), name length (2), "MQTT" (4), level.
        v[8] = level;
        v
    }

    #[test]
    fn the_protocol_level_is_read_from_the_connect() {
        assert_eq!(connect_level(&connect_bytes(4)), Ok(4));
        assert_eq!(connect_level(&connect_bytes(5)), Ok(5));
        assert_eq!(connect_level(&connect_bytes(3)), Ok(3));
        assert_eq!(
            connect_level(&connect_bytes(4)[..5]),
            Err(ReadError::Incomplete)
        );
        assert_eq!(connect_level(&[]), Err(ReadError::Incomplete));
        assert!(matches!(
            connect_level(&[0xC0, 0x00]),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn packets_round_trip_through_both_versions() {
        let adv = Advertised {
            receive_max: 10,
            max_packet: 1024,
        };
        for version in [Version::V4, Version::V5] {
            let mut out = BytesMut::new();
            let payload = Bytes::from_static(b"{}");
            write(
                version,
                Outgoing::Publish {
                    topic: "devices/d/commands",
                    payload: &payload,
                    qos: 1,
                    pkid: 7,
                },
                adv,
                &mut out,
            );
            match read(version, &mut out, 1024) {
                Ok(Incoming::Publish {
                    topic, qos, pkid, ..
                }) => {
                    assert_eq!((topic.as_str(), qos, pkid), ("devices/d/commands", 1, 7));
                }
                other => panic!("{version:?}: {other:?}"),
            }
            assert!(out.is_empty());
            if version == Version::V5 {
                write(
                    version,
                    Outgoing::Disconnect(CloseReason::TakenOver),
                    adv,
                    &mut out,
                );
                let mut copy = out.clone();
                match v5::Packet::read(&mut copy, None) {
                    Ok(v5::Packet::Disconnect(d)) => {
                        assert_eq!(d.reason_code, v5::DisconnectReasonCode::SessionTakenOver);
                        assert_eq!(
                            d.properties.and_then(|p| p.reason_string).as_deref(),
                            Some(reason_text(CloseReason::TakenOver)),
                            "{out:?}"
                        );
                    }
                    other => panic!("{other:?}: {out:?}"),
                }
                assert!(copy.is_empty(), "exactly one packet: {out:?}");
                out.clear();
            }
            let mut big = BytesMut::new();
            let payload = Bytes::from(vec![0u8; 2048]);
            write(
                version,
                Outgoing::Publish {
                    topic: "t",
                    payload: &payload,
                    qos: 0,
                    pkid: 0,
                },
                adv,
                &mut big,
            );
            assert!(matches!(
                read(version, &mut big, 1024),
                Err(ReadError::TooLarge(_))
            ));
            let mut half = BytesMut::from(&b"\x30\x05ab"[..]);
            assert_eq!(
                read(version, &mut half, 1024).err(),
                Some(ReadError::Incomplete)
            );
        }
    }

    /// Valid packets of both versions to damage: CONNECT, PUBLISH at each
    /// QoS, SUBSCRIBE, PINGREQ, DISCONNECT.
    fn samples() -> Vec<(Version, Vec<u8>)> {
        let mut out = Vec::new();
        for level in [4, 5] {
            out.push((Version::V4, connect_bytes(level)));
        }
        let adv = Advertised {
            receive_max: 10,
            max_packet: 4096,
        };
        for version in [Version::V4, Version::V5] {
            for qos in 0..=1 {
                let mut buf = BytesMut::new();
                let payload = Bytes::from_static(br#"{"temp": 21.5, "door": "open"}"#);
                write(
                    version,
                    Outgoing::Publish {
                        topic: "devices/dev-1/shadow/reported",
                        payload: &payload,
                        qos,
                        pkid: 3,
                    },
                    adv,
                    &mut buf,
                );
                out.push((version, buf.to_vec()));
            }
            let mut buf = BytesMut::new();
            write(
                version,
                Outgoing::Disconnect(CloseReason::TakenOver),
                adv,
                &mut buf,
            );
            out.push((version, buf.to_vec()));
        }
        let mut sub = BytesMut::new();
        v4::Subscribe::new("devices/dev-1/commands", QoS::AtLeastOnce)
            .write(&mut sub)
            .expect("encode");
        out.push((Version::V4, sub.to_vec()));
        out.push((Version::V4, vec![0xC0, 0x00]));
        out.push((Version::V5, vec![0xC0, 0x00]));
        // (Some writes are nothing in a version: no such packet there.)
        out.retain(|(_, bytes)| !bytes.is_empty());
        out
    }

    /// What devices send is hostile input: 30,000 seeded cases feed
    /// arbitrary bytes and valid packets of both versions with bytes
    /// changed, cut or appended to the reader. It answers a packet, "not
    /// yet whole" (consuming nothing) or an error — never a panic out of
    /// it — and a packet it answers was consumed from the buffer. Also
    /// reports how often the codec itself panicked (caught by `read`).
    ///
    /// Found: the codec can take a whole packet and then say it needs more
    /// bytes (`74 04 7f 6b ca 93 …`);
    /// the reader waited for more and read what followed out of step. Such
    /// a packet is now malformed.
    #[test]
    fn arbitrary_bytes_never_panic_the_packet_reader() {
        let mut state = 0x6d71_7474_f022_u64;
        let mut next = move || {
            // SplitMix64, as elsewhere in the tests.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let samples = samples();
        let (mut packets, mut incomplete, mut errors, mut codec_panics) = (0, 0, 0, 0);
        for _ in 0..30_000 {
            let (version, mut bytes) = samples[(next() % samples.len() as u64) as usize].clone();
            match next() % 4 {
                0 => bytes = (0..next() % 48).map(|_| next() as u8).collect(),
                1 => {
                    for _ in 0..1 + next() % 3 {
                        let at = (next() % bytes.len() as u64) as usize;
                        bytes[at] = next() as u8;
                    }
                }
                2 => bytes.truncate((next() % bytes.len() as u64) as usize),
                _ => bytes.extend((0..1 + next() % 8).map(|_| next() as u8)),
            }
            let direct = std::panic::catch_unwind(|| {
                let mut b = BytesMut::from(&bytes[..]);
                match version {
                    Version::V4 => read_v4(&mut b, 4096).is_ok(),
                    Version::V5 => read_v5(&mut b, 4096).is_ok(),
                }
            });
            if direct.is_err() {
                codec_panics += 1;
            }
            let _ = connect_level(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            let before = buf.len();
            match read(version, &mut buf, 4096) {
                Ok(_) => {
                    packets += 1;
                    assert!(
                        buf.len() < before,
                        "a packet consumed nothing: {bytes:02x?}"
                    );
                }
                Err(ReadError::Incomplete) => {
                    incomplete += 1;
                    assert_eq!(buf.len(), before, "incomplete, yet consumed: {bytes:02x?}");
                }
                Err(_) => errors += 1,
            }
        }
        eprintln!(
            "{packets} packets, {incomplete} incomplete, {errors} errors, {codec_panics} codec panics caught"
        );
        assert!(
            packets > 1_000 && errors > 1_000,
            "{packets} packets, {errors} errors"
        );
    }
}
