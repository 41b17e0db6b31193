//! The library against real gateways (in this process, on real sockets,
//! port 0 or reserved loopback ports, data in temp dirs — as device-sim's
//! tests run them): commands reach the application exactly once across
//! forced reconnects, a takeover, a gateway restart and the kill of the
//! gateway a device is on in a three-gateway group; the shadow converges
//! both ways with reports coalesced; refusals come as typed errors.
//! Every wait is on a condition with a deadline.
//! The same failover against real `gateway` processes (SIGKILL) is in the
//! gateway crate, which builds the binary: `gateway/tests/device_failover.rs`.

#[path = "../../gateway/tests/support/group.rs"]
mod group;
#[path = "../../gateway/tests/support/ports.rs"]
mod ports;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use entente_device::{
    BrokerAddr, Config, Counters, Device, Error, Event, MessageKind, Protocol, Refusal,
};
use gateway::Gateway;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

fn broker(a: SocketAddr) -> BrokerAddr {
    BrokerAddr {
        host: a.ip().to_string(),
        port: a.port(),
    }
}

/// REST calls of the tests.
#[derive(Clone)]
struct Rest {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Rest {
    fn new(addr: SocketAddr, token: &str) -> Rest {
        Rest {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(40))
                .build()
                .expect("http"),
            base: format!("http://{addr}"),
            token: token.to_string(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = res.status();
        let text = res.text().await.expect("body");
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn register(&self, id: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/devices",
                Some(json!({ "id": id })),
            )
            .await;
        v["secret"].as_str().expect("secret").to_string()
    }

    async fn issue(&self, device: &str, name: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/devices/{device}/commands?wait=0"),
                Some(json!({ "name": name, "params": { "to": name } })),
            )
            .await;
        v["id"].as_str().expect("command id").to_string()
    }

    /// The command's status once it is final (long-poll), or as it is at
    /// the deadline.
    async fn final_status(&self, cid: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/commands/{cid}?wait=5000"),
                    None,
                )
                .await;
            let s = v["status"].as_str().unwrap_or("?").to_string();
            if matches!(s.as_str(), "succeeded" | "failed" | "expired" | "canceled")
                || Instant::now() >= deadline
            {
                return s;
            }
        }
    }

    async fn shadow(&self, device: &str) -> Value {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/devices/{device}/shadow"),
            None,
        )
        .await
    }
}

/// What the application saw.
#[derive(Debug, Default)]
struct Tally {
    commands: HashMap<String, u32>,
    duplicates: u32,
    connected: Vec<BrokerAddr>,
    subscribed: u32,
    errors: Vec<Error>,
    deltas: u32,
}

enum Ctl {
    Hold(bool),
    Reconnect,
    Disconnect,
    Connect,
    Report(Vec<Value>),
}

/// An application over a [`Device`], in its own task: it answers commands
/// (`accepted`, then `succeeded` with `{"done": name}`) unless told to hold
/// them, applies deltas by reporting them, and counts what it sees.
struct App {
    ctl: mpsc::Sender<Ctl>,
    tally: Arc<Mutex<Tally>>,
    changed: Arc<Notify>,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    fn start(mut config: Config) -> App {
        let counters = Arc::new(Counters::default());
        config.counters = Some(counters.clone());
        let mut device = Device::new(config).expect("config");
        let (ctl, mut rx) = mpsc::channel::<Ctl>(16);
        let tally = Arc::new(Mutex::new(Tally::default()));
        let changed = Arc::new(Notify::new());
        let (t, n) = (tally.clone(), changed.clone());
        let task = tokio::spawn(async move {
            let mut hold = false;
            let mut held: Vec<(String, String)> = Vec::new();
            loop {
                tokio::select! {
                    e = device.next_event() => {
                        let mut t = t.lock().expect("tally");
                        match e {
                            Event::Command(c) => {
                                *t.commands.entry(c.id.clone()).or_default() += 1;
                                if hold {
                                    held.push((c.id, c.name));
                                } else {
                                    device.accept(&c.id).expect("accept");
                                    device.succeed(&c.id, json!({"done": c.name})).expect("succeed");
                                }
                            }
                            Event::Duplicate(_) => t.duplicates += 1,
                            Event::Connected(c) => t.connected.push(c.gateway),
                            Event::Subscribed => t.subscribed += 1,
                            Event::Disconnected(d) => t.errors.push(d.error),
                            Event::Refused(e) => t.errors.push(e),
                            Event::Delta(d) => {
                                t.deltas += 1;
                                device.report(Value::Object(d.state)).expect("report");
                            }
                            Event::Delivered { .. } | Event::Ignored(_) => {}
                        }
                        drop(t);
                        n.notify_waiters();
                    }
                    c = rx.recv() => match c {
                        None => break,
                        Some(Ctl::Hold(h)) => {
                            hold = h;
                            if !h {
                                for (id, name) in held.drain(..) {
                                    device.accept(&id).expect("accept");
                                    device.succeed(&id, json!({"done": name})).expect("succeed");
                                }
                            }
                        }
                        Some(Ctl::Reconnect) => device.reconnect(),
                        Some(Ctl::Disconnect) => device.disconnect(),
                        Some(Ctl::Connect) => device.connect(),
                        Some(Ctl::Report(patches)) => {
                            for p in patches {
                                device.report(p).expect("report");
                            }
                        }
                    }
                }
            }
        });
        App {
            ctl,
            tally,
            changed,
            counters,
            task,
        }
    }

    async fn send(&self, c: Ctl) {
        self.ctl.send(c).await.expect("app running");
    }

    /// Waits until `f` holds of the tally (at most [`WAIT`]).
    async fn until(&self, what: &str, f: impl Fn(&Tally) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let t = self.tally.lock().expect("tally");
                if f(&t) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: not within {WAIT:?}: {t:?}"
                );
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    fn seen(&self) -> HashMap<String, u32> {
        self.tally.lock().expect("tally").commands.clone()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn gateway_config(
    dir: &Path,
    http: SocketAddr,
    peer: SocketAddr,
    mqtt: SocketAddr,
) -> gateway::Config {
    let mut c = gateway::Config::single(dir.to_path_buf(), http, peer);
    c.tick = Duration::from_millis(5);
    c.report_coalesce = Duration::from_millis(20);
    c.mqtt_listen = Some(mqtt);
    c
}

fn token_of(gw: &Gateway) -> String {
    let file = gw.admin_token_file.clone().expect("admin token file");
    std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_application_once_across_reconnects_a_takeover_and_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = ports::reserve_ports(3);
    let config = gateway_config(&tmp.path().join("gw"), p[0], p[1], p[2]);
    let gw = gateway::start(config.clone()).await.expect("start");
    let rest = Rest::new(gw.http_addr, &token_of(&gw));
    let secret = rest.register("valve-1").await;
    let mqtt = format!("{}", p[2]);
    let mut dc = Config::new("valve-1", &secret, [mqtt.as_str()]).expect("config");
    dc.backoff_max = Duration::from_millis(500);
    let app = App::start(dc);
    app.until("subscribed", |t| t.subscribed >= 1).await;

    // Held commands: delivered, not answered; a reconnect redelivers them.
    app.send(Ctl::Hold(true)).await;
    let mut cids = Vec::new();
    for i in 0..3 {
        cids.push(rest.issue("valve-1", &format!("open-{i}")).await);
    }
    app.until("three commands", |t| t.commands.len() == 3).await;
    app.send(Ctl::Reconnect).await;
    app.until("redelivered after a reconnect", |t| {
        t.subscribed >= 2 && t.duplicates >= 3
    })
    .await;

    // A takeover (another connection with the device's id) kicks it.
    let before = app.tally.lock().expect("tally").subscribed;
    {
        let mut o = rumqttc::MqttOptions::new("valve-1", p[2].ip().to_string(), p[2].port());
        o.set_credentials("valve-1", &secret)
            .set_clean_session(false);
        let (_c, mut el) = rumqttc::AsyncClient::new(o, 4);
        let deadline = Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, el.poll())
                .await
                .expect("intruder connack");
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) = ev {
                break;
            }
        }
    }
    app.until("back after the takeover", |t| t.subscribed > before)
        .await;
    app.send(Ctl::Hold(false)).await;
    for cid in &cids {
        assert_eq!(rest.final_status(cid).await, "succeeded", "{cid}");
    }

    // Commands held across a gateway restart (no session on the new one).
    app.send(Ctl::Hold(true)).await;
    for i in 3..5 {
        cids.push(rest.issue("valve-1", &format!("open-{i}")).await);
    }
    app.until("five commands", |t| t.commands.len() == 5).await;
    let dups = app.tally.lock().expect("tally").duplicates;
    gw.stop().await;
    let gw = gateway::start(config).await.expect("restart");
    app.until("redelivered after the restart", |t| {
        t.duplicates >= dups + 2
    })
    .await;
    app.send(Ctl::Hold(false)).await;
    let rest = Rest::new(gw.http_addr, &rest.token);
    for cid in &cids {
        assert_eq!(rest.final_status(cid).await, "succeeded", "{cid}");
        let v = rest
            .call(reqwest::Method::GET, &format!("/v1/commands/{cid}"), None)
            .await;
        assert!(v["output"]["done"].is_string(), "{v}");
    }
    let seen = app.seen();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(
        seen.values().all(|&n| n == 1),
        "each command once: {seen:?}"
    );
    // Each command accepted once; results repeated for redeliveries.
    assert_eq!(app.counters.sent(MessageKind::Accepted), 5);
    assert!(app.counters.delivered(MessageKind::Result) >= 5);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_fails_over_when_its_gateway_is_killed_in_a_group_of_three() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let peers: BTreeMap<u64, SocketAddr> = (1..=3).zip(ports::reserve_ports(3)).collect();
    let mut gws = group::start_group(&peers, |id| {
        let mut c = group::member_config(tmp.path(), id, &peers, "group-secret-for-the-test");
        c.mqtt_listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.tick = Duration::from_millis(10);
        c
    })
    .await;
    let leader = group::settled_leader(&gws, WAIT).await;
    let rest = Rest::new(gws[&leader].http_addr, &group::admin_token(&gws));
    let secret = rest.register("valve-2").await;
    // The device's list: the two followers, then the leader.
    let mut order: Vec<u64> = gws.keys().copied().filter(|&i| i != leader).collect();
    order.push(leader);
    let addrs: Vec<String> = order
        .iter()
        .map(|i| gws[i].mqtt_addr.expect("mqtt").to_string())
        .collect();
    let mut dc = Config::new("valve-2", &secret, &addrs).expect("config");
    dc.protocol = Protocol::V4;
    dc.backoff_max = Duration::from_millis(500);
    let app = App::start(dc);
    app.until("subscribed to the first follower", |t| t.subscribed >= 1)
        .await;
    assert_eq!(
        app.tally.lock().expect("tally").connected[0],
        broker(gws[&order[0]].mqtt_addr.expect("mqtt"))
    );

    app.send(Ctl::Hold(true)).await;
    let first = rest.issue("valve-2", "close").await;
    app.until("the command", |t| t.commands.len() == 1).await;
    // Kill the gateway the device is on.
    let killed = gws.remove(&order[0]).expect("gateway");
    killed.crash().await;
    let next = broker(gws[&order[1]].mqtt_addr.expect("mqtt"));
    app.until("on the next gateway, the command redelivered", |t| {
        t.connected.last() == Some(&next) && t.subscribed >= 2 && t.duplicates >= 1
    })
    .await;
    app.send(Ctl::Hold(false)).await;
    let second = rest.issue("valve-2", "open").await;
    assert_eq!(rest.final_status(&first).await, "succeeded");
    assert_eq!(rest.final_status(&second).await, "succeeded");
    let seen = app.seen();
    assert_eq!(seen.get(&first), Some(&1), "{seen:?}");
    assert_eq!(seen.get(&second), Some(&1), "{seen:?}");
    for (_, g) in gws {
        g.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_converges_both_ways_with_reports_coalesced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let gw = gateway::start(gateway_config(tmp.path(), any, any, any))
        .await
        .expect("start");
    let rest = Rest::new(gw.http_addr, &token_of(&gw));
    let secret = rest.register("valve-3").await;
    let mqtt = gw.mqtt5_addr.expect("mqtt5").to_string();
    let mut dc = Config::new("valve-3", &secret, [mqtt.as_str()]).expect("config");
    dc.protocol = Protocol::V5;
    let app = App::start(dc);
    app.until("subscribed", |t| t.subscribed >= 1).await;

    // Desired over REST reaches the application, which reports it back.
    rest.call(
        reqwest::Method::PATCH,
        "/v1/devices/valve-3/shadow",
        Some(json!({"desired": {"valve": "open", "limit": {"max": 80}}})),
    )
    .await;
    app.until("a delta", |t| t.deltas >= 1).await;
    let s = converged(&rest, json!({"valve": "open", "limit": {"max": 80}})).await;
    assert_eq!(s["delta"], json!({}), "{s}");

    // Five patches at once: one message.
    let sent = app.counters.sent(MessageKind::Reported);
    let patches: Vec<Value> = (0..5).map(|i| json!({"position": i * 10})).collect();
    app.send(Ctl::Report(patches)).await;
    converged(
        &rest,
        json!({"valve": "open", "limit": {"max": 80}, "position": 40}),
    )
    .await;
    assert_eq!(app.counters.sent(MessageKind::Reported), sent + 1);

    // Patches made while offline: one message after the reconnect.
    app.send(Ctl::Disconnect).await;
    app.until("offline", |t| !t.errors.is_empty()).await;
    app.send(Ctl::Report(vec![
        json!({"position": 55}),
        json!({"limit": {"min": 5}}),
        json!({"position": null}),
    ]))
    .await;
    let subs = app.tally.lock().expect("tally").subscribed;
    app.send(Ctl::Connect).await;
    app.until("back", |t| t.subscribed > subs).await;
    converged(
        &rest,
        json!({"valve": "open", "limit": {"max": 80, "min": 5}}),
    )
    .await;
    assert_eq!(app.counters.sent(MessageKind::Reported), sent + 2);
    drop(app);
    gw.stop().await;
}

/// Waits (polling, at most [`WAIT`]) until the gateway's reported state of
/// `valve-3` is `want`; the shadow then.
async fn converged(rest: &Rest, want: Value) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = rest.shadow("valve-3").await;
        if s["reported"] == want {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "reported never became {want}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first event of a device that logs in as `id` with `password`.
async fn first_failure(addr: SocketAddr, protocol: Protocol, id: &str, password: &str) -> Error {
    let mut c = Config::new(id, password, [addr.to_string()]).expect("config");
    c.protocol = protocol;
    let mut d = Device::new(c).expect("device");
    let e = tokio::time::timeout(WAIT, d.next_event())
        .await
        .expect("an event");
    match e {
        Event::Disconnected(d) => {
            assert!(!d.was_connected);
            assert!(d.retry_in.is_some(), "it retries by itself");
            d.error
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_as_typed_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let gw = gateway::start(gateway_config(tmp.path(), any, any, any))
        .await
        .expect("start");
    let rest = Rest::new(gw.http_addr, &token_of(&gw));
    let secret = rest.register("valve-4").await;
    let (v4, v5) = (gw.mqtt_addr.expect("mqtt"), gw.mqtt5_addr.expect("mqtt5"));
    for (addr, protocol) in [(v4, Protocol::V4), (v5, Protocol::V5)] {
        assert_eq!(
            first_failure(addr, protocol, "valve-4", "wrong").await,
            Error::Refused(Refusal::BadCredentials),
            "{protocol:?}"
        );
        assert_eq!(
            first_failure(addr, protocol, "nobody", "x").await,
            Error::Refused(Refusal::BadCredentials),
            "{protocol:?}"
        );
    }
    // MQTT 5: the gateway says why it ended a session (a takeover, 0x8E).
    let mut c = Config::new("valve-4", &secret, [v5.to_string()]).expect("config");
    c.protocol = Protocol::V5;
    let mut first = Device::new(c.clone()).expect("device");
    let deadline = Instant::now() + WAIT;
    while !first.is_subscribed() {
        tokio::time::timeout_at(deadline, first.next_event())
            .await
            .expect("subscribed");
    }
    let mut second = Device::new(c).expect("device");
    let ended = async {
        loop {
            if let Event::Disconnected(d) = first.next_event().await {
                return d;
            }
        }
    };
    let (d, _) = tokio::time::timeout(WAIT, async {
        tokio::join!(ended, async {
            loop {
                if let Event::Subscribed = second.next_event().await {
                    return;
                }
            }
        })
    })
    .await
    .expect("takeover");
    assert!(
        matches!(d.error, Error::Disconnected { code: 0x8E, .. }),
        "{:?}",
        d.error
    );
    assert!(d.was_connected && d.error.is_transient());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_logs_in_by_client_certificate_over_tls() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "entente-device test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server certificate");
    let client_key = KeyPair::generate().expect("key");
    let client = CertificateParams::new(vec!["valve-5".to_string()])
        .expect("params")
        .signed_by(&client_key, &ca)
        .expect("client certificate");
    let file = |name: &str, text: String| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let ca_file = file("ca.pem", ca.pem());
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut config = gateway_config(&tmp.path().join("gw"), any, any, any);
    config.mqtt_tls_cert = Some(file("server.pem", server.pem()));
    config.mqtt_tls_key = Some(file("server.key", server_key.serialize_pem()));
    config.mqtt_tls_client_ca = Some(ca_file.clone());
    let gw = gateway::start(config).await.expect("start");
    let rest = Rest::new(gw.http_addr, &token_of(&gw));
    let fingerprint: String = Sha256::digest(client.der())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    rest.call(
        reqwest::Method::POST,
        "/v1/devices",
        Some(json!({"id": "valve-5", "cert_sha256": fingerprint, "auth": "certificate"})),
    )
    .await;
    let tls_addr = gw.mqtt_tls_addr.expect("TLS listener");
    let gateways: Arc<[BrokerAddr]> = vec![broker(tls_addr)].into();

    // Without the certificate (and no password): refused, typed.
    let mut c = Config::with_addresses("valve-5", None, gateways.clone());
    c.tls = Some(entente_device::Tls::trusting(&ca_file).expect("CA"));
    let mut d = Device::new(c).expect("device");
    match tokio::time::timeout(WAIT, d.next_event())
        .await
        .expect("an event")
    {
        Event::Disconnected(d) => assert_eq!(d.error, Error::Refused(Refusal::BadCredentials)),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // With it: in, and a command answered.
    let mut c = Config::with_addresses("valve-5", None, gateways);
    c.tls = Some(
        entente_device::Tls::with_client_certificate(
            &ca_file,
            &file("client.pem", client.pem()),
            &file("client.key", client_key.serialize_pem()),
        )
        .expect("client certificate"),
    );
    let app = App::start(c);
    app.until("subscribed over TLS", |t| t.subscribed >= 1)
        .await;
    let cid = rest.issue("valve-5", "open").await;
    assert_eq!(rest.final_status(&cid).await, "succeeded");
    assert_eq!(app.seen().get(&cid), Some(&1));
    drop(app);
    gw.stop().await;
}
