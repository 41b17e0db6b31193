//! The real `gateway` binary stops and starts like a service: SIGTERM and
//! SIGINT stop it gracefully at any time (during a start that has no quorum
//! too), a second signal exits at once, and peers named by host name may
//! come up in any order.

mod common;

#[path = "support/ports.rs"]
mod ports;
#[path = "support/process.rs"]
mod process;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Seen, WAIT, connect_v5};
use ports::reserve_ports;
use process::{Proc, write_secret_file};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");
const SECRET: &str = "service-test-secret-0123456789";

/// A gateway in `dir` (data in `dir/data`, the group's secret in a file).
fn spawn(dir: &Path, args: &[&str]) -> Proc {
    let secret = dir.join("cluster-secret.txt");
    write_secret_file(&secret, SECRET);
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--cluster-secret-file")
        .arg(&secret)
        .args(["--tick-ms", "5"])
        .args(args)
        .env("RUST_LOG", "info");
    Proc::start(c)
}

/// Waits (bounded) for a line of `gw`'s output holding every needle.
async fn wait_line(gw: &Proc, needles: &[&str]) -> String {
    gw.wait_line(needles, WAIT).await
}

/// The value after `prefix` on the first line of `gw`'s output that has it
/// (waiting for it).
async fn printed(gw: &Proc, prefix: &str) -> String {
    let line = wait_line(gw, &[prefix]).await;
    line.split(prefix).nth(1).expect("value").trim().to_string()
}

/// Polls `GET url` (bounded) until it answers `status`.
async fn until_status(http: &reqwest::Client, url: &str, status: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = http.get(url).send().await.map(|r| r.status().as_u16());
        if got.as_ref().is_ok_and(|s| *s == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET {url} never answered {status}; last: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peers(addrs: &[(u64, String)]) -> String {
    addrs
        .iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Finding (issue 20): during a start that could not reach a quorum the
/// gateway ignored the first Ctrl-C and SIGTERM was not handled at all (the
/// process died of it, nothing flushed, no exit code 0). Now a signal during
/// such a start gives up the waits for the group and stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_start_without_quorum_stops_promptly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let raft = reserve_ports(4);
    let http = raft[3];
    // Three voters; the other two never start.
    let group = peers(&[
        (1, raft[0].to_string()),
        (2, raft[1].to_string()),
        (3, raft[2].to_string()),
    ]);
    let mut gw = spawn(
        tmp.path(),
        &[
            "--node-id",
            "1",
            "--peers",
            &group,
            "--raft-listen",
            &raft[0].to_string(),
            "--http-listen",
            &http.to_string(),
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
        ],
    );
    let client = reqwest::Client::new();
    // The REST API is up while the start waits for a leader it cannot have.
    until_status(&client, &format!("http://{http}/healthz"), 200).await;
    until_status(&client, &format!("http://{http}/readyz"), 503).await;

    gw.signal("TERM");
    let status = gw
        .exits_within(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM:\n{}", gw.output()));
    assert!(status.success(), "exit status {status}:\n{}", gw.output());
    let out = gw.output();
    assert!(
        out.contains("stopping gracefully") && out.contains("SIGTERM"),
        "{out}"
    );
    assert!(out.contains("stopping during the start"), "{out}");
    assert!(out.contains("gateway stopped"), "{out}");
}

/// A second signal exits at once, even while the graceful stop waits for a
/// request in flight (here one whose body never comes, which the stop
/// would wait for up to the write timeout + 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigint_exits_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut gw = spawn(
        tmp.path(),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--raft-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
            "--write-timeout-ms",
            "20000",
        ],
    );
    let base = printed(&gw, "REST on http://").await;
    let base = base.split_whitespace().next().expect("address").to_string();
    let token = std::fs::read_to_string(tmp.path().join("data/admin-token")).expect("token");
    let mut slow = tokio::net::TcpStream::connect(&base)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/devices HTTP/1.1\r\nHost: {base}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 64\r\n\r\n{{",
        token.trim()
    );
    slow.write_all(head.as_bytes()).await.expect("write");

    gw.signal("INT");
    wait_line(&gw, &["stopping gracefully", "SIGINT"]).await;
    assert!(
        gw.child.try_wait().expect("try_wait").is_none(),
        "the graceful stop waits for the request in flight"
    );
    gw.signal("INT");
    let status = gw
        .exits_within(Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("still running after a second SIGINT:\n{}", gw.output()));
    assert_eq!(status.code(), Some(130), "{}", gw.output());
    drop(slow);
}

/// SIGTERM on a running gateway: its MQTT 5 device is told the server is
/// shutting down (DISCONNECT 0x8B), a request in flight is answered, and
/// the process exits 0 (before, SIGTERM killed it outright).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_devices_answers_requests_and_exits_zero() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut gw = spawn(
        tmp.path(),
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--raft-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
        ],
    );
    let rest = printed(&gw, "REST on ").await;
    let base = rest.split_whitespace().next().expect("address").to_string();
    let devices = printed(&gw, "devices (MQTT 3.1.1 and 5) on ").await;
    let mqtt5: SocketAddr = devices
        .split(" and ")
        .nth(1)
        .expect("second listener")
        .parse()
        .expect("address");
    let token = std::fs::read_to_string(tmp.path().join("data/admin-token"))
        .expect("token")
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let reg: Value = http
        .post(format!("{base}/v1/devices"))
        .bearer_auth(&token)
        .json(&json!({"id": "pump"}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let secret = reg["secret"].as_str().expect("secret").to_string();
    let mut d = connect_v5(mqtt5, "pump", &secret);
    d.expect_connack().await;
    d.subscribed(&entente_protocol::commands_topic("pump"))
        .await;

    // A request that waits for the command's outcome, in flight.
    let in_flight = tokio::spawn({
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        async move {
            let r = http
                .post(format!("{base}/v1/devices/pump/commands?wait=30"))
                .bearer_auth(&token)
                .json(&json!({"name": "reboot"}))
                .send()
                .await
                .expect("the request in flight is answered");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }
    });
    d.message(&entente_protocol::commands_topic("pump")).await;

    gw.signal("TERM");
    loop {
        match d.next().await {
            Seen::Disconnect(code) => {
                assert_eq!(code, 0x8B, "server shutting down");
                break;
            }
            Seen::Closed(e) => panic!("closed without a DISCONNECT: {e}"),
            _ => {}
        }
    }
    let (status, body) = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("answered in time")
        .expect("task");
    // Answered with the command as it stands (it was not finished).
    assert_eq!(status, 201, "{body}");
    assert!(
        matches!(body["status"].as_str(), Some("queued" | "sent")),
        "{body}"
    );
    let exit = gw
        .exits_within(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", gw.output()));
    assert!(exit.success(), "exit status {exit}:\n{}", gw.output());
    let out = gw.output();
    assert!(out.contains("stopping gracefully"), "{out}");
    assert!(out.contains("gateway stopped"), "{out}");
}

/// Finding (issue 20): `--peers` host names were resolved once at start and
/// a failed lookup was fatal, so in `docker compose up` a gateway whose
/// peers' containers did not exist yet exited. Now names are looked up at
/// every dial: gateway 1 starts with a peer named `localhost` that is not up
/// yet and a third whose name does not resolve at all, says so in its log
/// and keeps trying; gateway 2 starts later and the two form the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_named_by_host_may_start_in_any_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ports = reserve_ports(5);
    let group = peers(&[
        (1, format!("localhost:{}", ports[0].port())),
        (2, format!("localhost:{}", ports[1].port())),
        (3, format!("no-such-host.invalid:{}", ports[2].port())),
    ]);
    let start = |id: u64| {
        let dir = tmp.path().join(format!("g{id}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let raft = ports[id as usize - 1].to_string();
        let http = ports[2 + id as usize].to_string();
        spawn(
            &dir,
            &[
                "--node-id",
                &id.to_string(),
                "--peers",
                &group,
                "--raft-listen",
                &raft,
                "--http-listen",
                &http,
                "--mqtt-listen",
                "127.0.0.1:0",
                "--mqtt5-listen",
                "127.0.0.1:0",
            ],
        )
    };
    let mut g1 = start(1);
    wait_line(&g1, &["cannot connect to peer", "peer=2", "localhost:"]).await;
    wait_line(
        &g1,
        &["cannot connect to peer", "peer=3", "no-such-host.invalid:"],
    )
    .await;
    assert!(
        g1.child.try_wait().expect("try_wait").is_none(),
        "{}",
        g1.output()
    );

    let mut g2 = start(2);
    let http = reqwest::Client::new();
    for id in [1, 2] {
        until_status(&http, &format!("http://{}/readyz", ports[2 + id]), 200).await;
    }
    // The group's first leader writes the admin token.
    let deadline = Instant::now() + WAIT;
    while ![1, 2]
        .iter()
        .any(|id| tmp.path().join(format!("g{id}/data/admin-token")).exists())
    {
        assert!(Instant::now() < deadline, "no admin token was written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for g in [&mut g1, &mut g2] {
        g.signal("TERM");
        let status = g.exits_within(Duration::from_secs(10)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}:\n{}",
            g.output()
        );
    }
}

/// Finding (issue 14): two processes could open one data directory, each
/// writing the same log and state database. Now the second gateway — and
/// `--recover` or `--restore` on that directory — is refused, naming the
/// holder; the lock goes with the process that held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_is_refused_naming_its_holder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = reserve_ports(2);
    let listen = |p: &SocketAddr| p.to_string();
    let args = |http: &SocketAddr| {
        vec![
            "--http-listen".to_string(),
            listen(http),
            "--raft-listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--mqtt-listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--mqtt5-listen".to_string(),
            "127.0.0.1:0".to_string(),
        ]
    };
    let first_args = args(&ports[0]);
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let mut first = spawn(tmp.path(), &first_args);
    until_status(
        &reqwest::Client::new(),
        &format!("http://{}/readyz", ports[0]),
        200,
    )
    .await;
    let pid = first.child.id();

    let second_args = args(&ports[1]);
    let second_args: Vec<&str> = second_args.iter().map(String::as_str).collect();
    let mut second = spawn(tmp.path(), &second_args);
    let status = second
        .exits_within(WAIT)
        .await
        .expect("the second gateway exits");
    assert_eq!(status.code(), Some(1), "{}", second.output());
    let out = second.output();
    assert!(
        out.contains("is in use by another process") && out.contains(&format!("pid {pid}")),
        "{out}"
    );
    let data = tmp.path().join("data");
    for offline in [
        vec!["--recover", "--node-id", "1"],
        vec!["--restore", "/nonexistent-backup", "--node-id", "1"],
    ] {
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(&data)
            .args(&offline)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{offline:?} ran on a directory in use"
        );
        assert!(err.contains(&format!("pid {pid}")), "{offline:?}: {err}");
    }
    // The holder is alive and well; once it is gone the directory is free.
    until_status(
        &reqwest::Client::new(),
        &format!("http://{}/readyz", ports[0]),
        200,
    )
    .await;
    first.signal("KILL");
    first.exits_within(WAIT).await.expect("killed");
    let mut third = spawn(tmp.path(), &second_args);
    until_status(
        &reqwest::Client::new(),
        &format!("http://{}/readyz", ports[1]),
        200,
    )
    .await;
    third.signal("TERM");
    assert!(third.exits_within(WAIT).await.is_some_and(|s| s.success()));
}
