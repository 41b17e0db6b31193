//! Limits on the JSON values that operations carry, shared by everything
//! that proposes (the REST API, the MQTT side) and by the state machine.
//!
//! Every JSON value an [`Op`] carries — device attributes, command
//! parameters and output, desired and reported patches — is checked with
//! [`check_op`] before it is proposed:
//!
//! - at most [`MAX_DEPTH`] levels of objects and arrays. An entry wraps the
//!   value in two more levels, so whatever passes stays far below
//!   `serde_json`'s decoding limit of 128: every member can decode every
//!   entry that was proposed (an undecodable entry would be a no-op at
//!   best, and a member that cannot read its log at worst);
//! - at most [`MAX_DOCUMENT_BYTES`] encoded as compact JSON.
//!
//! Values from outside are parsed with [`parse_value`] (or, for a body that
//! is parsed into a struct, checked with [`check_integers`] on its text):
//! integer literals outside the 64-bit range would silently become
//! floating-point numbers, so they are refused, naming where they are.
//!
//! The state machine applies [`MAX_DOCUMENT_BYTES`] to the desired and the
//! reported document after each merge patch, deterministically (it is a
//! constant, not a setting, so every member computes the same).

use std::io::Write;

use serde_json::Value;

use crate::ops::Op;

/// The most levels of objects and arrays in a JSON value an operation
/// carries (`{"a": {"b": 1}}` has two). Devices' state documents rarely need
/// more than a handful; 32 leaves room for generous nesting and keeps every
/// entry (two more levels) well inside the decoder's limit of 128.
pub const MAX_DEPTH: usize = 32;

/// The largest size, encoded as compact JSON, of a shadow's desired or
/// reported document, of a patch to one, and of any other JSON value an
/// operation carries (device attributes, command parameters and output):
/// 64 KiB. A shadow is state, not storage: AWS IoT caps a whole shadow at
/// 8 KiB; this is more generous but still bounds what one document costs
/// each read and each delivery to the device.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// The most characters of an input quoted back in an error message.
pub const MAX_ECHO_CHARS: usize = 64;

/// The most devices one [`Op::RegisterDevices`] (one
/// `POST /v1/devices/batch`) registers.
pub const MAX_BATCH_DEVICES: usize = 1000;

/// The largest entry a gateway proposes, encoded: 8 MiB. Only a batch
/// registration comes near it (every other operation carries at most a
/// few values of [`MAX_DOCUMENT_BYTES`]). Half the peer transport's frame
/// limit (16 MiB): a proposal forwarded to the leader, and an append
/// carrying the entry, always fit in a frame, with room to spare.
pub const MAX_ENTRY_BYTES: usize = 8 * 1024 * 1024;

/// Why a JSON value may not be proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Nested deeper than [`MAX_DEPTH`].
    #[error(
        "{what} is nested more than {MAX_DEPTH} levels deep; at most {MAX_DEPTH} levels of \
         objects and arrays are allowed"
    )]
    TooDeep {
        /// What the value is (e.g. `params`).
        what: &'static str,
    },
    /// Larger than [`MAX_DOCUMENT_BYTES`] as JSON.
    #[error("{what} is {size} bytes as JSON; at most {MAX_DOCUMENT_BYTES} bytes are allowed")]
    TooLarge {
        /// What the value is.
        what: &'static str,
        /// Its encoded size.
        size: usize,
    },
    /// An integer literal outside the range of 64-bit integers.
    #[error(
        "the integer {literal} at {path} is outside the range of 64-bit integers \
         (-9223372036854775808 to 18446744073709551615) and would lose precision; send it as \
         a string, or as a floating-point number (e.g. 1.8e19) if precision does not matter"
    )]
    InexactInteger {
        /// Where it is, as a JSON pointer (RFC 6901), shortened if long.
        path: String,
        /// The literal, shortened if long.
        literal: String,
    },
    /// Not JSON at all.
    #[error("{what} is not valid JSON: {error}")]
    Malformed {
        /// What the value is.
        what: &'static str,
        /// The parser's message.
        error: String,
    },
    /// A batch of no devices, or of more than [`MAX_BATCH_DEVICES`].
    #[error(
        "a batch registers 1 to {MAX_BATCH_DEVICES} devices ({count} given); send more in \
         further batches"
    )]
    BatchSize {
        /// How many devices it has.
        count: usize,
    },
    /// A job naming no devices, or more than
    /// [`crate::jobs::MAX_JOB_DEVICES`]; or a launch of more than
    /// [`crate::jobs::MAX_LAUNCH`].
    #[error(
        "a job targets 1 to {} devices by id ({count} given); target more with a label selector",
        crate::jobs::MAX_JOB_DEVICES
    )]
    JobSize {
        /// How many devices it names.
        count: usize,
    },
    /// The entry would be larger than [`MAX_ENTRY_BYTES`].
    #[error(
        "the log entry would be {size} bytes; an entry may be at most {MAX_ENTRY_BYTES} bytes \
         (8 MiB) — send fewer devices, or smaller attributes, per batch"
    )]
    EntryTooLarge {
        /// Its encoded size.
        size: usize,
    },
}

/// `s` as quoted in error messages: at most [`MAX_ECHO_CHARS`] characters,
/// with `…` if it was longer.
pub fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// Whether `v` nests at most `max` levels of objects and arrays (recursion
/// is bounded by `max`, whatever `v` is).
fn depth_within(v: &Value, max: usize) -> bool {
    match v {
        Value::Array(a) => max > 0 && a.iter().all(|x| depth_within(x, max - 1)),
        Value::Object(o) => max > 0 && o.values().all(|x| depth_within(x, max - 1)),
        _ => true,
    }
}

/// Counts bytes written.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of `v` encoded as compact JSON (as it is stored), without
/// building the text.
pub fn encoded_len(v: &Value) -> usize {
    let mut c = Counter(0);
    // Writing a Value to a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Checks one value against [`MAX_DEPTH`] and [`MAX_DOCUMENT_BYTES`].
pub fn check_value(what: &'static str, v: &Value) -> Result<(), LimitError> {
    if !depth_within(v, MAX_DEPTH) {
        return Err(LimitError::TooDeep { what });
    }
    let size = encoded_len(v);
    if size > MAX_DOCUMENT_BYTES {
        return Err(LimitError::TooLarge { what, size });
    }
    Ok(())
}

/// Checks every JSON value `op` carries with [`check_value`]. Whatever
/// passes encodes into an entry that every member decodes to the same `op`.
/// Call it on every operation built from outside input before proposing.
pub fn check_op(op: &Op) -> Result<(), LimitError> {
    match op {
        Op::RegisterDevice { attributes, .. } => check_value("attributes", attributes),
        Op::RegisterDevices { devices } => {
            if devices.is_empty() || devices.len() > MAX_BATCH_DEVICES {
                return Err(LimitError::BatchSize {
                    count: devices.len(),
                });
            }
            for d in devices {
                check_value("attributes", &d.attributes)?;
            }
            // The only operation whose entry can come near the limit: the
            // others carry a few values of at most MAX_DOCUMENT_BYTES.
            let size = crate::ops::entry_len(op);
            if size > MAX_ENTRY_BYTES {
                return Err(LimitError::EntryTooLarge { size });
            }
            Ok(())
        }
        Op::UpdateDevice { attributes, .. } => attributes
            .as_ref()
            .map_or(Ok(()), |a| check_value("attributes", a)),
        Op::IssueCommand { params, .. } => check_value("params", params),
        Op::CreateJob {
            command, target, ..
        } => {
            check_value("params", &command.params)?;
            if let crate::jobs::JobTarget::Devices(devices) = target
                && (devices.is_empty() || devices.len() > crate::jobs::MAX_JOB_DEVICES)
            {
                return Err(LimitError::JobSize {
                    count: devices.len(),
                });
            }
            Ok(())
        }
        Op::LaunchExecutions { devices, .. } => {
            if devices.len() > crate::jobs::MAX_LAUNCH {
                return Err(LimitError::JobSize {
                    count: devices.len(),
                });
            }
            Ok(())
        }
        Op::CommandResult { output, .. } => check_value("the command output", output),
        Op::SetDesired { patch, .. } => check_value("the desired-state patch", patch),
        Op::ReportState { patch, .. } => check_value("the reported-state patch", patch),
        Op::BootstrapAdmin { .. }
        | Op::PruneJobs { .. }
        | Op::CreateToken { .. }
        | Op::RevokeToken { .. }
        | Op::RotateToken { .. }
        | Op::TokensUsed { .. }
        | Op::DeleteDevice { .. }
        | Op::RotateSecret { .. }
        | Op::CommandSent { .. }
        | Op::CommandAccepted { .. }
        | Op::CancelCommand { .. }
        | Op::ExpireCommands { .. }
        | Op::Presence { .. }
        | Op::GatewaySessionsLost { .. }
        | Op::SetPeerAddress { .. }
        | Op::StartJob { .. }
        | Op::CompleteJob { .. }
        | Op::AbortJob { .. }
        | Op::CancelJob { .. } => Ok(()),
    }
}

/// Parses a JSON value from outside (e.g. a device's payload) and checks it:
/// integer literals within 64 bits ([`check_integers`]), then
/// [`check_value`].
pub fn parse_value(what: &'static str, text: &[u8]) -> Result<Value, LimitError> {
    let v: Value = serde_json::from_slice(text).map_err(|e| LimitError::Malformed {
        what,
        error: e.to_string(),
    })?;
    check_integers(text)?;
    check_value(what, &v)?;
    Ok(v)
}

/// One open container while scanning JSON text.
enum Frame {
    /// An object and the key of the member being read, once known.
    Object(Option<String>),
    /// An array and the index of the element being read.
    Array(usize),
}

/// A JSON pointer (RFC 6901) to the value being read.
fn pointer(stack: &[Frame]) -> String {
    let mut p = String::new();
    for f in stack {
        p.push('/');
        match f {
            Frame::Object(Some(k)) => p.push_str(&k.replace('~', "~0").replace('/', "~1")),
            Frame::Object(None) => {}
            Frame::Array(i) => p.push_str(&i.to_string()),
        }
    }
    p
}

/// Checks that every integer literal (a number without fraction or
/// exponent) in the JSON text `text` fits in an `i64` or a `u64`: others
/// would be read as floating-point numbers and silently lose precision.
/// The error names the first such literal and where it is. Meant for text
/// that parsed as JSON; anything else is scanned without error.
pub fn check_integers(text: &[u8]) -> Result<(), LimitError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut want_key = false;
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        match b {
            b'"' => {
                let start = i;
                i += 1;
                while let Some(&c) = text.get(i) {
                    match c {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
                if want_key && let Some(Frame::Object(key)) = stack.last_mut() {
                    let raw = text.get(start..i.min(text.len())).unwrap_or_default();
                    *key = Some(
                        serde_json::from_slice::<String>(raw)
                            .unwrap_or_else(|_| String::from_utf8_lossy(raw).into_owned()),
                    );
                }
                continue;
            }
            b'{' => {
                stack.push(Frame::Object(None));
                want_key = true;
            }
            b'[' => {
                stack.push(Frame::Array(0));
                want_key = false;
            }
            b'}' | b']' => {
                stack.pop();
                want_key = false;
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array(n)) => *n += 1,
                Some(Frame::Object(key)) => {
                    *key = None;
                    want_key = true;
                }
                None => {}
            },
            b':' => want_key = false,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while text
                    .get(i)
                    .is_some_and(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                {
                    i += 1;
                }
                let lit = std::str::from_utf8(&text[start..i]).unwrap_or_default();
                let integer = !lit.contains(['.', 'e', 'E']);
                if integer && lit.parse::<i64>().is_err() && lit.parse::<u64>().is_err() {
                    return Err(LimitError::InexactInteger {
                        path: echo(&pointer(&stack)),
                        literal: echo(lit),
                    });
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn nested(levels: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({ "k": v });
        }
        v
    }

    #[test]
    fn depth_is_counted_in_objects_and_arrays() {
        assert!(check_value("v", &json!(1)).is_ok());
        assert!(check_value("v", &nested(MAX_DEPTH)).is_ok());
        assert_eq!(
            check_value("v", &nested(MAX_DEPTH + 1)),
            Err(LimitError::TooDeep { what: "v" })
        );
        let mut arrays = json!([]);
        for _ in 0..MAX_DEPTH {
            arrays = json!([arrays]);
        }
        assert!(check_value("v", &arrays).is_err());
    }

    #[test]
    fn size_is_the_compact_encoding() {
        let fits = json!({ "k": "x".repeat(MAX_DOCUMENT_BYTES - 8) });
        assert_eq!(encoded_len(&fits), MAX_DOCUMENT_BYTES);
        assert!(check_value("v", &fits).is_ok());
        let over = json!({ "k": "x".repeat(MAX_DOCUMENT_BYTES - 7) });
        assert_eq!(
            check_value("v", &over),
            Err(LimitError::TooLarge {
                what: "v",
                size: MAX_DOCUMENT_BYTES + 1
            })
        );
    }

    fn inexact(text: &str) -> Option<(String, String)> {
        match check_integers(text.as_bytes()) {
            Ok(()) => None,
            Err(LimitError::InexactInteger { path, literal }) => Some((path, literal)),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn integers_beyond_64_bits_are_found_with_their_path() {
        assert_eq!(inexact("18446744073709551615"), None);
        assert_eq!(inexact("-9223372036854775808"), None);
        assert_eq!(inexact("[1e400, 1.5, -0, 1E2]"), None);
        assert_eq!(
            inexact("18446744073709551616"),
            Some(("".into(), "18446744073709551616".into()))
        );
        assert_eq!(
            inexact(r#"{"a": 1, "b/c~": [0, {"x": "1", "y": -9223372036854775809}]}"#),
            Some(("/b~1c~0/1/y".into(), "-9223372036854775809".into()))
        );
        // Digits inside strings, keys with escapes and commas are not numbers.
        assert_eq!(
            inexact(r#"{"99999999999999999999": "99999999999999999999,\"", "k": 1}"#),
            None
        );
        assert_eq!(
            inexact(r#"{"q\"": [1, 2, 99999999999999999999]}"#),
            Some(("/q\"/2".into(), "99999999999999999999".into()))
        );
        let long = format!("[{}]", "9".repeat(500));
        let (_, lit) = inexact(&long).expect("found");
        assert_eq!(lit.chars().count(), MAX_ECHO_CHARS + 1);
    }

    #[test]
    fn parse_value_checks_everything() {
        assert_eq!(parse_value("p", br#"{"a":1}"#), Ok(json!({"a": 1})));
        assert!(matches!(
            parse_value("p", b"{"),
            Err(LimitError::Malformed { .. })
        ));
        assert!(matches!(
            parse_value("p", b"[18446744073709551616]"),
            Err(LimitError::InexactInteger { .. })
        ));
        let deep = nested(MAX_DEPTH + 1).to_string();
        assert!(matches!(
            parse_value("p", deep.as_bytes()),
            Err(LimitError::TooDeep { .. })
        ));
    }

    #[test]
    fn echo_is_bounded() {
        assert_eq!(echo("abc"), "abc");
        let s = "é".repeat(100);
        assert_eq!(echo(&s), format!("{}…", "é".repeat(MAX_ECHO_CHARS)));
    }
}
