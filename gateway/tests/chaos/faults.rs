//! The fault schedule: one fault at a time, each chosen, aimed, held and
//! followed by a pause drawn from the seeded RNG, until the time is up.
//! Then everything is healed: links, paused and stopped gateways.
//!
//! Faults:
//! - isolate a gateway (often the leader): every link to and from it cut, or
//!   stalled (a silent partition);
//! - split the group in two (for five gateways: two against three);
//! - one-way partition: one link cut or stalled, the reverse working;
//! - slow network: every link delayed, with jitter;
//! - flaky network: every connection reset several times;
//! - SIGKILL a gateway, restart it later on its data;
//! - SIGSTOP a gateway (its connections stay open, it answers nothing),
//!   SIGCONT later;
//! - clean restart (SIGINT, start again at once);
//! - crash every gateway at once (SIGKILL all), restart them all.
//!
//! Each fault is recorded as a [`FaultSpan`]: from just before it is
//! injected until the heal after it finished (restarted gateways up again),
//! with the gateways it affects, decided conservatively — the gateway
//! isolated, killed, paused or restarted; the minority side of a split;
//! both ends of a one-way partition; every gateway for what acts on the
//! whole group (delay, flaky links, crash-all). The delivery check trusts
//! only gateways outside every span.
//!
//! With a Byzantine gateway (the PBFT run) the same faults hit any gateway,
//! the Byzantine one included: safety must hold whatever happens. But PBFT
//! promises liveness only while at most f members are faulty, and the
//! Byzantine gateway is one: a fault that touches a correct gateway leaves
//! the group without that promise, so its span affects every gateway. A
//! fault on the Byzantine gateway alone affects only it.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::cluster::{Cluster, Life};
use super::proxy::Mode;
use super::rng::Rng;

/// One fault from injection to heal, in seconds since the run started.
#[derive(Debug, Clone)]
pub struct FaultSpan {
    pub what: String,
    pub from: f64,
    /// When the heal after it completed; infinite while it lasts.
    pub to: f64,
    /// The gateways it affects.
    pub gateways: Vec<u64>,
}

impl FaultSpan {
    /// Whether it affects gateway `g` at some time in `[from, to]`.
    pub fn affects(&self, g: u64, from: f64, to: f64) -> bool {
        self.gateways.contains(&g) && self.from <= to && self.to >= from
    }
}

#[derive(Debug, Default)]
pub struct FaultLog {
    pub counts: BTreeMap<&'static str, u64>,
    /// (seconds since start, what).
    pub timeline: Vec<(f64, String)>,
    /// Every fault, injection to heal.
    pub spans: Vec<FaultSpan>,
    /// Harness-level anomalies (a gateway that did not come back, …).
    pub problems: Vec<String>,
}

pub struct Nemesis<'a> {
    pub cluster: &'a Cluster,
    pub rng: Rng,
    pub log: FaultLog,
    pub start: Instant,
}

impl Nemesis<'_> {
    /// Records a fault about to be injected that affects `gateways`; its
    /// span ends when [`Nemesis::run`] healed it.
    fn note(&mut self, kind: &'static str, what: String, mut gateways: Vec<u64>) {
        if let Some(b) = self.cluster.byzantine()
            && gateways.iter().any(|g| *g != b)
        {
            gateways = self.cluster.ids();
        }
        *self.log.counts.entry(kind).or_insert(0) += 1;
        let t = self.start.elapsed().as_secs_f64();
        eprintln!("chaos: [{t:>8.3}s] {what}");
        self.log.timeline.push((t, what.clone()));
        self.log.spans.push(FaultSpan {
            what,
            from: t,
            to: f64::INFINITY,
            gateways,
        });
    }

    /// A target: the leader half of the time (if one is known), else any gateway.
    async fn target(&mut self) -> u64 {
        let prefer_leader = self.rng.chance(0.5);
        let any = *self.rng.pick(&self.cluster.ids());
        if prefer_leader && let Some(l) = self.cluster.leader().await {
            return l;
        }
        any
    }

    fn hold(&mut self) -> Duration {
        Duration::from_millis(self.rng.range(500, 4_000))
    }

    fn partition_mode(&mut self) -> Mode {
        if self.rng.chance(0.5) {
            Mode::Cut
        } else {
            Mode::Stall
        }
    }

    /// Runs faults until `until`, then heals everything.
    pub async fn run(&mut self, until: Instant) {
        while Instant::now() < until {
            self.one().await;
            self.heal().await;
            let t = self.start.elapsed().as_secs_f64();
            for s in self.log.spans.iter_mut().filter(|s| s.to == f64::INFINITY) {
                s.to = t;
            }
            let gap = Duration::from_millis(self.rng.range(200, 1_500));
            sleep(gap).await;
        }
        self.heal().await;
    }

    async fn one(&mut self) {
        let n = self.cluster.ids().len() as u64;
        let c = self.cluster;
        match self.rng.weighted(&[20, 8, 12, 10, 8, 14, 14, 6, 3]) {
            0 => {
                let k = self.target().await;
                let mode = self.partition_mode();
                let others: Vec<u64> = c.ids().into_iter().filter(|x| *x != k).collect();
                let hold = self.hold();
                self.note(
                    "isolate",
                    format!("isolate gw{k} ({mode:?}) for {hold:?}"),
                    vec![k],
                );
                c.partition(&[k], &others, mode);
                sleep(hold).await;
            }
            1 => {
                // Two groups: a minority (1 of 3, 2 of 5) and the rest.
                let mut ids = c.ids();
                for i in (1..ids.len()).rev() {
                    let j = self.rng.below(i as u64 + 1) as usize;
                    ids.swap(i, j);
                }
                let (a, b) = ids.split_at(((n - 1) / 2) as usize);
                let mode = self.partition_mode();
                let hold = self.hold();
                // The majority side elects a leader among itself and goes on.
                self.note(
                    "split",
                    format!("split {a:?} | {b:?} ({mode:?}) for {hold:?}"),
                    a.to_vec(),
                );
                c.partition(a, b, mode);
                sleep(hold).await;
            }
            2 => {
                let from = self.target().await;
                let others: Vec<u64> = c.ids().into_iter().filter(|x| *x != from).collect();
                let to = *self.rng.pick(&others);
                let mode = self.partition_mode();
                // Sometimes the other direction of the leader's traffic.
                let (from, to) = if self.rng.chance(0.5) {
                    (from, to)
                } else {
                    (to, from)
                };
                let hold = self.hold();
                self.note(
                    "one-way",
                    format!("one-way partition gw{from} → gw{to} ({mode:?}) for {hold:?}"),
                    vec![from, to],
                );
                c.set_link(from, to, mode);
                sleep(hold).await;
            }
            3 => {
                let delay_ms = self.rng.range(5, 150);
                let jitter_ms = self.rng.range(0, 100);
                let hold = self.hold();
                self.note(
                    "delay",
                    format!("delay every link {delay_ms} ms + up to {jitter_ms} ms for {hold:?}"),
                    c.ids(),
                );
                for a in c.ids() {
                    for b in c.ids() {
                        if a != b {
                            c.set_link(
                                a,
                                b,
                                Mode::Pass {
                                    delay_ms,
                                    jitter_ms,
                                },
                            );
                        }
                    }
                }
                sleep(hold).await;
            }
            4 => {
                let times = self.rng.range(2, 6);
                self.note(
                    "flaky",
                    format!("reset every peer connection {times} times"),
                    c.ids(),
                );
                for _ in 0..times {
                    for a in c.ids() {
                        for b in c.ids() {
                            if a != b {
                                c.set_link(a, b, Mode::Cut);
                            }
                        }
                    }
                    sleep(Duration::from_millis(self.rng.range(10, 100))).await;
                    c.heal_links();
                    sleep(Duration::from_millis(self.rng.range(100, 800))).await;
                }
            }
            5 => {
                let k = self.target().await;
                let hold = self.hold();
                self.note(
                    "kill",
                    format!("SIGKILL gw{k}, restart after {hold:?}"),
                    vec![k],
                );
                c.kill(k).await;
                sleep(hold).await;
            }
            6 => {
                let k = self.target().await;
                let hold = self.hold();
                self.note(
                    "pause",
                    format!("SIGSTOP gw{k}, SIGCONT after {hold:?}"),
                    vec![k],
                );
                c.pause(k);
                sleep(hold).await;
            }
            7 => {
                let k = self.target().await;
                self.note(
                    "restart",
                    format!("clean restart (SIGINT) of gw{k}"),
                    vec![k],
                );
                if !c.stop(k).await {
                    self.log
                        .problems
                        .push(format!("gw{k} did not exit within 30 s of SIGINT"));
                }
            }
            _ => {
                let hold = Duration::from_millis(self.rng.range(0, 1_000));
                self.note(
                    "crash-all",
                    format!("SIGKILL every gateway, restart after {hold:?}"),
                    c.ids(),
                );
                for k in c.ids() {
                    c.kill(k).await;
                }
                sleep(hold).await;
            }
        }
    }

    /// Heals links, resumes paused gateways and restarts stopped ones.
    pub async fn heal(&mut self) {
        let c = self.cluster;
        c.heal_links();
        let mut restarted = Vec::new();
        for k in c.ids() {
            match c.node(k).life() {
                Life::Paused => c.resume(k),
                Life::Down => {
                    c.start_again(k);
                    restarted.push(k);
                }
                Life::Running => {}
            }
        }
        for k in restarted {
            if let Err(e) = c.await_ready(k, Duration::from_secs(40)).await {
                let t = self.start.elapsed().as_secs_f64();
                eprintln!("chaos: [{t:>8.3}s] {e}");
                self.log.problems.push(format!("[{t:.3}s] {e}"));
            }
        }
    }
}
