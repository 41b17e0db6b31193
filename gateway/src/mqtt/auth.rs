//! Device authentication at CONNECT: client id = username = a registered
//! device id, password = its secret (compared by SHA-256 hash).
//!
//! rumqttd calls the handler in the connection's own task, so a slow lookup
//! never holds up the accept loop; the secret hashes are cached so 10,000
//! devices reconnecting at once cost one database read each at most once.
//! The cache is invalidated by the registry's events (registration, secret
//! rotation, deletion) and cleared when the event stream lagged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::MqttStats;
use crate::state::StateDb;

/// Checks device logins against the registry.
#[derive(Debug)]
pub(crate) struct Authenticator {
    db: Arc<StateDb>,
    stats: Arc<MqttStats>,
    /// Device id → SHA-256 (hex) of its secret.
    cache: Mutex<HashMap<String, String>>,
    /// Bumped on every invalidation, so a lookup that raced one is not cached.
    generation: AtomicU64,
}

impl Authenticator {
    pub(crate) fn new(db: Arc<StateDb>, stats: Arc<MqttStats>) -> Authenticator {
        Authenticator {
            db,
            stats,
            cache: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// Whether this login may connect.
    pub(crate) async fn check(&self, client_id: &str, username: &str, password: &str) -> bool {
        let ok = self.check_inner(client_id, username, password).await;
        if !ok {
            self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                client_id,
                username,
                "MQTT login refused (client id and username must be a registered device id, \
                 password its secret)"
            );
        }
        ok
    }

    async fn check_inner(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id != username || !crate::api::validate::id_ok(client_id) {
            return false;
        }
        let given = crate::hash_secret(password);
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
