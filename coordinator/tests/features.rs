//! Scenario tests for the features beyond the basic Raft paper: pre-vote,
//! check-quorum, ReadIndex and lease reads, leadership transfer, learners,
//! single-server membership changes, snapshots and flow control.
//!
//! Each test cites the section of Ongaro's dissertation ("Consensus: Bridging
//! Theory and Practice", 2014) or of the Raft paper (Ongaro & Ousterhout,
//! 2014) whose behaviour it checks. Test names follow etcd's raft suite where
//! a scenario has an equivalent there; the code is our own.
//!
//! Every test is deterministic: nodes draw their election timeouts from fixed
//! seeds and the in-memory network delivers messages in a fixed order.

use std::collections::BTreeSet;

use consensus::memory::{MemNode, MemStorage, Network};
use coordinator::raft::{
    CompactError, ConfChange, ConfState, Config, ConfigError, InvalidConfChange, Message,
    MessageKind, NodeId, ProgressState, ProposeError, Proposed, Raft, ReadOnlyOption, ReadState,
    Ready, Role, SnapshotMeta, TransferError, UnsafeConfChange,
};

// ---- configurations ----------------------------------------------------

/// The defaults: pre-vote and check-quorum on.
fn cfg(id: NodeId) -> Config {
    Config::new(id)
}

/// Neither pre-vote nor check-quorum, as in the Raft paper.
fn paper(id: NodeId) -> Config {
    Config {
        pre_vote: false,
        check_quorum: false,
        ..Config::new(id)
    }
}

/// Pre-vote without check-quorum.
fn pre_vote_only(id: NodeId) -> Config {
    Config {
        check_quorum: false,
        ..Config::new(id)
    }
}

/// Check-quorum without pre-vote.
fn check_quorum_only(id: NodeId) -> Config {
    Config {
        pre_vote: false,
        ..Config::new(id)
    }
}

// ---- helpers -------------------------------------------------------------

/// A group whose initial membership has learners as well as voters.
fn with_learners(
    voters: &[NodeId],
    learners: &[NodeId],
    config: impl Fn(NodeId) -> Config,
) -> Network {
    let mut storage = MemStorage::bootstrap(voters);
    storage.snapshot.conf_state.learners = learners.iter().copied().collect();
    let mut net = Network::default();
    for &id in voters.iter().chain(learners) {
        net.insert(MemNode::restart(config(id), storage.clone()).expect("valid config"));
    }
    net
}

fn conf(voters: &[NodeId], learners: &[NodeId]) -> ConfState {
    ConfState {
        voters: voters.iter().copied().collect(),
        learners: learners.iter().copied().collect(),
    }
}

/// The application data a node has applied, in order.
fn applied(net: &Network, id: NodeId) -> Vec<Vec<u8>> {
    net.node(id)
        .applied()
        .iter()
        .map(|(_, d)| d.clone())
        .collect()
}

fn bytes(items: &[&str]) -> Vec<Vec<u8>> {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// Makes `id` campaign and checks that it won.
fn elect(net: &mut Network, id: NodeId) {
    net.campaign(id);
    assert_eq!(net.raft(id).role(), Role::Leader, "node {id} should lead");
}

/// Proposes at `id` and checks the proposal was taken.
fn propose(net: &mut Network, id: NodeId, data: &str) {
    net.propose(id, data.as_bytes())
        .unwrap_or_else(|e| panic!("proposal {data:?} at {id} refused: {e}"));
}

fn is(m: &Message, from: NodeId, to: NodeId, kind: &str) -> bool {
    m.from == from && m.to == to && m.kind.name() == kind
}

fn count(msgs: &[Message], from: NodeId, to: NodeId, kind: &str) -> usize {
    msgs.iter().filter(|m| is(m, from, to, kind)).count()
}

/// The number of entries in each append from `from` to `to` that carried any.
fn append_sizes(msgs: &[Message], from: NodeId, to: NodeId) -> Vec<usize> {
    msgs.iter()
        .filter(|m| m.from == from && m.to == to)
        .filter_map(|m| match &m.kind {
            MessageKind::Append { entries, .. } if !entries.is_empty() => Some(entries.len()),
            _ => None,
        })
        .collect()
}

fn heartbeats_with_ctx(msgs: &[Message], ctx: &[u8]) -> usize {
    msgs.iter()
        .filter(|m| matches!(&m.kind, MessageKind::Heartbeat { ctx: Some(c), .. } if c == ctx))
        .count()
}

/// Runs one `ready`/`advance` cycle on `id` without sending its messages,
/// and returns the batch.
fn cycle(net: &mut Network, id: NodeId) -> Ready {
    let node = net.node_mut(id);
    let rd = node.raft_mut().ready();
    node.persist(&rd);
    node.apply(&rd);
    node.raft_mut().advance();
    rd
}

/// What [`drive`] observed.
#[derive(Debug, Default)]
struct Driven {
    /// Read states handed out, with the node that got them.
    reads: Vec<(NodeId, ReadState)>,
    /// Messages delivered.
    sent: Vec<Message>,
}

/// Like [`Network::stabilize`], but it keeps the read states the nodes hand
/// out, and delivers only the messages `keep` lets through (the network's own
/// cuts do not apply).
fn drive(net: &mut Network, keep: impl Fn(&Message) -> bool) -> Driven {
    let mut out = Driven::default();
    loop {
        let mut queue = Vec::new();
        for id in net.ids() {
            let node = net.node_mut(id);
            if !node.raft().has_ready() {
                continue;
            }
            let mut rd = node.raft_mut().ready();
            out.reads.extend(rd.read_states.drain(..).map(|r| (id, r)));
            let mut msgs = std::mem::take(&mut rd.messages);
            node.persist(&rd);
            msgs.append(&mut rd.persisted_messages);
            node.apply(&rd);
            node.raft_mut().advance();
            queue.extend(node.envelopes(msgs));
        }
        if queue.is_empty() {
            return out;
        }
        let ids = net.ids();
        for env in queue {
            if !ids.contains(&env.msg.to) || !keep(&env.msg) {
                continue;
            }
            out.sent.push(env.msg.clone());
            let to = env.msg.to;
            net.node_mut(to).step(env).expect("well addressed");
        }
    }
}

fn everything(_: &Message) -> bool {
    true
}

fn read(index: u64, ctx: &[u8]) -> ReadState {
    ReadState {
        index,
        ctx: ctx.to_vec(),
    }
}

// =========================================================================
// Check-quorum (dissertation §6.2)
// =========================================================================

/// §6.2: a leader steps down when an election timeout passes without a
/// successful round of heartbeats to a majority of its cluster (check-quorum).
/// A leader that hears from its followers keeps leading.
#[test]
fn leader_stepdown_when_quorum_lost() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    let election = net.raft(1).config().election_tick;

    // With a live quorum, the leader stays however long it runs.
    net.tick(1, 5 * election);
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(1).term(), 1);

    net.isolate(1);
    // Responses from the last round still count for the current round...
    net.tick(1, election - 1);
    assert_eq!(net.raft(1).role(), Role::Leader);
    // ...but within the next election timeout without any, it steps down.
    net.tick(1, election + 1);
    assert_eq!(net.raft(1).role(), Role::Follower);
    assert_eq!(net.raft(1).leader(), None);
    // Stepping down does not change the term.
    assert_eq!(net.raft(1).term(), 1);
}

/// §6.2 (and §4.2.3): a server that heard from a current leader within the
/// minimum election timeout does not grant (or even consider) vote requests;
/// once that timeout has passed without a leader, it does.
#[test]
fn leader_superseding_with_check_quorum() {
    let mut net = Network::new(&[1, 2, 3], check_quorum_only);
    elect(&mut net, 1);
    let election = net.raft(1).config().election_tick;

    net.campaign(3);
    assert_eq!(net.raft(3).role(), Role::Candidate);
    assert_eq!(net.raft(3).term(), 2);
    // Both the leader and the follower ignored the request: no term change.
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(1).term(), 1);
    assert_eq!(net.raft(2).term(), 1);
    assert_eq!(net.raft(2).vote(), Some(1));

    // Node 2 stops hearing from the leader for an election timeout (but does
    // not time out itself).
    assert!(
        net.raft(2).randomized_election_timeout() > election,
        "test premise: node 2 must not campaign after {election} ticks"
    );
    net.tick(2, election);
    assert_eq!(net.raft(2).role(), Role::Follower);

    net.campaign(3);
    assert_eq!(net.raft(3).role(), Role::Leader);
    assert_eq!(net.raft(3).term(), 3);
    assert_eq!(net.raft(2).vote(), Some(3));
}

/// §6.2 with §9.6's discussion: a server partitioned away keeps raising its
/// term (no pre-vote here). When it rejoins, followers that hear from their
/// leader ignore its vote requests, so it does not disrupt them; but the
/// leader's next heartbeat is answered with the higher term, which makes the
/// stale leader step down, and the stuck candidate can then win.
#[test]
fn free_stuck_candidate_with_check_quorum() {
    let mut net = Network::new(&[1, 2, 3], check_quorum_only);
    elect(&mut net, 1);

    net.isolate(3);
    net.campaign(3);
    net.campaign(3);
    assert_eq!(net.raft(3).role(), Role::Candidate);
    assert_eq!(net.raft(3).term(), 3);

    net.recover();
    net.clear_delivered();
    net.campaign(3);
    assert_eq!(net.raft(3).term(), 4);
    assert_eq!(count(net.delivered(), 3, 2, "Vote"), 1);
    // The rejoining node with the higher term did not disrupt anyone.
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(1).term(), 1);
    assert_eq!(net.raft(2).term(), 1);
    assert_eq!(net.raft(2).leader(), Some(1));

    // The leader's heartbeat reaches the candidate, which answers with its
    // term: the stale leader learns it and steps down.
    net.clear_delivered();
    net.tick(1, 1);
    assert!(
        net.delivered()
            .iter()
            .any(|m| is(m, 3, 1, "AppendResponse") && m.term == 4)
    );
    assert_eq!(net.raft(1).role(), Role::Follower);
    assert_eq!(net.raft(1).term(), 4);

    // Now the candidate can win (node 1 has no leader any more).
    net.campaign(3);
    assert_eq!(net.raft(3).role(), Role::Leader);
    assert_eq!(net.raft(3).term(), 5);
    assert_eq!(net.raft(2).term(), 5);
    assert_eq!(net.raft(2).leader(), Some(3));
}

/// §6.2: a leader whose heartbeat is delayed past a follower's election
/// timeout is told the follower's newer term in answer to that heartbeat and
/// steps down, even though the other follower still holds it as leader.
#[test]
fn disruptive_follower() {
    let mut net = Network::new(&[1, 2, 3], check_quorum_only);
    elect(&mut net, 1);

    // Node 3 times out before the leader's heartbeat arrives.
    net.raft_mut(3).campaign();
    assert_eq!(net.raft(3).role(), Role::Candidate);
    assert_eq!(net.raft(3).term(), 2);
    // The late heartbeat of term 1 reaches the candidate of term 2.
    let hb = Message {
        from: 1,
        to: 3,
        term: 1,
        kind: MessageKind::Heartbeat {
            commit: net.raft(1).commit_index(),
            ctx: None,
        },
    };
    net.raft_mut(3).step(hb).unwrap();
    net.stabilize();

    assert_eq!(net.raft(1).role(), Role::Follower);
    assert_eq!(net.raft(1).term(), 2);
    // Node 2 still had a live leader and ignored the vote request.
    assert_eq!(net.raft(2).role(), Role::Follower);
    assert_eq!(net.raft(2).term(), 1);
    assert_eq!(net.raft(3).role(), Role::Candidate);
    assert_eq!(net.raft(3).term(), 2);
}

// =========================================================================
// Disruptive servers and pre-vote (dissertation §9.6)
// =========================================================================

/// §9.6: without pre-vote, a server that was partitioned away has raised its
/// term; when it rejoins, its vote requests force the others to adopt that
/// term, deposing a perfectly good leader, and a new election is needed.
#[test]
fn rejoining_node_without_pre_vote_forces_election() {
    let mut net = Network::paper(&[1, 2, 3]);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    net.isolate(3);
    propose(&mut net, 1, "b");
    net.campaign(3);
    net.campaign(3);
    assert_eq!(net.raft(3).term(), 3);

    net.recover();
    net.campaign(3);
    // Node 3's log is behind, so it cannot win, but everyone moved to its term.
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).term(), 4, "node {id}");
        assert_ne!(net.raft(id).role(), Role::Leader, "node {id}");
    }
    // The group has to elect a leader again.
    elect(&mut net, 1);
    assert_eq!(net.raft(1).term(), 5);
    propose(&mut net, 1, "c");
    assert_eq!(applied(&net, 3), bytes(&["a", "b", "c"]));
}

/// §9.6: with pre-vote, a partitioned server never raises its term, so when it
/// rejoins it neither raises the group's term nor deposes the leader; the
/// leader simply catches it up. Checked with pre-vote alone (its log is behind,
/// so the pre-vote is refused) and with check-quorum too (the others also
/// ignore it while they have a leader).
#[test]
fn disruptive_follower_pre_vote() {
    for config in [pre_vote_only as fn(NodeId) -> Config, cfg] {
        let mut net = Network::new(&[1, 2, 3], config);
        elect(&mut net, 1);
        propose(&mut net, 1, "a");
        net.isolate(3);
        propose(&mut net, 1, "b");
        net.campaign(3);
        net.campaign(3);
        assert_eq!(net.raft(3).role(), Role::PreCandidate);
        assert_eq!(net.raft(3).term(), 1);

        net.recover();
        net.campaign(3);
        assert_ne!(net.raft(3).role(), Role::Leader);
        for id in [1, 2, 3] {
            assert_eq!(net.raft(id).term(), 1, "node {id}");
        }
        assert_eq!(net.raft(1).role(), Role::Leader);

        net.tick(1, 1);
        assert_eq!(net.raft(3).role(), Role::Follower);
        assert_eq!(net.raft(3).leader(), Some(1));
        assert_eq!(applied(&net, 3), bytes(&["a", "b"]));
        assert_eq!(net.raft(1).term(), 1);
    }
}

/// §9.6: a pre-candidate asks whether it could win before incrementing its
/// term; however many times an isolated node times out, its term and vote
/// stay as they were, in memory and on disk.
#[test]
fn pre_candidate_does_not_increase_term() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.isolate(3);
    let election = net.raft(3).config().election_tick;
    net.clear_delivered();
    net.tick(3, 10 * election);

    assert_eq!(net.raft(3).role(), Role::PreCandidate);
    assert_eq!(net.raft(3).term(), 1);
    assert_eq!(net.raft(3).vote(), Some(1));
    assert_eq!(net.node(3).storage().hard_state.term, 1);
    assert_eq!(net.node(3).storage().hard_state.vote, Some(1));
    // Only pre-votes were attempted (and dropped); no real vote request.
    let ready = cycle(&mut net, 3);
    assert!(ready.hard_state.is_none());

    // A single node of a fresh group also stays at term 0 while alone.
    let mut lone = Network::new(&[1, 2, 3], cfg);
    lone.isolate(2);
    lone.campaign(2);
    assert_eq!(lone.raft(2).role(), Role::PreCandidate);
    assert_eq!(lone.raft(2).term(), 0);
    assert_eq!(lone.raft(2).vote(), None);
}

/// §9.6 with §5.4.1: a node whose log is the most up to date may have the
/// smallest term. Its pre-votes carry a stale term, so the others reject them
/// at their own term; that rejection teaches it the term, and its next
/// pre-vote (for a newer term) succeeds. Without this the group could never
/// elect a leader: the node with the newer term cannot win with its older log.
#[test]
fn node_with_smaller_term_can_complete_election() {
    // Node 1: term 2, log [1@t1, 2@t2]. Node 2: term 5, log [1@t1].
    // Node 3 is down.
    let entries = |terms: &[u64]| -> Vec<coordinator::raft::Entry> {
        terms
            .iter()
            .enumerate()
            .map(|(i, &term)| coordinator::raft::Entry {
                term,
                index: i as u64 + 1,
                payload: coordinator::raft::EntryPayload::Empty,
            })
            .collect()
    };
    let mut s1 = MemStorage::bootstrap(&[1, 2, 3]);
    s1.hard_state.term = 2;
    s1.hard_state.vote = Some(1);
    s1.hard_state.commit = 1;
    s1.entries = entries(&[1, 2]);
    let mut s2 = MemStorage::bootstrap(&[1, 2, 3]);
    s2.hard_state.term = 5;
    s2.hard_state.commit = 1;
    s2.entries = entries(&[1]);
    let mut net = Network::default();
    net.insert(MemNode::restart(cfg(1), s1).unwrap());
    net.insert(MemNode::restart(cfg(2), s2).unwrap());

    // Node 2 cannot win: its log is behind node 1's.
    net.campaign(2);
    assert_ne!(net.raft(2).role(), Role::Leader);
    assert_eq!(net.raft(2).term(), 5);
    assert_eq!(
        net.raft(1).term(),
        2,
        "a pre-vote must not change the voter's term"
    );

    // Node 1's first pre-vote (for term 3) is rejected at term 5...
    net.campaign(1);
    assert_eq!(net.raft(1).role(), Role::Follower);
    assert_eq!(net.raft(1).term(), 5);
    assert_eq!(net.raft(2).term(), 5);
    // ...and its next attempt wins.
    net.campaign(1);
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(1).term(), 6);
    assert_eq!(net.raft(2).leader(), Some(1));
    // Node 1's entry of term 2 survived and is now committed on both.
    assert_eq!(net.raft(2).term_at(2), Some(2));
    assert_eq!(net.raft(2).commit_index(), 3);
}

/// §9.6: the scenario of etcd's test of the same name: a node that fell behind
/// rejoins as the leader fails; it learns the newer term from the rejection of
/// its stale pre-vote, and the remaining two can elect a leader.
#[test]
fn node_with_smaller_term_can_complete_election_after_partition() {
    let mut net = Network::new(&[1, 2, 3], pre_vote_only);
    net.cut(1, 3);
    net.cut(2, 3);
    elect(&mut net, 1);
    net.campaign(3);
    assert_eq!(net.raft(3).role(), Role::PreCandidate);
    elect(&mut net, 2);
    assert_eq!(net.raft(1).term(), 2);
    assert_eq!(net.raft(2).term(), 2);
    assert_eq!(net.raft(3).term(), 0);
    assert_eq!(net.raft(1).role(), Role::Follower);

    // Node 3 comes back; the leader, node 2, goes away.
    net.recover();
    net.isolate(2);
    net.campaign(3);
    assert_eq!(net.raft(3).term(), 2, "the rejection carried the term");
    net.campaign(1);
    let leaders: Vec<NodeId> = [1, 3]
        .into_iter()
        .filter(|&id| net.raft(id).role() == Role::Leader)
        .collect();
    assert_eq!(leaders, vec![1]);
    assert_eq!(net.raft(1).term(), 3);
}

/// §9.6 with §5.2: two pre-candidates may both pass the pre-vote and then split
/// the real vote; the next round, started by whichever times out first, elects
/// a leader.
#[test]
fn pre_vote_with_split_vote() {
    let mut net = Network::new(&[1, 2, 3], pre_vote_only);
    elect(&mut net, 1);
    net.isolate(1);

    // Both time out at once.
    net.raft_mut(2).campaign();
    net.raft_mut(3).campaign();
    net.stabilize();
    for id in [2, 3] {
        assert_eq!(net.raft(id).role(), Role::Candidate, "node {id}");
        assert_eq!(net.raft(id).term(), 2, "node {id}");
        assert_eq!(net.raft(id).vote(), Some(id), "node {id}");
    }

    net.campaign(2);
    assert_eq!(net.raft(2).role(), Role::Leader);
    assert_eq!(net.raft(2).term(), 3);
    assert_eq!(net.raft(3).role(), Role::Follower);
    assert_eq!(net.raft(3).term(), 3);
}

/// §9.6: of two pre-candidates, the one that cannot gather a majority (it is
/// cut off from one peer and behind the other) reverts to follower, and the
/// term of the group is only raised by the real election of the other one.
/// When it tries again after the partition heals, it does not disrupt the leader.
#[test]
fn dueling_pre_candidates() {
    let mut net = Network::new(&[1, 2, 3], pre_vote_only);
    net.cut(1, 3);
    elect(&mut net, 1);
    net.campaign(3);

    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(2).role(), Role::Follower);
    assert_eq!(net.raft(3).role(), Role::Follower);
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).term(), 1, "node {id}");
    }
    assert_eq!(net.raft(1).last_index(), 1);
    assert_eq!(net.raft(2).last_index(), 1);
    assert_eq!(net.raft(3).last_index(), 0);

    net.recover();
    net.campaign(3);
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(3).role(), Role::Follower);
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).term(), 1, "node {id}");
    }
}

// =========================================================================
// ReadIndex (dissertation §6.4) and lease reads (§6.4.1)
// =========================================================================

/// §6.4 step 1: a new leader does not know the commit index until it has
/// committed an entry of its own term, so it holds read requests (its own and
/// forwarded ones) until its no-op commits, and answers with an index at least
/// that of the no-op.
#[test]
fn read_index_waits_for_commit_in_current_term() {
    let mut net = Network::new(&[1, 2, 3], paper);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");

    // Node 2 takes over, but nobody's acknowledgement of its no-op arrives.
    let no_acks = |m: &Message| !(m.to == 2 && m.kind.name() == "AppendResponse");
    net.raft_mut(2).campaign();
    drive(&mut net, no_acks);
    assert_eq!(net.raft(2).role(), Role::Leader);
    assert_eq!(net.raft(2).term(), 2);
    assert_eq!(net.raft(2).commit_index(), 2);
    assert_eq!(net.raft(2).term_at(2), Some(1));

    net.raft_mut(2).read_index(b"leader".to_vec()).unwrap();
    net.raft_mut(3).read_index(b"follower".to_vec()).unwrap();
    let out = drive(&mut net, no_acks);
    assert!(out.reads.is_empty(), "answered too early: {:?}", out.reads);
    assert_eq!(heartbeats_with_ctx(&out.sent, b"leader"), 0);
    assert_eq!(heartbeats_with_ctx(&out.sent, b"follower"), 0);

    // Once the no-op commits, both reads are confirmed and answered.
    net.raft_mut(2).tick();
    let out = drive(&mut net, everything);
    let noop = net.raft(2).commit_index();
    assert_eq!(noop, 3);
    assert_eq!(net.raft(2).term_at(noop), Some(2));
    let mut reads = out.reads;
    reads.sort_by_key(|(id, _)| *id);
    assert_eq!(
        reads,
        vec![(2, read(noop, b"leader")), (3, read(noop, b"follower"))]
    );
}

/// §6.4 steps 2–3: the leader records its commit index as the read index and
/// confirms it is still leader with a round of heartbeats carrying the request;
/// it answers once a majority (itself included) acknowledged that round, with
/// the index recorded when the request arrived.
#[test]
fn read_index_on_leader() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    let at_request = net.raft(1).commit_index();

    net.raft_mut(1).read_index(b"ctx".to_vec()).unwrap();
    let out = drive(&mut net, |m| m.kind.name() != "HeartbeatResponse");
    assert!(out.reads.is_empty());
    assert_eq!(heartbeats_with_ctx(&out.sent, b"ctx"), 2);

    // A write commits meanwhile; the read still waits on the earlier index.
    propose(&mut net, 1, "b");
    assert!(net.raft(1).commit_index() > at_request);

    // The next heartbeat round carries the request again; node 2's answer
    // makes a majority with the leader's own.
    net.raft_mut(1).tick();
    let out = drive(&mut net, |m| m.from != 3);
    assert_eq!(out.reads, vec![(1, read(at_request, b"ctx"))]);
}

/// §6.4: a follower forwards the request to its leader, which confirms its
/// leadership and answers with the read index; the follower serves the read
/// once it has applied up to that index. Without a leader the request fails.
#[test]
fn read_index_from_follower() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    assert_eq!(
        net.raft_mut(2).read_index(b"x".to_vec()),
        Err(ProposeError::NoLeader)
    );
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    let commit = net.raft(1).commit_index();

    net.raft_mut(2).read_index(b"f".to_vec()).unwrap();
    let out = drive(&mut net, everything);
    assert_eq!(out.reads, vec![(2, read(commit, b"f"))]);
    assert_eq!(count(&out.sent, 2, 1, "ReadIndex"), 1);
    assert_eq!(heartbeats_with_ctx(&out.sent, b"f"), 2);
    assert!(out.sent.iter().any(|m| is(m, 1, 2, "ReadIndexResponse")
        && m.kind
            == MessageKind::ReadIndexResponse {
                ctx: b"f".to_vec(),
                index: commit
            }));
    assert!(net.raft(2).applied_index() >= commit);
}

/// §6.4: a request whose context is already pending is a duplicate; it starts
/// no new heartbeat round and is answered once.
#[test]
fn read_index_duplicate_ctx_answered_once() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");

    net.raft_mut(1).read_index(b"dup".to_vec()).unwrap();
    net.raft_mut(1).read_index(b"dup".to_vec()).unwrap();
    let out = drive(&mut net, |m| m.kind.name() != "HeartbeatResponse");
    assert_eq!(heartbeats_with_ctx(&out.sent, b"dup"), 2, "one round only");
    net.raft_mut(1).read_index(b"dup".to_vec()).unwrap();

    net.raft_mut(1).tick();
    let out = drive(&mut net, everything);
    assert_eq!(out.reads, vec![(1, read(2, b"dup"))]);

    // Nothing left over: further rounds answer nothing.
    net.raft_mut(1).tick();
    assert!(drive(&mut net, everything).reads.is_empty());
}

/// §6.4 with §4.2.1: a learner can serve linearizable reads through the
/// leader; only the voters' acknowledgements confirm the leader's authority.
#[test]
fn read_index_with_learner() {
    let mut net = with_learners(&[1, 2, 3], &[4], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    let commit = net.raft(1).commit_index();

    net.raft_mut(4).read_index(b"l".to_vec()).unwrap();
    // Voters 2 and 3 do not answer: the learner's acknowledgement is not enough.
    let out = drive(&mut net, |m| m.from != 2 && m.from != 3);
    assert!(out.reads.is_empty());
    assert_eq!(count(&out.sent, 4, 1, "ReadIndex"), 1);
    assert!(out.sent.iter().any(|m| is(m, 4, 1, "HeartbeatResponse")
        && m.kind
            == MessageKind::HeartbeatResponse {
                ctx: Some(b"l".to_vec())
            }));

    net.raft_mut(1).tick();
    let out = drive(&mut net, everything);
    assert_eq!(out.reads, vec![(4, read(commit, b"l"))]);
    assert_eq!(applied(&net, 4), bytes(&["a"]));
}

/// §6.4.1: with a lease (check-quorum guarantees the leader would have stepped
/// down otherwise), the leader answers reads at once, its own and forwarded
/// ones, without a heartbeat round.
#[test]
fn lease_read_answers_without_a_round() {
    let lease = |id| Config {
        read_only: ReadOnlyOption::LeaseBased,
        ..Config::new(id)
    };
    let mut net = Network::new(&[1, 2, 3], lease);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    let commit = net.raft(1).commit_index();

    net.raft_mut(1).read_index(b"own".to_vec()).unwrap();
    net.raft_mut(2).read_index(b"fwd".to_vec()).unwrap();
    let out = drive(&mut net, everything);
    let mut reads = out.reads;
    reads.sort_by_key(|(id, _)| *id);
    assert_eq!(
        reads,
        vec![(1, read(commit, b"own")), (2, read(commit, b"fwd"))]
    );
    let kinds: BTreeSet<&str> = out.sent.iter().map(|m| m.kind.name()).collect();
    assert_eq!(kinds, BTreeSet::from(["ReadIndex", "ReadIndexResponse"]));
}

/// §6.4.1: lease reads rely on check-quorum, so a configuration asking for
/// them without it is refused.
#[test]
fn lease_reads_require_check_quorum() {
    let bad = Config {
        read_only: ReadOnlyOption::LeaseBased,
        check_quorum: false,
        ..Config::new(1)
    };
    assert_eq!(bad.validate(), Err(ConfigError::LeaseWithoutCheckQuorum));
    assert!(matches!(
        Raft::new(bad.clone(), coordinator::raft::InitialState::bootstrap([1])),
        Err(ConfigError::LeaseWithoutCheckQuorum)
    ));
    assert!(MemNode::new(bad, &[1]).is_err());
    let good = Config {
        read_only: ReadOnlyOption::LeaseBased,
        ..Config::new(1)
    };
    assert_eq!(good.validate(), Ok(()));
}

// =========================================================================
// Leadership transfer (dissertation §3.10)
// =========================================================================

/// §3.10: the leader sends TimeoutNow to an up-to-date target, which starts an
/// election at once (in a new term) and wins it, even though the others
/// still hold the old leader's lease.
#[test]
fn leader_transfer_to_up_to_date_node() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");

    net.clear_delivered();
    net.raft_mut(1).transfer_leader(2).unwrap();
    net.stabilize();
    assert_eq!(count(net.delivered(), 1, 2, "TimeoutNow"), 1);
    assert_eq!(net.raft(2).role(), Role::Leader);
    assert_eq!(net.raft(2).term(), 2);
    assert_eq!(net.raft(1).role(), Role::Follower);
    assert_eq!(net.raft(1).leader(), Some(2));
    assert_eq!(net.raft(3).leader(), Some(2));
    assert_eq!(net.raft(1).lead_transferee(), None);

    // And back again.
    net.raft_mut(2).transfer_leader(1).unwrap();
    net.stabilize();
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(1).term(), 3);
    propose(&mut net, 1, "b");
    for id in [1, 2, 3] {
        assert_eq!(applied(&net, id), bytes(&["a", "b"]), "node {id}");
    }
}

/// §3.10 step 1: if the target is behind, the leader first brings its log up
/// to date, and only then sends TimeoutNow.
#[test]
fn leader_transfer_to_slow_follower() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.isolate(3);
    propose(&mut net, 1, "a");
    propose(&mut net, 1, "b");
    net.recover();
    assert!(net.raft(3).last_index() < net.raft(1).last_index());

    net.clear_delivered();
    net.raft_mut(1).transfer_leader(3).unwrap();
    net.stabilize();
    let msgs = net.delivered();
    let timeout = msgs
        .iter()
        .position(|m| is(m, 1, 3, "TimeoutNow"))
        .expect("TimeoutNow sent");
    let catch_up = msgs
        .iter()
        .position(|m| {
            matches!(&m.kind, MessageKind::Append { entries, .. } if !entries.is_empty())
                && m.to == 3
        })
        .expect("entries sent to the target");
    assert!(catch_up < timeout);
    assert_eq!(net.raft(3).role(), Role::Leader);
    assert_eq!(net.raft(3).term(), 2);
    propose(&mut net, 3, "c");
    assert_eq!(applied(&net, 1), bytes(&["a", "b", "c"]));
}

/// §3.10 with §5.1 of the dissertation (log compaction): a target that needs
/// compacted entries gets the snapshot first, then TimeoutNow.
#[test]
fn leader_transfer_after_snapshot() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.isolate(3);
    propose(&mut net, 1, "a");
    propose(&mut net, 1, "b");
    let meta = net.node_mut(1).snapshot_and_compact().unwrap();
    assert_eq!(meta.index, 3);
    net.recover();

    net.clear_delivered();
    net.raft_mut(1).transfer_leader(3).unwrap();
    net.stabilize();
    let msgs = net.delivered();
    let snap = msgs.iter().position(|m| is(m, 1, 3, "Snapshot"));
    let timeout = msgs.iter().position(|m| is(m, 1, 3, "TimeoutNow"));
    assert!(snap.is_some() && timeout.is_some() && snap < timeout);
    assert_eq!(net.raft(3).role(), Role::Leader);
    assert_eq!(net.raft(3).snapshot_meta().index, 3);
    assert_eq!(applied(&net, 3), bytes(&["a", "b"]));
}

/// §3.10: if the transfer does not complete within an election timeout, the
/// prior leader abandons it and accepts client requests again.
#[test]
fn leader_transfer_timeout() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.isolate(3);
    let election = net.raft(1).config().election_tick;

    net.raft_mut(1).transfer_leader(3).unwrap();
    net.stabilize();
    assert_eq!(net.raft(1).lead_transferee(), Some(3));
    net.tick(1, election - 1);
    assert_eq!(net.raft(1).lead_transferee(), Some(3));
    net.tick(1, 1);
    assert_eq!(net.raft(1).lead_transferee(), None);
    assert_eq!(net.raft(1).role(), Role::Leader);
    propose(&mut net, 1, "after");
    assert_eq!(applied(&net, 2), bytes(&["after"]));
}

/// §3.10 step 1: the prior leader stops accepting new client requests while
/// the transfer runs — its own, forwarded ones and membership changes alike.
#[test]
fn leader_transfer_ignores_proposals() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.isolate(3);
    net.raft_mut(1).transfer_leader(3).unwrap();
    net.stabilize();
    let last = net.raft(1).last_index();

    assert_eq!(net.propose(1, b"x"), Err(ProposeError::TransferInProgress));
    assert_eq!(
        net.raft_mut(1)
            .propose_conf_change(ConfChange::AddLearner(4)),
        Err(ProposeError::TransferInProgress)
    );
    // A follower forwards; the leader drops it.
    assert_eq!(net.propose(2, b"y"), Ok(Proposed::Forwarded { to: 1 }));
    assert_eq!(net.raft(1).last_index(), last);
}

/// §3.10: only a voter can be handed leadership; a learner or a removed node
/// is refused, on the leader and on a follower, and a forwarded request for a
/// non-voter is ignored.
#[test]
fn leader_transfer_to_non_voter() {
    let mut net = with_learners(&[1, 2, 3], &[4], cfg);
    elect(&mut net, 1);
    assert_eq!(
        net.raft_mut(1).transfer_leader(4),
        Err(TransferError::NotVoter(4))
    );
    assert_eq!(
        net.raft_mut(2).transfer_leader(4),
        Err(TransferError::NotVoter(4))
    );
    assert_eq!(
        net.raft_mut(1).transfer_leader(9),
        Err(TransferError::NotVoter(9))
    );

    net.raft_mut(1)
        .propose_conf_change(ConfChange::RemoveNode(3))
        .unwrap();
    net.stabilize();
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2], &[4]));
    assert_eq!(
        net.raft_mut(1).transfer_leader(3),
        Err(TransferError::NotVoter(3))
    );

    let forwarded = Message {
        from: 2,
        to: 1,
        term: 0,
        kind: MessageKind::TransferLeader { to: 4 },
    };
    net.raft_mut(1).step(forwarded).unwrap();
    net.stabilize();
    assert_eq!(net.raft(1).lead_transferee(), None);
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert!(net.propose(1, b"still").is_ok());
}

/// §3.10: transferring to the current leader itself changes nothing.
#[test]
fn leader_transfer_to_self() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    assert_eq!(net.raft_mut(1).transfer_leader(1), Ok(()));
    assert_eq!(net.raft(1).lead_transferee(), None);
    assert!(!net.raft(1).has_ready(), "no message, no state change");
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(net.raft(1).term(), 1);
    propose(&mut net, 1, "ok");
}

/// §3.10: a repeated request for the transfer already running is ignored; in
/// particular it does not extend the transfer's deadline.
#[test]
fn leader_transfer_second_transfer_to_same_node() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.isolate(3);
    let election = net.raft(1).config().election_tick;

    net.raft_mut(1).transfer_leader(3).unwrap();
    net.stabilize();
    net.tick(1, 3);
    net.clear_delivered();
    net.raft_mut(1).transfer_leader(3).unwrap();
    assert!(!net.raft(1).has_ready(), "the repeat sends nothing");
    assert_eq!(net.raft(1).lead_transferee(), Some(3));

    net.tick(1, election - 3 - 1);
    assert_eq!(net.raft(1).lead_transferee(), Some(3));
    net.tick(1, 1);
    assert_eq!(net.raft(1).lead_transferee(), None);
}

/// §3.10: a transfer requested on a follower is forwarded to the leader; that
/// includes a follower asking for leadership for itself.
#[test]
fn leader_transfer_request_on_follower_is_forwarded() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);

    net.clear_delivered();
    net.raft_mut(2).transfer_leader(3).unwrap();
    net.stabilize();
    assert!(
        net.delivered()
            .iter()
            .any(|m| is(m, 2, 1, "TransferLeader")
                && m.kind == MessageKind::TransferLeader { to: 3 })
    );
    assert_eq!(net.raft(3).role(), Role::Leader);
    assert_eq!(net.raft(3).term(), 2);

    net.raft_mut(2).transfer_leader(2).unwrap();
    net.stabilize();
    assert_eq!(net.raft(2).role(), Role::Leader);
    assert_eq!(net.raft(2).term(), 3);
}

// =========================================================================
// Learners (dissertation §4.2.1)
// =========================================================================

/// §4.2.1: learners are non-voting members; they never start elections,
/// however long they go without a leader, and ignore TimeoutNow.
#[test]
fn learner_election_timeout() {
    let mut net = with_learners(&[1, 2, 3], &[4], cfg);
    assert!(!net.raft(4).is_promotable());
    let election = net.raft(4).config().election_tick;
    net.tick(4, 20 * election);
    net.campaign(4);
    assert_eq!(net.raft(4).role(), Role::Follower);
    assert_eq!(net.raft(4).term(), 0);
    assert!(net.delivered().iter().all(|m| m.from != 4));

    elect(&mut net, 1);
    let timeout_now = Message {
        from: 1,
        to: 4,
        term: 1,
        kind: MessageKind::TimeoutNow,
    };
    net.raft_mut(4).step(timeout_now).unwrap();
    net.stabilize();
    assert_eq!(net.raft(4).role(), Role::Follower);
    assert_eq!(net.raft(4).term(), 1);
    assert_eq!(net.raft(1).role(), Role::Leader);
}

/// §4.2.1: learners receive the log like everyone else, but the leader does
/// not count them towards the commit quorum.
#[test]
fn learner_replicated_but_not_in_commit_quorum() {
    let mut net = with_learners(&[1, 2, 3], &[4], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    assert_eq!(applied(&net, 4), bytes(&["a"]));
    assert!(net.raft(1).progress(4).unwrap().learner);

    net.cut(1, 2);
    net.cut(1, 3);
    propose(&mut net, 1, "b");
    let last = net.raft(1).last_index();
    assert_eq!(net.raft(1).progress(4).unwrap().matched, last);
    assert!(net.raft(1).commit_index() < last, "a learner made a quorum");
    assert_eq!(applied(&net, 4), bytes(&["a"]));

    net.recover();
    net.tick(1, 1);
    assert_eq!(net.raft(1).commit_index(), last);
    assert_eq!(applied(&net, 4), bytes(&["a", "b"]));
}

/// §4.2.1: a candidate asks only voters, and a learner's vote would not count.
#[test]
fn learner_votes_do_not_count() {
    let mut net = with_learners(&[1, 2, 3], &[4], paper);
    net.raft_mut(1).campaign();
    let rd = cycle(&mut net, 1);
    let asked: BTreeSet<NodeId> = rd
        .messages
        .iter()
        .chain(&rd.persisted_messages)
        .filter(|m| m.kind.name() == "Vote")
        .map(|m| m.to)
        .collect();
    assert_eq!(asked, BTreeSet::from([2, 3]));

    let vote = Message {
        from: 4,
        to: 1,
        term: 1,
        kind: MessageKind::VoteResponse {
            pre: false,
            granted: true,
        },
    };
    net.raft_mut(1).step(vote).unwrap();
    assert_eq!(net.raft(1).role(), Role::Candidate);
    let vote = Message {
        from: 2,
        to: 1,
        term: 1,
        kind: MessageKind::VoteResponse {
            pre: false,
            granted: true,
        },
    };
    net.raft_mut(1).step(vote).unwrap();
    assert_eq!(net.raft(1).role(), Role::Leader);
}

/// §4.2.1: once caught up, a learner is promoted to voter with a membership
/// change; from then on its acknowledgement counts and it may lead.
#[test]
fn learner_promotion() {
    let mut net = with_learners(&[1, 2], &[3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");

    // As a learner, node 3 cannot stand in for node 2.
    net.cut(1, 2);
    propose(&mut net, 1, "b");
    assert_eq!(applied(&net, 3), bytes(&["a"]));
    net.recover();
    net.tick(1, 1);
    assert_eq!(applied(&net, 3), bytes(&["a", "b"]));

    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddVoter(3))
        .unwrap();
    net.stabilize();
    for id in [1, 2, 3] {
        assert_eq!(
            net.raft(id).conf_state(),
            &conf(&[1, 2, 3], &[]),
            "node {id}"
        );
    }
    assert!(net.raft(3).is_promotable());
    assert!(!net.raft(1).progress(3).unwrap().learner);

    // Now node 3 does count: 1 and 3 are a majority of three.
    net.cut(1, 2);
    propose(&mut net, 1, "c");
    assert_eq!(applied(&net, 3), bytes(&["a", "b", "c"]));
    assert_eq!(applied(&net, 1), bytes(&["a", "b", "c"]));
    net.recover();

    net.raft_mut(1).transfer_leader(3).unwrap();
    net.stabilize();
    assert_eq!(net.raft(3).role(), Role::Leader);
}

// =========================================================================
// Membership changes (dissertation §4.1)
// =========================================================================

/// §4.1 (and §4.2.1's catch-up): a brand-new, empty server added to the
/// group receives the whole log, applies everything, and ends up with the
/// group's membership (not just itself); it then takes part like the others.
#[test]
fn add_node() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    propose(&mut net, 1, "b");

    net.insert(MemNode::new(cfg(4), &[]).unwrap());
    assert!(!net.raft(4).is_promotable());
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddVoter(4))
        .unwrap();
    net.stabilize();

    let want = conf(&[1, 2, 3, 4], &[]);
    for id in [1, 2, 3, 4] {
        assert_eq!(net.raft(id).conf_state(), &want, "node {id}");
    }
    assert_eq!(applied(&net, 4), bytes(&["a", "b"]));
    assert_eq!(net.raft(4).leader(), Some(1));

    // Node 4 counts now: with 2 and 3 away, 1 and 4 are no majority of four.
    propose(&mut net, 1, "c");
    net.cut(1, 2);
    net.cut(1, 3);
    propose(&mut net, 1, "d");
    assert_eq!(applied(&net, 4), bytes(&["a", "b", "c"]));
    net.recover();

    // Time passes for everyone; the group stays as it is.
    for _ in 0..50 {
        net.tick_all();
    }
    assert_eq!(net.leader(), Some(1));
    for id in [1, 2, 3, 4] {
        assert_eq!(net.raft(id).term(), 1, "node {id}");
        assert_eq!(net.raft(id).conf_state(), &want, "node {id}");
        assert_eq!(applied(&net, id), bytes(&["a", "b", "c", "d"]), "node {id}");
    }

    // What node 4 made durable gives it the same membership after a restart.
    let storage = net.remove(4).unwrap().crash();
    let restarted = MemNode::restart(cfg(4), storage).unwrap();
    assert_eq!(restarted.raft().conf_state(), &want);
    net.insert(restarted);
    net.tick(1, 1);
    assert_eq!(applied(&net, 4), bytes(&["a", "b", "c", "d"]));
}

/// §4.1 with §4.2.1: an empty server may also join as a learner (to catch up
/// before it votes), including after the leader compacted its log (it then
/// starts from the snapshot); either way it learns the whole membership.
#[test]
fn add_learner_node_and_promote() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");

    net.insert(MemNode::new(cfg(4), &[]).unwrap());
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddLearner(4))
        .unwrap();
    net.stabilize();
    assert_eq!(net.raft(4).conf_state(), &conf(&[1, 2, 3], &[4]));
    assert_eq!(applied(&net, 4), bytes(&["a"]));

    propose(&mut net, 1, "b");
    let meta = net.node_mut(1).snapshot_and_compact().unwrap();
    net.insert(MemNode::new(cfg(5), &[]).unwrap());
    net.clear_delivered();
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddLearner(5))
        .unwrap();
    net.stabilize();
    assert!(
        net.delivered()
            .iter()
            .any(|m| is(m, 1, 5, "Snapshot")
                && m.kind == MessageKind::Snapshot { meta: meta.clone() })
    );
    let want = conf(&[1, 2, 3], &[4, 5]);
    for id in [1, 2, 3, 4, 5] {
        assert_eq!(net.raft(id).conf_state(), &want, "node {id}");
        assert_eq!(applied(&net, id), bytes(&["a", "b"]), "node {id}");
    }

    for id in [4, 5] {
        net.raft_mut(1)
            .propose_conf_change(ConfChange::AddVoter(id))
            .unwrap();
        net.stabilize();
    }
    let want = conf(&[1, 2, 3, 4, 5], &[]);
    for id in [1, 2, 3, 4, 5] {
        assert_eq!(net.raft(id).conf_state(), &want, "node {id}");
    }
    net.raft_mut(1).transfer_leader(5).unwrap();
    net.stabilize();
    assert_eq!(net.raft(5).role(), Role::Leader);
    propose(&mut net, 5, "c");
    assert_eq!(applied(&net, 4), bytes(&["a", "b", "c"]));
}

/// §4.1: a removed server no longer receives anything and no longer counts
/// towards the majority.
#[test]
fn remove_node() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    net.raft_mut(1)
        .propose_conf_change(ConfChange::RemoveNode(3))
        .unwrap();
    net.stabilize();

    for id in [1, 2] {
        assert_eq!(net.raft(id).conf_state(), &conf(&[1, 2], &[]), "node {id}");
    }
    assert_eq!(net.raft(1).progress(3), None);
    assert!(!net.raft(1).status().progress.contains_key(&3));

    net.clear_delivered();
    propose(&mut net, 1, "b");
    net.tick(1, 3);
    assert!(net.delivered().iter().all(|m| m.to != 3 && m.from != 3));
    assert_eq!(applied(&net, 2), bytes(&["a", "b"]));

    // Two of two are now needed.
    net.cut(1, 2);
    propose(&mut net, 1, "c");
    assert_eq!(applied(&net, 1), bytes(&["a", "b"]));
}

/// §4.2.3: a server removed while it was cut off never receives the entry
/// that removes it (the leader stops replicating to it once the removal
/// commits), so it campaigns on; pre-vote keeps it from disturbing anyone,
/// but it would never stop. Told by a member that a configuration committed
/// beyond its own commit index no longer lists it (the driver's
/// `NotMember`), it stands down and campaigns no more; a member that knows
/// less of the log than it does is not believed. Added back as a learner, it
/// catches up, and then the log speaks for itself again.
#[test]
fn removed_node_told_by_a_member_stands_down_until_added_again() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    net.isolate(3);
    net.raft_mut(1)
        .propose_conf_change(ConfChange::RemoveNode(3))
        .unwrap();
    net.stabilize();
    propose(&mut net, 1, "b");
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2], &[]));
    assert_eq!(net.raft(3).conf_state(), &conf(&[1, 2, 3], &[]));
    net.recover();

    // Nothing reaches 3 any more: it campaigns, with pre-votes only.
    let (term, own_commit) = (net.raft(3).term(), net.raft(3).commit_index());
    net.clear_delivered();
    net.tick(3, 50);
    assert_eq!(net.raft(3).role(), Role::PreCandidate);
    assert!(count(net.delivered(), 3, 1, "PreVote") > 0);
    assert_eq!(count(net.delivered(), 3, 1, "Vote"), 0);
    assert_eq!(net.raft(3).term(), term);
    assert_eq!(net.raft(1).term(), term, "the group's term did not grow");

    let not_member = |commit| Message {
        from: 2,
        to: 3,
        term,
        kind: MessageKind::NotMember { commit },
    };
    // A member that knows no more of the log than 3 proves nothing.
    net.raft_mut(3).step(not_member(own_commit)).unwrap();
    assert_eq!(net.raft(3).removed(), None);
    assert!(net.raft(3).is_promotable());

    let commit = net.raft(2).commit_index();
    net.raft_mut(3).step(not_member(commit)).unwrap();
    assert_eq!(net.raft(3).removed(), Some(commit));
    assert_eq!(net.raft(3).status().removed, Some(commit));
    assert_eq!(net.raft(3).role(), Role::Follower);
    assert!(!net.raft(3).is_promotable());
    net.clear_delivered();
    net.tick(3, 50);
    assert!(net.delivered().iter().all(|m| m.from != 3), "3 stays quiet");
    net.raft_mut(3).campaign();
    assert_eq!(net.raft(3).role(), Role::Follower);

    // Added back as a learner, it catches up through the removal and the
    // addition; the log lists it again.
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddLearner(3))
        .unwrap();
    net.stabilize();
    propose(&mut net, 1, "c");
    assert_eq!(net.raft(3).conf_state(), &conf(&[1, 2], &[3]));
    assert_eq!(net.raft(3).removed(), None);
    assert_eq!(applied(&net, 3), bytes(&["a", "b", "c"]));
    assert_eq!(net.raft(1).term(), term);
}

/// §4.1: only one membership change may be pending at a time; the next is
/// accepted once the previous one has committed.
#[test]
fn one_pending_conf_change_at_a_time() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.ignore("AppendResponse");
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddLearner(4))
        .unwrap();
    net.stabilize();
    assert_eq!(
        net.raft_mut(1)
            .propose_conf_change(ConfChange::AddLearner(5)),
        Err(ProposeError::ConfChangePending)
    );
    // Ordinary proposals are not held up.
    propose(&mut net, 1, "x");

    net.recover();
    net.tick(1, 1);
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2, 3], &[4]));
    assert!(
        net.raft_mut(1)
            .propose_conf_change(ConfChange::AddLearner(5))
            .is_ok()
    );
    net.stabilize();
    assert_eq!(net.raft(2).conf_state(), &conf(&[1, 2, 3], &[4, 5]));
}

/// §4.1 (the single-server change bug, raft-dev 2015): a new leader must not
/// append a membership change before it has committed an entry of its own
/// term, even if every entry of earlier terms is known committed.
#[test]
fn new_leader_refuses_conf_change_before_committing_in_its_term() {
    let mut net = Network::new(&[1, 2, 3], paper);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");

    net.ignore("AppendResponse");
    elect(&mut net, 2);
    assert_eq!(net.raft(2).commit_index(), 2, "all of term 1 is committed");
    assert_eq!(net.raft(2).last_index(), 3, "the no-op is not");
    assert_eq!(
        net.raft_mut(2)
            .propose_conf_change(ConfChange::AddLearner(4)),
        Err(ProposeError::ConfChangePending)
    );

    net.recover();
    net.tick(2, 1);
    assert_eq!(net.raft(2).commit_index(), 3);
    assert!(
        net.raft_mut(2)
            .propose_conf_change(ConfChange::AddLearner(4))
            .is_ok()
    );
    net.stabilize();
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2, 3], &[4]));
}

/// §4.1: changes that make no sense against the current membership are
/// refused and leave the log alone.
#[test]
fn invalid_conf_changes_refused() {
    let mut net = with_learners(&[1, 2, 3], &[4], cfg);
    elect(&mut net, 1);
    let last = net.raft(1).last_index();
    let cases = [
        (ConfChange::AddVoter(2), InvalidConfChange::AlreadyVoter(2)),
        (
            ConfChange::AddLearner(4),
            InvalidConfChange::AlreadyLearner(4),
        ),
        (ConfChange::RemoveNode(9), InvalidConfChange::NotMember(9)),
        (ConfChange::AddVoter(0), InvalidConfChange::ZeroId),
        (ConfChange::AddLearner(0), InvalidConfChange::ZeroId),
    ];
    for (change, why) in cases {
        assert_eq!(
            net.raft_mut(1).propose_conf_change(change),
            Err(ProposeError::InvalidConfChange(why)),
            "{change:?}"
        );
    }
    assert_eq!(net.raft(1).last_index(), last);

    // The last voter can be neither removed nor demoted.
    let mut single = Network::new(&[1], cfg);
    elect(&mut single, 1);
    for change in [ConfChange::RemoveNode(1), ConfChange::AddLearner(1)] {
        assert_eq!(
            single.raft_mut(1).propose_conf_change(change),
            Err(ProposeError::InvalidConfChange(
                InvalidConfChange::LastVoter(1)
            )),
            "{change:?}"
        );
    }
}

/// §4.2.2: a leader that removes itself steps down once the change commits
/// and never campaigns again; the rest elect a leader among themselves.
#[test]
fn leader_removing_itself_steps_down() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    net.raft_mut(1)
        .propose_conf_change(ConfChange::RemoveNode(1))
        .unwrap();
    net.stabilize();
    assert_eq!(net.raft(1).role(), Role::Follower);
    assert!(!net.raft(1).is_promotable());
    assert_eq!(net.raft(1).conf_state(), &conf(&[2, 3], &[]));

    net.clear_delivered();
    let mut rounds = 0;
    while net.leader().is_none_or(|l| l == 1) {
        net.tick_all();
        rounds += 1;
        assert!(rounds < 200, "no new leader");
    }
    let leader = net.leader().unwrap();
    assert!(leader == 2 || leader == 3);
    assert_eq!(net.raft(leader).conf_state(), &conf(&[2, 3], &[]));
    assert!(
        net.delivered()
            .iter()
            .all(|m| m.from != 1 || !matches!(m.kind, MessageKind::Vote { .. }))
    );

    propose(&mut net, leader, "b");
    for id in [2, 3] {
        assert_eq!(applied(&net, id), bytes(&["a", "b"]), "node {id}");
        assert_eq!(net.raft(id).conf_state(), &conf(&[2, 3], &[]), "node {id}");
    }
    assert_eq!(net.raft(1).role(), Role::Follower);
}

/// §4.2.2: when the leader of a two-voter group removes itself, the other
/// voter must learn that the change committed, or it would still need the
/// old leader's vote, which the old leader refuses when its log holds an
/// entry the survivor lacks: the group would never elect a leader again.
#[test]
fn leader_removing_itself_from_two_voters() {
    let mut net = Network::new(&[1, 2], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");

    // Node 2 receives the removal, but its acknowledgement is held back...
    net.cut_one_way(2, 1);
    net.raft_mut(1)
        .propose_conf_change(ConfChange::RemoveNode(1))
        .unwrap();
    net.stabilize();
    let removal = net.raft(1).last_index();
    assert_eq!(net.raft(2).last_index(), removal);
    // Meanwhile the leader is asked for one more entry, which node 2 would
    // never get. (It may refuse proposals once its own removal is pending,
    // which is one way to avoid the trap; either way node 2 must win below.)
    net.cut(1, 2);
    let _ = net.propose(1, b"lost");
    net.recover();

    // The acknowledgement arrives: the removal commits and node 1 steps down.
    let term = net.raft(1).term();
    let ack = Message {
        from: 2,
        to: 1,
        term,
        kind: MessageKind::AppendResponse {
            index: removal,
            reject: false,
            hint: None,
        },
    };
    net.raft_mut(1).step(ack).unwrap();
    net.stabilize();
    assert_eq!(net.raft(1).role(), Role::Follower);
    assert_eq!(net.raft(1).conf_state(), &conf(&[2], &[]));

    let mut rounds = 0;
    while net.leader() != Some(2) {
        net.tick_all();
        rounds += 1;
        assert!(rounds < 100, "node 2 never became leader");
    }
    assert_eq!(net.raft(2).conf_state(), &conf(&[2], &[]));
    propose(&mut net, 2, "b");
    assert_eq!(applied(&net, 2), bytes(&["a", "b"]));
}

/// §4.1 with §5.1 (dissertation): a snapshot records the membership as of its
/// last index; a node restarted from it uses that membership, not the one it
/// was bootstrapped with. Snapshots taken between changes record the
/// membership in force at their index.
#[test]
fn conf_restored_from_snapshot() {
    let mut net = Network::new(&[1, 2, 3], paper);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    net.raft_mut(1)
        .propose_conf_change(ConfChange::RemoveNode(3))
        .unwrap();
    net.stabilize();
    propose(&mut net, 1, "b");
    let meta = net.node_mut(1).snapshot_and_compact().unwrap();
    assert_eq!(meta.index, 4);
    assert_eq!(meta.conf_state, conf(&[1, 2], &[]));

    let storage = net.remove(1).unwrap().crash();
    assert!(storage.entries.is_empty());
    assert_eq!(storage.snapshot.conf_state, conf(&[1, 2], &[]));
    let restarted = MemNode::restart(paper(1), storage).unwrap();
    assert_eq!(restarted.raft().conf_state(), &conf(&[1, 2], &[]));
    assert_eq!(restarted.applied().len(), 2);
    net.insert(restarted);
    elect(&mut net, 1);
    propose(&mut net, 1, "c");
    assert_eq!(applied(&net, 2), bytes(&["a", "b", "c"]));

    // A snapshot at an index between two changes records the first only.
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddLearner(7))
        .unwrap();
    net.stabilize();
    let between = net.raft(1).last_index();
    propose(&mut net, 1, "d");
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddLearner(8))
        .unwrap();
    net.stabilize();
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2], &[7, 8]));
    let meta = net.raft_mut(1).compact(between + 1).unwrap();
    assert_eq!(meta.conf_state, conf(&[1, 2], &[7]));
}

/// §4.1: a server uses the latest configuration in its log. (This core, by
/// design, applies a change when the server learns it is committed rather than
/// when it is appended.) On restart, the committed changes that follow the
/// snapshot are replayed on top of the snapshot's membership; an uncommitted
/// one is not, until it commits.
#[test]
fn conf_changes_after_snapshot_replayed_on_restart() {
    let mut net = Network::new(&[1, 2, 3], paper);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    let meta = net.node_mut(1).snapshot_and_compact().unwrap();
    assert_eq!(meta.conf_state, conf(&[1, 2, 3], &[]));
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddLearner(4))
        .unwrap();
    net.stabilize();

    net.ignore("AppendResponse");
    net.raft_mut(1)
        .propose_conf_change(ConfChange::RemoveNode(3))
        .unwrap();
    net.stabilize();
    let storage = net.remove(1).unwrap().crash();
    assert_eq!(storage.snapshot.index, 2);
    assert_eq!(storage.entries.len(), 2);
    assert_eq!(storage.hard_state.commit, 3);

    let restarted = MemNode::restart(paper(1), storage).unwrap();
    assert_eq!(restarted.raft().conf_state(), &conf(&[1, 2, 3], &[4]));
    net.insert(restarted);
    net.recover();

    // Once a new leader commits an entry of its term, the removal takes effect.
    elect(&mut net, 1);
    for id in [1, 2] {
        assert_eq!(net.raft(id).conf_state(), &conf(&[1, 2], &[4]), "node {id}");
    }
}

// =========================================================================
// Snapshots (paper §7, dissertation §5)
// =========================================================================

/// §7: a follower so far behind that the leader has discarded the entries it
/// needs receives the snapshot (InstallSnapshot), then the entries after it;
/// its state machine ends up equal to the leader's.
#[test]
fn slow_follower_catches_up_by_snapshot() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    net.isolate(3);
    propose(&mut net, 1, "b");
    net.raft_mut(1)
        .propose_conf_change(ConfChange::AddLearner(9))
        .unwrap();
    net.stabilize();
    propose(&mut net, 1, "c");
    let meta = net.node_mut(1).snapshot_and_compact().unwrap();
    assert_eq!(meta.index, 5);
    assert_eq!(meta.conf_state, conf(&[1, 2, 3], &[9]));
    assert_eq!(net.raft(1).first_index(), 6);

    net.recover();
    net.clear_delivered();
    net.tick(1, 1);
    assert!(
        net.delivered()
            .iter()
            .any(|m| is(m, 1, 3, "Snapshot")
                && m.kind == MessageKind::Snapshot { meta: meta.clone() })
    );
    assert_eq!(net.raft(3).snapshot_meta(), &meta);
    assert_eq!(net.node(3).storage().snapshot.index, 5);
    // The membership comes with the snapshot.
    assert_eq!(net.raft(3).conf_state(), &conf(&[1, 2, 3], &[9]));
    assert_eq!(net.node(3).applied(), net.node(1).applied());
    assert_eq!(
        net.raft(1).progress(3).unwrap().state,
        ProgressState::Replicate
    );

    propose(&mut net, 1, "d");
    assert_eq!(applied(&net, 3), bytes(&["a", "b", "c", "d"]));
    assert_eq!(net.node(3).applied(), net.node(1).applied());
}

/// §5.1 (dissertation): only applied state can be snapshotted, and the log
/// cannot be compacted twice up to the same point.
#[test]
fn compact_refuses_unapplied_or_compacted_index() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    assert_eq!(net.raft(1).applied_index(), 2);

    assert_eq!(
        net.raft_mut(1).compact(3),
        Err(CompactError::NotApplied {
            index: 3,
            applied: 2
        })
    );
    let meta = net.node_mut(1).snapshot_and_compact().unwrap();
    assert_eq!(meta.index, 2);
    assert_eq!(meta.term, 1);
    assert_eq!(
        net.node_mut(1).snapshot_and_compact(),
        Err(CompactError::AlreadyCompacted {
            index: 2,
            snapshot: 2
        })
    );
    assert_eq!(
        net.raft_mut(1).compact(1),
        Err(CompactError::AlreadyCompacted {
            index: 1,
            snapshot: 2
        })
    );
    assert_eq!(net.raft(1).first_index(), 3);
}

/// §7: if sending the snapshot fails, the leader is told so and probes the
/// follower again, which sends the snapshot anew; until then it waits.
#[test]
fn snapshot_failure_probes_again() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.isolate(3);
    propose(&mut net, 1, "a");
    net.node_mut(1).snapshot_and_compact().unwrap();
    net.recover();

    net.ignore("Snapshot");
    net.tick(1, 1);
    let pr = net.raft(1).progress(3).unwrap();
    assert_eq!(pr.state, ProgressState::Snapshot);
    assert!(pr.paused);
    net.tick(1, 2);
    assert_eq!(
        net.raft(1).progress(3).unwrap().state,
        ProgressState::Snapshot
    );

    net.raft_mut(1).report_snapshot(3, false);
    let pr = net.raft(1).progress(3).unwrap();
    assert_eq!(pr.state, ProgressState::Probe);
    assert!(pr.paused, "waits for an answer before probing");

    net.recover();
    net.clear_delivered();
    net.tick(1, 1);
    assert_eq!(count(net.delivered(), 1, 3, "Snapshot"), 1);
    assert_eq!(
        net.raft(1).progress(3).unwrap().state,
        ProgressState::Replicate
    );
    assert_eq!(applied(&net, 3), bytes(&["a"]));
}

/// §7: a snapshot describing a prefix of the follower's log (a retransmission,
/// say) must not discard the entries that follow it: a snapshot that covers
/// nothing beyond the follower's commit index is ignored.
#[test]
fn stale_snapshot_is_ignored() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    propose(&mut net, 1, "b");
    assert_eq!(net.raft(2).commit_index(), 3);

    let stale = Message {
        from: 1,
        to: 2,
        term: 1,
        kind: MessageKind::Snapshot {
            meta: SnapshotMeta {
                index: 2,
                term: 1,
                conf_state: conf(&[1, 2, 3], &[]),
            },
        },
    };
    net.raft_mut(2).step(stale).unwrap();
    let rd = cycle(&mut net, 2);
    assert_eq!(rd.snapshot, None);
    assert_eq!(net.raft(2).snapshot_meta().index, 0);
    assert_eq!(net.raft(2).last_index(), 3);
    assert_eq!(net.raft(2).commit_index(), 3);
    assert_eq!(
        rd.persisted_messages
            .iter()
            .chain(&rd.messages)
            .map(|m| m.kind.clone())
            .collect::<Vec<_>>(),
        vec![MessageKind::AppendResponse {
            index: 3,
            reject: false,
            hint: None
        }]
    );
    assert_eq!(applied(&net, 2), bytes(&["a", "b"]));
}

// =========================================================================
// Flow control (dissertation §10.2.2 batching and pipelining, as etcd does)
// =========================================================================

/// §10.2.2: the leader pipelines appends to a follower it knows matches, but
/// at most `max_inflight_msgs` unacknowledged; each acknowledgement frees
/// room for more.
#[test]
fn inflight_limit_bounds_unacked_appends() {
    let limited = |id| Config {
        max_inflight_msgs: 3,
        ..Config::new(id)
    };
    let mut net = Network::new(&[1, 2, 3], limited);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    assert_eq!(
        net.raft(1).progress(2).unwrap().state,
        ProgressState::Replicate
    );

    net.cut_one_way(2, 1);
    net.clear_delivered();
    for i in 0..6 {
        propose(&mut net, 1, &format!("p{i}"));
    }
    assert_eq!(append_sizes(net.delivered(), 1, 2), vec![1, 1, 1]);
    assert_eq!(append_sizes(net.delivered(), 1, 3), vec![1; 6]);
    let pr = net.raft(1).progress(2).unwrap();
    assert_eq!(pr.inflight, 3);
    assert!(pr.paused);

    // One acknowledgement (of the first message, ending at index 3) frees one
    // slot, and the leader sends everything pending in it.
    net.clear_delivered();
    let term = net.raft(1).term();
    let ack = Message {
        from: 2,
        to: 1,
        term,
        kind: MessageKind::AppendResponse {
            index: 3,
            reject: false,
            hint: None,
        },
    };
    net.raft_mut(1).step(ack).unwrap();
    net.stabilize();
    assert_eq!(append_sizes(net.delivered(), 1, 2), vec![3]);
    assert_eq!(net.raft(1).progress(2).unwrap().inflight, 3);

    net.recover();
    net.tick(1, 1);
    let pr = net.raft(1).progress(2).unwrap();
    assert_eq!(pr.matched, net.raft(1).last_index());
    assert_eq!(pr.inflight, 0);
    assert_eq!(applied(&net, 2), applied(&net, 1));
}

/// §10.2.2 with paper §5.3: pipelining assumes appends arrive; when the
/// transport reports a message to a replicating follower undeliverable, the
/// leader stops pipelining and probes it again, one append at a time.
#[test]
fn report_unreachable_moves_to_probe() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    assert_eq!(
        net.raft(1).progress(2).unwrap().state,
        ProgressState::Replicate
    );

    net.raft_mut(1).report_unreachable(2);
    assert_eq!(net.raft(1).progress(2).unwrap().state, ProgressState::Probe);
    // On a follower the report means nothing.
    net.raft_mut(3).report_unreachable(2);
    assert_eq!(net.raft(3).role(), Role::Follower);

    net.cut_one_way(2, 1);
    net.clear_delivered();
    for i in 0..3 {
        propose(&mut net, 1, &format!("p{i}"));
    }
    assert_eq!(count(net.delivered(), 1, 2, "Append"), 1);

    net.recover();
    net.tick(1, 1);
    assert_eq!(
        net.raft(1).progress(2).unwrap().state,
        ProgressState::Replicate
    );
    assert_eq!(applied(&net, 2), applied(&net, 1));
}

/// §10.2.2 batching: one append carries at most `max_size_per_msg` bytes of
/// entries, but always at least one entry.
#[test]
fn max_size_per_msg_bounds_batches() {
    // Entries of 4 data bytes weigh 20: two fit in 45 bytes, three do not.
    let small = |id| Config {
        max_size_per_msg: 45,
        ..Config::new(id)
    };
    let mut net = Network::new(&[1, 2, 3], small);
    elect(&mut net, 1);
    net.isolate(3);
    for i in 0..7 {
        propose(&mut net, 1, &format!("e{i:03}"));
    }
    let big = "x".repeat(100);
    propose(&mut net, 1, &big);
    net.recover();

    net.clear_delivered();
    net.tick(1, 1);
    let mut sizes = Vec::new();
    for m in net.delivered() {
        if let MessageKind::Append { entries, .. } = &m.kind
            && m.to == 3
            && !entries.is_empty()
        {
            let bytes: u64 = entries.iter().map(|e| e.size()).sum();
            assert!(
                entries.len() == 1 || bytes <= 45,
                "{} entries of {bytes} bytes",
                entries.len()
            );
            sizes.push(entries.len());
        }
    }
    assert!(sizes.iter().all(|&n| n <= 2), "{sizes:?}");
    assert!(sizes.contains(&2), "{sizes:?}");
    assert_eq!(applied(&net, 3), applied(&net, 1));
    assert_eq!(applied(&net, 3).len(), 8);
}

/// §10.2.2 (batching under load), as etcd bounds it: proposals beyond
/// `max_uncommitted_size` bytes not yet committed are refused at the leader,
/// and accepted again once entries commit.
#[test]
fn max_uncommitted_size_limits_proposals() {
    let bounded = |id| Config {
        max_uncommitted_size: 100,
        ..Config::new(id)
    };
    let mut net = Network::new(&[1, 2, 3], bounded);
    elect(&mut net, 1);
    net.isolate(1);
    // Each entry weighs 20 bytes: five fit in 100.
    for i in 0..5 {
        propose(&mut net, 1, &format!("u{i:03}"));
    }
    assert_eq!(
        net.propose(1, b"u005"),
        Err(ProposeError::TooMuchUncommitted)
    );
    // A forwarded proposal is dropped the same way.
    net.recover();
    net.cut(1, 3);
    let last = net.raft(1).last_index();
    net.cut_one_way(1, 2);
    assert_eq!(net.propose(2, b"f000"), Ok(Proposed::Forwarded { to: 1 }));
    assert_eq!(net.raft(1).last_index(), last);

    net.recover();
    net.tick(1, 1);
    assert_eq!(net.raft(1).commit_index(), last);
    propose(&mut net, 1, "u005");
    assert_eq!(applied(&net, 2).len(), 6);
}

/// Paper §5.3: until the leader finds where a follower's log matches its own
/// (probe state) it sends one AppendEntries and waits for the answer (or a
/// heartbeat response) before sending another, whatever is proposed meanwhile.
#[test]
fn probe_state_sends_one_message_at_a_time() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    net.cut_one_way(2, 1);
    elect(&mut net, 1);
    assert_eq!(net.raft(1).progress(2).unwrap().state, ProgressState::Probe);
    for i in 0..3 {
        propose(&mut net, 1, &format!("p{i}"));
    }
    assert_eq!(count(net.delivered(), 1, 2, "Append"), 1);
    assert!(net.raft(1).progress(2).unwrap().paused);

    net.tick(1, 1);
    assert_eq!(count(net.delivered(), 1, 2, "Append"), 1);
    assert_eq!(count(net.delivered(), 1, 2, "Heartbeat"), 1);

    net.recover();
    net.tick(1, 1);
    assert_eq!(
        net.raft(1).progress(2).unwrap().state,
        ProgressState::Replicate
    );
    assert_eq!(applied(&net, 2), bytes(&["p0", "p1", "p2"]));
}

// =========================================================================
// Membership guards (etcd's strict reconfiguration check)
// =========================================================================

fn unsafe_change(r: Result<Proposed, ProposeError>) -> UnsafeConfChange {
    match r {
        Err(ProposeError::UnsafeConfChange(u)) => u,
        other => panic!("expected a guard's refusal, got {other:?}"),
    }
}

/// A learner that never answered the leader is not promoted, on the leader
/// or through a follower (which hears why); once it has caught up it is.
#[test]
fn guarded_promotion_waits_for_a_connected_learner() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    // Node 4 does not exist yet: nothing reaches it.
    net.raft_mut(1)
        .propose_conf_change_checked(ConfChange::AddLearner(4), false)
        .expect("adding a learner leaves the voters alone");
    net.stabilize();
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2, 3], &[4]));

    assert_eq!(
        unsafe_change(
            net.raft_mut(1)
                .propose_conf_change_checked(ConfChange::AddVoter(4), false)
        ),
        UnsafeConfChange::NotConnected { id: 4 }
    );

    // Through a follower: the leader answers with its reason.
    net.clear_delivered();
    assert!(matches!(
        net.raft_mut(2)
            .propose_conf_change_checked(ConfChange::AddVoter(4), false),
        Ok(Proposed::Forwarded { to: 1 })
    ));
    net.stabilize();
    let refusal = net
        .delivered()
        .iter()
        .find_map(|m| match &m.kind {
            MessageKind::ConfChangeRefused { change, reason } if m.from == 1 && m.to == 2 => {
                Some((*change, reason.clone()))
            }
            _ => None,
        })
        .expect("the leader answers the follower");
    assert_eq!(refusal.0, ConfChange::AddVoter(4));
    assert!(
        refusal.1.contains("node 4 is not connected"),
        "{}",
        refusal.1
    );
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2, 3], &[4]));

    // Node 4 starts, catches up, and is promoted.
    net.insert(MemNode::new(cfg(4), &[]).unwrap());
    net.tick(1, 2);
    assert_eq!(applied(&net, 4), bytes(&["a"]));
    net.raft_mut(1)
        .propose_conf_change_checked(ConfChange::AddVoter(4), false)
        .expect("a connected learner that caught up is promoted");
    net.stabilize();
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2, 3, 4], &[]));
}

/// A connected learner that trails the leader's commit index by more than
/// `promote_max_lag` entries is not promoted; `force` overrides.
#[test]
fn guarded_promotion_refuses_a_lagging_learner() {
    let small_lag = |id| Config {
        promote_max_lag: 2,
        ..cfg(id)
    };
    let mut net = with_learners(&[1, 2, 3], &[4], small_lag);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    assert_eq!(applied(&net, 4), bytes(&["a"]));
    let matched = net.raft(1).progress(4).unwrap().matched;
    // Cut off; no tick passes, so it still counts as connected.
    net.cut(1, 4);
    for i in 0..5 {
        propose(&mut net, 1, &format!("b{i}"));
    }
    let committed = net.raft(1).commit_index();
    assert!(net.raft(1).progress(4).unwrap().connected);
    assert_eq!(
        unsafe_change(
            net.raft_mut(1)
                .propose_conf_change_checked(ConfChange::AddVoter(4), false)
        ),
        UnsafeConfChange::Lagging {
            id: 4,
            matched,
            committed
        }
    );
    net.recover();
    net.raft_mut(1)
        .propose_conf_change_checked(ConfChange::AddVoter(4), true)
        .expect("forced");
    net.stabilize();
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2, 3, 4], &[]));
}

/// In a group of three with one member down, removing a member that is up
/// would leave one active voter of two: refused. Removing the one that is
/// down is fine, and `force` overrides.
#[test]
fn guarded_removal_keeps_an_active_quorum() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    propose(&mut net, 1, "a");
    net.isolate(3);
    // Two check-quorum rounds: node 3 has not answered in either.
    let election = net.raft(1).config().election_tick;
    net.tick(1, 2 * election);
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert!(net.raft(1).progress(2).unwrap().connected);
    assert!(!net.raft(1).progress(3).unwrap().connected);
    assert_eq!(
        unsafe_change(
            net.raft_mut(1)
                .propose_conf_change_checked(ConfChange::RemoveNode(2), false)
        ),
        UnsafeConfChange::NoActiveQuorum {
            id: 2,
            removes: true,
            voters: 2,
            active: 1,
            quorum: 2
        }
    );
    // Demoting it is the same.
    assert!(matches!(
        net.raft_mut(1)
            .propose_conf_change_checked(ConfChange::AddLearner(2), false),
        Err(ProposeError::UnsafeConfChange(
            UnsafeConfChange::NoActiveQuorum { id: 2, .. }
        ))
    ));
    // Adding a voter that is not there: refused as not connected first.
    assert_eq!(
        unsafe_change(
            net.raft_mut(1)
                .propose_conf_change_checked(ConfChange::AddVoter(5), false)
        ),
        UnsafeConfChange::NotConnected { id: 5 }
    );
    net.raft_mut(1)
        .propose_conf_change_checked(ConfChange::RemoveNode(3), false)
        .expect("removing the member that is down");
    net.stabilize();
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2], &[]));
}

/// With `force`, the leader appends a change its guards would refuse, also
/// when a follower forwards it.
#[test]
fn forced_removal_skips_the_guards() {
    let mut net = Network::new(&[1, 2, 3], cfg);
    elect(&mut net, 1);
    net.isolate(3);
    let election = net.raft(1).config().election_tick;
    net.tick(1, 2 * election);
    assert!(
        net.raft_mut(1)
            .propose_conf_change_checked(ConfChange::RemoveNode(2), false)
            .is_err()
    );
    // Through the follower: refused, then forced.
    net.clear_delivered();
    net.raft_mut(2)
        .propose_conf_change_checked(ConfChange::RemoveNode(2), false)
        .expect("forwarded");
    net.stabilize();
    assert_eq!(
        count(net.delivered(), 1, 2, "ConfChangeRefused"),
        1,
        "the leader says why"
    );
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 2, 3], &[]));
    assert!(matches!(
        net.raft_mut(2)
            .propose_conf_change_checked(ConfChange::RemoveNode(2), true),
        Ok(Proposed::Forwarded { to: 1 })
    ));
    net.stabilize();
    assert_eq!(net.raft(1).conf_state(), &conf(&[1, 3], &[]));
}
