//! Commit certificates: proof, checkable with the group's public keys
//! alone, that the group — not just the replica a client talked to —
//! executed a request at a sequence number.
//!
//! A replica signs one REPLY per client per execution step: the Merkle
//! root over the leaves `(n, ts, request digest, history)` of that
//! client's requests it executed in the step (see [`ReplyLeaf`]). The
//! client replica holds a certificate once f+1 distinct members signed a
//! root whose leaf for its request matches its own execution in `n`, the
//! request digest and `history` (the hash chain value `h_n`). With at most
//! f Byzantine members, one of the signers is correct: the request really
//! executed at `n` after exactly the history `h_n` names.
//!
//! # Format (version 2)
//!
//! A JSON object; integers are JSON numbers (u64), digests and signatures
//! lowercase hex:
//!
//! ```json
//! {
//!   "version": 2,
//!   "index": 42,                  // the sequence number (log index)
//!   "client": 1,                  // the replica the request was proposed at
//!   "ts": 7,                      // the client's timestamp of the request
//!   "request": "<64 hex>",        // the request digest
//!   "history": "<64 hex>",        // h_n after executing it
//!   "data_len": 18,               // length of the request's data
//!   "data": "<base64>",           // the data (standard base64), only when
//!                                 // at most MAX_INLINE_DATA bytes
//!   "signatures": [ {
//!     "node": 2, "view": 0,       // the signer and its REPLY's view
//!     "first": 40, "last": 47,    // the sequence numbers its REPLY covers
//!     "count": 5,                 // the leaves under its root
//!     "position": 2,              // this request's leaf among them
//!     "path": ["<64 hex>", ...],  // the Merkle path from the leaf up
//!     "sig": "<128 hex>"
//!   }, ... ]
//! }
//! ```
//!
//! **The leaf** is `SHA-256(0x00 ‖ client ‖ index ‖ ts ‖ request ‖
//! history)` ([`leaf_hash`]). **The tree** over `count` leaves in
//! increasing sequence numbers: each level pairs neighbours from the left,
//! a node is `SHA-256(0x01 ‖ left ‖ right)`, and the last node of a level
//! with an odd number of nodes is carried up unchanged; the root is the
//! one node left (a single leaf is its own root). **The path** lists the
//! siblings from the leaf up, skipping the levels where the node was
//! carried up; [`merkle_walk`] recomputes the root from the leaf, its
//! position, the count and the path. Each signer has its own path: replicas
//! may group a request with different others (a replica that caught up
//! executes many batches in one step).
//!
//! Each signature is `node`'s Ed25519 signature over the canonical REPLY
//! bytes the engine signs: `0x07 ‖ node ‖ view ‖ client ‖ first ‖ last ‖
//! root ‖ count` (integers as 8 bytes big-endian, the root as its 32
//! bytes), the root being the one the entry's path leads to.
//!
//! The request digest is SHA-256 of the canonical signed request: `0x01 ‖
//! client ‖ client ‖ ts ‖ 0x00 ‖ len(data) ‖ data` (the signer is the
//! client, `0x00`: not a read, the length as 8 bytes big-endian); see
//! [`request_digest`]. The data of a large request is left out to keep the
//! HTTP header small; whoever has the body checks it with
//! [`Verified::matches_data`].
//!
//! Over HTTP the document travels base64url-encoded without padding in the
//! `Entente-Certificate` header ([`to_header`], [`from_header`]).
//!
//! # Verifying
//!
//! [`verify`] takes the document and the group's public keys (node id →
//! 32-byte Ed25519 key; the whole group, as n = group size fixes f =
//! (n-1)/3): every entry must be a member's, its `first..=last` must hold
//! `index`, its `position` lie below `count`, its path be at most
//! [`MAX_PATH`] hashes and exactly as long as the tree shape asks, and its
//! signature verify over the root the path leads to; at least f+1
//! distinct members must have signed (a member listed twice counts once),
//! and the data, when present, must hash to the request digest.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::crypto::{Crypto, Digest, sha256};
use super::message::{Reply, ReplyLeaf, Request, Signed, signed_message_bytes};
use crate::types::{Index, NodeId};

/// The format version this module writes and reads.
pub const VERSION: u32 = 2;

/// Data up to this many bytes is carried in the certificate; larger data
/// only by its length (the request digest still covers it). Keeps the
/// `Entente-Certificate` header of a 4- or 7-member group small (see
/// `docs/ARCHITECTURE.md` for measured sizes).
pub const MAX_INLINE_DATA: usize = 768;

/// Most signatures a certificate may list (more is not a certificate a
/// replica writes: it lists f+1).
pub const MAX_SIGNATURES: usize = 256;

/// Most bytes of a certificate document [`verify`] reads.
pub const MAX_DOCUMENT: usize = 64 * 1024;

/// Most hashes a Merkle path may hold (a tree of up to 2^16 leaves; a
/// replica signs at most `MAX_REPLY_LEAVES` = 64, a path of 6).
pub const MAX_PATH: usize = 16;

/// The HTTP header a certificate travels in.
pub const HEADER: &str = "Entente-Certificate";

/// One member's signature in a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// The signing member.
    pub node: NodeId,
    /// The view of its reply.
    pub view: u64,
    /// The lowest sequence number its reply covers.
    pub first: Index,
    /// The highest sequence number its reply covers.
    pub last: Index,
    /// The number of leaves under its reply's root.
    pub count: u64,
    /// The position of the request's leaf among them.
    pub position: u64,
    /// The Merkle path from the leaf to the root, hex hashes.
    pub path: Vec<String>,
    /// The Ed25519 signature, hex.
    pub sig: String,
}

/// A commit certificate document (the JSON object of the module
/// documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitCertificate {
    /// The format version ([`VERSION`]).
    pub version: u32,
    /// The sequence number (log index).
    pub index: Index,
    /// The request's client.
    pub client: NodeId,
    /// The request's timestamp.
    pub ts: u64,
    /// The request digest, hex.
    pub request: String,
    /// `h_n`, hex.
    pub history: String,
    /// The length of the request's data.
    pub data_len: u64,
    /// The data, standard base64, when at most [`MAX_INLINE_DATA`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// f+1 (or more) signatures.
    pub signatures: Vec<SignatureEntry>,
}

/// What a valid certificate proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The sequence number (log index) the request executed at.
    pub index: Index,
    /// The request's client.
    pub client: NodeId,
    /// Its timestamp.
    pub ts: u64,
    /// The request digest.
    pub request: Digest,
    /// The hash chain after it.
    pub history: Digest,
    /// The request's data, when the certificate carries it.
    pub data: Option<Vec<u8>>,
    /// The data's length.
    pub data_len: u64,
    /// The distinct members whose valid signatures it holds.
    pub signers: Vec<NodeId>,
    /// f for the group (f+1 signers were needed).
    pub faults: usize,
}

impl Verified {
    /// Whether `data` is the request's data (the request digest matches):
    /// for a certificate that left a large body out.
    pub fn matches_data(&self, data: &[u8]) -> bool {
        request_digest(self.client, self.ts, data) == self.request
    }
}

/// Why a certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateError {
    /// Not base64url, not JSON, or fields of the wrong shape.
    Malformed(String),
    /// A format version this verifier does not know.
    UnsupportedVersion(u32),
    /// The group given to verify against is empty.
    EmptyGroup,
    /// A public key of the group is not a valid Ed25519 key.
    BadPublicKey(NodeId),
    /// A signature names a node that is not a member of the group.
    UnknownMember(NodeId),
    /// A member's signature does not verify over the reply the certificate
    /// states (the root its path leads to).
    BadSignature(NodeId),
    /// A member's entry does not place the request in its reply: the index
    /// outside `first..=last`, the position not below the count, or a path
    /// too long or not as long as the tree shape asks.
    BadPath(NodeId),
    /// Fewer distinct members signed than f+1.
    TooFewSignatures {
        /// Distinct valid signers.
        have: usize,
        /// f+1 for the group.
        need: usize,
    },
    /// The data does not hash to the request digest (or not to its length).
    RequestDigestMismatch,
}

impl fmt::Display for CertificateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertificateError::Malformed(why) => write!(f, "malformed certificate: {why}"),
            CertificateError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "certificate version {v} is not supported (expected {VERSION})"
                )
            }
            CertificateError::EmptyGroup => f.write_str("the group has no public keys"),
            CertificateError::BadPublicKey(n) => {
                write!(f, "the public key of node {n} is not a valid Ed25519 key")
            }
            CertificateError::UnknownMember(n) => {
                write!(
                    f,
                    "node {n} signed the certificate but is not a member of the group"
                )
            }
            CertificateError::BadSignature(n) => {
                write!(f, "the signature of node {n} does not verify")
            }
            CertificateError::BadPath(n) => {
                write!(
                    f,
                    "the entry of node {n} does not place the request in its reply"
                )
            }
            CertificateError::TooFewSignatures { have, need } => write!(
                f,
                "{have} distinct members signed; the group needs {need} (f+1)"
            ),
            CertificateError::RequestDigestMismatch => {
                f.write_str("the data does not match the request digest")
            }
        }
    }
}

impl std::error::Error for CertificateError {}

/// The request digest of `client`'s request `ts` carrying `data` (not a
/// read), as the engine computes it.
pub fn request_digest(client: NodeId, ts: u64, data: &[u8]) -> Digest {
    sha256(&signed_message_bytes(
        client,
        &Request {
            client,
            ts,
            read: false,
            data: bytes::Bytes::copy_from_slice(data),
        },
    ))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex<const N: usize>(s: &str, what: &str) -> Result<[u8; N], CertificateError> {
    let bad = || CertificateError::Malformed(format!("{what} is not {N} bytes of hex"));
    if s.len() != 2 * N {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).ok_or_else(bad);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(out)
}

fn unhex_vec(s: &str, what: &str) -> Result<Vec<u8>, CertificateError> {
    let bad = || CertificateError::Malformed(format!("{what} is not hex"));
    if !s.len().is_multiple_of(2) || s.len() > 1024 {
        return Err(bad());
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16).ok_or_else(bad);
            Ok((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

/// The hash of the leaf of `client`'s request `ts` with digest `request`,
/// executed at `index` leaving the hash chain at `history`.
pub fn leaf_hash(
    client: NodeId,
    index: Index,
    ts: u64,
    request: &Digest,
    history: &Digest,
) -> Digest {
    ReplyLeaf {
        n: index,
        ts,
        request: *request,
        history: *history,
    }
    .hash(client)
}

fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut b = [0u8; 65];
    b[0] = 1;
    b[1..33].copy_from_slice(left);
    b[33..].copy_from_slice(right);
    sha256(&b)
}

/// The levels of the Merkle tree over `leaves` (see the [module
/// documentation](self)), the leaves first and the root last; empty for no
/// leaves.
pub fn merkle_levels(leaves: &[Digest]) -> Vec<Vec<Digest>> {
    if leaves.is_empty() {
        return Vec::new();
    }
    let mut levels = vec![leaves.to_vec()];
    while let Some(level) = levels.last().filter(|l| l.len() > 1) {
        let up = level
            .chunks(2)
            .map(|c| match c {
                [l, r] => node_hash(l, r),
                [one] => *one,
                _ => unreachable!("chunks of two"),
            })
            .collect();
        levels.push(up);
    }
    levels
}

/// The root of the Merkle tree over `leaves` (`None` for no leaves).
pub fn merkle_root(leaves: &[Digest]) -> Option<Digest> {
    merkle_levels(leaves).last().map(|l| l[0])
}

/// The Merkle path of leaf `position` in the tree of `levels`
/// ([`merkle_levels`]).
pub fn merkle_path(levels: &[Vec<Digest>], position: usize) -> Vec<Digest> {
    let mut path = Vec::new();
    let mut idx = position;
    for level in levels.iter().take(levels.len().saturating_sub(1)) {
        if let Some(sibling) = level.get(idx ^ 1) {
            path.push(*sibling);
        }
        idx /= 2;
    }
    path
}

/// The root that `leaf` at `position` of `count` leaves leads to along
/// `path`; `None` when the position is not below the count or the path is
/// longer than [`MAX_PATH`] or not as long as the tree shape asks.
pub fn merkle_walk(leaf: Digest, position: u64, count: u64, path: &[Digest]) -> Option<Digest> {
    if position >= count || path.len() > MAX_PATH {
        return None;
    }
    let (mut h, mut idx, mut width, mut used) = (leaf, position, count, 0);
    while width > 1 {
        if (idx ^ 1) < width {
            let sibling = path.get(used)?;
            used += 1;
            h = if idx.is_multiple_of(2) {
                node_hash(&h, sibling)
            } else {
                node_hash(sibling, &h)
            };
        }
        idx /= 2;
        width = width.div_ceil(2);
    }
    (used == path.len()).then_some(h)
}

/// One signer's part of a certificate: its signed REPLY, the position of
/// the request's leaf under its root and the leaf's Merkle path.
pub(crate) struct Member<'a> {
    pub(crate) reply: &'a Signed<Reply>,
    pub(crate) position: u64,
    pub(crate) path: &'a [Digest],
}

/// Builds the certificate document of the request `req` executed as `leaf`
/// from the signers' replies (the engine's side).
pub(crate) fn build(req: &Signed<Request>, leaf: &ReplyLeaf, members: &[Member<'_>]) -> Vec<u8> {
    let data = &req.body.data;
    let doc = CommitCertificate {
        version: VERSION,
        index: leaf.n,
        client: req.body.client,
        ts: leaf.ts,
        request: hex(&leaf.request),
        history: hex(&leaf.history),
        data_len: data.len() as u64,
        data: (data.len() <= MAX_INLINE_DATA).then(|| STANDARD.encode(data)),
        signatures: members
            .iter()
            .map(|m| SignatureEntry {
                node: m.reply.signer,
                view: m.reply.body.view,
                first: m.reply.body.first,
                last: m.reply.body.last,
                count: m.reply.body.count,
                position: m.position,
                path: m.path.iter().map(|h| hex(h)).collect(),
                sig: hex(&m.reply.sig),
            })
            .collect(),
    };
    serde_json::to_vec(&doc).expect("a certificate serializes")
}

/// The `Entente-Certificate` header value of a certificate document.
pub fn to_header(document: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(document)
}

/// The certificate document in an `Entente-Certificate` header value.
pub fn from_header(value: &str) -> Result<Vec<u8>, CertificateError> {
    if value.len() > MAX_DOCUMENT * 4 / 3 + 4 {
        return Err(CertificateError::Malformed("header too long".into()));
    }
    URL_SAFE_NO_PAD
        .decode(value.trim().trim_end_matches('='))
        .map_err(|e| CertificateError::Malformed(format!("not base64url: {e}")))
}

/// Checks a certificate document against the group's public keys (every
/// member, node id → 32-byte Ed25519 public key): see the [module
/// documentation](self).
pub fn verify(
    document: &[u8],
    group: &BTreeMap<NodeId, [u8; 32]>,
) -> Result<Verified, CertificateError> {
    if document.len() > MAX_DOCUMENT {
        return Err(CertificateError::Malformed("document too long".into()));
    }
    let doc: CommitCertificate = serde_json::from_slice(document)
        .map_err(|e| CertificateError::Malformed(format!("not a certificate document: {e}")))?;
    verify_document(&doc, group)
}

/// [`verify`] for a parsed document.
pub fn verify_document(
    doc: &CommitCertificate,
    group: &BTreeMap<NodeId, [u8; 32]>,
) -> Result<Verified, CertificateError> {
    if group.is_empty() {
        return Err(CertificateError::EmptyGroup);
    }
    let mut keys = BTreeMap::new();
    for (&id, bytes) in group {
        let vk = VerifyingKey::from_bytes(bytes).map_err(|_| CertificateError::BadPublicKey(id))?;
        keys.insert(id, vk);
    }
    let members: Vec<NodeId> = keys.keys().copied().collect();
    check(doc, &members, |node, msg, sig| {
        keys.get(&node).is_some_and(|vk| {
            Signature::from_slice(sig).is_ok_and(|sig| vk.verify(msg, &sig).is_ok())
        })
    })
}

/// [`verify`] with the signatures checked by a [`Crypto`] (any scheme the
/// engine runs with) for the group `members`.
pub fn verify_with(
    document: &[u8],
    members: &[NodeId],
    crypto: &dyn Crypto,
) -> Result<Verified, CertificateError> {
    if document.len() > MAX_DOCUMENT {
        return Err(CertificateError::Malformed("document too long".into()));
    }
    let doc: CommitCertificate = serde_json::from_slice(document)
        .map_err(|e| CertificateError::Malformed(format!("not a certificate document: {e}")))?;
    if members.is_empty() {
        return Err(CertificateError::EmptyGroup);
    }
    check(&doc, members, |node, msg, sig| {
        crypto.verify(node, msg, sig)
    })
}

fn check(
    doc: &CommitCertificate,
    members: &[NodeId],
    sig_ok: impl Fn(NodeId, &[u8], &[u8]) -> bool,
) -> Result<Verified, CertificateError> {
    if doc.version != VERSION {
        return Err(CertificateError::UnsupportedVersion(doc.version));
    }
    let members: BTreeSet<NodeId> = members.iter().copied().collect();
    let faults = (members.len() - 1) / 3;
    let request: Digest = unhex(&doc.request, "request")?;
    let history: Digest = unhex(&doc.history, "history")?;
    if doc.signatures.len() > MAX_SIGNATURES {
        return Err(CertificateError::Malformed("too many signatures".into()));
    }
    let data = match &doc.data {
        None => None,
        Some(b64) => {
            let data = STANDARD
                .decode(b64)
                .map_err(|e| CertificateError::Malformed(format!("data is not base64: {e}")))?;
            if data.len() as u64 != doc.data_len
                || request_digest(doc.client, doc.ts, &data) != request
            {
                return Err(CertificateError::RequestDigestMismatch);
            }
            Some(data)
        }
    };
    let leaf = leaf_hash(doc.client, doc.index, doc.ts, &request, &history);
    let mut signers = BTreeSet::new();
    for s in &doc.signatures {
        if !members.contains(&s.node) {
            return Err(CertificateError::UnknownMember(s.node));
        }
        if !(s.first..=s.last).contains(&doc.index)
            || s.position >= s.count
            || s.path.len() > MAX_PATH
        {
            return Err(CertificateError::BadPath(s.node));
        }
        let path = s
            .path
            .iter()
            .map(|h| unhex::<32>(h, "a path hash"))
            .collect::<Result<Vec<Digest>, _>>()?;
        let root = merkle_walk(leaf, s.position, s.count, &path)
            .ok_or(CertificateError::BadPath(s.node))?;
        let sig = unhex_vec(&s.sig, "a signature")?;
        let msg = signed_message_bytes(
            s.node,
            &Reply {
                view: s.view,
                client: doc.client,
                first: s.first,
                last: s.last,
                root,
                count: s.count,
            },
        );
        if !sig_ok(s.node, &msg, &sig) {
            return Err(CertificateError::BadSignature(s.node));
        }
        signers.insert(s.node);
    }
    if signers.len() < faults + 1 {
        return Err(CertificateError::TooFewSignatures {
            have: signers.len(),
            need: faults + 1,
        });
    }
    Ok(Verified {
        index: doc.index,
        client: doc.client,
        ts: doc.ts,
        request,
        history,
        data,
        data_len: doc.data_len,
        signers: signers.into_iter().collect(),
        faults,
    })
}
