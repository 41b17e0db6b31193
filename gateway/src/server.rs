//! The REST listener: an accept loop of our own around hyper's HTTP/1
//! connection, so that slow, idle or departed clients cannot hold the
//! gateway's file descriptors (which devices, peers and storage need too).
//!
//! - At most `http_max_connections` connections are open. At the limit a
//!   new connection takes the place of the connection idle longest — one with
//!   no request in flight: still sending its first request head, or between
//!   requests — which is closed. If every connection has a request in flight
//!   (a response body being sent counts), the new one is answered `503` with
//!   `Retry-After` and closed. So a flood of slow or idle connections cannot
//!   keep an operator out: each new connection displaces one of them.
//! - A request head must be complete within `http_header_timeout` of the
//!   connection opening or of its previous response (hyper's header read
//!   timeout, which is the keep-alive idle timeout as well). A request in
//!   flight is not cut by it: an event stream lives as long as it is read.
//! - A connection whose client takes no bytes of a response for
//!   `http_send_timeout` is closed.
//! - hyper buffers at most [`MAX_BUF`] of a connection's output (and input).
//! - Accept errors that mean the process is out of descriptors or memory
//!   back off (5 ms, doubling to 1 s), close the REST connection idle
//!   longest to free a descriptor, and are logged at most every 10 s; errors
//!   of one connection (reset before accepted) are skipped.
//! - On shutdown the listener closes, idle connections close, requests in
//!   flight get `shutdown_grace` to finish.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::api::stopped;

/// Most bytes hyper buffers per connection, each way: a request head may
/// not be larger, and at most this much of a response waits in memory for a
/// client that reads slowly.
pub(crate) const MAX_BUF: usize = 64 * 1024;
/// Connections being answered `503` at once (beyond, they are just closed).
const MAX_REFUSING: usize = 64;
/// How long a `503` answer waits for the client to close first.
const REFUSE_LINGER: Duration = Duration::from_secs(1);
/// Back-off after an accept error for lack of resources: first and longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Accept errors are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Limits of the REST listener (from `Config`).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time to a complete request head (also the idle timeout).
    pub header_timeout: Duration,
    /// Longest time a client may take no bytes of a response.
    pub send_timeout: Duration,
    /// How long requests in flight may run on after shutdown begins.
    pub shutdown_grace: Duration,
    /// HTTPS: the TLS settings (ALPN h2 and http/1.1); `None`: plain HTTP.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// Counters of the REST listener, for `/metrics`.
#[derive(Debug, Default)]
pub struct HttpStats {
    open: AtomicU64,
    accepted: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    accept_errors: AtomicU64,
}

impl HttpStats {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let mut one = |name: &str, kind: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        one(
            "entente_http_connections",
            "gauge",
            "REST connections open.",
            &self.open,
        );
        one(
            "entente_http_connections_accepted_total",
            "counter",
            "REST connections accepted.",
            &self.accepted,
        );
        one(
            "entente_http_connections_evicted_total",
            "counter",
            "Idle REST connections closed to make room for a new one at the connection limit.",
            &self.evicted,
        );
        one(
            "entente_http_connections_refused_total",
            "counter",
            "REST connections answered 503 at the connection limit (every connection busy).",
            &self.refused,
        );
        one(
            "entente_http_connections_timed_out_total",
            "counter",
            "REST connections closed for a late request head or a client not reading.",
            &self.timed_out,
        );
        one(
            "entente_http_accept_errors_total",
            "counter",
            "Failed accepts on the REST listener (out of descriptors, ...).",
            &self.accept_errors,
        );
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// `Slot::state` bit: the connection was chosen to make room and closes.
const EVICTED: u32 = 1 << 31;

/// One open connection, as the registry sees it.
#[derive(Debug)]
struct Slot {
    /// Requests in flight (until their response body is sent), or `EVICTED`.
    state: AtomicU32,
    /// When it last had no request in flight (ms since `epoch`).
    idle_since: AtomicU64,
    epoch: Instant,
    evict: Notify,
}

impl Slot {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since.store(ms, Ordering::Relaxed);
    }
}

/// A request in flight on a connection; the connection is idle again once
/// every `Busy` of it is dropped (with the response body, or with the
/// request if it never got one).
#[derive(Debug)]
struct Busy(Arc<Slot>);

impl Busy {
    /// `None` if the connection is being evicted.
    fn begin(slot: &Arc<Slot>) -> Option<Busy> {
        let mut s = slot.state.load(Ordering::Acquire);
        loop {
            if s & EVICTED != 0 {
                return None;
            }
            match slot
                .state
                .compare_exchange(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(Busy(slot.clone())),
                Err(now) => s = now,
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.state.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open connections.
#[derive(Debug)]
struct Registry {
    epoch: Instant,
    next: AtomicU64,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn insert(&self) -> (u64, Arc<Slot>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            state: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            epoch: self.epoch,
            evict: Notify::new(),
        });
        slot.touch();
        self.lock().insert(id, slot.clone());
        (id, slot)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes the connection idle longest; `false` if every one is busy.
    fn evict_idlest(&self) -> bool {
        let mut slots = self.lock();
        // A candidate may turn busy between the look and the claim: look again
        // (a few times; beyond that the connections are all busy anyway).
        for _ in 0..8 {
            let victim = slots
                .iter()
                .filter(|(_, s)| s.state.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, s)| s.idle_since.load(Ordering::Relaxed))
                .map(|(id, s)| (*id, s.clone()));
            let Some((id, slot)) = victim else {
                return false;
            };
            if slot
                .state
                .compare_exchange(0, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slots.remove(&id);
                slot.evict.notify_one();
                return true;
            }
        }
        false
    }
}

/// Takes the connection's place in the registry while its task runs.
struct Registered {
    registry: Arc<Registry>,
    stats: Arc<HttpStats>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its connection busy until it is sent.
struct Tracked {
    body: Body,
    _busy: Option<Busy>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A socket whose writes fail with `TimedOut` once the peer has taken no
/// bytes for `timeout` (a full send buffer that does not drain).
struct SendTimeout<T> {
    inner: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> SendTimeout<T> {
    fn new(inner: T, timeout: Duration) -> SendTimeout<T> {
        SendTimeout {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// After the socket answered `Pending`: start or check the stall clock.
    fn stall<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no bytes of the response in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<R>(&mut self, r: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stall(cx),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(r, cx)
    }
}

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptFailure {
    /// One connection failed before it was accepted: go on.
    Connection,
    /// The process lacks descriptors or memory: wait, and free a descriptor.
    Resources,
    /// Anything else: wait, so that a persistent error cannot spin.
    Other,
}

fn classify(e: &io::Error) -> AcceptFailure {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux and the BSDs.
    const RESOURCE_ERRNOS: [i32; 5] = [24, 23, 105, 55, 12];
    match e.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionRefused
        | io::ErrorKind::Interrupted
        | io::ErrorKind::WouldBlock => AcceptFailure::Connection,
        io::ErrorKind::OutOfMemory => AcceptFailure::Resources,
        _ if e
            .raw_os_error()
            .is_some_and(|n| RESOURCE_ERRNOS.contains(&n)) =>
        {
            AcceptFailure::Resources
        }
        _ => AcceptFailure::Other,
    }
}

/// Back-off between failed accepts: doubling from [`BACKOFF_FIRST`] to
/// [`BACKOFF_MAX`], reset by a successful accept.
#[derive(Debug, Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    fn failed(&mut self) -> Duration {
        let d = self.next.unwrap_or(BACKOFF_FIRST);
        self.next = Some((d * 2).min(BACKOFF_MAX));
        d
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

/// Logs an accept error at most every [`LOG_EVERY`], with the number left out.
#[derive(Debug, Default)]
struct RateLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLog {
    fn error(&mut self, e: &io::Error, delay: Duration) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        tracing::error!(
            error = %e,
            retry_in_ms = delay.as_millis() as u64,
            similar_errors_not_logged = self.suppressed,
            "the REST listener cannot accept connections"
        );
        self.suppressed = 0;
    }
}

/// The HTTPS settings: the certificate chain and key from PEM files, ALPN
/// `h2` then `http/1.1`. Errors name the file.
pub(crate) fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "REST TLS: cannot read certificates from {}: {e}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "REST TLS: {} holds no CERTIFICATE section",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "REST TLS: cannot read a private key from {}: {e}",
            key.display()
        )
    })?;
    // ring, as the device listener's TLS (see mqtt/tls.rs).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("REST TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "REST TLS: the certificate {} and the key {} do not make a server identity: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` on `listener` until `shutdown`, then lets the open
/// connections finish (bounded by `limits.shutdown_grace`).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<HttpStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let registry = Arc::new(Registry::new());
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut tasks = JoinSet::new();
    let mut backoff = Backoff::default();
    let mut log = RateLog::default();
    loop {
        while tasks.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = stopped(&mut shutdown) => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff.reset();
                a
            }
            Err(e) => {
                inc(&stats.accept_errors);
                let failure = classify(&e);
                if failure == AcceptFailure::Connection {
                    continue;
                }
                let delay = backoff.failed();
                log.error(&e, delay);
                if failure == AcceptFailure::Resources && registry.evict_idlest() {
                    inc(&stats.evicted);
                }
                tokio::select! {
                    () = stopped(&mut shutdown) => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        inc(&stats.accepted);
        let _ = stream.set_nodelay(true);
        if registry.len() >= limits.max_connections {
            if registry.evict_idlest() {
                inc(&stats.evicted);
            } else {
                inc(&stats.refused);
                tracing::debug!(%peer, "REST connection limit reached and no connection idle; answering 503");
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    tasks.spawn(refuse(stream, limits.max_connections, permit));
                }
                continue;
            }
        }
        let (id, slot) = registry.insert();
        stats.open.fetch_add(1, Ordering::Relaxed);
        let registered = Registered {
            registry: registry.clone(),
            stats: stats.clone(),
            id,
        };
        tasks.spawn(connection(
            stream,
            router.clone(),
            slot,
            registered,
            limits.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

/// Serves one connection until it ends, is evicted, or shutdown's grace is over.
async fn connection(
    stream: TcpStream,
    router: Router,
    slot: Arc<Slot>,
    registered: Registered,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let peer = stream.peer_addr().ok();
    let Some(tls) = limits.tls.clone().map(tokio_rustls::TlsAcceptor::from) else {
        let io = TokioIo::new(SendTimeout::new(stream, limits.send_timeout));
        let service = service(router, slot.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_BUF);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        let ended = tokio::select! {
            r = conn.as_mut() => Ended::Done(r.map_err(Into::into)),
            () = slot.evict.notified() => Ended::Evicted,
            () = stopped(&mut shutdown) => Ended::Stopping,
        };
        let result = match ended {
            Ended::Stopping => {
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(limits.shutdown_grace, conn.as_mut())
                    .await
                    .ok()
                    .map(|r| r.map_err(Into::into))
            }
            other => other.result(),
        };
        return finish(peer, result, registered);
    };
    // The TLS handshake is bounded like a request head, and the connection
    // is idle (so evictable) meanwhile: a client that connects and says
    // nothing, or trickles its handshake, holds its slot no longer.
    let handshake = tokio::select! {
        r = tokio::time::timeout(limits.header_timeout, tls.accept(stream)) => r,
        () = slot.evict.notified() => return finish(peer, None, registered),
        () = stopped(&mut shutdown) => return finish(peer, None, registered),
    };
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "REST TLS handshake failed");
            return finish(peer, None, registered);
        }
        Err(_) => {
            inc(&registered.stats.timed_out);
            tracing::debug!(?peer, "REST TLS handshake timed out");
            return finish(peer, None, registered);
        }
    };
    let io = TokioIo::new(SendTimeout::new(stream, limits.send_timeout));
    let service = service(router, slot.clone());
    // HTTP/1.1 or HTTP/2, as ALPN chose (the preface tells them apart).
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(MAX_BUF as u32)
        .max_send_buf_size(MAX_BUF)
        // A peer that stops answering pings is gone: close its connection.
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Ended::Done(r),
        () = slot.evict.notified() => Ended::Evicted,
        () = stopped(&mut shutdown) => Ended::Stopping,
    };
    let result = match ended {
        Ended::Stopping => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(limits.shutdown_grace, conn.as_mut())
                .await
                .ok()
        }
        other => other.result(),
    };
    finish(peer, result, registered)
}

/// Most concurrent requests (streams) on one HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 64;

type ConnError = Box<dyn std::error::Error + Send + Sync>;

/// How serving a connection ended.
enum Ended {
    Done(Result<(), ConnError>),
    Evicted,
    Stopping,
}

impl Ended {
    fn result(self) -> Option<Result<(), ConnError>> {
        match self {
            Ended::Done(r) => Some(r),
            Ended::Evicted | Ended::Stopping => None,
        }
    }
}

/// Counts and logs how a connection ended, and frees its slot.
fn finish(
    peer: Option<std::net::SocketAddr>,
    result: Option<Result<(), ConnError>>,
    registered: Registered,
) {
    match result {
        Some(Err(e)) => {
            if timed_out(e.as_ref()) {
                inc(&registered.stats.timed_out);
            }
            tracing::debug!(?peer, error = %e, "REST connection ended");
        }
        Some(Ok(())) => {}
        None => tracing::debug!(?peer, "REST connection closed (evicted or stopping)"),
    }
    drop(registered);
}

/// The service of one connection: each request marks it busy while it runs.
fn service(
    router: Router,
    service_slot: Arc<Slot>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Tracked>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Tracked>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let busy = Busy::begin(&service_slot);
        let router = router.clone();
        async move {
            let res = match busy {
                Some(_) => router
                    .oneshot(req.map(Body::new))
                    .await
                    .unwrap_or_else(|e| match e {}),
                // Evicted meanwhile: the connection closes; nothing is run.
                None => Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Body::empty())
                    .unwrap_or_default(),
            };
            Ok::<_, Infallible>(res.map(|body| Tracked { body, _busy: busy }))
        }
    })
}

/// Whether hyper gave up on the connection for a timeout (header read, or
/// our send timeout).
fn timed_out(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    if e.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
    {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if s.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Answers a connection over the limit with `503` and closes it.
async fn refuse(mut stream: TcpStream, limit: usize, _permit: OwnedSemaphorePermit) {
    let problem = crate::api::ApiError::unavailable(
        "connection-limit",
        format!(
            "this gateway has its maximum of {limit} REST connections open, each with a request \
             in flight; retry shortly"
        ),
        1,
    )
    .problem();
    let body = serde_json::to_string(&problem).unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        crate::api::PROBLEM_JSON,
        body.len()
    );
    // Wait (briefly) for the client to close: closing first, with its request
    // unread, would reset the connection and could discard the answer.
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_backs_off_and_a_reset_does_not() {
        assert_eq!(
            classify(&io::Error::from_raw_os_error(24)),
            AcceptFailure::Resources
        );
        assert_eq!(
            classify(&io::Error::from_raw_os_error(23)),
            AcceptFailure::Resources
        );
        assert_eq!(
            classify(&io::Error::from(io::ErrorKind::ConnectionAborted)),
            AcceptFailure::Connection
        );
        assert_eq!(classify(&io::Error::other("strange")), AcceptFailure::Other);
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.failed(), BACKOFF_FIRST);
    }

    #[test]
    fn the_idlest_connection_goes_and_a_busy_one_never() {
        let r = Registry::new();
        let (a, slot_a) = r.insert();
        let (_b, slot_b) = r.insert();
        slot_a.idle_since.store(5, Ordering::Relaxed);
        slot_b.idle_since.store(1, Ordering::Relaxed);
        let busy_b = Busy::begin(&slot_b).expect("not evicted");
        // b is idle longer but busy: a goes.
        assert!(r.evict_idlest());
        assert!(
            Busy::begin(&slot_a).is_none(),
            "an evicted slot takes no request"
        );
        assert!(!r.lock().contains_key(&a));
        assert!(!r.evict_idlest(), "the only one left is busy");
        drop(busy_b);
        assert!(r.evict_idlest());
        assert_eq!(r.len(), 0);
    }

    #[tokio::test]
    async fn a_write_that_makes_no_progress_times_out() {
        let (mut client, server) = tokio::io::duplex(16);
        let mut w = SendTimeout::new(server, Duration::from_millis(300));
        w.write_all(&[0u8; 16]).await.expect("fits the buffer");
        // A reader that keeps taking bytes keeps the writer going...
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut got = 0;
            while got < 16 + 64 {
                got += client.read(&mut buf).await.expect("read");
            }
            client
        });
        w.write_all(&[0u8; 64]).await.expect("read as it goes");
        let client = reader.await.expect("reader");
        // ...one that stops does not.
        w.write_all(&[0u8; 16]).await.expect("fits the buffer");
        let started = Instant::now();
        let err = w.write_all(&[0u8; 1]).await.expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        drop(client);
    }
}
