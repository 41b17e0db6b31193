//! A device on a raw socket that writes and reads packets with rumqttc's
//! codec and hands back every packet the gateway sends, decoded whole: for
//! the protocol details (properties, reason codes, flags) that client
//! libraries hide or would not let a test send.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

/// How long a test waits for the gateway's next packet.
pub const PACKET_WAIT: Duration = Duration::from_secs(15);

/// What the gateway sent.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a test's packets, one at a time
pub enum Pkt {
    /// An MQTT 5 packet.
    V5(v5::Packet),
    /// An MQTT 3.1.1 packet.
    V4(v4::Packet),
    /// The connection closed.
    Closed,
}

/// One connection, in one protocol version.
pub struct RawDevice {
    s: TcpStream,
    buf: BytesMut,
    v5: bool,
}

/// An MQTT 5 CONNECT for device `id` (username = client id), clean start,
/// keep-alive 30 s, adjusted by `f`.
pub fn connect5(id: &str, password: &str, f: impl FnOnce(&mut v5::Connect)) -> BytesMut {
    let mut c = v5::Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_start: true,
        properties: None,
    };
    f(&mut c);
    let login = v5::Login {
        username: id.into(),
        password: password.into(),
    };
    let mut b = BytesMut::new();
    c.write(&None, &Some(login), &mut b).expect("encode");
    b
}

/// An MQTT 3.1.1 CONNECT for device `id`, adjusted by `f`.
pub fn connect4(id: &str, password: &str, f: impl FnOnce(&mut v4::Connect)) -> BytesMut {
    let mut c = v4::Connect::new(id);
    c.set_login(id, password);
    c.keep_alive = 30;
    f(&mut c);
    let mut b = BytesMut::new();
    c.write(&mut b).expect("encode");
    b
}

/// An MQTT 5 DISCONNECT (normal) carrying a Session Expiry Interval,
/// encoded by hand (rumqttc's encoder miscounts a DISCONNECT with
/// properties).
pub fn disconnect5_with_expiry(secs: u32) -> Vec<u8> {
    let e = secs.to_be_bytes();
    vec![0xE0, 0x07, 0x00, 0x05, 0x11, e[0], e[1], e[2], e[3]]
}

/// Encodes an MQTT 5 packet with a `write(&mut BytesMut)` method.
pub fn enc5<T>(p: T, write: impl FnOnce(&T, &mut BytesMut)) -> BytesMut {
    let mut b = BytesMut::new();
    write(&p, &mut b);
    b
}

impl RawDevice {
    /// Opens a TCP connection (nothing sent yet).
    pub async fn open(addr: SocketAddr, v5: bool) -> RawDevice {
        RawDevice {
            s: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
            v5,
        }
    }

    /// Writes bytes (the gateway may already have closed: `next` sees it).
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes).await;
    }

    /// The next packet, or `Closed`; panics after [`PACKET_WAIT`].
    pub async fn next(&mut self) -> Pkt {
        self.next_within(PACKET_WAIT)
            .await
            .unwrap_or_else(|| panic!("nothing from the gateway within {PACKET_WAIT:?}"))
    }

    /// The next packet, or `Closed`; `None` if nothing came within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Pkt> {
        let deadline = Instant::now() + wait;
        loop {
            if !self.buf.is_empty() {
                if self.v5 {
                    if let Ok(p) = v5::Packet::read(&mut self.buf, None) {
                        return Some(Pkt::V5(p));
                    }
                } else if let Ok(p) = v4::Packet::read(&mut self.buf, 1 << 20) {
                    return Some(Pkt::V4(p));
                }
            }
            match timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Ok(Ok(0) | Err(_)) => return Some(Pkt::Closed),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    }

    /// The next MQTT 5 packet (panics on anything else).
    pub async fn next5(&mut self) -> v5::Packet {
        match self.next().await {
            Pkt::V5(p) => p,
            other => panic!("expected an MQTT 5 packet, got {other:?}"),
        }
    }

    /// The next MQTT 5 packet that is not a PUBLISH: the documents a
    /// subscription makes the gateway send may come before an answer.
    pub async fn next5_not_publish(&mut self) -> v5::Packet {
        loop {
            match self.next5().await {
                v5::Packet::Publish(_) => continue,
                p => return p,
            }
        }
    }

    /// The next MQTT 3.1.1 packet (panics on anything else).
    pub async fn next4(&mut self) -> v4::Packet {
        match self.next().await {
            Pkt::V4(p) => p,
            other => panic!("expected an MQTT 3.1.1 packet, got {other:?}"),
        }
    }

    /// An MQTT 5 CONNACK (panics on anything else).
    pub async fn connack5(&mut self) -> v5::ConnAck {
        match self.next5().await {
            v5::Packet::ConnAck(a) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// The reason code of the MQTT 5 DISCONNECT the gateway ends with,
    /// after skipping other packets; the connection then closes.
    pub async fn disconnect_reason(&mut self) -> u8 {
        loop {
            match self.next().await {
                Pkt::V5(v5::Packet::Disconnect(d)) => {
                    let code = d.reason_code as u8;
                    assert!(
                        matches!(self.next().await, Pkt::Closed),
                        "the connection closes after the DISCONNECT"
                    );
                    return code;
                }
                Pkt::Closed => panic!("closed without a DISCONNECT"),
                _ => {}
            }
        }
    }

    /// Waits until the gateway closes the connection, skipping packets.
    pub async fn closed(&mut self) {
        while !matches!(self.next().await, Pkt::Closed) {}
    }
}
