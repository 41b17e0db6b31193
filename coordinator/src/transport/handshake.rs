//! The mutually authenticated handshake that opens every connection.
//!
//! ```text
//! dialer                                          acceptor
//!   Hello{version, cluster_id, from, to, stream, nonce_d, app_format} ->
//!                                                 checks the version only
//!                                      <- Nonce{nonce_a}
//!   Auth{mac_d = HMAC(secret, D | transcript)} ->
//!                                                 verifies mac_d, then checks
//!                                                 cluster id, app_format,
//!                                                 `to`, `from`
//!                      <- Welcome{mac_a = HMAC(secret, A | transcript)}
//!   verifies mac_a
//! ```
//!
//! `transcript` is every field of the `Hello` followed by `nonce_a`; `D` and
//! `A` are distinct role labels, so neither MAC can be replayed as the other,
//! and `nonce_a` is fresh on every connection, so a recorded `Auth` cannot
//! be replayed either.
//!
//! The side that connects proves first. Until its proof has verified, the
//! acceptor sends nothing that depends on the secret or on what the dialer
//! sent: a fresh random nonce, or a refusal naming the protocol version it
//! speaks. A stranger therefore gets nothing to test guessed secrets
//! against offline; each guess costs it a connection, and the listener
//! limits those. Either side may answer `Refused{reason}` instead and
//! close; the acceptor names a reason other than the version or a failed
//! proof only to a dialer that has proved it knows the secret.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use super::error::HandshakeError;
use super::frame::{
    BareFrame as Frame, Hello, MAC_LEN, MAX_HANDSHAKE_FRAME, NONCE_LEN, RefuseReason, StreamKind,
    read_frame, send_frame,
};
use crate::raft::NodeId;

type HmacSha256 = Hmac<Sha256>;

/// The protocol version this implementation speaks.
///
/// Version 2: the dialer proves first (version 1 had the acceptor send its
/// MAC before the dialer had proved anything). Version 3: the `Hello`
/// announces the embedder's data format (`app_format`), which must match.
/// Version 4: the `Hello` names the consensus engine the dialer runs
/// (`engine`), which must match. Version 5: message streams also carry
/// `Status` frames (each member's status report about itself), which a
/// version 4 peer could not decode: the version says so, and a mixed pair
/// refuses each other naming it instead of dropping connections.
pub const PROTOCOL_VERSION: u32 = 5;

/// Role label mixed into the acceptor's MAC.
const LABEL_ACCEPTOR: &[u8] = b"entente/transport/handshake/acceptor";
/// Role label mixed into the dialer's MAC.
const LABEL_DIALER: &[u8] = b"entente/transport/handshake/dialer";

/// Who this node is, as far as handshakes are concerned.
#[derive(Clone)]
pub(crate) struct Identity {
    /// This node's id.
    pub node_id: NodeId,
    /// The cluster id.
    pub cluster_id: String,
    /// The cluster secret.
    pub secret: Vec<u8>,
    /// The protocol version to speak (always [`PROTOCOL_VERSION`] outside tests).
    pub version: u32,
    /// The embedder's data format (`TransportConfig::app_format`).
    pub app_format: u32,
    /// The consensus engine this node runs (`TransportConfig::engine`).
    pub engine: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .field("secret", &"<redacted>")
            .field("version", &self.version)
            .field("app_format", &self.app_format)
            .field("engine", &self.engine)
            .finish()
    }
}

/// The MAC over the handshake transcript for one role, ready to finalize or
/// verify.
fn transcript_mac(
    secret: &[u8],
    label: &[u8],
    hello: &Hello,
    acceptor_nonce: &[u8; NONCE_LEN],
) -> Result<HmacSha256, HandshakeError> {
    let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| HandshakeError::Key)?;
    mac.update(&(label.len() as u64).to_be_bytes());
    mac.update(label);
    mac.update(&hello.version.to_be_bytes());
    mac.update(&(hello.cluster_id.len() as u64).to_be_bytes());
    mac.update(hello.cluster_id.as_bytes());
    mac.update(&hello.from.to_be_bytes());
    mac.update(&hello.to.to_be_bytes());
    mac.update(&[hello.stream.tag()]);
    mac.update(&hello.nonce);
    mac.update(&hello.app_format.to_be_bytes());
    mac.update(&(hello.engine.len() as u64).to_be_bytes());
    mac.update(hello.engine.as_bytes());
    mac.update(acceptor_nonce);
    Ok(mac)
}

fn tag(mac: HmacSha256) -> [u8; MAC_LEN] {
    mac.finalize().into_bytes().into()
}

fn fresh_nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(HandshakeError::Random)?;
    Ok(nonce)
}

/// Best-effort refusal: tells the peer why before the connection closes.
async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, reason: RefuseReason) {
    let _ = send_frame(s, &Frame::Refused { reason }, MAX_HANDSHAKE_FRAME).await;
}

/// Runs the dialer's side of the handshake: we are `local`, we want `to`.
pub(crate) async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    local: &Identity,
    to: NodeId,
    stream: StreamKind,
) -> Result<(), HandshakeError> {
    let hello = Hello {
        version: local.version,
        cluster_id: local.cluster_id.clone(),
        from: local.node_id,
        to,
        stream,
        nonce: fresh_nonce()?,
        app_format: local.app_format,
        engine: local.engine.clone(),
    };
    send_frame(s, &Frame::Hello(hello.clone()), MAX_HANDSHAKE_FRAME).await?;
    let acceptor_nonce = match read_frame(s, MAX_HANDSHAKE_FRAME).await? {
        None => return Err(HandshakeError::Closed),
        Some(Frame::Nonce { nonce }) => nonce,
        Some(Frame::Refused { reason }) => return Err(HandshakeError::Refused(reason)),
        Some(other) => {
            refuse(s, RefuseReason::Protocol).await;
            return Err(HandshakeError::Unexpected(other.name()));
        }
    };
    let mine = transcript_mac(&local.secret, LABEL_DIALER, &hello, &acceptor_nonce)?;
    send_frame(s, &Frame::Auth { mac: tag(mine) }, MAX_HANDSHAKE_FRAME).await?;
    let acceptor_mac = match read_frame(s, MAX_HANDSHAKE_FRAME).await? {
        None => return Err(HandshakeError::Closed),
        Some(Frame::Welcome { mac }) => mac,
        Some(Frame::Refused { reason }) => return Err(HandshakeError::Refused(reason)),
        Some(other) => {
            refuse(s, RefuseReason::Protocol).await;
            return Err(HandshakeError::Unexpected(other.name()));
        }
    };
    let expected = transcript_mac(&local.secret, LABEL_ACCEPTOR, &hello, &acceptor_nonce)?;
    // `verify_slice` compares in constant time.
    if expected.verify_slice(&acceptor_mac).is_err() {
        refuse(s, RefuseReason::Authentication).await;
        return Err(HandshakeError::BadMac);
    }
    Ok(())
}

/// Runs the acceptor's side of the handshake. Returns the authenticated peer
/// id and what the connection will carry.
#[cfg(test)]
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    local: &Identity,
) -> Result<(NodeId, StreamKind), HandshakeError> {
    accept_checked(s, local, |_| Ok(())).await
}

/// [`accept`], with `check` run on the id the dialer claims once its proof
/// has verified and before `Welcome` (on a TLS connection: that the
/// dialer's certificate names that id). A failed check is refused with
/// `Refused{Certificate}`.
pub(crate) async fn accept_checked<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    local: &Identity,
    check: impl FnOnce(NodeId) -> Result<(), HandshakeError>,
) -> Result<(NodeId, StreamKind), HandshakeError> {
    let hello = match read_frame(s, MAX_HANDSHAKE_FRAME).await? {
        None => return Err(HandshakeError::NoHello),
        Some(Frame::Hello(hello)) => hello,
        Some(other) => {
            refuse(s, RefuseReason::Protocol).await;
            return Err(HandshakeError::Unexpected(other.name()));
        }
    };
    // The protocol version is public: saying which one we speak helps an
    // operator mixing releases and tells a stranger nothing.
    if hello.version != local.version {
        refuse(
            s,
            RefuseReason::Version {
                supported: local.version,
            },
        )
        .await;
        return Err(HandshakeError::Version {
            ours: local.version,
            theirs: hello.version,
        });
    }
    let nonce = fresh_nonce()?;
    send_frame(s, &Frame::Nonce { nonce }, MAX_HANDSHAKE_FRAME).await?;
    let dialer_mac = match read_frame(s, MAX_HANDSHAKE_FRAME).await? {
        None => return Err(HandshakeError::Closed),
        Some(Frame::Auth { mac }) => mac,
        Some(Frame::Refused { reason }) => return Err(HandshakeError::Refused(reason)),
        Some(other) => {
            refuse(s, RefuseReason::Protocol).await;
            return Err(HandshakeError::Unexpected(other.name()));
        }
    };
    let expected = transcript_mac(&local.secret, LABEL_DIALER, &hello, &nonce)?;
    // `verify_slice` compares in constant time.
    if expected.verify_slice(&dialer_mac).is_err() {
        refuse(s, RefuseReason::Authentication).await;
        return Err(HandshakeError::BadMac);
    }
    // The dialer knows the secret: now it may learn what else is wrong.
    if hello.cluster_id != local.cluster_id {
        refuse(s, RefuseReason::ClusterId).await;
        return Err(HandshakeError::ClusterId {
            ours: local.cluster_id.clone(),
            theirs: hello.cluster_id,
        });
    }
    if hello.app_format != local.app_format {
        refuse(
            s,
            RefuseReason::AppFormat {
                supported: local.app_format,
            },
        )
        .await;
        return Err(HandshakeError::AppFormat {
            ours: local.app_format,
            theirs: hello.app_format,
        });
    }
    if hello.engine != local.engine {
        refuse(
            s,
            RefuseReason::Engine {
                supported: local.engine.clone(),
            },
        )
        .await;
        return Err(HandshakeError::Engine {
            ours: local.engine.clone(),
            theirs: hello.engine,
        });
    }
    if hello.to != local.node_id {
        refuse(s, RefuseReason::Target).await;
        return Err(HandshakeError::Target {
            target: hello.to,
            local: local.node_id,
        });
    }
    if hello.from == 0 || hello.from == local.node_id {
        refuse(s, RefuseReason::Sender).await;
        return Err(HandshakeError::Sender(hello.from));
    }
    if let Err(e) = check(hello.from) {
        refuse(s, RefuseReason::Certificate).await;
        return Err(e);
    }
    let mac = tag(transcript_mac(
        &local.secret,
        LABEL_ACCEPTOR,
        &hello,
        &nonce,
    )?);
    send_frame(s, &Frame::Welcome { mac }, MAX_HANDSHAKE_FRAME).await?;
    Ok((hello.from, hello.stream))
}
