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

use redis::{AsyncCommands, Script};
use serde_json::value::RawValue;

use crate::connection::{Conn, WaitReplicas, query_loading};
use crate::error::StoreError;
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
    /// Replicas each applied write must reach (`KVQ_KV_REDIS_WAIT_REPLICAS`).
    wait: Option<WaitReplicas>,
    namespace: String,
    apply_script: Script,
    list_script: Script,
}

impl KvStore {
    /// The store under `namespace` on `conn`; with `wait`, an applied write
    /// counts only once that many replicas have it.
    pub fn new(conn: Conn, namespace: &str, wait: Option<WaitReplicas>) -> Self {
        Self {
            conn,
            wait,
            namespace: namespace.to_owned(),
            apply_script: Script::new(include_str!("scripts/apply.lua")),
            list_script: Script::new(include_str!("scripts/list.lua")),
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
    /// that a newer owner of its partition has applied in its bucket.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, seq = job.seq))]
    pub async fn apply(&self, job: &ApplyJob, now_ms: i64) -> Result<Applied, StoreError> {
        let ttl_ms = job.ttl_seconds.unwrap_or(0).saturating_mul(1000);
        let bucket = keys::bucket(&job.key);
        let mut invocation = self.apply_script.prepare_invoke();
        invocation
            .key(keys::value_key(&self.namespace, &job.key))
            .key(keys::meta_key(&self.namespace, &job.key))
            .key(keys::index_key(&self.namespace, bucket))
            .key(keys::expiry_key(&self.namespace, bucket))
            .key(keys::fence_key(&self.namespace, bucket))
            .arg(job.op.as_str())
            .arg(&job.id)
            .arg(job.value.as_ref().map_or("null", |v| v.get()))
            .arg(ttl_ms)
            .arg(job.if_match.map(|v| v.to_string()).unwrap_or_default())
            .arg(now_ms)
            .arg(job.generation)
            .arg(REMEMBERED_OUTCOMES)
            .arg(job.seq)
            .arg(&job.key)
            .arg(keys::value_key_prefix(&self.namespace, bucket))
            .arg(if self.wait.is_some() { "1" } else { "" });
        let mut conn = self.conn.clone();
        let Some(wait) = self.wait else {
            let answer: Vec<String> = invocation.invoke_async(&mut conn).await?;
            return Self::applied(answer);
        };
        // The script and WAIT in one round trip, on the key's node.
        let mut pipe = redis::pipe();
        pipe.invoke_script(&invocation);
        let (answer, confirmed): (Vec<String>, i64) =
            wait.query(&self.conn, pipe, &self.apply_script).await?;
        let applied = Self::applied(answer)?;
        // A fenced job changed nothing: there is nothing to replicate.
        if confirmed < i64::from(wait.replicas) && !matches!(applied, Applied::Fenced(_)) {
            return Err(wait.short(confirmed));
        }
        Ok(applied)
    }

    /// The apply script's answer.
    fn applied(answer: Vec<String>) -> Result<Applied, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("apply answer {answer:?}"));
        let outcome = |s: &str| Outcome::parse(s).ok_or_else(corrupt);
        match answer.as_slice() {
            [kind, detail] if kind == "done" => Ok(Applied::Done(outcome(detail)?)),
            [kind, detail] if kind == "dup" => Ok(Applied::Duplicate(outcome(detail)?)),
            [kind, fence] if kind == "fenced" => {
                Ok(Applied::Fenced(fence.parse().map_err(|_| corrupt())?))
            }
            _ => Err(corrupt()),
        }
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
