//! The headers every write takes: `If-Match`, `Prefer` and
//! `Idempotency-Key` (parsed here or in [`crate::wait`] and
//! [`crate::writes::idempotency`]; documented here once each).

use actix_web::http::header::{self, HeaderMap};
use utoipa::IntoParams;

use crate::error::ApiError;

/// `If-Match` (for the document; handlers read headers themselves).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatchHeader {
    /// `"<version>"`: apply only if the key still has this version.
    #[param(
        rename = "If-Match",
        pattern = r#"^"[0-9]{1,19}"$"#,
        example = r#""3""#
    )]
    pub if_match: Option<String>,
}

/// `Prefer` (for the document).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct PreferHeader {
    /// `wait=N` (N ≤ 30 s): answer once the job is final.
    #[param(rename = "Prefer", example = "wait=5")]
    pub prefer: Option<String>,
}

/// `Idempotency-Key` (for the document).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// 1 to 255 visible ASCII characters, scoped to the caller, the method
    /// and the route: a repeat of the same request within 24 h answers the
    /// first request's answer again; a repeat with a different request is
    /// 422 `idempotency_key_reused`.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        pattern = "^[!-~]{1,255}$"
    )]
    pub idempotency_key: Option<String>,
}

/// Parses `If-Match: "<version>"`. `None` without the header.
pub(crate) fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(raw) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .map(str::trim)
        .and_then(|s| s.strip_prefix('"'))
        .and_then(|s| s.strip_suffix('"'))
        .and_then(|s| s.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "If-Match must be one version in quotes, as the ETag gives it, e.g. \"3\"".into(),
            )
        })
}
