//! The OpenAPI document describes the event stream: every event a real
//! gateway sends on `GET /v1/events` (REST changes and an MQTT device's
//! session, commands and reports) has a kind the document lists and data
//! that validates against the schema it gives for that kind.

mod common;

#[path = "support/ports.rs"]
mod ports;

use std::collections::BTreeMap;

use common::{SseStream, WAIT, connect_v4};
use entente_protocol::CommandMessage;
use gateway::Config;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Resolves a local `$ref`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("a local reference");
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling reference {r}"));
            resolve(doc, target)
        }
        None => schema,
    }
}

fn type_matches(ty: &str, v: &Value) -> bool {
    match ty {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

/// Validates `v` against `schema` (the subset of JSON Schema the document
/// uses: `$ref`, `oneOf`/`anyOf`/`allOf`, `type`, `enum`, `required`,
/// `properties`, `additionalProperties`, `items`, `minimum`); returns the
/// violations, each with its JSON pointer.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Vec<String> {
    let schema = resolve(doc, schema);
    let mut errors = Vec::new();
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            errors.extend(validate(doc, s, v, at));
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let matching = alts
                .iter()
                .filter(|s| validate(doc, s, v, at).is_empty())
                .count();
            if matching == 0 || (key == "oneOf" && matching > 1) {
                errors.push(format!("{at}: {matching} alternatives of {key} match {v}"));
            }
        }
    }
    match schema.get("type") {
        Some(Value::String(t)) if !type_matches(t, v) => {
            errors.push(format!("{at}: {v} is not of type {t}"));
            return errors;
        }
        Some(Value::Array(ts)) if !ts.iter().any(|t| type_matches(t.as_str().unwrap_or(""), v)) => {
            errors.push(format!("{at}: {v} is not of any type {ts:?}"));
            return errors;
        }
        _ => {}
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        errors.push(format!("{at}: {v} is not one of {e:?}"));
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64())
        && n < min
    {
        errors.push(format!("{at}: {n} is below the minimum {min}"));
    }
    if let Value::Object(m) = v {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !m.contains_key(r) {
                errors.push(format!("{at}: required property {r} is missing"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, val) in m {
            let here = format!("{at}/{k}");
            match (
                props.and_then(|p| p.get(k)),
                schema.get("additionalProperties"),
            ) {
                (Some(s), _) => errors.extend(validate(doc, s, val, &here)),
                (None, Some(Value::Bool(false))) => {
                    errors.push(format!("{at}: property {k} is not documented"));
                }
                (None, Some(s @ Value::Object(_))) => {
                    errors.extend(validate(doc, s, val, &here));
                }
                _ => {}
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (v, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            errors.extend(validate(doc, s, item, &format!("{at}/{i}")));
        }
    }
    errors
}

/// Every event kind the stream sends that the tests below make happen.
const SEEN: &[&str] = &[
    "token",
    "device.registered",
    "devices.registered",
    "device.updated",
    "shadow.desired",
    "command.issued",
    "device.presence",
    "command.sent",
    "command.accepted",
    "command.result",
    "shadow.reported",
    "command.canceled",
    "device.secret_rotated",
    "device.deleted",
    "token.rotated",
    "token.revoked",
    "job.created",
    "job.started",
    "job.launched",
    "job.completed",
    "job.canceled",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_sent_is_described_by_the_openapi_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = ports::reserve_ports(1)[0];
    let config = Config::single(
        dir.path().join("g1"),
        "127.0.0.1:0".parse().expect("addr"),
        raft,
    );
    let gw = gateway::start(config).await.expect("start");
    let token = std::fs::read_to_string(gw.admin_token_file.clone().expect("admin token"))
        .expect("token")
        .trim()
        .to_string();
    let base = format!("http://{}", gw.http_addr);
    let http = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.expect("request");
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert!(status.is_success(), "{status} {body}");
            body
        }
    };

    // The document: the stream's 200 and the schema of each kind's data.
    let doc: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let ok = &doc["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
        ["schema"];
    let stream = resolve(&doc, ok);
    let mut kinds: BTreeMap<String, Value> = BTreeMap::new();
    for variant in stream["oneOf"].as_array().expect("one schema per kind") {
        let variant = resolve(&doc, variant);
        let kind = variant["properties"]["event"]["enum"][0]
            .as_str()
            .expect("the kind")
            .to_string();
        assert!(
            variant["required"].as_array().is_some_and(|r| r.len() == 3),
            "{variant}"
        );
        // Each field is a string, as SSE sends it; `data` is JSON, whose
        // schema is its `contentSchema`.
        assert_eq!(variant["properties"]["id"]["type"], "string", "{variant}");
        let data = &variant["properties"]["data"];
        assert_eq!(data["contentMediaType"], "application/json", "{variant}");
        kinds.insert(kind, data["contentSchema"].clone());
    }
    for k in SEEN {
        assert!(kinds.contains_key(*k), "the document lacks event kind {k}");
    }

    let r = http
        .get(format!("{base}/v1/events?after=0"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("events");
    assert_eq!(r.status(), 200);
    let mut events = SseStream {
        body: Box::pin(r.bytes_stream()),
        buf: String::new(),
    };

    // Changes of every kind a single gateway makes.
    use reqwest::Method;
    let created = send(
        Method::POST,
        "/v1/devices",
        Some(json!({"id": "pump-1", "labels": {"site": "a"}})),
    )
    .await;
    let secret = created["secret"].as_str().expect("secret").to_string();
    send(
        Method::POST,
        "/v1/devices/batch",
        Some(json!({"devices": [{"id": "pump-2"}, {"id": "pump-3", "labels": {"site": "b"}}]})),
    )
    .await;
    send(
        Method::PATCH,
        "/v1/devices/pump-1",
        Some(json!({"attributes": {"model": "x1"}})),
    )
    .await;
    send(
        Method::PATCH,
        "/v1/devices/pump-1/shadow",
        Some(json!({"desired": {"speed": 3, "mode": null}})),
    )
    .await;
    let mut device = connect_v4(
        gw.mqtt_addr.expect("mqtt listener"),
        "pump-1",
        "pump-1",
        &secret,
    );
    device.expect_connack().await;
    device
        .subscribed(&entente_protocol::commands_topic("pump-1"))
        .await;
    send(
        Method::POST,
        "/v1/devices/pump-1/commands",
        Some(json!({"name": "reboot", "params": {"delay_s": 1}})),
    )
    .await;
    let msg: CommandMessage = serde_json::from_slice(
        &device
            .message(&entente_protocol::commands_topic("pump-1"))
            .await,
    )
    .expect("command");
    // One step at a time: a device's later report can overtake an earlier
    // one, and a command that moved on ignores the older step (no event).
    let mut seen: Vec<(u64, String, Value)> = Vec::new();
    until(&mut events, &mut seen, &["command.sent", "device.presence"]).await;
    device
        .publish(
            &entente_protocol::accepted_topic("pump-1", &msg.id),
            b"{}".to_vec(),
        )
        .await;
    until(&mut events, &mut seen, &["command.accepted"]).await;
    device
        .publish(
            &entente_protocol::result_topic("pump-1", &msg.id),
            serde_json::to_vec(&json!({"status": "succeeded", "output": {"took_ms": 5}}))
                .expect("json"),
        )
        .await;
    device
        .publish(
            &entente_protocol::reported_topic("pump-1"),
            serde_json::to_vec(&json!({"speed": 3})).expect("json"),
        )
        .await;
    until(
        &mut events,
        &mut seen,
        &["command.result", "shadow.reported"],
    )
    .await;
    let c2 = send(
        Method::POST,
        "/v1/devices/pump-1/commands",
        Some(json!({"name": "calibrate"})),
    )
    .await;
    let c2 = c2["id"].as_str().expect("id").to_string();
    send(Method::POST, &format!("/v1/commands/{c2}/cancel"), None).await;
    send(Method::POST, "/v1/devices/pump-1/secret", None).await;
    send(Method::DELETE, "/v1/devices/pump-1", None).await;
    let made = send(
        Method::POST,
        "/v1/tokens",
        Some(json!({"name": "ops", "role": "operator", "expires_in": 60})),
    )
    .await;
    let made = made["id"].as_str().expect("token id").to_string();
    send(Method::POST, &format!("/v1/tokens/{made}/rotate"), None).await;
    send(Method::DELETE, &format!("/v1/tokens/{made}"), None).await;
    // A job that runs (its one command canceled, so it completes) and one
    // canceled before its start.
    let job = send(
        Method::POST,
        "/v1/jobs",
        Some(json!({"command": {"name": "update"}, "target": {"devices": ["pump-2"]}})),
    )
    .await;
    let job = job["id"].as_str().expect("job id").to_string();
    let deadline = Instant::now() + WAIT;
    let cid = loop {
        let page = send(Method::GET, &format!("/v1/jobs/{job}/executions"), None).await;
        if let Some(cid) = page["items"][0]["command"].as_str() {
            break cid.to_string();
        }
        assert!(Instant::now() < deadline, "the job never launched: {page}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    send(Method::POST, &format!("/v1/commands/{cid}/cancel"), None).await;
    let later = send(
        Method::POST,
        "/v1/jobs",
        Some(
            json!({"command": {"name": "update"}, "target": {"labels": {"site": "b"}},
            "start_at": 32503680000000u64}),
        ),
    )
    .await;
    let later = later["id"].as_str().expect("job id").to_string();
    send(Method::POST, &format!("/v1/jobs/{later}/cancel"), None).await;
    until(&mut events, &mut seen, SEEN).await;

    // Every event says who made the change: the admin token through REST,
    // the device for what it sent, the gateway for presence.
    let by = |kind: &str| -> Vec<Value> {
        seen.iter()
            .filter(|(_, k, _)| k == kind)
            .map(|(_, _, d)| d["by"].clone())
            .collect()
    };
    for (_, kind, data) in &seen {
        assert!(data.get("by").is_some(), "{kind} without by: {data}");
    }
    for kind in [
        "device.registered",
        "command.issued",
        "token.revoked",
        "device.deleted",
    ] {
        assert!(
            by(kind).iter().all(|b| b == "token:bootstrap"),
            "{kind}: {:?}",
            by(kind)
        );
    }
    for kind in ["shadow.reported", "command.result", "command.accepted"] {
        assert!(
            by(kind).iter().all(|b| b == "device:pump-1"),
            "{kind}: {:?}",
            by(kind)
        );
    }
    assert!(by("device.presence").iter().all(|b| b == "gateway:1"));
    assert!(
        by("token").iter().all(|b| b.is_string()),
        "{:?}",
        by("token")
    );

    // The check itself bites: data of the wrong shape fails it, and so
    // does data without `by`.
    assert!(!validate(&doc, &kinds["device.deleted"], &json!({"id": "pump-1"}), "").is_empty());
    assert!(!validate(&doc, &kinds["device.registered"], &json!({"id": 7}), "").is_empty());
    assert!(!validate(&doc, &kinds["shadow.desired"], &json!({"device": "d"}), "").is_empty());
    let mut problems = Vec::new();
    for (id, kind, data) in &seen {
        match kinds.get(kind) {
            None => problems.push(format!("event {id}: kind {kind} is not documented")),
            Some(schema) => {
                for e in validate(&doc, schema, data, "") {
                    problems.push(format!("event {id} ({kind}): {e}; data {data}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    drop(device);
    gw.stop().await;
}

/// Reads events into `seen` until each of `kinds` was among them (bounded).
async fn until(events: &mut SseStream, seen: &mut Vec<(u64, String, Value)>, kinds: &[&str]) {
    let deadline = Instant::now() + WAIT;
    while !kinds
        .iter()
        .all(|k| seen.iter().any(|(_, kind, _)| kind == k))
    {
        assert!(Instant::now() < deadline, "events seen: {seen:?}");
        seen.push(events.next().await);
    }
}
