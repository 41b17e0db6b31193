//! The data directory is private: the directory 0700, every file in it 0600
//! (the state database holds secret and token hashes, the log every
//! command, and the directory the admin token and the cluster secret).

use std::io;
use std::path::Path;

/// Mode of the data directory and the directories in it.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file the gateway writes.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` and any missing parents, new ones with [`DIR_MODE`].
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    builder.create(dir)
}

/// Takes from `path` every permission beyond `allowed` (symbolic links are
/// left alone). Returns the old mode if it changed anything.
#[cfg(unix)]
pub(crate) fn tighten(path: &Path, allowed: u32) -> io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(None);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !allowed == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & allowed))?;
    Ok(Some(mode))
}

/// Without Unix permissions there is nothing to tighten.
#[cfg(not(unix))]
pub(crate) fn tighten(_path: &Path, _allowed: u32) -> io::Result<Option<u32>> {
    Ok(None)
}

/// Makes `dir` and everything under it private, as an older version (or an
/// operator) may have left it readable by others. Returns how many entries
/// it changed; symbolic links are not followed.
pub(crate) fn tighten_tree(dir: &Path) -> io::Result<usize> {
    let mut changed = usize::from(tighten(dir, DIR_MODE)?.is_some());
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            changed += tighten_tree(&entry.path())?;
        } else if kind.is_file() && tighten(&entry.path(), FILE_MODE)?.is_some() {
            changed += 1;
        }
    }
    Ok(changed)
}

/// Options that create a file with [`FILE_MODE`] (truncating an existing
/// one, whose mode stays as it is).
pub(crate) fn private_options() -> tokio::fs::OpenOptions {
    let mut opts = tokio::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(FILE_MODE);
    opts
}

/// The lock file in a data directory.
pub const LOCK_FILE: &str = "LOCK";

/// An exclusive lock on a data directory, held while the value lives (the
/// operating system releases it when the process ends, however it ends).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Why a data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "the data directory {dir} is in use by another process ({holder}); stop it first, or \
         use another --data-dir"
    )]
    Held {
        /// The data directory.
        dir: std::path::PathBuf,
        /// What the lock file says of its holder.
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("locking the data directory {dir}: {source}")]
    Io {
        /// The data directory.
        dir: std::path::PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Takes the exclusive lock on data directory `dir` (which must exist):
/// `<dir>/LOCK`, locked with the operating system's file lock and holding
/// the holder's process id. A second gateway (or `--recover`, `--restore`)
/// on the same directory is refused, naming the holder.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LockError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let err = |source| LockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, FILE_MODE);
    let mut file = opts.open(&path).map_err(err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.take(256).read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "a process that has not said which".to_string(),
                t => t.to_string(),
            };
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
    }
    file.set_len(0).map_err(err)?;
    file.rewind().map_err(err)?;
    write!(file, "pid {}", std::process::id()).map_err(err)?;
    Ok(DirLock { _file: file })
}
