//! Drives transports through the public API only, on a multi-threaded
//! runtime as a node driver would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use coordinator::raft::{ConfState, Message, MessageKind, NodeId, SnapshotMeta};
use coordinator::transport::{Inbound, Transport, TransportConfig};
use tokio::sync::mpsc::Receiver;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn config(id: NodeId) -> TransportConfig {
    let mut c = TransportConfig::new(
        id,
        "public-api",
        b"a cluster secret of decent length".to_vec(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(100);
    c
}

fn heartbeat(from: NodeId, to: NodeId, n: u64) -> Message {
    Message {
        from,
        to,
        term: n,
        kind: MessageKind::Heartbeat {
            commit: n,
            ctx: Some(n.to_be_bytes().to_vec()),
        },
    }
}

async fn next(rx: &mut Receiver<Inbound>) -> Inbound {
    timeout(WAIT, rx.recv())
        .await
        .expect("timed out")
        .expect("channel closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_multi_threaded_runtime() {
    // Bind first, then tell everyone the addresses (as a driver reading a
    // static membership would, via set_peer for the late-bound ports).
    let mut nodes: Vec<(Transport, Receiver<Inbound>)> = (1..=3)
        .map(|id| Transport::<Message>::start(config(id)).expect("start"))
        .collect();
    let addrs: BTreeMap<NodeId, SocketAddr> = nodes
        .iter()
        .map(|(t, _)| (t.node_id(), t.local_addr()))
        .collect();
    for (t, _) in &nodes {
        for (&id, &addr) in &addrs {
            if id != t.node_id() {
                t.set_peer(id, addr).expect("set_peer");
            }
        }
    }

    for n in 1..=100 {
        for (t, _) in &nodes {
            for &to in addrs.keys() {
                if to != t.node_id() {
                    t.send(heartbeat(t.node_id(), to, n));
                }
            }
        }
    }
    for (t, rx) in &mut nodes {
        let mut next_from: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut got = 0;
        while got < 200 {
            match next(rx).await {
                Inbound::Message(m) => {
                    assert_eq!(m.to, t.node_id());
                    let expected = next_from.entry(m.from).or_insert(1);
                    assert_eq!(m.term, *expected);
                    *expected += 1;
                    got += 1;
                }
                Inbound::Unreachable(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    // A snapshot from node 1 to node 3.
    let image: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let snap = Message {
        from: 1,
        to: 3,
        term: 9,
        kind: MessageKind::Snapshot {
            meta: SnapshotMeta {
                index: 100,
                term: 9,
                conf_state: ConfState::with_voters([1, 2, 3]),
            },
        },
    };
    let files = tempfile::tempdir().expect("tempdir");
    let path = files.path().join("image");
    std::fs::write(&path, &image).expect("write image");
    let stored =
        coordinator::image::SnapshotImage::new(path, image.len() as u64, crc32c::crc32c(&image));
    nodes[0].0.send_snapshot(snap.clone(), stored);
    loop {
        match next(&mut nodes[2].1).await {
            Inbound::Snapshot { msg, image: got } => {
                assert_eq!(msg, snap);
                assert!(std::fs::read(got.path()).expect("read") == image);
                break;
            }
            Inbound::Unreachable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    loop {
        match next(&mut nodes[0].1).await {
            Inbound::SnapshotStatus { to, ok } => {
                assert_eq!((to, ok), (3, true));
                break;
            }
            Inbound::Unreachable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    for (t, rx) in &mut nodes {
        t.shutdown().await;
        while timeout(WAIT, rx.recv()).await.expect("closes").is_some() {}
    }
}

#[test]
fn transport_can_be_shared_across_tasks() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Transport>();
    send_sync::<Inbound>();
    send_sync::<TransportConfig>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (t, _rx) = Transport::<Message>::start(config(1)).expect("start");
        let shutdown = t.shutdown();
        send(&shutdown);
        shutdown.await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_serve_listeners_their_caller_bound() {
    // Bound first, so every address is known before any transport starts
    // (no port picked, released and bound again, which another process
    // could take in between).
    let listeners: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let mut nodes: Vec<(Transport, Receiver<Inbound>)> = listeners
        .into_iter()
        .zip(1..)
        .map(|(l, id)| {
            let mut c = config(id);
            let other = if id == 1 { 2 } else { 1 };
            c.peers.insert(other, addrs[(other - 1) as usize].into());
            Transport::start_on(c, l).expect("start on a bound listener")
        })
        .collect();
    assert_eq!(nodes[0].0.local_addr(), addrs[0]);
    assert_eq!(nodes[1].0.local_addr(), addrs[1]);
    nodes[0].0.send(heartbeat(1, 2, 1));
    loop {
        match next(&mut nodes[1].1).await {
            Inbound::Message(m) => {
                assert_eq!((m.from, m.to, m.term), (1, 2, 1));
                break;
            }
            Inbound::Unreachable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    for (t, _) in nodes {
        t.shutdown().await;
    }
}
