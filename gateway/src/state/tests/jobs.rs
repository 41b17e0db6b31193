//! Jobs in the state machine: every transition, the rollout bounds and the
//! abort rule at apply time, exactly-once launches, cancel.

use super::*;
use crate::jobs::{
    AbortRule, ExecutionStatus, Job, JobCommand, JobState, JobTarget, Rollout, command_id,
};

fn create(id: &str, target: JobTarget, rollout: Rollout, abort: Option<AbortRule>) -> Op {
    Op::CreateJob {
        id: id.into(),
        command: JobCommand {
            name: "update".into(),
            params: json!({"v": 2}),
        },
        target,
        rollout,
        abort,
        timeout_ms: 60_000,
        start_at_ms: None,
        idempotency_key: None,
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("d{i:02}")).collect()
}

fn rollout(max_per_minute: u32, max_in_flight: u32) -> Rollout {
    Rollout {
        max_per_minute,
        max_in_flight,
    }
}

fn job_of(r: OpResult) -> Job {
    match r {
        OpResult::Job(j) => *j,
        other => panic!("expected a job, got {other:?}"),
    }
}

fn launch(job: &str, devices: &[String]) -> Op {
    Op::LaunchExecutions {
        job: job.into(),
        devices: devices.to_vec(),
    }
}

fn result(job: &str, device: &str, ok: bool) -> Op {
    Op::CommandResult {
        cid: command_id(job, device),
        succeeded: ok,
        output: json!({}),
    }
}

async fn job(db: &Db, id: &str) -> Job {
    db.db.job(id).await.unwrap().unwrap()
}

async fn statuses(db: &Db, id: &str) -> Vec<(String, ExecutionStatus)> {
    db.db
        .list_executions(id, None, &page(u32::MAX))
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.device, e.status))
        .collect()
}

/// A database with devices `d00..d{n-1}` registered.
async fn fleet(n: usize) -> Db {
    let mut db = Db::new().await;
    for id in ids(n) {
        let site = if id.as_str() < "d05" {
            "north"
        } else {
            "south"
        };
        device_of(
            db.run(register_with(&id, &[("site", site), ("kind", "pump")]))
                .await,
        );
    }
    db
}

#[tokio::test]
async fn a_job_is_created_started_launched_within_its_bounds_and_completed() {
    let mut db = fleet(6).await;
    let devices = ids(4);
    let j = job_of(
        db.run(create(
            "j1",
            JobTarget::Devices(devices.clone()),
            rollout(600_000, 2),
            None,
        ))
        .await,
    );
    assert_eq!(j.state, JobState::Scheduled);
    assert_eq!((j.devices, j.counts.queued), (4, 4));
    // The same id again, and unknown devices, are refused.
    let again = create("j1", JobTarget::Devices(ids(1)), rollout(1, 1), None);
    assert!(matches!(db.run(again).await, OpResult::Conflict(_)));
    let unknown = JobTarget::Devices(vec!["d00".into(), "nope".into()]);
    let r = db.run(create("j2", unknown, rollout(1, 1), None)).await;
    assert!(
        matches!(&r, OpResult::NotFound(m) if m.contains("nope")),
        "{r:?}"
    );
    assert!(db.db.job("j2").await.unwrap().is_none());
    // Nothing launches before the start.
    assert_eq!(db.run(launch("j1", &devices)).await, OpResult::Ignored);
    let started = job_of(db.run(Op::StartJob { id: "j1".into() }).await);
    assert_eq!(started.state, JobState::InProgress);
    assert!(started.started_at.is_some());
    // A second start changes nothing.
    assert_eq!(
        db.run(Op::StartJob { id: "j1".into() }).await,
        OpResult::Ignored
    );
    // max_in_flight 2: of the four named, two launch.
    assert_eq!(db.run(launch("j1", &devices)).await, OpResult::Done);
    let j = job(&db, "j1").await;
    assert_eq!(
        (j.launched, j.counts.in_progress, j.counts.queued),
        (2, 2, 2)
    );
    let cmd = db
        .db
        .command(&command_id("j1", "d00"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((cmd.device.as_str(), cmd.name.as_str()), ("d00", "update"));
    assert_eq!(cmd.params, json!({"v": 2}));
    assert_eq!(cmd.expires_at, cmd.issued_at + 60_000);
    // Full: nothing more until one finishes; it is not complete either.
    assert_eq!(db.run(launch("j1", &devices)).await, OpResult::Ignored);
    assert_eq!(
        db.run(Op::CompleteJob { id: "j1".into() }).await,
        OpResult::Ignored
    );
    command_of(db.run(result("j1", "d00", true)).await);
    command_of(db.run(result("j1", "d01", false)).await);
    assert_eq!(db.run(launch("j1", &devices)).await, OpResult::Done);
    command_of(db.run(result("j1", "d02", true)).await);
    // An expired command is a timed-out execution.
    let expire = Op::ExpireCommands {
        cids: vec![command_id("j1", "d03")],
    };
    let ts = T0 + 1_000_000;
    assert_eq!(db.run_at(ts, expire).await, OpResult::Done);
    let j = job(&db, "j1").await;
    assert_eq!(
        (
            j.counts.succeeded,
            j.counts.failed,
            j.counts.timed_out,
            j.counts.in_progress
        ),
        (2, 1, 1, 0)
    );
    assert_eq!(
        statuses(&db, "j1").await,
        [
            ("d00".to_string(), ExecutionStatus::Succeeded),
            ("d01".to_string(), ExecutionStatus::Failed),
            ("d02".to_string(), ExecutionStatus::Succeeded),
            ("d03".to_string(), ExecutionStatus::TimedOut),
        ]
    );
    let done = job_of(db.run_at(ts + 1, Op::CompleteJob { id: "j1".into() }).await);
    assert_eq!(
        (done.state, done.finished_at),
        (JobState::Completed, Some(ts + 1))
    );
    // Over: cancel is a conflict, complete and launch change nothing.
    let r = db.run(Op::CancelJob { id: "j1".into() }).await;
    assert!(
        matches!(&r, OpResult::Conflict(m) if m.contains("completed")),
        "{r:?}"
    );
    assert_eq!(
        db.run(Op::CompleteJob { id: "j1".into() }).await,
        OpResult::Ignored
    );
    // The events, in order.
    let kinds: Vec<String> = db
        .db
        .events_since(0, u32::MAX)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.starts_with("job."))
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "job.created",
            "job.started",
            "job.launched",
            "job.launched",
            "job.completed"
        ]
    );
}

#[tokio::test]
async fn a_selector_is_evaluated_when_the_job_starts_and_later_devices_do_not_join() {
    let mut db = fleet(8).await;
    let north = BTreeMap::from([
        ("site".to_string(), "north".to_string()),
        ("kind".to_string(), "pump".to_string()),
    ]);
    let at = T0 + 500_000;
    let mut op = create("js", JobTarget::Labels(north), rollout(600_000, 100), None);
    if let Op::CreateJob { start_at_ms, .. } = &mut op {
        *start_at_ms = Some(at);
    }
    let j = job_of(db.run(op).await);
    assert_eq!(
        (j.state, j.devices, j.start_at),
        (JobState::Scheduled, 0, Some(at))
    );
    // Registered before the start: joins. Relabelled away: does not.
    device_of(
        db.run(register_with(
            "a-late",
            &[("site", "north"), ("kind", "pump")],
        ))
        .await,
    );
    let relabel = Op::UpdateDevice {
        id: "d04".into(),
        labels: Some(BTreeMap::from([("site".to_string(), "west".to_string())])),
        attributes: None,
        cert_sha256: None,
    };
    device_of(db.run(relabel).await);
    // Before its start time: ignored.
    assert_eq!(
        db.run_at(at - 1, Op::StartJob { id: "js".into() }).await,
        OpResult::Ignored
    );
    let j = job_of(db.run_at(at, Op::StartJob { id: "js".into() }).await);
    assert_eq!(
        (j.state, j.devices, j.counts.queued),
        (JobState::InProgress, 5, 5)
    );
    device_of(
        db.run_at(
            at + 1,
            register_with("b-after", &[("site", "north"), ("kind", "pump")]),
        )
        .await,
    );
    let devices: Vec<String> = statuses(&db, "js")
        .await
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(devices, ["a-late", "d00", "d01", "d02", "d03"]);
}

#[tokio::test]
async fn the_rate_bound_holds_at_apply_time_whatever_the_proposal_asks() {
    let mut db = fleet(10).await;
    let all = ids(10);
    job_of(
        db.run(create(
            "jr",
            JobTarget::Devices(all.clone()),
            rollout(60, 100),
            None,
        ))
        .await,
    );
    let start = T0 + 1_000_000;
    job_of(db.run_at(start, Op::StartJob { id: "jr".into() }).await);
    // 60 a minute: one at once, then one a second.
    assert_eq!(db.run_at(start, launch("jr", &all)).await, OpResult::Done);
    assert_eq!(job(&db, "jr").await.launched, 1);
    assert_eq!(
        db.run_at(start + 999, launch("jr", &all)).await,
        OpResult::Ignored
    );
    assert_eq!(
        db.run_at(start + 1000, launch("jr", &all)).await,
        OpResult::Done
    );
    assert_eq!(job(&db, "jr").await.launched, 2);
    for s in [2000, 3000, 4000] {
        assert_eq!(
            db.run_at(start + s, launch("jr", &all)).await,
            OpResult::Done
        );
    }
    assert_eq!(job(&db, "jr").await.launched, 5);
    assert_eq!(
        db.run_at(start + 4500, launch("jr", &all)).await,
        OpResult::Ignored
    );
    // A stamp before the start (another leader's clock) allows no more.
    assert_eq!(
        db.run_at(start - 5000, launch("jr", &all)).await,
        OpResult::Ignored
    );
    // Launched in device order, as named.
    let launched: Vec<String> = statuses(&db, "jr")
        .await
        .into_iter()
        .filter(|(_, s)| *s == ExecutionStatus::InProgress)
        .map(|(d, _)| d)
        .collect();
    assert_eq!(launched, ids(5));
}

#[tokio::test]
async fn after_a_stall_a_job_launches_one_seconds_worth_at_most_then_its_rate() {
    let mut db = fleet(300).await;
    let all = ids(300);
    job_of(
        db.run(create(
            "js",
            JobTarget::Devices(all.clone()),
            rollout(6000, 1000),
            None,
        ))
        .await,
    );
    let start = T0 + 1_000_000;
    job_of(db.run_at(start, Op::StartJob { id: "js".into() }).await);
    assert_eq!(db.run_at(start, launch("js", &all)).await, OpResult::Done);
    assert_eq!(job(&db, "js").await.launched, 1);
    // Ten minutes without a launch (no quorum, say): 100 a second is all
    // that was saved up, not the 1,000 in flight the bounds allow.
    let later = start + 600_000;
    assert_eq!(db.run_at(later, launch("js", &all)).await, OpResult::Done);
    assert_eq!(job(&db, "js").await.launched, 101);
    assert_eq!(
        db.run_at(later, launch("js", &all)).await,
        OpResult::Ignored
    );
    // Then the rate: one each 10 ms.
    assert_eq!(
        db.run_at(later + 9, launch("js", &all)).await,
        OpResult::Ignored
    );
    assert_eq!(
        db.run_at(later + 10, launch("js", &all)).await,
        OpResult::Done
    );
    assert_eq!(job(&db, "js").await.launched, 102);
    assert_eq!(
        db.run_at(later + 510, launch("js", &all)).await,
        OpResult::Done
    );
    assert_eq!(job(&db, "js").await.launched, 152);
    // A launch naming only devices already launched pays for nothing.
    let done = ids(10);
    assert_eq!(
        db.run_at(later + 1510, launch("js", &done)).await,
        OpResult::Ignored
    );
    assert_eq!(
        db.run_at(later + 1510, launch("js", &all)).await,
        OpResult::Done
    );
    assert_eq!(job(&db, "js").await.launched, 252);
}

#[tokio::test]
async fn duplicated_and_stale_launches_start_each_device_once() {
    let mut db = fleet(6).await;
    let all = ids(6);
    job_of(
        db.run(create(
            "jx",
            JobTarget::Devices(all.clone()),
            rollout(600_000, 100),
            None,
        ))
        .await,
    );
    job_of(db.run(Op::StartJob { id: "jx".into() }).await);
    // Two leaders' proposals for the same devices (and one naming a device
    // twice): the second launches nothing.
    let first = ids(3);
    let twice = vec!["d00".to_string(), "d00".to_string(), "d01".to_string()];
    assert_eq!(db.run(launch("jx", &first)).await, OpResult::Done);
    assert_eq!(db.run(launch("jx", &first)).await, OpResult::Ignored);
    assert_eq!(db.run(launch("jx", &twice)).await, OpResult::Ignored);
    // A device that finished is not launched again either.
    command_of(db.run(result("jx", "d00", true)).await);
    assert_eq!(db.run(launch("jx", &ids(1))).await, OpResult::Ignored);
    // A device not in the job is skipped.
    assert_eq!(
        db.run(launch("jx", &["zzz".to_string()])).await,
        OpResult::Ignored
    );
    assert_eq!(db.run(launch("jx", &all)).await, OpResult::Done);
    let j = job(&db, "jx").await;
    assert_eq!(
        (j.launched, j.counts.in_progress, j.counts.succeeded),
        (6, 5, 1)
    );
    for d in &all {
        let cmds = db.db.list_commands(d, None, &page(100)).await.unwrap();
        assert_eq!(cmds.len(), 1, "{d}: {cmds:?}");
        assert_eq!(cmds[0].id, command_id("jx", d));
    }
}

#[tokio::test]
async fn the_abort_rule_aborts_above_its_threshold_once_enough_finished() {
    let mut db = fleet(10).await;
    let all = ids(10);
    let abort = AbortRule {
        failure_percent: 50,
        min_finished: 4,
    };
    job_of(
        db.run(create(
            "ja",
            JobTarget::Devices(all.clone()),
            rollout(600_000, 4),
            Some(abort),
        ))
        .await,
    );
    job_of(db.run(Op::StartJob { id: "ja".into() }).await);
    assert_eq!(db.run(launch("ja", &all)).await, OpResult::Done);
    // Three failures: all failed, but fewer than min_finished finished.
    for d in ["d00", "d01", "d02"] {
        command_of(db.run(result("ja", d, false)).await);
    }
    assert_eq!(
        db.run(Op::AbortJob { id: "ja".into() }).await,
        OpResult::Ignored
    );
    assert_eq!(db.run(launch("ja", &all)).await, OpResult::Done);
    // At the threshold: 3 succeeded and 3 failed is 50 %, not above it.
    for d in ["d03", "d04", "d05"] {
        command_of(db.run(result("ja", d, true)).await);
    }
    assert_eq!(
        db.run(Op::AbortJob { id: "ja".into() }).await,
        OpResult::Ignored
    );
    assert_eq!(db.run(launch("ja", &all)).await, OpResult::Done);
    // One more failure: 4 of 7, above 50 %. Nothing launches any more.
    command_of(db.run(result("ja", "d06", false)).await);
    assert_eq!(db.run(launch("ja", &all)).await, OpResult::Ignored);
    let j = job_of(db.run(Op::AbortJob { id: "ja".into() }).await);
    assert_eq!(j.state, JobState::Aborted);
    assert!(
        j.reason.as_deref().unwrap().contains("4 of 7"),
        "{:?}",
        j.reason
    );
    // Queued ones canceled; launched ones still finish and are counted.
    let c = j.counts;
    assert_eq!((c.queued, c.canceled), (0, 10 - j.launched));
    assert!(c.in_progress > 0);
    command_of(db.run(result("ja", "d07", true)).await);
    let j = job(&db, "ja").await;
    assert_eq!((j.state, j.counts.succeeded), (JobState::Aborted, 4));
    assert_eq!(
        db.run(Op::AbortJob { id: "ja".into() }).await,
        OpResult::Ignored
    );
}

#[tokio::test]
async fn cancel_stops_queued_executions_and_lets_launched_ones_finish() {
    let mut db = fleet(5).await;
    let all = ids(5);
    job_of(
        db.run(create(
            "jc",
            JobTarget::Devices(all.clone()),
            rollout(600_000, 2),
            None,
        ))
        .await,
    );
    // A scheduled job can be canceled too.
    job_of(
        db.run(create(
            "jd",
            JobTarget::Devices(all.clone()),
            rollout(1, 1),
            None,
        ))
        .await,
    );
    let j = job_of(db.run(Op::CancelJob { id: "jd".into() }).await);
    assert_eq!((j.state, j.counts.canceled), (JobState::Canceled, 5));
    assert_eq!(
        db.run(Op::StartJob { id: "jd".into() }).await,
        OpResult::Ignored
    );

    job_of(db.run(Op::StartJob { id: "jc".into() }).await);
    assert_eq!(db.run(launch("jc", &all)).await, OpResult::Done);
    let j = job_of(db.run(Op::CancelJob { id: "jc".into() }).await);
    assert_eq!(j.state, JobState::Canceled);
    assert_eq!(
        (j.counts.queued, j.counts.in_progress, j.counts.canceled),
        (0, 2, 3)
    );
    assert_eq!(db.run(launch("jc", &all)).await, OpResult::Ignored);
    assert!(matches!(
        db.run(Op::CancelJob { id: "jc".into() }).await,
        OpResult::Conflict(_)
    ));
    assert!(matches!(
        db.run(Op::CancelJob { id: "nope".into() }).await,
        OpResult::NotFound(_)
    ));
    // The launched ones record their outcome: one answers, one's command
    // is canceled by an operator.
    command_of(db.run(result("jc", "d00", true)).await);
    let cancel = Op::CancelCommand {
        cid: command_id("jc", "d01"),
    };
    command_of(db.run(cancel).await);
    let j = job(&db, "jc").await;
    assert_eq!(
        (j.counts.succeeded, j.counts.canceled, j.counts.in_progress),
        (1, 4, 0)
    );
    assert_eq!(j.state, JobState::Canceled);
}

#[tokio::test]
async fn deleting_a_device_cancels_its_executions() {
    let mut db = fleet(3).await;
    let all = ids(3);
    job_of(
        db.run(create(
            "jdel",
            JobTarget::Devices(all.clone()),
            rollout(600_000, 1),
            None,
        ))
        .await,
    );
    job_of(db.run(Op::StartJob { id: "jdel".into() }).await);
    assert_eq!(db.run(launch("jdel", &all)).await, OpResult::Done);
    // d00 in flight, d01 queued: both canceled with their devices.
    for d in ["d00", "d01"] {
        assert_eq!(
            db.run(Op::DeleteDevice { id: d.into() }).await,
            OpResult::Done
        );
    }
    let j = job(&db, "jdel").await;
    assert_eq!(
        (j.counts.canceled, j.counts.queued, j.counts.in_progress),
        (2, 1, 0)
    );
    assert_eq!(db.run(launch("jdel", &all)).await, OpResult::Done);
    command_of(db.run(result("jdel", "d02", true)).await);
    let j = job_of(db.run(Op::CompleteJob { id: "jdel".into() }).await);
    assert_eq!(j.state, JobState::Completed);
}

#[tokio::test]
async fn a_selector_matching_nothing_starts_empty_and_completes() {
    let mut db = fleet(2).await;
    let nobody = BTreeMap::from([("site".to_string(), "mars".to_string())]);
    job_of(
        db.run(create(
            "je",
            JobTarget::Labels(nobody),
            rollout(60, 1),
            None,
        ))
        .await,
    );
    let j = job_of(db.run(Op::StartJob { id: "je".into() }).await);
    assert_eq!((j.state, j.devices), (JobState::InProgress, 0));
    assert_eq!(db.run(launch("je", &ids(2))).await, OpResult::Ignored);
    let j = job_of(db.run(Op::CompleteJob { id: "je".into() }).await);
    assert_eq!(j.state, JobState::Completed);
    // An empty selector is refused (the API refuses it first).
    let r = db
        .run(create(
            "jz",
            JobTarget::Labels(BTreeMap::new()),
            rollout(60, 1),
            None,
        ))
        .await;
    assert!(matches!(r, OpResult::Conflict(_)), "{r:?}");
}

/// A job's id and its counters, as `check_counters` reads them.
type CounterRow = (String, i64, i64, i64, i64, i64, i64, i64, i64);

/// Every job's counters against its execution rows, and every launched
/// execution against its command.
async fn check_counters(db: &Db, step: usize, op: &str) {
    let pool = db.db.pool.read().await;
    let jobs: Vec<CounterRow> = sqlx::query_as(
        "SELECT id, n_total, n_launched, n_queued, n_in_progress, n_succeeded, n_failed, \
         n_timed_out, n_canceled FROM jobs ORDER BY id",
    )
    .fetch_all(&*pool)
    .await
    .unwrap();
    for (id, total, launched, q, ip, s, f, t, c) in jobs {
        let count = |status: &'static str| {
            let pool = &*pool;
            let id = id.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT COUNT(*) FROM job_executions WHERE job = ? AND status = ?",
                )
                .bind(id)
                .bind(status)
                .fetch_one(pool)
                .await
                .unwrap()
            }
        };
        let rows = (
            count("queued").await,
            count("in_progress").await,
            count("succeeded").await,
            count("failed").await,
            count("timed_out").await,
            count("canceled").await,
        );
        assert_eq!(
            (q, ip, s, f, t, c),
            rows,
            "step {step} ({op}): job {id}'s counters drifted from its executions"
        );
        assert_eq!(
            total,
            rows.0 + rows.1 + rows.2 + rows.3 + rows.4 + rows.5,
            "step {step} ({op}): job {id}"
        );
        let with_command: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM job_executions WHERE job = ? AND command IS NOT NULL",
        )
        .bind(&id)
        .fetch_one(&*pool)
        .await
        .unwrap();
        assert_eq!(launched, with_command, "step {step} ({op}): job {id}");
    }
    // An execution in progress has its command, not finished.
    let orphans: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM job_executions x LEFT JOIN commands c ON c.id = x.command \
         WHERE x.status = 'in_progress' AND (c.id IS NULL OR c.status IN \
         ('succeeded', 'failed', 'expired', 'canceled'))",
    )
    .fetch_one(&*pool)
    .await
    .unwrap();
    assert_eq!(
        orphans, 0,
        "step {step} ({op}): in-progress executions without a live command"
    );
}

#[tokio::test]
async fn counters_follow_the_executions_whatever_the_order_of_the_operations() {
    let n = 6;
    let mut db = fleet(n).await;
    let devices = ids(n);
    let jobs = ["ja", "jb", "jc"];
    let mut seed: u64 = 0x5eed_1234;
    let mut rnd = |m: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % m
    };
    let mut ts = T0 + 10_000;
    for step in 0..600 {
        ts += rnd(3000);
        let job = jobs[rnd(3) as usize];
        let dev = devices[rnd(n as u64) as usize].clone();
        let subset: Vec<String> = devices.iter().filter(|_| rnd(2) == 0).cloned().collect();
        let op = match rnd(12) {
            0 => {
                let target = if rnd(2) == 0 && !subset.is_empty() {
                    JobTarget::Devices(subset)
                } else {
                    JobTarget::Labels(BTreeMap::from([("kind".into(), "pump".into())]))
                };
                let abort = (rnd(2) == 0).then_some(AbortRule {
                    failure_percent: rnd(60) as u8,
                    min_finished: 1 + rnd(3) as u32,
                });
                // Job ids are reused only once each job ended.
                create(
                    &format!("{job}-{}", step / 100),
                    target,
                    rollout(1 + rnd(120) as u32, 1 + rnd(4) as u32),
                    abort,
                )
            }
            1 => Op::StartJob {
                id: format!("{job}-{}", step / 100),
            },
            2 | 3 => launch(&format!("{job}-{}", step / 100), &subset),
            4 | 5 => result(&format!("{job}-{}", step / 100), &dev, rnd(3) != 0),
            6 => Op::CancelCommand {
                cid: command_id(&format!("{job}-{}", step / 100), &dev),
            },
            7 => Op::ExpireCommands {
                cids: devices
                    .iter()
                    .map(|d| command_id(&format!("{job}-{}", step / 100), d))
                    .collect(),
            },
            8 => {
                if rnd(4) == 0 {
                    Op::DeleteDevice { id: dev }
                } else {
                    register_with(&dev, &[("site", "north"), ("kind", "pump")])
                }
            }
            9 => Op::CancelJob {
                id: format!("{job}-{}", step / 100),
            },
            10 => Op::AbortJob {
                id: format!("{job}-{}", step / 100),
            },
            _ => Op::CompleteJob {
                id: format!("{job}-{}", step / 100),
            },
        };
        let kind = op.kind();
        db.run_at(ts, op).await;
        check_counters(&db, step, kind).await;
    }
}

#[tokio::test]
async fn a_selector_keeps_the_first_devices_by_id_in_one_bounded_query() {
    let db = fleet(6).await;
    let conn = rusqlite::Connection::open(db.dir.path().join(super::super::DB_FILE)).unwrap();
    let sel = |labels: &[(&str, &str)]| -> BTreeMap<String, String> {
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let select = |labels: &[(&str, &str)], max: usize| {
        super::super::jobs::select_devices(&conn, &sel(labels), max).unwrap()
    };
    let first = |n: usize| ids(n);
    assert_eq!(select(&[("kind", "pump")], 3), (first(3), true));
    assert_eq!(select(&[("kind", "pump")], 6), (first(6), false));
    assert_eq!(
        select(&[("kind", "pump"), ("site", "north")], 5),
        (first(5), false)
    );
    assert_eq!(
        select(&[("kind", "pump"), ("site", "north")], 4),
        (first(4), true)
    );
    assert_eq!(
        select(&[("site", "south"), ("kind", "pump")], 10),
        (vec!["d05".to_string()], false)
    );
    assert_eq!(select(&[("kind", "valve")], 10), (Vec::new(), false));
    // The devices come in index order and the query stops at the bound:
    // no sort of every match (which would read them all first).
    let mut plan = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT l0.device FROM device_labels l0 JOIN device_labels l1 \
             ON l1.device = l0.device AND l1.key = 'a' AND l1.value = 'b' \
             WHERE l0.key = 'c' AND l0.value = 'd' ORDER BY l0.device LIMIT 3",
        )
        .unwrap();
    let steps: Vec<String> = plan
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        !steps.iter().any(|s| s.contains("TEMP B-TREE")),
        "{steps:?}"
    );
}

#[tokio::test]
async fn apply_refuses_a_rollout_that_could_never_launch() {
    let mut db = fleet(2).await;
    for (per_minute, in_flight) in [(0, 10), (10, 0), (0, 0), (600_001, 10), (10, 10_001)] {
        let r = db
            .run(create(
                "jz",
                JobTarget::Devices(ids(1)),
                rollout(per_minute, in_flight),
                None,
            ))
            .await;
        assert!(
            matches!(&r, OpResult::Conflict(m) if m.contains("max_per_minute")),
            "{per_minute}/{in_flight}: {r:?}"
        );
        assert!(db.db.job("jz").await.unwrap().is_none());
    }
    let labels = JobTarget::Labels([("kind".to_string(), "pump".to_string())].into());
    let r = db.run(create("jz", labels, rollout(0, 1), None)).await;
    assert!(matches!(r, OpResult::Conflict(_)), "{r:?}");
    // The bounds themselves are fine.
    let j = job_of(
        db.run(create(
            "jz",
            JobTarget::Devices(ids(1)),
            rollout(1, 1),
            None,
        ))
        .await,
    );
    assert_eq!(j.rollout, rollout(1, 1));
}

#[tokio::test]
async fn apply_decides_how_a_job_ends_whichever_end_was_proposed() {
    let mut db = fleet(4).await;
    let abort = AbortRule {
        failure_percent: 50,
        min_finished: 2,
    };
    // Every execution finished and the rule trips: a CompleteJob (a stale
    // proposal, made before the last result) aborts it.
    let two = ids(2);
    for id in ["jc", "jd"] {
        job_of(
            db.run(create(
                id,
                JobTarget::Devices(two.clone()),
                rollout(600_000, 10),
                Some(abort),
            ))
            .await,
        );
        job_of(db.run(Op::StartJob { id: id.into() }).await);
        assert_eq!(db.run(launch(id, &two)).await, OpResult::Done);
    }
    command_of(db.run(result("jc", "d00", false)).await);
    command_of(db.run(result("jc", "d01", false)).await);
    let j = job_of(db.run(Op::CompleteJob { id: "jc".into() }).await);
    assert_eq!(j.state, JobState::Aborted);
    assert!(
        j.reason.as_deref().is_some_and(|r| r.contains("2 of 2")),
        "{j:?}"
    );
    // The rule does not trip (1 of 2 is 50 %, not above) and everything
    // finished: an AbortJob completes it.
    command_of(db.run(result("jd", "d00", false)).await);
    assert_eq!(
        db.run(Op::AbortJob { id: "jd".into() }).await,
        OpResult::Ignored,
        "one still in progress"
    );
    command_of(db.run(result("jd", "d01", true)).await);
    let j = job_of(db.run(Op::AbortJob { id: "jd".into() }).await);
    assert_eq!((j.state, j.reason), (JobState::Completed, None));
    // Over: both are ignored.
    for op in [
        Op::CompleteJob { id: "jc".into() },
        Op::AbortJob { id: "jd".into() },
    ] {
        assert_eq!(db.run(op).await, OpResult::Ignored);
    }
    // The events say what happened.
    let kinds: Vec<String> = db
        .db
        .events_since(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| k == "job.aborted" || k == "job.completed")
        .collect();
    assert_eq!(kinds, ["job.aborted", "job.completed"]);
}

#[tokio::test]
async fn a_launch_change_carries_its_command_once_and_the_executions_by_id() {
    use crate::state::change::{Change, Launched};
    let mut db = fleet(3).await;
    let all = ids(3);
    job_of(
        db.run(create(
            "jl",
            JobTarget::Devices(all.clone()),
            rollout(600_000, 10),
            None,
        ))
        .await,
    );
    job_of(db.run(Op::StartJob { id: "jl".into() }).await);
    let mut changes = db.db.changes();
    let at = T0 + 50_000;
    assert_eq!(db.run_at(at, launch("jl", &all)).await, OpResult::Done);
    let Ok(Change::JobLaunched {
        job,
        command,
        executions,
    }) = changes.try_recv()
    else {
        panic!("no launch change");
    };
    assert_eq!(job, "jl");
    let expected: Vec<Launched> = all
        .iter()
        .map(|d| Launched {
            device: d.clone(),
            command: command_id("jl", d),
        })
        .collect();
    assert_eq!(executions, expected);
    // What each command is, as stored.
    for e in &executions {
        let c = db.db.command(&e.command).await.unwrap().unwrap();
        assert_eq!(
            (&c.name, &c.params, c.issued_at, c.expires_at),
            (
                &command.name,
                &command.params,
                command.issued_at,
                command.expires_at
            )
        );
        assert_eq!(c.issued_at, at);
    }
}

/// Creates job `id` on `devices` and cancels it at `ts`.
async fn canceled_at(db: &mut Db, id: &str, devices: &[String], ts: u64) {
    job_of(
        db.run(create(
            id,
            JobTarget::Devices(devices.to_vec()),
            rollout(600, 10),
            None,
        ))
        .await,
    );
    let j = job_of(db.run_at(ts, Op::CancelJob { id: id.into() }).await);
    assert_eq!((j.state, j.finished_at), (JobState::Canceled, Some(ts)));
}

async fn job_ids(db: &Db) -> Vec<String> {
    db.db
        .list_jobs(None, &page(1000))
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect()
}

#[tokio::test]
async fn pruning_deletes_finished_jobs_older_than_the_cutoff_with_their_executions() {
    use crate::state::change::Change;
    let mut db = fleet(4).await;
    let all = ids(4);
    canceled_at(&mut db, "old-1", &all, T0 + 1_000).await;
    canceled_at(&mut db, "old-2", &all[..2], T0 + 2_000).await;
    canceled_at(&mut db, "new", &all, T0 + 10_000).await;
    // One in progress and one scheduled: never pruned, however old.
    job_of(
        db.run(create(
            "running",
            JobTarget::Devices(all.clone()),
            rollout(600_000, 1),
            None,
        ))
        .await,
    );
    job_of(
        db.run(Op::StartJob {
            id: "running".into(),
        })
        .await,
    );
    assert_eq!(
        db.run_at(T0 + 3_000, launch("running", &all)).await,
        OpResult::Done
    );
    job_of(
        db.run(create(
            "waiting",
            JobTarget::Devices(all.clone()),
            rollout(600, 10),
            None,
        ))
        .await,
    );
    // The completed kind too: a job all of whose executions finished.
    job_of(
        db.run(create(
            "done",
            JobTarget::Devices(all[..1].to_vec()),
            rollout(600_000, 10),
            None,
        ))
        .await,
    );
    job_of(db.run(Op::StartJob { id: "done".into() }).await);
    assert_eq!(
        db.run_at(T0 + 3_000, launch("done", &all[..1])).await,
        OpResult::Done
    );
    db.run(result("done", "d00", true)).await;
    let done = job_of(
        db.run_at(T0 + 4_000, Op::CompleteJob { id: "done".into() })
            .await,
    );
    assert_eq!(done.state, JobState::Completed);

    let mut changes = db.db.changes();
    let r = db
        .run_at(
            T0 + 50_000,
            Op::PruneJobs {
                finished_before: T0 + 5_000,
            },
        )
        .await;
    assert_eq!(r, OpResult::Done);
    let Ok(Change::JobsPruned { jobs }) = changes.try_recv() else {
        panic!("no pruning change");
    };
    // Oldest first.
    assert_eq!(jobs, ["old-1", "old-2", "done"]);
    assert_eq!(job_ids(&db).await, ["new", "running", "waiting"]);
    for gone in ["old-1", "old-2", "done"] {
        assert!(statuses(&db, gone).await.is_empty(), "{gone}");
    }
    assert_eq!(statuses(&db, "new").await.len(), 4);
    // The commands the jobs launched stay.
    assert!(
        db.db
            .command(&command_id("done", "d00"))
            .await
            .unwrap()
            .is_some()
    );

    // Nothing more to delete below the cutoff.
    let again = Op::PruneJobs {
        finished_before: T0 + 5_000,
    };
    assert_eq!(db.run_at(T0 + 50_000, again).await, OpResult::Ignored);
    // A cutoff beyond the entry's stamp is the stamp: "new" finished after
    // this entry's time, so it stays.
    let ahead = Op::PruneJobs {
        finished_before: u64::MAX,
    };
    assert_eq!(
        db.run_at(T0 + 9_000, ahead.clone()).await,
        OpResult::Ignored
    );
    assert_eq!(job_ids(&db).await, ["new", "running", "waiting"]);
    // Later it goes; the unfinished ones never do.
    assert_eq!(db.run_at(T0 + 60_000, ahead).await, OpResult::Done);
    assert_eq!(job_ids(&db).await, ["running", "waiting"]);
    assert_eq!(job(&db, "running").await.state, JobState::InProgress);
}

#[tokio::test]
async fn pruning_is_bounded_per_entry_and_finishes_a_large_job_over_several() {
    let mut db = fleet(5).await;
    let all = ids(5);
    canceled_at(&mut db, "big", &all, T0 + 1_000).await;
    canceled_at(&mut db, "small", &all[..1], T0 + 2_000).await;
    let conn = rusqlite::Connection::open(db.dir.path().join(super::super::DB_FILE)).unwrap();
    let prune = |max_jobs, max_executions| {
        super::super::jobs::prune_within(&conn, T0 + 5_000, max_jobs, max_executions)
            .unwrap()
            .0
    };
    let left = |job: &str| -> i64 {
        conn.query_row(
            "SELECT COUNT(*) FROM job_executions WHERE job = ?",
            [job],
            |r| r.get(0),
        )
        .unwrap()
    };
    let exists = |job: &str| -> bool {
        conn.query_row("SELECT COUNT(*) FROM jobs WHERE id = ?", [job], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap()
            == 1
    };
    // Three executions an entry: the big job loses three and stays.
    assert_eq!(prune(100, 3), OpResult::Done);
    assert_eq!((left("big"), exists("big")), (2, true));
    assert_eq!((left("small"), exists("small")), (1, true));
    // The rest of it, and the job; then the small one in the same entry.
    assert_eq!(prune(100, 3), OpResult::Done);
    assert_eq!((left("big"), exists("big")), (0, false));
    assert_eq!((left("small"), exists("small")), (0, false));
    assert_eq!(prune(100, 3), OpResult::Ignored);

    // At most `max_jobs` jobs an entry.
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        canceled_at(&mut db, id, &all[..1], T0 + 3_000 + i as u64).await;
    }
    assert_eq!(prune(2, 100), OpResult::Done);
    assert_eq!(job_ids(&db).await, ["c"]);
    assert_eq!(prune(2, 100), OpResult::Done);
    assert!(job_ids(&db).await.is_empty());
}
