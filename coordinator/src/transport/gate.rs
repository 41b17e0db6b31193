//! Admission to the handshake, and rate-limited warnings about callers that
//! did not authenticate.
//!
//! An accepted connection holds a *handshake slot* until its handshake ends
//! (at the latest after `handshake_timeout`). Slots come from two pools:
//!
//! - **reserved**: `reserved_handshakes_per_peer` slots for every configured
//!   peer, usable only by connections from that peer's IP address (the IP
//!   of the address this node dials it at; for a peer given by host name,
//!   the addresses the name resolved to when last dialed);
//! - **shared**: `max_pending_handshakes` slots for everyone else (and for
//!   a peer's address once its reserved slots are taken), of which one IP
//!   address holds at most `max_pending_handshakes_per_ip`.
//!
//! So strangers flooding the port from any number of other addresses fill
//! the shared pool only, and a member — a follower that restarted, say —
//! still gets its handshake in at once. The TCP handshake has proved that
//! the caller can receive at its source address, so an off-path stranger
//! cannot take a member's reserved slots.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::TransportConfig;
use super::shared::lock;
use crate::raft::NodeId;

/// Why a connection was closed before its handshake started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    /// Its address already holds its share of the handshake slots.
    PerAddress,
    /// Every shared handshake slot is taken.
    Full,
}

impl std::fmt::Display for Shed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shed::PerAddress => "too many connections in their handshake from this address",
            Shed::Full => "too many connections in their handshake",
        })
    }
}

#[derive(Debug, Default)]
struct Pending {
    reserved: usize,
    shared: usize,
}

#[derive(Debug, Default)]
struct GateState {
    /// The IP addresses of each configured peer.
    peer_ips: HashMap<NodeId, Vec<IpAddr>>,
    /// Handshakes in progress per source IP address.
    pending: HashMap<IpAddr, Pending>,
    /// Shared slots taken.
    shared_total: usize,
}

/// The handshake slots of one listener.
#[derive(Debug)]
pub(crate) struct Gate {
    max_shared: usize,
    max_per_ip: usize,
    reserved_per_peer: usize,
    state: Mutex<GateState>,
}

/// One handshake slot; given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
    reserved: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = lock(&self.gate.state);
        let empty = match st.pending.get_mut(&self.ip) {
            Some(p) => {
                if self.reserved {
                    p.reserved = p.reserved.saturating_sub(1);
                } else {
                    p.shared = p.shared.saturating_sub(1);
                }
                p.reserved == 0 && p.shared == 0
            }
            None => false,
        };
        if empty {
            st.pending.remove(&self.ip);
        }
        if !self.reserved {
            st.shared_total = st.shared_total.saturating_sub(1);
        }
    }
}

/// The address as compared: an IPv4 address mapped into IPv6 is the IPv4
/// address.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Gate {
    /// A gate with the configuration's limits and no peers.
    pub(crate) fn new(config: &TransportConfig) -> Self {
        Gate {
            max_shared: config.max_pending_handshakes,
            max_per_ip: config.max_pending_handshakes_per_ip,
            reserved_per_peer: config.reserved_handshakes_per_peer,
            state: Mutex::new(GateState::default()),
        }
    }

    /// Sets the IP addresses of peer `id` (when it is added, when its
    /// address changes, and whenever its host name resolves).
    pub(crate) fn set_peer_ips(&self, id: NodeId, ips: impl IntoIterator<Item = IpAddr>) {
        let mut ips: Vec<IpAddr> = ips.into_iter().map(canonical).collect();
        ips.sort_unstable();
        ips.dedup();
        lock(&self.state).peer_ips.insert(id, ips);
    }

    /// Forgets peer `id`'s addresses (it was removed).
    pub(crate) fn remove_peer(&self, id: NodeId) {
        lock(&self.state).peer_ips.remove(&id);
    }

    /// Takes a handshake slot for a connection from `ip`, or says why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Shed> {
        let ip = canonical(ip);
        let mut st = lock(&self.state);
        let peers_there = st.peer_ips.values().filter(|ips| ips.contains(&ip)).count();
        let reserved_cap = peers_there.saturating_mul(self.reserved_per_peer);
        let shared_total = st.shared_total;
        let p = st.pending.entry(ip).or_default();
        let reserved = if p.reserved < reserved_cap {
            p.reserved += 1;
            true
        } else if p.shared >= self.max_per_ip {
            return Err(Shed::PerAddress);
        } else if shared_total >= self.max_shared {
            return Err(Shed::Full);
        } else {
            p.shared += 1;
            false
        };
        if !reserved {
            st.shared_total += 1;
        }
        Ok(Slot {
            gate: self.clone(),
            ip,
            reserved,
        })
    }
}

/// Lets through at most `burst` warnings per `window` and counts the rest,
/// so that a flood of bad connections cannot flood the log.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window: Duration,
    burst: u32,
    state: Mutex<(Option<Instant>, u32, u64)>,
}

impl LogLimiter {
    /// At most `burst` per `window`.
    pub(crate) fn new(window: Duration, burst: u32) -> Self {
        LogLimiter {
            window,
            burst,
            state: Mutex::new((None, 0, 0)),
        }
    }

    /// `Some(n)` if a warning may be logged now, `n` being how many were
    /// suppressed since the last one logged; `None` if this one is
    /// suppressed.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut st = lock(&self.state);
        let (start, used, suppressed) = &mut *st;
        if start.is_none_or(|s| now.duration_since(s) >= self.window) {
            *start = Some(now);
            *used = 0;
        }
        if *used < self.burst {
            *used += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}

/// Logs one condition that keeps recurring for the same key (a peer
/// refused for the same reason, say) once per `every`, counting the
/// repeats left out in between, so a misconfigured member that redials
/// every few seconds shows up once a minute, not on every attempt. Holds
/// at most `capacity` keys: when full, keys not logged within `every` are
/// forgotten, and a new key beyond that is let through untracked (a flood
/// of strangers is bounded by a [`LogLimiter`] as well).
#[derive(Debug)]
pub(crate) struct RepeatLimiter<K> {
    every: Duration,
    capacity: usize,
    /// Key → (when last logged, repeats left out since).
    state: Mutex<HashMap<K, (Instant, u64)>>,
}

impl<K: std::hash::Hash + Eq> RepeatLimiter<K> {
    /// At most one line per key per `every`, tracking up to `capacity` keys.
    pub(crate) fn new(every: Duration, capacity: usize) -> Self {
        RepeatLimiter {
            every,
            capacity,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` if a line about `key` may be logged now, `n` being how
    /// many repeats were left out since its last one; `None` if this one is
    /// left out.
    pub(crate) fn allow(&self, key: K) -> Option<u64> {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: K, now: Instant) -> Option<u64> {
        let mut st = lock(&self.state);
        if let Some((last, repeats)) = st.get_mut(&key) {
            if now.saturating_duration_since(*last) < self.every {
                *repeats += 1;
                return None;
            }
            *last = now;
            return Some(std::mem::take(repeats));
        }
        if st.len() >= self.capacity {
            let every = self.every;
            st.retain(|_, (last, _)| now.saturating_duration_since(*last) < every);
        }
        if st.len() < self.capacity {
            st.insert(key, (now, 0));
        }
        Some(0)
    }

    /// Forgets every key: the next occurrence of each is logged at once
    /// (the condition ended, e.g. the peer connected).
    pub(crate) fn reset(&self) {
        lock(&self.state).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(shared: usize, per_ip: usize, per_peer: usize) -> Arc<Gate> {
        let mut c = TransportConfig::new(1, "c", b"s".to_vec(), "127.0.0.1:0".parse().unwrap());
        c.max_pending_handshakes = shared;
        c.max_pending_handshakes_per_ip = per_ip;
        c.reserved_handshakes_per_peer = per_peer;
        Arc::new(Gate::new(&c))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn strangers_fill_only_the_shared_pool() {
        let g = gate(4, 2, 2);
        g.set_peer_ips(2, [ip("10.0.0.1")]);
        g.set_peer_ips(3, [ip("10.0.0.2")]);
        g.set_peer_ips(4, [ip("10.0.0.2"), ip("192.0.2.99")]);
        let mut held = Vec::new();
        // One address gets at most its share.
        held.push(g.admit(ip("192.0.2.1")).unwrap());
        held.push(g.admit(ip("192.0.2.1")).unwrap());
        assert_eq!(g.admit(ip("192.0.2.1")).unwrap_err(), Shed::PerAddress);
        // Others fill the rest of the shared pool.
        held.push(g.admit(ip("192.0.2.2")).unwrap());
        held.push(g.admit(ip("192.0.2.3")).unwrap());
        assert_eq!(g.admit(ip("192.0.2.4")).unwrap_err(), Shed::Full);
        // Peers still get their reserved slots: two per peer at its address.
        let p1: Vec<Slot> = (0..2).map(|_| g.admit(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(g.admit(ip("10.0.0.1")).unwrap_err(), Shed::Full);
        let p2: Vec<Slot> = (0..4)
            .map(|_| g.admit(ip("::ffff:10.0.0.2")).unwrap())
            .collect();
        assert_eq!(g.admit(ip("10.0.0.2")).unwrap_err(), Shed::Full);
        // Slots come back when dropped.
        drop(held.pop());
        assert!(g.admit(ip("192.0.2.4")).is_ok());
        drop(p1);
        drop(p2);
        drop(held);
        let st = lock(&g.state);
        assert_eq!(st.shared_total, 0);
        assert!(st.pending.is_empty());
    }

    #[test]
    fn a_peer_falls_back_to_the_shared_pool() {
        let g = gate(1, 1, 1);
        g.set_peer_ips(2, [ip("10.0.0.1")]);
        let a = g.admit(ip("10.0.0.1")).unwrap();
        let b = g.admit(ip("10.0.0.1")).unwrap();
        assert!(a.reserved && !b.reserved);
        assert_eq!(g.admit(ip("10.0.0.1")).unwrap_err(), Shed::PerAddress);
        // A peer that is removed loses its reservation.
        g.remove_peer(2);
        drop(a);
        assert_eq!(g.admit(ip("10.0.0.1")).unwrap_err(), Shed::PerAddress);
    }

    #[test]
    fn log_limiter_counts_what_it_suppresses() {
        let l = LogLimiter::new(Duration::from_secs(3600), 2);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        let l2 = LogLimiter::new(Duration::ZERO, 1);
        assert_eq!(l2.allow(), Some(0));
        assert_eq!(l2.allow(), Some(0));
    }

    #[test]
    fn repeat_limiter_logs_each_key_once_per_window() {
        let l = RepeatLimiter::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        assert_eq!(l.allow_at("a", t0), Some(0));
        assert_eq!(l.allow_at("a", t0 + Duration::from_secs(5)), None);
        assert_eq!(l.allow_at("a", t0 + Duration::from_secs(10)), None);
        // Another key has its own window.
        assert_eq!(l.allow_at("b", t0 + Duration::from_secs(10)), Some(0));
        // After the window: logged, with the count of repeats left out.
        assert_eq!(l.allow_at("a", t0 + Duration::from_secs(61)), Some(2));
        assert_eq!(l.allow_at("a", t0 + Duration::from_secs(62)), None);
        // Full: a third key is let through but not tracked...
        assert_eq!(l.allow_at("c", t0 + Duration::from_secs(62)), Some(0));
        assert_eq!(l.allow_at("c", t0 + Duration::from_secs(63)), Some(0));
        // ...until old keys can be forgotten.
        assert_eq!(l.allow_at("c", t0 + Duration::from_secs(200)), Some(0));
        assert_eq!(l.allow_at("c", t0 + Duration::from_secs(201)), None);
        // After a reset every key is logged again at once.
        l.reset();
        assert_eq!(l.allow_at("c", t0 + Duration::from_secs(202)), Some(0));
    }
}
