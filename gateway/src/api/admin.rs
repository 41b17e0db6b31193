//! `/v1/admin/backup`: a consistent backup of the replicated state, streamed
//! while the group keeps serving (format: `crate::backup`).

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;

use super::AppState;
use super::error::{ApiError, ENTENTE_INDEX, Problem};
use super::extract::{Consistency, read_barrier};
use crate::backup::{BackupHeader, MEDIA_TYPE, hex};

/// The response header carrying the image's SHA-256 (hex).
pub const BACKUP_SHA256: &str = "entente-backup-sha256";

/// How long writing the image may take before the response starts (on top
/// of the read barrier's bound); the request's deadline allows for it.
pub const IMAGE_BUDGET: Duration = Duration::from_secs(300);

/// One backup at a time per gateway: each holds a full image on disk.
#[derive(Debug)]
pub struct BackupSlot(Arc<Semaphore>);

impl Default for BackupSlot {
    fn default() -> Self {
        BackupSlot(Arc::new(Semaphore::new(1)))
    }
}

/// Stream a consistent backup of the replicated state.
///
/// The body is a backup file: a header line, a JSON description (`index`,
/// `size`, `sha256`, …) and the SQLite image of the state at that log index.
/// It includes every write acknowledged before the request was made
/// (linearizable), and nothing after its index. Restore it with
/// `gateway --restore FILE --data-dir DIR --node-id N`, which creates a new
/// group.
#[utoipa::path(
    get, path = "/v1/admin/backup", tag = "admin",
    responses(
        (status = 200, description = "A backup file: `ENTENTE-BACKUP 1`, a JSON description line, then the image",
            content_type = "application/vnd.entente.backup", body = Vec<u8>,
            headers(
                ("Entente-Index" = u64, description = "The log index the backup stands at"),
                ("Entente-Backup-Sha256" = String, description = "SHA-256 of the image (hex), as in the description line"),
            )),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token is not an admin token", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The image could not be written (the log names the cause)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Another backup is being taken on this gateway, no quorum for the read barrier, or shutting down; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn backup(
    State(state): State<AppState>,
    Extension(slot): Extension<Arc<BackupSlot>>,
) -> Result<Response, ApiError> {
    let permit = slot.0.clone().try_acquire_owned().map_err(|_| {
        ApiError::unavailable(
            "backup-in-progress",
            "another backup is being taken on this gateway; retry when it is done",
            5,
        )
    })?;
    // Every write acknowledged before this request is in the image.
    read_barrier(&state, Some(Consistency::Linearizable), &HeaderMap::new()).await?;
    // In a task of its own: a client that goes away does not leave the
    // image half-written (it is removed when done).
    let db = state.db.clone();
    let image = tokio::spawn(async move { db.backup_image().await })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the backup task failed");
            ApiError::internal()
        })?
        .map_err(|e| {
            tracing::error!(error = %e, "writing a backup image");
            ApiError::internal()
        })?;
    let sha = hex(&image.sha256);
    let head = BackupHeader {
        format: "sqlite".into(),
        index: image.index,
        size: image.len,
        sha256: sha.clone(),
        created_ms: crate::now_ms(),
        cluster_id: state.config.cluster_id.clone(),
        node_id: state.config.node_id,
    }
    .encode();
    let total = head.len() as u64 + image.len;
    tracing::info!(
        index = image.index,
        bytes = image.len,
        sha256 = %sha,
        "streaming a backup"
    );
    let file = tokio::fs::File::from_std(image.file);
    let body = tokio_util::io::ReaderStream::with_capacity(file, 64 << 10);
    // The permit lives as long as the body is being sent.
    let stream = tokio_stream::once(Ok::<Bytes, std::io::Error>(Bytes::from(head)))
        .chain(body)
        .map(move |chunk| {
            let _held = &permit;
            chunk
        });
    let mut res = Response::new(Body::from_stream(stream));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(MEDIA_TYPE));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    h.insert(ENTENTE_INDEX, HeaderValue::from(image.index));
    if let Ok(v) = HeaderValue::from_str(&sha) {
        h.insert(BACKUP_SHA256, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"entente-backup-{}.bin\"",
        image.index
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}
