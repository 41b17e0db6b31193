#![cfg(unix)]

//! The peer port and the data directory, against real gateways on real
//! sockets: a client that speaks the transport's wire format itself (as an
//! attacker would) cannot get anything applied without being a member,
//! learns nothing from the listener before it proves the secret, and a
//! flood of strangers does not keep a member out; a gateway given no secret
//! generates one, and its files are private.

#[path = "support/peer_client.rs"]
mod peer_client;
#[path = "support/ports.rs"]
mod ports;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use coordinator::raft::{Entry, EntryPayload, Message, MessageKind};
use gateway::ops::{Op, Proposal, Role};
use gateway::{Config, Gateway, GatewayError, hash_secret};
use peer_client::{Frame, Outcome, Refusal, closes, connect_from, handshake, send};
use tokio::time::{Instant, timeout, timeout_at};

const SECRET: &str = "peer-port-test-secret-0123456789";
/// Upper bound on any one wait.
const WAIT: Duration = Duration::from_secs(15);

fn config(dir: &Path) -> Config {
    let any = "127.0.0.1:0".parse().expect("address");
    let mut c = Config::single(dir.to_path_buf(), any, any);
    c.tick = Duration::from_millis(10);
    c
}

/// The admin token the gateway wrote on first start.
fn admin_token(gw: &Gateway) -> String {
    let file = gw.admin_token_file.as_ref().expect("an admin token file");
    std::fs::read_to_string(file)
        .expect("admin token")
        .trim()
        .to_string()
}

/// `GET /v1/cluster` with `token`: the status code.
async fn cluster_status(gw: &Gateway, token: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .get(format!("http://{}/v1/cluster", gw.http_addr))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
        .status()
}

/// A gateway without the cluster secret's proof gets nothing; with it, the
/// handshake alone does not make a node a member. Node 2 is no member of
/// this single gateway's group: the admin token it forwards for creation
/// (the way a follower forwards a proposal to its leader) must not be
/// created, and the refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_cannot_get_a_proposal_applied_through_the_peer_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.cluster_secret = Some(SECRET.into());
    let gw = gateway::start(c).await.expect("start");
    let admin = admin_token(&gw);

    let Outcome::Welcome(mut s) = handshake(gw.raft_addr, "entente", 2, 1, SECRET.as_bytes()).await
    else {
        panic!("the handshake with the right secret fails");
    };
    let token = gateway::random_token().expect("token");
    let mut data = vec![0u8; 24]; // the node driver's proposal header
    data.extend(
        Proposal {
            ts_ms: gateway::now_ms(),
            op: Op::CreateToken {
                token_hash: hash_secret(&token),
                role: Role::Admin,
                name: "from the peer port".into(),
                id: None,
                expires_at: None,
            },
            by: None,
        }
        .encode(),
    );
    let forwarded = Message {
        from: 2,
        to: 1,
        term: 0,
        kind: MessageKind::Propose {
            entries: vec![Entry {
                term: 0,
                index: 0,
                payload: EntryPayload::Normal(data.into()),
            }],
        },
    };
    send(&mut s, &Frame::Message(forwarded)).await;

    let mut status = gw.node().watch_status();
    timeout(WAIT, status.wait_for(|st| st.refused_non_member >= 1))
        .await
        .expect("the forwarded proposal is refused")
        .expect("node running");
    drop(status);
    // Whatever was before it is applied once a later write is.
    let (index, _) = gateway::propose(
        gw.node(),
        Op::CreateToken {
            token_hash: hash_secret("another"),
            role: Role::Viewer,
            name: "a later write".into(),
            id: None,
            expires_at: None,
        },
    )
    .await
    .expect("a write");
    assert!(gw.db().applied_index() >= index);
    assert_eq!(
        cluster_status(&gw, &token).await,
        reqwest::StatusCode::UNAUTHORIZED,
        "the token forwarded by a non-member works"
    );
    assert_eq!(cluster_status(&gw, &admin).await, reqwest::StatusCode::OK);
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", gw.http_addr))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("entente_raft_refused_non_member_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    gw.stop().await;
}

/// There is no built-in secret any more: a gateway given none generates a
/// random one in its data directory (0600) and keeps it across restarts.
/// The listener gives a caller nothing but a fresh nonce before it proves
/// the secret, so the old built-in one (or any guess) cannot be tested
/// offline; a wrong proof is refused. A cluster without a secret does not
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_gateway_generates_its_secret_and_the_listener_reveals_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(dir.path());
    assert_eq!(c.cluster_secret, None);
    let gw = gateway::start(c.clone()).await.expect("start");
    let file = gw.cluster_secret_file.clone().expect("a generated secret");
    assert_eq!(file, dir.path().join("cluster-secret"));
    assert_eq!(mode(&file), 0o600);
    let secret = std::fs::read_to_string(&file).expect("secret");
    let secret = secret.trim().to_string();
    assert_eq!(secret.len(), 64, "32 random bytes, hex");

    for guess in ["entente-single-node", "change-me-please"] {
        match handshake(gw.raft_addr, "entente", 2, 1, guess.as_bytes()).await {
            Outcome::Refused {
                after_hello: Some(Frame::Nonce { .. }),
                after_proof:
                    Some(Frame::Refused {
                        reason: Refusal::Authentication,
                    }),
            } => {}
            other => panic!("{guess}: {other:?}"),
        }
    }
    // Whatever the Hello claims, the first answer is a bare nonce; the
    // cluster id is checked only after the proof.
    let mut s = tokio::net::TcpStream::connect(gw.raft_addr)
        .await
        .expect("connect");
    send(
        &mut s,
        &Frame::Hello(peer_client::Hello {
            version: peer_client::VERSION,
            cluster_id: "not-this-one".into(),
            from: 7,
            to: 9,
            stream: peer_client::Stream::Messages,
            nonce: [1; 32],
            app_format: peer_client::APP_FORMAT,
            engine: peer_client::ENGINE.into(),
        }),
    )
    .await;
    let answer = peer_client::recv(&mut s).await;
    assert!(matches!(answer, Some(Frame::Nonce { .. })), "{answer:?}");
    send(&mut s, &Frame::Auth { mac: [0; 32] }).await;
    assert_eq!(
        peer_client::recv(&mut s).await,
        Some(Frame::Refused {
            reason: Refusal::Authentication
        })
    );
    assert!(closes(&mut s).await);

    assert!(matches!(
        handshake(gw.raft_addr, "entente", 2, 1, secret.as_bytes()).await,
        Outcome::Welcome(_)
    ));
    gw.stop().await;

    // Restarted, it uses the same secret.
    let gw = gateway::start(c).await.expect("restart");
    assert_eq!(gw.cluster_secret_file.as_ref(), Some(&file));
    assert_eq!(
        std::fs::read_to_string(&file).expect("secret").trim(),
        secret
    );
    assert!(matches!(
        handshake(gw.raft_addr, "entente", 2, 1, secret.as_bytes()).await,
        Outcome::Welcome(_)
    ));
    gw.stop().await;

    // Two peers and no secret: refused, with a reason.
    let other = tempfile::tempdir().expect("tempdir");
    let mut two = config(other.path());
    two.peers.insert(2, "127.0.0.1:9".parse().expect("address"));
    match gateway::start(two).await {
        Err(GatewayError::Config(why)) => assert!(why.contains("secret"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a cluster started without a secret"),
    }
}

/// Keeps `per_address` idle connections open to `to` from each of `ips`,
/// reconnecting whichever the listener closes, until `stop` is set.
fn flood(to: SocketAddr, ips: &[[u8; 4]], per_address: usize, stop: Arc<AtomicBool>) {
    for &ip in ips {
        for _ in 0..per_address {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut s) = connect_from(ip, to).await {
                        // Idle until closed (the handshake deadline), then again.
                        let _ = closes(&mut s).await;
                    }
                    // Paces the reconnects; not a synchronisation.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    }
}

/// The finding: 80 idle sockets on a gateway's peer port kept a restarted
/// follower out of the group for as long as the flood lasted. Now strangers
/// fill only the shared handshake slots (8 at most per address), and a
/// member's address has slots of its own: gateway 2 restarts while 64 idle
/// sockets from eight other addresses hold every shared slot of gateway 1,
/// and the two have a leader and take a write within 4 s (the flood's
/// sockets are held for up to 3 s, and used to be for 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_gets_through_a_flood_of_strangers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = ports::reserve_ports(2);
    let peers: BTreeMap<u64, SocketAddr> = [(1, raft[0]), (2, raft[1])].into();
    let configs: Vec<Config> = [1, 2]
        .into_iter()
        .map(|id| {
            let mut c = config(&dir.path().join(format!("g{id}")));
            c.node_id = id;
            c.raft_listen = peers[&id];
            c.peers = peers.iter().map(|(id, a)| (*id, (*a).into())).collect();
            c.cluster_secret = Some(SECRET.into());
            c.write_timeout = Duration::from_millis(500);
            c
        })
        .collect();
    let starts: Vec<_> = configs
        .iter()
        .cloned()
        .map(|c| tokio::spawn(gateway::start(c)))
        .collect();
    let mut gws = Vec::new();
    for s in starts {
        gws.push(s.await.expect("join").expect("start"));
    }
    let gw2 = gws.pop().expect("gateway 2");
    let gw1 = gws.pop().expect("gateway 1");
    let write = |gw: &Gateway, n: u32| {
        let node = gw.node().clone();
        async move {
            gateway::propose(
                &node,
                Op::CreateToken {
                    token_hash: hash_secret(&format!("t{n}")),
                    role: Role::Viewer,
                    name: format!("write {n}"),
                    id: None,
                    expires_at: None,
                },
            )
            .await
        }
    };
    let deadline = Instant::now() + WAIT;
    while write(&gw2, 0).await.is_err() {
        assert!(Instant::now() < deadline, "the group never took a write");
    }
    gw2.crash().await;

    let stop = Arc::new(AtomicBool::new(false));
    let strangers: Vec<[u8; 4]> = (2..=9).map(|i| [127, 0, 0, i]).collect();
    flood(gw1.raft_addr, &strangers, 8, stop.clone());
    // The shared slots are all taken once a newcomer is closed at once.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut probe = connect_from([127, 0, 0, 10], gw1.raft_addr)
            .await
            .expect("connect");
        let shed = timeout(Duration::from_millis(500), closes(&mut probe)).await;
        if matches!(shed, Ok(true)) {
            break;
        }
        assert!(Instant::now() < deadline, "the flood never filled the port");
    }

    let restarted = Instant::now();
    let back_by = restarted + Duration::from_secs(4);
    let gw2 = timeout_at(back_by, gateway::start(configs[1].clone()))
        .await
        .expect("gateway 2 restarts in time")
        .expect("restart");
    let mut n = 1;
    loop {
        match timeout_at(back_by, write(&gw2, n)).await {
            Ok(Ok(_)) => break,
            Ok(Err(_)) => n += 1,
            Err(_) => panic!("gateway 2 was kept out of the group by the flood"),
        }
    }
    eprintln!("back in the group after {:?}", restarted.elapsed());
    stop.store(true, Ordering::Relaxed);
    gw2.stop().await;
    gw1.stop().await;
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

/// Every entry under `dir` (not following links), with its path.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        out.push(e.path());
        if e.file_type().expect("type").is_dir() {
            walk(&e.path(), out);
        }
    }
}

/// Checks the data directory is 0700 and everything in it 0700 / 0600.
#[cfg(unix)]
fn assert_private(data: &Path) -> Vec<String> {
    assert_eq!(mode(data), 0o700, "the data directory");
    let mut all = Vec::new();
    walk(data, &mut all);
    for p in &all {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(p), want, "{} is {:o}", p.display(), mode(p));
    }
    all.iter()
        .map(|p| {
            p.strip_prefix(data)
                .expect("inside")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// The data directory holds the device secret and token hashes
/// (`state.db`), every command (the log), the admin token and the cluster
/// secret: it is 0700 and every file in it 0600, and a directory an older
/// version left open is closed on start.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut c = config(&data);
    c.snapshot_every = 5;
    let gw = gateway::start(c.clone()).await.expect("start");
    for n in 0..12 {
        gateway::propose(
            gw.node(),
            Op::CreateToken {
                token_hash: hash_secret(&format!("t{n}")),
                role: Role::Viewer,
                name: format!("token {n}"),
                id: None,
                expires_at: None,
            },
        )
        .await
        .expect("write");
    }
    let mut status = gw.node().watch_status();
    timeout(WAIT, status.wait_for(|s| s.raft.snapshot_index > 0))
        .await
        .expect("a snapshot")
        .expect("node running");
    drop(status);
    let names = assert_private(&data);
    for expected in [
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "admin-token",
        "cluster-secret",
        "raft/hardstate",
        "raft/wal",
        "raft/snapshots",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
    }
    assert!(names.iter().any(|n| n.ends_with(".wal")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("/data")), "{names:?}");
    gw.stop().await;

    // As an older version left it: everything readable by everyone.
    let mut all = vec![data.clone()];
    walk(&data, &mut all);
    for p in &all {
        let loose = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(loose)).expect("chmod");
    }
    let gw = gateway::start(c).await.expect("restart");
    assert_private(&data);
    gw.stop().await;
}

/// Finding (issue 14): members of different versions could join one group
/// and apply each other's entries differently. A peer that announces
/// another log entry format in its handshake is refused, with the reason,
/// even with the right secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_entry_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.cluster_secret = Some(SECRET.into());
    let gw = gateway::start(c).await.expect("start");
    let other = peer_client::APP_FORMAT + 1;
    let outcome =
        peer_client::handshake_as(gw.raft_addr, "entente", 2, 1, SECRET.as_bytes(), other).await;
    match outcome {
        Outcome::Refused {
            after_proof: Some(Frame::Refused { reason }),
            ..
        } => assert_eq!(
            reason,
            peer_client::Refusal::AppFormat {
                supported: peer_client::APP_FORMAT
            }
        ),
        other => panic!("a peer of another entry format: {other:?}"),
    }
    // The same peer with this format gets in.
    assert!(matches!(
        handshake(gw.raft_addr, "entente", 2, 1, SECRET.as_bytes()).await,
        Outcome::Welcome(_)
    ));
    gw.stop().await;
}
