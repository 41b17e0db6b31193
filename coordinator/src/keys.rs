//! The signing keys of a PBFT group: each member's Ed25519 key pair in its
//! data directory, and the members' public keys in the group's
//! configuration.
//!
//! The key file ([`KEY_FILE`]) holds one line, `ed25519:` and the 32-byte
//! seed in standard base64. It is created on first use (mode 0600, written
//! to a temporary file, synced and renamed into place, the directory
//! synced); a file that exists but does not read or decode is an error
//! naming it, never replaced. A public key is written `ed25519:` and 32
//! bytes of standard base64 (the prefix may be left out where a key is
//! read); a group's keys are `id=key` pairs, comma-separated.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use consensus::pbft::crypto::{Crypto, Ed25519};
use consensus::types::NodeId;

/// The key pair's file name in a data directory.
pub const KEY_FILE: &str = "node-key.ed25519";

/// The prefix of a key in text.
const PREFIX: &str = "ed25519:";

/// One member's Ed25519 key pair.
#[derive(Clone)]
pub struct NodeKey {
    seed: [u8; 32],
    public: [u8; 32],
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &encode_public(&self.public))
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    /// The key pair of this seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        NodeKey { seed, public }
    }

    /// A new key pair from the operating system's random source.
    pub fn generate() -> Result<Self, String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("no random source for a key: {e}"))?;
        Ok(NodeKey::from_seed(seed))
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The public key as text (`ed25519:<base64>`), as `--group-keys` takes it.
    pub fn public_text(&self) -> String {
        encode_public(&self.public)
    }

    /// Signs as member `id` and verifies the members of `group` (every
    /// member's public key, this one's included).
    pub fn crypto(
        &self,
        id: NodeId,
        group: &BTreeMap<NodeId, [u8; 32]>,
    ) -> Result<Arc<dyn Crypto>, String> {
        let c = Ed25519::new(id, &self.seed, group).map_err(|e| e.to_string())?;
        Ok(Arc::new(c))
    }
}

/// `ed25519:` and the key in standard base64.
pub fn encode_public(key: &[u8; 32]) -> String {
    format!("{PREFIX}{}", STANDARD.encode(key))
}

/// A public key as [`encode_public`] writes it (the prefix optional).
pub fn decode_public(text: &str) -> Result<[u8; 32], String> {
    let b64 = text.trim();
    let b64 = b64.strip_prefix(PREFIX).unwrap_or(b64);
    let bytes = STANDARD
        .decode(b64)
        .map_err(|e| format!("{text:?} is not base64: {e}"))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{text:?} is {} bytes, not a 32-byte key", b.len()))?;
    ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| format!("{text:?} is not a valid Ed25519 public key"))?;
    Ok(key)
}

/// Parses `id=key,id=key,...` (whitespace around each part ignored).
pub fn parse_group_keys(text: &str) -> Result<BTreeMap<NodeId, [u8; 32]>, String> {
    let mut keys = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, key) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not id=key"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| format!("{:?} is not a node id (1, 2, ...)", id.trim()))?;
        let key = decode_public(key).map_err(|e| format!("the key of node {id}: {e}"))?;
        if keys.insert(id, key).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    Ok(keys)
}

/// Checks a group's keys against its members and this node's own key:
/// every member has one, no one else does, and this node's is its own.
pub fn check_group_keys(
    keys: &BTreeMap<NodeId, [u8; 32]>,
    members: impl IntoIterator<Item = NodeId>,
    id: NodeId,
    own: &NodeKey,
) -> Result<(), String> {
    let members: Vec<NodeId> = members.into_iter().collect();
    if let Some(m) = members.iter().find(|m| !keys.contains_key(m)) {
        return Err(format!("the group's public keys have none for member {m}"));
    }
    if let Some(k) = keys.keys().find(|k| !members.contains(k)) {
        return Err(format!(
            "the group's public keys list node {k}, which is not a member"
        ));
    }
    if keys.get(&id) != Some(&own.public) {
        return Err(format!(
            "the group's public key of this node ({id}) is not the key in its data directory \
             ({}; that key is {})",
            KEY_FILE,
            own.public_text()
        ));
    }
    Ok(())
}

/// The key file in `dir`.
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join(KEY_FILE)
}

/// Reads the key pair in `dir`, or `None` if there is no key file.
pub fn load(dir: &Path) -> Result<Option<NodeKey>, String> {
    let path = key_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading the key file {}: {e}", path.display())),
    };
    let seed = text
        .trim()
        .strip_prefix(PREFIX)
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            format!(
                "the key file {} is corrupt: expected one line, {PREFIX} and a 32-byte seed in \
                 base64 (it is not replaced: restore it, or remove it to make this node a new \
                 key the group must then be given)",
                path.display()
            )
        })?;
    Ok(Some(NodeKey::from_seed(seed)))
}

/// Reads the key pair in `dir`, creating it (and `dir`) if there is none.
/// Returns it and whether it was created now.
pub fn load_or_create(dir: &Path) -> Result<(NodeKey, bool), String> {
    if let Some(k) = load(dir)? {
        return Ok((k, false));
    }
    let key = NodeKey::generate()?;
    let path = key_path(dir);
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", path.display());
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| fail("creating the directory of", e))?;
    let tmp = dir.join(format!("{KEY_FILE}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let write = || -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        writeln!(f, "{PREFIX}{}", STANDARD.encode(key.seed))?;
        f.sync_all()?;
        // `create_new` semantics: a key file another process created
        // meanwhile is not overwritten.
        std::fs::hard_link(&tmp, &path)?;
        std::fs::remove_file(&tmp)?;
        std::fs::File::open(dir)?.sync_all()
    };
    match write() {
        Ok(()) => Ok((key, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&tmp);
            let k = load(dir)?.ok_or_else(|| format!("{} vanished", path.display()))?;
            Ok((k, false))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(fail("writing the key file", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_private_and_read_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().join("data");
        let (k, created) = load_or_create(&d).expect("create");
        assert!(created);
        let (again, created) = load_or_create(&d).expect("load");
        assert!(!created);
        assert_eq!(k.public(), again.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(&d))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!d.join(format!("{KEY_FILE}.tmp")).exists());
        assert_eq!(decode_public(&k.public_text()).expect("decode"), k.public());
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_naming_it_and_is_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(key_path(dir.path()), "ed25519:not-base64\n").expect("write");
        let e = load_or_create(dir.path()).expect_err("corrupt");
        assert!(e.contains(KEY_FILE) && e.contains("corrupt"), "{e}");
        let kept = std::fs::read_to_string(key_path(dir.path())).expect("read");
        assert_eq!(kept, "ed25519:not-base64\n");
    }

    #[test]
    fn group_keys_are_checked_against_members_and_own_key() {
        let a = NodeKey::from_seed([1; 32]);
        let b = NodeKey::from_seed([2; 32]);
        let text = format!("1={}, 2={}", a.public_text(), b.public_text());
        let keys = parse_group_keys(&text).expect("parse");
        assert!(check_group_keys(&keys, [1, 2], 1, &a).is_ok());
        let e = check_group_keys(&keys, [1, 2, 3], 1, &a).expect_err("missing");
        assert!(e.contains("member 3"), "{e}");
        let e = check_group_keys(&keys, [1], 1, &a).expect_err("non-member");
        assert!(e.contains("node 2") && e.contains("not a member"), "{e}");
        let e = check_group_keys(&keys, [1, 2], 1, &b).expect_err("own");
        assert!(e.contains("not the key in its data directory"), "{e}");
        for bad in ["1", "x=ed25519:AAAA", "1=ed25519:AAAA", "0=abc", "1=%%%"] {
            assert!(parse_group_keys(bad).is_err(), "{bad}");
        }
        let dup = format!("1={},1={}", a.public_text(), a.public_text());
        assert!(parse_group_keys(&dup).expect_err("dup").contains("twice"));
        // Signatures made with the key verify under the group's keys.
        let ca = a.crypto(1, &keys).expect("crypto");
        let cb = b.crypto(2, &keys).expect("crypto");
        assert!(cb.verify(1, b"m", &ca.sign(b"m")));
        assert!(!cb.verify(2, b"m", &ca.sign(b"m")));
    }
}
