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
