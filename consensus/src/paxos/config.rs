//! Configuration of one Paxos node.

use crate::types::NodeId;

/// The largest node id a Paxos group may use: ballots keep the proposer's id
/// in their low 16 bits.
pub const MAX_NODE_ID: NodeId = 0xFFFF;

/// Which Paxos the engine runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Multi-Paxos: a distinguished proposer (the leader) runs phase 1 once
    /// per ballot for every slot from the first unchosen one, then phase 2
    /// per slot, batched and pipelined.
    #[default]
    Multi,
    /// Basic Paxos: every value runs both phases for its own slot at the node
    /// it was proposed at; there is no leader.
    Basic,
}

/// Settings of one Paxos node. Times are counted in ticks of the driver's
/// clock; the names shared with [`crate::raft::Config`] mean the same.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id, in `1..=65535` ([`MAX_NODE_ID`]).
    pub id: NodeId,
    /// Multi-Paxos or basic Paxos.
    pub mode: Mode,
    /// Ticks without hearing from a leader before a node takes over (multi),
    /// and the longest a proposer waits for one instance before it retries
    /// with a new ballot (basic). The actual timeout is drawn at random from
    /// `[election_tick, 2 * election_tick)`.
    pub election_tick: u32,
    /// Ticks between the leader's heartbeats (multi) and between a node's
    /// announcements of its chosen prefix (basic); below `election_tick`.
    pub heartbeat_tick: u32,
    /// Upper bound on the bytes of entries in one accept or learn message (at
    /// least one entry is always sent).
    pub max_size_per_msg: u64,
    /// How many accept batches the leader keeps in flight before proposals
    /// wait for the next batch.
    pub max_inflight_msgs: usize,
    /// How far above its chosen prefix a node takes slots: an acceptor
    /// ignores accepts and learned values beyond it, a leader refuses
    /// proposals beyond it ([`crate::ready::ProposeError::TooMuchUncommitted`])
    /// and a candidate that hears of accepted values beyond it gives up its
    /// takeover (it is too far behind to lead). Bounds the placeholders a
    /// message can make a node store.
    pub max_slot_gap: u64,
    /// If set, followers refuse proposals and reads instead of forwarding them.
    pub disable_proposal_forwarding: bool,
    /// Seed of the random source for takeover timeouts and back-offs.
    pub seed: u64,
}

impl Config {
    /// Multi-Paxos with defaults suitable for a driver ticking every 10–50 ms.
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            mode: Mode::Multi,
            election_tick: 10,
            heartbeat_tick: 1,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            max_slot_gap: 100_000,
            disable_proposal_forwarding: false,
            seed: id,
        }
    }

    /// Basic Paxos with the defaults of [`Config::new`].
    pub fn basic(id: NodeId) -> Self {
        Config {
            mode: Mode::Basic,
            ..Config::new(id)
        }
    }

    /// Checks the settings are coherent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 || self.id > MAX_NODE_ID {
            return Err(ConfigError::BadId(self.id));
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
        if self.max_slot_gap == 0 {
            return Err(ConfigError::ZeroSlotGap);
        }
        Ok(())
    }
}

/// Why a [`Config`] or the initial state was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// Node ids must be in `1..=65535`: a ballot keeps its proposer's id in
    /// 16 bits.
    BadId(NodeId),
    /// `heartbeat_tick` must be at least 1.
    ZeroHeartbeat,
    /// `election_tick` must exceed `heartbeat_tick`.
    ElectionNotAboveHeartbeat,
    /// `max_inflight_msgs` must be at least 1.
    ZeroInflight,
    /// `max_slot_gap` must be at least 1.
    ZeroSlotGap,
    /// The membership is fixed at start: it must list this node as a voter.
    NotVoter(NodeId),
    /// Paxos groups have voters only.
    Learners,
    /// The stored promise is beyond [`crate::types::MAX_TERM`].
    PromiseTooHigh,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::BadId(id) => write!(
                f,
                "node id {id} is invalid for Paxos: ids must be in 1..={MAX_NODE_ID} (a ballot keeps its proposer's id in 16 bits)"
            ),
            ConfigError::ZeroHeartbeat => f.write_str("heartbeat_tick must be at least 1"),
            ConfigError::ElectionNotAboveHeartbeat => {
                f.write_str("election_tick must exceed heartbeat_tick")
            }
            ConfigError::ZeroInflight => f.write_str("max_inflight_msgs must be at least 1"),
            ConfigError::ZeroSlotGap => f.write_str("max_slot_gap must be at least 1"),
            ConfigError::NotVoter(id) => write!(
                f,
                "the membership must list node {id} (and every member) as a voter with an id in 1..={MAX_NODE_ID}: Paxos membership is fixed at start"
            ),
            ConfigError::Learners => f.write_str("Paxos groups have no learners"),
            ConfigError::PromiseTooHigh => f.write_str("the stored promise is beyond MAX_TERM"),
        }
    }
}

impl std::error::Error for ConfigError {}
