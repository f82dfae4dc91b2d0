//! kvq's job queue: `KVQ_QUEUE_PARTITIONS` Redis streams on the queue
//! Redis, run by apalis 1.0 workers
//! (`WorkerBuilder::new(..).backend(StreamsBackend::new(..))`).
//!
//! kvq started on apalis-redis 1.0 and replaced it with this backend, on
//! numbers: apalis-redis fetches only at its heartbeat (pickup latency up to
//! one heartbeat), its fetch script fails on a backlog of 8,000+ jobs and takes
//! the worker down, it retries 25 times whatever it is told, and it keeps
//! finished jobs forever. See the README's design section for measurements.
//!
//! The design is Kafka's (docs/design/write-path.md):
//! - Accept ([`JobQueue::accept`]): a key always maps to one partition
//!   ([`crate::keys::partition`]); one script on that partition's slot
//!   writes the job record and appends the entry, whose id is the job's
//!   `seq` (`<seq>-0`), unless the attempt was cancelled
//!   ([`JobQueue::cancel`]) or a job with the id exists: a job id is queued
//!   at most once. Only the queue Redis is involved.
//! - Ownership: each partition is owned by one worker at a time, through a
//!   lease renewed every second ([`StreamsConfig::lease`]) and a generation
//!   that every new owner raises. Workers heartbeat into a set and each
//!   owns the partitions for which it wins a rendezvous hash among the live
//!   workers: a worker that joins takes its share, one that stops hands its
//!   partitions over at once, one that dies loses them when its leases
//!   expire.
//! - Order: the owner reads its partition's stream in order and hands a
//!   key's jobs to apalis one at a time: a key's next job only once the
//!   previous one is final. A job that fails holds back its key's later
//!   jobs (never other keys'), until it succeeds or ends `dead`. No clock
//!   decides anything.
//! - Commit: the owner records the stream position up to which every job is
//!   final (`done`, checked against its lease) and trims the stream below
//!   it. A new owner starts after `done`, so jobs final but not committed
//!   are redelivered; the apply script recognises them by job id.
//! - Fencing: every job carries its owner's generation; the apply script
//!   refuses a job of an older generation than one that applied in the
//!   key's bucket, so a frozen owner that wakes applies nothing its
//!   successor has passed.
//! - Retries: a run that fails with an error Redis answered is retried
//!   with growing delays, in place, up to `max_attempts` runs; a
//!   `DeferredError` (a Redis server unreachable) is retried without
//!   counting, for as long as it takes.
//! - Shutdown (`run_until`): apalis stops asking for jobs and waits for the
//!   running ones; then `poll_close` commits and gives every lease up, so
//!   the other workers take the partitions at their next round.
//!
//! # Layout
//! - this module: [`StreamsConfig`], the queue's settings;
//! - [`accept`]: the producer side, [`JobQueue`]: accepting a job (and
//!   settling an accept that got no answer), depths, ping;
//! - [`stats`]: what the queue holds, per partition, and the live workers
//!   ([`JobQueue::stats`]);
//! - [`streams`]: the consumer side, [`StreamsBackend`], the apalis backend
//!   (ownership, ordered hand-out, retries, commits, shutdown).

use std::time::Duration;

use crate::config::Config;

mod accept;
mod stats;
mod streams;

pub use accept::{AcceptAnswer, Accepted, JobQueue, MAX_GROUP_JOBS, Prepared, Queueing};
pub use stats::{PartitionStats, QueueStats, WorkerStats};
pub use streams::{Fenced, Finish, FinishLayer, QueuedJob, StreamsBackend};

/// Queue settings.
#[derive(Debug, Clone)]
pub struct StreamsConfig {
    /// `KVQ_NAMESPACE`.
    pub namespace: String,
    /// `KVQ_QUEUE_PARTITIONS`.
    pub partitions: u16,
    /// Jobs handed to apalis ahead of its free handler slots.
    pub buffer: usize,
    /// Entries one read fetches.
    pub fetch: usize,
    /// How long one blocking read waits for a job.
    pub block: Duration,
    /// How long a partition lease lasts unless renewed: a dead worker's
    /// partitions move after at most this (plus one round).
    pub lease: Duration,
    /// How often a worker heartbeats, renews its leases and rebalances.
    pub tick: Duration,
    /// How long a partition being handed over waits for its jobs in flight.
    pub release_grace: Duration,
    /// How often an owner commits its partitions' progress.
    pub commit_every: Duration,
    /// Uncommitted jobs one partition holds at most.
    pub window: usize,
    /// Bytes of uncommitted jobs all of a worker's partitions hold, beyond
    /// which they stop reading (each may exceed it by one read).
    pub max_window_bytes: usize,
    /// Bytes one read of a partition fetches, about: its entry count is
    /// this divided by the largest entry of the previous read.
    pub read_bytes: usize,
    /// The largest entry size assumed before the first read.
    pub largest_entry_bytes: usize,
    /// Bytes of jobs a worker hands to apalis at once, beyond which further
    /// jobs wait (one job always goes).
    pub max_in_flight_bytes: usize,
    /// Jobs of one key that may be final but not committed.
    pub max_uncommitted_per_key: usize,
    /// Runs before a failing job is dropped.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub retry_delay: Duration,
    /// Longest delay between retries.
    pub max_retry_delay: Duration,
    /// Delay before a job deferred by its handler (`DeferredError`) runs
    /// again, doubled for each further deferral; a deferral does not count
    /// as a run.
    pub defer_delay: Duration,
    /// Longest delay between deferred runs: how late a job may start after
    /// the Redis server it waited for is back.
    pub max_defer_delay: Duration,
    /// Response timeout of non-blocking Redis commands.
    pub timeout: Duration,
}

impl StreamsConfig {
    /// Defaults for `partitions` partitions under `namespace`.
    pub fn new(namespace: impl Into<String>, partitions: u16) -> Self {
        Self {
            namespace: namespace.into(),
            partitions,
            buffer: 8,
            fetch: 256,
            block: Duration::from_millis(1000),
            lease: Duration::from_secs(5),
            tick: Duration::from_secs(1),
            release_grace: Duration::from_secs(10),
            commit_every: Duration::from_millis(50),
            window: 256,
            max_window_bytes: 16 * 1_048_576,
            read_bytes: 1_048_576,
            largest_entry_bytes: 1_048_576,
            max_in_flight_bytes: 8 * 1_048_576,
            max_uncommitted_per_key: 32,
            max_attempts: 5,
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(10),
            defer_delay: Duration::from_millis(100),
            max_defer_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        }
    }
}

/// The backend settings for kvq's queue.
pub fn streams_config(config: &Config) -> StreamsConfig {
    let mut streams = StreamsConfig::new(&config.namespace, config.queue_partitions);
    streams.max_attempts = config.worker_max_attempts;
    streams.buffer = (config.worker_concurrency / 4).max(1);
    streams.timeout = config.redis_timeout;
    // A job's entry is its value and some 300 bytes more.
    streams.largest_entry_bytes = config.max_value_bytes + 1024;
    streams
}
