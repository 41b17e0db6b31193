//! The real `gateway` binary run out of file descriptors by device
//! connections: the MQTT accept loop backs off instead of spinning (the
//! finding: one accept in that state logged ~600,000 errors a second), its
//! log stays small, and once descriptors are free again devices log in and
//! health is fine.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::metric;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

struct Gw {
    child: Child,
    base: String,
    mqtt: SocketAddr,
    /// What it printed after its addresses (its log), once it exits.
    rest: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway under a hard limit of `nofile` descriptors (a shell sets it
/// before exec; the gateway can only raise its soft limit up to it).
fn spawn(dir: &Path, nofile: u32) -> Gw {
    let cmd = format!(
        "ulimit -n {nofile} && exec \"$0\" --data-dir \"$1\" --http-listen 127.0.0.1:0 \
         --raft-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --mqtt5-listen 127.0.0.1:0 \
         --mqtt-max-connections 100000"
    );
    let mut child = Command::new("sh")
        .args(["-c", &cmd, BIN])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start gateway");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut base, mut mqtt) = (None, None);
    for line in out.by_ref() {
        let line = line.expect("stdout line");
        if let Some(rest) = line.split("REST on ").nth(1) {
            base = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = line.split(") on ").nth(1) {
            mqtt = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            break;
        }
    }
    let rest = std::thread::spawn(move || {
        let mut log = String::new();
        for line in out.map_while(Result::ok) {
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    Gw {
        child,
        base: base.expect("the gateway prints its REST address"),
        mqtt: mqtt.expect("the gateway prints its device listeners"),
        rest: Some(rest),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_mqtt_accept_loop_backs_off_and_recovers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut gw = spawn(tmp.path(), 256);
    let token = std::fs::read_to_string(tmp.path().join("admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let secret = {
        let r: serde_json::Value = http
            .post(format!("{}/v1/devices", gw.base))
            .bearer_auth(&token)
            .json(&serde_json::json!({"id": "after"}))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("json");
        r["secret"].as_str().expect("secret").to_string()
    };

    // More connections than the gateway has descriptors: it runs out, and
    // the rest wait in its listen backlog while its accepts fail.
    let mut held = Vec::new();
    for _ in 0..400 {
        match tokio::net::TcpStream::connect(gw.mqtt).await {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    assert!(
        held.len() > 256,
        "only {} connections were made",
        held.len()
    );
    // Out of descriptors for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Free them: the gateway's side of each closes when it reads the end.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let r = http
            .get(format!("{}/metrics", gw.base))
            .bearer_auth(&token)
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => break r.text().await.expect("metrics"),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("no metrics after the flood: {other:?}"),
        }
    };
    let errors = metric(&metrics, "entente_mqtt_accept_errors_total");
    assert!(
        errors >= 1,
        "the gateway never ran out of descriptors:\n{metrics}"
    );
    assert!(
        errors <= 60,
        "{errors} accept errors in about 3 s: the accept loop does not back off"
    );
    assert_eq!(metric(&metrics, "entente_mqtt_listeners_down"), 0);

    // Devices log in again, and health is fine.
    let mut opts = rumqttc::MqttOptions::new("after", gw.mqtt.ip().to_string(), gw.mqtt.port());
    opts.set_credentials("after", &secret);
    let (_client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    let connack = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => return Ok(a),
                Ok(_) => {}
                Err(e) => {
                    // Descriptors may still be coming back: try again.
                    if Instant::now() > deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await
    .expect("a login in time")
    .expect("a login");
    assert_eq!(connack.code, rumqttc::ConnectReturnCode::Success);
    let health = http
        .get(format!("{}/healthz", gw.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    let _ = gw.child.kill();
    let _ = gw.child.wait();
    let log = gw.rest.take().expect("log").join().expect("log");
    let accept_lines = log.matches("accepting an MQTT connection").count();
    assert!(
        (1..=10).contains(&accept_lines),
        "{accept_lines} log lines about accept errors (at most one a second):\n{log}"
    );
}
