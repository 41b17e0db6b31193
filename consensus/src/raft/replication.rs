//! Log replication (§5.3), commit propagation, snapshots (§7), ReadIndex
//! (§6.4) and leadership transfer (§3.10) — the leader's side and the
//! follower's answers.

use super::core::Raft;
use super::message::{Message, MessageKind};
use super::progress::ProgressState;
use crate::ready::ReadState;
use crate::types::{Entry, EntryPayload, Index, NodeId, SnapshotMeta};

impl Raft {
    pub(crate) fn peers(&self) -> Vec<NodeId> {
        self.progress
            .keys()
            .copied()
            .filter(|&id| id != self.id)
            .collect()
    }

    /// Sends pending entries (or, if there are none, the commit index) to
    /// every member that is not paused.
    pub(crate) fn bcast_append(&mut self) {
        self.bcast_pending = false;
        for id in self.peers() {
            self.send_append(id, true);
        }
    }

    /// Sends `to` the entries it is missing, or a snapshot when the leader
    /// no longer has them. With `send_if_empty`, an empty append probes.
    pub(crate) fn send_append(&mut self, to: NodeId, send_if_empty: bool) -> bool {
        let max_size = self.cfg.max_size_per_msg;
        let Some(pr) = self.progress.get(&to) else {
            return false;
        };
        if pr.is_paused() {
            return false;
        }
        let prev_index = pr.next - 1;
        // A follower probed back to index 0 must know the membership the log
        // starts from, which lives in snapshot metadata, not in the log. Only
        // the members of a bootstrap configuration (snapshot at index 0) have
        // it; anyone else, such as an empty node added later, gets the
        // snapshot first, or it would apply the log's changes to nothing.
        let needs_base_conf = prev_index == 0
            && pr.state == ProgressState::Probe
            && (self.log.snapshot.index > 0 || !self.log.snapshot.conf_state.contains(to));
        let Some(prev_term) = self.log.term(prev_index).filter(|_| !needs_base_conf) else {
            // The entries are compacted: the follower needs the snapshot.
            let meta = self.log.snapshot.clone();
            let index = meta.index;
            if let Some(pr) = self.progress.get_mut(&to) {
                pr.become_snapshot(index);
            }
            self.send(to, MessageKind::Snapshot { meta });
            return true;
        };
        let entries = self.log.entries_from(pr.next, max_size);
        if entries.is_empty() && !send_if_empty {
            return false;
        }
        let last = entries.last().map(|e| e.index);
        let commit = self.log.committed;
        if let Some(pr) = self.progress.get_mut(&to) {
            pr.sent(last);
        }
        self.send(
            to,
            MessageKind::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            },
        );
        true
    }

    /// Heartbeats every member, piggybacking the newest pending read.
    pub(crate) fn bcast_heartbeat(&mut self) {
        let ctx = self.read_only.last_ctx().cloned();
        self.bcast_heartbeat_with(ctx);
    }

    fn bcast_heartbeat_with(&mut self, ctx: Option<Vec<u8>>) {
        for id in self.peers() {
            let matched = self.progress.get(&id).map_or(0, |p| p.matched);
            // Never tell a follower to commit beyond what it is known to hold.
            let commit = matched.min(self.log.committed);
            self.send(
                id,
                MessageKind::Heartbeat {
                    commit,
                    ctx: ctx.clone(),
                },
            );
        }
    }

    // ---- follower side -------------------------------------------------

    pub(crate) fn handle_append(
        &mut self,
        m: &Message,
        prev_index: Index,
        prev_term: u64,
        entries: &[Entry],
        commit: Index,
    ) {
        if prev_index < self.log.committed {
            // Everything up to our commit index matches any leader's log.
            let committed = self.log.committed;
            self.send(
                m.from,
                MessageKind::AppendResponse {
                    index: committed,
                    reject: false,
                    hint: None,
                },
            );
            return;
        }
        match self.log.maybe_append(prev_index, prev_term, entries) {
            Some(last_new) => {
                self.commit_to(commit.min(last_new));
                self.send(
                    m.from,
                    MessageKind::AppendResponse {
                        index: last_new,
                        reject: false,
                        hint: None,
                    },
                );
            }
            None => {
                let hint = self.log.find_conflict_by_term(prev_index, prev_term);
                self.send(
                    m.from,
                    MessageKind::AppendResponse {
                        index: prev_index,
                        reject: true,
                        hint: Some(hint),
                    },
                );
            }
        }
    }

    pub(crate) fn handle_heartbeat(&mut self, m: &Message, commit: Index, ctx: Option<Vec<u8>>) {
        self.commit_to(commit);
        self.send(m.from, MessageKind::HeartbeatResponse { ctx });
    }

    pub(crate) fn handle_snapshot(&mut self, m: &Message, meta: &SnapshotMeta) {
        // A node added to the group starts with no membership; it takes the
        // leader's snapshot whatever its index (even 0) to learn it.
        let joining = self.conf.voters.is_empty() && self.conf.learners.is_empty();
        if meta.index <= self.log.committed && !joining {
            let committed = self.log.committed;
            self.send(
                m.from,
                MessageKind::AppendResponse {
                    index: committed,
                    reject: false,
                    hint: None,
                },
            );
            return;
        }
        if !joining && self.log.match_term(meta.index, meta.term) {
            // We already hold the snapshot's last entry: just catch up the commit.
            self.commit_to(meta.index);
            let committed = self.log.committed;
            self.send(
                m.from,
                MessageKind::AppendResponse {
                    index: committed,
                    reject: false,
                    hint: None,
                },
            );
            return;
        }
        self.log.restore(meta.clone());
        self.conf = meta.conf_state.clone();
        self.conf_history.clear();
        self.send(
            m.from,
            MessageKind::AppendResponse {
                index: meta.index,
                reject: false,
                hint: None,
            },
        );
    }

    // ---- leader side ---------------------------------------------------

    pub(crate) fn handle_append_response(
        &mut self,
        m: &Message,
        index: Index,
        reject: bool,
        hint: Option<(Index, u64)>,
    ) {
        let from = m.from;
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        if reject {
            let probe = match hint {
                Some((hint_index, hint_term)) if hint_term > 0 => {
                    self.log.find_conflict_by_term(hint_index, hint_term).0
                }
                Some((hint_index, _)) => hint_index,
                None => index.saturating_sub(1),
            };
            let Some(pr) = self.progress.get_mut(&from) else {
                return;
            };
            if pr.maybe_decr_to(index, probe) {
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
                self.send_append(from, true);
            }
            return;
        }
        // A follower skipped by `bcast_append` while paused may have missed
        // a commit index advance.
        let was_paused = pr.is_paused();
        // A snapshot acknowledged at or past its index ends the snapshot state
        // even when it tells nothing new (a snapshot at index 0, or one the
        // follower already covered).
        let snapshot_done = pr.state == ProgressState::Snapshot && index >= pr.pending_snapshot;
        if !pr.maybe_update(index) && !snapshot_done {
            return;
        }
        match pr.state {
            ProgressState::Probe => pr.become_replicate(),
            ProgressState::Snapshot if pr.matched >= pr.pending_snapshot => {
                pr.become_probe();
                pr.become_replicate();
            }
            ProgressState::Snapshot => {}
            ProgressState::Replicate => pr.inflights.free_to(index),
        }
        if self.maybe_commit() {
            self.bcast_append();
        } else if was_paused {
            // Tell it the commit index now rather than at the next heartbeat.
            self.send_append(from, true);
        }
        // Keep the pipeline full while there is more to send.
        while self.send_append(from, false) {}
        if self.lead_transferee == Some(from)
            && self
                .progress
                .get(&from)
                .is_some_and(|p| p.matched == self.log.last_index())
        {
            self.send(from, MessageKind::TimeoutNow);
        }
    }

    pub(crate) fn handle_heartbeat_response(&mut self, m: &Message, ctx: Option<Vec<u8>>) {
        let from = m.from;
        let last = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.probe_sent = false;
        if pr.state == ProgressState::Replicate && pr.inflights.full() {
            pr.inflights.free_first_one();
        }
        if pr.matched < last {
            self.send_append(from, true);
        }
        if self.lease_reads() {
            return;
        }
        let Some(ctx) = ctx else { return };
        let Some(acks) = self.read_only.ack(from, &ctx) else {
            return;
        };
        let voters_acked = acks
            .iter()
            .filter(|id| self.conf.voters.contains(id))
            .count();
        if voters_acked < self.conf.quorum() {
            return;
        }
        for (ctx, read) in self.read_only.advance(&ctx) {
            self.answer_read(read.from, ctx, read.index);
        }
    }

    fn answer_read(&mut self, to: NodeId, ctx: Vec<u8>, index: Index) {
        if to == self.id {
            self.read_states.push(ReadState { index, ctx });
        } else {
            self.send(to, MessageKind::ReadIndexResponse { ctx, index });
        }
    }

    /// A read request from `from` (possibly this node) reaching the leader.
    pub(crate) fn leader_read_index(&mut self, from: NodeId, ctx: Vec<u8>) {
        if self.conf.voters.len() == 1 && self.conf.voters.contains(&self.id) {
            let index = self.log.committed;
            self.answer_read(from, ctx, index);
            return;
        }
        // §6.4 step 1: a new leader does not know the commit index until it
        // has committed an entry of its own term.
        if self.log.term(self.log.committed) != Some(self.term) {
            self.pending_reads.push((from, ctx));
            return;
        }
        let index = self.log.committed;
        if self.lease_reads() {
            self.answer_read(from, ctx, index);
            return;
        }
        if self.read_only.add(index, from, ctx.clone()) {
            let id = self.id;
            self.read_only.ack(id, &ctx);
            self.bcast_heartbeat_with(Some(ctx));
        }
    }

    pub(crate) fn release_pending_reads(&mut self) {
        if self.pending_reads.is_empty() || self.log.term(self.log.committed) != Some(self.term) {
            return;
        }
        for (from, ctx) in std::mem::take(&mut self.pending_reads) {
            self.leader_read_index(from, ctx);
        }
    }

    /// Entries forwarded by a follower.
    pub(crate) fn leader_propose_forwarded(&mut self, entries: Vec<Entry>) {
        for e in entries {
            if matches!(e.payload, EntryPayload::Empty) {
                continue;
            }
            // Refusals (transfer, pending change, flow control) drop the
            // proposal; the follower's driver times it out.
            let _ = self.leader_append(e.payload);
        }
    }

    pub(crate) fn leader_transfer(&mut self, to: NodeId) {
        if to == self.id || !self.conf.voters.contains(&to) {
            return;
        }
        if self.lead_transferee == Some(to) {
            return;
        }
        self.election_elapsed = 0;
        self.lead_transferee = Some(to);
        if self
            .progress
            .get(&to)
            .is_some_and(|p| p.matched == self.log.last_index())
        {
            self.send(to, MessageKind::TimeoutNow);
        } else {
            self.send_append(to, true);
        }
    }
}
