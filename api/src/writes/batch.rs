//! Batches (`POST /v1/batch`): up to [`MAX_BATCH_WRITES`] validated writes
//! in one request, each queued as a single write would be: its own job,
//! its place in its key's order, applied exactly once.
//!
//! - Order: the writes are grouped by queue partition, keeping their order.
//!   Each partition's writes are queued in chunks of up to
//!   [`MAX_GROUP_JOBS`], one accept script call per chunk (all or
//!   nothing), one chunk after the other; partitions go concurrently. So a
//!   key's writes get increasing `seq`s in the batch's order. Writes to
//!   different keys are not atomic together: one partition's chunk may be
//!   queued while another's is not.
//! - Truth: a chunk whose answer is lost is settled as a single write's
//!   accept is ([`accept::settle`], asked about the chunk's first job: a
//!   chunk lands whole or not at all). A partition stops at its first chunk
//!   that is not certainly queued, so that a retry queues the rest after
//!   it, in order. The batch answers 202 once every job is queued; 503
//!   `backend_unavailable` only when certainly nothing of it was queued;
//!   else 503 `outcome_unknown`.
//! - `Idempotency-Key`: the claim keeps one base job id, from which every
//!   write's job id is derived ([`keys::batch_job_id`]). A repeat queues
//!   the same ids, which the queue takes at most once: a repeat after a 503
//!   completes the batch exactly once, and a repeat of a queued batch
//!   answers its first 202 again, with `Idempotent-Replayed: true`.
//! - `Prefer: wait=N`: the request waits until every job is final (woken
//!   by the workers' notices; one pipelined read of the unfinished records
//!   per wake-up, and at least once a second) and answers 200 with every
//!   job's record, or the plain 202 if N runs out first.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kvq_shared::jobs::{ApplyJob, Claim, JobRecord, now_ms};
use kvq_shared::keys;
use kvq_shared::queue::{Accepted as Found, MAX_GROUP_JOBS, Prepared, Queueing};
use kvq_shared::{StoreError, telemetry};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use utoipa::ToSchema;

use crate::body::Reservation;
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::AppState;
use crate::writes::outcome::JobBody;
use crate::writes::{Accepted, Write, accept, idempotency};

/// The most writes one batch may hold.
pub const MAX_BATCH_WRITES: usize = 1_000;

/// The 202 body of a batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchAccepted {
    /// One job per write, in the batch's order.
    pub jobs: Vec<Accepted>,
}

/// The 200 body of a batch waited for with `Prefer: wait`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchOutcome {
    /// Every write's job, final, in the batch's order, as
    /// `GET /v1/jobs/{id}` shows it.
    pub jobs: Vec<JobBody>,
}

/// Queues a batch of validated writes, honouring `Idempotency-Key` and
/// `Prefer: wait` (see the module's doc). `body`, the request body's
/// reservation in the process's budget, is held until the jobs are queued
/// (or refused), not while waiting for them.
pub(crate) async fn enqueue(
    req: &HttpRequest,
    state: &AppState,
    writes: Vec<Write>,
    body: Reservation,
) -> Result<HttpResponse, ApiError> {
    let submitted = submit(req, state, writes).await;
    drop(body);
    let (jobs, replayed) = submitted?;
    if replayed {
        return Ok(accepted_response(jobs, true));
    }
    match crate::wait::preferred_wait(req.headers()) {
        Some(wait) if !wait.is_zero() => Ok(wait_for_all(state, jobs, wait).await),
        _ => Ok(accepted_response(jobs, false)),
    }
}

/// Queues the batch, or finds the jobs an earlier request with the same
/// `Idempotency-Key` queued; answers every write's job, in order, and
/// whether all of them were queued before (a replay).
async fn submit(
    req: &HttpRequest,
    state: &AppState,
    writes: Vec<Write>,
) -> Result<(Vec<Accepted>, bool), ApiError> {
    let scope = idempotency::token(req.headers())?.map(|token| idempotency::scope(req, token));
    let first_key = writes.first().map_or("", |write| write.key.as_str());
    let mut base = state.queue.new_job_id(first_key);
    if let Some(scope) = &scope {
        let fingerprint = idempotency::batch_fingerprint(&writes);
        match state
            .records
            .claim_idempotency(scope, &fingerprint, &base, state.queue.wait())
            .await
            .map_err(ApiError::BackendUnavailable)?
        {
            Claim::New => {}
            // An earlier request chose the base: derive the same job ids,
            // which the queue takes at most once.
            Claim::Claimed(first) => base = first,
            Claim::Reused => return Err(ApiError::IdempotencyKeyReused),
        }
    }
    let span = tracing::info_span!("enqueue", jobs = writes.len());
    let landed = async {
        let jobs = prepare(req, state, &base, writes, scope.is_some())?;
        queue_all(state, &jobs).await
    }
    .instrument(span)
    .await?;
    let replayed = landed.iter().all(|job| job.earlier);
    let queued = landed.iter().filter(|job| !job.earlier).count();
    tracing::info!(jobs = landed.len(), queued, replayed, "batch queued");
    Ok((
        landed.into_iter().map(|job| job.accepted).collect(),
        replayed,
    ))
}

/// Every write as a job ready for the accept script, its id derived from
/// `base`; each write's value is dropped once its job's JSON is made.
fn prepare(
    req: &HttpRequest,
    state: &AppState,
    base: &str,
    writes: Vec<Write>,
    idempotent: bool,
) -> Result<Vec<Prepared>, ApiError> {
    let request_id = RequestId::of(req);
    let enqueued_at = now_ms();
    // One trace for the whole batch: every job joins the enqueue span.
    let traceparent = telemetry::traceparent();
    writes
        .into_iter()
        .enumerate()
        .map(|(index, write)| {
            let partition = keys::partition(&write.key, state.config.queue_partitions);
            let id = u16::try_from(index)
                .ok()
                .and_then(|index| keys::batch_job_id(base, index, partition))
                .ok_or_else(|| {
                    ApiError::BackendUnavailable(StoreError::Corrupt(format!(
                        "{base:?} is no base for a batch's job ids"
                    )))
                })?;
            let job = ApplyJob {
                id,
                op: write.op,
                key: write.key,
                seq: 0,
                generation: 0,
                redelivered: false,
                value: write.value,
                ttl_seconds: write.ttl_seconds,
                if_match: write.if_match,
                request_id: request_id.clone(),
                enqueued_at,
                traceparent: traceparent.clone(),
            };
            state
                .queue
                .prepare(&job, Queueing::New, idempotent)
                .map_err(ApiError::BackendUnavailable)
        })
        .collect()
}

/// A job of the batch in the queue.
struct Landed {
    /// What the client is told of it.
    accepted: Accepted,
    /// Whether an earlier request queued it.
    earlier: bool,
}

/// What became of one chunk of a partition's jobs.
enum Chunk {
    /// Every job of the chunk is queued.
    Queued(Vec<Landed>),
    /// Certainly none of the chunk's jobs is queued.
    Refused(StoreError),
    /// The chunk may or may not be queued.
    Unknown(StoreError),
}

/// Queues every job, partitions concurrently, and answers them all in
/// order; or the batch's 503 when some chunk is not certainly queued:
/// `backend_unavailable` if certainly nothing is, else `outcome_unknown`.
async fn queue_all(state: &AppState, jobs: &[Prepared]) -> Result<Vec<Landed>, ApiError> {
    let mut lanes: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (index, job) in jobs.iter().enumerate() {
        lanes.entry(job.partition()).or_default().push(index);
    }
    let runs = lanes.iter().map(|(&p, indexes)| async move {
        let lane: Vec<&Prepared> = indexes.iter().map(|&i| &jobs[i]).collect();
        queue_partition(state, p, &lane).await
    });
    let outcomes = futures::future::join_all(runs).await;

    let mut landed: Vec<Option<Landed>> = jobs.iter().map(|_| None).collect();
    let (mut refused, mut unknown, mut queued_any) = (None, None, false);
    for (indexes, chunks) in lanes.values().zip(outcomes) {
        for (indexes, chunk) in indexes.chunks(MAX_GROUP_JOBS).zip(chunks) {
            match chunk {
                Chunk::Queued(jobs) => {
                    queued_any = true;
                    for (&i, job) in indexes.iter().zip(jobs) {
                        if !job.earlier {
                            crate::metrics::write_accepted(job.accepted.op);
                        }
                        landed[i] = Some(job);
                    }
                }
                Chunk::Refused(e) => {
                    refused.get_or_insert(e);
                }
                Chunk::Unknown(e) => {
                    unknown.get_or_insert(e);
                }
            }
        }
    }
    match (unknown, refused) {
        (Some(e), _) => Err(ApiError::OutcomeUnknown(e)),
        // Some of the batch is queued, some is not: a retry with the same
        // Idempotency-Key queues the rest.
        (None, Some(e)) if queued_any => Err(ApiError::OutcomeUnknown(e)),
        (None, Some(e)) => Err(ApiError::BackendUnavailable(e)),
        (None, None) => landed
            .into_iter()
            .collect::<Option<Vec<Landed>>>()
            .ok_or_else(|| {
                ApiError::OutcomeUnknown(StoreError::Corrupt("a batch's job got no answer".into()))
            }),
    }
}

/// Queues one partition's jobs, in order, chunk after chunk, stopping at
/// the first chunk that is not certainly queued (its later jobs must not
/// pass it); answers the chunks tried.
async fn queue_partition(state: &AppState, p: u16, jobs: &[&Prepared]) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for chunk in jobs.chunks(MAX_GROUP_JOBS) {
        let outcome = queue_chunk(state, p, chunk).await;
        let go_on = matches!(outcome, Chunk::Queued(_));
        chunks.push(outcome);
        if !go_on {
            break;
        }
    }
    chunks
}

/// Queues one chunk with one accept script call under a new attempt,
/// settling it when the answer is lost.
async fn queue_chunk(state: &AppState, p: u16, jobs: &[&Prepared]) -> Chunk {
    let attempt = uuid::Uuid::new_v4().to_string();
    match state.queue.accept_group(p, &attempt, jobs).await {
        Ok(found) if found.len() == jobs.len() => match landed(jobs, found) {
            Some(landed) => Chunk::Queued(landed),
            None => Chunk::Refused(StoreError::Queue(
                "the accept attempt was cancelled; nothing was queued".into(),
            )),
        },
        Ok(found) => {
            tracing::warn!(
                jobs = jobs.len(),
                answers = found.len(),
                "a batch's accept answered the wrong number of jobs; settling it"
            );
            settle_chunk(state, jobs, &attempt).await
        }
        // Queued on the master only: it applies unless the master fails
        // before a replica has it.
        Err(e @ StoreError::NotReplicated { .. }) => Chunk::Unknown(e),
        Err(e) if e.may_have_run() => settle_chunk(state, jobs, &attempt).await,
        Err(e) => Chunk::Refused(e),
    }
}

/// The chunk's jobs with what the accept script found for each; `None` if
/// the attempt was cancelled (then it queued nothing).
fn landed(jobs: &[&Prepared], found: Vec<Found>) -> Option<Vec<Landed>> {
    jobs.iter()
        .zip(found)
        .map(|(job, found)| match found {
            Found::Queued(seq) => Some(Landed {
                accepted: Accepted {
                    job_id: job.id().to_owned(),
                    status: "queued".into(),
                    op: job.op(),
                    key: job.key().to_owned(),
                    seq,
                },
                earlier: false,
            }),
            Found::Exists { op, key, seq } => Some(Landed {
                accepted: Accepted {
                    job_id: job.id().to_owned(),
                    status: "queued".into(),
                    op,
                    key,
                    seq,
                },
                earlier: true,
            }),
            Found::Cancelled => None,
        })
        .collect()
}

/// Learns what became of a chunk whose accept got no answer: settles the
/// attempt through the chunk's first job (the chunk landed whole or not at
/// all); if it landed, reads every job's `seq` from its record.
async fn settle_chunk(state: &AppState, jobs: &[&Prepared], attempt: &str) -> Chunk {
    let Some(first) = jobs.first() else {
        return Chunk::Queued(Vec::new());
    };
    tracing::warn!(
        job_id = first.id(),
        jobs = jobs.len(),
        "no answer to a batch's accept; settling it"
    );
    let earlier = match accept::settle(state, first.id(), attempt, Queueing::New).await {
        Ok(Found::Cancelled) => {
            return Chunk::Refused(StoreError::Queue(
                "the queue Redis did not answer in time; nothing was queued".into(),
            ));
        }
        Ok(Found::Queued(_)) => false,
        Ok(Found::Exists { .. }) => true,
        Err(ApiError::OutcomeUnknown(e)) => return Chunk::Unknown(e),
        Err(e) => return Chunk::Unknown(StoreError::Queue(e.to_string())),
    };
    let ids: Vec<&str> = jobs.iter().map(|job| job.id()).collect();
    let records = match state.records.get_many(&ids).await {
        Ok(records) => records,
        Err(e) => return Chunk::Unknown(e),
    };
    let found = records
        .into_iter()
        .map(|record| {
            record.map(|r| {
                if earlier {
                    Found::Exists {
                        op: r.op,
                        key: r.key,
                        seq: r.seq,
                    }
                } else {
                    Found::Queued(r.seq)
                }
            })
        })
        .collect::<Option<Vec<Found>>>();
    match found.and_then(|found| landed(jobs, found)) {
        Some(landed) => Chunk::Queued(landed),
        None => Chunk::Unknown(StoreError::Queue(
            "a batch's chunk was queued, but its job records could not be read".into(),
        )),
    }
}

/// Answers once every job is final (200, each job's record), or with the
/// plain 202 if `wait` runs out first.
async fn wait_for_all(state: &AppState, jobs: Vec<Accepted>, wait: Duration) -> HttpResponse {
    let deadline = tokio::time::Instant::now() + wait;
    let mut notices: FuturesUnordered<_> = jobs
        .iter()
        .map(|job| state.waiters.register(&job.job_id))
        .collect();
    let mut finals: Vec<Option<JobRecord>> = jobs.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..jobs.len()).collect();
    loop {
        let ids: Vec<&str> = pending.iter().map(|&i| jobs[i].job_id.as_str()).collect();
        match state.records.get_many(&ids).await {
            Ok(records) => {
                for (&i, record) in pending.iter().zip(records) {
                    if let Some(record) = record
                        && record.status.is_final()
                    {
                        finals[i] = Some(record);
                    }
                }
                pending.retain(|&i| finals[i].is_none());
            }
            Err(e) => tracing::warn!(error = %e, "could not read a waited-for batch's jobs"),
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if pending.is_empty() || left.is_zero() {
            break;
        }
        // Woken by a worker's notice, or once a second should one be missed.
        let nap = left.min(Duration::from_secs(1));
        if notices.is_empty() {
            tokio::time::sleep(nap).await;
        } else if tokio::time::timeout(nap, notices.next()).await.is_ok() {
            // Take every notice already in: one read for all of them.
            while let Some(Some(_)) = notices.next().now_or_never() {}
        }
    }
    drop(notices);
    for job in &jobs {
        state.waiters.forget(&job.job_id);
    }
    if !pending.is_empty() {
        return accepted_response(jobs, false);
    }
    HttpResponse::Ok()
        .insert_header(("preference-applied", format!("wait={}", wait.as_secs())))
        .json(BatchOutcome {
            jobs: finals.into_iter().flatten().map(JobBody::from).collect(),
        })
}

/// The 202 answer of a batch.
fn accepted_response(jobs: Vec<Accepted>, replayed: bool) -> HttpResponse {
    let mut response = HttpResponse::Accepted();
    if replayed {
        response.insert_header(("idempotent-replayed", "true"));
    }
    response.json(BatchAccepted { jobs })
}
