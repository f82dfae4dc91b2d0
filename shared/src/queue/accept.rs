//! The producer side of the queue: [`JobQueue`] accepts jobs, at most once
//! per job id, and settles accepts whose answer did not arrive.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use crate::config::Config;
use crate::error::StoreError;
use crate::jobs::{ApplyJob, JobRecords};
use crate::keys;

/// How long a cancelled accept attempt is remembered: far longer than any
/// command can linger in a connection.
const CANCELLED_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// Queues a job unless its attempt was cancelled or (a new job) a job with
/// its id exists. KEYS: the job record, the stream, the attempt's cancel
/// mark, the job's queued mark. ARGV: retention (s), id, op, key, seq,
/// enqueued_at, request id, attempt, the job as JSON, `new` or `again` (a
/// dead job queued again: its record exists, and what its last run left is
/// cleared), and how long to keep the queued mark (s; 0 for none: only
/// jobs with an `Idempotency-Key` need one, as their key may outlive the
/// record). Answers `queued`, `cancelled`, or `exists` + the existing job's
/// op, key and seq.
static ACCEPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[3]) == 1 then return {'cancelled'} end
if ARGV[10] == 'new' then
  local found = redis.call('HMGET', KEYS[1], 'op', 'key', 'seq')
  if not found[1] then found = redis.call('HMGET', KEYS[4], 'op', 'key', 'seq') end
  if found[1] then return {'exists', found[1], found[2], found[3]} end
else
  redis.call('HDEL', KEYS[1], 'result', 'error', 'started_at', 'finished_at', 'payload', 'died_at')
end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'op', ARGV[3], 'key', ARGV[4], 'seq', ARGV[5],
  'status', 'queued', 'attempts', '0', 'enqueued_at', ARGV[6], 'request_id', ARGV[7],
  'attempt', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if tonumber(ARGV[11]) > 0 then
  redis.call('HSET', KEYS[4], 'op', ARGV[3], 'key', ARGV[4], 'seq', ARGV[5], 'attempt', ARGV[8])
  redis.call('EXPIRE', KEYS[4], ARGV[11])
end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[2], 'runs', '0', 'job', ARGV[9])
return {'queued'}
",
    )
});

/// Marks an accept attempt cancelled unless it landed. KEYS: the job
/// record, the attempt's cancel mark, the job's queued mark. ARGV: the
/// attempt, how long to keep the mark (s), `new` or `again`. A new job
/// counts as landed when any attempt queued it; a dead job queued again
/// only when this attempt did. Answers `cancelled`, or `exists` + the
/// job's op, key and seq.
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local found = redis.call('HMGET', KEYS[1], 'op', 'key', 'seq', 'attempt')
if not found[1] and ARGV[3] == 'new' then
  found = redis.call('HMGET', KEYS[3], 'op', 'key', 'seq', 'attempt')
end
if found[1] and (ARGV[3] == 'new' or found[4] == ARGV[1]) then
  return {'exists', found[1], found[2], found[3]}
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return {'cancelled'}
",
    )
});

/// How a job enters the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queueing {
    /// A new write: queued only if no job with its id exists.
    New,
    /// A dead job, queued again under its own id (its record exists).
    Again,
}

impl Queueing {
    fn as_str(self) -> &'static str {
        match self {
            Queueing::New => "new",
            Queueing::Again => "again",
        }
    }
}

/// What [`JobQueue::accept`] or [`JobQueue::cancel`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// This attempt queued the job.
    Queued,
    /// A job with this id was queued already (by this attempt, if it is
    /// [`JobQueue::cancel`] that says so, or by another); its op, key and
    /// seq.
    Exists {
        /// The operation.
        op: crate::jobs::Op,
        /// The key.
        key: String,
        /// The seq it was queued with.
        seq: u64,
    },
    /// This attempt was cancelled: it queued nothing and never will.
    Cancelled,
}

impl Accepted {
    fn parse(answer: &[String]) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("accept answer {answer:?}"));
        match answer {
            [kind] if kind == "queued" => Ok(Accepted::Queued),
            [kind] if kind == "cancelled" => Ok(Accepted::Cancelled),
            [kind, op, key, seq] if kind == "exists" => Ok(Accepted::Exists {
                op: crate::jobs::Op::parse(op).ok_or_else(corrupt)?,
                key: key.clone(),
                seq: seq.parse().map_err(|_| corrupt())?,
            }),
            _ => Err(corrupt()),
        }
    }
}

/// The producer side of kvq's queue: records and pushes jobs.
#[derive(Clone)]
pub struct JobQueue {
    conn: ConnectionManager,
    namespace: String,
    stream: String,
    records: JobRecords,
}

impl JobQueue {
    /// The queue on the queue Redis reached through `conn`.
    pub fn new(conn: ConnectionManager, config: &Config) -> Self {
        Self {
            records: JobRecords::new(conn.clone(), &config.namespace, config.job_retention),
            conn,
            namespace: config.namespace.clone(),
            stream: keys::queue_name(&config.namespace),
        }
    }

    /// Records `job` as `queued` and pushes it, in one script, one round
    /// trip, unless this attempt was cancelled ([`JobQueue::cancel`]) or, for
    /// a new job, a job with its id is there already. `attempt` names this
    /// try of the job, so that cancelling one try never blocks another (a
    /// retry of the same `Idempotency-Key`).
    #[tracing::instrument(skip_all, fields(job_id = %job.id))]
    pub async fn accept(
        &self,
        job: &ApplyJob,
        attempt: &str,
        how: Queueing,
        idempotent: bool,
    ) -> Result<Accepted, StoreError> {
        let json = serde_json::to_string(job).map_err(|e| StoreError::Queue(e.to_string()))?;
        let answer: Vec<String> = ACCEPT
            .key(keys::job_key(&self.namespace, &job.id))
            .key(&self.stream)
            .key(keys::cancelled_key(&self.namespace, attempt))
            .key(keys::queued_key(&self.namespace, &job.id))
            .arg(self.records.retention_secs())
            .arg(&job.id)
            .arg(job.op.as_str())
            .arg(&job.key)
            .arg(job.seq)
            .arg(job.enqueued_at)
            .arg(&job.request_id)
            .arg(attempt)
            .arg(json)
            .arg(how.as_str())
            .arg(if idempotent {
                crate::jobs::IDEMPOTENCY_TTL.as_secs()
            } else {
                0
            })
            .invoke_async(&mut self.conn.clone())
            .await?;
        Accepted::parse(&answer)
    }

    /// Settles an attempt whose [`JobQueue::accept`] got no answer: tells
    /// whether the job is queued (for a new job, by this attempt or
    /// another), or else cancels the attempt for good, so that the accept,
    /// should it still reach Redis, queues nothing. Safe to repeat.
    #[tracing::instrument(skip(self))]
    pub async fn cancel(
        &self,
        job_id: &str,
        attempt: &str,
        how: Queueing,
    ) -> Result<Accepted, StoreError> {
        let answer: Vec<String> = CANCEL
            .key(keys::job_key(&self.namespace, job_id))
            .key(keys::cancelled_key(&self.namespace, attempt))
            .key(keys::queued_key(&self.namespace, job_id))
            .arg(attempt)
            .arg(CANCELLED_FOR.as_secs())
            .arg(how.as_str())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Accepted::parse(&answer)
    }

    /// How many jobs are queued (in the stream, waiting or in flight, plus
    /// those waiting to be retried), and how many dead letters there are.
    #[tracing::instrument(skip(self))]
    pub async fn depths(&self) -> Result<(u64, u64), StoreError> {
        let (streamed, retrying, dead): (u64, u64, u64) = redis::pipe()
            .cmd("XLEN")
            .arg(&self.stream)
            .cmd("ZCARD")
            .arg(format!("{}:retry", self.stream))
            .cmd("ZCARD")
            .arg(keys::dead_set(&self.namespace))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok((streamed + retrying, dead))
    }

    /// Answers `PING` on the queue Redis.
    pub async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
