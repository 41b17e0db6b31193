//! Configuration of one core.

use crate::types::NodeId;

/// How ReadIndex requests are confirmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadOnlyOption {
    /// Confirm leadership with a round of heartbeats to a quorum (§6.4). Safe
    /// whatever the clocks do.
    #[default]
    Safe,
    /// Serve from the leader's lease without a round trip (§6.4.1). Only
    /// allowed with check-quorum, and only correct if clock drift between
    /// members is bounded.
    LeaseBased,
}

/// Settings of one core. Times are counted in ticks of the driver's clock.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id; never 0.
    pub id: NodeId,
    /// Ticks without hearing from a leader before a follower campaigns. The
    /// actual timeout is drawn at random from `[election_tick, 2 * election_tick)`.
    pub election_tick: u32,
    /// Ticks between the leader's heartbeats; must be below `election_tick`.
    pub heartbeat_tick: u32,
    /// Upper bound on the bytes of entries in one append message (at least one
    /// entry is always sent).
    pub max_size_per_msg: u64,
    /// How many append messages may be in flight to one follower in the
    /// replicate state before the leader waits for acknowledgements.
    pub max_inflight_msgs: usize,
    /// Upper bound on the bytes of proposed but uncommitted entries at the
    /// leader; proposals beyond it are refused. `0` means no limit.
    pub max_uncommitted_size: u64,
    /// The leader steps down if it has not heard from a quorum within an
    /// election timeout, and followers ignore vote requests while they have a
    /// live leader (§6.2, §9.6).
    pub check_quorum: bool,
    /// Campaign with a pre-vote round first, so a partitioned node rejoining
    /// does not disrupt the group (§9.6).
    pub pre_vote: bool,
    /// How ReadIndex requests are confirmed.
    pub read_only: ReadOnlyOption,
    /// If set, followers refuse proposals instead of forwarding them.
    pub disable_proposal_forwarding: bool,
    /// How many entries a learner may trail the leader's commit index and
    /// still be promoted by a guarded membership change.
    pub promote_max_lag: u64,
    /// Seed of the random source for election timeouts.
    pub seed: u64,
}

impl Config {
    /// Defaults suitable for a driver ticking every 10–50 ms.
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            election_tick: 10,
            heartbeat_tick: 1,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            max_uncommitted_size: 0,
            check_quorum: true,
            pre_vote: true,
            read_only: ReadOnlyOption::Safe,
            disable_proposal_forwarding: false,
            promote_max_lag: 1000,
            seed: id,
        }
    }

    /// Checks the settings are coherent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::ZeroId);
        }
        if self.heartbeat_tick == 0 {
            return Err(ConfigError::ZeroHeartbeat);
        }
        if self.election_tick <= self.heartbeat_tick {
            return Err(ConfigError::ElectionNotAboveHeartbeat);
        }
        if self.max_inflight_msgs == 0 {
            return Err(ConfigError::ZeroInflight);
        }
        if self.read_only == ReadOnlyOption::LeaseBased && !self.check_quorum {
            return Err(ConfigError::LeaseWithoutCheckQuorum);
        }
        Ok(())
    }
}

/// Why a [`Config`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// Node id 0 is reserved.
    ZeroId,
    /// `heartbeat_tick` must be at least 1.
    ZeroHeartbeat,
    /// `election_tick` must exceed `heartbeat_tick`.
    ElectionNotAboveHeartbeat,
    /// `max_inflight_msgs` must be at least 1.
    ZeroInflight,
    /// Lease-based reads are only safe with check-quorum on.
    LeaseWithoutCheckQuorum,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConfigError::ZeroId => "node id 0 is reserved",
            ConfigError::ZeroHeartbeat => "heartbeat_tick must be at least 1",
            ConfigError::ElectionNotAboveHeartbeat => "election_tick must exceed heartbeat_tick",
            ConfigError::ZeroInflight => "max_inflight_msgs must be at least 1",
            ConfigError::LeaseWithoutCheckQuorum => {
                "lease-based reads need check_quorum; enable it or use safe reads"
            }
        })
    }
}

impl std::error::Error for ConfigError {}
