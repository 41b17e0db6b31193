//! The AsyncAPI document (`entente_protocol::asyncapi`): valid AsyncAPI
//! 3.0, and complete — every topic, payload type and reason code of the
//! crate is in it.
//!
//! Validity is checked by `tests/asyncapi/validate.py` (Python with
//! `jsonschema`, against the official AsyncAPI 3.0.0 JSON Schema from the
//! npm package `@asyncapi/specs`). `.ci/run` fetches the schema pinned by
//! its SHA-256, installs `jsonschema` and sets `ENTENTE_TEST_ASYNCAPI_SCHEMA`
//! to the schema's file and `ENTENTE_TEST_PYTHON` to the Python that has
//! it. With `ENTENTE_TEST_ASYNCAPI_SCHEMA` set, a missing tool fails the
//! test; without it the validation is skipped, saying so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use entente_protocol::asyncapi::{self, Host, Server};
use entente_protocol::{Payload, Topic, reason_codes};
use serde_json::{Value, json};

/// The validator's Python and the AsyncAPI schema file, or `None` (the
/// validation skipped, saying why) when `ENTENTE_TEST_ASYNCAPI_SCHEMA` is
/// not set.
fn validator(test: &str) -> Option<(PathBuf, PathBuf)> {
    let Some(schema) = std::env::var_os("ENTENTE_TEST_ASYNCAPI_SCHEMA").map(PathBuf::from) else {
        eprintln!(
            "skipped the AsyncAPI validation of {test}: ENTENTE_TEST_ASYNCAPI_SCHEMA does not name \
             the AsyncAPI 3.0.0 JSON Schema (.ci/run fetches it and sets it; then a missing \
             validator is a failure)"
        );
        return None;
    };
    let text = std::fs::read_to_string(&schema).unwrap_or_else(|e| {
        panic!(
            "ENTENTE_TEST_ASYNCAPI_SCHEMA names {}, which cannot be read: {e}",
            schema.display()
        )
    });
    let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "ENTENTE_TEST_ASYNCAPI_SCHEMA names {}, which is not JSON: {e}",
            schema.display()
        )
    });
    assert_eq!(
        parsed["title"],
        "AsyncAPI 3.0.0 schema.",
        "{} is not the AsyncAPI 3.0.0 schema",
        schema.display()
    );
    let python =
        std::env::var_os("ENTENTE_TEST_PYTHON").map_or_else(|| "python3".into(), PathBuf::from);
    let ok = Command::new(&python)
        .args(["-c", "import jsonschema, referencing"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "ENTENTE_TEST_ASYNCAPI_SCHEMA is set but {} cannot import jsonschema: install it \
         (`pip install jsonschema`, as .ci/run does) or name a Python that has it in \
         ENTENTE_TEST_PYTHON",
        python.display()
    );
    Some((python, schema))
}

/// Runs the validator on `doc`: whether it found it valid, and what it said.
fn validate(tool: &(PathBuf, PathBuf), dir: &Path, name: &str, doc: &Value) -> (bool, String) {
    let file = dir.join(name);
    std::fs::write(&file, serde_json::to_vec_pretty(doc).expect("JSON")).expect("write");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/asyncapi/validate.py");
    let out = Command::new(&tool.0)
        .arg(script)
        .arg(&tool.1)
        .arg(&file)
        .output()
        .expect("run the validator");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn the_document_is_valid_asyncapi_3() {
    let Some(tool) = validator("the_document_is_valid_asyncapi_3") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, said) = validate(&tool, dir.path(), "default.json", &asyncapi::document());
    assert!(ok, "the default document is not valid:\n{said}");
    assert!(said.contains("valid"), "{said}");
    // Fixed hosts, a TLS listener without client certificates.
    let servers = vec![
        Server {
            name: "mqtt".into(),
            host: Host::Fixed("127.0.0.1:1883".into()),
            tls: false,
            client_certificates: false,
            protocol_version: "3.1.1",
        },
        Server {
            name: "mqtts".into(),
            host: Host::Fixed("[::1]:8883".into()),
            tls: true,
            client_certificates: false,
            protocol_version: "5",
        },
    ];
    let (ok, said) = validate(
        &tool,
        dir.path(),
        "fixed.json",
        &asyncapi::document_with(&servers),
    );
    assert!(ok, "the document with fixed hosts is not valid:\n{said}");
}

/// The validator is not a rubber stamp: documents broken in ways the
/// schema, the specification's rules and the examples catch are refused,
/// each for its own fault.
#[test]
fn a_broken_document_fails_the_validator() {
    let Some(tool) = validator("a_broken_document_fails_the_validator") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let good = asyncapi::document();
    /// A name, how the document is broken, what the validator must say.
    type Breakage = (&'static str, fn(&mut Value), &'static str);
    let breakages: [Breakage; 5] = [
        (
            "no-info",
            |d| {
                d.as_object_mut().expect("object").remove("info");
            },
            "'info' is a required property",
        ),
        (
            "2.x-action",
            |d| d["operations"]["receiveCommand"]["action"] = json!("subscribe"),
            "/operations/receiveCommand",
        ),
        (
            "missing-parameter",
            |d| {
                d["channels"]["commandResult"]["parameters"]
                    .as_object_mut()
                    .expect("parameters")
                    .remove("commandId");
            },
            "/channels/commandResult: parameters",
        ),
        (
            "dangling-ref",
            |d| {
                d["channels"]["commands"]["messages"]["command"] =
                    json!({"$ref": "#/components/messages/nope"})
            },
            "does not resolve",
        ),
        (
            "bad-example",
            |d| {
                d["components"]["messages"]["result"]["examples"][0]["payload"]["status"] =
                    json!("maybe")
            },
            "/components/messages/result/examples/0/payload/status",
        ),
    ];
    for (name, breaks, expected) in breakages {
        let mut doc = good.clone();
        breaks(&mut doc);
        let (ok, said) = validate(&tool, dir.path(), &format!("{name}.json"), &doc);
        assert!(!ok, "{name}: the validator took a broken document:\n{said}");
        assert!(
            said.contains(expected),
            "{name}: expected {expected:?} in:\n{said}"
        );
    }
}

/// Everything the crate defines is in the document, enumerated from the
/// crate: its topic and payload lists, its source (every serialisable type,
/// every `*_topic` function) and its reason codes.
#[test]
fn every_topic_payload_and_code_of_the_crate_is_in_the_document() {
    let doc = asyncapi::document();
    let channels = doc["channels"].as_object().expect("channels");
    let operations = doc["operations"].as_object().expect("operations");
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for topic in Topic::ALL {
        let address = topic.template();
        let (id, channel) = channels
            .iter()
            .find(|(_, c)| c["address"] == address.as_str())
            .unwrap_or_else(|| panic!("{topic:?} ({address}) has no channel"));
        let params: BTreeSet<&str> = channel["parameters"]
            .as_object()
            .expect("parameters")
            .keys()
            .map(String::as_str)
            .collect();
        assert!(params.contains("deviceId"), "{address}");
        // The address really is the topic: fill it in and parse it back.
        let name = address
            .replace("{deviceId}", "d-1")
            .replace("{commandId}", "c-1");
        assert_eq!(name, topic.name("d-1", "c-1"));
        assert_eq!(
            entente_protocol::parse_device_publish("d-1", &name).is_some(),
            topic.from_device(),
            "{address}: devices publish to it, or do not, as the crate parses it"
        );
        let ops: Vec<&Value> = operations
            .values()
            .filter(|o| o["channel"]["$ref"] == format!("#/channels/{id}"))
            .collect();
        assert_eq!(ops.len(), 1, "{address}: one operation");
        let action = if topic.from_device() {
            "send"
        } else {
            "receive"
        };
        assert_eq!(ops[0]["action"], action, "{address}");
        assert_eq!(ops[0]["bindings"]["mqtt"]["retain"], false, "{address}");
        assert_eq!(ops[0]["bindings"]["mqtt"]["qos"], 1, "{address}");
        // Its message carries the topic's payload type.
        let messages = channel["messages"].as_object().expect("messages");
        assert_eq!(messages.len(), 1, "{address}");
        let reference = messages.values().next().expect("message")["$ref"]
            .as_str()
            .expect("$ref");
        let message = doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{reference}"));
        assert_eq!(
            message["payload"]["$ref"],
            format!("#/components/schemas/{}", topic.payload().schema_name()),
            "{address}"
        );
        assert!(
            message["examples"]
                .as_array()
                .is_some_and(|e| !e.is_empty()),
            "{address}: examples"
        );
    }
    for payload in Payload::ALL {
        assert!(
            schemas.contains_key(payload.schema_name()),
            "{payload:?}: no schema {}",
            payload.schema_name()
        );
        assert!(
            Topic::ALL.iter().any(|t| t.payload() == payload),
            "{payload:?} is on no topic"
        );
    }

    // The crate's source: every type that is (de)serialised is a schema of
    // the document, and every `*_topic` function is one of the topics.
    let source = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read src/lib.rs");
    let mut serialised = BTreeSet::new();
    let mut derives_serde = false;
    for line in source.lines().map(str::trim) {
        if line.starts_with("#[derive(") {
            derives_serde = line.contains("Serialize") || line.contains("Deserialize");
        } else if let Some(rest) = line
            .strip_prefix("pub struct ")
            .or_else(|| line.strip_prefix("pub enum "))
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if derives_serde {
                serialised.insert(name);
            }
            derives_serde = false;
        }
    }
    assert!(serialised.len() >= 6, "found {serialised:?} in src/lib.rs");
    for name in &serialised {
        assert!(
            schemas.contains_key(name),
            "{name} (src/lib.rs) is not in the document"
        );
    }
    let topic_fns = source
        .lines()
        .filter(|l| l.trim_start().starts_with("pub fn ") && l.contains("_topic("))
        .count();
    assert_eq!(
        topic_fns,
        Topic::ALL.len(),
        "a `*_topic` function that Topic does not list"
    );

    // Every reason code.
    let codes = doc["x-entente-reason-codes"].as_array().expect("codes");
    assert_eq!(codes.len(), reason_codes::ALL.len());
    for c in reason_codes::ALL {
        let hex = |c: Option<u8>| c.map_or(Value::Null, |c| json!(format!("0x{c:02X}")));
        assert!(
            codes.iter().any(|d| d["packet"] == c.packet.to_string()
                && d["mqtt5"] == hex(c.mqtt5)
                && d["mqtt311"] == hex(c.mqtt311)),
            "{c:?}"
        );
    }
}

/// The servers entry says what each listener is: protocol, version, host
/// (a variable for a listener on every interface), security.
#[test]
fn servers_describe_the_listeners() {
    let doc = asyncapi::document();
    let s = &doc["servers"];
    assert_eq!(s["mqtt"]["protocol"], "mqtt");
    assert_eq!(s["mqtt"]["protocolVersion"], "3.1.1");
    assert_eq!(s["mqtt"]["host"], "{host}:1883");
    assert_eq!(s["mqtt"]["variables"]["host"]["default"], "localhost");
    assert_eq!(s["mqtt5"]["protocolVersion"], "5");
    assert_eq!(s["mqtts"]["protocol"], "secure-mqtt");
    let security = |name: &str| -> Vec<String> {
        s[name]["security"]
            .as_array()
            .expect("security")
            .iter()
            .map(|r| r["$ref"].as_str().expect("$ref").to_owned())
            .collect()
    };
    assert_eq!(security("mqtt"), ["#/components/securitySchemes/secret"]);
    assert_eq!(
        security("mqtts"),
        [
            "#/components/securitySchemes/secret",
            "#/components/securitySchemes/certificate"
        ]
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["secret"]["type"],
        "userPassword"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["certificate"]["type"],
        "X509"
    );
}

const REFERENCE_BEGIN: &str =
    "<!-- reference: written by protocol/tests/asyncapi.rs from the AsyncAPI document -->\n";
const REFERENCE_END: &str = "<!-- end of reference -->";

/// A schema's type, for a table.
fn type_of(schema: &Value) -> String {
    if let Some(r) = schema["allOf"][0]["$ref"]
        .as_str()
        .or(schema["$ref"].as_str())
    {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("[`{name}`](#{})", name.to_lowercase());
    }
    match (schema["type"].as_str(), schema["format"].as_str()) {
        (Some(t), Some(f)) => format!("{t} ({f})"),
        (Some(t), None) => t.to_owned(),
        _ => "any JSON".to_owned(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// The reference part of the device guide, rendered from the document.
fn render_reference(doc: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "## How a session goes\n");
    let _ = writeln!(
        out,
        "{}\n",
        doc["info"]["description"].as_str().unwrap_or_default()
    );

    let _ = writeln!(out, "## Topics\n");
    let _ = writeln!(
        out,
        "Every topic is under `devices/{{deviceId}}/`; a device may use no other. \
         QoS 1 both ways, nothing retained.\n"
    );
    let _ = writeln!(out, "| topic | the device | payload | what |");
    let _ = writeln!(out, "|---|---|---|---|");
    // In the order a device meets them (the crate's list); all from the
    // document.
    for topic in Topic::ALL {
        let (id, channel) = doc["channels"]
            .as_object()
            .expect("channels")
            .iter()
            .find(|(_, c)| c["address"] == topic.template().as_str())
            .expect("channel");
        let op = doc["operations"]
            .as_object()
            .expect("operations")
            .values()
            .find(|o| o["channel"]["$ref"] == format!("#/channels/{id}"))
            .expect("operation");
        let message = channel["messages"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(|m| m["$ref"].as_str())
            .and_then(|r| doc.pointer(r.trim_start_matches('#')))
            .expect("message");
        let payload = type_of(&message["payload"]);
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            channel["address"].as_str().unwrap_or_default(),
            if op["action"] == "send" {
                "publishes"
            } else {
                "subscribes"
            },
            payload,
            one_line(channel["description"].as_str().unwrap_or_default())
        );
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "## Payloads\n");
    let _ = writeln!(out, "JSON (UTF-8). Unknown fields are ignored.\n");
    let messages = doc["components"]["messages"].as_object().expect("messages");
    for (name, schema) in doc["components"]["schemas"].as_object().expect("schemas") {
        let _ = writeln!(out, "### {name}\n");
        let _ = writeln!(
            out,
            "{}\n",
            one_line(schema["description"].as_str().unwrap_or_default())
        );
        if let Some(props) = schema["properties"].as_object() {
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let _ = writeln!(out, "| field | type | required | meaning |");
            let _ = writeln!(out, "|---|---|---|---|");
            for (field, p) in props {
                let _ = writeln!(
                    out,
                    "| `{field}` | {} | {} | {} |",
                    type_of(p),
                    if required.contains(&field.as_str()) {
                        "yes"
                    } else {
                        "no"
                    },
                    one_line(p["description"].as_str().unwrap_or_default())
                );
            }
            let _ = writeln!(out);
        }
        if let Some(alternatives) = schema["oneOf"].as_array() {
            for a in alternatives {
                let _ = writeln!(
                    out,
                    "- `{}`: {}",
                    a["const"],
                    one_line(a["description"].as_str().unwrap_or_default())
                );
            }
            let _ = writeln!(out);
        }
        let reference = format!("#/components/schemas/{name}");
        for m in messages
            .values()
            .filter(|m| m["payload"]["$ref"] == reference.as_str())
        {
            for e in m["examples"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "Example ({}, {}):\n\n```json\n{}\n```\n",
                    m["name"].as_str().unwrap_or_default(),
                    e["summary"].as_str().unwrap_or_default().to_lowercase(),
                    e["payload"]
                );
            }
        }
    }

    let _ = writeln!(out, "## Logging in\n");
    for (name, s) in doc["components"]["securitySchemes"]
        .as_object()
        .expect("schemes")
    {
        let _ = writeln!(
            out,
            "- **{name}** (`{}`): {}",
            s["type"].as_str().unwrap_or_default(),
            one_line(s["description"].as_str().unwrap_or_default())
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Listeners of a gateway on its default settings:\n");
    let _ = writeln!(out, "| server | host | protocol | log in with |");
    let _ = writeln!(out, "|---|---|---|---|");
    for (name, s) in doc["servers"].as_object().expect("servers") {
        let security: Vec<String> = s["security"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["$ref"].as_str())
            .map(|r| r.rsplit('/').next().unwrap_or(r).to_owned())
            .collect();
        let _ = writeln!(
            out,
            "| `{name}` | `{}` | {} (MQTT {}; 3.1.1 and 5 both served) | {} |",
            s["host"].as_str().unwrap_or_default(),
            s["protocol"].as_str().unwrap_or_default(),
            s["protocolVersion"].as_str().unwrap_or_default(),
            security.join(" or ")
        );
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "## Reason codes\n");
    let _ = writeln!(
        out,
        "What the gateway answers with (MQTT 3.1.1 has no code where the column is empty).\n"
    );
    let _ = writeln!(out, "| packet | MQTT 5 | MQTT 3.1.1 | name | when |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for c in doc["x-entente-reason-codes"].as_array().expect("codes") {
        let code = |v: &Value| v.as_str().map(|s| format!("`{s}`")).unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            c["packet"].as_str().unwrap_or_default(),
            code(&c["mqtt5"]),
            code(&c["mqtt311"]),
            c["name"].as_str().unwrap_or_default(),
            one_line(c["meaning"].as_str().unwrap_or_default())
        );
    }
    out
}

/// `docs/DEVICES.md` prints the document: its reference part is rendered
/// from it and must be current (`ENTENTE_BLESS=1` rewrites it).
#[test]
fn the_device_guide_prints_the_document() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/DEVICES.md");
    let guide = std::fs::read_to_string(&path).expect("read docs/DEVICES.md");
    let start = guide
        .find(REFERENCE_BEGIN)
        .expect("docs/DEVICES.md has no reference block")
        + REFERENCE_BEGIN.len();
    let end = start
        + guide[start..]
            .find(REFERENCE_END)
            .expect("docs/DEVICES.md: the reference block is not closed");
    let rendered = render_reference(&asyncapi::document());
    if guide[start..end] == rendered {
        return;
    }
    if std::env::var_os("ENTENTE_BLESS").is_some() {
        std::fs::write(
            &path,
            format!("{}{rendered}{}", &guide[..start], &guide[end..]),
        )
        .expect("write docs/DEVICES.md");
        return;
    }
    let first = guide[start..end]
        .lines()
        .zip(rendered.lines())
        .position(|(a, b)| a != b);
    panic!(
        "docs/DEVICES.md does not print the current AsyncAPI document (first differing line: \
         {first:?}); ENTENTE_BLESS=1 cargo test -p entente-protocol --test asyncapi rewrites it"
    );
}
