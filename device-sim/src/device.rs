//! What a simulated device does with what it receives — pure logic, no I/O,
//! so it is unit-tested without a broker. The fleet (`fleet.rs`) moves
//! messages between this and the network.
//!
//! - Commands: answered with `accepted` at once and a `result` after the
//!   configured delay; `failed` with the configured probability, and always
//!   when the parameters contain `"fail": true`. Delivery is at least once,
//!   so commands are deduplicated by id; a redelivered command that already
//!   has a result gets the same result again (the gateway only redelivers
//!   commands it has no result for, so the first one was lost).
//! - Shadow: the device applies its desired state (full document on
//!   `shadow/desired`, differences on `shadow/delta`) and reports what it
//!   changed on `shadow/reported`. The first delta of every session is
//!   answered in full, in case a report was lost with the last connection.
//! - Random reports: a patch of one sensor-like key the desired state does
//!   not control.

use std::collections::VecDeque;
use std::time::Duration;

use entente_protocol::{
    CommandMessage, CommandResultMessage, ResultStatus, ShadowDocument, accepted_topic,
    commands_topic, delta_topic, desired_topic, merge_patch, reported_topic, result_topic,
};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::rng::Rng;

/// How devices answer.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Delay between `accepted` and `result`.
    pub result_delay: Duration,
    /// Probability that a command fails (besides `"fail": true`).
    pub failure_rate: f64,
}

/// What a device message is, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    /// `commands/{cid}/accepted`.
    Accepted,
    /// `commands/{cid}/result`.
    Result,
    /// `shadow/reported`.
    Reported,
}

impl OutKind {
    /// All kinds, in index order.
    pub const ALL: [OutKind; 3] = [OutKind::Accepted, OutKind::Result, OutKind::Reported];

    /// A dense index (for counter arrays).
    pub fn index(self) -> usize {
        match self {
            OutKind::Accepted => 0,
            OutKind::Result => 1,
            OutKind::Reported => 2,
        }
    }
}

/// A message for the device to publish (QoS 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// What it is.
    pub kind: OutKind,
    /// Topic.
    pub topic: String,
    /// JSON payload.
    pub payload: Vec<u8>,
}

/// What the device knows of a command id it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Never seen (among the recent ones).
    New,
    /// Seen; the result is not out yet.
    InProgress,
    /// Seen and answered with this status.
    Done(ResultStatus),
}

/// The most recent command ids a device has seen, with their outcome.
/// Bounded: a device remembers `capacity` commands (redeliveries come soon
/// after the first delivery, on the next connection).
#[derive(Debug, Clone)]
pub struct Dedup {
    recent: VecDeque<(Box<str>, Option<ResultStatus>)>,
    capacity: usize,
}

impl Dedup {
    /// Remembers up to `capacity` ids (at least one).
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            recent: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// What is known of `id`.
    pub fn check(&self, id: &str) -> Seen {
        match self.recent.iter().find(|(k, _)| &**k == id) {
            None => Seen::New,
            Some((_, None)) => Seen::InProgress,
            Some((_, Some(s))) => Seen::Done(*s),
        }
    }

    /// Records `id` as in progress (forgetting the oldest if full).
    pub fn start(&mut self, id: &str) {
        if self.check(id) != Seen::New {
            return;
        }
        if self.recent.len() >= self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back((id.into(), None));
    }

    /// Records the outcome of `id`.
    pub fn finish(&mut self, id: &str, status: ResultStatus) {
        if let Some(e) = self.recent.iter_mut().find(|(k, _)| &**k == id) {
            e.1 = Some(status);
        }
    }
}

/// What the device did with one incoming message.
#[derive(Debug, Default)]
pub struct Reaction {
    /// Messages to publish.
    pub out: Vec<Outgoing>,
    /// A command seen for the first time (its id).
    pub new_command: Option<String>,
    /// A command seen before.
    pub duplicate: bool,
    /// Why the message was ignored, if it was.
    pub ignored: Option<String>,
}

#[derive(Debug)]
struct PendingResult {
    due: Instant,
    cid: String,
    status: ResultStatus,
}

/// One device's state and reactions.
#[derive(Debug)]
pub struct DeviceLogic {
    id: String,
    commands: String,
    desired_topic: String,
    delta_topic: String,
    behaviour: Behaviour,
    dedup: Dedup,
    pending: VecDeque<PendingResult>,
    reported: Map<String, Value>,
    desired: Map<String, Value>,
    resync: bool,
    rng: Rng,
}

/// Commands a device remembers for deduplication.
const DEDUP_CAPACITY: usize = 64;

/// Keys of the random reports: (name, low, high).
const SENSORS: [(&str, f64, f64); 3] = [
    ("temperature", 15.0, 30.0),
    ("battery", 0.0, 100.0),
    ("rssi", -90.0, -30.0),
];

fn to_json(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
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

impl DeviceLogic {
    /// A device `id` behaving as `behaviour`, drawing choices from `rng`.
    pub fn new(id: &str, behaviour: Behaviour, rng: Rng) -> DeviceLogic {
        DeviceLogic {
            id: id.to_string(),
            commands: commands_topic(id),
            desired_topic: desired_topic(id),
            delta_topic: delta_topic(id),
            behaviour,
            dedup: Dedup::new(DEDUP_CAPACITY),
            pending: VecDeque::new(),
            reported: Map::new(),
            desired: Map::new(),
            resync: true,
            rng,
        }
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The filters to subscribe to on every connection (QoS 1). Only these
    /// three: a `devices/{id}/#` subscription would also echo back every
    /// message the device publishes itself.
    pub fn filters(&self) -> Vec<String> {
        vec![
            self.commands.clone(),
            self.desired_topic.clone(),
            self.delta_topic.clone(),
        ]
    }

    /// A new session began: the next delta is answered in full.
    pub fn session_started(&mut self) {
        self.resync = true;
    }

    /// Reacts to a message on `topic`.
    pub fn on_message(&mut self, topic: &str, payload: &[u8], now: Instant) -> Reaction {
        if topic == self.commands {
            self.on_command(payload, now)
        } else if topic == self.desired_topic {
            self.on_shadow(payload, false)
        } else if topic == self.delta_topic {
            self.on_shadow(payload, true)
        } else {
            Reaction {
                ignored: Some(format!("unexpected topic {topic}")),
                ..Reaction::default()
            }
        }
    }

    fn result_message(&self, cid: &str, status: ResultStatus) -> Outgoing {
        let output = match status {
            ResultStatus::Succeeded => json!({ "ok": true }),
            ResultStatus::Failed => json!({ "error": "simulated failure" }),
        };
        let msg = CommandResultMessage { status, output };
        Outgoing {
            kind: OutKind::Result,
            topic: result_topic(&self.id, cid),
            payload: serde_json::to_vec(&msg).unwrap_or_default(),
        }
    }

    fn on_command(&mut self, payload: &[u8], now: Instant) -> Reaction {
        let cmd = match serde_json::from_slice::<CommandMessage>(payload) {
            Ok(c) => c,
            Err(e) => {
                return Reaction {
                    ignored: Some(format!("malformed command: {e}")),
                    ..Reaction::default()
                };
            }
        };
        match self.dedup.check(&cmd.id) {
            Seen::InProgress => Reaction {
                duplicate: true,
                ..Reaction::default()
            },
            Seen::Done(status) => Reaction {
                out: vec![self.result_message(&cmd.id, status)],
                duplicate: true,
                ..Reaction::default()
            },
            Seen::New => {
                let forced = cmd.params.get("fail") == Some(&Value::Bool(true));
                let status = if forced || self.rng.chance(self.behaviour.failure_rate) {
                    ResultStatus::Failed
                } else {
                    ResultStatus::Succeeded
                };
                self.dedup.start(&cmd.id);
                self.pending.push_back(PendingResult {
                    due: now + self.behaviour.result_delay,
                    cid: cmd.id.clone(),
                    status,
                });
                Reaction {
                    out: vec![Outgoing {
                        kind: OutKind::Accepted,
                        topic: accepted_topic(&self.id, &cmd.id),
                        payload: b"{}".to_vec(),
                    }],
                    new_command: Some(cmd.id),
                    ..Reaction::default()
                }
            }
        }
    }

    fn on_shadow(&mut self, payload: &[u8], delta: bool) -> Reaction {
        let doc = match serde_json::from_slice::<ShadowDocument>(payload) {
            Ok(ShadowDocument {
                state: Value::Object(m),
                ..
            }) => m,
            Ok(_) => {
                return Reaction {
                    ignored: Some("shadow state is not an object".into()),
                    ..Reaction::default()
                };
            }
            Err(e) => {
                return Reaction {
                    ignored: Some(format!("malformed shadow document: {e}")),
                    ..Reaction::default()
                };
            }
        };
        let all = delta && std::mem::take(&mut self.resync);
        if !delta {
            self.desired = doc.clone();
        }
        let mut patch = Map::new();
        for (k, v) in doc {
            if all || !covers(self.reported.get(&k), &v) {
                patch.insert(k, v);
            }
        }
        if patch.is_empty() {
            return Reaction::default();
        }
        let patch = Value::Object(patch);
        let mut reported = Value::Object(std::mem::take(&mut self.reported));
        merge_patch(&mut reported, &patch);
        if let Value::Object(m) = reported {
            self.reported = m;
        }
        Reaction {
            out: vec![Outgoing {
                kind: OutKind::Reported,
                topic: reported_topic(&self.id),
                payload: to_json(&patch),
            }],
            ..Reaction::default()
        }
    }

    /// When the next result is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.due)
    }

    /// The results due at `now`, with their status.
    pub fn take_due(&mut self, now: Instant) -> Vec<(Outgoing, ResultStatus)> {
        let mut out = Vec::new();
        while self.pending.front().is_some_and(|p| p.due <= now) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            self.dedup.finish(&p.cid, p.status);
            out.push((self.result_message(&p.cid, p.status), p.status));
        }
        out
    }

    /// A random state change: one sensor-like key the desired state does
    /// not control (none if it controls them all).
    pub fn random_report(&mut self) -> Option<Outgoing> {
        let free: Vec<&(&str, f64, f64)> = SENSORS
            .iter()
            .filter(|(k, _, _)| !self.desired.contains_key(*k))
            .collect();
        let pick = *free.get(self.rng.below(free.len() as u64) as usize)?;
        let (key, lo, hi) = *pick;
        let raw = lo + (hi - lo) * self.rng.next_f64();
        let value = if key == "temperature" {
            json!((raw * 10.0).round() / 10.0)
        } else {
            json!(raw.round() as i64)
        };
        self.reported.insert(key.to_string(), value.clone());
        let patch = json!({ key: value });
        Some(Outgoing {
            kind: OutKind::Reported,
            topic: reported_topic(&self.id),
            payload: to_json(&patch),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logic(failure_rate: f64) -> DeviceLogic {
        DeviceLogic::new(
            "d1",
            Behaviour {
                result_delay: Duration::from_millis(10),
                failure_rate,
            },
            Rng::new(5),
        )
    }

    fn command(id: &str, params: Value) -> Vec<u8> {
        serde_json::to_vec(&CommandMessage {
            id: id.into(),
            name: "n".into(),
            params,
            issued_at: 1,
            expires_at: 2,
        })
        .expect("json")
    }

    fn doc(state: Value, version: u64) -> Vec<u8> {
        serde_json::to_vec(&ShadowDocument { state, version }).expect("json")
    }

    fn status_of(o: &Outgoing) -> ResultStatus {
        serde_json::from_slice::<CommandResultMessage>(&o.payload)
            .expect("result")
            .status
    }

    #[test]
    fn dedup_remembers_outcomes_and_forgets_the_oldest() {
        let mut d = Dedup::new(2);
        assert_eq!(d.check("a"), Seen::New);
        d.start("a");
        assert_eq!(d.check("a"), Seen::InProgress);
        d.finish("a", ResultStatus::Failed);
        assert_eq!(d.check("a"), Seen::Done(ResultStatus::Failed));
        d.start("a");
        assert_eq!(d.check("a"), Seen::Done(ResultStatus::Failed), "no reset");
        d.start("b");
        d.start("c");
        assert_eq!(d.check("a"), Seen::New, "the oldest is forgotten");
        assert_eq!(d.check("c"), Seen::InProgress);
    }

    #[test]
    fn a_command_is_accepted_then_answered_once_and_redeliveries_deduplicated() {
        let mut l = logic(0.0);
        let t0 = Instant::now();
        let r = l.on_message("devices/d1/commands", &command("c1", json!({})), t0);
        assert_eq!(r.new_command.as_deref(), Some("c1"));
        assert_eq!(r.out.len(), 1);
        assert_eq!(r.out[0].kind, OutKind::Accepted);
        assert_eq!(r.out[0].topic, "devices/d1/commands/c1/accepted");
        assert_eq!(l.next_due(), Some(t0 + Duration::from_millis(10)));
        assert!(l.take_due(t0).is_empty(), "not before the delay");

        let again = l.on_message("devices/d1/commands", &command("c1", json!({})), t0);
        assert!(again.duplicate && again.out.is_empty() && again.new_command.is_none());

        let due = l.take_due(t0 + Duration::from_millis(10));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0.topic, "devices/d1/commands/c1/result");
        assert_eq!(due[0].1, ResultStatus::Succeeded);
        assert_eq!(l.next_due(), None);

        // Redelivered after the result: the same result again, no new work.
        let late = l.on_message("devices/d1/commands", &command("c1", json!({})), t0);
        assert!(late.duplicate);
        assert_eq!(late.out.len(), 1);
        assert_eq!(status_of(&late.out[0]), ResultStatus::Succeeded);
        assert!(l.take_due(t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn forced_and_random_failures() {
        let mut l = logic(0.0);
        let t0 = Instant::now();
        l.on_message(
            "devices/d1/commands",
            &command("c1", json!({"fail": true})),
            t0,
        );
        l.on_message(
            "devices/d1/commands",
            &command("c2", json!({"fail": false})),
            t0,
        );
        let due = l.take_due(t0 + Duration::from_secs(1));
        assert_eq!(due[0].1, ResultStatus::Failed);
        assert_eq!(due[1].1, ResultStatus::Succeeded);

        let mut always = logic(1.0);
        always.on_message("devices/d1/commands", &command("c", json!(null)), t0);
        assert_eq!(
            always.take_due(t0 + Duration::from_secs(1))[0].1,
            ResultStatus::Failed
        );
    }

    #[test]
    fn garbage_is_ignored() {
        let mut l = logic(0.0);
        let t0 = Instant::now();
        assert!(
            l.on_message("devices/d1/commands", b"{", t0)
                .ignored
                .is_some()
        );
        assert!(
            l.on_message("devices/d1/shadow/delta", &doc(json!([1]), 1), t0)
                .ignored
                .is_some()
        );
        assert!(l.on_message("elsewhere", b"{}", t0).ignored.is_some());
    }

    #[test]
    fn desired_state_is_applied_and_reported_once() {
        let mut l = logic(0.0);
        let t0 = Instant::now();
        let want = json!({"speed": 3, "mode": {"a": 1}});
        let r = l.on_message("devices/d1/shadow/desired", &doc(want.clone(), 1), t0);
        assert_eq!(r.out.len(), 1);
        assert_eq!(r.out[0].topic, "devices/d1/shadow/reported");
        let patch: Value = serde_json::from_slice(&r.out[0].payload).expect("json");
        assert_eq!(patch, want);
        // The first delta of the session is answered in full, even though
        // the device already applied it.
        let d1 = l.on_message("devices/d1/shadow/delta", &doc(want.clone(), 1), t0);
        assert_eq!(d1.out.len(), 1);
        // Later deltas only for what differs.
        let d2 = l.on_message("devices/d1/shadow/delta", &doc(want.clone(), 1), t0);
        assert!(d2.out.is_empty());
        let d3 = l.on_message(
            "devices/d1/shadow/delta",
            &doc(json!({"mode": {"b": 2}}), 2),
            t0,
        );
        let patch: Value = serde_json::from_slice(&d3.out[0].payload).expect("json");
        assert_eq!(patch, json!({"mode": {"b": 2}}));
        l.session_started();
        let d4 = l.on_message("devices/d1/shadow/delta", &doc(json!({}), 2), t0);
        assert!(d4.out.is_empty(), "an empty delta needs nothing");
    }

    #[test]
    fn random_reports_avoid_desired_keys() {
        let mut l = logic(0.0);
        let t0 = Instant::now();
        l.on_message(
            "devices/d1/shadow/desired",
            &doc(json!({"temperature": 20, "battery": 50}), 1),
            t0,
        );
        for _ in 0..20 {
            let r = l.random_report().expect("rssi is free");
            let patch: Value = serde_json::from_slice(&r.payload).expect("json");
            assert!(patch.get("rssi").is_some(), "{patch}");
        }
        l.on_message(
            "devices/d1/shadow/desired",
            &doc(json!({"temperature": 1, "battery": 2, "rssi": 3}), 2),
            t0,
        );
        assert!(l.random_report().is_none());
    }

    #[test]
    fn merge_patch_and_covers_follow_rfc_7386() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut v, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(v, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
        assert!(covers(Some(&v), &json!({"b": {"c": 5}})));
        assert!(!covers(Some(&v), &json!({"b": {"c": 6}})));
        assert!(!covers(None, &json!(1)));
    }
}
