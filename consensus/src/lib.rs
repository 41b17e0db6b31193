//! Entente's consensus engines, kept apart from every kind of I/O.
//!
//! This crate depends on no runtime, clock, file or socket, so the compiler
//! keeps the engines sans-IO: time arrives as ticks, messages and requests as
//! calls, and everything an engine wants done comes out of
//! [`Engine::ready`](engine::Engine::ready) for its driver (the `coordinator`
//! crate's node driver, or the in-memory harness of the tests) to do.
//!
//! * [`engine`] — the contract every engine implements;
//! * [`raft`] — Raft, the default engine;
//! * [`paxos`] — Multi-Paxos and basic Paxos;
//! * [`pbft`] — PBFT, tolerating f Byzantine members among 3f+1 (not yet
//!   run by the gateway);
//! * [`types`] and [`ready`] — the vocabulary the engines share with their
//!   drivers: log entries, hard state, snapshot metadata, membership, and the
//!   batch of work an engine hands out.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod engine;
pub mod paxos;
pub mod pbft;
pub mod raft;
pub mod ready;
pub mod types;

#[cfg(feature = "harness")]
#[doc(hidden)]
pub mod memory;
