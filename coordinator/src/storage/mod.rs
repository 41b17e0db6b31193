//! Durable storage for the Raft core: a segmented write-ahead log, the hard
//! state and snapshots, with crash recovery.
//!
//! [`Storage::open`] takes a directory (the driver passes `<data-dir>/raft`)
//! and returns the storage together with what it [`Recovered`], from which
//! the driver builds the core's [`InitialState`].
//!
//! # Layout
//!
//! ```text
//! <dir>/hardstate                  term, vote, commit: one record
//! <dir>/wal/<seq>-<first>.wal      log segments (16 hex digits each)
//! <dir>/snapshots/<index>-<term>/  meta (one record) and data (the image)
//! ```
//!
//! Every file that holds records frames them as `[len u32 LE][crc32c u32
//! LE][payload]`, the CRC-32C covering the payload, the payload a postcard
//! encoding. A length of zero never occurs, so zero-filled space reads as
//! damage.
//!
//! Directories are created 0700 and files 0600 (the log holds everything
//! the application proposed); [`Storage::open`] makes a `<dir>` found open
//! to other users 0700, with a warning.
//!
//! # The write-ahead log
//!
//! Each record of a segment is either one [`Entry`] or a *restart* marker
//! (see below). Segment `seq` numbers are consecutive; `first` is the index
//! the log continued at when the segment was created. A new segment is
//! started when the next record would grow the current one past
//! [`StorageOptions::segment_size`]; the full one is fsynced first, and the
//! new file's directory entry is fsynced before anything is written to it.
//!
//! Appending an entry whose index is at or below the last stored one is Raft
//! truncation: the record is simply written, and replay drops the entry at
//! that index and everything after it before taking the new one.
//!
//! [`Storage::append`] only writes (one `write` per call, so the data is
//! safe from a crash of the process but not of the machine);
//! [`Storage::sync`] makes everything appended so far durable with one
//! `fdatasync` of the active segment. That is group commit: the driver
//! appends the entries of any number of [`Ready`](crate::raft::Ready)s and
//! syncs once. The sync can also run on another thread, while the driver
//! keeps appending: [`Storage::begin_sync`], [`SyncJob::run`],
//! [`Storage::finish_sync`].
//!
//! When a snapshot is stored whose last entry the log does not hold (one
//! received from the leader), the log restarts after it: a segment starting
//! with a restart marker is written (as `*.wal.tmp`, fsynced, renamed), then
//! every older segment is deleted, oldest first.
//! [`Storage::install_snapshot_image`] (the node driver's way) always
//! restarts the log, with the entries that follow the snapshot in the
//! restart segment, and writes that segment before the snapshot is renamed
//! into place: a crash between leaves a restart without its snapshot, which
//! open rolls back.
//!
//! [`Storage::compact`] deletes whole segments, oldest first, while every
//! index they mention is covered by the snapshot (never the active segment).
//!
//! # Hard state
//!
//! [`Storage::set_hard_state`] replaces `hardstate` atomically (write
//! `hardstate.tmp`, fsync, rename, fsync the directory) before it returns
//! whenever the term or the vote changed. **A change of the commit index
//! alone is deferred**: it is kept in memory and written out with the next
//! term or vote change, by [`Storage::compact`], by storing a snapshot, by
//! [`Storage::flush_hard_state`] and by [`Storage::close`]. The durable
//! commit index may therefore lag; the driver recovers the commit index as
//! `max(durable commit, applied index)` (which the core does on its own from
//! [`InitialState::applied`]).
//!
//! # Snapshots
//!
//! A snapshot is written into `snapshots/tmp-…/`, its files and that
//! directory are fsynced, it is renamed to `snapshots/<index>-<term>/` and
//! the parent is fsynced. The newest [`StorageOptions::snapshots_to_keep`]
//! (2) are kept; older ones are renamed to `tmp-…` and removed, on a
//! background thread, after an fsync of the snapshot directory. Background
//! removals (pruned snapshots, compacted segments) run one after another
//! in the order they were started, so a crash leaves no gap in the log;
//! anything that removes segments itself waits for them first. A snapshot
//! prepared beside the storage ([`Storage::snapshot_preparer`]) stays in
//! its `tmp-…` directory until [`Storage::register_snapshot`] renames it
//! into place (the next compaction fsyncs the parent before removing a
//! segment); [`Storage::discard_snapshot`] removes it instead. The image
//! can be streamed in ([`SnapshotWriter`]) and out ([`SnapshotReader`])
//! without holding it in memory; its length and checksum are in `meta`.
//!
//! # Recovery
//!
//! [`Storage::open`] first removes what interrupted writes left behind
//! (`hardstate.tmp`, `snapshots/tmp-*`, `wal/*.wal.tmp`), then:
//!
//! * A damaged record at the tail of the **last** segment with nothing
//!   valid after it (a header cut short, a zero length, a length beyond the
//!   end of the file or over [`StorageOptions::max_record_size`], a checksum
//!   mismatch) is a write torn by a crash: the file is truncated there and
//!   the cut is logged (`tracing::warn!`, naming the file and offset).
//!   "Nothing valid after it" means no byte offset after the damage starts
//!   a record whose checksum matches and whose payload decodes.
//! * Any other damage is an error naming the file and byte offset: a bad
//!   record in an earlier segment, or in the last one with a valid record
//!   after it; a missing segment (sequence gap); a segment that does not
//!   continue the log where the one before ends (reordered or renamed
//!   segments); an entry index that leaves a gap; a log that starts after
//!   the latest snapshot; an unreadable or damaged `hardstate` or snapshot
//!   `meta`, or an image whose length differs from its `meta`. No entry is
//!   ever dropped to get past such damage, and none is invented.
//! * A last segment that restarts the log after a snapshot that is not
//!   stored (newer than the latest) is an interrupted
//!   [`Storage::install_snapshot_image`]: it is removed (logged), and the
//!   log is the one before it.
//! * Entries at or below the latest snapshot are dropped; the first entry
//!   kept is the snapshot's index + 1. If the log ends before the snapshot,
//!   or holds another term at the snapshot's index (a crash after a snapshot
//!   from the leader was stored and before the log restarted), the log is
//!   restarted as above; entries after the snapshot that conflict with it
//!   are discarded with a warning, as the core would have discarded them.
//! * The active segment and the directories are fsynced, so nothing that a
//!   crashed process left only in the page cache is reported as durable.
//!
//! # Driving the core
//!
//! * Start: [`Storage::open`], restore the state machine from
//!   [`Storage::read_snapshot_data`] (or [`Storage::open_snapshot`]) of
//!   [`Recovered::snapshot`], then `Raft::new(config,
//!   recovered.into_initial_state(initial_membership))`.
//! * Each [`Ready`](crate::raft::Ready), step 2:
//!   [`Storage::install_snapshot_image`] with the received image and the
//!   `Ready`'s entries that follow it (the node driver's way; or
//!   [`Storage::save_snapshot`] / [`Storage::save_snapshot_image`], after
//!   which the log restarts if it does not hold the snapshot). Step 3:
//!   [`Storage::append`] the entries and [`Storage::set_hard_state`]; then
//!   one [`Storage::sync`] may cover the entries of several `Ready`s, and
//!   `persisted_messages` may leave, and `advance` be called, only after it.
//! * Local snapshot: `let meta = raft.compact(i)?`, then
//!   [`Storage::save_snapshot`] (or [`Storage::save_snapshot_image`]) with
//!   the image at `i`, then
//!   [`Storage::compact`]`(meta.index)` (or lower, to keep a tail).
//! * Stop: [`Storage::close`]. Dropping the storage instead is a crash as
//!   far as unsynced entries and the deferred commit index are concerned.

mod error;
mod fsutil;
mod hardstate;
mod record;
mod snapshot;
#[cfg(test)]
mod tests;
mod wal;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{Corruption, StorageError};
pub use snapshot::{SnapshotReader, SnapshotWriter};

use crate::raft::{ConfState, Entry, HardState, Index, InitialState, SnapshotMeta, Term};
use record::FrameError;
use snapshot::SnapshotInfo;
use wal::{RecordRef, Segment};

/// Subdirectory holding the log segments.
const WAL_DIR: &str = "wal";
/// Subdirectory holding the snapshots.
const SNAPSHOT_DIR: &str = "snapshots";

/// Tunables of [`Storage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageOptions {
    /// A new log segment is started when the next record would grow the
    /// current one past this many bytes. Default 64 MiB.
    pub segment_size: u64,
    /// The largest record payload accepted when appending, and believed when
    /// reading; a longer length field is damage. Default 64 MiB.
    pub max_record_size: u64,
    /// How many snapshots to keep (at least 1). Default 2, so that the
    /// previous one can still be streamed to a follower.
    pub snapshots_to_keep: usize,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            segment_size: 64 << 20,
            max_record_size: 64 << 20,
            snapshots_to_keep: 2,
        }
    }
}

/// Counters of the work a [`Storage`] did since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Every fsync or fdatasync issued: log segments, directories, hard
    /// state and snapshot files. Divide by committed entries for "fsyncs per
    /// entry".
    pub fsyncs: u64,
    /// Of those, the log syncs that [`Storage::sync`] (or
    /// [`Storage::finish_sync`]) issued; a sync with nothing new to make
    /// durable issues none.
    pub wal_syncs: u64,
    /// Entries written to the log.
    pub entries_written: u64,
    /// Bytes written to the log, record headers included.
    pub bytes_written: u64,
    /// Times the hard state file was replaced.
    pub hard_state_writes: u64,
}

/// What [`Storage::open`] found: everything the core needs to restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The durable hard state (default if none was ever written). Its
    /// `commit` may lag behind what was committed: see the module docs.
    pub hard_state: HardState,
    /// The latest snapshot, if any.
    pub snapshot: Option<SnapshotMeta>,
    /// The entries after the snapshot, contiguous from its index + 1.
    pub entries: Vec<Entry>,
}

impl Recovered {
    /// The core's starting point. `initial_conf` is the group's initial
    /// membership, used only when there is no snapshot yet. `applied` is set
    /// to the snapshot's index, which is right for a state machine rebuilt
    /// from the snapshot image; a driver whose state machine is itself
    /// durable raises it to what that state machine has applied.
    pub fn into_initial_state(self, initial_conf: ConfState) -> InitialState {
        let snapshot = self.snapshot.unwrap_or(SnapshotMeta {
            index: 0,
            term: 0,
            conf_state: initial_conf,
        });
        InitialState {
            hard_state: self.hard_state,
            applied: snapshot.index,
            snapshot,
            entries: self.entries,
        }
    }
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    seg: Segment,
    file: Arc<File>,
}

/// The terms of the stored entries after the snapshot, run-length encoded:
/// each run `(first index, term)` lasts until the next one or `last`.
#[derive(Debug, Default)]
struct TermRuns {
    runs: Vec<(Index, Term)>,
    last: Index,
}

impl TermRuns {
    fn term(&self, index: Index) -> Option<Term> {
        if index > self.last {
            return None;
        }
        let i = self.runs.partition_point(|r| r.0 <= index);
        i.checked_sub(1).map(|i| self.runs[i].1)
    }

    /// Forgets every entry after `index`.
    fn truncate_after(&mut self, index: Index) {
        let i = self.runs.partition_point(|r| r.0 <= index);
        self.runs.truncate(i);
        self.last = self.last.min(index);
    }

    fn push(&mut self, index: Index, term: Term) {
        if self.runs.last().is_none_or(|r| r.1 != term) {
            self.runs.push((index, term));
        }
        self.last = index;
    }

    /// Forgets every run that ends at or before `index`.
    fn compact(&mut self, index: Index) {
        let i = self.runs.partition_point(|r| r.0 <= index);
        if i > 1 {
            self.runs.drain(..i - 1);
        }
    }

    fn reset(&mut self, last: Index) {
        self.runs.clear();
        self.last = last;
    }
}

/// A log sync that can run without borrowing the [`Storage`], e.g. on a
/// blocking thread while the driver keeps appending. Made by
/// [`Storage::begin_sync`]; run it, then hand the result to
/// [`Storage::finish_sync`].
#[derive(Debug)]
#[must_use = "a sync job does nothing unless run and finished"]
pub struct SyncJob {
    file: Option<Arc<File>>,
    path: PathBuf,
    seq: u64,
    len: u64,
    last_index: Index,
}

impl SyncJob {
    /// The log's last index when the job was made: once it has finished,
    /// every entry up to it that is still in the log is durable.
    pub fn last_index(&self) -> Index {
        self.last_index
    }

    /// Issues the fdatasync (if anything was unsynced). Blocking.
    pub fn run(self) -> SyncDone {
        let result = match &self.file {
            None => Ok(false),
            Some(file) => file
                .sync_data()
                .map(|()| true)
                .map_err(StorageError::io("fsync", &self.path)),
        };
        SyncDone {
            seq: self.seq,
            len: self.len,
            last_index: self.last_index,
            result,
        }
    }
}

/// The outcome of a [`SyncJob`], for [`Storage::finish_sync`].
#[derive(Debug)]
#[must_use = "pass it to Storage::finish_sync"]
pub struct SyncDone {
    seq: u64,
    len: u64,
    last_index: Index,
    result: Result<bool, StorageError>,
}

/// Durable storage for one Raft node: log, hard state and snapshots. See the
/// module documentation for the format and the recovery rules.
///
/// It is `Send`: the driver may move it to a blocking thread to
/// [`sync`](Storage::sync), or keep it and run a [`SyncJob`] there. After an
/// I/O error it refuses further changes ([`StorageError::Poisoned`]); reopen
/// it to recover.
#[derive(Debug)]
pub struct Storage {
    dir: PathBuf,
    wal_dir: PathBuf,
    snap_dir: PathBuf,
    options: StorageOptions,
    /// Full segments, oldest first.
    sealed: VecDeque<Segment>,
    active: Active,
    last_index: Index,
    terms: TermRuns,
    /// Stored snapshots, oldest first.
    snapshots: Vec<SnapshotInfo>,
    hard_state: HardState,
    durable_hard_state: HardState,
    stats: StorageStats,
    scratch: Vec<u8>,
    poisoned: bool,
    /// The last of the background jobs (removals of compacted segments
    /// and pruned snapshots), which run one after another in the order
    /// they were started (each joins the one before), so a crash never
    /// leaves a newer segment removed and an older one not: a gap open
    /// refuses. Joined on drop, and before anything removes segments
    /// synchronously.
    removals: Option<std::thread::JoinHandle<()>>,
    /// Set by a background job that failed: the later ones skip their
    /// removals (the files stay, to be compacted again after a restart)
    /// rather than leave a gap.
    removal_failed: Arc<std::sync::atomic::AtomicBool>,
    /// A snapshot was renamed into place ([`Storage::register_snapshot`])
    /// and the snapshot directory not fsynced since: compaction fsyncs it
    /// before it removes a segment.
    snapshot_renamed: bool,
}

impl Drop for Storage {
    fn drop(&mut self) {
        self.wait_background();
    }
}

impl Storage {
    /// Opens (creating if needed) the storage in `dir` and recovers what it
    /// holds; see the module documentation for the rules.
    pub fn open(
        dir: impl AsRef<Path>,
        options: StorageOptions,
    ) -> Result<(Storage, Recovered), StorageError> {
        let dir = dir.as_ref().to_path_buf();
        let wal_dir = dir.join(WAL_DIR);
        let snap_dir = dir.join(SNAPSHOT_DIR);
        let mut stats = StorageStats::default();
        fsutil::ensure_dir(&dir, &mut stats)?;
        fsutil::make_dir_private(&dir)?;
        fsutil::ensure_dir(&wal_dir, &mut stats)?;
        fsutil::ensure_dir(&snap_dir, &mut stats)?;

        let tmp = dir.join(hardstate::TMP_FILE);
        if fsutil::remove_file_if_exists(&tmp)? {
            tracing::info!(file = %tmp.display(), "removed an unfinished hard state");
        }
        let hard_state = hardstate::read(&dir)?.unwrap_or_default();
        let snapshots = snapshot::scan(&snap_dir, &mut stats)?;
        let mut replayed = wal::replay(&wal_dir, options.max_record_size)?;
        let newest = snapshots.last().map_or(0, |s| s.meta.index);
        if let Some(i) = replayed.restart_segment
            && replayed.base > newest
            && i > 0
            && i + 1 == replayed.segments.len()
        {
            // An interrupted install (`Storage::install_snapshot_image`):
            // the log's restart after a snapshot was written, the snapshot
            // never renamed into place. The segments before it still hold
            // the log that follows the previous snapshot: back to that.
            let path = wal_dir.join(replayed.segments[i].name());
            tracing::warn!(
                file = %path.display(),
                snapshot_index = replayed.base,
                "rolling back an interrupted snapshot install: its snapshot was never stored"
            );
            fs::remove_file(&path).map_err(StorageError::io("remove", &path))?;
            fsutil::sync_dir(&wal_dir, &mut stats)?;
            replayed = wal::replay(&wal_dir, options.max_record_size)?;
        }

        if let (Some((offset, kind)), Some(seg)) = (replayed.torn.take(), replayed.segments.last())
        {
            let path = wal_dir.join(seg.name());
            tracing::warn!(
                file = %path.display(),
                offset,
                reason = %kind,
                "cutting a torn record off the end of the log"
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(StorageError::io("open", &path))?;
            f.set_len(offset)
                .map_err(StorageError::io("truncate", &path))?;
            f.sync_all().map_err(StorageError::io("fsync", &path))?;
            stats.fsyncs += 1;
        }

        let latest = snapshots.last().map(|s| s.meta.clone());
        let (snap_index, snap_term) = latest.as_ref().map_or((0, 0), |m| (m.index, m.term));
        if replayed.base > snap_index {
            let first = replayed.segments.first().map(Segment::name);
            return Err(StorageError::corrupt(
                wal_dir.join(first.unwrap_or_default()),
                0,
                Corruption::LogAfterSnapshot {
                    base: replayed.base,
                    snapshot: snap_index,
                },
            ));
        }
        let last = replayed.last();
        let restart = if replayed.segments.is_empty() {
            false
        } else if last < snap_index {
            true
        } else {
            let at = (snap_index - replayed.base) as usize;
            at > 0 && replayed.entries.get(at - 1).map(|e| e.term) != Some(snap_term)
        };
        let mut entries = std::mem::take(&mut replayed.entries);
        if restart {
            if last > snap_index {
                tracing::warn!(
                    dir = %wal_dir.display(),
                    snapshot_index = snap_index,
                    snapshot_term = snap_term,
                    discarded = last - snap_index,
                    "discarding logged entries that conflict with the latest snapshot"
                );
            }
            entries.clear();
        } else {
            let drop = ((snap_index - replayed.base) as usize).min(entries.len());
            entries.drain(..drop);
        }

        let mut sealed: VecDeque<Segment> = replayed.segments.into();
        let active = match sealed.pop_back() {
            Some(seg) => {
                let path = wal_dir.join(seg.name());
                let file = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(StorageError::io("open", &path))?;
                // A crashed process may have left writes in the page cache
                // only: make them durable before they are reported as such.
                file.sync_all().map_err(StorageError::io("fsync", &path))?;
                stats.fsyncs += 1;
                Active {
                    seg,
                    file: Arc::new(file),
                }
            }
            None => create_segment(&wal_dir, 1, snap_index.saturating_add(1), &mut stats)?,
        };
        fsutil::sync_dir(&wal_dir, &mut stats)?;
        fsutil::sync_dir(&snap_dir, &mut stats)?;
        fsutil::sync_dir(&dir, &mut stats)?;

        let mut terms = TermRuns::default();
        terms.reset(snap_index);
        for e in &entries {
            terms.push(e.index, e.term);
        }
        let mut storage = Storage {
            dir,
            wal_dir,
            snap_dir,
            options,
            sealed,
            active,
            last_index: if restart {
                last
            } else {
                entries.last().map_or(snap_index, |e| e.index)
            },
            terms,
            snapshots,
            hard_state,
            durable_hard_state: hard_state,
            stats,
            scratch: Vec::new(),
            poisoned: false,
            removals: None,
            removal_failed: Arc::default(),
            snapshot_renamed: false,
        };
        if let (true, Some(meta)) = (restart, &latest) {
            storage.restart_log(meta)?;
        }
        storage.prune_snapshots()?;
        let recovered = Recovered {
            hard_state,
            snapshot: latest,
            entries,
        };
        Ok((storage, recovered))
    }

    /// The directory the storage lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options it was opened with.
    pub fn options(&self) -> &StorageOptions {
        &self.options
    }

    /// Counters of the work done since [`Storage::open`].
    pub fn stats(&self) -> StorageStats {
        self.stats
    }

    /// The index of the last stored entry (the snapshot's if there is none
    /// after it).
    pub fn last_index(&self) -> Index {
        self.last_index
    }

    /// The first index the log holds after the snapshot: its index + 1.
    pub fn first_index(&self) -> Index {
        self.snapshot_index().saturating_add(1)
    }

    /// The term of the entry at `index`: the snapshot's at its index, `None`
    /// below it or past the end of the log.
    pub fn term(&self, index: Index) -> Option<Term> {
        let (snap_index, snap_term) = self.snapshot().map_or((0, 0), |m| (m.index, m.term));
        match index {
            i if i < snap_index => None,
            i if i == snap_index => Some(snap_term),
            i => self.terms.term(i),
        }
    }

    /// The hard state last passed to [`Storage::set_hard_state`] (or
    /// recovered).
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The hard state on disk: its commit index may lag behind
    /// [`Storage::hard_state`]'s.
    pub fn durable_hard_state(&self) -> HardState {
        self.durable_hard_state
    }

    /// The latest stored snapshot.
    pub fn snapshot(&self) -> Option<&SnapshotMeta> {
        self.snapshots.last().map(|s| &s.meta)
    }

    /// Every stored snapshot, oldest first.
    pub fn snapshots(&self) -> impl Iterator<Item = &SnapshotMeta> + '_ {
        self.snapshots.iter().map(|s| &s.meta)
    }

    fn snapshot_index(&self) -> Index {
        self.snapshot().map_or(0, |m| m.index)
    }

    fn check_usable(&self) -> Result<(), StorageError> {
        if self.poisoned {
            Err(StorageError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Marks the storage unusable if `r` is an I/O failure: what is on disk
    /// is then unknown.
    fn guard<T>(&mut self, r: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(StorageError::Io { .. }) = &r {
            self.poisoned = true;
        }
        r
    }

    // ---- log ------------------------------------------------------------

    /// Writes `entries` to the log, without syncing. They must be contiguous
    /// and follow the log: the first index at most `last_index() + 1`. A
    /// first index at or below [`Storage::last_index`] replaces the stored
    /// entries from there on (Raft truncation); entries covered by the
    /// snapshot cannot be replaced.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.check_usable()?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.snapshot_index() || first.index == 0 {
            return Err(StorageError::InvalidAppend {
                index: first.index,
                reason: "the snapshot already covers it",
            });
        }
        if first.index > self.last_index.saturating_add(1) {
            return Err(StorageError::InvalidAppend {
                index: first.index,
                reason: "it leaves a gap after the last stored entry",
            });
        }
        for w in entries.windows(2) {
            if w[0].index.checked_add(1) != Some(w[1].index) {
                return Err(StorageError::InvalidAppend {
                    index: w[1].index,
                    reason: "the entries are not contiguous",
                });
            }
        }
        let r = self.write_entries(entries);
        self.guard(r)?;
        self.terms.truncate_after(first.index - 1);
        for e in entries {
            self.terms.push(e.index, e.term);
        }
        self.last_index = entries.last().map_or(self.last_index, |e| e.index);
        self.stats.entries_written += entries.len() as u64;
        Ok(())
    }

    fn write_entries(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let max = self.options.max_record_size;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let mut ends = Vec::with_capacity(entries.len());
        for e in entries {
            match record::append_frame(&mut buf, &RecordRef::Entry(e), max) {
                Ok(_) => ends.push(buf.len()),
                Err(FrameError::TooLarge(len)) => {
                    return Err(StorageError::RecordTooLarge {
                        index: e.index,
                        len,
                        max,
                    });
                }
                Err(FrameError::Encode(e)) => return Err(StorageError::Encode(e)),
            }
        }
        // Write, starting a new segment between records whenever the next
        // one would grow the current segment past the limit.
        let mut chunk = (0, 0); // byte offset and entry position it starts at
        let mut prev_end = 0;
        for (k, &end) in ends.iter().enumerate() {
            let seg_len = self.active.seg.len + (prev_end - chunk.0) as u64;
            if seg_len > 0 && seg_len + (end - prev_end) as u64 > self.options.segment_size {
                self.write_active(&buf[chunk.0..prev_end], &entries[chunk.1..k])?;
                chunk = (prev_end, k);
                let continue_at = match k.checked_sub(1) {
                    Some(p) => entries[p].index,
                    None => self.last_index,
                };
                self.rotate(continue_at.saturating_add(1))?;
            }
            prev_end = end;
        }
        self.write_active(&buf[chunk.0..], &entries[chunk.1..])?;
        self.scratch = buf;
        Ok(())
    }

    fn write_active(&mut self, bytes: &[u8], entries: &[Entry]) -> Result<(), StorageError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let path = self.wal_dir.join(self.active.seg.name());
        (&*self.active.file)
            .write_all(bytes)
            .map_err(StorageError::io("write", path))?;
        let seg = &mut self.active.seg;
        seg.len += bytes.len() as u64;
        if let Some(max) = entries.iter().map(|e| e.index).max() {
            seg.max_index = seg.max_index.max(max);
        }
        self.stats.bytes_written += bytes.len() as u64;
        Ok(())
    }

    /// Makes everything written to the active segment (at `path`) durable.
    fn sync_active(&mut self, path: &Path) -> Result<(), StorageError> {
        self.active
            .file
            .sync_data()
            .map_err(StorageError::io("fsync", path))?;
        self.stats.fsyncs += 1;
        self.active.seg.synced_len = self.active.seg.len;
        Ok(())
    }

    /// Seals the active segment (fsynced) and starts the next one, which
    /// continues the log at `first_index`.
    fn rotate(&mut self, first_index: Index) -> Result<(), StorageError> {
        let path = self.wal_dir.join(self.active.seg.name());
        self.sync_active(&path)?;
        let seq = next_seq(&self.active.seg, &path)?;
        let next = create_segment(&self.wal_dir, seq, first_index, &mut self.stats)?;
        let old = std::mem::replace(&mut self.active, next);
        self.sealed.push_back(old.seg);
        Ok(())
    }

    /// Makes everything appended so far durable, with one fdatasync (none if
    /// nothing is new). Returns the log's last index, now durable.
    pub fn sync(&mut self) -> Result<Index, StorageError> {
        let job = self.begin_sync()?;
        self.finish_sync(job.run())
    }

    /// The first half of [`Storage::sync`]: captures what is to be made
    /// durable. Everything appended before this call is covered by the job;
    /// anything appended while it runs is not.
    pub fn begin_sync(&mut self) -> Result<SyncJob, StorageError> {
        self.check_usable()?;
        let seg = &self.active.seg;
        Ok(SyncJob {
            file: (seg.len > seg.synced_len).then(|| Arc::clone(&self.active.file)),
            path: self.wal_dir.join(seg.name()),
            seq: seg.seq,
            len: seg.len,
            last_index: self.last_index,
        })
    }

    /// The second half of [`Storage::sync`]: records the outcome of a
    /// [`SyncJob`]. On success returns [`SyncJob::last_index`]. A failed
    /// fsync poisons the storage: the driver must not report anything as
    /// durable and should reopen.
    pub fn finish_sync(&mut self, done: SyncDone) -> Result<Index, StorageError> {
        let fsynced = self.guard(done.result)?;
        if fsynced {
            self.stats.fsyncs += 1;
            self.stats.wal_syncs += 1;
        }
        let seg = if self.active.seg.seq == done.seq {
            Some(&mut self.active.seg)
        } else {
            self.sealed.iter_mut().find(|s| s.seq == done.seq)
        };
        if let Some(seg) = seg {
            seg.synced_len = seg.synced_len.max(done.len.min(seg.len));
        }
        Ok(done.last_index)
    }

    /// Drops whole log segments all of whose entries are at or below `index`
    /// (never the active segment), and writes out a deferred hard state.
    /// `index` must be covered by the latest snapshot; pass a lower one to
    /// keep a tail of the log for slow followers.
    pub fn compact(&mut self, index: Index) -> Result<(), StorageError> {
        self.check_usable()?;
        let snapshot = self.snapshot_index();
        if index > snapshot {
            return Err(StorageError::CompactBeyondSnapshot { index, snapshot });
        }
        self.flush_hard_state()?;
        if self.snapshot_renamed
            && self
                .sealed
                .front()
                .is_some_and(|seg| seg.max_index <= index)
        {
            let r = fsutil::sync_dir(&self.snap_dir, &mut self.stats);
            self.guard(r)?;
            self.snapshot_renamed = false;
        }
        let r = self.drop_segments_through(index);
        self.guard(r)?;
        self.terms.compact(index);
        Ok(())
    }

    /// [`Storage::compact`] for a driver that must not wait for the disk:
    /// the segments are dropped from the log at once and their files
    /// removed on a thread of their own (oldest first, the directory
    /// fsynced after each, as [`Storage::compact`] does; joined when the
    /// storage is dropped), and a deferred hard state stays deferred.
    /// Nothing here waits for an fsync.
    pub fn compact_behind(&mut self, index: Index) -> Result<(), StorageError> {
        self.check_usable()?;
        let snapshot = self.snapshot_index();
        if index > snapshot {
            return Err(StorageError::CompactBeyondSnapshot { index, snapshot });
        }
        let mut doomed = Vec::new();
        while let Some(seg) = self.sealed.front() {
            if seg.max_index > index {
                break;
            }
            doomed.push(self.wal_dir.join(seg.name()));
            self.sealed.pop_front();
        }
        self.terms.compact(index);
        if doomed.is_empty() {
            return Ok(());
        }
        let wal_dir = self.wal_dir.clone();
        // The snapshot covering them may have been renamed into place
        // without an fsync of its directory yet: that comes first.
        let snap_dir = self.snap_dir.clone();
        self.snapshot_renamed = false;
        self.in_background(move || {
            let mut stats = StorageStats::default();
            fsutil::sync_dir(&snap_dir, &mut stats)?;
            for path in doomed {
                fsutil::remove_file_if_exists(&path)?;
                fsutil::sync_dir(&wal_dir, &mut stats)?;
                tracing::debug!(file = %path.display(), "removed a compacted log segment");
            }
            Ok(())
        });
        Ok(())
    }

    /// Runs `job` on a thread of its own (file removals that need not hold
    /// anything up), after the jobs started before it; a failure is logged,
    /// and the jobs after it are skipped. Joined when the storage is
    /// dropped.
    fn in_background(&mut self, job: impl FnOnce() -> Result<(), StorageError> + Send + 'static) {
        let before = self.removals.take();
        let failed = self.removal_failed.clone();
        self.removals = Some(std::thread::spawn(move || {
            if let Some(h) = before {
                let _ = h.join();
            }
            if failed.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!("skipping a file removal after an earlier one failed");
                return;
            }
            if let Err(e) = job() {
                failed.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!(error = %e, "removing files the storage no longer needs");
            }
        }));
    }

    /// Waits for the background jobs started so far.
    fn wait_background(&mut self) {
        if let Some(h) = self.removals.take() {
            let _ = h.join();
        }
    }

    /// Removes the sealed segments up to `index`, oldest first, after the
    /// background removals started before (removals go in order).
    fn drop_segments_through(&mut self, index: Index) -> Result<(), StorageError> {
        self.wait_background();
        while let Some(seg) = self.sealed.front() {
            if seg.max_index > index {
                break;
            }
            let path = self.wal_dir.join(seg.name());
            fsutil::remove_file_if_exists(&path)?;
            // One at a time, so a crash leaves a contiguous run of segments.
            fsutil::sync_dir(&self.wal_dir, &mut self.stats)?;
            tracing::debug!(file = %path.display(), "removed a compacted log segment");
            self.sealed.pop_front();
        }
        Ok(())
    }

    /// Restarts the log after `meta`: a new segment starting with a restart
    /// marker, then every older segment removed, oldest first.
    fn restart_log(&mut self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        let r = self.restart_log_inner(meta);
        self.guard(r)
    }

    fn restart_log_inner(&mut self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        self.write_restart_segment(meta, &[])?;
        self.drop_segments_through(Index::MAX)
    }

    /// Starts a new active segment with a restart marker after `meta` and
    /// the `following` entries (contiguous from `meta.index + 1`): written
    /// as `*.wal.tmp`, fsynced and renamed into place, so it is there whole
    /// or not at all. The older segments stay (sealed) until the caller
    /// removes them.
    fn write_restart_segment(
        &mut self,
        meta: &SnapshotMeta,
        following: &[Entry],
    ) -> Result<(), StorageError> {
        let active_path = self.wal_dir.join(self.active.seg.name());
        if self.active.seg.synced_len < self.active.seg.len {
            // Sealed from here on, it must replay whole should the restart
            // be rolled back.
            self.sync_active(&active_path)?;
        }
        let mut seg = Segment {
            seq: next_seq(&self.active.seg, &active_path)?,
            first_index: meta.index.saturating_add(1),
            max_index: meta.index,
            len: 0,
            synced_len: 0,
        };
        let mut buf = Vec::new();
        let marker = RecordRef::Restart {
            index: meta.index,
            term: meta.term,
        };
        record::append_frame(&mut buf, &marker, self.options.max_record_size).map_err(
            |e| match e {
                FrameError::Encode(e) => StorageError::Encode(e),
                FrameError::TooLarge(_) => {
                    StorageError::Encode(postcard::Error::SerializeBufferFull)
                }
            },
        )?;
        let max = self.options.max_record_size;
        for e in following {
            record::append_frame(&mut buf, &RecordRef::Entry(e), max).map_err(|err| match err {
                FrameError::Encode(err) => StorageError::Encode(err),
                FrameError::TooLarge(len) => StorageError::RecordTooLarge {
                    index: e.index,
                    len,
                    max,
                },
            })?;
        }
        let name = seg.name();
        let path = self.wal_dir.join(&name);
        let tmp = self.wal_dir.join(format!("{name}.tmp"));
        fsutil::write_synced(&tmp, &buf, &mut self.stats)?;
        fs::rename(&tmp, &path).map_err(StorageError::io("rename into place", &path))?;
        fsutil::sync_dir(&self.wal_dir, &mut self.stats)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(StorageError::io("open", &path))?;
        seg.len = buf.len() as u64;
        seg.synced_len = seg.len;
        let last = following.last().map_or(meta.index, |e| e.index);
        seg.max_index = last;
        self.stats.bytes_written += seg.len;
        self.stats.entries_written += following.len() as u64;
        let old_active = std::mem::replace(
            &mut self.active,
            Active {
                seg,
                file: Arc::new(file),
            },
        );
        self.sealed.push_back(old_active.seg);
        self.last_index = last;
        self.terms.reset(meta.index);
        for e in following {
            self.terms.push(e.index, e.term);
        }
        tracing::info!(
            snapshot_index = meta.index,
            snapshot_term = meta.term,
            entries = following.len(),
            "the log restarts after a snapshot"
        );
        Ok(())
    }

    // ---- hard state -----------------------------------------------------

    /// Records the hard state. If the term or the vote changed it is durable
    /// (replaced atomically, fsynced) when this returns; a change of the
    /// commit index alone is deferred (see the module documentation).
    pub fn set_hard_state(&mut self, hs: HardState) -> Result<(), StorageError> {
        self.check_usable()?;
        self.hard_state = hs;
        let durable = self.durable_hard_state;
        if hs.term != durable.term || hs.vote != durable.vote {
            self.write_hard_state()?;
        }
        Ok(())
    }

    /// Writes out a deferred commit index, if any.
    pub fn flush_hard_state(&mut self) -> Result<(), StorageError> {
        self.check_usable()?;
        if self.hard_state != self.durable_hard_state {
            self.write_hard_state()?;
        }
        Ok(())
    }

    fn write_hard_state(&mut self) -> Result<(), StorageError> {
        let hs = self.hard_state;
        let r = hardstate::write(&self.dir, &hs, &mut self.stats);
        self.guard(r)?;
        self.durable_hard_state = hs;
        Ok(())
    }

    // ---- snapshots ------------------------------------------------------

    /// Stores a snapshot durably: `data` is the state machine image covering
    /// every entry up to `meta.index`. Keeps the newest
    /// [`StorageOptions::snapshots_to_keep`] and removes older ones. If the
    /// log does not hold `meta`'s last entry (a snapshot from the leader),
    /// the log restarts after it. Writes out a deferred hard state. Does not
    /// compact the log: call [`Storage::compact`] for that.
    ///
    /// Storing a snapshot that is already stored (same index and term) keeps
    /// the stored image.
    pub fn save_snapshot(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        let mut writer = self.snapshot_writer(meta)?;
        writer.write_all(data).map_err(StorageError::io(
            "write",
            writer.tmp_dir.join(snapshot::DATA_FILE),
        ))?;
        self.finish_snapshot(writer)
    }

    /// Starts streaming a snapshot image to disk; see [`SnapshotWriter`].
    pub fn snapshot_writer(&self, meta: &SnapshotMeta) -> Result<SnapshotWriter, StorageError> {
        self.check_usable()?;
        self.check_not_stale(meta)?;
        SnapshotWriter::create(&self.snap_dir, meta)
    }

    /// Completes a snapshot started with [`Storage::snapshot_writer`], with
    /// the effects of [`Storage::save_snapshot`].
    pub fn finish_snapshot(&mut self, mut writer: SnapshotWriter) -> Result<(), StorageError> {
        self.check_usable()?;
        let meta = writer.meta.clone();
        self.check_not_stale(&meta)?;
        let final_dir = self.snapshot_path(&meta);
        if self
            .snapshots
            .iter()
            .any(|s| (s.meta.index, s.meta.term) == (meta.index, meta.term))
        {
            tracing::debug!(dir = %final_dir.display(), "snapshot already stored; keeping it");
            return self.flush_hard_state();
        }
        // Until the rename, a failure leaves nothing behind (the writer
        // removes its directory when dropped) and does not poison.
        let info = writer.seal(&mut self.stats)?;
        fs::rename(&writer.tmp_dir, &final_dir)
            .map_err(StorageError::io("rename into place", &final_dir))?;
        writer.disarm();
        let r = self.after_snapshot_stored(info);
        self.guard(r)
    }

    fn after_snapshot_stored(&mut self, info: SnapshotInfo) -> Result<(), StorageError> {
        fsutil::sync_dir(&self.snap_dir, &mut self.stats)?;
        let meta = info.meta.clone();
        let log_holds_it = self.term(meta.index) == Some(meta.term);
        self.snapshots.push(info);
        self.snapshots.sort_by_key(|s| s.meta.index);
        if !log_holds_it {
            self.restart_log_inner(&meta)?;
        }
        self.flush_hard_state()?;
        self.prune_snapshots()
    }

    fn check_not_stale(&self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        match self.snapshot() {
            Some(latest) if meta.index < latest.index => Err(StorageError::StaleSnapshot {
                index: meta.index,
                term: meta.term,
                latest: latest.index,
            }),
            _ => Ok(()),
        }
    }

    /// Removes all but the newest snapshots: each is first renamed to a
    /// temporary name, so a crash never leaves half a snapshot under a valid
    /// name.
    fn prune_snapshots(&mut self) -> Result<(), StorageError> {
        let keep = self.options.snapshots_to_keep.max(1);
        if self.snapshots.len() <= keep {
            return Ok(());
        }
        let old: Vec<SnapshotInfo> = self
            .snapshots
            .drain(..self.snapshots.len() - keep)
            .collect();
        let names: Vec<String> = old
            .iter()
            .map(|info| snapshot::dir_name(info.meta.index, info.meta.term))
            .collect();
        // Freeing a large image can take a while, and nothing waits for it:
        // a thread of its own does it. It first makes the snapshot
        // directory durable (a newer snapshot may have been renamed into
        // place without an fsync: the older ones go only after it is
        // there), then renames each old one aside (a crash never leaves
        // half a snapshot under a valid name), fsyncs, and removes them. A
        // crash before leaves the old snapshot, pruned again on open, or
        // `tmp-*`, removed on open.
        let snap_dir = self.snap_dir.clone();
        self.snapshot_renamed = false;
        self.in_background(move || {
            let mut stats = StorageStats::default();
            fsutil::sync_dir(&snap_dir, &mut stats)?;
            let mut doomed = Vec::new();
            for name in names {
                let dir = snap_dir.join(&name);
                let tmp = snap_dir.join(format!("{}old-{name}", snapshot::TMP_PREFIX));
                fs::rename(&dir, &tmp).map_err(StorageError::io("rename", &dir))?;
                doomed.push(tmp);
            }
            fsutil::sync_dir(&snap_dir, &mut stats)?;
            for dir in doomed {
                fs::remove_dir_all(&dir).map_err(StorageError::io("remove", &dir))?;
            }
            Ok(())
        });
        Ok(())
    }

    /// Where snapshot images are staged before they are stored (the
    /// snapshot directory: a [`StagedImage`](crate::image::StagedImage)
    /// made there is stored by renaming it, and a leftover is removed when
    /// the storage opens). Hand it to the transport for incoming images.
    pub fn staging_dir(&self) -> &Path {
        &self.snap_dir
    }

    /// [`Storage::save_snapshot`] with an image staged in a file (sealed):
    /// the file is moved into the snapshot's directory (renamed; copied if
    /// it is on another file system), never read into memory. Returns the
    /// stored image. Storing a snapshot that is already stored keeps the
    /// stored image (and drops `staged`).
    pub fn save_snapshot_image(
        &mut self,
        meta: &SnapshotMeta,
        staged: crate::image::StagedImage,
    ) -> Result<crate::image::SnapshotImage, StorageError> {
        self.check_usable()?;
        self.check_not_stale(meta)?;
        if !self
            .snapshots
            .iter()
            .any(|s| (s.meta.index, s.meta.term) == (meta.index, meta.term))
        {
            let writer = SnapshotWriter::adopt(&self.snap_dir, meta, staged)?;
            self.finish_snapshot(writer)?;
        } else {
            self.flush_hard_state()?;
        }
        self.snapshot_image(meta)
    }

    /// Installs a snapshot received from another member, with its sealed
    /// image in `staged`, and the entries the core holds after it
    /// (`following`, contiguous from `meta.index + 1`; every core replaces
    /// its whole log with an installed snapshot and what follows it). The
    /// log restarts after the snapshot with `following` in one segment,
    /// written and fsynced *before* the snapshot is renamed into place;
    /// then the older segments go. A crash in between leaves a restart
    /// whose snapshot was never stored, which [`Storage::open`] rolls back
    /// (the previous snapshot and log are still whole): so a snapshot is
    /// never found without the entries that followed it — PBFT's engine
    /// keeps the state of the checkpoint a snapshot stands at in the entry
    /// just after it, and could not start from the snapshot alone. When
    /// this returns, `following` is durable. Installing the snapshot that
    /// is stored already keeps its image and writes `following` after it.
    pub fn install_snapshot_image(
        &mut self,
        meta: &SnapshotMeta,
        staged: crate::image::StagedImage,
        following: &[Entry],
    ) -> Result<crate::image::SnapshotImage, StorageError> {
        self.check_usable()?;
        self.check_not_stale(meta)?;
        for (k, e) in following.iter().enumerate() {
            if Some(e.index) != meta.index.checked_add(1 + k as u64) {
                return Err(StorageError::InvalidAppend {
                    index: e.index,
                    reason: "the entries do not follow the snapshot",
                });
            }
        }
        if self
            .snapshots
            .iter()
            .any(|s| (s.meta.index, s.meta.term) == (meta.index, meta.term))
        {
            drop(staged);
            self.append(following)?;
            self.sync()?;
            self.flush_hard_state()?;
            return self.snapshot_image(meta);
        }
        let mut writer = SnapshotWriter::adopt(&self.snap_dir, meta, staged)?;
        let info = writer.seal(&mut self.stats)?;
        let r = self.install_sealed(meta, &mut writer, info, following);
        self.guard(r)?;
        self.snapshot_image(meta)
    }

    fn install_sealed(
        &mut self,
        meta: &SnapshotMeta,
        writer: &mut SnapshotWriter,
        info: SnapshotInfo,
        following: &[Entry],
    ) -> Result<(), StorageError> {
        self.write_restart_segment(meta, following)?;
        let final_dir = self.snapshot_path(meta);
        fs::rename(&writer.tmp_dir, &final_dir)
            .map_err(StorageError::io("rename into place", &final_dir))?;
        writer.disarm();
        fsutil::sync_dir(&self.snap_dir, &mut self.stats)?;
        self.snapshot_renamed = false;
        self.snapshots.push(info);
        self.snapshots.sort_by_key(|s| s.meta.index);
        self.drop_segments_through(Index::MAX)?;
        self.flush_hard_state()?;
        self.prune_snapshots()
    }

    /// A function that makes a local snapshot durable without the storage:
    /// blocking, for another thread, while the storage goes on taking the
    /// log. It moves the sealed image into a new `tmp-…` directory and
    /// writes and fsyncs its metadata. The snapshot is not stored yet: it
    /// is renamed into place by [`Storage::register_snapshot`] (or removed
    /// by [`Storage::discard_snapshot`]), and a crash before leaves only a
    /// `tmp-…` directory, removed on open. So a snapshot the consensus core
    /// did not take (PBFT takes one only at its stable checkpoint, which
    /// may move on while the image is made durable) is never found on disk
    /// as the latest one.
    pub fn snapshot_preparer(
        &self,
    ) -> impl FnOnce(
        &SnapshotMeta,
        crate::image::StagedImage,
    ) -> Result<PreparedSnapshot, StorageError>
    + Send
    + 'static {
        let snap_dir = self.snap_dir.clone();
        move |meta: &SnapshotMeta, staged: crate::image::StagedImage| {
            let mut stats = StorageStats::default();
            let final_dir = snap_dir.join(snapshot::dir_name(meta.index, meta.term));
            if final_dir.exists() {
                // The same snapshot is stored already; registering keeps it.
                return Ok(PreparedSnapshot {
                    info: None,
                    meta: meta.clone(),
                    stats,
                    tmp_dir: None,
                });
            }
            let mut writer = SnapshotWriter::adopt(&snap_dir, meta, staged)?;
            let info = writer.seal(&mut stats)?;
            let tmp_dir = writer.tmp_dir.clone();
            writer.disarm();
            Ok(PreparedSnapshot {
                info: Some(info),
                meta: meta.clone(),
                stats,
                tmp_dir: Some(tmp_dir),
            })
        }
    }

    /// Takes a snapshot that [`Storage::snapshot_preparer`] made durable as
    /// the latest: renames it into place, keeping the newest
    /// [`StorageOptions::snapshots_to_keep`] (older ones are renamed aside
    /// and removed on a thread of their own). Waits for no fsync: the
    /// rename is made durable by the next fsync of the snapshot directory,
    /// which [`Storage::compact`] and [`Storage::compact_behind`] issue
    /// before they remove any segment (a crash before leaves the previous
    /// snapshot the latest, with the log behind it). The log must hold the
    /// snapshot's last entry (a snapshot of this node's own state); a stale
    /// one is removed and refused. Returns the stored image.
    pub fn register_snapshot(
        &mut self,
        prepared: PreparedSnapshot,
    ) -> Result<crate::image::SnapshotImage, StorageError> {
        self.check_usable()?;
        let meta = prepared.meta.clone();
        let (Some(info), Some(tmp_dir)) = (prepared.info, prepared.tmp_dir) else {
            return self.snapshot_image(&meta);
        };
        let refuse = if let Err(e) = self.check_not_stale(&meta) {
            Some(e)
        } else if self.term(meta.index) != Some(meta.term) {
            Some(StorageError::SnapshotNotFound {
                index: meta.index,
                term: meta.term,
            })
        } else {
            None
        };
        if let Some(e) = refuse {
            self.remove_in_background(tmp_dir);
            return Err(e);
        }
        if self.snapshot_info(&meta).is_ok() {
            // The same snapshot was stored meanwhile (installed from a
            // peer): it is kept.
            self.remove_in_background(tmp_dir);
            return self.snapshot_image(&meta);
        }
        let dir = self.snapshot_path(&meta);
        fs::rename(&tmp_dir, &dir).map_err(StorageError::io("rename into place", &dir))?;
        self.snapshot_renamed = true;
        self.stats.fsyncs += prepared.stats.fsyncs;
        self.snapshots.push(info);
        self.snapshots.sort_by_key(|s| s.meta.index);
        let r = self.prune_snapshots();
        self.guard(r)?;
        self.snapshot_image(&meta)
    }

    /// Drops a snapshot that [`Storage::snapshot_preparer`] made durable
    /// and that is not to be stored (the core did not take it): its
    /// directory is removed on a thread of its own.
    pub fn discard_snapshot(&mut self, prepared: PreparedSnapshot) {
        if let Some(tmp_dir) = prepared.tmp_dir {
            tracing::debug!(
                index = prepared.meta.index,
                dir = %tmp_dir.display(),
                "discarding a prepared snapshot"
            );
            self.remove_in_background(tmp_dir);
        }
    }

    /// Removes a snapshot directory that was never stored (a `tmp-…` one)
    /// on a thread of its own; a crash before leaves it to be removed on
    /// open.
    fn remove_in_background(&mut self, dir: PathBuf) {
        let snap_dir = self.snap_dir.clone();
        self.in_background(move || {
            fs::remove_dir_all(&dir).map_err(StorageError::io("remove", &dir))?;
            fsutil::sync_dir(&snap_dir, &mut StorageStats::default())
        });
    }

    /// A stored snapshot's image: its file, length and checksum.
    pub fn snapshot_image(
        &self,
        meta: &SnapshotMeta,
    ) -> Result<crate::image::SnapshotImage, StorageError> {
        let info = self.snapshot_info(meta)?;
        Ok(crate::image::SnapshotImage::new(
            self.snapshot_path(meta).join(snapshot::DATA_FILE),
            info.data_len,
            info.data_crc,
        ))
    }

    /// The directory of the snapshot `meta` (whether or not it is stored). It
    /// holds `data`, the image, and `meta`.
    pub fn snapshot_path(&self, meta: &SnapshotMeta) -> PathBuf {
        self.snap_dir
            .join(snapshot::dir_name(meta.index, meta.term))
    }

    fn snapshot_info(&self, meta: &SnapshotMeta) -> Result<&SnapshotInfo, StorageError> {
        self.snapshots
            .iter()
            .find(|s| (s.meta.index, s.meta.term) == (meta.index, meta.term))
            .ok_or(StorageError::SnapshotNotFound {
                index: meta.index,
                term: meta.term,
            })
    }

    /// Streams a stored snapshot's image; the reader checks its checksum
    /// when it reaches the end.
    pub fn open_snapshot(&self, meta: &SnapshotMeta) -> Result<SnapshotReader, StorageError> {
        let info = self.snapshot_info(meta)?;
        SnapshotReader::open(&self.snapshot_path(meta), info)
    }

    /// Reads a stored snapshot's image whole, checking its checksum.
    pub fn read_snapshot_data(&self, meta: &SnapshotMeta) -> Result<Vec<u8>, StorageError> {
        let info = self.snapshot_info(meta)?;
        let path = self.snapshot_path(meta).join(snapshot::DATA_FILE);
        let data = fs::read(&path).map_err(StorageError::io("read", &path))?;
        if data.len() as u64 != info.data_len {
            return Err(StorageError::corrupt(
                path,
                0,
                Corruption::SnapshotDataLength {
                    expected: info.data_len,
                    actual: data.len() as u64,
                },
            ));
        }
        let computed = crc32c::crc32c(&data);
        if computed != info.data_crc {
            return Err(StorageError::corrupt(
                path,
                0,
                Corruption::SnapshotDataChecksum {
                    stored: info.data_crc,
                    computed,
                },
            ));
        }
        Ok(data)
    }

    // ---- shutdown -------------------------------------------------------

    /// Syncs the log and writes out a deferred hard state.
    pub fn close(mut self) -> Result<(), StorageError> {
        self.sync()?;
        self.flush_hard_state()
    }
}

/// A snapshot made durable by [`Storage::snapshot_preparer`], to be given
/// to [`Storage::register_snapshot`] or [`Storage::discard_snapshot`]
/// (dropped without either, its directory stays until the storage opens
/// again).
#[derive(Debug)]
pub struct PreparedSnapshot {
    /// `None` if it was stored already.
    info: Option<SnapshotInfo>,
    meta: SnapshotMeta,
    stats: StorageStats,
    /// Where it waits to be renamed into place (`None` if stored already).
    tmp_dir: Option<PathBuf>,
}

/// The sequence number after `seg`'s.
fn next_seq(seg: &Segment, path: &Path) -> Result<u64, StorageError> {
    seg.seq
        .checked_add(1)
        .ok_or_else(|| StorageError::corrupt(path, 0, Corruption::BadName))
}

/// Creates an empty segment and makes its directory entry durable.
fn create_segment(
    wal_dir: &Path,
    seq: u64,
    first_index: Index,
    stats: &mut StorageStats,
) -> Result<Active, StorageError> {
    let seg = Segment {
        seq,
        first_index,
        max_index: first_index.saturating_sub(1),
        len: 0,
        synced_len: 0,
    };
    let path = wal_dir.join(seg.name());
    let file = fsutil::private_options()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(StorageError::io("create", &path))?;
    fsutil::sync_dir(wal_dir, stats)?;
    Ok(Active {
        seg,
        file: Arc::new(file),
    })
}

impl crate::node::LogStore for Storage {
    fn append(&mut self, entries: &[Entry]) -> Result<(), crate::node::BoxError> {
        Ok(Storage::append(self, entries)?)
    }

    fn set_hard_state(&mut self, hs: HardState) -> Result<(), crate::node::BoxError> {
        Ok(Storage::set_hard_state(self, hs)?)
    }

    fn sync(&mut self) -> Result<(), crate::node::BoxError> {
        Storage::sync(self)?;
        Ok(())
    }

    fn staging_dir(&self) -> PathBuf {
        self.snap_dir.clone()
    }

    fn save_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        image: crate::image::StagedImage,
        following: &[Entry],
    ) -> Result<crate::image::SnapshotImage, crate::node::BoxError> {
        Ok(Storage::install_snapshot_image(
            self, meta, image, following,
        )?)
    }

    fn compact(&mut self, index: Index) -> Result<(), crate::node::BoxError> {
        Ok(Storage::compact_behind(self, index)?)
    }

    type Prepared = PreparedSnapshot;

    fn snapshot_preparer(&self) -> crate::node::Preparer<PreparedSnapshot> {
        let prepare = Storage::snapshot_preparer(self);
        Box::new(move |meta, staged| Ok(prepare(&meta, staged)?))
    }

    fn register_snapshot(
        &mut self,
        prepared: PreparedSnapshot,
    ) -> Result<crate::image::SnapshotImage, crate::node::BoxError> {
        Ok(Storage::register_snapshot(self, prepared)?)
    }

    fn discard_snapshot(&mut self, prepared: PreparedSnapshot) {
        Storage::discard_snapshot(self, prepared)
    }

    fn load_snapshot(
        &self,
    ) -> Result<Option<(SnapshotMeta, crate::image::SnapshotImage)>, crate::node::BoxError> {
        let Some(meta) = self.snapshot().cloned() else {
            return Ok(None);
        };
        let image = self.snapshot_image(&meta)?;
        Ok(Some((meta, image)))
    }

    fn flush(&mut self) -> Result<(), crate::node::BoxError> {
        self.flush_hard_state()?;
        Storage::sync(self)?;
        Ok(())
    }
}
