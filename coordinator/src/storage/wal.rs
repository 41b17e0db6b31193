//! Write-ahead log segments: naming, record types and replay.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Corruption, StorageError};
use super::fsutil;
use super::record;
use crate::raft::{Entry, Index, Term};

/// Suffix of segment files.
pub(crate) const SEGMENT_SUFFIX: &str = ".wal";
/// Suffix of a segment being prepared before it is renamed into place.
pub(crate) const TMP_SUFFIX: &str = ".wal.tmp";

/// A record as written (borrowing the entry).
#[derive(Serialize)]
pub(crate) enum RecordRef<'a> {
    /// One log entry. An index at or below the log's last one replaces that
    /// entry and everything after it.
    Entry(&'a Entry),
    /// The log restarts after `index`: every earlier record is void and a
    /// snapshot covers everything up to `index`. Only ever the first record
    /// of a segment.
    Restart {
        /// The snapshot's index.
        index: Index,
        /// The snapshot's term.
        term: Term,
    },
}

/// A record as read. Must mirror [`RecordRef`] variant for variant.
#[derive(Deserialize)]
pub(crate) enum Record {
    Entry(Entry),
    Restart {
        index: Index,
        #[allow(dead_code)]
        term: Term,
    },
}

/// The file name of segment `seq` whose records continue the log at `first_index`.
pub(crate) fn segment_name(seq: u64, first_index: Index) -> String {
    format!("{seq:016x}-{first_index:016x}{SEGMENT_SUFFIX}")
}

/// The sequence number and first index in a segment file name.
pub(crate) fn parse_segment_name(name: &str) -> Option<(u64, Index)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    let (seq, first) = stem.split_once('-')?;
    if seq.len() != 16 || first.len() != 16 {
        return None;
    }
    let first = u64::from_str_radix(first, 16).ok()?;
    // Index 0 is never an entry's, so no segment can start there.
    (first > 0).then_some((u64::from_str_radix(seq, 16).ok()?, first))
}

/// What the storage remembers about a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Sequence number: segments are replayed in this order, without gaps.
    pub(crate) seq: u64,
    /// The index the log continued at when the segment was created.
    pub(crate) first_index: Index,
    /// The highest index any record in it mentions (or `first_index - 1`).
    pub(crate) max_index: Index,
    /// Bytes of valid records.
    pub(crate) len: u64,
    /// Bytes known to be durable.
    pub(crate) synced_len: u64,
}

impl Segment {
    pub(crate) fn name(&self) -> String {
        segment_name(self.seq, self.first_index)
    }
}

/// The log as the segments describe it.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// Segments in order, the last one the active one.
    pub(crate) segments: Vec<Segment>,
    /// The index just before `entries`.
    pub(crate) base: Index,
    /// The surviving entries, `base + 1` onwards.
    pub(crate) entries: Vec<Entry>,
    /// A damaged tail of the last segment, to be cut off: offset and why.
    pub(crate) torn: Option<(u64, Corruption)>,
    /// The position in `segments` of the last segment that starts with a
    /// restart marker, if any.
    pub(crate) restart_segment: Option<usize>,
}

impl Replayed {
    pub(crate) fn last(&self) -> Index {
        self.base + self.entries.len() as u64
    }

    /// The index a record continuing the log has.
    fn next(&self) -> Index {
        self.last().saturating_add(1)
    }
}

/// Replays every segment in `wal_dir`. Removes segments left half-created
/// (`*.wal.tmp`). Does not modify any segment: a torn tail is reported in
/// [`Replayed::torn`].
pub(crate) fn replay(wal_dir: &Path, max_payload: u64) -> Result<Replayed, StorageError> {
    let mut files = Vec::new();
    for name in fsutil::list_dir(wal_dir)? {
        let path = wal_dir.join(&name);
        if name.ends_with(TMP_SUFFIX) {
            tracing::info!(file = %path.display(), "removing an unfinished segment");
            fsutil::remove_file_if_exists(&path)?;
            continue;
        }
        if !name.ends_with(SEGMENT_SUFFIX) {
            tracing::warn!(path = %path.display(), "ignoring an unknown file in the log directory");
            continue;
        }
        let Some((seq, first)) = parse_segment_name(&name) else {
            return Err(StorageError::corrupt(path, 0, Corruption::BadName));
        };
        files.push((seq, first, path));
    }
    files.sort_by_key(|f| f.0);

    let mut out = Replayed::default();
    let count = files.len();
    for (i, (seq, first, path)) in files.into_iter().enumerate() {
        if let Some(prev) = out.segments.last() {
            if prev.seq.checked_add(1) != Some(seq) {
                return Err(StorageError::corrupt(
                    path,
                    0,
                    Corruption::SequenceGap {
                        expected: prev.seq.wrapping_add(1),
                        found: seq,
                    },
                ));
            }
        } else {
            out.base = first - 1;
        }
        let is_last = i + 1 == count;
        let segment = replay_segment(&mut out, seq, first, &path, is_last, max_payload)?;
        out.segments.push(segment);
    }
    Ok(out)
}

/// Replays one segment into `out`.
fn replay_segment(
    out: &mut Replayed,
    seq: u64,
    first: Index,
    path: &PathBuf,
    is_last: bool,
    max_payload: u64,
) -> Result<Segment, StorageError> {
    let bytes = fs::read(path).map_err(StorageError::io("read", path))?;
    let mut at = 0usize;
    let mut max_index = first - 1;
    let mut seen_record = false;
    while at < bytes.len() {
        let (payload, len) = match record::read_frame(&bytes[at..], max_payload) {
            Ok(frame) => frame,
            Err(kind) => {
                // Damage with a valid record after it is not a torn write.
                let rest = bytes.get(at + 1..).unwrap_or_default();
                if is_last && !record::valid_record_within::<Record>(rest, max_payload) {
                    out.torn = Some((at as u64, kind));
                    break;
                }
                return Err(StorageError::corrupt(path, at as u64, kind));
            }
        };
        let rec: Record =
            record::decode(payload).map_err(|k| StorageError::corrupt(path, at as u64, k))?;
        if !seen_record {
            check_start(out, &rec, first, path)?;
            seen_record = true;
            if matches!(rec, Record::Restart { .. }) {
                out.restart_segment = Some(out.segments.len());
            }
        }
        match rec {
            Record::Entry(entry) => {
                let index = entry.index;
                if index == 0 {
                    return Err(StorageError::corrupt(
                        path,
                        at as u64,
                        Corruption::ZeroIndex,
                    ));
                }
                let last = out.last();
                if index > out.next() {
                    return Err(StorageError::corrupt(
                        path,
                        at as u64,
                        Corruption::IndexGap { last, found: index },
                    ));
                }
                // Raft truncation: this entry replaces the one at its index
                // and everything after it.
                if index - 1 < out.base {
                    out.entries.clear();
                    out.base = index - 1;
                } else {
                    out.entries.truncate((index - 1 - out.base) as usize);
                }
                out.entries.push(entry);
                max_index = max_index.max(index);
            }
            Record::Restart { index, .. } => {
                out.entries.clear();
                out.base = index;
                max_index = max_index.max(index);
            }
        }
        at += len;
    }
    if !seen_record && out.next() != first {
        return Err(StorageError::corrupt(
            path,
            0,
            Corruption::SegmentStart {
                expected: out.next(),
                found: first,
            },
        ));
    }
    Ok(Segment {
        seq,
        first_index: first,
        max_index,
        len: at as u64,
        synced_len: at as u64,
    })
}

/// Checks that a segment whose first record is `rec` continues the log.
fn check_start(
    out: &Replayed,
    rec: &Record,
    first: Index,
    path: &PathBuf,
) -> Result<(), StorageError> {
    match *rec {
        Record::Restart { index, .. } if index.checked_add(1) != Some(first) => {
            Err(StorageError::corrupt(
                path,
                0,
                Corruption::RestartMismatch {
                    index,
                    named: first,
                },
            ))
        }
        Record::Restart { .. } => Ok(()),
        Record::Entry(_) if out.next() != first => Err(StorageError::corrupt(
            path,
            0,
            Corruption::SegmentStart {
                expected: out.next(),
                found: first,
            },
        )),
        Record::Entry(_) => Ok(()),
    }
}
