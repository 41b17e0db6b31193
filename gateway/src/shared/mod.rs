//! What the REST API (`api/`) and the device endpoint (`mqtt/`) both need,
//! below both of them: neither imports the other, and neither uses the
//! crate root's helpers.
//!
//! - ids ([`id_ok`]), secrets ([`hash_secret`], [`random_token`]) and the
//!   proposer's clock ([`now_ms`]);
//! - [`propose`]: the one way an operation enters the log, and its two
//!   retry policies — [`propose_placed`] for requests whose caller waits for
//!   the answer (REST), [`propose_retrying`] for idempotent operations that
//!   must not be dropped (the gateway's own for its sessions: presence,
//!   `sent`; the leader's declarations); what devices send is proposed by
//!   the endpoint's ingest, which answers each message once committed;
//! - [`MqttStats`]: the device endpoint's counters, which it counts and
//!   `/metrics` and the health checks read.

mod propose;
mod stats;

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

pub use propose::{
    Ended, PROPOSAL_ATTEMPTS, leader_known, propose, propose_as, propose_certified, propose_placed,
    propose_retrying,
};
pub use stats::MqttStats;

/// Longest id (devices, commands).
pub const MAX_ID: usize = 64;

/// Whether `s` is a valid device or command id: `[A-Za-z0-9_.-]{1,64}`,
/// except `.` and `..` (path segments every HTTP client resolves away, so
/// such a device could never be addressed). Ids are also MQTT client ids and
/// topic levels: the alphabet has none of `/`, `+`, `#`, `:`.
pub fn id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Milliseconds since the Unix epoch (the proposer's stamp).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Hex SHA-256 of a secret or token (both are high-entropy random strings).
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random 32-byte token, hex-encoded; an error only if the operating
/// system's random source cannot be read.
pub fn random_token() -> std::io::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
