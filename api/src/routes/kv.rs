//! `/v1/kv`: create, update, delete (queued) and read (direct) of keys.
//!
//! A key in a path is the rest of the path after `/v1/kv/`, percent-decoded,
//! so it may contain `/` (`/v1/kv/users/42/name`) and any UTF-8 (`%C3%A9`).

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use kvq_shared::jobs::{Op, rfc3339};
use kvq_shared::retry;
use kvq_shared::store::Entry;
use serde::{Deserialize, Deserializer, Serialize, de};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};
use validator::Validate;

use crate::body::JsonBody;
use crate::error::{ApiError, Problem};
use crate::state::AppState;
use crate::writes::headers::{IdempotencyKeyHeader, IfMatchHeader, PreferHeader, if_match};
use crate::writes::outcome::JobBody;
use crate::writes::{Accepted, Write, enqueue};

/// The longest TTL: one year.
pub const MAX_TTL_SECONDS: u64 = 31_536_000;

/// The most keys one list page holds.
pub const MAX_LIST_LIMIT: usize = 1_000;

/// `POST /v1/kv` body. The value is borrowed from the body's bytes, as
/// sent; [`checked_value`] makes the text to store of it.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody<'a> {
    /// The key to create: 1 to 512 bytes of UTF-8, no control characters.
    #[schema(
        min_length = 1,
        max_length = 512,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$",
        example = "users/42/name"
    )]
    pub key: String,
    /// Any JSON, at most 1 MiB serialized.
    #[serde(borrow)]
    #[schema(value_type = serde_json::Value, example = json!({"first": "Ada"}))]
    pub value: &'a RawValue,
    /// Expiry in seconds; absent or `null`: no expiry.
    #[serde(default, deserialize_with = "whole_seconds")]
    #[validate(range(min = 1, max = 31_536_000))]
    #[schema(minimum = 1, maximum = 31_536_000)]
    pub ttl_seconds: Option<u64>,
}

/// `PUT /v1/kv/{key}` body, the value borrowed as in [`CreateBody`].
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody<'a> {
    /// Any JSON, at most 1 MiB serialized.
    #[serde(borrow)]
    #[schema(value_type = serde_json::Value, example = json!("Ada L."))]
    pub value: &'a RawValue,
    /// Expiry in seconds; absent or `null` clears any expiry.
    #[serde(default, deserialize_with = "whole_seconds")]
    #[validate(range(min = 1, max = 31_536_000))]
    #[schema(minimum = 1, maximum = 31_536_000)]
    pub ttl_seconds: Option<u64>,
}

/// Reads `ttl_seconds` as JSON Schema reads `integer`: any whole number,
/// which JSON may also write as `60.0` or `6e1`. Anything else (a fraction,
/// a negative number, a string) is a data error, answered 422.
pub(crate) fn whole_seconds<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    whole_number(deserializer, "a whole, non-negative number of seconds")
}

/// Reads a version (a batch write's `if_match`) as [`whole_seconds`] reads
/// seconds.
pub(crate) fn whole_version<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    whole_number(deserializer, "a whole, non-negative version")
}

/// Any whole, non-negative JSON number (`60`, `60.0`, `6e1`; saturating
/// at `u64::MAX`), or `null`; anything else is a data error naming
/// `expected`.
fn whole_number<'de, D: Deserializer<'de>>(
    deserializer: D,
    expected: &'static str,
) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    if let Some(secs) = number.as_u64() {
        return Ok(Some(secs));
    }
    match number.as_f64() {
        // Saturates at u64::MAX, far above any valid TTL.
        Some(secs) if secs >= 0.0 && secs.fract() == 0.0 => Ok(Some(secs as u64)),
        _ => Err(de::Error::invalid_value(
            de::Unexpected::Other(&number.to_string()),
            &expected,
        )),
    }
}

/// The key in `/v1/kv/{key}` (for the document: handlers read the raw path,
/// see [`path_key`]).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct KeyPath {
    /// The key: the rest of the path after `/v1/kv/`, percent-decoded, so it
    /// may contain `/` and any UTF-8; 1 to 512 bytes, no control characters.
    #[param(
        min_length = 1,
        max_length = 512,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$",
        example = "users/42/name"
    )]
    pub key: String,
}

/// `PUT /v1/kv/{key}` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UpdateQuery {
    /// `true`: create the key if it is absent.
    #[serde(default)]
    pub upsert: bool,
}

/// `GET /v1/kv` query.
#[derive(Debug, Deserialize, Validate, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only keys starting with this.
    #[serde(default)]
    pub prefix: String,
    /// Page size, 1 to 1,000 (default 100).
    #[validate(range(min = 1, max = 1_000))]
    #[param(minimum = 1, maximum = 1_000)]
    pub limit: Option<usize>,
    /// The previous page's `next_cursor`, as given (opaque: base64url of
    /// the page's last key; any base64url text is a position in the
    /// listing); absent or empty for the first page.
    #[param(
        max_length = 683,
        pattern = "^([A-Za-z0-9_-]{4})*([A-Za-z0-9_-]{2,3})?$"
    )]
    pub cursor: Option<String>,
}

/// The 200 body of a read.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyBody<'a> {
    /// The key.
    pub key: &'a str,
    /// The value, as written.
    #[schema(value_type = serde_json::Value)]
    pub value: &'a RawValue,
    /// Grows by one on every write to the key, deletes included.
    pub version: u64,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// RFC 3339, or `null` without a TTL.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
}

/// The 200 body of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListBody {
    /// Keys, sorted by their UTF-8 bytes, within the page and across pages:
    /// every key of a page sorts after every key of the pages before. At
    /// most `limit`; a page may hold fewer while `next_cursor` is not
    /// `null`, but it is empty only when the listing is complete.
    pub keys: Vec<String>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use crate::routes::resource;
    cfg.service(resource(
        "/v1/kv",
        [
            (Method::POST, web::to(create)),
            (Method::GET, web::to(list)),
        ],
    ))
    .service(resource(
        "/v1/kv/{key:.*}",
        [
            (Method::GET, web::to(read)),
            (Method::PUT, web::to(update)),
            (Method::DELETE, web::to(delete)),
        ],
    ));
}

/// Checks a key against the limits: 1 to `max_bytes` bytes, no control
/// characters.
pub fn validate_key(key: &str, max_bytes: usize) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::InvalidKey("the key is empty".into()));
    }
    if key.len() > max_bytes {
        return Err(ApiError::InvalidKey(format!(
            "the key is {} bytes long; the limit is {max_bytes}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(ApiError::InvalidKey(
            "the key contains a control character".into(),
        ));
    }
    Ok(())
}

/// The key in the request's path, percent-decoded and validated.
fn path_key(req: &HttpRequest, state: &AppState) -> Result<String, ApiError> {
    key_after(req, "/v1/kv/", state)
}

/// The rest of the request's path after `prefix`, percent-decoded and
/// validated as a key.
pub(crate) fn key_after(
    req: &HttpRequest,
    prefix: &str,
    state: &AppState,
) -> Result<String, ApiError> {
    let raw = req.path().strip_prefix(prefix).unwrap_or_default();
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    let key = String::from_utf8(bytes)
        .map_err(|_| ApiError::InvalidKey("the key is not valid UTF-8".into()))?;
    validate_key(&key, state.config.max_key_bytes)?;
    Ok(key)
}

/// Checks `validator` rules, describing each failed field.
fn validation(input: &impl Validate) -> Result<(), String> {
    input.validate().map_err(|errors| {
        let fields: Vec<String> = errors
            .field_errors()
            .keys()
            .map(|field| match field.as_ref() {
                "ttl_seconds" => format!("ttl_seconds must be 1 to {MAX_TTL_SECONDS}"),
                "limit" => format!("limit must be 1 to {MAX_LIST_LIMIT}"),
                other => format!("{other} is invalid"),
            })
            .collect();
        fields.join("; ")
    })
}

/// Checks a body's `validator` rules: 422 `invalid_body` naming each
/// failed field.
pub(crate) fn validate_body(body: &impl Validate) -> Result<(), ApiError> {
    validation(body).map_err(ApiError::InvalidBody)
}

/// The text to store for a value as sent: compact, checked against the
/// size limit (413) and against what a reader could not load back (400:
/// numbers beyond `f64`, nesting deeper than 128 levels); see
/// [`crate::value`].
pub(crate) fn checked_value(value: &RawValue, state: &AppState) -> Result<Box<RawValue>, ApiError> {
    crate::value::stored(value, state.config.max_value_bytes)
}

/// `POST /v1/kv`: queue a create.
///
/// The job fails `already_exists` if the key is live. With `Prefer: wait=N`
/// the answer waits for the job: 201, or 409 `already_exists`.
#[utoipa::path(
    post,
    path = "/v1/kv",
    tag = "kv",
    request_body = CreateBody,
    params(
        PreferHeader,
        IdempotencyKeyHeader,
    ),
    responses(
        (status = 202, description = "Queued", body = Accepted, headers(
            ("Location" = String, description = "`/v1/jobs/{job_id}`"),
            ("Idempotent-Replayed" = String, description = "`true` on a repeat of an `Idempotency-Key`"),
        )),
        (status = 201, description = "`Prefer: wait`: the key was created", body = JobBody, headers(
            ("ETag" = String, description = "The key's new version, quoted"),
            ("Location" = String, description = "`/v1/kv/{key}`"),
            ("Content-Location" = String, description = "`/v1/jobs/{job_id}`"),
            ("Preference-Applied" = String, description = "`wait=N`"),
        )),
        (status = 400, description = "`invalid_key`, `malformed_json`, `invalid_request` (`Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already_exists` (`Prefer: wait`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`value_too_large`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_body`, `idempotency_key_reused` (the key was used for a different request)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`: nothing was queued; `job_dead` (`Prefer: wait`): the job was queued and died, it is a dead letter; `outcome_unknown`: the queue did not answer in time, the write may have been queued (retry with the same `Idempotency-Key`); `overloaded`: the API holds as many request bodies as `KVQ_MAX_BODY_BYTES_IN_FLIGHT` allows, nothing was queued", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: JsonBody,
) -> Result<HttpResponse, ApiError> {
    let parsed: CreateBody = body.parse()?;
    validate_key(&parsed.key, state.config.max_key_bytes)?;
    validate_body(&parsed)?;
    let write = Write {
        op: Op::Create,
        value: Some(checked_value(parsed.value, &state)?),
        key: parsed.key,
        ttl_seconds: parsed.ttl_seconds,
        if_match: None,
    };
    enqueue(&req, &state, write, Some(body.into_reservation())).await
}

/// `PUT /v1/kv/{key}`: queue an update (or upsert).
///
/// The job fails `not_found` if the key is absent (unless `upsert=true`),
/// and `version_mismatch` if `If-Match` does not match. With
/// `Prefer: wait=N` the answer waits for the job: 200 or 201, or
/// 404 / 412.
#[utoipa::path(
    put,
    path = "/v1/kv/{key}",
    tag = "kv",
    request_body = UpdateBody,
    params(
        KeyPath,
        UpdateQuery,
        IfMatchHeader,
        PreferHeader,
        IdempotencyKeyHeader,
    ),
    responses(
        (status = 202, description = "Queued", body = Accepted, headers(
            ("Location" = String, description = "`/v1/jobs/{job_id}`"),
            ("Idempotent-Replayed" = String, description = "`true` on a repeat of an `Idempotency-Key`"),
        )),
        (status = 200, description = "`Prefer: wait`: the key was updated", body = JobBody, headers(
            ("ETag" = String, description = "The key's new version, quoted"),
            ("Content-Location" = String, description = "`/v1/jobs/{job_id}`"),
            ("Preference-Applied" = String, description = "`wait=N`"),
        )),
        (status = 201, description = "`Prefer: wait`: the key was created (`upsert=true`)", body = JobBody, headers(
            ("ETag" = String, description = "The key's new version, quoted"),
            ("Location" = String, description = "`/v1/kv/{key}`"),
            ("Content-Location" = String, description = "`/v1/jobs/{job_id}`"),
            ("Preference-Applied" = String, description = "`wait=N`"),
        )),
        (status = 400, description = "`invalid_key`, `malformed_json`, `invalid_request` (query, `If-Match`, `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found` (`Prefer: wait`)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`version_mismatch` (`Prefer: wait`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`value_too_large`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_body`, `idempotency_key_reused` (the key was used for a different request)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`: nothing was queued; `job_dead` (`Prefer: wait`): the job was queued and died, it is a dead letter; `outcome_unknown`: the queue did not answer in time, the write may have been queued (retry with the same `Idempotency-Key`); `overloaded`: the API holds as many request bodies as `KVQ_MAX_BODY_BYTES_IN_FLIGHT` allows, nothing was queued", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn update(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<UpdateQuery>,
    body: JsonBody,
) -> Result<HttpResponse, ApiError> {
    let key = path_key(&req, &state)?;
    let parsed: UpdateBody = body.parse()?;
    validate_body(&parsed)?;
    let write = Write {
        op: if query.upsert { Op::Upsert } else { Op::Update },
        key,
        value: Some(checked_value(parsed.value, &state)?),
        ttl_seconds: parsed.ttl_seconds,
        if_match: if_match(req.headers())?,
    };
    enqueue(&req, &state, write, Some(body.into_reservation())).await
}

/// `DELETE /v1/kv/{key}`: queue a delete.
///
/// The job fails `not_found` if the key is absent, and `version_mismatch`
/// if `If-Match` does not match. With `Prefer: wait=N` the answer waits for
/// the job: 204, or 404 / 412.
#[utoipa::path(
    delete,
    path = "/v1/kv/{key}",
    tag = "kv",
    params(
        KeyPath,
        IfMatchHeader,
        PreferHeader,
        IdempotencyKeyHeader,
    ),
    responses(
        (status = 202, description = "Queued", body = Accepted, headers(
            ("Location" = String, description = "`/v1/jobs/{job_id}`"),
            ("Idempotent-Replayed" = String, description = "`true` on a repeat of an `Idempotency-Key`"),
        )),
        (status = 204, description = "`Prefer: wait`: the key was deleted", headers(
            ("ETag" = String, description = "The version the delete took, quoted"),
            ("Content-Location" = String, description = "`/v1/jobs/{job_id}`"),
            ("Preference-Applied" = String, description = "`wait=N`"),
        )),
        (status = 400, description = "`invalid_key`, `invalid_request` (`If-Match`, `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found` (`Prefer: wait`)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`version_mismatch` (`Prefer: wait`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency_key_reused` (the key was used for a different request)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`: nothing was queued; `job_dead` (`Prefer: wait`): the job was queued and died, it is a dead letter; `outcome_unknown`: the queue did not answer in time, the write may have been queued (retry with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let key = path_key(&req, &state)?;
    let expected = if_match(req.headers())?;
    enqueue(
        &req,
        &state,
        Write {
            op: Op::Delete,
            key,
            value: None,
            ttl_seconds: None,
            if_match: expected,
        },
        None,
    )
    .await
}

/// Whether `If-None-Match` lists `version` (or is `*`).
fn none_match(headers: &HeaderMap, version: u64) -> bool {
    let etag = format!("\"{version}\"");
    headers
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag)
}

/// `GET /v1/kv/{key}`: read straight from the KV Redis, retrying transient
/// errors; 503 when the retries run out.
#[utoipa::path(
    get,
    path = "/v1/kv/{key}",
    tag = "kv",
    params(
        KeyPath,
        ("If-None-Match" = Option<String>, Header, description = "ETags (`\"3\"`, comma-separated, or `*`): 304 if the key's version is among them", example = "\"3\""),
    ),
    responses(
        (status = 200, description = "The key", body = KeyBody, headers(
            ("ETag" = String, description = "The key's version, quoted"),
        )),
        (status = 304, description = "`If-None-Match` lists the key's version", headers(
            ("ETag" = String, description = "The key's version, quoted"),
        )),
        (status = 400, description = "`invalid_key`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such key", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn read(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let key = path_key(&req, &state)?;
    let entry = load(&state, &key)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no key {key:?}")))?;
    let etag = format!("\"{}\"", entry.version);
    if none_match(req.headers(), entry.version) {
        return Ok(HttpResponse::build(StatusCode::NOT_MODIFIED)
            .insert_header((header::ETAG, etag))
            .finish());
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .json(KeyBody {
            key: &key,
            value: &entry.value,
            version: entry.version,
            updated_at: rfc3339(entry.updated_at),
            expires_at: entry.expires_at.map(rfc3339),
        }))
}

/// Reads `key` from the KV Redis, retrying transient errors; 503 when the
/// retries run out.
pub(crate) async fn load(state: &AppState, key: &str) -> Result<Option<Entry>, ApiError> {
    retry::with_backoff(
        state.config.read_retry_max,
        state.read_attempt_timeout(),
        || state.kv.get(key),
    )
    .await
    .map_err(ApiError::BackendUnavailable)
}

/// `GET /v1/kv?prefix=&limit=&cursor=`: live keys by prefix, paginated.
///
/// Keys come sorted by their UTF-8 bytes, across pages too; a page costs
/// the data Redis the same small work whatever the keyspace holds. A page
/// holds at most `limit` keys, sometimes fewer, and is empty only at the
/// end; `next_cursor` is `null` on the last page. A key that exists from
/// the first page to the last is listed exactly once; expired keys never are.
#[utoipa::path(
    get,
    path = "/v1/kv",
    tag = "kv",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of keys", body = ListBody),
        (status = 400, description = "`invalid_request`: bad `limit` or `cursor`, unknown parameter", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn list(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    validation(&query).map_err(ApiError::InvalidRequest)?;
    let after = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(cursor) => Some(
            cursor_position(cursor, state.config.max_key_bytes)
                .ok_or_else(|| ApiError::InvalidRequest("cursor is not base64url text".into()))?,
        ),
    };
    let limit = query.limit.unwrap_or(100);
    if query.prefix.len() > state.config.max_key_bytes {
        // No key is that long: nothing to list, and nothing to ask Redis.
        return Ok(HttpResponse::Ok().json(ListBody {
            keys: Vec::new(),
            next_cursor: None,
        }));
    }
    let (keys, next) = retry::with_backoff(
        state.config.read_retry_max,
        state.read_attempt_timeout(),
        || state.kv.list(&query.prefix, limit, after.as_deref()),
    )
    .await
    .map_err(ApiError::BackendUnavailable)?;
    Ok(HttpResponse::Ok().json(ListBody {
        keys,
        next_cursor: next.map(|key| URL_SAFE_NO_PAD.encode(key)),
    }))
}

/// Decodes cursors as the API writes them (base64url, no padding), and
/// any other base64url text too: unused trailing bits are allowed.
const CURSOR: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// The position a list cursor stands for: the page starts after it. The
/// API's cursors are base64url of the last key listed; any other base64url
/// text is a position too (its bytes read as UTF-8, lossily), so that no
/// cursor the document allows is refused.
///
/// A cursor is at most as long as base64url of the longest key
/// (`KVQ_MAX_KEY_BYTES`; 683 characters for 512 bytes, the `max_length`
/// of [`ListQuery::cursor`] in the document).
fn cursor_position(cursor: &str, max_key_bytes: usize) -> Option<String> {
    if cursor.len() > (4 * max_key_bytes).div_ceil(3) {
        return None;
    }
    let bytes = CURSOR.decode(cursor).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("users/42/name", 512).is_ok());
        assert!(validate_key("é", 2).is_ok());
        assert!(validate_key("é", 1).is_err());
        assert!(validate_key("", 512).is_err());
        assert!(validate_key("a\u{0}b", 512).is_err());
        assert!(validate_key("a\nb", 512).is_err());
        assert!(validate_key("a\u{9f}b", 512).is_err());
    }

    #[test]
    fn cursors_are_base64url_positions() {
        let cursor = URL_SAFE_NO_PAD.encode("a/é?");
        assert_eq!(cursor_position(&cursor, 512).as_deref(), Some("a/é?"));
        assert!(
            cursor_position("zzz", 512).is_some(),
            "any base64url is a position"
        );
        assert!(cursor_position(&"0".repeat(683), 512).is_some());
        assert_eq!(
            cursor_position(&"0".repeat(684), 512),
            None,
            "longer than any key's"
        );
        assert_eq!(cursor_position("YQ==", 512), None, "padding is not ours");
        assert_eq!(
            cursor_position("a", 512),
            None,
            "no base64 is one character long"
        );
        assert_eq!(cursor_position("a%2Fb", 512), None);
    }

    #[test]
    fn if_none_match_lists() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            "\"2\", W/\"3\"".parse().expect("header"),
        );
        assert!(none_match(&headers, 3));
        assert!(!none_match(&headers, 4));
    }
}
