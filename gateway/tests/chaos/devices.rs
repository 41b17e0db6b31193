//! Simulated devices: rumqttc clients that answer every command they get
//! (`accepted`, then `result`) and record every command id delivered to
//! them. When their gateway dies, stops or drops them, they reconnect to
//! another one (chosen by their seeded RNG).
//!
//! A device re-publishes its recent results on every reconnect (an outbox):
//! a gateway redelivers only `queued` and `sent` commands on subscribe, so a
//! result lost with a connection would otherwise leave its command
//! `accepted` until the gateway's sweep delivers it again. The gateway
//! ignores results for finished commands.
//!
//! Every connection is recorded ([`Connection`]: from the CONNACK until the
//! device saw it end) with every delivery's time, in seconds since the run
//! started: the delivery check (`delivery.rs`) needs to know which gateway
//! held a device's session when.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use entente_protocol::{
    CommandMessage, CommandResultMessage, ResultStatus, accepted_topic, commands_topic,
    reported_topic, result_topic,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::cluster::Cluster;
use super::rng::Rng;

/// One command delivery a device saw.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub device: String,
    pub cid: String,
    /// The gateway the device was connected to.
    pub gateway: u64,
    /// The topic it came on.
    pub topic: String,
    /// When (seconds since the run started).
    pub at: f64,
}

/// One MQTT connection of a device, as the device saw it.
#[derive(Debug, Clone)]
pub struct Connection {
    pub device: String,
    pub gateway: u64,
    /// When its CONNACK arrived (seconds since the run started).
    pub from: f64,
    /// When the device saw it end (an error, or told to stop); `None` while open.
    pub to: Option<f64>,
}

#[derive(Debug, Default)]
pub struct DeviceStats {
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub deliveries: AtomicU64,
}

#[derive(Debug)]
pub struct Devices {
    pub deliveries: Arc<Mutex<Vec<Delivery>>>,
    pub connections: Arc<Mutex<Vec<Connection>>>,
    pub stats: Arc<DeviceStats>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The result a device reports for a command: fixed by the command id, so
/// the final state can be checked against it.
pub fn expected_result(cid: &str) -> bool {
    let h = cid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    h & 1 == 0
}

impl Devices {
    /// Starts one simulated device per `(id, secret)`; device `i` first
    /// connects to gateway `i % n + 1`. Times are recorded from `start`.
    pub fn start(
        cluster: Arc<Cluster>,
        devices: Vec<(String, String)>,
        seed: u64,
        start: Instant,
    ) -> Devices {
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let stats = Arc::new(DeviceStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let tasks = devices
            .into_iter()
            .enumerate()
            .map(|(i, (id, secret))| {
                tokio::spawn(run_device(
                    id,
                    secret,
                    i as u64,
                    cluster.clone(),
                    Rng::fork(seed, 10_000 + i as u64),
                    Record {
                        start,
                        deliveries: deliveries.clone(),
                        connections: connections.clone(),
                        stats: stats.clone(),
                    },
                    stop_rx.clone(),
                ))
            })
            .collect();
        Devices {
            deliveries,
            connections,
            stats,
            stop,
            tasks,
        }
    }

    /// Disconnects every device and waits for them.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Resolves once the devices are told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not be held across an await.
    let _ = stop.wait_for(|s| *s).await;
}

/// Where a device records what it saw.
struct Record {
    start: Instant,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    connections: Arc<Mutex<Vec<Connection>>>,
    stats: Arc<DeviceStats>,
}

impl Record {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A connection began; returns its position for [`Record::ended`].
    fn connected(&self, device: &str, gateway: u64) -> usize {
        let mut c = self.connections.lock().expect("connections");
        c.push(Connection {
            device: device.to_string(),
            gateway,
            from: self.now(),
            to: None,
        });
        c.len() - 1
    }

    fn ended(&self, at: Option<usize>) {
        if let Some(i) = at {
            let now = self.now();
            self.connections.lock().expect("connections")[i].to = Some(now);
        }
    }
}

async fn run_device(
    id: String,
    secret: String,
    index: u64,
    cluster: Arc<Cluster>,
    mut rng: Rng,
    rec: Record,
    mut stop: watch::Receiver<bool>,
) {
    let stats = rec.stats.clone();
    let ids = cluster.correct_ids();
    let mut gateway = ids[(index as usize) % ids.len()];
    let topic = commands_topic(&id);
    // (cid, result) of the latest answers, re-published on reconnect.
    let mut outbox: VecDeque<(String, Vec<u8>)> = VecDeque::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let addr = cluster.node(gateway).mqtt_addr();
        let mut opts = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
        opts.set_credentials(id.clone(), secret.clone());
        opts.set_keep_alive(Duration::from_secs(1));
        opts.set_clean_session(true);
        let (client, mut el) = AsyncClient::new(opts, 512);
        let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
        // This connection's record, once its CONNACK arrived.
        let mut conn: Option<usize> = None;
        loop {
            let ev = tokio::select! {
                _ = stopped(&mut stop) => {
                    rec.ended(conn);
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while el.poll().await.is_ok() {}
                    })
                    .await;
                    return;
                }
                ev = el.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    // rumqttc reports a refused CONNECT as an error, so this
                    // is a session.
                    rec.ended(conn);
                    conn = Some(rec.connected(&id, gateway));
                    for (cid, result) in outbox.iter().cloned() {
                        let c = client.clone();
                        let t = result_topic(&id, &cid);
                        tokio::spawn(async move {
                            let _ = c.publish(t, QoS::AtLeastOnce, false, result).await;
                        });
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(cmd) = serde_json::from_slice::<CommandMessage>(&p.payload) else {
                        continue;
                    };
                    stats.deliveries.fetch_add(1, Ordering::Relaxed);
                    rec.deliveries.lock().expect("deliveries").push(Delivery {
                        device: id.clone(),
                        cid: cmd.id.clone(),
                        gateway,
                        topic: p.topic.clone(),
                        at: rec.now(),
                    });
                    let ok = expected_result(&cmd.id);
                    let result = serde_json::to_vec(&CommandResultMessage {
                        status: if ok {
                            ResultStatus::Succeeded
                        } else {
                            ResultStatus::Failed
                        },
                        output: json!({ "device": id, "ok": ok }),
                    })
                    .expect("json");
                    if !outbox.iter().any(|(c, _)| *c == cmd.id) {
                        outbox.push_back((cmd.id.clone(), result.clone()));
                        if outbox.len() > 64 {
                            outbox.pop_front();
                        }
                    }
                    let c = client.clone();
                    let (acc, res, rep) = (
                        accepted_topic(&id, &cmd.id),
                        result_topic(&id, &cmd.id),
                        reported_topic(&id),
                    );
                    let report = serde_json::to_vec(&json!({ "last": cmd.id })).expect("json");
                    tokio::spawn(async move {
                        let _ = c
                            .publish(acc, QoS::AtLeastOnce, false, b"{}".to_vec())
                            .await;
                        let _ = c.publish(res, QoS::AtLeastOnce, false, result).await;
                        let _ = c.publish(rep, QoS::AtLeastOnce, false, report).await;
                    });
                }
                Ok(_) => {}
                Err(_) => {
                    rec.ended(conn);
                    stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        drop(client);
        drop(el);
        // Pace reconnects, then try another gateway.
        let pause = Duration::from_millis(rng.range(50, 400));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped(&mut stop) => return,
        }
        gateway = *rng.pick(&ids);
    }
}
