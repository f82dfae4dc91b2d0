//! The producer side of the queue: [`JobQueue`] accepts jobs, at most once
//! per job id, and settles accepts whose answer did not arrive.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use crate::config::Config;
use crate::connection::{Conn, WaitReplicas, query_all, query_loading};
use crate::error::StoreError;
use crate::jobs::{ApplyJob, JobRecords};
use crate::keys;

/// How long a cancelled accept attempt is remembered: far longer than any
/// command can linger in a connection.
const CANCELLED_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// Queues a job unless its attempt was cancelled or (a new job) a job with
/// its id exists, giving it its `seq`: its stream entry's id, the
/// partition's previous `seq` + 1 or the Redis server's time in µs,
/// whichever is larger. KEYS (one partition, one slot): the job record, the
/// stream, the attempt's cancel mark, the job's queued mark, the
/// partition's last `seq`. ARGV: retention (s), id, op, key, enqueued_at,
/// request id, attempt, the job as JSON, `new` or `again` (a dead job
/// queued again: its record exists, and what its last run left is
/// cleared), and how long to keep the queued mark (s; 0 for none: only
/// jobs with an `Idempotency-Key` need one, as their key may outlive the
/// record). Answers `queued` + seq, `cancelled`, or `exists` + the existing
/// job's op, key and seq (as its first accept gave them: the queued mark
/// first, which a dead job's retry does not change).
static ACCEPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[3]) == 1 then return {'cancelled'} end
if ARGV[9] == 'new' then
  local found = redis.call('HMGET', KEYS[4], 'op', 'key', 'seq')
  if not found[1] then found = redis.call('HMGET', KEYS[1], 'op', 'key', 'seq') end
  if found[1] then return {'exists', found[1], found[2], found[3]} end
else
  redis.call('HDEL', KEYS[1], 'result', 'error', 'started_at', 'finished_at', 'payload', 'died_at')
end
local t = redis.call('TIME')
local seq = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[5]) or '0')
if seq <= last then seq = last + 1 end
seq = string.format('%.0f', seq)
redis.call('SET', KEYS[5], seq)
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'op', ARGV[3], 'key', ARGV[4], 'seq', seq,
  'status', 'queued', 'attempts', '0', 'enqueued_at', ARGV[5], 'request_id', ARGV[6],
  'attempt', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if tonumber(ARGV[10]) > 0 then
  redis.call('HSET', KEYS[4], 'op', ARGV[3], 'key', ARGV[4], 'seq', seq, 'attempt', ARGV[7])
  redis.call('EXPIRE', KEYS[4], ARGV[10])
end
redis.call('XADD', KEYS[2], seq .. '-0', 'id', ARGV[2], 'job', ARGV[8])
return {'queued', seq}
",
    )
});

/// Marks an accept attempt cancelled unless it landed. KEYS: the job
/// record, the attempt's cancel mark, the job's queued mark. ARGV: the
/// attempt, how long to keep the mark (s), `new` or `again`. A new job
/// counts as landed when any attempt queued it; a dead job queued again
/// only when this attempt did. Answers `cancelled`, `queued` + seq (this
/// attempt queued it), or `exists` + the job's op, key and seq (another
/// attempt did).
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local found = redis.call('HMGET', KEYS[1], 'op', 'key', 'seq', 'attempt')
if not found[1] and ARGV[3] == 'new' then
  found = redis.call('HMGET', KEYS[3], 'op', 'key', 'seq', 'attempt')
end
if found[1] and (ARGV[3] == 'new' or found[4] == ARGV[1]) then
  if found[4] == ARGV[1] then return {'queued', found[3]} end
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
    /// This attempt queued the job, with this seq.
    Queued(u64),
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
            [kind, seq] if kind == "queued" => {
                Ok(Accepted::Queued(seq.parse().map_err(|_| corrupt())?))
            }
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

/// The error for a job id that names no partition, or another partition
/// than its key's.
fn bad_id(id: &str) -> StoreError {
    StoreError::Corrupt(format!("{id:?} is no job id of kvq's"))
}

/// The producer side of kvq's queue: records and pushes jobs.
#[derive(Clone)]
pub struct JobQueue {
    conn: Conn,
    /// Replicas each accepted job must reach (`KVQ_QUEUE_REDIS_WAIT_REPLICAS`).
    wait: Option<WaitReplicas>,
    namespace: String,
    partitions: u16,
    records: JobRecords,
}

impl JobQueue {
    /// The queue on the queue Redis reached through `conn`; with `wait`, a
    /// job counts as accepted only once that many replicas have it.
    pub fn new(conn: Conn, config: &Config, wait: Option<WaitReplicas>) -> Self {
        Self {
            records: JobRecords::new(conn.clone(), config),
            conn,
            wait,
            namespace: config.namespace.clone(),
            partitions: config.queue_partitions,
        }
    }

    /// Replicas each accepted job (and `Idempotency-Key` claim) must reach.
    pub fn wait(&self) -> Option<WaitReplicas> {
        self.wait
    }

    /// A new job id for a write to `key`, naming the key's partition.
    pub fn new_job_id(&self, key: &str) -> String {
        keys::new_job_id(keys::partition(key, self.partitions))
    }

    /// The partition of job `id`, checked against the key it writes: a job
    /// id is queued only in the partition its key maps to.
    fn partition_of(&self, id: &str, key: &str) -> Result<u16, StoreError> {
        let p = keys::partition(key, self.partitions);
        if keys::job_partition(id) != Some(p) {
            return Err(bad_id(id));
        }
        Ok(p)
    }

    /// Records `job` as `queued` and appends it to its partition's stream,
    /// giving it its `seq`, in one script, one round trip, unless this attempt was cancelled ([`JobQueue::cancel`]) or, for
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
        let p = self.partition_of(&job.id, &job.key)?;
        let json = serde_json::to_string(job).map_err(|e| StoreError::Queue(e.to_string()))?;
        let ns = &self.namespace;
        let record = keys::job_key(ns, &job.id).ok_or_else(|| bad_id(&job.id))?;
        // EVALSHA built as one command: the job's JSON, up to the value
        // limit, is copied once into it (a script invocation copies it
        // twice), which is what bounds the API's memory per write.
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(ACCEPT.get_hash())
            .arg(5)
            .arg(record)
            .arg(keys::stream_key(ns, p))
            .arg(keys::cancelled_key(ns, p, attempt))
            .arg(keys::queued_key(ns, p, &job.id))
            .arg(keys::last_seq_key(ns, p))
            .arg(self.records.retention_secs())
            .arg(&job.id)
            .arg(job.op.as_str())
            .arg(&job.key)
            .arg(job.enqueued_at)
            .arg(&job.request_id)
            .arg(attempt)
            .arg(json)
            .arg(how.as_str())
            .arg(if idempotent {
                crate::jobs::IDEMPOTENCY_TTL.as_secs()
            } else {
                0
            });
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let Some(wait) = self.wait else {
            let (answer,): (Vec<String>,) = query_loading(&self.conn, &pipe, &ACCEPT).await?;
            return Accepted::parse(&answer);
        };
        // The script and WAIT in one round trip, on the partition's node.
        let (answer, confirmed): (Vec<String>, i64) = wait.query(&self.conn, pipe, &ACCEPT).await?;
        let accepted = Accepted::parse(&answer)?;
        // A job queued before (a repeat) counts as accepted only once
        // replicated, like a new one.
        if !matches!(accepted, Accepted::Cancelled) && confirmed < i64::from(wait.replicas) {
            return Err(wait.short(confirmed));
        }
        Ok(accepted)
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
        let ns = &self.namespace;
        let p = keys::job_partition(job_id).ok_or_else(|| bad_id(job_id))?;
        let record = keys::job_key(ns, job_id).ok_or_else(|| bad_id(job_id))?;
        let answer: Vec<String> = CANCEL
            .key(record)
            .key(keys::cancelled_key(ns, p, attempt))
            .key(keys::queued_key(ns, p, job_id))
            .arg(attempt)
            .arg(CANCELLED_FOR.as_secs())
            .arg(how.as_str())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Accepted::parse(&answer)
    }

    /// How many jobs are queued (in the partitions' streams: waiting, in
    /// flight, or final but not yet committed), and how many dead letters
    /// there are, over every partition (one pipeline).
    #[tracing::instrument(skip(self))]
    pub async fn depths(&self) -> Result<(u64, u64), StoreError> {
        let mut cmds = Vec::new();
        for p in 0..self.partitions {
            cmds.push(redis::Cmd::xlen(keys::stream_key(&self.namespace, p)));
            cmds.push(redis::Cmd::zcard(keys::dead_set(&self.namespace, p)));
        }
        let counts = query_all(&self.conn, cmds)
            .await?
            .into_iter()
            .map(redis::FromRedisValue::from_redis_value)
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|e| StoreError::Corrupt(format!("a queue depth: {e}")))?;
        let queued = counts.iter().step_by(2).sum();
        let dead = counts.iter().skip(1).step_by(2).sum();
        Ok((queued, dead))
    }

    /// Answers `PING` on the queue Redis.
    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.conn.ping().await?)
    }
}
