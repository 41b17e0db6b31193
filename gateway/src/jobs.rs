//! Jobs: one command rolled out over many devices at a controlled rate,
//! stopped when too many fail (docs/ARCHITECTURE.md, "Jobs").
//!
//! The domain types the operations carry and the API returns, the rules
//! both apply and the leader's driver evaluate ([`RateCredit`],
//! [`AbortRule::tripped`]) — pure functions of replicated values, so every
//! member decides alike — and the driver itself ([`drive`]): the leader's
//! task that starts jobs, launches executions within their bounds, and
//! completes or aborts them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use coordinator::node::Node;
use coordinator::raft::Role as RaftRole;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::ops::{Op, OpResult};
use crate::shared::{now_ms, propose};
use crate::state::{Change, StateDb};

/// The most devices a job's list of device ids names.
pub const MAX_JOB_DEVICES: usize = 10_000;
/// The most devices a label selector brings into a job when it starts:
/// of a selector matching more, the job runs on the first ones by id (its
/// `reason` says so).
pub const MAX_SELECTED_DEVICES: usize = 100_000;
/// The most labels a selector has.
pub const MAX_SELECTOR_LABELS: usize = 16;
/// The most jobs not yet finished (scheduled or in progress) a group
/// holds; creating one more is refused (409) until one finishes.
pub const MAX_ACTIVE_JOBS: usize = 100;
/// The most executions one [`Op::LaunchExecutions`] launches.
pub const MAX_LAUNCH: usize = 500;
/// Most finished jobs one [`Op::PruneJobs`] deletes.
pub const PRUNE_MAX_JOBS: usize = 100;
/// Most executions one [`Op::PruneJobs`] deletes (a job with more is
/// deleted over several entries).
pub const PRUNE_MAX_EXECUTIONS: usize = 10_000;
/// How long finished jobs are kept by default (7 days).
pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The highest `rollout.max_per_minute`.
pub const MAX_PER_MINUTE: u32 = 600_000;
/// The highest `rollout.max_in_flight`.
pub const MAX_IN_FLIGHT: u32 = 10_000;
/// Default `rollout.max_per_minute`.
pub const DEFAULT_PER_MINUTE: u32 = 600;
/// Default `rollout.max_in_flight`.
pub const DEFAULT_IN_FLIGHT: u32 = 100;
/// Default `abort.min_finished`.
pub const DEFAULT_MIN_FINISHED: u32 = 10;

/// The command a job sends to each device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name":"update-firmware","params":{"version":"2.4.1"}}))]
pub struct JobCommand {
    /// Command name (1–128 characters).
    #[schema(value_type = crate::api::schemas::CommandName)]
    pub name: String,
    /// Parameters, any JSON (default `{}`).
    #[serde(default)]
    #[schema(value_type = crate::api::schemas::JsonValue)]
    pub params: Value,
}

/// Which devices a job targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobTarget {
    /// These devices (1 to [`MAX_JOB_DEVICES`], each registered when the
    /// job is created).
    Devices(Vec<String>),
    /// The devices having every one of these labels when the job starts.
    Labels(BTreeMap<String, String>),
}

/// How fast a job launches its executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"max_per_minute":600,"max_in_flight":100}))]
pub struct Rollout {
    /// At most this many executions launched a minute (1 to 600000;
    /// default 600): one at once, then at this rate, with at most one
    /// second's worth (and at least one) saved up while launching stalls.
    #[serde(default = "default_per_minute")]
    #[schema(minimum = 1, maximum = 600_000)]
    pub max_per_minute: u32,
    /// At most this many executions launched and not finished at once
    /// (1 to 10000; default 100).
    #[serde(default = "default_in_flight")]
    #[schema(minimum = 1, maximum = 10_000)]
    pub max_in_flight: u32,
}

fn default_per_minute() -> u32 {
    DEFAULT_PER_MINUTE
}

fn default_in_flight() -> u32 {
    DEFAULT_IN_FLIGHT
}

fn default_min_finished() -> u32 {
    DEFAULT_MIN_FINISHED
}

impl Default for Rollout {
    fn default() -> Rollout {
        Rollout {
            max_per_minute: DEFAULT_PER_MINUTE,
            max_in_flight: DEFAULT_IN_FLIGHT,
        }
    }
}

/// How much launch credit one launch costs: credit is counted in
/// 1/60,000 of a launch, so a rate of `max_per_minute` adds exactly
/// `max_per_minute` units a millisecond (integers, no rounding).
pub const CREDIT_PER_LAUNCH: u64 = 60_000;

impl Rollout {
    /// The most launch credit a job holds: one second's worth at its rate,
    /// and at least one launch. After a stall (no quorum, every in-flight
    /// slot held by slow devices) a job launches at most this many at
    /// once, then goes on at its rate.
    pub fn credit_cap(&self) -> u64 {
        (u64::from(self.max_per_minute) * 1000).max(CREDIT_PER_LAUNCH)
    }
}

/// A job's launch credit: a token bucket held in the replicated job row,
/// refilled at `max_per_minute` from the entries' stamps (never a local
/// clock) up to [`Rollout::credit_cap`], and debited by each launch at
/// apply time, so every member computes the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateCredit {
    /// Credit, in [`CREDIT_PER_LAUNCH`]ths of a launch.
    pub credit: u64,
    /// The entry stamp it was computed at (ms since the epoch).
    pub at_ms: u64,
}

impl RateCredit {
    /// A job's credit when it starts at `ts_ms`: one launch, at once.
    pub fn at_start(ts_ms: u64) -> RateCredit {
        RateCredit {
            credit: CREDIT_PER_LAUNCH,
            at_ms: ts_ms,
        }
    }

    /// The credit at `now_ms`: `max_per_minute` units for each millisecond
    /// since `at_ms`, capped at [`Rollout::credit_cap`]. A stamp at or
    /// before `at_ms` (another leader's clock behind) adds nothing and
    /// leaves `at_ms` where it was.
    pub fn refilled(self, rollout: &Rollout, now_ms: u64) -> RateCredit {
        if now_ms <= self.at_ms {
            return self;
        }
        let gained = u64::from(rollout.max_per_minute).saturating_mul(now_ms - self.at_ms);
        RateCredit {
            credit: self
                .credit
                .saturating_add(gained)
                .min(rollout.credit_cap().max(self.credit)),
            at_ms: now_ms,
        }
    }

    /// How many launches the credit pays for.
    pub fn launches(&self) -> u64 {
        self.credit / CREDIT_PER_LAUNCH
    }

    /// The credit after `n` launches.
    pub fn debited(self, n: u64) -> RateCredit {
        RateCredit {
            credit: self
                .credit
                .saturating_sub(n.saturating_mul(CREDIT_PER_LAUNCH)),
            ..self
        }
    }
}

/// When a job stops launching because too many executions fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"failure_percent":20,"min_finished":10}))]
pub struct AbortRule {
    /// Abort when failed and timed-out executions are more than this
    /// percentage of the finished ones (0 to 100).
    #[schema(minimum = 0, maximum = 100)]
    pub failure_percent: u8,
    /// ... once at least this many executions finished (1 or more;
    /// default 10).
    #[serde(default = "default_min_finished")]
    #[schema(minimum = 1)]
    pub min_finished: u32,
}

impl AbortRule {
    /// Whether the rule says abort: at least `min_finished` executions
    /// finished (succeeded, failed or timed out) and the failed and timed
    /// out among them are more than `failure_percent` % of them.
    pub fn tripped(&self, c: &JobCounts) -> bool {
        let bad = u128::from(c.failed) + u128::from(c.timed_out);
        let finished = bad + u128::from(c.succeeded);
        finished >= u128::from(self.min_finished.max(1))
            && bad * 100 > u128::from(self.failure_percent) * finished
    }
}

/// A job's lifecycle state.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Created; waits for its start time (and for the leader to start it).
    Scheduled,
    /// Started: its executions are launched within the rollout bounds.
    InProgress,
    /// Every execution finished.
    Completed,
    /// An operator canceled it.
    Canceled,
    /// Its abort rule tripped.
    Aborted,
}

impl JobState {
    /// All states.
    pub const ALL: [JobState; 5] = [
        JobState::Scheduled,
        JobState::InProgress,
        JobState::Completed,
        JobState::Canceled,
        JobState::Aborted,
    ];

    /// The stored and API name.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::InProgress => "in_progress",
            JobState::Completed => "completed",
            JobState::Canceled => "canceled",
            JobState::Aborted => "aborted",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|j| j.as_str() == s)
    }

    /// Whether the job is over (launches nothing more).
    pub fn is_terminal(&self) -> bool {
        !matches!(self, JobState::Scheduled | JobState::InProgress)
    }
}

/// The state of one device's execution of a job.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    /// Not launched yet.
    Queued,
    /// Its command was issued and has not finished.
    InProgress,
    /// The device reported success.
    Succeeded,
    /// The device reported failure.
    Failed,
    /// The command expired (the job's `timeout_ms` passed).
    TimedOut,
    /// Canceled before it finished: the job was canceled or aborted while
    /// it was queued, its command was canceled, or its device deleted.
    Canceled,
}

impl ExecutionStatus {
    /// All states.
    pub const ALL: [ExecutionStatus; 6] = [
        ExecutionStatus::Queued,
        ExecutionStatus::InProgress,
        ExecutionStatus::Succeeded,
        ExecutionStatus::Failed,
        ExecutionStatus::TimedOut,
        ExecutionStatus::Canceled,
    ];

    /// The stored and API name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ExecutionStatus::Queued => "queued",
            ExecutionStatus::InProgress => "in_progress",
            ExecutionStatus::Succeeded => "succeeded",
            ExecutionStatus::Failed => "failed",
            ExecutionStatus::TimedOut => "timed_out",
            ExecutionStatus::Canceled => "canceled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<ExecutionStatus> {
        ExecutionStatus::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// The counter column of the `jobs` row that counts this status.
    pub(crate) fn counter(&self) -> &'static str {
        match self {
            ExecutionStatus::Queued => "n_queued",
            ExecutionStatus::InProgress => "n_in_progress",
            ExecutionStatus::Succeeded => "n_succeeded",
            ExecutionStatus::Failed => "n_failed",
            ExecutionStatus::TimedOut => "n_timed_out",
            ExecutionStatus::Canceled => "n_canceled",
        }
    }

    /// Whether it is over.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, ExecutionStatus::Queued | ExecutionStatus::InProgress)
    }
}

/// How many of a job's executions are in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"queued":120,"in_progress":100,"succeeded":270,"failed":10,
    "timed_out":0,"canceled":0}))]
pub struct JobCounts {
    /// Not launched yet.
    pub queued: u64,
    /// Launched, not finished.
    pub in_progress: u64,
    /// Succeeded.
    pub succeeded: u64,
    /// Failed.
    pub failed: u64,
    /// Timed out.
    pub timed_out: u64,
    /// Canceled.
    pub canceled: u64,
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id":"j-019ac1e2f3a4b5c6d7e8f9a0b1c2","state":"in_progress",
    "command":{"name":"update-firmware","params":{"version":"2.4.1"}},
    "selector":{"site":"north"},"devices":500,
    "rollout":{"max_per_minute":600,"max_in_flight":100},
    "abort":{"failure_percent":20,"min_finished":10},"timeout_ms":600000,"start_at":null,
    "reason":null,"idempotency_key":null,"created_at":1764144000000u64,"started_at":1764144000250u64,
    "finished_at":null,"updated_at":1764144030000u64,"launched":380,
    "counts":{"queued":120,"in_progress":100,"succeeded":270,"failed":10,"timed_out":0,
    "canceled":0}}))]
pub struct Job {
    /// Job id.
    pub id: String,
    /// Lifecycle state.
    pub state: JobState,
    /// The command each device gets.
    pub command: JobCommand,
    /// The label selector it was created with; `null` for a list of
    /// device ids.
    pub selector: Option<BTreeMap<String, String>>,
    /// How many devices it has executions for (for a selector, 0 until it
    /// starts).
    pub devices: u64,
    /// The rollout bounds.
    pub rollout: Rollout,
    /// The abort rule, if any.
    pub abort: Option<AbortRule>,
    /// Each device's command's time to live (ms): an execution whose
    /// command has not finished by then is `timed_out`.
    pub timeout_ms: u64,
    /// When it starts (ms since the epoch); `null`: at once.
    pub start_at: Option<u64>,
    /// Why it was aborted (which executions failed), or that its selector
    /// matched more than [`MAX_SELECTED_DEVICES`] devices and it runs on
    /// the first ones; `null` otherwise (a cancel sets none).
    pub reason: Option<String>,
    /// The client's idempotency key, if it was created with one.
    pub idempotency_key: Option<String>,
    /// Creation time (ms since the epoch).
    pub created_at: u64,
    /// Start time (ms since the epoch), once started.
    pub started_at: Option<u64>,
    /// When it completed, was canceled or aborted (ms since the epoch).
    pub finished_at: Option<u64>,
    /// Last change (ms since the epoch).
    pub updated_at: u64,
    /// How many executions were launched.
    pub launched: u64,
    /// Executions per status.
    pub counts: JobCounts,
}

/// One device's execution of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"job":"j-019ac1e2f3a4b5c6d7e8f9a0b1c2","device":"pump-7",
    "status":"succeeded","command":"jc-5d41402abc4b2a76b9719d911017c592",
    "updated_at":1764144000900u64}))]
pub struct Execution {
    /// Job id.
    pub job: String,
    /// Device id.
    pub device: String,
    /// Its state.
    pub status: ExecutionStatus,
    /// The id of the command it launched, once launched
    /// (`GET /v1/commands/{cid}` has the output).
    pub command: Option<String>,
    /// Last change (ms since the epoch).
    pub updated_at: u64,
}

/// The id of the command that runs job `job` on `device`: derived from
/// the two alone (`jc-` and 32 hex digits of their SHA-256), so every
/// proposal to launch it names the same command and it is issued once.
pub fn command_id(job: &str, device: &str) -> String {
    let mut h = Sha256::new();
    h.update(job.as_bytes());
    h.update([0]);
    h.update(device.as_bytes());
    let digest = h.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("jc-{hex}")
}

/// How long the driver sleeps between looks when nothing wakes it.
const DRIVE_TICK: Duration = Duration::from_millis(250);

/// The leader's rollout driver: while this gateway leads, it reads the
/// replicated state of the unfinished jobs (never anything local) and
/// proposes what moves them on — [`Op::StartJob`] once a job's start time
/// has come, [`Op::AbortJob`] when its abort rule trips,
/// [`Op::CompleteJob`] when every execution finished, and otherwise
/// [`Op::LaunchExecutions`] for its next queued devices (by id) within
/// the bounds. Apply checks every one of these again, so a proposal that
/// is stale, duplicated, or made by a deposed leader changes nothing it
/// should not. Wakes on job and command changes, and every 250 ms.
///
/// At most once every [`PRUNE_EVERY`] it also proposes [`Op::PruneJobs`]
/// when a finished job is older than `retention` (zero: never): every
/// member deletes the same jobs.
pub async fn drive(
    node: Node<crate::ops::OpResult>,
    db: Arc<StateDb>,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_prune: Option<tokio::time::Instant> = None;
    let mut changes = db.changes();
    let mut every = tokio::time::interval(DRIVE_TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
            ch = changes.recv() => match ch {
                Ok(ch) if wakes(&ch) => {}
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
        }
        // One pass serves every change that came meanwhile (results
        // arrive in bursts; a pass reads every unfinished job anyway).
        loop {
            match changes.try_recv() {
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
        if node.status().raft.role != RaftRole::Leader {
            continue;
        }
        if !retention.is_zero() && last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(tokio::time::Instant::now());
            let prune = prune(&node, &db, retention);
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                r = prune => if let Err(e) = r {
                    tracing::debug!(error = %e, "pruning finished jobs");
                },
            }
        }
        let jobs = match db.active_jobs().await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, "reading the unfinished jobs");
                continue;
            }
        };
        let (node, db) = (&node, &*db);
        let go_on = pass(jobs, &mut shutdown, |job, credit| async move {
            // Led no more (a proposal would be forwarded): the next
            // leader's driver moves the rest on.
            if node.status().raft.role != RaftRole::Leader {
                return Ok(());
            }
            step(node, db, &job, credit).await
        })
        .await;
        if !go_on {
            return;
        }
    }
}

/// An error of one job's step.
type StepError = Box<dyn std::error::Error + Send + Sync>;

/// How often the leader's driver looks for finished jobs to prune.
pub const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Proposes [`Op::PruneJobs`] if a job finished more than `retention` ago.
async fn prune(node: &Node<OpResult>, db: &StateDb, retention: Duration) -> Result<(), StepError> {
    let before = now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
    if db.prunable_jobs(before).await? {
        propose(
            node,
            Op::PruneJobs {
                finished_before: before,
            },
        )
        .await?;
    }
    Ok(())
}

/// One pass of the driver: `step` for each job in order, each raced
/// against `shutdown` (a proposal may wait up to the write timeout, and a
/// pass may hold [`MAX_ACTIVE_JOBS`] of them one after another), and
/// nothing started once it is set. `false` when the gateway stops (or its
/// shutdown sender is gone): the driver returns at once.
async fn pass<F, Fut>(
    jobs: Vec<(Job, RateCredit)>,
    shutdown: &mut watch::Receiver<bool>,
    mut step: F,
) -> bool
where
    F: FnMut(Job, RateCredit) -> Fut,
    Fut: std::future::Future<Output = Result<(), StepError>>,
{
    for (job, credit) in jobs {
        if *shutdown.borrow() {
            return false;
        }
        let id = job.id.clone();
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return false,
            r = step(job, credit) => if let Err(e) = r {
                tracing::debug!(job = id, error = %e, "moving a job on");
            },
        }
    }
    true
}

/// Whether a change may let a job move on.
fn wakes(ch: &Change) -> bool {
    match ch {
        Change::Job(..) | Change::JobLaunched { .. } => true,
        Change::Command(_, c) => c.status.is_terminal() && c.id.starts_with("jc-"),
        Change::CommandsExpired(cmds) => cmds.iter().any(|c| c.id.starts_with("jc-")),
        _ => false,
    }
}

/// What the driver proposes for `job` now, if anything.
pub fn next_op(
    job: &Job,
    credit: RateCredit,
    now: u64,
    queued: impl FnOnce(usize) -> Vec<String>,
) -> Option<Op> {
    match job.state {
        JobState::Scheduled => {
            (job.start_at.is_none_or(|at| at <= now)).then(|| Op::StartJob { id: job.id.clone() })
        }
        JobState::InProgress => {
            if job.abort.is_some_and(|a| a.tripped(&job.counts)) {
                return Some(Op::AbortJob { id: job.id.clone() });
            }
            if job.counts.queued == 0 && job.counts.in_progress == 0 {
                return Some(Op::CompleteJob { id: job.id.clone() });
            }
            let budget = launch_budget(job, credit, now);
            if budget == 0 || job.counts.queued == 0 {
                return None;
            }
            let devices = queued(budget);
            (!devices.is_empty()).then(|| Op::LaunchExecutions {
                job: job.id.clone(),
                devices,
            })
        }
        _ => None,
    }
}

/// How many executions of `job`, whose launch credit is `credit`, may be
/// launched at `now`: within `max_in_flight` and the credit refilled to
/// `now`, at most [`MAX_LAUNCH`].
pub fn launch_budget(job: &Job, credit: RateCredit, now: u64) -> usize {
    if job.started_at.is_none() {
        return 0;
    }
    let flight = u64::from(job.rollout.max_in_flight).saturating_sub(job.counts.in_progress);
    let rate = credit.refilled(&job.rollout, now).launches();
    let n = flight.min(rate).min(job.counts.queued);
    usize::try_from(n).unwrap_or(MAX_LAUNCH).min(MAX_LAUNCH)
}

async fn step(
    node: &Node<OpResult>,
    db: &StateDb,
    job: &Job,
    credit: RateCredit,
) -> Result<(), StepError> {
    let now = now_ms();
    let budget = launch_budget(job, credit, now);
    let queued = if job.state == JobState::InProgress && budget > 0 {
        db.queued_devices(&job.id, budget as u32).await?
    } else {
        Vec::new()
    };
    if let Some(op) = next_op(job, credit, now, |n| queued.into_iter().take(n).collect()) {
        propose(node, op).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(succeeded: u64, failed: u64, timed_out: u64) -> JobCounts {
        JobCounts {
            succeeded,
            failed,
            timed_out,
            ..JobCounts::default()
        }
    }

    #[test]
    fn the_abort_rule_trips_above_the_threshold_once_enough_finished() {
        let rule = AbortRule {
            failure_percent: 20,
            min_finished: 10,
        };
        // Below min_finished: never, however bad.
        assert!(!rule.tripped(&counts(0, 9, 0)));
        // At the threshold (2 of 10 = 20 %): not above it.
        assert!(!rule.tripped(&counts(8, 1, 1)));
        // Above it: timed out counts as failed.
        assert!(rule.tripped(&counts(7, 2, 1)));
        assert!(rule.tripped(&counts(79, 21, 0)));
        assert!(!rule.tripped(&counts(80, 20, 0)));
        // 0 %: any failure aborts; 100 %: nothing does.
        let zero = AbortRule {
            failure_percent: 0,
            min_finished: 1,
        };
        assert!(!zero.tripped(&counts(5, 0, 0)));
        assert!(zero.tripped(&counts(5, 0, 1)));
        let all = AbortRule {
            failure_percent: 100,
            min_finished: 1,
        };
        assert!(!all.tripped(&counts(0, 50, 50)));
    }

    #[test]
    fn the_credit_allows_one_at_once_then_the_rate_saving_up_one_second_at_most() {
        let r = Rollout {
            max_per_minute: 60,
            max_in_flight: 10,
        };
        let start = RateCredit::at_start(1000);
        assert_eq!(start.refilled(&r, 1000).launches(), 1);
        let spent = start.debited(1);
        assert_eq!(spent.refilled(&r, 1999).launches(), 0);
        assert_eq!(spent.refilled(&r, 2000).launches(), 1);
        // A minute of stall saves up one second's worth: one launch here.
        assert_eq!(spent.refilled(&r, 61_000).launches(), 1);
        // A clock behind the stamp adds nothing and does not move it back.
        assert_eq!(spent.refilled(&r, 500), spent);
        // 6,000 a minute: 100 a second is the most saved up.
        let fast = Rollout {
            max_per_minute: 6000,
            max_in_flight: 1,
        };
        let c = RateCredit::at_start(0).debited(1);
        assert_eq!(c.refilled(&fast, 10).launches(), 1);
        assert_eq!(c.refilled(&fast, 505).launches(), 50);
        assert_eq!(c.refilled(&fast, 3_600_000).launches(), 100);
        // Refilled in two steps or one: the same credit.
        assert_eq!(
            c.refilled(&fast, 123).refilled(&fast, 456),
            c.refilled(&fast, 456)
        );
        let fastest = Rollout {
            max_per_minute: MAX_PER_MINUTE,
            max_in_flight: 1,
        };
        assert_eq!(c.refilled(&fastest, u64::MAX).launches(), 10_000);
        assert_eq!(c.debited(u64::MAX).credit, 0);
    }

    fn a_job(n: usize) -> Job {
        Job {
            id: format!("j-{n}"),
            state: JobState::InProgress,
            command: JobCommand {
                name: "reboot".into(),
                params: serde_json::json!({}),
            },
            selector: None,
            devices: 1,
            rollout: Rollout::default(),
            abort: None,
            timeout_ms: 1000,
            start_at: None,
            reason: None,
            idempotency_key: None,
            created_at: 1,
            started_at: Some(1),
            finished_at: None,
            updated_at: 1,
            launched: 0,
            counts: JobCounts::default(),
        }
    }

    #[tokio::test]
    async fn a_pass_gives_up_a_hanging_proposal_and_the_rest_when_the_gateway_stops() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let jobs: Vec<_> = (0..MAX_ACTIVE_JOBS)
            .map(|n| (a_job(n), RateCredit::default()))
            .collect();
        // Stopped before the pass: no job is stepped.
        let (tx, mut rx) = watch::channel(true);
        let stepped = Arc::new(AtomicUsize::new(0));
        let s = stepped.clone();
        let go_on = pass(jobs.clone(), &mut rx, |_, _| {
            s.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(()))
        })
        .await;
        assert!(!go_on);
        assert_eq!(stepped.load(Ordering::SeqCst), 0);
        // Every proposal hangs (no quorum, a long write timeout): stopping
        // ends the pass in the first one.
        tx.send_replace(false);
        let s = stepped.clone();
        let task = tokio::spawn(async move {
            pass(jobs, &mut rx, |_, _| {
                s.fetch_add(1, Ordering::SeqCst);
                std::future::pending()
            })
            .await
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stepped.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no step began");
            tokio::task::yield_now().await;
        }
        tx.send_replace(true);
        let go_on = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the pass ended when the gateway stopped")
            .expect("join");
        assert!(!go_on);
        assert_eq!(stepped.load(Ordering::SeqCst), 1);
        // Steps that finish: every job, and the driver goes on.
        let (_tx, mut rx) = watch::channel(false);
        let jobs: Vec<_> = (0..3).map(|n| (a_job(n), RateCredit::default())).collect();
        let s = stepped.clone();
        assert!(
            pass(jobs, &mut rx, |_, _| {
                s.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Err::<(), StepError>("refused".into()))
            })
            .await
        );
        assert_eq!(stepped.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn command_ids_are_valid_ids_derived_from_job_and_device_alone() {
        let a = command_id("j-1", "pump-7");
        assert_eq!(a, command_id("j-1", "pump-7"));
        assert_ne!(a, command_id("j-1", "pump-8"));
        assert_ne!(a, command_id("j-2", "pump-7"));
        // No ambiguity between (job, device) splits.
        assert_ne!(command_id("j-1a", "b"), command_id("j-1", "ab"));
        assert!(crate::shared::id_ok(&a) && a.len() == 35, "{a}");
    }
}
