//! The [`Raft`] state machine: its state, construction, inputs that are not
//! messages, and the `ready` / `advance` cycle.

use std::collections::{BTreeMap, BTreeSet};

use super::Ready;
use super::config::{Config, ConfigError, ReadOnlyOption};
use super::log::RaftLog;
use super::message::{Message, MessageKind};
use super::progress::{Progress, ProgressStatus};
use super::read_only::ReadOnly;
use super::rng::SplitMix64;
use crate::ready::{
    CompactError, ProposeError, Proposed, ReadState, SoftState, TransferError, UnsafeConfChange,
};
use crate::types::{
    ConfChange, ConfState, Entry, EntryPayload, HardState, Index, InitialState, NodeId, Role,
    SnapshotMeta, Term,
};

/// A summary of a node's state, for operators and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Its current term.
    pub term: Term,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Highest committed index.
    pub commit: Index,
    /// Highest applied index.
    pub applied: Index,
    /// Highest durable index.
    pub persisted: Index,
    /// Last index in the log.
    pub last_index: Index,
    /// Index of the latest snapshot.
    pub snapshot_index: Index,
    /// The membership in force.
    pub conf_state: ConfState,
    /// Per-member replication progress, on the leader only.
    pub progress: BTreeMap<NodeId, ProgressStatus>,
    /// Set while a member's word stands that a configuration committed at
    /// this index no longer lists this node (see [`Raft::removed`]).
    pub removed: Option<Index>,
    /// Peer messages the engine dropped and counted since it started, by
    /// reason (PBFT: a bad signature, a sender that is not a member, another
    /// view, outside the watermarks, ...); empty for engines that refuse
    /// through the driver instead (Raft, Paxos).
    pub dropped: Vec<(&'static str, u64)>,
}

/// A sans-IO Raft node.
///
/// The core does no I/O and reads no clock: time arrives as [`Raft::tick`],
/// messages as [`Raft::step`], requests as [`Raft::propose`],
/// [`Raft::read_index`], [`Raft::propose_conf_change`] and
/// [`Raft::transfer_leader`]. Everything it wants done comes out of
/// [`Raft::ready`]; the driver does it in the order documented on [`Ready`]
/// and then calls [`Raft::advance`]. Between `ready` and `advance` the driver
/// calls no other input.
///
/// Membership changes are single-server changes (dissertation §4.1), one
/// pending at a time, taking effect on each node when it learns they are
/// committed. A new leader accepts a membership change only after it has
/// committed an entry of its own term.
#[derive(Debug)]
pub struct Raft {
    pub(crate) cfg: Config,
    pub(crate) id: NodeId,
    pub(crate) term: Term,
    pub(crate) vote: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) leader: Option<NodeId>,
    pub(crate) log: RaftLog,
    pub(crate) conf: ConfState,
    /// Membership after each committed change above the snapshot, for
    /// snapshots taken between changes.
    pub(crate) conf_history: Vec<(Index, ConfState)>,
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    pub(crate) votes: BTreeMap<NodeId, bool>,
    pub(crate) election_elapsed: u32,
    pub(crate) heartbeat_elapsed: u32,
    pub(crate) randomized_election_timeout: u32,
    pub(crate) lead_transferee: Option<NodeId>,
    /// A member said a configuration committed at this index does not list
    /// this node (see [`Raft::removed`]).
    pub(crate) removed_at: Option<Index>,
    pub(crate) pending_conf_index: Index,
    pub(crate) uncommitted_size: u64,
    pub(crate) read_only: ReadOnly,
    /// Read requests received before this leader committed an entry of its
    /// term; served once it has.
    pub(crate) pending_reads: Vec<(NodeId, Vec<u8>)>,
    pub(crate) read_states: Vec<ReadState>,
    pub(crate) msgs: Vec<Message>,
    pub(crate) msgs_after_persist: Vec<Message>,
    /// Proposals were appended since the last broadcast.
    pub(crate) bcast_pending: bool,
    pub(crate) rng: SplitMix64,
    prev_hard_state: HardState,
    prev_soft_state: SoftState,
    /// What the last `ready` handed out, acknowledged by `advance`.
    handed: Option<Handed>,
}

#[derive(Debug, Clone, Copy)]
struct Handed {
    persisted: Option<Index>,
    applied: Index,
}

impl Raft {
    /// Builds a node from its configuration and what its storage holds.
    pub fn new(cfg: Config, init: InitialState) -> Result<Raft, ConfigError> {
        cfg.validate()?;
        let InitialState {
            hard_state,
            snapshot,
            entries,
            applied,
        } = init;
        let conf = snapshot.conf_state.clone();
        let applied = applied.max(snapshot.index);
        let log = RaftLog::restore_from(snapshot, entries, hard_state.commit, applied);
        let mut raft = Raft {
            id: cfg.id,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            log,
            conf,
            conf_history: Vec::new(),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: cfg.election_tick,
            lead_transferee: None,
            removed_at: None,
            pending_conf_index: 0,
            uncommitted_size: 0,
            read_only: ReadOnly::default(),
            pending_reads: Vec::new(),
            read_states: Vec::new(),
            msgs: Vec::new(),
            msgs_after_persist: Vec::new(),
            bcast_pending: false,
            rng: SplitMix64::new(cfg.seed),
            prev_hard_state: HardState::default(),
            prev_soft_state: SoftState {
                leader: None,
                role: Role::Follower,
            },
            handed: None,
            cfg,
        };
        // Replay the committed membership changes kept in the log.
        let from = raft.log.first_index();
        let committed = raft.log.committed;
        raft.apply_conf_changes(from, committed);
        raft.prev_hard_state = raft.hard_state();
        raft.reset_randomized_election_timeout();
        Ok(raft)
    }

    // ---- getters -------------------------------------------------------

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Its role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Its current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Whom it voted for in the current term.
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }

    /// The leader it knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Term, vote and commit as they stand (not necessarily durable yet).
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }

    /// Highest committed index.
    pub fn commit_index(&self) -> Index {
        self.log.committed
    }

    /// Highest index the driver has acknowledged applying.
    pub fn applied_index(&self) -> Index {
        self.log.applied
    }

    /// Highest index the driver has acknowledged persisting.
    pub fn persisted_index(&self) -> Index {
        self.log.persisted
    }

    /// The first index still in the log (one past the snapshot).
    pub fn first_index(&self) -> Index {
        self.log.first_index()
    }

    /// The last index in the log.
    pub fn last_index(&self) -> Index {
        self.log.last_index()
    }

    /// The term of the entry at `index`, if it is in the log or is the
    /// snapshot's last index.
    pub fn term_at(&self, index: Index) -> Option<Term> {
        self.log.term(index)
    }

    /// The log entries in `[lo, hi)` that are still held.
    pub fn entries(&self, lo: Index, hi: Index) -> &[Entry] {
        self.log.slice(lo, hi)
    }

    /// The membership in force.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }

    /// The latest snapshot (index 0 if none).
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        &self.log.snapshot
    }

    /// The member leadership is being transferred to, if a transfer is running.
    pub fn lead_transferee(&self) -> Option<NodeId> {
        self.lead_transferee
    }

    /// The configured settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The current randomized election timeout, in ticks.
    pub fn randomized_election_timeout(&self) -> u32 {
        self.randomized_election_timeout
    }

    /// Whether this node may campaign: it is a voter of the configuration,
    /// and not known to have been removed from it ([`Raft::removed`]).
    pub fn is_promotable(&self) -> bool {
        self.conf.voters.contains(&self.id) && self.removed().is_none()
    }

    /// `Some(index)` while this node knows, from a member's
    /// [`MessageKind::NotMember`], that a configuration committed at `index`
    /// no longer lists it, although its own configuration (as of its lower
    /// commit index) does: it was removed and never learned it from the log
    /// (the leader stops replicating to a node once its removal commits).
    /// Such a node campaigns no more; it still takes a leader's appends, so
    /// once added again it catches up, and when its commit index reaches
    /// `index` the log speaks for itself again.
    pub fn removed(&self) -> Option<Index> {
        self.removed_at.filter(|&at| self.log.committed < at)
    }

    /// The leader's view of `id`'s replication; `None` on followers.
    pub fn progress(&self, id: NodeId) -> Option<ProgressStatus> {
        if self.role != Role::Leader {
            return None;
        }
        self.progress
            .get(&id)
            .map(|p| p.status(self.conf.learners.contains(&id)))
    }

    /// A summary of the node's state.
    pub fn status(&self) -> Status {
        let progress = if self.role == Role::Leader {
            self.progress
                .iter()
                .map(|(&id, p)| (id, p.status(self.conf.learners.contains(&id))))
                .collect()
        } else {
            BTreeMap::new()
        };
        Status {
            id: self.id,
            role: self.role,
            term: self.term,
            leader: self.leader,
            commit: self.log.committed,
            applied: self.log.applied,
            persisted: self.log.persisted,
            last_index: self.log.last_index(),
            snapshot_index: self.log.snapshot.index,
            conf_state: self.conf.clone(),
            progress,
            removed: self.removed(),
            dropped: Vec::new(),
        }
    }

    // ---- inputs --------------------------------------------------------

    /// Advances logical time by one tick: followers and candidates count
    /// towards an election, leaders towards a heartbeat and a check-quorum round.
    pub fn tick(&mut self) {
        if self.role == Role::Leader {
            self.tick_heartbeat();
        } else {
            self.tick_election();
        }
    }

    fn tick_election(&mut self) {
        self.election_elapsed += 1;
        if self.is_promotable() && self.election_elapsed >= self.randomized_election_timeout {
            self.election_elapsed = 0;
            self.campaign();
        }
    }

    fn tick_heartbeat(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_tick {
            self.election_elapsed = 0;
            if self.cfg.check_quorum {
                if !self.quorum_recently_active() {
                    let term = self.term;
                    self.become_follower(term, None);
                    return;
                }
                for (&id, pr) in self.progress.iter_mut() {
                    pr.active_last_round = pr.recent_active;
                    pr.recent_active = id == self.id;
                }
            }
            // A transfer that did not finish within an election timeout is abandoned.
            self.lead_transferee = None;
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.expire_snapshots();
            self.bcast_heartbeat();
        }
    }

    /// A snapshot neither acknowledged nor reported on within two election
    /// timeouts is taken as lost, and the follower is probed again (which
    /// sends a fresh snapshot if it still needs one). The driver normally
    /// reports the outcome sooner through [`Raft::report_snapshot`].
    fn expire_snapshots(&mut self) {
        let limit = 2 * self.cfg.election_tick;
        let step = self.cfg.heartbeat_tick;
        for pr in self.progress.values_mut() {
            if pr.state != super::progress::ProgressState::Snapshot {
                continue;
            }
            pr.snapshot_elapsed += step;
            if pr.snapshot_elapsed >= limit {
                pr.pending_snapshot = 0;
                pr.become_probe();
            }
        }
    }

    fn quorum_recently_active(&self) -> bool {
        let active = self
            .conf
            .voters
            .iter()
            .filter(|&&id| id == self.id || self.progress.get(&id).is_some_and(|p| p.recent_active))
            .count();
        active >= self.conf.quorum()
    }

    /// Starts an election now, with a pre-vote round first if enabled (the
    /// equivalent of an election timeout). Ignored on leaders and on nodes
    /// that are not voters.
    pub fn campaign(&mut self) {
        if self.role == Role::Leader || !self.is_promotable() {
            return;
        }
        if self.cfg.pre_vote {
            self.start_election(true, false);
        } else {
            self.start_election(false, false);
        }
    }

    /// Proposes `data` for the log. A leader appends it; a follower forwards
    /// it to the leader it knows (unless forwarding is disabled).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        self.propose_payload(EntryPayload::Normal(data.into()))
    }

    /// Proposes a single-server membership change. Refused while another
    /// change is uncommitted, or before this leader has committed an entry
    /// of its own term.
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Proposed, ProposeError> {
        self.propose_payload(EntryPayload::ConfChange(change))
    }

    /// Proposes a single-server membership change, checked by the leader
    /// (this node, or the leader it forwards the change to) against guards
    /// that keep the group available, unless `force` is set:
    ///
    /// - a voter is added (a learner promoted) only if it is connected — it
    ///   answered the leader, within the last two check-quorum rounds — and
    ///   trails the leader's commit index by at most
    ///   [`Config::promote_max_lag`](super::Config::promote_max_lag) entries;
    /// - a change of the voters (a promotion, a removal, a demotion) is
    ///   refused if fewer voters than a quorum of the new configuration
    ///   would be connected.
    ///
    /// A refusal is [`ProposeError::UnsafeConfChange`]. A follower forwards
    /// the change as [`MessageKind::ProposeConfChange`]; the leader answers a
    /// change it does not append with [`MessageKind::ConfChangeRefused`],
    /// naming why (the driver matches it to the request).
    pub fn propose_conf_change_checked(
        &mut self,
        change: ConfChange,
        force: bool,
    ) -> Result<Proposed, ProposeError> {
        if self.role == Role::Leader {
            let (index, term) = self.leader_conf_change(change, force)?;
            return Ok(Proposed::Appended { index, term });
        }
        let leader = self.leader.ok_or(ProposeError::NoLeader)?;
        if self.cfg.disable_proposal_forwarding {
            return Err(ProposeError::NotLeader { leader });
        }
        self.send_raw(leader, 0, MessageKind::ProposeConfChange { change, force });
        Ok(Proposed::Forwarded { to: leader })
    }

    /// A membership change forwarded by `from`: appended if this node leads
    /// and the guards pass (or `force`), otherwise refused with the reason.
    pub(crate) fn forwarded_conf_change(&mut self, from: NodeId, change: ConfChange, force: bool) {
        let reason = if self.role == Role::Leader {
            match self.leader_conf_change(change, force) {
                Ok(_) => return,
                Err(e) => e.to_string(),
            }
        } else {
            format!("node {} does not lead the group (any more); retry", self.id)
        };
        self.send_raw(from, 0, MessageKind::ConfChangeRefused { change, reason });
    }

    fn leader_conf_change(
        &mut self,
        change: ConfChange,
        force: bool,
    ) -> Result<(Index, Term), ProposeError> {
        if !force {
            self.check_conf_change(change)?;
        }
        self.leader_append(EntryPayload::ConfChange(change))
    }

    /// The guards of [`Raft::propose_conf_change_checked`], on the leader.
    fn check_conf_change(&self, change: ConfChange) -> Result<(), ProposeError> {
        if self.pending_conf_index > self.log.committed {
            return Err(ProposeError::ConfChangePending);
        }
        let next = self
            .conf
            .apply(change)
            .map_err(ProposeError::InvalidConfChange)?;
        if let ConfChange::AddVoter(id) = change {
            if !self.connected(id) {
                return Err(ProposeError::UnsafeConfChange(
                    UnsafeConfChange::NotConnected { id },
                ));
            }
            let matched = self.progress.get(&id).map_or(0, |p| p.matched);
            let committed = self.log.committed;
            if matched.saturating_add(self.cfg.promote_max_lag) < committed {
                return Err(ProposeError::UnsafeConfChange(UnsafeConfChange::Lagging {
                    id,
                    matched,
                    committed,
                }));
            }
        }
        if next.voters != self.conf.voters {
            let active = next.voters.iter().filter(|&&v| self.connected(v)).count();
            let quorum = next.quorum();
            if active < quorum {
                return Err(ProposeError::UnsafeConfChange(
                    UnsafeConfChange::NoActiveQuorum {
                        id: change.node(),
                        removes: !matches!(change, ConfChange::AddVoter(_)),
                        voters: next.voters.len(),
                        active,
                        quorum,
                    },
                ));
            }
        }
        Ok(())
    }

    /// On the leader: whether `id` is this node, or answered it within the
    /// current or the previous check-quorum round.
    fn connected(&self, id: NodeId) -> bool {
        id == self.id || self.progress.get(&id).is_some_and(|p| p.connected())
    }

    fn propose_payload(&mut self, payload: EntryPayload) -> Result<Proposed, ProposeError> {
        if self.role == Role::Leader {
            let (index, term) = self.leader_append(payload)?;
            return Ok(Proposed::Appended { index, term });
        }
        let leader = self.leader.ok_or(ProposeError::NoLeader)?;
        if self.cfg.disable_proposal_forwarding {
            return Err(ProposeError::NotLeader { leader });
        }
        let entry = Entry {
            term: 0,
            index: 0,
            payload,
        };
        self.send_raw(
            leader,
            0,
            MessageKind::Propose {
                entries: vec![entry],
            },
        );
        Ok(Proposed::Forwarded { to: leader })
    }

    /// Appends one entry at the leader and starts replicating it.
    pub(crate) fn leader_append(
        &mut self,
        payload: EntryPayload,
    ) -> Result<(Index, Term), ProposeError> {
        if self.lead_transferee.is_some() || self.leaving() {
            return Err(ProposeError::TransferInProgress);
        }
        if let EntryPayload::ConfChange(change) = &payload {
            if self.pending_conf_index > self.log.committed {
                return Err(ProposeError::ConfChangePending);
            }
            self.conf
                .apply(*change)
                .map_err(ProposeError::InvalidConfChange)?;
        }
        let entry = Entry {
            term: self.term,
            index: self.log.last_index() + 1,
            payload,
        };
        let size = entry.size();
        if self.cfg.max_uncommitted_size > 0
            && self.uncommitted_size > 0
            && self.uncommitted_size + size > self.cfg.max_uncommitted_size
        {
            return Err(ProposeError::TooMuchUncommitted);
        }
        if matches!(entry.payload, EntryPayload::ConfChange(_)) {
            self.pending_conf_index = entry.index;
        }
        if !matches!(entry.payload, EntryPayload::Empty) {
            self.uncommitted_size += size;
        }
        let at = (entry.index, entry.term);
        self.log.truncate_and_append(std::slice::from_ref(&entry));
        // Appends go out when the driver next takes a `Ready`, so every
        // proposal made until then travels in one message per follower.
        self.bcast_pending = true;
        // A group of one commits as soon as the entry is durable (see `advance`).
        Ok(at)
    }

    /// Whether an uncommitted membership change in the log removes or demotes
    /// this leader. It then appends nothing after it, so when the change
    /// commits every voter that acknowledged it holds the leader's whole log:
    /// in a group of two, the remaining voter (which counts the leaving one
    /// until it learns the change committed) can still win its vote.
    fn leaving(&self) -> bool {
        if self.pending_conf_index <= self.log.committed {
            return false;
        }
        let me = self.id;
        self.log
            .slice(self.log.committed + 1, self.pending_conf_index + 1)
            .iter()
            .any(|e| {
                matches!(e.payload, EntryPayload::ConfChange(
                    ConfChange::RemoveNode(id) | ConfChange::AddLearner(id)) if id == me)
            })
    }

    /// Asks for a linearizable read point (§6.4). When it is safe, a
    /// [`ReadState`] with `ctx` comes out of [`Raft::ready`]; the read may be
    /// served once the state machine has applied its index. `ctx` must be
    /// unique among outstanding requests; a repeat is ignored.
    pub fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        if self.role == Role::Leader {
            self.leader_read_index(self.id, ctx);
            return Ok(());
        }
        let leader = self.leader.ok_or(ProposeError::NoLeader)?;
        self.send_raw(leader, 0, MessageKind::ReadIndex { ctx });
        Ok(())
    }

    /// Hands leadership to `to` (§3.10): the leader brings `to` up to date,
    /// stops taking proposals, and tells it to campaign at once. A follower
    /// forwards the request to its leader. The transfer is abandoned after an
    /// election timeout.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), TransferError> {
        if !self.conf.voters.contains(&to) {
            return Err(TransferError::NotVoter(to));
        }
        if self.role == Role::Leader {
            self.leader_transfer(to);
            return Ok(());
        }
        let leader = self.leader.ok_or(TransferError::NoLeader)?;
        if leader != to {
            self.send_raw(leader, 0, MessageKind::TransferLeader { to });
        }
        Ok(())
    }

    /// Tells the leader that the last message to `id` could not be delivered,
    /// so it stops pipelining to it and probes instead.
    pub fn report_unreachable(&mut self, id: NodeId) {
        if self.role != Role::Leader {
            return;
        }
        if let Some(pr) = self.progress.get_mut(&id)
            && pr.state == super::progress::ProgressState::Replicate
        {
            pr.become_probe();
        }
    }

    /// Tells the leader whether sending a snapshot to `id` worked. On success
    /// the leader waits for the follower's acknowledgement; on failure it
    /// probes again.
    pub fn report_snapshot(&mut self, id: NodeId, success: bool) {
        if self.role != Role::Leader {
            return;
        }
        if let Some(pr) = self.progress.get_mut(&id)
            && pr.state == super::progress::ProgressState::Snapshot
        {
            if !success {
                pr.pending_snapshot = 0;
            }
            pr.become_probe();
            // Wait for the follower's answer (or a heartbeat) before probing.
            pr.probe_sent = true;
        }
    }

    /// Records that the application took a snapshot of its state at `index`
    /// (which it has applied) and drops the log up to it. Returns the
    /// metadata to store beside the snapshot image.
    pub fn compact(&mut self, index: Index) -> Result<SnapshotMeta, CompactError> {
        self.compact_keeping(index, 0)
    }

    /// Like [`Raft::compact`], but keeps the last `keep` entries up to
    /// `index` in the log, so followers only slightly behind can still be
    /// sent entries instead of the whole snapshot.
    pub fn compact_keeping(
        &mut self,
        index: Index,
        keep: u64,
    ) -> Result<SnapshotMeta, CompactError> {
        let meta = self.snapshot_meta_at(index)?;
        self.log.compact(meta.clone(), index.saturating_sub(keep));
        self.conf_history.retain(|(i, _)| *i > index);
        Ok(meta)
    }

    /// The metadata [`Raft::compact`] would return for a snapshot at
    /// `index`, without compacting: for a driver that makes the snapshot
    /// durable first.
    pub fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        if index > self.log.applied {
            return Err(CompactError::NotApplied {
                index,
                applied: self.log.applied,
            });
        }
        if index <= self.log.snapshot.index {
            return Err(CompactError::AlreadyCompacted {
                index,
                snapshot: self.log.snapshot.index,
            });
        }
        let term = self.log.term(index).unwrap_or(self.log.snapshot.term);
        Ok(SnapshotMeta {
            index,
            term,
            conf_state: self.conf_at(index),
        })
    }

    fn conf_at(&self, index: Index) -> ConfState {
        self.conf_history
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or_else(|| self.log.snapshot.conf_state.clone(), |(_, c)| c.clone())
    }

    // ---- output --------------------------------------------------------

    fn soft_state(&self) -> SoftState {
        SoftState {
            leader: self.leader,
            role: self.role,
        }
    }

    /// Whether [`Raft::ready`] has anything to hand out.
    pub fn has_ready(&self) -> bool {
        self.soft_state() != self.prev_soft_state
            || self.hard_state() != self.prev_hard_state
            || self.log.pending_snapshot.is_some()
            || !self.log.unstable_entries().is_empty()
            || !self.msgs.is_empty()
            || !self.msgs_after_persist.is_empty()
            || !self.log.next_committed().is_empty()
            || !self.read_states.is_empty()
    }

    /// Takes the work accumulated since the last call; see [`Ready`] for
    /// what to do with it. Call [`Raft::advance`] when it is done.
    pub fn ready(&mut self) -> Ready {
        if std::mem::take(&mut self.bcast_pending) && self.role == Role::Leader {
            self.bcast_append();
        }
        let ss = self.soft_state();
        let hs = self.hard_state();
        let snapshot = self.log.pending_snapshot.take();
        let entries = self.log.unstable_entries().to_vec();
        let applied_from = snapshot
            .as_ref()
            .map_or(self.log.applied, |s| s.index.max(self.log.applied));
        let committed_entries = self
            .log
            .slice(applied_from + 1, self.log.committed + 1)
            .to_vec();
        let persisted = entries
            .last()
            .map(|e| e.index)
            .or(snapshot.as_ref().map(|s| s.index));
        let applied = committed_entries.last().map_or(applied_from, |e| e.index);
        self.log.unstable_from = self.log.last_index() + 1;
        self.handed = Some(Handed { persisted, applied });
        let rd = Ready {
            soft_state: (ss != self.prev_soft_state).then_some(ss),
            hard_state: (hs != self.prev_hard_state).then_some(hs),
            snapshot,
            entries,
            messages: std::mem::take(&mut self.msgs),
            persisted_messages: std::mem::take(&mut self.msgs_after_persist),
            committed_entries,
            read_states: std::mem::take(&mut self.read_states),
        };
        self.prev_soft_state = ss;
        self.prev_hard_state = hs;
        rd
    }

    /// Acknowledges that the last [`Ready`] was handled: its entries, hard
    /// state and snapshot are durable and its committed entries applied.
    pub fn advance(&mut self) {
        let Some(handed) = self.handed.take() else {
            return;
        };
        if let Some(p) = handed.persisted {
            self.log.persisted = p;
        }
        self.log.applied = self.log.applied.max(handed.applied);
        if self.role == Role::Leader {
            // The leader counts its own copy only once it is durable.
            let persisted = self.log.persisted;
            let id = self.id;
            if let Some(pr) = self.progress.get_mut(&id) {
                pr.maybe_update(persisted);
            }
            if self.maybe_commit() {
                self.bcast_append();
            }
        }
    }

    // ---- role changes --------------------------------------------------

    pub(crate) fn reset(&mut self, term: Term) {
        if self.term != term {
            self.term = term;
            self.vote = None;
        }
        self.leader = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.lead_transferee = None;
        self.votes.clear();
        self.progress.clear();
        self.read_only.clear();
        self.pending_reads.clear();
        self.uncommitted_size = 0;
    }

    pub(crate) fn reset_randomized_election_timeout(&mut self) {
        let lo = u64::from(self.cfg.election_tick);
        self.randomized_election_timeout = self.rng.range(lo, 2 * lo) as u32;
    }

    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.reset(term);
        self.leader = leader;
        self.role = Role::Follower;
    }

    pub(crate) fn become_pre_candidate(&mut self) {
        // Neither the term nor the vote changes (§9.6).
        self.votes.clear();
        self.progress.clear();
        self.leader = None;
        self.role = Role::PreCandidate;
    }

    pub(crate) fn become_candidate(&mut self) {
        let term = self.term + 1;
        self.reset(term);
        self.vote = Some(self.id);
        self.role = Role::Candidate;
    }

    pub(crate) fn become_leader(&mut self) {
        let term = self.term;
        self.reset(term);
        self.leader = Some(self.id);
        self.role = Role::Leader;
        let next = self.log.last_index() + 1;
        let members: Vec<NodeId> = self.conf.members().collect();
        for id in members {
            let mut pr = Progress::new(next, self.cfg.max_inflight_msgs);
            if id == self.id {
                pr.matched = self.log.persisted;
                pr.become_replicate();
                pr.recent_active = true;
            }
            self.progress.insert(id, pr);
        }
        // No membership change until an entry of this term commits
        // (dissertation §4.1, the single-server change bug): the no-op
        // appended below is that entry, so changes wait until it commits.
        self.pending_conf_index = next;
        let entry = Entry {
            term,
            index: next,
            payload: EntryPayload::Empty,
        };
        self.log.truncate_and_append(std::slice::from_ref(&entry));
        self.bcast_append();
    }

    // ---- commit and membership ----------------------------------------

    /// Advances the commit index to `index` (never backwards), applying the
    /// membership changes it commits.
    pub(crate) fn commit_to(&mut self, index: Index) {
        let index = index.min(self.log.last_index());
        if index <= self.log.committed {
            return;
        }
        let from = self.log.committed + 1;
        if self.role == Role::Leader {
            let freed: u64 = self
                .log
                .slice(from, index + 1)
                .iter()
                .filter(|e| !matches!(e.payload, EntryPayload::Empty))
                .map(Entry::size)
                .sum();
            self.uncommitted_size = self.uncommitted_size.saturating_sub(freed);
        }
        self.log.committed = index;
        self.apply_conf_changes(from, index);
    }

    fn apply_conf_changes(&mut self, from: Index, to: Index) {
        let changes: Vec<(Index, ConfChange)> = self
            .log
            .slice(from, to + 1)
            .iter()
            .filter_map(|e| match &e.payload {
                EntryPayload::ConfChange(c) => Some((e.index, *c)),
                _ => None,
            })
            .collect();
        for (index, change) in changes {
            // Validated when proposed; a change that no longer applies (it
            // cannot happen with one change pending at a time) is skipped.
            if let Ok(next) = self.conf.apply(change) {
                self.conf = next;
                self.conf_history.push((index, self.conf.clone()));
                self.on_conf_changed();
            }
        }
    }

    fn on_conf_changed(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let next = self.log.last_index() + 1;
        let members: BTreeSet<NodeId> = self.conf.members().collect();
        self.progress.retain(|id, _| members.contains(id));
        for id in members {
            self.progress.entry(id).or_insert_with(|| {
                let mut pr = Progress::new(next, self.cfg.max_inflight_msgs);
                pr.recent_active = true;
                pr
            });
        }
        if let Some(t) = self.lead_transferee
            && !self.conf.voters.contains(&t)
        {
            self.lead_transferee = None;
        }
        if !self.conf.voters.contains(&self.id) {
            // Removed or demoted: a non-voter cannot lead. First tell the
            // others the change committed: they still count this node as a
            // voter until they learn it, and once it is a follower nobody
            // else can tell them (a group of two would be stuck for good).
            self.bcast_append();
            self.bcast_heartbeat();
            let term = self.term;
            self.become_follower(term, None);
            return;
        }
        // The quorum may have shrunk.
        if self.maybe_commit() {
            self.bcast_append();
        }
    }

    /// The leader's commit rule (§5.3, §5.4.2): the highest index replicated
    /// on a quorum of voters, and only if that entry is from the current term.
    pub(crate) fn maybe_commit(&mut self) -> bool {
        let mut matched: Vec<Index> = self
            .conf
            .voters
            .iter()
            .map(|id| self.progress.get(id).map_or(0, |p| p.matched))
            .collect();
        if matched.is_empty() {
            return false;
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let index = matched[self.conf.quorum() - 1];
        if index > self.log.committed && self.log.term(index) == Some(self.term) {
            self.commit_to(index);
            self.release_pending_reads();
            return true;
        }
        false
    }

    // ---- sending -------------------------------------------------------

    /// Queues a message stamped with the current term.
    pub(crate) fn send(&mut self, to: NodeId, kind: MessageKind) {
        let term = self.term;
        self.send_raw(to, term, kind);
    }

    /// Queues a message with an explicit term. Messages that acknowledge
    /// durable state (votes, append and heartbeat responses) wait for the
    /// persist; the rest may leave at once.
    pub(crate) fn send_raw(&mut self, to: NodeId, term: Term, kind: MessageKind) {
        let after_persist = matches!(
            kind,
            MessageKind::Vote { pre: false, .. }
                | MessageKind::VoteResponse { pre: false, .. }
                | MessageKind::AppendResponse { .. }
                | MessageKind::HeartbeatResponse { .. }
        );
        let m = Message {
            from: self.id,
            to,
            term,
            kind,
        };
        if after_persist {
            self.msgs_after_persist.push(m);
        } else {
            self.msgs.push(m);
        }
    }

    pub(crate) fn lease_reads(&self) -> bool {
        self.cfg.read_only == ReadOnlyOption::LeaseBased
    }
}
