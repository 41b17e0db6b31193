//! Peer TLS over real sockets: members exchange messages and snapshots
//! over mutual TLS; dialers without a certificate, with one from another
//! CA, with one naming another node, speaking plain TCP to a TLS member (or
//! TLS to a plain one) are refused and named in the log; a byte flipped on
//! the wire breaks the connection, delivers nothing, and the members
//! recover once the wire is clean. Certificates are made at run time.

use std::sync::atomic::{AtomicBool, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

use super::*;
use crate::transport::{PeerTls, peer_tls_name};

/// A test cluster CA.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A member's certificate and key, as PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
            .expect("CA certificate");
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate naming node `id` of the test cluster.
    fn leaf(&self, id: NodeId) -> Leaf {
        let mut params = CertificateParams::new(vec![peer_tls_name(CLUSTER, id)]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("node {id}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// What member `id` presents and trusts.
    fn tls(&self, id: NodeId) -> PeerTls {
        let leaf = self.leaf(id);
        PeerTls::from_pem(
            self.pem().as_bytes(),
            leaf.cert.as_bytes(),
            leaf.key.as_bytes(),
        )
        .expect("peer TLS")
    }
}

fn tls_config(ca: &Ca, id: NodeId) -> TransportConfig {
    let mut c = config(id);
    c.tls = Some(ca.tls(id));
    c
}

/// Starts one TLS member per id, each knowing all the others.
fn tls_cluster(ca: &Ca, ids: &[NodeId]) -> Vec<Node> {
    let nodes: Vec<Node> = ids.iter().map(|&id| start(tls_config(ca, id))).collect();
    for (t, _) in &nodes {
        for (peer, _) in &nodes {
            if peer.node_id() != t.node_id() {
                t.set_peer(peer.node_id(), peer.local_addr())
                    .expect("set_peer");
            }
        }
    }
    nodes
}

#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A raw TLS client trusting `ca`, presenting `leaf` if given.
fn connector(ca: &Ca, leaf: Option<&Leaf>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).expect("CA pem"))
        .expect("trust the CA");
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match leaf {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key"),
            )
            .expect("client identity"),
    };
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn tls_members_exchange_messages_and_snapshots() {
    let ca = Ca::new("cluster");
    let mut nodes = tls_cluster(&ca, &[1, 2, 3]);
    let (c, mut rx_c) = nodes.pop().expect("c");
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    assert_delivers(&a, &mut rx_b, 2, 1).await;
    assert_delivers(&b, &mut rx_c, 3, 2).await;
    assert_delivers(&c, &mut rx_a, 1, 3).await;
    assert_delivers(&a, &mut rx_c, 3, 4).await;
    // A snapshot of several chunks, on its own TLS connection.
    let data = image(2 * 1024 * 1024 + 777);
    let files = tempfile::tempdir().expect("tempdir");
    a.send_snapshot(snap_msg(1, 2), stored(&files, "img", &data));
    loop {
        match next(&mut rx_b).await {
            Inbound::Snapshot { msg: m, image } => {
                assert_eq!(m, snap_msg(1, 2));
                assert!(received(&image) == data, "snapshot image differs");
                break;
            }
            Inbound::Unreachable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    loop {
        match next(&mut rx_a).await {
            Inbound::SnapshotStatus { to, ok } => {
                assert_eq!((to, ok), (2, true));
                break;
            }
            Inbound::Unreachable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    for t in [&a, &b, &c] {
        t.shutdown().await;
    }
}

#[tokio::test]
async fn a_member_whose_own_certificate_names_another_node_does_not_start() {
    let ca = Ca::new("cluster");
    let mut c = config(1);
    c.tls = Some(ca.tls(2));
    let err = Transport::<Message>::start(c)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("does not name node 1"), "{err}");
    assert!(err.contains(&peer_tls_name(CLUSTER, 1)), "{err}");
    let mut c = tls_config(&ca, 1);
    c.cluster_id = "not a dns name!".into();
    let err = Transport::<Message>::start(c)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("DNS name"), "{err}");
}

/// TLS members 1 and 2 talking; `dialer` (a TLS client made by the test)
/// connects to member 1, which must refuse it with a warning naming its
/// address and `reason`, and keep serving member 2. Returns what the dialer
/// saw of its handshake.
async fn refused_tls_dialer(
    ca: &Ca,
    dialer: TlsConnector,
    claim: NodeId,
    reason: &str,
) -> Result<(), HandshakeError> {
    let (logs, _guard) = Logs::install();
    let mut nodes = tls_cluster(ca, &[1, 2]);
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    assert_delivers(&b, &mut rx_a, 1, 1).await;

    let tcp = TcpStream::connect(a.local_addr()).await.expect("connect");
    let me = tcp.local_addr().expect("addr").to_string();
    let name = ServerName::try_from(peer_tls_name(CLUSTER, 1)).expect("name");
    let outcome = timeout(WAIT, async {
        let mut s = dialer
            .connect(name, tcp)
            .await
            .map_err(|e| HandshakeError::Tls(e.to_string()))?;
        let r = dial(&mut s, &identity(claim), 1, StreamKind::Messages).await;
        r.map_err(HandshakeError::tls_cause)
    })
    .await
    .expect("the dialer's handshake ends");
    assert!(outcome.is_err(), "the dialer got in");
    logs.wait_for(&[
        "WARN",
        "refused incoming connection",
        &format!("peer_addr={me}"),
        reason,
    ])
    .await;
    // Member 1 heard nothing from it, and still serves member 2 both ways.
    assert_delivers(&b, &mut rx_a, 1, 2).await;
    assert_delivers(&a, &mut rx_b, 2, 3).await;
    for t in [&a, &b] {
        t.shutdown().await;
    }
    outcome
}

#[tokio::test]
async fn a_dialer_without_a_certificate_is_refused() {
    let ca = Ca::new("cluster");
    let r = refused_tls_dialer(&ca, connector(&ca, None), 3, "peer sent no certificates").await;
    assert!(r.is_err());
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let ca = Ca::new("cluster");
    let other = Ca::new("other");
    // It trusts our CA, but presents a certificate the other CA issued.
    let dialer = connector(&ca, Some(&other.leaf(3)));
    let r = refused_tls_dialer(&ca, dialer, 3, "invalid peer certificate").await;
    let e = r.expect_err("refused").to_string();
    assert!(e.contains("TLS"), "the dialer learns it from TLS: {e}");
}

#[tokio::test]
async fn a_certificate_naming_another_node_is_refused() {
    let ca = Ca::new("cluster");
    // A real member 4's certificate, used to claim to be member 3.
    let dialer = connector(&ca, Some(&ca.leaf(4)));
    let r = refused_tls_dialer(&ca, dialer, 3, "does not name node 3").await;
    match r {
        Err(HandshakeError::Refused(RefuseReason::Certificate)) => {}
        other => panic!("expected a certificate refusal, got {other:?}"),
    }
}

/// Member 1 (`one`) and member 3 (`three`), one with TLS and one without:
/// 3's dial of 1 is refused, both sides log why naming the other's address.
async fn mixed(one: TransportConfig, three: TransportConfig, acceptor: &str, dialer: &str) {
    let (logs, _guard) = Logs::install();
    let (a, mut rx_a) = start(one);
    let (c, mut rx_c) = start(three);
    c.set_peer(1, a.local_addr()).expect("set_peer");
    c.send(msg(3, 1, 1));
    logs.wait_for(&[
        "WARN",
        "refused incoming connection",
        "peer_addr=127.0.0.1:",
        acceptor,
    ])
    .await;
    logs.wait_for(&[
        "WARN",
        "cannot connect to peer",
        &a.local_addr().to_string(),
        dialer,
    ])
    .await;
    assert_eq!(next(&mut rx_c).await, Inbound::Unreachable(1));
    assert!(rx_a.try_recv().is_err(), "member 1 heard from member 3");
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_plain_dialer_to_a_tls_member_is_refused() {
    let ca = Ca::new("cluster");
    mixed(
        tls_config(&ca, 1),
        config(3),
        "spoke plain TCP to this TLS listener",
        "requires TLS",
    )
    .await;
}

#[tokio::test]
async fn a_tls_dialer_to_a_plain_member_is_refused() {
    let ca = Ca::new("cluster");
    mixed(
        config(1),
        tls_config(&ca, 3),
        "spoke TLS to this plain-TCP listener",
        "answered without TLS",
    )
    .await;
}

/// A TCP proxy to `to` that, once `tamper` is set, flips one bit of the
/// next chunk it forwards from the dialer (then clears `tamper`).
async fn tampering_proxy(to: SocketAddr, tamper: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind(localhost()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(to).await else {
                continue;
            };
            let tamper = tamper.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if tamper.swap(false, Ordering::SeqCst) {
                            // Inside the record, past its 5-byte header.
                            let at = (n - 1).min(12);
                            buf[at] ^= 0x01;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tampered_frame_breaks_the_connection_and_delivers_nothing() {
    let (logs, _guard) = Logs::install();
    let ca = Ca::new("cluster");
    let (a, _rx_a) = start(tls_config(&ca, 1));
    let (b, mut rx_b) = start(tls_config(&ca, 2));
    let tamper = Arc::new(AtomicBool::new(false));
    let proxy = tampering_proxy(b.local_addr(), tamper.clone()).await;
    a.set_peer(2, proxy).expect("set_peer");
    assert_delivers(&a, &mut rx_b, 2, 1).await;

    // One bit of the record carrying message 2 is flipped on the way.
    tamper.store(true, Ordering::SeqCst);
    a.send(msg(1, 2, 2));
    logs.wait_for(&["WARN", "bad frame from peer", "peer=1", "decrypt"])
        .await;
    assert!(!tamper.load(Ordering::SeqCst), "the proxy tampered");
    // The wire is clean again: member 1 redials and gets through.
    deliver_eventually(&a, &mut rx_b, 2, 3).await;
    // Nothing but intact messages 1 and 3 ever arrived: the tampered
    // record was not delivered, altered or not.
    let mut seen = vec![1, 3];
    while let Ok(ev) = rx_b.try_recv() {
        if let Inbound::Message(m) = ev {
            assert_eq!(m, msg(1, 2, m.term), "an altered message arrived");
            seen.push(m.term);
        }
    }
    assert!(!seen.contains(&2), "the tampered message was delivered");
    a.shutdown().await;
    b.shutdown().await;
}
