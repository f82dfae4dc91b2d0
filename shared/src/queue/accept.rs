//! The producer side of the queue: [`JobQueue`] accepts jobs, at most once
//! per job id, and settles accepts whose answer did not arrive.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use redis::Script;

use crate::config::Config;
use crate::connection::{Conn, WaitReplicas, query_all, query_loading};
use crate::error::StoreError;
use crate::group::{Flush, GroupCommit, Limits};
use crate::jobs::{ApplyJob, JobRecords};
use crate::keys;

/// How long a cancelled accept attempt is remembered: far longer than any
/// command can linger in a connection.
const CANCELLED_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// Queues a group of jobs of one partition, in order, unless the group's
/// attempt was cancelled; each job is queued unless (a new job) a job with
/// its id exists. Each queued job gets its `seq`: its stream entry's id,
/// the previous `seq` + 1 or the Redis server's time in µs, whichever is
/// larger, so a key's jobs get increasing `seq`s in the group's order. All
/// or nothing: the group is one script.
///
/// KEYS (one partition, one slot): the stream, the attempt's cancel mark,
/// the partition's last `seq`, its counters (`accepted` goes up by the jobs
/// queued), then per job its record and its queued mark.
/// ARGV: retention (s), attempt, the number of jobs, then per job: id, op,
/// key, enqueued_at, request id, the job as JSON, `new` or `again` (a dead
/// job queued again: its record exists, and what its last run left is
/// cleared), and how long to keep the queued mark (s; 0 for none: only
/// jobs with an `Idempotency-Key` need one, as their key may outlive the
/// record). Answers, per job, `queued` + seq, `cancelled`, or `exists` +
/// the existing job's op, key and seq (as its first accept gave them: the
/// queued mark first, which a dead job's retry does not change).
static ACCEPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = tonumber(ARGV[3])
local out = {}
if redis.call('EXISTS', KEYS[2]) == 1 then
  for i = 1, n do out[i] = {'cancelled'} end
  return out
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local moved = 0
for i = 0, n - 1 do
  local record, mark = KEYS[5 + 2 * i], KEYS[6 + 2 * i]
  local a = 4 + 8 * i
  local id, op, key = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local found
  if ARGV[a + 6] == 'new' then
    found = redis.call('HMGET', mark, 'op', 'key', 'seq')
    if not found[1] then found = redis.call('HMGET', record, 'op', 'key', 'seq') end
  else
    redis.call('HDEL', record, 'result', 'error', 'started_at', 'finished_at', 'payload', 'died_at')
  end
  if found and found[1] then
    out[i + 1] = {'exists', found[1], found[2], found[3]}
  else
    local seq = now
    if seq <= last then seq = last + 1 end
    last = seq
    moved = moved + 1
    seq = string.format('%.0f', seq)
    redis.call('HSET', record, 'id', id, 'op', op, 'key', key, 'seq', seq,
      'status', 'queued', 'attempts', '0', 'enqueued_at', ARGV[a + 3],
      'request_id', ARGV[a + 4], 'attempt', ARGV[2])
    redis.call('EXPIRE', record, ARGV[1])
    if tonumber(ARGV[a + 7]) > 0 then
      redis.call('HSET', mark, 'op', op, 'key', key, 'seq', seq, 'attempt', ARGV[2])
      redis.call('EXPIRE', mark, ARGV[a + 7])
    end
    redis.call('XADD', KEYS[1], seq .. '-0', 'id', id, 'job', ARGV[a + 5])
    out[i + 1] = {'queued', seq}
  end
end
if moved > 0 then
  redis.call('SET', KEYS[3], string.format('%.0f', last))
  redis.call('HINCRBY', KEYS[4], 'accepted', moved)
end
return out
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

/// Jobs one accept script queues at most.
pub const MAX_GROUP_JOBS: usize = 128;

/// Bytes of job JSON one group commit gathers at most (its first job always
/// goes, however large).
const MAX_GROUP_BYTES: usize = 1_048_576;

/// A job ready for the accept script: its JSON made once.
#[derive(Debug)]
pub struct Prepared {
    partition: u16,
    id: String,
    op: crate::jobs::Op,
    key: String,
    enqueued_at: i64,
    request_id: String,
    json: String,
    how: Queueing,
    /// How long its queued mark lives (s); 0 for none.
    mark_for: u64,
}

impl Prepared {
    /// The job's partition.
    pub fn partition(&self) -> u16 {
        self.partition
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job's operation.
    pub fn op(&self) -> crate::jobs::Op {
        self.op
    }

    /// The job's key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// What one accept attempt answered: the attempt's id (to settle it with
/// [`JobQueue::cancel`] when the answer is an error that may hide a queued
/// job), and the answer.
pub type AcceptAnswer = (Arc<str>, Result<Accepted, StoreError>);

/// What accepting needs, shared with the group-commit tasks.
struct Core {
    conn: Conn,
    /// Replicas each accepted job must reach (`KVQ_QUEUE_REDIS_WAIT_REPLICAS`).
    wait: Option<WaitReplicas>,
    namespace: String,
    retention_secs: i64,
}

/// The producer side of kvq's queue: records and pushes jobs.
///
/// Single writes are group-committed ([`crate::group`]), one lane per
/// partition: the jobs waiting for a partition, up to [`MAX_GROUP_JOBS`] and
/// about 1 MiB, are queued with one script call (and one `WAIT`) while the
/// next group gathers. A job's accept answers once its own group is in the
/// queue Redis.
#[derive(Clone)]
pub struct JobQueue {
    core: Arc<Core>,
    groups: GroupCommit<Arc<Core>>,
    partitions: u16,
}

impl JobQueue {
    /// The queue on the queue Redis reached through `conn`; with `wait`, a
    /// job counts as accepted only once that many replicas have it.
    pub fn new(conn: Conn, config: &Config, wait: Option<WaitReplicas>) -> Self {
        let records = JobRecords::new(conn.clone(), config);
        let core = Arc::new(Core {
            conn,
            wait,
            namespace: config.namespace.clone(),
            retention_secs: records.retention_secs(),
        });
        let lanes = if core.conn.is_cluster() {
            usize::from(config.queue_partitions)
        } else {
            1
        };
        let limits = Limits {
            items: MAX_GROUP_JOBS,
            bytes: MAX_GROUP_BYTES,
            stale_after: config.redis_timeout,
        };
        Self {
            // One lane per partition on a cluster (a partition is a slot);
            // one on a single server, whose pipeline holds one call per
            // partition.
            groups: GroupCommit::new(core.clone(), lanes, limits),
            core,
            partitions: config.queue_partitions,
        }
    }

    /// Replicas each accepted job (and `Idempotency-Key` claim) must reach.
    pub fn wait(&self) -> Option<WaitReplicas> {
        self.core.wait
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

    /// `job`, ready to be queued (its JSON made once): as a new job or a
    /// dead one queued again; an `idempotent` job (one with an
    /// `Idempotency-Key`) is remembered as queued for as long as its key
    /// lives, even when its record expires sooner.
    pub fn prepare(
        &self,
        job: &ApplyJob,
        how: Queueing,
        idempotent: bool,
    ) -> Result<Prepared, StoreError> {
        let partition = self.partition_of(&job.id, &job.key)?;
        let json = serde_json::to_string(job).map_err(|e| StoreError::Queue(e.to_string()))?;
        Ok(Prepared {
            partition,
            id: job.id.clone(),
            op: job.op,
            key: job.key.clone(),
            enqueued_at: job.enqueued_at,
            request_id: job.request_id.clone(),
            json,
            how,
            mark_for: if idempotent {
                crate::jobs::IDEMPOTENCY_TTL.as_secs()
            } else {
                0
            },
        })
    }

    /// Queues `job` with the next group commit of its partition: records it
    /// as `queued` and appends it to the stream, giving it its `seq`, unless
    /// its group's attempt was cancelled ([`JobQueue::cancel`]) or, for a
    /// new job, a job with its id is there already. Answers the attempt's
    /// id with the answer, so that an answer lost in transit can be settled.
    #[tracing::instrument(skip_all, fields(job_id = %job.id))]
    pub async fn accept(&self, job: &ApplyJob, how: Queueing, idempotent: bool) -> AcceptAnswer {
        let prepared = match self.prepare(job, how, idempotent) {
            Ok(prepared) => prepared,
            Err(e) => return (Arc::from(""), Err(e)),
        };
        let p = usize::from(prepared.partition);
        self.groups.submit(p, prepared).await
    }

    /// Queues `jobs`, all of partition `p`, in order, with one script call
    /// (all or nothing) under `attempt`, and answers what each found; with
    /// `WAIT` configured, only once that many replicas have them. At most
    /// [`MAX_GROUP_JOBS`] jobs.
    pub async fn accept_group(
        &self,
        p: u16,
        attempt: &str,
        jobs: &[&Prepared],
    ) -> Result<Vec<Accepted>, StoreError> {
        self.core.accept_group(p, attempt, jobs).await
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
        let ns = &self.core.namespace;
        let p = keys::job_partition(job_id).ok_or_else(|| bad_id(job_id))?;
        let record = keys::job_key(ns, job_id).ok_or_else(|| bad_id(job_id))?;
        let answer: Vec<String> = CANCEL
            .key(record)
            .key(keys::cancelled_key(ns, p, attempt))
            .key(keys::queued_key(ns, p, job_id))
            .arg(attempt)
            .arg(CANCELLED_FOR.as_secs())
            .arg(how.as_str())
            .invoke_async(&mut self.core.conn.clone())
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
            cmds.push(redis::Cmd::xlen(keys::stream_key(&self.core.namespace, p)));
            cmds.push(redis::Cmd::zcard(keys::dead_set(&self.core.namespace, p)));
        }
        let counts = query_all(&self.core.conn, cmds)
            .await?
            .into_iter()
            .map(redis::FromRedisValue::from_redis_value)
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|e| StoreError::Corrupt(format!("a queue depth: {e}")))?;
        let queued = counts.iter().step_by(2).sum();
        let dead = counts.iter().skip(1).step_by(2).sum();
        Ok((queued, dead))
    }

    /// What the queue holds: per partition its depth, lag, owner and
    /// counters, and the workers that heartbeat within `live_for` (one
    /// script call per partition, in one pipeline on one server).
    #[tracing::instrument(skip(self))]
    pub async fn stats(&self, live_for: Duration) -> Result<super::QueueStats, StoreError> {
        super::stats::read(
            &self.core.conn,
            &self.core.namespace,
            self.partitions,
            live_for,
        )
        .await
    }

    /// Answers `PING` on the queue Redis.
    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.core.conn.ping().await?)
    }
}

impl Flush for Arc<Core> {
    type Item = Prepared;
    type Answer = AcceptAnswer;

    /// One pipeline of one accept call per partition among `jobs` (on a
    /// cluster, a lane is a partition: one call).
    fn flush(&self, _: usize, jobs: Vec<Prepared>) -> BoxFuture<'_, Vec<AcceptAnswer>> {
        async move {
            let attempt: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
            // The partitions in order of first appearance, each with its
            // jobs in order.
            let mut by_partition: Vec<(u16, Vec<usize>)> = Vec::new();
            for (i, job) in jobs.iter().enumerate() {
                match by_partition.iter_mut().find(|(p, _)| *p == job.partition) {
                    Some((_, members)) => members.push(i),
                    None => by_partition.push((job.partition, vec![i])),
                }
            }
            let refs: Vec<(u16, Vec<&Prepared>)> = by_partition
                .iter()
                .map(|(p, members)| (*p, members.iter().map(|&i| &jobs[i]).collect()))
                .collect();
            let groups: Vec<(u16, &[&Prepared])> =
                refs.iter().map(|(p, jobs)| (*p, jobs.as_slice())).collect();
            let mut answers: Vec<AcceptAnswer> = jobs
                .iter()
                .map(|_| (attempt.clone(), Err(StoreError::Queue("unanswered".into()))))
                .collect();
            match self.accept_groups(&attempt, &groups).await {
                Ok(found) => {
                    for ((_, members), found) in by_partition.iter().zip(found) {
                        for (&i, found) in members.iter().zip(found) {
                            answers[i].1 = Ok(found);
                        }
                    }
                }
                Err(e) => {
                    for answer in &mut answers {
                        answer.1 = Err(e.clone());
                    }
                }
            }
            answers
        }
        .boxed()
    }

    fn bytes(job: &Prepared) -> usize {
        job.json.len()
    }

    fn unsent(_: Prepared, why: &str) -> AcceptAnswer {
        (Arc::from(""), Err(StoreError::Unsent(why.to_owned())))
    }

    fn lost() -> AcceptAnswer {
        // Sent or not: the caller cannot settle it (no attempt to cancel).
        (Arc::from(""), Err(StoreError::Timeout(Duration::ZERO)))
    }
}

impl Core {
    async fn accept_group(
        &self,
        p: u16,
        attempt: &str,
        jobs: &[&Prepared],
    ) -> Result<Vec<Accepted>, StoreError> {
        let mut groups = self.accept_groups(attempt, &[(p, jobs)]).await?;
        Ok(groups.pop().unwrap_or_default())
    }

    /// Queues each group of `groups` (its partition, and jobs of that
    /// partition) with one call of the accept script, all in one pipeline
    /// (and one `WAIT`), under `attempt`: what each group's jobs found.
    /// On a cluster, `groups` must be of one partition (one slot).
    async fn accept_groups(
        &self,
        attempt: &str,
        groups: &[(u16, &[&Prepared])],
    ) -> Result<Vec<Vec<Accepted>>, StoreError> {
        let ns = &self.namespace;
        let mut pipe = redis::pipe();
        for (p, jobs) in groups {
            let p = *p;
            if jobs.iter().any(|job| job.partition != p) || jobs.len() > MAX_GROUP_JOBS {
                return Err(StoreError::Queue(format!(
                    "a group of {} jobs not all of partition {p}",
                    jobs.len()
                )));
            }
            // EVALSHA built as one command: each job's JSON, up to the value
            // limit, is copied once into it (a script invocation copies it
            // twice), which is what bounds the API's memory per write.
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(ACCEPT.get_hash())
                .arg(4 + 2 * jobs.len())
                .arg(keys::stream_key(ns, p))
                .arg(keys::cancelled_key(ns, p, attempt))
                .arg(keys::last_seq_key(ns, p))
                .arg(keys::counts_key(ns, p));
            for job in *jobs {
                cmd.arg(keys::job_key(ns, &job.id).ok_or_else(|| bad_id(&job.id))?)
                    .arg(keys::queued_key(ns, p, &job.id));
            }
            cmd.arg(self.retention_secs).arg(attempt).arg(jobs.len());
            for job in *jobs {
                cmd.arg(&job.id)
                    .arg(job.op.as_str())
                    .arg(&job.key)
                    .arg(job.enqueued_at)
                    .arg(&job.request_id)
                    .arg(&job.json)
                    .arg(job.how.as_str())
                    .arg(job.mark_for);
            }
            pipe.add_command(cmd);
        }
        // With WAIT: the scripts and WAIT in one round trip, on the
        // partitions' node.
        if let Some(wait) = self.wait {
            wait.append(&mut pipe);
        }
        let mut answers: Vec<redis::Value> = query_loading(&self.conn, &pipe, &ACCEPT).await?;
        let corrupt = |what: &str| StoreError::Corrupt(format!("accept answers: {what}"));
        let confirmed = match self.wait {
            Some(_) => {
                let last = answers.pop().ok_or_else(|| corrupt("no WAIT answer"))?;
                Some(redis::from_redis_value::<i64>(last).map_err(|e| corrupt(&e.to_string()))?)
            }
            None => None,
        };
        if answers.len() != groups.len() {
            return Err(corrupt("one per group expected"));
        }
        let mut found = Vec::with_capacity(groups.len());
        for (answer, (_, jobs)) in answers.into_iter().zip(groups) {
            let answer: Vec<Vec<String>> =
                redis::from_redis_value(answer).map_err(|e| corrupt(&e.to_string()))?;
            if answer.len() != jobs.len() {
                return Err(corrupt("one per job expected"));
            }
            found.push(
                answer
                    .iter()
                    .map(|a| Accepted::parse(a))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        // A job queued before (a repeat) counts as accepted only once
        // replicated, like a new one.
        if let (Some(wait), Some(confirmed)) = (self.wait, confirmed) {
            let cancelled = found
                .iter()
                .flatten()
                .all(|a| matches!(a, Accepted::Cancelled));
            if !cancelled && confirmed < i64::from(wait.replicas) {
                return Err(wait.short(confirmed));
            }
        }
        Ok(found)
    }
}
