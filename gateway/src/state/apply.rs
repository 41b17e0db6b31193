//! Applying committed entries: one transaction per batch, deterministic.

use std::collections::{BTreeMap, HashMap, HashSet};

use coordinator::node::Committed;
use coordinator::raft::Index;
use serde_json::Value;
use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection};

use super::change::{Change, CommandStep, ShadowSide};
use super::rows::{
    db_int, load_applied_index, load_command, load_device, load_shadow, store_applied_index,
    to_json_text,
};
use super::{EVENTS_RETAINED, StateDb, StateError};
use crate::limits::{self, MAX_DOCUMENT_BYTES};
use crate::ops::{
    Command, CommandStatus, Device, DeviceRegistration, Event, MAX_CONFLICTS_LISTED, Op, OpResult,
    Proposal, Role,
};

impl StateDb {
    /// Applies a batch of committed entries in one transaction and records
    /// `last_index`. Returns one result per entry. An entry that does not
    /// decode is an error (`StateError::Corrupt`, naming its index and
    /// format) and nothing of the batch is applied: the node driver stops
    /// on it.
    ///
    /// Entries at or below the applied index are skipped with
    /// `OpResult::Ignored` (exactly-once). Each entry that changed something
    /// yields one [`Event`]; the events are stored in the same transaction and
    /// broadcast (and the applied-index watch updated) after the commit.
    pub async fn apply(
        &self,
        entries: Vec<Committed>,
        last_index: Index,
    ) -> Result<Vec<OpResult>, StateError> {
        let mut writer = self.writer.lock().await;
        let conn = match &mut *writer {
            Some(conn) => conn,
            empty => empty.insert(super::open_writer(&self.dir.join(super::DB_FILE)).await?),
        };
        let mut tx = conn.begin().await?;
        let start = load_applied_index(&mut tx).await?;
        let mut mark = start;
        let mut results = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        let mut changes = Vec::new();
        for entry in &entries {
            if entry.index <= mark {
                results.push(OpResult::Ignored);
                continue;
            }
            mark = entry.index;
            let proposal = match Proposal::decode(&entry.data) {
                Ok(p) => p,
                Err(e) => {
                    // Every member applies the same entries: one this
                    // gateway cannot read (a newer version's format, or
                    // damage) must stop it, not be skipped — skipping would
                    // make its state differ from its peers' for good.
                    // Nothing of this batch is committed: rolled back
                    // here, not left to the transaction's drop (which
                    // finishes later, holding the write lock meanwhile).
                    tx.rollback().await?;
                    return Err(StateError::Corrupt(format!(
                        "committed entry {} cannot be decoded by this gateway ({}; this gateway \
                         reads entry format {}): {e}; it stops here — upgrade it to the version \
                         of the gateway that proposed the entry",
                        entry.index,
                        crate::ops::describe_format(&entry.data),
                        crate::ops::ENTRY_FORMAT
                    )));
                }
            };
            let (result, change) = apply_op(&mut tx, proposal.ts_ms, &proposal.op).await?;
            if let Some(change) = change {
                debug_assert_eq!(change.kind(), proposal.op.kind());
                events.push(Event {
                    index: entry.index,
                    kind: change.kind().to_string(),
                    data: change.data()?,
                });
                changes.push(change);
            }
            results.push(result);
        }
        let new_applied = mark.max(last_index);
        if new_applied == start {
            // Nothing new: no write, no commit needed.
            tx.rollback().await?;
            return Ok(results);
        }
        // Up to ROWS_PER_STATEMENT events per statement: one hand-off to
        // SQLite's thread for a batch's events, not one per event (an event
        // row per write was 12–14 % of a write's CPU). Not kept among the
        // cached statements, whose text varies with the count.
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let rows = chunk
                .iter()
                .map(|ev| Ok((ev, to_json_text(&ev.data)?)))
                .collect::<Result<Vec<_>, StateError>>()?;
            let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO events (idx, kind, data) ");
            q.push_values(rows, |mut row, (ev, data)| {
                row.push_bind(db_int(ev.index))
                    .push_bind(ev.kind.as_str())
                    .push_bind(data);
            });
            q.build().persistent(false).execute(&mut *tx).await?;
        }
        let floor = new_applied.saturating_sub(EVENTS_RETAINED);
        if floor > 0 {
            sqlx::query("DELETE FROM events WHERE idx < ?")
                .bind(db_int(floor))
                .execute(&mut *tx)
                .await?;
        }
        store_applied_index(&mut tx, new_applied).await?;
        tx.commit().await?;
        drop(writer);
        self.applied.send_replace(new_applied);
        // No subscriber is fine.
        for change in changes {
            let _ = self.changes.send(change);
        }
        for ev in events {
            let _ = self.events.send(ev);
        }
        Ok(results)
    }
}

/// What one operation did: its result and, if it changed something, the
/// change (which the public event renders).
type Applied = (OpResult, Option<Change>);

fn not_found_device(id: &str) -> Applied {
    (OpResult::NotFound(format!("device {id}")), None)
}

fn not_found_command(cid: &str) -> Applied {
    (OpResult::NotFound(format!("command {cid}")), None)
}

/// Applies one operation at time `ts` (the proposer's stamp).
async fn apply_op(conn: &mut SqliteConnection, ts: u64, op: &Op) -> Result<Applied, StateError> {
    match op {
        Op::BootstrapAdmin { token_hash } => {
            let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tokens)")
                .fetch_one(&mut *conn)
                .await?;
            if any {
                return Ok((OpResult::Ignored, None));
            }
            insert_token(conn, ts, token_hash, Role::Admin, "bootstrap admin").await
        }
        Op::CreateToken {
            token_hash,
            role,
            name,
        } => {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tokens WHERE token_hash = ?)")
                    .bind(token_hash)
                    .fetch_one(&mut *conn)
                    .await?;
            if exists {
                return Ok((
                    OpResult::Conflict("a token with this hash already exists".into()),
                    None,
                ));
            }
            insert_token(conn, ts, token_hash, *role, name).await
        }
        Op::RegisterDevice {
            id,
            secret_hash,
            labels,
            attributes,
            cert_sha256,
        } => {
            let device = NewDeviceRow {
                id,
                secret_hash,
                labels,
                attributes,
                cert_sha256: cert_sha256.as_deref(),
            };
            register_device(conn, ts, device).await
        }
        Op::RegisterDevices { devices } => register_devices(conn, ts, devices).await,
        Op::UpdateDevice {
            id,
            labels,
            attributes,
            cert_sha256,
        } => {
            if load_device(conn, id).await?.is_none() {
                return Ok(not_found_device(id));
            }
            if let Some(cert) = cert_sha256 {
                if let Some(conflict) = cert_taken(conn, cert.as_deref(), id).await? {
                    return Ok(conflict);
                }
                sqlx::query("UPDATE devices SET cert_sha256 = ? WHERE id = ?")
                    .bind(cert.as_deref())
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
            }
            if let Some(labels) = labels {
                sqlx::query("UPDATE devices SET labels = ? WHERE id = ?")
                    .bind(to_json_text(labels)?)
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                write_labels(conn, id, labels).await?;
            }
            if let Some(attributes) = attributes {
                sqlx::query("UPDATE devices SET attributes = ? WHERE id = ?")
                    .bind(to_json_text(attributes)?)
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
            }
            touch_device(conn, id, ts).await?;
            device_changed(conn, id, Change::DeviceUpdated).await
        }
        Op::DeleteDevice { id } => {
            if load_device(conn, id).await?.is_none() {
                return Ok(not_found_device(id));
            }
            // The foreign keys cascade too; deleting explicitly keeps this
            // independent of the connection's foreign-key setting.
            for sql in [
                "DELETE FROM commands WHERE device = ?",
                "DELETE FROM shadows WHERE device = ?",
                "DELETE FROM device_labels WHERE device = ?",
                "DELETE FROM devices WHERE id = ?",
            ] {
                sqlx::query(sql).bind(id).execute(&mut *conn).await?;
            }
            Ok((
                OpResult::Done,
                Some(Change::DeviceDeleted { id: id.clone() }),
            ))
        }
        Op::RotateSecret { id, secret_hash } => {
            if load_device(conn, id).await?.is_none() {
                return Ok(not_found_device(id));
            }
            sqlx::query("UPDATE devices SET secret_hash = ?, updated_at = ? WHERE id = ?")
                .bind(secret_hash)
                .bind(db_int(ts))
                .bind(id)
                .execute(&mut *conn)
                .await?;
            let device = must_device(conn, id).await?;
            Ok((
                OpResult::Device(device),
                Some(Change::SecretRotated { id: id.clone() }),
            ))
        }
        Op::IssueCommand {
            cid,
            device,
            name,
            params,
            ttl_ms,
            idempotency_key,
        } => {
            issue_command(
                conn,
                ts,
                cid,
                device,
                name,
                params,
                *ttl_ms,
                idempotency_key.as_deref(),
            )
            .await
        }
        Op::CommandSent { cid, gateway: _ } => {
            let Some(cmd) = load_command(conn, cid).await? else {
                return Ok(not_found_command(cid));
            };
            if cmd.status != CommandStatus::Queued {
                return Ok((OpResult::Ignored, None));
            }
            transition(conn, ts, cid, CommandStatus::Sent, None, CommandStep::Sent).await
        }
        Op::CommandAccepted { cid } => {
            let Some(cmd) = load_command(conn, cid).await? else {
                return Ok(not_found_command(cid));
            };
            if !matches!(cmd.status, CommandStatus::Queued | CommandStatus::Sent) {
                return Ok((OpResult::Ignored, None));
            }
            let step = CommandStep::Accepted;
            transition(conn, ts, cid, CommandStatus::Accepted, None, step).await
        }
        Op::CommandResult {
            cid,
            succeeded,
            output,
        } => {
            let Some(cmd) = load_command(conn, cid).await? else {
                return Ok(not_found_command(cid));
            };
            if cmd.status.is_terminal() {
                return Ok((OpResult::Ignored, None));
            }
            let status = if *succeeded {
                CommandStatus::Succeeded
            } else {
                CommandStatus::Failed
            };
            transition(conn, ts, cid, status, Some(output), CommandStep::Result).await
        }
        Op::CancelCommand { cid } => {
            let Some(cmd) = load_command(conn, cid).await? else {
                return Ok(not_found_command(cid));
            };
            if cmd.status.is_terminal() {
                return Ok((
                    OpResult::Conflict(format!("command is already {}", cmd.status.as_str())),
                    None,
                ));
            }
            let step = CommandStep::Canceled;
            transition(conn, ts, cid, CommandStatus::Canceled, None, step).await
        }
        Op::ExpireCommands { cids } => {
            let mut expired = Vec::new();
            for cid in cids {
                let Some(cmd) = load_command(conn, cid).await? else {
                    continue;
                };
                if cmd.status.is_terminal() || cmd.expires_at > ts {
                    continue;
                }
                set_status(conn, ts, cid, CommandStatus::Expired, None).await?;
                expired.push(must_command(conn, cid).await?);
            }
            if expired.is_empty() {
                return Ok((OpResult::Ignored, None));
            }
            Ok((OpResult::Done, Some(Change::CommandsExpired(expired))))
        }
        Op::SetDesired {
            device,
            patch,
            expected_version,
        } => {
            let Some(mut sh) = load_shadow(conn, device).await? else {
                return Ok(not_found_device(device));
            };
            if let Some(v) = expected_version
                && *v != sh.version
            {
                return Ok((
                    OpResult::VersionMismatch {
                        current: sh.version,
                    },
                    None,
                ));
            }
            if !patch.is_object() {
                return Ok((
                    OpResult::Conflict("a desired-state patch must be a JSON object".into()),
                    None,
                ));
            }
            let text =
                match merge_within_limits(&mut sh.desired, sh.desired_bytes, patch, "desired")? {
                    Ok(text) => text,
                    Err(why) => return Ok((OpResult::TooLarge(why), None)),
                };
            stamp_keys(&mut sh.desired_updated, patch, ts);
            sh.version = sh.version.saturating_add(1);
            sqlx::query(
                "UPDATE shadows SET desired = ?, desired_updated = ?, version = ? WHERE device = ?",
            )
            .bind(text)
            .bind(to_json_text(&sh.desired_updated)?)
            .bind(db_int(sh.version))
            .bind(device)
            .execute(&mut *conn)
            .await?;
            let change = shadow_change(ShadowSide::Desired, device, sh.version, patch);
            Ok((OpResult::Shadow(sh.into_shadow()), Some(change)))
        }
        Op::ReportState { device, patch } => {
            let Some(mut sh) = load_shadow(conn, device).await? else {
                return Ok(not_found_device(device));
            };
            if !patch.is_object() {
                return Ok((
                    OpResult::Conflict("a reported-state patch must be a JSON object".into()),
                    None,
                ));
            }
            let text = match merge_within_limits(
                &mut sh.reported,
                sh.reported_bytes,
                patch,
                "reported",
            )? {
                Ok(text) => text,
                Err(why) => {
                    tracing::debug!(device, "reported-state patch refused: {why}");
                    return Ok((OpResult::TooLarge(why), None));
                }
            };
            stamp_keys(&mut sh.reported_updated, patch, ts);
            sqlx::query("UPDATE shadows SET reported = ?, reported_updated = ? WHERE device = ?")
                .bind(text)
                .bind(to_json_text(&sh.reported_updated)?)
                .bind(device)
                .execute(&mut *conn)
                .await?;
            let change = shadow_change(ShadowSide::Reported, device, sh.version, patch);
            Ok((OpResult::Shadow(sh.into_shadow()), Some(change)))
        }
        Op::Presence {
            device,
            gateway,
            epoch,
            online,
        } => presence(conn, ts, device, *gateway, *epoch, *online).await,
        Op::SetPeerAddress { id, address } => {
            sqlx::query(
                "INSERT INTO peers (id, address) VALUES (?, ?) \
                 ON CONFLICT (id) DO UPDATE SET address = excluded.address",
            )
            .bind(db_int(*id))
            .bind(address)
            .execute(&mut *conn)
            .await?;
            Ok((
                OpResult::Done,
                Some(Change::PeerAddress {
                    id: *id,
                    address: address.clone(),
                }),
            ))
        }
        Op::GatewaySessionsLost { gateway } => {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM devices WHERE online = 1 AND gateway = ? ORDER BY id",
            )
            .bind(db_int(*gateway))
            .fetch_all(&mut *conn)
            .await?;
            if ids.is_empty() {
                return Ok((OpResult::Ignored, None));
            }
            sqlx::query(
                "UPDATE devices SET online = 0, gateway = NULL, updated_at = ? \
                 WHERE online = 1 AND gateway = ?",
            )
            .bind(db_int(ts))
            .bind(db_int(*gateway))
            .execute(&mut *conn)
            .await?;
            Ok((
                OpResult::Done,
                Some(Change::SessionsLost {
                    gateway: *gateway,
                    devices: ids,
                }),
            ))
        }
    }
}

async fn insert_token(
    conn: &mut SqliteConnection,
    ts: u64,
    token_hash: &str,
    role: Role,
    name: &str,
) -> Result<Applied, StateError> {
    sqlx::query("INSERT INTO tokens (token_hash, role, name, created_at) VALUES (?, ?, ?, ?)")
        .bind(token_hash)
        .bind(role.as_str())
        .bind(name)
        .bind(db_int(ts))
        .execute(&mut *conn)
        .await?;
    // The change (and the event) never carries the hash.
    Ok((
        OpResult::Done,
        Some(Change::Token {
            role,
            name: name.to_string(),
        }),
    ))
}

/// A device to register (the fields of `Op::RegisterDevice`).
struct NewDeviceRow<'a> {
    id: &'a str,
    secret_hash: &'a str,
    labels: &'a BTreeMap<String, String>,
    attributes: &'a Value,
    cert_sha256: Option<&'a str>,
}

async fn register_device(
    conn: &mut SqliteConnection,
    ts: u64,
    d: NewDeviceRow<'_>,
) -> Result<Applied, StateError> {
    let id = d.id;
    if load_device(conn, id).await?.is_some() {
        return Ok((
            OpResult::Conflict(format!("device {id} already exists")),
            None,
        ));
    }
    if let Some(conflict) = cert_taken(conn, d.cert_sha256, id).await? {
        return Ok(conflict);
    }
    insert_device(conn, ts, &d).await?;
    device_changed(conn, id, Change::DeviceRegistered).await
}

/// Rows per statement of a batch registration: one statement reads or
/// writes up to this many rows (at most 7 bound values each, far below
/// SQLite's 32,766 per statement), so 1,000 devices take a handful of
/// statements rather than thousands.
pub(super) const ROWS_PER_STATEMENT: usize = 500;

/// Registers all of `devices` or none: every one is checked first — its id
/// not registered, its fingerprint no other device's, and neither shared
/// with another device of the batch — and only if none conflicts are they
/// inserted. A conflict is a result (`BatchConflict`, no change), never an
/// error, so every member decides alike and none stops on it.
async fn register_devices(
    conn: &mut SqliteConnection,
    ts: u64,
    devices: &[DeviceRegistration],
) -> Result<Applied, StateError> {
    let registered = registered_ids(conn, devices).await?;
    let holders = certificate_holders(conn, devices).await?;
    let mut ids = HashSet::with_capacity(devices.len());
    let mut certs = HashSet::new();
    let mut conflicts = Vec::new();
    let mut total = 0;
    for d in devices {
        let why = if !ids.insert(d.id.as_str()) {
            Some("named twice in the batch".to_string())
        } else if registered.contains(&d.id) {
            Some("already registered".to_string())
        } else if let Some(cert) = d.cert_sha256.as_deref() {
            if !certs.insert(cert) {
                Some("its certificate fingerprint is another device's of the batch".to_string())
            } else {
                // Not this device's own: it is not registered.
                holders
                    .get(cert)
                    .map(|other| format!("its certificate fingerprint is device {other}'s"))
            }
        } else {
            None
        };
        if let Some(why) = why {
            total += 1;
            if conflicts.len() < MAX_CONFLICTS_LISTED {
                conflicts.push((d.id.clone(), why));
            }
        }
    }
    if total > 0 {
        return Ok((OpResult::BatchConflict { conflicts, total }, None));
    }
    insert_devices(conn, ts, devices).await?;
    let ids = devices.iter().map(|d| d.id.clone()).collect();
    Ok((OpResult::Done, Some(Change::DevicesRegistered { ids })))
}

/// Which of the ids of `devices` are registered.
async fn registered_ids(
    conn: &mut SqliteConnection,
    devices: &[DeviceRegistration],
) -> Result<HashSet<String>, StateError> {
    let mut found = HashSet::new();
    for chunk in devices.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT id FROM devices WHERE id IN (");
        let mut list = q.separated(", ");
        for d in chunk {
            list.push_bind(d.id.as_str());
        }
        q.push(")");
        let rows: Vec<String> = q.build_query_scalar().fetch_all(&mut *conn).await?;
        found.extend(rows);
    }
    Ok(found)
}

/// The registered device holding each certificate fingerprint of
/// `devices` that one holds.
async fn certificate_holders(
    conn: &mut SqliteConnection,
    devices: &[DeviceRegistration],
) -> Result<HashMap<String, String>, StateError> {
    let certs: Vec<&str> = devices
        .iter()
        .filter_map(|d| d.cert_sha256.as_deref())
        .collect();
    let mut holders = HashMap::new();
    for chunk in certs.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT cert_sha256, id FROM devices WHERE cert_sha256 IN (",
        );
        let mut list = q.separated(", ");
        for c in chunk {
            list.push_bind(*c);
        }
        q.push(")");
        let rows: Vec<(String, String)> = q.build_query_as().fetch_all(&mut *conn).await?;
        holders.extend(rows);
    }
    Ok(holders)
}

/// Inserts `devices`, none of which exists yet, with their labels and
/// empty shadows: the rows [`insert_device`] writes for one, a few
/// statements for all.
async fn insert_devices(
    conn: &mut SqliteConnection,
    ts: u64,
    devices: &[DeviceRegistration],
) -> Result<(), StateError> {
    for chunk in devices.chunks(ROWS_PER_STATEMENT) {
        let rows = chunk
            .iter()
            .map(|d| Ok((d, to_json_text(&d.labels)?, to_json_text(&d.attributes)?)))
            .collect::<Result<Vec<_>, StateError>>()?;
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO devices (id, secret_hash, labels, attributes, online, gateway, \
             presence_epoch, cert_sha256, created_at, updated_at) ",
        );
        q.push_values(rows, |mut row, (d, labels, attributes)| {
            row.push_bind(d.id.as_str())
                .push_bind(d.secret_hash.as_str())
                .push_bind(labels)
                .push_bind(attributes)
                .push("0")
                .push("NULL")
                .push("0")
                .push_bind(d.cert_sha256.as_deref())
                .push_bind(db_int(ts))
                .push_bind(db_int(ts));
        });
        q.build().execute(&mut *conn).await?;
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO shadows (device, desired, reported, version, desired_updated, \
             reported_updated) ",
        );
        q.push_values(chunk, |mut row, d| {
            row.push_bind(d.id.as_str())
                .push("'{}'")
                .push("'{}'")
                .push("0")
                .push("'{}'")
                .push("'{}'");
        });
        q.build().execute(&mut *conn).await?;
    }
    let labels: Vec<(&str, &str, &str)> = devices
        .iter()
        .flat_map(|d| {
            d.labels
                .iter()
                .map(|(k, v)| (d.id.as_str(), k.as_str(), v.as_str()))
        })
        .collect();
    for chunk in labels.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new("INSERT INTO device_labels (device, key, value) ");
        q.push_values(chunk, |mut row, (device, k, v)| {
            row.push_bind(*device).push_bind(*k).push_bind(*v);
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Inserts a device that does not exist yet, with its labels and an empty
/// shadow.
async fn insert_device(
    conn: &mut SqliteConnection,
    ts: u64,
    d: &NewDeviceRow<'_>,
) -> Result<(), StateError> {
    let id = d.id;
    sqlx::query(
        "INSERT INTO devices (id, secret_hash, labels, attributes, online, gateway, \
         presence_epoch, cert_sha256, created_at, updated_at) \
         VALUES (?, ?, ?, ?, 0, NULL, 0, ?, ?, ?)",
    )
    .bind(id)
    .bind(d.secret_hash)
    .bind(to_json_text(d.labels)?)
    .bind(to_json_text(d.attributes)?)
    .bind(d.cert_sha256)
    .bind(db_int(ts))
    .bind(db_int(ts))
    .execute(&mut *conn)
    .await?;
    write_labels(conn, id, d.labels).await?;
    sqlx::query(
        "INSERT INTO shadows (device, desired, reported, version, desired_updated, \
         reported_updated) VALUES (?, '{}', '{}', 0, '{}', '{}')",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The device other than `id` that has the certificate fingerprint `cert`,
/// if any.
async fn cert_holder(
    conn: &mut SqliteConnection,
    cert: &str,
    id: &str,
) -> Result<Option<String>, StateError> {
    Ok(
        sqlx::query_scalar("SELECT id FROM devices WHERE cert_sha256 = ? AND id != ?")
            .bind(cert)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// A conflict if a device other than `id` has the certificate fingerprint
/// `cert` (one certificate identifies one device).
async fn cert_taken(
    conn: &mut SqliteConnection,
    cert: Option<&str>,
    id: &str,
) -> Result<Option<Applied>, StateError> {
    let Some(cert) = cert else {
        return Ok(None);
    };
    let holder = cert_holder(conn, cert, id).await?;
    Ok(holder.map(|other| {
        (
            OpResult::Conflict(format!(
                "device {other} is registered with this certificate fingerprint"
            )),
            None,
        )
    }))
}

async fn write_labels(
    conn: &mut SqliteConnection,
    id: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), StateError> {
    sqlx::query("DELETE FROM device_labels WHERE device = ?")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    for (k, v) in labels {
        sqlx::query("INSERT INTO device_labels (device, key, value) VALUES (?, ?, ?)")
            .bind(id)
            .bind(k)
            .bind(v)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn touch_device(conn: &mut SqliteConnection, id: &str, ts: u64) -> Result<(), StateError> {
    sqlx::query("UPDATE devices SET updated_at = ? WHERE id = ?")
        .bind(db_int(ts))
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn must_device(conn: &mut SqliteConnection, id: &str) -> Result<Device, StateError> {
    load_device(conn, id)
        .await?
        .ok_or_else(|| StateError::Corrupt(format!("device {id} vanished during apply")))
}

async fn must_command(conn: &mut SqliteConnection, cid: &str) -> Result<Command, StateError> {
    load_command(conn, cid)
        .await?
        .ok_or_else(|| StateError::Corrupt(format!("command {cid} vanished during apply")))
}

/// The device after a change, as result and change.
async fn device_changed(
    conn: &mut SqliteConnection,
    id: &str,
    change: impl FnOnce(Device) -> Change,
) -> Result<Applied, StateError> {
    let device = must_device(conn, id).await?;
    Ok((OpResult::Device(device.clone()), Some(change(device))))
}

#[allow(clippy::too_many_arguments)]
async fn issue_command(
    conn: &mut SqliteConnection,
    ts: u64,
    cid: &str,
    device: &str,
    name: &str,
    params: &Value,
    ttl_ms: u64,
    idempotency_key: Option<&str>,
) -> Result<Applied, StateError> {
    if load_device(conn, device).await?.is_none() {
        return Ok(not_found_device(device));
    }
    if let Some(key) = idempotency_key {
        let existing: Option<String> =
            sqlx::query_scalar("SELECT id FROM commands WHERE device = ? AND idempotency_key = ?")
                .bind(device)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(existing) = existing {
            let command = must_command(conn, &existing).await?;
            return Ok((
                OpResult::Command {
                    command,
                    created: false,
                },
                None,
            ));
        }
    }
    if load_command(conn, cid).await?.is_some() {
        return Ok((
            OpResult::Conflict(format!("command {cid} already exists")),
            None,
        ));
    }
    sqlx::query(
        "INSERT INTO commands (id, device, name, params, status, output, idempotency_key, \
         issued_at, expires_at, updated_at) VALUES (?, ?, ?, ?, 'queued', NULL, ?, ?, ?, ?)",
    )
    .bind(cid)
    .bind(device)
    .bind(name)
    .bind(to_json_text(params)?)
    .bind(idempotency_key)
    .bind(db_int(ts))
    .bind(db_int(ts.saturating_add(ttl_ms)))
    .bind(db_int(ts))
    .execute(&mut *conn)
    .await?;
    let command = must_command(conn, cid).await?;
    let change = Change::Command(CommandStep::Issued, command.clone());
    Ok((
        OpResult::Command {
            command,
            created: true,
        },
        Some(change),
    ))
}

async fn set_status(
    conn: &mut SqliteConnection,
    ts: u64,
    cid: &str,
    status: CommandStatus,
    output: Option<&Value>,
) -> Result<(), StateError> {
    let output = output.map(to_json_text).transpose()?;
    sqlx::query(
        "UPDATE commands SET status = ?, output = COALESCE(?, output), updated_at = ? \
         WHERE id = ?",
    )
    .bind(status.as_str())
    .bind(output)
    .bind(db_int(ts))
    .bind(cid)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves a command to `status` (a `step` of its life); the command after
/// it is result and change.
async fn transition(
    conn: &mut SqliteConnection,
    ts: u64,
    cid: &str,
    status: CommandStatus,
    output: Option<&Value>,
    step: CommandStep,
) -> Result<Applied, StateError> {
    set_status(conn, ts, cid, status, output).await?;
    let command = must_command(conn, cid).await?;
    let change = Change::Command(step, command.clone());
    Ok((
        OpResult::Command {
            command,
            created: false,
        },
        Some(change),
    ))
}

/// Merges `patch` into `doc` (one of a shadow's documents, stored as
/// `stored_bytes` of JSON) within the limits of [`crate::limits`], and
/// returns the merged document's text — or, as the inner error, why the
/// patch is refused: it fails [`limits::check_value`], or the merged
/// document would be larger than [`MAX_DOCUMENT_BYTES`] and larger than it
/// was (so a document stored before the limit existed can still shrink).
/// Depends only on the entry and the state, so every member decides alike.
/// On refusal `doc` may be half-changed: the caller drops it.
fn merge_within_limits(
    doc: &mut Value,
    stored_bytes: usize,
    patch: &Value,
    which: &'static str,
) -> Result<Result<String, String>, StateError> {
    let what = if which == "desired" {
        "the desired-state patch"
    } else {
        "the reported-state patch"
    };
    if let Err(e) = limits::check_value(what, patch) {
        return Ok(Err(e.to_string()));
    }
    super::merge::merge_patch(doc, patch);
    let text = to_json_text(doc)?;
    if text.len() > MAX_DOCUMENT_BYTES && text.len() > stored_bytes {
        return Ok(Err(format!(
            "the {which} document would be {} bytes as JSON; at most {MAX_DOCUMENT_BYTES} bytes \
             are allowed (remove keys by setting them to null, or store less)",
            text.len()
        )));
    }
    Ok(Ok(text))
}

/// A shadow change: the patch applied and the desired version after it —
/// the change, not the documents (read those from the shadow).
fn shadow_change(side: ShadowSide, device: &str, version: u64, patch: &Value) -> Change {
    Change::Shadow {
        side,
        device: device.to_string(),
        version,
        patch: patch.clone(),
    }
}

/// Records when each top-level key of `patch` changed (a `null` removes the key).
fn stamp_keys(updated: &mut BTreeMap<String, u64>, patch: &Value, ts: u64) {
    if let Value::Object(p) = patch {
        for (k, v) in p {
            if v.is_null() {
                updated.remove(k);
            } else {
                updated.insert(k.clone(), ts);
            }
        }
    }
}

/// Presence: a session on `gateway` with `epoch` started (`online`) or ended.
///
/// Epochs are per device and only move forward: presence with an epoch below
/// the highest seen is stale and ignored. Online (epoch ≥ the highest seen)
/// records the gateway and the epoch. Offline counts only if it names the
/// current gateway and epoch (a late "offline" from an older session, or from
/// a gateway the device already left, changes nothing).
async fn presence(
    conn: &mut SqliteConnection,
    ts: u64,
    device: &str,
    gateway: u64,
    epoch: u64,
    online: bool,
) -> Result<Applied, StateError> {
    let row: Option<(i64, Option<i64>, i64)> =
        sqlx::query_as("SELECT online, gateway, presence_epoch FROM devices WHERE id = ?")
            .bind(device)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((cur_online, cur_gateway, cur_epoch)) = row else {
        return Ok(not_found_device(device));
    };
    // Compared as stored (clamped), so huge ids and epochs stay consistent.
    let cur_online = cur_online != 0;
    let (gateway, epoch) = (db_int(gateway), db_int(epoch));
    if epoch < cur_epoch {
        return Ok((OpResult::Ignored, None));
    }
    if online {
        if cur_online && cur_gateway == Some(gateway) && cur_epoch == epoch {
            return Ok((OpResult::Ignored, None));
        }
        sqlx::query(
            "UPDATE devices SET online = 1, gateway = ?, presence_epoch = ?, updated_at = ? \
             WHERE id = ?",
        )
        .bind(gateway)
        .bind(epoch)
        .bind(db_int(ts))
        .bind(device)
        .execute(&mut *conn)
        .await?;
    } else {
        if !(cur_online && cur_gateway == Some(gateway) && cur_epoch == epoch) {
            return Ok((OpResult::Ignored, None));
        }
        sqlx::query("UPDATE devices SET online = 0, gateway = NULL, updated_at = ? WHERE id = ?")
            .bind(db_int(ts))
            .bind(device)
            .execute(&mut *conn)
            .await?;
    }
    let epoch = u64::try_from(epoch).unwrap_or_default();
    device_changed(conn, device, |device| Change::Presence { device, epoch }).await
}
