//! Devices over MQTT (DESIGN §4): an embedded rumqttd broker with MQTT 3.1.1
//! and 5 listeners, per-device authentication, topic ACLs, replicated
//! presence, and command and shadow delivery.
//!
//! - The router runs on its own thread (rumqttd's); each listener's accept
//!   loop is a task on the gateway's runtime. rumqttd's TLS and websocket
//!   listeners are compiled out.
//! - `codec` wraps rumqttd's codec per connection: ACLs, session events.
//! - `auth` checks logins against the registry (cached).
//! - `sessions` owns the sessions: presence, delivery, device messages.
//! - The gateway publishes through a local link (client id
//!   `entente:gateway-{node}`, which no device id can be) from a thread of
//!   its own, because rumqttd's link calls block.
//! - `watch_peers`: the leader declares a peer's sessions lost once it has
//!   not heard from it for the grace period.

mod auth;
mod codec;
mod sessions;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coordinator::node::Node;
use coordinator::raft::Role as RaftRole;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};
use tokio::sync::{mpsc, watch};

use crate::ops::{Op, OpResult};
use crate::state::StateDb;
use crate::{Config, GatewayError, io};

/// Counters of the MQTT side, rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Device sessions open on this gateway.
    pub sessions: AtomicU64,
    /// Device sessions started since boot.
    pub sessions_started: AtomicU64,
    /// Logins refused.
    pub auth_failures: AtomicU64,
    /// Devices disconnected for publishing or subscribing outside their topics.
    pub acl_violations: AtomicU64,
    /// Connections closed for a malformed or oversize packet.
    pub malformed_packets: AtomicU64,
    /// Device messages ignored (unknown or foreign command, malformed JSON,
    /// oversize payload).
    pub ignored_messages: AtomicU64,
    /// Commands published to devices.
    pub commands_published: AtomicU64,
    /// Reported-state patches received from devices (before coalescing).
    pub reports_received: AtomicU64,
    /// `ReportState` proposals made from them (after coalescing).
    pub report_proposals: AtomicU64,
}

impl MqttStats {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let rows: [(&str, &str, &str, &AtomicU64); 9] = [
            (
                "entente_mqtt_sessions",
                "gauge",
                "Device sessions open on this gateway.",
                &self.sessions,
            ),
            (
                "entente_mqtt_sessions_started_total",
                "counter",
                "Device sessions started.",
                &self.sessions_started,
            ),
            (
                "entente_mqtt_auth_failures_total",
                "counter",
                "MQTT logins refused.",
                &self.auth_failures,
            ),
            (
                "entente_mqtt_acl_violations_total",
                "counter",
                "Devices disconnected for using another device's topics.",
                &self.acl_violations,
            ),
            (
                "entente_mqtt_malformed_packets_total",
                "counter",
                "Connections closed for a malformed or oversize packet.",
                &self.malformed_packets,
            ),
            (
                "entente_mqtt_ignored_messages_total",
                "counter",
                "Device messages ignored (unknown command, malformed, oversize).",
                &self.ignored_messages,
            ),
            (
                "entente_mqtt_commands_published_total",
                "counter",
                "Commands published to devices.",
                &self.commands_published,
            ),
            (
                "entente_mqtt_reports_received_total",
                "counter",
                "Reported-state patches received from devices.",
                &self.reports_received,
            ),
            (
                "entente_mqtt_report_proposals_total",
                "counter",
                "Reported-state proposals made from them after coalescing.",
                &self.report_proposals,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
    }
}

/// The running MQTT side of a gateway.
#[derive(Debug)]
pub(crate) struct Mqtt {
    /// The MQTT 3.1.1 listener's address.
    pub(crate) v4_addr: Option<SocketAddr>,
    /// The MQTT 5 listener's address.
    pub(crate) v5_addr: Option<SocketAddr>,
    hub: Option<Arc<codec::Hub>>,
    /// Accept loops (aborted on stop).
    servers: Vec<tokio::task::JoinHandle<()>>,
    /// The runtime the listeners and their connections run on: rumqttd's
    /// connection setup makes blocking calls to its router, so device
    /// connections get their own threads and can never stall the REST API
    /// or consensus.
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

impl Mqtt {
    /// Stops accepting; every open connection fails on its next packet.
    pub(crate) fn stop(&mut self) {
        if let Some(hub) = &self.hub {
            hub.closed.store(true, Ordering::SeqCst);
        }
        for s in self.servers.drain(..) {
            s.abort();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts the broker and listeners (if any are configured), the session
/// manager and the peer watcher.
pub(crate) async fn start(
    config: &Config,
    node: Node<OpResult>,
    db: Arc<StateDb>,
    stats: Arc<MqttStats>,
    shutdown: watch::Receiver<bool>,
) -> Result<Mqtt, GatewayError> {
    let mut mqtt = Mqtt {
        v4_addr: None,
        v5_addr: None,
        hub: None,
        servers: Vec::new(),
        runtime: None,
        tasks: vec![tokio::spawn(watch_peers(
            node.clone(),
            config.session_grace,
            shutdown.clone(),
        ))],
    };
    if config.mqtt_listen.is_none() && config.mqtt5_listen.is_none() {
        return Ok(mqtt);
    }
    let router = Router::new(
        usize::try_from(config.node_id).unwrap_or(0),
        RouterConfig {
            max_connections: 1_000_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 2,
            ..RouterConfig::default()
        },
    );
    let router_tx = router.spawn();
    let link_id = format!("entente:gateway-{}", config.node_id);
    let tx = router_tx.clone();
    // `build` waits (blocking) for the router's answer.
    let (mut link_tx, link_rx) = tokio::task::spawn_blocking(move || {
        rumqttd::local::LinkBuilder::new(&link_id, tx)
            .dynamic_filters(true)
            .build()
            .map(|(tx, rx, _ack)| (tx, rx))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(|e| GatewayError::Io {
        what: "linking to the MQTT router".into(),
        source: std::io::Error::other(e),
    })?;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let hub = Arc::new(codec::Hub::new(events_tx, stats.clone()));
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
    // The publisher: ends when the manager (the only sender) ends.
    std::thread::Builder::new()
        .name("mqtt-publisher".into())
        .spawn(move || {
            while let Some((topic, payload)) = out_rx.blocking_recv() {
                if let Err(e) = link_tx.publish(topic, payload) {
                    tracing::error!(error = %e, "publishing to the MQTT router");
                    return;
                }
            }
        })
        .map_err(io("starting the MQTT publisher thread"))?;
    // The local link's receiver: answers `Unschedule` (else the router stops
    // forwarding to it), ends when the gateway stops.
    let closing = hub.clone();
    let mut link_rx = link_rx;
    std::thread::Builder::new()
        .name("mqtt-link-rx".into())
        .spawn(move || {
            while !closing.closed.load(Ordering::Relaxed) {
                let deadline = Instant::now() + Duration::from_millis(200);
                match link_rx.recv_deadline(deadline) {
                    Ok(Some(Notification::Unschedule)) => {
                        let _ = link_rx.ready();
                    }
                    Ok(_) | Err(rumqttd::local::LinkError::RecvTimeout(_)) => {}
                    Err(_) => return,
                }
            }
        })
        .map_err(io("starting the MQTT link thread"))?;

    let auth = Arc::new(auth::Authenticator::new(
        db.clone(),
        node.clone(),
        stats.clone(),
    ));
    let manager = sessions::Manager {
        node: node.clone(),
        db,
        node_id: config.node_id,
        stats,
        auth: auth.clone(),
        out: out_tx,
        max_payload: config.mqtt_max_payload,
        coalesce: config.report_coalesce,
        sessions: HashMap::new(),
        reports: HashMap::new(),
    };
    mqtt.tasks
        .push(tokio::spawn(manager.run(events_rx, shutdown.clone())));

    if config.mqtt_listen.is_some() || config.mqtt5_listen.is_some() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("mqtt-{}", config.node_id))
            .enable_all()
            .build()
            .map_err(io("starting the MQTT runtime"))?;
        mqtt.runtime = Some(rt);
    }
    for (addr, v5) in [(config.mqtt_listen, false), (config.mqtt5_listen, true)] {
        let Some(addr) = addr else { continue };
        let Some(rt) = mqtt.runtime.as_ref().map(|r| r.handle().clone()) else {
            continue;
        };
        // rumqttd binds the listener itself: pick the port here (port 0),
        // then wait until it accepts.
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|l| l.local_addr())
            .map_err(io(format!("binding the MQTT listener {addr}")))?;
        let mut connections = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: config.mqtt_max_packet,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let a = auth.clone();
        connections.set_auth_handler(move |client_id, username, password| {
            let a = a.clone();
            async move { a.check(&client_id, &username, &password).await }
        });
        let settings = ServerSettings {
            name: if v5 { "mqtt5".into() } else { "mqtt".into() },
            listen: bound,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let task = if v5 {
            let mut server = Server::new(
                settings,
                router_tx.clone(),
                codec::Guarded::new(V5, hub.clone()),
            );
            rt.spawn(async move {
                if let Err(e) = server.start(LinkType::Remote).await {
                    tracing::error!(error = %e, "MQTT 5 listener failed");
                }
            })
        } else {
            let mut server = Server::new(
                settings,
                router_tx.clone(),
                codec::Guarded::new(V4, hub.clone()),
            );
            rt.spawn(async move {
                if let Err(e) = server.start(LinkType::Remote).await {
                    tracing::error!(error = %e, "MQTT listener failed");
                }
            })
        };
        mqtt.servers.push(task);
        wait_listening(bound).await?;
        if v5 {
            mqtt.v5_addr = Some(bound);
        } else {
            mqtt.v4_addr = Some(bound);
        }
    }
    mqtt.hub = Some(hub);
    Ok(mqtt)
}

/// Waits (bounded) until `addr` accepts connections.
async fn wait_listening(addr: SocketAddr) -> Result<(), GatewayError> {
    let probe = if addr.ip().is_unspecified() {
        SocketAddr::new(
            if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            addr.port(),
        )
    } else {
        addr
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(probe).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(io(format!("starting the MQTT listener {addr}"))(e));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
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
                match crate::propose(&node, Op::GatewaySessionsLost { gateway: id }).await {
                    Ok(_) => {
                        declared.insert(id);
                    }
                    Err(e) => tracing::warn!(error = %e, "declaring a gateway's sessions lost"),
                }
            }
        }
    }
}
