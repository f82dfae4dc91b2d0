//! Bearer-token authentication and roles.
//!
//! Every `/v1` route needs `Authorization: Bearer <JWT>`, verified with HS256
//! (`KVQ_AUTH_JWT_SECRET`) or RS256 (`KVQ_AUTH_JWT_PUBLIC_KEY_FILE`); `exp` is
//! required. Roles come from the claim `roles` (a list of strings) or,
//! Keycloak-style, `realm_access.roles`:
//! - `reader`: reads keys and job status;
//! - `writer`: also writes;
//! - `admin`: also lists and retries dead jobs, and reads `GET /v1/stats`.
//!
//! The original service's routes (`/create`, `/read`, `/update`, `/delete`)
//! need the same roles: `reader` to read, `writer` to write.
//!
//! A token is refused (401) when, besides a bad signature or algorithm:
//! - `exp` is missing or past, or `nbf` is present and still ahead (both
//!   with [`LEEWAY_SECONDS`] of leeway);
//! - its JOSE header has `crit` (RFC 7515 §4.1.11: kvq understands no
//!   extension, so any `crit`, even an empty list or `null`, is refused). The
//!   header is read before the signature is checked, and may be at most
//!   [`MAX_JOSE_HEADER_CHARS`] long;
//! - `KVQ_AUTH_MAX_TOKEN_LIFETIME` is set and the token has no numeric `iat`,
//!   an `iat` ahead of now (beyond the leeway, which would stretch its life),
//!   or `exp - iat` longer than the maximum.
//!
//! Refusals are logged at debug level only: anyone can send bad tokens, and
//! each must not cost a log line.
//!
//! No valid token → 401; a valid token without the role → 403. `/healthz`,
//! `/readyz`, `/metrics` and `/openapi.json` need no token.

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{HttpMessage, web};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use kvq_shared::Config;
use serde::{Deserialize, Deserializer, Serialize};

use crate::caller::Caller;
use crate::error::ApiError;
use crate::rate_limit::{Client, RateLimit};

/// What a token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads keys and job status.
    Reader,
    /// Also writes.
    Writer,
    /// Also handles dead jobs.
    Admin,
}

impl Role {
    /// Parses `reader`, `writer` or `admin`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "reader" => Some(Role::Reader),
            "writer" => Some(Role::Writer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The role's name in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
}

/// Seconds of clock skew allowed on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: u64 = 5;

/// The longest JOSE header segment (base64url) read to look for `crit`:
/// ample for `alg`, `typ`, `kid` and an `x5c` chain.
pub const MAX_JOSE_HEADER_CHARS: usize = 16 * 1024;

#[derive(Debug, Deserialize)]
struct RealmAccess {
    #[serde(default)]
    roles: Vec<String>,
}

/// The claims kvq reads.
#[derive(Debug, Deserialize)]
struct Claims {
    /// Expires at, in seconds: a NumericDate, which may have a fraction
    /// (RFC 7519); jsonwebtoken has checked it already.
    exp: f64,
    /// Issued at, in seconds (any JSON number; anything else counts as
    /// absent, which matters only with a maximum lifetime).
    #[serde(default, deserialize_with = "number_or_none")]
    iat: Option<f64>,
    /// The subject: who the caller is (`Idempotency-Key` scopes).
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    realm_access: Option<RealmAccess>,
}

/// The claims of a token `kvq-api token` mints.
#[derive(Debug, Serialize)]
struct MintedClaims {
    exp: u64,
    iat: u64,
    sub: String,
    roles: Vec<String>,
}

fn number_or_none<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Number(n) => n.as_f64(),
        _ => None,
    })
}

/// Verifies tokens; `None` inside when auth is disabled.
#[derive(Clone)]
pub struct Auth(Option<Verifier>);

#[derive(Clone)]
struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// `KVQ_AUTH_MAX_TOKEN_LIFETIME`.
    max_lifetime: Option<Duration>,
}

/// Why the configuration cannot give an authenticator.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Neither a secret nor a public key, and auth not disabled.
    #[error(
        "no token key configured: set KVQ_AUTH_JWT_SECRET (HS256) or KVQ_AUTH_JWT_PUBLIC_KEY_FILE (RS256, PEM), or KVQ_AUTH_DISABLED=true to serve without authentication"
    )]
    NoKey,
    /// The public key file cannot be read or parsed.
    #[error("KVQ_AUTH_JWT_PUBLIC_KEY_FILE: {0}")]
    PublicKey(String),
}

impl Auth {
    /// The authenticator the configuration asks for.
    pub fn from_config(config: &Config) -> Result<Self, AuthConfigError> {
        if config.auth_disabled {
            return Ok(Auth(None));
        }
        let (key, algorithm) = if let Some(path) = &config.auth_jwt_public_key_file {
            let pem = std::fs::read(path)
                .map_err(|e| AuthConfigError::PublicKey(format!("{}: {e}", path.display())))?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .map_err(|e| AuthConfigError::PublicKey(format!("{}: {e}", path.display())))?;
            (key, Algorithm::RS256)
        } else if let Some(secret) = &config.auth_jwt_secret {
            (
                DecodingKey::from_secret(secret.expose().as_bytes()),
                Algorithm::HS256,
            )
        } else {
            return Err(AuthConfigError::NoKey);
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Ok(Auth(Some(Verifier {
            key,
            validation,
            max_lifetime: config.auth_max_token_lifetime,
        })))
    }

    /// Whether requests are checked at all.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The highest role of the bearer token in `authorization`, and who
    /// holds it (`None` when auth is off).
    fn role(&self, authorization: Option<&str>) -> Result<(Role, Option<Caller>), ApiError> {
        let Some(verifier) = &self.0 else {
            return Ok((Role::Admin, None));
        };
        let token = bearer(authorization)
            .ok_or_else(|| ApiError::Unauthorized("send Authorization: Bearer <token>".into()))?;
        check_jose_header(token).map_err(refused)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation)
            .map_err(|e| refused(e.to_string()))?
            .claims;
        if let Some(max) = verifier.max_lifetime {
            check_lifetime(&claims, max, now_secs()).map_err(|why| {
                tracing::debug!(reason = why, "token refused");
                ApiError::Unauthorized(format!(
                    "the token must carry iat and live (exp - iat) at most {} s",
                    max.as_secs()
                ))
            })?;
        }
        let names = claims
            .roles
            .iter()
            .chain(claims.realm_access.iter().flat_map(|r| r.roles.iter()));
        let role = names
            .filter_map(|name| Role::parse(name))
            .max()
            .ok_or_else(|| ApiError::Forbidden("the token has no kvq role".into()))?;
        Ok((role, Some(Caller::of_token(token, claims.sub))))
    }
}

/// The 401 of a token refused for `reason`, logged at debug level.
fn refused(reason: impl std::fmt::Display) -> ApiError {
    tracing::debug!(reason = %reason, "token refused");
    ApiError::Unauthorized("the token is invalid or expired".into())
}

/// Refuses a token whose JOSE header (read before any signature check, and
/// bounded) has `crit`, or that is not three dot-separated segments.
fn check_jose_header(token: &str) -> Result<(), &'static str> {
    let mut segments = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err("not three segments");
    };
    if header.len() > MAX_JOSE_HEADER_CHARS {
        return Err("JOSE header too long");
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| "JOSE header is not base64url")?;
    let fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| "JOSE header is not a JSON object")?;
    if fields.contains_key("crit") {
        return Err("JOSE header has crit");
    }
    Ok(())
}

/// Refuses a token without `iat`, issued ahead of `now` (beyond the
/// leeway), or living longer than `max`.
fn check_lifetime(claims: &Claims, max: Duration, now: u64) -> Result<(), &'static str> {
    let iat = claims.iat.ok_or("no iat")?;
    if iat > now.saturating_add(LEEWAY_SECONDS) as f64 {
        return Err("iat in the future");
    }
    if claims.exp - iat > max.as_secs_f64() {
        return Err("lives longer than KVQ_AUTH_MAX_TOKEN_LIFETIME");
    }
    Ok(())
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The role a request needs; `None` for the open routes.
pub(crate) fn required_role(method: &Method, path: &str) -> Option<Role> {
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if crate::routes::legacy::is_legacy(path) {
        return Some(if read { Role::Reader } else { Role::Writer });
    }
    if !path.starts_with("/v1/") && path != "/v1" {
        return None;
    }
    if (path.starts_with("/v1/jobs") && (!read || path == "/v1/jobs")) || path == "/v1/stats" {
        return Some(Role::Admin);
    }
    Some(if read { Role::Reader } else { Role::Writer })
}

/// The path as the router matches it: percent-decoded (but for `%2F` and
/// the like), so `/%76%31/jobs` is `/v1/jobs` here as it is to the router.
/// The raw `req.path()` must not decide who may pass.
fn routed_path(req: &ServiceRequest) -> &str {
    req.match_info().as_str()
}

/// Whether the request is for a legacy route while `KVQ_LEGACY_ROUTES=false`:
/// then it is an unknown path, answered 404 without a token.
fn legacy_switched_off(req: &ServiceRequest) -> bool {
    crate::routes::legacy::is_legacy(routed_path(req))
        && req
            .app_data::<web::Data<crate::state::AppState>>()
            .is_some_and(|state| !state.config.legacy_routes)
}

/// Checks the token of every `/v1` and legacy request, and counts the request against
/// its client's rate limit: the token's when it verifies, else the peer
/// address's (so that made-up tokens share one bucket).
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if let Some(needed) = required_role(req.method(), routed_path(&req))
        && !legacy_switched_off(&req)
        && let Some(auth) = req.app_data::<web::Data<Auth>>()
    {
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let verdict = auth.role(header);
        let limited = req.app_data::<web::Data<RateLimit>>().and_then(|limit| {
            let client = match bearer(header) {
                Some(token) if auth.enabled() && verdict.is_ok() => Client::token(token),
                _ => Client::Ip(
                    req.peer_addr()
                        .map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |a| a.ip()),
                ),
            };
            limit.check(&client).err()
        });
        let refusal = limited.or(match verdict {
            Ok((role, caller)) if role >= needed => {
                if let Some(caller) = caller {
                    req.extensions_mut().insert(caller);
                }
                None
            }
            Ok((role, _)) => Some(ApiError::Forbidden(format!(
                "this needs the {} role; the token has {}",
                needed.as_str(),
                role.as_str()
            ))),
            Err(e) => Some(e),
        });
        if let Some(error) = refusal {
            let (request, _) = req.into_parts();
            let response = actix_web::ResponseError::error_response(&error);
            return Ok(ServiceResponse::new(request, response).map_into_right_body());
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// The `--ttl` of `kvq-api token` when none is given: an hour, or
/// `KVQ_AUTH_MAX_TOKEN_LIFETIME` when that is shorter.
pub fn default_ttl(config: &Config) -> Duration {
    let hour = Duration::from_secs(3_600);
    config
        .auth_max_token_lifetime
        .map_or(hour, |max| max.min(hour))
}

/// Mints a token for `role`, valid for `ttl` from now (`iat` is now),
/// signed with the configured HS256 secret (`kvq-api token`). A `ttl` longer
/// than `KVQ_AUTH_MAX_TOKEN_LIFETIME` is refused: the API would refuse the
/// token.
pub fn mint(config: &Config, role: Role, ttl: Duration) -> Result<String, String> {
    let secret = config
        .auth_jwt_secret
        .as_ref()
        .ok_or("KVQ_AUTH_JWT_SECRET must be set to mint tokens")?;
    if let Some(max) = config.auth_max_token_lifetime
        && ttl > max
    {
        return Err(format!(
            "--ttl is {} s, longer than KVQ_AUTH_MAX_TOKEN_LIFETIME ({} s): the API would refuse the token",
            ttl.as_secs(),
            max.as_secs()
        ));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = MintedClaims {
        exp: now.saturating_add(ttl.as_secs()),
        iat: now,
        sub: format!("kvq-{}", role.as_str()),
        roles: vec![role.as_str().to_owned()],
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64, iat: Option<f64>) -> Claims {
        Claims {
            exp: exp as f64,
            iat,
            sub: None,
            roles: Vec::new(),
            realm_access: None,
        }
    }

    #[test]
    fn lifetimes_are_bounded() {
        let (now, hour) = (1_800_000_000, Duration::from_secs(3_600));
        let ok = |exp, iat| check_lifetime(&claims(exp, iat), hour, now);
        assert_eq!(ok(now + 3_600, Some(now as f64)), Ok(()));
        assert_eq!(ok(now + 600, Some(now as f64 - 60.5)), Ok(()));
        assert!(ok(now + 3_601, Some(now as f64)).is_err());
        assert!(ok(now + 600, None).is_err());
        assert!(ok(now + 86_400 + 600, Some((now + 86_400) as f64)).is_err());
    }

    #[test]
    fn crit_in_the_jose_header_is_refused_whatever_its_value() {
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = |header: &str| format!("{}.e30.c2ln", b64(header));
        assert_eq!(check_jose_header(&token(r#"{"alg":"HS256"}"#)), Ok(()));
        for header in [
            r#"{"alg":"HS256","crit":["exp"]}"#,
            r#"{"alg":"HS256","crit":[]}"#,
            r#"{"alg":"HS256","crit":null}"#,
            r#"{"alg":"HS256","crit":"x"}"#,
        ] {
            assert!(check_jose_header(&token(header)).is_err(), "{header}");
        }
        assert!(check_jose_header("a.b").is_err());
        assert!(check_jose_header("a.b.c.d").is_err());
        let long = format!(r#"{{"alg":"HS256","kid":"{}"}}"#, "k".repeat(20_000));
        assert!(check_jose_header(&token(&long)).is_err());
    }

    #[test]
    fn routes_need_roles() {
        assert_eq!(required_role(&Method::GET, "/healthz"), None);
        assert_eq!(required_role(&Method::GET, "/openapi.json"), None);
        assert_eq!(required_role(&Method::GET, "/v1/kv/a"), Some(Role::Reader));
        assert_eq!(
            required_role(&Method::GET, "/v1/jobs/x"),
            Some(Role::Reader)
        );
        assert_eq!(required_role(&Method::PUT, "/v1/kv/a"), Some(Role::Writer));
        assert_eq!(required_role(&Method::POST, "/v1/kv"), Some(Role::Writer));
        assert_eq!(
            required_role(&Method::POST, "/v1/batch"),
            Some(Role::Writer)
        );
        assert_eq!(required_role(&Method::GET, "/v1/jobs"), Some(Role::Admin));
        assert_eq!(required_role(&Method::GET, "/v1/stats"), Some(Role::Admin));
        assert_eq!(
            required_role(&Method::POST, "/v1/jobs/x/retry"),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&Method::GET, "/read/a"), Some(Role::Reader));
        assert_eq!(
            required_role(&Method::POST, "/create/a"),
            Some(Role::Writer)
        );
        assert_eq!(required_role(&Method::GET, "/readyz"), None);
    }
}
