//! Small file-system helpers that count their fsyncs. Everything they
//! create is private to the user running the node: directories 0700,
//! files 0600 (the log holds every command of the application).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use super::StorageStats;
use super::error::StorageError;

/// Mode of the directories storage creates.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of the files storage creates.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Options for creating a file with [`FILE_MODE`] (the mode applies only
/// when the file is created).
pub(crate) fn private_options() -> OpenOptions {
    let mut opts = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, FILE_MODE);
    opts
}

/// Creates one directory with [`DIR_MODE`].
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    builder.create(dir)
}

/// Takes group and other users' access from a directory that has it,
/// saying so. (Without Unix permissions: nothing to do.)
pub(crate) fn make_dir_private(dir: &Path) -> Result<(), StorageError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir)
            .map_err(StorageError::io("read the metadata of", dir))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode & DIR_MODE))
                .map_err(StorageError::io("change the mode of", dir))?;
            tracing::warn!(
                dir = %dir.display(),
                old_mode = format!("{:o}", mode & 0o7777),
                "the storage directory was open to other users: made it 0700"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// fsyncs a directory, making the creation, renaming and removal of its
/// entries durable.
pub(crate) fn sync_dir(dir: &Path, stats: &mut StorageStats) -> Result<(), StorageError> {
    let f = File::open(dir).map_err(StorageError::io("open directory", dir))?;
    f.sync_all()
        .map_err(StorageError::io("fsync directory", dir))?;
    stats.fsyncs += 1;
    Ok(())
}

/// Writes `bytes` to a new file at `path` (replacing any), and fsyncs it.
pub(crate) fn write_synced(
    path: &Path,
    bytes: &[u8],
    stats: &mut StorageStats,
) -> Result<(), StorageError> {
    let mut f = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(StorageError::io("create", path))?;
    f.write_all(bytes)
        .map_err(StorageError::io("write", path))?;
    f.sync_all().map_err(StorageError::io("fsync", path))?;
    stats.fsyncs += 1;
    Ok(())
}

/// Replaces `path` atomically with `bytes`: writes `tmp`, fsyncs it, renames
/// it over `path` and fsyncs the directory.
pub(crate) fn replace_atomically(
    dir: &Path,
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    stats: &mut StorageStats,
) -> Result<(), StorageError> {
    write_synced(tmp, bytes, stats)?;
    fs::rename(tmp, path).map_err(StorageError::io("rename into place", path))?;
    sync_dir(dir, stats)
}

/// Removes a file; a file that is already gone is fine.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<bool, StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StorageError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Creates a directory (and its parents, all with [`DIR_MODE`]) if missing;
/// returns whether it had to, having then fsynced its parent.
pub(crate) fn ensure_dir(dir: &Path, stats: &mut StorageStats) -> Result<bool, StorageError> {
    if dir.is_dir() {
        return Ok(false);
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    builder
        .create(dir)
        .map_err(StorageError::io("create directory", dir))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent, stats)?;
    }
    Ok(true)
}

/// The names of the entries of a directory, as strings (others are skipped
/// with a warning).
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<String>, StorageError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(StorageError::io("read directory", dir))? {
        let entry = entry.map_err(StorageError::io("read directory", dir))?;
        match entry.file_name().into_string() {
            Ok(name) => names.push(name),
            Err(name) => {
                tracing::warn!(dir = %dir.display(), name = ?name, "ignoring a file with a non-UTF-8 name");
            }
        }
    }
    names.sort();
    Ok(names)
}
