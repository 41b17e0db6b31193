//! Backup and restore with the real `gateway` binary: a backup streamed by a
//! gateway of a three-member group while writers keep the group busy
//! restores (`gateway --restore`) into a new group holding exactly the
//! writes acknowledged at or below the backup's index, and none after it.
//! Damaged backups and occupied data directories are refused with a reason.

mod common;

#[path = "support/ports.rs"]
mod ports;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use ports::reserve_ports;
use process::{Proc, until, write_secret_file};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_gateway");
const SECRET: &str = "backup-test-cluster-secret-0123456789";
const WRITERS: usize = 4;

fn command(root: &Path, data: &Path, args: &[&str]) -> Command {
    let secret = root.join("cluster-secret.txt");
    if !secret.exists() {
        write_secret_file(&secret, SECRET);
    }
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(data)
        .arg("--cluster-secret-file")
        .arg(secret)
        .args(["--tick-ms", "5", "--snapshot-every", "50"])
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

fn run(root: &Path, data: &Path, args: &[&str]) -> Output {
    command(root, data, args).output().expect("run gateway")
}

fn index_of(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("entente-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Entente-Index on an acknowledged write")
}

/// What one writer had acknowledged: its shadow patches (`n` → index) and
/// the devices it registered (id → index).
#[derive(Default, Debug)]
struct Acked {
    patches: Vec<(u64, u64)>,
    devices: Vec<(String, u64)>,
}

/// Writes in a loop against `base` until `stop`: desired `{"n": k}` on
/// device `w{i}`, and every third round a new device `b{i}-{k}`. Every write
/// must be acknowledged (there are no faults in this test).
async fn writer(
    http: reqwest::Client,
    base: String,
    token: String,
    i: usize,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    high: Arc<AtomicU64>,
) -> Acked {
    let mut acked = Acked::default();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let r = http
            .patch(format!("{base}/v1/devices/w{i}/shadow"))
            .bearer_auth(&token)
            .json(&json!({"desired": {"n": k}}))
            .send()
            .await
            .expect("shadow patch");
        assert!(r.status().is_success(), "patch {k} of w{i}: {}", r.status());
        acked.patches.push((k, index_of(&r)));
        high.fetch_max(index_of(&r), Ordering::SeqCst);
        if k.is_multiple_of(3) {
            let id = format!("b{i}-{k}");
            let r = http
                .post(format!("{base}/v1/devices"))
                .bearer_auth(&token)
                .json(&json!({"id": id}))
                .send()
                .await
                .expect("device registration");
            assert_eq!(r.status().as_u16(), 201, "registering {id}");
            high.fetch_max(index_of(&r), Ordering::SeqCst);
            acked.devices.push((id, index_of(&r)));
        }
        count.fetch_add(1, Ordering::Relaxed);
    }
    acked
}

async fn get_json(http: &reqwest::Client, url: String, token: &str) -> Option<(u16, Value)> {
    let r = http.get(url).bearer_auth(token).send().await.ok()?;
    let s = r.status().as_u16();
    Some((s, r.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_exactly_the_state_at_its_index() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let ports = reserve_ports(8);
    let (raft, rest) = (&ports[..4], &ports[4..]);
    let group: String = (0..3)
        .map(|i| format!("{}={}", i + 1, raft[i]))
        .collect::<Vec<_>>()
        .join(",");
    let data: Vec<PathBuf> = (1..=3).map(|i| root.join(format!("g{i}"))).collect();
    let base = |i: usize| format!("http://{}", rest[i]);
    let http = reqwest::Client::new();
    let _gws: Vec<Proc> = (0..3)
        .map(|i| {
            let (id, r, h) = (
                (i + 1).to_string(),
                raft[i].to_string(),
                rest[i].to_string(),
            );
            Proc::start(command(
                root,
                &data[i],
                &[
                    "--node-id",
                    &id,
                    "--peers",
                    &group,
                    "--raft-listen",
                    &r,
                    "--http-listen",
                    &h,
                ],
            ))
        })
        .collect();
    let token = until("the admin token", || {
        let data = data.clone();
        async move {
            data.iter()
                .find_map(|d| std::fs::read_to_string(d.join("admin-token")).ok())
                .map(|t| t.trim().to_string())
        }
    })
    .await;
    for i in 0..WRITERS {
        until("a writer's device", || {
            let (http, url, token) = (&http, format!("{}/v1/devices", base(0)), &token);
            async move {
                let r = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&json!({"id": format!("w{i}")}))
                    .send()
                    .await
                    .ok()?;
                matches!(r.status().as_u16(), 201 | 409).then_some(())
            }
        })
        .await;
    }

    // Writers on every gateway; a backup from gateway 2 while they write.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    // The highest index acknowledged to any writer so far.
    let high = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            tokio::spawn(writer(
                http.clone(),
                base(i % 3),
                token.clone(),
                i,
                stop.clone(),
                count.clone(),
                high.clone(),
            ))
        })
        .collect();
    until("writes before the backup", || {
        let n = count.load(Ordering::Relaxed);
        async move { (n >= 60).then_some(()) }
    })
    .await;
    let acked_before = high.load(Ordering::SeqCst);
    let r = http
        .get(format!("{}/v1/admin/backup", base(1)))
        .bearer_auth(&token)
        .send()
        .await
        .expect("backup");
    assert_eq!(r.status().as_u16(), 200, "backup");
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/vnd.entente.backup"
    );
    let index = index_of(&r);
    // Linearizable: every write acknowledged before the request is in it.
    assert!(
        index >= acked_before,
        "backup at {index}, but {acked_before} was acknowledged before it was asked for"
    );
    let sha = r.headers()["entente-backup-sha256"]
        .to_str()
        .unwrap()
        .to_string();
    let body = r.bytes().await.expect("backup body").to_vec();
    let after = count.load(Ordering::Relaxed);
    until("writes after the backup", || {
        let n = count.load(Ordering::Relaxed);
        async move { (n >= after + 30).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.expect("writer"));
    }
    // The backup is neither empty nor everything: writes on both sides.
    let all: Vec<u64> = acked
        .iter()
        .flat_map(|a| a.patches.iter().map(|p| p.1))
        .collect();
    assert!(all.iter().any(|&i| i <= index) && all.iter().any(|&i| i > index));

    // The file describes itself; its checksum is the header's.
    let nl = body.iter().position(|&b| b == b'\n').unwrap();
    assert_eq!(&body[..nl], b"ENTENTE-BACKUP 1");
    let nl2 = nl + 1 + body[nl + 1..].iter().position(|&b| b == b'\n').unwrap();
    let desc: Value = serde_json::from_slice(&body[nl + 1..nl2]).expect("description");
    let image = &body[nl2 + 1..];
    assert_eq!(desc["index"], index);
    assert_eq!(desc["size"], image.len() as u64);
    let sum: String = Sha256::digest(image)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(desc["sha256"], sum.as_str());
    assert_eq!(sha, sum);
    let file = root.join("backup.bin");
    std::fs::write(&file, &body).expect("write backup");

    // Damaged backups are refused with a reason, and leave no group.
    let mut flipped = body.clone();
    let last = flipped.len() - 100;
    flipped[last] ^= 0x55;
    let cut = body[..body.len() - 10].to_vec();
    for (name, bytes, why) in [
        ("flipped.bin", flipped, "checksum"),
        ("cut.bin", cut, "cut off"),
        ("junk.bin", b"hello".to_vec(), "does not start"),
    ] {
        let f = root.join(name);
        std::fs::write(&f, bytes).expect("write");
        let dir = root.join(format!("restore-{name}"));
        let out = run(
            root,
            &dir,
            &["--restore", f.to_str().unwrap(), "--node-id", "7"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} restored");
        assert!(err.contains(why), "{name}: {err}");
        assert!(!dir.join("raft").exists() && !dir.join("state.db").exists());
    }
    // The data directory of a running gateway is refused.
    let out = run(
        root,
        &data[0],
        &["--restore", file.to_str().unwrap(), "--node-id", "7"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");

    // The restore.
    let new_dir = root.join("restored");
    let out = run(
        root,
        &new_dir,
        &["--restore", file.to_str().unwrap(), "--node-id", "7"],
    );
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "restore: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains(&format!("log index {index}")), "{printed}");
    assert!(
        printed.contains(&format!(
            "LOST: every write the old group committed after index {index}"
        )),
        "{printed}"
    );

    // A data directory that holds a group is refused.
    let out = run(
        root,
        &new_dir,
        &["--restore", file.to_str().unwrap(), "--node-id", "7"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists"), "{err}");

    // The new group: exactly the acknowledged writes up to the index.
    let _new = Proc::start(command(
        root,
        &new_dir,
        &[
            "--node-id",
            "7",
            "--peers",
            &format!("7={}", raft[3]),
            "--raft-listen",
            &raft[3].to_string(),
            "--http-listen",
            &rest[3].to_string(),
        ],
    ));
    let nb = base(3);
    let cluster = until("the restored gateway to lead", || {
        let (http, url, token) = (&http, format!("{nb}/v1/cluster"), &token);
        async move {
            let (s, v) = get_json(http, url, token).await?;
            (s == 200 && v["role"] == "leader").then_some(v)
        }
    })
    .await;
    assert_eq!(cluster["members"].as_array().map(Vec::len), Some(1));
    assert!(cluster["commit"].as_u64().unwrap() >= index);
    for (i, a) in acked.iter().enumerate() {
        let want = a.patches.iter().rev().find(|p| p.1 <= index).map(|p| p.0);
        let (s, shadow) = get_json(&http, format!("{nb}/v1/devices/w{i}/shadow"), &token)
            .await
            .expect("shadow");
        assert_eq!(s, 200, "{shadow}");
        assert_eq!(
            shadow["desired"]["n"].as_u64(),
            want,
            "w{i}: the last patch at or below index {index}"
        );
        for (id, at) in &a.devices {
            let (s, v) = get_json(&http, format!("{nb}/v1/devices/{id}"), &token)
                .await
                .expect("device");
            let want = if *at <= index { 200 } else { 404 };
            assert_eq!(s, want, "{id} committed at {at}, backup at {index}: {v}");
        }
    }
    let (s, list) = get_json(&http, format!("{nb}/v1/devices?limit=1000"), &token)
        .await
        .expect("devices");
    assert_eq!(s, 200);
    let online: BTreeMap<String, Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["online"] != false)
        .map(|d| (d["id"].as_str().unwrap().to_string(), d.clone()))
        .collect();
    assert!(
        online.is_empty(),
        "devices online in a new group: {online:?}"
    );
    // It takes writes, at indexes after the backup's.
    let r = http
        .post(format!("{nb}/v1/devices"))
        .bearer_auth(&token)
        .json(&json!({"id": "after-restore"}))
        .send()
        .await
        .expect("write");
    assert_eq!(r.status().as_u16(), 201);
    assert!(index_of(&r) > index);
}
