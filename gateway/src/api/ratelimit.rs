//! Requests per API token: each token may make `rest_rate_limit` requests a
//! second, in bursts of up to twice as many (GCRA, `governor`); over it the
//! answer is `429` (`rate-limited`) with `Retry-After`, and nothing runs.
//!
//! The limit applies after authentication (an inner layer of each route
//! that needs a token), keyed by the token's hash, so it is per token and
//! per gateway: the table holds only tokens that exist, and requests with
//! an unknown token are refused (401) before they reach it. Requests that
//! need no token (`/healthz`, `/readyz`, `/openapi.json`,
//! `/asyncapi.json`) are not limited.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::auth::Caller;
use super::error::ApiError;

type Limiter = RateLimiter<Arc<str>, DefaultKeyedStateStore<Arc<str>>, DefaultClock>;

/// The per-token limits of one gateway (none when the limit is 0).
#[derive(Debug, Clone)]
pub struct RateLimits {
    limiter: Option<Arc<Limiter>>,
    per_sec: u32,
}

impl RateLimits {
    /// `per_sec` requests a second per token, bursts of twice as many; 0 is
    /// no limit.
    pub fn new(per_sec: u32) -> RateLimits {
        let limiter = NonZeroU32::new(per_sec).map(|rate| {
            let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
            Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        RateLimits { limiter, per_sec }
    }

    /// `Ok`, or how long until the token may make its next request.
    pub fn check(&self, token_hash: &Arc<str>) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(token_hash)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }
}

/// Middleware (inside authentication): refuses a request over its token's
/// rate with 429 and `Retry-After` (whole seconds, at least 1).
pub async fn layer(State(limits): State<RateLimits>, req: Request, next: Next) -> Response {
    let Some(caller) = req.extensions().get::<Caller>() else {
        return next.run(req).await;
    };
    if let Err(wait) = limits.check(&caller.token_hash) {
        let retry_s = wait.as_secs_f64().ceil().max(1.0) as u64;
        return ApiError::too_many_requests(
            "rate-limited",
            format!(
                "this token made more than {} requests a second (bursts of up to twice as many) \
                 to this gateway; retry after {retry_s} s",
                limits.per_sec
            ),
            retry_s,
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_gets_its_burst_then_waits_and_others_are_unaffected() {
        let limits = RateLimits::new(5);
        let a: Arc<str> = "hash-a".into();
        let b: Arc<str> = "hash-b".into();
        for i in 0..10 {
            assert!(limits.check(&a).is_ok(), "request {i} of the burst");
        }
        let wait = limits.check(&a).expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        assert!(limits.check(&b).is_ok(), "another token has its own budget");
        let off = RateLimits::new(0);
        for _ in 0..10_000 {
            assert!(off.check(&a).is_ok());
        }
    }
}
