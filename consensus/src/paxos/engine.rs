//! Paxos behind the engine contract.

use super::{Message, MessageKind, Mode, MultiPaxos};
use crate::engine::{Engine, EngineKind, EngineMessage, Status};
use crate::ready::{CompactError, ProposeError, Proposed, Ready, StepError};
use crate::types::{ConfChange, ConfState, HardState, Index, NodeId, Role, SnapshotMeta, Term};

impl EngineMessage for Message {
    fn from(&self) -> NodeId {
        self.from
    }
    fn to(&self) -> NodeId {
        self.to
    }
    fn term(&self) -> Term {
        self.ballot
    }
    fn name(&self) -> &'static str {
        self.kind.name()
    }
    fn snapshot(&self) -> Option<&SnapshotMeta> {
        match &self.kind {
            MessageKind::Snapshot { meta } => Some(meta),
            _ => None,
        }
    }
    fn is_leader_traffic(&self) -> bool {
        matches!(
            self.kind,
            MessageKind::Accept { .. }
                | MessageKind::Commit { .. }
                | MessageKind::Learn { .. }
                | MessageKind::Snapshot { .. }
        )
    }
    fn is_not_member(&self) -> bool {
        matches!(self.kind, MessageKind::NotMember { .. })
    }
    fn not_member(from: NodeId, to: NodeId, term: Term, commit: Index) -> Self {
        Message {
            from,
            to,
            ballot: term,
            kind: MessageKind::NotMember { commit },
        }
    }
    fn conf_change_refused(&self) -> Option<(ConfChange, &str)> {
        None
    }
}

impl Engine for MultiPaxos {
    type Message = Message;

    fn kind(&self) -> EngineKind {
        match self.mode() {
            Mode::Multi => EngineKind::MultiPaxos,
            Mode::Basic => EngineKind::BasicPaxos,
        }
    }
    fn id(&self) -> NodeId {
        MultiPaxos::id(self)
    }
    fn role(&self) -> Role {
        MultiPaxos::role(self)
    }
    fn term(&self) -> Term {
        MultiPaxos::ballot(self)
    }
    fn leader(&self) -> Option<NodeId> {
        MultiPaxos::leader(self)
    }
    fn hard_state(&self) -> HardState {
        MultiPaxos::hard_state(self)
    }
    fn commit_index(&self) -> Index {
        MultiPaxos::commit_index(self)
    }
    fn applied_index(&self) -> Index {
        MultiPaxos::applied_index(self)
    }
    fn term_at(&self, index: Index) -> Option<Term> {
        MultiPaxos::term_at(self, index)
    }
    fn conf_state(&self) -> &ConfState {
        MultiPaxos::conf_state(self)
    }
    fn snapshot_meta(&self) -> &SnapshotMeta {
        MultiPaxos::snapshot_meta(self)
    }
    fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        MultiPaxos::snapshot_meta_at(self, index)
    }
    fn status(&self) -> Status {
        MultiPaxos::status(self)
    }
    fn tick(&mut self) {
        MultiPaxos::tick(self)
    }
    fn campaign(&mut self) {
        MultiPaxos::campaign(self)
    }
    fn step(&mut self, msg: Message) -> Result<(), StepError> {
        MultiPaxos::step(self, msg)
    }
    fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        MultiPaxos::propose(self, data)
    }
    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        MultiPaxos::read_index(self, ctx)
    }
    fn report_unreachable(&mut self, _id: NodeId) {}
    fn report_snapshot(&mut self, id: NodeId, success: bool) {
        MultiPaxos::report_snapshot(self, id, success)
    }
    fn compact_keeping(&mut self, index: Index, keep: u64) -> Result<SnapshotMeta, CompactError> {
        MultiPaxos::compact_keeping(self, index, keep)
    }
    fn has_ready(&self) -> bool {
        MultiPaxos::has_ready(self)
    }
    fn ready(&mut self) -> Ready<Message> {
        MultiPaxos::ready(self)
    }
    fn advance(&mut self) {
        MultiPaxos::advance(self)
    }
}
