//! A job's rollout survives the death of the leader driving it.
//!
//! Three gateway processes, 300 devices connected to the followers (their
//! sessions outlive the leader), a job over all of them launched at a set
//! rate; the leader is killed (`kill -9`) in the middle of the rollout.
//! The new leader must pick the rollout up from the replicated state: the
//! job completes, and every device ran the job's command exactly once —
//! counted at the devices, which (as the protocol says) may get a command
//! again and de-duplicate it by id.
//!
//! Finished jobs are pruned after the retention, running ones are not.

mod common;

#[path = "support/ports.rs"]
mod ports;

#[allow(dead_code)]
mod chaos {
    pub mod cluster;
    pub mod proxy;
    pub mod rng;
}

#[path = "support/answer.rs"]
mod answer;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chaos::cluster::{Cluster, Settings, tail};
use entente_protocol::{CommandMessage, commands_topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::time::Instant;

/// What the devices ran: device id → the distinct command ids it ran
/// (each once, however often it was delivered).
type Runs = Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>;

/// A device that runs every command it gets the first time it sees its id
/// (recording it in `runs`) and answers it (`accepted`, then `succeeded`),
/// again on every redelivery, until dropped.
fn device(
    id: String,
    secret: String,
    addr: std::net::SocketAddr,
    runs: Runs,
) -> tokio::task::JoinHandle<()> {
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
                    runs.lock()
                        .expect("runs")
                        .entry(id.clone())
                        .or_default()
                        .insert(cmd.id.clone());
                    answer::answer_succeeded(&client, &id, &cmd.id);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}

/// `GET` of `path` on `base` as JSON (`None` if it failed).
async fn get(http: &reqwest::Client, base: &str, token: &str, path: &str) -> Option<Value> {
    let r = http
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

const DEVICES: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_the_death_of_its_leader_and_runs_each_device_once() {
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
    let cluster = Arc::new(Cluster::start(tmp.path(), settings, 0x10b5).await);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let followers: Vec<u64> = cluster.ids().into_iter().filter(|&i| i != leader).collect();
    let base = cluster.node(followers[0]).base();
    let token = cluster.token.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http");

    // The fleet, registered in one batch, each device connected to a
    // follower.
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("jd{i:03}")).collect();
    let batch: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
    let r: Value = http
        .post(format!("{base}/v1/devices/batch"))
        .bearer_auth(&token)
        .json(&json!({"devices": batch}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let runs: Runs = Arc::default();
    let mut devices = Vec::new();
    for (i, d) in r["devices"].as_array().expect("devices").iter().enumerate() {
        let id = d["id"].as_str().expect("id").to_string();
        let secret = d["secret"].as_str().expect("secret").to_string();
        let f = followers[i % followers.len()];
        devices.push(device(
            id,
            secret,
            cluster.node(f).mqtt_addr(),
            runs.clone(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let online = get(&http, &base, &token, "/v1/devices?online=true&limit=1000")
            .await
            .and_then(|v| v["items"].as_array().map(Vec::len))
            .unwrap_or(0);
        if online == DEVICES {
            break;
        }
        assert!(Instant::now() < deadline, "{online} of {DEVICES} online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 6,000 a minute (100/s), 40 in flight: about 3 s for the fleet.
    let r = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&token)
        .json(&json!({
            "command": {"name": "update", "params": {"version": "2.4.1"}},
            "target": {"devices": ids},
            "rollout": {"max_per_minute": 6000, "max_in_flight": 40},
            "timeout_ms": 120000,
        }))
        .send()
        .await
        .expect("create job");
    assert_eq!(r.status(), 201);
    let job: Value = r.json().await.expect("json");
    let job = job["id"].as_str().expect("job id").to_string();

    // Kill the leader in the middle of the rollout.
    let deadline = Instant::now() + Duration::from_secs(30);
    let launched_at_kill = loop {
        let launched = get(&http, &base, &token, &format!("/v1/jobs/{job}"))
            .await
            .and_then(|j| j["launched"].as_u64())
            .unwrap_or(0);
        if launched >= 80 {
            break launched;
        }
        assert!(Instant::now() < deadline, "the rollout never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.kill(leader).await;
    assert!(
        (launched_at_kill as usize) < DEVICES,
        "the rollout was over before the kill ({launched_at_kill} launched)"
    );

    // The new leader finishes it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let j = get(
            &http,
            &base,
            &token,
            &format!("/v1/jobs/{job}?consistency=local"),
        )
        .await;
        if let Some(j) = j.filter(|j| j["state"] != "in_progress" && j["state"] != "scheduled") {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "the job did not finish 60 s after the leader (gw{leader}) was killed at \
             {launched_at_kill} launched\n--- gw{} log:\n{}",
            followers[0],
            tail(&cluster.node(followers[0]).log, 40),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["launched"], DEVICES as u64, "{done}");
    assert_eq!(done["counts"]["succeeded"], DEVICES as u64, "{done}");

    // One execution per device, each with its own command, succeeded.
    let page = get(
        &http,
        &base,
        &token,
        &format!("/v1/jobs/{job}/executions?limit=1000&consistency=local"),
    )
    .await
    .expect("executions");
    let executions = page["items"].as_array().expect("items");
    assert_eq!(executions.len(), DEVICES);
    let mut commands = BTreeMap::new();
    for x in executions {
        assert_eq!(x["status"], "succeeded", "{x}");
        let device = x["device"].as_str().expect("device").to_string();
        let cid = x["command"].as_str().expect("command").to_string();
        commands.insert(device, cid);
    }
    // At the devices: each ran exactly one command, the one of its
    // execution.
    let runs = runs.lock().expect("runs").clone();
    assert_eq!(runs.len(), DEVICES, "devices that ran something");
    for (device, ran) in &runs {
        assert_eq!(ran.len(), 1, "{device} ran {ran:?}");
        assert_eq!(ran.first(), commands.get(device), "{device}");
    }
    for d in devices {
        d.abort();
    }
}

/// A finished job older than the retention (`--job-retention-ms`, short
/// here) disappears from `GET /v1/jobs` with its executions, pruned by the
/// leader through the log; a running job stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_pruned_after_the_retention_and_a_running_one_is_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let raft = ports::reserve_ports(1)[0];
    let mut config = gateway::Config::single(
        tmp.path().join("g1"),
        "127.0.0.1:0".parse().expect("addr"),
        raft,
    );
    config.job_retention = Duration::from_millis(300);
    let gw = gateway::start(config).await.expect("start");
    let token = std::fs::read_to_string(gw.admin_token_file.clone().expect("admin token"))
        .expect("token")
        .trim()
        .to_string();
    let base = format!("http://{}", gw.http_addr);
    let http = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, body: Value| {
        let req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token)
            .json(&body);
        async move {
            let r = req.send().await.expect("send");
            assert!(r.status().is_success(), "{}", r.status());
            r.json::<Value>().await.expect("json")
        }
    };
    use reqwest::Method;
    send(
        Method::POST,
        "/v1/devices/batch",
        json!({"devices": [{"id": "pump-1"}, {"id": "pump-2"}]}),
    )
    .await;
    let job = |devices: Value| {
        json!({"command": {"name": "update"}, "target": {"devices": devices},
               "timeout_ms": 600_000})
    };
    // One job left running (its device is not connected, so its command
    // stays unanswered), then, newer, one canceled at once (finished).
    let running = send(Method::POST, "/v1/jobs", job(json!(["pump-2"]))).await;
    let running = running["id"].as_str().expect("id").to_string();
    let canceled = send(Method::POST, "/v1/jobs", job(json!(["pump-1"]))).await;
    let canceled = canceled["id"].as_str().expect("id").to_string();
    send(
        Method::POST,
        &format!("/v1/jobs/{canceled}/cancel"),
        json!({}),
    )
    .await;

    let listed = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|j| j["id"].as_str().expect("id").to_string())
            .collect()
    };
    let deadline = Instant::now() + common::WAIT;
    loop {
        let jobs = get(&http, &base, &token, "/v1/jobs").await.expect("jobs");
        let ids = listed(&jobs);
        assert!(ids.contains(&running), "the running job is gone: {jobs}");
        if !ids.contains(&canceled) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the finished job was not pruned: {jobs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = http
        .get(format!("{base}/v1/jobs/{canceled}"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    // The running job, older than the one pruned, is still running.
    let j = get(&http, &base, &token, &format!("/v1/jobs/{running}"))
        .await
        .expect("the running job");
    assert_eq!(j["state"], json!("in_progress"), "{j}");
    gw.stop().await;
}
