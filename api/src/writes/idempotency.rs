//! `Idempotency-Key`, as Stripe scopes it.
//!
//! A key belongs to one caller, one method and one route: the token's `sub`
//! (or, for a token without one, the token itself; with auth off, the peer
//! address), the HTTP method and the route pattern (`/v1/kv/{key}`,
//! `/create/{key}`, ...). The same header value sent by another caller, or
//! to another route, is another key and never replays anything.
//!
//! The first request's fingerprint (operation, key, value, TTL and
//! `If-Match`: everything the job would do; for a batch, that of every
//! write, in order) is stored with it. A repeat with
//! the same fingerprint answers the first answer again; a repeat with another
//! fingerprint is refused with 422 `idempotency_key_reused`, since it is a
//! different request that would otherwise be silently dropped.

use actix_web::http::header::HeaderMap;
use actix_web::{HttpMessage, HttpRequest};
use sha2::{Digest, Sha256};

use crate::caller::{Caller, hex};
use crate::error::ApiError;
use crate::writes::Write;

/// The header that makes a write idempotent.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The `Idempotency-Key` token, if sent: 1 to 255 visible ASCII characters.
pub fn token(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let token = raw.to_str().unwrap_or_default().trim();
    if token.is_empty() || token.len() > 255 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::InvalidRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ));
    }
    Ok(Some(token))
}

/// The scope of `token` sent with `req`: hex SHA-256 of the caller, the
/// method, the route pattern and the token.
pub fn scope(req: &HttpRequest, token: &str) -> String {
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| {
            Caller::Address(
                req.peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default(),
            )
        });
    let route = req.match_pattern().unwrap_or_else(|| req.path().to_owned());
    let mut hash = Sha256::new();
    for part in [
        caller.to_string().as_bytes(),
        req.method().as_str().as_bytes(),
        route.as_bytes(),
        token.as_bytes(),
    ] {
        field(&mut hash, part);
    }
    hex(&hash.finalize())
}

/// The fingerprint of what `write` would do: hex SHA-256 of its operation,
/// key, value, TTL and `If-Match`.
pub fn fingerprint(write: &Write) -> String {
    let mut hash = Sha256::new();
    field(&mut hash, write.op.as_str().as_bytes());
    field(&mut hash, write.key.as_bytes());
    match &write.value {
        Some(value) => field(&mut hash, value.get().as_bytes()),
        None => field(&mut hash, b"-"),
    }
    field(&mut hash, format!("{:?}", write.ttl_seconds).as_bytes());
    field(&mut hash, format!("{:?}", write.if_match).as_bytes());
    hex(&hash.finalize())
}

/// The fingerprint of a batch (`POST /v1/batch`): hex SHA-256 of its
/// writes' [`fingerprint`]s, in order.
pub fn batch_fingerprint(writes: &[Write]) -> String {
    let mut hash = Sha256::new();
    field(&mut hash, b"batch");
    for write in writes {
        field(&mut hash, fingerprint(write).as_bytes());
    }
    hex(&hash.finalize())
}

/// Hashes one field, length first, so that no two field lists hash alike.
fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_be_bytes());
    hash.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvq_shared::jobs::Op;
    use serde_json::value::RawValue;

    fn write(value: &str) -> Write {
        Write {
            op: Op::Create,
            key: "k".into(),
            value: Some(RawValue::from_string(value.into()).expect("json")),
            ttl_seconds: None,
            if_match: None,
        }
    }

    #[test]
    fn fingerprints_tell_requests_apart() {
        assert_eq!(fingerprint(&write("1")), fingerprint(&write("1")));
        assert_ne!(fingerprint(&write("1")), fingerprint(&write("2")));
        let mut later = write("1");
        later.ttl_seconds = Some(60);
        assert_ne!(fingerprint(&write("1")), fingerprint(&later));
        assert_eq!(fingerprint(&write("1")).len(), 64);
    }

    #[test]
    fn batch_fingerprints_follow_every_write_and_their_order() {
        let batch = |values: &[&str]| {
            batch_fingerprint(&values.iter().map(|v| write(v)).collect::<Vec<_>>())
        };
        assert_eq!(batch(&["1", "2"]), batch(&["1", "2"]));
        assert_ne!(batch(&["1", "2"]), batch(&["2", "1"]));
        assert_ne!(batch(&["1", "2"]), batch(&["1"]));
        assert_ne!(batch(&["1"]), fingerprint(&write("1")));
    }
}
