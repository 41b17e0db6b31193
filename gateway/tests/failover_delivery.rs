//! Commands committed as a leader dies still reach their devices.
//!
//! The trial that found the bug: three gateway processes, commands issued
//! through the followers to devices connected to the followers, `kill -9`
//! of the leader in the middle. Commands whose `sent`, `accepted` or
//! `result` step was being proposed through the dying leader stayed `sent`
//! (or `queued`) until they expired, although their devices were connected
//! the whole time: the gateway gave up on a proposal after its first
//! failure. Here every command the API accepted must end `succeeded`, well
//! before its TTL.

#[allow(dead_code)]
mod chaos {
    pub mod cluster;
    pub mod proxy;
    pub mod rng;
}

#[path = "support/answer.rs"]
mod answer;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chaos::cluster::{Cluster, Settings, tail};
use entente_protocol::{CommandMessage, commands_topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::time::Instant;

/// A device that answers every command it gets (`accepted`, then a
/// `succeeded` result), again for every redelivery, until dropped.
fn device(id: String, secret: String, addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut opts = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
        opts.set_credentials(&id, &secret);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut ev) = AsyncClient::new(opts, 100);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe(commands_topic(&id), QoS::AtLeastOnce)
                        .await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(cmd) = serde_json::from_slice::<CommandMessage>(&p.payload) else {
                        continue;
                    };
                    answer::answer_succeeded(&client, &id, &cmd.id);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_committed_as_the_leader_dies_reach_their_devices() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let settings = Settings {
        nodes: 3,
        tick_ms: 10,
        write_timeout_ms: 1_500,
        session_grace_ms: 30_000,
        snapshot_every: 100_000,
        log_filter: "info".into(),
        consensus: "raft".into(),
        byzantine: None,
    };
    let cluster = Arc::new(Cluster::start(tmp.path(), settings, 0x5eed_f00d).await);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let followers: Vec<u64> = cluster.ids().into_iter().filter(|&i| i != leader).collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http");

    // 40 devices, each connected to a follower (their sessions outlive the
    // leader).
    let mut devices = Vec::new();
    let mut names = Vec::new();
    for i in 0..40 {
        let id = format!("fd{i}");
        let f = followers[i % followers.len()];
        let r: Value = http
            .post(format!("{}/v1/devices", cluster.node(f).base()))
            .bearer_auth(&cluster.token)
            .json(&json!({"id": id}))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("json");
        let secret = r["secret"].as_str().expect("secret").to_string();
        devices.push(device(id.clone(), secret, cluster.node(f).mqtt_addr()));
        names.push((id, f));
    }
    // All online (through their followers' sessions).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r: Value = http
            .get(format!(
                "{}/v1/devices?online=true&limit=100",
                cluster.node(followers[0]).base()
            ))
            .bearer_auth(&cluster.token)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        if r["items"].as_array().map_or(0, Vec::len) == names.len() {
            break;
        }
        assert!(Instant::now() < deadline, "devices not online: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Commands at ~150/s through the followers for 3 s; the leader is
    // killed 1.5 s in.
    let issued: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let mut issuers = Vec::new();
    let start = Instant::now();
    for (k, (dev, f)) in names.iter().cycle().take(450).enumerate() {
        let at = start + Duration::from_micros(6_667 * k as u64);
        let (http, base, token, dev, issued) = (
            http.clone(),
            cluster.node(*f).base(),
            cluster.token.clone(),
            dev.clone(),
            issued.clone(),
        );
        issuers.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let r = http
                .post(format!("{base}/v1/devices/{dev}/commands"))
                .bearer_auth(&token)
                .json(&json!({"name": "failover", "params": {"k": k}, "ttl_ms": 60_000}))
                .send()
                .await;
            if let Ok(r) = r
                && r.status().is_success()
                && let Ok(v) = r.json::<Value>().await
                && let Some(cid) = v["id"].as_str()
            {
                issued.lock().expect("issued").push(cid.to_string());
            }
        }));
    }
    tokio::time::sleep_until(start + Duration::from_millis(1_500)).await;
    cluster.kill(leader).await;
    let killed = Instant::now();
    for t in issuers {
        t.await.expect("issuer");
    }
    let issued = issued.lock().expect("issued").clone();
    assert!(
        issued.len() > 300,
        "only {} commands accepted",
        issued.len()
    );

    // Every accepted command succeeds — within 20 s of the kill, far inside
    // its 60 s TTL.
    let base = cluster.node(followers[0]).base();
    let deadline = killed + Duration::from_secs(20);
    let mut open: BTreeMap<String, String> = BTreeMap::new();
    let mut pending: HashSet<String> = issued.iter().cloned().collect();
    while !pending.is_empty() {
        open.clear();
        for cid in pending.clone() {
            let r = http
                .get(format!("{base}/v1/commands/{cid}?consistency=local"))
                .bearer_auth(&cluster.token)
                .send()
                .await;
            let Ok(r) = r else { continue };
            let Ok(v) = r.json::<Value>().await else {
                continue;
            };
            let status = v["status"].as_str().unwrap_or("?").to_string();
            match status.as_str() {
                "succeeded" => {
                    pending.remove(&cid);
                }
                "queued" | "sent" | "accepted" => {
                    open.insert(cid, status);
                }
                other => panic!("command {cid} ended {other}: {v}"),
            }
        }
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
            for s in open.values() {
                *by_status.entry(s.as_str()).or_default() += 1;
            }
            panic!(
                "{} of {} commands did not reach their connected devices 20 s after the \
                 leader (gw{leader}) was killed: {by_status:?}, e.g. {:?}\n--- gw{} log:\n{}",
                open.len(),
                issued.len(),
                open.iter().take(5).collect::<Vec<_>>(),
                followers[0],
                tail(&cluster.node(followers[0]).log, 40),
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for d in devices {
        d.abort();
    }
}
