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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;
use entente_protocol::{device_namespace, parse_device_publish};
use rumqttd::protocol::{ConnectReturnCode, Error, Packet, Protocol};
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
