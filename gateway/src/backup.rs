//! Backups of the replicated state, and restoring one as a new group
//! (`gateway --restore FILE`, offline).
//!
//! A backup file (`GET /v1/admin/backup` streams one) is self-describing:
//!
//! ```text
//! ENTENTE-BACKUP 1\n
//! {"format":"sqlite","index":N,"size":S,"sha256":"<hex>",...}\n
//! <S bytes: a SQLite image of the state database>
//! ```
//!
//! The image is one read transaction of the state database (`VACUUM INTO`),
//! so it holds exactly the entries up to log index `N` (its own
//! `meta.applied_index`) and none after; `sha256` is the image's checksum.
//! Restoring checks the header, the length, the checksum and the image
//! (SQLite's integrity check, and that it records `N`), then makes the data
//! directory a new single-member group whose log starts after `N` with the
//! image as its snapshot. See docs/ARCHITECTURE.md ("Backup and restore").

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use coordinator::raft::{ConfState, HardState, Index, NodeId, SnapshotMeta};
use coordinator::storage::{Storage, StorageOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::GatewayError;

/// The first line of a backup file.
pub const MAGIC: &[u8] = b"ENTENTE-BACKUP 1\n";
/// The media type of a backup (`GET /v1/admin/backup`).
pub const MEDIA_TYPE: &str = "application/vnd.entente.backup";
/// The longest description line a backup may have.
const MAX_HEADER: usize = 4096;
/// The staging directory of a restore inside the data directory.
const STAGING: &str = "restore.tmp";

/// The description line of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// The image's format: `sqlite`.
    pub format: String,
    /// The log index the state stands at: every entry up to it, none after.
    pub index: Index,
    /// The image's length in bytes.
    pub size: u64,
    /// SHA-256 of the image, lowercase hex.
    pub sha256: String,
    /// When the backup was taken (ms since the Unix epoch).
    pub created_ms: u64,
    /// The cluster id of the group it was taken from.
    pub cluster_id: String,
    /// The gateway that served it.
    pub node_id: NodeId,
}

impl BackupHeader {
    /// The bytes that precede the image: the magic line and this header as
    /// one JSON line.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        // A struct of strings and integers always serialises.
        out.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        out.push(b'\n');
        out
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn bad(file: &Path, what: impl std::fmt::Display) -> GatewayError {
    GatewayError::Config(format!("{} is not a usable backup: {what}", file.display()))
}

fn io_at(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> GatewayError {
    let what = format!("{what} {}", path.display());
    move |source| GatewayError::Io { what, source }
}

/// Reads a backup's magic line and description.
pub fn read_header(r: &mut impl BufRead, file: &Path) -> Result<BackupHeader, GatewayError> {
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|e| {
        bad(
            file,
            format_args!("it does not start with a backup header ({e})"),
        )
    })?;
    if magic != MAGIC {
        return Err(bad(
            file,
            "it does not start with \"ENTENTE-BACKUP 1\" (not a backup, or a newer format)",
        ));
    }
    let mut line = Vec::new();
    r.take(MAX_HEADER as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(io_at("reading", file))?;
    if line.last() != Some(&b'\n') {
        return Err(bad(
            file,
            format_args!("its description line is cut off or longer than {MAX_HEADER} bytes"),
        ));
    }
    line.pop();
    let header: BackupHeader = serde_json::from_slice(&line)
        .map_err(|e| bad(file, format_args!("its description line is not valid: {e}")))?;
    if header.format != "sqlite" {
        return Err(bad(
            file,
            format_args!(
                "its image format {:?} is not known (sqlite is)",
                header.format
            ),
        ));
    }
    if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(file, "its sha256 is not 64 hex digits"));
    }
    Ok(header)
}

/// What [`restore`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The backup file.
    pub file: PathBuf,
    /// Its description.
    pub header: BackupHeader,
    /// The new group's data directory.
    pub data_dir: PathBuf,
    /// The new group's only member.
    pub node_id: NodeId,
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.header;
        writeln!(
            f,
            "restored {} (cluster {}, log index {}, {} bytes, sha256 {} checked) into {}",
            self.file.display(),
            h.cluster_id,
            h.index,
            h.size,
            h.sha256,
            self.data_dir.display()
        )?;
        writeln!(
            f,
            "a new single-member group: gateway {} is its only voter; its log continues after \
             index {}",
            self.node_id, h.index
        )?;
        writeln!(
            f,
            "every device shows offline until it connects again; the old group's API tokens, \
             devices, shadows and commands are as they were at index {}",
            h.index
        )?;
        writeln!(
            f,
            "LOST: every write the old group committed after index {}",
            h.index
        )?;
        write!(
            f,
            "next: start this gateway alone (--data-dir {} --node-id {}, --peers naming only \
             itself, no --join), then add members with POST /v1/cluster/members",
            self.data_dir.display(),
            self.node_id
        )
    }
}

/// Creates a new single-member group in `data_dir` (which must not hold a
/// group or a state database) from the backup at `backup`, with `node_id`
/// as its only voter. Offline; see the module documentation.
///
/// Crash safety: everything is built in `<data-dir>/restore.tmp` first; the
/// rename of its `raft` directory into place is the commit point (the state
/// database follows; a gateway started before it did restores the state
/// from the raft snapshot, which is the same image).
pub async fn restore(
    backup: &Path,
    data_dir: &Path,
    node_id: NodeId,
) -> Result<Restored, GatewayError> {
    crate::files::create_private_dir(data_dir).map_err(io_at("creating", data_dir))?;
    let _lock = crate::lock_data_dir(data_dir)?;
    for existing in [data_dir.join("raft"), data_dir.join("state.db")] {
        if existing.exists() {
            return Err(GatewayError::Config(format!(
                "{} exists: a backup is restored as a new group into an empty data directory \
                 (choose a new --data-dir, or move the old one away)",
                existing.display()
            )));
        }
    }
    let staging = data_dir.join(STAGING);
    if staging.exists() {
        // What a restore that did not finish left.
        std::fs::remove_dir_all(&staging).map_err(io_at("removing", &staging))?;
    }
    crate::files::create_private_dir(&staging).map_err(io_at("creating", &staging))?;
    let result = restore_into(backup, data_dir, &staging, node_id).await;
    let _ = std::fs::remove_dir_all(&staging);
    result
}

async fn restore_into(
    backup: &Path,
    data_dir: &Path,
    staging: &Path,
    node_id: NodeId,
) -> Result<Restored, GatewayError> {
    let file = std::fs::File::open(backup).map_err(io_at("opening", backup))?;
    let mut r = BufReader::with_capacity(256 << 10, file);
    let header = read_header(&mut r, backup)?;

    // The image, copied out while its checksum is computed.
    let image = staging.join("image.db");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, crate::files::FILE_MODE);
    let mut out = opts.open(&image).map_err(io_at("creating", &image))?;
    let mut hasher = Sha256::new();
    let mut left = header.size;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = r.read(&mut buf[..want]).map_err(io_at("reading", backup))?;
        if n == 0 {
            return Err(bad(
                backup,
                format_args!(
                    "it is cut off: the image has {} of its {} bytes",
                    header.size - left,
                    header.size
                ),
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_at("writing", &image))?;
        left -= n as u64;
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra).map_err(io_at("reading", backup))? != 0 {
        return Err(bad(backup, "it has bytes after the image"));
    }
    let sum = hex(&hasher.finalize());
    if sum != header.sha256.to_ascii_lowercase() {
        return Err(bad(
            backup,
            format_args!(
                "the image's checksum is {sum}, its description says {} (damaged in transit or \
                 on disk)",
                header.sha256
            ),
        ));
    }
    out.sync_all().map_err(io_at("fsyncing", &image))?;
    drop(out);

    // The state database: checked, sessions forgotten, at `index`.
    crate::state::install_new_group_image(staging, &image, header.index)
        .await
        .map_err(|e| bad(backup, e))?;
    let state_db = staging.join("state.db");

    // The log: empty, after a snapshot at `index` whose image is the state
    // database; this gateway the only voter, and the whole log committed.
    let raft = staging.join("raft");
    let (mut storage, _) = Storage::open(&raft, StorageOptions::default())?;
    let meta = SnapshotMeta {
        index: header.index,
        term: 1,
        conf_state: ConfState::with_voters([node_id]),
    };
    let mut writer = storage.snapshot_writer(&meta)?;
    let mut db = std::fs::File::open(&state_db).map_err(io_at("opening", &state_db))?;
    std::io::copy(&mut db, &mut writer).map_err(io_at("copying", &state_db))?;
    storage.finish_snapshot(writer)?;
    storage.set_hard_state(HardState {
        term: 1,
        vote: Some(node_id),
        commit: header.index,
    })?;
    storage.flush_hard_state()?;
    storage.close()?;

    // Into place: the log first (the commit point), then the state.
    let final_raft = data_dir.join("raft");
    std::fs::rename(&raft, &final_raft).map_err(io_at("renaming into place", &final_raft))?;
    sync_dir(data_dir)?;
    let final_db = data_dir.join("state.db");
    std::fs::rename(&state_db, &final_db).map_err(io_at("renaming into place", &final_db))?;
    sync_dir(data_dir)?;
    Ok(Restored {
        file: backup.to_path_buf(),
        header,
        data_dir: data_dir.to_path_buf(),
        node_id,
    })
}

fn sync_dir(dir: &Path) -> Result<(), GatewayError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at("fsyncing", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BackupHeader {
        BackupHeader {
            format: "sqlite".into(),
            index: 42,
            size: 3,
            sha256: hex(&Sha256::digest(b"abc")),
            created_ms: 1,
            cluster_id: "c".into(),
            node_id: 1,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        let bytes = h.encode();
        let mut r = &bytes[..];
        assert_eq!(read_header(&mut r, Path::new("b")).unwrap(), h);
        assert!(r.is_empty(), "the header is read exactly");
    }

    #[test]
    fn damaged_headers_are_refused_with_a_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"SQLite format 3\0".to_vec(), "does not start"),
            (b"ENTENTE-BACK".to_vec(), "does not start"),
            (MAGIC.to_vec(), "cut off"),
            ([MAGIC, b"{\"index\":1}\n"].concat(), "not valid"),
            (
                [MAGIC, &vec![b' '; MAX_HEADER + 10]].concat(),
                "cut off or longer",
            ),
            (
                {
                    let mut h = header();
                    h.format = "tar".into();
                    h.encode()
                },
                "format",
            ),
            (
                {
                    let mut h = header();
                    h.sha256 = "zz".into();
                    h.encode()
                },
                "sha256",
            ),
        ];
        for (bytes, want) in cases {
            let err = read_header(&mut &bytes[..], Path::new("b")).unwrap_err();
            assert!(err.to_string().contains(want), "{err} should say {want:?}");
        }
    }
}
