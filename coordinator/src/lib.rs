//! Entente's consensus library.
//!
//! [`raft`] is a sans-IO Raft core: it decides, and the embedding driver
//! persists, sends and applies what it decides. [`memory`] is an in-memory
//! driver for tests, simulations and benchmarks.
#![deny(missing_docs)]

pub mod image;
pub mod memory;
pub mod node;
pub mod raft;
pub mod storage;
pub mod transport;
