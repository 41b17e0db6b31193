//! Bearer-token authentication and role checks.
//!
//! The route table (`super::routes`) names the least role of every route;
//! `app` wraps each route in [`require`] with that role. Tokens are stored
//! hashed (`hash_secret`); the presented token is hashed and looked up in the
//! replicated token table.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::ops::Role;
use crate::shared::hash_secret;

/// Longest token accepted (ours are 64 hex characters).
const MAX_TOKEN: usize = 512;

/// Who is calling, inserted in the request extensions once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's role.
    pub role: Role,
    /// The token's hash: which token it is, for limits per token.
    pub token_hash: Arc<str>,
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
pub async fn require(state: AppState, needed: Role, mut req: Request, next: Next) -> Response {
    let token = match bearer(&req) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let token_hash = hash_secret(token);
    let role = match state.db.token_role(&token_hash).await {
        Ok(Some(role)) => role,
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
    if role < needed {
        return ApiError::forbidden(format!(
            "this needs a token with the {} role (or higher); yours has the {} role",
            needed.as_str(),
            role.as_str()
        ))
        .into_response();
    }
    req.extensions_mut().insert(Caller {
        role,
        token_hash: token_hash.into(),
    });
    next.run(req).await
}

/// Adapter for `axum::middleware::from_fn_with_state`.
pub async fn layer(
    State((state, needed)): State<(AppState, Role)>,
    req: Request,
    next: Next,
) -> Response {
    require(state, needed, req, next).await
}
