//! An in-memory driver for any consensus engine (Raft by default): durable
//! state kept in memory, a state machine that records every applied entry,
//! and a network that passes messages directly. For tests, simulations,
//! benchmarks and as a compact example of the [`Ready`](crate::ready::Ready)
//! contract.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::engine::{Engine, EngineMessage};
use crate::raft::{
    CompactError, Config, ConfigError, Entry, EntryPayload, HardState, Index, InitialState,
    Message, NodeId, Raft, SnapshotMeta, StepError, Term,
};
use crate::ready::{Certificate, ReadState, Ready};

/// The state machine of the in-memory driver: every applied normal entry,
/// with its index, in order.
pub type Applied = Vec<(Index, Vec<u8>)>;

/// What a node has made durable. Survives [`MemNode::crash`].
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    /// The durable hard state.
    pub hard_state: HardState,
    /// The durable snapshot's metadata.
    pub snapshot: SnapshotMeta,
    /// The state machine image of the snapshot.
    pub snapshot_image: Arc<Applied>,
    /// Durable entries after the snapshot.
    pub entries: Vec<Entry>,
}

impl MemStorage {
    /// Storage of a brand new member of a group of `voters`.
    pub fn bootstrap(voters: &[NodeId]) -> Self {
        let init = InitialState::bootstrap(voters.iter().copied());
        MemStorage {
            snapshot: init.snapshot,
            ..MemStorage::default()
        }
    }

    /// What the core restarts from.
    pub fn initial_state(&self) -> InitialState {
        InitialState {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
            applied: self.snapshot.index,
        }
    }

    /// Appends entries, dropping any stored at or after the first new index.
    ///
    /// # Panics
    ///
    /// If the entries would leave a gap — after the last stored entry, or
    /// between each other —, as the durable storage refuses them (fatally
    /// for its node): an engine must never ask for that, and the tests that
    /// run on this storage must notice when one does.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(
            first.index <= self.last_index() + 1,
            "entries from {} after a log that ends at {}: a gap",
            first.index,
            self.last_index()
        );
        assert!(
            entries.windows(2).all(|w| w[1].index == w[0].index + 1),
            "entries that are not consecutive: a gap"
        );
        let keep = first.index.saturating_sub(self.snapshot.index + 1) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Replaces everything with a snapshot.
    pub fn install_snapshot(&mut self, meta: SnapshotMeta, image: Arc<Applied>) {
        self.entries.retain(|e| e.index > meta.index);
        if self
            .entries
            .first()
            .is_some_and(|e| e.index != meta.index + 1)
        {
            self.entries.clear();
        }
        self.snapshot = meta;
        self.snapshot_image = image;
    }

    /// Index of the last durable entry.
    pub fn last_index(&self) -> Index {
        self.entries.last().map_or(self.snapshot.index, |e| e.index)
    }
}

/// A message together with the snapshot image it carries, if it installs a
/// snapshot ([`EngineMessage::snapshot`]).
#[derive(Clone, Debug)]
pub struct Envelope<M = Message> {
    /// The message.
    pub msg: M,
    /// The snapshot image for snapshot messages.
    pub image: Option<Arc<Applied>>,
}

/// One node: an engine, its durable storage and its state machine.
#[derive(Debug)]
pub struct MemNode<E: Engine = Raft> {
    raft: E,
    storage: MemStorage,
    applied: Applied,
    read_states: Vec<ReadState>,
    received_images: BTreeMap<(Index, Term), Arc<Applied>>,
    certificates: Vec<Certificate>,
}

impl MemNode<Raft> {
    /// A new member of a group of `voters` (empty for a node to be added later).
    pub fn new(cfg: Config, voters: &[NodeId]) -> Result<Self, ConfigError> {
        Self::restart(cfg, MemStorage::bootstrap(voters))
    }

    /// A node restarting from what it had made durable.
    pub fn restart(cfg: Config, storage: MemStorage) -> Result<Self, ConfigError> {
        Self::start(storage, |init| Raft::new(cfg, init))
    }

    /// The configuration the node was started with.
    pub fn config(&self) -> &Config {
        self.raft.config()
    }
}

impl<E: Engine> MemNode<E> {
    /// A node (re)starting from `storage`, its engine built by `build` from
    /// what the storage kept.
    pub fn start<Err>(
        storage: MemStorage,
        build: impl FnOnce(InitialState) -> Result<E, Err>,
    ) -> Result<Self, Err> {
        let raft = build(storage.initial_state())?;
        let applied = storage.snapshot_image.as_ref().clone();
        Ok(MemNode {
            raft,
            storage,
            applied,
            read_states: Vec::new(),
            received_images: BTreeMap::new(),
            certificates: Vec::new(),
        })
    }

    /// Stops the node, keeping only what was durable.
    pub fn crash(self) -> MemStorage {
        self.storage
    }

    /// The engine.
    pub fn raft(&self) -> &E {
        &self.raft
    }

    /// The engine, to feed inputs.
    pub fn raft_mut(&mut self) -> &mut E {
        &mut self.raft
    }

    /// The engine (the same as [`MemNode::raft`]).
    pub fn engine(&self) -> &E {
        &self.raft
    }

    /// The engine, to feed inputs (the same as [`MemNode::raft_mut`]).
    pub fn engine_mut(&mut self) -> &mut E {
        &mut self.raft
    }

    /// The durable state.
    pub fn storage(&self) -> &MemStorage {
        &self.storage
    }

    /// The state machine: every applied normal entry.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// Every read that became safe, in order (served once applied).
    pub fn read_states(&self) -> &[ReadState] {
        &self.read_states
    }

    /// Feeds a message (keeping the snapshot image it carries). A snapshot
    /// message without its image is dropped (see [`MemNode::envelopes`]);
    /// the leader sends a new one.
    pub fn step(&mut self, env: Envelope<E::Message>) -> Result<(), StepError> {
        if let Some(meta) = env.msg.snapshot() {
            let Some(image) = env.image else {
                return Ok(());
            };
            self.received_images.insert((meta.index, meta.term), image);
        }
        self.raft.step(env.msg)
    }

    /// Wraps outgoing messages, attaching this node's snapshot image to
    /// snapshot messages. A snapshot message asked for before the node
    /// compacted again refers to an image that is gone: it gets none (the
    /// stored image is of another index and must not be installed under it).
    pub fn envelopes(&self, msgs: Vec<E::Message>) -> Vec<Envelope<E::Message>> {
        let stored = &self.storage.snapshot;
        msgs.into_iter()
            .map(|msg| {
                let image = msg
                    .snapshot()
                    .is_some_and(|meta| meta.index == stored.index && meta.term == stored.term)
                    .then(|| self.storage.snapshot_image.clone());
                Envelope { msg, image }
            })
            .collect()
    }

    /// Step 2 and 3 of the [`Ready`] contract: install the snapshot and make
    /// entries and hard state durable.
    pub fn persist(&mut self, rd: &Ready<E::Message>) {
        if let Some(meta) = &rd.snapshot {
            let image = self
                .received_images
                .remove(&(meta.index, meta.term))
                .unwrap_or_default();
            self.received_images.clear();
            self.applied = image.as_ref().clone();
            // The core replaced its whole log with the snapshot (§7: discard
            // the entire log); stored entries after it may conflict with the
            // leader's and must not come back after a restart.
            self.storage.entries.clear();
            self.storage.install_snapshot(meta.clone(), image);
        }
        self.storage.append(&rd.entries);
        if let Some(hs) = rd.hard_state {
            self.storage.hard_state = hs;
        }
    }

    /// Step 5 of the [`Ready`] contract: apply committed entries.
    pub fn apply(&mut self, rd: &Ready<E::Message>) {
        for e in &rd.committed_entries {
            if let EntryPayload::Normal(data) = &e.payload {
                self.applied.push((e.index, data.to_vec()));
            }
        }
        self.read_states.extend(rd.read_states.iter().cloned());
    }

    /// Every commit certificate the engine assembled, in order.
    pub fn certificates(&self) -> &[Certificate] {
        &self.certificates
    }

    /// Runs one whole `ready` / `advance` cycle if there is work, and
    /// returns the messages to deliver, in the order they may leave.
    /// Takes the engine's commit certificates too.
    pub fn handle_ready(&mut self) -> Vec<Envelope<E::Message>> {
        self.certificates.extend(self.raft.take_certificates());
        if !self.raft.has_ready() {
            return Vec::new();
        }
        let mut rd = self.raft.ready();
        let mut out = std::mem::take(&mut rd.messages);
        self.persist(&rd);
        out.append(&mut rd.persisted_messages);
        self.apply(&rd);
        self.raft.advance();
        self.envelopes(out)
    }

    /// Takes a snapshot of the state machine at the applied index and
    /// compacts the log behind it.
    pub fn snapshot_and_compact(&mut self) -> Result<SnapshotMeta, CompactError> {
        let index = self.raft.applied_index();
        self.snapshot_and_compact_at(index)
    }

    /// Takes a snapshot of the state machine at the applied `index` and
    /// compacts the log behind it (PBFT compacts only at its stable
    /// checkpoint).
    pub fn snapshot_and_compact_at(&mut self, index: Index) -> Result<SnapshotMeta, CompactError> {
        let meta = self.raft.compact_keeping(index, 0)?;
        let image: Applied = self
            .applied
            .iter()
            .filter(|(i, _)| *i <= index)
            .cloned()
            .collect();
        self.storage.install_snapshot(meta.clone(), Arc::new(image));
        Ok(meta)
    }
}

/// A set of [`MemNode`]s and a network between them that delivers messages
/// at once, unless a link is cut or a message kind is ignored.
#[derive(Debug)]
pub struct Network<E: Engine = Raft> {
    nodes: BTreeMap<NodeId, MemNode<E>>,
    cut: BTreeSet<(NodeId, NodeId)>,
    ignored: BTreeSet<&'static str>,
    /// Every message delivered, in order (for assertions).
    delivered: Vec<E::Message>,
}

impl<E: Engine> Default for Network<E> {
    fn default() -> Self {
        Network {
            nodes: BTreeMap::new(),
            cut: BTreeSet::new(),
            ignored: BTreeSet::new(),
            delivered: Vec::new(),
        }
    }
}

impl<E: Engine> Network<E> {
    /// A new group of `ids`, all voters, each engine built by `build` from
    /// its node id and its (bootstrap) initial state.
    pub fn with_engines<Err: std::fmt::Display>(
        ids: &[NodeId],
        build: impl Fn(NodeId, InitialState) -> Result<E, Err>,
    ) -> Self {
        let mut net = Network::default();
        for &id in ids {
            let node = MemNode::start(MemStorage::bootstrap(ids), |init| build(id, init))
                .unwrap_or_else(|e| panic!("engine of {id}: {e}"));
            net.nodes.insert(id, node);
        }
        net
    }
}

impl Network<Raft> {
    /// A new group of `ids`, all voters, configured by `cfg`.
    pub fn new(ids: &[NodeId], cfg: impl Fn(NodeId) -> Config) -> Self {
        let mut net = Network::default();
        for &id in ids {
            let node = MemNode::new(cfg(id), ids).unwrap_or_else(|e| panic!("config of {id}: {e}"));
            net.nodes.insert(id, node);
        }
        net
    }

    /// A new group of `ids` with [`Config::new`] defaults and pre-vote and
    /// check-quorum off, as in the Raft paper.
    pub fn paper(ids: &[NodeId]) -> Self {
        Self::new(ids, |id| Config {
            pre_vote: false,
            check_quorum: false,
            ..Config::new(id)
        })
    }
}

impl<E: Engine> Network<E> {
    /// Adds (or replaces) a node.
    pub fn insert(&mut self, node: MemNode<E>) {
        self.nodes.insert(node.raft().id(), node);
    }

    /// Removes a node, returning it.
    pub fn remove(&mut self, id: NodeId) -> Option<MemNode<E>> {
        self.nodes.remove(&id)
    }

    /// The ids of all nodes.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// A node.
    ///
    /// # Panics
    /// If there is no node `id`.
    pub fn node(&self, id: NodeId) -> &MemNode<E> {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// A node, mutably.
    ///
    /// # Panics
    /// If there is no node `id`.
    pub fn node_mut(&mut self, id: NodeId) -> &mut MemNode<E> {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The core of a node.
    pub fn raft(&self, id: NodeId) -> &E {
        self.node(id).raft()
    }

    /// The core of a node, mutably.
    pub fn raft_mut(&mut self, id: NodeId) -> &mut E {
        self.node_mut(id).raft_mut()
    }

    /// Drops messages both ways between `a` and `b`.
    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    /// Drops messages from `from` to `to` only.
    pub fn cut_one_way(&mut self, from: NodeId, to: NodeId) {
        self.cut.insert((from, to));
    }

    /// Cuts `id` off from every other node.
    pub fn isolate(&mut self, id: NodeId) {
        for other in self.ids() {
            if other != id {
                self.cut(id, other);
            }
        }
    }

    /// Drops every message of this kind (see [`EngineMessage::name`]).
    pub fn ignore(&mut self, kind: &'static str) {
        self.ignored.insert(kind);
    }

    /// Heals every cut and stops ignoring message kinds.
    pub fn recover(&mut self) {
        self.cut.clear();
        self.ignored.clear();
    }

    /// Every message delivered so far.
    pub fn delivered(&self) -> &[E::Message] {
        &self.delivered
    }

    /// Forgets the delivered messages.
    pub fn clear_delivered(&mut self) {
        self.delivered.clear();
    }

    fn passes(&self, m: &E::Message) -> bool {
        self.nodes.contains_key(&m.to())
            && !self.cut.contains(&(m.from(), m.to()))
            && !self.ignored.contains(m.name())
    }

    /// Delivers `msgs` and everything they cause, until no node has work.
    pub fn deliver(&mut self, msgs: Vec<Envelope<E::Message>>) {
        let mut queue: std::collections::VecDeque<Envelope<E::Message>> = msgs.into();
        loop {
            while let Some(env) = queue.pop_front() {
                if !self.passes(&env.msg) {
                    continue;
                }
                self.delivered.push(env.msg.clone());
                let to = env.msg.to();
                if let Some(node) = self.nodes.get_mut(&to) {
                    let _ = node.step(env);
                }
            }
            let mut any = false;
            for node in self.nodes.values_mut() {
                let out = node.handle_ready();
                // `advance` may leave more work without sending anything (a
                // leader of one commits when its own entry is durable).
                any |= !out.is_empty() || node.raft().has_ready();
                queue.extend(out);
            }
            if !any && queue.is_empty() {
                break;
            }
        }
    }

    /// Processes every node's pending work and delivers the results.
    pub fn stabilize(&mut self) {
        self.deliver(Vec::new());
    }

    /// Ticks node `id` `n` times, delivering whatever that causes.
    pub fn tick(&mut self, id: NodeId, n: u32) {
        for _ in 0..n {
            self.raft_mut(id).tick();
            self.stabilize();
        }
    }

    /// Ticks every node once, delivering whatever that causes.
    pub fn tick_all(&mut self) {
        for id in self.ids() {
            self.raft_mut(id).tick();
        }
        self.stabilize();
    }

    /// Makes `id` campaign and delivers the election's messages.
    pub fn campaign(&mut self, id: NodeId) {
        self.raft_mut(id).campaign();
        self.stabilize();
    }

    /// Proposes `data` at `id` and delivers everything that follows.
    pub fn propose(
        &mut self,
        id: NodeId,
        data: &[u8],
    ) -> Result<crate::raft::Proposed, crate::raft::ProposeError> {
        let r = self.raft_mut(id).propose(data.to_vec());
        self.stabilize();
        r
    }

    /// The leader among the nodes with the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.raft().role() == crate::types::Role::Leader)
            .max_by_key(|n| n.raft().term())
            .map(|n| n.raft().id())
    }
}
