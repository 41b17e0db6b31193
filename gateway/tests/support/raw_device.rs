//! A device on a raw socket, its packets encoded and decoded by rumqttc's
//! codec, for tests that must choose packet ids and QoS, see every
//! acknowledgement with its reason code, and write without waiting for
//! answers. (Each test binary uses a different part of this.)
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::{QoS as V5QoS, v5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, timeout_at};

/// What the gateway sent, in either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// CONNACK: session present, return / reason code (as its number).
    ConnAck(bool, u8),
    /// A message: topic, payload, QoS, packet id.
    Publish(String, Vec<u8>, u8, u16),
    SubAck(u16),
    /// PUBACK: packet id and reason code (0 for 3.1.1).
    PubAck(u16, u8),
    /// PUBREC: packet id and reason code (0 for 3.1.1).
    PubRec(u16, u8),
    PubComp(u16),
    PingResp,
    /// MQTT 5 DISCONNECT with its reason code.
    Disconnect(u8),
    /// The connection closed.
    Closed,
}

/// Encodes packets for one protocol version.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub v5: bool,
}

impl Codec {
    /// A CONNECT with a clean session and no keep-alive (the gateway then
    /// allows a day of silence).
    pub fn connect(self, id: &str, password: &str) -> BytesMut {
        let mut b = BytesMut::new();
        if self.v5 {
            let c = v5::Connect {
                keep_alive: 0,
                client_id: id.into(),
                clean_start: true,
                properties: None,
            };
            let login = v5::Login {
                username: id.into(),
                password: password.into(),
            };
            c.write(&None, &Some(login), &mut b).expect("encode");
        } else {
            let mut c = v4::Connect::new(id);
            c.set_login(id, password);
            c.keep_alive = 0;
            c.clean_session = true;
            c.write(&mut b).expect("encode");
        }
        b
    }

    pub fn publish(self, topic: &str, payload: &[u8], qos: u8, pkid: u16, out: &mut BytesMut) {
        if self.v5 {
            let q = match qos {
                0 => V5QoS::AtMostOnce,
                1 => V5QoS::AtLeastOnce,
                _ => V5QoS::ExactlyOnce,
            };
            let mut p = v5::Publish::new(topic, q, payload.to_vec(), None);
            p.pkid = pkid;
            p.write(out).expect("encode");
        } else {
            let q = match qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            };
            let mut p = v4::Publish::new(topic, q, payload.to_vec());
            p.pkid = pkid;
            p.write(out).expect("encode");
        }
    }

    pub fn subscribe(self, filter: &str, pkid: u16) -> BytesMut {
        let mut b = BytesMut::new();
        if self.v5 {
            let mut s = v5::Subscribe::new(v5::Filter::new(filter, V5QoS::AtLeastOnce), None);
            s.pkid = pkid;
            s.write(&mut b).expect("encode");
        } else {
            let mut s = v4::Subscribe::new(filter, QoS::AtLeastOnce);
            s.pkid = pkid;
            s.write(&mut b).expect("encode");
        }
        b
    }

    pub fn puback(self, pkid: u16) -> BytesMut {
        let mut b = BytesMut::new();
        if self.v5 {
            v5::PubAck::new(pkid, None).write(&mut b).expect("encode");
        } else {
            v4::PubAck::new(pkid).write(&mut b).expect("encode");
        }
        b
    }

    pub fn pubrel(self, pkid: u16) -> BytesMut {
        let mut b = BytesMut::new();
        if self.v5 {
            v5::PubRel::new(pkid, None).write(&mut b).expect("encode");
        } else {
            v4::PubRel::new(pkid).write(&mut b).expect("encode");
        }
        b
    }

    /// Reads the next packet from `buf` if a whole one is there.
    fn parse(self, buf: &mut BytesMut) -> Option<Got> {
        if buf.is_empty() {
            return None;
        }
        if self.v5 {
            Some(match v5::Packet::read(buf, None).ok()? {
                v5::Packet::ConnAck(a) => Got::ConnAck(a.session_present, a.code as u8),
                v5::Packet::Publish(p) => Got::Publish(
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                    p.qos as u8,
                    p.pkid,
                ),
                v5::Packet::SubAck(a) => Got::SubAck(a.pkid),
                v5::Packet::PubAck(a) => Got::PubAck(a.pkid, puback_code(a.reason)),
                v5::Packet::PubRec(a) => Got::PubRec(a.pkid, pubrec_code(a.reason)),
                v5::Packet::PubComp(a) => Got::PubComp(a.pkid),
                v5::Packet::PingResp(_) => Got::PingResp,
                v5::Packet::Disconnect(d) => Got::Disconnect(d.reason_code as u8),
                other => panic!("unexpected packet {other:?}"),
            })
        } else {
            Some(match v4::Packet::read(buf, 1 << 20).ok()? {
                v4::Packet::ConnAck(a) => Got::ConnAck(a.session_present, a.code as u8),
                v4::Packet::Publish(p) => {
                    Got::Publish(p.topic, p.payload.to_vec(), p.qos as u8, p.pkid)
                }
                v4::Packet::SubAck(a) => Got::SubAck(a.pkid),
                v4::Packet::PubAck(a) => Got::PubAck(a.pkid, 0),
                v4::Packet::PubRec(a) => Got::PubRec(a.pkid, 0),
                v4::Packet::PubComp(a) => Got::PubComp(a.pkid),
                v4::Packet::PingResp => Got::PingResp,
                other => panic!("unexpected packet {other:?}"),
            })
        }
    }
}

fn puback_code(r: v5::PubAckReason) -> u8 {
    use v5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code(r: v5::PubRecReason) -> u8 {
    use v5::PubRecReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// The reading side of a raw device.
pub struct Reader {
    pub codec: Codec,
    rd: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// The next packet, or `Closed`; `None` if nothing came by `deadline`.
    pub async fn next_by(&mut self, deadline: Instant) -> Option<Got> {
        loop {
            if let Some(p) = self.codec.parse(&mut self.buf) {
                return Some(p);
            }
            match timeout_at(deadline, self.rd.read_buf(&mut self.buf)).await {
                Ok(Ok(0) | Err(_)) => return Some(Got::Closed),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    }

    /// The next packet; panics if none comes within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Got {
        self.next_by(Instant::now() + wait)
            .await
            .unwrap_or_else(|| panic!("nothing from the gateway within {wait:?}"))
    }
}

/// A raw device: its socket's two halves.
pub struct RawDevice {
    pub codec: Codec,
    pub rd: Reader,
    pub wr: OwnedWriteHalf,
}

impl RawDevice {
    /// Connects and logs in; panics unless the CONNACK accepts.
    pub async fn connect(addr: SocketAddr, v5: bool, id: &str, secret: &str) -> RawDevice {
        match RawDevice::try_connect(addr, v5, id, secret).await {
            Ok(d) => d,
            Err(e) => panic!("{id}: {e}"),
        }
    }

    /// Connects and logs in (within 15 s); `Err` says why not.
    pub async fn try_connect(
        addr: SocketAddr,
        v5: bool,
        id: &str,
        secret: &str,
    ) -> Result<RawDevice, String> {
        let codec = Codec { v5 };
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        let (rd, wr) = s.into_split();
        let mut d = RawDevice {
            codec,
            rd: Reader {
                codec,
                rd,
                buf: BytesMut::new(),
            },
            wr,
        };
        d.send(&codec.connect(id, secret)).await;
        match d.rd.next_by(Instant::now() + Duration::from_secs(15)).await {
            Some(Got::ConnAck(_, 0)) => Ok(d),
            other => Err(format!("login refused: {other:?}")),
        }
    }

    /// Writes `bytes` (the gateway may have closed: that is for the reader
    /// to see).
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.wr.write_all(bytes).await;
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, pkid: u16) {
        let mut b = BytesMut::new();
        self.codec.publish(topic, payload, qos, pkid, &mut b);
        self.send(&b).await;
    }
}
