//! Bearer-token authentication and role checks.
//!
//! The route table (`super::routes`) names the least role of every route;
//! `app` wraps each route in [`require`] with that role. Tokens are stored
//! hashed (`hash_secret`); the presented token is hashed and looked up in the
//! replicated token table as this gateway has applied it (a revocation
//! holds here once applied here), and its expiry compared with this
//! gateway's clock. The request then runs with the token's id as its
//! [`AUDIT_BY`] (the `by` of the writes it makes), and the use is recorded
//! for the token's `last_used` ([`super::tokens::TokenUses`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::tokens::TokenUses;
use crate::ops::Role;
use crate::shared::{hash_secret, now_ms};

/// Longest token accepted (ours are 64 hex characters).
const MAX_TOKEN: usize = 512;

/// Who is calling, inserted in the request extensions once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's role.
    pub role: Role,
    /// The token's hash: which token it is, for limits per token.
    pub token_hash: Arc<str>,
    /// The token's id.
    pub token_id: Arc<str>,
}

tokio::task_local! {
    /// The audit trail's `by` of the request being served (`token:<id>`),
    /// set by [`require`] around the handler: `extract::write` proposes
    /// with it, so every write names the token that made it.
    pub(crate) static AUDIT_BY: Arc<str>;
}

/// Extracts the token of an `Authorization: Bearer <token>` header.
fn bearer(req: &Request) -> Result<&str, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "this endpoint needs a token: send the header 'Authorization: Bearer <token>' (the \
             first admin token is in the admin-token file of the gateway's data directory)",
            false,
        ));
    };
    let malformed =
        || ApiError::unauthorized("the Authorization header must be 'Bearer <token>'", true);
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.len() > MAX_TOKEN
        || token.contains(char::is_whitespace)
    {
        return Err(malformed());
    }
    Ok(token)
}

/// Middleware: authenticates the caller and checks it has at least `needed`.
pub async fn require(
    state: AppState,
    uses: &TokenUses,
    needed: Role,
    mut req: Request,
    next: Next,
) -> Response {
    let token = match bearer(&req) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let token_hash = hash_secret(token);
    let found = match state.db.token(&token_hash).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return ApiError::unauthorized(
                "the token is not known to this gateway (mistyped, revoked, or created so \
                 recently that this gateway has not applied it yet)",
                true,
            )
            .into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let now = now_ms();
    if let Some(expired) = found.expires_at.filter(|&e| e <= now) {
        return ApiError::unauthorized(
            format!(
                "the token expired (at {expired} ms since the Unix epoch, by this gateway's \
                 clock); ask an admin for a new one"
            ),
            true,
        )
        .into_response();
    }
    let role = found.role;
    if role < needed {
        return ApiError::forbidden(format!(
            "this needs a token with the {} role (or higher); yours has the {} role",
            needed.as_str(),
            role.as_str()
        ))
        .into_response();
    }
    uses.record(&found.id, now);
    let by: Arc<str> = format!("token:{}", found.id).into();
    req.extensions_mut().insert(Caller {
        role,
        token_hash: token_hash.into(),
        token_id: found.id.into(),
    });
    AUDIT_BY
        .scope(by, super::extract::certified(next.run(req)))
        .await
}

/// Adapter for `axum::middleware::from_fn_with_state`.
pub async fn layer(
    State((state, uses, needed)): State<(AppState, Arc<TokenUses>, Role)>,
    req: Request,
    next: Next,
) -> Response {
    require(state, &uses, needed, req, next).await
}
