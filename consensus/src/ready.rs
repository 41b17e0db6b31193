//! What the core hands to its driver, and the errors of its inputs.

use crate::types::{Entry, HardState, Index, InvalidConfChange, NodeId, Role, SnapshotMeta, Term};

/// Who leads, as this node sees it. Not persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    /// The leader this node knows of, if any.
    pub leader: Option<NodeId>,
    /// This node's role.
    pub role: Role,
}

/// A ReadIndex request that became safe to serve: once the local state
/// machine has applied `index`, a read for `ctx` is linearizable (§6.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The commit index the read must wait for.
    pub index: Index,
    /// The context given to [`crate::raft::Raft::read_index`].
    pub ctx: Vec<u8>,
}

/// A commit certificate the engine assembled for one of this node's own
/// proposals (PBFT: f+1 matching signed replies, see
/// [`crate::pbft::certificate`]). Taken with
/// [`Engine::take_certificates`](crate::engine::Engine::take_certificates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    /// The log index (sequence number) the proposal executed at.
    pub index: Index,
    /// The encoded certificate (for PBFT the JSON document of
    /// [`crate::pbft::certificate`]).
    pub bytes: Vec<u8>,
}

/// A batch of work for the driver. Handle it in this order, then call
/// [`crate::raft::Raft::advance`], without calling any other input of the core in
/// between:
///
/// 1. send `messages` (they do not depend on anything being durable);
/// 2. if `snapshot` is set, install the state machine image received with it
///    and persist its metadata; it replaces the whole log, so discard every
///    stored entry (§7), also those after its index;
/// 3. persist `entries` — truncating any stored entries at or after
///    `entries[0].index` first — and `hard_state`, durably (fsync);
/// 4. send `persisted_messages`, which acknowledge what step 3 made durable;
/// 5. apply `committed_entries` in order and serve `read_states` once their
///    index is applied.
///
/// `M` is the engine's message type ([`crate::raft::Message`] for Raft).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready<M> {
    /// Set when the leader or role changed since the last batch.
    pub soft_state: Option<SoftState>,
    /// Set when term, vote or commit changed since the last batch.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader, to install before `entries`.
    pub snapshot: Option<SnapshotMeta>,
    /// Entries to append to durable storage.
    pub entries: Vec<Entry>,
    /// Messages that may leave at once.
    pub messages: Vec<M>,
    /// Messages that may only leave after `entries`, `hard_state` and
    /// `snapshot` are durable.
    pub persisted_messages: Vec<M>,
    /// Committed entries to apply to the state machine, in order.
    pub committed_entries: Vec<Entry>,
    /// ReadIndex requests that became safe.
    pub read_states: Vec<ReadState>,
}

impl<M> Default for Ready<M> {
    fn default() -> Self {
        Ready {
            soft_state: None,
            hard_state: None,
            snapshot: None,
            entries: Vec::new(),
            messages: Vec::new(),
            persisted_messages: Vec::new(),
            committed_entries: Vec::new(),
            read_states: Vec::new(),
        }
    }
}

impl<M> Ready<M> {
    /// Whether the batch holds nothing to do.
    pub fn is_empty(&self) -> bool {
        self.soft_state.is_none()
            && self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.committed_entries.is_empty()
            && self.read_states.is_empty()
    }
}

/// Where a proposal went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proposed {
    /// Appended to this leader's log at `index` in `term`; it is committed
    /// when an entry at `index` with `term` comes out in `committed_entries`.
    /// If a different term comes out at `index`, the proposal was lost.
    Appended {
        /// Where the entry was appended.
        index: Index,
        /// The leader's term.
        term: Term,
    },
    /// Forwarded to the leader `to`; this node learns its fate only from the
    /// committed entries.
    Forwarded {
        /// The leader it was forwarded to.
        to: NodeId,
    },
}

/// Why a proposal, read or membership change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProposeError {
    /// No leader is known; retry once one is elected.
    NoLeader,
    /// This node is a follower and forwarding is disabled; ask `leader`.
    NotLeader {
        /// The known leader.
        leader: NodeId,
    },
    /// The leader is handing over leadership and takes no proposals meanwhile.
    TransferInProgress,
    /// Too many bytes are proposed but not yet committed; retry later.
    TooMuchUncommitted,
    /// A membership change is already in flight; only one may be pending.
    ConfChangePending,
    /// The membership change makes no sense against the current membership.
    InvalidConfChange(InvalidConfChange),
    /// The membership change is valid but unsafe now (see
    /// [`Raft::propose_conf_change_checked`](crate::raft::Raft::propose_conf_change_checked)).
    UnsafeConfChange(UnsafeConfChange),
    /// The group's consensus engine has a fixed membership.
    Unsupported,
}

/// Why the leader's guards refused a membership change that is valid but
/// would endanger the group. The caller may force it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsafeConfChange {
    /// The node to promote (or add as a voter) has not been heard from
    /// recently, or never answered the leader.
    NotConnected {
        /// The node.
        id: NodeId,
    },
    /// The learner to promote trails the leader's commit index by more than
    /// the configured lag.
    Lagging {
        /// The learner.
        id: NodeId,
        /// The highest index known to be replicated to it.
        matched: Index,
        /// The leader's commit index.
        committed: Index,
    },
    /// After the change, fewer voters than a quorum would be active.
    NoActiveQuorum {
        /// The node the change is about.
        id: NodeId,
        /// Whether the change removes or demotes `id` (otherwise it adds a voter).
        removes: bool,
        /// Voters after the change.
        voters: usize,
        /// Of those, the ones heard from recently.
        active: usize,
        /// The quorum of the voters after the change.
        quorum: usize,
    },
}

impl std::fmt::Display for UnsafeConfChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            UnsafeConfChange::NotConnected { id } => write!(
                f,
                "node {id} is not connected to the leader (it never answered it, or not \
                 recently): start it and check its peer address (a member just added may \
                 still be receiving its snapshot), then retry once it shows as active"
            ),
            UnsafeConfChange::Lagging {
                id,
                matched,
                committed,
            } => write!(
                f,
                "node {id} has not caught up (it has the log up to {matched}, the group has \
                 committed {committed}): retry when it has"
            ),
            UnsafeConfChange::NoActiveQuorum {
                id,
                removes,
                voters,
                active,
                quorum,
            } => {
                let what = if removes { "removing" } else { "promoting" };
                write!(
                    f,
                    "{what} node {id} would leave {voters} voters of which only {active} are \
                     active, fewer than the {quorum} a quorum needs, and the group would stop: \
                     bring the inactive members back (or remove an inactive one) first"
                )
            }
        }
    }
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposeError::NoLeader => write!(f, "no leader is known"),
            ProposeError::NotLeader { leader } => {
                write!(
                    f,
                    "not the leader and forwarding is off; node {leader} leads"
                )
            }
            ProposeError::TransferInProgress => write!(f, "leadership transfer in progress"),
            ProposeError::TooMuchUncommitted => write!(f, "too many uncommitted bytes"),
            ProposeError::ConfChangePending => {
                write!(f, "a membership change is already pending")
            }
            ProposeError::InvalidConfChange(e) => write!(f, "invalid membership change: {e}"),
            ProposeError::UnsafeConfChange(e) => write!(f, "unsafe membership change: {e}"),
            ProposeError::Unsupported => {
                write!(f, "the group's consensus engine has a fixed membership")
            }
        }
    }
}

impl std::error::Error for ProposeError {}

/// Why a leadership transfer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferError {
    /// No leader is known to forward the request to.
    NoLeader,
    /// The target is not a voter of the current configuration.
    NotVoter(NodeId),
    /// The group's consensus engine does not hand leadership over.
    Unsupported,
}

impl std::fmt::Display for TransferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransferError::NoLeader => write!(f, "no leader is known"),
            TransferError::NotVoter(id) => write!(f, "node {id} is not a voter"),
            TransferError::Unsupported => {
                write!(
                    f,
                    "the group's consensus engine does not transfer leadership"
                )
            }
        }
    }
}

impl std::error::Error for TransferError {}

/// Why [`crate::raft::Raft::step`] refused a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepError {
    /// The message is addressed to another node.
    WrongRecipient {
        /// The id the message was for.
        to: NodeId,
    },
    /// The message claims to come from node 0 or from this node itself.
    BadSender {
        /// The claimed sender.
        from: NodeId,
    },
    /// A message no correct member sends: a term beyond [`MAX_TERM`]
    /// (a campaign could not count past it), an index beyond
    /// [`MAX_INDEX`], a snapshot of a term above the message's, or an append whose entries do
    /// not follow `prev_index` one by one or carry terms no leader could
    /// have written (below `prev_term`, decreasing, or above the message's
    /// term). It is dropped before it can touch any state.
    ///
    /// [`MAX_TERM`]: crate::types::MAX_TERM
    /// [`MAX_INDEX`]: crate::types::MAX_INDEX
    Malformed {
        /// The sender.
        from: NodeId,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::WrongRecipient { to } => write!(f, "message addressed to node {to}"),
            StepError::BadSender { from } => write!(f, "message from invalid sender {from}"),
            StepError::Malformed { from, reason } => {
                write!(f, "malformed message from node {from}: {reason}")
            }
        }
    }
}

impl std::error::Error for StepError {}

/// Why [`crate::raft::Raft::compact`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompactError {
    /// The index is not applied yet; only applied state can be snapshotted.
    NotApplied {
        /// The index asked for.
        index: Index,
        /// What is applied.
        applied: Index,
    },
    /// The log is already compacted past the index.
    AlreadyCompacted {
        /// The index asked for.
        index: Index,
        /// The current snapshot index.
        snapshot: Index,
    },
}

impl std::fmt::Display for CompactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompactError::NotApplied { index, applied } => {
                write!(f, "cannot snapshot at {index}: only {applied} is applied")
            }
            CompactError::AlreadyCompacted { index, snapshot } => {
                write!(
                    f,
                    "cannot snapshot at {index}: already compacted to {snapshot}"
                )
            }
        }
    }
}

impl std::error::Error for CompactError {}
