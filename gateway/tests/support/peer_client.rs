//! A client of the gateways' peer port that speaks the transport's wire
//! format itself (as documented in `coordinator::transport`), as an
//! attacker or a port scanner would: frames, the handshake, raw messages.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use coordinator::raft::Message;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The protocol version spoken.
pub const VERSION: u32 = 5;
/// The consensus engine announced in the `Hello` (the gateway's default).
pub const ENGINE: &str = "raft";
/// The gateway's log entry format, announced in the `Hello`.
pub const APP_FORMAT: u32 = gateway::ops::ENTRY_FORMAT as u32;
/// Bound on any one read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a side refused (wire order matters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    Version { supported: u32 },
    ClusterId,
    Target,
    Sender,
    Authentication,
    Protocol,
    AppFormat { supported: u32 },
    TlsRequired,
    Certificate,
    Engine { supported: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Messages,
    Snapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub cluster_id: String,
    pub from: u64,
    pub to: u64,
    pub stream: Stream,
    pub nonce: [u8; 32],
    pub app_format: u32,
    pub engine: String,
}

/// Every frame, in wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Hello(Hello),
    Challenge {
        nonce: [u8; 32],
        mac: [u8; 32],
    },
    Auth {
        mac: [u8; 32],
    },
    Refused {
        reason: Refusal,
    },
    Message(Message),
    SnapshotBegin {
        msg: Message,
        total_len: u64,
    },
    SnapshotChunk {
        data: Vec<u8>,
    },
    SnapshotEnd {
        digest: [u8; 32],
    },
    SnapshotAck {
        ok: bool,
    },
    Nonce {
        nonce: [u8; 32],
    },
    Welcome {
        mac: [u8; 32],
    },
    /// A member's status report about itself (protocol 5); `role`: 0
    /// follower, 1 pre-candidate, 2 candidate, 3 leader.
    Status {
        from: u64,
        term: u64,
        commit: u64,
        applied: u64,
        role: u8,
    },
}

pub async fn send(s: &mut TcpStream, frame: &Frame) {
    let payload = postcard::to_allocvec(frame).expect("encode");
    let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
    bytes.extend(payload);
    s.write_all(&bytes).await.expect("write");
}

/// The next frame, or `None` if the peer closed the connection.
pub async fn recv(s: &mut TcpStream) -> Option<Frame> {
    let read = async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.ok()?;
        let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut payload).await.ok()?;
        Some(postcard::from_bytes(&payload).expect("a frame"))
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .expect("an answer or a close in time")
}

/// Whether the peer closes the connection (reading and dropping what it
/// sends first).
pub async fn closes(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(READ_TIMEOUT, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// HMAC-SHA256 over the handshake transcript for one role.
pub fn transcript_mac(secret: &[u8], label: &[u8], hello: &Hello, nonce_a: &[u8; 32]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("key");
    mac.update(&(label.len() as u64).to_be_bytes());
    mac.update(label);
    mac.update(&hello.version.to_be_bytes());
    mac.update(&(hello.cluster_id.len() as u64).to_be_bytes());
    mac.update(hello.cluster_id.as_bytes());
    mac.update(&hello.from.to_be_bytes());
    mac.update(&hello.to.to_be_bytes());
    mac.update(&[match hello.stream {
        Stream::Messages => 1,
        Stream::Snapshot => 2,
    }]);
    mac.update(&hello.nonce);
    mac.update(&hello.app_format.to_be_bytes());
    mac.update(&(hello.engine.len() as u64).to_be_bytes());
    mac.update(hello.engine.as_bytes());
    mac.update(nonce_a);
    mac.finalize().into_bytes().into()
}

pub const DIALER: &[u8] = b"entente/transport/handshake/dialer";
pub const ACCEPTOR: &[u8] = b"entente/transport/handshake/acceptor";

/// What the acceptor did with a handshake.
#[derive(Debug)]
pub enum Outcome {
    /// It proved itself too: the connection is authenticated as `from`.
    Welcome(TcpStream),
    /// Its answer to the `Hello` (anything but a bare nonce) or to the proof.
    Refused {
        after_hello: Option<Frame>,
        after_proof: Option<Frame>,
    },
}

/// Connects to `to` (optionally from a given local IP) and runs the
/// dialer's side of the handshake as node `from` with `secret`.
pub async fn handshake(
    addr: SocketAddr,
    cluster_id: &str,
    from: u64,
    to: u64,
    secret: &[u8],
) -> Outcome {
    handshake_as(addr, cluster_id, from, to, secret, APP_FORMAT).await
}

/// [`handshake`], announcing `app_format` as the entry format.
pub async fn handshake_as(
    addr: SocketAddr,
    cluster_id: &str,
    from: u64,
    to: u64,
    secret: &[u8],
    app_format: u32,
) -> Outcome {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let hello = Hello {
        version: VERSION,
        cluster_id: cluster_id.into(),
        from,
        to,
        stream: Stream::Messages,
        nonce: [0x42; 32],
        app_format,
        engine: ENGINE.into(),
    };
    send(&mut s, &Frame::Hello(hello.clone())).await;
    let nonce_a = match recv(&mut s).await {
        Some(Frame::Nonce { nonce }) => nonce,
        other => {
            return Outcome::Refused {
                after_hello: other,
                after_proof: None,
            };
        }
    };
    let mac = transcript_mac(secret, DIALER, &hello, &nonce_a);
    send(&mut s, &Frame::Auth { mac }).await;
    match recv(&mut s).await {
        Some(Frame::Welcome { mac }) => {
            assert_eq!(
                mac,
                transcript_mac(secret, ACCEPTOR, &hello, &nonce_a),
                "the acceptor's proof"
            );
            Outcome::Welcome(s)
        }
        other => Outcome::Refused {
            after_hello: Some(Frame::Nonce { nonce: nonce_a }),
            after_proof: other,
        },
    }
}

/// A TCP connection to `to` from the loopback address `from` (all of
/// 127.0.0.0/8 is local on Linux).
pub async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((from, 0)))?;
    sock.connect(to).await
}
