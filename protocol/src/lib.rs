//! Entente's MQTT contract (docs/ARCHITECTURE.md, "Devices over MQTT"): the topic names and payloads a device
//! and its gateway exchange. Used by the gateway and by device simulators, so
//! both sides agree by construction.
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `devices/{id}/commands` | gateway → device | [`CommandMessage`] |
//! | `devices/{id}/commands/{cid}/accepted` | device → gateway | [`AcceptedMessage`] (`{}`) |
//! | `devices/{id}/commands/{cid}/result` | device → gateway | [`CommandResultMessage`] |
//! | `devices/{id}/shadow/reported` | device → gateway | [`ReportedPatch`] (JSON merge patch, an object) |
//! | `devices/{id}/shadow/desired` | gateway → device | [`ShadowDocument`] (full desired) |
//! | `devices/{id}/shadow/delta` | gateway → device | [`ShadowDocument`] (desired ≠ reported) |
//!
//! [`Topic::ALL`] lists these topics and [`Payload::ALL`] their payloads;
//! [`asyncapi::document`] describes the whole contract as an AsyncAPI 3.0
//! document (the gateway serves it at `/asyncapi.json`), its payload
//! schemas derived from these types.
#![deny(missing_docs)]

pub mod asyncapi;
pub mod reason_codes;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Every device topic starts with this, then the device id.
pub const PREFIX: &str = "devices/";

/// `devices/{id}/` — the only namespace a device may use.
pub fn device_namespace(device: &str) -> String {
    format!("{PREFIX}{device}/")
}

/// `devices/{id}/commands` (gateway → device).
pub fn commands_topic(device: &str) -> String {
    format!("{PREFIX}{device}/commands")
}

/// `devices/{id}/commands/{cid}/accepted` (device → gateway).
pub fn accepted_topic(device: &str, cid: &str) -> String {
    format!("{PREFIX}{device}/commands/{cid}/accepted")
}

/// `devices/{id}/commands/{cid}/result` (device → gateway).
pub fn result_topic(device: &str, cid: &str) -> String {
    format!("{PREFIX}{device}/commands/{cid}/result")
}

/// `devices/{id}/shadow/reported` (device → gateway).
pub fn reported_topic(device: &str) -> String {
    format!("{PREFIX}{device}/shadow/reported")
}

/// `devices/{id}/shadow/desired` (gateway → device).
pub fn desired_topic(device: &str) -> String {
    format!("{PREFIX}{device}/shadow/desired")
}

/// `devices/{id}/shadow/delta` (gateway → device).
pub fn delta_topic(device: &str) -> String {
    format!("{PREFIX}{device}/shadow/delta")
}

/// Every topic of the contract, as a list: the AsyncAPI document has a
/// channel for each, and each one's name is built by the function of this
/// crate the gateway and devices use (`commands_topic`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// `devices/{id}/commands` (gateway → device).
    Commands,
    /// `devices/{id}/commands/{cid}/accepted` (device → gateway).
    Accepted,
    /// `devices/{id}/commands/{cid}/result` (device → gateway).
    Result,
    /// `devices/{id}/shadow/reported` (device → gateway).
    Reported,
    /// `devices/{id}/shadow/desired` (gateway → device).
    Desired,
    /// `devices/{id}/shadow/delta` (gateway → device).
    Delta,
}

impl Topic {
    /// Every topic, in the order a device meets them.
    pub const ALL: [Topic; 6] = [
        Topic::Commands,
        Topic::Accepted,
        Topic::Result,
        Topic::Reported,
        Topic::Desired,
        Topic::Delta,
    ];

    /// The topic's name for `device` (and command `cid`, for the two
    /// topics that carry one; ignored by the others).
    pub fn name(self, device: &str, cid: &str) -> String {
        match self {
            Topic::Commands => commands_topic(device),
            Topic::Accepted => accepted_topic(device, cid),
            Topic::Result => result_topic(device, cid),
            Topic::Reported => reported_topic(device),
            Topic::Desired => desired_topic(device),
            Topic::Delta => delta_topic(device),
        }
    }

    /// The name as a template: `{deviceId}` and `{commandId}` in place of
    /// the ids (an AsyncAPI channel address).
    pub fn template(self) -> String {
        self.name("{deviceId}", "{commandId}")
    }

    /// Whether devices publish to it (else the gateway does, and devices
    /// subscribe).
    pub fn from_device(self) -> bool {
        matches!(self, Topic::Accepted | Topic::Result | Topic::Reported)
    }

    /// What it carries.
    pub fn payload(self) -> Payload {
        match self {
            Topic::Commands => Payload::Command,
            Topic::Accepted => Payload::Accepted,
            Topic::Result => Payload::Result,
            Topic::Reported => Payload::ReportedPatch,
            Topic::Desired | Topic::Delta => Payload::Shadow,
        }
    }
}

/// Every payload of the contract, as a list: the AsyncAPI document has a
/// schema for each (`components/schemas`, named [`Payload::schema_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Payload {
    /// [`CommandMessage`].
    Command,
    /// [`AcceptedMessage`].
    Accepted,
    /// [`CommandResultMessage`] (with [`ResultStatus`]).
    Result,
    /// [`ReportedPatch`].
    ReportedPatch,
    /// [`ShadowDocument`].
    Shadow,
}

impl Payload {
    /// Every payload.
    pub const ALL: [Payload; 5] = [
        Payload::Command,
        Payload::Accepted,
        Payload::Result,
        Payload::ReportedPatch,
        Payload::Shadow,
    ];

    /// The name of its Rust type, which is its schema's name.
    pub fn schema_name(self) -> &'static str {
        match self {
            Payload::Command => "CommandMessage",
            Payload::Accepted => "AcceptedMessage",
            Payload::Result => "CommandResultMessage",
            Payload::ReportedPatch => "ReportedPatch",
            Payload::Shadow => "ShadowDocument",
        }
    }
}

/// A topic a device may publish to, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePublish {
    /// `devices/{id}/commands/{cid}/accepted`.
    Accepted {
        /// Command id.
        cid: String,
    },
    /// `devices/{id}/commands/{cid}/result`.
    Result {
        /// Command id.
        cid: String,
    },
    /// `devices/{id}/shadow/reported`.
    Reported,
}

/// Parses `topic` as one that `device` may publish to; `None` for anything
/// else (another device's topics, unknown topics, wildcards).
pub fn parse_device_publish(device: &str, topic: &str) -> Option<DevicePublish> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix(device)?;
    let rest = rest.strip_prefix('/')?;
    if rest == "shadow/reported" {
        return Some(DevicePublish::Reported);
    }
    let rest = rest.strip_prefix("commands/")?;
    let (cid, what) = rest.split_once('/')?;
    if cid.is_empty() || cid.contains(['+', '#', '/']) {
        return None;
    }
    match what {
        "accepted" => Some(DevicePublish::Accepted { cid: cid.into() }),
        "result" => Some(DevicePublish::Result { cid: cid.into() }),
        _ => None,
    }
}

/// Whether an MQTT topic `filter` (with `+` and `#` wildcards) matches `topic`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A command, as published on `devices/{id}/commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandMessage {
    /// Command id (devices deduplicate by it: delivery is at least once).
    pub id: String,
    /// Command name.
    pub name: String,
    /// Parameters: any JSON value the command was issued with.
    pub params: Value,
    /// Issue time (ms since the Unix epoch).
    pub issued_at: u64,
    /// Expiry time (ms since the Unix epoch).
    pub expires_at: u64,
}

/// How a command ended, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// It worked.
    Succeeded,
    /// It did not.
    Failed,
}

/// A command's result, published on `devices/{id}/commands/{cid}/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandResultMessage {
    /// `succeeded` or `failed`.
    pub status: ResultStatus,
    /// What the device returned: any JSON value (`null` if absent).
    #[serde(default)]
    pub output: Value,
}

/// A shadow document: the full desired state on `shadow/desired`, the keys
/// where desired differs from reported on `shadow/delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShadowDocument {
    /// The state (a JSON object).
    #[schemars(extend("type" = "object"))]
    pub state: Value,
    /// The shadow's desired version.
    pub version: u64,
}

/// What a device publishes on `devices/{id}/commands/{cid}/accepted`: `{}`
/// (the gateway reads only the topic; any payload is taken as this).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AcceptedMessage {}

/// What a device publishes on `devices/{id}/shadow/reported`: an RFC 7386
/// JSON merge patch of its reported state — a JSON object (`null` removes a
/// key, nested objects merge; see [`merge_patch`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct ReportedPatch(pub Map<String, Value>);

/// Applies an RFC 7386 merge patch to `target` in place.
///
/// An object patch merges key by key (`null` removes a key, nested objects
/// merge recursively, a non-object target becomes an object first); any
/// other patch (array, string, number, bool, null) replaces the target whole.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_topics_parse_only_for_their_device() {
        assert_eq!(
            parse_device_publish("d1", &accepted_topic("d1", "c1")),
            Some(DevicePublish::Accepted { cid: "c1".into() })
        );
        assert_eq!(
            parse_device_publish("d1", &result_topic("d1", "c1")),
            Some(DevicePublish::Result { cid: "c1".into() })
        );
        assert_eq!(
            parse_device_publish("d1", &reported_topic("d1")),
            Some(DevicePublish::Reported)
        );
        assert_eq!(parse_device_publish("d1", &reported_topic("d10")), None);
        assert_eq!(parse_device_publish("d1", &result_topic("d2", "c1")), None);
        assert_eq!(parse_device_publish("d1", &commands_topic("d1")), None);
        assert_eq!(
            parse_device_publish("d1", "devices/d1/commands/+/result"),
            None
        );
        assert_eq!(
            parse_device_publish("d1", "devices/d1/commands//result"),
            None
        );
        assert_eq!(
            parse_device_publish("d1", "devices/d1/shadow/desired"),
            None
        );
    }

    #[test]
    fn filters_match_like_mqtt() {
        assert!(filter_matches("devices/d1/#", "devices/d1/commands"));
        assert!(filter_matches("devices/d1/+", "devices/d1/commands"));
        assert!(filter_matches(
            "devices/d1/shadow/+",
            "devices/d1/shadow/delta"
        ));
        assert!(!filter_matches(
            "devices/d1/shadow/+",
            "devices/d1/commands"
        ));
        assert!(!filter_matches(
            "devices/d1/commands",
            "devices/d1/commands/x"
        ));
        assert!(filter_matches("devices/d1/commands", "devices/d1/commands"));
    }

    #[test]
    fn payloads_round_trip() {
        let r: CommandResultMessage =
            serde_json::from_str(r#"{"status":"failed"}"#).expect("parse");
        assert_eq!(r.status, ResultStatus::Failed);
        assert_eq!(r.output, Value::Null);
        assert!(serde_json::from_str::<CommandResultMessage>(r#"{"status":"maybe"}"#).is_err());
    }
}
