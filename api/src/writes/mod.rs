//! The write pipeline every write route shares (`/v1/kv`, `/v1/batch`, the
//! legacy routes, dead-letter retry): accept a validated [`Write`] into the queue,
//! honour `Idempotency-Key`, and answer (`202`, or with `Prefer: wait` the
//! job's final outcome).
//!
//! # Layout
//! - this module: [`Write`], the 202 body [`Accepted`], and [`submit`] /
//!   [`enqueue`], the flow from a validated write to an answer;
//! - [`accept`]: queues a job, which gives it its place in its key's order;
//! - [`batch`]: queues many writes of one request (`POST /v1/batch`);
//! - [`idempotency`]: `Idempotency-Key` scopes and request fingerprints;
//! - [`outcome`]: the 202 answer, and `Prefer: wait`'s synchronous answers;
//! - [`headers`]: the headers every write takes (`If-Match`, `Prefer`,
//!   `Idempotency-Key`), parsed and documented.

use actix_web::{HttpRequest, HttpResponse};
use kvq_shared::jobs::{ApplyJob, Claim, Op};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::body::Reservation;
use crate::error::ApiError;
use crate::state::AppState;

pub mod accept;
pub mod batch;
pub mod headers;
pub mod idempotency;
pub mod outcome;

/// The 202 body of every write.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// The job id; poll `GET /v1/jobs/{job_id}`.
    pub job_id: String,
    /// Always `queued`.
    #[schema(example = "queued")]
    pub status: String,
    /// The operation.
    pub op: Op,
    /// The key.
    pub key: String,
    /// The write's place in its key's order: strictly increasing over the
    /// key's accepted writes, with gaps (not 1, 2, 3).
    pub seq: u64,
}

impl Accepted {
    /// The answer for `job`, just queued.
    pub fn of(job: &ApplyJob) -> Self {
        Self {
            job_id: job.id.clone(),
            status: "queued".into(),
            op: job.op,
            key: job.key.clone(),
            seq: job.seq,
        }
    }
}

/// A validated write, ready to be queued.
pub struct Write {
    /// The operation.
    pub op: Op,
    /// The key.
    pub key: String,
    /// The new value (not for delete).
    pub value: Option<Box<RawValue>>,
    /// Expiry, seconds.
    pub ttl_seconds: Option<u64>,
    /// `If-Match` version.
    pub if_match: Option<u64>,
}

/// Queues a write, honouring `Idempotency-Key` and `Prefer: wait`: 202 once
/// the job is in the queue Redis; 503 `backend_unavailable` if certainly
/// nothing was queued, `outcome_unknown` if kvq cannot tell. A repeat of an
/// `Idempotency-Key` answers the first 202 again (with
/// `Idempotent-Replayed: true`) and queues nothing; after a 5xx it queues
/// the write, exactly once.
///
/// `body`, the request body's reservation in the process's budget (see
/// [`crate::body`]), is held until the job is queued (or refused), not
/// while waiting for it.
pub(crate) async fn enqueue(
    req: &HttpRequest,
    state: &AppState,
    write: Write,
    body: Option<Reservation>,
) -> Result<HttpResponse, ApiError> {
    let submitted = submit(req, state, write).await;
    drop(body);
    let submitted = submitted?;
    if submitted.replayed {
        return Ok(outcome::accepted_response(&submitted.accepted, true));
    }
    let accepted = submitted.accepted;
    match crate::wait::preferred_wait(req.headers()) {
        Some(wait) if !wait.is_zero() => outcome::wait_for_final(state, &accepted, wait).await,
        _ => Ok(outcome::accepted_response(&accepted, false)),
    }
}

/// A write in the queue Redis.
pub(crate) struct Submitted {
    /// What the first request for it was told.
    pub accepted: Accepted,
    /// `true` when an `Idempotency-Key` repeat found an earlier job.
    pub replayed: bool,
}

/// Queues a write, or finds the job an earlier request with the same
/// `Idempotency-Key` (of the same caller, method and route, see
/// [`idempotency`]) queued; the part of [`enqueue`] every write route shares.
pub(crate) async fn submit(
    req: &HttpRequest,
    state: &AppState,
    write: Write,
) -> Result<Submitted, ApiError> {
    let scope = idempotency::token(req.headers())?.map(|token| idempotency::scope(req, token));
    let mut job_id = state.queue.new_job_id(&write.key);
    if let Some(scope) = &scope {
        let fingerprint = idempotency::fingerprint(&write);
        match state
            .records
            .claim_idempotency(scope, &fingerprint, &job_id, state.queue.wait())
            .await
            .map_err(ApiError::BackendUnavailable)?
        {
            Claim::New => {}
            // An earlier request chose a job id (it was answered, is still
            // running, or got a 5xx): queue that same id. The queue takes it
            // at most once and otherwise answers the job's first 202 (its
            // queued mark keeps op, key and seq for as long as the key).
            Claim::Claimed(first) => job_id = first,
            Claim::Reused => return Err(ApiError::IdempotencyKeyReused),
        }
    }
    let queued = accept::queue_job(req, state, write, job_id, scope.is_some()).await?;
    Ok(Submitted {
        accepted: queued.accepted,
        replayed: queued.earlier,
    })
}
