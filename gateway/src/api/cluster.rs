//! `/v1/cluster`: the group as this gateway sees it, and membership changes
//! (admin): add a learner, promote it, remove a member, transfer leadership.
//! Any gateway takes them: a follower forwards the change to the leader.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use coordinator::node::NodeError;
use coordinator::raft::{ConfChange, Role as RaftRole};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, Problem, write_error};
use super::extract::{ApiJson, ApiPath, ApiQuery, reply, write};
use crate::ops::Op;

/// A member of the group.
#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// `voter` (counts towards quorums) or `learner` (receives the log only).
    pub suffrage: String,
    /// `leader`, `follower`, `candidate`, `pre_candidate` or `learner`, where
    /// this gateway knows it (its own role, the leader's, on the leader
    /// every member's, and otherwise the role a member gave in a status
    /// report received within `unreachable_after_ms`); otherwise absent.
    pub role: Option<String>,
    /// On the leader: the highest log index known to be replicated to it.
    pub matched: Option<u64>,
    /// On the leader: whether it is connected — it has answered the leader,
    /// and recently (within about two election timeouts). The membership
    /// guards count only such members.
    pub active: Option<bool>,
    /// On the leader: how many entries it trails the leader's commit index
    /// by (`commit` − `matched`, 0 when it holds them all).
    pub lag: Option<u64>,
    /// Its own commit index, as it reports it: this gateway's own, and
    /// every other member's from the last status report it sent this
    /// gateway (every 250 ms; see `reported_ms_ago`). Absent for a member
    /// not heard from since this gateway started. What the member says of
    /// itself (on PBFT a faulty member may lie): for display only.
    pub commit: Option<u64>,
    /// Its own applied index, as it reports it (like `commit`).
    pub applied: Option<u64>,
    /// Its own term (Multi-Paxos: ballot; PBFT: view), as it reports it
    /// (like `commit`).
    pub term: Option<u64>,
    /// How many milliseconds ago this gateway received the status report
    /// that `commit`, `applied` and `term` come from: 0 for this gateway's
    /// own row; absent for a member not heard from since this gateway
    /// started. A member that stopped reporting keeps its last numbers,
    /// with their age.
    pub reported_ms_ago: Option<u64>,
    /// `ok`; `lagging` — trails by more than `lag_warning` entries: on the
    /// leader, its commit index (`lag`); this gateway's own applied index
    /// its own commit index; another member's reported applied index this
    /// gateway's commit index when the report arrived; `unreachable` — on
    /// the leader, not connected (`active` false), or no status report
    /// from it for more than `unreachable_after_ms` (or none since this
    /// gateway started that long ago); `unknown` — nothing heard yet, this
    /// gateway having started less than `unreachable_after_ms` ago.
    pub health: String,
}

/// A member trailing the leader's commit index (or applying behind its own)
/// by more than this many entries is `lagging`.
pub const LAG_WARNING: u64 = 100;

/// A member whose last status report is older than this (members send one
/// every 250 ms) is `unreachable`.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(3);

/// The group as this gateway sees it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"node_id":2,"engine":"raft","role":"follower","leader":1,"term":3,"commit":542,
    "applied":542,"members":[
        {"id":1,"suffrage":"voter","role":"leader","matched":null,"active":null,"lag":null,
         "commit":542,"applied":541,"term":3,"reported_ms_ago":120,"health":"ok"},
        {"id":2,"suffrage":"voter","role":"follower","matched":null,"active":null,"lag":null,
         "commit":542,"applied":542,"term":3,"reported_ms_ago":0,"health":"ok"},
        {"id":3,"suffrage":"voter","role":null,"matched":null,"active":null,"lag":null,
         "commit":310,"applied":310,"term":3,"reported_ms_ago":48210,"health":"unreachable"}],
    "lag_warning":100,"unreachable_after_ms":3000,
    "warnings":["Member 3 has sent no status report for 48 s (its last: commit 310, applied 310)."]}))]
pub struct ClusterStatus {
    /// This gateway's node id.
    pub node_id: u64,
    /// The group's consensus engine: `raft`, `multi-paxos` or `pbft`.
    pub engine: String,
    /// This gateway's role. PBFT: `leader` for the primary of its view,
    /// `follower` for a backup, `candidate` while it changes views.
    pub role: String,
    /// The leader this gateway knows of, if any (PBFT: the primary of its
    /// view; none while it changes views).
    pub leader: Option<u64>,
    /// This gateway's current term (Multi-Paxos: its ballot; PBFT: its
    /// view, from 0).
    pub term: u64,
    /// The highest log index this gateway knows is committed.
    pub commit: u64,
    /// The highest log index this gateway has applied.
    pub applied: u64,
    /// The members (voters, then learners), by id.
    pub members: Vec<Member>,
    /// The lag, in entries, beyond which a member is `lagging`.
    pub lag_warning: u64,
    /// How long, in milliseconds, without a status report from a member
    /// before it is `unreachable`.
    pub unreachable_after_ms: u64,
    /// What an operator should look at, in words: no leader known, a
    /// member unreachable or lagging. Empty when all is well (as far as
    /// this gateway can tell).
    pub warnings: Vec<String>,
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
///
/// Every member's own commit and applied index and term come from the
/// status report it sends every other member every 250 ms (this gateway's
/// own are its own), with their age (`reported_ms_ago`): what each member
/// says of itself, for display only.
#[utoipa::path(
    get, path = "/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The group as this gateway sees it", body = ClusterStatus,
            headers(("Entente-Index" = u64, description = "This gateway's applied log index"))),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The gateway did not finish the request in time", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn cluster(State(state): State<AppState>) -> Result<Response, ApiError> {
    let st = state.node.status();
    let reports = state.node.peer_reports();
    let now = tokio::time::Instant::now();
    let up = now.saturating_duration_since(state.node.started());
    let raft = &st.raft;
    let is_leader = raft.role == RaftRole::Leader;
    let mut warnings = Vec::new();
    if raft.leader.is_none() {
        warnings
            .push("No leader is known: writes fail (503) until the group elects one.".to_string());
    }
    let mut member = |id: u64, learner: bool| {
        let progress = raft.progress.get(&id);
        let own = id == raft.id;
        let report = reports.get(&id).filter(|_| !own);
        let age = report.map(|r| now.saturating_duration_since(r.at));
        let fresh = age.is_some_and(|a| a <= UNREACHABLE_AFTER);
        let role = if own && !(learner && raft.role == RaftRole::Follower) {
            Some(role_name(raft.role))
        } else if Some(id) == raft.leader {
            Some("leader")
        } else if learner {
            Some("learner")
        } else if is_leader {
            // The leader knows its voters follow it (or are unreachable).
            Some("follower")
        } else if fresh {
            report.map(|r| role_name(r.status.role))
        } else {
            None
        };
        let lag = if is_leader {
            progress.map(|p| raft.commit.saturating_sub(p.matched))
        } else {
            None
        };
        let (commit, applied, term, reported_ms_ago) = if own {
            (
                Some(raft.commit),
                Some(raft.applied),
                Some(raft.term),
                Some(0),
            )
        } else {
            (
                report.map(|r| r.status.commit),
                report.map(|r| r.status.applied),
                report.map(|r| r.status.term),
                age.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
            )
        };
        // How far its applied index trailed: this gateway's own behind
        // its commit index; another's, as reported, behind this gateway's
        // commit index when the report arrived.
        let behind = if own {
            Some(raft.commit.saturating_sub(raft.applied))
        } else {
            report
                .filter(|_| fresh)
                .map(|r| r.commit_here.saturating_sub(r.status.applied))
        };
        let cut_off = progress.is_some_and(|p| !p.connected) && !own;
        let silent = !own
            && match age {
                Some(a) => a > UNREACHABLE_AFTER,
                None => up > UNREACHABLE_AFTER,
            };
        let last = match (commit, applied) {
            (Some(c), Some(a)) => format!(" (its last: commit {c}, applied {a})"),
            _ => String::new(),
        };
        let (health, warning) = if cut_off {
            (
                "unreachable",
                Some(format!("Member {id} is unreachable from the leader.")),
            )
        } else if silent {
            let w = match age {
                Some(a) => format!(
                    "Member {id} has sent no status report for {} s{last}.",
                    a.as_secs()
                ),
                None => format!(
                    "Member {id} has sent no status report since this gateway started {} s ago.",
                    up.as_secs()
                ),
            };
            ("unreachable", Some(w))
        } else if let Some(l) = lag.filter(|&l| l > LAG_WARNING) {
            (
                "lagging",
                Some(format!(
                    "Member {id} lags the leader's commit index by {l} entries."
                )),
            )
        } else if let Some(b) = behind.filter(|&b| b > LAG_WARNING) {
            let w = if own {
                format!("Member {id} (this gateway) applies {b} entries behind its commit index.")
            } else {
                format!("Member {id} applies {b} entries behind this gateway's commit index.")
            };
            ("lagging", Some(w))
        } else if own || progress.is_some() || fresh {
            ("ok", None)
        } else {
            ("unknown", None)
        };
        warnings.extend(warning);
        Member {
            id,
            suffrage: if learner { "learner" } else { "voter" }.into(),
            role: role.map(Into::into),
            matched: progress.map(|p| p.matched),
            active: progress.map(|p| p.connected),
            lag,
            commit,
            applied,
            term,
            reported_ms_ago,
            health: health.into(),
        }
    };
    let conf = &raft.conf_state;
    let mut members = Vec::with_capacity(conf.voters.len() + conf.learners.len());
    for id in &conf.voters {
        members.push(member(*id, false));
    }
    for id in &conf.learners {
        members.push(member(*id, true));
    }
    let body = ClusterStatus {
        node_id: raft.id,
        engine: state.config.consensus.name().into(),
        role: role_name(raft.role).into(),
        leader: raft.leader,
        term: raft.term,
        commit: raft.commit,
        applied: raft.applied,
        members,
        lag_warning: LAG_WARNING,
        unreachable_after_ms: UNREACHABLE_AFTER.as_millis() as u64,
        warnings,
    };
    Ok(reply(StatusCode::OK, state.db.applied_index(), &body))
}

/// What a member is to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Suffrage {
    /// Receives the log, never votes (how every new member starts).
    Learner,
    /// Votes and counts towards quorums.
    Voter,
}

/// Body of `POST /v1/cluster/members`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": 4, "address": "127.0.0.1:7004", "suffrage": "learner"}))]
pub struct MemberChange {
    /// The gateway's node id (≥ 1).
    #[serde(deserialize_with = "super::schemas::integral")]
    #[schema(value_type = super::schemas::NodeId)]
    pub id: u64,
    /// `host:port` of its peer listener: needed when it is added, optional
    /// when it is promoted (recorded for every member, so all can reach it).
    #[schema(value_type = Option<super::schemas::PeerAddress>)]
    pub address: Option<String>,
    /// `learner` to add it, `voter` to promote a learner that has caught up.
    pub suffrage: Suffrage,
    /// Skip the leader's guards (a promoted learner must be connected and
    /// caught up; the voters must keep an active quorum). For an operator
    /// who knows better: a forced change can stop the group for good.
    #[serde(default)]
    pub force: bool,
}

/// Query of `DELETE /v1/cluster/members/{id}`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveOptions {
    /// Skip the leader's guard (the voters left must keep an active
    /// quorum). For an operator who knows better: a forced removal can stop
    /// the group for good.
    #[serde(default)]
    pub force: bool,
}

/// The result of a membership change.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberChanged {
    /// The node id.
    pub id: u64,
    /// `learner`, `voter` or `removed`.
    pub suffrage: String,
    /// The log index of the change.
    pub index: u64,
}

/// Body of `POST /v1/cluster/leader`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaderTransfer {
    /// The voter to hand leadership to.
    #[serde(deserialize_with = "super::schemas::integral")]
    #[schema(value_type = super::schemas::NodeId)]
    pub id: u64,
}

fn valid_address(a: &str) -> Result<(), ApiError> {
    // The same syntax as `--peers`: every member parses it into its peer
    // table, looking a host name up at every dial.
    match a.parse::<coordinator::transport::PeerAddr>() {
        Ok(_) if a.len() <= super::schemas::MAX_PEER_ADDRESS => Ok(()),
        _ => Err(ApiError::invalid(format!(
            "address {} is not host:port of a peer listener",
            super::validate::quoted(a)
        ))),
    }
}

/// Commits a membership change and answers once this gateway's own view
/// shows it.
async fn commit_change(
    state: &AppState,
    change: ConfChange,
    force: bool,
    how_to_force: &str,
) -> Result<u64, ApiError> {
    // Another change being committed — or a new leader's first entry, which
    // must commit before it takes any change — is over in moments: such a
    // refusal is retried within the write timeout, not handed back.
    let deadline = tokio::time::Instant::now() + state.config.write_timeout;
    let index = loop {
        match state.node.change_membership(change, force).await {
            Err(NodeError::Refused(reason))
                if reason.contains("already pending") && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            r => break r.map_err(|e| member_error(e, state, how_to_force))?,
        }
    };
    let _ = state
        .node
        .wait_applied(index, state.config.write_timeout)
        .await;
    Ok(index)
}

/// Membership changes and leadership transfer exist on Raft only: on
/// another engine they are a 409 saying so, before anything is checked or
/// proposed.
fn fixed_membership(state: &AppState) -> Result<(), ApiError> {
    let engine = state.config.consensus;
    if engine.reconfigurable() {
        return Ok(());
    }
    Err(ApiError::conflict(format!(
        "the group runs the {engine} consensus engine, whose membership is fixed at start and \
         which does not hand leadership over: membership changes and leadership transfer need \
         the raft engine"
    )))
}

/// A refusal is a 409 naming the leader's reason; one of its guards adds
/// how to override it (`how_to_force`).
fn member_error(e: NodeError, state: &AppState, how_to_force: &str) -> ApiError {
    match e {
        NodeError::Refused(reason) => {
            let force = if reason.starts_with("unsafe membership change")
                && !how_to_force.is_empty()
            {
                format!(" (an operator who knows better may override this guard: {how_to_force})")
            } else {
                String::new()
            };
            ApiError::conflict(format!(
                "the group refused the membership change: {reason}{force}"
            ))
        }
        e => write_error(e, state.config.write_timeout),
    }
}

/// Add a gateway as a learner, or promote a learner to voter.
///
/// Adding: start the new gateway with `--join`, then post its id, peer
/// address and `"suffrage": "learner"`; it receives a snapshot and the log.
/// Promoting: post `"suffrage": "voter"` once it has caught up. The leader
/// refuses (409, with the reason) to promote a learner that is not
/// connected (`active` in `GET /v1/cluster` on the leader) or trails its
/// commit index by more than 1,000 entries (`matched`), and any promotion
/// after which fewer voters than a quorum would be active. `"force": true`
/// skips these guards, for an operator who knows better. One change at a
/// time.
#[utoipa::path(
    post, path = "/v1/cluster/members", tag = "cluster",
    request_body = MemberChange,
    responses(
        (status = 200, description = "The change committed", body = MemberChanged,
            headers(("Entente-Index" = u64, description = "Log index of the change"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Refused, with the reason and what to do: a voter cannot become a learner; only a learner can be promoted; a new member needs its address; a guard (the learner is not connected or has not caught up, or the voters would lack an active quorum; `force` overrides); another change pending; the group's consensus engine has a fixed membership (any engine but raft)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (id 0, an address that is not host:port, an unknown field)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No quorum or leader; or timed out (the change may still take effect)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn add_member(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<MemberChange>,
) -> Result<Response, ApiError> {
    fixed_membership(&state)?;
    if body.id == 0 {
        return Err(ApiError::invalid("id must be at least 1"));
    }
    let raft = state.node.status().raft;
    let conf = &raft.conf_state;
    let (is_voter, is_learner) = (
        conf.voters.contains(&body.id),
        conf.learners.contains(&body.id),
    );
    if let Some(a) = &body.address {
        valid_address(a)?;
        write(
            &state,
            Op::SetPeerAddress {
                id: body.id,
                address: a.clone(),
            },
        )
        .await?;
    }
    let change = match body.suffrage {
        Suffrage::Learner if is_voter => {
            return Err(ApiError::conflict(format!(
                "gateway {} is a voter; remove it first to make it a learner",
                body.id
            )));
        }
        Suffrage::Learner => {
            if !is_learner && body.address.is_none() && !state.config.peers.contains_key(&body.id) {
                let known = state.db.peer_addresses().await?;
                if !known.iter().any(|(id, _)| *id == body.id) {
                    // Not a malformed request: the group does not know
                    // this gateway yet (409, like the other refusals that
                    // depend on the group's state).
                    return Err(ApiError::conflict(format!(
                        "gateway {} is new to the group: give the address of its peer listener \
                         (\"address\": \"host:port\")",
                        body.id
                    )));
                }
            }
            ConfChange::AddLearner(body.id)
        }
        Suffrage::Voter if is_voter => {
            let body = MemberChanged {
                id: body.id,
                suffrage: "voter".into(),
                index: raft.commit,
            };
            return Ok(reply(StatusCode::OK, state.db.applied_index(), &body));
        }
        Suffrage::Voter if !is_learner => {
            return Err(ApiError::conflict(format!(
                "gateway {} is not a learner: add it as a learner first, then promote it \
                 once it has caught up",
                body.id
            )));
        }
        // The leader checks it is connected and caught up.
        Suffrage::Voter => ConfChange::AddVoter(body.id),
    };
    let index = commit_change(
        &state,
        change,
        body.force,
        r#"repeat it with "force": true"#,
    )
    .await?;
    let suffrage = match body.suffrage {
        Suffrage::Learner => "learner",
        Suffrage::Voter => "voter",
    };
    let out = MemberChanged {
        id: body.id,
        suffrage: suffrage.into(),
        index,
    };
    Ok(reply(StatusCode::OK, index, &out))
}

/// Remove a gateway (voter or learner) from the group.
///
/// The removed gateway learns it (from a member), stops campaigning, closes
/// its device listeners and ends its device sessions, which are declared
/// lost; its `/readyz` says it was removed. Add it again as a learner to
/// bring it back, or stop it.
///
/// The leader refuses (409, with the reason) a removal after which fewer
/// voters than a quorum would be active (in a group of three with one
/// member down, removing one that is up); remove the member that is down,
/// or bring it back, first. `?force=true` skips this guard, for an
/// operator who knows better. The last voter cannot be removed.
#[utoipa::path(
    delete, path = "/v1/cluster/members/{id}", tag = "cluster",
    params(("id" = u64, Path, description = "Node id"), RemoveOptions),
    responses(
        (status = 200, description = "The change committed", body = MemberChanged,
            headers(("Entente-Index" = u64, description = "Log index of the change"))),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "Malformed id or query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a member", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Refused, with the reason and what to do: the last voter; the voters left would lack an active quorum (`force` overrides); another change pending; the group's consensus engine has a fixed membership (any engine but raft)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No quorum or leader; or timed out (the change may still take effect)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(opts): ApiQuery<RemoveOptions>,
) -> Result<Response, ApiError> {
    fixed_membership(&state)?;
    let conf = state.node.status().raft.conf_state;
    if !conf.voters.contains(&id) && !conf.learners.contains(&id) {
        return Err(ApiError::not_found(format!(
            "gateway {id} is not a member of the group"
        )));
    }
    if conf.voters.len() == 1 && conf.voters.contains(&id) {
        return Err(ApiError::conflict(format!(
            "gateway {id} is the last voter; the group cannot remove it"
        )));
    }
    let index = commit_change(
        &state,
        ConfChange::RemoveNode(id),
        opts.force,
        "repeat it with ?force=true",
    )
    .await?;
    // A removed gateway ends its device sessions once it learns it was
    // removed, and it can no longer say so itself: its sessions are lost.
    if let Err(e) = write(&state, Op::GatewaySessionsLost { gateway: id }).await {
        tracing::warn!(gateway = id, error = ?e, "declaring a removed gateway's device sessions lost");
    }
    let out = MemberChanged {
        id,
        suffrage: "removed".into(),
        index,
    };
    Ok(reply(StatusCode::OK, index, &out))
}

/// Hand leadership to another voter; returns once it leads.
#[utoipa::path(
    post, path = "/v1/cluster/leader", tag = "cluster",
    request_body = LeaderTransfer,
    responses(
        (status = 200, description = "The voter leads", body = ClusterStatus),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not a voter; the group's consensus engine does not transfer leadership (any engine but raft)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (a missing, non-numeric or 0 id, an unknown field)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader, or the transfer timed out", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn transfer_leader(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<LeaderTransfer>,
) -> Result<Response, ApiError> {
    fixed_membership(&state)?;
    if body.id == 0 {
        return Err(ApiError::invalid("id must be at least 1"));
    }
    state
        .node
        .transfer_leader(body.id)
        .await
        .map_err(|e| member_error(e, &state, ""))?;
    cluster(State(state)).await
}
