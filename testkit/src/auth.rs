//! Bearer tokens for stacks with auth on: one test secret, HS256 tokens
//! minted with it, and [`crate::StackBuilder::secured`] to start a stack that
//! checks them.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The HS256 secret of [`crate::StackBuilder::secured`] stacks.
pub const TEST_JWT_SECRET: &str = "kvq-test-secret-0123456789abcdef";

/// Unix seconds `secs` from now (negative: in the past).
pub fn exp_in(secs: i64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    now.saturating_add_signed(secs)
}

/// `claims` signed with `secret` by `algorithm`.
pub fn sign(claims: &Value, algorithm: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("test claims serialize")
}

/// A token with `roles`, valid for ten minutes, signed with
/// [`TEST_JWT_SECRET`].
pub fn token(roles: &[&str]) -> String {
    sign(
        &json!({"exp": exp_in(600), "roles": roles}),
        Algorithm::HS256,
        TEST_JWT_SECRET,
    )
}
