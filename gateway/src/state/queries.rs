//! Read queries used by the API and the gateway's background tasks.
//!
//! Each holds the pool's read lock for its duration, so during a snapshot
//! restore it waits for the new database instead of failing.

use coordinator::raft::Index;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::rows::{
    COMMAND_COLS, DEVICE_COLS, SHADOW_COLS, command_from_row, db_int, device_from_row, from_db_int,
    load_applied_index, load_command, load_device, load_shadow, parse_json, shadow_from_row,
};
use super::{DeviceCredentials, DeviceFilter, Page, StateDb, StateError, resumable_after};
use crate::ops::{Command, CommandStatus, Device, Event, Role, Shadow, TokenInfo};

/// `devices` as one JSON array, bound as a single parameter and read with
/// `json_each`: a query's text is the same for every list length.
fn json_list(devices: &[String]) -> Result<String, StateError> {
    serde_json::to_string(devices).map_err(|e| StateError::Corrupt(e.to_string()))
}

/// What authenticating a request needs of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAuth {
    /// Its id.
    pub id: String,
    /// What it may do.
    pub role: Role,
    /// When it stops working (ms since the epoch), if ever.
    pub expires_at: Option<u64>,
}

fn parse_role(r: &str) -> Result<Role, StateError> {
    Role::parse(r).ok_or_else(|| StateError::Corrupt(format!("unknown token role {r:?}")))
}

impl StateDb {
    /// A device.
    pub async fn device(&self, id: &str) -> Result<Option<Device>, StateError> {
        let pool = self.pool.read().await;
        let mut conn = pool.acquire().await?;
        load_device(&mut conn, id).await
    }

    /// The SHA-256 (hex) of a device's secret (`None` if the device does not
    /// exist), for authenticating its MQTT session.
    pub async fn device_secret_hash(&self, id: &str) -> Result<Option<String>, StateError> {
        let pool = self.pool.read().await;
        Ok(
            sqlx::query_scalar("SELECT secret_hash FROM devices WHERE id = ?")
                .bind(id)
                .fetch_optional(&*pool)
                .await?,
        )
    }

    /// What a device may log in with (`None` if the device does not exist).
    pub async fn device_credentials(
        &self,
        id: &str,
    ) -> Result<Option<DeviceCredentials>, StateError> {
        let pool = self.pool.read().await;
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT secret_hash, cert_sha256 FROM devices WHERE id = ?")
                .bind(id)
                .fetch_optional(&*pool)
                .await?;
        Ok(row.map(|(secret_hash, cert_sha256)| DeviceCredentials {
            secret_hash,
            cert_sha256,
        }))
    }

    /// Devices matching `filter`, ordered by id, one page.
    pub async fn list_devices(
        &self,
        filter: &DeviceFilter,
        page: &Page,
    ) -> Result<Vec<Device>, StateError> {
        let mut qb: QueryBuilder<'_, Sqlite> =
            QueryBuilder::new(format!("SELECT {DEVICE_COLS} FROM devices d WHERE 1 = 1"));
        if let Some(after) = &page.after {
            qb.push(" AND d.id > ").push_bind(after.as_str());
        }
        if let Some(online) = filter.online {
            qb.push(" AND d.online = ").push_bind(i64::from(online));
        }
        if let Some((key, value)) = &filter.label {
            qb.push(
                " AND EXISTS (SELECT 1 FROM device_labels l WHERE l.device = d.id AND l.key = ",
            )
            .push_bind(key.as_str())
            .push(" AND l.value = ")
            .push_bind(value.as_str())
            .push(")");
        }
        qb.push(" ORDER BY d.id LIMIT ")
            .push_bind(i64::from(page.limit));
        let pool = self.pool.read().await;
        let rows = qb.build().fetch_all(&*pool).await?;
        rows.iter().map(device_from_row).collect()
    }

    /// A device's shadow (`None` if the device does not exist).
    pub async fn shadow(&self, device: &str) -> Result<Option<Shadow>, StateError> {
        let pool = self.pool.read().await;
        let mut conn = pool.acquire().await?;
        Ok(load_shadow(&mut conn, device)
            .await?
            .map(|s| s.into_shadow()))
    }

    /// The shadows of those of `devices` that exist, in one query (keep
    /// the list short: each shadow holds up to two 64 KiB documents). The
    /// list is bound as one JSON array, so the statement's text, and the
    /// one statement cached for it, is the same for every length.
    pub async fn shadows(&self, devices: &[String]) -> Result<Vec<Shadow>, StateError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let list = json_list(devices)?;
        let sql = format!(
            "SELECT {SHADOW_COLS} FROM shadows WHERE device IN (SELECT value FROM json_each(?))"
        );
        let pool = self.pool.read().await;
        let rows = sqlx::query(&sql).bind(list).fetch_all(&*pool).await?;
        rows.iter()
            .map(|r| shadow_from_row(r).map(|s| s.into_shadow()))
            .collect()
    }

    /// Those of `devices` that have commands a device is sent again when it
    /// subscribes (`queued`, `sent` or `accepted`), in one query (the list
    /// bound as one JSON array, as in [`StateDb::shadows`]).
    pub async fn devices_with_open_commands(
        &self,
        devices: &[String],
    ) -> Result<Vec<String>, StateError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let list = json_list(devices)?;
        let rows = {
            let pool = self.pool.read().await;
            sqlx::query(
                "SELECT DISTINCT device FROM commands \
                 WHERE device IN (SELECT value FROM json_each(?)) AND status IN (?, ?, ?)",
            )
            .bind(list)
            .bind(CommandStatus::Queued.as_str())
            .bind(CommandStatus::Sent.as_str())
            .bind(CommandStatus::Accepted.as_str())
            .fetch_all(&*pool)
            .await?
        };
        rows.iter()
            .map(|r| r.try_get::<String, _>("device").map_err(StateError::from))
            .collect()
    }

    /// A command.
    pub async fn command(&self, cid: &str) -> Result<Option<Command>, StateError> {
        let pool = self.pool.read().await;
        let mut conn = pool.acquire().await?;
        load_command(&mut conn, cid).await
    }

    /// A device's commands, optionally of one status, ordered by id, one page.
    pub async fn list_commands(
        &self,
        device: &str,
        status: Option<CommandStatus>,
        page: &Page,
    ) -> Result<Vec<Command>, StateError> {
        let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE device = "
        ));
        qb.push_bind(device);
        if let Some(status) = status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(after) = &page.after {
            qb.push(" AND id > ").push_bind(after.as_str());
        }
        qb.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(page.limit));
        let pool = self.pool.read().await;
        let rows = qb.build().fetch_all(&*pool).await?;
        rows.iter().map(command_from_row).collect()
    }

    /// Every device's commands that pass `filter`, ordered by id, one page.
    pub async fn list_all_commands(
        &self,
        filter: &super::CommandFilter,
        page: &Page,
    ) -> Result<Vec<Command>, StateError> {
        let mut qb: QueryBuilder<'_, Sqlite> =
            QueryBuilder::new(format!("SELECT {COMMAND_COLS} FROM commands WHERE 1 = 1"));
        if let Some(status) = filter.status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(device) = &filter.device {
            qb.push(" AND device = ").push_bind(device.clone());
        }
        if let Some(job) = &filter.job {
            qb.push(" AND id IN (SELECT command FROM job_executions WHERE job = ")
                .push_bind(job.clone())
                .push(" AND command IS NOT NULL)");
        }
        if let Some(t) = filter.created_after {
            qb.push(" AND issued_at > ")
                .push_bind(i64::try_from(t).unwrap_or(i64::MAX));
        }
        if let Some(after) = &page.after {
            qb.push(" AND id > ").push_bind(after.clone());
        }
        qb.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(page.limit));
        let pool = self.pool.read().await;
        let rows = qb.build().fetch_all(&*pool).await?;
        rows.iter().map(command_from_row).collect()
    }

    /// Commands still waiting for their device (`queued`, `sent` or
    /// `accepted`) whose last change is older than `before_ms`, oldest
    /// first, at most `limit`: what the MQTT side delivers again to devices
    /// connected to it.
    pub async fn stale_commands(
        &self,
        before_ms: u64,
        limit: u32,
    ) -> Result<Vec<Command>, StateError> {
        let pool = self.pool.read().await;
        let rows = sqlx::query(&format!(
            "SELECT {COMMAND_COLS} FROM commands \
             WHERE status IN ('queued', 'sent', 'accepted') AND updated_at < ? \
             ORDER BY updated_at LIMIT ?"
        ))
        .bind(i64::try_from(before_ms).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&*pool)
        .await?;
        rows.iter().map(command_from_row).collect()
    }

    /// The role of the token with this SHA-256 (hex), if any (whether or
    /// not it expired).
    pub async fn token_role(&self, token_hash: &str) -> Result<Option<Role>, StateError> {
        Ok(self.token(token_hash).await?.map(|t| t.role))
    }

    /// The token with this SHA-256 (hex), if any (whether or not it
    /// expired: the caller compares [`TokenAuth::expires_at`] with its
    /// clock).
    ///
    /// Tokens found are cached: every REST request authenticates, and a
    /// read through the pool is a hand-off to another thread and back. The
    /// cache is dropped whenever an applied batch creates, revokes or
    /// rotates a token, or a snapshot replaces the state, before the
    /// applied index moves — so a token check never answers from before a
    /// change this gateway has applied. Unknown tokens are not cached.
    pub async fn token(&self, token_hash: &str) -> Result<Option<TokenAuth>, StateError> {
        let generation = self
            .tokens_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        if let Some(found) = self
            .token_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(token_hash)
            .filter(|(g, _)| *g == generation)
        {
            return Ok(Some(found.1.clone()));
        }
        let found = self.token_uncached(token_hash).await?;
        if let Some(t) = &found {
            let mut cache = self
                .token_cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Only if no change was applied meanwhile.
            if self
                .tokens_generation
                .load(std::sync::atomic::Ordering::SeqCst)
                == generation
            {
                if cache.len() >= super::TOKEN_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(token_hash.to_string(), (generation, t.clone()));
            }
        }
        Ok(found)
    }

    async fn token_uncached(&self, token_hash: &str) -> Result<Option<TokenAuth>, StateError> {
        let pool = self.pool.read().await;
        let row: Option<(String, String, Option<i64>)> =
            sqlx::query_as("SELECT id, role, expires_at FROM tokens WHERE token_hash = ?")
                .bind(token_hash)
                .fetch_optional(&*pool)
                .await?;
        row.map(|(id, role, expires_at)| {
            Ok(TokenAuth {
                id,
                role: parse_role(&role)?,
                expires_at: expires_at
                    .map(|e| from_db_int(e, "tokens.expires_at"))
                    .transpose()?,
            })
        })
        .transpose()
    }

    /// Every token (never its hash), by id.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, StateError> {
        let pool = self.pool.read().await;
        /// id, name, role, created_at, expires_at, last_used.
        type Row = (String, String, String, i64, Option<i64>, Option<i64>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, name, role, created_at, expires_at, last_used FROM tokens ORDER BY id",
        )
        .fetch_all(&*pool)
        .await?;
        rows.into_iter()
            .map(|(id, name, role, created, expires, used)| {
                Ok(TokenInfo {
                    id,
                    name,
                    role: parse_role(&role)?,
                    created_at: from_db_int(created, "tokens.created_at")?,
                    expires_at: expires
                        .map(|e| from_db_int(e, "tokens.expires_at"))
                        .transpose()?,
                    last_used: used
                        .map(|u| from_db_int(u, "tokens.last_used"))
                        .transpose()?,
                })
            })
            .collect()
    }

    /// Peer addresses recorded by `SetPeerAddress`, by node id.
    pub async fn peer_addresses(&self) -> Result<Vec<(u64, String)>, StateError> {
        let pool = self.pool.read().await;
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, address FROM peers ORDER BY id")
            .fetch_all(&*pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, a)| (u64::try_from(id).unwrap_or_default(), a))
            .collect())
    }

    /// Whether a token with this hash exists.
    pub async fn token_hash_exists(&self, token_hash: &str) -> Result<bool, StateError> {
        let pool = self.pool.read().await;
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tokens WHERE token_hash = ?)")
                .bind(token_hash)
                .fetch_one(&*pool)
                .await?,
        )
    }

    /// Whether any token exists.
    pub async fn has_tokens(&self) -> Result<bool, StateError> {
        let pool = self.pool.read().await;
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tokens)")
            .fetch_one(&*pool)
            .await?)
    }

    /// Events with index greater than `after`, oldest first, at most `limit`.
    ///
    /// Each log entry that changed something has exactly one event, so
    /// resuming with the last index received loses and repeats nothing (as
    /// long as it is within the retained window, [`super::EVENTS_RETAINED`]
    /// indexes behind the applied index).
    pub async fn events_since(&self, after: Index, limit: u32) -> Result<Vec<Event>, StateError> {
        self.events_since_bounded(after, limit, usize::MAX).await
    }

    /// [`StateDb::events_since_bounded`], checked: `Err(oldest)` if events
    /// after `after` were already dropped (see [`resumable_after`]), where
    /// `oldest` is the lowest index a stream can still resume after. The
    /// check and the read are one read transaction, so a prune committed
    /// meanwhile cannot slip between them.
    pub async fn events_since_checked(
        &self,
        after: Index,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Result<Vec<Event>, Index>, StateError> {
        use tokio_stream::StreamExt;
        let pool = self.pool.read().await;
        let mut tx = pool.begin().await?;
        let applied = load_applied_index(&mut tx).await?;
        let oldest = resumable_after(applied);
        if after < oldest {
            return Ok(Err(oldest));
        }
        let mut events = Vec::new();
        {
            let mut rows = sqlx::query(
                "SELECT idx, kind, data, actor FROM events WHERE idx > ? ORDER BY idx LIMIT ?",
            )
            .bind(db_int(after))
            .bind(i64::from(limit))
            .fetch(&mut *tx);
            let mut bytes = 0usize;
            while let Some(row) = rows.next().await {
                let r = row?;
                let data: String = r.try_get("data")?;
                bytes = bytes.saturating_add(data.len());
                events.push(Event {
                    index: from_db_int(r.try_get("idx")?, "events.idx")?,
                    kind: r.try_get("kind")?,
                    data: parse_json(&data, "events.data")?,
                    by: r.try_get("actor")?,
                });
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        tx.rollback().await?;
        Ok(Ok(events))
    }

    /// [`StateDb::events_since`], stopping after the event that brings the
    /// stored data read to `max_bytes` (so at least one event, if any): what
    /// an event stream holds in memory per batch stays bounded however large
    /// the events are.
    pub async fn events_since_bounded(
        &self,
        after: Index,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<Event>, StateError> {
        use tokio_stream::StreamExt;
        let pool = self.pool.read().await;
        let mut rows = sqlx::query(
            "SELECT idx, kind, data, actor FROM events WHERE idx > ? ORDER BY idx LIMIT ?",
        )
        .bind(db_int(after))
        .bind(i64::from(limit))
        .fetch(&*pool);
        let mut events = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().await {
            let r = row?;
            let data: String = r.try_get("data")?;
            bytes = bytes.saturating_add(data.len());
            events.push(Event {
                index: from_db_int(r.try_get("idx")?, "events.idx")?,
                kind: r.try_get("kind")?,
                data: parse_json(&data, "events.data")?,
                by: r.try_get("actor")?,
            });
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(events)
    }

    /// How many commands are in each status (every status, zeros included,
    /// in lifecycle order).
    pub async fn command_counts(&self) -> Result<Vec<(CommandStatus, u64)>, StateError> {
        let pool = self.pool.read().await;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM commands GROUP BY status")
                .fetch_all(&*pool)
                .await?;
        let mut counts: Vec<(CommandStatus, u64)> =
            CommandStatus::ALL.iter().map(|s| (*s, 0)).collect();
        for (status, n) in rows {
            let status = CommandStatus::parse(&status)
                .ok_or_else(|| StateError::Corrupt(format!("unknown command status {status:?}")))?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == status) {
                slot.1 = from_db_int(n, "command count")?;
            }
        }
        Ok(counts)
    }

    /// Ids of non-terminal commands with `expires_at <= now_ms`, at most
    /// `limit`, earliest expiry first.
    pub async fn expired_commands(
        &self,
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<String>, StateError> {
        let pool = self.pool.read().await;
        Ok(sqlx::query_scalar(
            "SELECT id FROM commands WHERE status IN ('queued', 'sent', 'accepted') \
             AND expires_at <= ? ORDER BY expires_at, id LIMIT ?",
        )
        .bind(db_int(now_ms))
        .bind(i64::from(limit))
        .fetch_all(&*pool)
        .await?)
    }
}
