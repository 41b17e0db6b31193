//! The device endpoint: MQTT 3.1.1 and 5 on every device listener, one task
//! per connection, no broker.
//!
//! Devices only ever talk to their gateway (a device publishes to and
//! subscribes to its own `devices/{id}/…` topics), so there is no routing
//! between clients to do. Each connection is one task that
//! - on the TLS listener, runs the TLS handshake first (under the same
//!   deadline as the CONNECT, so a slow or hostile client holds up nothing
//!   but its own task);
//! - reads the CONNECT (under a deadline), picks the protocol version from
//!   it (3.1.1 and 5 on every port; 3.1 is refused), checks the login (the
//!   secret, or the client certificate of the TLS handshake);
//! - takes the device's place in the [`Registry`] (a session of the same
//!   device already there is closed: a takeover);
//! - from then on its identity is fixed: a second CONNECT is a protocol
//!   violation that closes the connection;
//! - checks every PUBLISH and SUBSCRIBE against the device's own topics;
//! - hands device publishes to the session manager, each with an [`Ack`],
//!   and acknowledges each (PUBACK, or PUBREC for QoS 2) when its answer
//!   comes back: once what it causes is committed (see `ingest`). At most
//!   [`RECEIVE_MAX`] messages of a connection, and [`PIPELINE`] of all
//!   together, are unanswered at a time; without room a connection stops
//!   reading its socket (back-pressure, nothing is dropped). A message that
//!   could not be committed closes the connection unacknowledged (MQTT 5:
//!   0x89), so the device sends it again;
//! - writes what the manager delivers (through the registry) if a filter of
//!   the session matches, at the granted QoS, with at most the client's
//!   Receive Maximum of QoS 1 messages in flight.
//!
//! Every wait is bounded: the CONNECT deadline, 1.5 × the keep-alive, a
//! write deadline, a bounded delivery queue per connection (a device that
//! does not read is disconnected and gets what it missed on reconnect, from
//! the replicated state). The read buffer is freed while a connection is
//! idle. A connection task holds no lock across an await and shares no lock
//! that a panic could poison for others: one connection's failure is its
//! own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use entente_protocol::{DevicePublish, device_namespace, filter_matches, parse_device_publish};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::MqttStats;
use super::auth::{Authenticator, Credential, LogLimiter};
use super::ingest::{Ack, Acked, PIPELINE};
use super::sessions::SessionEvent;
use super::wire::{
    self, AckCode, Advertised, CloseReason, ConnectInfo, Incoming, Outgoing, ReadError, Refusal,
    Version,
};
use crate::shared::now_ms;

/// How long one write to a device may take before the device is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries waiting for a connection's task.
const DELIVERY_QUEUE: usize = 64;
/// QoS 1 messages to one device waiting for room in its window.
const PENDING_MAX: usize = 1_000;
/// Our window of QoS 1 messages in flight to one device (capped further by
/// the client's Receive Maximum).
const INFLIGHT_MAX: u16 = 100;
/// Inbound Receive Maximum advertised to MQTT 5 clients, and the window of
/// every connection (3.1.1 too): at most this many messages from a device
/// are unanswered (waiting for their proposal to commit); at the limit its
/// connection stops reading until one is answered.
const RECEIVE_MAX: u16 = 100;
/// Filters one session may hold.
const MAX_FILTERS: usize = 16;
/// The longest keep-alive an MQTT 5 client gets (seconds): one that asks
/// for none (0) or for more is told this one (Server Keep Alive), and held
/// to 1.5 × it like any other.
const SERVER_KEEP_ALIVE_MAX: u16 = 1_200;
/// A 3.1.1 client that asks for no keep-alive (it cannot be told another)
/// is still disconnected after this long without a packet.
const NO_KEEP_ALIVE_LIMIT: Duration = Duration::from_secs(86_400);

/// A message for one device.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
}

/// Tells a connection's task to end its session (the first reason given
/// is the one sent).
#[derive(Debug, Default)]
struct Closer {
    reason: std::sync::OnceLock<CloseReason>,
    notify: Notify,
}

impl Closer {
    fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.notify.notify_one();
    }

    fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }
}

/// One live session in the registry.
#[derive(Debug)]
struct Handle {
    epoch: u64,
    tx: mpsc::Sender<Arc<Message>>,
    closer: Arc<Closer>,
    /// What the session logged in with.
    credential: Credential,
}

/// The sessions live on this gateway, by device id; and the subscriptions
/// of devices that asked for a session that outlives the connection (3.1.1:
/// clean session 0; MQTT 5: a Session Expiry Interval), so a reconnect is
/// answered "session present" and needs no new SUBSCRIBE.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    live: Mutex<HashMap<String, Handle>>,
    persistent: Mutex<HashMap<String, Kept>>,
}

/// A kept session: its filters, and when it expires now that no connection
/// holds it (`None` while one does, or if it never expires).
#[derive(Debug)]
struct Kept {
    filters: Vec<(String, u8)>,
    expires: Option<Instant>,
}

impl Registry {
    /// Hands `msg` to `device`'s session here. False if it has none; a
    /// session whose queue is full is closed (it gets what it missed when
    /// it reconnects).
    pub(crate) fn deliver(&self, device: &str, msg: Message) -> bool {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(h) = live.get(device) else {
            return false;
        };
        match h.tx.try_send(Arc::new(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                h.closer.close(CloseReason::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Ends `device`'s session here, unless it logged in with `keep_hash`
    /// (a session started with the new secret after a rotation stays, and
    /// so does one that logged in with the device's certificate). With no
    /// `keep_hash` (deleted) it ends whatever it logged in with, and the
    /// device's persistent subscriptions are forgotten too.
    pub(crate) fn revoke(&self, device: &str, keep_hash: Option<&str>) {
        if let Some(h) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
        {
            let keep = match &h.credential {
                Credential::Secret(hash) => keep_hash == Some(hash.as_str()),
                Credential::Certificate(_) => keep_hash.is_some(),
            };
            if !keep {
                h.closer.close(CloseReason::Revoked);
            }
        }
        if keep_hash.is_none() {
            self.persistent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(device);
        }
    }

    /// `device` started a session on another gateway with `epoch`: its
    /// session here, if older, is taken over (MQTT 5: 0x8E), as a second
    /// login here would. One that started here since (a higher epoch) stays.
    pub(crate) fn taken_over_elsewhere(&self, device: &str, epoch: u64) {
        if let Some(h) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            && h.epoch < epoch
        {
            h.closer.close(CloseReason::TakenOver);
        }
    }

    /// Ends `device`'s session here if it logged in with a client
    /// certificate other than `registered` (the device's fingerprint was
    /// changed or removed). A session that logged in with the secret stays.
    pub(crate) fn revoke_certificate(&self, device: &str, registered: Option<&str>) {
        if let Some(h) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            && let Credential::Certificate(fingerprint) = &h.credential
            && registered != Some(fingerprint.as_str())
        {
            h.closer.close(CloseReason::Revoked);
        }
    }

    /// Closes every session, telling MQTT 5 devices why.
    fn close_all(&self, reason: CloseReason) {
        for h in self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            h.closer.close(reason);
        }
    }

    /// Takes `device`'s place, closing the session there before.
    fn register(&self, device: &str, handle: Handle) {
        let old = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device.to_string(), handle);
        if let Some(old) = old {
            old.closer.close(CloseReason::TakenOver);
        }
    }

    /// Leaves, if the place is still this session's. A session this one
    /// kept (`kept` is `Some`) then expires after the interval it holds
    /// (`None`: never; zero: now); one a newer connection took over is left
    /// to that one.
    fn unregister(&self, device: &str, epoch: u64, kept: Option<Option<Duration>>) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.get(device).is_none_or(|h| h.epoch != epoch) {
            return;
        }
        live.remove(device);
        let Some(expiry) = kept else { return };
        let mut p = self
            .persistent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match expiry {
            Some(d) if d.is_zero() => {
                p.remove(device);
            }
            Some(d) => {
                if let Some(k) = p.get_mut(device) {
                    k.expires = Instant::now().checked_add(d);
                }
            }
            None => {}
        }
    }

    /// The filters of `device`'s kept session, if it has one that has not
    /// expired (it is this connection's from now on), unless the client
    /// asked to start afresh (`discard`).
    fn resume(&self, device: &str, discard: bool) -> Option<Vec<(String, u8)>> {
        let mut p = self
            .persistent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if discard {
            p.remove(device);
            return None;
        }
        let now = Instant::now();
        match p.get_mut(device) {
            Some(k) if k.expires.is_none_or(|t| t > now) => {
                k.expires = None;
                Some(k.filters.clone())
            }
            Some(_) => {
                p.remove(device);
                None
            }
            None => None,
        }
    }

    fn keep(&self, device: &str, filters: &[(String, u8)]) {
        self.persistent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                device.to_string(),
                Kept {
                    filters: filters.to_vec(),
                    expires: None,
                },
            );
    }
}

/// What every connection of the endpoint shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) registry: Registry,
    pub(crate) events: mpsc::Sender<SessionEvent>,
    pub(crate) stats: Arc<MqttStats>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) max_packet: usize,
    /// Permits of device messages read and not yet answered, all
    /// connections together ([`PIPELINE`]).
    pipeline: Arc<Semaphore>,
    /// How long a new connection has for its TLS handshake (TLS listener),
    /// its CONNECT and the login check together.
    pub(crate) connect_timeout: Duration,
    /// Connection slots (all device listeners together).
    pub(crate) slots: Arc<Semaphore>,
    /// How many there are.
    pub(crate) max_connections: usize,
    /// Set when the gateway stops.
    pub(crate) closed: AtomicBool,
    /// Cleared while this gateway is not a member of the group: its
    /// listeners are closed and no session may start.
    pub(crate) serving: AtomicBool,
    pub(crate) stop: Notify,
    epoch: AtomicU64,
    logs: LogLimiter,
}

impl Shared {
    pub(crate) fn new(
        events: mpsc::Sender<SessionEvent>,
        stats: Arc<MqttStats>,
        auth: Arc<Authenticator>,
        max_packet: usize,
        max_connections: usize,
        connect_timeout: Duration,
    ) -> Shared {
        Shared {
            registry: Registry::default(),
            events,
            stats,
            auth,
            max_packet,
            pipeline: Arc::new(Semaphore::new(PIPELINE)),
            connect_timeout,
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            max_connections: max_connections.max(1),
            closed: AtomicBool::new(false),
            serving: AtomicBool::new(true),
            stop: Notify::new(),
            epoch: AtomicU64::new(0),
            logs: LogLimiter::default(),
        }
    }

    /// Stops every connection (each says why to MQTT 5 clients).
    pub(crate) fn shut_down(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
        self.registry.close_all(CloseReason::ShuttingDown);
    }

    /// Waits (at most `limit`) until every connection has ended — after
    /// [`Shared::shut_down`], once each has told its device why.
    pub(crate) async fn connections_ended(&self, limit: std::time::Duration) -> bool {
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        tokio::time::timeout(limit, self.slots.acquire_many(all))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// This gateway left the group: no session may start, and every one
    /// ends (MQTT 5 devices are told to use another server). The listeners
    /// are closed by their owner.
    pub(crate) fn stop_serving(&self) {
        self.serving.store(false, Ordering::SeqCst);
        self.registry.close_all(CloseReason::UseAnotherServer);
    }

    /// Sessions may start again (the gateway is a member again).
    pub(crate) fn resume_serving(&self) {
        self.serving.store(true, Ordering::SeqCst);
    }

    fn refusing(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || !self.serving.load(Ordering::SeqCst)
    }

    /// A session epoch: increasing within this process, and (being
    /// `ms since the Unix epoch × 1000` or more) above the epochs of earlier
    /// boots and, clocks permitting, of sessions that started earlier on
    /// other gateways — so a device that reconnects elsewhere moves there.
    fn next_epoch(&self) -> u64 {
        let floor = now_ms().saturating_mul(1000);
        let prev = self
            .epoch
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| {
                Some(floor.max(e.saturating_add(1)))
            })
            .unwrap_or(floor);
        floor.max(prev.saturating_add(1))
    }
}

/// Whether an accept error means the process is out of descriptors (or
/// memory for sockets): then the loop waits before trying again.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}

/// Accepts device connections until the gateway stops. Never spins: an
/// accept error (out of descriptors, say) waits, doubling up to 1 s; a
/// connection over the limit is closed at once (counted, logged at a
/// bounded rate), so the backlog does not fill with sockets nobody serves.
/// With `tls`, each connection's task runs the TLS handshake first.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    name: &'static str,
    tls: Option<TlsAcceptor>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.notified() => return,
            r = listener.accept() => r,
        };
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                match shared.slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (shared, tls) = (shared.clone(), tls.clone());
                        tokio::spawn(async move {
                            serve(stream, peer, &shared, tls).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        shared
                            .stats
                            .connections_refused
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(more) = shared.logs.allow("over-limit") {
                            tracing::warn!(
                                listener = name,
                                %peer,
                                suppressed = more,
                                "MQTT connection limit reached; connection closed"
                            );
                        }
                    }
                }
            }
            Err(e) => {
                shared.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(more) = shared.logs.allow("accept") {
                    tracing::warn!(listener = name, error = %e, suppressed = more, "accepting an MQTT connection");
                }
                let wait = if is_resource_exhaustion(&e) {
                    backoff
                } else {
                    Duration::from_millis(1)
                };
                tokio::select! {
                    _ = shared.stop.notified() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A device connection's byte stream: plain TCP or TLS over TCP.
///
/// Besides reading and writing, a session waits for input without holding
/// a read buffer ([`DeviceIo::ready`]) and then reads what there is
/// without waiting ([`DeviceIo::try_read`]) into a buffer on the stack
/// ([`read_ready`]), so an idle connection keeps no buffer of its own.
pub(crate) trait DeviceIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Resolves once a read may make progress (cancel-safe).
    fn ready(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Reads what is there into `buf` without waiting: `WouldBlock` if
    /// nothing is, `Ok(0)` at the end of the stream.
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

impl DeviceIo for TcpStream {
    async fn ready(&mut self) -> io::Result<()> {
        self.readable().await
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = TcpStream::try_read(self, buf)?;
        quick_ack(self);
        Ok(n)
    }
}

/// Acknowledges at once what was just read (`TCP_QUICKACK`, which the
/// kernel clears again by itself). Without it the kernel delays the ACK of
/// a segment the gateway does not answer at once (an `accepted` or a
/// reported patch waits for its commit before its PUBACK) by up to 40 ms,
/// and a device whose TCP stack holds back small writes until the last one
/// is acknowledged (Nagle's algorithm, on by default on most stacks and in
/// most MQTT clients) sends its next message — the command's result —
/// that much later.
fn quick_ack(tcp: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tcp;
}

impl DeviceIo for TlsStream<TcpStream> {
    async fn ready(&mut self) -> io::Result<()> {
        let (tcp, tls) = self.get_mut();
        // Records already read may hold plaintext the socket will not
        // signal again; an error or the peer's close_notify is for the
        // read to report.
        let waiting = tls.process_new_packets().map_or(true, |s| {
            s.plaintext_bytes_to_read() > 0 || s.peer_has_closed()
        });
        if waiting {
            return Ok(());
        }
        tcp.readable().await
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::task::{Context, Poll, Waker};
        use tokio::io::AsyncReadExt;
        // One poll of a read: whatever rustls can decrypt from the bytes
        // the socket has. If it needs more, the socket's readiness was
        // cleared on the way, so the next `ready` waits for it.
        let r = {
            let mut read = std::pin::pin!(self.read(buf));
            match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(r) => r,
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            }
        };
        if matches!(r, Ok(n) if n > 0) {
            quick_ack(self.get_ref().0);
        }
        r
    }
}

/// One connection, start to end: the TLS handshake if the listener has
/// `tls`, then the device's session. Handshake, CONNECT and login share
/// one deadline.
///
/// A connection's task lives as long as its device is connected, and its
/// future is as large as its largest state: the TLS states (rustls's
/// connection and the handshake) are boxed so that a plain connection does
/// not carry them.
async fn serve(stream: TcpStream, peer: SocketAddr, shared: &Shared, tls: Option<TlsAcceptor>) {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + shared.connect_timeout;
    match tls {
        None => serve_device(stream, peer, None, deadline, shared).await,
        Some(acceptor) => Box::pin(serve_tls(stream, peer, acceptor, deadline, shared)).await,
    }
}

/// The TLS handshake (under the connect deadline), then the device.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    deadline: Instant,
    shared: &Shared,
) {
    // (The handshake's result is not matched across the session's await:
    // the future would keep a second place for the TLS stream.)
    let Some((stream, cert)) = tls_handshake(stream, peer, acceptor, deadline, shared).await else {
        return;
    };
    serve_device(stream, peer, cert, deadline, shared).await;
}

/// The TLS handshake under the connect deadline: the stream and the
/// SHA-256 of the client certificate it presented, or `None` (counted and
/// logged) if it failed.
async fn tls_handshake(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    deadline: Instant,
    shared: &Shared,
) -> Option<(TlsStream<TcpStream>, Option<String>)> {
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            let cert = super::tls::client_fingerprint(stream.get_ref().1);
            Some((stream, cert))
        }
        Ok(Err(e)) => {
            shared.handshake_failed(&peer, Some(&e));
            None
        }
        Err(_) => {
            shared.handshake_failed(&peer, None);
            None
        }
    }
}

/// A device connection after its TLS handshake (if any): CONNECT, login,
/// session. `cert`: the SHA-256 of the client certificate it presented.
async fn serve_device<S: DeviceIo>(
    mut stream: S,
    peer: SocketAddr,
    cert: Option<String>,
    deadline: Instant,
    shared: &Shared,
) {
    let Ok(Some((version, connect, buf))) =
        tokio::time::timeout_at(deadline, Box::pin(read_connect(&mut stream, peer, shared))).await
    else {
        return;
    };
    let adv = Advertised {
        receive_max: RECEIVE_MAX,
        max_packet: u32::try_from(shared.max_packet).unwrap_or(u32::MAX),
    };
    let refuse = |refusal| {
        let mut out = BytesMut::new();
        wire::write(
            version,
            Outgoing::ConnAck {
                refusal: Some(refusal),
                session_present: false,
                server_keep_alive: None,
            },
            adv,
            &mut out,
        );
        out
    };
    if connect.has_will {
        shared.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(more) = shared.logs.allow("will") {
            tracing::warn!(device = %truncated(&connect.client_id), %peer, suppressed = more, "MQTT login refused: a last will is not allowed");
        }
        let _ = write_all(&mut stream, &refuse(Refusal::NotAuthorized)).await;
        return;
    }
    // The CONNECT and the login are boxed, like every state the task is in
    // only for a moment: the task's future, kept for as long as the device
    // is connected, is as large as its largest state.
    let login = tokio::time::timeout_at(
        deadline,
        Box::pin(shared.auth.check(
            &connect.client_id,
            &connect.username,
            &connect.password,
            cert.as_deref(),
            peer.ip(),
        )),
    )
    .await
    .unwrap_or(Err(Refusal::Unavailable));
    let credential = match login {
        Ok(h) => h,
        Err(refusal) => {
            let _ = write_all(&mut stream, &refuse(refusal)).await;
            return;
        }
    };
    if shared.refusing() {
        let _ = write_all(&mut stream, &refuse(Refusal::Unavailable)).await;
        return;
    }
    let device = connect.client_id.clone();
    let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
    let closer = Arc::new(Closer::default());
    let epoch = shared.next_epoch();
    shared.registry.register(
        &device,
        Handle {
            epoch,
            tx,
            closer: closer.clone(),
            credential,
        },
    );
    // Stopped serving between the check above and the registration: the
    // sweep of the registry may have missed this session.
    if !shared.serving.load(Ordering::SeqCst) {
        closer.close(CloseReason::UseAnotherServer);
    }
    // Whether the session outlives the connection, and for how long after
    // it: 3.1.1's clean session 0 keeps it for good; MQTT 5 keeps it for its
    // Session Expiry Interval (0, the default: it ends with the connection,
    // but is still found by a takeover meanwhile; u32::MAX: never expires).
    let (persist, expiry) = match version {
        Version::V4 => (!connect.clean, None),
        Version::V5 => (
            !connect.clean || connect.session_expiry > 0,
            (connect.session_expiry != u32::MAX)
                .then(|| Duration::from_secs(u64::from(connect.session_expiry))),
        ),
    };
    let restored = shared.registry.resume(&device, connect.clean);
    // MQTT 5 clients asking for no keep-alive, or a longer one than the
    // endpoint allows, are told the endpoint's (Server Keep Alive).
    let (keep_alive, server_keep_alive) = match version {
        Version::V5 if connect.keep_alive == 0 || connect.keep_alive > SERVER_KEEP_ALIVE_MAX => {
            (SERVER_KEEP_ALIVE_MAX, Some(SERVER_KEEP_ALIVE_MAX))
        }
        _ => (connect.keep_alive, None),
    };
    // Room for the answer of every message the window lets out.
    let (acks_tx, acks_rx) = mpsc::channel(usize::from(RECEIVE_MAX));
    let mut conn = Conn {
        version,
        adv,
        device,
        epoch,
        persist,
        expiry,
        max_out: connect
            .max_packet
            .map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
        too_large: 0,
        window: INFLIGHT_MAX.min(connect.receive_max),
        filters: restored.clone().unwrap_or_default(),
        inflight: HashSet::new(),
        pending: VecDeque::new(),
        awaiting_rel: HashSet::new(),
        unanswered: HashMap::new(),
        unanswered_qos0: 0,
        acks: acks_tx,
        held: None,
        next_pkid: 0,
        out: BytesMut::new(),
    };
    // Everything the session needs from the CONNECT is in `conn` now; its
    // strings are not kept for as long as the device stays connected.
    drop(connect);
    conn.push(Outgoing::ConnAck {
        refusal: None,
        session_present: restored.is_some(),
        server_keep_alive,
    });
    let mut told = false;
    let end = if write_all(&mut stream, &conn.take_out()).await.is_ok() {
        let _ = shared
            .events
            .send(SessionEvent::Up {
                device: conn.device.clone(),
                epoch,
            })
            .await;
        if let Some(filters) = restored.filter(|f| !f.is_empty()) {
            let _ = shared
                .events
                .send(SessionEvent::Subscribed {
                    device: conn.device.clone(),
                    epoch,
                    filters: filters.into_iter().map(|(f, _)| f).collect(),
                })
                .await;
        }
        let keep_alive = Duration::from_millis(u64::from(keep_alive) * 1500);
        let channels = (rx, acks_rx);
        let end = session(
            &mut stream,
            &mut conn,
            buf,
            channels,
            &closer,
            keep_alive,
            shared,
        )
        .await;
        if let Some(reason) = end {
            conn.push(Outgoing::Disconnect(reason));
            let out = conn.take_out();
            told = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(&out).await?;
                stream.flush().await
            })
            .await
            .is_ok_and(|r: io::Result<()>| r.is_ok());
        }
        end
    } else {
        None
    };
    shared
        .registry
        .unregister(&conn.device, epoch, conn.persist.then_some(conn.expiry));
    tracing::debug!(device = conn.device, epoch, reason = ?end, "MQTT connection ended");
    let _ = shared
        .events
        .send(SessionEvent::Down {
            device: conn.device,
            epoch,
        })
        .await;
    // The session is over for everyone; the client may still be reading
    // why.
    if told {
        linger_close(&mut stream).await;
    }
}

/// At most 64 characters of something a client sent, for a log line.
fn truncated(s: &str) -> String {
    if s.len() <= 64 {
        return s.to_string();
    }
    let mut end = 64;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Closes a connection the endpoint ends after telling the client why (a
/// DISCONNECT with its reason): sends FIN, then reads and drops what the
/// client still sends until it closes too — for at most a second and 64
/// KiB. Closing with unread bytes in the socket would send a reset, and a
/// reset makes the client's system drop the DISCONNECT it has not read
/// yet: the client would see a lost connection instead of the reason.
async fn linger_close<S: DeviceIo>(stream: &mut S) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        // On the heap, and only now: a buffer in the future itself would be
        // carried by every connection's task for as long as it lives.
        let mut buf = vec![0u8; 4096];
        let mut left = 64 << 10;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Writes and flushes (TLS holds records until flushed), within
/// [`WRITE_TIMEOUT`].
async fn write_all<S: DeviceIo>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// Reads until a whole CONNECT is in: its version, contents, and whatever
/// bytes came after it. `None` (logged, counted) if the bytes are not a
/// CONNECT or the connection closed.
async fn read_connect<S: DeviceIo>(
    stream: &mut S,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<(Version, Box<ConnectInfo>, BytesMut)> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match read_some(stream, &mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let level = match wire::connect_level(&buf) {
            Ok(l) => l,
            Err(ReadError::Incomplete) => continue,
            Err(e) => {
                shared.malformed(&peer, &e, "not an MQTT connection; closed");
                return None;
            }
        };
        let version = match level {
            4 => Version::V4,
            5 => Version::V5,
            _ => {
                // MQTT 3.1 and unknown levels: refused as 3.1.1 would be.
                let mut out = BytesMut::new();
                let _ = rumqttc::mqttbytes::v4::ConnAck::new(
                    rumqttc::mqttbytes::v4::ConnectReturnCode::RefusedProtocolVersion,
                    false,
                )
                .write(&mut out);
                let _ = write_all(stream, &out).await;
                return None;
            }
        };
        match wire::read(version, &mut buf, shared.max_packet) {
            Ok(Incoming::Connect(c)) => return Some((version, c, buf)),
            Ok(_) => return None,
            Err(ReadError::Incomplete) => continue,
            Err(e) => {
                shared.malformed(&peer, &e, "malformed MQTT CONNECT; closed");
                return None;
            }
        }
    }
}

/// Waits for the socket, then reads what it has onto the end of `buf`
/// (see [`read_ready`]).
async fn read_some<S: DeviceIo>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.ready().await?;
        match read_ready(stream, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Bytes one read takes from a device's socket at most.
const READ_CHUNK: usize = 4096;

/// Reads what the socket has (at most [`READ_CHUNK`]) without waiting,
/// onto the end of `buf`, through a buffer on the stack: `buf` grows by
/// the bytes read and no more. A read buffer on the heap would be
/// allocated whole for every read, and while it lives every device's
/// 2-byte PINGREQ, its SUBSCRIBE and its CONNECT would hold a few
/// kilobytes; those holes between long-lived session state stay in the
/// process's memory. (Not `async`: the stack buffer is never part of the
/// connection's future.)
fn read_ready<S: DeviceIo>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = stream.try_read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// One connection's session state.
struct Conn {
    version: Version,
    adv: Advertised,
    device: String,
    epoch: u64,
    /// The session outlives the connection: its filters are kept in the
    /// registry…
    persist: bool,
    /// …for this long after it (`None`: for good).
    expiry: Option<Duration>,
    /// The largest packet the device takes (MQTT 5's Maximum Packet Size).
    max_out: Option<usize>,
    /// Messages discarded since last counted, too large for the device.
    too_large: u64,
    /// QoS 1 messages we may have in flight to the device.
    window: u16,
    /// Subscribed filters and their granted QoS.
    filters: Vec<(String, u8)>,
    /// Packet ids of QoS 1 messages sent and not yet acknowledged.
    inflight: HashSet<u16>,
    /// QoS 1 messages waiting for room in the window.
    pending: VecDeque<Arc<Message>>,
    /// QoS 2 packet ids committed and answered (PUBREC), waiting for their
    /// PUBREL.
    awaiting_rel: HashSet<u16>,
    /// QoS 1 and 2 messages handed over and not yet answered: packet id →
    /// QoS.
    unanswered: HashMap<u16, u8>,
    /// QoS 0 messages handed over and not yet through (they take room in
    /// the window too).
    unanswered_qos0: usize,
    /// Where the answers to this connection's messages come back.
    acks: mpsc::Sender<Acked>,
    /// A message read while the pipeline was full: it goes first once a
    /// permit is free, and nothing more is read until then.
    held: Option<Held>,
    next_pkid: u16,
    out: BytesMut,
}

/// A device publish waiting for a permit of the pipeline.
struct Held {
    kind: DevicePublish,
    payload: Bytes,
    qos: u8,
    pkid: u16,
}

impl Conn {
    fn push(&mut self, p: Outgoing<'_>) {
        wire::write(self.version, p, self.adv, &mut self.out);
    }

    /// Whether the connection reads from its device: its window has room
    /// and no message waits for the pipeline.
    fn reading(&self) -> bool {
        self.held.is_none()
            && self.unanswered.len() + self.unanswered_qos0 < usize::from(RECEIVE_MAX)
    }

    /// Hands a device publish to the session manager with its claim on an
    /// answer.
    async fn hand_over(
        &mut self,
        p: Held,
        permit: OwnedSemaphorePermit,
        shared: &Shared,
    ) -> Result<(), Option<CloseReason>> {
        let packet = (p.qos > 0).then_some((p.pkid, p.qos));
        match packet {
            Some((pkid, qos)) => {
                self.unanswered.insert(pkid, qos);
            }
            None => self.unanswered_qos0 += 1,
        }
        if !self.reading() {
            shared.stats.reads_paused.fetch_add(1, Ordering::Relaxed);
        }
        let ack = Ack::new(packet, self.acks.clone(), shared.stats.clone(), permit);
        let ev = SessionEvent::Publish {
            device: self.device.clone(),
            epoch: self.epoch,
            kind: p.kind,
            payload: p.payload,
            ack,
        };
        if shared.events.send(ev).await.is_err() {
            return Err(Some(CloseReason::ShuttingDown));
        }
        Ok(())
    }

    /// The answer to one of the device's messages: its acknowledgement, or
    /// `Err` when it was not committed (the connection is closed without
    /// acknowledging it, so the device sends it again).
    fn answered(&mut self, a: Acked, stats: &MqttStats) -> Result<(), CloseReason> {
        let Some((pkid, qos)) = a.packet else {
            // QoS 0: nothing to acknowledge, and nothing to send again.
            self.unanswered_qos0 = self.unanswered_qos0.saturating_sub(1);
            return Ok(());
        };
        self.unanswered.remove(&pkid);
        let Some(code) = a.code else {
            stats.not_committed.fetch_add(1, Ordering::Relaxed);
            return Err(CloseReason::NotCommitted);
        };
        if qos == 1 {
            self.push(Outgoing::PubAck(pkid, code));
        } else {
            if code == AckCode::Success {
                self.awaiting_rel.insert(pkid);
            }
            self.push(Outgoing::PubRec(pkid, code));
        }
        Ok(())
    }

    fn take_out(&mut self) -> BytesMut {
        std::mem::take(&mut self.out)
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Queues `msg` for writing if a filter matches; `Err` when the device
    /// has too much waiting.
    fn deliver(&mut self, msg: Arc<Message>) -> Result<(), CloseReason> {
        let Some(qos) = self
            .filters
            .iter()
            .filter(|(f, _)| filter_matches(f, &msg.topic))
            .map(|(_, q)| *q)
            .max()
        else {
            return Ok(());
        };
        if qos == 0 {
            self.push_publish(&msg, 0, 0);
            return Ok(());
        }
        if self.inflight.len() < usize::from(self.window) {
            self.send_qos1(&msg);
            Ok(())
        } else if self.pending.len() < PENDING_MAX {
            self.pending.push_back(msg);
            Ok(())
        } else {
            Err(CloseReason::SlowConsumer)
        }
    }

    fn send_qos1(&mut self, msg: &Message) {
        let pkid = self.alloc_pkid();
        if self.push_publish(msg, 1, pkid) {
            self.inflight.insert(pkid);
        }
    }

    /// Writes a PUBLISH, unless it is larger than the device takes (its
    /// MQTT 5 Maximum Packet Size): then it is discarded as if it had been
    /// delivered [MQTT-3.1.2-25] and counted; false.
    fn push_publish(&mut self, msg: &Message, qos: u8, pkid: u16) -> bool {
        let start = self.out.len();
        self.push(Outgoing::Publish {
            topic: &msg.topic,
            payload: &msg.payload,
            qos,
            pkid,
        });
        if self.max_out.is_some_and(|max| self.out.len() - start > max) {
            self.out.truncate(start);
            self.too_large += 1;
            return false;
        }
        true
    }
}

/// The session after CONNACK, until it ends: `Some(reason)` when the
/// endpoint ends it (sent to MQTT 5 clients), `None` when the device or
/// the network did.
async fn session<S: DeviceIo>(
    stream: &mut S,
    conn: &mut Conn,
    mut buf: BytesMut,
    (mut rx, mut acks): (mpsc::Receiver<Arc<Message>>, mpsc::Receiver<Acked>),
    closer: &Closer,
    keep_alive: Duration,
    shared: &Shared,
) -> Option<CloseReason> {
    let idle_limit = if keep_alive.is_zero() {
        // No keep-alive asked (3.1.1): still bounded.
        NO_KEEP_ALIVE_LIMIT
    } else {
        keep_alive
    };
    let mut idle = Box::pin(tokio::time::sleep(idle_limit));
    // Bytes that came with the CONNECT.
    let mut first = !buf.is_empty();
    loop {
        if !first {
            if let Some(r) = closer.reason() {
                return Some(r);
            }
            // A connection waiting for its device holds no read buffer,
            // unless a packet is partly read.
            if buf.is_empty() && buf.capacity() > 0 {
                buf = BytesMut::new();
            }
            // Not reading, the device cannot be heard: its keep-alive only
            // counts while the connection reads.
            let reading = conn.reading();
            tokio::select! {
                biased;
                _ = closer.notify.notified() => {
                    if let Some(r) = closer.reason() {
                        return Some(r);
                    }
                    continue;
                }
                Some(a) = acks.recv() => {
                    if let Err(r) = conn.answered(a, &shared.stats) {
                        return Some(r);
                    }
                    while let Ok(a) = acks.try_recv() {
                        if let Err(r) = conn.answered(a, &shared.stats) {
                            return Some(r);
                        }
                    }
                    idle.as_mut().reset(Instant::now() + idle_limit);
                }
                permit = shared.pipeline.clone().acquire_owned(), if conn.held.is_some() => {
                    let (Ok(permit), Some(held)) = (permit, conn.held.take()) else {
                        return Some(CloseReason::ShuttingDown);
                    };
                    // Boxed, as packet handling below.
                    if let Err(end) = Box::pin(conn.hand_over(held, permit, shared)).await {
                        return end;
                    }
                    idle.as_mut().reset(Instant::now() + idle_limit);
                }
                _ = &mut idle, if reading => return Some(CloseReason::KeepAliveTimeout),
                msg = rx.recv() => {
                    let msg = msg?;
                    if let Err(r) = conn.deliver(msg) {
                        return Some(r);
                    }
                    // Take whatever else is ready, then write once.
                    while let Ok(msg) = rx.try_recv() {
                        if let Err(r) = conn.deliver(msg) {
                            return Some(r);
                        }
                    }
                }
                r = stream.ready(), if reading => {
                    if r.is_err() {
                        return None;
                    }
                    match read_ready(stream, &mut buf) {
                        Ok(0) => return None,
                        Ok(_) => {
                            idle.as_mut().reset(Instant::now() + idle_limit);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(_) => return None,
                    }
                }
            }
        }
        first = false;
        // Every whole packet in the buffer, while the window has room.
        while conn.reading() {
            match wire::read(conn.version, &mut buf, shared.max_packet) {
                Ok(p) => {
                    // Boxed: the connection's future (kept for as long as
                    // the device is connected) need not hold the largest
                    // state of a packet's handling.
                    if let Err(end) = Box::pin(on_packet(conn, p, shared)).await {
                        return end;
                    }
                }
                Err(ReadError::Incomplete) => break,
                Err(ReadError::TooLarge(n)) => {
                    let what = format!(
                        "oversize MQTT packet ({n} bytes, limit {}), disconnecting",
                        shared.max_packet
                    );
                    shared.malformed(&conn.device, &n, &what);
                    return Some(CloseReason::TooLarge);
                }
                Err(ReadError::Malformed(e)) => {
                    shared.malformed(&conn.device, &e, "malformed MQTT packet, disconnecting");
                    return Some(CloseReason::Malformed);
                }
            }
        }
        if conn.too_large > 0 {
            let n = std::mem::take(&mut conn.too_large);
            shared
                .stats
                .messages_too_large
                .fetch_add(n, Ordering::Relaxed);
            if let Some(more) = shared.logs.allow("too-large") {
                tracing::warn!(
                    device = conn.device,
                    max_packet = conn.max_out,
                    discarded = n,
                    suppressed = more,
                    "a message larger than the device's Maximum Packet Size was not sent"
                );
            }
        }
        if !conn.out.is_empty() {
            let out = conn.take_out();
            if write_all(stream, &out).await.is_err() {
                return None;
            }
        }
    }
}

impl Shared {
    /// Counts a malformed or oversize packet from `who` (an address or a
    /// device id) and logs it at a bounded rate.
    fn malformed(&self, who: &dyn std::fmt::Display, error: &dyn std::fmt::Debug, what: &str) {
        self.stats.malformed_packets.fetch_add(1, Ordering::Relaxed);
        if let Some(more) = self.logs.allow("malformed") {
            tracing::warn!(%who, ?error, suppressed = more, "{what}");
        }
    }

    /// Counts a TLS handshake that failed (`None`: did not finish within
    /// the connect deadline) and logs it at a bounded rate. A client that
    /// closed its connection before finishing (a TCP probe, say) is no
    /// failure.
    fn handshake_failed(&self, peer: &SocketAddr, error: Option<&io::Error>) {
        use io::ErrorKind as K;
        let reason = match error {
            Some(e) => e.to_string(),
            None => format!(
                "no TLS handshake within {:?} of connecting",
                self.connect_timeout
            ),
        };
        if error.is_some_and(|e| {
            matches!(
                e.kind(),
                K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
            )
        }) {
            tracing::debug!(%peer, error = reason, "MQTT TLS client left during the handshake");
            return;
        }
        self.stats
            .tls_handshake_failures
            .fetch_add(1, Ordering::Relaxed);
        if let Some(more) = self.logs.allow("tls-handshake") {
            tracing::warn!(%peer, error = reason, suppressed = more, "MQTT TLS handshake failed; connection closed");
        }
    }

    fn violation(&self, conn: &Conn, what: &str) -> CloseReason {
        self.stats.acl_violations.fetch_add(1, Ordering::Relaxed);
        if let Some(more) = self.logs.allow("acl") {
            tracing::warn!(
                device = conn.device,
                suppressed = more,
                "MQTT access violation, disconnecting: {what}"
            );
        }
        CloseReason::NotAuthorized
    }
}

/// Acts on one packet of an established session.
/// `Err(Some(reason))`: the endpoint ends the session; `Err(None)`: the
/// device did.
async fn on_packet(
    conn: &mut Conn,
    p: Incoming,
    shared: &Shared,
) -> Result<(), Option<CloseReason>> {
    match p {
        Incoming::Connect(c) => {
            // A second CONNECT is a protocol violation [MQTT-3.1.0-2]: the
            // connection's identity stays the one that logged in, and the
            // connection is closed. (Its password is never logged.)
            shared
                .stats
                .protocol_violations
                .fetch_add(1, Ordering::Relaxed);
            if c.client_id != conn.device {
                shared.stats.acl_violations.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(more) = shared.logs.allow("second-connect") {
                tracing::warn!(
                    device = conn.device,
                    claimed = %truncated(&c.client_id),
                    suppressed = more,
                    "a second CONNECT on one MQTT connection; disconnecting"
                );
            }
            Err(Some(CloseReason::ProtocolError))
        }
        Incoming::Publish {
            topic,
            payload,
            qos,
            pkid,
        } => {
            shared
                .stats
                .publishes_received
                .fetch_add(1, Ordering::Relaxed);
            let Some(kind) = parse_device_publish(&conn.device, &topic) else {
                let what = format!("publish to {:?}", truncated(&topic));
                return Err(Some(shared.violation(conn, &what)));
            };
            if qos > 0 && conn.unanswered.contains_key(&pkid) {
                // Sent again before its answer: that answer is for both.
                return Ok(());
            }
            if qos == 2 {
                if conn.awaiting_rel.contains(&pkid) {
                    // Committed and answered, the PUBREL still to come.
                    conn.push(Outgoing::PubRec(pkid, AckCode::Success));
                    return Ok(());
                }
                if conn.awaiting_rel.len() >= usize::from(RECEIVE_MAX) {
                    return Err(Some(CloseReason::SlowConsumer));
                }
            }
            let held = Held {
                kind,
                payload,
                qos,
                pkid,
            };
            match shared.pipeline.clone().try_acquire_owned() {
                Ok(permit) => conn.hand_over(held, permit, shared).await,
                Err(_) => {
                    // The pipeline is full: read nothing more until it has
                    // room for this one.
                    shared.stats.reads_paused.fetch_add(1, Ordering::Relaxed);
                    conn.held = Some(held);
                    Ok(())
                }
            }
        }
        Incoming::PubRel(pkid) => {
            conn.awaiting_rel.remove(&pkid);
            conn.push(Outgoing::PubComp(pkid));
            Ok(())
        }
        Incoming::PubAck(pkid) => {
            if conn.inflight.remove(&pkid) {
                while conn.inflight.len() < usize::from(conn.window) {
                    let Some(msg) = conn.pending.pop_front() else {
                        break;
                    };
                    conn.send_qos1(&msg);
                }
            }
            Ok(())
        }
        Incoming::Ignored => Ok(()),
        Incoming::Subscribe { pkid, filters } => {
            let ns = device_namespace(&conn.device);
            if let Some((f, _)) = filters.iter().find(|(f, _)| !f.starts_with(&ns)) {
                let what = format!("subscribe to {:?}", truncated(f));
                return Err(Some(shared.violation(conn, &what)));
            }
            let mut granted = Vec::with_capacity(filters.len());
            let mut added = Vec::new();
            for (f, q) in filters {
                let q = q.min(1);
                if let Some(slot) = conn.filters.iter_mut().find(|(g, _)| *g == f) {
                    slot.1 = q;
                } else if conn.filters.len() >= MAX_FILTERS {
                    granted.push(None);
                    continue;
                } else {
                    conn.filters.push((f.clone(), q));
                }
                granted.push(Some(q));
                added.push(f);
            }
            conn.push(Outgoing::SubAck {
                pkid,
                granted: &granted,
            });
            if conn.persist {
                shared.registry.keep(&conn.device, &conn.filters);
            }
            if !added.is_empty() {
                let ev = SessionEvent::Subscribed {
                    device: conn.device.clone(),
                    epoch: conn.epoch,
                    filters: added,
                };
                if shared.events.send(ev).await.is_err() {
                    return Err(Some(CloseReason::ShuttingDown));
                }
            }
            Ok(())
        }
        Incoming::Unsubscribe { pkid, filters } => {
            let existed: Vec<bool> = filters
                .iter()
                .map(|f| conn.filters.iter().any(|(g, _)| g == f))
                .collect();
            conn.filters.retain(|(f, _)| !filters.contains(f));
            if conn.persist {
                shared.registry.keep(&conn.device, &conn.filters);
            }
            conn.push(Outgoing::UnsubAck {
                pkid,
                existed: &existed,
            });
            Ok(())
        }
        Incoming::PingReq => {
            conn.push(Outgoing::PingResp);
            Ok(())
        }
        // The device said goodbye: nothing to send back. An MQTT 5 device
        // may shorten its session's expiry (to 0: discard it) — but not
        // make a session that ends with the connection outlive it.
        Incoming::Disconnect { session_expiry } => {
            if let Some(secs) = session_expiry
                && conn.expiry.is_none_or(|d| !d.is_zero())
            {
                conn.expiry = (secs != u32::MAX).then(|| Duration::from_secs(u64::from(secs)));
            }
            Err(None)
        }
        Incoming::Unsupported(reason) => {
            shared
                .stats
                .protocol_violations
                .fetch_add(1, Ordering::Relaxed);
            if let Some(more) = shared.logs.allow("unsupported") {
                tracing::warn!(
                    device = conn.device,
                    ?reason,
                    suppressed = more,
                    "an MQTT 5 feature the endpoint does not offer; disconnecting"
                );
            }
            Err(Some(reason))
        }
        Incoming::Unexpected(what) => {
            shared
                .stats
                .protocol_violations
                .fetch_add(1, Ordering::Relaxed);
            if let Some(more) = shared.logs.allow("unexpected") {
                tracing::warn!(
                    device = conn.device,
                    packet = what,
                    suppressed = more,
                    "a server packet from a device; disconnecting"
                );
            }
            Err(Some(CloseReason::ProtocolError))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a device sends is acknowledged at once (`TCP_QUICKACK` after
    /// each read), even on a connection the kernel has put in delayed-ACK
    /// mode: otherwise a device with Nagle's algorithm on holds its next
    /// small message (the result after an `accepted` the gateway answers
    /// only once committed) for up to 40 ms.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn what_a_device_sends_is_acknowledged_at_once() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut device = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut gateway, _) = listener.accept().await.expect("accept");
        // Delayed ACKs, as on a connection that has been talking for a
        // while.
        let sock = socket2::SockRef::from(&gateway);
        sock.set_tcp_quickack(false).expect("quickack off");
        assert!(!sock.tcp_quickack().expect("read quickack"));
        device.write_all(b"\x30\x00").await.expect("write");
        DeviceIo::ready(&mut gateway).await.expect("readable");
        let mut buf = [0u8; 16];
        let n = DeviceIo::try_read(&mut gateway, &mut buf).expect("read");
        assert_eq!(n, 2);
        assert!(
            socket2::SockRef::from(&gateway)
                .tcp_quickack()
                .expect("read quickack"),
            "a read left the connection delaying its ACKs"
        );
    }

    /// The size of the future an async fn taking four arguments returns
    /// (without calling it).
    fn future_size<A, B, C, D, F: Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The same for five arguments.
    fn future_size5<A, B, C, D, E, F: Future>(_: impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's task lives as long as its device is connected, and
    /// its future is as large as its largest state: what is only there for
    /// a moment (the TLS states, the login, a packet's handling, the
    /// closing drain's buffer) is boxed. Unboxed, a plain connection's
    /// task was about 10 KiB.
    #[test]
    fn a_connection_task_is_small() {
        let plain =
            future_size::<TcpStream, SocketAddr, &'static Shared, Option<TlsAcceptor>, _>(serve);
        assert!(plain <= 2048, "a connection's future is {plain} bytes");
        // On the TLS listener the task's future boxes the TLS states: the
        // handshake, the stream (rustls's connection is 1.2 KiB) and a
        // session over it. The handshake's result matched across the
        // session's await kept a second place for the stream (6 KiB).
        let tls = future_size5::<TcpStream, SocketAddr, TlsAcceptor, Instant, &'static Shared, _>(
            serve_tls,
        );
        assert!(
            tls <= 4096,
            "a TLS connection's boxed future is {tls} bytes"
        );
    }
}
