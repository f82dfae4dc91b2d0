//! Job types: what the API enqueues ([`ApplyJob`]), what applying one can end
//! in ([`Outcome`]), and the job records clients poll ([`JobRecord`], kept in
//! the queue Redis by [`JobRecords`]).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::connection::{Conn, WaitReplicas, query_all};
use crate::error::StoreError;
use crate::group::{Flush, GroupCommit, Limits};
use crate::keys;

/// How long an `Idempotency-Key` token is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// What [`JobRecords::claim_idempotency`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is new: this request's job id is now the key's.
    New,
    /// An earlier request with the key chose this job id (it was answered,
    /// is still running, or failed): this request queues that same job id,
    /// which the queue takes at most once, and answers what it finds.
    Claimed(String),
    /// The key was first used for a request with another fingerprint.
    Reused,
}

/// Claims an `Idempotency-Key` scope for a request with fingerprint ARGV[1]
/// and job id ARGV[2], kept ARGV[3] seconds; answers `new`, `reused`, or
/// `claimed` + the first request's job id.
static CLAIM_IDEMPOTENCY: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local cur = redis.call('HMGET', KEYS[1], 'fp', 'job')
if not cur[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'job', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'new'}
end
if cur[1] ~= ARGV[1] then return {'reused'} end
return {'claimed', cur[2]}
",
    )
});

/// The job record field that keeps a dead job's [`ApplyJob`], for retry.
const PAYLOAD: &str = "payload";

/// Takes a job out of the dead letters if it is one: answers its payload and
/// the time it died, or nil.
static TAKE_DEAD: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('EXISTS', KEYS[3]) == 1 then return false end
          local died = redis.call('ZSCORE', KEYS[1], ARGV[1])
          if not died then return false end
          redis.call('ZREM', KEYS[1], ARGV[1])
          local job = redis.call('HMGET', KEYS[2], 'status', ARGV[2])
          if job[1] ~= 'dead' or not job[2] then return false end
          redis.call('HSET', KEYS[2], 'died_at', died)
          return {job[2], died}",
    )
});

/// Settles a take of a dead letter whose answer did not arrive: marks the
/// attempt cancelled (KEYS[3], for ARGV[2] s), so that the take, should it
/// still reach Redis, takes nothing; and if the take did run (the job is
/// still `dead` but no longer a dead letter), puts it back in its place.
static UNTAKE_DEAD: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
          local job = redis.call('HMGET', KEYS[2], 'status', 'died_at')
          if job[1] == 'dead' and job[2] and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
            redis.call('ZADD', KEYS[1], job[2], ARGV[1])
          end
          return 1",
    )
});

/// A write operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// `POST /v1/kv`: fails with `already_exists` if the key is live.
    Create,
    /// `PUT /v1/kv/{key}`: fails with `not_found` if the key is absent.
    Update,
    /// `PUT /v1/kv/{key}?upsert=true`: creates or updates.
    Upsert,
    /// `DELETE /v1/kv/{key}`: fails with `not_found` if the key is absent.
    Delete,
}

impl Op {
    /// The lowercase name used in JSON, job records and the apply script.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }

    /// Parses [`Op::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "create" => Op::Create,
            "update" => Op::Update,
            "upsert" => Op::Upsert,
            "delete" => Op::Delete,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One accepted write, as queued for the workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyJob {
    /// The job id (a UUID), also the apalis task id.
    pub id: String,
    /// What to do.
    pub op: Op,
    /// The user key.
    pub key: String,
    /// The write's place in its key's order: the job's position in its partition's
    /// stream, given by the accept script (0 in the queued JSON; the queue
    /// backend fills it in from the stream entry).
    pub seq: u64,
    /// The owner generation of the partition when a worker fetched the job,
    /// filled in by the queue backend; the apply script's fence refuses a
    /// job of an older owner. Not queued.
    #[serde(skip)]
    pub generation: u64,
    /// Whether an earlier owner of the partition may have run this stream
    /// entry (it was in the stream when the fetching worker took the
    /// partition): the handler then checks the job's record first, since a
    /// job that ended `dead` there, or was queued again since, must not
    /// apply at this place. Filled in by the queue backend. Not queued.
    #[serde(skip)]
    pub redelivered: bool,
    /// The new value as JSON text (create, update, upsert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<RawValue>>,
    /// Expiry of the new value, in seconds; `None` means no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// `If-Match`: the version the key must have when the job applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_match: Option<u64>,
    /// The id of the HTTP request that enqueued the job, for logs.
    pub request_id: String,
    /// When the API accepted the write, Unix ms.
    pub enqueued_at: i64,
    /// The W3C `traceparent` of the span that enqueued the job, which the
    /// worker's apply span joins (see [`crate::telemetry`]); absent in
    /// jobs queued before kvq carried it, and when there was no trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A business failure: final, never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailCode {
    /// Create of a key that is live.
    AlreadyExists,
    /// Update or delete of a key that is absent.
    NotFound,
    /// `If-Match` did not match the key's version (or the key was absent).
    VersionMismatch,
}

impl FailCode {
    /// The stable machine code.
    pub fn as_str(self) -> &'static str {
        match self {
            FailCode::AlreadyExists => "already_exists",
            FailCode::NotFound => "not_found",
            FailCode::VersionMismatch => "version_mismatch",
        }
    }

    /// A sentence for humans.
    pub fn message(self) -> &'static str {
        match self {
            FailCode::AlreadyExists => "the key already exists",
            FailCode::NotFound => "the key does not exist",
            FailCode::VersionMismatch => "the key's version does not match If-Match",
        }
    }
}

/// What applying a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The key was created with this version.
    Created(u64),
    /// The key was updated to this version.
    Updated(u64),
    /// The key was deleted; the delete took this version.
    Deleted(u64),
    /// Nothing changed.
    Failed(FailCode),
}

impl Outcome {
    /// Parses the compact form the apply script records: `created:3`,
    /// `not_found:0`, ...
    pub fn parse(s: &str) -> Option<Self> {
        let (name, version) = s.split_once(':')?;
        let version: u64 = version.parse().ok()?;
        Some(match name {
            "created" => Outcome::Created(version),
            "updated" => Outcome::Updated(version),
            "deleted" => Outcome::Deleted(version),
            "already_exists" => Outcome::Failed(FailCode::AlreadyExists),
            "not_found" => Outcome::Failed(FailCode::NotFound),
            "version_mismatch" => Outcome::Failed(FailCode::VersionMismatch),
            _ => return None,
        })
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, waiting for a worker.
    Queued,
    /// A worker is applying it.
    Running,
    /// Applied.
    Succeeded,
    /// Ended by a business failure (`already_exists`, `not_found`,
    /// `version_mismatch`); not retried.
    Failed,
    /// Infrastructure errors exhausted the retries.
    Dead,
}

impl JobStatus {
    /// The lowercase name used in JSON and job records.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Dead => "dead",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "dead" => JobStatus::Dead,
            _ => return None,
        })
    }

    /// Whether the job will change no more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Dead
        )
    }
}

/// What a successful write did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The key did not exist (or had expired) and now does.
    Created,
    /// The key existed and has a new value.
    Updated,
    /// The key existed and is gone.
    Deleted,
}

/// A successful job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    /// What the write did.
    pub outcome: Change,
    /// The key's version after the write.
    pub version: u64,
}

/// Why a job ended `failed` or `dead`: the stable machine code of its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// `failed`: create of a key that is live.
    AlreadyExists,
    /// `failed`: update or delete of a key that is absent.
    NotFound,
    /// `failed`: `If-Match` did not match the key's version.
    VersionMismatch,
    /// `dead`: a Redis server stayed unavailable through every retry; a dead
    /// letter, which `POST /v1/jobs/{id}/retry` can queue again.
    BackendUnavailable,
}

impl ErrorCode {
    /// The code as JSON and problem+json write it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotFound => "not_found",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::BackendUnavailable => "backend_unavailable",
        }
    }
}

impl From<FailCode> for ErrorCode {
    fn from(code: FailCode) -> Self {
        match code {
            FailCode::AlreadyExists => ErrorCode::AlreadyExists,
            FailCode::NotFound => ErrorCode::NotFound,
            FailCode::VersionMismatch => ErrorCode::VersionMismatch,
        }
    }
}

/// A failed or dead job's error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// The stable machine code.
    pub code: ErrorCode,
    /// A sentence for humans.
    pub message: String,
}

/// The record of one job, as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// The job id.
    pub id: String,
    /// The operation.
    pub op: Op,
    /// The user key.
    pub key: String,
    /// The key's sequence number.
    pub seq: u64,
    /// Where the job is.
    pub status: JobStatus,
    /// How many times a worker started it.
    pub attempts: u32,
    /// Set once succeeded.
    pub result: Option<JobResult>,
    /// Set once failed or dead.
    pub error: Option<JobError>,
    /// Unix ms.
    pub enqueued_at: i64,
    /// Unix ms of the latest start.
    pub started_at: Option<i64>,
    /// Unix ms.
    pub finished_at: Option<i64>,
    /// The id of the request that enqueued it.
    pub request_id: Option<String>,
}

impl JobRecord {
    fn from_hash(mut h: HashMap<String, String>) -> Result<Self, StoreError> {
        let corrupt = |field: &str| StoreError::Corrupt(format!("job record field {field}"));
        let mut take = |field: &str| h.remove(field);
        let id = take("id").ok_or_else(|| corrupt("id"))?;
        let op = take("op")
            .as_deref()
            .and_then(Op::parse)
            .ok_or_else(|| corrupt("op"))?;
        let key = take("key").ok_or_else(|| corrupt("key"))?;
        let seq = take("seq")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("seq"))?;
        let status = take("status")
            .as_deref()
            .and_then(JobStatus::parse)
            .ok_or_else(|| corrupt("status"))?;
        let attempts = take("attempts").and_then(|s| s.parse().ok()).unwrap_or(0);
        let result = take("result").and_then(|s| serde_json::from_str(&s).ok());
        let error = take("error").and_then(|s| serde_json::from_str(&s).ok());
        let enqueued_at = take("enqueued_at")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("enqueued_at"))?;
        let started_at = take("started_at").and_then(|s| s.parse().ok());
        let finished_at = take("finished_at").and_then(|s| s.parse().ok());
        let request_id = take("request_id");
        Ok(Self {
            id,
            op,
            key,
            seq,
            status,
            attempts,
            result,
            error,
            enqueued_at,
            started_at,
            finished_at,
            request_id,
        })
    }
}

/// How a job ended, for [`JobRecords::finish`].
#[derive(Debug, Clone)]
pub enum Final {
    /// Applied.
    Succeeded(JobResult),
    /// Business failure.
    Failed(JobError),
    /// Retries exhausted ([`RETRIES_EXHAUSTED`], a dead letter that can be
    /// retried), or a write given up on for good.
    Dead(JobError),
}

/// The error code of a job whose retries ran out: only such dead jobs are
/// dead letters, kept for `POST /v1/jobs/{id}/retry`.
pub const RETRIES_EXHAUSTED: ErrorCode = ErrorCode::BackendUnavailable;

impl From<Outcome> for Final {
    fn from(outcome: Outcome) -> Self {
        let ok = |outcome, version| Final::Succeeded(JobResult { outcome, version });
        match outcome {
            Outcome::Created(v) => ok(Change::Created, v),
            Outcome::Updated(v) => ok(Change::Updated, v),
            Outcome::Deleted(v) => ok(Change::Deleted, v),
            Outcome::Failed(code) => Final::Failed(JobError {
                code: code.into(),
                message: code.message().to_owned(),
            }),
        }
    }
}

/// The job records in the queue Redis: written by the API at enqueue, updated
/// by the worker, read by `GET /v1/jobs/{id}`, expired after the retention
/// period.
#[derive(Clone)]
pub struct JobRecords {
    conn: Conn,
    namespace: String,
    retention: Duration,
    partitions: u16,
    /// The worker's record writes are group-committed ([`crate::group`]):
    /// those waiting go in one pipeline, with one notice naming every job
    /// that ended; one lane per partition on a cluster, one on one server.
    writes: GroupCommit<RecordWriter>,
}

/// Record writes one pipeline carries at most.
const MAX_WRITE_GROUP: usize = 128;

/// What writing records needs, shared with the group-commit tasks.
struct RecordWriter {
    conn: Conn,
    namespace: String,
    retention_secs: i64,
}

/// One record write of the worker's.
struct RecordWrite {
    p: u16,
    job_id: String,
    key: String,
    fields: Vec<(&'static str, String)>,
    clear: &'static [&'static str],
    /// Whether the job ended: its id goes in the group's notice.
    announce: bool,
    /// When a job whose retries ran out died: it joins the dead letters.
    dead_at: Option<i64>,
    /// How the job ended, if it ended `succeeded` or `failed`: counted in
    /// its partition's counters ([`keys::counts_key`]).
    ended: Option<JobStatus>,
}

impl JobRecords {
    /// Job records under `KVQ_NAMESPACE`, kept for `KVQ_JOB_RETENTION_SECONDS`
    /// once written, over `KVQ_QUEUE_PARTITIONS` partitions.
    pub fn new(conn: Conn, config: &crate::Config) -> Self {
        let lanes = if conn.is_cluster() {
            usize::from(config.queue_partitions)
        } else {
            1
        };
        let writer = RecordWriter {
            conn: conn.clone(),
            namespace: config.namespace.clone(),
            retention_secs: i64::try_from(config.job_retention.as_secs()).unwrap_or(i64::MAX),
        };
        let limits = Limits {
            items: MAX_WRITE_GROUP,
            bytes: 1_048_576,
            stale_after: config.redis_timeout,
        };
        Self {
            conn,
            namespace: config.namespace.clone(),
            retention: config.job_retention,
            partitions: config.queue_partitions,
            writes: GroupCommit::new(writer, lanes, limits),
        }
    }

    /// The record key of job `id`, or an error for an id that is no job of
    /// kvq's.
    fn key_of(&self, id: &str) -> Result<(u16, String), StoreError> {
        let p = keys::job_partition(id)
            .ok_or_else(|| StoreError::Corrupt(format!("{id:?} is no job id of kvq's")))?;
        let key = keys::job_key(&self.namespace, id)
            .ok_or_else(|| StoreError::Corrupt(format!("{id:?} is no job id of kvq's")))?;
        Ok((p, key))
    }

    pub(crate) fn retention_secs(&self) -> i64 {
        i64::try_from(self.retention.as_secs()).unwrap_or(i64::MAX)
    }

    /// The fields every worker write sets, so that a record whose retention
    /// ran out while its job was queued comes back whole.
    fn base_fields(job: &ApplyJob, attempt: u32, started_at: i64) -> Vec<(&'static str, String)> {
        vec![
            ("id", job.id.clone()),
            ("op", job.op.as_str().to_owned()),
            ("key", job.key.clone()),
            ("seq", job.seq.to_string()),
            ("enqueued_at", job.enqueued_at.to_string()),
            ("request_id", job.request_id.clone()),
            ("attempts", attempt.to_string()),
            ("started_at", started_at.to_string()),
        ]
    }

    /// Writes a job's record with the next group of record writes (see
    /// [`RecordWriter`]).
    async fn write(
        &self,
        job_id: &str,
        fields: Vec<(&'static str, String)>,
        clear: &'static [&'static str],
        announce: bool,
        dead_at: Option<i64>,
        ended: Option<JobStatus>,
    ) -> Result<(), StoreError> {
        let (p, key) = self.key_of(job_id)?;
        let write = RecordWrite {
            p,
            job_id: job_id.to_owned(),
            key,
            fields,
            clear,
            announce,
            dead_at,
            ended,
        };
        self.writes.submit(usize::from(p), write).await
    }

    /// Marks a job `running` for its `attempt`-th start (1-based).
    #[tracing::instrument(skip_all, fields(job_id = %job.id))]
    pub async fn start(&self, job: &ApplyJob, attempt: u32, now: i64) -> Result<(), StoreError> {
        let mut fields = Self::base_fields(job, attempt, now);
        fields.push(("status", JobStatus::Running.as_str().to_owned()));
        let clear: &[&str] = if attempt > 1 { &["finished_at"] } else { &[] };
        self.write(&job.id, fields, clear, false, None, None).await
    }

    /// Records how a job's `attempt`-th run, started at `started_at`, ended,
    /// and announces it on [`keys::done_channel`]; the record then lives for
    /// the retention period.
    #[tracing::instrument(skip_all, fields(job_id = %job.id))]
    pub async fn finish(
        &self,
        job: &ApplyJob,
        end: &Final,
        attempt: u32,
        started_at: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        let (status, field, json) = match end {
            Final::Succeeded(r) => (JobStatus::Succeeded, "result", serde_json::to_string(r)),
            Final::Failed(e) => (JobStatus::Failed, "error", serde_json::to_string(e)),
            Final::Dead(e) => (JobStatus::Dead, "error", serde_json::to_string(e)),
        };
        let json = json.map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut fields = Self::base_fields(job, attempt, started_at);
        fields.push(("status", status.as_str().to_owned()));
        fields.push(("finished_at", now.to_string()));
        fields.push((field, json));
        // Only a job whose retries ran out is a dead letter; one given up on
        // for its place in the key's order would, retried, write over newer
        // writes.
        let dead_at = matches!(end, Final::Dead(e) if e.code == RETRIES_EXHAUSTED).then_some(now);
        if dead_at.is_some() {
            // What `POST /v1/jobs/{id}/retry` queues again.
            let payload =
                serde_json::to_string(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            fields.push((PAYLOAD, payload));
        }
        let ended = matches!(status, JobStatus::Succeeded | JobStatus::Failed).then_some(status);
        self.write(&job.id, fields, &[], true, dead_at, ended).await
    }

    /// Takes job `id` out of the dead letters and returns what it queued and
    /// when it died, or `None` if it is not a dead letter (any more). Of two
    /// concurrent calls for one job, only one gets it. A job that ran again
    /// after it was recorded dead (redelivered after a crash) is no dead
    /// letter, whatever the set says.
    #[tracing::instrument(skip(self))]
    pub async fn take_dead(
        &self,
        id: &str,
        attempt: &str,
    ) -> Result<Option<(ApplyJob, i64)>, StoreError> {
        let (p, key) = self.key_of(id)?;
        let taken: Option<(String, i64)> = TAKE_DEAD
            .key(keys::dead_set(&self.namespace, p))
            .key(key)
            .key(keys::cancelled_key(&self.namespace, p, attempt))
            .arg(id)
            .arg(PAYLOAD)
            .invoke_async(&mut self.conn.clone())
            .await?;
        taken
            .map(|(payload, died_at)| {
                serde_json::from_str(&payload)
                    .map(|job| (job, died_at))
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .transpose()
    }

    /// Settles a [`JobRecords::take_dead`] attempt that got no answer: after
    /// this, job `id` is a dead letter as before, whether the take ran or
    /// not, and the take can no longer run. Safe to repeat.
    #[tracing::instrument(skip(self))]
    pub async fn untake_dead(&self, id: &str, attempt: &str) -> Result<(), StoreError> {
        let (p, key) = self.key_of(id)?;
        let _: i64 = UNTAKE_DEAD
            .key(keys::dead_set(&self.namespace, p))
            .key(key)
            .key(keys::cancelled_key(&self.namespace, p, attempt))
            .arg(id)
            .arg(IDEMPOTENCY_TTL.as_secs())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Puts job `id`, taken by [`JobRecords::take_dead`], back among the dead
    /// letters in its place, when queueing it again failed.
    #[tracing::instrument(skip(self))]
    pub async fn restore_dead(&self, id: &str, died_at: i64) -> Result<(), StoreError> {
        let (p, _) = self.key_of(id)?;
        let _: () = self
            .conn
            .clone()
            .zadd(keys::dead_set(&self.namespace, p), id, died_at)
            .await?;
        Ok(())
    }

    /// One page of dead letters, oldest first: up to `limit` records from
    /// position `offset`, and the offset of the next page if there is one.
    /// The partitions' dead-letter sets are merged by the time each job
    /// died (one pipeline). Ids whose records have expired, or that are no
    /// longer dead, are dropped from their sets on the way.
    #[tracing::instrument(skip(self))]
    pub async fn dead(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<JobRecord>, Option<usize>), StoreError> {
        let conn = &self.conn;
        // One more than asked, to know whether a next page exists.
        let stop = isize::try_from(offset.saturating_add(limit)).unwrap_or(isize::MAX);
        let sets = query_all(
            conn,
            (0..self.partitions)
                .map(|p| {
                    let mut cmd = redis::cmd("ZRANGE");
                    cmd.arg(keys::dead_set(&self.namespace, p))
                        .arg(0)
                        .arg(stop)
                        .arg("WITHSCORES");
                    cmd
                })
                .collect(),
        )
        .await?;
        let sets = sets
            .into_iter()
            .map(redis::FromRedisValue::from_redis_value)
            .collect::<Result<Vec<Vec<(String, i64)>>, _>>()
            .map_err(|e| StoreError::Corrupt(format!("a dead-letter set: {e}")))?;
        let mut all: Vec<(i64, String, u16)> = sets
            .into_iter()
            .zip(0..self.partitions)
            .flat_map(|(set, p)| set.into_iter().map(move |(id, died)| (died, id, p)))
            .collect();
        all.sort_unstable();
        let page: Vec<(i64, String, u16)> = all
            .into_iter()
            .skip(offset)
            .take(limit.saturating_add(1))
            .collect();
        let more = page.len() > limit;
        let page = &page[..page.len().min(limit)];
        if page.is_empty() {
            return Ok((Vec::new(), None));
        }
        let reads = page
            .iter()
            .map(|(_, id, _)| match keys::job_key(&self.namespace, id) {
                Some(key) => redis::Cmd::hgetall(key),
                None => redis::cmd("PING"),
            })
            .collect();
        let hashes = query_all(conn, reads).await?;
        let mut records = Vec::with_capacity(page.len());
        let mut gone = Vec::new();
        let mut expired = 0;
        for ((_, id, p), hash) in page.iter().zip(hashes) {
            let hash: HashMap<String, String> =
                redis::FromRedisValue::from_redis_value(hash).unwrap_or_default();
            let record = if hash.is_empty() {
                None
            } else {
                Some(JobRecord::from_hash(hash)?)
            };
            match record {
                Some(record) if record.status == JobStatus::Dead => records.push(record),
                _ => {
                    gone.push(redis::Cmd::zrem(keys::dead_set(&self.namespace, *p), id));
                    expired += 1;
                }
            }
        }
        query_all(conn, gone).await?;
        let next = more.then(|| offset + limit - expired);
        Ok((records, next))
    }

    /// Claims an `Idempotency-Key` scope (see [`keys::idempotency_key`]) for
    /// a request with `fingerprint` that would queue job `job_id`, or tells
    /// what the scope's first request did.
    ///
    /// With `wait` (`KVQ_QUEUE_REDIS_WAIT_REPLICAS`), the claim counts only
    /// once that many replicas have it, as an accepted job does: on a
    /// cluster the claim's slot may live on another master than the job's
    /// partition, and a claim lost in a failover would let a repeat of an
    /// answered write queue it again under a new id. A claim not confirmed
    /// in time is an error; nothing was queued yet.
    pub async fn claim_idempotency(
        &self,
        scope: &str,
        fingerprint: &str,
        job_id: &str,
        wait: Option<WaitReplicas>,
    ) -> Result<Claim, StoreError> {
        let mut invocation = CLAIM_IDEMPOTENCY.prepare_invoke();
        invocation
            .key(keys::idempotency_key(&self.namespace, scope))
            .arg(fingerprint)
            .arg(job_id)
            .arg(IDEMPOTENCY_TTL.as_secs());
        let mut conn = self.conn.clone();
        let answer: Vec<String> = match wait {
            None => invocation.invoke_async(&mut conn).await?,
            Some(wait) => {
                // The script and WAIT in one round trip, on the claim's node.
                let mut pipe = redis::pipe();
                pipe.invoke_script(&invocation);
                let (answer, confirmed): (Vec<String>, i64) =
                    wait.query(&self.conn, pipe, &CLAIM_IDEMPOTENCY).await?;
                if confirmed < i64::from(wait.replicas) {
                    return Err(wait.short(confirmed));
                }
                answer
            }
        };
        match answer.as_slice() {
            [kind] if kind == "new" => Ok(Claim::New),
            [kind] if kind == "reused" => Ok(Claim::Reused),
            [kind, job] if kind == "claimed" => Ok(Claim::Claimed(job.clone())),
            _ => Err(StoreError::Corrupt(format!(
                "idempotency claim answer {answer:?}"
            ))),
        }
    }

    /// Reads a job's record; `None` if unknown or expired.
    #[tracing::instrument(skip(self))]
    pub async fn get(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        let Some(key) = keys::job_key(&self.namespace, job_id) else {
            return Ok(None);
        };
        let hash: HashMap<String, String> = self.conn.clone().hgetall(key).await?;
        if hash.is_empty() {
            return Ok(None);
        }
        JobRecord::from_hash(hash).map(Some)
    }

    /// Reads many jobs' records with one pipeline (on a cluster, each read
    /// on its own, all at once), in the order of `job_ids`; `None` for an
    /// unknown or expired one.
    #[tracing::instrument(skip_all, fields(jobs = job_ids.len()))]
    pub async fn get_many(&self, job_ids: &[&str]) -> Result<Vec<Option<JobRecord>>, StoreError> {
        let keys: Vec<Option<String>> = job_ids
            .iter()
            .map(|id| keys::job_key(&self.namespace, id))
            .collect();
        let cmds = keys.iter().flatten().map(redis::Cmd::hgetall).collect();
        let mut replies = query_all(&self.conn, cmds).await?.into_iter();
        let mut records = Vec::with_capacity(job_ids.len());
        for key in &keys {
            if key.is_none() {
                records.push(None);
                continue;
            }
            let reply = replies
                .next()
                .ok_or_else(|| StoreError::Corrupt("a job record read went unanswered".into()))?;
            let hash: HashMap<String, String> = redis::FromRedisValue::from_redis_value(reply)
                .map_err(|e| StoreError::Corrupt(format!("a job record: {e}")))?;
            records.push(if hash.is_empty() {
                None
            } else {
                Some(JobRecord::from_hash(hash)?)
            });
        }
        Ok(records)
    }
}

impl Flush for RecordWriter {
    type Item = RecordWrite;
    type Answer = Result<(), StoreError>;

    fn flush(&self, _: usize, writes: Vec<RecordWrite>) -> BoxFuture<'_, Vec<Self::Answer>> {
        async move {
            let written = self.write_group(&writes).await;
            writes.iter().map(|_| written.clone()).collect()
        }
        .boxed()
    }

    fn bytes(write: &RecordWrite) -> usize {
        write.fields.iter().map(|(_, v)| v.len()).sum()
    }

    fn unsent(_: RecordWrite, why: &str) -> Self::Answer {
        Err(StoreError::Unsent(why.to_owned()))
    }

    fn lost() -> Self::Answer {
        Err(StoreError::Timeout(Duration::ZERO))
    }
}

impl RecordWriter {
    /// `writes` (of one partition on a cluster) in one pipeline, with
    /// the counts of jobs that ended succeeded or failed, then one
    /// notice naming every job that ended, space-separated.
    async fn write_group(&self, writes: &[RecordWrite]) -> Result<(), StoreError> {
        // No MULTI: each command is idempotent, and a retry repeats them all.
        let mut pipe = redis::pipe();
        for write in writes {
            pipe.hset_multiple(&write.key, &write.fields)
                .ignore()
                .expire(&write.key, self.retention_secs)
                .ignore();
            if !write.clear.is_empty() {
                pipe.hdel(&write.key, write.clear).ignore();
            }
            if let Some(now) = write.dead_at {
                // Dead letters live as long as their records; older ones
                // are dropped from the set whenever a job dies.
                let dead = keys::dead_set(&self.namespace, write.p);
                let cutoff = now.saturating_sub(self.retention_secs.saturating_mul(1000));
                pipe.zadd(&dead, &write.job_id, now)
                    .ignore()
                    .zrembyscore(&dead, "-inf", format!("({cutoff}"))
                    .ignore();
            }
        }
        // Ended jobs by partition, in order of first appearance: (succeeded,
        // failed).
        let mut counts: Vec<(u16, u64, u64)> = Vec::new();
        for write in writes {
            let (ok, failed) = match write.ended {
                Some(JobStatus::Succeeded) => (1, 0),
                Some(JobStatus::Failed) => (0, 1),
                _ => continue,
            };
            match counts.iter_mut().find(|(p, ..)| *p == write.p) {
                Some(count) => {
                    count.1 += ok;
                    count.2 += failed;
                }
                None => counts.push((write.p, ok, failed)),
            }
        }
        if !counts.is_empty() {
            // Plain commands, not a script: a script the server has
            // forgotten would fail the pipeline after its other commands
            // ran, and sending it again would repeat the notice.
            for (p, ok, failed) in &counts {
                let key = keys::counts_key(&self.namespace, *p);
                if *ok > 0 {
                    pipe.hincr(&key, "succeeded", *ok).ignore();
                }
                if *failed > 0 {
                    pipe.hincr(&key, "failed", *failed).ignore();
                }
            }
        }
        let ended: Vec<&str> = writes
            .iter()
            .filter(|w| w.announce)
            .map(|w| w.job_id.as_str())
            .collect();
        let notice = ended.join(" ");
        let mut conn = self.conn.clone();
        let channel = keys::done_channel(&self.namespace);
        // A cluster routes PUBLISH by its channel's slot: on its own there,
        // after the records it announces.
        let publish_apart = !ended.is_empty() && conn.is_cluster();
        if !ended.is_empty() && !publish_apart {
            pipe.publish(&channel, &notice).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        // The notice is best effort there: a `Prefer: wait` request that
        // misses it answers 202 when its time runs out. Failing the jobs'
        // records for it would stall every partition's jobs while the
        // channel's one master fails over.
        if publish_apart && let Err(e) = conn.publish::<_, _, ()>(&channel, &notice).await {
            tracing::warn!(jobs = ended.len(), error = %e, "could not announce the jobs' end");
        }
        Ok(())
    }
}

/// The current time as Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds,
/// e.g. `2026-11-22T04:29:28.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_parse() {
        assert_eq!(Outcome::parse("created:1"), Some(Outcome::Created(1)));
        assert_eq!(
            Outcome::parse("version_mismatch:0"),
            Some(Outcome::Failed(FailCode::VersionMismatch))
        );
        assert_eq!(Outcome::parse("bogus:1"), None);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_321_768_123), "2026-11-22T04:29:28.123Z");
    }
}
