//! Commands: issue (with idempotency keys and `?wait=`), list, read
//! (long-poll), cancel.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::devices::device_not_found;
use super::error::{ApiError, Problem};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, Consistency, MinIndexHeader, page_query, read_barrier, reply,
    split_page, unexpected, wait_param, write,
};
use super::schemas::{CommandId, CommandName, DeviceId, IdempotencyKey, JsonValue, integral_opt};
use super::validate;
use crate::ops::{Command, CommandStatus, Op, OpResult};
use crate::shared::{now_ms, random_token};
use crate::state::Change;

/// Default time to live of a command.
pub const DEFAULT_TTL_MS: u64 = 60_000;
/// Longest time to live of a command (7 days).
pub const MAX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Body of `POST /v1/devices/{id}/commands`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name":"reboot","params":{"delay_s":5},"ttl_ms":60000,
    "idempotency_key":"reboot-2025-11-26"}))]
pub struct NewCommand {
    /// Command name (1–128 characters).
    #[schema(value_type = CommandName)]
    pub name: String,
    /// Parameters, any JSON (default `{}`).
    #[serde(default)]
    #[schema(value_type = JsonValue)]
    pub params: Option<Value>,
    /// Time to live in ms (default 60000, at most 7 days); after it the
    /// command expires unless it finished.
    #[serde(default, deserialize_with = "integral_opt")]
    #[schema(minimum = 1, maximum = 604_800_000)]
    pub ttl_ms: Option<u64>,
    /// A key of yours: issuing again with the same key for the same device
    /// returns the first command (200) instead of creating another.
    #[schema(value_type = Option<IdempotencyKey>)]
    pub idempotency_key: Option<String>,
}

/// Query of `POST /v1/devices/{id}/commands`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct IssueQuery {
    /// Wait up to this many ms (at most the gateway's max wait, 60 s by
    /// default) for the command to finish, then return its state then.
    pub wait: Option<u64>,
}

/// Query of `GET /v1/commands/{cid}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GetCommandQuery {
    /// Long-poll: wait up to this many ms (at most the gateway's max wait)
    /// for the command to be in a terminal state.
    pub wait: Option<u64>,
    /// `linearizable` (default) or `local`.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

/// Query of `GET /v1/devices/{id}/commands`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListCommandsQuery {
    /// Only commands in this state.
    #[param(inline)]
    pub status: Option<CommandStatus>,
    /// The `next` cursor of the previous page.
    #[param(value_type = Option<CommandId>)]
    pub after: Option<String>,
    /// Page size (default 100, at most the gateway's `max_page`).
    pub limit: Option<u32>,
    /// `linearizable` (default) or `local`.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

/// Query of `GET /v1/commands`: every filter given must hold.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListAllCommandsQuery {
    /// Only commands in this state.
    #[param(inline)]
    pub status: Option<CommandStatus>,
    /// Only this device's commands.
    #[param(value_type = Option<DeviceId>)]
    pub device: Option<String>,
    /// Only the commands a job launched (one per device it reached; a job's
    /// queued executions have none yet). A job that was pruned, or never
    /// existed, has none.
    #[param(value_type = Option<super::schemas::JobId>)]
    pub job: Option<String>,
    /// Only commands issued strictly after this time (ms since the epoch).
    pub created_after: Option<u64>,
    /// The `next` cursor of the previous page.
    #[param(value_type = Option<CommandId>)]
    pub after: Option<String>,
    /// Page size (default 100, at most the gateway's `max_page`).
    pub limit: Option<u32>,
    /// `linearizable` (default) or `local`.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

/// One page of commands.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"items":[{"id":"c-019ac1e2f3a4b5c6d7e8f9a0","device":"pump-7",
    "name":"reboot","params":{"delay_s":5},"status":"succeeded","output":{"ok":true},
    "idempotency_key":null,"issued_at":1764144000000u64,"expires_at":1764144060000u64,
    "updated_at":1764144000900u64}],"next":"c-019ac1e2f3a4b5c6d7e8f9a0"}))]
pub struct CommandPage {
    /// The commands, by id (ids start with their issue time, so this is
    /// roughly issue order).
    pub items: Vec<Command>,
    /// Pass as `?after=` to get the next page; absent on the last page.
    pub next: Option<String>,
}

/// A new command id: `c-` + issue time (ms, hex) + 64 random bits, so ids
/// sort by issue time and never collide in practice.
fn new_command_id() -> Result<String, ApiError> {
    let random = random_token().map_err(|e| {
        tracing::error!(error = %e, "generating a command id");
        ApiError::internal()
    })?;
    let random = random.get(..16).unwrap_or(&random);
    Ok(format!("c-{:012x}{random}", now_ms()))
}

fn command_not_found(cid: &str) -> ApiError {
    ApiError::not_found(format!(
        "no command with id {cid:?} (it may never have existed, or its device was deleted)"
    ))
}

/// Waits up to `wait` for command `cid` to be terminal, reading local state
/// after every committed command change. Returns the command as last seen
/// (`None` if it does not exist) and the applied index observed before that
/// read. Ends early when the gateway shuts down.
async fn wait_terminal(
    state: &AppState,
    cid: &str,
    wait: Duration,
) -> Result<(Option<Command>, u64), ApiError> {
    // Subscribe before the first read, so no change between the two is missed.
    let mut changes = state.db.changes();
    let mut shutdown = state.shutdown.clone();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let index = state.db.applied_index();
        let cmd = state.db.command(cid).await?;
        let Some(current) = cmd.as_ref().filter(|c| !c.status.is_terminal()) else {
            return Ok((cmd, index));
        };
        if wait.is_zero() {
            return Ok((cmd, index));
        }
        // What may have ended it: a step of this command, its expiry, its
        // device's deletion.
        let ends = |ch: &Change| match ch {
            Change::Command(_, c) => c.id == cid,
            Change::CommandsExpired(cmds) => cmds.iter().any(|c| c.id == cid),
            Change::DeviceDeleted { id } => *id == current.device,
            _ => false,
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok((cmd, index)),
                _ = super::stopped(&mut shutdown) => return Ok((cmd, index)),
                ch = changes.recv() => match ch {
                    Ok(ch) if ends(&ch) => break,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return Ok((cmd, index)),
                },
            }
        }
    }
}

/// Issue a command to a device.
///
/// 201 when created, 200 when `idempotency_key` matched an earlier command
/// (which is returned). With `?wait=` the response comes when the command is
/// terminal or the wait is over, whichever is first.
#[utoipa::path(
    post, path = "/v1/devices/{id}/commands", tag = "commands",
    params(("id" = DeviceId, Path, description = "Device id"), IssueQuery),
    request_body = NewCommand,
    responses(
        (status = 201, description = "Created", body = Command,
            headers(("Entente-Index" = u64, description = "Log index of the write (or later, after a wait)"))),
        (status = 200, description = "The command issued earlier with this idempotency key", body = Command,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid id, query or JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Conflicts with the current state", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large, or params over 64 KiB as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (name, ttl, key; params nested over 32 levels or with integers beyond 64 bits)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn issue_command(
    State(state): State<AppState>,
    ApiPath(device): ApiPath<String>,
    ApiQuery(q): ApiQuery<IssueQuery>,
    ApiJson(body): ApiJson<NewCommand>,
) -> Result<Response, ApiError> {
    validate::path_device_id(&device)?;
    let wait = wait_param(&state, q.wait)?;
    let op = issue_op(&device, body, new_command_id()?)?;
    let (index, result) = write(&state, op).await?;
    let (command, created) = match result {
        OpResult::Command { command, created } => (command, created),
        OpResult::NotFound(_) => return Err(device_not_found(&device).with_index(index)),
        OpResult::Conflict(why) => {
            return Err(
                ApiError::conflict(format!("the command was not issued: {why}")).with_index(index),
            );
        }
        r => return Err(unexpected("issue command", &r, index)),
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    if wait.is_zero() || command.status.is_terminal() {
        return Ok(reply(status, index, &command));
    }
    let (latest, seen) = wait_terminal(&state, &command.id, wait).await?;
    match latest {
        Some(c) => Ok(reply(status, seen.max(index), &c)),
        // Deleted with its device while we waited.
        None => Err(command_not_found(&command.id).with_index(seen)),
    }
}

/// Checks a command for `device` and builds the operation
/// `POST /v1/devices/{id}/commands` proposes, with command id `cid`.
pub(crate) fn issue_op(device: &str, body: NewCommand, cid: String) -> Result<Op, ApiError> {
    validate::path_device_id(device)?;
    validate::command_name(&body.name)?;
    if let Some(k) = &body.idempotency_key {
        validate::idempotency_key(k)?;
    }
    let ttl_ms = body.ttl_ms.unwrap_or(DEFAULT_TTL_MS);
    if ttl_ms == 0 || ttl_ms > MAX_TTL_MS {
        return Err(ApiError::invalid(format!(
            "ttl_ms must be between 1 and {MAX_TTL_MS} (7 days)"
        )));
    }
    let params = body
        .params
        .unwrap_or_else(|| Value::Object(Default::default()));
    validate::json_value("params", &params)?;
    Ok(Op::IssueCommand {
        cid,
        device: device.to_string(),
        name: body.name,
        params,
        ttl_ms,
        idempotency_key: body.idempotency_key,
    })
}

/// List a device's commands.
#[utoipa::path(
    get, path = "/v1/devices/{id}/commands", tag = "commands",
    params(("id" = DeviceId, Path, description = "Device id"), ListCommandsQuery, MinIndexHeader),
    responses(
        (status = 200, description = "One page", body = CommandPage,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid id or query, or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_commands(
    State(state): State<AppState>,
    ApiPath(device): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListCommandsQuery>,
) -> Result<Response, ApiError> {
    validate::path_device_id(&device)?;
    let limit = validate::limit(q.limit, state.config.max_page)?;
    if let Some(after) = &q.after {
        validate::path_command_id(after)?;
    }
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    if state.db.device(&device).await?.is_none() {
        return Err(device_not_found(&device).with_index(ctx.index));
    }
    let page = page_query(q.after, limit);
    let items = state.db.list_commands(&device, q.status, &page).await?;
    let (items, next) = split_page(items, limit, |c| &c.id);
    Ok(reply(
        StatusCode::OK,
        ctx.index,
        &CommandPage { items, next },
    ))
}

/// List the commands of every device (fleet-wide), by id, filtered by
/// status, device, job and issue time.
///
/// Ids start with their issue time for commands issued here (`c-`);
/// commands launched by a job have ids derived from the job and the device
/// (`jc-`), so they sort after every `c-` id, not by time. Page with
/// `?after=` the `next` of the previous page.
#[utoipa::path(
    get, path = "/v1/commands", tag = "commands",
    params(ListAllCommandsQuery, MinIndexHeader),
    responses(
        (status = 200, description = "One page", body = CommandPage,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid query (a device, job or command id that is not an id, an unknown status), or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_all_commands(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListAllCommandsQuery>,
) -> Result<Response, ApiError> {
    let limit = validate::limit(q.limit, state.config.max_page)?;
    if let Some(after) = &q.after {
        validate::path_command_id(after)?;
    }
    if let Some(device) = &q.device {
        validate::path_device_id(device)?;
    }
    if let Some(job) = &q.job
        && !crate::shared::id_ok(job)
    {
        return Err(ApiError::bad_request(format!(
            "job id {} is not valid: use 1 to 64 characters from A-Z, a-z, 0-9, '_', '.' and '-'",
            validate::quoted(job)
        )));
    }
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    let filter = crate::state::CommandFilter {
        status: q.status,
        device: q.device,
        job: q.job,
        created_after: q.created_after,
    };
    let page = page_query(q.after, limit);
    let items = state.db.list_all_commands(&filter, &page).await?;
    let (items, next) = split_page(items, limit, |c| &c.id);
    Ok(reply(
        StatusCode::OK,
        ctx.index,
        &CommandPage { items, next },
    ))
}

/// Get a command; with `?wait=` long-poll until it is terminal.
#[utoipa::path(
    get, path = "/v1/commands/{cid}", tag = "commands",
    params(("cid" = CommandId, Path, description = "Command id"), GetCommandQuery, MinIndexHeader),
    responses(
        (status = 200, description = "The command (terminal, or as it is when the wait ended)", body = Command,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid id or query, or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such command", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_command(
    State(state): State<AppState>,
    ApiPath(cid): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<GetCommandQuery>,
) -> Result<Response, ApiError> {
    validate::path_command_id(&cid)?;
    let wait = wait_param(&state, q.wait)?;
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    let (cmd, seen) = if wait.is_zero() {
        (state.db.command(&cid).await?, ctx.index)
    } else {
        let (c, seen) = wait_terminal(&state, &cid, wait).await?;
        (c, seen.max(ctx.index))
    };
    match cmd {
        Some(c) => Ok(reply(StatusCode::OK, seen, &c)),
        None => Err(command_not_found(&cid).with_index(seen)),
    }
}

/// Cancel a command that has not finished.
#[utoipa::path(
    post, path = "/v1/commands/{cid}/cancel", tag = "commands",
    params(("cid" = CommandId, Path, description = "Command id")),
    responses(
        (status = 200, description = "The canceled command", body = Command,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such command", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already finished (succeeded, failed, expired)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn cancel_command(
    State(state): State<AppState>,
    ApiPath(cid): ApiPath<String>,
) -> Result<Response, ApiError> {
    validate::path_command_id(&cid)?;
    let (index, result) = write(&state, Op::CancelCommand { cid: cid.clone() }).await?;
    match result {
        OpResult::Command { command, .. } if command.status == CommandStatus::Canceled => {
            Ok(reply(StatusCode::OK, index, &command))
        }
        OpResult::Command { command, .. } => Err(already_final(&command).with_index(index)),
        OpResult::NotFound(_) => Err(command_not_found(&cid).with_index(index)),
        OpResult::Conflict(_) | OpResult::Ignored => {
            // Already terminal: an earlier cancel is success, anything else a conflict.
            match state.db.command(&cid).await? {
                Some(c) if c.status == CommandStatus::Canceled => {
                    Ok(reply(StatusCode::OK, index, &c))
                }
                Some(c) => Err(already_final(&c).with_index(index)),
                None => Err(command_not_found(&cid).with_index(index)),
            }
        }
        r => Err(unexpected("cancel command", &r, index)),
    }
}

fn already_final(c: &Command) -> ApiError {
    ApiError::conflict(format!(
        "command {:?} already finished ({}); only queued, sent or accepted commands can be \
         canceled",
        c.id,
        c.status.as_str()
    ))
}
