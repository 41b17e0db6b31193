//! Snapshots (`VACUUM INTO`) and restoring one in place of `state.db`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use coordinator::raft::SnapshotMeta;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::rows::store_applied_index;
use super::{DB_FILE, MIGRATOR, RESTORE_TMP, SNAPSHOT_TMP_PREFIX, StateDb, StateError, open_pool};

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

/// Removes a file; a missing file is fine.
pub(super) async fn remove_if_exists(path: &Path) -> Result<(), StateError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

/// `path` with a suffix appended to its file name (`state.db` → `state.db-wal`).
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Removes a database file and its journal side files.
pub(super) async fn remove_db_files(path: &Path) -> Result<(), StateError> {
    for suffix in ["-wal", "-shm", "-journal"] {
        remove_if_exists(&with_suffix(path, suffix)).await?;
    }
    remove_if_exists(path).await
}

async fn fsync_file(path: &Path) -> Result<(), StateError> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(io_err("opening for fsync", path))?;
    f.sync_all().await.map_err(io_err("fsyncing", path))
}

async fn fsync_dir(dir: &Path) -> Result<(), StateError> {
    #[cfg(unix)]
    {
        fsync_file(dir).await
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Makes the image at `path` a complete state database at `index`: creates
/// it if absent, checks it, brings its schema up to date and records
/// `meta.applied_index = index`. It is left in WAL mode (so opening it as
/// `state.db` needs no journal change) but as a single, checkpointed file.
async fn prepare_image(path: &Path, index: u64) -> Result<(), StateError> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true);
    // A one-connection pool: the migrator wants a pool (its future over a
    // bare connection is not `Send`).
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await?;
    let result = async {
        let check: String = sqlx::query_scalar("PRAGMA quick_check")
            .fetch_one(&pool)
            .await?;
        if check != "ok" {
            return Err(StateError::Corrupt(format!(
                "snapshot image fails its integrity check: {check}"
            )));
        }
        MIGRATOR.run(&pool).await?;
        let mut conn = pool.acquire().await?;
        store_applied_index(&mut conn, index).await
    }
    .await;
    // Closing the last connection checkpoints the WAL into the file.
    pool.close().await;
    result?;
    let wal = with_suffix(path, "-wal");
    match tokio::fs::metadata(&wal).await {
        Ok(m) if m.len() > 0 => {
            return Err(StateError::Corrupt(format!(
                "{} was not checkpointed",
                wal.display()
            )));
        }
        _ => {}
    }
    remove_if_exists(&wal).await?;
    remove_if_exists(&with_suffix(path, "-shm")).await
}

impl StateDb {
    /// Writes a consistent image of the database (`VACUUM INTO`) and returns its bytes.
    pub async fn snapshot(&self) -> Result<Vec<u8>, StateError> {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{SNAPSHOT_TMP_PREFIX}{n}.tmp"));
        remove_db_files(&path).await?;
        // `VACUUM INTO` fills an empty file, which keeps the mode we give it.
        super::make_private(&path).await?;
        let target = path
            .to_str()
            .ok_or_else(|| {
                io_err("snapshotting into", &path)(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the data directory's path is not UTF-8",
                ))
            })?
            .to_owned();
        let result = async {
            {
                let pool = self.pool.read().await;
                sqlx::query("VACUUM INTO ?")
                    .bind(&target)
                    .execute(&*pool)
                    .await?;
            }
            tokio::fs::read(&path)
                .await
                .map_err(io_err("reading snapshot image", &path))
        }
        .await;
        let cleanup = remove_db_files(&path).await;
        let bytes = result?;
        cleanup?;
        Ok(bytes)
    }

    /// Replaces the database with a snapshot image (empty data = an empty
    /// database at `meta.index`), atomically.
    ///
    /// The image is written to a temp file, checked, migrated, stamped with
    /// `meta.index` and fsynced first; only then are queries held off (the
    /// pool's write lock) while the old pool closes, the file is renamed over
    /// `state.db`, the directory fsynced and a new pool opened — a few
    /// milliseconds. Queries issued meanwhile wait, then read the new state.
    pub async fn restore(&self, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), StateError> {
        let _writer = self.writer.lock().await;
        let tmp = self.dir.join(RESTORE_TMP);
        remove_db_files(&tmp).await?;
        let prepared = async {
            // Created private (it becomes `state.db`); empty stands for an
            // empty database.
            super::make_private(&tmp).await?;
            if !data.is_empty() {
                tokio::fs::write(&tmp, &data)
                    .await
                    .map_err(io_err("writing snapshot image", &tmp))?;
            }
            drop(data);
            prepare_image(&tmp, meta.index).await?;
            fsync_file(&tmp).await
        }
        .await;
        if let Err(e) = prepared {
            let _ = remove_db_files(&tmp).await;
            return Err(e);
        }

        let db = self.dir.join(DB_FILE);
        // Best effort: empty the old WAL now, so closing the old pool below
        // (while queries wait) has little left to do.
        {
            let pool = self.pool.read().await;
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&*pool)
                .await
            {
                tracing::debug!(error = %e, "checkpoint before restore");
            }
        }
        let mut pool = self.pool.write().await;
        // Waits for every connection to close; the last one checkpoints the WAL.
        pool.close().await;
        let swapped = async {
            // Stale side files must not be replayed against the new file.
            remove_if_exists(&with_suffix(&db, "-wal")).await?;
            remove_if_exists(&with_suffix(&db, "-shm")).await?;
            tokio::fs::rename(&tmp, &db)
                .await
                .map_err(io_err("renaming snapshot image over", &db))?;
            fsync_dir(&self.dir).await
        }
        .await;
        // Reopen whatever `state.db` now is: the new image, or the old one if
        // the swap failed before the rename.
        match open_pool(&db).await {
            Ok(p) => *pool = p,
            Err(e) => return Err(swapped.err().unwrap_or(e)),
        }
        swapped?;
        drop(pool);
        self.applied.send_replace(meta.index);
        self.restores.send_modify(|n| *n += 1);
        Ok(())
    }
}
