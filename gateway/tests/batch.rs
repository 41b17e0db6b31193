//! `POST /v1/devices/batch`, end to end: a real gateway (`gateway::start`
//! with port-0 listeners and a temp dir), reqwest over real sockets, and
//! rumqttc devices logging in with the secrets a batch returned.

mod common;

use common::{SseStream, connect_v4};
use reqwest::StatusCode;
use serde_json::{Value, json};

type Env = common::Single;

impl Env {
    /// Sends a request with the admin token; the status and the body (JSON,
    /// or `null`).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn batch(&self, devices: Vec<Value>) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::POST,
            "/v1/devices/batch",
            Some(json!({ "devices": devices })),
        )
        .await
    }

    /// The ids of every registered device (a linearizable read).
    async fn ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/devices?limit=1000&after={a}"),
                None => "/v1/devices?limit=1000".to_string(),
            };
            let (status, page) = self.call(reqwest::Method::GET, &path, None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            for d in page["items"].as_array().expect("items") {
                ids.push(d["id"].as_str().expect("id").to_string());
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return ids,
            }
        }
    }
}

/// `n` devices `<prefix>0000`…, each with a label and ~200 bytes of
/// attributes (so 1,000 of them are well over the 64 KiB that every other
/// route takes).
fn fleet(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "id": format!("{prefix}{i:04}"),
                "labels": {"site": if i % 2 == 0 { "north" } else { "south" }},
                "attributes": {"model": "X2", "serial": i, "note": "n".repeat(180)},
            })
        })
        .collect()
}

/// Asserts a problem+json body with `status`; returns it.
fn problem(status: StatusCode, got: (StatusCode, Value)) -> Value {
    let (s, body) = got;
    assert_eq!(s, status, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["detail"].is_string(), "{body}");
    body
}

/// Sends `head` and then `body` on a connection of its own and reads the
/// answer until the gateway closes it: the status and the body as JSON.
async fn raw_request(addr: std::net::SocketAddr, head: &[u8], body: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head).await.expect("head");
    s.write_all(body).await.expect("body");
    let mut out = Vec::new();
    tokio::time::timeout(common::WAIT, s.read_to_end(&mut out))
        .await
        .expect("the answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A minimal xorshift generator: the sampled devices are the same every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// 1,000 devices in one request are one log entry (the applied index moves
/// by one; one `devices.registered` event at that index names them all),
/// each answered with its secret in request order — and devices log in
/// over MQTT with them, one of them on a gateway that had refused it (and
/// cached the refusal) just before the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_register_in_one_entry_and_log_in_with_their_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = common::single(dir.path(), |_| {}).await;
    let mqtt = e.gw.mqtt_addr.expect("mqtt listener");
    let devices = fleet("pump-", 1000);
    let body = json!({ "devices": devices }).to_string();
    assert!(body.len() > 64 * 1024, "{} bytes", body.len());

    // A device not registered yet is refused, and the refusal cached.
    let mut early = connect_v4(mqtt, "pump-0003", "pump-0003", "no secret yet");
    early.expect_closed().await;

    // Nothing else happens on this idle gateway: after a linearizable read,
    // the applied index is where the next entry follows.
    let (status, _) = e.call(reqwest::Method::GET, "/v1/devices", None).await;
    assert_eq!(status, StatusCode::OK);
    let before = e.gw.db().applied_index();
    let events = e
        .http
        .get(format!("{}/v1/events?after={before}", e.base))
        .bearer_auth(&e.token)
        .send()
        .await
        .expect("events");
    let mut events = SseStream {
        body: Box::pin(events.bytes_stream()),
        buf: String::new(),
    };

    let (status, answer) = e.batch(devices).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let index = answer["index"].as_u64().expect("index");
    assert_eq!(index, before + 1, "one entry for the whole batch");
    assert_eq!(e.gw.db().applied_index(), index);
    let answered = answer["devices"].as_array().expect("devices");
    assert_eq!(answered.len(), 1000);
    for (i, d) in answered.iter().enumerate() {
        assert_eq!(d["id"], format!("pump-{i:04}"), "request order");
        assert_eq!(d["secret"].as_str().map(str::len), Some(64), "{d}");
    }
    let (id, kind, data) = events.next().await;
    assert_eq!((id, kind.as_str()), (index, "devices.registered"));
    let ids = data["devices"].as_array().expect("ids");
    assert_eq!(ids.len(), 1000);
    assert_eq!(ids[999], "pump-0999");

    // All there, as POST /v1/devices would have registered them.
    let all = e.ids().await;
    assert_eq!(all.len(), 1000);
    let (status, d) = e
        .call(reqwest::Method::GET, "/v1/devices/pump-0421", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(d["labels"]["site"], "south");
    assert_eq!(d["attributes"]["serial"], 421);
    assert_eq!(d["created_at"], d["updated_at"]);
    let (status, page) = e
        .call(
            reqwest::Method::GET,
            "/v1/devices?label=site=north&limit=1000",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(500));

    // A sample logs in with the secrets returned (the first, the last, the
    // one refused before, and a few chosen by a seeded generator); a wrong
    // secret does not.
    let mut rng = Rng(0x5eed_ba7c);
    let mut sample = vec![0, 999, 3];
    sample.extend((0..5).map(|_| rng.below(1000)));
    for i in sample {
        let id = format!("pump-{i:04}");
        let secret = answered[i]["secret"].as_str().expect("secret");
        let mut device = connect_v4(mqtt, &id, &id, secret);
        device.expect_connack().await;
        device.disconnect().await;
    }
    let secret_of_1 = answered[1]["secret"].as_str().expect("secret");
    let mut wrong = connect_v4(mqtt, "pump-0002", "pump-0002", secret_of_1);
    wrong.expect_closed().await;
    e.gw.stop().await;
}

/// One invalid device refuses the whole batch before anything is proposed,
/// naming its position and field; so do an empty batch, one of 1,001, and
/// an unknown field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_device_refuses_the_whole_batch_naming_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = common::single(dir.path(), |_| {}).await;
    let before = e.gw.db().applied_index();
    let with = |i: usize, bad: Value| {
        let mut devices = fleet("v-", 20);
        devices[i] = bad;
        devices
    };
    for (devices, pointer, status) in [
        (
            with(17, json!({"id": "bad id"})),
            "/devices/17/id",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            with(3, json!({"id": "v-x", "labels": {"bad key!": "v"}})),
            "/devices/3/labels",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            with(5, json!({"id": "v-x", "attributes": [1, 2]})),
            "/devices/5/attributes",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            with(
                19,
                json!({"id": "v-x", "attributes": {"blob": "x".repeat(70_000)}}),
            ),
            "/devices/19/attributes",
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            with(0, json!({"id": "v-x", "cert_sha256": "not hex"})),
            "/devices/0/cert_sha256",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            with(8, json!({"id": "v-x", "auth": "certificate"})),
            "/devices/8/auth",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (vec![], "/devices", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let p = problem(status, e.batch(devices).await);
        assert_eq!(p["pointer"], pointer, "{p}");
        let detail = p["detail"].as_str().expect("detail");
        assert!(detail.starts_with(&format!("{pointer}: ")), "{p}");
    }
    // Too many devices, or a field no device has: refused as the body is read.
    let p = problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        e.batch((0..1001).map(|i| json!({"id": format!("m{i}")})).collect())
            .await,
    );
    assert!(
        p["detail"].as_str().unwrap().contains("at most 1000"),
        "{p}"
    );
    let p = problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        e.batch(with(12, json!({"id": "v-x", "colour": "red"})))
            .await,
    );
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("devices[12]") && detail.contains("colour"),
        "{p}"
    );
    // Nothing was registered, nothing proposed.
    assert!(e.ids().await.is_empty());
    assert_eq!(e.gw.db().applied_index(), before);
    e.gw.stop().await;
}

/// An id already registered, or a certificate fingerprint another device
/// has, refuses the whole batch with 409 naming them, and registers none
/// of the others. Two devices of one batch with the same id or fingerprint
/// are refused alike, before anything is proposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_refuses_the_whole_batch_with_409_and_registers_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = common::single(dir.path(), |_| {}).await;
    let cert = "ab".repeat(32);
    for body in [
        json!({"id": "c-0004"}),
        json!({"id": "cam", "cert_sha256": cert}),
    ] {
        let (status, r) = e
            .call(reqwest::Method::POST, "/v1/devices", Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{r}");
    }
    // Taken in the registry: found when the entry is applied.
    let mut devices = fleet("c-", 10);
    devices[7] = json!({"id": "c-new", "cert_sha256": cert.to_uppercase()});
    let p = problem(StatusCode::CONFLICT, e.batch(devices).await);
    assert_eq!(p["conflicting_ids"], json!(["c-0004", "c-new"]), "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("2 of the 10 devices"), "{p}");
    assert!(detail.contains("already registered"), "{p}");
    assert!(detail.contains("device cam's"), "{p}");
    assert_eq!(e.ids().await, ["c-0004", "cam"], "none of the others");

    // Twice in the batch: refused before proposing.
    let before = e.gw.db().applied_index();
    let mut devices = fleet("d-", 10);
    devices[6] = json!({"id": "d-0002"});
    let p = problem(StatusCode::CONFLICT, e.batch(devices).await);
    assert_eq!(p["pointer"], "/devices/6/id", "{p}");
    assert_eq!(p["conflicting_ids"], json!(["d-0002"]), "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("/devices/2"),
        "names the first: {p}"
    );
    let fingerprint = "cd".repeat(32);
    let colons: Vec<String> = (0..32).map(|_| "CD".to_string()).collect();
    let mut devices = fleet("d-", 10);
    devices[1] = json!({"id": "d-a", "cert_sha256": fingerprint});
    devices[9] = json!({"id": "d-b", "cert_sha256": colons.join(":")});
    let p = problem(StatusCode::CONFLICT, e.batch(devices).await);
    assert_eq!(p["pointer"], "/devices/9/cert_sha256", "{p}");
    assert_eq!(e.gw.db().applied_index(), before, "nothing proposed");
    assert_eq!(e.ids().await.len(), 2);
    e.gw.stop().await;
}

/// The batch route takes bodies up to its own limit (4 MiB by default;
/// every other route 64 KiB); a larger one is 413 naming the limit, by its
/// declared length or as it is read. A batch whose log entry would pass
/// 8 MiB is 413 too, naming that limit, and nothing is proposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_batches_are_refused_with_413_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = common::single(dir.path(), |_| {}).await;
    let limit = 4 * 1024 * 1024;
    // A declared length over the limit: refused before the body is sent.
    let head = format!(
        "POST /v1/devices/batch HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        e.token,
        limit + 1
    );
    let (status, p) = raw_request(e.gw.http_addr, head.as_bytes(), &[]).await;
    assert_eq!(status, 413, "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("4194304 bytes"),
        "{p}"
    );
    // Without a declared length (chunked): refused as it is read, at the
    // byte past the limit (the last one sent, so the gateway has read all
    // of it when it answers).
    let head = format!(
        "POST /v1/devices/batch HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        e.token
    );
    let chunk = 64 * 1024;
    let mut body = Vec::new();
    for _ in 0..limit / chunk {
        body.extend_from_slice(format!("{chunk:x}\r\n").as_bytes());
        body.extend(std::iter::repeat_n(b' ', chunk));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"1\r\n ");
    let (status, p) = raw_request(e.gw.http_addr, head.as_bytes(), &body).await;
    assert_eq!(status, 413, "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("4194304 bytes"),
        "{p}"
    );
    assert!(e.ids().await.is_empty());
    e.gw.stop().await;

    // A gateway that takes larger bodies still proposes no entry over 8 MiB.
    let dir = tempfile::tempdir().expect("tempdir");
    let e = common::single(dir.path(), |c| c.batch_max_body_bytes = 32 * 1024 * 1024).await;
    let before = e.gw.db().applied_index();
    let big: Vec<Value> = (0..200)
        .map(|i| json!({"id": format!("o-{i}"), "attributes": {"blob": "x".repeat(45_000)}}))
        .collect();
    let p = problem(StatusCode::PAYLOAD_TOO_LARGE, e.batch(big).await);
    assert!(
        p["detail"].as_str().unwrap().contains("8388608 bytes"),
        "{p}"
    );
    assert_eq!(e.gw.db().applied_index(), before, "nothing proposed");
    // Under it, the same gateway registers them.
    let fits: Vec<Value> = (0..100)
        .map(|i| json!({"id": format!("o-{i}"), "attributes": {"blob": "x".repeat(45_000)}}))
        .collect();
    let (status, r) = e.batch(fits).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(e.ids().await.len(), 100);
    e.gw.stop().await;
}

/// `/v1/devices/batch` is also the path of a device whose id is `batch`
/// (an id the API has always allowed): GET, PATCH and DELETE still reach
/// it, and its sub-resources too, while POST registers batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_named_batch_is_still_read_updated_and_deleted() {
    use reqwest::Method;
    let dir = tempfile::tempdir().expect("tempdir");
    let e = common::single(dir.path(), |_| {}).await;
    let (status, r) = e
        .call(Method::POST, "/v1/devices", Some(json!({"id": "batch"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let (status, d) = e.call(Method::GET, "/v1/devices/batch", None).await;
    assert_eq!((status, &d["id"]), (StatusCode::OK, &json!("batch")), "{d}");
    let (status, d) = e
        .call(
            Method::PATCH,
            "/v1/devices/batch",
            Some(json!({"labels": {"k": "v"}})),
        )
        .await;
    assert_eq!((status, &d["labels"]), (StatusCode::OK, &json!({"k": "v"})));
    let (status, s) = e.call(Method::GET, "/v1/devices/batch/shadow", None).await;
    assert_eq!((status, &s["device"]), (StatusCode::OK, &json!("batch")));
    let (status, r) = e.batch(vec![json!({"id": "other"})]).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let (status, _) = e.call(Method::DELETE, "/v1/devices/batch", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = e.call(Method::GET, "/v1/devices/batch", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The roles of `/v1/devices/{id}`: a viewer reads, does not write.
    let viewer = gateway::random_token().expect("token");
    let (_, r) = gateway::propose(
        e.gw.node(),
        gateway::ops::Op::CreateToken {
            token_hash: gateway::hash_secret(&viewer),
            role: gateway::ops::Role::Viewer,
            name: "viewer".into(),
            id: None,
            expires_at: None,
        },
    )
    .await
    .expect("token");
    assert!(matches!(r, gateway::ops::OpResult::Token(_)), "{r:?}");
    let as_viewer = |m: Method| {
        e.http
            .request(m, format!("{}/v1/devices/batch", e.base))
            .bearer_auth(&viewer)
    };
    let r = as_viewer(Method::GET).send().await.expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "deleted, and readable");
    let r = as_viewer(Method::DELETE).send().await.expect("delete");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = as_viewer(Method::POST)
        .json(&json!({"devices": [{"id": "x"}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    e.gw.stop().await;
}
