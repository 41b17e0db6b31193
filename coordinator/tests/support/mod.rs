//! The in-process harness the node driver's tests share, whatever the
//! engine: a peer channel between nodes of one process ([`Hub`]), a
//! state machine that logs the strings it applies ([`Log`]) and a way to
//! start a node on real storage in a directory ([`start_node`]). (Each
//! test binary uses a different part of it.)
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use consensus::engine::EngineMessage;
use coordinator::image::{ImageReader, SnapshotImage, StagedImage};
use coordinator::node::{
    BoxError, BuildEngine, Committed, Inbound, LogStore, Node, NodeConfig, PeerSender,
    SnapshotView, StateMachine,
};
use coordinator::raft::{ConfState, Index, NodeId, SnapshotMeta};
use coordinator::storage::{Storage, StorageOptions};
use coordinator::transport::PeerStatus;
use tokio::sync::mpsc;

/// A message the hub loses on the way, without telling its sender.
type Lose<M> = Box<dyn Fn(&M) -> bool + Send + Sync>;

/// Routes an engine's messages (`M`) between in-process nodes.
///
/// A message to or from a node in `down` is not delivered, and its sender
/// is told the recipient is unreachable, as it is when the recipient's
/// queue is missing or full. Snapshot images are copied, so the receiver
/// owns its file as it would over the network. A message the hub was built
/// to lose ([`Hub::losing`]) vanishes silently.
pub struct Hub<M> {
    /// Each node's inbound queue.
    pub routes: Mutex<BTreeMap<NodeId, mpsc::Sender<Inbound<M>>>>,
    /// Nodes cut off: nothing from or to them is delivered.
    pub down: Mutex<BTreeSet<NodeId>>,
    lose: Option<Lose<M>>,
}

impl<M> Default for Hub<M> {
    fn default() -> Self {
        Hub {
            routes: Mutex::default(),
            down: Mutex::default(),
            lose: None,
        }
    }
}

impl<M> Hub<M> {
    /// A hub that loses every message `lose` picks.
    pub fn losing(lose: impl Fn(&M) -> bool + Send + Sync + 'static) -> Self {
        Hub {
            lose: Some(Box::new(lose)),
            ..Hub::default()
        }
    }

    fn cut(&self, a: NodeId, b: NodeId) -> bool {
        let down = self.down.lock().expect("down");
        down.contains(&a) || down.contains(&b)
    }
}

/// One node's end of a [`Hub`].
pub struct HubSender<M> {
    hub: Arc<Hub<M>>,
    from: NodeId,
}

impl<M> HubSender<M> {
    /// Node `from`'s end of `hub`.
    pub fn new(hub: &Arc<Hub<M>>, from: NodeId) -> Self {
        HubSender {
            hub: hub.clone(),
            from,
        }
    }

    fn route(&self, to: NodeId, inbound: Inbound<M>) -> bool {
        let tx = self.hub.routes.lock().expect("routes").get(&to).cloned();
        tx.is_some_and(|tx| tx.try_send(inbound).is_ok())
    }
}

impl<M: EngineMessage> PeerSender<M> for HubSender<M> {
    fn send(&self, msg: M) {
        if self.hub.lose.as_ref().is_some_and(|lose| lose(&msg)) {
            return;
        }
        let to = msg.to();
        if self.hub.cut(self.from, to) || !self.route(to, Inbound::Message(msg)) {
            self.route(self.from, Inbound::Unreachable(to));
        }
    }

    fn send_snapshot(&self, msg: M, image: SnapshotImage) {
        let to = msg.to();
        // The receiver gets its own copy of the file, as over the network.
        let copy = || -> std::io::Result<StagedImage> {
            let mut staged = StagedImage::create_in(&std::env::temp_dir())?;
            std::io::copy(&mut image.open()?, &mut staged)?;
            staged.seal()?;
            Ok(staged)
        };
        let ok = !self.hub.cut(self.from, to)
            && match copy() {
                Ok(image) => self.route(to, Inbound::Snapshot { msg, image }),
                Err(_) => false,
            };
        self.route(self.from, Inbound::SnapshotStatus { to, ok });
    }

    fn send_status(&self, to: NodeId, status: PeerStatus) {
        // Best effort, as over the network: lost when cut off, never
        // reported.
        if !self.hub.cut(self.from, to) {
            self.route(to, Inbound::Status(status));
        }
    }
}

/// Opens node `id`'s storage in `dir/<id>` (a group of `voters` if it is
/// new), joins it to `hub` and starts engine `E` on it with `cfg` and `sm`.
pub async fn start_node<E, S>(
    hub: &Arc<Hub<E::Message>>,
    dir: &std::path::Path,
    id: NodeId,
    voters: &[NodeId],
    cfg: NodeConfig,
    sm: S,
) -> Node<S::Output>
where
    E: BuildEngine,
    E::Message: EngineMessage,
    S: StateMachine,
    S::Output: Send + 'static,
{
    start_node_on::<E, _, _>(hub, dir, id, voters, cfg, sm, |s| s).await
}

/// [`start_node`] on the storage as `wrap` wraps it.
pub async fn start_node_on<E, S, L>(
    hub: &Arc<Hub<E::Message>>,
    dir: &std::path::Path,
    id: NodeId,
    voters: &[NodeId],
    cfg: NodeConfig,
    sm: S,
    wrap: impl FnOnce(Storage) -> L,
) -> Node<S::Output>
where
    E: BuildEngine,
    E::Message: EngineMessage,
    S: StateMachine,
    S::Output: Send + 'static,
    L: LogStore,
{
    let (storage, rec) =
        Storage::open(dir.join(id.to_string()), StorageOptions::default()).expect("open");
    let init = rec.into_initial_state(ConfState::with_voters(voters.iter().copied()));
    let (tx, rx) = mpsc::channel(4096);
    hub.routes.lock().expect("routes").insert(id, tx);
    let peers = Arc::new(HubSender::new(hub, id));
    Node::start::<E, _, _, _>(cfg, init, wrap(storage), peers, rx, sm)
        .await
        .expect("start")
}

/// A log of applied strings; the output of each apply is its position.
#[derive(Default, Clone)]
pub struct Log(pub Arc<Mutex<(Vec<String>, Index)>>, pub Gates);

/// Ways for a test to hold the state machine up: while a test holds a
/// gate's write lock, applying (or writing a snapshot image) waits.
#[derive(Default, Clone)]
pub struct Gates {
    /// Held up: applying.
    pub apply: Arc<tokio::sync::RwLock<()>>,
    /// Held up: writing a snapshot image.
    pub snapshot: Arc<tokio::sync::RwLock<()>>,
    /// Snapshot views taken.
    pub views: Arc<AtomicUsize>,
}

impl StateMachine for Log {
    type Output = usize;

    fn applied_index(&self) -> Index {
        self.0.lock().expect("log").1
    }

    async fn apply(
        &mut self,
        entries: Vec<Committed>,
        last: Index,
    ) -> Result<Vec<usize>, BoxError> {
        drop(self.1.apply.read().await);
        let mut g = self.0.lock().expect("log");
        let mut out = Vec::new();
        for e in entries {
            g.0.push(String::from_utf8(e.data.to_vec())?);
            out.push(g.0.len());
        }
        g.1 = last;
        Ok(out)
    }

    type Snapshot = LogView;

    async fn snapshot(&mut self) -> Result<LogView, BoxError> {
        self.1.views.fetch_add(1, Ordering::SeqCst);
        let g = self.0.lock().expect("log");
        Ok(LogView(
            g.0.join("\n").into_bytes(),
            g.1,
            self.1.snapshot.clone(),
        ))
    }

    async fn restore(
        &mut self,
        meta: &SnapshotMeta,
        mut image: ImageReader,
    ) -> Result<(), BoxError> {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut image, &mut data)?;
        let text = String::from_utf8(data)?;
        let items = if text.is_empty() {
            Vec::new()
        } else {
            text.split('\n').map(String::from).collect()
        };
        *self.0.lock().expect("log") = (items, meta.index);
        Ok(())
    }
}

/// The log as of its applied index, written out later (once the snapshot
/// gate lets it).
pub struct LogView(Vec<u8>, Index, Arc<tokio::sync::RwLock<()>>);

impl SnapshotView for LogView {
    async fn write_to(self, dest: std::path::PathBuf) -> Result<Index, BoxError> {
        drop(self.2.read().await);
        std::fs::write(dest, &self.0)?;
        Ok(self.1)
    }
}
