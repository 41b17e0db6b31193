//! The codes a gateway answers a device with: CONNACK return / reason
//! codes, SUBACK and UNSUBACK per-filter codes, PUBACK (and PUBREC) reason
//! codes, and the reason codes of the DISCONNECT it sends before closing a
//! connection. MQTT 3.1.1 has fewer: a CONNACK return code, `0x80` in a
//! SUBACK, and no code at all in PUBACK, UNSUBACK or from the server in
//! DISCONNECT (the connection just closes).
//!
//! [`ALL`] is the list the AsyncAPI document prints; the gateway's unit
//! tests check that the codes it writes are exactly these.

use std::fmt;

/// The packet a code is carried in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Packet {
    /// CONNACK: the answer to CONNECT.
    Connack,
    /// SUBACK: one code per filter of a SUBSCRIBE.
    Suback,
    /// UNSUBACK: one code per filter of an UNSUBSCRIBE (MQTT 5 only).
    Unsuback,
    /// PUBACK (QoS 1) or PUBREC (QoS 2): the answer to a device's message.
    Puback,
    /// DISCONNECT from the gateway, just before it closes the connection
    /// (MQTT 5 only).
    Disconnect,
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Packet::Connack => "CONNACK",
            Packet::Suback => "SUBACK",
            Packet::Unsuback => "UNSUBACK",
            Packet::Puback => "PUBACK/PUBREC",
            Packet::Disconnect => "DISCONNECT",
        })
    }
}

/// One code and when the gateway sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonCode {
    /// The packet that carries it.
    pub packet: Packet,
    /// The MQTT 5 reason code, if MQTT 5 has one for this case.
    pub mqtt5: Option<u8>,
    /// The MQTT 3.1.1 return code, if 3.1.1 has one for this case.
    pub mqtt311: Option<u8>,
    /// The specification's name for it.
    pub name: &'static str,
    /// When the gateway sends it, and what a device should do.
    pub meaning: &'static str,
}

const fn code(
    packet: Packet,
    mqtt5: Option<u8>,
    mqtt311: Option<u8>,
    name: &'static str,
    meaning: &'static str,
) -> ReasonCode {
    ReasonCode {
        packet,
        mqtt5,
        mqtt311,
        name,
        meaning,
    }
}

use Packet::{Connack, Disconnect, Puback, Suback, Unsuback};

/// Every code the gateway sends a device.
pub const ALL: &[ReasonCode] = &[
    code(
        Connack,
        Some(0x00),
        Some(0),
        "Success",
        "Logged in: the session starts.",
    ),
    code(
        Connack,
        None,
        Some(1),
        "Unacceptable protocol version",
        "An MQTT 3.1 CONNECT (protocol level 3): use 3.1.1 or 5.",
    ),
    code(
        Connack,
        Some(0x85),
        Some(2),
        "Client Identifier not valid",
        "The username is not the client id (it may be empty only with a client certificate), or the client id is not a valid device id.",
    ),
    code(
        Connack,
        Some(0x86),
        Some(4),
        "Bad User Name or Password",
        "No such device, or a wrong or missing secret (a device registered for certificates only has none). Do not retry at once: failed logins are throttled.",
    ),
    code(
        Connack,
        Some(0x87),
        Some(5),
        "Not authorized",
        "A last will (not supported), or a client certificate that is not the one registered for this device.",
    ),
    code(
        Connack,
        Some(0x88),
        Some(3),
        "Server unavailable",
        "The gateway cannot check the login now (no quorum in its group, or it is stopping): retry with backoff, or another gateway.",
    ),
    code(
        Connack,
        Some(0x9F),
        Some(3),
        "Connection rate exceeded",
        "Too many failed logins from this address or for this id (10 at once, then 1 a second): retry later.",
    ),
    code(
        Suback,
        Some(0x00),
        Some(0x00),
        "Granted QoS 0",
        "The filter is in force at QoS 0.",
    ),
    code(
        Suback,
        Some(0x01),
        Some(0x01),
        "Granted QoS 1",
        "The filter is in force at QoS 1 (a request for QoS 2 is granted QoS 1).",
    ),
    code(
        Suback,
        Some(0x97),
        Some(0x80),
        "Quota exceeded (3.1.1: Failure)",
        "The session already holds 16 filters: this one is refused.",
    ),
    code(
        Unsuback,
        Some(0x00),
        None,
        "Success",
        "The session held the filter; it no longer does.",
    ),
    code(
        Unsuback,
        Some(0x11),
        None,
        "No subscription existed",
        "The session did not hold the filter.",
    ),
    code(
        Puback,
        Some(0x00),
        None,
        "Success",
        "What the message causes is committed by the gateway group, or it changes nothing (a result for a finished command, a duplicate).",
    ),
    code(
        Puback,
        Some(0x83),
        None,
        "Implementation specific error",
        "Refused for good: no such command for this device, or the device was deleted. Do not send it again.",
    ),
    code(
        Puback,
        Some(0x97),
        None,
        "Quota exceeded",
        "The payload is larger than the gateway takes (64 KiB by default), or the reported state would pass its size limit.",
    ),
    code(
        Puback,
        Some(0x99),
        None,
        "Payload format invalid",
        "Not the JSON the topic calls for (malformed JSON, a reported patch that is not an object, a malformed result).",
    ),
    code(
        Disconnect,
        Some(0x81),
        None,
        "Malformed Packet",
        "A packet that could not be decoded.",
    ),
    code(
        Disconnect,
        Some(0x82),
        None,
        "Protocol Error",
        "A protocol violation, such as a second CONNECT on the connection.",
    ),
    code(
        Disconnect,
        Some(0x87),
        None,
        "Not authorized",
        "A PUBLISH or SUBSCRIBE outside the device's own topics.",
    ),
    code(
        Disconnect,
        Some(0x89),
        None,
        "Server busy",
        "Something the device sent could not be committed in time: it was not acknowledged; reconnect and send it again.",
    ),
    code(
        Disconnect,
        Some(0x8B),
        None,
        "Server shutting down",
        "The gateway is stopping: reconnect, to it or another gateway of the group.",
    ),
    code(
        Disconnect,
        Some(0x8D),
        None,
        "Keep Alive timeout",
        "No packet from the device within 1.5 times its keep-alive.",
    ),
    code(
        Disconnect,
        Some(0x8E),
        None,
        "Session taken over",
        "Another connection logged in with the same client id, on this gateway or another.",
    ),
    code(
        Disconnect,
        Some(0x94),
        None,
        "Topic Alias invalid",
        "A topic alias (Topic Alias Maximum is 0).",
    ),
    code(
        Disconnect,
        Some(0x95),
        None,
        "Packet too large",
        "A packet larger than the gateway's Maximum Packet Size (256 KiB by default).",
    ),
    code(
        Disconnect,
        Some(0x97),
        None,
        "Quota exceeded",
        "The device does not read what it is sent (too many messages waiting, or writes blocked for 10 s); it gets what it missed when it reconnects.",
    ),
    code(
        Disconnect,
        Some(0x98),
        None,
        "Administrative action",
        "The device was deleted, or the secret or certificate it logged in with was replaced.",
    ),
    code(
        Disconnect,
        Some(0x9A),
        None,
        "Retain not supported",
        "A retained PUBLISH (Retain Available is 0).",
    ),
    code(
        Disconnect,
        Some(0x9B),
        None,
        "QoS not supported",
        "A QoS 2 PUBLISH (Maximum QoS is 1).",
    ),
    code(
        Disconnect,
        Some(0x9C),
        None,
        "Use another server",
        "The gateway left its group: connect to another gateway.",
    ),
    code(
        Disconnect,
        Some(0x9E),
        None,
        "Shared Subscriptions not supported",
        "A `$share/…` filter.",
    ),
    code(
        Disconnect,
        Some(0xA1),
        None,
        "Subscription Identifiers not supported",
        "A SUBSCRIBE with a subscription identifier.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once_per_packet_and_version() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(
                a.mqtt5.is_some() || a.mqtt311.is_some(),
                "{} {} has no code",
                a.packet,
                a.name
            );
            for b in &ALL[i + 1..] {
                if a.packet != b.packet {
                    continue;
                }
                // 3.1.1 has one CONNACK code (3) for two MQTT 5 cases.
                let same311 = a.mqtt311.is_some() && a.mqtt311 == b.mqtt311;
                assert!(
                    !(a.mqtt5.is_some() && a.mqtt5 == b.mqtt5),
                    "{} {:?} twice",
                    a.packet,
                    a.mqtt5
                );
                assert!(
                    !same311 || (a.packet == Packet::Connack && a.mqtt311 == Some(3)),
                    "{} 3.1.1 code {:?} twice",
                    a.packet,
                    a.mqtt311
                );
            }
        }
    }
}
