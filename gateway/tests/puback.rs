//! A device's acknowledgement means committed: nothing acknowledged is lost.
//!
//! - In one process, a group of two gateways with one stopped (no quorum):
//!   a device's messages get no PUBACK (nor PUBREC for QoS 2); the
//!   connection reads no more than its window of 100 unacknowledged
//!   messages, so a device flooding it is held back by its socket; when the
//!   quorum returns every message is acknowledged and in the state. A
//!   message that cannot be committed in time closes the connection
//!   unacknowledged (MQTT 5: 0x89); sent again after the reconnect, it is
//!   acknowledged. Messages that change nothing are acknowledged at once,
//!   MQTT 5 with a reason code.
//! - With real processes: devices publish results and reported state to the
//!   leader of three gateways, which is killed with `kill -9` mid-stream and
//!   restarted; every message a device got a PUBACK for is in the
//!   replicated state. The gateways run with `--report-coalesce-ms 500`, so
//!   a gateway that acknowledged on arrival (as before) had up to half a
//!   second of acknowledged patches not yet proposed at any moment: the test
//!   fails for it every time.

mod common;

#[path = "support/ports.rs"]
mod ports;
#[path = "support/process.rs"]
mod process;
#[path = "support/raw_device.rs"]
mod raw_device;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use common::{WAIT, metric};
use entente_protocol::{
    CommandMessage, accepted_topic, commands_topic, reported_topic, result_topic,
};
use gateway::{Config, Gateway};
use ports::reserve_ports;
use process::Proc;
use raw_device::{Got, RawDevice};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep};

// ---------------------------------------------------------------------------
// In one process: gateways started and stopped with `gateway::start`.

/// A group of gateways in this process; a stopped one keeps its settings
/// so it can start again on its data.
struct Group {
    configs: BTreeMap<u64, Config>,
    gws: BTreeMap<u64, Gateway>,
    token: String,
    http: reqwest::Client,
}

fn config(dir: &Path, id: u64, peers: &BTreeMap<u64, SocketAddr>) -> Config {
    let mut c = Config::single(
        dir.join(format!("g{id}")),
        "127.0.0.1:0".parse().expect("addr"),
        peers[&id],
    );
    c.node_id = id;
    c.peers = peers.iter().map(|(id, a)| (*id, (*a).into())).collect();
    c.cluster_secret = Some("puback-test-secret".into());
    c.tick = Duration::from_millis(5);
    c.mqtt_max_payload = 4096;
    c
}

impl Group {
    async fn start(dir: &Path, n: u64, write_timeout: Duration) -> Group {
        let raft = reserve_ports(n as usize);
        let peers: BTreeMap<u64, SocketAddr> = (1..=n).zip(raft).collect();
        let configs: BTreeMap<u64, Config> = peers
            .keys()
            .map(|&id| {
                let mut c = config(dir, id, &peers);
                c.write_timeout = write_timeout;
                (id, c)
            })
            .collect();
        let handles: Vec<_> = configs
            .values()
            .cloned()
            .map(|c| tokio::spawn(gateway::start(c)))
            .collect();
        let mut gws = BTreeMap::new();
        for (id, h) in configs.keys().zip(handles) {
            gws.insert(*id, h.await.expect("join").expect("start"));
        }
        let (file, applied) = gws
            .values()
            .find_map(|g: &Gateway| {
                g.admin_token_file
                    .clone()
                    .map(|f| (f, g.db().applied_index()))
            })
            .expect("the first leader wrote the admin token");
        let token = std::fs::read_to_string(file)
            .expect("token")
            .trim()
            .to_string();
        let deadline = Instant::now() + WAIT;
        while gws.values().any(|g| g.db().applied_index() < applied) {
            assert!(Instant::now() < deadline, "the admin token not applied");
            sleep(Duration::from_millis(5)).await;
        }
        Group {
            configs,
            gws,
            token,
            http: reqwest::Client::new(),
        }
    }

    fn base(&self, id: u64) -> String {
        format!("http://{}", self.gws[&id].http_addr)
    }

    fn mqtt(&self, id: u64, v5: bool) -> SocketAddr {
        let g = &self.gws[&id];
        if v5 { g.mqtt5_addr } else { g.mqtt_addr }.expect("device listener")
    }

    async fn register(&self, id: u64, device: &str) -> String {
        let r = self
            .http
            .post(format!("{}/v1/devices", self.base(id)))
            .bearer_auth(&self.token)
            .json(&json!({ "id": device }))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.expect("json");
        v["secret"].as_str().expect("secret").to_string()
    }

    async fn get(&self, id: u64, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base(id)))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("get");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("json")
    }

    async fn metrics(&self, id: u64) -> String {
        self.http
            .get(format!("{}/metrics", self.base(id)))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    async fn stop(&mut self, id: u64) {
        if let Some(g) = self.gws.remove(&id) {
            g.stop().await;
        }
    }

    async fn restart(&mut self, id: u64) {
        let g = gateway::start(self.configs[&id].clone())
            .await
            .expect("restart");
        self.gws.insert(id, g);
    }

    /// Waits until a write through gateway `id` commits (the group has a
    /// quorum and a leader again).
    async fn until_writable(&self, id: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self
                .http
                .post(format!("{}/v1/devices", self.base(id)))
                .bearer_auth(&self.token)
                .json(&json!({ "id": "quorum-probe" }))
                .send()
                .await
                .expect("register");
            // 409: an earlier attempt whose outcome was unknown committed.
            if r.status() == 201 || r.status() == 409 {
                return;
            }
            assert!(Instant::now() < deadline, "no quorum: {}", r.status());
            sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop_all(mut self) {
        for id in self.gws.keys().copied().collect::<Vec<_>>() {
            self.stop(id).await;
        }
    }
}

/// Every packet the gateway sends until `deadline`, or until `done` says
/// enough arrived.
async fn collect(
    d: &mut RawDevice,
    deadline: Instant,
    mut done: impl FnMut(&[Got]) -> bool,
) -> Vec<Got> {
    let mut got = Vec::new();
    while !done(&got) {
        match d.rd.next_by(deadline).await {
            Some(p) => got.push(p),
            None => break,
        }
    }
    got
}

/// Polls `/metrics` of gateway `id` until `check` holds (bounded by WAIT).
async fn until_metrics(g: &Group, id: u64, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = g.metrics(id).await;
        if check(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}; metrics:\n{m}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_quorum_nothing_is_acknowledged_and_a_full_window_stops_reading() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut g = Group::start(tmp.path(), 2, Duration::from_secs(5)).await;
    let secret = g.register(1, "w").await;
    let flood_secret = g.register(1, "f").await;
    let mut w = RawDevice::connect(g.mqtt(1, false), false, "w", &secret).await;
    let flood = RawDevice::connect(g.mqtt(1, true), true, "f", &flood_secret).await;
    // Committed at once while the group has its quorum.
    w.publish(&reported_topic("w"), br#"{"before": true}"#, 1, 1)
        .await;
    assert_eq!(w.rd.next(WAIT).await, Got::PubAck(1, 0));

    g.stop(2).await;
    // 300 QoS 1 patches and a QoS 2 one in one write.
    let mut burst = BytesMut::new();
    for n in 1..=300u16 {
        let patch = format!("{{\"n{n}\": {n}}}");
        w.codec
            .publish(&reported_topic("w"), patch.as_bytes(), 1, n, &mut burst);
    }
    w.codec.publish(
        &reported_topic("w"),
        br#"{"exactly": "once"}"#,
        2,
        301,
        &mut burst,
    );
    w.send(&burst).await;
    // A device that writes 23 MB of QoS 1 patches without waiting: the
    // gateway reads 100 of them (and what came with those in one read),
    // then nothing more, so the writes stop once the socket buffers are full.
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (mut flood_rd, mut flood_wr, codec) = (flood.rd, flood.wr, flood.codec);
    let total = 12_000usize;
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            let filler = "x".repeat(1900);
            for i in 0..total {
                let mut b = BytesMut::new();
                let patch = format!("{{\"fill\": \"{filler}\", \"i\": {i}}}");
                let pkid = u16::try_from(i % 60_000 + 1).expect("pkid");
                codec.publish(&reported_topic("f"), patch.as_bytes(), 1, pkid, &mut b);
                if flood_wr.write_all(&b).await.is_err() {
                    break;
                }
                written.fetch_add(b.len(), std::sync::atomic::Ordering::Relaxed);
            }
            // Open until every answer is read.
            flood_wr
        })
    };

    // No acknowledgement without the quorum.
    let got = collect(&mut w, Instant::now() + Duration::from_secs(1), |g| {
        !g.is_empty()
    })
    .await;
    assert!(got.is_empty(), "answered without a quorum: {got:?}");
    // Each connection holds its window of 100, and reads nothing more.
    let m = until_metrics(&g, 1, "two windows of 100 messages not committed", |m| {
        metric(m, "entente_mqtt_messages_uncommitted") == 200
    })
    .await;
    assert!(metric(&m, "entente_mqtt_reads_paused_total") >= 2, "{m}");
    // The flooding writer stalls: the socket is not read.
    let mut last = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        sleep(Duration::from_millis(300)).await;
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
        assert!(Instant::now() < deadline, "the writer never stalled");
    }
    let flood_bytes = total * 1950;
    eprintln!("the flooding device stalled after {last} of {flood_bytes} bytes");
    assert!(
        last < flood_bytes / 2,
        "{last} of {flood_bytes} bytes written: the gateway kept reading"
    );
    assert_eq!(
        metric(&g.metrics(1).await, "entente_mqtt_messages_uncommitted"),
        200,
        "still two windows"
    );

    // The quorum returns: everything is acknowledged, once, and committed.
    g.restart(2).await;
    let got = collect(&mut w, Instant::now() + WAIT, |g| g.len() >= 301).await;
    let mut acked: Vec<u16> = got
        .iter()
        .filter_map(|p| match p {
            Got::PubAck(id, 0) => Some(*id),
            _ => None,
        })
        .collect();
    acked.sort_unstable();
    assert_eq!(acked, (1..=300).collect::<Vec<_>>(), "{got:?}");
    assert!(got.contains(&Got::PubRec(301, 0)), "{got:?}");
    w.send(&w.codec.pubrel(301)).await;
    assert_eq!(w.rd.next(WAIT).await, Got::PubComp(301));
    let reported = g.get(1, "/v1/devices/w/shadow").await["reported"].clone();
    for n in 1..=300 {
        assert_eq!(reported[format!("n{n}")], json!(n), "{reported}");
    }
    assert_eq!(reported["exactly"], json!("once"));
    // The flood goes through too, every message acknowledged.
    let mut flood_acks = 0;
    while flood_acks < total {
        match flood_rd.next(WAIT).await {
            Got::PubAck(_, 0) => flood_acks += 1,
            other => panic!("flood: {other:?} after {flood_acks} acknowledgements"),
        }
    }
    drop(writer.await.expect("writer"));
    let f = g.get(1, "/v1/devices/f/shadow").await;
    assert_eq!(f["reported"]["i"], json!(total - 1));
    let m = until_metrics(&g, 1, "nothing left uncommitted", |m| {
        metric(m, "entente_mqtt_messages_uncommitted") == 0
    })
    .await;
    assert_eq!(metric(&m, "entente_mqtt_not_committed_total"), 0, "{m}");
    g.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_not_committed_in_time_is_not_acknowledged_and_is_sent_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Write timeout 400 ms: a device message is tried for 800 ms.
    let mut g = Group::start(tmp.path(), 2, Duration::from_millis(400)).await;
    let secret = g.register(1, "r").await;
    let cid = {
        let r = g
            .http
            .post(format!("{}/v1/devices/r/commands", g.base(1)))
            .bearer_auth(&g.token)
            .json(&json!({"name": "reboot"}))
            .send()
            .await
            .expect("command");
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.expect("json")["id"]
            .as_str()
            .expect("id")
            .to_string()
    };
    let mut d = RawDevice::connect(g.mqtt(1, true), true, "r", &secret).await;
    g.stop(2).await;
    let patch = br#"{"fw": "2.0"}"#;
    let result = br#"{"status": "succeeded", "output": {"up": true}}"#;
    d.publish(&reported_topic("r"), patch, 1, 7).await;
    d.publish(&result_topic("r", &cid), result, 1, 8).await;
    let got = collect(&mut d, Instant::now() + WAIT, |g| {
        g.iter()
            .any(|p| matches!(p, Got::Disconnect(_) | Got::Closed))
    })
    .await;
    assert!(
        got.first() == Some(&Got::Disconnect(0x89)),
        "expected DISCONNECT 0x89 (server busy) and no acknowledgement: {got:?}"
    );
    let m = g.metrics(1).await;
    assert!(metric(&m, "entente_mqtt_not_committed_total") >= 1, "{m}");

    // Back with a quorum, the device sends both again and they commit.
    // (Once the group commits again: electing a leader after the restart
    // may take longer than the 800 ms a message is tried for on a busy
    // machine.)
    g.restart(2).await;
    g.until_writable(1).await;
    let mut d = RawDevice::connect(g.mqtt(1, true), true, "r", &secret).await;
    d.publish(&reported_topic("r"), patch, 1, 7).await;
    d.publish(&result_topic("r", &cid), result, 1, 8).await;
    let mut got = vec![d.rd.next(WAIT).await, d.rd.next(WAIT).await];
    got.sort_by_key(|p| format!("{p:?}"));
    assert_eq!(got, vec![Got::PubAck(7, 0), Got::PubAck(8, 0)]);
    assert_eq!(
        g.get(1, "/v1/devices/r/shadow").await["reported"]["fw"],
        json!("2.0")
    );
    let c = g.get(1, &format!("/v1/commands/{cid}")).await;
    assert_eq!(c["status"], json!("succeeded"), "{c}");
    g.stop_all().await;
}

/// A session taken over while its patch is being proposed without a
/// quorum: the old proposal is abandoned (nobody waits for it), and that
/// does not cost the new session its own patches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_while_a_patch_waits_for_the_quorum_keeps_the_new_session() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut g = Group::start(tmp.path(), 2, Duration::from_secs(5)).await;
    // The device is on the follower and the leader stops: proposals fail
    // at once (no leader) and are tried again.
    let leader = g.gws[&1].node().status().raft.leader.expect("a leader");
    let (on, off) = if leader == 1 { (2, 1) } else { (1, 2) };
    let secret = g.register(on, "o").await;
    let mut old = RawDevice::connect(g.mqtt(on, true), true, "o", &secret).await;
    g.stop(off).await;
    old.publish(&reported_topic("o"), br#"{"a": 1}"#, 1, 1)
        .await;
    until_metrics(&g, on, "the patch being proposed", |m| {
        metric(m, "entente_mqtt_messages_uncommitted") == 1
    })
    .await;
    let mut new = RawDevice::connect(g.mqtt(on, true), true, "o", &secret).await;
    assert_eq!(old.rd.next(WAIT).await, Got::Disconnect(0x8E), "taken over");
    new.publish(&reported_topic("o"), br#"{"a": 1, "b": 2}"#, 1, 1)
        .await;
    // The old proposal is abandoned after its attempt (nobody waits for
    // it); the new session's patch waits for the quorum, and is not
    // dropped with it (it was: the new session was closed with 0x89).
    let got = collect(&mut new, Instant::now() + Duration::from_secs(2), |g| {
        !g.is_empty()
    })
    .await;
    assert!(got.is_empty(), "the new session was answered: {got:?}");
    g.restart(off).await;
    assert_eq!(new.rd.next(WAIT).await, Got::PubAck(1, 0));
    let reported = g.get(on, "/v1/devices/o/shadow").await["reported"].clone();
    assert_eq!(reported, json!({"a": 1, "b": 2}));
    g.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_that_change_nothing_are_acknowledged_with_a_reason() {
    let tmp = tempfile::tempdir().expect("tmp");
    let g = Group::start(tmp.path(), 1, Duration::from_secs(5)).await;
    let secret = g.register(1, "a").await;
    let other = g.register(1, "b").await;
    let _ = other;
    let foreign = {
        let r = g
            .http
            .post(format!("{}/v1/devices/b/commands", g.base(1)))
            .bearer_auth(&g.token)
            .json(&json!({"name": "theirs"}))
            .send()
            .await
            .expect("command");
        r.json::<Value>().await.expect("json")["id"]
            .as_str()
            .expect("id")
            .to_string()
    };
    for v5 in [true, false] {
        let mut d = RawDevice::connect(g.mqtt(1, v5), v5, "a", &secret).await;
        let big = format!("{{\"k\": \"{}\"}}", "x".repeat(5000));
        let cases: [(String, Vec<u8>, u8); 6] = [
            (accepted_topic("a", "no-such-command"), b"{}".to_vec(), 0x83),
            (
                result_topic("a", &foreign),
                br#"{"status":"failed"}"#.to_vec(),
                0x83,
            ),
            (reported_topic("a"), b"{not json".to_vec(), 0x99),
            (reported_topic("a"), b"[1, 2]".to_vec(), 0x99),
            (reported_topic("a"), big.into_bytes(), 0x97),
            (reported_topic("a"), br#"{"ok": 1}"#.to_vec(), 0x00),
        ];
        for (i, (topic, payload, code)) in cases.iter().enumerate() {
            let pkid = u16::try_from(i + 1).expect("pkid");
            d.publish(topic, payload, 1, pkid).await;
            let want = if v5 { *code } else { 0 };
            assert_eq!(
                d.rd.next(WAIT).await,
                Got::PubAck(pkid, want),
                "v5 {v5}: {topic}"
            );
        }
    }
    let c = g.get(1, &format!("/v1/commands/{foreign}")).await;
    assert_eq!(c["status"], json!("queued"), "{c}");
    g.stop_all().await;
}

/// A device that keeps ten reported patches in flight gets ten per
/// proposal: the next proposal waits until the device has sent again as
/// many as it had out (here up to three seconds: the wait only shows in the
/// last, short proposal; with one second, a loaded machine that held the
/// device back for that long split a proposal and failed the count).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_keeping_ten_in_flight_gets_ten_per_proposal() {
    let tmp = tempfile::tempdir().expect("tmp");
    let raft = reserve_ports(1);
    let peers = BTreeMap::from([(1, raft[0])]);
    let mut c = config(tmp.path(), 1, &peers);
    c.report_coalesce = Duration::from_secs(3);
    let gw = gateway::start(c).await.expect("start");
    let token = std::fs::read_to_string(gw.admin_token_file.clone().expect("token file"))
        .expect("token")
        .trim()
        .to_string();
    let g = Group {
        configs: BTreeMap::new(),
        gws: BTreeMap::from([(1, gw)]),
        token,
        http: reqwest::Client::new(),
    };
    let secret = g.register(1, "t").await;
    let mut d = RawDevice::connect(g.mqtt(1, false), false, "t", &secret).await;
    let topic = reported_topic("t");
    let mut sent = 0u16;
    let mut out = BytesMut::new();
    while sent < 10 {
        sent += 1;
        let patch = format!("{{\"n\": {sent}}}");
        d.codec.publish(&topic, patch.as_bytes(), 1, sent, &mut out);
    }
    d.send(&out).await;
    let mut acked = 0;
    while acked < 100 {
        match d.rd.next(WAIT).await {
            Got::PubAck(_, 0) => acked += 1,
            other => panic!("{other:?} after {acked} acknowledgements"),
        }
        if sent < 100 {
            sent += 1;
            let patch = format!("{{\"n\": {sent}}}");
            d.publish(&topic, patch.as_bytes(), 1, sent).await;
        }
    }
    let m = g.metrics(1).await;
    assert_eq!(
        metric(&m, "entente_mqtt_reports_received_total"),
        100,
        "{m}"
    );
    // The first alone, then ten at a time, the last nine together.
    let proposals = metric(&m, "entente_mqtt_report_proposals_total");
    assert_eq!(proposals, 11, "{m}");
    let reported = g.get(1, "/v1/devices/t/shadow").await["reported"].clone();
    assert_eq!(reported["n"], json!(100));
    g.stop_all().await;
}

// ---------------------------------------------------------------------------
// Real processes, `kill -9`.

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// One gateway process of the group and its addresses.
struct Member {
    dir: PathBuf,
    http: SocketAddr,
    raft: SocketAddr,
    mqtt: SocketAddr,
    mqtt5: SocketAddr,
    proc: Option<Proc>,
}

impl Member {
    fn base(&self) -> String {
        format!("http://{}", self.http)
    }
}

fn spawn_member(m: &Member, id: u64, peers: &str) -> Proc {
    let mut c = Command::new(BIN);
    c.args(["--node-id", &id.to_string(), "--peers", peers])
        .arg("--data-dir")
        .arg(&m.dir)
        .args(["--http-listen", &m.http.to_string()])
        .args(["--raft-listen", &m.raft.to_string()])
        .args(["--mqtt-listen", &m.mqtt.to_string()])
        .args(["--mqtt5-listen", &m.mqtt5.to_string()])
        .args(["--cluster-secret", "puback-kill-test-secret"])
        .args(["--tick-ms", "10", "--write-timeout-ms", "2000"])
        // Wide: a gateway that acknowledged patches on arrival would hold up
        // to this long of them unproposed.
        .args(["--report-coalesce-ms", "500"])
        .args(["--session-grace-ms", "60000", "--snapshot-every", "100000"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    Proc::start(c)
}

/// What the test devices were told was delivered.
#[derive(Default)]
struct Acked {
    /// Device → the sequence numbers of its reported patches with a PUBACK.
    reports: BTreeMap<String, BTreeSet<u64>>,
    /// Command ids whose `result` got a PUBACK.
    results: BTreeSet<String>,
}

impl Acked {
    fn counts(&self) -> (usize, usize) {
        (
            self.reports.values().map(BTreeSet::len).sum(),
            self.results.len(),
        )
    }
}

/// What a test device sent under one packet id.
enum Sent {
    Report(u64),
    Result(String),
}

/// A device on a raw MQTT 3.1.1 connection: answers each command it gets
/// with a `succeeded` result, and publishes reported patches
/// `{"s<seq>": seq}` (at most one per 10 ms), keeping up to 10 messages
/// unacknowledged, until the connection ends or `stop` is set (then it
/// waits for what it has out). Records what was acknowledged; returns the
/// next sequence number.
async fn stream_device(
    addr: SocketAddr,
    id: String,
    secret: String,
    mut seq: u64,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let Ok(mut d) = RawDevice::try_connect(addr, false, &id, &secret).await else {
        return seq;
    };
    let codec = d.codec;
    d.send(&codec.subscribe(&commands_topic(&id), 1)).await;
    let mut inflight: HashMap<u16, Sent> = HashMap::new();
    let mut answer: VecDeque<String> = VecDeque::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut pkid: u16 = 1;
    let mut next_report = Instant::now();
    let result = br#"{"status": "succeeded", "output": {"done": true}}"#;
    let drain_by = Instant::now() + Duration::from_secs(3600);
    let mut drain_by = drain_by;
    loop {
        let stopping = stop.load(std::sync::atomic::Ordering::Relaxed);
        if stopping {
            if inflight.is_empty() {
                break;
            }
            drain_by = drain_by.min(Instant::now() + WAIT);
            if Instant::now() > drain_by {
                break;
            }
        } else {
            let mut out = BytesMut::new();
            while inflight.len() < 10 {
                pkid = pkid % 60_000 + 1;
                if let Some(cid) = answer.pop_front() {
                    codec.publish(&result_topic(&id, &cid), result, 1, pkid, &mut out);
                    inflight.insert(pkid, Sent::Result(cid));
                } else if Instant::now() >= next_report {
                    seq += 1;
                    let patch = format!("{{\"s{seq}\": {seq}}}");
                    codec.publish(&reported_topic(&id), patch.as_bytes(), 1, pkid, &mut out);
                    inflight.insert(pkid, Sent::Report(seq));
                    next_report = Instant::now() + Duration::from_millis(10);
                } else {
                    break;
                }
            }
            if !out.is_empty() && d.wr.write_all(&out).await.is_err() {
                break;
            }
        }
        let wake = if stopping {
            Instant::now() + Duration::from_millis(100)
        } else {
            next_report.max(Instant::now() + Duration::from_millis(1))
        };
        match d.rd.next_by(wake).await {
            None | Some(Got::SubAck(_) | Got::PingResp) => {}
            Some(Got::PubAck(p, _)) => match inflight.remove(&p) {
                Some(Sent::Report(s)) => {
                    let mut a = acked.lock().expect("acked");
                    a.reports.entry(id.clone()).or_default().insert(s);
                }
                Some(Sent::Result(cid)) => {
                    acked.lock().expect("acked").results.insert(cid);
                }
                None => panic!("{id}: a PUBACK for {p}, which is not out"),
            },
            Some(Got::Publish(_, payload, qos, p)) => {
                if qos > 0 {
                    d.send(&codec.puback(p)).await;
                }
                if let Ok(cmd) = serde_json::from_slice::<CommandMessage>(&payload)
                    && seen.insert(cmd.id.clone())
                {
                    answer.push_back(cmd.id);
                }
            }
            Some(Got::Closed | Got::Disconnect(_)) => break,
            Some(other) => panic!("{id}: unexpected {other:?}"),
        }
    }
    seq
}

/// The gateway that says it leads (bounded wait).
async fn leader_of(
    http: &reqwest::Client,
    token: &str,
    members: &[Member],
    skip: Option<usize>,
) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        for (i, m) in members.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let r = http
                .get(format!("{}/v1/cluster", m.base()))
                .bearer_auth(token)
                .send()
                .await;
            if let Ok(r) = r
                && let Ok(v) = r.json::<Value>().await
                && v["role"] == "leader"
            {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_stream_loses_nothing_it_acknowledged() {
    let tmp = tempfile::tempdir().expect("tmp");
    let addrs = reserve_ports(12);
    let mut members: Vec<Member> = (0..3)
        .map(|i| Member {
            dir: tmp.path().join(format!("g{}", i + 1)),
            http: addrs[i * 4],
            raft: addrs[i * 4 + 1],
            mqtt: addrs[i * 4 + 2],
            mqtt5: addrs[i * 4 + 3],
            proc: None,
        })
        .collect();
    let peers: String = members
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{}={}", i + 1, m.raft))
        .collect::<Vec<_>>()
        .join(",");
    for (i, m) in members.iter_mut().enumerate() {
        m.proc = Some(spawn_member(m, i as u64 + 1, &peers));
    }
    for m in &members {
        let p = m.proc.as_ref().expect("running");
        p.wait_line(&["REST on"], Duration::from_secs(60)).await;
    }
    let token = {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(t) = members
                .iter()
                .find_map(|m| std::fs::read_to_string(m.dir.join("admin-token")).ok())
            {
                break t.trim().to_string();
            }
            assert!(Instant::now() < deadline, "no admin token");
            sleep(Duration::from_millis(20)).await;
        }
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http");
    // The devices are held by the leader, which is killed; commands are
    // issued through a follower, which survives.
    let leader = leader_of(&http, &token, &members, None).await;
    let follower = (leader + 1) % 3;
    let mut devices = Vec::new();
    for i in 0..16 {
        let id = format!("k{i}");
        let r = http
            .post(format!("{}/v1/devices", members[leader].base()))
            .bearer_auth(&token)
            .json(&json!({ "id": id }))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.expect("json");
        devices.push((id, v["secret"].as_str().expect("secret").to_string()));
    }

    // Stream: devices publish, commands are issued (~100/s) for them to
    // answer.
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streams: Vec<_> = devices
        .iter()
        .map(|(id, secret)| {
            tokio::spawn(stream_device(
                members[leader].mqtt,
                id.clone(),
                secret.clone(),
                0,
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let issuing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let issuer = {
        let (http, base, token, issuing) = (
            http.clone(),
            members[follower].base(),
            token.clone(),
            issuing.clone(),
        );
        let ids: Vec<String> = devices.iter().map(|(id, _)| id.clone()).collect();
        tokio::spawn(async move {
            let mut k = 0usize;
            while issuing.load(std::sync::atomic::Ordering::Relaxed) {
                let dev = &ids[k % ids.len()];
                let _ = http
                    .post(format!("{base}/v1/devices/{dev}/commands"))
                    .bearer_auth(&token)
                    .json(&json!({"name": "work", "params": {"k": k}, "ttl_ms": 600_000}))
                    .send()
                    .await;
                k += 1;
                sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Mid-stream: once a good number of both kinds were acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (reports, results) = acked.lock().expect("acked").counts();
        if reports >= 300 && results >= 60 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "too little acknowledged: {reports} reports, {results} results"
        );
        sleep(Duration::from_millis(20)).await;
    }
    let mut killed = members[leader].proc.take().expect("running");
    killed.signal("KILL");
    assert!(
        killed.exits_within(Duration::from_secs(10)).await.is_some(),
        "the leader did not die"
    );
    let log = killed.output();
    drop(killed);
    issuing.store(false, std::sync::atomic::Ordering::Relaxed);
    issuer.await.expect("issuer");
    let mut next_seq = Vec::new();
    for s in streams {
        next_seq.push(
            tokio::time::timeout(WAIT, s)
                .await
                .expect("a device did not notice the kill")
                .expect("device"),
        );
    }
    let before = acked.lock().expect("acked").counts();

    // Restart it; the devices reconnect there and go on for a while.
    let m = &members[leader];
    let again = spawn_member(m, leader as u64 + 1, &peers);
    again.wait_line(&["REST on"], Duration::from_secs(60)).await;
    members[leader].proc = Some(again);
    let streams: Vec<_> = devices
        .iter()
        .zip(&next_seq)
        .map(|((id, secret), seq)| {
            tokio::spawn(stream_device(
                members[leader].mqtt,
                id.clone(),
                secret.clone(),
                *seq,
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (reports, _) = acked.lock().expect("acked").counts();
        if reports >= before.0 + 16 * 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the devices got little acknowledged after the restart"
        );
        sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in streams {
        tokio::time::timeout(WAIT + Duration::from_secs(5), s)
            .await
            .expect("a device did not stop")
            .expect("device");
    }

    // Every acknowledged message is in the replicated state (linearizable
    // reads through a gateway that was never killed).
    let acked = std::mem::take(&mut *acked.lock().expect("acked"));
    let base = members[follower].base();
    let mut missing = Vec::new();
    for (id, seqs) in &acked.reports {
        let v: Value = http
            .get(format!("{base}/v1/devices/{id}/shadow"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("shadow")
            .json()
            .await
            .expect("json");
        let lost: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| v["reported"][format!("s{s}")] != json!(s))
            .collect();
        if !lost.is_empty() {
            missing.push(format!(
                "{id}: {} of {} acknowledged patches missing, e.g. {:?}",
                lost.len(),
                seqs.len(),
                &lost[..lost.len().min(5)]
            ));
        }
    }
    for cid in &acked.results {
        let v: Value = http
            .get(format!("{base}/v1/commands/{cid}"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("command")
            .json()
            .await
            .expect("json");
        if v["status"] != "succeeded" {
            missing.push(format!(
                "result of {cid} acknowledged, command is {}",
                v["status"]
            ));
        }
    }
    let (reports, results) = acked.counts();
    eprintln!(
        "acknowledged: {} reported patches and {} results before the kill, \
         {reports} and {results} in all; lost: {}",
        before.0,
        before.1,
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged messages lost ({reports} reports and {results} results acknowledged, \
         {} / {} before the kill):\n{}\n--- the killed gateway's log (tail):\n{}",
        before.0,
        before.1,
        missing.join("\n"),
        log.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
    );
}
