//! `/v1/batch`: up to 1,000 writes in one request.
//!
//! Every write is checked as the single routes check theirs (key, value,
//! `ttl_seconds`, `if_match`), and one bad write refuses the whole batch
//! before anything is queued: the problem names it with a JSON Pointer
//! (`/writes/17/key`) in its `pointer` member and in its `detail`. The
//! flow from validated writes to an answer is [`crate::writes::batch`].

use actix_web::http::Method;
use actix_web::{HttpRequest, HttpResponse, web};
use kvq_shared::jobs::Op;
use serde::Deserialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;
use validator::Validate;

use crate::body::{BatchBody, JsonBody};
use crate::error::{ApiError, Problem};
use crate::routes::kv::{checked_value, validate_body, validate_key, whole_seconds, whole_version};
use crate::state::AppState;
use crate::writes::Write;
use crate::writes::batch::{BatchAccepted, BatchOutcome, MAX_BATCH_WRITES};
use crate::writes::headers::{IdempotencyKeyHeader, PreferHeader};

/// `POST /v1/batch` body as read: the writes borrowed as raw JSON, each
/// read on its own, so that an error names its write.
#[derive(Deserialize)]
#[serde(rename = "BatchRequest", deny_unknown_fields)]
struct ParsedBatch<'a> {
    #[serde(borrow)]
    writes: Vec<&'a RawValue>,
}

/// One write of a batch as read; the value borrowed from the body, as in
/// [`crate::routes::kv::CreateBody`].
#[derive(Deserialize, Validate)]
#[serde(rename = "BatchWrite", deny_unknown_fields)]
struct ParsedWrite<'a> {
    op: Op,
    key: String,
    /// `Some` whenever the member is there, `null` included (a value).
    #[serde(borrow, default, deserialize_with = "present")]
    value: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "whole_seconds")]
    #[validate(range(min = 1, max = 31_536_000))]
    ttl_seconds: Option<u64>,
    #[serde(default, deserialize_with = "whole_version")]
    if_match: Option<u64>,
}

/// Reads a member that is there (whatever its value, `null` included);
/// with `default`, an absent one is `None`.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// `POST /v1/batch` body: the writes, in order.
// For the document; the handler reads the body as `ParsedBatch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 1,000 writes. Each is queued as its own job, in its key's order
    /// (a key's writes in the batch's order); writes to different keys are
    /// not atomic together.
    #[schema(min_items = 1, max_items = 1000)]
    pub writes: Vec<BatchWrite>,
}

/// One write of a batch: `op` and `key`, a `value` for create, update and
/// upsert (none for delete), and as the single routes take them
/// `ttl_seconds` (not for delete) and `if_match` (not for create).
// For the document (the handler reads each write as `ParsedWrite`); the
// document closes each variant's properties (`openapi::ClosedBatchWrites`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
#[allow(dead_code)] // read by utoipa only
pub enum BatchWrite {
    /// As `POST /v1/kv`: the job fails `already_exists` if the key is live.
    Create {
        /// 1 to 512 bytes of UTF-8, no control characters.
        #[schema(
            min_length = 1,
            max_length = 512,
            pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$",
            example = "users/42/name"
        )]
        key: String,
        /// Any JSON, at most 1 MiB serialized.
        #[schema(value_type = serde_json::Value, example = json!({"first": "Ada"}))]
        value: serde_json::Value,
        /// Expiry in seconds; absent or `null`: no expiry.
        #[schema(minimum = 1, maximum = 31_536_000)]
        ttl_seconds: Option<u64>,
    },
    /// As `PUT /v1/kv/{key}`: the job fails `not_found` if the key is
    /// absent, `version_mismatch` if `if_match` does not match.
    Update {
        /// 1 to 512 bytes of UTF-8, no control characters.
        #[schema(
            min_length = 1,
            max_length = 512,
            pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$",
            example = "users/42/name"
        )]
        key: String,
        /// Any JSON, at most 1 MiB serialized.
        #[schema(value_type = serde_json::Value, example = json!("Ada L."))]
        value: serde_json::Value,
        /// Expiry in seconds; absent or `null` clears any expiry.
        #[schema(minimum = 1, maximum = 31_536_000)]
        ttl_seconds: Option<u64>,
        /// As `If-Match` (without quotes): apply only if the key still has
        /// this version.
        #[schema(example = 3)]
        if_match: Option<u64>,
    },
    /// As `PUT /v1/kv/{key}?upsert=true`: creates or updates.
    Upsert {
        /// 1 to 512 bytes of UTF-8, no control characters.
        #[schema(
            min_length = 1,
            max_length = 512,
            pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$",
            example = "users/42/name"
        )]
        key: String,
        /// Any JSON, at most 1 MiB serialized.
        #[schema(value_type = serde_json::Value, example = json!(1))]
        value: serde_json::Value,
        /// Expiry in seconds; absent or `null` clears any expiry.
        #[schema(minimum = 1, maximum = 31_536_000)]
        ttl_seconds: Option<u64>,
        /// As `If-Match` (without quotes): apply only if the key still has
        /// this version (a key that does not exist has none).
        #[schema(example = 3)]
        if_match: Option<u64>,
    },
    /// As `DELETE /v1/kv/{key}`: the job fails `not_found` if the key is
    /// absent, `version_mismatch` if `if_match` does not match. No value.
    Delete {
        /// 1 to 512 bytes of UTF-8, no control characters.
        #[schema(
            min_length = 1,
            max_length = 512,
            pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$",
            example = "users/42/name"
        )]
        key: String,
        /// As `If-Match` (without quotes): apply only if the key still has
        /// this version.
        #[schema(example = 3)]
        if_match: Option<u64>,
    },
}

/// Registers the route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::routes::resource(
        "/v1/batch",
        [(Method::POST, web::to(batch))],
    ));
}

/// `POST /v1/batch`: queue up to 1,000 writes.
///
/// Each write is its own job, as if sent alone: it takes its place in its
/// key's order (a key's writes in the batch's order) and applies exactly
/// once. Writes to different keys are not atomic together. One bad write
/// refuses the whole batch, and nothing is queued. With `Idempotency-Key`
/// a repeat answers the first 202 again (a repeat after a 503 queues what
/// is missing, exactly once); with `Prefer: wait=N` the answer waits until
/// every job is final.
#[utoipa::path(
    post,
    path = "/v1/batch",
    tag = "kv",
    request_body = BatchRequest,
    params(
        PreferHeader,
        IdempotencyKeyHeader,
    ),
    responses(
        (status = 202, description = "Every write queued: one job per write, in order", body = BatchAccepted, headers(
            ("Idempotent-Replayed" = String, description = "`true` on a repeat of an `Idempotency-Key`"),
        )),
        (status = 200, description = "`Prefer: wait`: every job is final (`succeeded`, `failed` or `dead`); each as `GET /v1/jobs/{id}` shows it", body = BatchOutcome, headers(
            ("Preference-Applied" = String, description = "`wait=N`"),
        )),
        (status = 400, description = "`invalid_key` or `malformed_json` (a write's key or value; `pointer` names it, e.g. `/writes/17/key`), `malformed_json` (the body), `invalid_request` (`Idempotency-Key`); nothing was queued", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`value_too_large`: a write's value (`pointer` names it), or the body over the batch body limit; nothing was queued", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_body`: not 1 to 1,000 writes, or a write of the wrong shape (missing `key` or `op`, a value missing for create / update / upsert or sent with a delete, `ttl_seconds` out of range or on a delete, `if_match` on a create, unknown fields; `pointer` names it); `idempotency_key_reused` (the key was used for a different request); nothing was queued", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`: nothing of the batch was queued; `outcome_unknown`: some or all of the batch may have been queued (retry with the same `Idempotency-Key` to complete it exactly once); `overloaded`: the API holds as many request bodies as `KVQ_MAX_BODY_BYTES_IN_FLIGHT` allows, nothing was queued", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn batch(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: BatchBody,
) -> Result<HttpResponse, ApiError> {
    let BatchBody(body) = body;
    let writes = writes(&body, &state)?;
    crate::writes::batch::enqueue(&req, &state, writes, body.into_reservation()).await
}

/// The batch's writes, each checked; the first bad one refuses the batch,
/// named by its JSON Pointer.
fn writes(body: &JsonBody, state: &AppState) -> Result<Vec<Write>, ApiError> {
    let parsed: ParsedBatch = body.parse()?;
    let count = parsed.writes.len();
    if !(1..=MAX_BATCH_WRITES).contains(&count) {
        return Err(ApiError::InBatch {
            pointer: "/writes".into(),
            error: Box::new(ApiError::InvalidBody(format!(
                "a batch holds 1 to {MAX_BATCH_WRITES} writes; this one has {count}"
            ))),
        });
    }
    parsed
        .writes
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            write(raw, state).map_err(|(member, error)| ApiError::InBatch {
                pointer: format!("/writes/{index}{member}"),
                error: Box::new(error),
            })
        })
        .collect()
}

/// One write, checked as its single route checks it; an error comes with
/// the member at fault (`/key`, or `""` for the write as a whole).
fn write(raw: &RawValue, state: &AppState) -> Result<Write, (&'static str, ApiError)> {
    let parsed: ParsedWrite = serde_json::from_str(raw.get()).map_err(|e| {
        let error = if e.is_data() {
            ApiError::InvalidBody(e.to_string())
        } else {
            ApiError::MalformedJson(e.to_string())
        };
        ("", error)
    })?;
    validate_key(&parsed.key, state.config.max_key_bytes).map_err(|e| ("/key", e))?;
    validate_body(&parsed).map_err(|e| ("/ttl_seconds", e))?;
    let refuse = |member, why: &str| Err((member, ApiError::InvalidBody(why.into())));
    let value = match (parsed.op, parsed.value) {
        (Op::Delete, Some(_)) => return refuse("/value", "a delete takes no value"),
        (Op::Delete, None) => None,
        (_, None) => return refuse("/value", "a create, update or upsert needs a value"),
        (_, Some(value)) => Some(checked_value(value, state).map_err(|e| ("/value", e))?),
    };
    if parsed.op == Op::Delete && parsed.ttl_seconds.is_some() {
        return refuse("/ttl_seconds", "a delete takes no ttl_seconds");
    }
    if parsed.op == Op::Create && parsed.if_match.is_some() {
        return refuse(
            "/if_match",
            "a create takes no if_match (it fails already_exists if the key is live)",
        );
    }
    Ok(Write {
        op: parsed.op,
        key: parsed.key,
        value,
        ttl_seconds: parsed.ttl_seconds,
        if_match: parsed.if_match,
    })
}
