//! [`Caller`]: who sent a request.

use sha2::Digest;

/// Who sent a request, for scoping what it leaves behind (an
/// `Idempotency-Key`). Set by [`crate::auth::middleware`] once a token
/// verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The verified token's `sub`.
    Subject(String),
    /// A verified token without `sub`: the token's hex SHA-256.
    Token(String),
    /// No token (auth off): the peer's address.
    Address(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Subject(sub) => write!(f, "sub:{sub}"),
            Caller::Token(hash) => write!(f, "token:{hash}"),
            Caller::Address(addr) => write!(f, "addr:{addr}"),
        }
    }
}

impl Caller {
    /// The holder of `token`: its `sub`, or the token itself without one.
    pub fn of_token(token: &str, sub: Option<String>) -> Self {
        match sub {
            Some(sub) => Caller::Subject(sub),
            None => Caller::Token(sha256_hex(token.as_bytes())),
        }
    }
}

/// The hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
