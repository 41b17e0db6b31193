//! Signatures and digests of the PBFT engine.
//!
//! Every protocol message is signed by its sender over a canonical byte
//! encoding (the `message` module): fixed field order, big-endian integers,
//! length-prefixed byte strings, a tag per message type. The recipient is not
//! part of what is signed, so one signed message can be broadcast and later
//! embedded as proof (in VIEW-CHANGE, NEW-VIEW and catch-up messages).
//!
//! [`Crypto`] is what the engine needs: sign as itself, verify any member.
//! [`Ed25519`] is the implementation for real use. It remembers the last
//! few thousand signatures it verified (by a SHA-256 of signer, signature
//! and message), so the same signed request or pre-prepare — received
//! directly, then inside a pre-prepare, a prepared certificate or a
//! NEW-VIEW — costs one Ed25519 verification per replica, not one per
//! appearance. Only successes are remembered: a signature that verified
//! for exactly these bytes verifies forever. A cheap deterministic
//! scheme for simulations (`SimCrypto`) exists behind the `harness`
//! feature.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Mutex;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::types::NodeId;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// Signs as this replica and verifies the signatures of the group's members.
pub trait Crypto: fmt::Debug + Send + Sync + 'static {
    /// The signature of this replica over `msg`.
    fn sign(&self, msg: &[u8]) -> Vec<u8>;
    /// Whether `sig` is `signer`'s signature over `msg`. Unknown signers
    /// never verify.
    fn verify(&self, signer: NodeId, msg: &[u8], sig: &[u8]) -> bool;
}

/// Why an [`Ed25519`] key set was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The verifying key of this member is not a valid Ed25519 point.
    BadPublicKey(NodeId),
    /// The group's keys do not list this replica's own key under its id.
    OwnKeyMissing(NodeId),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::BadPublicKey(id) => {
                write!(f, "the public key of node {id} is not a valid Ed25519 key")
            }
            KeyError::OwnKeyMissing(id) => write!(
                f,
                "the group's public keys must list this node ({id}) with the key of its seed"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// Ed25519 signatures: this replica's signing key and every member's
/// verifying key by node id.
pub struct Ed25519 {
    id: NodeId,
    key: SigningKey,
    group: BTreeMap<NodeId, VerifyingKey>,
    verified: Mutex<Verified>,
}

/// Signatures verified lately, in two generations of at most
/// [`VERIFIED_GENERATION`] each: when the newer one is full it becomes the
/// older and the older is forgotten.
#[derive(Default)]
struct Verified {
    new: HashSet<Digest>,
    old: HashSet<Digest>,
}

/// See [`Verified`] (small in unit tests, where signing is slow).
const VERIFIED_GENERATION: usize = if cfg!(test) { 64 } else { 8192 };

impl Verified {
    fn contains(&self, k: &Digest) -> bool {
        self.new.contains(k) || self.old.contains(k)
    }

    fn insert(&mut self, k: Digest) {
        if self.new.len() >= VERIFIED_GENERATION {
            self.old = std::mem::take(&mut self.new);
        }
        self.new.insert(k);
    }
}

impl fmt::Debug for Ed25519 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ed25519")
            .field("id", &self.id)
            .field("members", &self.group.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Ed25519 {
    /// The public key of the signing key made from `seed`.
    pub fn public_key(seed: &[u8; 32]) -> [u8; 32] {
        SigningKey::from_bytes(seed).verifying_key().to_bytes()
    }

    /// Replica `id` signing with the key of `seed`, verifying with `group`
    /// (every member's public key, its own included).
    pub fn new(
        id: NodeId,
        seed: &[u8; 32],
        group: &BTreeMap<NodeId, [u8; 32]>,
    ) -> Result<Self, KeyError> {
        let key = SigningKey::from_bytes(seed);
        let mut keys = BTreeMap::new();
        for (&member, bytes) in group {
            let vk = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::BadPublicKey(member))?;
            keys.insert(member, vk);
        }
        if keys.get(&id) != Some(&key.verifying_key()) {
            return Err(KeyError::OwnKeyMissing(id));
        }
        Ok(Ed25519 {
            id,
            key,
            group: keys,
            verified: Mutex::new(Verified::default()),
        })
    }
}

impl Crypto for Ed25519 {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.key.sign(msg).to_bytes().to_vec()
    }

    fn verify(&self, signer: NodeId, msg: &[u8], sig: &[u8]) -> bool {
        let Some(vk) = self.group.get(&signer) else {
            return false;
        };
        let mut h = Sha256::new();
        h.update(signer.to_be_bytes());
        h.update((sig.len() as u64).to_be_bytes());
        h.update(sig);
        h.update(msg);
        let k: Digest = h.finalize().into();
        let seen = |v: &Mutex<Verified>| v.lock().map(|v| v.contains(&k)).unwrap_or(false);
        if seen(&self.verified) {
            return true;
        }
        let Ok(parsed) = Signature::from_slice(sig) else {
            return false;
        };
        let ok = vk.verify(msg, &parsed).is_ok();
        if ok && let Ok(mut v) = self.verified.lock() {
            v.insert(k);
        }
        ok
    }
}

/// A cheap deterministic signature scheme for simulations: node `i`'s
/// signature over `m` is SHA-256 of a secret derived from the group seed and
/// `i`, then `m`. Only the instance made for `i` signs as `i`; verification
/// recomputes the tag. A simulation's adversary signs only through the
/// instances of the replicas it controls, so it cannot forge another
/// member's signature. Not for production: whoever verifies could sign.
#[cfg(feature = "harness")]
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct SimCrypto {
    id: NodeId,
    group_seed: u64,
}

#[cfg(feature = "harness")]
impl SimCrypto {
    /// The scheme for replica `id` of the group seeded with `group_seed`.
    pub fn new(id: NodeId, group_seed: u64) -> Self {
        SimCrypto { id, group_seed }
    }

    fn tag(&self, signer: NodeId, msg: &[u8]) -> Digest {
        let mut h = Sha256::new();
        h.update(b"entente-sim-signature");
        h.update(self.group_seed.to_be_bytes());
        h.update(signer.to_be_bytes());
        h.update(msg);
        h.finalize().into()
    }
}

#[cfg(feature = "harness")]
impl Crypto for SimCrypto {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.tag(self.id, msg).to_vec()
    }

    fn verify(&self, signer: NodeId, msg: &[u8], sig: &[u8]) -> bool {
        signer != 0 && sig == self.tag(signer, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Ed25519, Ed25519) {
        let group: BTreeMap<NodeId, [u8; 32]> = [
            (1, Ed25519::public_key(&[1; 32])),
            (2, Ed25519::public_key(&[2; 32])),
        ]
        .into();
        (
            Ed25519::new(1, &[1; 32], &group).expect("keys"),
            Ed25519::new(2, &[2; 32], &group).expect("keys"),
        )
    }

    #[test]
    fn a_remembered_signature_verifies_only_for_its_signer_and_bytes() {
        let (a, b) = pair();
        let sig = a.sign(b"pre-prepare");
        assert!(b.verify(1, b"pre-prepare", &sig));
        // Remembered now: the same triple verifies again ...
        assert!(b.verify(1, b"pre-prepare", &sig));
        // ... and nothing that differs in any part does.
        assert!(!b.verify(2, b"pre-prepare", &sig), "another signer");
        assert!(!b.verify(1, b"pre-prepare!", &sig), "other bytes");
        let mut bad = sig.clone();
        bad[0] ^= 1;
        assert!(!b.verify(1, b"pre-prepare", &bad), "another signature");
        assert!(
            !b.verify(1, b"pre-prepare", &sig[..63]),
            "a short signature"
        );
        // A failure is not remembered as a success either.
        assert!(!b.verify(1, b"pre-prepare", &bad));
    }

    #[test]
    fn the_memory_of_verified_signatures_is_bounded() {
        let (a, b) = pair();
        for i in 0..(2 * VERIFIED_GENERATION + 10) as u64 {
            let m = i.to_be_bytes();
            assert!(b.verify(1, &m, &a.sign(&m)));
        }
        let v = b.verified.lock().expect("lock");
        assert!(v.new.len() <= VERIFIED_GENERATION && v.old.len() <= VERIFIED_GENERATION);
        assert!(
            v.new.len() + v.old.len() > VERIFIED_GENERATION,
            "both generations hold some"
        );
    }
}
