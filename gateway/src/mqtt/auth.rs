//! Device authentication at CONNECT: client id = username = a registered
//! device id, password = its secret (compared by SHA-256 hash).
//!
//! rumqttd calls the handler in the connection's own task, so a slow lookup
//! never holds up the accept loop; the secret hashes are cached so 10,000
//! devices reconnecting at once cost one database read each at most once.
//! The cache is invalidated by the registry's events (registration, secret
//! rotation, deletion) and cleared when the event stream lagged.
//!
//! This gateway's copy of the registry may be a little behind the group: a
//! device registered (or given a new secret) through another gateway a
//! moment ago may not be applied here yet. So a login that fails against the
//! local copy is checked once more after a read barrier (ReadIndex: wait
//! until everything committed before the login is applied here) before it is
//! refused. Without a quorum the barrier fails and the login is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::Duration;

use coordinator::node::Node;

use super::MqttStats;
use crate::ops::OpResult;
use crate::state::StateDb;

/// Longest wait for the read barrier of a login that failed locally.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks device logins against the registry.
#[derive(Debug)]
pub(crate) struct Authenticator {
    db: Arc<StateDb>,
    node: Node<OpResult>,
    stats: Arc<MqttStats>,
    /// Device id → SHA-256 (hex) of its secret.
    cache: Mutex<HashMap<String, String>>,
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
            generation: AtomicU64::new(0),
        }
    }

    /// Whether this login may connect.
    pub(crate) async fn check(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id != username || !crate::api::validate::id_ok(client_id) {
            self.refused(client_id, username);
            return false;
        }
        let given = crate::hash_secret(password);
        if self.matches(client_id, &given).await {
            return true;
        }
        // Perhaps registered or rotated elsewhere and not applied here yet.
        if self.barrier().await {
            self.invalidate(client_id);
            if self.matches(client_id, &given).await {
                return true;
            }
        }
        self.refused(client_id, username);
        false
    }

    fn refused(&self, client_id: &str, username: &str) {
        self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            client_id,
            username,
            "MQTT login refused (client id and username must be a registered device id, \
             password its secret)"
        );
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

    /// Whether `given` is the stored secret hash of `client_id` (cached).
    async fn matches(&self, client_id: &str, given: &str) -> bool {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(client_id)
            .cloned();
        let stored = match cached {
            Some(h) => h,
            None => {
                let generation = self.generation.load(Ordering::SeqCst);
                match self.db.device_secret_hash(client_id).await {
                    Ok(Some(h)) => {
                        if self.generation.load(Ordering::SeqCst) == generation {
                            self.cache
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(client_id.to_string(), h.clone());
                        }
                        h
                    }
                    Ok(None) => return false,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading a device secret for an MQTT login");
                        return false;
                    }
                }
            }
        };
        // Constant time in the hash (not that a hash prefix would help much).
        given.len() == stored.len()
            && given
                .bytes()
                .zip(stored.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Forgets one device's cached secret.
    pub(crate) fn invalidate(&self, device: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(device);
    }

    /// Forgets every cached secret.
    pub(crate) fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}
