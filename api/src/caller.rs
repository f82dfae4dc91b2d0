//! [`Caller`]: who sent a request.

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
        use sha2::{Digest, Sha256};
        match sub {
            Some(sub) => Caller::Subject(sub),
            None => Caller::Token(
                Sha256::digest(token.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            ),
        }
    }
}
