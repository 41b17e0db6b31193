//! The device's message handling fed arbitrary input — any topic, any
//! payload, JSON of the right shape with the wrong types, interleaved with
//! the application's calls with arbitrary ids: it never panics, its outbox
//! stays within its bound, and everything it would publish is on one of the
//! device's own topics with a payload a gateway takes.

use std::time::Duration;

use entente_device::state::{DeviceState, Incoming, MAX_PAYLOAD};
use entente_protocol::{ResultStatus, parse_device_publish};
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::time::Instant;

const OUTBOX: usize = 6;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("devices/d1/commands".to_string()),
        Just("devices/d1/shadow/desired".to_string()),
        Just("devices/d1/shadow/delta".to_string()),
        Just("devices/d2/commands".to_string()),
        ".{0,40}",
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        // Commands with arbitrary ids (wildcards, slashes, long) and fields.
        (".{0,300}", json_value(), json_value()).prop_map(|(id, name, params)| {
            serde_json::to_vec(&json!({"id": id, "name": name, "params": params,
                "issued_at": 1, "expires_at": 2}))
            .unwrap_or_default()
        }),
        (
            prop::sample::select(vec!["c1", "c2", "c/3", "+"]),
            json_value()
        )
            .prop_map(|(id, params)| {
                serde_json::to_vec(&json!({"id": id, "name": "n", "params": params,
                "issued_at": 1, "expires_at": 2}))
                .unwrap_or_default()
            }),
        // Shadow documents whose state and version are anything.
        (json_value(), json_value()).prop_map(|(state, version)| {
            serde_json::to_vec(&json!({"state": state, "version": version})).unwrap_or_default()
        }),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        // Deeply nested JSON (past serde_json's recursion limit).
        (1usize..400).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Message(String, Vec<u8>),
    Accept(String),
    Complete(String, bool, Value),
    Report(Value),
    Release(u64),
    Drain(usize),
    NewSession,
}

fn step() -> impl Strategy<Value = Step> {
    let id = prop::sample::select(vec!["c1", "c2", "c/3", "+", "x"]).prop_map(str::to_string);
    prop_oneof![
        4 => (topic(), payload()).prop_map(|(t, p)| Step::Message(t, p)),
        1 => id.clone().prop_map(Step::Accept),
        1 => (id, any::<bool>(), json_value()).prop_map(|(i, ok, o)| Step::Complete(i, ok, o)),
        1 => json_value().prop_map(Step::Report),
        1 => (0u64..200).prop_map(Step::Release),
        1 => (0usize..4).prop_map(Step::Drain),
        1 => Just(Step::NewSession),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("ENTENTE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_input_never_panics_and_keeps_the_bounds(steps in prop::collection::vec(step(), 1..40)) {
        let t0 = Instant::now();
        let mut s = DeviceState::new("d1", OUTBOX, 3, Duration::from_millis(50));
        for st in steps {
            match st {
                Step::Message(t, p) => {
                    let what = s.on_message(&t, &p);
                    if let Incoming::Command(c) = &what {
                        prop_assert!(!c.id.contains(['/', '+', '#']) && !c.id.is_empty());
                    }
                    if !t.starts_with("devices/d1/") {
                        prop_assert!(matches!(what, Incoming::Ignored(_)), "{t}: {what:?}");
                    }
                }
                Step::Accept(id) => { let _ = s.accept(&id); }
                Step::Complete(id, ok, out) => {
                    let status = if ok { ResultStatus::Succeeded } else { ResultStatus::Failed };
                    let _ = s.complete(&id, status, out);
                }
                Step::Report(v) => { let _ = s.report(v, t0); }
                Step::Release(ms) => s.release_report(t0 + Duration::from_millis(ms)),
                Step::Drain(n) => for _ in 0..n {
                    let Some(o) = s.pop_outgoing() else { break };
                    prop_assert!(parse_device_publish("d1", &o.topic).is_some(), "{}", o.topic);
                    prop_assert!(o.payload.len() <= MAX_PAYLOAD);
                    prop_assert!(serde_json::from_slice::<Value>(&o.payload).is_ok());
                },
                Step::NewSession => s.session_started(),
            }
            prop_assert!(s.outbox_len() <= OUTBOX, "outbox {}", s.outbox_len());
        }
    }
}
