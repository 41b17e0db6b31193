//! The device library (`entente-device`) against three real `gateway`
//! processes in one Raft group (the chaos harness, `chaos/cluster.rs`):
//! the gateway a device is connected to — the leader — is SIGKILLed while
//! a command is in flight (accepted, not answered) and one more is waiting
//! in the application; the device moves to the next gateway of its list,
//! both are redelivered and de-duplicated by the library, and every
//! command reaches the application exactly once and ends `succeeded`,
//! read over REST from a surviving gateway. Every wait is on an event or a
//! condition with a deadline.

#[allow(dead_code)]
mod chaos {
    pub mod cluster;
    pub mod proxy;
    pub mod rng;
}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chaos::cluster::{Cluster, Settings, tail};
use entente_device::{BrokerAddr, Config, Device, Event, MessageKind};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(20);

fn broker(a: SocketAddr) -> BrokerAddr {
    BrokerAddr {
        host: a.ip().to_string(),
        port: a.port(),
    }
}

/// What the application saw.
#[derive(Debug, Default)]
struct Tally {
    /// Deliveries to the application, by command id.
    commands: HashMap<String, u32>,
    /// Redeliveries the library answered or dropped itself, by command id.
    duplicates: HashMap<String, u32>,
    /// `accepted` messages the gateway acknowledged, by command id.
    accepted_acked: HashMap<String, u32>,
    connected: Vec<BrokerAddr>,
    subscribed: u32,
}

/// An application over a [`Device`] in its own task. Normally it accepts
/// and succeeds each command at once; told to hold, it accepts the first
/// command it gets and keeps it (work in progress) and queues the next
/// ones unanswered, until told to go on.
struct App {
    go_on: mpsc::Sender<()>,
    hold: mpsc::Sender<()>,
    tally: Arc<Mutex<Tally>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    fn start(config: Config) -> App {
        let mut device = Device::new(config).expect("config");
        let (go_on, mut go_rx) = mpsc::channel::<()>(1);
        let (hold, mut hold_rx) = mpsc::channel::<()>(1);
        let tally = Arc::new(Mutex::new(Tally::default()));
        let changed = Arc::new(Notify::new());
        let (t, n) = (tally.clone(), changed.clone());
        let task = tokio::spawn(async move {
            let mut holding = false;
            // The accepted command in progress, then the queued ones.
            let mut working: Option<(String, String)> = None;
            let mut queued: Vec<(String, String)> = Vec::new();
            loop {
                tokio::select! {
                    e = device.next_event() => {
                        let mut t = t.lock().expect("tally");
                        match e {
                            Event::Command(c) => {
                                *t.commands.entry(c.id.clone()).or_default() += 1;
                                if !holding {
                                    device.accept(&c.id).expect("accept");
                                    device.succeed(&c.id, json!({"done": c.name})).expect("succeed");
                                } else if working.is_none() {
                                    device.accept(&c.id).expect("accept");
                                    working = Some((c.id, c.name));
                                } else {
                                    queued.push((c.id, c.name));
                                }
                            }
                            Event::Duplicate(id) => *t.duplicates.entry(id).or_default() += 1,
                            Event::Delivered { kind: MessageKind::Accepted, command: Some(id) } => {
                                *t.accepted_acked.entry(id).or_default() += 1;
                            }
                            Event::Connected(c) => t.connected.push(c.gateway),
                            Event::Subscribed => t.subscribed += 1,
                            _ => {}
                        }
                        drop(t);
                        n.notify_waiters();
                    }
                    Some(()) = hold_rx.recv() => holding = true,
                    Some(()) = go_rx.recv() => {
                        holding = false;
                        if let Some((id, name)) = working.take() {
                            device.succeed(&id, json!({"done": name})).expect("succeed");
                        }
                        for (id, name) in queued.drain(..) {
                            device.accept(&id).expect("accept");
                            device.succeed(&id, json!({"done": name})).expect("succeed");
                        }
                    }
                }
            }
        });
        App {
            go_on,
            hold,
            tally,
            changed,
            task,
        }
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
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// REST calls to one gateway.
struct Rest {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Rest {
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

    async fn issue(&self, device: &str, name: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/devices/{device}/commands?wait=0"),
                Some(json!({ "name": name, "ttl_ms": 120_000 })),
            )
            .await;
        v["id"].as_str().expect("command id").to_string()
    }

    async fn command(&self, cid: &str, wait_ms: u64) -> Value {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/commands/{cid}?wait={wait_ms}"),
            None,
        )
        .await
    }

    /// Waits (long-polls, at most [`WAIT`]) until the command's status is
    /// `want`; returns the command.
    async fn until_status(&self, cid: &str, want: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.command(cid, 2_000).await;
            if v["status"] == want {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "command {cid} not {want} within {WAIT:?}: {v}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_fails_over_when_its_gateway_process_is_killed_mid_command() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let settings = Settings {
        nodes: 3,
        tick_ms: 10,
        write_timeout_ms: 2_000,
        session_grace_ms: 30_000,
        snapshot_every: 100_000,
        log_filter: "info".into(),
        consensus: "raft".into(),
        byzantine: None,
    };
    let cluster = Cluster::start(tmp.path(), settings, 0xde71_ce00).await;
    let logs = || {
        cluster
            .ids()
            .iter()
            .map(|&i| format!("--- gw{i}:\n{}", tail(&cluster.node(i).log, 30)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The device's list: the leader first (the one to be killed), then the
    // followers. REST goes to the follower the device does not move to.
    let leader = cluster.wait_leader(WAIT).await;
    let mut order = vec![leader];
    order.extend(cluster.ids().into_iter().filter(|&i| i != leader));
    let rest = Rest {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("http"),
        base: cluster.node(order[2]).base(),
        token: cluster.token.clone(),
    };
    let registered = rest
        .call(
            reqwest::Method::POST,
            "/v1/devices",
            Some(json!({ "id": "pump-1" })),
        )
        .await;
    let secret = registered["secret"].as_str().expect("secret");
    let addrs: Vec<String> = order
        .iter()
        .map(|&i| cluster.node(i).mqtt_addr().to_string())
        .collect();
    let mut config = Config::new("pump-1", secret, &addrs).expect("config");
    config.backoff_max = Duration::from_millis(500);
    config.seed = 7;
    let app = App::start(config);
    let first = broker(cluster.node(order[0]).mqtt_addr());
    app.until("subscribed on the leader", |t| {
        t.subscribed >= 1 && t.connected.first() == Some(&first)
    })
    .await;

    // Commands answered at once, before any fault.
    let mut cids = Vec::new();
    for i in 0..2 {
        let cid = rest.issue("pump-1", &format!("warm-{i}")).await;
        rest.until_status(&cid, "succeeded").await;
        cids.push(cid);
    }

    // One command accepted and in progress, one more waiting in the
    // application; the accepted step is committed (seen on another
    // gateway).
    app.hold.send(()).await.expect("app running");
    let in_flight = rest.issue("pump-1", "in-flight").await;
    app.until("the in-flight command accepted and acknowledged", |t| {
        t.accepted_acked.contains_key(&in_flight)
    })
    .await;
    rest.until_status(&in_flight, "accepted").await;
    let waiting = rest.issue("pump-1", "waiting").await;
    app.until("the waiting command delivered", |t| {
        t.commands.contains_key(&waiting)
    })
    .await;
    cids.push(in_flight.clone());
    cids.push(waiting.clone());

    // SIGKILL the gateway the device is on.
    let subscribed_before = app.tally.lock().expect("tally").subscribed;
    cluster.kill(order[0]).await;
    let next = broker(cluster.node(order[1]).mqtt_addr());
    app.until(
        "on the next gateway, both commands redelivered and de-duplicated",
        |t| {
            t.connected.last() == Some(&next)
                && t.subscribed > subscribed_before
                && t.duplicates.contains_key(&in_flight)
                && t.duplicates.contains_key(&waiting)
        },
    )
    .await;

    // The application finishes its work; one more command after the
    // failover, through the new leader.
    app.go_on.send(()).await.expect("app running");
    let new_leader = cluster.wait_leader(WAIT).await;
    assert_ne!(new_leader, order[0], "the killed gateway still leads?");
    cids.push(rest.issue("pump-1", "after").await);

    for cid in &cids {
        let v = rest.until_status(cid, "succeeded").await;
        assert!(v["output"]["done"].is_string(), "{cid}: {v}\n{}", logs());
    }
    // Checked again on the other survivor, which the device is on.
    let on_next = Rest {
        base: cluster.node(order[1]).base(),
        http: rest.http.clone(),
        token: rest.token.clone(),
    };
    for cid in &cids {
        on_next.until_status(cid, "succeeded").await;
    }
    let t = app.tally.lock().expect("tally");
    assert_eq!(t.commands.len(), cids.len(), "{t:?}");
    for cid in &cids {
        assert_eq!(t.commands.get(cid), Some(&1), "{cid} once: {t:?}");
    }
    assert_eq!(t.connected.len(), 2, "one failover: {t:?}");
}
