//! The accept loop and the read side of accepted connections.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::Inbound;
use super::error::{FrameError, HandshakeError, SnapshotRecvError};
use super::frame::{
    BareFrame, Frame, MAX_HANDSHAKE_FRAME, NoMessage, RefuseReason, StreamKind, read_frame,
    send_frame,
};
use super::gate::Slot;
use super::handshake::accept_checked;
use super::shared::{Context, lock};
use super::status::PeerStatus;
use super::tls::{PeerStream, TLS_HANDSHAKE_RECORD, names_node};
use crate::image::StagedImage;
use crate::raft::NodeId;
use consensus::engine::EngineMessage;

/// Read buffer per accepted connection.
const READ_BUFFER: usize = 64 * 1024;

/// The live authenticated inbound connections, one per peer and stream
/// kind. A newer connection from the same peer supersedes the older one
/// (which is then closed), so a peer that restarted does not leave a
/// half-open connection behind.
#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    live: HashMap<(NodeId, StreamKind), (u64, oneshot::Sender<()>)>,
}

/// Removes a connection from the registry when its task ends (or is
/// aborted), unless a newer connection has already replaced it.
struct Registration {
    registry: Arc<Mutex<Registry>>,
    key: (NodeId, StreamKind),
    id: u64,
}

impl Registration {
    fn new(
        registry: &Arc<Mutex<Registry>>,
        key: (NodeId, StreamKind),
    ) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut reg = lock(registry);
        reg.next_id += 1;
        let id = reg.next_id;
        if let Some((_, older)) = reg.live.insert(key, (id, tx)) {
            let _ = older.send(());
        }
        (
            Registration {
                registry: registry.clone(),
                key,
                id,
            },
            rx,
        )
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut reg = lock(&self.registry);
        if reg
            .live
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            reg.live.remove(&self.key);
        }
    }
}

/// Accepts connections until shutdown, then closes the listener and every
/// accepted connection.
pub(crate) async fn accept_loop<M: EngineMessage>(
    listener: TcpListener,
    ctx: Arc<Context>,
    inbound: mpsc::Sender<Inbound<M>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let registry = Arc::new(Mutex::new(Registry::default()));
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, addr)) => {
                    let slot = match ctx.gate.admit(addr.ip()) {
                        Ok(slot) => slot,
                        Err(shed) => {
                            if let Some(suppressed) = ctx.refusal_log.allow() {
                                warn!(peer_addr = %addr, suppressed, "{shed}; closing");
                            }
                            continue;
                        }
                    };
                    let ctx = ctx.clone();
                    let inbound = inbound.clone();
                    let registry = registry.clone();
                    conns.spawn(async move {
                        serve(stream, addr, ctx, inbound, registry, slot).await;
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: pause rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Handles one accepted connection: handshake, then the stream.
async fn serve<M: EngineMessage>(
    stream: TcpStream,
    addr: SocketAddr,
    ctx: Arc<Context>,
    inbound: mpsc::Sender<Inbound<M>>,
    registry: Arc<Mutex<Registry>>,
    slot: Slot,
) {
    let _ = stream.set_nodelay(true);
    // The TLS handshake and the one inside it share the handshake timeout.
    let handshake = tokio::time::timeout(ctx.config.handshake_timeout, open(stream, &ctx))
        .await
        .unwrap_or(Err(HandshakeError::Timeout));
    drop(slot);
    let (stream, peer, kind) = match handshake {
        Ok(ok) => ok,
        Err(HandshakeError::NoHello) => {
            debug!(peer_addr = %addr, "connection closed before the handshake");
            return;
        }
        Err(e) => {
            // Logged before the socket is dropped, so the log line precedes
            // the close the peer observes. Rate-limited: a flood of bad
            // connections must not flood the log, nor a misconfigured
            // member that redials every few seconds (once a minute per
            // address and reason, `repeated` counting those left out).
            let reason = e.to_string();
            match ctx.repeat_log.allow((addr.ip(), reason)) {
                Some(repeated) => {
                    if let Some(suppressed) = ctx.refusal_log.allow() {
                        warn!(peer_addr = %addr, reason = %e, repeated, suppressed, "refused incoming connection");
                    }
                }
                None => debug!(peer_addr = %addr, reason = %e, "refused incoming connection"),
            }
            return;
        }
    };
    debug!(peer, peer_addr = %addr, ?kind, "accepted connection");
    let (_registration, superseded) = Registration::new(&registry, (peer, kind));
    match kind {
        StreamKind::Messages => read_messages(stream, addr, peer, &ctx, &inbound, superseded).await,
        StreamKind::Snapshot => {
            tokio::select! {
                _ = superseded => info!(peer, peer_addr = %addr, "snapshot stream superseded by a newer one"),
                _ = receive_snapshot(stream, addr, peer, &ctx, &inbound) => {}
            }
        }
    }
}

/// The acceptor's side of opening a connection: TLS if configured (the
/// dialer's certificate verified against the cluster CA), then the
/// handshake, in which a TLS dialer's certificate must name the node id it
/// claims. A dialer that speaks plain TCP to a TLS listener, or TLS to a
/// plain one, is refused.
async fn open(
    stream: TcpStream,
    ctx: &Context,
) -> Result<(PeerStream, NodeId, StreamKind), HandshakeError> {
    let mut first = [0u8; 1];
    let n = stream
        .peek(&mut first)
        .await
        .map_err(|e| HandshakeError::Frame(FrameError::Io(e)))?;
    if n == 0 {
        return Err(HandshakeError::NoHello);
    }
    let speaks_tls = first[0] == TLS_HANDSHAKE_RECORD;
    let mut stream = match (&ctx.tls, speaks_tls) {
        (None, false) => PeerStream::Plain(stream),
        (Some(tls), true) => {
            let s =
                tls.acceptor.accept(stream).await.map_err(|e| {
                    match super::tls::rustls_error(&e) {
                        Some(t) => HandshakeError::Tls(t.to_string()),
                        None => HandshakeError::Tls(e.to_string()),
                    }
                })?;
            PeerStream::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))
        }
        (Some(_), false) => {
            // Read its Hello first, so the refusal is not lost to a reset.
            let mut s = stream;
            let _ = read_frame::<_, NoMessage>(&mut s, MAX_HANDSHAKE_FRAME).await;
            let refused = BareFrame::Refused {
                reason: RefuseReason::TlsRequired,
            };
            let _ = send_frame(&mut s, &refused, MAX_HANDSHAKE_FRAME).await;
            return Err(HandshakeError::PlainToTls);
        }
        (None, true) => {
            // Take its ClientHello, answer with a plain refusal (which its
            // TLS stack reports as a peer that does not speak TLS).
            let mut s = stream;
            let mut hello = [0u8; 2048];
            let _ = s.read(&mut hello).await;
            let refused = BareFrame::Refused {
                reason: RefuseReason::Protocol,
            };
            let _ = send_frame(&mut s, &refused, MAX_HANDSHAKE_FRAME).await;
            return Err(HandshakeError::TlsToPlain);
        }
    };
    let cert = stream.peer_certificate().cloned();
    let cluster_id = ctx.identity.cluster_id.clone();
    let tls = ctx.tls.is_some();
    let (peer, kind) = accept_checked(&mut stream, &ctx.identity, |from| match (&cert, tls) {
        (Some(cert), _) => names_node(cert, &cluster_id, from).map_err(HandshakeError::Certificate),
        (None, false) => Ok(()),
        (None, true) => Err(HandshakeError::Certificate(
            "the peer presented no certificate".into(),
        )),
    })
    .await
    .map_err(HandshakeError::tls_cause)?;
    Ok((stream, peer, kind))
}

/// Reads message frames from an authenticated peer until the connection
/// ends or misbehaves.
async fn read_messages<M: EngineMessage>(
    stream: PeerStream,
    addr: SocketAddr,
    peer: NodeId,
    ctx: &Context,
    inbound: &mpsc::Sender<Inbound<M>>,
    mut superseded: oneshot::Receiver<()>,
) {
    let local = ctx.identity.node_id;
    let max = ctx.config.max_frame_size;
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut superseded => {
                info!(peer, peer_addr = %addr, "connection superseded by a newer one from the same peer");
                return;
            }
            f = read_frame(&mut reader, max) => f,
        };
        let msg = match frame {
            Ok(None) => {
                debug!(peer, peer_addr = %addr, "peer closed the connection");
                return;
            }
            Err(e) => {
                warn!(peer, peer_addr = %addr, error = %e, "bad frame from peer; dropping connection");
                return;
            }
            Ok(Some(Frame::<M>::Message(msg))) => msg,
            Ok(Some(Frame::<M>::Status(wire))) => {
                // Best effort and never in the way: a bad report is
                // ignored (logged once a minute per peer and reason), a
                // good one dropped if the driver is behind; the
                // connection goes on either way.
                match PeerStatus::from_wire(wire, peer) {
                    Ok(status) => match inbound.try_send(Inbound::Status(status)) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => {
                            debug!(peer, "inbound queue full; status report dropped")
                        }
                        Err(TrySendError::Closed(_)) => return,
                    },
                    Err(reason) => {
                        if let Some(repeated) = ctx.status_log.allow((peer, reason)) {
                            warn!(
                                peer,
                                peer_addr = %addr,
                                claimed_from = wire.from,
                                reason,
                                repeated,
                                "status report from peer refused; ignored"
                            );
                        }
                    }
                }
                continue;
            }
            Ok(Some(other)) => {
                warn!(peer, peer_addr = %addr, frame = other.name(), "unexpected frame on a message stream; dropping connection");
                return;
            }
        };
        if msg.from() != peer {
            warn!(
                peer,
                peer_addr = %addr,
                claimed_from = msg.from(),
                kind = msg.name(),
                "message claims another sender than the authenticated peer; dropped"
            );
            continue;
        }
        if msg.snapshot().is_some() {
            // Without its image a snapshot message must never reach the core.
            warn!(peer, peer_addr = %addr, "snapshot message without its image on a message stream; dropped");
            continue;
        }
        if msg.to() != local {
            warn!(peer, peer_addr = %addr, to = msg.to(), kind = msg.name(), "message addressed to another node; dropped");
            continue;
        }
        if inbound.send(Inbound::Message(msg)).await.is_err() {
            return;
        }
    }
}

/// Receives one snapshot, hands it to the driver and acknowledges it.
async fn receive_snapshot<M: EngineMessage>(
    mut stream: PeerStream,
    addr: SocketAddr,
    peer: NodeId,
    ctx: &Context,
    inbound: &mpsc::Sender<Inbound<M>>,
) {
    let result = read_snapshot(&mut stream, peer, ctx, inbound).await;
    let ok = match &result {
        Ok(len) => {
            info!(peer, peer_addr = %addr, bytes = len, "received snapshot");
            true
        }
        Err(e) => {
            warn!(peer, peer_addr = %addr, error = %e, "rejected incoming snapshot");
            false
        }
    };
    if !matches!(result, Err(SnapshotRecvError::InboundClosed)) {
        let ack = BareFrame::SnapshotAck { ok };
        let send = send_frame(&mut stream, &ack, ctx.config.max_frame_size);
        let _ = tokio::time::timeout(ctx.config.io_timeout, send).await;
    }
}

/// Reads one frame within the I/O timeout.
async fn read_timed<S: AsyncRead + Unpin, M: serde::de::DeserializeOwned>(
    s: &mut S,
    ctx: &Context,
) -> Result<Frame<M>, SnapshotRecvError> {
    match tokio::time::timeout(
        ctx.config.io_timeout,
        read_frame(s, ctx.config.max_frame_size),
    )
    .await
    {
        Err(_) => Err(FrameError::Timeout.into()),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(SnapshotRecvError::Closed),
        Ok(Ok(Some(frame))) => Ok(frame),
    }
}

/// Reads, checks and delivers a snapshot; returns its length.
async fn read_snapshot<S: AsyncRead + AsyncWrite + Unpin, M: EngineMessage>(
    s: &mut S,
    peer: NodeId,
    ctx: &Context,
    inbound: &mpsc::Sender<Inbound<M>>,
) -> Result<u64, SnapshotRecvError> {
    let (msg, total_len) = match read_timed::<_, M>(s, ctx).await? {
        Frame::SnapshotBegin { msg, total_len } => (msg, total_len),
        other => return Err(SnapshotRecvError::Unexpected(other.name())),
    };
    if msg.from() != peer {
        return Err(SnapshotRecvError::BadMessage(
            "sender is not the authenticated peer",
        ));
    }
    if msg.to() != ctx.identity.node_id {
        return Err(SnapshotRecvError::BadMessage("addressed to another node"));
    }
    if msg.snapshot().is_none() {
        return Err(SnapshotRecvError::BadMessage("not a snapshot message"));
    }
    if total_len > ctx.config.max_snapshot_size {
        return Err(SnapshotRecvError::TooLarge {
            len: total_len,
            max: ctx.config.max_snapshot_size,
        });
    }
    let dir = ctx
        .config
        .snapshot_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let staged = StagedImage::create_in(&dir).map_err(SnapshotRecvError::Image)?;
    // The file and the hasher move to a blocking thread for each chunk.
    let mut sink = Some((staged, Sha256::new()));
    let mut got = 0u64;
    let staged = loop {
        match read_timed::<_, M>(s, ctx).await? {
            Frame::SnapshotChunk { data: chunk } => {
                got = got.saturating_add(chunk.0.len() as u64);
                if got > total_len {
                    return Err(SnapshotRecvError::Length {
                        expected: total_len,
                        got,
                    });
                }
                let (mut staged, mut hasher) = sink.take().ok_or(SnapshotRecvError::Closed)?;
                let (staged, hasher, written) = tokio::task::spawn_blocking(move || {
                    hasher.update(&chunk.0);
                    let r = staged.write_all(&chunk.0);
                    (staged, hasher, r)
                })
                .await
                .map_err(|e| SnapshotRecvError::Image(std::io::Error::other(e)))?;
                written.map_err(SnapshotRecvError::Image)?;
                sink = Some((staged, hasher));
            }
            Frame::SnapshotEnd { digest } => {
                if got != total_len {
                    return Err(SnapshotRecvError::Length {
                        expected: total_len,
                        got,
                    });
                }
                let (mut staged, hasher) = sink.take().ok_or(SnapshotRecvError::Closed)?;
                let actual: [u8; 32] = hasher.finalize().into();
                if actual != digest {
                    return Err(SnapshotRecvError::Digest);
                }
                let (staged, sealed) = tokio::task::spawn_blocking(move || {
                    let r = staged.seal();
                    (staged, r)
                })
                .await
                .map_err(|e| SnapshotRecvError::Image(std::io::Error::other(e)))?;
                sealed.map_err(SnapshotRecvError::Image)?;
                break staged;
            }
            other => return Err(SnapshotRecvError::Unexpected(other.name())),
        }
    };
    inbound
        .send(Inbound::Snapshot { msg, image: staged })
        .await
        .map_err(|_| SnapshotRecvError::InboundClosed)?;
    Ok(total_len)
}
