//! Limits on what the API and the devices may put into the log, over real
//! sockets against a single gateway: shadow documents have a maximum size,
//! and change events carry the change (not the whole document).

use std::time::Duration;

use gateway::limits::MAX_DOCUMENT_BYTES;
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
