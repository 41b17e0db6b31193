//! Property: every operation built from input the API (or the MQTT side's
//! checks) accepts encodes into a log entry that decodes to that very
//! operation — so no request can put an entry into the log that a member
//! cannot read, or that reads back as something else.
//!
//! Inputs are generated as raw JSON text (so integer literals beyond 64 bits,
//! escapes and nesting past the decoder's limit all occur) and go through
//! the same functions the handlers use: [`parse_body`], then the handler's
//! op builder (`register_op`, `update_op`, `desired_op`, `issue_op`,
//! `create_op` of jobs), then
//! the last check of `write` ([`limits::check_op`]). Device messages go
//! through [`limits::parse_value`] / `check_op`. Inputs refused on the way
//! are counted, and some of each kind must be accepted and some refused,
//! so the generators cannot silently degenerate. Fixed seed, 256 cases.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;

use super::commands::{NewCommand, issue_op};
use super::devices::{DeviceUpdate, NewDevice, register_op, update_op};
use super::error::ApiError;
use super::extract::parse_body;
use super::jobs::{NewJob, create_op};
use super::shadow::{ShadowPatch, desired_op};
use crate::limits::{self, MAX_DEPTH};
use crate::ops::{Op, Proposal};

/// The seed of every run (change it to explore; failures print the input).
const SEED: [u8; 32] = *b"entente entries decode as issued";

/// A JSON number as text: small, at and beyond the 64-bit bounds, floats
/// in every notation.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i32>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just(i64::MIN.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-9223372036854775809".to_string()),
        "[1-9][0-9]{19,40}",
        "-[1-9][0-9]{19,40}",
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        (any::<u32>(), 0u32..20, -330i32..330).prop_map(|(m, d, e)| format!("{m}.{d}E{e}")),
        Just("-0".to_string()),
        Just("0.30000000000000004".to_string()),
        Just("2.2250738585072011e-308".to_string()),
    ]
}

/// A JSON string as text: any characters, escaped as serde_json does or
/// (for some) every character as `\u` escapes.
fn string() -> impl Strategy<Value = String> {
    (prop::collection::vec(any::<char>(), 0..12), any::<bool>()).prop_map(|(chars, uescape)| {
        let s: String = chars.into_iter().collect();
        if uescape {
            let mut out = String::from("\"");
            for u in s.encode_utf16() {
                out.push_str(&format!("\\u{u:04x}"));
            }
            out.push('"');
            out
        } else {
            serde_json::to_string(&s).unwrap_or_else(|_| "\"\"".into())
        }
    })
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        number(),
        string(),
    ]
}

/// Any JSON value as text: a random tree, or a chain nested around the
/// depth limit and up to past the decoder's (128).
fn json() -> impl Strategy<Value = String> {
    let tree = scalar().prop_recursive(6, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((string(), inner), 0..5).prop_map(|kv| {
                let members: Vec<String> =
                    kv.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    });
    let depth = prop_oneof![(MAX_DEPTH - 3)..(MAX_DEPTH + 3), 0usize..140,];
    let chain = (depth, scalar())
        .prop_flat_map(|(n, leaf)| (prop::collection::vec(any::<bool>(), n), Just(leaf)))
        .prop_map(|(levels, leaf)| {
            let mut s = leaf;
            for object in levels {
                s = if object {
                    format!("{{\"k\":{s}}}")
                } else {
                    format!("[{s}]")
                };
            }
            s
        });
    prop_oneof![3 => tree, 1 => chain]
}

/// A JSON object as text (what patches and attributes must be), most of the
/// time; anything else sometimes.
fn object() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec((string(), json()), 0..4).prop_map(|kv| {
            let members: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("{{{}}}", members.join(","))
        }),
        1 => json(),
    ]
}

/// An id: mostly from the id alphabet (dot segments included), sometimes
/// anything.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[A-Za-z0-9_.-]{1,8}",
        1 => Just(".".to_string()),
        1 => Just("..".to_string()),
        1 => "[A-Za-z0-9_.-]{60,70}",
        1 => prop::collection::vec(any::<char>(), 0..8).prop_map(|c| c.into_iter().collect()),
    ]
}

fn labels() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            "[A-Za-z0-9_./-]{0,4}|\\PC{0,3}",
            prop::collection::vec(any::<char>(), 0..6),
        ),
        0..3,
    )
    .prop_map(|kv| {
        let members: Vec<String> = kv
            .into_iter()
            .map(|(k, v)| {
                let v: String = v.into_iter().collect();
                format!("{}:{}", json_str(&k), json_str(&v))
            })
            .collect();
        format!("{{{}}}", members.join(","))
    })
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A count as text: mostly a small integer, sometimes any number.
fn count() -> impl Strategy<Value = String> {
    prop_oneof![
        9 => (1u64..2000).prop_map(|n| n.to_string()),
        1 => number(),
    ]
}

/// One input to the gateway.
#[derive(Debug, Clone)]
enum Input {
    /// `POST /v1/devices` with this body.
    Register(String),
    /// `PATCH /v1/devices/{id}` with this body.
    Update(String, String),
    /// `PATCH /v1/devices/{id}/shadow` with this body.
    Desired(String, String, Option<u64>),
    /// `POST /v1/devices/{id}/commands` with this body.
    Issue(String, String),
    /// A device's reported-state payload.
    Reported(String, String),
    /// A device's command-result payload (`output` part).
    Output(String),
    /// `POST /v1/jobs` with this body.
    Job(String),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        (id(), labels(), object()).prop_map(|(id, l, a)| Input::Register(format!(
            "{{\"id\":{},\"labels\":{l},\"attributes\":{a}}}",
            json_str(&id)
        ))),
        (id(), labels(), object())
            .prop_map(|(id, l, a)| Input::Update(id, format!("{{\"labels\":{l},\"attributes\":{a}}}"))),
        (id(), object(), any::<Option<u64>>())
            .prop_map(|(id, d, v)| Input::Desired(id, format!("{{\"desired\":{d}}}"), v)),
        (id(), string(), json(), 0u64..1_000_000_000, string()).prop_map(
            |(id, name, params, ttl, key)| Input::Issue(
                id,
                format!(
                    "{{\"name\":{name},\"params\":{params},\"ttl_ms\":{ttl},\"idempotency_key\":{key}}}"
                )
            )
        ),
        (id(), object()).prop_map(|(id, p)| Input::Reported(id, p)),
        json().prop_map(Input::Output),
        (
            (string(), json()),
            prop_oneof![
                prop::collection::vec(id(), 1..4).prop_map(|ids| {
                    let ids: Vec<String> = ids.iter().map(|i| json_str(i)).collect();
                    format!("{{\"devices\":[{}]}}", ids.join(","))
                }),
                labels().prop_map(|l| format!("{{\"labels\":{l}}}")),
            ],
            (count(), count(), 0u64..120, count()),
            (count(), count()),
        )
            .prop_map(|((name, params), target, (rate, flight, pct, min), (timeout, at))| {
                Input::Job(format!(
                    "{{\"command\":{{\"name\":{name},\"params\":{params}}},\"target\":{target},\
                     \"rollout\":{{\"max_per_minute\":{rate},\"max_in_flight\":{flight}}},\
                     \"abort\":{{\"failure_percent\":{pct},\"min_finished\":{min}}},\
                     \"timeout_ms\":{timeout},\"start_at\":{at}}}"
                ))
            }),
    ]
}

/// What the gateway would propose for `input`, or why it refuses.
fn op_for(input: &Input) -> Result<Op, String> {
    let api = |e: ApiError| e.to_string();
    let op = match input {
        Input::Register(body) => register_op(
            parse_body::<NewDevice>(body.as_bytes()).map_err(api)?,
            "h".into(),
        )
        .map_err(api)?,
        Input::Update(id, body) => update_op(
            id,
            parse_body::<DeviceUpdate>(body.as_bytes()).map_err(api)?,
        )
        .map_err(api)?,
        Input::Desired(id, body, v) => desired_op(
            id,
            parse_body::<ShadowPatch>(body.as_bytes()).map_err(api)?,
            *v,
        )
        .map_err(api)?,
        Input::Issue(id, body) => issue_op(
            id,
            parse_body::<NewCommand>(body.as_bytes()).map_err(api)?,
            "c-1".into(),
        )
        .map_err(api)?,
        Input::Reported(device, payload) => {
            let patch = limits::parse_value("the reported-state patch", payload.as_bytes())
                .map_err(|e| e.to_string())?;
            if !patch.is_object() {
                return Err("not an object".into());
            }
            Op::ReportState {
                device: device.clone(),
                patch,
            }
        }
        Input::Job(body) => create_op(
            parse_body::<NewJob>(body.as_bytes()).map_err(api)?,
            "j-1".into(),
        )
        .map_err(api)?,
        Input::Output(payload) => {
            let output: Value = limits::parse_value("the command output", payload.as_bytes())
                .map_err(|e| e.to_string())?;
            Op::CommandResult {
                cid: "c-1".into(),
                succeeded: true,
                output,
            }
        }
    };
    // What `write` checks last, and what the MQTT side calls before proposing.
    limits::check_op(&op).map_err(|e| e.to_string())?;
    Ok(op)
}

#[test]
fn every_accepted_input_is_an_entry_that_decodes_to_its_operation() {
    let mut config = Config::with_cases(256);
    config.failure_persistence = None;
    config.rng_algorithm = RngAlgorithm::ChaCha;
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &SEED));
    let accepted = std::cell::Cell::new(0u32);
    let refused = std::cell::Cell::new(0u32);
    let jobs = std::cell::Cell::new(0u32);
    let result = runner.run(&prop::collection::vec(input(), 8), |inputs| {
        for input in inputs {
            let Ok(op) = op_for(&input) else {
                refused.set(refused.get() + 1);
                continue;
            };
            accepted.set(accepted.get() + 1);
            if matches!(op, Op::CreateJob { .. }) {
                jobs.set(jobs.get() + 1);
            }
            let proposal = Proposal {
                ts_ms: 1,
                op,
                by: None,
            };
            let decoded = Proposal::decode(&proposal.encode())
                .map_err(|e| TestCaseError::fail(format!("{input:?} does not decode: {e}")))?;
            prop_assert_eq!(&decoded, &proposal, "{:?}", input);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(accepted.get() > 500, "accepted {}", accepted.get());
    assert!(refused.get() > 200, "refused {}", refused.get());
    assert!(jobs.get() > 10, "jobs accepted {}", jobs.get());
}

#[test]
fn the_limits_are_what_keeps_entries_decodable() {
    // Without the depth check, a value the request parser accepts makes an
    // entry the decoder refuses: the limit is not merely cosmetic.
    let mut v = Value::from(1);
    for _ in 0..126 {
        v = serde_json::json!({ "k": v });
    }
    let body = serde_json::json!({ "desired": v }).to_string();
    let parsed: ShadowPatch = parse_body(body.as_bytes()).expect("the body parses");
    let op = Op::SetDesired {
        device: "d".into(),
        patch: parsed.desired.clone(),
        expected_version: None,
    };
    assert!(
        Proposal::decode(
            &Proposal {
                ts_ms: 1,
                op,
                by: None
            }
            .encode()
        )
        .is_err()
    );
    assert!(desired_op("d", parsed, None).is_err());
}
