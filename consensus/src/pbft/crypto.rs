//! Signatures and digests of the PBFT engine.
//!
//! Every protocol message is signed by its sender over a canonical byte
//! encoding (the `message` module): fixed field order, big-endian integers,
//! length-prefixed byte strings, a tag per message type. The recipient is not
//! part of what is signed, so one signed message can be broadcast and later
//! embedded as proof (in VIEW-CHANGE, NEW-VIEW and catch-up messages).
//!
//! [`Crypto`] is what the engine needs: sign as itself, verify any member.
//! [`Ed25519`] is the implementation for real use. A cheap deterministic
//! scheme for simulations (`SimCrypto`) exists behind the `harness`
//! feature.

use std::collections::BTreeMap;
use std::fmt;

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
        let Ok(sig) = Signature::from_slice(sig) else {
            return false;
        };
        vk.verify(msg, &sig).is_ok()
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
