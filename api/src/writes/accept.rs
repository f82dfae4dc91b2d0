//! Accepting a job into the queue: its place in its key's order (its
//! `seq`), its record and its stream entry, and the truth about what happened when the
//! queue Redis did not answer in time.
//!
//! A job is queued by one script on the queue Redis, in the slot of its
//! key's partition, that gives it its `seq` and writes its record and its
//! stream entry together, and only if no job with its id exists: a job id is
//! queued at most once, however often a request for it is repeated. Each
//! try has an attempt id. When the script's answer does not come back in
//! time (the command may still run later), the API cancels that attempt:
//! either the job is there (answer 202), or the attempt is marked cancelled
//! so that it can never queue anything (answer 503 `backend_unavailable`:
//! certainly nothing was queued). If even that gets no answer before its
//! deadline, the answer is 503 `outcome_unknown`.

use std::time::Duration;

use actix_web::HttpRequest;
use kvq_shared::jobs::{ApplyJob, JobRecords, now_ms};
use kvq_shared::queue::{Accepted as Found, JobQueue, Queueing};
use kvq_shared::{StoreError, telemetry};
use tracing::Instrument;

use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::AppState;
use crate::writes::{Accepted, Write};

/// A write in the queue.
pub(crate) struct Queued {
    /// The job, as queued.
    pub accepted: Accepted,
    /// `true` when an earlier request had queued the job already.
    pub earlier: bool,
}

/// Queues the write as job `job_id` (which names the key's partition),
/// unless a job with that id is queued already. An `idempotent` job (one
/// with an `Idempotency-Key`) is remembered as queued for as long as its
/// key lives, even when its record expires sooner.
pub(crate) async fn queue_job(
    req: &HttpRequest,
    state: &AppState,
    write: Write,
    job_id: String,
    idempotent: bool,
) -> Result<Queued, ApiError> {
    let span = tracing::info_span!("enqueue", job_id = %job_id, op = %write.op);
    async move {
        let job = ApplyJob {
            id: job_id,
            op: write.op,
            key: write.key,
            seq: 0,
            generation: 0,
            redelivered: false,
            value: write.value,
            ttl_seconds: write.ttl_seconds,
            if_match: write.if_match,
            request_id: RequestId::of(req),
            enqueued_at: now_ms(),
            traceparent: telemetry::traceparent(),
        };
        let queued = queue(state, job, Queueing::New, idempotent).await?;
        if !queued.earlier {
            crate::metrics::write_accepted(queued.accepted.op);
        }
        Ok(queued)
    }
    .instrument(span)
    .await
}

/// Queues `job` (the accept script gives it its `seq`), telling the truth
/// when the queue Redis does not answer (see the module's doc).
async fn queue(
    state: &AppState,
    mut job: ApplyJob,
    how: Queueing,
    idempotent: bool,
) -> Result<Queued, ApiError> {
    let (attempt, accepted) = state.queue.accept(&job, how, idempotent).await;
    let found = match accepted {
        Ok(found) => found,
        // Queued on the master only: it applies unless the master fails
        // before a replica has it.
        Err(e @ StoreError::NotReplicated { .. }) => return Err(ApiError::OutcomeUnknown(e)),
        // The answer was lost with no attempt to settle (never but at
        // shutdown).
        Err(e) if e.may_have_run() && attempt.is_empty() => {
            return Err(ApiError::OutcomeUnknown(e));
        }
        Err(e) if e.may_have_run() => {
            tracing::warn!(job_id = %job.id, error = %e, "no answer to an accept; settling it");
            settle(state, &job.id, &attempt, how).await?
        }
        Err(e) => return Err(ApiError::BackendUnavailable(e)),
    };
    match found {
        Found::Queued(seq) => job.seq = seq,
        Found::Exists { op, key, seq } => {
            tracing::info!(job_id = %job.id, seq, "the job was queued by an earlier request");
            return Ok(Queued {
                accepted: Accepted {
                    job_id: job.id,
                    status: "queued".into(),
                    op,
                    key,
                    seq,
                },
                earlier: true,
            });
        }
        Found::Cancelled => {
            return Err(ApiError::BackendUnavailable(StoreError::Queue(
                "the queue Redis did not answer in time; nothing was queued".into(),
            )));
        }
    }
    tracing::info!(job_id = %job.id, op = %job.op, seq = job.seq, "job queued");
    Ok(Queued {
        accepted: Accepted::of(&job),
        earlier: false,
    })
}

/// How long the API keeps trying to learn what became of an accept that
/// got no answer, as a multiple of the Redis timeout.
const SETTLE_TIMEOUTS: u32 = 2;

/// Learns what became of an accept attempt whose answer did not arrive
/// (for a group of jobs, ask about any one of them: a group lands whole or
/// not at all): cancels it, retrying until the deadline. `Queued` or `Exists` means the
/// job is there; `Cancelled` means this attempt never queues anything. Past
/// the deadline the request gets `outcome_unknown`, and a task goes on
/// trying in the background, so that once the queue Redis answers again a
/// dead job being retried whose attempt never landed goes back among the
/// dead letters.
pub(crate) async fn settle(
    state: &AppState,
    job_id: &str,
    attempt: &str,
    how: Queueing,
) -> Result<Found, ApiError> {
    let deadline = tokio::time::Instant::now() + state.config.redis_timeout * SETTLE_TIMEOUTS;
    let mut delay = Duration::from_millis(50);
    loop {
        match state.queue.cancel(job_id, attempt, how).await {
            Ok(found) => return Ok(found),
            Err(e) if tokio::time::Instant::now() + delay >= deadline => {
                tracing::error!(job_id = %job_id, error = %e, "could not learn whether the job was queued; still trying");
                // Only ids: not the value, which could otherwise be held
                // for as long as the queue Redis stalls.
                tokio::spawn(settle_later(
                    state.queue.clone(),
                    state.records.clone(),
                    job_id.to_owned(),
                    attempt.to_owned(),
                    how,
                ));
                return Err(ApiError::OutcomeUnknown(e));
            }
            Err(e) => {
                tracing::warn!(job_id = %job_id, error = %e, "could not settle an accept yet")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// How long the background settling of an accept goes on: as long as a
/// cancelled attempt is remembered.
const SETTLE_LATER_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// [`settle`], in the background, after the request was answered
/// `outcome_unknown`: cancels the attempt once the queue Redis answers, so
/// that it can no longer land; a dead job being retried whose attempt
/// never landed goes back among the dead letters.
async fn settle_later(
    queue: JobQueue,
    records: JobRecords,
    job_id: String,
    attempt: String,
    how: Queueing,
) {
    let give_up = tokio::time::Instant::now() + SETTLE_LATER_FOR;
    let mut delay = Duration::from_millis(100);
    while tokio::time::Instant::now() < give_up {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        match queue.cancel(&job_id, &attempt, how).await {
            Ok(Found::Queued(_)) => {
                tracing::info!(job_id = %job_id, "an accept answered outcome_unknown had queued the job");
                return;
            }
            Ok(found) => {
                tracing::info!(job_id = %job_id, ?found, "an accept answered outcome_unknown never landed; it never will");
                if how == Queueing::Again
                    && let Err(e) = records.restore_dead(&job_id, now_ms()).await
                {
                    tracing::error!(job_id = %job_id, error = %e, "could not put a dead job back among the dead letters");
                }
                return;
            }
            Err(e) => {
                tracing::debug!(job_id = %job_id, error = %e, "could not settle an accept yet")
            }
        }
    }
}

/// Queues a dead job again under its own id (`POST /v1/jobs/{id}/retry`),
/// with a new `seq`, with the same truthful answers as a new write:
/// `backend_unavailable` means it was not queued (it may go back among the
/// dead letters), `outcome_unknown` that kvq cannot tell. The job's new run
/// joins the retry request's trace, if it has one.
pub(crate) async fn requeue(state: &AppState, mut job: ApplyJob) -> Result<ApplyJob, ApiError> {
    let span = tracing::info_span!("enqueue", job_id = %job.id, op = %job.op, retry = true);
    async move {
        if let Some(traceparent) = telemetry::traceparent() {
            job.traceparent = Some(traceparent);
        }
        let queued = queue(state, job.clone(), Queueing::Again, false).await?;
        Ok(ApplyJob {
            seq: queued.accepted.seq,
            ..job
        })
    }
    .instrument(span)
    .await
}
