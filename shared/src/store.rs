//! The KV Redis: reads, the atomic apply script, listing.
//!
//! Per user key there are two Redis keys in one hash slot (see
//! [`crate::keys`]): the live value (a hash, with Redis' expiry as the TTL) and
//! the metadata (a hash that outlives delete and expiry, so versions never
//! repeat). Every write goes through `scripts/apply.lua`, which checks the
//! job's `seq` against the key's last applied `seq`: a redelivered job reports
//! the outcome recorded the first time and changes nothing, and a job whose
//! predecessor has not been applied yet is told to wait. The same script keeps
//! the key's bucket's index (a sorted set of its keys, read by
//! `scripts/list.lua`) and expiry set up to date, in the same slot.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use redis::{AsyncCommands, Script};
use serde_json::value::RawValue;

use crate::connection::{Conn, WaitReplicas, query_loading};
use crate::error::StoreError;
use crate::group::{Flush, GroupCommit, Limits};
use crate::jobs::{ApplyJob, Outcome};
use crate::keys;

/// How many recent job outcomes the metadata remembers for redelivered
/// jobs: more than the uncommitted jobs a partition owner may hold per key
/// ([`crate::queue::StreamsConfig::max_uncommitted_per_key`]).
const REMEMBERED_OUTCOMES: u64 = 64;

/// Entries a bucket may examine beyond the keys it returns, before it
/// stops (expired keys not yet cleaned up cost this much per page at most).
const LIST_EXAMINE_SLACK: usize = 64;

/// Chooses aws-lc-rs as the process' rustls crypto provider, which
/// `rediss://` connections need. Call once at start, before any Redis client
/// connects; a provider installed already is kept.
pub fn install_tls_provider() {
    // Err only means a provider is installed already: keep it.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A value hash's `v`, `ver`, `ts` and `exp` fields.
type ValueFields = (Option<String>, Option<u64>, Option<i64>, Option<i64>);

/// A live key as read.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The value, as the JSON text that was written.
    pub value: Box<RawValue>,
    /// The key's version (the ETag).
    pub version: u64,
    /// When the value was written, Unix ms.
    pub updated_at: i64,
    /// When the key expires, Unix ms; `None` if never.
    pub expires_at: Option<i64>,
}

/// What the apply script did with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied now (or failed for a business reason, which is also final).
    Done(Outcome),
    /// Applied before (a redelivery); the outcome recorded then.
    Duplicate(Outcome),
    /// Refused: a newer owner of the job's partition, of this generation,
    /// applied in the key's bucket.
    Fenced(u64),
}

/// The KV Redis.
#[derive(Clone)]
pub struct KvStore {
    conn: Conn,
    namespace: String,
    list_script: Script,
    /// Applies are group-committed ([`crate::group`]): the jobs waiting go
    /// in one call of the apply script, one lane per hash slot on a
    /// cluster, one lane on one server.
    applies: GroupCommit<Applier>,
}

/// Jobs one apply script call applies at most.
const MAX_APPLY_GROUP: usize = 64;

/// Bytes of values one apply call carries, about (its first job always
/// goes).
const MAX_APPLY_BYTES: usize = 1_048_576;

/// What applying needs, shared with the group-commit tasks.
struct Applier {
    conn: Conn,
    /// Replicas each applied write must reach (`KVQ_KV_REDIS_WAIT_REPLICAS`).
    wait: Option<WaitReplicas>,
    script: Script,
}

/// A job's part of an apply script call: its 5 keys and 10 arguments.
struct ApplyArgs {
    keys: [String; 5],
    op: &'static str,
    id: String,
    value: String,
    ttl_ms: u64,
    if_match: String,
    now_ms: i64,
    generation: u64,
    seq: u64,
    key: String,
    prefix: String,
}

impl KvStore {
    /// The store under `namespace` on `conn`; with `wait`, an applied write
    /// counts only once that many replicas have it.
    ///
    /// `timeout` is the Redis response timeout: an apply that waited that
    /// long for its group to be sent (the data Redis stalls) is not sent,
    /// and answers a timeout.
    pub fn new(conn: Conn, namespace: &str, wait: Option<WaitReplicas>, timeout: Duration) -> Self {
        let lanes = if conn.is_cluster() {
            usize::from(keys::BUCKETS)
        } else {
            1
        };
        let applier = Applier {
            conn: conn.clone(),
            wait,
            script: Script::new(include_str!("scripts/apply.lua")),
        };
        let limits = Limits {
            items: MAX_APPLY_GROUP,
            bytes: MAX_APPLY_BYTES,
            stale_after: timeout,
        };
        Self {
            conn,
            namespace: namespace.to_owned(),
            list_script: Script::new(include_str!("scripts/list.lua")),
            applies: GroupCommit::new(applier, lanes, limits),
        }
    }

    /// Answers `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.conn.ping().await?)
    }

    /// Reads a live key; `None` if absent or expired.
    #[tracing::instrument(skip(self))]
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let vkey = keys::value_key(&self.namespace, key);
        // One HMGET: the apply script keeps the expiry in the hash too.
        let (value, version, updated_at, expires_at): ValueFields = self
            .conn
            .clone()
            .hmget(&vkey, &["v", "ver", "ts", "exp"])
            .await?;
        let (Some(value), Some(version), Some(updated_at)) = (value, version, updated_at) else {
            return Ok(None);
        };
        let value = RawValue::from_string(value)
            .map_err(|_| StoreError::Corrupt(format!("value of {vkey} is not JSON")))?;
        Ok(Some(Entry {
            value,
            version,
            updated_at,
            expires_at,
        }))
    }

    /// What job `job_id` did to `key`, if it was applied and its outcome is
    /// still remembered (those of the key's last 64 applied jobs are).
    #[tracing::instrument(skip(self))]
    pub async fn outcome_of(&self, key: &str, job_id: &str) -> Result<Option<Outcome>, StoreError> {
        let recorded: Option<String> = self
            .conn
            .clone()
            .hget(keys::meta_key(&self.namespace, key), format!("r:{job_id}"))
            .await?;
        Ok(recorded.as_deref().and_then(Outcome::parse))
    }

    /// Applies `job` atomically and exactly once (see the module's doc):
    /// answers what it did, what it did the first time (a redelivery), or
    /// that a newer owner of its partition has applied in its bucket. The
    /// jobs applied at the same time go together, in one script call.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, seq = job.seq))]
    pub async fn apply(&self, job: &ApplyJob, now_ms: i64) -> Result<Applied, StoreError> {
        let bucket = keys::bucket(&job.key);
        let ns = &self.namespace;
        let args = ApplyArgs {
            keys: [
                keys::value_key(ns, &job.key),
                keys::meta_key(ns, &job.key),
                keys::index_key(ns, bucket),
                keys::expiry_key(ns, bucket),
                keys::fence_key(ns, bucket),
            ],
            op: job.op.as_str(),
            id: job.id.clone(),
            value: job.value.as_ref().map_or("null", |v| v.get()).to_owned(),
            ttl_ms: job.ttl_seconds.unwrap_or(0).saturating_mul(1000),
            if_match: job.if_match.map(|v| v.to_string()).unwrap_or_default(),
            now_ms,
            generation: job.generation,
            seq: job.seq,
            key: job.key.clone(),
            prefix: keys::value_key_prefix(ns, bucket),
        };
        self.applies.submit(usize::from(bucket), args).await
    }

    /// Lists live user keys starting with `prefix`, in byte order, after
    /// `after` (the last key of the previous page; `None` for the first
    /// page). Answers up to `limit` keys and the key to continue after, or
    /// `None` when the listing is complete.
    ///
    /// Each of the [`keys::BUCKETS`] buckets' indexes is asked, in one
    /// pipeline, for its next `f = max(ceil(2 * limit / BUCKETS), 4)` live
    /// keys of the range (`scripts/list.lua`, examining at most `f + 64`
    /// entries and dropping expired ones it meets), so a page costs
    /// O(BUCKETS * log N + page), whatever the keyspace holds.
    ///
    /// Why no key is skipped or repeated: a bucket that may hold more keys
    /// returns every live key of the range up to the last entry it examined,
    /// `L_b`; one that does not, every live key of the range. With `bound`
    /// the smallest `L_b`, the keys returned that are `<= bound` are
    /// therefore exactly the live keys in `(after, bound]`, and the page is
    /// the first `limit` of them, sorted. The next page starts after the
    /// page's last key, so every key in `(after, last]` was on this page and
    /// none of them will be again: cursors only grow.
    ///
    /// Why a page is empty only at the end: the bucket whose `L_b` is
    /// `bound` stopped either with `f` live keys, its last one being
    /// `bound` itself (then on the page), or on its examine budget, having
    /// met only expired keys. In that second case the page may be empty;
    /// then there is no live key in `(after, bound]` and the expired
    /// entries met were removed, so the listing goes on from `bound` at
    /// once, in this call. The work that costs is paid once per expired
    /// key.
    #[tracing::instrument(skip(self))]
    pub async fn list(
        &self,
        prefix: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), StoreError> {
        let limit = limit.max(1);
        let per_bucket = (2 * limit).div_ceil(usize::from(keys::BUCKETS)).max(4);
        let end = range_end(prefix.as_bytes());
        let mut after = after.map(str::to_owned);
        loop {
            let start = range_start(prefix, after.as_deref());
            let mut found = Vec::new();
            let mut bound: Option<String> = None;
            for (mut keys, more_after) in self.list_buckets(&start, &end, per_bucket).await? {
                found.append(&mut keys);
                if let Some(last) = more_after
                    && bound.as_ref().is_none_or(|b| last < *b)
                {
                    bound = Some(last);
                }
            }
            if let Some(bound) = &bound {
                found.retain(|k| k <= bound);
            }
            // A key is in one bucket only: no duplicates to remove.
            found.sort_unstable();
            let cut = found.len() > limit;
            found.truncate(limit);
            match (found.last(), bound) {
                (None, Some(bound)) => after = Some(bound),
                (None, None) => return Ok((found, None)),
                (Some(last), bound) => {
                    let next = (cut || bound.is_some()).then(|| last.clone());
                    return Ok((found, next));
                }
            }
        }
    }

    /// Runs the list script on every bucket, in one pipeline. Per bucket:
    /// the live keys found, and the last entry examined if the bucket may
    /// hold more.
    async fn list_buckets(
        &self,
        start: &[u8],
        end: &[u8],
        per_bucket: usize,
    ) -> Result<Vec<(Vec<String>, Option<String>)>, StoreError> {
        let ns = &self.namespace;
        let conn = self.conn.clone();
        let answers: Vec<Vec<Vec<u8>>> = if conn.is_cluster() {
            // Buckets are slots spread over the masters: one script call
            // each, all at once.
            let calls = (0..keys::BUCKETS).map(|bucket| {
                let mut conn = conn.clone();
                let mut invocation = self.list_script.prepare_invoke();
                invocation
                    .key(keys::index_key(ns, bucket))
                    .key(keys::expiry_key(ns, bucket))
                    .arg(keys::value_key_prefix(ns, bucket))
                    .arg(start)
                    .arg(end)
                    .arg(per_bucket)
                    .arg(per_bucket + LIST_EXAMINE_SLACK);
                async move { invocation.invoke_async(&mut conn).await }
            });
            futures::future::try_join_all(calls).await?
        } else {
            let mut pipe = redis::pipe();
            for bucket in 0..keys::BUCKETS {
                pipe.cmd("EVALSHA")
                    .arg(self.list_script.get_hash())
                    .arg(2)
                    .arg(keys::index_key(ns, bucket))
                    .arg(keys::expiry_key(ns, bucket))
                    .arg(keys::value_key_prefix(ns, bucket))
                    .arg(start)
                    .arg(end)
                    .arg(per_bucket)
                    .arg(per_bucket + LIST_EXAMINE_SLACK);
            }
            query_loading(&conn, &pipe, &self.list_script).await?
        };
        let text = |bytes: Vec<u8>| {
            String::from_utf8(bytes)
                .map_err(|_| StoreError::Corrupt("a listed key is not UTF-8".into()))
        };
        answers
            .into_iter()
            .map(|answer| {
                let mut answer = answer.into_iter();
                let (Some(more), Some(last)) = (answer.next(), answer.next()) else {
                    return Err(StoreError::Corrupt("short list answer".into()));
                };
                let keys = answer.map(text).collect::<Result<Vec<_>, _>>()?;
                let more_after = (more == b"1").then(|| text(last)).transpose()?;
                Ok((keys, more_after))
            })
            .collect()
    }
}

impl Flush for Applier {
    type Item = ApplyArgs;
    type Answer = Result<Applied, StoreError>;

    fn flush(
        &self,
        _: usize,
        jobs: Vec<ApplyArgs>,
    ) -> BoxFuture<'_, Vec<Result<Applied, StoreError>>> {
        async move {
            match self.apply_group(&jobs).await {
                Ok(applied) => applied,
                Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
            }
        }
        .boxed()
    }

    fn bytes(job: &ApplyArgs) -> usize {
        job.value.len()
    }

    fn unsent(_: ApplyArgs, why: &str) -> Result<Applied, StoreError> {
        Err(StoreError::Unsent(why.to_owned()))
    }

    fn lost() -> Result<Applied, StoreError> {
        Err(StoreError::Timeout(Duration::ZERO))
    }
}

impl Applier {
    /// One call of the apply script for `jobs` (all of one slot on a
    /// cluster), and `WAIT` with it if configured: each job's answer.
    async fn apply_group(
        &self,
        jobs: &[ApplyArgs],
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(5 * jobs.len());
        for job in jobs {
            cmd.arg(&job.keys[..]);
        }
        cmd.arg(REMEMBERED_OUTCOMES)
            .arg(if self.wait.is_some() { "1" } else { "" })
            .arg(jobs.len());
        for job in jobs {
            cmd.arg(job.op)
                .arg(&job.id)
                .arg(&job.value)
                .arg(job.ttl_ms)
                .arg(&job.if_match)
                .arg(job.now_ms)
                .arg(job.generation)
                .arg(job.seq)
                .arg(&job.key)
                .arg(&job.prefix);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        // With WAIT: the script and WAIT in one round trip, on the slot's
        // node, and how many replicas confirmed if fewer than asked.
        let (answers, short): (Vec<Vec<String>>, Option<i64>) = match self.wait {
            None => {
                let (answers,) = query_loading(&self.conn, &pipe, &self.script).await?;
                (answers, None)
            }
            Some(wait) => {
                let (answers, confirmed): (_, i64) =
                    wait.query(&self.conn, pipe, &self.script).await?;
                (
                    answers,
                    (confirmed < i64::from(wait.replicas)).then_some(confirmed),
                )
            }
        };
        if answers.len() != jobs.len() {
            return Err(StoreError::Corrupt(format!(
                "the apply script answered {} jobs of {}",
                answers.len(),
                jobs.len()
            )));
        }
        Ok(answers
            .iter()
            .map(|answer| {
                let applied = applied(answer)?;
                match (short, self.wait) {
                    // A fenced job changed nothing: nothing to replicate.
                    (Some(confirmed), Some(wait)) if !matches!(applied, Applied::Fenced(_)) => {
                        Err(wait.short(confirmed))
                    }
                    _ => Ok(applied),
                }
            })
            .collect())
    }
}

/// The apply script's answer for one job.
fn applied(answer: &[String]) -> Result<Applied, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("apply answer {answer:?}"));
    let outcome = |s: &str| Outcome::parse(s).ok_or_else(corrupt);
    match answer {
        [kind, detail] if kind == "done" => Ok(Applied::Done(outcome(detail)?)),
        [kind, detail] if kind == "dup" => Ok(Applied::Duplicate(outcome(detail)?)),
        [kind, fence] if kind == "fenced" => {
            Ok(Applied::Fenced(fence.parse().map_err(|_| corrupt())?))
        }
        _ => Err(corrupt()),
    }
}

/// The `ZRANGEBYLEX` start of a listing: after the cursor key when there is
/// one at or past the prefix (`(<after>`), else from the prefix on
/// (`[<prefix>`, or `-` for no prefix).
fn range_start(prefix: &str, after: Option<&str>) -> Vec<u8> {
    match after {
        Some(after) if after >= prefix => [b"(", after.as_bytes()].concat(),
        _ if prefix.is_empty() => b"-".to_vec(),
        _ => [b"[", prefix.as_bytes()].concat(),
    }
}

/// The `ZRANGEBYLEX` end of a listing: before the smallest string greater
/// than every string starting with `prefix` (the prefix with trailing 0xff
/// bytes dropped and its last byte incremented), or `+` if there is none.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while end.last() == Some(&0xff) {
        end.pop();
    }
    match end.last_mut() {
        Some(last) => {
            *last += 1;
            [b"(", end.as_slice()].concat()
        }
        None => b"+".to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_holds_exactly_the_keys_with_the_prefix() {
        assert_eq!(range_end(b""), b"+");
        assert_eq!(range_end(b"a/"), b"(a0");
        assert_eq!(range_end(b"ab"), b"(ac");
        assert_eq!(range_end("é".as_bytes()), b"(\xc3\xaa");
        assert_eq!(range_end(b"a\xff\xff"), b"(b");
        assert_eq!(range_end(b"\xff"), b"+");
        // Every key with the prefix sorts before the end, the end after.
        let end = &range_end(b"a/")[1..];
        for key in ["a/", "a/b", "a/\u{10FFFF}"] {
            assert!(key.as_bytes() < end, "{key}");
        }
        assert!(b"a0".as_slice() >= end && b"ab".as_slice() >= end);
    }

    #[test]
    fn the_start_follows_the_cursor_only_inside_the_prefix() {
        assert_eq!(range_start("", None), b"-");
        assert_eq!(range_start("a/", None), b"[a/");
        assert_eq!(range_start("a/", Some("a/x")), b"(a/x");
        assert_eq!(range_start("a/", Some("a/")), b"(a/");
        assert_eq!(range_start("a/", Some("a")), b"[a/");
        assert_eq!(range_start("", Some("k")), b"(k");
    }
}
