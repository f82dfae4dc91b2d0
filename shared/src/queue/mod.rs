//! kvq's job queue: a Redis stream with a consumer group on the queue Redis,
//! run by apalis 1.0 workers (`WorkerBuilder::new(..).backend(StreamsBackend::new(..))`).
//!
//! kvq started on apalis-redis 1.0 and replaced it with this backend, on
//! numbers: apalis-redis fetches only at its heartbeat (pickup latency up to
//! one heartbeat), its fetch script fails on a backlog of 8,000+ jobs and takes
//! the worker down, it retries 25 times whatever it is told, and it keeps
//! finished jobs forever. See the README's design section for measurements.
//!
//! - Accept ([`JobQueue::accept`]): the job record (`HSET`) and the stream
//!   entry (`XADD {ns}:apply * id <job id> runs 0 job <json>`) in one
//!   script, unless the attempt was cancelled ([`JobQueue::cancel`]) or a
//!   job with the id exists: a job id is queued at most once.
//! - Fetch: a background task per worker reads with `XREADGROUP ... BLOCK`
//!   (so an idle worker picks a job up as soon as it is pushed) and `COUNT`
//!   up to the free room in a small local buffer (so a worker never holds
//!   more than `concurrency + buffer` jobs, whatever the backlog).
//! - Finish (the backend's own tower layer, around every handler run):
//!   `Ok` or `AbortError` -> `XACK` + `XDEL` (nothing is kept);
//!   any other `Err` -> the entry is replaced, in one script, by a copy with
//!   `runs + 1` parked in a retry sorted set for a growing delay (or until a
//!   `RetryAfterError`'s delay), then moved back to the stream; after
//!   `max_attempts` runs the job is dropped with an error log; a
//!   `DeferredError` re-queues it after `defer_delay` without counting a run.
//! - Crash recovery: every worker resets the idle time of the entries it
//!   holds every `refresh_every` (`XPENDING` + `XCLAIM ... JUSTID`), and takes
//!   over entries idle for `claim_after` (`XAUTOCLAIM`): those of a dead
//!   worker, never those of a live one, however long its job runs.
//! - Shutdown (`run_until`): apalis stops asking for jobs and waits for the
//!   running ones; then `poll_close` stops the fetcher and puts the buffered,
//!   never-started jobs back on the stream for other workers.
//!
//! The handler sees the run number (1-based) through `Attempt::current()`.
//! A backend error never stops the worker (apalis would drop its in-flight
//! jobs): the fetcher logs and retries. Delivery is at least once; kvq's apply
//! script makes a second delivery harmless.
//!
//! # Layout
//! - this module: [`StreamsConfig`], the queue's settings;
//! - [`accept`]: the producer side, [`JobQueue`]: accepting a job (and
//!   settling an accept that got no answer), depths, ping;
//! - [`streams`]: the consumer side, [`StreamsBackend`], the apalis backend
//!   (fetch, finish, retries, crash recovery, shutdown), with its scripts.

use std::time::Duration;

use crate::config::Config;
use crate::keys;

mod accept;
mod streams;

pub use accept::{Accepted, JobQueue, Queueing};
pub use streams::{Finish, FinishLayer, StreamsBackend};

/// Queue settings.
#[derive(Debug, Clone)]
pub struct StreamsConfig {
    /// The stream's key; retries wait in `<stream>:retry`.
    pub stream: String,
    /// The consumer group all workers share.
    pub group: String,
    /// Jobs a worker fetches ahead of its free handler slots.
    pub buffer: usize,
    /// How long one `XREADGROUP` waits for a job (bounds shutdown time too).
    pub block: Duration,
    /// A job held this long by a worker that stopped refreshing it goes to another worker.
    pub claim_after: Duration,
    /// How often a worker looks for such jobs.
    pub claim_every: Duration,
    /// How often a worker refreshes the jobs it holds (well under `claim_after`).
    pub refresh_every: Duration,
    /// Runs before a failing job is dropped.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub retry_delay: Duration,
    /// Longest delay between retries.
    pub max_retry_delay: Duration,
    /// Delay before a job deferred by its handler (`DeferredError`) runs
    /// again; a deferral does not count as a run.
    pub defer_delay: Duration,
    /// Response timeout of non-blocking Redis commands.
    pub timeout: Duration,
}

impl StreamsConfig {
    /// Defaults for the stream at `stream`.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            group: "workers".into(),
            buffer: 32,
            block: Duration::from_millis(1000),
            claim_after: Duration::from_secs(5),
            claim_every: Duration::from_secs(1),
            refresh_every: Duration::from_millis(1000),
            max_attempts: 5,
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(10),
            defer_delay: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
        }
    }

    pub(crate) fn retry_key(&self) -> String {
        format!("{}:retry", self.stream)
    }
}

/// The backend settings for kvq's queue (`{ns}:apply`).
pub fn streams_config(config: &Config) -> StreamsConfig {
    let mut streams = StreamsConfig::new(keys::queue_name(&config.namespace));
    streams.max_attempts = config.worker_max_attempts;
    // Jobs may wait for a key's earlier writes: fetch only a little ahead,
    // so a burst of waiting jobs spreads over all workers.
    streams.buffer = (config.worker_concurrency / 4).max(1);
    streams.timeout = config.redis_timeout;
    streams
}
