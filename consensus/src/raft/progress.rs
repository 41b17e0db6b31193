//! The leader's view of each follower's replication (flow control).

use std::collections::VecDeque;

use crate::types::Index;

/// How the leader is currently sending to one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProgressState {
    /// The leader does not know where the follower's log matches; it sends
    /// one append at a time and waits for the answer.
    Probe,
    /// The follower's log is known to match; appends are pipelined up to the
    /// inflight limit.
    Replicate,
    /// The follower needs a snapshot; nothing else is sent until it is done.
    Snapshot,
}

/// A bounded window of in-flight append messages, each remembered by the
/// last index it carried.
#[derive(Clone, Debug)]
pub(crate) struct Inflights {
    window: VecDeque<Index>,
    cap: usize,
}

impl Inflights {
    pub(crate) fn new(cap: usize) -> Self {
        Inflights {
            window: VecDeque::with_capacity(cap.min(64)),
            cap,
        }
    }

    pub(crate) fn full(&self) -> bool {
        self.window.len() >= self.cap
    }

    pub(crate) fn len(&self) -> usize {
        self.window.len()
    }

    pub(crate) fn add(&mut self, last: Index) {
        self.window.push_back(last);
    }

    /// Frees every message whose last index is at or below `index`.
    pub(crate) fn free_to(&mut self, index: Index) {
        while self.window.front().is_some_and(|&i| i <= index) {
            self.window.pop_front();
        }
    }

    pub(crate) fn free_first_one(&mut self) {
        self.window.pop_front();
    }

    pub(crate) fn reset(&mut self) {
        self.window.clear();
    }
}

/// Replication progress of one member, kept by the leader.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    /// Highest index known to match the leader's log.
    pub(crate) matched: Index,
    /// Next index to send.
    pub(crate) next: Index,
    pub(crate) state: ProgressState,
    /// In `Snapshot` state: the index of the snapshot being sent.
    pub(crate) pending_snapshot: Index,
    /// Whether the member was heard from since the last check-quorum round.
    pub(crate) recent_active: bool,
    /// Whether it was heard from in the previous check-quorum round.
    pub(crate) active_last_round: bool,
    /// In `Probe` state: a probe is out and unanswered.
    pub(crate) probe_sent: bool,
    /// In `Snapshot` state: heartbeat intervals since the snapshot was sent.
    pub(crate) snapshot_elapsed: u32,
    pub(crate) inflights: Inflights,
}

impl Progress {
    pub(crate) fn new(next: Index, max_inflight: usize) -> Self {
        Progress {
            matched: 0,
            next,
            state: ProgressState::Probe,
            pending_snapshot: 0,
            recent_active: false,
            active_last_round: false,
            probe_sent: false,
            snapshot_elapsed: 0,
            inflights: Inflights::new(max_inflight),
        }
    }

    /// Whether the member answered the leader at least once, and within
    /// the current or the previous check-quorum round (a member the round
    /// just reset is not taken for gone).
    pub(crate) fn connected(&self) -> bool {
        self.matched > 0 && (self.recent_active || self.active_last_round)
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.probe_sent = false;
        self.snapshot_elapsed = 0;
        self.pending_snapshot = 0;
        self.state = state;
        self.inflights.reset();
    }

    pub(crate) fn become_probe(&mut self) {
        if self.state == ProgressState::Snapshot {
            let pending = self.pending_snapshot;
            self.reset_state(ProgressState::Probe);
            self.next = (self.matched + 1).max(pending + 1);
        } else {
            self.reset_state(ProgressState::Probe);
            self.next = self.matched + 1;
        }
    }

    pub(crate) fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.next = self.matched + 1;
    }

    pub(crate) fn become_snapshot(&mut self, index: Index) {
        self.reset_state(ProgressState::Snapshot);
        self.pending_snapshot = index;
    }

    /// Records that the member matches up to `index`. Returns whether that
    /// is news.
    pub(crate) fn maybe_update(&mut self, index: Index) -> bool {
        let updated = self.matched < index;
        if updated {
            self.matched = index;
            self.probe_sent = false;
        }
        self.next = self.next.max(index + 1);
        updated
    }

    /// Handles a rejection of an append whose `prev_index` was `rejected`,
    /// with `probe_hint` the next index worth trying. Returns false if the
    /// rejection is stale.
    pub(crate) fn maybe_decr_to(&mut self, rejected: Index, probe_hint: Index) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.matched {
                return false;
            }
            self.next = self.matched + 1;
            return true;
        }
        if self.next == 0 || self.next - 1 != rejected {
            return false;
        }
        self.next = rejected.min(probe_hint + 1).max(self.matched + 1);
        self.probe_sent = false;
        true
    }

    /// Whether sending to this member must wait.
    pub(crate) fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot => true,
        }
    }

    /// Records that an append ending at `last` (or an empty probe) was sent.
    pub(crate) fn sent(&mut self, last: Option<Index>) {
        match (self.state, last) {
            (ProgressState::Replicate, Some(last)) => {
                self.next = last + 1;
                self.inflights.add(last);
            }
            (ProgressState::Probe, _) => self.probe_sent = true,
            _ => {}
        }
    }
}

/// A snapshot of one member's progress, for status reports and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressStatus {
    /// Highest index known to match the leader's log.
    pub matched: Index,
    /// Next index the leader will send.
    pub next: Index,
    /// The flow-control state.
    pub state: ProgressState,
    /// Append messages in flight (replicate state).
    pub inflight: usize,
    /// Whether sending is paused (probe outstanding, window full, or snapshot).
    pub paused: bool,
    /// Whether the member was heard from in the current check-quorum round.
    pub recent_active: bool,
    /// Whether the member is a learner.
    pub learner: bool,
    /// Whether the member answered the leader at least once, and within the
    /// current or the previous check-quorum round: what the membership
    /// guards call connected (see
    /// [`Raft::propose_conf_change_checked`](super::Raft::propose_conf_change_checked)).
    pub connected: bool,
}

impl Progress {
    pub(crate) fn status(&self, learner: bool) -> ProgressStatus {
        ProgressStatus {
            matched: self.matched,
            next: self.next,
            state: self.state,
            inflight: self.inflights.len(),
            paused: self.is_paused(),
            recent_active: self.recent_active,
            learner,
            connected: self.connected(),
        }
    }
}
