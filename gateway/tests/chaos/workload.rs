//! The clients: each one, in a loop until told to stop, picks an operation
//! and a gateway with its seeded RNG, records the invocation, sends the
//! request and records how it ended.
//!
//! Operations: register a device (sometimes an id that exists), read a
//! device, issue a command (to a connected device, to one that never
//! connects, or to one registered during the run; some with an idempotency
//! key — retried with the same key when the outcome is unknown —, some with
//! `?wait`; TTLs of 2–10 s, and 20–30 s for 40 % of those to connected
//! devices), read a command (linearizable, long-poll, or local), cancel a
//! command, write a desired state (mostly `If-Match` with the version last
//! seen, sometimes a stale one, sometimes none), read a shadow (linearizable
//! or local, the latter sometimes with `Entente-Min-Index` of the client's
//! latest write).
//!
//! A client is one sequential process for the checker. After an operation
//! whose outcome is unknown it takes a new process id: the old one stays
//! "in flight" forever, as the tester requires.
//!
//! Objects are used a bounded number of times (the tester's search is
//! exponential in the worst case), and each client concentrates on the few
//! newest ones so that operations on an object overlap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, IF_MATCH};
use serde_json::{Value, json};
use stateright::semantics::write_once_register::{WORegisterOp, WORegisterRet};

use super::cluster::Cluster;
use super::history::{History, Invoke, Obj, Op, Outcome, Ret};
use super::model::{CmdOp, CmdRet, ShadowOp, ShadowRet, Status};
use super::rng::Rng;

pub const MAX_SHADOW_OPS: usize = 60;
pub const MAX_COMMAND_OPS: usize = 10;
pub const MAX_DEVICE_OPS: usize = 12;
/// Command TTLs (ms): most are short; a share of the commands for devices
/// that connect live long enough for the delivery check (`delivery.rs`,
/// which needs a device connected to a live gateway for its window before
/// the TTL ends) to hold the gateways to them.
pub const SHORT_TTL_MS: (u64, u64) = (2_000, 10_000);
pub const LONG_TTL_MS: (u64, u64) = (20_000, 30_000);
const LONG_TTL_SHARE: f64 = 0.4;
/// The longest TTL any command gets.
pub const MAX_TTL_MS: u64 = LONG_TTL_MS.1;
/// The newest objects a client picks from.
const HOT: usize = 4;

/// The response header carrying a write's commit certificate (PBFT).
pub const CERTIFICATE_HEADER: &str = "entente-certificate";

/// A commit certificate a gateway answered a write with.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// The request it came with, for the report.
    pub what: String,
    /// The header's value as sent.
    pub header: String,
}

/// A command object: one issue request, or every request with one key.
#[derive(Debug, Clone)]
pub struct CmdObj {
    pub device: String,
    pub key: Option<String>,
    /// `params.op` of the request(s): identifies the command in the state.
    pub tag: String,
    /// Every command id an answer named (more than one is a violation).
    pub cids: Vec<String>,
    pub ops: usize,
}

/// What the clients share.
#[derive(Debug, Default)]
pub struct World {
    /// Devices with a simulated MQTT client.
    pub live: Vec<String>,
    /// Registered, never connected.
    pub offline: Vec<String>,
    /// Registered during the run (acknowledged).
    pub registered: Vec<String>,
    /// Ids a registration was attempted for, in order.
    pub attempted: Vec<String>,
    pub shadow_ops: HashMap<String, usize>,
    pub device_ops: HashMap<String, usize>,
    pub commands: Vec<CmdObj>,
    pub cid_obj: HashMap<String, usize>,
    /// Problems seen directly in answers (wrong device, a second command
    /// for one key, a 404 for a device that exists, …).
    pub violations: Vec<String>,
    /// Answers with a 5xx status other than 503 (the gateway failing
    /// rather than reporting unavailability).
    pub server_errors: Vec<String>,
    /// Every `Entente-Certificate` header on a successful answer (checked
    /// at the end: `certs.rs`).
    pub certificates: Vec<Certificate>,
    next: u64,
}

impl World {
    fn next(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For requests without `?wait`.
    pub request: Duration,
}

/// One answer, or why there is none.
#[allow(clippy::enum_variant_names)]
enum Sent {
    Reply {
        status: u16,
        index: Option<u64>,
        body: Value,
        /// The `Entente-Certificate` headers of the answer (one per write
        /// the request made, on an engine that certifies).
        certificates: Vec<String>,
    },
    /// The request never reached a gateway.
    NotSent(String),
    Unknown(String),
}

async fn call(req: reqwest::RequestBuilder) -> Sent {
    match req.send().await {
        Err(e) if e.is_connect() => Sent::NotSent(format!("connect: {e}")),
        Err(e) => Sent::Unknown(format!("{e}")),
        Ok(r) => {
            let status = r.status().as_u16();
            let index = r
                .headers()
                .get("entente-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let certificates = r
                .headers()
                .get_all(CERTIFICATE_HEADER)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            match r.json::<Value>().await {
                Ok(body) => Sent::Reply {
                    status,
                    index,
                    body,
                    certificates,
                },
                Err(e) => Sent::Unknown(format!("status {status}, body unreadable: {e}")),
            }
        }
    }
}

/// For a write's error answer: certainly not applied, or unknown.
fn write_failure(status: u16, body: &Value) -> Outcome {
    let kind = body["type"].as_str().unwrap_or("");
    let certain = [
        "urn:entente:problem:no-leader",
        "urn:entente:problem:write-dropped",
        "urn:entente:problem:write-refused",
    ];
    if status == 503 && certain.contains(&kind) {
        Outcome::Fail(format!("{status} {kind}"))
    } else {
        Outcome::Unknown(format!("{status} {kind}: {}", body["detail"]))
    }
}

pub struct Client {
    pub index: usize,
    process: u64,
    processes: u64,
    rng: Rng,
    http: reqwest::Client,
    cluster: Arc<Cluster>,
    world: Arc<Mutex<World>>,
    history: Arc<History>,
    timeouts: Timeouts,
    /// The highest `Entente-Index` of this client's acknowledged writes.
    last_write: u64,
    /// The shadow version this client last saw, per device.
    versions: HashMap<String, u64>,
}

impl Client {
    pub fn new(
        index: usize,
        clients: usize,
        seed: u64,
        cluster: Arc<Cluster>,
        world: Arc<Mutex<World>>,
        history: Arc<History>,
        timeouts: Timeouts,
    ) -> Client {
        Client {
            index,
            process: index as u64,
            processes: clients as u64,
            rng: Rng::fork(seed, 1_000 + index as u64),
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(2))
                .build()
                .expect("http client"),
            cluster,
            world,
            history,
            timeouts,
            last_write: 0,
            versions: HashMap::new(),
        }
    }

    /// Runs operations until `stop`, counting them in `count`.
    pub async fn run(mut self, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) {
        while !stop.load(Ordering::Relaxed) {
            self.one().await;
            count.fetch_add(1, Ordering::Relaxed);
            // Pacing, so that a few clients do not saturate a debug build.
            let pause = self.rng.range(0, 30);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// A new process id after an unknown outcome.
    fn retire(&mut self) {
        self.process += self.processes;
    }

    fn gateway(&mut self) -> u64 {
        let ids = self.cluster.correct_ids();
        *self.rng.pick(&ids)
    }

    fn url(&self, gateway: u64, path: &str) -> String {
        format!("{}{path}", self.cluster.node(gateway).base())
    }

    fn req(&self, method: reqwest::Method, url: String, wait_ms: u64) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .bearer_auth(&self.cluster.token)
            .timeout(self.timeouts.request + Duration::from_millis(wait_ms))
    }

    #[allow(clippy::too_many_arguments)]
    fn invoke(
        &self,
        thread_part: u8,
        obj: Obj,
        op: Op,
        kind: &str,
        gateway: u64,
        linearizable: bool,
        min_index: Option<u64>,
    ) -> super::history::Pending {
        self.history.invoke(Invoke {
            client: self.index,
            thread: (self.process, thread_part),
            obj,
            op,
            kind: kind.to_string(),
            gateway,
            linearizable,
            min_index,
        })
    }

    /// Sends a request; answers with 5xx other than 503 are noted, and the
    /// certificate of a successful one recorded.
    async fn send(&self, req: reqwest::RequestBuilder, what: &str, gateway: u64) -> Sent {
        let sent = call(req).await;
        if let Sent::Reply {
            status,
            index,
            certificates,
            ..
        } = &sent
            && (200..300).contains(status)
            && !certificates.is_empty()
        {
            let at = self.history.start_elapsed();
            let mut w = self.world.lock().expect("world");
            for header in certificates {
                w.certificates.push(Certificate {
                    what: format!("[{at:.3}s] {what} on gw{gateway}, index {index:?}"),
                    header: header.clone(),
                });
            }
        }
        if let Sent::Reply { status, body, .. } = &sent
            && *status >= 500
            && *status != 503
        {
            let at = self.history.start_elapsed();
            self.world
                .lock()
                .expect("world")
                .server_errors
                .push(format!("[{at:.3}s] {what} on gw{gateway}: {status} {body}"));
        }
        sent
    }

    fn violation(&self, what: String) {
        self.world.lock().expect("world").violations.push(what);
    }

    async fn one(&mut self) {
        match self.rng.weighted(&[5, 5, 30, 20, 5, 20, 15]) {
            0 => self.register().await,
            1 => self.read_device().await,
            2 => self.issue().await,
            3 => self.read_command().await,
            4 => self.cancel().await,
            5 => self.write_shadow().await,
            _ => self.read_shadow().await,
        }
    }

    async fn register(&mut self) {
        let (id, tag) = {
            let mut w = self.world.lock().expect("world");
            let n = w.next();
            let reuse = !w.attempted.is_empty() && self.rng.chance(0.15);
            let id = if reuse {
                let k = w.attempted.len() as u64;
                w.attempted[self.rng.below(k) as usize].clone()
            } else {
                let id = format!("r{n}");
                w.attempted.push(id.clone());
                id
            };
            if *w.device_ops.get(&id).unwrap_or(&0) >= MAX_DEVICE_OPS {
                return;
            }
            *w.device_ops.entry(id.clone()).or_insert(0) += 1;
            (id, format!("reg{n}"))
        };
        let g = self.gateway();
        let p = self.invoke(
            0,
            Obj::Device(id.clone()),
            Op::Device(WORegisterOp::Write(tag.clone())),
            "register",
            g,
            true,
            None,
        );
        let body = json!({ "id": id, "labels": { "op": tag } });
        let sent = self
            .send(
                self.req(reqwest::Method::POST, self.url(g, "/v1/devices"), 0)
                    .json(&body),
                "register",
                g,
            )
            .await;
        match sent {
            Sent::Reply {
                status: 201, index, ..
            } => {
                self.history
                    .complete(p, Outcome::Ok(Ret::Device(WORegisterRet::WriteOk)), index);
                self.last_write = self.last_write.max(index.unwrap_or(0));
                self.world.lock().expect("world").registered.push(id);
            }
            Sent::Reply {
                status: 409, index, ..
            } => {
                self.history
                    .complete(p, Outcome::Ok(Ret::Device(WORegisterRet::WriteFail)), index);
            }
            Sent::Reply { status, body, .. } => {
                let o = write_failure(status, &body);
                self.finish_failed(p, o);
            }
            Sent::NotSent(e) => self.history.complete(p, Outcome::Fail(e), None),
            Sent::Unknown(e) => self.finish_failed(p, Outcome::Unknown(e)),
        }
    }

    /// Records a failed or unknown outcome; an unknown one retires the process.
    fn finish_failed(&mut self, p: super::history::Pending, o: Outcome) {
        let unknown = matches!(o, Outcome::Unknown(_));
        self.history.complete(p, o, None);
        if unknown {
            self.retire();
        }
    }

    async fn read_device(&mut self) {
        let id = {
            let mut w = self.world.lock().expect("world");
            let candidates: Vec<String> = w
                .attempted
                .iter()
                .rev()
                .chain(w.live.iter())
                .filter(|d| *w.device_ops.get(*d).unwrap_or(&0) < MAX_DEVICE_OPS)
                .take(HOT * 2)
                .cloned()
                .collect();
            if candidates.is_empty() {
                return;
            }
            let id = self.rng.pick(&candidates).clone();
            *w.device_ops.entry(id.clone()).or_insert(0) += 1;
            id
        };
        let g = self.gateway();
        let p = self.invoke(
            0,
            Obj::Device(id.clone()),
            Op::Device(WORegisterOp::Read),
            "read-device",
            g,
            true,
            None,
        );
        let sent = self
            .send(
                self.req(
                    reqwest::Method::GET,
                    self.url(g, &format!("/v1/devices/{id}")),
                    0,
                ),
                "read-device",
                g,
            )
            .await;
        match sent {
            Sent::Reply {
                status: 200,
                index,
                body,
                ..
            } => {
                let label = body["labels"]["op"].as_str().map(str::to_string);
                self.history.complete(
                    p,
                    Outcome::Ok(Ret::Device(WORegisterRet::ReadOk(label))),
                    index,
                );
            }
            Sent::Reply {
                status: 404, index, ..
            } => {
                self.history.complete(
                    p,
                    Outcome::Ok(Ret::Device(WORegisterRet::ReadOk(None))),
                    index,
                );
            }
            Sent::Reply { status, body, .. } => {
                self.history
                    .complete(p, Outcome::Fail(format!("{status} {}", body["type"])), None)
            }
            Sent::NotSent(e) | Sent::Unknown(e) => self.history.complete(p, Outcome::Fail(e), None),
        }
    }

    async fn issue(&mut self) {
        let keyed = self.rng.chance(0.4);
        let wait_ms = if self.rng.chance(0.3) {
            self.rng.range(200, 3000)
        } else {
            0
        };
        let pool = self.rng.weighted(&[70, 20, 10]);
        // Only devices that connect (pool 0) get long TTLs: commands for the
        // others expire, and the test waits for that after the heal.
        let (lo, hi) = if pool == 0 && self.rng.chance(LONG_TTL_SHARE) {
            LONG_TTL_MS
        } else {
            SHORT_TTL_MS
        };
        let ttl_ms = self.rng.range(lo, hi);
        let (obj, device, key, tag) = {
            let mut w = self.world.lock().expect("world");
            let devices = match pool {
                0 => w.live.clone(),
                1 => w.offline.clone(),
                _ => w.registered.clone(),
            };
            if devices.is_empty() {
                return;
            }
            let device = self.rng.pick(&devices).clone();
            let n = w.next();
            let key = keyed.then(|| format!("k{n}"));
            let tag = format!("op{n}");
            w.commands.push(CmdObj {
                device: device.clone(),
                key: key.clone(),
                tag: tag.clone(),
                cids: Vec::new(),
                ops: 1,
            });
            (w.commands.len() - 1, device, key, tag)
        };
        let mut body = json!({
            "name": "chaos",
            "params": { "op": tag },
            "ttl_ms": ttl_ms,
        });
        if let Some(k) = &key {
            body["idempotency_key"] = json!(k);
        }
        // With a key the request is retried (same body) while its outcome
        // is unknown or it certainly failed.
        let attempts = if keyed { 3 } else { 1 };
        for attempt in 0..attempts {
            let g = self.gateway();
            let mut kind = String::from("issue");
            if keyed {
                kind.push_str("+key");
            }
            if wait_ms > 0 {
                kind.push_str("+wait");
            }
            if attempt > 0 {
                kind.push_str("+retry");
            }
            let p = self.invoke(
                0,
                Obj::Command(obj),
                Op::Command(CmdOp::Issue),
                &kind,
                g,
                true,
                None,
            );
            let pw = (wait_ms > 0).then(|| {
                self.invoke(
                    1,
                    Obj::Command(obj),
                    Op::Command(CmdOp::Read),
                    "issue-wait-status",
                    g,
                    true,
                    None,
                )
            });
            let path = if wait_ms > 0 {
                format!("/v1/devices/{device}/commands?wait={wait_ms}")
            } else {
                format!("/v1/devices/{device}/commands")
            };
            let sent = self
                .send(
                    self.req(reqwest::Method::POST, self.url(g, &path), wait_ms)
                        .json(&body),
                    &kind,
                    g,
                )
                .await;
            match sent {
                Sent::Reply {
                    status: status @ (200 | 201),
                    index,
                    body: c,
                    ..
                } => {
                    let cid = c["id"].as_str().unwrap_or("").to_string();
                    let st = c["status"].as_str().and_then(Status::parse);
                    self.check_command_body(&c, &device, &tag);
                    let ret = match (status, wait_ms > 0) {
                        (201, _) => CmdRet::Created,
                        (_, true) => CmdRet::Existing(None),
                        (_, false) => CmdRet::Existing(st),
                    };
                    if status == 201 && wait_ms == 0 && st != Some(Status::Queued) {
                        self.violation(format!(
                            "issue of {tag} answered 201 with status {:?} (a new command is queued)",
                            c["status"]
                        ));
                    }
                    self.history
                        .complete(p, Outcome::Ok(Ret::Command(ret)), index);
                    if let Some(pw) = pw {
                        match st {
                            Some(s) => self.history.complete(
                                pw,
                                Outcome::Ok(Ret::Command(CmdRet::Found(s))),
                                index,
                            ),
                            None => {
                                self.history
                                    .complete(pw, Outcome::Fail("no status".into()), None)
                            }
                        }
                    }
                    if status == 201 || key.is_some() {
                        self.last_write = self.last_write.max(index.unwrap_or(0));
                    }
                    let mut w = self.world.lock().expect("world");
                    let o = &mut w.commands[obj];
                    if !o.cids.contains(&cid) {
                        o.cids.push(cid.clone());
                    }
                    if o.cids.len() > 1 {
                        let msg = format!(
                            "idempotency key {:?} of device {device} answered with two commands: {:?}",
                            o.key, o.cids
                        );
                        w.violations.push(msg);
                    }
                    w.cid_obj.insert(cid, obj);
                    return;
                }
                Sent::Reply {
                    status: 404,
                    body: b,
                    ..
                } if b["type"] == "urn:entente:problem:not-found" => {
                    self.history.complete(p, Outcome::Fail("404".into()), None);
                    if let Some(pw) = pw {
                        self.history.complete(pw, Outcome::Fail("404".into()), None);
                    }
                    self.violation(format!(
                        "issue to device {device} (registered and acknowledged) answered 404: {}",
                        b["detail"]
                    ));
                    return;
                }
                Sent::Reply { status, body, .. } => {
                    let o = write_failure(status, &body);
                    if let Some(pw) = pw {
                        self.history
                            .complete(pw, Outcome::Fail("no answer".into()), None);
                    }
                    self.finish_failed(p, o);
                }
                Sent::NotSent(e) => {
                    if let Some(pw) = pw {
                        self.history.complete(pw, Outcome::Fail(e.clone()), None);
                    }
                    self.history.complete(p, Outcome::Fail(e), None);
                }
                Sent::Unknown(e) => {
                    if let Some(pw) = pw {
                        self.history.complete(pw, Outcome::Fail(e.clone()), None);
                    }
                    self.finish_failed(p, Outcome::Unknown(e));
                }
            }
            self.world.lock().expect("world").commands[obj].ops += 1;
        }
    }

    fn check_command_body(&self, c: &Value, device: &str, tag: &str) {
        if c["device"] != device || c["params"]["op"] != tag {
            self.violation(format!(
                "the answer to issuing {tag} for {device} is another command: {c}"
            ));
        }
    }

    /// A command object this client may use next (one of the newest with an
    /// id and budget left).
    fn pick_command(&mut self) -> Option<(usize, String)> {
        let mut w = self.world.lock().expect("world");
        let candidates: Vec<usize> = (0..w.commands.len())
            .rev()
            .filter(|i| !w.commands[*i].cids.is_empty() && w.commands[*i].ops < MAX_COMMAND_OPS)
            .take(HOT * 2)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = *self.rng.pick(&candidates);
        w.commands[i].ops += 1;
        Some((i, w.commands[i].cids[0].clone()))
    }

    async fn read_command(&mut self) {
        let Some((obj, cid)) = self.pick_command() else {
            return;
        };
        let g = self.gateway();
        let local = self.rng.chance(0.25);
        let min_index = (local && self.rng.chance(0.5)).then_some(self.last_write);
        let wait_ms = if !local && self.rng.chance(0.2) {
            self.rng.range(100, 2000)
        } else {
            0
        };
        let kind = match (local, min_index.is_some(), wait_ms > 0) {
            (true, true, _) => "read-command-local+min",
            (true, false, _) => "read-command-local",
            (false, _, true) => "read-command+wait",
            _ => "read-command",
        };
        let p = self.invoke(
            0,
            Obj::Command(obj),
            Op::Command(CmdOp::Read),
            kind,
            g,
            !local,
            min_index,
        );
        let mut path = format!("/v1/commands/{cid}");
        if local {
            path.push_str("?consistency=local");
        } else if wait_ms > 0 {
            path.push_str(&format!("?wait={wait_ms}"));
        }
        let mut req = self.req(reqwest::Method::GET, self.url(g, &path), wait_ms);
        if let Some(m) = min_index {
            req = req.header("entente-min-index", m);
        }
        match self.send(req, kind, g).await {
            Sent::Reply {
                status: 200,
                index,
                body,
                ..
            } => match body["status"].as_str().and_then(Status::parse) {
                Some(s) => {
                    self.history
                        .complete(p, Outcome::Ok(Ret::Command(CmdRet::Found(s))), index)
                }
                None => {
                    self.history
                        .complete(p, Outcome::Fail("bad status".into()), None);
                    self.violation(format!("command {cid} read with a bad body: {body}"));
                }
            },
            Sent::Reply {
                status: 404,
                index,
                body,
                ..
            } if body["type"] == "urn:entente:problem:not-found" => {
                self.history
                    .complete(p, Outcome::Ok(Ret::Command(CmdRet::NotFound)), index)
            }
            Sent::Reply { status, body, .. } => {
                self.history
                    .complete(p, Outcome::Fail(format!("{status} {}", body["type"])), None)
            }
            Sent::NotSent(e) | Sent::Unknown(e) => self.history.complete(p, Outcome::Fail(e), None),
        }
    }

    async fn cancel(&mut self) {
        let Some((obj, cid)) = self.pick_command() else {
            return;
        };
        let g = self.gateway();
        let p = self.invoke(
            0,
            Obj::Command(obj),
            Op::Command(CmdOp::Cancel),
            "cancel",
            g,
            true,
            None,
        );
        let sent = self
            .send(
                self.req(
                    reqwest::Method::POST,
                    self.url(g, &format!("/v1/commands/{cid}/cancel")),
                    0,
                ),
                "cancel",
                g,
            )
            .await;
        match sent {
            Sent::Reply {
                status: 200,
                index,
                body,
                ..
            } => {
                if body["status"] != "canceled" {
                    self.violation(format!("cancel of {cid} answered 200 with {body}"));
                }
                self.last_write = self.last_write.max(index.unwrap_or(0));
                self.history
                    .complete(p, Outcome::Ok(Ret::Command(CmdRet::Canceled)), index);
            }
            Sent::Reply {
                status: 409,
                index,
                body,
                ..
            } => {
                let detail = body["detail"].as_str().unwrap_or("");
                let st = detail
                    .split("already finished (")
                    .nth(1)
                    .and_then(|s| s.split(')').next())
                    .and_then(Status::parse);
                self.history
                    .complete(p, Outcome::Ok(Ret::Command(CmdRet::Finished(st))), index);
            }
            Sent::Reply {
                status: 404,
                index,
                body,
                ..
            } if body["type"] == "urn:entente:problem:not-found" => {
                self.history
                    .complete(p, Outcome::Ok(Ret::Command(CmdRet::NotFound)), index)
            }
            Sent::Reply { status, body, .. } => {
                let o = write_failure(status, &body);
                self.finish_failed(p, o);
            }
            Sent::NotSent(e) => self.history.complete(p, Outcome::Fail(e), None),
            Sent::Unknown(e) => self.finish_failed(p, Outcome::Unknown(e)),
        }
    }

    /// A device whose shadow this client uses next.
    fn pick_shadow(&mut self) -> Option<String> {
        let mut w = self.world.lock().expect("world");
        let all: Vec<String> = w
            .live
            .iter()
            .chain(w.offline.iter())
            .chain(w.registered.iter())
            .filter(|d| *w.shadow_ops.get(*d).unwrap_or(&0) < MAX_SHADOW_OPS)
            .take(HOT)
            .cloned()
            .collect();
        if all.is_empty() {
            return None;
        }
        let d = self.rng.pick(&all).clone();
        *w.shadow_ops.entry(d.clone()).or_insert(0) += 1;
        Some(d)
    }

    async fn write_shadow(&mut self) {
        let Some(device) = self.pick_shadow() else {
            return;
        };
        let value = self.world.lock().expect("world").next();
        let seen = self.versions.get(&device).copied();
        let expect = match (seen, self.rng.weighted(&[70, 10, 20])) {
            (Some(v), 0) => Some(v),
            (Some(v), 1) => Some(v.saturating_sub(1 + self.rng.below(2))),
            (None, 0 | 1) => Some(0),
            _ => None,
        };
        let g = self.gateway();
        let kind = if expect.is_some() {
            "write-shadow+if-match"
        } else {
            "write-shadow"
        };
        let p = self.invoke(
            0,
            Obj::Shadow(device.clone()),
            Op::Shadow(ShadowOp::Write { expect, value }),
            kind,
            g,
            true,
            None,
        );
        let mut headers = HeaderMap::new();
        if let Some(v) = expect {
            headers.insert(IF_MATCH, format!("\"{v}\"").parse().expect("header"));
        }
        let sent = self
            .send(
                self.req(
                    reqwest::Method::PATCH,
                    self.url(g, &format!("/v1/devices/{device}/shadow")),
                    0,
                )
                .headers(headers)
                .json(&json!({ "desired": { "x": value } })),
                kind,
                g,
            )
            .await;
        match sent {
            Sent::Reply {
                status: 200,
                index,
                body,
                ..
            } => {
                let version = body["version"].as_u64().unwrap_or(0);
                if body["desired"]["x"] != value {
                    self.violation(format!(
                        "shadow write of x={value} on {device} answered with {body}"
                    ));
                }
                self.versions.insert(device, version);
                self.last_write = self.last_write.max(index.unwrap_or(0));
                self.history.complete(
                    p,
                    Outcome::Ok(Ret::Shadow(ShadowRet::Written { version })),
                    index,
                );
            }
            Sent::Reply {
                status: 412,
                index,
                body,
                ..
            } => {
                let current = body["current_version"].as_u64().unwrap_or(u64::MAX);
                self.versions.insert(device, current);
                self.last_write = self.last_write.max(index.unwrap_or(0));
                self.history.complete(
                    p,
                    Outcome::Ok(Ret::Shadow(ShadowRet::Mismatch { current })),
                    index,
                );
            }
            Sent::Reply {
                status: 404, body, ..
            } if body["type"] == "urn:entente:problem:not-found" => {
                self.history.complete(p, Outcome::Fail("404".into()), None);
                self.violation(format!(
                    "shadow write on {device} (registered and acknowledged) answered 404"
                ));
            }
            Sent::Reply { status, body, .. } => {
                let o = write_failure(status, &body);
                self.finish_failed(p, o);
            }
            Sent::NotSent(e) => self.history.complete(p, Outcome::Fail(e), None),
            Sent::Unknown(e) => self.finish_failed(p, Outcome::Unknown(e)),
        }
    }

    async fn read_shadow(&mut self) {
        let Some(device) = self.pick_shadow() else {
            return;
        };
        let g = self.gateway();
        let local = self.rng.chance(0.3);
        let min_index = (local && self.rng.chance(0.6)).then_some(self.last_write);
        let kind = match (local, min_index.is_some()) {
            (true, true) => "read-shadow-local+min",
            (true, false) => "read-shadow-local",
            _ => "read-shadow",
        };
        let p = self.invoke(
            0,
            Obj::Shadow(device.clone()),
            Op::Shadow(ShadowOp::Read),
            kind,
            g,
            !local,
            min_index,
        );
        let path = if local {
            format!("/v1/devices/{device}/shadow?consistency=local")
        } else {
            format!("/v1/devices/{device}/shadow")
        };
        let mut req = self.req(reqwest::Method::GET, self.url(g, &path), 0);
        if let Some(m) = min_index {
            req = req.header("entente-min-index", m);
        }
        match self.send(req, kind, g).await {
            Sent::Reply {
                status: 200,
                index,
                body,
                ..
            } => {
                let version = body["version"].as_u64().unwrap_or(u64::MAX);
                let value = body["desired"]["x"].as_u64();
                if !local {
                    self.versions.insert(device, version);
                }
                self.history.complete(
                    p,
                    Outcome::Ok(Ret::Shadow(ShadowRet::Value { version, value })),
                    index,
                );
            }
            Sent::Reply { status, body, .. } => {
                if status == 404 && !local {
                    self.violation(format!(
                        "linearizable shadow read of {device} (registered and acknowledged) answered 404"
                    ));
                }
                self.history
                    .complete(p, Outcome::Fail(format!("{status} {}", body["type"])), None)
            }
            Sent::NotSent(e) | Sent::Unknown(e) => self.history.complete(p, Outcome::Fail(e), None),
        }
    }
}

/// Registers a device before the faults start (retrying while the group
/// settles) and records it as an acknowledged registration. Returns its secret.
pub async fn register_setup_device(
    cluster: &Cluster,
    history: &History,
    id: &str,
) -> Result<String, String> {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tag = format!("setup-{id}-{attempt}");
        let correct = cluster.correct_ids();
        let g = correct[attempt % correct.len()];
        let p = history.invoke(Invoke {
            client: usize::MAX,
            thread: (u64::MAX - 1 - attempt as u64, 0),
            obj: Obj::Device(id.to_string()),
            op: Op::Device(WORegisterOp::Write(tag.clone())),
            kind: "register-setup".into(),
            gateway: g,
            linearizable: true,
            min_index: None,
        });
        let sent = call(
            http.post(format!("{}/v1/devices", cluster.node(g).base()))
                .bearer_auth(&cluster.token)
                .timeout(Duration::from_secs(10))
                .json(&json!({ "id": id, "labels": { "op": tag } })),
        )
        .await;
        match sent {
            Sent::Reply {
                status: 201,
                index,
                body,
                ..
            } => {
                history.complete(p, Outcome::Ok(Ret::Device(WORegisterRet::WriteOk)), index);
                return Ok(body["secret"].as_str().unwrap_or("").to_string());
            }
            Sent::Reply {
                status: 409, index, ..
            } => {
                // An earlier attempt whose answer was lost created it: a new
                // secret replaces the lost one.
                history.complete(p, Outcome::Ok(Ret::Device(WORegisterRet::WriteFail)), index);
                let r = http
                    .post(format!("{}/v1/devices/{id}/secret", cluster.node(g).base()))
                    .bearer_auth(&cluster.token)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == 200
                    && let Ok(b) = r.json::<Value>().await
                {
                    return Ok(b["secret"].as_str().unwrap_or("").to_string());
                }
            }
            Sent::Reply { status, body, .. } => {
                let o = write_failure(status, &body);
                history.complete(p, o, None);
            }
            Sent::NotSent(e) => history.complete(p, Outcome::Fail(e), None),
            Sent::Unknown(e) => history.complete(p, Outcome::Unknown(e), None),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("could not register {id}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
