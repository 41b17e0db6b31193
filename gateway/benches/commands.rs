//! `POST /v1/devices/{id}/commands` on a single-node gateway with fsync:
//! commands/s and latency at 1, 16 and 64 concurrent closed-loop clients.
//!
//! `cargo bench -p gateway` (`GW_BENCH_SECS` per level, default 5). The
//! gateway runs in the same process as the clients, over real HTTP on
//! loopback, with its data in a temp dir on the local disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gateway::config::Config;
use hdrhistogram::Histogram;
use tokio::time::Instant;

const DEVICES: usize = 100;

async fn client(
    http: reqwest::Client,
    base: String,
    token: String,
    c: usize,
    stop: Arc<AtomicBool>,
) -> (Histogram<u64>, u64) {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = 0;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let device = format!("dev-{}", (c * 7919 + n) % DEVICES);
        let t = Instant::now();
        let r = http
            .post(format!("{base}/v1/devices/{device}/commands"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"name": "set-speed", "params": {"speed": n % 10}}))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
            }
            _ => errors += 1,
        }
    }
    (hist, errors)
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let secs: f64 = std::env::var("GW_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let secs = if quick { 0.3 } else { secs };
    let dir = tempfile::tempdir().expect("tempdir");
    let any = "127.0.0.1:0".parse().expect("addr");
    let mut config = Config::single(dir.path().to_path_buf(), any, any);
    // One token sends the whole load: no per-token rate limit.
    config.rest_rate_limit = 0;
    let gw = gateway::start(config).await.expect("gateway");
    let token_file = gw.admin_token_file.clone().expect("admin token");
    let token = std::fs::read_to_string(token_file)
        .expect("token")
        .trim()
        .to_string();
    let base = format!("http://{}", gw.http_addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    for d in 0..DEVICES {
        let r = http
            .post(format!("{base}/v1/devices"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"id": format!("dev-{d}")}))
            .send()
            .await
            .expect("register");
        assert!(r.status().is_success(), "register: {}", r.status());
    }
    println!(
        "gateway, single node, fsync on: POST /v1/devices/{{id}}/commands, closed-loop clients"
    );
    println!(
        "{:>8} {:>11} {:>9} {:>9} {:>9} {:>7}",
        "clients", "commands/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    for clients in [1, 16, 64] {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                tokio::spawn(client(
                    http.clone(),
                    base.clone(),
                    token.clone(),
                    c,
                    stop.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await.expect("client");
            all.add(&h).expect("merge");
            errors += e;
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "{:>8} {:>11.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            clients,
            all.len() as f64 / elapsed,
            all.value_at_quantile(0.5) as f64 / 1000.0,
            all.value_at_quantile(0.99) as f64 / 1000.0,
            all.max() as f64 / 1000.0,
            errors
        );
    }
    gw.stop().await;
}
