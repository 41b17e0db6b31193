//! Applying committed entries: one transaction per batch, deterministic.

use std::collections::{BTreeMap, HashMap, HashSet};

use coordinator::node::Committed;
use coordinator::raft::Index;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use serde_json::Value;

use super::change::{Change, CommandStep, ShadowSide};
use super::rows::db_int;
use super::rows::sync::{
    exec, load_applied_index, load_command, load_device, load_shadow, scalar, store_applied_index,
};
use super::rows::to_json_text;
use super::{EVENTS_RETAINED, StateDb, StateError};
use crate::limits::{self, MAX_DOCUMENT_BYTES};
use crate::ops::{
    BOOTSTRAP_TOKEN_ID, Command, CommandStatus, Device, DeviceRegistration, Event,
    MAX_CONFLICTS_LISTED, MAX_TOKENS, Op, OpResult, Proposal, Role, TokenInfo,
};

/// Entries (or bytes of entries) from which a batch counts as heavy: it is
/// applied where the runtime expects blocking work, not inline. A batch
/// holding a job operation that may touch many rows
/// ([`crate::ops::entry_is_heavy`]) is heavy too, whatever its size.
const HEAVY_ENTRIES: usize = 64;
const HEAVY_BYTES: usize = 256 * 1024;

/// What applying a batch did, published once it is committed.
struct AppliedBatch {
    results: Vec<OpResult>,
    events: Vec<Event>,
    changes: Vec<Change>,
    /// The new applied index, or `None` if nothing was new.
    applied: Option<Index>,
    /// Whether an entry of the batch may have changed what a token
    /// authenticates as (created, revoked, rotated).
    tokens_changed: bool,
}

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
    ///
    /// The whole batch runs in one call on apply's own connection (see
    /// [`super::Writer`]): no hand-off to another thread per statement.
    pub async fn apply(
        &self,
        entries: Vec<Committed>,
        last_index: Index,
    ) -> Result<Vec<OpResult>, StateError> {
        let mut writer = self.writer.lock().await;
        let w = match &mut *writer {
            Some(w) => w,
            empty => empty.insert(super::Writer::open(&self.dir.join(super::DB_FILE)).await?),
        };
        let bytes: usize = entries.iter().map(|e| e.data.len()).sum();
        let heavy = entries.len() >= HEAVY_ENTRIES
            || bytes >= HEAVY_BYTES
            || entries.iter().any(|e| crate::ops::entry_is_heavy(&e.data));
        let batch = w
            .run(heavy, move |conn| apply_batch(conn, &entries, last_index))
            .await??;
        drop(writer);
        if batch.tokens_changed {
            // Before the applied index moves: whoever waits for it then
            // sees the change, never a cached token from before.
            self.forget_tokens();
        }
        if let Some(applied) = batch.applied {
            self.applied.send_replace(applied);
        }
        // No subscriber is fine.
        for change in batch.changes {
            let _ = self.changes.send(change);
        }
        for ev in batch.events {
            let _ = self.events.send(ev);
        }
        Ok(batch.results)
    }
}

/// Applies `entries` in one transaction (see [`StateDb::apply`]); an error
/// rolls all of it back.
fn apply_batch(
    conn: &mut Connection,
    entries: &[Committed],
    last_index: Index,
) -> Result<AppliedBatch, StateError> {
    // Immediate: apply is the only writer; taking the write lock at once
    // means no read-then-upgrade can be refused mid-batch.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let start = load_applied_index(&tx)?;
    let mut mark = start;
    let mut results = Vec::with_capacity(entries.len());
    let mut events = Vec::new();
    let mut changes = Vec::new();
    let mut tokens_changed = false;
    for entry in entries {
        if entry.index <= mark {
            results.push(OpResult::Ignored);
            continue;
        }
        mark = entry.index;
        let proposal = match Proposal::decode(&entry.data) {
            Ok(p) => p,
            Err(e) => {
                // Every member applies the same entries: one this gateway
                // cannot read (a newer version's format, or damage) must
                // stop it, not be skipped — skipping would make its state
                // differ from its peers' for good. Nothing of this batch is
                // committed (the transaction rolls back as it drops).
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
        tokens_changed |= matches!(
            proposal.op,
            Op::BootstrapAdmin { .. }
                | Op::CreateToken { .. }
                | Op::RevokeToken { .. }
                | Op::RotateToken { .. }
        );
        let (result, change) = apply_op(&tx, proposal.ts_ms, &proposal.op)?;
        if let Some(change) = change {
            // The event is what happened: a job's end is apply's decision
            // (`CompleteJob` may abort it, `AbortJob` complete it).
            debug_assert!(
                change.kind() == proposal.op.kind()
                    || (matches!(proposal.op, Op::CompleteJob { .. } | Op::AbortJob { .. })
                        && matches!(change.kind(), "job.completed" | "job.aborted")),
                "{} made {}",
                proposal.op.kind(),
                change.kind()
            );
            events.push(Event {
                index: entry.index,
                kind: change.kind().to_string(),
                data: change.data()?,
                by: proposal.by.clone(),
            });
            changes.push(change);
        }
        results.push(result);
    }
    let new_applied = mark.max(last_index);
    if new_applied == start {
        // Nothing new: no write, nothing to commit (rolled back on drop).
        return Ok(AppliedBatch {
            results,
            events,
            changes,
            applied: None,
            tokens_changed: false,
        });
    }
    for ev in &events {
        exec(
            &tx,
            "INSERT INTO events (idx, kind, data, actor) VALUES (?1, ?2, ?3, ?4)",
            (
                db_int(ev.index),
                ev.kind.as_str(),
                to_json_text(&ev.data)?,
                ev.by.as_deref(),
            ),
        )?;
    }
    let floor = new_applied.saturating_sub(EVENTS_RETAINED);
    if floor > 0 {
        exec(&tx, "DELETE FROM events WHERE idx < ?1", [db_int(floor)])?;
    }
    store_applied_index(&tx, new_applied)?;
    tx.commit()?;
    Ok(AppliedBatch {
        results,
        events,
        changes,
        applied: Some(new_applied),
        tokens_changed,
    })
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
fn apply_op(conn: &Connection, ts: u64, op: &Op) -> Result<Applied, StateError> {
    match op {
        Op::BootstrapAdmin { token_hash } => {
            let any =
                scalar::<bool>(conn, "SELECT EXISTS (SELECT 1 FROM tokens)", [])?.unwrap_or(false);
            if any {
                return Ok((OpResult::Ignored, None));
            }
            let token = NewToken {
                id: BOOTSTRAP_TOKEN_ID,
                token_hash,
                role: Role::Admin,
                name: "bootstrap admin",
                expires_at: None,
            };
            // (Its proposer waits for `Done`, as ever.)
            let (_, change) = insert_token(conn, ts, &token)?;
            Ok((OpResult::Done, change))
        }
        Op::CreateToken {
            token_hash,
            role,
            name,
            id,
            expires_at,
        } => {
            let id = match id {
                Some(id) => id.clone(),
                None => legacy_token_id(conn, ts)?,
            };
            let token = NewToken {
                id: &id,
                token_hash,
                role: *role,
                name,
                expires_at: *expires_at,
            };
            create_token(conn, ts, &token)
        }
        Op::RevokeToken { id } => revoke_token(conn, ts, id),
        Op::RotateToken { id, token_hash } => {
            if scalar::<i64>(conn, "SELECT 1 FROM tokens WHERE id = ?", [id])?.is_none() {
                return Ok(not_found_token(id));
            }
            if hash_taken(conn, token_hash)? {
                return Ok(hash_conflict());
            }
            exec(
                conn,
                "UPDATE tokens SET token_hash = ? WHERE id = ?",
                (token_hash, id),
            )?;
            Ok((
                OpResult::Done,
                Some(Change::TokenRotated { id: id.clone() }),
            ))
        }
        Op::TokensUsed { uses } => {
            for (id, at) in uses {
                exec(
                    conn,
                    "UPDATE tokens SET last_used = MAX(COALESCE(last_used, 0), ?) WHERE id = ?",
                    (db_int(*at), id),
                )?;
            }
            Ok((OpResult::Done, None))
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
            register_device(conn, ts, device)
        }
        Op::RegisterDevices { devices } => register_devices(conn, ts, devices),
        Op::UpdateDevice {
            id,
            labels,
            attributes,
            cert_sha256,
        } => {
            if load_device(conn, id)?.is_none() {
                return Ok(not_found_device(id));
            }
            if let Some(cert) = cert_sha256 {
                if let Some(conflict) = cert_taken(conn, cert.as_deref(), id)? {
                    return Ok(conflict);
                }
                exec(
                    conn,
                    "UPDATE devices SET cert_sha256 = ? WHERE id = ?",
                    (cert.as_deref(), id),
                )?;
            }
            if let Some(labels) = labels {
                exec(
                    conn,
                    "UPDATE devices SET labels = ? WHERE id = ?",
                    (to_json_text(labels)?, id),
                )?;
                write_labels(conn, id, labels)?;
            }
            if let Some(attributes) = attributes {
                exec(
                    conn,
                    "UPDATE devices SET attributes = ? WHERE id = ?",
                    (to_json_text(attributes)?, id),
                )?;
            }
            touch_device(conn, id, ts)?;
            device_changed(conn, id, Change::DeviceUpdated)
        }
        Op::DeleteDevice { id } => {
            if load_device(conn, id)?.is_none() {
                return Ok(not_found_device(id));
            }
            // The foreign keys cascade too; deleting explicitly keeps this
            // independent of the connection's foreign-key setting.
            super::jobs::device_deleted(conn, ts, id)?;
            for sql in [
                "DELETE FROM commands WHERE device = ?",
                "DELETE FROM shadows WHERE device = ?",
                "DELETE FROM device_labels WHERE device = ?",
                "DELETE FROM devices WHERE id = ?",
            ] {
                exec(conn, sql, (id,))?;
            }
            Ok((
                OpResult::Done,
                Some(Change::DeviceDeleted { id: id.clone() }),
            ))
        }
        Op::RotateSecret { id, secret_hash } => {
            if load_device(conn, id)?.is_none() {
                return Ok(not_found_device(id));
            }
            exec(
                conn,
                "UPDATE devices SET secret_hash = ?, updated_at = ? WHERE id = ?",
                (secret_hash, db_int(ts), id),
            )?;
            let device = must_device(conn, id)?;
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
        } => issue_command(
            conn,
            ts,
            cid,
            device,
            name,
            params,
            *ttl_ms,
            idempotency_key.as_deref(),
        ),
        Op::CommandSent { cid, gateway: _ } => {
            let Some(cmd) = load_command(conn, cid)? else {
                return Ok(not_found_command(cid));
            };
            if cmd.status != CommandStatus::Queued {
                return Ok((OpResult::Ignored, None));
            }
            transition(conn, ts, cid, CommandStatus::Sent, None, CommandStep::Sent)
        }
        Op::CommandAccepted { cid } => {
            let Some(cmd) = load_command(conn, cid)? else {
                return Ok(not_found_command(cid));
            };
            if !matches!(cmd.status, CommandStatus::Queued | CommandStatus::Sent) {
                return Ok((OpResult::Ignored, None));
            }
            let step = CommandStep::Accepted;
            transition(conn, ts, cid, CommandStatus::Accepted, None, step)
        }
        Op::CommandResult {
            cid,
            succeeded,
            output,
        } => {
            let Some(cmd) = load_command(conn, cid)? else {
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
            super::jobs::command_finished(conn, ts, cid, status)?;
            transition(conn, ts, cid, status, Some(output), CommandStep::Result)
        }
        Op::CancelCommand { cid } => {
            let Some(cmd) = load_command(conn, cid)? else {
                return Ok(not_found_command(cid));
            };
            if cmd.status.is_terminal() {
                return Ok((
                    OpResult::Conflict(format!("command is already {}", cmd.status.as_str())),
                    None,
                ));
            }
            super::jobs::command_finished(conn, ts, cid, CommandStatus::Canceled)?;
            let step = CommandStep::Canceled;
            transition(conn, ts, cid, CommandStatus::Canceled, None, step)
        }
        Op::ExpireCommands { cids } => {
            let mut expired = Vec::new();
            for cid in cids {
                let Some(cmd) = load_command(conn, cid)? else {
                    continue;
                };
                if cmd.status.is_terminal() || cmd.expires_at > ts {
                    continue;
                }
                set_status(conn, ts, cid, CommandStatus::Expired, None)?;
                super::jobs::command_finished(conn, ts, cid, CommandStatus::Expired)?;
                expired.push(must_command(conn, cid)?);
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
            let Some(mut sh) = load_shadow(conn, device)? else {
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
            exec(
                conn,
                "UPDATE shadows SET desired = ?, desired_updated = ?, version = ? WHERE device = ?",
                (
                    text,
                    to_json_text(&sh.desired_updated)?,
                    db_int(sh.version),
                    device,
                ),
            )?;
            let change = shadow_change(ShadowSide::Desired, device, sh.version, patch);
            Ok((OpResult::Shadow(sh.into_shadow()), Some(change)))
        }
        Op::ReportState { device, patch } => {
            let Some(mut sh) = load_shadow(conn, device)? else {
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
            exec(
                conn,
                "UPDATE shadows SET reported = ?, reported_updated = ? WHERE device = ?",
                (text, to_json_text(&sh.reported_updated)?, device),
            )?;
            let change = shadow_change(ShadowSide::Reported, device, sh.version, patch);
            Ok((OpResult::Shadow(sh.into_shadow()), Some(change)))
        }
        Op::Presence {
            device,
            gateway,
            epoch,
            online,
        } => presence(conn, ts, device, *gateway, *epoch, *online),
        Op::SetPeerAddress { id, address } => {
            exec(
                conn,
                "INSERT INTO peers (id, address) VALUES (?, ?) \
                 ON CONFLICT (id) DO UPDATE SET address = excluded.address",
                (db_int(*id), address),
            )?;
            Ok((
                OpResult::Done,
                Some(Change::PeerAddress {
                    id: *id,
                    address: address.clone(),
                }),
            ))
        }
        Op::CreateJob {
            id,
            command,
            target,
            rollout,
            abort,
            timeout_ms,
            start_at_ms,
            idempotency_key,
        } => {
            let job = super::jobs::NewJob {
                id,
                command,
                target,
                rollout,
                abort: abort.as_ref(),
                timeout_ms: *timeout_ms,
                start_at_ms: *start_at_ms,
                idempotency_key: idempotency_key.as_deref(),
            };
            super::jobs::create_job(conn, ts, &job)
        }
        Op::StartJob { id } => super::jobs::start_job(conn, ts, id),
        Op::LaunchExecutions { job, devices } => {
            super::jobs::launch_executions(conn, ts, job, devices)
        }
        // Apply decides which end (the abort rule first).
        Op::CompleteJob { id } | Op::AbortJob { id } => super::jobs::end_job(conn, ts, id),
        Op::CancelJob { id } => super::jobs::cancel_job(conn, ts, id),
        Op::PruneJobs { finished_before } => {
            super::jobs::prune_jobs(conn, (*finished_before).min(ts))
        }
        Op::GatewaySessionsLost { gateway } => {
            let ids = {
                let mut stmt = conn.prepare_cached(
                    "SELECT id FROM devices WHERE online = 1 AND gateway = ? ORDER BY id",
                )?;
                let rows = stmt.query_map([db_int(*gateway)], |r| r.get::<_, String>(0))?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            if ids.is_empty() {
                return Ok((OpResult::Ignored, None));
            }
            exec(
                conn,
                "UPDATE devices SET online = 0, gateway = NULL, updated_at = ? \
                 WHERE online = 1 AND gateway = ?",
                (db_int(ts), db_int(*gateway)),
            )?;
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

fn not_found_token(id: &str) -> Applied {
    (OpResult::NotFound(format!("token {id}")), None)
}

fn hash_conflict() -> Applied {
    (
        OpResult::Conflict("a token with this hash already exists".into()),
        None,
    )
}

fn hash_taken(conn: &Connection, token_hash: &str) -> Result<bool, StateError> {
    Ok(scalar::<bool>(
        conn,
        "SELECT EXISTS (SELECT 1 FROM tokens WHERE token_hash = ?)",
        [token_hash],
    )?
    .unwrap_or(false))
}

/// The id of a token created by an entry written before token ids existed
/// (no endpoint created such tokens): `t<ts>`, or `t<ts>-<n>` when taken —
/// as migration 0004 names the tokens it finds.
fn legacy_token_id(conn: &Connection, ts: u64) -> Result<String, StateError> {
    let base = format!("t{}", db_int(ts));
    let mut id = base.clone();
    let mut n = 0u32;
    while scalar::<i64>(conn, "SELECT 1 FROM tokens WHERE id = ?", [&id])?.is_some() {
        n += 1;
        id = format!("{base}-{n}");
    }
    Ok(id)
}

/// A token to insert.
struct NewToken<'a> {
    id: &'a str,
    token_hash: &'a str,
    role: Role,
    name: &'a str,
    expires_at: Option<u64>,
}

/// `CreateToken`: refused if the id or the hash exists, or the group holds
/// [`MAX_TOKENS`] tokens.
fn create_token(conn: &Connection, ts: u64, t: &NewToken<'_>) -> Result<Applied, StateError> {
    if hash_taken(conn, t.token_hash)? {
        return Ok(hash_conflict());
    }
    if scalar::<i64>(conn, "SELECT 1 FROM tokens WHERE id = ?", [t.id])?.is_some() {
        return Ok((
            OpResult::Conflict(format!("a token with the id {} already exists", t.id)),
            None,
        ));
    }
    let count = scalar::<i64>(conn, "SELECT COUNT(*) FROM tokens", [])?.unwrap_or(0);
    if count >= MAX_TOKENS as i64 {
        return Ok((
            OpResult::Conflict(format!(
                "the group holds {MAX_TOKENS} tokens, the most it may; revoke one first"
            )),
            None,
        ));
    }
    insert_token(conn, ts, t)
}

fn insert_token(conn: &Connection, ts: u64, t: &NewToken<'_>) -> Result<Applied, StateError> {
    exec(
        conn,
        "INSERT INTO tokens (token_hash, role, name, created_at, id, expires_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
        (
            t.token_hash,
            t.role.as_str(),
            t.name,
            db_int(ts),
            t.id,
            t.expires_at.map(db_int),
        ),
    )?;
    // The change (and the event) never carries the hash.
    let info = TokenInfo {
        id: t.id.to_string(),
        name: t.name.to_string(),
        role: t.role,
        created_at: ts,
        expires_at: t.expires_at,
        last_used: None,
    };
    Ok((OpResult::Token(info.clone()), Some(Change::Token(info))))
}

/// `RevokeToken`: deletes the token, unless it is an admin token and no
/// other admin token without an expiry would remain — so the group always
/// keeps an admin token that does not run out, whatever the order of the
/// calls.
fn revoke_token(conn: &Connection, _ts: u64, id: &str) -> Result<Applied, StateError> {
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT role, name FROM tokens WHERE id = ?")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((role, name)) = row else {
        return Ok(not_found_token(id));
    };
    let role = Role::parse(&role)
        .ok_or_else(|| StateError::Corrupt(format!("unknown token role {role:?}")))?;
    if role == Role::Admin {
        let others = scalar::<i64>(
            conn,
            "SELECT COUNT(*) FROM tokens WHERE role = 'admin' AND expires_at IS NULL AND id != ?",
            [id],
        )?
        .unwrap_or(0);
        if others == 0 {
            return Ok((
                OpResult::Conflict(format!(
                    "token {id} is the last admin token without an expiry; create another \
                     admin token (without expires_in) before revoking it, or rotate it instead"
                )),
                None,
            ));
        }
    }
    exec(conn, "DELETE FROM tokens WHERE id = ?", [id])?;
    Ok((
        OpResult::Done,
        Some(Change::TokenRevoked {
            id: id.to_string(),
            name,
            role,
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

fn register_device(conn: &Connection, ts: u64, d: NewDeviceRow<'_>) -> Result<Applied, StateError> {
    let id = d.id;
    if load_device(conn, id)?.is_some() {
        return Ok((
            OpResult::Conflict(format!("device {id} already exists")),
            None,
        ));
    }
    if let Some(conflict) = cert_taken(conn, d.cert_sha256, id)? {
        return Ok(conflict);
    }
    insert_device(conn, ts, &d)?;
    device_changed(conn, id, Change::DeviceRegistered)
}

/// Registers all of `devices` or none: every one is checked first — its id
/// not registered, its fingerprint no other device's, and neither shared
/// with another device of the batch — and only if none conflicts are they
/// inserted. A conflict is a result (`BatchConflict`, no change), never an
/// error, so every member decides alike and none stops on it.
fn register_devices(
    conn: &Connection,
    ts: u64,
    devices: &[DeviceRegistration],
) -> Result<Applied, StateError> {
    let registered = registered_ids(conn, devices)?;
    let holders = certificate_holders(conn, devices)?;
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
    insert_devices(conn, ts, devices)?;
    let ids = devices.iter().map(|d| d.id.clone()).collect();
    Ok((OpResult::Done, Some(Change::DevicesRegistered { ids })))
}

/// Which of the ids of `devices` are registered.
fn registered_ids(
    conn: &Connection,
    devices: &[DeviceRegistration],
) -> Result<HashSet<String>, StateError> {
    let mut found = HashSet::new();
    for d in devices {
        if scalar::<i64>(conn, "SELECT 1 FROM devices WHERE id = ?", [&d.id])?.is_some() {
            found.insert(d.id.clone());
        }
    }
    Ok(found)
}

/// The registered device holding each certificate fingerprint of
/// `devices` that one holds.
fn certificate_holders(
    conn: &Connection,
    devices: &[DeviceRegistration],
) -> Result<HashMap<String, String>, StateError> {
    let mut holders = HashMap::new();
    for cert in devices.iter().filter_map(|d| d.cert_sha256.as_deref()) {
        let sql = "SELECT id FROM devices WHERE cert_sha256 = ?";
        if let Some(id) = scalar::<String>(conn, sql, [cert])? {
            holders.insert(cert.to_string(), id);
        }
    }
    Ok(holders)
}

/// Inserts `devices`, none of which exists yet, with their labels and
/// empty shadows, as [`insert_device`] does for one.
fn insert_devices(
    conn: &Connection,
    ts: u64,
    devices: &[DeviceRegistration],
) -> Result<(), StateError> {
    for d in devices {
        let row = NewDeviceRow {
            id: &d.id,
            secret_hash: &d.secret_hash,
            labels: &d.labels,
            attributes: &d.attributes,
            cert_sha256: d.cert_sha256.as_deref(),
        };
        insert_device(conn, ts, &row)?;
    }
    Ok(())
}

/// Inserts a device that does not exist yet, with its labels and an empty
/// shadow.
fn insert_device(conn: &Connection, ts: u64, d: &NewDeviceRow<'_>) -> Result<(), StateError> {
    let id = d.id;
    exec(
        conn,
        "INSERT INTO devices (id, secret_hash, labels, attributes, online, gateway, \
         presence_epoch, cert_sha256, created_at, updated_at) \
         VALUES (?, ?, ?, ?, 0, NULL, 0, ?, ?, ?)",
        (
            id,
            d.secret_hash,
            to_json_text(d.labels)?,
            to_json_text(d.attributes)?,
            d.cert_sha256,
            db_int(ts),
            db_int(ts),
        ),
    )?;
    write_labels(conn, id, d.labels)?;
    exec(
        conn,
        "INSERT INTO shadows (device, desired, reported, version, desired_updated, \
         reported_updated) VALUES (?, '{}', '{}', 0, '{}', '{}')",
        (id,),
    )?;
    Ok(())
}

/// The device other than `id` that has the certificate fingerprint `cert`,
/// if any.
fn cert_holder(conn: &Connection, cert: &str, id: &str) -> Result<Option<String>, StateError> {
    scalar(
        conn,
        "SELECT id FROM devices WHERE cert_sha256 = ? AND id != ?",
        (cert, id),
    )
}

/// A conflict if a device other than `id` has the certificate fingerprint
/// `cert` (one certificate identifies one device).
fn cert_taken(
    conn: &Connection,
    cert: Option<&str>,
    id: &str,
) -> Result<Option<Applied>, StateError> {
    let Some(cert) = cert else {
        return Ok(None);
    };
    let holder = cert_holder(conn, cert, id)?;
    Ok(holder.map(|other| {
        (
            OpResult::Conflict(format!(
                "device {other} is registered with this certificate fingerprint"
            )),
            None,
        )
    }))
}

fn write_labels(
    conn: &Connection,
    id: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), StateError> {
    exec(conn, "DELETE FROM device_labels WHERE device = ?", (id,))?;
    for (k, v) in labels {
        exec(
            conn,
            "INSERT INTO device_labels (device, key, value) VALUES (?, ?, ?)",
            (id, k, v),
        )?;
    }
    Ok(())
}

fn touch_device(conn: &Connection, id: &str, ts: u64) -> Result<(), StateError> {
    exec(
        conn,
        "UPDATE devices SET updated_at = ? WHERE id = ?",
        (db_int(ts), id),
    )?;
    Ok(())
}

fn must_device(conn: &Connection, id: &str) -> Result<Device, StateError> {
    load_device(conn, id)?
        .ok_or_else(|| StateError::Corrupt(format!("device {id} vanished during apply")))
}

fn must_command(conn: &Connection, cid: &str) -> Result<Command, StateError> {
    load_command(conn, cid)?
        .ok_or_else(|| StateError::Corrupt(format!("command {cid} vanished during apply")))
}

/// The device after a change, as result and change.
fn device_changed(
    conn: &Connection,
    id: &str,
    change: impl FnOnce(Device) -> Change,
) -> Result<Applied, StateError> {
    let device = must_device(conn, id)?;
    Ok((OpResult::Device(device.clone()), Some(change(device))))
}

#[allow(clippy::too_many_arguments)]
fn issue_command(
    conn: &Connection,
    ts: u64,
    cid: &str,
    device: &str,
    name: &str,
    params: &Value,
    ttl_ms: u64,
    idempotency_key: Option<&str>,
) -> Result<Applied, StateError> {
    if load_device(conn, device)?.is_none() {
        return Ok(not_found_device(device));
    }
    if let Some(key) = idempotency_key {
        let existing: Option<String> = scalar(
            conn,
            "SELECT id FROM commands WHERE device = ? AND idempotency_key = ?",
            (device, key),
        )?;
        if let Some(existing) = existing {
            let command = must_command(conn, &existing)?;
            return Ok((
                OpResult::Command {
                    command,
                    created: false,
                },
                None,
            ));
        }
    }
    if load_command(conn, cid)?.is_some() {
        return Ok((
            OpResult::Conflict(format!("command {cid} already exists")),
            None,
        ));
    }
    exec(
        conn,
        "INSERT INTO commands (id, device, name, params, status, output, idempotency_key, \
         issued_at, expires_at, updated_at) VALUES (?, ?, ?, ?, 'queued', NULL, ?, ?, ?, ?)",
        (
            cid,
            device,
            name,
            to_json_text(params)?,
            idempotency_key,
            db_int(ts),
            db_int(ts.saturating_add(ttl_ms)),
            db_int(ts),
        ),
    )?;
    let command = must_command(conn, cid)?;
    let change = Change::Command(CommandStep::Issued, command.clone());
    Ok((
        OpResult::Command {
            command,
            created: true,
        },
        Some(change),
    ))
}

fn set_status(
    conn: &Connection,
    ts: u64,
    cid: &str,
    status: CommandStatus,
    output: Option<&Value>,
) -> Result<(), StateError> {
    let output = output.map(to_json_text).transpose()?;
    exec(
        conn,
        "UPDATE commands SET status = ?, output = COALESCE(?, output), updated_at = ? \
         WHERE id = ?",
        (status.as_str(), output, db_int(ts), cid),
    )?;
    Ok(())
}

/// Moves a command to `status` (a `step` of its life); the command after
/// it is result and change.
fn transition(
    conn: &Connection,
    ts: u64,
    cid: &str,
    status: CommandStatus,
    output: Option<&Value>,
    step: CommandStep,
) -> Result<Applied, StateError> {
    set_status(conn, ts, cid, status, output)?;
    let command = must_command(conn, cid)?;
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
fn presence(
    conn: &Connection,
    ts: u64,
    device: &str,
    gateway: u64,
    epoch: u64,
    online: bool,
) -> Result<Applied, StateError> {
    let row: Option<(i64, Option<i64>, i64)> = conn
        .prepare_cached("SELECT online, gateway, presence_epoch FROM devices WHERE id = ?")?
        .query_row([device], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
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
        exec(
            conn,
            "UPDATE devices SET online = 1, gateway = ?, presence_epoch = ?, updated_at = ? \
             WHERE id = ?",
            (gateway, epoch, db_int(ts), device),
        )?;
    } else {
        if !(cur_online && cur_gateway == Some(gateway) && cur_epoch == epoch) {
            return Ok((OpResult::Ignored, None));
        }
        exec(
            conn,
            "UPDATE devices SET online = 0, gateway = NULL, updated_at = ? WHERE id = ?",
            (db_int(ts), device),
        )?;
    }
    let epoch = u64::try_from(epoch).unwrap_or_default();
    device_changed(conn, device, |device| Change::Presence { device, epoch })
}
