//! Disaster recovery with the real `gateway` binary: a three-gateway group
//! loses two members for good (SIGKILL, data destroyed); `gateway
//! --recover` turns the survivor's data into a single-member group that
//! holds every acknowledged write, takes new ones, and grows again with the
//! usual membership calls.

mod common;

#[path = "support/ports.rs"]
mod ports;
#[path = "support/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::WAIT;
use ports::reserve_ports;
use process::{Proc, until, write_secret_file};
use serde_json::{Value, json};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");
const SECRET: &str = "recover-test-cluster-secret-0123456789";

fn secret_file(root: &Path) -> PathBuf {
    let f = root.join("cluster-secret.txt");
    if !f.exists() {
        write_secret_file(&f, SECRET);
    }
    f
}

fn command(root: &Path, data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(data)
        .arg("--cluster-secret-file")
        .arg(secret_file(root))
        // Snapshots early, so that the membership lives in a snapshot (a
        // log alone would let a gateway started with `--peers` naming only
        // itself lead on its own).
        .args(["--tick-ms", "5", "--snapshot-every", "8"])
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    c
}

fn spawn(root: &Path, data: &Path, args: &[&str]) -> Proc {
    Proc::start(command(root, data, args))
}

fn run(root: &Path, data: &Path, args: &[&str]) -> Output {
    command(root, data, args).output().expect("run gateway")
}

async fn count_commands(http: &reqwest::Client, base: &str, token: &str) -> Option<usize> {
    let mut n = 0;
    for d in 0..3 {
        let r = http
            .get(format!("{base}/v1/devices/d{d}/commands?limit=1000"))
            .bearer_auth(token)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let v: Value = r.json().await.ok()?;
        n += v["items"].as_array().map_or(0, Vec::len);
    }
    Some(n)
}

async fn post(http: &reqwest::Client, url: String, token: &str, body: Value) -> (u16, Value) {
    match http.post(url).bearer_auth(token).json(&body).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!(e.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_lost_two_of_three_members_is_recovered_from_the_survivor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let ports = reserve_ports(8);
    let (raft, rest) = (&ports[..4], &ports[4..]);
    let group: String = (0..3)
        .map(|i| format!("{}={}", i + 1, raft[i]))
        .collect::<Vec<_>>()
        .join(",");
    let data: Vec<PathBuf> = (1..=4).map(|i| root.join(format!("g{i}"))).collect();
    let start = |i: usize, peers: &str, extra: &[&str]| {
        let id = (i + 1).to_string();
        let (r, h) = (raft[i].to_string(), rest[i].to_string());
        let mut args = vec![
            "--node-id",
            &id,
            "--peers",
            peers,
            "--raft-listen",
            &r,
            "--http-listen",
            &h,
        ];
        args.extend_from_slice(extra);
        spawn(root, &data[i], &args)
    };
    let base = |i: usize| format!("http://{}", rest[i]);
    let http = reqwest::Client::new();

    // A group of three; acknowledged writes.
    let mut gws: Vec<Option<Proc>> = (0..3).map(|i| Some(start(i, &group, &[]))).collect();
    let token = until("the admin token", || {
        let data = data.clone();
        async move {
            data.iter()
                .take(3)
                .find_map(|d| std::fs::read_to_string(d.join("admin-token")).ok())
                .map(|t| t.trim().to_string())
        }
    })
    .await;
    for d in 0..3 {
        let url = format!("{}/v1/devices", base(0));
        until("a device registration", || {
            let (http, url, token) = (&http, url.clone(), &token);
            async move {
                let (s, _) = post(http, url, token, json!({"id": format!("d{d}")})).await;
                (s == 201 || s == 409).then_some(())
            }
        })
        .await;
    }
    let acked = 30;
    for i in 0..acked {
        let (s, b) = post(
            &http,
            format!("{}/v1/devices/d{}/commands", base(i % 3), i % 3),
            &token,
            json!({"name": "n", "params": {"i": i}}),
        )
        .await;
        assert_eq!(s, 201, "command {i}: {b}");
    }
    // The survivor has applied every acknowledged write.
    until("gateway 3 to apply every write", || {
        let (http, b, token) = (&http, base(2), &token);
        async move { (count_commands(http, &b, token).await == Some(acked)).then_some(()) }
    })
    .await;

    // Two members lost for good; the third stopped.
    for i in 0..2 {
        drop(gws[i].take());
        std::fs::remove_dir_all(&data[i]).expect("destroy data");
    }
    let g3 = gws[2].take().expect("gateway 3");
    let pid = g3.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let mut g3 = g3;
    let deadline = Instant::now() + WAIT;
    while g3.child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "gateway 3 did not stop:\n{}",
            g3.out.lock().expect("output")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(g3);

    // Refused on a directory without a group.
    let empty = root.join("empty");
    let out = run(root, &empty, &["--recover", "--node-id", "3"]);
    assert!(!out.status.success(), "recovering an empty directory");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Recovery.
    let out = run(
        root,
        &data[2],
        &["--recover", "--node-id", "3", "--peers", &group],
    );
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "recover: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("dropped members: 1, 2"), "{printed}");
    assert!(printed.contains("LOST:"), "{printed}");

    // Gateway 3 alone: every acknowledged write, and new ones.
    let alone = format!("3={}", raft[2]);
    let _g3 = start(2, &alone, &[]);
    until("the recovered gateway to serve every write", || {
        let (http, b, token) = (&http, base(2), &token);
        async move { (count_commands(http, &b, token).await == Some(acked)).then_some(()) }
    })
    .await;
    let (s, b) = post(
        &http,
        format!("{}/v1/devices/d0/commands", base(2)),
        &token,
        json!({"name": "after", "params": {}}),
    )
    .await;
    assert_eq!(s, 201, "a write after recovery: {b}");

    // Grown again: a fresh gateway 4 joins as a learner and is promoted.
    let both = format!("3={},4={}", raft[2], raft[3]);
    let _g4 = start(3, &both, &["--join"]);
    let (s, b) = post(
        &http,
        format!("{}/v1/cluster/members", base(2)),
        &token,
        json!({"id": 4, "address": raft[3].to_string(), "suffrage": "learner"}),
    )
    .await;
    assert!((200..300).contains(&s), "adding the learner: {s} {b}");
    until("the learner's promotion", || {
        let (http, b, token) = (&http, base(2), &token);
        async move {
            let (s, _) = post(
                http,
                format!("{b}/v1/cluster/members"),
                token,
                json!({"id": 4, "suffrage": "voter"}),
            )
            .await;
            (200..300).contains(&s).then_some(())
        }
    })
    .await;
    for i in 0..5 {
        let (s, b) = post(
            &http,
            format!("{}/v1/devices/d1/commands", base(i % 2 + 2)),
            &token,
            json!({"name": "grown", "params": {"i": i}}),
        )
        .await;
        assert_eq!(s, 201, "a write in the grown group: {b}");
    }
    until("gateway 4 to hold every write", || {
        let (http, b, token) = (&http, base(3), &token);
        async move { (count_commands(http, &b, token).await == Some(acked + 6)).then_some(()) }
    })
    .await;
}
