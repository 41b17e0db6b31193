//! `GET /v1/events`: committed changes as Server-Sent Events.
//!
//! Each event's `id` is the log index of the entry that made the change,
//! `event` its kind and `data` its JSON. A client resumes exactly where it
//! stopped with `Last-Event-ID` (or `?after=`): the stream first replays the
//! events stored after that index, then follows live ones.
//!
//! To lose nothing between the replay and the live part, the stream
//! subscribes to the live broadcast *before* querying, and drops live events
//! at or below the last index it sent. A subscriber that falls behind the
//! broadcast (lagged) goes back to querying the store from its last index.
//!
//! Bounds: at most `events_max_streams` streams (503 beyond) and
//! `events_max_streams_per_token` per token (429 beyond). Each stream
//! buffers at most `events_buffer_bytes` of events for its client (plus
//! what hyper holds, 64 KiB); a replay batch read from
//! the store is at most [`REPLAY_BATCH`] events or [`REPLAY_BATCH_BYTES`].
//! When the client has not made room for the next event for half of
//! `http_send_timeout` it is too slow: the stream ends after the events
//! already buffered (and a comment saying so), and the client resumes with
//! the `Last-Event-ID` of the last event it received whole. (A client that
//! reads nothing at all is disconnected by the listener half a send
//! timeout later.)

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ENTENTE_INDEX, Problem};
use super::extract::ApiQuery;
use crate::config::Config;
use crate::ops::{Event, Role};

/// Events read from the store per query while replaying.
const REPLAY_BATCH: u32 = 500;
/// Stored event data read per query while replaying (at least one event).
const REPLAY_BATCH_BYTES: usize = 64 * 1024;
/// Events (of any size) buffered per client; the byte budget is the real bound.
const CLIENT_BUFFER: usize = 1024;
/// What an event costs in the buffer besides its data (`id:`, `event:`, ...).
const EVENT_OVERHEAD: usize = 32;
/// `Retry-After` (seconds) of a refused stream.
const RETRY_S: u64 = 5;

/// Every kind of event `GET /v1/events` sends, with the schema (a component
/// of the OpenAPI document) of its `data` and what it means. The kinds are
/// [`crate::ops::Op::kind`]; the data is what `state::apply` records.
pub(crate) const EVENT_KINDS: &[(&str, &str, &str)] = &[
    (
        "device.registered",
        "Device",
        "A device was registered: the device.",
    ),
    (
        "devices.registered",
        "EventDevicesRegistered",
        "Devices were registered together by one `POST /v1/devices/batch`, in one log entry (one event id): their ids, in the order of the request. Read a device with `GET /v1/devices/{id}`.",
    ),
    (
        "device.updated",
        "Device",
        "A device's labels or attributes changed: the device after the change.",
    ),
    (
        "device.presence",
        "Device",
        "A device connected or disconnected: the device after it (`online`, `gateway`).",
    ),
    (
        "device.deleted",
        "EventDeviceRef",
        "A device was deleted, with its shadow and commands.",
    ),
    (
        "device.secret_rotated",
        "EventDeviceRef",
        "A device's secret was replaced (the secret is never sent).",
    ),
    (
        "command.issued",
        "Command",
        "A command was issued: the command.",
    ),
    (
        "command.sent",
        "Command",
        "A command was sent to its device: the command after it.",
    ),
    (
        "command.accepted",
        "Command",
        "The device accepted a command: the command after it.",
    ),
    (
        "command.result",
        "Command",
        "The device reported a command's result: the command after it (`succeeded` or `failed`, `output`).",
    ),
    (
        "command.canceled",
        "Command",
        "A command was canceled: the command after it.",
    ),
    (
        "command.expired",
        "EventCommandsExpired",
        "Commands passed their time to live unfinished: each command after it.",
    ),
    (
        "job.created",
        "Job",
        "A job was created (`scheduled`): the job.",
    ),
    (
        "job.started",
        "Job",
        "A job started (`in_progress`; a label selector was evaluated): the job after it.",
    ),
    (
        "job.launched",
        "EventJobLaunched",
        "Executions of a job were launched: their devices and command ids (each command has the usual lifecycle events after this one; no `command.issued`).",
    ),
    (
        "job.completed",
        "Job",
        "Every execution of a job finished: the job after it.",
    ),
    (
        "job.aborted",
        "Job",
        "A job's abort rule tripped (its queued executions were canceled): the job after it.",
    ),
    (
        "job.canceled",
        "Job",
        "A job was canceled (its queued executions with it): the job after it.",
    ),
    (
        "jobs.pruned",
        "EventJobsPruned",
        "Finished jobs were deleted with their executions, past the group leader's retention (`--job-retention-ms`): their ids.",
    ),
    (
        "shadow.desired",
        "EventShadowChange",
        "A desired-state patch was applied.",
    ),
    (
        "shadow.reported",
        "EventShadowChange",
        "A device reported state: the patch applied to the reported document.",
    ),
    (
        "gateway.sessions_lost",
        "EventSessionsLost",
        "A gateway went away; the devices connected to it are offline now.",
    ),
    (
        "cluster.peer",
        "EventPeerAddress",
        "A gateway's peer address was recorded.",
    ),
    (
        "token",
        "EventToken",
        "An API token was created (sent to admin tokens only; never the token or its hash).",
    ),
    (
        "token.revoked",
        "EventTokenRevoked",
        "An API token was revoked (sent to admin tokens only).",
    ),
    (
        "token.rotated",
        "EventTokenRef",
        "An API token got a new secret (sent to admin tokens only; never the secret or its hash).",
    ),
];

/// `data` of `device.deleted` and `device.secret_rotated`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventDeviceRef {
    /// The device id.
    id: String,
}

/// `data` of `devices.registered`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventDevicesRegistered {
    /// The ids of the devices registered, in the order of the request
    /// (1 to 1,000).
    #[schema(value_type = Vec<crate::api::schemas::DeviceId>)]
    devices: Vec<String>,
}

/// `data` of `job.launched`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventJobLaunched {
    /// The job id.
    #[schema(value_type = crate::api::schemas::JobId)]
    job: String,
    /// The executions launched: each device and its command's id.
    executions: Vec<EventLaunch>,
}

/// `data` of `jobs.pruned`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventJobsPruned {
    /// The ids of the jobs deleted (up to 100), oldest first. Empty when
    /// only part of a large job's executions were deleted.
    #[schema(value_type = Vec<crate::api::schemas::JobId>)]
    jobs: Vec<String>,
}

/// One execution of `job.launched`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventLaunch {
    /// The device id.
    #[schema(value_type = crate::api::schemas::DeviceId)]
    device: String,
    /// The id of the command launched for it.
    #[schema(value_type = crate::api::schemas::CommandId)]
    command: String,
}

/// `data` of `command.expired`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventCommandsExpired {
    /// The commands that expired, each after the change.
    commands: Vec<crate::ops::Command>,
}

/// `data` of `shadow.desired` and `shadow.reported`: the change, not the
/// documents (read those from the shadow).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventShadowChange {
    /// The device id.
    device: String,
    /// The shadow's desired version after the change (a reported change
    /// does not bump it).
    version: u64,
    /// The JSON merge patch applied (`null` removes a key).
    #[schema(value_type = Object)]
    patch: Value,
}

/// `data` of `gateway.sessions_lost`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventSessionsLost {
    /// The gateway (node id) that went away.
    gateway: u64,
    /// The devices that were connected to it, now offline.
    devices: Vec<String>,
}

/// `data` of `cluster.peer`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventPeerAddress {
    /// The gateway's node id.
    id: u64,
    /// Its peer address (`host:port`).
    address: String,
}

/// `data` of `token`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventToken {
    /// The token's id.
    id: String,
    /// The token's role.
    role: Role,
    /// The token's name.
    name: String,
    /// When it stops working (ms since epoch); `null` for never.
    expires_at: Option<u64>,
}

/// `data` of `token.revoked`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventTokenRevoked {
    /// The token's id.
    id: String,
    /// The token's role.
    role: Role,
    /// The token's name.
    name: String,
}

/// `data` of `token.rotated`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct EventTokenRef {
    /// The token's id.
    id: String,
}

/// One event of the stream: the SSE fields `id` (the log index of the
/// change; resume after it with `Last-Event-ID`), `event` (the kind) and
/// `data` (JSON, by kind). For the OpenAPI document only.
#[derive(Debug)]
pub(crate) struct StreamEvent;

impl utoipa::PartialSchema for StreamEvent {
    fn schema() -> RefOr<Schema> {
        super::schemas::from_json(stream_event_schema())
    }
}

/// What every event's `data` carries besides the change: who made it.
pub(crate) fn event_by_schema() -> Value {
    serde_json::json!({
        "type": "object",
        "description": "Who made the change (the audit trail), in every event's data.",
        "required": ["by"],
        "properties": {
            "by": {
                "type": ["string", "null"],
                "pattern": "^(token:[A-Za-z0-9_.-]{1,64}|gateway:[0-9]{1,20}|device:[A-Za-z0-9_.-]{1,64})$",
                "description": "`token:<id>` for a write through the REST API (the id as \
                    `GET /v1/tokens` lists it), `gateway:<node id>` for what a gateway did \
                    itself (device presence, command expiry, lost sessions), \
                    `device:<id>` for what a device sent over MQTT (reports, command \
                    results). `null` for changes written before the audit trail existed.",
                "example": "token:tok-5f1e0c2a9b7d4e31",
            },
        },
    })
}

/// The schema of [`StreamEvent`] (the served document takes it as written).
pub(crate) fn stream_event_schema() -> Value {
    let variants: Vec<Value> = EVENT_KINDS
        .iter()
        .map(|(kind, data, about)| {
            serde_json::json!({
                "type": "object",
                "title": kind,
                "description": about,
                "required": ["id", "event", "data"],
                "properties": {
                    "id": {"type": "string", "pattern": "^[0-9]{1,20}$",
                        "description": "SSE `id:` — the log index of the change"},
                    "event": {"type": "string", "enum": [kind],
                        "description": "SSE `event:` — the kind"},
                    "data": {"type": "string", "contentMediaType": "application/json",
                        "contentSchema": {"allOf": [
                            {"$ref": format!("#/components/schemas/{data}")},
                            {"$ref": "#/components/schemas/EventBy"},
                        ]},
                        "description": "SSE `data:` — the change, as JSON (one line)"},
                },
            })
        })
        .collect();
    serde_json::json!({
        "description": "One event of the stream, as its SSE fields (each a string, as in \
            OpenAPI 3.2's description of event streams): `id:` the log index of the change, \
            `event:` its kind, `data:` its JSON (one line; `contentSchema` by kind). Between \
            events the stream sends `:` comments (keep-alive every 15 s; a note before it \
            ends a stream whose client was too slow).",
        "oneOf": variants,
    })
}

impl ToSchema for StreamEvent {
    fn schemas(out: &mut Vec<(String, RefOr<Schema>)>) {
        fn add<T: ToSchema>(out: &mut Vec<(String, RefOr<Schema>)>) {
            out.push((T::name().into_owned(), T::schema()));
            T::schemas(out);
        }
        add::<crate::ops::Device>(out);
        add::<crate::ops::Command>(out);
        add::<EventDeviceRef>(out);
        add::<EventDevicesRegistered>(out);
        add::<EventCommandsExpired>(out);
        add::<crate::jobs::Job>(out);
        add::<EventJobLaunched>(out);
        add::<EventJobsPruned>(out);
        add::<EventLaunch>(out);
        add::<EventShadowChange>(out);
        add::<EventSessionsLost>(out);
        add::<EventPeerAddress>(out);
        add::<EventToken>(out);
        add::<EventTokenRevoked>(out);
        add::<EventTokenRef>(out);
    }
}

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Start after this log index (as `Last-Event-ID`, which wins if both are
    /// given). Without either, the stream starts with the next change.
    pub after: Option<u64>,
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "Last-Event-ID must be the id of an event of this stream (a log index)",
            )
        })
}

/// Removes credential hashes from event data, wherever they appear.
fn scrub(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("secret_hash");
            m.remove("token_hash");
            m.values_mut().for_each(scrub);
        }
        Value::Array(a) => a.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// The event as sent, and about how many bytes it takes.
fn to_sse(mut e: Event) -> (SseEvent, usize) {
    scrub(&mut e.data);
    // The audit trail: who made the change (null for entries written
    // before it existed).
    if let Value::Object(m) = &mut e.data {
        m.insert("by".into(), e.by.map_or(Value::Null, Value::String));
    }
    let data = serde_json::to_string(&e.data).unwrap_or_else(|_| "null".into());
    let size = data.len() + e.kind.len() + EVENT_OVERHEAD;
    let ev = SseEvent::default()
        .id(e.index.to_string())
        .event(e.kind)
        .data(data);
    (ev, size)
}

/// The open event streams of one gateway: the limits on them, and their
/// figures for `/metrics`.
#[derive(Debug)]
pub(crate) struct EventStreams {
    max: usize,
    per_token: usize,
    buffer_bytes: usize,
    stall: Duration,
    open: Mutex<Open>,
    buffered: AtomicU64,
    refused_token: AtomicU64,
    refused_total: AtomicU64,
    dropped_slow: AtomicU64,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_token: HashMap<Arc<str>, usize>,
}

impl EventStreams {
    pub(crate) fn new(config: &Config) -> EventStreams {
        EventStreams {
            max: config.events_max_streams,
            per_token: config.events_max_streams_per_token,
            buffer_bytes: config.events_buffer_bytes.clamp(1, u32::MAX as usize),
            // Half the send timeout: the stream ends (cleanly, counted) before
            // the listener gives up on the connection.
            stall: config.http_send_timeout / 2,
            open: Mutex::new(Open::default()),
            buffered: AtomicU64::new(0),
            refused_token: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            dropped_slow: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one more stream of `token`, or the refusal.
    fn admit(self: &Arc<Self>, token: Arc<str>) -> Result<StreamSlot, ApiError> {
        let mut open = self.lock();
        let mine = open.by_token.get(&token).copied().unwrap_or(0);
        if mine >= self.per_token {
            self.refused_token.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::too_many_requests(
                "too-many-streams",
                format!(
                    "this token has {mine} event streams open on this gateway, the most it may \
                     have ({}); close one, or give each consumer a token of its own",
                    self.per_token
                ),
                RETRY_S,
            ));
        }
        if open.total >= self.max {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::unavailable(
                "stream-limit",
                format!(
                    "this gateway serves its maximum of {} event streams; retry later, or on \
                     another gateway",
                    self.max
                ),
                RETRY_S,
            ));
        }
        open.total += 1;
        *open.by_token.entry(token.clone()).or_default() += 1;
        Ok(StreamSlot {
            streams: self.clone(),
            token,
        })
    }

    /// Appends the figures in the Prometheus text format.
    pub(crate) fn render(&self, out: &mut String) {
        let total = self.lock().total;
        let _ = writeln!(
            out,
            "# HELP entente_events_streams Event streams (/v1/events) open.\n\
             # TYPE entente_events_streams gauge\nentente_events_streams {total}"
        );
        let _ = writeln!(
            out,
            "# HELP entente_events_buffered_bytes Event bytes buffered for stream clients, all streams.\n\
             # TYPE entente_events_buffered_bytes gauge\nentente_events_buffered_bytes {}",
            self.buffered.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP entente_events_streams_refused_total Event streams refused: over the limit per token (429) or in all (503).\n\
             # TYPE entente_events_streams_refused_total counter\n\
             entente_events_streams_refused_total{{limit=\"token\"}} {}\n\
             entente_events_streams_refused_total{{limit=\"total\"}} {}",
            self.refused_token.load(Ordering::Relaxed),
            self.refused_total.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP entente_events_streams_dropped_total Event streams ended because their client did not keep up.\n\
             # TYPE entente_events_streams_dropped_total counter\nentente_events_streams_dropped_total {}",
            self.dropped_slow.load(Ordering::Relaxed)
        );
    }
}

/// One open stream's place; freed when the response body is dropped.
#[derive(Debug)]
struct StreamSlot {
    streams: Arc<EventStreams>,
    token: Arc<str>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_token.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                open.by_token.remove(&self.token);
            }
        }
    }
}

/// Bytes of one event in a stream's buffer, given back when it leaves.
#[derive(Debug)]
struct Buffered {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    streams: Arc<EventStreams>,
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.streams
            .buffered
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

type Item = (SseEvent, Option<Buffered>);

/// The pump's end of one client's buffer.
struct Out {
    tx: mpsc::Sender<Item>,
    budget: Arc<Semaphore>,
    streams: Arc<EventStreams>,
}

impl Out {
    /// Buffers `ev` (`size` bytes) for the client, waiting while its buffer
    /// is full — at most the stall time, after which the client is dropped.
    async fn push(&self, ev: SseEvent, size: usize, cursor: u64) -> Step {
        let s = &self.streams;
        let n = size.clamp(1, s.buffer_bytes);
        let enqueue = async {
            let permit = self
                .budget
                .clone()
                .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
                .await
                .ok()?;
            s.buffered.fetch_add(n as u64, Ordering::Relaxed);
            let buffered = Buffered {
                _permit: permit,
                bytes: n as u64,
                streams: s.clone(),
            };
            self.tx.send((ev, Some(buffered))).await.ok()
        };
        tokio::select! {
            () = self.tx.closed() => Step::Stop,
            r = tokio::time::timeout(s.stall, enqueue) => match r {
                Ok(Some(())) => Step::Go,
                Ok(None) => Step::Stop,
                Err(_) => {
                    s.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        last_buffered = cursor,
                        "an event stream's client took nothing for {} ms; ending the stream",
                        s.stall.as_millis()
                    );
                    let _ = self.tx.try_send((
                        SseEvent::default().comment(
                            "ending: this client did not keep up; reconnect with the \
                             Last-Event-ID of the last event received to resume",
                        ),
                        None,
                    ));
                    Step::Stop
                }
            },
        }
    }
}

/// Stream committed changes (Server-Sent Events).
///
/// `id` = log index, `event` = kind (e.g. `command.result`), `data` = JSON.
/// Reconnect with `Last-Event-ID` to resume exactly. The stream ends when the
/// gateway shuts down, or when the client does not keep up (its buffer on the
/// gateway stays full for half the send timeout, 15 s by default): then it
/// ends after whole events, and `Last-Event-ID` resumes it as well. By
/// default a token may have 16 streams open on one gateway, and a gateway
/// serves 256.
#[utoipa::path(
    get, path = "/v1/events", tag = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id (log index)"),
    ),
    responses(
        (status = 200, description = "An endless text/event-stream of committed changes, one SSE event each (schema `StreamEvent`: \
the kinds and the JSON of their data). The `Entente-Index` header is the index the stream starts after.",
            content_type = "text/event-stream", body = StreamEvent,
            headers(("Entente-Index" = u64, description = "The log index the stream starts after"))),
        (status = 400, description = "Invalid Last-Event-ID or query", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The events after Last-Event-ID (or `after`) are no longer kept: a gateway keeps those of the last 100,000 log indexes. `Entente-Index` names the oldest id a stream can resume after; read the current state instead",
            body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This token has the most event streams it may have open on this gateway; `Retry-After` says when to try again",
            body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "This gateway serves the most event streams it will; `Retry-After` says when to try again",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn events(
    State(state): State<AppState>,
    Extension(streams): Extension<Arc<EventStreams>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let resume = last_event_id(&headers)?.or(q.after);
    if let Some(after) = resume {
        gone_check(
            after,
            crate::state::resumable_after(state.db.applied_index()),
        )?;
    }
    let (admin, token) = match caller {
        Some(Extension(c)) => (c.role >= Role::Admin, c.token_hash),
        None => (false, Arc::from("")),
    };
    let holder = (!token.is_empty()).then(|| token.clone());
    let slot = streams.admit(token)?;
    // Subscribe first: everything committed from now on reaches us live.
    let live = state.db.subscribe();
    let start = resume.unwrap_or_else(|| state.db.applied_index());
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let out = Out {
        tx,
        budget: Arc::new(Semaphore::new(streams.buffer_bytes)),
        streams,
    };
    tokio::spawn(pump(state, live, start, admin, holder, out));
    // The slot lives as long as the body: until the response is sent or the
    // connection closes.
    let body = ReceiverStream::new(rx).map(move |(ev, buffered)| {
        let _open = &slot;
        drop(buffered);
        Ok::<_, Infallible>(ev)
    });
    let sse = Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    let mut res = (StatusCode::OK, sse).into_response();
    res.headers_mut()
        .insert(ENTENTE_INDEX, HeaderValue::from(start));
    Ok(res)
}

/// What the pump should do next.
enum Step {
    Go,
    Stop,
}

/// Whether to send `e`: only events after `cursor` (which then moves to
/// it), and token events only to admins.
fn admit(cursor: &mut u64, admin: bool, e: &Event) -> bool {
    if e.index <= *cursor {
        return false;
    }
    *cursor = e.index;
    admin || !is_token_event(&e.kind)
}

/// Whether `kind` is about API tokens (`token`, `token.revoked`,
/// `token.rotated`): sent to admin tokens only.
fn is_token_event(kind: &str) -> bool {
    kind == "token" || kind.starts_with("token.")
}

/// Sends one event unless it was sent already; returns `Stop` when the client
/// is gone or too slow.
async fn send(out: &Out, cursor: &mut u64, admin: bool, e: Event) -> Step {
    if !admit(cursor, admin, &e) {
        return Step::Go;
    }
    let (ev, size) = to_sse(e);
    out.push(ev, size, *cursor).await
}

/// Replays stored events after `cursor` until caught up.
/// 410 when events after `after` are no longer kept (`oldest` is the
/// lowest index a stream can resume after).
fn gone_check(after: u64, oldest: u64) -> Result<(), ApiError> {
    if after >= oldest {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::GONE,
        "events-gone",
        "Gone",
        format!(
            "events after index {after} are no longer kept (a gateway keeps the events of the \
             last {} log indexes); the oldest id a stream can resume after is {oldest} — read \
             the current state and follow the stream from its Entente-Index",
            crate::state::EVENTS_RETAINED
        ),
    )
    .with_index(oldest))
}

async fn replay(state: &AppState, out: &Out, cursor: &mut u64, admin: bool) -> Step {
    loop {
        let batch = match state
            .db
            .events_since_checked(*cursor, REPLAY_BATCH, REPLAY_BATCH_BYTES)
            .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(oldest)) => {
                // Pruned past this stream while it replayed: it ends, and
                // resuming answers 410.
                tracing::debug!(
                    cursor = *cursor,
                    oldest,
                    "events dropped under a stream; ending it"
                );
                return Step::Stop;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading events for a stream; ending it");
                return Step::Stop;
            }
        };
        if batch.is_empty() {
            return Step::Go;
        }
        for e in batch {
            if let Step::Stop = send(out, cursor, admin, e).await {
                return Step::Stop;
            }
        }
    }
}

/// When the token `holder` stops working (it is not known here any more —
/// revoked, or rotated to another secret — or it expired): `None` if it
/// still works and never expires, a time in the past if it stopped.
/// A database error keeps the stream going (it is checked again at the
/// next token change).
async fn token_stops(state: &AppState, holder: &str) -> Option<tokio::time::Instant> {
    let now = tokio::time::Instant::now();
    match state.db.token(holder).await {
        Ok(Some(t)) => t.expires_at.map(|e| {
            let left = e.saturating_sub(crate::now_ms());
            now + Duration::from_millis(left)
        }),
        Ok(None) => Some(now),
        Err(e) => {
            tracing::warn!(error = %e, "checking an event stream's token");
            None
        }
    }
}

/// Tells the client its stream ends because its token stopped working.
fn end_for_token(out: &Out) -> Step {
    let _ = out.tx.try_send((
        SseEvent::default().comment(
            "ending: this stream's token was revoked, rotated or expired; reconnect with a              valid token and the Last-Event-ID of the last event received to resume",
        ),
        None,
    ));
    Step::Stop
}

/// Feeds one client: replay, then live, until the client leaves, falls too
/// far behind, the gateway shuts down, or the stream's token (`holder`)
/// stops working — checked when the stream starts, whenever a token change
/// is applied, and at the token's expiry.
async fn pump(
    state: AppState,
    mut live: tokio::sync::broadcast::Receiver<Event>,
    mut cursor: u64,
    admin: bool,
    holder: Option<Arc<str>>,
    out: Out,
) {
    let mut shutdown = state.shutdown.clone();
    if *shutdown.borrow() {
        return;
    }
    let mut stops = match &holder {
        Some(h) => token_stops(&state, h).await,
        None => None,
    };
    let mut need_replay = true;
    loop {
        if stops.is_some_and(|t| t <= tokio::time::Instant::now()) {
            end_for_token(&out);
            return;
        }
        if need_replay {
            need_replay = false;
            let step = tokio::select! {
                s = replay(&state, &out, &mut cursor, admin) => s,
                _ = super::stopped(&mut shutdown) => Step::Stop,
            };
            if let Step::Stop = step {
                return;
            }
            // A token change may have been among the events replayed.
            if let Some(h) = &holder {
                stops = token_stops(&state, h).await;
                continue;
            }
        }
        let expiry = async {
            match stops {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let step = tokio::select! {
            _ = super::stopped(&mut shutdown) => Step::Stop,
            _ = out.tx.closed() => Step::Stop,
            () = expiry => end_for_token(&out),
            ev = live.recv() => match ev {
                Ok(e) if is_token_event(&e.kind) && holder.is_some() => {
                    // Applied before it was broadcast: the check sees it.
                    stops = token_stops(&state, holder.as_deref().unwrap_or_default()).await;
                    if stops.is_some_and(|t| t <= tokio::time::Instant::now()) {
                        end_for_token(&out)
                    } else {
                        send(&out, &mut cursor, admin, e).await
                    }
                }
                Ok(e) => send(&out, &mut cursor, admin, e).await,
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "event stream fell behind; replaying from the store");
                    need_replay = true;
                    Step::Go
                }
                Err(RecvError::Closed) => Step::Stop,
            },
        };
        if let Step::Stop = step {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(index: u64, kind: &str) -> Event {
        Event {
            index,
            kind: kind.into(),
            data: serde_json::json!({ "i": index }),
            by: None,
        }
    }

    #[test]
    fn events_pass_once_in_index_order_and_tokens_only_to_admins() {
        let stream = [
            ev(3, "device.registered"),
            ev(5, "device.registered"),
            ev(5, "device.registered"),
            ev(4, "device.updated"),
            ev(6, "token"),
            ev(7, "command.issued"),
            ev(8, "token.revoked"),
            ev(9, "token.rotated"),
        ];
        let run = |admin: bool| {
            let mut cursor = 4;
            let passed: Vec<u64> = stream
                .iter()
                .filter(|e| admit(&mut cursor, admin, e))
                .map(|e| e.index)
                .collect();
            (passed, cursor)
        };
        assert_eq!(
            run(false),
            (vec![5, 7], 9),
            "a hidden event still moves the cursor"
        );
        assert_eq!(run(true), (vec![5, 6, 7, 8, 9], 9));
    }

    fn out(config: &Config) -> (Out, mpsc::Receiver<Item>) {
        let streams = Arc::new(EventStreams::new(config));
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
        let out = Out {
            tx,
            budget: Arc::new(Semaphore::new(streams.buffer_bytes)),
            streams,
        };
        (out, rx)
    }

    fn config() -> Config {
        let any = "127.0.0.1:0".parse().expect("address");
        Config::single(std::path::PathBuf::from("unused"), any, any)
    }

    #[tokio::test]
    async fn a_departed_client_stops_the_pump() {
        let (out, rx) = out(&config());
        drop(rx);
        let mut cursor = 0;
        assert!(matches!(
            send(&out, &mut cursor, true, ev(1, "token")).await,
            Step::Stop
        ));
    }

    #[tokio::test]
    async fn a_client_that_does_not_keep_up_is_dropped_with_its_buffer_bounded() {
        let mut c = config();
        c.events_buffer_bytes = 1000;
        c.http_send_timeout = Duration::from_millis(600);
        let (out, mut rx) = out(&c);
        let streams = out.streams.clone();
        let big = |i| Event {
            index: i,
            kind: "shadow.desired".into(),
            data: serde_json::json!({ "pad": "x".repeat(300) }),
            by: None,
        };
        let mut cursor = 0;
        // Two events of ~360 bytes fit in 1000 bytes; the third waits.
        for i in 1..=2 {
            assert!(matches!(
                send(&out, &mut cursor, true, big(i)).await,
                Step::Go
            ));
        }
        let before = tokio::time::Instant::now();
        assert!(matches!(
            send(&out, &mut cursor, true, big(3)).await,
            Step::Stop
        ));
        let waited = before.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(10),
            "dropped after the stall time, not {waited:?}"
        );
        assert!(streams.buffered.load(Ordering::Relaxed) <= 1000);
        assert_eq!(streams.dropped_slow.load(Ordering::Relaxed), 1);
        // What was buffered is still delivered, then a comment says why it ends.
        let (_, b1) = rx.recv().await.expect("event 1");
        let (_, b2) = rx.recv().await.expect("event 2");
        assert!(b1.is_some() && b2.is_some());
        let (_, end) = rx.recv().await.expect("the ending comment");
        assert!(end.is_none());
        drop((b1, b2));
        assert_eq!(streams.buffered.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn credential_hashes_never_leave() {
        let mut v =
            serde_json::json!({"id":"d","secret_hash":"x","nested":[{"token_hash":"y","k":1}]});
        scrub(&mut v);
        assert_eq!(v, serde_json::json!({"id":"d","nested":[{"k":1}]}));
    }
}

#[cfg(test)]
mod gone_tests {
    use super::*;

    #[test]
    fn a_resume_older_than_the_kept_events_is_gone_with_the_oldest_id() {
        use crate::state::{EVENTS_RETAINED, resumable_after};
        assert_eq!(resumable_after(0), 0);
        assert_eq!(resumable_after(EVENTS_RETAINED), 0);
        assert_eq!(resumable_after(EVENTS_RETAINED + 10), 9);
        let oldest = resumable_after(EVENTS_RETAINED + 10);
        assert!(gone_check(oldest, oldest).is_ok());
        assert!(gone_check(oldest + 5, oldest).is_ok());
        let err = gone_check(oldest - 1, oldest).unwrap_err();
        let problem = err.problem();
        assert_eq!(problem.status, 410);
        assert!(
            problem
                .detail
                .contains("oldest id a stream can resume after is 9")
        );
    }
}
