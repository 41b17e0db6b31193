//! The machine the figures come from: cores, memory, kernel, how busy the
//! CPUs are, and the disk's fdatasync latency in the benchmark directory.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::stats::{Hist, Latency};

/// The machine's description.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cores: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Memory, GiB.
    pub mem_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// `write` + `fdatasync` of `fsync_block` bytes appended to a file in
    /// the benchmark directory, ms.
    pub fsync: Latency,
    /// Block size of the fdatasync test.
    pub fsync_block: usize,
    /// Share of CPU time not idle over a few seconds before anything of the
    /// benchmark runs, %.
    pub busy_pct_before: f64,
    /// `/proc/loadavg` then.
    pub loadavg_before: String,
}

/// Times `count` appends of `block` bytes each followed by `fdatasync`.
pub fn fsync_latency(dir: &Path, count: usize, block: usize) -> Result<Latency> {
    let path = dir.join("fdatasync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let buf = vec![0x5au8; block];
    let mut h = Hist::new();
    for _ in 0..count {
        let t = Instant::now();
        f.write_all(&buf).context("write")?;
        f.sync_data().context("fdatasync")?;
        h.record(t.elapsed());
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(h.summary())
}

fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

/// Share of all CPUs' time spent not idle over `over`, %.
pub fn busy_pct(over: Duration) -> f64 {
    let Some((t0, i0)) = cpu_times() else {
        return f64::NAN;
    };
    std::thread::sleep(over);
    let Some((t1, i1)) = cpu_times() else {
        return f64::NAN;
    };
    let total = t1.saturating_sub(t0).max(1) as f64;
    100.0 * (1.0 - i1.saturating_sub(i0) as f64 / total)
}

fn meminfo_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Measures the machine.
pub fn measure(dir: &Path, fsync_count: usize, block: usize) -> Result<Machine> {
    let loadavg_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let busy_pct_before = busy_pct(Duration::from_secs(3));
    let fsync = fsync_latency(dir, fsync_count, block)?;
    Ok(Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpu_model(),
        mem_gib: meminfo_gib(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        fsync,
        fsync_block: block,
        busy_pct_before,
        loadavg_before,
    })
}
