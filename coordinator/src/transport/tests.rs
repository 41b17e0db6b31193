//! Tests over real TCP on 127.0.0.1. Every wait is on a channel or a socket
//! with a timeout; nothing sleeps to synchronise.
//!
//! `#[tokio::test]` runs on a current-thread runtime, so every task of a test
//! runs on the test's thread and a thread-local log subscriber sees them all.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout, timeout_at};

use super::backoff::Backoff;
use super::error::{FrameError, HandshakeError};
use super::frame::{
    Bytes, Hello, MAX_HANDSHAKE_FRAME, RefuseReason, StreamKind, decode_frame, encode_frame,
    read_frame, send_frame,
};
/// Frames as the Raft engine's members exchange them.
type Frame = super::frame::Frame<Message>;
use super::handshake::{Identity, accept, dial};
use super::{Inbound, PROTOCOL_VERSION, PeerStatus, Transport, TransportConfig, TransportError};
use crate::raft::{ConfState, Entry, EntryPayload, Message, MessageKind, NodeId, SnapshotMeta};

const CLUSTER: &str = "test-cluster";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
/// Upper bound on any single wait; tests normally finish far sooner.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn config(id: NodeId) -> TransportConfig {
    let mut c = TransportConfig::new(id, CLUSTER, SECRET.to_vec(), localhost());
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(200);
    c.handshake_timeout = Duration::from_secs(2);
    c.rng_seed = Some(id);
    // Tests wait for specific reports; don't let rate limiting hide them.
    c.unreachable_report_interval = Duration::ZERO;
    c
}

fn msg(from: NodeId, to: NodeId, n: u64) -> Message {
    Message {
        from,
        to,
        term: n,
        kind: MessageKind::Heartbeat {
            commit: n,
            ctx: None,
        },
    }
}

fn big_msg(from: NodeId, to: NodeId, size: usize) -> Message {
    Message {
        from,
        to,
        term: 1,
        kind: MessageKind::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![Entry {
                term: 1,
                index: 1,
                payload: EntryPayload::Normal(vec![0xAB; size].into()),
            }],
            commit: 0,
        },
    }
}

fn snap_msg(from: NodeId, to: NodeId) -> Message {
    Message {
        from,
        to,
        term: 3,
        kind: MessageKind::Snapshot {
            meta: SnapshotMeta {
                index: 42,
                term: 3,
                conf_state: ConfState::with_voters([1, 2, 3]),
            },
        },
    }
}

fn identity(id: NodeId) -> Identity {
    Identity {
        node_id: id,
        cluster_id: CLUSTER.to_string(),
        secret: SECRET.to_vec(),
        version: PROTOCOL_VERSION,
        app_format: 0,
        engine: "raft".to_owned(),
    }
}

type Node = (Transport, mpsc::Receiver<Inbound>);

fn start(c: TransportConfig) -> Node {
    Transport::<Message>::start(c).expect("transport starts")
}

/// Starts one transport per id, each knowing all the others.
fn cluster(ids: &[NodeId]) -> Vec<Node> {
    let nodes: Vec<Node> = ids.iter().map(|&id| start(config(id))).collect();
    for (t, _) in &nodes {
        for (peer, _) in &nodes {
            if peer.node_id() != t.node_id() {
                t.set_peer(peer.node_id(), peer.local_addr())
                    .expect("set_peer");
            }
        }
    }
    nodes
}

async fn next(rx: &mut mpsc::Receiver<Inbound>) -> Inbound {
    timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for an inbound event")
        .expect("inbound channel closed")
}

/// The next `Inbound::Message`, skipping transport feedback.
async fn next_message(rx: &mut mpsc::Receiver<Inbound>) -> Message {
    loop {
        match next(rx).await {
            Inbound::Message(m) => return m,
            Inbound::Unreachable(_) | Inbound::SnapshotStatus { .. } => {}
            other => panic!("unexpected inbound event {other:?}"),
        }
    }
}

/// Sends `from → to` and checks it arrives, with a fresh term as marker.
async fn assert_delivers(
    src: &Transport,
    dst_rx: &mut mpsc::Receiver<Inbound>,
    to: NodeId,
    n: u64,
) {
    src.send(msg(src.node_id(), to, n));
    let got = next_message(dst_rx).await;
    assert_eq!(got, msg(src.node_id(), to, n));
}

/// Resends until one arrives: for after an outage, when messages sent while
/// the peer was away are (correctly) dropped.
async fn deliver_eventually(
    src: &Transport,
    dst_rx: &mut mpsc::Receiver<Inbound>,
    to: NodeId,
    marker: u64,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        src.send(msg(src.node_id(), to, marker));
        let attempt = Instant::now() + Duration::from_millis(100);
        loop {
            match timeout_at(attempt.min(deadline), dst_rx.recv()).await {
                Ok(Some(Inbound::Message(m))) if m.term == marker => return,
                Ok(Some(_)) => {}
                Ok(None) => panic!("inbound channel closed"),
                Err(_) => break,
            }
        }
        assert!(Instant::now() < deadline, "message never delivered");
    }
}

/// Waits until the peer closes `sock` (EOF or reset), discarding what it
/// sends first (e.g. a `Refused` frame).
async fn expect_closed(sock: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match timeout(WAIT, sock.read(&mut buf)).await {
            Err(_) => panic!("connection was not closed"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

/// Opens a connection to `addr` and authenticates as `from` wanting `to`.
async fn raw_dial(addr: SocketAddr, from: NodeId, to: NodeId, kind: StreamKind) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    timeout(WAIT, dial(&mut s, &identity(from), to, kind))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    s
}

/// Captures log output of the current thread.
#[derive(Clone)]
struct Logs {
    buf: Arc<Mutex<Vec<u8>>>,
    tick: Arc<watch::Sender<u64>>,
}

struct LogWriter(Logs);

impl io::Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.buf.lock().expect("log lock").extend_from_slice(data);
        self.0.tick.send_modify(|t| *t += 1);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.clone())
    }
}

impl Logs {
    fn install() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs {
            buf: Arc::new(Mutex::new(Vec::new())),
            tick: Arc::new(watch::channel(0).0),
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    fn contents(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().expect("log lock")).into_owned()
    }

    /// Waits for a log line containing every one of `needles`.
    async fn wait_for(&self, needles: &[&str]) -> String {
        let mut changed = self.tick.subscribe();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self
                .contents()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_string();
            }
            if timeout_at(deadline, changed.changed()).await.is_err() {
                panic!("no log line with {needles:?}; logs:\n{}", self.contents());
            }
        }
    }
}

// ------------------------------------------------------- codec and pieces

#[test]
fn frames_round_trip() {
    let frames = vec![
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            cluster_id: CLUSTER.into(),
            from: 1,
            to: 2,
            stream: StreamKind::Snapshot,
            nonce: [7; 32],
            app_format: 2,
            engine: "raft".to_owned(),
        }),
        Frame::Challenge {
            nonce: [1; 32],
            mac: [2; 32],
        },
        Frame::Auth { mac: [3; 32] },
        Frame::Refused {
            reason: RefuseReason::Version { supported: 1 },
        },
        Frame::Message(big_msg(1, 2, 1000)),
        Frame::SnapshotBegin {
            msg: snap_msg(1, 2),
            total_len: 123,
        },
        Frame::SnapshotChunk {
            data: Bytes((0..=255).collect()),
        },
        Frame::SnapshotEnd { digest: [9; 32] },
        Frame::SnapshotAck { ok: true },
        Frame::Nonce { nonce: [4; 32] },
        Frame::Welcome { mac: [5; 32] },
        Frame::Status(super::status::StatusWire {
            from: 1,
            term: 2,
            commit: 300,
            applied: 299,
            role: 3,
        }),
    ];
    for frame in frames {
        let bytes = encode_frame(&frame, 1 << 20).expect("encode");
        let len = u32::from_be_bytes(bytes[..4].try_into().expect("prefix")) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(decode_frame::<Message>(&bytes[4..]).expect("decode"), frame);
    }
}

#[test]
fn chunk_bytes_are_encoded_compactly() {
    let frame = Frame::SnapshotChunk {
        data: Bytes(vec![0xFF; 1000]),
    };
    // tag + 2-byte length varint + the bytes themselves
    assert_eq!(
        encode_frame(&frame, 1 << 20).expect("encode").len(),
        4 + 1 + 2 + 1000
    );
}

/// A status report costs a few bytes on the wire (it goes to every member
/// four times a second): a group of billions of entries' worth of numbers
/// still fits in 48 bytes with the length prefix.
#[test]
fn a_status_frame_is_a_few_bytes() {
    use super::status::StatusWire;
    let size = |commit: u64| {
        encode_frame::<Message>(
            &Frame::Status(StatusWire {
                from: 3,
                term: 12,
                commit,
                applied: commit,
                role: 0,
            }),
            1 << 20,
        )
        .expect("encode")
        .len()
    };
    assert_eq!(size(100_000), 14);
    assert!(size(1 << 40) <= 48, "{}", size(1 << 40));
}

#[test]
fn encode_refuses_oversize() {
    let frame = Frame::Message(big_msg(1, 2, 5000));
    assert!(matches!(
        encode_frame(&frame, 4096),
        Err(FrameError::Oversize { max: 4096, .. })
    ));
}

#[test]
fn decode_refuses_garbage_and_trailing_bytes() {
    assert!(matches!(
        decode_frame::<Message>(&[]),
        Err(FrameError::Decode(_))
    ));
    assert!(matches!(
        decode_frame::<Message>(&[0xFF; 8]),
        Err(FrameError::Decode(_))
    ));
    let mut bytes = encode_frame(&Frame::SnapshotAck { ok: true }, 64).expect("encode");
    bytes.push(0);
    assert!(matches!(
        decode_frame::<Message>(&bytes[4..]),
        Err(FrameError::TrailingBytes(1))
    ));
}

#[tokio::test]
async fn read_frame_handles_eof_truncation_and_oversize() {
    // Clean end of stream.
    let mut empty: &[u8] = &[];
    assert!(matches!(
        read_frame::<_, Message>(&mut empty, 64).await,
        Ok(None)
    ));
    // End inside the length prefix.
    let mut short: &[u8] = &[0, 0];
    assert!(matches!(
        read_frame::<_, Message>(&mut short, 64).await,
        Err(FrameError::Truncated {
            expected: 4,
            got: 2
        })
    ));
    // End inside the payload.
    let mut trunc: &[u8] = &[0, 0, 0, 10, 1, 2, 3];
    assert!(matches!(
        read_frame::<_, Message>(&mut trunc, 64).await,
        Err(FrameError::Truncated {
            expected: 10,
            got: 3
        })
    ));
    // Announced length over the limit: refused before reading the payload.
    let mut big: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF];
    assert!(matches!(
        read_frame::<_, Message>(&mut big, 64).await,
        Err(FrameError::Oversize { max: 64, .. })
    ));
    // Two frames back to back.
    let mut both = encode_frame(&Frame::SnapshotAck { ok: true }, 64).expect("encode");
    both.extend(encode_frame(&Frame::SnapshotAck { ok: false }, 64).expect("encode"));
    let mut r: &[u8] = &both;
    assert_eq!(
        read_frame(&mut r, 64).await.expect("first"),
        Some(Frame::SnapshotAck { ok: true })
    );
    assert_eq!(
        read_frame(&mut r, 64).await.expect("second"),
        Some(Frame::SnapshotAck { ok: false })
    );
    assert!(matches!(
        read_frame::<_, Message>(&mut r, 64).await,
        Ok(None)
    ));
}

#[test]
fn backoff_grows_is_capped_and_jittered() {
    let min = Duration::from_millis(10);
    let max = Duration::from_millis(100);
    let mut b = Backoff::new(min, max, 7);
    let mut base = min;
    for _ in 0..20 {
        let d = b.next_delay();
        assert!(
            d >= base / 2 && d <= base,
            "{d:?} outside [{:?}, {base:?}]",
            base / 2
        );
        base = (base * 2).min(max);
    }
    b.reset();
    assert!(b.next_delay() <= min);
    // Same seed, same delays.
    let mut x = Backoff::new(min, max, 99);
    let mut y = Backoff::new(min, max, 99);
    for _ in 0..10 {
        assert_eq!(x.next_delay(), y.next_delay());
    }
}

async fn handshake_pair(
    dialer: Identity,
    acceptor: Identity,
    to: NodeId,
) -> (
    Result<(), HandshakeError>,
    Result<(NodeId, StreamKind), HandshakeError>,
) {
    let (mut a, mut b) = tokio::io::duplex(64 * 1024);
    let d = async move {
        let r = dial(&mut a, &dialer, to, StreamKind::Messages).await;
        drop(a);
        r
    };
    let acc = async move {
        let r = accept(&mut b, &acceptor).await;
        drop(b);
        r
    };
    tokio::join!(d, acc)
}

#[tokio::test]
async fn handshake_succeeds_with_matching_credentials() {
    let (d, a) = handshake_pair(identity(1), identity(2), 2).await;
    d.expect("dialer");
    assert_eq!(a.expect("acceptor"), (1, StreamKind::Messages));
}

#[tokio::test]
async fn handshake_fails_both_ways_with_wrong_secret() {
    let mut wrong = identity(1);
    wrong.secret = b"not the secret".to_vec();
    // The dialer proves first: the acceptor finds its proof wrong.
    let (d, a) = handshake_pair(wrong, identity(2), 2).await;
    assert!(matches!(a, Err(HandshakeError::BadMac)), "{a:?}");
    assert!(
        matches!(
            d,
            Err(HandshakeError::Refused(RefuseReason::Authentication))
        ),
        "{d:?}"
    );
}

#[tokio::test]
async fn handshake_refusals_name_the_reason() {
    let mut other_cluster = identity(1);
    other_cluster.cluster_id = "other".into();
    let (d, a) = handshake_pair(other_cluster, identity(2), 2).await;
    assert!(matches!(
        d,
        Err(HandshakeError::Refused(RefuseReason::ClusterId))
    ));
    assert!(matches!(a, Err(HandshakeError::ClusterId { .. })));

    let mut other_version = identity(1);
    other_version.version = 99;
    let (d, a) = handshake_pair(other_version, identity(2), 2).await;
    assert!(matches!(
        d,
        Err(HandshakeError::Refused(RefuseReason::Version {
            supported: PROTOCOL_VERSION
        }))
    ));
    assert!(matches!(
        a,
        Err(HandshakeError::Version {
            ours: PROTOCOL_VERSION,
            theirs: 99
        })
    ));

    let mut other_format = identity(1);
    other_format.app_format = 8;
    let (d, a) = handshake_pair(other_format, identity(2), 2).await;
    assert!(matches!(
        d,
        Err(HandshakeError::Refused(RefuseReason::AppFormat {
            supported: 0
        }))
    ));
    assert!(matches!(
        a,
        Err(HandshakeError::AppFormat { ours: 0, theirs: 8 })
    ));

    // Members running different consensus engines refuse each other, each
    // side naming the other's engine.
    let mut other_engine = identity(1);
    other_engine.engine = "multi-paxos".to_owned();
    let (d, a) = handshake_pair(other_engine, identity(2), 2).await;
    match d {
        Err(HandshakeError::Refused(RefuseReason::Engine { supported })) => {
            assert_eq!(supported, "raft")
        }
        other => panic!("the dialer was not refused for its engine: {other:?}"),
    }
    match a {
        Err(e @ HandshakeError::Engine { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("\"multi-paxos\"") && text.contains("\"raft\""),
                "{text}"
            );
        }
        other => panic!("the acceptor did not refuse the engine: {other:?}"),
    }

    let (d, a) = handshake_pair(identity(1), identity(2), 3).await;
    assert!(matches!(
        d,
        Err(HandshakeError::Refused(RefuseReason::Target))
    ));
    assert!(matches!(
        a,
        Err(HandshakeError::Target {
            target: 3,
            local: 2
        })
    ));

    let (d, a) = handshake_pair(identity(2), identity(2), 2).await;
    assert!(matches!(
        d,
        Err(HandshakeError::Refused(RefuseReason::Sender))
    ));
    assert!(matches!(a, Err(HandshakeError::Sender(2))));
}

#[test]
fn config_is_validated() {
    let ok = config(1);
    ok.validate().expect("valid");
    type Mutation = Box<dyn Fn(&mut TransportConfig)>;
    let cases: Vec<Mutation> = vec![
        Box::new(|c| c.node_id = 0),
        Box::new(|c| c.cluster_secret.clear()),
        Box::new(|c| c.cluster_id = "x".repeat(2000)),
        Box::new(|c| {
            c.peers.insert(1, localhost().into());
        }),
        Box::new(|c| c.max_frame_size = 10),
        Box::new(|c| c.peer_queue_capacity = 0),
        Box::new(|c| c.snapshot_chunk_size = c.max_frame_size),
        Box::new(|c| c.backoff_min = Duration::ZERO),
        Box::new(|c| c.backoff_max = Duration::from_millis(1)),
        Box::new(|c| c.handshake_timeout = Duration::ZERO),
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut c = ok.clone();
        case(&mut c);
        assert!(
            matches!(c.validate(), Err(TransportError::InvalidConfig(_))),
            "case {i} passed validation"
        );
    }
    let debug = format!("{ok:?}");
    assert!(
        !debug.contains("0123456789abcdef"),
        "secret leaked into Debug"
    );
}

#[test]
fn start_needs_a_runtime() {
    assert!(matches!(
        Transport::<Message>::start(config(1)),
        Err(TransportError::NoRuntime)
    ));
}

// ------------------------------------------------------- message traffic

#[tokio::test]
async fn two_transports_exchange_messages_both_ways() {
    let mut nodes = cluster(&[1, 2]);
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    assert_ne!(a.local_addr().port(), 0);
    // Sent at once: queued while the connections are being established.
    for n in 1..=50 {
        a.send(msg(1, 2, n));
        b.send(msg(2, 1, 1000 + n));
    }
    for n in 1..=50 {
        assert_eq!(next_message(&mut rx_b).await, msg(1, 2, n));
        assert_eq!(next_message(&mut rx_a).await, msg(2, 1, 1000 + n));
    }
    // Large messages too.
    a.send(big_msg(1, 2, 3 * 1024 * 1024));
    assert_eq!(
        next_message(&mut rx_b).await,
        big_msg(1, 2, 3 * 1024 * 1024)
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn three_transports_exchange_messages() {
    let mut nodes = cluster(&[1, 2, 3]);
    for n in 1..=20 {
        for (t, _) in &nodes {
            for to in [1, 2, 3] {
                if to != t.node_id() {
                    t.send(msg(t.node_id(), to, n));
                }
            }
        }
    }
    for (t, rx) in &mut nodes {
        let me = t.node_id();
        let mut next_from = std::collections::BTreeMap::new();
        for _ in 0..40 {
            let m = next_message(rx).await;
            assert_eq!(m.to, me);
            // In order per sender.
            let expected = next_from.entry(m.from).or_insert(1u64);
            assert_eq!(m.term, *expected, "from {}", m.from);
            *expected += 1;
        }
        assert_eq!(next_from.len(), 2);
    }
    for (t, _) in &nodes {
        t.shutdown().await;
    }
}

#[tokio::test]
async fn unknown_peer_is_reported_unreachable_rate_limited() {
    let mut c = config(1);
    c.unreachable_report_interval = Duration::from_secs(3600);
    let (a, mut rx_a) = start(c);
    a.send(msg(1, 9, 1));
    a.send(msg(1, 9, 2));
    assert_eq!(next(&mut rx_a).await, Inbound::Unreachable(9));
    // The second drop is within the interval: no second report.
    assert!(rx_a.try_recv().is_err());
    // Not from this node: dropped without a report.
    a.send(msg(5, 9, 3));
    assert!(rx_a.try_recv().is_err());
}

#[tokio::test]
async fn peers_can_be_added_changed_and_removed_at_run_time() {
    let (a, mut rx_a) = start(config(1));
    let (b1, mut rx_b1) = start(config(2));
    let (b2, mut rx_b2) = start(config(2));
    assert!(matches!(
        a.set_peer(0, b1.local_addr()),
        Err(TransportError::InvalidPeer(0))
    ));
    assert!(matches!(
        a.set_peer(1, b1.local_addr()),
        Err(TransportError::InvalidPeer(1))
    ));

    a.set_peer(2, b1.local_addr()).expect("add");
    b1.set_peer(1, a.local_addr()).expect("add");
    assert_eq!(a.peers().get(&2), Some(&b1.local_addr().into()));
    assert_delivers(&a, &mut rx_b1, 2, 1).await;
    assert_delivers(&b1, &mut rx_a, 1, 2).await;

    // Node 2 moves to another address: the writer redials there.
    a.set_peer(2, b2.local_addr()).expect("change");
    assert_eq!(a.peers().get(&2), Some(&b2.local_addr().into()));
    deliver_eventually(&a, &mut rx_b2, 2, 3).await;

    assert!(a.remove_peer(2));
    assert!(!a.remove_peer(2));
    assert!(a.peers().is_empty());
    a.send(msg(1, 2, 4));
    loop {
        if next(&mut rx_a).await == Inbound::Unreachable(2) {
            break;
        }
    }
    for t in [&a, &b1, &b2] {
        t.shutdown().await;
    }
}

/// A resolver the test controls: the name resolves to nothing until
/// `target` is set, and every lookup is counted.
#[derive(Default)]
struct TestResolver {
    target: Mutex<Option<SocketAddr>>,
    lookups: std::sync::atomic::AtomicUsize,
}

impl super::Resolve for TestResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> super::ResolveFuture<'a> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let found = *self.target.lock().unwrap();
        Box::pin(async move {
            assert_eq!((host, port), ("gw2.test", 7000));
            match found {
                Some(a) => Ok(vec![a]),
                None => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no such host (yet)",
                )),
            }
        })
    }
}

/// Finding: peer host names were resolved once, when the gateway started,
/// and a failed lookup was fatal; so a group whose members start in any
/// order (containers) could not form, and a peer that came back at another
/// address was never found. A name is now resolved at every dial.
#[tokio::test]
async fn a_peer_name_is_resolved_at_every_dial() {
    let (logs, _guard) = Logs::install();
    let resolver = Arc::new(TestResolver::default());
    let mut c = config(1);
    c.resolver = resolver.clone();
    c.peers.insert(2, "gw2.test:7000".parse().expect("name"));
    let (a, _rx_a) = start(c);

    // The name does not resolve: messages are dropped (reported), the
    // failure is logged naming the peer, and lookups go on.
    a.send(msg(1, 2, 1));
    logs.wait_for(&[
        "WARN",
        "cannot connect to peer",
        "peer=2",
        "gw2.test:7000",
        "resolve",
    ])
    .await;
    let deadline = Instant::now() + WAIT;
    while resolver.lookups.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the name is looked up again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Node 2 comes up and its name resolves: the group connects.
    let (b1, mut rx_b1) = start(config(2));
    *resolver.target.lock().unwrap() = Some(b1.local_addr());
    deliver_eventually(&a, &mut rx_b1, 2, 2).await;

    // Node 2 is recreated at another address; the name follows it, and the
    // writer finds it there after the old connection ends.
    let (b2, mut rx_b2) = start(config(2));
    *resolver.target.lock().unwrap() = Some(b2.local_addr());
    b1.shutdown().await;
    deliver_eventually(&a, &mut rx_b2, 2, 3).await;
    assert_eq!(
        a.peers().get(&2).map(ToString::to_string).as_deref(),
        Some("gw2.test:7000")
    );
    for t in [&a, &b2] {
        t.shutdown().await;
    }
}

#[tokio::test]
async fn shutdown_closes_everything() {
    let mut nodes = cluster(&[1, 2]);
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    assert_delivers(&a, &mut rx_b, 2, 1).await;
    let addr = a.local_addr();
    a.shutdown().await;
    a.shutdown().await; // idempotent
    // The inbound channel closes once drained.
    while timeout(WAIT, rx_a.recv()).await.expect("closes").is_some() {}
    assert!(matches!(
        a.set_peer(2, b.local_addr()),
        Err(TransportError::ShutDown)
    ));
    a.send(msg(1, 2, 2)); // dropped silently, no panic
    // Nobody listens any more.
    assert!(TcpStream::connect(addr).await.is_err());
    b.shutdown().await;
}

// ------------------------------------------------------- refused handshakes

/// Starts good nodes 1 and 2 and a misconfigured node 3 (made by `bad`)
/// that dials node 1 as `target`; checks node 1 refuses it with a warning
/// naming the address and `reason`, that node 3 learns node 1 is
/// unreachable, and that 1 and 2 keep talking.
async fn refused_peer(bad: TransportConfig, version: u32, target: NodeId, reason: &str) {
    let (logs, _guard) = Logs::install();
    let mut nodes = cluster(&[1, 2]);
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    let (c, mut rx_c) = Transport::start_with_version(bad, version, None).expect("start c");
    c.set_peer(target, a.local_addr()).expect("set_peer");
    c.send(msg(3, target, 1));

    let line = logs
        .wait_for(&[
            "WARN",
            "refused incoming connection",
            "peer_addr=127.0.0.1:",
            reason,
        ])
        .await;
    assert!(line.contains(reason), "{line}");
    // The dialer warns too, naming the acceptor's address.
    logs.wait_for(&[
        "WARN",
        "cannot connect to peer",
        &a.local_addr().to_string(),
    ])
    .await;
    // Its message was dropped and reported.
    assert_eq!(next(&mut rx_c).await, Inbound::Unreachable(target));

    assert_delivers(&a, &mut rx_b, 2, 10).await;
    assert_delivers(&b, &mut rx_a, 1, 11).await;
    // Node 1 never heard from node 3.
    while let Ok(ev) = rx_a.try_recv() {
        assert!(
            !matches!(ev, Inbound::Message(ref m) if m.from == 3),
            "{ev:?}"
        );
    }
    for t in [&a, &b, &c] {
        t.shutdown().await;
    }
}

#[tokio::test]
async fn wrong_secret_is_refused() {
    let mut bad = config(3);
    bad.cluster_secret = b"some other secret".to_vec();
    refused_peer(bad, PROTOCOL_VERSION, 1, "wrong cluster secret").await;
}

#[tokio::test]
async fn wrong_cluster_id_is_refused() {
    let mut bad = config(3);
    bad.cluster_id = "another-cluster".into();
    refused_peer(bad, PROTOCOL_VERSION, 1, "wrong cluster id").await;
}

#[tokio::test]
async fn wrong_version_is_refused() {
    refused_peer(
        config(3),
        PROTOCOL_VERSION + 1,
        1,
        "protocol version mismatch",
    )
    .await;
}

#[tokio::test]
async fn wrong_target_node_is_refused() {
    // Node 3 believes node 7 lives at node 1's address.
    refused_peer(config(3), PROTOCOL_VERSION, 7, "wrong target node id 7").await;
}

/// Sends a `Hello` on a raw connection and returns the acceptor's answer.
async fn raw_hello(s: &mut TcpStream, cluster_id: &str, from: NodeId, to: NodeId) -> Option<Frame> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: cluster_id.into(),
        from,
        to,
        stream: StreamKind::Messages,
        nonce: [5; 32],
        app_format: 0,
        engine: "raft".to_owned(),
    };
    send_frame(s, &Frame::Hello(hello), MAX_HANDSHAKE_FRAME)
        .await
        .expect("hello");
    timeout(WAIT, read_frame(s, MAX_HANDSHAKE_FRAME))
        .await
        .expect("an answer in time")
        .expect("reply")
}

#[tokio::test]
async fn forged_dialer_mac_is_refused() {
    let (logs, _guard) = Logs::install();
    let (a, _rx_a) = start(config(1));
    let mut s = TcpStream::connect(a.local_addr()).await.expect("connect");
    let me = s.local_addr().expect("addr").to_string();
    let reply = raw_hello(&mut s, CLUSTER, 2, 1).await;
    assert!(matches!(reply, Some(Frame::Nonce { .. })), "{reply:?}");
    // Without the secret we can only guess.
    send_frame(&mut s, &Frame::Auth { mac: [0; 32] }, MAX_HANDSHAKE_FRAME)
        .await
        .expect("auth");
    let reply = read_frame(&mut s, MAX_HANDSHAKE_FRAME)
        .await
        .expect("reply");
    assert_eq!(
        reply,
        Some(Frame::Refused {
            reason: RefuseReason::Authentication
        })
    );
    expect_closed(&mut s).await;
    logs.wait_for(&["WARN", &me, "authentication failed"]).await;
    a.shutdown().await;
}

/// The acceptor gives a caller that has not proved it knows the secret
/// nothing to test guesses against: its first answer is a fresh nonce that
/// depends neither on the secret nor on the `Hello` (whatever the `Hello`
/// claims), and a wrong proof gets a refusal, never the acceptor's MAC.
#[tokio::test]
async fn acceptor_reveals_nothing_before_the_dialer_proves() {
    let (a, _rx_a) = start(config(1));
    let mut nonces = Vec::new();
    for (cluster, from, to) in [(CLUSTER, 2, 1), ("other", 2, 1), (CLUSTER, 1, 7)] {
        let mut s = TcpStream::connect(a.local_addr()).await.expect("connect");
        let reply = raw_hello(&mut s, cluster, from, to).await;
        let Some(Frame::Nonce { nonce }) = reply else {
            panic!("answer to an unproven caller: {reply:?}");
        };
        nonces.push(nonce);
        send_frame(&mut s, &Frame::Auth { mac: [9; 32] }, MAX_HANDSHAKE_FRAME)
            .await
            .expect("auth");
        let reply = timeout(WAIT, read_frame(&mut s, MAX_HANDSHAKE_FRAME))
            .await
            .expect("an answer in time")
            .expect("reply");
        assert_eq!(
            reply,
            Some(Frame::Refused {
                reason: RefuseReason::Authentication
            }),
            "a wrong proof is refused as such, whatever else is wrong"
        );
        expect_closed(&mut s).await;
    }
    nonces.sort();
    nonces.dedup();
    assert_eq!(nonces.len(), 3, "every connection gets a fresh nonce");

    // A dialer that proves itself gets the acceptor's proof, and is then told
    // what else is wrong.
    let (d, acc) = handshake_pair(identity(1), identity(2), 2).await;
    d.expect("dialer verifies the acceptor");
    acc.expect("acceptor");
    a.shutdown().await;
}

// ------------------------------------------------------- hostile bytes

/// Node 1 and 2 talking; `attack` misbehaves on a raw connection to node 1,
/// which must close it and log `reason` with the attacker's address, then
/// keep serving node 2. (Attackers that authenticate do so as node 4: a new
/// connection from node 2 would legitimately replace node 2's own.)
async fn hostile<F, Fut>(reason: &str, attack: F)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: Future<Output = TcpStream>,
{
    let (logs, _guard) = Logs::install();
    let mut nodes = cluster(&[1, 2]);
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    assert_delivers(&b, &mut rx_a, 1, 1).await;

    let mut sock = attack(a.local_addr()).await;
    let me = sock.local_addr().expect("addr").to_string();
    expect_closed(&mut sock).await;
    logs.wait_for(&["WARN", &format!("peer_addr={me}"), reason])
        .await;

    // The node still serves its good peer, both ways, on the existing and on
    // new connections.
    assert_delivers(&b, &mut rx_a, 1, 2).await;
    assert_delivers(&a, &mut rx_b, 2, 3).await;
    let (c, _rx_c) = start(config(3));
    c.set_peer(1, a.local_addr()).expect("set_peer");
    assert_delivers(&c, &mut rx_a, 1, 4).await;
    for t in [&a, &b, &c] {
        t.shutdown().await;
    }
}

#[tokio::test]
async fn garbage_before_handshake_drops_connection() {
    hostile("exceeds the maximum", |addr| async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        s
    })
    .await;
}

#[tokio::test]
async fn undecodable_hello_drops_connection() {
    hostile("undecodable frame", |addr| async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&[0, 0, 0, 6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
            .await
            .expect("write");
        s
    })
    .await;
}

#[tokio::test]
async fn oversize_length_prefix_drops_connection() {
    // Before the handshake the limit is the small handshake limit...
    hostile("exceeds the maximum of 4096", |addr| async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&5000u32.to_be_bytes()).await.expect("write");
        s
    })
    .await;
}

#[tokio::test]
async fn oversize_frame_after_handshake_drops_connection() {
    // ...after it, the configured maximum frame size.
    let max = TransportConfig::DEFAULT_MAX_FRAME_SIZE;
    hostile(
        &format!("exceeds the maximum of {max}"),
        |addr| async move {
            let mut s = raw_dial(addr, 4, 1, StreamKind::Messages).await;
            s.write_all(&(max as u32 + 1).to_be_bytes())
                .await
                .expect("write");
            s
        },
    )
    .await;
}

#[tokio::test]
async fn truncated_frame_drops_connection() {
    hostile("truncated frame", |addr| async move {
        let mut s = raw_dial(addr, 4, 1, StreamKind::Messages).await;
        let frame = encode_frame(&Frame::Message(msg(4, 1, 9)), 1 << 20).expect("encode");
        s.write_all(&frame[..frame.len() - 3]).await.expect("write");
        // End our side mid-frame.
        s.shutdown().await.expect("shutdown");
        s
    })
    .await;
}

#[tokio::test]
async fn garbage_after_handshake_drops_connection() {
    hostile("undecodable frame", |addr| async move {
        let mut s = raw_dial(addr, 4, 1, StreamKind::Messages).await;
        let mut garbage = 16u32.to_be_bytes().to_vec();
        garbage.extend([0xEE; 16]);
        s.write_all(&garbage).await.expect("write");
        s
    })
    .await;
}

#[tokio::test]
async fn handshake_frame_after_handshake_drops_connection() {
    hostile("unexpected frame on a message stream", |addr| async move {
        let mut s = raw_dial(addr, 4, 1, StreamKind::Messages).await;
        send_frame(&mut s, &Frame::Auth { mac: [0; 32] }, 1024)
            .await
            .expect("write");
        s
    })
    .await;
}

#[tokio::test]
async fn idle_socket_is_closed_after_handshake_timeout() {
    let (logs, _guard) = Logs::install();
    let mut c = config(1);
    c.handshake_timeout = Duration::from_millis(200);
    let (a, _rx_a) = start(c);
    let mut s = TcpStream::connect(a.local_addr()).await.expect("connect");
    let me = s.local_addr().expect("addr").to_string();
    expect_closed(&mut s).await;
    logs.wait_for(&["WARN", &me, "handshake timed out"]).await;
    a.shutdown().await;
}

#[tokio::test]
async fn pending_handshakes_are_bounded() {
    let (logs, _guard) = Logs::install();
    let mut c = config(1);
    c.max_pending_handshakes = 1;
    let (a, mut rx_a) = start(c);
    let idle = TcpStream::connect(a.local_addr()).await.expect("connect");
    let mut second = TcpStream::connect(a.local_addr()).await.expect("connect");
    let me = second.local_addr().expect("addr").to_string();
    expect_closed(&mut second).await;
    logs.wait_for(&["WARN", &me, "too many connections"]).await;
    // Once the idle one goes away, peers get in again.
    drop(idle);
    let (b, _rx_b) = start(config(2));
    b.set_peer(1, a.local_addr()).expect("set_peer");
    deliver_eventually(&b, &mut rx_a, 1, 1).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Connects to `to` from the loopback address `from` (any 127.x.y.z works
/// on Linux without configuration).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((from, 0))).expect("bind");
    sock.connect(to).await.expect("connect")
}

/// Whether the listener closes `sock` within `within` (it sheds a
/// connection at once when it has no handshake slot for it).
async fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        timeout(within, sock.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn members_get_through_a_flood_of_strangers() {
    let mut ca = config(1);
    // Strangers would hold their slots for the whole test.
    ca.handshake_timeout = Duration::from_secs(60);
    let (a, mut rx_a) = start(ca);
    let (b, _rx_b) = start(config(2));
    a.set_peer(2, b.local_addr()).expect("set_peer");
    let defaults = TransportConfig::new(1, "x", b"x".to_vec(), localhost());
    let (per_ip, shared) = (
        defaults.max_pending_handshakes_per_ip,
        defaults.max_pending_handshakes,
    );

    // One stranger address gets its share of slots and no more.
    let mut idle = Vec::new();
    for _ in 0..per_ip {
        idle.push(connect_from([127, 0, 0, 2], a.local_addr()).await);
    }
    let mut extra = connect_from([127, 0, 0, 2], a.local_addr()).await;
    assert!(
        closed_within(&mut extra, WAIT).await,
        "one address held more than its share"
    );
    // Strangers from many addresses fill the whole shared pool; the rest
    // are closed at once.
    let mut ip = 3u8;
    while idle.len() < shared {
        for _ in 0..per_ip {
            idle.push(connect_from([127, 0, 0, ip], a.local_addr()).await);
        }
        ip += 1;
    }
    let mut late = connect_from([127, 0, 0, ip], a.local_addr()).await;
    assert!(closed_within(&mut late, WAIT).await, "the pool is not full");
    for s in &mut idle {
        assert!(
            !closed_within(s, Duration::ZERO).await,
            "an idle stranger was closed"
        );
    }

    // Node 2 (a restarted follower, say) dials from its own address, which
    // node 1 knows: it gets a reserved slot and its messages through while
    // every stranger still waits.
    b.set_peer(1, a.local_addr()).expect("set_peer");
    deliver_eventually(&b, &mut rx_a, 1, 1).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn spoofed_sender_is_dropped() {
    let (logs, _guard) = Logs::install();
    let (a, mut rx_a) = start(config(1));
    // Authenticated as node 2 ...
    let mut s = raw_dial(a.local_addr(), 2, 1, StreamKind::Messages).await;
    let max = 1 << 20;
    // ... claiming to be node 3: dropped.
    send_frame(&mut s, &Frame::Message(msg(3, 1, 1)), max)
        .await
        .expect("write");
    // ... addressed to node 4: dropped.
    send_frame(&mut s, &Frame::Message(msg(2, 4, 2)), max)
        .await
        .expect("write");
    // ... a snapshot message without its image: dropped.
    send_frame(&mut s, &Frame::Message(snap_msg(2, 1)), max)
        .await
        .expect("write");
    // ... honest: delivered, on the same connection.
    send_frame(&mut s, &Frame::Message(msg(2, 1, 3)), max)
        .await
        .expect("write");
    assert_eq!(next(&mut rx_a).await, Inbound::Message(msg(2, 1, 3)));
    let line = logs.wait_for(&["WARN", "claims another sender"]).await;
    assert!(
        line.contains("claimed_from=3") && line.contains("peer=2"),
        "{line}"
    );
    logs.wait_for(&["WARN", "addressed to another node"]).await;
    logs.wait_for(&["WARN", "snapshot message without its image"])
        .await;
    a.shutdown().await;
}

/// Status reports are hostile input like the rest: one that names another
/// sender, a role this version does not know, or a term or index beyond
/// any a group reaches is ignored with a warning naming the peer and the
/// reason (once a minute per peer and reason), and the connection goes on.
#[tokio::test]
async fn odd_status_reports_are_ignored_with_a_warning_and_the_connection_goes_on() {
    use super::status::StatusWire;
    use crate::raft::{MAX_INDEX, MAX_TERM, Role};
    let (logs, _guard) = Logs::install();
    let (a, mut rx_a) = start(config(1));
    let mut s = raw_dial(a.local_addr(), 2, 1, StreamKind::Messages).await;
    let max = 1 << 20;
    let report = |from, role, term, commit, applied| {
        Frame::Status(StatusWire {
            from,
            term,
            commit,
            applied,
            role,
        })
    };
    let odd = [
        report(3, 0, 1, 1, 1),
        report(2, 4, 1, 1, 1),
        report(2, 0, MAX_TERM + 1, 1, 1),
        report(2, 0, 1, MAX_INDEX + 1, 1),
        report(2, 0, 1, 1, u64::MAX),
    ];
    for _ in 0..2 {
        for f in &odd {
            send_frame(&mut s, f, max).await.expect("write");
        }
    }
    send_frame(&mut s, &report(2, 3, 4, 10, 9), max)
        .await
        .expect("write");
    send_frame(&mut s, &Frame::Message(msg(2, 1, 3)), max)
        .await
        .expect("write");
    assert_eq!(
        next(&mut rx_a).await,
        Inbound::Status(PeerStatus {
            from: 2,
            term: 4,
            commit: 10,
            applied: 9,
            role: Role::Leader,
        })
    );
    assert_eq!(next(&mut rx_a).await, Inbound::Message(msg(2, 1, 3)));
    let line = logs
        .wait_for(&["WARN", "status report from peer refused", "another sender"])
        .await;
    assert!(
        line.contains("peer=2") && line.contains("claimed_from=3"),
        "{line}"
    );
    for reason in ["unknown role code", "term beyond", "index beyond"] {
        logs.wait_for(&["WARN", "status report from peer refused", reason])
            .await;
    }
    // Sent twice, logged once per reason (the two bad indexes share one).
    let refused = logs
        .contents()
        .matches("status report from peer refused")
        .count();
    assert_eq!(refused, 4, "{}", logs.contents());
    a.shutdown().await;
}

/// `send_status` carries a report to a peer as `Inbound::Status`; one for
/// an unknown peer is dropped without telling the engine (no
/// `Unreachable`), and one not from this node is not sent.
#[tokio::test]
async fn status_reports_travel_between_transports_best_effort() {
    use crate::raft::Role;
    let (logs, _guard) = Logs::install();
    let mut nodes = cluster(&[1, 2]);
    let report = |from| PeerStatus {
        from,
        term: 3,
        commit: 12,
        applied: 11,
        role: Role::Follower,
    };
    nodes[0].0.send_status(9, report(1));
    nodes[0].0.send_status(2, report(7));
    nodes[0].0.send_status(2, report(1));
    let got = loop {
        match next(&mut nodes[1].1).await {
            Inbound::Status(s) => break s,
            Inbound::Unreachable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(got, report(1));
    logs.wait_for(&["WARN", "status report not from this node"])
        .await;
    // The next event on node 1 is the report of a message to an unknown
    // peer, not one for the status report dropped before it.
    nodes[0].0.send(msg(1, 8, 1));
    assert_eq!(next(&mut nodes[0].1).await, Inbound::Unreachable(8));
    for (t, _) in &nodes {
        t.shutdown().await;
    }
}

// ------------------------------------------------------- failures and recovery

#[tokio::test]
async fn reconnects_after_peer_restarts_on_same_address() {
    let mut nodes = cluster(&[1, 2]);
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    assert_delivers(&a, &mut rx_b, 2, 1).await;
    assert_delivers(&b, &mut rx_a, 1, 2).await;

    let b_addr = b.local_addr();
    b.shutdown().await;
    while timeout(WAIT, rx_b.recv()).await.expect("closes").is_some() {}
    // While node 2 is down, messages to it are dropped and reported. (The
    // first ones may still vanish into the closing socket, before the writer
    // notices the connection is gone, so keep sending.)
    let deadline = Instant::now() + WAIT;
    'reported: loop {
        a.send(msg(1, 2, 3));
        let attempt = Instant::now() + Duration::from_millis(100);
        while let Ok(ev) = timeout_at(attempt, rx_a.recv()).await {
            match ev {
                Some(Inbound::Unreachable(2)) => break 'reported,
                Some(_) => {}
                None => panic!("inbound channel closed"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "node 2 never reported unreachable"
        );
    }

    let mut c = config(2);
    c.listen_addr = b_addr;
    c.peers.insert(1, a.local_addr().into());
    let (b, mut rx_b) = start(c);
    assert_eq!(b.local_addr(), b_addr);
    deliver_eventually(&a, &mut rx_b, 2, 4).await;
    assert_delivers(&b, &mut rx_a, 1, 5).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn unresponsive_listener_does_not_block_other_peers() {
    // Node 3 "listens" but never accepts, reads or answers.
    let black_hole = TcpListener::bind(localhost()).await.expect("bind");
    let mut c1 = config(1);
    c1.peer_queue_capacity = 8;
    let (a, mut rx_a) = start(c1);
    let (b, mut rx_b) = start(config(2));
    a.set_peer(2, b.local_addr()).expect("set_peer");
    b.set_peer(1, a.local_addr()).expect("set_peer");
    a.set_peer(3, black_hole.local_addr().expect("addr"))
        .expect("set_peer");
    // The writer for node 3 hangs in its handshake; its queue fills.
    for n in 0..20 {
        a.send(msg(1, 3, n));
    }
    loop {
        if next(&mut rx_a).await == Inbound::Unreachable(3) {
            break;
        }
    }
    assert_delivers(&a, &mut rx_b, 2, 1).await;
    assert_delivers(&b, &mut rx_a, 1, 2).await;
    a.shutdown().await;
    b.shutdown().await;
    drop(black_hole);
}

#[tokio::test]
async fn peer_that_stops_reading_does_not_block_other_peers() {
    // Node 3 completes the handshake, then never reads again.
    let listener = TcpListener::bind(localhost()).await.expect("bind");
    let stalled_addr = listener.local_addr().expect("addr");
    let (ready_tx, ready_rx) = oneshot::channel();
    let (_hold_tx, hold_rx) = oneshot::channel::<()>();
    let stalled = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let who = accept(&mut s, &identity(3)).await.expect("handshake");
        let _ = ready_tx.send(who);
        // Keep the socket open, unread, until the test ends.
        let _ = hold_rx.await;
        drop(s);
    });

    let mut c1 = config(1);
    c1.peer_queue_capacity = 4;
    c1.io_timeout = Duration::from_secs(60);
    let (a, mut rx_a) = start(c1);
    let (b, mut rx_b) = start(config(2));
    a.set_peer(2, b.local_addr()).expect("set_peer");
    b.set_peer(1, a.local_addr()).expect("set_peer");
    a.set_peer(3, stalled_addr).expect("set_peer");
    assert_eq!(
        timeout(WAIT, ready_rx)
            .await
            .expect("handshake")
            .expect("ready"),
        (1, StreamKind::Messages)
    );

    // 64 MiB to a peer that reads nothing: more than any socket buffers hold,
    // so the writer blocks, the queue fills, and drops are reported.
    let mut unreachable = false;
    let mut sent = 0;
    for _ in 0..256 {
        sent += 1;
        a.send(big_msg(1, 3, 256 * 1024));
        tokio::task::yield_now().await;
        while let Ok(ev) = rx_a.try_recv() {
            unreachable |= ev == Inbound::Unreachable(3);
        }
        if unreachable {
            break;
        }
    }
    assert!(unreachable, "a stalled peer was never reported unreachable");
    // The writer took messages until the socket filled (with a 4-slot queue
    // and an idle writer, the 5th send would already have been dropped).
    assert!(sent > 5, "reported after only {sent} messages");
    // Meanwhile, node 2 is served both ways.
    for n in 1..=10 {
        assert_delivers(&a, &mut rx_b, 2, n).await;
        assert_delivers(&b, &mut rx_a, 1, 100 + n).await;
    }
    a.shutdown().await;
    b.shutdown().await;
    stalled.abort();
}

// ------------------------------------------------------- snapshots

fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// `data` stored as a snapshot image file in `dir`.
fn stored(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> crate::image::SnapshotImage {
    let path = dir.path().join(name);
    std::fs::write(&path, data).expect("write image");
    crate::image::SnapshotImage::new(path, data.len() as u64, crc32c::crc32c(data))
}

/// The bytes of a received image.
fn received(image: &crate::image::StagedImage) -> Vec<u8> {
    assert!(image.is_sealed(), "a delivered image is sealed");
    std::fs::read(image.path()).expect("read received image")
}

#[tokio::test]
async fn snapshot_of_several_mib_arrives_intact() {
    let mut nodes = cluster(&[1, 2]);
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    // Six 1 MiB chunks, the last one partial.
    let data = image(5 * 1024 * 1024 + 12_345);
    let files = tempfile::tempdir().expect("tempdir");
    a.send_snapshot(snap_msg(1, 2), stored(&files, "img", &data));
    // Ordinary messages are not held up behind it.
    a.send(msg(1, 2, 7));
    let mut got_snapshot = false;
    let mut got_message = false;
    while !(got_snapshot && got_message) {
        match next(&mut rx_b).await {
            Inbound::Snapshot { msg: m, image } => {
                assert_eq!(m, snap_msg(1, 2));
                assert!(received(&image) == data, "snapshot image differs");
                assert_eq!(image.crc32c(), crc32c::crc32c(&data));
                got_snapshot = true;
            }
            Inbound::Message(m) => {
                assert_eq!(m, msg(1, 2, 7));
                got_message = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    loop {
        match next(&mut rx_a).await {
            Inbound::SnapshotStatus { to, ok } => {
                assert_eq!((to, ok), (2, true));
                break;
            }
            Inbound::Unreachable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn snapshot_to_dead_or_unknown_peer_reports_failure() {
    let dead = {
        let l = TcpListener::bind(localhost()).await.expect("bind");
        l.local_addr().expect("addr")
    };
    let (a, mut rx_a) = start(config(1));
    a.set_peer(2, dead).expect("set_peer");
    let files = tempfile::tempdir().expect("tempdir");
    let data = stored(&files, "img", &image(3 * 1024 * 1024));
    a.send_snapshot(snap_msg(1, 2), data.clone());
    let status = |ev: Inbound| match ev {
        Inbound::SnapshotStatus { to, ok } => Some((to, ok)),
        _ => None,
    };
    loop {
        if let Some(s) = status(next(&mut rx_a).await) {
            assert_eq!(s, (2, false));
            break;
        }
    }
    // Unknown peer.
    a.send_snapshot(snap_msg(1, 9), data.clone());
    loop {
        if let Some(s) = status(next(&mut rx_a).await) {
            assert_eq!(s, (9, false));
            break;
        }
    }
    // A snapshot message through send(): it would lose its image.
    a.send(snap_msg(1, 2));
    loop {
        if let Some(s) = status(next(&mut rx_a).await) {
            assert_eq!(s, (2, false));
            break;
        }
    }
    // Not a snapshot message.
    a.send_snapshot(msg(1, 2, 1), data);
    loop {
        if let Some(s) = status(next(&mut rx_a).await) {
            assert_eq!(s, (2, false));
            break;
        }
    }
    a.shutdown().await;
}

#[tokio::test]
async fn newer_snapshot_supersedes_older() {
    let mut nodes = cluster(&[1, 2]);
    let (b, mut rx_b) = nodes.pop().expect("b");
    let (a, mut rx_a) = nodes.pop().expect("a");
    let files = tempfile::tempdir().expect("tempdir");
    let older = stored(&files, "older", &image(2 * 1024 * 1024));
    let newer_data = image(1024 * 1024 + 1);
    let newer = stored(&files, "newer", &newer_data);
    a.send_snapshot(snap_msg(1, 2), older);
    a.send_snapshot(snap_msg(1, 2), newer);
    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        if let Inbound::SnapshotStatus { to, ok } = next(&mut rx_a).await {
            statuses.push((to, ok));
        }
    }
    // Exactly one report each: the cancelled one failed, the newer one worked.
    assert_eq!(statuses, vec![(2, false), (2, true)]);
    match next(&mut rx_b).await {
        Inbound::Snapshot { image, .. } => assert!(received(&image) == newer_data),
        other => panic!("unexpected {other:?}"),
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn corrupt_snapshot_is_rejected() {
    let (logs, _guard) = Logs::install();
    let (a, mut rx_a) = start(config(1));
    let mut s = raw_dial(a.local_addr(), 2, 1, StreamKind::Snapshot).await;
    let max = 1 << 20;
    send_frame(
        &mut s,
        &Frame::SnapshotBegin {
            msg: snap_msg(2, 1),
            total_len: 10,
        },
        max,
    )
    .await
    .expect("write");
    send_frame(
        &mut s,
        &Frame::SnapshotChunk {
            data: Bytes(vec![1; 10]),
        },
        max,
    )
    .await
    .expect("write");
    send_frame(&mut s, &Frame::SnapshotEnd { digest: [0; 32] }, max)
        .await
        .expect("write");
    let ack = timeout(WAIT, read_frame(&mut s, max))
        .await
        .expect("ack")
        .expect("frame");
    assert_eq!(ack, Some(Frame::SnapshotAck { ok: false }));
    logs.wait_for(&["WARN", "rejected incoming snapshot", "digest mismatch"])
        .await;

    // A snapshot claiming to come from someone else is rejected as well.
    let mut s = raw_dial(a.local_addr(), 2, 1, StreamKind::Snapshot).await;
    send_frame(
        &mut s,
        &Frame::SnapshotBegin {
            msg: snap_msg(3, 1),
            total_len: 0,
        },
        max,
    )
    .await
    .expect("write");
    let ack = timeout(WAIT, read_frame(&mut s, max))
        .await
        .expect("ack")
        .expect("frame");
    assert_eq!(ack, Some(Frame::SnapshotAck { ok: false }));

    // Nothing reached the driver; the next event is an honest message.
    let mut m = raw_dial(a.local_addr(), 2, 1, StreamKind::Messages).await;
    send_frame(&mut m, &Frame::Message(msg(2, 1, 5)), max)
        .await
        .expect("write");
    assert_eq!(next(&mut rx_a).await, Inbound::Message(msg(2, 1, 5)));
    a.shutdown().await;
}

/// Peer frames are hostile input: seeded cases decode arbitrary bytes and
/// valid frames of every kind with bytes changed, cut or appended. Decoding
/// answers a frame or an error, never panics, and a frame it answers
/// encodes again within the frame limit.
#[test]
fn arbitrary_frame_bytes_never_panic_the_decoder() {
    let mut rng = crate::raft::SplitMix64::new(0xf7a3_e5ed);
    let entries: Vec<Entry> = (1..=3)
        .map(|i| Entry {
            term: 2,
            index: i,
            payload: EntryPayload::Normal(vec![i as u8; 20].into()),
        })
        .collect();
    let append = Message {
        from: 1,
        to: 2,
        term: 2,
        kind: MessageKind::Append {
            prev_index: 0,
            prev_term: 0,
            entries,
            commit: 1,
        },
    };
    let samples = [
        Frame::Message(append.clone()),
        Frame::Message(big_msg(1, 2, 300)),
        Frame::SnapshotBegin {
            msg: Message {
                from: 1,
                to: 2,
                term: 2,
                kind: MessageKind::Snapshot {
                    meta: SnapshotMeta {
                        index: 9,
                        term: 2,
                        conf_state: ConfState::with_voters([1, 2, 3]),
                    },
                },
            },
            total_len: 1 << 20,
        },
        Frame::SnapshotAck { ok: false },
    ];
    let encoded: Vec<Vec<u8>> = samples
        .iter()
        .map(|f| encode_frame(f, 1 << 20).expect("encode")[4..].to_vec())
        .collect();
    let (mut decoded, mut refused) = (0u32, 0u32);
    for _ in 0..20_000 {
        let mut bytes = encoded[rng.range(0, encoded.len() as u64) as usize].clone();
        match rng.range(0, 4) {
            0 => {
                let len = rng.range(0, 64);
                bytes = (0..len).map(|_| rng.next_u64() as u8).collect();
            }
            1 => {
                for _ in 0..rng.range(1, 4) {
                    let at = rng.range(0, bytes.len() as u64) as usize;
                    bytes[at] = rng.next_u64() as u8;
                }
            }
            2 => bytes.truncate(rng.range(0, bytes.len() as u64) as usize),
            _ => bytes.extend((0..rng.range(1, 9)).map(|_| rng.next_u64() as u8)),
        }
        match decode_frame::<Message>(&bytes) {
            Ok(frame) => {
                decoded += 1;
                encode_frame(&frame, 1 << 21).expect("a decoded frame encodes again");
            }
            Err(_) => refused += 1,
        }
    }
    assert!(
        decoded > 1_000 && refused > 1_000,
        "{decoded} decoded, {refused} refused"
    );
}

mod tls;
