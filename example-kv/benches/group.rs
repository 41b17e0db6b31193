//! The three-process example group on loopback, with fsync on: writes/s,
//! write latency and fsyncs per committed entry at 1, 16 and 64 concurrent
//! writers; then leader kill → first successful write, over repeated kills.
//!
//! `cargo bench -p example-kv` (`KV_BENCH_SECS` per load level, default 5;
//! `KV_BENCH_KILLS`, default 20).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use example_kv::{Proc, find_leader, introduce, request, status};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_entente-kv");

/// One writer on a persistent connection; records each write's latency.
async fn writer(
    addr: SocketAddr,
    w: usize,
    stop: Arc<AtomicBool>,
    hist: Arc<Mutex<Histogram<u64>>>,
) -> u64 {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return 0;
    };
    let (r, mut wr) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut n = 0u64;
    // ~100-byte values, like a small JSON document.
    let value = "x".repeat(96);
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let t = Instant::now();
        if wr
            .write_all(format!("PUT b{w}-{n} {value}\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        match lines.next_line().await {
            Ok(Some(l)) if l.starts_with("OK") => {
                let _ = local.record(t.elapsed().as_micros().max(1) as u64);
            }
            _ => break,
        }
    }
    let count = local.len();
    hist.lock().await.add(&local).expect("merge");
    count
}

async fn load(procs: &[Proc], writers: usize, secs: f64) {
    let leader = find_leader(procs).await.expect("a leader");
    let before: Vec<_> = futures_status(procs).await;
    let stop = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            // Spread writers over the three nodes; followers forward to the leader.
            let addr = procs[w % procs.len()].client;
            tokio::spawn(writer(addr, w, stop.clone(), hist.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("writer");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = futures_status(procs).await;
    let h = hist.lock().await;
    let d_commit = after[leader].0.saturating_sub(before[leader].0).max(1);
    let per_entry: Vec<String> = (0..procs.len())
        .map(|i| {
            format!(
                "{:.3}",
                after[i].1.saturating_sub(before[i].1) as f64 / d_commit as f64
            )
        })
        .collect();
    println!(
        "{:>8} {:>10.0} {:>9.2} {:>9.2} {:>9.2}   {}",
        writers,
        total as f64 / elapsed,
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        per_entry.join(" / "),
    );
}

/// (commit, syncs) of each process.
async fn futures_status(procs: &[Proc]) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    for p in procs {
        let s = status(p.client).await.expect("status");
        v.push((s.commit, s.syncs));
    }
    v
}

/// Kills the leader and measures the time to the first acknowledged write,
/// trying the survivors every 5 ms with fresh requests.
async fn failover(procs: &mut [Proc]) -> Duration {
    let leader = find_leader(procs).await.expect("a leader");
    let survivors: Vec<SocketAddr> = procs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, p)| p.client)
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t0 = Instant::now();
    procs[leader].kill();
    let mut n = 0u64;
    let first = loop {
        if let Ok(at) = rx.try_recv() {
            break at;
        }
        n += 1;
        let addr = survivors[(n % 2) as usize];
        let (tx, done) = (tx.clone(), done.clone());
        tokio::spawn(async move {
            if let Ok(r) = request(addr, &format!("PUT failover-{n} v")).await
                && r.first().is_some_and(|l| l.starts_with("OK"))
                && !done.swap(true, Ordering::Relaxed)
            {
                let _ = tx.send(Instant::now());
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no write succeeded within 30 s of the kill"
        );
    };
    let took = first - t0;
    let dir = procs[leader].dir.clone();
    let raft = procs[leader].raft;
    let id = procs[leader].id;
    procs[leader] = Proc::spawn(BIN, id, &dir, raft, &[]);
    introduce(procs).await;
    // Let the restarted node catch up before the next trial.
    let target = status(survivors[0]).await.map_or(0, |s| s.commit);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(procs[leader].client)
        .await
        .is_none_or(|s| s.applied < target)
    {
        assert!(Instant::now() < deadline, "restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    took
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let secs: f64 = std::env::var("KV_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let kills: usize = std::env::var("KV_BENCH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (secs, kills) = if quick { (0.3, 1) } else { (secs, kills) };
    let tmp = tempfile::tempdir().expect("tempdir");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut procs: Vec<Proc> = (1..=3)
        .map(|id| Proc::spawn(BIN, id, &tmp.path().join(format!("n{id}")), any, &[]))
        .collect();
    introduce(&procs).await;
    while find_leader(&procs).await.is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "example-kv group: 3 processes on loopback, fsync on, ~100-byte values, closed-loop writers"
    );
    println!(
        "{:>8} {:>10} {:>9} {:>9} {:>9}   fsyncs per committed entry (node 1 / 2 / 3)",
        "writers", "writes/s", "p50 ms", "p99 ms", "max ms"
    );
    for writers in [1, 16, 64] {
        load(&procs, writers, secs).await;
    }
    let mut times = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for _ in 0..kills {
        let t = failover(&mut procs).await;
        times.record(t.as_micros().max(1) as u64).expect("record");
    }
    println!(
        "leader kill -> first acknowledged write over {} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        kills,
        times.value_at_quantile(0.5) as f64 / 1000.0,
        times.value_at_quantile(0.99) as f64 / 1000.0,
        times.max() as f64 / 1000.0
    );
}
