//! The KV Redis: reads, sequence numbers, and the atomic apply script.
//!
//! Per user key there are two Redis keys in one hash slot (see
//! [`crate::keys`]): the live value (a hash, with Redis' expiry as the TTL) and
//! the metadata (a hash that outlives delete and expiry, so versions never
//! repeat). Every write goes through `scripts/apply.lua`, which checks the
//! job's `seq` against the key's last applied `seq`: a redelivered job reports
//! the outcome recorded the first time and changes nothing, and a job whose
//! predecessor has not been applied yet is told to wait.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde_json::value::RawValue;

use crate::config::RedisUrl;
use crate::error::StoreError;
use crate::jobs::{ApplyJob, Outcome};
use crate::keys;

/// How many recent outcomes the metadata remembers for redelivered jobs.
const REMEMBERED_OUTCOMES: u64 = 64;

/// Marks ARGV[1] abandoned in meta key KEYS[1] unless it was applied already.
const ABANDON_SCRIPT: &str = r"
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') then
  redis.call('HSET', KEYS[1], 'x:' .. ARGV[1], '1')
end
";

/// Chooses aws-lc-rs as the process' rustls crypto provider, which
/// `rediss://` connections need. Call once at start, before any Redis client
/// connects; a provider installed already is kept.
pub fn install_tls_provider() {
    // Err only means a provider is installed already: keep it.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Checks a Redis URL and makes a client for it (no connection yet).
///
/// A `rediss://` URL connects over TLS and verifies the server's certificate
/// against the system's roots, or those of `SSL_CERT_FILE` / `SSL_CERT_DIR`
/// when set (rustls-native-certs). `rediss://host/#insecure` skips the
/// verification: for tests only, and warned about here.
pub fn client(url: &RedisUrl) -> Result<redis::Client, StoreError> {
    let client = redis::Client::open(url.expose())?;
    if let redis::ConnectionAddr::TcpTls { insecure: true, .. } =
        client.get_connection_info().addr()
    {
        tracing::warn!(
            redis = %url,
            "#insecure: this Redis' TLS certificate is not verified; use it only in tests"
        );
    }
    Ok(client)
}

/// Opens a lazily connected, self-reconnecting, multiplexed Redis connection
/// (faster than a pool here). Its I/O task runs on the runtime that first
/// uses it, so give each thread-per-core runtime its own.
///
/// `timeout` bounds each command; connecting is bounded by the same time or
/// 2 s, whichever is shorter.
pub fn manager(client: &redis::Client, timeout: Duration) -> Result<ConnectionManager, StoreError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout.min(Duration::from_secs(2))))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_lazy_with_config(
        client.clone(),
        config,
    )?)
}

/// [`client`] and [`manager`] in one step.
pub fn connect(url: &RedisUrl, timeout: Duration) -> Result<ConnectionManager, StoreError> {
    manager(&client(url)?, timeout)
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
    Done {
        /// What happened.
        outcome: Outcome,
        /// Earlier `seq`s of the key that were given up on (the gap timeout
        /// passed without them); usually 0.
        skipped: u64,
    },
    /// Applied before (a redelivery); the outcome recorded then, if still
    /// remembered, or `None` if the job's `seq` was skipped over.
    Duplicate(Option<Outcome>),
    /// An earlier `seq` of this key has not been applied yet.
    Wait {
        /// The key's last applied `seq`.
        applied: u64,
    },
}

/// The KV Redis.
#[derive(Clone)]
pub struct KvStore {
    conn: ConnectionManager,
    namespace: String,
    apply_script: Script,
    abandon_script: Script,
}

impl KvStore {
    /// The store under `namespace` on `conn`.
    pub fn new(conn: ConnectionManager, namespace: &str) -> Self {
        Self {
            conn,
            namespace: namespace.to_owned(),
            apply_script: Script::new(include_str!("scripts/apply.lua")),
            abandon_script: Script::new(ABANDON_SCRIPT),
        }
    }

    /// Answers `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
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

    /// Hands out the key's next sequence number (1, 2, 3, ...).
    #[tracing::instrument(skip(self))]
    pub async fn next_seq(&self, key: &str) -> Result<u64, StoreError> {
        let seq = self
            .conn
            .clone()
            .hincr(keys::meta_key(&self.namespace, key), "next", 1)
            .await?;
        Ok(seq)
    }

    /// What the write with `seq` did to `key`, if it was applied and its
    /// outcome is still remembered (the last 64 are).
    #[tracing::instrument(skip(self))]
    pub async fn outcome_of(&self, key: &str, seq: u64) -> Result<Option<Outcome>, StoreError> {
        let recorded: Option<String> = self
            .conn
            .clone()
            .hget(keys::meta_key(&self.namespace, key), format!("r:{seq}"))
            .await?;
        Ok(recorded.as_deref().and_then(Outcome::parse))
    }

    /// Marks `seq` of `key` as handed out but never queued, so the key's later
    /// writes do not wait for it.
    #[tracing::instrument(skip(self))]
    pub async fn abandon_seq(&self, key: &str, seq: u64) -> Result<(), StoreError> {
        let _: () = self
            .abandon_script
            .key(keys::meta_key(&self.namespace, key))
            .arg(seq)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Applies `job` atomically, in `seq` order: if an earlier `seq` of the
    /// key is missing, answers [`Applied::Wait`], unless the key has made no
    /// progress for `gap_timeout` (since its last apply or this job's enqueue,
    /// whichever is later); then the missing `seq`s are skipped for good.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, seq = job.seq))]
    pub async fn apply(
        &self,
        job: &ApplyJob,
        gap_timeout: Duration,
        now_ms: i64,
    ) -> Result<Applied, StoreError> {
        let ttl_ms = job.ttl_seconds.unwrap_or(0).saturating_mul(1000);
        let answer: Vec<String> = self
            .apply_script
            .key(keys::value_key(&self.namespace, &job.key))
            .key(keys::meta_key(&self.namespace, &job.key))
            .arg(job.op.as_str())
            .arg(job.seq)
            .arg(job.value.as_ref().map_or("null", |v| v.get()))
            .arg(ttl_ms)
            .arg(job.if_match.map(|v| v.to_string()).unwrap_or_default())
            .arg(now_ms)
            .arg(u64::try_from(gap_timeout.as_millis()).unwrap_or(u64::MAX))
            .arg(REMEMBERED_OUTCOMES)
            .arg(job.enqueued_at)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let corrupt = || StoreError::Corrupt(format!("apply answer {answer:?}"));
        let outcome = |s: &str| Outcome::parse(s).ok_or_else(corrupt);
        match answer.as_slice() {
            [kind, detail, skipped] if kind == "done" => Ok(Applied::Done {
                outcome: outcome(detail)?,
                skipped: skipped.parse().map_err(|_| corrupt())?,
            }),
            [kind, detail] if kind == "dup" && detail.is_empty() => Ok(Applied::Duplicate(None)),
            [kind, detail] if kind == "dup" => Ok(Applied::Duplicate(Some(outcome(detail)?))),
            [kind, detail] if kind == "wait" => Ok(Applied::Wait {
                applied: detail.parse().map_err(|_| corrupt())?,
            }),
            _ => Err(corrupt()),
        }
    }

    /// Lists live user keys starting with `prefix`, at most about `limit` per
    /// page, in no particular order. `cursor` is the previous page's
    /// `next_cursor` (`None` for the first page); the returned cursor is
    /// `None` on the last page.
    #[tracing::instrument(skip(self))]
    pub async fn list(
        &self,
        prefix: &str,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), StoreError> {
        let pattern = keys::value_key_pattern(&self.namespace, prefix);
        let mut conn = self.conn.clone();
        let mut cursor = cursor.unwrap_or(0);
        let mut found = Vec::new();
        // Bounded: each round asks Redis to look at `count` keys.
        let count = limit.clamp(10, 1_000);
        for _ in 0..64 {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut conn)
                .await?;
            found.extend(
                batch
                    .iter()
                    .filter_map(|k| keys::user_key_of(&self.namespace, k)),
            );
            cursor = next;
            if cursor == 0 || found.len() >= limit {
                break;
            }
        }
        found.sort();
        found.dedup();
        Ok((found, (cursor != 0).then_some(cursor)))
    }
}
