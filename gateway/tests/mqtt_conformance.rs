//! What devices expect of a broker, checked packet by packet on raw sockets
//! (docs/ARCHITECTURE.md, "Devices over MQTT"): the MQTT 5 CONNACK
//! advertises what the endpoint offers and caps the keep-alive, a feature
//! it says it lacks is refused with the reason the specification names,
//! UNSUBACK and SUBACK carry per-filter codes, a message larger than the
//! device takes is not sent to it, keep-alives are enforced at 1.5 ×, and
//! "session present" follows MQTT 5's Session Expiry Interval.

mod common;
#[path = "support/mqtt_raw.rs"]
mod mqtt_raw;

use std::time::Duration;

use bytes::BytesMut;
use entente_protocol::CommandMessage;
use mqtt_raw::{Pkt, RawDevice, connect4, connect5, disconnect5_with_expiry};
use rumqttc::mqttbytes::{QoS as QoS4, v4};
use rumqttc::v5::mqttbytes::{QoS, v5};
use serde_json::{Value, json};

type Env = common::Single;

async fn boot(dir: &std::path::Path) -> Env {
    common::single_with(dir, common::loopback_listeners(), |_| {}).await
}

impl Env {
    fn v4(&self) -> std::net::SocketAddr {
        self.gw.mqtt_addr.expect("mqtt listener")
    }

    fn v5(&self) -> std::net::SocketAddr {
        self.gw.mqtt5_addr.expect("mqtt5 listener")
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("post");
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.expect("json")
    }

    async fn command(&self, device: &str, body: Value) -> String {
        let c = self
            .post(&format!("/v1/devices/{device}/commands"), body)
            .await;
        c["id"].as_str().expect("id").to_string()
    }

    async fn metric(&self, name: &str) -> u64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        common::metric(&text, name)
    }
}

fn subscribe5(filters: &[&str], properties: Option<v5::SubscribeProperties>) -> BytesMut {
    let filters = filters
        .iter()
        .map(|f| v5::Filter::new(*f, QoS::AtLeastOnce));
    let mut s = v5::Subscribe::new_many(filters, properties);
    s.pkid = 1;
    let mut b = BytesMut::new();
    s.write(&mut b).expect("encode");
    b
}

fn publish5(topic: &str, qos: QoS, f: impl FnOnce(&mut v5::Publish)) -> BytesMut {
    let mut p = v5::Publish::new(topic, qos, b"{}".to_vec(), None);
    p.pkid = 3;
    f(&mut p);
    let mut b = BytesMut::new();
    p.write(&mut b).expect("encode");
    b
}

/// Logs in over MQTT 5 with `f` adjusting the CONNECT; the CONNACK.
async fn login5(
    env: &Env,
    id: &str,
    secret: &str,
    f: impl FnOnce(&mut v5::Connect),
) -> (RawDevice, v5::ConnAck) {
    let mut d = RawDevice::open(env.v5(), true).await;
    d.send(&connect5(id, secret, f)).await;
    let ack = d.connack5().await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success, "{ack:?}");
    (d, ack)
}

/// The CONNACK tells an MQTT 5 client what the endpoint offers (Maximum QoS
/// 1, no retained messages, wildcards within its topics but no shared
/// subscriptions, subscription identifiers or topic aliases, its Receive
/// Maximum and Maximum Packet Size), and a keep-alive of 0 (none) or above
/// 1,200 s is answered with a Server Keep Alive of 1,200 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt5_connack_advertises_what_is_offered_and_caps_the_keep_alive() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("ka").await;
    for (asked, told) in [(0, Some(1_200)), (65_535, Some(1_200)), (60, None)] {
        let (_d, ack) = login5(&env, "ka", &secret, |c| c.keep_alive = asked).await;
        let p = ack.properties.expect("CONNACK properties");
        assert_eq!(p.server_keep_alive, told, "keep-alive {asked}");
        assert_eq!(p.max_qos, Some(1));
        assert_eq!(p.retain_available, Some(0));
        assert_eq!(p.wildcard_subscription_available, Some(1));
        assert_eq!(p.shared_subscription_available, Some(0));
        assert_eq!(p.subscription_identifiers_available, Some(0));
        assert_eq!(p.topic_alias_max, Some(0));
        assert_eq!(p.receive_max, Some(100));
        assert_eq!(p.max_packet_size, Some(256 * 1024));
    }
    env.gw.stop().await;
}

/// An MQTT 5 client that uses what the CONNACK said is not available
/// commits a protocol error, and is disconnected with the reason code the
/// specification gives for it; 3.1.1 has no such advertisement: its QoS 2
/// publish goes through the QoS 2 exchange, its retain flag is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_features_not_offered_are_refused_with_their_reason() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("f").await;
    let reported = entente_protocol::reported_topic("f");
    let alias = v5::PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    };
    let cases: Vec<(&str, BytesMut, u8)> = vec![
        (
            "a retained message",
            publish5(&reported, QoS::AtLeastOnce, |p| p.retain = true),
            0x9A,
        ),
        ("QoS 2", publish5(&reported, QoS::ExactlyOnce, |_| {}), 0x9B),
        (
            "a topic alias",
            publish5(&reported, QoS::AtLeastOnce, |p| {
                p.properties = Some(alias.clone())
            }),
            0x94,
        ),
        (
            "a shared subscription",
            subscribe5(&["$share/g/devices/f/commands"], None),
            0x9E,
        ),
        (
            "a subscription identifier",
            subscribe5(
                &["devices/f/commands"],
                Some(v5::SubscribeProperties {
                    id: Some(7),
                    user_properties: Vec::new(),
                }),
            ),
            0xA1,
        ),
    ];
    for (what, packet, code) in cases {
        let (mut d, _) = login5(&env, "f", &secret, |_| {}).await;
        d.send(&packet).await;
        assert_eq!(d.disconnect_reason().await, code, "{what}");
    }

    // MQTT 3.1.1: QoS 2 is served (PUBREC, then PUBCOMP for the PUBREL),
    // a retained publish is taken as any other (PUBACK) and not retained.
    let mut d = RawDevice::open(env.v4(), false).await;
    d.send(&connect4("f", &secret, |_| {})).await;
    assert!(
        matches!(d.next4().await, v4::Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success)
    );
    let mut b = BytesMut::new();
    let mut p = v4::Publish::new(&reported, QoS4::ExactlyOnce, b"{\"q\": 2}".to_vec());
    p.pkid = 5;
    p.write(&mut b).expect("encode");
    d.send(&b).await;
    assert!(matches!(d.next4().await, v4::Packet::PubRec(r) if r.pkid == 5));
    let mut b = BytesMut::new();
    v4::PubRel::new(5).write(&mut b).expect("encode");
    d.send(&b).await;
    assert!(matches!(d.next4().await, v4::Packet::PubComp(c) if c.pkid == 5));
    let mut b = BytesMut::new();
    let mut p = v4::Publish::new(&reported, QoS4::AtLeastOnce, b"{\"r\": 1}".to_vec());
    p.pkid = 6;
    p.retain = true;
    p.write(&mut b).expect("encode");
    d.send(&b).await;
    assert!(matches!(d.next4().await, v4::Packet::PubAck(a) if a.pkid == 6));
    env.gw.stop().await;
}

/// UNSUBACK says per filter whether the session held it (MQTT 5: 0x00 or
/// 0x11 "no subscription existed"); SUBACK refuses filters past a session's
/// 16 with 0x97 "quota exceeded" (3.1.1: 0x80); wildcards within the
/// device's own topics are granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsuback_and_suback_answer_per_filter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("u").await;
    let (mut d, _) = login5(&env, "u", &secret, |_| {}).await;
    d.send(&subscribe5(&["devices/u/#"], None)).await;
    match d.next5_not_publish().await {
        v5::Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            [v5::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        ),
        other => panic!("{other:?}"),
    }
    let mut u = v5::Unsubscribe::new("devices/u/#", None);
    u.filters.push("devices/u/never".into());
    u.pkid = 2;
    let mut b = BytesMut::new();
    u.write(&mut b).expect("encode");
    d.send(&b).await;
    match d.next5_not_publish().await {
        v5::Packet::UnsubAck(a) => {
            assert_eq!(a.pkid, 2);
            assert_eq!(
                a.reasons,
                [
                    v5::UnsubAckReason::Success,
                    v5::UnsubAckReason::NoSubscriptionExisted
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    let many: Vec<String> = (0..17).map(|i| format!("devices/u/f{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    d.send(&subscribe5(&refs, None)).await;
    match d.next5_not_publish().await {
        v5::Packet::SubAck(a) => {
            assert_eq!(a.return_codes.len(), 17);
            assert_eq!(a.return_codes[16], v5::SubscribeReasonCode::QuotaExceeded);
            assert!(
                a.return_codes[..16]
                    .iter()
                    .all(|c| *c == v5::SubscribeReasonCode::Success(QoS::AtLeastOnce))
            );
        }
        other => panic!("{other:?}"),
    }

    let mut d = RawDevice::open(env.v4(), false).await;
    d.send(&connect4("u", &secret, |_| {})).await;
    assert!(matches!(d.next4().await, v4::Packet::ConnAck(_)));
    let mut s = v4::Subscribe::new("devices/u/a", QoS4::AtLeastOnce);
    for i in 0..16 {
        s.add(format!("devices/u/b{i}"), QoS4::AtLeastOnce);
    }
    s.pkid = 4;
    let mut b = BytesMut::new();
    s.write(&mut b).expect("encode");
    d.send(&b).await;
    match d.next4().await {
        v4::Packet::SubAck(a) => {
            assert_eq!(a.return_codes.len(), 17);
            assert_eq!(a.return_codes[16], v4::SubscribeReasonCode::Failure);
        }
        other => panic!("{other:?}"),
    }
    let mut b = BytesMut::new();
    let mut u = v4::Unsubscribe::new("devices/u/a");
    u.pkid = 8;
    u.write(&mut b).expect("encode");
    d.send(&b).await;
    assert!(matches!(d.next4().await, v4::Packet::UnsubAck(a) if a.pkid == 8));
    env.gw.stop().await;
}

/// A message larger than the Maximum Packet Size an MQTT 5 device announced
/// is not sent to it (the specification says to discard it as if it had
/// been delivered), counted; the next one that fits is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_device_takes_is_not_sent_to_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("small").await;
    let (mut d, _) = login5(&env, "small", &secret, |c| {
        c.properties = Some(v5::ConnectProperties {
            max_packet_size: Some(300),
            ..v5::ConnectProperties::new()
        });
    })
    .await;
    d.send(&subscribe5(&["devices/small/commands"], None)).await;
    assert!(matches!(d.next5().await, v5::Packet::SubAck(_)));
    let big = env
        .command(
            "small",
            json!({"name": "big", "params": {"blob": "x".repeat(600)}}),
        )
        .await;
    let small = env.command("small", json!({"name": "small"})).await;
    match d.next5().await {
        v5::Packet::Publish(p) => {
            assert!(p.payload.len() < 300);
            let msg: CommandMessage = serde_json::from_slice(&p.payload).expect("command");
            assert_eq!(msg.id, small, "the large command ({big}) was not sent");
        }
        other => panic!("{other:?}"),
    }
    assert!(env.metric("entente_mqtt_messages_too_large_total").await >= 1);
    env.gw.stop().await;
}

/// A device that sends nothing for 1.5 × its keep-alive is disconnected
/// (MQTT 5 told 0x8D), not sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_is_disconnected_after_one_and_a_half_keep_alives() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("quiet").await;
    let start = tokio::time::Instant::now();
    let (mut d5, _) = login5(&env, "quiet", &secret, |c| c.keep_alive = 1).await;
    assert_eq!(d5.disconnect_reason().await, 0x8D);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1_400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let start = tokio::time::Instant::now();
    let mut d4 = RawDevice::open(env.v4(), false).await;
    d4.send(&connect4("quiet", &secret, |c| c.keep_alive = 1))
        .await;
    assert!(matches!(d4.next4().await, v4::Packet::ConnAck(_)));
    d4.closed().await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1_400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    env.gw.stop().await;
}

/// "Session present" follows MQTT 5's Session Expiry Interval: without one
/// (0) the session ends with the connection, clean start or not; with one
/// it is resumed (its filters in force: a queued command arrives without a
/// new SUBSCRIBE) until it expires, even when the connection that made it
/// started clean; a DISCONNECT can set it to 0. 3.1.1's clean session 0
/// keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_present_follows_the_session_expiry_interval() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("s").await;
    let expiry = |secs| {
        move |c: &mut v5::Connect| {
            c.clean_start = false;
            c.properties = Some(v5::ConnectProperties {
                session_expiry_interval: secs,
                ..v5::ConnectProperties::new()
            });
        }
    };
    // Makes a session with `f`, subscribed to commands, and ends it with
    // `goodbye` (an MQTT 5 DISCONNECT); waits until the gateway closed it.
    let session = |f: Box<dyn FnOnce(&mut v5::Connect)>, goodbye: Vec<u8>| {
        let (env, secret) = (&env, &secret);
        async move {
            let (mut d, _) = login5(env, "s", secret, f).await;
            d.send(&subscribe5(&["devices/s/commands"], None)).await;
            // (The command of an earlier step may be delivered again.)
            loop {
                match d.next5().await {
                    v5::Packet::SubAck(_) => break,
                    v5::Packet::Publish(_) => {}
                    other => panic!("{other:?}"),
                }
            }
            d.send(&goodbye).await;
            d.closed().await;
        }
    };
    let normal = vec![0xE0, 0x00];
    let present = |f: Box<dyn FnOnce(&mut v5::Connect)>| {
        let (env, secret) = (&env, &secret);
        async move {
            let (d, ack) = login5(env, "s", secret, f).await;
            (d, ack.session_present)
        }
    };

    // No expiry: gone with the connection.
    session(Box::new(expiry(None)), normal.clone()).await;
    let (_d, p) = present(Box::new(expiry(None))).await;
    assert!(
        !p,
        "a session without an expiry interval ended with its connection"
    );
    drop(_d);

    // An expiry: resumed, filters in force.
    session(Box::new(expiry(Some(60))), normal.clone()).await;
    let cid = env.command("s", json!({"name": "later"})).await;
    let (mut d, p) = present(Box::new(expiry(Some(60)))).await;
    assert!(p, "session present");
    match d.next5().await {
        v5::Packet::Publish(p) => {
            let msg: CommandMessage = serde_json::from_slice(&p.payload).expect("command");
            assert_eq!(msg.id, cid);
        }
        other => panic!("{other:?}"),
    }
    d.send(&normal).await;
    d.closed().await;

    // A clean start discards the old session, but the new one is kept for
    // its expiry interval.
    let clean_with_expiry: Box<dyn FnOnce(&mut v5::Connect)> = Box::new(|c| {
        expiry(Some(60))(c);
        c.clean_start = true;
    });
    session(clean_with_expiry, normal.clone()).await;
    let (_d, p) = present(Box::new(expiry(Some(60)))).await;
    assert!(p, "kept after a clean start with an expiry interval");
    drop(_d);

    // A DISCONNECT setting the expiry to 0 discards it.
    session(Box::new(expiry(Some(60))), disconnect5_with_expiry(0)).await;
    let (_d, p) = present(Box::new(expiry(Some(60)))).await;
    assert!(!p, "discarded by the DISCONNECT's expiry of 0");
    drop(_d);

    // It expires.
    session(Box::new(expiry(Some(1))), normal.clone()).await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (_d, p) = present(Box::new(expiry(Some(60)))).await;
    assert!(!p, "expired after its interval");
    drop(_d);

    // 3.1.1: clean session 0 keeps it.
    let mut d = RawDevice::open(env.v4(), false).await;
    d.send(&connect4("s", &secret, |c| c.clean_session = false))
        .await;
    assert!(matches!(d.next4().await, v4::Packet::ConnAck(_)));
    let mut b = BytesMut::new();
    v4::Subscribe::new("devices/s/commands", QoS4::AtLeastOnce)
        .write(&mut b)
        .expect("encode");
    d.send(&b).await;
    assert!(matches!(d.next4().await, v4::Packet::SubAck(_)));
    d.send(&[0xE0, 0x00]).await;
    assert!(matches!(d.next().await, Pkt::Closed | Pkt::V4(_)));
    let mut d = RawDevice::open(env.v4(), false).await;
    d.send(&connect4("s", &secret, |c| c.clean_session = false))
        .await;
    assert!(matches!(d.next4().await, v4::Packet::ConnAck(a) if a.session_present));
    env.gw.stop().await;
}

/// QoS 1 towards a device has packet ids and at most the device's Receive
/// Maximum in flight: with 2, two commands come, the rest wait until one
/// is acknowledged; QoS 0 subscriptions get QoS 0 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_window_is_the_devices_receive_maximum() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("w").await;
    for i in 0..5 {
        env.command("w", json!({ "name": format!("c{i}") })).await;
    }
    let (mut d, _) = login5(&env, "w", &secret, |c| {
        c.properties = Some(v5::ConnectProperties {
            receive_maximum: Some(2),
            ..v5::ConnectProperties::new()
        });
    })
    .await;
    d.send(&subscribe5(&["devices/w/commands"], None)).await;
    let mut inflight = Vec::new();
    while inflight.len() < 2 {
        match d.next5().await {
            v5::Packet::SubAck(_) => {}
            v5::Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert_ne!(p.pkid, 0);
                inflight.push(p.pkid);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_ne!(inflight[0], inflight[1]);
    // Nothing more while both are unacknowledged.
    let more = d.next_within(Duration::from_millis(500)).await;
    assert!(more.is_none(), "a third message in flight: {more:?}");
    let mut b = BytesMut::new();
    v5::PubAck::new(inflight[0], None)
        .write(&mut b)
        .expect("encode");
    d.send(&b).await;
    match d.next5().await {
        v5::Packet::Publish(p) => assert!(!inflight.contains(&p.pkid)),
        other => panic!("{other:?}"),
    }

    // QoS 0 both ways.
    let secret = env.register("q0").await;
    let (mut d, _) = login5(&env, "q0", &secret, |_| {}).await;
    let mut s = v5::Subscribe::new(
        v5::Filter::new("devices/q0/commands", QoS::AtMostOnce),
        None,
    );
    s.pkid = 1;
    let mut b = BytesMut::new();
    s.write(&mut b).expect("encode");
    d.send(&b).await;
    assert!(matches!(d.next5().await, v5::Packet::SubAck(_)));
    let cid = env.command("q0", json!({"name": "q"})).await;
    match d.next5().await {
        v5::Packet::Publish(p) => {
            assert_eq!((p.qos, p.pkid), (QoS::AtMostOnce, 0));
            let msg: CommandMessage = serde_json::from_slice(&p.payload).expect("command");
            assert_eq!(msg.id, cid);
            let result = entente_protocol::result_topic("q0", &cid);
            let mut b = BytesMut::new();
            v5::Publish::new(
                &result,
                QoS::AtMostOnce,
                br#"{"status": "succeeded"}"#.to_vec(),
                None,
            )
            .write(&mut b)
            .expect("encode");
            d.send(&b).await;
        }
        other => panic!("{other:?}"),
    }
    let path = format!("/v1/commands/{cid}");
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let c = env
            .http
            .get(format!("{}{path}", env.base))
            .bearer_auth(&env.token)
            .send()
            .await
            .expect("get")
            .json::<Value>()
            .await
            .expect("json");
        if c["status"] == "succeeded" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.gw.stop().await;
}

/// A last will is parsed and refused (the endpoint keeps presence instead):
/// 3.1.1 return code 5, MQTT 5 0x87 not authorized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_will_is_refused_in_both_versions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let env = boot(tmp.path()).await;
    let secret = env.register("will").await;
    let mut d = RawDevice::open(env.v4(), false).await;
    d.send(&connect4("will", &secret, |c| {
        c.last_will = Some(v4::LastWill::new(
            "devices/will/shadow/reported",
            "{}",
            QoS4::AtLeastOnce,
            false,
        ));
    }))
    .await;
    match d.next4().await {
        v4::Packet::ConnAck(a) => assert_eq!(a.code, v4::ConnectReturnCode::NotAuthorized),
        other => panic!("{other:?}"),
    }
    let mut d = RawDevice::open(env.v5(), true).await;
    let mut c = v5::Connect {
        keep_alive: 30,
        client_id: "will".into(),
        clean_start: true,
        properties: None,
    };
    c.clean_start = true;
    let will = v5::LastWill::new(
        "devices/will/shadow/reported",
        "{}",
        QoS::AtLeastOnce,
        false,
        None,
    );
    let login = v5::Login {
        username: "will".into(),
        password: secret.clone(),
    };
    let mut b = BytesMut::new();
    c.write(&Some(will), &Some(login), &mut b).expect("encode");
    d.send(&b).await;
    assert_eq!(
        d.connack5().await.code,
        v5::ConnectReturnCode::NotAuthorized
    );
    env.gw.stop().await;
}
