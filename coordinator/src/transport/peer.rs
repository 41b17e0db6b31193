//! One outbound peer: its bounded queue and the writer task that owns the
//! connection to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::addr::PeerAddr;
use super::backoff::Backoff;
use super::error::FrameError;
use super::frame::{Frame, StreamKind, encode_frame};
use super::gate::RepeatLimiter;
use super::shared::{Context, Reporter, connect};
use super::status::StatusWire;
use super::tls::PeerStream;
use crate::raft::NodeId;
use consensus::engine::EngineMessage;

/// Most messages written between two flushes.
const MAX_BATCH: usize = 256;
/// Longest a writer spends flushing at shutdown.
pub(crate) const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// Write buffer per connection.
const WRITE_BUFFER: usize = 64 * 1024;
/// While a peer stays unreachable, a warning at most this often (the
/// attempts in between are logged at debug level).
const FAILURE_WARN_EVERY: Duration = Duration::from_secs(60);

/// What a writer sends: an engine message, or this node's status report.
#[derive(Debug)]
pub(crate) enum Outgoing<M> {
    /// An engine message (`Frame::Message`).
    Message(M),
    /// A status report (`Frame::Status`): best effort, so dropping one is
    /// not reported to the engine as an unreachable peer.
    Status(StatusWire),
}

impl<M: EngineMessage> Outgoing<M> {
    /// A short name for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Outgoing::Message(m) => m.name(),
            Outgoing::Status(_) => "Status",
        }
    }
}

/// The transport's handle on one peer's writer.
#[derive(Debug)]
pub(crate) struct PeerHandle<M> {
    /// The peer's queue.
    pub queue: mpsc::Sender<Outgoing<M>>,
    /// The peer's address; the writer redials when it changes.
    pub addr: watch::Sender<PeerAddr>,
    /// The writer task.
    pub task: JoinHandle<()>,
}

impl<M: EngineMessage> PeerHandle<M> {
    /// Starts the writer for `peer` at `addr` on `runtime`.
    pub(crate) fn spawn(
        runtime: &tokio::runtime::Handle,
        ctx: Arc<Context>,
        reporter: Reporter<M>,
        shutdown: watch::Receiver<bool>,
        peer: NodeId,
        addr: PeerAddr,
        seed: u64,
    ) -> Self {
        let (queue_tx, queue_rx) = mpsc::channel(ctx.config.peer_queue_capacity);
        let (addr_tx, addr_rx) = watch::channel(addr);
        let backoff = Backoff::new(ctx.config.backoff_min, ctx.config.backoff_max, seed);
        let writer = Writer {
            peer,
            ctx,
            reporter,
            queue: queue_rx,
            addr: addr_rx,
            shutdown,
            backoff,
            refusal_log: RepeatLimiter::new(super::REPEAT_LOG_EVERY, 8),
        };
        PeerHandle {
            queue: queue_tx,
            addr: addr_tx,
            task: runtime.spawn(writer.run()),
        }
    }
}

/// How a connected session ended.
enum Exit {
    /// Stop the writer: shutdown, or the peer was removed.
    Stop,
    /// Dial again.
    Reconnect,
}

/// The writer task's state.
struct Writer<M> {
    peer: NodeId,
    ctx: Arc<Context>,
    reporter: Reporter<M>,
    queue: mpsc::Receiver<Outgoing<M>>,
    addr: watch::Receiver<PeerAddr>,
    shutdown: watch::Receiver<bool>,
    backoff: Backoff,
    /// The same refusal (wrong secret, say) is logged once a minute, not
    /// on every redial.
    refusal_log: RepeatLimiter<String>,
}

impl<M: EngineMessage> Writer<M> {
    async fn run(mut self) {
        let peer = self.peer;
        let mut failures: u32 = 0;
        let mut last_warning: Option<Instant> = None;
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            let addr = self.addr.borrow_and_update().clone();
            // Messages queued while we dial are kept and sent once connected.
            let attempt = tokio::select! {
                r = connect(&self.ctx, &addr, peer, StreamKind::Messages) => Some(r),
                _ = self.shutdown.changed() => return,
                r = self.addr.changed() => {
                    if r.is_err() {
                        return;
                    }
                    None
                }
            };
            match attempt {
                // The address changed while dialing: dial the new one now.
                None => continue,
                Some(Ok((stream, reached))) => {
                    if failures > 0 {
                        info!(peer, peer_addr = %addr, %reached, "connected to peer after {failures} failed attempts");
                    } else {
                        debug!(peer, peer_addr = %addr, %reached, "connected to peer");
                    }
                    failures = 0;
                    last_warning = None;
                    self.backoff.reset();
                    self.refusal_log.reset();
                    match self.pump(stream, &addr, reached).await {
                        Exit::Stop => return,
                        Exit::Reconnect => {}
                    }
                }
                Some(Err(e)) => {
                    // A refusal points at a configuration error: always
                    // worth a warning, but the same one once a minute
                    // (`repeated` counts the attempts left out). Other
                    // failures (the peer is down, its name does not resolve
                    // yet) warn at the first failure of an outage, then once
                    // a minute while it lasts, the rest at debug level.
                    let now = Instant::now();
                    let warn_now = if e.is_refusal() {
                        self.refusal_log.allow(e.to_string())
                    } else if failures == 0
                        || last_warning.is_none_or(|t| now.duration_since(t) >= FAILURE_WARN_EVERY)
                    {
                        last_warning = Some(now);
                        Some(0)
                    } else {
                        None
                    };
                    match warn_now {
                        Some(repeated) => {
                            warn!(peer, peer_addr = %addr, reason = %e, repeated, "cannot connect to peer")
                        }
                        None => {
                            debug!(peer, peer_addr = %addr, reason = %e, "cannot connect to peer")
                        }
                    }
                    failures = failures.saturating_add(1);
                }
            }
            // Whatever is queued now would be stale by the time we are back:
            // drop it, and keep dropping while we wait to redial.
            self.drop_queued();
            let delay = self.backoff.next_delay();
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = self.shutdown.changed() => return,
                    r = self.addr.changed() => {
                        if r.is_err() {
                            return;
                        }
                        break;
                    }
                    m = self.queue.recv() => match m {
                        None => return,
                        Some(Outgoing::Message(_)) => self.reporter.unreachable(peer),
                        Some(Outgoing::Status(_)) => {}
                    },
                }
            }
        }
    }

    /// Drops every queued message, reporting the peer unreachable if any
    /// (status reports do not count).
    fn drop_queued(&mut self) {
        let mut dropped = false;
        while let Ok(m) = self.queue.try_recv() {
            dropped |= matches!(m, Outgoing::Message(_));
        }
        if dropped {
            self.reporter.unreachable(self.peer);
        }
    }

    /// Sends queued messages on an established connection until it fails,
    /// the peer closes it, the address changes or the transport stops.
    async fn pump(&mut self, stream: PeerStream, addr: &PeerAddr, reached: SocketAddr) -> Exit {
        let peer = self.peer;
        let io_timeout = self.ctx.config.io_timeout;
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::with_capacity(WRITE_BUFFER, wr);
        let mut probe = [0u8; 1];
        loop {
            tokio::select! {
                _ = self.shutdown.changed() => {
                    let _ = tokio::time::timeout(io_timeout.min(SHUTDOWN_GRACE), async {
                        let _ = wr.flush().await;
                        let _ = wr.shutdown().await;
                    })
                    .await;
                    return Exit::Stop;
                }
                r = self.addr.changed() => {
                    if r.is_err() {
                        return Exit::Stop;
                    }
                    let new = self.addr.borrow_and_update().clone();
                    if new != *addr {
                        info!(peer, old_addr = %addr, new_addr = %new, "peer address changed; redialing");
                        return Exit::Reconnect;
                    }
                }
                // The acceptor never writes on a message stream; this only
                // notices that the connection went away.
                r = rd.read(&mut probe) => {
                    match r {
                        Ok(0) => info!(peer, peer_addr = %addr, %reached, "peer closed the connection"),
                        Ok(_) => warn!(peer, peer_addr = %addr, %reached, "peer wrote on a message stream; reconnecting"),
                        Err(e) => info!(peer, peer_addr = %addr, %reached, error = %e, "connection to peer failed"),
                    }
                    return Exit::Reconnect;
                }
                m = self.queue.recv() => {
                    let Some(first) = m else {
                        return Exit::Stop;
                    };
                    let write = write_batch(&mut wr, first, &mut self.queue, &self.ctx, &self.reporter, peer);
                    let written = tokio::select! {
                        r = tokio::time::timeout(io_timeout, write) => r,
                        // A stalled peer must not hold up shutdown.
                        _ = self.shutdown.changed() => return Exit::Stop,
                    };
                    let err = match written {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => e,
                        Err(_) => FrameError::Timeout,
                    };
                    warn!(peer, peer_addr = %addr, %reached, error = %err, "write to peer failed; reconnecting");
                    self.reporter.unreachable(peer);
                    return Exit::Reconnect;
                }
            }
        }
    }
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes.
async fn write_batch<M: EngineMessage>(
    wr: &mut BufWriter<WriteHalf<PeerStream>>,
    first: Outgoing<M>,
    queue: &mut mpsc::Receiver<Outgoing<M>>,
    ctx: &Context,
    reporter: &Reporter<M>,
    peer: NodeId,
) -> Result<(), FrameError> {
    write_one(wr, first, ctx, reporter, peer).await?;
    for _ in 1..MAX_BATCH {
        match queue.try_recv() {
            Ok(m) => write_one(wr, m, ctx, reporter, peer).await?,
            Err(_) => break,
        }
    }
    wr.flush().await.map_err(FrameError::Io)
}

/// Writes one message frame into the buffer.
async fn write_one<M: EngineMessage>(
    wr: &mut BufWriter<WriteHalf<PeerStream>>,
    out: Outgoing<M>,
    ctx: &Context,
    reporter: &Reporter<M>,
    peer: NodeId,
) -> Result<(), FrameError> {
    let kind = out.name();
    let (frame, is_message) = match out {
        Outgoing::Message(m) => (Frame::Message(m), true),
        Outgoing::Status(s) => (Frame::Status(s), false),
    };
    match encode_frame(&frame, ctx.config.max_frame_size) {
        Ok(bytes) => wr.write_all(&bytes).await.map_err(FrameError::Io),
        Err(e) => {
            // A local problem with this one message: drop it, keep the
            // connection.
            warn!(peer, kind, error = %e, "cannot send message; dropped");
            if is_message {
                reporter.unreachable(peer);
            }
            Ok(())
        }
    }
}
