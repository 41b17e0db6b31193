//! Device authentication at CONNECT: client id = username = a registered
//! device id, password = its secret (compared by SHA-256 hash); or, on the
//! TLS listener, a client certificate whose SHA-256 is the fingerprint
//! registered for the device id (`cert_sha256`), the password unused.
//!
//! The check runs in the connection's own task, so a slow lookup never
//! holds up the accept loop; the secret hashes are cached so 10,000
//! devices reconnecting at once cost one database read each at most once.
//! Failed logins are throttled per address and per device id, and their log
//! lines are rate-limited (see [`Authenticator::check`]).
//! The cache is invalidated by the registry's events (registration, update,
//! secret rotation, deletion) and cleared when the event stream lagged.
//!
//! This gateway's copy of the registry may be a little behind the group: a
//! device registered (or given a new secret) through another gateway a
//! moment ago may not be applied here yet. So a login that fails against the
//! local copy is checked once more after a read barrier (ReadIndex: wait
//! until everything committed before the login is applied here) before it is
//! refused. Without a quorum the barrier fails and the login is refused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use coordinator::node::Node;

use super::MqttStats;
use super::wire::Refusal;
use crate::ops::OpResult;
use crate::shared::{hash_secret, id_ok};
use crate::state::{DeviceCredentials, StateDb};

/// Longest wait for the read barrier of a login that failed locally.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one read barrier per device id in this long.
const BARRIER_EVERY: Duration = Duration::from_secs(5);
/// Failed logins an address or a device id may make at once…
const FAILURE_BURST: f64 = 10.0;
/// …and per second after that.
const FAILURES_PER_SEC: f64 = 1.0;
/// Entries kept by each throttle table and the secret cache.
const CACHE_MAX: usize = 200_000;
const THROTTLE_MAX: usize = 50_000;

/// What a session logged in with. A change of the registry ends the
/// sessions whose credential it no longer holds (see `Registry::revoke`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    /// The device's secret: its SHA-256 (hex).
    Secret(String),
    /// A client certificate: its SHA-256 (hex).
    Certificate(String),
}

impl Credential {
    /// Whether the registry's credentials of a device take this one.
    fn accepted_by(&self, stored: &DeviceCredentials) -> bool {
        match self {
            // An empty hash: the device has no secret (certificate only).
            Credential::Secret(h) => {
                !stored.secret_hash.is_empty() && constant_time_eq(&stored.secret_hash, h)
            }
            Credential::Certificate(f) => stored
                .cert_sha256
                .as_deref()
                .is_some_and(|c| constant_time_eq(c, f)),
        }
    }
}

/// Checks device logins against the registry.
#[derive(Debug)]
pub(crate) struct Authenticator {
    db: Arc<StateDb>,
    node: Node<OpResult>,
    stats: Arc<MqttStats>,
    /// Device id → its credentials, `None` for no such device.
    cache: Mutex<HashMap<String, Option<DeviceCredentials>>>,
    throttle: Mutex<Throttle>,
    logs: LogLimiter,
    /// Bumped on every invalidation, so a lookup that raced one is not cached.
    generation: AtomicU64,
}

impl Authenticator {
    pub(crate) fn new(
        db: Arc<StateDb>,
        node: Node<OpResult>,
        stats: Arc<MqttStats>,
    ) -> Authenticator {
        Authenticator {
            db,
            node,
            stats,
            cache: Mutex::new(HashMap::new()),
            throttle: Mutex::new(Throttle::default()),
            logs: LogLimiter::default(),
            generation: AtomicU64::new(0),
        }
    }

    /// Checks a login: `Ok` with the credential it matched, or why not.
    /// `cert` is the SHA-256 of the client certificate the connection
    /// presented (TLS only): then it alone decides — it must be the one
    /// registered for `client_id` (else not authorized), the password is
    /// not looked at, and the username may be left out.
    ///
    /// Failed logins are throttled per address and per device id (see
    /// [`Throttle`]): past the budget, a login is checked against the
    /// cached credentials only — no database read, no read barrier — and
    /// refused as over the rate if that does not match, so a guessing
    /// client costs a hash per attempt while a device that logged in before
    /// still gets in from a busy address.
    pub(crate) async fn check(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
        cert: Option<&str>,
        addr: IpAddr,
    ) -> Result<Credential, Refusal> {
        let username_ok = client_id == username || (cert.is_some() && username.is_empty());
        if !username_ok || !id_ok(client_id) {
            self.refused(
                client_id,
                addr,
                "client id and username must be a registered device id",
            );
            return Err(Refusal::BadClientId);
        }
        let given = match cert {
            Some(fingerprint) => Credential::Certificate(fingerprint.to_string()),
            None => Credential::Secret(hash_secret(password)),
        };
        let now = Instant::now();
        let suspect = self
            .throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .over_budget(addr, client_id, now);
        if suspect {
            let cached = self.cached(client_id);
            if cached.is_some_and(|c| given.accepted_by(&c)) {
                return Ok(given);
            }
            self.stats.logins_throttled.fetch_add(1, Ordering::Relaxed);
            self.refused(
                client_id,
                addr,
                "too many failed logins from this address or for this id",
            );
            return Err(Refusal::RateExceeded);
        }
        if self.matches(client_id, &given).await {
            return Ok(given);
        }
        // Perhaps registered or changed elsewhere and not applied here yet:
        // one read barrier per device id per `BARRIER_EVERY` at most.
        let barrier_due = self
            .throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .barrier_due(client_id, now);
        if barrier_due && self.barrier().await {
            self.invalidate(client_id);
            if self.matches(client_id, &given).await {
                return Ok(given);
            }
        }
        self.throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed(addr, client_id, now);
        match given {
            Credential::Secret(_) => {
                self.refused(
                    client_id,
                    addr,
                    "client id and username must be a registered device id, password its secret",
                );
                Err(Refusal::BadCredentials)
            }
            Credential::Certificate(_) => {
                self.refused(
                    client_id,
                    addr,
                    "the client certificate is not the one registered for this device id",
                );
                Err(Refusal::NotAuthorized)
            }
        }
    }

    fn refused(&self, client_id: &str, addr: IpAddr, why: &str) {
        self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.logs.allow("refused") {
            let client_id: String = client_id.chars().take(64).collect();
            tracing::warn!(client_id, %addr, suppressed, "MQTT login refused: {why}");
        }
    }

    fn cached(&self, client_id: &str) -> Option<DeviceCredentials> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(client_id)
            .cloned()
            .flatten()
    }

    /// Waits until this gateway has applied everything committed before now.
    async fn barrier(&self) -> bool {
        let index = match tokio::time::timeout(BARRIER_TIMEOUT, self.node.read_index()).await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "read barrier for an MQTT login");
                return false;
            }
            Err(_) => return false,
        };
        self.node.wait_applied(index, BARRIER_TIMEOUT).await.is_ok()
    }

    /// Whether the registry takes `given` for `client_id`. Both answers
    /// are cached (an unknown id as `None`), so repeated logins cost one
    /// database read per id until the registry changes it.
    async fn matches(&self, client_id: &str, given: &Credential) -> bool {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(client_id)
            .cloned();
        let stored = match cached {
            Some(c) => c,
            None => {
                let generation = self.generation.load(Ordering::SeqCst);
                let stored = match self.db.device_credentials(client_id).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading a device's credentials for an MQTT login");
                        return false;
                    }
                };
                if self.generation.load(Ordering::SeqCst) == generation {
                    let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
                    if cache.len() >= CACHE_MAX {
                        cache.clear();
                    }
                    cache.insert(client_id.to_string(), stored.clone());
                }
                stored
            }
        };
        stored.is_some_and(|s| given.accepted_by(&s))
    }

    /// Forgets one device's cached credentials.
    pub(crate) fn invalidate(&self, device: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(device);
    }

    /// Forgets every cached credential.
    pub(crate) fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A failure budget: a token bucket that failed logins drain.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn level(&self, now: Instant) -> f64 {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * FAILURES_PER_SEC;
        (self.tokens + refill).min(FAILURE_BURST)
    }
}

/// Failed-login budgets per address and per device id, and when each id
/// last had a read barrier. Bounded: a table that fills up forgets the
/// budgets that have refilled, or else everything.
#[derive(Debug, Default)]
struct Throttle {
    by_addr: HashMap<IpAddr, Bucket>,
    by_id: HashMap<String, Bucket>,
    barriers: HashMap<String, Instant>,
}

impl Throttle {
    fn over_budget(&self, addr: IpAddr, id: &str, now: Instant) -> bool {
        let empty = |b: Option<&Bucket>| b.is_some_and(|b| b.level(now) < 1.0);
        empty(self.by_addr.get(&addr)) || empty(self.by_id.get(id))
    }

    fn failed(&mut self, addr: IpAddr, id: &str, now: Instant) {
        fn drain<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Bucket>, key: K, now: Instant) {
            if map.len() >= THROTTLE_MAX {
                map.retain(|_, b| b.level(now) < FAILURE_BURST);
                if map.len() >= THROTTLE_MAX {
                    map.clear();
                }
            }
            let b = map.entry(key).or_insert(Bucket {
                tokens: FAILURE_BURST,
                at: now,
            });
            b.tokens = (b.level(now) - 1.0).max(0.0);
            b.at = now;
        }
        drain(&mut self.by_addr, addr, now);
        drain(&mut self.by_id, id.to_string(), now);
    }

    fn barrier_due(&mut self, id: &str, now: Instant) -> bool {
        if self
            .barriers
            .get(id)
            .is_some_and(|t| now.saturating_duration_since(*t) < BARRIER_EVERY)
        {
            return false;
        }
        if self.barriers.len() >= THROTTLE_MAX {
            self.barriers
                .retain(|_, t| now.saturating_duration_since(*t) < BARRIER_EVERY);
            if self.barriers.len() >= THROTTLE_MAX {
                self.barriers.clear();
            }
        }
        self.barriers.insert(id.to_string(), now);
        true
    }
}

/// Lets a kind of log line through at most once a second, saying how many
/// were held back since: a flood of bad clients cannot flood the log.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    kinds: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl LogLimiter {
    /// `Some(suppressed since the last line)` if a line of `kind` may be
    /// written now.
    pub(crate) fn allow(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, held) = kinds.entry(kind).or_insert((None, 0));
        if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
            *held += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_drain_a_budget_that_refills() {
        let mut t = Throttle::default();
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        for i in 0..10 {
            assert!(!t.over_budget(a, &format!("d{i}"), now), "attempt {i}");
            t.failed(a, &format!("d{i}"), now);
        }
        assert!(
            t.over_budget(a, "other", now),
            "the address is out of budget"
        );
        assert!(!t.over_budget(b, "other", now), "another address is not");
        assert!(
            !t.over_budget(a, "other", now + Duration::from_secs(2)),
            "it refills"
        );
        for _ in 0..10 {
            t.failed(b, "victim", now);
        }
        assert!(
            t.over_budget([10, 0, 0, 3].into(), "victim", now),
            "per device id too"
        );
    }

    #[test]
    fn one_barrier_per_id_per_period() {
        let mut t = Throttle::default();
        let now = Instant::now();
        assert!(t.barrier_due("d", now));
        assert!(!t.barrier_due("d", now + Duration::from_secs(1)));
        assert!(t.barrier_due("e", now));
        assert!(t.barrier_due("d", now + BARRIER_EVERY));
    }

    #[test]
    fn log_lines_are_rate_limited() {
        let l = LogLimiter::default();
        assert_eq!(l.allow("x"), Some(0));
        assert_eq!(l.allow("x"), None);
        assert_eq!(l.allow("x"), None);
        assert_eq!(l.allow("y"), Some(0));
    }
}
