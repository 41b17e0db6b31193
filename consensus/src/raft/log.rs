//! The in-memory view of the replicated log.
//!
//! The core keeps every entry after the latest snapshot in memory, and tracks
//! which of them the driver has made durable. Storage is the driver's job: it
//! receives new entries through [`super::Ready`] and hands back what survived a
//! restart through [`super::InitialState`]. Memory stays bounded because the
//! driver compacts the log behind each snapshot.

use crate::types::{Entry, Index, SnapshotMeta, Term};

#[derive(Debug)]
pub(crate) struct RaftLog {
    /// The latest snapshot: it covers everything up to its index.
    pub(crate) snapshot: SnapshotMeta,
    /// Index of the entry just before `entries[0]` (at most `snapshot.index`;
    /// entries between it and the snapshot are kept for slow followers).
    base_index: Index,
    /// Term of the entry at `base_index`.
    base_term: Term,
    /// `entries[i].index == base_index + 1 + i`.
    entries: Vec<Entry>,
    /// Highest index known to be committed.
    pub(crate) committed: Index,
    /// Highest index the driver has applied (acknowledged through `advance`).
    pub(crate) applied: Index,
    /// Highest index the driver has made durable.
    pub(crate) persisted: Index,
    /// First index not yet handed to the driver to persist.
    pub(crate) unstable_from: Index,
    /// A snapshot received from the leader, not yet handed to the driver.
    pub(crate) pending_snapshot: Option<SnapshotMeta>,
}

impl RaftLog {
    /// A log restored from durable state: `entries` must follow `snapshot`
    /// contiguously.
    pub(crate) fn restore_from(
        snapshot: SnapshotMeta,
        entries: Vec<Entry>,
        committed: Index,
        applied: Index,
    ) -> Self {
        let last = entries.last().map_or(snapshot.index, |e| e.index);
        // Whatever the application applied was committed, even if the
        // durable commit index lags behind it.
        let committed = committed.max(applied).clamp(snapshot.index, last);
        let applied = applied.clamp(snapshot.index, committed);
        RaftLog {
            entries,
            committed,
            applied,
            persisted: last,
            unstable_from: last + 1,
            pending_snapshot: None,
            base_index: snapshot.index,
            base_term: snapshot.term,
            snapshot,
        }
    }

    pub(crate) fn first_index(&self) -> Index {
        self.base_index + 1
    }

    pub(crate) fn last_index(&self) -> Index {
        self.base_index + self.entries.len() as u64
    }

    pub(crate) fn last_term(&self) -> Term {
        self.entries.last().map_or(self.base_term, |e| e.term)
    }

    /// The term of the entry at `index`, or `None` if it is compacted or
    /// beyond the end.
    pub(crate) fn term(&self, index: Index) -> Option<Term> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        if index < self.base_index || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - self.base_index - 1) as usize].term)
    }

    pub(crate) fn match_term(&self, index: Index, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// §5.4.1: is a log ending at `(last_index, last_term)` at least as
    /// up to date as ours?
    pub(crate) fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Entries in `[lo, hi)`; empty where out of range.
    pub(crate) fn slice(&self, lo: Index, hi: Index) -> &[Entry] {
        let lo = lo.max(self.first_index());
        let hi = hi.min(self.last_index() + 1);
        if lo >= hi {
            return &[];
        }
        let base = self.base_index + 1;
        &self.entries[(lo - base) as usize..(hi - base) as usize]
    }

    /// Entries from `lo`, at most `max_size` bytes but at least one.
    pub(crate) fn entries_from(&self, lo: Index, max_size: u64) -> Vec<Entry> {
        let all = self.slice(lo, self.last_index() + 1);
        let mut size = 0;
        let mut n = 0;
        for e in all {
            size += e.size();
            if n > 0 && size > max_size {
                break;
            }
            n += 1;
        }
        all[..n].to_vec()
    }

    /// The first entry of `entries` that is not already in the log with the
    /// same term, or `None` if all are.
    fn find_conflict(&self, entries: &[Entry]) -> Option<Index> {
        entries
            .iter()
            .find(|e| !self.match_term(e.index, e.term))
            .map(|e| e.index)
    }

    /// The last index at or below `index` whose term is at most `term`, with
    /// its term: the follower's hint for fast backtracking, and the leader's
    /// use of it.
    pub(crate) fn find_conflict_by_term(&self, index: Index, term: Term) -> (Index, Term) {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Some(t) if t > term && i > self.base_index => i -= 1,
                Some(t) => return (i, t),
                None => return (i, 0),
            }
        }
    }

    /// Appends the leader's entries following `(prev_index, prev_term)` if
    /// that entry matches (§5.3). Returns the index of the last entry the
    /// message covered, or `None` if the consistency check fails.
    pub(crate) fn maybe_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        entries: &[Entry],
    ) -> Option<Index> {
        if !self.match_term(prev_index, prev_term) {
            return None;
        }
        let last_new = prev_index + entries.len() as u64;
        if let Some(conflict) = self.find_conflict(entries) {
            if conflict <= self.committed {
                // A leader never sends entries that contradict committed ones
                // (leader completeness, §5.4). Refusing keeps a committed entry
                // from ever changing even if that is broken.
                return None;
            }
            let start = (conflict - prev_index - 1) as usize;
            self.truncate_and_append(&entries[start..]);
        }
        Some(last_new)
    }

    /// Appends entries, first dropping any existing entries at or after the
    /// first new index.
    pub(crate) fn truncate_and_append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let keep = (first.index - self.base_index - 1) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
        self.unstable_from = self.unstable_from.min(first.index);
        self.persisted = self.persisted.min(first.index - 1);
    }

    /// Replaces the whole log with a snapshot received from the leader.
    pub(crate) fn restore(&mut self, meta: SnapshotMeta) {
        self.entries.clear();
        self.base_index = meta.index;
        self.base_term = meta.term;
        self.committed = meta.index;
        self.unstable_from = meta.index + 1;
        self.persisted = self.persisted.min(meta.index);
        self.pending_snapshot = Some(meta.clone());
        self.snapshot = meta;
    }

    /// Records a snapshot covering everything up to `meta.index`, and drops
    /// the entries at or below `drop_to` (at most `meta.index`).
    pub(crate) fn compact(&mut self, meta: SnapshotMeta, drop_to: Index) {
        let drop_to = drop_to.min(meta.index);
        if drop_to > self.base_index
            && let Some(term) = self.term(drop_to)
        {
            let drop = (drop_to - self.base_index) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
            self.base_index = drop_to;
            self.base_term = term;
        }
        self.snapshot = meta;
    }

    /// Entries not yet handed to the driver to persist.
    pub(crate) fn unstable_entries(&self) -> &[Entry] {
        self.slice(self.unstable_from, self.last_index() + 1)
    }

    /// Committed entries not yet handed out to apply.
    pub(crate) fn next_committed(&self) -> &[Entry] {
        self.slice(self.applied + 1, self.committed + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EntryPayload;

    fn ents(terms: &[Term]) -> Vec<Entry> {
        terms
            .iter()
            .enumerate()
            .map(|(i, &t)| Entry {
                term: t,
                index: i as u64 + 1,
                payload: EntryPayload::Empty,
            })
            .collect()
    }

    #[test]
    fn find_conflict_by_term_walks_back_over_higher_terms() {
        let log = RaftLog::restore_from(SnapshotMeta::default(), ents(&[1, 1, 2, 4, 4, 5]), 0, 0);
        assert_eq!(log.find_conflict_by_term(6, 3), (3, 2));
        assert_eq!(log.find_conflict_by_term(6, 5), (6, 5));
        assert_eq!(log.find_conflict_by_term(10, 4), (5, 4));
        assert_eq!(log.find_conflict_by_term(6, 0), (0, 0));
    }

    #[test]
    fn maybe_append_truncates_only_from_the_first_conflict() {
        let mut log = RaftLog::restore_from(SnapshotMeta::default(), ents(&[1, 1, 1]), 1, 0);
        let new = vec![
            Entry {
                term: 1,
                index: 2,
                payload: EntryPayload::Empty,
            },
            Entry {
                term: 2,
                index: 3,
                payload: EntryPayload::Empty,
            },
        ];
        assert_eq!(log.maybe_append(1, 1, &new), Some(3));
        assert_eq!(log.term(3), Some(2));
        assert_eq!(log.unstable_from, 3);
        assert_eq!(log.persisted, 2);
        assert_eq!(log.maybe_append(3, 1, &[]), None);
    }

    #[test]
    fn entries_from_respects_size_but_sends_one() {
        let log = RaftLog::restore_from(SnapshotMeta::default(), ents(&[1, 1, 1]), 0, 0);
        assert_eq!(log.entries_from(1, 0).len(), 1);
        assert_eq!(log.entries_from(1, 32).len(), 2);
        assert_eq!(log.entries_from(1, u64::MAX).len(), 3);
    }
}
