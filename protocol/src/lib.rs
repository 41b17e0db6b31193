//! Entente's MQTT contract (docs/ARCHITECTURE.md, "Devices over MQTT"): the topic names and payloads a device
//! and its gateway exchange. Used by the gateway and by device simulators, so
//! both sides agree by construction.
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `devices/{id}/commands` | gateway → device | [`CommandMessage`] |
//! | `devices/{id}/commands/{cid}/accepted` | device → gateway | `{}` |
//! | `devices/{id}/commands/{cid}/result` | device → gateway | [`CommandResultMessage`] |
//! | `devices/{id}/shadow/reported` | device → gateway | JSON merge patch (object) |
//! | `devices/{id}/shadow/desired` | gateway → device | [`ShadowDocument`] (full desired) |
//! | `devices/{id}/shadow/delta` | gateway → device | [`ShadowDocument`] (desired ≠ reported) |
#![deny(missing_docs)]

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMessage {
    /// Command id (devices deduplicate by it: delivery is at least once).
    pub id: String,
    /// Command name.
    pub name: String,
    /// Parameters.
    pub params: Value,
    /// Issue time (ms since the Unix epoch).
    pub issued_at: u64,
    /// Expiry time (ms since the Unix epoch).
    pub expires_at: u64,
}

/// How a command ended, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// It worked.
    Succeeded,
    /// It did not.
    Failed,
}

/// A command's result, published on `devices/{id}/commands/{cid}/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResultMessage {
    /// `succeeded` or `failed`.
    pub status: ResultStatus,
    /// What the device returned (any JSON; `null` if absent).
    #[serde(default)]
    pub output: Value,
}

/// A shadow document: the full desired state on `shadow/desired`, the keys
/// where desired differs from reported on `shadow/delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowDocument {
    /// The state (a JSON object).
    pub state: Value,
    /// The shadow's desired version.
    pub version: u64,
}

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
