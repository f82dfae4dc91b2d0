//! `/v1/jobs`: the status of queued writes, and the dead letters (jobs whose
//! retries ran out) with their retry.

use actix_web::http::Method;
use actix_web::{HttpRequest, HttpResponse, web};
use kvq_shared::jobs::{ApplyJob, Final, Outcome, now_ms};
use kvq_shared::retry;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use validator::Validate;

use crate::error::{ApiError, Problem};
use crate::request_id::RequestId;
use crate::routes::kv::MAX_LIST_LIMIT;
use crate::state::AppState;
use crate::writes::Accepted;
use crate::writes::accept::requeue;
use crate::writes::outcome::{JobBody, accepted_response};

/// Dead letters per page unless `limit` says otherwise.
const DEFAULT_DEAD_LIMIT: usize = 100;

/// The 200 body of `GET /v1/jobs?status=dead`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// Dead jobs, oldest first.
    pub jobs: Vec<JobBody>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /v1/jobs` query.
#[derive(Debug, Deserialize, Validate, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Which jobs: only `dead` is listed (required).
    #[param(required = true, pattern = "^dead$")]
    pub status: Option<String>,
    /// Page size, 1 to 1,000 (default 100).
    #[validate(range(min = 1, max = 1_000))]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// The previous page's `next_cursor`.
    #[param(pattern = "^[0-9]{0,19}$")]
    pub cursor: Option<String>,
}

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::routes::resource(
        "/v1/jobs",
        [(Method::GET, web::to(list_jobs))],
    ))
    .service(crate::routes::resource(
        "/v1/jobs/{id}",
        [(Method::GET, web::to(get_job))],
    ))
    .service(crate::routes::resource(
        "/v1/jobs/{id}/retry",
        [(Method::POST, web::to(retry_job))],
    ));
}

/// `GET /v1/jobs?status=dead&limit=&cursor=`: the dead letters, oldest
/// first. Job records expire after the retention period, and so do dead
/// letters.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of dead jobs, oldest first", body = JobList),
        (status = 400, description = "`invalid_request`: no `status=dead`, or a bad `limit` or `cursor`", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn list_jobs(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    if query.status.as_deref() != Some("dead") {
        return Err(ApiError::InvalidRequest(
            "only dead jobs are listed: add ?status=dead".into(),
        ));
    }
    query
        .validate()
        .map_err(|_| ApiError::InvalidRequest(format!("limit must be 1 to {MAX_LIST_LIMIT}")))?;
    let offset = match query.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| ApiError::InvalidRequest("bad cursor".into()))?,
    };
    let limit = query.limit.unwrap_or(DEFAULT_DEAD_LIMIT);
    let (records, next) = retry::with_backoff(
        state.config.read_retry_max,
        state.read_attempt_timeout(),
        || state.records.dead(offset, limit),
    )
    .await
    .map_err(ApiError::BackendUnavailable)?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-cache"))
        .json(JobList {
            jobs: records.into_iter().map(JobBody::from).collect(),
            next_cursor: next.map(|n| n.to_string()),
        }))
}

/// `POST /v1/jobs/{id}/retry`: queues a dead job again, under its own id.
/// It takes a new `seq`, so it applies after the key's writes accepted
/// before the retry (its own `seq` was given up when it died); its
/// `If-Match`, if any, still applies.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/retry",
    tag = "jobs",
    params(("id" = String, Path, description = "The id of a dead job")),
    responses(
        (status = 202, description = "Queued again under the same id", body = Accepted, headers(
            ("Location" = String, description = "`/v1/jobs/{id}`"),
        )),
        (status = 404, description = "`not_found`: unknown job, or its record expired", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`job_not_dead`: the job is not dead (or another request is retrying it)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`; the job stays dead", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn retry_job(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    if kvq_shared::keys::job_partition(&id).is_none() {
        return Err(ApiError::NotFound(format!("no job {id:?}")));
    }
    let attempt = uuid::Uuid::new_v4().to_string();
    let taken = match state.records.take_dead(&id, &attempt).await {
        Ok(taken) => taken,
        Err(e) => {
            if e.may_have_run() {
                // The take may still run: settle it, so the job stays a
                // dead letter whatever happened (nothing was queued).
                untake(&state, &id, &attempt).await;
            }
            return Err(ApiError::BackendUnavailable(e));
        }
    };
    let Some((mut job, died_at)) = taken else {
        let record = state
            .records
            .get(&id)
            .await
            .map_err(ApiError::BackendUnavailable)?;
        return Err(match record {
            None => ApiError::NotFound(format!("no job {id:?}")),
            Some(r) => ApiError::NotDead(format!(
                "job {id} is {}, or another request is retrying it: only a job whose retries ran out can be retried",
                r.status.as_str()
            )),
        });
    };
    // A write can land while its answer is lost, and Redis then refuse
    // every retry: the job died, applied. Its remembered outcome says so.
    // (Queued again, it would find that outcome too and change nothing.)
    let applied = match state.kv.outcome_of(&job.key, &job.id).await {
        Ok(applied) => applied,
        Err(e) => {
            restore(&state, &id, died_at).await;
            return Err(ApiError::BackendUnavailable(e));
        }
    };
    if let Some(outcome) = applied {
        correct_record(&state, &job, outcome).await?;
        return Err(ApiError::NotDead(format!(
            "job {id} had been applied before its retries ran out; its record now says so"
        )));
    }
    job.request_id = RequestId::of(&req);
    job.enqueued_at = now_ms();
    let job = match requeue(&state, job).await {
        Ok(job) => job,
        // It may be queued: it must not be retried twice. If it was not,
        // the API puts it back once the queue Redis answers again.
        Err(e @ ApiError::OutcomeUnknown(_)) => return Err(e),
        Err(e) => {
            restore(&state, &id, died_at).await;
            return Err(e);
        }
    };
    crate::metrics::dead_job_retried();
    tracing::info!(job_id = %job.id, op = %job.op, seq = job.seq, "dead job queued again");
    Ok(accepted_response(&Accepted::of(&job), false))
}

/// Settles a take of dead letter `id` that got no answer, so that it stays a
/// dead letter: tries for up to two Redis timeouts, then goes on in the
/// background until the queue Redis answers.
async fn untake(state: &AppState, id: &str, attempt: &str) {
    let deadline = tokio::time::Instant::now() + state.config.redis_timeout * 2;
    let mut delay = std::time::Duration::from_millis(50);
    loop {
        match state.records.untake_dead(id, attempt).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() + delay >= deadline => {
                tracing::warn!(job_id = id, error = %e, "could not settle a dead-letter take yet; still trying");
                let (records, id, attempt) =
                    (state.records.clone(), id.to_owned(), attempt.to_owned());
                tokio::spawn(async move {
                    // As long as a cancel mark is kept.
                    let give_up =
                        tokio::time::Instant::now() + std::time::Duration::from_secs(24 * 60 * 60);
                    let mut delay = std::time::Duration::from_millis(100);
                    while tokio::time::Instant::now() < give_up {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_secs(5));
                        if records.untake_dead(&id, &attempt).await.is_ok() {
                            return;
                        }
                    }
                });
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(1));
    }
}

/// Records the outcome a dead job turned out to have had.
async fn correct_record(
    state: &AppState,
    job: &ApplyJob,
    outcome: Outcome,
) -> Result<(), ApiError> {
    let record = state
        .records
        .get(&job.id)
        .await
        .map_err(ApiError::BackendUnavailable)?;
    let (attempts, started_at) = record
        .map(|r| (r.attempts, r.started_at.unwrap_or(r.enqueued_at)))
        .unwrap_or((0, job.enqueued_at));
    let now = now_ms();
    state
        .records
        .finish(job, &Final::from(outcome), attempts, started_at, now)
        .await
        .map_err(ApiError::BackendUnavailable)
}

/// Puts a job whose retry could not be queued back among the dead letters.
async fn restore(state: &AppState, id: &str, died_at: i64) {
    if let Err(e) = state.records.restore_dead(id, died_at).await {
        tracing::error!(job_id = id, error = %e, "could not put a job back among the dead letters");
    }
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
    ),
)]
pub async fn get_job(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    if kvq_shared::keys::job_partition(&id).is_none() {
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
