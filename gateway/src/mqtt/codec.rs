//! A wrapper around rumqttd's MQTT codec that gives the broker what it lacks:
//! topic ACLs and session start/end events.
//!
//! rumqttd clones the server's protocol value once per connection, so each
//! clone of [`Guarded`] is one connection's state. It learns the device id
//! from CONNECT (the auth handler has already required client id = username
//! = a registered device id), refuses PUBLISH and SUBSCRIBE outside
//! `devices/{id}/` (returning a codec error closes the connection), and sees
//! the session start (a successful CONNACK written), its subscriptions take
//! effect (SUBACK written) and its end (the connection's codec dropped).
//!
//! **Device publishes bypass the router.** Nothing subscribes to what a device
//! publishes (its `accepted`, `result` and `reported` topics are for the
//! gateway, which reads them here), but rumqttd's router matches every publish
//! against every subscription filter of every device, a cost that grows with
//! the fleet (at 1,100 devices ingest fell from ~110k to ~2k messages/s). So a
//! QoS 0 or 1 device PUBLISH is handed to the gateway here and the router is
//! given a PINGREQ in its place; the router answers each connection's packets
//! in order, so the PINGRESP it writes for it is turned back into the
//! PUBACK the device is owed (QoS 1) or dropped (QoS 0). A FIFO per connection
//! tells these answers from the ones to the device's own PINGREQs. (QoS 2
//! publishes go through the router as before.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;
use entente_protocol::{device_namespace, parse_device_publish};
use std::collections::VecDeque;

use rumqttd::protocol::{
    ConnectReturnCode, Error, Packet, PingReq, Protocol, PubAck, PubAckReason,
};
use tokio::sync::mpsc;

use super::MqttStats;
use super::sessions::SessionEvent;

/// What every connection of one broker shares.
#[derive(Debug)]
pub(crate) struct Hub {
    /// Session events, to the session manager.
    pub(crate) events: mpsc::UnboundedSender<SessionEvent>,
    /// Counters.
    pub(crate) stats: Arc<MqttStats>,
    /// Set when the gateway stops: every connection fails on its next packet.
    pub(crate) closed: AtomicBool,
    /// The last session epoch handed out.
    epoch: AtomicU64,
}

impl Hub {
    pub(crate) fn new(events: mpsc::UnboundedSender<SessionEvent>, stats: Arc<MqttStats>) -> Hub {
        Hub {
            events,
            stats,
            closed: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        }
    }

    /// A session epoch: increasing within this process, and (being
    /// `ms since the Unix epoch × 1000` or more) above the epochs of earlier
    /// boots and, clocks permitting, of sessions that started earlier on
    /// other gateways — so a device that reconnects elsewhere moves there.
    pub(crate) fn next_epoch(&self) -> u64 {
        let floor = crate::now_ms().saturating_mul(1000);
        let prev = self
            .epoch
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| {
                Some(floor.max(e.saturating_add(1)))
            })
            .unwrap_or(floor);
        floor.max(prev.saturating_add(1))
    }
}

#[derive(Debug, Default)]
struct Conn {
    device: Option<String>,
    epoch: u64,
    up: bool,
    /// SUBSCRIBE packet id → its filters, until the SUBACK is written.
    pending_subs: HashMap<u16, Vec<String>>,
    /// What each PINGRESP the router will write stands for, oldest first.
    pongs: VecDeque<Pong>,
}

/// If `buf` starts with a PUBLISH, its QoS and packet id (0 for QoS 0):
/// fixed header, remaining length, topic (length-prefixed), packet id — the
/// same in MQTT 3.1.1 and 5.
fn peek_publish(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    i += 2 + topic_len;
    if qos == 0 {
        return Some((0, 0));
    }
    Some((qos, u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?])))
}

/// What a PINGRESP from the router answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pong {
    /// The device's own PINGREQ: write the PINGRESP.
    Ping,
    /// A QoS 1 publish taken out of the router's way: write its PUBACK.
    PubAck(u16),
    /// A QoS 0 publish taken out of the router's way: write nothing.
    Nothing,
}

/// The per-connection codec wrapper (see the module docs).
#[derive(Debug)]
pub(crate) struct Guarded<P> {
    inner: P,
    hub: Arc<Hub>,
    conn: Mutex<Conn>,
}

impl<P> Guarded<P> {
    pub(crate) fn new(inner: P, hub: Arc<Hub>) -> Guarded<P> {
        Guarded {
            inner,
            hub,
            conn: Mutex::new(Conn::default()),
        }
    }
}

impl<P: Clone> Clone for Guarded<P> {
    /// A fresh connection: the codec and the hub, no connection state.
    fn clone(&self) -> Self {
        Guarded::new(self.inner.clone(), self.hub.clone())
    }
}

impl<P> Guarded<P> {
    fn violation(&self, device: &str, what: String) -> Error {
        self.hub
            .stats
            .acl_violations
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(device, "MQTT access violation, disconnecting: {what}");
        Error::InvalidProtocol
    }
}

impl<P: Protocol> Protocol for Guarded<P> {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        if self.hub.closed.load(Ordering::Relaxed) {
            return Err(Error::InvalidProtocol);
        }
        // rumqttd keeps a publish's QoS and packet id private: read them from
        // the fixed header before the codec consumes the packet.
        let publish_header = peek_publish(stream);
        let packet = match self.inner.read_mut(stream, max_size) {
            Ok(p) => p,
            Err(Error::InsufficientBytes(n)) => return Err(Error::InsufficientBytes(n)),
            Err(e) => {
                self.hub
                    .stats
                    .malformed_packets
                    .fetch_add(1, Ordering::Relaxed);
                let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
                tracing::warn!(device = ?conn.device, error = %e, "malformed or oversize MQTT packet, disconnecting");
                return Err(e);
            }
        };
        let device = {
            let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
            if let Packet::Connect(connect, _, will, _, _) = &packet {
                conn.device = Some(connect.client_id.clone());
                if will.is_some() {
                    let id = connect.client_id.clone();
                    return Err(self.violation(&id, "a last will is not allowed".into()));
                }
                return Ok(packet);
            }
            conn.device.clone().unwrap_or_default()
        };
        match &packet {
            Packet::Publish(publish, _) => {
                let topic = std::str::from_utf8(&publish.topic).unwrap_or("");
                let Some(kind) = parse_device_publish(&device, topic) else {
                    return Err(self.violation(&device, format!("publish to {topic:?}")));
                };
                let _ = self.hub.events.send(SessionEvent::Publish {
                    device,
                    kind,
                    payload: publish.payload.clone(),
                });
                let pong = match publish_header {
                    Some((0, _)) => Pong::Nothing,
                    Some((1, pkid)) => Pong::PubAck(pkid),
                    // QoS 2: the router runs its PUBREC/PUBREL exchange.
                    _ => return Ok(packet),
                };
                let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
                conn.pongs.push_back(pong);
                return Ok(Packet::PingReq(PingReq));
            }
            Packet::PingReq(_) => {
                let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
                conn.pongs.push_back(Pong::Ping);
            }
            Packet::Subscribe(subscribe, _) => {
                let ns = device_namespace(&device);
                if let Some(f) = subscribe.filters.iter().find(|f| !f.path.starts_with(&ns)) {
                    let what = format!("subscribe to {:?}", f.path);
                    return Err(self.violation(&device, what));
                }
                let filters = subscribe.filters.iter().map(|f| f.path.clone()).collect();
                let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
                conn.pending_subs.insert(subscribe.pkid, filters);
            }
            _ => {}
        }
        Ok(packet)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        if self.hub.closed.load(Ordering::Relaxed) {
            return Err(Error::InvalidProtocol);
        }
        match &packet {
            Packet::ConnAck(ack, _) if ack.code == ConnectReturnCode::Success => {
                let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
                if let (false, Some(device)) = (conn.up, conn.device.clone()) {
                    conn.up = true;
                    conn.epoch = self.hub.next_epoch();
                    let _ = self.hub.events.send(SessionEvent::Up {
                        device,
                        epoch: conn.epoch,
                    });
                }
            }
            Packet::PingResp(_) => {
                let pong = self
                    .conn
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pongs
                    .pop_front()
                    .unwrap_or(Pong::Ping);
                match pong {
                    Pong::Ping => {}
                    Pong::Nothing => return Ok(0),
                    Pong::PubAck(pkid) => {
                        let ack = PubAck {
                            pkid,
                            reason: PubAckReason::Success,
                        };
                        return self.inner.write(Packet::PubAck(ack, None), write);
                    }
                }
            }
            Packet::SubAck(ack, _) => {
                let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
                if let (Some(filters), Some(device)) =
                    (conn.pending_subs.remove(&ack.pkid), conn.device.clone())
                {
                    let _ = self.hub.events.send(SessionEvent::Subscribed {
                        device,
                        epoch: conn.epoch,
                        filters,
                    });
                }
            }
            _ => {}
        }
        self.inner.write(packet, write)
    }
}

impl<P> Drop for Guarded<P> {
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let (true, Some(device)) = (conn.up, conn.device.take()) {
            let _ = self.hub.events.send(SessionEvent::Down {
                device,
                epoch: conn.epoch,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::peek_publish;
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{PingReq, Publish};

    fn publish(qos: QoS, pkid: u16) -> Vec<u8> {
        let mut p = Publish::new("devices/d1/shadow/reported", qos, vec![b'x'; 300]);
        p.pkid = pkid;
        let mut buf = bytes::BytesMut::new();
        p.write(&mut buf).expect("encode");
        buf.to_vec()
    }

    #[test]
    fn reads_qos_and_packet_id_of_a_publish() {
        assert_eq!(peek_publish(&publish(QoS::AtLeastOnce, 7)), Some((1, 7)));
        assert_eq!(
            peek_publish(&publish(QoS::AtLeastOnce, 65_000)),
            Some((1, 65_000))
        );
        assert_eq!(peek_publish(&publish(QoS::AtMostOnce, 0)), Some((0, 0)));
        assert_eq!(peek_publish(&publish(QoS::ExactlyOnce, 9)), Some((2, 9)));
        let mut ping = bytes::BytesMut::new();
        PingReq.write(&mut ping).expect("encode");
        assert_eq!(peek_publish(&ping), None);
        let whole = publish(QoS::AtLeastOnce, 7);
        assert_eq!(peek_publish(&whole[..3]), None, "too short to say");
        assert_eq!(peek_publish(&[]), None);
    }
}
