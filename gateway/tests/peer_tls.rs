//! TLS between gateways and HTTPS for the REST API, on real sockets with
//! real TLS: `gateway certs` (the binary) writes private files and the
//! flags to pass; three gateways on those certificates elect, replicate and
//! catch a late member up by snapshot over mutual TLS; a plain gateway at a
//! TLS one is refused, both logging why, and a plain group warns that peer
//! traffic is unencrypted; the REST API over HTTPS answers HTTP/2 and
//! HTTP/1.1, drops plain HTTP, and closes a connection that never starts
//! its TLS handshake after the header timeout. (The transport's own tests
//! cover the other refusals and a tampered stream frame by frame.)

mod common;

#[path = "support/ports.rs"]
mod ports;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{WAIT, addr_of, loopback_listeners};
use gateway::Config;
use gateway::config::PeerTlsFiles;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use process::{Proc, write_secret_file};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");
const CLUSTER: &str = "tls-test";

/// Runs `gateway certs` into `out` and returns what it printed.
fn certs(out: &Path, nodes: &str) -> (bool, String) {
    let o = Command::new(BIN)
        .args(["certs", "--out"])
        .arg(out)
        .args(["--nodes", nodes, "--cluster-id", CLUSTER])
        .env_remove("ENTENTE_CLUSTER_ID")
        .output()
        .expect("run gateway certs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn files(dir: &Path, id: u64) -> PeerTlsFiles {
    PeerTlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("node-{id}.pem")),
        key: dir.join(format!("node-{id}.key")),
    }
}

#[test]
fn gateway_certs_writes_private_files_and_prints_the_flags() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("pki");
    let (ok, text) = certs(&out, "1,2,3");
    assert!(ok, "{text}");
    for id in 1..=3 {
        let f = files(&out, id);
        let flags = format!(
            "--node-id {id} --cluster-id {CLUSTER} --peer-tls-ca {} --peer-tls-cert {} \
             --peer-tls-key {}",
            f.ca.display(),
            f.cert.display(),
            f.key.display()
        );
        assert!(text.contains(&flags), "no {flags:?} in:\n{text}");
        assert!(
            text.contains(&format!("node-{id}.{CLUSTER}.entente")),
            "{text}"
        );
    }
    #[cfg(unix)]
    for name in ["ca.pem", "ca.key", "node-1.pem", "node-1.key", "node-3.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join(name))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    // Never overwrites: the CA key stays the one the certificates trust.
    let before = std::fs::read(out.join("ca.key")).expect("ca.key");
    let (ok, text) = certs(&out, "4");
    assert!(!ok, "{text}");
    assert!(text.contains("exists already"), "{text}");
    assert_eq!(std::fs::read(out.join("ca.key")).expect("ca.key"), before);
    assert!(!out.join("node-4.pem").exists());
    // A cluster id that cannot be part of a DNS name is refused up front.
    let o = Command::new(BIN)
        .args(["certs", "--out"])
        .arg(tmp.path().join("other"))
        .args(["--nodes", "1", "--cluster-id", "no spaces/here"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("DNS name"));
}

fn config(dir: &Path, pki: &Path, id: u64, peers: &BTreeMap<u64, SocketAddr>) -> Config {
    let mut c = Config::single(
        dir.join(format!("g{id}")),
        "127.0.0.1:0".parse().expect("addr"),
        peers[&id],
    );
    c.node_id = id;
    c.peers = peers.iter().map(|(id, a)| (*id, (*a).into())).collect();
    c.cluster_secret = Some("peer-tls-test-secret".into());
    c.cluster_id = CLUSTER.into();
    c.tick = Duration::from_millis(5);
    c.snapshot_every = 10;
    c.peer_tls = Some(files(pki, id));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_over_mutual_tls_elect_replicate_and_catch_up_by_snapshot() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = tmp.path().join("pki");
    let (ok, text) = certs(&pki, "1,2,3");
    assert!(ok, "{text}");
    let mut listeners: BTreeMap<u64, gateway::Listeners> =
        (1..=3).map(|id| (id, loopback_listeners())).collect();
    let peers: BTreeMap<u64, SocketAddr> = listeners
        .iter()
        .map(|(id, l)| (*id, addr_of(&l.peer)))
        .collect();
    // Gateways 1 and 2 start as the group and elect a leader.
    let two: BTreeMap<u64, SocketAddr> = peers.range(1..=2).map(|(k, v)| (*k, *v)).collect();
    let starts: Vec<_> = [1, 2]
        .into_iter()
        .map(|id| {
            let c = config(tmp.path(), &pki, id, &two);
            tokio::spawn(gateway::start_with(c, listeners.remove(&id).expect("l")))
        })
        .collect();
    let mut gws = BTreeMap::new();
    for (id, s) in [1u64, 2].into_iter().zip(starts) {
        gws.insert(id, s.await.expect("join").expect("start"));
    }
    let leader = gws[&1].node().status().raft.leader.expect("a leader");
    let token_file = gws
        .values()
        .find_map(|g| g.admin_token_file.clone())
        .expect("admin token");
    let token = std::fs::read_to_string(token_file).expect("token");
    let token = token.trim().to_string();
    let http = reqwest::Client::new();
    let post = async |gw: SocketAddr, path: &str, body: serde_json::Value| {
        let r = http
            .post(format!("http://{gw}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    };
    for i in 0..30 {
        post(
            gws[&leader].http_addr,
            "/v1/devices",
            json!({"id": format!("dev-{i}")}),
        )
        .await;
    }
    // Replicated to the follower over TLS.
    let follower = if leader == 1 { 2 } else { 1 };
    let commit = gws[&leader].node().status().raft.commit;
    gws[&follower]
        .node()
        .wait_applied(commit, WAIT)
        .await
        .expect("the follower applies");

    // Gateway 3 joins, is added as a learner and catches up by snapshot.
    let mut c3 = config(tmp.path(), &pki, 3, &peers);
    c3.join = true;
    let g3 = gateway::start_with(c3, listeners.remove(&3).expect("l3"))
        .await
        .expect("start gateway 3");
    post(
        gws[&leader].http_addr,
        "/v1/cluster/members",
        json!({"id": 3, "address": peers[&3].to_string(), "suffrage": "learner"}),
    )
    .await;
    let commit = gws[&leader].node().status().raft.commit;
    g3.node()
        .wait_applied(commit, WAIT)
        .await
        .expect("gateway 3 catches up");
    assert!(
        g3.node().status().raft.snapshot_index > 0,
        "gateway 3 was sent a snapshot"
    );
    // Promoted, it is one of three voters and gets new writes.
    post(
        gws[&leader].http_addr,
        "/v1/cluster/members",
        json!({"id": 3, "suffrage": "voter"}),
    )
    .await;
    post(
        gws[&leader].http_addr,
        "/v1/devices",
        json!({"id": "dev-last"}),
    )
    .await;
    let commit = gws[&leader].node().status().raft.commit;
    g3.node()
        .wait_applied(commit, WAIT)
        .await
        .expect("gateway 3 applies a new write");
    assert_eq!(g3.node().status().raft.conf_state.voters.len(), 3);
    let listed: serde_json::Value = http
        .get(format!(
            "http://{}/v1/devices?consistency=local&limit=1000",
            g3.http_addr
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(31));
    g3.stop().await;
    for (_, g) in gws {
        g.stop().await;
    }
}

/// A gateway process on `raft` with these extra flags.
fn spawn(dir: &Path, raft: SocketAddr, extra: &[String]) -> Proc {
    let secret = dir.with_extension("secret");
    write_secret_file(&secret, "peer-tls-process-test-secret");
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--http-listen", "127.0.0.1:0", "--raft-listen"])
        .arg(raft.to_string())
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtt5-listen",
            "127.0.0.1:0",
        ])
        .args(["--mqtt-tls-listen", "127.0.0.1:0", "--cluster-secret-file"])
        .arg(&secret)
        .args(extra)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ENTENTE_") {
            cmd.env_remove(&key);
        }
    }
    Proc::start(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_gateway_is_refused_by_a_tls_one_and_both_say_why() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = tmp.path().join("pki");
    let (ok, text) = certs(&pki, "1,2");
    assert!(ok, "{text}");
    let raft = ports::reserve_ports(2);
    let peers = format!("1={},2={}", raft[0], raft[1]);
    let f = files(&pki, 1);
    let base = |id: &str| {
        vec![
            "--node-id".to_string(),
            id.into(),
            "--peers".into(),
            peers.clone(),
            "--cluster-id".into(),
            CLUSTER.into(),
        ]
    };
    let mut tls_args = base("1");
    for (flag, file) in [
        ("--peer-tls-ca", &f.ca),
        ("--peer-tls-cert", &f.cert),
        ("--peer-tls-key", &f.key),
    ] {
        tls_args.push(flag.into());
        tls_args.push(file.display().to_string());
    }
    let g1 = spawn(&tmp.path().join("g1"), raft[0], &tls_args);
    let g2 = spawn(&tmp.path().join("g2"), raft[1], &base("2"));
    g1.wait_line(
        &[
            "INFO",
            "peer traffic is mutual TLS",
            "node-1.tls-test.entente",
        ],
        WAIT,
    )
    .await;
    g2.wait_line(&["WARN", "peer traffic is unencrypted"], WAIT)
        .await;
    // Each refuses the other's dial, naming its address and the reason.
    g1.wait_line(
        &[
            "WARN",
            "refused incoming connection",
            "peer_addr=127.0.0.1:",
            "spoke plain TCP to this TLS listener",
        ],
        WAIT,
    )
    .await;
    g1.wait_line(
        &[
            "WARN",
            "cannot connect to peer",
            &format!("peer_addr={}", raft[1]),
            "answered without TLS",
        ],
        WAIT,
    )
    .await;
    g2.wait_line(
        &[
            "WARN",
            "cannot connect to peer",
            &format!("peer_addr={}", raft[0]),
            "requires TLS",
        ],
        WAIT,
    )
    .await;
    g2.wait_line(
        &[
            "WARN",
            "refused incoming connection",
            "spoke TLS to this plain-TCP listener",
        ],
        WAIT,
    )
    .await;
    assert!(!g1.output().contains("this node is now the leader"));
}

// ------------------------------------------------------------- HTTPS

/// A server certificate for 127.0.0.1 and its CA, as PEM files in `dir`.
fn https_cert(dir: &Path) -> (PathBuf, PathBuf, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
    let params =
        CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).expect("params");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca).expect("sign");
    let (c, k) = (dir.join("https.pem"), dir.join("https.key"));
    std::fs::write(&c, cert.pem()).expect("cert");
    std::fs::write(&k, key.serialize_pem()).expect("key");
    (c, k, ca.pem())
}

fn https_client(ca_pem: &str, alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA"))
        .expect("trust");
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// Opens TLS to `addr` offering only `alpn`; checks the server chose it.
async fn tls_to(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let s = https_client(ca_pem, alpn)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(alpn), "ALPN");
    s
}

fn healthz() -> hyper::Request<http_body_util::Empty<bytes::Bytes>> {
    hyper::Request::get("https://127.0.0.1/healthz")
        .header("host", "127.0.0.1")
        .body(http_body_util::Empty::new())
        .expect("request")
}

/// Reads `s` until it closes; how long that took.
async fn closed_after(s: &mut TcpStream, bound: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(start + bound, s.read(&mut buf)).await {
            Err(_) => panic!("still open after {bound:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_answers_h2_and_http1_and_drops_plain_and_silent_clients() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (cert, key, ca) = https_cert(tmp.path());
    let mut c = Config::single(
        tmp.path().join("g"),
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    );
    c.http_tls = Some((cert, key));
    c.http_header_timeout = Duration::from_millis(600);
    let gw = gateway::start(c).await.expect("start");
    let addr = gw.http_addr;

    // HTTP/2, chosen by ALPN.
    let io = TokioIo::new(tls_to(addr, &ca, b"h2").await);
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let res = send.send_request(healthz()).await.expect("h2 request");
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), hyper::Version::HTTP_2);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert!(!body.is_empty());

    // HTTP/1.1.
    let io = TokioIo::new(tls_to(addr, &ca, b"http/1.1").await);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let res = send.send_request(healthz()).await.expect("h1 request");
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), hyper::Version::HTTP_11);

    // Plain HTTP to the TLS port: closed, no HTTP answer.
    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut got)).await;
    assert!(!got.starts_with(b"HTTP/"), "answered in plain HTTP");

    // A client that connects and says nothing is closed after the header
    // timeout (not before, not long after).
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let took = closed_after(&mut silent, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(500), "closed after {took:?}");

    // Still serving.
    let io = TokioIo::new(tls_to(addr, &ca, b"h2").await);
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let res = send.send_request(healthz()).await.expect("h2 request");
    assert_eq!(res.status(), 200);
    gw.stop().await;
}

#[test]
fn https_needs_both_files_and_names_a_bad_one() {
    use clap::Parser;
    let args = gateway::config::Args::parse_from(["gateway", "--http-tls-cert", "c.pem"]);
    let e = Config::from_args(args).expect_err("refused");
    assert!(e.contains("--http-tls-key"), "{e}");
    let args = gateway::config::Args::parse_from(["gateway", "--peer-tls-ca", "ca.pem"]);
    let e = Config::from_args(args).expect_err("refused");
    assert!(e.contains("--peer-tls-cert"), "{e}");
}
