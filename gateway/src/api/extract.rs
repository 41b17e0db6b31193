//! Extractors whose rejections are problem documents, the read barrier
//! (consistency levels) and the write helper shared by the handlers.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use coordinator::node::NodeError;
use coordinator::raft::Role as RaftRole;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ENTENTE_INDEX, read_error, write_error};
use crate::limits;
use crate::ops::{Op, OpResult};
use crate::shared::{leader_known, propose_placed};

/// The request header asking a read to wait until this log index is applied.
pub const ENTENTE_MIN_INDEX: HeaderName = HeaderName::from_static("entente-min-index");

/// A JSON request body; malformed, mistyped or oversized bodies, integers
/// beyond 64 bits and a missing content type are rejected with a problem
/// document (see [`parse_body`]).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as JSON with the header Content-Type: application/json",
            ));
        }
        let limit = req.extensions().get::<super::BodyLimit>().map(|l| l.0);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| match r.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::body_too_large(limit),
                s => {
                    tracing::debug!(status = %s, rejection = %r.body_text(), "reading a body");
                    ApiError::bad_request("the request body could not be read")
                }
            })?;
        parse_body(&bytes).map(ApiJson)
    }
}

/// Whether the request says its body is JSON (`application/json` or
/// `application/<anything>+json`, parameters allowed).
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or_default().trim();
    essence.split_once('/').is_some_and(|(ty, sub)| {
        ty.eq_ignore_ascii_case("application")
            && (sub.eq_ignore_ascii_case("json") || sub.to_ascii_lowercase().ends_with("+json"))
    })
}

/// Parses a JSON request body into `T` as every handler receives it:
/// malformed JSON is 400, a body of the wrong shape 422 (naming the field),
/// and an integer outside the 64-bit range 422 naming where it is (it would
/// silently become a floating-point number).
pub(crate) fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let axum::Json(v) = axum::Json::<T>::from_bytes(bytes)?;
    limits::check_integers(bytes)?;
    Ok(v)
}

/// A query string; anything that does not parse is a 400 problem.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Path parameters; anything that does not parse is a 400 problem.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Confirmed with the leader (ReadIndex): reflects every write committed
    /// before the read started. The default.
    #[default]
    Linearizable,
    /// This gateway's applied state, at once; may be stale. Still answers in
    /// a minority partition.
    Local,
}

/// The `Entente-Min-Index` request header, for the OpenAPI document.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct MinIndexHeader {
    /// Wait until this gateway has applied this log index — e.g. the
    /// `Entente-Index` of an earlier write — before reading (read-your-writes):
    /// at most the write timeout (5 s by default), then 503
    /// `min-index-not-reached` — or 412 `min-index-not-issued` when this
    /// gateway leads the group and the group has not committed it by then.
    /// An index more than 1000 entries beyond the group's commit index was
    /// never issued and is refused at once (412 `min-index-not-issued`).
    #[param(rename = "Entente-Min-Index")]
    entente_min_index: Option<u64>,
}

/// A read that passed its consistency barrier; `index` is the applied log
/// index observed before the query (the response's `Entente-Index`).
#[derive(Debug, Clone, Copy)]
pub struct ReadCtx {
    /// The local applied index the read observes (at least).
    pub index: u64,
}

/// Parses `Entente-Min-Index`.
fn min_index(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(ENTENTE_MIN_INDEX) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "Entente-Min-Index must be a log index (a non-negative integer), e.g. the \
                 Entente-Index of an earlier response",
            )
        })
}

/// How far beyond the group's commit index an `Entente-Min-Index` may be and
/// still be waited for (writes in flight may reach it soon); an index further
/// ahead was never issued by the group and is refused at once (412).
pub const MIN_INDEX_WINDOW: u64 = 1_000;

/// The read barrier: waits for `Entente-Min-Index` (if given) to be applied
/// locally, then for a linearizable read point (unless `consistency` is
/// `local`). Returns the applied index to report.
///
/// Bounds (docs/ARCHITECTURE.md, "Bounded waits"): an `Entente-Min-Index`
/// more than [`MIN_INDEX_WINDOW`] entries beyond the group's commit index is
/// refused at once (412); a smaller one is waited for at most the write
/// timeout, then refused: 412 `min-index-not-issued` when this gateway is
/// the leader and the group has still not committed it (checked with a read
/// point), else 503 `min-index-not-reached`; the whole barrier takes at most
/// twice the write timeout (then 503 `read-timeout`).
pub async fn read_barrier(
    state: &AppState,
    consistency: Option<Consistency>,
    headers: &HeaderMap,
) -> Result<ReadCtx, ApiError> {
    let min = min_index(headers)?;
    let bound = state.config.write_timeout.saturating_mul(2);
    match tokio::time::timeout(bound, barrier(state, consistency, min)).await {
        Ok(r) => r,
        Err(_) => Err(read_error(NodeError::Timeout)),
    }
}

async fn barrier(
    state: &AppState,
    consistency: Option<Consistency>,
    min: Option<u64>,
) -> Result<ReadCtx, ApiError> {
    let linearizable = consistency.unwrap_or_default() == Consistency::Linearizable;
    let deadline = tokio::time::Instant::now() + state.config.write_timeout;
    let mut confirmed = false;
    if let Some(n) = min.filter(|&n| n > state.db.applied_index()) {
        let raft = state.node.status().raft;
        let known = raft.commit.max(raft.last_index);
        if n > known.saturating_add(MIN_INDEX_WINDOW) {
            // Far beyond anything this gateway knows: ask the group how far
            // its log goes (this is also a linearizable read point).
            let group = read_point(state)
                .await
                .map_err(|e| min_index_unknown(n, known, e))?;
            confirmed = true;
            if n > group.saturating_add(MIN_INDEX_WINDOW) {
                return Err(min_index_not_issued(n, group));
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut shutdown = state.shutdown.clone();
        let waited = tokio::select! {
            r = state.node.wait_applied(n, left) => r,
            _ = super::stopped(&mut shutdown) => Err(NodeError::Shutdown),
        };
        match waited {
            Ok(()) => {}
            Err(NodeError::Timeout) => {
                // A leader can tell, with one read point, that the group
                // has still not issued the index (a follower would have to
                // ask across the network, and may be cut off): a precondition
                // that failed (412), not a gateway unable to serve (503).
                if state.node.status().raft.role == RaftRole::Leader
                    && let Ok(group) = read_point(state).await
                    && n > group
                {
                    return Err(min_index_not_issued(n, group));
                }
                let applied = state.db.applied_index();
                return Err(ApiError::unavailable(
                    "min-index-not-reached",
                    format!(
                        "this gateway has applied the log up to index {applied} and did not reach \
                         the requested Entente-Min-Index {n} within {} ms; it may be cut off from \
                         the group or behind it (retry, or ask another gateway), or the index was \
                         never issued by this cluster",
                        state.config.write_timeout.as_millis()
                    ),
                    1,
                )
                .with_index(applied));
            }
            Err(e) => return Err(read_error(e)),
        }
    }
    if linearizable && !confirmed {
        read_point(state).await.map_err(read_error)?;
    }
    Ok(ReadCtx {
        index: state.db.applied_index(),
    })
}

/// A linearizable read point (ReadIndex), retried once when no leader was
/// known yet but one appears within [`Config::leader_wait`](crate::Config::leader_wait). Once it returns, this
/// gateway has applied at least the returned index.
async fn read_point(state: &AppState) -> Result<u64, NodeError> {
    let mut r = state.node.read_index().await;
    if r == Err(NodeError::NoLeader)
        && leader_known(&state.node, state.config.leader_wait(), &state.shutdown).await
    {
        r = state.node.read_index().await;
    }
    r
}

/// 412: `Entente-Min-Index` `n` is beyond the group's commit index `group`
/// (far beyond, or still after the wait).
fn min_index_not_issued(n: u64, group: u64) -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        "min-index-not-issued",
        "Index not issued",
        format!(
            "Entente-Min-Index {n} was never issued by this group: it has committed the log up \
             to index {group} (an index up to {MIN_INDEX_WINDOW} entries beyond that is waited \
             for, at most the write timeout; a further one is refused at once); send the \
             Entente-Index of an earlier response"
        ),
    )
    .with_index(group)
}

/// 503: `Entente-Min-Index` `n` is far beyond this gateway's log (`known`)
/// and the group could not be asked where its log ends.
fn min_index_unknown(n: u64, known: u64, e: NodeError) -> ApiError {
    if matches!(e, NodeError::Shutdown | NodeError::Fatal(_)) {
        return read_error(e);
    }
    ApiError::unavailable(
        "min-index-unknown",
        format!(
            "Entente-Min-Index {n} is far beyond this gateway's log (index {known}) and the group \
             did not confirm in time how far its log goes (no leader, or no quorum); retry \
             shortly, or on another gateway"
        ),
        1,
    )
}

/// Proposes `op` through the group and waits for its result; returns the log
/// index it was applied at.
pub async fn write(state: &AppState, op: Op) -> Result<(u64, OpResult), ApiError> {
    // The handlers checked their input; this makes sure nothing reaches the
    // log that a member could not decode.
    limits::check_op(&op)?;
    let kind = op.kind();
    // Every route that writes needs a token: the write is the token's.
    let by = super::auth::AUDIT_BY
        .try_with(|by| by.to_string())
        .unwrap_or_else(|_| format!("gateway:{}", state.config.node_id));
    let r = propose_placed(
        &state.node,
        op,
        by,
        state.config.leader_wait(),
        &state.shutdown,
    )
    .await;
    match r {
        Ok((index, output, certificate)) => {
            if let Some(c) = certificate {
                record_certificate(&c);
            }
            Ok((index, output))
        }
        Err(e) => {
            tracing::debug!(error = %e, kind, "write failed");
            Err(write_error(e, state.config.write_timeout))
        }
    }
}

tokio::task_local! {
    /// The commit certificates of the writes the current request made
    /// (header values), gathered by [`write`] for [`certified`].
    static CERTIFICATES: std::cell::RefCell<Vec<HeaderValue>>;
}

/// The response header that carries a write's commit certificate.
pub const ENTENTE_CERTIFICATE: &str = "entente-certificate";

/// Most certificates one response carries (a batch of writes carries the
/// first ones).
const MAX_CERTIFICATES: usize = 16;

fn record_certificate(document: &[u8]) {
    let value = coordinator::pbft::certificate::to_header(document);
    let Ok(value) = HeaderValue::from_str(&value) else {
        return;
    };
    let _ = CERTIFICATES.try_with(|c| {
        let mut c = c.borrow_mut();
        if c.len() < MAX_CERTIFICATES {
            c.push(value);
        }
    });
}

/// Runs a request's handler and adds to its response one
/// `Entente-Certificate` header per commit certificate of the writes it
/// made (on PBFT; none on the other engines).
pub async fn certified(handler: impl std::future::Future<Output = Response>) -> Response {
    CERTIFICATES
        .scope(std::cell::RefCell::new(Vec::new()), async {
            let mut res = handler.await;
            let certs = CERTIFICATES.with(|c| std::mem::take(&mut *c.borrow_mut()));
            for v in certs {
                res.headers_mut().append(ENTENTE_CERTIFICATE, v);
            }
            res
        })
        .await
}

/// An operation result this endpoint cannot produce (a bug): logged, 500.
pub fn unexpected(endpoint: &'static str, r: &OpResult, index: u64) -> ApiError {
    tracing::error!(endpoint, index, result = ?r, "unexpected operation result");
    ApiError::internal().with_index(index)
}

/// A JSON response with the `Entente-Index` header.
pub fn reply<T: Serialize>(status: StatusCode, index: u64, body: &T) -> Response {
    let mut res = (status, Json(body)).into_response();
    res.headers_mut()
        .insert(ENTENTE_INDEX, HeaderValue::from(index));
    res
}

/// A `?wait=` duration, checked against the configured maximum.
pub fn wait_param(state: &AppState, wait_ms: Option<u64>) -> Result<Duration, ApiError> {
    let wait = Duration::from_millis(wait_ms.unwrap_or(0));
    if wait > state.config.max_wait {
        return Err(ApiError::bad_request(format!(
            "wait may be at most {} ms",
            state.config.max_wait.as_millis()
        )));
    }
    Ok(wait)
}

/// Keyset pagination: the page to ask the store for (one item more than
/// `limit`, to learn whether another page follows).
pub fn page_query(after: Option<String>, limit: u32) -> crate::state::Page {
    crate::state::Page {
        after,
        limit: limit.saturating_add(1),
    }
}

/// Cuts the extra item fetched by [`page_query`] and returns the cursor of
/// the next page, if there is one.
pub fn split_page<T>(
    mut items: Vec<T>,
    limit: u32,
    id: impl Fn(&T) -> &str,
) -> (Vec<T>, Option<String>) {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        let next = items.last().map(|item| id(item).to_string());
        (items, next)
    } else {
        (items, None)
    }
}
