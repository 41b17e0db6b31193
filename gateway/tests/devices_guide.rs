//! The device guide (`docs/DEVICES.md`) and `GET /asyncapi.json` against a
//! real gateway (`gateway::start`, real sockets) and a real MQTT 5 client
//! (rumqttc).
//!
//! The guide's session transcript is produced here: a device connects,
//! subscribes, receives a command queued while it was offline and its
//! shadow documents, accepts the command, reports its result, receives a
//! desired-state change and its delta, reports its state and gets the delta
//! emptied. Every packet is written down as the client saw it — ids, the
//! secret and timestamps replaced by placeholders — and the test fails if
//! the transcript in the guide differs. `ENTENTE_BLESS=1` rewrites it
//! instead (then review the diff).

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Filter, Packet, PubAck, PubAckReason, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout_at};

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(15);

const DEVICE: &str = "pump-7";

type Env = common::Single;

impl Env {
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }
}

/// The transcript, line by line, with the values that change from run to
/// run replaced.
struct Transcript {
    lines: Vec<String>,
    replace: Vec<(String, String)>,
}

impl Transcript {
    fn line(&mut self, text: String) {
        let mut text = text;
        for (from, to) in &self.replace {
            text = text.replace(from, to);
        }
        self.lines.push(text);
    }

    fn device(&mut self, packet: &str) {
        self.line(format!("device  → {packet}"));
    }

    fn gateway(&mut self, packet: &str) {
        self.line(format!("gateway → {packet}"));
    }

    fn note(&mut self, text: &str) {
        self.line(format!("# {text}"));
    }
}

fn hex_puback(r: PubAckReason) -> String {
    match r {
        PubAckReason::Success => "0x00 Success".into(),
        PubAckReason::ImplementationSpecificError => "0x83 Implementation specific error".into(),
        PubAckReason::QuotaExceeded => "0x97 Quota exceeded".into(),
        PubAckReason::PayloadFormatInvalid => "0x99 Payload format invalid".into(),
        other => format!("{other:?}"),
    }
}

fn connack_line(c: &ConnAck) -> String {
    let mut props = Vec::new();
    if let Some(p) = &c.properties {
        let flag = |v: Option<u8>| v.map(|v| v.to_string());
        let fields = [
            ("Receive Maximum", p.receive_max.map(|v| v.to_string())),
            ("Maximum QoS", flag(p.max_qos)),
            ("Retain Available", flag(p.retain_available)),
            (
                "Maximum Packet Size",
                p.max_packet_size.map(|v| v.to_string()),
            ),
            (
                "Topic Alias Maximum",
                p.topic_alias_max.map(|v| v.to_string()),
            ),
            (
                "Wildcard Subscription Available",
                flag(p.wildcard_subscription_available),
            ),
            (
                "Subscription Identifiers Available",
                flag(p.subscription_identifiers_available),
            ),
            (
                "Shared Subscription Available",
                flag(p.shared_subscription_available),
            ),
            (
                "Server Keep Alive",
                p.server_keep_alive.map(|v| v.to_string()),
            ),
            (
                "Session Expiry Interval",
                p.session_expiry_interval.map(|v| v.to_string()),
            ),
        ];
        for (name, value) in fields {
            if let Some(v) = value {
                props.push(format!("{name}={v}"));
            }
        }
    }
    format!(
        "CONNACK session-present={} reason=0x00 Success\n          {}",
        u8::from(c.session_present),
        props.join(", ")
    )
}

fn suback_line(s: &SubAck) -> String {
    let codes: Vec<String> = s
        .return_codes
        .iter()
        .map(|c| match c {
            SubscribeReasonCode::Success(q) => format!("0x{:02X} (QoS {})", *q as u8, *q as u8),
            other => format!("{other:?}"),
        })
        .collect();
    format!("SUBACK {}", codes.join(", "))
}

fn publish_line(p: &Publish) -> String {
    format!(
        "PUBLISH {} qos={} retain={}\n          {}",
        String::from_utf8_lossy(&p.topic),
        p.qos as u8,
        u8::from(p.retain),
        String::from_utf8_lossy(&p.payload)
    )
}

/// The device: a rumqttc MQTT 5 client, polled by the test itself so that
/// every packet is seen in order; acknowledgements of what it receives are
/// sent by the test (manual acks), so they are in the transcript too.
struct Device {
    client: AsyncClient,
    events: EventLoop,
    commands_seen: Vec<String>,
    pending: VecDeque<Publish>,
}

impl Device {
    async fn next_packet(&mut self) -> Packet {
        let deadline = Instant::now() + STEP;
        loop {
            match timeout_at(deadline, self.events.poll()).await {
                Ok(Ok(Event::Incoming(p))) => return p,
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => panic!("the device's connection failed: {e}"),
                Err(_) => panic!("no packet from the gateway within {STEP:?}"),
            }
        }
    }

    async fn connack(&mut self) -> ConnAck {
        match self.next_packet().await {
            Packet::ConnAck(c) => c,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn suback(&mut self) -> SubAck {
        match self.next_packet().await {
            Packet::SubAck(s) => s,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next PUBLISH from the gateway. A command delivered again (the
    /// gateway redelivers one left unanswered for 3 s, and delivery is at
    /// least once) is acknowledged and skipped, as a device deduplicates it.
    async fn publish(&mut self) -> Publish {
        loop {
            let p = match self.pending.pop_front() {
                Some(p) => p,
                None => match self.next_packet().await {
                    Packet::Publish(p) => p,
                    Packet::PingResp(_) => continue,
                    other => panic!("expected PUBLISH, got {other:?}"),
                },
            };
            let id = serde_json::from_slice::<Value>(&p.payload)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned));
            if p.topic.ends_with(b"/commands")
                && let Some(id) = id
            {
                if self.commands_seen.contains(&id) {
                    self.client.ack(&p).await.expect("ack");
                    continue;
                }
                self.commands_seen.push(id);
            }
            return p;
        }
    }

    /// The next PUBACK. A PUBLISH that comes first (the delta a report
    /// causes may overtake the report's PUBACK: both follow its commit) is
    /// kept for [`Device::publish`].
    async fn puback(&mut self) -> PubAck {
        loop {
            match self.next_packet().await {
                Packet::PubAck(a) => return a,
                Packet::PingResp(_) => {}
                Packet::Publish(p) => self.pending.push_back(p),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }
}

/// Receives the next PUBLISH, writes it down and acknowledges it.
async fn receive(d: &mut Device, t: &mut Transcript) -> Value {
    let p = d.publish().await;
    t.gateway(&publish_line(&p));
    d.client.ack(&p).await.expect("ack");
    t.device(&format!(
        "PUBACK (of the {})",
        String::from_utf8_lossy(&p.topic)
    ));
    serde_json::from_slice(&p.payload).expect("JSON payload")
}

/// Publishes `payload` to `topic` at QoS 1, writes it down, and waits for
/// (and writes down) the gateway's PUBACK.
async fn send(d: &mut Device, t: &mut Transcript, topic: &str, payload: &Value) -> PubAckReason {
    let text = payload.to_string();
    d.client
        .publish(topic, QoS::AtLeastOnce, false, text.clone())
        .await
        .expect("publish");
    t.device(&format!("PUBLISH {topic} qos=1 retain=0\n          {text}"));
    let ack = d.puback().await;
    t.gateway(&format!("PUBACK {}", hex_puback(ack.reason)));
    ack.reason
}

fn guide_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/DEVICES.md")
}

const BEGIN: &str = "<!-- transcript: written by gateway/tests/devices_guide.rs -->\n```text\n";
const END: &str = "```\n<!-- end of transcript -->";

/// Compares the guide's transcript with `lines`; rewrites it with
/// `ENTENTE_BLESS` set.
fn check_guide(lines: &[String]) {
    let path = guide_path();
    let guide = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let start = guide
        .find(BEGIN)
        .unwrap_or_else(|| panic!("{} has no transcript block", path.display()))
        + BEGIN.len();
    let end = start
        + guide[start..]
            .find(END)
            .unwrap_or_else(|| panic!("{}: the transcript block is not closed", path.display()));
    let mut actual = lines.join("\n");
    actual.push('\n');
    if guide[start..end] == actual {
        return;
    }
    if std::env::var_os("ENTENTE_BLESS").is_some() {
        let updated = format!("{}{actual}{}", &guide[..start], &guide[end..]);
        std::fs::write(&path, updated).expect("write the guide");
        return;
    }
    let expected: Vec<&str> = guide[start..end].lines().collect();
    let first = expected
        .iter()
        .zip(actual.lines())
        .position(|(a, b)| a != &b)
        .unwrap_or(expected.len().min(actual.lines().count()));
    panic!(
        "the transcript in docs/DEVICES.md is not what the gateway does (first difference at line \
         {}): the guide says\n{}\nthe gateway did\n{}\n(ENTENTE_BLESS=1 rewrites it; review the \
         diff)",
        first + 1,
        expected.get(first).unwrap_or(&"(nothing)"),
        actual.lines().nth(first).unwrap_or("(nothing)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_session_transcript_is_what_the_gateway_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = common::single(dir.path(), |_| {}).await;
    let addr: SocketAddr = env.gw.mqtt5_addr.expect("mqtt5 listener");

    // Offline: the device is registered and a command queued for it.
    let reg = env
        .call(
            reqwest::Method::POST,
            "/v1/devices",
            json!({"id": DEVICE, "labels": {"site": "north"}}),
        )
        .await;
    let secret = reg["secret"].as_str().expect("secret").to_owned();
    let cmd = env
        .call(
            reqwest::Method::POST,
            &format!("/v1/devices/{DEVICE}/commands?wait=0"),
            json!({"name": "reboot", "params": {"delay_s": 5}}),
        )
        .await;
    let cid = cmd["id"].as_str().expect("command id").to_owned();
    let (issued, expires) = (
        cmd["issued_at"].as_u64().expect("issued_at"),
        cmd["expires_at"].as_u64().expect("expires_at"),
    );
    assert_eq!(cmd["status"], "queued");

    let mut t = Transcript {
        lines: Vec::new(),
        replace: vec![
            (secret.clone(), "<secret>".into()),
            (cid.clone(), "<command-id>".into()),
            (
                format!("\"issued_at\":{issued}"),
                "\"issued_at\":<ms>".into(),
            ),
            (
                format!("\"expires_at\":{expires}"),
                "\"expires_at\":<ms>".into(),
            ),
        ],
    };
    t.note(&format!(
        "{DEVICE} is registered; a command was issued while it was offline (status queued):"
    ));
    t.note(&format!(
        "POST /v1/devices/{DEVICE}/commands {{\"name\":\"reboot\",\"params\":{{\"delay_s\":5}}}}"
    ));

    let mut opts = MqttOptions::new(DEVICE, addr.ip().to_string(), addr.port());
    opts.set_credentials(DEVICE, secret.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(true);
    opts.set_manual_acks(true);
    let (client, events) = AsyncClient::new(opts, 16);
    let mut d = Device {
        client,
        events,
        commands_seen: Vec::new(),
        pending: VecDeque::new(),
    };
    t.device(&format!(
        "CONNECT MQTT 5 client-id={DEVICE} username={DEVICE} password=<secret> clean-start=1 keep-alive=30"
    ));
    let connack = d.connack().await;
    t.gateway(&connack_line(&connack));

    let filters = ["commands", "shadow/desired", "shadow/delta"]
        .map(|f| Filter::new(format!("devices/{DEVICE}/{f}"), QoS::AtLeastOnce));
    let listed: Vec<String> = filters
        .iter()
        .map(|f| format!("{} qos=1", f.path))
        .collect();
    d.client.subscribe_many(filters).await.expect("subscribe");
    t.device(&format!("SUBSCRIBE {}", listed.join(", ")));
    let suback = d.suback().await;
    t.gateway(&suback_line(&suback));

    t.note("on the SUBACK the gateway sends what the filters cover: the queued command, then");
    t.note("the desired document and the delta (empty: no desired state yet)");
    let command = receive(&mut d, &mut t).await;
    assert_eq!(command["id"], cid.as_str());
    assert_eq!(command["params"], json!({"delay_s": 5}));
    let desired = receive(&mut d, &mut t).await;
    assert_eq!(desired, json!({"state": {}, "version": 0}));
    let delta = receive(&mut d, &mut t).await;
    assert_eq!(delta, json!({"state": {}, "version": 0}));

    t.note("the device takes the command on, runs it, and reports how it ended");
    let accepted = entente_protocol::accepted_topic(DEVICE, &cid);
    let reason = send(&mut d, &mut t, &accepted, &json!({})).await;
    assert_eq!(reason, PubAckReason::Success);
    let result = entente_protocol::CommandResultMessage {
        status: entente_protocol::ResultStatus::Succeeded,
        output: json!({"uptime_s": 0}),
    };
    let result = serde_json::to_value(result).expect("result");
    let reason = send(
        &mut d,
        &mut t,
        &entente_protocol::result_topic(DEVICE, &cid),
        &result,
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);
    let done = env
        .call(
            reqwest::Method::GET,
            &format!("/v1/commands/{cid}"),
            Value::Null,
        )
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"], json!({"uptime_s": 0}));

    t.note("an operator sets the desired state:");
    let patch = json!({"desired": {"interval_s": 30, "led": "green"}});
    t.note(&format!("PATCH /v1/devices/{DEVICE}/shadow {patch}"));
    env.call(
        reqwest::Method::PATCH,
        &format!("/v1/devices/{DEVICE}/shadow"),
        patch,
    )
    .await;
    let desired = receive(&mut d, &mut t).await;
    assert_eq!(desired["state"], json!({"interval_s": 30, "led": "green"}));
    let delta = receive(&mut d, &mut t).await;
    assert_eq!(delta["state"], json!({"interval_s": 30, "led": "green"}));

    t.note("the device applies it and reports its state; the delta empties");
    let reason = send(
        &mut d,
        &mut t,
        &entente_protocol::reported_topic(DEVICE),
        &json!({"interval_s": 30, "led": "green", "firmware": "2.4.1"}),
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);
    let delta = receive(&mut d, &mut t).await;
    assert_eq!(delta["state"], json!({}));

    t.note("a result for a command that does not exist is acknowledged and refused for good");
    let reason = send(
        &mut d,
        &mut t,
        &entente_protocol::result_topic(DEVICE, "c-unknown"),
        &result,
    )
    .await;
    assert_eq!(reason, PubAckReason::ImplementationSpecificError);

    d.client.disconnect().await.expect("disconnect");
    t.device("DISCONNECT reason=0x00 Normal disconnection");

    check_guide(&t.lines);
    env.gw.stop().await;
}

/// The login refusals the guide lists (`reason_codes`): an unknown device
/// or a wrong secret is 0x86, a username other than the client id 0x85.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_refused_with_the_codes_the_guide_gives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = common::single(dir.path(), |_| {}).await;
    let addr: SocketAddr = env.gw.mqtt5_addr.expect("mqtt5 listener");
    let reg = env
        .call(reqwest::Method::POST, "/v1/devices", json!({"id": DEVICE}))
        .await;
    let secret = reg["secret"].as_str().expect("secret").to_owned();
    let refusal = |client: &str, user: &str, password: &str| {
        let mut opts = MqttOptions::new(client, addr.ip().to_string(), addr.port());
        opts.set_credentials(user, password);
        let (_client, mut events) = AsyncClient::new(opts, 4);
        async move {
            let deadline = Instant::now() + STEP;
            loop {
                match timeout_at(deadline, events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => {
                        panic!("logged in: {c:?}")
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(rumqttc::v5::ConnectionError::ConnectionRefused(code))) => return code,
                    Ok(Err(e)) => panic!("expected a refusal, got {e}"),
                    Err(_) => panic!("no answer within {STEP:?}"),
                }
            }
        }
    };
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    assert_eq!(
        refusal("nobody", "nobody", &secret).await,
        C::BadUserNamePassword
    );
    assert_eq!(
        refusal(DEVICE, DEVICE, "wrong").await,
        C::BadUserNamePassword
    );
    assert_eq!(
        refusal(DEVICE, "someone-else", &secret).await,
        C::ClientIdentifierNotValid
    );
    env.gw.stop().await;
}

/// `GET /asyncapi.json` needs no token (as `/openapi.json`), is the
/// protocol crate's document, and names this gateway's bound device
/// listeners as its servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_its_asyncapi_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = common::single(dir.path(), |_| {}).await;
    let r = env
        .http
        .get(format!("{}/asyncapi.json", env.base))
        .send()
        .await
        .expect("GET /asyncapi.json");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let mut doc: Value = r.json().await.expect("JSON");
    assert_eq!(doc["asyncapi"], "3.0.0");
    let servers = doc["servers"].as_object().expect("servers").clone();
    let v4 = env.gw.mqtt_addr.expect("mqtt").to_string();
    let v5 = env.gw.mqtt5_addr.expect("mqtt5").to_string();
    assert_eq!(servers["mqtt"]["host"], v4.as_str());
    assert_eq!(servers["mqtt"]["protocol"], "mqtt");
    assert_eq!(servers["mqtt5"]["host"], v5.as_str());
    assert_eq!(servers["mqtt5"]["protocolVersion"], "5");
    // No certificate: no TLS listener, no mqtts server.
    assert!(!servers.contains_key("mqtts"), "{servers:?}");
    // The rest is the protocol crate's document.
    let mut expected = entente_protocol::asyncapi::document();
    doc["servers"] = Value::Null;
    expected["servers"] = Value::Null;
    assert_eq!(doc, expected);
    env.gw.stop().await;
}
