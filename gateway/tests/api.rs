//! The REST API against a real single-node gateway (Raft node, WAL, SQLite),
//! driven through `gateway::api::app` with `tower::ServiceExt::oneshot`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use gateway::api::{AppState, app, routes};
use gateway::config::Config;
use gateway::ops::{Op, OpResult, Role};
use gateway::{Gateway, hash_secret};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tower::ServiceExt;

/// A running single-node gateway and an API router over it.
struct Env {
    dir: tempfile::TempDir,
    gw: Gateway,
    config: Config,
    app: Router,
    admin: String,
    operator: String,
    viewer: String,
    shutdown: watch::Sender<bool>,
}

fn config(dir: &std::path::Path) -> Config {
    let any = "127.0.0.1:0".parse().expect("address");
    let mut c = Config::single(dir.to_path_buf(), any, any);
    c.tick = Duration::from_millis(2);
    c.max_wait = Duration::from_secs(10);
    c.consensus = common::engine_under_test();
    c
}

/// Every test of this file again on every other engine a gateway runs,
/// but the one that adds a member and transfers leadership (Raft only; on
/// the others those answer 409, which `cluster.rs` checks).
#[test]
fn every_test_passes_on_every_engine() {
    common::rerun_on_every_other_engine(
        None,
        &[
            "every_test_passes_on_every_engine",
            "requests_are_judged_as_the_openapi_document_says",
        ],
        16,
    );
}

/// An API router over `gw` with settings `config` and its own shutdown switch.
fn router(gw: &Gateway, config: &Config) -> (Router, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(false);
    let state = AppState {
        node: gw.node().clone(),
        db: gw.db().clone(),
        config: Arc::new(config.clone()),
        shutdown: rx,
        mqtt: Default::default(),
    };
    (app(state), tx)
}

async fn create_token(gw: &Gateway, role: Role) -> String {
    let token = gateway::random_token().expect("token");
    let (_, r) = gateway::propose(
        gw.node(),
        Op::CreateToken {
            token_hash: hash_secret(&token),
            role,
            name: format!("test {}", role.as_str()),
            id: None,
            expires_at: None,
        },
    )
    .await
    .expect("create token");
    assert!(
        matches!(r, OpResult::Token(ref t) if t.role == role),
        "{r:?}"
    );
    token
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let gw = gateway::start(config.clone()).await.expect("start");
    let file = gw.admin_token_file.clone().expect("admin token file");
    let admin = std::fs::read_to_string(file)
        .expect("admin token")
        .trim()
        .to_string();
    let operator = create_token(&gw, Role::Operator).await;
    let viewer = create_token(&gw, Role::Viewer).await;
    let (app, shutdown) = router(&gw, &config);
    Env {
        dir,
        gw,
        config,
        app,
        admin,
        operator,
        viewer,
        shutdown,
    }
}

/// A response, its body parsed as JSON when it is JSON.
#[derive(Debug)]
struct Res {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    text: String,
}

impl Res {
    fn index(&self) -> u64 {
        self.headers
            .get("entente-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Entente-Index on {self:?}"))
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts this is a problem+json error with `status`; returns its detail.
    fn problem(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.content_type(), "application/problem+json", "{self:?}");
        assert_eq!(self.body["status"], status.as_u16(), "{self:?}");
        assert!(
            self.body["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("urn:entente:problem:")),
            "{self:?}"
        );
        assert!(self.body["title"].is_string(), "{self:?}");
        self.body["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("no detail in {self:?}"))
            .to_string()
    }
}

/// A request builder over one router.
struct Call<'a> {
    app: &'a Router,
    req: axum::http::request::Builder,
    body: Body,
}

fn call<'a>(app: &'a Router, method: Method, path: &str) -> Call<'a> {
    Call {
        app,
        req: Request::builder().method(method).uri(path),
        body: Body::empty(),
    }
}

impl<'a> Call<'a> {
    fn token(mut self, t: &str) -> Self {
        self.req = self
            .req
            .header(header::AUTHORIZATION, format!("Bearer {t}"));
        self
    }
    fn header(mut self, k: &str, v: &str) -> Self {
        self.req = self.req.header(k, v);
        self
    }
    fn json(mut self, v: Value) -> Self {
        self.req = self.req.header(header::CONTENT_TYPE, "application/json");
        self.body = Body::from(v.to_string());
        self
    }
    fn raw(mut self, content_type: Option<&str>, body: impl Into<Bytes>) -> Self {
        if let Some(ct) = content_type {
            self.req = self.req.header(header::CONTENT_TYPE, ct);
        }
        self.body = Body::from(body.into());
        self
    }
    async fn response(self) -> axum::response::Response {
        let req = self.req.body(self.body).expect("request");
        self.app.clone().oneshot(req).await.expect("infallible")
    }
    async fn send(self) -> Res {
        let res = self.response().await;
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 16 << 20)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Res {
            status,
            headers,
            body,
            text,
        }
    }
}

impl Env {
    fn get(&self, path: &str) -> Call<'_> {
        call(&self.app, Method::GET, path).token(&self.viewer)
    }
    fn op(&self, method: Method, path: &str) -> Call<'_> {
        call(&self.app, method, path).token(&self.operator)
    }
    async fn register(&self, id: &str, labels: Value) -> Res {
        let r = self
            .op(Method::POST, "/v1/devices")
            .json(json!({"id": id, "labels": labels}))
            .send()
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        r
    }
    async fn issue(&self, device: &str, body: Value) -> Res {
        self.op(Method::POST, &format!("/v1/devices/{device}/commands"))
            .json(body)
            .send()
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_lifecycle_with_indexes() {
    let e = env().await;
    let created = e
        .op(Method::POST, "/v1/devices")
        .json(json!({"id":"pump-7","labels":{"site":"north"},"attributes":{"model":"X2"}}))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let secret = created.body["secret"].as_str().expect("secret");
    assert_eq!(secret.len(), 64);
    assert_eq!(created.body["device"]["id"], "pump-7");
    assert_eq!(created.body["device"]["labels"]["site"], "north");
    assert_eq!(created.body["device"]["attributes"]["model"], "X2");
    assert_eq!(created.body["device"]["online"], false);
    let i1 = created.index();
    assert!(i1 > 0);
    // Only the hash is stored.
    assert_eq!(
        e.gw.db().device_secret_hash("pump-7").await.expect("db"),
        Some(hash_secret(secret))
    );

    let got = e.get("/v1/devices/pump-7").send().await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, created.body["device"]);
    assert!(got.body.get("secret").is_none());
    assert!(got.index() >= i1);

    let dup = e.register_raw("pump-7").await;
    assert!(dup.problem(StatusCode::CONFLICT).contains("pump-7"));

    let patched = e
        .op(Method::PATCH, "/v1/devices/pump-7")
        .json(json!({"labels":{"site":"south","tier":"1"}}))
        .send()
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{patched:?}");
    assert_eq!(patched.body["labels"], json!({"site":"south","tier":"1"}));
    assert_eq!(patched.body["attributes"], json!({"model":"X2"}));
    assert!(patched.index() > i1);
    let empty = e
        .op(Method::PATCH, "/v1/devices/pump-7")
        .json(json!({}))
        .send()
        .await;
    empty.problem(StatusCode::UNPROCESSABLE_ENTITY);

    let rotated = e.op(Method::POST, "/v1/devices/pump-7/secret").send().await;
    assert_eq!(rotated.status, StatusCode::OK, "{rotated:?}");
    let new_secret = rotated.body["secret"].as_str().expect("secret");
    assert_ne!(new_secret, secret);
    assert_eq!(
        e.gw.db().device_secret_hash("pump-7").await.expect("db"),
        Some(hash_secret(new_secret))
    );
    assert!(rotated.index() > patched.index());

    let deleted = e.op(Method::DELETE, "/v1/devices/pump-7").send().await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");
    assert!(deleted.index() > rotated.index());
    let gone = e.get("/v1/devices/pump-7").send().await;
    assert!(gone.problem(StatusCode::NOT_FOUND).contains("pump-7"));
    let again = e.op(Method::DELETE, "/v1/devices/pump-7").send().await;
    again.problem(StatusCode::NOT_FOUND);
    let rotate_gone = e.op(Method::POST, "/v1/devices/pump-7/secret").send().await;
    rotate_gone.problem(StatusCode::NOT_FOUND);
    let patch_gone = e
        .op(Method::PATCH, "/v1/devices/pump-7")
        .json(json!({"attributes":{}}))
        .send()
        .await;
    patch_gone.problem(StatusCode::NOT_FOUND);
    e.gw.stop().await;
}

impl Env {
    async fn register_raw(&self, id: &str) -> Res {
        self.op(Method::POST, "/v1/devices")
            .json(json!({ "id": id }))
            .send()
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_and_pages() {
    let e = env().await;
    for (id, site) in [
        ("d1", "north"),
        ("d2", "south"),
        ("d3", "north"),
        ("d4", "north"),
        ("d5", "south"),
    ] {
        e.register(id, json!({ "site": site })).await;
    }
    let ids = |r: &Res| -> Vec<String> {
        r.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|d| d["id"].as_str().expect("id").to_string())
            .collect()
    };
    let all = e.get("/v1/devices").send().await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(ids(&all), ["d1", "d2", "d3", "d4", "d5"]);
    assert!(all.body["next"].is_null());

    let north = e.get("/v1/devices?label=site=north").send().await;
    assert_eq!(ids(&north), ["d1", "d3", "d4"]);
    let offline = e
        .get("/v1/devices?online=false&label=site=south")
        .send()
        .await;
    assert_eq!(ids(&offline), ["d2", "d5"]);
    let online = e.get("/v1/devices?online=true").send().await;
    assert!(ids(&online).is_empty());

    // Walk pages of two.
    let mut seen = Vec::new();
    let mut path = "/v1/devices?limit=2".to_string();
    let mut pages = 0;
    loop {
        let page = e.get(&path).send().await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        assert!(ids(&page).len() <= 2);
        seen.extend(ids(&page));
        pages += 1;
        match page.body["next"].as_str() {
            Some(next) => path = format!("/v1/devices?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ["d1", "d2", "d3", "d4", "d5"]);
    assert_eq!(pages, 3);

    e.get("/v1/devices?limit=0")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);
    let too_big = e.get("/v1/devices?limit=1001").send().await;
    assert!(too_big.problem(StatusCode::BAD_REQUEST).contains("1000"));
    e.get("/v1/devices?label=site")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);
    e.get("/v1/devices?online=maybe")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);
    let typo = e.get("/v1/devices?limt=2").send().await;
    assert!(typo.problem(StatusCode::BAD_REQUEST).contains("limt"));
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_problem() {
    let e = env().await;
    let devices = || e.op(Method::POST, "/v1/devices");

    let malformed = devices()
        .raw(Some("application/json"), "{\"id\": ")
        .send()
        .await;
    malformed.problem(StatusCode::BAD_REQUEST);
    let wrong_type = devices().json(json!({"id": 7})).send().await;
    assert!(
        wrong_type
            .problem(StatusCode::UNPROCESSABLE_ENTITY)
            .contains("id")
    );
    let labels_type = devices()
        .json(json!({"id":"a","labels":{"k":1}}))
        .send()
        .await;
    labels_type.problem(StatusCode::UNPROCESSABLE_ENTITY);
    let unknown = devices()
        .json(json!({"id":"a","colour":"red"}))
        .send()
        .await;
    assert!(
        unknown
            .problem(StatusCode::UNPROCESSABLE_ENTITY)
            .contains("colour")
    );
    let no_type = devices()
        .raw(None, json!({"id":"a"}).to_string())
        .send()
        .await;
    no_type.problem(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let text = devices()
        .raw(Some("text/plain"), json!({"id":"a"}).to_string())
        .send()
        .await;
    text.problem(StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Oversize, declared (Content-Length) and streamed (no length).
    let big =
        json!({"id":"big","attributes":{"blob":"x".repeat(e.config.max_body_bytes)}}).to_string();
    let declared = devices()
        .header("content-length", &big.len().to_string())
        .raw(Some("application/json"), big.clone())
        .send()
        .await;
    declared.problem(StatusCode::PAYLOAD_TOO_LARGE);
    let streamed = devices()
        .raw(Some("application/json"), big.clone())
        .send()
        .await;
    streamed.problem(StatusCode::PAYLOAD_TOO_LARGE);

    let bad_id = devices().json(json!({"id":"no spaces"})).send().await;
    assert!(
        bad_id
            .problem(StatusCode::UNPROCESSABLE_ENTITY)
            .contains("A-Z")
    );
    let long_id = devices().json(json!({ "id": "x".repeat(65) })).send().await;
    long_id.problem(StatusCode::UNPROCESSABLE_ENTITY);
    let attrs = devices()
        .json(json!({"id":"a","attributes":[1,2]}))
        .send()
        .await;
    assert!(
        attrs
            .problem(StatusCode::UNPROCESSABLE_ENTITY)
            .contains("attributes")
    );
    let label_key = devices()
        .json(json!({"id":"a","labels":{"bad key":"v"}}))
        .send()
        .await;
    label_key.problem(StatusCode::UNPROCESSABLE_ENTITY);
    let label_value = devices()
        .json(json!({"id":"a","labels":{"k":"v".repeat(300)}}))
        .send()
        .await;
    label_value.problem(StatusCode::UNPROCESSABLE_ENTITY);

    // Invalid ids in paths; unknown routes and methods.
    e.get("/v1/devices/bad%20id")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);
    e.get("/v1/commands/bad%21id")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);
    e.get("/v1/nothing-here")
        .send()
        .await
        .problem(StatusCode::NOT_FOUND);
    let method = e.op(Method::PUT, "/v1/devices").send().await;
    method.problem(StatusCode::METHOD_NOT_ALLOWED);
    assert!(method.headers.contains_key(header::ALLOW));

    // Nothing of the above was registered.
    let list = e.get("/v1/devices").send().await;
    assert_eq!(list.body["items"], json!([]));
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles() {
    let e = env().await;
    let none = call(&e.app, Method::GET, "/v1/devices").send().await;
    none.problem(StatusCode::UNAUTHORIZED);
    assert!(
        none.headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    let basic = call(&e.app, Method::GET, "/v1/devices")
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await;
    basic.problem(StatusCode::UNAUTHORIZED);
    let empty = call(&e.app, Method::GET, "/v1/devices")
        .header("authorization", "Bearer ")
        .send()
        .await;
    empty.problem(StatusCode::UNAUTHORIZED);
    let unknown = call(&e.app, Method::GET, "/v1/devices")
        .token("not-a-real-token")
        .send()
        .await;
    unknown.problem(StatusCode::UNAUTHORIZED);
    assert!(
        unknown
            .headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("invalid_token"))
    );

    // A viewer reads but does not write.
    let viewer_write = call(&e.app, Method::POST, "/v1/devices")
        .token(&e.viewer)
        .json(json!({"id":"v1"}))
        .send()
        .await;
    assert!(
        viewer_write
            .problem(StatusCode::FORBIDDEN)
            .contains("operator")
    );
    assert_eq!(
        e.get("/v1/devices").send().await.status,
        StatusCode::OK,
        "viewer reads"
    );
    // Scheme names are case-insensitive.
    let lower = call(&e.app, Method::GET, "/v1/devices")
        .header("authorization", &format!("bearer {}", e.viewer))
        .send()
        .await;
    assert_eq!(lower.status, StatusCode::OK);
    // Operators and admins write.
    e.register("by-operator", json!({})).await;
    let by_admin = call(&e.app, Method::POST, "/v1/devices")
        .token(&e.admin)
        .json(json!({"id":"by-admin"}))
        .send()
        .await;
    assert_eq!(by_admin.status, StatusCode::CREATED);

    // Every protected route refuses a missing token and a role below its
    // own, before doing anything; public routes need none.
    for r in routes() {
        let path = r
            .path
            .replace("{id}", "by-operator")
            .replace("{cid}", "c-none");
        let method = Method::from_bytes(r.method.as_bytes()).expect("method");
        let anon = call(&e.app, method.clone(), &path).send().await;
        match r.role {
            Some(role) => {
                anon.problem(StatusCode::UNAUTHORIZED);
                let below = match role {
                    Role::Admin => Some(&e.operator),
                    Role::Operator => Some(&e.viewer),
                    Role::Viewer => None,
                };
                if let Some(t) = below {
                    let res = call(&e.app, method, &path).token(t).send().await;
                    res.problem(StatusCode::FORBIDDEN);
                }
            }
            None => assert_eq!(anon.status, StatusCode::OK, "{} {}", r.method, r.path),
        }
    }
    // ...and the forbidden writes changed nothing.
    let still = e.get("/v1/devices/by-operator").send().await;
    assert_eq!(still.status, StatusCode::OK);
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_versions_and_preconditions() {
    let e = env().await;
    e.register("lamp", json!({})).await;
    let s0 = e.get("/v1/devices/lamp/shadow").send().await;
    assert_eq!(s0.status, StatusCode::OK, "{s0:?}");
    let v0 = s0.body["version"].as_u64().expect("version");
    assert_eq!(
        s0.headers.get(header::ETAG).and_then(|v| v.to_str().ok()),
        Some(format!("\"{v0}\"").as_str())
    );

    let patch = |if_match: Option<String>, body: Value| {
        let mut c = e.op(Method::PATCH, "/v1/devices/lamp/shadow");
        if let Some(m) = if_match {
            c = c.header("if-match", &m);
        }
        c.json(body).send()
    };
    let s1 = patch(
        Some(v0.to_string()),
        json!({"desired":{"on":true,"level":3}}),
    )
    .await;
    assert_eq!(s1.status, StatusCode::OK, "{s1:?}");
    let v1 = s1.body["version"].as_u64().expect("version");
    assert_eq!(v1, v0 + 1);
    assert_eq!(s1.body["desired"], json!({"on":true,"level":3}));
    assert_eq!(s1.body["delta"], json!({"on":true,"level":3}));
    let w1 = s1.index();

    // A stale version: 412, nothing changes.
    let stale = patch(Some(v0.to_string()), json!({"desired":{"on":false}})).await;
    let detail = stale.problem(StatusCode::PRECONDITION_FAILED);
    assert!(detail.contains(&v1.to_string()), "{detail}");
    assert_eq!(stale.body["current_version"], v1);
    // The quoted (ETag) form, and merge semantics (null removes).
    let s2 = patch(Some(format!("\"{v1}\"")), json!({"desired":{"level":null}})).await;
    assert_eq!(s2.status, StatusCode::OK, "{s2:?}");
    assert_eq!(s2.body["desired"], json!({"on":true}));
    assert!(s2.index() > w1);
    // No If-Match: unconditional.
    let s3 = patch(None, json!({"desired":{"mode":"eco"}})).await;
    assert_eq!(s3.status, StatusCode::OK);
    assert_eq!(s3.body["version"], v1 + 2);

    patch(Some("W/\"1\"".into()), json!({"desired":{}}))
        .await
        .problem(StatusCode::BAD_REQUEST);
    patch(None, json!({"desired":[1]}))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    patch(None, json!({"reported":{}}))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    let now = e.get("/v1/devices/lamp/shadow").send().await;
    assert_eq!(now.body["desired"], json!({"on":true,"mode":"eco"}));

    let missing = e
        .op(Method::PATCH, "/v1/devices/ghost/shadow")
        .json(json!({"desired":{}}))
        .send()
        .await;
    missing.problem(StatusCode::NOT_FOUND);
    e.get("/v1/devices/ghost/shadow")
        .send()
        .await
        .problem(StatusCode::NOT_FOUND);
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_idempotency_listing_and_cancel() {
    let e = env().await;
    e.register("pump", json!({})).await;
    let first = e
        .issue(
            "pump",
            json!({"name":"reboot","params":{"delay_s":5},"idempotency_key":"k1"}),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let cid = first.body["id"].as_str().expect("id").to_string();
    assert_eq!(first.body["status"], "queued");
    assert_eq!(first.body["params"], json!({"delay_s":5}));
    let ttl = first.body["expires_at"].as_u64().expect("expires")
        - first.body["issued_at"].as_u64().expect("issued");
    assert_eq!(ttl, 60_000);
    let i1 = first.index();

    let repeat = e
        .issue("pump", json!({"name":"reboot","idempotency_key":"k1"}))
        .await;
    assert_eq!(repeat.status, StatusCode::OK, "{repeat:?}");
    assert_eq!(repeat.body["id"], cid.as_str());
    assert!(repeat.index() > i1);

    let second = e.issue("pump", json!({"name":"blink","ttl_ms":1000})).await;
    assert_eq!(second.status, StatusCode::CREATED);
    let cid2 = second.body["id"].as_str().expect("id").to_string();
    assert_ne!(cid2, cid);
    assert_eq!(second.body["params"], json!({}));

    let list = e.get("/v1/devices/pump/commands").send().await;
    assert_eq!(list.status, StatusCode::OK, "{list:?}");
    let ids: Vec<&str> = list.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [cid.as_str(), cid2.as_str()], "ids sort by issue time");
    let paged = e.get("/v1/devices/pump/commands?limit=1").send().await;
    assert_eq!(paged.body["next"], cid.as_str());

    let canceled = e
        .op(Method::POST, &format!("/v1/commands/{cid}/cancel"))
        .send()
        .await;
    assert_eq!(canceled.status, StatusCode::OK, "{canceled:?}");
    assert_eq!(canceled.body["status"], "canceled");
    let again = e
        .op(Method::POST, &format!("/v1/commands/{cid}/cancel"))
        .send()
        .await;
    assert_eq!(again.status, StatusCode::OK, "canceling twice is fine");
    assert_eq!(again.body["status"], "canceled");

    let q = e
        .get("/v1/devices/pump/commands?status=queued")
        .send()
        .await;
    assert_eq!(q.body["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(q.body["items"][0]["id"], cid2.as_str());
    let c = e
        .get("/v1/devices/pump/commands?status=canceled")
        .send()
        .await;
    assert_eq!(c.body["items"][0]["id"], cid.as_str());
    e.get("/v1/devices/pump/commands?status=bogus")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);

    let got = e.get(&format!("/v1/commands/{cid2}")).send().await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["name"], "blink");

    // Errors.
    e.get("/v1/commands/c-unknown")
        .send()
        .await
        .problem(StatusCode::NOT_FOUND);
    e.op(Method::POST, "/v1/commands/c-unknown/cancel")
        .send()
        .await
        .problem(StatusCode::NOT_FOUND);
    e.issue("ghost", json!({"name":"x"}))
        .await
        .problem(StatusCode::NOT_FOUND);
    e.get("/v1/devices/ghost/commands")
        .send()
        .await
        .problem(StatusCode::NOT_FOUND);
    e.issue("pump", json!({"name":"x","ttl_ms":0}))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    e.issue("pump", json!({"name":"x","ttl_ms":8u64 * 24 * 3600 * 1000}))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    e.issue("pump", json!({"name":""}))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    e.issue("pump", json!({"params":{}}))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    let too_long = e
        .op(Method::POST, "/v1/devices/pump/commands?wait=10001")
        .json(json!({"name":"x"}))
        .send()
        .await;
    assert!(too_long.problem(StatusCode::BAD_REQUEST).contains("10000"));
    // Terminal commands cannot be canceled... but a finished one is a conflict.
    let (_, r) = gateway::propose(
        e.gw.node(),
        Op::CommandResult {
            cid: cid2.clone(),
            succeeded: true,
            output: json!({"ok":true}),
        },
    )
    .await
    .expect("result");
    assert!(matches!(r, OpResult::Command { .. }), "{r:?}");
    let late = e
        .op(Method::POST, &format!("/v1/commands/{cid2}/cancel"))
        .send()
        .await;
    assert!(late.problem(StatusCode::CONFLICT).contains("succeeded"));
    e.gw.stop().await;
}

/// `GET /v1/commands`: every device's commands by id, filtered by status,
/// device, job and issue time, paged like the other lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_wide_command_list_filters_and_pages() {
    let e = env().await;
    e.register("pump", json!({})).await;
    e.register("valve", json!({})).await;
    let mut issued = Vec::new();
    for (device, name) in [("pump", "reboot"), ("pump", "blink"), ("valve", "open")] {
        let r = e.issue(device, json!({"name": name})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        issued.push(r.body.clone());
    }
    let id = |i: usize| issued[i]["id"].as_str().expect("id").to_string();
    let list = |query: &str| {
        let path = format!("/v1/commands{query}");
        let e = &e;
        async move {
            let r = e.get(&path).send().await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {r:?}");
            let ids: Vec<String> = r.body["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|c| c["id"].as_str().expect("id").to_string())
                .collect();
            (ids, r.body["next"].clone())
        }
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let (all, next) = list("").await;
    assert_eq!(
        all,
        sorted(vec![id(0), id(1), id(2)]),
        "every device's, by id"
    );
    assert_eq!(next, Value::Null);
    // Pages of one, each `next` the last id of its page.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let (ids, next) = list(&format!("?limit=1{after}")).await;
        paged.extend(ids.clone());
        match next.as_str() {
            Some(n) => {
                assert_eq!(ids, [n.to_string()]);
                after = format!("&after={n}");
            }
            None => break,
        }
    }
    assert_eq!(paged, all);
    // Filters, alone and together.
    assert_eq!(list("?device=pump").await.0, sorted(vec![id(0), id(1)]));
    let canceled = e
        .op(Method::POST, &format!("/v1/commands/{}/cancel", id(1)))
        .send()
        .await;
    assert_eq!(canceled.status, StatusCode::OK, "{canceled:?}");
    assert_eq!(list("?status=canceled").await.0, [id(1)]);
    assert_eq!(list("?status=queued&device=pump").await.0, [id(0)]);
    assert!(list("?status=queued&device=ghost").await.0.is_empty());
    let last_issue = issued
        .iter()
        .map(|c| c["issued_at"].as_u64().expect("issued_at"))
        .max()
        .expect("issued");
    let valve_issued = issued[2]["issued_at"].as_u64().expect("issued_at");
    let (recent, _) = list(&format!("?created_after={}", valve_issued - 1)).await;
    assert!(recent.contains(&id(2)), "{recent:?}");
    for c in &issued {
        let at = c["issued_at"].as_u64().expect("issued_at");
        assert_eq!(
            recent.contains(&c["id"].as_str().expect("id").to_string()),
            at >= valve_issued
        );
    }
    assert!(
        list(&format!("?created_after={last_issue}"))
            .await
            .0
            .is_empty()
    );

    // A job's commands: the one it launched on its device.
    let created = e
        .op(Method::POST, "/v1/jobs")
        .json(json!({"command": {"name": "update"}, "target": {"devices": ["valve"]}}))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let job = created.body["id"].as_str().expect("id").to_string();
    e.job_until(&job, |j| j["launched"] == 1).await;
    let launched = e.executions(&job, "").await[0]["command"]
        .as_str()
        .expect("command")
        .to_string();
    assert_eq!(list(&format!("?job={job}")).await.0, vec![launched.clone()]);
    assert_eq!(
        list(&format!("?job={job}&device=pump")).await.0,
        Vec::<String>::new()
    );
    assert!(list("?job=j-none").await.0.is_empty());
    assert!(list("").await.0.contains(&launched));

    // Malformed filters are 400s naming what is wrong.
    for (query, needle) in [
        ("?status=bogus", "status"),
        ("?device=a%20b", "device id"),
        ("?job=a%20b", "job id"),
        ("?after=a%20b", "command id"),
        ("?created_after=soon", "created_after"),
        ("?limit=0", "limit"),
        ("?colour=red", "colour"),
    ] {
        let r = e.get(&format!("/v1/commands{query}")).send().await;
        let detail = r.problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains(needle), "{query}: {detail}");
    }
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_end_when_the_command_is_terminal() {
    let e = env().await;
    e.register("fan", json!({})).await;
    let cmd = e.issue("fan", json!({"name":"spin"})).await;
    let cid = cmd.body["id"].as_str().expect("id").to_string();

    // A long poll parks until the command is terminal.
    let app = e.app.clone();
    let viewer = e.viewer.clone();
    let path = format!("/v1/commands/{cid}?wait=10000");
    let mut poll =
        tokio::spawn(async move { call(&app, Method::GET, &path).token(&viewer).send().await });
    let early = tokio::time::timeout(Duration::from_millis(100), &mut poll).await;
    assert!(
        early.is_err(),
        "the long poll answered before any change: {early:?}"
    );
    let canceled = e
        .op(Method::POST, &format!("/v1/commands/{cid}/cancel"))
        .send()
        .await;
    assert_eq!(canceled.status, StatusCode::OK);
    let polled = poll.await.expect("join");
    assert_eq!(polled.status, StatusCode::OK, "{polled:?}");
    assert_eq!(polled.body["status"], "canceled");
    assert!(polled.index() >= canceled.index());

    // On a terminal command, a wait returns at once.
    let quick = tokio::time::timeout(
        Duration::from_secs(5),
        e.get(&format!("/v1/commands/{cid}?wait=10000")).send(),
    )
    .await
    .expect("no wait on a terminal command");
    assert_eq!(quick.body["status"], "canceled");

    // A wait that runs out returns the current (non-terminal) state.
    let timed = e
        .op(Method::POST, "/v1/devices/fan/commands?wait=50")
        .json(json!({"name":"spin2"}))
        .send()
        .await;
    assert_eq!(timed.status, StatusCode::CREATED, "{timed:?}");
    assert_eq!(timed.body["status"], "queued");

    // POST ?wait= returns as soon as the command finishes.
    let app = e.app.clone();
    let op = e.operator.clone();
    let mut issue = tokio::spawn(async move {
        call(&app, Method::POST, "/v1/devices/fan/commands?wait=10000")
            .token(&op)
            .json(json!({"name":"spin3","idempotency_key":"k3"}))
            .send()
            .await
    });
    // Find the command once it exists (the events say when it was issued).
    let mut events = e.gw.db().subscribe();
    let cid3 = loop {
        let found = e
            .get("/v1/devices/fan/commands?status=queued&consistency=local")
            .send()
            .await
            .body["items"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c["idempotency_key"] == "k3")
                    .and_then(|c| c["id"].as_str().map(String::from))
            });
        if let Some(c) = found {
            break c;
        }
        events.recv().await.expect("events");
    };
    let early = tokio::time::timeout(Duration::from_millis(100), &mut issue).await;
    assert!(
        early.is_err(),
        "POST ?wait answered before the command finished"
    );
    let (_, r) = gateway::propose(
        e.gw.node(),
        Op::CommandResult {
            cid: cid3.clone(),
            succeeded: false,
            output: json!({"error":"jammed"}),
        },
    )
    .await
    .expect("result");
    assert!(matches!(r, OpResult::Command { .. }));
    let issued = issue.await.expect("join");
    assert_eq!(issued.status, StatusCode::CREATED, "{issued:?}");
    assert_eq!(issued.body["id"], cid3.as_str());
    assert_eq!(issued.body["status"], "failed");
    assert_eq!(issued.body["output"], json!({"error":"jammed"}));

    // Shutdown ends a long poll at once, with the current state.
    let cmd4 = e.issue("fan", json!({"name":"spin4"})).await;
    let cid4 = cmd4.body["id"].as_str().expect("id").to_string();
    let app = e.app.clone();
    let viewer = e.viewer.clone();
    let path = format!("/v1/commands/{cid4}?wait=10000");
    let mut poll =
        tokio::spawn(async move { call(&app, Method::GET, &path).token(&viewer).send().await });
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut poll)
            .await
            .is_err()
    );
    e.shutdown.send(true).expect("shutdown");
    let ended = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long poll ends on shutdown")
        .expect("join");
    assert_eq!(ended.body["status"], "queued");
    e.gw.stop().await;
}

/// One parsed SSE event.
#[derive(Debug, PartialEq)]
struct Sse {
    id: u64,
    event: String,
    data: Value,
}

/// Reads SSE events from a streaming body.
struct SseReader {
    stream: axum::body::BodyDataStream,
    buf: String,
}

impl SseReader {
    fn new(res: axum::response::Response) -> Self {
        SseReader {
            stream: res.into_body().into_data_stream(),
            buf: String::new(),
        }
    }

    /// The next event; `None` when the stream ended.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = serde_json::from_str(v.trim()).ok();
                    }
                }
                if let (Some(id), Some(event), Some(data)) = (id, event, data) {
                    return Some(Sse { id, event, data });
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("an SSE event within 10 s")?;
            self.buf
                .push_str(&String::from_utf8_lossy(&chunk.expect("body chunk")));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resume_exactly_and_follow_live() {
    let e = env().await;
    let mut indexes = Vec::new();
    for id in ["s1", "s2", "s3"] {
        indexes.push(e.register(id, json!({})).await.index());
    }
    // Resume after the first registration: the other two replay, in order.
    let res = e
        .get("/v1/events")
        .header("last-event-id", &indexes[0].to_string())
        .response()
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
    );
    let mut sse = SseReader::new(res);
    let a = sse.next().await.expect("event");
    assert_eq!((a.id, a.event.as_str()), (indexes[1], "device.registered"));
    assert_eq!(a.data["id"], "s2");
    assert!(a.data.get("secret_hash").is_none());
    let b = sse.next().await.expect("event");
    assert_eq!((b.id, b.data["id"].as_str()), (indexes[2], Some("s3")));

    // Then live changes.
    let w = e.issue("s1", json!({"name":"ping"})).await;
    let c = sse.next().await.expect("live event");
    assert_eq!(c.id, w.index());
    assert_eq!(c.event, "command.issued");
    assert_eq!(c.data["id"], w.body["id"]);

    // ?after= does the same; Last-Event-ID wins over it.
    let mut from_after = SseReader::new(
        e.get(&format!("/v1/events?after={}", indexes[1]))
            .response()
            .await,
    );
    assert_eq!(from_after.next().await.map(|x| x.id), Some(indexes[2]));
    let mut both = SseReader::new(
        e.get("/v1/events?after=0")
            .header("last-event-id", &indexes[1].to_string())
            .response()
            .await,
    );
    assert_eq!(both.next().await.map(|x| x.id), Some(indexes[2]));
    e.get("/v1/events")
        .header("last-event-id", "abc")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);

    // Token events are for admins only.
    let mut viewer_stream = SseReader::new(e.get("/v1/events?after=0").response().await);
    let first = viewer_stream.next().await.expect("event");
    assert_ne!(first.event, "token");
    let mut admin_stream = SseReader::new(
        call(&e.app, Method::GET, "/v1/events?after=0")
            .token(&e.admin)
            .response()
            .await,
    );
    let first = admin_stream.next().await.expect("event");
    assert_eq!(first.event, "token");
    assert!(first.data.get("token_hash").is_none());

    // Shutdown ends every stream cleanly.
    e.shutdown.send(true).expect("shutdown");
    for s in [
        &mut sse,
        &mut from_after,
        &mut both,
        &mut viewer_stream,
        &mut admin_stream,
    ] {
        while s.next().await.is_some() {}
    }
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_levels_and_min_index() {
    let e = env().await;
    let w = e.register("m1", json!({})).await;
    let local = e.get("/v1/devices/m1?consistency=local").send().await;
    assert_eq!(local.status, StatusCode::OK);
    assert!(local.index() >= w.index());
    let lin = e
        .get("/v1/devices/m1?consistency=linearizable")
        .send()
        .await;
    assert_eq!(lin.status, StatusCode::OK);
    e.get("/v1/devices/m1?consistency=eventual")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);

    let min = e
        .get("/v1/devices/m1?consistency=local")
        .header("entente-min-index", &w.index().to_string())
        .send()
        .await;
    assert_eq!(min.status, StatusCode::OK);
    assert!(min.index() >= w.index());
    e.get("/v1/devices/m1")
        .header("entente-min-index", "soon")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);

    // An index the group never issues (it is idle): waited for at most the
    // write timeout, then refused by the leader as never issued (412, not a
    // 503 as if this healthy gateway could not serve the read).
    let mut short = e.config.clone();
    short.write_timeout = Duration::from_millis(100);
    let (app, _tx) = router(&e.gw, &short);
    let started = tokio::time::Instant::now();
    let future = call(&app, Method::GET, "/v1/devices/m1?consistency=local")
        .token(&e.viewer)
        .header("entente-min-index", &(w.index() + 100).to_string())
        .send()
        .await;
    let detail = future.problem(StatusCode::PRECONDITION_FAILED);
    assert!(detail.contains("Entente-Min-Index"), "{detail}");
    assert_eq!(
        future.body["type"],
        "urn:entente:problem:min-index-not-issued"
    );
    assert!(started.elapsed() >= short.write_timeout, "not waited for");
    assert!(future.index() >= w.index());
    // One far beyond the group's log was never issued: refused at once.
    let never = call(&app, Method::GET, "/v1/devices/m1?consistency=local")
        .token(&e.viewer)
        .header("entente-min-index", &(w.index() + 1_000_000).to_string())
        .send()
        .await;
    let detail = never.problem(StatusCode::PRECONDITION_FAILED);
    assert!(detail.contains("Entente-Min-Index"), "{detail}");
    assert_eq!(
        never.body["type"],
        "urn:entente:problem:min-index-not-issued"
    );
    assert!(never.index() >= w.index());

    // A read waiting for an index that a later write produces: the one
    // after the last committed (w's on Raft and Paxos; on PBFT each
    // linearizable read above took a sequence number of its own).
    let app = e.app.clone();
    let viewer = e.viewer.clone();
    let next = e.gw.node().status().raft.commit + 1;
    if common::engine_under_test() != coordinator::engine::EngineKind::Pbft {
        assert_eq!(next, w.index() + 1);
    }
    let waiting = tokio::spawn(async move {
        call(&app, Method::GET, "/v1/devices/m2?consistency=local")
            .token(&viewer)
            .header("entente-min-index", &next.to_string())
            .send()
            .await
    });
    let w2 = e.register("m2", json!({})).await;
    assert_eq!(w2.index(), next);
    let seen = waiting.await.expect("join");
    assert_eq!(seen.status, StatusCode::OK, "read-your-writes: {seen:?}");
    assert!(seen.index() >= next);
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_health_and_metrics() {
    let e = env().await;
    let cluster = e.get("/v1/cluster").send().await;
    assert_eq!(cluster.status, StatusCode::OK, "{cluster:?}");
    assert_eq!(cluster.body["node_id"], 1);
    assert_eq!(cluster.body["leader"], 1);
    assert_eq!(cluster.body["role"], "leader");
    let engine = common::engine_under_test();
    assert_eq!(cluster.body["engine"], engine.name());
    // Raft and Paxos elect in term (ballot) 1 or later; PBFT starts in
    // view 0, its primary the first member.
    let first_term = u64::from(engine != coordinator::engine::EngineKind::Pbft);
    assert!(
        cluster.body["term"].as_u64() >= Some(first_term),
        "{cluster:?}"
    );
    let commit = cluster.body["commit"].as_u64().expect("commit");
    let applied = cluster.body["applied"].as_u64().expect("applied");
    assert!(applied >= 1 && applied <= commit, "{cluster:?}");
    assert_eq!(
        cluster.body["members"],
        json!([{"id":1,"suffrage":"voter","role":"leader",
            "matched": cluster.body["members"][0]["matched"],
            "active": cluster.body["members"][0]["active"],
            "lag": 0, "commit": commit, "applied": applied,
            "term": cluster.body["term"], "reported_ms_ago": 0, "health": "ok"}])
    );
    assert_eq!(cluster.body["lag_warning"], 100);
    assert_eq!(cluster.body["unreachable_after_ms"], 3000);
    assert_eq!(cluster.body["warnings"], json!([]));

    let health = call(&e.app, Method::GET, "/healthz").send().await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["status"], "ok");
    let ready = call(&e.app, Method::GET, "/readyz").send().await;
    assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
    assert_eq!(ready.body["leader"], 1);

    e.register("met", json!({})).await;
    e.issue("met", json!({"name":"a"})).await;
    e.get("/v1/devices/absent").send().await;
    let m = e.get("/metrics").send().await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(m.content_type().starts_with("text/plain"));
    let text = &m.text;
    for needle in [
        "entente_http_requests_total{method=\"POST\",route=\"/v1/devices\",status=\"201\"} 1",
        "entente_http_requests_total{method=\"GET\",route=\"/v1/devices/{id}\",status=\"404\"} 1",
        "entente_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/devices\"} 1",
        "entente_raft_role{role=\"leader\"} 1",
        "entente_raft_role{role=\"follower\"} 0",
        "entente_raft_leader 1",
        "entente_raft_apply_lag",
        "entente_commands{status=\"queued\"} 1",
        "entente_commands{status=\"canceled\"} 0",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
    // PBFT counts the peer messages it drops, by reason (a single gateway
    // has no peers: all zero); the other engines refuse through the driver
    // and have no such family.
    let dropped = "entente_consensus_dropped_total{reason=\"bad_signature\"} 0";
    assert_eq!(
        text.contains(dropped),
        engine == coordinator::engine::EngineKind::Pbft,
        "{dropped:?} on {engine}:\n{text}"
    );
    call(&e.app, Method::GET, "/metrics")
        .send()
        .await
        .problem(StatusCode::UNAUTHORIZED);
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let e = env().await;
    let doc = call(&e.app, Method::GET, "/openapi.json").send().await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.content_type().starts_with("application/json"));
    let doc: Value = serde_json::from_str(&doc.text).expect("the document is JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            documented.insert((method.to_uppercase(), path.clone()));
            // Public operations say so; the rest inherit the bearer scheme.
            let route = routes()
                .into_iter()
                .find(|r| r.path == path && r.method.eq_ignore_ascii_case(method))
                .unwrap_or_else(|| panic!("{method} {path} is documented but not served"));
            let public = op["security"] == json!([{}]);
            assert_eq!(public, route.role.is_none(), "{method} {path} security");
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
        }
    }
    let served: BTreeSet<_> = routes()
        .into_iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, served);
    // Everything the table lists is really routed (neither 404 nor 405).
    for r in routes() {
        let path = r.path.replace("{id}", "x").replace("{cid}", "c-x");
        let method = Method::from_bytes(r.method.as_bytes()).expect("method");
        let res = call(&e.app, method, &path).send().await;
        assert!(
            res.status != StatusCode::NOT_FOUND && res.status != StatusCode::METHOD_NOT_ALLOWED,
            "{} {} is not routed: {res:?}",
            r.method,
            r.path
        );
    }
    // Request schemas refuse unknown fields, as the handlers do.
    assert_eq!(
        doc["components"]["schemas"]["NewDevice"]["additionalProperties"],
        false
    );
    e.gw.stop().await;
}

/// What Schemathesis found the server refusing though the OpenAPI document
/// allows it, or taking though the document forbids it
/// (tests/schemathesis.rs runs the whole check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_judged_as_the_openapi_document_says() {
    let e = env().await;
    let admin = |m: Method, p: &str| call(&e.app, m, p).token(&e.admin);
    e.register("dev", json!({})).await;

    // JSON Schema's `integer` includes numbers with an integral value.
    let led = admin(Method::POST, "/v1/cluster/leader")
        .json(json!({"id": 1.0}))
        .send()
        .await;
    assert_eq!(led.status, StatusCode::OK, "{led:?}");
    let added = admin(Method::POST, "/v1/cluster/members")
        .json(json!({"id": 5.0, "address": "127.0.0.1:9", "suffrage": "learner"}))
        .send()
        .await;
    assert_eq!(added.status, StatusCode::OK, "{added:?}");
    assert_eq!(added.body["id"], 5, "{added:?}");
    let issued = e.issue("dev", json!({"name": "x", "ttl_ms": 1000.0})).await;
    assert_eq!(issued.status, StatusCode::CREATED, "{issued:?}");
    for half in [json!({"id": 1.5}), json!({"id": -1})] {
        admin(Method::POST, "/v1/cluster/leader")
            .json(half)
            .send()
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY);
    }
    // Node ids start at 1 (the document's `NodeId`).
    admin(Method::POST, "/v1/cluster/leader")
        .json(json!({"id": 0}))
        .send()
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    // A well-formed request for a gateway the group does not know, without
    // its address: refused for the group's state (409), not as malformed.
    let new = admin(Method::POST, "/v1/cluster/members")
        .json(json!({"id": 6, "suffrage": "learner"}))
        .send()
        .await;
    let detail = new.problem(StatusCode::CONFLICT);
    assert!(detail.contains("address"), "{detail}");

    // Numbers in JSON documents keep to 64 bits, floating-point ones too
    // (the document's `JsonValue`).
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/devices",
            json!({"id": "big", "attributes": {"x": 1e300}}),
        ),
        (
            Method::PATCH,
            "/v1/devices/dev",
            json!({"attributes": {"x": [-1e19]}}),
        ),
        (
            Method::PATCH,
            "/v1/devices/dev/shadow",
            json!({"desired": {"x": {"y": 2e19}}}),
        ),
        (
            Method::POST,
            "/v1/devices/dev/commands",
            json!({"name": "x", "params": 1.9e19}),
        ),
    ] {
        let r = e.op(method, path).json(body).send().await;
        let detail = r.problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(detail.contains("64-bit"), "{path}: {detail}");
    }
    let r = e
        .op(Method::PATCH, "/v1/devices/dev/shadow")
        .json(json!({"desired": {"x": 1.8e19, "y": -9.2e18, "z": 0.5}}))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");

    // If-Match: up to 20 digits, plain or quoted; one beyond 64 bits is a
    // version no shadow has (412), a sign or more digits are malformed.
    let patch = |m: &'static str| {
        e.op(Method::PATCH, "/v1/devices/dev/shadow")
            .header("if-match", m)
            .json(json!({"desired": {}}))
    };
    patch("99999999999999999999")
        .send()
        .await
        .problem(StatusCode::PRECONDITION_FAILED);
    for bad in ["+1", "123456789012345678901", "\"\""] {
        patch(bad).send().await.problem(StatusCode::BAD_REQUEST);
    }
    e.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart() {
    let e = env().await;
    e.register("keep", json!({"site":"x"})).await;
    let cmd = e
        .issue("keep", json!({"name":"hold","idempotency_key":"once"}))
        .await;
    let cid = cmd.body["id"].as_str().expect("id").to_string();
    let shadow = e
        .op(Method::PATCH, "/v1/devices/keep/shadow")
        .json(json!({"desired":{"t":21}}))
        .send()
        .await;
    assert_eq!(shadow.status, StatusCode::OK);
    let last = shadow.index();
    let Env {
        dir,
        gw,
        config,
        admin,
        operator,
        viewer,
        app,
        ..
    } = e;
    drop(app);
    gw.stop().await;

    let gw = gateway::start(config.clone()).await.expect("restart");
    assert!(gw.admin_token_file.is_some());
    let (app, _tx) = router(&gw, &config);
    let get = |path: &str| call(&app, Method::GET, path).token(&viewer).send();
    let dev = get("/v1/devices/keep").await;
    assert_eq!(dev.status, StatusCode::OK, "{dev:?}");
    assert_eq!(dev.body["labels"]["site"], "x");
    assert!(dev.index() >= last);
    let sh = get("/v1/devices/keep/shadow").await;
    assert_eq!(sh.body["desired"], json!({"t":21}));
    let c = get(&format!("/v1/commands/{cid}")).await;
    assert_eq!(c.body["status"], "queued");
    // Tokens survived, and the idempotency key still holds.
    let again = call(&app, Method::POST, "/v1/devices/keep/commands")
        .token(&operator)
        .json(json!({"name":"hold","idempotency_key":"once"}))
        .send()
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["id"], cid.as_str());
    let admin_ok = call(&app, Method::GET, "/v1/cluster")
        .token(&admin)
        .send()
        .await;
    assert_eq!(admin_ok.status, StatusCode::OK);
    gw.stop().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_fails_writes_with_503_but_local_reads_answer() {
    let e = env().await;
    e.register("left", json!({})).await;
    let Env {
        gw,
        config,
        viewer,
        operator,
        dir,
        ..
    } = e;
    let (app, _tx) = router(&gw, &config);
    gw.node().shutdown().await;

    let write = call(&app, Method::POST, "/v1/devices")
        .token(&operator)
        .json(json!({"id":"late"}))
        .send()
        .await;
    let detail = write.problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(detail.contains("shutting down"), "{detail}");
    assert!(write.headers.contains_key(header::RETRY_AFTER));
    let read = call(&app, Method::GET, "/v1/devices/left")
        .token(&viewer)
        .send()
        .await;
    read.problem(StatusCode::SERVICE_UNAVAILABLE);
    let local = call(&app, Method::GET, "/v1/devices/left?consistency=local")
        .token(&viewer)
        .send()
        .await;
    assert_eq!(local.status, StatusCode::OK, "{local:?}");
    assert_eq!(local.body["id"], "left");
    gw.stop().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_falls_behind_the_broadcast_misses_nothing() {
    let e = env().await;
    let start = e.gw.db().applied_index();
    let res = e.get(&format!("/v1/events?after={start}")).response().await;
    assert_eq!(res.status(), StatusCode::OK);
    // While nobody reads the stream, commit more events than the live
    // broadcast holds, so the stream's receiver lags.
    let total = gateway::state::EVENT_CHANNEL_CAPACITY + 300;
    let mut writes = tokio::task::JoinSet::new();
    let mut issued = 0;
    while issued < total || !writes.is_empty() {
        while issued < total && writes.len() < 256 {
            let node = e.gw.node().clone();
            let id = format!("lag-{issued:05}");
            writes.spawn(async move {
                let op = Op::RegisterDevice {
                    id,
                    secret_hash: hash_secret("s"),
                    labels: Default::default(),
                    attributes: json!({}),
                    cert_sha256: None,
                };
                gateway::propose(&node, op).await.expect("write").0
            });
            issued += 1;
        }
        writes.join_next().await.expect("a write").expect("join");
    }
    let last = e.gw.db().applied_index();
    let mut expected = Vec::new();
    let mut cursor = start;
    loop {
        let batch = e.gw.db().events_since(cursor, 1000).await.expect("events");
        let Some(tail) = batch.last() else { break };
        cursor = tail.index;
        expected.extend(batch.iter().map(|ev| ev.index));
    }
    assert_eq!(expected.len(), total);
    let mut sse = SseReader::new(res);
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        got.push(sse.next().await.expect("event").id);
    }
    assert_eq!(got, expected, "every event exactly once, in order");
    e.gw.stop().await;
}

/// A device listener that stopped makes the gateway unhealthy: `/healthz`
/// and `/readyz` answer 503 `device-listener-down` (before, a dead listener
/// left both at 200 while every device was refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_device_listener_fails_health_and_readiness() {
    let e = env().await;
    let (tx, rx) = watch::channel(false);
    let mqtt: Arc<gateway::mqtt::MqttStats> = Default::default();
    let app = app(AppState {
        node: e.gw.node().clone(),
        db: e.gw.db().clone(),
        config: Arc::new(e.config.clone()),
        shutdown: rx,
        mqtt: mqtt.clone(),
    });
    assert_eq!(
        call(&app, Method::GET, "/healthz").send().await.status,
        StatusCode::OK
    );
    mqtt.listeners_down
        .store(1, std::sync::atomic::Ordering::SeqCst);
    for path in ["/healthz", "/readyz"] {
        let r = call(&app, Method::GET, path).send().await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {r:?}");
        assert!(
            r.content_type().starts_with("application/problem+json"),
            "{r:?}"
        );
        assert!(
            r.body["type"]
                .as_str()
                .unwrap_or("")
                .ends_with("device-listener-down"),
            "{r:?}"
        );
    }
    drop(tx);
    e.gw.stop().await;
}

/// Finding (issue 14): a committed entry this gateway cannot decode was
/// applied as a no-op. Now the node stops on it, naming the entry and its
/// format; nothing after it is applied, writes answer 500 (the node is
/// gone), `/readyz` says why not ready, and local reads still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_this_gateway_cannot_decode_stops_its_node() {
    let e = env().await;
    e.register("before", json!({})).await;
    let applied = e.gw.db().applied_index();
    // An entry of a format this version does not read (a version byte).
    let r = e.gw.node().propose(vec![0x07, 0, 1, 2]).await;
    let err = format!("{:?}", r.expect_err("the node cannot apply it"));
    assert!(err.contains("Fatal"), "{err}");
    let fatal = e.gw.node().status().fatal.expect("the node stopped");
    assert!(
        fatal.contains(&format!("committed entry {}", applied + 1))
            && fatal.contains("first byte 0x07"),
        "{fatal}"
    );
    assert_eq!(
        e.gw.db().applied_index(),
        applied,
        "nothing applied after it"
    );
    let write = call(&e.app, Method::POST, "/v1/devices")
        .token(&e.operator)
        .json(json!({"id":"after"}))
        .send()
        .await;
    write.problem(StatusCode::INTERNAL_SERVER_ERROR);
    let ready = call(&e.app, Method::GET, "/readyz").send().await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{ready:?}");
    let local = call(&e.app, Method::GET, "/v1/devices/before?consistency=local")
        .token(&e.viewer)
        .send()
        .await;
    assert_eq!(local.status, StatusCode::OK, "{local:?}");
}

impl Env {
    /// Polls `GET /v1/jobs/{id}` until `done` holds (at most 10 s).
    async fn job_until(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.get(&format!("/v1/jobs/{id}")).send().await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            if done(&r.body) {
                return r.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job never got there: {}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Answers a command as its device would (through the log).
    async fn answer(&self, cid: &str, succeeded: bool) {
        let op = Op::CommandResult {
            cid: cid.into(),
            succeeded,
            output: json!({"ok": succeeded}),
        };
        let (_, r) = gateway::propose(self.gw.node(), op).await.expect("result");
        assert!(matches!(r, OpResult::Command { .. }), "{r:?}");
    }

    async fn executions(&self, id: &str, query: &str) -> Vec<Value> {
        let r = self
            .get(&format!("/v1/jobs/{id}/executions{query}"))
            .send()
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        r.body["items"].as_array().expect("items").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_rolls_out_within_its_bounds_and_completes() {
    let e = env().await;
    for d in ["d0", "d1", "d2", "d3"] {
        e.register(d, json!({"site": "north"})).await;
    }
    let created = e
        .op(Method::POST, "/v1/jobs")
        .json(json!({
            "command": {"name": "update", "params": {"v": 2}},
            "target": {"devices": ["d2", "d0", "d1"]},
            "rollout": {"max_in_flight": 2},
            "timeout_ms": 60000,
        }))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("j-"), "{id}");
    assert_eq!(created.body["state"], "scheduled");
    assert_eq!(created.body["devices"], 3);
    assert_eq!(
        created.body["rollout"],
        json!({"max_per_minute": 600, "max_in_flight": 2})
    );
    created.index();
    // The leader starts it and launches two, in device order: no more.
    let job = e
        .job_until(&id, |j| j["state"] == "in_progress" && j["launched"] == 2)
        .await;
    assert_eq!(job["counts"]["queued"], 1);
    let running = e.executions(&id, "?status=in_progress").await;
    let devices: Vec<&str> = running
        .iter()
        .map(|x| x["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["d0", "d1"]);
    let cid0 = running[0]["command"].as_str().expect("command").to_string();
    let cmd = e.get(&format!("/v1/commands/{cid0}")).send().await;
    assert_eq!(cmd.body["name"], "update");
    assert_eq!(cmd.body["device"], "d0");
    // Executions page by device id.
    let page = e
        .get(&format!("/v1/jobs/{id}/executions?limit=1"))
        .send()
        .await;
    assert_eq!(page.body["next"], "d0", "{page:?}");
    e.answer(&cid0, true).await;
    let job = e.job_until(&id, |j| j["launched"] == 3).await;
    assert_eq!(job["counts"]["succeeded"], 1);
    for x in e.executions(&id, "?status=in_progress").await {
        let failed = x["device"] == "d1";
        e.answer(x["command"].as_str().unwrap(), !failed).await;
    }
    let done = e.job_until(&id, |j| j["state"] == "completed").await;
    assert_eq!(
        done["counts"],
        json!({"queued": 0, "in_progress": 0, "succeeded": 2, "failed": 1, "timed_out": 0,
            "canceled": 0})
    );
    assert!(done["finished_at"].as_u64().is_some(), "{done}");
    let failed = e.executions(&id, "?status=failed").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["device"], "d1");
    // Over: cancel is a conflict.
    let r = e
        .op(Method::POST, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await;
    assert!(
        r.problem(StatusCode::CONFLICT).contains("completed"),
        "{r:?}"
    );
    // The job's events, in order.
    let kinds: Vec<String> =
        e.gw.db()
            .events_since(0, u32::MAX)
            .await
            .expect("events")
            .into_iter()
            .filter(|ev| ev.kind.starts_with("job."))
            .map(|ev| ev.kind)
            .collect();
    // (At 600 a minute, one launches at once, then one every 100 ms:
    // how many entries launch the three depends on the timing.)
    let mut steps = kinds.clone();
    steps.dedup();
    assert_eq!(
        steps,
        [
            "job.created",
            "job.started",
            "job.launched",
            "job.completed"
        ],
        "{kinds:?}"
    );
    assert!(kinds.len() >= 5, "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_listed_canceled_and_refused_as_problems() {
    let e = env().await;
    e.register("p1", json!({"site": "north"})).await;
    let later = gateway::now_ms() + 3_600_000;
    let body = json!({
        "command": {"name": "reboot"},
        "target": {"labels": {"site": "north"}},
        "abort": {"failure_percent": 10},
        "start_at": later,
    });
    let created = e
        .op(Method::POST, "/v1/jobs")
        .json(body.clone())
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["id"].as_str().expect("id").to_string();
    assert_eq!(created.body["selector"], json!({"site": "north"}));
    assert_eq!(
        created.body["abort"],
        json!({"failure_percent": 10, "min_finished": 10})
    );
    assert_eq!(created.body["start_at"], later);
    assert_eq!(
        created.body["devices"], 0,
        "a selector is evaluated at the start"
    );
    let other = e.op(Method::POST, "/v1/jobs").json(body).send().await;
    let other = other.body["id"].as_str().expect("id").to_string();
    // Not due: stays scheduled. Cancel it, twice.
    let r = e
        .op(Method::POST, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["state"], "canceled");
    let r = e
        .op(Method::POST, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let listed = e.get("/v1/jobs?state=canceled").send().await;
    let ids: Vec<&str> = listed.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let all = e.get("/v1/jobs?limit=1").send().await;
    assert_eq!(all.body["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(all.body["next"], id.as_str());
    let rest = e.get(&format!("/v1/jobs?after={id}")).send().await;
    assert_eq!(rest.body["items"][0]["id"], other.as_str());
    assert_eq!(rest.body["items"][0]["state"], "scheduled");

    // Refusals, as problems.
    let post = |body: Value| e.op(Method::POST, "/v1/jobs").json(body).send();
    let r = post(json!({"command": {"name": "x"}, "target": {"devices": ["p1", "ghost"]}})).await;
    assert!(r.problem(StatusCode::NOT_FOUND).contains("ghost"), "{r:?}");
    for (body, says) in [
        (
            json!({"command": {"name": "x"}, "target": {"devices": ["p1", "p1"]}}),
            "twice",
        ),
        (
            json!({"command": {"name": "x"}, "target": {"devices": []}}),
            "1 to 10000",
        ),
        (
            json!({"command": {"name": "x"}, "target": {"devices": ["p1"], "labels": {"a": "b"}}}),
            "target must be",
        ),
        (
            json!({"command": {"name": "x"}, "target": {"labels": {}}}),
            "1 to 16",
        ),
        (
            json!({"command": {"name": "x"}, "target": {"devices": ["p1"]},
                "rollout": {"max_in_flight": 0}}),
            "max_in_flight",
        ),
        (
            json!({"command": {"name": "x"}, "target": {"devices": ["p1"]},
                "abort": {"failure_percent": 101}}),
            "failure_percent",
        ),
        (
            json!({"command": {"name": "x"}, "target": {"devices": ["p1"]}, "timeout_ms": 0}),
            "timeout_ms",
        ),
        (
            json!({"command": {"name": ""}, "target": {"devices": ["p1"]}}),
            "name",
        ),
        // A struct written as an array of its fields is not an object.
        (
            json!({"command": {"name": "x"}, "target": {"devices": ["p1"]},
                "rollout": [null, null]}),
            "object",
        ),
        (
            json!({"command": ["x", null], "target": {"devices": ["p1"]}}),
            "object",
        ),
    ] {
        let r = post(body.clone()).await;
        let detail = r.problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(detail.contains(says), "{body}: {detail}");
    }
    let r = call(&e.app, Method::POST, "/v1/jobs")
        .token(&e.viewer)
        .json(json!({"command": {"name": "x"}, "target": {"devices": ["p1"]}}))
        .send()
        .await;
    r.problem(StatusCode::FORBIDDEN);
    e.get("/v1/jobs/j-nope")
        .send()
        .await
        .problem(StatusCode::NOT_FOUND);
    e.get("/v1/jobs/j-nope/executions")
        .send()
        .await
        .problem(StatusCode::NOT_FOUND);
    e.op(Method::POST, "/v1/jobs/j-nope/cancel")
        .send()
        .await
        .problem(StatusCode::NOT_FOUND);
    e.get("/v1/jobs?state=done")
        .send()
        .await
        .problem(StatusCode::BAD_REQUEST);
}

/// A client that retries `POST /v1/jobs` after an unknown outcome (503
/// `write-timeout`) with the same idempotency key gets the first job, not
/// a second one running every device again: the key is checked at apply
/// time, as a command's, whether it came as the `Idempotency-Key` header
/// or as `idempotency_key` in the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_created_again_with_its_idempotency_key_is_the_first_job() {
    let e = env().await;
    e.register("p1", json!({"site": "north"})).await;
    let later = gateway::now_ms() + 3_600_000;
    let body = |name: &str| json!({"command": {"name": name}, "target": {"devices": ["p1"]}, "start_at": later});
    let post = |body: Value, key: Option<&str>| {
        let c = e.op(Method::POST, "/v1/jobs");
        let c = match key {
            Some(k) => c.header("idempotency-key", k),
            None => c,
        };
        c.json(body).send()
    };
    let first = post(body("update"), Some("rollout-7")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let id = first.body["id"].as_str().expect("id").to_string();
    assert_eq!(first.body["idempotency_key"], "rollout-7");
    // Again, by header or body field, whatever else the body says: the
    // first job, 200, nothing new.
    let again = post(body("something-else"), Some("rollout-7")).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.body["id"], id.as_str());
    assert_eq!(again.body["command"]["name"], "update");
    let mut keyed = body("update");
    keyed["idempotency_key"] = json!("rollout-7");
    let again = post(keyed.clone(), None).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.body["id"], id.as_str());
    let again = post(keyed, Some("rollout-7")).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    let all = e.get("/v1/jobs").send().await;
    assert_eq!(
        all.body["items"].as_array().map(Vec::len),
        Some(1),
        "{all:?}"
    );
    // Still the first once it is over.
    let r = e
        .op(Method::POST, &format!("/v1/jobs/{id}/cancel"))
        .send()
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let again = post(body("update"), Some("rollout-7")).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.body["state"], "canceled");
    // Another key, or none: a new job each time.
    let other = post(body("update"), Some("rollout-8")).await;
    assert_eq!(other.status, StatusCode::CREATED, "{other:?}");
    assert_ne!(other.body["id"], id.as_str());
    for _ in 0..2 {
        let r = post(body("update"), None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(r.body["idempotency_key"], Value::Null);
    }
    // The rules of a command's key; a header and a body key must agree.
    let long = "k".repeat(129);
    let mut mismatched = body("update");
    mismatched["idempotency_key"] = json!("rollout-9");
    for (r, says) in [
        (post(body("update"), Some("")).await, "idempotency_key"),
        (
            post(body("update"), Some(long.as_str())).await,
            "idempotency_key",
        ),
        (
            post(
                json!({"command": {"name": "x"}, "target": {"devices": ["p1"]},
                    "idempotency_key": long}),
                None,
            )
            .await,
            "idempotency_key",
        ),
    ] {
        let detail = r.problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(detail.contains(says), "{detail}");
    }
    // Two valid keys that differ: a conflict, not invalid input (each
    // alone is what the document allows).
    let r = post(mismatched, Some("rollout-7")).await;
    let detail = r.problem(StatusCode::CONFLICT);
    assert!(detail.contains("two different keys"), "{detail}");
    let all = e.get("/v1/jobs").send().await;
    assert_eq!(
        all.body["items"].as_array().map(Vec::len),
        Some(4),
        "{all:?}"
    );
}
