//! Reading rows into domain types, and the small conversions between Rust
//! and SQLite values. Shared by apply (inside its transaction, on the
//! writer's handle through rusqlite) and queries (sqlx): the decoders read
//! either kind of row through [`Cols`].

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::StateError;
use super::merge::delta;
use crate::ops::{Command, CommandStatus, Device, Shadow};

/// The columns [`device_from_row`] reads, as a literal (for `concat!`).
macro_rules! device_cols {
    () => {
        "id, labels, attributes, online, gateway, cert_sha256, created_at, updated_at"
    };
}

/// The columns [`command_from_row`] reads, as a literal.
macro_rules! command_cols {
    () => {
        "id, device, name, params, status, output, idempotency_key, issued_at, expires_at, \
         updated_at"
    };
}

/// The columns [`shadow_from_row`] reads, as a literal.
macro_rules! shadow_cols {
    () => {
        "device, desired, reported, version, desired_updated, reported_updated"
    };
}

/// Columns read by [`device_from_row`].
pub(super) const DEVICE_COLS: &str = device_cols!();

/// Columns read by [`command_from_row`].
pub(super) const COMMAND_COLS: &str = command_cols!();

/// Columns read by [`shadow_from_row`].
pub(super) const SHADOW_COLS: &str = shadow_cols!();

/// A row of either driver, read by column name.
pub(super) trait Cols {
    /// A text column.
    fn text(&self, col: &str) -> Result<String, StateError>;
    /// A text column that may be NULL.
    fn opt_text(&self, col: &str) -> Result<Option<String>, StateError>;
    /// An integer column.
    fn int(&self, col: &str) -> Result<i64, StateError>;
    /// An integer column that may be NULL.
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StateError>;
}

impl Cols for SqliteRow {
    fn text(&self, col: &str) -> Result<String, StateError> {
        Ok(self.try_get(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, StateError> {
        Ok(self.try_get(col)?)
    }
    fn int(&self, col: &str) -> Result<i64, StateError> {
        Ok(self.try_get(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StateError> {
        Ok(self.try_get(col)?)
    }
}

impl Cols for rusqlite::Row<'_> {
    fn text(&self, col: &str) -> Result<String, StateError> {
        Ok(self.get(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, StateError> {
        Ok(self.get(col)?)
    }
    fn int(&self, col: &str) -> Result<i64, StateError> {
        Ok(self.get(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StateError> {
        Ok(self.get(col)?)
    }
}

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

fn u64_col(row: &impl Cols, col: &str) -> Result<u64, StateError> {
    from_db_int(row.int(col)?, col)
}

/// A device from a row selected with [`DEVICE_COLS`].
pub(super) fn device_from_row(row: &impl Cols) -> Result<Device, StateError> {
    let labels = row.text("labels")?;
    let attributes = row.text("attributes")?;
    let gateway = row.opt_int("gateway")?;
    Ok(Device {
        id: row.text("id")?,
        labels: parse_json(&labels, "devices.labels")?,
        attributes: parse_json(&attributes, "devices.attributes")?,
        online: row.int("online")? != 0,
        gateway: gateway
            .map(|g| from_db_int(g, "devices.gateway"))
            .transpose()?,
        cert_sha256: row.opt_text("cert_sha256")?,
        created_at: u64_col(row, "created_at")?,
        updated_at: u64_col(row, "updated_at")?,
    })
}

/// A command from a row selected with [`COMMAND_COLS`].
pub(super) fn command_from_row(row: &impl Cols) -> Result<Command, StateError> {
    let params = row.text("params")?;
    let status = row.text("status")?;
    let output = row.opt_text("output")?;
    Ok(Command {
        id: row.text("id")?,
        device: row.text("device")?,
        name: row.text("name")?,
        params: parse_json(&params, "commands.params")?,
        status: CommandStatus::parse(&status)
            .ok_or_else(|| StateError::Corrupt(format!("unknown command status {status:?}")))?,
        output: output
            .map(|o| parse_json(&o, "commands.output"))
            .transpose()?,
        idempotency_key: row.opt_text("idempotency_key")?,
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
pub(super) fn shadow_from_row(row: &impl Cols) -> Result<ShadowRow, StateError> {
    let desired = row.text("desired")?;
    let reported = row.text("reported")?;
    let du = row.text("desired_updated")?;
    let ru = row.text("reported_updated")?;
    Ok(ShadowRow {
        device: row.text("device")?,
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

/// Apply's reads and writes on the writer's handle: synchronous, each
/// statement prepared once and kept (rusqlite's statement cache).
pub(super) mod sync {
    use rusqlite::{Connection, OptionalExtension, Params};

    use super::*;

    /// Runs a cached statement that changes rows.
    pub fn exec(conn: &Connection, sql: &str, params: impl Params) -> Result<usize, StateError> {
        Ok(conn.prepare_cached(sql)?.execute(params)?)
    }

    /// The first column of the first row, if any.
    pub fn scalar<T: rusqlite::types::FromSql>(
        conn: &Connection,
        sql: &str,
        params: impl Params,
    ) -> Result<Option<T>, StateError> {
        Ok(conn
            .prepare_cached(sql)?
            .query_row(params, |r| r.get(0))
            .optional()?)
    }

    /// The first row, decoded.
    fn first<T>(
        conn: &Connection,
        sql: &str,
        params: impl Params,
        decode: impl Fn(&rusqlite::Row<'_>) -> Result<T, StateError>,
    ) -> Result<Option<T>, StateError> {
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        rows.next()?.map(decode).transpose()
    }

    /// Loads a device.
    pub fn load_device(conn: &Connection, id: &str) -> Result<Option<Device>, StateError> {
        let sql = concat!("SELECT ", device_cols!(), " FROM devices WHERE id = ?1");
        first(conn, sql, [id], |r| device_from_row(r))
    }

    /// Loads a command.
    pub fn load_command(conn: &Connection, cid: &str) -> Result<Option<Command>, StateError> {
        let sql = concat!("SELECT ", command_cols!(), " FROM commands WHERE id = ?1");
        first(conn, sql, [cid], |r| command_from_row(r))
    }

    /// Loads a shadow's stored parts.
    pub fn load_shadow(conn: &Connection, device: &str) -> Result<Option<ShadowRow>, StateError> {
        let sql = concat!("SELECT ", shadow_cols!(), " FROM shadows WHERE device = ?1");
        first(conn, sql, [device], |r| shadow_from_row(r))
    }

    /// Reads `meta.applied_index`.
    pub fn load_applied_index(conn: &Connection) -> Result<u64, StateError> {
        let sql = "SELECT value FROM meta WHERE key = 'applied_index'";
        match scalar::<i64>(conn, sql, [])? {
            Some(v) => from_db_int(v, "meta.applied_index"),
            None => Err(StateError::Corrupt("meta.applied_index is missing".into())),
        }
    }

    /// Writes `meta.applied_index`.
    pub fn store_applied_index(conn: &Connection, index: u64) -> Result<(), StateError> {
        let sql = "INSERT OR REPLACE INTO meta (key, value) VALUES ('applied_index', ?1)";
        exec(conn, sql, [db_int(index)])?;
        Ok(())
    }
}
