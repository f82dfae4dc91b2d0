//! The rate limit of the `/v1` routes: a token bucket per bearer token, or
//! per client IP for requests without a valid token
//! (`KVQ_RATE_LIMIT_PER_SECOND`, `KVQ_RATE_LIMIT_BURST`). Over it, a request
//! gets 429 `rate_limited` with `Retry-After`.
//!
//! Each API process keeps its own buckets: with N API pods a client gets up
//! to N times the limit, spread across them by the load balancer.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use kvq_shared::Config;

use crate::error::ApiError;

/// Whom a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// A verified bearer token (a hash of it: the buckets hold no secrets).
    Token(u64),
    /// Anonymous, or a token that did not verify: the peer's address.
    Ip(IpAddr),
}

impl Client {
    /// The client holding `token`.
    pub fn token(token: &str) -> Self {
        let mut hasher = DefaultHasher::new();
        token.hash(&mut hasher);
        Client::Token(hasher.finish())
    }
}

/// How often buckets that have refilled are dropped, so that memory follows
/// the number of recent clients, not of all clients ever seen.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The buckets of one API process.
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<Client>,
    clock: DefaultClock,
}

impl RateLimit {
    /// The configured limit, or `None` when `KVQ_RATE_LIMIT_PER_SECOND` is 0.
    pub fn from_config(config: &Config) -> Option<Self> {
        let per_second = NonZeroU32::new(config.rate_limit_per_second)?;
        let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(per_second);
        Some(Self {
            limiter: DefaultKeyedRateLimiter::dashmap(
                Quota::per_second(per_second).allow_burst(burst),
            ),
            clock: DefaultClock::default(),
        })
    }

    /// Takes one request from `client`'s bucket, or says how long to wait.
    pub fn check(&self, client: &Client) -> Result<(), ApiError> {
        self.limiter.check_key(client).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            // Whole seconds, rounded up: Retry-After 0 would invite a spin.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            ApiError::RateLimited(seconds.max(1))
        })
    }

    /// Drops full buckets now and then, for as long as the process runs.
    pub async fn sweep(self: std::sync::Arc<Self>) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        loop {
            every.tick().await;
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
    }
}
