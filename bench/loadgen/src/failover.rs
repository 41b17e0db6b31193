//! Failover: start a group of real processes (three or more) from the
//! command lines given, then `trials` times: wait until every member names
//! the same leader and applied what it has, SIGKILL the leader (PBFT: the
//! primary), and time until the first write that
//! succeeds through a survivor. The killed member is restarted (same data
//! directory) and caught up before the next trial.
//!
//! After the kill a write attempt starts every `probe_every`, alternating
//! between the survivors, each allowed `attempt_timeout`; none is abandoned
//! early, so the time measured is when the first success answered.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::stats::quantile;
use crate::systems::{Op, Sys, Target, http_client};

/// Failover settings.
#[derive(Debug, Clone)]
pub struct FailoverSpec {
    /// One shell command line per member (run with `sh -c 'exec …'`).
    pub commands: Vec<String>,
    /// Member logs and the pid file go here.
    pub log_dir: PathBuf,
    /// Kills.
    pub trials: usize,
    /// A new write attempt after the kill every this long.
    pub probe_every: Duration,
    /// Bound of one attempt.
    pub attempt_timeout: Duration,
    /// Pause after the group settled, before the kill.
    pub settle: Duration,
    /// Token files (Entente: the first leader writes one).
    pub token_files: Vec<PathBuf>,
    /// A label for the settings (printed in the report).
    pub label: String,
}

/// What a failover run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverResult {
    /// Always `"failover"`.
    pub kind: String,
    /// `etcd` or `entente`.
    pub system: Target,
    /// The settings label.
    pub label: String,
    /// Kill → first successful write, ms, per trial in order.
    pub trials_ms: Vec<f64>,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank: the largest of 20).
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Write attempts that failed across all trials (refused or timed out).
    pub failed_attempts: u64,
    /// The command lines (argument 0 of each is the binary).
    pub commands: Vec<String>,
}

struct Members {
    commands: Vec<String>,
    log_dir: PathBuf,
    children: Vec<Option<Child>>,
}

impl Members {
    fn spawn(&mut self, i: usize) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("member{}.log", i + 1)))
            .context("member log")?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {}", self.commands[i]))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.commands[i]))?;
        // So that whoever started us can clean up if we die.
        let mut pids = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join("pids"))
            .context("pid file")?;
        writeln!(pids, "{}", child.id()).context("pid file")?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// Runs the failover trials.
pub async fn run(mut sys: Sys, spec: &FailoverSpec) -> Result<FailoverResult> {
    if spec.commands.len() != sys.endpoints.len() || spec.commands.len() < 3 {
        bail!("give one --member-cmd per endpoint, at least three");
    }
    std::fs::create_dir_all(&spec.log_dir).context("log dir")?;
    let mut members = Members {
        commands: spec.commands.clone(),
        log_dir: spec.log_dir.clone(),
        children: (0..spec.commands.len()).map(|_| None).collect(),
    };
    for i in 0..spec.commands.len() {
        members.spawn(i)?;
    }
    let http = http_client();
    let all: Vec<usize> = (0..sys.endpoints.len()).collect();
    if sys.target == Target::Entente {
        sys.token =
            Some(crate::systems::read_token(&spec.token_files, Duration::from_secs(60)).await?);
    }
    sys.wait_settled(&http, &all, Duration::from_secs(60))
        .await?;
    // The probe's key or device (client 0 of the load).
    sys.setup(1).await?;
    let sys = Arc::new(sys);

    let mut times = Vec::new();
    let mut failed = 0u64;
    let mut seq = 1u64;
    for trial in 0..spec.trials {
        let leader = settle(&sys, &http, &all, &mut seq).await?;
        tokio::time::sleep(spec.settle).await;
        // The leader may have changed during the pause.
        let leader = settle(&sys, &http, &all, &mut seq).await.unwrap_or(leader);
        let survivors: Vec<usize> = all.iter().copied().filter(|&e| e != leader).collect();
        let t0 = Instant::now();
        members.kill(leader);
        let (ms, fails) = first_write(&sys, &survivors, spec, t0, &mut seq).await?;
        failed += fails;
        eprintln!(
            "{} failover {:>2}/{}: member {} killed → first write after {ms:.0} ms ({fails} failed attempts)",
            sys.target.name(),
            trial + 1,
            spec.trials,
            leader + 1
        );
        times.push(ms);
        members.spawn(leader)?;
    }
    drop(members);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FailoverResult {
        kind: "failover".into(),
        system: sys.target,
        label: spec.label.clone(),
        p50_ms: quantile(&sorted, 0.5),
        p99_ms: quantile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or_default(),
        mean_ms: sorted.iter().sum::<f64>() / sorted.len().max(1) as f64,
        trials_ms: times,
        failed_attempts: failed,
        commands: spec.commands.clone(),
    })
}

/// Waits (up to 60 s) until the group is settled (every member names the
/// same leader and applied what it has: [`Sys::wait_settled`]), with a
/// write through the leader every 2 s it is not. A member restarted after
/// a kill may only hear that the group moved on from the traffic of a
/// write: a PBFT replica comes back in the view it was killed in, leading
/// it in its own eyes, and learns of the later view from the next
/// request's messages.
async fn settle(
    sys: &Arc<Sys>,
    http: &reqwest::Client,
    all: &[usize],
    seq: &mut u64,
) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sys
            .wait_settled(http, all, left.min(Duration::from_secs(2)))
            .await
        {
            Ok(leader) => return Ok(leader),
            Err(e) if left <= Duration::from_secs(2) => return Err(e),
            Err(_) => {
                let ep = sys.leader(http, all).await.unwrap_or(0);
                *seq += 1;
                let _ = sys.send(http, Op::Write, ep, 0, *seq).await;
            }
        }
    }
}

/// Starts write attempts every `probe_every` until one succeeds; the time
/// from `t0` to that success, and how many attempts failed meanwhile.
async fn first_write(
    sys: &Arc<Sys>,
    survivors: &[usize],
    spec: &FailoverSpec,
    t0: Instant,
    seq: &mut u64,
) -> Result<(f64, u64)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<Instant, String>>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(spec.probe_every);
    let mut fails = 0u64;
    let mut attempt = 0usize;
    let deadline = t0 + Duration::from_secs(60);
    // One client per survivor, so attempts do not queue behind each other
    // in one connection pool.
    let clients: Vec<reqwest::Client> = survivors.iter().map(|_| http_client()).collect();
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                if Instant::now() > deadline {
                    break Err(anyhow::anyhow!("no successful write within 60 s of the kill"));
                }
                let which = attempt % survivors.len();
                attempt += 1;
                let ep = survivors[which];
                let http = clients[which].clone();
                let mut s = (**sys).clone();
                s.timeout = spec.attempt_timeout;
                let tx = tx.clone();
                *seq += 1;
                let n = *seq;
                tasks.spawn(async move {
                    let r = s.send(&http, Op::Write, ep, 0, n).await;
                    let _ = tx.send(r.map(|()| Instant::now()));
                });
            }
            Some(r) = rx.recv() => match r {
                Ok(at) => break Ok(((at - t0).as_secs_f64() * 1e3, fails)),
                Err(_) => fails += 1,
            },
        }
    };
    tasks.abort_all();
    result
}
