//! The real `gateway` binary: what it acknowledged before a clean stop or a
//! SIGKILL is all there after a restart on the same data directory, and
//! nothing is applied twice (the command count is exact).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

struct Gw {
    child: Child,
    base: String,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path) -> Gw {
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--raft-listen",
            "127.0.0.1:0",
            "--tick-ms",
            "5",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start gateway");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut base = None;
    for line in out.by_ref() {
        let line = line.expect("stdout line");
        if let Some(rest) = line.split("REST on ").nth(1) {
            base = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    // Keep draining what it prints.
    std::thread::spawn(move || out.for_each(drop));
    Gw {
        child,
        base: base.expect("the gateway prints its REST address"),
    }
}

fn token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("admin-token"))
        .expect("admin token file")
        .trim()
        .to_string()
}

async fn count_commands(http: &reqwest::Client, base: &str, token: &str) -> usize {
    let mut n = 0;
    for d in 0..5 {
        let r: Value = http
            .get(format!("{base}/v1/devices/d{d}/commands?limit=1000"))
            .bearer_auth(token)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        n += r["items"].as_array().map_or(0, Vec::len);
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_clean_stop_and_sigkill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let http = reqwest::Client::new();

    let mut gw = spawn(dir);
    let t = token(dir);
    for d in 0..5 {
        let r = http
            .post(format!("{}/v1/devices", gw.base))
            .bearer_auth(&t)
            .json(&json!({"id": format!("d{d}")}))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), 201);
    }
    let mut acked = 0;
    for i in 0..40 {
        let r = http
            .post(format!("{}/v1/devices/d{}/commands", gw.base, i % 5))
            .bearer_auth(&t)
            .json(&json!({"name": "n", "params": {"i": i}}))
            .send()
            .await
            .expect("command");
        assert_eq!(r.status(), 201);
        acked += 1;
    }
    let r = http
        .patch(format!("{}/v1/devices/d0/shadow", gw.base))
        .bearer_auth(&t)
        .json(&json!({"desired": {"speed": 3}}))
        .send()
        .await
        .expect("shadow");
    assert!(r.status().is_success());

    // Clean stop (SIGINT), restart.
    #[cfg(unix)]
    {
        let pid = gw.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .expect("kill -INT")
                .success()
        );
        let status = gw.child.wait().expect("wait");
        assert!(status.success(), "a clean stop exits 0, got {status}");
    }
    drop(gw);
    gw = spawn(dir);
    assert_eq!(token(dir), t, "the admin token is created once");
    assert_eq!(count_commands(&http, &gw.base, &t).await, acked);

    // More writes, then SIGKILL with no warning, restart.
    for i in 0..40 {
        let r = http
            .post(format!("{}/v1/devices/d{}/commands", gw.base, i % 5))
            .bearer_auth(&t)
            .json(&json!({"name": "m", "params": {"i": i}, "idempotency_key": format!("k{i}")}))
            .send()
            .await
            .expect("command");
        assert_eq!(r.status(), 201);
        acked += 1;
    }
    gw.child.kill().expect("SIGKILL");
    gw.child.wait().expect("reap");
    drop(gw);
    let gw = spawn(dir);
    assert_eq!(
        count_commands(&http, &gw.base, &t).await,
        acked,
        "every acknowledged command, exactly once"
    );
    let shadow: Value = http
        .get(format!("{}/v1/devices/d0/shadow", gw.base))
        .bearer_auth(&t)
        .send()
        .await
        .expect("shadow")
        .json()
        .await
        .expect("json");
    assert_eq!(shadow["desired"], json!({"speed": 3}));
    // An idempotency key used before the crash still returns the first command.
    let r = http
        .post(format!("{}/v1/devices/d0/commands", gw.base))
        .bearer_auth(&t)
        .json(&json!({"name": "m", "idempotency_key": "k0"}))
        .send()
        .await
        .expect("repeat");
    assert_eq!(r.status(), 200);
    assert_eq!(count_commands(&http, &gw.base, &t).await, acked);
}
