//! How quiet the machine was: every interval, the CPU time used by the
//! benchmark's own processes (one session: the script's, from
//! `/proc/<pid>/stat`) and by everything else (all CPU time not idle, from
//! `/proc/stat`, minus ours: this also counts work this process cannot see,
//! e.g. in other containers on the same machine). One JSON line per interval.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the epoch at the end of the interval.
    pub at: u64,
    /// Length, s.
    pub secs: f64,
    /// CPU used by the benchmark's session, in cores (1.0 = one core busy).
    pub ours: f64,
    /// CPU used by everything else, in cores.
    pub others: f64,
    /// The busiest other processes this one can see: (name, cores).
    pub top_others: Vec<(String, f64)>,
}

/// (session, name, start time, ticks) of every process.
fn processes() -> HashMap<u32, (u32, String, u64, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let (Some(sid), Some(ut), Some(st), Some(start)) = (
            f.get(3).and_then(|s| s.parse().ok()),
            f.get(11).and_then(|s| s.parse::<u64>().ok()),
            f.get(12).and_then(|s| s.parse::<u64>().ok()),
            f.get(19).and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        out.insert(pid, (sid, name, start, ut + st));
    }
    out
}

/// CPU ticks of all CPUs not idle (nor waiting for I/O) so far.
fn busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is within user).
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3)? - v.get(4).copied().unwrap_or(0))
}

/// Samples until killed, appending to `out`.
pub fn run(session: u32, interval: Duration, out: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    let mut prev = processes();
    let mut prev_busy = busy_ticks();
    let mut t = std::time::Instant::now();
    loop {
        std::thread::sleep(interval);
        let now = processes();
        let busy = busy_ticks();
        let secs = t.elapsed().as_secs_f64();
        t = std::time::Instant::now();
        let (mut ours, mut visible_others) = (0u64, 0u64);
        let mut by_name: HashMap<String, u64> = HashMap::new();
        for (pid, (sid, name, start, ticks)) in &now {
            // The same process (not a reused pid) as last time? Names can
            // change (kernel workers name their current job).
            let before = prev.get(pid).filter(|p| p.2 == *start).map_or(0, |p| p.3);
            let d = ticks.saturating_sub(before);
            if *sid == session {
                ours += d;
            } else {
                visible_others += d;
                *by_name.entry(name.clone()).or_default() += d;
            }
        }
        prev = now;
        // Everything not idle, less ours; at least what we saw of others.
        let others = match (busy, prev_busy) {
            (Some(b), Some(p)) => b.saturating_sub(p).saturating_sub(ours).max(visible_others),
            _ => visible_others,
        };
        prev_busy = busy;
        // USER_HZ = 100.
        let cores = |ticks: u64| ticks as f64 / 100.0 / secs.max(1e-3);
        let mut top: Vec<(String, f64)> = by_name
            .into_iter()
            .filter(|(_, d)| *d > 0)
            .map(|(n, d)| (n, cores(d)))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(3);
        let s = Sample {
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            secs,
            ours: cores(ours),
            others: cores(others),
            top_others: top,
        };
        writeln!(f, "{}", serde_json::to_string(&s).context("encode")?).context("write")?;
        f.flush().context("flush")?;
    }
}
