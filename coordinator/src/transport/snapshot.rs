//! Sending a snapshot image on its own connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::addr::PeerAddr;
use super::error::{FrameError, SnapshotSendError};
use super::frame::{Bytes, Frame, StreamKind, read_frame, write_frame};
use super::shared::{Context, Reporter, connect};
use crate::raft::Message;

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
    pub(crate) fn cancel(&self, to: crate::raft::NodeId, reporter: Option<&Reporter>) {
        self.abort.abort();
        if !self.reported.swap(true, Ordering::SeqCst)
            && let Some(reporter) = reporter
        {
            reporter.snapshot_status(to, false);
        }
    }
}

/// Sends `msg` with its image to `addr` and reports the outcome once.
pub(crate) async fn send_job(
    ctx: Arc<Context>,
    addr: PeerAddr,
    msg: Message,
    data: Arc<Vec<u8>>,
    reporter: Reporter,
    reported: Arc<AtomicBool>,
) {
    let to = msg.to;
    let len = data.len();
    let ok = match send(&ctx, &addr, msg, &data).await {
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

async fn send(
    ctx: &Context,
    addr: &PeerAddr,
    msg: Message,
    data: &[u8],
) -> Result<(), SnapshotSendError> {
    let max = ctx.config.max_frame_size;
    let (stream, _) = connect(ctx, addr, msg.to, StreamKind::Snapshot).await?;
    let (mut rd, wr) = stream.into_split();
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    let begin = Frame::SnapshotBegin {
        msg,
        total_len: data.len() as u64,
    };
    timed(ctx, write_frame(&mut wr, &begin, max)).await?;
    let mut hasher = Sha256::new();
    for chunk in data.chunks(ctx.config.snapshot_chunk_size) {
        hasher.update(chunk);
        let frame = Frame::SnapshotChunk {
            data: Bytes(chunk.to_vec()),
        };
        timed(ctx, write_frame(&mut wr, &frame, max)).await?;
    }
    let end = Frame::SnapshotEnd {
        digest: hasher.finalize().into(),
    };
    timed(ctx, write_frame(&mut wr, &end, max)).await?;
    timed(ctx, async { wr.flush().await.map_err(FrameError::Io) }).await?;
    match timed(ctx, read_frame(&mut rd, max)).await? {
        Some(Frame::SnapshotAck { ok: true }) => Ok(()),
        Some(Frame::SnapshotAck { ok: false }) => Err(SnapshotSendError::Rejected),
        Some(other) => Err(SnapshotSendError::Unexpected(other.name())),
        None => Err(SnapshotSendError::NoAck),
    }
}
