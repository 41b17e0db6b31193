//! The node driver running PBFT in-process (real storage in temp dirs, an
//! in-process peer channel, Ed25519 keys): a proposal is answered once it
//! is applied and its commit certificate is in, and the certificate
//! verifies with the group's public keys alone; without f+1 replies the
//! proposal is answered after the request timeout without one, and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consensus::pbft::certificate;
use consensus::pbft::crypto::Ed25519;
use consensus::pbft::{Config, Message, MessageKind, Pbft};
use coordinator::engine::{Engine, EngineKind, Status};
use coordinator::node::{
    BoxError, BuildEngine, Committed, Node, NodeConfig, SnapshotView, StateMachine,
};
use coordinator::raft::{ConfState, Index, NodeId, SnapshotMeta};
use coordinator::ready::{Certificate, CompactError, ProposeError, Proposed, Ready, StepError};
use coordinator::types::{HardState, InitialState, Role};

mod support;

use support::{Hub, start_node};

const IDS: [NodeId; 4] = [1, 2, 3, 4];

fn seed(id: NodeId) -> [u8; 32] {
    [id as u8; 32]
}

fn keys() -> BTreeMap<NodeId, [u8; 32]> {
    IDS.iter()
        .map(|&id| (id, Ed25519::public_key(&seed(id))))
        .collect()
}

/// PBFT with Ed25519 keys made from the node id (a test-only engine: the
/// gateway's PBFT wiring builds its own from key files).
#[derive(Debug)]
struct TestPbft(Pbft);

impl BuildEngine for TestPbft {
    fn build(cfg: &NodeConfig, init: InitialState) -> Result<Self, String> {
        let id = cfg.raft.id;
        let crypto = Ed25519::new(id, &seed(id), &keys()).map_err(|e| e.to_string())?;
        Pbft::new(Config::new(id, Arc::new(crypto)), init)
            .map(TestPbft)
            .map_err(|e| e.to_string())
    }
}

impl Engine for TestPbft {
    type Message = Message;
    fn kind(&self) -> EngineKind {
        self.0.kind()
    }
    fn id(&self) -> NodeId {
        Engine::id(&self.0)
    }
    fn role(&self) -> Role {
        Engine::role(&self.0)
    }
    fn term(&self) -> u64 {
        Engine::term(&self.0)
    }
    fn leader(&self) -> Option<NodeId> {
        Engine::leader(&self.0)
    }
    fn hard_state(&self) -> HardState {
        Engine::hard_state(&self.0)
    }
    fn commit_index(&self) -> Index {
        Engine::commit_index(&self.0)
    }
    fn applied_index(&self) -> Index {
        Engine::applied_index(&self.0)
    }
    fn term_at(&self, index: Index) -> Option<u64> {
        Engine::term_at(&self.0, index)
    }
    fn conf_state(&self) -> &ConfState {
        Engine::conf_state(&self.0)
    }
    fn snapshot_meta(&self) -> &SnapshotMeta {
        Engine::snapshot_meta(&self.0)
    }
    fn snapshot_meta_at(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        Engine::snapshot_meta_at(&self.0, index)
    }
    fn status(&self) -> Status {
        Engine::status(&self.0)
    }
    fn tick(&mut self) {
        Engine::tick(&mut self.0)
    }
    fn campaign(&mut self) {
        Engine::campaign(&mut self.0)
    }
    fn step(&mut self, msg: Message) -> Result<(), StepError> {
        Engine::step(&mut self.0, msg)
    }
    fn propose(&mut self, data: Vec<u8>) -> Result<Proposed, ProposeError> {
        Engine::propose(&mut self.0, data)
    }
    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        Engine::read_index(&mut self.0, ctx)
    }
    fn report_unreachable(&mut self, id: NodeId) {
        Engine::report_unreachable(&mut self.0, id)
    }
    fn report_snapshot(&mut self, id: NodeId, success: bool) {
        Engine::report_snapshot(&mut self.0, id, success)
    }
    fn compact_keeping(&mut self, index: Index, keep: u64) -> Result<SnapshotMeta, CompactError> {
        Engine::compact_keeping(&mut self.0, index, keep)
    }
    fn has_ready(&self) -> bool {
        Engine::has_ready(&self.0)
    }
    fn ready(&mut self) -> Ready<Message> {
        Engine::ready(&mut self.0)
    }
    fn advance(&mut self) {
        Engine::advance(&mut self.0)
    }
    fn certifies(&self) -> bool {
        Engine::certifies(&self.0)
    }
    fn take_certificates(&mut self) -> Vec<Certificate> {
        Engine::take_certificates(&mut self.0)
    }
}

/// The replies the hub drops: every REPLY (and request for one) addressed
/// to the nodes in `no_replies_to`.
#[derive(Default)]
struct Replies {
    no_replies_to: Mutex<BTreeSet<NodeId>>,
    dropped_replies: AtomicBool,
}

impl Replies {
    fn lose(&self, msg: &Message) -> bool {
        let reply = matches!(msg.kind, MessageKind::Reply(_));
        if reply && self.no_replies_to.lock().expect("lock").contains(&msg.to) {
            self.dropped_replies.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }
}

/// Applies nothing but counts: the output of each entry is its index.
#[derive(Default, Clone)]
struct Counter(Arc<Mutex<Index>>);

impl StateMachine for Counter {
    type Output = Index;

    fn applied_index(&self) -> Index {
        *self.0.lock().expect("counter")
    }

    async fn apply(
        &mut self,
        entries: Vec<Committed>,
        last: Index,
    ) -> Result<Vec<Index>, BoxError> {
        *self.0.lock().expect("counter") = last;
        Ok(entries.iter().map(|e| e.index).collect())
    }

    type Snapshot = Empty;

    async fn snapshot(&mut self) -> Result<Empty, BoxError> {
        Ok(Empty(*self.0.lock().expect("counter")))
    }

    async fn restore(
        &mut self,
        meta: &SnapshotMeta,
        _image: coordinator::image::ImageReader,
    ) -> Result<(), BoxError> {
        *self.0.lock().expect("counter") = meta.index;
        Ok(())
    }
}

struct Empty(Index);

impl SnapshotView for Empty {
    async fn write_to(self, dest: std::path::PathBuf) -> Result<Index, BoxError> {
        std::fs::write(dest, b"")?;
        Ok(self.0)
    }
}

async fn group(
    dir: &std::path::Path,
    request_timeout: Duration,
) -> (Arc<Replies>, Vec<Node<Index>>) {
    let replies = Arc::new(Replies::default());
    let lose = replies.clone();
    let hub = Arc::new(Hub::losing(move |msg: &Message| lose.lose(msg)));
    let mut nodes = Vec::new();
    for id in IDS {
        let mut cfg = NodeConfig::new(id);
        cfg.engine = EngineKind::Pbft;
        cfg.tick = Duration::from_millis(5);
        cfg.request_timeout = request_timeout;
        let node = start_node::<TestPbft, _>(&hub, dir, id, &IDS, cfg, Counter::default()).await;
        nodes.push(node);
    }
    (replies, nodes)
}

#[tokio::test]
async fn a_pbft_proposal_is_answered_with_a_commit_certificate_that_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_replies, nodes) = group(dir.path(), Duration::from_secs(10)).await;
    let keys = keys();
    for (i, at) in [1usize, 2, 3].into_iter().enumerate() {
        let body = format!("write {i}").into_bytes();
        let applied = nodes[at].propose(body.clone()).await.expect("applied");
        let cert = applied.certificate.expect("a certificate");
        let v = certificate::verify(&cert, &keys).expect("verifies with the public keys");
        assert_eq!(v.index, applied.index);
        assert_eq!(v.client, IDS[at]);
        assert!(v.signers.len() >= 2, "f+1 signers: {:?}", v.signers);
        // The committed data is the driver's proposal header and the body.
        let data = v.data.expect("small writes are carried inline");
        assert!(data.ends_with(&body), "{data:?}");
    }
    for n in &nodes {
        assert_eq!(n.status().uncertified, 0);
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn without_replies_a_pbft_proposal_is_answered_after_the_timeout_without_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Long enough for a write to commit on a loaded machine (each PBFT
    // phase waits for an fsync).
    let timeout = Duration::from_secs(4);
    let (replies, nodes) = group(dir.path(), timeout).await;
    // The group orders a first write (certified), then node 2 hears no
    // replies.
    let first = nodes[1].propose(b"first".to_vec()).await.expect("applied");
    assert!(first.certificate.is_some());
    replies.no_replies_to.lock().expect("lock").insert(2);
    let started = tokio::time::Instant::now();
    let applied = nodes[1].propose(b"lonely".to_vec()).await.expect("applied");
    assert!(applied.certificate.is_none());
    assert!(replies.dropped_replies.load(Ordering::SeqCst));
    assert!(
        started.elapsed() >= timeout,
        "answered at the proposal's deadline, not at the apply"
    );
    assert_eq!(nodes[1].status().uncertified, 1);
    // Once replies flow again, the next write is certified.
    replies.no_replies_to.lock().expect("lock").clear();
    let applied = nodes[1].propose(b"again".to_vec()).await.expect("applied");
    let cert = applied.certificate.expect("a certificate");
    certificate::verify(&cert, &keys()).expect("verifies");
    for n in nodes {
        n.shutdown().await;
    }
}
