//! TLS for devices (docs/ARCHITECTURE.md, "Devices over MQTT"): the
//! server's certificate and key, the optional CA whose client certificates
//! are asked for, and a connection's client-certificate fingerprint.
//!
//! rustls with the ring provider, named explicitly (no process-wide default
//! is installed or relied on). The handshake itself runs in each
//! connection's task, under the CONNECT deadline (see `endpoint.rs`).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, ServerConnection};

/// What the TLS listener is set up from (PEM files).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Files<'a> {
    /// The server's certificate chain, leaf first.
    pub(crate) cert: &'a Path,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub(crate) key: &'a Path,
    /// CAs whose client certificates are asked for (optional for the
    /// client: a device may log in with its secret instead).
    pub(crate) client_ca: Option<&'a Path>,
}

/// ring's provider: key exchange X25519, P-256 or P-384 (rustls marks it
/// deprecated for lacking the post-quantum hybrid X25519MLKEM768, which
/// only aws-lc-rs offers, at the price of a far larger C build).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

fn config_error(file: &Path, what: &str, e: impl std::fmt::Display) -> String {
    format!("MQTT TLS: {what} {}: {e}", file.display())
}

fn read_certs(file: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| config_error(file, &format!("cannot read the {what}"), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(file, &format!("the {what} is not valid PEM"), e))?;
    if certs.is_empty() {
        return Err(config_error(
            file,
            &format!("the {what}"),
            "holds no CERTIFICATE section",
        ));
    }
    Ok(certs)
}

/// Builds the settings of the TLS device listener. Every error names the
/// file it is about.
pub(crate) fn server_config(files: Files<'_>) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(files.cert, "certificate file")?;
    let key = PrivateKeyDer::from_pem_file(files.key).map_err(|e| {
        config_error(
            files.key,
            "cannot read a private key (PEM: PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) from",
            e,
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("MQTT TLS: {e}"))?;
    let builder = match files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "client CA file")? {
                roots
                    .add(cert)
                    .map_err(|e| config_error(ca, "a certificate in the client CA file", e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                // A device may still log in with its secret.
                .allow_unauthenticated()
                .build()
                .map_err(|e| config_error(ca, "the client CA file", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "MQTT TLS: the certificate {} and the key {} do not make a server identity: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    Ok(Arc::new(config))
}

/// The SHA-256 (lowercase hex) of the client's certificate (the leaf, as
/// DER), if it presented one.
pub(crate) fn client_fingerprint(conn: &ServerConnection) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    Some(fingerprint(leaf.as_ref()))
}

/// Lowercase hex SHA-256 of a DER certificate: what `cert_sha256` holds.
pub(crate) fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
