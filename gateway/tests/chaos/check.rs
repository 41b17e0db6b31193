//! What the chaos test checks once the faults stopped and the group healed.
//!
//! - **Linearizability** of every register-like object (each device's
//!   desired state, each command's lifecycle, each device id's
//!   registration), with stateright's `LinearizabilityTester` and the specs
//!   of `model.rs`. Operations whose outcome is unknown are left in flight
//!   (invoked, never returned): the tester may linearize them at any point
//!   after their invocation, or not at all. Operations that certainly had no
//!   effect are left out. The state the databases hold at the end is added
//!   as a final read after everything else, so a lost acknowledged write is
//!   a linearizability violation too.
//! - **Replicas**: every gateway's SQLite state is the same, row by row, in
//!   every table but sqlx's own `_sqlx_migrations` (it records when and how
//!   fast *this* database ran each migration: local by design).
//! - **Acknowledged writes** are present (commands, registrations) — stated
//!   on their own so a failure names the write.
//! - **Commands**: every one is terminal; no issue request produced two
//!   commands, no idempotency key two commands, every command comes from a
//!   request the workload made, for its device; a device's result is the
//!   one it sent.
//! - **Deliveries**: a device received only its own commands. (That a
//!   device connected to a live gateway gets its commands at all is
//!   checked in `delivery.rs`.)
//! - **Sessions**: a local read with `Entente-Min-Index` at least the index
//!   of a client's acknowledged write reflects that write; every
//!   (version, value) of a shadow anyone observed, with any consistency, is
//!   the same for the same version.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sqlx::Row;
use sqlx::sqlite::SqliteConnectOptions;
use stateright::semantics::write_once_register::{WORegister, WORegisterOp, WORegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

use super::devices::{Delivery, expected_result};
use super::history::{FINAL_PROCESS, Obj, Op, Outcome, Record, Ret, Thread};
use super::model::{CmdOp, CmdReg, CmdRet, ShadowOp, ShadowReg, ShadowRet, Status};
use super::workload::World;

/// One table's rows, each as the SQL literals (`quote()`) of its columns.
pub type Table = Vec<Vec<String>>;

/// Every replicated table of one database.
pub type Dump = BTreeMap<String, Table>;

async fn open(path: &Path) -> sqlx::SqlitePool {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false);
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Reads every table (but sqlx's bookkeeping) of a stopped gateway's state
/// database, rows in order, and runs SQLite's integrity check.
pub async fn dump(path: &Path) -> (Dump, String) {
    let pool = open(path).await;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .expect("integrity check");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name != '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .expect("tables");
    let mut out = Dump::new();
    for t in tables {
        let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
            .bind(&t)
            .fetch_all(&pool)
            .await
            .expect("columns");
        let select: Vec<String> = cols.iter().map(|c| format!("quote(\"{c}\")")).collect();
        let order: Vec<String> = (1..=cols.len()).map(|i| i.to_string()).collect();
        let sql = format!(
            "SELECT {} FROM \"{t}\" ORDER BY {}",
            select.join(", "),
            order.join(", ")
        );
        let rows = sqlx::query(&sql).fetch_all(&pool).await.expect("rows");
        let rows = rows
            .iter()
            .map(|r| {
                (0..cols.len())
                    .map(|i| r.try_get::<String, _>(i).unwrap_or_default())
                    .collect()
            })
            .collect();
        out.insert(t, rows);
    }
    pool.close().await;
    (out, integrity)
}

/// Differences between the dumps of several gateways (the first is the reference).
pub fn compare(dumps: &[(u64, Dump)], violations: &mut Vec<String>) {
    let Some((ref_id, reference)) = dumps.first() else {
        return;
    };
    for (id, d) in &dumps[1..] {
        let names: HashSet<&String> = reference.keys().chain(d.keys()).collect();
        for t in names {
            let empty = Vec::new();
            let a = reference.get(t).unwrap_or(&empty);
            let b = d.get(t).unwrap_or(&empty);
            if a == b {
                continue;
            }
            let sa: HashSet<&Vec<String>> = a.iter().collect();
            let sb: HashSet<&Vec<String>> = b.iter().collect();
            let only_a: Vec<_> = a.iter().filter(|r| !sb.contains(r)).take(3).collect();
            let only_b: Vec<_> = b.iter().filter(|r| !sa.contains(r)).take(3).collect();
            violations.push(format!(
                "replicas differ: table {t}: gateway {ref_id} has {} rows, gateway {id} has {}; \
                 only on {ref_id}: {only_a:?}; only on {id}: {only_b:?}",
                a.len(),
                b.len()
            ));
        }
    }
}

/// The final state, parsed from one database.
#[derive(Debug, Default)]
pub struct Final {
    /// device → (version, desired.x)
    pub shadows: HashMap<String, (u64, Option<u64>)>,
    /// device → labels.op
    pub devices: HashMap<String, Option<String>>,
    pub commands: Vec<FinalCommand>,
}

#[derive(Debug, Clone)]
pub struct FinalCommand {
    pub id: String,
    pub device: String,
    pub status: String,
    pub tag: Option<String>,
    pub key: Option<String>,
    pub output: Option<Value>,
    /// Milliseconds since the epoch, as the gateways stamped them.
    pub issued_at: u64,
    pub expires_at: u64,
}

pub async fn final_state(path: &Path) -> Final {
    let pool = open(path).await;
    let mut f = Final::default();
    for r in sqlx::query("SELECT device, desired, version FROM shadows")
        .fetch_all(&pool)
        .await
        .expect("shadows")
    {
        let desired: Value = serde_json::from_str(r.get::<&str, _>(1)).unwrap_or(Value::Null);
        f.shadows
            .insert(r.get(0), (r.get::<i64, _>(2) as u64, desired["x"].as_u64()));
    }
    for r in sqlx::query("SELECT id, labels FROM devices")
        .fetch_all(&pool)
        .await
        .expect("devices")
    {
        let labels: Value = serde_json::from_str(r.get::<&str, _>(1)).unwrap_or(Value::Null);
        f.devices
            .insert(r.get(0), labels["op"].as_str().map(str::to_string));
    }
    for r in sqlx::query(
        "SELECT id, device, status, params, idempotency_key, output, issued_at, expires_at \
         FROM commands ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("commands")
    {
        let params: Value = serde_json::from_str(r.get::<&str, _>(3)).unwrap_or(Value::Null);
        let output: Option<String> = r.get(5);
        f.commands.push(FinalCommand {
            id: r.get(0),
            device: r.get(1),
            status: r.get(2),
            tag: params["op"].as_str().map(str::to_string),
            key: r.get(4),
            output: output.and_then(|o| serde_json::from_str(&o).ok()),
            issued_at: r.get::<i64, _>(6) as u64,
            expires_at: r.get::<i64, _>(7) as u64,
        });
    }
    pool.close().await;
    f
}

enum Ev<O, R> {
    Invoke(Thread, O),
    Return(Thread, R),
}

/// Feeds one object's events to a `LinearizabilityTester`; `Ok(true)` if
/// the history is linearizable.
fn run_tester<S>(init: S, events: Vec<Ev<S::Op, S::Ret>>) -> Result<bool, String>
where
    S: SequentialSpec + Clone,
    S::Op: Clone + Debug,
    S::Ret: Clone + Debug + PartialEq,
{
    let mut t = LinearizabilityTester::new(init);
    for e in events {
        match e {
            Ev::Invoke(th, op) => {
                t.on_invoke(th, op)?;
            }
            Ev::Return(th, r) => {
                t.on_return(th, r)?;
            }
        }
    }
    Ok(t.is_consistent())
}

/// The events of one object, in real-time order, converted by `conv`.
fn events<O, R>(
    recs: &[&Record],
    conv: impl Fn(&Op, Option<&Ret>) -> Option<(O, Option<R>)>,
    final_read: Option<(O, R)>,
) -> Vec<Ev<O, R>> {
    let mut evs: Vec<(u64, Ev<O, R>)> = Vec::new();
    let mut last = 0;
    for r in recs {
        last = last.max(r.invoke_seq).max(r.return_seq);
        match &r.outcome {
            Some(Outcome::Ok(ret)) => {
                if let Some((op, Some(ret))) = conv(&r.op, Some(ret)) {
                    evs.push((r.invoke_seq, Ev::Invoke(r.thread, op)));
                    evs.push((r.return_seq, Ev::Return(r.thread, ret)));
                }
            }
            Some(Outcome::Unknown(_)) | None => {
                if let Some((op, _)) = conv(&r.op, None) {
                    evs.push((r.invoke_seq, Ev::Invoke(r.thread, op)));
                }
            }
            Some(Outcome::Fail(_)) => {}
        }
    }
    if let Some((op, ret)) = final_read {
        evs.push((last + 1, Ev::Invoke((FINAL_PROCESS, 0), op)));
        evs.push((last + 2, Ev::Return((FINAL_PROCESS, 0), ret)));
    }
    evs.sort_by_key(|(s, _)| *s);
    evs.into_iter().map(|(_, e)| e).collect()
}

fn shadow_conv(op: &Op, ret: Option<&Ret>) -> Option<(ShadowOp, Option<ShadowRet>)> {
    let Op::Shadow(op) = op else { return None };
    // An unanswered read tells nothing: left out.
    if ret.is_none() && *op == ShadowOp::Read {
        return None;
    }
    let ret = match ret {
        Some(Ret::Shadow(r)) => Some(r.clone()),
        _ => None,
    };
    Some((op.clone(), ret))
}

fn command_conv(op: &Op, ret: Option<&Ret>) -> Option<(CmdOp, Option<CmdRet>)> {
    let Op::Command(op) = op else { return None };
    if ret.is_none() && *op == CmdOp::Read {
        return None;
    }
    let ret = match ret {
        Some(Ret::Command(r)) => Some(*r),
        _ => None,
    };
    Some((*op, ret))
}

type DevOp = WORegisterOp<String>;
type DevRet = WORegisterRet<String>;

fn device_conv(op: &Op, ret: Option<&Ret>) -> Option<(DevOp, Option<DevRet>)> {
    let Op::Device(op) = op else { return None };
    if ret.is_none() && *op == WORegisterOp::Read {
        return None;
    }
    let ret = match ret {
        Some(Ret::Device(r)) => Some(r.clone()),
        _ => None,
    };
    Some((op.clone(), ret))
}

/// Outcome of the linearizability check of one object.
#[derive(Debug)]
pub enum Verdict {
    Linearizable,
    Violation(String),
    /// The tester did not finish within its budget.
    Undecided,
}

/// One object's check, run on a worker thread.
type Job = Box<dyn FnOnce() -> Result<bool, String> + Send>;

/// Checks every object (in parallel, each within `budget`).
pub fn linearizability(
    records: &[Record],
    world: &World,
    fin: &Final,
    budget: Duration,
) -> (BTreeMap<Obj, Verdict>, Vec<String>) {
    let mut by_obj: BTreeMap<Obj, Vec<&Record>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.linearizable) {
        by_obj.entry(r.obj.clone()).or_default().push(r);
    }
    let mut jobs: Vec<(Obj, Job)> = Vec::new();
    // Final reads: objects the workload never touched with a linearizable op
    // are checked too (e.g. an issue that certainly failed but shows up).
    for i in 0..world.commands.len() {
        by_obj.entry(Obj::Command(i)).or_default();
    }
    for (obj, recs) in &by_obj {
        let job: Job = match obj {
            Obj::Shadow(d) => {
                let fr = fin.shadows.get(d).map(|(version, value)| {
                    (
                        ShadowOp::Read,
                        ShadowRet::Value {
                            version: *version,
                            value: *value,
                        },
                    )
                });
                let evs = events(recs, shadow_conv, fr);
                Box::new(move || run_tester(ShadowReg::default(), evs))
            }
            Obj::Command(i) => {
                let tag = &world.commands[*i].tag;
                let found = fin
                    .commands
                    .iter()
                    .find(|c| c.tag.as_deref() == Some(tag.as_str()));
                let ret = match found.and_then(|c| Status::parse(&c.status)) {
                    Some(s) => CmdRet::Found(s),
                    None => CmdRet::NotFound,
                };
                let evs = events(recs, command_conv, Some((CmdOp::Read, ret)));
                Box::new(move || run_tester(CmdReg::default(), evs))
            }
            Obj::Device(id) => {
                let label = fin.devices.get(id).cloned().flatten();
                let evs = events(
                    recs,
                    device_conv,
                    Some((WORegisterOp::Read, WORegisterRet::ReadOk(label))),
                );
                Box::new(move || run_tester(WORegister::<String>(None), evs))
            }
        };
        jobs.push((obj.clone(), job));
    }
    let mut verdicts = BTreeMap::new();
    let mut errors = Vec::new();
    // Two at a time: the machine running this has two cores.
    let queue = std::sync::Arc::new(std::sync::Mutex::new(jobs));
    let (tx, rx) = std::sync::mpsc::channel();
    let total = queue.lock().expect("jobs").len();
    for _ in 0..2 {
        let q = queue.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            loop {
                let Some((obj, job)) = q.lock().expect("jobs").pop() else {
                    return;
                };
                let started = std::time::Instant::now();
                let r = job();
                if tx.send((obj, r, started.elapsed())).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + budget;
    while verdicts.len() < total {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((obj, r, took)) => {
                if took > Duration::from_secs(5) {
                    eprintln!("chaos: checking {obj:?} took {took:?}");
                }
                let v = match r {
                    Ok(true) => Verdict::Linearizable,
                    Ok(false) => Verdict::Violation(format!("{obj:?} is not linearizable")),
                    Err(e) => {
                        errors.push(format!("{obj:?}: invalid history: {e}"));
                        Verdict::Violation(e)
                    }
                };
                verdicts.insert(obj, v);
            }
            Err(_) => break,
        }
    }
    for obj in by_obj.keys() {
        verdicts.entry(obj.clone()).or_insert(Verdict::Undecided);
    }
    (verdicts, errors)
}

/// One object's operations, for a violation report.
pub fn describe(records: &[Record], obj: &Obj) -> String {
    let mut out = String::new();
    for r in records.iter().filter(|r| &r.obj == obj) {
        out.push_str(&format!(
            "  [{:>9.3}s → {:>9.3}s] client {:>3} thread {:?} gw{} {:<24} {:?} → {:?} (index {:?}, min-index {:?})\n",
            r.invoke_at.as_secs_f64(),
            r.return_at.as_secs_f64(),
            r.client as i64,
            r.thread,
            r.gateway,
            r.kind,
            r.op,
            r.outcome,
            r.index,
            r.min_index,
        ));
    }
    out
}

/// Floors a client's acknowledged writes set for its later local reads.
#[derive(Debug, Clone, Copy)]
enum Floor {
    Version(u64),
    Exists,
    Status(Status),
}

/// Read-your-writes of local reads with `Entente-Min-Index`, and one value
/// per shadow version across every observation.
pub fn sessions(records: &[Record], fin: &Final, violations: &mut Vec<String>) {
    let mut by_client: BTreeMap<usize, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_client.entry(r.client).or_default().push(r);
    }
    for (client, recs) in by_client {
        let mut floors: HashMap<&Obj, Vec<(u64, Floor)>> = HashMap::new();
        for r in recs {
            let (Some(Outcome::Ok(ret)), Some(index)) = (&r.outcome, r.index) else {
                continue;
            };
            let floor = match (&r.op, ret) {
                (_, Ret::Shadow(ShadowRet::Written { version })) => Some(Floor::Version(*version)),
                (_, Ret::Shadow(ShadowRet::Mismatch { current })) => Some(Floor::Version(*current)),
                (_, Ret::Command(CmdRet::Created | CmdRet::Existing(_))) => Some(Floor::Exists),
                (_, Ret::Command(CmdRet::Canceled)) => Some(Floor::Status(Status::Canceled)),
                (_, Ret::Command(CmdRet::Finished(Some(t)))) => Some(Floor::Status(*t)),
                _ => None,
            };
            if r.linearizable {
                if let Some(f) = floor {
                    floors.entry(&r.obj).or_default().push((index, f));
                }
                continue;
            }
            let Some(min) = r.min_index else { continue };
            for (at, f) in floors.get(&r.obj).map(Vec::as_slice).unwrap_or(&[]) {
                if *at > min {
                    continue;
                }
                let ok = match (f, ret) {
                    (Floor::Version(v), Ret::Shadow(ShadowRet::Value { version, .. })) => {
                        version >= v
                    }
                    (Floor::Exists, Ret::Command(CmdRet::Found(_))) => true,
                    (Floor::Status(s), Ret::Command(CmdRet::Found(t))) => s == t,
                    (_, Ret::Command(CmdRet::NotFound)) => false,
                    _ => true,
                };
                if !ok {
                    violations.push(format!(
                        "read-your-writes: client {client}'s local read of {:?} on gateway {} with \
                         Entente-Min-Index {min} returned {ret:?}, but its write at index {at} \
                         had left {f:?}",
                        r.obj, r.gateway
                    ));
                }
            }
        }
    }
    // One value per version.
    let mut seen: HashMap<(String, u64), (Option<u64>, String)> = HashMap::new();
    let mut note = |dev: &str, version: u64, value: Option<u64>, by: String| match seen
        .get(&(dev.to_string(), version))
    {
        Some((v, first)) if *v != value => violations.push(format!(
            "shadow of {dev} at version {version}: {first} saw x={v:?}, {by} saw x={value:?}"
        )),
        Some(_) => {}
        None => {
            seen.insert((dev.to_string(), version), (value, by));
        }
    };
    for r in records {
        let Obj::Shadow(dev) = &r.obj else { continue };
        match (&r.op, &r.outcome) {
            (
                Op::Shadow(ShadowOp::Write { value, .. }),
                Some(Outcome::Ok(Ret::Shadow(ShadowRet::Written { version }))),
            ) => note(
                dev,
                *version,
                Some(*value),
                format!("a write (client {}, gw{})", r.client, r.gateway),
            ),
            (_, Some(Outcome::Ok(Ret::Shadow(ShadowRet::Value { version, value })))) => note(
                dev,
                *version,
                *value,
                format!(
                    "a {} read (client {}, gw{})",
                    if r.linearizable {
                        "linearizable"
                    } else {
                        "local"
                    },
                    r.client,
                    r.gateway
                ),
            ),
            _ => {}
        }
    }
    for (dev, (version, value)) in &fin.shadows {
        note(dev, *version, *value, "the final state".into());
    }
    for (dev, (version, value)) in &fin.shadows {
        if *version == 0 && value.is_some() {
            violations.push(format!("shadow of {dev} has x={value:?} at version 0"));
        }
    }
}

/// Commands, registrations and deliveries against the final state.
pub fn final_checks(
    records: &[Record],
    world: &World,
    fin: &Final,
    deliveries: &[Delivery],
    violations: &mut Vec<String>,
) {
    let by_id: HashMap<&str, &FinalCommand> =
        fin.commands.iter().map(|c| (c.id.as_str(), c)).collect();
    let mut by_tag: HashMap<&str, Vec<&FinalCommand>> = HashMap::new();
    let mut by_key: HashMap<(&str, &str), Vec<&FinalCommand>> = HashMap::new();
    for c in &fin.commands {
        if let Some(t) = &c.tag {
            by_tag.entry(t.as_str()).or_default().push(c);
        }
        if let Some(k) = &c.key {
            by_key
                .entry((c.device.as_str(), k.as_str()))
                .or_default()
                .push(c);
        }
        if !Status::parse(&c.status).is_some_and(Status::is_terminal) {
            violations.push(format!(
                "command {} ({:?}, device {}) is {} after the faults stopped and the group healed",
                c.id, c.tag, c.device, c.status
            ));
        }
        if matches!(c.status.as_str(), "succeeded" | "failed") {
            let ok = c.status == "succeeded";
            let out = c.output.clone().unwrap_or(Value::Null);
            if out["device"] != c.device.as_str() || out["ok"] != ok || expected_result(&c.id) != ok
            {
                violations.push(format!(
                    "command {} of {} is {} with output {out}: not the result its device sent",
                    c.id, c.device, c.status
                ));
            }
        }
    }
    for (tag, cs) in &by_tag {
        if cs.len() > 1 {
            let ids: Vec<&str> = cs.iter().map(|c| c.id.as_str()).collect();
            violations.push(format!(
                "issue request {tag} produced {} commands: {ids:?}",
                cs.len()
            ));
        }
    }
    for ((dev, key), cs) in &by_key {
        if cs.len() > 1 {
            let ids: Vec<&str> = cs.iter().map(|c| c.id.as_str()).collect();
            violations.push(format!(
                "idempotency key {key} of {dev} produced {} commands: {ids:?}",
                cs.len()
            ));
        }
    }
    let tags: HashMap<&str, &super::workload::CmdObj> =
        world.commands.iter().map(|o| (o.tag.as_str(), o)).collect();
    for c in &fin.commands {
        match c.tag.as_deref().and_then(|t| tags.get(t)) {
            None => violations.push(format!(
                "command {} ({:?}) of {} was never issued by a client",
                c.id, c.tag, c.device
            )),
            Some(o) if o.device != c.device || o.key != c.key => violations.push(format!(
                "command {} was issued for {} with key {:?}, but is for {} with key {:?}",
                c.id, o.device, o.key, c.device, c.key
            )),
            Some(_) => {}
        }
    }
    // Acknowledged issues and registrations are there.
    for (i, o) in world.commands.iter().enumerate() {
        let acked = records.iter().any(|r| {
            r.obj == Obj::Command(i)
                && matches!(
                    r.outcome,
                    Some(Outcome::Ok(Ret::Command(
                        CmdRet::Created | CmdRet::Existing(_)
                    )))
                )
        });
        if !acked {
            continue;
        }
        for cid in &o.cids {
            if !by_id.contains_key(cid.as_str()) {
                violations.push(format!(
                    "acknowledged command {cid} ({}, device {}) is missing after heal",
                    o.tag, o.device
                ));
            }
        }
    }
    for r in records {
        if let (
            Obj::Device(id),
            Op::Device(WORegisterOp::Write(tag)),
            Some(Outcome::Ok(Ret::Device(WORegisterRet::WriteOk))),
        ) = (&r.obj, &r.op, &r.outcome)
            && fin.devices.get(id) != Some(&Some(tag.clone()))
        {
            violations.push(format!(
                "acknowledged registration of {id} ({tag}) is not in the final state (found {:?})",
                fin.devices.get(id)
            ));
        }
    }
    // Deliveries.
    let mut wrong = 0;
    for d in deliveries {
        let expected_topic = entente_protocol::commands_topic(&d.device);
        match by_id.get(d.cid.as_str()) {
            Some(c) if c.device == d.device && d.topic == expected_topic => {}
            Some(c) => {
                wrong += 1;
                if wrong <= 5 {
                    violations.push(format!(
                        "command {} of device {} was delivered to device {} (on {}, via gw{})",
                        c.id, c.device, d.device, d.topic, d.gateway
                    ));
                }
            }
            None => {
                wrong += 1;
                if wrong <= 5 {
                    violations.push(format!(
                        "device {} received command {} that is not in the final state (via gw{})",
                        d.device, d.cid, d.gateway
                    ));
                }
            }
        }
    }
    if wrong > 5 {
        violations.push(format!("… {wrong} wrong deliveries in all"));
    }
}
