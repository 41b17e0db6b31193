//! Snapshots (`VACUUM INTO` a file) and restoring one in place of `state.db`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use coordinator::image::ImageReader;
use coordinator::raft::{Index, SnapshotMeta};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

use super::rows::store_applied_index;
use super::{
    DB_FILE, MIGRATOR, RESTORE_TMP, SNAPSHOT_TMP_PREFIX, StateDb, StateError, make_private,
    open_pool,
};

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

/// `path` as a string SQLite can take.
fn utf8(path: &Path) -> Result<String, StateError> {
    path.to_str().map(str::to_owned).ok_or_else(|| {
        io_err("writing an image to", path)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the data directory's path is not UTF-8",
        ))
    })
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
    prepare_image_with(path, index, false).await
}

/// [`prepare_image`], and when `new_group`, also forgets what only the old
/// group's gateways knew: every device session (all devices offline) and
/// the peer addresses of members added at run time.
async fn prepare_image_with(path: &Path, index: u64, new_group: bool) -> Result<(), StateError> {
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
        if new_group {
            sqlx::query("UPDATE devices SET online = 0, gateway = NULL WHERE online = 1 OR gateway IS NOT NULL")
                .execute(&mut *conn)
                .await?;
            sqlx::query("DELETE FROM peers").execute(&mut *conn).await?;
        }
        store_applied_index(&mut conn, index).await?;
        // Everything into the main file now: closing the last connection
        // would do it too, but that close may finish on SQLite's worker
        // thread after `close()` below has returned.
        let (busy, _, _): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut *conn)
                .await?;
        if busy != 0 {
            return Err(StateError::Corrupt(format!(
                "{} could not be checkpointed (busy)",
                path.display()
            )));
        }
        Ok(())
    }
    .await;
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

/// Streams a snapshot image into the (empty, private) file at `to`, on a
/// blocking thread, a buffer at a time; the reader fails at the end if the
/// image is damaged.
async fn copy_image(mut image: ImageReader, to: &Path) -> Result<(), StateError> {
    let path = to.to_path_buf();
    let copied = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::{Read, Write};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)?;
        // Written back a step at a time, not in one flush at the end,
        // which would hold up the Raft log's fsyncs on the same disk.
        let mut buf = vec![0u8; 1 << 20];
        let mut unflushed = 0u64;
        loop {
            let n = match image.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            file.write_all(&buf[..n])?;
            unflushed += n as u64;
            if unflushed >= coordinator::image::FLUSH_STEP {
                file.sync_data()?;
                unflushed = 0;
            }
        }
        file.sync_all()
    })
    .await
    .map_err(|e| io_err("writing snapshot image", to)(std::io::Error::other(e)))?;
    copied.map_err(io_err("writing snapshot image", to))
}

/// A consistent image of the state database in a file, for a backup.
#[derive(Debug)]
pub struct BackupImage {
    /// The image, open for reading from its start. Its name is already
    /// removed from the data directory: closing it frees the space.
    pub file: std::fs::File,
    /// Its length in bytes.
    pub len: u64,
    /// The log index the image stands at (every entry up to it applied,
    /// none after).
    pub index: u64,
    /// SHA-256 of the image's bytes.
    pub sha256: [u8; 32],
}

/// Reads `meta.applied_index` from a database image, read-only.
async fn image_index(path: &Path) -> Result<u64, StateError> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await?;
    let result = async {
        let mut conn = pool.acquire().await?;
        super::rows::load_applied_index(&mut conn).await
    }
    .await;
    pool.close().await;
    result
}

/// SHA-256 of everything `file` holds from its start, leaving it at its
/// start again; and its length.
fn hash_file(file: &mut std::fs::File) -> std::io::Result<([u8; 32], u64)> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    file.seek(SeekFrom::Start(0))?;
    Ok((hasher.finalize().into(), len))
}

/// Installs the database image at `image` as the state of a **new group**
/// in the empty data directory `dir`, standing at log `index`: checks it
/// (integrity, and that it records `index` as applied), brings its schema up
/// to date, marks every device offline and forgets the old group's peer
/// addresses (no session and no run-time member of the old group exists in
/// the new one), then renames it to `state.db`. The file at `image` is
/// consumed. Offline: no gateway may be running on `dir`.
pub async fn install_new_group_image(
    dir: &Path,
    image: &Path,
    index: u64,
) -> Result<(), StateError> {
    let db = dir.join(DB_FILE);
    if tokio::fs::try_exists(&db).await.unwrap_or(true) {
        return Err(StateError::Corrupt(format!(
            "{} already exists: a new group's state goes into an empty data directory",
            db.display()
        )));
    }
    let found = image_index(image).await?;
    if found != index {
        return Err(StateError::Corrupt(format!(
            "the image records log index {found} as applied, its description says {index}"
        )));
    }
    let tmp = dir.join(RESTORE_TMP);
    remove_db_files(&tmp).await?;
    tokio::fs::rename(image, &tmp)
        .await
        .map_err(io_err("moving the image to", &tmp))?;
    let prepared = async {
        super::make_private(&tmp).await?;
        prepare_image_with(&tmp, index, true).await?;
        fsync_file(&tmp).await?;
        tokio::fs::rename(&tmp, &db)
            .await
            .map_err(io_err("renaming the image to", &db))?;
        fsync_dir(dir).await
    }
    .await;
    if prepared.is_err() {
        let _ = remove_db_files(&tmp).await;
    }
    prepared
}

impl StateDb {
    /// A consistent image of the database for a backup (`VACUUM INTO` a
    /// temp file in the data directory, which is unlinked once open), with
    /// the log index it stands at and its checksum. Writers go on meanwhile
    /// (WAL mode: the image is one read transaction).
    pub async fn backup_image(&self) -> Result<BackupImage, StateError> {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!("{SNAPSHOT_TMP_PREFIX}backup-{n}.tmp"));
        remove_db_files(&path).await?;
        super::make_private(&path).await?;
        let result = async {
            let target = utf8(&path)?;
            {
                let pool = self.pool.read().await;
                sqlx::query("VACUUM INTO ?")
                    .bind(&target)
                    .execute(&*pool)
                    .await?;
            }
            let index = image_index(&path).await?;
            let mut file =
                std::fs::File::open(&path).map_err(io_err("opening backup image", &path))?;
            let hashed = tokio::task::spawn_blocking(move || {
                let r = hash_file(&mut file);
                r.map(|(sha, len)| (file, sha, len))
            })
            .await
            .map_err(|e| io_err("hashing backup image", &path)(std::io::Error::other(e)))?;
            let (file, sha256, len) = hashed.map_err(io_err("reading backup image", &path))?;
            Ok::<_, StateError>(BackupImage {
                file,
                len,
                index,
                sha256,
            })
        }
        .await;
        // The open file keeps the image; its name goes now (or on failure).
        let cleanup = remove_db_files(&path).await;
        let image = result?;
        cleanup?;
        Ok(image)
    }

    /// Writes a consistent image of the database into the empty file
    /// `dest` (`VACUUM INTO`: one read transaction on a connection of its
    /// own, so apply goes on meanwhile — WAL mode) and returns the log index
    /// it stands at, as recorded in the image itself (the applied index
    /// and the state it covers are written in one transaction).
    pub async fn write_image(&self, dest: &Path) -> Result<Index, StateError> {
        // `VACUUM INTO` fills an empty file, which keeps the mode it has.
        make_private(dest).await?;
        let target = utf8(dest)?;
        {
            // Held so that a restore does not swap the file meanwhile.
            let _pool = self.pool.read().await;
            // A connection of its own, so no reader waits for one; a large
            // state takes seconds, which is expected: not logged as a slow
            // statement.
            let opts = super::connect_options(&self.dir.join(DB_FILE)).disable_statement_logging();
            let mut conn = SqliteConnection::connect_with(&opts).await?;
            let vacuumed = sqlx::query("VACUUM INTO ?")
                .bind(&target)
                .execute(&mut conn)
                .await;
            if let Err(e) = conn.close().await {
                tracing::debug!(error = %e, "closing the snapshot connection");
            }
            vacuumed?;
        }
        image_index(dest).await
    }

    /// Replaces the database with a snapshot image (empty data = an empty
    /// database at `meta.index`), atomically.
    ///
    /// The image is written to a temp file, checked, migrated, stamped with
    /// `meta.index` and fsynced first; only then are queries held off (the
    /// pool's write lock) while the old pool closes, the file is renamed over
    /// `state.db`, the directory fsynced and a new pool opened — a few
    /// milliseconds. Queries issued meanwhile wait, then read the new state.
    pub async fn restore(&self, meta: &SnapshotMeta, image: ImageReader) -> Result<(), StateError> {
        let mut writer = self.writer.lock().await;
        let tmp = self.dir.join(RESTORE_TMP);
        remove_db_files(&tmp).await?;
        let prepared = async {
            // Created private (it becomes `state.db`); empty stands for an
            // empty database.
            super::make_private(&tmp).await?;
            if !image.is_empty() {
                copy_image(image, &tmp).await?;
            }
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
        // Apply's connection goes first (it would go on writing to the old
        // file); apply opens a new one on the new file.
        if let Some(w) = writer.take()
            && let Err(e) = w.close().await
        {
            tracing::debug!(error = %e, "closing the writer before restore");
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
        // Before queries resume on the new state.
        self.forget_tokens();
        swapped?;
        drop(pool);
        self.applied.send_replace(meta.index);
        self.restores.send_modify(|n| *n += 1);
        Ok(())
    }
}
