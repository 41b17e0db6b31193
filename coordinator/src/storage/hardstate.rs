//! The `hardstate` file: one framed record, replaced atomically.

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::StorageStats;
use super::error::{Corruption, StorageError};
use super::fsutil;
use super::record;
use crate::raft::HardState;

/// Name of the hard state file inside the storage directory.
pub(crate) const FILE: &str = "hardstate";
/// Name of the file a new hard state is written to before it is renamed.
pub(crate) const TMP_FILE: &str = "hardstate.tmp";
/// The hard state file is tiny; anything larger is damage.
const MAX_PAYLOAD: u64 = 4096;

/// What the file holds; the variant doubles as a format version.
#[derive(Serialize, Deserialize)]
enum HardStateRecord {
    V1(HardState),
}

/// Reads the hard state in `dir`, or `None` if none was ever written.
pub(crate) fn read(dir: &Path) -> Result<Option<HardState>, StorageError> {
    let path = dir.join(FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StorageError::Io {
                op: "read",
                path,
                source: e,
            });
        }
    };
    let (payload, len) =
        record::read_frame(&bytes, MAX_PAYLOAD).map_err(|k| StorageError::corrupt(&path, 0, k))?;
    if len != bytes.len() {
        return Err(StorageError::corrupt(
            &path,
            len as u64,
            Corruption::TrailingBytes((bytes.len() - len) as u64),
        ));
    }
    match record::decode::<HardStateRecord>(payload) {
        Ok(HardStateRecord::V1(hs)) => Ok(Some(hs)),
        Err(k) => Err(StorageError::corrupt(&path, 0, k)),
    }
}

/// Replaces the hard state in `dir` atomically and durably.
pub(crate) fn write(
    dir: &Path,
    hs: &HardState,
    stats: &mut StorageStats,
) -> Result<(), StorageError> {
    let mut buf = Vec::with_capacity(64);
    record::append_frame(&mut buf, &HardStateRecord::V1(*hs), MAX_PAYLOAD).map_err(
        |e| match e {
            record::FrameError::Encode(e) => StorageError::Encode(e),
            // A hard state encodes to a few dozen bytes; this cannot happen.
            record::FrameError::TooLarge(_) => {
                StorageError::Encode(postcard::Error::SerializeBufferFull)
            }
        },
    )?;
    fsutil::replace_atomically(dir, &dir.join(FILE), &dir.join(TMP_FILE), &buf, stats)?;
    stats.hard_state_writes += 1;
    Ok(())
}
