//! Errors: what the gateway refused, and what the application asked that
//! cannot be done.

use crate::mqtt::LinkError;
use crate::state::MessageKind;

/// Why a gateway refused a connection (its CONNACK; docs/ARCHITECTURE.md,
/// "Devices over MQTT", Auth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong password, an unregistered device id, or a certificate-only
    /// device that sent a password (3.1.1: 4, MQTT 5: 0x86).
    BadCredentials,
    /// A client certificate that is not this device's, or a last will
    /// (3.1.1: 5, MQTT 5: 0x87).
    NotAuthorized,
    /// The client id is not a valid device id, or the user name is not the
    /// client id (3.1.1: 2, MQTT 5: 0x85). An id that is not registered is
    /// refused as [`Refusal::BadCredentials`]: the gateway does not tell.
    BadClientId,
    /// Too many failed logins from this address or for this id: wait
    /// (3.1.1: 3 — also "server unavailable" —, MQTT 5: 0x9F).
    Throttled,
    /// The server cannot serve now (MQTT 5: 0x88 unavailable, 0x89 busy).
    ServerUnavailable,
    /// A limit of the server was reached (MQTT 5: 0x97).
    QuotaExceeded,
    /// The protocol version is not served (3.1.1: 1, MQTT 5: 0x84).
    ProtocolVersion,
    /// Any other code (the raw return or reason code).
    Other(u8),
}

impl Refusal {
    /// The refusal a CONNACK code means (`v5`: an MQTT 5 reason code, else
    /// a 3.1.1 return code).
    pub fn from_code(code: u8, v5: bool) -> Refusal {
        match (v5, code) {
            (false, 1) | (true, 0x84) => Refusal::ProtocolVersion,
            (false, 2) | (true, 0x85) => Refusal::BadClientId,
            (false, 3) | (true, 0x9F) => Refusal::Throttled,
            (false, 4) | (true, 0x86) => Refusal::BadCredentials,
            (false, 5) | (true, 0x87) | (true, 0x8A) => Refusal::NotAuthorized,
            (true, 0x88) | (true, 0x89) => Refusal::ServerUnavailable,
            (true, 0x97) => Refusal::QuotaExceeded,
            (_, c) => Refusal::Other(c),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::BadCredentials => f.write_str("bad user name or password"),
            Refusal::NotAuthorized => f.write_str("not authorized"),
            Refusal::BadClientId => f.write_str("client id refused"),
            Refusal::Throttled => f.write_str("too many attempts, throttled (or unavailable)"),
            Refusal::ServerUnavailable => f.write_str("server unavailable or busy"),
            Refusal::QuotaExceeded => f.write_str("quota exceeded"),
            Refusal::ProtocolVersion => f.write_str("protocol version not served"),
            Refusal::Other(c) => write!(f, "code {c:#04x}"),
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (the message says which setting).
    #[error("configuration: {0}")]
    Config(String),
    /// A gateway refused the connection (CONNACK).
    #[error("the gateway refused the connection: {0}")]
    Refused(Refusal),
    /// A gateway refused a subscription (SUBACK reason code; 0x97: past the
    /// session's 16 filters, 0x80 in 3.1.1).
    #[error("the gateway refused the subscription, reason code {code:#04x}")]
    SubscriptionRefused {
        /// The reason code.
        code: u8,
    },
    /// A gateway refused a message (MQTT 5 PUBACK reason code: 0x83 unknown
    /// or foreign command, 0x97 over a size limit, 0x99 malformed). Sending
    /// it again would not change that, so it is not sent again.
    #[error("the gateway refused a {kind} message{}, reason code {code:#04x}", command.as_ref().map(|c| format!(" for command {c}")).unwrap_or_default())]
    MessageRefused {
        /// What the message was.
        kind: MessageKind,
        /// Its command, for `accepted` and `result`.
        command: Option<String>,
        /// The reason code.
        code: u8,
    },
    /// A gateway ended the session (MQTT 5 DISCONNECT: 0x8E another
    /// connection took the session over, 0x98 the device was deleted or its
    /// credentials changed, 0x89 busy, 0x8D keep-alive timeout, ...).
    #[error("the gateway ended the session, reason code {code:#04x}{}", reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Disconnected {
        /// The reason code.
        code: u8,
        /// The gateway's Reason String.
        reason: Option<String>,
    },
    /// The connection failed or was lost (network, TLS, time-out).
    #[error("connection: {0}")]
    Connection(String),
    /// The outgoing queue is full (its bound, [`Config::outbox_limit`]):
    /// the gateway has not acknowledged enough of what was sent yet. Try
    /// again after some [`Event::Delivered`](crate::Event::Delivered).
    #[error("the outgoing queue is full ({0} messages waiting)")]
    QueueFull(usize),
    /// No command with this id was delivered (or it was forgotten: the
    /// device remembers [`Config::dedup_capacity`] commands).
    #[error("no command {0} is waiting for an answer")]
    UnknownCommand(String),
    /// The command already has its result.
    #[error("command {0} already has a result")]
    AlreadyCompleted(String),
    /// A reported patch must be a JSON object.
    #[error("a reported patch must be a JSON object")]
    NotAnObject,
    /// A message would be larger than a gateway takes (64 KiB of payload).
    #[error("a {kind} message of {size} bytes is over the limit of {max}")]
    TooLarge {
        /// What the message was.
        kind: MessageKind,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

impl Error {
    /// Whether trying again later may succeed (connection problems, a busy
    /// or throttling server, a full queue); `false` for refusals that only
    /// a change of configuration or credentials fixes.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Refused(r) => matches!(
                r,
                Refusal::Throttled | Refusal::ServerUnavailable | Refusal::QuotaExceeded
            ),
            Error::Disconnected { code, .. } => *code != 0x98,
            Error::Connection(_) | Error::QueueFull(_) => true,
            _ => false,
        }
    }
}

impl From<LinkError> for Error {
    fn from(e: LinkError) -> Error {
        match e {
            LinkError::Refused { code, v5 } => Error::Refused(Refusal::from_code(code, v5)),
            LinkError::ServerDisconnect { code, reason } => Error::Disconnected { code, reason },
            LinkError::Other(s) => Error::Connection(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connack_codes_map_to_refusals() {
        assert_eq!(Refusal::from_code(4, false), Refusal::BadCredentials);
        assert_eq!(Refusal::from_code(0x86, true), Refusal::BadCredentials);
        assert_eq!(Refusal::from_code(5, false), Refusal::NotAuthorized);
        assert_eq!(Refusal::from_code(0x87, true), Refusal::NotAuthorized);
        assert_eq!(Refusal::from_code(2, false), Refusal::BadClientId);
        assert_eq!(Refusal::from_code(0x85, true), Refusal::BadClientId);
        assert_eq!(Refusal::from_code(3, false), Refusal::Throttled);
        assert_eq!(Refusal::from_code(0x9F, true), Refusal::Throttled);
        assert_eq!(Refusal::from_code(0x89, true), Refusal::ServerUnavailable);
        assert_eq!(Refusal::from_code(0x97, true), Refusal::QuotaExceeded);
        assert_eq!(Refusal::from_code(0x86, false), Refusal::Other(0x86));
        let e: Error = LinkError::Refused { code: 4, v5: false }.into();
        assert_eq!(e, Error::Refused(Refusal::BadCredentials));
        assert!(!e.is_transient());
        assert!(Error::Refused(Refusal::Throttled).is_transient());
        assert!(e.to_string().contains("bad user name or password"), "{e}");
    }
}
