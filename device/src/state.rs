//! What a device does with what it receives and what its application asks
//! — pure logic, no I/O, so it is tested without a broker (and with
//! arbitrary input: nothing the network sends makes it panic).
//! [`Device`](crate::Device) moves messages between this and the network.
//!
//! - Commands: delivered at least once by the gateway, so de-duplicated by
//!   id; a new one goes to the application ([`Incoming::Command`]), a
//!   redelivery does not: one that already has a result gets the same
//!   result again (the gateway only redelivers commands it has no result
//!   for, so the first one was lost), one still in progress gets nothing
//!   (its answers are on their way, sent until acknowledged).
//! - Shadow: the full desired document (on every subscription) and deltas
//!   (after every change) update the local desired state; the application
//!   is given the keys the local reported state does not cover yet
//!   ([`Incoming::Delta`]). The first delta of every session is given in
//!   full, in case the gateway's reported state is behind the local one.
//! - Reports: merged into one pending patch (merge patch composition;
//!   a patch that cannot be composed exactly — an object over a removed or
//!   scalar key — closes the pending one first), sent when its window ends
//!   and the device is connected.
//! - Every queue is bounded: the outbox by `outbox_limit` (answers are
//!   refused with [`Error::QueueFull`] past it, repeated results dropped:
//!   the gateway delivers again), the de-duplication table by its capacity.
//!
//! ```
//! use entente_device::state::{DeviceState, Incoming};
//! use std::time::Duration;
//!
//! let mut s = DeviceState::new("valve-7", 16, 64, Duration::ZERO);
//! let cmd = br#"{"id":"c1","name":"open","params":{},"issued_at":1,"expires_at":2}"#;
//! let Incoming::Command(c) = s.on_message("devices/valve-7/commands", cmd) else { panic!() };
//! s.accept(&c.id).unwrap();
//! // Delivered again (a reconnect): not for the application.
//! assert_eq!(s.on_message("devices/valve-7/commands", cmd), Incoming::Duplicate("c1".into()));
//! assert_eq!(s.pop_outgoing().unwrap().topic, "devices/valve-7/commands/c1/accepted");
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use entente_protocol::{
    CommandMessage, CommandResultMessage, ResultStatus, ShadowDocument, accepted_topic,
    commands_topic, delta_topic, desired_topic, merge_patch, reported_topic, result_topic,
};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::Error;

/// The largest payload a gateway takes (`mqtt_max_payload`, 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Longest command id the device answers (its topics must stay valid).
const MAX_COMMAND_ID: usize = 256;

/// What a device message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// `commands/{cid}/accepted`.
    Accepted,
    /// `commands/{cid}/result`.
    Result,
    /// `shadow/reported`.
    Reported,
}

impl MessageKind {
    /// All kinds, in index order.
    pub const ALL: [MessageKind; 3] = [
        MessageKind::Accepted,
        MessageKind::Result,
        MessageKind::Reported,
    ];

    /// A dense index (for counter arrays).
    pub fn index(self) -> usize {
        match self {
            MessageKind::Accepted => 0,
            MessageKind::Result => 1,
            MessageKind::Reported => 2,
        }
    }
}

impl std::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MessageKind::Accepted => "accepted",
            MessageKind::Result => "result",
            MessageKind::Reported => "reported",
        })
    }
}

/// A command for the application, as the gateway issued it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Its id: answer with it ([`Device::accept`](crate::Device::accept),
    /// [`Device::succeed`](crate::Device::succeed), ...).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its parameters (any JSON).
    pub params: Value,
    /// When it was issued (ms since the Unix epoch).
    pub issued_at: u64,
    /// When it expires (ms since the Unix epoch): a result after that is
    /// not taken.
    pub expires_at: u64,
}

impl Command {
    /// The parameters as a typed value.
    pub fn params_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.params)
    }
}

/// Desired state the device has not reported yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// The keys (and their desired values) to apply, then report.
    pub state: Map<String, Value>,
    /// The shadow's desired version.
    pub version: u64,
}

/// A message for the device to publish (QoS 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// What it is.
    pub kind: MessageKind,
    /// Its command, for `accepted` and `result`.
    pub command: Option<Box<str>>,
    /// Topic.
    pub topic: String,
    /// JSON payload.
    pub payload: Vec<u8>,
}

/// What an incoming message meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A command seen for the first time: for the application.
    Command(Command),
    /// Desired state to apply: for the application.
    Delta(Delta),
    /// A redelivered command, handled here (its result queued again if it
    /// has one).
    Duplicate(String),
    /// Nothing to do (a document that changes nothing).
    Nothing,
    /// Unusable input, and why (malformed, unknown topic, bad id).
    Ignored(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Progress {
    Received,
    Accepted,
    /// The result's payload, to send again on a redelivery.
    Done(Box<[u8]>),
}

/// The most recent command ids a device has seen, with their progress.
#[derive(Debug, Clone)]
struct Dedup {
    recent: VecDeque<(Box<str>, Progress)>,
    capacity: usize,
}

impl Dedup {
    fn new(capacity: usize) -> Dedup {
        Dedup {
            recent: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, id: &str) -> Option<&Progress> {
        self.recent.iter().find(|(k, _)| &**k == id).map(|(_, p)| p)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Progress> {
        self.recent
            .iter_mut()
            .find(|(k, _)| &**k == id)
            .map(|(_, p)| p)
    }

    /// Records a new id, forgetting the oldest finished one when full (or
    /// the oldest of all if none is finished).
    fn insert(&mut self, id: &str) {
        if self.recent.len() >= self.capacity {
            let at = self
                .recent
                .iter()
                .position(|(_, p)| matches!(p, Progress::Done(_)))
                .unwrap_or(0);
            self.recent.remove(at);
        }
        self.recent.push_back((id.into(), Progress::Received));
    }
}

/// Whether `have` already holds everything `want` says: equal values, or,
/// for objects, every key of `want` covered recursively.
pub fn covers(have: Option<&Value>, want: &Value) -> bool {
    match (have, want) {
        (Some(Value::Object(h)), Value::Object(w)) => w.iter().all(|(k, wv)| covers(h.get(k), wv)),
        (Some(h), w) => h == w,
        (None, _) => false,
    }
}

/// Composes merge patch `next` into `pending` so that applying the result
/// equals applying `pending` then `next`; false (and `pending` unchanged)
/// when no single merge patch can say that (an object over a key `pending`
/// removes or sets to a non-object).
pub fn compose(pending: &mut Map<String, Value>, next: &Map<String, Value>) -> bool {
    fn exact(p: &Map<String, Value>, n: &Map<String, Value>) -> bool {
        n.iter().all(|(k, nv)| match (p.get(k), nv) {
            (_, v) if !v.is_object() => true,
            (None, _) => true,
            (Some(Value::Object(pv)), Value::Object(nv)) => exact(pv, nv),
            _ => false,
        })
    }
    fn apply(p: &mut Map<String, Value>, n: &Map<String, Value>) {
        for (k, nv) in n {
            match (p.get_mut(k), nv) {
                (Some(Value::Object(pv)), Value::Object(nv)) => apply(pv, nv),
                _ => {
                    p.insert(k.clone(), nv.clone());
                }
            }
        }
    }
    if !exact(pending, next) {
        return false;
    }
    apply(pending, next);
    true
}

fn valid_command_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_COMMAND_ID && !id.contains(['/', '+', '#', '\0'])
}

/// One device's state: commands seen, shadow, messages to send.
#[derive(Debug)]
pub struct DeviceState {
    id: Box<str>,
    commands: Box<str>,
    desired_topic: Box<str>,
    delta_topic: Box<str>,
    dedup: Dedup,
    desired: Map<String, Value>,
    desired_version: u64,
    reported: Map<String, Value>,
    resync: bool,
    outbox: VecDeque<Outgoing>,
    outbox_limit: usize,
    report: Option<Map<String, Value>>,
    report_due: Option<Instant>,
    report_window: Duration,
    coalesced: u64,
}

impl DeviceState {
    /// Device `id`, with at most `outbox_limit` messages waiting, the last
    /// `dedup_capacity` commands remembered, reports merged over
    /// `report_window`.
    pub fn new(
        id: &str,
        outbox_limit: usize,
        dedup_capacity: usize,
        report_window: Duration,
    ) -> DeviceState {
        DeviceState {
            id: id.into(),
            commands: commands_topic(id).into(),
            desired_topic: desired_topic(id).into(),
            delta_topic: delta_topic(id).into(),
            dedup: Dedup::new(dedup_capacity),
            desired: Map::new(),
            desired_version: 0,
            reported: Map::new(),
            resync: true,
            outbox: VecDeque::new(),
            outbox_limit: outbox_limit.max(1),
            report: None,
            report_due: None,
            report_window,
            coalesced: 0,
        }
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The filters to subscribe to on every connection (QoS 1). Only these
    /// three: a `devices/{id}/#` subscription would also echo back every
    /// message the device publishes itself.
    pub fn filters(&self) -> [String; 3] {
        [
            self.commands.to_string(),
            self.desired_topic.to_string(),
            self.delta_topic.to_string(),
        ]
    }

    /// The desired state as last received.
    pub fn desired(&self) -> &Map<String, Value> {
        &self.desired
    }

    /// The desired state's version as last received.
    pub fn desired_version(&self) -> u64 {
        self.desired_version
    }

    /// The reported state as the device made it (sent or not yet).
    pub fn reported(&self) -> &Map<String, Value> {
        &self.reported
    }

    /// The desired keys the reported state does not cover.
    pub fn delta(&self) -> Map<String, Value> {
        self.desired
            .iter()
            .filter(|(k, v)| !covers(self.reported.get(*k), v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A new session began: the next delta is given in full.
    pub fn session_started(&mut self) {
        self.resync = true;
    }

    /// Reacts to a message on `topic`.
    pub fn on_message(&mut self, topic: &str, payload: &[u8]) -> Incoming {
        if topic == &*self.commands {
            self.on_command(payload)
        } else if topic == &*self.desired_topic {
            self.on_shadow(payload, false)
        } else if topic == &*self.delta_topic {
            self.on_shadow(payload, true)
        } else {
            Incoming::Ignored(format!(
                "unexpected topic {:?}",
                topic.chars().take(128).collect::<String>()
            ))
        }
    }

    fn on_command(&mut self, payload: &[u8]) -> Incoming {
        let cmd = match serde_json::from_slice::<CommandMessage>(payload) {
            Ok(c) => c,
            Err(e) => return Incoming::Ignored(format!("malformed command: {e}")),
        };
        if !valid_command_id(&cmd.id) {
            return Incoming::Ignored(format!(
                "command id {:?} cannot be answered (empty, too long, or '/', '+', '#')",
                cmd.id.chars().take(64).collect::<String>()
            ));
        }
        match self.dedup.get(&cmd.id) {
            Some(Progress::Done(payload)) => {
                // Dropped if the outbox is full: the gateway delivers again.
                if self.outbox.len() < self.outbox_limit {
                    let payload = payload.to_vec();
                    self.outbox.push_back(Outgoing {
                        kind: MessageKind::Result,
                        topic: result_topic(&self.id, &cmd.id),
                        command: Some(cmd.id.as_str().into()),
                        payload,
                    });
                }
                Incoming::Duplicate(cmd.id)
            }
            Some(_) => Incoming::Duplicate(cmd.id),
            None => {
                self.dedup.insert(&cmd.id);
                Incoming::Command(Command {
                    id: cmd.id,
                    name: cmd.name,
                    params: cmd.params,
                    issued_at: cmd.issued_at,
                    expires_at: cmd.expires_at,
                })
            }
        }
    }

    fn on_shadow(&mut self, payload: &[u8], delta: bool) -> Incoming {
        let (doc, version) = match serde_json::from_slice::<ShadowDocument>(payload) {
            Ok(ShadowDocument {
                state: Value::Object(m),
                version,
            }) => (m, version),
            Ok(_) => return Incoming::Ignored("shadow state is not an object".into()),
            Err(e) => return Incoming::Ignored(format!("malformed shadow document: {e}")),
        };
        let all = delta && std::mem::take(&mut self.resync);
        if delta {
            // A delta holds desired keys: they are desired.
            for (k, v) in &doc {
                self.desired.insert(k.clone(), v.clone());
            }
        } else {
            self.desired = doc.clone();
        }
        self.desired_version = version;
        let state: Map<String, Value> = doc
            .into_iter()
            .filter(|(k, v)| all || !covers(self.reported.get(k), v))
            .collect();
        if state.is_empty() {
            return Incoming::Nothing;
        }
        Incoming::Delta(Delta { state, version })
    }

    fn check_room(&self, n: usize) -> Result<(), Error> {
        if self.outbox.len() + n > self.outbox_limit {
            return Err(Error::QueueFull(self.outbox.len()));
        }
        Ok(())
    }

    /// Queues `accepted` for command `id` (once; again is a no-op).
    pub fn accept(&mut self, id: &str) -> Result<(), Error> {
        match self.dedup.get(id) {
            None => Err(Error::UnknownCommand(id.to_string())),
            Some(Progress::Done(_)) => Err(Error::AlreadyCompleted(id.to_string())),
            Some(Progress::Accepted) => Ok(()),
            Some(Progress::Received) => {
                self.check_room(1)?;
                if let Some(p) = self.dedup.get_mut(id) {
                    *p = Progress::Accepted;
                }
                self.outbox.push_back(Outgoing {
                    kind: MessageKind::Accepted,
                    command: Some(id.into()),
                    topic: accepted_topic(&self.id, id),
                    payload: b"{}".to_vec(),
                });
                Ok(())
            }
        }
    }

    /// Queues the result of command `id`.
    pub fn complete(&mut self, id: &str, status: ResultStatus, output: Value) -> Result<(), Error> {
        match self.dedup.get(id) {
            None => return Err(Error::UnknownCommand(id.to_string())),
            Some(Progress::Done(_)) => return Err(Error::AlreadyCompleted(id.to_string())),
            Some(_) => {}
        }
        self.check_room(1)?;
        let payload = serde_json::to_vec(&CommandResultMessage { status, output })
            .map_err(|e| Error::Config(format!("result output: {e}")))?;
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::TooLarge {
                kind: MessageKind::Result,
                size: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        if let Some(p) = self.dedup.get_mut(id) {
            *p = Progress::Done(payload.clone().into_boxed_slice());
        }
        self.outbox.push_back(Outgoing {
            kind: MessageKind::Result,
            command: Some(id.into()),
            topic: result_topic(&self.id, id),
            payload,
        });
        Ok(())
    }

    /// Merges `patch` (a JSON object, merge patch semantics) into the
    /// reported state and into the report waiting to be sent.
    pub fn report(&mut self, patch: Value, now: Instant) -> Result<(), Error> {
        let Value::Object(patch) = patch else {
            return Err(Error::NotAnObject);
        };
        let size = serde_json::to_vec(&patch).map(|v| v.len()).unwrap_or(0);
        if size > MAX_PAYLOAD {
            return Err(Error::TooLarge {
                kind: MessageKind::Reported,
                size,
                max: MAX_PAYLOAD,
            });
        }
        match self.report.as_mut() {
            None => {
                self.report = Some(patch.clone());
                self.report_due = Some(now + self.report_window);
            }
            Some(pending) => {
                let mut merged = pending.clone();
                let fits = compose(&mut merged, &patch)
                    && serde_json::to_vec(&merged).map(|v| v.len()).unwrap_or(0) <= MAX_PAYLOAD;
                if fits {
                    *pending = merged;
                    self.coalesced += 1;
                } else {
                    // Cannot merge: the pending one goes first, as it is.
                    self.check_room(1)?;
                    if let Some(old) = self.report.take() {
                        self.push_report(old);
                    }
                    self.report = Some(patch.clone());
                    self.report_due = Some(now + self.report_window);
                }
            }
        }
        let mut reported = Value::Object(std::mem::take(&mut self.reported));
        merge_patch(&mut reported, &Value::Object(patch));
        if let Value::Object(m) = reported {
            self.reported = m;
        }
        Ok(())
    }

    fn push_report(&mut self, patch: Map<String, Value>) {
        self.outbox.push_back(Outgoing {
            kind: MessageKind::Reported,
            command: None,
            topic: reported_topic(&self.id),
            payload: serde_json::to_vec(&patch).unwrap_or_default(),
        });
    }

    /// When the pending report is due, if there is one.
    pub fn report_due(&self) -> Option<Instant> {
        self.report.as_ref().and(self.report_due)
    }

    /// Moves the pending report to the outbox if it is due at `now` and
    /// there is room (else it stays pending).
    pub fn release_report(&mut self, now: Instant) {
        if self.report_due.is_some_and(|t| t <= now)
            && self.outbox.len() < self.outbox_limit
            && let Some(patch) = self.report.take()
        {
            self.report_due = None;
            self.push_report(patch);
        }
    }

    /// Reports merged into another since the last call.
    pub fn take_coalesced(&mut self) -> u64 {
        std::mem::take(&mut self.coalesced)
    }

    /// The next message to hand to the connection.
    pub fn peek_outgoing(&self) -> Option<&Outgoing> {
        self.outbox.front()
    }

    /// Takes the next message (after it was handed over).
    pub fn pop_outgoing(&mut self) -> Option<Outgoing> {
        self.outbox.pop_front()
    }

    /// Whether the outbox can take another message.
    pub fn has_room(&self) -> bool {
        self.outbox.len() < self.outbox_limit
    }

    /// Messages waiting.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> DeviceState {
        DeviceState::new("d1", 8, 4, Duration::from_millis(50))
    }

    fn command(id: &str, params: Value) -> Vec<u8> {
        serde_json::to_vec(&CommandMessage {
            id: id.into(),
            name: "open".into(),
            params,
            issued_at: 1,
            expires_at: 2,
        })
        .expect("json")
    }

    fn doc(state: Value, version: u64) -> Vec<u8> {
        serde_json::to_vec(&ShadowDocument { state, version }).expect("json")
    }

    fn drain(s: &mut DeviceState) -> Vec<Outgoing> {
        std::iter::from_fn(|| s.pop_outgoing()).collect()
    }

    #[test]
    fn a_command_goes_to_the_application_once_and_a_redelivery_gets_the_same_result() {
        let mut s = state();
        let Incoming::Command(c) =
            s.on_message("devices/d1/commands", &command("c1", json!({"to": 5})))
        else {
            panic!("not a command")
        };
        assert_eq!((c.id.as_str(), c.name.as_str()), ("c1", "open"));
        #[derive(serde::Deserialize)]
        struct P {
            to: u32,
        }
        assert_eq!(c.params_as::<P>().expect("typed").to, 5);
        // In progress: a redelivery is dropped.
        assert_eq!(
            s.on_message("devices/d1/commands", &command("c1", json!({}))),
            Incoming::Duplicate("c1".into())
        );
        assert!(drain(&mut s).is_empty());
        s.accept("c1").expect("accept");
        s.accept("c1").expect("accepting twice is a no-op");
        s.complete("c1", ResultStatus::Failed, json!({"why": "stuck"}))
            .expect("complete");
        let out = drain(&mut s);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].topic, "devices/d1/commands/c1/accepted");
        assert_eq!(out[1].topic, "devices/d1/commands/c1/result");
        assert_eq!(
            s.complete("c1", ResultStatus::Succeeded, Value::Null),
            Err(Error::AlreadyCompleted("c1".into()))
        );
        // Redelivered after the result: the same result, not the app.
        assert_eq!(
            s.on_message("devices/d1/commands", &command("c1", json!({}))),
            Incoming::Duplicate("c1".into())
        );
        let again = drain(&mut s);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].payload, out[1].payload);
        let r: CommandResultMessage = serde_json::from_slice(&again[0].payload).expect("result");
        assert_eq!(r.status, ResultStatus::Failed);
        assert_eq!(s.accept("zz"), Err(Error::UnknownCommand("zz".into())));
    }

    #[test]
    fn dedup_forgets_finished_commands_first() {
        let mut s = state(); // remembers 4
        for i in 0..4 {
            s.on_message("devices/d1/commands", &command(&format!("c{i}"), json!({})));
        }
        s.complete("c1", ResultStatus::Succeeded, Value::Null)
            .expect("done");
        drain(&mut s);
        // c4 pushes out c1 (finished), not c0 (still in progress).
        assert!(matches!(
            s.on_message("devices/d1/commands", &command("c4", json!({}))),
            Incoming::Command(_)
        ));
        assert!(s.accept("c0").is_ok());
        assert!(matches!(
            s.on_message("devices/d1/commands", &command("c1", json!({}))),
            Incoming::Command(_)
        ));
    }

    #[test]
    fn answers_are_bounded_by_the_outbox() {
        let mut s = DeviceState::new("d1", 2, 8, Duration::ZERO);
        for i in 0..3 {
            s.on_message("devices/d1/commands", &command(&format!("c{i}"), json!({})));
        }
        s.accept("c0").expect("room");
        s.accept("c1").expect("room");
        assert_eq!(s.accept("c2"), Err(Error::QueueFull(2)));
        s.pop_outgoing();
        s.accept("c2").expect("room again");
        let big = json!("x".repeat(MAX_PAYLOAD));
        s.pop_outgoing();
        assert!(matches!(
            s.complete("c0", ResultStatus::Succeeded, big),
            Err(Error::TooLarge { .. })
        ));
    }

    /// Regression: device-sim answered any command id, and one holding a
    /// `/`, `+` or `#` made a topic rumqttc refuses to queue, which the
    /// simulator took for a full channel: its outbox stalled for good.
    #[test]
    fn a_command_id_that_makes_no_valid_topic_is_ignored() {
        let mut s = state();
        for bad in ["a/b", "+", "x#", ""] {
            assert!(
                matches!(
                    s.on_message("devices/d1/commands", &command(bad, json!({}))),
                    Incoming::Ignored(_)
                ),
                "{bad:?}"
            );
        }
        assert_eq!(s.outbox_len(), 0);
    }

    #[test]
    fn desired_state_becomes_deltas_of_what_is_not_reported() {
        let mut s = state();
        let t0 = Instant::now();
        let Incoming::Delta(d) = s.on_message(
            "devices/d1/shadow/desired",
            &doc(json!({"valve": "open", "speed": 3}), 4),
        ) else {
            panic!("no delta")
        };
        assert_eq!(
            Value::Object(d.state.clone()),
            json!({"valve": "open", "speed": 3})
        );
        assert_eq!(d.version, 4);
        s.report(json!({"valve": "open"}), t0).expect("report");
        assert_eq!(Value::Object(s.delta()), json!({"speed": 3}));
        // First delta of the session: in full.
        let Incoming::Delta(d) = s.on_message(
            "devices/d1/shadow/delta",
            &doc(json!({"valve": "open", "speed": 3}), 4),
        ) else {
            panic!("no delta")
        };
        assert_eq!(d.state.len(), 2);
        // Later ones: what is not covered.
        let Incoming::Delta(d) = s.on_message(
            "devices/d1/shadow/delta",
            &doc(json!({"valve": "open", "speed": 3}), 4),
        ) else {
            panic!("no delta")
        };
        assert_eq!(Value::Object(d.state), json!({"speed": 3}));
        s.report(json!({"speed": 3}), t0).expect("report");
        assert_eq!(
            s.on_message("devices/d1/shadow/delta", &doc(json!({"speed": 3}), 4)),
            Incoming::Nothing
        );
    }

    #[test]
    fn reports_coalesce_within_the_window_and_keep_their_meaning() {
        let mut s = state();
        let t0 = Instant::now();
        s.report(json!({"a": 1, "o": {"x": 1}}), t0).expect("r1");
        s.report(json!({"b": 2, "o": {"y": 2}}), t0).expect("r2");
        s.report(json!({"a": null}), t0).expect("r3");
        assert_eq!(s.report_due(), Some(t0 + Duration::from_millis(50)));
        s.release_report(t0);
        assert_eq!(s.outbox_len(), 0, "not before the window ends");
        s.release_report(t0 + Duration::from_millis(50));
        let out = drain(&mut s);
        assert_eq!(out.len(), 1);
        let patch: Value = serde_json::from_slice(&out[0].payload).expect("json");
        assert_eq!(patch, json!({"a": null, "b": 2, "o": {"x": 1, "y": 2}}));
        assert_eq!(s.take_coalesced(), 2);
        assert_eq!(
            Value::Object(s.reported().clone()),
            json!({"b": 2, "o": {"x": 1, "y": 2}})
        );
        // An object over a removed key cannot be merged exactly: two messages.
        s.report(json!({"o": null}), t0).expect("r4");
        s.report(json!({"o": {"z": 3}}), t0).expect("r5");
        s.release_report(t0 + Duration::from_secs(1));
        let out = drain(&mut s);
        assert_eq!(out.len(), 2);
        let mut target = json!({"o": {"x": 1}});
        for o in &out {
            merge_patch(
                &mut target,
                &serde_json::from_slice(&o.payload).expect("json"),
            );
        }
        assert_eq!(target, json!({"o": {"z": 3}}));
        assert_eq!(s.report(json!([1]), t0), Err(Error::NotAnObject));
    }

    #[test]
    fn composing_patches_equals_applying_them_in_turn() {
        // A seeded generator of small patches and targets.
        let mut rng = crate::rng::Rng::new(11);
        fn value(rng: &mut crate::rng::Rng, depth: u32) -> Value {
            match rng.below(if depth > 2 { 3 } else { 5 }) {
                0 => Value::Null,
                1 => json!(rng.below(3)),
                2 => json!("s"),
                _ => {
                    let mut m = Map::new();
                    for _ in 0..rng.below(3) {
                        m.insert(
                            ["a", "b", "c"][rng.below(3) as usize].into(),
                            value(rng, depth + 1),
                        );
                    }
                    Value::Object(m)
                }
            }
        }
        for _ in 0..2000 {
            let (Value::Object(p1), Value::Object(p2)) = (value(&mut rng, 3), value(&mut rng, 3))
            else {
                continue;
            };
            let target = value(&mut rng, 0);
            let mut composed = p1.clone();
            if !compose(&mut composed, &p2) {
                continue;
            }
            let mut one = target.clone();
            merge_patch(&mut one, &Value::Object(composed));
            let mut two = target.clone();
            merge_patch(&mut two, &Value::Object(p1.clone()));
            merge_patch(&mut two, &Value::Object(p2.clone()));
            assert_eq!(one, two, "{p1:?} then {p2:?} on {target:?}");
        }
    }
}
