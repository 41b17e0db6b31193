//! Test support shared by the multi-gateway and MQTT tests: listeners bound
//! on loopback before a gateway starts, a single gateway with its admin
//! token and a REST client ([`single`]), MQTT test devices (rumqttc, v4 and
//! v5), a Server-Sent Events reader and a metrics parser. (Each test binary
//! uses a different part of it.)
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// The consensus engine a test runs its gateways on: Raft, unless
/// `ENTENTE_TEST_CONSENSUS` names another (as the runs of
/// [`rerun_on_every_other_engine`] do).
pub fn engine_under_test() -> coordinator::engine::EngineKind {
    match std::env::var("ENTENTE_TEST_CONSENSUS") {
        Ok(name) => name
            .parse()
            .expect("ENTENTE_TEST_CONSENSUS names an engine"),
        Err(_) => coordinator::engine::EngineKind::Raft,
    }
}

/// Tests parametrised by engine rather than copied: runs this test binary
/// again for each engine a gateway runs besides Raft (not basic Paxos,
/// which has no leader and which a gateway refuses), with
/// `ENTENTE_TEST_CONSENSUS` set, on `tests` (exact names) or, if `None`,
/// on every test but those in `skip` (the caller, and tests of what only
/// Raft does); fails if any fails there or fewer than `expected` pass.
/// Does nothing inside such a run.
pub fn rerun_on_every_other_engine(tests: Option<&[&str]>, skip: &[&str], expected: usize) {
    rerun_on_every_other_engine_but(tests, skip, expected, &[]);
}

/// [`rerun_on_every_other_engine`], leaving out on PBFT the tests named in
/// `not_on_pbft` (each caller says why).
pub fn rerun_on_every_other_engine_but(
    tests: Option<&[&str]>,
    skip: &[&str],
    expected: usize,
    not_on_pbft: &[&str],
) {
    use coordinator::engine::EngineKind;
    if std::env::var_os("ENTENTE_TEST_CONSENSUS").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let others = EngineKind::ALL
        .into_iter()
        .filter(|k| !matches!(k, EngineKind::Raft | EngineKind::BasicPaxos));
    for engine in others {
        let mut cmd = std::process::Command::new(&exe);
        cmd.env("ENTENTE_TEST_CONSENSUS", engine.name());
        let left_out: &[&str] = if engine == EngineKind::Pbft {
            not_on_pbft
        } else {
            &[]
        };
        let expected = expected - left_out.len();
        match tests {
            Some(names) => {
                cmd.arg("--exact")
                    .args(names.iter().filter(|n| !left_out.contains(n)));
            }
            None => {
                for name in skip.iter().chain(left_out) {
                    cmd.args(["--skip", name]);
                }
            }
        }
        let out = cmd.output().expect("run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "on {engine}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let passed = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("test result: ok. "))
            .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
            .sum::<usize>();
        assert!(
            passed >= expected,
            "on {engine}, {passed} tests passed, not {expected}:\n{stdout}"
        );
    }
}

/// The node ids of a group of the smallest size that tolerates one
/// faulty member on `engine`: three (2f+1 crashes), or four for PBFT
/// (3f+1 Byzantine members).
pub fn group_ids(engine: coordinator::engine::EngineKind) -> &'static [u64] {
    match engine {
        coordinator::engine::EngineKind::Pbft => &[1, 2, 3, 4],
        _ => &[1, 2, 3],
    }
}

/// PBFT: creates each member's key pair in its data directory
/// (`data_dir(id)`), as a gateway does on first start, and returns every
/// member's public key, what `--group-keys` names.
pub fn group_keys(
    ids: &[u64],
    data_dir: impl Fn(u64) -> std::path::PathBuf,
) -> std::collections::BTreeMap<u64, [u8; 32]> {
    ids.iter()
        .map(|&id| {
            let (key, _) = coordinator::keys::load_or_create(&data_dir(id)).expect("a key pair");
            (id, key.public())
        })
        .collect()
}

/// How long a test waits for any one thing.
pub const WAIT: Duration = Duration::from_secs(15);

/// A listener on a loopback port the OS picked, held from now on: a
/// gateway started on it ([`gateway::start_with`]) never races another
/// process for the port, and its address is known before anything starts.
pub fn bind_loopback() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port")
}

/// A gateway's listeners (REST, peers, both device ports) bound on loopback
/// ports here; `.peer`'s address is what the group's `--peers` names.
pub fn loopback_listeners() -> gateway::Listeners {
    gateway::Listeners {
        rest: Some(bind_loopback()),
        peer: Some(bind_loopback()),
        mqtt: Some(bind_loopback()),
        mqtt5: Some(bind_loopback()),
    }
}

/// The address a listener is bound to.
pub fn addr_of(l: &Option<std::net::TcpListener>) -> SocketAddr {
    l.as_ref()
        .expect("a listener")
        .local_addr()
        .expect("its address")
}

/// One gateway in this process on a temp dir (`Config::single`, port-0
/// listeners, a 5 ms tick), its REST base URL, its first admin token and a
/// client: the setup of the single-gateway REST and MQTT tests. A test file
/// adds its own calls with `type Env = common::Single;` and `impl Env`.
pub struct Single {
    /// The gateway.
    pub gw: gateway::Gateway,
    /// `http://` and its REST address.
    pub base: String,
    /// The admin token it created on first start.
    pub token: String,
    /// A client for its REST API (no timeout; a test may replace it).
    pub http: reqwest::Client,
}

/// Starts a [`Single`] gateway with its data in `dir`, its configuration
/// changed by `tweak` before it starts (`gateway::start`).
pub async fn single(dir: &std::path::Path, tweak: impl FnOnce(&mut gateway::Config)) -> Single {
    single_with(dir, gateway::Listeners::default(), tweak).await
}

/// [`single`] on listeners the caller bound (`gateway::start_with`), such
/// as [`loopback_listeners`].
pub async fn single_with(
    dir: &std::path::Path,
    listeners: gateway::Listeners,
    tweak: impl FnOnce(&mut gateway::Config),
) -> Single {
    let any = "127.0.0.1:0".parse().expect("addr");
    let mut config = gateway::Config::single(dir.to_path_buf(), any, any);
    config.tick = Duration::from_millis(5);
    tweak(&mut config);
    let gw = gateway::start_with(config, listeners).await.expect("start");
    let file = gw.admin_token_file.clone().expect("admin token file");
    let token = std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_string();
    Single {
        base: format!("http://{}", gw.http_addr),
        gw,
        token,
        http: reqwest::Client::new(),
    }
}

impl Single {
    /// Registers device `id` with the admin token; its secret.
    pub async fn register(&self, id: &str) -> String {
        let r = self
            .http
            .post(format!("{}/v1/devices", self.base))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "id": id }))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), 201, "registering {id}");
        let body: Value = r.json().await.expect("json");
        body["secret"].as_str().expect("secret").to_string()
    }
}

pub type ByteStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Reads Server-Sent Events from a streaming response.
pub struct SseStream {
    /// The response body.
    pub body: ByteStream,
    /// Bytes read but not yet parsed.
    pub buf: String,
}

impl SseStream {
    /// The next event: (id, event, data).
    pub async fn next(&mut self) -> (u64, String, Value) {
        use tokio_stream::StreamExt;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = serde_json::from_str(v.trim()).ok();
                    }
                }
                if let (Some(id), Some(event), Some(data)) = (id, event, data) {
                    return (id, event, data);
                }
            }
            let chunk = timeout(WAIT, self.body.next())
                .await
                .expect("an event in time")
                .expect("the stream ended")
                .expect("body chunk");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// The value of an unlabelled metric in Prometheus text (0 if absent).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// What a test device's event loop saw.
#[derive(Debug)]
pub enum Seen {
    /// The broker accepted the connection.
    ConnAck,
    /// A subscription was acknowledged.
    SubAck,
    /// A message: topic and payload.
    Publish(String, Vec<u8>),
    /// The broker acknowledged the device's QoS 1 publish with this packet id.
    PubAck(u16),
    /// The broker answered a keep-alive ping.
    PingResp,
    /// An MQTT 5 DISCONNECT from the gateway, with its reason code (the
    /// connection then ends; no `Closed` follows).
    Disconnect(u8),
    /// The connection ended (the error says why).
    Closed(String),
}

/// An MQTT test device: a rumqttc client whose event loop runs in a task
/// and reports what it sees.
pub struct Device {
    v4: Option<rumqttc::AsyncClient>,
    v5: Option<rumqttc::v5::AsyncClient>,
    rx: mpsc::UnboundedReceiver<Seen>,
}

/// Connects with MQTT 3.1.1 (the CONNACK or refusal arrives as an event).
pub fn connect_v4(addr: SocketAddr, id: &str, user: &str, password: &str) -> Device {
    connect_v4_keep_alive(addr, id, user, password, Duration::from_secs(5))
}

/// [`connect_v4`] with a given keep-alive (the client pings that often when idle).
pub fn connect_v4_keep_alive(
    addr: SocketAddr,
    id: &str,
    user: &str,
    password: &str,
    keep_alive: Duration,
) -> Device {
    let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_credentials(user, password);
    opts.set_keep_alive(keep_alive);
    connect_v4_with(opts)
}

/// Connects with MQTT 3.1.1 and the given options (TLS, say).
pub fn connect_v4_with(opts: rumqttc::MqttOptions) -> Device {
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        use rumqttc::{Event, Packet};
        loop {
            let seen = match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Seen::ConnAck,
                Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    Seen::Publish(p.topic, p.payload.to_vec())
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => Seen::PubAck(a.pkid),
                Ok(Event::Incoming(Packet::PingResp)) => Seen::PingResp,
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(Seen::Closed(e.to_string()));
                    return;
                }
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    Device {
        v4: Some(client),
        v5: None,
        rx,
    }
}

/// Connects with MQTT 5, username = client id.
pub fn connect_v5(addr: SocketAddr, id: &str, password: &str) -> Device {
    let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_credentials(id, password);
    opts.set_keep_alive(Duration::from_secs(5));
    connect_v5_with(opts)
}

/// Connects with MQTT 5 and the given options (TLS, say).
pub fn connect_v5_with(opts: rumqttc::v5::MqttOptions) -> Device {
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        use rumqttc::v5::Event;
        use rumqttc::v5::mqttbytes::v5::Packet;
        loop {
            let seen = match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Seen::ConnAck,
                Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish(
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                ),
                Ok(Event::Incoming(Packet::PubAck(a))) => Seen::PubAck(a.pkid),
                Ok(Event::Incoming(Packet::PingResp(_))) => Seen::PingResp,
                Ok(_) => continue,
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => {
                    let _ = tx.send(Seen::Disconnect(reason_code as u8));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Seen::Closed(e.to_string()));
                    return;
                }
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    Device {
        v4: None,
        v5: Some(client),
        rx,
    }
}

impl Device {
    pub async fn next(&mut self) -> Seen {
        timeout(WAIT, self.rx.recv())
            .await
            .expect("timed out waiting for the device's next event")
            .expect("event loop ended")
    }

    pub async fn expect_connack(&mut self) {
        match self.next().await {
            Seen::ConnAck => {}
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn expect_closed(&mut self) -> String {
        loop {
            match self.next().await {
                Seen::Closed(e) => return e,
                Seen::Disconnect(code) => return format!("DISCONNECT 0x{code:02X}"),
                Seen::ConnAck => panic!("expected the connection refused, got CONNACK"),
                _ => {}
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str) {
        if let Some(c) = &self.v4 {
            c.subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
        if let Some(c) = &self.v5 {
            c.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
    }

    pub async fn subscribed(&mut self, filter: &str) {
        self.subscribe(filter).await;
        loop {
            match self.next().await {
                Seen::SubAck => return,
                Seen::Closed(e) => panic!("closed while subscribing: {e}"),
                _ => {}
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        if let Some(c) = &self.v4 {
            c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish");
        } else if let Some(c) = &self.v5 {
            c.publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("publish");
        }
    }

    pub async fn disconnect(&self) {
        if let Some(c) = &self.v4 {
            let _ = c.disconnect().await;
        }
        if let Some(c) = &self.v5 {
            let _ = c.disconnect().await;
        }
    }

    /// The next publish on `topic` (others are skipped).
    pub async fn message(&mut self, topic: &str) -> Vec<u8> {
        loop {
            match self.next().await {
                Seen::Publish(t, p) if t == topic => return p,
                Seen::Closed(e) => panic!("closed waiting for {topic}: {e}"),
                _ => {}
            }
        }
    }

    pub async fn json(&mut self, topic: &str) -> Value {
        serde_json::from_slice(&self.message(topic).await).expect("json payload")
    }
}
