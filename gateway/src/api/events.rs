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

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ENTENTE_INDEX, Problem};
use super::extract::ApiQuery;
use crate::ops::{Event, Role};

/// Events read from the store per query while replaying.
const REPLAY_BATCH: u32 = 500;
/// Events buffered per client before the stream waits for it.
const CLIENT_BUFFER: usize = 64;

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

fn to_sse(mut e: Event) -> SseEvent {
    scrub(&mut e.data);
    let data = serde_json::to_string(&e.data).unwrap_or_else(|_| "null".into());
    SseEvent::default()
        .id(e.index.to_string())
        .event(e.kind)
        .data(data)
}

/// Stream committed changes (Server-Sent Events).
///
/// `id` = log index, `event` = kind (e.g. `command.result`), `data` = JSON.
/// Reconnect with `Last-Event-ID` to resume exactly. The stream ends when the
/// gateway shuts down.
#[utoipa::path(
    get, path = "/v1/events", tag = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id (log index)"),
    ),
    responses(
        (status = 200, description = "An endless text/event-stream; each event's data is the JSON of the change",
            content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid Last-Event-ID or query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn events(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let resume = last_event_id(&headers)?.or(q.after);
    // Subscribe first: everything committed from now on reaches us live.
    let live = state.db.subscribe();
    let start = resume.unwrap_or_else(|| state.db.applied_index());
    let admin = caller.is_some_and(|Extension(c)| c.role >= Role::Admin);
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    tokio::spawn(pump(state, live, start, admin, tx));
    let sse = Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
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
    admin || e.kind != "token"
}

/// Sends one event unless it was sent already; returns `Stop` when the client is gone.
async fn send(
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
    cursor: &mut u64,
    admin: bool,
    e: Event,
) -> Step {
    if !admit(cursor, admin, &e) {
        return Step::Go;
    }
    if tx.send(Ok(to_sse(e))).await.is_err() {
        return Step::Stop;
    }
    Step::Go
}

/// Replays stored events after `cursor` until caught up.
async fn replay(
    state: &AppState,
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
    cursor: &mut u64,
    admin: bool,
) -> Step {
    loop {
        let batch = match state.db.events_since(*cursor, REPLAY_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reading events for a stream; ending it");
                return Step::Stop;
            }
        };
        let full = batch.len() >= REPLAY_BATCH as usize;
        for e in batch {
            if let Step::Stop = send(tx, cursor, admin, e).await {
                return Step::Stop;
            }
        }
        if !full {
            return Step::Go;
        }
    }
}

/// Feeds one client: replay, then live, until the client leaves or the
/// gateway shuts down.
async fn pump(
    state: AppState,
    mut live: tokio::sync::broadcast::Receiver<Event>,
    mut cursor: u64,
    admin: bool,
    tx: mpsc::Sender<Result<SseEvent, Infallible>>,
) {
    let mut shutdown = state.shutdown.clone();
    if *shutdown.borrow() {
        return;
    }
    let mut need_replay = true;
    loop {
        if need_replay {
            need_replay = false;
            let step = tokio::select! {
                s = replay(&state, &tx, &mut cursor, admin) => s,
                _ = super::stopped(&mut shutdown) => Step::Stop,
            };
            if let Step::Stop = step {
                return;
            }
        }
        let step = tokio::select! {
            _ = super::stopped(&mut shutdown) => Step::Stop,
            _ = tx.closed() => Step::Stop,
            ev = live.recv() => match ev {
                Ok(e) => send(&tx, &mut cursor, admin, e).await,
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
            (vec![5, 7], 7),
            "a hidden event still moves the cursor"
        );
        assert_eq!(run(true), (vec![5, 6, 7], 7));
    }

    #[tokio::test]
    async fn a_departed_client_stops_the_pump() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut cursor = 0;
        assert!(matches!(
            send(&tx, &mut cursor, true, ev(1, "token")).await,
            Step::Stop
        ));
    }

    #[test]
    fn credential_hashes_never_leave() {
        let mut v =
            serde_json::json!({"id":"d","secret_hash":"x","nested":[{"token_hash":"y","k":1}]});
        scrub(&mut v);
        assert_eq!(v, serde_json::json!({"id":"d","nested":[{"k":1}]}));
    }
}
