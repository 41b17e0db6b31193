//! Transport settings.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::addr::{PeerAddr, Resolve, SystemResolver};
use super::error::TransportError;
use super::frame::{CHUNK_OVERHEAD, MAX_CLUSTER_ID_LEN};
use super::tls::PeerTls;
use crate::raft::NodeId;
use consensus::engine::EngineKind;

/// Settings for a [`Transport`](super::Transport).
///
/// [`TransportConfig::new`] fills in defaults for everything but the
/// identity and the listen address; the fields are public so that callers
/// adjust what they need.
#[derive(Clone)]
pub struct TransportConfig {
    /// This node's id (never 0).
    pub node_id: NodeId,
    /// The cluster id; both sides of a connection must agree on it.
    pub cluster_id: String,
    /// The shared cluster secret that authenticates handshakes. Must not be
    /// empty; 32 random bytes are recommended.
    pub cluster_secret: Vec<u8>,
    /// Where to listen for peers. Port 0 picks a free port; see
    /// [`Transport::local_addr`](super::Transport::local_addr).
    pub listen_addr: SocketAddr,
    /// The initial peers and their listen addresses (socket addresses, or
    /// host names resolved at every dial). Change them at run time with
    /// [`Transport::set_peer`](super::Transport::set_peer) and
    /// [`Transport::remove_peer`](super::Transport::remove_peer).
    pub peers: BTreeMap<NodeId, PeerAddr>,
    /// Looks up peers given by host name, at every dial. Default: the
    /// operating system's resolver ([`SystemResolver`]).
    pub resolver: Arc<dyn Resolve>,
    /// Largest frame payload accepted or sent, in bytes. Default 16 MiB.
    pub max_frame_size: usize,
    /// Messages queued per peer before [`Transport::send`](super::Transport::send)
    /// starts dropping them. Default 1024.
    pub peer_queue_capacity: usize,
    /// Capacity of the inbound channel to the driver. Default 4096.
    pub inbound_capacity: usize,
    /// Shortest reconnect delay. Default 50 ms.
    pub backoff_min: Duration,
    /// Longest reconnect delay. Default 5 s.
    pub backoff_max: Duration,
    /// Bound on connecting plus the handshake, on both sides. Default 3 s:
    /// the handshake is two round trips, and a connection that has not
    /// authenticated holds a handshake slot until then.
    pub handshake_timeout: Duration,
    /// Bound on one write (batch) to a peer, on each frame of an incoming
    /// snapshot, and on waiting for a snapshot's acknowledgement. A peer that
    /// takes longer is disconnected. Default 10 s.
    pub io_timeout: Duration,
    /// Bytes of snapshot image per chunk frame. Default 1 MiB. Must leave room
    /// for framing within `max_frame_size` (of the receiver, too).
    pub snapshot_chunk_size: usize,
    /// Largest snapshot image accepted from a peer. Default 4 GiB.
    pub max_snapshot_size: u64,
    /// Where incoming snapshot images are written as they arrive (files
    /// `tmp-image-…`, mode 0600). Give the storage's
    /// [`staging_dir`](crate::storage::Storage::staging_dir), so that
    /// storing an image is a rename. Default (`None`): the system's
    /// temporary directory.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// Shortest interval between two [`Inbound::Unreachable`](super::Inbound::Unreachable)
    /// reports for the same peer. Default 100 ms.
    pub unreachable_report_interval: Duration,
    /// Incoming connections from addresses other than the peers' allowed to
    /// be in their handshake at once (the shared pool); more are closed at
    /// once. Default 64.
    pub max_pending_handshakes: usize,
    /// Of those, how many one IP address may hold. Default 8.
    pub max_pending_handshakes_per_ip: usize,
    /// Handshake slots reserved for each configured peer, usable only by
    /// connections from the IP address of that peer's address, on top of
    /// the shared pool: strangers cannot keep a member out. Default 4 (a
    /// peer opens one message connection and at most a few snapshot
    /// connections).
    pub reserved_handshakes_per_peer: usize,
    /// The embedder's data format (for the gateway: its log entry format),
    /// announced in every handshake: a peer announcing another is refused
    /// (both sides log why). Default 0.
    pub app_format: u32,
    /// The consensus engine this node runs, announced in every handshake: a
    /// peer running another is refused (both sides log why). Default
    /// [`EngineKind::Raft`].
    pub engine: EngineKind,
    /// Mutual TLS between members ([`PeerTls`]); `None` (the default):
    /// plain TCP, authenticated by the cluster secret but neither encrypted
    /// nor integrity-protected. A group must be all-TLS or all-plain.
    pub tls: Option<PeerTls>,
    /// Seed for the reconnect jitter. `None` (the default) seeds from the
    /// operating system's random source.
    pub rng_seed: Option<u64>,
}

impl TransportConfig {
    /// Default maximum frame size: 16 MiB.
    pub const DEFAULT_MAX_FRAME_SIZE: usize = 16 * 1024 * 1024;
    /// Default snapshot chunk size: 1 MiB.
    pub const DEFAULT_SNAPSHOT_CHUNK_SIZE: usize = 1024 * 1024;

    /// A configuration with the given identity and listen address, no peers,
    /// and defaults for everything else.
    pub fn new(
        node_id: NodeId,
        cluster_id: impl Into<String>,
        cluster_secret: impl Into<Vec<u8>>,
        listen_addr: SocketAddr,
    ) -> Self {
        TransportConfig {
            node_id,
            cluster_id: cluster_id.into(),
            cluster_secret: cluster_secret.into(),
            listen_addr,
            peers: BTreeMap::new(),
            resolver: Arc::new(SystemResolver),
            max_frame_size: Self::DEFAULT_MAX_FRAME_SIZE,
            peer_queue_capacity: 1024,
            inbound_capacity: 4096,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_secs(10),
            snapshot_chunk_size: Self::DEFAULT_SNAPSHOT_CHUNK_SIZE,
            max_snapshot_size: 4 * 1024 * 1024 * 1024,
            snapshot_dir: None,
            unreachable_report_interval: Duration::from_millis(100),
            max_pending_handshakes: 64,
            max_pending_handshakes_per_ip: 8,
            reserved_handshakes_per_peer: 4,
            app_format: 0,
            engine: EngineKind::Raft,
            tls: None,
            rng_seed: None,
        }
    }

    /// Checks that the settings are usable.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |reason| Err(TransportError::InvalidConfig(reason));
        if self.node_id == 0 {
            return bad("node_id must not be 0");
        }
        if self.cluster_id.len() > MAX_CLUSTER_ID_LEN {
            return bad("cluster_id must be at most 1024 bytes");
        }
        if self.cluster_secret.is_empty() {
            return bad("cluster_secret must not be empty");
        }
        if self.peers.contains_key(&0) || self.peers.contains_key(&self.node_id) {
            return bad("peers must not contain 0 or this node's own id");
        }
        if self.max_frame_size < 1024 || u32::try_from(self.max_frame_size).is_err() {
            return bad("max_frame_size must be between 1 KiB and 4 GiB - 1");
        }
        if self.peer_queue_capacity == 0 {
            return bad("peer_queue_capacity must not be 0");
        }
        if self.inbound_capacity == 0 {
            return bad("inbound_capacity must not be 0");
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return bad("backoff_min must be positive and not above backoff_max");
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be positive");
        }
        if self.io_timeout.is_zero() {
            return bad("io_timeout must be positive");
        }
        if self.snapshot_chunk_size == 0
            || self.snapshot_chunk_size.saturating_add(CHUNK_OVERHEAD) > self.max_frame_size
        {
            return bad("snapshot_chunk_size must be positive and fit in a frame");
        }
        if self.max_pending_handshakes == 0 {
            return bad("max_pending_handshakes must not be 0");
        }
        if self.max_pending_handshakes_per_ip == 0 {
            return bad("max_pending_handshakes_per_ip must not be 0");
        }
        Ok(())
    }
}

impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .field("cluster_secret", &"<redacted>")
            .field("listen_addr", &self.listen_addr)
            .field("peers", &self.peers)
            .field("resolver", &"<resolver>")
            .field("max_frame_size", &self.max_frame_size)
            .field("peer_queue_capacity", &self.peer_queue_capacity)
            .field("inbound_capacity", &self.inbound_capacity)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("snapshot_chunk_size", &self.snapshot_chunk_size)
            .field("max_snapshot_size", &self.max_snapshot_size)
            .field("snapshot_dir", &self.snapshot_dir)
            .field(
                "unreachable_report_interval",
                &self.unreachable_report_interval,
            )
            .field("max_pending_handshakes", &self.max_pending_handshakes)
            .field(
                "max_pending_handshakes_per_ip",
                &self.max_pending_handshakes_per_ip,
            )
            .field(
                "reserved_handshakes_per_peer",
                &self.reserved_handshakes_per_peer,
            )
            .field("tls", &self.tls)
            .field("rng_seed", &self.rng_seed)
            .finish()
    }
}
