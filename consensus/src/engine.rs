//! The contract between a consensus engine and the driver that runs it.
//!
//! An engine replicates a log: it orders opaque proposals into numbered
//! entries that every member applies in the same order. It is sans-IO. Time
//! arrives as [`Engine::tick`], messages from other members as
//! [`Engine::step`], requests as [`Engine::propose`] and
//! [`Engine::read_index`]. Everything the engine wants done comes out of
//! [`Engine::ready`] as a [`Ready`]: messages to send at once, entries and
//! hard state to make durable, messages that may only leave once those are
//! durable, committed entries to apply in order, and reads that became
//! safe. The driver does the work in the order documented on [`Ready`] and
//! then calls [`Engine::advance`].
//!
//! The log vocabulary is shared by every engine, so one durable storage
//! serves them all: an [`Entry`](crate::types::Entry) has an index and a
//! `term` — Raft's term, or the ballot a Paxos acceptor accepted the value
//! in —, the [`HardState`] is the engine's durable promise (Raft's term,
//! vote and commit; a Paxos acceptor's promised ballot and the chosen
//! prefix), and a snapshot covers a prefix of the log. Persisting
//! `Ready::entries` replaces every stored entry at or after the first one's
//! index; an engine that must keep later entries hands them out again.
//!
//! Membership changes, leadership transfer and removal are optional: an
//! engine without them answers [`ProposeError::Unsupported`] /
//! [`TransferError::Unsupported`].

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::raft::{ProgressState, ProgressStatus, Status};
use crate::ready::{
    Certificate, CompactError, ProposeError, Proposed, Ready, StepError, TransferError,
};
use crate::types::{ConfChange, ConfState, HardState, Index, NodeId, Role, SnapshotMeta, Term};

/// The consensus algorithm a group runs. Every member of a group runs the
/// same one; members refuse peers that run another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EngineKind {
    /// Raft (the default): one round trip per committed write in steady state.
    Raft,
    /// Multi-Paxos with a distinguished proposer: phase 1 once per ballot,
    /// phase 2 per slot, one round trip per write in steady state.
    MultiPaxos,
    /// Basic Paxos: every value runs both phases, no distinguished
    /// proposer; two round trips per write.
    BasicPaxos,
    /// PBFT: tolerates f Byzantine members among 3f+1; three message
    /// phases per batch, every message signed.
    Pbft,
}

impl EngineKind {
    /// Every engine, in the order of [`EngineKind::name`]'s documentation.
    pub const ALL: [EngineKind; 4] = [
        EngineKind::Raft,
        EngineKind::MultiPaxos,
        EngineKind::BasicPaxos,
        EngineKind::Pbft,
    ];

    /// The engine's name on the command line, in the peer handshake and in
    /// status: `raft`, `multi-paxos`, `basic-paxos` or `pbft`.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Raft => "raft",
            EngineKind::MultiPaxos => "multi-paxos",
            EngineKind::BasicPaxos => "basic-paxos",
            EngineKind::Pbft => "pbft",
        }
    }

    /// Whether the engine supports membership changes and leadership
    /// transfer.
    pub fn reconfigurable(self) -> bool {
        matches!(self, EngineKind::Raft)
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EngineKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!("unknown consensus engine {s:?}: expected raft, multi-paxos, basic-paxos or pbft")
            })
    }
}

/// What the driver and the transport need to know of an engine's message
/// without understanding it.
pub trait EngineMessage:
    Clone + fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The sender.
    fn from(&self) -> NodeId;
    /// The recipient.
    fn to(&self) -> NodeId;
    /// The sender's term (Raft) or ballot (Paxos), for logs.
    fn term(&self) -> Term;
    /// A short name of its kind, for logs and traces.
    fn name(&self) -> &'static str;
    /// When the message installs a snapshot on its recipient: what the
    /// snapshot covers. The driver ships the state machine image with it,
    /// on a connection of its own.
    fn snapshot(&self) -> Option<&SnapshotMeta>;
    /// Whether it is a leader's traffic that brings a log (appends,
    /// heartbeats, snapshots): the only messages a node takes from a sender
    /// its configuration does not list.
    fn is_leader_traffic(&self) -> bool;
    /// Whether it tells its recipient that it is not a member (see
    /// [`EngineMessage::not_member`]).
    fn is_not_member(&self) -> bool;
    /// A message telling `to` that the sender's configuration, committed at
    /// `commit`, does not list it. Sent by the driver, not the engine.
    fn not_member(from: NodeId, to: NodeId, term: Term, commit: Index) -> Self;
    /// When the message answers a forwarded membership change that was not
    /// appended: the change and why.
    fn conf_change_refused(&self) -> Option<(ConfChange, &str)>;
}

/// A log-replicating consensus engine (see the module documentation).
///
/// Between [`Engine::ready`] and [`Engine::advance`] the driver calls no
/// other input.
pub trait Engine: fmt::Debug + Send + 'static {
    /// The messages members of this engine exchange.
    type Message: EngineMessage;

    /// Which algorithm this is.
    fn kind(&self) -> EngineKind;
    /// This node.
    fn id(&self) -> NodeId;
    /// Its role: the member that orders proposals is the leader.
    fn role(&self) -> Role;
    /// Its term (Raft) or current ballot (Paxos).
    fn term(&self) -> Term;
    /// The leader (distinguished proposer) it knows of.
    fn leader(&self) -> Option<NodeId>;
    /// The durable state as of the last [`Engine::advance`] plus what is
    /// pending.
    fn hard_state(&self) -> HardState;
    /// The highest index known committed (chosen, for Paxos, with every
    /// index below it).
    fn commit_index(&self) -> Index;
    /// The highest index the application has applied.
    fn applied_index(&self) -> Index;
    /// The term (or ballot) of the entry at `index`, if it is in the log or
    /// is the snapshot's last.
    fn term_at(&self, index: Index) -> Option<Term>;
    /// The membership in force.
    fn conf_state(&self) -> &ConfState;
    /// The latest snapshot's metadata.
    fn snapshot_meta(&self) -> &SnapshotMeta;
    /// The metadata a snapshot taken at the applied `index` would have.
    fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError>;
    /// Set while a member's word stands that a configuration committed at
    /// this index no longer lists this node. Engines without membership
    /// changes answer `None`.
    fn removed(&self) -> Option<Index> {
        None
    }
    /// A summary for operators and tests.
    fn status(&self) -> Status;

    /// One logical clock tick.
    fn tick(&mut self);
    /// Starts an election (a takeover, for Paxos) at once.
    fn campaign(&mut self);
    /// Takes a message from another member.
    fn step(&mut self, msg: Self::Message) -> Result<(), StepError>;
    /// Proposes an opaque value for the log.
    fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError>;
    /// Proposes a membership change, checked against the engine's guards
    /// unless `force`.
    fn propose_conf_change_checked(
        &mut self,
        change: ConfChange,
        force: bool,
    ) -> Result<Proposed, ProposeError> {
        let _ = (change, force);
        Err(ProposeError::Unsupported)
    }
    /// Asks for a linearizable read point: a [`crate::ready::ReadState`]
    /// with `ctx` comes out of a later `ready` once it is safe.
    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError>;
    /// Hands leadership to `to`.
    fn transfer_leader(&mut self, to: NodeId) -> Result<(), TransferError> {
        let _ = to;
        Err(TransferError::Unsupported)
    }
    /// The transport could not reach `id`.
    fn report_unreachable(&mut self, id: NodeId);
    /// A snapshot sent to `id` arrived (or failed).
    fn report_snapshot(&mut self, id: NodeId, success: bool);
    /// Compacts the log up to the applied `index`, keeping `keep` entries
    /// below it for members that trail a little.
    fn compact_keeping(&mut self, index: Index, keep: u64) -> Result<SnapshotMeta, CompactError>;

    /// Whether [`Engine::ready`] has anything.
    fn has_ready(&self) -> bool;
    /// Takes the work accumulated since the last call.
    fn ready(&mut self) -> Ready<Self::Message>;
    /// Acknowledges that the last [`Ready`] was handled.
    fn advance(&mut self);

    /// Whether this engine assembles commit certificates for its own
    /// proposals (PBFT). A driver that answers a proposal only with its
    /// certificate waits for one only from such an engine.
    fn certifies(&self) -> bool {
        false
    }
    /// Takes the commit certificates assembled since the last call (none
    /// for an engine that does not certify). They come out of inputs
    /// (`step`, `tick`) for entries already handed out as committed, and
    /// do not make [`Engine::has_ready`] true: a driver takes them after
    /// each round of inputs. An engine keeps a bounded number for a driver
    /// that does not take them.
    fn take_certificates(&mut self) -> Vec<Certificate> {
        Vec::new()
    }
}
