//! The chaos test (issue 7): real `gateway` processes on loopback, a
//! fault-injecting proxy on every peer link, a workload of REST clients and
//! MQTT devices while faults run, and checks of everything recorded once
//! the group healed.
//!
//! ```sh
//! cargo test -p gateway --test chaos                             # short mode (CI)
//! CHAOS_MINUTES=10 cargo test --release -p gateway --test chaos -- --nocapture
//! CHAOS_SEED=0x1234 cargo test -p gateway --test chaos -- --nocapture   # replay a seed
//! CHAOS_SEED=random CHAOS_MINUTES=30 cargo test --release -p gateway --test chaos -- --nocapture
//! ```
//!
//! Every run prints its seed first; the fault schedule and every workload
//! choice come from it (the processes' timing does not). Settings:
//! `CHAOS_SEED` (a number, or `random`; default a fixed seed), `CHAOS_MINUTES` (minutes of faults; default 1.5),
//! `CHAOS_NODES` (3 or 5, default 3; on PBFT 3f+1: 4 or 7, default 4),
//! `CHAOS_CLIENTS` (default 6), `CHAOS_ENGINE` (`raft`, `multi-paxos` or
//! `pbft`; default all three, one after the other; PBFT with 1 minute of
//! faults unless `CHAOS_MINUTES` says otherwise),
//! `CHAOS_LOG` (the gateways' `RUST_LOG`, default `info`), `CHAOS_KEEP=1`
//! (keep the data directories and logs even when the run passes; a failing
//! run always keeps them and prints where).
//!
//! The harness is in `chaos/cluster.rs` and `chaos/proxy.rs`, the fault
//! schedule in `chaos/faults.rs`, the clients in `chaos/workload.rs`, the
//! devices in `chaos/devices.rs`, the record in `chaos/history.rs`, and what
//! is checked, and how, in `chaos/check.rs` and `chaos/model.rs` — and in
//! `chaos/delivery.rs` that a device connected to a live gateway gets its
//! commands: every command whose device held one connection to a gateway no
//! fault affected for the 8 s before the command's TTL ended must end
//! `succeeded`, `failed` or `canceled`, never `expired`.
//!
//! # PBFT: one Byzantine gateway
//!
//! On PBFT every gateway gets a key pair in its data directory and the
//! group's keys (`--group-keys`), and gateway 1 — the primary of view 0 —
//! runs the test build's `--byzantine equivocate,lie-in-view-change,wrong-replies`.
//! REST clients and MQTT devices talk only to the correct gateways, and
//! everything is checked on them: what the checks claim is about the
//! clients of correct members (the Byzantine gateway's own database is not
//! compared). The fault schedule is the same and may hit any gateway, the
//! Byzantine one included; safety must hold whatever it does. Liveness is
//! claimed only where PBFT promises it: a fault that touches a correct
//! gateway leaves f+1 members faulty, so for the delivery check it affects
//! every gateway, while a fault on the Byzantine gateway alone affects
//! only it (the three correct ones must go on delivering). Every
//! `Entente-Certificate` header on a successful write is checked at the end
//! against the group's public keys (`chaos/certs.rs`).

mod chaos {
    pub mod certs;
    pub mod check;
    pub mod cluster;
    pub mod delivery;
    pub mod devices;
    pub mod faults;
    pub mod history;
    pub mod model;
    pub mod proxy;
    pub mod rng;
    pub mod workload;
}

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use chaos::certs;
use chaos::check::{self, Verdict};
use chaos::cluster::{Cluster, Settings, tail};
use chaos::delivery::{self as delivery_check, Clock};
use chaos::devices::Devices;
use chaos::faults::Nemesis;
use chaos::history::History;
use chaos::rng::Rng;
use chaos::workload::{Client, MAX_TTL_MS, Timeouts, World, register_setup_device};

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// The fault schedule CI runs.
const DEFAULT_SEED: u64 = 0x00e7_7e7e_c4a0_5eed;

/// Minutes of faults of the PBFT run by default.
const PBFT_MINUTES: f64 = 1.0;

/// What the Byzantine gateway of the PBFT run does: everything the test
/// build's `--byzantine` knows.
const BYZANTINE_MODES: &str = "equivocate,lie-in-view-change,wrong-replies";

fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Rng::fork(t, u64::from(std::process::id())).next_u64()
}

/// Lists the commands of every device that are not finished, through
/// gateway `g` (linearizable reads). `None` if the gateway did not answer.
async fn open_commands(cluster: &Cluster, g: u64) -> Option<Vec<String>> {
    let http = &cluster.http;
    let base = cluster.node(g).base();
    let mut devices = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/devices?limit=1000");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let r: Value = http
            .get(url)
            .bearer_auth(&cluster.token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        for d in r["items"].as_array()? {
            devices.push(d["id"].as_str()?.to_string());
        }
        match r["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let mut open = Vec::new();
    for d in devices {
        for status in ["queued", "sent", "accepted"] {
            let r: Value = http
                .get(format!(
                    "{base}/v1/devices/{d}/commands?status={status}&limit=1000"
                ))
                .bearer_auth(&cluster.token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            for c in r["items"].as_array()? {
                open.push(format!("{} ({d}, {status})", c["id"].as_str()?));
            }
        }
    }
    Some(open)
}

/// Waits until every correct gateway reports the same applied index, equal
/// to its commit index, three times in a row.
async fn quiesce(cluster: &Cluster, limit: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    let mut stable = 0;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen.clear();
        for id in cluster.correct_ids() {
            let s = cluster.status(id).await;
            seen.push(s.map(|s| (s["applied"].as_u64(), s["commit"].as_u64())));
        }
        let first = seen.first().cloned().flatten();
        let same = seen
            .iter()
            .all(|s| s.is_some() && *s == first && first.is_some_and(|(a, c)| a == c));
        if same && first == last {
            stable += 1;
            if stable >= 3 {
                return Ok(first.and_then(|(a, _)| a).unwrap_or(0));
            }
        } else {
            stable = 0;
        }
        last = first;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(format!(
        "the gateways' (applied, commit) indexes did not settle within {limit:?}: {seen:?}"
    ))
}

/// The chaos run, on each consensus engine a gateway runs in turn (Raft,
/// Multi-Paxos, then PBFT with one Byzantine gateway), or on the one
/// `CHAOS_ENGINE` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let engines: Vec<String> = match std::env::var("CHAOS_ENGINE") {
        Ok(name) => vec![name],
        Err(_) => vec!["raft".into(), "multi-paxos".into(), "pbft".into()],
    };
    for engine in engines {
        chaos_on(&engine).await;
    }
}

/// One chaos run on the group running `engine`.
async fn chaos_on(engine: &str) {
    // A fixed seed unless told otherwise, so CI runs the same schedule each
    // time; `CHAOS_SEED=random` explores a new one.
    let seed = match std::env::var("CHAOS_SEED").as_deref() {
        Ok("random") => fresh_seed(),
        _ => env_u64("CHAOS_SEED").unwrap_or(DEFAULT_SEED),
    };
    let pbft = engine == "pbft";
    // PBFT's run is shorter by default: four gateways that sign and check
    // every message cost more per write on CI's two cores.
    let minutes: f64 = std::env::var("CHAOS_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(if pbft { PBFT_MINUTES } else { 1.5 });
    let nodes = env_u64("CHAOS_NODES").unwrap_or(if pbft { 4 } else { 3 });
    assert!(
        !pbft || (nodes >= 4 && (nodes - 1).is_multiple_of(3)),
        "CHAOS_NODES={nodes}: PBFT runs 3f+1 gateways (4, 7, ...)"
    );
    // PBFT: gateway 1, the primary of view 0, is Byzantine.
    let byzantine = pbft.then(|| (1, BYZANTINE_MODES.to_owned()));
    let clients = env_u64("CHAOS_CLIENTS").unwrap_or(6) as usize;
    let keep = std::env::var("CHAOS_KEEP").is_ok_and(|v| v == "1");
    eprintln!(
        "chaos: seed {seed:#x} on {engine} ({minutes} min of faults, {nodes} gateways, {clients} \
         clients); replay with CHAOS_SEED={seed:#x} CHAOS_ENGINE={engine}"
    );
    let started = Instant::now();
    let clock = Clock {
        start_wall_ms: Clock::wall_ms(),
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let settings = Settings {
        nodes,
        tick_ms: 10,
        write_timeout_ms: 1_500,
        session_grace_ms: 2_000,
        snapshot_every: 300,
        log_filter: std::env::var("CHAOS_LOG").unwrap_or_else(|_| "info".into()),
        consensus: engine.to_owned(),
        byzantine: byzantine.clone(),
    };
    let timeouts = Timeouts {
        // The gateway answers within 2 × write timeout + 1 s (its own deadline).
        request: Duration::from_millis(2 * settings.write_timeout_ms + 2_500),
    };
    let cluster = Arc::new(Cluster::start(tmp.path(), settings, seed).await);
    eprintln!(
        "chaos: {} gateways up after {:.1}s; data and logs in {}",
        nodes,
        started.elapsed().as_secs_f64(),
        tmp.path().display()
    );
    if let Some((b, modes)) = &byzantine {
        eprintln!(
            "chaos: gw{b} is Byzantine ({modes}); clients and devices use gw{:?}",
            cluster.correct_ids()
        );
        // The flag took: the gateway runs the misbehaving engine.
        let log = std::fs::read_to_string(&cluster.node(*b).log).unwrap_or_default();
        assert!(
            log.contains("BYZANTINE TEST MODE"),
            "gw{b} was started with --byzantine but does not say it misbehaves:\n{}",
            tail(&cluster.node(*b).log, 20)
        );
    }
    let history = Arc::new(History::new(started));
    let world = Arc::new(Mutex::new(World::default()));

    // Devices: two simulated ones per correct gateway, three that never
    // connect.
    let mut sims = Vec::new();
    for i in 1..=2 * cluster.correct_ids().len() {
        let id = format!("d{i}");
        let secret = register_setup_device(&cluster, &history, &id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sims.push((id, secret));
    }
    let mut offline = Vec::new();
    for i in 1..=3 {
        let id = format!("o{i}");
        register_setup_device(&cluster, &history, &id)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        offline.push(id);
    }
    let live: Vec<String> = sims.iter().map(|(d, _)| d.clone()).collect();
    {
        let mut w = world.lock().expect("world");
        w.live = live.clone();
        w.offline = offline;
    }
    let devices = Devices::start(cluster.clone(), sims, seed, started);

    // Clients and faults.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let c = Client::new(
            i,
            clients,
            seed,
            cluster.clone(),
            world.clone(),
            history.clone(),
            timeouts,
        );
        tasks.push(tokio::spawn(c.run(stop.clone(), count.clone())));
    }
    let fault_time = Duration::from_secs_f64(minutes * 60.0);
    let mut nemesis = Nemesis {
        cluster: &cluster,
        rng: Rng::fork(seed, 1),
        log: Default::default(),
        start: started,
    };
    nemesis.run(Instant::now() + fault_time).await;
    let healed_at = started.elapsed();
    eprintln!(
        "chaos: [{:>8.3}s] faults stopped, group healed; {} operations so far",
        healed_at.as_secs_f64(),
        count.load(Ordering::Relaxed)
    );
    // A few seconds of workload on the healed group, then stop it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }
    let mut problems = nemesis.log.problems.clone();

    // Every command must finish: devices answer, the leader expires the rest
    // (TTLs are at most MAX_TTL_MS; the clients have stopped, so every
    // command was issued by now).
    let finish_within = Duration::from_millis(MAX_TTL_MS) + Duration::from_secs(30);
    let deadline = Instant::now() + finish_within;
    let mut open = Vec::new();
    loop {
        let g = cluster.correct_ids()[0];
        if let Some(o) = open_commands(&cluster, g).await {
            open = o;
            if open.is_empty() {
                break;
            }
        }
        if Instant::now() > deadline {
            problems.push(format!(
                "{} commands still not finished {finish_within:?} after the clients stopped: {:?}",
                open.len(),
                &open[..open.len().min(10)]
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deliveries = devices.deliveries.clone();
    let connections = devices.connections.clone();
    let device_stats = devices.stats.clone();
    devices.stop().await;
    match quiesce(&cluster, Duration::from_secs(60)).await {
        Ok(index) => eprintln!("chaos: every gateway applied up to index {index}"),
        Err(e) => problems.push(e),
    }
    let stops = stop_all(&cluster).await;
    problems.extend(stops);

    // The databases: the same on every correct gateway, row by row.
    let mut violations = world.lock().expect("world").violations.clone();
    for e in world.lock().expect("world").server_errors.iter().take(10) {
        problems.push(format!("server error: {e}"));
    }
    let mut dumps = Vec::new();
    for id in cluster.correct_ids() {
        let (d, integrity) = check::dump(&cluster.node(id).db_path()).await;
        if integrity != "ok" {
            violations.push(format!(
                "gw{id}'s state.db fails its integrity check: {integrity}"
            ));
        }
        dumps.push((id, d));
    }
    check::compare(&dumps, &mut violations);
    let first = cluster.correct_ids()[0];
    let fin = check::final_state(&cluster.node(first).db_path()).await;
    let records = history.records();
    let world_snapshot = std::mem::take(&mut *world.lock().expect("world"));
    let deliveries = deliveries.lock().expect("deliveries").clone();
    let connections = connections.lock().expect("connections").clone();

    // Delivery: a command whose device was connected to a live gateway for
    // the window before its TTL ended is not left to expire.
    let delivered = delivery_check::check(&fin, &live, &connections, &nemesis.log.spans, clock);
    if !delivered.violations.is_empty() {
        let events = match delivery_check::read_events(&cluster.node(first).db_path()).await {
            Ok(e) => e,
            Err(e) => {
                problems.push(e);
                Vec::new()
            }
        };
        for v in delivered.violations.iter().take(5) {
            violations.push(delivery_check::describe(
                v,
                &events,
                &deliveries,
                &connections,
                &nemesis.log.spans,
                clock,
            ));
        }
        if delivered.violations.len() > 5 {
            let ids: Vec<&str> = delivered
                .violations
                .iter()
                .map(|v| v.cid.as_str())
                .collect();
            violations.push(format!(
                "… {} qualifying commands not delivered in all: {ids:?}",
                delivered.violations.len()
            ));
        }
    }

    // Commit certificates: every one a correct gateway sent with a
    // successful write must verify with the group's keys.
    let certificates = world_snapshot.certificates.clone();
    let certified = certs::check(&certificates, &cluster.group_keys, &mut violations);

    // The history.
    let check_started = Instant::now();
    let (verdicts, records, world_snapshot, fin, mut violations) =
        tokio::task::spawn_blocking(move || {
            let budget = Duration::from_secs(600);
            let (verdicts, errors) =
                check::linearizability(&records, &world_snapshot, &fin, budget);
            violations.extend(errors);
            check::sessions(&records, &fin, &mut violations);
            check::final_checks(
                &records,
                &world_snapshot,
                &fin,
                &deliveries,
                &mut violations,
            );
            (verdicts, records, world_snapshot, fin, violations)
        })
        .await
        .expect("checker");
    let mut bad_objects = 0;
    let mut undecided = 0;
    for (obj, v) in &verdicts {
        match v {
            Verdict::Linearizable => {}
            Verdict::Violation(why) => {
                bad_objects += 1;
                if bad_objects <= 3 {
                    violations.push(format!(
                        "not linearizable: {obj:?} ({why}); its history:\n{}",
                        check::describe(&records, obj)
                    ));
                }
            }
            Verdict::Undecided => {
                undecided += 1;
                problems.push(format!(
                    "the checker did not decide {obj:?} in time; its history:\n{}",
                    check::describe(&records, obj)
                ));
            }
        }
    }
    if bad_objects > 3 {
        violations.push(format!(
            "… {bad_objects} objects are not linearizable in all"
        ));
    }

    // Summary.
    eprintln!("chaos: ===== summary (seed {seed:#x}) =====");
    eprintln!(
        "chaos: {:.1}s in all ({:.1}s of faults, checks {:.1}s); {} operations recorded",
        started.elapsed().as_secs_f64(),
        fault_time.as_secs_f64(),
        check_started.elapsed().as_secs_f64(),
        records.len()
    );
    for ((kind, outcome), n) in history.summary() {
        eprintln!("chaos:   {kind:<26} {outcome:<8} {n}");
    }
    eprintln!("chaos: faults injected:");
    for (kind, n) in &nemesis.log.counts {
        eprintln!("chaos:   {kind:<12} {n}");
    }
    eprintln!(
        "chaos: devices: {} connects, {} disconnects, {} deliveries; proxies: {} connections",
        device_stats.connects.load(Ordering::Relaxed),
        device_stats.disconnects.load(Ordering::Relaxed),
        device_stats.deliveries.load(Ordering::Relaxed),
        cluster.proxy_connections()
    );
    eprintln!(
        "chaos: objects checked for linearizability: {} ({} shadows, {} commands, {} device ids); \
         not linearizable: {bad_objects}; undecided: {undecided}",
        verdicts.len(),
        verdicts
            .keys()
            .filter(|o| matches!(o, chaos::history::Obj::Shadow(_)))
            .count(),
        world_snapshot.commands.len(),
        verdicts
            .keys()
            .filter(|o| matches!(o, chaos::history::Obj::Device(_)))
            .count(),
    );
    eprintln!(
        "chaos: final state: {} devices, {} commands",
        fin.devices.len(),
        fin.commands.len()
    );
    if pbft {
        eprintln!(
            "chaos: commit certificates: {} on successful writes, {} verified with the group's keys",
            certificates.len(),
            certified
        );
    }
    eprintln!(
        "chaos: delivery: {} commands for connecting devices checked, {} qualified (device \
         connected to a live gateway for the {} s before expiry): {:?}; not delivered: {}; \
         expired without qualifying: {}",
        delivered.checked,
        delivered.qualified,
        delivery_check::WINDOW.as_secs(),
        delivered.by_status,
        delivered.violations.len(),
        delivered.expired_unqualified,
    );
    eprintln!(
        "chaos: violations: {}; harness problems: {}",
        violations.len(),
        problems.len()
    );
    for v in &violations {
        eprintln!("chaos: VIOLATION: {v}");
    }
    for p in &problems {
        eprintln!("chaos: PROBLEM: {p}");
    }
    if violations.is_empty() && problems.is_empty() {
        if keep {
            let path = tmp.keep();
            eprintln!("chaos: kept {}", path.display());
        }
        return;
    }
    for id in cluster.ids() {
        eprintln!(
            "chaos: ----- last lines of gw{id}'s log -----\n{}",
            tail(&cluster.node(id).log, 25)
        );
    }
    let path = tmp.keep();
    panic!(
        "chaos: {} violations, {} problems (seed {seed:#x}); data and logs kept in {}",
        violations.len(),
        problems.len(),
        path.display()
    );
}

/// Stops every gateway at once (SIGINT) and waits for them.
async fn stop_all(cluster: &Arc<Cluster>) -> Vec<String> {
    let mut handles = Vec::new();
    for id in cluster.ids() {
        let c = cluster.clone();
        handles.push((id, tokio::spawn(async move { c.stop(id).await })));
    }
    let mut problems = Vec::new();
    for (id, h) in handles {
        if !h.await.unwrap_or(false) {
            problems.push(format!("gw{id} did not exit within 30 s of SIGINT"));
        }
    }
    problems
}

/// A minority side of a partition: one gateway cut off from the other two
/// (the leader, so the group must also elect a new one). A write through it
/// is refused with 503 and a problem body naming the cause — within the
/// configured write timeout plus the request deadline, never a hang — while
/// a `consistency=local` read still answers with its index. Writes go on
/// through the majority; after the heal the cut-off gateway catches up
/// without help and takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_partition_refuses_writes_and_catches_up_after_heal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let settings = Settings {
        nodes: 3,
        tick_ms: 10,
        write_timeout_ms: 1_000,
        session_grace_ms: 2_000,
        snapshot_every: 10_000,
        log_filter: "warn".into(),
        consensus: "raft".into(),
        byzantine: None,
    };
    let cluster = Cluster::start(tmp.path(), settings, 7).await;
    let http = &cluster.http;
    let token = cluster.token.clone();
    let lone = cluster.wait_leader(Duration::from_secs(30)).await;
    let others: Vec<u64> = cluster.ids().into_iter().filter(|&i| i != lone).collect();
    let register = |g: u64, id: String| {
        let url = format!("{}/v1/devices", cluster.node(g).base());
        let req = http
            .post(url)
            .bearer_auth(&token)
            .json(&serde_json::json!({ "id": id }));
        async move {
            let r = req.send().await.expect("request");
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    assert_eq!(register(lone, "before".into()).await.0, 201);

    cluster.partition(&[lone], &others, chaos::proxy::Mode::Cut);
    let started = Instant::now();
    let (status, body) = register(lone, "cut-off".into()).await;
    let took = started.elapsed();
    assert_eq!(status, 503, "a write on the minority side: {body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    eprintln!("minority write refused after {took:?}: {body}");
    assert!(
        detail.contains("majority") || detail.contains("quorum") || detail.contains("leader"),
        "the problem names the cause: {body}"
    );
    // The write timeout (1 s) bounds it; allow for one wait for a leader.
    assert!(took < Duration::from_secs(10), "refused in {took:?}");
    let r = http
        .get(format!(
            "{}/v1/devices/before?consistency=local",
            cluster.node(lone).base()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("local read");
    assert_eq!(r.status(), 200, "a local read on the minority side");
    assert!(
        r.headers().contains_key("entente-index"),
        "a local read carries its index"
    );

    // The majority elects a leader and takes writes meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        let (status, _) = register(others[n % 2], format!("majority-{n}")).await;
        if status == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "the majority took no write");
    }

    // Heal: the cut-off gateway catches up by itself and takes writes.
    cluster.heal_links();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = register(lone, format!("after-heal-{n}")).await;
        n += 1;
        if status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write through the healed gateway"
        );
    }
    let r = http
        .get(format!(
            "{}/v1/devices?limit=1000",
            cluster.node(lone).base()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list");
    let listed: Value = r.json().await.expect("json");
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert!(ids.contains(&"before") && ids.iter().any(|i| i.starts_with("majority-")));
    assert!(
        !ids.contains(&"cut-off"),
        "the write sent into the cut-off gateway never reached a majority, so the \
         heal overwrote it"
    );
}
