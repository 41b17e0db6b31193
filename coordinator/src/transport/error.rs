//! Error types: [`TransportError`] for the public API, and the internal
//! errors that end a single connection (they are logged, never returned).

use std::io;
use std::net::SocketAddr;

use thiserror::Error;

use super::frame::RefuseReason;
use crate::raft::NodeId;

/// What [`Transport::start`](super::Transport::start) and the membership
/// calls can fail with.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The configuration is unusable; the text says which setting.
    #[error("invalid transport configuration: {0}")]
    InvalidConfig(&'static str),
    /// A peer id that cannot be a peer: 0, or this node's own id.
    #[error("invalid peer id {0}: 0 and this node's own id cannot be peers")]
    InvalidPeer(NodeId),
    /// Binding or listening on the configured address failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured listen address.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Not called from within a Tokio runtime.
    #[error("the transport must be started from within a Tokio runtime")]
    NoRuntime,
    /// The operating system's random source failed (seeding backoff jitter).
    #[error("the operating system's random source failed: {0}")]
    Random(getrandom::Error),
    /// The transport has been shut down.
    #[error("the transport has been shut down")]
    ShutDown,
    /// The peer TLS settings are unusable; the text says why.
    #[error("peer TLS: {0}")]
    Tls(String),
}

/// Why a single frame could not be read or written. Ends that connection.
#[derive(Debug, Error)]
pub(crate) enum FrameError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),
    /// The length prefix exceeds the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize {
        /// The announced (or encoded) length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes announced.
        expected: u64,
        /// Bytes that arrived.
        got: u64,
    },
    /// The payload is not a valid frame.
    #[error("undecodable frame: {0}")]
    Decode(#[source] postcard::Error),
    /// The payload decoded but bytes were left over.
    #[error("undecodable frame: {0} trailing bytes")]
    TrailingBytes(usize),
    /// A frame could not be encoded.
    #[error("cannot encode frame: {0}")]
    Encode(#[source] postcard::Error),
    /// A read or write did not complete in time.
    #[error("timed out")]
    Timeout,
}

/// Why a handshake failed. Ends that connection.
#[derive(Debug, Error)]
pub(crate) enum HandshakeError {
    /// Reading or writing a handshake frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed the connection before sending anything (a port
    /// probe or health check, not worth a warning).
    #[error("connection closed before any handshake frame")]
    NoHello,
    /// The peer closed the connection before the handshake completed.
    #[error("connection closed during the handshake")]
    Closed,
    /// The handshake did not complete within the handshake timeout.
    #[error("handshake timed out")]
    Timeout,
    /// The dialer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks {theirs}, we speak {ours}")]
    Version {
        /// Ours.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The dialer speaks another data format of the embedder (the
    /// gateway's log entry format): a member of another version.
    #[error(
        "data format mismatch: peer speaks format {theirs}, we speak {ours} (members of a group \
         must run versions with the same log entry format)"
    )]
    AppFormat {
        /// Ours.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The peer runs another consensus engine.
    #[error(
        "the peer runs the {theirs:?} consensus engine and this node {ours:?} (a group runs one \
         engine: start every member with the same --consensus)"
    )]
    Engine {
        /// Ours.
        ours: String,
        /// The peer's.
        theirs: String,
    },
    /// The dialer belongs to another cluster.
    #[error("wrong cluster id {theirs:?} (expected {ours:?})")]
    ClusterId {
        /// Ours.
        ours: String,
        /// The peer's.
        theirs: String,
    },
    /// The dialer wanted another node.
    #[error("wrong target node id {target} (this is node {local})")]
    Target {
        /// The id the dialer asked for.
        target: NodeId,
        /// Our id.
        local: NodeId,
    },
    /// The dialer claims an id that cannot be a peer.
    #[error("unacceptable sender node id {0}")]
    Sender(NodeId),
    /// The peer's MAC did not verify.
    #[error("authentication failed: the peer's MAC does not verify (wrong cluster secret?)")]
    BadMac,
    /// The peer refused the handshake.
    #[error("refused by the peer: {0}")]
    Refused(RefuseReason),
    /// A frame that does not belong at this point of the handshake.
    #[error("unexpected {0} frame during the handshake")]
    Unexpected(&'static str),
    /// The random source failed.
    #[error("random source failed: {0}")]
    Random(getrandom::Error),
    /// The MAC could not be keyed (cannot happen with HMAC).
    #[error("cannot key the MAC")]
    Key,
    /// The TLS handshake failed, or TLS failed during the handshake that
    /// follows it (e.g. the peer's alert refusing our certificate).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The dialer spoke plain TCP to this TLS listener.
    #[error("the peer spoke plain TCP to this TLS listener (a group must be all-TLS or all-plain)")]
    PlainToTls,
    /// The dialer spoke TLS to this plain-TCP listener.
    #[error(
        "the peer spoke TLS to this plain-TCP listener, which has no peer TLS configured (a group \
         must be all-TLS or all-plain)"
    )]
    TlsToPlain,
    /// The dialed peer answered a TLS handshake with plain TCP.
    #[error(
        "the peer answered without TLS: it listens in plain TCP (a group must be all-TLS or \
         all-plain)"
    )]
    NotTls,
    /// The dialer's certificate does not name the node id it claims.
    #[error("certificate refused: {0}")]
    Certificate(String),
}

impl HandshakeError {
    /// A TLS failure under a frame error (the peer's alert, a record that
    /// does not decrypt) as [`HandshakeError::Tls`]; anything else as is.
    pub(crate) fn tls_cause(self) -> HandshakeError {
        match self {
            HandshakeError::Frame(FrameError::Io(e)) => match super::tls::rustls_error(&e) {
                Some(t) => HandshakeError::Tls(t.to_string()),
                None => HandshakeError::Frame(FrameError::Io(e)),
            },
            other => other,
        }
    }
}

/// Why dialing a peer failed.
#[derive(Debug, Error)]
pub(crate) enum ConnectError {
    /// The peer's host name did not resolve.
    #[error("cannot resolve the peer's name: {0}")]
    Resolve(#[source] io::Error),
    /// The TCP connection could not be established.
    #[error("connect failed: {0}")]
    Io(#[source] io::Error),
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// Connect and handshake did not complete within the handshake timeout.
    #[error("connect and handshake timed out")]
    Timeout,
}

impl ConnectError {
    /// Whether this is a refusal or authentication failure, which points at a
    /// configuration error and is always worth a warning.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(
            self,
            ConnectError::Handshake(
                HandshakeError::Refused(_)
                    | HandshakeError::BadMac
                    | HandshakeError::Version { .. }
                    | HandshakeError::AppFormat { .. }
                    | HandshakeError::Engine { .. }
                    | HandshakeError::Unexpected(_)
                    | HandshakeError::Tls(_)
                    | HandshakeError::NotTls
                    | HandshakeError::Certificate(_)
            )
        )
    }
}

/// Why a snapshot could not be sent.
#[derive(Debug, Error)]
pub(crate) enum SnapshotSendError {
    /// Dialing the peer failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Writing or reading a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The receiver closed the stream without acknowledging.
    #[error("the receiver closed the stream without acknowledging")]
    NoAck,
    /// The receiver rejected the image.
    #[error("the receiver rejected the snapshot")]
    Rejected,
    /// The receiver answered with something other than an acknowledgement.
    #[error("unexpected {0} frame instead of an acknowledgement")]
    Unexpected(&'static str),
    /// The image could not be read (or failed its checksum).
    #[error("reading the snapshot image: {0}")]
    Image(std::io::Error),
}

/// Why an incoming snapshot was rejected.
#[derive(Debug, Error)]
pub(crate) enum SnapshotRecvError {
    /// Reading a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended before the snapshot did.
    #[error("stream closed before the snapshot was complete")]
    Closed,
    /// A frame out of place.
    #[error("unexpected {0} frame in a snapshot stream")]
    Unexpected(&'static str),
    /// The message is not a snapshot message, or is not from the
    /// authenticated peer, or not addressed to us.
    #[error("invalid snapshot message: {0}")]
    BadMessage(&'static str),
    /// The announced size exceeds the configured maximum.
    #[error("snapshot of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Configured maximum.
        max: u64,
    },
    /// More bytes than announced, or fewer at the end.
    #[error("snapshot length mismatch: announced {expected}, received {got}")]
    Length {
        /// Announced length.
        expected: u64,
        /// Received so far.
        got: u64,
    },
    /// The digest does not match the bytes.
    #[error("snapshot digest mismatch")]
    Digest,
    /// The driver's inbound channel is closed.
    #[error("the inbound channel is closed")]
    InboundClosed,
    /// Writing the image to its file failed.
    #[error("writing the snapshot image: {0}")]
    Image(std::io::Error),
}
