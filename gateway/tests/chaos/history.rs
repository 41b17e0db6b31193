//! The record of every client operation: who invoked what on which object,
//! when, and how it ended — returned (with its result), failed for certain
//! (the request was never sent, or the gateway said the write was not
//! applied), or unknown (a timeout, a dropped connection, a gateway that said
//! the write may or may not have been applied).
//!
//! Invocations and returns are numbered from one counter, under one lock, in
//! the order they happen (an invocation is recorded before its request is
//! sent, a return after its answer arrived), which is the real-time order
//! the linearizability check needs.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use stateright::semantics::write_once_register::{WORegisterOp, WORegisterRet};
use tokio::time::Instant;

use super::model::{CmdOp, CmdRet, ShadowOp, ShadowRet};

/// A thread of the linearizability checker: a client process and a part (0
/// for ordinary operations; 1 for the status a `?wait` answer reports,
/// recorded as a read overlapping the issue).
pub type Thread = (u64, u8);

/// The process id of the final reads taken from the databases.
pub const FINAL_PROCESS: u64 = u64::MAX;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Obj {
    /// A device's desired state.
    Shadow(String),
    /// A command, by the workload's object number (one issue request, or
    /// all the requests sharing one idempotency key).
    Command(usize),
    /// A device id's registration.
    Device(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Shadow(ShadowOp),
    Command(CmdOp),
    Device(WORegisterOp<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Ret {
    Shadow(ShadowRet),
    Command(CmdRet),
    Device(WORegisterRet<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok(Ret),
    /// Certainly had no effect.
    Fail(String),
    /// May or may not have had an effect.
    Unknown(String),
}

#[derive(Debug, Clone)]
pub struct Record {
    pub client: usize,
    pub thread: Thread,
    pub obj: Obj,
    pub op: Op,
    /// What the request was, for the summary (e.g. `issue+key+wait`).
    pub kind: String,
    pub gateway: u64,
    /// Linearizable (checked by the tester) or a local read (checked by the
    /// session checks only).
    pub linearizable: bool,
    /// `Entente-Min-Index` sent with a local read.
    pub min_index: Option<u64>,
    pub invoke_seq: u64,
    pub invoke_at: Duration,
    pub outcome: Option<Outcome>,
    pub return_seq: u64,
    pub return_at: Duration,
    /// `Entente-Index` of the answer.
    pub index: Option<u64>,
}

#[derive(Debug)]
pub struct History {
    start: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    seq: u64,
    records: Vec<Record>,
}

/// An operation in flight; completes with [`History::complete`].
#[derive(Debug, Clone, Copy)]
pub struct Pending(usize);

/// What to record at an invocation.
#[derive(Debug, Clone)]
pub struct Invoke {
    pub client: usize,
    pub thread: Thread,
    pub obj: Obj,
    pub op: Op,
    pub kind: String,
    pub gateway: u64,
    pub linearizable: bool,
    pub min_index: Option<u64>,
}

impl History {
    pub fn new(start: Instant) -> History {
        History {
            start,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Seconds since the run started.
    pub fn start_elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn invoke(&self, i: Invoke) -> Pending {
        let mut inner = self.inner.lock().expect("history");
        inner.seq += 1;
        let seq = inner.seq;
        inner.records.push(Record {
            client: i.client,
            thread: i.thread,
            obj: i.obj,
            op: i.op,
            kind: i.kind,
            gateway: i.gateway,
            linearizable: i.linearizable,
            min_index: i.min_index,
            invoke_seq: seq,
            invoke_at: self.start.elapsed(),
            outcome: None,
            return_seq: 0,
            return_at: Duration::ZERO,
            index: None,
        });
        Pending(inner.records.len() - 1)
    }

    pub fn complete(&self, p: Pending, outcome: Outcome, index: Option<u64>) {
        let mut inner = self.inner.lock().expect("history");
        inner.seq += 1;
        let seq = inner.seq;
        let at = self.start.elapsed();
        let r = &mut inner.records[p.0];
        r.outcome = Some(outcome);
        r.return_seq = seq;
        r.return_at = at;
        r.index = index;
    }

    pub fn records(&self) -> Vec<Record> {
        self.inner.lock().expect("history").records.clone()
    }

    /// Operations by kind and outcome, for the summary.
    pub fn summary(&self) -> BTreeMap<(String, &'static str), u64> {
        let mut m = BTreeMap::new();
        for r in self.inner.lock().expect("history").records.iter() {
            let o = match &r.outcome {
                Some(Outcome::Ok(_)) => "ok",
                Some(Outcome::Fail(_)) => "fail",
                Some(Outcome::Unknown(_)) | None => "unknown",
            };
            *m.entry((r.kind.clone(), o)).or_insert(0) += 1;
        }
        m
    }
}
