//! A PBFT replica that misbehaves on purpose, for tests only (cargo
//! feature `byzantine`; never in a release build of the gateway).
//!
//! [`Byzantine`] runs a correct [`Pbft`] core and rewrites what it sends,
//! signing with its own key — a compromised member can sign as itself and
//! nobody else:
//!
//! * **equivocate**: as primary, every pre-prepare it sends to a backup of
//!   even id carries another batch for the same sequence numbers (the
//!   requests in reverse order, or a null request in place of the first
//!   when the batch has one request), the same variant on every
//!   retransmission; its COMMITs to those backups vote for the variant
//!   they got (colluding with itself), the others for the original.
//! * **lie in view changes**: its VIEW-CHANGEs hide every prepared
//!   certificate it holds (in even views) or claim one it does not have —
//!   a pre-prepare it signs for the previous view, "prepared" by PREPAREs
//!   it forges in the other members' names (in odd views); as the new
//!   primary, its NEW-VIEW re-issues a null request in place of the first
//!   re-issued one.
//! * **wrong replies**: every REPLY it sends names another history in each
//!   leaf (the hash chain with its bits flipped) and signs the Merkle root
//!   of those leaves, so its signature verifies but a client that counted
//!   its word would certify a state the group never reached.
//!
//! A correct replica refuses all of it or is not harmed by it: the tests
//! that run a group with one such member check that every client of a
//! correct member stays linearizable.

use std::collections::HashMap;
use std::sync::Arc;

use super::crypto::Crypto;
use super::{
    Message, MessageKind, NewView, Pbft, Phase, PrePrepare, PreparedCert, Signed, ViewChange, Vote,
    batch_digest,
};
use crate::engine::{Engine, EngineKind, Status};
use crate::ready::{CompactError, ProposeError, Proposed, Ready, StepError};
use crate::types::{ConfState, HardState, Index, NodeId, Role, SnapshotMeta, Term};

/// How a [`Byzantine`] replica misbehaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    /// Sends different batches for one sequence number as primary.
    pub equivocate: bool,
    /// Hides and invents prepared certificates in VIEW-CHANGE and drops a
    /// request from its NEW-VIEW.
    pub lie_in_view_change: bool,
    /// Signs REPLYs naming a history the group never reached.
    pub wrong_replies: bool,
}

impl std::str::FromStr for Mode {
    type Err = String;

    /// A comma-separated list of `equivocate`, `lie-in-view-change` and
    /// `wrong-replies`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = Mode::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "equivocate" => m.equivocate = true,
                "lie-in-view-change" => m.lie_in_view_change = true,
                "wrong-replies" => m.wrong_replies = true,
                other => {
                    return Err(format!(
                        "unknown Byzantine behaviour {other:?}: expected equivocate, \
                         lie-in-view-change or wrong-replies"
                    ));
                }
            }
        }
        Ok(m)
    }
}

/// Variants of pre-prepares kept (the oldest are forgotten beyond it).
const VARIANTS: usize = 4096;

/// A PBFT replica that misbehaves as [`Mode`] says (see the module
/// documentation).
#[derive(Debug)]
pub struct Byzantine {
    inner: Pbft,
    crypto: Arc<dyn Crypto>,
    mode: Mode,
    /// (view, first) → the variant sent to backups of even id.
    variants: HashMap<(u64, Index), Signed<PrePrepare>>,
    /// Messages it rewrote, for tests.
    rewritten: u64,
}

impl Byzantine {
    /// Wraps a correct core; `crypto` is the one the core signs with.
    pub fn new(inner: Pbft, crypto: Arc<dyn Crypto>, mode: Mode) -> Self {
        Byzantine {
            inner,
            crypto,
            mode,
            variants: HashMap::new(),
            rewritten: 0,
        }
    }

    /// The correct core inside.
    pub fn inner(&self) -> &Pbft {
        &self.inner
    }

    /// How it misbehaves.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How many messages it has rewritten so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    fn me(&self) -> NodeId {
        self.inner.id()
    }

    /// The variant of `pp` a backup of even id gets.
    fn variant(&mut self, pp: &Signed<PrePrepare>) -> Signed<PrePrepare> {
        let key = (pp.body.view, pp.body.first);
        if let Some(v) = self.variants.get(&key) {
            return v.clone();
        }
        let mut requests = pp.body.requests.clone();
        if requests.len() > 1 {
            requests.reverse();
        }
        if requests == pp.body.requests {
            requests[0] = None;
        }
        let body = PrePrepare {
            view: pp.body.view,
            first: pp.body.first,
            digest: batch_digest(pp.body.first, &requests),
            requests,
        };
        let v = Signed::sign(self.crypto.as_ref(), self.me(), body);
        if self.variants.len() >= VARIANTS {
            let oldest = self.variants.keys().min().copied();
            if let Some(k) = oldest {
                self.variants.remove(&k);
            }
        }
        self.variants.insert(key, v.clone());
        v
    }

    fn rewrite(&mut self, mut m: Message) -> Message {
        let me = self.me();
        let to_even = m.to.is_multiple_of(2);
        let changed = match &mut m.kind {
            MessageKind::PrePrepare(pp)
                if self.mode.equivocate
                    && pp.signer == me
                    && to_even
                    && !pp.body.requests.is_empty() =>
            {
                *pp = self.variant(pp);
                true
            }
            MessageKind::Commit(v) if self.mode.equivocate && v.signer == me && to_even => {
                match self.variants.get(&(v.body.view, v.body.first)) {
                    Some(var) => {
                        let body = Vote {
                            phase: Phase::Commit,
                            last: var.body.last(),
                            digest: var.body.digest,
                            ..v.body.clone()
                        };
                        *v = Signed::sign(self.crypto.as_ref(), self.me(), body);
                        true
                    }
                    None => false,
                }
            }
            MessageKind::ViewChange(vc) if self.mode.lie_in_view_change && vc.signer == me => {
                let body = self.lie(vc.body.clone());
                *vc = Signed::sign(self.crypto.as_ref(), self.me(), body);
                true
            }
            MessageKind::Reply(r) if self.mode.wrong_replies && r.reply.signer == me => {
                for leaf in &mut r.leaves {
                    for b in leaf.history.iter_mut() {
                        *b = !*b;
                    }
                }
                let client = r.reply.body.client;
                let hashes: Vec<_> = r.leaves.iter().map(|l| l.hash(client)).collect();
                let mut body = r.reply.body.clone();
                body.root = super::certificate::merkle_root(&hashes).unwrap_or(body.root);
                r.reply = Signed::sign(self.crypto.as_ref(), self.me(), body);
                true
            }
            MessageKind::NewView(nv) if self.mode.lie_in_view_change && nv.signer == me => {
                match self.drop_from_new_view(nv.body.clone()) {
                    Some(body) => {
                        *nv = Signed::sign(self.crypto.as_ref(), self.me(), body);
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        };
        if changed {
            self.rewritten += 1;
        }
        m
    }

    /// Its VIEW-CHANGE, with certificates hidden (even views) or invented
    /// (odd views).
    fn lie(&self, mut body: ViewChange) -> ViewChange {
        if body.view.is_multiple_of(2) {
            body.prepared.clear();
            return body;
        }
        let first = body.checkpoint.n + 1;
        let requests = vec![None];
        let pre_prepare = Signed::sign(
            self.crypto.as_ref(),
            self.me(),
            PrePrepare {
                view: body.view - 1,
                first,
                digest: batch_digest(first, &requests),
                requests,
            },
        );
        let vote = Vote {
            phase: Phase::Prepare,
            view: body.view - 1,
            first,
            last: first,
            digest: pre_prepare.body.digest,
        };
        // PREPAREs in other members' names, signed with its own key: a
        // correct replica finds the signatures wrong.
        let prepares = self
            .inner
            .conf_state()
            .voters
            .iter()
            .filter(|&&o| o != self.me())
            .map(|&o| {
                let mut s = Signed::sign(self.crypto.as_ref(), self.me(), vote.clone());
                s.signer = o;
                s
            })
            .collect();
        body.prepared = vec![PreparedCert {
            pre_prepare,
            prepares,
        }];
        body
    }

    /// Its NEW-VIEW with the first re-issued request made null, if any.
    fn drop_from_new_view(&self, mut body: NewView) -> Option<NewView> {
        let pp = body.pre_prepare.as_ref()?;
        let i = pp.body.requests.iter().position(Option::is_some)?;
        let mut p = pp.body.clone();
        p.requests[i] = None;
        p.digest = batch_digest(p.first, &p.requests);
        body.pre_prepare = Some(Signed::sign(self.crypto.as_ref(), self.me(), p));
        Some(body)
    }
}

impl Engine for Byzantine {
    type Message = Message;

    fn kind(&self) -> EngineKind {
        EngineKind::Pbft
    }
    fn id(&self) -> NodeId {
        self.inner.id()
    }
    fn role(&self) -> Role {
        Engine::role(&self.inner)
    }
    fn term(&self) -> Term {
        Engine::term(&self.inner)
    }
    fn leader(&self) -> Option<NodeId> {
        Engine::leader(&self.inner)
    }
    fn hard_state(&self) -> HardState {
        Engine::hard_state(&self.inner)
    }
    fn commit_index(&self) -> Index {
        Engine::commit_index(&self.inner)
    }
    fn applied_index(&self) -> Index {
        Engine::applied_index(&self.inner)
    }
    fn term_at(&self, index: Index) -> Option<Term> {
        Engine::term_at(&self.inner, index)
    }
    fn conf_state(&self) -> &ConfState {
        Engine::conf_state(&self.inner)
    }
    fn snapshot_meta(&self) -> &SnapshotMeta {
        Engine::snapshot_meta(&self.inner)
    }
    fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        Engine::snapshot_meta_at(&self.inner, index)
    }
    fn status(&self) -> Status {
        Engine::status(&self.inner)
    }
    fn tick(&mut self) {
        Engine::tick(&mut self.inner)
    }
    fn campaign(&mut self) {
        Engine::campaign(&mut self.inner)
    }
    fn step(&mut self, msg: Message) -> Result<(), StepError> {
        Engine::step(&mut self.inner, msg)
    }
    fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        Engine::propose(&mut self.inner, data)
    }
    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        Engine::read_index(&mut self.inner, ctx)
    }
    fn report_unreachable(&mut self, id: NodeId) {
        Engine::report_unreachable(&mut self.inner, id)
    }
    fn report_snapshot(&mut self, id: NodeId, success: bool) {
        Engine::report_snapshot(&mut self.inner, id, success)
    }
    fn compact_keeping(&mut self, index: Index, keep: u64) -> Result<SnapshotMeta, CompactError> {
        Engine::compact_keeping(&mut self.inner, index, keep)
    }
    fn has_ready(&self) -> bool {
        Engine::has_ready(&self.inner)
    }
    fn ready(&mut self) -> Ready<Message> {
        let mut rd = Engine::ready(&mut self.inner);
        let messages = std::mem::take(&mut rd.messages);
        rd.messages = messages.into_iter().map(|m| self.rewrite(m)).collect();
        let persisted = std::mem::take(&mut rd.persisted_messages);
        rd.persisted_messages = persisted.into_iter().map(|m| self.rewrite(m)).collect();
        rd
    }
    fn advance(&mut self) {
        Engine::advance(&mut self.inner)
    }
    fn certifies(&self) -> bool {
        Engine::certifies(&self.inner)
    }
    fn take_certificates(&mut self) -> Vec<crate::ready::Certificate> {
        Engine::take_certificates(&mut self.inner)
    }
}
