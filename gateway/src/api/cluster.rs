//! `GET /v1/cluster`: the group as this gateway sees it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use coordinator::raft::Role as RaftRole;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::reply;

/// A member of the group.
#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// `voter` (counts towards quorums) or `learner` (receives the log only).
    pub suffrage: String,
    /// `leader`, `follower`, `candidate`, `pre_candidate` or `learner`, where
    /// this gateway knows it (its own role, the leader's, and — on the
    /// leader — every member's); otherwise absent.
    pub role: Option<String>,
    /// On the leader: the highest log index known to be replicated to it.
    pub matched: Option<u64>,
    /// On the leader: whether it was heard from recently.
    pub active: Option<bool>,
}

/// The group as this gateway sees it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"node_id":1,"role":"leader","leader":1,"term":3,"commit":42,
    "applied":42,"members":[{"id":1,"suffrage":"voter","role":"leader","matched":42,"active":true}]}))]
pub struct ClusterStatus {
    /// This gateway's node id.
    pub node_id: u64,
    /// This gateway's role.
    pub role: String,
    /// The leader this gateway knows of, if any.
    pub leader: Option<u64>,
    /// This gateway's current term.
    pub term: u64,
    /// The highest log index this gateway knows is committed.
    pub commit: u64,
    /// The highest log index this gateway has applied.
    pub applied: u64,
    /// The members (voters, then learners), by id.
    pub members: Vec<Member>,
}

/// The name of a Raft role in the API.
pub(crate) fn role_name(r: RaftRole) -> &'static str {
    match r {
        RaftRole::Leader => "leader",
        RaftRole::Follower => "follower",
        RaftRole::Candidate => "candidate",
        RaftRole::PreCandidate => "pre_candidate",
    }
}

/// Show the group's members, leader, term and indexes.
#[utoipa::path(
    get, path = "/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The group as this gateway sees it", body = ClusterStatus,
            headers(("Entente-Index" = u64, description = "This gateway's applied log index"))),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn cluster(State(state): State<AppState>) -> Result<Response, ApiError> {
    let st = state.node.status();
    let raft = &st.raft;
    let is_leader = raft.role == RaftRole::Leader;
    let member = |id: u64, learner: bool| {
        let progress = raft.progress.get(&id);
        let role = if id == raft.id && !(learner && raft.role == RaftRole::Follower) {
            Some(role_name(raft.role))
        } else if Some(id) == raft.leader {
            Some("leader")
        } else if learner {
            Some("learner")
        } else if is_leader {
            // The leader knows its voters follow it (or are unreachable).
            Some("follower")
        } else {
            None
        };
        Member {
            id,
            suffrage: if learner { "learner" } else { "voter" }.into(),
            role: role.map(Into::into),
            matched: progress.map(|p| p.matched),
            active: progress.map(|p| p.recent_active),
        }
    };
    let conf = &raft.conf_state;
    let members = conf
        .voters
        .iter()
        .map(|id| member(*id, false))
        .chain(conf.learners.iter().map(|id| member(*id, true)))
        .collect();
    let body = ClusterStatus {
        node_id: raft.id,
        role: role_name(raft.role).into(),
        leader: raft.leader,
        term: raft.term,
        commit: raft.commit,
        applied: raft.applied,
        members,
    };
    Ok(reply(StatusCode::OK, state.db.applied_index(), &body))
}
