//! Bearer-token authentication and roles.
//!
//! Every `/v1` route needs `Authorization: Bearer <JWT>`, verified with HS256
//! (`KVQ_AUTH_JWT_SECRET`) or RS256 (`KVQ_AUTH_JWT_PUBLIC_KEY_FILE`); `exp` is
//! required. Roles come from the claim `roles` (a list of strings) or,
//! Keycloak-style, `realm_access.roles`:
//! - `reader`: reads keys and job status;
//! - `writer`: also writes;
//! - `admin`: also lists and retries dead jobs.
//!
//! The original service's routes (`/create`, `/read`, `/update`, `/delete`)
//! need the same roles: `reader` to read, `writer` to write.
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
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use kvq_shared::Config;
use serde::{Deserialize, Serialize};

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

#[derive(Debug, Serialize, Deserialize)]
struct RealmAccess {
    #[serde(default)]
    roles: Vec<String>,
}

/// The claims kvq reads.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    realm_access: Option<RealmAccess>,
}

/// Verifies tokens; `None` inside when auth is disabled.
#[derive(Clone)]
pub struct Auth(Option<Verifier>);

#[derive(Clone)]
struct Verifier {
    key: DecodingKey,
    validation: Validation,
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
        validation.leeway = 5;
        validation.validate_aud = false;
        Ok(Auth(Some(Verifier { key, validation })))
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
        let claims = jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation)
            .map_err(|e| {
                tracing::info!(reason = %e, "token refused");
                ApiError::Unauthorized("the token is invalid or expired".into())
            })?
            .claims;
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
    if path.starts_with("/v1/jobs") && (!read || path == "/v1/jobs") {
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

/// Mints a token for `role`, valid for `ttl`, signed with the configured
/// HS256 secret (`kvq-api token`).
pub fn mint(config: &Config, role: Role, ttl: Duration) -> Result<String, String> {
    let secret = config
        .auth_jwt_secret
        .as_ref()
        .ok_or("KVQ_AUTH_JWT_SECRET must be set to mint tokens")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    let claims = Claims {
        exp: (now + ttl).as_secs(),
        sub: Some(format!("kvq-{}", role.as_str())),
        roles: vec![role.as_str().to_owned()],
        realm_access: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// Parses `90s`, `15m`, `1h`, `7d` (or plain seconds).
pub fn parse_ttl(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3_600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_ttl("0"), None);
        assert_eq!(parse_ttl("1w"), None);
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
        assert_eq!(required_role(&Method::GET, "/v1/jobs"), Some(Role::Admin));
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
