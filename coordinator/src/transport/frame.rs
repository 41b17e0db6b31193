//! The frames exchanged on a connection and their length-delimited codec.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::FrameError;
use super::status::StatusWire;
use crate::raft::NodeId;

/// Length of a handshake nonce in bytes.
pub(crate) const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag in bytes.
pub(crate) const MAC_LEN: usize = 32;
/// Length of a SHA-256 digest in bytes.
pub(crate) const DIGEST_LEN: usize = 32;
/// Largest frame accepted before the peer has authenticated. Handshake frames
/// are small; this keeps an unauthenticated socket from making us allocate.
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 4096;
/// Longest cluster id accepted in the configuration, so that a `Hello` always
/// fits in [`MAX_HANDSHAKE_FRAME`].
pub(crate) const MAX_CLUSTER_ID_LEN: usize = 1024;
/// Bytes a `SnapshotChunk` frame adds around its data (enum tag and length
/// varint), rounded up.
pub(crate) const CHUNK_OVERHEAD: usize = 16;

/// What a connection carries after its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum StreamKind {
    /// Ordinary Raft messages, one `Frame::Message` each.
    Messages,
    /// One snapshot: `SnapshotBegin`, `SnapshotChunk`s, `SnapshotEnd`,
    /// answered by one `SnapshotAck`.
    Snapshot,
}

impl StreamKind {
    /// The byte that stands for the kind in the handshake MAC.
    pub(crate) fn tag(self) -> u8 {
        match self {
            StreamKind::Messages => 1,
            StreamKind::Snapshot => 2,
        }
    }
}

/// Why a handshake was refused, sent to the other side before closing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RefuseReason {
    /// The protocol versions differ; carries the refusing side's version.
    Version {
        /// The version the refusing side speaks.
        supported: u32,
    },
    /// The cluster ids differ.
    ClusterId,
    /// The connection was meant for another node id.
    Target,
    /// The sender's node id is not acceptable (0, or the acceptor's own).
    Sender,
    /// A MAC did not verify: the cluster secrets differ.
    Authentication,
    /// A frame that does not belong in the handshake.
    Protocol,
    /// The embedders' data formats differ; carries the refusing side's.
    AppFormat {
        /// The format the refusing side speaks.
        supported: u32,
    },
    /// The acceptor uses peer TLS and the dialer spoke plain TCP.
    TlsRequired,
    /// The dialer's TLS certificate does not name the node id it claims.
    Certificate,
    /// The members run different consensus engines; carries the refusing
    /// side's.
    Engine {
        /// The engine the refusing side runs.
        supported: String,
    },
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseReason::Version { supported } => {
                write!(
                    f,
                    "protocol version mismatch (peer speaks version {supported})"
                )
            }
            RefuseReason::ClusterId => f.write_str("wrong cluster id"),
            RefuseReason::Target => f.write_str("wrong target node id"),
            RefuseReason::Sender => f.write_str("unacceptable sender node id"),
            RefuseReason::Authentication => {
                f.write_str("authentication failed (wrong cluster secret?)")
            }
            RefuseReason::Protocol => f.write_str("protocol violation during the handshake"),
            RefuseReason::AppFormat { supported } => {
                write!(f, "data format mismatch (peer speaks format {supported})")
            }
            RefuseReason::TlsRequired => f.write_str(
                "the peer requires TLS and this node spoke plain TCP (a group must be all-TLS or \
                 all-plain)",
            ),
            RefuseReason::Certificate => {
                f.write_str("this node's TLS certificate does not name the node id it claims")
            }
            RefuseReason::Engine { supported } => write!(
                f,
                "consensus engine mismatch (peer runs {supported:?}; a group must run one engine)"
            ),
        }
    }
}

/// The dialer's first frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// The protocol version the dialer speaks. Kept first so that any later
    /// version can still read it.
    pub version: u32,
    /// The cluster the dialer belongs to.
    pub cluster_id: String,
    /// The dialer's node id.
    pub from: NodeId,
    /// The node id the dialer wants to reach.
    pub to: NodeId,
    /// What the connection will carry.
    pub stream: StreamKind,
    /// The dialer's fresh nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The embedder's data format the dialer speaks (the gateway's log
    /// entry format); the acceptor's must be the same.
    pub app_format: u32,
    /// The consensus engine the dialer runs (`raft`, `multi-paxos`, ...);
    /// the acceptor's must be the same.
    pub engine: String,
}

/// Opaque bytes, encoded as one length-prefixed byte string rather than a
/// sequence of separately encoded elements.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes(out))
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// Everything that travels on a connection. The payload of every
/// length-delimited frame is one `Frame` in postcard encoding.
///
/// Variant order is part of the wire format: append new variants at the end.
///
/// `M` is the engine's message type. The handshake frames carry none, so
/// their bytes are the same whatever `M` is: the handshake reads and writes
/// them as [`BareFrame`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "M: Serialize",
    deserialize = "M: serde::de::DeserializeOwned"
))]
pub(crate) enum Frame<M> {
    /// Handshake step 1, dialer to acceptor.
    Hello(Hello),
    /// Protocol 1's second handshake step (the acceptor's nonce with its
    /// MAC, sent before the dialer had proved anything). Retired: no longer
    /// sent, and refused if received. Kept so that the variants after it
    /// keep their numbers (`Refused` must decode across versions).
    Challenge {
        /// The acceptor's fresh nonce.
        nonce: [u8; NONCE_LEN],
        /// HMAC-SHA256 under the cluster secret, acceptor role.
        mac: [u8; MAC_LEN],
    },
    /// Handshake step 3, dialer to acceptor: the dialer's proof, its MAC
    /// over the transcript.
    Auth {
        /// HMAC-SHA256 under the cluster secret, dialer role.
        mac: [u8; MAC_LEN],
    },
    /// Either side refuses the handshake; the connection closes after it.
    Refused {
        /// Why.
        reason: RefuseReason,
    },
    /// One Raft message (message streams only).
    Message(M),
    /// Starts a snapshot stream: the `MessageKind::Snapshot` message and the
    /// image's total length.
    SnapshotBegin {
        /// The snapshot message.
        msg: M,
        /// Length of the image in bytes.
        total_len: u64,
    },
    /// The next piece of the image.
    SnapshotChunk {
        /// The bytes, in order.
        data: Bytes,
    },
    /// Ends the image: SHA-256 over all its bytes.
    SnapshotEnd {
        /// The digest of the whole image.
        digest: [u8; DIGEST_LEN],
    },
    /// The receiver's verdict on a snapshot stream.
    SnapshotAck {
        /// Whether the image arrived intact and was handed to the driver.
        ok: bool,
    },
    /// Handshake step 2, acceptor to dialer: a fresh nonce and nothing else
    /// (nothing that depends on the secret or on what the dialer sent).
    Nonce {
        /// The acceptor's fresh nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// Handshake step 4, acceptor to dialer, only after the dialer's proof
    /// verified: the acceptor's own MAC over the transcript.
    Welcome {
        /// HMAC-SHA256 under the cluster secret, acceptor role.
        mac: [u8; MAC_LEN],
    },
    /// The sender's status report (message streams only; protocol 5): its
    /// commit and applied index, term and role, for the group view. Not an
    /// engine message: the driver keeps the latest per member.
    Status(StatusWire),
}

/// A message type with no values: the handshake's frames never carry one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum NoMessage {}

/// A frame that carries no message (the handshake's, a refusal, a snapshot
/// chunk, end or acknowledgement).
pub(crate) type BareFrame = Frame<NoMessage>;

impl<M> Frame<M> {
    /// A short name for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Challenge { .. } => "Challenge",
            Frame::Auth { .. } => "Auth",
            Frame::Refused { .. } => "Refused",
            Frame::Message(_) => "Message",
            Frame::SnapshotBegin { .. } => "SnapshotBegin",
            Frame::SnapshotChunk { .. } => "SnapshotChunk",
            Frame::SnapshotEnd { .. } => "SnapshotEnd",
            Frame::SnapshotAck { .. } => "SnapshotAck",
            Frame::Nonce { .. } => "Nonce",
            Frame::Welcome { .. } => "Welcome",
            Frame::Status(_) => "Status",
        }
    }
}

/// Encodes `frame` as `[len u32 BE][postcard payload]`, refusing payloads
/// longer than `max`.
pub(crate) fn encode_frame<M: Serialize>(
    frame: &Frame<M>,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(frame, vec![0u8; 4]).map_err(FrameError::Encode)?;
    let len = out.len() - 4;
    let wire_len = u32::try_from(len)
        .ok()
        .filter(|_| len <= max)
        .ok_or(FrameError::Oversize {
            len: len as u64,
            max,
        })?;
    out[..4].copy_from_slice(&wire_len.to_be_bytes());
    Ok(out)
}

/// Decodes one frame payload; trailing bytes are an error.
pub(crate) fn decode_frame<M: serde::de::DeserializeOwned>(
    payload: &[u8],
) -> Result<Frame<M>, FrameError> {
    let (frame, rest) =
        postcard::take_from_bytes::<Frame<M>>(payload).map_err(FrameError::Decode)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(frame)
}

/// Writes one frame (without flushing).
pub(crate) async fn write_frame<W: AsyncWrite + Unpin, M: Serialize>(
    w: &mut W,
    frame: &Frame<M>,
    max: usize,
) -> Result<(), FrameError> {
    let bytes = encode_frame(frame, max)?;
    w.write_all(&bytes).await.map_err(FrameError::Io)
}

/// Writes one frame and flushes.
pub(crate) async fn send_frame<W: AsyncWrite + Unpin, M: Serialize>(
    w: &mut W,
    frame: &Frame<M>,
    max: usize,
) -> Result<(), FrameError> {
    write_frame(w, frame, max).await?;
    w.flush().await.map_err(FrameError::Io)
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream (at a frame
/// boundary); a stream that ends inside a frame is [`FrameError::Truncated`].
///
/// Never reads past the end of the frame, so the stream can be handed on
/// (e.g. wrapped in a buffer) afterwards. Memory grows with the bytes that
/// actually arrive, not with the announced length.
pub(crate) async fn read_frame<R: AsyncRead + Unpin, M: serde::de::DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<Option<Frame<M>>, FrameError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < len_buf.len() {
        let n = r.read(&mut len_buf[got..]).await.map_err(FrameError::Io)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated {
                    expected: 4,
                    got: got as u64,
                })
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf);
    let len_usize = usize::try_from(len).map_err(|_| FrameError::Oversize {
        len: u64::from(len),
        max,
    })?;
    if len_usize > max {
        return Err(FrameError::Oversize {
            len: u64::from(len),
            max,
        });
    }
    let mut payload = Vec::with_capacity(len_usize.min(64 * 1024));
    let got = (&mut *r)
        .take(u64::from(len))
        .read_to_end(&mut payload)
        .await
        .map_err(FrameError::Io)?;
    if got != len_usize {
        return Err(FrameError::Truncated {
            expected: u64::from(len),
            got: got as u64,
        });
    }
    decode_frame(&payload).map(Some)
}
