//! The sans-IO Raft core.
//!
//! [`Raft`] implements leader election with pre-vote and check-quorum, log
//! replication with batching, pipelining and per-follower flow control, the
//! commit rule of §5.4.2, fast backtracking, proposal forwarding, ReadIndex
//! (and lease) reads, learners, single-server membership changes, leadership
//! transfer, and snapshots with log compaction. It does no I/O, reads no
//! clock and draws randomness only from the seed in its [`Config`].
//!
//! # Example: a group of one
//!
//! ```
//! use consensus::raft::{Config, InitialState, Raft, Role};
//!
//! let mut node = Raft::new(Config::new(1), InitialState::bootstrap([1])).unwrap();
//! node.campaign();
//! assert_eq!(node.role(), Role::Leader);
//! node.propose(b"hello".to_vec()).unwrap();
//! let mut applied = Vec::new();
//! while node.has_ready() {
//!     let rd = node.ready();
//!     // persist rd.entries and rd.hard_state here, send rd.messages ...
//!     applied.extend(rd.committed_entries.iter().filter_map(|e| e.data().map(<[u8]>::to_vec)));
//!     node.advance();
//! }
//! assert_eq!(applied, vec![b"hello".to_vec()]);
//! ```

mod config;
mod core;
mod engine;
mod log;
mod message;
mod progress;
mod read_only;
mod replication;
mod rng;
mod step;

pub use crate::ready::{
    CompactError, ProposeError, Proposed, ReadState, SoftState, StepError, TransferError,
    UnsafeConfChange,
};
pub use config::{Config, ConfigError, ReadOnlyOption};
pub use core::{Raft, Status};
pub use message::{Message, MessageKind};
pub use progress::{ProgressState, ProgressStatus};
/// What the Raft core hands to its driver: the engines' [`crate::ready::Ready`]
/// with Raft's messages.
pub type Ready = crate::ready::Ready<Message>;
pub use crate::types::{
    ConfChange, ConfState, Entry, EntryPayload, HardState, Index, InitialState, InvalidConfChange,
    MAX_INDEX, MAX_TERM, NodeId, Role, SnapshotMeta, Term,
};
pub use rng::SplitMix64;
