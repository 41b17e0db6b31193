//! Issue 14's goal for a large snapshot: no more than 50 ms added to the
//! p99.9 of writes while a snapshot of a ≥ 1 GB state is taken and sent
//! to a new member.
//!
//! Three gateways in one process (real sockets, fsync on, default timings:
//! 20 ms ticks, elections after 200–400 ms of silence; the default
//! snapshot policy: one every 64 MiB of log) are filled with
//! `SNAP_DEVICES` devices (default 1,000,000) through
//! `POST /v1/devices/batch`, 1,000 per request, three requests in flight;
//! each device has three labels and ~650 bytes of attributes, so the state
//! database is over 1 GB at the default. Once filled, every member is asked
//! for a snapshot ([`coordinator::node::Node::request_snapshot`]), so
//! that both measured phases start far from the log-size trigger: their
//! small writes add a few megabytes of log, and no snapshot is built in
//! them but the one asked for.
//!
//! The load, the same in both phases: small desired-state patches
//! (`PATCH /v1/devices/{id}/shadow`, a seeded choice of device) to the
//! leader at a fixed offered rate, `SNAP_RATE` a second (default 500, a
//! fifth of what the group commits here), at most 128 in flight. Each
//! write's latency counts from when it was due to be sent, so a stall
//! counts in full for every write it delays, not only for those in flight
//! (a closed loop would send fewer writes during a stall and hide it).
//!
//! 1. Baseline: `SNAP_SECS` seconds (default 30), no snapshot and no new
//!    member, after 5 s of the same load not measured (the snapshots
//!    taken after the fill leave old images and log segments to free).
//! 2. Snapshot: the leader is asked for a snapshot of the whole state;
//!    once it is stored, a fourth gateway (started with `--join`) is added
//!    as a learner, is streamed that snapshot, installs it and catches up.
//!    The phase ends once it has applied everything committed when it was
//!    added (its length is what that takes, not `SNAP_SECS`).
//!
//! Printed: the state database's and the image's sizes; per phase (and per
//! part of the snapshot phase) writes, p50, p99, p99.9 and max; the build
//! time, the time to send and install the image and to catch up; snapshots
//! each member built in each phase; the seconds of each phase whose
//! writes were slowest (where a stall fell); the machine's load averages;
//! the p99.9 added by the snapshot against the goal. With `RUST_LOG` set
//! (say `warn,coordinator=info`) the gateways' logs go to stderr: a
//! storage call that held up a member's Raft loop is logged there.
//! Figures are reported, not asserted: the bench exits non-zero only on
//! an error — a write that failed, an election (a member's term or leader
//! changed), a learner that did not catch up within 10 minutes or was
//! not sent the snapshot taken in the phase.
//!
//! One process, as `catchup` and `tests/snapshot_load.rs`: the bench asks
//! the leader's node for its snapshot and reads every member's status
//! directly (no route asks for a snapshot). The members and the load share
//! one runtime, as processes would share the machine's two cores; a
//! runtime held up shows in the latencies, counted from when each write
//! was due.
//!
//! `cargo bench -p gateway --bench snapshot_tail`; a quick run:
//! `SNAP_DEVICES=20000 SNAP_SECS=5 cargo bench -p gateway --bench
//! snapshot_tail`. The data lives in a temp dir (`TMPDIR`), removed at
//! the end; at the default it needs about 20 GB: each of the four members
//! holds the state database, up to two images and one being built.

#[path = "../tests/support/group.rs"]
mod group;
#[path = "../tests/support/ports.rs"]
mod ports;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use gateway::Gateway;
use group::{
    admin_token, dir_size, member_config, percentile, seeded_text, settled_leader, start_group,
};
use ports::reserve_ports;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

const SECRET: &str = "snapshot-tail-bench-secret";
/// Devices per `POST /v1/devices/batch` (its limit).
const BATCH: usize = 1_000;
/// Batches in flight while filling (a gateway works on at most four).
const FILL_IN_FLIGHT: usize = 3;
/// Letters of each device's `blob` attribute.
const BLOB_BYTES: usize = 600;
/// Writes of the load in flight at most.
const MAX_IN_FLIGHT: usize = 128;
/// The goal for the p99.9 added by the snapshot.
const GOAL: Duration = Duration::from_millis(50);
/// The load runs this long, not measured, before the baseline.
const WARM_UP: Duration = Duration::from_secs(5);
/// How long the new member may take to catch up.
const CATCH_UP_BOUND: Duration = Duration::from_secs(600);
/// How long a snapshot may take to be built and stored.
const BUILD_BOUND: Duration = Duration::from_secs(900);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Device `i` as `POST /v1/devices` takes it: three labels and ~650 bytes
/// of attributes that differ per device (seeded: every run writes the same).
fn device(i: usize) -> Value {
    json!({
        "id": format!("dev-{i:07}"),
        "labels": {
            "site": format!("site-{}", i % 100),
            "fleet": format!("fleet-{}", i % 7),
            "rack": format!("rack-{}", i % 1000),
        },
        "attributes": {
            "model": "X2",
            "firmware": "1.4.2",
            "serial": i,
            "blob": seeded_text(i as u64, BLOB_BYTES),
        },
    })
}

/// An HTTP client of the group, with the admin token.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: Arc<str>,
    token: Arc<str>,
}

impl Client {
    fn new(gw: &Gateway, token: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(MAX_IN_FLIGHT)
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            base: format!("http://{}", gw.http_addr).into(),
            token: token.into(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<(u16, String), String> {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&*self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let status = r.status().as_u16();
        Ok((status, r.text().await.unwrap_or_default()))
    }
}

/// Registers devices `0..n` in batches of [`BATCH`], [`FILL_IN_FLIGHT`]
/// at once. A batch refused for want of a leader is sent again (and
/// "already registered" after that means it had been applied); any other
/// refusal stops the bench. Returns how many were sent again.
async fn fill(client: &Client, n: usize) -> usize {
    let batches = n.div_ceil(BATCH);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..FILL_IN_FLIGHT {
        let (client, next, done) = (client.clone(), next.clone(), done.clone());
        workers.spawn(async move {
            let mut resent = 0;
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return resent;
                }
                let devices: Vec<Value> =
                    (b * BATCH..((b + 1) * BATCH).min(n)).map(device).collect();
                let body = json!({ "devices": devices });
                let mut again = 0;
                loop {
                    let (status, answer) = client
                        .send(reqwest::Method::POST, "/v1/devices/batch", &body)
                        .await
                        .unwrap_or_else(|e| panic!("batch {b}: {e}"));
                    match status {
                        201 => break,
                        409 if again > 0 => break,
                        503 if again < 100 => {
                            again += 1;
                            resent += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        _ => panic!("batch {b}: {status} {answer}"),
                    }
                }
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % (batches / 10).max(1) == 0 {
                    println!(
                        "  {:>7} devices registered ({:.0} s)",
                        (d * BATCH).min(n),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        });
    }
    let mut resent = 0;
    while let Some(r) = workers.join_next().await {
        resent += r.expect("fill worker");
    }
    resent
}

/// What a load ran: each write's due time (from the start of the load)
/// and latency, and the failures.
#[derive(Default)]
struct Run {
    writes: Vec<(Duration, Duration)>,
    failures: Vec<String>,
}

/// A write's (due, latency), or why it failed.
type Write = Result<(Duration, Duration), String>;

fn take(done: Result<Write, tokio::task::JoinError>, run: &mut Run) {
    match done {
        Ok(Ok(w)) => run.writes.push(w),
        Ok(Err(e)) => run.failures.push(e),
        Err(e) => run.failures.push(format!("write task: {e}")),
    }
}

/// Sends a desired-state patch every `1 / rate` seconds until `stop` is
/// set, at most [`MAX_IN_FLIGHT`] at once, each to a device drawn with
/// `seed`.
async fn load(
    client: Client,
    devices: usize,
    rate: f64,
    seed: u64,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Run {
    let period = Duration::from_secs_f64(1.0 / rate);
    let gate = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut run = Run::default();
    let mut x = seed | 1;
    let mut k: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = start + period * k;
        k += 1;
        tokio::time::sleep_until(due).await;
        let permit = gate.clone().acquire_owned().await.expect("gate");
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let path = format!("/v1/devices/dev-{:07}/shadow", x % devices as u64);
        let body = json!({"desired": {"setpoint": k % 100, "mode": "eco"}});
        let client = client.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let due: Instant = due;
            let answer = client.send(reqwest::Method::PATCH, &path, &body).await;
            let took = due.elapsed();
            match answer {
                Ok((200, _)) => Ok((due - start, took)),
                Ok((status, body)) => Err(format!("PATCH {path}: {status} {body} after {took:?}")),
                Err(e) => Err(format!("PATCH {e} after {took:?}")),
            }
        });
        while let Some(done) = tasks.try_join_next() {
            take(done, &mut run);
        }
    }
    while let Some(done) = tasks.join_next().await {
        take(done, &mut run);
    }
    run
}

/// Starts the load; [`Load::finish`] stops it and returns what it ran.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Run>,
    started: Instant,
}

impl Load {
    fn start(client: &Client, devices: usize, rate: f64, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let task = tokio::spawn(load(
            client.clone(),
            devices,
            rate,
            seed,
            started,
            stop.clone(),
        ));
        Load {
            stop,
            task,
            started,
        }
    }

    async fn finish(self) -> Run {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load")
    }
}

/// Latency figures of the writes due within `from..to` (from the start of
/// the load): count, p50, p99, p99.9, max.
fn figures(run: &Run, from: Duration, to: Duration) -> (usize, [Duration; 4]) {
    let mut l: Vec<Duration> = run
        .writes
        .iter()
        .filter(|(due, _)| *due >= from && *due < to)
        .map(|(_, took)| *took)
        .collect();
    l.sort();
    let max = l.last().copied().unwrap_or_default();
    (
        l.len(),
        [
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            percentile(&l, 0.999),
            max,
        ],
    )
}

fn row(name: &str, (n, f): (usize, [Duration; 4])) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<34} {n:>7} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        ms(f[0]),
        ms(f[1]),
        ms(f[2]),
        ms(f[3])
    );
}

/// The seconds of a run (by due time) whose slowest writes were slowest:
/// where a stall fell.
fn slowest_seconds(run: &Run, n: usize) -> String {
    let mut worst: BTreeMap<u64, (Duration, usize)> = BTreeMap::new();
    for (due, took) in &run.writes {
        let w = worst.entry(due.as_secs()).or_default();
        w.0 = w.0.max(*took);
        w.1 += usize::from(*took > Duration::from_millis(100));
    }
    let mut worst: Vec<_> = worst.into_iter().collect();
    worst.sort_by_key(|w| std::cmp::Reverse(w.1.0));
    worst
        .iter()
        .take(n)
        .map(|(s, (max, slow))| {
            format!(
                "+{s} s: max {:.0} ms, {slow} over 100 ms",
                max.as_secs_f64() * 1e3
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Each member's (term, leader) and snapshots built.
fn views(gws: &BTreeMap<u64, Gateway>) -> BTreeMap<u64, ((u64, Option<u64>), u64)> {
    gws.iter()
        .map(|(&id, g)| {
            let s = g.node().status();
            (id, ((s.raft.term, s.raft.leader), s.snapshots_built))
        })
        .collect()
}

/// Records an election between `before` and now, and prints the snapshots
/// each member built meanwhile.
fn check_phase(
    phase: &str,
    gws: &BTreeMap<u64, Gateway>,
    before: &BTreeMap<u64, ((u64, Option<u64>), u64)>,
    errors: &mut Vec<String>,
) {
    let now = views(gws);
    let mut built = Vec::new();
    for (id, (view, snaps)) in &now {
        let (was, snaps_before) = before[id];
        if *view != was {
            errors.push(format!(
                "{phase}: an election: gateway {id} went from (term, leader) {was:?} to {view:?}"
            ));
        }
        built.push(format!("g{id} +{}", snaps - snaps_before));
    }
    println!("{phase}: snapshots built: {}", built.join(", "));
}

/// Waits (at most `bound`) until every member has built a snapshot more
/// than `before` says; returns the build figures (time, image bytes) of
/// each.
async fn wait_built(
    gws: &BTreeMap<u64, Gateway>,
    before: &BTreeMap<u64, ((u64, Option<u64>), u64)>,
    bound: Duration,
) -> Result<BTreeMap<u64, (Duration, u64)>, String> {
    let deadline = Instant::now() + bound;
    loop {
        let done: BTreeMap<u64, (Duration, u64)> = gws
            .iter()
            .filter_map(|(id, g)| {
                let s = g.node().status();
                (s.snapshots_built > before[id].1)
                    .then_some(s.last_snapshot)
                    .flatten()
                    .map(|f| (*id, f))
            })
            .collect();
        if done.len() == gws.len() {
            return Ok(done);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no snapshot stored within {bound:?} on gateways other than {:?}",
                done.keys().collect::<Vec<_>>()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The machine's load averages (1, 5, 15 minutes), where the system
/// tells them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// What happened in the snapshot phase, as offsets from its start.
#[derive(Default)]
struct Timeline {
    /// The leader's snapshot was stored.
    stored: Duration,
    /// Its build (as the leader's node counts it) and image bytes.
    build: (Duration, u64),
    /// Its index.
    index: u64,
    /// The learner was added.
    added: Duration,
    /// It had installed a snapshot (and at which index).
    installed: Option<(Duration, u64)>,
    /// It had applied everything committed when it was added (`target`).
    caught_up: Duration,
    target: u64,
}

/// The snapshot phase's events, the load running meanwhile (started at
/// `t0`): the leader builds a snapshot when asked; once it is stored the
/// fourth gateway is added as a learner, installs it and catches up.
async fn snapshot_phase(
    gws: &BTreeMap<u64, Gateway>,
    leader: u64,
    client: &Client,
    fourth: SocketAddr,
    g4: &Gateway,
    t0: Instant,
) -> Result<Timeline, String> {
    let mut tl = Timeline::default();
    let node = gws[&leader].node();
    let built_before = node.status().snapshots_built;
    node.request_snapshot()
        .await
        .map_err(|e| format!("asking the leader for a snapshot: {e}"))?;
    let deadline = Instant::now() + BUILD_BOUND;
    loop {
        let s = node.status();
        if s.snapshots_built > built_before
            && let Some(build) = s.last_snapshot
        {
            tl.stored = t0.elapsed();
            tl.build = build;
            tl.index = s.raft.snapshot_index;
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the leader stored no snapshot within {BUILD_BOUND:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = client
        .send(
            reqwest::Method::POST,
            "/v1/cluster/members",
            &json!({"id": 4, "address": fourth.to_string(), "suffrage": "learner"}),
        )
        .await?;
    if status != 200 {
        return Err(format!("adding the learner: {status} {body}"));
    }
    tl.added = t0.elapsed();
    tl.target = node.status().raft.commit;
    let deadline = Instant::now() + CATCH_UP_BOUND;
    loop {
        let s4 = g4.node().status().raft;
        if tl.installed.is_none() && s4.snapshot_index > 0 && s4.applied >= s4.snapshot_index {
            tl.installed = Some((t0.elapsed(), s4.snapshot_index));
        }
        if s4.applied >= tl.target {
            tl.caught_up = t0.elapsed();
            return Ok(tl);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the learner did not catch up within {CATCH_UP_BOUND:?}: applied {} of {} \
                 (snapshot at {})",
                s4.applied, tl.target, s4.snapshot_index
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let devices: usize = if quick {
        2_000
    } else {
        env_or("SNAP_DEVICES", 1_000_000usize).max(1)
    };
    let secs: u64 = if quick { 2 } else { env_or("SNAP_SECS", 30) };
    let rate: f64 = env_or("SNAP_RATE", 500.0f64).clamp(1.0, 100_000.0);
    let mut errors: Vec<String> = Vec::new();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = |id: u64| tmp.path().join(format!("g{id}"));
    let mut ports = reserve_ports(4);
    let fourth = ports.pop().expect("port");
    let peers: BTreeMap<u64, SocketAddr> = (1..=3).zip(ports).collect();
    let gws = start_group(&peers, |id| member_config(tmp.path(), id, &peers, SECRET)).await;
    let token = admin_token(&gws);
    let leader = settled_leader(&gws, Duration::from_secs(30)).await;
    println!(
        "snapshot_tail: {devices} devices, {rate} writes/s, baseline {secs} s, data in {}; \
         load average {}",
        tmp.path().display(),
        loadavg()
    );

    // Fill.
    let t = Instant::now();
    let resent = fill(&Client::new(&gws[&leader], &token), devices).await;
    let leader = settled_leader(&gws, Duration::from_secs(60)).await;
    let commit = gws[&leader].node().status().raft.commit;
    for (id, g) in &gws {
        if let Err(e) = g.node().wait_applied(commit, CATCH_UP_BOUND).await {
            panic!("gateway {id} did not apply the fill: {e}");
        }
    }
    println!(
        "filled in {:.1} s ({resent} batches sent again for want of a leader; the leader built \
         {} snapshots meanwhile); load average {}",
        t.elapsed().as_secs_f64(),
        gws[&leader].node().status().snapshots_built,
        loadavg()
    );
    // Every member snapshots the whole state now: the phases start far
    // from the log-size trigger.
    let t = Instant::now();
    let before = views(&gws);
    for g in gws.values() {
        g.node()
            .request_snapshot()
            .await
            .expect("ask for a snapshot");
    }
    let built = wait_built(&gws, &before, BUILD_BOUND)
        .await
        .expect("snapshots after the fill");
    let db = dir(leader).join("state.db");
    println!(
        "every member snapshotted the state in {:.1} s (builds: {}); the leader's state.db \
         {:.1} MB (-wal {:.1} MB), its image {:.1} MB",
        t.elapsed().as_secs_f64(),
        built
            .iter()
            .map(|(id, (took, _))| format!("g{id} {:.1} s", took.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        mb(file_size(&db)),
        mb(file_size(&dir(leader).join("state.db-wal"))),
        mb(built[&leader].1),
    );
    let client = Client::new(&gws[&leader], &token);

    // Warm-up, not measured: what the snapshots just taken leave behind
    // (old images and log segments being freed) is not the baseline's.
    let load = Load::start(&client, devices, rate, 0x5eed_0000);
    tokio::time::sleep(WARM_UP).await;
    let warm_up = load.finish().await;
    println!(
        "warm-up ({} s): slowest seconds: {}",
        WARM_UP.as_secs(),
        slowest_seconds(&warm_up, 3)
    );

    // Baseline.
    let before = views(&gws);
    let load = Load::start(&client, devices, rate, 0x5eed_0001);
    tokio::time::sleep(Duration::from_secs(secs.max(1))).await;
    let baseline = load.finish().await;
    check_phase("baseline", &gws, &before, &mut errors);
    println!(
        "baseline: load average {}; slowest seconds: {}",
        loadavg(),
        slowest_seconds(&baseline, 5)
    );

    // The fourth gateway, started now so that its start is not in the phase.
    let mut all = peers.clone();
    all.insert(4, fourth);
    let mut c4 = member_config(tmp.path(), 4, &all, SECRET);
    c4.join = true;
    let g4 = gateway::start(c4).await.expect("start gateway 4");

    // Snapshot phase.
    let before = views(&gws);
    let load = Load::start(&client, devices, rate, 0x5eed_0002);
    let timeline = snapshot_phase(&gws, leader, &client, fourth, &g4, load.started).await;
    let lasted = load.started.elapsed();
    let snapshot = load.finish().await;
    check_phase("snapshot", &gws, &before, &mut errors);
    println!(
        "snapshot: load average {}; slowest seconds: {}",
        loadavg(),
        slowest_seconds(&snapshot, 5)
    );

    let all_time = Duration::MAX;
    println!();
    println!(
        "{:<34} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "phase", "writes", "p50 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    let base = figures(&baseline, Duration::ZERO, all_time);
    row(&format!("baseline ({secs} s)"), base);
    let snap = figures(&snapshot, Duration::ZERO, all_time);
    row(&format!("snapshot ({:.1} s)", lasted.as_secs_f64()), snap);
    match &timeline {
        Ok(tl) => {
            row(
                "  while built and stored",
                figures(&snapshot, Duration::ZERO, tl.stored),
            );
            row(
                "  while sent, installed, caught up",
                figures(&snapshot, tl.added, tl.caught_up),
            );
            println!();
            println!(
                "snapshot at index {}: image {:.1} MB, built and stored in {:.1} s (asked at \
                 the phase's start)",
                tl.index,
                mb(tl.build.1),
                tl.build.0.as_secs_f64()
            );
            match tl.installed {
                Some((at, index)) => println!(
                    "learner added at +{:.1} s; sent and installed the snapshot at index \
                     {index} in {:.1} s; caught up to index {} in {:.1} s",
                    tl.added.as_secs_f64(),
                    (at - tl.added).as_secs_f64(),
                    tl.target,
                    (tl.caught_up - tl.added).as_secs_f64()
                ),
                None => println!(
                    "learner added at +{:.1} s; caught up to index {} in {:.1} s from the log \
                     (it was sent no snapshot)",
                    tl.added.as_secs_f64(),
                    tl.target,
                    (tl.caught_up - tl.added).as_secs_f64()
                ),
            }
            if tl.installed.is_none_or(|(_, index)| index < tl.index) {
                errors.push(format!(
                    "the learner was not sent the snapshot taken in the phase (index {})",
                    tl.index
                ));
            }
        }
        Err(e) => errors.push(e.clone()),
    }
    let added = snap.1[2].as_secs_f64() - base.1[2].as_secs_f64();
    println!(
        "p99.9 added by the snapshot: {:.1} ms (goal ≤ {} ms)",
        added * 1e3,
        GOAL.as_millis()
    );
    println!(
        "data dirs: {}",
        (1..=4)
            .map(|id| format!("g{id} {:.1} MB", mb(dir_size(&dir(id)))))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (phase, run) in [
        ("warm-up", &warm_up),
        ("baseline", &baseline),
        ("snapshot", &snapshot),
    ] {
        if !run.failures.is_empty() {
            errors.push(format!(
                "{phase}: {} writes failed, the first: {}",
                run.failures.len(),
                run.failures[0]
            ));
        }
    }

    g4.stop().await;
    for (_, g) in gws {
        g.stop().await;
    }
    drop(tmp);
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        std::process::exit(1);
    }
}
