//! Jobs in the state machine: applying the job operations, keeping each
//! job's executions and counters in step with its commands, and the reads
//! the API and the leader's driver make.
//!
//! Every decision here reads only the state and the entry (its stamp), so
//! every member decides alike: the rollout bounds and the abort rule are
//! checked again at apply time of every launch, whatever the proposer
//! believed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use rusqlite::Connection;
use sqlx::{QueryBuilder, Sqlite};

use super::change::{Change, JobStep, Launched, LaunchedCommand};
use super::rows::sync::{exec, load_command, scalar};
use super::rows::{Cols, db_int, from_db_int, parse_json, to_json_text};
use super::{Page, StateDb, StateError};
use crate::jobs::{
    AbortRule, Execution, ExecutionStatus, Job, JobCommand, JobCounts, JobState, JobTarget,
    MAX_ACTIVE_JOBS, MAX_IN_FLIGHT, MAX_PER_MINUTE, MAX_SELECTED_DEVICES, PRUNE_MAX_EXECUTIONS,
    PRUNE_MAX_JOBS, RateCredit, Rollout, command_id, launch_budget,
};
use crate::ops::{CommandStatus, OpResult};

/// What one operation did: its result and its change, if any.
type Applied = (OpResult, Option<Change>);

/// The columns [`job_from_row`] reads, as a literal.
macro_rules! job_cols {
    () => {
        "id, state, command_name, params, selector, max_per_minute, max_in_flight, \
         abort_percent, abort_min_finished, timeout_ms, start_at, reason, created_at, \
         started_at, finished_at, updated_at, n_total, n_launched, n_queued, n_in_progress, \
         n_succeeded, n_failed, n_timed_out, n_canceled, idempotency_key"
    };
}

/// Columns read by [`job_from_row`].
const JOB_COLS: &str = job_cols!();

fn u64_col(row: &impl Cols, col: &str) -> Result<u64, StateError> {
    from_db_int(row.int(col)?, col)
}

fn opt_u64_col(row: &impl Cols, col: &str) -> Result<Option<u64>, StateError> {
    row.opt_int(col)?.map(|v| from_db_int(v, col)).transpose()
}

fn u32_col(row: &impl Cols, col: &str) -> Result<u32, StateError> {
    let v = row.int(col)?;
    u32::try_from(v).map_err(|_| StateError::Corrupt(format!("jobs.{col} is {v}")))
}

/// A job from a row selected with [`JOB_COLS`].
fn job_from_row(row: &impl Cols) -> Result<Job, StateError> {
    let state = row.text("state")?;
    let selector = row
        .opt_text("selector")?
        .map(|s| parse_json::<BTreeMap<String, String>>(&s, "jobs.selector"))
        .transpose()?;
    let abort = match (
        row.opt_int("abort_percent")?,
        row.opt_int("abort_min_finished")?,
    ) {
        (Some(p), Some(m)) => Some(AbortRule {
            failure_percent: u8::try_from(p)
                .map_err(|_| StateError::Corrupt(format!("jobs.abort_percent is {p}")))?,
            min_finished: u32::try_from(m)
                .map_err(|_| StateError::Corrupt(format!("jobs.abort_min_finished is {m}")))?,
        }),
        _ => None,
    };
    Ok(Job {
        id: row.text("id")?,
        state: JobState::parse(&state)
            .ok_or_else(|| StateError::Corrupt(format!("unknown job state {state:?}")))?,
        command: JobCommand {
            name: row.text("command_name")?,
            params: parse_json(&row.text("params")?, "jobs.params")?,
        },
        selector,
        devices: u64_col(row, "n_total")?,
        rollout: Rollout {
            max_per_minute: u32_col(row, "max_per_minute")?,
            max_in_flight: u32_col(row, "max_in_flight")?,
        },
        abort,
        timeout_ms: u64_col(row, "timeout_ms")?,
        start_at: opt_u64_col(row, "start_at")?,
        reason: row.opt_text("reason")?,
        idempotency_key: row.opt_text("idempotency_key")?,
        created_at: u64_col(row, "created_at")?,
        started_at: opt_u64_col(row, "started_at")?,
        finished_at: opt_u64_col(row, "finished_at")?,
        updated_at: u64_col(row, "updated_at")?,
        launched: u64_col(row, "n_launched")?,
        counts: JobCounts {
            queued: u64_col(row, "n_queued")?,
            in_progress: u64_col(row, "n_in_progress")?,
            succeeded: u64_col(row, "n_succeeded")?,
            failed: u64_col(row, "n_failed")?,
            timed_out: u64_col(row, "n_timed_out")?,
            canceled: u64_col(row, "n_canceled")?,
        },
    })
}

/// A job's launch credit from a row having `rate_credit, rate_at`.
fn credit_from_row(row: &impl Cols) -> Result<RateCredit, StateError> {
    Ok(RateCredit {
        credit: u64_col(row, "rate_credit")?,
        at_ms: u64_col(row, "rate_at")?,
    })
}

/// A job's launch credit, on apply's handle.
fn load_credit(conn: &Connection, id: &str) -> Result<RateCredit, StateError> {
    let mut stmt = conn.prepare_cached("SELECT rate_credit, rate_at FROM jobs WHERE id = ?1")?;
    let mut rows = stmt.query([id])?;
    match rows.next()? {
        Some(row) => credit_from_row(row),
        None => Err(StateError::Corrupt(format!("job {id} vanished"))),
    }
}

/// An execution from a row of `job, device, status, command, updated_at`.
fn execution_from_row(row: &impl Cols) -> Result<Execution, StateError> {
    let status = row.text("status")?;
    Ok(Execution {
        job: row.text("job")?,
        device: row.text("device")?,
        status: ExecutionStatus::parse(&status)
            .ok_or_else(|| StateError::Corrupt(format!("unknown execution status {status:?}")))?,
        command: row.opt_text("command")?,
        updated_at: u64_col(row, "updated_at")?,
    })
}

/// Loads a job on apply's handle.
fn load_job(conn: &Connection, id: &str) -> Result<Option<Job>, StateError> {
    let sql = concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = ?1");
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query([id])?;
    rows.next()?.map(job_from_row).transpose()
}

fn must_job(conn: &Connection, id: &str) -> Result<Job, StateError> {
    load_job(conn, id)?.ok_or_else(|| StateError::Corrupt(format!("job {id} vanished")))
}

fn job_changed(conn: &Connection, id: &str, step: JobStep) -> Result<Applied, StateError> {
    let job = must_job(conn, id)?;
    Ok((
        OpResult::Job(Box::new(job.clone())),
        Some(Change::Job(step, Box::new(job))),
    ))
}

fn not_found_job(id: &str) -> Applied {
    (OpResult::NotFound(format!("job {id}")), None)
}

/// The fields of `Op::CreateJob`.
pub(super) struct NewJob<'a> {
    pub id: &'a str,
    pub command: &'a JobCommand,
    pub target: &'a JobTarget,
    pub rollout: &'a Rollout,
    pub abort: Option<&'a AbortRule>,
    pub timeout_ms: u64,
    pub start_at_ms: Option<u64>,
    pub idempotency_key: Option<&'a str>,
}

/// The most unknown device ids a refused job creation names.
const UNKNOWN_LISTED: usize = 10;

/// `CreateJob`.
pub(super) fn create_job(
    conn: &Connection,
    ts: u64,
    j: &NewJob<'_>,
) -> Result<Applied, StateError> {
    if let Some(key) = j.idempotency_key {
        let first: Option<String> =
            scalar(conn, "SELECT id FROM jobs WHERE idempotency_key = ?", [key])?;
        if let Some(first) = first {
            let job = must_job(conn, &first)?;
            return Ok((OpResult::JobExisting(Box::new(job)), None));
        }
    }
    if scalar::<i64>(conn, "SELECT 1 FROM jobs WHERE id = ?", [j.id])?.is_some() {
        return Ok((
            OpResult::Conflict(format!("job {} already exists", j.id)),
            None,
        ));
    }
    let active = scalar::<i64>(
        conn,
        "SELECT COUNT(*) FROM jobs WHERE state IN ('scheduled', 'in_progress')",
        [],
    )?
    .unwrap_or(0);
    if active >= MAX_ACTIVE_JOBS as i64 {
        return Ok((
            OpResult::Conflict(format!(
                "the group has {MAX_ACTIVE_JOBS} unfinished jobs, the most it may; wait for one \
                 to finish or cancel one"
            )),
            None,
        ));
    }
    let r = j.rollout;
    if !(1..=MAX_PER_MINUTE).contains(&r.max_per_minute)
        || !(1..=MAX_IN_FLIGHT).contains(&r.max_in_flight)
    {
        return Ok((
            OpResult::Conflict(format!(
                "a job's rollout needs max_per_minute 1 to {MAX_PER_MINUTE} and max_in_flight 1 \
                 to {MAX_IN_FLIGHT} ({} and {} given)",
                r.max_per_minute, r.max_in_flight
            )),
            None,
        ));
    }
    let (devices, selector) = match j.target {
        JobTarget::Devices(ids) => {
            let ids: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
            let mut unknown = Vec::new();
            for id in &ids {
                if scalar::<i64>(conn, "SELECT 1 FROM devices WHERE id = ?", [id])?.is_none() {
                    unknown.push(*id);
                }
            }
            if !unknown.is_empty() {
                let listed: Vec<&str> = unknown.iter().take(UNKNOWN_LISTED).copied().collect();
                return Ok((
                    OpResult::NotFound(format!(
                        "{} of the job's devices are not registered: {}{}",
                        unknown.len(),
                        listed.join(", "),
                        if unknown.len() > UNKNOWN_LISTED {
                            ", …"
                        } else {
                            ""
                        }
                    )),
                    None,
                ));
            }
            (ids, None)
        }
        JobTarget::Labels(labels) => {
            if labels.is_empty() {
                return Ok((
                    OpResult::Conflict("a job's label selector needs at least one label".into()),
                    None,
                ));
            }
            (BTreeSet::new(), Some(to_json_text(labels)?))
        }
    };
    let n = db_int(devices.len() as u64);
    exec(
        conn,
        "INSERT INTO jobs (id, state, command_name, params, selector, max_per_minute, \
         max_in_flight, abort_percent, abort_min_finished, timeout_ms, start_at, created_at, \
         updated_at, n_total, n_queued, idempotency_key) \
         VALUES (?, 'scheduled', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rusqlite::params![
            j.id,
            j.command.name,
            to_json_text(&j.command.params)?,
            selector,
            i64::from(j.rollout.max_per_minute),
            i64::from(j.rollout.max_in_flight),
            j.abort.map(|a| i64::from(a.failure_percent)),
            j.abort.map(|a| i64::from(a.min_finished)),
            db_int(j.timeout_ms),
            j.start_at_ms.map(db_int),
            db_int(ts),
            db_int(ts),
            n,
            n,
            j.idempotency_key,
        ],
    )?;
    insert_executions(conn, ts, j.id, devices.iter().copied())?;
    job_changed(conn, j.id, JobStep::Created)
}

fn insert_executions<'a>(
    conn: &Connection,
    ts: u64,
    job: &str,
    devices: impl Iterator<Item = &'a str>,
) -> Result<(), StateError> {
    for d in devices {
        exec(
            conn,
            "INSERT INTO job_executions (job, device, status, command, updated_at) \
             VALUES (?, ?, 'queued', NULL, ?)",
            (job, d, db_int(ts)),
        )?;
    }
    Ok(())
}

/// The devices having every label of `selector`, by id, at most `max`
/// (and whether there were more). One query, bounded: SQLite walks the
/// first label's index in device order and stops after `max + 1` rows, so
/// neither memory nor time grows with the devices past the bound.
pub(in crate::state) fn select_devices(
    conn: &Connection,
    selector: &BTreeMap<String, String>,
    max: usize,
) -> Result<(Vec<String>, bool), StateError> {
    let mut labels = selector.iter();
    let Some((k0, v0)) = labels.next() else {
        return Ok((Vec::new(), false));
    };
    let mut sql = String::from("SELECT l0.device FROM device_labels l0");
    let mut args: Vec<&str> = Vec::with_capacity(2 * selector.len());
    for (i, (k, v)) in labels.enumerate() {
        let t = i + 1;
        sql.push_str(&format!(
            " JOIN device_labels l{t} ON l{t}.device = l0.device AND l{t}.key = ? \
             AND l{t}.value = ?"
        ));
        args.push(k);
        args.push(v);
    }
    sql.push_str(" WHERE l0.key = ? AND l0.value = ? ORDER BY l0.device LIMIT ?");
    args.push(k0);
    args.push(v0);
    let limit = db_int(max as u64 + 1);
    let mut params: Vec<&dyn rusqlite::ToSql> =
        args.iter().map(|a| a as &dyn rusqlite::ToSql).collect();
    params.push(&limit);
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params.as_slice(), |r| r.get::<_, String>(0))?;
    let mut found = Vec::new();
    for d in rows {
        found.push(d?);
    }
    let more = found.len() > max;
    found.truncate(max);
    Ok((found, more))
}

/// `StartJob`.
pub(super) fn start_job(conn: &Connection, ts: u64, id: &str) -> Result<Applied, StateError> {
    let Some(job) = load_job(conn, id)? else {
        return Ok(not_found_job(id));
    };
    if job.state != JobState::Scheduled || job.start_at.is_some_and(|at| at > ts) {
        return Ok((OpResult::Ignored, None));
    }
    if let Some(selector) = &job.selector {
        let (devices, more) = select_devices(conn, selector, MAX_SELECTED_DEVICES)?;
        insert_executions(conn, ts, id, devices.iter().map(String::as_str))?;
        let n = db_int(devices.len() as u64);
        let reason = more.then(|| {
            format!(
                "the selector matched more than {MAX_SELECTED_DEVICES} devices; the job runs on \
                 the first {MAX_SELECTED_DEVICES} by id"
            )
        });
        exec(
            conn,
            "UPDATE jobs SET n_total = n_total + ?, n_queued = n_queued + ?, \
             reason = COALESCE(?, reason) WHERE id = ?",
            (n, n, reason, id),
        )?;
    }
    let credit = RateCredit::at_start(ts);
    exec(
        conn,
        "UPDATE jobs SET state = 'in_progress', started_at = ?, updated_at = ?, \
         rate_credit = ?, rate_at = ? WHERE id = ?",
        (
            db_int(ts),
            db_int(ts),
            db_int(credit.credit),
            db_int(credit.at_ms),
            id,
        ),
    )?;
    job_changed(conn, id, JobStep::Started)
}

/// Moves an execution from `from` to `to` (its command set, if given),
/// with the job's counters.
fn move_execution(
    conn: &Connection,
    ts: u64,
    job: &str,
    device: &str,
    from: ExecutionStatus,
    to: ExecutionStatus,
    command: Option<&str>,
) -> Result<(), StateError> {
    exec(
        conn,
        "UPDATE job_executions SET status = ?, command = COALESCE(?, command), updated_at = ? \
         WHERE job = ? AND device = ?",
        (to.as_str(), command, db_int(ts), job, device),
    )?;
    let (f, t) = (from.counter(), to.counter());
    exec(
        conn,
        &format!("UPDATE jobs SET {f} = {f} - 1, {t} = {t} + 1, updated_at = ? WHERE id = ?"),
        (db_int(ts), job),
    )?;
    Ok(())
}

/// `LaunchExecutions`: launches the named executions that are still
/// queued, in order, as far as the bounds allow at the entry's stamp.
pub(super) fn launch_executions(
    conn: &Connection,
    ts: u64,
    id: &str,
    devices: &[String],
) -> Result<Applied, StateError> {
    let Some(job) = load_job(conn, id)? else {
        return Ok(not_found_job(id));
    };
    if job.state != JobState::InProgress || job.abort.is_some_and(|a| a.tripped(&job.counts)) {
        return Ok((OpResult::Ignored, None));
    }
    let credit = load_credit(conn, id)?;
    let mut budget = launch_budget(&job, credit, ts);
    let mut seen = HashSet::new();
    let mut executions = Vec::new();
    for device in devices {
        if budget == 0 {
            break;
        }
        if !seen.insert(device.as_str()) {
            continue;
        }
        let status: Option<String> = scalar(
            conn,
            "SELECT status FROM job_executions WHERE job = ? AND device = ?",
            (id, device),
        )?;
        if status.as_deref() != Some(ExecutionStatus::Queued.as_str()) {
            continue;
        }
        let cid = command_id(id, device);
        let registered =
            scalar::<i64>(conn, "SELECT 1 FROM devices WHERE id = ?", [device])?.is_some();
        if !registered || load_command(conn, &cid)?.is_some() {
            // A device deleted has its executions canceled with it; a
            // command of this id can only be this execution's. Neither
            // happens; if it did, the execution must not run.
            move_execution(
                conn,
                ts,
                id,
                device,
                ExecutionStatus::Queued,
                ExecutionStatus::Canceled,
                None,
            )?;
            continue;
        }
        exec(
            conn,
            "INSERT INTO commands (id, device, name, params, status, output, idempotency_key, \
             issued_at, expires_at, updated_at) VALUES (?, ?, ?, ?, 'queued', NULL, ?, ?, ?, ?)",
            (
                &cid,
                device,
                &job.command.name,
                to_json_text(&job.command.params)?,
                None::<&str>,
                db_int(ts),
                db_int(ts.saturating_add(job.timeout_ms)),
                db_int(ts),
            ),
        )?;
        move_execution(
            conn,
            ts,
            id,
            device,
            ExecutionStatus::Queued,
            ExecutionStatus::InProgress,
            Some(&cid),
        )?;
        exec(
            conn,
            "UPDATE jobs SET n_launched = n_launched + 1 WHERE id = ?",
            [id],
        )?;
        executions.push(Launched {
            device: device.clone(),
            command: cid,
        });
        budget -= 1;
    }
    if executions.is_empty() {
        return Ok((OpResult::Ignored, None));
    }
    // Only what launched is paid for (a skipped device costs nothing).
    let credit = credit
        .refilled(&job.rollout, ts)
        .debited(executions.len() as u64);
    exec(
        conn,
        "UPDATE jobs SET rate_credit = ?, rate_at = ? WHERE id = ?",
        (db_int(credit.credit), db_int(credit.at_ms), id),
    )?;
    Ok((
        OpResult::Done,
        Some(Change::JobLaunched {
            job: id.to_string(),
            command: Arc::new(LaunchedCommand {
                name: job.command.name,
                params: job.command.params,
                issued_at: ts,
                expires_at: ts.saturating_add(job.timeout_ms),
            }),
            executions,
        }),
    ))
}

/// Cancels a job's queued executions.
fn cancel_queued(conn: &Connection, ts: u64, id: &str) -> Result<(), StateError> {
    exec(
        conn,
        "UPDATE job_executions SET status = 'canceled', updated_at = ? \
         WHERE job = ? AND status = 'queued'",
        (db_int(ts), id),
    )?;
    exec(
        conn,
        "UPDATE jobs SET n_canceled = n_canceled + n_queued, n_queued = 0 WHERE id = ?",
        [id],
    )?;
    Ok(())
}

/// Ends a job in `state` (`completed`, `aborted`, `canceled`).
fn finish(
    conn: &Connection,
    ts: u64,
    id: &str,
    state: JobState,
    reason: Option<String>,
) -> Result<(), StateError> {
    exec(
        conn,
        "UPDATE jobs SET state = ?, finished_at = ?, updated_at = ?, \
         reason = COALESCE(?, reason) WHERE id = ?",
        (state.as_str(), db_int(ts), db_int(ts), reason, id),
    )?;
    Ok(())
}

/// `CompleteJob` and `AbortJob`: the proposal says "end this job"; apply
/// decides how, from the replicated counters alone. An in-progress job
/// whose abort rule trips ends `aborted` (its queued executions canceled),
/// whichever of the two was proposed; else one with nothing queued or in
/// progress ends `completed`; anything else is ignored.
pub(super) fn end_job(conn: &Connection, ts: u64, id: &str) -> Result<Applied, StateError> {
    let Some(job) = load_job(conn, id)? else {
        return Ok(not_found_job(id));
    };
    if job.state != JobState::InProgress {
        return Ok((OpResult::Ignored, None));
    }
    if let Some(rule) = job.abort.filter(|a| a.tripped(&job.counts)) {
        let c = job.counts;
        let reason = format!(
            "{} of {} finished executions failed or timed out, more than {} %",
            c.failed + c.timed_out,
            c.failed + c.timed_out + c.succeeded,
            rule.failure_percent
        );
        cancel_queued(conn, ts, id)?;
        finish(conn, ts, id, JobState::Aborted, Some(reason))?;
        return job_changed(conn, id, JobStep::Aborted);
    }
    if job.counts.queued > 0 || job.counts.in_progress > 0 {
        return Ok((OpResult::Ignored, None));
    }
    finish(conn, ts, id, JobState::Completed, None)?;
    job_changed(conn, id, JobStep::Completed)
}

/// `CancelJob`.
pub(super) fn cancel_job(conn: &Connection, ts: u64, id: &str) -> Result<Applied, StateError> {
    let Some(job) = load_job(conn, id)? else {
        return Ok(not_found_job(id));
    };
    if job.state.is_terminal() {
        return Ok((
            OpResult::Conflict(format!("job {id} is already {}", job.state.as_str())),
            None,
        ));
    }
    cancel_queued(conn, ts, id)?;
    finish(conn, ts, id, JobState::Canceled, None)?;
    job_changed(conn, id, JobStep::Canceled)
}

/// `PruneJobs`: deletes the finished jobs that finished before
/// `finished_before`, oldest first, with their executions, within
/// [`PRUNE_MAX_JOBS`] jobs and [`PRUNE_MAX_EXECUTIONS`] executions. A job
/// whose executions do not all fit is left with the rest (deleted by a
/// later entry). Reads only the state: every member deletes the same rows.
pub(super) fn prune_jobs(conn: &Connection, finished_before: u64) -> Result<Applied, StateError> {
    prune_within(conn, finished_before, PRUNE_MAX_JOBS, PRUNE_MAX_EXECUTIONS)
}

/// [`prune_jobs`] within `max_jobs` jobs and `max_executions` executions.
pub(in crate::state) fn prune_within(
    conn: &Connection,
    finished_before: u64,
    max_jobs: usize,
    max_executions: usize,
) -> Result<Applied, StateError> {
    let ids: Vec<String> = {
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM jobs WHERE state IN ('completed', 'canceled', 'aborted') \
             AND finished_at IS NOT NULL AND finished_at < ? \
             ORDER BY finished_at, id LIMIT ?",
        )?;
        let rows = stmt.query_map((db_int(finished_before), db_int(max_jobs as u64)), |r| {
            r.get::<_, String>(0)
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut budget = max_executions;
    let mut pruned = Vec::new();
    let mut executions = 0;
    for id in ids {
        let deleted = exec(
            conn,
            "DELETE FROM job_executions WHERE job = ?1 AND device IN \
             (SELECT device FROM job_executions WHERE job = ?1 ORDER BY device LIMIT ?2)",
            (id.as_str(), db_int(budget as u64)),
        )?;
        executions += deleted;
        budget -= deleted;
        let left: Option<i64> = scalar(
            conn,
            "SELECT 1 FROM job_executions WHERE job = ? LIMIT 1",
            [id.as_str()],
        )?;
        if left.is_some() {
            break;
        }
        exec(conn, "DELETE FROM jobs WHERE id = ?", [id.as_str()])?;
        pruned.push(id);
        if budget == 0 {
            break;
        }
    }
    if pruned.is_empty() && executions == 0 {
        return Ok((OpResult::Ignored, None));
    }
    Ok((OpResult::Done, Some(Change::JobsPruned { jobs: pruned })))
}

/// A command reached the terminal `status`: if it runs a job's
/// execution, the execution follows it (`expired` is `timed_out`).
pub(super) fn command_finished(
    conn: &Connection,
    ts: u64,
    cid: &str,
    status: CommandStatus,
) -> Result<(), StateError> {
    if !cid.starts_with("jc-") {
        return Ok(());
    }
    let row: Option<(String, String, String)> = conn
        .prepare_cached("SELECT job, device, status FROM job_executions WHERE command = ?")?
        .query_row([cid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    let Some((job, device, current)) = row else {
        return Ok(());
    };
    if current != ExecutionStatus::InProgress.as_str() {
        return Ok(());
    }
    let to = match status {
        CommandStatus::Succeeded => ExecutionStatus::Succeeded,
        CommandStatus::Failed => ExecutionStatus::Failed,
        CommandStatus::Expired => ExecutionStatus::TimedOut,
        CommandStatus::Canceled => ExecutionStatus::Canceled,
        _ => return Ok(()),
    };
    move_execution(
        conn,
        ts,
        &job,
        &device,
        ExecutionStatus::InProgress,
        to,
        None,
    )
}

/// A device was deleted: its unfinished executions are canceled.
pub(super) fn device_deleted(conn: &Connection, ts: u64, device: &str) -> Result<(), StateError> {
    let rows: Vec<(String, String)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT job, status FROM job_executions \
             WHERE device = ? AND status IN ('queued', 'in_progress') ORDER BY job",
        )?;
        let rows = stmt.query_map([device], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (job, status) in rows {
        let from = ExecutionStatus::parse(&status)
            .ok_or_else(|| StateError::Corrupt(format!("unknown execution status {status:?}")))?;
        move_execution(
            conn,
            ts,
            &job,
            device,
            from,
            ExecutionStatus::Canceled,
            None,
        )?;
    }
    Ok(())
}

impl StateDb {
    /// A job.
    pub async fn job(&self, id: &str) -> Result<Option<Job>, StateError> {
        let pool = self.pool.read().await;
        let row = sqlx::query(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&*pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Jobs, optionally in one state, by id, one page.
    pub async fn list_jobs(
        &self,
        state: Option<JobState>,
        page: &Page,
    ) -> Result<Vec<Job>, StateError> {
        let mut qb: QueryBuilder<'_, Sqlite> =
            QueryBuilder::new(format!("SELECT {JOB_COLS} FROM jobs WHERE 1 = 1"));
        if let Some(state) = state {
            qb.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(after) = &page.after {
            qb.push(" AND id > ").push_bind(after.as_str());
        }
        qb.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(page.limit));
        let pool = self.pool.read().await;
        let rows = qb.build().fetch_all(&*pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// A job's executions, optionally of one status, by device id, one
    /// page (`after` is a device id).
    pub async fn list_executions(
        &self,
        job: &str,
        status: Option<ExecutionStatus>,
        page: &Page,
    ) -> Result<Vec<Execution>, StateError> {
        let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
            "SELECT job, device, status, command, updated_at FROM job_executions WHERE job = ",
        );
        qb.push_bind(job);
        if let Some(status) = status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(after) = &page.after {
            qb.push(" AND device > ").push_bind(after.as_str());
        }
        qb.push(" ORDER BY device LIMIT ")
            .push_bind(i64::from(page.limit));
        let pool = self.pool.read().await;
        let rows = qb.build().fetch_all(&*pool).await?;
        rows.iter().map(execution_from_row).collect()
    }

    /// The jobs not finished (scheduled or in progress), by id, each with
    /// its launch credit.
    pub async fn active_jobs(&self) -> Result<Vec<(Job, RateCredit)>, StateError> {
        let pool = self.pool.read().await;
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLS}, rate_credit, rate_at FROM jobs \
             WHERE state IN ('scheduled', 'in_progress') ORDER BY id LIMIT ?"
        ))
        .bind(db_int(2 * MAX_ACTIVE_JOBS as u64))
        .fetch_all(&*pool)
        .await?;
        rows.iter()
            .map(|r| Ok((job_from_row(r)?, credit_from_row(r)?)))
            .collect()
    }

    /// Whether a finished job finished before `finished_before` (ms since
    /// the epoch): one [`crate::ops::Op::PruneJobs`] would delete something.
    pub async fn prunable_jobs(&self, finished_before: u64) -> Result<bool, StateError> {
        let pool = self.pool.read().await;
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM jobs WHERE state IN ('completed', 'canceled', 'aborted') \
             AND finished_at < ? LIMIT 1",
        )
        .bind(db_int(finished_before))
        .fetch_optional(&*pool)
        .await?;
        Ok(found.is_some())
    }

    /// The first `limit` devices (by id) whose execution of `job` is queued.
    pub async fn queued_devices(&self, job: &str, limit: u32) -> Result<Vec<String>, StateError> {
        let pool = self.pool.read().await;
        Ok(sqlx::query_scalar(
            "SELECT device FROM job_executions WHERE job = ? AND status = 'queued' \
             ORDER BY device LIMIT ?",
        )
        .bind(job)
        .bind(i64::from(limit))
        .fetch_all(&*pool)
        .await?)
    }
}
