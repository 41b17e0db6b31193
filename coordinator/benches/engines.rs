//! Throughput and commit latency of the consensus engines side by side —
//! Raft, Multi-Paxos and basic Paxos with three nodes, PBFT with four
//! (3f+1, f = 1, every message signed and verified with Ed25519) —: the
//! nodes in one process, in-memory storage, messages handed over directly.
//! Besides the rate and latency, each row gives the messages sent and the
//! CPU time spent (the process's, one thread) per committed write.
//!
//! `cargo bench -p coordinator` runs each engine with 1, 16, 64 and 256
//! closed-loop proposers; each
//! proposer has one proposal outstanding and proposes again as soon as the
//! leader sees it committed. Proposals that arrive while a round is in flight
//! are batched into the next append (pipelining up to the inflight limit).
//! Basic Paxos has no leader: every proposal runs both phases at node 1.
//! PBFT's node 1 is the primary of view 0; it orders its own requests in
//! pre-prepares of up to 64.
//! `ENGINE_BENCH_SECS` sets the duration of each run (default 3);
//! `ENGINE_BENCH_ONLY=multi-paxos` (or another engine's name) runs one engine.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use coordinator::engine::{Engine, EngineKind, EngineMessage};
use coordinator::paxos::{self, MultiPaxos};
use coordinator::raft::{Config, Entry, EntryPayload, InitialState, NodeId, Raft, Role};
use std::sync::Arc;

use consensus::pbft::{self, Pbft, crypto::Ed25519};
use hdrhistogram::Histogram;

/// A node with the cheapest possible storage: entries kept in a vector,
/// compacted as the log grows.
struct BenchNode<E> {
    raft: E,
    stored: Vec<Entry>,
    applied: u64,
}

impl<E: Engine> BenchNode<E> {
    fn new(raft: E) -> Self {
        BenchNode {
            raft,
            stored: Vec::new(),
            applied: 0,
        }
    }

    /// One ready/advance cycle; returns the outgoing messages.
    fn cycle(&mut self, out: &mut Vec<E::Message>) {
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
        self.applied += rd
            .committed_entries
            .iter()
            .filter(|e| matches!(e.payload, EntryPayload::Normal(_)))
            .count() as u64;
        self.raft.advance();
        let applied = self.raft.applied_index();
        if applied > self.raft.snapshot_meta().index + 20_000 {
            let at = applied - 1_000;
            if self.raft.compact_keeping(at, 0).is_ok() {
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
    messages: u64,
    cpu: Duration,
}

/// CPU time (user + system) this process has used, from /proc (Linux;
/// zero elsewhere).
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th, in clock ticks of 1/100 s.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

fn run(kind: EngineKind, proposers: usize, duration: Duration, payload: usize) -> Outcome {
    let init = || InitialState::bootstrap([1, 2, 3]);
    match kind {
        EngineKind::Raft => {
            let node = |id| {
                let cfg = Config {
                    max_inflight_msgs: 256,
                    ..Config::new(id)
                };
                BenchNode::new(Raft::new(cfg, init()).expect("valid config"))
            };
            let nodes = (1..=3).map(|id| (id, node(id))).collect();
            run_group(kind, nodes, proposers, duration, payload)
        }
        EngineKind::Pbft => {
            let ids = [1, 2, 3, 4];
            let seed = |id: NodeId| [id as u8; 32];
            let group = ids
                .iter()
                .map(|&id| (id, Ed25519::public_key(&seed(id))))
                .collect();
            let node = |id| {
                let crypto = Ed25519::new(id, &seed(id), &group).expect("keys");
                let cfg = pbft::Config::new(id, Arc::new(crypto));
                BenchNode::new(Pbft::new(cfg, InitialState::bootstrap(ids)).expect("valid config"))
            };
            let nodes = ids.iter().map(|&id| (id, node(id))).collect();
            run_group(kind, nodes, proposers, duration, payload)
        }
        EngineKind::MultiPaxos | EngineKind::BasicPaxos => {
            let node = |id| {
                let mut cfg = match kind {
                    EngineKind::BasicPaxos => paxos::Config::basic(id),
                    _ => paxos::Config::new(id),
                };
                cfg.max_inflight_msgs = 256;
                BenchNode::new(MultiPaxos::new(cfg, init()).expect("valid config"))
            };
            let nodes = (1..=3).map(|id| (id, node(id))).collect();
            run_group(kind, nodes, proposers, duration, payload)
        }
    }
}

fn run_group<E: Engine>(
    kind: EngineKind,
    mut nodes: BTreeMap<NodeId, BenchNode<E>>,
    proposers: usize,
    duration: Duration,
    payload: usize,
) -> Outcome {
    let mut wire: VecDeque<E::Message> = VecDeque::new();
    // Elect node 1 (basic Paxos has no leader: node 1 proposes; PBFT's
    // node 1 is the primary of view 0).
    if kind != EngineKind::Pbft {
        nodes.get_mut(&1).expect("node 1").raft.campaign();
    }
    for _ in 0..20 {
        let mut out = Vec::new();
        for n in nodes.values_mut() {
            n.cycle(&mut out);
        }
        for m in out {
            let to = m.to();
            let _ = nodes.get_mut(&to).map(|n| n.raft.step(m));
        }
    }
    if kind != EngineKind::BasicPaxos {
        assert_eq!(nodes[&1].raft.role(), Role::Leader, "node 1 must lead");
    }

    let data = vec![0x5a_u8; payload];
    let mut free: Vec<usize> = (0..proposers).collect();
    // Only node 1 proposes, so its values are applied in the order it
    // proposed them: the n-th value applied there is the n-th proposed.
    let mut pending: VecDeque<(usize, Instant)> = VecDeque::new();
    let mut seen = nodes[&1].applied;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut commits = 0;
    let mut rounds = 0;
    let mut messages = 0;
    let cpu = process_cpu();
    let start = Instant::now();
    while start.elapsed() < duration {
        rounds += 1;
        let leader = nodes.get_mut(&1).expect("leader");
        for p in free.drain(..) {
            if let Err(e) = leader.raft.propose(data.clone()) {
                panic!("proposal refused: {e}");
            }
            pending.push_back((p, Instant::now()));
        }
        let mut out = Vec::new();
        for n in nodes.values_mut() {
            n.cycle(&mut out);
        }
        messages += out.len() as u64;
        wire.extend(out);
        // One network hop: deliver what is on the wire now.
        for _ in 0..wire.len() {
            let Some(m) = wire.pop_front() else { break };
            let to = m.to();
            let _ = nodes.get_mut(&to).map(|n| n.raft.step(m));
        }
        let applied = nodes[&1].applied;
        let now = Instant::now();
        for _ in seen..applied {
            let Some((p, t)) = pending.pop_front() else {
                break;
            };
            latency
                .record((now - t).as_micros().max(1) as u64)
                .expect("in range");
            commits += 1;
            free.push(p);
        }
        seen = applied;
    }
    Outcome {
        commits,
        elapsed: start.elapsed(),
        latency,
        rounds,
        messages,
        cpu: process_cpu().saturating_sub(cpu),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this quickly.
    let quick = std::env::args().any(|a| a == "--test" || a.starts_with("--list"));
    let secs: f64 = std::env::var("ENGINE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let duration = if quick {
        Duration::from_millis(50)
    } else {
        Duration::from_secs_f64(secs)
    };
    println!("3 nodes (PBFT: 4) in one process, in-memory storage, 100-byte proposals");
    println!(
        "{:>12} {:>10} {:>14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "engine",
        "proposers",
        "commits/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "batch",
        "msgs/write",
        "CPU µs/w"
    );
    let only = std::env::var("ENGINE_BENCH_ONLY").ok();
    for (kind, proposers) in EngineKind::ALL
        .into_iter()
        .filter(|k| only.as_deref().is_none_or(|o| o == k.name()))
        .flat_map(|k| [1, 16, 64, 256].map(|p| (k, p)))
    {
        let o = run(kind, proposers, duration, 100);
        let rate = o.commits as f64 / o.elapsed.as_secs_f64();
        let per = |x: f64| x / o.commits.max(1) as f64;
        println!(
            "{:>12} {:>10} {:>14.0} {:>10} {:>10} {:>10} {:>10.1} {:>10.2} {:>10.1}",
            kind.name(),
            proposers,
            rate,
            o.latency.value_at_quantile(0.50),
            o.latency.value_at_quantile(0.99),
            o.latency.max(),
            o.commits as f64 / o.rounds.max(1) as f64,
            per(o.messages as f64),
            per(o.cpu.as_secs_f64() * 1e6),
        );
    }
}
