//! Devices over TLS, end to end on real sockets: the TLS device listener
//! (rumqttc over rustls and Mosquitto's clients), login by client
//! certificate, revocation when the fingerprint changes, TLS garbage and
//! clients that never start a handshake, the connection cap, and start-up
//! errors naming the file. Certificates are made at run time (rcgen).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use entente_protocol::CommandMessage;
use gateway::Config;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::rustls;

mod common;

use common::{Seen, WAIT, connect_v4_with, connect_v5_with, metric};

/// A test CA and what it signed, as PEM files in a directory.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key (PEM files) and its SHA-256 fingerprint.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    cert_pem: String,
    key_pem: String,
    sha256: String,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
            .expect("CA certificate");
        let pki = Pki {
            dir: dir.join(name),
            ca,
        };
        std::fs::create_dir_all(&pki.dir).expect("pki dir");
        std::fs::write(pki.ca_file(), pki.ca.pem()).expect("write CA");
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The gateway's certificate: for 127.0.0.1 and localhost.
    fn server(&self) -> Leaf {
        self.leaf(
            "server",
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A device's client certificate (its id as the common name, which the
    /// gateway does not read: the fingerprint is what counts).
    fn client(&self, name: &str) -> Leaf {
        self.leaf(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let leaf = Leaf {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            sha256: sha256_hex(cert.der()),
        };
        std::fs::write(&leaf.cert, &leaf.cert_pem).expect("write cert");
        std::fs::write(&leaf.key, &leaf.key_pem).expect("write key");
        leaf
    }
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A device's TLS settings: trusts `ca`; presents `cert` if given.
fn client_tls(ca_pem: &str, cert: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA pem"))
        .expect("trust the CA");
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("cert pem")],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key pem"),
            )
            .expect("client cert"),
    };
    Arc::new(config)
}

/// An MQTT 3.1.1 device over TLS; logs in with `secret` if given.
fn tls_v4(
    addr: SocketAddr,
    id: &str,
    secret: Option<&str>,
    tls: Arc<rustls::ClientConfig>,
) -> common::Device {
    let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    if let Some(secret) = secret {
        opts.set_credentials(id, secret);
    }
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    connect_v4_with(opts)
}

/// An MQTT 5 device over TLS; logs in with `secret` if given.
fn tls_v5(
    addr: SocketAddr,
    id: &str,
    secret: Option<&str>,
    tls: Arc<rustls::ClientConfig>,
) -> common::Device {
    let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    if let Some(secret) = secret {
        opts.set_credentials(id, secret);
    }
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    connect_v5_with(opts)
}

type Env = common::Single;

/// A gateway with its TLS listener on (server certificate from `pki`,
/// client certificates of `pki` asked for), changed further by `tune`.
async fn boot(dir: &Path, pki: &Pki, tune: impl FnOnce(&mut Config)) -> Env {
    let server = pki.server();
    common::single(&dir.join("data"), |config| {
        config.mqtt_tls_cert = Some(server.cert);
        config.mqtt_tls_key = Some(server.key);
        config.mqtt_tls_client_ca = Some(pki.ca_file());
        tune(config);
    })
    .await
}

impl Env {
    fn tls(&self) -> SocketAddr {
        self.gw.mqtt_tls_addr.expect("the TLS listener is on")
    }

    /// A REST request: status and JSON body.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Registers a device; its secret, if it got one.
    async fn register_with(&self, body: Value) -> Option<String> {
        let (status, body) = self
            .call(reqwest::Method::POST, "/v1/devices", Some(body))
            .await;
        assert_eq!(status, 201, "{body}");
        body.get("secret").and_then(Value::as_str).map(String::from)
    }

    async fn command(&self, device: &str) -> String {
        let (status, c) = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/devices/{device}/commands"),
                Some(json!({"name": "blink"})),
            )
            .await;
        assert_eq!(status, 201, "{c}");
        c["id"].as_str().expect("id").to_string()
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Polls `/metrics` until `name` is `want` (bounded by [`WAIT`]).
    async fn metric_reaches(&self, name: &str, want: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = metric(&self.metrics().await, name);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {got}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until the device receives command `cid` (commands still open
/// from before come again on a new subscription, and are skipped).
async fn receive_command(d: &mut common::Device, id: &str, cid: &str) {
    loop {
        let msg: CommandMessage =
            serde_json::from_slice(&d.message(&format!("devices/{id}/commands")).await)
                .expect("command");
        if msg.id == cid {
            return;
        }
    }
}

/// The TLS listener serves both versions with the usual login (secret):
/// connect, subscribe, and receive a command issued through REST; the same
/// device on the plain listener still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_log_in_with_their_secret_over_tls_and_get_commands() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path(), "main");
    let env = boot(tmp.path(), &pki, |_| {}).await;
    assert_ne!(Some(env.tls()), env.gw.mqtt_addr);
    let secret = env.register("pump-1").await;
    let mut d = tls_v4(
        env.tls(),
        "pump-1",
        Some(&secret),
        client_tls(&pki.ca_pem(), None),
    );
    d.expect_connack().await;
    d.subscribed("devices/pump-1/commands").await;
    let cid = env.command("pump-1").await;
    receive_command(&mut d, "pump-1", &cid).await;
    d.disconnect().await;

    let mut d5 = tls_v5(
        env.tls(),
        "pump-1",
        Some(&secret),
        client_tls(&pki.ca_pem(), None),
    );
    d5.expect_connack().await;
    d5.subscribed("devices/pump-1/commands").await;
    let cid = env.command("pump-1").await;
    receive_command(&mut d5, "pump-1", &cid).await;
    // A report larger than the read buffer arrives in TLS records the
    // gateway decrypts in parts: the rest must not wait for more bytes on
    // the socket.
    let big = "x".repeat(40_000);
    d5.publish(
        "devices/pump-1/shadow/reported",
        serde_json::to_vec(&json!({ "blob": big })).expect("json"),
    )
    .await;
    loop {
        match d5.next().await {
            Seen::PubAck(_) => break,
            Seen::Closed(e) => panic!("closed: {e}"),
            _ => {}
        }
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, shadow) = env
            .call(reqwest::Method::GET, "/v1/devices/pump-1/shadow", None)
            .await;
        if shadow["reported"]["blob"].as_str().map(str::len) == Some(big.len()) {
            break;
        }
        assert!(Instant::now() < deadline, "the large report never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut wrong = tls_v4(
        env.tls(),
        "pump-1",
        Some("not-the-secret"),
        client_tls(&pki.ca_pem(), None),
    );
    let refused = wrong.expect_closed().await;
    assert!(refused.contains("BadUserNamePassword"), "{refused}");
    assert_eq!(
        metric(
            &env.metrics().await,
            "entente_mqtt_tls_handshake_failures_total"
        ),
        0
    );
    env.gw.stop().await;
}

/// A device registered with a certificate fingerprint (and no secret) logs
/// in with that certificate and no password, in both versions; another
/// device's certificate is refused (3.1.1: 5, MQTT 5: 0x87); without a
/// certificate it has nothing to log in with; a device with both may use
/// either. Registration checks the fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_log_in_with_their_client_certificate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path(), "main");
    let env = boot(tmp.path(), &pki, |_| {}).await;
    let (cam1, cam2, both) = (pki.client("cam-1"), pki.client("cam-2"), pki.client("both"));

    // Registration: a certificate only, no secret returned.
    let (status, body) = env
        .call(
            reqwest::Method::POST,
            "/v1/devices",
            Some(json!({"id": "cam-1", "cert_sha256": cam1.sha256, "auth": "certificate"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(body.get("secret").is_none(), "{body}");
    assert_eq!(body["device"]["cert_sha256"], json!(cam1.sha256));
    // The fingerprint as openssl prints it (upper case, colons) is stored
    // in the canonical form.
    let colons: Vec<String> = cam2
        .sha256
        .as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_uppercase())
        .collect();
    let (status, body) = env
        .call(
            reqwest::Method::POST,
            "/v1/devices",
            Some(json!({"id": "cam-2", "cert_sha256": colons.join(":"), "auth": "certificate"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["device"]["cert_sha256"], json!(cam2.sha256));
    let secret = env
        .register_with(json!({"id": "both", "cert_sha256": both.sha256}))
        .await
        .expect("a device with a certificate still gets a secret by default");
    // Refused: a fingerprint that is not one, a certificate-only device
    // without one, a fingerprint another device has.
    for (body, want) in [
        (json!({"id": "x", "cert_sha256": "abc"}), 422),
        (json!({"id": "x", "cert_sha256": "g".repeat(64)}), 422),
        (json!({"id": "x", "auth": "certificate"}), 422),
        (json!({"id": "x", "auth": "password"}), 422),
        (json!({"id": "x", "cert_sha256": cam1.sha256}), 409),
    ] {
        let (status, problem) = env
            .call(reqwest::Method::POST, "/v1/devices", Some(body.clone()))
            .await;
        assert_eq!(status, want, "{body}: {problem}");
    }
    let (status, problem) = env
        .call(
            reqwest::Method::PATCH,
            "/v1/devices/both",
            Some(json!({"cert_sha256": cam1.sha256})),
        )
        .await;
    assert_eq!(status, 409, "{problem}");
    // The API document says so.
    let (_, doc) = env.call(reqwest::Method::GET, "/openapi.json", None).await;
    let schemas = &doc["components"]["schemas"];
    for schema in ["NewDevice", "DeviceUpdate", "Device"] {
        assert!(
            schemas[schema]["properties"]["cert_sha256"].is_object(),
            "{schema}: {}",
            schemas[schema]
        );
    }
    assert_eq!(
        schemas["DeviceAuth"]["enum"],
        json!(["secret", "certificate"]),
        "{}",
        schemas["DeviceAuth"]
    );
    // So does the device contract: the TLS listener is a server whose
    // devices may log in by certificate or secret.
    let (status, doc) = env.call(reqwest::Method::GET, "/asyncapi.json", None).await;
    assert_eq!(status, 200);
    let mqtts = &doc["servers"]["mqtts"];
    assert_eq!(mqtts["host"], env.tls().to_string(), "{mqtts}");
    assert_eq!(mqtts["protocol"], "secure-mqtt", "{mqtts}");
    assert_eq!(
        mqtts["security"],
        json!([
            {"$ref": "#/components/securitySchemes/secret"},
            {"$ref": "#/components/securitySchemes/certificate"}
        ]),
        "{mqtts}"
    );

    // Its own certificate, no username or password: in.
    let mut d = tls_v4(
        env.tls(),
        "cam-1",
        None,
        client_tls(&pki.ca_pem(), Some(&cam1)),
    );
    d.expect_connack().await;
    d.subscribed("devices/cam-1/commands").await;
    let cid = env.command("cam-1").await;
    receive_command(&mut d, "cam-1", &cid).await;
    let mut d5 = tls_v5(
        env.tls(),
        "cam-2",
        None,
        client_tls(&pki.ca_pem(), Some(&cam2)),
    );
    d5.expect_connack().await;

    // Another device's certificate: not authorized, whatever the password.
    let mut wrong = tls_v4(
        env.tls(),
        "cam-2",
        None,
        client_tls(&pki.ca_pem(), Some(&cam1)),
    );
    let refused = wrong.expect_closed().await;
    assert!(refused.contains("NotAuthorized"), "3.1.1: {refused}");
    let mut wrong = tls_v5(
        env.tls(),
        "both",
        Some(&secret),
        client_tls(&pki.ca_pem(), Some(&cam1)),
    );
    let refused = wrong.expect_closed().await;
    assert!(refused.contains("NotAuthorized"), "MQTT 5: {refused}");
    // No certificate and no secret: nothing to log in with.
    let mut bare = tls_v4(
        env.tls(),
        "cam-1",
        Some("guess"),
        client_tls(&pki.ca_pem(), None),
    );
    let refused = bare.expect_closed().await;
    assert!(refused.contains("BadUserNamePassword"), "{refused}");
    // Both ways for a device with both.
    let mut by_secret = tls_v4(
        env.tls(),
        "both",
        Some(&secret),
        client_tls(&pki.ca_pem(), None),
    );
    by_secret.expect_connack().await;
    by_secret.disconnect().await;
    let mut by_cert = tls_v4(
        env.tls(),
        "both",
        None,
        client_tls(&pki.ca_pem(), Some(&both)),
    );
    by_cert.expect_connack().await;

    // A certificate of another CA fails the handshake (counted).
    let stranger = Pki::new(tmp.path(), "stranger").client("cam-1");
    let mut foreign = tls_v4(
        env.tls(),
        "cam-1",
        None,
        client_tls(&pki.ca_pem(), Some(&stranger)),
    );
    foreign.expect_closed().await;
    env.metric_reaches("entente_mqtt_tls_handshake_failures_total", 1)
        .await;
    let m = env.metrics().await;
    assert_eq!(metric(&m, "entente_mqtt_auth_failures_total"), 3, "{m}");
    env.gw.stop().await;
}

/// Changing or removing a device's fingerprint ends the session that
/// logged in with the old certificate (MQTT 5: 0x98); rotating its secret
/// does not. A session that logged in with the secret survives a change
/// of the fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_fingerprint_ends_the_certificate_session() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path(), "main");
    let env = boot(tmp.path(), &pki, |_| {}).await;
    let (old, new) = (pki.client("old"), pki.client("new"));
    let secret = env
        .register_with(json!({"id": "dev", "cert_sha256": old.sha256}))
        .await
        .expect("secret");
    let mut d = tls_v5(
        env.tls(),
        "dev",
        None,
        client_tls(&pki.ca_pem(), Some(&old)),
    );
    d.expect_connack().await;
    d.subscribed("devices/dev/commands").await;
    // A new secret leaves the certificate session alone: it still gets a
    // command issued after the rotation applied.
    let (status, _) = env
        .call(reqwest::Method::POST, "/v1/devices/dev/secret", None)
        .await;
    assert_eq!(status, 200);
    let cid = env.command("dev").await;
    receive_command(&mut d, "dev", &cid).await;

    let (status, body) = env
        .call(
            reqwest::Method::PATCH,
            "/v1/devices/dev",
            Some(json!({"cert_sha256": new.sha256})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cert_sha256"], json!(new.sha256));
    assert_eq!(
        ended(&mut d).await,
        "DISCONNECT 0x98",
        "administrative action"
    );
    // The old certificate is refused now; the new one gets in.
    let mut again = tls_v5(
        env.tls(),
        "dev",
        None,
        client_tls(&pki.ca_pem(), Some(&old)),
    );
    let refused = again.expect_closed().await;
    assert!(refused.contains("NotAuthorized"), "{refused}");
    let mut d = tls_v5(
        env.tls(),
        "dev",
        None,
        client_tls(&pki.ca_pem(), Some(&new)),
    );
    d.expect_connack().await;
    // Removing the fingerprint ends that session too.
    let (status, body) = env
        .call(
            reqwest::Method::PATCH,
            "/v1/devices/dev",
            Some(json!({"cert_sha256": null})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cert_sha256"], Value::Null);
    assert_eq!(ended(&mut d).await, "DISCONNECT 0x98");

    // A session on the (rotated) secret is not touched by fingerprint
    // changes: it still gets a command issued after one.
    let (_, rotated) = env
        .call(reqwest::Method::POST, "/v1/devices/dev/secret", None)
        .await;
    let secret_now = rotated["secret"].as_str().expect("secret").to_string();
    assert_ne!(secret_now, secret);
    let mut s = tls_v5(
        env.tls(),
        "dev",
        Some(&secret_now),
        client_tls(&pki.ca_pem(), None),
    );
    s.expect_connack().await;
    s.subscribed("devices/dev/commands").await;
    let (status, _) = env
        .call(
            reqwest::Method::PATCH,
            "/v1/devices/dev",
            Some(json!({"cert_sha256": old.sha256})),
        )
        .await;
    assert_eq!(status, 200);
    let cid = env.command("dev").await;
    receive_command(&mut s, "dev", &cid).await;
    env.gw.stop().await;
}

/// A device that sends many packets in one write: two full TLS records
/// and one of 10,000 bytes. The gateway's read takes 4 KiB, so after the
/// socket is drained rustls still holds decrypted bytes that the socket
/// will never signal again. Every publish is acknowledged without the
/// device sending anything more (its keep-alive is a minute, so no ping
/// comes to help).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_in_one_tls_write_is_read_to_the_end() {
    use rumqttc::mqttbytes::{QoS, v4};
    /// Two records of 16 KiB of plaintext (TLS's most) and 10,000 bytes.
    const BURST_BYTES: usize = 2 * 16_384 + 10_000;
    const TOPIC: &str = "devices/burst/shadow/reported";
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path(), "main");
    let env = boot(tmp.path(), &pki, |_| {}).await;
    let secret = env
        .register_with(json!({"id": "burst"}))
        .await
        .expect("secret");
    let connector = tokio_rustls::TlsConnector::from(client_tls(&pki.ca_pem(), None));
    let tcp = TcpStream::connect(env.tls()).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut s = connector.connect(name, tcp).await.expect("handshake");
    let mut out = bytes::BytesMut::new();
    let mut c = v4::Connect::new("burst");
    c.set_login("burst", &secret);
    c.keep_alive = 60;
    c.write(&mut out).expect("encode");
    s.write_all(&out).await.expect("send");
    s.flush().await.expect("flush");
    let mut buf = bytes::BytesMut::new();
    let deadline = Instant::now() + WAIT;
    let connack = next_packet(&mut s, &mut buf, deadline).await;
    assert!(
        matches!(connack, Some(v4::Packet::ConnAck(_))),
        "{connack:?}"
    );
    let publish = |pkid: u16, pad: usize, out: &mut bytes::BytesMut| {
        let patch = format!(r#"{{"pad":"{}"}}"#, "p".repeat(pad));
        let mut p = v4::Publish::new(TOPIC, QoS::AtLeastOnce, patch.into_bytes());
        p.pkid = pkid;
        p.write(out).expect("encode");
    };
    let mut burst = bytes::BytesMut::new();
    let mut count = 0;
    while burst.len() + 1_000 < BURST_BYTES {
        count += 1;
        publish(count, 80, &mut burst);
    }
    // The last one fills it up exactly: fixed header (1 + 2 bytes of
    // length), topic (2 + its length), packet id (2), `{"pad":""}` (10).
    let fixed = 3 + 2 + TOPIC.len() + 2 + 10;
    count += 1;
    publish(count, BURST_BYTES - burst.len() - fixed, &mut burst);
    assert_eq!(burst.len(), BURST_BYTES);
    s.write_all(&burst).await.expect("send");
    s.flush().await.expect("flush");
    let mut acked = 0;
    while acked < count {
        match next_packet(&mut s, &mut buf, deadline).await {
            Some(v4::Packet::PubAck(_)) => acked += 1,
            Some(_) => {}
            None => panic!("{acked} of {count} publishes acknowledged within {WAIT:?}"),
        }
    }
    env.gw.stop().await;
}

/// The next MQTT 3.1.1 packet on a raw TLS connection; `None` if the
/// connection ends or nothing comes before `deadline`.
async fn next_packet<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut bytes::BytesMut,
    deadline: Instant,
) -> Option<rumqttc::mqttbytes::v4::Packet> {
    loop {
        if let Ok(p) = rumqttc::mqttbytes::v4::Packet::read(buf, 1 << 20) {
            return Some(p);
        }
        match timeout_at(deadline, s.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// How the device's session ended (its pings answered meanwhile), within
/// [`WAIT`].
async fn ended(d: &mut common::Device) -> String {
    timeout(WAIT, d.expect_closed())
        .await
        .expect("the session ended in time")
}

/// A tiny seeded generator for the random bytes (SplitMix64).
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// Reads until the gateway closes the connection: what it sent first.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was not closed within {WAIT:?}"),
        }
    }
}

/// TLS garbage — a plain MQTT CONNECT or random bytes on the TLS port — is
/// answered with a TLS alert and the connection closed; clients that open
/// a connection and never send a ClientHello are closed at the connect
/// deadline. Meanwhile a device logs in and is served: nothing waits for
/// them. Every one is counted; a TCP probe that closes at once is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_garbage_and_silent_clients_end_alone_and_are_counted() {
    const SILENT: usize = 20;
    const DEADLINE: Duration = Duration::from_secs(3);
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path(), "main");
    let env = boot(tmp.path(), &pki, |c| c.mqtt_connect_timeout = DEADLINE).await;
    let secret = env
        .register_with(json!({"id": "ok"}))
        .await
        .expect("secret");

    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(env.tls()).await.expect("connect"));
    }
    // A probe: connect and close at once.
    drop(TcpStream::connect(env.tls()).await.expect("probe"));

    // Plain MQTT to the TLS port: a TLS alert (content type 21), closed,
    // never a CONNACK.
    let mut plain = TcpStream::connect(env.tls()).await.expect("connect");
    let mut connect = bytes::BytesMut::new();
    let mut c = rumqttc::mqttbytes::v4::Connect::new("ok");
    c.set_login("ok", &secret);
    c.write(&mut connect).expect("encode");
    plain.write_all(&connect).await.expect("send");
    let answer = until_closed(&mut plain).await;
    assert_eq!(answer.first(), Some(&21), "a TLS alert: {answer:?}");
    // Random bytes: the same.
    let mut noise = TcpStream::connect(env.tls()).await.expect("connect");
    let mut bytes = random_bytes(0x5eed, 512);
    bytes[0] = 0x42; // not a TLS record type, whatever the seed gives
    noise.write_all(&bytes).await.expect("send");
    let answer = until_closed(&mut noise).await;
    assert_eq!(answer.first(), Some(&21), "a TLS alert: {answer:?}");

    // A device is served while the silent ones wait for their deadline.
    let mut d = tls_v4(
        env.tls(),
        "ok",
        Some(&secret),
        client_tls(&pki.ca_pem(), None),
    );
    d.expect_connack().await;
    d.subscribed("devices/ok/commands").await;
    let cid = env.command("ok").await;
    receive_command(&mut d, "ok", &cid).await;
    assert!(
        opened.elapsed() < DEADLINE,
        "the device was served before the silent clients' deadline ({:?})",
        opened.elapsed()
    );
    for s in &silent {
        let mut b = [0u8; 1];
        assert!(
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a silent client is still open while the device was served"
        );
    }
    // Then each silent one is closed at its deadline (no alert: nothing
    // was started).
    for mut s in silent {
        let answer = until_closed(&mut s).await;
        assert!(answer.is_empty(), "{answer:?}");
    }
    assert!(opened.elapsed() >= DEADLINE - Duration::from_millis(100));
    let failures = 2 + SILENT as u64;
    env.metric_reaches("entente_mqtt_tls_handshake_failures_total", failures)
        .await;
    // The device is still served after all of it.
    let cid = env.command("ok").await;
    receive_command(&mut d, "ok", &cid).await;
    env.gw.stop().await;
}

/// TLS connections count against the device connection cap like the
/// others: with two slots held by TLS clients in their handshake, a third
/// connection (to either listener) is closed at once; once their deadline
/// has freed the slots, a device logs in over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_connections_count_against_the_connection_cap() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path(), "main");
    let env = boot(tmp.path(), &pki, |c| {
        c.mqtt_max_connections = 2;
        c.mqtt_connect_timeout = Duration::from_secs(1);
    })
    .await;
    let secret = env
        .register_with(json!({"id": "ok"}))
        .await
        .expect("secret");
    let held = [
        TcpStream::connect(env.tls()).await.expect("connect"),
        TcpStream::connect(env.tls()).await.expect("connect"),
    ];
    // Accepted in order after the two, so both hold their slots by now.
    let mut third = TcpStream::connect(env.tls()).await.expect("connect");
    assert!(until_closed(&mut third).await.is_empty());
    let mut plain = TcpStream::connect(env.gw.mqtt_addr.expect("plain"))
        .await
        .expect("connect");
    assert!(until_closed(&mut plain).await.is_empty());
    env.metric_reaches("entente_mqtt_connections_refused_total", 2)
        .await;
    for mut s in held {
        until_closed(&mut s).await;
    }
    // The slots come back once the tasks have ended.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut d = tls_v4(
            env.tls(),
            "ok",
            Some(&secret),
            client_tls(&pki.ca_pem(), None),
        );
        match d.next().await {
            Seen::ConnAck => break,
            Seen::Closed(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    env.gw.stop().await;
}

/// Mosquitto's clients (OpenSSL) against the TLS listener: `mosquitto_sub`
/// with `--cafile`, `--cert` and `--key` logs in by certificate alone and
/// receives its command; `mosquitto_pub` with the CA and a password
/// publishes reported state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_clients_use_the_tls_listener() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path(), "main");
    let env = boot(tmp.path(), &pki, |_| {}).await;
    let cert = pki.client("mosq");
    let secret = env
        .register_with(json!({"id": "mosq", "cert_sha256": cert.sha256}))
        .await
        .expect("secret");
    let port = env.tls().port().to_string();
    let ca = pki.ca_file();
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv311", "-q", "1"])
        .arg("--cafile")
        .arg(&ca)
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .args([
            "-i",
            "mosq",
            "-t",
            "devices/mosq/commands",
            "-C",
            "1",
            "-W",
            "30",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (install mosquitto-clients)");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, d) = env
            .call(reqwest::Method::GET, "/v1/devices/mosq", None)
            .await;
        if d["online"] == json!(true) {
            break;
        }
        assert!(Instant::now() < deadline, "mosquitto_sub never came online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cid = env.command("mosq").await;
    let out = timeout_at(Instant::now() + WAIT, sub.wait_with_output())
        .await
        .expect("mosquitto_sub finished in time")
        .expect("mosquitto_sub output");
    assert!(out.status.success(), "{out:?}");
    let msg: CommandMessage = serde_json::from_slice(&out.stdout).expect("a command");
    assert_eq!(msg.id, cid);

    let publish = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
        .arg("--cafile")
        .arg(&ca)
        .args(["-i", "mosq", "-u", "mosq", "-P", &secret])
        .args([
            "-t",
            "devices/mosq/shadow/reported",
            "-m",
            r#"{"fw": "2.0"}"#,
        ])
        .output();
    let out = timeout(WAIT, publish)
        .await
        .expect("mosquitto_pub finished in time")
        .expect("mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, shadow) = env
            .call(reqwest::Method::GET, "/v1/devices/mosq/shadow", None)
            .await;
        if shadow["reported"]["fw"] == json!("2.0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reported state never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.gw.stop().await;
}

/// A start with unusable TLS files fails at once with an error naming the
/// file; a client CA without the listener, or half of a key pair, is
/// refused as a setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_stop_the_start_naming_the_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path(), "main");
    let server = pki.server();
    let other = pki.client("other");
    let garbage = tmp.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let missing = tmp.path().join("missing.pem");
    // Certificate, key and client CA files; what the error must name.
    type Case = (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>, String);
    let cases: Vec<Case> = vec![
        (
            Some(missing.clone()),
            Some(server.key.clone()),
            None,
            missing.display().to_string(),
        ),
        (
            Some(garbage.clone()),
            Some(server.key.clone()),
            None,
            garbage.display().to_string(),
        ),
        (
            Some(server.cert.clone()),
            Some(garbage.clone()),
            None,
            garbage.display().to_string(),
        ),
        (
            Some(server.cert.clone()),
            Some(other.key.clone()),
            None,
            "do not make a server identity".into(),
        ),
        (
            Some(server.cert.clone()),
            Some(server.key.clone()),
            Some(garbage.clone()),
            garbage.display().to_string(),
        ),
        (
            Some(server.cert.clone()),
            None,
            None,
            "--mqtt-tls-key".into(),
        ),
        (
            None,
            None,
            Some(pki.ca_file()),
            "--mqtt-tls-client-ca".into(),
        ),
    ];
    for (i, (cert, key, ca, want)) in cases.into_iter().enumerate() {
        let mut config = Config::single(
            tmp.path().join(format!("data-{i}")),
            "127.0.0.1:0".parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
        );
        config.mqtt_tls_cert = cert;
        config.mqtt_tls_key = key;
        config.mqtt_tls_client_ca = ca;
        let err = gateway::start(config)
            .await
            .expect_err("the start is refused")
            .to_string();
        assert!(
            err.contains(&want),
            "case {i}: {err:?} should name {want:?}"
        );
    }
}
