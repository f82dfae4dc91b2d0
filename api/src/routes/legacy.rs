//! The routes of the original FastAPI + Huey service, so its clients keep
//! working unchanged against kvq. On by default; `KVQ_LEGACY_ROUTES=false`
//! turns them off (then they are 404 like any unknown path). They need the
//! same roles as `/v1`: `reader` for `/read`, `writer` for the writes.
//!
//! | route | answers |
//! |---|---|
//! | `POST /create/{key}?value=` | 200 `{"message":"Task submitted","task_id":"<job id>"}` once queued |
//! | `GET /read/{key}` | 200 `{"key","value"}`; 404 `{"detail":"Key not found"}` |
//! | `PUT /update/{key}?value=` | 200 `{"message":"Task submitted","task_id":"<job id>"}` once queued |
//! | `DELETE /delete/{key}` | 200 `{"message":"Task submitted","task_id":"<job id>"}` once queued |
//!
//! What was chosen where the old service left room:
//! - **Values are strings.** The old `value: str` query parameter is stored
//!   as a JSON string (`?value=42` stores `"42"`), so `/v1` reads it back as
//!   a string. `/read` always answers a string too: a JSON string value as
//!   itself, any other JSON value (written through `/v1`) as its compact
//!   JSON text.
//! - **Writes are queued as `/v1` writes are**, with the same outcomes:
//!   create fails `already_exists` on a live key, update and delete fail
//!   `not_found` on an absent one. The old service also queued blindly and
//!   answered before knowing the outcome (and silently dropped conflicts);
//!   kvq answers the same 200 once the job is in the queue Redis, and the
//!   outcome is at `GET /v1/jobs/{task_id}`. `If-Match` and
//!   `Idempotency-Key` work as on `/v1`; `Prefer: wait` is ignored (the old
//!   answer was always immediate).
//! - **A missing `value`** answers as FastAPI did: 422 with
//!   `{"detail":[{"type":"missing","loc":["query","value"],"msg":"Field required","input":null}]}`
//!   (pydantic 2's shape). `?value=` (empty) stores the empty string.
//! - **Keys** are the rest of the path, percent-decoded, as on `/v1` (so they
//!   may contain `/`), and checked against the same limits.
//! - **Other errors** are kvq's problem+json: 400 `invalid_key`, 413
//!   `value_too_large`, 401 / 403, 405, 503 `backend_unavailable` (where the
//!   old service answered a bare 500).

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use kvq_shared::jobs::Op;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, Problem};
use crate::routes::kv::{self, KeyPath};
use crate::state::AppState;
use crate::writes::headers::{IdempotencyKeyHeader, IfMatchHeader};
use crate::writes::{self, Write};

/// The path prefixes of the legacy routes, each followed by the key.
pub const PREFIXES: [&str; 4] = ["/create/", "/read/", "/update/", "/delete/"];

/// Whether `path` is one of the legacy routes.
pub fn is_legacy(path: &str) -> bool {
    PREFIXES.iter().any(|prefix| path.starts_with(prefix))
}

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use crate::routes::resource;
    cfg.service(resource(
        "/create/{key:.*}",
        [(Method::POST, web::to(create))],
    ))
    .service(resource("/read/{key:.*}", [(Method::GET, web::to(read))]))
    .service(resource(
        "/update/{key:.*}",
        [(Method::PUT, web::to(update))],
    ))
    .service(resource(
        "/delete/{key:.*}",
        [(Method::DELETE, web::to(delete))],
    ));
}

/// The query string of `/create` and `/update`; other parameters are
/// ignored, as FastAPI ignored them.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ValueQuery {
    /// The new value, stored as a JSON string (required: without it the
    /// answer is FastAPI's 422).
    #[param(required = true)]
    pub value: Option<String>,
}

/// The 200 body of every legacy write.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskSubmitted {
    /// Always `Task submitted`.
    pub message: &'static str,
    /// kvq's job id: `GET /v1/jobs/{task_id}`.
    pub task_id: String,
}

/// The 200 body of `/read`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadBody {
    /// The key.
    pub key: String,
    /// The value as a string.
    pub value: String,
}

/// FastAPI's 422 for a missing required query parameter `value`.
fn missing_value() -> HttpResponse {
    HttpResponse::build(StatusCode::UNPROCESSABLE_ENTITY).json(json!({
        "detail": [{
            "type": "missing",
            "loc": ["query", "value"],
            "msg": "Field required",
            "input": null,
        }]
    }))
}

/// Queues `op` on the key after `prefix` and answers as the old service did.
async fn submit(
    req: &HttpRequest,
    state: &AppState,
    prefix: &str,
    op: Op,
    value: Option<String>,
) -> Result<HttpResponse, ApiError> {
    let key = kv::key_after(req, prefix, state)?;
    let value = value
        .map(|v| {
            let raw = serde_json::value::to_raw_value(&v)
                .map_err(|e| ApiError::InvalidBody(format!("the value cannot be stored: {e}")))?;
            kv::checked_value(&raw, state)
        })
        .transpose()?;
    let if_match = match op {
        Op::Create => None,
        _ => writes::headers::if_match(req.headers())?,
    };
    let submitted = writes::submit(
        req,
        state,
        Write {
            op,
            key,
            value,
            ttl_seconds: None,
            if_match,
        },
    )
    .await?;
    let mut response = HttpResponse::Ok();
    if submitted.replayed {
        response.insert_header(("idempotent-replayed", "true"));
    }
    Ok(response.json(TaskSubmitted {
        message: "Task submitted",
        task_id: submitted.accepted.job_id,
    }))
}

/// `POST /create/{key}?value=`: queue a create.
#[utoipa::path(
    post,
    path = "/create/{key}",
    operation_id = "legacy_create",
    tag = "legacy",
    params(
        KeyPath,
        ValueQuery,
        IdempotencyKeyHeader,
    ),
    responses(
        (status = 200, description = "Queued; the outcome is at `GET /v1/jobs/{task_id}`", body = TaskSubmitted),
        (status = 400, description = "`invalid_key`, `invalid_request` (`If-Match`, `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`value_too_large`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No `value`: FastAPI's answer (JSON); `idempotency_key_reused` (problem JSON)", content(
            (Object = "application/json"),
            (Problem = "application/problem+json"),
        )),
    ),
)]
pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<ValueQuery>,
) -> Result<HttpResponse, ApiError> {
    let Some(value) = query.into_inner().value else {
        return Ok(missing_value());
    };
    submit(&req, &state, "/create/", Op::Create, Some(value)).await
}

/// `PUT /update/{key}?value=`: queue an update.
#[utoipa::path(
    put,
    path = "/update/{key}",
    operation_id = "legacy_update",
    tag = "legacy",
    params(
        KeyPath,
        ValueQuery,
        IfMatchHeader,
        IdempotencyKeyHeader,
    ),
    responses(
        (status = 200, description = "Queued; the outcome is at `GET /v1/jobs/{task_id}`", body = TaskSubmitted),
        (status = 400, description = "`invalid_key`, `invalid_request` (`If-Match`, `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`value_too_large`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No `value`: FastAPI's answer (JSON); `idempotency_key_reused` (problem JSON)", content(
            (Object = "application/json"),
            (Problem = "application/problem+json"),
        )),
    ),
)]
pub async fn update(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<ValueQuery>,
) -> Result<HttpResponse, ApiError> {
    let Some(value) = query.into_inner().value else {
        return Ok(missing_value());
    };
    submit(&req, &state, "/update/", Op::Update, Some(value)).await
}

/// `DELETE /delete/{key}`: queue a delete.
#[utoipa::path(
    delete,
    path = "/delete/{key}",
    operation_id = "legacy_delete",
    tag = "legacy",
    params(
        KeyPath,
        IfMatchHeader,
        IdempotencyKeyHeader,
    ),
    responses(
        (status = 200, description = "Queued; the outcome is at `GET /v1/jobs/{task_id}`", body = TaskSubmitted),
        (status = 400, description = "`invalid_key`, `invalid_request` (`If-Match`, `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency_key_reused` (the key was used for a different request)", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    submit(&req, &state, "/delete/", Op::Delete, None).await
}

/// `GET /read/{key}`: the value as a string, or FastAPI's 404.
#[utoipa::path(
    get,
    path = "/read/{key}",
    operation_id = "legacy_read",
    tag = "legacy",
    params(KeyPath),
    responses(
        (status = 200, description = "The value, as a string", body = ReadBody),
        (status = 400, description = "`invalid_key`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`{\"detail\": \"Key not found\"}`, as FastAPI answered", body = Object),
    ),
)]
pub async fn read(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let key = kv::key_after(&req, "/read/", &state)?;
    let Some(entry) = kv::load(&state, &key).await? else {
        return Ok(HttpResponse::NotFound().json(json!({"detail": "Key not found"})));
    };
    let text = entry.value.get();
    let value = serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned());
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-cache"))
        .json(ReadBody { key, value }))
}
