//! What the queue holds, read for `GET /v1/stats` and the API's queue
//! gauges: per partition its depth, the age of its oldest job not yet final,
//! its owner and its counters; the live workers.
//!
//! One script call per partition (each partition's keys share a slot), and
//! one read of the workers set: on one server all in one pipeline, on a
//! cluster each on its own, all at once.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{FromRedisValue, Script, Value};

use crate::connection::{Conn, query_loading};
use crate::error::StoreError;
use crate::keys;

/// One partition's figures, by the queue Redis' clock. KEYS: stream, last
/// seq, done, lease, dead letters, counters. Answers {now (µs), depth,
/// the id of the first entry after done (or false), done, the lease (or
/// false), dead letters, accepted, done count, succeeded, failed}.
static PARTITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local done = redis.call('GET', KEYS[3]) or '0-0'
local first = redis.call('XRANGE', KEYS[1], '(' .. done, '+', 'COUNT', 1)[1]
local counts = redis.call('HMGET', KEYS[6], 'accepted', 'done', 'succeeded', 'failed')
return {now, redis.call('XLEN', KEYS[1]), first and first[1] or false, done,
  redis.call('GET', KEYS[4]) or false, redis.call('ZCARD', KEYS[5]),
  counts[1] or '0', counts[2] or '0', counts[3] or '0', counts[4] or '0'}
",
    )
});

/// One partition's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionStats {
    /// The partition.
    pub partition: u16,
    /// Jobs in its stream after the committed position: not yet final (or
    /// final within the last commit interval).
    pub depth: u64,
    /// When its oldest job not yet final was queued (its `seq`, the queue
    /// Redis' clock in µs); `None` when there is none.
    pub oldest_queued_us: Option<u64>,
    /// How long its oldest job not yet final has waited; zero when none.
    pub lag: Duration,
    /// The worker holding its lease, if any.
    pub owner: Option<String>,
    /// Its dead letters.
    pub dead: u64,
    /// Jobs queued in it, counted since the queue Redis first had the
    /// counter.
    pub accepted_total: u64,
    /// Jobs its committed position passed (final), counted likewise.
    pub done_total: u64,
    /// Jobs that ended `succeeded`, counted likewise.
    pub succeeded_total: u64,
    /// Jobs that ended `failed`, counted likewise.
    pub failed_total: u64,
}

/// A live worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStats {
    /// Its name.
    pub id: String,
    /// Its last heartbeat (Unix ms, the queue Redis' clock).
    pub last_heartbeat_ms: i64,
}

/// What the queue holds.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStats {
    /// When it was read (Unix ms, the queue Redis' clock).
    pub at_ms: i64,
    /// Every partition, in order.
    pub partitions: Vec<PartitionStats>,
    /// The workers that heartbeat within `live_for` of `at_ms`, by name.
    pub workers: Vec<WorkerStats>,
}

impl QueueStats {
    /// The partitions `worker` holds the lease of.
    pub fn partitions_of(&self, worker: &str) -> Vec<u16> {
        self.partitions
            .iter()
            .filter(|p| p.owner.as_deref() == Some(worker))
            .map(|p| p.partition)
            .collect()
    }
}

/// The worker that holds a lease: its value is `<worker>:<generation>:<nonce>`.
fn lease_owner(lease: &str) -> Option<String> {
    let mut parts = lease.rsplitn(3, ':');
    let (_nonce, _generation) = (parts.next()?, parts.next()?);
    parts.next().map(str::to_owned)
}

/// The seq of stream entry id `<seq>-<n>`.
fn entry_seq(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(seq, _)| seq.parse().ok())
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("queue stats: {what}"))
}

/// Reads one partition's answer to [`PARTITION`]: its figures and the
/// queue Redis' clock (µs).
fn parse_partition(p: u16, answer: Value) -> Result<(PartitionStats, u64), StoreError> {
    type Answer = (
        String,
        u64,
        Option<String>,
        String,
        Option<String>,
        u64,
        String,
        String,
        String,
        String,
    );
    let (now, depth, first, _done, lease, dead, accepted, done_count, succeeded, failed): Answer =
        FromRedisValue::from_redis_value(answer).map_err(corrupt)?;
    let number = |s: &str| s.parse::<u64>().map_err(|_| corrupt(format!("{s:?}")));
    let now_us = number(&now)?;
    let oldest = first.as_deref().and_then(entry_seq);
    let lag = oldest.map_or(Duration::ZERO, |seq| {
        Duration::from_micros(now_us.saturating_sub(seq))
    });
    Ok((
        PartitionStats {
            partition: p,
            depth,
            oldest_queued_us: oldest,
            lag,
            owner: lease.as_deref().and_then(lease_owner),
            dead,
            accepted_total: number(&accepted)?,
            done_total: number(&done_count)?,
            succeeded_total: number(&succeeded)?,
            failed_total: number(&failed)?,
        },
        now_us,
    ))
}

/// Reads the figures of `partitions` partitions under namespace `ns`, and
/// the workers that heartbeat within `live_for`.
pub(crate) async fn read(
    conn: &Conn,
    ns: &str,
    partitions: u16,
    live_for: Duration,
) -> Result<QueueStats, StoreError> {
    let calls: Vec<_> = (0..partitions)
        .map(|p| {
            let mut call = PARTITION.prepare_invoke();
            call.key(keys::stream_key(ns, p))
                .key(keys::last_seq_key(ns, p))
                .key(keys::done_key(ns, p))
                .key(keys::lease_key(ns, p))
                .key(keys::dead_set(ns, p))
                .key(keys::counts_key(ns, p));
            call
        })
        .collect();
    let mut workers = redis::cmd("ZRANGE");
    workers
        .arg(keys::workers_key(ns))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES");
    let (answers, workers): (Vec<Value>, Vec<(String, f64)>) = if conn.is_cluster() {
        let runs = calls.iter().map(|call| {
            let mut conn = conn.clone();
            async move { call.invoke_async::<Value>(&mut conn).await }
        });
        let mut workers_conn = conn.clone();
        let (answers, workers) = tokio::join!(
            futures::future::try_join_all(runs),
            workers.query_async::<Vec<(String, f64)>>(&mut workers_conn)
        );
        (answers?, workers?)
    } else {
        let mut pipe = redis::pipe();
        for call in &calls {
            pipe.invoke_script(call);
        }
        pipe.add_command(workers);
        let mut answers: Vec<Value> = query_loading(conn, &pipe, &PARTITION).await?;
        let workers = answers.pop().ok_or_else(|| corrupt("no workers answer"))?;
        (
            answers,
            FromRedisValue::from_redis_value(workers).map_err(corrupt)?,
        )
    };
    if answers.len() != usize::from(partitions) {
        return Err(corrupt("one answer per partition expected"));
    }
    let mut now_us = 0;
    let mut stats = Vec::with_capacity(answers.len());
    for (p, answer) in (0..partitions).zip(answers) {
        let (partition, now) = parse_partition(p, answer)?;
        now_us = now_us.max(now);
        stats.push(partition);
    }
    let at_ms = i64::try_from(now_us / 1000).unwrap_or(i64::MAX);
    let cutoff = at_ms.saturating_sub(i64::try_from(live_for.as_millis()).unwrap_or(i64::MAX));
    let mut live: HashMap<String, i64> = HashMap::new();
    for (id, score) in workers {
        #[allow(clippy::cast_possible_truncation)]
        let ms = score as i64;
        if ms >= cutoff {
            live.insert(id, ms);
        }
    }
    let mut workers: Vec<WorkerStats> = live
        .into_iter()
        .map(|(id, last_heartbeat_ms)| WorkerStats {
            id,
            last_heartbeat_ms,
        })
        .collect();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(QueueStats {
        at_ms,
        partitions: stats,
        workers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_names_its_worker_even_with_colons_in_the_name() {
        assert_eq!(
            lease_owner("kvq-worker-1:7:abc").as_deref(),
            Some("kvq-worker-1")
        );
        assert_eq!(
            lease_owner("host:9091:w:12:ff").as_deref(),
            Some("host:9091:w")
        );
        assert_eq!(lease_owner("garbage"), None);
    }

    #[test]
    fn an_entry_id_gives_its_seq() {
        assert_eq!(entry_seq("1795321768123456-0"), Some(1_795_321_768_123_456));
        assert_eq!(entry_seq("x"), None);
    }
}
