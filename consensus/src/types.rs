//! Plain data the core consumes and produces: log entries, membership,
//! hard state and snapshot metadata.

use std::collections::BTreeSet;

pub use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Identifies one member of the group. `0` is never a valid id.
pub type NodeId = u64;
/// A Raft term (§5.1). Terms only grow.
pub type Term = u64;
/// The largest term a message may carry. Each election adds one to the
/// term, so no group reaches 2^62 in any lifetime; a message beyond it is
/// refused, so a peer cannot push a member's term to where a campaign would
/// overflow it.
pub const MAX_TERM: Term = 1 << 62;
/// The largest index a message may name, for the same reason: no log
/// reaches it, and the core may add to any index it is sent.
pub const MAX_INDEX: Index = 1 << 62;
/// A position in the replicated log; the first real entry has index 1.
pub type Index = u64;

/// One record of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Term of the leader that created the entry.
    pub term: Term,
    /// Position of the entry in the log.
    pub index: Index,
    /// What the entry carries.
    pub payload: EntryPayload,
}

impl Entry {
    /// Approximate size of the entry in bytes, used for flow control.
    pub fn size(&self) -> u64 {
        let body = match &self.payload {
            EntryPayload::Empty => 0,
            EntryPayload::Normal(data) => data.len(),
            EntryPayload::ConfChange(_) => 16,
        };
        (body + 16) as u64
    }

    /// The application bytes, if this is a normal entry.
    pub fn data(&self) -> Option<&[u8]> {
        match &self.payload {
            EntryPayload::Normal(data) => Some(data),
            _ => None,
        }
    }
}

/// The content of a log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryPayload {
    /// The no-op a new leader appends to commit entries of earlier terms (§5.4.2, §8).
    Empty,
    /// Opaque application bytes; the core never looks inside. Shared, not
    /// copied, between the log, the messages that carry it and the entries
    /// handed to the application (encoded exactly as a `Vec<u8>` would be).
    Normal(Bytes),
    /// A membership change, applied by the core when it commits.
    ConfChange(ConfChange),
}

/// A single-server membership change (Raft dissertation §4.1).
///
/// Each change adds or removes at most one voter, so the majorities of the
/// configurations before and after always overlap. At most one change may be
/// uncommitted at a time; it takes effect on each node when that node learns it
/// is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConfChange {
    /// Add a voter, or promote an existing learner to voter.
    AddVoter(NodeId),
    /// Add a learner (receives the log, never votes), or demote a voter to learner.
    AddLearner(NodeId),
    /// Remove a voter or learner from the group.
    RemoveNode(NodeId),
}

impl ConfChange {
    /// The node the change is about.
    pub fn node(&self) -> NodeId {
        match *self {
            ConfChange::AddVoter(id) | ConfChange::AddLearner(id) | ConfChange::RemoveNode(id) => {
                id
            }
        }
    }
}

/// The membership of the group: who votes and who only listens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfState {
    /// Members whose votes and acknowledgements count towards quorums.
    pub voters: BTreeSet<NodeId>,
    /// Members that receive the log but never vote and are never counted.
    pub learners: BTreeSet<NodeId>,
}

impl ConfState {
    /// A configuration with the given voters and no learners.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Self {
        ConfState {
            voters: voters.into_iter().collect(),
            learners: BTreeSet::new(),
        }
    }

    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Every member, voters first.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }

    /// How many voters make a majority.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Checks that `change` is valid against this configuration and returns the
    /// configuration it produces.
    pub fn apply(&self, change: ConfChange) -> Result<ConfState, InvalidConfChange> {
        let mut next = self.clone();
        match change {
            ConfChange::AddVoter(id) => {
                if id == 0 {
                    return Err(InvalidConfChange::ZeroId);
                }
                if self.voters.contains(&id) {
                    return Err(InvalidConfChange::AlreadyVoter(id));
                }
                next.learners.remove(&id);
                next.voters.insert(id);
            }
            ConfChange::AddLearner(id) => {
                if id == 0 {
                    return Err(InvalidConfChange::ZeroId);
                }
                if self.learners.contains(&id) {
                    return Err(InvalidConfChange::AlreadyLearner(id));
                }
                if self.voters.contains(&id) && self.voters.len() == 1 {
                    return Err(InvalidConfChange::LastVoter(id));
                }
                next.voters.remove(&id);
                next.learners.insert(id);
            }
            ConfChange::RemoveNode(id) => {
                if !self.contains(id) {
                    return Err(InvalidConfChange::NotMember(id));
                }
                if self.voters.contains(&id) && self.voters.len() == 1 {
                    return Err(InvalidConfChange::LastVoter(id));
                }
                next.voters.remove(&id);
                next.learners.remove(&id);
            }
        }
        Ok(next)
    }
}

/// Why a membership change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidConfChange {
    /// Node id 0 is reserved for "nobody".
    ZeroId,
    /// The node is already a voter.
    AlreadyVoter(NodeId),
    /// The node is already a learner.
    AlreadyLearner(NodeId),
    /// The node is not a member.
    NotMember(NodeId),
    /// The change would leave the group without a voter.
    LastVoter(NodeId),
}

impl std::fmt::Display for InvalidConfChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidConfChange::ZeroId => write!(f, "node id 0 is reserved"),
            InvalidConfChange::AlreadyVoter(id) => write!(f, "node {id} is already a voter"),
            InvalidConfChange::AlreadyLearner(id) => write!(f, "node {id} is already a learner"),
            InvalidConfChange::NotMember(id) => write!(f, "node {id} is not a member"),
            InvalidConfChange::LastVoter(id) => {
                write!(f, "node {id} is the last voter; the group would have none")
            }
        }
    }
}

impl std::error::Error for InvalidConfChange {}

/// State that must be durable before any message that depends on it leaves
/// the node (§5.1 "Persistent state on all servers").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// Whom this node voted for in `term`, if anyone.
    pub vote: Option<NodeId>,
    /// The highest log index known to be committed.
    pub commit: Index,
}

/// Describes a snapshot: the state machine image covering every entry up to
/// and including `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The last log index the snapshot covers.
    pub index: Index,
    /// The term of the entry at `index`.
    pub term: Term,
    /// The membership as of `index`.
    pub conf_state: ConfState,
}

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking for pre-votes without having raised its term (§9.6).
    PreCandidate,
    /// Asking for votes in a new term (§5.2).
    Candidate,
    /// Leads the group in its term.
    Leader,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        })
    }
}

/// What a node starts from: empty for a new group, or what its storage kept.
#[derive(Clone, Debug, Default)]
pub struct InitialState {
    /// The last durable hard state.
    pub hard_state: HardState,
    /// The latest durable snapshot; index 0 when there is none, in which case
    /// its `conf_state` is the group's initial membership (empty for a node
    /// that will be added to an existing group).
    pub snapshot: SnapshotMeta,
    /// Durable entries following the snapshot, contiguous.
    pub entries: Vec<Entry>,
    /// The highest index the application has applied (at least the snapshot's).
    pub applied: Index,
}

impl InitialState {
    /// The state of a brand new group whose members are `voters`.
    pub fn bootstrap(voters: impl IntoIterator<Item = NodeId>) -> Self {
        InitialState {
            snapshot: SnapshotMeta {
                index: 0,
                term: 0,
                conf_state: ConfState::with_voters(voters),
            },
            ..InitialState::default()
        }
    }
}
