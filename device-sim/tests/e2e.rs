//! The simulator against an in-process gateway: `gateway::start` with
//! port-0 listeners in a temp dir, devices registered over REST, a fleet
//! connected over MQTT, commands issued and followed to their results.
//! Waits are on events (SUBACKs, the event stream, long-polls), never on
//! sleeps.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use device_sim::bench::{self, ApiMode, BenchConfig};
use device_sim::creds::{Credentials, Provision, provision};
use device_sim::fleet::{Fleet, FleetConfig};
use device_sim::ingest::{self, IngestClient, IngestConfig};
use device_sim::mqtt::{BrokerAddr, Protocol};
use device_sim::rest::Api;
use device_sim::sse::SseReader;
use gateway::{Config, Gateway};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

struct Env {
    gw: Gateway,
    api: Api,
}

async fn boot(dir: &Path) -> Env {
    let mut config = Config::single(
        dir.join("gw"),
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    );
    config.tick = Duration::from_millis(5);
    config.report_coalesce = Duration::from_millis(20);
    let gw = gateway::start(config).await.expect("start");
    let file = gw.admin_token_file.clone().expect("admin token file");
    let token = std::fs::read_to_string(file).expect("token");
    let api = Api::new(
        &[format!("http://{}", gw.http_addr)],
        Some(token.trim().to_string()),
        Duration::from_secs(10),
        64,
    )
    .expect("api");
    Env { gw, api }
}

fn broker(addr: Option<SocketAddr>) -> BrokerAddr {
    let a = addr.expect("MQTT listener");
    BrokerAddr {
        host: a.ip().to_string(),
        port: a.port(),
    }
}

/// `count` new devices named `prefix` and an index, registered over REST.
async fn fresh(api: &Api, prefix: &str, count: usize) -> Vec<Credentials> {
    let p = Provision {
        prefix,
        count,
        file: None,
        rotate_existing: false,
        concurrency: 16,
    };
    provision(Some(api), &p).await.expect("register")
}

async fn status(api: &Api, cid: &str) -> String {
    api.command(cid, Some(WAIT)).await.expect("command")["status"]
        .as_str()
        .expect("status")
        .to_string()
}

/// Whether `secret` is what the gateway holds for device `id`.
async fn holds_secret(gw: &Gateway, id: &str, secret: &str) -> bool {
    let creds = gw
        .db()
        .device_credentials(id)
        .await
        .expect("read")
        .unwrap_or_else(|| panic!("{id} is not registered"));
    creds.secret_hash == gateway::hash_secret(secret)
}

/// A fleet is registered in batches of 1,000, one log entry each (2,500
/// devices: three entries, not 2,500); a batch that meets devices already
/// registered is registered one device at a time instead, which finds the
/// taken ones and, when asked, gives them new secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_is_registered_in_batches_of_a_thousand() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let before = env.gw.db().applied_index();
    let p = Provision {
        prefix: "b-",
        count: 2500,
        file: None,
        rotate_existing: false,
        concurrency: 16,
    };
    let creds = provision(Some(&env.api), &p).await.expect("register");
    assert_eq!(creds.len(), 2500);
    assert_eq!(env.gw.db().applied_index(), before + 3, "three entries");
    for i in [0, 999, 1000, 2499] {
        assert_eq!(creds[i].id, format!("b-{i:06}"));
        assert!(holds_secret(&env.gw, &creds[i].id, &creds[i].secret).await);
    }

    // One of the next fleet is registered already, its secret unknown.
    use device_sim::rest::Registration;
    let early = env.api.register("r-000003").await.expect("register one");
    assert!(matches!(early, Registration::Created(_)), "{early:?}");
    let p = Provision {
        prefix: "r-",
        count: 10,
        rotate_existing: true,
        ..p
    };
    let creds = provision(Some(&env.api), &p).await.expect("register");
    assert_eq!(creds.len(), 10);
    for c in &creds {
        assert!(holds_secret(&env.gw, &c.id, &c.secret).await, "{}", c.id);
    }
    env.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_answers_commands_failures_and_offline_queues() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let devices_file = tmp.path().join("devices.json");
    let p = Provision {
        prefix: "e2e-",
        count: 50,
        file: Some(&devices_file),
        rotate_existing: false,
        concurrency: 16,
    };
    let creds = provision(Some(&env.api), &p).await.expect("register");
    assert_eq!(creds.len(), 50);
    // A second provisioning reads the secrets back instead of failing on 409.
    assert_eq!(
        provision(Some(&env.api), &p).await.expect("from file"),
        creds
    );
    let taken = Provision {
        file: None,
        ..p.clone()
    };
    let err = provision(Some(&env.api), &taken)
        .await
        .expect_err("registered, secret unknown");
    assert!(err.to_string().contains("already registered"), "{err}");

    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let mut config = FleetConfig::new(vec![broker(env.gw.mqtt_addr)]);
    config.behaviour.result_delay = Duration::from_millis(1);
    config.keep_alive = Duration::from_secs(5);
    config.seed = 7;
    config.observer = Some(seen_tx);
    let fleet = Fleet::start(config, &creds).expect("fleet");
    fleet
        .wait_subscribed(50, WAIT)
        .await
        .expect("all subscribed");

    // A few hundred commands through the benchmark, all succeeded.
    let ids: Vec<String> = creds.iter().map(|c| c.id.clone()).collect();
    let cfg = BenchConfig {
        rate: 300.0,
        duration: Duration::from_secs(1),
        // Room for every command at once, and all the time needed: the
        // assertions below must not depend on how busy the machine is.
        concurrency: 300,
        api_mode: ApiMode::Spread,
        drain: WAIT,
        send_grace: WAIT,
        command_name: "e2e".into(),
        ttl_ms: None,
        progress: false,
    };
    let report = bench::run(&cfg, &env.api, &ids, seen_rx)
        .await
        .expect("bench");
    assert_eq!(report.planned, 300);
    assert_eq!(
        (
            report.sent,
            report.accepted,
            report.completed,
            report.succeeded
        ),
        (300, 300, 300, 300),
        "{}",
        report.table()
    );
    assert!(report.errors.is_empty(), "{}", report.table());
    assert_eq!(report.rest_accepted.count, 300);
    assert_eq!(report.device_received.count, 300);
    assert_eq!(report.result_committed.count, 300);
    // The gateway agrees: every command of every device succeeded.
    let mut total = 0;
    for id in &ids {
        for c in env.api.device_commands(id).await.expect("list") {
            assert_eq!(c["status"], json!("succeeded"), "{c}");
            total += 1;
        }
    }
    assert_eq!(total, 300);

    // A forced failure.
    let cid = env
        .api
        .issue_command(
            0,
            &ids[3],
            &json!({"name": "boom", "params": {"fail": true}}),
        )
        .await
        .expect("issue");
    assert_eq!(status(&env.api, &cid).await, "failed");
    let failed = env.api.command(&cid, None).await.expect("command");
    assert_eq!(failed["output"], json!({"error": "simulated failure"}));

    // A device taken offline gets its queued commands when it is back.
    fleet.disconnect(7).await.expect("disconnect");
    let mut queued = Vec::new();
    for n in 0..3 {
        let cid = env
            .api
            .issue_command(0, &ids[7], &json!({"name": "later", "params": {"n": n}}))
            .await
            .expect("issue");
        queued.push(cid);
    }
    for cid in &queued {
        let c = env.api.command(cid, None).await.expect("command");
        let s = c["status"].as_str().unwrap_or_default();
        assert!(s == "queued" || s == "sent", "{c}");
    }
    fleet.connect(7).await.expect("reconnect");
    for cid in &queued {
        assert_eq!(status(&env.api, cid).await, "succeeded");
    }
    let snap = fleet.stats().snapshot();
    assert!(snap.results_succeeded >= 303, "{snap:?}");
    assert_eq!(snap.results_failed, 1);
    fleet.stop(Duration::from_secs(2)).await;
    env.gw.stop().await;
}

/// Waits on the event stream (read from its start) until `device`'s
/// reported state holds `want`. The events carry the patches; the state is
/// their composition.
async fn reported(events: &mut SseReader, device: &str, want: &Value) {
    let mut state = json!({});
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = events.next().await.expect("stream").expect("open");
            if ev.event != "shadow.reported" {
                continue;
            }
            let data: Value = serde_json::from_str(&ev.data).expect("json");
            if data["device"] != json!(device) {
                continue;
            }
            entente_protocol::merge_patch(&mut state, &data["patch"]);
            if device_sim::device::covers(Some(&state), want) {
                return;
            }
        }
    })
    .await
    .expect("reported state converged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_devices_fail_over_apply_desired_state_and_ingest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let p = Provision {
        prefix: "v5-",
        count: 4,
        file: None,
        rotate_existing: false,
        concurrency: 4,
    };
    let creds = provision(Some(&env.api), &p).await.expect("register");
    // The first address refuses connections: devices starting there move on
    // to the next gateway in the list.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut config = FleetConfig::new(vec![broker(Some(dead)), broker(env.gw.mqtt5_addr)]);
    config.protocol = Protocol::V5;
    config.keep_alive = Duration::from_secs(5);
    config.backoff_max = Duration::from_millis(200);
    let fleet = Fleet::start(config, &creds).expect("fleet");
    fleet
        .wait_subscribed(4, WAIT)
        .await
        .expect("all subscribed");
    assert!(fleet.stats().snapshot().connect_errors >= 2);

    let mut events = SseReader::new(env.api.events(0, Some(0)).await.expect("events"));
    let want = json!({"mode": "eco", "limits": {"max": 7}});
    let http = reqwest::Client::new();
    let token =
        std::fs::read_to_string(env.gw.admin_token_file.clone().expect("file")).expect("token");
    let r = http
        .patch(format!(
            "{}/v1/devices/{}/shadow",
            env.api.bases()[0],
            creds[1].id
        ))
        .bearer_auth(token.trim())
        .json(&json!({ "desired": want }))
        .send()
        .await
        .expect("patch");
    assert!(r.status().is_success(), "{}", r.status());
    reported(&mut events, &creds[1].id, &want).await;
    fleet.stop(Duration::from_secs(2)).await;

    // Ingest: the same devices publish reported state as fast as acknowledged.
    let cfg = IngestConfig {
        brokers: vec![broker(env.gw.mqtt_addr)],
        protocol: Protocol::V4,
        inflight: 4,
        rate: None,
        duration: Duration::from_secs(1),
        payload_bytes: 100,
        connect_concurrency: 4,
        connect_timeout: WAIT,
        attempt_timeout: Duration::from_secs(5),
        keep_alive: Duration::from_secs(5),
        progress: false,
        seed: 1,
        tls: None,
    };
    let clients: Vec<IngestClient> = creds
        .iter()
        .map(|c| IngestClient {
            id: c.id.clone(),
            secret: Some(c.secret.clone()),
        })
        .collect();
    let report = ingest::run(&cfg, &clients).await.expect("ingest");
    assert_eq!(report.connected, 4);
    assert!(report.acked > 0, "{}", report.table());
    assert_eq!(report.latency.count, report.acked);
    assert!(report.errors.is_empty(), "{}", report.table());
    env.gw.stop().await;
}

/// A job over a fleet that fails its commands is aborted by its abort rule,
/// and one over a fleet that answers them completes; `job::follow` follows
/// both to their end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_fleet_trips_a_jobs_abort_rule_and_a_healthy_one_completes_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let mut fleets = Vec::new();
    for (prefix, failure_rate) in [("bad-", 1.0), ("good-", 0.0)] {
        let creds = fresh(&env.api, prefix, 40).await;
        let mut config = FleetConfig::new(vec![broker(env.gw.mqtt_addr)]);
        config.behaviour.result_delay = Duration::from_millis(1);
        config.behaviour.failure_rate = failure_rate;
        config.seed = 11;
        let fleet = Fleet::start(config, &creds).expect("fleet");
        fleet.wait_subscribed(40, WAIT).await.expect("subscribed");
        let ids: Vec<String> = creds.iter().map(|c| c.id.clone()).collect();
        fleets.push((fleet, ids));
    }
    let job = |ids: &[String]| {
        json!({
            "command": {"name": "update"},
            "target": {"devices": ids},
            "rollout": {"max_per_minute": 600000, "max_in_flight": 4},
            "abort": {"failure_percent": 20, "min_finished": 8},
        })
    };
    let bad = env.api.create_job(&job(&fleets[0].1)).await.expect("job");
    let good = env.api.create_job(&job(&fleets[1].1)).await.expect("job");
    let every = Duration::from_millis(50);
    let bad = tokio::time::timeout(
        WAIT,
        device_sim::job::follow(&env.api, bad["id"].as_str().expect("id"), every),
    )
    .await
    .expect("the failing job ended")
    .expect("job");
    assert_eq!(bad["state"], "aborted", "{bad}");
    // At most min_finished plus what was in flight ran before the abort.
    let launched = bad["launched"].as_u64().expect("launched");
    assert!((8..=8 + 4).contains(&launched), "{bad}");
    assert_eq!(bad["counts"]["succeeded"], 0, "{bad}");
    assert_eq!(bad["counts"]["canceled"], 40 - launched, "{bad}");
    let good = tokio::time::timeout(
        WAIT,
        device_sim::job::follow(&env.api, good["id"].as_str().expect("id"), every),
    )
    .await
    .expect("the healthy job ended")
    .expect("job");
    assert_eq!(good["state"], "completed", "{good}");
    assert_eq!(good["counts"]["succeeded"], 40, "{good}");
    for (fleet, _) in fleets {
        fleet.stop(Duration::from_secs(2)).await;
    }
}

/// `bench` starts only once the gateway is idle: after a fleet connected,
/// `settle` returns once the gateway's log and CPU are still; while writes
/// keep the log moving it does not settle, and says so. (The CPU rule is
/// checked against canned metrics in `rest.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_settles_after_a_fleet_connects_and_not_under_load() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let creds = fresh(&env.api, "settle-", 200).await;
    let config = FleetConfig::new(vec![broker(env.gw.mqtt_addr)]);
    let fleet = Fleet::start(config, &creds).expect("fleet");
    fleet
        .wait_subscribed(creds.len(), WAIT)
        .await
        .expect("all subscribed");
    env.api
        .settle(Duration::from_millis(200), WAIT)
        .await
        .expect("an idle gateway settles");

    // Under a steady stream of writes the log never stays still.
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let api = env.api.clone();
    let device = creds[0].id.clone();
    let load = tokio::spawn(async move {
        let body = json!({ "name": "load" });
        let mut issued = 0u64;
        while !*stop.borrow_and_update() {
            if api.issue_command(0, &device, &body).await.is_ok() {
                issued += 1;
            }
        }
        issued
    });
    // (A window of a whole second: a loaded machine may pause the writer
    // for a fraction of one.)
    let err = env
        .api
        .settle(Duration::from_secs(1), Duration::from_secs(3))
        .await
        .expect_err("no settling under load");
    assert!(err.to_string().contains("did not settle"), "{err:#}");
    stop_tx.send(true).expect("stop");
    assert!(load.await.expect("load") > 0, "the load issued commands");
    fleet.stop(Duration::from_secs(2)).await;
}

/// `run` reports when the gateway was idle again after the fleet connected,
/// and the CPU the gateway spent on the connect (here the gateway runs in
/// this process, so that CPU includes the simulator's: the wiring is what
/// is checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reports_when_the_gateway_was_idle_again_and_its_cpu() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let creds = fresh(&env.api, "idle-", 50).await;
    let options = device_sim::run::RunOptions {
        connect_timeout: WAIT,
        settle: Duration::ZERO,
        status: false,
    };
    let config = FleetConfig::new(vec![broker(env.gw.mqtt_addr)]);
    let report = device_sim::run::run(config, &creds, Some(&env.api), &options, async {})
        .await
        .expect("run");
    assert_eq!(report.connected, 50);
    let idle = report.gateway_idle_after_secs.expect("the gateway settled");
    assert!(idle >= 0.3, "at least the quiet window: {idle}");
    let cpu = report.gateway_connect_cpu_secs.expect("CPU read");
    assert!(cpu > 0.0, "{cpu}");
    assert!(report.table().contains("idle"), "{}", report.table());
}
