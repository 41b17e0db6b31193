//! Deterministic simulation of the Raft core (`coordinator::raft`) run through
//! the in-memory driver (`consensus::memory`).
//!
//! Every run is one seed. The seed picks the cluster (1–7 nodes), the core's
//! configuration and the fault mix, and drives a [`SplitMix64`] from which
//! every later choice is drawn. Nothing reads a clock, sleeps or uses thread
//! randomness: time is virtual, so a seed always replays the same run.
//!
//! A run has two phases:
//!
//! * The **fault phase**. A simulated network with virtual time loses,
//!   duplicates, delays and reorders messages, and is cut by symmetric and
//!   one-way partitions. Nodes crash — also in the middle of a `Ready` cycle,
//!   after its `messages` left but before its entries and hard state were
//!   persisted — and restart from what they made durable. Clients propose at
//!   random nodes (followers forward), membership changes add brand-new nodes
//!   (which catch up from the log or a snapshot), promote, demote and remove
//!   members (a removed node is shut down once nobody needs its vote, and
//!   comes back from its storage if it is added again), leadership is
//!   transferred, and nodes snapshot and compact at random times. After
//!   **every** step the checker verifies the safety properties of the Raft
//!   paper (see [`Checker`]).
//! * The **liveness phase**. The network heals, crashed nodes restart and all
//!   faults stop; within [`LIVENESS_ELECTION_TIMEOUTS`] election timeouts a
//!   leader must emerge and every proposal made after healing must be
//!   committed and applied by every member of the final configuration.
//!
//! Environment:
//!
//! * `SIM_SEEDS` — how many seeds to run (default [`DEFAULT_SEEDS`]);
//! * `SIM_SEED_START` — the first seed (default 0);
//! * `SIM_SEED` — run exactly this seed and print its whole trace:
//!   `SIM_SEED=<n> cargo test -p coordinator --test simulation -- --nocapture`.
//!
//! The file is organised by concern: knobs and randomness, the trace, the
//! network model, the node harness (the phased `Ready` cycle and crashes), the
//! invariant checker, the scenario generator, and the test itself.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::{self, Write as _};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use consensus::memory::{Envelope, MemNode, MemStorage};
use coordinator::raft::{
    ConfChange, ConfState, Config, Entry, EntryPayload, HardState, Index, Message, MessageKind,
    NodeId, Raft, ReadOnlyOption, Role, SplitMix64, Term,
};

// ===========================================================================
// Knobs and randomness
// ===========================================================================

/// Seeds run when `SIM_SEEDS` is not set. Sized so the debug-build CI run
/// (`cargo test --workspace`) covers at least 500 seeds in well under a minute.
const DEFAULT_SEEDS: u64 = 500;
/// Virtual time units in one tick. Message delays are drawn in these units,
/// so deliveries interleave with the ticks of the different nodes.
const TICK: u64 = 100;
/// How often the scenario generator gets a chance to act.
const CHAOS_EVERY: u64 = TICK / 2;
/// Trace lines kept for a failure report.
const TRACE_LINES: usize = 200;
/// The liveness bound: after healing, a converged cluster must be reached
/// within this many election timeouts (`election_tick` ticks each).
const LIVENESS_ELECTION_TIMEOUTS: u64 = 200;
/// Membership changes never grow the group beyond this many voters...
const MAX_VOTERS: usize = 7;
/// ... or this many learners.
const MAX_LEARNERS: usize = 2;
/// How many brand-new nodes a run may create for membership changes.
const MAX_NEW_NODES: u64 = 6;
/// A `Ready` cycle that keeps producing work this many times is a livelock.
const MAX_READY_ROUNDS: usize = 10_000;

/// The simulation's only source of randomness.
struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed))
    }

    /// A value in `[0, n)`; 0 when `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.0.next_u64() % n }
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.0.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }
}

/// Derives an independent seed from two numbers.
fn mix(a: u64, b: u64) -> u64 {
    SplitMix64::new(a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// Everything the seed decides up front about a run.
#[derive(Clone, Debug)]
struct Params {
    nodes: u64,
    pre_vote: bool,
    check_quorum: bool,
    election_tick: u32,
    heartbeat_tick: u32,
    max_size_per_msg: u64,
    max_inflight_msgs: usize,
    max_uncommitted_size: u64,
    fault_ticks: u64,
    /// Per generator turn (every [`CHAOS_EVERY`]).
    p_propose: f64,
    p_conf_change: f64,
    p_transfer: f64,
    p_crash: f64,
    p_partition: f64,
    p_snapshot: f64,
    /// Per `Ready` cycle: a crash after its messages left, before it was
    /// persisted (and, at a quarter of that rate, at the later phases).
    p_crash_in_ready: f64,
    /// Per input: the node handles its `Ready` later instead of at once, so
    /// several inputs batch into one `Ready`.
    p_defer_ready: f64,
    max_downtime_ticks: u64,
    max_pad: u64,
    net: NetConfig,
}

impl Params {
    fn draw(rng: &mut Rng) -> Self {
        let election_tick = 6 + rng.below(10) as u32;
        let heartbeat_tick = 1 + rng.below(u64::from(election_tick / 4)) as u32;
        Params {
            nodes: 1 + rng.below(7),
            pre_vote: rng.chance(0.5),
            check_quorum: rng.chance(0.5),
            election_tick,
            heartbeat_tick,
            max_size_per_msg: if rng.chance(0.35) {
                rng.below(200)
            } else {
                1 << 20
            },
            max_inflight_msgs: if rng.chance(0.35) {
                1 + rng.below(4) as usize
            } else {
                256
            },
            max_uncommitted_size: if rng.chance(0.15) {
                200 + rng.below(2000)
            } else {
                0
            },
            fault_ticks: 100 + rng.below(300),
            p_propose: rng.pick(&[0.05, 0.2, 0.5]),
            p_conf_change: rng.pick(&[0.0, 0.01, 0.04]),
            p_transfer: rng.pick(&[0.0, 0.005, 0.02]),
            p_crash: rng.pick(&[0.0, 0.002, 0.01, 0.03]),
            p_partition: rng.pick(&[0.0, 0.005, 0.02]),
            p_snapshot: rng.pick(&[0.0, 0.01, 0.05]),
            p_crash_in_ready: rng.pick(&[0.0, 0.0005, 0.002, 0.005]),
            p_defer_ready: rng.pick(&[0.0, 0.2, 0.5]),
            max_downtime_ticks: rng.pick(&[5, 20, 60]),
            max_pad: rng.pick(&[0, 16, 64]),
            net: NetConfig::draw(rng),
        }
    }
}

// ===========================================================================
// Trace
// ===========================================================================

/// The run's trace: a bounded ring of the latest lines (cheap enough to keep
/// in every run), printed in full as it goes when replaying one seed.
struct Trace {
    verbose: bool,
    ring: VecDeque<String>,
}

impl Trace {
    fn new(verbose: bool) -> Self {
        Trace {
            verbose,
            ring: VecDeque::with_capacity(TRACE_LINES),
        }
    }

    fn line(&mut self, now: u64, args: fmt::Arguments<'_>) {
        let mut s = if self.ring.len() >= TRACE_LINES {
            self.ring.pop_front().unwrap_or_default()
        } else {
            String::new()
        };
        s.clear();
        let _ = write!(s, "{:>5}.{:02} ", now / TICK, now % TICK);
        let _ = s.write_fmt(args);
        if self.verbose {
            println!("{s}");
        }
        self.ring.push_back(s);
    }

    fn dump(&self) -> String {
        let mut out = String::new();
        for l in &self.ring {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

/// `trace!(trace, now, "format", args...)`: one trace line at virtual time `now`.
macro_rules! trace {
    ($trace:expr, $now:expr, $($arg:tt)*) => {
        $trace.line($now, format_args!($($arg)*))
    };
}

/// Shows a payload briefly: proposals are `p<n>`/`L<n>` padded with dots.
struct ShowPayload<'a>(&'a EntryPayload);

impl fmt::Display for ShowPayload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            EntryPayload::Empty => f.write_str("noop"),
            EntryPayload::Normal(d) => write!(f, "{}", ShowData(d)),
            EntryPayload::ConfChange(cc) => write!(f, "{cc:?}"),
        }
    }
}

struct ShowData<'a>(&'a [u8]);

impl fmt::Display for ShowData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.0.split(|b| *b == b'.').next().unwrap_or_default();
        write!(f, "\"{}\"", String::from_utf8_lossy(name))?;
        let pad = self.0.len() - name.len();
        if pad > 0 {
            write!(f, "+{pad}")?;
        }
        Ok(())
    }
}

struct ShowEntry<'a>(&'a Entry);

impl fmt::Display for ShowEntry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "({},{} {})",
            self.0.index,
            self.0.term,
            ShowPayload(&self.0.payload)
        )
    }
}

struct ShowMsg<'a>(&'a Message);

impl fmt::Display for ShowMsg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "n{}->n{} {} t{}", m.from, m.to, m.kind.name(), m.term)?;
        match &m.kind {
            MessageKind::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                write!(f, " prev={prev_index}/{prev_term} commit={commit} [")?;
                // At most the first two and the last entry.
                let n = entries.len();
                for (i, e) in entries.iter().enumerate() {
                    if n > 4 && i > 2 && i + 1 < n {
                        continue;
                    }
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    if n > 4 && i == 2 {
                        write!(f, "..{} more..", n - 3)?;
                    } else {
                        write!(f, "{}", ShowEntry(e))?;
                    }
                }
                f.write_str("]")
            }
            MessageKind::AppendResponse {
                index,
                reject,
                hint,
            } => {
                write!(f, " index={index}")?;
                if *reject {
                    write!(f, " REJECT hint={hint:?}")?;
                }
                Ok(())
            }
            MessageKind::Vote {
                last_index,
                last_term,
                transfer,
                ..
            } => {
                write!(f, " last={last_index}/{last_term}")?;
                if *transfer {
                    f.write_str(" transfer")?;
                }
                Ok(())
            }
            MessageKind::VoteResponse { granted, .. } => {
                f.write_str(if *granted { " granted" } else { " rejected" })
            }
            MessageKind::Heartbeat { commit, .. } => write!(f, " commit={commit}"),
            MessageKind::Snapshot { meta } => write!(
                f,
                " {}/{} voters={:?} learners={:?}",
                meta.index, meta.term, meta.conf_state.voters, meta.conf_state.learners
            ),
            MessageKind::Propose { entries } => {
                for e in entries {
                    write!(f, " {}", ShowPayload(&e.payload))?;
                }
                Ok(())
            }
            MessageKind::TransferLeader { to } => write!(f, " to=n{to}"),
            MessageKind::NotMember { commit } => write!(f, " commit={commit}"),
            MessageKind::ProposeConfChange { change, force } => {
                write!(f, " {change:?}")?;
                if *force {
                    f.write_str(" force")?;
                }
                Ok(())
            }
            MessageKind::ConfChangeRefused { change, reason } => {
                write!(f, " {change:?}: {reason}")
            }
            MessageKind::ReadIndexResponse { index, .. } => write!(f, " index={index}"),
            MessageKind::HeartbeatResponse { .. }
            | MessageKind::ReadIndex { .. }
            | MessageKind::TimeoutNow => Ok(()),
        }
    }
}

fn show_conf(c: &ConfState) -> String {
    let mut s = format!("voters {:?}", c.voters);
    if !c.learners.is_empty() {
        let _ = write!(s, " learners {:?}", c.learners);
    }
    s
}

// ===========================================================================
// Network model
// ===========================================================================

/// How the network treats messages in one run (the fault phase; the
/// liveness phase switches to [`NetConfig::calm`]).
#[derive(Clone, Debug)]
struct NetConfig {
    /// Probability that a message is lost.
    loss: f64,
    /// Probability that a message is delivered twice.
    dup: f64,
    /// Delays are drawn from `[1, max_delay]` virtual time units, so
    /// messages overtake each other (reordering).
    max_delay: u64,
    /// Probability that a message is held back much longer...
    slow: f64,
    /// ... by up to this much more.
    slow_delay: u64,
}

impl NetConfig {
    fn draw(rng: &mut Rng) -> Self {
        NetConfig {
            loss: rng.pick(&[0.0, 0.01, 0.05, 0.15, 0.3]),
            dup: rng.pick(&[0.0, 0.01, 0.05, 0.2]),
            max_delay: rng.pick(&[TICK / 10, TICK / 2, TICK, 3 * TICK]),
            slow: rng.pick(&[0.0, 0.02, 0.1]),
            slow_delay: rng.pick(&[2 * TICK, 10 * TICK]),
        }
    }

    /// No loss, no duplication, short delays.
    fn calm() -> Self {
        NetConfig {
            loss: 0.0,
            dup: 0.0,
            max_delay: TICK / 2,
            slow: 0.0,
            slow_delay: 0,
        }
    }
}

/// The links of the simulated network. Messages in flight live in the
/// simulation's event queue, each with its delivery time; whether a link is
/// cut is decided when the message arrives.
struct Network {
    cfg: NetConfig,
    /// Active partitions, each a set of cut directed links.
    partitions: BTreeMap<u64, Vec<(NodeId, NodeId)>>,
    /// How many active partitions cut each directed link.
    cut: BTreeMap<(NodeId, NodeId), u32>,
    next_partition: u64,
}

impl Network {
    fn new(cfg: NetConfig) -> Self {
        Network {
            cfg,
            partitions: BTreeMap::new(),
            cut: BTreeMap::new(),
            next_partition: 1,
        }
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.contains_key(&(from, to))
    }

    /// Cuts the given directed links until [`Network::heal`] with the
    /// returned id. Symmetric partitions list both directions.
    fn partition(&mut self, links: Vec<(NodeId, NodeId)>) -> u64 {
        for l in &links {
            *self.cut.entry(*l).or_insert(0) += 1;
        }
        let id = self.next_partition;
        self.next_partition += 1;
        self.partitions.insert(id, links);
        id
    }

    fn heal(&mut self, id: u64) -> bool {
        let Some(links) = self.partitions.remove(&id) else {
            return false;
        };
        for l in links {
            if let Some(n) = self.cut.get_mut(&l) {
                *n -= 1;
                if *n == 0 {
                    self.cut.remove(&l);
                }
            }
        }
        true
    }

    fn heal_all(&mut self) {
        self.partitions.clear();
        self.cut.clear();
    }

    /// The fate of one message sent now: the delays of the copies that will
    /// arrive (none if it is lost, two if it is duplicated).
    fn delays(&self, rng: &mut Rng) -> Vec<u64> {
        if rng.chance(self.cfg.loss) {
            return Vec::new();
        }
        let copies = if rng.chance(self.cfg.dup) { 2 } else { 1 };
        (0..copies)
            .map(|_| {
                let mut d = 1 + rng.below(self.cfg.max_delay);
                if rng.chance(self.cfg.slow) {
                    d += rng.below(self.cfg.slow_delay);
                }
                d
            })
            .collect()
    }
}

// ===========================================================================
// Node harness
// ===========================================================================

/// Something that happens at a point of virtual time.
enum Event {
    /// A node's clock ticks (`inc` guards against ticks of a crashed incarnation).
    Tick { id: NodeId, inc: u64 },
    /// A node handles the `Ready` it deferred.
    Ready { id: NodeId, inc: u64 },
    /// A message arrives (if its link is not cut and its recipient is up).
    Deliver { env: Envelope, from_inc: u64 },
    /// Transport feedback to the sender of a message.
    Report {
        to: NodeId,
        inc: u64,
        about: NodeId,
        report: Report,
    },
    /// A crashed node comes back from its storage.
    Restart(NodeId),
    /// A partition ends.
    Heal(u64),
    /// The scenario generator's turn.
    Chaos,
}

/// What the transport tells the sender of a message.
#[derive(Clone, Copy, Debug)]
enum Report {
    SnapshotDone,
    SnapshotFailed,
    Unreachable,
}

enum NodeState {
    Up(Box<MemNode>),
    Down(MemStorage),
}

/// One node of the simulation, up or crashed.
struct Slot {
    state: NodeState,
    /// Incarnation: bumped by every crash.
    inc: u64,
    /// A deferred [`Event::Ready`] is scheduled.
    ready_due: bool,
    /// Shut down after its removal: stays down unless added back.
    parked: bool,
}

fn up(slots: &BTreeMap<NodeId, Slot>, id: NodeId) -> Option<&MemNode> {
    match slots.get(&id).map(|s| &s.state) {
        Some(NodeState::Up(n)) => Some(n.as_ref()),
        _ => None,
    }
}

/// A proposal made after healing, which must end up applied everywhere.
struct LiveProposal {
    payload: Vec<u8>,
    last_try: Option<u64>,
}

/// Counters, summed over all seeds for the final report.
#[derive(Clone, Debug, Default)]
struct Stats {
    runs: u64,
    steps: u64,
    ticks: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    dropped_cut: u64,
    dropped_down: u64,
    crashes: u64,
    crashes_in_ready: u64,
    restarts: u64,
    partitions: u64,
    proposals: u64,
    conf_proposed: u64,
    conf_committed: u64,
    new_nodes: u64,
    new_members_final: u64,
    transfers: u64,
    compactions: u64,
    snapshots_delivered: u64,
    leaders: u64,
    max_cluster: u64,
    liveness_ticks_max: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.runs += o.runs;
        self.steps += o.steps;
        self.ticks += o.ticks;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.dropped_cut += o.dropped_cut;
        self.dropped_down += o.dropped_down;
        self.crashes += o.crashes;
        self.crashes_in_ready += o.crashes_in_ready;
        self.restarts += o.restarts;
        self.partitions += o.partitions;
        self.proposals += o.proposals;
        self.conf_proposed += o.conf_proposed;
        self.conf_committed += o.conf_committed;
        self.new_nodes += o.new_nodes;
        self.new_members_final += o.new_members_final;
        self.transfers += o.transfers;
        self.compactions += o.compactions;
        self.snapshots_delivered += o.snapshots_delivered;
        self.leaders += o.leaders;
        self.max_cluster = self.max_cluster.max(o.max_cluster);
        self.liveness_ticks_max = self.liveness_ticks_max.max(o.liveness_ticks_max);
    }
}

/// One simulation run.
struct Sim {
    seed: u64,
    p: Params,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    slots: BTreeMap<NodeId, Slot>,
    net: Network,
    checker: Checker,
    trace: Trace,
    /// Nodes whose state changed in the current step; checked after it.
    touched: Vec<NodeId>,
    liveness: bool,
    converged: bool,
    next_id: NodeId,
    last_id: NodeId,
    proposals: u64,
    live_props: Vec<LiveProposal>,
    /// The index of the latest committed change adding each node...
    added_at: BTreeMap<NodeId, Index>,
    /// ... and the nodes whose latest committed change removed them, with
    /// its index.
    out: BTreeMap<NodeId, Index>,
    /// Removed nodes to shut down (park) once nobody needs them, not before
    /// the given time.
    to_park: BTreeMap<NodeId, u64>,
    /// Run the O(n²·log) pairwise log-matching check after every step.
    full_checks: bool,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = Rng::new(seed);
        let p = Params::draw(&mut rng);
        let net = Network::new(p.net.clone());
        Sim {
            seed,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            slots: BTreeMap::new(),
            net,
            checker: Checker::default(),
            trace: Trace::new(verbose),
            touched: Vec::new(),
            liveness: false,
            converged: false,
            next_id: p.nodes + 1,
            last_id: p.nodes + MAX_NEW_NODES,
            proposals: 0,
            live_props: Vec::new(),
            added_at: BTreeMap::new(),
            out: BTreeMap::new(),
            to_park: BTreeMap::new(),
            full_checks: verbose,
            stats: Stats::default(),
            p,
        }
    }

    /// The configuration of node `id` in its incarnation `inc`: shared
    /// settings from the seed, a distinct random seed per node and incarnation.
    fn config(&self, id: NodeId, inc: u64) -> Config {
        Config {
            id,
            election_tick: self.p.election_tick,
            heartbeat_tick: self.p.heartbeat_tick,
            max_size_per_msg: self.p.max_size_per_msg,
            max_inflight_msgs: self.p.max_inflight_msgs,
            max_uncommitted_size: self.p.max_uncommitted_size,
            check_quorum: self.p.check_quorum,
            pre_vote: self.p.pre_vote,
            read_only: ReadOnlyOption::Safe,
            disable_proposal_forwarding: false,
            promote_max_lag: 1000,
            seed: mix(self.seed, (id << 32) | inc),
        }
    }

    fn schedule(&mut self, at: u64, ev: Event) {
        self.queue.insert((at, self.seq), ev);
        self.seq += 1;
    }

    fn node(&self, id: NodeId) -> Option<&MemNode> {
        up(&self.slots, id)
    }

    fn node_mut(&mut self, id: NodeId) -> Option<&mut MemNode> {
        match self.slots.get_mut(&id).map(|s| &mut s.state) {
            Some(NodeState::Up(n)) => Some(n.as_mut()),
            _ => None,
        }
    }

    fn up_ids(&self) -> Vec<NodeId> {
        self.slots
            .iter()
            .filter(|(_, s)| matches!(s.state, NodeState::Up(_)))
            .map(|(&id, _)| id)
            .collect()
    }

    fn random_up(&mut self) -> Option<NodeId> {
        let ids = self.up_ids();
        (!ids.is_empty()).then(|| self.rng.pick(&ids))
    }

    /// The whole run: set up, fault phase, heal, liveness phase.
    fn run(&mut self) -> Result<(), String> {
        self.setup();
        let fault_end = self.p.fault_ticks * TICK;
        while self.now < fault_end {
            self.step()?;
        }
        self.checker.check_all_pairs(&self.slots)?;
        self.heal_everything()?;
        let start = self.now;
        let bound = LIVENESS_ELECTION_TIMEOUTS * u64::from(self.p.election_tick) * TICK;
        while !self.converged {
            if self.now > start + bound {
                return Err(format!(
                    "{LIVENESS} violated: no converged cluster {} ticks ({} election timeouts) \
                     after healing\n{}",
                    bound / TICK,
                    LIVENESS_ELECTION_TIMEOUTS,
                    self.summary()
                ));
            }
            self.step()?;
        }
        self.checker.check_all_pairs(&self.slots)?;
        self.stats.runs = 1;
        self.stats.ticks = self.now / TICK;
        self.stats.liveness_ticks_max = (self.now - start) / TICK;
        self.stats.leaders = self.checker.leaders.len() as u64;
        if let Some(l) = self.leader() {
            let conf = l.raft().conf_state().clone();
            self.stats.new_members_final =
                conf.members().filter(|&m| m > self.p.nodes).count() as u64;
        }
        trace!(
            self.trace,
            self.now,
            "converged after {} ticks of liveness phase",
            (self.now - start) / TICK
        );
        Ok(())
    }

    fn setup(&mut self) {
        let p = &self.p;
        trace!(
            self.trace,
            0,
            "seed {}: {} nodes, pre_vote {}, check_quorum {}, election {} heartbeat {}, \
             max_size_per_msg {}, max_inflight {}, max_uncommitted {}, fault phase {} ticks, \
             net {:?}",
            self.seed,
            p.nodes,
            p.pre_vote,
            p.check_quorum,
            p.election_tick,
            p.heartbeat_tick,
            p.max_size_per_msg,
            p.max_inflight_msgs,
            p.max_uncommitted_size,
            p.fault_ticks,
            p.net
        );
        let voters: Vec<NodeId> = (1..=self.p.nodes).collect();
        for &id in &voters {
            let node = MemNode::new(self.config(id, 0), &voters).expect("valid config");
            self.add_slot(id, node);
        }
        self.stats.max_cluster = self.p.nodes;
        self.schedule(CHAOS_EVERY, Event::Chaos);
    }

    fn add_slot(&mut self, id: NodeId, node: MemNode) {
        self.slots.insert(
            id,
            Slot {
                state: NodeState::Up(Box::new(node)),
                inc: 0,
                ready_due: false,
                parked: false,
            },
        );
        let at = self.now + 1 + self.rng.below(TICK);
        self.schedule(at, Event::Tick { id, inc: 0 });
        self.touched.push(id);
    }

    /// One event, then the invariant checks.
    fn step(&mut self) -> Result<(), String> {
        let Some(((at, _), ev)) = self.queue.pop_first() else {
            return Err("the event queue ran dry".into());
        };
        self.now = at;
        self.stats.steps += 1;
        self.handle(ev)?;
        self.check_touched()?;
        if self.full_checks {
            self.checker.check_all_pairs(&self.slots)?;
        }
        Ok(())
    }

    fn check_touched(&mut self) -> Result<(), String> {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            self.checker
                .check_node(id, &self.slots, &mut self.trace, self.now)?;
        }
        for (index, cc) in std::mem::take(&mut self.checker.conf_commits) {
            self.stats.conf_committed += 1;
            self.on_conf_committed(index, cc)?;
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event) -> Result<(), String> {
        match ev {
            Event::Tick { id, inc } => {
                if self.slots.get(&id).is_none_or(|s| s.inc != inc) {
                    return Ok(());
                }
                let Some(node) = self.node_mut(id) else {
                    return Ok(());
                };
                node.raft_mut().tick();
                self.touched.push(id);
                let at = self.now + TICK - 5 + self.rng.below(11);
                self.schedule(at, Event::Tick { id, inc });
                self.after_input(id)
            }
            Event::Ready { id, inc } => {
                match self.slots.get_mut(&id) {
                    Some(s) if s.inc == inc => s.ready_due = false,
                    _ => return Ok(()),
                }
                self.touched.push(id);
                self.process_ready(id)
            }
            Event::Deliver { env, from_inc } => self.deliver(env, from_inc),
            Event::Report {
                to,
                inc,
                about,
                report,
            } => {
                if self.slots.get(&to).is_none_or(|s| s.inc != inc) {
                    return Ok(());
                }
                let Some(node) = self.node_mut(to) else {
                    return Ok(());
                };
                match report {
                    Report::SnapshotDone => node.raft_mut().report_snapshot(about, true),
                    Report::SnapshotFailed => node.raft_mut().report_snapshot(about, false),
                    Report::Unreachable => node.raft_mut().report_unreachable(about),
                }
                trace!(self.trace, self.now, "n{to} told {report:?} about n{about}");
                self.touched.push(to);
                self.after_input(to)
            }
            Event::Restart(id) => self.restart(id),
            Event::Heal(pid) => {
                if self.net.heal(pid) {
                    trace!(self.trace, self.now, "HEAL partition #{pid}");
                }
                Ok(())
            }
            Event::Chaos => {
                self.schedule(self.now + CHAOS_EVERY, Event::Chaos);
                if self.liveness {
                    self.liveness_turn()
                } else {
                    self.chaos_turn()
                }
            }
        }
    }

    fn deliver(&mut self, env: Envelope, from_inc: u64) -> Result<(), String> {
        let (from, to) = (env.msg.from, env.msg.to);
        let cut = self.net.is_cut(from, to);
        if cut || self.node(to).is_none() {
            if cut {
                self.stats.dropped_cut += 1;
            } else {
                self.stats.dropped_down += 1;
            }
            trace!(
                self.trace,
                self.now,
                "drop {} ({})",
                ShowMsg(&env.msg),
                if cut { "link cut" } else { "recipient down" }
            );
            match env.msg.kind {
                MessageKind::Snapshot { .. } => {
                    self.report(&env.msg, from_inc, Report::SnapshotFailed);
                }
                MessageKind::Append { .. } => {
                    self.report(&env.msg, from_inc, Report::Unreachable);
                }
                _ => {}
            }
            return Ok(());
        }
        self.stats.delivered += 1;
        trace!(self.trace, self.now, "deliver {}", ShowMsg(&env.msg));
        if matches!(env.msg.kind, MessageKind::Snapshot { .. }) {
            self.stats.snapshots_delivered += 1;
            self.report(&env.msg, from_inc, Report::SnapshotDone);
        }
        let node = self.node_mut(to).expect("recipient is up");
        node.step(env)
            .map_err(|e| format!("n{to} refused a message from n{from}: {e}"))?;
        self.touched.push(to);
        self.after_input(to)
    }

    fn report(&mut self, m: &Message, from_inc: u64, report: Report) {
        let at = self.now + 1 + self.rng.below(TICK / 4);
        self.schedule(
            at,
            Event::Report {
                to: m.from,
                inc: from_inc,
                about: m.to,
                report,
            },
        );
    }

    /// After an input, a node handles its `Ready` at once or, sometimes, a
    /// little later (so that several inputs batch into one `Ready`).
    fn after_input(&mut self, id: NodeId) -> Result<(), String> {
        if self.rng.chance(self.p.p_defer_ready) {
            let at = self.now + 1 + self.rng.below(TICK / 2);
            let Some(slot) = self.slots.get_mut(&id) else {
                return Ok(());
            };
            if !slot.ready_due {
                slot.ready_due = true;
                let inc = slot.inc;
                self.schedule(at, Event::Ready { id, inc });
            }
            return Ok(());
        }
        self.process_ready(id)
    }

    /// The `Ready` contract, phase by phase, with a chance to crash between
    /// the phases: (1) send `messages`; (2, 3) install the snapshot and
    /// persist entries and hard state; (4) send `persisted_messages`; (5)
    /// apply; then `advance`. A crash after (1) loses the entries and hard
    /// state of this `Ready` while its messages are already on the wire.
    fn process_ready(&mut self, id: NodeId) -> Result<(), String> {
        for _ in 0..MAX_READY_ROUNDS {
            let Some(node) = self.node_mut(id) else {
                return Ok(());
            };
            if !node.raft().has_ready() {
                return Ok(());
            }
            let mut rd = node.raft_mut().ready();
            let out = node.envelopes(std::mem::take(&mut rd.messages));
            self.send(id, out);
            if self.crash_in_ready(1.0) {
                self.crash(id, "inside Ready: messages sent, nothing persisted");
                return Ok(());
            }

            let node = self.node_mut(id).expect("up");
            node.persist(&rd);
            let hs = node.storage().hard_state;
            self.checker.on_persist(id, hs)?;
            if let Some(meta) = &rd.snapshot {
                self.checker.on_snapshot_installed(id);
                trace!(
                    self.trace,
                    self.now,
                    "n{id} installs snapshot {}/{} ({})",
                    meta.index,
                    meta.term,
                    show_conf(&meta.conf_state)
                );
            }
            if self.crash_in_ready(0.25) {
                self.crash(id, "inside Ready: persisted, acknowledgements not sent");
                return Ok(());
            }

            let node = self.node_mut(id).expect("up");
            let out = node.envelopes(std::mem::take(&mut rd.persisted_messages));
            self.send(id, out);
            if self.crash_in_ready(0.25) {
                self.crash(id, "inside Ready: acknowledgements sent, nothing applied");
                return Ok(());
            }

            let node = self.node_mut(id).expect("up");
            node.apply(&rd);
            node.raft_mut().advance();
        }
        Err(format!(
            "n{id}: the Ready cycle still had work after {MAX_READY_ROUNDS} rounds"
        ))
    }

    fn crash_in_ready(&mut self, weight: f64) -> bool {
        if self.liveness || !self.rng.chance(self.p.p_crash_in_ready * weight) {
            return false;
        }
        self.stats.crashes_in_ready += 1;
        true
    }

    /// Puts messages on the wire: each is lost, or arrives once or twice
    /// after its own delay.
    fn send(&mut self, from: NodeId, envs: Vec<Envelope>) {
        let from_inc = self.slots.get(&from).map_or(0, |s| s.inc);
        for env in envs {
            if matches!(env.msg.kind, MessageKind::Snapshot { .. }) && env.image.is_none() {
                // The node compacted again after the core asked for this
                // snapshot; its image is gone, so it cannot be sent.
                trace!(
                    self.trace,
                    self.now,
                    "cannot send {} (image superseded)",
                    ShowMsg(&env.msg)
                );
                self.report(&env.msg, from_inc, Report::SnapshotFailed);
                continue;
            }
            let delays = self.net.delays(&mut self.rng);
            if self.trace.verbose {
                trace!(self.trace, self.now, "send {}", ShowMsg(&env.msg));
            }
            let Some((&first, rest)) = delays.split_first() else {
                self.stats.lost += 1;
                trace!(self.trace, self.now, "lose {}", ShowMsg(&env.msg));
                if matches!(env.msg.kind, MessageKind::Snapshot { .. }) {
                    self.report(&env.msg, from_inc, Report::SnapshotFailed);
                }
                continue;
            };
            for &d in rest {
                self.stats.duplicated += 1;
                trace!(self.trace, self.now, "duplicate {}", ShowMsg(&env.msg));
                self.schedule(
                    self.now + d,
                    Event::Deliver {
                        env: env.clone(),
                        from_inc,
                    },
                );
            }
            self.schedule(self.now + first, Event::Deliver { env, from_inc });
        }
    }

    /// Stops a node, keeping only what it made durable.
    fn crash(&mut self, id: NodeId, why: &str) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let parked = slot.parked;
        let state = std::mem::replace(&mut slot.state, NodeState::Down(MemStorage::default()));
        let storage = match state {
            NodeState::Up(node) => node.crash(),
            NodeState::Down(s) => {
                slot.state = NodeState::Down(s);
                return;
            }
        };
        let hs = storage.hard_state;
        let last = storage.last_index();
        let snap = storage.snapshot.index;
        slot.state = NodeState::Down(storage);
        slot.inc += 1;
        slot.ready_due = false;
        self.checker.on_crash(id, hs.term);
        if !parked {
            self.stats.crashes += 1;
        }
        trace!(
            self.trace,
            self.now,
            "{} n{id} ({why}); durable: term {} vote {:?} commit {} snapshot {} last {}",
            if parked { "SHUT DOWN" } else { "CRASH" },
            hs.term,
            hs.vote,
            hs.commit,
            snap,
            last
        );
        if !parked {
            let at = self.now + TICK * (1 + self.rng.below(self.p.max_downtime_ticks));
            self.schedule(at, Event::Restart(id));
        }
    }

    /// Brings a crashed node back from its storage.
    fn restart(&mut self, id: NodeId) -> Result<(), String> {
        let (storage, inc) = match self.slots.get(&id) {
            Some(Slot {
                state: NodeState::Down(s),
                inc,
                parked: false,
                ..
            }) => (s.clone(), *inc),
            _ => return Ok(()),
        };
        self.checker.on_restart(id, &storage)?;
        let node = MemNode::restart(self.config(id, inc), storage)
            .map_err(|e| format!("n{id} cannot restart: {e}"))?;
        let r = node.raft();
        trace!(
            self.trace,
            self.now,
            "RESTART n{id}: term {} vote {:?} commit {} snapshot {} last {} ({})",
            r.term(),
            r.vote(),
            r.commit_index(),
            r.snapshot_meta().index,
            r.last_index(),
            show_conf(r.conf_state())
        );
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.state = NodeState::Up(Box::new(node));
        }
        self.stats.restarts += 1;
        let at = self.now + 1 + self.rng.below(TICK);
        self.schedule(at, Event::Tick { id, inc });
        self.touched.push(id);
        Ok(())
    }

    /// Tracks membership changes as they commit: a removed node is to be
    /// shut down; one added back after its removal is brought back from its
    /// storage.
    fn on_conf_committed(&mut self, index: Index, cc: ConfChange) -> Result<(), String> {
        match cc {
            ConfChange::RemoveNode(x) => {
                let added = self.added_at.get(&x).copied().unwrap_or(0);
                if index > added && self.out.get(&x).is_none_or(|&i| index > i) {
                    self.out.insert(x, index);
                    let delay = if self.liveness {
                        0
                    } else {
                        TICK * self.rng.below(30)
                    };
                    self.to_park.insert(x, self.now + delay);
                }
            }
            ConfChange::AddVoter(x) | ConfChange::AddLearner(x) => {
                let added = self.added_at.entry(x).or_insert(0);
                *added = (*added).max(index);
                if self.out.get(&x).is_some_and(|&i| index > i) {
                    self.out.remove(&x);
                    self.to_park.remove(&x);
                    if let Some(slot) = self.slots.get_mut(&x)
                        && slot.parked
                    {
                        slot.parked = false;
                        trace!(
                            self.trace,
                            self.now, "n{x} is added back ({cc:?} at {index})"
                        );
                        self.restart(x)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Shuts down the removed nodes that no other member still counts as a
    /// voter: one that has not yet learned the removal committed may need
    /// the removed node's vote to elect the leader that tells it.
    fn park_removed(&mut self) {
        let ready: Vec<NodeId> = self
            .to_park
            .iter()
            .filter(|&(x, &not_before)| {
                let Some(&index) = self.out.get(x) else {
                    return false;
                };
                self.now >= not_before
                    && self.slots.iter().all(|(y, slot)| {
                        y == x
                            || slot.parked
                            || self.out.contains_key(y)
                            || match &slot.state {
                                NodeState::Up(n) => !n.raft().conf_state().voters.contains(x),
                                NodeState::Down(st) => st.hard_state.commit >= index,
                            }
                    })
            })
            .map(|(&x, _)| x)
            .collect();
        for x in ready {
            self.to_park.remove(&x);
            if let Some(slot) = self.slots.get_mut(&x) {
                slot.parked = true;
            }
            self.crash(x, "its removal is committed");
        }
    }

    /// The leader with the highest term among the nodes that are up.
    fn leader(&self) -> Option<&MemNode> {
        self.slots
            .keys()
            .filter_map(|&id| self.node(id))
            .filter(|n| n.raft().role() == Role::Leader)
            .max_by_key(|n| n.raft().term())
    }

    /// Every node's state, for a liveness failure.
    fn summary(&self) -> String {
        let mut s = String::new();
        for (&id, slot) in &self.slots {
            match &slot.state {
                NodeState::Up(n) => {
                    let r = n.raft();
                    let _ = writeln!(
                        s,
                        "  n{id}: {} term {} leader {:?} commit {} applied {} snapshot {} last {} \
                         ({}) {:?}",
                        r.role(),
                        r.term(),
                        r.leader(),
                        r.commit_index(),
                        r.applied_index(),
                        r.snapshot_meta().index,
                        r.last_index(),
                        show_conf(r.conf_state()),
                        r.status().progress
                    );
                }
                NodeState::Down(st) => {
                    let why = if slot.parked { "shut down" } else { "down" };
                    let _ = writeln!(s, "  n{id}: {why}, durable {:?}", st.hard_state);
                }
            }
        }
        for lp in &self.live_props {
            let _ = writeln!(
                s,
                "  proposal {}: committed {}, last tried at {:?}",
                ShowData(&lp.payload),
                self.checker.committed_payloads.contains(&lp.payload),
                lp.last_try.map(|t| t / TICK)
            );
        }
        s
    }
}

// ===========================================================================
// Invariant checker
// ===========================================================================

const ELECTION_SAFETY: &str = "election safety (§5.2)";
const LOG_MATCHING: &str = "log matching (§5.3)";
const LEADER_APPEND_ONLY: &str = "leader append-only (§5.3)";
const LEADER_COMPLETENESS: &str = "leader completeness (§5.4)";
const STATE_MACHINE_SAFETY: &str = "state machine safety (§5.4.3)";
const COMMITTED_STABLE: &str = "committed entries never change (§5.4)";
const HARD_STATE_MONOTONIC: &str = "term, vote and commit never go backwards (§5.1)";
const DURABLE_MONOTONIC: &str = "durable hard state never regresses (§5.1)";
const WELL_FORMED: &str = "well-formed log";
const LIVENESS: &str = "liveness after heal";

fn violation(what: &str, detail: String) -> String {
    format!("{what} violated: {detail}")
}

/// What the checker remembers about one incarnation of a node that is up.
struct View {
    fresh: bool,
    term: Term,
    vote: Option<NodeId>,
    commit: Index,
    role: Role,
    leader: Option<NodeId>,
    /// A copy of the node's log as last checked; entries equal to it were
    /// checked before, so each step only checks what changed.
    shadow: Vec<Entry>,
    shadow_first: Index,
    snapshot: (Index, Term),
    /// Entries up to here were compared with the committed history.
    commit_checked: Index,
    /// This many elements of `MemNode::applied()` were checked...
    applied_checked: usize,
    /// ... the last of which has this index.
    applied_last: Index,
    /// Every committed normal entry up to here is in the state machine.
    gaps_checked: Index,
}

impl View {
    fn new() -> Self {
        View {
            fresh: true,
            term: 0,
            vote: None,
            commit: 0,
            role: Role::Follower,
            leader: None,
            shadow: Vec::new(),
            shadow_first: 0,
            snapshot: (0, 0),
            commit_checked: 0,
            applied_checked: 0,
            applied_last: 0,
            gaps_checked: 0,
        }
    }
}

/// An entry known to be committed.
struct Committed {
    term: Term,
    payload: EntryPayload,
    /// An upper bound on the term in which it was committed: the term of the
    /// node through which it was first seen committed. Every leader of a
    /// later term must hold it (§5.4).
    bound: Term,
}

/// The safety properties of the Raft paper, checked after every step over
/// the whole history of the run.
///
/// Each step changes one node (the one that received the input), so only
/// that node is checked, and only the part of its log that changed since its
/// last check is compared against the global history; the result is the same
/// as checking every node in full after every step. [`Checker::check_all_pairs`]
/// is the literal pairwise log-matching check, run at the end of each phase
/// (and after every step when replaying one seed) to cross-check.
#[derive(Default)]
struct Checker {
    /// §5.2 Election Safety: the leader of every term ever seen.
    leaders: BTreeMap<Term, NodeId>,
    /// §5.3 Log Matching: every `(index, term)` ever held by any node, with
    /// its payload, the term of the entry before it, and who held it first.
    /// Since `(index, term)` fixes the previous entry's term, and so on
    /// down, equal payloads and previous terms for every held `(index,
    /// term)` mean any two logs that share an `(index, term)` agree on
    /// everything before it.
    entries: HashMap<(Index, Term), (EntryPayload, Term, NodeId)>,
    /// Every index known committed, from the commit index of any node.
    committed: BTreeMap<Index, Committed>,
    /// §5.4.3 State Machine Safety: what was applied at each index.
    applied: HashMap<Index, Vec<u8>>,
    /// Payloads of committed normal entries (for the liveness check).
    committed_payloads: HashSet<Vec<u8>>,
    /// The highest durable hard state of each node id, across incarnations.
    durable: BTreeMap<NodeId, HardState>,
    views: BTreeMap<NodeId, View>,
    /// Membership changes newly seen committed (the harness acts on them).
    conf_commits: Vec<(Index, ConfChange)>,
}

/// Whether `raft` holds the entry `(index, term, payload)` or a snapshot
/// covering it — what leader completeness asks of a leader.
fn holds(raft: &Raft, index: Index, term: Term, payload: &EntryPayload) -> Result<(), String> {
    if let Some(e) = raft.entries(index, index + 1).first() {
        return if e.term == term && e.payload == *payload {
            Ok(())
        } else {
            Err(format!("it holds {} there", ShowEntry(e)))
        };
    }
    let snap = raft.snapshot_meta();
    if index < snap.index || (index == snap.index && snap.term == term) {
        Ok(())
    } else if index == snap.index {
        Err(format!(
            "its snapshot ends at {index} with term {}",
            snap.term
        ))
    } else {
        Err(format!("its log ends at {}", raft.last_index()))
    }
}

impl Checker {
    /// Checks node `id` after a step that may have changed it.
    fn check_node(
        &mut self,
        id: NodeId,
        slots: &BTreeMap<NodeId, Slot>,
        trace: &mut Trace,
        now: u64,
    ) -> Result<(), String> {
        let Some(node) = up(slots, id) else {
            return Ok(());
        };
        let raft = node.raft();
        let Checker {
            leaders,
            entries,
            committed,
            applied,
            committed_payloads,
            durable,
            views,
            conf_commits,
        } = self;
        let view = views.entry(id).or_insert_with(View::new);
        let (term, vote, commit, role, leader) = (
            raft.term(),
            raft.vote(),
            raft.commit_index(),
            raft.role(),
            raft.leader(),
        );

        // §5.1: the current term only grows, a vote once cast holds for the
        // rest of its term, and the commit index only grows — within an
        // incarnation, and never below what the node made durable.
        if !view.fresh {
            if term < view.term {
                return Err(violation(
                    HARD_STATE_MONOTONIC,
                    format!("n{id}: term went from {} to {term}", view.term),
                ));
            }
            if term == view.term && view.vote.is_some() && vote != view.vote {
                return Err(violation(
                    HARD_STATE_MONOTONIC,
                    format!(
                        "n{id}: vote in term {term} changed from {:?} to {vote:?}",
                        view.vote
                    ),
                ));
            }
            if commit < view.commit {
                return Err(violation(
                    HARD_STATE_MONOTONIC,
                    format!("n{id}: commit went from {} to {commit}", view.commit),
                ));
            }
        }
        if let Some(d) = durable.get(&id)
            && (term < d.term || (term == d.term && d.vote.is_some() && vote != d.vote))
        {
            return Err(violation(
                HARD_STATE_MONOTONIC,
                format!("n{id}: term {term} vote {vote:?} is behind its durable {d:?}"),
            ));
        }
        if view.fresh || role != view.role || term != view.term || leader != view.leader {
            trace!(
                trace,
                now,
                "n{id} is {role} in term {term} (leader {leader:?}, vote {vote:?}, commit {commit}, \
                 last {})",
                raft.last_index()
            );
        }

        // The log is well formed: contiguous entries (which may reach below
        // the snapshot, kept for slow followers) whose terms never decrease
        // and never exceed the node's term.
        let snap = raft.snapshot_meta();
        let first = raft.first_index();
        let last = raft.last_index();
        let base_term = raft.term_at(first - 1);
        if first > snap.index + 1 || commit > last || commit < snap.index || base_term.is_none() {
            return Err(violation(
                WELL_FORMED,
                format!(
                    "n{id}: snapshot {}, first {first}, last {last}, commit {commit}",
                    snap.index
                ),
            ));
        }
        if raft.applied_index() > commit {
            return Err(violation(
                WELL_FORMED,
                format!(
                    "n{id}: applied {} beyond commit {commit}",
                    raft.applied_index()
                ),
            ));
        }
        if view.fresh {
            view.shadow_first = first;
        } else if first < view.shadow_first {
            return Err(violation(
                WELL_FORMED,
                format!(
                    "n{id}: first index went back from {} to {first}",
                    view.shadow_first
                ),
            ));
        } else if first > view.shadow_first {
            let gone = (first - view.shadow_first) as usize;
            if gone >= view.shadow.len() {
                view.shadow.clear();
            } else {
                view.shadow.drain(..gone);
            }
            view.shadow_first = first;
        }
        let ents = raft.entries(first, last + 1);
        if ents.len() as u64 != last + 1 - first {
            return Err(violation(
                WELL_FORMED,
                format!(
                    "n{id}: entries({first}, {}) returned {} entries",
                    last + 1,
                    ents.len()
                ),
            ));
        }
        let same = view
            .shadow
            .iter()
            .zip(ents)
            .take_while(|(a, b)| a == b)
            .count();

        // §5.3 Leader Append-Only: a leader never overwrites or deletes
        // entries in its log; it only appends.
        let still_leader =
            !view.fresh && view.role == Role::Leader && role == Role::Leader && view.term == term;
        if still_leader && same < view.shadow.len() {
            return Err(violation(
                LEADER_APPEND_ONLY,
                format!(
                    "leader n{id} of term {term} replaced {} with {}",
                    ShowEntry(&view.shadow[same]),
                    ents.get(same)
                        .map_or_else(|| "nothing".to_string(), |e| ShowEntry(e).to_string())
                ),
            ));
        }

        // §5.3 Log Matching, on every entry that is new or changed.
        let mut prev_term = if same == 0 {
            base_term.unwrap_or_default()
        } else {
            ents[same - 1].term
        };
        for (k, e) in ents.iter().enumerate().skip(same) {
            let i = first + k as u64;
            if e.index != i || e.term < prev_term || e.term > term {
                return Err(violation(
                    WELL_FORMED,
                    format!(
                        "n{id} (term {term}) holds {} at position {i} after term {prev_term}",
                        ShowEntry(e)
                    ),
                ));
            }
            match entries.get(&(e.index, e.term)) {
                Some((p, pt, holder)) => {
                    if *p != e.payload || *pt != prev_term {
                        return Err(violation(
                            LOG_MATCHING,
                            format!(
                                "n{id} holds {} after an entry of term {prev_term}, but n{holder} \
                                 held ({},{}) as {} after an entry of term {pt}",
                                ShowEntry(e),
                                e.index,
                                e.term,
                                ShowPayload(p)
                            ),
                        ));
                    }
                }
                None => {
                    entries.insert((e.index, e.term), (e.payload.clone(), prev_term, id));
                }
            }
            prev_term = e.term;
        }
        view.shadow.truncate(same);
        view.shadow.extend_from_slice(&ents[same..]);

        // Committed entries never change: everything up to the node's commit
        // index agrees with what any node ever saw committed there. New
        // committed entries are recorded, and every leader already elected
        // in a later term must hold them (§5.4 Leader Completeness).
        if view.fresh || view.snapshot != (snap.index, snap.term) {
            if let Some(c) = committed.get(&snap.index)
                && c.term != snap.term
            {
                return Err(violation(
                    COMMITTED_STABLE,
                    format!(
                        "n{id} has a snapshot at {} of term {}, but the entry committed there \
                         has term {}",
                        snap.index, snap.term, c.term
                    ),
                ));
            }
            view.snapshot = (snap.index, snap.term);
        }
        let changed_from = first + same as u64;
        let lo = (view.commit_checked + 1).min(changed_from).max(first);
        for i in lo..=commit {
            let e = &ents[(i - first) as usize];
            if let Some(c) = committed.get_mut(&i) {
                if c.term != e.term || c.payload != e.payload {
                    return Err(violation(
                        COMMITTED_STABLE,
                        format!(
                            "n{id} (commit {commit}) holds {}, but ({i},{} {}) was committed",
                            ShowEntry(e),
                            c.term,
                            ShowPayload(&c.payload)
                        ),
                    ));
                }
                c.bound = c.bound.min(term);
                continue;
            }
            committed.insert(
                i,
                Committed {
                    term: e.term,
                    payload: e.payload.clone(),
                    bound: term,
                },
            );
            match &e.payload {
                EntryPayload::Normal(d) => {
                    committed_payloads.insert(d.to_vec());
                }
                EntryPayload::ConfChange(cc) => conf_commits.push((i, *cc)),
                EntryPayload::Empty => {}
            }
            for (&oid, _) in slots.iter() {
                let Some(other) = up(slots, oid) else {
                    continue;
                };
                let o = other.raft();
                if o.role() == Role::Leader && o.term() > term {
                    holds(o, i, e.term, &e.payload).map_err(|why| {
                        violation(
                            LEADER_COMPLETENESS,
                            format!(
                                "{} is committed (seen at n{id} in term {term}) but leader n{oid} \
                                 of term {} lacks it: {why}",
                                ShowEntry(e),
                                o.term()
                            ),
                        )
                    })?;
                }
            }
        }
        view.commit_checked = view.commit_checked.max(commit);

        // §5.2 Election Safety: at most one leader per term, ever. And §5.4
        // Leader Completeness: a new leader holds every entry committed in
        // an earlier term.
        if role == Role::Leader {
            match leaders.get(&term) {
                Some(&other) if other != id => {
                    return Err(violation(
                        ELECTION_SAFETY,
                        format!("n{other} and n{id} were both leader in term {term}"),
                    ));
                }
                Some(_) => {}
                None => {
                    leaders.insert(term, id);
                    for (&i, c) in committed.iter() {
                        if c.bound < term {
                            holds(raft, i, c.term, &c.payload).map_err(|why| {
                                violation(
                                    LEADER_COMPLETENESS,
                                    format!(
                                        "n{id} became leader of term {term} without ({i},{} {}), \
                                         committed by term {}: {why}",
                                        c.term,
                                        ShowPayload(&c.payload),
                                        c.bound
                                    ),
                                )
                            })?;
                        }
                    }
                }
            }
        }

        // §5.4.3 State Machine Safety: no two nodes apply different commands
        // at the same index; nothing uncommitted is applied; each node
        // applies in index order.
        let list = node.applied();
        if view.applied_checked > list.len()
            || (view.applied_checked > 0 && list[view.applied_checked - 1].0 != view.applied_last)
        {
            view.applied_checked = 0;
            view.applied_last = 0;
            view.gaps_checked = 0;
        }
        for (idx, data) in &list[view.applied_checked..] {
            if *idx <= view.applied_last {
                return Err(violation(
                    STATE_MACHINE_SAFETY,
                    format!(
                        "n{id} applied index {idx} after index {}",
                        view.applied_last
                    ),
                ));
            }
            match committed.get(idx) {
                Some(c) if matches!(&c.payload, EntryPayload::Normal(p) if p == data) => {}
                Some(c) => {
                    return Err(violation(
                        STATE_MACHINE_SAFETY,
                        format!(
                            "n{id} applied {} at {idx}, but ({idx},{} {}) is committed there",
                            ShowData(data),
                            c.term,
                            ShowPayload(&c.payload)
                        ),
                    ));
                }
                None => {
                    return Err(violation(
                        STATE_MACHINE_SAFETY,
                        format!(
                            "n{id} applied {} at {idx}, which was never seen committed",
                            ShowData(data)
                        ),
                    ));
                }
            }
            match applied.get(idx) {
                Some(other) if other != data => {
                    return Err(violation(
                        STATE_MACHINE_SAFETY,
                        format!(
                            "n{id} applied {} at {idx}, another node applied {}",
                            ShowData(data),
                            ShowData(other)
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    applied.insert(*idx, data.clone());
                }
            }
            view.applied_last = *idx;
        }
        view.applied_checked = list.len();
        // ... and skips none: every committed normal entry up to the applied
        // index is in the state machine (a snapshot image must hold them all).
        let applied_to = raft.applied_index();
        if view.gaps_checked < applied_to {
            for (&i, c) in committed.range(view.gaps_checked + 1..=applied_to) {
                if let EntryPayload::Normal(d) = &c.payload
                    && list.binary_search_by_key(&i, |(x, _)| *x).is_err()
                {
                    return Err(violation(
                        STATE_MACHINE_SAFETY,
                        format!(
                            "n{id} applied up to {applied_to} but its state machine lacks the \
                             committed {} at {i}",
                            ShowData(d)
                        ),
                    ));
                }
            }
            view.gaps_checked = applied_to;
        }
        if view.applied_last > raft.applied_index() {
            return Err(violation(
                STATE_MACHINE_SAFETY,
                format!(
                    "n{id}'s state machine has index {} but the core says applied {}",
                    view.applied_last,
                    raft.applied_index()
                ),
            ));
        }

        view.fresh = false;
        view.term = term;
        view.vote = vote;
        view.commit = commit;
        view.role = role;
        view.leader = leader;
        Ok(())
    }

    /// §5.1 on stable storage: the durable term never decreases, a durable
    /// vote never changes within its term, the durable commit never
    /// decreases — across crashes and restarts.
    fn on_persist(&mut self, id: NodeId, hs: HardState) -> Result<(), String> {
        if let Some(prev) = self.durable.get(&id) {
            let regress = hs.term < prev.term
                || (hs.term == prev.term && prev.vote.is_some() && hs.vote != prev.vote)
                || hs.commit < prev.commit;
            if regress {
                return Err(violation(
                    DURABLE_MONOTONIC,
                    format!("n{id} persisted {hs:?} over {prev:?}"),
                ));
            }
        }
        self.durable.insert(id, hs);
        Ok(())
    }

    /// A node restarts from `storage`: it must be what it persisted, and
    /// well formed. Its checks start over (a new incarnation).
    fn on_restart(&mut self, id: NodeId, storage: &MemStorage) -> Result<(), String> {
        self.views.remove(&id);
        if let Some(d) = self.durable.get(&id)
            && *d != storage.hard_state
        {
            return Err(violation(
                DURABLE_MONOTONIC,
                format!(
                    "n{id} restarts with {:?}, but persisted {d:?} last",
                    storage.hard_state
                ),
            ));
        }
        for (k, e) in storage.entries.iter().enumerate() {
            if e.index != storage.snapshot.index + 1 + k as u64 {
                return Err(violation(
                    WELL_FORMED,
                    format!(
                        "n{id}'s durable log after snapshot {} has {} at position {k}",
                        storage.snapshot.index,
                        ShowEntry(e)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn on_down(&mut self, id: NodeId) {
        self.views.remove(&id);
    }

    /// A node crashed. Besides starting over with it, forget what only its
    /// memory ever held in a term it had not made durable: the leadership and
    /// the entries of such a term never existed for anyone else. (Only a node
    /// that is the sole voter can lead a term before persisting it — everyone
    /// else needs votes, asked for after the persist. If it crashes first it
    /// restarts in the older term and may lead the same term again, appending
    /// other entries at the same indexes. All that can have left it is its
    /// first probe to learners, carrying its no-op, which it appends the same
    /// way the second time; should learners keep anything else, they would
    /// diverge from the leader and the checks of what is committed and
    /// applied would catch it.)
    fn on_crash(&mut self, id: NodeId, durable_term: Term) {
        self.views.remove(&id);
        self.leaders
            .retain(|&term, leader| term <= durable_term || *leader != id);
        self.entries
            .retain(|&(_, term), (_, _, holder)| term <= durable_term || *holder != id);
    }

    /// The state machine was replaced by a snapshot image: check it anew.
    fn on_snapshot_installed(&mut self, id: NodeId) {
        if let Some(v) = self.views.get_mut(&id) {
            v.applied_checked = 0;
            v.applied_last = 0;
            v.gaps_checked = 0;
        }
    }

    /// §5.3 Log Matching, literally: for any two nodes that are up, if their
    /// logs hold an entry with the same index and term, every earlier entry
    /// both still hold is identical.
    fn check_all_pairs(&self, slots: &BTreeMap<NodeId, Slot>) -> Result<(), String> {
        let rafts: Vec<&Raft> = slots
            .keys()
            .filter_map(|&id| up(slots, id))
            .map(MemNode::raft)
            .collect();
        for (x, a) in rafts.iter().enumerate() {
            for b in &rafts[x + 1..] {
                let lo = a.first_index().max(b.first_index());
                let hi = a.last_index().min(b.last_index());
                let mut k = hi;
                while k >= lo && a.term_at(k) != b.term_at(k) {
                    k -= 1;
                }
                if k < lo {
                    continue;
                }
                let (ea, eb) = (a.entries(lo, k + 1), b.entries(lo, k + 1));
                if ea != eb {
                    let (i, (x, y)) = ea
                        .iter()
                        .zip(eb)
                        .enumerate()
                        .find(|(_, (x, y))| x != y)
                        .map_or((0, (&ea[0], &eb[0])), |(i, p)| (i, p));
                    return Err(violation(
                        LOG_MATCHING,
                        format!(
                            "n{} and n{} both hold ({k},{}) but differ at {}: {} vs {}",
                            a.id(),
                            b.id(),
                            a.term_at(k).unwrap_or_default(),
                            lo + i as u64,
                            ShowEntry(x),
                            ShowEntry(y)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

// ===========================================================================
// Scenario generator
// ===========================================================================

impl Sim {
    /// A unique payload, padded to exercise the size limits.
    fn payload(&mut self, prefix: &str, n: u64) -> Vec<u8> {
        let mut v = format!("{prefix}{n}").into_bytes();
        let pad = self.rng.below(self.p.max_pad + 1) as usize;
        v.resize(v.len() + pad, b'.');
        v
    }

    /// The generator's turn in the fault phase: each kind of action happens
    /// with the probability the seed chose for it.
    fn chaos_turn(&mut self) -> Result<(), String> {
        self.park_removed();
        // Each action is checked on its own, so that no state goes unseen
        // (a proposal committed and compacted away within one turn).
        if self.rng.chance(self.p.p_propose) {
            self.propose_random()?;
            self.check_touched()?;
        }
        if self.rng.chance(self.p.p_conf_change) {
            self.conf_change()?;
            self.check_touched()?;
        }
        if self.rng.chance(self.p.p_transfer) {
            self.transfer()?;
            self.check_touched()?;
        }
        if self.rng.chance(self.p.p_crash)
            && let Some(id) = self.random_up()
        {
            self.crash(id, "at random");
        }
        if self.rng.chance(self.p.p_partition) {
            self.partition();
        }
        if self.rng.chance(self.p.p_snapshot) {
            self.snapshot();
        }
        Ok(())
    }

    fn propose_random(&mut self) -> Result<(), String> {
        let Some(id) = self.random_up() else {
            return Ok(());
        };
        self.proposals += 1;
        let payload = self.payload("p", self.proposals);
        self.propose_at(id, payload)
    }

    /// A client proposal at node `id` (a follower forwards it).
    fn propose_at(&mut self, id: NodeId, payload: Vec<u8>) -> Result<(), String> {
        let Some(node) = self.node_mut(id) else {
            return Ok(());
        };
        let res = node.raft_mut().propose(payload.clone());
        self.stats.proposals += 1;
        trace!(
            self.trace,
            self.now,
            "PROPOSE {} at n{id}: {res:?}",
            ShowData(&payload)
        );
        self.touched.push(id);
        self.after_input(id)
    }

    /// A single-server membership change proposed at a random node: add a
    /// brand-new node (or an idle one, or a removed one with its old state)
    /// as voter or learner, promote a learner, demote a voter, or remove a
    /// member.
    ///
    /// Runs with crashes never shrink a group of two voters. If the voter that
    /// stays crashes before it has durably learned that the change committed,
    /// it restarts counting the other one as a voter, needs its vote, and may
    /// find its log longer (it sent entries it had not persisted); the other
    /// one, no longer a voter in its own eyes, never campaigns. That is the
    /// known limit of single-server changes applied at commit (the etcd raft
    /// README: removing a member from a two-member cluster can leave it
    /// unable to make progress; use three or more members), not something a
    /// fix in the core can remove. Runs without crashes do shrink groups of
    /// two.
    fn conf_change(&mut self) -> Result<(), String> {
        let Some(at) = self.random_up() else {
            return Ok(());
        };
        // The membership the proposal will be checked against: that of the
        // leader the proposer forwards to, or its own.
        let conf = {
            let n = self.node(at).expect("up");
            let via = n.raft().leader().and_then(|l| self.node(l)).unwrap_or(n);
            via.raft().conf_state().clone()
        };
        let crashes = self.p.p_crash > 0.0 || self.p.p_crash_in_ready > 0.0;
        let idle: Vec<NodeId> = self
            .slots
            .keys()
            .copied()
            .filter(|id| !conf.contains(*id))
            .collect();
        let newcomer = if !idle.is_empty() && (self.next_id > self.last_id || self.rng.chance(0.5))
        {
            Some(self.rng.pick(&idle))
        } else if self.next_id <= self.last_id {
            Some(self.next_id)
        } else {
            None
        };
        let (voters, learners) = (conf.voters.len(), conf.learners.len());
        let mut options = Vec::new();
        if let Some(n) = newcomer {
            if voters < MAX_VOTERS {
                options.push(ConfChange::AddVoter(n));
            }
            if learners < MAX_LEARNERS {
                options.push(ConfChange::AddLearner(n));
            }
        }
        for &l in &conf.learners {
            if voters < MAX_VOTERS {
                options.push(ConfChange::AddVoter(l));
            }
            options.push(ConfChange::RemoveNode(l));
        }
        if voters > 2 || (voters == 2 && !crashes) {
            for &v in &conf.voters {
                if learners < MAX_LEARNERS {
                    options.push(ConfChange::AddLearner(v));
                }
                options.push(ConfChange::RemoveNode(v));
            }
        }
        if options.is_empty() {
            return Ok(());
        }
        let cc = self.rng.pick(&options);
        let fresh = cc.node() == self.next_id && !self.slots.contains_key(&cc.node());
        if fresh {
            let id = self.next_id;
            self.next_id += 1;
            let node = MemNode::new(self.config(id, 0), &[]).expect("valid config");
            self.add_slot(id, node);
            self.stats.new_nodes += 1;
            let size = self.slots.len() as u64;
            self.stats.max_cluster = self.stats.max_cluster.max(size);
            trace!(
                self.trace,
                self.now, "NEW NODE n{id} (empty, joins through the log)"
            );
        }
        let Some(node) = self.node_mut(at) else {
            return Ok(());
        };
        let res = node.raft_mut().propose_conf_change(cc);
        self.stats.conf_proposed += 1;
        trace!(self.trace, self.now, "CONF CHANGE {cc:?} at n{at}: {res:?}");
        if res.is_err() && fresh {
            self.slots.remove(&cc.node());
            self.checker.on_down(cc.node());
            trace!(self.trace, self.now, "n{} discarded", cc.node());
        }
        self.touched.push(at);
        self.after_input(at)
    }

    /// A leadership transfer asked of a random node (a follower forwards it).
    fn transfer(&mut self) -> Result<(), String> {
        let Some(id) = self.random_up() else {
            return Ok(());
        };
        let voters: Vec<NodeId> = self
            .node(id)
            .map(|n| n.raft().conf_state().voters.iter().copied().collect())
            .unwrap_or_default();
        if voters.is_empty() {
            return Ok(());
        }
        let to = self.rng.pick(&voters);
        let Some(node) = self.node_mut(id) else {
            return Ok(());
        };
        let res = node.raft_mut().transfer_leader(to);
        self.stats.transfers += 1;
        trace!(
            self.trace,
            self.now, "TRANSFER to n{to} asked at n{id}: {res:?}"
        );
        self.touched.push(id);
        self.after_input(id)
    }

    /// A symmetric split, an isolated node, or a few one-way cuts, healed
    /// after a while.
    fn partition(&mut self) {
        let mut ids: Vec<NodeId> = self
            .slots
            .keys()
            .copied()
            .filter(|id| self.slots.get(id).is_some_and(|s| !s.parked))
            .collect();
        if ids.len() < 2 {
            return;
        }
        let mut links = Vec::new();
        let desc = match self.rng.below(3) {
            0 => {
                self.rng.shuffle(&mut ids);
                let k = 1 + self.rng.below(ids.len() as u64 - 1) as usize;
                let (a, b) = ids.split_at(k);
                for &x in a {
                    for &y in b {
                        links.push((x, y));
                        links.push((y, x));
                    }
                }
                format!("split {a:?} | {b:?}")
            }
            1 => {
                let x = self.rng.pick(&ids);
                for &y in &ids {
                    if y != x {
                        links.push((x, y));
                        links.push((y, x));
                    }
                }
                format!("isolate n{x}")
            }
            _ => {
                let n = 1 + self.rng.below(3);
                for _ in 0..n {
                    let x = self.rng.pick(&ids);
                    let y = self.rng.pick(&ids);
                    if x != y {
                        links.push((x, y));
                    }
                }
                format!("one-way cuts {links:?}")
            }
        };
        let pid = self.net.partition(links);
        let until = self.now + TICK * (5 + self.rng.below(60));
        self.schedule(until, Event::Heal(pid));
        self.stats.partitions += 1;
        trace!(
            self.trace,
            self.now,
            "PARTITION #{pid}: {desc} until {}",
            until / TICK
        );
    }

    /// A random node snapshots its state machine and compacts its log.
    fn snapshot(&mut self) {
        let Some(id) = self.random_up() else {
            return;
        };
        let Some(node) = self.node_mut(id) else {
            return;
        };
        let res = node.snapshot_and_compact();
        if res.is_ok() {
            self.stats.compactions += 1;
        }
        trace!(
            self.trace,
            self.now,
            "SNAPSHOT n{id}: {:?}",
            res.map(|m| (m.index, m.term))
        );
        self.touched.push(id);
    }

    /// The end of the fault phase: heal the network, stop faults, restart
    /// crashed nodes, shut down removed ones, and queue the proposals that
    /// must make it.
    fn heal_everything(&mut self) -> Result<(), String> {
        self.liveness = true;
        self.net.heal_all();
        self.net.cfg = NetConfig::calm();
        trace!(
            self.trace,
            self.now, "=== HEALED: faults stop, liveness phase starts ==="
        );
        for not_before in self.to_park.values_mut() {
            *not_before = 0;
        }
        let down: Vec<NodeId> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s.state, NodeState::Down(_)))
            .map(|(&id, _)| id)
            .collect();
        for id in down {
            self.restart(id)?;
        }
        self.park_removed();
        let k = 1 + self.rng.below(5);
        for i in 0..k {
            let payload = self.payload("L", i);
            self.live_props.push(LiveProposal {
                payload,
                last_try: None,
            });
        }
        self.check_touched()
    }

    /// The generator's turn in the liveness phase: make the next proposal,
    /// retry the ones that got lost (a client would), and see whether the
    /// cluster converged.
    fn liveness_turn(&mut self) -> Result<(), String> {
        self.park_removed();
        let retry_after = 3 * u64::from(self.p.election_tick) * TICK;
        let mut fresh_done = false;
        for i in 0..self.live_props.len() {
            if self
                .checker
                .committed_payloads
                .contains(&self.live_props[i].payload)
            {
                continue;
            }
            let due = match self.live_props[i].last_try {
                None if !fresh_done => {
                    fresh_done = true;
                    true
                }
                None => false,
                Some(t) => self.now >= t + retry_after,
            };
            if !due {
                continue;
            }
            let Some(id) = self.random_up() else {
                continue;
            };
            self.live_props[i].last_try = Some(self.now);
            let payload = self.live_props[i].payload.clone();
            self.propose_at(id, payload)?;
            self.check_touched()?;
        }
        self.converged = self.is_converged();
        Ok(())
    }

    /// A leader is up, everything in its log is committed, and every member
    /// of its configuration is up, agrees on the configuration and the
    /// commit index, and has applied every proposal made after healing.
    fn is_converged(&self) -> bool {
        if self
            .live_props
            .iter()
            .any(|p| p.last_try.is_none() || !self.checker.committed_payloads.contains(&p.payload))
        {
            return false;
        }
        let Some(l) = self.leader() else {
            return false;
        };
        let l = l.raft();
        let conf = l.conf_state();
        let commit = l.commit_index();
        if commit != l.last_index() {
            return false;
        }
        for m in conf.members() {
            let Some(n) = self.node(m) else {
                return false;
            };
            let r = n.raft();
            if r.conf_state() != conf || r.commit_index() != commit || r.applied_index() != commit {
                return false;
            }
            let have: HashSet<&[u8]> = n.applied().iter().map(|(_, d)| d.as_slice()).collect();
            if self
                .live_props
                .iter()
                .any(|p| !have.contains(p.payload.as_slice()))
            {
                return false;
            }
        }
        true
    }
}

// ===========================================================================
// The test
// ===========================================================================

/// A failed seed.
struct Failure {
    seed: u64,
    params: String,
    what: String,
    trace: String,
}

impl Failure {
    fn report(&self) -> String {
        format!(
            "\n==== simulation failed: seed {} ====\n{}\nrun: {}\n---- last {} trace lines ----\n{}\
             ---- replay ----\nSIM_SEED={} cargo test -p coordinator --test simulation -- --nocapture\n",
            self.seed, self.what, self.params, TRACE_LINES, self.trace, self.seed
        )
    }
}

/// Runs one seed; a broken invariant, a liveness failure or a panic in the
/// core is a failure.
fn run_seed(seed: u64, verbose: bool) -> Result<Stats, Failure> {
    let mut sim = Sim::new(seed, verbose);
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| sim.run()));
    let what = match outcome {
        Ok(Ok(())) => return Ok(sim.stats),
        Ok(Err(what)) => what,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("panic: {msg}")
        }
    };
    Err(Failure {
        seed,
        params: format!("{:?}", sim.p),
        what,
        trace: sim.trace.dump(),
    })
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
    )
}

fn print_stats(seeds: &str, s: &Stats) {
    println!(
        "simulation: {seeds}: {} steps, {} ticks; {} delivered, {} lost, {} duplicated, \
         {} dropped on cut links, {} to down nodes; {} crashes ({} inside a Ready), {} restarts; \
         {} partitions; {} proposals; {} membership changes proposed, {} committed; {} new nodes, \
         {} of them members at the end; {} transfers; {} compactions, {} snapshots delivered; \
         {} leaders elected; largest group {}; slowest liveness {} ticks",
        s.steps,
        s.ticks,
        s.delivered,
        s.lost,
        s.duplicated,
        s.dropped_cut,
        s.dropped_down,
        s.crashes,
        s.crashes_in_ready,
        s.restarts,
        s.partitions,
        s.proposals,
        s.conf_proposed,
        s.conf_committed,
        s.new_nodes,
        s.new_members_final,
        s.transfers,
        s.compactions,
        s.snapshots_delivered,
        s.leaders,
        s.max_cluster,
        s.liveness_ticks_max
    );
}

/// The deterministic simulation; see the module documentation.
#[test]
fn simulation() {
    if let Some(seed) = env_u64("SIM_SEED") {
        match run_seed(seed, true) {
            Ok(stats) => print_stats(&format!("seed {seed}"), &stats),
            Err(f) => panic!("{}", f.report()),
        }
        return;
    }
    let start = env_u64("SIM_SEED_START").unwrap_or(0);
    let count = env_u64("SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let end = start.saturating_add(count);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, count.max(1) as usize);
    let next = AtomicU64::new(start);
    let results: Mutex<(Stats, Vec<Failure>)> = Mutex::new((Stats::default(), Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    let outcome = run_seed(seed, false);
                    let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
                    match outcome {
                        Ok(stats) => r.0.add(&stats),
                        Err(f) => r.1.push(f),
                    }
                }
            });
        }
    });
    let (stats, mut failures) = results.into_inner().unwrap_or_else(|e| e.into_inner());
    print_stats(&format!("seeds {start}..{end}"), &stats);
    if failures.is_empty() {
        return;
    }
    failures.sort_by_key(|f| f.seed);
    let seeds: Vec<u64> = failures.iter().map(|f| f.seed).collect();
    panic!(
        "{} of {count} seeds failed: {seeds:?}\n{}",
        failures.len(),
        failures[0].report()
    );
}
