//! The node driver: runs one Raft core on tokio with durable storage, a peer
//! transport and an application state machine.
//!
//! One task owns the core (and is the only one that touches it). It ticks on
//! an interval, feeds inbound messages, and for every [`Ready`] sends what may
//! leave at once, persists entries and hard state (one fsync for everything
//! that queued up while the previous one ran: group commit), sends what
//! depended on the persist, applies committed entries to the
//! [`StateMachine`], and advances.
//!
//! The embedding service talks to the task through a [`Node`] handle:
//! [`Node::propose`] resolves once the entry is applied, with the state
//! machine's output; [`Node::read_index`] resolves once a linearizable read
//! may be served from local state; membership changes, leadership transfer
//! and status complete the API.
//!
//! Proposals carry a small header naming the node and the request, so the
//! node that proposed an entry recognises it when it is applied, whether the
//! core appended it locally or forwarded it to the leader.
//!
//! # Messages from non-members
//!
//! The transport authenticates the cluster secret, not membership. The
//! driver hands the core a message only if its sender is a voter or a
//! learner of this node's current configuration; everything else —
//! forwarded proposals and membership changes, reads, transfers, votes,
//! appends, responses — is refused, counted
//! ([`NodeStatus::refused_non_member`]) and logged (at most 10 warnings per
//! 10 s, naming the sender). Two exceptions keep membership changes live,
//! and both concern only a leader's traffic (appends, heartbeats,
//! snapshots) to a node that is not itself leading: a node its own
//! configuration does not list (none yet — started to be added to a running
//! group —, or removed) takes it from whoever leads, and so does a follower that has known no leader for
//! [`STRANGER_LEADER_TIMEOUTS`] election timeouts, or already follows that
//! sender (a member that was down while a node was added comes back when
//! that node leads). Membership changes are single-server, so there are no
//! outgoing voters of a joint configuration to keep.
//!
//! # A removed node learns it
//!
//! Once a node's removal commits, the leader stops replicating to it, so it
//! may never learn of it from the log: a removed voter would campaign (in
//! vain: members refuse it, and pre-vote keeps its term from growing)
//! forever. So a member that refuses a message from a node its
//! configuration does not list answers with [`MessageKind::NotMember`]
//! carrying its commit index (at most once a second per sender), and each
//! member that applies a node's removal tells that node once. The core
//! believes it only if the sender has committed more of the log than it
//! has ([`Raft::removed`]): then it stands down and campaigns no more. A
//! node that is removed, or that its own configuration does not list (none
//! yet, or its removal applied), takes a leader's appends, heartbeats and
//! snapshots from whoever leads, so once an operator adds it again it
//! catches up. [`NodeStatus::raft`]`.removed` and the configuration tell
//! the embedder; the driver logs each change of this node's membership.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::raft::{
    ConfChange, ConfState, Entry, EntryPayload, HardState, Index, InitialState, Message,
    MessageKind, NodeId, ProposeError, Proposed, Raft, Ready, Role, SnapshotMeta, Status, Term,
};
use crate::transport::gate::{LogLimiter, RepeatLimiter};

/// An error from storage or the state machine, boxed at the boundary.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The durable storage the driver needs (the consumer declares its interface).
/// Calls happen on a blocking thread, one at a time.
pub trait LogStore: Send + 'static {
    /// Writes entries, replacing any stored at or after the first one's index.
    fn append(&mut self, entries: &[Entry]) -> Result<(), BoxError>;
    /// Records the hard state; term and vote changes must be durable once
    /// [`LogStore::sync`] returns.
    fn set_hard_state(&mut self, hs: HardState) -> Result<(), BoxError>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), BoxError>;
    /// Stores a snapshot image durably.
    fn save_snapshot(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), BoxError>;
    /// Drops log entries at or below `index`.
    fn compact(&mut self, index: Index) -> Result<(), BoxError>;
    /// The latest snapshot, if any.
    fn load_snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, BoxError>;
    /// Makes everything durable, including a hard state whose write was
    /// deferred; called on graceful shutdown.
    fn flush(&mut self) -> Result<(), BoxError> {
        self.sync()
    }
}

/// Where outgoing messages go (the consumer declares its interface). Neither
/// call may block.
pub trait PeerSender: Send + Sync + 'static {
    /// Sends one message to `msg.to`.
    fn send(&self, msg: Message);
    /// Sends a snapshot message with its image.
    fn send_snapshot(&self, msg: Message, data: Arc<Vec<u8>>);
}

pub use crate::transport::Inbound;

/// A committed entry handed to the state machine.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Its log index.
    pub index: Index,
    /// The term it was proposed in.
    pub term: Term,
    /// The application bytes.
    pub data: Vec<u8>,
}

/// The application's replicated state machine.
pub trait StateMachine: Send + 'static {
    /// What applying one entry yields to its proposer.
    type Output: Send + 'static;

    /// The highest index already applied (durably) — entries at or below it
    /// are not handed over again.
    fn applied_index(&self) -> Index;

    /// Applies `entries` in order, and records that everything up to
    /// `last_index` (which may be beyond the last entry, for entries that
    /// carried no application data) is applied. Returns one output per entry.
    fn apply(
        &mut self,
        entries: Vec<Committed>,
        last_index: Index,
    ) -> impl Future<Output = Result<Vec<Self::Output>, BoxError>> + Send;

    /// An image of the state as of [`StateMachine::applied_index`].
    fn snapshot(&mut self) -> impl Future<Output = Result<Vec<u8>, BoxError>> + Send;

    /// Replaces the whole state with a snapshot image. An empty image at
    /// index 0 stands for the initial, empty state.
    fn restore(
        &mut self,
        meta: &SnapshotMeta,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Settings of the driver.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The core's settings (its id is this node's id).
    pub raft: crate::raft::Config,
    /// Length of one tick.
    pub tick: Duration,
    /// Take a snapshot after this many entries applied since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for slightly slow followers.
    pub snapshot_keep: u64,
    /// How long a proposal, read or membership change may take before it
    /// fails with [`NodeError::Timeout`].
    pub request_timeout: Duration,
}

impl NodeConfig {
    /// Defaults: 20 ms ticks, elections after 200–400 ms of silence,
    /// heartbeats every 40 ms, a snapshot every 10,000 entries.
    pub fn new(id: NodeId) -> Self {
        let raft = crate::raft::Config {
            election_tick: 10,
            heartbeat_tick: 2,
            ..crate::raft::Config::new(id)
        };
        NodeConfig {
            raft,
            tick: Duration::from_millis(20),
            snapshot_every: 10_000,
            snapshot_keep: 1_000,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a request to the node failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    /// No leader is known, so the request could not be placed.
    #[error("no leader is known; the group may be electing one or have lost its quorum")]
    NoLeader,
    /// Only the leader takes this request; `leader` is the one known, if any.
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader.
        leader: Option<NodeId>,
    },
    /// The request did not complete in time; it may still take effect.
    #[error("timed out; the request may or may not take effect")]
    Timeout,
    /// The leader the proposal went to (or this node's own leadership) was
    /// lost while it was in flight, and it was not applied within an
    /// election timeout after: it may or may not still take effect.
    #[error(
        "the leader changed or was lost while the request was in flight; it may or may not take \
         effect"
    )]
    OutcomeUnknown,
    /// The entry was overwritten by a new leader; it did not take effect.
    #[error("leadership changed before the entry committed; it did not take effect")]
    Dropped,
    /// The core refused the request.
    #[error("refused: {0}")]
    Refused(String),
    /// The node is shutting down or has stopped.
    #[error("the node is shut down")]
    Shutdown,
    /// Storage or the state machine failed; the node stopped.
    #[error("the node stopped after a fatal error: {0}")]
    Fatal(String),
}

/// A proposal that was applied.
#[derive(Debug)]
pub struct Applied<O> {
    /// The log index it was applied at.
    pub index: Index,
    /// What the state machine returned.
    pub output: O,
}

/// What the driver publishes after each cycle.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// The core's status.
    pub raft: Status,
    /// Number of fsyncs (calls to [`LogStore::sync`]) so far.
    pub syncs: u64,
    /// Number of entries persisted so far.
    pub entries_persisted: u64,
    /// Messages refused because their sender is not a member of this
    /// node's configuration (see the [module documentation](self)).
    pub refused_non_member: u64,
    /// Set once the driver stopped after a fatal error.
    pub fatal: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

enum Command<O> {
    Propose(Vec<u8>, Reply<Applied<O>>),
    ReadIndex(Reply<Index>),
    ConfChange(ConfChange, bool, Reply<Index>),
    Transfer(NodeId, Reply<()>),
    Shutdown,
}

/// Handle to a running node. Cheap to clone.
#[derive(Debug)]
pub struct Node<O> {
    cmd: mpsc::Sender<Command<O>>,
    status: watch::Receiver<NodeStatus>,
    timeout: Duration,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl<O> Clone for Node<O> {
    fn clone(&self) -> Self {
        Node {
            cmd: self.cmd.clone(),
            status: self.status.clone(),
            timeout: self.timeout,
            task: self.task.clone(),
        }
    }
}

impl<O> std::fmt::Debug for Command<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Propose(..) => "Propose",
            Command::ReadIndex(..) => "ReadIndex",
            Command::ConfChange(..) => "ConfChange",
            Command::Transfer(..) => "Transfer",
            Command::Shutdown => "Shutdown",
        })
    }
}

/// A follower that has known no leader for this many (minimum) election
/// timeouts takes a leader's traffic from a node its configuration does not
/// list.
pub const STRANGER_LEADER_TIMEOUTS: u64 = 10;
/// A refused sender is told it is not a member at most this often.
const NOT_MEMBER_EVERY: Duration = Duration::from_secs(1);
/// Senders remembered for [`NOT_MEMBER_EVERY`] (the table is cleared when
/// it is full).
const NOT_MEMBER_SENDERS: usize = 1024;
/// The longest reason of a leader's refusal of a forwarded membership
/// change that is passed on (in bytes).
const REFUSAL_REASON_MAX: usize = 1024;
/// Warnings about refused messages: at most this many per window.
const REFUSAL_LOG_BURST: u32 = 10;
/// See [`REFUSAL_LOG_BURST`].
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
/// And from one sender (a removed member that keeps campaigning, say) at
/// most one warning per this.
const REFUSAL_LOG_PER_PEER: Duration = Duration::from_secs(60);

/// The proposal header: node id, incarnation, sequence number.
const HEADER: usize = 24;

fn encode_proposal(node: NodeId, incarnation: u64, seq: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + data.len());
    v.extend_from_slice(&node.to_be_bytes());
    v.extend_from_slice(&incarnation.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn decode_proposal(bytes: &[u8]) -> Option<(NodeId, u64, u64, &[u8])> {
    if bytes.len() < HEADER {
        return None;
    }
    let n = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[r]);
        u64::from_be_bytes(b)
    };
    Some((n(0..8), n(8..16), n(16..24), &bytes[HEADER..]))
}

impl<O: Send + 'static> Node<O> {
    /// Starts a node from what its storage recovered. `inbound` is the
    /// transport's receiving end. If the state machine is behind the latest
    /// snapshot it is restored from it first.
    pub async fn start<S, P, M>(
        cfg: NodeConfig,
        recovered: InitialState,
        storage: S,
        peers: Arc<P>,
        inbound: mpsc::Receiver<Inbound>,
        mut sm: M,
    ) -> Result<Node<O>, NodeError>
    where
        S: LogStore,
        P: PeerSender,
        M: StateMachine<Output = O>,
    {
        let mut init = recovered;
        if sm.applied_index() < init.snapshot.index {
            let snap = storage
                .load_snapshot()
                .map_err(|e| NodeError::Fatal(e.to_string()))?;
            match snap {
                Some((meta, data)) if meta.index == init.snapshot.index => {
                    sm.restore(&meta, data)
                        .await
                        .map_err(|e| NodeError::Fatal(e.to_string()))?;
                }
                _ => {
                    return Err(NodeError::Fatal(format!(
                        "the log starts after snapshot {} but the snapshot image is missing",
                        init.snapshot.index
                    )));
                }
            }
        }
        init.applied = sm.applied_index().max(init.snapshot.index);
        let latest_snapshot = storage
            .load_snapshot()
            .map_err(|e| NodeError::Fatal(e.to_string()))?
            .map(|(m, d)| (m, Arc::new(d)));
        let hard_state = init.hard_state;
        let raft = Raft::new(cfg.raft.clone(), init)
            .map_err(|e| NodeError::Refused(format!("invalid configuration: {e}")))?;
        let listed = raft.conf_state().contains(cfg.raft.id);
        let (cmd_tx, cmd_rx) = mpsc::channel(4096);
        let (status_tx, status_rx) = watch::channel(NodeStatus {
            raft: raft.status(),
            syncs: 0,
            entries_persisted: 0,
            refused_non_member: 0,
            fatal: None,
        });
        let mut incarnation = [0u8; 8];
        getrandom::fill(&mut incarnation).map_err(|e| NodeError::Fatal(e.to_string()))?;
        let driver = Driver {
            id: cfg.raft.id,
            incarnation: u64::from_be_bytes(incarnation),
            raft,
            storage: Some(storage),
            peers,
            sm,
            cfg: cfg.clone(),
            seq: 0,
            proposals: HashMap::new(),
            appended: BTreeMap::new(),
            reads: HashMap::new(),
            reads_waiting_apply: Vec::new(),
            conf_waiters: BTreeMap::new(),
            transfers: Vec::new(),
            forwarded_confs: Vec::new(),
            incoming_snapshot: None,
            latest_snapshot,
            status: status_tx,
            syncs: 0,
            entries_persisted: 0,
            last_snapshot_index: 0,
            latest_hs: hard_state,
            durable_term_vote: (hard_state.term, hard_state.vote),
            refused_non_member: 0,
            refusal_log: LogLimiter::new(REFUSAL_LOG_WINDOW, REFUSAL_LOG_BURST),
            refusal_log_per_peer: RepeatLimiter::new(REFUSAL_LOG_PER_PEER, 64),
            ticks_without_leader: 0,
            view: (None, 0),
            announced_leader: None,
            announced_conf: ConfState::default(),
            told_not_member: HashMap::new(),
            listed,
        };
        let task = tokio::spawn(driver.run(cmd_rx, inbound));
        Ok(Node {
            cmd: cmd_tx,
            status: status_rx,
            timeout: cfg.request_timeout,
            task: Arc::new(std::sync::Mutex::new(Some(task))),
        })
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command<O>) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(make(tx)).await.map_err(|_| self.stopped())?;
        match tokio::time::timeout(self.timeout + Duration::from_millis(100), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.stopped()),
            Err(_) => Err(NodeError::Timeout),
        }
    }

    /// Why the driver no longer takes requests: its fatal error, if it
    /// stopped on one, else a shutdown.
    fn stopped(&self) -> NodeError {
        match &self.status.borrow().fatal {
            Some(e) => NodeError::Fatal(e.clone()),
            None => NodeError::Shutdown,
        }
    }

    /// Proposes `data`; resolves once it is applied on this node, with the
    /// state machine's output.
    pub async fn propose(&self, data: Vec<u8>) -> Result<Applied<O>, NodeError> {
        self.request(|tx| Command::Propose(data, tx)).await
    }

    /// Waits until a linearizable read may be served from this node's state
    /// machine (ReadIndex, §6.4); returns the index the read observes.
    pub async fn read_index(&self) -> Result<Index, NodeError> {
        self.request(Command::ReadIndex).await
    }

    /// Proposes a membership change; resolves with its index once it is
    /// committed. The leader checks it against the guards of
    /// [`Raft::propose_conf_change_checked`] unless `force` is set (a
    /// promoted learner must be connected and caught up; the voters must
    /// keep an active quorum). On a follower the change is forwarded to the
    /// leader and the request resolves when an equal change commits, or with
    /// [`NodeError::Refused`] and the leader's reason when the leader does
    /// not append it (or times out if neither answer arrives).
    pub async fn change_membership(
        &self,
        change: ConfChange,
        force: bool,
    ) -> Result<Index, NodeError> {
        self.request(|tx| Command::ConfChange(change, force, tx))
            .await
    }

    /// Hands leadership to `to`; resolves once this node sees `to` lead.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), NodeError> {
        self.request(|tx| Command::Transfer(to, tx)).await
    }

    /// The latest status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every new status.
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// Waits until `applied_index >= index` on this node, or the timeout.
    pub async fn wait_applied(&self, index: Index, timeout: Duration) -> Result<(), NodeError> {
        let mut rx = self.status.clone();
        let wait = rx.wait_for(|s| s.raft.applied >= index || s.fatal.is_some());
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(s)) if s.fatal.is_none() => Ok(()),
            Ok(Ok(s)) => Err(NodeError::Fatal(s.fatal.clone().unwrap_or_default())),
            Ok(Err(_)) => Err(NodeError::Shutdown),
            Err(_) => Err(NodeError::Timeout),
        }
    }

    /// Stops the driver: pending requests fail with [`NodeError::Shutdown`],
    /// and the storage is synced and closed.
    pub async fn shutdown(&self) {
        let _ = self.cmd.send(Command::Shutdown).await;
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

struct PendingProposal<O> {
    reply: Reply<Applied<O>>,
    deadline: Instant,
    /// The leader and term this node knew when it proposed.
    view: (Option<NodeId>, Term),
    /// The leader or term changed since: its fate is unknown, and it is
    /// answered [`NodeError::OutcomeUnknown`] if it is not applied within
    /// an election timeout of the change.
    orphaned: bool,
}

struct Driver<S, P, M: StateMachine> {
    id: NodeId,
    incarnation: u64,
    raft: Raft,
    /// `None` only while a blocking storage call runs.
    storage: Option<S>,
    peers: Arc<P>,
    sm: M,
    cfg: NodeConfig,
    seq: u64,
    proposals: HashMap<u64, PendingProposal<M::Output>>,
    /// Locally appended proposals: index → (term, seq), to fail fast when a
    /// different entry commits at that index.
    appended: BTreeMap<Index, (Term, u64)>,
    reads: HashMap<Vec<u8>, (Reply<Index>, Instant)>,
    reads_waiting_apply: Vec<(Index, Reply<Index>)>,
    conf_waiters: BTreeMap<Index, (Term, Reply<Index>)>,
    transfers: Vec<(NodeId, Reply<()>, Instant)>,
    /// Membership changes forwarded to the leader: answered when an equal
    /// change commits after the request, or with a timeout.
    forwarded_confs: Vec<(ConfChange, Reply<Index>, Instant)>,
    incoming_snapshot: Option<(SnapshotMeta, Vec<u8>)>,
    latest_snapshot: Option<(SnapshotMeta, Arc<Vec<u8>>)>,
    status: watch::Sender<NodeStatus>,
    syncs: u64,
    entries_persisted: u64,
    last_snapshot_index: Index,
    /// The newest hard state handed out by the core.
    latest_hs: HardState,
    /// Term and vote as last synced.
    durable_term_vote: (Term, Option<NodeId>),
    /// Messages refused from non-members so far.
    refused_non_member: u64,
    /// Bounds the warnings about them.
    refusal_log: LogLimiter,
    /// And per sender.
    refusal_log_per_peer: RepeatLimiter<NodeId>,
    /// Ticks since this node last knew a leader (0 while it knows one).
    ticks_without_leader: u64,
    /// The leader and term as last seen by [`Driver::watch_view`].
    view: (Option<NodeId>, Term),
    /// The leader and term last logged (`None`: none known).
    announced_leader: Option<(NodeId, Term)>,
    /// The membership last logged.
    announced_conf: ConfState,
    /// When each refused sender was last told it is not a member.
    told_not_member: HashMap<NodeId, Instant>,
    /// Whether this node's membership, as last logged, lists it (and no
    /// member said it was removed).
    listed: bool,
}

impl<S: LogStore, P: PeerSender, M: StateMachine> Driver<S, P, M> {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command<M::Output>>,
        mut inbound: mpsc::Receiver<Inbound>,
    ) {
        self.last_snapshot_index = self.raft.snapshot_meta().index;
        let mut ticker = tokio::time::interval(self.cfg.tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut inbound_open = true;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.raft.tick();
                    if self.raft.leader().is_some() {
                        self.ticks_without_leader = 0;
                    } else {
                        self.ticks_without_leader = self.ticks_without_leader.saturating_add(1);
                    }
                    self.watch_view();
                    self.expire(Instant::now());
                }
                cmd = cmds.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(c) => self.handle_command(c),
                },
                msg = inbound.recv(), if inbound_open => match msg {
                    Some(m) => self.handle_inbound(m),
                    None => inbound_open = false,
                },
            }
            // Take everything else that is already waiting, so one cycle
            // (and one fsync) covers it all.
            for _ in 0..4096 {
                match inbound.try_recv() {
                    Ok(m) => self.handle_inbound(m),
                    Err(_) => break,
                }
            }
            let mut stop = false;
            for _ in 0..4096 {
                match cmds.try_recv() {
                    Ok(Command::Shutdown) => {
                        stop = true;
                        break;
                    }
                    Ok(c) => self.handle_command(c),
                    Err(_) => break,
                }
            }
            // `advance` can itself produce work (a group of one commits once
            // its own entry is durable), so cycle until the core is idle.
            let mut result = self.cycle().await;
            for _ in 0..64 {
                if result.is_err() || !self.raft.has_ready() {
                    break;
                }
                result = self.cycle().await;
            }
            if result.is_ok() {
                self.watch_view();
                let published = self.status.borrow();
                let stale = published.refused_non_member != self.refused_non_member
                    || published.raft.removed != self.raft.removed();
                drop(published);
                if stale {
                    // Refusals (and a member's word that this node was
                    // removed, if it was a follower already) change nothing
                    // the core hands out, so no cycle published them.
                    self.publish_status();
                }
                self.note_membership();
            }
            if let Err(e) = result {
                tracing::error!(node = self.id, error = %e, "node stopped after a fatal error");
                // Published first: whoever is told of the failure finds it
                // in the status.
                self.status.send_modify(|s| s.fatal = Some(e.to_string()));
                self.fail_all(NodeError::Fatal(e.to_string()));
                return;
            }
            if stop {
                break;
            }
        }
        self.fail_all(NodeError::Shutdown);
        if let Some(mut storage) = self.storage.take() {
            let hs = self.raft.hard_state();
            let done = tokio::task::spawn_blocking(move || {
                storage.set_hard_state(hs)?;
                storage.flush()
            })
            .await;
            if let Ok(Err(e)) = done {
                tracing::error!(node = self.id, error = %e, "flushing storage on shutdown failed");
            }
        }
    }

    fn fail_all(&mut self, err: NodeError) {
        for (_, p) in self.proposals.drain() {
            let _ = p.reply.send(Err(err.clone()));
        }
        for (_, (r, _)) in self.reads.drain() {
            let _ = r.send(Err(err.clone()));
        }
        for (_, r) in self.reads_waiting_apply.drain(..) {
            let _ = r.send(Err(err.clone()));
        }
        for (_, (_, r)) in std::mem::take(&mut self.conf_waiters) {
            let _ = r.send(Err(err.clone()));
        }
        for (_, r, _) in self.transfers.drain(..) {
            let _ = r.send(Err(err.clone()));
        }
        for (_, r, _) in self.forwarded_confs.drain(..) {
            let _ = r.send(Err(err.clone()));
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&s, _)| s)
            .collect();
        for seq in expired {
            if let Some(p) = self.proposals.remove(&seq) {
                let e = if p.orphaned {
                    NodeError::OutcomeUnknown
                } else {
                    NodeError::Timeout
                };
                let _ = p.reply.send(Err(e));
            }
        }
        let expired: Vec<Vec<u8>> = self
            .reads
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for ctx in expired {
            if let Some((r, _)) = self.reads.remove(&ctx) {
                let _ = r.send(Err(NodeError::Timeout));
            }
        }
        let mut i = 0;
        while i < self.transfers.len() {
            if self.transfers[i].2 <= now {
                let (_, r, _) = self.transfers.swap_remove(i);
                let _ = r.send(Err(NodeError::Timeout));
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.forwarded_confs.len() {
            if self.forwarded_confs[i].2 <= now {
                let (_, r, _) = self.forwarded_confs.swap_remove(i);
                let _ = r.send(Err(NodeError::Timeout));
            } else {
                i += 1;
            }
        }
        let oldest_pending = self.proposals.keys().min().copied().unwrap_or(u64::MAX);
        self.appended.retain(|_, (_, seq)| *seq >= oldest_pending);
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.request_timeout
    }

    /// One election timeout (the shortest the core draws).
    fn election_timeout(&self) -> Duration {
        self.cfg
            .tick
            .saturating_mul(self.cfg.raft.election_tick.max(1))
    }

    /// Reacts to a change of leader or term. Proposals made under another
    /// view may have died with the leader they went to (or with this node's
    /// own leadership): each is answered when applied, or else
    /// [`NodeError::OutcomeUnknown`] one election timeout after the change —
    /// not after the whole request timeout. (A forwarded proposal cannot be
    /// sent again safely: a follower that held it may still forward it to
    /// the new leader, and it would be applied twice.) Pending reads, which
    /// change nothing, are asked again of a new leader.
    fn watch_view(&mut self) {
        let view = (self.raft.leader(), self.raft.term());
        if view == self.view {
            return;
        }
        self.view = view;
        let by = Instant::now() + self.election_timeout();
        for p in self.proposals.values_mut() {
            if p.view != view && !p.orphaned {
                p.orphaned = true;
                p.deadline = p.deadline.min(by);
            }
        }
        if view.0.is_some() {
            let ctxs: Vec<Vec<u8>> = self.reads.keys().cloned().collect();
            for ctx in ctxs {
                if let Err(e) = self.raft.read_index(ctx.clone())
                    && let Some((r, _)) = self.reads.remove(&ctx)
                {
                    let _ = r.send(Err(map_propose_error(e)));
                }
            }
        }
    }

    fn handle_command(&mut self, cmd: Command<M::Output>) {
        match cmd {
            Command::Propose(data, reply) => {
                self.seq += 1;
                let seq = self.seq;
                let bytes = encode_proposal(self.id, self.incarnation, seq, &data);
                match self.raft.propose(bytes) {
                    Ok(proposed) => {
                        if let Proposed::Appended { index, term } = proposed {
                            self.appended.insert(index, (term, seq));
                        }
                        let deadline = self.deadline();
                        let view = (self.raft.leader(), self.raft.term());
                        self.proposals.insert(
                            seq,
                            PendingProposal {
                                reply,
                                deadline,
                                view,
                                orphaned: false,
                            },
                        );
                    }
                    Err(e) => {
                        let _ = reply.send(Err(map_propose_error(e)));
                    }
                }
            }
            Command::ReadIndex(reply) => {
                self.seq += 1;
                let mut ctx = self.incarnation.to_be_bytes().to_vec();
                ctx.extend_from_slice(&self.seq.to_be_bytes());
                match self.raft.read_index(ctx.clone()) {
                    Ok(()) => {
                        let deadline = self.deadline();
                        self.reads.insert(ctx, (reply, deadline));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(map_propose_error(e)));
                    }
                }
            }
            Command::ConfChange(change, force, reply) => {
                match self.raft.propose_conf_change_checked(change, force) {
                    Ok(Proposed::Appended { index, term }) => {
                        self.conf_waiters.insert(index, (term, reply));
                    }
                    Ok(Proposed::Forwarded { .. }) => {
                        // The leader appends it, or answers why not: we learn
                        // the outcome when such a change commits, from the
                        // leader's refusal, or time out.
                        let deadline = self.deadline();
                        self.forwarded_confs.push((change, reply, deadline));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(map_propose_error(e)));
                    }
                }
            }
            Command::Transfer(to, reply) => {
                if self.raft.leader() == Some(to) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                match self.raft.transfer_leader(to) {
                    Ok(()) => {
                        let deadline = self.deadline();
                        self.transfers.push((to, reply, deadline));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Refused(e.to_string())));
                    }
                }
            }
            Command::Shutdown => {}
        }
    }

    /// Whether a message from `from` may reach the core. Members of this
    /// node's configuration (voters and learners) may send anything, and
    /// anyone may send [`MessageKind::NotMember`] (the core weighs it).
    /// From anyone else only a leader's traffic (appends, heartbeats,
    /// snapshots) is taken, and only by a node its own configuration does
    /// not list (none yet — one waiting to be added: the leader's snapshot
    /// brings it one —, or removed: added back, it catches up), or by a
    /// follower that has known no leader for [`STRANGER_LEADER_TIMEOUTS`]
    /// election timeouts, or already follows that sender: a member that was
    /// down while a node was added, and comes back when that node leads,
    /// must still catch up. A leader takes nothing from a non-member.
    fn admit(&mut self, msg: &Message) -> bool {
        // The core weighs it against its own commit index (a stale sender
        // proves nothing), whoever sends it.
        if matches!(msg.kind, MessageKind::NotMember { .. }) {
            return true;
        }
        let conf = self.raft.conf_state();
        if conf.contains(msg.from) {
            return true;
        }
        let leader_traffic = matches!(
            msg.kind,
            MessageKind::Append { .. }
                | MessageKind::Heartbeat { .. }
                | MessageKind::Snapshot { .. }
        );
        if !leader_traffic {
            return false;
        }
        // Not a member itself (no configuration yet, removed, or its
        // removal applied): whoever leads may bring it the log, which is
        // how it comes back once added again. It cannot vote or campaign.
        if !conf.contains(self.id) || self.raft.removed().is_some() {
            return true;
        }
        if self.raft.role() == Role::Leader {
            return false;
        }
        let leader = self.raft.leader();
        if leader == Some(msg.from) {
            return true;
        }
        let wait = STRANGER_LEADER_TIMEOUTS.saturating_mul(self.cfg.raft.election_tick as u64);
        if leader.is_none() && self.ticks_without_leader >= wait {
            tracing::info!(
                node = self.id,
                peer = msg.from,
                term = msg.term,
                "following a leader this node's configuration does not list (added while this node was away?)"
            );
            return true;
        }
        false
    }

    fn refuse(&mut self, msg: &Message) {
        self.refused_non_member += 1;
        let Some(repeated) = self.refusal_log_per_peer.allow(msg.from) else {
            return;
        };
        if let Some(suppressed) = self.refusal_log.allow() {
            tracing::warn!(
                node = self.id,
                peer = msg.from,
                kind = msg.kind.name(),
                repeated,
                suppressed,
                "refused a message from a node that is not a member of this node's configuration"
            );
        }
        self.tell_not_member(msg.from);
    }

    /// Tells `to` that this node's configuration (as of its commit index)
    /// does not list it — at most once per [`NOT_MEMBER_EVERY`], and only
    /// as a member itself (a node that is not one knows nothing worth
    /// telling).
    fn tell_not_member(&mut self, to: NodeId) {
        if !self.raft.conf_state().contains(self.id) || self.raft.removed().is_some() {
            return;
        }
        let now = Instant::now();
        if self
            .told_not_member
            .get(&to)
            .is_some_and(|at| now.duration_since(*at) < NOT_MEMBER_EVERY)
        {
            return;
        }
        if self.told_not_member.len() >= NOT_MEMBER_SENDERS {
            self.told_not_member.clear();
        }
        self.told_not_member.insert(to, now);
        let commit = self.raft.commit_index();
        self.send_not_member(to, commit);
    }

    fn send_not_member(&self, to: NodeId, commit: Index) {
        self.peers.send(Message {
            from: self.id,
            to,
            term: self.raft.term(),
            kind: MessageKind::NotMember { commit },
        });
    }

    /// Logs a change of this node's own membership: removed (its
    /// configuration stopped listing it, or a member said so), or a member
    /// (again).
    fn note_membership(&mut self) {
        let conf = self.raft.conf_state();
        let removed = self.raft.removed();
        let listed = conf.contains(self.id) && removed.is_none();
        if listed == self.listed {
            return;
        }
        self.listed = listed;
        if listed {
            let suffrage = if conf.voters.contains(&self.id) {
                "voter"
            } else {
                "learner"
            };
            tracing::info!(
                node = self.id,
                suffrage,
                commit = self.raft.commit_index(),
                "this node is a member of the group"
            );
        } else if let Some(at) = removed {
            tracing::warn!(
                node = self.id,
                removed_at = at,
                commit = self.raft.commit_index(),
                "this node was removed from the group: a member's configuration committed at \
                 removed_at does not list it; it stops campaigning and takes the log from a \
                 leader again if it is added back"
            );
        } else {
            tracing::warn!(
                node = self.id,
                commit = self.raft.commit_index(),
                "this node was removed from the group: its configuration no longer lists it"
            );
        }
    }

    fn handle_inbound(&mut self, inbound: Inbound) {
        if let Inbound::Message(msg) | Inbound::Snapshot { msg, .. } = &inbound
            && !self.admit(msg)
        {
            self.refuse(msg);
            return;
        }
        if let Inbound::Message(Message {
            from,
            kind: MessageKind::ConfChangeRefused { change, reason },
            ..
        }) = &inbound
        {
            self.conf_change_refused(*from, *change, reason);
            return;
        }
        let result = match inbound {
            Inbound::Message(m) => self.raft.step(m),
            Inbound::Snapshot { msg, data } => {
                if let MessageKind::Snapshot { meta } = &msg.kind {
                    self.incoming_snapshot = Some((meta.clone(), data));
                }
                self.raft.step(msg)
            }
            Inbound::Unreachable(id) => {
                self.raft.report_unreachable(id);
                Ok(())
            }
            Inbound::SnapshotStatus { to, ok } => {
                self.raft.report_snapshot(to, ok);
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::warn!(node = self.id, error = %e, "dropped a peer message");
        }
    }

    /// The leader `from` did not append a membership change this node
    /// forwarded: a request waiting for an equal change gets the
    /// reason (cut to [`REFUSAL_REASON_MAX`] bytes).
    fn conf_change_refused(&mut self, from: NodeId, change: ConfChange, reason: &str) {
        let Some(i) = self.forwarded_confs.iter().position(|(c, ..)| *c == change) else {
            return;
        };
        let mut end = reason.len().min(REFUSAL_REASON_MAX);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &reason[..end];
        tracing::info!(
            node = self.id,
            leader = from,
            ?change,
            reason,
            "the leader refused a membership change"
        );
        let (_, r, _) = self.forwarded_confs.remove(i);
        let _ = r.send(Err(NodeError::Refused(reason.to_string())));
    }

    async fn with_storage<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut S) -> Result<T, BoxError> + Send + 'static,
    ) -> Result<T, BoxError> {
        let mut storage = self
            .storage
            .take()
            .ok_or("storage is gone after an earlier failure")?;
        let (storage, result) = tokio::task::spawn_blocking(move || {
            let r = f(&mut storage);
            (storage, r)
        })
        .await
        .map_err(|e| format!("storage thread panicked: {e}"))?;
        self.storage = Some(storage);
        result
    }

    fn send_all(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if let MessageKind::Snapshot { meta } = &m.kind {
                match &self.latest_snapshot {
                    Some((stored, data)) if stored.index == meta.index => {
                        self.peers.send_snapshot(m, data.clone())
                    }
                    // A member added to a group that never snapshotted is
                    // sent the empty state at index 0 with the membership.
                    _ if meta.index == 0 => self.peers.send_snapshot(m, Arc::new(Vec::new())),
                    _ => {
                        tracing::error!(
                            node = self.id,
                            "asked to send a snapshot but none is stored"
                        );
                        self.raft.report_snapshot(m.to, false);
                    }
                }
            } else {
                self.peers.send(m);
            }
        }
    }

    /// One `ready` / `advance` cycle, if there is work.
    async fn cycle(&mut self) -> Result<(), BoxError> {
        if !self.raft.has_ready() {
            self.finish_transfers();
            return Ok(());
        }
        let mut rd: Ready = self.raft.ready();
        // 1. Messages that do not wait for the disk.
        let msgs = std::mem::take(&mut rd.messages);
        self.send_all(msgs);
        // 2. A snapshot from the leader.
        if let Some(meta) = rd.snapshot.clone() {
            let data = match self.incoming_snapshot.take() {
                Some((m, d)) if m.index == meta.index && m.term == meta.term => d,
                _ => {
                    return Err(format!("snapshot {} arrived without its image", meta.index).into());
                }
            };
            self.sm.restore(&meta, data.clone()).await?;
            let data = Arc::new(data);
            let (m2, d2) = (meta.clone(), data.clone());
            self.with_storage(move |s| {
                s.save_snapshot(&m2, &d2)?;
                s.compact(m2.index)
            })
            .await?;
            self.last_snapshot_index = meta.index;
            self.latest_snapshot = Some((meta, data));
        }
        // 3. Entries and hard state, with one fsync.
        let entries = std::mem::take(&mut rd.entries);
        // A change of the commit index alone needs no fsync of its own (it is
        // recovered from the applied index); it rides along with the next one.
        if let Some(hs) = rd.hard_state {
            self.latest_hs = hs;
        }
        let hs = self.latest_hs;
        if !entries.is_empty() || (hs.term, hs.vote) != self.durable_term_vote {
            let n = entries.len() as u64;
            self.with_storage(move |s| {
                s.append(&entries)?;
                s.set_hard_state(hs)?;
                s.sync()
            })
            .await?;
            self.durable_term_vote = (hs.term, hs.vote);
            self.syncs += 1;
            self.entries_persisted += n;
        }
        // 4. Messages that acknowledge what is now durable.
        let msgs = std::mem::take(&mut rd.persisted_messages);
        self.send_all(msgs);
        // 5. Apply.
        let committed = std::mem::take(&mut rd.committed_entries);
        self.apply(committed).await?;
        for rs in std::mem::take(&mut rd.read_states) {
            if let Some((reply, _)) = self.reads.remove(&rs.ctx) {
                self.reads_waiting_apply.push((rs.index, reply));
            }
        }
        let applied = self.sm.applied_index().max(self.raft.applied_index());
        let mut i = 0;
        while i < self.reads_waiting_apply.len() {
            if self.reads_waiting_apply[i].0 <= applied {
                let (index, reply) = self.reads_waiting_apply.swap_remove(i);
                let _ = reply.send(Ok(index));
            } else {
                i += 1;
            }
        }
        self.raft.advance();
        self.publish_status();
        if self.maybe_snapshot().await? {
            self.publish_status();
        }
        self.finish_transfers();
        Ok(())
    }

    async fn apply(&mut self, committed: Vec<Entry>) -> Result<(), BoxError> {
        let Some(last) = committed.last().map(|e| e.index) else {
            return Ok(());
        };
        let mut batch = Vec::new();
        // For each entry handed to the state machine: whose proposal it was.
        let mut owners = Vec::new();
        for e in committed {
            if let Some((term, seq)) = self.appended.remove(&e.index)
                && term != e.term
            {
                // Our entry at this index was overwritten by a new leader.
                if let Some(p) = self.proposals.remove(&seq) {
                    let _ = p.reply.send(Err(NodeError::Dropped));
                }
            }
            if let Some((term, reply)) = self.conf_waiters.remove(&e.index) {
                let r = if term == e.term {
                    Ok(e.index)
                } else {
                    Err(NodeError::Dropped)
                };
                let _ = reply.send(r);
            }
            if let EntryPayload::ConfChange(ConfChange::RemoveNode(gone)) = &e.payload
                && *gone != self.id
            {
                // The leader replicates no more to it: it may never learn
                // from the log that it was removed. Tell it once.
                self.send_not_member(*gone, e.index);
            }
            if let EntryPayload::ConfChange(change) = &e.payload {
                let mut i = 0;
                while i < self.forwarded_confs.len() {
                    if self.forwarded_confs[i].0 == *change {
                        let (_, r, _) = self.forwarded_confs.swap_remove(i);
                        let _ = r.send(Ok(e.index));
                    } else {
                        i += 1;
                    }
                }
            }
            let EntryPayload::Normal(bytes) = e.payload else {
                continue;
            };
            if e.index <= self.sm.applied_index() {
                continue;
            }
            match decode_proposal(&bytes) {
                Some((node, inc, seq, data)) => {
                    let mine = node == self.id && inc == self.incarnation;
                    owners.push(mine.then_some(seq));
                    batch.push(Committed {
                        index: e.index,
                        term: e.term,
                        data: data.to_vec(),
                    });
                }
                None => {
                    owners.push(None);
                    batch.push(Committed {
                        index: e.index,
                        term: e.term,
                        data: bytes,
                    });
                }
            }
        }
        if last <= self.sm.applied_index() && batch.is_empty() {
            return Ok(());
        }
        let indexes: Vec<Index> = batch.iter().map(|c| c.index).collect();
        let outputs = self.sm.apply(batch, last).await?;
        for ((owner, output), index) in owners.into_iter().zip(outputs).zip(indexes) {
            if let Some(seq) = owner
                && let Some(p) = self.proposals.remove(&seq)
            {
                let _ = p.reply.send(Ok(Applied { index, output }));
            }
        }
        Ok(())
    }

    /// Takes a snapshot if enough entries were applied since the last one.
    async fn maybe_snapshot(&mut self) -> Result<bool, BoxError> {
        let applied = self.raft.applied_index();
        if applied < self.last_snapshot_index + self.cfg.snapshot_every {
            return Ok(false);
        }
        let data = Arc::new(self.sm.snapshot().await?);
        let index = self.sm.applied_index().min(applied);
        let meta = self.raft.compact_keeping(index, self.cfg.snapshot_keep)?;
        let (m2, d2) = (meta.clone(), data.clone());
        let keep = self.cfg.snapshot_keep;
        self.with_storage(move |s| {
            s.save_snapshot(&m2, &d2)?;
            s.compact(m2.index.saturating_sub(keep))
        })
        .await?;
        self.last_snapshot_index = meta.index;
        self.latest_snapshot = Some((meta, data));
        Ok(true)
    }

    fn finish_transfers(&mut self) {
        let leader = self.raft.leader();
        let mut i = 0;
        while i < self.transfers.len() {
            if Some(self.transfers[i].0) == leader {
                let (_, r, _) = self.transfers.swap_remove(i);
                let _ = r.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }

    /// Logs, at info, a change of leader (who, in which term) and of
    /// membership (who was added, promoted, demoted or removed) since the
    /// last call: what an operator reads to follow a failover.
    fn announce(&mut self, raft: &Status) {
        let leader = raft.leader.map(|l| (l, raft.term));
        if leader != self.announced_leader {
            match leader {
                Some((l, term)) if l == self.id => {
                    tracing::info!(
                        node = self.id,
                        leader = l,
                        term,
                        "this node is now the leader"
                    );
                }
                Some((l, term)) => {
                    tracing::info!(node = self.id, leader = l, term, "following a new leader");
                }
                None => {
                    let (last, _) = self.announced_leader.unwrap_or_default();
                    tracing::info!(
                        node = self.id,
                        term = raft.term,
                        last_leader = last,
                        "no leader known; an election is due"
                    );
                }
            }
            self.announced_leader = leader;
        }
        let (old, new) = (&self.announced_conf, &raft.conf_state);
        if old == new {
            return;
        }
        if old.voters.is_empty() && old.learners.is_empty() {
            tracing::info!(
                node = self.id,
                voters = ?new.voters,
                learners = ?new.learners,
                "membership of the group"
            );
        } else {
            for &id in new.voters.difference(&old.voters) {
                if old.learners.contains(&id) {
                    tracing::info!(node = self.id, member = id, voters = ?new.voters, "membership: a learner was promoted to voter");
                } else {
                    tracing::info!(node = self.id, member = id, voters = ?new.voters, "membership: a voter was added");
                }
            }
            for &id in new.learners.difference(&old.learners) {
                if old.voters.contains(&id) {
                    tracing::info!(node = self.id, member = id, learners = ?new.learners, "membership: a voter was demoted to learner");
                } else {
                    tracing::info!(node = self.id, member = id, learners = ?new.learners, "membership: a learner was added");
                }
            }
            for id in old.members().filter(|&id| !new.contains(id)) {
                tracing::info!(node = self.id, member = id, voters = ?new.voters, learners = ?new.learners, "membership: a member was removed");
            }
        }
        self.announced_conf = new.clone();
    }

    fn publish_status(&mut self) {
        let raft = self.raft.status();
        self.announce(&raft);
        let (syncs, entries_persisted) = (self.syncs, self.entries_persisted);
        let refused_non_member = self.refused_non_member;
        self.status.send_modify(|s| {
            s.raft = raft;
            s.syncs = syncs;
            s.entries_persisted = entries_persisted;
            s.refused_non_member = refused_non_member;
        });
    }
}

fn map_propose_error(e: ProposeError) -> NodeError {
    match e {
        ProposeError::NoLeader => NodeError::NoLeader,
        ProposeError::NotLeader { leader } => NodeError::NotLeader {
            leader: Some(leader),
        },
        other => NodeError::Refused(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposal_header_round_trips() {
        let b = encode_proposal(7, 9, 11, b"abc");
        assert_eq!(decode_proposal(&b), Some((7, 9, 11, &b"abc"[..])));
        assert_eq!(decode_proposal(&b[..10]), None);
    }
}
