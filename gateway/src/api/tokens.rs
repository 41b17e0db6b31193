//! `/v1/tokens`: API tokens — create, list, revoke, rotate (admin only),
//! and when each was last used.
//!
//! A token's secret is returned once, when it is created or rotated; the
//! group stores its SHA-256 only, and nothing lists either. Token checks
//! use this gateway's applied state (`auth`): a revocation holds on a
//! gateway as soon as it applied the entry. The latest use of each token is
//! recorded in memory ([`TokenUses`]) and flushed to the group at most once
//! per [`USE_FLUSH_INTERVAL`], one entry carrying every token used since.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use coordinator::node::Node;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;

use super::AppState;
use super::devices::{ReadQuery, new_secret};
use super::error::{ApiError, ENTENTE_INDEX, Problem};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, MinIndexHeader, read_barrier, reply, unexpected, write,
};
use super::schemas::TokenId;
use super::validate;
use crate::ops::{MAX_TOKENS, Op, OpResult, Role, TokenInfo};
use crate::shared::{hash_secret, id_ok, propose, random_token};

/// The longest `expires_in` (seconds): ten years.
pub const MAX_EXPIRES_IN: u64 = 10 * 365 * 24 * 3600;

/// Longest token name.
pub const MAX_TOKEN_NAME: usize = 128;

/// How often a gateway flushes the token uses it recorded to the group (one
/// entry carrying the latest use of each token used since the last flush).
pub const USE_FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Body of `POST /v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "ci-deployer", "role": "operator", "expires_in": 2592000}))]
pub struct NewTokenRequest {
    /// A label for people: 1–128 characters, no control characters.
    #[schema(value_type = super::schemas::TokenName)]
    pub name: String,
    /// What the token may do: `viewer` (reads), `operator` (also devices,
    /// commands and shadows) or `admin` (everything, including tokens and
    /// the cluster).
    pub role: Role,
    /// Seconds until the token stops working (1 to 315,360,000: ten
    /// years); never if absent.
    #[serde(default, deserialize_with = "super::schemas::integral_opt")]
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub expires_in: Option<u64>,
}

/// Response of `POST /v1/tokens`: the token, with its secret — returned
/// only now.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id":"tok-5f1e0c2a9b7d4e31","name":"ci-deployer","role":"operator",
    "created_at":1764144000000u64,"expires_at":1766736000000u64,
    "token":"3b6f0c1e9a7d4e2f8c5b1a0d9e8f7c6b5a4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b"}))]
pub struct CreatedToken {
    /// Its id: how the API names it (list, revoke, rotate) and how events
    /// name what it did (`by`: `token:<id>`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Creation time (ms since epoch).
    pub created_at: u64,
    /// When it stops working (ms since epoch); `null` for never.
    pub expires_at: Option<u64>,
    /// The secret: send it as `Authorization: Bearer <token>`. Only its
    /// hash is stored; it cannot be read again.
    pub token: String,
}

/// Response of `POST /v1/tokens/{id}/rotate`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id":"bootstrap",
    "token":"3b6f0c1e9a7d4e2f8c5b1a0d9e8f7c6b5a4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b"}))]
pub struct RotatedToken {
    /// The token's id (unchanged).
    pub id: String,
    /// The new secret; the old one no longer works. Returned only now.
    pub token: String,
}

/// Response of `GET /v1/tokens`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    /// Every token of the group (at most 1,000), by id; never a secret or
    /// its hash.
    pub items: Vec<TokenInfo>,
}

/// A token id in a path (the alphabet of device ids; 400 otherwise).
fn path_token_id(id: &str) -> Result<(), ApiError> {
    if id_ok(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "token id {} is not valid: token ids are 1 to 64 characters from A-Z, a-z, 0-9, \
             '_', '.' and '-', as GET /v1/tokens lists them",
            validate::quoted(id)
        )))
    }
}

fn token_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "there is no token with the id {} (revoked, or never created); GET /v1/tokens lists them",
        validate::quoted(id)
    ))
}

/// A new token's id: `tok-` and 16 random hex digits.
fn new_token_id() -> Result<String, ApiError> {
    let r = random_token().map_err(|e| {
        tracing::error!(error = %e, "generating a token id");
        ApiError::internal()
    })?;
    Ok(format!("tok-{}", &r[..16]))
}

/// Create an API token (admin only).
///
/// The answer carries the token's secret, once; only its hash is stored.
/// A token works on a gateway once that gateway has applied its entry
/// (at once on this one; send the answer's `Entente-Index` as
/// `Entente-Min-Index` to another). A group holds at most 1,000 tokens.
#[utoipa::path(
    post, path = "/v1/tokens", tag = "tokens",
    request_body = NewTokenRequest,
    responses(
        (status = 201, description = "Created: the token with its secret, returned only now", body = CreatedToken,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The group holds 1,000 tokens already", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid name, role or expires_in", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<NewTokenRequest>,
) -> Result<Response, ApiError> {
    let n = body.name.chars().count();
    if n == 0 || n > MAX_TOKEN_NAME || body.name.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "name must be 1 to {MAX_TOKEN_NAME} characters without control characters"
        ))
        .at("/name".into()));
    }
    let expires_at = match body.expires_in {
        None => None,
        Some(s) if (1..=MAX_EXPIRES_IN).contains(&s) => {
            Some(crate::shared::now_ms().saturating_add(s * 1000))
        }
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "expires_in is seconds until the token stops working: 1 to {MAX_EXPIRES_IN} \
                 (ten years); leave it out for a token that does not expire"
            ))
            .at("/expires_in".into()));
        }
    };
    let secret = new_secret()?;
    let op = Op::CreateToken {
        token_hash: hash_secret(&secret),
        role: body.role,
        name: body.name,
        id: Some(new_token_id()?),
        expires_at,
    };
    let (index, result) = write(&state, op).await?;
    match result {
        OpResult::Token(t) => {
            tracing::info!(id = %t.id, role = t.role.as_str(), index, "API token created");
            let created = CreatedToken {
                id: t.id,
                name: t.name,
                role: t.role,
                created_at: t.created_at,
                expires_at: t.expires_at,
                token: secret,
            };
            Ok(reply(StatusCode::CREATED, index, &created))
        }
        OpResult::Conflict(why) => Err(ApiError::conflict(why).with_index(index)),
        r => Err(unexpected("create token", &r, index)),
    }
}

/// List the API tokens (admin only): id, name, role, creation, expiry and
/// latest use — never a secret or its hash.
///
/// `last_used` is the group's record (each gateway flushes the uses it saw
/// at most once a minute) or this gateway's own later one.
#[utoipa::path(
    get, path = "/v1/tokens", tag = "tokens",
    params(ReadQuery, MinIndexHeader),
    responses(
        (status = 200, description = "Every token, by id", body = TokenList,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid query or Entente-Min-Index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Entente-Min-Index was never issued by the group", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No quorum for a linearizable read, Entente-Min-Index not reached in time, or shutting down; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    axum::Extension(uses): axum::Extension<Arc<TokenUses>>,
    ApiQuery(q): ApiQuery<ReadQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    let mut items = state.db.list_tokens().await?;
    let local = uses.snapshot();
    for t in &mut items {
        if let Some(&at) = local.get(&t.id) {
            t.last_used = Some(t.last_used.map_or(at, |u| u.max(at)));
        }
    }
    Ok(reply(StatusCode::OK, ctx.index, &TokenList { items }))
}

/// Revoke an API token (admin only).
///
/// It stops working on each gateway as soon as that gateway has applied
/// the revocation (at once on this one). The group always keeps an admin
/// token that does not expire: revoking the last one is refused (409) —
/// create another first, or rotate it.
#[utoipa::path(
    delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = TokenId, Path, description = "Token id, as `GET /v1/tokens` lists it")),
    responses(
        (status = 204, description = "Revoked",
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The last admin token without an expiry cannot be revoked", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn revoke_token(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    path_token_id(&id)?;
    let (index, result) = write(&state, Op::RevokeToken { id: id.clone() }).await?;
    match result {
        OpResult::Done => {
            tracing::info!(id = %id, index, "API token revoked");
            Ok((StatusCode::NO_CONTENT, [(ENTENTE_INDEX, index)]).into_response())
        }
        OpResult::NotFound(_) => Err(token_not_found(&id).with_index(index)),
        OpResult::Conflict(why) => Err(ApiError::conflict(why).with_index(index)),
        r => Err(unexpected("revoke token", &r, index)),
    }
}

/// Rotate an API token's secret (admin only), e.g. the first admin token
/// (`bootstrap`) once it has been read from the data directory.
///
/// The new secret is returned once; the old one stops working on each
/// gateway once it applied the change. The id, name, role and expiry stay.
#[utoipa::path(
    post, path = "/v1/tokens/{id}/rotate", tag = "tokens",
    params(("id" = TokenId, Path, description = "Token id, as `GET /v1/tokens` lists it")),
    responses(
        (status = 200, description = "The new secret, returned only now", body = RotatedToken,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the admin role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn rotate_token(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    path_token_id(&id)?;
    let secret = new_secret()?;
    let op = Op::RotateToken {
        id: id.clone(),
        token_hash: hash_secret(&secret),
    };
    let (index, result) = write(&state, op).await?;
    match result {
        OpResult::Done => {
            tracing::info!(id = %id, index, "API token rotated");
            Ok(reply(
                StatusCode::OK,
                index,
                &RotatedToken { id, token: secret },
            ))
        }
        OpResult::NotFound(_) => Err(token_not_found(&id).with_index(index)),
        OpResult::Conflict(why) => Err(ApiError::conflict(why).with_index(index)),
        r => Err(unexpected("rotate token", &r, index)),
    }
}

/// The latest use of each token this gateway authenticated and has not
/// flushed to the group yet. At most [`MAX_TOKENS`] × 2 tokens are held
/// (ids of tokens revoked meanwhile may linger until the next flush); a use
/// beyond that is not recorded until the next flush empties it.
#[derive(Debug, Default)]
pub struct TokenUses {
    pending: Mutex<HashMap<String, u64>>,
}

impl TokenUses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a use of token `id` at `at_ms`.
    pub fn record(&self, id: &str, at_ms: u64) {
        let mut pending = self.lock();
        if let Some(t) = pending.get_mut(id) {
            *t = (*t).max(at_ms);
        } else if pending.len() < MAX_TOKENS * 2 {
            pending.insert(id.to_string(), at_ms);
        }
    }

    /// The uses recorded and not flushed yet.
    pub fn snapshot(&self) -> HashMap<String, u64> {
        self.lock().clone()
    }

    /// Proposes the uses recorded since the last flush as one
    /// `TokensUsed` entry; forgets those the group took (a use recorded
    /// meanwhile stays for the next flush). Nothing to flush: no entry.
    pub async fn flush(&self, node: &Node<OpResult>) {
        let uses: BTreeMap<String, u64> =
            self.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        if uses.is_empty() {
            return;
        }
        match propose(node, Op::TokensUsed { uses: uses.clone() }).await {
            Ok(_) => {
                let mut pending = self.lock();
                for (id, at) in uses {
                    if pending.get(&id) == Some(&at) {
                        pending.remove(&id);
                    }
                }
            }
            // Kept for the next flush.
            Err(e) => tracing::debug!(error = %e, "flushing token uses"),
        }
    }

    /// Flushes every [`USE_FLUSH_INTERVAL`] until `shutdown`.
    pub async fn run(self: Arc<Self>, node: Node<OpResult>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(USE_FLUSH_INTERVAL) => {}
                _ = super::stopped(&mut shutdown) => return,
            }
            self.flush(&node).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_keep_the_latest_per_token_and_stay_bounded() {
        let uses = TokenUses::default();
        uses.record("a", 5);
        uses.record("a", 3);
        uses.record("b", 7);
        let s = uses.snapshot();
        assert_eq!((s["a"], s["b"]), (5, 7));
        for i in 0..MAX_TOKENS * 3 {
            uses.record(&format!("t{i}"), 1);
        }
        assert_eq!(uses.snapshot().len(), MAX_TOKENS * 2);
        // A token already held still moves forward.
        uses.record("a", 9);
        assert_eq!(uses.snapshot()["a"], 9);
    }
}
