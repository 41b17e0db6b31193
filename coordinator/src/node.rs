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
//! configuration does not list answers with [`MessageKind::NotMember`](crate::raft::MessageKind::NotMember)
//! carrying its commit index (at most once a second per sender), and each
//! member that applies a node's removal tells that node once. The core
//! believes it only if the sender has committed more of the log than it
//! has ([`Raft::removed`]): then it stands down and campaigns no more. A
//! node that is removed, or that its own configuration does not list (none
//! yet, or its removal applied), takes a leader's appends, heartbeats and
//! snapshots from whoever leads, so once an operator adds it again it
//! catches up. [`NodeStatus::raft`]`.removed` and the configuration tell
//! the embedder; the driver logs each change of this node's membership.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::image::{ImageReader, SnapshotImage, StagedImage};
use crate::raft::{
    ConfChange, ConfState, Entry, EntryPayload, HardState, Index, InitialState, NodeId,
    ProposeError, Proposed, Raft, Role, SnapshotMeta, Status, Term,
};
use crate::transport::PeerStatus;
use crate::transport::gate::{LogLimiter, RepeatLimiter};
use consensus::engine::{Engine, EngineKind, EngineMessage};
use consensus::ready::Ready;
use consensus::types::Bytes;

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
    /// A directory where snapshot images are staged
    /// ([`StagedImage::create_in`]) before [`LogStore::save_snapshot`]
    /// stores them; it should be on the storage's file system, so storing
    /// is a rename.
    fn staging_dir(&self) -> PathBuf;
    /// Installs a snapshot from another member durably, taking over its
    /// sealed image file (the image is never read into memory), with the
    /// entries the core holds after it (`following`, contiguous from its
    /// index + 1: the core replaced its whole log with the snapshot and
    /// them). A restart must find either the snapshot with `following`
    /// or neither (PBFT's engine cannot start from a snapshot without the
    /// entry after it, which holds its checkpoint's state). Returns the
    /// stored image.
    fn save_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        image: StagedImage,
        following: &[Entry],
    ) -> Result<SnapshotImage, BoxError>;
    /// Drops log entries at or below `index` (covered by the latest
    /// snapshot). Should not wait for the disk: the loop waits for it.
    fn compact(&mut self, index: Index) -> Result<(), BoxError>;
    /// A snapshot made durable beside the storage by a
    /// [`LogStore::snapshot_preparer`], to be registered.
    type Prepared: Send + 'static;
    /// A function that makes a snapshot of this node's own state durable
    /// without the storage (blocking; the driver runs it on another thread
    /// while the storage goes on taking the log).
    fn snapshot_preparer(&self) -> Preparer<Self::Prepared>;
    /// Takes a prepared snapshot as the latest and returns its image.
    /// Should not wait for the disk: the loop waits for it. Until then a
    /// prepared snapshot must not be found as the latest one by a restart:
    /// the core may refuse it (PBFT, whose stable checkpoint moved on
    /// meanwhile), and could not start from it.
    fn register_snapshot(&mut self, prepared: Self::Prepared) -> Result<SnapshotImage, BoxError>;
    /// Drops a prepared snapshot the core did not take.
    /// Should not wait for the disk.
    fn discard_snapshot(&mut self, prepared: Self::Prepared) {
        drop(prepared);
    }
    /// The latest snapshot and its image, if any.
    fn load_snapshot(&self) -> Result<Option<(SnapshotMeta, SnapshotImage)>, BoxError>;
    /// Makes everything durable, including a hard state whose write was
    /// deferred; called on graceful shutdown.
    fn flush(&mut self) -> Result<(), BoxError> {
        self.sync()
    }
}

/// See [`LogStore::snapshot_preparer`].
pub type Preparer<P> = Box<dyn FnOnce(SnapshotMeta, StagedImage) -> Result<P, BoxError> + Send>;

/// Where outgoing messages go (the consumer declares its interface). Neither
/// call may block.
pub trait PeerSender<Msg>: Send + Sync + 'static {
    /// Sends one message to its recipient.
    fn send(&self, msg: Msg);
    /// Sends a snapshot message with its image (streamed from the file).
    /// The outcome must come back exactly once, as
    /// [`Inbound::SnapshotStatus`]: the driver starts no other send to that
    /// peer until it does.
    fn send_snapshot(&self, msg: Msg, image: SnapshotImage);
    /// Sends this node's status report to member `to`, best effort (a
    /// report that cannot go is dropped, and the engine not told). Does
    /// nothing by default.
    fn send_status(&self, to: NodeId, status: PeerStatus) {
        let _ = (to, status);
    }
}

pub use crate::transport::Inbound;

/// A committed entry handed to the state machine.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Its log index.
    pub index: Index,
    /// The term it was proposed in.
    pub term: Term,
    /// The application bytes (shared with the log's copy, not copied).
    pub data: Bytes,
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

    /// What a snapshot is built from: a consistent view of the state that
    /// writes its image on another task while entries go on being applied.
    type Snapshot: SnapshotView;

    /// Takes a view of the state for a snapshot. Should return quickly: the
    /// image is written by [`SnapshotView::write_to`], off the apply path.
    fn snapshot(&mut self) -> impl Future<Output = Result<Self::Snapshot, BoxError>> + Send;

    /// Replaces the whole state with a snapshot image (streamed from its
    /// file; the reader fails at the end if the image is damaged). An
    /// empty image at index 0 stands for the initial, empty state. The
    /// state's applied index becomes `meta.index`.
    fn restore(
        &mut self,
        meta: &SnapshotMeta,
        image: ImageReader,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// A consistent view of a state machine's state, taken by
/// [`StateMachine::snapshot`].
pub trait SnapshotView: Send + 'static {
    /// Writes the image into the empty file at `dest` (any way: a database
    /// may write it there itself) and returns the log index the image
    /// stands at: every entry up to it applied, none after. Runs on a task
    /// of its own while the state machine goes on applying entries.
    fn write_to(self, dest: PathBuf) -> impl Future<Output = Result<Index, BoxError>> + Send;
}

/// An engine the driver can build from its settings and what storage kept.
pub trait BuildEngine: Engine + Sized {
    /// Builds the engine [`NodeConfig::engine`] names from the timing,
    /// seed and limits of [`NodeConfig::raft`] and the recovered state.
    fn build(cfg: &NodeConfig, init: InitialState) -> Result<Self, String>;
}

impl BuildEngine for Raft {
    fn build(cfg: &NodeConfig, init: InitialState) -> Result<Self, String> {
        if cfg.engine != EngineKind::Raft {
            return Err(format!("the Raft engine cannot run as {}", cfg.engine));
        }
        Raft::new(cfg.raft.clone(), init).map_err(|e| e.to_string())
    }
}

impl BuildEngine for consensus::paxos::MultiPaxos {
    fn build(cfg: &NodeConfig, init: InitialState) -> Result<Self, String> {
        use consensus::paxos::{Config, Mode};
        let mode = match cfg.engine {
            EngineKind::MultiPaxos => Mode::Multi,
            EngineKind::BasicPaxos => Mode::Basic,
            EngineKind::Raft => return Err("the Paxos engine cannot run as raft".into()),
            EngineKind::Pbft => return Err("the Paxos engine cannot run as pbft".into()),
        };
        let r = &cfg.raft;
        let paxos = Config {
            id: r.id,
            mode,
            election_tick: r.election_tick,
            heartbeat_tick: r.heartbeat_tick,
            max_size_per_msg: r.max_size_per_msg,
            max_inflight_msgs: r.max_inflight_msgs,
            disable_proposal_forwarding: r.disable_proposal_forwarding,
            seed: r.seed,
            ..Config::new(r.id)
        };
        consensus::paxos::MultiPaxos::new(paxos, init).map_err(|e| e.to_string())
    }
}

/// A PBFT group's checkpoint interval as the driver runs it: the engine
/// signs a checkpoint every this many sequence numbers and compacts only at
/// its stable checkpoint, so snapshots stand at multiples of it.
pub const PBFT_CHECKPOINT_INTERVAL: u64 = 128;

impl BuildEngine for consensus::pbft::Pbft {
    /// Ticks map as for the other engines: a backup waits twice
    /// [`crate::raft::Config::election_tick`] ticks (the longest election
    /// timeout Raft draws) for a request it holds to execute before it
    /// starts a view change (the primary presumed faulty; the timeout
    /// doubles for each view change that fails), and unfinished work
    /// (requests included, whole) is retransmitted every half
    /// `election_tick`. At the defaults (20 ms ticks, 10) a view change
    /// starts 400 ms after the first request the dead primary leaves
    /// waiting and completes within a retransmission (100 ms) after.
    fn build(cfg: &NodeConfig, init: InitialState) -> Result<Self, String> {
        if cfg.engine != EngineKind::Pbft {
            return Err(format!("the PBFT engine cannot run as {}", cfg.engine));
        }
        let crypto = cfg.pbft_crypto.clone().ok_or(
            "PBFT signs every message: this node's signing key and the members' public keys \
             are needed (NodeConfig::pbft_crypto)",
        )?;
        let r = &cfg.raft;
        let pbft = consensus::pbft::Config {
            checkpoint_interval: PBFT_CHECKPOINT_INTERVAL,
            window: 2 * PBFT_CHECKPOINT_INTERVAL,
            request_timeout: r.election_tick.saturating_mul(2).max(2),
            resend_tick: (r.election_tick / 2).max(1),
            ..consensus::pbft::Config::new(r.id, crypto)
        };
        consensus::pbft::Pbft::new(pbft, init).map_err(|e| e.to_string())
    }
}

/// A PBFT member that misbehaves as [`NodeConfig::byzantine`] says (tests
/// only): the correct core [`consensus::pbft::Pbft`] builds, with the same
/// timing and keys, wrapped so that what it sends is rewritten and signed
/// with this member's own key.
#[cfg(feature = "byzantine")]
impl BuildEngine for consensus::pbft::byzantine::Byzantine {
    fn build(cfg: &NodeConfig, init: InitialState) -> Result<Self, String> {
        let mode = cfg
            .byzantine
            .ok_or("the Byzantine engine needs its behaviours (NodeConfig::byzantine)")?;
        let crypto = cfg.pbft_crypto.clone().ok_or(
            "PBFT signs every message: this node's signing key and the members' public keys \
             are needed (NodeConfig::pbft_crypto)",
        )?;
        let inner = <consensus::pbft::Pbft as BuildEngine>::build(cfg, init)?;
        Ok(consensus::pbft::byzantine::Byzantine::new(
            inner, crypto, mode,
        ))
    }
}

/// Settings of the driver.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The consensus engine the group runs (default Raft).
    pub engine: EngineKind,
    /// The core's settings (its id is this node's id). Every engine takes
    /// its id, election and heartbeat ticks, seed and limits from here.
    pub raft: crate::raft::Config,
    /// Length of one tick.
    pub tick: Duration,
    /// Take a snapshot once the entries committed since the last one hold
    /// this many bytes (application data, plus [`ENTRY_OVERHEAD`] per
    /// entry for what the log keeps beside it). Default 64 MiB.
    pub snapshot_log_bytes: u64,
    /// Also take one after this many entries. Default: never
    /// (`u64::MAX`); tests set it low.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for slightly slow followers.
    pub snapshot_keep: u64,
    /// Bytes of committed entries (counted as for `snapshot_log_bytes`)
    /// handed to the state machine and not yet applied, beyond which the
    /// driver takes no new requests until it catches up (default 16 MiB).
    /// Bounds the apply pipeline; replication and the log go on.
    pub apply_queue_bytes: u64,
    /// How long a proposal, read or membership change may take before it
    /// fails with [`NodeError::Timeout`].
    pub request_timeout: Duration,
    /// How often this node sends each member its status report (commit
    /// and applied index, term, role; see [`Node::peer_reports`]). Default
    /// 250 ms; zero sends none.
    pub status_interval: Duration,
    /// PBFT only: signs as this node and verifies the members (see
    /// [`crate::keys`]). Required when [`NodeConfig::engine`] is PBFT.
    pub pbft_crypto: Option<Arc<dyn consensus::pbft::crypto::Crypto>>,
    /// Tests only (feature `byzantine`): how this PBFT member misbehaves
    /// when the driver runs [`consensus::pbft::byzantine::Byzantine`].
    #[cfg(feature = "byzantine")]
    pub byzantine: Option<consensus::pbft::byzantine::Mode>,
}

impl NodeConfig {
    /// Defaults: 20 ms ticks, elections after 200–400 ms of silence,
    /// heartbeats every 40 ms, a snapshot every 64 MiB of log.
    pub fn new(id: NodeId) -> Self {
        let raft = crate::raft::Config {
            election_tick: 10,
            heartbeat_tick: 2,
            ..crate::raft::Config::new(id)
        };
        NodeConfig {
            engine: EngineKind::Raft,
            raft,
            tick: Duration::from_millis(20),
            snapshot_log_bytes: 64 << 20,
            snapshot_every: u64::MAX,
            snapshot_keep: 1_000,
            apply_queue_bytes: 16 << 20,
            request_timeout: Duration::from_secs(5),
            status_interval: STATUS_INTERVAL,
            pbft_crypto: None,
            #[cfg(feature = "byzantine")]
            byzantine: None,
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

/// The default [`NodeConfig::status_interval`].
pub const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// The latest status report a member sent about itself, and when it
/// arrived. What the member says, unchecked against the group (on PBFT a
/// Byzantine member may lie): for display, never for a safety decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerReport {
    /// The report.
    pub status: PeerStatus,
    /// When this node received it.
    pub at: Instant,
    /// This node's commit index when it arrived: how far the member's
    /// applied index trailed what this node knew was committed, at the
    /// same moment, is `commit_here - status.applied`.
    pub commit_here: Index,
}

/// A proposal that was applied.
#[derive(Debug)]
pub struct Applied<O> {
    /// The log index it was applied at.
    pub index: Index,
    /// What the state machine returned.
    pub output: O,
    /// The commit certificate of the entry, for an engine that assembles
    /// them (PBFT: f+1 matching signed replies, the JSON document of
    /// `consensus::pbft::certificate`); `None` for Raft and Paxos, and when
    /// it did not come by the proposal's deadline ([`NodeConfig::request_timeout`]
    /// after it was made; counted in [`NodeStatus::uncertified`]).
    pub certificate: Option<Vec<u8>>,
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
    /// Messages the core refused as malformed (`StepError::Malformed`: a
    /// term or index beyond any a group reaches, an append whose entries
    /// do not follow it); logged like the refusals of non-members.
    pub refused_malformed: u64,
    /// Set once the driver stopped after a fatal error.
    pub fatal: Option<String>,
    /// Snapshots this node built and stored since it started.
    pub snapshots_built: u64,
    /// The last one: how long from its start to stored, and its image's size.
    pub last_snapshot: Option<(Duration, u64)>,
    /// Snapshots this node built and discarded because the core had moved
    /// past them while their image was made durable (PBFT: a later stable
    /// checkpoint).
    pub snapshots_overtaken: u64,
    /// Proposals of an engine that certifies (PBFT) answered without a
    /// certificate: applied here (so executed by this replica, a correct
    /// one if the operator trusts it), but f+1 matching replies did not
    /// come by the proposal's deadline.
    pub uncertified: u64,
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// The latest status report of each member, shared by the driver (which
/// writes it) and the [`Node`] handles (which read it).
type Reports = Arc<std::sync::Mutex<BTreeMap<NodeId, PeerReport>>>;

enum Command<O> {
    Propose(Vec<u8>, Reply<Applied<O>>),
    ReadIndex(Reply<Index>),
    ConfChange(ConfChange, bool, Reply<Index>),
    Transfer(NodeId, Reply<()>),
    Snapshot(Reply<()>),
    Shutdown,
}

/// Handle to a running node. Cheap to clone.
#[derive(Debug)]
pub struct Node<O> {
    cmd: mpsc::Sender<Command<O>>,
    status: watch::Receiver<NodeStatus>,
    reports: Reports,
    started: Instant,
    timeout: Duration,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl<O> Clone for Node<O> {
    fn clone(&self) -> Self {
        Node {
            cmd: self.cmd.clone(),
            status: self.status.clone(),
            reports: self.reports.clone(),
            started: self.started,
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
            Command::Snapshot(..) => "Snapshot",
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
/// What an entry is counted for beside its application data (see
/// [`NodeConfig::snapshot_log_bytes`]): its index, term and the log's own
/// bookkeeping.
pub const ENTRY_OVERHEAD: u64 = 64;
/// Batches queued for the apply task behind each other are applied in one
/// call up to this many entries.
const APPLY_MERGE_ENTRIES: usize = 4096;
/// Snapshot images kept between two cycles (each is a file, received whole).
const INCOMING_SNAPSHOTS: usize = 4;
/// After a snapshot build failed, the next is tried this much later.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(5);
/// How long a snapshot built at a PBFT checkpoint waits for the group to
/// make that checkpoint stable before it is dropped.
const STABLE_CHECKPOINT_WAIT: Duration = Duration::from_secs(30);

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
    pub async fn start<E, S, P, M>(
        cfg: NodeConfig,
        recovered: InitialState,
        storage: S,
        peers: Arc<P>,
        inbound: mpsc::Receiver<Inbound<E::Message>>,
        mut sm: M,
    ) -> Result<Node<O>, NodeError>
    where
        E: BuildEngine,
        S: LogStore,
        P: PeerSender<E::Message>,
        M: StateMachine<Output = O>,
    {
        let mut init = recovered;
        if sm.applied_index() < init.snapshot.index {
            let snap = storage
                .load_snapshot()
                .map_err(|e| NodeError::Fatal(e.to_string()))?;
            match snap {
                Some((meta, image)) if meta.index == init.snapshot.index => {
                    let reader = image
                        .open()
                        .map_err(|e| NodeError::Fatal(format!("opening snapshot image: {e}")))?;
                    sm.restore(&meta, reader)
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
        let applied = init.applied;
        let log_bytes = init
            .entries
            .iter()
            .filter(|e| e.index > init.snapshot.index)
            .map(entry_bytes)
            .sum();
        let latest_snapshot = storage
            .load_snapshot()
            .map_err(|e| NodeError::Fatal(e.to_string()))?;
        let hard_state = init.hard_state;
        let raft = E::build(&cfg, init)
            .map_err(|e| NodeError::Refused(format!("invalid configuration: {e}")))?;
        let listed = raft.conf_state().contains(cfg.raft.id);
        let (cmd_tx, cmd_rx) = mpsc::channel(4096);
        let (status_tx, status_rx) = watch::channel(NodeStatus {
            raft: raft.status(),
            syncs: 0,
            entries_persisted: 0,
            refused_non_member: 0,
            refused_malformed: 0,
            fatal: None,
            snapshots_built: 0,
            last_snapshot: None,
            snapshots_overtaken: 0,
            uncertified: 0,
        });
        let mut incarnation = [0u8; 8];
        getrandom::fill(&mut incarnation).map_err(|e| NodeError::Fatal(e.to_string()))?;
        let reports: Reports = Arc::default();
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let apply_task = tokio::spawn(apply_loop(sm, work_rx, events_tx.clone()));
        let driver: Driver<E, S, P, M> = Driver {
            id: cfg.raft.id,
            incarnation: u64::from_be_bytes(incarnation),
            raft,
            storage: Some(storage),
            peers,
            work: work_tx,
            events: events_tx,
            apply_task: Some(apply_task),
            applied,
            handed: applied,
            unapplied: VecDeque::new(),
            unapplied_bytes: 0,
            log_bytes,
            build: None,
            snapshot_target: None,
            snapshot_retry_at: None,
            snapshot_asked: false,
            snapshot_sends: HashMap::new(),
            slow_storage_log: LogLimiter::new(Duration::from_secs(10), 1),
            cfg: cfg.clone(),
            seq: 0,
            proposals: HashMap::new(),
            certified: BTreeMap::new(),
            awaiting_certificate: BTreeMap::new(),
            uncertified: 0,
            appended: BTreeMap::new(),
            reads: HashMap::new(),
            reads_waiting_apply: Vec::new(),
            conf_waiters: BTreeMap::new(),
            transfers: Vec::new(),
            forwarded_confs: Vec::new(),
            incoming_snapshots: Vec::new(),
            latest_snapshot,
            status: status_tx,
            syncs: 0,
            entries_persisted: 0,
            last_snapshot_index: 0,
            latest_hs: hard_state,
            durable_term_vote: (hard_state.term, hard_state.vote),
            refused_non_member: 0,
            refused_malformed: 0,
            refusal_log: LogLimiter::new(REFUSAL_LOG_WINDOW, REFUSAL_LOG_BURST),
            refusal_log_per_peer: RepeatLimiter::new(REFUSAL_LOG_PER_PEER, 64),
            ticks_without_leader: 0,
            view: (None, 0),
            announced_leader: None,
            announced_conf: ConfState::default(),
            told_not_member: HashMap::new(),
            listed,
            reports: reports.clone(),
            next_status_at: Instant::now(),
            status_refusal_log: RepeatLimiter::new(REFUSAL_LOG_PER_PEER, 64),
        };
        let task = tokio::spawn(driver.run(cmd_rx, inbound, events_rx));
        Ok(Node {
            cmd: cmd_tx,
            status: status_rx,
            reports,
            started: Instant::now(),
            timeout: cfg.request_timeout,
            task: Arc::new(std::sync::Mutex::new(Some(task))),
        })
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command<O>) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        // The whole request is bounded, queueing included: the driver takes
        // no requests while its state machine is far behind.
        let deadline = Instant::now() + self.timeout + Duration::from_millis(100);
        match tokio::time::timeout_at(deadline, self.cmd.send(make(tx))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(self.stopped()),
            Err(_) => return Err(NodeError::Timeout),
        }
        match tokio::time::timeout_at(deadline, rx).await {
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

    /// Hands leadership to `to`; resolves once this node sees `to` lead
    /// and an entry of its term committed (from then on it takes
    /// membership changes and serves reads).
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), NodeError> {
        self.request(|tx| Command::Transfer(to, tx)).await
    }

    /// Asks for a snapshot of the state as it stands now, whatever the
    /// log's size: the build starts once the driver takes the request, or
    /// right after the one under way (which may stand at an older index)
    /// is stored. Requests made before a build starts are served by it.
    /// None is built if the latest snapshot already stands at the applied
    /// index. Resolves once the driver has taken the request, not when the
    /// snapshot is stored: [`NodeStatus::snapshots_built`] and
    /// [`NodeStatus::last_snapshot`] show that (a large image takes longer
    /// than a request may wait).
    pub async fn request_snapshot(&self) -> Result<(), NodeError> {
        self.request(Command::Snapshot).await
    }

    /// The latest status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every new status.
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// The latest status report of each other member of this node's
    /// configuration, with when it arrived: what each says about itself
    /// (its own commit and applied index, term, role), sent every
    /// [`NodeConfig::status_interval`]. A member never heard from since
    /// this node started has none; one removed from the configuration is
    /// forgotten within an interval. Informational only (see
    /// [`PeerReport`]).
    pub fn peer_reports(&self) -> BTreeMap<NodeId, PeerReport> {
        lock_reports(&self.reports).clone()
    }

    /// When this node started (so a member never heard from can be told
    /// apart from one this node has not had time to hear from).
    pub fn started(&self) -> Instant {
        self.started
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

/// Most certificates kept for entries not yet applied here.
const CERTIFICATE_BACKLOG: usize = 4096;

/// An applied proposal waiting for its commit certificate.
struct AwaitingCertificate<O> {
    reply: Reply<Applied<O>>,
    output: O,
    deadline: Instant,
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

struct Driver<E: Engine, S: LogStore, P, M: StateMachine> {
    id: NodeId,
    incarnation: u64,
    raft: E,
    /// `None` only while a blocking storage call runs.
    storage: Option<S>,
    peers: Arc<P>,
    /// Work for the apply task, which owns the state machine.
    work: mpsc::UnboundedSender<ApplyWork>,
    /// What the apply task and snapshot builds report (the builds get a
    /// clone).
    events: mpsc::UnboundedSender<ApplyEvent<M::Output, M::Snapshot, S::Prepared>>,
    apply_task: Option<tokio::task::JoinHandle<()>>,
    /// What the state machine has applied (as last reported).
    applied: Index,
    /// The last index handed to the apply task.
    handed: Index,
    /// Handed and not yet applied: (last index of a hand-off, its bytes).
    unapplied: VecDeque<(Index, u64)>,
    /// Their sum.
    unapplied_bytes: u64,
    /// Bytes of the entries committed since the last snapshot (see
    /// [`NodeConfig::snapshot_log_bytes`]).
    log_bytes: u64,
    /// The snapshot being built, if any.
    build: Option<Build>,
    /// A snapshot is due and will be built once the entries up to this
    /// index are handed to the state machine (see
    /// [`Driver::snapshot_align`]).
    snapshot_target: Option<Index>,
    /// After a failed build: no other before this.
    snapshot_retry_at: Option<Instant>,
    /// A snapshot was asked for ([`Node::request_snapshot`]) and no build
    /// has started since.
    snapshot_asked: bool,
    /// Bounds the warnings about slow storage calls.
    slow_storage_log: LogLimiter,
    /// Snapshot sends under way, by peer: the index and when it started.
    /// The peer sender reports each exactly once.
    snapshot_sends: HashMap<NodeId, (Index, Instant)>,
    cfg: NodeConfig,
    seq: u64,
    proposals: HashMap<u64, PendingProposal<M::Output>>,
    /// Certificates the engine assembled whose entries this node has not
    /// applied yet, by index (at most [`CERTIFICATE_BACKLOG`]; dropped
    /// once applied without a waiting proposal).
    certified: BTreeMap<Index, Vec<u8>>,
    /// Own proposals applied and waiting for their certificate, by index:
    /// the reply, the output, and when to answer without one.
    awaiting_certificate: BTreeMap<Index, AwaitingCertificate<M::Output>>,
    /// Proposals answered without a certificate (see
    /// [`NodeStatus::uncertified`]).
    uncertified: u64,
    /// Locally appended proposals: index → seq, to fail fast when another
    /// entry commits at that index (told apart by the proposal header, not
    /// the term: an engine may choose the same value under a later term, as
    /// Paxos does when a new leader re-proposes it).
    appended: BTreeMap<Index, u64>,
    reads: HashMap<Vec<u8>, (Reply<Index>, Instant)>,
    reads_waiting_apply: Vec<(Index, Reply<Index>)>,
    conf_waiters: BTreeMap<Index, (Term, Reply<Index>)>,
    transfers: Vec<(NodeId, Reply<()>, Instant)>,
    /// Membership changes forwarded to the leader: answered when an equal
    /// change commits after the request, or with a timeout.
    forwarded_confs: Vec<(ConfChange, Reply<Index>, Instant)>,
    /// Snapshot images received since the last cycle, with their metadata
    /// (at most [`INCOMING_SNAPSHOTS`]): the next `ready` says which one, if
    /// any, the engine installs — not always the last to arrive (two
    /// members may send the same snapshot labelled with different terms,
    /// and the engine takes the first).
    incoming_snapshots: Vec<(SnapshotMeta, StagedImage)>,
    latest_snapshot: Option<(SnapshotMeta, SnapshotImage)>,
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
    /// Messages the core refused as malformed so far.
    refused_malformed: u64,
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
    /// The members' latest status reports (see [`Node::peer_reports`]).
    reports: Reports,
    /// When this node next sends its own status report to the members.
    next_status_at: Instant,
    /// Bounds the warnings about status reports from non-members.
    status_refusal_log: RepeatLimiter<NodeId>,
}

impl<E: Engine, S: LogStore, P: PeerSender<E::Message>, M: StateMachine> Driver<E, S, P, M> {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command<M::Output>>,
        mut inbound: mpsc::Receiver<Inbound<E::Message>>,
        mut events: mpsc::UnboundedReceiver<ApplyEvent<M::Output, M::Snapshot, S::Prepared>>,
    ) {
        self.last_snapshot_index = self.raft.snapshot_meta().index;
        let mut ticker = tokio::time::interval(self.cfg.tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut inbound_open = true;
        loop {
            // A bounded apply pipeline: while the state machine is this far
            // behind, requests wait (replication goes on).
            let take_requests = self.unapplied_bytes <= self.cfg.apply_queue_bytes;
            let mut result: Result<(), BoxError> = Ok(());
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
                    self.send_status_reports(Instant::now());
                    if self.apply_task.as_ref().is_some_and(|t| t.is_finished()) {
                        // It ends only when told to, or after reporting a
                        // failure (taken first): otherwise it panicked.
                        result = match events.try_recv() {
                            Ok(ev) => self.on_event(ev).await,
                            Err(_) => Err("the state machine's apply task stopped unexpectedly".into()),
                        };
                    }
                }
                cmd = cmds.recv(), if take_requests => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(c) => self.handle_command(c),
                },
                msg = inbound.recv(), if inbound_open => match msg {
                    Some(m) => self.handle_inbound(m),
                    None => inbound_open = false,
                },
                ev = events.recv() => match ev {
                    Some(ev) => result = self.on_event(ev).await,
                    // The driver holds a sender itself.
                    None => result = Err("the apply events channel closed".into()),
                },
            }
            // Everything the state machine finished meanwhile: proposals
            // answered together.
            while result.is_ok() {
                match events.try_recv() {
                    Ok(ev) => result = self.on_event(ev).await,
                    Err(_) => break,
                }
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
                if !take_requests {
                    break;
                }
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
            if result.is_ok() {
                result = self.cycle(&mut events).await;
            }
            for _ in 0..64 {
                if result.is_err() || !self.raft.has_ready() {
                    break;
                }
                result = self.cycle(&mut events).await;
            }
            if result.is_ok() {
                // Certificates come out of the inputs above (replies from
                // peers), not out of `ready`.
                for c in self.raft.take_certificates() {
                    self.on_certificate(c.index, c.bytes);
                }
                result = self.maybe_snapshot();
            }
            if result.is_ok() {
                self.watch_view();
                let published = self.status.borrow();
                let stale = published.refused_non_member != self.refused_non_member
                    || published.refused_malformed != self.refused_malformed
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
                if let Some(task) = self.build.take().and_then(|b| b.task) {
                    task.abort();
                }
                return;
            }
            if stop {
                break;
            }
        }
        self.fail_all(NodeError::Shutdown);
        if let Some(task) = self.build.take().and_then(|b| b.task) {
            task.abort();
        }
        // What was handed to the state machine is applied before the
        // storage closes (at most `apply_queue_bytes` and a cycle's worth).
        drop(self.work);
        if let Some(task) = self.apply_task.take() {
            let _ = task.await;
        }
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
        // Applied already: answered with their outputs, without certificate.
        for (index, a) in std::mem::take(&mut self.awaiting_certificate) {
            self.uncertified += 1;
            let _ = a.reply.send(Ok(Applied {
                index,
                output: a.output,
                certificate: None,
            }));
        }
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
        let late: Vec<Index> = self
            .awaiting_certificate
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(&i, _)| i)
            .collect();
        for index in late {
            if let Some(a) = self.awaiting_certificate.remove(&index) {
                self.uncertified += 1;
                tracing::warn!(
                    node = self.id,
                    index,
                    "no commit certificate within the request timeout after applying; answered without one"
                );
                // Counted before the answer leaves.
                self.publish_status();
                let _ = a.reply.send(Ok(Applied {
                    index,
                    output: a.output,
                    certificate: None,
                }));
            }
        }
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
        self.appended.retain(|_, seq| *seq >= oldest_pending);
    }

    /// Whether the committed entry `e` is this node's proposal `seq` (this
    /// incarnation's), whatever term it was committed in.
    fn carries(&self, e: &Entry, seq: u64) -> bool {
        match &e.payload {
            EntryPayload::Normal(bytes) => {
                decode_proposal(bytes).is_some_and(|(node, inc, s, _)| {
                    node == self.id && inc == self.incarnation && s == seq
                })
            }
            _ => false,
        }
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
        // PBFT: every replica holds a proposal and its proposer sends it
        // again until it executes, whatever the view; it is not orphaned
        // by a view change (it waits for its result or the request timeout).
        let orphans = self.cfg.engine != EngineKind::Pbft;
        let by = Instant::now() + self.election_timeout();
        for p in self.proposals.values_mut().filter(|_| orphans) {
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
                        if let Proposed::Appended { index, .. } = proposed {
                            self.appended.insert(index, seq);
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
            Command::Snapshot(reply) => {
                self.snapshot_asked = true;
                let _ = reply.send(Ok(()));
            }
            Command::Shutdown => {}
        }
    }

    /// Whether a message from `from` may reach the core. Members of this
    /// node's configuration (voters and learners) may send anything, and
    /// anyone may send [`MessageKind::NotMember`](crate::raft::MessageKind::NotMember) (the core weighs it).
    /// From anyone else only a leader's traffic (appends, heartbeats,
    /// snapshots) is taken, and only by a node its own configuration does
    /// not list (none yet — one waiting to be added: the leader's snapshot
    /// brings it one —, or removed: added back, it catches up), or by a
    /// follower that has known no leader for [`STRANGER_LEADER_TIMEOUTS`]
    /// election timeouts, or already follows that sender: a member that was
    /// down while a node was added, and comes back when that node leads,
    /// must still catch up. A leader takes nothing from a non-member.
    fn admit(&mut self, msg: &E::Message) -> bool {
        // The core weighs it against its own commit index (a stale sender
        // proves nothing), whoever sends it.
        if msg.is_not_member() {
            return true;
        }
        let conf = self.raft.conf_state();
        if conf.contains(msg.from()) {
            return true;
        }
        if !msg.is_leader_traffic() {
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
        if leader == Some(msg.from()) {
            return true;
        }
        let wait = STRANGER_LEADER_TIMEOUTS.saturating_mul(self.cfg.raft.election_tick as u64);
        if leader.is_none() && self.ticks_without_leader >= wait {
            tracing::info!(
                node = self.id,
                peer = msg.from(),
                term = msg.term(),
                "following a leader this node's configuration does not list (added while this node was away?)"
            );
            return true;
        }
        false
    }

    fn refuse(&mut self, msg: &E::Message) {
        self.refused_non_member += 1;
        let Some(repeated) = self.refusal_log_per_peer.allow(msg.from()) else {
            return;
        };
        if let Some(suppressed) = self.refusal_log.allow() {
            tracing::warn!(
                node = self.id,
                peer = msg.from(),
                kind = msg.name(),
                repeated,
                suppressed,
                "refused a message from a node that is not a member of this node's configuration"
            );
        }
        self.tell_not_member(msg.from());
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
        self.peers.send(E::Message::not_member(
            self.id,
            to,
            self.raft.term(),
            commit,
        ));
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

    fn handle_inbound(&mut self, inbound: Inbound<E::Message>) {
        if let Inbound::Message(msg) | Inbound::Snapshot { msg, .. } = &inbound
            && !self.admit(msg)
        {
            self.refuse(msg);
            return;
        }
        if let Inbound::Message(msg) = &inbound
            && let Some((change, reason)) = msg.conf_change_refused()
        {
            let reason = reason.to_owned();
            self.conf_change_refused(msg.from(), change, &reason);
            return;
        }
        let result = match inbound {
            Inbound::Message(m) => self.raft.step(m),
            Inbound::Snapshot { msg, image } => {
                if let Some(meta) = msg.snapshot() {
                    let known = self
                        .incoming_snapshots
                        .iter()
                        .any(|(m, _)| m.index == meta.index && m.term == meta.term);
                    if !known {
                        if self.incoming_snapshots.len() >= INCOMING_SNAPSHOTS {
                            self.incoming_snapshots.remove(0);
                        }
                        self.incoming_snapshots.push((meta.clone(), image));
                    }
                }
                self.raft.step(msg)
            }
            Inbound::Unreachable(id) => {
                self.raft.report_unreachable(id);
                Ok(())
            }
            Inbound::SnapshotStatus { to, ok } => {
                self.snapshot_sends.remove(&to);
                self.raft.report_snapshot(to, ok);
                Ok(())
            }
            Inbound::Status(status) => {
                self.on_status_report(status);
                Ok(())
            }
        };
        if let Err(e) = result {
            if let crate::raft::StepError::Malformed { from, .. } = e {
                self.refused_malformed += 1;
                // Bounded like the refusals of non-members: a peer sending
                // them in a loop cannot flood the log.
                let Some(repeated) = self.refusal_log_per_peer.allow(from) else {
                    return;
                };
                if let Some(suppressed) = self.refusal_log.allow() {
                    tracing::warn!(
                        node = self.id,
                        peer = from,
                        error = %e,
                        repeated,
                        suppressed,
                        "refused a malformed peer message"
                    );
                }
            } else {
                tracing::warn!(node = self.id, error = %e, "dropped a peer message");
            }
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

    /// Warns (at most once per 10 s) when a storage call the loop waited
    /// for took more than half an election timeout: ticks and heartbeats
    /// wait too, and a disk that slow costs elections.
    fn note_slow_storage(&mut self, what: &'static str, started: Instant) {
        let took = started.elapsed();
        if took > self.election_timeout() / 4 {
            tracing::debug!(
                node = self.id,
                took_ms = took.as_millis() as u64,
                "slow: {what}"
            );
        }
        if took > self.election_timeout() / 2
            && let Some(suppressed) = self.slow_storage_log.allow()
        {
            tracing::warn!(
                node = self.id,
                took_ms = took.as_millis() as u64,
                suppressed,
                "a storage call held up the Raft loop: {what}"
            );
        }
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

    fn send_all(&mut self, msgs: Vec<E::Message>) {
        for m in msgs {
            if let Some(meta) = m.snapshot() {
                if let Some(&(index, since)) = self.snapshot_sends.get(&m.to()) {
                    // One send per peer at a time, to its end: the core asks
                    // again while a large image is still streaming (it takes
                    // one unreported for two election timeouts as lost), and
                    // a new send would cancel the one under way — forever, for
                    // an image that takes longer than that.
                    tracing::debug!(
                        node = self.id,
                        peer = m.to(),
                        sending = index,
                        asked = meta.index,
                        for_ms = since.elapsed().as_millis() as u64,
                        "a snapshot is still being sent to this peer"
                    );
                    continue;
                }
                let image = match &self.latest_snapshot {
                    Some((stored, image)) if stored.index == meta.index => Some(image.clone()),
                    // A member added to a group that never snapshotted is
                    // sent the empty state at index 0 with the membership.
                    _ if meta.index == 0 => Some(SnapshotImage::empty()),
                    _ => None,
                };
                match image {
                    Some(image) => {
                        self.snapshot_sends
                            .insert(m.to(), (meta.index, Instant::now()));
                        self.peers.send_snapshot(m, image);
                    }
                    None => {
                        tracing::error!(
                            node = self.id,
                            "asked to send a snapshot but none is stored"
                        );
                        self.raft.report_snapshot(m.to(), false);
                    }
                }
            } else {
                self.peers.send(m);
            }
        }
    }

    /// One `ready` / `advance` cycle, if there is work.
    async fn cycle(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<ApplyEvent<M::Output, M::Snapshot, S::Prepared>>,
    ) -> Result<(), BoxError> {
        if !self.raft.has_ready() {
            self.finish_transfers();
            return Ok(());
        }
        let mut rd: Ready<E::Message> = self.raft.ready();
        // 1. Messages that do not wait for the disk.
        let msgs = std::mem::take(&mut rd.messages);
        self.send_all(msgs);
        // 2. A snapshot from the leader.
        // The image of the snapshot the engine installs, if any; the others
        // (stale, or the same snapshot sent twice) have their files go now.
        let mut incoming = std::mem::take(&mut self.incoming_snapshots);
        let taken = rd.snapshot.as_ref().and_then(|meta| {
            let i = incoming
                .iter()
                .position(|(m, _)| m.index == meta.index && m.term == meta.term)?;
            Some(incoming.swap_remove(i))
        });
        drop(incoming);
        if let Some(meta) = rd.snapshot.clone() {
            let staged = match taken {
                Some((_, d)) => d,
                None => {
                    return Err(format!("snapshot {} arrived without its image", meta.index).into());
                }
            };
            let m2 = meta.clone();
            // The entries after it go with it (every engine hands out the
            // whole log after an installed snapshot again).
            let following = if rd.entries.first().map(|e| e.index) == meta.index.checked_add(1) {
                std::mem::take(&mut rd.entries)
            } else {
                Vec::new()
            };
            let n = following.len() as u64;
            let image = self
                .with_storage(move |s| {
                    let image = s.save_snapshot(&m2, staged, &following)?;
                    s.compact(m2.index)?;
                    Ok(image)
                })
                .await?;
            self.entries_persisted += n;
            // A state machine that keeps its own applied index may be past
            // the snapshot already: after a restart the core's durable
            // commit index can trail it, so the core takes a snapshot it
            // does not need. The state machine has (or is handed, in
            // order) every entry the snapshot covers, and more: it is not
            // restored, which would take it back to the snapshot while the
            // entries after it are not handed to it again.
            if meta.index > self.handed {
                // Opened now: the file stays readable for the restore even
                // if a newer snapshot replaces this one meanwhile.
                let reader = image
                    .open()
                    .map_err(|e| format!("opening snapshot image: {e}"))?;
                // The state machine restores it on the apply task, in log
                // order (after what was handed to it before).
                self.work
                    .send(ApplyWork::Restore {
                        meta: meta.clone(),
                        image: reader,
                    })
                    .map_err(|_| "the apply task stopped")?;
                self.handed = meta.index;
                self.unapplied.push_back((meta.index, 0));
            }
            // The log restarts after it.
            self.log_bytes = 0;
            self.last_snapshot_index = meta.index;
            self.latest_snapshot = Some((meta.clone(), image));
            // This node acknowledges the snapshot (step 4) only once its
            // state machine is there: a leader that counts it caught up (to
            // promote it, say) finds its state there. Its own loop waits
            // meanwhile; the group does not.
            while self.applied < meta.index {
                match events.recv().await {
                    Some(ev) => self.on_event(ev).await?,
                    None => return Err("the apply events channel closed".into()),
                }
            }
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
            let started = Instant::now();
            self.with_storage(move |s| {
                s.append(&entries)?;
                s.set_hard_state(hs)?;
                s.sync()
            })
            .await?;
            self.note_slow_storage("appending and syncing the log", started);
            self.durable_term_vote = (hs.term, hs.vote);
            self.syncs += 1;
            self.entries_persisted += n;
        }
        // 4. Messages that acknowledge what is now durable.
        let msgs = std::mem::take(&mut rd.persisted_messages);
        self.send_all(msgs);
        // 5. Apply: handed to the apply task, which applies while the next
        // cycles persist and replicate. (The core counts these entries as
        // applied from here on; compaction and snapshots go only by what
        // the state machine has really applied, which the task reports.)
        let committed = std::mem::take(&mut rd.committed_entries);
        self.hand_off(committed)?;
        for rs in std::mem::take(&mut rd.read_states) {
            if let Some((reply, _)) = self.reads.remove(&rs.ctx) {
                self.reads_waiting_apply.push((rs.index, reply));
            }
        }
        self.serve_reads();
        self.raft.advance();
        self.publish_status();
        self.finish_transfers();
        Ok(())
    }

    /// A commit certificate from the engine: answers the proposal applied
    /// at its index, or is kept until it is applied.
    fn on_certificate(&mut self, index: Index, bytes: Vec<u8>) {
        if let Some(a) = self.awaiting_certificate.remove(&index) {
            let _ = a.reply.send(Ok(Applied {
                index,
                output: a.output,
                certificate: Some(bytes),
            }));
        } else if index > self.applied {
            self.certified.insert(index, bytes);
            while self.certified.len() > CERTIFICATE_BACKLOG {
                self.certified.pop_first();
            }
        }
    }

    /// Answers the reads whose index the state machine has applied.
    fn serve_reads(&mut self) {
        let applied = self.applied;
        let mut i = 0;
        while i < self.reads_waiting_apply.len() {
            if self.reads_waiting_apply[i].0 <= applied {
                let (index, reply) = self.reads_waiting_apply.swap_remove(i);
                let _ = reply.send(Ok(index));
            } else {
                i += 1;
            }
        }
    }

    /// Hands committed entries to the apply task (membership waiters are
    /// answered here, at commit).
    fn hand_off(&mut self, mut committed: Vec<Entry>) -> Result<(), BoxError> {
        if let Some(target) = self.snapshot_target
            && target > self.handed
            && committed.last().is_some_and(|e| e.index >= target)
            && self.build.is_none()
        {
            // A snapshot due at `target` (a PBFT checkpoint): the state
            // machine takes its view right after applying it.
            let at = committed.partition_point(|e| e.index <= target);
            let rest = committed.split_off(at);
            self.hand_off_batch(committed)?;
            self.snapshot_target = None;
            if self.handed == target {
                self.start_build()?;
            }
            return self.hand_off_batch(rest);
        }
        self.hand_off_batch(committed)
    }

    /// Hands one run of committed entries to the apply task.
    fn hand_off_batch(&mut self, committed: Vec<Entry>) -> Result<(), BoxError> {
        let Some(last) = committed.last().map(|e| e.index) else {
            return Ok(());
        };
        let bytes: u64 = committed
            .iter()
            .filter(|e| e.index > self.handed)
            .map(entry_bytes)
            .sum();
        let mut batch = Vec::new();
        // For each entry handed to the state machine: whose proposal it was.
        let mut owners = Vec::new();
        for e in committed {
            if let Some(seq) = self.appended.remove(&e.index)
                && !self.carries(&e, seq)
            {
                // Another entry was chosen at this index: ours was
                // overwritten by a new leader.
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
            if e.index <= self.handed {
                continue;
            }
            match decode_proposal(&bytes) {
                Some((node, inc, seq, _)) => {
                    let mine = node == self.id && inc == self.incarnation;
                    owners.push(mine.then_some(seq));
                    batch.push(Committed {
                        index: e.index,
                        term: e.term,
                        data: bytes.slice(HEADER..),
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
        if last <= self.handed {
            return Ok(());
        }
        self.work
            .send(ApplyWork::Batch {
                entries: batch,
                last,
                owners,
            })
            .map_err(|_| "the apply task stopped")?;
        self.handed = last;
        self.unapplied.push_back((last, bytes));
        self.unapplied_bytes += bytes;
        self.log_bytes += bytes;
        Ok(())
    }

    /// Takes what the apply task or a snapshot build reports.
    async fn on_event(
        &mut self,
        ev: ApplyEvent<M::Output, M::Snapshot, S::Prepared>,
    ) -> Result<(), BoxError> {
        match ev {
            ApplyEvent::Applied { applied, outputs } => {
                let certifies = self.raft.certifies();
                for (owner, index, output) in outputs {
                    if let Some(seq) = owner
                        && let Some(p) = self.proposals.remove(&seq)
                    {
                        if !certifies {
                            let _ = p.reply.send(Ok(Applied {
                                index,
                                output,
                                certificate: None,
                            }));
                        } else if let Some(cert) = self.certified.remove(&index) {
                            let _ = p.reply.send(Ok(Applied {
                                index,
                                output,
                                certificate: Some(cert),
                            }));
                        } else {
                            // Answered once f+1 matching replies are in, or
                            // without them at the proposal's deadline (the
                            // caller's wait ends there too).
                            self.awaiting_certificate.insert(
                                index,
                                AwaitingCertificate {
                                    reply: p.reply,
                                    output,
                                    deadline: p.deadline,
                                },
                            );
                        }
                    }
                }
                self.note_applied(applied);
                // Certificates of entries applied without a waiting
                // proposal (it timed out, or came from a snapshot) go.
                let applied = self.applied;
                self.certified.retain(|&i, _| i > applied);
            }
            ApplyEvent::Restored { applied } => self.note_applied(applied),
            ApplyEvent::View(view) => {
                let staged = self.build.as_mut().and_then(|b| b.staged.take());
                if let (Some(build), Some(staged)) = (self.build.as_mut(), staged) {
                    let events = self.events.clone();
                    build.task = Some(tokio::spawn(build_image(view, staged, events)));
                }
            }
            ApplyEvent::Built { image, index } => self.prepare_snapshot(image, index)?,
            ApplyEvent::Prepared { meta, prepared } => {
                self.register_snapshot(meta, prepared).await?
            }
            ApplyEvent::BuildFailed(e) => {
                tracing::warn!(
                    node = self.id,
                    error = %e,
                    retry_in = ?SNAPSHOT_RETRY,
                    "building a snapshot failed"
                );
                self.build = None;
                self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
            }
            ApplyEvent::Fatal(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// The state machine has applied everything up to `applied`.
    fn note_applied(&mut self, applied: Index) {
        self.applied = self.applied.max(applied);
        while let Some(&(last, bytes)) = self.unapplied.front() {
            if last > self.applied {
                break;
            }
            self.unapplied.pop_front();
            self.unapplied_bytes = self.unapplied_bytes.saturating_sub(bytes);
        }
        self.serve_reads();
        self.publish_status();
    }

    /// Starts a snapshot if the log grew enough since the last one (or one
    /// was asked for): the
    /// apply task takes a view of the state (between two batches, so it
    /// stands at an index the state machine has applied) and a task of its
    /// own writes the image into a staged file; the loop goes on meanwhile
    /// ([`Driver::store_snapshot`] takes the result).
    fn maybe_snapshot(&mut self) -> Result<(), BoxError> {
        if self.build.as_ref().is_some_and(|b| b.waiting.is_some()) {
            return self.retry_waiting_snapshot();
        }
        if self.build.is_some() || self.snapshot_retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        if let Some(target) = self.snapshot_target {
            if target > self.handed {
                // Started when the entries up to it are handed over.
                return Ok(());
            }
            // Overtaken (by a snapshot from a peer, say): choose again.
            self.snapshot_target = None;
        }
        let entries = self.handed.saturating_sub(self.last_snapshot_index);
        let due = self.snapshot_asked
            || self.log_bytes >= self.cfg.snapshot_log_bytes
            || entries >= self.cfg.snapshot_every.max(1);
        if !due {
            return Ok(());
        }
        if self.applied <= self.raft.snapshot_meta().index {
            // The latest snapshot already holds the state as it stands.
            self.snapshot_asked = false;
            return Ok(());
        }
        let align = self.snapshot_align();
        if align > 1 {
            // The image must stand exactly at a checkpoint: it is taken
            // once the entries up to the next one are handed over.
            let target = self.handed.div_ceil(align).saturating_mul(align);
            if target > self.handed {
                self.snapshot_target = Some(target);
                return Ok(());
            }
        }
        self.snapshot_target = None;
        self.start_build()
    }

    /// The index a snapshot may stand at is a multiple of this: 1, but
    /// for PBFT, which compacts only at its stable checkpoint, the
    /// checkpoint interval. Such a snapshot is built when the entries up to
    /// the next checkpoint are handed to the state machine, and stored once
    /// the group has made that checkpoint stable.
    fn snapshot_align(&self) -> u64 {
        match self.cfg.engine {
            EngineKind::Pbft => PBFT_CHECKPOINT_INTERVAL,
            _ => 1,
        }
    }

    /// Starts building a snapshot of the state as handed so far.
    fn start_build(&mut self) -> Result<(), BoxError> {
        let Some(storage) = self.storage.as_ref() else {
            return Ok(());
        };
        let dir = storage.staging_dir();
        let staged = match StagedImage::create_in(&dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    node = self.id,
                    dir = %dir.display(),
                    error = %e,
                    retry_in = ?SNAPSHOT_RETRY,
                    "cannot stage a snapshot"
                );
                self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
                return Ok(());
            }
        };
        self.work
            .send(ApplyWork::Snapshot)
            .map_err(|_| "the apply task stopped")?;
        self.snapshot_asked = false;
        self.build = Some(Build {
            staged: Some(staged),
            task: None,
            log_bytes: self.log_bytes,
            started: Instant::now(),
            waiting: None,
        });
        Ok(())
    }

    /// An image built at a PBFT checkpoint waits until the checkpoint is
    /// stable (at most [`STABLE_CHECKPOINT_WAIT`]); this tries again.
    fn retry_waiting_snapshot(&mut self) -> Result<(), BoxError> {
        let Some((staged, index, since)) = self.build.as_mut().and_then(|b| b.waiting.take())
        else {
            return Ok(());
        };
        if since.elapsed() > STABLE_CHECKPOINT_WAIT {
            tracing::warn!(
                node = self.id,
                index,
                waited_ms = since.elapsed().as_millis() as u64,
                stable = self.raft.snapshot_meta().index,
                "dropping a snapshot built at a checkpoint the group did not make stable in time"
            );
            self.build = None;
            self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
            return Ok(());
        }
        self.prepare_snapshot_since(staged, index, since)
    }

    /// A snapshot was built at `index`: makes it durable beside the
    /// storage, on a blocking thread (the fsyncs of its files would
    /// otherwise hold up the loop while the disk is busy, as it is right
    /// after writing an image).
    fn prepare_snapshot(&mut self, staged: StagedImage, index: Index) -> Result<(), BoxError> {
        self.prepare_snapshot_since(staged, index, Instant::now())
    }

    /// [`Driver::prepare_snapshot`] of an image built at `index` and
    /// waiting since `since` for its checkpoint to be stable.
    fn prepare_snapshot_since(
        &mut self,
        staged: StagedImage,
        index: Index,
        since: Instant,
    ) -> Result<(), BoxError> {
        let meta = match self.raft.snapshot_meta_at(index) {
            Ok(meta) => meta,
            Err(consensus::ready::CompactError::NotApplied { applied, .. })
                if self.snapshot_align() > 1 && applied < index =>
            {
                // PBFT: the checkpoint at `index` is not stable yet.
                if let Some(b) = self.build.as_mut() {
                    b.waiting = Some((staged, index, since));
                }
                return Ok(());
            }
            Err(e) => {
                // A snapshot from the leader overtook it.
                tracing::debug!(
                    node = self.id,
                    index,
                    error = %e,
                    "dropping a snapshot built behind the latest one"
                );
                self.build = None;
                self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
                return Ok(());
            }
        };
        let prepare = self
            .storage
            .as_ref()
            .ok_or("storage is gone after an earlier failure")?
            .snapshot_preparer();
        let events = self.events.clone();
        let m2 = meta.clone();
        tokio::task::spawn_blocking(move || {
            let prepared = prepare(m2, staged).map_err(|e| e.to_string());
            let _ = events.send(ApplyEvent::Prepared { meta, prepared });
        });
        Ok(())
    }

    /// A snapshot was made durable: the storage takes it as the latest
    /// and compacts the log behind it (keeping [`NodeConfig::snapshot_keep`]
    /// entries), then the core. Neither waits for the disk.
    async fn register_snapshot(
        &mut self,
        meta: SnapshotMeta,
        prepared: Result<S::Prepared, String>,
    ) -> Result<(), BoxError> {
        let Some(build) = self.build.take() else {
            if let Ok(p) = prepared {
                self.discard_snapshot(p);
            }
            return Ok(());
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    node = self.id,
                    index = meta.index,
                    error = %e,
                    retry_in = ?SNAPSHOT_RETRY,
                    "storing a snapshot failed"
                );
                self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
                return Ok(());
            }
        };
        if meta.index <= self.raft.snapshot_meta().index {
            // A snapshot from the leader overtook it.
            self.discard_snapshot(prepared);
            self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
            return Ok(());
        }
        let keep = self.cfg.snapshot_keep;
        let index = meta.index;
        if let Err(e) = self.raft.snapshot_meta_at(index) {
            // PBFT: the group made a later checkpoint stable while the image
            // was being made durable, and the engine compacts only at its
            // stable checkpoint, and could not start from this image after
            // a restart (the log need not hold that checkpoint's state any
            // more). The image goes; the next snapshot is tried later.
            tracing::info!(
                node = self.id,
                index,
                error = %e,
                "a snapshot was overtaken by the next stable checkpoint; it is discarded"
            );
            self.discard_snapshot(prepared);
            self.status.send_modify(|s| s.snapshots_overtaken += 1);
            self.snapshot_retry_at = Some(Instant::now() + SNAPSHOT_RETRY);
            return Ok(());
        }
        let started = Instant::now();
        let image = self
            .with_storage(move |s| {
                let image = s.register_snapshot(prepared)?;
                s.compact(index.saturating_sub(keep))?;
                Ok(image)
            })
            .await?;
        self.note_slow_storage("storing a snapshot and compacting the log", started);
        let meta = self.raft.compact_keeping(index, keep)?;
        tracing::info!(
            node = self.id,
            index,
            term = meta.term,
            bytes = image.len(),
            log_bytes = build.log_bytes,
            took_ms = build.started.elapsed().as_millis() as u64,
            "took a snapshot"
        );
        self.log_bytes = self.log_bytes.saturating_sub(build.log_bytes);
        self.last_snapshot_index = meta.index;
        let built = (build.started.elapsed(), image.len());
        self.status.send_modify(|s| {
            s.snapshots_built += 1;
            s.last_snapshot = Some(built);
        });
        self.latest_snapshot = Some((meta, image));
        self.publish_status();
        Ok(())
    }

    /// Drops a prepared snapshot the core did not take (the storage removes
    /// its files on a thread of its own).
    fn discard_snapshot(&mut self, prepared: S::Prepared) {
        if let Some(s) = self.storage.as_mut() {
            s.discard_snapshot(prepared);
        }
    }

    /// Answers the transfers whose target leads, once an entry of its term
    /// is committed here too: until then the new leader takes no
    /// membership change (and holds reads).
    fn finish_transfers(&mut self) {
        if self.transfers.is_empty()
            || self.raft.term_at(self.raft.commit_index()) != Some(self.raft.term())
        {
            return;
        }
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

    /// Every status interval: this node's own status report to each other
    /// member of its configuration (best effort; the engine is not
    /// involved), and the reports of those no longer members forgotten.
    fn send_status_reports(&mut self, now: Instant) {
        let every = self.cfg.status_interval;
        if every.is_zero() || now < self.next_status_at {
            return;
        }
        self.next_status_at = now + every;
        let conf = self.raft.conf_state();
        let status = PeerStatus {
            from: self.id,
            term: self.raft.term(),
            commit: self.raft.commit_index(),
            applied: self.applied,
            role: self.raft.role(),
        };
        for to in conf.members().filter(|&id| id != self.id) {
            self.peers.send_status(to, status);
        }
        lock_reports(&self.reports).retain(|id, _| conf.contains(*id));
    }

    /// A member's status report about itself (the transport checked it is
    /// the sender's own and within bounds): kept, with when it arrived, if
    /// the sender is a member of this node's configuration; otherwise
    /// ignored (logged once a minute per sender).
    fn on_status_report(&mut self, status: PeerStatus) {
        let from = status.from;
        if from == self.id {
            return;
        }
        if !self.raft.conf_state().contains(from) {
            if let Some(repeated) = self.status_refusal_log.allow(from) {
                tracing::warn!(
                    node = self.id,
                    peer = from,
                    repeated,
                    "status report from a node that is not a member; ignored"
                );
            }
            return;
        }
        lock_reports(&self.reports).insert(
            from,
            PeerReport {
                status,
                at: Instant::now(),
                commit_here: self.raft.commit_index(),
            },
        );
    }

    fn publish_status(&mut self) {
        let mut raft = self.raft.status();
        // What the state machine has applied, not what the core handed out.
        raft.applied = self.applied;
        self.announce(&raft);
        let (syncs, entries_persisted) = (self.syncs, self.entries_persisted);
        let (refused_non_member, refused_malformed) =
            (self.refused_non_member, self.refused_malformed);
        let uncertified = self.uncertified;
        self.status.send_modify(|s| {
            s.uncertified = uncertified;
            s.raft = raft;
            s.syncs = syncs;
            s.entries_persisted = entries_persisted;
            s.refused_non_member = refused_non_member;
            s.refused_malformed = refused_malformed;
        });
    }
}

/// Locks the members' status reports, ignoring poisoning (a map of plain
/// values stays consistent).
fn lock_reports(r: &Reports) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, PeerReport>> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Bytes an entry is counted for (see [`NodeConfig::snapshot_log_bytes`]).
fn entry_bytes(e: &Entry) -> u64 {
    let data = match &e.payload {
        EntryPayload::Normal(b) => b.len() as u64,
        _ => 0,
    };
    data + ENTRY_OVERHEAD
}

/// A snapshot being built.
struct Build {
    /// The file the image goes into, until the build task takes it.
    staged: Option<StagedImage>,
    /// The task writing it.
    task: Option<tokio::task::JoinHandle<()>>,
    /// [`Driver::log_bytes`] when it was started.
    log_bytes: u64,
    started: Instant,
    /// PBFT: the image, built at a checkpoint that is not stable yet, and
    /// since when it waits for it (see [`Driver::snapshot_align`]).
    waiting: Option<(StagedImage, Index, Instant)>,
}

/// Work for the apply task, in log order.
enum ApplyWork {
    /// Committed entries with application data, and the index up to which
    /// everything is applied after them.
    Batch {
        entries: Vec<Committed>,
        last: Index,
        /// Per entry: the sequence number of this node's proposal, if it is one.
        owners: Vec<Option<u64>>,
    },
    /// Replace the state with a snapshot image.
    Restore {
        meta: SnapshotMeta,
        image: ImageReader,
    },
    /// Take a view of the state for a snapshot.
    Snapshot,
}

/// What the apply task and snapshot builds report to the driver.
enum ApplyEvent<O, V, P> {
    /// Applied up to `applied`; each entry's output with its owner.
    Applied {
        applied: Index,
        outputs: Vec<(Option<u64>, Index, O)>,
    },
    /// A snapshot was restored; the state stands at `applied`.
    Restored { applied: Index },
    /// The view of the state a snapshot is written from.
    View(V),
    /// A snapshot image was written and sealed.
    Built { image: StagedImage, index: Index },
    /// A snapshot was made durable beside the storage.
    Prepared {
        meta: SnapshotMeta,
        prepared: Result<P, String>,
    },
    /// Building a snapshot failed (not fatal: retried later).
    BuildFailed(String),
    /// The state machine failed; the node stops.
    Fatal(String),
}

/// The apply task: owns the state machine and does what the driver hands
/// it, in order. Batches queued behind each other are applied in one call
/// (up to [`APPLY_MERGE_ENTRIES`] entries).
async fn apply_loop<M: StateMachine, P>(
    mut sm: M,
    mut work: mpsc::UnboundedReceiver<ApplyWork>,
    events: mpsc::UnboundedSender<ApplyEvent<M::Output, M::Snapshot, P>>,
) {
    let mut next = None;
    loop {
        let item = match next.take() {
            Some(w) => w,
            None => match work.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let event = match item {
            ApplyWork::Batch {
                mut entries,
                mut last,
                mut owners,
            } => {
                while entries.len() < APPLY_MERGE_ENTRIES {
                    match work.try_recv() {
                        Ok(ApplyWork::Batch {
                            entries: more,
                            last: l,
                            owners: o,
                        }) => {
                            entries.extend(more);
                            owners.extend(o);
                            last = last.max(l);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let indexes: Vec<Index> = entries.iter().map(|c| c.index).collect();
                match sm.apply(entries, last).await {
                    Ok(outputs) => ApplyEvent::Applied {
                        applied: last,
                        outputs: owners
                            .into_iter()
                            .zip(indexes)
                            .zip(outputs)
                            .map(|((owner, index), output)| (owner, index, output))
                            .collect(),
                    },
                    Err(e) => ApplyEvent::Fatal(e.to_string()),
                }
            }
            ApplyWork::Restore { meta, image } => match sm.restore(&meta, image).await {
                Ok(()) => ApplyEvent::Restored {
                    applied: meta.index,
                },
                Err(e) => ApplyEvent::Fatal(format!(
                    "restoring the snapshot at index {}: {e}",
                    meta.index
                )),
            },
            ApplyWork::Snapshot => match sm.snapshot().await {
                Ok(view) => ApplyEvent::View(view),
                Err(e) => ApplyEvent::BuildFailed(e.to_string()),
            },
        };
        let fatal = matches!(event, ApplyEvent::Fatal(_));
        if events.send(event).is_err() || fatal {
            return;
        }
    }
}

/// Writes a snapshot image from `view` into `staged` and seals it, on a
/// task of its own.
async fn build_image<O, V: SnapshotView, P>(
    view: V,
    staged: StagedImage,
    events: mpsc::UnboundedSender<ApplyEvent<O, V, P>>,
) {
    let built = async {
        // Written back as it grows (see `image::FLUSH_STEP`); stopped
        // before the seal (dropping it joins its thread: a blocking wait of
        // at most one poll and one step's flush).
        let flusher = crate::image::Flusher::start(staged.path())?;
        let written = view.write_to(staged.path().to_path_buf()).await;
        let index = tokio::task::spawn_blocking(move || drop(flusher))
            .await
            .map(|()| written)??;
        let mut staged = staged;
        let staged =
            tokio::task::spawn_blocking(move || staged.seal_written().map(|()| staged)).await??;
        Ok::<_, BoxError>((staged, index))
    }
    .await;
    let _ = events.send(match built {
        Ok((image, index)) => ApplyEvent::Built { image, index },
        Err(e) => ApplyEvent::BuildFailed(e.to_string()),
    });
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
