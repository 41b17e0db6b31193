//! The group's first admin token: created once, by whichever gateway leads
//! when the group has none, and never lost — not when the first leader's
//! proposal fails at the start, not when a crash comes between its commit
//! and the file.

mod common;
#[path = "support/ports.rs"]
mod ports;
#[path = "support/process.rs"]
mod process;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gateway::Config;
use process::{Proc, until_within};

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

fn config(dir: &Path) -> Config {
    let any = "127.0.0.1:0".parse().expect("address");
    let mut c = Config::single(dir.to_path_buf(), any, any);
    c.tick = Duration::from_millis(2);
    c
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("token file")
        .trim()
        .to_string()
}

/// A crash after the group committed the first token but before the file
/// was written: the token proposed is kept in `admin-token.pending` before
/// the proposal, and the next start finds it in the group and writes it.
/// Before the fix the token was only in memory, so the group held a token
/// nobody could read and no gateway would ever make another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_group_committed_before_a_crash_is_written_on_the_next_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = config(tmp.path());
    let gw = gateway::start(config.clone()).await.expect("start");
    let file = gw.admin_token_file.clone().expect("admin token file");
    let token = read(&file);
    assert!(!tmp.path().join("admin-token.pending").exists());
    gw.stop().await;

    // As the crash would leave it: the token committed, still pending.
    std::fs::rename(&file, tmp.path().join("admin-token.pending")).expect("rename");
    let gw = gateway::start(config.clone()).await.expect("restart");
    assert_eq!(gw.admin_token_file.as_deref(), Some(file.as_path()));
    assert_eq!(
        read(&file),
        token,
        "the token the group holds, not a new one"
    );
    assert!(!tmp.path().join("admin-token.pending").exists());
    gw.stop().await;
}

/// A pending token the group does not hold (another gateway's proposal won)
/// is removed, and no token file is made up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_token_the_group_does_not_hold_is_removed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = config(tmp.path());
    let gw = gateway::start(config.clone()).await.expect("start");
    let file = gw.admin_token_file.clone().expect("admin token file");
    gw.stop().await;
    std::fs::remove_file(&file).expect("remove");
    let pending = tmp.path().join("admin-token.pending");
    std::fs::write(&pending, format!("{}\n", "ab".repeat(32))).expect("pending");

    let gw = gateway::start(config.clone()).await.expect("restart");
    assert_eq!(gw.admin_token_file, None);
    assert!(!pending.exists());
    assert!(!file.exists());
    gw.stop().await;

    // A damaged pending file stops the start, naming it (its token may be
    // the group's: it is never silently replaced).
    std::fs::write(&pending, "not a tok").expect("pending");
    let err = match gateway::start(config).await {
        Ok(_) => panic!("started with a damaged pending token file"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("admin-token.pending"), "{err}");
}

fn spawn(dir: &Path, id: u64, peers: &str, raft: &str, keys: &str) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["--node-id", &id.to_string(), "--peers", peers])
        .arg("--data-dir")
        .arg(dir)
        .args(["--http-listen", "127.0.0.1:0", "--raft-listen", raft])
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
        ])
        .args(["--cluster-secret", "bootstrap-test-secret"])
        .args(["--consensus", "pbft", "--group-keys", keys])
        .args(["--tick-ms", "20", "--write-timeout-ms", "2000"])
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ENTENTE_") {
            cmd.env_remove(&key);
        }
    }
    Proc::start(cmd)
}

/// The first leader could not commit the token while it started (here the
/// primary of PBFT's first view starts alone, so its proposals find no
/// quorum); the group goes on trying once the start is over, and the token
/// is written by whoever leads when the others come. Before the fix each gateway tried once, at
/// its start, so a group whose first leader started alone had no admin
/// token, ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_leader_creates_the_token_after_its_start_when_the_others_come_later() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ids = [1u64, 2, 3, 4];
    let dir = |id: u64| tmp.path().join(format!("gw{id}"));
    let keys = common::group_keys(&ids, dir)
        .iter()
        .map(|(id, k)| format!("{id}={}", coordinator::keys::encode_public(k)))
        .collect::<Vec<_>>()
        .join(",");
    let raft = ports::reserve_ports(ids.len());
    let peers = ids
        .iter()
        .zip(&raft)
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    let start = |id: u64| {
        spawn(
            &dir(id),
            id,
            &peers,
            &raft[id as usize - 1].to_string(),
            &keys,
        )
    };

    let first = start(1);
    // Its start is over: the bounded first try failed without a quorum.
    first
        .wait_line(&["gateway started"], Duration::from_secs(60))
        .await;
    assert!(!dir(1).join("admin-token").exists());
    let others: Vec<Proc> = ids[1..].iter().map(|&id| start(id)).collect();

    let holder = until_within("an admin-token file", Duration::from_secs(60), || async {
        ids.iter()
            .copied()
            .find(|&id| dir(id).join("admin-token").exists())
    })
    .await;
    // Whoever leads by then (the first primary, or one after a view
    // change) wrote it, said so, and is the only one with a token file.
    let holder_proc = if holder == 1 {
        &first
    } else {
        &others[holder as usize - 2]
    };
    holder_proc
        .wait_line(&["admin token:", "admin-token"], common::WAIT)
        .await;
    for id in ids.iter().filter(|&&id| id != holder) {
        assert!(
            !dir(*id).join("admin-token").exists(),
            "gateway {id} has one too"
        );
    }
    let token = read(&dir(holder).join("admin-token"));
    let rest = others[0]
        .wait_line(&["gateway started", "rest="], common::WAIT)
        .await;
    let addr = rest
        .split("rest=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("REST address in the start line")
        .to_string();
    let client = reqwest::Client::new();
    let status = until_within("the token accepted", common::WAIT, || async {
        let r = client
            .get(format!("http://{addr}/v1/cluster"))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?;
        (r.status() == reqwest::StatusCode::OK).then_some(r.status())
    })
    .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    drop(others);
}
