//! The gateway's REST API, as far as the simulator needs it: register
//! devices, issue commands, read commands and metrics, find the leader, and
//! open the event stream. Request and response shapes follow
//! `docs/ARCHITECTURE.md` and the gateway's OpenAPI document.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A REST client for one or more gateways.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    token: Option<Arc<str>>,
    timeout: Duration,
}

/// The outcome of registering a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Registered; its secret.
    Created(String),
    /// The id was taken (409).
    Exists,
}

/// The outcome of registering devices in one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchRegistration {
    /// All registered: each id with its secret, in the order asked.
    Created(Vec<(String, String)>),
    /// None registered: some ids are taken (409; the gateway names at most
    /// 100 of them).
    Conflict(Vec<String>),
}

/// The most devices one `POST /v1/devices/batch` registers.
pub const MAX_BATCH: usize = 1000;

/// How often a batch refused before it was proposed (503 `batch-busy`,
/// `no-leader`, `write-dropped`, `write-refused`: not applied) is sent
/// again, waiting its `Retry-After` (at most 5 s) in between.
const BATCH_RETRIES: u32 = 5;

/// Why a request failed, as counted by the benchmarks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequestError {
    /// The gateway answered with this HTTP status.
    Status(u16),
    /// No answer within the request timeout.
    Timeout,
    /// The connection could not be made.
    Connect,
    /// Anything else (broken connection, unreadable body).
    Other,
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Status(s) => write!(f, "http {s}"),
            RequestError::Timeout => f.write_str("timeout"),
            RequestError::Connect => f.write_str("connect"),
            RequestError::Other => f.write_str("transport"),
        }
    }
}

impl From<reqwest::Error> for RequestError {
    fn from(e: reqwest::Error) -> RequestError {
        if e.is_timeout() {
            RequestError::Timeout
        } else if e.is_connect() {
            RequestError::Connect
        } else if let Some(s) = e.status() {
            RequestError::Status(s.as_u16())
        } else {
            RequestError::Other
        }
    }
}

/// Normalises a base URL: adds `http://` if no scheme, drops a trailing `/`.
pub fn normalise_base(s: &str) -> String {
    let s = s.trim().trim_end_matches('/');
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

/// The problem+json `detail` (or `title`) of an error body, else the body.
fn problem_text(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("detail")
                .or_else(|| v.get("title"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// Whether a 503 problem says its write was not applied (so sending it
/// again cannot register anything twice).
fn not_applied(body: &str) -> bool {
    let kind = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    ["batch-busy", "no-leader", "write-dropped", "write-refused"]
        .iter()
        .any(|slug| kind == format!("urn:entente:problem:{slug}"))
}

/// Each id of a batch with the secret the gateway answered for it, which
/// must come in the order asked.
fn secrets_in_order(ids: &[String], answer: &Value) -> Result<Vec<(String, String)>> {
    let devices = answer
        .get("devices")
        .and_then(Value::as_array)
        .context("the answer has no devices")?;
    if devices.len() != ids.len() {
        bail!(
            "the answer has {} devices for the {} asked",
            devices.len(),
            ids.len()
        );
    }
    ids.iter()
        .zip(devices)
        .map(|(id, d)| {
            if d.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                bail!("the answer's devices are not in the order asked (expected {id})");
            }
            let secret = d
                .get("secret")
                .and_then(Value::as_str)
                .with_context(|| format!("the answer has no secret for {id}"))?;
            Ok((id.clone(), secret.to_string()))
        })
        .collect()
}

async fn fail(what: &str, res: reqwest::Response) -> anyhow::Error {
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    anyhow!("{what}: HTTP {status}: {}", problem_text(&body))
}

impl Api {
    /// A client for the gateways at `bases` (`http://host:port`), with the
    /// bearer `token`; each request (but the event stream) times out after
    /// `timeout`. `pool` idle connections are kept per gateway.
    pub fn new(
        bases: &[String],
        token: Option<String>,
        timeout: Duration,
        pool: usize,
    ) -> Result<Api> {
        if bases.is_empty() {
            bail!("no REST address given (--api)");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(pool.max(1))
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            bases: Arc::new(bases.iter().map(|b| normalise_base(b)).collect()),
            token: token.map(|t| Arc::from(t.trim())),
            timeout,
        })
    }

    /// The base URLs.
    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    fn base(&self, i: usize) -> &str {
        &self.bases[i % self.bases.len()]
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url).timeout(self.timeout);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// `POST /v1/devices` on the first gateway.
    pub async fn register(&self, id: &str) -> Result<Registration> {
        let res = self
            .request(
                reqwest::Method::POST,
                format!("{}/v1/devices", self.base(0)),
            )
            .json(&json!({ "id": id, "labels": { "sim": "true" } }))
            .send()
            .await
            .with_context(|| format!("registering {id} (POST {}/v1/devices)", self.base(0)))?;
        match res.status() {
            StatusCode::CREATED => {
                let body: Value = res.json().await.context("reading the registration")?;
                let secret = body
                    .get("secret")
                    .and_then(Value::as_str)
                    .context("the registration answer has no secret")?;
                Ok(Registration::Created(secret.to_string()))
            }
            StatusCode::CONFLICT => Ok(Registration::Exists),
            _ => Err(fail(&format!("registering {id}"), res).await),
        }
    }

    /// `POST /v1/devices/batch` on the first gateway: registers `ids`
    /// (at most [`MAX_BATCH`]) in one log entry, all or none.
    pub async fn register_batch(&self, ids: &[String]) -> Result<BatchRegistration> {
        let url = format!("{}/v1/devices/batch", self.base(0));
        let devices: Vec<Value> = ids
            .iter()
            .map(|id| json!({ "id": id, "labels": { "sim": "true" } }))
            .collect();
        let body = json!({ "devices": devices });
        let what = || {
            format!(
                "registering {} devices from {} (POST {url})",
                ids.len(),
                ids.first().map_or("", String::as_str)
            )
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .request(reqwest::Method::POST, url.clone())
                .json(&body)
                .send()
                .await
                .with_context(what)?;
            match res.status() {
                StatusCode::CREATED => {
                    let answer: Value = res.json().await.with_context(what)?;
                    return secrets_in_order(ids, &answer)
                        .map(BatchRegistration::Created)
                        .with_context(what);
                }
                StatusCode::CONFLICT => {
                    let answer: Value = res.json().await.with_context(what)?;
                    let taken = answer
                        .get("conflicting_ids")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default();
                    return Ok(BatchRegistration::Conflict(taken));
                }
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
                    bail!(
                        "{}: the gateway has no POST /v1/devices/batch (HTTP {}); it is older \
                         than this simulator — use a simulator of its version",
                        what(),
                        res.status().as_u16()
                    );
                }
                StatusCode::SERVICE_UNAVAILABLE if attempt <= BATCH_RETRIES => {
                    let retry = res
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(1)
                        .min(5);
                    let text = res.text().await.unwrap_or_default();
                    if !not_applied(&text) {
                        bail!("{}: HTTP 503: {}", what(), problem_text(&text));
                    }
                    tokio::time::sleep(Duration::from_secs(retry)).await;
                }
                _ => return Err(fail(&what(), res).await),
            }
        }
    }

    /// `POST /v1/devices/{id}/secret`: a new secret for `id`.
    pub async fn rotate_secret(&self, id: &str) -> Result<String> {
        let url = format!("{}/v1/devices/{id}/secret", self.base(0));
        let res = self
            .request(reqwest::Method::POST, url)
            .send()
            .await
            .with_context(|| format!("rotating the secret of {id}"))?;
        if !res.status().is_success() {
            return Err(fail(&format!("rotating the secret of {id}"), res).await);
        }
        let body: Value = res.json().await.context("reading the new secret")?;
        body.get("secret")
            .and_then(Value::as_str)
            .map(str::to_string)
            .context("the answer has no secret")
    }

    /// `POST /v1/devices/{device}/commands` on gateway `base`; the command
    /// id. `body` is `{"name", "params", ...}`.
    pub async fn issue_command(
        &self,
        base: usize,
        device: &str,
        body: &Value,
    ) -> Result<String, RequestError> {
        let url = format!("{}/v1/devices/{device}/commands", self.base(base));
        let res = self
            .request(reqwest::Method::POST, url)
            .json(body)
            .send()
            .await?;
        let status = res.status();
        if status != StatusCode::CREATED && status != StatusCode::OK {
            return Err(RequestError::Status(status.as_u16()));
        }
        let v: Value = res.json().await?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(RequestError::Other)
    }

    /// `GET /v1/commands/{cid}`, long-polling up to `wait` for a terminal state.
    pub async fn command(&self, cid: &str, wait: Option<Duration>) -> Result<Value> {
        let mut url = format!("{}/v1/commands/{cid}", self.base(0));
        if let Some(w) = wait {
            url.push_str(&format!("?wait={}", w.as_millis()));
        }
        let res = self
            .request(reqwest::Method::GET, url)
            .timeout(self.timeout + wait.unwrap_or_default())
            .send()
            .await
            .with_context(|| format!("reading command {cid}"))?;
        if !res.status().is_success() {
            return Err(fail(&format!("reading command {cid}"), res).await);
        }
        res.json().await.context("reading the command")
    }

    /// `POST /v1/jobs` with `body`; the job created.
    pub async fn create_job(&self, body: &Value) -> Result<Value> {
        let res = self
            .request(reqwest::Method::POST, format!("{}/v1/jobs", self.base(0)))
            .json(body)
            .send()
            .await
            .context("creating a job")?;
        if !res.status().is_success() {
            return Err(fail("creating a job", res).await);
        }
        res.json().await.context("reading the job")
    }

    /// `GET /v1/jobs/{id}`: the job with its counts.
    pub async fn job(&self, id: &str) -> Result<Value> {
        let res = self
            .request(
                reqwest::Method::GET,
                format!("{}/v1/jobs/{id}", self.base(0)),
            )
            .send()
            .await
            .with_context(|| format!("reading job {id}"))?;
        if !res.status().is_success() {
            return Err(fail(&format!("reading job {id}"), res).await);
        }
        res.json().await.context("reading the job")
    }

    /// Every command of `device` (all pages), oldest first.
    pub async fn device_commands(&self, device: &str) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/devices/{device}/commands?limit=1000", self.base(0));
            if let Some(a) = &after {
                url.push_str(&format!("&after={a}"));
            }
            let res = self
                .request(reqwest::Method::GET, url)
                .send()
                .await
                .with_context(|| format!("listing the commands of {device}"))?;
            if !res.status().is_success() {
                return Err(fail(&format!("listing the commands of {device}"), res).await);
            }
            let page: Value = res.json().await.context("reading a command page")?;
            if let Some(items) = page.get("items").and_then(Value::as_array) {
                out.extend(items.iter().cloned());
            }
            match page.get("next").and_then(Value::as_str) {
                Some(n) => after = Some(n.to_string()),
                None => return Ok(out),
            }
        }
    }

    /// `GET /metrics` of gateway `base`.
    pub async fn metrics(&self, base: usize) -> Result<Metrics> {
        let url = format!("{}/metrics", self.base(base));
        let res = self
            .request(reqwest::Method::GET, url.clone())
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !res.status().is_success() {
            return Err(fail(&format!("GET {url}"), res).await);
        }
        Ok(Metrics::parse(
            &res.text().await.context("reading metrics")?,
        ))
    }

    /// The index (in [`Api::bases`]) of the gateway that says it leads, if any.
    pub async fn leader(&self) -> Result<Option<usize>> {
        for i in 0..self.bases.len() {
            let url = format!("{}/v1/cluster", self.base(i));
            let Ok(res) = self.request(reqwest::Method::GET, url).send().await else {
                continue;
            };
            if !res.status().is_success() {
                continue;
            }
            let v: Value = res.json().await.unwrap_or_default();
            if v.get("role").and_then(Value::as_str) == Some("leader") {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Opens `GET /v1/events` on gateway `base`, after log index `after` if
    /// given (else from now). No timeout: the stream is endless.
    pub async fn events(&self, base: usize, after: Option<u64>) -> Result<reqwest::Response> {
        let url = format!("{}/v1/events", self.base(base));
        let mut req = self.http.get(&url).header("accept", "text/event-stream");
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(a) = after {
            req = req.header("last-event-id", a.to_string());
        }
        let res = req.send().await.with_context(|| format!("GET {url}"))?;
        if !res.status().is_success() {
            return Err(fail(&format!("GET {url}"), res).await);
        }
        Ok(res)
    }
}

/// Figures read from every gateway's `/metrics`, summed.
#[derive(Debug, Clone, Default)]
pub struct GatewaySample {
    /// Resident memory (`process_resident_memory_bytes`); `None` if a
    /// gateway does not report it.
    pub rss: Option<f64>,
    /// `entente_mqtt_reports_received_total`.
    pub reports_received: f64,
    /// `entente_mqtt_report_proposals_total`.
    pub report_proposals: f64,
    /// `entente_mqtt_sessions`.
    pub sessions: f64,
    /// CPU seconds (`process_cpu_seconds_total`); `None` if a gateway does
    /// not report it.
    pub cpu: Option<f64>,
}

impl Api {
    /// Reads and sums the metrics of every gateway.
    pub async fn sample(&self) -> Result<GatewaySample> {
        let mut s = GatewaySample {
            rss: Some(0.0),
            cpu: Some(0.0),
            ..GatewaySample::default()
        };
        for i in 0..self.bases.len() {
            let m = self.metrics(i).await?;
            s.rss = s
                .rss
                .zip(m.get("process_resident_memory_bytes"))
                .map(|(a, b)| a + b);
            s.reports_received += m.get("entente_mqtt_reports_received_total").unwrap_or(0.0);
            s.report_proposals += m.get("entente_mqtt_report_proposals_total").unwrap_or(0.0);
            s.sessions += m.get("entente_mqtt_sessions").unwrap_or(0.0);
            s.cpu = s
                .cpu
                .zip(m.get("process_cpu_seconds_total"))
                .map(|(a, b)| a + b);
        }
        Ok(s)
    }
}

/// How long the gateways' logs must stay still, and their CPU low, for
/// [`Api::settle`] as the benchmarks call it ...
pub const SETTLE_QUIET: Duration = Duration::from_millis(300);
/// ... and the longest they wait for that.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`Api::settle`] reads the gateways' metrics.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// The most CPU the gateways may use, together, and still count as idle:
/// a tenth of one core.
const IDLE_CPU: f64 = 0.1;

/// One reading of the gateways for [`Api::settle`].
#[derive(Debug)]
struct Reading {
    at: tokio::time::Instant,
    /// (last, commit, applied) index of every gateway.
    logs: Vec<(f64, f64, f64)>,
    /// CPU seconds of all of them (`None` if one does not say).
    cpu: Option<f64>,
}

impl Api {
    /// Waits until the gateways are idle: for `quiet`, no log grew, all of
    /// it was committed and applied, and together they used under a tenth
    /// of a core (`process_cpu_seconds_total`, where reported). A fleet
    /// that just connected leaves work behind on the gateway — presence to
    /// replicate, each subscribed device's queued commands and shadow
    /// documents to read and deliver — and a benchmark that starts
    /// meanwhile measures that, not its own load. Returns how long it took;
    /// fails after `timeout` saying what was still busy.
    pub async fn settle(&self, quiet: Duration, timeout: Duration) -> Result<Duration> {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let mut window: std::collections::VecDeque<Reading> = std::collections::VecDeque::new();
        loop {
            let mut logs = Vec::with_capacity(self.bases.len());
            let mut cpu = Some(0.0);
            for i in 0..self.bases.len() {
                let m = self.metrics(i).await?;
                let g = |n: &str| m.get(n).unwrap_or(0.0);
                logs.push((
                    g("entente_raft_last_index"),
                    g("entente_raft_commit_index"),
                    g("entente_raft_applied_index"),
                ));
                cpu = cpu
                    .zip(m.get("process_cpu_seconds_total"))
                    .map(|(a, b)| a + b);
            }
            let now = Reading {
                at: tokio::time::Instant::now(),
                logs,
                cpu,
            };
            let caught_up = now.logs.iter().all(|(l, c, a)| l == c && c == a);
            if !caught_up || window.back().is_some_and(|r| r.logs != now.logs) {
                window.clear();
            }
            // The oldest reading still `quiet` or more before this one.
            while window
                .get(1)
                .is_some_and(|r| now.at.duration_since(r.at) >= quiet)
            {
                window.pop_front();
            }
            if let Some(first) = window.front()
                && now.at.duration_since(first.at) >= quiet
            {
                let span = now.at.duration_since(first.at).as_secs_f64();
                let busy = match (first.cpu, now.cpu) {
                    (Some(a), Some(b)) => (b - a) / span,
                    _ => 0.0,
                };
                if busy <= IDLE_CPU {
                    return Ok(now.at.duration_since(started));
                }
            }
            if now.at >= deadline {
                bail!(
                    "the gateways did not settle within {:.1} s (last, commit, applied index per \
                     gateway: {:?}; CPU seconds: {:?})",
                    timeout.as_secs_f64(),
                    now.logs,
                    now.cpu
                );
            }
            if caught_up {
                window.push_back(now);
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }
}

/// Prometheus text-format samples without labels, by name.
#[derive(Debug, Clone, Default)]
pub struct Metrics(HashMap<String, f64>);

impl Metrics {
    /// Parses the text format; labelled samples and comments are skipped.
    pub fn parse(text: &str) -> Metrics {
        let mut m = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.contains('{') {
                continue;
            }
            let mut parts = line.split_whitespace();
            if let (Some(name), Some(value)) = (parts.next(), parts.next())
                && let Ok(v) = value.parse::<f64>()
            {
                m.insert(name.to_string(), v);
            }
        }
        Metrics(m)
    }

    /// A sample's value.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_plain_samples() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE x counter\nentente_mqtt_reports_received_total 42\n\
             process_resident_memory_bytes 1.5e6\nentente_commands{status=\"queued\"} 3\nbad\n",
        );
        assert_eq!(m.get("entente_mqtt_reports_received_total"), Some(42.0));
        assert_eq!(m.get("process_resident_memory_bytes"), Some(1_500_000.0));
        assert_eq!(m.get("entente_commands"), None);
        assert_eq!(m.get("bad"), None);
    }

    #[test]
    fn bases_and_problems() {
        assert_eq!(normalise_base("127.0.0.1:8080/"), "http://127.0.0.1:8080");
        assert_eq!(normalise_base("https://gw"), "https://gw");
        assert_eq!(
            problem_text(r#"{"title":"Conflict","detail":"taken"}"#),
            "taken"
        );
        assert_eq!(problem_text("plain"), "plain");
        assert_eq!(RequestError::Status(503).to_string(), "http 503");
    }

    #[test]
    fn batch_answers_are_read_in_order_and_retried_only_when_not_applied() {
        let ids = vec!["a".to_string(), "b".to_string()];
        let ok = json!({"index": 5, "devices": [{"id": "a", "secret": "s1"}, {"id": "b", "secret": "s2"}]});
        assert_eq!(
            secrets_in_order(&ids, &ok).expect("in order"),
            [("a".into(), "s1".into()), ("b".into(), "s2".into())]
        );
        let swapped =
            json!({"devices": [{"id": "b", "secret": "s2"}, {"id": "a", "secret": "s1"}]});
        assert!(secrets_in_order(&ids, &swapped).is_err());
        let short = json!({"devices": [{"id": "a", "secret": "s1"}]});
        assert!(secrets_in_order(&ids, &short).is_err());
        let problem = |slug: &str| format!(r#"{{"type":"urn:entente:problem:{slug}"}}"#);
        assert!(not_applied(&problem("batch-busy")));
        assert!(not_applied(&problem("no-leader")));
        assert!(!not_applied(&problem("write-timeout")));
        assert!(!not_applied(&problem("outcome-unknown")));
        assert!(!not_applied("not json"));
    }
}

#[cfg(test)]
mod settle_tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A `/metrics` endpoint whose log is still and whose CPU counter
    /// grows by `cpu_ms_per_read` at every read (a read every 50 ms).
    async fn gateway(cpu_ms_per_read: u64) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cpu_ms = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let cpu_ms = cpu_ms.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        // One request per read is enough for reqwest's GETs.
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let cpu = cpu_ms.fetch_add(cpu_ms_per_read, Ordering::Relaxed);
                        let body = format!(
                            "entente_raft_last_index 7\nentente_raft_commit_index 7\n\
                             entente_raft_applied_index 7\nprocess_cpu_seconds_total {}\n",
                            cpu as f64 / 1000.0
                        );
                        let head =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                        if s.write_all((head + &body).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    fn api(base: String) -> Api {
        Api::new(&[base], None, Duration::from_secs(5), 4).expect("api")
    }

    #[tokio::test]
    async fn a_still_log_on_a_busy_gateway_is_not_idle() {
        // 40 ms of CPU every 50 ms: 0.8 of a core.
        let err = api(gateway(40).await)
            .settle(Duration::from_millis(200), Duration::from_millis(800))
            .await
            .expect_err("busy");
        assert!(err.to_string().contains("did not settle"), "{err:#}");
        // No CPU used: settles once the window has passed.
        let took = api(gateway(0).await)
            .settle(Duration::from_millis(200), Duration::from_secs(10))
            .await
            .expect("idle");
        assert!(took >= Duration::from_millis(200), "{took:?}");
    }
}
