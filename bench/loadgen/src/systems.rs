//! The two systems under test, as seen over HTTP: how a write, a read and a
//! status request look for etcd (its JSON gateway, `/v3/...`) and for an
//! Entente group (its REST API). Everything the load loops send goes
//! through [`Sys::send`], so both systems get the same client code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Which system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// etcd through its JSON gateway.
    Etcd,
    /// An Entente gateway group through its REST API.
    Entente,
}

impl Target {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Etcd => "etcd",
            Target::Entente => "entente",
        }
    }
}

/// What one request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// A ~100-byte JSON write: etcd `PUT`, Entente desired-state `PATCH`.
    Write,
    /// A linearizable read: etcd range (default consistency), Entente `GET`
    /// (default consistency, ReadIndex).
    ReadLinearizable,
    /// A local read: etcd serializable range, Entente `?consistency=local`.
    ReadLocal,
}

/// Bytes of the JSON document each write carries.
pub const PAYLOAD_BYTES: usize = 100;

/// A JSON document of exactly `size` bytes (for `size` ≥ 60).
pub fn payload(seq: u64, size: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"temperature\":21.5,\"battery\":87,\"pad\":\"");
    let fill = size.saturating_sub(head.len() + 2);
    let mut p = head;
    p.extend(std::iter::repeat_n('x', fill));
    p.push_str("\"}");
    p
}

/// The Entente device (and etcd key suffix) client `i` works on.
pub fn device_id(i: usize) -> String {
    format!("bench-{i:06}")
}

/// The etcd key client `i` works on.
pub fn etcd_key(i: usize) -> String {
    format!("bench/{}", device_id(i))
}

/// One member as its status endpoint describes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeView {
    /// This member leads.
    pub is_leader: bool,
    /// This member knows a leader.
    pub has_leader: bool,
    /// Raft index it has (etcd `raftIndex`, Entente `commit`).
    pub index: u64,
    /// Applied index.
    pub applied: u64,
    /// This member's id (etcd `member_id`, Entente `node_id`).
    pub me: u64,
    /// The leader it names (0: none).
    pub leader_id: u64,
    /// Its term (Entente PBFT: its view).
    pub term: u64,
}

/// The leader among `views`: of the members that say they lead, the one
/// in the highest term. A member that restarted may still lead a term (a
/// PBFT view) the others left; the current leader is in a later one.
pub fn leader_of<'a>(views: impl IntoIterator<Item = (usize, &'a NodeView)>) -> Option<usize> {
    views
        .into_iter()
        .filter(|(_, v)| v.is_leader)
        .max_by_key(|(ep, v)| (v.term, std::cmp::Reverse(*ep)))
        .map(|(ep, _)| ep)
}

/// Whether `views` (every member's) are settled: all answer, all name the
/// same leader, which says it leads, and all applied what it has.
pub fn settled(views: &[(usize, Option<NodeView>)]) -> Option<usize> {
    let leader = leader_of(
        views
            .iter()
            .filter_map(|(ep, v)| v.as_ref().map(|v| (*ep, v))),
    )?;
    let lv = views.iter().find(|(ep, _)| *ep == leader)?.1?;
    views
        .iter()
        .all(|(_, v)| {
            v.is_some_and(|v| v.has_leader && v.leader_id == lv.me && v.applied >= lv.index)
        })
        .then_some(leader)
}

/// A system: its endpoints, and for Entente the bearer token.
#[derive(Debug, Clone)]
pub struct Sys {
    /// Which system.
    pub target: Target,
    /// Base URLs (`http://host:port`), one per member.
    pub endpoints: Vec<String>,
    /// Bearer token (Entente).
    pub token: Option<String>,
    /// Timeout of one request.
    pub timeout: Duration,
}

/// A fresh HTTP/1.1 client with its own connection pool.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .expect("an HTTP client without TLS always builds")
}

/// Normalises a base URL: adds `http://` if no scheme, drops a trailing `/`.
pub fn normalise(s: &str) -> String {
    let s = s.trim().trim_end_matches('/');
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

/// Reads the first existing, non-empty file of `files`, waiting up to
/// `limit` for one to appear (the first leader writes the admin token).
pub async fn read_token(files: &[PathBuf], limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        for f in files {
            if let Ok(t) = std::fs::read_to_string(f)
                && !t.trim().is_empty()
            {
                return Ok(t.trim().to_string());
            }
        }
        if Instant::now() >= deadline {
            bail!("no token in any of {files:?} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why a request failed.
pub fn error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "transport".into()
    }
}

impl Sys {
    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// The request of `op` by client `client`, its `seq`-th, to endpoint `ep`.
    pub fn request(
        &self,
        http: &reqwest::Client,
        op: Op,
        ep: usize,
        client: usize,
        seq: u64,
    ) -> reqwest::RequestBuilder {
        let base = &self.endpoints[ep];
        let rb = match (self.target, op) {
            (Target::Etcd, Op::Write) => {
                let body = json!({
                    "key": B64.encode(etcd_key(client)),
                    "value": B64.encode(payload(seq, PAYLOAD_BYTES)),
                });
                http.post(format!("{base}/v3/kv/put"))
                    .body(body.to_string())
            }
            (Target::Etcd, Op::ReadLinearizable | Op::ReadLocal) => {
                let mut body = json!({"key": B64.encode(etcd_key(client))});
                if op == Op::ReadLocal {
                    body["serializable"] = json!(true);
                }
                http.post(format!("{base}/v3/kv/range"))
                    .body(body.to_string())
            }
            (Target::Entente, Op::Write) => {
                let body = format!("{{\"desired\":{}}}", payload(seq, PAYLOAD_BYTES));
                http.patch(format!("{base}/v1/devices/{}/shadow", device_id(client)))
                    .header("content-type", "application/json")
                    .body(body)
            }
            (Target::Entente, Op::ReadLinearizable) => {
                http.get(format!("{base}/v1/devices/{}", device_id(client)))
            }
            (Target::Entente, Op::ReadLocal) => http.get(format!(
                "{base}/v1/devices/{}?consistency=local",
                device_id(client)
            )),
        };
        self.auth(rb).timeout(self.timeout)
    }

    /// Sends one request and reads the whole answer; `Err(kind)` unless 2xx.
    pub async fn send(
        &self,
        http: &reqwest::Client,
        op: Op,
        ep: usize,
        client: usize,
        seq: u64,
    ) -> Result<(), String> {
        let r = self
            .request(http, op, ep, client, seq)
            .send()
            .await
            .map_err(|e| error_kind(&e))?;
        let status = r.status();
        // Read the body so the connection goes back to the pool.
        let body = r.bytes().await.map_err(|e| error_kind(&e))?;
        if !status.is_success() {
            return Err(format!("http {}", status.as_u16()));
        }
        if self.target == Target::Etcd
            && op != Op::Write
            && !body.windows(5).any(|w| w == b"\"kvs\"")
        {
            // A range that found nothing: the key was never written.
            return Err("etcd: key not found".into());
        }
        Ok(())
    }

    /// The status of member `ep`, or `None` if it does not answer.
    pub async fn view(&self, http: &reqwest::Client, ep: usize) -> Option<NodeView> {
        let base = &self.endpoints[ep];
        let num = |v: &Value| -> u64 {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .unwrap_or(0)
        };
        match self.target {
            Target::Etcd => {
                let v: Value = http
                    .post(format!("{base}/v3/maintenance/status"))
                    .body("{}")
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let me = num(&v["header"]["member_id"]);
                let leader = num(&v["leader"]);
                Some(NodeView {
                    is_leader: me != 0 && me == leader,
                    has_leader: leader != 0,
                    index: num(&v["raftIndex"]),
                    applied: num(&v["raftAppliedIndex"]),
                    me,
                    leader_id: leader,
                    term: num(&v["raftTerm"]),
                })
            }
            Target::Entente => {
                let v: Value = self
                    .auth(http.get(format!("{base}/v1/cluster")))
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                Some(NodeView {
                    is_leader: v["role"] == "leader",
                    has_leader: !v["leader"].is_null() && num(&v["leader"]) != 0,
                    index: num(&v["commit"]),
                    applied: num(&v["applied"]),
                    me: num(&v["node_id"]),
                    leader_id: num(&v["leader"]),
                    term: num(&v["term"]),
                })
            }
        }
    }

    /// Index of the leading endpoint, if one says it leads (of several,
    /// the one in the highest term: see [`leader_of`]).
    pub async fn leader(&self, http: &reqwest::Client, among: &[usize]) -> Option<usize> {
        let mut views = Vec::new();
        for &ep in among {
            if let Some(v) = self.view(http, ep).await {
                views.push((ep, v));
            }
        }
        leader_of(views.iter().map(|(ep, v)| (*ep, v)))
    }

    /// Waits until every endpoint in `among` answers, all name the same
    /// leader, and all have applied what it has; returns the leader.
    pub async fn wait_settled(
        &self,
        http: &reqwest::Client,
        among: &[usize],
        limit: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            let mut views = Vec::new();
            for &ep in among {
                views.push((ep, self.view(http, ep).await));
            }
            if let Some(ep) = settled(&views) {
                return Ok(ep);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no settled leader within {limit:?} (views: {views:?})",
                    self.target.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Makes sure the keys (etcd) or devices (Entente) of clients
    /// `0..count` exist.
    pub async fn setup(&self, count: usize) -> Result<()> {
        let http = http_client();
        let mut tasks = tokio::task::JoinSet::new();
        let per = count.div_ceil(16).max(1);
        for chunk in (0..count).collect::<Vec<_>>().chunks(per) {
            let sys = self.clone();
            let http = http.clone();
            let chunk = chunk.to_vec();
            tasks.spawn(async move {
                for i in chunk {
                    sys.setup_one(&http, i).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.context("setup task")??;
        }
        Ok(())
    }

    async fn setup_one(&self, http: &reqwest::Client, i: usize) -> Result<()> {
        let ep = i % self.endpoints.len();
        let mut last = String::new();
        for _ in 0..50 {
            let r = match self.target {
                Target::Etcd => self.request(http, Op::Write, ep, i, 0).send().await,
                Target::Entente => {
                    self.auth(http.post(format!("{}/v1/devices", self.endpoints[ep])))
                        .json(&json!({"id": device_id(i), "labels": {"bench": "loadgen"}}))
                        .timeout(self.timeout)
                        .send()
                        .await
                }
            };
            match r {
                Ok(r) if r.status().is_success() || r.status().as_u16() == 409 => {
                    if self.target == Target::Entente {
                        // A first desired document, so reads find a shadow.
                        self.send(http, Op::Write, ep, i, 0)
                            .await
                            .map_err(|e| anyhow::anyhow!("first write of {}: {e}", device_id(i)))?;
                    }
                    return Ok(());
                }
                Ok(r) => {
                    last = format!(
                        "http {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("setting up client {i} on {}: {last}", self.target.name())
    }

    /// Counters of `/metrics` on member `ep` (Prometheus text; only
    /// unlabelled samples and the names in `wanted`).
    pub async fn metrics(
        &self,
        http: &reqwest::Client,
        ep: usize,
        wanted: &[&str],
    ) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let r = self
            .auth(http.get(format!("{}/metrics", self.endpoints[ep])))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        let Ok(r) = r else { return out };
        let Ok(text) = r.text().await else { return out };
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let mut it = line.split_whitespace();
            let (Some(name), Some(value)) = (it.next(), it.next()) else {
                continue;
            };
            if wanted.contains(&name)
                && let Ok(v) = value.parse::<f64>()
            {
                out.insert(name.to_string(), v);
            }
        }
        out
    }

    /// The counters [`Sys::metrics`] reads for this system: fsyncs of the
    /// log, entries persisted or proposals committed, backend commits.
    pub fn counter_names(&self) -> &'static [&'static str] {
        match self.target {
            Target::Etcd => &[
                "etcd_disk_wal_fsync_duration_seconds_count",
                "etcd_disk_wal_fsync_duration_seconds_sum",
                "etcd_disk_backend_commit_duration_seconds_count",
                "etcd_server_proposals_committed_total",
            ],
            Target::Entente => &[
                "entente_raft_fsyncs_total",
                "entente_raft_entries_persisted_total",
                "entente_raft_commit_index",
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pbft_view(me: u64, view: u64, primary: u64, applied: u64) -> NodeView {
        NodeView {
            is_leader: me == primary,
            has_leader: true,
            index: applied,
            applied,
            me,
            leader_id: primary,
            term: view,
        }
    }

    #[test]
    fn a_restarted_member_leading_an_old_view_is_not_the_leader() {
        // Member 1, the primary of view 0, was killed and restarted: it is
        // back in view 0, primary in its own eyes, while members 2..4 moved
        // to view 1 (primary 2). The first member saying it leads is the
        // stale one; the leader is member 2, and the group is not settled
        // until member 1 follows it.
        let mut views = vec![
            (0, Some(pbft_view(1, 0, 1, 40))),
            (1, Some(pbft_view(2, 1, 2, 41))),
            (2, Some(pbft_view(3, 1, 2, 41))),
            (3, Some(pbft_view(4, 1, 2, 41))),
        ];
        assert_eq!(
            leader_of(views.iter().map(|(e, v)| (*e, v.as_ref().unwrap()))),
            Some(1)
        );
        assert_eq!(settled(&views), None, "member 1 names another leader");
        views[0].1 = Some(pbft_view(1, 1, 2, 41));
        assert_eq!(settled(&views), Some(1));
        // One behind on what it applied, or one not answering: not settled.
        views[2].1 = Some(pbft_view(3, 1, 2, 40));
        assert_eq!(settled(&views), None);
        views[2].1 = None;
        assert_eq!(settled(&views), None);
    }

    #[test]
    fn payloads_are_json_of_the_asked_size() {
        for seq in [0, 7, 123_456_789] {
            let p = payload(seq, PAYLOAD_BYTES);
            assert_eq!(p.len(), PAYLOAD_BYTES);
            let v: Value = serde_json::from_str(&p).expect("json");
            assert_eq!(v["seq"], seq);
        }
    }

    #[test]
    fn request_shapes() {
        let http = http_client();
        let etcd = Sys {
            target: Target::Etcd,
            endpoints: vec!["http://127.0.0.1:1".into()],
            token: None,
            timeout: Duration::from_secs(1),
        };
        let r = etcd
            .request(&http, Op::ReadLocal, 0, 3, 0)
            .build()
            .expect("request");
        assert_eq!(r.url().path(), "/v3/kv/range");
        let body: Value =
            serde_json::from_slice(r.body().and_then(|b| b.as_bytes()).expect("body"))
                .expect("json");
        assert_eq!(body["serializable"], true);
        assert_eq!(
            B64.decode(body["key"].as_str().expect("key")).expect("b64"),
            b"bench/bench-000003"
        );
        let ent = Sys {
            target: Target::Entente,
            token: Some("t".into()),
            ..etcd
        };
        let r = ent
            .request(&http, Op::Write, 0, 3, 9)
            .build()
            .expect("request");
        assert_eq!(r.method(), reqwest::Method::PATCH);
        assert_eq!(r.url().path(), "/v1/devices/bench-000003/shadow");
        let body: Value =
            serde_json::from_slice(r.body().and_then(|b| b.as_bytes()).expect("body"))
                .expect("json");
        assert_eq!(body["desired"]["seq"], 9);
        let r = ent
            .request(&http, Op::ReadLocal, 0, 3, 0)
            .build()
            .expect("request");
        assert_eq!(r.url().query(), Some("consistency=local"));
    }
}
