//! The test-only Byzantine replica (`consensus::pbft::byzantine`, feature
//! `byzantine`) in a group of four through the in-memory driver: it really
//! misbehaves — its messages are rewritten, correct replicas refuse or
//! survive them — and the three correct replicas keep one history and
//! execute every request.

use std::sync::Arc;

use consensus::engine::Engine;
use consensus::memory::Network;
use consensus::pbft::byzantine::{Byzantine, Mode};
use consensus::pbft::crypto::{Crypto, SimCrypto};
use consensus::pbft::{Config, MessageKind, Pbft};
use consensus::types::NodeId;

const SEED: u64 = 11;
const IDS: [NodeId; 4] = [1, 2, 3, 4];

fn crypto(id: NodeId) -> Arc<dyn Crypto> {
    Arc::new(SimCrypto::new(id, SEED))
}

/// A group whose member `bad` misbehaves as `mode`.
fn group(bad: NodeId, mode: Mode) -> Network<Byzantine> {
    Network::with_engines(&IDS, |id, init| {
        let cfg = Config {
            checkpoint_interval: 4,
            window: 8,
            ..Config::new(id, crypto(id))
        };
        let m = if id == bad { mode } else { Mode::default() };
        Pbft::new(cfg, init).map(|p| Byzantine::new(p, crypto(id), m))
    })
}

fn applied(net: &Network<Byzantine>, id: NodeId) -> Vec<(u64, Vec<u8>)> {
    net.node(id).applied().clone()
}

/// Ticks every replica until each correct one executed `values`, or fails.
fn settle(net: &mut Network<Byzantine>, correct: &[NodeId], values: &[&[u8]]) {
    for _ in 0..400 {
        let done = correct.iter().all(|&id| {
            let got: Vec<Vec<u8>> = applied(net, id).into_iter().map(|(_, v)| v).collect();
            values.iter().all(|v| got.iter().any(|g| g == v))
        });
        if done {
            return;
        }
        net.tick_all();
    }
    panic!(
        "not every request executed at every correct replica: {:?}",
        correct
            .iter()
            .map(|&id| (id, applied(net, id)))
            .collect::<Vec<_>>()
    );
}

/// The correct replicas executed the same requests at the same sequence
/// numbers, and each at most once.
fn assert_one_history(net: &Network<Byzantine>, correct: &[NodeId]) {
    let longest = correct
        .iter()
        .map(|&id| applied(net, id))
        .max_by_key(Vec::len)
        .expect("replicas");
    for &id in correct {
        let mine = applied(net, id);
        assert_eq!(mine[..], longest[..mine.len()], "node {id} diverged");
        let mut values: Vec<&Vec<u8>> = mine.iter().map(|(_, v)| v).collect();
        values.sort();
        let n = values.len();
        values.dedup();
        assert_eq!(values.len(), n, "node {id} executed a request twice");
    }
}

#[test]
fn modes_parse_and_unknown_behaviours_are_refused() {
    let m: Mode = "equivocate, lie-in-view-change".parse().expect("both");
    assert!(m.equivocate && m.lie_in_view_change);
    assert_eq!("".parse::<Mode>().expect("none"), Mode::default());
    let err = "equivocate,crash".parse::<Mode>().expect_err("unknown");
    assert!(err.contains("crash"), "{err}");
}

#[test]
fn an_equivocating_primary_is_survived_and_replaced() {
    let mode = Mode {
        equivocate: true,
        ..Mode::default()
    };
    let mut net = group(1, mode);
    let correct = [2, 3, 4];
    let values: Vec<Vec<u8>> = (0..6).map(|i| format!("v{i}").into_bytes()).collect();
    for (i, v) in values.iter().enumerate() {
        // Two proposals per pre-prepare, so the variant reorders them.
        let at = correct[i % 3];
        net.raft_mut(at).propose(v.clone()).expect("propose");
    }
    net.stabilize();
    assert!(
        net.raft(1).rewritten() > 0,
        "the primary equivocated on nothing"
    );
    let sent_variants = net.delivered().iter().any(|m| match &m.kind {
        MessageKind::PrePrepare(pp) => pp.signer == 1 && m.to % 2 == 0,
        _ => false,
    });
    assert!(sent_variants, "no pre-prepare reached a backup of even id");
    let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    settle(&mut net, &correct, &refs);
    assert_one_history(&net, &correct);
    for id in correct {
        assert!(
            net.raft(id).term() >= 1,
            "node {id} still follows the equivocating primary"
        );
    }
}

#[test]
fn a_primary_lying_in_view_changes_does_not_lose_a_request() {
    let mode = Mode {
        lie_in_view_change: true,
        ..Mode::default()
    };
    // Node 2 is the primary of view 1: it lies in its VIEW-CHANGEs and in
    // its NEW-VIEW.
    let mut net = group(2, mode);
    let correct = [1, 3, 4];
    net.raft_mut(3).propose(b"a".to_vec()).expect("propose");
    net.stabilize();
    // Every replica moves to view 1, then on.
    for id in IDS {
        net.raft_mut(id).campaign();
    }
    net.stabilize();
    net.raft_mut(4).propose(b"b".to_vec()).expect("propose");
    settle(&mut net, &correct, &[b"a", b"b"]);
    assert!(net.raft(2).rewritten() > 0, "it told no lie");
    assert_one_history(&net, &correct);
    for id in correct {
        let r = net.raft(id).inner();
        assert!(
            r.view() >= 2,
            "node {id} is in view {}: the lying primary of view 1 was not replaced",
            r.view()
        );
        assert!(
            r.stats().invalid_view_change + r.stats().invalid_new_view > 0,
            "node {id} refused none of its lies"
        );
    }
}

#[test]
fn wrong_replies_do_not_make_a_certificate_and_are_counted() {
    use consensus::pbft::certificate;
    let mode = Mode {
        wrong_replies: true,
        ..Mode::default()
    };
    // Node 1's replies reach the client (node 4) before the others'.
    let mut net = group(1, mode);
    for (i, v) in [b"a", b"b", b"c"].iter().enumerate() {
        net.raft_mut(4)
            .propose(v.to_vec())
            .unwrap_or_else(|e| panic!("propose {i}: {e}"));
    }
    settle(&mut net, &[2, 3, 4], &[b"a", b"b", b"c"]);
    for _ in 0..10 {
        net.tick_all();
    }
    assert!(net.raft(1).rewritten() > 0, "it sent no reply");
    let certs = net.node(4).certificates().to_vec();
    assert_eq!(certs.len(), 3, "one certificate per request");
    let checker = crypto(4);
    for c in &certs {
        let v = certificate::verify_with(&c.bytes, &IDS, checker.as_ref())
            .unwrap_or_else(|e| panic!("certificate at {}: {e}", c.index));
        assert!(
            !v.signers.contains(&1),
            "the lying replica's reply was counted at {}",
            c.index
        );
    }
    assert!(
        net.raft(4).inner().stats().bad_replies > 0,
        "the wrong replies were not counted"
    );
}
