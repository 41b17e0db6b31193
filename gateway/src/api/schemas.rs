//! Schemas of the OpenAPI document that say exactly what [`super::validate`]
//! and the extractors accept (patterns, lengths, ranges), so that a client —
//! or a property-based test — that builds requests from the document sends
//! what the gateway takes, and what it refuses is outside the document.
//!
//! Each is a component of the document, referred to by the handlers'
//! annotations (`value_type = DeviceId`, `("id" = DeviceId, Path)`). The
//! patterns are checked against the validators by the tests below.

use std::borrow::Cow;

use serde::Deserializer;
use serde::de::{Unexpected, Visitor};
use serde_json::{Value, json};
use utoipa::openapi::{RefOr, Schema};

use super::validate::{
    MAX_COMMAND_NAME, MAX_ID, MAX_IDEMPOTENCY_KEY, MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS,
};

/// A character that is not a control character (Unicode category Cc, what
/// `char::is_control` refuses), as a regular-expression class.
const PRINTABLE: &str = r"[^\u0000-\u001F\u007F-\u009F]";

/// Device and command ids: 1–64 of `A-Za-z0-9_.-`, except `.` and `..`
/// (written without look-ahead, which not every generator supports).
pub(crate) fn id_pattern() -> String {
    let (n, n1, n2) = (MAX_ID - 1, MAX_ID - 2, MAX_ID - 2);
    format!(
        r"^([A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{n}}}|\.[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{n1}}}|\.\.[A-Za-z0-9_.-]{{1,{n2}}})$"
    )
}

/// A label key: 1–63 of `A-Za-z0-9_./-`.
pub(crate) fn label_key_pattern() -> String {
    format!(r"^[A-Za-z0-9_./-]{{1,{MAX_LABEL_KEY}}}$")
}

/// A label value: at most 256 characters, none a control character.
pub(crate) fn label_value_pattern() -> String {
    format!(r"^{PRINTABLE}{{0,{MAX_LABEL_VALUE}}}$")
}

/// A `?label=` filter: `key=value`.
pub(crate) fn label_filter_pattern() -> String {
    format!(r"^[A-Za-z0-9_./-]{{1,{MAX_LABEL_KEY}}}={PRINTABLE}{{0,{MAX_LABEL_VALUE}}}$")
}

/// 1 to `max` characters, none a control character.
pub(crate) fn printable_pattern(max: usize) -> String {
    format!(r"^{PRINTABLE}{{1,{max}}}$")
}

/// A port as `u16::from_str` reads it, 1–65535 (an optional `+`, leading zeros).
const PORT: &str =
    r"\+?0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";

/// An IPv6 address in brackets (the forms without an embedded IPv4 address).
const IPV6: &str = concat!(
    r"\[(",
    r"([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}",
    r"|([0-9A-Fa-f]{1,4}:){1,7}:",
    r"|([0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}",
    r"|([0-9A-Fa-f]{1,4}:){1,5}(:[0-9A-Fa-f]{1,4}){1,2}",
    r"|([0-9A-Fa-f]{1,4}:){1,4}(:[0-9A-Fa-f]{1,4}){1,3}",
    r"|([0-9A-Fa-f]{1,4}:){1,3}(:[0-9A-Fa-f]{1,4}){1,4}",
    r"|([0-9A-Fa-f]{1,4}:){1,2}(:[0-9A-Fa-f]{1,4}){1,5}",
    r"|[0-9A-Fa-f]{1,4}:(:[0-9A-Fa-f]{1,4}){1,6}",
    r"|:((:[0-9A-Fa-f]{1,4}){1,7}|:)",
    r")\]",
);

/// The longest peer address the API records.
pub(crate) const MAX_PEER_ADDRESS: usize = 255;

/// A peer address as `--peers` takes it: `name:port` (a host name or an
/// IPv4 address: letters, digits, `-`, `_`, `.`, not starting with `-` or
/// `.`, at most 253) or `[ipv6]:port`.
pub(crate) fn peer_address_pattern() -> String {
    format!(r"^([A-Za-z0-9_][A-Za-z0-9_.-]{{0,252}}|{IPV6}):{PORT}$")
}

/// The largest integer any JSON number the gateway reads may be (`u64::MAX`);
/// integer literals below `i64::MIN` or above this are refused.
const U64_MAX: u64 = u64::MAX;

/// A schema given as JSON, as the generator's types hold it: they keep
/// fewer keywords than JSON Schema has (no `anyOf` beside `properties`, no
/// `propertyNames`, `not`, `contentSchema`, …), so what they lose is put
/// back into the served document by [`raw`] (see `openapi::document`).
pub(crate) fn from_json(v: Value) -> RefOr<Schema> {
    serde_json::from_value(v).unwrap_or_else(|_| RefOr::T(Schema::default()))
}

/// Declares a component schema given as JSON.
macro_rules! component {
    ($(#[$doc:meta])* $name:ident => $json:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub(crate) struct $name;

        impl $name {
            /// The schema, exactly.
            pub(crate) fn json() -> Value {
                $json
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                from_json($name::json())
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

component!(
    /// A device id.
    DeviceId => json!({
        "type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": id_pattern(),
        "description": "1–64 characters from `A-Za-z0-9_.-`, not `.` or `..`; also the device's \
            MQTT client id",
        "example": "pump-7",
    })
);

component!(
    /// A command id.
    CommandId => json!({
        "type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": id_pattern(),
        "description": "A command id (the gateway makes them `c-` + hex); the alphabet of device ids",
        "example": "c-01a24cd0375591680089",
    })
);

component!(
    /// A job id.
    JobId => json!({
        "type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": id_pattern(),
        "description": "A job id (the gateway makes them `j-` + hex); the alphabet of device ids",
        "example": "j-019ac1e2f3a4b5c6d7e8f9a0b1c2",
    })
);

component!(
    /// A device's labels.
    Labels => json!({
        "type": "object",
        "description": "At most 64 labels; keys 1–63 characters from `A-Za-z0-9_./-`, values at \
            most 256 characters without control characters",
        "maxProperties": MAX_LABELS,
        "propertyNames": {"pattern": label_key_pattern()},
        "additionalProperties": {
            "type": "string", "maxLength": MAX_LABEL_VALUE, "pattern": label_value_pattern(),
        },
        "example": {"site": "north"},
    })
);

component!(
    /// A `?label=key=value` filter.
    LabelFilter => json!({
        "type": "string", "pattern": label_filter_pattern(),
        "description": "`key=value`: a label key, `=`, and the value (split at the first `=`)",
        "example": "site=north",
    })
);

component!(
    /// A command name.
    CommandName => json!({
        "type": "string", "minLength": 1, "maxLength": MAX_COMMAND_NAME,
        "pattern": printable_pattern(MAX_COMMAND_NAME),
        "description": "1–128 characters, no control characters",
        "example": "reboot",
    })
);

component!(
    /// An API token's name.
    TokenName => json!({
        "type": "string", "minLength": 1, "maxLength": MAX_COMMAND_NAME,
        "pattern": printable_pattern(MAX_COMMAND_NAME),
        "description": "1–128 characters, no control characters",
        "example": "ci-deployer",
    })
);

component!(
    /// An API token's id.
    TokenId => json!({
        "type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": id_pattern(),
        "description": "A token id, as `GET /v1/tokens` lists it (`bootstrap` for the group's \
            first admin token, `tok-` + 16 hex digits for the others)",
        "example": "tok-5f1e0c2a9b7d4e31",
    })
);

component!(
    /// An idempotency key.
    IdempotencyKey => json!({
        "type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY,
        "pattern": printable_pattern(MAX_IDEMPOTENCY_KEY),
        "description": "1–128 characters, no control characters",
        "example": "reboot-2025-11-26",
    })
);

component!(
    /// A gateway's node id in the group.
    NodeId => json!({
        "type": "integer", "format": "uint64", "minimum": 1, "maximum": U64_MAX,
        "description": "A gateway's node id (1 or more)",
        "example": 4,
    })
);

component!(
    /// The peer address of a gateway.
    PeerAddress => json!({
        "type": "string", "maxLength": MAX_PEER_ADDRESS, "pattern": peer_address_pattern(),
        "description": "`host:port` of a gateway's peer listener, as in `--peers`: a host name \
            or IPv4 address, or `[IPv6]`, then the port (1–65535)",
        "example": "127.0.0.1:7004",
    })
);

component!(
    /// The `If-Match` header of a shadow change.
    IfMatch => json!({
        "type": "string", "pattern": r#"^(\*|[0-9]{1,20}|"[0-9]{1,20}")$"#,
        "description": "The desired version you read: `5`, or its ETag `\"5\"`; `*` for any. A \
            version no shadow has (one beyond 64 bits included) is 412",
        "example": "\"5\"",
    })
);

component!(
    /// Any JSON value whose numbers the gateway can keep exactly. (One
    /// schema, not one branch per type: a generator of invalid values that
    /// negates one branch of an `anyOf` would make values that another
    /// branch accepts.)
    JsonValue => json!({
        "description": "Any JSON value; every number between -2^63 and 2^64-1 (an integer \
            beyond 64 bits would lose precision, and is refused). At most 32 levels of objects \
            and arrays, and 64 KiB as JSON.",
        "type": ["null", "boolean", "string", "number", "array", "object"],
        "minimum": i64::MIN,
        "maximum": U64_MAX,
        "items": {"$ref": "#/components/schemas/JsonValue"},
        "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
    })
);

component!(
    /// A JSON object of [`JsonValue`]s.
    JsonObject => json!({
        "type": "object",
        "description": "A JSON object; its values as `JsonValue` (numbers within 64 bits, at \
            most 32 levels deep, 64 KiB as JSON)",
        "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
    })
);

/// Every component above, for the document's `components(schemas(...))`.
pub(crate) fn all() -> Vec<(String, RefOr<Schema>)> {
    raw()
        .into_iter()
        .map(|(name, json)| (name.to_string(), from_json(json)))
        .collect()
}

/// The components whose JSON the served document takes as written here
/// (the generator's types would drop keywords of them): the ones above,
/// the body of `PATCH /v1/devices/{id}` and the event stream's events.
pub(crate) fn raw() -> Vec<(&'static str, Value)> {
    vec![
        ("DeviceId", DeviceId::json()),
        ("CommandId", CommandId::json()),
        ("JobId", JobId::json()),
        ("NewJob", super::jobs::new_job_schema()),
        ("Labels", Labels::json()),
        ("LabelFilter", LabelFilter::json()),
        ("CommandName", CommandName::json()),
        ("TokenName", TokenName::json()),
        ("TokenId", TokenId::json()),
        ("IdempotencyKey", IdempotencyKey::json()),
        ("NodeId", NodeId::json()),
        ("PeerAddress", PeerAddress::json()),
        ("IfMatch", IfMatch::json()),
        ("JsonValue", JsonValue::json()),
        ("JsonObject", JsonObject::json()),
        ("DeviceUpdate", super::devices::update_schema()),
        ("StreamEvent", super::events::stream_event_schema()),
        ("EventBy", super::events::event_by_schema()),
    ]
}

/// Reads a `u64` written as a JSON integer or as a number with an integral
/// value (`4.0`), as JSON Schema's `integer` allows.
pub(crate) fn integral<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(Integral)
}

/// [`integral`] for an optional field (`null` or absent: `None`).
pub(crate) fn integral_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_option(OptIntegral)
}

struct Integral;

impl Visitor<'_> for Integral {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a non-negative integer")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u64, E> {
        // 2^64 is the first value above u64::MAX a f64 can hold.
        if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
            Ok(v as u64)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }
}

struct OptIntegral;

impl<'de> Visitor<'de> for OptIntegral {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a non-negative integer or null")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        integral(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use regex::Regex;

    use super::*;
    use crate::api::validate;

    fn re(p: &str) -> Regex {
        Regex::new(p).expect("pattern")
    }

    /// Strings around every rule's edges.
    fn samples() -> Vec<String> {
        let mut s: Vec<String> = [
            "",
            ".",
            "..",
            "...",
            ".a",
            "a.",
            "..a",
            "a..b",
            "-",
            "_",
            "a",
            "pump-7",
            "a/b",
            "a b",
            "é",
            "a=b",
            "site=north",
            "=x",
            "k=",
            "k=v=w",
            "k=\u{7}",
            "k=\u{85}",
            "k=\u{a0}",
            "a\u{0}",
            "\u{9f}",
            "\u{a0}",
            "*",
            "5",
            "\"5\"",
            "\"5",
            "W/\"5\"",
            "a:1",
            "a:0",
            "a:65535",
            "a:65536",
            "a:+80",
            "a:-80",
            "a:0080",
            "-a:1",
            ".a:1",
            "_a:1",
            "1.2.3.4:80",
            "1.2.3.4:0",
            "[::1]:80",
            "[::1]:0",
            "[1:2:3:4:5:6:7:8]:9",
            "[::]:1",
            "[:::]:1",
            "[1::2::3]:4",
            "[fe80::1]:7000",
            "[g::1]:1",
            "::1:80",
            "a:b:80",
            "host",
            ":80",
            "a.b.c:7000",
            "gw-1.example.org:7000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for n in [62, 63, 64, 65, 127, 128, 129, 252, 253, 254, 256, 257] {
            s.push("x".repeat(n));
            s.push(format!(".{}", "x".repeat(n)));
            s.push(format!("..{}", "x".repeat(n)));
            s.push(format!("{}:7000", "h".repeat(n)));
            s.push(format!("k={}", "v".repeat(n)));
            s.push(format!("{}=v", "k".repeat(n)));
            s.push("é".repeat(n));
        }
        s
    }

    #[test]
    fn ids_match_their_pattern_exactly() {
        let p = re(&id_pattern());
        for s in samples() {
            assert_eq!(p.is_match(&s), validate::id_ok(&s), "{s:?}");
        }
    }

    #[test]
    fn labels_and_filters_match_their_patterns_exactly() {
        let (key, value, filter) = (
            re(&label_key_pattern()),
            re(&label_value_pattern()),
            re(&label_filter_pattern()),
        );
        for s in samples() {
            let as_key = validate::labels(&BTreeMap::from([(s.clone(), String::new())])).is_ok();
            assert_eq!(key.is_match(&s), as_key, "key {s:?}");
            let as_value = validate::labels(&BTreeMap::from([("k".into(), s.clone())])).is_ok();
            assert_eq!(value.is_match(&s), as_value, "value {s:?}");
            let as_filter = validate::label_filter(&s).is_ok();
            assert_eq!(filter.is_match(&s), as_filter, "filter {s:?}");
        }
    }

    #[test]
    fn names_and_keys_match_their_patterns_exactly() {
        let (name, key) = (
            re(&printable_pattern(MAX_COMMAND_NAME)),
            re(&printable_pattern(MAX_IDEMPOTENCY_KEY)),
        );
        for s in samples() {
            assert_eq!(
                name.is_match(&s),
                validate::command_name(&s).is_ok(),
                "{s:?}"
            );
            assert_eq!(
                key.is_match(&s),
                validate::idempotency_key(&s).is_ok(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn peer_addresses_match_their_pattern_exactly() {
        let p = re(&peer_address_pattern());
        for s in samples() {
            let parses = s.len() <= MAX_PEER_ADDRESS
                && s.parse::<coordinator::transport::PeerAddr>().is_ok();
            // The schema's `maxLength` beside its pattern.
            let schema = p.is_match(&s) && s.len() <= MAX_PEER_ADDRESS;
            assert_eq!(schema, parses, "{s:?}");
        }
    }

    #[test]
    fn integral_numbers_are_integers() {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(deserialize_with = "integral")]
            a: u64,
            #[serde(default, deserialize_with = "integral_opt")]
            b: Option<u64>,
        }
        let t: T = serde_json::from_str(r#"{"a": 4.0, "b": 18446744073709551615}"#).expect("ok");
        assert_eq!((t.a, t.b), (4, Some(u64::MAX)));
        let t: T = serde_json::from_str(r#"{"a": 0, "b": null}"#).expect("ok");
        assert_eq!((t.a, t.b), (0, None));
        let t: T = serde_json::from_str(r#"{"a": 1e3}"#).expect("ok");
        assert_eq!((t.a, t.b), (1000, None));
        for bad in [
            r#"{"a": 4.5}"#,
            r#"{"a": -1}"#,
            r#"{"a": 1.8446744073709552e19}"#,
            r#"{"a": "4"}"#,
        ] {
            assert!(serde_json::from_str::<T>(bad).is_err(), "{bad}");
        }
    }
}
