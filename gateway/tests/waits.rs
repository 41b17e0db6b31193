//! Every wait is bounded: reads with `Entente-Min-Index`, `?wait=` on
//! commands, linearizable reads and writes without a quorum, and writes
//! forwarded to a leader that died each answer within their documented bound
//! with their documented status (docs/ARCHITECTURE.md, "Bounded waits"), on
//! real sockets against real gateways.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use gateway::{Config, Gateway};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The write timeout the gateways in these tests run with: short, so the
/// bounded waits end quickly.
const WRITE_TIMEOUT: Duration = Duration::from_millis(1_000);

/// Slack on top of a bound for scheduling on a loaded machine.
const SLACK: Duration = Duration::from_millis(1_500);

struct Group {
    gws: BTreeMap<u64, Gateway>,
    token: String,
    http: reqwest::Client,
}

/// An answer: status, `Retry-After`, body, and how long it took.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    index: Option<u64>,
    body: Value,
    took: Duration,
}

impl Answer {
    /// Asserts a problem of this status and type; returns its detail.
    fn problem(&self, status: StatusCode, kind: &str) -> &str {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.body["type"],
            format!("urn:entente:problem:{kind}"),
            "{self:?}"
        );
        self.body["detail"].as_str().expect("detail")
    }

    /// Asserts a 503 problem of this type with `Retry-After`.
    fn unavailable(&self, kind: &str) {
        self.problem(StatusCode::SERVICE_UNAVAILABLE, kind);
        assert!(self.retry_after.is_some(), "no Retry-After: {self:?}");
    }
}

fn config_with(
    dir: &Path,
    id: u64,
    peers: &BTreeMap<u64, SocketAddr>,
    write_timeout: Duration,
) -> Config {
    let mut c = Config::single(
        dir.join(format!("g{id}")),
        "127.0.0.1:0".parse().expect("addr"),
        peers[&id],
    );
    c.node_id = id;
    c.peers = peers.iter().map(|(id, a)| (*id, (*a).into())).collect();
    c.cluster_secret = Some("waits-test-secret".into());
    c.tick = Duration::from_millis(5);
    c.write_timeout = write_timeout;
    c.max_wait = Duration::from_secs(10);
    c
}

/// A group of `n` gateways (ids 1..=n), started together.
async fn group(dir: &Path, n: u64) -> Group {
    group_with(dir, n, WRITE_TIMEOUT).await
}

async fn group_with(dir: &Path, n: u64, write_timeout: Duration) -> Group {
    let ids: Vec<u64> = (1..=n).collect();
    // Each gateway's peer listener is bound here first: every address is
    // known, and held, before any gateway starts.
    let listeners: Vec<std::net::TcpListener> = ids
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs = listeners.iter().map(|l| l.local_addr().expect("addr"));
    let peers: BTreeMap<u64, SocketAddr> = ids.iter().copied().zip(addrs).collect();
    let handles: Vec<_> = peers
        .keys()
        .zip(listeners)
        .map(|(&id, peer)| {
            let listeners = gateway::Listeners {
                peer: Some(peer),
                ..Default::default()
            };
            let c = config_with(dir, id, &peers, write_timeout);
            tokio::spawn(gateway::start_with(c, listeners))
        })
        .collect();
    let mut gws = BTreeMap::new();
    for (id, h) in ids.iter().zip(handles) {
        gws.insert(*id, h.await.expect("join").expect("start"));
    }
    let file = gws
        .values()
        .find_map(|g: &Gateway| g.admin_token_file.clone())
        .expect("the first leader wrote the admin token");
    let token = std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_string();
    Group {
        gws,
        token,
        http: reqwest::Client::new(),
    }
}

impl Group {
    async fn call(
        &self,
        gw: u64,
        method: reqwest::Method,
        path: &str,
        min_index: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let url = format!("http://{}{path}", self.gws[&gw].http_addr);
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(&self.token)
            // Far beyond every bound here: the server must answer first.
            .timeout(Duration::from_secs(60));
        if let Some(m) = min_index {
            req = req.header("entente-min-index", m);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let start = Instant::now();
        let r = req
            .send()
            .await
            .expect("an answer before the client gives up");
        let status = r.status();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let index = r
            .headers()
            .get("entente-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = r.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            retry_after,
            index,
            body,
            took: start.elapsed(),
        }
    }

    async fn get(&self, gw: u64, path: &str, min_index: Option<&str>) -> Answer {
        self.call(gw, reqwest::Method::GET, path, min_index, None)
            .await
    }

    async fn post(&self, gw: u64, path: &str, body: Value) -> Answer {
        self.call(gw, reqwest::Method::POST, path, None, Some(body))
            .await
    }

    fn applied(&self, gw: u64) -> u64 {
        self.gws[&gw].node().status().raft.applied
    }

    fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let known = self
                .gws
                .values()
                .filter_map(|g| g.node().status().raft.leader)
                .next();
            if let Some(l) = known {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn stop(self) {
        for (_, g) in self.gws {
            g.stop().await;
        }
    }
}

/// An `Entente-Min-Index` far beyond the group's log (a 63-bit overflow, a
/// timestamp, the largest u64) is refused at once with 412 — it used to hang
/// for the whole max wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_index_far_beyond_the_log_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = group(dir.path(), 1).await;
    let created = g.post(1, "/v1/devices", json!({"id": "pump-1"})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    for huge in [
        "9223372036854775808",
        "1733500000000",
        "18446744073709551615",
    ] {
        for path in [
            "/v1/devices",
            "/v1/devices/pump-1?consistency=local",
            "/v1/devices/pump-1/shadow",
        ] {
            let a = g.get(1, path, Some(huge)).await;
            let detail = a.problem(StatusCode::PRECONDITION_FAILED, "min-index-not-issued");
            assert!(detail.contains(huge), "{detail}");
            // At once: no waiting for an index that will not come.
            assert!(a.took < WRITE_TIMEOUT, "{path} with {huge}: {a:?}");
        }
    }
    // The same index the group did issue reads at once.
    let issued = g.applied(1).to_string();
    let a = g.get(1, "/v1/devices/pump-1", Some(&issued)).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    g.stop().await;
}

/// An index slightly ahead of an idle group is waited for at most the write
/// timeout; then the leader, which can tell that the group still has not
/// issued it, refuses it with 412 (a 503 would say this healthy gateway
/// cannot serve reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_index_slightly_ahead_is_refused_as_never_issued_after_the_write_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = group(dir.path(), 1).await;
    let ahead = (g.applied(1) + 100).to_string();
    for path in ["/v1/devices", "/v1/devices?consistency=local"] {
        let a = g.get(1, path, Some(&ahead)).await;
        let detail = a.problem(StatusCode::PRECONDITION_FAILED, "min-index-not-issued");
        assert!(detail.contains(&ahead), "{detail}");
        assert!(
            a.took >= WRITE_TIMEOUT.mul_f64(0.9),
            "answered before the wait was over: {a:?}"
        );
        assert!(a.took < WRITE_TIMEOUT + SLACK, "{path}: {a:?}");
    }
    g.stop().await;
}

/// `?wait=` on a command that never finishes (its device never connects)
/// answers when the wait is over, with the command as it is then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_on_a_command_that_never_finishes_answers_when_the_wait_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = group(dir.path(), 1).await;
    let created = g.post(1, "/v1/devices", json!({"id": "pump-2"})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let wait = Duration::from_millis(1_500);
    let path = format!("/v1/devices/pump-2/commands?wait={}", wait.as_millis());
    let a = g.post(1, &path, json!({"name": "reboot"})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    assert_eq!(a.body["status"], "queued", "{a:?}");
    assert!(a.took >= wait.mul_f64(0.9), "{a:?}");
    assert!(a.took < wait + WRITE_TIMEOUT + SLACK, "{a:?}");
    let cid = a.body["id"].as_str().expect("id").to_string();
    let a = g
        .get(1, &format!("/v1/commands/{cid}?wait=1500"), None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["status"], "queued", "{a:?}");
    assert!(a.took >= wait.mul_f64(0.9), "{a:?}");
    assert!(a.took < wait + 2 * WRITE_TIMEOUT + SLACK, "{a:?}");
    // A wait beyond the gateway's max wait is refused, not shortened.
    let a = g
        .get(1, &format!("/v1/commands/{cid}?wait=10001"), None)
        .await;
    a.problem(StatusCode::BAD_REQUEST, "bad-request");
    g.stop().await;
}

/// Three gateways; the leader and one follower stop. The survivor's reads
/// (ReadIndex during elections that cannot succeed), its writes (forwarded to
/// a leader that died, then proposed with no leader) and its reads with
/// `Entente-Min-Index` each answer within their bound with a 503 problem and
/// `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_every_request_answers_503_within_its_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = group(dir.path(), 3).await;
    let leader = g.leader();
    let created = g.post(leader, "/v1/devices", json!({"id": "pump-3"})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let survivor = (1..=3).find(|&id| id != leader).expect("a follower");
    // Read-your-writes across gateways: the index of a write on the leader
    // is never refused by a follower, and the read reflects the write.
    let written = g
        .call(
            leader,
            reqwest::Method::PATCH,
            "/v1/devices/pump-3/shadow",
            None,
            Some(json!({"desired": {"speed": 2}})),
        )
        .await;
    assert_eq!(written.status, StatusCode::OK, "{written:?}");
    let at = written.index.expect("Entente-Index");
    let a = g
        .get(
            survivor,
            "/v1/devices/pump-3/shadow?consistency=local",
            Some(&at.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["desired"]["speed"], 2, "{a:?}");
    assert!(a.index.is_some_and(|i| i >= at), "{a:?}");
    // The survivor applied the write: it knows the leader that is to die.
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.gws[&survivor].node().status().raft.leader != Some(leader) {
        assert!(Instant::now() < deadline, "the survivor never followed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gone: Vec<u64> = (1..=3).filter(|&id| id != survivor).collect();
    for id in &gone {
        g.gws.remove(id).expect("gateway").stop().await;
    }

    // A write the survivor forwards to the dead leader (or, once it noticed,
    // cannot place at all).
    let a = g
        .post(survivor, "/v1/devices", json!({"id": "pump-4"}))
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
    assert!(a.retry_after.is_some(), "{a:?}");
    assert!(a.took < 2 * WRITE_TIMEOUT + SLACK, "{a:?}");

    // Linearizable reads: no read point without a quorum.
    for _ in 0..2 {
        let a = g.get(survivor, "/v1/devices/pump-3", None).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
        assert!(a.retry_after.is_some(), "{a:?}");
        assert!(a.took < 2 * WRITE_TIMEOUT + SLACK, "{a:?}");
    }
    // A local read still answers, at once.
    let a = g
        .get(survivor, "/v1/devices/pump-3?consistency=local", None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");

    // Min-Index slightly ahead: waited for at most the write timeout.
    let ahead = (g.applied(survivor) + 1).to_string();
    let a = g
        .get(survivor, "/v1/devices?consistency=local", Some(&ahead))
        .await;
    a.unavailable("min-index-not-reached");
    assert!(a.took < WRITE_TIMEOUT + SLACK, "{a:?}");
    // Far ahead: the group cannot be asked where its log ends.
    let a = g
        .get(
            survivor,
            "/v1/devices?consistency=local",
            Some("9223372036854775808"),
        )
        .await;
    a.unavailable("min-index-unknown");
    assert!(a.took < 2 * WRITE_TIMEOUT + SLACK, "{a:?}");
    let a = g
        .get(survivor, "/v1/devices", Some("9223372036854775808"))
        .await;
    a.unavailable("min-index-unknown");
    assert!(a.took < 2 * WRITE_TIMEOUT + SLACK, "{a:?}");
    g.stop().await;
}

/// A gateway cut off from its quorum answers writes and linearizable reads
/// with 503 within about two election timeouts (`Config::leader_wait`), not
/// after the write timeout: with a write timeout of 60 s here, each answer
/// must come well before it (it took the whole 60 s when a request that
/// found no leader waited the write timeout for one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_a_quorum_says_so_long_before_the_write_timeout() {
    const LONG: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = group_with(dir.path(), 3, LONG).await;
    let leader = g.leader();
    let created = g.post(leader, "/v1/devices", json!({"id": "pump-5"})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let survivor = (1..=3).find(|&id| id != leader).expect("a follower");
    let gone: Vec<u64> = (1..=3).filter(|&id| id != survivor).collect();
    for id in &gone {
        g.gws.remove(id).expect("gateway").stop().await;
    }
    // The first write may be forwarded to the leader that is gone (an
    // unknown outcome once the survivor notices); the later ones find no
    // leader at all. Each answers 503 with Retry-After, long before 60 s
    // (the bound leaves room for a loaded machine).
    let bound = LONG / 4;
    for n in 0..3 {
        let a = g
            .post(
                survivor,
                "/v1/devices",
                json!({"id": format!("pump-{}", 6 + n)}),
            )
            .await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
        assert!(a.retry_after.is_some(), "{a:?}");
        assert!(a.took < bound, "write {n} took {:?}: {a:?}", a.took);
        let a = g.get(survivor, "/v1/devices/pump-5", None).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
        assert!(a.took < bound, "read {n} took {:?}: {a:?}", a.took);
    }
    g.stop().await;
}
