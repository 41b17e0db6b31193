//! Snapshot images as files, never whole in memory.
//!
//! A state machine's image may be gigabytes, so the driver, the storage and
//! the transport pass it around as a file:
//!
//! * [`StagedImage`] — a new, private (0600) file that an image is being
//!   built or received into: written through [`std::io::Write`] (a snapshot
//!   arriving in chunks from the leader), or by other means at
//!   [`StagedImage::path`] (SQLite's `VACUUM INTO`), then sealed: its
//!   length and CRC-32C known, its data fsynced. The storage takes a sealed
//!   one over by renaming it into a snapshot directory
//!   ([`LogStore::save_snapshot`](crate::node::LogStore::save_snapshot)).
//!   Dropped before that, it removes its file.
//! * [`SnapshotImage`] — a stored image: its path, length and checksum.
//!   Cheap to clone; the transport streams it to a follower from the file.
//! * [`ImageReader`] — an open image, read from its start; the read that
//!   reaches the end fails with [`io::ErrorKind::InvalidData`] if the length
//!   or checksum differ from what was stored. A state machine restores from
//!   one. It holds the file open, so the image stays readable even if the
//!   storage removes an older snapshot meanwhile.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of staged image files; the storage removes leftovers with this
/// prefix from its snapshot directory when it opens.
pub const STAGED_PREFIX: &str = "tmp-image-";

/// Tells apart the staged files of one process.
static NEXT_STAGED: AtomicU64 = AtomicU64::new(0);

/// Buffer used to stream an image.
const IO_BUFFER: usize = 1 << 20;

/// An image is written back to the disk in steps of this many bytes as it
/// is written, not all at once when it is sealed: a flush of hundreds of
/// megabytes at once would hold up every other fsync on the disk (the Raft
/// log's among them) for as long as it takes.
pub const FLUSH_STEP: u64 = 8 << 20;

/// A snapshot image being written to a new private file. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct StagedImage {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    len: u64,
    /// `len` when the file was last flushed to the disk.
    flushed: u64,
    crc: u32,
    sealed: bool,
    /// Whether the file is still ours to remove on drop.
    armed: bool,
}

impl StagedImage {
    /// Creates an empty file (mode 0600) named `tmp-image-…` in `dir`.
    pub fn create_in(dir: &Path) -> io::Result<StagedImage> {
        let path = dir.join(format!(
            "{STAGED_PREFIX}{}-{}",
            std::process::id(),
            NEXT_STAGED.fetch_add(1, Ordering::Relaxed)
        ));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = opts.open(&path)?;
        Ok(StagedImage {
            path,
            file: Some(BufWriter::with_capacity(IO_BUFFER, file)),
            len: 0,
            flushed: 0,
            crc: 0,
            sealed: false,
            armed: true,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written (through [`Write`]) or, once sealed, the image's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty so far.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// CRC-32C of the bytes written so far (of the whole image once sealed).
    pub fn crc32c(&self) -> u32 {
        self.crc
    }

    /// Whether [`StagedImage::seal`] or [`StagedImage::seal_written`] succeeded.
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Completes an image written through [`Write`]: flushes and fsyncs it.
    /// Blocking.
    pub fn seal(&mut self) -> io::Result<()> {
        let Some(file) = self.file.take() else {
            return if self.sealed {
                Ok(())
            } else {
                Err(io::Error::other("the staged image was not written"))
            };
        };
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        self.sealed = true;
        Ok(())
    }

    /// Completes an image that was written to [`StagedImage::path`] by other
    /// means (nothing was written through [`Write`]): reads it once to learn
    /// its length and checksum, and fsyncs it. Blocking.
    pub fn seal_written(&mut self) -> io::Result<()> {
        if self.len != 0 {
            return Err(io::Error::other(
                "the staged image was written through Write; use seal",
            ));
        }
        // Our handle was opened before the other writer wrote; drop it.
        self.file = None;
        let mut file = File::open(&self.path)?;
        let (len, crc) = checksum(&mut file)?;
        file.sync_all()?;
        self.len = len;
        self.crc = crc;
        self.sealed = true;
        Ok(())
    }

    /// Hands the file over to whoever renames it (the storage): it is no
    /// longer removed on drop.
    pub(crate) fn disarm(&mut self) -> PathBuf {
        self.armed = false;
        self.file = None;
        self.path.clone()
    }
}

/// Two staged images are the same if they are the same file with the same
/// content so far (two never share a file).
impl PartialEq for StagedImage {
    fn eq(&self, other: &Self) -> bool {
        (&self.path, self.len, self.crc, self.sealed)
            == (&other.path, other.len, other.crc, other.sealed)
    }
}

impl Eq for StagedImage {}

impl Write for StagedImage {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("the staged image is already sealed"));
        };
        let n = file.write(buf)?;
        self.len += n as u64;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        if self.len - self.flushed >= FLUSH_STEP {
            file.flush()?;
            file.get_ref().sync_data()?;
            self.flushed = self.len;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for StagedImage {
    fn drop(&mut self) {
        if self.armed {
            self.file = None;
            // Best effort: leftovers are removed when the storage opens.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes back a file that someone else is filling (SQLite's `VACUUM
/// INTO`), a [`FLUSH_STEP`] at a time as it grows, until stopped: its data
/// reaches the disk as it is written rather than in one flush at the end.
#[derive(Debug)]
pub struct Flusher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Starts flushing the file at `path` on a thread of its own (it looks
    /// at the file's length every 20 ms).
    pub fn start(path: &Path) -> io::Result<Flusher> {
        let file = File::open(path)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("image-flusher".into())
            .spawn(move || {
                let mut flushed = 0u64;
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    let Ok(meta) = file.metadata() else { return };
                    if meta.len() >= flushed + FLUSH_STEP {
                        if file.sync_data().is_err() {
                            return;
                        }
                        flushed = meta.len();
                    }
                }
            })?;
        Ok(Flusher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The length and CRC-32C of what `file` holds from where it stands.
fn checksum(file: &mut File) -> io::Result<(u64, u32)> {
    let mut buf = vec![0u8; IO_BUFFER];
    let (mut len, mut crc) = (0u64, 0u32);
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok((len, crc)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n as u64;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
}

/// A stored snapshot image: where it is, its length and CRC-32C. See the
/// [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotImage {
    path: Option<PathBuf>,
    len: u64,
    crc: u32,
}

impl SnapshotImage {
    /// The image stored at `path` with this length and checksum.
    pub fn new(path: PathBuf, len: u64, crc32c: u32) -> Self {
        SnapshotImage {
            path: Some(path),
            len,
            crc: crc32c,
        }
    }

    /// The image in the file at `path`, read once to learn its length and
    /// checksum. Blocking.
    pub fn of_file(path: PathBuf) -> io::Result<Self> {
        let mut file = File::open(&path)?;
        let (len, crc) = checksum(&mut file)?;
        Ok(SnapshotImage::new(path, len, crc))
    }

    /// The empty image: the initial state at index 0, sent with the
    /// membership to a member added before any snapshot was taken.
    pub fn empty() -> Self {
        SnapshotImage {
            path: None,
            len: 0,
            crc: 0,
        }
    }

    /// The file (`None` for [`SnapshotImage::empty`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its CRC-32C.
    pub fn crc32c(&self) -> u32 {
        self.crc
    }

    /// Opens it for reading from its start.
    pub fn open(&self) -> io::Result<ImageReader> {
        let file = match &self.path {
            Some(p) => Some(BufReader::with_capacity(IO_BUFFER, File::open(p)?)),
            None => None,
        };
        Ok(ImageReader {
            file,
            path: self.path.clone(),
            len: self.len,
            expected_crc: self.crc,
            read: 0,
            crc: 0,
        })
    }
}

/// An open snapshot image, checked as it is read. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct ImageReader {
    file: Option<BufReader<File>>,
    path: Option<PathBuf>,
    len: u64,
    expected_crc: u32,
    read: u64,
    crc: u32,
}

impl ImageReader {
    /// The image's length, as stored.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty (the initial state).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file, for messages (`None` for the empty image).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn damage(&self, what: String) -> io::Error {
        let path = self
            .path
            .as_deref()
            .map_or_else(|| "(empty image)".into(), |p| p.display().to_string());
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("snapshot image {path}: {what}"),
        )
    }
}

impl Read for ImageReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.file.as_mut() {
            Some(f) => f.read(buf)?,
            None => 0,
        };
        self.read += n as u64;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        if self.read > self.len || (n == 0 && !buf.is_empty()) {
            if self.read != self.len {
                return Err(self.damage(format!("{} bytes, {} expected", self.read, self.len)));
            }
            if self.crc != self.expected_crc {
                return Err(self.damage(format!(
                    "checksum {:08x}, {:08x} expected",
                    self.crc, self.expected_crc
                )));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_written_and_sealed_reads_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StagedImage::create_in(dir.path()).unwrap();
        s.write_all(b"hello image").unwrap();
        s.seal().unwrap();
        assert_eq!(s.len(), 11);
        let img = SnapshotImage::new(s.path().to_path_buf(), s.len(), s.crc32c());
        let mut r = img.open().unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello image");
        // Dropped unstored: the file goes.
        let path = s.path().to_path_buf();
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn seal_written_learns_length_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StagedImage::create_in(dir.path()).unwrap();
        std::fs::write(s.path(), b"written elsewhere").unwrap();
        s.seal_written().unwrap();
        assert_eq!(s.len(), 17);
        assert_eq!(s.crc32c(), crc32c::crc32c(b"written elsewhere"));
    }

    #[test]
    fn damaged_image_fails_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"abcdef").unwrap();
        let img = SnapshotImage::new(path.clone(), 6, crc32c::crc32c(b"abcdeX"));
        let err = std::io::copy(&mut img.open().unwrap(), &mut std::io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let short = SnapshotImage::new(path, 7, crc32c::crc32c(b"abcdef"));
        let err = std::io::copy(&mut short.open().unwrap(), &mut std::io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut empty = SnapshotImage::empty().open().unwrap();
        assert_eq!(empty.read(&mut [0u8; 8]).unwrap(), 0);
    }
}
