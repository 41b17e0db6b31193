//! The device contract as an [AsyncAPI 3.0](https://www.asyncapi.com/docs/reference/specification/v3.0.0)
//! document, generated from this crate's own definitions so it cannot drift
//! from them: a channel per [`Topic`], the payload schemas derived from the
//! Rust types ([`schemars`]), the examples serialised from values of those
//! types, the refusal codes from [`reason_codes::ALL`].
//!
//! Operations are seen from the device: it `receive`s commands and shadow
//! documents, and `send`s `accepted`, results and reported state. The
//! gateway serves the document at `GET /asyncapi.json` with its own
//! listeners as `servers` ([`document_with`]); [`document`] has the
//! gateway's default listeners.

use schemars::SchemaGenerator;
use schemars::generate::{Contract, SchemaSettings};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::reason_codes;
use crate::{
    AcceptedMessage, CommandMessage, CommandResultMessage, Payload, ReportedPatch, ResultStatus,
    ShadowDocument, Topic,
};

/// The AsyncAPI version the document is written in.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// The version of the MQTT bindings used.
pub const MQTT_BINDING_VERSION: &str = "0.2.0";

/// One device listener of a gateway, as a `servers` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The entry's key (`mqtt`, `mqtt5`, `mqtts`).
    pub name: String,
    /// Where devices connect.
    pub host: Host,
    /// Whether the listener speaks TLS (`secure-mqtt`).
    pub tls: bool,
    /// Whether it asks for client certificates (TLS only): devices may then
    /// log in with a certificate instead of a secret.
    pub client_certificates: bool,
    /// The MQTT version the port is named for (`3.1.1` or `5`); every
    /// listener serves both.
    pub protocol_version: &'static str,
}

/// Where a listener is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A fixed `host:port`.
    Fixed(String),
    /// A listener on every interface: the host is the server variable
    /// `host` (`default` is its default), the port fixed.
    AnyInterface {
        /// The port.
        port: u16,
        /// The host to show by default.
        default: String,
    },
}

/// The gateway's default listeners (`--mqtt-listen 0.0.0.0:1883`,
/// `--mqtt5-listen 0.0.0.0:1884`, and `--mqtt-tls-listen 0.0.0.0:8883`,
/// which opens when a certificate is given).
pub fn default_servers() -> Vec<Server> {
    let any = |port| Host::AnyInterface {
        port,
        default: "localhost".into(),
    };
    vec![
        Server {
            name: "mqtt".into(),
            host: any(1883),
            tls: false,
            client_certificates: false,
            protocol_version: "3.1.1",
        },
        Server {
            name: "mqtt5".into(),
            host: any(1884),
            tls: false,
            client_certificates: false,
            protocol_version: "5",
        },
        Server {
            name: "mqtts".into(),
            host: any(8883),
            tls: true,
            client_certificates: true,
            protocol_version: "5",
        },
    ]
}

/// The document with the gateway's default listeners as servers.
pub fn document() -> Value {
    document_with(&default_servers())
}

/// How a device meets the gateway, its commands and its shadow: the
/// document's `info.description` (Markdown), also printed in the device
/// guide.
pub const LIFECYCLE: &str = r#"A device talks to one gateway of an Entente group over MQTT 3.1.1 or 5 (every listener serves both). It connects, subscribes to its own topics, answers the commands it is sent and reports its state; the gateway commits every step in the group before acknowledging it.

**Connecting.** Client id = username = the device id; password = the device's secret (returned once when the device was registered). Over TLS with a client certificate registered for the device (`cert_sha256`), the certificate is the login: the username may be empty or the id, the password is not looked at. A last will is refused. MQTT 5 clients are told in the CONNACK: Maximum QoS 1, Retain Available 0, Topic Alias Maximum 0, Shared Subscription Available 0, Subscription Identifiers Available 0, Wildcard Subscription Available 1 (within the device's own topics), Receive Maximum 100, the Maximum Packet Size, and a Server Keep Alive of 1,200 s when the device asked for none or more. A device silent for 1.5 × its keep-alive is disconnected. One client id holds one session in the whole group: a second connection takes the session over (the first is told 0x8E).

**What the gateway sends on every connect.** Nothing until the device subscribes. On each SUBACK it sends what the new filters cover: every command of the device still `queued`, `sent` or `accepted` (oldest first) on `devices/{deviceId}/commands`, the full desired document on `devices/{deviceId}/shadow/desired` and the delta (desired keys that differ from reported) on `devices/{deviceId}/shadow/delta` — also when they are empty. A device should subscribe to `devices/{deviceId}/commands`, `devices/{deviceId}/shadow/desired` and/or `devices/{deviceId}/shadow/delta` (or `devices/{deviceId}/#`) on every connect, whatever the session-present flag. Nothing is queued for an offline device: the replicated state is the queue, delivered again on the next SUBSCRIBE. Messages are sent at the granted QoS (at most 1), never retained.

**The command lifecycle, seen from the device.**
1. A command arrives on `devices/{deviceId}/commands` (`id`, `name`, `params`, `issued_at`, `expires_at`).
2. The device publishes `{}` to `devices/{deviceId}/commands/{commandId}/accepted` (QoS 1) when it takes the command on: the command becomes `accepted`.
3. When it is done, it publishes `{"status": "succeeded" | "failed", "output": …}` to `devices/{deviceId}/commands/{commandId}/result` (QoS 1): the command is finished. A device that answers at once may send the result without waiting for the PUBACK of `accepted`.
4. Each PUBACK comes once the step is committed in the gateway group. A device keeps what is not acknowledged and publishes it again after reconnecting (to this gateway or another); every step is idempotent.

**Delivery is at least once: a command may arrive twice** (after a reconnect, a failover, or a redelivery of a command left unanswered for 3 s or more, again after 6, 12, … up to 300 s). Deduplicate by command `id`: run a command once; to a command already finished answer its result again; to one in progress, nothing new. A command past `expires_at` is expired by the gateway, and an operator may cancel one: either way it is not delivered any more, and late answers to it are acknowledged (0x00) and change nothing.

**The shadow.** The desired state (set by operators) arrives whole on `shadow/desired` and as the difference from reported on `shadow/delta`, each with the shadow's `version`, whenever desired or reported changes and on every SUBSCRIBE. The device applies what it can and publishes a JSON merge patch (RFC 7386: an object; `null` removes a key) of its reported state to `devices/{deviceId}/shadow/reported`; keys reported equal to desired leave the delta.

**Refusals.** A PUBLISH to any other topic, or a SUBSCRIBE outside `devices/{deviceId}/`, closes the connection (MQTT 5: DISCONNECT 0x87). A message the gateway will not act on (an unknown command id, malformed JSON, too large) is still acknowledged — sending it again cannot change the outcome — with a reason code under MQTT 5 (0x83, 0x99, 0x97); MQTT 3.1.1 has none. The codes are listed in `x-entente-reason-codes`."#;

/// The document with `servers` as its servers.
pub fn document_with(servers: &[Server]) -> Value {
    let mut schemas = Map::new();
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    let mut to_device = generator(Contract::Serialize);
    let mut from_device = generator(Contract::Deserialize);
    for payload in Payload::ALL {
        // What the gateway sends is described as it serialises it; what it
        // takes, as it parses it (optional fields optional).
        let generator = if Topic::ALL
            .iter()
            .any(|t| t.payload() == payload && t.from_device())
        {
            &mut from_device
        } else {
            &mut to_device
        };
        let schema = match payload {
            Payload::Command => generator.subschema_for::<CommandMessage>(),
            Payload::Accepted => generator.subschema_for::<AcceptedMessage>(),
            Payload::Result => generator.subschema_for::<CommandResultMessage>(),
            Payload::ReportedPatch => generator.subschema_for::<ReportedPatch>(),
            Payload::Shadow => generator.subschema_for::<ShadowDocument>(),
        };
        debug_assert_eq!(
            schema.get("$ref").and_then(Value::as_str),
            Some(format!("#/components/schemas/{}", payload.schema_name()).as_str())
        );
    }
    for generator in [&mut to_device, &mut from_device] {
        for (name, mut schema) in generator.take_definitions(true) {
            if let Some(o) = schema.as_object_mut() {
                o.remove("$schema");
            }
            schemas.insert(name, schema);
        }
    }
    if let Some(Value::Object(o)) = schemas.get_mut(Payload::ReportedPatch.schema_name()) {
        o.insert(
            "description".into(),
            json!(
                "An RFC 7386 JSON merge patch of the device's reported state: an object; \
                 `null` removes a key, nested objects merge."
            ),
        );
    }

    for topic in Topic::ALL {
        let t = describe(topic);
        let mut parameters = Map::new();
        parameters.insert(
            "deviceId".into(),
            json!({"$ref": "#/components/parameters/deviceId"}),
        );
        if topic.template().contains("{commandId}") {
            parameters.insert(
                "commandId".into(),
                json!({"$ref": "#/components/parameters/commandId"}),
            );
        }
        channels.insert(
            t.channel.into(),
            json!({
                "address": topic.template(),
                "title": t.title,
                "description": t.description,
                "parameters": parameters,
                "messages": {t.message: {"$ref": format!("#/components/messages/{}", t.message)}},
            }),
        );
        let (action, qos_note) = if topic.from_device() {
            (
                "send",
                "Publish at QoS 1 (QoS 0 is taken but never acknowledged: a lost message is not \
                 known lost; QoS 2 is served over 3.1.1, refused over MQTT 5); never retained.",
            )
        } else {
            (
                "receive",
                "Sent at the QoS the subscription was granted (at most 1; subscribe at QoS 1), \
                 never retained.",
            )
        };
        operations.insert(
            t.operation.into(),
            json!({
                "action": action,
                "channel": {"$ref": format!("#/channels/{}", t.channel)},
                "title": t.title,
                "summary": t.summary,
                "description": format!("{} {qos_note}", t.description),
                "messages": [{"$ref": format!("#/channels/{}/messages/{}", t.channel, t.message)}],
                "bindings": {"mqtt": {"qos": 1, "retain": false, "bindingVersion": MQTT_BINDING_VERSION}},
            }),
        );
        messages.insert(
            t.message.into(),
            json!({
                "name": t.message,
                "title": t.title,
                "summary": t.summary,
                "contentType": "application/json",
                "payload": {"$ref": format!("#/components/schemas/{}", topic.payload().schema_name())},
                "examples": t.examples,
            }),
        );
    }

    let server_map = servers_json(servers);

    json!({
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:entente:devices",
        "info": {
            "title": "Entente device contract (MQTT)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": LIFECYCLE,
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": server_map,
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "parameters": {
                "deviceId": {
                    "description": "The device's id, as registered (`POST /v1/devices`); also its MQTT client id and username.",
                    "examples": ["pump-7"],
                },
                "commandId": {
                    "description": "The command's `id`, from the command message.",
                    "examples": ["c-019b7a7e1c00a1b2c3d4e5f60718"],
                },
            },
            "securitySchemes": {
                "secret": {
                    "type": "userPassword",
                    "description": "Username = client id = the device id; password = the device's secret \
                        (returned once at registration or rotation). An unknown device or a wrong secret is \
                        refused with CONNACK 3.1.1 return code 4, MQTT 5 0x86; a username other than the \
                        client id, or a client id that is not a valid device id, with 2 / 0x85. Failed \
                        logins are throttled per address and per id (3 / 0x9F).",
                },
                "certificate": {
                    "type": "X509",
                    "description": "On a TLS listener that asks for client certificates: a certificate signed \
                        by the gateway's client CA whose SHA-256 (of the DER leaf) is the device's registered \
                        `cert_sha256`. The username may be empty or the device id; the password is not looked \
                        at. Another device's certificate is refused (3.1.1: 5, MQTT 5: 0x87).",
                },
            },
        },
        "x-entente-reason-codes": reason_codes_json(),
    })
}

/// The document's `servers` member for `servers` (to put a gateway's own
/// listeners into a document built once).
pub fn servers_json(servers: &[Server]) -> Value {
    Value::Object(
        servers
            .iter()
            .map(|s| (s.name.clone(), server(s)))
            .collect(),
    )
}

fn generator(contract: Contract) -> SchemaGenerator {
    let mut settings = SchemaSettings::draft07();
    settings.definitions_path = "/components/schemas".into();
    settings.contract = contract;
    settings.into_generator()
}

fn server(s: &Server) -> Value {
    let mut security = vec![json!({"$ref": "#/components/securitySchemes/secret"})];
    if s.tls && s.client_certificates {
        security.push(json!({"$ref": "#/components/securitySchemes/certificate"}));
    }
    let mut description = format!(
        "Devices over MQTT{}; named for MQTT {}, it serves 3.1.1 and 5 alike (the CONNECT's protocol \
         level decides; 3.1 is refused).",
        if s.tls { " over TLS (1.2 or 1.3)" } else { "" },
        s.protocol_version
    );
    if s.tls && s.client_certificates {
        description.push_str(
            " It asks for client certificates: a device may log in with its registered \
             certificate instead of its secret.",
        );
    }
    let mut out = json!({
        "protocol": if s.tls { "secure-mqtt" } else { "mqtt" },
        "protocolVersion": s.protocol_version,
        "security": security,
    });
    match &s.host {
        Host::Fixed(h) => out["host"] = json!(h),
        Host::AnyInterface { port, default } => {
            out["host"] = json!(format!("{{host}}:{port}"));
            out["variables"] = json!({"host": {
                "default": default,
                "description": "The gateway's address: this listener is on every interface.",
            }});
        }
    }
    out["description"] = json!(description);
    out
}

fn reason_codes_json() -> Value {
    let hex = |c: Option<u8>| c.map_or(Value::Null, |c| json!(format!("0x{c:02X}")));
    Value::Array(
        reason_codes::ALL
            .iter()
            .map(|r| {
                json!({
                    "packet": r.packet.to_string(),
                    "mqtt5": hex(r.mqtt5),
                    "mqtt311": hex(r.mqtt311),
                    "name": r.name,
                    "meaning": r.meaning,
                })
            })
            .collect(),
    )
}

/// How one topic is presented.
struct Described {
    channel: &'static str,
    operation: &'static str,
    message: &'static str,
    title: &'static str,
    summary: &'static str,
    description: &'static str,
    examples: Value,
}

fn example(name: &str, summary: &str, payload: impl Serialize) -> Value {
    json!({
        "name": name,
        "summary": summary,
        "payload": serde_json::to_value(payload).unwrap_or(Value::Null),
    })
}

/// The example values (also what the tests round-trip through the types).
pub fn examples(payload: Payload) -> Vec<Value> {
    let t = |topic: Topic| describe(topic).examples;
    let all = Topic::ALL
        .iter()
        .filter(|topic| topic.payload() == payload)
        .flat_map(|&topic| match t(topic) {
            Value::Array(a) => a,
            _ => Vec::new(),
        });
    all.filter_map(|e| e.get("payload").cloned()).collect()
}

fn describe(topic: Topic) -> Described {
    const ISSUED: u64 = 1_767_225_600_000;
    match topic {
        Topic::Commands => Described {
            channel: "commands",
            operation: "receiveCommand",
            message: "command",
            title: "Commands",
            summary: "A command for the device to run.",
            description: "The gateway publishes each command issued for the device, and on every \
                SUBSCRIBE that covers this topic every command still queued, sent or accepted. \
                Delivery is at least once: deduplicate by `id`.",
            examples: json!([example(
                "reboot",
                "A reboot in 5 s, to be answered within a minute",
                CommandMessage {
                    id: "c-019b7a7e1c00a1b2c3d4e5f60718".into(),
                    name: "reboot".into(),
                    params: json!({"delay_s": 5}),
                    issued_at: ISSUED,
                    expires_at: ISSUED + 60_000,
                }
            )]),
        },
        Topic::Accepted => Described {
            channel: "commandAccepted",
            operation: "sendAccepted",
            message: "accepted",
            title: "Command accepted",
            summary: "The device took the command on.",
            description: "Publish `{}` when the device starts on a command (status `accepted`); \
                the payload is not read. Optional: a result alone finishes the command.",
            examples: json!([example("accepted", "Accepted", AcceptedMessage {})]),
        },
        Topic::Result => Described {
            channel: "commandResult",
            operation: "sendResult",
            message: "result",
            title: "Command result",
            summary: "How the command ended.",
            description: "Publish the result once the command is done: it finishes the command \
                (`succeeded` or `failed`, with `output`). A result for a finished command changes \
                nothing and is acknowledged (0x00); for an unknown command or another device's, \
                0x83.",
            examples: json!([
                example(
                    "succeeded",
                    "It worked",
                    CommandResultMessage {
                        status: ResultStatus::Succeeded,
                        output: json!({"rebooted_at": ISSUED + 5_000}),
                    }
                ),
                example(
                    "failed",
                    "It did not",
                    CommandResultMessage {
                        status: ResultStatus::Failed,
                        output: json!({"error": "battery too low"}),
                    }
                ),
            ]),
        },
        Topic::Reported => Described {
            channel: "shadowReported",
            operation: "sendReported",
            message: "reported",
            title: "Reported state",
            summary: "A merge patch of the device's reported state.",
            description: "Publish what changed in the device's state as a JSON merge patch \
                (RFC 7386): an object, `null` removing a key. Patches apply in the order sent.",
            examples: json!([example(
                "reported",
                "Firmware and temperature, an old key removed",
                ReportedPatch(
                    json!({"firmware": "2.4.1", "temperature": 21.5, "led": null})
                        .as_object()
                        .cloned()
                        .unwrap_or_default()
                )
            )]),
        },
        Topic::Desired => Described {
            channel: "shadowDesired",
            operation: "receiveDesired",
            message: "desired",
            title: "Desired state",
            summary: "The full desired state, with the shadow's version.",
            description: "The gateway publishes the whole desired state when it changes and on \
                every SUBSCRIBE that covers this topic.",
            examples: json!([example(
                "desired",
                "Desired state at version 3",
                ShadowDocument {
                    state: json!({"interval_s": 30, "led": "green"}),
                    version: 3,
                }
            )]),
        },
        Topic::Delta => Described {
            channel: "shadowDelta",
            operation: "receiveDelta",
            message: "delta",
            title: "Desired-state delta",
            summary: "The desired keys whose reported value differs.",
            description: "The gateway publishes the delta (desired keys absent from reported or \
                different there) when desired or reported changes and on every SUBSCRIBE that \
                covers this topic; `{}` once the device has caught up.",
            examples: json!([example(
                "delta",
                "Only the interval still differs",
                ShadowDocument {
                    state: json!({"interval_s": 30}),
                    version: 3,
                }
            )]),
        },
    }
}

/// Keeps the type names the schemas are keyed by in one place with the
/// types (a renamed type renames its schema; [`Payload::schema_name`] must
/// follow).
#[cfg(test)]
fn schema_names_match_types() {
    fn name<T: schemars::JsonSchema>() -> String {
        T::schema_name().into_owned()
    }
    for p in Payload::ALL {
        let n = match p {
            Payload::Command => name::<CommandMessage>(),
            Payload::Accepted => name::<AcceptedMessage>(),
            Payload::Result => name::<CommandResultMessage>(),
            Payload::ReportedPatch => name::<ReportedPatch>(),
            Payload::Shadow => name::<ShadowDocument>(),
        };
        assert_eq!(n, p.schema_name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_are_named_for_their_types() {
        schema_names_match_types();
    }

    #[test]
    fn examples_round_trip_through_the_types() {
        fn round<T: serde::de::DeserializeOwned + Serialize>(v: &Value) {
            let t: T = serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("{v} is not a {}: {e}", std::any::type_name::<T>()));
            assert_eq!(&serde_json::to_value(t).expect("serialise"), v);
        }
        for p in Payload::ALL {
            let examples = examples(p);
            assert!(!examples.is_empty(), "{p:?} has no example");
            for e in &examples {
                match p {
                    Payload::Command => round::<CommandMessage>(e),
                    Payload::Accepted => round::<AcceptedMessage>(e),
                    Payload::Result => round::<CommandResultMessage>(e),
                    Payload::ReportedPatch => round::<ReportedPatch>(e),
                    Payload::Shadow => round::<ShadowDocument>(e),
                }
            }
        }
    }
}
