//! Message delays from a proposal to its commit, counted.
//!
//! Every engine runs in a network where each message takes exactly one delay
//! unit and persistence is instant. A proposal is made at the leader (or
//! proposer) at time 0; the test counts the delays until the value comes out
//! of that node's committed entries:
//!
//! | engine                                 | delays | round trips |
//! |----------------------------------------|--------|-------------|
//! | Raft                                   | 2      | 1           |
//! | Multi-Paxos, steady state              | 2      | 1           |
//! | Multi-Paxos, first write after takeover| 4      | 2           |
//! | basic Paxos                            | 4      | 2           |
//! | PBFT, proposal at the primary          | 3      | 1.5         |
//! | PBFT, proposal at a backup             | 4      | 2           |
//!
//! PBFT (four replicas, f = 1): PRE-PREPARE, PREPARE and COMMIT are one
//! delay each; a backup's request first travels to the primary. (A client
//! outside the group would add one delay for its request and one for the
//! replies.)
//!
//! The takeover case counts from a proposal at the new leader made when it
//! starts its takeover, so the value waits for phase 1.
//!
//! Print the table: `cargo test -p consensus --test message_delays -- --nocapture`.

use std::collections::BTreeMap;

use consensus::engine::Engine;
use consensus::memory::{Envelope, MemNode, Network};
use consensus::paxos::{self, Mode, MultiPaxos};
use consensus::pbft::{self, Pbft, crypto::SimCrypto};
use consensus::raft::{self, Raft};
use consensus::types::{NodeId, Role};

const IDS: [NodeId; 3] = [1, 2, 3];
/// No run may take longer than this many delays.
const MAX_DELAYS: u64 = 20;

/// Takes every node out of `net` to run them in lock step.
fn nodes<E: Engine>(mut net: Network<E>) -> BTreeMap<NodeId, MemNode<E>> {
    net.ids()
        .into_iter()
        .map(|id| (id, net.remove(id).expect("node")))
        .collect()
}

/// Runs the nodes in steps of one message delay after `start` was done at
/// time 0, until `at` has applied `value`; returns the delays it took.
fn delays_until_applied<E: Engine>(
    nodes: &mut BTreeMap<NodeId, MemNode<E>>,
    at: NodeId,
    value: &[u8],
    start: impl FnOnce(&mut E),
) -> u64 {
    start(nodes.get_mut(&at).expect("node").engine_mut());
    for t in 0..=MAX_DELAYS {
        let mut in_flight: Vec<Envelope<E::Message>> = Vec::new();
        for node in nodes.values_mut() {
            // Persistence is instant: a node's whole ready cycle, including
            // what its own durable answers cause, happens at once.
            while node.engine().has_ready() {
                in_flight.extend(node.handle_ready());
            }
        }
        let applied = nodes[&at].applied().iter().any(|(_, d)| d == value);
        if applied {
            return t;
        }
        for env in in_flight {
            let to = consensus::engine::EngineMessage::to(&env.msg);
            if let Some(node) = nodes.get_mut(&to) {
                let _ = node.step(env);
            }
        }
    }
    panic!("not applied within {MAX_DELAYS} delays");
}

fn paxos_group(mode: Mode) -> Network<MultiPaxos> {
    Network::with_engines(&IDS, |id, init| {
        MultiPaxos::new(
            paxos::Config {
                mode,
                ..paxos::Config::new(id)
            },
            init,
        )
    })
}

fn raft_delays() -> u64 {
    let mut net = Network::new(&IDS, raft::Config::new);
    net.campaign(1);
    assert_eq!(net.raft(1).role(), Role::Leader);
    net.propose(1, b"warm").unwrap();
    let mut nodes: BTreeMap<NodeId, MemNode<Raft>> = nodes(net);
    delays_until_applied(&mut nodes, 1, b"v", |r| {
        r.propose(b"v".to_vec()).unwrap();
    })
}

fn multi_steady_delays() -> u64 {
    let mut net = paxos_group(Mode::Multi);
    net.campaign(1);
    assert_eq!(net.raft(1).role(), Role::Leader);
    net.propose(1, b"warm").unwrap();
    let mut nodes = nodes(net);
    delays_until_applied(&mut nodes, 1, b"v", |p| {
        p.propose(b"v".to_vec()).unwrap();
    })
}

fn multi_takeover_delays() -> u64 {
    let mut net = paxos_group(Mode::Multi);
    net.campaign(1);
    net.propose(1, b"warm").unwrap();
    net.tick_all();
    let mut nodes = nodes(net);
    delays_until_applied(&mut nodes, 2, b"v", |p| {
        p.campaign();
        assert_eq!(p.role(), Role::Candidate);
        p.propose(b"v".to_vec()).unwrap();
    })
}

fn basic_delays() -> u64 {
    let mut net = paxos_group(Mode::Basic);
    net.propose(1, b"warm").unwrap();
    net.tick_all();
    let mut nodes = nodes(net);
    delays_until_applied(&mut nodes, 1, b"v", |p| {
        p.propose(b"v".to_vec()).unwrap();
    })
}

fn pbft_delays(at: NodeId) -> u64 {
    let ids = [1, 2, 3, 4];
    let mut net = Network::with_engines(&ids, |id, init| {
        Pbft::new(
            pbft::Config::new(id, std::sync::Arc::new(SimCrypto::new(id, 3))),
            init,
        )
    });
    assert_eq!(
        net.raft(1).role(),
        Role::Leader,
        "node 1 is the primary of view 0"
    );
    net.propose(1, b"warm").unwrap();
    let mut nodes = nodes(net);
    delays_until_applied(&mut nodes, at, b"v", |p| {
        p.propose(b"v".to_vec()).unwrap();
    })
}

#[test]
fn message_delays_from_proposal_to_commit() {
    let rows = [
        ("Raft", raft_delays(), 2),
        ("Multi-Paxos, steady state", multi_steady_delays(), 2),
        (
            "Multi-Paxos, first write after takeover",
            multi_takeover_delays(),
            4,
        ),
        ("basic Paxos", basic_delays(), 4),
        ("PBFT, proposal at the primary", pbft_delays(1), 3),
        ("PBFT, proposal at a backup", pbft_delays(2), 4),
    ];
    println!("{:<42} {:>6} {:>8}", "engine", "delays", "expected");
    for (name, got, want) in rows {
        println!("{name:<42} {got:>6} {want:>8}");
    }
    for (name, got, want) in rows {
        assert_eq!(got, want, "{name}");
    }
}
