//! The Paxos node: acceptor, proposer and learner in one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::config::{Config, ConfigError, MAX_NODE_ID, Mode};
use super::message::{Message, MessageKind};
use super::{Ballot, ballot_node, ballot_round};
use crate::raft::{ProgressState, ProgressStatus, SplitMix64, Status};
use crate::ready::{CompactError, ProposeError, Proposed, ReadState, Ready, SoftState, StepError};
use crate::types::{
    ConfState, Entry, EntryPayload, HardState, Index, InitialState, MAX_INDEX, MAX_TERM, NodeId,
    Role, SnapshotMeta, Term,
};

/// What an acceptor holds for one slot: the ballot it accepted the value in
/// (0: nothing accepted, a placeholder) and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    ballot: Ballot,
    payload: EntryPayload,
}

/// A value the multi-mode leader proposed in its ballot, not yet chosen.
#[derive(Clone, Debug)]
struct Proposal {
    payload: EntryPayload,
    /// Acceptors that acknowledged it in the ballot.
    votes: usize,
    /// Still counting: not yet found chosen by its votes.
    open: bool,
}

/// Adds `lo..=hi` to `set` (disjoint ranges, ascending, none adjacent) and
/// calls `new` with each part of it that was not in `set` yet.
fn add_range(
    set: &mut Vec<(Index, Index)>,
    lo: Index,
    hi: Index,
    mut new: impl FnMut(Index, Index),
) {
    let start = set.partition_point(|&(_, b)| b.saturating_add(1) < lo);
    let end = set.partition_point(|&(a, _)| a <= hi.saturating_add(1));
    let mut cur = lo;
    for &(a, b) in &set[start..end] {
        if a > cur && cur <= hi {
            new(cur, (a - 1).min(hi));
        }
        cur = cur.max(b.saturating_add(1));
    }
    if cur <= hi {
        new(cur, hi);
    }
    let merged = if start < end {
        (set[start].0.min(lo), set[end - 1].1.max(hi))
    } else {
        (lo, hi)
    };
    set.splice(start..end, [merged]);
}

/// One acceptor's answer to a prepare.
#[derive(Clone, Debug)]
struct PromiseInfo {
    commit: Index,
    snapshot: Index,
    accepted: Vec<Entry>,
}

/// A multi-mode takeover in progress: phase 1 for every slot from `first`.
#[derive(Clone, Debug)]
struct Candidacy {
    first: Index,
    promises: BTreeMap<NodeId, PromiseInfo>,
}

/// A basic-mode instance: one slot, one ballot, both phases.
#[derive(Clone, Debug)]
struct Instance {
    slot: Index,
    ballot: Ballot,
    promises: BTreeMap<NodeId, PromiseInfo>,
    /// Set in phase 2: the value proposed, and whether it is this node's own.
    value: Option<(EntryPayload, bool)>,
    accepts: BTreeSet<NodeId>,
    elapsed: u32,
}

/// A value waiting for a slot: a proposal, or a read's no-op (basic mode).
#[derive(Clone, Debug)]
struct Pending {
    payload: EntryPayload,
    read: Option<Vec<u8>>,
}

/// A read waiting for a majority to confirm the leader's ballot.
#[derive(Clone, Debug)]
struct PendingRead {
    seq: u64,
    index: Index,
    ctx: Vec<u8>,
    /// The follower that forwarded it, if any.
    to: Option<NodeId>,
    acks: BTreeSet<NodeId>,
}

/// What this node knows of another member.
#[derive(Clone, Debug, Default)]
struct Peer {
    /// Highest slot it acknowledged in the leader's ballot.
    acked: Index,
    /// Set while a snapshot is on its way to it: ticks since it was sent.
    snapshot_elapsed: Option<u32>,
    /// Heard from since the last heartbeat.
    recent: bool,
    /// Heard from between the two heartbeats before the last one.
    previous: bool,
    /// Heard from at least once in this ballot.
    heard: bool,
}

/// A sans-IO Paxos node (see the [module documentation](super)): Multi-Paxos
/// or basic Paxos, as its [`Config::mode`] says.
#[derive(Debug)]
pub struct MultiPaxos {
    cfg: Config,
    id: NodeId,
    conf: ConfState,
    quorum: usize,

    // Durable: the promise, the accepted values and the chosen prefix.
    promised: Ballot,
    /// The acceptor's slots `log_first..log_first + log.len()`, contiguous.
    log: VecDeque<Slot>,
    log_first: Index,
    snapshot: SnapshotMeta,
    commit: Index,

    applied: Index,
    /// The last committed index handed out in a `Ready`.
    handed: Index,
    /// Slots above `commit` known chosen (their value is in `log`).
    chosen_above: BTreeSet<Index>,
    /// The highest ballot seen in any message.
    max_seen: Ballot,
    role: Role,
    leader: Option<NodeId>,
    /// Own ballot while campaigning or leading (multi).
    ballot: Ballot,
    rng: SplitMix64,
    elapsed: u32,
    timeout: u32,
    heartbeat_elapsed: u32,
    peers: BTreeMap<NodeId, Peer>,

    // Multi mode, candidate and leader.
    candidacy: Option<Candidacy>,
    takeover_last: Index,
    next_slot: Index,
    sent_upto: Index,
    /// Values this leader proposed in its ballot, not yet chosen: slots
    /// `prop_first..next_slot`.
    proposals: VecDeque<Proposal>,
    prop_first: Index,
    /// The slots each acceptor (this node too) acknowledged in the ballot,
    /// as ranges ascending (those up to the chosen prefix trimmed away).
    acks: BTreeMap<NodeId, Vec<(Index, Index)>>,
    inflight: VecDeque<Index>,
    /// The first of the leader's proposals its own acceptor has not accepted
    /// yet: proposals wait for the next [`MultiPaxos::ready`], so every one
    /// made until then is accepted and sent in one batch (as Raft appends).
    unaccepted_from: Option<Index>,
    read_seq: u64,
    reads: VecDeque<PendingRead>,

    /// Values waiting for a slot: at a multi-mode candidate until it takes
    /// over, at a basic-mode proposer until each is chosen.
    queue: VecDeque<Pending>,
    instance: Option<Instance>,
    /// The slot where the front of `queue` was last proposed in phase 2.
    front_slot: Option<Index>,
    backoff: u32,
    /// Basic mode: instances lost in a row, for exponential back-off.
    failures: u32,

    // Output.
    msgs: Vec<Message>,
    persisted_msgs: Vec<Message>,
    self_pending: Vec<Message>,
    self_inflight: Vec<Message>,
    unstable_from: Option<Index>,
    prev_hs: HardState,
    prev_soft: SoftState,
    pending_snapshot: Option<SnapshotMeta>,
    read_states: Vec<ReadState>,
    persisted: Index,
}

fn payload_size(p: &EntryPayload) -> u64 {
    match p {
        EntryPayload::Normal(d) => d.len() as u64 + 16,
        _ => 16,
    }
}

fn malformed(from: NodeId, reason: &'static str) -> StepError {
    StepError::Malformed { from, reason }
}

fn check_range(from: NodeId, first: Index, last: Index) -> Result<(), StepError> {
    if first == 0 || first > last || last > MAX_INDEX {
        return Err(malformed(
            from,
            "slot range empty, from slot 0 or beyond MAX_INDEX",
        ));
    }
    Ok(())
}

fn check_entries(from: NodeId, entries: &[Entry], contiguous: bool) -> Result<(), StepError> {
    let mut prev: Option<Index> = None;
    for e in entries {
        if e.index == 0 || e.index > MAX_INDEX || e.term == 0 || e.term > MAX_TERM {
            return Err(malformed(
                from,
                "entry with slot or ballot 0 or out of range",
            ));
        }
        if let Some(p) = prev {
            let ok = if contiguous {
                e.index == p + 1
            } else {
                e.index > p
            };
            if !ok {
                return Err(malformed(from, "entries out of order"));
            }
        }
        prev = Some(e.index);
    }
    Ok(())
}

impl MultiPaxos {
    /// A node starting from what its storage kept (or a brand new member:
    /// [`InitialState::bootstrap`]). The membership is the snapshot's and is
    /// fixed: it must list this node, every id in `1..=65535`, no learners.
    pub fn new(cfg: Config, init: InitialState) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let conf = init.snapshot.conf_state.clone();
        if !conf.learners.is_empty() {
            return Err(ConfigError::Learners);
        }
        if !conf.voters.contains(&cfg.id) {
            return Err(ConfigError::NotVoter(cfg.id));
        }
        if let Some(&bad) = conf.voters.iter().find(|&&v| v == 0 || v > MAX_NODE_ID) {
            return Err(ConfigError::BadId(bad));
        }
        if init.hard_state.term > MAX_TERM {
            return Err(ConfigError::PromiseTooHigh);
        }
        let snapshot = init.snapshot;
        // Slots held above the snapshot, from the one after it; a hole in
        // what storage kept holds a placeholder (nothing accepted there).
        let log_first = snapshot.index + 1;
        let mut log: VecDeque<Slot> = VecDeque::new();
        for e in init
            .entries
            .into_iter()
            .filter(|e| e.index > snapshot.index)
        {
            let offset = usize::try_from(e.index - log_first).unwrap_or(usize::MAX);
            while log.len() < offset {
                log.push_back(Slot {
                    ballot: 0,
                    payload: EntryPayload::Empty,
                });
            }
            let slot = Slot {
                ballot: e.term,
                payload: e.payload,
            };
            match log.get_mut(offset) {
                Some(x) => *x = slot,
                None => log.push_back(slot),
            }
        }
        let last = snapshot.index + log.len() as u64;
        let commit = init.hard_state.commit.clamp(snapshot.index, last);
        let applied = init.applied.clamp(snapshot.index, commit);
        let quorum = conf.quorum();
        let peers = conf
            .voters
            .iter()
            .filter(|&&v| v != cfg.id)
            .map(|&v| (v, Peer::default()))
            .collect();
        let mut rng = SplitMix64::new(cfg.seed);
        let timeout = rng.range(cfg.election_tick as u64, 2 * cfg.election_tick as u64) as u32;
        let promised = init.hard_state.term;
        Ok(MultiPaxos {
            id: cfg.id,
            quorum,
            conf,
            promised,
            log,
            log_first,
            snapshot,
            commit,
            applied,
            handed: applied,
            chosen_above: BTreeSet::new(),
            max_seen: promised,
            role: Role::Follower,
            leader: None,
            ballot: 0,
            rng,
            elapsed: 0,
            timeout,
            heartbeat_elapsed: 0,
            peers,
            candidacy: None,
            takeover_last: 0,
            next_slot: 0,
            sent_upto: 0,
            proposals: VecDeque::new(),
            prop_first: 0,
            acks: BTreeMap::new(),
            inflight: VecDeque::new(),
            unaccepted_from: None,
            read_seq: 0,
            reads: VecDeque::new(),
            queue: VecDeque::new(),
            instance: None,
            front_slot: None,
            backoff: 0,
            failures: 0,
            msgs: Vec::new(),
            persisted_msgs: Vec::new(),
            self_pending: Vec::new(),
            self_inflight: Vec::new(),
            unstable_from: None,
            prev_hs: HardState {
                term: promised,
                vote: None,
                commit,
            },
            prev_soft: SoftState {
                leader: None,
                role: Role::Follower,
            },
            pending_snapshot: None,
            read_states: Vec::new(),
            persisted: last,
            cfg,
        })
    }

    // ---- accessors -----------------------------------------------------

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Multi-Paxos or basic Paxos.
    pub fn mode(&self) -> Mode {
        self.cfg.mode
    }
    /// Its role (basic mode: always follower).
    pub fn role(&self) -> Role {
        self.role
    }
    /// The highest ballot it promised.
    pub fn promised(&self) -> Ballot {
        self.promised
    }
    /// The ballot it leads (or campaigns) in, else its promise.
    pub fn ballot(&self) -> Ballot {
        if self.role == Role::Follower {
            self.promised
        } else {
            self.ballot
        }
    }
    /// The leader it knows of (multi mode).
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    /// The durable state: promise and chosen prefix.
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.promised,
            vote: None,
            commit: self.commit,
        }
    }
    /// The chosen prefix.
    pub fn commit_index(&self) -> Index {
        self.commit
    }
    /// The applied index.
    pub fn applied_index(&self) -> Index {
        self.applied
    }
    /// The last slot in the log.
    pub fn last_index(&self) -> Index {
        self.log_last()
            .unwrap_or(self.snapshot.index)
            .max(self.snapshot.index)
    }
    /// The ballot of the value at `index` (0: nothing accepted there), or the
    /// snapshot's at its index.
    pub fn term_at(&self, index: Index) -> Option<Term> {
        if let Some(s) = self.log_get(index) {
            return Some(s.ballot);
        }
        (index == self.snapshot.index).then_some(self.snapshot.term)
    }
    /// The accepted `(ballot, value)` at `slot`, if the log holds one.
    pub fn accepted(&self, slot: Index) -> Option<(Ballot, &EntryPayload)> {
        self.log_get(slot)
            .filter(|s| s.ballot > 0)
            .map(|s| (s.ballot, &s.payload))
    }
    /// The membership.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }
    /// The latest snapshot's metadata.
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        &self.snapshot
    }

    /// A summary for operators and tests: `term` is the ballot, progress the
    /// leader's view of each acceptor (multi mode).
    pub fn status(&self) -> Status {
        let progress = if self.role == Role::Leader {
            let mut p: BTreeMap<NodeId, ProgressStatus> = self
                .peers
                .iter()
                .map(|(&id, peer)| {
                    (
                        id,
                        ProgressStatus {
                            matched: peer.acked,
                            next: self.sent_upto + 1,
                            state: if peer.snapshot_elapsed.is_some() {
                                ProgressState::Snapshot
                            } else {
                                ProgressState::Replicate
                            },
                            inflight: self.inflight.len(),
                            paused: self.inflight.len() >= self.cfg.max_inflight_msgs,
                            recent_active: peer.recent,
                            learner: false,
                            // As on Raft: it answered in this ballot, and
                            // within the current or the previous heartbeat
                            // round (so a member that stops answering is
                            // no longer connected two heartbeats later).
                            connected: peer.heard && (peer.recent || peer.previous),
                        },
                    )
                })
                .collect();
            p.insert(
                self.id,
                ProgressStatus {
                    matched: self.persisted,
                    next: self.next_slot,
                    state: ProgressState::Replicate,
                    inflight: 0,
                    paused: false,
                    recent_active: true,
                    learner: false,
                    connected: true,
                },
            );
            p
        } else {
            BTreeMap::new()
        };
        Status {
            id: self.id,
            role: self.role,
            term: self.ballot(),
            leader: self.leader,
            commit: self.commit,
            applied: self.applied,
            persisted: self.persisted,
            last_index: self.last_index(),
            snapshot_index: self.snapshot.index,
            conf_state: self.conf.clone(),
            progress,
            removed: None,
            dropped: Vec::new(),
        }
    }

    // ---- helpers -------------------------------------------------------

    fn gap_limit(&self) -> Index {
        self.commit.saturating_add(self.cfg.max_slot_gap)
    }

    fn random_timeout(&mut self) -> u32 {
        let e = self.cfg.election_tick as u64;
        self.rng.range(e, 2 * e) as u32
    }

    fn next_ballot(&self) -> Option<Ballot> {
        let round = ballot_round(self.promised.max(self.max_seen)) + 1;
        let b = (round << 16) | self.id;
        (b <= MAX_TERM).then_some(b)
    }

    fn send(&mut self, to: NodeId, ballot: Ballot, kind: MessageKind) {
        let m = Message {
            from: self.id,
            to,
            ballot,
            kind,
        };
        if to == self.id {
            self.self_pending.push(m);
        } else {
            self.msgs.push(m);
        }
    }

    /// Sends once everything so far is durable (an acceptor's answers).
    fn send_persisted(&mut self, to: NodeId, ballot: Ballot, kind: MessageKind) {
        let m = Message {
            from: self.id,
            to,
            ballot,
            kind,
        };
        if to == self.id {
            self.self_pending.push(m);
        } else {
            self.persisted_msgs.push(m);
        }
    }

    fn broadcast(&mut self, ballot: Ballot, kind: MessageKind) {
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        // The last recipient gets the message itself, the others a copy.
        if let Some((&last, rest)) = ids.split_last() {
            for &to in rest {
                self.send(to, ballot, kind.clone());
            }
            self.send(last, ballot, kind);
        }
    }

    fn mark_unstable(&mut self, index: Index) {
        self.unstable_from = Some(self.unstable_from.map_or(index, |u| u.min(index)));
    }

    /// Writes the acceptor's value at `slot`, filling the holes below it with
    /// placeholders (ballot 0) so the log stays contiguous.
    fn write_slot(&mut self, slot: Index, ballot: Ballot, payload: EntryPayload) {
        let last = self.last_index();
        if self.log.is_empty() {
            self.log_first = slot.min(last + 1);
        }
        let first_changed = if slot > last + 1 { last + 1 } else { slot };
        let hole = || Slot {
            ballot: 0,
            payload: EntryPayload::Empty,
        };
        while self.log_first > slot {
            self.log.push_front(hole());
            self.log_first -= 1;
        }
        let offset = usize::try_from(slot - self.log_first).unwrap_or(usize::MAX);
        while self.log.len() < offset {
            self.log.push_back(hole());
        }
        let value = Slot { ballot, payload };
        match self.log.get_mut(offset) {
            Some(x) => *x = value,
            None => self.log.push_back(value),
        }
        self.mark_unstable(first_changed);
    }

    /// The last slot the log holds.
    fn log_last(&self) -> Option<Index> {
        (!self.log.is_empty()).then(|| self.log_first + self.log.len() as u64 - 1)
    }

    /// What the acceptor holds at `slot`.
    fn log_get(&self, slot: Index) -> Option<&Slot> {
        let offset = slot.checked_sub(self.log_first)?;
        self.log.get(usize::try_from(offset).ok()?)
    }

    /// The slots held in `lo..=hi`, ascending.
    fn log_range(&self, lo: Index, hi: Index) -> impl Iterator<Item = (Index, &Slot)> {
        let start = lo.max(self.log_first);
        let end = hi
            .saturating_add(1)
            .min(self.log_first + self.log.len() as u64);
        let (a, b) = if start < end {
            (
                (start - self.log_first) as usize,
                (end - self.log_first) as usize,
            )
        } else {
            (0, 0)
        };
        (start..).zip(self.log.range(a..b))
    }

    /// Drops the slots up to `index` from the log.
    fn log_trim(&mut self, index: Index) {
        if index < self.log_first {
            return;
        }
        let n = usize::try_from(index - self.log_first + 1).unwrap_or(usize::MAX);
        if n >= self.log.len() {
            self.log.clear();
            self.log_first = index + 1;
        } else {
            self.log.drain(..n);
            self.log_first = index + 1;
        }
    }

    /// Records that `payload` is chosen at `slot`. The acceptor's ballot
    /// there never goes down: it keeps the higher of its own and `label`.
    fn learn_value(&mut self, slot: Index, label: Ballot, payload: EntryPayload) {
        if slot <= self.commit || slot <= self.snapshot.index || slot > self.gap_limit() {
            return;
        }
        let ballot = self.log_get(slot).map_or(0, |s| s.ballot).max(label);
        let current = self.log_get(slot);
        if current.is_none_or(|s| s.ballot != ballot || s.payload != payload) {
            self.write_slot(slot, ballot, payload);
        }
        self.note_chosen(slot);
    }

    /// [`MultiPaxos::learn_value`] for a value the caller only borrows:
    /// false when the value must be written (then call `learn_value`).
    fn learn_held(&mut self, slot: Index, label: Ballot, payload: &EntryPayload) -> bool {
        if slot <= self.commit || slot <= self.snapshot.index || slot > self.gap_limit() {
            return true;
        }
        let ballot = self.log_get(slot).map_or(0, |s| s.ballot).max(label);
        if self
            .log_get(slot)
            .is_none_or(|s| s.ballot != ballot || s.payload != *payload)
        {
            return false;
        }
        self.note_chosen(slot);
        true
    }

    /// Records that the value at `slot` (above the chosen prefix, held in
    /// the log) is chosen. The next slot extends the prefix at once, so
    /// values chosen in order never wait in `chosen_above`.
    fn note_chosen(&mut self, slot: Index) {
        if slot != self.commit + 1 {
            self.chosen_above.insert(slot);
            return;
        }
        self.commit = slot;
        while self.chosen_above.first() == Some(&(self.commit + 1)) {
            self.chosen_above.pop_first();
            self.commit += 1;
        }
    }

    fn advance_commit(&mut self) {
        while self.chosen_above.remove(&(self.commit + 1)) {
            self.commit += 1;
        }
        // Trimmed from the front: only what the prefix now covers goes.
        let commit = self.commit;
        while self.chosen_above.first().is_some_and(|&s| s <= commit) {
            self.chosen_above.pop_first();
        }
        if self.role == Role::Leader {
            while self.prop_first <= commit && self.proposals.pop_front().is_some() {
                self.prop_first += 1;
            }
            for set in self.acks.values_mut() {
                let n = set.partition_point(|&(_, hi)| hi <= commit);
                set.drain(..n);
            }
            while self.inflight.front().is_some_and(|&l| l <= commit) {
                self.inflight.pop_front();
            }
        }
    }

    fn become_follower(&mut self, leader: Option<NodeId>) {
        self.role = Role::Follower;
        self.leader = leader;
        self.candidacy = None;
        self.proposals.clear();
        self.acks.clear();
        self.inflight.clear();
        self.unaccepted_from = None;
        self.reads.clear();
        if self.cfg.mode == Mode::Multi {
            self.queue.clear();
        }
        self.elapsed = 0;
        self.timeout = self.random_timeout();
    }

    // ---- inputs --------------------------------------------------------

    /// One logical clock tick.
    pub fn tick(&mut self) {
        for p in self.peers.values_mut() {
            if let Some(e) = &mut p.snapshot_elapsed {
                *e += 1;
                if *e >= 2 * self.cfg.election_tick {
                    p.snapshot_elapsed = None;
                }
            }
        }
        self.heartbeat_elapsed += 1;
        let beat = self.heartbeat_elapsed >= self.cfg.heartbeat_tick;
        if beat {
            self.heartbeat_elapsed = 0;
        }
        match self.cfg.mode {
            Mode::Multi => {
                if self.role == Role::Leader {
                    if beat {
                        let (b, commit, seq) = (self.ballot, self.commit, self.read_seq);
                        self.broadcast(
                            b,
                            MessageKind::Commit {
                                commit,
                                read_seq: seq,
                            },
                        );
                        for p in self.peers.values_mut() {
                            p.previous = p.recent;
                            p.recent = false;
                        }
                        self.resend();
                    }
                } else {
                    self.elapsed += 1;
                    if self.elapsed >= self.timeout {
                        self.campaign();
                    }
                }
            }
            Mode::Basic => {
                if beat {
                    let (b, commit) = (self.promised, self.commit);
                    self.broadcast(
                        b,
                        MessageKind::Commit {
                            commit,
                            read_seq: 0,
                        },
                    );
                }
                if self.backoff > 0 {
                    self.backoff -= 1;
                }
                let timeout = self.timeout;
                if let Some(inst) = &mut self.instance {
                    inst.elapsed += 1;
                    if inst.elapsed >= timeout {
                        self.instance = None;
                        self.timeout = self.random_timeout();
                        self.back_off();
                    }
                }
                self.basic_progress();
            }
        }
    }

    /// Takes over at once (multi mode); retries the pending instance (basic).
    pub fn campaign(&mut self) {
        if self.cfg.mode == Mode::Basic {
            self.backoff = 0;
            self.instance = None;
            self.basic_progress();
            return;
        }
        let Some(b) = self.next_ballot() else { return };
        self.role = Role::Candidate;
        self.leader = None;
        self.ballot = b;
        self.proposals.clear();
        self.acks.clear();
        self.inflight.clear();
        self.unaccepted_from = None;
        self.reads.clear();
        self.elapsed = 0;
        self.timeout = self.random_timeout();
        let first = self.commit + 1;
        self.candidacy = Some(Candidacy {
            first,
            promises: BTreeMap::new(),
        });
        self.on_prepare(self.id, b, first, MAX_INDEX);
        self.broadcast(
            b,
            MessageKind::Prepare {
                first,
                last: MAX_INDEX,
            },
        );
    }

    /// Proposes a value. A multi-mode leader answers where it put it; a
    /// candidate (multi) or any node (basic) keeps it until it gets a slot
    /// and answers `Forwarded { to: own id }`: its fate shows in the
    /// committed entries.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        match self.cfg.mode {
            Mode::Basic => {
                if self.queue.len() as u64 >= self.cfg.max_slot_gap {
                    return Err(ProposeError::TooMuchUncommitted);
                }
                self.queue.push_back(Pending {
                    payload: EntryPayload::Normal(data.into()),
                    read: None,
                });
                self.basic_progress();
                Ok(Proposed::Forwarded { to: self.id })
            }
            Mode::Multi => match self.role {
                Role::Leader => self.leader_propose(EntryPayload::Normal(data.into())),
                Role::Candidate | Role::PreCandidate => {
                    if self.queue.len() as u64 >= self.cfg.max_slot_gap {
                        return Err(ProposeError::TooMuchUncommitted);
                    }
                    self.queue.push_back(Pending {
                        payload: EntryPayload::Normal(data.into()),
                        read: None,
                    });
                    Ok(Proposed::Forwarded { to: self.id })
                }
                Role::Follower => match self.leader {
                    None => Err(ProposeError::NoLeader),
                    Some(l) if self.cfg.disable_proposal_forwarding => {
                        Err(ProposeError::NotLeader { leader: l })
                    }
                    Some(l) => {
                        let b = self.promised;
                        self.send(l, b, MessageKind::Propose { data });
                        Ok(Proposed::Forwarded { to: l })
                    }
                },
            },
        }
    }

    /// Asks for a linearizable read point (see the module documentation).
    pub fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        match self.cfg.mode {
            Mode::Basic => {
                self.queue.push_back(Pending {
                    payload: EntryPayload::Empty,
                    read: Some(ctx),
                });
                self.basic_progress();
                Ok(())
            }
            Mode::Multi => match (self.role, self.leader) {
                (Role::Leader, _) => {
                    self.leader_read(ctx, None);
                    Ok(())
                }
                (_, Some(l)) if l != self.id => {
                    if self.cfg.disable_proposal_forwarding {
                        return Err(ProposeError::NotLeader { leader: l });
                    }
                    let b = self.promised;
                    self.send(l, b, MessageKind::ReadRequest { ctx });
                    Ok(())
                }
                _ => Err(ProposeError::NoLeader),
            },
        }
    }

    /// A snapshot sent to `id` arrived (or failed): catch-up may go on.
    pub fn report_snapshot(&mut self, id: NodeId, _success: bool) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.snapshot_elapsed = None;
        }
    }

    /// The metadata a snapshot taken at the applied `index` would have.
    pub fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        if index > self.applied {
            return Err(CompactError::NotApplied {
                index,
                applied: self.applied,
            });
        }
        if index <= self.snapshot.index {
            return Err(CompactError::AlreadyCompacted {
                index,
                snapshot: self.snapshot.index,
            });
        }
        Ok(SnapshotMeta {
            index,
            term: self.log_get(index).map_or(0, |s| s.ballot),
            conf_state: self.conf.clone(),
        })
    }

    /// Compacts the log up to the applied `index`, keeping `keep` values
    /// below it for members that trail a little.
    pub fn compact_keeping(
        &mut self,
        index: Index,
        keep: u64,
    ) -> Result<SnapshotMeta, CompactError> {
        let meta = self.snapshot_meta_at(index)?;
        let drop_to = index.saturating_sub(keep);
        self.log_trim(drop_to);
        self.snapshot = meta.clone();
        Ok(meta)
    }

    /// Takes a message from another member. Malformed messages are refused
    /// before they touch any state.
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        self.validate(&m)?;
        self.max_seen = self.max_seen.max(m.ballot);
        let from = m.from;
        if self.cfg.mode == Mode::Multi
            && self.role != Role::Follower
            && m.ballot > self.ballot
            && matches!(
                m.kind,
                MessageKind::Prepare { .. }
                    | MessageKind::Accept { .. }
                    | MessageKind::Commit { .. }
                    | MessageKind::Learn { .. }
                    | MessageKind::Snapshot { .. }
            )
        {
            self.become_follower(None);
        }
        if let Some(p) = self.peers.get_mut(&from) {
            p.recent = true;
        }
        self.dispatch(m);
        if self.cfg.mode == Mode::Basic {
            self.basic_progress();
        }
        Ok(())
    }

    fn validate(&self, m: &Message) -> Result<(), StepError> {
        if m.to != self.id {
            return Err(StepError::WrongRecipient { to: m.to });
        }
        let from = m.from;
        if from == 0 || from == self.id || !self.conf.voters.contains(&from) {
            return Err(StepError::BadSender { from });
        }
        if m.ballot > MAX_TERM {
            return Err(malformed(from, "ballot beyond MAX_TERM"));
        }
        let own = ballot_node(m.ballot) == self.id && m.ballot > 0;
        let theirs = ballot_node(m.ballot) == from && m.ballot > 0;
        match &m.kind {
            MessageKind::Prepare { first, last } => {
                if !theirs {
                    return Err(malformed(
                        from,
                        "prepare of a ballot that is not the sender's",
                    ));
                }
                check_range(from, *first, *last)?;
            }
            MessageKind::Promise {
                first,
                last,
                commit,
                snapshot,
                accepted,
            } => {
                if !own {
                    return Err(malformed(from, "promise of a ballot that is not ours"));
                }
                check_range(from, *first, *last)?;
                if *commit > MAX_INDEX || snapshot > commit {
                    return Err(malformed(from, "promise with a nonsense chosen prefix"));
                }
                check_entries(from, accepted, false)?;
                // A value's ballot may exceed the promise: an acceptor keeps
                // the ballot a chosen value it learned was accepted in.
                if accepted.iter().any(|e| e.index < *first || e.index > *last) {
                    return Err(malformed(
                        from,
                        "promise reports values outside the prepare",
                    ));
                }
            }
            MessageKind::Reject { promised } => {
                if !own || *promised <= m.ballot || *promised > MAX_TERM {
                    return Err(malformed(
                        from,
                        "reject of no ballot of ours or without a higher one",
                    ));
                }
            }
            MessageKind::Accept { entries, commit } => {
                if !theirs {
                    return Err(malformed(
                        from,
                        "accept of a ballot that is not the sender's",
                    ));
                }
                if *commit > MAX_INDEX {
                    return Err(malformed(from, "chosen prefix beyond MAX_INDEX"));
                }
                check_entries(from, entries, true)?;
                if entries.iter().any(|e| e.term != m.ballot) {
                    return Err(malformed(from, "accept of values in another ballot"));
                }
            }
            MessageKind::Accepted { first, last } => {
                if !own {
                    return Err(malformed(from, "accepted of a ballot that is not ours"));
                }
                check_range(from, *first, *last)?;
            }
            MessageKind::Commit { commit, .. } => {
                if self.cfg.mode == Mode::Multi && !theirs {
                    return Err(malformed(
                        from,
                        "commit of a ballot that is not the sender's",
                    ));
                }
                if *commit > MAX_INDEX {
                    return Err(malformed(from, "chosen prefix beyond MAX_INDEX"));
                }
            }
            MessageKind::CommitAck { commit, .. } => {
                if !own {
                    return Err(malformed(from, "commit ack of a ballot that is not ours"));
                }
                if *commit > MAX_INDEX {
                    return Err(malformed(from, "chosen prefix beyond MAX_INDEX"));
                }
            }
            MessageKind::Learn { entries } => check_entries(from, entries, false)?,
            MessageKind::Snapshot { meta } => {
                if meta.index == 0 || meta.index > MAX_INDEX || meta.term > MAX_TERM {
                    return Err(malformed(from, "snapshot at slot 0 or beyond MAX_INDEX"));
                }
            }
            MessageKind::ReadReply { index, .. } => {
                if *index > MAX_INDEX {
                    return Err(malformed(from, "read point beyond MAX_INDEX"));
                }
            }
            MessageKind::Propose { .. }
            | MessageKind::ReadRequest { .. }
            | MessageKind::NotMember { .. } => {}
        }
        Ok(())
    }

    /// Handles a message already validated (or one to itself).
    fn dispatch(&mut self, m: Message) {
        let (from, b) = (m.from, m.ballot);
        match m.kind {
            MessageKind::Prepare { first, last } => self.on_prepare(from, b, first, last),
            MessageKind::Promise {
                first,
                commit,
                snapshot,
                accepted,
                ..
            } => {
                let info = PromiseInfo {
                    commit,
                    snapshot,
                    accepted,
                };
                match self.cfg.mode {
                    Mode::Multi => self.on_promise(from, b, first, info),
                    Mode::Basic => self.on_basic_promise(from, b, first, info),
                }
            }
            MessageKind::Reject { promised } => self.on_reject(b, promised),
            MessageKind::Accept { entries, commit } => self.on_accept(from, b, entries, commit),
            MessageKind::Accepted { first, last } => match self.cfg.mode {
                Mode::Multi => self.on_accepted(from, b, first, last),
                Mode::Basic => self.on_basic_accepted(from, b, first, last),
            },
            MessageKind::Commit { commit, read_seq } => self.on_commit(from, b, commit, read_seq),
            MessageKind::CommitAck { commit, read_seq } => {
                self.on_commit_ack(from, b, commit, read_seq)
            }
            MessageKind::Learn { entries } => self.on_learn(from, b, entries),
            MessageKind::Snapshot { meta } => self.on_snapshot(from, b, meta),
            MessageKind::Propose { data } => {
                if self.cfg.mode == Mode::Multi {
                    match self.role {
                        Role::Leader => {
                            let _ = self.leader_propose(EntryPayload::Normal(data.into()));
                        }
                        Role::Candidate | Role::PreCandidate => {
                            if (self.queue.len() as u64) < self.cfg.max_slot_gap {
                                self.queue.push_back(Pending {
                                    payload: EntryPayload::Normal(data.into()),
                                    read: None,
                                });
                            }
                        }
                        Role::Follower => {}
                    }
                }
            }
            MessageKind::ReadRequest { ctx } => {
                if self.cfg.mode == Mode::Multi && self.role == Role::Leader {
                    self.leader_read(ctx, Some(from));
                }
            }
            MessageKind::ReadReply { index, ctx } => {
                self.read_states.push(ReadState { index, ctx });
            }
            MessageKind::NotMember { .. } => {}
        }
    }

    // ---- acceptor ------------------------------------------------------

    fn on_prepare(&mut self, from: NodeId, b: Ballot, first: Index, last: Index) {
        if b < self.promised {
            let promised = self.promised;
            self.send(from, b, MessageKind::Reject { promised });
            return;
        }
        self.promised = b;
        if from != self.id && self.cfg.mode == Mode::Multi {
            self.leader = None;
            self.elapsed = 0;
        }
        self.defer_to(from);
        let lo = first.max(self.snapshot.index + 1);
        let accepted: Vec<Entry> = if lo <= last {
            self.log_range(lo, last)
                .filter(|(_, s)| s.ballot > 0)
                .map(|(index, s)| Entry {
                    index,
                    term: s.ballot,
                    payload: s.payload.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        if from != self.id && first <= self.snapshot.index && self.snapshot.index > 0 {
            let meta = self.snapshot.clone();
            self.send(from, b, MessageKind::Snapshot { meta });
        }
        let (commit, snapshot) = (self.commit, self.snapshot.index);
        self.send_persisted(
            from,
            b,
            MessageKind::Promise {
                first,
                last,
                commit,
                snapshot,
                accepted,
            },
        );
    }

    fn on_accept(&mut self, from: NodeId, b: Ballot, entries: Vec<Entry>, commit: Index) {
        if b < self.promised {
            let promised = self.promised;
            self.send(from, b, MessageKind::Reject { promised });
            return;
        }
        self.promised = b;
        if self.cfg.mode == Mode::Multi && from != self.id {
            self.leader = Some(from);
            self.elapsed = 0;
        }
        self.defer_to(from);
        let limit = self.gap_limit();
        let mut runs: Vec<(Index, Index)> = Vec::new();
        // Slots this acceptor knows chosen: the leader gets their values (it
        // may have missed them) instead of acceptances.
        let mut known = Vec::new();
        let mut compacted = false;
        for e in entries {
            let s = e.index;
            if s > limit {
                break;
            }
            if s <= self.commit || s <= self.snapshot.index || self.chosen_above.contains(&s) {
                match self.log_get(s) {
                    Some(x) if x.ballot > 0 => known.push(Entry {
                        index: s,
                        term: x.ballot,
                        payload: x.payload.clone(),
                    }),
                    _ => compacted |= s <= self.snapshot.index,
                }
                continue;
            }
            if self.log_get(s).is_some_and(|x| x.ballot > b) {
                continue;
            }
            if self
                .log_get(s)
                .is_none_or(|x| x.ballot != b || x.payload != e.payload)
            {
                self.write_slot(s, b, e.payload);
            }
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == s => *last = s,
                _ => runs.push((s, s)),
            }
        }
        for (first, last) in runs {
            self.send_persisted(from, b, MessageKind::Accepted { first, last });
        }
        if self.cfg.mode == Mode::Multi && from != self.id {
            if compacted {
                let meta = self.snapshot.clone();
                self.send(from, b, MessageKind::Snapshot { meta });
            }
            if !known.is_empty() {
                self.send(from, b, MessageKind::Learn { entries: known });
            }
        }
        if self.cfg.mode == Mode::Multi && from != self.id {
            self.learn_by_ballot(from, b, commit);
        }
    }

    /// Multi mode: the leader of `b` says every slot up to `commit` is
    /// chosen. A value this acceptor accepted in `b` is the leader's own
    /// proposal for its slot, so it is the chosen one.
    fn learn_by_ballot(&mut self, from: NodeId, b: Ballot, commit: Index) {
        if ballot_node(b) != from {
            return;
        }
        let mut s = self.commit + 1;
        let limit = commit.min(self.gap_limit());
        while s <= limit {
            let ok =
                self.chosen_above.contains(&s) || self.log_get(s).is_some_and(|x| x.ballot == b);
            if !ok {
                break;
            }
            self.note_chosen(s);
            s += 1;
        }
        self.advance_commit();
    }

    fn on_commit(&mut self, from: NodeId, b: Ballot, commit: Index, read_seq: u64) {
        match self.cfg.mode {
            Mode::Multi => {
                if b < self.promised {
                    let promised = self.promised;
                    self.send(from, b, MessageKind::Reject { promised });
                    return;
                }
                self.promised = b;
                self.leader = Some(from);
                self.elapsed = 0;
                self.learn_by_ballot(from, b, commit);
                let own = self.commit;
                self.send_persisted(
                    from,
                    b,
                    MessageKind::CommitAck {
                        commit: own,
                        read_seq,
                    },
                );
            }
            Mode::Basic => {
                if commit < self.commit {
                    self.catch_up(from, commit);
                }
            }
        }
    }

    fn on_learn(&mut self, from: NodeId, b: Ballot, entries: Vec<Entry>) {
        for e in entries {
            self.learn_value(e.index, e.term, e.payload);
        }
        self.advance_commit();
        if self.cfg.mode == Mode::Multi && ballot_node(b) == from && b == self.promised {
            let commit = self.commit;
            self.send_persisted(
                from,
                b,
                MessageKind::CommitAck {
                    commit,
                    read_seq: 0,
                },
            );
        }
    }

    fn on_snapshot(&mut self, from: NodeId, b: Ballot, meta: SnapshotMeta) {
        if meta.index > self.commit {
            let index = meta.index;
            self.snapshot = SnapshotMeta {
                index,
                term: meta.term,
                conf_state: self.conf.clone(),
            };
            self.log_trim(index);
            self.chosen_above.retain(|&i| i > index);
            if self.front_slot.is_some_and(|f| f <= index) {
                // Basic mode: the slot where this node's front value went out
                // is chosen, but the value there is only in the image. The
                // value's fate is unknown here: it is not proposed again
                // (proposals are at most once, as a forwarded one is).
                self.front_slot = None;
                if self.instance.as_ref().is_none_or(|i| i.slot <= index) {
                    self.instance = None;
                    self.queue.pop_front();
                }
            }
            self.commit = index;
            self.handed = index;
            self.pending_snapshot = Some(self.snapshot.clone());
            // Installing replaces the whole stored log: hand out every value
            // kept above the snapshot again, so none is forgotten.
            self.unstable_from = Some(index + 1);
            self.advance_commit();
            if self.role == Role::Candidate {
                self.try_takeover();
            }
        }
        if self.cfg.mode == Mode::Multi && ballot_node(b) == from && b == self.promised {
            let commit = self.commit;
            self.send_persisted(
                from,
                b,
                MessageKind::CommitAck {
                    commit,
                    read_seq: 0,
                },
            );
        }
    }

    /// Sends `to` what it lacks of the chosen prefix: values, or the
    /// snapshot when they are compacted away.
    fn catch_up(&mut self, to: NodeId, their_commit: Index) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        if peer.snapshot_elapsed.is_some() || their_commit >= self.commit {
            return;
        }
        let first = their_commit + 1;
        let b = self.promised;
        if self.log_get(first).is_none() {
            if self.snapshot.index >= first {
                let meta = self.snapshot.clone();
                if let Some(p) = self.peers.get_mut(&to) {
                    p.snapshot_elapsed = Some(0);
                }
                self.send(to, b, MessageKind::Snapshot { meta });
            }
            return;
        }
        let mut size = 0;
        let mut entries = Vec::new();
        for (index, s) in self.log_range(first, self.commit) {
            if s.ballot == 0 {
                break;
            }
            size += payload_size(&s.payload);
            if !entries.is_empty() && size > self.cfg.max_size_per_msg {
                break;
            }
            entries.push(Entry {
                index,
                term: s.ballot,
                payload: s.payload.clone(),
            });
        }
        if !entries.is_empty() {
            self.send(to, b, MessageKind::Learn { entries });
        }
    }

    // ---- multi mode: candidate and leader ------------------------------

    fn on_promise(&mut self, from: NodeId, b: Ballot, first: Index, info: PromiseInfo) {
        if self.role != Role::Candidate || b != self.ballot {
            return;
        }
        let Some(c) = &mut self.candidacy else { return };
        if c.first != first {
            return;
        }
        c.promises.insert(from, info);
        self.try_takeover();
    }

    fn on_reject(&mut self, b: Ballot, promised: Ballot) {
        self.max_seen = self.max_seen.max(promised);
        match self.cfg.mode {
            Mode::Multi => {
                if self.role != Role::Follower && b == self.ballot {
                    self.become_follower(None);
                }
            }
            Mode::Basic => {
                if self.instance.as_ref().is_some_and(|i| i.ballot == b) {
                    self.instance = None;
                    self.back_off();
                }
            }
        }
    }

    fn try_takeover(&mut self) {
        let Some(c) = &self.candidacy else { return };
        if c.promises.len() < self.quorum {
            return;
        }
        let need = c.promises.values().map(|p| p.snapshot).max().unwrap_or(0);
        if need > self.commit {
            // An acceptor compacted values this node lacks; its snapshot is
            // on the way.
            return;
        }
        let c = self.candidacy.take().unwrap_or(Candidacy {
            first: 0,
            promises: BTreeMap::new(),
        });
        // Values an acceptor knows chosen are learned outright.
        for p in c.promises.values() {
            for e in p.accepted.iter().filter(|e| e.index <= p.commit) {
                self.learn_value(e.index, e.term, e.payload.clone());
            }
        }
        self.advance_commit();
        let max_slot = c
            .promises
            .values()
            .filter_map(|p| p.accepted.last().map(|e| e.index))
            .max()
            .unwrap_or(0)
            .max(self.commit);
        if max_slot > self.gap_limit() {
            // Too far behind to lead.
            self.become_follower(None);
            return;
        }
        // For every slot from the first unchosen one: the value with the
        // highest ballot any acceptor of the quorum reports, else a no-op.
        let mut best: BTreeMap<Index, (Ballot, EntryPayload)> = BTreeMap::new();
        for p in c.promises.values() {
            for e in &p.accepted {
                if e.index > self.commit && best.get(&e.index).is_none_or(|(bb, _)| e.term > *bb) {
                    best.insert(e.index, (e.term, e.payload.clone()));
                }
            }
        }
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.takeover_last = max_slot;
        self.next_slot = max_slot + 1;
        self.sent_upto = self.commit;
        self.proposals.clear();
        self.acks.clear();
        self.inflight.clear();
        self.unaccepted_from = None;
        self.heartbeat_elapsed = 0;
        for p in self.peers.values_mut() {
            p.acked = 0;
            p.heard = false;
            p.previous = false;
            p.snapshot_elapsed = None;
        }
        self.prop_first = self.commit + 1;
        for s in self.commit + 1..=max_slot {
            let payload = best.remove(&s).map_or(EntryPayload::Empty, |(_, v)| v);
            self.push_proposal(payload);
        }
        let mut queued = std::mem::take(&mut self.queue);
        for p in queued.drain(..) {
            self.next_slot += 1;
            self.push_proposal(p.payload);
        }
        self.accept_own(self.commit + 1, self.next_slot - 1);
        self.flush();
    }

    /// The leader's own acceptor accepts its proposals `first..=last`.
    fn accept_own(&mut self, first: Index, last: Index) {
        if first > last {
            return;
        }
        let b = self.ballot;
        let entries: Vec<Entry> = (first..=last)
            .filter_map(|index| {
                self.proposal(index).map(|p| Entry {
                    index,
                    term: b,
                    payload: p.payload.clone(),
                })
            })
            .collect();
        let commit = self.commit;
        self.on_accept(self.id, b, entries, commit);
    }

    fn leader_propose(&mut self, payload: EntryPayload) -> Result<Proposed, ProposeError> {
        if self.next_slot > self.gap_limit() {
            return Err(ProposeError::TooMuchUncommitted);
        }
        let s = self.next_slot;
        self.next_slot += 1;
        self.push_proposal(payload);
        self.unaccepted_from.get_or_insert(s);
        Ok(Proposed::Appended {
            index: s,
            term: self.ballot,
        })
    }

    /// The proposal at slot `s`, if this leader holds one.
    fn proposal(&self, s: Index) -> Option<&Proposal> {
        let offset = s.checked_sub(self.prop_first)?;
        self.proposals.get(usize::try_from(offset).ok()?)
    }

    /// Appends the proposal at slot `prop_first + proposals.len()` (the
    /// caller has moved `next_slot` past it).
    fn push_proposal(&mut self, payload: EntryPayload) {
        self.proposals.push_back(Proposal {
            payload,
            votes: 0,
            open: true,
        });
    }

    /// The leader's own acceptor accepts the proposals made since the last
    /// [`MultiPaxos::ready`], and they go out to the others.
    fn accept_proposals(&mut self) {
        let Some(first) = self.unaccepted_from.take() else {
            return;
        };
        if self.role == Role::Leader {
            self.accept_own(first, self.next_slot - 1);
            self.flush();
        }
    }

    fn accept_batch(&self, first: Index) -> Vec<Entry> {
        let b = self.ballot;
        let mut size = 0;
        let mut out = Vec::new();
        let skip = match first.checked_sub(self.prop_first) {
            Some(o) => usize::try_from(o).unwrap_or(usize::MAX),
            // Below the proposals held: nothing to send from there.
            None => return out,
        };
        for (p, index) in self.proposals.iter().skip(skip).zip(first..) {
            let p = &p.payload;
            size += payload_size(p);
            if !out.is_empty() && size > self.cfg.max_size_per_msg {
                break;
            }
            out.push(Entry {
                index,
                term: b,
                payload: p.clone(),
            });
        }
        out
    }

    /// Sends the proposals not sent yet, in batches, while the window allows.
    fn flush(&mut self) {
        while self.role == Role::Leader
            && self.sent_upto + 1 < self.next_slot
            && self.inflight.len() < self.cfg.max_inflight_msgs
        {
            let first = self.sent_upto + 1;
            let entries = self.accept_batch(first);
            let Some(last) = entries.last().map(|e| e.index) else {
                // Chosen meanwhile (learned): nothing to send there.
                self.sent_upto = first;
                continue;
            };
            let (b, commit) = (self.ballot, self.commit);
            self.broadcast(b, MessageKind::Accept { entries, commit });
            self.inflight.push_back(last);
            self.sent_upto = last;
        }
    }

    /// On a heartbeat: sends each acceptor the proposals in flight it has
    /// not acknowledged yet (accepts may have been lost).
    fn resend(&mut self) {
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        let end = self.sent_upto.min(self.next_slot.saturating_sub(1));
        for id in ids {
            // The first open proposal sent that `id` did not acknowledge.
            let set = self.acks.get(&id).map_or(&[][..], Vec::as_slice);
            let (mut s, mut i) = (self.prop_first, 0);
            let missing = loop {
                if s > end {
                    break None;
                }
                while set.get(i).is_some_and(|&(_, hi)| hi < s) {
                    i += 1;
                }
                if let Some(&(lo, hi)) = set.get(i)
                    && lo <= s
                {
                    s = hi + 1;
                    continue;
                }
                if self.proposal(s).is_some_and(|p| p.open) {
                    break Some(s);
                }
                s += 1;
            };
            if let Some(first) = missing {
                let entries = self.accept_batch(first);
                if !entries.is_empty() {
                    let (b, commit) = (self.ballot, self.commit);
                    self.send(id, b, MessageKind::Accept { entries, commit });
                }
            }
        }
    }

    fn on_accepted(&mut self, from: NodeId, b: Ballot, first: Index, last: Index) {
        if self.role != Role::Leader || b != self.ballot {
            return;
        }
        let commit_before = self.commit;
        if let Some(p) = self.peers.get_mut(&from) {
            p.acked = p.acked.max(last.min(self.sent_upto));
            p.heard = true;
        }
        let lo = first.max(self.commit + 1);
        let hi = last.min(self.next_slot.saturating_sub(1));
        let lo = lo.max(self.prop_first);
        if lo <= hi {
            // Each acceptor's acknowledgement counts once per slot.
            let (prop_first, proposals) = (self.prop_first, &mut self.proposals);
            let set = self.acks.entry(from).or_default();
            add_range(set, lo, hi, |a, z| {
                for s in a..=z {
                    let p = usize::try_from(s - prop_first)
                        .ok()
                        .and_then(|o| proposals.get_mut(o));
                    if let Some(p) = p.filter(|p| p.open) {
                        p.votes += 1;
                    }
                }
            });
            // The values are only borrowed: the leader's own acceptor holds
            // them already (accepted in `b`), so most need no copy.
            let mut proposals = std::mem::take(&mut self.proposals);
            let first = usize::try_from(lo - prop_first).unwrap_or(usize::MAX);
            for (p, s) in proposals.iter_mut().skip(first).zip(lo..=hi) {
                if p.open && p.votes >= self.quorum {
                    p.open = false;
                    if !self.learn_held(s, b, &p.payload) {
                        self.learn_value(s, b, p.payload.clone());
                    }
                }
            }
            self.proposals = proposals;
        }
        self.advance_commit();
        let sent_before = self.sent_upto;
        self.flush();
        // Followers learn the new chosen prefix now, not at the next
        // heartbeat (a write answered by a follower waited for a tick): an
        // accept just sent carries it, and so will the next one while
        // others are in flight; when none is, a commit message does. (A
        // commit message for every acknowledgement under load cost more
        // than half the throughput.)
        if self.commit > commit_before
            && self.sent_upto == sent_before
            && self.inflight.is_empty()
            && self.quorum > 1
        {
            let (b, commit, seq) = (self.ballot, self.commit, self.read_seq);
            self.broadcast(
                b,
                MessageKind::Commit {
                    commit,
                    read_seq: seq,
                },
            );
        }
    }

    fn leader_read(&mut self, ctx: Vec<u8>, to: Option<NodeId>) {
        self.read_seq += 1;
        let index = self.commit.max(self.takeover_last);
        let mut acks = BTreeSet::new();
        acks.insert(self.id);
        self.reads.push_back(PendingRead {
            seq: self.read_seq,
            index,
            ctx,
            to,
            acks,
        });
        if self.quorum > 1 {
            let (b, commit, seq) = (self.ballot, self.commit, self.read_seq);
            self.broadcast(
                b,
                MessageKind::Commit {
                    commit,
                    read_seq: seq,
                },
            );
        }
        self.serve_reads();
    }

    fn serve_reads(&mut self) {
        while self
            .reads
            .front()
            .is_some_and(|r| r.acks.len() >= self.quorum)
        {
            let Some(r) = self.reads.pop_front() else {
                break;
            };
            match r.to {
                None => self.read_states.push(ReadState {
                    index: r.index,
                    ctx: r.ctx,
                }),
                Some(to) => {
                    let b = self.ballot;
                    self.send(
                        to,
                        b,
                        MessageKind::ReadReply {
                            index: r.index,
                            ctx: r.ctx,
                        },
                    );
                }
            }
        }
    }

    fn on_commit_ack(&mut self, from: NodeId, b: Ballot, commit: Index, read_seq: u64) {
        if self.cfg.mode != Mode::Multi || self.role != Role::Leader || b != self.ballot {
            return;
        }
        if let Some(p) = self.peers.get_mut(&from) {
            p.heard = true;
        }
        for r in self.reads.iter_mut().filter(|r| r.seq <= read_seq) {
            r.acks.insert(from);
        }
        self.serve_reads();
        if commit < self.commit {
            self.catch_up(from, commit);
        }
    }

    // ---- basic mode ----------------------------------------------------

    /// Moves the basic-mode proposer on: notices its slot was chosen
    /// elsewhere, starts the next instance.
    fn basic_progress(&mut self) {
        if self.cfg.mode != Mode::Basic {
            return;
        }
        if let Some(inst) = &self.instance {
            let s = inst.slot;
            if s <= self.commit || self.chosen_above.contains(&s) {
                let chosen = self.log_get(s).map(|x| x.payload.clone());
                let ours = match (&inst.value, chosen) {
                    (Some((v, true)), Some(c)) => *v == c,
                    _ => false,
                };
                self.instance = None;
                if ours {
                    self.finish_own(s);
                } else {
                    // Lost the slot: let the others' instances finish before
                    // contending again, rather than all preempting each other
                    // on the next slot at once.
                    self.back_off();
                }
            }
        }
        if self.instance.is_none()
            && let Some(s0) = self.front_slot
            && (s0 <= self.commit || self.chosen_above.contains(&s0))
        {
            // The front value went out in phase 2 at `s0`, which is chosen
            // now (completed by another proposer, perhaps): it is done if it
            // is the value chosen there.
            self.front_slot = None;
            let chosen = self.log_get(s0).map(|x| &x.payload);
            if chosen.is_some() && chosen == self.queue.front().map(|p| &p.payload) {
                self.finish_own(s0);
            }
        }
        if self.instance.is_some() || self.backoff > 0 || self.queue.is_empty() {
            return;
        }
        let mut s = self.commit + 1;
        while self.chosen_above.contains(&s) {
            s += 1;
        }
        if s > self.gap_limit() {
            return;
        }
        let Some(b) = self.next_ballot() else { return };
        self.instance = Some(Instance {
            slot: s,
            ballot: b,
            promises: BTreeMap::new(),
            value: None,
            accepts: BTreeSet::new(),
            elapsed: 0,
        });
        self.on_prepare(self.id, b, s, s);
        self.broadcast(b, MessageKind::Prepare { first: s, last: s });
    }

    /// Basic mode: waits a random number of ticks before contending again,
    /// the range doubling with every instance lost in a row.
    fn back_off(&mut self) {
        self.failures = (self.failures + 1).min(5);
        let e = self.cfg.election_tick as u64;
        let hi = e << (self.failures - 1);
        self.backoff = self.backoff.max(self.rng.range(1, hi + 1) as u32);
    }

    /// Basic mode: another proposer is running an instance; an idle node
    /// lets it finish before starting one of its own.
    fn defer_to(&mut self, from: NodeId) {
        if self.cfg.mode == Mode::Basic && from != self.id && self.instance.is_none() {
            let e = self.cfg.election_tick as u64;
            self.backoff = self.backoff.max(self.rng.range(e / 2, e + 1) as u32);
        }
    }

    fn finish_own(&mut self, slot: Index) {
        self.front_slot = None;
        self.failures = 0;
        if let Some(p) = self.queue.pop_front()
            && let Some(ctx) = p.read
        {
            self.read_states.push(ReadState { index: slot, ctx });
        }
    }

    fn on_basic_promise(&mut self, from: NodeId, b: Ballot, first: Index, info: PromiseInfo) {
        let quorum = self.quorum;
        let Some(inst) = &mut self.instance else {
            return;
        };
        if inst.ballot != b || inst.slot != first || inst.value.is_some() {
            return;
        }
        let s = inst.slot;
        if info.commit >= s {
            // Already chosen: learn it (or its snapshot comes) and move on.
            self.instance = None;
            if let Some(e) = info.accepted.iter().find(|e| e.index == s) {
                self.learn_value(s, e.term, e.payload.clone());
                self.advance_commit();
            }
            return;
        }
        inst.promises.insert(from, info);
        if inst.promises.len() < quorum {
            return;
        }
        let highest = inst
            .promises
            .values()
            .filter_map(|p| p.accepted.iter().find(|e| e.index == s))
            .max_by_key(|e| e.term)
            .map(|e| e.payload.clone());
        let front = self.queue.front().map(|p| p.payload.clone());
        let value = match (highest, front) {
            // Its own value, accepted in an earlier attempt.
            (Some(v), Some(f)) if v == f => (v, true),
            (Some(v), _) => (v, false),
            (None, Some(f)) => (f, true),
            (None, None) => (EntryPayload::Empty, false),
        };
        if value.1 {
            self.front_slot = Some(s);
        }
        inst.value = Some(value.clone());
        let entries = vec![Entry {
            index: s,
            term: b,
            payload: value.0,
        }];
        let commit = self.commit;
        self.on_accept(self.id, b, entries.clone(), commit);
        self.broadcast(b, MessageKind::Accept { entries, commit });
    }

    fn on_basic_accepted(&mut self, from: NodeId, b: Ballot, first: Index, last: Index) {
        let quorum = self.quorum;
        let Some(inst) = &mut self.instance else {
            return;
        };
        if inst.ballot != b || inst.slot < first || inst.slot > last {
            return;
        }
        let Some((value, ours)) = inst.value.clone() else {
            return;
        };
        inst.accepts.insert(from);
        if inst.accepts.len() < quorum {
            return;
        }
        let s = inst.slot;
        self.instance = None;
        self.learn_value(s, b, value.clone());
        self.advance_commit();
        self.broadcast(
            self.promised,
            MessageKind::Learn {
                entries: vec![Entry {
                    index: s,
                    term: b,
                    payload: value,
                }],
            },
        );
        if ours {
            self.finish_own(s);
        }
    }

    // ---- ready ---------------------------------------------------------

    fn soft_state(&self) -> SoftState {
        SoftState {
            leader: self.leader,
            role: self.role,
        }
    }

    /// Whether [`MultiPaxos::ready`] has anything.
    pub fn has_ready(&self) -> bool {
        self.unaccepted_from.is_some()
            || !self.msgs.is_empty()
            || !self.persisted_msgs.is_empty()
            || !self.self_pending.is_empty()
            || self.unstable_from.is_some()
            || self.hard_state() != self.prev_hs
            || self.pending_snapshot.is_some()
            || self.commit > self.handed
            || !self.read_states.is_empty()
            || self.soft_state() != self.prev_soft
    }

    /// Takes the work accumulated since the last call.
    pub fn ready(&mut self) -> Ready<Message> {
        self.accept_proposals();
        let mut rd = Ready::default();
        let soft = self.soft_state();
        if soft != self.prev_soft {
            rd.soft_state = Some(soft);
            self.prev_soft = soft;
        }
        let hs = self.hard_state();
        if hs != self.prev_hs {
            rd.hard_state = Some(hs);
            self.prev_hs = hs;
        }
        rd.snapshot = self.pending_snapshot.take();
        if let Some(from) = self.unstable_from.take() {
            let from = from.max(self.snapshot.index + 1);
            rd.entries = self
                .log_range(from, MAX_INDEX)
                .map(|(index, s)| Entry {
                    index,
                    term: s.ballot,
                    payload: s.payload.clone(),
                })
                .collect();
        }
        rd.messages = std::mem::take(&mut self.msgs);
        rd.persisted_messages = std::mem::take(&mut self.persisted_msgs);
        if self.commit > self.handed {
            rd.committed_entries = self
                .log_range(self.handed + 1, self.commit)
                .map(|(index, s)| Entry {
                    index,
                    term: s.ballot,
                    payload: s.payload.clone(),
                })
                .collect();
            self.handed = self.commit;
        }
        rd.read_states = std::mem::take(&mut self.read_states);
        self.self_inflight = std::mem::take(&mut self.self_pending);
        self.persisted = self.last_index();
        rd
    }

    /// Acknowledges that the last [`Ready`] was handled: this node's own
    /// answers (now durable) count from here.
    pub fn advance(&mut self) {
        self.applied = self.applied.max(self.handed);
        for m in std::mem::take(&mut self.self_inflight) {
            self.dispatch(m);
        }
        if self.role == Role::Candidate {
            self.try_takeover();
        }
        self.basic_progress();
    }
}
