//! Entente's consensus library.
//!
//! The engines themselves live in the `consensus` crate, which depends on no
//! runtime, clock, file or socket; they decide, and this crate persists,
//! sends and applies what they decide: [`storage`] (the durable log, hard
//! state and snapshots), [`transport`] (the peer connections) and [`node`]
//! (the driver that runs an engine on them). [`engine`], [`raft`] and [`paxos`] are
//! re-exported from `consensus`.
#![deny(missing_docs)]

pub mod image;
pub mod keys;
pub mod node;
pub mod storage;
pub mod transport;

pub use consensus::{engine, paxos, pbft, raft, ready, types};
