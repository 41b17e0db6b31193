//! The node driver running PBFT with real storage (temp dirs), real
//! Ed25519 keys and an in-process peer channel: writes made at any member
//! resolve with the state machine's output, reads are ordered through the
//! protocol, snapshots stand at stable checkpoints and the log is compacted
//! behind them, and a member restarted from its directory has its state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use coordinator::engine::EngineKind;
use coordinator::image::{SnapshotImage, StagedImage};
use coordinator::keys::NodeKey;
use coordinator::node::{BoxError, LogStore, Node, NodeConfig, PBFT_CHECKPOINT_INTERVAL, Preparer};
use coordinator::pbft::{Message, Pbft};
use coordinator::raft::{Entry, HardState, Index, NodeId, SnapshotMeta};
use coordinator::storage::Storage;

mod support;

use support::{Log, start_node, start_node_on};

/// Routes PBFT's messages between in-process nodes.
type Hub = support::Hub<Message>;

/// Member `id`'s key: fixed seeds, so the group's keys are known up front.
fn key(id: NodeId) -> NodeKey {
    NodeKey::from_seed([id as u8; 32])
}

fn config(id: NodeId, voters: &[NodeId]) -> NodeConfig {
    let mut c = NodeConfig::new(id);
    c.engine = EngineKind::Pbft;
    c.tick = Duration::from_millis(5);
    c.snapshot_every = 50;
    // Every write waits for three phases, each after an fsync.
    c.request_timeout = Duration::from_secs(30);
    let group: BTreeMap<NodeId, [u8; 32]> = voters.iter().map(|&v| (v, key(v).public())).collect();
    c.pbft_crypto = Some(key(id).crypto(id, &group).expect("keys"));
    c
}

async fn start(
    hub: &Arc<Hub>,
    dir: &std::path::Path,
    id: NodeId,
    voters: &[NodeId],
    sm: Log,
) -> Node<usize> {
    start_node::<Pbft, _>(hub, dir, id, voters, config(id, voters), sm).await
}

/// A group of one: writes and reads go through the protocol with no peer.
#[tokio::test]
async fn a_single_pbft_node_takes_writes_and_reads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hub = Arc::new(Hub::default());
    let log = Log::default();
    let node = start(&hub, tmp.path(), 1, &[1], log.clone()).await;
    for i in 0..5 {
        let a = node
            .propose(format!("v{i}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
        assert_eq!(a.output, i + 1);
    }
    let at = node.read_index().await.expect("read");
    assert!(at >= 5, "the read stands after the writes: {at}");
    assert_eq!(log.0.lock().expect("log").0, ["v0", "v1", "v2", "v3", "v4"]);
    node.shutdown().await;
}

/// Four members (f = 1): writes at every member, the primary's and the
/// backups', are applied everywhere in one order; snapshots are taken at
/// stable checkpoints (the only index PBFT compacts at), and a member
/// restarted from its directory comes back with its state and takes
/// writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_pbft_nodes_write_anywhere_snapshot_at_checkpoints_and_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hub = Arc::new(Hub::default());
    let voters = [1, 2, 3, 4];
    let mut nodes = BTreeMap::new();
    let mut logs = BTreeMap::new();
    for id in voters {
        let log = Log::default();
        nodes.insert(id, start(&hub, tmp.path(), id, &voters, log.clone()).await);
        logs.insert(id, log);
    }
    // Past two checkpoints, writes spread over every member, many at once
    // (the primary orders them in batches).
    let writes = 2 * PBFT_CHECKPOINT_INTERVAL + 20;
    let last = write_many(&nodes, "w", writes).await;
    for (id, n) in &nodes {
        n.wait_applied(last, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("node {id}: {e}"));
    }
    // One order everywhere, every write once.
    let first = logs[&1].0.lock().expect("log").0.clone();
    let mut sorted = first.clone();
    sorted.sort();
    let mut want: Vec<String> = (0..writes).map(|i| format!("w{i}")).collect();
    want.sort();
    assert_eq!(sorted, want);
    for (id, log) in &logs {
        assert_eq!(log.0.lock().expect("log").0, first, "node {id}");
    }
    // Every member took a snapshot at a checkpoint (bounded wait: the
    // group makes a checkpoint stable once three members signed it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (id, n) in &nodes {
        loop {
            let st = n.status();
            assert!(st.fatal.is_none(), "node {id}: {:?}", st.fatal);
            if st.raft.snapshot_index >= PBFT_CHECKPOINT_INTERVAL {
                assert_eq!(
                    st.raft.snapshot_index % PBFT_CHECKPOINT_INTERVAL,
                    0,
                    "node {id}: a snapshot stands at a checkpoint"
                );
                assert!(st.snapshots_built >= 1, "node {id}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id}: no snapshot at a checkpoint: {:?}",
                st.raft
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // A backup restarts from its directory with its state.
    let backup = 1 + (nodes[&1].status().raft.leader.unwrap_or(1) % 4);
    nodes.remove(&backup).expect("node").shutdown().await;
    let log = Log::default();
    let node = start(&hub, tmp.path(), backup, &voters, log.clone()).await;
    catches_up_and_takes_a_write(node, &log, last, &nodes).await;
}

/// The primary dies and the primary of the next view is cut off for a
/// while: a write made at a backup waits while the backups change views
/// (every replica holds it, its proposer sends it again) and is applied
/// once the next view is entered, answered with its result. The driver
/// used to answer a pending write "outcome unknown" one election timeout
/// after its leader changed, as it must for Raft, where a forwarded write
/// can die with its leader. With the primary of the next view reachable,
/// at the default 20 ms tick, a write completes within half a second of
/// the primary's death.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_at_a_backup_outlives_the_primary() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hub = Arc::new(Hub::default());
    let voters = [1, 2, 3, 4];
    let mut nodes = BTreeMap::new();
    for id in voters {
        let mut cfg = config(id, &voters);
        cfg.tick = Duration::from_millis(20);
        let node = start_node::<Pbft, _>(&hub, tmp.path(), id, &voters, cfg, Log::default()).await;
        nodes.insert(id, node);
    }
    let a = nodes[&2].propose(b"one".to_vec()).await.expect("write");
    assert_eq!(a.output, 1);
    assert_eq!(nodes[&2].status().raft.leader, Some(1), "view 0's primary");

    // The primary dies: a write at a backup completes in view 1.
    hub.down.lock().expect("down").insert(1);
    let started = tokio::time::Instant::now();
    let a = nodes[&3]
        .propose(b"two".to_vec())
        .await
        .expect("write in view 1");
    let took = started.elapsed();
    assert_eq!(a.output, 2);
    let st = nodes[&3].status().raft;
    assert_eq!((st.term, st.leader), (1, Some(2)), "{st:?}");
    eprintln!("a write at a backup after the primary died took {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // Now view 1's primary (2) is cut off too, for a while: the two
    // members left start a view change they cannot finish alone, and the
    // write waits for it, well past an election timeout after the view
    // changed, until 2 is back and the group enters view 2.
    hub.down.lock().expect("down").insert(2);
    let node3 = nodes[&3].clone();
    let write = tokio::spawn(async move { node3.propose(b"three".to_vec()).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes[&3].status().raft.leader.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "no view change");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Held cut off for twice the election timeout (a scenario's length,
    // not a wait for anything).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!write.is_finished(), "the write waits for the next view");
    hub.down.lock().expect("down").remove(&2);
    let a = write
        .await
        .expect("join")
        .expect("the write is applied once the group enters a view again");
    assert_eq!(a.output, 3);
    for n in nodes.values() {
        n.shutdown().await;
    }
}

/// Real storage whose snapshot preparer waits while the test holds `gate`
/// (an image being made durable while the group moves on), and tells at
/// which index it was entered; and which, if given `crash_copy`, copies
/// its directory there right after the first snapshot installed from a
/// peer is stored: what a crash at that moment would leave on disk.
struct GatedStore {
    inner: Storage,
    gate: Arc<tokio::sync::RwLock<()>>,
    entered: Arc<AtomicU64>,
    crash_copy: Option<PathBuf>,
}

impl GatedStore {
    fn new(inner: Storage) -> Self {
        GatedStore {
            inner,
            gate: Arc::default(),
            entered: Arc::default(),
            crash_copy: None,
        }
    }
}

/// Copies the directory tree `src` to `dst`, but for `tmp-*` entries
/// (images being staged meanwhile, which a restart removes anyway).
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read dir") {
        let e = e.expect("entry");
        if e.file_name().to_string_lossy().starts_with("tmp-") {
            continue;
        }
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copy");
        }
    }
}

impl LogStore for GatedStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), BoxError> {
        LogStore::append(&mut self.inner, entries)
    }
    fn set_hard_state(&mut self, hs: HardState) -> Result<(), BoxError> {
        LogStore::set_hard_state(&mut self.inner, hs)
    }
    fn sync(&mut self) -> Result<(), BoxError> {
        LogStore::sync(&mut self.inner)
    }
    fn staging_dir(&self) -> PathBuf {
        LogStore::staging_dir(&self.inner)
    }
    fn save_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        image: StagedImage,
        following: &[Entry],
    ) -> Result<SnapshotImage, BoxError> {
        let image = LogStore::save_snapshot(&mut self.inner, meta, image, following)?;
        if let Some(to) = self.crash_copy.take() {
            copy_tree(self.inner.dir(), &to);
        }
        Ok(image)
    }
    fn compact(&mut self, index: Index) -> Result<(), BoxError> {
        LogStore::compact(&mut self.inner, index)
    }
    type Prepared = <Storage as LogStore>::Prepared;
    fn snapshot_preparer(&self) -> Preparer<Self::Prepared> {
        let prepare = LogStore::snapshot_preparer(&self.inner);
        let (gate, entered) = (self.gate.clone(), self.entered.clone());
        Box::new(move |meta, staged| {
            entered.store(meta.index, Ordering::SeqCst);
            drop(gate.blocking_read());
            prepare(meta, staged)
        })
    }
    fn register_snapshot(&mut self, prepared: Self::Prepared) -> Result<SnapshotImage, BoxError> {
        LogStore::register_snapshot(&mut self.inner, prepared)
    }
    fn discard_snapshot(&mut self, prepared: Self::Prepared) {
        LogStore::discard_snapshot(&mut self.inner, prepared)
    }
    fn load_snapshot(&self) -> Result<Option<(SnapshotMeta, SnapshotImage)>, BoxError> {
        LogStore::load_snapshot(&self.inner)
    }
    fn flush(&mut self) -> Result<(), BoxError> {
        LogStore::flush(&mut self.inner)
    }
}

/// `count` writes spread over the members, 16 at a time; the highest
/// index they were applied at.
async fn write_many(nodes: &BTreeMap<NodeId, Node<usize>>, tag: &str, count: u64) -> Index {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(16));
    let members: Vec<NodeId> = nodes.keys().copied().collect();
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let at = members[i as usize % members.len()];
            let node = nodes[&at].clone();
            let in_flight = in_flight.clone();
            let data = format!("{tag}{i}").into_bytes();
            tokio::spawn(async move {
                let _permit = in_flight.acquire().await.expect("semaphore");
                node.propose(data)
                    .await
                    .map(|a| a.index)
                    .map_err(|e| format!("write {i} at {at}: {e}"))
            })
        })
        .collect();
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.expect("join").unwrap_or_else(|e| panic!("{e}")));
    }
    last
}

/// Waits (at most 20 s) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A restarted member (`node`, applying into `log`) catches up to `last`
/// and takes a write; then it and `others` stop.
async fn catches_up_and_takes_a_write(
    node: Node<usize>,
    log: &Log,
    last: Index,
    others: &BTreeMap<NodeId, Node<usize>>,
) {
    node.wait_applied(last, Duration::from_secs(20))
        .await
        .expect("the restarted member catches up");
    let a = node.propose(b"after".to_vec()).await.expect("write");
    assert!(a.index > last);
    node.wait_applied(a.index, Duration::from_secs(20))
        .await
        .expect("applied");
    assert_eq!(
        log.0.lock().expect("log").0.last().map(String::as_str),
        Some("after")
    );
    node.shutdown().await;
    for n in others.values() {
        n.shutdown().await;
    }
}

/// A member builds a snapshot at a stable checkpoint, and while its image
/// is being made durable the group makes later checkpoints stable there
/// too: the engine, which compacts only at its stable checkpoint, does not
/// take it. The image used to be stored all the same, as the newest
/// snapshot on disk; the engine cannot start from a snapshot whose
/// checkpoint state the log may no longer hold, so a member stopped then
/// could be unable to start again (a SIGKILLed gateway of a chaos run
/// refused every restart). Now such an image is discarded and never found
/// on disk: the member restarts from its previous snapshot and log and
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_snapshot_was_overtaken_by_a_later_checkpoint_restarts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hub = Arc::new(Hub::default());
    let voters = [1, 2, 3, 4];
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let entered = Arc::new(AtomicU64::new(0));
    let held = gate.clone().write_owned().await;
    let mut nodes = BTreeMap::new();
    for id in [1, 2, 3] {
        nodes.insert(
            id,
            start(&hub, tmp.path(), id, &voters, Log::default()).await,
        );
    }
    let wrap = {
        let (gate, entered) = (gate.clone(), entered.clone());
        |inner| GatedStore {
            gate,
            entered,
            ..GatedStore::new(inner)
        }
    };
    let cfg = config(4, &voters);
    let node =
        start_node_on::<Pbft, _, _>(&hub, tmp.path(), 4, &voters, cfg, Log::default(), wrap).await;
    nodes.insert(4, node);

    // Past the first checkpoint: member 4 builds its snapshot there and
    // is held making it durable.
    write_many(&nodes, "a", PBFT_CHECKPOINT_INTERVAL + 10).await;
    until("member 4 prepares a snapshot", || {
        entered.load(Ordering::SeqCst) > 0
    })
    .await;
    let held_at = entered.load(Ordering::SeqCst);
    assert_eq!(held_at % PBFT_CHECKPOINT_INTERVAL, 0, "{held_at}");
    // Member 4 executes past its high watermark of then (the window is
    // two checkpoint intervals): it can only once a later checkpoint is
    // stable there.
    let last = write_many(&nodes, "b", 2 * PBFT_CHECKPOINT_INTERVAL + 20).await;
    assert!(last > held_at + 2 * PBFT_CHECKPOINT_INTERVAL, "{last}");
    nodes[&4]
        .wait_applied(last, Duration::from_secs(20))
        .await
        .expect("member 4 applies");
    drop(held);
    until("member 4 drops its overtaken snapshot", || {
        nodes[&4].status().snapshots_overtaken >= 1
    })
    .await;

    // Stopped now and started again from its directory, it starts (from
    // an older snapshot, not the overtaken one) and catches up.
    nodes.remove(&4).expect("node").shutdown().await;
    let log = Log::default();
    let node = start(&hub, tmp.path(), 4, &voters, log.clone()).await;
    assert_ne!(
        node.status().raft.snapshot_index,
        held_at,
        "the overtaken snapshot is not found on disk"
    );
    catches_up_and_takes_a_write(node, &log, last, &nodes).await;
}

/// A member cut off while the group moved on catches up by installing a
/// snapshot from a peer; a crash right after the snapshot is stored (its
/// directory copied at that moment) leaves a member that starts and
/// catches up. The entry just above a PBFT snapshot holds its checkpoint's
/// state, without which the engine refuses to start; the driver used to
/// write the entries after an installed snapshot only once the state
/// machine had restored it, so a member killed meanwhile could never start
/// again. Now they are stored with the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_right_after_installing_a_snapshot_restarts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let crashed = tempfile::tempdir().expect("tmp");
    let hub = Arc::new(Hub::default());
    let voters = [1, 2, 3, 4];
    let mut nodes = BTreeMap::new();
    for id in [1, 2, 3] {
        nodes.insert(
            id,
            start(&hub, tmp.path(), id, &voters, Log::default()).await,
        );
    }
    let copy = crashed.path().join("4");
    let wrap = |inner| GatedStore {
        crash_copy: Some(copy.clone()),
        ..GatedStore::new(inner)
    };
    let cfg = config(4, &voters);
    let node =
        start_node_on::<Pbft, _, _>(&hub, tmp.path(), 4, &voters, cfg, Log::default(), wrap).await;
    nodes.insert(4, node);
    write_many(&nodes, "a", 5).await;

    // Member 4 is cut off while the group passes several checkpoints and
    // compacts behind them; back, it installs a snapshot.
    hub.down.lock().expect("down").insert(4);
    let up: BTreeMap<NodeId, Node<usize>> = nodes
        .iter()
        .filter(|(id, _)| **id != 4)
        .map(|(id, n)| (*id, n.clone()))
        .collect();
    let last = write_many(&up, "b", 4 * PBFT_CHECKPOINT_INTERVAL).await;
    hub.down.lock().expect("down").remove(&4);
    nodes[&4]
        .wait_applied(last, Duration::from_secs(30))
        .await
        .expect("member 4 catches up");
    assert!(
        copy.exists(),
        "member 4 caught up without installing a snapshot: {:?}",
        nodes[&4].status().raft
    );
    for n in nodes.values() {
        n.shutdown().await;
    }

    // Member 4 as a crash right after the install left it.
    let mut nodes = BTreeMap::new();
    for id in [1, 2, 3] {
        nodes.insert(
            id,
            start(&hub, tmp.path(), id, &voters, Log::default()).await,
        );
    }
    let log = Log::default();
    let node = start(&hub, crashed.path(), 4, &voters, log.clone()).await;
    catches_up_and_takes_a_write(node, &log, last, &nodes).await;
}
