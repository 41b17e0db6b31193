//! JSON merge patch (RFC 7386) and the shadow delta.

use serde_json::{Map, Value};

/// Applies an RFC 7386 merge patch (defined with the device contract, which
/// devices apply to their desired state too).
pub use entente_protocol::merge_patch;

/// The keys of `desired` whose value differs from `reported`, with the
/// desired value. Objects present on both sides are compared recursively and
/// contribute only their differing sub-keys; anything else (arrays included)
/// is compared whole. Numbers compare by value (`1` equals `1.0`).
/// Always returns an object.
pub fn delta(desired: &Value, reported: &Value) -> Value {
    let mut out = Map::new();
    if let Value::Object(d) = desired {
        for (k, dv) in d {
            match reported.get(k) {
                None => {
                    out.insert(k.clone(), dv.clone());
                }
                Some(rv) => {
                    if dv.is_object() && rv.is_object() {
                        let sub = delta(dv, rv);
                        if sub.as_object().is_some_and(|m| !m.is_empty()) {
                            out.insert(k.clone(), sub);
                        }
                    } else if !json_eq(dv, rv) {
                        out.insert(k.clone(), dv.clone());
                    }
                }
            }
        }
    }
    Value::Object(out)
}

/// Structural equality where numbers compare by value.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                x == y
            } else if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                x == y
            } else {
                x.as_f64() == y.as_f64()
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patched(target: Value, patch: Value) -> Value {
        let mut t = target;
        merge_patch(&mut t, &patch);
        t
    }

    #[test]
    fn rfc7386_examples() {
        // The test cases of RFC 7386, appendix A.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            assert_eq!(
                patched(target.clone(), patch.clone()),
                want,
                "{target} + {patch}"
            );
        }
    }

    #[test]
    fn delta_cases() {
        assert_eq!(delta(&json!({}), &json!({})), json!({}));
        assert_eq!(delta(&json!({"a":1}), &json!({})), json!({"a":1}));
        assert_eq!(delta(&json!({"a":1}), &json!({"a":1})), json!({}));
        assert_eq!(delta(&json!({"a":1}), &json!({"a":1.0})), json!({}));
        assert_eq!(delta(&json!({"a":1}), &json!({"a":2})), json!({"a":1}));
        // Reported-only keys are not in the delta.
        assert_eq!(delta(&json!({}), &json!({"x":1})), json!({}));
        // Nested: only the differing sub-keys.
        assert_eq!(
            delta(
                &json!({"led":{"color":"red","on":true},"fan":2}),
                &json!({"led":{"color":"blue","on":true},"fan":2})
            ),
            json!({"led":{"color":"red"}})
        );
        // Nested equal objects vanish entirely.
        assert_eq!(
            delta(
                &json!({"a":{"b":{"c":1}}}),
                &json!({"a":{"b":{"c":1,"d":2}}})
            ),
            json!({})
        );
        // Arrays are compared whole.
        assert_eq!(delta(&json!({"a":[1,2]}), &json!({"a":[1,2]})), json!({}));
        assert_eq!(
            delta(&json!({"a":[1,2]}), &json!({"a":[2,1]})),
            json!({"a":[1,2]})
        );
        // Type changes: object against scalar is a difference, whole.
        assert_eq!(
            delta(&json!({"a":{"b":1}}), &json!({"a":5})),
            json!({"a":{"b":1}})
        );
        assert_eq!(
            delta(&json!({"a":5}), &json!({"a":{"b":1}})),
            json!({"a":5})
        );
        // An empty desired object says nothing about reported sub-keys.
        assert_eq!(delta(&json!({"a":{}}), &json!({"a":{"b":1}})), json!({}));
        assert_eq!(delta(&json!({"a":{}}), &json!({})), json!({"a":{}}));
    }

    /// Any JSON value, a few levels deep, with keys from a small set so
    /// that patches and targets share keys.
    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[a-c]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-d]", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Merge patch and delta over arbitrary documents (seeded): nothing
    /// panics; a patch applied twice changes nothing more than once; a
    /// patch object's `null` members are absent from the result, its other
    /// members present; a document has no delta against itself, and a
    /// delta names only desired keys.
    #[test]
    fn merge_patch_and_delta_properties_hold_for_arbitrary_documents() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let mut config = Config::with_cases(2_000);
        config.failure_persistence = None;
        let seed = *b"merge patches of arbitrary docs!";
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        let result = runner.run(&(json_value(), json_value()), |(target, patch)| {
            let once = patched(target.clone(), patch.clone());
            let twice = patched(once.clone(), patch.clone());
            prop_assert_eq!(&once, &twice);
            if let Value::Object(p) = &patch {
                let merged = once.as_object().expect("an object patch gives an object");
                for (k, v) in p {
                    if v.is_null() {
                        prop_assert!(!merged.contains_key(k), "{} kept", k);
                    } else {
                        prop_assert!(merged.contains_key(k), "{} missing", k);
                    }
                }
            } else {
                prop_assert_eq!(&once, &patch);
            }
            prop_assert_eq!(delta(&once, &once), json!({}));
            let d = delta(&target, &once);
            if let (Value::Object(d), Some(t)) = (&d, target.as_object()) {
                prop_assert!(d.keys().all(|k| t.contains_key(k)));
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
