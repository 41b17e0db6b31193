//! Status reports: each member tells the others, every status interval, its
//! own commit and applied index, term (view) and role. Driver-level (not an
//! engine message), the same for every engine; informational only.

use serde::{Deserialize, Serialize};

use crate::raft::{Index, MAX_INDEX, MAX_TERM, NodeId, Role, Term};

/// What a member says about itself in a status report. Nothing checks it
/// against the group's state: on PBFT a Byzantine member may lie about its
/// own numbers. For display only; never used for a safety decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The member reporting (the authenticated sender of the frame).
    pub from: NodeId,
    /// Its current term (Multi-Paxos: ballot; PBFT: view).
    pub term: Term,
    /// Its commit index.
    pub commit: Index,
    /// Its state machine's applied index.
    pub applied: Index,
    /// Its role (PBFT: `Leader` for the primary of its view, `Candidate`
    /// while it changes views).
    pub role: Role,
}

/// A status report as it travels in `Frame::Status`: the role is a code, so
/// that a report with a role this version does not know is refused on its
/// own instead of failing the whole frame (and the connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusWire {
    pub from: NodeId,
    pub term: Term,
    pub commit: Index,
    pub applied: Index,
    /// 0 follower, 1 pre-candidate, 2 candidate, 3 leader.
    pub role: u8,
}

impl PeerStatus {
    /// Its wire form.
    pub(crate) fn to_wire(self) -> StatusWire {
        StatusWire {
            from: self.from,
            term: self.term,
            commit: self.commit,
            applied: self.applied,
            role: match self.role {
                Role::Follower => 0,
                Role::PreCandidate => 1,
                Role::Candidate => 2,
                Role::Leader => 3,
            },
        }
    }

    /// Checks a report received from the authenticated `peer`: it must be
    /// the peer's own, name a known role, and hold numbers no group reaches
    /// ([`MAX_TERM`], [`MAX_INDEX`]) neither. Returns why not, for the log.
    pub(crate) fn from_wire(w: StatusWire, peer: NodeId) -> Result<PeerStatus, &'static str> {
        if w.from != peer {
            return Err("the report names another sender than the authenticated peer");
        }
        let role = match w.role {
            0 => Role::Follower,
            1 => Role::PreCandidate,
            2 => Role::Candidate,
            3 => Role::Leader,
            _ => return Err("unknown role code"),
        };
        if w.term > MAX_TERM {
            return Err("term beyond any a group reaches");
        }
        if w.commit > MAX_INDEX || w.applied > MAX_INDEX {
            return Err("index beyond any a log reaches");
        }
        Ok(PeerStatus {
            from: w.from,
            term: w.term,
            commit: w.commit,
            applied: w.applied,
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(from: NodeId, role: u8, term: Term, commit: Index, applied: Index) -> StatusWire {
        StatusWire {
            from,
            term,
            commit,
            applied,
            role,
        }
    }

    #[test]
    fn a_report_round_trips_and_odd_ones_are_refused_with_the_reason() {
        for role in [
            Role::Follower,
            Role::PreCandidate,
            Role::Candidate,
            Role::Leader,
        ] {
            let s = PeerStatus {
                from: 2,
                term: 7,
                commit: 40,
                applied: 38,
                role,
            };
            assert_eq!(PeerStatus::from_wire(s.to_wire(), 2), Ok(s));
        }
        // An applied index ahead of the commit index is not odd: after a
        // restart the state machine's can be ahead of the engine's.
        assert!(PeerStatus::from_wire(wire(2, 0, 1, 5, 9), 2).is_ok());
        let refused = |w, peer| PeerStatus::from_wire(w, peer).expect_err("refused");
        assert!(refused(wire(3, 0, 1, 1, 1), 2).contains("another sender"));
        assert!(refused(wire(2, 4, 1, 1, 1), 2).contains("role"));
        assert!(refused(wire(2, 255, 1, 1, 1), 2).contains("role"));
        assert!(refused(wire(2, 0, MAX_TERM + 1, 1, 1), 2).contains("term"));
        assert!(refused(wire(2, 0, 1, u64::MAX, 1), 2).contains("index"));
        assert!(refused(wire(2, 0, 1, 1, MAX_INDEX + 1), 2).contains("index"));
    }
}
