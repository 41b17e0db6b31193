//! Devices over MQTT (docs/ARCHITECTURE.md, "Devices over MQTT"): a device
//! endpoint of its own (no broker) serving MQTT 3.1.1 and 5 on every device
//! listener, per-device authentication, topic ACLs, replicated presence, and
//! command and shadow delivery.
//!
//! - `wire`: the two protocol versions over rumqttc's packet codec.
//! - `endpoint`: accept loops and one task per connection; the registry of
//!   live sessions (delivery, takeover, revocation).
//! - `auth` checks logins against the registry (cached, throttled).
//! - `tls`: the TLS device listener's certificate, key and client CA.
//! - `sessions` owns the sessions' replicated side: presence, delivery,
//!   device messages.
//! - `ingest` proposes what devices publish and answers each message once
//!   what it causes is committed (the PUBACK means committed).
//! - `watch_peers`: the leader declares a peer's sessions lost once it has
//!   not heard from it for the grace period.
//!
//! Listeners and connections run on a runtime of their own (two threads), so
//! no number of devices can stall the REST API or consensus.

mod auth;
mod endpoint;
mod ingest;
mod sessions;
mod tls;
mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordinator::node::Node;
use coordinator::raft::Role as RaftRole;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::ops::{Op, OpResult};
pub use crate::shared::MqttStats;
use crate::shared::propose;
use crate::state::StateDb;

/// A device listener that could not be set up or opened again (the
/// message names its address).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ListenerError {
    /// What was being done.
    pub what: String,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ListenerError {
    let what = what.into();
    move |source| ListenerError { what, source }
}

/// The running MQTT side of a gateway.
#[derive(Debug)]
pub(crate) struct Mqtt {
    /// The first device listener's address (MQTT 3.1.1 by default; every
    /// listener serves both versions).
    pub(crate) v4_addr: Option<SocketAddr>,
    /// The second device listener's address (MQTT 5 by default).
    pub(crate) v5_addr: Option<SocketAddr>,
    /// The TLS device listener's address (both versions), if it is on.
    pub(crate) tls_addr: Option<SocketAddr>,
    /// The device listeners (none when none is configured).
    pub(crate) listeners: Option<Arc<Listeners>>,
    /// The runtime the listeners and their connections run on, so device
    /// connections can never stall the REST API or consensus.
    runtime: Option<tokio::runtime::Runtime>,
    /// The manager and the peer watcher (they end on shutdown).
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        // A runtime may not be dropped (blocking) inside another one.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// How long a stop waits for the device connections to end after telling
/// them (each has 1 s to write its DISCONNECT).
const STOP_GRACE: Duration = Duration::from_secs(2);

impl Mqtt {
    /// Stops accepting and ends every session: MQTT 5 devices are told the
    /// server is shutting down (0x8B), and the connections are given
    /// [`STOP_GRACE`] to say it before their runtime stops.
    pub(crate) async fn stop(&mut self) {
        if let Some(l) = &self.listeners {
            l.shared.shut_down();
            l.abort_all();
            if !l.shared.connections_ended(STOP_GRACE).await {
                tracing::debug!("device connections still open after the stop's grace; closed");
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The device listeners: open while this gateway is a member of the group,
/// closed (their sockets too, so devices connecting there are refused at
/// once and go to another gateway) while it is not.
#[derive(Debug)]
pub(crate) struct Listeners {
    shared: Arc<endpoint::Shared>,
    stats: Arc<MqttStats>,
    runtime: tokio::runtime::Handle,
    /// The TLS settings of the listener named [`TLS_LISTENER`].
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Each listener's bound address and name; it binds there again when
    /// it reopens.
    bound: Vec<(SocketAddr, &'static str)>,
    /// The accept loops of the open listeners, by name.
    open: Mutex<HashMap<&'static str, ListenerTasks>>,
}

#[derive(Debug)]
struct ListenerTasks {
    /// The accept loop (holds the socket).
    accept: tokio::task::AbortHandle,
    /// Watches the accept loop, counting it down if it ends on its own.
    watch: tokio::task::AbortHandle,
}

impl Listeners {
    /// Serves `listener` (bound at `addr`) on the MQTT runtime.
    fn spawn(&self, listener: std::net::TcpListener, name: &'static str) -> std::io::Result<()> {
        let listener = {
            let _guard = self.runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (sh, st) = (self.shared.clone(), self.stats.clone());
        let tls = match &self.tls {
            Some(config) if name == TLS_LISTENER => {
                Some(tokio_rustls::TlsAcceptor::from(config.clone()))
            }
            _ => None,
        };
        let run = self
            .runtime
            .spawn(endpoint::accept_loop(listener, sh.clone(), name, tls));
        let accept = run.abort_handle();
        let watch = self.runtime.spawn(async move {
            // The loop only returns when the gateway stops or leaves the
            // group; if it ever ends otherwise (or panics), health reports
            // the listener down.
            let result = run.await;
            let closed = sh.closed.load(Ordering::SeqCst);
            let serving = sh.serving.load(Ordering::SeqCst);
            if !closed && serving {
                st.listeners_down.fetch_add(1, Ordering::SeqCst);
                tracing::error!(listener = name, ?result, "an MQTT listener stopped");
            }
        });
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                name,
                ListenerTasks {
                    accept,
                    watch: watch.abort_handle(),
                },
            );
        Ok(())
    }

    fn abort_all(&self) {
        let open = std::mem::take(
            &mut *self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in open.values() {
            t.watch.abort();
            t.accept.abort();
        }
    }

    /// Closes the listeners and ends every session (MQTT 5 devices are
    /// told to use another server): this gateway is not a member of the
    /// group.
    pub(crate) fn close(&self) {
        self.shared.stop_serving();
        self.abort_all();
    }

    /// Opens the listeners that are closed again, at the addresses they
    /// had. Returns the first error (the others are still tried).
    pub(crate) fn reopen(&self) -> Result<(), ListenerError> {
        let mut first = None;
        for &(addr, name) in &self.bound {
            let is_open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains_key(name);
            if is_open {
                continue;
            }
            let opened = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(|l| self.spawn(l, name));
            if let Err(e) = opened {
                first.get_or_insert(ListenerError {
                    what: format!("opening the MQTT listener {addr} again"),
                    source: e,
                });
            }
        }
        self.shared.resume_serving();
        first.map_or(Ok(()), Err)
    }
}

/// The name of the TLS device listener.
const TLS_LISTENER: &str = "mqtt-tls";

/// Bound on session events waiting for the session manager: when it is
/// full, connections stop reading until there is room (nothing is dropped).
/// (Device messages are bounded by the pipeline's permits too.)
const EVENT_QUEUE: usize = 16_384;

/// The TLS device listener's settings, read from the configured files
/// (`None` if it is off). Called first thing at start, so a bad file stops
/// the start before anything runs; the error names the file.
pub(crate) fn tls_config(config: &Config) -> Result<Option<TlsConfig>, String> {
    config.check_mqtt_tls()?;
    match (&config.mqtt_tls_cert, &config.mqtt_tls_key) {
        (Some(cert), Some(key)) if config.mqtt_tls_enabled() => {
            let files = tls::Files {
                cert,
                key,
                client_ca: config.mqtt_tls_client_ca.as_deref(),
            };
            Ok(Some(TlsConfig(tls::server_config(files)?)))
        }
        _ => Ok(None),
    }
}

/// The TLS device listener's settings (see [`tls_config`]).
#[derive(Debug, Clone)]
pub(crate) struct TlsConfig(Arc<tokio_rustls::rustls::ServerConfig>);

/// Starts the device listeners (the ones given, else those configured, if
/// any; the TLS listener with `tls`), the session manager and the peer
/// watcher.
pub(crate) async fn start(
    config: &Config,
    given: [Option<std::net::TcpListener>; 2],
    tls: Option<TlsConfig>,
    node: Node<OpResult>,
    db: Arc<StateDb>,
    stats: Arc<MqttStats>,
    shutdown: watch::Receiver<bool>,
) -> Result<Mqtt, ListenerError> {
    let mut mqtt = Mqtt {
        v4_addr: None,
        v5_addr: None,
        tls_addr: None,
        listeners: None,
        runtime: None,
        tasks: vec![tokio::spawn(watch_peers(
            node.clone(),
            config.session_grace,
            shutdown.clone(),
        ))],
    };
    let [given4, given5] = given;
    if config.mqtt_listen.is_none()
        && config.mqtt5_listen.is_none()
        && given4.is_none()
        && given5.is_none()
        && tls.is_none()
    {
        return Ok(mqtt);
    }
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let auth = Arc::new(auth::Authenticator::new(
        db.clone(),
        node.clone(),
        stats.clone(),
    ));
    let shared = Arc::new(endpoint::Shared::new(
        events_tx,
        stats.clone(),
        auth.clone(),
        config.mqtt_max_packet,
        config.mqtt_max_connections,
        config.mqtt_connect_timeout,
    ));
    let ingest = ingest::Ingest::new(
        node.clone(),
        db.clone(),
        stats.clone(),
        config.mqtt_max_payload,
        config.report_coalesce,
        ingest::patience(config.write_timeout),
    );
    let manager = sessions::Manager {
        node: node.clone(),
        db,
        node_id: config.node_id,
        stats: stats.clone(),
        auth,
        endpoint: shared.clone(),
        ingest,
        sessions: HashMap::new(),
        redelivered: HashMap::new(),
        sent_due: HashMap::new(),
        sent_tasks: tokio::task::JoinSet::new(),
        deliveries: None,
        published: {
            let (tx, rx) = mpsc::channel(sessions::PUBLISHED_BATCHES);
            (tx, Some(rx))
        },
    };
    mqtt.tasks
        .push(tokio::spawn(manager.run(events_rx, shutdown.clone())));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("mqtt-{}", config.node_id))
        .enable_all()
        .build()
        .map_err(io("starting the MQTT runtime"))?;
    let mut sockets = Vec::new();
    let tls_listen = config.mqtt_tls_listen.filter(|_| tls.is_some());
    for (addr, given, name) in [
        (config.mqtt_listen, given4, "mqtt"),
        (config.mqtt5_listen, given5, "mqtt5"),
        (tls_listen, None, TLS_LISTENER),
    ] {
        let listening = match (given, addr) {
            (Some(l), _) => adopt(l),
            (None, Some(addr)) => bind(addr),
            (None, None) => continue,
        };
        let (std_listener, bound) = match listening {
            Ok(l) => l,
            Err(e) => {
                // A runtime may not be dropped (blocking) inside another one.
                rt.shutdown_background();
                return Err(e);
            }
        };
        match name {
            "mqtt" => mqtt.v4_addr = Some(bound),
            "mqtt5" => mqtt.v5_addr = Some(bound),
            _ => mqtt.tls_addr = Some(bound),
        }
        sockets.push((std_listener, bound, name));
    }
    let listeners = Arc::new(Listeners {
        shared,
        stats,
        runtime: rt.handle().clone(),
        tls: tls.map(|t| t.0),
        bound: sockets.iter().map(|(_, a, n)| (*a, *n)).collect(),
        open: Mutex::new(HashMap::new()),
    });
    for (socket, bound, name) in sockets {
        if let Err(e) = listeners.spawn(socket, name) {
            rt.shutdown_background();
            return Err(io(format!("setting up the MQTT listener {bound}"))(e));
        }
    }
    mqtt.runtime = Some(rt);
    mqtt.listeners = Some(listeners);
    Ok(mqtt)
}

/// Sets up a device listener the caller bound (non-blocking, for the MQTT
/// runtime).
fn adopt(
    listener: std::net::TcpListener,
) -> Result<(std::net::TcpListener, SocketAddr), ListenerError> {
    let bound = listener
        .local_addr()
        .map_err(io("reading a given MQTT listener's address"))?;
    listener
        .set_nonblocking(true)
        .map_err(io(format!("setting up the MQTT listener {bound}")))?;
    Ok((listener, bound))
}

/// Binds a device listener (non-blocking, for the MQTT runtime); the error
/// names the address.
fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), ListenerError> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(io(format!("binding the MQTT listener {addr}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(io(format!("setting up the MQTT listener {addr}")))?;
    let bound = std_listener
        .local_addr()
        .map_err(io(format!("reading the MQTT listener's address {addr}")))?;
    Ok((std_listener, bound))
}

/// On the leader: a peer not heard from (no `recent_active` in any sample)
/// for `grace` is declared down, once, with `GatewaySessionsLost`.
async fn watch_peers(node: Node<OpResult>, grace: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let mut last_seen: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut declared: BTreeSet<u64> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let st = node.status().raft;
        if st.role != RaftRole::Leader {
            last_seen.clear();
            continue;
        }
        let now = Instant::now();
        for (&id, p) in &st.progress {
            if id == st.id {
                continue;
            }
            let seen = last_seen.entry(id).or_insert(now);
            if p.recent_active {
                *seen = now;
                declared.remove(&id);
            } else if now.duration_since(*seen) >= grace && !declared.contains(&id) {
                tracing::warn!(
                    gateway = id,
                    "peer unreachable past the grace period: its device sessions are lost"
                );
                match propose(&node, Op::GatewaySessionsLost { gateway: id }).await {
                    Ok(_) => {
                        declared.insert(id);
                    }
                    Err(e) => tracing::warn!(error = %e, "declaring a gateway's sessions lost"),
                }
            }
        }
    }
}
