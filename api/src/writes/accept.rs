//! Accepting a job into the queue: its place in its key's order, its
//! record and its stream entry.

use actix_web::HttpRequest;
use kvq_shared::jobs::{ApplyJob, now_ms};

use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::AppState;
use crate::writes::{Accepted, Write};

/// Gives the write its `seq` and queues it.
pub(crate) async fn queue_job(
    req: &HttpRequest,
    state: &AppState,
    write: Write,
) -> Result<Accepted, ApiError> {
    let job = ApplyJob {
        id: uuid::Uuid::now_v7().to_string(),
        op: write.op,
        key: write.key,
        seq: 0,
        value: write.value,
        ttl_seconds: write.ttl_seconds,
        if_match: write.if_match,
        request_id: RequestId::of(req),
        enqueued_at: now_ms(),
    };
    let job = queue_in_order(state, job, Queueing::New).await?;
    crate::metrics::write_accepted(job.op);
    tracing::info!(job_id = %job.id, op = %job.op, seq = job.seq, "job queued");
    Ok(Accepted::of(&job))
}

/// How a job enters the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queueing {
    /// A new write.
    New,
    /// A dead job, queued again under its own id.
    Again,
}

/// Gives `job` its key's next `seq`, then records and pushes it in one
/// atomic step. On failure nothing was queued, and the `seq` is marked
/// abandoned, so the key's later writes do not wait for it.
pub(crate) async fn queue_in_order(
    state: &AppState,
    mut job: ApplyJob,
    how: Queueing,
) -> Result<ApplyJob, ApiError> {
    job.seq = state
        .kv
        .next_seq(&job.key)
        .await
        .map_err(ApiError::BackendUnavailable)?;
    let pushed = match how {
        Queueing::New => state.queue.push(&job).await,
        Queueing::Again => state.queue.requeue(&job).await,
    };
    if let Err(e) = pushed {
        if let Err(mark) = state.kv.abandon_seq(&job.key, job.seq).await {
            tracing::warn!(seq = job.seq, error = %mark, "could not mark an unqueued seq; the key's next write waits for the gap timeout");
        }
        return Err(ApiError::BackendUnavailable(e));
    }
    Ok(job)
}
