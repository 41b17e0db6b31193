//! Entente's edge gateway: embeds a `coordinator` node, keeps the replicated
//! state in SQLite, and serves the operators' REST API.
//!
//! [`start`] brings a gateway up and returns a handle with its bound
//! addresses; [`run`] is `start` plus waiting for a shutdown signal, which is
//! what `main` calls. Tests call [`start_with`] with listeners they bound on
//! port 0 themselves ([`Listeners`]), or [`start`] with port-0 addresses,
//! and temp dirs.
#![deny(missing_docs)]

pub mod api;
pub mod backup;
pub mod certs;
pub mod config;
mod files;
pub mod jobs;
pub mod limits;
pub mod mqtt;
pub mod ops;
pub mod recover;
mod server;
pub mod shared;
pub mod state;
pub mod verify;

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use coordinator::engine::EngineKind;
use coordinator::node::BuildEngine;
use coordinator::node::{Node, NodeConfig, NodeError};
use coordinator::paxos::MultiPaxos;
use coordinator::pbft::Pbft;
use coordinator::raft::Raft;
use coordinator::raft::{ConfState, Role as RaftRole};
use coordinator::storage::{Storage, StorageOptions};
use coordinator::transport::{PeerAddr, PeerBook, Transport, TransportConfig};
use tokio::sync::watch;

pub use config::Config;
use ops::{Op, OpResult};
pub use shared::{hash_secret, now_ms, propose};
use state::StateDb;

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The durable log could not be opened (the message names the file).
    #[error("raft storage: {0}")]
    Storage(#[from] coordinator::storage::StorageError),
    /// The state database could not be opened.
    #[error("state database: {0}")]
    State(#[from] state::StateError),
    /// The peer transport could not start.
    #[error("peer transport: {0}")]
    Transport(#[from] coordinator::transport::TransportError),
    /// The node could not start.
    #[error("raft node: {0}")]
    Node(#[from] NodeError),
    /// The settings do not allow starting (the message says why).
    #[error("{0}")]
    Config(String),
    /// A listener or file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GatewayError {
    let what = what.into();
    move |source| GatewayError::Io { what, source }
}

/// A random 32-byte token, hex-encoded.
pub fn random_token() -> Result<String, GatewayError> {
    shared::random_token().map_err(|source| GatewayError::Io {
        what: "reading the OS random source".into(),
        source,
    })
}

impl From<mqtt::ListenerError> for GatewayError {
    fn from(e: mqtt::ListenerError) -> GatewayError {
        GatewayError::Io {
            what: e.what,
            source: e.source,
        }
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Where the REST API listens.
    pub http_addr: SocketAddr,
    /// Where the peer transport listens.
    pub raft_addr: SocketAddr,
    /// Where devices connect with MQTT 3.1.1, if enabled.
    pub mqtt_addr: Option<SocketAddr>,
    /// Where devices connect with MQTT 5, if enabled.
    pub mqtt5_addr: Option<SocketAddr>,
    /// Where devices connect with MQTT (3.1.1 or 5) over TLS, if enabled
    /// (a certificate and key are configured).
    pub mqtt_tls_addr: Option<SocketAddr>,
    /// The file holding the admin token created on first start, if this
    /// gateway created it.
    pub admin_token_file: Option<PathBuf>,
    /// The file holding the cluster secret this single gateway generated
    /// (none was given), if so.
    pub cluster_secret_file: Option<PathBuf>,
    node: Node<OpResult>,
    db: Arc<StateDb>,
    transport: Arc<dyn PeerBook>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    mqtt: mqtt::Mqtt,
    /// The data directory's lock, released when the gateway is dropped.
    _lock: files::DirLock,
}

impl Gateway {
    /// The node handle (status, proposals).
    pub fn node(&self) -> &Node<OpResult> {
        &self.node
    }

    /// The state database.
    pub fn db(&self) -> &Arc<StateDb> {
        &self.db
    }

    /// Stops as a crash would look to the rest of the group: the peer
    /// transport goes first, so nothing this gateway does while stopping
    /// (such as ending its device sessions) reaches the others. For tests of
    /// what the group does when a gateway disappears.
    pub async fn crash(self) {
        self.transport.shutdown().await;
        self.stop().await;
    }

    /// Stops serving, ends streams, shuts the node down (flushing storage).
    pub async fn stop(mut self) {
        let node = self.node.status().raft.id;
        tracing::info!(node, "gateway stopping");
        self.mqtt.stop().await;
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks.into_iter().chain(self.mqtt.tasks.drain(..)) {
            let _ = t.await;
        }
        self.node.shutdown().await;
        self.transport.shutdown().await;
        tracing::info!(node, "gateway stopped");
    }
}

/// Listeners bound by the caller, for [`start_with`]: each one given is
/// served as it is, in place of binding the address the configuration
/// names. A caller that binds port 0 itself (as the tests do) knows every
/// address before the gateway starts — the peers' addresses a group needs
/// up front included — and no other process can take a port in between.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The REST listener, in place of [`Config::http_listen`].
    pub rest: Option<std::net::TcpListener>,
    /// The peer listener, in place of [`Config::raft_listen`].
    pub peer: Option<std::net::TcpListener>,
    /// The first device listener, in place of [`Config::mqtt_listen`]
    /// (served even if that is unset).
    pub mqtt: Option<std::net::TcpListener>,
    /// The second device listener, in place of [`Config::mqtt5_listen`]
    /// (served even if that is unset).
    pub mqtt5: Option<std::net::TcpListener>,
}

/// Starts a gateway: storage, state database, transport, node, REST API and
/// the leader's background duties, on the addresses the configuration names.
pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
    start_with(config, Listeners::default()).await
}

/// [`start`] on listeners the caller bound (as mini-redis's
/// `run(listener, shutdown)`): those given are served instead of binding
/// the configured addresses.
pub async fn start_with(config: Config, listeners: Listeners) -> Result<Gateway, GatewayError> {
    let (_keep, never) = watch::channel(false);
    start_until(config, listeners, never).await
}

/// [`start`], giving up the waits for the group (a leader to bootstrap the
/// admin token with, clearing this gateway's old sessions) as soon as
/// `cancel` turns true: a start that has no quorum can still be stopped at
/// once. The gateway returned is then to be stopped.
async fn start_until(
    config: Config,
    listeners: Listeners,
    mut cancel: watch::Receiver<bool>,
) -> Result<Gateway, GatewayError> {
    tracing::info!(
        node = config.node_id,
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %config.data_dir.display(),
        "gateway starting"
    );
    let mqtt_tls = mqtt::tls_config(&config).map_err(GatewayError::Config)?;
    let http_tls = match &config.http_tls {
        Some((cert, key)) => Some(server::tls_acceptor(cert, key).map_err(GatewayError::Config)?),
        None => None,
    };
    prepare_data_dir(&config.data_dir)?;
    let lock = lock_data_dir(&config.data_dir)?;
    let (cluster_secret, cluster_secret_file) = match &config.cluster_secret {
        Some(secret) => (secret.clone(), None),
        None => {
            let (secret, file) = single_gateway_secret(&config)?;
            (secret, Some(file))
        }
    };
    check_engine_record(&config.data_dir, config.consensus)?;
    let (storage, recovered) =
        Storage::open(config.data_dir.join("raft"), StorageOptions::default())?;
    // A joining gateway starts with no membership: the leader's snapshot
    // brings the group's once it is added.
    let voters = if config.join {
        ConfState::default()
    } else {
        ConfState::with_voters(config.peers.keys().copied())
    };
    let init = recovered.into_initial_state(voters);
    let db = Arc::new(StateDb::open(&config.data_dir).await?);

    let mut tcfg = TransportConfig::new(
        config.node_id,
        config.cluster_id.clone(),
        cluster_secret.into_bytes(),
        config.raft_listen,
    );
    // Members must read each other's log entries.
    tcfg.app_format = u32::from(ops::ENTRY_FORMAT);
    tcfg.peers = config
        .peers
        .iter()
        .filter(|(id, _)| **id != config.node_id)
        .map(|(i, a)| (*i, a.clone()))
        .collect();
    // Snapshots from the leader arrive where storing them is a rename.
    tcfg.snapshot_dir = Some(storage.staging_dir().to_path_buf());
    match &config.peer_tls {
        Some(files) => {
            let tls =
                coordinator::transport::PeerTls::from_pem_files(&files.ca, &files.cert, &files.key)
                    .map_err(|e| GatewayError::Config(format!("peer TLS: {e}")))?;
            tcfg.tls = Some(tls);
            tracing::info!(
                ca = %files.ca.display(),
                cert = %files.cert.display(),
                name = %coordinator::transport::peer_tls_name(&config.cluster_id, config.node_id),
                "peer traffic is mutual TLS"
            );
        }
        None if config.peers.len() > 1 || config.join => tracing::warn!(
            "peer traffic is unencrypted: plain TCP, authenticated by the cluster secret only; \
             anyone on the path between gateways can read and alter it (use --peer-tls-ca, \
             --peer-tls-cert and --peer-tls-key; `gateway certs` makes them)"
        ),
        None => {}
    }
    tcfg.engine = config.consensus;
    let mut ncfg = NodeConfig::new(config.node_id);
    ncfg.engine = config.consensus;
    ncfg.tick = config.tick;
    ncfg.snapshot_log_bytes = config.snapshot_log_bytes;
    ncfg.snapshot_every = config.snapshot_every;
    ncfg.request_timeout = config.write_timeout;
    ncfg.raft.seed ^= now_ms();
    if config.consensus == EngineKind::Pbft {
        ncfg.pbft_crypto = Some(pbft_keys(&config)?);
    }
    let machine = state::Machine(db.clone());
    let peer_listener = listeners.peer;
    let (transport, node) = match config.consensus {
        EngineKind::Raft => {
            run_engine::<Raft>(tcfg, peer_listener, ncfg, init, storage, machine).await?
        }
        // `Config::from_args` refuses basic Paxos: it has no leader to run
        // the gateway's leader duties.
        EngineKind::MultiPaxos | EngineKind::BasicPaxos => {
            run_engine::<MultiPaxos>(tcfg, peer_listener, ncfg, init, storage, machine).await?
        }
        #[cfg(feature = "byzantine")]
        EngineKind::Pbft if config.byzantine.is_some() => {
            tracing::warn!(
                node = config.node_id,
                behaviours = ?config.byzantine,
                "BYZANTINE TEST MODE: this gateway misbehaves on purpose (a test build's \
                 --byzantine); it must never serve a real group"
            );
            ncfg.byzantine = config.byzantine;
            run_engine::<coordinator::pbft::byzantine::Byzantine>(
                tcfg,
                peer_listener,
                ncfg,
                init,
                storage,
                machine,
            )
            .await?
        }
        EngineKind::Pbft => {
            run_engine::<Pbft>(tcfg, peer_listener, ncfg, init, storage, machine).await?
        }
    };
    let raft_addr = transport.local_addr();

    let listener = match listeners.rest {
        Some(l) => l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
            .map_err(io("setting up the REST listener"))?,
        None => tokio::net::TcpListener::bind(config.http_listen)
            .await
            .map_err(io(format!(
                "binding the REST listener {}",
                config.http_listen
            )))?,
    };
    let http_addr = listener
        .local_addr()
        .map_err(io("reading the REST address"))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let config = Arc::new(config);
    let mqtt_stats = Arc::new(mqtt::MqttStats::default());
    let app_state = api::AppState {
        node: node.clone(),
        db: db.clone(),
        config: config.clone(),
        shutdown: shutdown_rx.clone(),
        mqtt: mqtt_stats.clone(),
    };
    if config.events_max_streams * 2 > config.http_max_connections {
        tracing::warn!(
            events_max_streams = config.events_max_streams,
            http_max_connections = config.http_max_connections,
            "event streams may take more than half of the REST connections; operators may find \
             every connection busy"
        );
    }
    let http_stats = Arc::new(server::HttpStats::default());
    let device_listeners = api::DeviceListeners::default();
    let router = api::app(app_state)
        .layer(axum::Extension(http_stats.clone()))
        .layer(axum::Extension(device_listeners.clone()));
    let limits = server::Limits {
        max_connections: config.http_max_connections.max(1),
        header_timeout: config.http_header_timeout,
        send_timeout: config.http_send_timeout,
        shutdown_grace: config.write_timeout + Duration::from_secs(1),
        tls: http_tls,
    };
    let http = tokio::spawn(server::serve(
        listener,
        router,
        limits,
        http_stats,
        shutdown_rx.clone(),
    ));

    // A gateway that joins a running group never creates the first token;
    // a new group's is tried for ten seconds here (a gateway leading from
    // the start returns its file), then in the background until the group
    // holds one.
    let first_token = if config.join {
        Bootstrap::NotHere
    } else {
        bootstrap_admin(
            &node,
            &db,
            &config,
            &mut cancel,
            Some(Duration::from_secs(10)),
        )
        .await?
    };
    let pending_bootstrap = matches!(first_token, Bootstrap::Pending);
    let admin_token_file = match first_token {
        Bootstrap::Written(path) => Some(path),
        Bootstrap::NotHere | Bootstrap::Pending => None,
    };
    let duties = tokio::spawn(leader_duties(node.clone(), db.clone(), shutdown_rx.clone()));
    let bootstrap = tokio::spawn({
        let (node, db, config, shutdown) = (
            node.clone(),
            db.clone(),
            config.clone(),
            shutdown_rx.clone(),
        );
        async move {
            if pending_bootstrap {
                bootstrap_admin_later(node, db, config, shutdown).await;
            }
        }
    });
    let rollouts = tokio::spawn(jobs::drive(
        node.clone(),
        db.clone(),
        config.job_retention,
        shutdown_rx.clone(),
    ));
    let peer_book = tokio::spawn(follow_peer_addresses(
        db.clone(),
        transport.clone(),
        config.node_id,
        shutdown_rx.clone(),
    ));
    forget_own_sessions(&node, &db, config.node_id, &mut cancel).await;
    let mqtt = mqtt::start(
        &config,
        [listeners.mqtt, listeners.mqtt5],
        mqtt_tls,
        node.clone(),
        db.clone(),
        mqtt_stats,
        shutdown_rx.clone(),
    )
    .await?;
    device_listeners.set(api::BoundDeviceListeners {
        mqtt: mqtt.v4_addr,
        mqtt5: mqtt.v5_addr,
        tls: mqtt.tls_addr,
    });
    let membership = tokio::spawn(follow_membership(
        node.clone(),
        mqtt.listeners.clone(),
        shutdown_rx,
    ));
    let devices: Vec<String> = [mqtt.v4_addr, mqtt.v5_addr]
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    let devices_tls = mqtt.tls_addr.map(|a| a.to_string());
    tracing::info!(
        node = config.node_id,
        rest = %http_addr,
        peers = %raft_addr,
        devices = devices.join(","),
        devices_tls,
        admin_token_file = admin_token_file.as_ref().map(|f| f.display().to_string()),
        generated_cluster_secret_file = cluster_secret_file.as_ref().map(|f| f.display().to_string()),
        "gateway started"
    );
    Ok(Gateway {
        _lock: lock,
        http_addr,
        raft_addr,
        mqtt_addr: mqtt.v4_addr,
        mqtt5_addr: mqtt.v5_addr,
        mqtt_tls_addr: mqtt.tls_addr,
        mqtt,
        admin_token_file,
        cluster_secret_file,
        node,
        db,
        transport,
        shutdown_tx,
        tasks: vec![http, duties, bootstrap, rollouts, peer_book, membership],
    })
}

/// Starts the peer transport and the node driver for the engine `E`: the
/// one place where the gateway knows which consensus engine it runs.
async fn run_engine<E>(
    tcfg: TransportConfig,
    listener: Option<std::net::TcpListener>,
    ncfg: NodeConfig,
    init: coordinator::raft::InitialState,
    storage: Storage,
    machine: state::Machine,
) -> Result<(Arc<dyn PeerBook>, Node<OpResult>), GatewayError>
where
    E: BuildEngine,
{
    let (transport, inbound) = match listener {
        Some(l) => Transport::<E::Message>::start_on(tcfg, l)?,
        None => Transport::<E::Message>::start(tcfg)?,
    };
    let transport = Arc::new(transport);
    let node =
        Node::start::<E, _, _, _>(ncfg, init, storage, transport.clone(), inbound, machine).await?;
    Ok((transport, node))
}

/// The file in the data directory naming the consensus engine its log
/// was written by.
const ENGINE_RECORD: &str = "consensus";

/// PBFT: this gateway's key pair from its data directory (created on
/// first start, mode 0600; a key file that does not read is an error naming
/// it) and the group's public keys, checked against it.
fn pbft_keys(config: &Config) -> Result<Arc<dyn coordinator::pbft::crypto::Crypto>, GatewayError> {
    let (key, created) =
        coordinator::keys::load_or_create(&config.data_dir).map_err(GatewayError::Config)?;
    if created {
        tracing::info!(
            node = config.node_id,
            file = %coordinator::keys::key_path(&config.data_dir).display(),
            public_key = %key.public_text(),
            "created this gateway's PBFT signing key"
        );
    }
    let keys = config.group_keys_with(&key).map_err(GatewayError::Config)?;
    key.crypto(config.node_id, &keys)
        .map_err(|e| GatewayError::Config(format!("--group-keys: {e}")))
}

/// Refuses a data directory whose log another consensus engine wrote (its
/// terms, votes and entries mean something else to another engine), and
/// records the engine in a new one. A directory with a log and no record
/// was written by Raft, the only engine before the record existed.
fn check_engine_record(dir: &std::path::Path, engine: EngineKind) -> Result<(), GatewayError> {
    let path = dir.join(ENGINE_RECORD);
    let recorded = match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir
            .join("raft")
            .exists()
            .then(|| EngineKind::Raft.name().to_owned()),
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    match &recorded {
        Some(name) if name == engine.name() => {}
        Some(name) => {
            return Err(GatewayError::Config(format!(
                "the data directory {} holds a log written by the {name:?} consensus engine and \
                 this gateway was started with --consensus {engine}: a group keeps the engine \
                 it was created with (start with --consensus {name}, or with a new data \
                 directory)",
                dir.display()
            )));
        }
        None => {}
    }
    if path.exists() && recorded.is_some() {
        return Ok(());
    }
    // Written aside and renamed, so a crash never leaves a partial record.
    let tmp = dir.join(format!("{ENGINE_RECORD}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, &format!("{}\n", engine.name()))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("creating {}", path.display())))?;
    Ok(())
}

/// Creates the data directory private (0700), or makes an existing one and
/// everything in it private (0700 / 0600), saying so.
/// Takes the data directory's lock (a second process on it is refused,
/// naming the holder).
pub(crate) fn lock_data_dir(dir: &std::path::Path) -> Result<files::DirLock, GatewayError> {
    files::lock_dir(dir).map_err(|e| GatewayError::Config(e.to_string()))
}

fn prepare_data_dir(dir: &std::path::Path) -> Result<(), GatewayError> {
    let what = || format!("preparing the data directory {}", dir.display());
    if dir.exists() {
        let changed = files::tighten_tree(dir).map_err(io(what()))?;
        if changed > 0 {
            tracing::warn!(
                dir = %dir.display(),
                changed,
                "the data directory was readable by other users: made it 0700 and its files 0600"
            );
        }
    } else {
        files::create_private_dir(dir).map_err(io(what()))?;
    }
    Ok(())
}

/// The name of the secret a single gateway generates in its data directory.
pub const CLUSTER_SECRET_FILE: &str = "cluster-secret";

/// The cluster secret of a gateway given none: only a single gateway (one
/// peer, not joining) may start so; it generates a random secret in
/// `<data-dir>/cluster-secret` (0600) on first start and reuses it after.
fn single_gateway_secret(config: &Config) -> Result<(String, PathBuf), GatewayError> {
    if config.join || config.peers.len() > 1 {
        return Err(GatewayError::Config(
            "a cluster needs a shared secret, the same on every gateway: \
             --cluster-secret-file (or ENTENTE_CLUSTER_SECRET)"
                .into(),
        ));
    }
    let path = config.data_dir.join(CLUSTER_SECRET_FILE);
    if path.exists() {
        let secret = config::read_secret_file(&path).map_err(GatewayError::Config)?;
        tracing::info!(file = %path.display(), "using the generated cluster secret");
        return Ok((secret, path));
    }
    let secret = random_token()?;
    // Written aside and renamed, so a crash never leaves a partial secret.
    let tmp = config.data_dir.join(format!("{CLUSTER_SECRET_FILE}.tmp"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io(format!("removing {}", tmp.display()))(e));
        }
        _ => {}
    }
    write_private(&tmp, &format!("{secret}\n"))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("creating {}", path.display())))?;
    std::fs::File::open(&config.data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", config.data_dir.display())))?;
    tracing::info!(
        file = %path.display(),
        "no cluster secret given: generated one for this single gateway \
         (gateways that join it need a copy, with --cluster-secret-file)"
    );
    Ok((secret, path))
}

/// Keeps the transport's peer table in step with the replicated peer
/// addresses (`SetPeerAddress`): all of them at start and after a snapshot
/// restore or a lagged change feed, then each one as it commits.
async fn follow_peer_addresses(
    db: Arc<StateDb>,
    transport: Arc<dyn PeerBook>,
    self_id: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    fn set(transport: &dyn PeerBook, self_id: u64, id: u64, address: &str) {
        if id == self_id {
            return;
        }
        // A host name is kept as it is: the transport looks it up at every
        // dial.
        match address.parse::<PeerAddr>() {
            Ok(addr) => {
                if let Err(e) = transport.set_peer(id, addr) {
                    tracing::warn!(peer = id, address, error = %e, "setting a peer's address");
                }
            }
            Err(e) => {
                tracing::warn!(
                    peer = id,
                    error = %e,
                    "a replicated peer address is not host:port; peer left as it was"
                );
            }
        }
    }
    async fn load_all(db: &StateDb, transport: &dyn PeerBook, self_id: u64) {
        match db.peer_addresses().await {
            Ok(rows) => {
                for (id, address) in rows {
                    set(transport, self_id, id, &address);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the replicated peer addresses"),
        }
    }
    let mut changes = db.changes();
    let mut restores = db.watch_restores();
    load_all(&db, transport.as_ref(), self_id).await;
    loop {
        // (What to do is decided inside `select!` and done outside it, so no
        // borrow of the shutdown flag is held across the awaits below.)
        let reload = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = changes.recv() => match r {
                Ok(state::Change::PeerAddress { id, address }) => Some((id, address)),
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            Ok(()) = restores.changed() => None,
        };
        match reload {
            Some((id, address)) => set(transport.as_ref(), self_id, id, &address),
            None => load_all(&db, transport.as_ref(), self_id).await,
        }
    }
}

/// Where this gateway stands in the group, as its consensus node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Its configuration lists it (voter or learner).
    Member,
    /// It has no configuration yet: started with `--join`, not added yet.
    NotAdded,
    /// It was removed: a member said a configuration committed at `at` no
    /// longer lists it, or (`at` = `None`) its own configuration no longer
    /// does. (A gateway started with `--join` is briefly here too, if the
    /// snapshot that brings it the group's membership predates its
    /// addition.)
    Removed {
        /// The commit index at which a member's configuration left it out.
        at: Option<u64>,
    },
}

impl Standing {
    /// This node's standing according to its status.
    pub fn of(raft: &coordinator::raft::Status) -> Standing {
        let conf = &raft.conf_state;
        if let Some(at) = raft.removed {
            Standing::Removed { at: Some(at) }
        } else if conf.contains(raft.id) {
            Standing::Member
        } else if conf.voters.is_empty() && conf.learners.is_empty() {
            Standing::NotAdded
        } else {
            Standing::Removed { at: None }
        }
    }
}

/// Keeps the device listeners open while this gateway is a member of the
/// group and closed while it is not (not added yet, or removed): devices
/// connected here are disconnected (MQTT 5: "use another server") and
/// connect to another gateway. When it is added (again), they open again
/// where they were; a listener that cannot bind is retried every second.
/// A node stopped after a fatal error closes them for good: this gateway
/// can commit nothing for its devices (its REST API stays up to say why).
async fn follow_membership(
    node: Node<OpResult>,
    listeners: Option<Arc<mqtt::Listeners>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(listeners) = listeners else {
        return;
    };
    let mut status = node.watch_status();
    let mut serving = true;
    let mut retry = false;
    let mut failures: u64 = 0;
    loop {
        let (standing, fatal) = {
            let st = status.borrow_and_update();
            (Standing::of(&st.raft), st.fatal.clone())
        };
        let member = standing == Standing::Member && fatal.is_none();
        if member && (!serving || retry) {
            match listeners.reopen() {
                Ok(()) => {
                    tracing::info!("this gateway is a member of the group: device listeners open");
                    retry = false;
                    failures = 0;
                }
                Err(e) => {
                    if failures.is_multiple_of(60) {
                        tracing::warn!(error = %e, failures, "reopening the device listeners; retrying every second");
                    }
                    failures += 1;
                    retry = true;
                }
            }
            serving = true;
        } else if !member && serving {
            listeners.close();
            serving = false;
            retry = false;
            match standing {
                _ if fatal.is_some() => tracing::error!(
                    error = fatal.as_deref().unwrap_or_default(),
                    "the consensus node stopped: device listeners closed and device sessions \
                     ended (devices connect to another gateway); restart this gateway once the \
                     cause is fixed"
                ),
                Standing::NotAdded => tracing::info!(
                    "device listeners closed until this gateway is added to the group \
                     (POST /v1/cluster/members)"
                ),
                _ => tracing::warn!(
                    ?standing,
                    "this gateway is not a member of the group: device listeners closed and \
                     device sessions ended (devices connect to another gateway); add it again \
                     (POST /v1/cluster/members) or stop it"
                ),
            }
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = status.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
    }
}

/// Sessions this gateway held before it (re)started are gone: before its
/// MQTT listeners open, it says so (`GatewaySessionsLost` for itself), if
/// the state shows any. Best effort: with no leader the leader's peer watch
/// does it later.
async fn forget_own_sessions(
    node: &Node<OpResult>,
    db: &StateDb,
    node_id: u64,
    cancel: &mut watch::Receiver<bool>,
) {
    let filter = state::DeviceFilter {
        label: None,
        online: Some(true),
    };
    let page = state::Page {
        after: None,
        limit: u32::MAX,
    };
    let mine = match db.list_devices(&filter, &page).await {
        Ok(devices) => devices.iter().any(|d| d.gateway == Some(node_id)),
        Err(e) => {
            tracing::warn!(error = %e, "looking for this gateway's old sessions");
            false
        }
    };
    if !mine {
        return;
    }
    // Right after a restart the group may still be electing: retry (bounded).
    // Stopping meanwhile gives up at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut status = node.watch_status();
    let attempts = async {
        loop {
            let _ = tokio::time::timeout_at(deadline, status.wait_for(|s| s.raft.leader.is_some()))
                .await;
            let op = Op::GatewaySessionsLost { gateway: node_id };
            match propose(node, op).await {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(error = %e, "could not clear this gateway's old device sessions");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    tokio::select! {
        () = attempts => {}
        _ = cancel.wait_for(|c| *c) => {}
    }
}

/// On first start of a group, the gateway that leads creates an admin token
/// (only if the group has none) and writes it to `<data-dir>/admin-token`.
///
/// The token is generated once and kept in `<data-dir>/admin-token.pending`
/// (0600) before it is proposed, and the same token is proposed again after
/// a failed or unanswered proposal: a proposal whose outcome was unknown may
/// still have committed, and a token the group holds but nobody can read
/// would leave the group with no way to administer it. Once the group holds
/// a token, the pending file becomes `admin-token` if the group's bootstrap
/// token is this one, and is removed otherwise.
///
/// Tries for `bound` at most (the start waits that long, so that a gateway
/// that leads from the start returns its token file); after that,
/// [`bootstrap_admin_later`] goes on in the background.
async fn bootstrap_admin(
    node: &Node<OpResult>,
    db: &StateDb,
    config: &Config,
    cancel: &mut watch::Receiver<bool>,
    bound: Option<Duration>,
) -> Result<Bootstrap, GatewayError> {
    let path = config.data_dir.join("admin-token");
    if path.exists() {
        return Ok(Bootstrap::Written(path));
    }
    let pending = config.data_dir.join("admin-token.pending");
    let deadline = bound.map(|b| tokio::time::Instant::now() + b);
    let mut token: Option<String> = None;
    let mut status = node.watch_status();
    loop {
        // Does the group hold a token yet? Then this is settled either way.
        if db.has_tokens().await? {
            let ours = match read_pending(&pending)? {
                Some(t) => db.token_hash_exists(&hash_secret(&t)).await?,
                None => false,
            };
            if ours {
                std::fs::rename(&pending, &path).map_err(io(format!(
                    "moving {} to {}",
                    pending.display(),
                    path.display()
                )))?;
                sync_dir(&config.data_dir)?;
                return Ok(Bootstrap::Written(path));
            }
            remove_if_present(&pending)?;
            return Ok(Bootstrap::NotHere);
        }
        if node.status().raft.role == RaftRole::Leader {
            let t = match token.take() {
                Some(t) => t,
                None => match read_pending(&pending)? {
                    Some(t) => t,
                    None => {
                        let t = random_token()?;
                        write_private_atomic(&pending, &format!("{t}\n"))?;
                        t
                    }
                },
            };
            let hash = hash_secret(&t);
            token = Some(t);
            let proposal = propose(node, Op::BootstrapAdmin { token_hash: hash });
            // Past the bound the start goes on; the proposal may still
            // commit, which the pending file covers.
            let answer = match deadline {
                Some(d) => match tokio::time::timeout_at(d, proposal).await {
                    Ok(a) => a,
                    Err(_) => return Ok(Bootstrap::Pending),
                },
                None => proposal.await,
            };
            match answer {
                // Settled at the top of the loop: `Done` made it ours,
                // `Ignored` means the group already held a token (ours, from
                // an earlier proposal whose answer was lost, or another's).
                Ok(_) => continue,
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not create the first admin token yet; trying again"
                ),
            }
        }
        // Look again when the node's status changes (a new role, entries
        // applied: the group's token may have come by replication), at most
        // every 50 ms and at least every second, until the bound or the stop.
        let wake = tokio::time::Instant::now() + Duration::from_secs(1);
        let wake = deadline.map_or(wake, |d| d.min(wake));
        let changed = tokio::select! {
            _ = tokio::time::sleep_until(wake) => false,
            changed = status.changed() => {
                if changed.is_err() {
                    // The node is gone: so is this gateway.
                    return Ok(Bootstrap::Pending);
                }
                true
            }
            _ = cancel.wait_for(|c| *c) => return Ok(Bootstrap::Pending),
        };
        if changed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(Bootstrap::Pending);
        }
    }
}

/// What [`bootstrap_admin`] came to.
enum Bootstrap {
    /// This gateway holds the group's first admin token in this file.
    Written(PathBuf),
    /// The group has its first admin token; this gateway does not hold it.
    NotHere,
    /// The group has no token yet (no leader, or its proposal has not
    /// committed yet).
    Pending,
}

/// The first admin token, after the start: tried until the group holds a
/// token or the gateway stops; the gateway that writes it says so on
/// standard output as the start does.
async fn bootstrap_admin_later(
    node: Node<OpResult>,
    db: Arc<StateDb>,
    config: Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
) {
    match bootstrap_admin(&node, &db, &config, &mut shutdown, None).await {
        Ok(Bootstrap::Written(path)) => {
            tracing::info!(admin_token_file = %path.display(), "created the first admin token");
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", admin_token_line(&path));
            let _ = out.flush();
        }
        Ok(Bootstrap::NotHere | Bootstrap::Pending) => {}
        Err(e) => tracing::error!(error = %e, "could not create the first admin token"),
    }
}

/// What the gateway that holds the first admin token prints (at its start,
/// or when it writes the file later).
fn admin_token_line(path: &std::path::Path) -> String {
    format!(
        "admin token: {} (use it as 'Authorization: Bearer <token>')",
        path.display()
    )
}

/// The token in a pending admin-token file, if there is one. A file that is
/// not a token (damaged by a crash while it was written) is an error naming
/// it: it is never silently replaced, as its token may be the group's.
fn read_pending(path: &std::path::Path) -> Result<Option<String>, GatewayError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let t = text.trim();
            if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(Some(t.to_string()))
            } else {
                Err(GatewayError::Config(format!(
                    "{} does not hold an admin token (64 hex digits); if the group \
                     has no admin token yet, remove the file and start again",
                    path.display()
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// Writes `text` to `path` (0600) whole or not at all: into a temporary file
/// beside it, synced, then renamed over it, and the directory synced.
fn write_private_atomic(path: &std::path::Path, text: &str) -> Result<(), GatewayError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    remove_if_present(&tmp)?;
    write_private(&tmp, text)?;
    std::fs::rename(&tmp, path).map_err(io(format!(
        "moving {} to {}",
        tmp.display(),
        path.display()
    )))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

fn sync_dir(dir: &std::path::Path) -> Result<(), GatewayError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing the directory {}", dir.display())))
}

fn remove_if_present(path: &std::path::Path) -> Result<(), GatewayError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

fn write_private(path: &std::path::Path, text: &str) -> Result<(), GatewayError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, files::FILE_MODE);
    let mut f = opts
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io(format!("writing {}", path.display())))?;
    f.sync_all()
        .map_err(io(format!("syncing {}", path.display())))
}

/// What only the leader does: expire commands whose TTL passed.
async fn leader_duties(
    node: Node<OpResult>,
    db: Arc<StateDb>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if node.status().raft.role != RaftRole::Leader {
            continue;
        }
        match db.expired_commands(now_ms(), 500).await {
            Ok(cids) if !cids.is_empty() => {
                if let Err(e) = propose(&node, Op::ExpireCommands { cids }).await {
                    tracing::debug!(error = %e, "expiring commands");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "looking for expired commands"),
        }
    }
}

/// Starts a gateway, prints where it is, and runs until `shutdown`
/// resolves; then stops it gracefully (devices told, requests in flight
/// answered, storage flushed). `shutdown` may resolve at any time, during
/// the start too: a start still waiting for the group (no quorum) gives up
/// its waits and the gateway stops at once.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), GatewayError> {
    // With a JSON log every line on stdout is JSON: the "gateway started"
    // event carries the addresses instead.
    let plain = config.log_format == config::LogFormat::Text;
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let starting = start_until(config, Listeners::default(), cancel_rx);
    tokio::pin!(starting, shutdown);
    let mut stopping = false;
    let gw = loop {
        tokio::select! {
            r = &mut starting => break r?,
            () = &mut shutdown, if !stopping => {
                stopping = true;
                tracing::info!("stopping during the start: no more waiting for the group");
                let _ = cancel_tx.send(true);
            }
        }
    };
    if !stopping {
        print_addresses(&gw, plain);
        shutdown.await;
    }
    gw.stop().await;
    Ok(())
}

/// Prints where the gateway serves (and the files an operator needs).
fn print_addresses(gw: &Gateway, plain: bool) {
    // Whoever started us may have stopped reading stdout; that is no reason to stop.
    let mut out: Box<dyn std::io::Write> = if plain {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::sink())
    };
    let _ = writeln!(
        out,
        "entente gateway: REST on http://{}  peers on {}",
        gw.http_addr, gw.raft_addr
    );
    let devices: Vec<String> = [gw.mqtt_addr, gw.mqtt5_addr]
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    if !devices.is_empty() {
        let _ = writeln!(
            out,
            "devices (MQTT 3.1.1 and 5) on {}",
            devices.join(" and ")
        );
    }
    if let Some(addr) = gw.mqtt_tls_addr {
        let _ = writeln!(out, "devices over TLS (MQTT 3.1.1 and 5) on {addr}");
    }
    if let Some(f) = &gw.cluster_secret_file {
        let _ = writeln!(out, "cluster secret: {} (generated)", f.display());
    }
    if let Some(f) = &gw.admin_token_file {
        let _ = writeln!(out, "{}", admin_token_line(f));
    }
    let _ = out.flush();
}

#[cfg(test)]
mod engine_record_tests {
    use super::*;

    #[test]
    fn a_data_directory_keeps_the_engine_it_was_created_with() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A new directory takes the engine it is started with, again and again.
        check_engine_record(dir.path(), EngineKind::MultiPaxos).expect("new directory");
        check_engine_record(dir.path(), EngineKind::MultiPaxos).expect("same engine");
        let err = check_engine_record(dir.path(), EngineKind::Raft)
            .expect_err("another engine is refused")
            .to_string();
        assert!(
            err.contains("\"multi-paxos\"") && err.contains("--consensus raft"),
            "{err}"
        );
        // A log without a record was written by Raft (before the record).
        let old = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(old.path().join("raft")).expect("log dir");
        let err = check_engine_record(old.path(), EngineKind::BasicPaxos)
            .expect_err("a Raft log is not read by Paxos")
            .to_string();
        assert!(err.contains("\"raft\""), "{err}");
        check_engine_record(old.path(), EngineKind::Raft).expect("Raft reads its own log");
        assert_eq!(
            std::fs::read_to_string(old.path().join(ENGINE_RECORD)).expect("record"),
            "raft\n"
        );
    }
}
