//! What an idle connected device costs the gateway's heap: `gateway::start`
//! with port-0 listeners in this process, whose allocations the allocator's
//! statistics add up, and devices on real sockets (blocking std sockets,
//! which cost this process no heap) that connect, subscribe and then say
//! nothing.
//!
//! The figure is the heap the gateway holds per session once every device
//! is online and the gateway is quiet again — its connection task, presence
//! task, delivery queue, registry and session entries. It is what the
//! benchmark's resident memory per idle device is made of (less the
//! allocator's own overhead), counted exactly rather than read from the
//! process's resident size.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use gateway::Config;
use rumqttc::mqttbytes::{QoS, v4};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;

/// The gateway's allocator (see its `main.rs`), whose statistics count the
/// bytes this process holds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Devices connected for the measurement: enough that what every session
/// holds outweighs what the gateway allocates meanwhile for itself.
const DEVICES: usize = 300;

/// The most heap an idle connected device may hold in the gateway. In a
/// debug build it holds about 4.4 KiB: its connection task (a ~1.3 KiB
/// future), presence task, delivery queue, registry, session and login
/// cache entries, its filters. It held about 14 KiB while the connection
/// task carried the TLS and closing states unboxed (10 KiB) and an idle
/// connection kept a 4 KiB read buffer.
const BUDGET_PER_DEVICE: isize = 6 * 1024;

/// Bytes allocated in this process now (jemalloc's `stats.allocated`).
fn live() -> isize {
    tikv_jemalloc_ctl::epoch::advance().expect("jemalloc statistics");
    let n = tikv_jemalloc_ctl::stats::allocated::read().expect("jemalloc statistics");
    isize::try_from(n).expect("allocated bytes")
}

/// An idle device on a blocking socket: CONNECT (clean session 0, as the
/// simulator's devices), CONNACK, SUBSCRIBE to its commands, SUBACK.
fn connect_idle(addr: SocketAddr, id: &str, secret: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(common::WAIT)).expect("timeout");
    let mut out = BytesMut::new();
    let mut c = v4::Connect::new(id);
    c.set_login(id, secret);
    c.keep_alive = 60;
    c.clean_session = false;
    c.write(&mut out).expect("encode");
    v4::Subscribe::new(entente_protocol::commands_topic(id), QoS::AtLeastOnce)
        .write(&mut out)
        .expect("encode");
    s.write_all(&out).expect("write");
    // CONNACK (4 bytes), then SUBACK (5 bytes).
    let mut answer = [0u8; 9];
    s.read_exact(&mut answer).expect("CONNACK and SUBACK");
    assert_eq!(answer[..4], [0x20, 2, 0, 0], "CONNACK accepted for {id}");
    assert_eq!(answer[4], 0x90, "SUBACK for {id}");
    assert_eq!(answer[8], 1, "commands granted at QoS 1 for {id}");
    s
}

/// Polls until `done`, at most `limit`.
async fn until<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "not done within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The heap, once it stopped moving (the gateway's last proposals applied,
/// their tasks ended): sampled until two samples 200 ms apart differ by
/// less than a device's budget, for at most 10 s.
async fn settled_heap() -> isize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = live();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = live();
        if (now - last).abs() < BUDGET_PER_DEVICE || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Registers `n` devices named `{prefix}-NNNN`; their ids and secrets.
async fn register(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    prefix: &str,
    n: usize,
) -> Vec<(String, String)> {
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i:04}");
        let r = http
            .post(format!("{base}/v1/devices"))
            .bearer_auth(token)
            .json(&json!({ "id": id }))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.expect("json");
        let secret = body["secret"].as_str().expect("secret").to_string();
        devices.push((id, secret));
    }
    devices
}

/// Connects `devices` (on a blocking thread), each as [`connect_idle`].
async fn connect_all(mqtt: SocketAddr, devices: Vec<(String, String)>) -> Vec<TcpStream> {
    tokio::task::spawn_blocking(move || {
        let mut sockets = Vec::with_capacity(devices.len());
        for (id, secret) in &devices {
            sockets.push(connect_idle(mqtt, id, secret));
        }
        sockets
    })
    .await
    .expect("devices")
}

/// Whether every device in `ids` is online (or every one offline) in the
/// gateway's state.
async fn all(db: &gateway::state::StateDb, ids: &[String], online: bool) -> bool {
    for id in ids {
        let d = db.device(id).await.expect("read").expect("registered");
        if d.online != online {
            return false;
        }
    }
    true
}

/// Set in the child process that measures.
const CHILD: &str = "ENTENTE_MEMORY_TEST_CHILD";

/// jemalloc's statistics count what its per-thread caches hold as
/// allocated, and a cache keeps what was freed on its thread for reuse: so
/// the measurement runs in a child process of this test binary with the
/// caches off, where the statistics are exact.
#[test]
fn an_idle_connected_device_costs_the_gateway_little_heap() {
    if std::env::var_os(CHILD).is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(measure());
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "an_idle_connected_device_costs_the_gateway_little_heap",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("_RJEM_MALLOC_CONF", "tcache:false")
        .status()
        .expect("run the measurement");
    assert!(status.success(), "the measurement failed: {status}");
}

async fn measure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::single(
        dir.path().to_path_buf(),
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    );
    let gw = gateway::start(config).await.expect("start");
    let mqtt = gw.mqtt_addr.expect("mqtt listener");
    let token = std::fs::read_to_string(gw.admin_token_file.clone().expect("token file"))
        .expect("token")
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let base = format!("http://{}", gw.http_addr);
    let warm = register(&http, &base, &token, "warm", DEVICES).await;
    let devices = register(&http, &base, &token, "mem", DEVICES).await;
    drop(http);
    let db = gw.db().clone();

    // A first fleet connects and leaves: what the gateway sizes once or
    // caches within bounds (its maps' first growth, the state database's
    // page cache, the event buffers, the runtime's threads) is then in
    // place, and not counted against the devices measured.
    let warm_ids: Vec<String> = warm.iter().map(|(id, _)| id.clone()).collect();
    let sockets = connect_all(mqtt, warm).await;
    until(common::WAIT, || all(&db, &warm_ids, true)).await;
    drop(sockets);
    until(common::WAIT, || all(&db, &warm_ids, false)).await;

    let ids: Vec<String> = devices.iter().map(|(id, _)| id.clone()).collect();
    let before = settled_heap().await;
    let sockets = connect_all(mqtt, devices).await;
    until(common::WAIT, || all(&db, &ids, true)).await;
    let after = settled_heap().await;

    let per_device = (after - before) / DEVICES as isize;
    eprintln!(
        "gateway heap per idle connected device: {per_device} bytes ({before} -> {after} for {DEVICES} devices)"
    );
    assert!(
        per_device <= BUDGET_PER_DEVICE,
        "an idle connected device holds {per_device} bytes of heap; at most {BUDGET_PER_DEVICE} expected"
    );
    drop(sockets);
    gw.stop().await;
}
