//! Failover of a three-gateway group of real processes on loopback (fsync
//! on, default timings unless `FAILOVER_TICK_MS` is set):
//!
//! 1. **Leader kill → first successful write**, `FAILOVER_KILLS` times
//!    (default 20): SIGKILL the leader, then write (a desired-state PATCH)
//!    through the survivors in turn, each attempt bounded by 50 ms, until
//!    one succeeds; the killed gateway is restarted and caught up before the
//!    next round. p50/p99/max.
//! 2. **Minority refusal**: SIGSTOP two gateways; a write to the third is
//!    refused (503 with a problem body) after the write timeout
//!    (`--write-timeout-ms`, here `FAILOVER_WRITE_TIMEOUT_MS`, default the
//!    gateway's 5,000); a `consistency=local` read still answers with its
//!    index. SIGCONT, and the time until the group takes writes again.
//!
//! `cargo bench -p gateway --bench failover`.

#[path = "../tests/support/ports.rs"]
mod ports;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ports::reserve_ports;
use serde_json::{Value, json};
use tokio::time::Instant;

/// How long one write attempt after a kill may take before the next is
/// tried (a write on a quiet group takes a few milliseconds; one forwarded
/// to the dead leader never answers). This bounds the measurement's
/// resolution.
const ATTEMPT: Duration = Duration::from_millis(50);

struct Gw {
    id: u64,
    http: SocketAddr,
    raft: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Gw {
    fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(gw: &mut Gw, peers: &str, extra: &[String]) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(gw.dir.with_extension("log"))
        .expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--node-id", &gw.id.to_string(), "--peers", peers])
        .args(["--http-listen", &gw.http.to_string()])
        .args(["--raft-listen", &gw.raft.to_string()])
        .args(["--cluster-secret", "failover-bench-secret"])
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&gw.dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start gateway");
    gw.child = Some(child);
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

struct Client {
    http: reqwest::Client,
    token: String,
}

impl Client {
    async fn cluster(&self, gw: &Gw) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/v1/cluster", gw.base()))
            .bearer_auth(&self.token)
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// One desired-state write; its status (0 if no answer in `limit`).
    async fn write(&self, gw: &Gw, n: u64, limit: Duration) -> (u16, Value) {
        let r = self
            .http
            .patch(format!("{}/v1/devices/probe/shadow", gw.base()))
            .bearer_auth(&self.token)
            .json(&json!({"desired": {"n": n}}))
            .timeout(limit)
            .send()
            .await;
        match r {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }
}

async fn wait_leader(c: &Client, gws: &BTreeMap<u64, Gw>, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        for g in gws.values().filter(|g| g.child.is_some()) {
            if let Some(v) = c.cluster(g).await
                && v["role"] == "leader"
            {
                return g.id;
            }
        }
        assert!(Instant::now() < deadline, "no leader within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every running gateway has applied what the leader committed.
async fn wait_caught_up(c: &Client, gws: &BTreeMap<u64, Gw>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut views = Vec::new();
        for g in gws.values() {
            views.push(c.cluster(g).await);
        }
        let commit = views
            .iter()
            .flatten()
            .filter(|v| v["role"] == "leader")
            .filter_map(|v| v["commit"].as_u64())
            .max();
        if let Some(commit) = commit
            && views
                .iter()
                .all(|v| v.as_ref().and_then(|v| v["applied"].as_u64()) >= Some(commit))
        {
            return;
        }
        assert!(Instant::now() < deadline, "gateways did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn read_token(dirs: &[&Path]) -> Option<String> {
    dirs.iter().find_map(|d| {
        std::fs::read_to_string(d.join("admin-token"))
            .ok()
            .map(|t| t.trim().to_string())
    })
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let kills = if quick {
        2
    } else {
        env("FAILOVER_KILLS").unwrap_or(20)
    };
    let mut extra = Vec::new();
    if let Some(t) = env("FAILOVER_TICK_MS") {
        extra.extend(["--tick-ms".to_string(), t.to_string()]);
    }
    let write_timeout = env("FAILOVER_WRITE_TIMEOUT_MS");
    if let Some(t) = write_timeout {
        extra.extend(["--write-timeout-ms".to_string(), t.to_string()]);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(6);
    let mut gws: BTreeMap<u64, Gw> = (1..=3u64)
        .map(|id| {
            let i = (id as usize - 1) * 2;
            let gw = Gw {
                id,
                http: ports[i],
                raft: ports[i + 1],
                dir: tmp.path().join(format!("gw{id}")),
                child: None,
            };
            (id, gw)
        })
        .collect();
    let peers = gws
        .values()
        .map(|g| format!("{}={}", g.id, g.raft))
        .collect::<Vec<_>>()
        .join(",");
    for g in gws.values_mut() {
        spawn(g, &peers, &extra);
    }
    // The first leader writes the admin token into its data directory.
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = loop {
        let dirs: Vec<&Path> = gws.values().map(|g| g.dir.as_path()).collect();
        if let Some(t) = read_token(&dirs) {
            break t;
        }
        assert!(Instant::now() < deadline, "no admin token written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let c = Client {
        http: reqwest::Client::new(),
        token,
    };
    let leader = wait_leader(&c, &gws, Duration::from_secs(30)).await;
    let r = c
        .http
        .post(format!("{}/v1/devices", gws[&leader].base()))
        .bearer_auth(&c.token)
        .json(&json!({"id": "probe"}))
        .send()
        .await
        .expect("register");
    assert!(r.status().is_success(), "register: {}", r.status());

    // 1. Leader kills.
    let mut times = Vec::new();
    let mut n = 0u64;
    for round in 0..kills {
        wait_caught_up(&c, &gws).await;
        let leader = wait_leader(&c, &gws, Duration::from_secs(30)).await;
        let survivors: Vec<u64> = gws.keys().copied().filter(|&i| i != leader).collect();
        let victim = gws.get_mut(&leader).expect("leader");
        let mut child = victim.child.take().expect("running");
        let t = Instant::now();
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let mut attempt = 0usize;
        loop {
            n += 1;
            let g = &gws[&survivors[attempt % survivors.len()]];
            attempt += 1;
            let (status, _) = c.write(g, n, ATTEMPT).await;
            if (200..300).contains(&status) {
                break;
            }
            if status != 0 {
                // Refused at once (no leader yet): do not spin.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no write after a kill"
            );
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "kill {:>2}: leader {leader} → first write after {ms:.0} ms",
            round + 1
        );
        times.push(ms);
        let g = gws.get_mut(&leader).expect("gateway");
        spawn(g, &peers, &extra);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "leader kill → first successful write over {} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        times.len(),
        pct(&times, 0.5),
        pct(&times, 0.99),
        times.last().copied().unwrap_or_default()
    );

    // 2. A minority of one.
    wait_caught_up(&c, &gws).await;
    let leader = wait_leader(&c, &gws, Duration::from_secs(30)).await;
    let lone = *gws.keys().find(|&&i| i != leader).expect("a follower");
    let stopped: Vec<u64> = gws.keys().copied().filter(|&i| i != lone).collect();
    for id in &stopped {
        signal(gws[id].pid(), "-STOP");
    }
    let t = Instant::now();
    n += 1;
    let (status, body) = c.write(&gws[&lone], n, Duration::from_secs(120)).await;
    let refused = t.elapsed();
    assert_eq!(status, 503, "a minority write is refused: {body}");
    println!(
        "minority of one: write refused with {status} after {:.0} ms (write timeout {}): {}",
        refused.as_secs_f64() * 1e3,
        write_timeout.map_or("default 5000 ms".into(), |t| format!("{t} ms")),
        body["title"].as_str().unwrap_or_default()
    );
    let r = c
        .http
        .get(format!(
            "{}/v1/devices/probe?consistency=local",
            gws[&lone].base()
        ))
        .bearer_auth(&c.token)
        .send()
        .await
        .expect("local read");
    assert!(r.status().is_success(), "local read: {}", r.status());
    let index = r
        .headers()
        .get("entente-index")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    println!("minority of one: local read answered at index {index}");
    for id in &stopped {
        signal(gws[id].pid(), "-CONT");
    }
    let t = Instant::now();
    loop {
        n += 1;
        let (status, _) = c.write(&gws[&lone], n, Duration::from_millis(500)).await;
        if (200..300).contains(&status) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no write after heal");
    }
    println!(
        "healed: the minority gateway takes writes again after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}
