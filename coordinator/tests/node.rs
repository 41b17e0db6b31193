//! The node driver with real storage (temp dirs) and an in-process peer
//! channel: proposals resolve with the state machine's output wherever they
//! are made, reads wait for the apply, snapshots catch up a new member, and a
//! node restarted from its directory has everything it acknowledged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordinator::node::{BoxError, Committed, Inbound, Node, NodeConfig, PeerSender, StateMachine};
use coordinator::raft::{ConfChange, ConfState, Index, Message, NodeId, Role, SnapshotMeta};
use coordinator::storage::{Storage, StorageOptions};
use tokio::sync::mpsc;

/// Routes messages between in-process nodes.
#[derive(Default)]
struct Hub {
    routes: Mutex<BTreeMap<NodeId, mpsc::Sender<Inbound>>>,
}

struct HubSender {
    hub: Arc<Hub>,
    from: NodeId,
}

impl HubSender {
    fn route(&self, to: NodeId, inbound: Inbound) -> bool {
        let tx = self.hub.routes.lock().expect("routes").get(&to).cloned();
        tx.is_some_and(|tx| tx.try_send(inbound).is_ok())
    }
}

impl PeerSender for HubSender {
    fn send(&self, msg: Message) {
        let to = msg.to;
        if !self.route(to, Inbound::Message(msg)) {
            self.route(self.from, Inbound::Unreachable(to));
        }
    }

    fn send_snapshot(&self, msg: Message, data: Arc<Vec<u8>>) {
        let to = msg.to;
        let ok = self.route(
            to,
            Inbound::Snapshot {
                msg,
                data: data.as_ref().clone(),
            },
        );
        self.route(self.from, Inbound::SnapshotStatus { to, ok });
    }
}

/// A log of applied strings; the output of each apply is its position.
#[derive(Default, Clone)]
struct Log(Arc<Mutex<(Vec<String>, Index)>>);

impl StateMachine for Log {
    type Output = usize;

    fn applied_index(&self) -> Index {
        self.0.lock().expect("log").1
    }

    async fn apply(
        &mut self,
        entries: Vec<Committed>,
        last: Index,
    ) -> Result<Vec<usize>, BoxError> {
        let mut g = self.0.lock().expect("log");
        let mut out = Vec::new();
        for e in entries {
            g.0.push(String::from_utf8(e.data)?);
            out.push(g.0.len());
        }
        g.1 = last;
        Ok(out)
    }

    async fn snapshot(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(self.0.lock().expect("log").0.join("\n").into_bytes())
    }

    async fn restore(&mut self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), BoxError> {
        let text = String::from_utf8(data)?;
        let items = if text.is_empty() {
            Vec::new()
        } else {
            text.split('\n').map(String::from).collect()
        };
        *self.0.lock().expect("log") = (items, meta.index);
        Ok(())
    }
}

fn config(id: NodeId) -> NodeConfig {
    let mut c = NodeConfig::new(id);
    c.tick = Duration::from_millis(5);
    c.snapshot_every = 50;
    c.snapshot_keep = 5;
    c.raft.seed = id * 7919;
    c
}

async fn start(
    hub: &Arc<Hub>,
    dir: &std::path::Path,
    id: NodeId,
    voters: &[NodeId],
    sm: Log,
) -> Node<usize> {
    let (storage, rec) =
        Storage::open(dir.join(id.to_string()), StorageOptions::default()).expect("open");
    let init = rec.into_initial_state(ConfState::with_voters(voters.iter().copied()));
    let (tx, rx) = mpsc::channel(4096);
    hub.routes.lock().expect("routes").insert(id, tx);
    let peers = Arc::new(HubSender {
        hub: hub.clone(),
        from: id,
    });
    Node::start(config(id), init, storage, peers, rx, sm)
        .await
        .expect("start")
}

async fn leader_of(nodes: &BTreeMap<NodeId, Node<usize>>) -> NodeId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((&id, _)) = nodes
            .iter()
            .find(|(_, n)| n.status().raft.role == Role::Leader)
        {
            return id;
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_reads_snapshots_membership_and_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = Arc::new(Hub::default());
    let mut logs = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        let log = Log::default();
        logs.insert(id, log.clone());
        nodes.insert(id, start(&hub, tmp.path(), id, &[1, 2, 3], log).await);
    }
    let leader = leader_of(&nodes).await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");

    // Proposals resolve with the state machine's output, on leader and follower.
    let a = nodes[&leader]
        .propose(b"a".to_vec())
        .await
        .expect("propose on leader");
    assert_eq!(a.output, 1);
    let b = nodes[&follower]
        .propose(b"b".to_vec())
        .await
        .expect("propose on follower");
    assert_eq!(b.output, 2);
    assert!(b.index > a.index);

    // A linearizable read on a follower sees both writes once it returns.
    let read_at = nodes[&follower].read_index().await.expect("read index");
    assert!(read_at >= b.index);
    assert_eq!(logs[&follower].0.lock().expect("log").0, vec!["a", "b"]);

    // Enough writes for several snapshots, from all nodes at once.
    let mut tasks = Vec::new();
    for i in 0..120 {
        let n = nodes[&(i % 3 + 1)].clone();
        tasks.push(tokio::spawn(async move {
            n.propose(format!("x{i}").into_bytes()).await
        }));
    }
    for t in tasks {
        t.await.expect("join").expect("propose");
    }
    let mut watch = nodes[&leader].watch_status();
    let snapshotted = watch.wait_for(|s| s.raft.snapshot_index > 0);
    tokio::time::timeout(Duration::from_secs(10), snapshotted)
        .await
        .expect("the leader takes a snapshot after 50 entries")
        .expect("node running");
    let st = nodes[&leader].status();
    assert!(
        st.syncs > 0 && st.entries_persisted >= st.syncs,
        "group commit counters"
    );

    // A new member added as a learner catches up (by snapshot), then votes.
    let log4 = Log::default();
    let n4 = start(&hub, tmp.path(), 4, &[], log4.clone()).await;
    nodes[&leader]
        .change_membership(ConfChange::AddLearner(4))
        .await
        .expect("add learner");
    let top = nodes[&leader]
        .propose(b"after-4".to_vec())
        .await
        .expect("propose")
        .index;
    n4.wait_applied(top, Duration::from_secs(10))
        .await
        .expect("learner catches up");
    assert_eq!(
        log4.0.lock().expect("log").0,
        logs[&leader].0.lock().expect("log").0
    );
    nodes[&leader]
        .change_membership(ConfChange::AddVoter(4))
        .await
        .expect("promote");
    nodes.insert(4, n4);

    // Leadership transfer to the new voter.
    nodes[&leader].transfer_leader(4).await.expect("transfer");
    assert_eq!(leader_of(&nodes).await, 4);

    // A follower stopped and restarted from its directory keeps everything.
    let before = logs[&follower].0.lock().expect("log").0.clone();
    let n = nodes.remove(&follower).expect("node");
    n.shutdown().await;
    let fresh = Log::default();
    let restarted = start(&hub, tmp.path(), follower, &[1, 2, 3], fresh.clone()).await;
    let more = nodes[&4]
        .propose(b"last".to_vec())
        .await
        .expect("propose")
        .index;
    restarted
        .wait_applied(more, Duration::from_secs(10))
        .await
        .expect("restarted node catches up");
    let after = fresh.0.lock().expect("log").0.clone();
    assert_eq!(&after[..before.len()], &before[..]);
    assert_eq!(after.last().map(String::as_str), Some("last"));
    for n in nodes.values() {
        n.shutdown().await;
    }
    restarted.shutdown().await;
}
