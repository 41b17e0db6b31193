//! Devices over MQTT, end to end: `gateway::start` with port-0 listeners,
//! real rumqttc clients (MQTT 3.1.1 and 5) and raw sockets.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use entente_protocol::{CommandMessage, ShadowDocument};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, timeout_at};

mod common;

use common::{Seen, SseStream, WAIT, connect_v4, connect_v4_keep_alive, connect_v5, metric};

/// Every test of this file again on every other engine a gateway runs.
#[test]
fn every_test_passes_on_every_engine() {
    common::rerun_on_every_other_engine(None, &["every_test_passes_on_every_engine"], 16);
}

type Env = common::Single;

/// A gateway on the engine under test, reports coalesced over 30 ms, MQTT
/// payloads of at most 1 KiB.
async fn boot(dir: &Path) -> Env {
    common::single(dir, |c| {
        c.report_coalesce = Duration::from_millis(30);
        c.mqtt_max_payload = 1024;
        c.consensus = common::engine_under_test();
    })
    .await
}

impl Env {
    fn v4(&self) -> SocketAddr {
        self.gw.mqtt_addr.expect("mqtt listener")
    }

    fn v5(&self) -> SocketAddr {
        self.gw.mqtt5_addr.expect("mqtt5 listener")
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("get");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("json")
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.expect("json")
    }

    async fn command(&self, device: &str, body: Value) -> String {
        let c = self
            .send(
                reqwest::Method::POST,
                &format!("/v1/devices/{device}/commands"),
                body,
            )
            .await;
        c["id"].as_str().expect("id").to_string()
    }

    /// Opens `GET /v1/events` (it starts with the next change).
    async fn events(&self) -> SseStream {
        let r = self
            .http
            .get(format!("{}/v1/events", self.base))
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

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Waits until `check` holds, re-checking after each applied log entry.
    async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut applied = self.gw.db().watch_applied();
        let deadline = Instant::now() + WAIT;
        loop {
            if check().await {
                return;
            }
            match timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => {}
                _ => panic!("timed out waiting for: {what}"),
            }
        }
    }

    async fn device(&self, id: &str) -> Value {
        self.get(&format!("/v1/devices/{id}")).await
    }

    async fn wait_online(&self, id: &str, online: bool) {
        self.eventually(&format!("{id} online={online}"), || async {
            self.device(id).await["online"] == json!(online)
        })
        .await;
    }

    /// Registers device `id`, connects it (3.1.1) subscribed to its
    /// commands, and waits until the group has it online.
    async fn commanded_device(&self, id: &str) -> common::Device {
        let secret = self.register(id).await;
        let mut d = connect_v4(self.v4(), id, id, &secret);
        d.expect_connack().await;
        d.subscribed(&format!("devices/{id}/commands")).await;
        self.wait_online(id, true).await;
        d
    }

    async fn wait_status(&self, cid: &str, status: &str) -> Value {
        let path = format!("/v1/commands/{cid}");
        self.eventually(&format!("{cid} {status}"), || async {
            self.get(&path).await["status"] == json!(status)
        })
        .await;
        self.get(&path).await
    }
}

/// Device `id` accepts command `cid` and, without waiting for the
/// acknowledgement, answers it: succeeded.
async fn answer_at_once(d: &common::Device, id: &str, cid: &str) {
    let accepted = format!("devices/{id}/commands/{cid}/accepted");
    d.publish(&accepted, b"{}".to_vec()).await;
    let result = serde_json::to_vec(&json!({"status": "succeeded"})).expect("json");
    d.publish(&format!("devices/{id}/commands/{cid}/result"), result)
        .await;
}

/// The kinds of command `cid`'s events on `sse`, up to its result.
async fn command_events(sse: &mut SseStream, cid: &str) -> Vec<String> {
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("command.result") {
        let (_, event, data) = sse.next().await;
        if data["id"] == json!(cid) {
            seen.push(event);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logins_are_checked_against_the_registry() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("dev-a").await;
    env.register("dev-b").await;

    connect_v4(env.v4(), "dev-a", "dev-a", "wrong")
        .expect_closed()
        .await;
    connect_v4(env.v4(), "nobody", "nobody", &secret)
        .expect_closed()
        .await;
    connect_v4(env.v4(), "dev-b", "dev-a", &secret)
        .expect_closed()
        .await;
    connect_v5(env.v5(), "dev-a", "wrong").expect_closed().await;
    assert!(metric(&env.metrics().await, "entente_mqtt_auth_failures_total") >= 4);

    let mut ok = connect_v4(env.v4(), "dev-a", "dev-a", &secret);
    ok.expect_connack().await;
    env.wait_online("dev-a", true).await;
    assert_eq!(env.device("dev-a").await["gateway"], json!(1));
    ok.disconnect().await;
    env.wait_online("dev-a", false).await;

    let mut ok5 = connect_v5(env.v5(), "dev-a", &secret);
    ok5.expect_connack().await;
    env.wait_online("dev-a", true).await;
    let list = env.get("/v1/devices?online=true").await;
    assert!(list.to_string().contains("dev-a"), "{list}");
    env.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_devices_topics_disconnect() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("a").await;
    env.register("b").await;

    let mut d = connect_v4(env.v4(), "a", "a", &secret);
    d.expect_connack().await;
    d.publish("devices/b/shadow/reported", b"{}".to_vec()).await;
    d.expect_closed().await;

    let mut d = connect_v5(env.v5(), "a", &secret);
    d.expect_connack().await;
    d.subscribe("devices/b/#").await;
    d.expect_closed().await;

    let mut d = connect_v4(env.v4(), "a", "a", &secret);
    d.expect_connack().await;
    d.subscribe("#").await;
    d.expect_closed().await;

    let mut d = connect_v4(env.v4(), "a", "a", &secret);
    d.expect_connack().await;
    d.publish("devices/a/commands", b"{}".to_vec()).await;
    d.expect_closed().await;

    assert!(metric(&env.metrics().await, "entente_mqtt_acl_violations_total") >= 4);
    // Its own topics are fine.
    let mut d = connect_v4(env.v4(), "a", "a", &secret);
    d.expect_connack().await;
    d.subscribed("devices/a/#").await;
    env.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn command_round_trip_and_presence() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let mut d = env.commanded_device("pump").await;

    // Follow the event stream from here on: the command's whole life shows there.
    let mut sse = env.events().await;
    let cid = env
        .command("pump", json!({"name": "reboot", "params": {"delay": 5}}))
        .await;
    let msg: CommandMessage =
        serde_json::from_slice(&d.message("devices/pump/commands").await).expect("command");
    assert_eq!(msg.id, cid);
    assert_eq!(msg.name, "reboot");
    assert_eq!(msg.params, json!({"delay": 5}));
    env.wait_status(&cid, "sent").await;

    d.publish(
        &format!("devices/pump/commands/{cid}/accepted"),
        b"{}".to_vec(),
    )
    .await;
    env.wait_status(&cid, "accepted").await;
    d.publish(
        &format!("devices/pump/commands/{cid}/result"),
        serde_json::to_vec(&json!({"status": "succeeded", "output": {"ok": true}})).expect("json"),
    )
    .await;
    let done = env.wait_status(&cid, "succeeded").await;
    assert_eq!(done["output"], json!({"ok": true}));

    let mut seen = Vec::new();
    let mut last_index = 0;
    while seen.last().map(String::as_str) != Some("command.result") {
        let (id, event, data) = sse.next().await;
        assert!(id > last_index, "event ids are increasing log indexes");
        last_index = id;
        if data["id"] == json!(cid) {
            if event == "command.result" {
                assert_eq!(data["status"], "succeeded");
                assert_eq!(data["output"], json!({"ok": true}));
            }
            seen.push(event);
        }
    }
    assert_eq!(
        seen,
        [
            "command.issued",
            "command.sent",
            "command.accepted",
            "command.result"
        ]
    );

    d.disconnect().await;
    env.wait_online("pump", false).await;
    env.gw.stop().await;
}

/// A device that accepts a command and answers it at once costs the command
/// two committed entries, issued and result: its `accepted` is answered
/// when the result commits (no entry of its own), and the command is not
/// marked `sent` once it has been answered. Both messages are still
/// acknowledged, and only once the result committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_answered_at_once_costs_two_entries() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let mut d = env.commanded_device("valve").await;

    let mut sse = env.events().await;
    let cid = env.command("valve", json!({"name": "open"})).await;
    let msg: CommandMessage =
        serde_json::from_slice(&d.message("devices/valve/commands").await).expect("command");
    assert_eq!(msg.id, cid);
    answer_at_once(&d, "valve", &cid).await;
    // Both are acknowledged (after the result committed).
    let mut acks = 0;
    while acks < 2 {
        if let common::Seen::PubAck(_) = d.next().await {
            acks += 1;
        }
    }
    env.wait_status(&cid, "succeeded").await;

    let seen = command_events(&mut sse, &cid).await;
    assert_eq!(seen, ["command.issued", "command.result"]);
    let m = env.metrics().await;
    assert_eq!(metric(&m, "entente_mqtt_accepted_folded_total"), 1);
    assert_eq!(metric(&m, "entente_mqtt_sent_skipped_total"), 1);
    // Every PUBLISH the device sent is counted: its accepted and its result.
    assert_eq!(
        metric(&m, "entente_mqtt_publishes_received_total"),
        2,
        "{m}"
    );

    // A device slower than that still has every step recorded: an accepted
    // whose result does not follow is committed on its own, and a command
    // not answered for a while is marked sent (the test's device waits for
    // each to show before it goes on).
    let cid = env.command("valve", json!({"name": "close"})).await;
    let _ = d.message("devices/valve/commands").await;
    env.wait_status(&cid, "sent").await;
    d.publish(
        &format!("devices/valve/commands/{cid}/accepted"),
        b"{}".to_vec(),
    )
    .await;
    env.wait_status(&cid, "accepted").await;
    d.publish(
        &format!("devices/valve/commands/{cid}/result"),
        serde_json::to_vec(&json!({"status": "failed"})).expect("json"),
    )
    .await;
    env.wait_status(&cid, "failed").await;
    let seen = command_events(&mut sse, &cid).await;
    assert_eq!(
        seen,
        [
            "command.issued",
            "command.sent",
            "command.accepted",
            "command.result"
        ]
    );
    let m = env.metrics().await;
    assert_eq!(metric(&m, "entente_mqtt_accepted_folded_total"), 1);
    d.disconnect().await;
    env.gw.stop().await;
}

/// A queued command a device gets when it subscribes is marked `sent` only
/// if the device does not answer it first, as one published when issued:
/// answered at once, it costs two entries (the mark used to be proposed at
/// once, from a task of its own per command).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_command_answered_on_connect_is_not_marked_sent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("lamp").await;
    let mut sse = env.events().await;
    let cid = env.command("lamp", json!({"name": "on"})).await;
    assert_eq!(
        env.get(&format!("/v1/commands/{cid}")).await["status"],
        "queued"
    );

    let mut d = connect_v4(env.v4(), "lamp", "lamp", &secret);
    d.expect_connack().await;
    d.subscribed("devices/lamp/commands").await;
    let msg: CommandMessage =
        serde_json::from_slice(&d.message("devices/lamp/commands").await).expect("command");
    assert_eq!(msg.id, cid);
    answer_at_once(&d, "lamp", &cid).await;
    env.wait_status(&cid, "succeeded").await;
    assert_eq!(
        command_events(&mut sse, &cid).await,
        ["command.issued", "command.result"]
    );
    let m = env.metrics().await;
    assert_eq!(metric(&m, "entente_mqtt_sent_skipped_total"), 1);
    d.disconnect().await;
    env.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_device_gets_queued_commands_and_desired_state_on_connect() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("fan").await;
    let c1 = env.command("fan", json!({"name": "one"})).await;
    let c2 = env.command("fan", json!({"name": "two"})).await;
    let expiring = env
        .command("fan", json!({"name": "short", "ttl_ms": 1}))
        .await;
    env.wait_status(&expiring, "expired").await;
    env.send(
        reqwest::Method::PATCH,
        "/v1/devices/fan/shadow",
        json!({"desired": {"speed": 3}}),
    )
    .await;

    let mut d = connect_v5(env.v5(), "fan", &secret);
    d.expect_connack().await;
    d.subscribe("devices/fan/#").await;
    let mut got = Vec::new();
    let (mut desired, mut delta) = (None, None);
    while got.len() < 2 || desired.is_none() || delta.is_none() {
        match d.next().await {
            Seen::Publish(t, p) if t == "devices/fan/commands" => {
                let m: CommandMessage = serde_json::from_slice(&p).expect("command");
                got.push(m.id);
            }
            Seen::Publish(t, p) if t == "devices/fan/shadow/desired" => {
                desired = Some(serde_json::from_slice::<ShadowDocument>(&p).expect("doc"));
            }
            Seen::Publish(t, p) if t == "devices/fan/shadow/delta" => {
                delta = Some(serde_json::from_slice::<ShadowDocument>(&p).expect("doc"));
            }
            Seen::Closed(e) => panic!("closed: {e}"),
            _ => {}
        }
    }
    got.sort();
    let mut want = vec![c1.clone(), c2.clone()];
    want.sort();
    assert_eq!(got, want, "the expired command is not delivered");
    assert_eq!(desired.expect("desired").state, json!({"speed": 3}));
    assert_eq!(delta.expect("delta").state, json!({"speed": 3}));
    env.wait_status(&c1, "sent").await;
    env.wait_status(&c2, "sent").await;
    env.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_desired_delta_reported() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("lamp").await;
    let mut d = connect_v4(env.v4(), "lamp", "lamp", &secret);
    d.expect_connack().await;
    d.subscribed("devices/lamp/shadow/+").await;

    env.send(
        reqwest::Method::PATCH,
        "/v1/devices/lamp/shadow",
        json!({"desired": {"on": true, "level": 7}}),
    )
    .await;
    // The documents sent on subscribing come first (empty); then the change.
    loop {
        let desired = d.json("devices/lamp/shadow/desired").await;
        if desired["state"] == json!({"on": true, "level": 7}) {
            assert_eq!(desired["version"], json!(1));
            break;
        }
        assert_eq!(desired["state"], json!({}));
    }
    loop {
        let delta = d.json("devices/lamp/shadow/delta").await;
        if delta["state"] == json!({"on": true, "level": 7}) {
            break;
        }
    }
    // Three patches in a burst are coalesced; the result is their merge.
    d.publish("devices/lamp/shadow/reported", br#"{"on": true}"#.to_vec())
        .await;
    d.publish("devices/lamp/shadow/reported", br#"{"level": 1}"#.to_vec())
        .await;
    d.publish("devices/lamp/shadow/reported", br#"{"level": 7}"#.to_vec())
        .await;
    loop {
        let delta = d.json("devices/lamp/shadow/delta").await;
        if delta["state"] == json!({}) {
            break;
        }
    }
    let sh = env.get("/v1/devices/lamp/shadow").await;
    assert_eq!(sh["reported"], json!({"on": true, "level": 7}));
    assert_eq!(sh["delta"], json!({}));
    env.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_messages_are_ignored_and_the_gateway_serves_on() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("x").await;
    let other = env.register("y").await;
    let foreign = env.command("y", json!({"name": "theirs"})).await;

    // Garbage on a raw socket.
    let mut raw = tokio::net::TcpStream::connect(env.v4())
        .await
        .expect("connect");
    raw.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3])
        .await
        .expect("write");
    let mut raw5 = tokio::net::TcpStream::connect(env.v5())
        .await
        .expect("connect");
    raw5.write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");

    let mut d = connect_v4(env.v4(), "x", "x", &secret);
    d.expect_connack().await;
    d.subscribed("devices/x/commands").await;
    d.publish("devices/x/commands/nope/accepted", b"{}".to_vec())
        .await;
    d.publish(
        &format!("devices/x/commands/{foreign}/result"),
        br#"{"status":"succeeded"}"#.to_vec(),
    )
    .await;
    d.publish("devices/x/shadow/reported", b"{not json".to_vec())
        .await;
    d.publish("devices/x/shadow/reported", b"[1,2]".to_vec())
        .await;
    d.publish("devices/x/shadow/reported", vec![b' '; 4096])
        .await;
    let cid = env.command("x", json!({"name": "still"})).await;
    d.publish(
        &format!("devices/x/commands/{cid}/result"),
        b"{\"status\":".to_vec(),
    )
    .await;
    let msg: CommandMessage =
        serde_json::from_slice(&d.message("devices/x/commands").await).expect("command");
    assert_eq!(msg.id, cid);
    d.publish(
        &format!("devices/x/commands/{cid}/result"),
        br#"{"status":"failed","output":{"why":"test"}}"#.to_vec(),
    )
    .await;
    env.wait_status(&cid, "failed").await;
    assert_eq!(
        env.get(&format!("/v1/commands/{foreign}")).await["status"],
        json!("queued")
    );
    // The `accepted` for an unknown command waits for a result that never
    // comes before it is checked (and ignored): polled, bounded.
    let deadline = Instant::now() + WAIT;
    let m = loop {
        let m = env.metrics().await;
        if metric(&m, "entente_mqtt_ignored_messages_total") >= 6 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        metric(&m, "entente_mqtt_ignored_messages_total") >= 6,
        "{m}"
    );
    assert!(
        metric(&m, "entente_mqtt_malformed_packets_total") >= 1,
        "{m}"
    );

    // Others are served.
    let mut y = connect_v5(env.v5(), "y", &other);
    y.expect_connack().await;
    y.subscribe("devices/y/commands").await;
    let got: CommandMessage =
        serde_json::from_slice(&y.message("devices/y/commands").await).expect("command");
    assert_eq!(got.id, foreign);
    env.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_loses_no_command_state() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("m").await;
    let mut d = connect_v4(env.v4(), "m", "m", &secret);
    d.expect_connack().await;
    d.subscribed("devices/m/commands").await;
    let cid = env.command("m", json!({"name": "a"})).await;
    d.message("devices/m/commands").await;
    env.wait_status(&cid, "sent").await;
    let queued = env.command("m", json!({"name": "b"})).await;
    d.message("devices/m/commands").await;
    env.wait_status(&queued, "sent").await;
    d.publish(
        &format!("devices/m/commands/{cid}/accepted"),
        b"{}".to_vec(),
    )
    .await;
    env.wait_status(&cid, "accepted").await;
    drop(d);
    env.gw.stop().await;

    let env = boot(tmp.path()).await;
    assert_eq!(
        env.get(&format!("/v1/commands/{cid}")).await["status"],
        json!("accepted")
    );
    // The old session is gone after the restart.
    env.wait_online("m", false).await;
    let mut d = connect_v4(env.v4(), "m", "m", &secret);
    d.expect_connack().await;
    d.subscribed("devices/m/commands").await;
    let msg: CommandMessage =
        serde_json::from_slice(&d.message("devices/m/commands").await).expect("command");
    assert_eq!(msg.id, queued, "the sent command is delivered again");
    d.publish(
        &format!("devices/m/commands/{cid}/result"),
        br#"{"status":"succeeded"}"#.to_vec(),
    )
    .await;
    env.wait_status(&cid, "succeeded").await;
    env.gw.stop().await;
}

/// Device publishes are taken out of the broker's router (see the codec):
/// each QoS 1 publish still gets its PUBACK, in order, and the device's own
/// keep-alive pings still get their PINGRESP, in both protocol versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_publishes_are_acknowledged_and_pings_answered() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("meter").await;
    let mut d = connect_v4_keep_alive(env.v4(), "meter", "meter", &secret, Duration::from_secs(1));
    d.expect_connack().await;
    let topic = entente_protocol::reported_topic("meter");
    for i in 0..20 {
        d.publish(&topic, format!("{{\"n\": {i}}}").into_bytes())
            .await;
    }
    let (mut acks, mut pings) = (Vec::new(), 0);
    while acks.len() < 20 || pings == 0 {
        match d.next().await {
            Seen::PubAck(pkid) => acks.push(pkid),
            Seen::PingResp => pings += 1,
            Seen::Closed(e) => panic!("closed: {e}"),
            _ => {}
        }
    }
    assert_eq!(
        acks,
        (1..=20).collect::<Vec<u16>>(),
        "every publish acknowledged, in order"
    );
    env.eventually("the last report applied", || async {
        env.get("/v1/devices/meter/shadow").await["reported"]["n"] == json!(19)
    })
    .await;

    let secret5 = env.register("meter5").await;
    let mut d5 = connect_v5(env.v5(), "meter5", &secret5);
    d5.expect_connack().await;
    d5.publish(
        &entente_protocol::reported_topic("meter5"),
        b"{\"on\": true}".to_vec(),
    )
    .await;
    loop {
        match d5.next().await {
            Seen::PubAck(pkid) => {
                assert_eq!(pkid, 1);
                break;
            }
            Seen::Closed(e) => panic!("closed: {e}"),
            _ => {}
        }
    }
    env.gw.stop().await;
}

/// A device on a raw socket, its packets encoded and decoded by rumqttc's
/// codec: for the attacks a client library would not let us make.
mod raw {
    use std::net::SocketAddr;

    use bytes::BytesMut;
    use rumqttc::mqttbytes::{QoS, v4};
    use rumqttc::v5::mqttbytes::v5;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::{Instant, timeout_at};

    use super::WAIT;

    /// What the gateway sent, in either version.
    #[derive(Debug, PartialEq)]
    pub enum Got {
        /// CONNACK: session present, return / reason code (as its number).
        ConnAck(bool, u8),
        Publish(String, Vec<u8>),
        SubAck,
        PubAck(u16),
        /// MQTT 5 DISCONNECT with its reason code.
        Disconnect(u8),
        Other(String),
        /// The connection closed.
        Closed,
    }

    pub struct Raw {
        pub s: TcpStream,
        buf: BytesMut,
        v5: bool,
    }

    pub fn connect_v4(id: &str, password: &str, clean: bool) -> BytesMut {
        let mut c = v4::Connect::new(id);
        c.set_login(id, password);
        c.clean_session = clean;
        c.keep_alive = 30;
        let mut b = BytesMut::new();
        c.write(&mut b).expect("encode");
        b
    }

    pub fn connect_v5(id: &str, password: &str) -> BytesMut {
        let mut c = v5::Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        };
        c.clean_start = true;
        let login = v5::Login {
            username: id.into(),
            password: password.into(),
        };
        let mut b = BytesMut::new();
        c.write(&None, &Some(login), &mut b).expect("encode");
        b
    }

    pub fn subscribe(v5: bool, filter: &str) -> BytesMut {
        let mut b = BytesMut::new();
        if v5 {
            v5::Subscribe::new(
                v5::Filter::new(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
                None,
            )
            .write(&mut b)
            .expect("encode");
        } else {
            v4::Subscribe::new(filter, QoS::AtLeastOnce)
                .write(&mut b)
                .expect("encode");
        }
        b
    }

    pub fn publish(v5: bool, topic: &str, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        if v5 {
            let mut p = v5::Publish::new(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                payload.to_vec(),
                None,
            );
            p.pkid = 9;
            p.write(&mut b).expect("encode");
        } else {
            let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
            p.pkid = 9;
            p.write(&mut b).expect("encode");
        }
        b
    }

    impl Raw {
        pub async fn open(addr: SocketAddr, v5: bool) -> Raw {
            Raw {
                s: TcpStream::connect(addr).await.expect("connect"),
                buf: BytesMut::new(),
                v5,
            }
        }

        pub async fn send(&mut self, bytes: &[u8]) {
            // The gateway may already have closed: that is for `next` to see.
            let _ = self.s.write_all(bytes).await;
        }

        /// The next packet, or `Closed`; panics after `WAIT`.
        pub async fn next(&mut self) -> Got {
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(p) = self.parse() {
                    return p;
                }
                match timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                    Ok(Ok(0) | Err(_)) => return Got::Closed,
                    Ok(Ok(_)) => {}
                    Err(_) => panic!("nothing from the gateway within {WAIT:?}"),
                }
            }
        }

        fn parse(&mut self) -> Option<Got> {
            if self.buf.is_empty() {
                return None;
            }
            if self.v5 {
                match v5::Packet::read(&mut self.buf, None) {
                    Ok(v5::Packet::ConnAck(a)) => {
                        Some(Got::ConnAck(a.session_present, v5_code(a.code)))
                    }
                    Ok(v5::Packet::Publish(p)) => Some(Got::Publish(
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        p.payload.to_vec(),
                    )),
                    Ok(v5::Packet::SubAck(_)) => Some(Got::SubAck),
                    Ok(v5::Packet::PubAck(a)) => Some(Got::PubAck(a.pkid)),
                    Ok(v5::Packet::Disconnect(d)) => Some(Got::Disconnect(d.reason_code as u8)),
                    Ok(p) => Some(Got::Other(format!("{p:?}"))),
                    Err(_) => None,
                }
            } else {
                match v4::Packet::read(&mut self.buf, 1 << 20) {
                    Ok(v4::Packet::ConnAck(a)) => {
                        Some(Got::ConnAck(a.session_present, a.code as u8))
                    }
                    Ok(v4::Packet::Publish(p)) => Some(Got::Publish(p.topic, p.payload.to_vec())),
                    Ok(v4::Packet::SubAck(_)) => Some(Got::SubAck),
                    Ok(v4::Packet::PubAck(a)) => Some(Got::PubAck(a.pkid)),
                    Ok(p) => Some(Got::Other(format!("{p:?}"))),
                    Err(_) => None,
                }
            }
        }
    }

    fn v5_code(c: v5::ConnectReturnCode) -> u8 {
        use v5::ConnectReturnCode as C;
        match c {
            C::Success => 0,
            C::BadUserNamePassword => 0x86,
            C::NotAuthorized => 0x87,
            C::ClientIdentifierNotValid => 0x85,
            C::ConnectionRateExceeded => 0x9F,
            C::ServerUnavailable => 0x88,
            other => panic!("unexpected CONNACK code {other:?}"),
        }
    }
}

use raw::{Got, Raw};

/// Finding: after logging in as one device, a second CONNECT on the same
/// socket naming another device (with a wrong password) switched the
/// connection's identity, so it received the victim's commands and wrote
/// its state and results. A second CONNECT is a protocol violation: the
/// connection is closed, and nothing sent after it on that socket acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_connect_cannot_take_another_devices_identity() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("dev-a").await;
    env.register("victim").await;
    let cid = env.command("victim", json!({"name": "open-valve"})).await;

    for v5 in [false, true] {
        let addr = if v5 { env.v5() } else { env.v4() };
        let mut d = Raw::open(addr, v5).await;
        let login = if v5 {
            raw::connect_v5("dev-a", &secret)
        } else {
            raw::connect_v4("dev-a", &secret, true)
        };
        d.send(&login).await;
        assert_eq!(d.next().await, Got::ConnAck(false, 0), "dev-a logs in");
        // The second CONNECT, and what an impersonator would do next, in one
        // write: none of it may act.
        let mut attack = if v5 {
            raw::connect_v5("victim", "wrong")
        } else {
            raw::connect_v4("victim", "wrong", true)
        };
        attack.extend_from_slice(&raw::subscribe(v5, "devices/victim/commands"));
        attack.extend_from_slice(&raw::publish(
            v5,
            "devices/victim/shadow/reported",
            br#"{"owned": true}"#,
        ));
        attack.extend_from_slice(&raw::publish(
            v5,
            &format!("devices/victim/commands/{cid}/result"),
            br#"{"status": "succeeded"}"#,
        ));
        d.send(&attack).await;
        loop {
            match d.next().await {
                Got::Closed => break,
                Got::Disconnect(code) => assert_eq!(code, 0x82, "protocol error"),
                other => panic!("v5={v5}: after a second CONNECT the gateway sent {other:?}"),
            }
        }
    }
    let m = env.metrics().await;
    assert_eq!(
        metric(&m, "entente_mqtt_protocol_violations_total"),
        2,
        "{m}"
    );
    assert!(metric(&m, "entente_mqtt_acl_violations_total") >= 2, "{m}");
    // The victim's state is untouched: a read after a write barrier (the
    // command's status read goes through the leader) sees no change.
    env.send(
        reqwest::Method::PATCH,
        "/v1/devices/victim",
        json!({"labels": {"checked": "yes"}}),
    )
    .await;
    assert_eq!(
        env.get(&format!("/v1/commands/{cid}")).await["status"],
        json!("queued")
    );
    let shadow = env.get("/v1/devices/victim/shadow").await;
    assert!(shadow["reported"].get("owned").is_none(), "{shadow}");
    env.gw.stop().await;
}

/// Finding: 25 connect/close cycles of one device id within 30 ms panicked
/// inside the broker and poisoned a lock its listener shared, so every
/// later login on that listener failed while health said 200. Quick
/// reconnects, concurrent logins of one id and connections closed before
/// their CONNACK must leave both listeners serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_reconnects_of_one_device_never_take_a_listener_down() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("flappy").await;
    for v5 in [false, true] {
        let addr = if v5 { env.v5() } else { env.v4() };
        let login = || {
            if v5 {
                raw::connect_v5("flappy", &secret)
            } else {
                raw::connect_v4("flappy", &secret, true)
            }
        };
        // Closed right after the CONNECT, before any answer.
        for _ in 0..25 {
            let mut d = Raw::open(addr, v5).await;
            d.send(&login()).await;
            drop(d);
        }
        // Closed right after the CONNACK.
        for _ in 0..25 {
            let mut d = Raw::open(addr, v5).await;
            d.send(&login()).await;
            assert_eq!(d.next().await, Got::ConnAck(false, 0));
        }
        // Many at once: each takes over from the one before.
        let mut all = Vec::new();
        for _ in 0..20 {
            let login = login();
            all.push(tokio::spawn(async move {
                let mut d = Raw::open(addr, v5).await;
                d.send(&login).await;
                let first = d.next().await;
                (first, d)
            }));
        }
        let mut open = Vec::new();
        for t in all {
            let (first, d) = t.await.expect("task");
            assert_eq!(first, Got::ConnAck(false, 0), "every login answered");
            open.push(d);
        }
        drop(open);
    }
    // Both listeners still serve: a login and a subscription work.
    for (addr, v5) in [(env.v4(), false), (env.v5(), true)] {
        let mut d = Raw::open(addr, v5).await;
        let login = if v5 {
            raw::connect_v5("flappy", &secret)
        } else {
            raw::connect_v4("flappy", &secret, true)
        };
        d.send(&login).await;
        assert_eq!(d.next().await, Got::ConnAck(false, 0), "v5={v5}");
        d.send(&raw::subscribe(v5, "devices/flappy/commands")).await;
        assert_eq!(d.next().await, Got::SubAck, "v5={v5}");
    }
    let m = env.metrics().await;
    assert_eq!(metric(&m, "entente_mqtt_listeners_down"), 0, "{m}");
    let health = env
        .http
        .get(format!("{}/healthz", env.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    env.gw.stop().await;
}

/// Finding: failed logins cost a read barrier, a database read and a long
/// log line each, answered about 900 times a second to one client with no
/// back-off. Past a budget of failures per address (and per device id) a
/// login is refused at once as over the rate — unless it matches a cached
/// secret, so a device that logged in before still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_logins_are_throttled_per_address_and_id() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("known").await;
    let mut ok = Raw::open(env.v4(), false).await;
    ok.send(&raw::connect_v4("known", &secret, true)).await;
    assert_eq!(ok.next().await, Got::ConnAck(false, 0));
    drop(ok);

    let attempts = 100;
    let mut refused_codes = Vec::new();
    for i in 0..attempts {
        let mut d = Raw::open(env.v5(), true).await;
        d.send(&raw::connect_v5(&format!("guess-{i}"), "wrong"))
            .await;
        match d.next().await {
            Got::ConnAck(false, code) => refused_codes.push(code),
            other => panic!("attempt {i}: {other:?}"),
        }
    }
    assert!(
        refused_codes.iter().all(|&c| c == 0x86 || c == 0x9F),
        "{refused_codes:?}"
    );
    let throttled = refused_codes.iter().filter(|&&c| c == 0x9F).count();
    assert!(
        throttled >= 60,
        "{throttled} of {attempts} failed logins were throttled: {refused_codes:?}"
    );
    let m = env.metrics().await;
    assert!(
        metric(&m, "entente_mqtt_logins_throttled_total") >= 60,
        "{m}"
    );
    // The known device still gets in from the same (throttled) address.
    let mut ok = Raw::open(env.v4(), false).await;
    ok.send(&raw::connect_v4("known", &secret, true)).await;
    assert_eq!(ok.next().await, Got::ConnAck(false, 0));
    env.gw.stop().await;
}

/// Deleting a device or rotating its secret ends the session it has (MQTT 5
/// is told why: 0x98 administrative action); a login with the new secret
/// works and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_or_rotating_a_device_ends_its_session() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("rot").await;
    let mut d = Raw::open(env.v5(), true).await;
    d.send(&raw::connect_v5("rot", &secret)).await;
    assert_eq!(d.next().await, Got::ConnAck(false, 0));
    let rotated = env
        .send(reqwest::Method::POST, "/v1/devices/rot/secret", json!({}))
        .await;
    let new_secret = rotated["secret"].as_str().expect("new secret").to_string();
    assert_eq!(d.next().await, Got::Disconnect(0x98));
    assert_eq!(d.next().await, Got::Closed);

    let mut d = Raw::open(env.v5(), true).await;
    d.send(&raw::connect_v5("rot", &new_secret)).await;
    assert_eq!(d.next().await, Got::ConnAck(false, 0));
    let r = env
        .http
        .delete(format!("{}/v1/devices/rot", env.base))
        .bearer_auth(&env.token)
        .send()
        .await
        .expect("delete");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(d.next().await, Got::Disconnect(0x98));
    assert_eq!(d.next().await, Got::Closed);
    env.gw.stop().await;
}

/// A second login of one device takes over (the first is told 0x8E); a
/// persistent session (clean session 0) keeps its subscriptions, so the
/// reconnect is answered "session present" and its queued command comes
/// without a new SUBSCRIBE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_and_persistent_sessions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("p").await;
    let mut first = Raw::open(env.v5(), true).await;
    first.send(&raw::connect_v5("p", &secret)).await;
    assert_eq!(first.next().await, Got::ConnAck(false, 0));
    let mut second = Raw::open(env.v4(), false).await;
    second.send(&raw::connect_v4("p", &secret, false)).await;
    assert_eq!(second.next().await, Got::ConnAck(false, 0));
    assert_eq!(first.next().await, Got::Disconnect(0x8E));
    second
        .send(&raw::subscribe(false, "devices/p/commands"))
        .await;
    assert_eq!(second.next().await, Got::SubAck);
    drop(second);
    env.wait_online("p", false).await;
    let cid = env.command("p", json!({"name": "later"})).await;
    let mut again = Raw::open(env.v4(), false).await;
    again.send(&raw::connect_v4("p", &secret, false)).await;
    assert_eq!(again.next().await, Got::ConnAck(true, 0), "session present");
    match again.next().await {
        Got::Publish(topic, payload) => {
            assert_eq!(topic, "devices/p/commands");
            let msg: CommandMessage = serde_json::from_slice(&payload).expect("command");
            assert_eq!(msg.id, cid);
        }
        other => panic!("{other:?}"),
    }
    env.gw.stop().await;
}

/// Connections past `mqtt_max_connections` are closed as soon as they are
/// accepted (counted), and a slot freed is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_limit_are_closed_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gw = common::single(tmp.path(), |c| {
        c.mqtt_max_connections = 3;
        c.consensus = common::engine_under_test();
    })
    .await
    .gw;
    let addr = gw.mqtt_addr.expect("listener");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Raw::open(addr, false).await);
    }
    let mut over = Raw::open(addr, false).await;
    assert_eq!(over.next().await, Got::Closed, "the fourth is closed");
    drop(held.pop());
    // The freed slot is taken back once its task has ended.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut d = Raw::open(addr, false).await;
        d.send(&raw::connect_v4("nobody", "x", true)).await;
        match d.next().await {
            Got::ConnAck(false, code) => {
                assert_eq!(code, 4, "answered: bad username or password");
                break;
            }
            Got::Closed if Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            other => panic!("{other:?}"),
        }
    }
    gw.stop().await;
}

/// A gateway whose consensus node stops after a fatal error (here: a
/// committed entry it cannot decode) lets its devices go: they are told
/// (MQTT 5: DISCONNECT 0x9C, use another server) and its device listeners
/// close, so devices reconnect to another member; its REST API stays up to
/// say why. Before, it kept its devices connected, and took new ones, while
/// it could commit nothing for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_node_stops_lets_its_devices_go() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("orphan").await;
    let mut d = connect_v5(env.v5(), "orphan", &secret);
    d.expect_connack().await;
    // An entry of a format this version does not read (a version byte).
    env.gw
        .node()
        .propose(vec![0x07, 0, 1, 2])
        .await
        .expect_err("the node cannot apply it");
    let told = tokio::time::timeout(WAIT, d.next()).await.expect("told");
    assert!(matches!(told, Seen::Disconnect(0x9C)), "{told:?}");
    for addr in [env.v4(), env.v5()] {
        // The listener closes right after the sessions end.
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "{addr} still takes devices");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let ready = env
        .http
        .get(format!("{}/readyz", env.base))
        .send()
        .await
        .expect("REST still answers");
    assert_eq!(ready.status(), 503);
    env.gw.stop().await;
}
