//! Paxos behind the engine contract: Multi-Paxos and basic Paxos.
//!
//! Lamport's *Paxos Made Simple*, with the usual engineering. Every member is
//! an acceptor, a learner and (in multi mode when it leads, in basic mode
//! always) a proposer. The log's slots are independent Paxos instances.
//!
//! # Ballots
//!
//! A [`Ballot`] is `(round, node)`, totally ordered, encoded in the shared
//! `u64` term as `round << 16 | node`: node ids are `1..=65535` (the
//! configuration refuses others) and rounds are bounded by
//! [`MAX_TERM`](crate::types::MAX_TERM). A proposer draws a new ballot with a
//! round above every ballot it has promised or seen, so no two proposers
//! share a ballot and a proposer proposes at most one value per slot in a
//! ballot. An acceptor keeps one promise for all slots (its `HardState`
//! term): promising more than a single slot needs is always safe.
//!
//! # Multi mode
//!
//! A node that hears no leader for a randomized election timeout takes
//! over: phase 1 with a new ballot `b` for every slot from its first
//! unchosen one (`Prepare`). Each acceptor promises `b` and answers with
//! every value it holds from there — `(slot, ballot, value)` — and its chosen
//! prefix (`Promise`). With a majority, the new leader learns outright the
//! values an acceptor reports as chosen, and for every other slot up to the
//! highest reported proposes the value with the highest ballot, or a no-op
//! (`EntryPayload::Empty`) for a hole. Then phase 2 per slot (`Accept`):
//! proposals are batched and pipelined (the proposals made until the next
//! `ready` are accepted by the leader's own acceptor and sent in one batch,
//! as Raft appends; `max_inflight_msgs` batches in flight), and a slot is
//! chosen when a majority accepted it in `b` — the leader's own acceptance
//! counts only once durable. Followers forward proposals and reads; a
//! candidate keeps proposals until it leads.
//!
//! Learners learn through the leader: its heartbeats and accepts carry its
//! chosen prefix and name its ballot. An acceptor whose value at a slot of
//! that prefix was accepted in the leader's ballot holds the leader's own
//! proposal there, hence the chosen value; otherwise it answers with its
//! prefix and the leader sends the chosen values (`Learn`), or its snapshot
//! when they are compacted away. An acceptor asked to accept in a slot it
//! already knows chosen sends the leader the chosen value instead.
//!
//! Why learning by ballot is sound: a node knows a value chosen in ballot
//! `c` only once it has promised `c` or higher (it learns through the
//! leader of a ballot it promised, through promises to its own ballot, or
//! from the leader of a ballot it acknowledged), and every message that
//! teaches chosen values carries the sender's promise; a leader of `b` steps
//! down on a message of a higher ballot first. So a leader of `b` only ever
//! learns values chosen in ballots up to `b`, which are its own proposals
//! where it made one (phase 1 guarantees a proposal of `b` carries any value
//! chosen below `b`), and an acceptor holding the leader's ballot at a slot
//! the leader says is chosen holds the chosen value.
//!
//! Reads: the leader records its read point — its chosen prefix, and at
//! least the last slot it re-proposed on takeover (values chosen by earlier
//! leaders are at or below it) — and sends a heartbeat round; once a
//! majority answers that it still holds the leader's ballot (no higher one
//! was promised, so no other leader chose anything), the read is safe at that
//! point. A follower's read is forwarded and answered with the point.
//!
//! # Basic mode
//!
//! No leader: the node a value is proposed at runs both phases for it on the
//! first slot it does not know chosen, with a fresh ballot. If phase 1
//! reports a value there, it proposes that one and retries its own on the
//! next slot; once a majority accepted, it tells everyone (`Learn`).
//! Rejected proposers back off for a random number of ticks. A read runs a
//! no-op through both phases and its slot is the read point. Each node
//! announces its chosen prefix every heartbeat so that members that missed a
//! `Learn` catch up. `propose` and `read_index` answer
//! `Forwarded { to: own id }`: the slot is known only once chosen. A value
//! is chosen at most once, like a forwarded proposal: if the slot where its
//! proposer sent it out is chosen but reaches the proposer only inside a
//! snapshot, the proposer cannot tell whether it was its value and does not
//! propose it again.
//!
//! # Durability on the shared storage
//!
//! The driver's storage knows only entries and a hard state. The acceptor's
//! promise is `HardState::term`, the chosen prefix `HardState::commit`
//! (`vote` is unused), and the value it accepted at slot `s` in ballot `b` is
//! `Entry { index: s, term: b, payload }`. Storage keeps entries contiguous
//! after the snapshot, so a slot below an accepted one where nothing was
//! accepted holds a placeholder `Entry { term: 0, payload: Empty }` — ballot 0
//! means "nothing accepted" and is never reported in a promise. Persisting
//! entries replaces every stored entry at or after the first one's index, so
//! whenever an acceptor writes a slot below others it holds, it hands out the
//! whole suffix again with its kept ballots and values; installing a
//! snapshot hands out every value above it again. An acceptor never forgets
//! an accepted value and its ballot at a slot never goes down (a chosen value
//! it learns keeps the higher of the two ballots). Promises, acceptances and
//! commit acknowledgements leave in `persisted_messages`, after the state
//! they describe is durable.
//!
//! # Safety
//!
//! The classic argument: a value chosen at slot `s` in ballot `b` was accepted
//! by a majority, which intersects the majority any later ballot's phase 1
//! hears from; those acceptors promised the later ballot, so they accept
//! nothing below it any more, and report a value at `s` of ballot at least
//! `b`. By induction on ballots every proposal after `b` at `s` carries the
//! chosen value. Compaction would break that (an acceptor no longer holds the
//! values of its snapshot), so an acceptor whose snapshot covers slots a
//! prepare asks about sends the candidate its snapshot, and the candidate
//! proposes nothing until it has installed one at least that far. Every
//! answer leaves only once durable, so a restart never undoes a promise or an
//! acceptance that someone counted.
//!
//! Membership is fixed at start: membership changes and leadership transfer
//! answer `Unsupported`.

mod config;
mod core;
mod engine;
mod message;

pub use config::{Config, ConfigError, MAX_NODE_ID, Mode};
pub use core::MultiPaxos;
pub use message::{Message, MessageKind};

use crate::types::{NodeId, Term};

/// A ballot: `round << 16 | node`, carried where the contract says term.
pub type Ballot = Term;

/// The ballot of `round` for `node`.
pub fn ballot(round: u64, node: NodeId) -> Ballot {
    (round << 16) | (node & MAX_NODE_ID)
}

/// The proposer a ballot belongs to.
pub fn ballot_node(b: Ballot) -> NodeId {
    b & MAX_NODE_ID
}

/// The round of a ballot.
pub fn ballot_round(b: Ballot) -> u64 {
    b >> 16
}
