//! The device: one MQTT connection driven by the application's own task.
//!
//! [`Device::next_event`] does all the work — connecting, failing over,
//! reading, acknowledging, handing queued messages to the connection — and
//! returns what the application must know. It is cancel-safe, so the
//! application may `select!` on it with its own timers; the device makes
//! progress only while it is awaited (as rumqttc's event loop). The calls
//! that queue messages ([`Device::accept`], [`Device::report`], ...) are
//! synchronous and bounded: they never wait for the network.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use entente_protocol::ResultStatus;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::{Config, Counters};
use crate::error::Error;
use crate::mqtt::{BrokerAddr, Client, ClientSettings, Ev, Link, Polled, new_client};
use crate::rng::Rng;
use crate::sleep_until_opt;
use crate::state::{Command, Delta, DeviceState, Incoming, MessageKind};

/// A connection was established.
#[derive(Debug, Clone, PartialEq)]
pub struct Connected {
    /// The gateway connected to.
    pub gateway: BrokerAddr,
    /// Whether the gateway resumed the device's session (its filters are
    /// in force at once; the library subscribes again anyway).
    pub session_present: bool,
    /// How long the attempt took (connect gate passed to CONNACK).
    pub took: Duration,
    /// When the attempt started.
    pub started: Instant,
}

/// A connection attempt failed or a connection was lost.
#[derive(Debug, Clone, PartialEq)]
pub struct Disconnected {
    /// The gateway it was with (or tried).
    pub gateway: BrokerAddr,
    /// Why: [`Error::Refused`] for a refusal (bad credentials, ...),
    /// [`Error::Disconnected`] when the gateway ended the session (MQTT 5),
    /// [`Error::Connection`] otherwise.
    pub error: Error,
    /// Whether it was connected (else an attempt failed).
    pub was_connected: bool,
    /// When the failed attempt started (if this was an attempt).
    pub attempt_started: Option<Instant>,
    /// When the device tries again (the next gateway of the list), unless
    /// it was asked to stay offline.
    pub retry_in: Option<Duration>,
}

/// What the application is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Connected to a gateway (subscriptions follow).
    Connected(Connected),
    /// The subscriptions are in force: commands and shadow documents flow.
    Subscribed,
    /// Disconnected, or an attempt failed; the device retries by itself.
    Disconnected(Disconnected),
    /// A command, delivered once: answer it with [`Device::accept`] and
    /// then [`Device::succeed`] or [`Device::fail`].
    Command(Command),
    /// Desired state not reported yet: apply it, then [`Device::report`].
    Delta(Delta),
    /// The gateway acknowledged (committed) a message.
    Delivered {
        /// What it was.
        kind: MessageKind,
        /// Its command, for `accepted` and `result`.
        command: Option<String>,
    },
    /// The gateway refused a message or a subscription
    /// ([`Error::MessageRefused`], [`Error::SubscriptionRefused`]).
    Refused(Error),
    /// A redelivered command the library answered (or dropped) itself.
    Duplicate(String),
    /// A message from the gateway the library could not use, and why.
    Ignored(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A connection attempt is (or is about to be) in progress.
    Connecting,
    /// Connected; whether the SUBACK arrived.
    Connected { subscribed: bool },
    /// Waiting to reconnect.
    Waiting(Instant),
    /// Offline on request.
    Parked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctl {
    Subscribe,
    Disconnect,
}

/// A message handed to the connection, until acknowledged.
#[derive(Debug)]
struct Sent {
    kind: MessageKind,
    command: Option<Box<str>>,
}

/// One device: its connection, its state, its queues. See the module docs.
pub struct Device {
    state: DeviceState,
    settings: ClientSettings,
    gateways: Arc<[BrokerAddr]>,
    gateway: usize,
    client: Client,
    link: Link,
    phase: Phase,
    ctl: VecDeque<Ctl>,
    /// Handed to the client, waiting for their packet id, in order.
    handed: VecDeque<Sent>,
    /// Sent with a packet id, waiting for their PUBACK.
    inflight: HashMap<u16, Sent>,
    /// The event the last poll produced (one at most), not yet returned.
    event: Option<Event>,
    backoff: Backoff,
    rng: Rng,
    counters: Option<Arc<Counters>>,
    want_offline: bool,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.state.id())
            .field("phase", &self.phase)
            .field("gateway", &self.gateways.get(self.gateway))
            .finish()
    }
}

impl Device {
    /// A device with `config` (checked); it connects at the first
    /// [`Device::next_event`]. Needs a tokio runtime only from then on.
    pub fn new(config: Config) -> Result<Device, Error> {
        config.check()?;
        let settings = ClientSettings {
            protocol: config.protocol,
            client_id: config.device_id.clone(),
            credentials: Some((
                config.device_id.clone(),
                config.password.clone().unwrap_or_default(),
            )),
            keep_alive: config.keep_alive,
            clean_session: false,
            inflight: config.inflight,
            channel_capacity: config.channel_capacity,
            attempt_timeout: config.attempt_timeout,
            tls: config.tls.clone(),
        };
        let gateway = config.first_gateway % config.gateways.len();
        let (client, conn) = new_client(&settings, &config.gateways[gateway]);
        Ok(Device {
            state: DeviceState::new(
                &config.device_id,
                config.outbox_limit,
                config.dedup_capacity,
                config.report_window,
            ),
            settings,
            gateways: config.gateways,
            gateway,
            client,
            link: Link::new(conn, config.connect_gate),
            phase: Phase::Connecting,
            ctl: VecDeque::new(),
            handed: VecDeque::new(),
            inflight: HashMap::new(),
            event: None,
            backoff: Backoff::new(config.backoff_base, config.backoff_max),
            rng: Rng::new(config.seed),
            counters: config.counters,
            want_offline: false,
        })
    }

    /// The device id.
    pub fn id(&self) -> &str {
        self.state.id()
    }

    /// Whether it is connected now.
    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Connected { .. })
    }

    /// Whether it is offline on request ([`Device::disconnect`]), the
    /// connection closed.
    pub fn is_parked(&self) -> bool {
        self.phase == Phase::Parked
    }

    /// Whether it is connected with its subscriptions in force.
    pub fn is_subscribed(&self) -> bool {
        self.phase == Phase::Connected { subscribed: true }
    }

    /// The gateway it is connected to, or trying next.
    pub fn gateway(&self) -> &BrokerAddr {
        &self.gateways[self.gateway]
    }

    /// The desired state as last received from the gateway.
    pub fn desired(&self) -> &Map<String, Value> {
        self.state.desired()
    }

    /// The reported state as this device made it (sent or not yet).
    pub fn reported(&self) -> &Map<String, Value> {
        self.state.reported()
    }

    /// The desired keys the reported state does not cover.
    pub fn delta(&self) -> Map<String, Value> {
        self.state.delta()
    }

    /// Messages waiting to be handed to the connection (the pending report
    /// not counted).
    pub fn queued(&self) -> usize {
        self.state.outbox_len()
    }

    /// Tells the gateway that command `id` was accepted (once; again is a
    /// no-op). Sent until acknowledged.
    pub fn accept(&mut self, id: &str) -> Result<(), Error> {
        self.state.accept(id)
    }

    /// The command `id` succeeded with `output` (any JSON). Sent until
    /// acknowledged; a redelivery of the command gets it again.
    pub fn succeed(&mut self, id: &str, output: Value) -> Result<(), Error> {
        self.state.complete(id, ResultStatus::Succeeded, output)
    }

    /// The command `id` failed with `output` (any JSON: say why).
    pub fn fail(&mut self, id: &str, output: Value) -> Result<(), Error> {
        self.state.complete(id, ResultStatus::Failed, output)
    }

    /// Reports a change of state: `patch` is a JSON object, a merge patch
    /// (`null` removes a key). Patches made within the report window, or
    /// while offline, go as one message.
    pub fn report(&mut self, patch: Value) -> Result<(), Error> {
        self.state.report(patch, Instant::now())
    }

    /// Closes the connection and stays offline until [`Device::connect`]
    /// (an [`Event::Disconnected`] follows, with no retry).
    pub fn disconnect(&mut self) {
        self.want_offline = true;
        match self.phase {
            Phase::Connected { .. } => self.ctl.push_back(Ctl::Disconnect),
            // The CONNACK (then DISCONNECT) or the failure will come.
            Phase::Connecting => {}
            Phase::Waiting(_) | Phase::Parked => self.phase = Phase::Parked,
        }
    }

    /// Connects again after [`Device::disconnect`] (at once, no back-off).
    pub fn connect(&mut self) {
        self.want_offline = false;
        if matches!(self.phase, Phase::Parked | Phase::Waiting(_)) {
            self.phase = Phase::Connecting;
        }
    }

    /// Closes the connection and reconnects as after any loss (back-off,
    /// then the next gateway).
    pub fn reconnect(&mut self) {
        if self.is_connected() {
            self.ctl.push_back(Ctl::Disconnect);
        }
    }

    /// Disconnects cleanly (DISCONNECT), waiting at most `grace` for the
    /// gateway to close; what was not acknowledged is lost with the device.
    pub async fn close(mut self, grace: Duration) {
        if !self.is_connected() {
            return;
        }
        self.ctl.clear();
        self.ctl.push_front(Ctl::Disconnect);
        self.flush();
        let deadline = Instant::now() + grace;
        while let Ok(p) = tokio::time::timeout_at(deadline, self.link.next()).await {
            if p.event.is_err() {
                break;
            }
        }
    }

    /// Waits for the next event, doing the device's work meanwhile. Never
    /// fails: connection problems come as [`Event::Disconnected`] and the
    /// device tries again. Cancel-safe. While offline on request
    /// ([`Device::disconnect`]) it waits for ever: `select!` it with
    /// something else.
    pub async fn next_event(&mut self) -> Event {
        loop {
            if let Some(e) = self.event.take() {
                return e;
            }
            self.flush();
            let polling = matches!(self.phase, Phase::Connecting | Phase::Connected { .. });
            let wake = match self.phase {
                Phase::Waiting(t) => Some(t),
                _ => None,
            };
            // The pending report waits for a subscribed connection and for
            // room in the outbox (which PUBACKs make: no busy loop meanwhile).
            let report = self
                .state
                .report_due()
                .filter(|_| self.is_subscribed() && self.state.has_room());
            // One timer for both (a device in a large fleet keeps this
            // future, and each timer is ~100 bytes, while it waits).
            let timer = match (wake, report) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                p = self.link.next(), if polling => self.on_polled(p),
                _ = sleep_until_opt(timer) => {
                    let now = Instant::now();
                    if wake.is_some_and(|t| t <= now) {
                        self.phase = Phase::Connecting;
                    }
                    if report.is_some_and(|t| t <= now) {
                        self.state.release_report(now);
                    }
                }
            }
        }
    }

    /// Keeps the event for [`Device::next_event`] to return. A poll makes
    /// one event at most, and the next poll only starts once it was taken.
    fn emit(&mut self, e: Event) {
        self.event = Some(e);
    }

    fn count(&self, f: impl FnOnce(&Counters)) {
        if let Some(c) = &self.counters {
            f(c)
        }
    }

    fn on_polled(&mut self, p: Polled) {
        let now = Instant::now();
        match p.event {
            Ok(Ev::ConnAck { session_present }) => {
                let started = p.connect_started.unwrap_or(now);
                self.phase = Phase::Connected { subscribed: false };
                self.backoff.reset();
                self.state.session_started();
                // Handed-over messages without a packet id yet are in the
                // client's channel or carried: they keep their order.
                self.ctl.clear();
                self.ctl.push_back(Ctl::Subscribe);
                if self.want_offline {
                    self.ctl.push_back(Ctl::Disconnect);
                }
                self.emit(Event::Connected(Connected {
                    gateway: self.gateways[self.gateway].clone(),
                    session_present,
                    took: now.saturating_duration_since(started),
                    started,
                }));
            }
            Ok(Ev::SubAck { refused }) => match refused {
                Some(code) => self.emit(Event::Refused(Error::SubscriptionRefused { code })),
                None => {
                    if self.phase == (Phase::Connected { subscribed: false }) {
                        self.phase = Phase::Connected { subscribed: true };
                        self.emit(Event::Subscribed);
                    }
                }
            },
            Ok(Ev::Publish { topic, payload }) => match self.state.on_message(&topic, &payload) {
                Incoming::Command(c) => {
                    self.count(|c| Counters::bump(&c.commands));
                    self.emit(Event::Command(c));
                }
                Incoming::Delta(d) => self.emit(Event::Delta(d)),
                Incoming::Duplicate(id) => {
                    self.count(|c| Counters::bump(&c.duplicates));
                    self.emit(Event::Duplicate(id));
                }
                Incoming::Nothing => {}
                Incoming::Ignored(why) => {
                    self.count(|c| Counters::bump(&c.ignored));
                    self.emit(Event::Ignored(why));
                }
            },
            Ok(Ev::Sent { pkid }) => {
                if !self.inflight.contains_key(&pkid)
                    && let Some(s) = self.handed.pop_front()
                {
                    self.inflight.insert(pkid, s);
                }
            }
            Ok(Ev::PubAck { pkid, reason }) => {
                let sent = self
                    .inflight
                    .remove(&pkid)
                    .or_else(|| self.handed.pop_front());
                let Some(Sent { kind, command }) = sent else {
                    return;
                };
                let command = command.map(String::from);
                if reason < 0x80 {
                    self.count(|c| Counters::bump(&c.delivered[kind.index()]));
                    self.emit(Event::Delivered { kind, command });
                } else {
                    self.count(|c| Counters::bump(&c.refused));
                    self.emit(Event::Refused(Error::MessageRefused {
                        kind,
                        command,
                        code: reason,
                    }));
                }
            }
            Ok(Ev::Other) => {}
            Err(e) => self.on_lost(now, p.connect_started, e.into()),
        }
    }

    fn on_lost(&mut self, now: Instant, attempt_started: Option<Instant>, error: Error) {
        let was_connected = matches!(self.phase, Phase::Connected { .. });
        let gateway = self.gateways[self.gateway].clone();
        // Requests for the old connection are void; messages are kept
        // (unacknowledged ones are carried by the link, in order, and get
        // their packet ids again when sent).
        self.ctl.clear();
        let carried = std::mem::take(&mut self.inflight);
        let mut carried: Vec<(u16, Sent)> = carried.into_iter().collect();
        carried.sort_by_key(|(pkid, _)| *pkid);
        for (_, s) in carried.into_iter().rev() {
            self.handed.push_front(s);
        }
        let retry_in = if self.want_offline {
            self.phase = Phase::Parked;
            None
        } else {
            self.gateway = (self.gateway + 1) % self.gateways.len();
            self.link
                .set_address(&self.settings, &self.gateways[self.gateway]);
            let delay = self.backoff.next_delay(&mut self.rng);
            self.phase = Phase::Waiting(now + delay);
            Some(delay)
        };
        self.emit(Event::Disconnected(Disconnected {
            gateway,
            error,
            was_connected,
            attempt_started: attempt_started.filter(|_| !was_connected),
            retry_in,
        }));
    }

    /// Hands queued requests to the client until its channel is full.
    fn flush(&mut self) {
        while let Some(c) = self.ctl.front() {
            let queued = match c {
                Ctl::Subscribe => self.client.try_subscribe(&self.state.filters()),
                Ctl::Disconnect => self.client.try_disconnect(),
            };
            if queued.is_err() {
                return;
            }
            self.ctl.pop_front();
        }
        if !self.is_connected() {
            // Keep messages here while offline: the pending report can
            // still take in more patches, and a connection attempt
            // does not start with a full channel.
            return;
        }
        if self.is_subscribed() {
            self.state.release_report(Instant::now());
        }
        while let Some(o) = self.state.peek_outgoing() {
            if self.client.try_publish(&o.topic, &o.payload).is_err() {
                break;
            }
            if let Some(o) = self.state.pop_outgoing() {
                self.count(|c| Counters::bump(&c.sent[o.kind.index()]));
                self.handed.push_back(Sent {
                    kind: o.kind,
                    command: o.command,
                });
            }
        }
    }
}
