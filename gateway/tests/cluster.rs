//! Three gateways as one group, in one process on real sockets: devices
//! connect to any of them, commands reach a device wherever it is connected,
//! presence follows the device, and the leader declares the sessions of a
//! gateway that went away lost after the grace period.

mod common;

#[path = "support/ports.rs"]
mod ports;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{Device, SseStream, WAIT, connect_v4};
use entente_protocol::CommandMessage;
use gateway::{Config, Gateway};
use ports::reserve_ports;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout_at};

struct Cluster {
    gws: BTreeMap<u64, Gateway>,
    token: String,
    http: reqwest::Client,
}

async fn three(dir: &Path) -> Cluster {
    three_with(dir, |_| {}).await
}

/// A gateway's settings in these tests.
fn config(dir: &Path, id: u64, peers: &BTreeMap<u64, SocketAddr>) -> Config {
    let mut c = Config::single(
        dir.join(format!("g{id}")),
        "127.0.0.1:0".parse().expect("addr"),
        peers[&id],
    );
    c.node_id = id;
    c.peers = peers.iter().map(|(id, a)| (*id, (*a).into())).collect();
    c.cluster_secret = Some("cluster-test-secret".into());
    c.tick = Duration::from_millis(5);
    c.session_grace = Duration::from_millis(400);
    c.report_coalesce = Duration::from_millis(10);
    c
}

async fn three_with(dir: &Path, tweak: impl Fn(&mut Config)) -> Cluster {
    let raft = reserve_ports(3);
    let peers: BTreeMap<u64, SocketAddr> = (1..=3).zip(raft.iter().copied()).collect();
    let configs = peers.keys().map(|&id| {
        let mut c = config(dir, id, &peers);
        tweak(&mut c);
        c
    });
    let started = futures_join(configs.map(gateway::start).collect()).await;
    let gws: BTreeMap<u64, Gateway> = (1..=3)
        .zip(started.into_iter().map(|g| g.expect("start")))
        .collect();
    let file = gws
        .values()
        .find_map(|g| g.admin_token_file.clone())
        .expect("the first leader wrote the admin token");
    let token = std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_string();
    Cluster {
        gws,
        token,
        http: reqwest::Client::new(),
    }
}

/// Runs the futures concurrently (the gateways must start together: each
/// waits for a leader) and returns their outputs in order.
async fn futures_join<F: Future + Send + 'static>(futs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("join"));
    }
    out
}

impl Cluster {
    fn base(&self, gw: u64) -> String {
        format!("http://{}", self.gws[&gw].http_addr)
    }

    fn mqtt(&self, gw: u64) -> SocketAddr {
        self.gws[&gw].mqtt_addr.expect("mqtt listener")
    }

    fn leader(&self) -> u64 {
        let st = self.gws.values().next().expect("a gateway").node().status();
        st.raft.leader.expect("a leader")
    }

    async fn request(&self, gw: u64, method: reqwest::Method, path: &str, body: Value) -> Value {
        let (status, body) = self.try_request(gw, method, path, body).await;
        assert!(status.is_success(), "{path} on {gw}: {status} {body}");
        body
    }

    async fn try_request(
        &self,
        gw: u64,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (reqwest::StatusCode, Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base(gw)))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, gw: u64, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base(gw)))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("get");
        assert!(
            r.status().is_success(),
            "GET {path} on {gw}: {}",
            r.status()
        );
        r.json().await.expect("json")
    }

    async fn register(&self, gw: u64, id: &str) -> String {
        let body = self
            .request(gw, reqwest::Method::POST, "/v1/devices", json!({"id": id}))
            .await;
        body["secret"].as_str().expect("secret").to_string()
    }

    async fn command(&self, gw: u64, device: &str, name: &str) -> String {
        let path = format!("/v1/devices/{device}/commands");
        let c = self
            .request(gw, reqwest::Method::POST, &path, json!({"name": name}))
            .await;
        c["id"].as_str().expect("id").to_string()
    }

    /// Polls `GET path` on gateway `gw` (a linearizable read) until `check`
    /// holds, waking on every change applied there.
    async fn until(&self, gw: u64, path: &str, what: &str, check: impl Fn(&Value) -> bool) {
        let mut applied = self.gws[&gw].db().watch_applied();
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.get(gw, path).await;
            if check(&v) {
                return;
            }
            if !matches!(timeout_at(deadline, applied.changed()).await, Ok(Ok(()))) {
                panic!("timed out waiting for {what}; last: {v}");
            }
        }
    }

    async fn wait_presence(&self, gw: u64, device: &str, online: bool, at: Option<u64>) {
        let what = format!("{device} online={online} at {at:?}");
        self.until(gw, &format!("/v1/devices/{device}"), &what, |d| {
            d["online"] == json!(online) && d["gateway"] == json!(at)
        })
        .await;
    }

    async fn wait_status(&self, gw: u64, cid: &str, status: &str) {
        let what = format!("{cid} {status}");
        self.until(gw, &format!("/v1/commands/{cid}"), &what, |c| {
            c["status"] == json!(status)
        })
        .await;
    }

    /// `GET /v1/events?after=` on gateway `gw`.
    async fn events(&self, gw: u64, after: u64) -> SseStream {
        let r = self
            .http
            .get(format!("{}/v1/events?after={after}", self.base(gw)))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("events");
        assert_eq!(r.status(), 200);
        SseStream {
            body: Box::pin(r.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn stop(self) {
        for (_, g) in self.gws {
            g.stop().await;
        }
    }
}

async fn online_device(addr: SocketAddr, id: &str, secret: &str) -> Device {
    let mut d = connect_v4(addr, id, id, secret);
    d.expect_connack().await;
    d.subscribed(&entente_protocol::commands_topic(id)).await;
    d
}

async fn answer(d: &mut Device, id: &str) -> String {
    let msg: CommandMessage =
        serde_json::from_slice(&d.message(&entente_protocol::commands_topic(id)).await)
            .expect("command");
    d.publish(
        &entente_protocol::result_topic(id, &msg.id),
        serde_json::to_vec(&json!({"status": "succeeded"})).expect("json"),
    )
    .await;
    msg.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_is_reached_through_whichever_gateway_holds_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let c = three(tmp.path()).await;
    let leader = c.leader();
    let followers: Vec<u64> = (1..=3).filter(|&g| g != leader).collect();
    let (a, b) = (followers[0], followers[1]);

    // Registered through a follower (forwarded), connected to the other one.
    let secret = c.register(a, "valve").await;
    let mut d = online_device(c.mqtt(b), "valve", &secret).await;
    c.wait_presence(leader, "valve", true, Some(b)).await;

    // A command issued on a third gateway reaches it through gateway b.
    let cid = c.command(a, "valve", "open").await;
    assert_eq!(answer(&mut d, "valve").await, cid);
    c.wait_status(a, &cid, "succeeded").await;

    // Offline: the next command waits, and follows the device to the leader's
    // broker when it reconnects there.
    d.disconnect().await;
    c.wait_presence(a, "valve", false, None).await;
    let queued = c.command(b, "valve", "close").await;
    let mut d = online_device(c.mqtt(leader), "valve", &secret).await;
    c.wait_presence(a, "valve", true, Some(leader)).await;
    assert_eq!(answer(&mut d, "valve").await, queued);
    c.wait_status(b, &queued, "succeeded").await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_of_a_lost_gateway_are_declared_lost_and_move_on() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = three(tmp.path()).await;
    let leader = c.leader();
    let lost = (1..=3).find(|&g| g != leader).expect("a follower");
    let other = (1..=3)
        .find(|&g| g != leader && g != lost)
        .expect("another follower");

    let secret = c.register(leader, "meter").await;
    let d = online_device(c.mqtt(lost), "meter", &secret).await;
    c.wait_presence(leader, "meter", true, Some(lost)).await;

    // The gateway holding the session goes away (as if it crashed); after
    // the grace period the leader declares its sessions lost.
    let gone = c.gws.remove(&lost).expect("gateway");
    gone.crash().await;
    drop(d);
    c.wait_presence(leader, "meter", false, None).await;
    // ... and it was the leader's declaration that took it offline.
    let mut sse = c.events(leader, 0).await;
    loop {
        let (_, kind, data) = sse.next().await;
        if kind == "device.presence" && data["id"] == "meter" && data["online"] == false {
            panic!("the stopped gateway reported the session's end itself: {data}");
        }
        if kind == "gateway.sessions_lost" {
            assert_eq!(data, json!({"gateway": lost, "devices": ["meter"]}));
            break;
        }
    }

    // A command issued meanwhile waits and is delivered where it reconnects.
    let cid = c.command(other, "meter", "read").await;
    let mut d = online_device(c.mqtt(other), "meter", &secret).await;
    c.wait_presence(leader, "meter", true, Some(other)).await;
    assert_eq!(answer(&mut d, "meter").await, cid);
    c.wait_status(leader, &cid, "succeeded").await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_add_a_learner_by_snapshot_promote_transfer_and_remove() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Snapshots every 20 entries: the new member cannot get the log from the
    // start and must be sent a snapshot.
    let mut c = three_with(tmp.path(), |c| c.snapshot_every = 20).await;
    let leader = c.leader();
    let follower = (1..=3).find(|&g| g != leader).expect("a follower");
    for i in 0..60 {
        c.register(1 + i % 3, &format!("dev-{i}")).await;
    }

    // Gateway 4 starts with --join (no membership of its own) ...
    let mut peers: BTreeMap<u64, SocketAddr> =
        c.gws.iter().map(|(&id, g)| (id, g.raft_addr)).collect();
    peers.insert(4, reserve_ports(1)[0]);
    let mut cfg = config(tmp.path(), 4, &peers);
    cfg.join = true;
    let g4 = gateway::start(cfg).await.expect("start gateway 4");
    assert_eq!(g4.node().status().raft.conf_state.voters.len(), 0);
    let address = g4.raft_addr.to_string();
    c.gws.insert(4, g4);

    // ... and is added as a learner through a follower (forwarded).
    let (status, body) = c
        .try_request(
            follower,
            reqwest::Method::POST,
            "/v1/cluster/members",
            json!({"id": 4, "suffrage": "voter"}),
        )
        .await;
    assert_eq!(status, 409, "promoting a non-member: {body}");
    let added = c
        .request(
            follower,
            reqwest::Method::POST,
            "/v1/cluster/members",
            json!({"id": 4, "address": address, "suffrage": "learner"}),
        )
        .await;
    assert_eq!(added["suffrage"], "learner");

    // It catches up by snapshot: everything registered is there.
    let target = c.gws[&leader].node().status().raft.commit;
    c.gws[&4]
        .node()
        .wait_applied(target, WAIT)
        .await
        .expect("gateway 4 catches up");
    assert!(
        c.gws[&4].node().status().raft.snapshot_index > 0,
        "gateway 4 was sent a snapshot"
    );
    let listed = c.get(4, "/v1/devices?consistency=local&limit=1000").await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(60));

    // Promoted, it leads after a transfer asked of any gateway.
    let promoted = c
        .request(
            leader,
            reqwest::Method::POST,
            "/v1/cluster/members",
            json!({"id": 4, "suffrage": "voter"}),
        )
        .await;
    assert_eq!(promoted["suffrage"], "voter");
    let after = c
        .request(
            follower,
            reqwest::Method::POST,
            "/v1/cluster/leader",
            json!({"id": 4}),
        )
        .await;
    assert_eq!(after["leader"], 4);

    // The old leader is removed; the group of three keeps taking writes,
    // including through gateway 4.
    let removed = c
        .request(
            4,
            reqwest::Method::DELETE,
            &format!("/v1/cluster/members/{leader}"),
            Value::Null,
        )
        .await;
    assert_eq!(removed["suffrage"], "removed");
    let view = c.get(4, "/v1/cluster").await;
    let ids: Vec<u64> = view["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    let mut expected: Vec<u64> = (1..=4).filter(|&g| g != leader).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
    let (status, _) = c
        .try_request(
            4,
            reqwest::Method::DELETE,
            &format!("/v1/cluster/members/{leader}"),
            Value::Null,
        )
        .await;
    assert_eq!(status, 404, "removing a non-member");
    c.register(4, "after-the-change").await;
    c.register(follower, "and-another").await;
    c.stop().await;
}
