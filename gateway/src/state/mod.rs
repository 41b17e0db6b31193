//! The replicated state machine over SQLite (sqlx, WAL mode).
//!
//! Every committed entry is one [`Proposal`](crate::ops::Proposal); a batch
//! of them is applied in **one transaction that also records the last index**
//! in the `meta` table, so applying is exactly-once across crashes: entries at
//! or below the recorded index are never handed over again (the node driver
//! asks [`StateMachine::applied_index`] on start). Apply reads no clock: it
//! uses the proposal's `ts_ms`.
//!
//! Snapshots are `VACUUM INTO` a file the node driver stages (on a
//! connection of their own, while apply goes on); restoring streams the
//! image into a temp file and replaces `state.db` atomically (fsync,
//! rename, reopen the pool).
//!
//! Schema: `migrations/` at the workspace root, applied by `sqlx::migrate!`
//! on open.
//!
//! Decisions the first design left open (docs/ARCHITECTURE.md):
//! - Each entry that changed something yields exactly one [`Change`] on the
//!   typed feed ([`StateDb::changes`]) and its rendering as one [`Event`] (so an
//!   SSE `id` names one event and `Last-Event-ID` resumes exactly); an entry
//!   that was ignored, refused or not found yields none. `command.expired`
//!   carries `{"commands": [..]}`, `gateway.sessions_lost`
//!   `{"gateway": g, "devices": [ids]}`, deletions and secret rotation
//!   `{"id": ..}`, tokens `{"role", "name"}` (never the hash), shadow
//!   changes `{"device", "version", "patch"}` (the merge patch applied and
//!   the desired version after it: the change, not the documents); a
//!   batch registration (`devices.registered`, one entry however many
//!   devices) `{"devices": [ids]}`, in the order of the request;
//!   `job.launched` `{"job", "executions": [{"device", "command"}]}`; the
//!   other job events the job after the change; the others the device or
//!   command after the change.
//! - Jobs (`jobs.rs`): executions follow their commands in the command's
//!   own entry; a job's start, end and abort are entries of their own
//!   (the leader's), each re-checked at apply time.
//! - `RegisterDevices` is all or none: every device is checked first (its
//!   id not registered, its certificate fingerprint no other device's,
//!   neither shared within the entry); one conflict makes the result
//!   `BatchConflict` and nothing changes.
//! - Presence epochs are per device and only move forward: a lower epoch is
//!   stale; `online` with an epoch ≥ the highest seen takes the device; an
//!   `offline` counts only for the current gateway and epoch. Presence
//!   changes bump the device's `updated_at`.
//! - `SetDesired` bumps the version on every accepted patch (even `{}`);
//!   desired and reported patches must be JSON objects (else `Conflict`).
//! - Desired and reported documents are capped at
//!   [`MAX_DOCUMENT_BYTES`](crate::limits::MAX_DOCUMENT_BYTES) of JSON each:
//!   a patch that fails [`check_value`](crate::limits::check_value), or
//!   would make the document larger than the cap (and larger than it was),
//!   is refused with `TooLarge` and changes nothing.
//! - `ExpireCommands` and `GatewaySessionsLost` return `Done` if they changed
//!   anything, else `Ignored`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use coordinator::image::ImageReader;
use coordinator::node::{BoxError, Committed, SnapshotView, StateMachine};
use coordinator::raft::{Index, SnapshotMeta};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, RwLock, broadcast, mpsc, oneshot, watch};

use crate::ops::{Event, OpResult};
pub use change::{Change, CommandStep, JobStep, Launched, LaunchedCommand, ShadowSide};

mod apply;
mod change;
mod jobs;
pub mod merge;
mod queries;
pub use queries::TokenAuth;
mod rows;
mod snapshot;
pub use snapshot::{BackupImage, install_new_group_image};
#[cfg(test)]
mod tests;

/// The schema (`migrations/` at the workspace root).
static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The database file in the data directory.
const DB_FILE: &str = "state.db";
/// Where a snapshot image is prepared before it replaces [`DB_FILE`].
const RESTORE_TMP: &str = "state.db.restore.tmp";
/// Snapshot images are written to `<prefix><n>.tmp` and removed after reading.
const SNAPSHOT_TMP_PREFIX: &str = "state.db.snapshot-";
/// Connections in the pool (one is the writer's while a batch applies).
const POOL_SIZE: u32 = 4;
/// Capacity of the event broadcast; a receiver that lags further gets
/// `RecvError::Lagged` and should catch up with [`StateDb::events_since`].
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;
/// Capacity of the change feed ([`StateDb::changes`]); a receiver that lags
/// further gets `RecvError::Lagged` and rebuilds what it derives from the
/// state.
pub const CHANGE_CHANNEL_CAPACITY: usize = 4096;
/// Events are kept for this many log indexes behind the applied index.
pub const EVENTS_RETAINED: u64 = 100_000;

/// The lowest index an event stream can resume after, at applied index
/// `applied`: apply drops the events below `applied - EVENTS_RETAINED`, so
/// resuming after anything lower would silently skip some.
pub fn resumable_after(applied: Index) -> Index {
    applied.saturating_sub(EVENTS_RETAINED).saturating_sub(1)
}

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// SQLite failed on apply's handle.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// File handling around snapshots failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Stored data (or a snapshot image) is not what the schema says.
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

/// What a device may log in with (for authenticating its MQTT sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredentials {
    /// SHA-256 (hex) of its secret; empty if it has none.
    pub secret_hash: String,
    /// SHA-256 (lowercase hex) of its client certificate, if it has one.
    pub cert_sha256: Option<String>,
}

/// Filters for listing devices.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    /// Only devices with this label key = value.
    pub label: Option<(String, String)>,
    /// Only online (true) or offline (false) devices.
    pub online: Option<bool>,
}

/// Keyset pagination: items strictly after `after` (by id, ascending), at most `limit`.
#[derive(Debug, Clone)]
pub struct Page {
    /// The last id of the previous page.
    pub after: Option<String>,
    /// Page size (the API caps it).
    pub limit: u32,
}

/// Filters of the fleet-wide command list ([`StateDb::list_all_commands`]):
/// every one given must hold.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    /// Only commands in this state.
    pub status: Option<crate::ops::CommandStatus>,
    /// Only this device's commands.
    pub device: Option<String>,
    /// Only the commands this job launched.
    pub job: Option<String>,
    /// Only commands issued strictly after this time (ms since the epoch).
    pub created_after: Option<u64>,
}

/// The state database. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct StateDb {
    /// The data directory (holds `state.db`).
    dir: PathBuf,
    /// Behind a lock so a restore can swap it: queries hold the read lock
    /// while they run, a restore takes the write lock for the swap.
    pool: RwLock<SqlitePool>,
    /// Serialises the writers (apply, restore), and holds apply's own
    /// connection, outside the pool (opened on first use, closed by a
    /// restore): apply never waits for a reader's connection, and its
    /// prepared statements stay cached.
    writer: Mutex<Option<Writer>>,
    /// The applied index, published after each commit.
    applied: watch::Sender<Index>,
    /// Events of committed batches.
    events: broadcast::Sender<Event>,
    /// The same changes, typed, for the gateway's own consumers.
    changes: broadcast::Sender<Change>,
    /// Counts snapshot restores (which change state without events).
    restores: watch::Sender<u64>,
    /// Numbers temp snapshot files.
    tmp_seq: AtomicU64,
    /// Tokens found by authentication, with the generation they were read
    /// at (see [`StateDb::token`]).
    token_cache: std::sync::Mutex<std::collections::HashMap<String, (u64, TokenAuth)>>,
    /// Moves on with every applied change to the tokens.
    tokens_generation: AtomicU64,
}

/// Tokens kept by the authentication cache (a group holds at most 1,000).
const TOKEN_CACHE_MAX: usize = 4096;

/// How the state database is opened (pool and writer alike).
fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // The Raft log is the durability point: after a crash the entries
        // past the recorded applied index are applied again.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10))
}

/// Apply's own connection: opened, configured and closed by sqlx, and
/// driven through rusqlite on the same SQLite handle, which a task of its
/// own keeps locked (sqlx's `lock_handle`) for the connection's life.
/// sqlx runs each statement on its worker thread and hands the result
/// back — two thread wake-ups per statement, most of the cost of applying
/// an entry; here a whole batch is one call, on statements prepared once.
pub(super) struct Writer {
    jobs: mpsc::Sender<WriterJob>,
    task: tokio::task::JoinHandle<()>,
}

/// A call on the writer's handle, and whether it is heavy.
type WriterJob = (bool, Box<dyn FnOnce(&mut rusqlite::Connection) + Send>);

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

/// Statements apply keeps prepared (its distinct statements, with room).
const WRITER_STATEMENTS: usize = 128;

/// How long opening the writer may wait for sqlx's lock on its handle
/// (it is free at once: the connection has just been opened).
const WRITER_LOCK_WAIT: Duration = Duration::from_secs(10);

impl Writer {
    /// Opens apply's own connection to `path` (the schema is the pool's).
    async fn open(path: &Path) -> Result<Writer, StateError> {
        let conn = SqliteConnection::connect_with(&connect_options(path)).await?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (jobs, rx) = mpsc::channel(1);
        let task = tokio::spawn(Self::serve(conn, ready_tx, rx));
        match ready_rx.await {
            Ok(Ok(())) => Ok(Writer { jobs, task }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(writer_stopped()),
        }
    }

    /// Holds the handle and runs the calls sent to it, one at a time, until
    /// the writer is closed (or dropped).
    #[allow(unsafe_code)]
    async fn serve(
        mut conn: SqliteConnection,
        ready: oneshot::Sender<Result<(), StateError>>,
        mut jobs: mpsc::Receiver<WriterJob>,
    ) {
        let mut handle = match tokio::time::timeout(WRITER_LOCK_WAIT, conn.lock_handle()).await {
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
            Err(_) => {
                let _ = ready.send(Err(StateError::Corrupt(format!(
                    "the state database's writer connection was not free within {} s",
                    WRITER_LOCK_WAIT.as_secs()
                ))));
                return;
            }
        };
        // SAFETY: the handle is sqlx's open connection, locked by `handle`
        // (so sqlx's worker thread never uses it meanwhile) until after
        // `raw` is dropped below; rusqlite does not close a handle it did
        // not open. Both link the one libsqlite3-sys (cargo allows one).
        let raw = unsafe { rusqlite::Connection::from_handle(handle.as_raw_handle().as_ptr()) };
        let mut raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
        };
        raw.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
        if ready.send(Ok(())).is_ok() {
            let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread;
            while let Some((heavy, job)) = jobs.recv().await {
                if heavy && multi_thread {
                    // The runtime moves other tasks off this thread meanwhile.
                    tokio::task::block_in_place(|| job(&mut raw));
                } else {
                    job(&mut raw);
                }
            }
        }
        // Finalizes the cached statements while the handle is still open.
        drop(raw);
        drop(handle);
        if let Err(e) = conn.close().await {
            tracing::debug!(error = %e, "closing the state database's writer");
        }
    }

    /// Runs `f` on the handle. A `heavy` call (a large batch) runs where the
    /// runtime expects blocking work.
    async fn run<T: Send + 'static>(
        &self,
        heavy: bool,
        f: impl FnOnce(&mut rusqlite::Connection) -> T + Send + 'static,
    ) -> Result<T, StateError> {
        let (tx, rx) = oneshot::channel();
        let job = Box::new(move |conn: &mut rusqlite::Connection| {
            let _ = tx.send(f(conn));
        });
        self.jobs
            .send((heavy, job))
            .await
            .map_err(|_| writer_stopped())?;
        rx.await.map_err(|_| writer_stopped())
    }

    /// Closes the connection (after the call in progress, if any).
    async fn close(self) -> Result<(), StateError> {
        drop(self.jobs);
        self.task.await.map_err(|_| writer_stopped())
    }
}

fn writer_stopped() -> StateError {
    StateError::Corrupt("the state database's writer stopped".into())
}

/// Opens a pool on `path` (creating the file) and brings the schema up to date.
async fn open_pool(path: &Path) -> Result<SqlitePool, StateError> {
    let opts = connect_options(path);
    let pool = SqlitePoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts)
        .await?;
    if let Err(e) = MIGRATOR.run(&pool).await {
        pool.close().await;
        return Err(e.into());
    }
    Ok(pool)
}

/// Makes the database file at `path` private (0600) before SQLite opens
/// it: creates it empty if missing (SQLite takes an empty file as a new
/// database), else takes other users' access from it and its side files.
/// SQLite creates the `-wal` and `-shm` files with the database's mode.
pub(crate) async fn make_private(path: &Path) -> Result<(), StateError> {
    let io = |op| {
        let path = path.to_path_buf();
        move |source| StateError::Io { op, path, source }
    };
    match tokio::fs::metadata(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut opts = crate::files::private_options();
            opts.truncate(false).create_new(true);
            opts.open(path).await.map_err(io("creating"))?;
        }
        Err(e) => return Err(io("reading the metadata of")(e)),
        Ok(_) => {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let file = snapshot::with_suffix(path, suffix);
                match crate::files::tighten(&file, crate::files::FILE_MODE) {
                    Ok(Some(old)) => tracing::warn!(
                        file = %file.display(),
                        old_mode = format!("{old:o}"),
                        "made the state database file private (0600)"
                    ),
                    Ok(None) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("changing the mode of")(e)),
                }
            }
        }
    }
    Ok(())
}

/// Removes temp files a crash may have left in `dir`.
async fn remove_stale_temp_files(dir: &Path) -> Result<(), StateError> {
    snapshot::remove_db_files(&dir.join(RESTORE_TMP)).await?;
    let mut rd = tokio::fs::read_dir(dir)
        .await
        .map_err(|source| StateError::Io {
            op: "listing",
            path: dir.to_path_buf(),
            source,
        })?;
    while let Some(entry) = rd.next_entry().await.map_err(|source| StateError::Io {
        op: "listing",
        path: dir.to_path_buf(),
        source,
    })? {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(SNAPSHOT_TMP_PREFIX))
        {
            snapshot::remove_if_exists(&entry.path()).await?;
        }
    }
    Ok(())
}

impl StateDb {
    /// Opens (creating if needed) `state.db` in `dir`, in WAL mode, and runs
    /// the migrations.
    pub async fn open(dir: &Path) -> Result<StateDb, StateError> {
        crate::files::create_private_dir(dir).map_err(|source| StateError::Io {
            op: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        remove_stale_temp_files(dir).await?;
        let db = dir.join(DB_FILE);
        make_private(&db).await?;
        let pool = open_pool(&db).await?;
        let applied = {
            let mut conn = pool.acquire().await?;
            rows::load_applied_index(&mut conn).await?
        };
        let (applied, _) = watch::channel(applied);
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        Ok(StateDb {
            dir: dir.to_path_buf(),
            pool: RwLock::new(pool),
            writer: Mutex::new(None),
            applied,
            events,
            changes,
            restores: watch::channel(0).0,
            tmp_seq: AtomicU64::new(0),
            token_cache: std::sync::Mutex::new(std::collections::HashMap::new()),
            tokens_generation: AtomicU64::new(0),
        })
    }

    /// The highest log index applied (from the `meta` row).
    pub fn applied_index(&self) -> Index {
        *self.applied.borrow()
    }

    /// A receiver of the applied index, updated after each committed batch.
    pub fn watch_applied(&self) -> watch::Receiver<Index> {
        self.applied.subscribe()
    }

    /// Events of each committed batch, in index order, sent after the
    /// commit: the public event stream (`GET /v1/events`).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The typed change feed: what each applied entry changed, in index
    /// order, sent after the commit (before the same changes as events).
    /// For the gateway's own consumers; a receiver that lagged rebuilds
    /// from the state, as after a restore ([`StateDb::watch_restores`]),
    /// which no change announces.
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// A receiver that changes after every snapshot restore: state replaced
    /// wholesale, with no events for what changed. Caches of state rebuild
    /// on it.
    pub fn watch_restores(&self) -> watch::Receiver<u64> {
        self.restores.subscribe()
    }

    /// Drops the cached tokens (a token was created, revoked or rotated, or
    /// the state replaced).
    pub(crate) fn forget_tokens(&self) {
        self.tokens_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.token_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Closes the pool (waiting for running queries) and apply's
    /// connection. Later queries fail.
    pub async fn close(&self) {
        if let Some(writer) = self.writer.lock().await.take()
            && let Err(e) = writer.close().await
        {
            tracing::debug!(error = %e, "closing the state database's writer");
        }
        self.pool.read().await.close().await;
    }
}

/// The node driver's view of the state database.
#[derive(Debug, Clone)]
pub struct Machine(pub std::sync::Arc<StateDb>);

impl StateMachine for Machine {
    type Output = OpResult;

    fn applied_index(&self) -> Index {
        self.0.applied_index()
    }

    async fn apply(
        &mut self,
        entries: Vec<Committed>,
        last_index: Index,
    ) -> Result<Vec<OpResult>, BoxError> {
        Ok(self.0.apply(entries, last_index).await?)
    }

    type Snapshot = DbView;

    async fn snapshot(&mut self) -> Result<DbView, BoxError> {
        Ok(DbView(self.0.clone()))
    }

    async fn restore(&mut self, meta: &SnapshotMeta, image: ImageReader) -> Result<(), BoxError> {
        Ok(self.0.restore(meta, image).await?)
    }
}

/// A snapshot of the state database: `VACUUM INTO` the file the driver
/// gives, on its own connection while apply goes on; the image records the
/// index it stands at.
#[derive(Debug)]
pub struct DbView(std::sync::Arc<StateDb>);

impl SnapshotView for DbView {
    async fn write_to(self, dest: PathBuf) -> Result<Index, BoxError> {
        Ok(self.0.write_image(&dest).await?)
    }
}
