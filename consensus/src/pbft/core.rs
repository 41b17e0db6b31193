//! The PBFT replica.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use super::config::{Config, ConfigError};
use super::crypto::{Crypto, Digest, sha256};
use super::message::{
    Alive, CheckpointProof, CheckpointState, CheckpointVote, CommitCert, Dec, Enc,
    MAX_REPLY_LEAVES, Message, MessageKind, NewView, Phase, PrePrepare, PreparedCert, Replies,
    Reply, ReplyLeaf, Request, Signed, View, ViewChange, Vote, batch_digest, get_checkpoint_proof,
    get_pre_prepare, get_vote, put_checkpoint_proof, put_pre_prepare, put_vote,
};
use crate::raft::{ProgressState, ProgressStatus, Status};
use crate::ready::{
    Certificate, CompactError, ProposeError, Proposed, ReadState, Ready, SoftState, StepError,
};
use crate::types::{
    ConfState, Entry, EntryPayload, HardState, Index, InitialState, MAX_INDEX, MAX_TERM, NodeId,
    Role, SnapshotMeta, Term,
};

/// How many timestamps below a client's highest executed one the
/// at-most-once table remembers one by one; older ones count as executed.
pub const CLIENT_WINDOW: u64 = 1024;

/// How many times successive view changes double the view-change timeout.
pub const MAX_DOUBLINGS: u32 = 4;

/// Most committed batches sent in answer to one catch-up request.
const FETCH_BATCHES: usize = 8;

/// Once every peer was asked in vain for a later view some member signed
/// a message in, a fetch for that reason alone goes out only every this
/// many resend ticks (until the replica enters a view).
const LATER_BACKOFF: usize = 16;

/// Byzantine (or stale) input a replica dropped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PbftStats {
    /// A signature that does not verify, or a signer that is not the sender
    /// (or not the primary, for a pre-prepare or new view).
    pub bad_signature: u64,
    /// A message from a node that is not a member.
    pub not_member: u64,
    /// A message for another view than the replica's (or while it changes
    /// views).
    pub wrong_view: u64,
    /// A message about sequence numbers outside the watermarks.
    pub outside_watermarks: u64,
    /// A pre-prepare overlapping one already accepted in its view with
    /// another digest or range.
    pub conflicting: u64,
    /// A view change with an invalid checkpoint proof or certificate.
    pub invalid_view_change: u64,
    /// A new view whose view changes are invalid or whose re-issued batch
    /// is not the one they determine.
    pub invalid_new_view: u64,
    /// Any other content that contradicts itself: a digest that does not
    /// match its requests, an invalid commit certificate or snapshot proof,
    /// a vote of the wrong phase.
    pub invalid: u64,
    /// Requests dropped because `max_pending` were waiting.
    pub dropped_requests: u64,
    /// A set of VIEW-CHANGEs (in a NEW-VIEW, or gathered by the new
    /// primary) holding two different valid prepared certificates for one
    /// sequence number in one view: impossible with at most f Byzantine
    /// replicas, so the set is refused rather than one picked.
    pub conflicting_certificates: u64,
    /// Later views forgotten: fewer than f+1 other members signed messages
    /// in views above this replica's and no peer asked handed one over.
    pub later_view_given_up: u64,
    /// REPLYs dropped: a bad signature, a signer other than the sender,
    /// leaves that do not hash to the signed root or break its shape; and
    /// leaves (one each) not matching this replica's own execution of the
    /// request (another sequence number or history) or the request it
    /// names.
    pub bad_replies: u64,
    /// REPLYs with no leaf for an own request waiting for its certificate
    /// (late ones after the certificate formed are counted here too).
    pub stray_replies: u64,
    /// Certificates assembled for own requests.
    pub certificates: u64,
    /// Own executed requests given up without a certificate because
    /// `max_pending` others waited for theirs.
    pub certificates_dropped: u64,
    /// View changes a backup started because the primary of its view sent
    /// no valid signed message naming the view (pre-prepare, COMMIT, ALIVE)
    /// for `request_timeout` ticks, with no request of its own waiting.
    pub idle_view_changes: u64,
}

impl PbftStats {
    /// The messages dropped, by reason, as [`Status::dropped`] reports
    /// them (the counters of valid work — certificates — left out).
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("bad_signature", self.bad_signature),
            ("not_member", self.not_member),
            ("wrong_view", self.wrong_view),
            ("outside_watermarks", self.outside_watermarks),
            ("conflicting", self.conflicting),
            ("invalid_view_change", self.invalid_view_change),
            ("invalid_new_view", self.invalid_new_view),
            ("invalid", self.invalid),
            ("dropped_requests", self.dropped_requests),
            ("conflicting_certificates", self.conflicting_certificates),
            ("bad_replies", self.bad_replies),
            ("stray_replies", self.stray_replies),
        ]
    }
}

/// What a replica last heard from another member: a valid signed message.
#[derive(Clone, Copy, Debug, Default)]
struct Heard {
    /// The tick (of this replica's clock) it arrived at.
    at: u64,
    /// The highest sequence number the member signed a COMMIT or CHECKPOINT
    /// for or reported executed in an ALIVE.
    upto: Index,
}

/// The replies gathered for one own request.
#[derive(Clone, Debug)]
struct ReplySet {
    req: Signed<Request>,
    digest: Digest,
    /// This replica's own execution: sequence number and history.
    executed: Option<(Index, Digest)>,
    /// One reply per signer (the first valid one), this replica's included.
    replies: BTreeMap<NodeId, ReplyProof>,
    /// Resend rounds since it executed (the first passes without asking).
    rounds: u32,
}

/// A signer's word on one own request: its signed REPLY, the request's
/// leaf under its root, and the leaf's position and Merkle path.
#[derive(Clone, Debug)]
struct ReplyProof {
    reply: Arc<Signed<Reply>>,
    leaf: ReplyLeaf,
    position: u64,
    path: Vec<Digest>,
}

/// One batch this replica holds: accepted as a pre-prepare in its view,
/// and/or prepared, and/or known committed.
#[derive(Clone, Debug)]
struct Batch {
    pp: Signed<PrePrepare>,
    last: Index,
    accepted: bool,
    prepared: Option<Vec<Signed<Vote>>>,
    committed: Option<Vec<Signed<Vote>>>,
    my_prepare: Option<Signed<Vote>>,
    my_commit: Option<Signed<Vote>>,
}

type BatchKey = (Index, View, Digest);

/// The PREPAREs and COMMITs of one batch, by sender.
type VoteSets = [BTreeMap<NodeId, Signed<Vote>>; 2];

/// The batch a set of VIEW-CHANGEs makes the new primary re-issue: its
/// first sequence number and one request (or null) per sequence number.
pub type Reissue = Option<(Index, Vec<Option<Signed<Request>>>)>;

/// The at-most-once table and hash chain: a function of the executed
/// sequence.
#[derive(Clone, Debug, Default)]
struct Exec {
    n: Index,
    chain: Digest,
    /// Per client: the highest executed timestamp, and the executed ones
    /// in the window below it with the first 8 bytes of their digest.
    clients: BTreeMap<NodeId, (u64, BTreeMap<u64, u64>)>,
}

fn tag_of(r: &Signed<Request>) -> u64 {
    u64::from_be_bytes(r.digest()[..8].try_into().expect("8 bytes"))
}

impl Exec {
    fn from_state(s: &CheckpointState) -> Self {
        Exec {
            n: s.n,
            chain: s.chain,
            clients: s
                .clients
                .iter()
                .map(|(c, max, recent)| (*c, (*max, recent.iter().copied().collect())))
                .collect(),
        }
    }

    fn state(&self) -> CheckpointState {
        CheckpointState {
            n: self.n,
            chain: self.chain,
            clients: self
                .clients
                .iter()
                .map(|(c, (max, recent))| {
                    (*c, *max, recent.iter().map(|(t, g)| (*t, *g)).collect())
                })
                .collect(),
        }
    }

    fn executed(&self, client: NodeId, ts: u64) -> bool {
        self.clients.get(&client).is_some_and(|(max, recent)| {
            max.checked_sub(ts).is_some_and(|d| d >= CLIENT_WINDOW) || recent.contains_key(&ts)
        })
    }

    /// Which request executed as `(client, ts)`, when the window still
    /// says (the first 8 bytes of its digest).
    fn executed_tag(&self, client: NodeId, ts: u64) -> Option<u64> {
        self.clients.get(&client)?.1.get(&ts).copied()
    }

    fn mark(&mut self, client: NodeId, ts: u64, tag: u64) {
        let (max, recent) = self.clients.entry(client).or_default();
        *max = (*max).max(ts);
        recent.insert(ts, tag);
        while recent
            .first_key_value()
            .is_some_and(|(&t, _)| *max - t >= CLIENT_WINDOW)
        {
            recent.pop_first();
        }
    }

    /// Executes `req` at the next sequence number: whether it ran (not a
    /// null request, not a duplicate).
    fn step(&mut self, n: Index, req: Option<&Signed<Request>>) -> bool {
        let fresh = req.filter(|r| !self.executed(r.body.client, r.body.ts));
        let rd = match fresh {
            Some(r) => {
                self.mark(r.body.client, r.body.ts, tag_of(r));
                r.digest()
            }
            None => [0; 32],
        };
        let mut e = Enc::default();
        e.digest(&self.chain);
        e.u64(n);
        e.digest(&rd);
        self.chain = sha256(&e.0);
        self.n = n;
        fresh.is_some()
    }
}

/// A request waiting to execute and for how many ticks it has.
#[derive(Clone, Debug)]
struct Waiting {
    req: Signed<Request>,
    age: u32,
}

/// A sans-IO PBFT replica (see the [module documentation](super)).
#[derive(Debug)]
pub struct Pbft {
    cfg: Config,
    id: NodeId,
    conf: ConfState,
    members: Vec<NodeId>,
    f: usize,
    q: usize,

    view: View,
    active: bool,
    batches: BTreeMap<BatchKey, Batch>,
    exec: Exec,
    applied: Index,
    snapshot: SnapshotMeta,
    snap_state: CheckpointState,
    snap_proof: CheckpointProof,
    stable: CheckpointProof,
    stable_state: Option<CheckpointState>,
    ckpt_states: BTreeMap<Index, CheckpointState>,
    ckpt_votes: BTreeMap<Index, BTreeMap<NodeId, Signed<CheckpointVote>>>,
    my_checkpoint: Option<Signed<CheckpointVote>>,

    /// PREPAREs and COMMITs of the current view by batch, one of each phase
    /// per sender and first sequence number.
    votes: BTreeMap<(Index, Index, Digest), VoteSets>,
    voted: BTreeSet<(NodeId, Phase, Index)>,

    waiting: BTreeMap<(NodeId, u64), Waiting>,
    assigned: BTreeSet<(NodeId, u64)>,
    next_seq: Index,
    own_ts: u64,
    own_reqs: BTreeMap<u64, Signed<Request>>,
    reads: BTreeMap<u64, Vec<u8>>,
    /// Own requests (by timestamp) waiting for their commit certificate.
    replies: BTreeMap<u64, ReplySet>,
    /// The REPLYs this replica signed for its recent executions, by each
    /// sequence number they cover (the last `window`), to answer a client
    /// that lost one.
    executions: BTreeMap<Index, Arc<Replies>>,
    /// The leaves of the current execution step, per client and view, not
    /// yet signed.
    step_leaves: BTreeMap<(NodeId, View), Vec<ReplyLeaf>>,
    /// Certificates assembled and not yet taken (at most `max_pending`).
    certs: Vec<Certificate>,

    vcs: BTreeMap<NodeId, Signed<ViewChange>>,
    my_vc: Option<Signed<ViewChange>>,
    new_view: Option<Signed<NewView>>,
    vc_elapsed: u32,
    vc_attempts: u32,

    high_seen: Index,
    /// The highest view a member signed a message in, if above this
    /// replica's.
    later_view: View,
    /// Fetches sent only because of `later_view`: after one to every peer
    /// without reaching that view it is forgotten.
    later_fetches: usize,
    /// Per other member, the highest view above this replica's it signed
    /// a pre-prepare or vote in. A view f+1 of them reached is vouched for
    /// by a correct replica: it is asked for until the replica enters it.
    later_claims: BTreeMap<NodeId, View>,
    /// A member signed a message above the watermark window: the group's
    /// stable checkpoint is ahead of this replica's.
    above_window: bool,
    resend_elapsed: u32,
    fetch_peer: usize,
    /// Ticks since this replica started.
    now: u64,
    /// Per other member, the last valid signed message from it.
    heard: BTreeMap<NodeId, Heard>,
    /// When this replica last heard the primary of its view (a valid signed
    /// message naming the view), or entered the view.
    primary_heard: u64,
    /// A PRE-PREPARE, PREPARE or COMMIT went out since the last resend
    /// round: no ALIVE is needed.
    busy: bool,

    stats: PbftStats,

    msgs: Vec<Message>,
    persisted_msgs: Vec<Message>,
    unstable_from: Option<Index>,
    /// The last record position handed to storage (what the stored log
    /// ends at): the next records written start at most one after it, so
    /// the log never has a gap (storage refuses one).
    written_last: Index,
    out_entries: Vec<Entry>,
    read_states: Vec<ReadState>,
    pending_snapshot: Option<SnapshotMeta>,
    prev_hs: HardState,
    prev_soft: SoftState,
    base_inflight: Option<Index>,
    base_durable: Index,
}

fn malformed(from: NodeId, reason: &'static str) -> StepError {
    StepError::Malformed { from, reason }
}

fn genesis_proof() -> CheckpointProof {
    CheckpointProof {
        n: 0,
        digest: CheckpointState::default().digest(),
        votes: Vec::new(),
    }
}

fn encode_record(
    base: Option<(Option<&CheckpointState>, &CheckpointProof)>,
    batches: &[&Batch],
) -> Vec<u8> {
    let mut e = Enc::default();
    e.u8(1);
    match base {
        None => e.u8(0),
        Some((Some(s), p)) => {
            e.u8(1);
            s.put(&mut e);
            put_checkpoint_proof(&mut e, p);
        }
        Some((None, p)) => {
            e.u8(2);
            put_checkpoint_proof(&mut e, p);
        }
    }
    e.list(batches, |e, b| {
        put_pre_prepare(e, &b.pp);
        e.u8(b.accepted as u8);
        for certs in [&b.prepared, &b.committed] {
            match certs {
                None => e.u8(0),
                Some(v) => {
                    e.u8(1);
                    e.list(v, put_vote);
                }
            }
        }
    });
    e.0
}

type DecodedRecord = (
    Option<(Option<CheckpointState>, CheckpointProof)>,
    Vec<Batch>,
);

fn decode_record(bytes: &[u8]) -> Option<DecodedRecord> {
    let mut d = Dec::new(bytes);
    if d.u8()? != 1 {
        return None;
    }
    let base = match d.u8()? {
        0 => None,
        1 => Some((
            Some(CheckpointState::get(&mut d)?),
            get_checkpoint_proof(&mut d)?,
        )),
        2 => Some((None, get_checkpoint_proof(&mut d)?)),
        _ => return None,
    };
    let batches = d.list(|d| {
        let pp = get_pre_prepare(d)?;
        let accepted = d.u8()? != 0;
        let mut certs = [None, None];
        for c in &mut certs {
            if d.u8()? != 0 {
                *c = Some(d.list(get_vote)?);
            }
        }
        let [prepared, committed] = certs;
        Some(Batch {
            last: pp.body.last(),
            pp,
            accepted,
            prepared,
            committed,
            my_prepare: None,
            my_commit: None,
        })
    })?;
    d.is_empty().then_some((base, batches))
}

impl Pbft {
    /// A replica starting from what its storage kept (or a brand new one:
    /// [`InitialState::bootstrap`]). The membership is the snapshot's and is
    /// fixed: it must list this node, no learners.
    pub fn new(cfg: Config, init: InitialState) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let conf = init.snapshot.conf_state.clone();
        if !conf.learners.is_empty() {
            return Err(ConfigError::Learners);
        }
        if !conf.voters.contains(&cfg.id) {
            return Err(ConfigError::NotVoter(cfg.id));
        }
        let members: Vec<NodeId> = conf.voters.iter().copied().collect();
        let n = members.len();
        let f = (n - 1) / 3;
        let q = (n + f) / 2 + 1;
        let snapshot = init.snapshot.clone();
        let written_last = init
            .entries
            .last()
            .map_or(snapshot.index, |e| e.index.max(snapshot.index));
        let mut bases: BTreeMap<Index, (Option<CheckpointState>, CheckpointProof)> =
            BTreeMap::new();
        let mut batches: BTreeMap<BatchKey, Batch> = BTreeMap::new();
        for e in init.entries.iter().filter(|e| e.index > snapshot.index) {
            let EntryPayload::Normal(bytes) = &e.payload else {
                continue;
            };
            let (base, bs) = decode_record(bytes).ok_or(ConfigError::CorruptRecord(e.index))?;
            if let Some((s, p)) = base
                && s.as_ref().is_none_or(|s| s.n == p.n)
            {
                bases.insert(p.n, (s, p));
            }
            for b in bs {
                let key = (b.pp.body.first, b.pp.body.view, b.pp.body.digest);
                let slot = batches.entry(key).or_insert_with(|| b.clone());
                slot.accepted |= b.accepted;
                if slot.prepared.is_none() {
                    slot.prepared = b.prepared;
                }
                if slot.committed.is_none() {
                    slot.committed = b.committed;
                }
            }
        }
        let (snap_state, snap_proof) = if snapshot.index == 0 {
            (CheckpointState::default(), genesis_proof())
        } else {
            match bases.get(&snapshot.index) {
                Some((Some(s), p)) => (s.clone(), p.clone()),
                _ => return Err(ConfigError::MissingCheckpoint(snapshot.index)),
            }
        };
        let (stable, stable_state) = match bases.last_key_value() {
            Some((&k, (s, p))) if k > snapshot.index => (p.clone(), s.clone()),
            _ => (snap_proof.clone(), Some(snap_state.clone())),
        };
        let view = init.hard_state.term.min(MAX_TERM);
        let mut me = Pbft {
            id: cfg.id,
            conf,
            members,
            f,
            q,
            view,
            active: view == 0,
            batches,
            exec: Exec::from_state(&snap_state),
            applied: snapshot.index,
            snapshot,
            snap_state: snap_state.clone(),
            snap_proof,
            stable,
            stable_state,
            ckpt_states: BTreeMap::new(),
            ckpt_votes: BTreeMap::new(),
            my_checkpoint: None,
            votes: BTreeMap::new(),
            voted: BTreeSet::new(),
            waiting: BTreeMap::new(),
            assigned: BTreeSet::new(),
            next_seq: 1,
            own_ts: 1,
            own_reqs: BTreeMap::new(),
            reads: BTreeMap::new(),
            replies: BTreeMap::new(),
            executions: BTreeMap::new(),
            step_leaves: BTreeMap::new(),
            certs: Vec::new(),
            vcs: BTreeMap::new(),
            my_vc: None,
            new_view: None,
            vc_elapsed: 0,
            vc_attempts: 0,
            high_seen: 0,
            later_view: 0,
            later_fetches: 0,
            later_claims: BTreeMap::new(),
            above_window: false,
            resend_elapsed: 0,
            fetch_peer: 0,
            now: 0,
            heard: BTreeMap::new(),
            primary_heard: 0,
            busy: false,
            stats: PbftStats::default(),
            msgs: Vec::new(),
            persisted_msgs: Vec::new(),
            unstable_from: None,
            written_last,
            out_entries: Vec::new(),
            read_states: Vec::new(),
            pending_snapshot: None,
            prev_hs: HardState::default(),
            prev_soft: SoftState {
                leader: None,
                role: Role::Follower,
            },
            base_inflight: None,
            base_durable: 0,
            cfg,
        };
        me.ckpt_states.insert(snap_state.n, snap_state);
        if let Some(s) = &me.stable_state {
            me.ckpt_states.insert(s.n, s.clone());
            me.base_durable = s.n;
        }
        // Replay what was executed before the restart: the same history
        // gives the same chain and at-most-once table, and the application
        // gets the entries after its applied index again.
        let commit = init.hard_state.commit;
        while me.exec.n < commit {
            let n = me.exec.n + 1;
            let Some((req, v)) = me.committed_request(n, true) else {
                break;
            };
            let ran = me.exec.step(n, req.as_ref());
            if let Some(r) = req.as_ref().filter(|r| ran && !r.body.read)
                && n.saturating_add(me.cfg.window) > commit
            {
                // Its REPLY may have been lost with the restart: signed
                // again (one per client for the whole replay) and kept for
                // a client that asks again.
                me.add_leaf(n, v, r);
            }
            if me.exec.n.is_multiple_of(me.cfg.checkpoint_interval) {
                me.ckpt_states.insert(n, me.exec.state());
            }
            if n > init.applied {
                me.out_entries.push(Entry {
                    index: n,
                    term: v,
                    payload: payload_of(req.as_ref(), ran),
                });
            }
        }
        me.flush_replies(false);
        if me.stable_state.is_none()
            && let Some(s) = me.ckpt_states.get(&me.stable.n)
            && s.digest() == me.stable.digest
        {
            me.stable_state = Some(s.clone());
        }
        // The CHECKPOINT of the last checkpoint it executed past its stable
        // one went out before the restart, maybe not to everyone: it is
        // retransmitted until the checkpoint is stable.
        if let Some((&n, s)) = me.ckpt_states.last_key_value()
            && n > me.stable.n
        {
            let vote = Signed::sign(
                me.cfg.crypto.as_ref(),
                me.id,
                CheckpointVote {
                    n,
                    digest: s.digest(),
                },
            );
            me.my_checkpoint = Some(vote.clone());
            me.ckpt_votes.entry(n).or_default().insert(me.id, vote);
        }
        me.applied = me.applied.max(init.applied.min(me.exec.n));
        me.prev_hs = HardState {
            term: view,
            vote: None,
            commit: me.exec.n,
        };
        let own_max = me
            .batches
            .values()
            .flat_map(|b| b.pp.body.requests.iter().flatten())
            .filter(|r| r.body.client == me.id)
            .map(|r| r.body.ts)
            .max()
            .unwrap_or(0);
        let exec_max = me.exec.clients.get(&me.id).map_or(0, |c| c.0);
        me.own_ts = own_max.max(exec_max) + 1;
        me.next_seq = me
            .batches
            .values()
            .filter(|b| b.accepted && b.pp.body.view == view)
            .map(|b| b.last + 1)
            .max()
            .unwrap_or(1)
            .max(me.stable.n + 1)
            .max(me.exec.n + 1);
        let assigned: Vec<(NodeId, u64)> = me
            .batches
            .values()
            .filter(|b| b.accepted && b.pp.body.view == view)
            .flat_map(|b| b.pp.body.requests.iter().flatten())
            .map(|r| (r.body.client, r.body.ts))
            .collect();
        me.assigned.extend(assigned);
        me.high_seen = me.exec.n;
        me.prev_soft = me.soft_state();
        Ok(me)
    }

    // ---- accessors -----------------------------------------------------

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.view
    }

    /// Whether the replica has entered its view (it is not changing views).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The primary of `view`: the `view mod n`-th member in id order.
    pub fn primary_of(&self, view: View) -> NodeId {
        self.members[(view % self.members.len() as u64) as usize]
    }

    /// f: how many Byzantine replicas the group tolerates.
    pub fn faults(&self) -> usize {
        self.f
    }

    /// The quorum (2f+1 for 3f+1 replicas).
    pub fn quorum(&self) -> usize {
        self.q
    }

    /// Its role: the primary of an entered view leads.
    pub fn role(&self) -> Role {
        if !self.active {
            Role::Candidate
        } else if self.primary_of(self.view) == self.id {
            Role::Leader
        } else {
            Role::Follower
        }
    }

    /// The primary, while the replica is in an entered view.
    pub fn leader(&self) -> Option<NodeId> {
        self.active.then(|| self.primary_of(self.view))
    }

    /// The durable state: the view and the executed prefix.
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.view,
            vote: None,
            commit: self.exec.n,
        }
    }

    /// The last executed sequence number.
    pub fn commit_index(&self) -> Index {
        self.exec.n
    }

    /// The highest sequence number the application has applied.
    pub fn applied_index(&self) -> Index {
        self.applied
    }

    /// The stable checkpoint: the low watermark h.
    pub fn stable_checkpoint(&self) -> Index {
        self.stable.n
    }

    /// The stable checkpoint's proof.
    pub fn stable_proof(&self) -> &CheckpointProof {
        &self.stable
    }

    /// The executed history's state at [`Pbft::commit_index`]: the hash
    /// chain over every sequence number executed (request digest, or zeros
    /// for a null request or a duplicate) and the at-most-once table — what
    /// a CHECKPOINT at that sequence number signs the digest of. Equal on
    /// every correct replica at one sequence number.
    pub fn executed_state(&self) -> CheckpointState {
        self.exec.state()
    }

    /// The dropped-input counters.
    pub fn stats(&self) -> &PbftStats {
        &self.stats
    }

    /// How many batches the replica holds (accepted, prepared or committed,
    /// kept for restarts until the log is compacted).
    pub fn batches_held(&self) -> usize {
        self.batches.len()
    }

    /// How many entries the protocol log of the current window holds:
    /// votes, checkpoint messages and view changes (garbage-collected at
    /// each stable checkpoint and new view).
    pub fn protocol_log_len(&self) -> usize {
        self.votes.len() + self.ckpt_votes.len() + self.vcs.len()
    }

    /// The view of the batch accepted or committed at `index`, if any.
    pub fn term_at(&self, index: Index) -> Option<Term> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.covering(index).map(|b| b.pp.body.view).max()
    }

    /// The highest sequence number a record is kept for.
    pub fn last_index(&self) -> Index {
        self.record_last()
    }

    /// The membership (fixed).
    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }

    /// The latest snapshot's metadata.
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        &self.snapshot
    }

    /// A summary for operators and tests: `term` is the view.
    pub fn status(&self) -> Status {
        Status {
            id: self.id,
            role: self.role(),
            term: self.view,
            leader: self.leader(),
            commit: self.exec.n,
            applied: self.applied,
            persisted: self.exec.n,
            last_index: self.record_last(),
            snapshot_index: self.snapshot.index,
            conf_state: self.conf.clone(),
            progress: self.progress(),
            removed: None,
            dropped: self.stats.dropped(),
        }
    }

    /// Per member, on every replica (any member may need it, not only the
    /// primary): `recent_active` and `connected` when a valid signed message
    /// from it arrived within the last `request_timeout` ticks (an active
    /// member sends one at least every `resend_tick`: ALIVE when it has
    /// nothing else to send), `matched` the highest sequence number it
    /// signed a COMMIT or CHECKPOINT for or reported executed. This replica
    /// itself is always active, `matched` its executed prefix.
    fn progress(&self) -> BTreeMap<NodeId, ProgressStatus> {
        self.members
            .iter()
            .map(|&id| {
                let (upto, recent) = if id == self.id {
                    (self.exec.n, true)
                } else {
                    let h = self.heard.get(&id);
                    (
                        h.map_or(0, |h| h.upto),
                        h.is_some_and(|h| self.now - h.at < u64::from(self.cfg.request_timeout)),
                    )
                };
                (
                    id,
                    ProgressStatus {
                        matched: upto,
                        next: self.exec.n + 1,
                        state: ProgressState::Replicate,
                        inflight: 0,
                        paused: false,
                        recent_active: recent,
                        learner: false,
                        connected: recent,
                    },
                )
            })
            .collect()
    }

    /// Notes a valid signed message from `from` (`upto` as for [`Heard`]).
    fn hear(&mut self, from: NodeId, upto: Index) {
        let h = self.heard.entry(from).or_default();
        h.at = self.now;
        h.upto = h.upto.max(upto);
    }

    /// Notes a valid signed message naming `view` from `from`: if it is the
    /// primary of this replica's (active) view, the primary is alive.
    fn hear_in_view(&mut self, from: NodeId, view: View) {
        if self.active && view == self.view && from == self.primary_of(view) {
            self.primary_heard = self.now;
        }
    }

    // ---- helpers -------------------------------------------------------

    fn crypto(&self) -> &dyn Crypto {
        self.cfg.crypto.as_ref()
    }

    fn is_member(&self, id: NodeId) -> bool {
        self.members.binary_search(&id).is_ok()
    }

    fn covering(&self, n: Index) -> impl Iterator<Item = &Batch> {
        let lo = n.saturating_sub(2 * self.cfg.window);
        self.batches
            .range((lo, 0, [0; 32])..=(n, View::MAX, [0xff; 32]))
            .map(|(_, b)| b)
            .filter(move |b| b.last >= n)
    }

    /// The request executed (or to execute) at `n`: from a committed batch,
    /// or (`prepared_ok`, on restart) the prepared batch of the highest view.
    fn committed_request(
        &self,
        n: Index,
        prepared_ok: bool,
    ) -> Option<(Option<Signed<Request>>, View)> {
        let b = self
            .covering(n)
            .filter(|b| b.committed.is_some() || (prepared_ok && b.prepared.is_some()))
            .max_by_key(|b| (b.committed.is_some(), b.pp.body.view))?;
        let r = b.pp.body.requests.get((n - b.pp.body.first) as usize)?;
        Some((r.clone(), b.pp.body.view))
    }

    fn peers(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .copied()
            .filter(|&m| m != self.id)
            .collect()
    }

    /// Whether state changed since the last [`Pbft::ready`] waits to be
    /// persisted (the view, the executed prefix, records, a snapshot).
    fn unpersisted(&self) -> bool {
        self.unstable_from.is_some()
            || self.hard_state() != self.prev_hs
            || self.pending_snapshot.is_some()
    }

    /// Queues a message. While state waits to be persisted, every message
    /// waits with it (in `persisted_messages`): a retransmission in the same
    /// call as the change it repeats — the VIEW-CHANGE resent in the tick
    /// that moved the replica to its view — must not leave before that
    /// change is durable, or a crash undoes what the message promised.
    fn send(&mut self, to: NodeId, kind: MessageKind) {
        let m = Message {
            from: self.id,
            to,
            view: self.view,
            kind,
        };
        if self.unpersisted() {
            self.persisted_msgs.push(m);
        } else {
            self.msgs.push(m);
        }
    }

    /// Queues `kind` for every peer: in `persisted_messages` with
    /// `persisted` or while state waits to be persisted (see `send`).
    fn broadcast(&mut self, kind: MessageKind, persisted: bool) {
        let persisted = persisted || self.unpersisted();
        self.busy |= matches!(
            kind,
            MessageKind::PrePrepare(_) | MessageKind::Prepare(_) | MessageKind::Commit(_)
        );
        for to in self.peers() {
            let m = Message {
                from: self.id,
                to,
                view: self.view,
                kind: kind.clone(),
            };
            if persisted {
                self.persisted_msgs.push(m);
            } else {
                self.msgs.push(m);
            }
        }
    }

    fn mark_unstable(&mut self, index: Index) {
        self.unstable_from = Some(self.unstable_from.map_or(index, |u| u.min(index)));
    }

    fn verify_request(&self, r: &Signed<Request>) -> bool {
        r.signer == r.body.client && self.is_member(r.signer) && r.verify(self.crypto())
    }

    /// A pre-prepare's own consistency: the primary's signature, the digest
    /// of its requests, the requests' signatures, a sane size.
    fn verify_pre_prepare(&self, pp: &Signed<PrePrepare>) -> bool {
        let b = &pp.body;
        pp.signer == self.primary_of(b.view)
            && b.first > 0
            && !b.requests.is_empty()
            && b.requests.len() as u64 <= self.cfg.window
            && b.last() <= MAX_INDEX
            && batch_digest(b.first, &b.requests) == b.digest
            && b.requests.iter().flatten().all(|r| self.verify_request(r))
            && pp.verify(self.crypto())
    }

    /// `votes` are `need` valid votes of `phase` for the pre-prepare from
    /// distinct members (not the primary, for PREPAREs).
    fn verify_votes(
        &self,
        pp: &PrePrepare,
        phase: Phase,
        votes: &[Signed<Vote>],
        need: usize,
    ) -> bool {
        let mut signers = BTreeSet::new();
        for v in votes {
            let ok = v.body.phase == phase
                && v.body.view == pp.view
                && v.body.first == pp.first
                && v.body.last == pp.last()
                && v.body.digest == pp.digest
                && self.is_member(v.signer)
                && !(phase == Phase::Prepare && v.signer == self.primary_of(pp.view))
                && v.verify(self.crypto());
            if !ok {
                return false;
            }
            signers.insert(v.signer);
        }
        signers.len() >= need
    }

    fn verify_proof(&self, p: &CheckpointProof) -> bool {
        if p.n == 0 {
            return p.digest == genesis_proof().digest;
        }
        if !p.n.is_multiple_of(self.cfg.checkpoint_interval) || p.n > MAX_INDEX {
            return false;
        }
        let mut signers = BTreeSet::new();
        for v in &p.votes {
            if v.body.n != p.n
                || v.body.digest != p.digest
                || !self.is_member(v.signer)
                || !v.verify(self.crypto())
            {
                return false;
            }
            signers.insert(v.signer);
        }
        signers.len() >= self.q
    }

    /// The shape a correct replica's VIEW-CHANGE has (as `prepared_certs`
    /// builds it), checked before any signature: at most L
    /// certificates, in views that never increase, each within the window
    /// above its checkpoint, none overlapping an earlier one of the same
    /// view, and each the first to cover one of its sequence numbers — so
    /// there is at most one per sequence number and view, and none repeated.
    fn view_change_shape_ok(&self, b: &ViewChange) -> bool {
        let h = b.checkpoint.n;
        let window = self.cfg.window;
        if b.prepared.len() as u64 > window {
            return false;
        }
        let mut covered: BTreeMap<Index, View> = BTreeMap::new();
        let mut prev_view = View::MAX;
        for c in &b.prepared {
            let pp = &c.pre_prepare.body;
            if pp.requests.is_empty()
                || pp.view > prev_view
                || pp.first == 0
                || pp.last() <= h
                || pp.last() > h.saturating_add(window)
                || pp.last() - pp.first >= window
            {
                return false;
            }
            prev_view = pp.view;
            let lo = pp.first.max(h + 1);
            let mut new = false;
            for n in lo..=pp.last() {
                match covered.get(&n) {
                    Some(&v) if v == pp.view => return false,
                    Some(_) => {}
                    None => {
                        covered.insert(n, pp.view);
                        new = true;
                    }
                }
            }
            if !new {
                return false;
            }
        }
        true
    }

    fn verify_view_change(&self, vc: &Signed<ViewChange>) -> bool {
        let b = &vc.body;
        let h = b.checkpoint.n;
        self.is_member(vc.signer)
            && self.view_change_shape_ok(b)
            && vc.verify(self.crypto())
            && self.verify_proof(&b.checkpoint)
            && b.prepared.iter().all(|c| {
                let pp = &c.pre_prepare.body;
                pp.view < b.view
                    && pp.last() > h
                    && pp.last() <= h.saturating_add(self.cfg.window)
                    && self.verify_pre_prepare(&c.pre_prepare)
                    && self.verify_votes(pp, Phase::Prepare, &c.prepares, self.q - 1)
            })
    }

    fn verify_commit_cert(&self, c: &CommitCert) -> bool {
        self.verify_pre_prepare(&c.pre_prepare)
            && self.verify_votes(&c.pre_prepare.body, Phase::Commit, &c.commits, self.q)
    }

    // ---- requests ------------------------------------------------------

    fn add_request(&mut self, r: Signed<Request>) {
        let key = (r.body.client, r.body.ts);
        if self.exec.executed(key.0, key.1) || self.waiting.contains_key(&key) {
            return;
        }
        if self.waiting.len() >= self.cfg.max_pending {
            self.stats.dropped_requests += 1;
            return;
        }
        self.waiting.insert(key, Waiting { req: r, age: 0 });
    }

    fn new_request(&mut self, read: bool, data: Bytes) -> Result<Proposed, ProposeError> {
        if self.waiting.len() >= self.cfg.max_pending {
            return Err(ProposeError::TooMuchUncommitted);
        }
        // Above every timestamp of this client executed so far (a request
        // sent before a restart may have executed since).
        let executed = self.exec.clients.get(&self.id).map_or(0, |c| c.0);
        let ts = self.own_ts.max(executed + 1);
        self.own_ts = ts + 1;
        let r = Signed::sign(
            self.crypto(),
            self.id,
            Request {
                client: self.id,
                ts,
                read,
                data,
            },
        );
        self.own_reqs.insert(ts, r.clone());
        if !read {
            self.replies.insert(
                ts,
                ReplySet {
                    digest: r.digest(),
                    req: r.clone(),
                    executed: None,
                    replies: BTreeMap::new(),
                    rounds: 0,
                },
            );
            self.bound_replies();
        }
        self.add_request(r.clone());
        self.broadcast(MessageKind::Request(r), false);
        Ok(Proposed::Forwarded {
            to: self.leader().unwrap_or(self.id),
        })
    }

    /// Proposes `data`: signs it as a request of this replica and sends it
    /// to every replica (the primary orders it; backups time it).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        self.new_request(false, Bytes::from(data))
    }

    /// A linearizable read point: the read is ordered as a request without
    /// data; once it executes at sequence number `n` a [`ReadState`] with
    /// `index: n` comes out (one full protocol round).
    pub fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        self.new_request(true, Bytes::new())?;
        self.reads.insert(self.own_ts - 1, ctx);
        Ok(())
    }

    /// An own request was lost (another request of this client took its
    /// timestamp, as after a restart): propose it again.
    fn reissue(&mut self, r: Signed<Request>) {
        let ctx = self.reads.remove(&r.body.ts);
        if self.new_request(r.body.read, r.body.data).is_ok()
            && let Some(ctx) = ctx
        {
            self.reads.insert(self.own_ts - 1, ctx);
        }
    }

    // ---- normal case ---------------------------------------------------

    /// The primary orders the requests waiting since the last ready: one
    /// pre-prepare per `max_batch`, within the watermarks.
    fn flush(&mut self) {
        if !self.active || self.primary_of(self.view) != self.id {
            return;
        }
        self.next_seq = self.next_seq.max(self.stable.n + 1);
        let mut todo: Vec<Signed<Request>> = self
            .waiting
            .iter()
            .filter(|(k, _)| !self.assigned.contains(k))
            .map(|(_, w)| w.req.clone())
            .collect();
        while !todo.is_empty() {
            let hi = self.stable.n + self.cfg.window;
            if self.next_seq > hi {
                break;
            }
            let room = (hi - self.next_seq + 1).min(self.cfg.max_batch as u64) as usize;
            let rest = todo.split_off(room.min(todo.len()));
            let reqs: Vec<Option<Signed<Request>>> = std::mem::replace(&mut todo, rest)
                .into_iter()
                .map(Some)
                .collect();
            for r in reqs.iter().flatten() {
                self.assigned.insert((r.body.client, r.body.ts));
            }
            let first = self.next_seq;
            let body = PrePrepare {
                view: self.view,
                first,
                digest: batch_digest(first, &reqs),
                requests: reqs,
            };
            self.next_seq = body.last() + 1;
            let pp = Signed::sign(self.crypto(), self.id, body);
            // Never sign two batches for one sequence number in a view.
            if !self.accept_pre_prepare(pp.clone()) {
                break;
            }
            self.broadcast(MessageKind::PrePrepare(pp), true);
        }
    }

    fn has_flush(&self) -> bool {
        self.active
            && self.primary_of(self.view) == self.id
            && self.next_seq.max(self.stable.n + 1) <= self.stable.n + self.cfg.window
            && self.waiting.keys().any(|k| !self.assigned.contains(k))
    }

    /// Accepts a pre-prepare of the current view (already checked): false
    /// if one overlapping it with another digest or range was accepted in
    /// the view.
    fn accept_pre_prepare(&mut self, pp: Signed<PrePrepare>) -> bool {
        let b = &pp.body;
        let (first, last, view, digest) = (b.first, b.last(), b.view, b.digest);
        let key = (first, view, digest);
        let lo = first.saturating_sub(2 * self.cfg.window);
        let conflict = self
            .batches
            .range((lo, 0, [0; 32])..=(last, View::MAX, [0xff; 32]))
            .any(|(k, x)| x.accepted && k.1 == view && x.last >= first && *k != key);
        if conflict {
            self.stats.conflicting += 1;
            return false;
        }
        if self.batches.get(&key).is_some_and(|x| x.accepted) {
            return true;
        }
        for r in pp.body.requests.iter().flatten() {
            self.add_request(r.clone());
            if let Some(w) = self.waiting.get_mut(&(r.body.client, r.body.ts)) {
                w.age = 0;
            }
        }
        self.high_seen = self.high_seen.max(last);
        let entry = self.batches.entry(key).or_insert(Batch {
            pp,
            last,
            accepted: true,
            prepared: None,
            committed: None,
            my_prepare: None,
            my_commit: None,
        });
        entry.accepted = true;
        self.mark_unstable(first);
        if self.primary_of(view) != self.id {
            let vote = Signed::sign(
                self.crypto(),
                self.id,
                Vote {
                    phase: Phase::Prepare,
                    view,
                    first,
                    last,
                    digest,
                },
            );
            self.record_vote(vote.clone());
            if let Some(x) = self.batches.get_mut(&key) {
                x.my_prepare = Some(vote.clone());
            }
            self.broadcast(MessageKind::Prepare(vote), true);
        }
        self.check_batch(key);
        true
    }

    fn record_vote(&mut self, v: Signed<Vote>) -> bool {
        let b = &v.body;
        if !self.voted.insert((v.signer, b.phase, b.first)) {
            return false;
        }
        let slot = self.votes.entry((b.first, b.last, b.digest)).or_default();
        let i = match b.phase {
            Phase::Prepare => 0,
            Phase::Commit => 1,
        };
        slot[i].insert(v.signer, v);
        true
    }

    /// Prepared, then committed-local, in the current view.
    fn check_batch(&mut self, key: BatchKey) {
        let (first, view, digest) = key;
        if view != self.view || !self.active {
            return;
        }
        let Some(b) = self.batches.get(&key) else {
            return;
        };
        if !b.accepted {
            return;
        }
        let last = b.last;
        let primary = self.primary_of(view);
        // The primary of a group of one has no vote yet: it needs none.
        let no_votes = VoteSets::default();
        let votes = self.votes.get(&(first, last, digest)).unwrap_or(&no_votes);
        if b.prepared.is_none() {
            let prepares: Vec<Signed<Vote>> = votes[0]
                .values()
                .filter(|v| v.signer != primary)
                .take(self.q - 1)
                .cloned()
                .collect();
            if prepares.len() < self.q - 1 {
                return;
            }
            let vote = Signed::sign(
                self.crypto(),
                self.id,
                Vote {
                    phase: Phase::Commit,
                    view,
                    first,
                    last,
                    digest,
                },
            );
            let x = self.batches.get_mut(&key).expect("batch");
            x.prepared = Some(prepares);
            x.my_commit = Some(vote.clone());
            self.mark_unstable(first);
            self.record_vote(vote.clone());
            self.broadcast(MessageKind::Commit(vote), true);
        }
        let votes = &self.votes[&(first, last, digest)];
        if votes[1].len() >= self.q {
            let commits: Vec<Signed<Vote>> = votes[1].values().take(self.q).cloned().collect();
            let x = self.batches.get_mut(&key).expect("batch");
            if x.committed.is_none() {
                // Durable with the execution, so that after a restart this
                // replica can still hand the batch to one that is behind.
                x.committed = Some(commits);
                self.mark_unstable(first);
                self.try_execute();
            }
        }
    }

    // ---- replies and certificates ---------------------------------------

    /// Notes the leaf of `r`, executed at `n` in `view` (the hash chain now
    /// at `h_n`), for the REPLY of this execution step.
    fn add_leaf(&mut self, n: Index, view: View, r: &Signed<Request>) {
        self.step_leaves
            .entry((r.body.client, view))
            .or_default()
            .push(ReplyLeaf {
                n,
                ts: r.body.ts,
                request: r.digest(),
                history: self.exec.chain,
            });
    }

    /// Signs one REPLY per client (and view) over the leaves of the
    /// execution step — at most [`MAX_REPLY_LEAVES`] each —, keeps it for
    /// a client that asks again, and sends it to the client when `send`
    /// (or counts it, for own requests).
    fn flush_replies(&mut self, send: bool) {
        let step = std::mem::take(&mut self.step_leaves);
        for ((client, view), leaves) in step {
            for chunk in leaves.chunks(MAX_REPLY_LEAVES) {
                let hashes: Vec<Digest> = chunk.iter().map(|l| l.hash(client)).collect();
                let levels = super::certificate::merkle_levels(&hashes);
                let root = levels.last().expect("a leaf")[0];
                let (first, last) = (chunk[0].n, chunk[chunk.len() - 1].n);
                let reply = Signed::sign(
                    self.crypto(),
                    self.id,
                    Reply {
                        view,
                        client,
                        first,
                        last,
                        root,
                        count: chunk.len() as u64,
                    },
                );
                let msg = Arc::new(Replies {
                    reply,
                    leaves: chunk.to_vec(),
                });
                for l in chunk {
                    self.executions.insert(l.n, msg.clone());
                }
                let keep_from = last.saturating_sub(self.cfg.window);
                while self
                    .executions
                    .first_key_value()
                    .is_some_and(|(&k, _)| k <= keep_from)
                {
                    self.executions.pop_first();
                }
                if client == self.id {
                    let reply = Arc::new(msg.reply.clone());
                    for (i, leaf) in chunk.iter().enumerate() {
                        let Some(set) = self.replies.get_mut(&leaf.ts) else {
                            continue;
                        };
                        if set.digest != leaf.request {
                            continue;
                        }
                        set.executed = Some((leaf.n, leaf.history));
                        let before = set.replies.len();
                        set.replies
                            .retain(|_, x| (x.leaf.n, x.leaf.history) == (leaf.n, leaf.history));
                        self.stats.bad_replies += (before - set.replies.len()) as u64;
                        set.replies.insert(
                            self.id,
                            ReplyProof {
                                reply: reply.clone(),
                                leaf: *leaf,
                                position: i as u64,
                                path: super::certificate::merkle_path(&levels, i),
                            },
                        );
                        self.try_certify(leaf.ts);
                    }
                } else if send {
                    self.send(client, MessageKind::Reply(Replies::clone(&msg)));
                }
            }
        }
    }

    /// A REPLY from `from`: one signature check for all its leaves.
    fn on_reply(&mut self, from: NodeId, msg: Replies) {
        let b = &msg.reply.body;
        if b.client != self.id {
            self.stats.stray_replies += 1;
            return;
        }
        let shaped = msg.reply.signer == from
            && !msg.leaves.is_empty()
            && msg.leaves.len() <= MAX_REPLY_LEAVES
            && b.count == msg.leaves.len() as u64
            && msg.leaves.iter().all(|l| (b.first..=b.last).contains(&l.n))
            && msg.leaves.windows(2).all(|w| w[0].n < w[1].n);
        if !shaped {
            self.stats.bad_replies += 1;
            return;
        }
        // The leaves for own requests still waiting for this signer: the
        // signature is checked only if there are any.
        let mut stray = false;
        let wanted: Vec<usize> = (0..msg.leaves.len())
            .filter(|&i| match self.replies.get(&msg.leaves[i].ts) {
                None => {
                    stray = true;
                    false
                }
                Some(set) => !set.replies.contains_key(&from),
            })
            .collect();
        if wanted.is_empty() {
            if stray {
                self.stats.stray_replies += 1;
            }
            return;
        }
        let hashes: Vec<Digest> = msg.leaves.iter().map(|l| l.hash(b.client)).collect();
        let levels = super::certificate::merkle_levels(&hashes);
        // Leaves that do not hash to the signed root: a bad signature.
        if levels.last().expect("a leaf")[0] != b.root || !msg.reply.verify(self.crypto()) {
            self.stats.bad_replies += 1;
            return;
        }
        let reply = Arc::new(msg.reply);
        for i in wanted {
            let leaf = msg.leaves[i];
            let Some(set) = self.replies.get_mut(&leaf.ts) else {
                continue;
            };
            let matches = leaf.request == set.digest
                && set
                    .executed
                    .is_none_or(|(n, h)| (leaf.n, leaf.history) == (n, h));
            if !matches {
                self.stats.bad_replies += 1;
                continue;
            }
            set.replies.insert(
                from,
                ReplyProof {
                    reply: reply.clone(),
                    leaf,
                    position: i as u64,
                    path: super::certificate::merkle_path(&levels, i),
                },
            );
            self.try_certify(leaf.ts);
        }
    }

    /// Assembles the certificate of own request `ts` once f+1 replies
    /// match this replica's own execution.
    fn try_certify(&mut self, ts: u64) {
        let Some(set) = self.replies.get(&ts) else {
            return;
        };
        let Some((n, h)) = set.executed else {
            return;
        };
        let matching: Vec<super::certificate::Member<'_>> = set
            .replies
            .values()
            .filter(|p| (p.leaf.n, p.leaf.history, p.leaf.request) == (n, h, set.digest))
            .take(self.f + 1)
            .map(|p| super::certificate::Member {
                reply: &p.reply,
                position: p.position,
                path: &p.path,
            })
            .collect();
        if matching.len() <= self.f {
            return;
        }
        let leaf = ReplyLeaf {
            n,
            ts,
            request: set.digest,
            history: h,
        };
        let bytes = super::certificate::build(&set.req, &leaf, &matching);
        self.certs.push(Certificate { index: n, bytes });
        if self.certs.len() > self.cfg.max_pending {
            // Nobody takes them: the oldest go.
            self.certs.remove(0);
        }
        self.stats.certificates += 1;
        self.replies.remove(&ts);
    }

    /// At most `max_pending` own requests wait for replies: the oldest
    /// executed ones go first.
    fn bound_replies(&mut self) {
        while self.replies.len() > self.cfg.max_pending {
            let oldest = self
                .replies
                .iter()
                .find(|(_, s)| s.executed.is_some())
                .map(|(&t, _)| t)
                .or_else(|| self.replies.keys().next().copied());
            let Some(t) = oldest else { break };
            if self
                .replies
                .remove(&t)
                .is_some_and(|s| s.executed.is_some())
            {
                self.stats.certificates_dropped += 1;
            }
        }
    }

    /// A client asks again for the REPLY covering its request `ts`
    /// executed at `n`: the whole signed REPLY of that step, with its
    /// leaves.
    fn on_reply_ask(&mut self, from: NodeId, n: Index, ts: u64) {
        if let Some(r) = self.executions.get(&n)
            && r.reply.body.client == from
            && r.leaves.iter().any(|l| l.n == n && l.ts == ts)
        {
            let r = Replies::clone(r);
            self.send(from, MessageKind::Reply(r));
        }
    }

    /// Asks the members whose replies are missing for own requests that
    /// executed here a resend round ago and still lack a certificate.
    fn ask_replies(&mut self) {
        let peers = self.peers();
        let mut asks = Vec::new();
        for set in self.replies.values_mut() {
            let Some((n, _)) = set.executed else { continue };
            set.rounds += 1;
            if set.rounds < 2 {
                continue;
            }
            for &p in &peers {
                if !set.replies.contains_key(&p) {
                    asks.push((p, n, set.req.body.ts));
                }
            }
            if asks.len() >= 64 * peers.len() {
                break;
            }
        }
        for (to, n, ts) in asks {
            self.send(to, MessageKind::ReplyAsk { n, ts });
        }
    }

    /// Takes the certificates assembled since the last call.
    pub fn take_certificates(&mut self) -> Vec<Certificate> {
        std::mem::take(&mut self.certs)
    }

    /// Own requests waiting for their certificate (executed or not).
    pub fn awaiting_certificates(&self) -> usize {
        self.replies.len()
    }

    /// Executes committed requests in sequence order.
    fn try_execute(&mut self) {
        loop {
            let n = self.exec.n + 1;
            let Some((req, view)) = self.committed_request(n, false) else {
                break;
            };
            self.execute(n, req, view);
        }
        self.flush_replies(true);
    }

    fn execute(&mut self, n: Index, req: Option<Signed<Request>>, view: View) {
        let ran = self.exec.step(n, req.as_ref());
        if let Some(r) = req.as_ref().filter(|r| ran && !r.body.read) {
            self.add_leaf(n, view, r);
        }
        if let Some(r) = &req {
            let key = (r.body.client, r.body.ts);
            self.waiting.remove(&key);
            if r.body.client == self.id
                && let Some(mine) = self.own_reqs.remove(&r.body.ts)
            {
                if !ran || mine.digest() != r.digest() {
                    // Another request of ours took this timestamp.
                    self.replies.remove(&r.body.ts);
                    self.reissue(mine);
                } else if let Some(ctx) = self.reads.remove(&r.body.ts) {
                    self.read_states.push(ReadState { index: n, ctx });
                }
            }
        }
        self.out_entries.push(Entry {
            index: n,
            term: view,
            payload: payload_of(req.as_ref(), ran),
        });
        if n.is_multiple_of(self.cfg.checkpoint_interval) {
            let state = self.exec.state();
            let vote = Signed::sign(
                self.crypto(),
                self.id,
                CheckpointVote {
                    n,
                    digest: state.digest(),
                },
            );
            if n == self.stable.n
                && self.stable_state.is_none()
                && vote.body.digest == self.stable.digest
            {
                // Stable before this replica got here: its state is now
                // known, durable with the record above it, and compactable.
                self.stable_state = Some(state.clone());
                self.mark_unstable(n + 1);
            }
            self.ckpt_states.insert(n, state);
            self.my_checkpoint = Some(vote.clone());
            self.broadcast(MessageKind::Checkpoint(vote.clone()), true);
            self.on_checkpoint_vote(vote);
        }
    }

    // ---- checkpoints ---------------------------------------------------

    fn on_checkpoint_vote(&mut self, v: Signed<CheckpointVote>) {
        let n = v.body.n;
        if n <= self.stable.n {
            return;
        }
        self.high_seen = self.high_seen.max(n);
        let slot = self.ckpt_votes.entry(n).or_default();
        slot.entry(v.signer).or_insert(v);
        let mut by_digest: BTreeMap<Digest, Vec<Signed<CheckpointVote>>> = BTreeMap::new();
        for v in slot.values() {
            by_digest.entry(v.body.digest).or_default().push(v.clone());
        }
        if let Some((digest, votes)) = by_digest.into_iter().find(|(_, v)| v.len() >= self.q) {
            self.adopt_stable(CheckpointProof { n, digest, votes });
        }
    }

    /// A checkpoint is stable (proof checked): move the low watermark and
    /// collect the protocol log below it.
    fn adopt_stable(&mut self, proof: CheckpointProof) {
        let n = proof.n;
        if n <= self.stable.n {
            return;
        }
        self.stable_state = self
            .ckpt_states
            .get(&n)
            .filter(|s| s.digest() == proof.digest)
            .cloned();
        self.stable = proof;
        self.above_window = false;
        self.high_seen = self.high_seen.max(n);
        self.ckpt_states = self.ckpt_states.split_off(&n);
        self.ckpt_votes = self.ckpt_votes.split_off(&(n + 1));
        self.votes.retain(|k, _| k.1 > n);
        let floor = n.saturating_sub(self.cfg.window);
        self.voted.retain(|k| k.2 > floor);
        self.next_seq = self.next_seq.max(n + 1);
        // The proof is durable (with the state when this replica has it),
        // so a restart never moves the low watermark back.
        self.mark_unstable(n + 1);
    }

    // ---- view changes --------------------------------------------------

    fn prepared_certs(&self) -> Vec<PreparedCert> {
        let h = self.stable.n;
        let mut certs: Vec<&Batch> = self
            .batches
            .values()
            .filter(|b| b.prepared.is_some() && b.last > h)
            .collect();
        certs.sort_by_key(|b| std::cmp::Reverse(b.pp.body.view));
        let mut covered: BTreeSet<Index> = BTreeSet::new();
        let mut out = Vec::new();
        for b in certs {
            let lo = b.pp.body.first.max(h + 1);
            if (lo..=b.last).all(|n| covered.contains(&n)) {
                continue;
            }
            covered.extend(lo..=b.last);
            out.push(PreparedCert {
                pre_prepare: b.pp.clone(),
                prepares: b.prepared.clone().unwrap_or_default(),
            });
        }
        out
    }

    fn start_view_change(&mut self, v: View) {
        if v <= self.view || v > MAX_TERM {
            return;
        }
        self.view = v;
        self.active = false;
        self.vc_elapsed = 0;
        self.votes.clear();
        self.voted.clear();
        self.new_view = None;
        self.assigned.clear();
        let vc = Signed::sign(
            self.crypto(),
            self.id,
            ViewChange {
                view: v,
                checkpoint: self.stable.clone(),
                prepared: self.prepared_certs(),
            },
        );
        self.my_vc = Some(vc.clone());
        self.vcs.insert(self.id, vc.clone());
        self.broadcast(MessageKind::ViewChange(vc), true);
        self.try_new_view();
    }

    fn on_view_change(&mut self, from: NodeId, vc: Signed<ViewChange>) {
        let v = vc.body.view;
        if v < self.view || (v == self.view && self.active) {
            // A replica behind: hand it the new view it missed.
            if self.active
                && let Some(nv) = self.new_view.clone()
            {
                self.send(from, MessageKind::NewView(nv));
            }
            return;
        }
        if self.vcs.get(&from).is_some_and(|x| x.body.view >= v) {
            return;
        }
        if !self.verify_view_change(&vc) {
            self.stats.invalid_view_change += 1;
            return;
        }
        self.vcs.insert(from, vc);
        // TOCS liveness rule: f+1 replicas ahead mean at least one correct.
        let ahead: Vec<View> = self
            .vcs
            .iter()
            .filter(|(id, x)| **id != self.id && x.body.view > self.view)
            .map(|(_, x)| x.body.view)
            .collect();
        if ahead.len() > self.f
            && let Some(&smallest) = ahead.iter().min()
        {
            self.start_view_change(smallest);
        }
        self.try_new_view();
    }

    fn try_new_view(&mut self) {
        let v = self.view;
        if self.active || self.primary_of(v) != self.id {
            return;
        }
        let Some(own) = self.vcs.get(&self.id).filter(|x| x.body.view == v).cloned() else {
            return;
        };
        let mut chosen = vec![own];
        chosen.extend(
            self.vcs
                .iter()
                .filter(|(id, x)| **id != self.id && x.body.view == v)
                .map(|(_, x)| x.clone())
                .take(self.q - 1),
        );
        if chosen.len() < self.q {
            return;
        }
        if conflicting_certificates(&chosen).is_some() {
            // Impossible with at most f Byzantine replicas (module docs):
            // no NEW-VIEW rather than one that picks between them.
            self.stats.conflicting_certificates += 1;
            return;
        }
        let (ckpt, reissue) = compute_new_view(&chosen);
        let pp = reissue.map(|(first, requests)| {
            Signed::sign(
                self.crypto(),
                self.id,
                PrePrepare {
                    view: v,
                    first,
                    digest: batch_digest(first, &requests),
                    requests,
                },
            )
        });
        let nv = Signed::sign(
            self.crypto(),
            self.id,
            NewView {
                view: v,
                view_changes: chosen,
                pre_prepare: pp.clone(),
            },
        );
        self.broadcast(MessageKind::NewView(nv.clone()), true);
        self.enter_view(nv, ckpt, pp);
    }

    fn on_new_view(&mut self, nv: Signed<NewView>) {
        let v = nv.body.view;
        if v < self.view {
            self.stats.wrong_view += 1;
            return;
        }
        if v == self.view && self.active {
            return;
        }
        // Any member may hand on a NEW-VIEW: it is the primary's signature
        // that counts.
        if nv.signer != self.primary_of(v) || !nv.verify(self.crypto()) {
            self.stats.bad_signature += 1;
            return;
        }
        let vcs = &nv.body.view_changes;
        let signers: BTreeSet<NodeId> = vcs.iter().map(|x| x.signer).collect();
        let valid = signers.len() == vcs.len()
            && vcs.len() >= self.q
            && vcs.len() <= self.members.len()
            && vcs
                .iter()
                .all(|x| x.body.view == v && self.verify_view_change(x));
        if !valid {
            self.stats.invalid_new_view += 1;
            return;
        }
        if conflicting_certificates(vcs).is_some() {
            self.stats.conflicting_certificates += 1;
            self.stats.invalid_new_view += 1;
            return;
        }
        let (ckpt, reissue) = compute_new_view(vcs);
        let matches = match (&reissue, &nv.body.pre_prepare) {
            (None, None) => true,
            (Some((first, requests)), Some(pp)) => {
                pp.signer == nv.signer
                    && pp.body.view == v
                    && pp.body.first == *first
                    && pp.body.requests == *requests
                    && pp.body.digest == batch_digest(*first, requests)
                    && pp.verify(self.crypto())
            }
            _ => false,
        };
        if !matches {
            self.stats.invalid_new_view += 1;
            return;
        }
        let pp = nv.body.pre_prepare.clone();
        self.view = v;
        self.enter_view(nv, ckpt, pp);
    }

    fn enter_view(
        &mut self,
        nv: Signed<NewView>,
        ckpt: CheckpointProof,
        pp: Option<Signed<PrePrepare>>,
    ) {
        self.active = true;
        self.vc_elapsed = 0;
        self.vc_attempts = 0;
        self.later_fetches = 0;
        self.primary_heard = self.now;
        if self.later_view <= self.view {
            self.later_view = 0;
        }
        let v = self.view;
        self.later_claims.retain(|_, claimed| *claimed > v);
        self.votes.clear();
        self.voted.clear();
        self.my_vc = None;
        self.assigned.clear();
        let v = self.view;
        self.vcs.retain(|_, x| x.body.view > v);
        self.new_view = Some(nv);
        for w in self.waiting.values_mut() {
            w.age = 0;
        }
        let max_s = pp.as_ref().map_or(ckpt.n, |p| p.body.last());
        self.adopt_stable(ckpt);
        // A primary re-entering its view after a restart (through the
        // NEW-VIEW a peer hands it) goes on after the batches it
        // pre-prepared in the view before the crash: numbering from max-s
        // again would sign a second batch for the same sequence numbers.
        let mut earlier: Vec<(NodeId, u64)> = Vec::new();
        let mut after_own = 0;
        for b in self.batches.values() {
            if b.accepted && b.pp.body.view == v {
                after_own = after_own.max(b.last + 1);
                earlier.extend(
                    b.pp.body
                        .requests
                        .iter()
                        .flatten()
                        .map(|r| (r.body.client, r.body.ts)),
                );
            }
        }
        self.assigned.extend(earlier);
        self.next_seq = (max_s.max(self.stable.n) + 1).max(after_own);
        if let Some(pp) = pp {
            for r in pp.body.requests.iter().flatten() {
                self.assigned.insert((r.body.client, r.body.ts));
            }
            self.accept_pre_prepare(pp);
        }
    }

    // ---- catch-up ------------------------------------------------------

    fn on_fetch(&mut self, from: NodeId, view: View, next: Index, active: bool) {
        if self.active
            && (view < self.view || !active)
            && let Some(nv) = self.new_view.clone()
        {
            self.send(from, MessageKind::NewView(nv));
        }
        if next <= self.snapshot.index {
            let kind = MessageKind::Snapshot {
                meta: self.snapshot.clone(),
                state: self.snap_state.clone(),
                proof: self.snap_proof.clone(),
            };
            self.send(from, kind);
            return;
        }
        let mut n = next;
        for _ in 0..FETCH_BATCHES {
            let Some(b) = self
                .covering(n)
                .filter(|b| b.committed.is_some())
                .max_by_key(|b| b.pp.body.view)
            else {
                break;
            };
            let cert = CommitCert {
                pre_prepare: b.pp.clone(),
                commits: b.committed.clone().unwrap_or_default(),
            };
            n = b.last + 1;
            self.send(from, MessageKind::Committed(cert));
        }
    }

    fn on_committed(&mut self, cert: CommitCert) {
        let b = &cert.pre_prepare.body;
        let (first, last) = (b.first, b.last());
        if last <= self.exec.n {
            return;
        }
        if first > self.exec.n.saturating_add(4 * self.cfg.window) {
            self.stats.outside_watermarks += 1;
            return;
        }
        if !self.verify_commit_cert(&cert) {
            self.stats.invalid += 1;
            return;
        }
        let key = (first, b.view, b.digest);
        let entry = self.batches.entry(key).or_insert(Batch {
            pp: cert.pre_prepare.clone(),
            last,
            accepted: false,
            prepared: None,
            committed: None,
            my_prepare: None,
            my_commit: None,
        });
        if entry.committed.is_none() {
            entry.committed = Some(cert.commits);
            self.mark_unstable(first);
        }
        self.try_execute();
    }

    fn on_snapshot(&mut self, meta: SnapshotMeta, state: CheckpointState, proof: CheckpointProof) {
        let valid = meta.index == state.n
            && proof.n == state.n
            && state.n > 0
            && proof.digest == state.digest()
            && meta.conf_state == self.conf
            && self.verify_proof(&proof);
        if !valid {
            self.stats.invalid += 1;
            return;
        }
        let n = state.n;
        if n <= self.exec.n {
            return;
        }
        self.exec = Exec::from_state(&state);
        self.out_entries.retain(|e| e.index > n);
        self.snapshot = meta.clone();
        self.pending_snapshot = Some(meta);
        self.snap_state = state.clone();
        self.snap_proof = proof.clone();
        self.ckpt_states.insert(n, state);
        self.adopt_stable(proof);
        if self.stable.n == n {
            self.stable_state = self.ckpt_states.get(&n).cloned();
        }
        self.batches.retain(|_, b| b.last > n);
        let executed: Vec<(NodeId, u64)> = self
            .waiting
            .keys()
            .filter(|(c, t)| self.exec.executed(*c, *t))
            .copied()
            .collect();
        for k in executed {
            self.waiting.remove(&k);
        }
        let mine: Vec<u64> = self
            .own_reqs
            .keys()
            .filter(|&&t| self.exec.executed(self.id, t))
            .copied()
            .collect();
        for t in mine {
            // Executed inside the snapshot: this replica cannot name its
            // sequence number, so it certifies none.
            self.replies.remove(&t);
            let r = self.own_reqs.remove(&t).expect("own request");
            let other = self
                .exec
                .executed_tag(self.id, t)
                .is_some_and(|tag| tag != tag_of(&r));
            if other || self.reads.contains_key(&t) {
                // Another request of ours (sent before a restart) took the
                // timestamp, or the read point is inside the snapshot.
                self.reissue(r);
            }
        }
        self.own_ts = self
            .own_ts
            .max(self.exec.clients.get(&self.id).map_or(0, |c| c.0) + 1);
        self.mark_unstable(n + 1);
        self.try_execute();
    }

    // ---- input ---------------------------------------------------------

    /// One logical clock tick: request and view-change timers,
    /// retransmissions and catch-up.
    pub fn tick(&mut self) {
        self.now += 1;
        if self.active {
            if self.primary_of(self.view) != self.id {
                let mut expired = false;
                for w in self.waiting.values_mut() {
                    w.age += 1;
                    expired |= w.age >= self.cfg.request_timeout;
                }
                // An idle group notices a dead primary too: a live one
                // sends something signed naming the view every resend
                // round (ALIVE when it has nothing to order). The request
                // timer above still catches one that sends signs of life
                // but orders nothing.
                let silent = self.now - self.primary_heard >= u64::from(self.cfg.request_timeout);
                if expired || silent {
                    if !expired {
                        self.stats.idle_view_changes += 1;
                    }
                    self.start_view_change(self.view + 1);
                }
            }
        } else if self.my_vc.is_none() {
            // Restarted in a view it has not seen the NEW-VIEW of (it asks
            // for it): if none comes, that view never formed; move on.
            self.vc_elapsed += 1;
            if self.vc_elapsed >= self.cfg.request_timeout {
                self.start_view_change(self.view + 1);
            }
        } else if self
            .vcs
            .values()
            .filter(|x| x.body.view >= self.view)
            .count()
            >= self.q
        {
            // TOCS: the timer runs once a quorum moved to this view, so a
            // replica cut off alone does not run ahead through the views.
            // VIEW-CHANGEs for later views count too: a sender that timed
            // out here replaced the one it sent for this view, which may
            // have been lost (counting only this view, correct replicas
            // spread over a few views wait for each other forever). f
            // members claiming high views gain nothing they could not get
            // by signing VIEW-CHANGEs for exactly this view.
            self.vc_elapsed += 1;
            let timeout = self.cfg.request_timeout << self.vc_attempts.min(MAX_DOUBLINGS);
            if self.vc_elapsed >= timeout {
                self.vc_attempts += 1;
                self.start_view_change(self.view + 1);
            }
        }
        self.resend_elapsed += 1;
        if self.resend_elapsed >= self.cfg.resend_tick {
            self.resend_elapsed = 0;
            self.resend();
        }
    }

    /// Retransmits what unfinished work depends on, and asks a peer for
    /// what this replica misses.
    fn resend(&mut self) {
        let quiet = !std::mem::take(&mut self.busy);
        let own: Vec<Signed<Request>> = self.own_reqs.values().take(64).cloned().collect();
        for r in own {
            self.broadcast(MessageKind::Request(r), false);
        }
        self.ask_replies();
        if self.active {
            let primary = self.primary_of(self.view) == self.id;
            let mut out = Vec::new();
            for b in self.batches.values() {
                if b.pp.body.view != self.view || !b.accepted || b.last <= self.exec.n {
                    continue;
                }
                if primary {
                    out.push(MessageKind::PrePrepare(b.pp.clone()));
                }
                if let Some(p) = &b.my_prepare {
                    out.push(MessageKind::Prepare(p.clone()));
                }
                if let Some(c) = &b.my_commit {
                    out.push(MessageKind::Commit(c.clone()));
                }
            }
            for k in out {
                self.broadcast(k, false);
            }
            if quiet {
                // Nothing signed naming the view went out since the last
                // round: a sign of life, so the backups keep an idle
                // primary and every member knows who is reachable.
                let alive = Signed::sign(
                    self.crypto(),
                    self.id,
                    Alive {
                        view: self.view,
                        executed: self.exec.n,
                    },
                );
                self.broadcast(MessageKind::Alive(alive), false);
            }
        } else if let Some(vc) = self.my_vc.clone() {
            self.broadcast(MessageKind::ViewChange(vc), false);
        }
        if let Some(c) = self.my_checkpoint.clone()
            && c.body.n > self.stable.n
        {
            self.broadcast(MessageKind::Checkpoint(c), false);
        }
        let others = self.high_seen > self.exec.n
            || !self.active
            || self.above_window
            || self.vouched_view() > self.view;
        let peers = self.peers();
        let mut later = self.later_view > self.view;
        if later && !others {
            // Asked only because fewer than f+1 members signed something in
            // a later view (one message can claim any view): each peer is
            // asked once, then it is forgotten, and while messages of later
            // views keep coming a fetch goes out only every `LATER_BACKOFF`
            // resends until the replica enters a view.
            self.later_fetches += 1;
            let k = self.later_fetches;
            later = k <= peers.len() || k.is_multiple_of(LATER_BACKOFF);
            if k >= peers.len() {
                self.later_view = 0;
                self.stats.later_view_given_up += 1;
            }
        }
        let behind = others || later;
        if behind && !peers.is_empty() {
            self.fetch_peer = (self.fetch_peer + 1) % peers.len();
            let to = peers[self.fetch_peer];
            let kind = MessageKind::Fetch {
                next: self.exec.n + 1,
                active: self.active,
                stable: self.stable.n,
            };
            self.send(to, kind);
        }
    }

    /// Notes that member `from` signed a message in `view`, if above this
    /// replica's view.
    fn claim_later_view(&mut self, from: NodeId, view: View) {
        if view > self.view && from != self.id {
            let claimed = self.later_claims.entry(from).or_insert(0);
            *claimed = (*claimed).max(view);
        }
    }

    /// The highest view that f+1 other members signed messages in (0 if
    /// fewer did): at least one of them is correct, so some correct replica
    /// entered that view and holds its NEW-VIEW (or a later one).
    fn vouched_view(&self) -> View {
        let mut claims: Vec<View> = self.later_claims.values().copied().collect();
        if claims.len() <= self.f {
            return 0;
        }
        claims.sort_unstable_by(|a, b| b.cmp(a));
        claims[self.f]
    }

    /// Starts a view change at once.
    pub fn campaign(&mut self) {
        self.start_view_change(self.view + 1);
    }

    /// The metadata a snapshot taken at the applied `index` would have.
    /// PBFT compacts only at its stable checkpoint, once the checkpoint's
    /// state is durable in the records: any other index is refused with
    /// [`CompactError::NotApplied`] naming the index that would do.
    pub fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        if index <= self.snapshot.index {
            return Err(CompactError::AlreadyCompacted {
                index,
                snapshot: self.snapshot.index,
            });
        }
        let s = self.stable.n;
        let ready = self.stable_state.is_some() && self.base_durable >= s && self.applied >= s;
        let compactable = if ready { s } else { self.snapshot.index };
        if index != compactable {
            return Err(CompactError::NotApplied {
                index,
                applied: compactable,
            });
        }
        Ok(SnapshotMeta {
            index,
            term: self.term_at(index).unwrap_or(0),
            conf_state: self.conf.clone(),
        })
    }

    /// Compacts the log up to the stable checkpoint `index` (see
    /// [`Pbft::snapshot_meta_at`]); `keep` is ignored: a replica behind
    /// catches up from committed batches kept above the checkpoint or
    /// installs the snapshot.
    pub fn compact_keeping(
        &mut self,
        index: Index,
        _keep: u64,
    ) -> Result<SnapshotMeta, CompactError> {
        let meta = self.snapshot_meta_at(index)?;
        self.snapshot = meta.clone();
        self.snap_state = self.stable_state.clone().unwrap_or_default();
        self.snap_proof = self.stable.clone();
        self.batches.retain(|_, b| b.last > index);
        Ok(meta)
    }

    /// Takes a message from another member. A message no correct member
    /// sends in that shape is refused with an error; Byzantine content
    /// (bad signatures, non-members, other views, outside the watermarks,
    /// conflicts) is dropped and counted in [`Pbft::stats`].
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        if m.to != self.id {
            return Err(StepError::WrongRecipient { to: m.to });
        }
        let from = m.from;
        if from == 0 || from == self.id {
            return Err(StepError::BadSender { from });
        }
        if !self.is_member(from) {
            self.stats.not_member += 1;
            return Ok(());
        }
        self.validate(&m)?;
        let view = m.view;
        match m.kind {
            MessageKind::Request(r) => {
                // The client's signature is what counts: backups forward.
                if !self.verify_request(&r) {
                    self.stats.bad_signature += 1;
                } else {
                    let key = (r.body.client, r.body.ts);
                    let new = !self.waiting.contains_key(&key);
                    self.add_request(r.clone());
                    // A backup hands a request it times to the primary, so
                    // a client that withholds it from the primary cannot
                    // make the backups' timers force a view change.
                    let primary = self.primary_of(self.view);
                    if new
                        && self.active
                        && self.waiting.contains_key(&key)
                        && primary != self.id
                        && primary != from
                    {
                        self.send(primary, MessageKind::Request(r));
                    }
                }
            }
            MessageKind::PrePrepare(pp) => self.on_pre_prepare(from, pp),
            MessageKind::Prepare(v) => self.on_vote(from, v, Phase::Prepare),
            MessageKind::Commit(v) => self.on_vote(from, v, Phase::Commit),
            MessageKind::Checkpoint(v) => {
                if v.signer != from || !v.verify(self.crypto()) {
                    self.stats.bad_signature += 1;
                } else if !v.body.n.is_multiple_of(self.cfg.checkpoint_interval) {
                    self.hear(from, 0);
                    self.stats.invalid += 1;
                } else if v.body.n > self.stable.n + 4 * self.cfg.window {
                    self.hear(from, 0);
                    self.stats.outside_watermarks += 1;
                    self.high_seen = self.high_seen.max(self.stable.n + 1);
                } else {
                    self.hear(from, v.body.n);
                    self.on_checkpoint_vote(v);
                }
            }
            MessageKind::ViewChange(vc) => {
                if !self.view_change_shape_ok(&vc.body) {
                    // Checked before any signature: a certificate repeated
                    // (or one per sequence number several times over) would
                    // otherwise cost a verification each.
                    self.stats.invalid_view_change += 1;
                } else if vc.signer != from || !vc.verify(self.crypto()) {
                    self.stats.bad_signature += 1;
                } else {
                    self.hear(from, 0);
                    self.on_view_change(from, vc);
                }
            }
            MessageKind::NewView(nv) => self.on_new_view(nv),
            MessageKind::Fetch {
                next,
                active,
                stable,
            } => {
                if self.stable.n > stable {
                    self.send(from, MessageKind::Stable(self.stable.clone()));
                }
                self.on_fetch(from, view, next, active)
            }
            MessageKind::Stable(proof) => {
                if proof.n > self.stable.n {
                    if self.verify_proof(&proof) {
                        self.adopt_stable(proof);
                    } else {
                        self.stats.invalid += 1;
                    }
                }
            }
            MessageKind::Committed(cert) => self.on_committed(cert),
            MessageKind::Snapshot { meta, state, proof } => self.on_snapshot(meta, state, proof),
            MessageKind::Reply(r) => self.on_reply(from, r),
            MessageKind::ReplyAsk { n, ts } => self.on_reply_ask(from, n, ts),
            MessageKind::NotMember { .. } => {}
            MessageKind::Alive(a) => self.on_alive(from, a),
        }
        Ok(())
    }

    /// Shapes no correct member sends.
    fn validate(&self, m: &Message) -> Result<(), StepError> {
        let from = m.from;
        if m.view > MAX_TERM {
            return Err(malformed(from, "view beyond MAX_TERM"));
        }
        let range = |first: Index, last: Index| {
            if first == 0 || first > last || last > MAX_INDEX {
                Err(malformed(from, "sequence numbers out of range"))
            } else {
                Ok(())
            }
        };
        match &m.kind {
            MessageKind::PrePrepare(pp) => {
                if pp.body.requests.is_empty() || pp.body.view > MAX_TERM {
                    return Err(malformed(from, "empty pre-prepare or view beyond MAX_TERM"));
                }
                range(pp.body.first, pp.body.last())?;
            }
            MessageKind::Prepare(v) | MessageKind::Commit(v) => {
                if v.body.view > MAX_TERM {
                    return Err(malformed(from, "view beyond MAX_TERM"));
                }
                range(v.body.first, v.body.last)?;
            }
            MessageKind::Checkpoint(v) => range(v.body.n.max(1), v.body.n.max(1))?,
            MessageKind::ViewChange(vc) => {
                if vc.body.view > MAX_TERM || vc.body.view == 0 {
                    return Err(malformed(from, "view change to view 0 or beyond MAX_TERM"));
                }
            }
            MessageKind::NewView(nv) => {
                if nv.body.view > MAX_TERM || nv.body.view == 0 {
                    return Err(malformed(from, "new view 0 or beyond MAX_TERM"));
                }
            }
            MessageKind::Fetch { next, .. } => range(*next, *next)?,
            MessageKind::Committed(c) => {
                if c.pre_prepare.body.requests.is_empty() {
                    return Err(malformed(from, "empty committed batch"));
                }
                range(c.pre_prepare.body.first, c.pre_prepare.body.last())?;
            }
            MessageKind::Snapshot { meta, .. } => range(meta.index, meta.index)?,
            MessageKind::Stable(p) => range(p.n.max(1), p.n.max(1))?,
            MessageKind::Reply(r) => {
                if r.reply.body.view > MAX_TERM {
                    return Err(malformed(from, "view beyond MAX_TERM"));
                }
                range(r.reply.body.first, r.reply.body.last)?;
            }
            MessageKind::ReplyAsk { n, .. } => range(*n, *n)?,
            MessageKind::Alive(a) => {
                if a.body.view > MAX_TERM || a.body.executed > MAX_INDEX {
                    return Err(malformed(from, "alive beyond MAX_TERM or MAX_INDEX"));
                }
            }
            MessageKind::Request(_) | MessageKind::NotMember { .. } => {}
        }
        Ok(())
    }

    /// A sign of life: the sender is reachable (and, from the primary of
    /// this replica's view, that primary is alive); a later view makes this
    /// replica ask for it as a later pre-prepare or vote would.
    fn on_alive(&mut self, from: NodeId, a: Signed<Alive>) {
        if a.signer != from || !a.verify(self.crypto()) {
            self.stats.bad_signature += 1;
            return;
        }
        self.hear(from, a.body.executed);
        self.hear_in_view(from, a.body.view);
        if a.body.view > self.view {
            self.later_view = self.later_view.max(a.body.view);
            self.claim_later_view(from, a.body.view);
        }
    }

    fn on_pre_prepare(&mut self, from: NodeId, pp: Signed<PrePrepare>) {
        let b = &pp.body;
        if pp.signer != from || from != self.primary_of(b.view) {
            self.stats.bad_signature += 1;
            return;
        }
        if b.view != self.view || !self.active {
            self.stats.wrong_view += 1;
            if b.view > self.view && pp.verify(self.crypto()) {
                self.later_view = self.later_view.max(b.view);
                self.claim_later_view(from, b.view);
            }
            return;
        }
        let h = self.stable.n;
        if b.first <= h || b.last() > h + self.cfg.window {
            if b.last() > h && pp.verify(self.crypto()) {
                // The group is ahead: ask for what this replica misses.
                self.high_seen = self.high_seen.max(b.first.saturating_sub(1));
                self.above_window |= b.last() > h + self.cfg.window;
            }
            self.stats.outside_watermarks += 1;
            return;
        }
        if !pp.verify(self.crypto()) {
            self.stats.bad_signature += 1;
            return;
        }
        self.hear(from, 0);
        self.hear_in_view(from, b.view);
        if !self.verify_pre_prepare(&pp) {
            self.stats.invalid += 1;
            return;
        }
        self.accept_pre_prepare(pp);
    }

    fn on_vote(&mut self, from: NodeId, v: Signed<Vote>, phase: Phase) {
        if v.signer != from || !v.verify(self.crypto()) {
            self.stats.bad_signature += 1;
            return;
        }
        let upto = if v.body.phase == Phase::Commit {
            v.body.last
        } else {
            0
        };
        self.hear(from, upto);
        self.hear_in_view(from, v.body.view);
        let b = &v.body;
        if b.phase != phase || (phase == Phase::Prepare && from == self.primary_of(b.view)) {
            self.stats.invalid += 1;
            return;
        }
        if b.view != self.view || !self.active {
            self.stats.wrong_view += 1;
            // Signed by a member in a later view: this replica missed a
            // NEW-VIEW (it asks for it).
            self.later_view = self.later_view.max(b.view);
            self.claim_later_view(from, b.view);
            return;
        }
        let h = self.stable.n;
        if b.last <= h || b.last > h + self.cfg.window || b.last - b.first >= self.cfg.window {
            self.stats.outside_watermarks += 1;
            if b.last > h {
                self.high_seen = self.high_seen.max(b.first.saturating_sub(1));
                self.above_window |= b.last > h + self.cfg.window;
            }
            return;
        }
        if phase == Phase::Commit {
            self.high_seen = self.high_seen.max(b.last);
        }
        let key = (b.first, b.view, b.digest);
        if self.record_vote(v) {
            self.check_batch(key);
        }
    }

    /// Nothing to do: the protocol retransmits.
    pub fn report_snapshot(&mut self, _id: NodeId, _success: bool) {}

    // ---- ready ---------------------------------------------------------

    fn soft_state(&self) -> SoftState {
        SoftState {
            leader: self.leader(),
            role: self.role(),
        }
    }

    fn record_last(&self) -> Index {
        let mut last = self.batches.values().map(|b| b.last).max().unwrap_or(0);
        if self.snapshot.index > 0 {
            last = last.max(self.snapshot.index + 1);
        }
        if self.stable.n > 0 {
            last = last.max(self.stable.n + 1);
        }
        last
    }

    /// The durable record at `p`: the batches starting there (and, at the
    /// positions just above the snapshot and the stable checkpoint, those
    /// straddling them, with the checkpoint's state and proof).
    fn record_at(&self, p: Index) -> Entry {
        let snap_pos = self.snapshot.index > 0 && p == self.snapshot.index + 1;
        let stable_pos = self.stable.n > 0 && p == self.stable.n + 1;
        let base = if stable_pos {
            Some((self.stable_state.as_ref(), &self.stable))
        } else if snap_pos {
            Some((Some(&self.snap_state), &self.snap_proof))
        } else {
            None
        };
        let covering: Vec<&Batch> = self.covering(p).collect();
        let term = covering.iter().map(|b| b.pp.body.view).max().unwrap_or(0);
        let here: Vec<&Batch> = covering
            .into_iter()
            .filter(|b| b.pp.body.first == p || snap_pos || stable_pos)
            .collect();
        let payload = if base.is_none() && here.is_empty() {
            EntryPayload::Empty
        } else {
            EntryPayload::Normal(Bytes::from(encode_record(base, &here)))
        };
        Entry {
            index: p,
            term,
            payload,
        }
    }

    /// Whether [`Pbft::ready`] has anything.
    pub fn has_ready(&self) -> bool {
        !self.msgs.is_empty()
            || !self.persisted_msgs.is_empty()
            || self.unstable_from.is_some()
            || self.hard_state() != self.prev_hs
            || self.pending_snapshot.is_some()
            || !self.out_entries.is_empty()
            || !self.read_states.is_empty()
            || self.soft_state() != self.prev_soft
            || self.has_flush()
    }

    /// Takes the work accumulated since the last call.
    pub fn ready(&mut self) -> Ready<Message> {
        self.flush();
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
        if let Some(meta) = &rd.snapshot {
            // Installing it discards the stored log: the records after it
            // are written again.
            self.written_last = meta.index;
            if self.record_last() > meta.index {
                self.mark_unstable(meta.index + 1);
            }
        }
        if let Some(from) = self.unstable_from.take() {
            // A record can change ahead of the stored log (a pre-prepare
            // for a later sequence number arriving first): the positions in
            // between are written too, empty or not, so the log stays
            // contiguous.
            let from = from.min(self.written_last + 1).max(self.snapshot.index + 1);
            let last = self.record_last();
            rd.entries = (from..=last).map(|p| self.record_at(p)).collect();
            if last >= from {
                self.written_last = last;
            }
            let s = self.stable.n;
            if self.stable_state.is_some() && s > 0 && from <= s + 1 && s < last {
                self.base_inflight = Some(s);
            }
        }
        rd.messages = std::mem::take(&mut self.msgs);
        rd.persisted_messages = std::mem::take(&mut self.persisted_msgs);
        rd.committed_entries = std::mem::take(&mut self.out_entries);
        rd.read_states = std::mem::take(&mut self.read_states);
        rd
    }

    /// Acknowledges that the last [`Ready`] was handled.
    pub fn advance(&mut self) {
        self.applied = self.applied.max(self.exec.n);
        if let Some(s) = self.base_inflight.take() {
            self.base_durable = self.base_durable.max(s);
        }
    }
}

fn payload_of(req: Option<&Signed<Request>>, ran: bool) -> EntryPayload {
    match req {
        Some(r) if ran && !r.body.read => EntryPayload::Normal(r.body.data.clone()),
        _ => EntryPayload::Empty,
    }
}

/// A sequence number for which the VIEW-CHANGEs carry prepared
/// certificates of one view for different batches, if any. Two valid ones
/// need two quorums of PREPAREs from backups that share a correct replica
/// accepting both — or a correct primary signing both — so with at most f
/// Byzantine replicas there is none; a set that has one is refused.
pub fn conflicting_certificates(vcs: &[Signed<ViewChange>]) -> Option<Index> {
    let mut seen: BTreeMap<(Index, View), (Index, Digest)> = BTreeMap::new();
    for vc in vcs {
        let h = vc.body.checkpoint.n;
        for c in &vc.body.prepared {
            let pp = &c.pre_prepare.body;
            for n in pp.first.max(h + 1)..=pp.last() {
                let id = (pp.first, pp.digest);
                if *seen.entry((n, pp.view)).or_insert(id) != id {
                    return Some(n);
                }
            }
        }
    }
    None
}

/// The new view a set of VIEW-CHANGEs determines: min-s, the highest stable
/// checkpoint among them (with its proof), and for every sequence number in
/// `(min-s, max-s]` (max-s the highest prepared) the request prepared in
/// the highest view, else a null request — one batch from min-s + 1. Two
/// certificates of one view for different batches at one sequence number
/// need more than f Byzantine replicas: callers refuse such a set first
/// ([`conflicting_certificates`]); here the lowest digest would win.
pub fn compute_new_view(vcs: &[Signed<ViewChange>]) -> (CheckpointProof, Reissue) {
    let ckpt = vcs
        .iter()
        .map(|vc| &vc.body.checkpoint)
        .max_by(|a, b| a.n.cmp(&b.n).then(b.digest.cmp(&a.digest)))
        .cloned()
        .unwrap_or_else(genesis_proof);
    let min_s = ckpt.n;
    let mut best: BTreeMap<Index, (View, Digest, Option<Signed<Request>>)> = BTreeMap::new();
    for vc in vcs {
        for c in &vc.body.prepared {
            let pp = &c.pre_prepare.body;
            for n in pp.first.max(min_s + 1)..=pp.last() {
                let r = pp.requests[(n - pp.first) as usize].clone();
                let better = best
                    .get(&n)
                    .is_none_or(|(v, d, _)| pp.view > *v || (pp.view == *v && pp.digest < *d));
                if better {
                    best.insert(n, (pp.view, pp.digest, r));
                }
            }
        }
    }
    let Some((&max_s, _)) = best.last_key_value() else {
        return (ckpt, None);
    };
    let requests = (min_s + 1..=max_s)
        .map(|n| best.get(&n).and_then(|(_, _, r)| r.clone()))
        .collect();
    (ckpt, Some((min_s + 1, requests)))
}
