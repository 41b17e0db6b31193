//! Interoperability with MQTT clients nobody in this project wrote —
//! Eclipse Paho's Python client (paho-mqtt 2.x), rumqttc, and Eclipse
//! Mosquitto's `mosquitto_sub` / `mosquitto_pub` — each in MQTT 3.1.1 and 5,
//! through the command round trip (REST issues a command, the device gets
//! it, publishes `accepted` and `result`, REST sees it succeeded), shadow
//! sync (a desired document set over REST reaches the device, the state it
//! reports shows over REST) and refusals (a wrong password answered in the
//! CONNACK; a publish outside the device's own topics ends the connection).
//!
//! `.ci/run` installs Python's paho-mqtt and Mosquitto's clients; a test
//! whose tool is missing fails saying how to install it — none is skipped.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Device, Seen, WAIT};
use entente_protocol::{CommandMessage, ShadowDocument};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{Instant, timeout, timeout_at};

type Env = common::Single;

/// A gateway on listeners bound here, reports coalesced over 10 ms.
async fn boot(dir: &Path) -> Env {
    common::single_with(dir, common::loopback_listeners(), |c| {
        c.report_coalesce = Duration::from_millis(10);
    })
    .await
}

/// The two device listeners, with the version each test speaks on it
/// (every listener serves both).
fn versions(env: &Env) -> [(&'static str, SocketAddr); 2] {
    [
        ("3.1.1", env.gw.mqtt_addr.expect("mqtt listener")),
        ("5", env.gw.mqtt5_addr.expect("mqtt5 listener")),
    ]
}

impl Env {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            r = r.json(&body);
        }
        let r = r.send().await.expect("request");
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.expect("json")
    }

    async fn command(&self, device: &str, name: &str) -> String {
        let path = format!("/v1/devices/{device}/commands");
        let body = Some(json!({ "name": name }));
        let c = self.call(reqwest::Method::POST, &path, body).await;
        c["id"].as_str().expect("id").to_string()
    }

    async fn set_desired(&self, device: &str, patch: Value) {
        let path = format!("/v1/devices/{device}/shadow");
        let body = Some(json!({ "desired": patch }));
        self.call(reqwest::Method::PATCH, &path, body).await;
    }

    /// Polls `GET path` until `check` holds, waking on every applied change.
    async fn until(&self, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut applied = self.gw.db().watch_applied();
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.call(reqwest::Method::GET, path, None).await;
            if check(&v) {
                return v;
            }
            if !matches!(timeout_at(deadline, applied.changed()).await, Ok(Ok(()))) {
                panic!("timed out waiting for {what}; last: {v}");
            }
        }
    }

    async fn succeeded(&self, cid: &str) -> Value {
        let path = format!("/v1/commands/{cid}");
        self.until(&path, &format!("{cid} succeeded"), |c| {
            c["status"] == "succeeded"
        })
        .await
    }

    async fn reported(&self, device: &str, key: &str, value: Value) {
        let path = format!("/v1/devices/{device}/shadow");
        self.until(&path, &format!("{device} reported {key}"), |s| {
            s["reported"][key] == value
        })
        .await;
    }

    async fn acl_violations(&self) -> u64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        common::metric(&text, "entente_mqtt_acl_violations_total")
    }

    async fn acl_violations_reach(&self, n: u64) {
        let deadline = Instant::now() + WAIT;
        while self.acl_violations().await < n {
            assert!(Instant::now() < deadline, "no ACL violation counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------- paho-mqtt

/// The Python interpreter the Paho tests run: `ENTENTE_TEST_PYTHON`, else
/// `python3`.
fn python() -> String {
    std::env::var("ENTENTE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fails (never skips) when Python or paho-mqtt 2.x is missing, saying how
/// to install it.
fn require_paho() {
    let py = python();
    let check = "import sys, paho.mqtt as m; sys.exit(0 if m.__version__.startswith('2.') else 3)";
    let out = std::process::Command::new(&py).args(["-c", check]).output();
    let ok = out.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests drive the gateway with Python's paho-mqtt 2.x, which `{py}` lacks \
         ({out:?}): install it with `{py} -m pip install 'paho-mqtt>=2,<3'` (add \
         --break-system-packages on a system Python), or set ENTENTE_TEST_PYTHON to a Python \
         that has it; .ci/run installs it"
    );
}

/// Runs the Paho device script; returns its JSON lines as they come.
struct Paho {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Paho {
    fn spawn(addr: SocketAddr, device: &str, secret: &str, version: &str, mode: &str) -> Paho {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho_device.py");
        let mut child = tokio::process::Command::new(python())
            .arg(script)
            .args([&addr.ip().to_string(), &addr.port().to_string()])
            .args([device, secret, version, mode])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run the Paho device script");
        let stdout = child.stdout.take().expect("stdout");
        Paho {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The script's next line that has `key`.
    async fn line(&mut self, key: &str) -> Value {
        loop {
            let line = timeout(WAIT, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("the Paho device said nothing about {key} in time"))
                .expect("read the Paho device's output")
                .unwrap_or_else(|| panic!("the Paho device ended before {key}"));
            let v: Value = serde_json::from_str(&line).expect("a JSON line");
            assert!(v.get("error").is_none(), "the Paho device: {v}");
            if v.get(key).is_some() {
                return v;
            }
        }
    }

    async fn succeeds(mut self) {
        let status = timeout(WAIT, self.child.wait())
            .await
            .expect("the Paho device ended in time")
            .expect("its exit status");
        assert!(status.success(), "the Paho device: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_mqtt_devices_in_both_versions() {
    require_paho();
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    for (version, addr) in versions(&env) {
        let id = format!("paho-v{}", version.replace('.', ""));
        let secret = env.register(&id).await;
        // Issued before the device connects: delivered on its SUBSCRIBE.
        let first = env.command(&id, "first").await;
        let mut d = Paho::spawn(addr, &id, &secret, version, "device");
        assert_eq!(d.line("connack").await["connack"], 0, "MQTT {version}");
        assert_eq!(
            d.line("suback").await["suback"],
            json!([1, 1]),
            "MQTT {version}"
        );
        // While it is connected: pushed to it.
        env.set_desired(&id, json!({"mode": "eco"})).await;
        let second = env.command(&id, "second").await;
        let desired = d.line("desired").await;
        assert_eq!(desired["desired"], json!({"mode": "eco"}), "MQTT {version}");
        d.line("done").await;
        d.succeeds().await;
        for cid in [&first, &second] {
            let c = env.succeeded(cid).await;
            assert_eq!(c["output"], json!({"by": "paho"}), "MQTT {version}");
        }
        env.reported(&id, "mode", json!("eco")).await;

        // A wrong password: refused in the CONNACK (3.1.1: return code 4,
        // which paho-mqtt 2 reports as MQTT 5's 0x86 = 134; MQTT 5: 0x86).
        let mut bad = Paho::spawn(addr, &id, "wrong", version, "badpass");
        let refused = bad.line("connack").await;
        assert_eq!(refused["connack"], 134, "MQTT {version}: {refused}");
        bad.succeeds().await;

        // Another device's topic: the connection ends (MQTT 5: 0x87).
        let before = env.acl_violations().await;
        let mut acl = Paho::spawn(addr, &id, &secret, version, "acl");
        assert_eq!(acl.line("connack").await["connack"], 0);
        let ended = acl.line("disconnect").await;
        if version == "5" {
            assert_eq!(ended["disconnect"], 135, "MQTT 5 is told: not authorized");
        } else {
            assert_ne!(ended["disconnect"], 0, "MQTT 3.1.1: the connection is lost");
        }
        acl.succeeds().await;
        env.acl_violations_reach(before + 1).await;
    }
    env.gw.stop().await;
}

// ------------------------------------------------------------------ rumqttc

/// rumqttc's async clients (v4 = MQTT 3.1.1, v5), as devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_devices_in_both_versions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    for (version, addr) in versions(&env) {
        let v5 = version == "5";
        let id = format!("rumqttc-v{}", if v5 { 5 } else { 4 });
        let connect = |secret: &str| {
            if v5 {
                common::connect_v5(addr, &id, secret)
            } else {
                common::connect_v4(addr, &id, &id, secret)
            }
        };
        let secret = env.register(&id).await;
        let first = env.command(&id, "first").await;
        let mut d = connect(&secret);
        d.expect_connack().await;
        d.subscribed(&entente_protocol::commands_topic(&id)).await;
        d.subscribed(&entente_protocol::desired_topic(&id)).await;
        assert_eq!(answer(&mut d, &id).await, first, "MQTT {version}");
        env.set_desired(&id, json!({"mode": "eco"})).await;
        let desired = loop {
            let doc: ShadowDocument =
                serde_json::from_slice(&d.message(&entente_protocol::desired_topic(&id)).await)
                    .expect("a desired document");
            if doc.state != json!({}) {
                break doc;
            }
        };
        assert_eq!(desired.state, json!({"mode": "eco"}), "MQTT {version}");
        d.publish(
            &entente_protocol::reported_topic(&id),
            serde_json::to_vec(&desired.state).expect("json"),
        )
        .await;
        let second = env.command(&id, "second").await;
        assert_eq!(answer(&mut d, &id).await, second, "MQTT {version}");
        for cid in [&first, &second] {
            let c = env.succeeded(cid).await;
            assert_eq!(c["output"], json!({"by": "rumqttc"}), "MQTT {version}");
        }
        env.reported(&id, "mode", json!("eco")).await;
        d.disconnect().await;

        let mut bad = connect("wrong");
        let refused = bad.expect_closed().await;
        assert!(
            refused.contains("BadUserNamePassword"),
            "MQTT {version}: {refused}"
        );

        let before = env.acl_violations().await;
        let mut d = connect(&secret);
        d.expect_connack().await;
        d.publish("devices/someone-else/shadow/reported", b"{}".to_vec())
            .await;
        let ended = d.expect_closed().await;
        if v5 {
            assert_eq!(ended, "DISCONNECT 0x87");
        }
        env.acl_violations_reach(before + 1).await;
    }
    env.gw.stop().await;
}

/// Answers the next command: `accepted`, then `result` succeeded; its id.
async fn answer(d: &mut Device, id: &str) -> String {
    let msg: CommandMessage =
        serde_json::from_slice(&d.message(&entente_protocol::commands_topic(id)).await)
            .expect("a command");
    d.publish(
        &entente_protocol::accepted_topic(id, &msg.id),
        b"{}".to_vec(),
    )
    .await;
    let result = json!({"status": "succeeded", "output": {"by": "rumqttc"}});
    d.publish(
        &entente_protocol::result_topic(id, &msg.id),
        serde_json::to_vec(&result).expect("json"),
    )
    .await;
    // Both acknowledged before the next step.
    let mut acks = 0;
    while acks < 2 {
        match d.next().await {
            Seen::PubAck(_) => acks += 1,
            Seen::Closed(e) => panic!("closed: {e}"),
            _ => {}
        }
    }
    msg.id
}

// ---------------------------------------------------------------- Mosquitto

/// Runs a Mosquitto client to its end (bounded); its output.
async fn mosquitto(program: &str, args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    timeout(WAIT, run)
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish in time"))
        .unwrap_or_else(|e| {
            panic!(
                "{program}: {e} (install Mosquitto's clients: apt-get install mosquitto-clients)"
            )
        })
}

/// Eclipse Mosquitto's `mosquitto_sub` / `mosquitto_pub` as devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_in_both_versions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    for (version, addr) in versions(&env) {
        let v = if version == "5" { "mqttv5" } else { "mqttv311" };
        let id = format!("mosq-{v}");
        let secret = env.register(&id).await;
        let port = addr.port().to_string();
        let login = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            v,
            "-q",
            "1",
            "-i",
            &id,
            "-u",
            &id,
        ];
        let with = |password: &str, rest: &[&str]| -> Vec<String> {
            login
                .iter()
                .chain(["-P", password].iter())
                .chain(rest.iter())
                .map(ToString::to_string)
                .collect()
        };
        let run = |program: &'static str, args: Vec<String>| async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mosquitto(program, &args).await
        };

        // The command round trip.
        let cid = env.command(&id, "blink").await;
        let commands = entente_protocol::commands_topic(&id);
        let out = run(
            "mosquitto_sub",
            with(&secret, &["-t", &commands, "-C", "1", "-W", "30"]),
        )
        .await;
        assert!(out.status.success(), "{v}: {out:?}");
        let msg: CommandMessage = serde_json::from_slice(&out.stdout).expect("a command");
        assert_eq!(msg.id, cid, "{v}");
        for (topic, body) in [
            (
                entente_protocol::accepted_topic(&id, &cid),
                "{}".to_string(),
            ),
            (
                entente_protocol::result_topic(&id, &cid),
                json!({"status": "succeeded", "output": {"by": "mosquitto"}}).to_string(),
            ),
        ] {
            let out = run("mosquitto_pub", with(&secret, &["-t", &topic, "-m", &body])).await;
            assert!(out.status.success(), "{v}: {out:?}");
        }
        let c = env.succeeded(&cid).await;
        assert_eq!(c["output"], json!({"by": "mosquitto"}), "{v}");

        // Shadow sync: the desired document set over REST arrives, the
        // reported state shows over REST.
        env.set_desired(&id, json!({"mode": "eco"})).await;
        let desired = entente_protocol::desired_topic(&id);
        let out = run(
            "mosquitto_sub",
            with(&secret, &["-t", &desired, "-C", "1", "-W", "30"]),
        )
        .await;
        assert!(out.status.success(), "{v}: {out:?}");
        let doc: ShadowDocument = serde_json::from_slice(&out.stdout).expect("a document");
        assert_eq!(doc.state, json!({"mode": "eco"}), "{v}");
        let reported = entente_protocol::reported_topic(&id);
        let out = run(
            "mosquitto_pub",
            with(&secret, &["-t", &reported, "-m", r#"{"mode": "eco"}"#]),
        )
        .await;
        assert!(out.status.success(), "{v}: {out:?}");
        env.reported(&id, "mode", json!("eco")).await;

        // Refusals: a wrong password; another device's topic.
        let out = run(
            "mosquitto_pub",
            with("wrong", &["-t", &reported, "-m", "{}"]),
        )
        .await;
        assert!(!out.status.success(), "{v}: a wrong password is refused");
        let before = env.acl_violations().await;
        let other = entente_protocol::reported_topic("someone-else");
        let _ = run("mosquitto_pub", with(&secret, &["-t", &other, "-m", "{}"])).await;
        env.acl_violations_reach(before + 1).await;
    }
    env.gw.stop().await;
}
