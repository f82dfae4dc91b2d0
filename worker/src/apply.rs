//! The job handler: applies one [`ApplyJob`] to the KV Redis and records how
//! it ended. The queue hands a key's jobs out one at a time, in order, so
//! the handler never waits for another job.
//!
//! - A business failure (`already_exists`, `not_found`, `version_mismatch`)
//!   ends the job `failed` at once.
//! - A Redis server that cannot be reached (connection refused or lost, a
//!   timeout, a server loading or failing over) does not count: the job is
//!   deferred and runs again, with growing delays, for as long as it takes,
//!   holding its key's later jobs back. An outage of any length ends with
//!   every write applied, in order.
//! - An error a Redis server answered (out of memory, a script error) is
//!   retried by the queue, with growing delays, up to
//!   `KVQ_WORKER_MAX_ATTEMPTS` runs; then the job is `dead`, a dead letter,
//!   and its key's later jobs go on without it.
//! - A redelivered job (its worker died after applying it) changes nothing
//!   and records the outcome the apply script remembered.
//! - A job fenced by a newer owner of its partition changes and records
//!   nothing: the newer owner runs it.
//! - A stream entry an earlier owner of the partition may have run is
//!   checked against its job's record first: a job that ended `dead` there
//!   stays dead (its key's later writes have passed it, and may have
//!   applied), and an entry of a dead job that was queued again since is
//!   left to the new entry. Neither changes or records anything.

use std::sync::Arc;

use apalis::prelude::{AbortError, Attempt, BoxDynError, Data, DeferredError};
use kvq_shared::error::chain;
use kvq_shared::jobs::{
    ApplyJob, Final, JobError, JobRecords, JobStatus, RETRIES_EXHAUSTED, now_ms,
};
use kvq_shared::queue::Fenced;
use kvq_shared::store::{Applied, KvStore};
use kvq_shared::{StoreError, telemetry};
use tracing::Instrument;

use crate::metrics::{InFlight, Metrics};

/// Everything the handler needs.
pub struct Applier {
    /// The KV Redis.
    pub kv: KvStore,
    /// Job records in the queue Redis.
    pub records: JobRecords,
    /// Runs before a job with errors Redis answered is `dead`.
    pub max_attempts: u32,
    /// The metrics of `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// The apalis handler.
pub async fn handle(
    job: ApplyJob,
    attempt: Attempt,
    applier: Data<Arc<Applier>>,
) -> Result<(), BoxDynError> {
    let attempt = u32::try_from(attempt.current()).unwrap_or(u32::MAX).max(1);
    let span = tracing::info_span!(
        "job",
        job_id = %job.id,
        request_id = %job.request_id,
        op = %job.op,
        seq = job.seq,
        attempt,
    );
    // The run joins the trace of the request that enqueued the job.
    telemetry::join(&span, job.traceparent.as_deref());
    let (op, started) = (job.op, std::time::Instant::now());
    let result = applier.run(job, attempt).instrument(span).await;
    applier.metrics.run(op, started.elapsed());
    result
}

/// Why a run did not end the job.
enum RunError {
    /// Redis failed.
    Store(StoreError),
    /// A newer owner of the partition applied in the key's bucket.
    Fenced(u64),
}

impl From<StoreError> for RunError {
    fn from(e: StoreError) -> Self {
        RunError::Store(e)
    }
}

impl Applier {
    /// Runs `job` for the `attempt`-th time (1-based).
    pub async fn run(&self, job: ApplyJob, attempt: u32) -> Result<(), BoxDynError> {
        let _in_flight = InFlight::new(&self.metrics.in_flight);
        if job.redelivered && attempt == 1 {
            match self.superseded(&job).await {
                Ok(false) => {}
                Ok(true) => return Ok(()),
                Err(e) if e.is_transient() => {
                    Metrics::inc(&self.metrics.deferred);
                    tracing::warn!(error = %chain(&e), "the queue Redis is unreachable; the job waits for it");
                    return Err(DeferredError::new(e).into());
                }
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "could not read the job's record; running it");
                }
            }
        }
        match self.try_run(&job, attempt).await {
            Ok(end) => {
                Metrics::inc(match end {
                    Final::Succeeded(_) => &self.metrics.succeeded,
                    Final::Failed(_) => &self.metrics.failed,
                    Final::Dead(_) => &self.metrics.dead,
                });
                tracing::info!(outcome = ?end, "job finished");
                Ok(())
            }
            Err(RunError::Fenced(fence)) => {
                Metrics::inc(&self.metrics.fenced);
                tracing::warn!(
                    fence,
                    generation = job.generation,
                    "a newer owner of the partition applied in this key's bucket; leaving the job to it"
                );
                Err(Box::new(Fenced { fence }))
            }
            // Unreachable, not refusing: wait for it, without counting.
            Err(RunError::Store(e)) if e.is_transient() => {
                Metrics::inc(&self.metrics.deferred);
                tracing::warn!(error = %chain(&e), "a Redis server is unreachable; the job waits for it");
                Err(DeferredError::new(e).into())
            }
            Err(RunError::Store(e)) if attempt >= self.max_attempts => {
                Metrics::inc(&self.metrics.dead);
                tracing::error!(error = %chain(&e), "job dead: retries exhausted");
                let end = Final::Dead(JobError {
                    code: RETRIES_EXHAUSTED,
                    message: format!(
                        "gave up after {attempt} attempts: a Redis server refused the write"
                    ),
                });
                let now = now_ms();
                if let Err(record) = self.records.finish(&job, &end, attempt, now, now).await {
                    // The job stays unfinished: the queue runs it again.
                    tracing::error!(error = %chain(&record), "could not record the job as dead");
                    return Err(DeferredError::new(record).into());
                }
                self.metrics.applied(job.op, job.enqueued_at, now_ms());
                Err(AbortError::new(e).into())
            }
            Err(RunError::Store(e)) => {
                Metrics::inc(&self.metrics.retried);
                tracing::warn!(error = %chain(&e), "job failed, will retry");
                Err(e.into())
            }
        }
    }

    /// Whether this stream entry, which an earlier owner of the partition
    /// may have run, must not run: its job ended `dead` (its key's later
    /// writes went on without it), or was queued again under another
    /// `seq` since (that entry runs it, in its own place). A job whose
    /// record is gone runs.
    async fn superseded(&self, job: &ApplyJob) -> Result<bool, StoreError> {
        let Some(record) = self.records.get(&job.id).await? else {
            return Ok(false);
        };
        if record.status == JobStatus::Dead {
            tracing::info!("the job ended dead under an earlier owner; it stays dead");
            return Ok(true);
        }
        if record.seq != job.seq {
            tracing::info!(
                queued_again_as = record.seq,
                "the job was queued again since; its new entry runs it"
            );
            return Ok(true);
        }
        Ok(false)
    }

    async fn try_run(&self, job: &ApplyJob, attempt: u32) -> Result<Final, RunError> {
        let started_at = now_ms();
        // A first run goes from `queued` to its final status in one write;
        // `running` is recorded for retries.
        if attempt > 1 {
            self.records.start(job, attempt, started_at).await?;
        }
        let applied = self.kv.apply(job, now_ms()).await?;
        let end = match applied {
            Applied::Done(outcome) => Final::from(outcome),
            Applied::Duplicate(outcome) => {
                Metrics::inc(&self.metrics.redelivered);
                tracing::info!("job was applied before (redelivery); recording the first outcome");
                Final::from(outcome)
            }
            Applied::Fenced(fence) => return Err(RunError::Fenced(fence)),
        };
        self.records
            .finish(job, &end, attempt, started_at, now_ms())
            .await?;
        self.metrics.applied(job.op, job.enqueued_at, now_ms());
        Ok(end)
    }
}
