//! Throughput and commit latency of the Raft core: three nodes in one
//! process, in-memory storage, messages handed over directly.
//!
//! `cargo bench -p coordinator` runs 1, 64 and 256 closed-loop proposers; each
//! proposer has one proposal outstanding and proposes again as soon as the
//! leader sees it committed. Proposals that arrive while a round is in flight
//! are batched into the next append (pipelining up to the inflight limit).
//! `RAFT_BENCH_SECS` sets the duration of each run (default 3).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use coordinator::raft::{Config, Entry, InitialState, Message, NodeId, Proposed, Raft, Role};
use hdrhistogram::Histogram;

/// A node with the cheapest possible storage: entries kept in a vector,
/// compacted as the log grows.
struct BenchNode {
    raft: Raft,
    stored: Vec<Entry>,
    applied: u64,
}

impl BenchNode {
    fn new(id: NodeId) -> Self {
        let cfg = Config {
            max_inflight_msgs: 256,
            ..Config::new(id)
        };
        let raft = Raft::new(cfg, InitialState::bootstrap([1, 2, 3])).expect("valid config");
        BenchNode {
            raft,
            stored: Vec::new(),
            applied: 0,
        }
    }

    /// One ready/advance cycle; returns the outgoing messages.
    fn cycle(&mut self, out: &mut Vec<Message>) {
        if !self.raft.has_ready() {
            return;
        }
        let mut rd = self.raft.ready();
        out.append(&mut rd.messages);
        if let Some(first) = rd.entries.first() {
            let keep = self.stored.partition_point(|e| e.index < first.index);
            self.stored.truncate(keep);
            self.stored.append(&mut rd.entries);
        }
        out.append(&mut rd.persisted_messages);
        self.applied += rd.committed_entries.len() as u64;
        self.raft.advance();
        let applied = self.raft.applied_index();
        if applied > self.raft.snapshot_meta().index + 20_000 {
            let at = applied - 1_000;
            if self.raft.compact(at).is_ok() {
                self.stored.retain(|e| e.index > at);
            }
        }
    }
}

struct Outcome {
    commits: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    rounds: u64,
}

fn run(proposers: usize, duration: Duration, payload: usize) -> Outcome {
    let mut nodes: BTreeMap<NodeId, BenchNode> =
        (1..=3).map(|id| (id, BenchNode::new(id))).collect();
    let mut wire: VecDeque<Message> = VecDeque::new();
    // Elect node 1.
    nodes.get_mut(&1).expect("node 1").raft.campaign();
    for _ in 0..20 {
        let mut out = Vec::new();
        for n in nodes.values_mut() {
            n.cycle(&mut out);
        }
        for m in out {
            let to = m.to;
            let _ = nodes.get_mut(&to).map(|n| n.raft.step(m));
        }
    }
    assert_eq!(nodes[&1].raft.role(), Role::Leader, "node 1 must lead");

    let data = vec![0x5a_u8; payload];
    let mut free: Vec<usize> = (0..proposers).collect();
    let mut pending: BTreeMap<u64, Vec<(usize, Instant)>> = BTreeMap::new();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut commits = 0;
    let mut rounds = 0;
    let start = Instant::now();
    while start.elapsed() < duration {
        rounds += 1;
        let leader = nodes.get_mut(&1).expect("leader");
        for p in free.drain(..) {
            match leader.raft.propose(data.clone()) {
                Ok(Proposed::Appended { index, .. }) => {
                    pending.entry(index).or_default().push((p, Instant::now()))
                }
                other => panic!("proposal refused: {other:?}"),
            }
        }
        let mut out = Vec::new();
        for n in nodes.values_mut() {
            n.cycle(&mut out);
        }
        wire.extend(out);
        // One network hop: deliver what is on the wire now.
        for _ in 0..wire.len() {
            let Some(m) = wire.pop_front() else { break };
            let to = m.to;
            let _ = nodes.get_mut(&to).map(|n| n.raft.step(m));
        }
        let committed = nodes[&1].raft.commit_index();
        let done: Vec<u64> = pending.range(..=committed).map(|(&i, _)| i).collect();
        let now = Instant::now();
        for i in done {
            for (p, t) in pending.remove(&i).unwrap_or_default() {
                latency
                    .record((now - t).as_micros().max(1) as u64)
                    .expect("in range");
                commits += 1;
                free.push(p);
            }
        }
    }
    Outcome {
        commits,
        elapsed: start.elapsed(),
        latency,
        rounds,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this quickly.
    let quick = std::env::args().any(|a| a == "--test" || a.starts_with("--list"));
    let secs: f64 = std::env::var("RAFT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let duration = if quick {
        Duration::from_millis(50)
    } else {
        Duration::from_secs_f64(secs)
    };
    println!("raft core, 3 nodes in one process, in-memory storage, 100-byte proposals");
    println!(
        "{:>10} {:>14} {:>10} {:>10} {:>10} {:>10}",
        "proposers", "commits/s", "p50 µs", "p99 µs", "max µs", "batch"
    );
    for proposers in [1, 64, 256] {
        let o = run(proposers, duration, 100);
        let rate = o.commits as f64 / o.elapsed.as_secs_f64();
        println!(
            "{:>10} {:>14.0} {:>10} {:>10} {:>10} {:>10.1}",
            proposers,
            rate,
            o.latency.value_at_quantile(0.50),
            o.latency.value_at_quantile(0.99),
            o.latency.max(),
            o.commits as f64 / o.rounds.max(1) as f64,
        );
    }
}
