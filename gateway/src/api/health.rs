//! `/healthz`, `/readyz` and `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Extension, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use coordinator::raft::Role as RaftRole;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::cluster::role_name;
use super::error::{ApiError, Problem};
use super::events::EventStreams;
use crate::ops::CommandStatus;
use crate::server::HttpStats;

/// Upper bounds (seconds) of the request latency histogram buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// How long `/readyz` waits for the applied index to reach the commit index
/// it saw.
const READY_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative); the last slot is `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(&'static str, String, u16), u64>,
    latency: BTreeMap<(&'static str, String), Histogram>,
}

/// Request counters and latency histograms of one router.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Metrics {
    fn record(&self, method: &'static str, route: String, status: u16, elapsed: Duration) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        *inner
            .requests
            .entry((method, route.clone(), status))
            .or_default() += 1;
        let h = inner.latency.entry((method, route)).or_default();
        let secs = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        h.counts[slot] += 1;
        h.sum += secs;
        h.count += 1;
    }

    fn render(&self, out: &mut String) {
        let Ok(inner) = self.inner.lock() else {
            return;
        };
        let _ = writeln!(
            out,
            "# HELP entente_http_requests_total HTTP requests answered, by method, route and status."
        );
        let _ = writeln!(out, "# TYPE entente_http_requests_total counter");
        for ((m, r, s), n) in &inner.requests {
            let _ = writeln!(
                out,
                "entente_http_requests_total{{method=\"{m}\",route=\"{}\",status=\"{s}\"}} {n}",
                escape(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP entente_http_request_duration_seconds Time to the response head, by method and route."
        );
        let _ = writeln!(
            out,
            "# TYPE entente_http_request_duration_seconds histogram"
        );
        for ((m, r), h) in &inner.latency {
            let r = escape(r);
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += h.counts[i];
                let _ = writeln!(
                    out,
                    "entente_http_request_duration_seconds_bucket{{method=\"{m}\",route=\"{r}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "entente_http_request_duration_seconds_bucket{{method=\"{m}\",route=\"{r}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "entente_http_request_duration_seconds_sum{{method=\"{m}\",route=\"{r}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "entente_http_request_duration_seconds_count{{method=\"{m}\",route=\"{r}\"}} {}",
                h.count
            );
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Middleware: counts every request by its route template (not its raw
/// path, which would make unbounded label values) and status.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let res = next.run(req).await;
    metrics.record(method, route, res.status().as_u16(), start.elapsed());
    res
}

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: String,
    /// The leader this gateway knows of (readyz).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    /// The commit index it saw (readyz).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<u64>,
    /// Its applied index (readyz).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
}

/// A device listener that stopped makes the gateway unhealthy: devices can
/// no longer reach it there, whatever the REST API says.
fn listeners_ok(state: &AppState) -> Result<(), ApiError> {
    let down = state
        .mqtt
        .listeners_down
        .load(std::sync::atomic::Ordering::SeqCst);
    if down > 0 {
        return Err(ApiError::unavailable(
            "device-listener-down",
            format!(
                "{down} device (MQTT) listener(s) of this gateway stopped (see its log); restart the gateway"
            ),
            5,
        ));
    }
    Ok(())
}

/// Liveness: 200 while the process serves HTTP and its device listeners
/// accept connections; 503 when a device listener stopped.
#[utoipa::path(
    get, path = "/healthz", tag = "health", security(()),
    responses(
        (status = 200, description = "The process serves requests", body = Health),
        (status = 503, description = "A device listener stopped", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn healthz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    listeners_ok(&state)?;
    Ok(Json(Health {
        status: "ok".into(),
        leader: None,
        commit: None,
        applied: None,
    }))
}

/// Readiness: 200 once the gateway knows a leader and has applied the log
/// up to the commit index it saw; 503 otherwise.
#[utoipa::path(
    get, path = "/readyz", tag = "health", security(()),
    responses(
        (status = 200, description = "Ready to serve", body = Health),
        (status = 503, description = "Not ready (no leader, applying the log, a device listener stopped, or not a member of the group: removed, or not added yet)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    listeners_ok(&state)?;
    let st = state.node.status();
    if let Some(fatal) = &st.fatal {
        // Logged once as an error when the node stopped; a probe asks often.
        tracing::debug!(error = %fatal, "readyz: the raft node stopped");
        return Err(ApiError::unavailable(
            "not-ready",
            "the consensus node of this gateway has stopped after an error (see its log); \
             restart the gateway",
            5,
        ));
    }
    match crate::Standing::of(&st.raft) {
        crate::Standing::Member => {}
        crate::Standing::NotAdded => {
            return Err(ApiError::unavailable(
                "not-a-member",
                "this gateway is not a member of the group yet (started with --join): add it \
                 with POST /v1/cluster/members on a member; until then it serves no devices",
                5,
            ));
        }
        crate::Standing::Removed { at } => {
            let why = match at {
                Some(at) => {
                    format!("a member's configuration, committed at index {at}, does not list it")
                }
                None => format!(
                    "its configuration (committed at index {}) does not list it",
                    st.raft.commit
                ),
            };
            return Err(ApiError::unavailable(
                "removed",
                format!(
                    "this gateway was removed from the group: {why}. It serves no devices and \
                     takes no part in the group; add it again as a learner (POST \
                     /v1/cluster/members on a member) or stop it"
                ),
                5,
            ));
        }
    }
    let Some(leader) = st.raft.leader else {
        return Err(ApiError::unavailable(
            "not-ready",
            "this gateway knows no leader: the group is electing one, or this gateway cannot \
             reach a majority of it",
            1,
        ));
    };
    let commit = st.raft.commit;
    if st.raft.applied < commit && state.node.wait_applied(commit, READY_WAIT).await.is_err() {
        return Err(ApiError::unavailable(
            "not-ready",
            format!(
                "this gateway is still applying the log (applied {} of {commit})",
                state.node.status().raft.applied
            ),
            1,
        ));
    }
    Ok(Json(Health {
        status: "ready".into(),
        leader: Some(leader),
        commit: Some(commit),
        applied: Some(state.node.status().raft.applied),
    }))
}

/// Prometheus metrics: requests, latency, Raft state, commands by status.
#[utoipa::path(
    get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    Extension(metrics): Extension<Arc<Metrics>>,
    Extension(streams): Extension<Arc<EventStreams>>,
    connections: Option<Extension<Arc<HttpStats>>>,
) -> Result<Response, ApiError> {
    let counts = state.db.command_counts().await?;
    let st = state.node.status();
    let r = &st.raft;
    let mut out = String::with_capacity(4096);
    metrics.render(&mut out);
    // (The listener's counters exist when the router is served by
    // `gateway::start`, not when it is called directly.)
    if let Some(Extension(connections)) = connections {
        connections.render(&mut out);
    }
    streams.render(&mut out);
    state.mqtt.render(&mut out);

    let metric = |out: &mut String, kind: &str, name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        metric(out, "gauge", name, help, value)
    };
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        metric(out, "counter", name, help, value)
    };
    let _ = writeln!(
        out,
        "# HELP entente_raft_role This gateway's Raft role (1 for the current one)."
    );
    let _ = writeln!(out, "# TYPE entente_raft_role gauge");
    for role in [
        RaftRole::Leader,
        RaftRole::Follower,
        RaftRole::Candidate,
        RaftRole::PreCandidate,
    ] {
        let _ = writeln!(
            out,
            "entente_raft_role{{role=\"{}\"}} {}",
            role_name(role),
            u8::from(r.role == role)
        );
    }
    gauge(&mut out, "entente_raft_term", "Current Raft term.", r.term);
    gauge(
        &mut out,
        "entente_raft_leader",
        "Node id of the known leader (0: none).",
        r.leader.unwrap_or(0),
    );
    gauge(
        &mut out,
        "entente_raft_commit_index",
        "Highest log index known committed.",
        r.commit,
    );
    gauge(
        &mut out,
        "entente_raft_applied_index",
        "Highest log index applied.",
        r.applied,
    );
    gauge(
        &mut out,
        "entente_raft_apply_lag",
        "Committed entries not yet applied.",
        r.commit.saturating_sub(r.applied),
    );
    gauge(
        &mut out,
        "entente_raft_last_index",
        "Last index in this gateway's log.",
        r.last_index,
    );
    gauge(
        &mut out,
        "entente_raft_snapshot_index",
        "Index of the latest snapshot.",
        r.snapshot_index,
    );
    gauge(
        &mut out,
        "entente_raft_voters",
        "Voting members.",
        r.conf_state.voters.len() as u64,
    );
    gauge(
        &mut out,
        "entente_raft_learners",
        "Learners.",
        r.conf_state.learners.len() as u64,
    );
    counter(
        &mut out,
        "entente_raft_fsyncs_total",
        "Log fsyncs.",
        st.syncs,
    );
    counter(
        &mut out,
        "entente_raft_entries_persisted_total",
        "Log entries made durable.",
        st.entries_persisted,
    );
    counter(
        &mut out,
        "entente_raft_refused_non_member_total",
        "Peer messages refused because their sender is not a member.",
        st.refused_non_member,
    );
    counter(
        &mut out,
        "entente_raft_refused_malformed_total",
        "Peer messages refused as malformed (terms or indexes out of range, appends not \
         following their previous entry).",
        st.refused_malformed,
    );
    if !st.raft.dropped.is_empty() {
        let _ = writeln!(
            out,
            "# HELP entente_consensus_dropped_total Peer messages the consensus engine dropped, by \
             reason (PBFT: bad signatures, non-members, other views, outside the watermarks, ...)."
        );
        let _ = writeln!(out, "# TYPE entente_consensus_dropped_total counter");
        for (reason, n) in &st.raft.dropped {
            let _ = writeln!(
                out,
                "entente_consensus_dropped_total{{reason=\"{reason}\"}} {n}"
            );
        }
    }
    gauge(
        &mut out,
        "entente_state_applied_index",
        "Log index recorded by the state database.",
        state.db.applied_index(),
    );
    if let Some(rss) = resident_bytes() {
        gauge(
            &mut out,
            "process_resident_memory_bytes",
            "Resident memory of this gateway process.",
            rss,
        );
    }
    if let Some(cpu) = cpu_seconds() {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total CPU time (user and system) of this gateway process, \
             in seconds."
        );
        let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
        let _ = writeln!(out, "process_cpu_seconds_total {cpu}");
    }
    let _ = writeln!(out, "# HELP entente_commands Commands by status.");
    let _ = writeln!(out, "# TYPE entente_commands gauge");
    for status in CommandStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(
            out,
            "entente_commands{{status=\"{}\"}} {n}",
            status.as_str()
        );
    }
    let mut res = (StatusCode::OK, out).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(res)
}

/// CPU time of this process, user and system, in seconds, from
/// `/proc/self/stat` (Linux only; `None` elsewhere).
fn cpu_seconds() -> Option<f64> {
    parse_cpu_seconds(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// `utime` and `stime` of a `/proc/<pid>/stat` line, in seconds. The
/// command name (in parentheses) may hold spaces and parentheses: the
/// fields counted are those after its last `)`. Clock ticks are 100 a
/// second (`USER_HZ`, fixed in the kernel's interface on every platform
/// the gateway is built for).
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// This process's resident set size, from `/proc/self/statm` (Linux only;
/// `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // The page size is 4 KiB on every platform the gateway is built for.
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_seconds;

    #[test]
    fn cpu_seconds_are_read_after_the_command_name() {
        // A command name with spaces and a `)` must not shift the fields.
        let stat = "4242 (gw (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.25));
        assert_eq!(parse_cpu_seconds("4242 (gw) S 1"), None);
        assert_eq!(parse_cpu_seconds("no parenthesis"), None);
        let own = std::fs::read_to_string("/proc/self/stat").expect("stat");
        assert!(parse_cpu_seconds(&own).is_some(), "{own}");
    }
}
