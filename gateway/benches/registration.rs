//! Registering a fleet on a single-node gateway with fsync: one
//! `POST /v1/devices` per device (32 in flight, as `device-sim` did)
//! against `POST /v1/devices/batch` with 1,000 devices per request (one and
//! two batches in flight), each on a fresh gateway.
//!
//! `cargo bench -p gateway --bench registration` (`GW_BENCH_DEVICES`
//! devices, default 10,000). The gateway runs in the same process as the
//! clients, over real HTTP on loopback, with its data in a temp dir on the
//! local disk. Each device has a label and ~100 bytes of attributes.

use std::sync::Arc;
use std::time::Duration;

use gateway::config::Config;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

fn device(i: usize) -> Value {
    json!({
        "id": format!("dev-{i:07}"),
        "labels": {"site": format!("site-{}", i % 10)},
        "attributes": {"model": "X2", "serial": i, "firmware": "1.4.2", "note": "n".repeat(50)},
    })
}

struct Gw {
    _dir: tempfile::TempDir,
    gw: gateway::Gateway,
    base: String,
    token: String,
}

async fn fresh() -> Gw {
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
    Gw {
        base: format!("http://{}", gw.http_addr),
        _dir: dir,
        gw,
        token,
    }
}

/// Sends `bodies` to `path`, `in_flight` at once; every answer must be 201.
async fn send_all(g: &Gw, path: &str, bodies: Vec<Value>, in_flight: usize) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(in_flight)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let gate = Arc::new(Semaphore::new(in_flight));
    let mut tasks = JoinSet::new();
    for body in bodies {
        let (http, gate) = (http.clone(), gate.clone());
        let url = format!("{}{path}", g.base);
        let token = g.token.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("gate");
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("request task");
    }
}

/// Registers `n` devices on a fresh gateway as `how` says; prints the
/// time, the rate and the log entries it took.
async fn run(n: usize, how: &str) {
    let g = fresh().await;
    let before = g.gw.db().applied_index();
    let t = Instant::now();
    match how {
        "one at a time, 32 in flight" => {
            send_all(&g, "/v1/devices", (0..n).map(device).collect(), 32).await;
        }
        _ => {
            let in_flight = if how.contains("two") { 2 } else { 1 };
            let batches: Vec<Value> = (0..n)
                .collect::<Vec<_>>()
                .chunks(1000)
                .map(|c| json!({"devices": c.iter().copied().map(device).collect::<Vec<_>>()}))
                .collect();
            send_all(&g, "/v1/devices/batch", batches, in_flight).await;
        }
    }
    let took = t.elapsed().as_secs_f64();
    let entries = g.gw.db().applied_index() - before;
    println!(
        "{how:<34} {n} devices in {took:>7.2} s  {:>8.0} devices/s  {entries} log entries",
        n as f64 / took
    );
    g.gw.stop().await;
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let n: usize = std::env::var("GW_BENCH_DEVICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let n = if quick { 200 } else { n };
    for how in [
        "one at a time, 32 in flight",
        "batches of 1,000, one in flight",
        "batches of 1,000, two in flight",
    ] {
        run(n, how).await;
    }
}
