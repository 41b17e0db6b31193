//! Input checks with messages a person can act on.

use std::collections::BTreeMap;

use serde_json::Value;

use super::error::ApiError;
use crate::limits;

pub use crate::shared::{MAX_ID, id_ok};
/// Most labels per device.
pub const MAX_LABELS: usize = 64;
/// Longest label key.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 256;
/// Longest command name.
pub const MAX_COMMAND_NAME: usize = 128;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// `s` quoted for an error message, at most [`limits::MAX_ECHO_CHARS`]
/// characters of it.
pub fn quoted(s: &str) -> String {
    format!("{:?}", limits::echo(s))
}

fn id_rule(what: &str, s: &str) -> String {
    format!(
        "{what} {} is not valid: use 1 to {MAX_ID} characters from A-Z, a-z, 0-9, '_', '.' \
         and '-' ('.' and '..' alone are not ids)",
        quoted(s)
    )
}

/// A device id in a path: `[A-Za-z0-9_.-]{1,64}`, not `.` or `..` (400 otherwise).
pub fn path_device_id(id: &str) -> Result<(), ApiError> {
    if id_ok(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(id_rule("device id", id)))
    }
}

/// A command id in a path (same alphabet as device ids; 400 otherwise).
pub fn path_command_id(id: &str) -> Result<(), ApiError> {
    if id_ok(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(id_rule("command id", id)))
    }
}

/// A device id in a body (422 otherwise).
pub fn body_device_id(id: &str) -> Result<(), ApiError> {
    if id_ok(id) {
        Ok(())
    } else {
        Err(ApiError::invalid(id_rule("id", id)))
    }
}

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// Label keys: 1–63 characters from `A-Za-z0-9_./-`; values: at most 256
/// characters without control characters; at most 64 labels.
pub fn labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::invalid(format!(
            "a device may have at most {MAX_LABELS} labels ({} given)",
            labels.len()
        )));
    }
    for (k, v) in labels {
        label_key(k).map_err(ApiError::invalid)?;
        label_value(k, v).map_err(ApiError::invalid)?;
    }
    Ok(())
}

fn label_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty()
        && k.len() <= MAX_LABEL_KEY
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label key {} is not valid: use 1 to {MAX_LABEL_KEY} characters from A-Z, a-z, \
             0-9, '_', '.', '-' and '/'",
            quoted(k)
        ))
    }
}

fn label_value(k: &str, v: &str) -> Result<(), String> {
    if v.chars().count() <= MAX_LABEL_VALUE && printable(v) {
        Ok(())
    } else {
        Err(format!(
            "the value of label {} is not valid: use at most {MAX_LABEL_VALUE} characters and \
             no control characters",
            quoted(k)
        ))
    }
}

/// A `?label=key=value` filter.
pub fn label_filter(s: &str) -> Result<(String, String), ApiError> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        ApiError::bad_request(format!(
            "label filter {} is not key=value (e.g. ?label=site=north)",
            quoted(s)
        ))
    })?;
    label_key(k).map_err(ApiError::bad_request)?;
    label_value(k, v).map_err(ApiError::bad_request)?;
    Ok((k.to_string(), v.to_string()))
}

/// A JSON value that must be an object (`what` names the field).
pub fn object(what: &str, v: &Value) -> Result<(), ApiError> {
    if v.is_object() {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{what} must be a JSON object, e.g. {{\"key\": \"value\"}}"
        )))
    }
}

/// A JSON value the operation will carry (`what` names the field): at most
/// [`limits::MAX_DEPTH`] levels deep (422), every number between −2^63 and
/// 2^64 − 1 (422; integer literals beyond are refused when the body is
/// read), and [`limits::MAX_DOCUMENT_BYTES`] as JSON (413).
pub fn json_value(what: &'static str, v: &Value) -> Result<(), ApiError> {
    limits::check_value(what, v).map_err(ApiError::from)?;
    numbers_in_range(what, v)
}

/// Every number of `v` within the range of 64-bit integers (`JsonValue` in
/// the OpenAPI document): the integers are (the body's reader refused the
/// others); a floating-point number may be anything, and is held to the same
/// range, which one JSON Schema can state for all numbers alike.
fn numbers_in_range(what: &'static str, v: &Value) -> Result<(), ApiError> {
    // -2^63 and 2^64, exactly representable as f64.
    const LOW: f64 = -9_223_372_036_854_775_808.0;
    const HIGH: f64 = 18_446_744_073_709_551_616.0;
    match v {
        Value::Number(n) if n.is_f64() => match n.as_f64() {
            Some(f) if (LOW..HIGH).contains(&f) => Ok(()),
            _ => Err(ApiError::invalid(format!(
                "{what} holds the number {n}, beyond the range of 64-bit integers (-2^63 to \
                 2^64-1) that numbers in this gateway's documents must keep to"
            ))),
        },
        Value::Array(a) => a.iter().try_for_each(|x| numbers_in_range(what, x)),
        Value::Object(m) => m.values().try_for_each(|x| numbers_in_range(what, x)),
        _ => Ok(()),
    }
}

/// A command name: 1–128 characters, no control characters.
pub fn command_name(name: &str) -> Result<(), ApiError> {
    let n = name.chars().count();
    if n > 0 && n <= MAX_COMMAND_NAME && printable(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "name must be 1 to {MAX_COMMAND_NAME} characters without control characters"
        )))
    }
}

/// An idempotency key: 1–128 characters, no control characters.
pub fn idempotency_key(key: &str) -> Result<(), ApiError> {
    let n = key.chars().count();
    if n > 0 && n <= MAX_IDEMPOTENCY_KEY && printable(key) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} characters without control \
             characters"
        )))
    }
}

/// A page size: 1..=`max` (default 100, or `max` if smaller).
pub fn limit(limit: Option<u32>, max: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(100.min(max.max(1))),
        Some(n) if n >= 1 && n <= max => Ok(n),
        Some(_) => Err(ApiError::bad_request(format!(
            "limit must be between 1 and {max}"
        ))),
    }
}

/// A certificate fingerprint in a body (422 otherwise): the SHA-256 of the
/// DER certificate as 64 hex digits, either case, optionally in pairs
/// separated by `:` (as `openssl x509 -fingerprint -sha256` prints it).
/// Returns it as stored: lowercase, without separators.
pub fn cert_sha256(v: &str) -> Result<String, ApiError> {
    let digits: String = if v.contains(':') {
        let pairs: Vec<&str> = v.split(':').collect();
        if pairs.iter().all(|p| p.len() == 2) {
            pairs.concat()
        } else {
            String::new()
        }
    } else {
        v.to_string()
    };
    if digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digits.to_ascii_lowercase())
    } else {
        Err(ApiError::invalid(format!(
            "cert_sha256 {} is not a SHA-256 fingerprint: give the SHA-256 of the device's DER \
             certificate as 64 hex digits (e.g. from `openssl x509 -in device.pem -noout \
             -fingerprint -sha256`)",
            quoted(v)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_documented_alphabet() {
        assert!(id_ok("pump-7.a_B"));
        assert!(id_ok(&"x".repeat(64)));
        assert!(!id_ok(&"x".repeat(65)));
        assert!(!id_ok(""));
        assert!(!id_ok("a/b"));
        assert!(!id_ok("a b"));
        assert!(!id_ok("é"));
        assert!(!id_ok("."));
        assert!(!id_ok(".."));
        assert!(id_ok("..."));
        assert!(id_ok(".a"));
        assert!(id_ok("a..b"));
    }

    #[test]
    fn invalid_input_is_quoted_briefly() {
        let long = "x".repeat(10_000);
        for e in [
            path_device_id(&long).err(),
            body_device_id(&long).err(),
            labels(&BTreeMap::from([(long.clone(), "v".into())])).err(),
            label_filter(&long).err(),
        ] {
            let detail = e.expect("refused").problem().detail;
            assert!(detail.len() < 300, "{detail}");
            assert!(detail.contains("xxx…"), "{detail}");
        }
    }

    #[test]
    fn label_filters_split_at_the_first_equals_sign() {
        assert_eq!(
            label_filter("site=a=b").ok(),
            Some(("site".into(), "a=b".into()))
        );
        assert!(label_filter("site").is_err());
        assert!(label_filter("=x").is_err());
    }

    #[test]
    fn numbers_keep_to_64_bits() {
        let ok = serde_json::json!({"a": [1.5, -9.223372036854775e18, 1.8e19, u64::MAX, i64::MIN]});
        assert!(json_value("x", &ok).is_ok());
        for bad in [1.9e19, -9.3e18, 1e300] {
            let v = serde_json::json!({"a": {"b": [bad]}});
            let e = json_value("x", &v).expect_err("refused");
            assert_eq!(e.problem().status, 422, "{bad}");
        }
    }

    #[test]
    fn limits_are_capped() {
        assert_eq!(limit(None, 1000).ok(), Some(100));
        assert_eq!(limit(None, 10).ok(), Some(10));
        assert!(limit(Some(0), 1000).is_err());
        assert!(limit(Some(1001), 1000).is_err());
        assert_eq!(limit(Some(1000), 1000).ok(), Some(1000));
    }

    #[test]
    fn certificate_fingerprints_are_sha256_hex_stored_lowercase() {
        let hex = "ab".repeat(32);
        assert_eq!(cert_sha256(&hex).ok(), Some(hex.clone()));
        assert_eq!(cert_sha256(&hex.to_uppercase()).ok(), Some(hex.clone()));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(cert_sha256(&colons).ok(), Some(hex.clone()));
        for bad in [
            "",
            "ab",
            &"ab".repeat(31),
            &"ab".repeat(33),
            &"zz".repeat(32),
            &vec!["abc"; 21].join(":"),
            &format!("{}:", "ab".repeat(32)),
        ] {
            assert!(cert_sha256(bad).is_err(), "{bad:?}");
        }
    }
}
