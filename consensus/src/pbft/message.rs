//! Messages of the PBFT engine and their canonical byte encoding.
//!
//! What a message proves is a [`Signed`] body: the signer, the body and the
//! signature over the canonical bytes `tag ‖ signer ‖ body` (big-endian
//! integers, byte strings and lists prefixed with their length as a `u64`,
//! digests as their 32 bytes, a tag byte per body type). The envelope
//! ([`Message`]: sender, recipient, the sender's view) is not signed; serde
//! carries it over the wire.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::crypto::{Crypto, Digest, sha256};
use crate::types::{Index, NodeId, SnapshotMeta};

/// A PBFT view: the shared `term` of the engine contract.
pub type View = u64;

/// The canonical encoder.
#[derive(Default)]
pub(crate) struct Enc(pub(crate) Vec<u8>);

impl Enc {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    pub(crate) fn digest(&mut self, d: &Digest) {
        self.0.extend_from_slice(d);
    }
    pub(crate) fn list<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Enc, &T)) {
        self.u64(items.len() as u64);
        for i in items {
            each(self, i);
        }
    }
}

/// The canonical decoder (for the engine's own durable records).
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Dec { buf }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    pub(crate) fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
    pub(crate) fn digest(&mut self) -> Option<Digest> {
        self.take(32).map(|b| b.try_into().expect("32 bytes"))
    }
    pub(crate) fn list<T>(
        &mut self,
        mut each: impl FnMut(&mut Self) -> Option<T>,
    ) -> Option<Vec<T>> {
        let n = usize::try_from(self.u64()?).ok()?;
        // Every item takes at least one byte: a length beyond the rest is a lie.
        if n > self.buf.len() {
            return None;
        }
        (0..n).map(|_| each(self)).collect()
    }
}

/// A body that can be signed: its tag and canonical bytes.
pub(crate) trait Body: Sized {
    /// Distinguishes the body types in what is signed.
    const TAG: u8;
    /// The bytes the signature covers (after the tag and the signer).
    fn signed_bytes(&self, e: &mut Enc);
}

/// A body, its signer and the signer's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    /// Who signed it.
    pub signer: NodeId,
    /// What is signed.
    pub body: T,
    /// The signature over the canonical bytes.
    pub sig: Bytes,
}

#[allow(private_bounds)]
impl<T: Body> Signed<T> {
    fn message_bytes(signer: NodeId, body: &T) -> Vec<u8> {
        let mut e = Enc::default();
        e.u8(T::TAG);
        e.u64(signer);
        body.signed_bytes(&mut e);
        e.0
    }

    /// Signs `body` as `signer` (the replica `crypto` signs for).
    pub fn sign(crypto: &dyn Crypto, signer: NodeId, body: T) -> Self {
        let sig = crypto.sign(&Self::message_bytes(signer, &body));
        Signed {
            signer,
            body,
            sig: Bytes::from(sig),
        }
    }

    /// Whether the signature is the signer's.
    pub fn verify(&self, crypto: &dyn Crypto) -> bool {
        crypto.verify(
            self.signer,
            &Self::message_bytes(self.signer, &self.body),
            &self.sig,
        )
    }
}

/// A client request: `client` is the replica it was proposed at, `ts` that
/// replica's increasing counter. A read carries no data and executes as a
/// null request whose sequence number is the read point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The replica the request was proposed at (and that signs it).
    pub client: NodeId,
    /// Its per-client timestamp.
    pub ts: u64,
    /// Whether it is a read (ordered for its sequence number only).
    pub read: bool,
    /// The application's bytes.
    pub data: Bytes,
}

impl Body for Request {
    const TAG: u8 = 1;
    fn signed_bytes(&self, e: &mut Enc) {
        e.u64(self.client);
        e.u64(self.ts);
        e.u8(self.read as u8);
        e.bytes(&self.data);
    }
}

impl Signed<Request> {
    /// The digest of the request (its signed bytes, not the signature):
    /// what the checkpoint hash chain and the batch digest take.
    pub fn digest(&self) -> Digest {
        sha256(&Self::message_bytes(self.signer, &self.body))
    }
}

/// The digest of a batch: SHA-256 over `first`, the count, and for each
/// sequence number `0` (null request) or `1` and the request's digest.
pub fn batch_digest(first: Index, requests: &[Option<Signed<Request>>]) -> Digest {
    let mut e = Enc::default();
    e.0.extend_from_slice(b"pbft-batch");
    e.u64(first);
    e.list(requests, |e, r| match r {
        None => e.u8(0),
        Some(r) => {
            e.u8(1);
            e.digest(&r.digest());
        }
    });
    sha256(&e.0)
}

/// The primary's assignment of sequence numbers `first..=last` to requests
/// in `view` (`None`: a null request). The signature covers `view`,
/// `first`, `last` and `digest`; a recipient recomputes the digest from the
/// requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrePrepare {
    /// The view.
    pub view: View,
    /// The first sequence number.
    pub first: Index,
    /// One request per sequence number from `first`.
    pub requests: Vec<Option<Signed<Request>>>,
    /// [`batch_digest`] of `first` and the requests.
    pub digest: Digest,
}

impl PrePrepare {
    /// The last sequence number (`first` for an empty batch, which no
    /// correct primary sends).
    pub fn last(&self) -> Index {
        self.first
            .saturating_add((self.requests.len() as u64).saturating_sub(1))
    }
}

impl Body for PrePrepare {
    const TAG: u8 = 2;
    fn signed_bytes(&self, e: &mut Enc) {
        e.u64(self.view);
        e.u64(self.first);
        e.u64(self.last());
        e.digest(&self.digest);
    }
}

/// Which phase a [`Vote`] is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    /// PREPARE: the backup accepted the pre-prepare.
    Prepare,
    /// COMMIT: the replica has the batch prepared.
    Commit,
}

/// A PREPARE or COMMIT naming a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// Its phase.
    pub phase: Phase,
    /// The batch's view.
    pub view: View,
    /// Its first sequence number.
    pub first: Index,
    /// Its last sequence number.
    pub last: Index,
    /// Its digest.
    pub digest: Digest,
}

impl Body for Vote {
    const TAG: u8 = 3;
    fn signed_bytes(&self, e: &mut Enc) {
        e.u8(match self.phase {
            Phase::Prepare => 0,
            Phase::Commit => 1,
        });
        e.u64(self.view);
        e.u64(self.first);
        e.u64(self.last);
        e.digest(&self.digest);
    }
}

/// CHECKPOINT: the replica's state after executing `n` has this digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointVote {
    /// The sequence number.
    pub n: Index,
    /// [`CheckpointState::digest`] at `n`.
    pub digest: Digest,
}

impl Body for CheckpointVote {
    const TAG: u8 = 4;
    fn signed_bytes(&self, e: &mut Enc) {
        e.u64(self.n);
        e.digest(&self.digest);
    }
}

/// ALIVE: a sign of life from an active replica that sent no PRE-PREPARE,
/// PREPARE or COMMIT since its last resend round. It keeps a live but idle
/// primary from being replaced and tells every member who is reachable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alive {
    /// The view the sender is active in.
    pub view: View,
    /// The last sequence number it executed.
    pub executed: Index,
}

impl Body for Alive {
    const TAG: u8 = 8;
    fn signed_bytes(&self, e: &mut Enc) {
        e.u64(self.view);
        e.u64(self.executed);
    }
}

/// A stable checkpoint and its proof: matching CHECKPOINTs from a quorum
/// (none for the initial checkpoint at 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointProof {
    /// The sequence number.
    pub n: Index,
    /// The state digest.
    pub digest: Digest,
    /// The signed CHECKPOINTs.
    pub votes: Vec<Signed<CheckpointVote>>,
}

/// A batch prepared in its view: the signed pre-prepare and PREPAREs from
/// 2f distinct backups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedCert {
    /// The pre-prepare, with its requests.
    pub pre_prepare: Signed<PrePrepare>,
    /// The PREPAREs.
    pub prepares: Vec<Signed<Vote>>,
}

/// A committed batch: the signed pre-prepare and COMMITs from a quorum.
/// Self-certifying, so any replica can hand it to one that lacks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitCert {
    /// The pre-prepare, with its requests.
    pub pre_prepare: Signed<PrePrepare>,
    /// The COMMITs.
    pub commits: Vec<Signed<Vote>>,
}

/// VIEW-CHANGE to `view`: the sender's stable checkpoint with its proof and
/// every batch it has prepared above it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// The view the sender moves to.
    pub view: View,
    /// Its stable checkpoint.
    pub checkpoint: CheckpointProof,
    /// Its prepared certificates above the checkpoint.
    pub prepared: Vec<PreparedCert>,
}

pub(crate) fn put_request(e: &mut Enc, r: &Signed<Request>) {
    e.u64(r.signer);
    r.body.signed_bytes(e);
    e.bytes(&r.sig);
}

pub(crate) fn put_pre_prepare(e: &mut Enc, p: &Signed<PrePrepare>) {
    e.u64(p.signer);
    e.u64(p.body.view);
    e.u64(p.body.first);
    e.digest(&p.body.digest);
    e.list(&p.body.requests, |e, r| match r {
        None => e.u8(0),
        Some(r) => {
            e.u8(1);
            put_request(e, r);
        }
    });
    e.bytes(&p.sig);
}

pub(crate) fn put_vote(e: &mut Enc, v: &Signed<Vote>) {
    e.u64(v.signer);
    v.body.signed_bytes(e);
    e.bytes(&v.sig);
}

pub(crate) fn put_checkpoint_vote(e: &mut Enc, v: &Signed<CheckpointVote>) {
    e.u64(v.signer);
    v.body.signed_bytes(e);
    e.bytes(&v.sig);
}

pub(crate) fn get_request(d: &mut Dec<'_>) -> Option<Signed<Request>> {
    let signer = d.u64()?;
    let client = d.u64()?;
    let ts = d.u64()?;
    let read = d.u8()? != 0;
    let data = Bytes::copy_from_slice(d.bytes()?);
    let sig = Bytes::copy_from_slice(d.bytes()?);
    Some(Signed {
        signer,
        body: Request {
            client,
            ts,
            read,
            data,
        },
        sig,
    })
}

pub(crate) fn get_pre_prepare(d: &mut Dec<'_>) -> Option<Signed<PrePrepare>> {
    let signer = d.u64()?;
    let view = d.u64()?;
    let first = d.u64()?;
    let digest = d.digest()?;
    let requests = d.list(|d| match d.u8()? {
        0 => Some(None),
        _ => get_request(d).map(Some),
    })?;
    let sig = Bytes::copy_from_slice(d.bytes()?);
    Some(Signed {
        signer,
        body: PrePrepare {
            view,
            first,
            requests,
            digest,
        },
        sig,
    })
}

pub(crate) fn get_vote(d: &mut Dec<'_>) -> Option<Signed<Vote>> {
    let signer = d.u64()?;
    let phase = match d.u8()? {
        0 => Phase::Prepare,
        1 => Phase::Commit,
        _ => return None,
    };
    let view = d.u64()?;
    let first = d.u64()?;
    let last = d.u64()?;
    let digest = d.digest()?;
    let sig = Bytes::copy_from_slice(d.bytes()?);
    Some(Signed {
        signer,
        body: Vote {
            phase,
            view,
            first,
            last,
            digest,
        },
        sig,
    })
}

pub(crate) fn get_checkpoint_vote(d: &mut Dec<'_>) -> Option<Signed<CheckpointVote>> {
    let signer = d.u64()?;
    let n = d.u64()?;
    let digest = d.digest()?;
    let sig = Bytes::copy_from_slice(d.bytes()?);
    Some(Signed {
        signer,
        body: CheckpointVote { n, digest },
        sig,
    })
}

fn put_proof(e: &mut Enc, p: &CheckpointProof) {
    e.u64(p.n);
    e.digest(&p.digest);
    e.list(&p.votes, put_checkpoint_vote);
}

pub(crate) fn put_checkpoint_proof(e: &mut Enc, p: &CheckpointProof) {
    put_proof(e, p)
}

pub(crate) fn get_checkpoint_proof(d: &mut Dec<'_>) -> Option<CheckpointProof> {
    let n = d.u64()?;
    let digest = d.digest()?;
    let votes = d.list(get_checkpoint_vote)?;
    Some(CheckpointProof { n, digest, votes })
}

impl Body for ViewChange {
    const TAG: u8 = 5;
    fn signed_bytes(&self, e: &mut Enc) {
        e.u64(self.view);
        put_proof(e, &self.checkpoint);
        e.list(&self.prepared, |e, c| {
            put_pre_prepare(e, &c.pre_prepare);
            e.list(&c.prepares, put_vote);
        });
    }
}

/// NEW-VIEW: the new primary's proof that a quorum moved to `view`, and the
/// pre-prepare it re-issues for the sequence numbers prepared above the
/// highest stable checkpoint among them (a deterministic function of the
/// VIEW-CHANGEs that every replica recomputes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    /// The new view.
    pub view: View,
    /// A quorum of VIEW-CHANGEs to `view`, the primary's own included.
    pub view_changes: Vec<Signed<ViewChange>>,
    /// The re-issued batch, if anything was prepared above the checkpoint.
    pub pre_prepare: Option<Signed<PrePrepare>>,
}

impl Body for NewView {
    const TAG: u8 = 6;
    fn signed_bytes(&self, e: &mut Enc) {
        e.u64(self.view);
        e.list(&self.view_changes, |e, vc| {
            e.u64(vc.signer);
            vc.body.signed_bytes(e);
            e.bytes(&vc.sig);
        });
        match &self.pre_prepare {
            None => e.u8(0),
            Some(p) => {
                e.u8(1);
                put_pre_prepare(e, p);
            }
        }
    }
}

/// What a replica executed has led to at a checkpoint: the hash chain over
/// the executed history and the at-most-once table, which a replica that
/// installs a snapshot takes over. Its [`CheckpointState::digest`] is what
/// CHECKPOINT messages vote on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The sequence number.
    pub n: Index,
    /// `h_n = SHA-256(h_{n-1} ‖ n ‖ request digest)` (zeros for a null
    /// request; `h_0` is zeros).
    pub chain: Digest,
    /// Per client: the highest executed timestamp and the executed ones in
    /// the window below it, ascending, each with the first 8 bytes of the
    /// digest of the request that executed under it (so a client restarted
    /// before it saw its request execute can tell whether that timestamp
    /// was its new request's).
    pub clients: Vec<ClientRecord>,
}

/// One client's entry of the at-most-once table: its id, its highest
/// executed timestamp, and `(timestamp, digest prefix)` for the executed
/// ones in the window below it.
pub type ClientRecord = (NodeId, u64, Vec<(u64, u64)>);

impl CheckpointState {
    pub(crate) fn put(&self, e: &mut Enc) {
        e.u64(self.n);
        e.digest(&self.chain);
        e.list(&self.clients, |e, (c, max, recent)| {
            e.u64(*c);
            e.u64(*max);
            e.list(recent, |e, (t, tag)| {
                e.u64(*t);
                e.u64(*tag);
            });
        });
    }

    pub(crate) fn get(d: &mut Dec<'_>) -> Option<Self> {
        let n = d.u64()?;
        let chain = d.digest()?;
        let clients =
            d.list(|d| Some((d.u64()?, d.u64()?, d.list(|d| Some((d.u64()?, d.u64()?)))?)))?;
        Some(CheckpointState { n, chain, clients })
    }

    /// SHA-256 over the canonical bytes.
    pub fn digest(&self) -> Digest {
        let mut e = Enc::default();
        e.0.extend_from_slice(b"pbft-checkpoint");
        self.put(&mut e);
        sha256(&e.0)
    }
}

/// Most leaves one REPLY covers (a replica that executed more requests of
/// one client in one step signs several).
pub const MAX_REPLY_LEAVES: usize = 64;

/// REPLY: in `view` a replica executed, in one step, `count` requests of
/// `client` at sequence numbers within `first..=last`; `root` is the
/// Merkle root over their [`ReplyLeaf`]s (see the `certificate` module).
/// One signature covers all of them. Sent to the client with the leaves
/// ([`Replies`]); f+1 signers whose leaves for one request match (same
/// `n`, request digest, `history`) are a commit certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The view of the batches the requests executed in.
    pub view: View,
    /// The requests' client.
    pub client: NodeId,
    /// The lowest sequence number a leaf may name.
    pub first: Index,
    /// The highest sequence number a leaf may name.
    pub last: Index,
    /// The Merkle root over the leaves.
    pub root: Digest,
    /// How many leaves the tree has.
    pub count: u64,
}

impl Body for Reply {
    const TAG: u8 = 7;
    fn signed_bytes(&self, e: &mut Enc) {
        e.u64(self.view);
        e.u64(self.client);
        e.u64(self.first);
        e.u64(self.last);
        e.digest(&self.root);
        e.u64(self.count);
    }
}

/// One executed request under a REPLY's Merkle root: the client's request
/// `request` (timestamp `ts`) executed at `n`, after which the hash chain
/// stood at `history` (`h_n`, see [`CheckpointState::chain`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyLeaf {
    /// The sequence number it executed at.
    pub n: Index,
    /// The request's timestamp.
    pub ts: u64,
    /// The request's digest ([`Signed::<Request>::digest`]).
    pub request: Digest,
    /// The hash chain after executing it: `h_n`.
    pub history: Digest,
}

impl ReplyLeaf {
    /// The leaf's hash in the tree of `client`'s REPLY:
    /// `SHA-256(0x00 ‖ client ‖ n ‖ ts ‖ request ‖ history)`.
    pub fn hash(&self, client: NodeId) -> Digest {
        let mut e = Enc::default();
        e.u8(0);
        e.u64(client);
        e.u64(self.n);
        e.u64(self.ts);
        e.digest(&self.request);
        e.digest(&self.history);
        sha256(&e.0)
    }
}

/// A REPLY message: the signed body and the leaves, in increasing sequence
/// numbers, whose Merkle root it signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replies {
    /// The signed REPLY.
    pub reply: Signed<Reply>,
    /// The leaves (`reply.body.count` of them).
    pub leaves: Vec<ReplyLeaf>,
}

/// The bytes a member signs for `body` (tag, signer, canonical body): what
/// a certificate verifier checks signatures over.
#[allow(private_bounds)]
pub(crate) fn signed_message_bytes<T: Body>(signer: NodeId, body: &T) -> Vec<u8> {
    Signed::<T>::message_bytes(signer, body)
}

/// One message between replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender (the transport's word, not signed).
    pub from: NodeId,
    /// The recipient.
    pub to: NodeId,
    /// The sender's view, for logs.
    pub view: View,
    /// What it says.
    pub kind: MessageKind,
}

/// The body of a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    /// A client request, sent by its client to every replica.
    Request(Signed<Request>),
    /// PRE-PREPARE from the primary.
    PrePrepare(Signed<PrePrepare>),
    /// PREPARE from a backup.
    Prepare(Signed<Vote>),
    /// COMMIT.
    Commit(Signed<Vote>),
    /// CHECKPOINT.
    Checkpoint(Signed<CheckpointVote>),
    /// VIEW-CHANGE.
    ViewChange(Signed<ViewChange>),
    /// NEW-VIEW from the new primary (also resent to a replica that asks).
    NewView(Signed<NewView>),
    /// A replica asks for what it misses: committed batches from `next`,
    /// and the NEW-VIEW of the sender's view if it is not in one.
    Fetch {
        /// The first sequence number it has not executed.
        next: Index,
        /// Whether it has entered its view (seen its NEW-VIEW).
        active: bool,
        /// Its stable checkpoint.
        stable: Index,
    },
    /// The sender's stable checkpoint with its proof, for a replica whose
    /// own is older (self-certifying).
    Stable(CheckpointProof),
    /// A committed batch with its certificate, for a replica behind.
    Committed(CommitCert),
    /// Install the snapshot at a stable checkpoint (the driver ships the
    /// image): the checkpoint's state and its proof.
    Snapshot {
        /// What the snapshot covers.
        meta: SnapshotMeta,
        /// The engine's state at the checkpoint.
        state: CheckpointState,
        /// The quorum's CHECKPOINTs for it.
        proof: CheckpointProof,
    },
    /// REPLY to the requests' client, with its leaves.
    Reply(Replies),
    /// A client asks for the REPLY covering its request executed at `n`
    /// with timestamp `ts` (a reply was lost); answered from the bounded
    /// cache of recent executions.
    ReplyAsk {
        /// The sequence number the client executed it at.
        n: Index,
        /// The request's timestamp.
        ts: u64,
    },
    /// The sender's membership does not list the recipient (sent by drivers).
    NotMember {
        /// The sender's executed prefix.
        commit: Index,
    },
    /// ALIVE: a sign of life (see [`Alive`]).
    Alive(Signed<Alive>),
}

impl MessageKind {
    /// A short name of the kind, for logs and tests.
    pub fn name(&self) -> &'static str {
        match self {
            MessageKind::Request(_) => "Request",
            MessageKind::PrePrepare(_) => "PrePrepare",
            MessageKind::Prepare(_) => "Prepare",
            MessageKind::Commit(_) => "Commit",
            MessageKind::Checkpoint(_) => "Checkpoint",
            MessageKind::ViewChange(_) => "ViewChange",
            MessageKind::NewView(_) => "NewView",
            MessageKind::Fetch { .. } => "Fetch",
            MessageKind::Stable(_) => "Stable",
            MessageKind::Committed(_) => "Committed",
            MessageKind::Snapshot { .. } => "Snapshot",
            MessageKind::Reply(_) => "Reply",
            MessageKind::ReplyAsk { .. } => "ReplyAsk",
            MessageKind::NotMember { .. } => "NotMember",
            MessageKind::Alive(_) => "Alive",
        }
    }
}
