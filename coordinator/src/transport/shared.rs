//! State shared by the transport's tasks.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_rustls::TlsStream;

use super::Inbound;
use super::addr::PeerAddr;
use super::config::TransportConfig;
use super::error::ConnectError;
use super::error::HandshakeError;
use super::frame::StreamKind;
use super::gate::{Gate, LogLimiter, RepeatLimiter};
use super::handshake::{Identity, dial};
use super::tls::{PeerStream, TlsContext, rustls_error, server_name};
use crate::raft::NodeId;

/// Settings and shared limits every task reads.
#[derive(Debug)]
pub(crate) struct Context {
    /// Who we are in handshakes.
    pub identity: Identity,
    /// Peer TLS, if configured: every connection is TLS, both ways.
    pub tls: Option<TlsContext>,
    /// The configuration the transport started with (its `peers` field is
    /// the initial set only).
    pub config: TransportConfig,
    /// The listener's handshake slots.
    pub gate: Arc<Gate>,
    /// Limits warnings about incoming connections that did not authenticate.
    pub refusal_log: LogLimiter,
    /// And about the same refusal from the same address, which a
    /// misconfigured member repeats on every redial.
    pub repeat_log: RepeatLimiter<(std::net::IpAddr, String)>,
    /// Refused status reports: each peer and reason logged once a minute.
    pub status_log: RepeatLimiter<(NodeId, &'static str)>,
}

/// Locks a mutex, ignoring poisoning: the data behind our locks stays
/// consistent even if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Feeds transport feedback into the driver's inbound channel.
#[derive(Clone, Debug)]
pub(crate) struct Reporter<M> {
    tx: mpsc::Sender<Inbound<M>>,
    last_unreachable: Arc<Mutex<HashMap<NodeId, Instant>>>,
    interval: Duration,
    runtime: Handle,
}

impl<M: Send + 'static> Reporter<M> {
    /// A reporter on `tx`, reporting each unreachable peer at most once per
    /// `interval`.
    pub(crate) fn new(tx: mpsc::Sender<Inbound<M>>, interval: Duration, runtime: Handle) -> Self {
        Reporter {
            tx,
            last_unreachable: Arc::new(Mutex::new(HashMap::new())),
            interval,
            runtime,
        }
    }

    /// Reports that a message to `peer` was dropped, unless it was reported
    /// within the interval. Never blocks: if the inbound channel is full the
    /// report is skipped (and the next drop reports again).
    pub(crate) fn unreachable(&self, peer: NodeId) {
        let now = Instant::now();
        let mut last = lock(&self.last_unreachable);
        if let Some(at) = last.get(&peer)
            && now.duration_since(*at) < self.interval
        {
            return;
        }
        match self.tx.try_send(Inbound::Unreachable(peer)) {
            Ok(()) => {
                last.insert(peer, now);
            }
            Err(TrySendError::Full(_)) => {
                tracing::debug!(peer, "inbound channel full; unreachable report skipped");
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Reports the outcome of a snapshot send. The report is never lost to a
    /// full channel: it is delivered by a small task that waits for room.
    pub(crate) fn snapshot_status(&self, to: NodeId, ok: bool) {
        let tx = self.tx.clone();
        self.runtime.spawn(async move {
            let _ = tx.send(Inbound::SnapshotStatus { to, ok }).await;
        });
    }
}

/// Dials `peer` at `addr` and runs the handshake for a `stream`
/// connection, all within the handshake timeout. A host name is looked up
/// now (every dial), its addresses tried in order until one connects, and
/// handed to the listener's gate (the peer's reserved handshake slots).
/// Returns the connection and the address it reached.
pub(crate) async fn connect(
    ctx: &Context,
    addr: &PeerAddr,
    peer: NodeId,
    stream: StreamKind,
) -> Result<(PeerStream, SocketAddr), ConnectError> {
    let attempt = async {
        let targets = match addr {
            PeerAddr::Ip(a) => vec![*a],
            PeerAddr::Name { host, port } => {
                let found = ctx
                    .config
                    .resolver
                    .resolve(host, *port)
                    .await
                    .map_err(ConnectError::Resolve)?;
                if found.is_empty() {
                    return Err(ConnectError::Resolve(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the name resolves to no address",
                    )));
                }
                ctx.gate.set_peer_ips(peer, found.iter().map(|a| a.ip()));
                found
            }
        };
        let mut last = None;
        for target in targets {
            match TcpStream::connect(target).await {
                Ok(s) => {
                    // Raft messages are latency-sensitive; we batch writes ourselves.
                    let _ = s.set_nodelay(true);
                    let mut s = match &ctx.tls {
                        None => PeerStream::Plain(s),
                        Some(tls) => PeerStream::Tls(Box::new(TlsStream::Client(
                            tls_connect(tls, &ctx.identity.cluster_id, peer, s).await?,
                        ))),
                    };
                    dial(&mut s, &ctx.identity, peer, stream)
                        .await
                        .map_err(HandshakeError::tls_cause)?;
                    return Ok((s, target));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(ConnectError::Io(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no address to dial")
        })))
    };
    match tokio::time::timeout(ctx.config.handshake_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// The dialer's TLS handshake with `peer`, whose certificate must name it.
async fn tls_connect(
    tls: &TlsContext,
    cluster_id: &str,
    peer: NodeId,
    s: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HandshakeError> {
    let name = server_name(cluster_id, peer).map_err(HandshakeError::Tls)?;
    tls.connector.connect(name, s).await.map_err(|e| {
        match rustls_error(&e) {
            // What came back is not TLS: a plain listener's refusal.
            Some(tokio_rustls::rustls::Error::InvalidMessage(_)) => HandshakeError::NotTls,
            Some(t) => HandshakeError::Tls(t.to_string()),
            None if e.kind() == io::ErrorKind::UnexpectedEof => HandshakeError::Tls(
                "the peer closed the connection during the TLS handshake".into(),
            ),
            None => HandshakeError::Tls(e.to_string()),
        }
    })
}
