//! Errors as `application/problem+json` (RFC 9457).
//!
//! Every failure a handler can meet becomes an [`ApiError`]: a status, a
//! short title, and a detail a person can act on. Internal causes (database
//! errors, node failures) are logged with `tracing` and never sent to the
//! client. axum's own rejections (bad JSON, bad query strings, bodies that
//! are too large) are converted here too, so every error body has one shape.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use coordinator::node::NodeError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::limits::LimitError;
use crate::state::StateError;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The response header carrying the log index a response reflects.
pub const ENTENTE_INDEX: HeaderName = HeaderName::from_static("entente-index");

/// An RFC 9457 problem document, as sent to clients.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"type":"urn:entente:problem:not-found","title":"Not found",
    "status":404,"detail":"no device with id \"pump-7\""}))]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:entente:problem:<slug>`).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this case, and what to do about it.
    pub detail: String,
    /// On a version conflict (412): the shadow's current version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
    /// Where in the request body the problem is, as a JSON pointer (RFC
    /// 6901), when one item of a batch is refused: e.g. `/devices/17/id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "/devices/17/id")]
    pub pointer: Option<String>,
    /// On a batch refused because devices conflict with the registry
    /// (409): their ids, in request order (at most 100; the detail says
    /// how many in all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflicting_ids: Option<Vec<String>>,
}

/// An error response: a problem document plus the headers that go with it.
#[derive(Debug, Clone)]
pub struct ApiError(Box<Inner>);

#[derive(Debug, Clone)]
struct Inner {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
    current_version: Option<u64>,
    pointer: Option<String>,
    conflicting_ids: Option<Vec<String>>,
    retry_after: Option<u64>,
    www_authenticate: Option<&'static str>,
    index: Option<u64>,
}

impl ApiError {
    /// A problem with the given status, slug (the last part of its type URI),
    /// title and detail.
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> ApiError {
        ApiError(Box::new(Inner {
            status,
            slug,
            title,
            detail: detail.into(),
            current_version: None,
            pointer: None,
            conflicting_ids: None,
            retry_after: None,
            www_authenticate: None,
            index: None,
        }))
    }

    /// 400: the request itself is malformed (query string, path, header, JSON syntax).
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    /// 422: well-formed JSON whose content is not acceptable.
    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            "Invalid request body",
            detail,
        )
    }

    /// 413: a value in the request (or the document it would make) is
    /// larger than a documented limit; the detail names it.
    pub fn too_large(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Too large",
            detail,
        )
    }

    /// 404: the thing named does not exist.
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 409: the request contradicts the current state.
    pub fn conflict(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }

    /// 412: an `If-Match` precondition failed; `current` is the version now.
    pub fn version_mismatch(expected: u64, current: u64) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "version-mismatch",
            "Version mismatch",
            format!(
                "If-Match asked for version {expected} but the shadow is at version {current}; \
                 fetch the shadow again, reapply your change and send the new version"
            ),
        );
        e.0.current_version = Some(current);
        e
    }

    /// 401: no usable credentials.
    pub fn unauthorized(detail: impl Into<String>, invalid_token: bool) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        );
        e.0.www_authenticate = Some(if invalid_token {
            r#"Bearer realm="entente", error="invalid_token""#
        } else {
            r#"Bearer realm="entente""#
        });
        e
    }

    /// 403: the token is valid but its role is not enough.
    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 503 with `Retry-After`: try again later (the detail says whether the
    /// request may have taken effect).
    pub fn unavailable(slug: &'static str, detail: impl Into<String>, retry_s: u64) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            slug,
            "Service unavailable",
            detail,
        );
        e.0.retry_after = Some(retry_s);
        e
    }

    /// 429 with `Retry-After`: this client has too much open already.
    pub fn too_many_requests(
        slug: &'static str,
        detail: impl Into<String>,
        retry_s: u64,
    ) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            slug,
            "Too many requests",
            detail,
        );
        e.0.retry_after = Some(retry_s);
        e
    }

    /// 500: something failed inside this gateway. The cause must already be
    /// logged; the client learns only that it happened.
    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the gateway failed to handle this request; the cause is in its log",
        )
    }

    /// A generic problem for a bare status (405, 413, 404 of unknown routes…).
    pub fn from_status(status: StatusCode) -> ApiError {
        let (slug, title, detail): (&'static str, &'static str, String) = match status {
            StatusCode::NOT_FOUND => (
                "no-route",
                "Not found",
                "no such endpoint; the API is described at /openapi.json".into(),
            ),
            StatusCode::METHOD_NOT_ALLOWED => (
                "method-not-allowed",
                "Method not allowed",
                "this endpoint does not support that method; see /openapi.json".into(),
            ),
            StatusCode::PAYLOAD_TOO_LARGE => (
                "body-too-large",
                "Request body too large",
                "the request body is larger than this gateway accepts".into(),
            ),
            s => (
                "http-error",
                "Request failed",
                format!(
                    "the request failed with status {}",
                    s.canonical_reason().unwrap_or("unknown")
                ),
            ),
        };
        ApiError::new(status, slug, title, detail)
    }

    /// 413 for a request body over `limit` bytes (when known).
    pub fn body_too_large(limit: Option<usize>) -> ApiError {
        let mut e = ApiError::from_status(StatusCode::PAYLOAD_TOO_LARGE);
        if let Some(limit) = limit {
            e.0.detail = format!(
                "the request body is larger than this endpoint accepts: at most {limit} bytes"
            );
        }
        e
    }

    /// Sets the log index header on the error response.
    pub fn with_index(mut self, index: u64) -> ApiError {
        self.0.index = Some(index);
        self
    }

    /// Says where in the body the problem is: `pointer` (a JSON pointer)
    /// goes in front of the detail and into the problem's `pointer`.
    pub fn at(mut self, pointer: String) -> ApiError {
        self.0.detail = format!("{pointer}: {}", self.0.detail);
        self.0.pointer = Some(pointer);
        self
    }

    /// Names the conflicting ids in the problem's `conflicting_ids`.
    pub fn with_conflicting_ids(mut self, ids: Vec<String>) -> ApiError {
        self.0.conflicting_ids = Some(ids);
        self
    }

    /// The problem document.
    pub fn problem(&self) -> Problem {
        let i = &self.0;
        Problem {
            kind: format!("urn:entente:problem:{}", i.slug),
            title: i.title.into(),
            status: i.status.as_u16(),
            detail: i.detail.clone(),
            current_version: i.current_version,
            pointer: i.pointer.clone(),
            conflicting_ids: i.conflicting_ids.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0.status, self.0.detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.0.status, Json(self.problem())).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(s) = self.0.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(w) = self.0.www_authenticate {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(w));
        }
        if let Some(i) = self.0.index {
            h.insert(ENTENTE_INDEX, HeaderValue::from(i));
        }
        res
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        tracing::error!(error = %e, "state database query failed");
        ApiError::internal()
    }
}

/// Maps a node error of a *write* to its problem. The details say whether the
/// write may still take effect.
pub fn write_error(e: NodeError, write_timeout: std::time::Duration) -> ApiError {
    match e {
        NodeError::NoLeader | NodeError::NotLeader { .. } => ApiError::unavailable(
            "no-leader",
            "the gateway group has no leader right now (an election is running, or this \
             gateway cannot reach a majority of the group); the write was not applied — retry \
             shortly, or on another gateway",
            1,
        ),
        NodeError::Timeout => ApiError::unavailable(
            "write-timeout",
            format!(
                "the group did not commit the write within {} ms (it may have lost its quorum \
                 or its leader); the write may or may not have been applied — read the resource \
                 before retrying (commands: retry with the same idempotency_key)",
                write_timeout.as_millis()
            ),
            1,
        ),
        NodeError::OutcomeUnknown => ApiError::unavailable(
            "outcome-unknown",
            "the group's leader changed or was lost while this write was in flight; it may or \
             may not have been applied — read the resource before retrying (commands: retry \
             with the same idempotency_key)",
            1,
        ),
        NodeError::Dropped => ApiError::unavailable(
            "write-dropped",
            "leadership changed before the write committed; it did not take effect — retry",
            1,
        ),
        NodeError::Refused(reason) => {
            tracing::info!(%reason, "the raft core refused a proposal");
            ApiError::unavailable(
                "write-refused",
                "the group is busy (a leadership transfer, or too many writes in flight); the \
                 write was not applied — retry shortly",
                1,
            )
        }
        NodeError::Shutdown => ApiError::unavailable(
            "shutting-down",
            "this gateway is shutting down; the write's outcome is unknown if it was already \
             sent to the group — read the resource, then retry on another gateway",
            1,
        ),
        NodeError::Fatal(msg) => {
            // Logged once as an error when the node stopped; not again for
            // every request after it.
            tracing::debug!(error = %msg, "the raft node has stopped after a fatal error");
            ApiError::internal()
        }
    }
}

/// Maps a node error of a linearizable read barrier to its problem.
pub fn read_error(e: NodeError) -> ApiError {
    match e {
        NodeError::NoLeader | NodeError::NotLeader { .. } | NodeError::Refused(_) => {
            ApiError::unavailable(
                "no-leader",
                "the gateway group has no leader right now, so a linearizable read cannot be \
                 served; retry shortly, or add ?consistency=local to read this gateway's \
                 possibly stale state",
                1,
            )
        }
        NodeError::Timeout | NodeError::Dropped | NodeError::OutcomeUnknown => {
            ApiError::unavailable(
                "read-timeout",
                "the group did not confirm this gateway's read point in time (it may have lost its \
             quorum); retry, or add ?consistency=local to read this gateway's possibly stale \
             state",
                1,
            )
        }
        NodeError::Shutdown => ApiError::unavailable(
            "shutting-down",
            "this gateway is shutting down; retry on another gateway",
            1,
        ),
        NodeError::Fatal(msg) => {
            // Logged once as an error when the node stopped; not again for
            // every request after it.
            tracing::debug!(error = %msg, "the raft node has stopped after a fatal error");
            ApiError::internal()
        }
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> ApiError {
        match e {
            LimitError::TooLarge { .. } | LimitError::EntryTooLarge { .. } => {
                ApiError::too_large(e.to_string())
            }
            LimitError::BatchSize { .. } | LimitError::JobSize { .. } => {
                ApiError::invalid(e.to_string())
            }
            LimitError::Malformed { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Malformed JSON",
                e.to_string(),
            ),
            LimitError::TooDeep { .. } | LimitError::InexactInteger { .. } => {
                ApiError::invalid(e.to_string())
            }
        }
    }
}

/// The most characters of a parser's message put in a problem: parsers
/// quote the input (unknown field names, string values), which may be long.
const MAX_REJECTION_CHARS: usize = 300;

/// A rejection's message, cut to [`MAX_REJECTION_CHARS`].
fn bounded(text: String) -> String {
    match text.char_indices().nth(MAX_REJECTION_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        match r.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as JSON with the header Content-Type: application/json",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::from_status(StatusCode::PAYLOAD_TOO_LARGE),
            StatusCode::UNPROCESSABLE_ENTITY => ApiError::invalid(bounded(r.body_text())),
            StatusCode::BAD_REQUEST => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Malformed JSON",
                bounded(r.body_text()),
            ),
            s => {
                tracing::debug!(status = %s, rejection = %r.body_text(), "reading a JSON body");
                ApiError::from_status(s)
            }
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-query",
            "Invalid query string",
            bounded(r.body_text()),
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::bad_request(bounded(r.body_text()))
    }
}
