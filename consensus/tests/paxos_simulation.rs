//! Deterministic simulation of the Paxos engines (`consensus::paxos`), both
//! modes, run through the in-memory driver (`consensus::memory`).
//!
//! Every run is one seed. The seed picks the mode, the group (1–7 nodes), the
//! fault mix, and drives a [`SplitMix64`] from which every later choice is
//! drawn. Time is virtual; nothing sleeps or reads a clock, so a seed always
//! replays the same run.
//!
//! * The **fault phase**: messages are lost, duplicated, delayed and
//!   reordered; symmetric and one-way partitions come and go; nodes crash —
//!   also in the middle of a `Ready` cycle, after its `messages` left and
//!   before its entries and hard state were persisted — and restart from what
//!   they made durable; clients propose at random nodes; nodes snapshot and
//!   compact at random times. After **every** step the [`Checker`] verifies:
//!   at most one value is chosen per slot, computed from the acceptors'
//!   durable acceptances (a majority accepted the same ballot and value) and
//!   from what learners applied, and a chosen value never changes; promises
//!   and accepted ballots never go backwards, in memory and in the durable
//!   state, and no durable accepted value is forgotten; learners apply the
//!   same values in slot order; a durable chosen prefix is never lost.
//! * The **liveness phase**: the network heals, crashed nodes restart and
//!   faults stop. Within [`LIVENESS_TICKS`] ticks a leader must emerge
//!   (multi mode) and every value proposed after healing must be applied by
//!   every node.
//!
//! Environment: `SIM_SEEDS` (how many seeds per mode, default
//! [`DEFAULT_SEEDS`]), `SIM_SEED_START` (first seed, default 0), `SIM_SEED`
//! (run exactly this seed, in both modes, and print its trace):
//! `SIM_SEED=<n> cargo test -p consensus --test paxos_simulation -- --nocapture`.
//! Large ranges: `SIM_SEEDS=100000 cargo test --release -p consensus --test paxos_simulation`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

use consensus::engine::EngineMessage;
use consensus::memory::{Envelope, MemNode, MemStorage};
use consensus::paxos::{Ballot, Config, Message, Mode, MultiPaxos};
use consensus::raft::SplitMix64;
use consensus::types::{EntryPayload, Index, NodeId, Role};

/// Seeds per mode when `SIM_SEEDS` is not set: the debug-build CI run stays
/// well under a minute.
const DEFAULT_SEEDS: u64 = 300;
/// Virtual time units per tick; message delays are drawn in these units.
const TICK: u64 = 10;
/// Ticks of the fault phase.
const FAULT_TICKS: u64 = 120;
/// The liveness bound, in ticks after healing.
const LIVENESS_TICKS: u64 = 600;
/// Values proposed after healing.
const LIVENESS_VALUES: usize = 3;
/// Trace lines kept for a failure report.
const TRACE_LINES: usize = 300;
/// Seeds that once failed, run first every time: 52 (basic: seven proposers
/// dueling past the liveness bound before proposers backed off; later changes
/// moved its run, it stays as a busy liveness case), 2047 (multi: a new leader behind its
/// acceptors waited forever for acceptances of slots they knew chosen), 15230
/// (multi: the liveness phase proposed before a node cut off until the heal
/// took over, losing the value in flight), 2452 (basic: a proposer that
/// learned the slot of its value only through a snapshot proposed it again,
/// and it was chosen twice), 11265 (basic: a promise reporting a learned
/// value under a ballot above the prepare's was refused as malformed).
const REGRESSION_SEEDS: &[u64] = &[52, 2047, 15230, 2452, 11265];

struct Rng(SplitMix64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.range(0, n)
    }
    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The fault mix of one run.
#[derive(Debug)]
struct Faults {
    loss: u64,
    dup: u64,
    max_delay: u64,
    crash: u64,
    crash_mid_ready: u64,
    partition: u64,
    propose: u64,
    compact: u64,
}

/// The safety checker (see the module documentation).
#[derive(Default)]
struct Checker {
    quorum: usize,
    /// Durable acceptances seen: for `(slot, ballot)`, each acceptor's value.
    accepts: HashMap<(Index, Ballot), BTreeMap<NodeId, EntryPayload>>,
    /// Values chosen, computed from the acceptors.
    chosen: BTreeMap<Index, EntryPayload>,
    /// Values learners applied (committed entries).
    learned: BTreeMap<Index, EntryPayload>,
    /// Basic mode: client values applied, with their slot, each at most once
    /// (the network duplicates forwarded proposals in multi mode, so a value
    /// may be chosen twice there).
    unique_values: bool,
    applied_values: HashMap<Vec<u8>, Index>,
    durable_promise: BTreeMap<NodeId, Ballot>,
    durable_commit: BTreeMap<NodeId, Index>,
    durable_ballots: BTreeMap<NodeId, BTreeMap<Index, Ballot>>,
    memory_promise: BTreeMap<NodeId, Ballot>,
    memory_ballots: BTreeMap<NodeId, BTreeMap<Index, Ballot>>,
    applied_upto: BTreeMap<NodeId, Index>,
}

impl Checker {
    fn chosen_value(&mut self, slot: Index, v: &EntryPayload, why: &str) -> Result<(), String> {
        if let Some(prev) = self.chosen.get(&slot) {
            if prev != v {
                return Err(format!(
                    "two values chosen at slot {slot}: {prev:?} and {v:?} ({why})"
                ));
            }
        } else {
            self.chosen.insert(slot, v.clone());
        }
        if let Some(l) = self.learned.get(&slot)
            && l != v
        {
            return Err(format!(
                "slot {slot}: learners applied {l:?} but {v:?} is chosen ({why})"
            ));
        }
        Ok(())
    }

    fn on_restart(&mut self, id: NodeId, node: &MemNode<MultiPaxos>) -> Result<(), String> {
        let p = node.engine().promised();
        let durable = self.durable_promise.get(&id).copied().unwrap_or(0);
        if p < durable {
            return Err(format!(
                "node {id} restarted with promise {p} below its durable {durable}"
            ));
        }
        self.memory_promise.insert(id, p);
        self.memory_ballots.remove(&id);
        self.applied_upto.insert(id, node.engine().applied_index());
        Ok(())
    }

    /// After a node made a ready batch durable.
    fn on_persist(
        &mut self,
        id: NodeId,
        rd: &consensus::ready::Ready<Message>,
        st: &MemStorage,
    ) -> Result<(), String> {
        let hs = st.hard_state;
        let dp = self.durable_promise.entry(id).or_default();
        if hs.term < *dp {
            return Err(format!(
                "node {id}: durable promise went back from {dp} to {}",
                hs.term
            ));
        }
        *dp = hs.term;
        let dc = self.durable_commit.entry(id).or_default();
        if hs.commit < *dc {
            return Err(format!(
                "node {id}: durable chosen prefix went back from {dc} to {}",
                hs.commit
            ));
        }
        *dc = hs.commit;
        let ballots = self.durable_ballots.entry(id).or_default();
        if let Some(meta) = &rd.snapshot {
            ballots.retain(|&s, _| s > meta.index);
        }
        let snap = st.snapshot.index;
        ballots.retain(|&s, _| s > snap);
        // No durable acceptance goes backwards or is forgotten.
        let stored: BTreeMap<Index, Ballot> =
            st.entries.iter().map(|e| (e.index, e.term)).collect();
        for (&s, &b) in ballots.iter() {
            let now = stored.get(&s).copied().unwrap_or(0);
            if now < b {
                return Err(format!(
                    "node {id}: durable ballot at slot {s} went back from {b} to {now}"
                ));
            }
        }
        let mut newly = Vec::new();
        for e in st.entries.iter().filter(|e| e.term > 0 && e.index > snap) {
            if ballots.insert(e.index, e.term) != Some(e.term)
                || rd.entries.iter().any(|r| r.index == e.index)
            {
                newly.push(e.clone());
            }
        }
        for e in newly {
            let by = self.accepts.entry((e.index, e.term)).or_default();
            by.insert(id, e.payload.clone());
            let same = by.values().filter(|v| **v == e.payload).count();
            if same >= self.quorum {
                self.chosen_value(e.index, &e.payload, "a majority accepted it")?;
            }
        }
        // The durable chosen prefix holds the chosen values.
        if hs.commit > snap {
            let last = st.entries.last().map_or(snap, |e| e.index);
            if last < hs.commit {
                return Err(format!(
                    "node {id}: durable chosen prefix {} beyond its durable log {last}",
                    hs.commit
                ));
            }
            for e in st.entries.iter().filter(|e| e.index <= hs.commit) {
                if e.term == 0 {
                    return Err(format!(
                        "node {id}: chosen slot {} is a placeholder",
                        e.index
                    ));
                }
                if let Some(l) = self.learned.get(&e.index)
                    && *l != e.payload
                {
                    return Err(format!(
                        "node {id}: durable chosen slot {} holds {:?}, learners applied {l:?}",
                        e.index, e.payload
                    ));
                }
            }
        }
        Ok(())
    }

    fn on_apply(
        &mut self,
        id: NodeId,
        rd: &consensus::ready::Ready<Message>,
    ) -> Result<(), String> {
        let upto = self.applied_upto.entry(id).or_default();
        if let Some(meta) = &rd.snapshot {
            *upto = meta.index;
        }
        for e in &rd.committed_entries {
            if e.index != *upto + 1 {
                return Err(format!(
                    "node {id} applied slot {} after {}",
                    e.index, *upto
                ));
            }
            *upto = e.index;
            match self.learned.get(&e.index) {
                Some(l) if *l != e.payload => {
                    return Err(format!(
                        "node {id} applied {:?} at slot {}, another learner {l:?}",
                        e.payload, e.index
                    ));
                }
                Some(_) => {}
                None => {
                    self.learned.insert(e.index, e.payload.clone());
                    if let EntryPayload::Normal(d) = &e.payload
                        && self.unique_values
                        && let Some(prev) = self.applied_values.insert(d.to_vec(), e.index)
                    {
                        return Err(format!(
                            "value {:?} chosen twice, at slots {prev} and {}",
                            String::from_utf8_lossy(d),
                            e.index
                        ));
                    }
                }
            }
            if let Some(c) = self.chosen.get(&e.index)
                && *c != e.payload
            {
                return Err(format!(
                    "node {id} applied {:?} at slot {}, but {c:?} is chosen",
                    e.payload, e.index
                ));
            }
        }
        Ok(())
    }

    /// After every step: the in-memory promise and accepted ballots of the
    /// node never go backwards.
    fn on_memory(&mut self, id: NodeId, p: &MultiPaxos) -> Result<(), String> {
        let mp = self.memory_promise.entry(id).or_default();
        if p.promised() < *mp {
            return Err(format!(
                "node {id}: promise went back from {mp} to {}",
                p.promised()
            ));
        }
        *mp = p.promised();
        let ballots = self.memory_ballots.entry(id).or_default();
        let snap = p.snapshot_meta().index;
        ballots.retain(|&s, _| s > snap);
        for (&s, b) in ballots.iter_mut() {
            let now = p.accepted(s).map_or(0, |(b, _)| b);
            if now < *b {
                return Err(format!(
                    "node {id}: ballot at slot {s} went back from {b} to {now}"
                ));
            }
            *b = now;
        }
        for s in p.commit_index().max(snap) + 1..=p.last_index() {
            if let Some((b, _)) = p.accepted(s) {
                ballots.insert(s, b);
            }
        }
        Ok(())
    }
}

struct Sim {
    seed: u64,
    rng: Rng,
    mode: Mode,
    ids: Vec<NodeId>,
    faults: Faults,
    nodes: BTreeMap<NodeId, MemNode<MultiPaxos>>,
    crashed: BTreeMap<NodeId, (MemStorage, u64)>,
    incarnation: BTreeMap<NodeId, u64>,
    offsets: BTreeMap<NodeId, u64>,
    queue: BTreeMap<u64, Vec<Envelope<Message>>>,
    cut: BTreeSet<(NodeId, NodeId)>,
    now: u64,
    next_value: u64,
    checker: Checker,
    trace: VecDeque<String>,
    verbose: bool,
    healed: bool,
}

impl Sim {
    fn new(seed: u64, mode: Mode, verbose: bool) -> Sim {
        let mut rng = Rng(SplitMix64::new(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (mode as u64 + 1),
        ));
        let n = 1 + rng.below(7);
        let ids: Vec<NodeId> = (1..=n).collect();
        let faults = Faults {
            loss: rng.below(200),
            dup: rng.below(100),
            max_delay: 1 + rng.below(3 * TICK),
            crash: rng.below(4),
            crash_mid_ready: rng.below(30),
            partition: rng.below(8),
            propose: 20 + rng.below(200),
            compact: rng.below(40),
        };
        let mut sim = Sim {
            seed,
            rng,
            mode,
            faults,
            nodes: BTreeMap::new(),
            crashed: BTreeMap::new(),
            incarnation: BTreeMap::new(),
            offsets: BTreeMap::new(),
            queue: BTreeMap::new(),
            cut: BTreeSet::new(),
            now: 0,
            next_value: 0,
            checker: Checker {
                quorum: ids.len() / 2 + 1,
                unique_values: mode == Mode::Basic,
                ..Checker::default()
            },
            trace: VecDeque::new(),
            verbose,
            healed: false,
            ids,
        };
        for &id in &sim.ids.clone() {
            let off = sim.rng.below(TICK);
            sim.offsets.insert(id, off);
            let node = sim.start(id, MemStorage::bootstrap(&sim.ids));
            sim.nodes.insert(id, node);
        }
        let line = format!(
            "seed {seed} {mode:?}: {} nodes, {:?}",
            sim.ids.len(),
            sim.faults
        );
        sim.log(line);
        sim
    }

    fn log(&mut self, line: String) {
        if self.verbose {
            println!("[{}] {line}", self.now);
        }
        self.trace.push_back(format!("[{}] {line}", self.now));
        if self.trace.len() > TRACE_LINES {
            self.trace.pop_front();
        }
    }

    fn start(&mut self, id: NodeId, st: MemStorage) -> MemNode<MultiPaxos> {
        let inc = self.incarnation.entry(id).or_default();
        *inc += 1;
        let cfg = Config {
            mode: self.mode,
            seed: self
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(id * 1000 + *inc),
            max_size_per_msg: 64,
            max_inflight_msgs: 4,
            ..Config::new(id)
        };
        MemNode::start(st, |init| MultiPaxos::new(cfg, init)).expect("config")
    }

    fn send(&mut self, envs: Vec<Envelope<Message>>) {
        for env in envs {
            let (from, to) = (env.msg.from(), env.msg.to());
            if !self.healed && (self.cut.contains(&(from, to)) || self.rng.chance(self.faults.loss))
            {
                continue;
            }
            let copies = if !self.healed && self.rng.chance(self.faults.dup) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let delay = 1 + self.rng.below(self.faults.max_delay);
                self.queue
                    .entry(self.now + delay)
                    .or_default()
                    .push(env.clone());
            }
        }
    }

    /// Runs a node's ready cycles, checking after each.
    fn drive(&mut self, id: NodeId) -> Result<(), String> {
        loop {
            let Some(node) = self.nodes.get_mut(&id) else {
                return Ok(());
            };
            if !node.engine().has_ready() {
                break;
            }
            let mut rd = node.engine_mut().ready();
            let msgs = node.envelopes(std::mem::take(&mut rd.messages));
            self.send(msgs);
            if !self.healed && self.rng.chance(self.faults.crash_mid_ready) {
                self.crash(id, "before persisting its ready");
                return Ok(());
            }
            let node = self.nodes.get_mut(&id).expect("node");
            node.persist(&rd);
            self.checker.on_persist(id, &rd, node.storage())?;
            let persisted = node.envelopes(std::mem::take(&mut rd.persisted_messages));
            node.apply(&rd);
            self.checker.on_apply(id, &rd)?;
            node.engine_mut().advance();
            self.checker.on_memory(id, node.engine())?;
            self.send(persisted);
        }
        let node = &self.nodes[&id];
        self.checker.on_memory(id, node.engine())
    }

    fn crash(&mut self, id: NodeId, why: &str) {
        if let Some(node) = self.nodes.remove(&id) {
            let back = self.now + TICK * (1 + self.rng.below(30));
            self.crashed.insert(id, (node.crash(), back));
            self.log(format!("crash {id} {why}"));
        }
    }

    fn restart(&mut self, id: NodeId) -> Result<(), String> {
        if let Some((st, _)) = self.crashed.remove(&id) {
            let node = self.start(id, st);
            self.checker.on_restart(id, &node)?;
            self.nodes.insert(id, node);
            self.log(format!("restart {id}"));
            self.drive(id)?;
        }
        Ok(())
    }

    fn propose(&mut self, id: NodeId) -> Result<Option<Vec<u8>>, String> {
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(None);
        };
        let v = format!("v{}", self.next_value).into_bytes();
        let r = node.engine_mut().propose(v.clone());
        self.log(format!(
            "propose {} at {id}: {r:?}",
            String::from_utf8_lossy(&v)
        ));
        if r.is_ok() {
            self.next_value += 1;
        }
        self.drive(id)?;
        Ok(r.is_ok().then_some(v))
    }

    fn chaos(&mut self) -> Result<(), String> {
        let f = &self.faults;
        let (crash, partition, propose, compact) = (f.crash, f.partition, f.propose, f.compact);
        let id = self.ids[self.rng.below(self.ids.len() as u64) as usize];
        if self.rng.chance(propose) {
            self.propose(id)?;
        }
        if self.rng.chance(crash) {
            self.crash(id, "at random");
        }
        if self.rng.chance(partition) {
            self.cut.clear();
            match self.rng.below(3) {
                0 => self.log("heal partitions".into()),
                1 => {
                    let side: Vec<NodeId> = self
                        .ids
                        .iter()
                        .copied()
                        .filter(|_| self.rng.chance(500))
                        .collect();
                    for &a in &side {
                        for &b in &self.ids {
                            if !side.contains(&b) {
                                self.cut.insert((a, b));
                                self.cut.insert((b, a));
                            }
                        }
                    }
                    self.log(format!("partition {side:?} from the rest"));
                }
                _ => {
                    for _ in 0..1 + self.rng.below(4) {
                        let a = self.ids[self.rng.below(self.ids.len() as u64) as usize];
                        let b = self.ids[self.rng.below(self.ids.len() as u64) as usize];
                        if a != b {
                            self.cut.insert((a, b));
                        }
                    }
                    let cut = self.cut.clone();
                    self.log(format!("one-way cuts {cut:?}"));
                }
            }
        }
        if self.rng.chance(compact)
            && let Some(node) = self.nodes.get_mut(&id)
        {
            let r = node.snapshot_and_compact();
            self.log(format!("compact {id}: {r:?}"));
        }
        let due: Vec<NodeId> = self
            .crashed
            .iter()
            .filter(|(_, (_, at))| *at <= self.now)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.restart(id)?;
        }
        Ok(())
    }

    /// One unit of virtual time: deliveries, then ticks, then chaos.
    fn step_time(&mut self) -> Result<(), String> {
        if let Some(mut envs) = self.queue.remove(&self.now) {
            // Reorder messages arriving at the same time.
            for i in (1..envs.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                envs.swap(i, j);
            }
            for env in envs {
                let to = env.msg.to();
                let Some(node) = self.nodes.get_mut(&to) else {
                    continue;
                };
                if self.verbose {
                    println!("[{}] deliver {:?}", self.now, env.msg);
                }
                let r = node.step(env);
                if let Err(e) = r {
                    return Err(format!("node {to} refused a member's message: {e}"));
                }
                self.drive(to)?;
            }
        }
        for id in self.ids.clone() {
            if (self.now + self.offsets[&id]).is_multiple_of(TICK)
                && let Some(node) = self.nodes.get_mut(&id)
            {
                node.engine_mut().tick();
                self.drive(id)?;
            }
        }
        if !self.healed && self.now.is_multiple_of(TICK / 2) {
            self.chaos()?;
        }
        self.now += 1;
        Ok(())
    }

    fn applied_everywhere(&self, v: &[u8]) -> bool {
        self.nodes
            .values()
            .all(|n| n.applied().iter().any(|(_, d)| d == v))
    }

    /// The leader all nodes agree on, holding every node's promise, with
    /// the same chosen prefix everywhere.
    fn converged_leader(&self) -> Option<NodeId> {
        let l = self
            .nodes
            .values()
            .find(|n| n.engine().role() == Role::Leader)?
            .engine();
        let b = l.ballot();
        let all = self.nodes.values().all(|n| {
            let e = n.engine();
            e.leader() == Some(l.id()) && e.promised() == b && e.commit_index() == l.commit_index()
        });
        all.then_some(l.id())
    }

    fn run(&mut self) -> Result<(), String> {
        while self.now < FAULT_TICKS * TICK {
            self.step_time()?;
        }
        self.healed = true;
        self.cut.clear();
        self.log("heal: faults stop".into());
        for id in self.crashed.keys().copied().collect::<Vec<_>>() {
            self.restart(id)?;
        }
        let deadline = self.now + LIVENESS_TICKS * TICK;
        let mut values: Vec<Vec<u8>> = Vec::new();
        // Multi mode: the leader all agree on, and since when. Values are
        // proposed once it has held for two of the longest election
        // timeouts, so no node that missed the leader before healing is
        // still about to take over (a takeover may lose values in flight).
        let mut stable: Option<(NodeId, u64)> = None;
        let settle = 2 * 2 * u64::from(Config::new(1).election_tick) * TICK;
        while self.now < deadline {
            self.step_time()?;
            if self.mode == Mode::Multi {
                let l = self.converged_leader();
                stable = match (l, stable) {
                    (Some(l), Some((s, since))) if s == l => Some((s, since)),
                    (Some(l), _) => Some((l, self.now)),
                    (None, _) => None,
                };
            }
            if values.len() < LIVENESS_VALUES && self.now.is_multiple_of(TICK) {
                let settled = stable
                    .filter(|&(_, since)| self.now >= since + settle)
                    .map(|(l, _)| l);
                let at = match self.mode {
                    Mode::Multi => settled.map(|l| {
                        // At the leader or, forwarded, at a follower.
                        if self.rng.chance(500) {
                            l
                        } else {
                            self.ids[self.rng.below(self.ids.len() as u64) as usize]
                        }
                    }),
                    Mode::Basic => Some(self.ids[self.rng.below(self.ids.len() as u64) as usize]),
                };
                if let Some(at) = at
                    && let Some(v) = self.propose(at)?
                {
                    values.push(v);
                }
            }
            if values.len() == LIVENESS_VALUES && values.iter().all(|v| self.applied_everywhere(v))
            {
                return Ok(());
            }
        }
        let missing: Vec<String> = values
            .iter()
            .filter(|v| !self.applied_everywhere(v))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let state: Vec<String> = self
            .nodes
            .values()
            .map(|n| {
                let e = n.engine();
                format!(
                    "{}: {:?} ballot {} promised {} leader {:?} commit {} last {}",
                    e.id(),
                    e.role(),
                    e.ballot(),
                    e.promised(),
                    e.leader(),
                    e.commit_index(),
                    e.last_index()
                )
            })
            .collect();
        Err(format!(
            "liveness: after {LIVENESS_TICKS} ticks healed, proposed {} of {LIVENESS_VALUES}, not applied everywhere: {missing:?}; {state:?}",
            values.len()
        ))
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs one seed; on success, how many slots were chosen and how many
/// crashes happened.
fn run_seed(seed: u64, mode: Mode, verbose: bool) -> Result<(usize, usize), String> {
    let mut sim = Sim::new(seed, mode, verbose);
    let r = panic::catch_unwind(AssertUnwindSafe(|| sim.run()))
        .unwrap_or_else(|p| Err(format!("panic: {p:?}")));
    let crashes = sim.incarnation.values().map(|&i| i as usize - 1).sum();
    r.map(|()| (sim.checker.learned.len(), crashes)).map_err(|e| {
        let trace: Vec<String> = sim.trace.iter().cloned().collect();
        format!(
            "seed {seed} ({mode:?}) failed: {e}\nreplay: SIM_SEED={seed} cargo test -p consensus --test paxos_simulation -- --nocapture\nlast trace lines:\n{}",
            trace.join("\n")
        )
    })
}

#[test]
fn paxos_simulation() {
    let modes = [Mode::Multi, Mode::Basic];
    if let Some(seed) = env_u64("SIM_SEED") {
        for mode in modes {
            if let Err(e) = run_seed(seed, mode, true) {
                panic!("{e}");
            }
        }
        return;
    }
    let seeds = env_u64("SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let first = env_u64("SIM_SEED_START").unwrap_or(0);
    let started = Instant::now();
    let (mut slots, mut crashes) = (0, 0);
    for mode in modes {
        for &seed in REGRESSION_SEEDS {
            if let Err(e) = run_seed(seed, mode, false) {
                panic!("regression {e}");
            }
        }
        for seed in first..first + seeds {
            match run_seed(seed, mode, false) {
                Ok((s, c)) => {
                    slots += s;
                    crashes += c;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds per mode from {first}: {:.0} seeds/s, {slots} slots chosen, {crashes} crashes",
        2.0 * seeds as f64 / secs
    );
    assert!(slots as u64 >= seeds * 2 * LIVENESS_VALUES as u64);
}
