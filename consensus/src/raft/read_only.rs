//! Bookkeeping for ReadIndex requests confirmed by a heartbeat round (§6.4).

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::types::{Index, NodeId};

#[derive(Debug)]
pub(crate) struct PendingRead {
    /// Commit index when the request arrived.
    pub(crate) index: Index,
    /// Who asked: this node or a follower.
    pub(crate) from: NodeId,
    acks: BTreeSet<NodeId>,
}

/// Reads waiting for a quorum of heartbeat acknowledgements, in arrival order.
#[derive(Debug, Default)]
pub(crate) struct ReadOnly {
    pending: HashMap<Vec<u8>, PendingRead>,
    queue: VecDeque<Vec<u8>>,
}

impl ReadOnly {
    /// Queues a read; a context already queued is ignored (duplicate request).
    pub(crate) fn add(&mut self, index: Index, from: NodeId, ctx: Vec<u8>) -> bool {
        if self.pending.contains_key(&ctx) {
            return false;
        }
        self.pending.insert(
            ctx.clone(),
            PendingRead {
                index,
                from,
                acks: BTreeSet::new(),
            },
        );
        self.queue.push_back(ctx);
        true
    }

    /// Records `id`'s acknowledgement of `ctx`; returns the acknowledgers so far.
    pub(crate) fn ack(&mut self, id: NodeId, ctx: &[u8]) -> Option<&BTreeSet<NodeId>> {
        let read = self.pending.get_mut(ctx)?;
        read.acks.insert(id);
        Some(&read.acks)
    }

    /// Removes and returns every read queued up to and including `ctx`: a
    /// quorum that confirmed `ctx` also confirmed the reads before it.
    pub(crate) fn advance(&mut self, ctx: &[u8]) -> Vec<(Vec<u8>, PendingRead)> {
        let Some(pos) = self.queue.iter().position(|c| c == ctx) else {
            return Vec::new();
        };
        self.queue
            .drain(..=pos)
            .filter_map(|c| self.pending.remove(&c).map(|r| (c, r)))
            .collect()
    }

    /// The context of the newest queued read, to piggyback on heartbeats.
    pub(crate) fn last_ctx(&self) -> Option<&Vec<u8>> {
        self.queue.back()
    }

    pub(crate) fn clear(&mut self) {
        self.pending.clear();
        self.queue.clear();
    }
}
