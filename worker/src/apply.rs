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

use apalis::prelude::{AbortError, Attempt, BoxDynError, Data};
use kvq_shared::StoreError;
use kvq_shared::jobs::{ApplyJob, Final, JobError, JobRecords, JobResult, Outcome, now_ms};
use kvq_shared::store::{Applied, KvStore};
use tracing::Instrument;

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

impl Applier {
    /// Runs `job` for the `attempt`-th time (1-based).
    pub async fn run(&self, job: ApplyJob, attempt: u32) -> Result<(), BoxDynError> {
        match self.try_run(&job, attempt).await {
            Ok(end) => {
                tracing::info!(outcome = ?end, "job finished");
                Ok(())
            }
            Err(e) if attempt >= self.max_attempts => {
                tracing::error!(error = %chain(&e), "job dead: retries exhausted");
                let end = Final::Dead(JobError {
                    code: "backend_unavailable".into(),
                    message: format!(
                        "gave up after {attempt} attempts: a Redis server was unavailable"
                    ),
                });
                let now = now_ms();
                if let Err(record) = self.records.finish(&job, &end, attempt, now, now).await {
                    tracing::error!(error = %chain(&record), "could not record the job as dead");
                }
                Err(AbortError::new(e).into())
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "job failed, will retry");
                Err(e.into())
            }
        }
    }

    async fn try_run(&self, job: &ApplyJob, attempt: u32) -> Result<Final, StoreError> {
        let started_at = now_ms();
        // A first run that applies at once goes from `queued` to its final
        // status in one write; `running` is recorded when the job has to
        // wait (for an earlier write to its key) or is a retry.
        let mut marked_running = false;
        if attempt > 1 {
            self.records.start(job, attempt, started_at).await?;
            marked_running = true;
        }
        let applied = self
            .apply_in_order(job, attempt, started_at, &mut marked_running)
            .await?;
        let end = match applied {
            Applied::Done(outcome) | Applied::Duplicate(Some(outcome)) => final_of(outcome),
            Applied::Duplicate(None) => Final::Dead(JobError {
                code: "sequence_skipped".into(),
                message: "a later write to this key was applied after this one was awaited too long; this write was not applied".into(),
            }),
            Applied::Wait { .. } => unreachable_wait(),
        };
        if matches!(applied, Applied::Duplicate(_)) {
            tracing::info!("job was applied before (redelivery); recording the first outcome");
        }
        self.records
            .finish(job, &end, attempt, started_at, now_ms())
            .await?;
        Ok(end)
    }

    /// Applies the job once every earlier `seq` of its key is applied, or
    /// once the wait times out.
    async fn apply_in_order(
        &self,
        job: &ApplyJob,
        attempt: u32,
        started_at: i64,
        marked_running: &mut bool,
    ) -> Result<Applied, StoreError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            let skip_gap = started.elapsed() >= self.gap_timeout;
            match self.kv.apply(job, skip_gap, now_ms()).await? {
                Applied::Wait { applied } => {
                    tracing::debug!(applied, "waiting for earlier writes to the key");
                    if !*marked_running {
                        self.records.start(job, attempt, started_at).await?;
                        *marked_running = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                done => {
                    if skip_gap {
                        tracing::warn!(
                            waited_ms = started.elapsed().as_millis() as u64,
                            "an earlier write to this key never arrived; skipped it"
                        );
                    }
                    return Ok(done);
                }
            }
        }
    }
}

/// The apply loop only returns non-waiting answers.
fn unreachable_wait() -> Final {
    Final::Dead(JobError {
        code: "internal".into(),
        message: "unexpected apply state".into(),
    })
}

fn final_of(outcome: Outcome) -> Final {
    let ok = |name: &str, version| {
        Final::Succeeded(JobResult {
            outcome: name.to_owned(),
            version,
        })
    };
    match outcome {
        Outcome::Created(v) => ok("created", v),
        Outcome::Updated(v) => ok("updated", v),
        Outcome::Deleted(v) => ok("deleted", v),
        Outcome::Failed(code) => Final::Failed(JobError {
            code: code.as_str().to_owned(),
            message: code.message().to_owned(),
        }),
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
