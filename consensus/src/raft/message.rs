//! Messages exchanged between members of the group.

use serde::{Deserialize, Serialize};

use crate::types::{ConfChange, Entry, Index, NodeId, SnapshotMeta, Term};

/// One message from one member to another.
///
/// `term` is the sender's term, except for pre-vote requests, which carry
/// the term the sender *would* campaign in, and for pre-vote responses that
/// grant, which echo that term (§9.6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// See the type documentation.
    pub term: Term,
    /// What the message says.
    pub kind: MessageKind,
}

/// The body of a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    /// AppendEntries (§5.3): the leader's entries following `(prev_index, prev_term)`.
    Append {
        /// Index of the entry immediately preceding `entries`.
        prev_index: Index,
        /// Term of the entry at `prev_index`.
        prev_term: Term,
        /// Entries to append; may be empty (a probe).
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: Index,
    },
    /// Reply to [`MessageKind::Append`] (and to [`MessageKind::Snapshot`]).
    AppendResponse {
        /// On success: the highest index the follower now matches. On
        /// rejection: the `prev_index` that did not match.
        index: Index,
        /// Whether the append was rejected by the log consistency check.
        reject: bool,
        /// On rejection, a hint for fast backtracking: the follower's
        /// `(index, term)` of the last entry at or below the rejected index
        /// whose term is not greater than the leader's `prev_term` (§5.3, "the
        /// protocol can be optimized").
        hint: Option<(Index, Term)>,
    },
    /// RequestVote (§5.2), or a pre-vote request when `pre` is set (§9.6).
    Vote {
        /// Whether this is a pre-vote.
        pre: bool,
        /// Index of the candidate's last log entry.
        last_index: Index,
        /// Term of the candidate's last log entry.
        last_term: Term,
        /// Whether the election was started by a leadership transfer, which
        /// overrides the check-quorum lease of the voters (§3.10).
        transfer: bool,
    },
    /// Reply to [`MessageKind::Vote`].
    VoteResponse {
        /// Whether it answers a pre-vote.
        pre: bool,
        /// Whether the vote was granted.
        granted: bool,
    },
    /// Leader heartbeat: asserts leadership and carries the commit index
    /// (capped at what the follower is known to match).
    Heartbeat {
        /// Commit index the follower may advance to.
        commit: Index,
        /// A ReadIndex request context being confirmed by this round, if any.
        ctx: Option<Vec<u8>>,
    },
    /// Reply to [`MessageKind::Heartbeat`].
    HeartbeatResponse {
        /// The context of the heartbeat answered.
        ctx: Option<Vec<u8>>,
    },
    /// InstallSnapshot (§7). Carries only the metadata; the driver ships the
    /// state machine image alongside.
    Snapshot {
        /// What the snapshot covers.
        meta: SnapshotMeta,
    },
    /// A proposal forwarded from a follower to its leader.
    Propose {
        /// The proposed entries (index and term are assigned by the leader).
        entries: Vec<Entry>,
    },
    /// A ReadIndex request forwarded from a follower to its leader (§6.4).
    ReadIndex {
        /// Opaque request context chosen by the requester.
        ctx: Vec<u8>,
    },
    /// The leader's answer to a forwarded [`MessageKind::ReadIndex`].
    ReadIndexResponse {
        /// The context of the request.
        ctx: Vec<u8>,
        /// The commit index the read must wait for.
        index: Index,
    },
    /// Leadership transfer: tells the target to start an election at once (§3.10).
    TimeoutNow,
    /// A leadership-transfer request forwarded from a follower to its leader.
    TransferLeader {
        /// The node that should become leader.
        to: NodeId,
    },
    /// The sender's configuration, committed at `commit`, does not list the
    /// recipient: it was removed. Sent by the node driver, not the core —
    /// in answer to a message it refused from a non-member, and by each
    /// member that applies the recipient's removal (§4.2.3: a removed
    /// server may never receive the entry that removes it). The recipient
    /// believes it only if it does not know that far of the log yet (see
    /// [`Raft::removed`](super::Raft::removed)).
    NotMember {
        /// The sender's commit index, at which the recipient is not a member.
        commit: Index,
    },
    /// A membership change forwarded from a follower to its leader, which
    /// checks it against its guards unless `force` is set
    /// (see [`Raft::propose_conf_change_checked`](super::Raft::propose_conf_change_checked)).
    ProposeConfChange {
        /// The change.
        change: ConfChange,
        /// Skip the guards.
        force: bool,
    },
    /// The answer to a [`MessageKind::ProposeConfChange`] that was not
    /// appended: why. Handled by the node driver, which answers the request
    /// waiting for that change.
    ConfChangeRefused {
        /// The change refused.
        change: ConfChange,
        /// Why, for the operator.
        reason: String,
    },
}

impl MessageKind {
    /// A short name for logs and traces.
    pub fn name(&self) -> &'static str {
        match self {
            MessageKind::Append { .. } => "Append",
            MessageKind::AppendResponse { .. } => "AppendResponse",
            MessageKind::Vote { pre: true, .. } => "PreVote",
            MessageKind::Vote { pre: false, .. } => "Vote",
            MessageKind::VoteResponse { pre: true, .. } => "PreVoteResponse",
            MessageKind::VoteResponse { pre: false, .. } => "VoteResponse",
            MessageKind::Heartbeat { .. } => "Heartbeat",
            MessageKind::HeartbeatResponse { .. } => "HeartbeatResponse",
            MessageKind::Snapshot { .. } => "Snapshot",
            MessageKind::Propose { .. } => "Propose",
            MessageKind::ReadIndex { .. } => "ReadIndex",
            MessageKind::ReadIndexResponse { .. } => "ReadIndexResponse",
            MessageKind::TimeoutNow => "TimeoutNow",
            MessageKind::TransferLeader { .. } => "TransferLeader",
            MessageKind::NotMember { .. } => "NotMember",
            MessageKind::ProposeConfChange { .. } => "ProposeConfChange",
            MessageKind::ConfChangeRefused { .. } => "ConfChangeRefused",
        }
    }
}
