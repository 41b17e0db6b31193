//! Messages exchanged between the members of a Paxos group.

use serde::{Deserialize, Serialize};

use super::Ballot;
use crate::types::{Entry, Index, NodeId, SnapshotMeta};

/// One message from one member to another.
///
/// `ballot` is the proposer's ballot for [`MessageKind::Prepare`] and
/// [`MessageKind::Accept`] and for the answers to them (which echo it), the
/// leader's for [`MessageKind::Commit`] (and its answer), the rejected one for
/// [`MessageKind::Reject`], and otherwise the sender's promise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// See the type documentation.
    pub ballot: Ballot,
    /// What the message says.
    pub kind: MessageKind,
}

/// The body of a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    /// Phase 1a: promise `ballot` and report what you accepted in slots
    /// `first..=last` (multi: `last` is [`crate::types::MAX_INDEX`]).
    Prepare {
        /// First slot asked about.
        first: Index,
        /// Last slot asked about.
        last: Index,
    },
    /// Phase 1b: the promise, with every value accepted in the slots asked
    /// about that this acceptor still holds.
    Promise {
        /// As in the prepare.
        first: Index,
        /// As in the prepare.
        last: Index,
        /// The acceptor's chosen prefix: its values up to here are chosen.
        commit: Index,
        /// The acceptor's snapshot: it no longer holds values up to here.
        snapshot: Index,
        /// Accepted `(slot, ballot, value)` as entries, ascending.
        accepted: Vec<Entry>,
    },
    /// A prepare, accept or commit of `ballot` refused: `promised` is higher.
    Reject {
        /// The acceptor's promise.
        promised: Ballot,
    },
    /// Phase 2a: accept these values in `ballot` (their `term`), contiguous.
    Accept {
        /// The values, one per slot, ascending and contiguous.
        entries: Vec<Entry>,
        /// The sender's chosen prefix.
        commit: Index,
    },
    /// Phase 2b: the slots `first..=last` of an accept were accepted.
    Accepted {
        /// First slot accepted.
        first: Index,
        /// Last slot accepted.
        last: Index,
    },
    /// The leader's heartbeat (multi) or a node's announcement (basic) of its
    /// chosen prefix. In multi mode an acceptor whose value at a slot up to
    /// `commit` was accepted in the leader's `ballot` knows it is chosen.
    Commit {
        /// The sender's chosen prefix.
        commit: Index,
        /// The read round this heartbeat confirms (0: none).
        read_seq: u64,
    },
    /// Answer to [`MessageKind::Commit`] (and to a learn or snapshot): the
    /// acceptor still holds the leader's ballot and has chosen up to `commit`.
    CommitAck {
        /// The acceptor's chosen prefix.
        commit: Index,
        /// As in the commit answered.
        read_seq: u64,
    },
    /// Chosen values, ascending, for a member that lacks them.
    Learn {
        /// The chosen values; `term` is a ballot they were accepted in.
        entries: Vec<Entry>,
    },
    /// Install the snapshot described (the driver ships the image).
    Snapshot {
        /// What the snapshot covers.
        meta: SnapshotMeta,
    },
    /// A proposal forwarded to the leader.
    Propose {
        /// The value.
        data: Vec<u8>,
    },
    /// A read forwarded to the leader.
    ReadRequest {
        /// The read's context.
        ctx: Vec<u8>,
    },
    /// The leader's answer to a forwarded read: safe once `index` is applied.
    ReadReply {
        /// The read point.
        index: Index,
        /// The read's context.
        ctx: Vec<u8>,
    },
    /// The sender's membership does not list the recipient (sent by drivers).
    NotMember {
        /// The sender's chosen prefix.
        commit: Index,
    },
}

impl MessageKind {
    /// A short name of the kind, for logs and tests.
    pub fn name(&self) -> &'static str {
        match self {
            MessageKind::Prepare { .. } => "Prepare",
            MessageKind::Promise { .. } => "Promise",
            MessageKind::Reject { .. } => "Reject",
            MessageKind::Accept { .. } => "Accept",
            MessageKind::Accepted { .. } => "Accepted",
            MessageKind::Commit { .. } => "Commit",
            MessageKind::CommitAck { .. } => "CommitAck",
            MessageKind::Learn { .. } => "Learn",
            MessageKind::Snapshot { .. } => "Snapshot",
            MessageKind::Propose { .. } => "Propose",
            MessageKind::ReadRequest { .. } => "ReadRequest",
            MessageKind::ReadReply { .. } => "ReadReply",
            MessageKind::NotMember { .. } => "NotMember",
        }
    }
}
