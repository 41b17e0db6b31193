//! What a simulated device decides — pure choices, no I/O. Everything
//! else a device does (de-duplication, answers sent until acknowledged,
//! shadow, reports, failover) is the device library's, `entente-device`,
//! which the fleet (`fleet.rs`) runs for every simulated device, as a real
//! device would.
//!
//! - Commands: `accepted` at once, the result after the configured delay;
//!   `failed` with the configured probability, and always when the
//!   parameters contain `"fail": true`.
//! - Shadow: a delta is applied by reporting it.
//! - Random reports: a patch of one sensor-like key the desired state does
//!   not control.

use std::time::Duration;

use entente_protocol::ResultStatus;
use serde_json::{Map, Value, json};

use crate::rng::Rng;

/// How devices answer.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Delay between `accepted` and `result`.
    pub result_delay: Duration,
    /// Probability that a command fails (besides `"fail": true`).
    pub failure_rate: f64,
}

impl Behaviour {
    /// How a command with `params` ends.
    pub fn outcome(&self, params: &Value, rng: &mut Rng) -> ResultStatus {
        let forced = params.get("fail") == Some(&Value::Bool(true));
        if forced || rng.chance(self.failure_rate) {
            ResultStatus::Failed
        } else {
            ResultStatus::Succeeded
        }
    }
}

/// The output a simulated device returns with a result.
pub fn output(status: ResultStatus) -> Value {
    match status {
        ResultStatus::Succeeded => json!({ "ok": true }),
        ResultStatus::Failed => json!({ "error": "simulated failure" }),
    }
}

/// Keys of the random reports: (name, low, high).
const SENSORS: [(&str, f64, f64); 3] = [
    ("temperature", 15.0, 30.0),
    ("battery", 0.0, 100.0),
    ("rssi", -90.0, -30.0),
];

/// A random state change: one sensor-like key `desired` does not control
/// (none if it controls them all).
pub fn random_report(desired: &Map<String, Value>, rng: &mut Rng) -> Option<Value> {
    let free: Vec<&(&str, f64, f64)> = SENSORS
        .iter()
        .filter(|(k, _, _)| !desired.contains_key(*k))
        .collect();
    let pick = *free.get(rng.below(free.len() as u64) as usize)?;
    let (key, lo, hi) = *pick;
    let raw = lo + (hi - lo) * rng.next_f64();
    let value = if key == "temperature" {
        json!((raw * 10.0).round() / 10.0)
    } else {
        json!(raw.round() as i64)
    };
    Some(json!({ key: value }))
}

pub use entente_device::state::covers;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_and_random_failures() {
        let b = Behaviour {
            result_delay: Duration::ZERO,
            failure_rate: 0.0,
        };
        let mut rng = Rng::new(5);
        assert_eq!(
            b.outcome(&json!({"fail": true}), &mut rng),
            ResultStatus::Failed
        );
        assert_eq!(
            b.outcome(&json!({"fail": false}), &mut rng),
            ResultStatus::Succeeded
        );
        assert_eq!(b.outcome(&json!(null), &mut rng), ResultStatus::Succeeded);
        let always = Behaviour {
            result_delay: Duration::ZERO,
            failure_rate: 1.0,
        };
        assert_eq!(always.outcome(&json!(null), &mut rng), ResultStatus::Failed);
        assert_eq!(output(ResultStatus::Succeeded), json!({"ok": true}));
    }

    #[test]
    fn random_reports_avoid_desired_keys() {
        let mut rng = Rng::new(5);
        let mut desired = Map::new();
        desired.insert("temperature".into(), json!(20));
        desired.insert("battery".into(), json!(50));
        for _ in 0..20 {
            let patch = random_report(&desired, &mut rng).expect("rssi is free");
            assert!(patch.get("rssi").is_some(), "{patch}");
        }
        desired.insert("rssi".into(), json!(3));
        assert!(random_report(&desired, &mut rng).is_none());
    }
}
