//! Jobs: create (a command over many devices, rolled out at a set rate),
//! list, read with counts, list executions, cancel.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::de::{self, DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::commands::{DEFAULT_TTL_MS, MAX_TTL_MS};
use super::error::{ApiError, Problem};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, Consistency, MinIndexHeader, page_query, read_barrier, reply,
    split_page, unexpected, write,
};
use super::schemas::{DeviceId, JobId, integral_opt};
use super::validate;
use crate::jobs::{
    AbortRule, DEFAULT_IN_FLIGHT, DEFAULT_MIN_FINISHED, DEFAULT_PER_MINUTE, Execution,
    ExecutionStatus, Job, JobCommand, JobState, JobTarget, MAX_IN_FLIGHT, MAX_JOB_DEVICES,
    MAX_PER_MINUTE, MAX_SELECTOR_LABELS, Rollout,
};
use crate::ops::{Op, OpResult};
use crate::shared::{id_ok, now_ms, random_token};

/// The path of the job collection (its POST takes the batch body limit:
/// a job may name 10,000 devices).
pub(crate) const JOBS_PATH: &str = "/v1/jobs";

/// The highest `min_finished` of an abort rule.
const MAX_MIN_FINISHED: u64 = 1_000_000;
/// The latest `start_at` (ms since the epoch; the last millisecond of
/// the year 9999).
const MAX_START_AT: u64 = 253_402_300_799_999;

/// Body of `POST /v1/jobs` (its schema: [`new_job_schema`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    #[serde(deserialize_with = "object")]
    command: NewJobCommand,
    target: Map<String, Value>,
    #[serde(default, deserialize_with = "object_opt")]
    rollout: Option<NewRollout>,
    #[serde(default, deserialize_with = "object_opt")]
    abort: Option<NewAbort>,
    #[serde(default, deserialize_with = "integral_opt")]
    timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "integral_opt")]
    start_at: Option<u64>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewJobCommand {
    name: String,
    #[serde(default)]
    params: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRollout {
    #[serde(default, deserialize_with = "integral_opt")]
    max_per_minute: Option<u64>,
    #[serde(default, deserialize_with = "integral_opt")]
    max_in_flight: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAbort {
    #[serde(deserialize_with = "super::schemas::integral")]
    failure_percent: u64,
    #[serde(default, deserialize_with = "integral_opt")]
    min_finished: Option<u64>,
}

/// A struct that must be written as a JSON object (serde would also take
/// an array of its fields' values).
fn object<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    match Value::deserialize(d)? {
        v @ Value::Object(_) => serde_json::from_value(v).map_err(de::Error::custom),
        _ => Err(de::Error::custom("expected an object")),
    }
}

/// [`object`], or `null` (or absent) for none.
fn object_opt<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v @ Value::Object(_) => serde_json::from_value(v)
            .map(Some)
            .map_err(de::Error::custom),
        _ => Err(de::Error::custom("expected an object or null")),
    }
}

impl utoipa::PartialSchema for NewJob {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        super::schemas::from_json(new_job_schema())
    }
}

impl ToSchema for NewJob {}

/// The schema of [`NewJob`].
pub(crate) fn new_job_schema() -> Value {
    let nullable_int = |min: u64, max: u64, about: &str| json!({"type": ["integer", "null"], "minimum": min, "maximum": max, "description": about});
    json!({
        "type": "object",
        "description": "Body of `POST /v1/jobs`.",
        "required": ["command", "target"],
        "additionalProperties": false,
        "properties": {
            "command": {
                "type": "object",
                "description": "The command each device gets.",
                "required": ["name"],
                "additionalProperties": false,
                "properties": {
                    "name": {"$ref": "#/components/schemas/CommandName"},
                    "params": {"$ref": "#/components/schemas/JsonValue"},
                },
            },
            "target": {
                "description": "Which devices: `{\"devices\": [ids]}` (1 to 10000 registered \
                    devices, each once), or `{\"labels\": {key: value}}` (1 to 16 labels; the \
                    devices having all of them when the job starts — devices registered or \
                    relabelled later do not join).",
                "oneOf": [
                    {
                        "type": "object", "required": ["devices"], "additionalProperties": false,
                        "properties": {"devices": {
                            "type": "array", "minItems": 1, "maxItems": MAX_JOB_DEVICES,
                            "uniqueItems": true,
                            "items": {"$ref": "#/components/schemas/DeviceId"},
                        }},
                    },
                    {
                        "type": "object", "required": ["labels"], "additionalProperties": false,
                        "properties": {"labels": {
                            "allOf": [{"$ref": "#/components/schemas/Labels"}],
                            "type": "object",
                            "minProperties": 1, "maxProperties": MAX_SELECTOR_LABELS,
                        }},
                    },
                ],
            },
            "rollout": {
                "type": ["object", "null"],
                "description": "How fast: at most `max_per_minute` launches a minute (one at \
                    once, then this rate, with at most one second's worth saved up while \
                    launching stalls) and at most `max_in_flight` launched and unfinished.",
                "additionalProperties": false,
                "properties": {
                    "max_per_minute": nullable_int(1, u64::from(MAX_PER_MINUTE), "Default 600."),
                    "max_in_flight": nullable_int(1, u64::from(MAX_IN_FLIGHT), "Default 100."),
                },
            },
            "abort": {
                "type": ["object", "null"],
                "description": "Abort (cancel the queued executions) when failed and timed-out \
                    executions are more than `failure_percent` % of the finished ones, once \
                    `min_finished` finished. None if absent.",
                "required": ["failure_percent"],
                "additionalProperties": false,
                "properties": {
                    "failure_percent": {"type": "integer", "minimum": 0, "maximum": 100},
                    "min_finished": nullable_int(1, MAX_MIN_FINISHED, "Default 10."),
                },
            },
            "timeout_ms": nullable_int(1, MAX_TTL_MS,
                "Each device's time to answer (its command's time to live), ms; default 60000. \
                 An execution whose command has not finished by then is `timed_out`."),
            "start_at": nullable_int(0, MAX_START_AT,
                "When to start (ms since the epoch); at once if absent or past."),
            "idempotency_key": {
                "description": "Optional client key (also the `Idempotency-Key` header): a \
                    job created with the same key earlier is returned (200) instead of a new \
                    one, whatever this body says. One job per key in the group for as long as \
                    that job is kept (a finished job is pruned after the retention, 7 days by \
                    default; its key then names no job).",
                "oneOf": [{"$ref": "#/components/schemas/IdempotencyKey"}, {"type": "null"}],
            },
        },
        "example": {
            "command": {"name": "update-firmware", "params": {"version": "2.4.1"}},
            "target": {"labels": {"site": "north"}},
            "rollout": {"max_per_minute": 600, "max_in_flight": 100},
            "abort": {"failure_percent": 20, "min_finished": 10},
            "timeout_ms": 600000,
        },
    })
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListJobsQuery {
    /// Only jobs in this state.
    #[param(inline)]
    pub state: Option<JobState>,
    /// The `next` cursor of the previous page.
    #[param(value_type = Option<JobId>)]
    pub after: Option<String>,
    /// Page size (default 100, at most the gateway's `max_page`).
    pub limit: Option<u32>,
    /// `linearizable` (default) or `local`.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

/// Query of `GET /v1/jobs/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GetJobQuery {
    /// `linearizable` (default) or `local`.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

/// Query of `GET /v1/jobs/{id}/executions`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListExecutionsQuery {
    /// Only executions in this state.
    #[param(inline)]
    pub status: Option<ExecutionStatus>,
    /// The `next` cursor of the previous page (a device id).
    #[param(value_type = Option<DeviceId>)]
    pub after: Option<String>,
    /// Page size (default 100, at most the gateway's `max_page`).
    pub limit: Option<u32>,
    /// `linearizable` (default) or `local`.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

/// One page of jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    /// The jobs, by id (ids start with their creation time).
    pub items: Vec<Job>,
    /// Pass as `?after=` to get the next page; absent on the last page.
    pub next: Option<String>,
}

/// One page of a job's executions.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionPage {
    /// The executions, by device id.
    pub items: Vec<Execution>,
    /// Pass as `?after=` to get the next page; absent on the last page.
    pub next: Option<String>,
}

/// A new job id: `j-` + creation time (ms, hex) + 64 random bits.
fn new_job_id() -> Result<String, ApiError> {
    let random = random_token().map_err(|e| {
        tracing::error!(error = %e, "generating a job id");
        ApiError::internal()
    })?;
    let random = random.get(..16).unwrap_or(&random);
    Ok(format!("j-{:012x}{random}", now_ms()))
}

fn path_job_id(id: &str) -> Result<(), ApiError> {
    if id_ok(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "job id {} is not valid: use 1 to 64 characters from A-Z, a-z, 0-9, '_', '.' and '-'",
            validate::quoted(id)
        )))
    }
}

/// The `Idempotency-Key` header of `POST /v1/jobs`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IdempotencyKeyHeader {
    /// Optional client key, as `idempotency_key` in the body (the same
    /// rules): the job created earlier with it is returned (200).
    #[param(rename = "Idempotency-Key", value_type = Option<super::schemas::IdempotencyKey>)]
    idempotency_key: Option<String>,
}

/// The `Idempotency-Key` header, if given (once), as text.
fn header_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid("give the Idempotency-Key header once"));
    }
    let key = v.to_str().map_err(|_| {
        ApiError::invalid("the Idempotency-Key header must be visible ASCII characters")
    })?;
    validate::idempotency_key(key)?;
    Ok(Some(key.to_string()))
}

fn job_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no job with id {id:?}"))
}

/// Checks a job body and builds the operation that creates it as `id`.
pub(crate) fn create_op(body: NewJob, id: String) -> Result<Op, ApiError> {
    validate::command_name(&body.command.name)?;
    if let Some(k) = &body.idempotency_key {
        validate::idempotency_key(k)?;
    }
    let params = body
        .command
        .params
        .unwrap_or_else(|| Value::Object(Default::default()));
    validate::json_value("params", &params)?;
    let target = target(body.target)?;
    let rollout = body.rollout.map_or(Ok(Rollout::default()), |r| {
        Ok::<_, ApiError>(Rollout {
            max_per_minute: bounded(
                "rollout.max_per_minute",
                r.max_per_minute,
                DEFAULT_PER_MINUTE,
                MAX_PER_MINUTE,
            )?,
            max_in_flight: bounded(
                "rollout.max_in_flight",
                r.max_in_flight,
                DEFAULT_IN_FLIGHT,
                MAX_IN_FLIGHT,
            )?,
        })
    })?;
    let abort = body
        .abort
        .map(|a| {
            let failure_percent = u8::try_from(a.failure_percent)
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| {
                    ApiError::invalid("abort.failure_percent must be between 0 and 100")
                })?;
            let min_finished = a.min_finished.unwrap_or(u64::from(DEFAULT_MIN_FINISHED));
            if min_finished == 0 || min_finished > MAX_MIN_FINISHED {
                return Err(ApiError::invalid(format!(
                    "abort.min_finished must be between 1 and {MAX_MIN_FINISHED}"
                )));
            }
            Ok(AbortRule {
                failure_percent,
                min_finished: min_finished as u32,
            })
        })
        .transpose()?;
    let timeout_ms = body.timeout_ms.unwrap_or(DEFAULT_TTL_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TTL_MS {
        return Err(ApiError::invalid(format!(
            "timeout_ms must be between 1 and {MAX_TTL_MS} (7 days)"
        )));
    }
    if body.start_at.is_some_and(|at| at > MAX_START_AT) {
        return Err(ApiError::invalid(format!(
            "start_at must be at most {MAX_START_AT} (ms since the epoch)"
        )));
    }
    Ok(Op::CreateJob {
        id,
        command: JobCommand {
            name: body.command.name,
            params,
        },
        target,
        rollout,
        abort,
        timeout_ms,
        start_at_ms: body.start_at,
        idempotency_key: body.idempotency_key,
    })
}

fn bounded(what: &str, v: Option<u64>, default: u32, max: u32) -> Result<u32, ApiError> {
    match v {
        None => Ok(default),
        Some(n) if n >= 1 && n <= u64::from(max) => Ok(n as u32),
        Some(_) => Err(ApiError::invalid(format!(
            "{what} must be between 1 and {max}"
        ))),
    }
}

/// `{"devices": [..]}` or `{"labels": {..}}`, checked.
fn target(t: Map<String, Value>) -> Result<JobTarget, ApiError> {
    let rule = "target must be {\"devices\": [device ids]} or {\"labels\": {key: value}}";
    if t.len() != 1 {
        return Err(ApiError::invalid(rule));
    }
    match t.into_iter().next() {
        Some((k, Value::Array(items))) if k == "devices" => {
            if items.is_empty() || items.len() > MAX_JOB_DEVICES {
                return Err(ApiError::invalid(format!(
                    "target.devices names 1 to {MAX_JOB_DEVICES} devices ({} given); target \
                     more with labels",
                    items.len()
                )));
            }
            let mut ids = Vec::with_capacity(items.len());
            let mut seen = std::collections::HashSet::with_capacity(items.len());
            for item in items {
                let Value::String(id) = item else {
                    return Err(ApiError::invalid(
                        "target.devices holds device ids (strings)",
                    ));
                };
                validate::body_device_id(&id)?;
                if !seen.insert(id.clone()) {
                    return Err(ApiError::invalid(format!(
                        "target.devices names device {} twice",
                        validate::quoted(&id)
                    )));
                }
                ids.push(id);
            }
            Ok(JobTarget::Devices(ids))
        }
        Some((k, labels @ Value::Object(_))) if k == "labels" => {
            let labels: BTreeMap<String, String> = serde_json::from_value(labels)
                .map_err(|_| ApiError::invalid("target.labels maps label keys to strings"))?;
            if labels.is_empty() || labels.len() > MAX_SELECTOR_LABELS {
                return Err(ApiError::invalid(format!(
                    "target.labels has 1 to {MAX_SELECTOR_LABELS} labels ({} given)",
                    labels.len()
                )));
            }
            validate::labels(&labels)?;
            Ok(JobTarget::Labels(labels))
        }
        _ => Err(ApiError::invalid(rule)),
    }
}

/// Create a job: one command rolled out over many devices.
///
/// The job is created `scheduled`; the leader starts it at `start_at` (at
/// once without one) — a label selector is evaluated then, and devices
/// registered or relabelled later do not join — and launches its
/// executions in device-id order within the rollout bounds: each is a
/// command (id derived from the job and the device: one per device, ever)
/// with the usual lifecycle, whose time to live is `timeout_ms`. With an
/// abort rule, the job is `aborted` (its queued executions canceled) when
/// too many fail; it is `completed` when every execution finished.
///
/// 201 when created, 200 when the idempotency key (the `Idempotency-Key`
/// header or `idempotency_key` in the body) matched an earlier job (which
/// is returned): a retry after an unknown outcome (503 `write-timeout`)
/// with the same key creates no second job.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    params(IdempotencyKeyHeader),
    request_body = NewJob,
    responses(
        (status = 201, description = "Created (scheduled)", body = Job,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 200, description = "The job created earlier with this idempotency key", body = Job,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Devices of `target.devices` are not registered (the first ones are named)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The group has 100 unfinished jobs, the most it may; or the `Idempotency-Key` header and the body's `idempotency_key` name two different keys", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large (the batch limit, 4 MiB by default), or params over 64 KiB as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (command, target, rollout, abort rule, timeout, start, idempotency key)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<NewJob>,
) -> Result<Response, ApiError> {
    if let Some(key) = header_key(&headers)? {
        match &body.idempotency_key {
            Some(k) if *k != key => {
                // 409, not 422: each key alone is valid (the document
                // cannot say that two valid keys must agree).
                return Err(ApiError::conflict(
                    "the Idempotency-Key header and the body's idempotency_key name two different keys; give one",
                ));
            }
            _ => body.idempotency_key = Some(key),
        }
    }
    let op = create_op(body, new_job_id()?)?;
    let (index, result) = write(&state, op).await?;
    match result {
        OpResult::Job(job) => Ok(reply(StatusCode::CREATED, index, &job)),
        OpResult::JobExisting(job) => Ok(reply(StatusCode::OK, index, &job)),
        OpResult::NotFound(why) => {
            Err(ApiError::not_found(format!("the job was not created: {why}")).with_index(index))
        }
        OpResult::Conflict(why) => {
            Err(ApiError::conflict(format!("the job was not created: {why}")).with_index(index))
        }
        r => Err(unexpected("create job", &r, index)),
    }
}

/// List jobs.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    params(ListJobsQuery, MinIndexHeader),
    responses(
        (status = 200, description = "One page", body = JobPage,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid query, or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_jobs(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListJobsQuery>,
) -> Result<Response, ApiError> {
    let limit = validate::limit(q.limit, state.config.max_page)?;
    if let Some(after) = &q.after {
        path_job_id(after)?;
    }
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    let page = page_query(q.after, limit);
    let items = state.db.list_jobs(q.state, &page).await?;
    let (items, next) = split_page(items, limit, |j| &j.id);
    Ok(reply(StatusCode::OK, ctx.index, &JobPage { items, next }))
}

/// Get a job, with how many of its executions are in each state.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = JobId, Path, description = "Job id"), GetJobQuery, MinIndexHeader),
    responses(
        (status = 200, description = "The job", body = Job,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid id or query, or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<GetJobQuery>,
) -> Result<Response, ApiError> {
    path_job_id(&id)?;
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    match state.db.job(&id).await? {
        Some(job) => Ok(reply(StatusCode::OK, ctx.index, &job)),
        None => Err(job_not_found(&id).with_index(ctx.index)),
    }
}

/// List a job's executions (one per device), by device id.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/executions", tag = "jobs",
    params(("id" = JobId, Path, description = "Job id"), ListExecutionsQuery, MinIndexHeader),
    responses(
        (status = 200, description = "One page", body = ExecutionPage,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid id or query, or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_executions(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListExecutionsQuery>,
) -> Result<Response, ApiError> {
    path_job_id(&id)?;
    let limit = validate::limit(q.limit, state.config.max_page)?;
    if let Some(after) = &q.after {
        validate::path_device_id(after)?;
    }
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    if state.db.job(&id).await?.is_none() {
        return Err(job_not_found(&id).with_index(ctx.index));
    }
    let page = page_query(q.after, limit);
    let items = state.db.list_executions(&id, q.status, &page).await?;
    let (items, next) = split_page(items, limit, |e| &e.device);
    Ok(reply(
        StatusCode::OK,
        ctx.index,
        &ExecutionPage { items, next },
    ))
}

/// Cancel a job that has not finished.
///
/// Its queued executions are canceled at once and nothing more is
/// launched; executions already launched are left to finish (their
/// commands are not canceled — cancel one with
/// `POST /v1/commands/{cid}/cancel`) and still record their outcome.
/// Canceling a canceled job again returns it (200).
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = JobId, Path, description = "Job id")),
    responses(
        (status = 200, description = "The canceled job", body = Job,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already over (completed or aborted)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn cancel_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    path_job_id(&id)?;
    let (index, result) = write(&state, Op::CancelJob { id: id.clone() }).await?;
    match result {
        OpResult::Job(job) => Ok(reply(StatusCode::OK, index, &job)),
        OpResult::NotFound(_) => Err(job_not_found(&id).with_index(index)),
        OpResult::Conflict(why) => match state.db.job(&id).await? {
            Some(job) if job.state == JobState::Canceled => Ok(reply(StatusCode::OK, index, &job)),
            _ => Err(ApiError::conflict(format!(
                "{why}; only scheduled or in-progress jobs can be canceled"
            ))
            .with_index(index)),
        },
        r => Err(unexpected("cancel job", &r, index)),
    }
}
