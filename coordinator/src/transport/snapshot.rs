//! Sending a snapshot image on its own connection.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::addr::PeerAddr;
use super::error::{FrameError, SnapshotSendError};
use super::frame::{BareFrame, Bytes, Frame, NoMessage, StreamKind, read_frame, write_frame};
use super::shared::{Context, Reporter, connect};
use crate::image::{ImageReader, SnapshotImage};
use consensus::engine::EngineMessage;

/// A snapshot send in flight, so that a newer one to the same peer can
/// cancel it.
#[derive(Debug)]
pub(crate) struct SnapshotJob {
    /// Aborts the sending task.
    pub abort: AbortHandle,
    /// Set once the outcome has been reported (exactly one report per job).
    pub reported: Arc<AtomicBool>,
}

impl SnapshotJob {
    /// Cancels the job, reporting failure unless it already reported.
    pub(crate) fn cancel<M: Send + 'static>(
        &self,
        to: crate::raft::NodeId,
        reporter: Option<&Reporter<M>>,
    ) {
        self.abort.abort();
        if !self.reported.swap(true, Ordering::SeqCst)
            && let Some(reporter) = reporter
        {
            reporter.snapshot_status(to, false);
        }
    }
}

/// Sends `msg` with its image to `addr` and reports the outcome once.
pub(crate) async fn send_job<M: EngineMessage>(
    ctx: Arc<Context>,
    addr: PeerAddr,
    msg: M,
    image: SnapshotImage,
    reporter: Reporter<M>,
    reported: Arc<AtomicBool>,
) {
    let to = msg.to();
    let len = image.len();
    let ok = match send(&ctx, &addr, msg, &image).await {
        Ok(()) => {
            info!(peer = to, peer_addr = %addr, bytes = len, "snapshot sent and acknowledged");
            true
        }
        Err(e) => {
            warn!(peer = to, peer_addr = %addr, bytes = len, error = %e, "snapshot send failed");
            false
        }
    };
    if !reported.swap(true, Ordering::SeqCst) {
        reporter.snapshot_status(to, ok);
    }
}

async fn timed<T>(
    ctx: &Context,
    f: impl Future<Output = Result<T, FrameError>>,
) -> Result<T, FrameError> {
    tokio::time::timeout(ctx.config.io_timeout, f)
        .await
        .unwrap_or(Err(FrameError::Timeout))
}

/// The image being sent: read one chunk at a time, hashed as it goes.
struct Source {
    reader: ImageReader,
    hasher: Sha256,
    left: u64,
}

impl Source {
    /// The next chunk (at most `max` bytes), or `None` at the end, once the
    /// reader has checked the image's length and checksum. Blocking.
    fn next_chunk(&mut self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.reader.read(&mut probe)? {
                0 => Ok(None),
                _ => Err(std::io::Error::other("the image is longer than recorded")),
            };
        }
        let n = usize::try_from(self.left.min(max as u64)).unwrap_or(max);
        let mut buf = vec![0u8; n];
        self.reader.read_exact(&mut buf)?;
        self.hasher.update(&buf);
        self.left -= n as u64;
        Ok(Some(buf))
    }
}

async fn send<M: EngineMessage>(
    ctx: &Context,
    addr: &PeerAddr,
    msg: M,
    image: &SnapshotImage,
) -> Result<(), SnapshotSendError> {
    let max = ctx.config.max_frame_size;
    let chunk_size = ctx.config.snapshot_chunk_size;
    // Opened first: the file stays readable for the whole send even if the
    // storage removes this snapshot meanwhile.
    let mut source = Some(Source {
        reader: image.open().map_err(SnapshotSendError::Image)?,
        hasher: Sha256::new(),
        left: image.len(),
    });
    let (stream, _) = connect(ctx, addr, msg.to(), StreamKind::Snapshot).await?;
    let (mut rd, wr) = tokio::io::split(stream);
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    let begin = Frame::SnapshotBegin {
        msg,
        total_len: image.len(),
    };
    timed(ctx, write_frame(&mut wr, &begin, max)).await?;
    loop {
        // Reading and hashing happen on a blocking thread.
        let mut s = source.take().ok_or(SnapshotSendError::NoAck)?;
        let (s, chunk) = tokio::task::spawn_blocking(move || {
            let r = s.next_chunk(chunk_size);
            (s, r)
        })
        .await
        .map_err(|e| SnapshotSendError::Image(std::io::Error::other(e)))?;
        let Some(chunk) = chunk.map_err(SnapshotSendError::Image)? else {
            source = Some(s);
            break;
        };
        source = Some(s);
        let frame = BareFrame::SnapshotChunk { data: Bytes(chunk) };
        timed(ctx, write_frame(&mut wr, &frame, max)).await?;
    }
    let hasher = source.map(|s| s.hasher).unwrap_or_default();
    let end = BareFrame::SnapshotEnd {
        digest: hasher.finalize().into(),
    };
    timed(ctx, write_frame(&mut wr, &end, max)).await?;
    timed(ctx, async { wr.flush().await.map_err(FrameError::Io) }).await?;
    match timed(ctx, read_frame::<_, NoMessage>(&mut rd, max)).await? {
        Some(Frame::SnapshotAck { ok: true }) => Ok(()),
        Some(Frame::SnapshotAck { ok: false }) => Err(SnapshotSendError::Rejected),
        Some(other) => Err(SnapshotSendError::Unexpected(other.name())),
        None => Err(SnapshotSendError::NoAck),
    }
}
