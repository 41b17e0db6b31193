//! Limits on what the API and the devices may put into the log, over real
//! sockets against a single gateway: shadow documents have a maximum size,
//! change events carry the change (not the whole document), and inputs that
//! could not be decoded from the log (too deep), that would change silently
//! (integers beyond 64 bits) or that name no addressable resource (`.`,
//! `..`) are refused before anything is proposed, with bounded error bodies.

use std::time::Duration;

use coordinator::node::NodeError;
use gateway::limits::{MAX_DEPTH, MAX_DOCUMENT_BYTES};
use gateway::ops::{Op, OpResult};
use gateway::{Config, Gateway};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A running single-node gateway and an operator token for it.
struct Env {
    _dir: tempfile::TempDir,
    gw: Gateway,
    base: String,
    token: String,
    http: reqwest::Client,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let any = "127.0.0.1:0".parse().expect("address");
    let mut config = Config::single(dir.path().to_path_buf(), any, any);
    config.tick = Duration::from_millis(2);
    let gw = gateway::start(config).await.expect("start");
    let file = gw.admin_token_file.clone().expect("admin token file");
    let token = std::fs::read_to_string(file)
        .expect("admin token")
        .trim()
        .to_string();
    Env {
        base: format!("http://{}", gw.http_addr),
        _dir: dir,
        gw,
        token,
        http: reqwest::Client::new(),
    }
}

/// A response: status, `Entente-Index` (if any), body as JSON (or null) and text.
#[derive(Debug)]
struct Res {
    status: StatusCode,
    content_type: String,
    body: Value,
    text: String,
}

impl Res {
    /// Asserts a problem+json answer with `status`; returns its detail.
    fn problem(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.content_type, "application/problem+json", "{self:?}");
        assert_eq!(self.body["status"], status.as_u16(), "{self:?}");
        self.body["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("no detail in {self:?}"))
            .to_string()
    }
}

impl Env {
    /// Sends `body` (raw JSON text, so numbers arrive exactly as written).
    async fn send(&self, method: Method, path: &str, body: Option<String>) -> Res {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let res = req.send().await.expect("request");
        let status = res.status();
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = res.text().await.expect("body");
        Res {
            status,
            content_type,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    async fn register(&self, id: &str) -> Res {
        self.send(
            Method::POST,
            "/v1/devices",
            Some(json!({ "id": id }).to_string()),
        )
        .await
    }

    async fn patch_desired(&self, device: &str, desired: &str) -> Res {
        self.send(
            Method::PATCH,
            &format!("/v1/devices/{device}/shadow"),
            Some(format!("{{\"desired\":{desired}}}")),
        )
        .await
    }

    async fn shadow(&self, device: &str) -> Value {
        let r = self
            .send(Method::GET, &format!("/v1/devices/{device}/shadow"), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        r.body
    }

    /// The stored events from index 1 on (as the event stream replays them).
    async fn events(&self) -> Vec<gateway::ops::Event> {
        self.gw.db().events_since(0, 100_000).await.expect("events")
    }
}

/// `{"k":{"k":…{"k":1}…}}` with `levels` objects.
fn nested(levels: usize) -> String {
    format!("{}1{}", "{\"k\":".repeat(levels), "}".repeat(levels))
}

/// Finding: 40 patches of 60 KB built a 4.8 MB desired document, every
/// change event copied the whole document, and devices were sent megabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_documents_are_capped_and_events_carry_only_the_change() {
    let e = env().await;
    assert_eq!(e.register("big").await.status, StatusCode::CREATED);
    let chunk = "x".repeat(30 * 1024);

    // Two 30 KiB keys fit; a third would take the document past the cap.
    for key in ["a", "b"] {
        let r = e
            .patch_desired("big", &json!({ key: chunk }).to_string())
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let over = e
        .patch_desired("big", &json!({ "c": chunk }).to_string())
        .await;
    let detail = over.problem(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        detail.contains(&MAX_DOCUMENT_BYTES.to_string()),
        "the limit is named: {detail}"
    );
    let sh = e.shadow("big").await;
    assert_eq!(sh["version"], 2, "the refused patch changed nothing");
    assert!(sh["desired"].get("c").is_none());
    // Replacing a key with a value of the same size still fits; removing
    // one makes room again.
    let r = e
        .patch_desired("big", &json!({ "a": chunk }).to_string())
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = e
        .patch_desired("big", &json!({ "a": null, "c": chunk }).to_string())
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // A small change to a large document: the event carries the patch and
    // the version, not the document.
    let r = e.patch_desired("big", r#"{"mode":"eco"}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let events = e.events().await;
    let last = events.last().expect("an event");
    assert_eq!(last.kind, "shadow.desired");
    assert_eq!(
        last.data,
        json!({"device": "big", "version": 5, "patch": {"mode": "eco"}})
    );
    let total: usize = events.iter().map(|ev| ev.data.to_string().len()).sum();
    assert!(
        total < 5 * 32 * 1024,
        "events hold each change once, not the document each time ({total} bytes)"
    );

    // Reported state (from the device, through the state machine): a patch
    // that would take the document past the cap is refused on apply, and
    // nothing changes.
    let report = |patch: Value| Op::ReportState {
        device: "big".into(),
        patch,
    };
    for key in ["r1", "r2"] {
        let (_, r) = gateway::propose(e.gw.node(), report(json!({ key: chunk })))
            .await
            .expect("propose");
        assert!(matches!(r, OpResult::Shadow(_)), "{r:?}");
    }
    let (_, r) = gateway::propose(e.gw.node(), report(json!({ "r3": chunk })))
        .await
        .expect("propose");
    assert!(matches!(r, OpResult::TooLarge(_)), "{r:?}");
    let sh = e.shadow("big").await;
    assert!(sh["reported"].get("r3").is_none());
    let last = e.events().await.pop().expect("an event");
    assert_eq!(last.kind, "shadow.reported");
    assert_eq!(last.data["patch"], json!({ "r2": chunk }));
    e.gw.stop().await;
}

/// Finding: a desired patch 126 levels deep was accepted and committed an
/// entry that then failed to decode; integers above u64 silently became
/// floats; ids `.` and `..` were accepted; invalid ids were echoed in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_the_log_cannot_carry_are_refused_before_proposing() {
    let e = env().await;
    assert_eq!(e.register("lamp").await.status, StatusCode::CREATED);
    let applied = e.gw.db().applied_index();

    // Too deep: refused with 422 naming the limit, nothing proposed.
    for levels in [MAX_DEPTH + 1, 126] {
        let r = e.patch_desired("lamp", &nested(levels)).await;
        let detail = r.problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(detail.contains(&MAX_DEPTH.to_string()), "{detail}");
    }
    let deep_params = format!("{{\"name\":\"x\",\"params\":{}}}", nested(126));
    e.send(Method::POST, "/v1/devices/lamp/commands", Some(deep_params))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    let deep_attrs = format!("{{\"id\":\"deep\",\"attributes\":{}}}", nested(126));
    e.send(Method::POST, "/v1/devices", Some(deep_attrs))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    let deep_update = format!("{{\"attributes\":{}}}", nested(126));
    e.send(Method::PATCH, "/v1/devices/lamp", Some(deep_update))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);

    // Integers beyond 64 bits would silently become floats: refused, naming
    // where they are.
    let r = e
        .patch_desired(
            "lamp",
            r#"{"ok":1,"big":{"list":[0,18446744073709551616]}}"#,
        )
        .await;
    let detail = r.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("/desired/big/list/1"), "{detail}");
    e.patch_desired("lamp", r#"{"low":-9223372036854775809}"#)
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    // Dot segments: not ids.
    for id in [".", ".."] {
        e.register(id)
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY);
    }
    // Whatever proposes (the MQTT side too) cannot put a value into the log
    // that would not decode: it is refused before it is proposed.
    let deep: Value = serde_json::from_str(&nested(100)).expect("json");
    for op in [
        Op::ReportState {
            device: "lamp".into(),
            patch: deep.clone(),
        },
        Op::CommandResult {
            cid: "c-1".into(),
            succeeded: true,
            output: deep,
        },
    ] {
        let r = gateway::propose(e.gw.node(), op).await;
        assert!(matches!(r, Err(NodeError::Refused(_))), "{r:?}");
    }
    assert_eq!(
        e.gw.db().applied_index(),
        applied,
        "nothing was proposed for any of the refused requests"
    );

    // At the limits: accepted, and read back exactly.
    let r = e
        .patch_desired(
            "lamp",
            &format!(
                r#"{{"deep":{},"max":18446744073709551615,"min":-9223372036854775808,"f":1.5e19}}"#,
                nested(MAX_DEPTH - 1)
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let sh = e.shadow("lamp").await;
    assert_eq!(sh["desired"]["max"].as_u64(), Some(u64::MAX));
    assert_eq!(sh["desired"]["min"].as_i64(), Some(i64::MIN));
    assert_eq!(sh["desired"]["f"].as_f64(), Some(1.5e19));
    // Beyond the range every number of a document keeps to (the one a
    // JSON Schema can state for all numbers): refused.
    e.patch_desired("lamp", r#"{"f":1e300}"#)
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    // Every committed entry decoded: no apply answered "does not decode".
    assert_eq!(e.register("after").await.status, StatusCode::CREATED);

    // Invalid ids are not echoed in full.
    let long = "é".repeat(5_000);
    for path in [
        format!("/v1/devices/{long}"),
        format!("/v1/devices/{long}/shadow"),
        format!("/v1/commands/{long}"),
        format!("/v1/devices?after={long}"),
        format!("/v1/devices?label={long}"),
    ] {
        let r = e.send(Method::GET, &path, None).await;
        r.problem(StatusCode::BAD_REQUEST);
        assert!(r.text.len() < 600, "{path}: {} bytes", r.text.len());
    }
    let r = e
        .send(
            Method::POST,
            "/v1/devices",
            Some(json!({ "id": "x".repeat(10_000) }).to_string()),
        )
        .await;
    r.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text.len() < 600, "{} bytes", r.text.len());
    let r = e
        .send(
            Method::POST,
            "/v1/devices",
            Some(json!({ "id": "ok", "labels": { "k".repeat(10_000): "v" } }).to_string()),
        )
        .await;
    r.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text.len() < 600, "{} bytes", r.text.len());
    let r = e
        .send(
            Method::POST,
            "/v1/devices",
            Some(json!({ "id": "ok", "y".repeat(10_000): 1 }).to_string()),
        )
        .await;
    r.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text.len() < 600, "{} bytes", r.text.len());
    e.gw.stop().await;
}
