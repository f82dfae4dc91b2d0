//! What a write answers: `202 Accepted`, or with `Prefer: wait` what a
//! synchronous API would say once the job is final.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, ResponseError};
use kvq_shared::jobs::{Change, ErrorCode, JobError, JobRecord, JobResult, JobStatus, Op, rfc3339};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::state::AppState;
use crate::writes::Accepted;

/// The 200 body of `GET /v1/jobs/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobBody {
    /// The job id.
    pub id: String,
    /// The operation.
    pub op: Op,
    /// The key.
    pub key: String,
    /// The write's place in its key's order: strictly increasing over the
    /// key's accepted writes, with gaps.
    pub seq: u64,
    /// `queued | running | succeeded | failed | dead`.
    pub status: JobStatus,
    /// How many times a worker started the job.
    pub attempts: u32,
    /// Once succeeded: `{outcome, version}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
    /// Once failed or dead: `{code, message}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub enqueued_at: String,
    /// RFC 3339, once started.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    /// RFC 3339, once final.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    /// The request that enqueued the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl From<JobRecord> for JobBody {
    fn from(r: JobRecord) -> Self {
        Self {
            id: r.id,
            op: r.op,
            key: r.key,
            seq: r.seq,
            status: r.status,
            attempts: r.attempts,
            result: r.result,
            error: r.error,
            enqueued_at: rfc3339(r.enqueued_at),
            started_at: r.started_at.map(rfc3339),
            finished_at: r.finished_at.map(rfc3339),
            request_id: r.request_id,
        }
    }
}

/// Answers like a synchronous API once the job is final (201 created, 200
/// updated, 204 deleted, 404 / 409 / 412 for failures, 503 if dead), or with
/// the plain 202 if `wait` runs out first.
pub(crate) async fn wait_for_final(
    state: &AppState,
    accepted: &Accepted,
    wait: Duration,
) -> Result<HttpResponse, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut notice = Some(state.waiters.register(&accepted.job_id));
    let outcome = loop {
        match state.records.get(&accepted.job_id).await {
            Ok(Some(record)) if record.status.is_final() => break Some(record),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not read a waited-for job"),
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break None;
        }
        // Woken by the worker's notice, or once a second should it be missed.
        let nap = left.min(Duration::from_secs(1));
        match notice.as_mut() {
            Some(rx) => {
                // Fired (or dropped): from now on, naps only.
                if tokio::time::timeout(nap, rx).await.is_ok() {
                    notice = None;
                }
            }
            None => tokio::time::sleep(nap).await,
        }
    };
    state.waiters.forget(&accepted.job_id);
    let Some(record) = outcome else {
        return Ok(accepted_response(accepted, false));
    };
    let applied = format!("wait={}", wait.as_secs());
    if let Some(error) = &record.error {
        let status = match error.code {
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::AlreadyExists => StatusCode::CONFLICT,
            ErrorCode::VersionMismatch => StatusCode::PRECONDITION_FAILED,
            ErrorCode::BackendUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        let failure = if status == StatusCode::SERVICE_UNAVAILABLE {
            // Not `backend_unavailable`, which means nothing was queued:
            // this write was, and died.
            ApiError::JobDead {
                job_id: record.id.clone(),
                message: error.message.clone(),
            }
        } else {
            ApiError::JobFailed {
                status,
                code: error.code,
                message: error.message.clone(),
            }
        };
        let mut response = failure.error_response();
        if let Ok(value) = header::HeaderValue::from_str(&applied) {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static("preference-applied"), value);
        }
        return Ok(response);
    }
    let change = record.result.as_ref().map(|r| r.outcome);
    let version = record.result.as_ref().map_or(0, |r| r.version);
    let mut response = match change {
        Some(Change::Created) => HttpResponse::Created(),
        Some(Change::Deleted) => HttpResponse::NoContent(),
        Some(Change::Updated) | None => HttpResponse::Ok(),
    };
    response
        .insert_header((header::ETAG, format!("\"{version}\"")))
        .insert_header(("preference-applied", applied))
        .insert_header((header::CONTENT_LOCATION, format!("/v1/jobs/{}", record.id)));
    match change {
        Some(Change::Created) => {
            let key = percent_encoding::utf8_percent_encode(&record.key, KEY_IN_PATH);
            response.insert_header((header::LOCATION, format!("/v1/kv/{key}")));
        }
        Some(Change::Deleted) => return Ok(response.finish()),
        Some(Change::Updated) | None => {}
    }
    Ok(response.json(JobBody::from(record)))
}

/// Characters escaped when a key is put back into a path (`/` stays).
const KEY_IN_PATH: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

pub(crate) fn accepted_response(accepted: &Accepted, replayed: bool) -> HttpResponse {
    let mut response = HttpResponse::Accepted();
    response.insert_header((header::LOCATION, format!("/v1/jobs/{}", accepted.job_id)));
    if replayed {
        response.insert_header(("idempotent-replayed", "true"));
    }
    response.json(accepted)
}
