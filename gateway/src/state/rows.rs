//! Reading rows into domain types, and the small conversions between Rust
//! and SQLite values. Shared by apply (inside its transaction) and queries.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::StateError;
use super::merge::delta;
use crate::ops::{Command, CommandStatus, Device, Shadow};

/// Columns read by [`device_from_row`].
pub(super) const DEVICE_COLS: &str =
    "id, labels, attributes, online, gateway, cert_sha256, created_at, updated_at";

/// Columns read by [`command_from_row`].
pub(super) const COMMAND_COLS: &str = "id, device, name, params, status, output, \
     idempotency_key, issued_at, expires_at, updated_at";

/// Columns read by [`shadow_from_row`].
pub(super) const SHADOW_COLS: &str =
    "device, desired, reported, version, desired_updated, reported_updated";

/// A `u64` as stored: clamped to `i64::MAX` (times, versions, indexes and
/// ids never get near it; clamping keeps comparisons monotone).
pub(super) fn db_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored integer back as `u64`; a negative value is corruption.
pub(super) fn from_db_int(v: i64, what: &str) -> Result<u64, StateError> {
    u64::try_from(v).map_err(|_| StateError::Corrupt(format!("{what} is negative ({v})")))
}

/// Parses a JSON column.
pub(super) fn parse_json<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, StateError> {
    serde_json::from_str(text).map_err(|e| StateError::Corrupt(format!("{what}: {e}")))
}

/// Serialises a value for a JSON column or an event.
pub(super) fn to_json_text<T: serde::Serialize>(v: &T) -> Result<String, StateError> {
    serde_json::to_string(v).map_err(|e| StateError::Corrupt(format!("encoding JSON: {e}")))
}

/// A value as a JSON tree (for events).
pub(super) fn to_json_value<T: serde::Serialize>(v: &T) -> Result<Value, StateError> {
    serde_json::to_value(v).map_err(|e| StateError::Corrupt(format!("encoding JSON: {e}")))
}

fn u64_col(row: &SqliteRow, col: &str) -> Result<u64, StateError> {
    from_db_int(row.try_get::<i64, _>(col)?, col)
}

/// A device from a row selected with [`DEVICE_COLS`].
pub(super) fn device_from_row(row: &SqliteRow) -> Result<Device, StateError> {
    let labels: String = row.try_get("labels")?;
    let attributes: String = row.try_get("attributes")?;
    let gateway: Option<i64> = row.try_get("gateway")?;
    Ok(Device {
        id: row.try_get("id")?,
        labels: parse_json(&labels, "devices.labels")?,
        attributes: parse_json(&attributes, "devices.attributes")?,
        online: row.try_get::<i64, _>("online")? != 0,
        gateway: gateway
            .map(|g| from_db_int(g, "devices.gateway"))
            .transpose()?,
        cert_sha256: row.try_get("cert_sha256")?,
        created_at: u64_col(row, "created_at")?,
        updated_at: u64_col(row, "updated_at")?,
    })
}

/// A command from a row selected with [`COMMAND_COLS`].
pub(super) fn command_from_row(row: &SqliteRow) -> Result<Command, StateError> {
    let params: String = row.try_get("params")?;
    let status: String = row.try_get("status")?;
    let output: Option<String> = row.try_get("output")?;
    Ok(Command {
        id: row.try_get("id")?,
        device: row.try_get("device")?,
        name: row.try_get("name")?,
        params: parse_json(&params, "commands.params")?,
        status: CommandStatus::parse(&status)
            .ok_or_else(|| StateError::Corrupt(format!("unknown command status {status:?}")))?,
        output: output
            .map(|o| parse_json(&o, "commands.output"))
            .transpose()?,
        idempotency_key: row.try_get("idempotency_key")?,
        issued_at: u64_col(row, "issued_at")?,
        expires_at: u64_col(row, "expires_at")?,
        updated_at: u64_col(row, "updated_at")?,
    })
}

/// The stored parts of a shadow (no delta).
#[derive(Debug, Clone)]
pub(super) struct ShadowRow {
    pub device: String,
    pub desired: Value,
    pub reported: Value,
    pub version: u64,
    pub desired_updated: BTreeMap<String, u64>,
    pub reported_updated: BTreeMap<String, u64>,
    /// The stored size of `desired` (bytes of compact JSON).
    pub desired_bytes: usize,
    /// The stored size of `reported`.
    pub reported_bytes: usize,
}

impl ShadowRow {
    /// The API view, with the delta computed.
    pub fn into_shadow(self) -> Shadow {
        Shadow {
            delta: delta(&self.desired, &self.reported),
            device: self.device,
            desired: self.desired,
            reported: self.reported,
            version: self.version,
            desired_updated: self.desired_updated,
            reported_updated: self.reported_updated,
        }
    }
}

/// A shadow from a row selected with [`SHADOW_COLS`].
pub(super) fn shadow_from_row(row: &SqliteRow) -> Result<ShadowRow, StateError> {
    let desired: String = row.try_get("desired")?;
    let reported: String = row.try_get("reported")?;
    let du: String = row.try_get("desired_updated")?;
    let ru: String = row.try_get("reported_updated")?;
    Ok(ShadowRow {
        device: row.try_get("device")?,
        desired: parse_json(&desired, "shadows.desired")?,
        reported: parse_json(&reported, "shadows.reported")?,
        version: u64_col(row, "version")?,
        desired_updated: parse_json(&du, "shadows.desired_updated")?,
        reported_updated: parse_json(&ru, "shadows.reported_updated")?,
        desired_bytes: desired.len(),
        reported_bytes: reported.len(),
    })
}

/// Loads a device.
pub(super) async fn load_device(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Option<Device>, StateError> {
    let sql = format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ?");
    let row = sqlx::query(&sql).bind(id).fetch_optional(conn).await?;
    row.as_ref().map(device_from_row).transpose()
}

/// Loads a command.
pub(super) async fn load_command(
    conn: &mut SqliteConnection,
    cid: &str,
) -> Result<Option<Command>, StateError> {
    let sql = format!("SELECT {COMMAND_COLS} FROM commands WHERE id = ?");
    let row = sqlx::query(&sql).bind(cid).fetch_optional(conn).await?;
    row.as_ref().map(command_from_row).transpose()
}

/// Loads a shadow's stored parts.
pub(super) async fn load_shadow(
    conn: &mut SqliteConnection,
    device: &str,
) -> Result<Option<ShadowRow>, StateError> {
    let sql = format!("SELECT {SHADOW_COLS} FROM shadows WHERE device = ?");
    let row = sqlx::query(&sql).bind(device).fetch_optional(conn).await?;
    row.as_ref().map(shadow_from_row).transpose()
}

/// Reads `meta.applied_index`.
pub(super) async fn load_applied_index(conn: &mut SqliteConnection) -> Result<u64, StateError> {
    let v: Option<i64> = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'applied_index'")
        .fetch_optional(conn)
        .await?;
    match v {
        Some(v) => from_db_int(v, "meta.applied_index"),
        None => Err(StateError::Corrupt("meta.applied_index is missing".into())),
    }
}

/// Writes `meta.applied_index`.
pub(super) async fn store_applied_index(
    conn: &mut SqliteConnection,
    index: u64,
) -> Result<(), StateError> {
    sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES ('applied_index', ?)")
        .bind(db_int(index))
        .execute(conn)
        .await?;
    Ok(())
}
