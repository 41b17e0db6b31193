//! The process harness: real `gateway` processes on loopback, a proxy on
//! every directed peer link, and the signals the fault schedule uses.
//!
//! # Ports
//!
//! Each gateway's `--peers` must name, for every other member, the proxy of
//! that link, and each proxy must know the real peer listener it forwards to
//! — before any gateway finishes starting, because `gateway` start waits for
//! a leader, which needs the links. So the harness picks every gateway's
//! ports itself: it binds port 0 for the REST, peer and both MQTT listeners,
//! reads the ports, and releases them right before spawning the process that
//! binds them. The proxies bind port 0 once and keep their ports for the
//! whole run. A gateway keeps its ports across restarts (clients and proxies
//! need not learn new ones). Releasing a port leaves a short window in which
//! another process could take it: if a gateway exits at start (it could not
//! bind), the harness picks new ports for it, points its proxies at the new
//! peer port and tries again.
//!
//! # Processes
//!
//! Standard output and standard error of every gateway go to
//! `<tmp>/gw<id>.log` (appended across restarts); the test prints their tail
//! when it fails. The harness SIGKILLs, SIGSTOPs / SIGCONTs (with `kill(1)`)
//! and SIGINTs (clean stop) gateways and restarts them on the same data
//! directory. Dropping the [`Cluster`] SIGKILLs every gateway it started,
//! also when the test panics.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use super::proxy::{Mode, Proxy};

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// Settings passed to every gateway.
#[derive(Debug, Clone)]
pub struct Settings {
    pub nodes: u64,
    pub tick_ms: u64,
    pub write_timeout_ms: u64,
    pub session_grace_ms: u64,
    pub snapshot_every: u64,
    pub log_filter: String,
    /// The consensus engine (`--consensus`).
    pub consensus: String,
    /// PBFT: a gateway that runs `--byzantine <modes>` (a test build's
    /// member that misbehaves on purpose), and its modes.
    pub byzantine: Option<(u64, String)>,
}

#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: u16,
    pub raft: u16,
    pub mqtt: u16,
    pub mqtt5: u16,
}

fn reserve_ports() -> Ports {
    // All four bound at once so they differ; released when this returns.
    let l: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("reserve a port"))
        .collect();
    let p = |i: usize| l[i].local_addr().expect("port").port();
    Ports {
        http: p(0),
        raft: p(1),
        mqtt: p(2),
        mqtt5: p(3),
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Process state of one gateway as the harness drove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    Running,
    Paused,
    Down,
}

#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    life: Life,
    /// 0 starting, 1 printed its addresses, 2 its output ended.
    ready: watch::Receiver<u8>,
}

#[derive(Debug)]
pub struct Node {
    pub dir: PathBuf,
    pub log: PathBuf,
    ports: Mutex<Ports>,
    proc: Mutex<Proc>,
}

impl Node {
    pub fn ports(&self) -> Ports {
        *self.ports.lock().expect("ports")
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports().http)
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        local(self.ports().mqtt)
    }

    pub fn life(&self) -> Life {
        self.proc.lock().expect("proc").life
    }

    fn pid(&self) -> Option<u32> {
        self.proc
            .lock()
            .expect("proc")
            .child
            .as_ref()
            .map(Child::id)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("state.db")
    }
}

#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Arc<Node>>,
    /// `(from, to)` → the proxy gateway `from` dials to reach `to`.
    proxies: BTreeMap<(u64, u64), Proxy>,
    pub token: String,
    settings: Settings,
    secret: String,
    /// PBFT: every gateway's public key (each created in its data
    /// directory before the first start), what `--group-keys` names and
    /// commit certificates are checked with; empty for Raft and Paxos.
    pub group_keys: BTreeMap<u64, [u8; 32]>,
    pub http: reqwest::Client,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            let mut p = n.proc.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

impl Cluster {
    /// Starts `settings.nodes` gateways under `root` and waits until all of
    /// them are up and one wrote the admin token.
    pub async fn start(root: &Path, settings: Settings, seed: u64) -> Cluster {
        let n = settings.nodes;
        let mut nodes = Vec::new();
        for id in 1..=n {
            nodes.push(Arc::new(Node {
                dir: root.join(format!("gw{id}")),
                log: root.join(format!("gw{id}.log")),
                ports: Mutex::new(reserve_ports()),
                proc: Mutex::new(Proc {
                    child: None,
                    life: Life::Down,
                    ready: watch::channel(2).1,
                }),
            }));
        }
        let mut proxies = BTreeMap::new();
        for from in 1..=n {
            for to in 1..=n {
                if from != to {
                    let target = local(nodes[to as usize - 1].ports().raft);
                    let p = Proxy::start(target, seed ^ (from * 1000 + to)).await;
                    proxies.insert((from, to), p);
                }
            }
        }
        // PBFT: a key pair per gateway, created in its data directory as
        // `gateway keys` does.
        let mut group_keys = BTreeMap::new();
        if settings.consensus == "pbft" {
            for (i, node) in nodes.iter().enumerate() {
                std::fs::create_dir_all(&node.dir).expect("data dir");
                let (key, _) =
                    coordinator::keys::load_or_create(&node.dir).expect("a gateway's key pair");
                group_keys.insert(i as u64 + 1, key.public());
            }
        }
        let mut cluster = Cluster {
            nodes,
            proxies,
            token: String::new(),
            settings,
            secret: format!("chaos-secret-{seed:x}"),
            group_keys,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("http client"),
        };
        // A group's first leader writes the admin token; if leadership moved
        // at that moment no token is written and the next start retries.
        for _attempt in 0..4 {
            for id in 1..=n {
                cluster.spawn(id);
            }
            for id in 1..=n {
                if let Err(e) = cluster.await_ready(id, Duration::from_secs(60)).await {
                    panic!("{e}");
                }
            }
            if let Some(t) = cluster.find_token() {
                cluster.token = t;
                return cluster;
            }
            for id in 1..=n {
                cluster.stop(id).await;
            }
        }
        panic!("no gateway wrote the admin token after 4 starts of the group");
    }

    fn find_token(&self) -> Option<String> {
        self.nodes.iter().find_map(|n| {
            std::fs::read_to_string(n.dir.join("admin-token"))
                .ok()
                .map(|t| t.trim().to_string())
        })
    }

    pub fn node(&self, id: u64) -> &Arc<Node> {
        &self.nodes[id as usize - 1]
    }

    pub fn ids(&self) -> Vec<u64> {
        (1..=self.settings.nodes).collect()
    }

    /// The Byzantine gateway, if the run has one.
    pub fn byzantine(&self) -> Option<u64> {
        self.settings.byzantine.as_ref().map(|(id, _)| *id)
    }

    /// The gateways that run the correct engine: the only ones clients and
    /// devices talk to, and whose state is checked (the checks are claims
    /// about the clients of correct members).
    pub fn correct_ids(&self) -> Vec<u64> {
        let byzantine = self.byzantine();
        self.ids()
            .into_iter()
            .filter(|id| Some(*id) != byzantine)
            .collect()
    }

    /// Starts gateway `id`'s process (not waiting for it to be up).
    fn spawn(&self, id: u64) {
        let node = self.node(id);
        let ports = node.ports();
        let mut peers = vec![format!("{id}={}", local(ports.raft))];
        for other in self.ids().into_iter().filter(|o| *o != id) {
            peers.push(format!("{other}={}", self.proxies[&(id, other)].listen));
        }
        std::fs::create_dir_all(&node.dir).expect("data dir");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        let mut log2 = log.try_clone().expect("log file");
        let _ = writeln!(
            log2,
            "===== chaos harness: starting gateway {id} (http {}, raft {}, mqtt {})",
            ports.http, ports.raft, ports.mqtt
        );
        let s = &self.settings;
        let mut extra: Vec<String> = Vec::new();
        if !self.group_keys.is_empty() {
            let keys: Vec<String> = self
                .group_keys
                .iter()
                .map(|(id, k)| format!("{id}={}", coordinator::keys::encode_public(k)))
                .collect();
            extra.extend(["--group-keys".into(), keys.join(",")]);
        }
        if let Some((b, modes)) = &s.byzantine
            && *b == id
        {
            extra.extend(["--byzantine".into(), modes.clone()]);
        }
        let mut child = Command::new(BIN)
            .args(["--node-id", &id.to_string(), "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(&node.dir)
            .args([
                "--http-listen",
                &local(ports.http).to_string(),
                "--raft-listen",
                &local(ports.raft).to_string(),
                "--mqtt-listen",
                &local(ports.mqtt).to_string(),
                "--mqtt5-listen",
                &local(ports.mqtt5).to_string(),
                "--cluster-secret",
                &self.secret,
                "--tick-ms",
                &s.tick_ms.to_string(),
                "--write-timeout-ms",
                &s.write_timeout_ms.to_string(),
                "--session-grace-ms",
                &s.session_grace_ms.to_string(),
                "--snapshot-every",
                &s.snapshot_every.to_string(),
                "--consensus",
                &s.consensus,
            ])
            .args(&extra)
            .env("RUST_LOG", &s.log_filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the gateway binary");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = watch::channel(0u8);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log2, "{line}");
                if line.contains("REST on ") {
                    tx.send_replace(1);
                }
            }
            tx.send_replace(2);
        });
        let mut p = node.proc.lock().expect("proc");
        p.child = Some(child);
        p.life = Life::Running;
        p.ready = rx;
    }

    /// Waits until gateway `id` printed its addresses. If it exited instead
    /// because a port was taken in the meantime, it gets new ports and is
    /// started again. An error says why it is not up within `limit`.
    pub async fn await_ready(&self, id: u64, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        for _ in 0..5 {
            let mut rx = self.node(id).proc.lock().expect("proc").ready.clone();
            let r = tokio::time::timeout_at(deadline, rx.wait_for(|s| *s != 0)).await;
            let state = match r {
                Ok(Ok(s)) => *s,
                Ok(Err(_)) => 2,
                Err(_) => return Err(format!("gw{id} did not start within {limit:?}")),
            };
            if state == 1 {
                return Ok(());
            }
            // Its output ended: it exited.
            self.reap(id).await;
            let tail = tail(&self.node(id).log, 5);
            if !tail.contains("bind") && !tail.contains("in use") {
                return Err(format!("gw{id} exited at start:\n{tail}"));
            }
            self.new_ports(id);
            self.spawn(id);
        }
        Err(format!("gw{id} could not bind its ports in 5 tries"))
    }

    fn new_ports(&self, id: u64) {
        let ports = reserve_ports();
        *self.node(id).ports.lock().expect("ports") = ports;
        for from in self.ids().into_iter().filter(|f| *f != id) {
            self.proxies[&(from, id)].set_target(local(ports.raft));
        }
    }

    async fn reap(&self, id: u64) {
        let child = {
            let mut p = self.node(id).proc.lock().expect("proc");
            p.life = Life::Down;
            p.child.take()
        };
        if let Some(mut c) = child {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if c.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL.
    pub async fn kill(&self, id: u64) {
        let child = {
            let mut p = self.node(id).proc.lock().expect("proc");
            p.life = Life::Down;
            p.child.take()
        };
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP.
    pub fn pause(&self, id: u64) {
        if let Some(pid) = self.node(id).pid() {
            assert!(signal(pid, "-STOP"), "kill -STOP {pid}");
            self.node(id).proc.lock().expect("proc").life = Life::Paused;
        }
    }

    /// SIGCONT.
    pub fn resume(&self, id: u64) {
        if let Some(pid) = self.node(id).pid() {
            assert!(signal(pid, "-CONT"), "kill -CONT {pid}");
            self.node(id).proc.lock().expect("proc").life = Life::Running;
        }
    }

    /// Clean stop (SIGINT), waiting for the exit. Returns false if the
    /// gateway did not exit within 30 s (it is then SIGKILLed).
    pub async fn stop(&self, id: u64) -> bool {
        let node = self.node(id);
        if node.life() == Life::Paused {
            self.resume(id);
        }
        let Some(pid) = node.pid() else { return true };
        signal(pid, "-INT");
        let child = {
            let mut p = node.proc.lock().expect("proc");
            p.life = Life::Down;
            p.child.take()
        };
        let Some(mut c) = child else { return true };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a gateway that is down again, on its data directory (not
    /// waiting: see [`Cluster::await_ready`]).
    pub fn start_again(&self, id: u64) {
        if self.node(id).life() == Life::Down {
            self.spawn(id);
        }
    }

    pub fn set_link(&self, from: u64, to: u64, mode: Mode) {
        self.proxies[&(from, to)].set_mode(mode);
    }

    /// Every link healthy again.
    pub fn heal_links(&self) {
        for p in self.proxies.values() {
            p.set_mode(Mode::HEALTHY);
        }
    }

    /// Cuts (or stalls) every link between `a` and `b` in both directions.
    pub fn partition(&self, a: &[u64], b: &[u64], mode: Mode) {
        for x in a {
            for y in b {
                self.set_link(*x, *y, mode);
                self.set_link(*y, *x, mode);
            }
        }
    }

    /// `GET /v1/cluster` of one gateway (None if it does not answer in time).
    pub async fn status(&self, id: u64) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/v1/cluster", self.node(id).base()))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// The gateway that says it leads, among the running ones.
    pub async fn leader(&self) -> Option<u64> {
        for id in self.ids() {
            if self.node(id).life() != Life::Running {
                continue;
            }
            if let Some(s) = self.status(id).await
                && s["role"] == "leader"
            {
                return Some(id);
            }
        }
        None
    }

    /// Waits until a running gateway says it leads (polling its status,
    /// bounded by `within`); panics with "no leader" past it.
    pub async fn wait_leader(&self, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return l;
            }
            assert!(tokio::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn proxy_connections(&self) -> u64 {
        self.proxies
            .values()
            .map(|p| p.connections.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
