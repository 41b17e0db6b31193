//! Offline disaster recovery (`gateway --recover`): turns one member's data
//! into a new single-member group, for the day the group lost its quorum
//! for good.
//!
//! The member's log is kept whole, as etcd's `--force-new-cluster` keeps
//! it: every entry it holds, up to its last index, stays and is committed
//! by the new group (entries past its old commit index may or may not have
//! been committed by the old group; keeping them loses nothing this member
//! received). Then, in a new term (the old term + 1, so that none of the
//! old members can lead the new group), membership changes are appended
//! that leave this member the only voter: `AddVoter(self)` and a
//! `RemoveNode` for every other member its snapshot or log names. The hard
//! state says this member voted for itself in that term and that the whole
//! log is committed.
//!
//! Lost are the writes this member had not received: those the old group
//! acknowledged at an index past this member's last index.

use std::collections::BTreeSet;
use std::path::Path;

use coordinator::raft::{ConfChange, Entry, EntryPayload, HardState, Index, NodeId, Term};
use coordinator::storage::{Storage, StorageOptions};

use crate::GatewayError;

/// What [`recover`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The member kept as the only voter.
    pub node_id: NodeId,
    /// The term of the old group's log (its hard state).
    pub old_term: Term,
    /// The new group's term.
    pub new_term: Term,
    /// The old commit index this member knew of.
    pub old_commit: Index,
    /// The last index of the old log, every entry up to which is kept.
    pub last_index_kept: Index,
    /// The index of the last membership change appended (the new commit).
    pub new_commit: Index,
    /// The other members that were dropped.
    pub dropped: BTreeSet<NodeId>,
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dropped: Vec<String> = self.dropped.iter().map(|d| d.to_string()).collect();
        writeln!(
            f,
            "recovered gateway {} as a new single-member group (term {} -> {})",
            self.node_id, self.old_term, self.new_term
        )?;
        writeln!(
            f,
            "kept every log entry up to index {} (this member knew entries up to {} as committed; \
             the {} after it are committed now)",
            self.last_index_kept,
            self.old_commit,
            self.last_index_kept.saturating_sub(self.old_commit)
        )?;
        writeln!(
            f,
            "dropped members: {}",
            if dropped.is_empty() {
                "none".to_string()
            } else {
                dropped.join(", ")
            }
        )?;
        writeln!(
            f,
            "LOST: any write the old group acknowledged at an index after {} (this member never \
             received it)",
            self.last_index_kept
        )?;
        write!(
            f,
            "next: start this gateway alone (--peers naming only itself, no --join), then add \
             members with POST /v1/cluster/members"
        )
    }
}

/// Rewrites the raft storage in `data_dir` so that `node_id` is the only
/// voter of a new group; see the module documentation. The gateway must not
/// be running on `data_dir`.
///
/// `others` are further members to drop (the `--peers` given): a group
/// bootstrapped from `--peers` names its first members nowhere in its log.
pub fn recover(
    data_dir: &Path,
    node_id: NodeId,
    others: impl IntoIterator<Item = NodeId>,
) -> Result<Recovery, GatewayError> {
    let raft_dir = data_dir.join("raft");
    if !raft_dir.join("hardstate").is_file() {
        return Err(GatewayError::Config(format!(
            "{} holds no group (no raft/hardstate): nothing to recover",
            data_dir.display()
        )));
    }
    let _lock = crate::lock_data_dir(data_dir)?;
    let (mut storage, recovered) = Storage::open(&raft_dir, StorageOptions::default())?;
    let old = recovered.hard_state;
    let last = storage.last_index();
    if old.term == 0 && last == 0 {
        return Err(GatewayError::Config(format!(
            "{} holds no group (an empty log): nothing to recover",
            data_dir.display()
        )));
    }
    let mut members: BTreeSet<NodeId> = others.into_iter().collect();
    if let Some(meta) = &recovered.snapshot {
        members.extend(meta.conf_state.members());
    }
    for e in &recovered.entries {
        if let EntryPayload::ConfChange(c) = &e.payload {
            members.insert(c.node());
        }
    }
    members.remove(&node_id);
    let term = old.term.max(storage.term(last).unwrap_or(0)) + 1;
    let mut changes = vec![ConfChange::AddVoter(node_id)];
    changes.extend(members.iter().map(|&id| ConfChange::RemoveNode(id)));
    let entries: Vec<Entry> = changes
        .into_iter()
        .zip(last + 1..)
        .map(|(c, index)| Entry {
            term,
            index,
            payload: EntryPayload::ConfChange(c),
        })
        .collect();
    let commit = last + entries.len() as Index;
    storage.append(&entries)?;
    storage.sync()?;
    storage.set_hard_state(HardState {
        term,
        vote: Some(node_id),
        commit,
    })?;
    storage.close()?;
    Ok(Recovery {
        node_id,
        old_term: old.term,
        new_term: term,
        old_commit: old.commit,
        last_index_kept: last,
        new_commit: commit,
        dropped: members,
    })
}
