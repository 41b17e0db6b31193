//! PBFT (Castro & Liskov) behind the engine contract.
//!
//! (Module documentation: see below; written out in full with the tests.)

mod config;
mod core;
pub mod crypto;
mod engine;
mod message;

pub use config::{Config, ConfigError};
pub use core::{CLIENT_WINDOW, Pbft, PbftStats, Reissue, compute_new_view};
pub use message::{
    CheckpointProof, CheckpointState, CheckpointVote, CommitCert, Message, MessageKind, NewView,
    Phase, PrePrepare, PreparedCert, Request, Signed, View, ViewChange, Vote, batch_digest,
};
