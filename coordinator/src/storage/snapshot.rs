//! Snapshot directories: `snapshots/<index>-<term>/{meta,data}`.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::StorageStats;
use super::error::{Corruption, StorageError};
use super::fsutil;
use super::record;
use crate::raft::{Index, SnapshotMeta, Term};

/// The checksummed metadata file inside a snapshot directory.
pub(crate) const META_FILE: &str = "meta";
/// The state machine image inside a snapshot directory.
pub(crate) const DATA_FILE: &str = "data";
/// Prefix of directories a snapshot is written in before it is renamed.
pub(crate) const TMP_PREFIX: &str = "tmp-";
/// Metadata holds a membership; a megabyte is far beyond any sane one.
const MAX_META_PAYLOAD: u64 = 1 << 20;

/// What the metadata file holds; the variant doubles as a format version.
#[derive(Serialize, Deserialize)]
enum MetaRecord {
    V1 {
        meta: SnapshotMeta,
        data_len: u64,
        data_crc: u32,
    },
}

/// A stored snapshot: its metadata and what its image must look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotInfo {
    pub(crate) meta: SnapshotMeta,
    pub(crate) data_len: u64,
    pub(crate) data_crc: u32,
}

/// The directory name of the snapshot at `index` in `term`.
pub(crate) fn dir_name(index: Index, term: Term) -> String {
    format!("{index:016x}-{term:016x}")
}

/// The index and term in a snapshot directory's name.
pub(crate) fn parse_dir_name(name: &str) -> Option<(Index, Term)> {
    let (index, term) = name.split_once('-')?;
    if index.len() != 16 || term.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(index, 16).ok()?,
        u64::from_str_radix(term, 16).ok()?,
    ))
}

/// Reads and checks the metadata of the snapshot stored in `dir`.
pub(crate) fn read_meta(dir: &Path) -> Result<SnapshotInfo, StorageError> {
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(StorageError::io("read", &path))?;
    let (payload, len) = record::read_frame(&bytes, MAX_META_PAYLOAD)
        .map_err(|k| StorageError::corrupt(&path, 0, k))?;
    if len != bytes.len() {
        return Err(StorageError::corrupt(
            &path,
            len as u64,
            Corruption::TrailingBytes((bytes.len() - len) as u64),
        ));
    }
    let MetaRecord::V1 {
        meta,
        data_len,
        data_crc,
    } = record::decode(payload).map_err(|k| StorageError::corrupt(&path, 0, k))?;
    Ok(SnapshotInfo {
        meta,
        data_len,
        data_crc,
    })
}

/// Lists the snapshots in `snap_dir`, oldest first, checking each one's
/// metadata and image length, and removes directories left by interrupted
/// writes.
pub(crate) fn scan(
    snap_dir: &Path,
    stats: &mut StorageStats,
) -> Result<Vec<SnapshotInfo>, StorageError> {
    let mut found = Vec::new();
    let mut removed = false;
    for name in fsutil::list_dir(snap_dir)? {
        let path = snap_dir.join(&name);
        if name.starts_with(TMP_PREFIX) {
            // Unfinished snapshot directories, and images staged for
            // building or receiving a snapshot (files).
            tracing::info!(path = %path.display(), "removing an unfinished snapshot");
            if path.is_dir() {
                fs::remove_dir_all(&path).map_err(StorageError::io("remove", &path))?;
            } else {
                fs::remove_file(&path).map_err(StorageError::io("remove", &path))?;
            }
            removed = true;
            continue;
        }
        let Some((dir_index, dir_term)) = parse_dir_name(&name).filter(|_| path.is_dir()) else {
            tracing::warn!(path = %path.display(), "ignoring an unknown entry in the snapshot directory");
            continue;
        };
        let info = read_meta(&path)?;
        if (info.meta.index, info.meta.term) != (dir_index, dir_term) {
            return Err(StorageError::corrupt(
                path.join(META_FILE),
                0,
                Corruption::SnapshotNameMismatch {
                    index: info.meta.index,
                    term: info.meta.term,
                    dir_index,
                    dir_term,
                },
            ));
        }
        let data = path.join(DATA_FILE);
        let actual = fs::metadata(&data)
            .map_err(StorageError::io("stat", &data))?
            .len();
        if actual != info.data_len {
            return Err(StorageError::corrupt(
                data,
                0,
                Corruption::SnapshotDataLength {
                    expected: info.data_len,
                    actual,
                },
            ));
        }
        found.push(info);
    }
    if removed {
        fsutil::sync_dir(snap_dir, stats)?;
    }
    found.sort_by_key(|s| s.meta.index);
    Ok(found)
}

/// Tells apart the temporary directories of concurrent writers.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Streams a snapshot image to disk without holding it in memory. Obtain one
/// from [`super::Storage::snapshot_writer`], write the image into it (it
/// implements [`Write`]; it is `Send`, so this may happen on another thread),
/// then hand it to [`super::Storage::finish_snapshot`]. Dropping it unfinished
/// removes what it wrote.
#[derive(Debug)]
pub struct SnapshotWriter {
    pub(crate) meta: SnapshotMeta,
    pub(crate) tmp_dir: PathBuf,
    file: Option<BufWriter<File>>,
    len: u64,
    crc: u32,
    /// The image was moved in already complete and fsynced.
    adopted: bool,
}

impl SnapshotWriter {
    pub(crate) fn create(snap_dir: &Path, meta: &SnapshotMeta) -> Result<Self, StorageError> {
        let tmp_dir = snap_dir.join(format!(
            "{TMP_PREFIX}{}-{}-{}",
            dir_name(meta.index, meta.term),
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        fsutil::create_private_dir(&tmp_dir)
            .map_err(StorageError::io("create directory", &tmp_dir))?;
        let data = tmp_dir.join(DATA_FILE);
        let file = fsutil::private_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data)
            .map_err(StorageError::io("create", &data))?;
        Ok(SnapshotWriter {
            meta: meta.clone(),
            tmp_dir,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            len: 0,
            crc: 0,
            adopted: false,
        })
    }

    /// The snapshot being written.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the image and its metadata durable inside the temporary
    /// directory; the caller then renames it into place.
    pub(crate) fn seal(&mut self, stats: &mut StorageStats) -> Result<SnapshotInfo, StorageError> {
        let data = self.tmp_dir.join(DATA_FILE);
        if !self.adopted {
            let Some(file) = self.file.take() else {
                return Err(StorageError::Io {
                    op: "finish",
                    path: data,
                    source: io::Error::other("snapshot writer already finished"),
                });
            };
            let file = file.into_inner().map_err(|e| StorageError::Io {
                op: "write",
                path: data.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(StorageError::io("fsync", &data))?;
            stats.fsyncs += 1;
        }
        let info = SnapshotInfo {
            meta: self.meta.clone(),
            data_len: self.len,
            data_crc: self.crc,
        };
        let mut buf = Vec::new();
        let rec = MetaRecord::V1 {
            meta: info.meta.clone(),
            data_len: info.data_len,
            data_crc: info.data_crc,
        };
        record::append_frame(&mut buf, &rec, MAX_META_PAYLOAD).map_err(|e| match e {
            record::FrameError::Encode(e) => StorageError::Encode(e),
            record::FrameError::TooLarge(_) => {
                StorageError::Encode(postcard::Error::SerializeBufferFull)
            }
        })?;
        fsutil::write_synced(&self.tmp_dir.join(META_FILE), &buf, stats)?;
        fsutil::sync_dir(&self.tmp_dir, stats)?;
        Ok(info)
    }

    /// Marks the temporary directory as taken over (renamed or removed by
    /// the caller).
    pub(crate) fn disarm(&mut self) {
        self.tmp_dir = PathBuf::new();
    }
}

impl SnapshotWriter {
    /// A writer whose image is the sealed `staged` file, moved into a new
    /// temporary snapshot directory (renamed; copied if it is on another
    /// file system). Finish it like any other.
    pub(crate) fn adopt(
        snap_dir: &Path,
        meta: &SnapshotMeta,
        mut staged: crate::image::StagedImage,
    ) -> Result<Self, StorageError> {
        if !staged.is_sealed() {
            return Err(StorageError::Io {
                op: "store",
                path: staged.path().to_path_buf(),
                source: io::Error::other("the staged snapshot image is not sealed"),
            });
        }
        let mut writer = SnapshotWriter::create(snap_dir, meta)?;
        writer.file = None;
        let data = writer.tmp_dir.join(DATA_FILE);
        match fs::rename(staged.path(), &data) {
            Ok(()) => {
                staged.disarm();
            }
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                let from = staged.path().to_path_buf();
                let mut src = File::open(&from).map_err(StorageError::io("open", &from))?;
                let mut dst = fsutil::private_options()
                    .write(true)
                    .truncate(true)
                    .open(&data)
                    .map_err(StorageError::io("open", &data))?;
                io::copy(&mut src, &mut dst).map_err(StorageError::io("copy into", &data))?;
                dst.sync_all().map_err(StorageError::io("fsync", &data))?;
            }
            Err(e) => return Err(StorageError::io("rename into", &data)(e)),
        }
        writer.len = staged.len();
        writer.crc = staged.crc32c();
        writer.adopted = true;
        Ok(writer)
    }
}

impl Write for SnapshotWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("snapshot writer already finished"));
        };
        let n = file.write(buf)?;
        self.len += n as u64;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.tmp_dir.as_os_str().is_empty() {
            // Best effort: a leftover is removed on the next open anyway.
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

/// Streams a stored snapshot image, checking its length and checksum: the
/// read that reaches the end fails with [`io::ErrorKind::InvalidData`] if the
/// image is damaged. Obtain one from [`super::Storage::open_snapshot`].
#[derive(Debug)]
pub struct SnapshotReader {
    inner: BufReader<File>,
    path: PathBuf,
    expected_len: u64,
    expected_crc: u32,
    len: u64,
    crc: u32,
}

impl SnapshotReader {
    pub(crate) fn open(dir: &Path, info: &SnapshotInfo) -> Result<Self, StorageError> {
        let path = dir.join(DATA_FILE);
        let file = File::open(&path).map_err(StorageError::io("open", &path))?;
        Ok(SnapshotReader {
            inner: BufReader::with_capacity(1 << 20, file),
            path,
            expected_len: info.data_len,
            expected_crc: info.data_crc,
            len: 0,
            crc: 0,
        })
    }

    /// The length of the image, as its metadata records it.
    pub fn data_len(&self) -> u64 {
        self.expected_len
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn damage(&self, kind: Corruption) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            StorageError::corrupt(&self.path, 0, kind),
        )
    }
}

impl Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.len += n as u64;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        if self.len > self.expected_len || (n == 0 && !buf.is_empty()) {
            if self.len != self.expected_len {
                return Err(self.damage(Corruption::SnapshotDataLength {
                    expected: self.expected_len,
                    actual: self.len,
                }));
            }
            if self.crc != self.expected_crc {
                return Err(self.damage(Corruption::SnapshotDataChecksum {
                    stored: self.expected_crc,
                    computed: self.crc,
                }));
            }
        }
        Ok(n)
    }
}
