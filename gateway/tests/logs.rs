//! What the real `gateway` binary logs, read the way an operator's log
//! collector reads it (stdout through a pipe, the default settings, no
//! `RUST_LOG`): plain text without colour codes, or JSON lines with
//! `--log-format json`; start, leader changes, membership changes and stop
//! at INFO; no ERROR line for what is normal (probes, hundreds of devices
//! coming and going, some dropping their sockets, a stop with devices
//! connected, `/readyz` answering 503); a member with the wrong cluster
//! secret logged once a minute, not on every redial.

mod common;

#[path = "support/ports.rs"]
mod ports;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// How long a test waits for any one thing.
const WAIT: Duration = Duration::from_secs(30);

/// A gateway process; what it writes to stdout and stderr is collected
/// line by line (stderr lines prefixed `stderr: `).
struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with `args` and the default logging: none of the
/// test runner's `RUST_LOG`, `NO_COLOR` or `ENTENTE_*` settings leak in.
fn spawn(name: &str, args: &[String], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("ENTENTE_") || k == "RUST_LOG" || k == "NO_COLOR" {
            cmd.env_remove(&key);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start the gateway binary");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    for (stream, prefix) in [
        (Box::new(out) as Box<dyn std::io::Read + Send>, ""),
        (Box::new(err), "stderr: "),
    ] {
        let lines = lines.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{prefix}{line}"));
            }
        }));
    }
    Proc {
        name: name.to_string(),
        child,
        lines,
        readers,
    }
}

/// The arguments of a gateway on loopback with OS-picked ports (except
/// the peer listener, which a group must know in advance).
fn args(dir: &Path, raft: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--data-dir",
        &dir.display().to_string(),
        "--http-listen",
        "127.0.0.1:0",
        "--raft-listen",
        raft,
        "--mqtt-listen",
        "127.0.0.1:0",
        "--mqtt5-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    a.extend(extra.iter().map(ToString::to_string));
    a
}

impl Proc {
    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn dump(&self) -> String {
        format!("--- log of {} ---\n{}", self.name, self.log().join("\n"))
    }

    /// The first line matching `pred`, waiting for it (bounded).
    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self.log().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no line {what} in time\n{}",
                self.name,
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The REST base URL and the device listeners from the lines a text
    /// log starts with.
    fn text_addresses(&self) -> (String, Vec<SocketAddr>) {
        let rest = self.wait_line("with the REST address", |l| l.contains("REST on http://"));
        let base = rest
            .split("REST on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("REST address")
            .to_string();
        let dev = self.wait_line("with the device listeners", |l| {
            l.starts_with("devices (MQTT")
        });
        let mqtt = dev
            .split(") on ")
            .nth(1)
            .expect("device listeners")
            .split(" and ")
            .map(|a| a.trim().parse().expect("device listener address"))
            .collect();
        (base, mqtt)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("bash")
            .arg("-c")
            .arg(format!("kill {sig} {}", self.child.id()))
            .status()
            .expect("bash")
            .success();
        assert!(ok, "kill {sig} {}", self.name);
    }

    /// Stops it as an operator does (SIGINT; the gateway also stops
    /// gracefully on it while it runs) and waits for it to exit, cleanly.
    fn stop(&mut self) {
        self.signal("-INT");
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop after SIGINT\n{}",
                self.name,
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            self.name,
            self.dump()
        );
    }

    /// Ends it at once (SIGKILL) and collects what it wrote.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// No ERROR line, no terminal escape code, no panic.
    fn assert_clean(&self) {
        for l in self.log() {
            assert!(
                !l.contains(" ERROR "),
                "{}: an ERROR line: {l}\n{}",
                self.name,
                self.dump()
            );
            assert!(
                !l.contains('\u{1b}'),
                "{}: an ANSI escape code in a log written to a pipe: {l:?}",
                self.name
            );
            assert!(
                !l.contains("panicked"),
                "{}: a panic: {l}\n{}",
                self.name,
                self.dump()
            );
        }
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.log().iter().filter(|l| pred(l)).count()
    }
}

fn token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("admin-token"))
        .expect("admin token file")
        .trim()
        .to_string()
}

/// A device over a raw socket, MQTT 3.1.1: CONNECT, CONNACK accepted,
/// SUBSCRIBE to its commands, SUBACK.
async fn device(addr: SocketAddr, id: &str, secret: &str) -> TcpStream {
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{Connect, Subscribe};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut connect = Connect::new(id);
    connect.keep_alive = 60;
    connect.set_login(id, secret);
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encode CONNECT");
    let mut sub = Subscribe::new(format!("devices/{id}/commands"), QoS::AtLeastOnce);
    sub.pkid = 1;
    sub.write(&mut buf).expect("encode SUBSCRIBE");
    s.write_all(&buf).await.expect("send CONNECT");
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "login of {id}");
    let mut suback = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut suback))
        .await
        .expect("SUBACK in time")
        .expect("SUBACK");
    assert_eq!(suback, [0x90, 3, 0, 1, 1], "subscription of {id}");
    s
}

/// Polls `/metrics` until `entente_mqtt_sessions` is `n`.
async fn wait_sessions(http: &reqwest::Client, base: &str, token: &str, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = http
            .get(format!("{base}/metrics"))
            .bearer_auth(token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let open = common::metric(&text, "entente_mqtt_sessions");
        if open == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} device sessions open, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers `ids` (in parallel) and returns their secrets.
async fn register(http: &reqwest::Client, base: &str, token: &str, ids: &[String]) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for (chunk_no, chunk) in ids.chunks(ids.len().div_ceil(8)).enumerate() {
        let (http, base, token, chunk) = (
            http.clone(),
            base.to_string(),
            token.to_string(),
            chunk.to_vec(),
        );
        tasks.spawn(async move {
            let mut secrets = Vec::new();
            for id in chunk {
                let r = http
                    .post(format!("{base}/v1/devices"))
                    .bearer_auth(&token)
                    .json(&json!({"id": id}))
                    .send()
                    .await
                    .expect("register");
                assert_eq!(r.status(), 201, "registering {id}");
                let body: Value = r.json().await.expect("json");
                secrets.push(body["secret"].as_str().expect("secret").to_string());
            }
            (chunk_no, secrets)
        });
    }
    let mut chunks: Vec<(usize, Vec<String>)> = tasks.join_all().await;
    chunks.sort_by_key(|(n, _)| *n);
    chunks.into_iter().flat_map(|(_, s)| s).collect()
}

/// The finding: every normal start logged two ERROR lines (the MQTT port
/// probe), a stop with 300 devices connected 300 ERRORs, a `/readyz` 503
/// an ERROR, and the text carried colour codes into files. Here: a start,
/// TCP probes of both device ports, 300 devices registered and connected
/// (half to each port, each subscribed, a third sent a command they never
/// acknowledge), a churn — a third disconnect properly, a third drop their
/// sockets (some with a reset), half of those come back, one is taken over
/// by a second login — and a stop with ~270 devices still connected. The
/// log holds the start, the leadership and the stop at INFO and no ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_start_device_churn_and_clean_stop_log_no_error() {
    const DEVICES: usize = 300;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("gw");
    let mut gw = spawn("gateway", &args(&dir, "127.0.0.1:0", &[]), &[]);
    let (base, mqtt) = gw.text_addresses();
    assert_eq!(mqtt.len(), 2, "two device listeners");
    let token = token(&dir);
    let http = reqwest::Client::new();

    // Probes, as a load balancer or a container health check makes them.
    for addr in &mqtt {
        drop(TcpStream::connect(addr).await.expect("probe"));
    }
    for path in ["/healthz", "/readyz"] {
        let r = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("probe");
        assert_eq!(r.status(), 200, "{path}");
    }

    let ids: Vec<String> = (0..DEVICES).map(|i| format!("churn-{i:03}")).collect();
    let secrets = register(&http, &base, &token, &ids).await;

    let mut conns: Vec<Option<TcpStream>> = Vec::new();
    for (i, (id, secret)) in ids.iter().zip(&secrets).enumerate() {
        conns.push(Some(device(mqtt[i % 2], id, secret).await));
    }
    wait_sessions(&http, &base, &token, DEVICES as u64).await;

    // Commands to every third device: delivered, never acknowledged.
    for id in ids.iter().step_by(3) {
        let r = http
            .post(format!("{base}/v1/devices/{id}/commands?wait=0"))
            .bearer_auth(&token)
            .json(&json!({"name": "reboot", "params": {"delay_s": 1}}))
            .send()
            .await
            .expect("command");
        assert!(r.status().is_success(), "command to {id}: {}", r.status());
    }

    // Churn.
    for (i, conn) in conns.iter_mut().enumerate().take(2 * DEVICES / 3) {
        let mut s = conn.take().expect("connected");
        if i < DEVICES / 3 {
            // A proper goodbye: DISCONNECT, then close.
            s.write_all(&[0xE0, 0]).await.expect("DISCONNECT");
            let _ = s.shutdown().await;
        } else if i % 2 == 0 {
            // The socket reset, as when a device's process dies.
            #[allow(deprecated)] // A zero linger does not block on close.
            s.set_linger(Some(Duration::ZERO)).expect("linger");
            drop(s);
        } else {
            // The socket simply closed, without a DISCONNECT.
            drop(s);
        }
    }
    wait_sessions(&http, &base, &token, (DEVICES / 3) as u64).await;
    let back = DEVICES / 2;
    for i in 0..back {
        conns[i] = Some(device(mqtt[(i + 1) % 2], &ids[i], &secrets[i]).await);
    }
    // A second login of a connected device takes its session over.
    let last = DEVICES - 1;
    let _takeover = device(mqtt[0], &ids[last], &secrets[last]).await;
    wait_sessions(&http, &base, &token, (back + DEVICES / 3) as u64).await;
    let still = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(still.status(), 200);

    // A clean stop with the devices still connected.
    gw.stop();
    drop(conns);
    gw.assert_clean();
    for needed in [
        " INFO gateway: gateway starting",
        " INFO coordinator::node: this node is now the leader",
        " INFO gateway: gateway started",
        " INFO gateway: gateway stopping",
        " INFO gateway: gateway stopped",
    ] {
        assert_eq!(
            gw.count(|l| l.contains(needed)),
            1,
            "one line {needed:?}\n{}",
            gw.dump()
        );
    }
}

/// `--log-format json` (here through `ENTENTE_LOG_FORMAT`): every line on
/// stdout is one JSON object with a timestamp, a level and a message, the
/// event's fields beside them; the "gateway started" event carries the
/// addresses the plain-text start lines would have printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_log_is_one_object_per_line_with_level_and_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("gw");
    let mut gw = spawn(
        "gateway",
        &args(&dir, "127.0.0.1:0", &[]),
        &[("ENTENTE_LOG_FORMAT", "json")],
    );
    let started = gw.wait_line("with the started event", |l| {
        l.contains("\"gateway started\"")
    });
    let started: Value = serde_json::from_str(&started).expect("the started event is JSON");
    let base = format!("http://{}", started["rest"].as_str().expect("rest address"));
    let mqtt: SocketAddr = started["devices"]
        .as_str()
        .and_then(|d| d.split(',').next())
        .and_then(|a| a.parse().ok())
        .expect("device listener address");
    assert_eq!(started["node"], 1);
    let token = token(&dir);
    let http = reqwest::Client::new();
    let secrets = register(&http, &base, &token, &["j1".to_string()]).await;
    let d = device(mqtt, "j1", &secrets[0]).await;
    wait_sessions(&http, &base, &token, 1).await;
    // A refused login: a warning with fields.
    let mut bad = common::connect_v4(mqtt, "j1", "j1", "wrong");
    bad.expect_closed().await;
    drop(d);
    gw.stop();

    let log = gw.log();
    let stdout: Vec<&String> = log.iter().filter(|l| !l.starts_with("stderr: ")).collect();
    assert!(stdout.len() >= 5, "{}", gw.dump());
    let mut levels = std::collections::BTreeSet::new();
    for line in &stdout {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a stdout line that is not JSON ({e}): {line}"));
        let level = v["level"]
            .as_str()
            .unwrap_or_else(|| panic!("no level: {line}"));
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "{line}"
        );
        assert_ne!(level, "ERROR", "{line}");
        assert!(v["message"].is_string(), "no message: {line}");
        assert!(v["timestamp"].is_string(), "no timestamp: {line}");
        assert!(v["target"].is_string(), "no target: {line}");
        levels.insert(level.to_string());
    }
    assert!(
        levels.contains("INFO") && levels.contains("WARN"),
        "{levels:?}"
    );
    let messages: Vec<Value> = stdout
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let find = |m: &str| messages.iter().find(|v| v["message"] == m).cloned();
    let leader = find("this node is now the leader").expect("a leader event");
    assert_eq!(leader["leader"], 1);
    assert!(leader["term"].as_u64().is_some_and(|t| t >= 1), "{leader}");
    assert!(find("gateway stopped").is_some());
    let refused = messages
        .iter()
        .find(|v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("login refused"))
        })
        .expect("the refused login is logged");
    assert_eq!(refused["client_id"], "j1", "{refused}");
}

/// A group's life in its members' logs: the leader each member follows and
/// its term; a learner added and promoted, a member removed, a leadership
/// transfer; a lone member without quorum answering `/readyz` with 503
/// (logged as no leader known, not as an error); and all stops. No ERROR
/// line in any of the four logs; a removed member that keeps calling is
/// logged once, not on every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_and_membership_changes_are_logged_at_info() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let raft = ports::reserve_ports(4);
    let peers = |n: usize| -> String {
        (0..n)
            .map(|i| format!("{}={}", i + 1, raft[i]))
            .collect::<Vec<_>>()
            .join(",")
    };
    let secret = (
        "ENTENTE_CLUSTER_SECRET",
        "logs-test-cluster-secret-0123456789",
    );
    let dirs: Vec<_> = (1..=4).map(|i| tmp.path().join(format!("g{i}"))).collect();
    let mut gws: Vec<Proc> = (0..3)
        .map(|i| {
            let id = (i + 1).to_string();
            let a = args(
                &dirs[i],
                &raft[i].to_string(),
                &["--node-id", &id, "--peers", &peers(3)],
            );
            spawn(&format!("gateway {id}"), &a, &[secret])
        })
        .collect();
    let bases: Vec<String> = gws.iter().map(|g| g.text_addresses().0).collect();
    let token = dirs
        .iter()
        .take(3)
        .find(|d| d.join("admin-token").exists())
        .map(|d| token(d))
        .expect("the first leader wrote the admin token");
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, url: String, body: Option<Value>| {
        let req = http.request(method, url).bearer_auth(&token);
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        async move {
            let r = req.send().await.expect("request");
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };

    // The fourth joins: added as a learner, promoted, given the lead.
    let a4 = args(
        &dirs[3],
        &raft[3].to_string(),
        &["--node-id", "4", "--peers", &peers(4), "--join"],
    );
    gws.push(spawn("gateway 4", &a4, &[secret]));
    let base4 = gws[3].text_addresses().0;
    let (s, b) = call(
        reqwest::Method::POST,
        format!("{}/v1/cluster/members", bases[0]),
        Some(json!({"id": 4, "address": raft[3].to_string(), "suffrage": "learner"})),
    )
    .await;
    assert!(s.is_success(), "adding a learner: {s} {b}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (s, b) = call(
            reqwest::Method::POST,
            format!("{}/v1/cluster/members", bases[0]),
            Some(json!({"id": 4, "suffrage": "voter"})),
        )
        .await;
        if s.is_success() {
            break;
        }
        // 409 while the learner is still catching up.
        assert!(Instant::now() < deadline, "promoting: {s} {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The transfer's TimeoutNow counts only once gateway 4 knows it votes:
    // its own log says when.
    gws[3].wait_line("about its promotion", |l| {
        l.contains("membership:") && l.contains("member=4 voters=")
    });
    let (s, b) = call(
        reqwest::Method::POST,
        format!("{}/v1/cluster/leader", bases[0]),
        Some(json!({"id": 4})),
    )
    .await;
    assert!(s.is_success(), "transfer: {s} {b}");
    let (s, b) = call(
        reqwest::Method::DELETE,
        format!("{base4}/v1/cluster/members/3"),
        None,
    )
    .await;
    assert!(s.is_success(), "removing 3: {s} {b}");
    for g in [&gws[0], &gws[1], &gws[3]] {
        g.wait_line("about the removal", |l| {
            l.contains("membership: a member was removed") && l.contains("member=3")
        });
    }

    // Gateway 1 alone (of voters 1, 2, 4) has no quorum: /readyz says 503.
    gws[2].stop();
    gws[3].stop();
    gws[1].stop();
    let deadline = Instant::now() + WAIT;
    let mut unready = 0;
    while unready < 5 {
        let r = http
            .get(format!("{}/readyz", bases[0]))
            .send()
            .await
            .expect("readyz");
        if r.status() == 503 {
            unready += 1;
        } else {
            assert!(Instant::now() < deadline, "readyz stays {}", r.status());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    gws[0].stop();

    for g in &gws {
        g.assert_clean();
        for needed in ["gateway starting", "gateway started", "gateway stopped"] {
            assert_eq!(
                g.count(|l| l.contains(&format!(" INFO gateway: {needed}"))),
                1,
                "{needed}\n{}",
                g.dump()
            );
        }
        assert!(
            g.count(
                |l| l.contains(" INFO coordinator::node: this node is now the leader")
                    || l.contains(" INFO coordinator::node: following a new leader")
            ) >= 1,
            "{}",
            g.dump()
        );
        // However often the removed member called, one line per minute.
        assert!(
            g.count(|l| l.contains("refused a message from a node that is not a member")) <= 1,
            "{}",
            g.dump()
        );
    }
    let g1 = &gws[0];
    for (what, pred) in [
        (
            "the learner added",
            Box::new(|l: &str| {
                l.contains("membership: a learner was added") && l.contains("member=4")
            }) as Box<dyn Fn(&str) -> bool>,
        ),
        (
            "the learner promoted",
            Box::new(|l: &str| {
                l.contains("membership: a learner was promoted to voter") && l.contains("member=4")
            }),
        ),
        (
            "the new leader after the transfer",
            Box::new(|l: &str| {
                l.contains(" INFO coordinator::node: following a new leader")
                    && l.contains("leader=4 term=")
            }),
        ),
        (
            "the leader lost",
            Box::new(|l: &str| l.contains(" INFO coordinator::node: no leader known")),
        ),
    ] {
        assert!(g1.count(&pred) >= 1, "{what}\n{}", g1.dump());
    }
    assert_eq!(
        gws[3].count(|l| l.contains(" INFO coordinator::node: this node is now the leader")),
        1,
        "{}",
        gws[3].dump()
    );
    assert_eq!(
        gws[3].count(|l| l.contains(" INFO coordinator::node: membership of the group node=4")),
        1,
        "the joining gateway logs the membership it received\n{}",
        gws[3].dump()
    );
}

/// The finding: a member with the wrong cluster secret was logged on every
/// redial, by it and by the members it called (a WARN every 100 ms at
/// first). Now each side logs the same refusal once a minute per peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cluster_secret_is_logged_once_a_minute() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let raft = ports::reserve_ports(3);
    let peers: String = (0..3)
        .map(|i| format!("{}={}", i + 1, raft[i]))
        .collect::<Vec<_>>()
        .join(",");
    let started = Instant::now();
    let mut gws: Vec<Proc> = (0..3)
        .map(|i| {
            let id = (i + 1).to_string();
            let secret = if i == 2 {
                "not-the-cluster-secret-0123456789"
            } else {
                "logs-test-cluster-secret-0123456789"
            };
            let a = args(
                &tmp.path().join(format!("g{id}")),
                &raft[i].to_string(),
                &["--node-id", &id, "--peers", &peers],
            );
            spawn(
                &format!("gateway {id}"),
                &a,
                &[("ENTENTE_CLUSTER_SECRET", secret)],
            )
        })
        .collect();
    // The two with the right secret form the group.
    gws[0].text_addresses();
    gws[1].text_addresses();
    // Redials back off from 50 ms to 5 s: in 6 s each dialer tries about
    // eight times.
    let window = Duration::from_secs(6);
    std::thread::sleep(window.saturating_sub(started.elapsed()));
    gws[2].kill();
    gws[0].stop();
    gws[1].stop();

    let wrong = |l: &str| l.contains("wrong cluster secret");
    let dialing = |g: &Proc, peer: usize| {
        g.count(|l| {
            wrong(l) && l.contains("cannot connect to peer") && l.contains(&format!("peer={peer} "))
        })
    };
    let refused = |g: &Proc| g.count(|l| wrong(l) && l.contains("refused incoming connection"));
    for peer in [1, 2] {
        assert_eq!(dialing(&gws[2], peer), 1, "{}", gws[2].dump());
    }
    for g in &gws[..2] {
        assert_eq!(dialing(g, 3), 1, "{}", g.dump());
        // Both members' attempts come from one address.
        assert_eq!(refused(g), 1, "{}", g.dump());
        g.assert_clean();
    }
    assert_eq!(refused(&gws[2]), 1, "{}", gws[2].dump());
}

/// A port already taken is a one-line error naming it and exit status 1,
/// not a panic with a backtrace (the device listeners' runtime was dropped
/// inside the main one when their bind failed).
#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").to_string();
    for flag in ["--mqtt-listen", "--mqtt5-listen", "--http-listen"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut a = args(&tmp.path().join("gw"), "127.0.0.1:0", &[]);
        let at = a.iter().position(|x| x == flag).expect("flag");
        a[at + 1] = port.clone();
        let mut gw = spawn("gateway", &a, &[]);
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = gw.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "{flag}: still running");
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in gw.readers.drain(..) {
            let _ = r.join();
        }
        assert_eq!(status.code(), Some(1), "{flag}\n{}", gw.dump());
        let stderr: Vec<String> = gw
            .log()
            .into_iter()
            .filter(|l| l.starts_with("stderr: "))
            .collect();
        assert_eq!(stderr.len(), 1, "{flag}: one line\n{}", gw.dump());
        assert!(
            stderr[0].contains(&format!("listener {port}")) && stderr[0].contains("in use"),
            "{flag}: {}",
            stderr[0]
        );
        gw.assert_clean();
    }
}

/// A raw MQTT 3.1.1 login: the CONNACK's return code (0: accepted).
async fn login_code(addr: SocketAddr, id: &str, password: &str) -> u8 {
    use rumqttc::mqttbytes::v4::Connect;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut connect = Connect::new(id);
    connect.keep_alive = 60;
    connect.set_login(id, password);
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encode CONNECT");
    s.write_all(&buf).await.expect("send CONNECT");
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    connack[3]
}

/// Secrets never reach the log, even at DEBUG: a whole scenario — the
/// bootstrap, tokens created (one expiring), used, rotated and revoked,
/// devices registered with secrets, logins with good and bad passwords,
/// commands, a device secret rotated, requests with unknown, revoked and
/// malformed tokens — and no line holds any token, device secret or
/// password tried, nor the SHA-256 of any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_at_debug() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("gw");
    let mut gw = spawn(
        "gateway",
        &args(&dir, "127.0.0.1:0", &[]),
        &[("RUST_LOG", "debug")],
    );
    let (base, mqtt) = gw.text_addresses();
    let admin = token(&dir);
    let http = reqwest::Client::new();
    let mut secrets: Vec<String> = vec![admin.clone()];
    let call = |method: reqwest::Method, path: &str, token: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.expect("request");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    use reqwest::Method;

    // Tokens.
    let (s, op) = call(
        Method::POST,
        "/v1/tokens",
        &admin,
        Some(json!({"name": "ops", "role": "operator"})),
    )
    .await;
    assert_eq!(s, 201, "{op}");
    let op_token = op["token"].as_str().expect("token").to_string();
    let (s, view) = call(
        Method::POST,
        "/v1/tokens",
        &admin,
        Some(json!({"name": "dash", "role": "viewer", "expires_in": 60})),
    )
    .await;
    assert_eq!(s, 201, "{view}");
    let view_token = view["token"].as_str().expect("token").to_string();
    secrets.extend([op_token.clone(), view_token.clone()]);
    let (s, _) = call(Method::GET, "/v1/devices", &view_token, None).await;
    assert_eq!(s, 200);

    // Devices, logins good and bad, commands.
    let ids = ["log-1", "log-2"];
    let mut device_secrets = Vec::new();
    for id in ids {
        let (s, d) = call(
            Method::POST,
            "/v1/devices",
            &op_token,
            Some(json!({"id": id})),
        )
        .await;
        assert_eq!(s, 201, "{d}");
        device_secrets.push(d["secret"].as_str().expect("secret").to_string());
    }
    secrets.extend(device_secrets.iter().cloned());
    let _online = device(mqtt[0], ids[0], &device_secrets[0]).await;
    let wrong = gateway::random_token().expect("random");
    secrets.push(wrong.clone());
    assert_ne!(
        login_code(mqtt[1], ids[1], &wrong).await,
        0,
        "a wrong password"
    );
    // Another device's secret is a wrong password too.
    assert_ne!(
        login_code(mqtt[0], ids[1], &device_secrets[0]).await,
        0,
        "another device's secret"
    );
    let (s, c) = call(
        Method::POST,
        "/v1/devices/log-1/commands?wait=0",
        &op_token,
        Some(json!({"name": "reboot", "params": {"delay_s": 1}})),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {c}");
    let (s, rotated) = call(Method::POST, "/v1/devices/log-2/secret", &op_token, None).await;
    assert_eq!(s, 200, "{rotated}");
    let new_device_secret = rotated["secret"].as_str().expect("secret").to_string();
    secrets.push(new_device_secret.clone());
    assert_ne!(
        login_code(mqtt[1], ids[1], &device_secrets[1]).await,
        0,
        "the old secret"
    );
    assert_eq!(login_code(mqtt[1], ids[1], &new_device_secret).await, 0);

    // Refused tokens: unknown, malformed, revoked.
    let unknown = gateway::random_token().expect("random");
    secrets.push(unknown.clone());
    let (s, _) = call(Method::GET, "/v1/devices", &unknown, None).await;
    assert_eq!(s, 401);
    let (s, _) = call(Method::GET, "/v1/devices", &format!("{unknown} x"), None).await;
    assert_eq!(s, 401);
    let op_id = op["id"].as_str().expect("id");
    let (s, _) = call(Method::DELETE, &format!("/v1/tokens/{op_id}"), &admin, None).await;
    assert_eq!(s, 204);
    let (s, _) = call(Method::GET, "/v1/devices", &op_token, None).await;
    assert_eq!(s, 401);
    // The bootstrap token rotated.
    let (s, rot) = call(Method::POST, "/v1/tokens/bootstrap/rotate", &admin, None).await;
    assert_eq!(s, 200, "{rot}");
    let new_admin = rot["token"].as_str().expect("token").to_string();
    secrets.push(new_admin.clone());
    let (s, list) = call(Method::GET, "/v1/tokens", &new_admin, None).await;
    assert_eq!(s, 200, "{list}");

    gw.stop();
    let log = gw.log();
    assert!(
        log.iter().any(|l| l.contains(" DEBUG ")),
        "the log was not at DEBUG\n{}",
        gw.dump()
    );
    let mut leaks = Vec::new();
    for secret in &secrets {
        let hash = gateway::hash_secret(secret);
        for (what, needle) in [("a secret", secret.as_str()), ("a secret's hash", &hash)] {
            // Also a prefix long enough to identify it (a truncated print).
            let prefix = &needle[..16];
            for l in &log {
                if l.contains(prefix) {
                    leaks.push(format!("{what} ({prefix}…): {l}"));
                }
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{} lines of {} hold secrets:\n{}",
        leaks.len(),
        log.len(),
        leaks.join("\n")
    );
}
