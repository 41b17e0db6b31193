//! The state machine's apply path alone: committed desired-state patches
//! (the replicated-write benchmark's operation) applied to a state database
//! in batches of 1, 16 and 64 entries, as the node driver hands them over.
//! Reports the time per entry and per batch, and the process's CPU per
//! entry — the share of a write's cost each member pays to apply it.
//!
//! `cargo bench -p gateway --bench apply` (`GW_BENCH_ENTRIES` entries per
//! batch size, default 20,000). The database is in a temp dir on the local
//! disk, with the gateway's settings (WAL, `synchronous = NORMAL`: the
//! Raft log, not SQLite, is what makes an entry durable).

use std::time::Instant;

use coordinator::node::Committed;
use gateway::ops::{Op, Proposal};
use gateway::state::StateDb;
use serde_json::json;

const DEVICES: usize = 64;

fn entry(index: u64, op: Op) -> Committed {
    Committed {
        index,
        term: 1,
        data: Proposal {
            ts_ms: 1_764_144_000_000 + index,
            op,
            by: Some("device:pump-1".into()),
        }
        .encode()
        .into(),
    }
}

/// CPU time of this process so far, in microseconds.
fn cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after ')'.
    (ticks(11) + ticks(12)) * 10_000
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total: u64 = std::env::var("GW_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    println!("apply: {total} desired-state patches per batch size, {DEVICES} devices");
    println!("batch | µs/entry (wall) | µs/batch (wall) | µs/entry (CPU)");
    for batch in [1u64, 16, 64] {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = StateDb::open(dir.path()).await.expect("open");
        let mut index = 0;
        let regs: Vec<Committed> = (0..DEVICES)
            .map(|i| {
                index += 1;
                entry(
                    index,
                    Op::RegisterDevice {
                        id: format!("dev-{i}"),
                        secret_hash: format!("hash-{i}"),
                        labels: Default::default(),
                        attributes: json!({}),
                        cert_sha256: None,
                    },
                )
            })
            .collect();
        db.apply(regs, index).await.expect("register");
        let body = json!({"setpoint": 21.5, "mode": "eco", "note": "x".repeat(60)});
        let started = Instant::now();
        let cpu0 = cpu_us();
        let mut done = 0;
        while done < total {
            let n = batch.min(total - done);
            let entries: Vec<Committed> = (0..n)
                .map(|k| {
                    index += 1;
                    entry(
                        index,
                        Op::SetDesired {
                            device: format!("dev-{}", (done + k) as usize % DEVICES),
                            patch: body.clone(),
                            expected_version: None,
                        },
                    )
                })
                .collect();
            let results = db.apply(entries, index).await.expect("apply");
            assert_eq!(results.len() as u64, n);
            done += n;
        }
        let wall = started.elapsed().as_secs_f64() * 1e6;
        let cpu = (cpu_us() - cpu0) as f64;
        println!(
            "{batch:>5} | {:>15.1} | {:>15.1} | {:>14.1}",
            wall / total as f64,
            wall / (total / batch) as f64,
            cpu / total as f64
        );
        assert_eq!(db.applied_index(), index);
        db.close().await;
    }
}
