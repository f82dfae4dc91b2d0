//! `/v1/jobs`: the status of queued writes.

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use kvq_shared::jobs::{JobError, JobRecord, JobResult, JobStatus, Op, rfc3339};
use kvq_shared::retry;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, Problem};
use crate::startup::AppState;

/// The 200 body of `GET /v1/jobs/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobBody {
    /// The job id.
    pub id: String,
    /// The operation.
    pub op: Op,
    /// The key.
    pub key: String,
    /// The key's sequence number for this write.
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

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::routes::resource(
        "/v1/jobs/{id}",
        [(Method::GET, web::to(get_job))],
    ));
}

/// `GET /v1/jobs/{id}`: a job's status.
///
/// Records are kept for `KVQ_JOB_RETENTION_SECONDS` after the job's last
/// change.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID) of a write's 202 answer")),
    responses(
        (status = 200, description = "The job", body = JobBody),
        (status = 404, description = "`not_found`: unknown, or finished longer ago than the retention period", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn get_job(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(ApiError::NotFound(format!("no job {id:?}")));
    }
    let record = retry::with_backoff(
        state.config.read_retry_max,
        state.read_attempt_timeout(),
        || state.records.get(&id),
    )
    .await
    .map_err(ApiError::BackendUnavailable)?
    .ok_or_else(|| {
        ApiError::NotFound(format!(
            "no job {id:?} (unknown, or finished longer ago than the retention period)"
        ))
    })?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-cache"))
        .json(JobBody::from(record)))
}
