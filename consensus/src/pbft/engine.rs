//! PBFT behind the engine contract.

use super::{Message, MessageKind, Pbft};
use crate::engine::{Engine, EngineKind, EngineMessage, Status};
use crate::ready::{Certificate, CompactError, ProposeError, Proposed, Ready, StepError};
use crate::types::{ConfChange, ConfState, HardState, Index, NodeId, Role, SnapshotMeta, Term};

impl EngineMessage for Message {
    fn from(&self) -> NodeId {
        self.from
    }
    fn to(&self) -> NodeId {
        self.to
    }
    fn term(&self) -> Term {
        self.view
    }
    fn name(&self) -> &'static str {
        self.kind.name()
    }
    fn snapshot(&self) -> Option<&SnapshotMeta> {
        match &self.kind {
            MessageKind::Snapshot { meta, .. } => Some(meta),
            _ => None,
        }
    }
    fn is_leader_traffic(&self) -> bool {
        matches!(
            self.kind,
            MessageKind::PrePrepare(_)
                | MessageKind::NewView(_)
                | MessageKind::Committed(_)
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
            view: term,
            kind: MessageKind::NotMember { commit },
        }
    }
    fn conf_change_refused(&self) -> Option<(ConfChange, &str)> {
        None
    }
}

impl Engine for Pbft {
    type Message = Message;

    fn kind(&self) -> EngineKind {
        EngineKind::Pbft
    }
    fn id(&self) -> NodeId {
        Pbft::id(self)
    }
    fn role(&self) -> Role {
        Pbft::role(self)
    }
    fn term(&self) -> Term {
        Pbft::view(self)
    }
    fn leader(&self) -> Option<NodeId> {
        Pbft::leader(self)
    }
    fn hard_state(&self) -> HardState {
        Pbft::hard_state(self)
    }
    fn commit_index(&self) -> Index {
        Pbft::commit_index(self)
    }
    fn applied_index(&self) -> Index {
        Pbft::applied_index(self)
    }
    fn term_at(&self, index: Index) -> Option<Term> {
        Pbft::term_at(self, index)
    }
    fn conf_state(&self) -> &ConfState {
        Pbft::conf_state(self)
    }
    fn snapshot_meta(&self) -> &SnapshotMeta {
        Pbft::snapshot_meta(self)
    }
    fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        Pbft::snapshot_meta_at(self, index)
    }
    fn status(&self) -> Status {
        Pbft::status(self)
    }
    fn tick(&mut self) {
        Pbft::tick(self)
    }
    fn campaign(&mut self) {
        Pbft::campaign(self)
    }
    fn step(&mut self, msg: Message) -> Result<(), StepError> {
        Pbft::step(self, msg)
    }
    fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        Pbft::propose(self, data)
    }
    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        Pbft::read_index(self, ctx)
    }
    fn report_unreachable(&mut self, _id: NodeId) {}
    fn report_snapshot(&mut self, id: NodeId, success: bool) {
        Pbft::report_snapshot(self, id, success)
    }
    fn compact_keeping(&mut self, index: Index, keep: u64) -> Result<SnapshotMeta, CompactError> {
        Pbft::compact_keeping(self, index, keep)
    }
    fn has_ready(&self) -> bool {
        Pbft::has_ready(self)
    }
    fn ready(&mut self) -> Ready<Message> {
        Pbft::ready(self)
    }
    fn advance(&mut self) {
        Pbft::advance(self)
    }
    fn certifies(&self) -> bool {
        true
    }
    fn take_certificates(&mut self) -> Vec<Certificate> {
        Pbft::take_certificates(self)
    }
}
