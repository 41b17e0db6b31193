//! Commit certificates: proof, checkable with the group's public keys
//! alone, that the group — not just the replica a client talked to —
//! executed a request at a sequence number.
//!
//! A replica that executes a request (not a null request, not a read)
//! signs a REPLY `{view, n, client, ts, request digest, history}` and sends
//! it to the request's client; the client replica holds a certificate once
//! f+1 distinct members sent replies matching its own execution in `n`,
//! the request digest and `history` (the hash chain value `h_n`). With at
//! most f Byzantine members, one of the signers is correct: the request
//! really executed at `n` after exactly the history `h_n` names.
//!
//! # Format (version 1)
//!
//! A JSON object; integers are JSON numbers (u64), digests and signatures
//! lowercase hex:
//!
//! ```json
//! {
//!   "version": 1,
//!   "index": 42,                  // the sequence number (log index)
//!   "client": 1,                  // the replica the request was proposed at
//!   "ts": 7,                      // the client's timestamp of the request
//!   "request": "<64 hex>",        // the request digest
//!   "history": "<64 hex>",        // h_n after executing it
//!   "data_len": 18,               // length of the request's data
//!   "data": "<base64>",           // the data (standard base64), only when
//!                                 // at most MAX_INLINE_DATA bytes
//!   "signatures": [ { "node": 2, "view": 0, "sig": "<128 hex>" }, ... ]
//! }
//! ```
//!
//! Each signature is `node`'s Ed25519 signature over the canonical REPLY
//! bytes the engine signs: `0x07 ‖ node ‖ view ‖ index ‖ client ‖ ts ‖
//! request ‖ history` (integers as 8 bytes big-endian, digests as their 32
//! bytes). The view is per signature: replicas may execute the same request
//! at the same sequence number in batches of different views.
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
//! (n-1)/3): every signature must be a member's and valid, at least f+1
//! distinct members must have signed (a member listed twice counts once),
//! and the data, when present, must hash to the request digest.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::crypto::{Crypto, Digest, sha256};
use super::message::{Reply, Request, Signed, signed_message_bytes};
use crate::types::{Index, NodeId};

/// The format version this module writes and reads.
pub const VERSION: u32 = 1;

/// Data up to this many bytes is carried in the certificate; larger data
/// only by its length (the request digest still covers it). Keeps the
/// `Entente-Certificate` header of a 4- or 7-member group under 2.5 KiB.
pub const MAX_INLINE_DATA: usize = 768;

/// Most signatures a certificate may list (more is not a certificate a
/// replica writes: it lists f+1).
pub const MAX_SIGNATURES: usize = 256;

/// Most bytes of a certificate document [`verify`] reads.
pub const MAX_DOCUMENT: usize = 64 * 1024;

/// The HTTP header a certificate travels in.
pub const HEADER: &str = "Entente-Certificate";

/// One member's signature in a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// The signing member.
    pub node: NodeId,
    /// The view of its reply.
    pub view: u64,
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
    /// states.
    BadSignature(NodeId),
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

/// Builds the certificate document of the replies (the engine's side).
pub(crate) fn build(req: &Signed<Request>, replies: &[&Signed<Reply>]) -> Vec<u8> {
    let first = &replies[0].body;
    let data = &req.body.data;
    let doc = CommitCertificate {
        version: VERSION,
        index: first.n,
        client: first.client,
        ts: first.ts,
        request: hex(&first.request),
        history: hex(&first.history),
        data_len: data.len() as u64,
        data: (data.len() <= MAX_INLINE_DATA).then(|| STANDARD.encode(data)),
        signatures: replies
            .iter()
            .map(|r| SignatureEntry {
                node: r.signer,
                view: r.body.view,
                sig: hex(&r.sig),
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
    let mut signers = BTreeSet::new();
    for s in &doc.signatures {
        if !members.contains(&s.node) {
            return Err(CertificateError::UnknownMember(s.node));
        }
        let sig = unhex_vec(&s.sig, "a signature")?;
        let msg = signed_message_bytes(
            s.node,
            &Reply {
                view: s.view,
                n: doc.index,
                client: doc.client,
                ts: doc.ts,
                request,
                history,
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
