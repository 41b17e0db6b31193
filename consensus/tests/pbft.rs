//! The PBFT engine (`consensus::pbft`) through the in-memory driver: the
//! normal case, batching, the checks a backup makes on a pre-prepare,
//! dropped Byzantine input, view changes and new-view validation,
//! checkpoints and garbage collection, restarts, and catching up.

use std::sync::Arc;

use bytes::Bytes;
use consensus::engine::EngineMessage;
use consensus::memory::{Envelope, MemNode, MemStorage, Network};
use consensus::pbft::crypto::{Crypto, Ed25519, SimCrypto};
use consensus::pbft::{
    Alive, CheckpointProof, CheckpointState, CheckpointVote, Config, Message, MessageKind, NewView,
    Pbft, Phase, PrePrepare, PreparedCert, Request, Signed, ViewChange, Vote, batch_digest,
    compute_new_view, conflicting_certificates,
};
use consensus::types::{InitialState, NodeId, Role};

const SEED: u64 = 7;
const IDS: [NodeId; 4] = [1, 2, 3, 4];

fn crypto(id: NodeId) -> Arc<dyn Crypto> {
    Arc::new(SimCrypto::new(id, SEED))
}

fn cfg(id: NodeId) -> Config {
    Config {
        checkpoint_interval: 4,
        window: 8,
        ..Config::new(id, crypto(id))
    }
}

fn group() -> Network<Pbft> {
    Network::with_engines(&IDS, |id, init| Pbft::new(cfg(id), init))
}

fn replica(id: NodeId) -> Pbft {
    Pbft::new(cfg(id), InitialState::bootstrap(IDS)).expect("config")
}

fn applied(net: &Network<Pbft>, id: NodeId) -> Vec<(u64, Vec<u8>)> {
    net.node(id).applied().clone()
}

fn request(client: NodeId, ts: u64, data: &str) -> Signed<Request> {
    Signed::sign(
        crypto(client).as_ref(),
        client,
        Request {
            client,
            ts,
            read: false,
            data: Bytes::from(data.to_owned()),
        },
    )
}

fn pre_prepare(
    primary: NodeId,
    view: u64,
    first: u64,
    reqs: Vec<Signed<Request>>,
) -> Signed<PrePrepare> {
    let requests: Vec<Option<Signed<Request>>> = reqs.into_iter().map(Some).collect();
    Signed::sign(
        crypto(primary).as_ref(),
        primary,
        PrePrepare {
            view,
            first,
            digest: batch_digest(first, &requests),
            requests,
        },
    )
}

fn msg(from: NodeId, to: NodeId, kind: MessageKind) -> Message {
    Message {
        from,
        to,
        view: 0,
        kind,
    }
}

/// The NEW-VIEW `primary` sends for `view` from `vcs`, its batch the one
/// [`compute_new_view`] re-issues (if any), signed as a correct primary
/// signs it.
fn new_view_as_computed(
    primary: NodeId,
    view: u64,
    vcs: Vec<Signed<ViewChange>>,
) -> Signed<NewView> {
    let (_, reissue) = compute_new_view(&vcs);
    let pre_prepare = reissue.map(|(first, requests)| {
        Signed::sign(
            crypto(primary).as_ref(),
            primary,
            PrePrepare {
                view,
                first,
                digest: batch_digest(first, &requests),
                requests,
            },
        )
    });
    Signed::sign(
        crypto(primary).as_ref(),
        primary,
        NewView {
            view,
            view_changes: vcs,
            pre_prepare,
        },
    )
}

fn prepares_sent(r: &mut Pbft) -> usize {
    let rd = r.ready();
    r.advance();
    rd.messages
        .iter()
        .chain(rd.persisted_messages.iter())
        .filter(|m| matches!(m.kind, MessageKind::Prepare(_)))
        .count()
}

#[test]
fn normal_case_commits_everywhere_in_order() {
    let mut net = group();
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(2).role(), Role::Follower);
    net.propose(1, b"a").expect("propose at the primary");
    net.propose(3, b"b").expect("propose at a backup");
    net.propose(4, b"c").expect("propose at a backup");
    let want = vec![(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())];
    for id in IDS {
        assert_eq!(applied(&net, id), want, "node {id}");
        assert_eq!(net.raft(id).commit_index(), 3);
        assert_eq!(net.raft(id).stats().bad_signature, 0);
    }
}

#[test]
fn proposals_between_two_readies_go_in_one_pre_prepare() {
    let mut net = group();
    for v in ["a", "b", "c", "d", "e"] {
        net.raft_mut(1)
            .propose(v.as_bytes().to_vec())
            .expect("propose");
    }
    net.stabilize();
    let pps: Vec<usize> = net
        .delivered()
        .iter()
        .filter(|m| m.to() == 2)
        .filter_map(|m| match &m.kind {
            MessageKind::PrePrepare(pp) => Some(pp.body.requests.len()),
            _ => None,
        })
        .collect();
    assert_eq!(pps, vec![5], "one pre-prepare carries the five requests");
    for id in IDS {
        assert_eq!(net.node(id).applied().len(), 5);
    }
}

#[test]
fn backup_refuses_a_second_pre_prepare_overlapping_an_accepted_one() {
    let mut r = replica(2);
    let x = pre_prepare(1, 0, 1, vec![request(3, 1, "x")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(x))).expect("step");
    assert_eq!(prepares_sent(&mut r), 3, "prepare for the first batch");
    // The same sequence number with another request.
    let y = pre_prepare(1, 0, 1, vec![request(3, 2, "y")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(y))).expect("step");
    // Another range overlapping it.
    let z = pre_prepare(1, 0, 1, vec![request(3, 3, "z"), request(3, 4, "w")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(z))).expect("step");
    assert_eq!(r.stats().conflicting, 2);
    assert_eq!(
        prepares_sent(&mut r),
        0,
        "no prepare for a conflicting batch"
    );
    // A batch after it is fine.
    let next = pre_prepare(1, 0, 2, vec![request(3, 5, "v")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(next)))
        .expect("step");
    assert_eq!(prepares_sent(&mut r), 3);
}

/// The log a replica hands to storage has no gaps: a pre-prepare that
/// arrives ahead of the ones before it (lost, or sent again out of order
/// after a reconnect or a view change) is written with the positions in
/// between, not after a hole durable storage refuses. (Found by the chaos
/// run: a gateway stopped with "cannot append entry 758: it leaves a gap
/// after the last stored entry".)
#[test]
fn a_pre_prepare_ahead_of_the_log_is_written_without_a_gap() {
    let mut r = replica(2);
    let mut stored: Vec<u64> = Vec::new();
    let persist = |r: &mut Pbft, stored: &mut Vec<u64>| {
        let rd = r.ready();
        r.advance();
        if let Some(first) = rd.entries.first() {
            let last = stored.last().copied().unwrap_or(0);
            assert!(
                first.index <= last + 1,
                "entries from {} after a log that ends at {last}: a gap",
                first.index
            );
            stored.retain(|&i| i < first.index);
            stored.extend(rd.entries.iter().map(|e| e.index));
        }
    };
    let a = pre_prepare(1, 0, 1, vec![request(3, 1, "a")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(a))).expect("step");
    persist(&mut r, &mut stored);
    assert_eq!(stored, vec![1]);
    // Sequence numbers 2 and 3 have not arrived; 4 does (inside the window).
    let d = pre_prepare(1, 0, 4, vec![request(3, 4, "d")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(d))).expect("step");
    persist(&mut r, &mut stored);
    assert_eq!(stored, vec![1, 2, 3, 4]);
    // Then the ones in between.
    let b = pre_prepare(1, 0, 2, vec![request(3, 2, "b"), request(3, 3, "c")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(b))).expect("step");
    persist(&mut r, &mut stored);
    assert_eq!(stored, vec![1, 2, 3, 4]);
}

#[test]
fn byzantine_input_is_dropped_and_counted() {
    let mut r = replica(2);
    // A bad signature.
    let mut bad = pre_prepare(1, 0, 1, vec![request(3, 1, "x")]);
    let mut sig = bad.sig.to_vec();
    sig[0] ^= 1;
    bad.sig = Bytes::from(sig);
    r.step(msg(1, 2, MessageKind::PrePrepare(bad)))
        .expect("dropped, not refused");
    // Node 3 signs a pre-prepare claiming to be the primary.
    let mut forged = pre_prepare(3, 0, 1, vec![request(3, 1, "x")]);
    forged.signer = 1;
    r.step(msg(1, 2, MessageKind::PrePrepare(forged)))
        .expect("dropped");
    // A request whose client signature is another member's.
    let mut req = request(3, 1, "x");
    req.signer = 4;
    req.body.client = 4;
    r.step(msg(4, 2, MessageKind::Request(req)))
        .expect("dropped");
    assert_eq!(r.stats().bad_signature, 3);
    // What operators see: the status reports the same counts by reason.
    let dropped = r.status().dropped;
    assert!(dropped.contains(&("bad_signature", 3)), "{dropped:?}");
    // A non-member.
    let stranger = pre_prepare(1, 0, 1, vec![request(3, 1, "x")]);
    r.step(msg(9, 2, MessageKind::PrePrepare(stranger)))
        .expect("dropped");
    assert_eq!(r.stats().not_member, 1);
    // Another view (its primary, node 3, signs it).
    let later = pre_prepare(3, 2, 1, vec![request(3, 1, "x")]);
    r.step(msg(3, 2, MessageKind::PrePrepare(later)))
        .expect("dropped");
    assert_eq!(r.stats().wrong_view, 1);
    // Outside the watermarks (window 8 above h = 0).
    let far = pre_prepare(1, 0, 9, vec![request(3, 1, "x")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(far)))
        .expect("dropped");
    assert_eq!(r.stats().outside_watermarks, 1);
    assert_eq!(prepares_sent(&mut r), 0, "nothing was accepted");
    // Malformed shapes are refused.
    assert!(
        r.step(msg(
            1,
            3,
            MessageKind::Fetch {
                next: 1,
                active: true,
                stable: 0,
            }
        ))
        .is_err()
    );
    assert!(
        r.step(msg(
            1,
            2,
            MessageKind::Fetch {
                next: 0,
                active: true,
                stable: 0,
            }
        ))
        .is_err()
    );
}

/// Prepares "x" at sequence number 1 in view 0 everywhere without letting
/// it commit.
fn prepared_but_not_committed() -> Network<Pbft> {
    let mut net = group();
    net.ignore("Commit");
    net.propose(1, b"x").expect("propose");
    for id in IDS {
        assert!(net.node(id).applied().is_empty());
    }
    net
}

#[test]
fn view_change_reissues_a_prepared_request_in_the_new_view() {
    let mut net = prepared_but_not_committed();
    for id in [2, 3, 4] {
        net.raft_mut(id).campaign();
    }
    net.stabilize();
    net.recover();
    net.isolate(1);
    for id in [2, 3, 4] {
        assert_eq!(net.raft(id).view(), 1, "node {id}");
        assert!(net.raft(id).is_active(), "node {id} entered view 1");
    }
    assert_eq!(net.raft(2).role(), Role::Leader);
    // The commits of view 1 were dropped too; retransmission finishes it.
    for _ in 0..2 {
        net.tick_all();
    }
    for id in [2, 3, 4] {
        assert_eq!(applied(&net, id), vec![(1, b"x".to_vec())], "node {id}");
        assert_eq!(net.raft(id).term_at(1), Some(1), "re-issued in view 1");
    }
    // The new primary orders new requests after it.
    net.propose(3, b"y").expect("propose");
    assert_eq!(
        applied(&net, 4),
        vec![(1, b"x".to_vec()), (2, b"y".to_vec())]
    );
}

#[test]
fn a_new_view_that_drops_a_prepared_request_is_rejected() {
    let mut net = prepared_but_not_committed();
    net.ignore("NewView");
    for id in [2, 3, 4] {
        net.raft_mut(id).campaign();
    }
    net.stabilize();
    let mut vcs: Vec<Signed<ViewChange>> = Vec::new();
    for m in net.delivered() {
        if let MessageKind::ViewChange(vc) = &m.kind
            && m.to() == 3
            && !vcs.iter().any(|x| x.signer == vc.signer)
        {
            vcs.push(vc.clone());
        }
    }
    let own = net
        .delivered()
        .iter()
        .find_map(|m| match &m.kind {
            MessageKind::ViewChange(vc) if vc.signer == 3 => Some(vc.clone()),
            _ => None,
        })
        .expect("node 3's view change");
    vcs.retain(|x| x.signer != 4);
    vcs.push(own);
    assert_eq!(vcs.len(), 3);
    let (_, reissue) = compute_new_view(&vcs);
    let (first, reqs) = reissue.expect("the prepared request is re-issued");
    assert_eq!(first, 1);
    assert_eq!(
        reqs[0].as_ref().map(|r| r.body.data.clone()),
        Some(Bytes::from("x"))
    );
    let r = net.raft_mut(3);
    assert!(!r.is_active(), "node 3 waits for the new view");
    // Node 2, primary of view 1, drops the prepared request.
    let forged = Signed::sign(
        crypto(2).as_ref(),
        2,
        NewView {
            view: 1,
            view_changes: vcs.clone(),
            pre_prepare: None,
        },
    );
    r.step(msg(2, 3, MessageKind::NewView(forged)))
        .expect("dropped");
    assert_eq!(r.stats().invalid_new_view, 1);
    assert!(!r.is_active());
    // Or replaces it with a null request.
    let nulls: Vec<Option<Signed<Request>>> = vec![None];
    let pp = Signed::sign(
        crypto(2).as_ref(),
        2,
        PrePrepare {
            view: 1,
            first: 1,
            digest: batch_digest(1, &nulls),
            requests: nulls,
        },
    );
    let forged = Signed::sign(
        crypto(2).as_ref(),
        2,
        NewView {
            view: 1,
            view_changes: vcs,
            pre_prepare: Some(pp),
        },
    );
    r.step(msg(2, 3, MessageKind::NewView(forged)))
        .expect("dropped");
    assert_eq!(r.stats().invalid_new_view, 2);
    assert!(!r.is_active());
}

#[test]
fn checkpoint_becomes_stable_and_the_log_is_collected() {
    let mut net = group();
    for i in 0..4 {
        net.propose(1 + i % 4, format!("v{i}").as_bytes())
            .expect("propose");
    }
    for id in IDS {
        let r = net.raft(id);
        assert_eq!(r.stable_checkpoint(), 4, "node {id}");
        assert_eq!(
            r.protocol_log_len(),
            0,
            "votes and checkpoints below 4 collected"
        );
        assert_eq!(r.stable_proof().votes.len(), 3, "2f+1 signed checkpoints");
    }
    for id in IDS {
        let node = net.node_mut(id);
        assert!(
            node.engine().snapshot_meta_at(3).is_err(),
            "only at the checkpoint"
        );
        let meta = node
            .snapshot_and_compact()
            .expect("compact at the stable checkpoint");
        assert_eq!(meta.index, 4);
        assert_eq!(node.engine().batches_held(), 0);
    }
    // The watermarks moved: more than the window (8) above 0 executes.
    for i in 4..12 {
        net.propose(2, format!("v{i}").as_bytes()).expect("propose");
    }
    for id in IDS {
        assert_eq!(net.raft(id).commit_index(), 12);
        assert_eq!(net.raft(id).stable_checkpoint(), 12);
    }
    // A restart from the compacted storage keeps the executed state.
    let st = net.remove(3).expect("node 3").crash();
    let node = MemNode::start(st, |init| Pbft::new(cfg(3), init)).expect("restart");
    assert_eq!(node.engine().commit_index(), 12);
    net.insert(node);
    net.propose(4, b"after").expect("propose");
    assert_eq!(net.node(3).applied().last(), Some(&(13, b"after".to_vec())));
}

#[test]
fn a_restarted_replica_keeps_its_view_and_does_not_vote_differently() {
    let mut net = group();
    for id in IDS {
        net.raft_mut(id).campaign();
    }
    net.stabilize();
    assert!(
        IDS.iter()
            .all(|&id| net.raft(id).view() == 1 && net.raft(id).is_active())
    );
    // Node 3 accepts (and prepares) a batch that does not commit.
    net.ignore("Commit");
    net.propose(2, b"x").expect("propose");
    net.recover();
    let st = net.remove(3).expect("node 3").crash();
    assert_eq!(st.hard_state.term, 1);
    let node = MemNode::start(st, |init| Pbft::new(cfg(3), init)).expect("restart");
    assert_eq!(node.engine().view(), 1, "the view survives");
    assert!(
        !node.engine().is_active(),
        "until it sees the new view again"
    );
    net.insert(node);
    // It asks for the new view and re-enters it.
    net.tick(3, 2);
    assert!(net.raft(3).is_active());
    // A primary equivocating on the batch it accepted before the crash.
    let other = pre_prepare(2, 1, 1, vec![request(4, 1, "y")]);
    let r = net.raft_mut(3);
    r.step(Message {
        view: 1,
        ..msg(2, 3, MessageKind::PrePrepare(other))
    })
    .expect("dropped");
    assert_eq!(r.stats().conflicting, 1);
    assert_eq!(
        prepares_sent(r),
        0,
        "no PREPARE contradicting the one before"
    );
    // The batch it did accept still commits.
    net.tick_all();
    net.tick_all();
    assert_eq!(applied(&net, 3), vec![(1, b"x".to_vec())]);
}

#[test]
fn a_lagging_replica_catches_up_with_committed_batches() {
    let mut net = group();
    net.isolate(4);
    for v in ["a", "b", "c"] {
        net.propose(1, v.as_bytes()).expect("propose");
    }
    assert!(net.node(4).applied().is_empty());
    net.recover();
    net.propose(2, b"d").expect("propose");
    for _ in 0..3 {
        net.tick_all();
    }
    assert_eq!(applied(&net, 4), applied(&net, 1));
    assert_eq!(net.node(4).applied().len(), 4);
}

#[test]
fn a_replica_behind_the_stable_checkpoint_installs_a_snapshot() {
    let mut net = group();
    net.isolate(4);
    for i in 0..9 {
        net.propose(1, format!("v{i}").as_bytes()).expect("propose");
    }
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).stable_checkpoint(), 8);
        net.node_mut(id)
            .snapshot_and_compact_at(8)
            .expect("compact");
    }
    net.recover();
    net.propose(2, b"last").expect("propose");
    for _ in 0..4 {
        net.tick_all();
    }
    let r = net.raft(4);
    assert_eq!(r.snapshot_meta().index, 8, "installed the snapshot");
    assert_eq!(r.stable_checkpoint(), 8);
    assert_eq!(r.commit_index(), 10);
    assert_eq!(applied(&net, 4), applied(&net, 1));
}

#[test]
fn a_read_is_answered_at_its_sequence_number() {
    let mut net = group();
    net.propose(1, b"a").expect("propose");
    net.raft_mut(3).read_index(b"r".to_vec()).expect("read");
    net.stabilize();
    let rs = net.node(3).read_states();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].index, 2);
    assert_eq!(rs[0].ctx, b"r".to_vec());
    // The read executes as a null request: nothing applied.
    assert_eq!(applied(&net, 3), vec![(1, b"a".to_vec())]);
}

#[test]
fn ed25519_signs_and_verifies_across_the_group() {
    let seeds: Vec<[u8; 32]> = (1..=4u8).map(|i| [i; 32]).collect();
    let group: std::collections::BTreeMap<NodeId, [u8; 32]> = (1..=4u64)
        .zip(seeds.iter().map(Ed25519::public_key))
        .collect();
    let mut net = Network::with_engines(&IDS, |id, init| {
        let c = Ed25519::new(id, &seeds[id as usize - 1], &group).expect("keys");
        Pbft::new(
            Config {
                checkpoint_interval: 4,
                window: 8,
                ..Config::new(id, Arc::new(c))
            },
            init,
        )
    });
    net.propose(2, b"signed").expect("propose");
    for id in IDS {
        assert_eq!(applied(&net, id), vec![(1, b"signed".to_vec())]);
    }
    // A key set without this node's own key is refused.
    assert!(Ed25519::new(5, &[5; 32], &group).is_err());
    // Another node's signature does not verify as node 1's.
    let c2 = Ed25519::new(2, &seeds[1], &group).expect("keys");
    let sig = c2.sign(b"m");
    assert!(c2.verify(2, b"m", &sig));
    assert!(!c2.verify(1, b"m", &sig));
}

/// Regression (found by the simulation): a replica restarted before its
/// request executed took the request's timestamp again for its next
/// proposal, which every replica then dropped as a duplicate.
#[test]
fn a_restarted_replica_does_not_reuse_the_timestamp_of_a_request_sent_before() {
    let mut net = group();
    for id in [1, 2, 3] {
        net.cut_one_way(id, 4);
    }
    net.raft_mut(4).propose(b"x".to_vec()).expect("propose");
    net.stabilize();
    assert_eq!(applied(&net, 1), vec![(1, b"x".to_vec())]);
    assert!(net.node(4).applied().is_empty());
    let st = net.remove(4).expect("node 4").crash();
    let node = MemNode::start(st, |init| Pbft::new(cfg(4), init)).expect("restart");
    net.insert(node);
    net.recover();
    net.propose(1, b"z").expect("propose");
    for _ in 0..3 {
        net.tick_all();
    }
    assert_eq!(net.node(4).applied().len(), 2, "caught up");
    net.propose(4, b"y").expect("propose");
    for _ in 0..3 {
        net.tick_all();
    }
    for id in IDS {
        assert_eq!(
            net.node(id).applied().last(),
            Some(&(3, b"y".to_vec())),
            "node {id}"
        );
    }
}

/// Regression (found by the simulation): replicas restarted in a view whose
/// NEW-VIEW never came waited for it forever, without a view change of
/// their own, while the replica that had moved on waited for them.
#[test]
fn replicas_restarted_in_a_view_that_never_formed_move_on() {
    let mut net = group();
    net.isolate(1);
    net.ignore("NewView");
    for id in [2, 3, 4] {
        net.raft_mut(id).campaign();
    }
    net.stabilize();
    // Node 4 gives up on view 1 (a quorum moved there) and moves to view 2.
    net.tick(4, 20);
    assert_eq!(net.raft(4).view(), 2);
    for id in [2, 3] {
        assert_eq!(net.raft(id).view(), 1);
        let st = net.remove(id).expect("node").crash();
        let node = MemNode::start(st, |init| Pbft::new(cfg(id), init)).expect("restart");
        net.insert(node);
    }
    net.recover();
    net.isolate(1);
    for _ in 0..60 {
        net.tick_all();
    }
    for id in [2, 3, 4] {
        assert!(net.raft(id).is_active(), "node {id} entered a view");
        assert_eq!(net.raft(id).view(), net.raft(2).view());
    }
    net.propose(2, b"after").expect("propose");
    for id in [2, 3, 4] {
        assert_eq!(applied(&net, id), vec![(1, b"after".to_vec())], "node {id}");
    }
}

/// Regression (found by the simulation): a replica cut off alone kept
/// timing out through the views, so far ahead that it could never rejoin;
/// now it waits in the first view change until a quorum joins it.
#[test]
fn a_replica_cut_off_alone_does_not_run_ahead_through_the_views() {
    let mut net = group();
    net.isolate(4);
    net.raft_mut(4).propose(b"lost".to_vec()).expect("propose");
    for _ in 0..400 {
        net.tick(4, 1);
    }
    assert_eq!(net.raft(4).view(), 1, "waits in view 1");
    assert!(!net.raft(4).is_active());
    net.recover();
    net.propose(1, b"a").expect("propose");
    for _ in 0..40 {
        net.tick_all();
    }
    // The others execute node 4's request (retransmitted) in view 0 and
    // stay there; node 4 waits in view 1 for a quorum to join it and
    // meanwhile catches up with the committed batches.
    for id in IDS {
        assert_eq!(net.node(id).applied().len(), 2, "node {id}");
        assert_eq!(applied(&net, id), applied(&net, 1), "node {id}");
    }
    assert_eq!(net.raft(1).view(), 0);
    assert_eq!(net.raft(4).view(), 1);
}

/// Regression (found by the simulation): replicas restarted after executing
/// had lost the COMMITs of what they executed, so none could hand a
/// replica behind the committed batches it missed.
#[test]
fn restarted_replicas_still_hand_committed_batches_to_one_behind() {
    let mut net = group();
    net.isolate(4);
    for v in ["a", "b", "c"] {
        net.propose(1, v.as_bytes()).expect("propose");
    }
    for id in [1, 2, 3] {
        let st = net.remove(id).expect("node").crash();
        let node = MemNode::start(st, |init| Pbft::new(cfg(id), init)).expect("restart");
        net.insert(node);
    }
    net.recover();
    net.propose(2, b"d").expect("propose");
    for _ in 0..6 {
        net.tick_all();
    }
    assert_eq!(applied(&net, 4), applied(&net, 2));
    assert_eq!(net.node(4).applied().len(), 4);
}

/// Regression (found by the simulation): a replica that learned a stable
/// checkpoint before executing up to it forgot it on restart, so its low
/// watermark went back and its VIEW-CHANGEs, carrying certificates above
/// the window of that older checkpoint, were refused by everyone.
#[test]
fn a_restart_keeps_a_stable_checkpoint_not_yet_executed_to() {
    let mut node =
        MemNode::start(MemStorage::bootstrap(&IDS), |init| Pbft::new(cfg(4), init)).expect("start");
    for signer in [1, 2, 3] {
        let vote = Signed::sign(
            crypto(signer).as_ref(),
            signer,
            CheckpointVote {
                n: 4,
                digest: [7; 32],
            },
        );
        node.step(Envelope {
            msg: msg(signer, 4, MessageKind::Checkpoint(vote)),
            image: None,
        })
        .expect("step");
    }
    node.handle_ready();
    assert_eq!(node.engine().stable_checkpoint(), 4);
    assert_eq!(node.engine().commit_index(), 0, "behind it");
    let node = MemNode::start(node.crash(), |init| Pbft::new(cfg(4), init)).expect("restart");
    assert_eq!(node.engine().stable_checkpoint(), 4);
    assert_eq!(node.engine().stable_proof().votes.len(), 3);
}

/// Regression (found by the simulation): a replica that missed a NEW-VIEW
/// (here the old primary, cut off during the view change) asked for it,
/// but refused it from anyone but the new primary, so the peer it asked
/// could not hand it on.
#[test]
fn a_replica_that_missed_a_new_view_takes_it_from_any_member() {
    let mut net = group();
    net.isolate(1);
    for id in [2, 3, 4] {
        net.raft_mut(id).campaign();
    }
    net.stabilize();
    assert!(net.raft(2).is_active() && net.raft(2).view() == 1);
    net.recover();
    net.propose(3, b"x").expect("propose");
    assert_eq!(net.raft(1).view(), 0, "it missed the view change");
    for _ in 0..3 {
        net.tick_all();
    }
    assert_eq!(net.raft(1).view(), 1);
    assert!(net.raft(1).is_active());
    assert_eq!(applied(&net, 1), vec![(1, b"x".to_vec())]);
}

/// A backup that missed the NEW-VIEW learns of the later view from the
/// signed messages it drops, and asks for it before its request timer
/// would have told it.
#[test]
fn a_backup_that_missed_a_new_view_asks_for_it_at_once() {
    let mut net = group();
    net.isolate(4);
    for id in [1, 2, 3] {
        net.raft_mut(id).campaign();
    }
    net.stabilize();
    assert!(net.raft(2).is_active() && net.raft(2).view() == 1);
    net.recover();
    net.propose(3, b"x").expect("propose");
    assert_eq!(net.raft(4).view(), 0);
    for _ in 0..3 {
        net.tick_all();
    }
    assert_eq!(net.raft(4).view(), 1);
    assert!(net.raft(4).is_active());
    assert_eq!(applied(&net, 4), vec![(1, b"x".to_vec())]);
}

/// Regression (found by the simulation): a replica restarted before its
/// request executed proposed again under the same timestamp before it had
/// caught up; the group dropped the new request as a duplicate, and the
/// snapshot the replica then installed counted the timestamp as executed,
/// so the replica gave its request up. The at-most-once table now tells
/// which request executed under a timestamp.
#[test]
fn a_request_whose_timestamp_an_earlier_one_took_is_proposed_again_after_a_snapshot() {
    let mut net = group();
    for id in [1, 2, 3] {
        net.cut_one_way(id, 4);
    }
    net.raft_mut(4).propose(b"x".to_vec()).expect("propose");
    net.stabilize();
    for v in ["a", "b", "c"] {
        net.propose(1, v.as_bytes()).expect("propose");
    }
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).stable_checkpoint(), 4);
        net.node_mut(id)
            .snapshot_and_compact_at(4)
            .expect("compact");
    }
    let st = net.remove(4).expect("node 4").crash();
    let node = MemNode::start(st, |init| Pbft::new(cfg(4), init)).expect("restart");
    net.insert(node);
    net.recover();
    // Proposed before node 4 knows that its timestamp 1 was taken.
    net.propose(4, b"y").expect("propose");
    net.propose(1, b"z").expect("propose");
    for _ in 0..10 {
        net.tick_all();
    }
    assert_eq!(
        net.raft(4).snapshot_meta().index,
        4,
        "caught up by snapshot"
    );
    for id in IDS {
        let values: Vec<Vec<u8>> = net
            .node(id)
            .applied()
            .iter()
            .map(|(_, d)| d.clone())
            .collect();
        assert!(values.contains(&b"y".to_vec()), "node {id}: {values:?}");
    }
}

/// Regression (found by the simulation): replicas restarted after
/// executing past a checkpoint no longer retransmitted their CHECKPOINT, so
/// when the first ones were lost the checkpoint never became stable and the
/// watermark window filled up for good.
#[test]
fn restarted_replicas_retransmit_their_checkpoint_until_it_is_stable() {
    let mut net = group();
    net.ignore("Checkpoint");
    for v in ["a", "b", "c", "d"] {
        net.propose(1, v.as_bytes()).expect("propose");
    }
    for id in IDS {
        assert_eq!(net.raft(id).commit_index(), 4);
        assert_eq!(net.raft(id).stable_checkpoint(), 0);
        let st = net.remove(id).expect("node").crash();
        let node = MemNode::start(st, |init| Pbft::new(cfg(id), init)).expect("restart");
        net.insert(node);
    }
    net.recover();
    for _ in 0..3 {
        net.tick_all();
    }
    for id in IDS {
        assert_eq!(net.raft(id).stable_checkpoint(), 4, "node {id}");
    }
}

/// The PRE-PREPAREs signed by `primary` in `view` among the delivered
/// messages, as (first, last, digest), deduplicated.
fn pre_prepares_of(net: &Network<Pbft>, primary: NodeId, view: u64) -> Vec<(u64, u64, [u8; 32])> {
    let mut out: Vec<(u64, u64, [u8; 32])> = Vec::new();
    for m in net.delivered() {
        if let MessageKind::PrePrepare(pp) = &m.kind
            && pp.signer == primary
            && pp.body.view == view
        {
            let k = (pp.body.first, pp.body.last(), pp.body.digest);
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

/// A primary of a view after 0 that restarts re-enters its view through
/// the NEW-VIEW a peer hands it; it must go on numbering after the batches
/// it pre-prepared before the crash, not from the NEW-VIEW's max-s (that
/// would sign a second batch for sequence numbers it already assigned: an
/// equivocation by a correct primary, which f Byzantine backups turn into
/// two prepared certificates of one view for one sequence number).
#[test]
fn a_restarted_primary_does_not_pre_prepare_a_sequence_number_twice() {
    let mut net = group();
    for id in IDS {
        net.raft_mut(id).campaign();
    }
    net.stabilize();
    assert_eq!(net.raft(2).role(), Role::Leader);
    // Node 2, primary of view 1, pre-prepares "x" at 1; it does not commit.
    net.ignore("Commit");
    net.propose(2, b"x").expect("propose");
    net.recover();
    let st = net.remove(2).expect("node 2").crash();
    let node = MemNode::start(st, |init| Pbft::new(cfg(2), init)).expect("restart");
    net.insert(node);
    // It asks for its view's NEW-VIEW and re-enters view 1 as primary.
    net.tick(2, 2);
    assert!(net.raft(2).is_active());
    assert_eq!(net.raft(2).role(), Role::Leader);
    net.propose(2, b"y").expect("propose");
    let pps = pre_prepares_of(&net, 2, 1);
    for (i, a) in pps.iter().enumerate() {
        for b in &pps[i + 1..] {
            assert!(
                a.1 < b.0 || b.1 < a.0,
                "node 2 pre-prepared overlapping batches in view 1: {a:?} and {b:?}"
            );
        }
    }
    for _ in 0..3 {
        net.tick_all();
    }
    for id in IDS {
        assert_eq!(
            applied(&net, id),
            vec![(1, b"x".to_vec()), (2, b"y".to_vec())],
            "node {id}"
        );
    }
}

/// A member's request with a timestamp near `u64::MAX` (its own signature,
/// so any Byzantine member can send one) must be dropped or ordered, not
/// overflow the at-most-once window arithmetic.
#[test]
fn a_request_timestamp_near_the_maximum_does_not_panic() {
    let mut net = group();
    net.propose(4, b"a").expect("propose");
    assert_eq!(applied(&net, 1), vec![(1, b"a".to_vec())]);
    let r = request(4, u64::MAX - 1, "huge");
    net.raft_mut(1)
        .step(msg(4, 1, MessageKind::Request(r.clone())))
        .expect("step");
    for to in [2, 3] {
        net.raft_mut(to)
            .step(msg(4, to, MessageKind::Request(r.clone())))
            .expect("step");
    }
    net.stabilize();
    for _ in 0..3 {
        net.tick_all();
    }
    // Executed once (a Byzantine primary may also order it): then later
    // requests of other clients still execute everywhere.
    net.propose(3, b"b").expect("propose");
    for id in [1, 2, 3] {
        assert_eq!(
            net.node(id).applied().last().map(|e| e.1.clone()),
            Some(b"b".to_vec()),
            "node {id}"
        );
    }
}

/// A replica that learns a checkpoint is stable (from the others'
/// CHECKPOINTs or a `Stable` proof) before it executes up to it has no
/// state for it yet; once it executes there, the state is the stable one
/// and the log can be compacted at it. Without that, a replica that is
/// always a little behind never compacts.
#[test]
fn a_stable_checkpoint_adopted_before_executing_becomes_compactable() {
    let mut net = group();
    net.isolate(4);
    for i in 0..4 {
        net.propose(1 + i % 3, format!("v{i}").as_bytes())
            .expect("propose");
    }
    assert_eq!(net.raft(1).stable_checkpoint(), 4);
    let proof = net.raft(1).stable_proof().clone();
    net.raft_mut(4)
        .step(msg(1, 4, MessageKind::Stable(proof)))
        .expect("step");
    net.recover();
    net.stabilize();
    assert_eq!(net.raft(4).stable_checkpoint(), 4);
    for _ in 0..4 {
        net.tick_all();
    }
    assert_eq!(net.raft(4).commit_index(), 4, "caught up");
    let meta = net
        .node_mut(4)
        .snapshot_and_compact()
        .expect("compact at the stable checkpoint it executed to");
    assert_eq!(meta.index, 4);
}

/// A Byzantine member that sends its signed request to the backups only
/// (never to the primary) must not be able to force a view change: a
/// backup hands a request it has not seen ordered to the primary (as in
/// PBFT), so a correct primary orders it before the backups' timers run out.
#[test]
fn a_request_withheld_from_the_primary_does_not_force_a_view_change() {
    let mut net = group();
    net.propose(1, b"a").expect("propose");
    let r = request(4, 1, "sneaky");
    for to in [2, 3] {
        net.raft_mut(to)
            .step(msg(4, to, MessageKind::Request(r.clone())))
            .expect("step");
    }
    net.stabilize();
    // The primary lives (it signs signs of life): only the request timer
    // could move the backups.
    for _ in 0..25 {
        net.tick(1, 1);
        net.tick(2, 1);
        net.tick(3, 1);
    }
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).view(), 0, "node {id} stays in view 0");
        assert_eq!(
            net.node(id).applied().last(),
            Some(&(2, b"sneaky".to_vec())),
            "node {id}"
        );
    }
}

/// The recipients of the messages of `kind` (its variant's name) in `msgs`.
fn recipients(msgs: &[Message], kind: &str) -> Vec<NodeId> {
    let mut to: Vec<NodeId> = msgs
        .iter()
        .filter(|m| format!("{:?}", m.kind).starts_with(kind))
        .map(|m| m.to)
        .collect();
    to.sort_unstable();
    to.dedup();
    to
}

/// Regression (simulation seed 104138): a backup whose request timer
/// expired moved to view 1 and, in the same tick, retransmitted its
/// VIEW-CHANGE in the ready's `messages`, ahead of the view's persisting.
/// It crashed before persisting, restarted in view 0, and prepared and
/// committed a request there at 12 — while the primary of view 1 counted
/// its old VIEW-CHANGE (without that request) in a NEW-VIEW with the
/// Byzantine primary's, which hid it: 12 went to another request, and two
/// correct replicas executed different requests at 12.
#[test]
fn a_view_change_leaves_only_once_its_view_is_durable() {
    let cfg2 = || Config {
        resend_tick: 1,
        ..cfg(2)
    };
    let mut node =
        MemNode::start(MemStorage::bootstrap(&IDS), |init| Pbft::new(cfg2(), init)).expect("start");
    let req = msg(3, 2, MessageKind::Request(request(3, 1, "x")));
    node.step(Envelope {
        msg: req,
        image: None,
    })
    .expect("step");
    node.handle_ready();
    for _ in 0..100 {
        node.engine_mut().tick();
        if node.engine().view() == 1 {
            break;
        }
        node.handle_ready();
    }
    assert_eq!(node.engine().view(), 1, "the request timer moves it on");
    let rd = node.engine_mut().ready();
    assert_eq!(rd.hard_state.map(|hs| hs.term), Some(1));
    assert_eq!(
        recipients(&rd.messages, "ViewChange"),
        Vec::<NodeId>::new(),
        "no VIEW-CHANGE before view 1 is durable"
    );
    assert_eq!(
        recipients(&rd.persisted_messages, "ViewChange"),
        vec![1, 3, 4]
    );
    // A crash before persisting undoes the move: the replica is back in
    // view 0, where it may still vote — so no VIEW-CHANGE for view 1 may
    // have left.
    let node = MemNode::start(node.crash(), |init| Pbft::new(cfg2(), init)).expect("restart");
    assert_eq!(node.engine().view(), 0);
}

/// The same rule for the normal case: a PREPARE retransmitted by a tick
/// before the ready that persists its pre-prepare waits for it.
#[test]
fn a_prepare_retransmitted_before_its_record_is_durable_waits_for_it() {
    let mut r = Pbft::new(
        Config {
            resend_tick: 1,
            ..cfg(2)
        },
        InitialState::bootstrap(IDS),
    )
    .expect("config");
    let pp = pre_prepare(1, 0, 1, vec![request(3, 1, "x")]);
    r.step(msg(1, 2, MessageKind::PrePrepare(pp)))
        .expect("step");
    r.tick();
    let rd = r.ready();
    assert!(rd.entries.iter().any(|e| e.index == 1), "the record");
    assert_eq!(recipients(&rd.messages, "Prepare"), Vec::<NodeId>::new());
    assert_eq!(recipients(&rd.persisted_messages, "Prepare"), vec![1, 3, 4]);
}

/// A prepared certificate for `pp` with PREPAREs signed by `backups`.
fn cert(pp: &Signed<PrePrepare>, backups: &[NodeId]) -> PreparedCert {
    let b = &pp.body;
    let prepares = backups
        .iter()
        .map(|&id| {
            Signed::sign(
                crypto(id).as_ref(),
                id,
                Vote {
                    phase: Phase::Prepare,
                    view: b.view,
                    first: b.first,
                    last: b.last(),
                    digest: b.digest,
                },
            )
        })
        .collect();
    PreparedCert {
        pre_prepare: pp.clone(),
        prepares,
    }
}

/// A VIEW-CHANGE of `from` to `view` from the genesis checkpoint.
fn view_change(from: NodeId, view: u64, prepared: Vec<PreparedCert>) -> Signed<ViewChange> {
    Signed::sign(
        crypto(from).as_ref(),
        from,
        ViewChange {
            view,
            checkpoint: CheckpointProof {
                n: 0,
                digest: CheckpointState::default().digest(),
                votes: Vec::new(),
            },
            prepared,
        },
    )
}

/// A sign of life from `from` in `view`: the primary of the view keeps a
/// replica ticked alone from starting a view change.
fn alive(from: NodeId, to: NodeId, view: u64) -> Message {
    let a = Alive { view, executed: 0 };
    msg(
        from,
        to,
        MessageKind::Alive(Signed::sign(crypto(from).as_ref(), from, a)),
    )
}

fn fetches_sent(r: &mut Pbft) -> usize {
    let rd = r.ready();
    r.advance();
    rd.messages
        .iter()
        .chain(rd.persisted_messages.iter())
        .filter(|m| matches!(m.kind, MessageKind::Fetch { .. }))
        .count()
}

/// A VIEW-CHANGE may not carry one valid certificate over and over (each
/// would cost a signature check per PREPARE): more than one certificate
/// per sequence number and view, or more than L, is refused before any
/// signature is verified.
#[test]
fn a_view_change_repeating_a_certificate_is_refused_before_its_signatures() {
    let mut r = replica(2);
    let pp = pre_prepare(1, 0, 1, vec![request(3, 1, "x")]);
    let c = cert(&pp, &[3, 4]);
    let repeated = view_change(4, 1, vec![c.clone(), c.clone(), c.clone()]);
    r.step(msg(4, 2, MessageKind::ViewChange(repeated)))
        .expect("dropped");
    assert_eq!(r.stats().invalid_view_change, 1);
    // Its outer signature broken too: the shape is what refuses it.
    let mut forged = view_change(4, 1, vec![c.clone(), c.clone()]);
    forged.signer = 3;
    r.step(msg(4, 2, MessageKind::ViewChange(forged)))
        .expect("dropped");
    assert_eq!(r.stats().invalid_view_change, 2);
    assert_eq!(r.stats().bad_signature, 0, "refused before verifying");
    // More than L certificates, each for another sequence number.
    let many: Vec<PreparedCert> = (1..=9)
        .map(|n| cert(&pre_prepare(1, 0, n, vec![request(3, n, "x")]), &[3, 4]))
        .collect();
    r.step(msg(4, 2, MessageKind::ViewChange(view_change(4, 1, many))))
        .expect("dropped");
    assert_eq!(r.stats().invalid_view_change, 3);
    // The same certificate once is a valid view change.
    r.step(msg(
        4,
        2,
        MessageKind::ViewChange(view_change(4, 1, vec![c])),
    ))
    .expect("accepted");
    assert_eq!(r.stats().invalid_view_change, 3);
    assert_eq!(r.stats().bad_signature, 0);
}

/// One signed message of a far later view made a replica send a Fetch
/// every resend tick forever: it now asks every peer once, then forgets
/// the view, and while such messages keep coming asks only now and then.
#[test]
fn a_message_of_a_far_later_view_does_not_make_a_replica_fetch_forever() {
    let mut r = replica(2);
    let vote = |view: u64| {
        Signed::sign(
            crypto(3).as_ref(),
            3,
            Vote {
                phase: Phase::Commit,
                view,
                first: 1,
                last: 1,
                digest: [7; 32],
            },
        )
    };
    r.step(msg(3, 2, MessageKind::Commit(vote(1_000_000))))
        .expect("step");
    let mut fetches = 0;
    for _ in 0..400 {
        r.step(alive(1, 2, 0)).expect("step");
        r.tick();
        fetches += fetches_sent(&mut r);
    }
    assert_eq!(fetches, 3, "one fetch to each peer, then it gives up");
    assert_eq!(r.stats().later_view_given_up, 1);
    // The member keeps signing messages of later views: fetches are
    // rate-limited (resend every 2 ticks, one in 16 resends).
    let mut fetches = 0;
    for t in 0..640u64 {
        r.step(msg(3, 2, MessageKind::Commit(vote(1_000_000 + t))))
            .expect("step");
        r.step(alive(1, 2, 0)).expect("step");
        r.tick();
        fetches += fetches_sent(&mut r);
    }
    assert!(fetches <= 320 / 16, "{fetches} fetches in 320 resends");
    assert_eq!(r.view(), 0);
    assert!(r.is_active());
}

/// Two valid prepared certificates of one view for different batches at
/// one sequence number need f+1 Byzantine replicas; a NEW-VIEW whose
/// VIEW-CHANGEs carry them is refused and counted rather than resolved by
/// picking the lower digest.
#[test]
fn a_new_view_with_two_certificates_of_one_view_for_one_sequence_number_is_refused() {
    let a = pre_prepare(1, 0, 1, vec![request(3, 1, "x")]);
    let b = pre_prepare(1, 0, 1, vec![request(3, 1, "y")]);
    let vcs = vec![
        view_change(2, 1, vec![cert(&a, &[2, 3])]),
        view_change(3, 1, vec![cert(&b, &[3, 4])]),
        view_change(4, 1, vec![]),
    ];
    assert_eq!(conflicting_certificates(&vcs), Some(1));
    assert!(compute_new_view(&vcs).1.is_some(), "a batch");
    let nv = new_view_as_computed(2, 1, vcs);
    let mut r = replica(4);
    r.step(msg(2, 4, MessageKind::NewView(nv)))
        .expect("dropped");
    assert_eq!(r.stats().conflicting_certificates, 1);
    assert_eq!(r.stats().invalid_new_view, 1);
    assert_eq!(r.view(), 0, "does not enter view 1");
}

/// Seed 384997: the primary of view 0 restarted after the others had moved
/// to view 1; the NEW-VIEWs its fetches brought were lost, so it forgot
/// the later view, and once the group's traffic stopped nothing made it
/// ask again (a primary runs no request timer). A later view that f+1
/// members signed messages in is vouched for by a correct replica: the
/// replica keeps asking (one peer per resend, without leaving its view)
/// until it enters that view, and then stops.
#[test]
fn a_later_view_that_f_plus_1_members_sign_in_is_fetched_until_entered() {
    let mut r = replica(1);
    let vote = |from: NodeId| {
        Signed::sign(
            crypto(from).as_ref(),
            from,
            Vote {
                phase: Phase::Commit,
                view: 1,
                first: 1,
                last: 1,
                digest: [7; 32],
            },
        )
    };
    for from in [3, 4] {
        r.step(msg(from, 1, MessageKind::Commit(vote(from))))
            .expect("step");
    }
    // Every answer lost: it goes on asking, round the peers.
    let mut fetched = Vec::new();
    for _ in 0..400 {
        r.tick();
        let rd = r.ready();
        r.advance();
        fetched.extend(
            rd.messages
                .iter()
                .chain(rd.persisted_messages.iter())
                .filter(|m| matches!(m.kind, MessageKind::Fetch { .. }))
                .map(|m| m.to),
        );
    }
    assert_eq!(fetched.len(), 200, "one fetch every resend (2 ticks)");
    for peer in [2, 3, 4] {
        assert!(fetched.iter().filter(|&&to| to == peer).count() >= 60);
    }
    assert_eq!(r.stats().later_view_given_up, 0);
    assert_eq!(r.view(), 0, "it asks; it does not leave its view");
    assert!(r.is_active());
    // A peer hands it view 1's NEW-VIEW: it enters the view and stops.
    let vcs = vec![
        view_change(2, 1, vec![]),
        view_change(3, 1, vec![]),
        view_change(4, 1, vec![]),
    ];
    let nv = new_view_as_computed(2, 1, vcs);
    r.step(msg(3, 1, MessageKind::NewView(nv))).expect("step");
    assert_eq!(r.view(), 1);
    assert!(r.is_active());
    let mut fetches = 0;
    for _ in 0..100 {
        r.step(alive(2, 1, 1)).expect("step");
        r.tick();
        fetches += fetches_sent(&mut r);
    }
    assert_eq!(fetches, 0, "in view 1 nothing is missing");
}

/// One member alone signing messages of a later view (it may be the only
/// Byzantine one) is not enough: the replica still gives the view up.
#[test]
fn a_later_view_only_one_member_signs_in_is_still_given_up() {
    let mut r = replica(1);
    for view in [1, 2, 3] {
        let vote = Signed::sign(
            crypto(3).as_ref(),
            3,
            Vote {
                phase: Phase::Commit,
                view,
                first: 1,
                last: 1,
                digest: [7; 32],
            },
        );
        r.step(msg(3, 1, MessageKind::Commit(vote))).expect("step");
    }
    let mut fetches = 0;
    for _ in 0..400 {
        r.tick();
        fetches += fetches_sent(&mut r);
    }
    assert_eq!(fetches, 3, "one fetch to each peer, then it gives up");
    assert_eq!(r.stats().later_view_given_up, 1);
    assert_eq!(r.view(), 0);
}

// ---- replies and commit certificates ------------------------------------

use consensus::pbft::certificate::{self, CertificateError, CommitCertificate};
use consensus::pbft::{MAX_REPLY_LEAVES, Replies, Reply, ReplyLeaf};
use std::collections::BTreeMap;

/// A group of four signing with Ed25519, and its public keys.
fn ed25519_group() -> (Network<Pbft>, BTreeMap<NodeId, [u8; 32]>) {
    let seeds: Vec<[u8; 32]> = (1..=4u8).map(|i| [i; 32]).collect();
    let keys: BTreeMap<NodeId, [u8; 32]> = (1..=4u64)
        .zip(seeds.iter().map(Ed25519::public_key))
        .collect();
    let k = keys.clone();
    let net = Network::with_engines(&IDS, move |id, init| {
        let c = Ed25519::new(id, &seeds[id as usize - 1], &k).expect("keys");
        Pbft::new(
            Config {
                checkpoint_interval: 4,
                window: 8,
                ..Config::new(id, Arc::new(c))
            },
            init,
        )
    });
    (net, keys)
}

/// The REPLY message `signer` signs for `client` over `leaves` (the root
/// computed from them, `first..=last` the leaves' range).
fn reply(signer: NodeId, client: NodeId, leaves: Vec<ReplyLeaf>) -> Replies {
    let hashes: Vec<_> = leaves.iter().map(|l| l.hash(client)).collect();
    let body = Reply {
        view: 0,
        client,
        first: leaves[0].n,
        last: leaves[leaves.len() - 1].n,
        root: certificate::merkle_root(&hashes).expect("a leaf"),
        count: leaves.len() as u64,
    };
    Replies {
        reply: Signed::sign(crypto(signer).as_ref(), signer, body),
        leaves,
    }
}

/// The leaf replica `id` signs for the request executed at `n` (its hash
/// chain now at `h_n`).
fn correct_leaf(net: &Network<Pbft>, id: NodeId, r: &Signed<Request>, n: u64) -> ReplyLeaf {
    let state = net.raft(id).executed_state();
    assert_eq!(state.n, n);
    ReplyLeaf {
        n,
        ts: r.body.ts,
        request: r.digest(),
        history: state.chain,
    }
}

/// The request replica `client` signed for its first proposal `data`.
fn first_request(client: NodeId, data: &[u8]) -> Signed<Request> {
    Signed::sign(
        crypto(client).as_ref(),
        client,
        Request {
            client,
            ts: 1,
            read: false,
            data: Bytes::copy_from_slice(data),
        },
    )
}

#[test]
fn a_commit_certificate_forms_from_f_plus_one_matching_replies_and_verifies() {
    let (mut net, keys) = ed25519_group();
    net.propose(2, b"write").expect("propose");
    let certs = net.node(2).certificates().to_vec();
    assert_eq!(certs.len(), 1, "one certificate for the one own request");
    assert_eq!(certs[0].index, 1);
    for id in [1, 3, 4] {
        assert!(
            net.node(id).certificates().is_empty(),
            "node {id} proposed nothing"
        );
    }
    let v = certificate::verify(&certs[0].bytes, &keys).expect("verifies");
    assert_eq!((v.index, v.client, v.ts), (1, 2, 1));
    assert_eq!(v.data.as_deref(), Some(&b"write"[..]));
    assert_eq!(v.faults, 1);
    assert_eq!(v.signers.len(), 2, "f+1 signers: {:?}", v.signers);
    assert_eq!(v.history, net.raft(1).executed_state().chain);
    assert!(v.matches_data(b"write") && !v.matches_data(b"other"));
    // Through the HTTP header and back.
    let header = certificate::to_header(&certs[0].bytes);
    assert!(
        !header.contains(['+', '/', '=']),
        "base64url without padding"
    );
    assert_eq!(
        certificate::from_header(&header).expect("decodes"),
        certs[0].bytes
    );
    assert_eq!(net.raft(2).stats().certificates, 1);
    assert_eq!(net.raft(2).awaiting_certificates(), 0);
}

#[test]
fn a_large_write_is_certified_by_its_length_and_digest_only() {
    let (mut net, keys) = ed25519_group();
    let big = vec![7u8; certificate::MAX_INLINE_DATA + 1];
    net.propose(3, &big).expect("propose");
    let cert = net.node(3).certificates()[0].clone();
    let v = certificate::verify(&cert.bytes, &keys).expect("verifies");
    assert_eq!(v.data, None);
    assert_eq!(v.data_len, big.len() as u64);
    assert!(v.matches_data(&big));
    // At the inline limit the header stays small (four members, f+1 = 2,
    // one leaf per reply: 2,236 bytes).
    net.propose(3, &big[1..]).expect("propose");
    let cert = net.node(3).certificates()[1].clone();
    let header = certificate::to_header(&cert.bytes);
    eprintln!("header at the inline limit: {} bytes", header.len());
    assert!(header.len() < 2300, "header of {} bytes", header.len());
}

#[test]
fn a_reply_with_a_wrong_history_or_digest_does_not_count() {
    let mut net = group();
    net.ignore("Reply");
    net.propose(2, b"x").expect("propose");
    assert!(net.node(2).certificates().is_empty(), "only its own reply");
    let r = first_request(2, b"x");
    let good = correct_leaf(&net, 3, &r, 1);
    // A Byzantine member vouches for another history, another for another
    // request under the same timestamp, another sequence number — each a
    // valid signature over the root of its wrong leaf.
    let forged = [
        (
            3,
            ReplyLeaf {
                history: [9; 32],
                ..good
            },
        ),
        (
            4,
            ReplyLeaf {
                request: [8; 32],
                ..good
            },
        ),
        (1, ReplyLeaf { n: 2, ..good }),
    ];
    for (from, leaf) in forged {
        let m = msg(from, 2, MessageKind::Reply(reply(from, 2, vec![leaf])));
        net.raft_mut(2).step(m).expect("step");
    }
    net.stabilize();
    assert!(net.node(2).certificates().is_empty());
    assert_eq!(net.raft(2).stats().bad_replies, 3);
    // One correct reply makes f+1 with its own.
    let m = msg(4, 2, MessageKind::Reply(reply(4, 2, vec![good])));
    net.raft_mut(2).step(m).expect("step");
    net.stabilize();
    let certs = net.node(2).certificates();
    assert_eq!(certs.len(), 1);
    let v = certificate::verify_with(&certs[0].bytes, &IDS, crypto(1).as_ref()).expect("valid");
    assert_eq!(v.signers, vec![2, 4]);
}

#[test]
fn replies_from_non_members_or_with_bad_signatures_are_dropped_and_counted() {
    let mut net = group();
    net.ignore("Reply");
    net.propose(2, b"x").expect("propose");
    let r = first_request(2, b"x");
    let good = correct_leaf(&net, 3, &r, 1);
    let before = *net.raft(2).stats();
    // A non-member.
    let m = msg(9, 2, MessageKind::Reply(reply(9, 2, vec![good])));
    net.raft_mut(2).step(m).expect("step");
    // Signed by another member than the sender.
    let m = msg(3, 2, MessageKind::Reply(reply(4, 2, vec![good])));
    net.raft_mut(2).step(m).expect("step");
    // A signature that does not verify.
    let mut bad = reply(3, 2, vec![good]);
    bad.reply.sig = Bytes::from_static(&[0; 32]);
    net.raft_mut(2)
        .step(msg(3, 2, MessageKind::Reply(bad)))
        .expect("step");
    // Not for an own request: another client's, and an unknown timestamp.
    let m = msg(3, 2, MessageKind::Reply(reply(3, 1, vec![good])));
    net.raft_mut(2).step(m).expect("step");
    let unknown = ReplyLeaf { ts: 5, ..good };
    let m = msg(3, 2, MessageKind::Reply(reply(3, 2, vec![unknown])));
    net.raft_mut(2).step(m).expect("step");
    net.stabilize();
    let after = *net.raft(2).stats();
    assert_eq!(after.not_member - before.not_member, 1);
    assert_eq!(after.bad_replies - before.bad_replies, 2);
    assert_eq!(after.stray_replies - before.stray_replies, 2);
    assert!(net.node(2).certificates().is_empty());
    assert_eq!(net.raft(2).awaiting_certificates(), 1);
}

#[test]
fn lost_replies_are_recovered_by_asking_again() {
    let mut net = group();
    net.ignore("Reply");
    net.propose(2, b"x").expect("propose");
    assert!(net.node(2).certificates().is_empty());
    net.recover();
    net.clear_delivered();
    // A resend round passes first (replies may be on their way), then the
    // client asks the members whose replies it lacks.
    let resend = net.raft(2).config().resend_tick;
    net.tick(2, 2 * resend);
    let asked: Vec<NodeId> = net
        .delivered()
        .iter()
        .filter(|m| matches!(m.kind, MessageKind::ReplyAsk { n: 1, ts: 1 }))
        .map(|m| m.to)
        .collect();
    assert_eq!(asked, vec![1, 3, 4]);
    let certs = net.node(2).certificates();
    assert_eq!(certs.len(), 1, "recovered");
    certificate::verify_with(&certs[0].bytes, &IDS, crypto(1).as_ref()).expect("valid");
    assert_eq!(net.raft(2).awaiting_certificates(), 0);
    // Nothing left to ask for.
    net.clear_delivered();
    net.tick(2, 4 * resend);
    assert!(
        !net.delivered()
            .iter()
            .any(|m| matches!(m.kind, MessageKind::ReplyAsk { .. }))
    );
}

#[test]
fn verify_rejects_what_is_not_a_commit_certificate() {
    let (mut net, keys) = ed25519_group();
    net.propose(2, b"write").expect("propose");
    let bytes = net.node(2).certificates()[0].bytes.clone();
    let doc: CommitCertificate = serde_json::from_slice(&bytes).expect("json");
    let check =
        |d: &CommitCertificate| certificate::verify(&serde_json::to_vec(d).expect("json"), &keys);
    check(&doc).expect("the original verifies");

    let mut d = doc.clone();
    d.signatures.pop();
    assert_eq!(
        check(&d),
        Err(CertificateError::TooFewSignatures { have: 1, need: 2 })
    );

    let mut d = doc.clone();
    d.signatures[1] = d.signatures[0].clone();
    assert_eq!(
        check(&d),
        Err(CertificateError::TooFewSignatures { have: 1, need: 2 }),
        "a duplicate signer counts once"
    );

    // The signatures are over the reply's fields and the root the leaf's
    // path leads to: another view or history is not what they signed, an
    // index outside the reply's range not what it covers.
    let mut d = doc.clone();
    d.index += 1;
    let first = d.signatures[0].node;
    assert_eq!(check(&d), Err(CertificateError::BadPath(first)));
    let mut d = doc.clone();
    d.signatures[1].view += 1;
    assert_eq!(
        check(&d),
        Err(CertificateError::BadSignature(d.signatures[1].node))
    );
    let mut d = doc.clone();
    d.history = "00".repeat(32);
    assert_eq!(check(&d), Err(CertificateError::BadSignature(first)));

    let mut d = doc.clone();
    d.signatures[0].node = 9;
    assert_eq!(check(&d), Err(CertificateError::UnknownMember(9)));

    // Each signer's reply covers this one request: a position not below
    // the count, a path of the wrong length for the tree, one too long to
    // read, another count or range than signed.
    let mut d = doc.clone();
    d.signatures[0].position = 1;
    assert_eq!(check(&d), Err(CertificateError::BadPath(first)));
    let mut d = doc.clone();
    d.signatures[0].path.push("00".repeat(32));
    assert_eq!(check(&d), Err(CertificateError::BadPath(first)));
    let mut d = doc.clone();
    d.signatures[0].path = vec!["00".repeat(32); certificate::MAX_PATH + 1];
    d.signatures[0].count = u64::MAX;
    assert_eq!(check(&d), Err(CertificateError::BadPath(first)));
    let mut d = doc.clone();
    d.signatures[0].count = 2;
    assert_eq!(check(&d), Err(CertificateError::BadPath(first)));
    let mut d = doc.clone();
    d.signatures[0].last += 1;
    assert_eq!(check(&d), Err(CertificateError::BadSignature(first)));
    let mut d = doc.clone();
    d.signatures[0].path = vec!["zz".repeat(32)];
    assert!(matches!(check(&d), Err(CertificateError::Malformed(_))));

    // Other data than the request digest names; another client or
    // timestamp for the same data.
    let mut d = doc.clone();
    d.data = Some("b3RoZXI=".into());
    assert_eq!(check(&d), Err(CertificateError::RequestDigestMismatch));
    let mut d = doc.clone();
    d.ts += 1;
    assert_eq!(check(&d), Err(CertificateError::RequestDigestMismatch));
    let mut d = doc.clone();
    d.request = "11".repeat(32);
    assert_eq!(check(&d), Err(CertificateError::RequestDigestMismatch));

    // Another group's keys; garbage.
    let mut other = keys.clone();
    other.insert(2, Ed25519::public_key(&[42; 32]));
    assert!(matches!(
        certificate::verify(&bytes, &other),
        Err(CertificateError::BadSignature(_))
    ));
    assert!(matches!(
        certificate::verify(b"{", &keys),
        Err(CertificateError::Malformed(_))
    ));
    assert!(matches!(
        certificate::from_header("not*base64"),
        Err(CertificateError::Malformed(_))
    ));
    assert_eq!(
        certificate::verify(&bytes, &BTreeMap::new()),
        Err(CertificateError::EmptyGroup)
    );
}

/// The new primary computes its NEW-VIEW from all q VIEW-CHANGEs, not from
/// its own: here only the other backups prepared "x" at 1 in view 0, and
/// the primary of view 1 (which never saw it) must still re-issue it.
#[test]
fn a_new_primary_reissues_a_request_only_other_replicas_prepared() {
    let x = pre_prepare(1, 0, 1, vec![request(3, 1, "x")]);
    let mut r = replica(2);
    r.campaign();
    assert_eq!(r.view(), 1);
    assert!(!r.is_active());
    let _ = r.ready();
    r.advance();
    for from in [3, 4] {
        let vc = view_change(from, 1, vec![cert(&x, &[3, 4])]);
        r.step(msg(from, 2, MessageKind::ViewChange(vc)))
            .expect("a valid view change");
    }
    assert!(r.is_active(), "the primary entered view 1");
    let rd = r.ready();
    r.advance();
    let nv = rd
        .messages
        .iter()
        .chain(rd.persisted_messages.iter())
        .find_map(|m| match &m.kind {
            MessageKind::NewView(nv) => Some(nv.clone()),
            _ => None,
        })
        .expect("a NEW-VIEW");
    assert_eq!(nv.body.view_changes.len(), 3);
    let pp = nv
        .body
        .pre_prepare
        .expect("the prepared request is re-issued");
    assert_eq!((pp.body.view, pp.body.first), (1, 1));
    let data: Vec<Option<Bytes>> = pp
        .body
        .requests
        .iter()
        .map(|r| r.as_ref().map(|r| r.body.data.clone()))
        .collect();
    assert_eq!(data, vec![Some(Bytes::from("x"))]);
}

#[test]
fn leaves_that_do_not_hash_to_the_signed_root_or_break_its_shape_are_refused_and_counted() {
    let mut net = group();
    net.ignore("Reply");
    net.propose(2, b"x").expect("propose");
    let r = first_request(2, b"x");
    let good = correct_leaf(&net, 3, &r, 1);
    let before = net.raft(2).stats().bad_replies;
    // Signed over one history, the leaf then rewritten to another (and to
    // the client's own, which would match): the root gives it away.
    let mut swapped = reply(
        3,
        2,
        vec![ReplyLeaf {
            history: [9; 32],
            ..good
        }],
    );
    swapped.leaves[0].history = good.history;
    // Shapes a correct replica never signs, each validly signed: a count
    // other than the leaves', a leaf outside first..=last, leaves out of
    // order, more leaves than a reply may cover.
    let other = ReplyLeaf {
        n: 3,
        ts: 9,
        ..good
    };
    let mut miscounted = reply(3, 2, vec![good]);
    miscounted.reply.body.count = 2;
    miscounted.reply = Signed::sign(crypto(3).as_ref(), 3, miscounted.reply.body);
    let mut outside = reply(3, 2, vec![good, other]);
    outside.reply.body.last = 2;
    outside.reply = Signed::sign(crypto(3).as_ref(), 3, outside.reply.body);
    let mut unordered = reply(3, 2, vec![other, good]);
    unordered.reply.body.first = 1;
    unordered.reply.body.last = 3;
    unordered.reply = Signed::sign(crypto(3).as_ref(), 3, unordered.reply.body);
    let many: Vec<ReplyLeaf> = (0..=MAX_REPLY_LEAVES as u64)
        .map(|i| ReplyLeaf { n: 1 + i, ..good })
        .collect();
    let too_many = reply(3, 2, many);
    let refused = [swapped, miscounted, outside, unordered, too_many];
    let count = refused.len() as u64;
    for m in refused {
        net.raft_mut(2)
            .step(msg(3, 2, MessageKind::Reply(m)))
            .expect("step");
    }
    net.stabilize();
    assert!(net.node(2).certificates().is_empty());
    assert_eq!(net.raft(2).stats().bad_replies - before, count);
    // The sender's correct reply still counts.
    net.raft_mut(2)
        .step(msg(3, 2, MessageKind::Reply(reply(3, 2, vec![good]))))
        .expect("step");
    net.stabilize();
    assert_eq!(net.node(2).certificates().len(), 1);
}

#[test]
fn a_certificate_verifies_when_its_signers_grouped_the_request_differently() {
    let (mut net, keys) = ed25519_group();
    net.ignore("Reply");
    // Two own requests, executed here one step each.
    net.propose(2, b"a").expect("propose");
    let h1 = correct_leaf(&net, 3, &request(2, 1, "a"), 1);
    net.propose(2, b"b").expect("propose");
    let h2 = correct_leaf(&net, 3, &request(2, 2, "b"), 2);
    assert!(net.node(2).certificates().is_empty());
    // Node 3 executed both in one step and signs one reply over both
    // leaves (Ed25519: the group's real keys).
    let seed = [3u8; 32];
    let signer = Ed25519::new(3, &seed, &keys).expect("keys");
    let leaves = vec![h1, h2];
    let hashes: Vec<_> = leaves.iter().map(|l| l.hash(2)).collect();
    let body = Reply {
        view: 0,
        client: 2,
        first: 1,
        last: 2,
        root: certificate::merkle_root(&hashes).expect("leaves"),
        count: 2,
    };
    let m = Replies {
        reply: Signed::sign(&signer, 3, body),
        leaves,
    };
    let before = *net.raft(2).stats();
    net.raft_mut(2)
        .step(msg(3, 2, MessageKind::Reply(m)))
        .expect("step");
    net.stabilize();
    let after = *net.raft(2).stats();
    assert_eq!(after.bad_replies, before.bad_replies);
    let certs = net.node(2).certificates().to_vec();
    assert_eq!(certs.len(), 2, "one reply certified both requests");
    for (i, c) in certs.iter().enumerate() {
        let v = certificate::verify(&c.bytes, &keys).expect("verifies");
        assert_eq!((v.index, v.signers.clone()), (i as u64 + 1, vec![2, 3]));
        let doc: CommitCertificate = serde_json::from_slice(&c.bytes).expect("json");
        let mine = doc.signatures.iter().find(|s| s.node == 2).expect("own");
        let theirs = doc.signatures.iter().find(|s| s.node == 3).expect("3's");
        assert_eq!((mine.count, mine.path.len()), (1, 0), "own: one leaf");
        assert_eq!(
            (theirs.first, theirs.last, theirs.count, theirs.position),
            (1, 2, 2, i as u64)
        );
        assert_eq!(theirs.path.len(), 1);
        // A tampered path or position no longer leads to the signed root.
        let mut d = doc.clone();
        let t = d.signatures.iter_mut().find(|s| s.node == 3).expect("3's");
        t.path[0] = "00".repeat(32);
        let bytes = serde_json::to_vec(&d).expect("json");
        assert_eq!(
            certificate::verify(&bytes, &keys),
            Err(CertificateError::BadSignature(3))
        );
        let mut d = doc.clone();
        let t = d.signatures.iter_mut().find(|s| s.node == 3).expect("3's");
        t.position = 1 - t.position;
        let bytes = serde_json::to_vec(&d).expect("json");
        assert_eq!(
            certificate::verify(&bytes, &keys),
            Err(CertificateError::BadSignature(3))
        );
    }
}

#[test]
fn merkle_paths_lead_every_leaf_to_the_root_and_nothing_else_does() {
    let mut rng = consensus::raft::SplitMix64::new(7);
    for count in 1..=17usize {
        let leaves: Vec<[u8; 32]> = (0..count)
            .map(|_| {
                let mut h = [0u8; 32];
                for c in h.chunks_mut(8) {
                    c.copy_from_slice(&rng.next_u64().to_be_bytes());
                }
                h
            })
            .collect();
        let levels = certificate::merkle_levels(&leaves);
        let root = certificate::merkle_root(&leaves).expect("a leaf");
        if count == 1 {
            assert_eq!(root, leaves[0], "one leaf is its own root");
        }
        let n = count as u64;
        for (p, leaf) in leaves.iter().enumerate() {
            let path = certificate::merkle_path(&levels, p);
            assert!(path.len() <= 5, "count {count}: path of {}", path.len());
            let pos = p as u64;
            assert_eq!(certificate::merkle_walk(*leaf, pos, n, &path), Some(root));
            // Another position, a tampered sibling, a missing or an extra
            // hash: not the root.
            for q in (0..n).filter(|&q| q != pos) {
                assert_ne!(certificate::merkle_walk(*leaf, q, n, &path), Some(root));
            }
            for i in 0..path.len() {
                let mut t = path.clone();
                t[i][0] ^= 1;
                assert_ne!(certificate::merkle_walk(*leaf, pos, n, &t), Some(root));
                let mut short = path.clone();
                short.remove(i);
                assert_eq!(certificate::merkle_walk(*leaf, pos, n, &short), None);
            }
            let mut long = path.clone();
            long.push(root);
            assert_eq!(certificate::merkle_walk(*leaf, pos, n, &long), None);
            assert_eq!(certificate::merkle_walk(*leaf, n, n, &path), None);
        }
    }
    // An odd node is carried up: of three leaves the third's path is the
    // hash of the first two.
    let l = [[1u8; 32], [2; 32], [3; 32]];
    let levels = certificate::merkle_levels(&l);
    assert_eq!(certificate::merkle_path(&levels, 2), vec![levels[1][0]]);
    assert_eq!(levels[1][1], l[2]);
    assert_eq!(certificate::merkle_root(&[]), None);
    assert_eq!(
        certificate::merkle_walk([0; 32], 0, 1, &vec![[0; 32]; certificate::MAX_PATH + 1]),
        None
    );
}

/// Builds a certificate document as a replica would: `members` signers,
/// each with a path of `path` hashes, at the inline data limit.
fn widest_certificate(members: usize, path: usize) -> Vec<u8> {
    use base64::Engine as _;
    let doc = CommitCertificate {
        version: certificate::VERSION,
        index: u32::MAX as u64,
        client: 7,
        ts: u32::MAX as u64,
        request: "ab".repeat(32),
        history: "cd".repeat(32),
        data_len: certificate::MAX_INLINE_DATA as u64,
        data: Some(
            base64::engine::general_purpose::STANDARD.encode(vec![0; certificate::MAX_INLINE_DATA]),
        ),
        signatures: (0..members as u64)
            .map(|node| certificate::SignatureEntry {
                node,
                view: 3,
                first: u32::MAX as u64 - 40,
                last: u32::MAX as u64 + 23,
                count: 64,
                position: 40,
                path: vec!["ef".repeat(32); path],
                sig: "01".repeat(64),
            })
            .collect(),
    };
    serde_json::to_vec(&doc).expect("json")
}

#[test]
fn the_certificate_header_stays_bounded_with_the_longest_paths() {
    // f+1 signers: 2 of 4, 3 of 7; a reply of 64 leaves has paths of 6.
    let four = certificate::to_header(&widest_certificate(2, 6)).len();
    let seven = certificate::to_header(&widest_certificate(3, 6)).len();
    let four_one = certificate::to_header(&widest_certificate(2, 0)).len();
    eprintln!("header: 4 members {four_one} (one leaf) / {four} (64 leaves); 7 members {seven}");
    // Well under the 8 KiB a header commonly may take.
    assert!(four_one < 2400, "4 members, one leaf: {four_one} bytes");
    assert!(four < 3500, "4 members: {four} bytes");
    assert!(seven < 4400, "7 members: {seven} bytes");
}

/// A replica's signature scheme that counts the REPLY signatures it checks.
#[derive(Debug)]
struct CountingReplies {
    inner: Arc<dyn Crypto>,
    checked: Arc<std::sync::atomic::AtomicU64>,
}

impl Crypto for CountingReplies {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.inner.sign(msg)
    }
    fn verify(&self, signer: NodeId, msg: &[u8], sig: &[u8]) -> bool {
        // The canonical bytes start with the body's tag: 7 is a REPLY.
        if msg.first() == Some(&7) {
            self.checked
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.verify(signer, msg, sig)
    }
}

#[test]
fn one_reply_covering_several_own_requests_costs_one_signature_check() {
    let checked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = checked.clone();
    let mut net = Network::with_engines(&IDS, move |id, init| {
        let c: Arc<dyn Crypto> = if id == 2 {
            Arc::new(CountingReplies {
                inner: crypto(id),
                checked: counter.clone(),
            })
        } else {
            crypto(id)
        };
        Pbft::new(
            Config {
                checkpoint_interval: 4,
                window: 8,
                ..Config::new(id, c)
            },
            init,
        )
    });
    net.ignore("Reply");
    net.propose(2, b"a").expect("propose");
    let l1 = correct_leaf(&net, 3, &request(2, 1, "a"), 1);
    net.propose(2, b"b").expect("propose");
    let l2 = correct_leaf(&net, 3, &request(2, 2, "b"), 2);
    net.propose(2, b"c").expect("propose");
    let l3 = correct_leaf(&net, 3, &request(2, 3, "c"), 3);
    let before = checked.load(std::sync::atomic::Ordering::SeqCst);
    net.raft_mut(2)
        .step(msg(3, 2, MessageKind::Reply(reply(3, 2, vec![l1, l2, l3]))))
        .expect("step");
    net.stabilize();
    assert_eq!(
        checked.load(std::sync::atomic::Ordering::SeqCst) - before,
        1,
        "one check for three leaves"
    );
    let certs = net.node(2).certificates().to_vec();
    assert_eq!(certs.len(), 3);
    for c in &certs {
        let v = certificate::verify_with(&c.bytes, &IDS, crypto(1).as_ref()).expect("valid");
        assert_eq!(v.signers, vec![2, 3]);
    }
    // The same REPLY again names no request still waiting: no check.
    net.raft_mut(2)
        .step(msg(3, 2, MessageKind::Reply(reply(3, 2, vec![l1, l2, l3]))))
        .expect("step");
    assert_eq!(
        checked.load(std::sync::atomic::Ordering::SeqCst) - before,
        1
    );
}

/// An idle group kept a dead primary: with no request waiting no timer ran,
/// so nothing replaced it until the next write. A live primary with nothing
/// to order signs a sign of life every resend round and keeps its view; a
/// dead one is replaced by the backups' idle timer, without any request.
#[test]
fn an_idle_group_replaces_a_dead_primary_without_any_request() {
    let mut net = group();
    net.propose(2, b"a").expect("propose");
    // Idle, primary alive: many request timeouts pass in view 0.
    for _ in 0..100 {
        net.tick_all();
    }
    for id in IDS {
        assert_eq!(net.raft(id).view(), 0, "node {id} keeps its live primary");
        assert_eq!(net.raft(id).stats().idle_view_changes, 0);
    }
    // The primary dies; nobody writes.
    net.isolate(1);
    let mut ticks = 0;
    while [2, 3, 4]
        .iter()
        .any(|&id| net.raft(id).view() == 0 || !net.raft(id).is_active())
    {
        ticks += 1;
        assert!(ticks <= 60, "no new primary within 60 ticks");
        for id in [2, 3, 4] {
            net.raft_mut(id).tick();
        }
        net.stabilize();
    }
    for id in [2, 3, 4] {
        assert_eq!(net.raft(id).view(), 1, "node {id}");
        assert_eq!(net.raft(id).leader(), Some(2));
        assert_eq!(net.raft(id).stats().idle_view_changes, 1);
    }
    assert!(ticks >= 20, "not before request_timeout ticks: {ticks}");
    // The new view orders at once.
    net.propose(3, b"b").expect("propose");
    for id in [2, 3, 4] {
        assert_eq!(applied(&net, id).last(), Some(&(2, b"b".to_vec())));
    }
}

/// The sign of life does not shield a primary that orders nothing: the
/// request timer still replaces it.
#[test]
fn a_primary_signing_signs_of_life_but_ordering_nothing_is_still_replaced() {
    let mut net = group();
    net.ignore("PrePrepare");
    net.propose(3, b"a").expect("propose");
    for _ in 0..30 {
        net.tick_all();
    }
    for id in [2, 3, 4] {
        assert!(net.raft(id).view() >= 1, "node {id} left view 0");
        assert_eq!(net.raft(id).stats().idle_view_changes, 0, "node {id}");
    }
    net.recover();
    for _ in 0..40 {
        net.tick_all();
    }
    for id in IDS {
        assert_eq!(applied(&net, id), vec![(1, b"a".to_vec())], "node {id}");
    }
}

/// Only the primary of the replica's view keeps its idle timer: signs of
/// life from another member, or from the primary for another view, do not.
#[test]
fn only_the_primary_of_the_view_keeps_a_backup_in_it() {
    let mut r = replica(2);
    for _ in 0..20 {
        r.step(alive(3, 2, 0)).expect("step");
        r.step(alive(1, 2, 7)).expect("step");
        r.tick();
    }
    assert_eq!(r.view(), 1, "silent primary replaced");
    assert!(!r.is_active());
    assert_eq!(r.stats().idle_view_changes, 1);
    // Waiting for a NEW-VIEW that does not come, it does not spin: without
    // a quorum of VIEW-CHANGEs it stays in view 1.
    for _ in 0..200 {
        r.tick();
    }
    assert_eq!(r.view(), 1);
    // A forged sign of life (signer not the sender) counts as a bad
    // signature and keeps nothing.
    let mut r = replica(3);
    let mut forged = alive(1, 3, 0);
    forged.from = 4;
    r.step(forged).expect("dropped");
    assert_eq!(r.stats().bad_signature, 1);
}

/// Every replica, not only the primary, reports which members it heard a
/// valid signed message from within the last `request_timeout` ticks — an
/// idle group included — and stops reporting one that went away.
#[test]
fn every_replica_reports_which_members_it_heard_from_recently() {
    let mut net = group();
    net.propose(1, b"a").expect("propose");
    for _ in 0..50 {
        net.tick_all();
    }
    for id in IDS {
        let st = net.raft(id).status();
        assert_eq!(st.progress.len(), 4, "node {id}");
        for (m, p) in &st.progress {
            assert!(p.recent_active && p.connected, "node {id} hears {m}");
            assert_eq!(p.matched, 1, "node {id} on {m}");
        }
    }
    net.isolate(3);
    for _ in 0..25 {
        for id in [1, 2, 4] {
            net.raft_mut(id).tick();
        }
        net.stabilize();
    }
    for id in [1, 2, 4] {
        let st = net.raft(id).status();
        for (&m, p) in &st.progress {
            assert_eq!(p.recent_active, m != 3, "node {id} on {m}");
            assert_eq!(p.connected, m != 3, "node {id} on {m}");
        }
    }
}
