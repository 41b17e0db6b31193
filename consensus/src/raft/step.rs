//! Handling one message: the term rules of §5.1 and the per-role dispatch,
//! and elections (§5.2, §5.4.1, pre-vote §9.6, check-quorum §6.2).

use super::core::Raft;
use super::message::{Message, MessageKind};
use crate::ready::StepError;
use crate::types::{Index, MAX_INDEX, MAX_TERM, NodeId, Role, Term};

/// Whether a message is one a correct member could send: terms at most
/// [`MAX_TERM`], indexes at most [`MAX_INDEX`], and an append's entries at
/// `prev_index + 1, + 2, …` with terms from `prev_term` up to the
/// message's, never decreasing. The core's arithmetic relies on it.
fn well_formed(m: &Message) -> Result<(), &'static str> {
    if m.term > MAX_TERM {
        return Err("term beyond the largest a group can reach");
    }
    let index_ok = |i: Index| i <= MAX_INDEX;
    let ok = match &m.kind {
        MessageKind::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => {
            if !index_ok(*prev_index) || !index_ok(*commit) {
                return Err("index beyond the largest a log can reach");
            }
            if *prev_term > m.term {
                return Err("prev_term is above the message's term");
            }
            let mut expected = *prev_index;
            let mut last_term = *prev_term;
            for e in entries {
                expected += 1;
                if e.index != expected {
                    return Err("entries do not follow prev_index one by one");
                }
                if e.term < last_term {
                    return Err("entry terms decrease");
                }
                if e.term > m.term {
                    return Err("an entry's term is above the message's");
                }
                last_term = e.term;
            }
            index_ok(expected)
        }
        MessageKind::AppendResponse { index, hint, .. } => {
            index_ok(*index) && hint.is_none_or(|(i, t)| index_ok(i) && t <= MAX_TERM)
        }
        MessageKind::Vote {
            last_index,
            last_term,
            ..
        } => index_ok(*last_index) && *last_term <= MAX_TERM,
        MessageKind::Heartbeat { commit, .. } | MessageKind::NotMember { commit } => {
            index_ok(*commit)
        }
        MessageKind::Snapshot { meta } => {
            if meta.term > m.term {
                return Err("snapshot term is above the message's term");
            }
            index_ok(meta.index)
        }
        MessageKind::ReadIndexResponse { index, .. } => index_ok(*index),
        MessageKind::VoteResponse { .. }
        | MessageKind::HeartbeatResponse { .. }
        | MessageKind::Propose { .. }
        | MessageKind::ReadIndex { .. }
        | MessageKind::TimeoutNow
        | MessageKind::TransferLeader { .. }
        | MessageKind::ProposeConfChange { .. }
        | MessageKind::ConfChangeRefused { .. } => true,
    };
    if ok {
        Ok(())
    } else {
        Err("index beyond the largest a log can reach")
    }
}

impl Raft {
    /// Feeds one message from another member.
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        if m.to != self.id {
            return Err(StepError::WrongRecipient { to: m.to });
        }
        if m.from == 0 || m.from == self.id {
            return Err(StepError::BadSender { from: m.from });
        }
        if let Err(reason) = well_formed(&m) {
            return Err(StepError::Malformed {
                from: m.from,
                reason,
            });
        }
        if let MessageKind::NotMember { commit } = m.kind {
            self.not_member(commit);
            return Ok(());
        }
        // Forwarded membership changes carry no term; whoever holds one
        // answers a refusal (a node that does not lead refuses it too).
        if let MessageKind::ProposeConfChange { change, force } = m.kind {
            self.forwarded_conf_change(m.from, change, force);
            return Ok(());
        }
        // The node driver answers the request it concerns.
        if let MessageKind::ConfChangeRefused { .. } = m.kind {
            return Ok(());
        }
        // Forwarded requests carry no term.
        let forwarded = matches!(
            m.kind,
            MessageKind::Propose { .. }
                | MessageKind::ReadIndex { .. }
                | MessageKind::TransferLeader { .. }
        );
        if !forwarded && !self.step_term(&m) {
            return Ok(());
        }
        match self.role {
            Role::Leader => self.step_leader(m),
            Role::Candidate | Role::PreCandidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
        Ok(())
    }

    /// Applies the term rules. Returns whether the message should be handled
    /// further.
    fn step_term(&mut self, m: &Message) -> bool {
        if m.term > self.term {
            if let MessageKind::Vote { transfer, .. } = &m.kind {
                // A node that heard from its leader within the minimum
                // election timeout ignores vote requests (§6.2, §9.6),
                // unless the leader itself asked for the election.
                let in_lease = self.cfg.check_quorum
                    && self.leader.is_some()
                    && self.election_elapsed < self.cfg.election_tick;
                if in_lease && !transfer {
                    return false;
                }
            }
            match &m.kind {
                // A pre-vote never changes the voter's term.
                MessageKind::Vote { pre: true, .. } => {}
                // A granted pre-vote echoes the term we would campaign in.
                MessageKind::VoteResponse {
                    pre: true,
                    granted: true,
                } => {}
                MessageKind::Append { .. }
                | MessageKind::Heartbeat { .. }
                | MessageKind::Snapshot { .. } => {
                    self.become_follower(m.term, Some(m.from));
                }
                _ => self.become_follower(m.term, None),
            }
            return true;
        }
        if m.term < self.term {
            match &m.kind {
                MessageKind::Append { .. } | MessageKind::Heartbeat { .. } => {
                    // Tell a stale leader the term so it steps down (§5.1).
                    // Nothing else may: check-quorum or pre-vote can keep the
                    // higher term from it, and a learner, or a voter whose
                    // membership leaves the leader out, never asks it to vote.
                    self.send(
                        m.from,
                        MessageKind::AppendResponse {
                            index: 0,
                            reject: false,
                            hint: None,
                        },
                    );
                }
                MessageKind::Vote { pre, .. } => {
                    // Reject at our term so the candidate learns it (§5.1);
                    // otherwise a node with a longer log but an older term
                    // could never win, and a candidate that no one else talks
                    // to (a voter behind on membership counts it a learner)
                    // would campaign below everyone's term forever.
                    self.send(
                        m.from,
                        MessageKind::VoteResponse {
                            pre: *pre,
                            granted: false,
                        },
                    );
                }
                _ => {}
            }
            return false;
        }
        true
    }

    fn step_follower(&mut self, m: Message) {
        match m.kind {
            MessageKind::Append {
                prev_index,
                prev_term,
                ref entries,
                commit,
            } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_append(&m, prev_index, prev_term, entries, commit);
            }
            MessageKind::Heartbeat { commit, ref ctx } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                let ctx = ctx.clone();
                self.handle_heartbeat(&m, commit, ctx);
            }
            MessageKind::Snapshot { ref meta } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_snapshot(&m, meta);
            }
            MessageKind::Vote { .. } => self.handle_vote(&m),
            MessageKind::TimeoutNow => {
                // Leadership transfer: campaign at once, skipping pre-vote (§3.10).
                if self.is_promotable() {
                    self.start_election(false, true);
                }
            }
            MessageKind::Propose { entries } => {
                if let Some(leader) = self.leader
                    && !self.cfg.disable_proposal_forwarding
                {
                    self.send_raw(leader, 0, MessageKind::Propose { entries });
                }
            }
            MessageKind::ReadIndexResponse { ctx, index } => {
                self.read_states
                    .push(crate::ready::ReadState { index, ctx });
            }
            MessageKind::TransferLeader { to } => {
                if let Some(leader) = self.leader {
                    self.send_raw(leader, 0, MessageKind::TransferLeader { to });
                }
            }
            // A read forwarded to a node that is no longer the leader is
            // dropped: the answer could not reach the requester. It retries.
            MessageKind::ReadIndex { .. }
            | MessageKind::AppendResponse { .. }
            | MessageKind::HeartbeatResponse { .. }
            | MessageKind::VoteResponse { .. }
            | MessageKind::NotMember { .. }
            | MessageKind::ProposeConfChange { .. }
            | MessageKind::ConfChangeRefused { .. } => {}
        }
    }

    fn step_candidate(&mut self, m: Message) {
        match m.kind {
            // §5.2: a candidate that hears from a leader of its term (or a
            // newer one, handled by the term rules) returns to follower.
            MessageKind::Append { .. }
            | MessageKind::Heartbeat { .. }
            | MessageKind::Snapshot { .. } => {
                let term = self.term;
                self.become_follower(term, Some(m.from));
                self.step_follower(m);
            }
            MessageKind::Vote { .. } => self.handle_vote(&m),
            MessageKind::VoteResponse { pre, granted } => {
                let expecting_pre = self.role == Role::PreCandidate;
                if pre != expecting_pre {
                    return;
                }
                self.votes.insert(m.from, granted);
                let (won, lost) = self.tally();
                if won {
                    if pre {
                        self.start_election(false, false);
                    } else {
                        self.become_leader();
                    }
                } else if lost {
                    let term = self.term;
                    self.become_follower(term, None);
                }
            }
            MessageKind::Propose { .. }
            | MessageKind::ReadIndex { .. }
            | MessageKind::TransferLeader { .. } => {
                // No leader to forward to; dropped.
            }
            MessageKind::TimeoutNow
            | MessageKind::AppendResponse { .. }
            | MessageKind::HeartbeatResponse { .. }
            | MessageKind::ReadIndexResponse { .. }
            | MessageKind::NotMember { .. }
            | MessageKind::ProposeConfChange { .. }
            | MessageKind::ConfChangeRefused { .. } => {}
        }
    }

    fn step_leader(&mut self, m: Message) {
        match m.kind {
            MessageKind::AppendResponse {
                index,
                reject,
                hint,
            } => {
                self.handle_append_response(&m, index, reject, hint);
            }
            MessageKind::HeartbeatResponse { ref ctx } => {
                let ctx = ctx.clone();
                self.handle_heartbeat_response(&m, ctx);
            }
            MessageKind::Vote { .. } => self.handle_vote(&m),
            MessageKind::Propose { entries } => self.leader_propose_forwarded(entries),
            MessageKind::ReadIndex { ctx } => self.leader_read_index(m.from, ctx),
            MessageKind::TransferLeader { to } => self.leader_transfer(to),
            // Only one leader per term (§5.2): nothing else of this term
            // can come from another leader.
            MessageKind::Append { .. }
            | MessageKind::Heartbeat { .. }
            | MessageKind::Snapshot { .. }
            | MessageKind::VoteResponse { .. }
            | MessageKind::TimeoutNow
            | MessageKind::ReadIndexResponse { .. }
            | MessageKind::NotMember { .. }
            | MessageKind::ProposeConfChange { .. }
            | MessageKind::ConfChangeRefused { .. } => {}
        }
    }

    /// A member says that its configuration as of its commit index
    /// `commit` does not list this node. Committed configurations follow one
    /// another along one log, so if `commit` is beyond this node's own
    /// commit index, whose configuration does list it, a later change
    /// removed it: it stands down (a follower with no leader) and campaigns
    /// no more until its commit index reaches
    /// `commit` (it was added again, or it learns the removal itself). A
    /// sender that knows less of the log than this node proves nothing and
    /// is ignored.
    pub(crate) fn not_member(&mut self, commit: Index) {
        if !self.conf.contains(self.id) || commit <= self.log.committed {
            return;
        }
        if self.removed_at.is_some_and(|at| at >= commit) {
            return;
        }
        self.removed_at = Some(commit);
        // Whoever it followed does not lead it any more; a leader that takes
        // it back will say so with its appends.
        let term = self.term;
        self.become_follower(term, None);
    }

    // ---- elections -----------------------------------------------------

    /// Starts a (pre-)election: asks every voter for its vote.
    pub(crate) fn start_election(&mut self, pre: bool, transfer: bool) {
        let vote_term: Term = if pre {
            self.become_pre_candidate();
            self.term + 1
        } else {
            self.become_candidate();
            self.term
        };
        self.votes.insert(self.id, true);
        let (won, _) = self.tally();
        if won {
            // A group of one.
            if pre {
                self.start_election(false, transfer);
            } else {
                self.become_leader();
            }
            return;
        }
        let last_index = self.log.last_index();
        let last_term = self.log.last_term();
        let voters: Vec<NodeId> = self
            .conf
            .voters
            .iter()
            .copied()
            .filter(|&id| id != self.id)
            .collect();
        for id in voters {
            self.send_raw(
                id,
                vote_term,
                MessageKind::Vote {
                    pre,
                    last_index,
                    last_term,
                    transfer,
                },
            );
        }
    }

    /// Counts the votes of the current configuration's voters: (won, lost).
    fn tally(&self) -> (bool, bool) {
        let quorum = self.conf.quorum();
        let voters = &self.conf.voters;
        let granted = self
            .votes
            .iter()
            .filter(|(id, g)| **g && voters.contains(id))
            .count();
        let rejected = self
            .votes
            .iter()
            .filter(|(id, g)| !**g && voters.contains(id))
            .count();
        (granted >= quorum, voters.len() - rejected < quorum)
    }

    fn handle_vote(&mut self, m: &Message) {
        let MessageKind::Vote {
            pre,
            last_index,
            last_term,
            ..
        } = m.kind
        else {
            return;
        };
        // §5.2: at most one vote per term, first come first served; a
        // pre-vote for a future term promises nothing.
        let can_vote = self.vote == Some(m.from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre && m.term > self.term);
        // §5.4.1: only for a candidate whose log is at least as up to date.
        if can_vote && self.log.is_up_to_date(last_index, last_term) {
            self.send_raw(
                m.from,
                m.term,
                MessageKind::VoteResponse { pre, granted: true },
            );
            if !pre {
                self.election_elapsed = 0;
                self.vote = Some(m.from);
            }
        } else {
            self.send(
                m.from,
                MessageKind::VoteResponse {
                    pre,
                    granted: false,
                },
            );
        }
    }
}
