//! How long a new member takes to catch up by snapshot: a three-gateway group
//! (in one process, real sockets, fsync on) holds the state of
//! `CATCHUP_DEVICES` devices (default 10,000: each registered and given a
//! desired state); a fourth gateway started with `--join` is added as a
//! learner, and the bench times until it has applied everything the group
//! had committed when it was added.
//!
//! `cargo bench -p gateway --bench catchup` (`CATCHUP_DEVICES=n` to change
//! the size). Snapshots are taken every 1,000 entries (100 with `--test`), so the new member
//! cannot be sent the log from the start and gets a snapshot.

#[path = "../tests/support/group.rs"]
mod group;
#[path = "../tests/support/ports.rs"]
mod ports;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use group::{admin_token, dir_size, member_config, start_group};
use ports::reserve_ports;
use serde_json::json;
use tokio::time::Instant;

const CLIENTS: usize = 64;
const SECRET: &str = "catchup-bench-secret";

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let devices: usize = std::env::var("CATCHUP_DEVICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let devices = if quick { 300 } else { devices };
    let every = if quick { 100 } else { 1000 };
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut ports = reserve_ports(4);
    let fourth = ports.pop().expect("port");
    let peers: BTreeMap<u64, SocketAddr> = (1..=3).zip(ports).collect();
    let config = |id, peers: &BTreeMap<u64, SocketAddr>| {
        let mut c = member_config(tmp.path(), id, peers, SECRET);
        c.snapshot_every = every;
        c
    };
    let gws = start_group(&peers, |id| config(id, &peers)).await;
    let token = admin_token(&gws);
    let leader = gws[&1].node().status().raft.leader.expect("leader");
    let base = Arc::new(format!("http://{}", gws[&leader].http_addr));
    let http = reqwest::Client::new();

    // Fill the group: register every device and give it a desired state.
    let t = Instant::now();
    let mut fill = Vec::new();
    for c in 0..CLIENTS {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        fill.push(tokio::spawn(async move {
            for i in (c..devices).step_by(CLIENTS) {
                let id = format!("dev-{i:05}");
                let r = http
                    .post(format!("{base}/v1/devices"))
                    .bearer_auth(&token)
                    .json(&json!({"id": id, "labels": {"site": format!("s{}", i % 50)}}))
                    .send()
                    .await
                    .expect("register");
                assert!(r.status().is_success(), "register: {}", r.status());
                let r = http
                    .patch(format!("{base}/v1/devices/{id}/shadow"))
                    .bearer_auth(&token)
                    .json(
                        &json!({"desired": {"fan": "auto", "target_c": 20 + i % 5, "mode": "eco"}}),
                    )
                    .send()
                    .await
                    .expect("desired");
                assert!(r.status().is_success(), "desired: {}", r.status());
            }
        }));
    }
    for f in fill {
        f.await.expect("fill");
    }
    let filled = t.elapsed();
    let st = gws[&leader].node().status().raft;
    println!(
        "filled {devices} devices ({} entries) in {:.1} s; leader snapshot at index {}",
        st.commit,
        filled.as_secs_f64(),
        st.snapshot_index
    );

    // The fourth gateway joins.
    let mut all = peers.clone();
    all.insert(4, fourth);
    let mut c4 = config(4, &all);
    c4.join = true;
    let g4 = gateway::start(c4).await.expect("start gateway 4");
    let target = gws[&leader].node().status().raft.commit;
    let t = Instant::now();
    let r = http
        .post(format!("{base}/v1/cluster/members"))
        .bearer_auth(&token)
        .json(&json!({"id": 4, "address": fourth.to_string(), "suffrage": "learner"}))
        .send()
        .await
        .expect("add learner");
    assert!(r.status().is_success(), "add learner: {}", r.status());
    let added = t.elapsed();
    g4.node()
        .wait_applied(target, Duration::from_secs(600))
        .await
        .expect("gateway 4 catches up");
    let caught_up = t.elapsed();
    let s4 = g4.node().status().raft;
    assert!(s4.snapshot_index > 0, "the new member was sent a snapshot");
    println!(
        "new member: added in {:.0} ms, caught up to index {target} in {:.0} ms \
         (installed snapshot at index {}; its data dir is {:.1} MB)",
        added.as_secs_f64() * 1e3,
        caught_up.as_secs_f64() * 1e3,
        s4.snapshot_index,
        dir_size(&tmp.path().join("g4")) as f64 / 1e6
    );
    g4.stop().await;
    for (_, g) in gws {
        g.stop().await;
    }
}
