//! The job handler: applies one [`ApplyJob`] to the KV Redis, in `seq` order,
//! and records how it ended.
//!
//! - A business failure (`already_exists`, `not_found`, `version_mismatch`)
//!   ends the job `failed` at once.
//! - An infrastructure error (Redis down or slow) is retried by the queue,
//!   with growing delays, up to `KVQ_WORKER_MAX_ATTEMPTS` runs; then the job is
//!   `dead`. kvq counts the runs itself and stops apalis with an `AbortError`,
//!   because apalis-redis would otherwise retry 25 times whatever it is told.
//! - A job whose key has an earlier `seq` not yet applied waits for it, polling
//!   with backoff, for at most `KVQ_ORDER_GAP_TIMEOUT_SECONDS`; then it is
//!   applied anyway and the gap is logged.
//! - A redelivered job (its worker died after applying it) changes nothing
//!   and records the outcome the apply script remembered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::{AbortError, Attempt, BoxDynError, Data, DeferredError};
use kvq_shared::StoreError;
use kvq_shared::error::chain;
use kvq_shared::jobs::{
    ApplyJob, ErrorCode, Final, JobError, JobRecords, RETRIES_EXHAUSTED, now_ms,
};
use kvq_shared::store::{Applied, KvStore};
use tracing::Instrument;

use crate::metrics::Metrics;

/// Everything the handler needs.
pub struct Applier {
    /// The KV Redis.
    pub kv: KvStore,
    /// Job records in the queue Redis.
    pub records: JobRecords,
    /// Runs before a job with infrastructure errors is `dead`.
    pub max_attempts: u32,
    /// How long a job waits for a missing predecessor.
    pub gap_timeout: Duration,
    /// Counters for `/metrics`.
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
    applier.run(job, attempt).instrument(span).await
}

/// Why a run did not end the job.
enum RunError {
    /// Redis failed: retry later (counts as an attempt).
    Store(StoreError),
    /// An earlier write to the key is still missing: run again later
    /// (does not count as an attempt).
    Waiting,
}

impl From<StoreError> for RunError {
    fn from(e: StoreError) -> Self {
        RunError::Store(e)
    }
}

/// How long a job waits for an earlier write to its key while holding its
/// worker slot, before it gives the slot back and is re-queued. Earlier writes
/// usually run at the same moment on another slot and land within this.
const IN_SLOT_WAIT: Duration = Duration::from_millis(50);

impl Applier {
    /// Runs `job` for the `attempt`-th time (1-based).
    pub async fn run(&self, job: ApplyJob, attempt: u32) -> Result<(), BoxDynError> {
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
            Err(RunError::Waiting) => {
                Metrics::inc(&self.metrics.deferred);
                tracing::debug!("an earlier write to the key is still missing; re-queued");
                Err(DeferredError::new("waiting for an earlier write to the key").into())
            }
            Err(RunError::Store(e)) if attempt >= self.max_attempts => {
                Metrics::inc(&self.metrics.dead);
                tracing::error!(error = %chain(&e), "job dead: retries exhausted");
                let end = Final::Dead(JobError {
                    code: RETRIES_EXHAUSTED,
                    message: format!(
                        "gave up after {attempt} attempts: a Redis server was unavailable"
                    ),
                });
                let now = now_ms();
                if let Err(record) = self.records.finish(&job, &end, attempt, now, now).await {
                    tracing::error!(error = %chain(&record), "could not record the job as dead");
                }
                // The key's later writes need not wait for this one. (If the
                // KV Redis is what failed, this fails too, and they wait for
                // the gap timeout instead.)
                if let Err(mark) = self.kv.abandon_seq(&job.key, job.seq).await {
                    tracing::warn!(error = %chain(&mark), "could not release the dead job's seq");
                }
                Err(AbortError::new(e).into())
            }
            Err(RunError::Store(e)) => {
                Metrics::inc(&self.metrics.retried);
                tracing::warn!(error = %chain(&e), "job failed, will retry");
                Err(e.into())
            }
        }
    }

    async fn try_run(&self, job: &ApplyJob, attempt: u32) -> Result<Final, RunError> {
        let started_at = now_ms();
        // A first run that applies at once goes from `queued` to its final
        // status in one write; `running` is recorded when the job has to
        // wait (for an earlier write to its key) or is a retry.
        if attempt > 1 {
            self.records.start(job, attempt, started_at).await?;
        }
        let applied = self.apply_in_order(job).await?;
        let end = match applied {
            Applied::Done { outcome, .. } | Applied::Duplicate(Some(outcome)) => Final::from(outcome),
            Applied::Duplicate(None) => Final::Dead(JobError {
                code: ErrorCode::SequenceSkipped,
                message: "this write arrived after the gap timeout, when later writes to the key had been applied without it; it was not applied".into(),
            }),
            Applied::Wait { .. } => {
                if attempt == 1 {
                    self.records.start(job, attempt, started_at).await?;
                }
                return Err(RunError::Waiting);
            }
        };
        match applied {
            Applied::Duplicate(_) => {
                Metrics::inc(&self.metrics.redelivered);
                tracing::info!("job was applied before (redelivery); recording the first outcome");
            }
            Applied::Done { skipped, .. } if skipped > 0 => {
                self.metrics
                    .gap_seqs_skipped
                    .fetch_add(skipped, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    skipped,
                    gap_timeout_s = self.gap_timeout.as_secs(),
                    "earlier writes to this key never arrived; applied without them"
                );
            }
            _ => {}
        }
        self.records
            .finish(job, &end, attempt, started_at, now_ms())
            .await?;
        Ok(end)
    }

    /// Applies the job once every earlier `seq` of its key is applied (or
    /// the gap timeout has passed); waits up to [`IN_SLOT_WAIT`] for them,
    /// then answers [`Applied::Wait`].
    async fn apply_in_order(&self, job: &ApplyJob) -> Result<Applied, StoreError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            let applied = self.kv.apply(job, self.gap_timeout, now_ms()).await?;
            if !matches!(applied, Applied::Wait { .. }) || started.elapsed() >= IN_SLOT_WAIT {
                return Ok(applied);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(10));
        }
    }
}
