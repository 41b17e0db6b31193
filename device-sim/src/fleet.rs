//! A fleet of simulated devices in one process: one tokio task per device,
//! each with its own MQTT connection (persistent session, client id =
//! username = device id, password = its secret).
//!
//! Each task owns one [`Device`] of the device library (`entente-device`):
//! the simulator runs what a real device runs — connection, failover with
//! back-off, commands de-duplicated, answers sent until acknowledged,
//! shadow, reports — and adds only the simulated choices
//! ([`crate::device`]: when and how a command ends, random reports) and
//! churn. Connection attempts take a permit of a shared gate
//! (`connect_concurrency`), so 10,000 devices connect without a SYN storm;
//! the devices' traffic is counted in one shared [`Counters`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use entente_device::{Config, Counters, Device, Error, Event, MessageKind};
use entente_protocol::ResultStatus;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::creds::Credentials;
use crate::device::{Behaviour, output, random_report};
use crate::mqtt::{BrokerAddr, Protocol, Tls};
use crate::rng::Rng;
use crate::sleep_until_opt;
use crate::stats::{Latency, LatencySummary};

/// Unacknowledged publishes per device, and the request channel's size:
/// small, because rumqttc sizes per-connection tables by them.
const DEVICE_INFLIGHT: u16 = 8;
/// First reconnect delay.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Commands a device remembers for de-duplication.
const DEDUP_CAPACITY: usize = 64;

/// How the fleet behaves.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// MQTT addresses of the gateways; device `i` starts at `i % len` and
    /// moves to the next one when its connection fails.
    pub gateways: Vec<BrokerAddr>,
    /// MQTT version.
    pub protocol: Protocol,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Connection attempts in progress at once, fleet-wide.
    pub connect_concurrency: usize,
    /// Longest wait of one connection attempt for its CONNACK.
    pub attempt_timeout: Duration,
    /// How devices answer commands.
    pub behaviour: Behaviour,
    /// Random state reports per device per second.
    pub report_rate: f64,
    /// Random disconnects per device per second.
    pub churn_rate: f64,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Told the first time any device sees a command (bench uses it).
    pub observer: Option<mpsc::UnboundedSender<CommandSeen>>,
    /// TLS towards the gateways (their TLS listeners), if set.
    pub tls: Option<Tls>,
}

impl FleetConfig {
    /// Defaults: MQTT 3.1.1, 30 s keep-alive, 200 connects at once (each
    /// given 30 s), results
    /// after 10 ms, no failures, reports or churn, backoff up to 5 s, seed 1.
    pub fn new(gateways: Vec<BrokerAddr>) -> FleetConfig {
        FleetConfig {
            gateways,
            protocol: Protocol::V4,
            keep_alive: Duration::from_secs(30),
            connect_concurrency: 200,
            attempt_timeout: Duration::from_secs(30),
            behaviour: Behaviour {
                result_delay: Duration::from_millis(10),
                failure_rate: 0.0,
            },
            report_rate: 0.0,
            churn_rate: 0.0,
            backoff_max: Duration::from_secs(5),
            seed: 1,
            observer: None,
            tls: None,
        }
    }
}

/// A device saw a command for the first time.
#[derive(Debug, Clone)]
pub struct CommandSeen {
    /// Command id.
    pub cid: String,
    /// When the device got it.
    pub at: Instant,
}

/// Live counters of a fleet (all devices together).
#[derive(Debug)]
pub struct FleetStats {
    epoch: Instant,
    devices: u64,
    connected: AtomicU64,
    subscribed: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    connect_errors: AtomicU64,
    churned: AtomicU64,
    initially_connected: AtomicU64,
    initially_subscribed: AtomicU64,
    first_connect_ns: AtomicU64,
    last_initial_connack_ns: AtomicU64,
    commands_received: AtomicU64,
    commands_duplicate: AtomicU64,
    results_succeeded: AtomicU64,
    results_failed: AtomicU64,
    ignored_messages: AtomicU64,
    subscriptions_refused: AtomicU64,
    /// What the devices sent and had acknowledged, by the library.
    counters: Arc<Counters>,
    last_error: Mutex<Option<String>>,
    /// Each device's first connection: connect attempt → CONNACK.
    connect_latency: Mutex<Latency>,
    changed: Notify,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetSnapshot {
    /// Devices in the fleet.
    pub devices: u64,
    /// Devices connected now.
    pub connected: u64,
    /// Devices whose subscription is in force now.
    pub subscribed: u64,
    /// Successful connections (CONNACKs), reconnections included.
    pub connects: u64,
    /// Connections lost or closed after CONNACK.
    pub disconnects: u64,
    /// Connection attempts that failed before CONNACK.
    pub connect_errors: u64,
    /// Random disconnects made (churn).
    pub churned: u64,
    /// Devices that connected at least once.
    pub initially_connected: u64,
    /// Devices whose subscription was in force at least once.
    pub initially_subscribed: u64,
    /// Commands seen for the first time.
    pub commands_received: u64,
    /// Redelivered commands (deduplicated).
    pub commands_duplicate: u64,
    /// Results published as `succeeded`.
    pub results_succeeded: u64,
    /// Results published as `failed`.
    pub results_failed: u64,
    /// `accepted` messages published / acknowledged by the broker.
    pub accepted_sent: u64,
    /// See `accepted_sent`.
    pub accepted_acked: u64,
    /// `result` messages published / acknowledged.
    pub results_sent: u64,
    /// See `results_sent`.
    pub results_acked: u64,
    /// `shadow/reported` messages published / acknowledged.
    pub reports_sent: u64,
    /// See `reports_sent`.
    pub reports_acked: u64,
    /// Incoming messages the devices could not use.
    pub ignored_messages: u64,
    /// SUBACKs that refused a filter.
    pub subscriptions_refused: u64,
    /// The last connection error, if any.
    pub last_error: Option<String>,
}

fn ns_since(epoch: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

impl FleetStats {
    fn new(devices: usize) -> FleetStats {
        FleetStats {
            epoch: Instant::now(),
            devices: devices as u64,
            connected: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            churned: AtomicU64::new(0),
            initially_connected: AtomicU64::new(0),
            initially_subscribed: AtomicU64::new(0),
            first_connect_ns: AtomicU64::new(u64::MAX),
            last_initial_connack_ns: AtomicU64::new(0),
            commands_received: AtomicU64::new(0),
            commands_duplicate: AtomicU64::new(0),
            results_succeeded: AtomicU64::new(0),
            results_failed: AtomicU64::new(0),
            ignored_messages: AtomicU64::new(0),
            subscriptions_refused: AtomicU64::new(0),
            counters: Arc::new(Counters::default()),
            last_error: Mutex::new(None),
            connect_latency: Mutex::new(Latency::new()),
            changed: Notify::new(),
        }
    }

    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn drop_one(c: &AtomicU64) {
        // Saturating: never wraps even if a decrement races an increment.
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    fn note_error(&self, e: &str) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.to_string());
        }
    }

    /// Devices connected now.
    pub fn connected(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// Devices whose subscriptions are in force now.
    pub fn subscribed(&self) -> u64 {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// The first connection phase: from the first CONNECT attempt to the
    /// CONNACK of the last device to connect for the first time, and how
    /// many devices that covers. `None` before any device connected.
    pub fn connect_window(&self) -> Option<(Duration, u64)> {
        let first = self.first_connect_ns.load(Ordering::Relaxed);
        let last = self.last_initial_connack_ns.load(Ordering::Relaxed);
        let n = self.initially_connected.load(Ordering::Relaxed);
        if first == u64::MAX || n == 0 {
            return None;
        }
        Some((Duration::from_nanos(last.saturating_sub(first)), n))
    }

    /// How long each device's first successful connection attempt took,
    /// from the start of the attempt (connect gate passed) to its CONNACK.
    pub fn connect_latency(&self) -> LatencySummary {
        self.connect_latency
            .lock()
            .map(|l| l.summary())
            .unwrap_or_default()
    }

    /// The counters now.
    pub fn snapshot(&self) -> FleetSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        let (acc, res, rep) = (
            MessageKind::Accepted,
            MessageKind::Result,
            MessageKind::Reported,
        );
        FleetSnapshot {
            devices: self.devices,
            connected: l(&self.connected),
            subscribed: l(&self.subscribed),
            connects: l(&self.connects),
            disconnects: l(&self.disconnects),
            connect_errors: l(&self.connect_errors),
            churned: l(&self.churned),
            initially_connected: l(&self.initially_connected),
            initially_subscribed: l(&self.initially_subscribed),
            commands_received: l(&self.commands_received),
            commands_duplicate: l(&self.commands_duplicate),
            results_succeeded: l(&self.results_succeeded),
            results_failed: l(&self.results_failed),
            accepted_sent: c.sent(acc),
            accepted_acked: c.delivered(acc),
            results_sent: c.sent(res),
            results_acked: c.delivered(res),
            reports_sent: c.sent(rep),
            reports_acked: c.delivered(rep),
            ignored_messages: l(&self.ignored_messages),
            subscriptions_refused: l(&self.subscriptions_refused),
            last_error: self.last_error.lock().ok().and_then(|g| g.clone()),
        }
    }
}

/// Fleet-wide settings and state every device task shares.
#[derive(Debug)]
struct Shared {
    config: FleetConfig,
    /// The gateways, shared by every device's configuration.
    gateways: Arc<[BrokerAddr]>,
    stats: Arc<FleetStats>,
    gate: Arc<Semaphore>,
}

/// Asks one device to change its connection state.
#[derive(Debug)]
enum Control {
    /// Disconnect and stay offline; answered once offline.
    Disconnect(oneshot::Sender<()>),
    /// Connect again; answered once subscribed.
    Connect(oneshot::Sender<()>),
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    controls: Vec<mpsc::Sender<Control>>,
    stats: Arc<FleetStats>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts one task per device; they connect at once (bounded by
    /// `connect_concurrency`). Needs a tokio runtime.
    pub fn start(config: FleetConfig, devices: &[Credentials]) -> Result<Fleet> {
        if config.gateways.is_empty() {
            bail!("the fleet needs at least one gateway MQTT address");
        }
        let stats = Arc::new(FleetStats::new(devices.len()));
        let shared = Arc::new(Shared {
            gateways: config.gateways.clone().into(),
            gate: Arc::new(Semaphore::new(config.connect_concurrency.max(1))),
            config,
            stats: stats.clone(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut controls = Vec::with_capacity(devices.len());
        for (i, creds) in devices.iter().enumerate() {
            let (tx, rx) = mpsc::channel(4);
            controls.push(tx);
            let task = DeviceTask::new(shared.clone(), i, creds)?;
            tasks.spawn(task.run(rx, shutdown_rx.clone()));
        }
        Ok(Fleet {
            controls,
            stats,
            shutdown,
            tasks,
        })
    }

    /// Devices in the fleet.
    pub fn len(&self) -> usize {
        self.controls.len()
    }

    /// Whether the fleet has no devices.
    pub fn is_empty(&self) -> bool {
        self.controls.is_empty()
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<FleetStats> {
        &self.stats
    }

    /// Waits until at least `n` devices are connected with their
    /// subscriptions in force at once, or fails after `timeout` saying how
    /// far it got. (With churn, use [`Fleet::wait_ready`].)
    pub async fn wait_subscribed(&self, n: usize, timeout: Duration) -> Result<()> {
        self.wait_for(n, timeout, FleetStats::subscribed).await
    }

    /// Waits until at least `n` devices have each been connected and
    /// subscribed at least once (they may have churned since), or fails
    /// after `timeout` saying how far it got.
    pub async fn wait_ready(&self, n: usize, timeout: Duration) -> Result<()> {
        self.wait_for(n, timeout, |s| {
            s.initially_subscribed.load(Ordering::Relaxed)
        })
        .await
    }

    async fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
        count: fn(&FleetStats) -> u64,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.stats.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if count(&self.stats) >= n as u64 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let s = self.stats.snapshot();
                bail!(
                    "only {} of {n} devices connected and subscribed within {:.1} s \
                     ({} connect errors; last error: {})",
                    count(&self.stats),
                    timeout.as_secs_f64(),
                    s.connect_errors,
                    s.last_error.as_deref().unwrap_or("none")
                );
            }
        }
    }

    async fn control(&self, i: usize, make: fn(oneshot::Sender<()>) -> Control) -> Result<()> {
        let ctl = self
            .controls
            .get(i)
            .with_context(|| format!("no device #{i} (the fleet has {})", self.len()))?;
        let (tx, rx) = oneshot::channel();
        ctl.send(make(tx))
            .await
            .map_err(|_| anyhow::anyhow!("device #{i} has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("device #{i} stopped before answering"))
    }

    /// Disconnects device `i` and keeps it offline; returns once its
    /// connection is closed.
    pub async fn disconnect(&self, i: usize) -> Result<()> {
        self.control(i, Control::Disconnect).await
    }

    /// Reconnects device `i`; returns once its subscriptions are in force.
    pub async fn connect(&self, i: usize) -> Result<()> {
        self.control(i, Control::Connect).await
    }

    /// Disconnects every device (DISCONNECT, waiting up to `grace` for the
    /// broker to close) and ends the tasks.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let deadline = Instant::now() + grace + Duration::from_secs(1);
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await {}
        self.tasks.abort_all();
    }
}

/// A command answered after the simulated delay.
#[derive(Debug)]
struct PendingResult {
    due: Instant,
    cid: Box<str>,
    status: ResultStatus,
}

/// One device's task state: the library's device and the simulation.
struct DeviceTask {
    shared: Arc<Shared>,
    device: Device,
    pending: VecDeque<PendingResult>,
    rng: Rng,
    next_report: Option<Instant>,
    next_churn: Option<Instant>,
    connected: bool,
    subscribed: bool,
    offline_acks: Vec<oneshot::Sender<()>>,
    online_acks: Vec<oneshot::Sender<()>>,
    ever_connected: bool,
    ever_subscribed: bool,
}

/// When a result that found the device's queue full is tried again.
const RETRY_FULL: Duration = Duration::from_millis(50);

impl DeviceTask {
    fn new(shared: Arc<Shared>, index: usize, creds: &Credentials) -> Result<DeviceTask> {
        let c = &shared.config;
        let mut config =
            Config::with_addresses(&creds.id, Some(&creds.secret), shared.gateways.clone());
        config.first_gateway = index % c.gateways.len().max(1);
        config.protocol = c.protocol;
        config.tls = c.tls.clone();
        config.keep_alive = c.keep_alive;
        config.attempt_timeout = c.attempt_timeout;
        config.backoff_base = BACKOFF_BASE;
        config.backoff_max = c.backoff_max;
        config.inflight = DEVICE_INFLIGHT;
        config.channel_capacity = DEVICE_INFLIGHT as usize;
        config.dedup_capacity = DEDUP_CAPACITY;
        config.seed = Rng::derive(c.seed, 2 * index as u64).next_u64();
        config.connect_gate = Some(shared.gate.clone());
        config.counters = Some(shared.stats.counters.clone());
        let device = Device::new(config).with_context(|| format!("device {}", creds.id))?;
        Ok(DeviceTask {
            rng: Rng::derive(c.seed, 2 * index as u64 + 1),
            shared,
            device,
            pending: VecDeque::new(),
            next_report: None,
            next_churn: None,
            connected: false,
            subscribed: false,
            offline_acks: Vec::new(),
            online_acks: Vec::new(),
            ever_connected: false,
            ever_subscribed: false,
        })
    }

    fn stats(&self) -> &FleetStats {
        &self.shared.stats
    }

    async fn run(mut self, mut ctl: mpsc::Receiver<Control>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let due = self.pending.front().map(|p| p.due);
            let report = self.next_report.filter(|_| self.connected);
            let churn = self.next_churn.filter(|_| self.connected);
            // One timer for the three (each is ~100 bytes of every idle
            // device's task).
            let timer = [due, report, churn].into_iter().flatten().min();
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                c = ctl.recv() => match c {
                    Some(c) => self.control(c),
                    None => break,
                },
                e = self.device.next_event() => self.on_event(e),
                _ = sleep_until_opt(timer) => {
                    let now = Instant::now();
                    if due.is_some_and(|t| t <= now) {
                        self.results_due();
                    }
                    if report.is_some_and(|t| t <= now) {
                        self.report();
                    }
                    if churn.is_some_and(|t| t <= now) {
                        self.churn();
                    }
                }
            }
        }
        self.finish().await;
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Disconnect(ack) => {
                self.device.disconnect();
                if self.device.is_parked() {
                    let _ = ack.send(());
                } else {
                    // The CONNACK (then DISCONNECT) or the loss will come.
                    self.offline_acks.push(ack);
                }
            }
            Control::Connect(ack) => {
                self.device.connect();
                if self.device.is_subscribed() {
                    let _ = ack.send(());
                } else {
                    self.online_acks.push(ack);
                }
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        let now = Instant::now();
        match e {
            Event::Connected(c) => {
                if !self.ever_connected {
                    let stats = self.stats();
                    stats
                        .first_connect_ns
                        .fetch_min(ns_since(stats.epoch, c.started), Ordering::Relaxed);
                    if let Ok(mut l) = stats.connect_latency.lock() {
                        l.record(c.took);
                    }
                }
                self.on_connack(now);
            }
            Event::Subscribed => self.on_suback(),
            Event::Disconnected(d) => {
                if !self.ever_connected
                    && let Some(t) = d.attempt_started
                {
                    let stats = self.stats();
                    stats
                        .first_connect_ns
                        .fetch_min(ns_since(stats.epoch, t), Ordering::Relaxed);
                }
                self.on_lost(&d.error, d.was_connected, d.retry_in.is_none());
            }
            Event::Command(cmd) => {
                let stats = &self.shared.stats;
                FleetStats::bump(&stats.commands_received);
                let status = self
                    .shared
                    .config
                    .behaviour
                    .outcome(&cmd.params, &mut self.rng);
                if let Err(e) = self.device.accept(&cmd.id) {
                    stats.note_error(&format!("{}: {e}", self.device.id()));
                }
                self.pending.push_back(PendingResult {
                    due: now + self.shared.config.behaviour.result_delay,
                    cid: cmd.id.as_str().into(),
                    status,
                });
                if let Some(obs) = &self.shared.config.observer {
                    let _ = obs.send(CommandSeen {
                        cid: cmd.id,
                        at: now,
                    });
                }
            }
            Event::Duplicate(_) => FleetStats::bump(&self.stats().commands_duplicate),
            Event::Ignored(_) => FleetStats::bump(&self.stats().ignored_messages),
            Event::Delta(d) => {
                if let Err(e) = self.device.report(serde_json::Value::Object(d.state)) {
                    self.stats()
                        .note_error(&format!("{}: {e}", self.device.id()));
                }
            }
            Event::Refused(e) => {
                if matches!(e, Error::SubscriptionRefused { .. }) {
                    FleetStats::bump(&self.stats().subscriptions_refused);
                }
                self.stats()
                    .note_error(&format!("{}: {e}", self.device.id()));
            }
            Event::Delivered { .. } => {}
        }
    }

    fn on_connack(&mut self, now: Instant) {
        let stats = &self.shared.stats;
        FleetStats::bump(&stats.connects);
        FleetStats::bump(&stats.connected);
        self.connected = true;
        self.subscribed = false;
        if !self.ever_connected {
            self.ever_connected = true;
            FleetStats::bump(&stats.initially_connected);
            stats
                .last_initial_connack_ns
                .fetch_max(ns_since(stats.epoch, now), Ordering::Relaxed);
        }
        stats.changed.notify_waiters();
        let c = &self.shared.config;
        self.next_report = self.rng.exp_interval(c.report_rate).map(|d| now + d);
        self.next_churn = self.rng.exp_interval(c.churn_rate).map(|d| now + d);
    }

    fn on_suback(&mut self) {
        let stats = &self.shared.stats;
        if self.connected && !self.subscribed {
            self.subscribed = true;
            FleetStats::bump(&stats.subscribed);
            if !self.ever_subscribed {
                self.ever_subscribed = true;
                FleetStats::bump(&stats.initially_subscribed);
            }
            stats.changed.notify_waiters();
        }
        for ack in self.online_acks.drain(..) {
            let _ = ack.send(());
        }
    }

    fn on_lost(&mut self, error: &Error, was_connected: bool, parked: bool) {
        let stats = &self.shared.stats;
        if was_connected {
            FleetStats::drop_one(&stats.connected);
            if self.subscribed {
                FleetStats::drop_one(&stats.subscribed);
            }
            FleetStats::bump(&stats.disconnects);
        } else {
            FleetStats::bump(&stats.connect_errors);
            stats.note_error(&format!("{}: {error}", self.device.id()));
        }
        self.connected = false;
        self.subscribed = false;
        stats.changed.notify_waiters();
        if parked {
            for ack in self.offline_acks.drain(..) {
                let _ = ack.send(());
            }
        }
    }

    fn results_due(&mut self) {
        let now = Instant::now();
        while self.pending.front().is_some_and(|p| p.due <= now) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let out = output(p.status);
            let done = match p.status {
                ResultStatus::Succeeded => self.device.succeed(&p.cid, out),
                ResultStatus::Failed => self.device.fail(&p.cid, out),
            };
            match done {
                Ok(()) => {
                    let counter = match p.status {
                        ResultStatus::Succeeded => &self.shared.stats.results_succeeded,
                        ResultStatus::Failed => &self.shared.stats.results_failed,
                    };
                    FleetStats::bump(counter);
                }
                Err(Error::QueueFull(_)) => {
                    // Answered once the gateway has taken some of the rest.
                    self.pending.push_front(PendingResult {
                        due: now + RETRY_FULL,
                        ..p
                    });
                    break;
                }
                Err(e) => self
                    .stats()
                    .note_error(&format!("{}: {e}", self.device.id())),
            }
        }
    }

    fn report(&mut self) {
        if let Some(patch) = random_report(self.device.desired(), &mut self.rng)
            && let Err(e) = self.device.report(patch)
        {
            self.stats()
                .note_error(&format!("{}: {e}", self.device.id()));
        }
        let rate = self.shared.config.report_rate;
        self.next_report = self.rng.exp_interval(rate).map(|d| Instant::now() + d);
    }

    fn churn(&mut self) {
        FleetStats::bump(&self.shared.stats.churned);
        self.next_churn = None;
        self.device.reconnect();
    }

    /// Shutdown: DISCONNECT if connected, and wait briefly for the close.
    async fn finish(self) {
        let stats = self.shared.clone();
        let (connected, subscribed) = (self.connected, self.subscribed);
        self.device.close(Duration::from_secs(2)).await;
        if connected {
            FleetStats::drop_one(&stats.stats.connected);
            if subscribed {
                FleetStats::drop_one(&stats.stats.subscribed);
            }
        }
    }
}
