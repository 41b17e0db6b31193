//! Raft behind the engine contract: every method is the core's own.

use super::{Message, MessageKind, Raft, Ready, Status};
use crate::engine::{Engine, EngineKind, EngineMessage};
use crate::ready::{CompactError, ProposeError, Proposed, StepError, TransferError};
use crate::types::{ConfChange, ConfState, HardState, Index, NodeId, Role, SnapshotMeta, Term};

impl EngineMessage for Message {
    fn from(&self) -> NodeId {
        self.from
    }

    fn to(&self) -> NodeId {
        self.to
    }

    fn term(&self) -> Term {
        self.term
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
            MessageKind::Append { .. }
                | MessageKind::Heartbeat { .. }
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
            term,
            kind: MessageKind::NotMember { commit },
        }
    }

    fn conf_change_refused(&self) -> Option<(ConfChange, &str)> {
        match &self.kind {
            MessageKind::ConfChangeRefused { change, reason } => Some((*change, reason)),
            _ => None,
        }
    }
}

impl Engine for Raft {
    type Message = Message;

    fn kind(&self) -> EngineKind {
        EngineKind::Raft
    }
    fn id(&self) -> NodeId {
        Raft::id(self)
    }
    fn role(&self) -> Role {
        Raft::role(self)
    }
    fn term(&self) -> Term {
        Raft::term(self)
    }
    fn leader(&self) -> Option<NodeId> {
        Raft::leader(self)
    }
    fn hard_state(&self) -> HardState {
        Raft::hard_state(self)
    }
    fn commit_index(&self) -> Index {
        Raft::commit_index(self)
    }
    fn applied_index(&self) -> Index {
        Raft::applied_index(self)
    }
    fn term_at(&self, index: Index) -> Option<Term> {
        Raft::term_at(self, index)
    }
    fn conf_state(&self) -> &ConfState {
        Raft::conf_state(self)
    }
    fn snapshot_meta(&self) -> &SnapshotMeta {
        Raft::snapshot_meta(self)
    }
    fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        Raft::snapshot_meta_at(self, index)
    }
    fn removed(&self) -> Option<Index> {
        Raft::removed(self)
    }
    fn status(&self) -> Status {
        Raft::status(self)
    }
    fn tick(&mut self) {
        Raft::tick(self)
    }
    fn campaign(&mut self) {
        Raft::campaign(self)
    }
    fn step(&mut self, msg: Message) -> Result<(), StepError> {
        Raft::step(self, msg)
    }
    fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        Raft::propose(self, data)
    }
    fn propose_conf_change_checked(
        &mut self,
        change: ConfChange,
        force: bool,
    ) -> Result<Proposed, ProposeError> {
        Raft::propose_conf_change_checked(self, change, force)
    }
    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        Raft::read_index(self, ctx)
    }
    fn transfer_leader(&mut self, to: NodeId) -> Result<(), TransferError> {
        Raft::transfer_leader(self, to)
    }
    fn report_unreachable(&mut self, id: NodeId) {
        Raft::report_unreachable(self, id)
    }
    fn report_snapshot(&mut self, id: NodeId, success: bool) {
        Raft::report_snapshot(self, id, success)
    }
    fn compact_keeping(&mut self, index: Index, keep: u64) -> Result<SnapshotMeta, CompactError> {
        Raft::compact_keeping(self, index, keep)
    }
    fn has_ready(&self) -> bool {
        Raft::has_ready(self)
    }
    fn ready(&mut self) -> Ready {
        Raft::ready(self)
    }
    fn advance(&mut self) {
        Raft::advance(self)
    }
}
