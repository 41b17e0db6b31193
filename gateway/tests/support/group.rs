//! A group of gateways in one process, on real sockets, for the tests and
//! benches that build a large state and add a member (`snapshot_load`,
//! `catchup`, `snapshot_tail`; each uses a different part of this).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use gateway::{Config, Gateway};
use tokio::time::Instant;

/// The settings of member `id` of a group whose members' peer ports are
/// `peers`: data in `dir/g{id}`, REST on a port the OS picks, no MQTT
/// listeners, no per-token REST rate limit (the load these groups carry
/// comes from one token), everything else as `Config::single` has it
/// (default timings, snapshot policy and fsync).
pub fn member_config(
    dir: &Path,
    id: u64,
    peers: &BTreeMap<u64, SocketAddr>,
    secret: &str,
) -> Config {
    let mut c = Config::single(
        dir.join(format!("g{id}")),
        "127.0.0.1:0".parse().expect("addr"),
        peers[&id],
    );
    c.node_id = id;
    c.peers = peers.iter().map(|(id, a)| (*id, (*a).into())).collect();
    c.cluster_secret = Some(secret.into());
    c.mqtt_listen = None;
    c.mqtt5_listen = None;
    c.rest_rate_limit = 0;
    c
}

/// Starts every member of `peers` at once (each waits for the others to
/// elect a leader), each with `config(id)`.
pub async fn start_group(
    peers: &BTreeMap<u64, SocketAddr>,
    config: impl Fn(u64) -> Config,
) -> BTreeMap<u64, Gateway> {
    let starts: Vec<_> = peers
        .keys()
        .map(|&id| (id, tokio::spawn(gateway::start(config(id)))))
        .collect();
    let mut gws = BTreeMap::new();
    for (id, s) in starts {
        let gw = s
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("start gateway {id}: {e}"));
        gws.insert(id, gw);
    }
    gws
}

/// The admin token the group's first leader wrote.
pub fn admin_token(gws: &BTreeMap<u64, Gateway>) -> String {
    gws.values()
        .find_map(|g| g.admin_token_file.clone())
        .map(|f| {
            std::fs::read_to_string(f)
                .expect("token")
                .trim()
                .to_string()
        })
        .expect("admin token")
}

/// Waits (at most `within`) until every member follows one leader in one
/// term; returns it.
pub async fn settled_leader(gws: &BTreeMap<u64, Gateway>, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let views: Vec<(Option<u64>, u64)> = gws
            .values()
            .map(|g| {
                let r = g.node().status().raft;
                (r.leader, r.term)
            })
            .collect();
        if let Some(&(Some(l), term)) = views.first()
            && views.iter().all(|v| *v == (Some(l), term))
        {
            return l;
        }
        assert!(Instant::now() < deadline, "no settled leader: {views:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bytes of the files under `p`.
pub fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The `p` quantile (0–1) of `sorted` (nearest rank; zero if empty).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// `len` lowercase letters that differ with `seed` and are the same for
/// the same seed (xorshift): text that neither compresses nor repeats
/// across devices.
pub fn seeded_text(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}
