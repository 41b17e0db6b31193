//! The peer transport: carries a consensus engine's messages (Raft's
//! [`Message`]s, or any [`EngineMessage`]) and snapshot images between
//! the members of a group over authenticated TCP connections, optionally
//! inside mutual TLS.
//!
//! # Connections
//!
//! Every node listens on one address and **dials each of its peers for its
//! own outbound traffic**: one long-lived *message connection* per peer,
//! owned by that peer's writer task and fed from a bounded per-peer queue.
//! Connections a node *accepts* are read-only streams of frames from the
//! peer that dialed them (the acceptor writes only its handshake frames and,
//! on a snapshot connection, one final acknowledgement). So between two
//! nodes A and B there are two message connections, A→B and B→A.
//!
//! A writer that loses its connection, or cannot establish it, redials with
//! capped exponential backoff and jitter (`backoff_min` doubling up to
//! `backoff_max`, each delay drawn from `[base/2, base]`). While it is not
//! connected, messages for that peer are dropped and the peer is reported
//! [`Inbound::Unreachable`]; messages queued *during* a dial attempt are kept
//! and sent once it succeeds. When a peer dials again, its newer connection
//! replaces the older one on the accepting side.
//!
//! A peer's address ([`PeerAddr`]) is a socket address or a host name with
//! a port. A name is looked up at every dial — each connection and every
//! reconnect — through [`TransportConfig::resolver`], and its addresses are
//! tried in order; a name that does not resolve is a failed dial like any
//! other (logged, retried with the backoff). So peers may start in any
//! order, and a peer that comes back at another address is found there.
//!
//! Each snapshot travels on a connection of its own (a *snapshot
//! connection*), so a large image never delays the ordinary messages to the
//! same peer.
//!
//! # Wire format
//!
//! A connection is a sequence of frames:
//!
//! ```text
//! +----------------+-------------------------------+
//! | len: u32, BE   | payload: len bytes            |
//! +----------------+-------------------------------+
//! ```
//!
//! The payload is one `Frame` enum value in [postcard] encoding (variant
//! index as a varint, then the fields in order; integers are varints, byte
//! strings and strings are length-prefixed, fixed-size arrays are raw
//! bytes). The frames are:
//!
//! | variant | fields | used |
//! |---|---|---|
//! | 0 `Hello` | `version: u32, cluster_id: String, from: u64, to: u64, stream: {Messages, Snapshot}, nonce: [u8; 32], app_format: u32, engine: String` | handshake, dialer |
//! | 1 `Challenge` | `nonce: [u8; 32], mac: [u8; 32]` | retired (protocol 1); refused |
//! | 2 `Auth` | `mac: [u8; 32]` | handshake, dialer |
//! | 3 `Refused` | `reason` | handshake, either side, then close |
//! | 4 `Message` | a [`Message`] | message connections |
//! | 5 `SnapshotBegin` | `msg: Message, total_len: u64` | snapshot connections |
//! | 6 `SnapshotChunk` | `data: bytes` (at most `snapshot_chunk_size`) | snapshot connections |
//! | 7 `SnapshotEnd` | `digest: [u8; 32]` (SHA-256 of the whole image) | snapshot connections |
//! | 8 `SnapshotAck` | `ok: bool` | snapshot connections, acceptor |
//! | 9 `Nonce` | `nonce: [u8; 32]` | handshake, acceptor |
//! | 10 `Welcome` | `mac: [u8; 32]` | handshake, acceptor |
//! | 11 `Status` | `from: u64, term: u64, commit: u64, applied: u64, role: u8` | message connections (protocol 5) |
//!
//! A payload longer than the maximum frame size (`max_frame_size`, default
//! 16 MiB; 4 KiB until the handshake has completed), a stream that ends
//! inside a frame, a payload that does not decode as exactly one `Frame`, or
//! a frame out of place closes that connection, with a warning naming the
//! peer address. Nothing a peer sends can stop the node or other
//! connections.
//!
//! # Handshake
//!
//! Every connection starts with a handshake, before any other frame. The
//! side that connects proves first (protocol version 2; version 1 had the
//! acceptor prove first, which let anyone who connected collect a MAC to
//! test guessed secrets against offline):
//!
//! 1. The dialer sends `Hello{version, cluster_id, from, to, stream, nonce_d}`
//!    with 32 fresh bytes from the operating system's random source.
//! 2. The acceptor checks the protocol version only (answering
//!    `Refused{Version{supported}}` on a mismatch: the version is public)
//!    and answers `Nonce{nonce_a}`, 32 fresh random bytes.
//! 3. The dialer answers
//!    `Auth{mac_d = HMAC-SHA256(secret, "…/dialer" ‖ transcript)}`, the
//!    transcript being every field of the `Hello` (length-prefixed where
//!    variable) followed by `nonce_a`.
//! 4. The acceptor verifies `mac_d`; a wrong one gets
//!    `Refused{Authentication}` and the connection closes. Only now does it
//!    check the cluster id, that `to` is its own id and that `from` is
//!    neither 0 nor its own id (refusing with the reason), and answers
//!    `Welcome{mac_a = HMAC-SHA256(secret, "…/acceptor" ‖ transcript)}`.
//!    The peer is then authenticated as `from`.
//! 5. The dialer verifies `mac_a`, so it knows it reached a holder of the
//!    secret too.
//!
//! Until the dialer's proof has verified, the acceptor sends nothing that
//! depends on the secret or on the `Hello`: a stranger learns nothing but
//! the protocol version, and each guess of the secret costs it a
//! connection. (A dialer does prove itself to whatever answers at a peer's
//! address; use a random secret, which the gateway generates.)
//!
//! MACs are compared in constant time. A side that refuses sends
//! `Refused{reason}` (best effort) and closes; both sides log a warning with
//! the peer address and the reason (the acceptor at most 10 per 10 s, with
//! a count of those it left out). Connecting plus the handshake must
//! complete within `handshake_timeout` (3 s).
//!
//! # Handshake slots
//!
//! An accepted connection holds a handshake slot until its handshake ends;
//! one for which there is no slot is closed at once. Each configured peer
//! has `reserved_handshakes_per_peer` (4) slots of its own, taken only by
//! connections from the IP address of its configured address; everyone
//! else shares `max_pending_handshakes` (64), at most
//! `max_pending_handshakes_per_ip` (8) per IP address. Idle or slow sockets
//! from strangers, from however many addresses, cannot keep a member out.
//!
//! # Status reports
//!
//! Besides the engine's messages, a message connection carries the
//! dialer's status reports ([`Transport::send_status`]; the node driver
//! sends one to each member every 250 ms): its own term, commit index,
//! applied index and role (`0` follower, `1` pre-candidate, `2` candidate,
//! `3` leader). Not an engine message, the same for every engine. The
//! acceptor delivers a report as [`Inbound::Status`] only if it names the
//! authenticated peer as its sender, a known role, and a term and indexes
//! no group reaches ([`MAX_TERM`](crate::raft::MAX_TERM),
//! [`MAX_INDEX`](crate::raft::MAX_INDEX)); any other is ignored with a
//! warning naming the peer and the reason (once a minute per peer and
//! reason) and the connection goes on. Best effort both ways: a report
//! that finds the peer's queue full, the peer not connected, or the
//! driver's inbound channel full is dropped, and the engine is never told
//! of it. What a report says is the sender's word about itself: on PBFT a
//! Byzantine member may lie. It is for display only. Protocol 5 added the
//! frame; a version 4 peer would fail to decode it, so the versions refuse
//! each other at the handshake.
//!
//! After the handshake the acceptor drops (and logs) every message whose
//! `from` is not the authenticated id, whose `to` is not its own id, or that
//! is a `Snapshot` message arriving without its image on a message
//! connection.
//!
//! On its own the handshake authenticates the *endpoints*; it does not
//! encrypt or integrity-protect the frames that follow. For that, configure
//! peer TLS (below).
//!
//! # Peer TLS
//!
//! With [`TransportConfig::tls`] set ([`PeerTls`]: the cluster CA, this
//! member's certificate and key), every connection is TLS 1.3 over TCP,
//! mutually authenticated, and the handshake above runs *inside* it, so
//! every frame is encrypted and integrity-protected. Each side verifies the
//! other's chain against the cluster CA alone, and the certificate must
//! name the node: a DNS subject alternative name [`peer_tls_name`],
//! `node-<id>.<cluster-id>.entente`. The dialer has rustls check the
//! acceptor's certificate for the id it dials; the acceptor checks the
//! dialer's for the `from` of its `Hello`, after the dialer's MAC has
//! verified and before `Welcome` (refusing with `Refused{Certificate}`).
//! A member whose own certificate does not name it does not start. The
//! HMAC handshake stays: it carries the ids, stream kind, versions and
//! cluster id the certificate check is held against, and the cluster
//! secret remains a second factor (a stolen certificate alone does not
//! get in). No session resumption, no server name in the clear.
//!
//! The TLS handshake counts against the same `handshake_timeout` and the
//! same handshake slots. The acceptor tells the two kinds of dialer apart
//! by the first byte (a TLS record starts with 22, a handshake frame's
//! length prefix with 0): a plain dialer at a TLS member is answered
//! `Refused{TlsRequired}`, a TLS dialer at a plain member gets a plain
//! refusal its TLS stack reports as a peer that does not speak TLS. A group
//! must be all-TLS or all-plain. Refusals (no certificate, another CA, a
//! certificate naming another node, plain against TLS either way) are
//! logged on both sides like the other refusals, naming the peer address
//! and the reason; a frame altered on the wire fails to decrypt and closes
//! its connection (`bad frame from peer`), delivering nothing.
//!
//! # Snapshots
//!
//! [`Transport::send_snapshot`] dials the peer on a snapshot connection and
//! sends `SnapshotBegin`, the image in `SnapshotChunk`s, and `SnapshotEnd`.
//! The image is streamed from its file, one chunk in memory at a time, on
//! both sides: the receiver writes each chunk into a
//! [`StagedImage`] in [`TransportConfig::snapshot_dir`] (the storage's
//! staging directory, so storing it is a rename). It checks sender,
//! recipient, kind, length (at most `max_snapshot_size`) and digest, fsyncs
//! the file, delivers [`Inbound::Snapshot`] to its driver, and answers
//! `SnapshotAck{ok}`; a rejected image's file is removed. The sender reports
//! [`Inbound::SnapshotStatus`] — `ok: true` only once the receiver has
//! acknowledged. A newer snapshot to the same peer cancels an older one
//! still in flight (which then reports `ok: false`). Each send reports
//! exactly once.
//!
//! # Delivery
//!
//! Delivery is at most once, as Raft expects: messages may be dropped (and
//! are then reported as [`Inbound::Unreachable`], rate-limited), but never
//! duplicated, and those from one peer arrive in the order it sent them
//! while its connection lasts. A snapshot and the messages sent after it
//! travel on different connections, so they may arrive in either order.
//! A driver that falls behind slows the readers (the inbound channel is
//! bounded), which backs up into TCP and finally into the senders' queues.
//!
//! # Driving it
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use coordinator::raft::Message;
//! use coordinator::transport::{Inbound, Transport, TransportConfig};
//!
//! let mut config = TransportConfig::new(1, "cluster-a", b"secret".to_vec(), "0.0.0.0:7000".parse()?);
//! config.peers.insert(2, "gw2.example:7000".parse()?);
//! // The transport carries the messages of one engine (here Raft's).
//! let (transport, mut inbound) = Transport::<Message>::start(config)?;
//! while let Some(event) = inbound.recv().await {
//!     match event {
//!         Inbound::Message(msg) => { /* raft.step(msg) */ }
//!         Inbound::Snapshot { msg, image } => { /* keep `image`, then raft.step(msg) */ }
//!         Inbound::Unreachable(id) => { /* raft.report_unreachable(id) */ }
//!         Inbound::SnapshotStatus { to, ok } => { /* raft.report_snapshot(to, ok) */ }
//!         Inbound::Status(report) => { /* keep the peer's word about itself */ }
//!     }
//! }
//! transport.shutdown().await;
//! # Ok(()) }
//! ```

mod addr;
mod backoff;
mod config;
mod error;
mod frame;
pub(crate) mod gate;
mod handshake;
mod listener;
mod peer;
mod shared;
mod snapshot;
mod status;
#[cfg(test)]
mod tests;
mod tls;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

pub use addr::{InvalidPeerAddr, PeerAddr, Resolve, ResolveFuture, SystemResolver};
pub use config::TransportConfig;
pub use error::TransportError;
pub use handshake::PROTOCOL_VERSION;
pub use status::PeerStatus;
pub use tls::{PeerTls, peer_tls_name};

use crate::image::{SnapshotImage, StagedImage};
use crate::raft::{Message, NodeId};
use consensus::engine::EngineMessage;
use handshake::Identity;
use peer::{Outgoing, PeerHandle};
use shared::{Context, Reporter, lock};
use snapshot::SnapshotJob;

/// What the transport hands to the driver. `M` is the engine's message type.
#[derive(PartialEq, Eq)]
pub enum Inbound<M = Message> {
    /// A message from an authenticated peer, addressed to this node.
    Message(M),
    /// A complete, verified snapshot image with its
    /// snapshot message (one whose [`EngineMessage::snapshot`] is set).
    Snapshot {
        /// The snapshot message.
        msg: M,
        /// The state machine image, received into a file (sealed), in
        /// [`TransportConfig::snapshot_dir`].
        image: StagedImage,
    },
    /// A message to this peer was dropped (its queue was full, it is not
    /// connected, or it is unknown). Rate-limited per peer. The driver calls
    /// `report_unreachable`.
    Unreachable(NodeId),
    /// The outcome of a [`Transport::send_snapshot`]. The driver calls
    /// `report_snapshot`.
    SnapshotStatus {
        /// The peer the snapshot was for.
        to: NodeId,
        /// Whether the peer received and acknowledged it.
        ok: bool,
    },
    /// A peer's status report about itself (checked: its own, a known
    /// role, numbers within bounds). Best effort: dropped when the inbound
    /// channel is full. Informational only (see [`PeerStatus`]).
    Status(PeerStatus),
}

impl<M: fmt::Debug> fmt::Debug for Inbound<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inbound::Message(m) => f.debug_tuple("Message").field(m).finish(),
            Inbound::Snapshot { msg, image } => f
                .debug_struct("Snapshot")
                .field("msg", msg)
                .field("image", &image.path())
                .field("len", &image.len())
                .finish(),
            Inbound::Unreachable(id) => f.debug_tuple("Unreachable").field(id).finish(),
            Inbound::SnapshotStatus { to, ok } => f
                .debug_struct("SnapshotStatus")
                .field("to", to)
                .field("ok", ok)
                .finish(),
            Inbound::Status(s) => f.debug_tuple("Status").field(s).finish(),
        }
    }
}

/// Warnings about incoming connections that did not authenticate: at most
/// this many per window (the others are counted in the next one logged).
const REFUSAL_LOG_BURST: u32 = 10;
/// See [`REFUSAL_LOG_BURST`].
const REFUSAL_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
/// The same refusal of the same peer address (or, when dialing, of the same
/// peer) is logged at most once per this, with the number of repeats left out.
pub(crate) const REPEAT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses whose repeated refusals are tracked at once.
const REPEAT_LOG_KEYS: usize = 1024;

/// Mutable transport state, behind one short-held lock.
#[derive(Debug)]
struct State<M> {
    /// `None` once shut down.
    reporter: Option<Reporter<M>>,
    peers: HashMap<NodeId, PeerHandle<M>>,
    snapshots: HashMap<NodeId, SnapshotJob>,
    accept_task: Option<JoinHandle<()>>,
}

/// The peer transport. See the [module documentation](self).
///
/// All methods take `&self`; share it behind an `Arc` if several tasks send.
/// Dropping it stops all its tasks abruptly; [`Transport::shutdown`] stops
/// them gracefully.
///
/// `M` is the message type of the consensus engine the group runs; the
/// handshake makes sure both ends run the same engine
/// ([`TransportConfig::engine`]).
pub struct Transport<M = Message> {
    node_id: NodeId,
    local_addr: SocketAddr,
    seed: u64,
    ctx: Arc<Context>,
    runtime: Handle,
    shutdown_tx: watch::Sender<bool>,
    state: Mutex<State<M>>,
}

impl<M> fmt::Debug for Transport<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("node_id", &self.node_id)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    let err = |source| TransportError::Listen { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    // Lets a restarted node listen again on its address at once.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

impl<M: EngineMessage> Transport<M> {
    /// Starts listening and dialing the configured peers. Must be called from
    /// within a Tokio runtime, on which the transport then runs.
    ///
    /// Returns the transport and the channel on which it delivers
    /// [`Inbound`] events; the channel closes after [`Transport::shutdown`].
    pub fn start(
        config: TransportConfig,
    ) -> Result<(Transport<M>, mpsc::Receiver<Inbound<M>>), TransportError> {
        Self::start_with_version(config, PROTOCOL_VERSION, None)
    }

    /// [`Transport::start`] on a listener the caller bound (so a caller
    /// that binds port 0 knows the address before anything starts, and no
    /// other process can take the port in between); `config.listen_addr`
    /// is not used.
    pub fn start_on(
        config: TransportConfig,
        listener: std::net::TcpListener,
    ) -> Result<(Transport<M>, mpsc::Receiver<Inbound<M>>), TransportError> {
        Self::start_with_version(config, PROTOCOL_VERSION, Some(listener))
    }

    /// [`Transport::start`], speaking protocol `version` (tests speak
    /// others), on `listener` if given.
    fn start_with_version(
        config: TransportConfig,
        version: u32,
        listener: Option<std::net::TcpListener>,
    ) -> Result<(Transport<M>, mpsc::Receiver<Inbound<M>>), TransportError> {
        config.validate()?;
        let runtime = Handle::try_current().map_err(|_| TransportError::NoRuntime)?;
        let listener = match listener {
            None => bind(config.listen_addr)?,
            Some(l) => {
                let addr = l.local_addr().unwrap_or(config.listen_addr);
                l.set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(l))
                    .map_err(|source| TransportError::Listen { addr, source })?
            }
        };
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransportError::Listen {
                addr: config.listen_addr,
                source,
            })?;
        let seed = match config.rng_seed {
            Some(seed) => seed,
            None => getrandom::u64().map_err(TransportError::Random)?,
        };
        let tls = match &config.tls {
            Some(t) => Some(
                tls::TlsContext::new(t, &config.cluster_id, config.node_id)
                    .map_err(TransportError::Tls)?,
            ),
            None => None,
        };
        let (inbound_tx, inbound_rx) = mpsc::channel(config.inbound_capacity);
        let (shutdown_tx, _) = watch::channel(false);
        let ctx = Arc::new(Context {
            identity: Identity {
                node_id: config.node_id,
                cluster_id: config.cluster_id.clone(),
                secret: config.cluster_secret.clone(),
                version,
                app_format: config.app_format,
                engine: config.engine.name().to_owned(),
            },
            tls,
            gate: Arc::new(gate::Gate::new(&config)),
            refusal_log: gate::LogLimiter::new(REFUSAL_LOG_WINDOW, REFUSAL_LOG_BURST),
            repeat_log: gate::RepeatLimiter::new(REPEAT_LOG_EVERY, REPEAT_LOG_KEYS),
            status_log: gate::RepeatLimiter::new(REPEAT_LOG_EVERY, REPEAT_LOG_KEYS),
            config: config.clone(),
        });
        let reporter = Reporter::new(
            inbound_tx.clone(),
            config.unreachable_report_interval,
            runtime.clone(),
        );
        let accept_task = runtime.spawn(listener::accept_loop(
            listener,
            ctx.clone(),
            inbound_tx,
            shutdown_tx.subscribe(),
        ));
        let transport = Transport {
            node_id: config.node_id,
            local_addr,
            seed,
            ctx,
            runtime,
            shutdown_tx,
            state: Mutex::new(State {
                reporter: Some(reporter),
                peers: HashMap::new(),
                snapshots: HashMap::new(),
                accept_task: Some(accept_task),
            }),
        };
        for (&id, addr) in &config.peers {
            transport.set_peer(id, addr.clone())?;
        }
        Ok((transport, inbound_rx))
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The address the transport listens on (with the actual port when the
    /// configuration asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The current peers and their addresses.
    pub fn peers(&self) -> BTreeMap<NodeId, PeerAddr> {
        lock(&self.state)
            .peers
            .iter()
            .map(|(&id, p)| (id, p.addr.borrow().clone()))
            .collect()
    }

    /// Adds a peer, or changes its address (its connection is then redialed).
    /// For membership changes at run time. A host name is resolved at every
    /// dial, not here.
    pub fn set_peer(&self, id: NodeId, addr: impl Into<PeerAddr>) -> Result<(), TransportError> {
        let addr = addr.into();
        if id == 0 || id == self.node_id {
            return Err(TransportError::InvalidPeer(id));
        }
        let mut state = lock(&self.state);
        let Some(reporter) = state.reporter.clone() else {
            return Err(TransportError::ShutDown);
        };
        if let Some(peer) = state.peers.get(&id) {
            let changed = peer.addr.send_if_modified(|current| {
                let changed = *current != addr;
                *current = addr.clone();
                changed
            });
            if changed {
                self.reserve_for_peer(id, &addr);
            }
            return Ok(());
        }
        let seed = self.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let handle = PeerHandle::spawn(
            &self.runtime,
            self.ctx.clone(),
            reporter,
            self.shutdown_tx.subscribe(),
            id,
            addr.clone(),
            seed,
        );
        state.peers.insert(id, handle);
        self.reserve_for_peer(id, &addr);
        Ok(())
    }

    /// Hands a peer's address to the listener, which reserves handshake
    /// slots for connections from it. A host name's addresses are handed
    /// over each time it resolves (until then it has none).
    fn reserve_for_peer(&self, id: NodeId, addr: &PeerAddr) {
        self.ctx
            .gate
            .set_peer_ips(id, addr.socket_addr().map(|a| a.ip()));
    }

    /// Removes a peer: its queued messages are dropped, its connection
    /// closed, and a snapshot in flight to it cancelled. Returns whether it
    /// was a peer. Connections it dials to us are still accepted (it may
    /// still hold the cluster secret); the core ignores non-members.
    pub fn remove_peer(&self, id: NodeId) -> bool {
        let mut state = lock(&self.state);
        if let Some(job) = state.snapshots.remove(&id) {
            job.cancel(id, state.reporter.as_ref());
        }
        match state.peers.remove(&id) {
            Some(peer) => {
                peer.task.abort();
                self.ctx.gate.remove_peer(id);
                true
            }
            None => false,
        }
    }

    /// Queues `msg` for `msg.to`. Never blocks and never waits.
    ///
    /// If the peer is unknown or its queue is full the message is dropped and
    /// [`Inbound::Unreachable`] reported (at most once per
    /// `unreachable_report_interval` per peer). Messages whose `from` is not
    /// this node are dropped with a warning, since peers would drop them.
    /// A snapshot message belongs to
    /// [`Transport::send_snapshot`]: here it is dropped and reported as
    /// `SnapshotStatus { ok: false }`. After shutdown, messages are dropped
    /// silently.
    pub fn send(&self, msg: M) {
        let to = msg.to();
        let state = lock(&self.state);
        let Some(reporter) = state.reporter.as_ref() else {
            return;
        };
        if msg.from() != self.node_id {
            warn!(
                from = msg.from(),
                to,
                kind = msg.name(),
                "message not from this node; dropped"
            );
            return;
        }
        if msg.snapshot().is_some() {
            // The image would be missing: such a message must go through
            // `send_snapshot`. Fail the snapshot so the leader retries.
            warn!(
                peer = to,
                "snapshot message passed to send(); use send_snapshot()"
            );
            reporter.snapshot_status(to, false);
            return;
        }
        match state.peers.get(&to) {
            Some(peer) => match peer.queue.try_send(Outgoing::Message(msg)) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    debug!(
                        peer = to,
                        kind = msg.name(),
                        "peer queue full; message dropped"
                    );
                    reporter.unreachable(to);
                }
                Err(TrySendError::Closed(_)) => reporter.unreachable(to),
            },
            None => {
                debug!(
                    peer = to,
                    kind = msg.name(),
                    "unknown peer; message dropped"
                );
                reporter.unreachable(to);
            }
        }
    }

    /// Queues this node's status report for peer `to`. Never blocks and
    /// never waits. Best effort: dropped without a report (the engine is
    /// not told of it) when the peer is unknown, not connected or its queue
    /// full; a report whose `from` is not this node is dropped with a
    /// warning.
    pub fn send_status(&self, to: NodeId, status: PeerStatus) {
        if status.from != self.node_id {
            warn!(
                from = status.from,
                to, "status report not from this node; dropped"
            );
            return;
        }
        let state = lock(&self.state);
        if state.reporter.is_none() {
            return;
        }
        match state.peers.get(&to) {
            Some(peer) => {
                if peer
                    .queue
                    .try_send(Outgoing::Status(status.to_wire()))
                    .is_err()
                {
                    debug!(
                        peer = to,
                        "peer queue full or closed; status report dropped"
                    );
                }
            }
            None => debug!(peer = to, "unknown peer; status report dropped"),
        }
    }

    /// Sends a snapshot: `msg` (a snapshot message from this node)
    /// with the image, streamed from its file in chunks on a connection of
    /// its own (one chunk in memory at a time). Never blocks. The outcome
    /// arrives as exactly one [`Inbound::SnapshotStatus`] for `msg.to` —
    /// immediately `ok: false` if the peer is unknown or `msg` is not a
    /// snapshot message from this node; `ok: false` too if the image cannot
    /// be read whole or fails its checksum.
    pub fn send_snapshot(&self, msg: M, image: SnapshotImage) {
        let to = msg.to();
        let mut state = lock(&self.state);
        let Some(reporter) = state.reporter.clone() else {
            return;
        };
        if msg.snapshot().is_none() || msg.from() != self.node_id {
            warn!(
                from = msg.from(),
                to,
                kind = msg.name(),
                "send_snapshot needs a snapshot message from this node"
            );
            reporter.snapshot_status(to, false);
            return;
        }
        let Some(addr) = state.peers.get(&to).map(|p| p.addr.borrow().clone()) else {
            warn!(peer = to, "snapshot for an unknown peer");
            reporter.snapshot_status(to, false);
            return;
        };
        if let Some(older) = state.snapshots.remove(&to) {
            older.cancel(to, Some(&reporter));
        }
        let reported = Arc::new(AtomicBool::new(false));
        let task = self.runtime.spawn(snapshot::send_job(
            self.ctx.clone(),
            addr,
            msg,
            image,
            reporter,
            reported.clone(),
        ));
        state.snapshots.insert(
            to,
            SnapshotJob {
                abort: task.abort_handle(),
                reported,
            },
        );
    }

    /// Stops the transport: closes the listener and every connection, lets
    /// each writer flush what it has in hand (within a second), cancels
    /// snapshot sends, and waits for its tasks. Afterwards the inbound
    /// channel closes once its remaining events are read, and
    /// [`Transport::send`] drops everything. Calling it again does nothing.
    pub async fn shutdown(&self) {
        let (peers, snapshots, accept_task) = {
            let mut state = lock(&self.state);
            state.reporter = None;
            (
                std::mem::take(&mut state.peers),
                std::mem::take(&mut state.snapshots),
                state.accept_task.take(),
            )
        };
        self.shutdown_tx.send_replace(true);
        for job in snapshots.values() {
            job.abort.abort();
        }
        let deadline = tokio::time::Instant::now() + peer::SHUTDOWN_GRACE;
        for (_, peer) in peers {
            let PeerHandle { mut task, .. } = peer;
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
        if let Some(task) = accept_task {
            let _ = task.await;
        }
    }
}

impl<M> Drop for Transport<M> {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
        let state = lock(&self.state);
        for peer in state.peers.values() {
            peer.task.abort();
        }
        for job in state.snapshots.values() {
            job.abort.abort();
        }
        if let Some(task) = &state.accept_task {
            task.abort();
        }
    }
}

/// What an embedder does with a transport besides sending: its address
/// book and its lifetime. Object-safe, so a service that picks its
/// consensus engine at start can hold any engine's transport.
pub trait PeerBook: Send + Sync + fmt::Debug {
    /// See [`Transport::local_addr`].
    fn local_addr(&self) -> SocketAddr;
    /// See [`Transport::set_peer`].
    fn set_peer(&self, id: NodeId, addr: PeerAddr) -> Result<(), TransportError>;
    /// See [`Transport::remove_peer`].
    fn remove_peer(&self, id: NodeId) -> bool;
    /// See [`Transport::peers`].
    fn peers(&self) -> BTreeMap<NodeId, PeerAddr>;
    /// See [`Transport::shutdown`].
    fn shutdown(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

impl<M: EngineMessage> PeerBook for Transport<M> {
    fn local_addr(&self) -> SocketAddr {
        Transport::local_addr(self)
    }

    fn set_peer(&self, id: NodeId, addr: PeerAddr) -> Result<(), TransportError> {
        Transport::set_peer(self, id, addr)
    }

    fn remove_peer(&self, id: NodeId) -> bool {
        Transport::remove_peer(self, id)
    }

    fn peers(&self) -> BTreeMap<NodeId, PeerAddr> {
        Transport::peers(self)
    }

    fn shutdown(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(Transport::shutdown(self))
    }
}

impl<M: EngineMessage> crate::node::PeerSender<M> for Transport<M> {
    fn send(&self, msg: M) {
        Transport::send(self, msg);
    }

    fn send_snapshot(&self, msg: M, image: SnapshotImage) {
        Transport::send_snapshot(self, msg, image);
    }

    fn send_status(&self, to: NodeId, status: PeerStatus) {
        Transport::send_status(self, to, status);
    }
}
