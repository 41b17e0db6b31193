//! The HTTP load: N clients, closed or open loop, the same loop for both
//! systems.
//!
//! - **Closed loop**: each client sends its next request when the previous
//!   one answered. Latency runs from the send.
//! - **Open loop** (`rate`): each client has a fixed schedule (`rate / N`
//!   requests per second, the clients' schedules offset evenly). A request
//!   that cannot go on time (the client's previous request has not answered)
//!   goes as soon as it can, and its latency runs from its *intended* send
//!   time, so a stall is charged to every request it delayed (no
//!   coordinated omission).
//!
//! A request counts when its (intended) send time falls in the measured
//! window, after the warm-up; throughput is the successful answers that
//! arrived inside the window divided by its length.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::stats::{Hist, Latency};
use crate::systems::{Op, Sys, Target, http_client};

/// Which member each request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// Request k of client i goes to member (i + k) mod n: every client
    /// uses every member in turn, as a round-robin client library does.
    Rotate,
    /// Client i always uses member i mod n.
    Client,
    /// Every request goes to the member that leads when the run starts.
    Leader,
}

/// One load run's settings.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// What each request does.
    pub op: Op,
    /// Concurrent clients.
    pub clients: usize,
    /// Total offered requests per second (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Member choice.
    pub spread: Spread,
    /// Server processes whose CPU time is counted (`/proc/<pid>/stat`).
    pub pids: Vec<u32>,
}

/// What one load run measured (one JSON file of the results).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadResult {
    /// Always `"load"`.
    pub kind: String,
    /// `etcd` or `entente`.
    pub system: Target,
    /// The operation.
    pub op: Op,
    /// `closed` or `open`.
    pub mode: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Offered requests per second (open loop).
    pub offered_rate: Option<f64>,
    /// Member choice.
    pub spread: Spread,
    /// Measured seconds.
    pub duration_secs: f64,
    /// Successful answers in the window.
    pub ok: u64,
    /// Failures by kind (in the window).
    pub errors: BTreeMap<String, u64>,
    /// Requests of the window that were never sent (the schedule ran out
    /// of time: overload).
    pub unsent: u64,
    /// `ok / duration`.
    pub throughput: f64,
    /// Latency of the successful requests of the window.
    pub latency: Latency,
    /// CPU time of the server processes per successful request, µs
    /// (all members together).
    pub server_cpu_us_per_op: Option<f64>,
    /// The same for each server process, in `--pids` order (the
    /// endpoints' order in `bench/run.sh`).
    #[serde(default)]
    pub server_cpu_us_per_op_each: Vec<f64>,
    /// CPU time of this load generator per successful request, µs.
    pub loadgen_cpu_us_per_op: Option<f64>,
    /// The leading member at the end (index into the endpoints).
    pub leader: Option<usize>,
    /// Counter deltas over the run, per member (`/metrics`).
    pub counters: Vec<BTreeMap<String, f64>>,
    /// The log fsyncs of the leader per successful request.
    pub leader_fsyncs_per_op: Option<f64>,
}

#[derive(Debug, Default)]
struct ClientOut {
    hist: Hist,
    ok: u64,
    errors: BTreeMap<String, u64>,
    unsent: u64,
}

/// CPU seconds (user + system) of `pid` so far, from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux platform the project builds for.
    Some(ticks as f64 / 100.0)
}

fn cpu_each(pids: &[u32]) -> Option<Vec<f64>> {
    pids.iter().map(|p| cpu_secs(&p.to_string())).collect()
}

/// Runs one load against `sys`.
pub async fn run(sys: Arc<Sys>, spec: &LoadSpec) -> LoadResult {
    let probe = http_client();
    let all: Vec<usize> = (0..sys.endpoints.len()).collect();
    let leader_at_start = sys.leader(&probe, &all).await;
    let names = sys.counter_names();
    let mut before = Vec::new();
    for &ep in &all {
        before.push(sys.metrics(&probe, ep, names).await);
    }

    let begin = Instant::now() + Duration::from_millis(50);
    let m_start = begin + spec.warmup;
    let m_end = m_start + spec.duration;
    let cpu = Arc::new(tokio::sync::Mutex::new(None::<(f64, Option<Vec<f64>>)>));
    // Sample CPU times when the window opens.
    {
        let cpu = cpu.clone();
        let pids = spec.pids.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(m_start).await;
            *cpu.lock().await = cpu_secs("self").map(|s| (s, cpu_each(&pids)));
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..spec.clients {
        let sys = sys.clone();
        let spec = spec.clone();
        tasks.spawn(
            async move { client(&sys, &spec, i, leader_at_start, begin, m_start, m_end).await },
        );
    }
    // Sample again when it closes.
    tokio::time::sleep_until(m_end).await;
    let cpu_end = cpu_secs("self").map(|s| (s, cpu_each(&spec.pids)));
    let mut total = ClientOut::default();
    while let Some(r) = tasks.join_next().await {
        if let Ok(c) = r {
            total.hist.add(&c.hist);
            total.ok += c.ok;
            total.unsent += c.unsent;
            for (k, v) in c.errors {
                *total.errors.entry(k).or_default() += v;
            }
        }
    }
    let secs = spec.duration.as_secs_f64();
    let mut counters = Vec::new();
    for (ep, b) in before.iter().enumerate() {
        let after = sys.metrics(&probe, ep, names).await;
        counters.push(
            after
                .iter()
                .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0.0)))
                .collect::<BTreeMap<_, _>>(),
        );
    }
    let leader = sys.leader(&probe, &all).await;
    let per_op = |x: f64| (total.ok > 0).then(|| x / total.ok as f64);
    let start_cpu = cpu.lock().await.take();
    let (loadgen_cpu, server_each) = match (start_cpu, cpu_end) {
        (Some((a, sa)), Some((b, sb))) => (
            per_op((b - a) * 1e6),
            match (sa, sb) {
                (Some(sa), Some(sb)) if !spec.pids.is_empty() => sa
                    .iter()
                    .zip(&sb)
                    .map(|(x, y)| per_op((y - x) * 1e6).unwrap_or(0.0))
                    .collect(),
                _ => Vec::new(),
            },
        ),
        _ => (None, Vec::new()),
    };
    let server_cpu = (!server_each.is_empty() && total.ok > 0).then(|| server_each.iter().sum());
    let fsync_name = match sys.target {
        Target::Etcd => "etcd_disk_wal_fsync_duration_seconds_count",
        Target::Entente => "entente_raft_fsyncs_total",
    };
    let leader_fsyncs = leader
        .and_then(|l| counters.get(l))
        .and_then(|c| c.get(fsync_name))
        .and_then(|&f| per_op(f));
    LoadResult {
        kind: "load".into(),
        system: sys.target,
        op: spec.op,
        mode: if spec.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        clients: spec.clients,
        offered_rate: spec.rate,
        spread: spec.spread,
        duration_secs: secs,
        ok: total.ok,
        errors: total.errors,
        unsent: total.unsent,
        throughput: total.ok as f64 / secs,
        latency: total.hist.summary(),
        server_cpu_us_per_op: server_cpu,
        server_cpu_us_per_op_each: server_each,
        loadgen_cpu_us_per_op: loadgen_cpu,
        leader,
        counters,
        leader_fsyncs_per_op: leader_fsyncs,
    }
}

/// How long requests of the window may still take after it closed.
const DRAIN: Duration = Duration::from_secs(10);

async fn client(
    sys: &Sys,
    spec: &LoadSpec,
    i: usize,
    leader: Option<usize>,
    begin: Instant,
    m_start: Instant,
    m_end: Instant,
) -> ClientOut {
    let http = http_client();
    let n = sys.endpoints.len();
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.clients as f64 / r));
    let mut next = interval.map(|iv| begin + iv.mul_f64(i as f64 / spec.clients as f64));
    let mut out = ClientOut::default();
    let hard_stop = m_end + DRAIN;
    let mut k = 0u64;
    loop {
        let intended = match next {
            Some(t) => {
                if t >= m_end {
                    break;
                }
                if Instant::now() >= hard_stop {
                    // Overloaded: the rest of the schedule cannot be sent.
                    let iv = interval.unwrap_or(Duration::from_secs(1));
                    let left = (m_end - t).as_secs_f64() / iv.as_secs_f64();
                    out.unsent += left.ceil() as u64;
                    break;
                }
                tokio::time::sleep_until(t).await;
                t
            }
            None => {
                let now = Instant::now();
                if now >= m_end {
                    break;
                }
                now
            }
        };
        let ep = match spec.spread {
            Spread::Rotate => (i + k as usize) % n,
            Spread::Client => i % n,
            Spread::Leader => leader.unwrap_or(0),
        };
        let res = sys.send(&http, spec.op, ep, i, k).await;
        let done = Instant::now();
        if intended >= m_start {
            match res {
                Ok(()) => {
                    out.hist.record(done - intended);
                    if done < m_end {
                        out.ok += 1;
                    }
                }
                Err(e) => *out.errors.entry(e).or_default() += 1,
            }
        }
        k += 1;
        if let (Some(t), Some(iv)) = (next, interval) {
            next = Some(t + iv);
        }
    }
    out
}
