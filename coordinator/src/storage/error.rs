//! Errors of the durable storage.

use std::io;
use std::path::PathBuf;

use crate::raft::{Index, Term};

/// Why [`super::Storage`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("open", "fsync", ...).
        op: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The error the operating system returned.
        #[source]
        source: io::Error,
    },
    /// Durable state is damaged in a way that recovery must not paper over.
    #[error("corrupt {path} at byte offset {offset}: {kind}")]
    Corrupt {
        /// The damaged file (or directory).
        path: PathBuf,
        /// Where in it the damage starts.
        offset: u64,
        /// What is wrong.
        kind: Corruption,
    },
    /// The entries passed to [`super::Storage::append`] do not continue the log.
    #[error("cannot append entry {index}: {reason}")]
    InvalidAppend {
        /// The offending entry's index.
        index: Index,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An entry, once encoded, is larger than
    /// [`super::StorageOptions::max_record_size`].
    #[error("entry {index} encodes to {len} bytes, over the maximum record size {max}")]
    RecordTooLarge {
        /// The entry's index.
        index: Index,
        /// Its encoded size.
        len: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A value could not be encoded.
    #[error("encoding failed: {0}")]
    Encode(#[from] postcard::Error),
    /// A snapshot older than the latest stored one was offered.
    #[error("snapshot {index}/{term} is older than the latest stored snapshot at index {latest}")]
    StaleSnapshot {
        /// The offered snapshot's index.
        index: Index,
        /// The offered snapshot's term.
        term: Term,
        /// The latest stored snapshot's index.
        latest: Index,
    },
    /// The snapshot asked for is not stored (never was, or was pruned).
    #[error("no stored snapshot {index}/{term}")]
    SnapshotNotFound {
        /// Its index.
        index: Index,
        /// Its term.
        term: Term,
    },
    /// [`super::Storage::compact`] was asked to drop entries no durable
    /// snapshot covers.
    #[error("cannot compact the log to {index}: the latest snapshot ends at {snapshot}")]
    CompactBeyondSnapshot {
        /// The index asked for.
        index: Index,
        /// The latest snapshot's index.
        snapshot: Index,
    },
    /// An earlier write or fsync failed, so what is on disk is unknown; the
    /// storage refuses further changes. Reopen it to recover.
    #[error("storage refuses writes after an earlier I/O failure; reopen it to recover")]
    Poisoned,
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| StorageError::Io { op, path, source }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, offset: u64, kind: Corruption) -> Self {
        StorageError::Corrupt {
            path: path.into(),
            offset,
            kind,
        }
    }

    /// Whether the error reports damaged durable state (as opposed to an I/O
    /// failure or a misuse of the API).
    pub fn is_corruption(&self) -> bool {
        matches!(self, StorageError::Corrupt { .. })
    }
}

/// What exactly is damaged, for [`StorageError::Corrupt`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// Fewer than the 8 bytes of a record header remain.
    #[error("record header cut short: {available} of 8 bytes")]
    ShortHeader {
        /// Bytes left in the file.
        available: u64,
    },
    /// A record claims to hold nothing (zero-filled space, never written).
    #[error("record length is zero")]
    ZeroLength,
    /// A record's length is over the configured maximum.
    #[error("record length {len} exceeds the maximum {max}")]
    TooLong {
        /// The stored length.
        len: u64,
        /// The maximum.
        max: u64,
    },
    /// A record's length runs past the end of the file.
    #[error("record length {len} runs past the end of the file ({available} bytes left)")]
    BeyondEnd {
        /// The stored length.
        len: u64,
        /// Payload bytes actually left.
        available: u64,
    },
    /// A record's payload does not match its checksum.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the payload as read.
        computed: u32,
    },
    /// A record's checksum matches but its payload does not decode.
    #[error("record does not decode: {0}")]
    Decode(String),
    /// Bytes follow the single record a file should hold.
    #[error("{0} unexpected bytes after the record")]
    TrailingBytes(u64),
    /// A file or directory name does not follow the storage's naming scheme.
    #[error("unrecognised name")]
    BadName,
    /// A segment is missing: sequence numbers are not consecutive.
    #[error("segment sequence gap: expected {expected:016x}, found {found:016x}")]
    SequenceGap {
        /// The sequence number that should come next.
        expected: u64,
        /// The one that does.
        found: u64,
    },
    /// A segment does not start where the log before it ends.
    #[error("segment should start at log index {expected} but its name says {found}")]
    SegmentStart {
        /// The index the log continues at.
        expected: Index,
        /// The first index in the segment's name.
        found: Index,
    },
    /// An entry does not follow the entries before it.
    #[error("entry index {found} leaves a gap: the log ends at {last}")]
    IndexGap {
        /// The last index of the log so far.
        last: Index,
        /// The entry's index.
        found: Index,
    },
    /// An entry has index 0, which no entry has.
    #[error("entry with index 0")]
    ZeroIndex,
    /// A log-restart record disagrees with its segment's name.
    #[error("log restart after index {index} in a segment named for index {named}")]
    RestartMismatch {
        /// The index in the record.
        index: Index,
        /// The first index in the segment's name.
        named: Index,
    },
    /// The log does not reach back to the latest snapshot: entries between
    /// them are missing.
    #[error("the log starts after index {base} but the latest snapshot ends at {snapshot}")]
    LogAfterSnapshot {
        /// The last index before the first stored entry.
        base: Index,
        /// The latest snapshot's index.
        snapshot: Index,
    },
    /// A snapshot's metadata names another snapshot than its directory.
    #[error("snapshot metadata is for {index}/{term}, its directory for {dir_index}/{dir_term}")]
    SnapshotNameMismatch {
        /// Index in the metadata.
        index: Index,
        /// Term in the metadata.
        term: Term,
        /// Index in the directory name.
        dir_index: Index,
        /// Term in the directory name.
        dir_term: Term,
    },
    /// A snapshot image has another length than its metadata records.
    #[error("snapshot data is {actual} bytes, its metadata says {expected}")]
    SnapshotDataLength {
        /// Length in the metadata.
        expected: u64,
        /// Length of the file.
        actual: u64,
    },
    /// A snapshot image does not match its checksum.
    #[error("snapshot data checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    SnapshotDataChecksum {
        /// The checksum in the metadata.
        stored: u32,
        /// The checksum of the data as read.
        computed: u32,
    },
}
