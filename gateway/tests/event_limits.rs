//! `GET /v1/events` against clients that do not read, on real sockets:
//! `gateway::start` with port-0 listeners in this process.
//!
//! The finding: 2,000 clients opening `/v1/events?after=0` without reading
//! took the gateway from 0.9 to 11.5 GiB, and slowed every other request.

use std::path::Path;
use std::time::Duration;

use gateway::ops::{Op, OpResult, Role};
use gateway::{Config, Gateway, hash_secret};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep, timeout};

mod common;

use common::{SseStream, WAIT, metric};

// (Small caps: each stream that stalls has first filled its socket's
// buffers, megabytes on loopback, and replaying that much takes CPU.)
const STREAMS: usize = 8;
const PER_TOKEN: usize = 3;
const BUFFER: usize = 32 * 1024;
const SEND_TIMEOUT: Duration = Duration::from_secs(8);
/// The backlog the streams replay: far more than a socket's buffers hold.
const BACKLOG_EVENTS: usize = 300;
const EVENT_PAD: usize = 16 * 1024;

struct Env {
    gw: Gateway,
    base: String,
    admin: String,
    http: reqwest::Client,
}

async fn boot(dir: &Path) -> Env {
    let any = "127.0.0.1:0".parse().expect("addr");
    let mut config = Config::single(dir.to_path_buf(), any, any);
    config.tick = Duration::from_millis(2);
    config.http_max_connections = 1_000;
    config.http_send_timeout = SEND_TIMEOUT;
    config.events_max_streams = STREAMS;
    config.events_max_streams_per_token = PER_TOKEN;
    config.events_buffer_bytes = BUFFER;
    let gw = gateway::start(config).await.expect("start");
    let file = gw.admin_token_file.clone().expect("admin token file");
    let admin = std::fs::read_to_string(file)
        .expect("token")
        .trim()
        .to_string();
    Env {
        base: format!("http://{}", gw.http_addr),
        gw,
        admin,
        http: reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("client"),
    }
}

impl Env {
    async fn propose(&self, op: Op) -> OpResult {
        gateway::propose(self.gw.node(), op)
            .await
            .expect("propose")
            .1
    }

    async fn viewer_token(&self) -> String {
        let token = gateway::random_token().expect("token");
        let r = self
            .propose(Op::CreateToken {
                token_hash: hash_secret(&token),
                role: Role::Viewer,
                name: "stream reader".into(),
                id: None,
                expires_at: None,
            })
            .await;
        assert!(matches!(r, OpResult::Token(_)), "{r:?}");
        token
    }

    async fn metrics(&self) -> String {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("metrics");
        assert_eq!(r.status(), 200);
        r.text().await.expect("text")
    }
}

/// A raw client of `/v1/events?after=0` that reads the response head and
/// then nothing more.
struct Raw {
    stream: TcpStream,
    status: u16,
    head: String,
    /// Body bytes that came with the head.
    early: Vec<u8>,
}

async fn open_raw(addr: std::net::SocketAddr, token: &str) -> Raw {
    let socket = TcpSocket::new_v4().expect("socket");
    // A small receive window, as a slow client over a slow link would have.
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream
        .write_all(
            format!(
                "GET /v1/events?after=0 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("request");
    let mut got = Vec::new();
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut buf = [0u8; 256];
        let n = timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("a response head in time")
            .expect("read");
        assert!(n > 0, "closed before the response head");
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    Raw {
        stream,
        status,
        head,
        early: got[end..].to_vec(),
    }
}

/// The ids of the whole events in a chunked `text/event-stream` body that
/// may stop anywhere (in a chunk, in an event).
fn whole_events(mut body: &[u8]) -> Vec<u64> {
    let mut text = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .expect("chunk size");
        let start = eol + 2;
        if size == 0 || body.len() < start + size + 2 {
            break;
        }
        text.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
    let text = String::from_utf8_lossy(&text);
    let mut ids = Vec::new();
    let mut rest: &str = &text;
    while let Some(end) = rest.find("\n\n") {
        let block = &rest[..end];
        if let Some(id) = block
            .lines()
            .find_map(|l| l.strip_prefix("id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
        rest = &rest[end + 2..];
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_event_stream_clients_are_bounded_dropped_and_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = boot(dir.path()).await;

    // A backlog of large events.
    let r = env
        .http
        .post(format!("{}/v1/devices", env.base))
        .bearer_auth(&env.admin)
        .json(&json!({ "id": "big-1" }))
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201);
    for i in 0..BACKLOG_EVENTS {
        let pad: String = format!("{i:08}").repeat(EVENT_PAD / 8);
        let r = env
            .propose(Op::SetDesired {
                device: "big-1".into(),
                patch: json!({ "pad": pad }),
                expected_version: None,
            })
            .await;
        assert!(matches!(r, OpResult::Shadow(_)), "{r:?}");
    }
    // What a viewer's stream carries (token events go to admins only).
    let stored: Vec<u64> = env
        .gw
        .db()
        .events_since(0, u32::MAX)
        .await
        .expect("events")
        .iter()
        .filter(|e| e.kind != "token")
        .map(|e| e.index)
        .collect();

    // Five tokens: one opens 40 streams, four open 5 each.
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(env.viewer_token().await);
    }
    let mut open = Vec::new();
    let (mut too_many, mut unavailable) = (0, 0);
    let plan = std::iter::repeat_n(0, 40).chain((1..5).flat_map(|t| std::iter::repeat_n(t, 5)));
    for t in plan {
        let raw = open_raw(env.gw.http_addr, &tokens[t]).await;
        let head = raw.head.to_ascii_lowercase();
        match raw.status {
            200 => open.push((t, raw)),
            429 | 503 => {
                assert!(head.contains("retry-after:"), "{head}");
                assert!(
                    head.contains("content-type: application/problem+json"),
                    "{head}"
                );
                if raw.status == 429 {
                    too_many += 1;
                } else {
                    unavailable += 1;
                }
            }
            s => panic!("unexpected status {s}: {head}"),
        }
    }
    // Token 0 gets its 3 streams, token 1 too, token 2 the last 2 of the
    // gateway's 8; then it is full.
    let per_token: Vec<usize> = (0..5)
        .map(|t| open.iter().filter(|(o, _)| *o == t).count())
        .collect();
    assert_eq!(per_token, [PER_TOKEN, PER_TOKEN, 2, 0, 0]);
    assert_eq!((too_many, unavailable), (37 + 2, 3 + 5 + 5));

    // While they sit there unread, others are served promptly and what the
    // gateway buffers for them stays within the bound.
    let started = Instant::now();
    let r = env
        .http
        .get(format!("{}/v1/devices", env.base))
        .bearer_auth(&env.admin)
        .send()
        .await
        .expect("list devices");
    assert_eq!(r.status(), 200);
    let r = env
        .http
        .get(format!("{}/healthz", env.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let m = env.metrics().await;
    assert_eq!(metric(&m, "entente_events_streams"), STREAMS as u64, "{m}");
    assert!(
        metric(&m, "entente_events_buffered_bytes") <= (STREAMS * BUFFER) as u64,
        "{m}"
    );

    // They do not keep up, so they are dropped, and their places free up.
    let deadline = Instant::now() + WAIT;
    loop {
        let m = env.metrics().await;
        assert!(
            metric(&m, "entente_events_buffered_bytes") <= (STREAMS * BUFFER) as u64,
            "{m}"
        );
        if metric(&m, "entente_events_streams") == 0 {
            assert!(
                metric(&m, "entente_events_streams_dropped_total") >= STREAMS as u64,
                "{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "streams still open: {m}");
        sleep(Duration::from_millis(100)).await;
    }

    // A dropped client got whole events, in order and with none missing, up
    // to some point; it resumes from there with Last-Event-ID.
    let (_, mut raw) = open.pop().expect("a dropped client");
    let mut body = std::mem::take(&mut raw.early);
    timeout(WAIT, raw.stream.read_to_end(&mut body))
        .await
        .expect("the gateway closed the dropped stream")
        .ok();
    let ids = whole_events(&body);
    assert!(!ids.is_empty(), "the dropped client got some events first");
    assert!(
        ids.len() < stored.len(),
        "it was dropped before the end of the backlog"
    );
    assert_eq!(
        ids,
        stored[..ids.len()],
        "whole events, in order, none missing"
    );
    let last = *ids.last().expect("last");
    let r = env
        .http
        .get(format!("{}/v1/events", env.base))
        .bearer_auth(&tokens[0])
        .header("last-event-id", last.to_string())
        .send()
        .await
        .expect("resume");
    assert_eq!(r.status(), 200);
    let mut resumed = SseStream {
        body: Box::pin(r.bytes_stream()),
        buf: String::new(),
    };
    let (next, kind, data) = resumed.next().await;
    assert_eq!(next, stored[ids.len()], "resumes right after {last}");
    assert_eq!(kind, "shadow.desired");
    assert_eq!(data["device"], "big-1");
    drop(resumed);
    drop(open);
    env.gw.stop().await;
}
