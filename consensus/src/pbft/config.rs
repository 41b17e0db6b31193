//! Configuration of one PBFT replica.

use std::fmt;
use std::sync::Arc;

use super::crypto::Crypto;
use crate::types::NodeId;

/// Settings of one PBFT replica. Times are counted in ticks of the driver's
/// clock.
#[derive(Clone)]
pub struct Config {
    /// This replica's id.
    pub id: NodeId,
    /// Signs as this replica and verifies the members' signatures.
    pub crypto: Arc<dyn Crypto>,
    /// A checkpoint every this many sequence numbers (default 128).
    pub checkpoint_interval: u64,
    /// The watermark window L: a replica accepts pre-prepares for sequence
    /// numbers in `(h, h + L]` where `h` is its stable checkpoint (default
    /// 2 × `checkpoint_interval`). At least `checkpoint_interval`.
    pub window: u64,
    /// Ticks a backup waits for a request it knows of to execute before it
    /// starts a view change; also the first view change's timeout, doubled
    /// for each successive one without a new view, how long a backup waits
    /// for any signed message of its view from the primary before it starts
    /// one, and how recently a member must have been heard to count as
    /// active in the status (default 20).
    pub request_timeout: u32,
    /// Ticks between retransmissions of the messages of unfinished work
    /// (own requests, pre-prepares, votes, checkpoints, view changes),
    /// between catch-up requests of a replica that is behind, and between
    /// the signs of life (ALIVE) of an active replica with nothing else to
    /// send (default 2).
    pub resend_tick: u32,
    /// Most requests in one pre-prepare of the normal case (default 64).
    pub max_batch: usize,
    /// Most requests a replica keeps waiting to execute (default 4096); a
    /// proposal beyond it is refused
    /// ([`crate::ready::ProposeError::TooMuchUncommitted`]), others' are
    /// dropped until the client retransmits.
    pub max_pending: usize,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("id", &self.id)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("window", &self.window)
            .field("request_timeout", &self.request_timeout)
            .field("resend_tick", &self.resend_tick)
            .field("max_batch", &self.max_batch)
            .field("max_pending", &self.max_pending)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Defaults suitable for a driver ticking every 10–50 ms.
    pub fn new(id: NodeId, crypto: Arc<dyn Crypto>) -> Self {
        Config {
            id,
            crypto,
            checkpoint_interval: 128,
            window: 256,
            request_timeout: 20,
            resend_tick: 2,
            max_batch: 64,
            max_pending: 4096,
        }
    }

    /// Checks the settings are coherent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::BadId);
        }
        if self.checkpoint_interval == 0 || self.window < self.checkpoint_interval {
            return Err(ConfigError::BadWindow);
        }
        if self.request_timeout < 2 || self.resend_tick == 0 {
            return Err(ConfigError::BadTimers);
        }
        if self.max_batch == 0 || self.max_pending == 0 {
            return Err(ConfigError::ZeroLimit);
        }
        Ok(())
    }
}

/// Why a [`Config`] or the initial state was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// Node id 0 is reserved.
    BadId,
    /// `checkpoint_interval` must be at least 1 and `window` at least it.
    BadWindow,
    /// `request_timeout` must be at least 2 and `resend_tick` at least 1.
    BadTimers,
    /// `max_batch` and `max_pending` must be at least 1.
    ZeroLimit,
    /// The membership is fixed at start: it must list this node as a voter.
    NotVoter(u64),
    /// PBFT groups have voters only.
    Learners,
    /// A stored record at this index does not decode.
    CorruptRecord(u64),
    /// The stored snapshot's checkpoint state is missing from the records.
    MissingCheckpoint(u64),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::BadId => f.write_str("node id 0 is reserved"),
            ConfigError::BadWindow => f.write_str(
                "checkpoint_interval must be at least 1 and the watermark window at least the checkpoint interval",
            ),
            ConfigError::BadTimers => {
                f.write_str("request_timeout must be at least 2 and resend_tick at least 1")
            }
            ConfigError::ZeroLimit => f.write_str("max_batch and max_pending must be at least 1"),
            ConfigError::NotVoter(id) => write!(
                f,
                "the membership must list node {id} as a voter: PBFT membership is fixed at start"
            ),
            ConfigError::Learners => f.write_str("PBFT groups have no learners"),
            ConfigError::CorruptRecord(i) => {
                write!(f, "the stored PBFT record at index {i} does not decode")
            }
            ConfigError::MissingCheckpoint(i) => write!(
                f,
                "the stored records lack the checkpoint state of the snapshot at {i}"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}
