//! A fleet over TLS (`--tls-ca`) against an in-process gateway's TLS
//! listener, with a CA and server certificate made at run time: every
//! device connects and subscribes, and answers a command.

use std::time::Duration;

use device_sim::creds::{Provision, provision};
use device_sim::fleet::{Fleet, FleetConfig};
use device_sim::mqtt::{BrokerAddr, Tls};
use device_sim::rest::Api;
use gateway::Config;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_connects_over_tls_and_answers_commands() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "device-sim test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("server certificate");
    let (ca_file, cert_file, key_file) = (
        tmp.path().join("ca.pem"),
        tmp.path().join("server.pem"),
        tmp.path().join("server.key"),
    );
    std::fs::write(&ca_file, ca.pem()).expect("write");
    std::fs::write(&cert_file, server.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");

    let mut config = Config::single(
        tmp.path().join("gw"),
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    );
    config.tick = Duration::from_millis(5);
    config.mqtt_tls_cert = Some(cert_file);
    config.mqtt_tls_key = Some(key_file);
    let gw = gateway::start(config).await.expect("start");
    let token =
        std::fs::read_to_string(gw.admin_token_file.clone().expect("token file")).expect("token");
    let api = Api::new(
        &[format!("http://{}", gw.http_addr)],
        Some(token.trim().to_string()),
        Duration::from_secs(10),
        16,
    )
    .expect("api");
    let p = Provision {
        prefix: "tls-",
        count: 20,
        file: None,
        rotate_existing: false,
        concurrency: 8,
    };
    let creds = provision(Some(&api), &p).await.expect("register");

    let tls_addr = gw.mqtt_tls_addr.expect("the TLS listener is on");
    let mut fleet_config = FleetConfig::new(vec![BrokerAddr {
        host: tls_addr.ip().to_string(),
        port: tls_addr.port(),
    }]);
    fleet_config.behaviour.result_delay = Duration::from_millis(1);
    fleet_config.tls = Some(Tls::trusting(&ca_file).expect("the CA file"));
    let fleet = Fleet::start(fleet_config, &creds).expect("fleet");
    fleet
        .wait_subscribed(creds.len(), WAIT)
        .await
        .expect("every device subscribed over TLS");
    for c in creds.iter().take(3) {
        let cid = api
            .issue_command(0, &c.id, &json!({"name": "ping"}))
            .await
            .expect("issue");
        let cmd = api.command(&cid, Some(WAIT)).await.expect("command");
        assert_eq!(cmd["status"], json!("succeeded"), "{cmd}");
    }
    fleet.stop(Duration::from_secs(2)).await;

    // A CA file that is not there is an error naming it.
    let missing = tmp.path().join("no-such-ca.pem");
    let err = Tls::trusting(&missing).expect_err("no file").to_string();
    assert!(err.contains("no-such-ca.pem"), "{err}");
    gw.stop().await;
}
