//! `device-sim ingest`: MQTT ingest throughput. N clients publish QoS 1
//! JSON messages of about `payload_bytes` to their own
//! `devices/{id}/shadow/reported`, and the benchmark counts PUBACKs and
//! times publish → PUBACK.
//!
//! - Closed loop (default): each client keeps `inflight` messages
//!   unacknowledged, sending the next as soon as one is acknowledged; the
//!   latency runs from the hand-over to the MQTT client to the PUBACK.
//! - Open loop (`rate`): each client has a fixed schedule (`rate / N` per
//!   second, clients offset evenly); a message that cannot go on time
//!   (window full) waits, and its latency runs from its intended time.
//!
//! Against Entente the clients are registered devices; with anonymous
//! settings the same code measures any broker (e.g. Mosquitto) on the same
//! topics. Only acknowledgements inside the measured window count.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use entente_protocol::reported_topic;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::mqtt::{BrokerAddr, ClientSettings, Ev, Link, Protocol, Tls, new_client};
use crate::rng::Rng;
use crate::sleep_until_opt;
use crate::stats::{Latency, LatencySummary, per_sec};

/// Latencies a client collects before adding them to the shared histogram.
const LATENCY_BATCH: usize = 256;

/// An ingest client: id and, for Entente, its secret.
#[derive(Debug, Clone)]
pub struct IngestClient {
    /// Client id (and topic device id).
    pub id: String,
    /// Password (username = id); `None` connects anonymously.
    pub secret: Option<String>,
}

/// An ingest benchmark's settings.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Broker addresses; client `i` uses `i % len`.
    pub brokers: Vec<BrokerAddr>,
    /// MQTT version.
    pub protocol: Protocol,
    /// Unacknowledged messages per client.
    pub inflight: u16,
    /// Total messages per second (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Measured time.
    pub duration: Duration,
    /// Approximate payload size.
    pub payload_bytes: usize,
    /// Connection attempts at once.
    pub connect_concurrency: usize,
    /// Longest wait for all clients to connect.
    pub connect_timeout: Duration,
    /// Longest wait of one connection attempt for its CONNACK.
    pub attempt_timeout: Duration,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Show a progress bar.
    pub progress: bool,
    /// Seed (jitter of reconnects).
    pub seed: u64,
    /// TLS towards the brokers, if set.
    pub tls: Option<Tls>,
}

/// What an ingest run measured.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    /// MQTT version.
    pub protocol: Protocol,
    /// `closed loop, N in flight per client` or `open loop at R/s`.
    pub mode: String,
    /// Clients started.
    pub clients: usize,
    /// Clients connected when the measurement began.
    pub connected: u64,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// Measured seconds.
    pub duration_secs: f64,
    /// Messages handed to the clients in the window.
    pub sent: u64,
    /// PUBACKs received in the window.
    pub acked: u64,
    /// `acked / duration`.
    pub acked_per_sec: f64,
    /// Publish → PUBACK (from the intended time in open loop), ms.
    pub latency: LatencySummary,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// The last error seen, if any.
    pub last_error: Option<String>,
    /// Reported patches the gateways received meanwhile (Entente only,
    /// filled by the caller).
    pub gateway_reports_received: Option<f64>,
    /// `ReportState` proposals the gateways made of them.
    pub gateway_report_proposals: Option<f64>,
}

impl IngestReport {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let w = 18;
        let mut s = format!(
            "ingest           {} clients ({} connected), {:?}, {}, {} B payloads, {:.1} s\n",
            self.clients,
            self.connected,
            self.protocol,
            self.mode,
            self.payload_bytes,
            self.duration_secs
        );
        s.push_str(&format!(
            "messages         sent {}, acked {} ({:.0}/s)\n",
            self.sent, self.acked, self.acked_per_sec
        ));
        s.push_str(&LatencySummary::header(w));
        s.push('\n');
        s.push_str(&self.latency.row("publish→puback", w));
        s.push('\n');
        if let (Some(r), Some(p)) = (self.gateway_reports_received, self.gateway_report_proposals) {
            let ratio = if p > 0.0 { r / p } else { 0.0 };
            s.push_str(&format!(
                "gateway reports  received {r:.0}, proposals {p:.0} ({ratio:.2} patches/proposal)\n"
            ));
        }
        if self.errors.is_empty() {
            s.push_str("errors           none\n");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            s.push_str(&format!(
                "errors           {} (last: {})\n",
                list.join(", "),
                self.last_error.as_deref().unwrap_or("-")
            ));
        }
        s
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// Set when the measured window ends.
    stopped: AtomicBool,
    connected: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    latency: Mutex<Latency>,
    errors: Mutex<BTreeMap<String, u64>>,
    last_error: Mutex<Option<String>>,
    changed: Notify,
}

impl Shared {
    fn error(&self, kind: &str, detail: &str) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(kind.to_string()).or_default() += 1;
        }
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(detail.to_string());
        }
    }

    fn record(&self, batch: &mut Vec<u64>) {
        if let Ok(mut h) = self.latency.lock() {
            h.record_us(batch);
        }
        batch.clear();
    }
}

/// A JSON message of about `size` bytes.
pub fn payload(seq: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"seq\":{seq},\"temperature\":21.5,\"battery\":87,\"pad\":\"");
    let fill = size.saturating_sub(head.len() + 2);
    let mut p = head.into_bytes();
    p.extend(std::iter::repeat_n(b'x', fill));
    p.extend_from_slice(b"\"}");
    p
}

/// Runs the benchmark with `clients`.
pub async fn run(cfg: &IngestConfig, clients: &[IngestClient]) -> Result<IngestReport> {
    if clients.is_empty() || cfg.brokers.is_empty() {
        bail!("ingest needs at least one client and one broker address");
    }
    if let Some(r) = cfg.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number of messages per second");
    }
    let shared = Arc::new(Shared::default());
    let gate = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let settings = ClientSettings {
            protocol: cfg.protocol,
            client_id: c.id.clone(),
            credentials: c.secret.clone().map(|s| (c.id.clone(), s)),
            keep_alive: cfg.keep_alive,
            clean_session: false,
            inflight: cfg.inflight.max(1),
            channel_capacity: usize::from(cfg.inflight.max(1)),
            attempt_timeout: cfg.attempt_timeout,
            tls: cfg.tls.clone(),
        };
        let client = ClientRun {
            shared: shared.clone(),
            settings,
            addr: cfg.brokers[i % cfg.brokers.len()].clone(),
            topic: reported_topic(&c.id),
            gate: gate.clone(),
            inflight: usize::from(cfg.inflight.max(1)),
            interval: cfg
                .rate
                .map(|r| Duration::from_secs_f64(clients.len() as f64 / r)),
            offset: i as f64 / clients.len() as f64,
            payload_bytes: cfg.payload_bytes,
            rng: Rng::derive(cfg.seed, i as u64),
        };
        tasks.spawn(client.run(start_rx.clone(), stop_rx.clone()));
    }

    // Everyone connects first; the measurement starts together.
    let deadline = Instant::now() + cfg.connect_timeout;
    loop {
        let n = shared.changed.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if shared.connected.load(Ordering::Relaxed) >= clients.len() as u64 {
            break;
        }
        if tokio::time::timeout_at(deadline, n).await.is_err() {
            break;
        }
    }
    let connected = shared.connected.load(Ordering::Relaxed);
    if connected == 0 {
        let _ = stop_tx.send(true);
        let last = shared.last_error.lock().ok().and_then(|l| l.clone());
        bail!(
            "no client could connect within {:.0} s (last error: {})",
            cfg.connect_timeout.as_secs_f64(),
            last.as_deref().unwrap_or("none")
        );
    }
    let t0 = Instant::now();
    let _ = start_tx.send(Some(t0));
    let bar = if cfg.progress {
        let b = ProgressBar::new(cfg.duration.as_secs().max(1));
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        ProgressBar::hidden()
    };
    let end = t0 + cfg.duration;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            _ = tick.tick() => {
                let secs = t0.elapsed().as_secs_f64();
                let acked = shared.acked.load(Ordering::Relaxed);
                bar.set_position(secs as u64);
                bar.set_message(format!("acked {acked} ({:.0}/s)", per_sec(acked, secs)));
            }
        }
    }
    shared.stopped.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let measured = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let drain = Instant::now() + Duration::from_secs(3);
    while let Ok(Some(_)) = tokio::time::timeout_at(drain, tasks.join_next()).await {}
    tasks.abort_all();
    let acked = shared.acked.load(Ordering::Relaxed);
    let sent = shared.sent.load(Ordering::Relaxed);

    let latency = shared
        .latency
        .lock()
        .map(|h| h.summary())
        .unwrap_or_default();
    Ok(IngestReport {
        protocol: cfg.protocol,
        mode: match cfg.rate {
            Some(r) => format!("open loop at {r:.0} msg/s"),
            None => format!("closed loop, {} in flight per client", cfg.inflight),
        },
        clients: clients.len(),
        connected,
        payload_bytes: payload(0, cfg.payload_bytes).len(),
        duration_secs: measured,
        sent,
        acked,
        acked_per_sec: per_sec(acked, measured),
        latency,
        errors: shared.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        last_error: shared.last_error.lock().ok().and_then(|l| l.clone()),
        gateway_reports_received: None,
        gateway_report_proposals: None,
    })
}

/// One client's run.
struct ClientRun {
    shared: Arc<Shared>,
    settings: ClientSettings,
    addr: BrokerAddr,
    topic: String,
    gate: Arc<Semaphore>,
    inflight: usize,
    interval: Option<Duration>,
    offset: f64,
    payload_bytes: usize,
    rng: Rng,
}

impl ClientRun {
    async fn run(
        mut self,
        mut start: watch::Receiver<Option<Instant>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let (client, conn) = new_client(&self.settings, &self.addr);
        let mut link = Link::new(conn, Some(self.gate.clone()));
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut counted = false;
        // Messages handed over and not yet acknowledged: their send (or
        // intended) times, oldest first.
        let mut ledger: VecDeque<Instant> = VecDeque::new();
        // Open loop: intended times not yet handed over.
        let mut due: VecDeque<Instant> = VecDeque::new();
        let mut batch = Vec::with_capacity(LATENCY_BATCH);
        let mut t0: Option<Instant> = None;
        let mut next_tick: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut seq = 0u64;
        loop {
            if t0.is_some() {
                self.refill(&client, &mut ledger, &mut due, &mut seq);
            }
            let polling = retry_at.is_none();
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                s = start.wait_for(Option::is_some), if t0.is_none() => {
                    let started = s.ok().and_then(|v| *v);
                    t0 = started;
                    if let (Some(t), Some(iv)) = (started, self.interval) {
                        next_tick = Some(t + iv.mul_f64(self.offset));
                    }
                }
                p = link.next(), if polling => match p.event {
                    Ok(Ev::ConnAck { .. }) => {
                        backoff.reset();
                        if !counted {
                            counted = true;
                            self.shared.connected.fetch_add(1, Ordering::Relaxed);
                            self.shared.changed.notify_waiters();
                        }
                    }
                    Ok(Ev::PubAck { .. }) => {
                        // Only acknowledgements inside the window count.
                        if let Some(sent_at) = ledger.pop_front()
                            && t0.is_some()
                            && !self.shared.stopped.load(Ordering::Relaxed)
                        {
                            self.shared.acked.fetch_add(1, Ordering::Relaxed);
                            let us = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                            batch.push(us);
                            if batch.len() >= LATENCY_BATCH {
                                self.shared.record(&mut batch);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let kind = if counted { "connection lost" } else { "connect failed" };
                        self.shared.error(kind, &format!("{}: {e}", self.settings.client_id));
                        retry_at = Some(Instant::now() + backoff.next_delay(&mut self.rng));
                    }
                },
                _ = sleep_until_opt(retry_at) => retry_at = None,
                _ = sleep_until_opt(next_tick) => {
                    if let (Some(mut t), Some(iv)) = (next_tick, self.interval) {
                        let now = Instant::now();
                        while t <= now {
                            due.push_back(t);
                            t += iv;
                        }
                        next_tick = Some(t);
                    }
                }
            }
        }
        self.shared.record(&mut batch);
        let _ = client.try_disconnect();
    }

    /// Hands messages to the client while the window allows.
    fn refill(
        &self,
        client: &crate::mqtt::Client,
        ledger: &mut VecDeque<Instant>,
        due: &mut VecDeque<Instant>,
        seq: &mut u64,
    ) {
        while ledger.len() < self.inflight {
            let stamp = match self.interval {
                Some(_) => match due.front() {
                    Some(t) => *t,
                    None => return,
                },
                None => Instant::now(),
            };
            if client
                .try_publish(&self.topic, &payload(*seq, self.payload_bytes))
                .is_err()
            {
                return;
            }
            if self.interval.is_some() {
                due.pop_front();
            }
            *seq += 1;
            ledger.push_back(stamp);
            self.shared.sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_of_the_asked_size() {
        for size in [10, 100, 1000] {
            let p = payload(42, size);
            let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
            assert_eq!(v["seq"], 42);
            if size >= 100 {
                assert_eq!(p.len(), size);
            }
        }
    }
}
