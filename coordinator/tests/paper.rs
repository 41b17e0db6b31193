//! Scenario tests organised by the sections of the Raft paper (Ongaro and
//! Ousterhout, "In Search of an Understandable Consensus Algorithm"), with a
//! few from the dissertation where the paper leaves a detail open.
//!
//! Most tests drive a single [`Raft`] by hand: they build its durable state,
//! feed it hand-made [`Message`]s and look at what comes out of
//! [`Raft::ready`]. Scenarios that need several nodes run on the in-memory
//! [`Network`]. Everything is deterministic: seeds are fixed and no test
//! reads a clock. Test names follow etcd's raft suite where one matches.

use std::collections::BTreeSet;

use consensus::memory::{MemNode, MemStorage, Network};
use coordinator::raft::{
    ConfChange, Config, Entry, EntryPayload, HardState, Index, InitialState, Message, MessageKind,
    NodeId, ProgressState, ProposeError, Proposed, Raft, Role, Term,
};

// ---- helpers ------------------------------------------------------------

/// The paper's algorithm: no pre-vote, no check-quorum.
fn paper_cfg(id: NodeId) -> Config {
    Config {
        pre_vote: false,
        check_quorum: false,
        ..Config::new(id)
    }
}

/// Ids `1..=n`.
fn ids(n: u64) -> Vec<NodeId> {
    (1..=n).collect()
}

/// An entry whose payload names its position and term, so that an
/// overwritten entry is visibly different from the one it replaced.
fn ent(index: Index, term: Term) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Normal(format!("{index}@{term}").into_bytes().into()),
    }
}

/// A log starting at index 1 with the given terms.
fn ents(terms: &[Term]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| ent(i as Index + 1, t))
        .collect()
}

fn hs(term: Term, vote: Option<NodeId>, commit: Index) -> HardState {
    HardState { term, vote, commit }
}

/// A node of a group of `voters` restarted from the given durable state.
fn restore(cfg: Config, voters: &[NodeId], hard_state: HardState, log: Vec<Entry>) -> Raft {
    let init = InitialState {
        hard_state,
        entries: log,
        ..InitialState::bootstrap(voters.iter().copied())
    };
    Raft::new(cfg, init).expect("valid config")
}

/// A brand-new node of a group of `voters` with the paper's settings.
fn fresh(id: NodeId, voters: &[NodeId]) -> Raft {
    restore(paper_cfg(id), voters, HardState::default(), Vec::new())
}

fn msg(from: NodeId, to: NodeId, term: Term, kind: MessageKind) -> Message {
    Message {
        from,
        to,
        term,
        kind,
    }
}

fn append(prev_index: Index, prev_term: Term, entries: Vec<Entry>, commit: Index) -> MessageKind {
    MessageKind::Append {
        prev_index,
        prev_term,
        entries,
        commit,
    }
}

fn heartbeat(commit: Index) -> MessageKind {
    MessageKind::Heartbeat { commit, ctx: None }
}

fn vote_req(last_index: Index, last_term: Term) -> MessageKind {
    MessageKind::Vote {
        pre: false,
        last_index,
        last_term,
        transfer: false,
    }
}

fn vote_resp(granted: bool) -> MessageKind {
    MessageKind::VoteResponse {
        pre: false,
        granted,
    }
}

fn ack(index: Index) -> MessageKind {
    MessageKind::AppendResponse {
        index,
        reject: false,
        hint: None,
    }
}

/// An append response's `(index, reject, hint)`.
type AppendResponse = (Index, bool, Option<(Index, Term)>);

/// Everything a node handed out over one or more `ready` / `advance` cycles.
#[derive(Debug, Default)]
struct Out {
    messages: Vec<Message>,
    persisted: Vec<Message>,
    entries: Vec<Entry>,
    committed: Vec<Entry>,
}

impl Out {
    /// All messages, in the order they may leave.
    fn all(&self) -> impl Iterator<Item = &Message> {
        self.messages.iter().chain(self.persisted.iter())
    }

    fn extend(&mut self, other: Out) {
        self.messages.extend(other.messages);
        self.persisted.extend(other.persisted);
        self.entries.extend(other.entries);
        self.committed.extend(other.committed);
    }

    /// The appends sent to `to`: `(prev_index, prev_term, entries, commit)`.
    fn appends_to(&self, to: NodeId) -> Vec<(Index, Term, Vec<Entry>, Index)> {
        self.all()
            .filter(|m| m.to == to)
            .filter_map(|m| match &m.kind {
                MessageKind::Append {
                    prev_index,
                    prev_term,
                    entries,
                    commit,
                } => Some((*prev_index, *prev_term, entries.clone(), *commit)),
                _ => None,
            })
            .collect()
    }

    /// The `(index, reject, hint)` of every append response.
    fn append_responses(&self) -> Vec<AppendResponse> {
        self.all()
            .filter_map(|m| match &m.kind {
                MessageKind::AppendResponse {
                    index,
                    reject,
                    hint,
                } => Some((*index, *reject, *hint)),
                _ => None,
            })
            .collect()
    }

    /// Whether every vote response granted, and how many there were.
    fn vote_grants(&self) -> Vec<bool> {
        self.all()
            .filter_map(|m| match m.kind {
                MessageKind::VoteResponse { granted, .. } => Some(granted),
                _ => None,
            })
            .collect()
    }
}

/// Runs `ready` / `advance` until the node is quiet, acting as a driver that
/// persists and applies everything at once.
fn drain(r: &mut Raft) -> Out {
    let mut out = Out::default();
    while r.has_ready() {
        let rd = r.ready();
        out.messages.extend(rd.messages);
        out.persisted.extend(rd.persisted_messages);
        out.entries.extend(rd.entries);
        out.committed.extend(rd.committed_entries);
        r.advance();
    }
    out
}

/// Plays followers whose logs match the leader's: each append to one of
/// `acceptors` is acknowledged up to its last entry, until the leader has
/// nothing more to send. Returns everything the leader handed out.
fn accept_all(r: &mut Raft, acceptors: &[NodeId]) -> Out {
    let mut total = Out::default();
    loop {
        let out = drain(r);
        let acks: Vec<Message> = out
            .all()
            .filter(|m| acceptors.contains(&m.to))
            .filter_map(|m| match &m.kind {
                MessageKind::Append {
                    prev_index,
                    entries,
                    ..
                } => Some(msg(
                    m.to,
                    m.from,
                    m.term,
                    ack(prev_index + entries.len() as u64),
                )),
                _ => None,
            })
            .collect();
        total.extend(out);
        if acks.is_empty() {
            return total;
        }
        for a in acks {
            r.step(a).unwrap();
        }
    }
}

/// Makes `r` campaign (paper settings) and win with granted votes. The
/// leader's first appends are left in its next `ready`.
fn elect(r: &mut Raft) {
    r.campaign();
    let term = r.term();
    let me = r.id();
    let others: Vec<NodeId> = r
        .conf_state()
        .voters
        .iter()
        .copied()
        .filter(|&v| v != me)
        .collect();
    for v in others {
        if r.role() == Role::Leader {
            break;
        }
        r.step(msg(v, me, term, vote_resp(true))).unwrap();
    }
    assert_eq!(r.role(), Role::Leader, "node {me} should have won");
}

/// Node 1 leading a fresh group of `n`, its empty entry committed everywhere.
fn stable_leader(n: u64) -> Raft {
    let voters = ids(n);
    let mut r = fresh(1, &voters);
    elect(&mut r);
    accept_all(&mut r, &voters[1..]);
    assert_eq!(r.commit_index(), r.last_index());
    r
}

/// The log a node holds, as entries.
fn log_of(r: &Raft) -> Vec<Entry> {
    r.entries(r.first_index(), r.last_index() + 1).to_vec()
}

/// The terms of a node's log.
fn terms_of(r: &Raft) -> Vec<Term> {
    log_of(r).iter().map(|e| e.term).collect()
}

/// A network whose node `i + 1` restarts from `states[i]`.
fn restored_network(states: &[(HardState, Vec<Entry>)], cfg: impl Fn(NodeId) -> Config) -> Network {
    let voters = ids(states.len() as u64);
    let mut net = Network::default();
    for (i, (hard_state, log)) in states.iter().enumerate() {
        let id = i as NodeId + 1;
        let storage = MemStorage {
            hard_state: *hard_state,
            entries: log.clone(),
            ..MemStorage::bootstrap(&voters)
        };
        net.insert(MemNode::restart(cfg(id), storage).expect("valid config"));
    }
    net
}

/// The applied payloads of a node, in order.
fn applied(net: &Network, id: NodeId) -> Vec<Vec<u8>> {
    net.node(id)
        .applied()
        .iter()
        .map(|(_, d)| d.clone())
        .collect()
}

/// Nodes that believe they lead.
fn leaders(net: &Network) -> Vec<NodeId> {
    net.ids()
        .into_iter()
        .filter(|&id| net.raft(id).role() == Role::Leader)
        .collect()
}

/// How many messages of `kind` were delivered from `from` to `to`.
fn delivered(net: &Network, from: NodeId, to: NodeId, kind: &str) -> usize {
    net.delivered()
        .iter()
        .filter(|m| m.from == from && m.to == to && m.kind.name() == kind)
        .count()
}

/// Runs every node's ready cycles and delivers the messages `pass` lets
/// through, until the network is quiet. `pass` sees the network as it is
/// when the message would land.
fn pump(net: &mut Network, mut pass: impl FnMut(&Network, &Message) -> bool) {
    loop {
        let mut out = Vec::new();
        for id in net.ids() {
            out.extend(net.node_mut(id).handle_ready());
        }
        if out.is_empty() {
            return;
        }
        for env in out {
            if pass(net, &env.msg) {
                let to = env.msg.to;
                let _ = net.node_mut(to).step(env);
            }
        }
    }
}

/// Ticks every node until `done` holds, failing after `max` rounds.
fn tick_until(net: &mut Network, max: usize, mut done: impl FnMut(&Network) -> bool) {
    for _ in 0..max {
        if done(net) {
            return;
        }
        net.tick_all();
    }
    assert!(done(net), "condition not reached within {max} rounds");
}

// ---- §5.1 Raft basics: terms --------------------------------------------

/// Builds node 1 of `{1, 2, 3}` in `role`, at term 1 (follower and
/// pre-candidate) or 2 (candidate and leader).
fn in_role(role: Role) -> Raft {
    let cfg = Config {
        pre_vote: role == Role::PreCandidate,
        ..paper_cfg(1)
    };
    let mut r = restore(cfg, &[1, 2, 3], hs(1, None, 0), Vec::new());
    match role {
        Role::Follower => {}
        Role::PreCandidate | Role::Candidate => r.campaign(),
        Role::Leader => elect(&mut r),
    }
    drain(&mut r);
    assert_eq!(r.role(), role);
    r
}

/// Reference: §5.1 "If a server receives a request [or response] with a
/// higher term, it updates its current term to the larger value. If a
/// candidate or leader discovers that its term is out of date, it
/// immediately reverts to follower state." Checked in every role, including
/// the pre-candidate of §9.6, for every kind of message that carries a term.
#[test]
fn update_term_from_message_in_every_role() {
    let kinds: Vec<(MessageKind, bool)> = vec![
        (append(0, 0, Vec::new(), 0), true),
        (heartbeat(0), true),
        (vote_req(0, 0), false),
        (vote_resp(false), false),
        (ack(0), false),
        (MessageKind::HeartbeatResponse { ctx: None }, false),
    ];
    for role in [
        Role::Follower,
        Role::PreCandidate,
        Role::Candidate,
        Role::Leader,
    ] {
        for (kind, from_leader) in &kinds {
            let mut r = in_role(role);
            let name = kind.name();
            r.step(msg(2, 1, 5, kind.clone())).unwrap();
            assert_eq!(r.term(), 5, "{role} stepping {name}");
            assert_eq!(r.role(), Role::Follower, "{role} stepping {name}");
            let want_leader = from_leader.then_some(2);
            assert_eq!(r.leader(), want_leader, "{role} stepping {name}");
            // The new term is made durable.
            let rd = r.ready();
            assert_eq!(rd.hard_state.map(|h| h.term), Some(5), "{role} {name}");
        }
    }
}

/// Reference: §5.1 "If a server receives a request with a stale term
/// number, it rejects the request." With the paper's settings a stale
/// message changes nothing: no entries are appended, no commit index moves,
/// no vote is granted and a stale vote does not count. A stale request is
/// answered only with a rejection carrying the current term (Figure 2: the
/// result's `term` is "for leader/candidate to update itself"); a stale
/// response is not answered.
#[test]
fn reject_stale_term_messages() {
    let stale: Vec<MessageKind> = vec![
        append(0, 0, ents(&[2]), 1),
        heartbeat(1),
        vote_req(10, 10),
        vote_resp(true),
        ack(5),
        MessageKind::AppendResponse {
            index: 1,
            reject: true,
            hint: Some((0, 0)),
        },
    ];
    // Follower, candidate and leader, all at term 3.
    let follower = || restore(paper_cfg(1), &[1, 2, 3], hs(3, None, 0), Vec::new());
    let candidate = || {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(2, None, 0), Vec::new());
        r.campaign();
        drain(&mut r);
        r
    };
    let leader = || {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(2, None, 0), Vec::new());
        elect(&mut r);
        drain(&mut r);
        r
    };
    let makers: [&dyn Fn() -> Raft; 3] = [&follower, &candidate, &leader];
    for make in makers {
        for kind in &stale {
            let mut r = make();
            let role = r.role();
            let before = (r.hard_state(), log_of(&r), r.leader());
            let progress = r.progress(2);
            r.step(msg(2, 1, 2, kind.clone())).unwrap();
            // A stale vote from node 3 as well, so a candidate would win if it counted.
            r.step(msg(3, 1, 2, kind.clone())).unwrap();
            assert_eq!(r.role(), role, "{role} stepping stale {}", kind.name());
            assert_eq!(
                (r.hard_state(), log_of(&r), r.leader()),
                before,
                "{role} stepping stale {}",
                kind.name()
            );
            assert_eq!(r.progress(2), progress, "{role} {}", kind.name());
            let out = drain(&mut r);
            let request = matches!(
                kind,
                MessageKind::Append { .. }
                    | MessageKind::Heartbeat { .. }
                    | MessageKind::Vote { .. }
            );
            let replies: Vec<&Message> = out.all().collect();
            let rejections = replies.len() == 2
                && replies.iter().zip([2, 3]).all(|(m, to)| {
                    m.to == to
                        && m.term == 3
                        && matches!(
                            m.kind,
                            MessageKind::AppendResponse { index: 0, .. }
                                | MessageKind::VoteResponse { granted: false, .. }
                        )
                });
            assert!(
                if request {
                    rejections
                } else {
                    replies.is_empty()
                },
                "{role} answered a stale {}: {:?}",
                kind.name(),
                replies
            );
            assert!(out.entries.is_empty() && out.committed.is_empty());
        }
    }
}

/// Reference: §5.1 (a stale leader learns the current term from any reply)
/// and §9.6 / §6.2: with check-quorum or pre-vote a follower may not let a
/// stale leader's higher-term rival reach it, so it answers a stale append
/// with its own term, and the stale leader steps down on reading it.
#[test]
fn stale_leader_learns_higher_term_from_rejection() {
    let cq = |id| Config {
        check_quorum: true,
        ..paper_cfg(id)
    };
    let mut follower = restore(cq(2), &[1, 2, 3], hs(3, None, 0), Vec::new());
    follower
        .step(msg(1, 2, 2, append(0, 0, ents(&[2]), 0)))
        .unwrap();
    let out = drain(&mut follower);
    assert!(out.entries.is_empty(), "the stale append was not applied");
    let replies: Vec<&Message> = out.all().collect();
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].to, replies[0].term), (1, 3));

    // The stale leader, at term 2, reads the reply and steps down.
    let mut stale = restore(cq(1), &[1, 2, 3], hs(1, None, 0), Vec::new());
    elect(&mut stale);
    assert_eq!(stale.term(), 2);
    stale.step(replies[0].clone()).unwrap();
    assert_eq!(stale.role(), Role::Follower);
    assert_eq!(stale.term(), 3);
    assert_eq!(stale.leader(), None);
}

// ---- §5.2 Leader election -------------------------------------------------

/// Reference: §5.2 "Leaders send periodic heartbeats (AppendEntries RPCs
/// that carry no log entries) to all followers in order to maintain their
/// authority." One round every `heartbeat_tick` ticks, to every follower,
/// carrying the commit index, and sent without waiting for persistence.
#[test]
fn leader_broadcasts_heartbeat_every_heartbeat_tick() {
    let cfg = Config {
        heartbeat_tick: 3,
        ..paper_cfg(1)
    };
    let mut r = restore(cfg, &[1, 2, 3], HardState::default(), Vec::new());
    elect(&mut r);
    accept_all(&mut r, &[2, 3]);
    let commit = r.commit_index();
    assert_eq!(commit, 1);
    for round in 0..4 {
        for _ in 0..2 {
            r.tick();
            let out = drain(&mut r);
            assert!(out.all().next().is_none(), "round {round}: early beat");
        }
        r.tick();
        let out = drain(&mut r);
        assert!(out.persisted.is_empty());
        let mut to: Vec<NodeId> = out.messages.iter().map(|m| m.to).collect();
        to.sort_unstable();
        assert_eq!(to, vec![2, 3], "round {round}");
        for m in &out.messages {
            assert_eq!(m.term, r.term());
            assert_eq!(m.kind, heartbeat(commit));
        }
    }
}

/// Reference: §5.2 "If a follower receives no communication over a period
/// of time called the election timeout, then it assumes there is no viable
/// leader and begins an election": it increments its term, votes for
/// itself and issues RequestVote to every other server, carrying its last
/// log index and term.
#[test]
fn follower_starts_election_after_election_timeout() {
    let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(1, None, 1), ents(&[1, 1]));
    let timeout = r.randomized_election_timeout();
    assert!((10..20).contains(&timeout));
    for _ in 1..timeout {
        r.tick();
    }
    assert_eq!((r.role(), r.term()), (Role::Follower, 1));
    r.tick();
    assert_eq!(r.role(), Role::Candidate);
    assert_eq!(r.term(), 2);
    assert_eq!(r.vote(), Some(1));
    let out = drain(&mut r);
    assert_eq!(out.committed.len(), 1, "the committed entry is applied");
    let mut votes: Vec<&Message> = out.all().collect();
    votes.sort_by_key(|m| m.to);
    assert_eq!(
        votes,
        [&msg(1, 2, 2, vote_req(2, 1)), &msg(1, 3, 2, vote_req(2, 1))]
    );
}

/// Reference: §5.2 "If many followers become candidates at the same time,
/// votes could be split ... each candidate will time out and start a new
/// election by incrementing its term and initiating another round."
#[test]
fn candidate_starts_new_election_after_election_timeout() {
    let mut r = fresh(1, &[1, 2, 3]);
    r.campaign();
    drain(&mut r);
    assert_eq!((r.role(), r.term()), (Role::Candidate, 1));
    for expected_term in 2..6 {
        let timeout = r.randomized_election_timeout();
        assert!((10..20).contains(&timeout));
        for _ in 1..timeout {
            r.tick();
        }
        assert_eq!(
            r.term(),
            expected_term - 1,
            "no election before the timeout"
        );
        r.tick();
        assert_eq!((r.role(), r.term()), (Role::Candidate, expected_term));
        assert_eq!(r.vote(), Some(1));
        let out = drain(&mut r);
        let mut to: Vec<NodeId> = out
            .all()
            .filter(|m| m.term == expected_term && m.kind == vote_req(0, 0))
            .map(|m| m.to)
            .collect();
        to.sort_unstable();
        assert_eq!(to, vec![2, 3]);
    }
}

/// Reference: §5.2 "A candidate wins an election if it receives votes from
/// a majority of the servers in the full cluster for the same term"; it
/// loses (returns to follower) once a majority has refused, and otherwise
/// stays a candidate.
#[test]
fn leader_election_in_one_round() {
    // (group size, votes received, resulting role)
    type Case = (u64, Vec<(NodeId, bool)>, Role);
    let table: Vec<Case> = vec![
        (1, vec![], Role::Leader),
        (3, vec![(2, true), (3, true)], Role::Leader),
        (3, vec![(2, true)], Role::Leader),
        (
            5,
            vec![(2, true), (3, true), (4, true), (5, true)],
            Role::Leader,
        ),
        (5, vec![(2, true), (3, true), (4, true)], Role::Leader),
        (5, vec![(2, true), (3, true)], Role::Leader),
        // Losing.
        (3, vec![(2, false), (3, false)], Role::Follower),
        (
            5,
            vec![(2, false), (3, false), (4, false), (5, false)],
            Role::Follower,
        ),
        (
            5,
            vec![(2, true), (3, false), (4, false), (5, false)],
            Role::Follower,
        ),
        // Neither: a split or an unfinished count.
        (3, vec![], Role::Candidate),
        (5, vec![(2, true)], Role::Candidate),
        (5, vec![(2, false), (3, false)], Role::Candidate),
        (5, vec![(2, true), (3, false), (4, false)], Role::Candidate),
        (5, vec![], Role::Candidate),
    ];
    for (i, (size, votes, want)) in table.into_iter().enumerate() {
        let mut r = fresh(1, &ids(size));
        r.campaign();
        for (from, granted) in votes {
            r.step(msg(from, 1, 1, vote_resp(granted))).unwrap();
        }
        assert_eq!(r.role(), want, "case {i}");
        assert_eq!(r.term(), 1, "case {i}");
        let want_leader = (want == Role::Leader).then_some(1);
        assert_eq!(r.leader(), want_leader, "case {i}");
    }
}

/// Reference: §5.2 split votes: "if many followers become candidates at the
/// same time, votes could be split so that no candidate obtains a
/// majority"; randomized timeouts then elect a single leader.
#[test]
fn split_vote_leaves_no_leader_then_resolves() {
    let mut net = Network::paper(&[1, 2, 3, 4]);
    // Node 2 hears only candidate 1, node 4 only candidate 3.
    net.cut_one_way(3, 2);
    net.cut_one_way(1, 4);
    net.raft_mut(1).campaign();
    net.raft_mut(3).campaign();
    net.stabilize();
    for id in [1, 3] {
        assert_eq!(net.raft(id).role(), Role::Candidate, "node {id}");
        assert_eq!(net.raft(id).term(), 1);
    }
    assert_eq!(net.raft(2).vote(), Some(1));
    assert_eq!(net.raft(4).vote(), Some(3));
    assert!(leaders(&net).is_empty());

    net.recover();
    tick_until(&mut net, 200, |n| !leaders(n).is_empty());
    let leader = leaders(&net);
    assert_eq!(leader.len(), 1);
    let term = net.raft(leader[0]).term();
    assert!(term >= 2, "the split term produced no leader");
    for id in net.ids() {
        assert_eq!(net.raft(id).term(), term);
        assert_eq!(net.raft(id).leader(), Some(leader[0]));
    }
}

/// Reference: §5.2 "Each server will vote for at most one candidate in a
/// given term, on a first-come-first-served basis". A repeated request from
/// the candidate already voted for is granted again (its response may have
/// been lost); a new term frees the vote.
#[test]
fn follower_votes_once_per_term() {
    // (vote already cast in term 1, requester, granted?)
    let table: [(Option<NodeId>, NodeId, bool); 6] = [
        (None, 2, true),
        (None, 3, true),
        (Some(2), 2, true),
        (Some(3), 3, true),
        (Some(2), 3, false),
        (Some(3), 2, false),
    ];
    for (vote, from, granted) in table {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(1, vote, 0), Vec::new());
        r.step(msg(from, 1, 1, vote_req(0, 0))).unwrap();
        let out = drain(&mut r);
        assert_eq!(
            out.vote_grants(),
            vec![granted],
            "vote {vote:?}, from {from}"
        );
        assert_eq!(r.vote(), if granted { Some(from) } else { vote });
    }

    // First come, first served; then a repeat; then a new term.
    let mut r = fresh(1, &[1, 2, 3]);
    let ask = |r: &mut Raft, from, term| {
        r.step(msg(from, 1, term, vote_req(0, 0))).unwrap();
        drain(r).vote_grants()
    };
    assert_eq!(ask(&mut r, 2, 1), vec![true]);
    assert_eq!(ask(&mut r, 3, 1), vec![false]);
    assert_eq!(ask(&mut r, 2, 1), vec![true]);
    assert_eq!(r.vote(), Some(2));
    assert_eq!(ask(&mut r, 3, 2), vec![true]);
    assert_eq!((r.term(), r.vote()), (2, Some(3)));
}

/// Reference: §5.2 "While waiting for votes, a candidate may receive an
/// AppendEntries RPC from another server claiming to be leader. If the
/// leader's term ... is at least as large as the candidate's current term,
/// then the candidate recognizes the leader as legitimate and returns to
/// follower state." The same holds for a pre-candidate (§9.6).
#[test]
fn candidate_falls_back_on_leader_of_current_or_newer_term() {
    for role in [Role::Candidate, Role::PreCandidate] {
        for kind in [heartbeat(0), append(0, 0, Vec::new(), 0)] {
            for bump in [0, 1] {
                let mut r = in_role(role);
                let term = r.term() + bump;
                r.step(msg(2, 1, term, kind.clone())).unwrap();
                let what = format!("{role} {} at +{bump}", kind.name());
                assert_eq!(r.role(), Role::Follower, "{what}");
                assert_eq!(r.term(), term, "{what}");
                assert_eq!(r.leader(), Some(2), "{what}");
                // It answers the leader.
                let out = drain(&mut r);
                assert!(out.all().any(|m| m.to == 2 && m.term == term), "{what}");
            }
        }
    }
}

/// How many ticks a follower or candidate waits before it starts an
/// election (paper settings: the term goes up).
fn ticks_to_campaign(r: &mut Raft) -> u32 {
    let term = r.term();
    for n in 1..=1000 {
        r.tick();
        if r.term() != term {
            return n;
        }
    }
    panic!("never campaigned");
}

/// Reference: §5.2 "Raft uses randomized election timeouts ... election
/// timeouts are chosen randomly from a fixed interval", here
/// `[election_tick, 2 * election_tick)`, drawn afresh at every election.
#[test]
fn election_timeouts_are_randomized_within_range() {
    let mut seen = BTreeSet::new();
    for seed in 0..200 {
        let cfg = Config {
            seed,
            ..paper_cfg(1)
        };
        let mut r = restore(cfg, &[1, 2, 3], HardState::default(), Vec::new());
        let n = ticks_to_campaign(&mut r);
        assert!((10..20).contains(&n), "seed {seed}: {n}");
        seen.insert(n);
    }
    assert_eq!(seen.len(), 10, "every timeout in range occurs: {seen:?}");

    // One node, election after election: the timeout is drawn anew each time.
    let mut r = fresh(1, &[1, 2, 3]);
    let mut again = BTreeSet::new();
    for _ in 0..50 {
        let n = ticks_to_campaign(&mut r);
        assert!((10..20).contains(&n), "{n}");
        again.insert(n);
    }
    assert!(again.len() >= 5, "timeouts do not vary: {again:?}");
}

/// Reference: §5.2 randomized timeouts "spread out the servers so that in
/// most cases only a single server will time out". Over many rounds with
/// different seeds, the earliest timeout among five nodes is rarely shared.
#[test]
fn election_timeouts_rarely_collide() {
    let rounds = 1000;
    let mut conflicts = 0;
    for round in 0..rounds {
        let timeouts: Vec<u32> = (1..=5)
            .map(|id| {
                let cfg = Config {
                    seed: round * 5 + id,
                    ..paper_cfg(id)
                };
                let mut r = restore(cfg, &ids(5), HardState::default(), Vec::new());
                ticks_to_campaign(&mut r)
            })
            .collect();
        let min = *timeouts.iter().min().unwrap();
        if timeouts.iter().filter(|&&t| t == min).count() > 1 {
            conflicts += 1;
        }
    }
    let rate = f64::from(conflicts) / rounds as f64;
    assert!(rate < 0.3, "conflict rate {rate}");
}

/// Reference: §5.2 "A server remains in follower state as long as it
/// receives valid RPCs from a leader or candidate": each heartbeat or
/// append restarts the election timeout.
#[test]
fn follower_election_timer_resets_on_hearing_leader() {
    let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(1, None, 0), Vec::new());
    let timeout = r.randomized_election_timeout();
    for round in 0..6 {
        for _ in 1..timeout {
            r.tick();
        }
        let kind = if round % 2 == 0 {
            heartbeat(0)
        } else {
            append(0, 0, Vec::new(), 0)
        };
        r.step(msg(2, 1, 1, kind)).unwrap();
        assert_eq!((r.role(), r.term()), (Role::Follower, 1), "round {round}");
        drain(&mut r);
    }
    for _ in 1..timeout {
        r.tick();
    }
    assert_eq!(r.role(), Role::Follower);
    r.tick();
    assert_eq!((r.role(), r.term()), (Role::Candidate, 2));
}

/// Reference: §5.2 — in a whole group, a leader's heartbeats keep every
/// follower from ever campaigning.
#[test]
fn stable_leader_keeps_followers_from_campaigning() {
    let mut net = Network::paper(&[1, 2, 3, 4, 5]);
    net.campaign(1);
    for _ in 0..300 {
        net.tick_all();
    }
    assert_eq!(leaders(&net), vec![1]);
    for id in net.ids() {
        assert_eq!(net.raft(id).term(), 1, "node {id}");
        assert_eq!(net.raft(id).leader(), Some(1), "node {id}");
    }
    assert_eq!(
        net.delivered()
            .iter()
            .filter(|m| m.kind.name() == "Vote")
            .count(),
        4,
        "only the first election's requests"
    );
}

// ---- §5.3 Log replication -------------------------------------------------

/// Reference: §5.3 "The leader appends the command to its log as a new
/// entry, then issues AppendEntries RPCs in parallel to each of the other
/// servers to replicate the entry", each naming the entry that precedes the
/// new ones and the leader's commit index.
#[test]
fn leader_start_replication() {
    let mut r = stable_leader(3);
    let li = r.last_index();
    let proposed = r.propose(b"some data".to_vec()).unwrap();
    assert_eq!(
        proposed,
        Proposed::Appended {
            index: li + 1,
            term: 1
        }
    );
    let out = drain(&mut r);
    let want = Entry {
        term: 1,
        index: li + 1,
        payload: EntryPayload::Normal(b"some data".to_vec().into()),
    };
    assert_eq!(out.entries, vec![want.clone()]);
    for to in [2, 3] {
        assert_eq!(out.appends_to(to), vec![(li, 1, vec![want.clone()], li)]);
    }
    assert_eq!(
        r.commit_index(),
        li,
        "not committed before any follower has it"
    );
    assert!(out.committed.is_empty());
}

/// Reference: §5.3 "A log entry is committed once the leader that created
/// the entry has replicated it on a majority of the servers", counting the
/// leader itself.
#[test]
fn leader_commits_once_majority_acknowledges() {
    let table: Vec<(u64, Vec<NodeId>, bool)> = vec![
        (1, vec![], true),
        (3, vec![], false),
        (3, vec![2], true),
        (3, vec![2, 3], true),
        (5, vec![], false),
        (5, vec![2], false),
        (5, vec![2, 3], true),
        (5, vec![2, 3, 4], true),
        (5, vec![2, 3, 4, 5], true),
    ];
    for (size, acceptors, committed) in table {
        let mut r = stable_leader(size);
        let li = r.last_index();
        r.propose(b"some data".to_vec()).unwrap();
        let out = accept_all(&mut r, &acceptors);
        assert_eq!(
            r.commit_index() > li,
            committed,
            "size {size}, acceptors {acceptors:?}"
        );
        let applied: Vec<Vec<u8>> = out
            .committed
            .iter()
            .filter_map(|e| e.data().map(<[u8]>::to_vec))
            .collect();
        let want: Vec<Vec<u8>> = if committed {
            vec![b"some data".to_vec()]
        } else {
            Vec::new()
        };
        assert_eq!(applied, want, "size {size}, acceptors {acceptors:?}");
    }
}

/// Reference: §5.3 "When the entry has been safely replicated, the leader
/// applies the entry ... This also commits all preceding entries in the
/// leader's log, including entries created by previous leaders."
#[test]
fn leader_commits_preceding_entries() {
    let logs: [Vec<Entry>; 4] = [Vec::new(), ents(&[2]), ents(&[1, 2]), ents(&[1])];
    for log in logs {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(2, None, 0), log.clone());
        elect(&mut r);
        assert_eq!(r.term(), 3);
        r.propose(b"some data".to_vec()).unwrap();
        let out = accept_all(&mut r, &[2, 3]);
        let li = log.len() as Index;
        let mut want = log.clone();
        want.push(Entry {
            term: 3,
            index: li + 1,
            payload: EntryPayload::Empty,
        });
        want.push(Entry {
            term: 3,
            index: li + 2,
            payload: EntryPayload::Normal(b"some data".to_vec().into()),
        });
        assert_eq!(out.committed, want, "log {log:?}");
        assert_eq!(r.commit_index(), li + 2);
    }
}

/// Reference: §5.3 "Once a follower learns that a log entry is committed,
/// it applies the entry to its local state machine". The follower commits
/// up to the leader's commit index, but never past the last entry the
/// append message covered.
#[test]
fn follower_commits_what_leader_says() {
    // (entries sent, leader commit, expected follower commit)
    let table: [(Vec<Entry>, Index, Index); 5] = [
        (ents(&[1]), 1, 1),
        (ents(&[1, 1]), 2, 2),
        (ents(&[1, 1]), 1, 1),
        (ents(&[1]), 2, 1),
        (ents(&[1, 1]), 0, 0),
    ];
    for (entries, commit, want) in table {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(1, None, 0), Vec::new());
        r.step(msg(2, 1, 1, append(0, 0, entries.clone(), commit)))
            .unwrap();
        assert_eq!(r.commit_index(), want, "{entries:?}, commit {commit}");
        let out = drain(&mut r);
        assert_eq!(out.committed, entries[..want as usize].to_vec());
        assert_eq!(r.applied_index(), want);
    }

    // A heartbeat advances the commit index too, within the log.
    let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(1, None, 0), ents(&[1, 1]));
    r.step(msg(2, 1, 1, heartbeat(2))).unwrap();
    assert_eq!(r.commit_index(), 2);
    assert_eq!(drain(&mut r).committed, ents(&[1, 1]));
}

/// Reference: §5.3 "When sending an AppendEntries RPC, the leader includes
/// the index and term of the entry in its log that immediately precedes the
/// new entries. If the follower does not find an entry in its log with the
/// same index and term, then it refuses the new entries."
#[test]
fn follower_checks_prev_index_and_term() {
    // Follower log [(1,1), (2,2)], commit 1.
    // (prev_term, prev_index, response index, reject, hint)
    type Case = (Term, Index, Index, bool, Option<(Index, Term)>);
    let table: [Case; 5] = [
        // Below the commit index everything matches.
        (0, 0, 1, false, None),
        (1, 1, 1, false, None),
        (2, 2, 2, false, None),
        // Term mismatch at index 2: the hint points below it.
        (1, 2, 2, true, Some((1, 1))),
        // Beyond the end of the log: the hint is the last entry.
        (2, 3, 3, true, Some((2, 2))),
    ];
    for (prev_term, prev_index, index, reject, hint) in table {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(2, None, 1), ents(&[1, 2]));
        r.step(msg(2, 1, 2, append(prev_index, prev_term, Vec::new(), 0)))
            .unwrap();
        let out = drain(&mut r);
        assert_eq!(
            out.append_responses(),
            vec![(index, reject, hint)],
            "prev ({prev_index}, {prev_term})"
        );
        assert_eq!(terms_of(&r), vec![1, 2], "the log is untouched");
    }
}

/// Reference: §5.3 "If an existing entry conflicts with a new one (same
/// index but different terms), delete the existing entry and all that
/// follow it"; append any new entries not already in the log. Only the new
/// entries are handed out to persist.
#[test]
fn follower_truncates_conflicting_suffix() {
    // Follower log [(1,1), (2,2)], nothing committed.
    // (prev_index, prev_term, entries, resulting log, entries to persist)
    type Case = (Index, Term, Vec<Entry>, Vec<Entry>, Vec<Entry>);
    let table: Vec<Case> = vec![
        (
            2,
            2,
            vec![ent(3, 3)],
            vec![ent(1, 1), ent(2, 2), ent(3, 3)],
            vec![ent(3, 3)],
        ),
        (
            1,
            1,
            vec![ent(2, 3), ent(3, 4)],
            vec![ent(1, 1), ent(2, 3), ent(3, 4)],
            vec![ent(2, 3), ent(3, 4)],
        ),
        (
            0,
            0,
            vec![ent(1, 1)],
            vec![ent(1, 1), ent(2, 2)],
            Vec::new(),
        ),
        (0, 0, vec![ent(1, 3)], vec![ent(1, 3)], vec![ent(1, 3)]),
    ];
    for (prev_index, prev_term, entries, want_log, want_unstable) in table {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(2, None, 0), ents(&[1, 2]));
        // The message's term is the newest entry's: a leader holds no entry
        // of a term above its own.
        let term = entries.iter().map(|e| e.term).max().unwrap_or(2).max(2);
        r.step(msg(
            2,
            1,
            term,
            append(prev_index, prev_term, entries.clone(), 0),
        ))
        .unwrap();
        assert_eq!(
            log_of(&r),
            want_log,
            "append {entries:?} after {prev_index}"
        );
        let out = drain(&mut r);
        assert_eq!(out.entries, want_unstable, "append {entries:?}");
        let last = prev_index + entries.len() as Index;
        assert_eq!(out.append_responses(), vec![(last, false, None)]);
        assert_eq!(r.persisted_index(), r.last_index());
    }
}

/// The leader's log of the paper's figure 7 (before it appends anything in
/// term 8).
const FIGURE_7_LEADER: [Term; 10] = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6];

/// Reference: §5.3, figure 7: "the leader handles inconsistencies by
/// forcing the followers' logs to duplicate its own". The leader of term 8
/// is elected with the figure's log, and each of the followers (a)–(f) ends
/// with exactly the leader's log, in memory and in durable storage, and
/// learns that everything is committed.
#[test]
fn leader_repairs_figure_7_followers() {
    let followers: [(&str, Vec<Term>); 6] = [
        ("a", vec![1, 1, 1, 4, 4, 5, 5, 6, 6]),
        ("b", vec![1, 1, 1, 4]),
        ("c", vec![1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6]),
        ("d", vec![1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7]),
        ("e", vec![1, 1, 1, 4, 4, 4, 4]),
        ("f", vec![1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]),
    ];
    for (case, terms) in followers {
        let last_term = *terms.last().unwrap();
        // Node 1: the leader-to-be. Node 2: the follower of the case. Node 3:
        // an up-to-date follower whose vote node 1 needs when node 2's log
        // is more up to date than its own (c, d).
        let mut net = restored_network(
            &[
                (hs(7, None, 0), ents(&FIGURE_7_LEADER)),
                (hs(last_term, None, 0), ents(&terms)),
                (hs(7, None, 0), ents(&FIGURE_7_LEADER)),
            ],
            paper_cfg,
        );
        net.campaign(1);
        assert_eq!(net.raft(1).role(), Role::Leader, "case {case}");
        assert_eq!(net.raft(1).term(), 8, "case {case}");

        let mut want = ents(&FIGURE_7_LEADER);
        want.push(Entry {
            term: 8,
            index: 11,
            payload: EntryPayload::Empty,
        });
        for id in [1, 2, 3] {
            assert_eq!(log_of(net.raft(id)), want, "case {case}, node {id}");
            assert_eq!(
                net.node(id).storage().entries,
                want,
                "case {case}, node {id} durable"
            );
            assert_eq!(net.raft(id).commit_index(), 11, "case {case}, node {id}");
        }
        // Fast backtracking: at most one refused append per conflicting term run.
        let rejections = net
            .delivered()
            .iter()
            .filter(|m| {
                m.from == 2 && matches!(m.kind, MessageKind::AppendResponse { reject: true, .. })
            })
            .count();
        assert!(rejections <= 1, "case {case}: {rejections} rejections");
    }
}

/// Reference: §5.3 "If desired, the protocol can be optimized to reduce the
/// number of rejected AppendEntries RPCs ... the follower can include the
/// term of the conflicting entry and the first index it stores for that
/// term." A long divergent suffix is repaired in a handful of round trips
/// instead of one per entry, whichever side has the higher terms.
#[test]
fn fast_backtracking_with_conflict_hint() {
    let long = |head: Term, tail: Term, n: usize| {
        let mut t = vec![head];
        t.extend(std::iter::repeat_n(tail, n));
        ents(&t)
    };
    // Durable states of nodes 1 (the leader-to-be), 2 (the follower under
    // test) and 3, all with index 1 committed.
    let table: [[(HardState, Vec<Entry>); 3]; 3] = [
        // Node 2 led term 2 alone and wrote 100 entries; node 1 led term 3
        // with node 3 and wrote 50.
        [
            (hs(3, Some(1), 1), long(1, 3, 50)),
            (hs(3, None, 1), long(1, 2, 100)),
            (hs(3, Some(1), 1), long(1, 3, 50)),
        ],
        // Node 1 led term 3 alone and wrote 50 entries; node 2 then led term
        // 5 with node 3's vote and wrote 100 entries alone: the follower's
        // divergent suffix has the higher term.
        [
            (hs(5, None, 1), long(1, 3, 50)),
            (hs(5, Some(2), 1), long(1, 5, 100)),
            (hs(5, Some(2), 1), ents(&[1])),
        ],
        // Node 2 is simply far behind.
        [
            (hs(3, Some(1), 1), long(1, 3, 100)),
            (hs(3, Some(1), 1), long(1, 3, 2)),
            (hs(3, Some(1), 1), long(1, 3, 100)),
        ],
    ];
    for (i, states) in table.into_iter().enumerate() {
        let mut net = restored_network(&states, paper_cfg);
        net.campaign(1);
        assert_eq!(net.raft(1).role(), Role::Leader, "case {i}");
        assert_eq!(log_of(net.raft(2)), log_of(net.raft(1)), "case {i}");
        let appends = delivered(&net, 1, 2, "Append");
        let rejections = net
            .delivered()
            .iter()
            .filter(|m| {
                m.from == 2 && matches!(m.kind, MessageKind::AppendResponse { reject: true, .. })
            })
            .count();
        assert!(rejections <= 1, "case {i}: {rejections} rejections");
        assert!(appends <= 4, "case {i}: {appends} appends");
    }
}

/// Reference: §5.3 / §5.1 — responses are matched against the leader's
/// current state: a response from an older term is dropped by the term
/// rule, and within the term a rejection or acknowledgement that is older
/// than what the leader already knows changes nothing.
#[test]
fn stale_append_responses_are_ignored() {
    let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(2, None, 0), Vec::new());
    elect(&mut r);
    assert_eq!(r.term(), 3);
    r.propose(b"a".to_vec()).unwrap();
    accept_all(&mut r, &[2, 3]);
    let commit = r.commit_index();
    assert_eq!(commit, 2);
    let before = r.progress(2).unwrap();
    assert_eq!(before.state, ProgressState::Replicate);
    assert_eq!(before.matched, 2);

    let stale = [
        // An older term: a success claiming far more, and a rejection.
        msg(2, 1, 2, ack(100)),
        msg(
            2,
            1,
            2,
            MessageKind::AppendResponse {
                index: 2,
                reject: true,
                hint: Some((0, 0)),
            },
        ),
        // This term, but older than what is known: a duplicate ack and a
        // rejection of an append the follower has since accepted.
        msg(2, 1, 3, ack(1)),
        msg(
            2,
            1,
            3,
            MessageKind::AppendResponse {
                index: 1,
                reject: true,
                hint: Some((0, 0)),
            },
        ),
    ];
    for m in stale {
        r.step(m.clone()).unwrap();
        assert_eq!(r.progress(2).unwrap(), before, "after {m:?}");
        assert_eq!(
            (r.role(), r.term(), r.commit_index()),
            (Role::Leader, 3, commit)
        );
        let out = drain(&mut r);
        assert!(
            out.all().next().is_none(),
            "after {m:?}: {:?}",
            out.messages
        );
    }
}

/// Reference: §5.3 — the follower only deletes entries that conflict; an
/// older append delivered after a newer one (the network reorders
/// messages) matches the follower's log and must neither truncate nor lose
/// the entries the newer one added, nor move the commit index back.
#[test]
fn reordered_appends_do_not_truncate() {
    let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(1, None, 0), Vec::new());
    let newer = append(0, 0, ents(&[1, 1, 1]), 0);
    let older = append(0, 0, ents(&[1, 1]), 0);
    r.step(msg(2, 1, 1, newer)).unwrap();
    assert_eq!(drain(&mut r).append_responses(), vec![(3, false, None)]);
    r.step(msg(2, 1, 1, older)).unwrap();
    assert_eq!(log_of(&r), ents(&[1, 1, 1]));
    let out = drain(&mut r);
    assert!(out.entries.is_empty(), "nothing new to persist");
    assert_eq!(out.append_responses(), vec![(2, false, None)]);

    // A later append commits 2; a delayed one from before changes nothing.
    r.step(msg(2, 1, 1, append(3, 1, vec![ent(4, 1)], 2)))
        .unwrap();
    assert_eq!(r.commit_index(), 2);
    drain(&mut r);
    r.step(msg(2, 1, 1, append(1, 1, vec![ent(2, 1)], 1)))
        .unwrap();
    r.step(msg(2, 1, 1, append(0, 0, vec![ent(1, 1)], 0)))
        .unwrap();
    assert_eq!(log_of(&r), ents(&[1, 1, 1, 1]));
    assert_eq!(r.commit_index(), 2);
    let out = drain(&mut r);
    assert!(out.entries.is_empty());
    for (index, reject, _) in out.append_responses() {
        assert!(!reject);
        assert!(index >= 1);
    }
}

/// An append whose entries do not follow `prev_index` one by one, or whose
/// terms no leader could have written, and any message with a term past
/// `MAX_TERM` (where a campaign would overflow the term) is refused with an
/// error naming the sender, and leaves the term, the log, the commit index
/// and the outbox untouched.
/// Before the check, entries starting past `prev_index + 1` made the log's
/// arithmetic underflow: a buggy or older peer could crash a member.
#[test]
fn malformed_appends_are_refused_without_touching_the_log() {
    let cases: Vec<(&str, MessageKind)> = vec![
        ("a gap after prev", append(2, 2, vec![ent(4, 2)], 0)),
        ("a gap inside", append(2, 2, vec![ent(3, 2), ent(5, 2)], 0)),
        ("starting at prev", append(2, 2, vec![ent(2, 3)], 0)),
        ("starting before prev", append(2, 2, vec![ent(1, 2)], 0)),
        (
            "decreasing terms",
            append(2, 2, vec![ent(3, 3), ent(4, 2)], 0),
        ),
        ("a term below prev_term", append(2, 2, vec![ent(3, 1)], 0)),
        (
            "a term above the message's",
            append(2, 2, vec![ent(3, 9)], 0),
        ),
        ("prev_term above the message's", append(2, 9, Vec::new(), 0)),
        (
            "indexes past the end of u64",
            append(Index::MAX, 3, vec![ent(0, 3)], 0),
        ),
    ];
    let cases = cases
        .into_iter()
        .map(|(what, kind)| (what, 3, kind))
        .chain([
            (
                "a term no group can reach",
                coordinator::raft::MAX_TERM + 1,
                append(2, 2, vec![ent(3, 2)], 0),
            ),
            ("a vote at u64::MAX", Term::MAX, vote_req(9, 9)),
        ]);
    for (what, term, kind) in cases {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(3, None, 1), ents(&[1, 2]));
        let err = r.step(msg(2, 1, term, kind)).expect_err(what);
        assert!(
            matches!(err, coordinator::raft::StepError::Malformed { from: 2, .. }),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains("node 2"), "{what}: {err}");
        assert_eq!(log_of(&r), ents(&[1, 2]), "{what}");
        assert_eq!(r.term(), 3, "{what}");
        assert_eq!(r.commit_index(), 1, "{what}");
        let out = drain(&mut r);
        assert!(out.all().next().is_none(), "{what}: {:?}", out.messages);
        assert!(out.entries.is_empty(), "{what}");
    }
}

/// Thousands of appends with arbitrary indexes and terms (seeded): a
/// follower never panics, answers only well-formed ones, and its log stays
/// contiguous with terms that never decrease.
#[test]
fn arbitrary_appends_never_panic_and_keep_the_log_whole() {
    let mut rng = coordinator::raft::SplitMix64::new(0x5eed_a99e);
    for round in 0..200 {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(3, None, 0), ents(&[1, 2, 2]));
        for _ in 0..50 {
            let prev_index = match rng.range(0, 4) {
                0 => Index::MAX - rng.range(0, 3),
                _ => rng.range(0, 8),
            };
            let prev_term = rng.range(0, 5);
            let n = rng.range(0, 4);
            let mut entries = Vec::new();
            let mut index = prev_index.wrapping_add(1);
            for _ in 0..n {
                if rng.range(0, 6) == 0 {
                    index = rng.range(0, 10);
                }
                entries.push(ent(index, rng.range(0, 5)));
                index = index.wrapping_add(1);
            }
            let commit = rng.range(0, 10);
            let _ = r.step(msg(2, 1, 3, append(prev_index, prev_term, entries, commit)));
            let log = log_of(&r);
            for (i, e) in log.iter().enumerate() {
                assert_eq!(e.index, i as Index + 1, "round {round}: {log:?}");
            }
            for w in log.windows(2) {
                assert!(w[0].term <= w[1].term, "round {round}: {log:?}");
            }
            assert!(r.commit_index() <= r.last_index(), "round {round}");
            drain(&mut r);
        }
    }
}

/// A number near the interesting edges: small, near the log's end, or
/// near the top of u64.
fn edgy(rng: &mut coordinator::raft::SplitMix64, near: u64) -> u64 {
    match rng.range(0, 5) {
        0 => u64::MAX - rng.range(0, 3),
        1 => near.saturating_add(rng.range(0, 3)),
        2 => near.saturating_sub(rng.range(0, 3)),
        _ => rng.range(0, 12),
    }
}

/// Any message a peer (correct, buggy or older) could send, with fields
/// drawn at the edges.
fn arbitrary_message(rng: &mut coordinator::raft::SplitMix64, r: &Raft) -> Message {
    let last = r.last_index();
    let term = r.term();
    let from = rng.range(2, 5);
    let msg_term = edgy(rng, term);
    let entries = |rng: &mut coordinator::raft::SplitMix64, start: u64| -> Vec<Entry> {
        (0..rng.range(0, 3))
            .map(|i| ent(start.wrapping_add(i), rng.range(0, term.saturating_add(2))))
            .collect()
    };
    let kind = match rng.range(0, 14) {
        0 => {
            let prev = edgy(rng, last);
            let start = prev.wrapping_add(1);
            append(prev, edgy(rng, term), entries(rng, start), edgy(rng, last))
        }
        1 => MessageKind::AppendResponse {
            index: edgy(rng, last),
            reject: rng.range(0, 2) == 0,
            hint: (rng.range(0, 2) == 0).then(|| (edgy(rng, last), edgy(rng, term))),
        },
        2 => MessageKind::Vote {
            pre: rng.range(0, 2) == 0,
            last_index: edgy(rng, last),
            last_term: edgy(rng, term),
            transfer: rng.range(0, 2) == 0,
        },
        3 => MessageKind::VoteResponse {
            pre: rng.range(0, 2) == 0,
            granted: rng.range(0, 2) == 0,
        },
        4 => MessageKind::Heartbeat {
            commit: edgy(rng, last),
            ctx: (rng.range(0, 2) == 0).then(|| vec![rng.range(0, 4) as u8]),
        },
        5 => MessageKind::HeartbeatResponse {
            ctx: (rng.range(0, 2) == 0).then(|| vec![rng.range(0, 4) as u8]),
        },
        6 => MessageKind::Snapshot {
            meta: coordinator::raft::SnapshotMeta {
                index: edgy(rng, last),
                term: edgy(rng, term),
                conf_state: r.conf_state().clone(),
            },
        },
        7 => {
            let start = edgy(rng, last);
            MessageKind::Propose {
                entries: entries(rng, start),
            }
        }
        8 => MessageKind::ReadIndex {
            ctx: vec![rng.range(0, 4) as u8],
        },
        9 => MessageKind::ReadIndexResponse {
            ctx: vec![rng.range(0, 4) as u8],
            index: edgy(rng, last),
        },
        10 => MessageKind::TimeoutNow,
        11 => MessageKind::TransferLeader {
            to: rng.range(0, 6),
        },
        12 => MessageKind::NotMember {
            commit: edgy(rng, last),
        },
        _ => MessageKind::ProposeConfChange {
            change: coordinator::raft::ConfChange::AddLearner(rng.range(0, 6)),
            force: rng.range(0, 2) == 0,
        },
    };
    msg(from, 1, msg_term, kind)
}

/// Whatever a peer sends, in any role, a node never panics: every message
/// kind with fields at the edges (indexes past the log, terms near the top
/// of u64, hints beyond the end), seeded, with ticks and proposals mixed
/// in. The node's commit index never passes its log, and its log stays
/// contiguous.
#[test]
fn arbitrary_peer_messages_never_panic_in_any_role() {
    let mut rng = coordinator::raft::SplitMix64::new(0xbad_9ee2);
    for round in 0..300 {
        let mut r = match round % 3 {
            0 => stable_leader(3),
            1 => restore(paper_cfg(1), &[1, 2, 3], hs(2, None, 1), ents(&[1, 2, 2])),
            _ => {
                let mut r = fresh(1, &[1, 2, 3, 4]);
                r.campaign();
                r
            }
        };
        for _ in 0..60 {
            match rng.range(0, 10) {
                0 => r.tick(),
                1 => {
                    let _ = r.propose(b"x".to_vec());
                }
                _ => {
                    let m = arbitrary_message(&mut rng, &r);
                    let _ = r.step(m);
                }
            }
            assert!(r.commit_index() <= r.last_index(), "round {round}");
            let log = log_of(&r);
            for w in log.windows(2) {
                assert_eq!(w[0].index + 1, w[1].index, "round {round}");
            }
            drain(&mut r);
        }
    }
}

// ---- §5.4.1 Election restriction -------------------------------------------

/// Reference: §5.4.1 "the voter denies its vote if its own log is more
/// up-to-date than that of the candidate ... If the logs have last entries
/// with different terms, then the log with the later term is more
/// up-to-date. If the logs end with the same term, then whichever log is
/// longer is more up-to-date."
#[test]
fn voter_grants_only_to_up_to_date_logs() {
    // (voter's log, candidate's last term, candidate's last index, granted)
    let table: [(Vec<Term>, Term, Index, bool); 11] = [
        // Same last term: the longer or equal log wins.
        (vec![1], 1, 1, true),
        (vec![1], 1, 2, true),
        (vec![1, 1], 1, 1, false),
        // A later last term wins whatever the length.
        (vec![1], 2, 1, true),
        (vec![1], 2, 2, true),
        (vec![1, 1], 2, 1, true),
        (vec![1, 1, 1, 1], 2, 1, true),
        // An earlier last term loses whatever the length.
        (vec![2], 1, 1, false),
        (vec![2], 1, 2, false),
        (vec![1, 2], 1, 3, false),
        (vec![2], 1, 100, false),
    ];
    for (log, last_term, last_index, granted) in table {
        let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(2, None, 0), ents(&log));
        r.step(msg(2, 1, 3, vote_req(last_index, last_term)))
            .unwrap();
        let out = drain(&mut r);
        assert_eq!(
            out.vote_grants(),
            vec![granted],
            "voter {log:?}, candidate ({last_index}, {last_term})"
        );
        assert_eq!(r.term(), 3);
        assert_eq!(r.vote(), granted.then_some(2));
    }
}

// ---- §5.4.2 Committing entries from previous terms ---------------------------

/// Whether `m` is an append from node 1 that carries the entry at `index`
/// and that its recipient would accept.
fn would_land(net: &Network, m: &Message, index: Index) -> bool {
    match &m.kind {
        MessageKind::Append {
            prev_index,
            prev_term,
            entries,
            ..
        } => {
            entries.iter().any(|e| e.index == index)
                && net.raft(m.to).term_at(*prev_index) == Some(*prev_term)
        }
        _ => false,
    }
}

/// The durable states of the five servers of the paper's figure 8 at the
/// start of (c): S1 led term 2 and wrote (2, 2); S5 led term 3 and wrote
/// (2, 3), each alone; S3 and S4 voted for S5. Index 1 is committed.
fn figure_8_states() -> [(HardState, Vec<Entry>); 5] {
    [
        (hs(2, Some(1), 1), ents(&[1, 2])),
        (hs(2, Some(1), 1), ents(&[1])),
        (hs(3, Some(5), 1), ents(&[1])),
        (hs(3, Some(5), 1), ents(&[1])),
        (hs(3, Some(5), 1), ents(&[1, 3])),
    ]
}

/// S1 sends one entry per append, so an entry can be lost in flight
/// without the ones before it.
fn figure_8_cfg(id: NodeId) -> Config {
    Config {
        max_size_per_msg: if id == 1 { 0 } else { 1024 * 1024 },
        ..paper_cfg(id)
    }
}

/// Reference: §5.4.2 "Raft never commits log entries from previous terms by
/// counting replicas. Only log entries from the leader's current term are
/// committed by counting replicas; once an entry from the current term has
/// been committed in this way, then all prior entries are committed
/// indirectly because of the Log Matching Property." Driven by hand on the
/// leader of term 4 in figure 8 (c): index 2 (term 2) reaching a majority
/// commits nothing; index 3 (term 4) reaching a majority commits both.
#[test]
fn leader_only_commits_current_term_entries_by_counting() {
    let mut r = restore(figure_8_cfg(1), &ids(5), hs(3, None, 1), ents(&[1, 2]));
    elect(&mut r);
    let first = drain(&mut r);
    assert_eq!(r.term(), 4);
    let noop = Entry {
        term: 4,
        index: 3,
        payload: EntryPayload::Empty,
    };
    assert_eq!(first.appends_to(3), vec![(2, 2, vec![noop.clone()], 1)]);

    // S2 and S3 lack index 2; the leader backs up and sends it alone.
    for from in [2, 3] {
        let reject = MessageKind::AppendResponse {
            index: 2,
            reject: true,
            hint: Some((1, 1)),
        };
        r.step(msg(from, 1, 4, reject)).unwrap();
    }
    let out = drain(&mut r);
    for to in [2, 3] {
        assert_eq!(out.appends_to(to), vec![(1, 1, vec![ent(2, 2)], 1)]);
    }
    for from in [2, 3] {
        r.step(msg(from, 1, 4, ack(2))).unwrap();
    }
    // S1, S2 and S3 hold (2, 2): a majority, and the leader knows it.
    assert_eq!(r.progress(2).unwrap().matched, 2);
    assert_eq!(r.progress(3).unwrap().matched, 2);
    assert_eq!(
        r.commit_index(),
        1,
        "an old-term entry committed by counting"
    );
    let out = drain(&mut r);
    assert!(out.committed.is_empty());
    assert_eq!(out.appends_to(2), vec![(2, 2, vec![noop.clone()], 1)]);

    // The term-4 entry on S1 and S2 only: still nothing.
    r.step(msg(2, 1, 4, ack(3))).unwrap();
    assert_eq!(r.commit_index(), 1);
    // On a majority: it commits, and index 2 with it.
    r.step(msg(3, 1, 4, ack(3))).unwrap();
    assert_eq!(r.commit_index(), 3);
    assert_eq!(drain(&mut r).committed, vec![ent(2, 2), noop]);
}

/// Reference: §5.4.2, figure 8 (c) then (d): the leader of term 4 gets the
/// term-2 entry onto a majority but must not commit it — and indeed S5,
/// elected next with the votes of S2, S3 and S4, overwrites it everywhere.
#[test]
fn figure_8_replicated_old_term_entry_can_be_overwritten() {
    let mut net = restored_network(&figure_8_states(), figure_8_cfg);
    // (c): S5 is down; S1 is elected in term 4 (its first try, term 3,
    // fails on the votes S3 and S4 gave S5) and replicates index 2, but
    // crashes before (3, 4) reaches anyone.
    let pass = |net: &Network, m: &Message| {
        m.from != 5 && m.to != 5 && !(m.from == 1 && would_land(net, m, 3))
    };
    net.raft_mut(1).campaign();
    pump(&mut net, pass);
    assert_eq!(
        (net.raft(1).role(), net.raft(1).term()),
        (Role::Candidate, 3)
    );
    net.raft_mut(1).campaign();
    pump(&mut net, pass);
    assert_eq!((net.raft(1).role(), net.raft(1).term()), (Role::Leader, 4));
    for id in [2, 3, 4] {
        assert_eq!(terms_of(net.raft(id)), vec![1, 2], "S{id}");
        assert_eq!(net.raft(1).progress(id).unwrap().matched, 2, "S{id}");
    }
    assert_eq!(net.raft(1).last_index(), 3);
    assert_eq!(net.raft(1).commit_index(), 1, "(2, 2) must not commit");
    assert_eq!(applied(&net, 1), vec![b"1@1".to_vec()]);

    // (d): S1 crashes; S5 comes back and is elected in term 5 (term 4 is
    // taken by S1), since its last term 3 beats everyone's 2.
    net.remove(1);
    net.campaign(5);
    assert_eq!(
        (net.raft(5).role(), net.raft(5).term()),
        (Role::Follower, 4)
    );
    net.campaign(5);
    assert_eq!((net.raft(5).role(), net.raft(5).term()), (Role::Leader, 5));
    for id in [2, 3, 4, 5] {
        assert_eq!(
            net.raft(id).term_at(2),
            Some(3),
            "S{id}: (2, 2) overwritten"
        );
        assert_eq!(net.raft(id).commit_index(), 3, "S{id}");
        assert_eq!(applied(&net, id), vec![b"1@1".to_vec(), b"2@3".to_vec()]);
    }
}

/// Reference: §5.4.2, figure 8 (c) then (e): if S1 replicates an entry of
/// its current term to a majority before crashing, that entry and the
/// term-2 entry before it are committed, and S5 can no longer be elected,
/// so no later leader can remove them.
#[test]
fn figure_8_old_term_entry_commits_with_current_term_entry() {
    let mut net = restored_network(&figure_8_states(), figure_8_cfg);
    net.isolate(5);
    net.campaign(1);
    net.campaign(1);
    assert_eq!((net.raft(1).role(), net.raft(1).term()), (Role::Leader, 4));
    for id in [1, 2, 3, 4] {
        assert_eq!(terms_of(net.raft(id)), vec![1, 2, 4], "S{id}");
        assert_eq!(net.raft(id).commit_index(), 3, "S{id}");
        assert_eq!(applied(&net, id), vec![b"1@1".to_vec(), b"2@2".to_vec()]);
    }

    // S1 crashes; S5 returns and campaigns, but S2–S4 have a later last term.
    net.remove(1);
    net.recover();
    for _ in 0..3 {
        net.campaign(5);
        assert_ne!(net.raft(5).role(), Role::Leader);
    }
    tick_until(&mut net, 300, |n| {
        n.raft(5).term_at(2) == Some(2) && n.raft(5).commit_index() >= 3
    });
    let leader = leaders(&net);
    assert_eq!(leader.len(), 1);
    assert_ne!(leader[0], 5);
    for id in [2, 3, 4, 5] {
        assert_eq!(&applied(&net, id)[..2], [b"1@1".to_vec(), b"2@2".to_vec()]);
    }
}

/// Reference: §5.4.2 / §5.3 — uncommitted entries can be lost even if they
/// are from a newer term than the new leader's log: a leader elected with a
/// log ending in term 1 overwrites the term-2 entry of the deposed leader of
/// term 2 (node 3), which reached nobody. (etcd: leader election overwrites
/// newer logs.)
#[test]
fn new_leader_overwrites_newer_uncommitted_entries() {
    let mut net = restored_network(
        &[
            // Won the first election and wrote (1, 1), which reached node 2.
            (hs(1, Some(1), 0), ents(&[1])),
            (hs(1, Some(1), 0), ents(&[1])),
            // Won the second election (term 2) and wrote (1, 2) alone.
            (hs(2, Some(3), 0), ents(&[2])),
            // Voted for node 3 in term 2 but got nothing from it.
            (hs(2, Some(3), 0), Vec::new()),
            (hs(2, Some(3), 0), Vec::new()),
        ],
        paper_cfg,
    );
    // Term 2 is taken: node 1 loses but its term moves up.
    net.campaign(1);
    assert_eq!(
        (net.raft(1).role(), net.raft(1).term()),
        (Role::Follower, 2)
    );
    // Term 3: nodes 2, 4 and 5 vote for it; node 3's log is more up to date.
    net.campaign(1);
    assert_eq!((net.raft(1).role(), net.raft(1).term()), (Role::Leader, 3));
    for id in net.ids() {
        assert_eq!(terms_of(net.raft(id)), vec![1, 3], "node {id}");
        assert_eq!(net.raft(id).commit_index(), 2, "node {id}");
        assert_eq!(net.node(id).storage().entries[0], ent(1, 1), "node {id}");
    }
}

/// Reference: §5.4.2 and §8 ("each leader commit[s] a blank no-op entry
/// into the log at the start of its term"): entries a deposed leader left
/// uncommitted are committed by the next leader once its own empty entry
/// commits.
#[test]
fn new_leader_commits_previous_entries_after_its_noop() {
    let mut net = Network::paper(&[1, 2, 3]);
    net.campaign(1);
    // The followers store the entries, but the leader never hears so.
    net.ignore("AppendResponse");
    net.propose(1, b"a").unwrap();
    net.propose(1, b"b").unwrap();
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).last_index(), 3, "node {id}");
        assert_eq!(net.raft(id).commit_index(), 1, "node {id}");
    }
    net.remove(1);

    // Node 2 is elected in term 2; its empty entry reaches node 3 but the
    // acknowledgement does not come back yet.
    net.campaign(2);
    assert_eq!((net.raft(2).role(), net.raft(2).term()), (Role::Leader, 2));
    assert_eq!(net.raft(3).term_at(4), Some(2));
    assert_eq!(net.raft(2).commit_index(), 1);
    assert!(applied(&net, 2).is_empty());

    net.recover();
    net.tick(2, 1);
    for id in [2, 3] {
        assert_eq!(net.raft(id).commit_index(), 4, "node {id}");
        assert_eq!(
            applied(&net, id),
            vec![b"a".to_vec(), b"b".to_vec()],
            "node {id}"
        );
    }
}

// ---- Proposals reaching the leader (§5.1, §8) --------------------------------

/// Reference: §8 "If a client contacts a follower, the follower will
/// redirect it to the leader" — here by forwarding the proposal, which
/// then commits on every node.
#[test]
fn proposal_by_proxy() {
    let mut net = Network::paper(&[1, 2, 3]);
    net.campaign(1);
    assert_eq!(
        net.propose(2, b"somedata"),
        Ok(Proposed::Forwarded { to: 1 })
    );
    assert_eq!(delivered(&net, 2, 1, "Propose"), 1);
    for id in [1, 2, 3] {
        assert_eq!(applied(&net, id), vec![b"somedata".to_vec()], "node {id}");
        assert_eq!(net.raft(id).commit_index(), 2, "node {id}");
        assert_eq!(net.raft(id).term_at(2), Some(1), "node {id}");
    }
}

/// Reference: §8 (redirecting clients) — with forwarding disabled a follower
/// refuses and names the leader, and nothing is appended anywhere.
#[test]
fn proposal_forwarding_disabled_refuses_with_not_leader() {
    let mut net = Network::new(&[1, 2, 3], |id| Config {
        disable_proposal_forwarding: true,
        ..paper_cfg(id)
    });
    net.campaign(1);
    let last = net.raft(1).last_index();
    assert_eq!(
        net.propose(2, b"x"),
        Err(ProposeError::NotLeader { leader: 1 })
    );
    assert_eq!(
        net.propose(3, b"x"),
        Err(ProposeError::NotLeader { leader: 1 })
    );
    assert_eq!(delivered(&net, 2, 1, "Propose"), 0);
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).last_index(), last, "node {id}");
    }
    // The leader itself still takes proposals.
    assert!(matches!(
        net.propose(1, b"y"),
        Ok(Proposed::Appended { .. })
    ));
    assert_eq!(applied(&net, 3), vec![b"y".to_vec()]);
}

/// Reference: §8 — with no leader known (a fresh group, or a candidate)
/// there is nobody to take a proposal: it fails with `NoLeader`.
#[test]
fn proposal_without_leader_fails() {
    let mut net = Network::paper(&[1, 2, 3]);
    for id in [1, 2, 3] {
        assert_eq!(
            net.propose(id, b"x"),
            Err(ProposeError::NoLeader),
            "node {id}"
        );
    }
    net.isolate(1);
    net.campaign(1);
    assert_eq!(net.raft(1).role(), Role::Candidate);
    assert_eq!(net.propose(1, b"x"), Err(ProposeError::NoLeader));
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).last_index(), 0, "node {id}");
    }
}

// ---- §5.2 / §5.4.1 Dueling candidates ------------------------------------------

/// All nodes agree on one leader and hold the same log and commit index.
fn converged(net: &Network) -> bool {
    let l = leaders(net);
    if l.len() != 1 {
        return false;
    }
    let lead = net.raft(l[0]);
    net.ids().into_iter().all(|id| {
        let r = net.raft(id);
        r.leader() == Some(l[0])
            && r.term() == lead.term()
            && log_of(r) == log_of(lead)
            && r.commit_index() == lead.commit_index()
    })
}

/// Reference: §5.2 (elections) and §5.4.1 (election restriction), etcd's
/// dueling candidates: node 1 wins term 1 with node 2 while cut off from
/// node 3, whose own campaign for term 1 fails on node 2's vote. After the
/// heal node 3 campaigns again: its higher term deposes node 1, but its log
/// lacks the committed entry, so it gets no vote and concedes. The group
/// then converges on a leader holding the committed entry.
#[test]
fn dueling_candidates() {
    let mut net = Network::paper(&[1, 2, 3]);
    net.cut(1, 3);
    net.campaign(1);
    net.campaign(3);
    assert_eq!(net.raft(1).role(), Role::Leader);
    assert_eq!(
        (net.raft(3).role(), net.raft(3).term()),
        (Role::Candidate, 1)
    );

    net.recover();
    net.campaign(3);
    for id in [1, 2, 3] {
        assert_eq!(net.raft(id).role(), Role::Follower, "node {id}");
        assert_eq!(net.raft(id).term(), 2, "node {id}");
    }
    for id in [1, 2] {
        assert_eq!(terms_of(net.raft(id)), vec![1], "node {id}");
        assert_eq!(net.raft(id).commit_index(), 1, "node {id}");
    }
    assert_eq!(net.raft(3).last_index(), 0);

    tick_until(&mut net, 300, converged);
    let leader = leaders(&net)[0];
    assert_ne!(leader, 3, "a node without the committed entry cannot lead");
    assert!(net.raft(leader).term() >= 3);
    assert_eq!(net.raft(3).term_at(1), Some(1));
}

/// Reference: §5.2 / §5.4.1 — two candidates campaign at once after a
/// partition heals; node 2 lacks an entry committed while it was cut off.
/// The votes split, and after the timeouts the candidate side with the
/// complete log wins: node 2's side can never gather a majority.
#[test]
fn dueling_candidates_better_log_wins_after_heal() {
    let mut net = Network::paper(&[1, 2, 3, 4, 5]);
    net.campaign(1);
    net.propose(1, b"a").unwrap();
    for a in [1, 4, 5] {
        for b in [2, 3] {
            net.cut(a, b);
        }
    }
    net.propose(1, b"b").unwrap();
    assert_eq!(net.raft(1).commit_index(), 3, "committed by 1, 4 and 5");
    assert_eq!(net.raft(2).last_index(), 2);
    // The leader crashes and the partition heals.
    net.remove(1);
    net.recover();

    net.raft_mut(2).campaign();
    net.raft_mut(4).campaign();
    net.stabilize();
    for id in [2, 4] {
        assert_eq!(net.raft(id).role(), Role::Candidate, "node {id}");
        assert_eq!(net.raft(id).term(), 2, "node {id}");
    }
    assert_eq!(net.raft(3).vote(), Some(2));
    assert_eq!(net.raft(5).vote(), Some(4));

    tick_until(&mut net, 300, |n| {
        for id in [2, 3] {
            assert_ne!(n.raft(id).role(), Role::Leader, "node {id} lacks (3, 1)");
        }
        !leaders(n).is_empty() && n.raft(2).commit_index() >= 3 && n.raft(3).commit_index() >= 3
    });
    let leader = leaders(&net);
    assert_eq!(leader.len(), 1);
    assert!([4, 5].contains(&leader[0]), "leader {leader:?}");
    for id in net.ids() {
        assert_eq!(
            applied(&net, id),
            vec![b"a".to_vec(), b"b".to_vec()],
            "node {id}"
        );
    }
}

/// Reference: §5.2 / §9.6 — without pre-vote, a node cut off from the group
/// keeps timing out and raising its term. When it rejoins, its higher term
/// deposes the working leader (the disruption pre-vote exists to prevent),
/// but its stale log wins it no votes; it concedes, a node with the full log
/// is elected, and all logs converge without losing a committed entry.
#[test]
fn partitioned_candidate_disrupts_then_converges() {
    let mut net = Network::paper(&[1, 2, 3]);
    net.campaign(1);
    net.propose(1, b"a").unwrap();
    net.isolate(3);
    for round in 0..100 {
        net.tick_all();
        if round % 20 == 0 {
            net.propose(1, format!("p{round}").as_bytes()).unwrap();
        }
    }
    let stray = net.raft(3).term();
    assert!(
        stray >= 4,
        "node 3 should have campaigned repeatedly: term {stray}"
    );
    assert_eq!((net.raft(1).role(), net.raft(1).term()), (Role::Leader, 1));
    let committed = net.raft(1).commit_index();
    assert_eq!(committed, 7);
    assert_eq!(net.raft(3).last_index(), 2);

    net.recover();
    tick_until(&mut net, 500, |n| {
        assert_ne!(
            n.raft(3).role(),
            Role::Leader,
            "node 3 lacks committed entries"
        );
        converged(n)
    });
    let leader = leaders(&net)[0];
    assert!(net.raft(leader).term() > stray, "node 3's term was adopted");
    let want: Vec<Vec<u8>> = applied(&net, 1);
    assert_eq!(want.len(), 6);
    for id in [1, 2, 3] {
        assert_eq!(applied(&net, id), want, "node {id}");
        assert!(net.raft(id).commit_index() > committed, "node {id}");
    }
}

// ---- Membership: the quorum shrinks (dissertation §4.1) ------------------------

/// Reference: dissertation §4.1 (single-server changes, applied when
/// committed). In a group of two, node 2 acknowledges the removal of itself
/// and then stops acknowledging; the entry proposed after the removal stays
/// uncommitted until the removal is applied, after which the leader alone is
/// the quorum and commits it. (etcd: commit after remove node.)
#[test]
fn commit_after_remove_node() {
    let mut r = fresh(1, &[1, 2]);
    elect(&mut r);
    accept_all(&mut r, &[2]);
    assert_eq!(r.commit_index(), 1);

    let removal = r.propose_conf_change(ConfChange::RemoveNode(2)).unwrap();
    assert_eq!(removal, Proposed::Appended { index: 2, term: 1 });
    r.propose(b"hello".to_vec()).unwrap();
    let out = drain(&mut r);
    assert!(out.committed.is_empty());
    assert_eq!(r.commit_index(), 1);
    assert_eq!(r.conf_state().voters, BTreeSet::from([1, 2]));

    // Node 2 acknowledges the removal but not "hello".
    r.step(msg(2, 1, 1, ack(2))).unwrap();
    assert_eq!(r.conf_state().voters, BTreeSet::from([1]));
    assert_eq!(r.commit_index(), 3, "the quorum shrank to the leader alone");
    assert_eq!(r.progress(2), None);
    let committed: Vec<Index> = drain(&mut r).committed.iter().map(|e| e.index).collect();
    assert_eq!(committed, vec![2, 3]);
    assert_eq!(r.role(), Role::Leader);
}

// ---- §5.5 / Figure 2: persistence before answering -----------------------------

/// Reference: figure 2 ("Persistent state on all servers: updated on stable
/// storage before responding to RPCs") and §5.5: a vote is durable before
/// it is announced. Vote responses, granting or not, and a candidate's own
/// requests (which carry its vote for itself) come out in
/// `persisted_messages`, never in `messages`, together with the hard state
/// that records the vote.
#[test]
fn vote_responses_wait_for_persistence() {
    let mut r = fresh(1, &[1, 2, 3]);
    r.step(msg(2, 1, 1, vote_req(0, 0))).unwrap();
    let rd = r.ready();
    assert!(rd.messages.is_empty());
    assert_eq!(rd.persisted_messages, vec![msg(1, 2, 1, vote_resp(true))]);
    assert_eq!(rd.hard_state, Some(hs(1, Some(2), 0)));
    r.advance();
    r.step(msg(3, 1, 1, vote_req(0, 0))).unwrap();
    let rd = r.ready();
    assert!(rd.messages.is_empty());
    assert_eq!(rd.persisted_messages, vec![msg(1, 3, 1, vote_resp(false))]);
    r.advance();

    let mut c = fresh(1, &[1, 2, 3]);
    c.campaign();
    let rd = c.ready();
    assert!(rd.messages.is_empty());
    assert_eq!(rd.persisted_messages.len(), 2);
    assert_eq!(rd.hard_state, Some(hs(1, Some(1), 0)));
}

/// Reference: figure 2 and §5.5 — an append is acknowledged only once the
/// entries (and any commit index) are durable: append responses, accepting
/// or rejecting, come out in `persisted_messages` beside the entries to
/// persist; so do heartbeat responses.
#[test]
fn append_responses_wait_for_persistence() {
    let mut r = restore(paper_cfg(1), &[1, 2, 3], hs(1, None, 0), Vec::new());
    r.step(msg(2, 1, 1, append(0, 0, ents(&[1, 1]), 1)))
        .unwrap();
    let rd = r.ready();
    assert!(rd.messages.is_empty());
    assert_eq!(rd.entries, ents(&[1, 1]));
    assert_eq!(rd.hard_state, Some(hs(1, None, 1)));
    assert_eq!(rd.persisted_messages, vec![msg(1, 2, 1, ack(2))]);
    r.advance();

    r.step(msg(2, 1, 1, append(5, 1, Vec::new(), 1))).unwrap();
    let rd = r.ready();
    assert!(rd.messages.is_empty());
    assert_eq!(rd.persisted_messages.len(), 1);
    assert!(matches!(
        rd.persisted_messages[0].kind,
        MessageKind::AppendResponse { reject: true, .. }
    ));
    r.advance();

    r.step(msg(2, 1, 1, heartbeat(2))).unwrap();
    let rd = r.ready();
    assert!(rd.messages.is_empty());
    assert_eq!(
        rd.persisted_messages,
        vec![msg(1, 2, 1, MessageKind::HeartbeatResponse { ctx: None })]
    );
    r.advance();
}

/// Reference: §10.2.1 of the dissertation (the leader may write its log in
/// parallel with replicating it): the leader's appends and heartbeats
/// depend on nothing durable and come out in `messages`, in the same batch
/// as the entries they carry.
#[test]
fn leader_appends_leave_before_persistence() {
    let mut r = stable_leader(3);
    r.propose(b"x".to_vec()).unwrap();
    let rd = r.ready();
    assert_eq!(rd.entries.len(), 1);
    assert!(rd.persisted_messages.is_empty());
    let mut to: Vec<NodeId> = rd
        .messages
        .iter()
        .filter(
            |m| matches!(&m.kind, MessageKind::Append { entries, .. } if entries == &rd.entries),
        )
        .map(|m| m.to)
        .collect();
    to.sort_unstable();
    assert_eq!(to, vec![2, 3]);
    r.advance();
    r.tick();
    let rd = r.ready();
    assert!(rd.persisted_messages.is_empty());
    assert_eq!(
        rd.messages
            .iter()
            .filter(|m| m.kind.name() == "Heartbeat")
            .count(),
        2
    );
    r.advance();
}

/// Reference: §10.2.1 of the dissertation ("the leader ... counts itself
/// in the majority only once its own log is durable") and the `Ready`
/// contract: the leader's own copy of an entry counts towards the commit
/// only after `advance` acknowledges it was persisted. A follower's
/// acknowledgement arriving first (between two cycles, before the leader
/// has even handed the entry out) is not enough in a group of three.
#[test]
fn leader_counts_own_entry_only_after_advance() {
    let mut r = stable_leader(3);
    r.propose(b"x".to_vec()).unwrap();
    // Node 2 already holds index 2 and says so.
    r.step(msg(2, 1, 1, ack(2))).unwrap();
    assert_eq!(r.progress(2).unwrap().matched, 2);
    assert_eq!(
        r.commit_index(),
        1,
        "the leader counted an entry it has not persisted"
    );

    let rd = r.ready();
    assert_eq!(rd.entries.len(), 1);
    assert!(rd.committed_entries.is_empty());
    assert_eq!(
        r.commit_index(),
        1,
        "handing the entry out is not persisting it"
    );
    r.advance();
    assert_eq!(r.commit_index(), 2, "durable on the leader and node 2");

    let rd = r.ready();
    assert_eq!(rd.hard_state.map(|h| h.commit), Some(2));
    assert_eq!(rd.committed_entries.len(), 1);
    assert_eq!(rd.committed_entries[0].data(), Some(&b"x"[..]));
    // The followers learn the new commit index.
    for m in rd.messages.iter().filter(|m| m.kind.name() == "Append") {
        assert!(matches!(m.kind, MessageKind::Append { commit: 2, .. }));
    }
    r.advance();
}

/// Reference: §5.2 / §5.5 and figure 2 — a vote survives a crash once it
/// is durable, so a restarted server cannot vote twice in one term; a vote
/// that was never persisted was never announced either.
#[test]
fn vote_survives_restart() {
    let vote_from = |from: NodeId| consensus::memory::Envelope {
        msg: msg(from, 1, 5, vote_req(0, 0)),
        image: None,
    };
    // Crash after the ready cycle: the vote for 2 is durable.
    let mut node = MemNode::new(paper_cfg(1), &[1, 2, 3]).unwrap();
    node.step(vote_from(2)).unwrap();
    let sent = node.handle_ready();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].msg.kind, vote_resp(true));
    let mut node = MemNode::restart(paper_cfg(1), node.crash()).unwrap();
    assert_eq!((node.raft().term(), node.raft().vote()), (5, Some(2)));
    node.step(vote_from(3)).unwrap();
    let sent = node.handle_ready();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].msg.kind, vote_resp(false));

    // Crash before the ready cycle: nothing was sent and nothing is kept.
    let mut node = MemNode::new(paper_cfg(1), &[1, 2, 3]).unwrap();
    node.step(vote_from(2)).unwrap();
    let mut node = MemNode::restart(paper_cfg(1), node.crash()).unwrap();
    assert_eq!((node.raft().term(), node.raft().vote()), (0, None));
    node.step(vote_from(3)).unwrap();
    let sent = node.handle_ready();
    assert_eq!(sent[0].msg.kind, vote_resp(true));
}
