//! Mutual TLS between members: the certificates a node presents and
//! trusts, the rustls settings made from them, the rule that ties a
//! certificate to a node id, and the stream type both kinds of connection
//! share.
//!
//! Every member presents a certificate issued by the cluster's CA and
//! verifies its peer's chain against that CA (and nothing else). A member's
//! certificate names it with the DNS subject alternative name
//! [`peer_tls_name`]`(cluster_id, node_id)`, `node-<id>.<cluster-id>.entente`:
//! the dialer asks rustls to check the acceptor's certificate for the node
//! it dials; the acceptor checks the dialer's certificate for the node id
//! the dialer claims in its `Hello`, before it answers `Welcome`.
//!
//! TLS 1.3 only, with the ring provider; no session resumption (every
//! connection runs the full handshake, so every connection's certificates
//! are verified), no server name sent in the clear.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::raft::NodeId;

/// The first byte of every TLS connection (a handshake record). A plain
/// connection starts with a frame's length prefix, whose first byte is 0
/// for any handshake frame, so the two cannot be confused.
pub(crate) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The name a member's certificate must carry (as a DNS subject alternative
/// name): `node-<node_id>.<cluster_id>.entente`. With peer TLS the cluster
/// id must therefore be usable in a DNS name (letters, digits, `-`, `.`).
pub fn peer_tls_name(cluster_id: &str, node_id: NodeId) -> String {
    format!("node-{node_id}.{cluster_id}.entente")
}

/// What a member presents and trusts: the cluster CA's certificate(s), its
/// own certificate chain (leaf first) and its private key. Made from PEM;
/// see [`PeerTls::from_pem`].
pub struct PeerTls {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for PeerTls {
    fn clone(&self) -> Self {
        PeerTls {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("ca", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the {what} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("the {what} holds no CERTIFICATE section"));
    }
    Ok(certs)
}

impl PeerTls {
    /// From PEM text: `ca` the cluster CA certificate(s), `cert` this
    /// member's certificate chain (leaf first), `key` its private key
    /// (PKCS#8, PKCS#1 or SEC1). The error says which part is wrong.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<PeerTls, String> {
        let ca = certs(ca, "CA certificate file")?;
        let chain = certs(cert, "certificate file")?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            format!(
                "cannot read a private key (PEM: PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY): {e}"
            )
        })?;
        Ok(PeerTls { ca, chain, key })
    }

    /// [`PeerTls::from_pem`] from three files; the error names the file.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<PeerTls, String> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let (ca_pem, cert_pem, key_pem) = (read(ca)?, read(cert)?, read(key)?);
        let ca_set =
            certs(&ca_pem, "CA certificate file").map_err(|e| format!("{}: {e}", ca.display()))?;
        let chain =
            certs(&cert_pem, "certificate file").map_err(|e| format!("{}: {e}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            format!(
                "{}: cannot read a private key (PEM: PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY): {e}",
                key.display()
            )
        })?;
        Ok(PeerTls {
            ca: ca_set,
            chain,
            key,
        })
    }
}

/// ring's provider (as the device listener's TLS; rustls marks it
/// deprecated for lacking the post-quantum hybrid key exchange, which only
/// aws-lc-rs offers, at the price of a far larger C build).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls settings of a running transport.
#[derive(Clone)]
pub(crate) struct TlsContext {
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsContext")
    }
}

/// The name `cluster_id` and `node_id` make, as rustls takes it.
pub(crate) fn server_name(
    cluster_id: &str,
    node_id: NodeId,
) -> Result<ServerName<'static>, String> {
    let name = peer_tls_name(cluster_id, node_id);
    match ServerName::try_from(name.clone()) {
        Ok(n @ ServerName::DnsName(_)) => Ok(n),
        _ => Err(format!(
            "with peer TLS the cluster id must be usable in a DNS name (letters, digits, '-' \
             and '.'): {name:?} is not one"
        )),
    }
}

/// Whether the DER certificate `cert` names `node_id` of `cluster_id`.
pub(crate) fn names_node(
    cert: &CertificateDer<'_>,
    cluster_id: &str,
    node_id: NodeId,
) -> Result<(), String> {
    let name = server_name(cluster_id, node_id)?;
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    parsed.verify_is_valid_for_subject_name(&name).map_err(|_| {
        format!(
            "the certificate does not name node {node_id} (it must carry the DNS name {})",
            peer_tls_name(cluster_id, node_id)
        )
    })
}

impl TlsContext {
    /// Builds the settings, checking that this member's own certificate
    /// names it.
    pub(crate) fn new(
        tls: &PeerTls,
        cluster_id: &str,
        node_id: NodeId,
    ) -> Result<TlsContext, String> {
        let leaf = tls.chain.first().ok_or("the certificate file is empty")?;
        names_node(leaf, cluster_id, node_id).map_err(|e| format!("this member's own {e}"))?;
        let mut roots = RootCertStore::empty();
        for ca in &tls.ca {
            roots
                .add(ca.clone())
                .map_err(|e| format!("a certificate in the CA file is not usable: {e}"))?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| format!("the CA file: {e}"))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(tls.chain.clone(), tls.key.clone_key())
            .map_err(|e| format!("the certificate and the key do not make an identity: {e}"))?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
            .map_err(|e| format!("the certificate and the key do not make an identity: {e}"))?;
        client.resumption = Resumption::disabled();
        client.enable_sni = false;
        Ok(TlsContext {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The rustls error inside an I/O error, if that is what it is.
pub(crate) fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A connection between members: plain TCP, or TLS over TCP.
pub(crate) enum PeerStream {
    /// Plain TCP (no peer TLS configured).
    Plain(TcpStream),
    /// TLS, either side.
    Tls(Box<TlsStream<TcpStream>>),
}

impl fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerStream::Plain(_) => f.write_str("PeerStream::Plain"),
            PeerStream::Tls(_) => f.write_str("PeerStream::Tls"),
        }
    }
}

impl PeerStream {
    /// The peer's certificate (the leaf), on a TLS connection.
    pub(crate) fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        match self {
            PeerStream::Plain(_) => None,
            PeerStream::Tls(s) => s.get_ref().1.peer_certificates()?.first(),
        }
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
