//! The operators' REST API (axum); its decisions are in docs/ARCHITECTURE.md ("REST decisions").
//!
//! `app(state)` builds the router; `gateway::start` serves it, and tests call
//! it with `tower::ServiceExt::oneshot`.
//!
//! Layout:
//! - [`routes`] — the one list of routes (method, path, least role); the
//!   router is built from it, and tests check the OpenAPI document against it;
//! - `error` — problem+json errors, including axum's own rejections;
//! - `auth` — bearer tokens and roles; `extract` — extractors, the read
//!   barrier (consistency levels) and the write helper;
//! - `devices`, `shadow`, `commands`, `events` (SSE), `cluster`, `admin`
//!   (backup), `tokens` (API tokens), `health` (healthz, readyz, metrics),
//!   `openapi`; `asyncapi` (the device contract, `/asyncapi.json`); `console` — the operator console's page and files at `/`
//!   (outside the route table and the OpenAPI document: they are not API).

mod admin;
mod asyncapi;
mod auth;
mod cluster;
mod commands;
pub mod console;
mod devices;
mod error;
mod events;
mod extract;
mod health;
mod jobs;
mod openapi;
mod ratelimit;
#[cfg(test)]
mod roundtrip_tests;
pub(crate) mod schemas;
mod shadow;
mod tokens;
pub(crate) mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use axum::{Extension, Router};
use coordinator::node::Node;
use tokio::sync::watch;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::config::Config;
use crate::ops::{OpResult, Role};
use crate::state::StateDb;

pub(crate) use asyncapi::{Bound as BoundDeviceListeners, DeviceListeners};
pub(crate) use error::ApiError;
pub use error::{ENTENTE_INDEX, PROBLEM_JSON, Problem};
pub use extract::ENTENTE_MIN_INDEX;
pub use openapi::ApiDoc;

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    /// The Raft node: writes go through `propose`, linearizable reads through `read_index`.
    pub node: Node<OpResult>,
    /// The local state database.
    pub db: Arc<StateDb>,
    /// Settings (limits, timeouts).
    pub config: Arc<Config>,
    /// Becomes `true` when the gateway shuts down (ends SSE streams and long polls).
    pub shutdown: watch::Receiver<bool>,
    /// The MQTT side's counters (for `/metrics`).
    pub mqtt: Arc<crate::shared::MqttStats>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// One route the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteInfo {
    /// HTTP method, upper case (`GET`, `POST`, `PATCH`, `DELETE`).
    pub method: &'static str,
    /// Path template as in the OpenAPI document (`/v1/devices/{id}`).
    pub path: &'static str,
    /// The least role a token needs; `None` for public routes.
    pub role: Option<Role>,
}

type Entry = (RouteInfo, MethodRouter<AppState>);

/// A method as the table spells it, with the filter that routes it.
type Verb = (&'static str, MethodFilter);
const GET: Verb = ("GET", MethodFilter::GET);
const POST: Verb = ("POST", MethodFilter::POST);
const PATCH: Verb = ("PATCH", MethodFilter::PATCH);
const DELETE: Verb = ("DELETE", MethodFilter::DELETE);

fn entry<H, T>(verb: Verb, path: &'static str, role: Option<Role>, handler: H) -> Entry
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let (method, filter) = verb;
    (RouteInfo { method, path, role }, on(filter, handler))
}

/// The route table: the single source of the router and of the checks on the
/// OpenAPI document.
fn table() -> Vec<Entry> {
    use Role::{Admin, Operator, Viewer};
    vec![
        entry(POST, "/v1/devices", Some(Operator), devices::create_device),
        entry(
            POST,
            devices::BATCH_PATH,
            Some(Operator),
            devices::create_devices,
        ),
        // The batch path is also `/v1/devices/{id}` of the device named
        // `batch`, which the static path would otherwise hide.
        entry(
            GET,
            devices::BATCH_PATH,
            Some(Viewer),
            devices::batch_named_device::get,
        ),
        entry(
            PATCH,
            devices::BATCH_PATH,
            Some(Operator),
            devices::batch_named_device::patch,
        ),
        entry(
            DELETE,
            devices::BATCH_PATH,
            Some(Operator),
            devices::batch_named_device::delete,
        ),
        entry(GET, "/v1/devices", Some(Viewer), devices::list_devices),
        entry(GET, "/v1/devices/{id}", Some(Viewer), devices::get_device),
        entry(
            PATCH,
            "/v1/devices/{id}",
            Some(Operator),
            devices::update_device,
        ),
        entry(
            DELETE,
            "/v1/devices/{id}",
            Some(Operator),
            devices::delete_device,
        ),
        entry(
            POST,
            "/v1/devices/{id}/secret",
            Some(Operator),
            devices::rotate_secret,
        ),
        entry(
            GET,
            "/v1/devices/{id}/shadow",
            Some(Viewer),
            shadow::get_shadow,
        ),
        entry(
            PATCH,
            "/v1/devices/{id}/shadow",
            Some(Operator),
            shadow::patch_shadow,
        ),
        entry(
            POST,
            "/v1/devices/{id}/commands",
            Some(Operator),
            commands::issue_command,
        ),
        entry(
            GET,
            "/v1/devices/{id}/commands",
            Some(Viewer),
            commands::list_commands,
        ),
        entry(
            GET,
            "/v1/commands",
            Some(Viewer),
            commands::list_all_commands,
        ),
        entry(
            GET,
            "/v1/commands/{cid}",
            Some(Viewer),
            commands::get_command,
        ),
        entry(
            POST,
            "/v1/commands/{cid}/cancel",
            Some(Operator),
            commands::cancel_command,
        ),
        entry(POST, jobs::JOBS_PATH, Some(Operator), jobs::create_job),
        entry(GET, jobs::JOBS_PATH, Some(Viewer), jobs::list_jobs),
        entry(GET, "/v1/jobs/{id}", Some(Viewer), jobs::get_job),
        entry(
            GET,
            "/v1/jobs/{id}/executions",
            Some(Viewer),
            jobs::list_executions,
        ),
        entry(
            POST,
            "/v1/jobs/{id}/cancel",
            Some(Operator),
            jobs::cancel_job,
        ),
        entry(GET, "/v1/events", Some(Viewer), events::events),
        entry(GET, "/v1/cluster", Some(Viewer), cluster::cluster),
        entry(
            POST,
            "/v1/cluster/members",
            Some(Admin),
            cluster::add_member,
        ),
        entry(
            DELETE,
            "/v1/cluster/members/{id}",
            Some(Admin),
            cluster::remove_member,
        ),
        entry(
            POST,
            "/v1/cluster/leader",
            Some(Admin),
            cluster::transfer_leader,
        ),
        entry(GET, "/v1/admin/backup", Some(Admin), admin::backup),
        entry(POST, "/v1/tokens", Some(Admin), tokens::create_token),
        entry(GET, "/v1/tokens", Some(Admin), tokens::list_tokens),
        entry(DELETE, "/v1/tokens/{id}", Some(Admin), tokens::revoke_token),
        entry(
            POST,
            "/v1/tokens/{id}/rotate",
            Some(Admin),
            tokens::rotate_token,
        ),
        entry(GET, "/healthz", None, health::healthz),
        entry(GET, "/readyz", None, health::readyz),
        entry(GET, "/metrics", Some(Viewer), health::metrics),
        entry(GET, "/openapi.json", None, openapi::openapi_json),
        entry(GET, "/asyncapi.json", None, asyncapi::asyncapi_json),
    ]
}

/// Every route the router serves, with the role it needs.
pub fn routes() -> Vec<RouteInfo> {
    table().into_iter().map(|(info, _)| info).collect()
}

/// The REST API router.
pub fn app(state: AppState) -> Router {
    let metrics = Arc::new(health::Metrics::default());
    let streams = Arc::new(events::EventStreams::new(&state.config));
    let limits = BodyLimits {
        any: state.config.max_body_bytes,
        batch: state.config.batch_max_body_bytes,
    };
    let document = openapi::document(&state.config);
    let rate_limits = ratelimit::RateLimits::new(state.config.rest_rate_limit);
    let uses = Arc::new(tokens::TokenUses::default());
    // Flushes the token uses this gateway saw to the group, until shutdown
    // (a router built outside a runtime, in a test, has none).
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(uses.clone().run(state.node.clone(), state.shutdown.clone()));
    }
    let mut router = Router::new();
    for (info, method_router) in table() {
        let method_router = match info.role {
            // Authentication first (the outer layer), then the token's rate.
            Some(role) => method_router
                .route_layer(middleware::from_fn_with_state(
                    rate_limits.clone(),
                    ratelimit::layer,
                ))
                .route_layer(middleware::from_fn_with_state(
                    (state.clone(), uses.clone(), role),
                    auth::layer,
                )),
            None => method_router,
        };
        // The batch registration reads bodies up to its own limit.
        let method_router = if takes_batch_body(info.path) && info.method == "POST" {
            method_router.layer(DefaultBodyLimit::max(limits.batch))
        } else {
            method_router
        };
        router = router.route(info.path, method_router);
    }
    router
        .route("/", axum::routing::get(console::index))
        .route(
            &format!("{}/{{file}}", console::ASSETS),
            axum::routing::get(console::asset),
        )
        .fallback(|| async { error::ApiError::from_status(StatusCode::NOT_FOUND) })
        .layer(Extension(metrics.clone()))
        .layer(Extension(streams))
        .layer(Extension(Arc::new(admin::BackupSlot::default())))
        .layer(Extension(Arc::new(devices::BatchSlots::new())))
        .layer(Extension(document))
        .layer(Extension(uses))
        .layer(DefaultBodyLimit::max(limits.any))
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .layer(middleware::from_fn_with_state(limits, body_limit))
        .layer(middleware::from_fn(bare_errors_as_problems))
        .layer(middleware::from_fn_with_state(metrics, health::track))
        // A 503 (no leader, not ready, shutting down) is normal in a group's
        // life, and the cause of a 500 is logged where it happens: failed
        // responses are not logged again here, above debug.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// The largest request bodies: `batch` for `POST /v1/devices/batch`, `any`
/// for every other request.
#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    any: usize,
    batch: usize,
}

/// The body limit a request met, for the 413 to name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit(pub(crate) usize);

/// A refused body declared at most this long is read and dropped before
/// the 413 is sent (at most [`REFUSED_BODY_DRAIN_TIME`]), as servers'
/// "lingering close" does: closing with the client's body still arriving
/// makes the kernel reset the connection, and the client — still writing —
/// sees a broken pipe instead of the 413. A longer body is refused at once
/// and the client may see the reset.
pub const REFUSED_BODY_DRAIN_BYTES: u64 = 16 << 20;

/// How long reading a refused body may take before the 413 goes anyway.
pub const REFUSED_BODY_DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads and drops `body`, within [`REFUSED_BODY_DRAIN_BYTES`] and
/// [`REFUSED_BODY_DRAIN_TIME`].
async fn drain_refused_body(body: axum::body::Body) {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, REFUSED_BODY_DRAIN_BYTES as usize);
    let drain = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(REFUSED_BODY_DRAIN_TIME, drain).await;
}

/// Whether a POST to `path` takes bodies up to the batch limit
/// (`batch_max_body_bytes`): a batch registration, a job (up to 10,000
/// device ids).
fn takes_batch_body(path: &str) -> bool {
    path == devices::BATCH_PATH || path == jobs::JOBS_PATH
}

/// Middleware: bounds every request body by the limit of its route — a
/// declared length over it is refused (413) before anything is read, and
/// a body that turns out longer fails when read (413 too).
async fn body_limit(State(limits): State<BodyLimits>, req: Request, next: Next) -> Response {
    let limit = if req.method() == axum::http::Method::POST && takes_batch_body(req.uri().path()) {
        limits.batch
    } else {
        limits.any
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        if n <= REFUSED_BODY_DRAIN_BYTES {
            drain_refused_body(req.into_body()).await;
        }
        return error::ApiError::body_too_large(Some(limit)).into_response();
    }
    let mut req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, limit)));
    req.extensions_mut().insert(BodyLimit(limit));
    next.run(req).await
}

/// Resolves when the gateway shuts down (or its shutdown sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across the caller's awaits.
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Whether a request may wait on purpose (`?wait=`). An `Entente-Min-Index`
/// wait is part of the read barrier's own bound (twice the write timeout).
fn waits(req: &Request) -> bool {
    req.uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("wait=")))
}

/// Middleware: bounds the time to a response head. Writes and linearizable
/// reads are bounded by the node's request timeout already; this is the
/// safety net, with room for a requested wait. Streams (SSE) are not cut:
/// only the time until their head is bounded.
async fn deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let base = state.config.write_timeout * 2 + Duration::from_secs(1);
    let budget = if waits(&req) {
        base + state.config.max_wait
    } else if req.uri().path() == "/v1/admin/backup" {
        base + admin::IMAGE_BUDGET
    } else {
        base
    };
    match tokio::time::timeout(budget, next.run(req)).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(budget_ms = budget.as_millis() as u64, "request timed out");
            error::ApiError::unavailable(
                "request-timeout",
                "the gateway did not finish this request in time; if it was a write it may or \
                 may not have taken effect — read the resource before retrying",
                1,
            )
            .into_response()
        }
    }
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON))
}

/// Middleware: error responses produced outside the handlers (405, 413 of
/// the body limit, …) get a problem body too.
///
/// A 413 also says `Connection: close`: the body it refused may be left
/// unread, so the server closes the connection after answering, and a
/// client that reused it would see its next request fail.
async fn bare_errors_as_problems(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let status = res.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        res.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    if !(status.is_client_error() || status.is_server_error()) || is_problem(res.headers()) {
        return res;
    }
    let mut problem = error::ApiError::from_status(status).into_response();
    for name in [
        header::ALLOW,
        header::RETRY_AFTER,
        header::WWW_AUTHENTICATE,
        header::CONNECTION,
    ] {
        if let Some(v) = res.headers().get(&name) {
            problem.headers_mut().insert(name, v.clone());
        }
    }
    problem
}
