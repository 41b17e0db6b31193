//! The session manager: one task that owns this gateway's device sessions.
//!
//! It hears the connections' codecs ([`SessionEvent`]) and the state
//! database's typed change feed ([`Change`]), and
//! - replicates presence (one task per session proposes `online`, then, after
//!   the session ended, `offline`, so the two never commit out of order);
//! - delivers to a device, once its SUBSCRIBE took effect, every command
//!   still queued or sent for it, its desired document and its delta;
//! - publishes each newly issued command to the device holding a session
//!   here (and proposes `CommandSent` for it after [`SENT_AFTER`], unless
//!   the device answered first), and the desired document and delta
//!   when the shadow changes (shadow events carry the change: the documents
//!   are read from the state);
//! - ends a session here when its device logged in on another gateway
//!   since (a takeover, as a second login here would be);
//! - passes what devices publish (`accepted`, `result`, reported state) to
//!   [`Ingest`], which proposes it and answers each message once what it
//!   causes is committed (see `ingest`), and polls its proposals.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use coordinator::node::Node;
use entente_protocol::{
    CommandMessage, DevicePublish, ShadowDocument, commands_topic, delta_topic, desired_topic,
    filter_matches,
};
use serde_json::Value;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use super::MqttStats;
use super::auth::Authenticator;
use super::endpoint::{Message, Shared};
use super::ingest::{Ack, Ingest};
use crate::ops::{Command, CommandStatus, Op, OpResult, Shadow};
use crate::shared::{Ended, now_ms, propose_retrying};
use crate::state::{Change, CommandStep, Page, ShadowSide, StateDb};

/// What a connection tells the manager.
#[derive(Debug)]
pub(crate) enum SessionEvent {
    /// A CONNACK was written: the session started.
    Up {
        /// Device id.
        device: String,
        /// Session epoch.
        epoch: u64,
    },
    /// The connection ended.
    Down {
        /// Device id.
        device: String,
        /// Session epoch.
        epoch: u64,
    },
    /// A SUBACK was written: these filters are in force.
    Subscribed {
        /// Device id.
        device: String,
        /// Session epoch.
        epoch: u64,
        /// The filters.
        filters: Vec<String>,
    },
    /// The device published (already checked against its ACL).
    Publish {
        /// Device id.
        device: String,
        /// Session epoch.
        epoch: u64,
        /// Which of its topics.
        kind: DevicePublish,
        /// The payload.
        payload: Bytes,
        /// Its claim on an answer (the acknowledgement, once committed).
        ack: Ack,
    },
}

pub(crate) struct Session {
    epoch: u64,
    filters: Vec<String>,
    /// Dropped when the session ends (or is replaced): its presence task
    /// then proposes `offline`.
    _ended: oneshot::Sender<()>,
    /// Asks the presence task to announce the session again.
    reannounce: Arc<Notify>,
}

impl Session {
    fn wants(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| filter_matches(f, topic))
    }
}

/// The manager's state (see the module docs).
pub(crate) struct Manager {
    pub(crate) node: Node<OpResult>,
    pub(crate) db: Arc<StateDb>,
    pub(crate) node_id: u64,
    pub(crate) stats: Arc<MqttStats>,
    pub(crate) auth: Arc<Authenticator>,
    /// The device endpoint: delivery to the sessions live here.
    pub(crate) endpoint: Arc<Shared>,
    /// Device messages on their way to the group.
    pub(crate) ingest: Ingest,
    pub(crate) sessions: HashMap<String, Session>,
    /// Commands delivered again by the sweep: when next, and how often so far.
    pub(crate) redelivered: HashMap<String, (tokio::time::Instant, u32)>,
    /// Commands published here whose `CommandSent` is due at the given
    /// time unless their device answers first (see [`SENT_AFTER`]).
    pub(crate) sent_due: HashMap<String, tokio::time::Instant>,
    /// The `CommandSent` proposals in flight (at most [`SENT_INFLIGHT`]).
    pub(crate) sent_tasks: tokio::task::JoinSet<()>,
    /// Queued commands a delivery task published (on a device's
    /// subscribe), to be marked `sent` as above: the sending side, given to
    /// each delivery task, and the receiving side, taken by [`Manager::run`].
    pub(crate) published: (
        mpsc::Sender<Vec<String>>,
        Option<mpsc::Receiver<Vec<String>>>,
    ),
    /// Deliveries on subscribe, to the task that makes them in batches
    /// (set by [`Manager::run`]).
    pub(crate) deliveries: Option<mpsc::Sender<Delivery>>,
}

/// What a device that subscribed is to be sent: its open commands, its
/// desired document, its delta (each if its filters cover it).
#[derive(Debug)]
pub(crate) struct Delivery {
    device: String,
    commands: bool,
    desired: bool,
    delta: bool,
}

/// Deliveries waiting for the batching task; past it a delivery runs on a
/// task of its own, as one device's would.
const DELIVERY_QUEUE: usize = 16_384;
/// Devices looked up together: one query finds which of them have open
/// commands (most have none).
const DELIVERY_BATCH: usize = 256;
/// Shadows the outbox's task reads with one query (two 64 KiB documents at
/// most each).
const SHADOW_BATCH: usize = 32;

/// Batches of published command ids waiting for the manager (each batch is
/// one page of a device's queued commands, at most 500).
pub(crate) const PUBLISHED_BATCHES: usize = 64;

/// A command published to a device here is marked `sent` (a committed
/// entry) only if the device has not answered it within this time: a
/// device that accepts at once moves it from `queued` to `accepted`
/// directly, and the command costs one entry less.
pub(crate) const SENT_AFTER: Duration = Duration::from_secs(1);
/// Most commands waiting for their `sent` mark; past it a command is not
/// marked (it stays `queued` until its device answers).
const SENT_DUE_MAX: usize = 65_536;
/// Most `CommandSent` proposals in flight; the rest wait for the next
/// sweep.
const SENT_INFLIGHT: usize = 256;

/// How often the manager looks for commands still waiting for a device
/// connected here (see [`Manager::redeliver_stale`]).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A command unchanged for this long while its device is connected here is
/// delivered again; then again after twice as long, up to [`REDELIVER_MAX`].
const STALE_AFTER: Duration = Duration::from_secs(3);
const REDELIVER_MAX: Duration = Duration::from_secs(300);
/// Most stale commands one sweep looks at.
const SWEEP_LIMIT: u32 = 5_000;

impl Manager {
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<SessionEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut changes = self.db.changes();
        let Some(mut published) = self.published.1.take() else {
            tracing::error!("the MQTT session manager was started twice");
            return;
        };
        let mut restores = self.db.watch_restores();
        // Only with `--report-coalesce-ms`: reported patches that waited
        // long enough for the rest of their device's window.
        // (and device `accepted` messages whose result did not come).
        let hold = super::ingest::ACCEPT_HOLD / 2;
        let every = if self.ingest.coalesce.is_zero() {
            hold
        } else {
            (self.ingest.coalesce / 2).min(hold)
        }
        .max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (stale_tx, mut stale_rx) = mpsc::channel::<Vec<Command>>(1);
        let mut sweeping = false;
        let shadows = Arc::new(ShadowOutbox::default());
        let publisher = tokio::spawn(publish_shadows(
            self.db.clone(),
            self.endpoint.clone(),
            shadows.clone(),
        ));
        let (deliver_tx, deliver_rx) = mpsc::channel(DELIVERY_QUEUE);
        self.deliveries = Some(deliver_tx);
        let deliverer = tokio::spawn(deliver_in_batches(
            self.db.clone(),
            self.endpoint.clone(),
            self.stats.clone(),
            self.published.0.clone(),
            shadows.clone(),
            deliver_rx,
        ));
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                Some(ev) = rx.recv() => self.on_session(ev),
                r = changes.recv() => match r {
                    Ok(change) => self.on_change(change, &shadows),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "MQTT sessions lagged behind the state events; re-delivering");
                        self.auth.clear();
                        self.redeliver_all();
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Ok(()) = restores.changed() => {
                    // A snapshot replaced the state: no events say what changed.
                    self.auth.clear();
                    self.redeliver_all();
                }
                _ = tick.tick() => self.ingest.tick(),
                Some(_) = self.sent_tasks.join_next(), if !self.sent_tasks.is_empty() => {}
                Some(cids) = published.recv() => {
                    let at = tokio::time::Instant::now() + SENT_AFTER;
                    for cid in cids {
                        self.mark_sent_at(cid, at);
                    }
                }
                r = self.ingest.tasks.join_next_with_id(), if !self.ingest.tasks.is_empty() => {
                    self.ingest.finished(r);
                }
                _ = sweep.tick() => {
                    self.propose_sent_due();
                    if !sweeping && !self.sessions.is_empty() {
                        sweeping = true;
                        let (db, tx) = (self.db.clone(), stale_tx.clone());
                        tokio::spawn(async move {
                            let before = now_ms()
                                .saturating_sub(STALE_AFTER.as_millis() as u64);
                            let cmds = match db.stale_commands(before, SWEEP_LIMIT).await {
                                Ok(c) => c,
                                Err(e) => {
                                    tracing::warn!(error = %e, "listing commands to deliver again");
                                    Vec::new()
                                }
                            };
                            let _ = tx.send(cmds).await;
                        });
                    }
                }
                Some(cmds) = stale_rx.recv() => {
                    sweeping = false;
                    self.redeliver_stale(cmds);
                }
            }
        }
        // What is still being proposed is abandoned: none of it was
        // acknowledged, and the devices send it again.
        self.ingest.tasks.abort_all();
        self.sent_tasks.abort_all();
        publisher.abort();
        deliverer.abort();
    }

    /// Marks command `cid` `sent` at `at` unless its device answers first
    /// (see [`SENT_AFTER`]); past [`SENT_DUE_MAX`] waiting marks it is not
    /// marked.
    fn mark_sent_at(&mut self, cid: String, at: tokio::time::Instant) {
        if self.sent_due.len() < SENT_DUE_MAX {
            self.sent_due.insert(cid, at);
        }
    }

    /// Proposes `CommandSent` for the commands whose device has not
    /// answered within [`SENT_AFTER`] (at most [`SENT_INFLIGHT`] at once).
    fn propose_sent_due(&mut self) {
        if self.sent_due.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let room = SENT_INFLIGHT.saturating_sub(self.sent_tasks.len());
        let due: Vec<String> = self
            .sent_due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(cid, _)| cid.clone())
            .take(room)
            .collect();
        for cid in due {
            self.sent_due.remove(&cid);
            let (node, op) = (
                self.node.clone(),
                Op::CommandSent {
                    cid,
                    gateway: self.node_id,
                },
            );
            self.sent_tasks
                .spawn(async move { propose_logged(&node, op).await });
        }
    }

    fn set_gauge(&self) {
        self.stats
            .sessions
            .store(self.sessions.len() as u64, Ordering::Relaxed);
    }

    fn on_session(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::Up { device, epoch } => {
                self.stats.sessions_started.fetch_add(1, Ordering::Relaxed);
                let (ended_tx, ended_rx) = oneshot::channel();
                let reannounce = Arc::new(Notify::new());
                tokio::spawn(presence_task(
                    self.node.clone(),
                    device.clone(),
                    self.node_id,
                    epoch,
                    ended_rx,
                    reannounce.clone(),
                ));
                tracing::debug!(device, epoch, "MQTT session started");
                self.sessions.insert(
                    device,
                    Session {
                        epoch,
                        filters: Vec::new(),
                        _ended: ended_tx,
                        reannounce,
                    },
                );
                self.set_gauge();
            }
            SessionEvent::Down { device, epoch } => {
                self.ingest.session_ended(&device, epoch);
                if self.sessions.get(&device).is_some_and(|s| s.epoch == epoch) {
                    self.sessions.remove(&device);
                    tracing::debug!(device, epoch, "MQTT session ended");
                    self.set_gauge();
                }
            }
            SessionEvent::Subscribed {
                device,
                epoch,
                filters,
            } => {
                let Some(s) = self.sessions.get_mut(&device).filter(|s| s.epoch == epoch) else {
                    return;
                };
                let matches = |t: &str| filters.iter().any(|f| filter_matches(f, t));
                let commands = matches(&commands_topic(&device));
                let desired = matches(&desired_topic(&device));
                let delta = matches(&delta_topic(&device));
                s.filters.extend(filters.iter().cloned());
                self.spawn_delivery(device, commands, desired, delta);
            }
            SessionEvent::Publish {
                device,
                epoch,
                kind,
                payload,
                ack,
            } => self.ingest.publish(device, epoch, kind, payload, ack),
        }
    }

    /// Sends a device what it should have: commands still queued or sent,
    /// and/or its desired document and delta — through the batching task
    /// (a fleet that reconnects at once costs a query per hundreds of
    /// devices, not four per device; see [`deliver_batch`]), or on a task
    /// of its own if that one is far behind.
    fn spawn_delivery(&self, device: String, commands: bool, desired: bool, delta: bool) {
        let d = Delivery {
            device,
            commands,
            desired,
            delta,
        };
        let d = match &self.deliveries {
            Some(tx) => match tx.try_send(d) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) => d,
            },
            None => d,
        };
        spawn_one_delivery(
            self.db.clone(),
            self.endpoint.clone(),
            self.stats.clone(),
            self.published.0.clone(),
            d,
        );
    }

    /// Delivers again the commands still `queued`, `sent` or `accepted`
    /// (unchanged for [`STALE_AFTER`]) whose devices hold a session here
    /// subscribed to their commands — whatever happened to the delivery or
    /// to the device's answer before (a leader that died with them, a
    /// subscription that raced the command's commit). Each command is sent
    /// again after `STALE_AFTER`, then twice as long each time, up to
    /// [`REDELIVER_MAX`]; `CommandSent` is proposed for the queued ones (at
    /// the next sweep).
    /// Devices deduplicate by id and repeat their answer.
    fn redeliver_stale(&mut self, cmds: Vec<Command>) {
        let now = tokio::time::Instant::now();
        let mut keep = HashMap::with_capacity(cmds.len());
        for c in cmds {
            let Some(s) = self.sessions.get(&c.device) else {
                continue;
            };
            if !s.wants(&commands_topic(&c.device)) {
                continue;
            }
            let (next, count) = self.redelivered.remove(&c.id).unwrap_or((now, 0));
            if now < next {
                keep.insert(c.id, (next, count));
                continue;
            }
            tracing::debug!(
                device = c.device,
                cid = c.id,
                status = c.status.as_str(),
                "delivering a waiting command again"
            );
            self.stats
                .commands_redelivered
                .fetch_add(1, Ordering::Relaxed);
            publish_command(&self.endpoint, &self.stats, &c);
            if c.status == CommandStatus::Queued {
                // Marked at the next sweep, by the bounded set of tasks.
                self.mark_sent_at(c.id.clone(), now);
            }
            let wait = STALE_AFTER
                .saturating_mul(1 << count.min(5))
                .min(REDELIVER_MAX);
            keep.insert(c.id, (now + wait, count + 1));
        }
        self.redelivered = keep;
    }

    fn redeliver_all(&self) {
        for (device, s) in &self.sessions {
            let commands = s.wants(&commands_topic(device));
            let desired = s.wants(&desired_topic(device));
            let delta = s.wants(&delta_topic(device));
            self.spawn_delivery(device.clone(), commands, desired, delta);
        }
    }

    fn on_change(&mut self, change: Change, shadows: &ShadowOutbox) {
        match change {
            Change::Command(CommandStep::Issued, cmd) => {
                let Some(s) = self.sessions.get(&cmd.device) else {
                    return;
                };
                if cmd.status != CommandStatus::Queued || !s.wants(&commands_topic(&cmd.device)) {
                    return;
                }
                publish_command(&self.endpoint, &self.stats, &cmd);
                self.mark_sent_at(cmd.id, tokio::time::Instant::now() + SENT_AFTER);
            }
            // A job's executions launched: their commands, as issued ones.
            Change::JobLaunched {
                command,
                executions,
                ..
            } => {
                let now = tokio::time::Instant::now();
                for e in executions {
                    let Some(s) = self.sessions.get(&e.device) else {
                        continue;
                    };
                    if !s.wants(&commands_topic(&e.device)) {
                        continue;
                    }
                    let msg = CommandMessage {
                        id: e.command.clone(),
                        name: command.name.clone(),
                        params: command.params.clone(),
                        issued_at: command.issued_at,
                        expires_at: command.expires_at,
                    };
                    publish_message(&self.endpoint, &self.stats, &e.device, &msg);
                    self.mark_sent_at(e.command, now + SENT_AFTER);
                }
            }
            // Answered (or canceled) before its `sent` was due: that mark
            // would say less than what is already committed.
            Change::Command(_, cmd) if self.sent_due.remove(&cmd.id).is_some() => {
                self.stats.sent_skipped.fetch_add(1, Ordering::Relaxed);
            }
            Change::CommandsExpired(cmds) => {
                for c in cmds {
                    self.sent_due.remove(&c.id);
                }
            }
            Change::Shadow { side, device, .. } => {
                // The change is the patch; the documents are read from the
                // state (by one task, in order: see `ShadowOutbox`).
                // Only what the device subscribed to here.
                if let Some(s) = self.sessions.get(&device) {
                    let desired = side == ShadowSide::Desired && s.wants(&desired_topic(&device));
                    let delta = s.wants(&delta_topic(&device));
                    if desired || delta {
                        shadows.push(&device, desired, delta);
                    }
                }
            }
            Change::Presence { device, epoch }
                if device.online && device.gateway != Some(self.node_id) =>
            {
                // The device logged in on another gateway since: one client
                // id, one session, wherever it connects.
                self.endpoint
                    .registry
                    .taken_over_elsewhere(&device.id, epoch);
            }
            Change::DeviceRegistered(d) => self.auth.invalidate(&d.id),
            Change::DevicesRegistered { ids } => {
                for id in &ids {
                    self.auth.invalidate(id);
                }
            }
            Change::DeviceUpdated(d) => {
                // Its certificate fingerprint may have changed: a session
                // that logged in with another certificate ends.
                self.auth.invalidate(&d.id);
                self.endpoint
                    .registry
                    .revoke_certificate(&d.id, d.cert_sha256.as_deref());
            }
            Change::DeviceDeleted { id } => {
                self.auth.invalidate(&id);
                // Its session here ends now, whatever it logged in with.
                self.endpoint.registry.revoke(&id, None);
            }
            Change::SecretRotated { id } => {
                self.auth.invalidate(&id);
                // A session that logged in with the old secret ends; one
                // that already uses the new secret stays.
                let (db, endpoint) = (self.db.clone(), self.endpoint.clone());
                tokio::spawn(async move {
                    match db.device_secret_hash(&id).await {
                        Ok(Some(hash)) => endpoint.registry.revoke(&id, Some(&hash)),
                        Ok(None) => endpoint.registry.revoke(&id, None),
                        Err(e) => {
                            tracing::warn!(device = id, error = %e, "reading a rotated secret; ending the session");
                            endpoint.registry.revoke(&id, None);
                        }
                    }
                });
            }
            Change::SessionsLost { gateway, .. } if gateway == self.node_id => {
                // The leader gave up on us while our sessions lived on: say
                // again that they are here.
                tracing::warn!("this gateway's sessions were declared lost; announcing them again");
                for s in self.sessions.values() {
                    s.reannounce.notify_one();
                }
            }
            _ => {}
        }
    }
}

/// Shadow documents to publish after shadow changes, and on subscribe:
/// per device, whether its desired document and/or its delta are due. One
/// task ([`publish_shadows`]) reads the shadows ([`SHADOW_BATCH`] per
/// query) and publishes, one batch after the other, so a device never gets
/// an older document after a newer one, and a burst of changes costs one
/// read. Holds at most one entry per device with a session here.
#[derive(Default)]
pub(crate) struct ShadowOutbox {
    due: std::sync::Mutex<HashMap<String, (bool, bool)>>,
    ready: Notify,
}

impl ShadowOutbox {
    fn push(&self, device: &str, desired: bool, delta: bool) {
        {
            let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
            let d = due.entry(device.to_string()).or_default();
            d.0 |= desired;
            d.1 |= delta;
        }
        self.ready.notify_one();
    }

    fn take(&self) -> HashMap<String, (bool, bool)> {
        std::mem::take(&mut *self.due.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The task behind [`ShadowOutbox`]: reads the shadows due and publishes
/// them (the state read is at least as new as the change that made them due).
async fn publish_shadows(db: Arc<StateDb>, out: Arc<Shared>, outbox: Arc<ShadowOutbox>) {
    loop {
        outbox.ready.notified().await;
        let due: Vec<(String, (bool, bool))> = outbox.take().into_iter().collect();
        for chunk in due.chunks(SHADOW_BATCH) {
            let devices: Vec<String> = chunk.iter().map(|(d, _)| d.clone()).collect();
            match db.shadows(&devices).await {
                Ok(found) => {
                    for sh in &found {
                        if let Some((_, (desired, delta))) =
                            chunk.iter().find(|(d, _)| *d == sh.device)
                        {
                            publish_shadow(&out, sh, *desired, *delta);
                        }
                    }
                }
                Err(e) => {
                    // One by one then: a row that cannot be read costs
                    // only its own device.
                    tracing::warn!(error = %e, "reading shadows to deliver; reading them one by one");
                    for (device, (desired, delta)) in chunk {
                        match db.shadow(device).await {
                            Ok(Some(sh)) => publish_shadow(&out, &sh, *desired, *delta),
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(device, error = %e, "reading a shadow to deliver")
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Proposes presence `online`, again whenever asked, and `offline` once the
/// session ended — all from one task, so they commit in this order.
///
/// The task lives as long as the session; the proposals are boxed, so
/// that while it waits (nearly always) it holds a small future rather than
/// the largest state of a proposal.
async fn presence_task(
    node: Node<OpResult>,
    device: String,
    gateway: u64,
    epoch: u64,
    ended: oneshot::Receiver<()>,
    reannounce: Arc<Notify>,
) {
    let op = |online| Op::Presence {
        device: device.clone(),
        gateway,
        epoch,
        online,
    };
    let mut ended = Ended::new(ended);
    loop {
        Box::pin(propose_retrying(&node, op(true), Some(&mut ended))).await;
        tokio::select! {
            _ = ended.wait() => break,
            _ = reannounce.notified() => {}
        }
    }
    Box::pin(propose_retrying(&node, op(false), None)).await;
}

/// [`propose_retrying`] with nothing to stop it early.
async fn propose_logged(node: &Node<OpResult>, op: Op) {
    propose_retrying(node, op, None).await;
}

fn publish_command(out: &Shared, stats: &MqttStats, c: &Command) {
    let msg = CommandMessage {
        id: c.id.clone(),
        name: c.name.clone(),
        params: c.params.clone(),
        issued_at: c.issued_at,
        expires_at: c.expires_at,
    };
    publish_message(out, stats, &c.device, &msg);
}

/// Publishes a command message to `device`'s commands topic.
fn publish_message(out: &Shared, stats: &MqttStats, device: &str, msg: &CommandMessage) {
    let payload = serde_json::to_vec(msg).unwrap_or_default();
    stats.commands_published.fetch_add(1, Ordering::Relaxed);
    let topic = commands_topic(device);
    out.registry.deliver(
        device,
        Message {
            topic,
            payload: payload.into(),
        },
    );
}

fn publish_shadow(out: &Shared, sh: &Shadow, desired: bool, delta: bool) {
    let doc = |state: &Value| {
        serde_json::to_vec(&ShadowDocument {
            state: state.clone(),
            version: sh.version,
        })
        .unwrap_or_default()
    };
    let send = |topic: String, payload: Vec<u8>| {
        out.registry.deliver(
            &sh.device,
            Message {
                topic,
                payload: payload.into(),
            },
        );
    };
    if desired {
        send(desired_topic(&sh.device), doc(&sh.desired));
    }
    if delta {
        send(delta_topic(&sh.device), doc(&sh.delta));
    }
}

/// Makes the deliveries on subscribe in batches: whatever queued up while
/// the last batch ran goes next, so one device alone waits for nothing.
async fn deliver_in_batches(
    db: Arc<StateDb>,
    out: Arc<Shared>,
    stats: Arc<MqttStats>,
    published: mpsc::Sender<Vec<String>>,
    shadows: Arc<ShadowOutbox>,
    mut rx: mpsc::Receiver<Delivery>,
) {
    let mut batch = Vec::with_capacity(DELIVERY_BATCH);
    while rx.recv_many(&mut batch, DELIVERY_BATCH).await > 0 {
        deliver_batch(&db, &out, &stats, &published, &shadows, &mut batch).await;
    }
}

/// One batch. One query finds which of its devices have commands to be
/// sent again (most have none): each of those gets its delivery on a task
/// of its own, exactly as one device alone (its commands, then its
/// documents; a device with a long backlog holds up nobody else). The
/// others' documents go to the shadow outbox, whose one task reads them
/// [`SHADOW_BATCH`] per query, in order with the documents that changes
/// make due (so a device never gets an older document after a newer).
async fn deliver_batch(
    db: &Arc<StateDb>,
    out: &Arc<Shared>,
    stats: &Arc<MqttStats>,
    published: &mpsc::Sender<Vec<String>>,
    shadows: &ShadowOutbox,
    batch: &mut Vec<Delivery>,
) {
    let mut asking: Vec<String> = batch
        .iter()
        .filter(|d| d.commands)
        .map(|d| d.device.clone())
        .collect();
    asking.sort();
    asking.dedup();
    let open: HashSet<String> = match db.devices_with_open_commands(&asking).await {
        Ok(devices) => devices.into_iter().collect(),
        Err(e) => {
            // Each is looked at on its own then.
            tracing::warn!(error = %e, "finding the devices with commands to deliver");
            asking.into_iter().collect()
        }
    };
    for d in batch.drain(..) {
        if d.commands && open.contains(&d.device) {
            spawn_one_delivery(db.clone(), out.clone(), stats.clone(), published.clone(), d);
        } else if d.desired || d.delta {
            shadows.push(&d.device, d.desired, d.delta);
        }
    }
}

/// One device's delivery on a task of its own: its commands still to be
/// sent, then its documents.
fn spawn_one_delivery(
    db: Arc<StateDb>,
    out: Arc<Shared>,
    stats: Arc<MqttStats>,
    published: mpsc::Sender<Vec<String>>,
    d: Delivery,
) {
    tokio::spawn(async move {
        if d.commands {
            deliver_pending_commands(&db, &out, &stats, &published, &d.device).await;
        }
        if d.desired || d.delta {
            match db.shadow(&d.device).await {
                Ok(Some(sh)) => publish_shadow(&out, &sh, d.desired, d.delta),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(device = d.device, error = %e, "reading a shadow to deliver")
                }
            }
        }
    });
}

/// Publishes every command still queued, sent or accepted for `device`, and
/// hands the queued ones to the manager, which marks them `sent` unless the
/// device answers first (see [`SENT_AFTER`]). (An accepted command whose
/// result never reached the group is delivered again: the device, which
/// deduplicates by id, answers with its result again.)
async fn deliver_pending_commands(
    db: &StateDb,
    out: &Shared,
    stats: &MqttStats,
    published: &mpsc::Sender<Vec<String>>,
    device: &str,
) {
    for status in [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::Accepted,
    ] {
        let mut page = Page {
            after: None,
            limit: 500,
        };
        loop {
            let cmds = match db.list_commands(device, Some(status), &page).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(device, error = %e, "listing commands to deliver");
                    return;
                }
            };
            for c in &cmds {
                publish_command(out, stats, c);
            }
            if status == CommandStatus::Queued && !cmds.is_empty() {
                let cids = cmds.iter().map(|c| c.id.clone()).collect();
                // Waits while the manager is behind (bounded); fails only
                // once it stopped.
                if published.send(cids).await.is_err() {
                    return;
                }
            }
            match cmds.last() {
                Some(last) if cmds.len() == page.limit as usize => {
                    page.after = Some(last.id.clone());
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use coordinator::node::Node;
    use tokio::sync::{Notify, oneshot};

    use super::presence_task;
    use crate::ops::OpResult;

    /// The size of the future an async fn taking six arguments returns
    /// (without calling it).
    fn future_size<A, B, C, D, E, G, F: std::future::Future>(
        _: impl FnOnce(A, B, C, D, E, G) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// A session's presence task waits for as long as the session lives;
    /// its proposals are boxed, so the waiting future is small (it was
    /// about 1.3 KiB with a proposal's largest state in it).
    #[test]
    fn a_presence_task_is_small() {
        let size =
            future_size::<Node<OpResult>, String, u64, u64, oneshot::Receiver<()>, Arc<Notify>, _>(
                presence_task,
            );
        assert!(size <= 512, "a presence task's future is {size} bytes");
    }
}
