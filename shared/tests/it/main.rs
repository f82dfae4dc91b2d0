//! kvq-shared's integration tests: the partitioned queue's apalis backend
//! ([`StreamsBackend`]) against a real `redis-server`, run by real apalis
//! workers, fed by the real producer ([`JobQueue::accept`]).
//!
//! The handler is a test one: it records every run (job, key, seq,
//! generation, worker, start and end on one logical clock, how it ended)
//! and does what the test planned for the job: fail with an ordinary
//! error, defer (`DeferredError`), answer `Fenced`, sleep, or wait for a
//! gate. Each worker runs in its own tokio runtime, so that a test can
//! kill one outright (the runtime dropped: nothing of it runs again, no
//! lease is given up) as well as stop it gracefully (`run_until`).
//! `RUST_LOG=kvq_shared=info` shows the backend's log (takeovers,
//! hand-overs, lost leases).
//!
//! # Layout
//! - this file: the harness ([`Queue`], [`Log`], [`RunningWorker`]) and
//!   the checks the tests share;
//! - `order`: per-key order, retries, deferrals, commits and trimming
//!   with one worker;
//! - `ownership`: several workers sharing the partitions, hand-over,
//!   death, generations, a queue Redis restarted empty.

#![allow(clippy::unwrap_used)]

mod order;
mod ownership;
mod topology;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis::prelude::{BoxDynError, Data, DeferredError, WorkerBuilder, WorkerBuilderExt};
use kvq_shared::Config;
use kvq_shared::connection::Connector;
use kvq_shared::jobs::{ApplyJob, Op, now_ms};
use kvq_shared::keys;
use kvq_shared::queue::{Accepted, Fenced, JobQueue, Queueing, StreamsBackend, StreamsConfig};
use kvq_testkit::TestRedis;
use serde_json::value::RawValue;
use tokio::sync::{oneshot, watch};

/// The namespace of every test's keys.
const NS: &str = "kvq";

/// How long any wait in these tests may take before it fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// What the handler does with a job, run by run.
#[derive(Clone, Default)]
pub(crate) struct Plan {
    /// The first `defer` runs answer `DeferredError`.
    pub(crate) defer: u32,
    /// The next `fail` runs fail with an ordinary error.
    pub(crate) fail: u32,
    /// Every run fails with an ordinary error.
    pub(crate) fail_always: bool,
    /// The first run answers `Fenced` with this fence.
    pub(crate) fence: Option<u64>,
    /// Every run sleeps this long first.
    pub(crate) sleep: Duration,
    /// The run that would succeed first waits until this turns true (for
    /// at most [`DEADLINE`], then records that the gate timed out).
    pub(crate) gate: Option<watch::Receiver<bool>>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Ok,
    Failed,
    Deferred,
    Fenced,
    /// The run's future was dropped (its worker was killed).
    Dropped,
}

/// One run of a job by the handler.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) job: String,
    pub(crate) key: String,
    pub(crate) seq: u64,
    pub(crate) generation: u64,
    pub(crate) worker: String,
    /// When it started and ended, on the log's logical clock.
    pub(crate) start: u64,
    pub(crate) end: Option<u64>,
    pub(crate) ended: Option<Ended>,
}

#[derive(Default)]
struct LogState {
    clock: u64,
    plans: HashMap<String, Plan>,
    runs: Vec<Run>,
    /// Runs of each key going on now.
    running: HashMap<String, usize>,
    /// Keys seen running twice at once, with the job that found it.
    overlaps: Vec<(String, String)>,
    gate_timeouts: Vec<String>,
}

/// What every worker's handler records, shared by the test.
#[derive(Default)]
pub(crate) struct Log(Mutex<LogState>);

impl Log {
    fn with<R>(&self, f: impl FnOnce(&mut LogState) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every run so far, in start order.
    pub(crate) fn runs(&self) -> Vec<Run> {
        self.with(|s| s.runs.clone())
    }

    /// The runs of job `id`, in start order.
    pub(crate) fn runs_of(&self, id: &str) -> Vec<Run> {
        self.with(|s| s.runs.iter().filter(|r| r.job == id).cloned().collect())
    }

    /// Whether every job of `jobs` has a run that succeeded.
    pub(crate) fn all_succeeded(&self, jobs: &[Queued]) -> bool {
        self.with(|s| {
            jobs.iter().all(|j| {
                s.runs
                    .iter()
                    .any(|r| r.job == j.id && r.ended == Some(Ended::Ok))
            })
        })
    }

    /// How many of `worker`'s runs are going on now.
    pub(crate) fn in_flight(&self, worker: &str) -> usize {
        self.with(|s| {
            s.runs
                .iter()
                .filter(|r| r.worker == worker && r.end.is_none())
                .count()
        })
    }

    /// Keys seen running twice at once.
    pub(crate) fn overlaps(&self) -> Vec<(String, String)> {
        self.with(|s| s.overlaps.clone())
    }

    /// Jobs whose gate was not opened in time.
    pub(crate) fn gate_timeouts(&self) -> Vec<String> {
        self.with(|s| s.gate_timeouts.clone())
    }

    fn start(&self, job: &ApplyJob, worker: &str) -> (usize, Plan, u32) {
        self.with(|s| {
            s.clock += 1;
            let runs = s.runs.iter().filter(|r| r.job == job.id).count();
            let running = s.running.entry(job.key.clone()).or_default();
            *running += 1;
            if *running > 1 {
                s.overlaps.push((job.key.clone(), job.id.clone()));
            }
            s.runs.push(Run {
                job: job.id.clone(),
                key: job.key.clone(),
                seq: job.seq,
                generation: job.generation,
                worker: worker.to_owned(),
                start: s.clock,
                end: None,
                ended: None,
            });
            let plan = s.plans.get(&job.id).cloned().unwrap_or_default();
            (
                s.runs.len() - 1,
                plan,
                u32::try_from(runs).unwrap_or(u32::MAX),
            )
        })
    }
}

/// Ends a run in the log when the handler returns, or when its future is
/// dropped (its worker killed).
struct RunGuard {
    log: Arc<Log>,
    index: usize,
    key: String,
    ended: Ended,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let ended = self.ended;
        self.log.with(|s| {
            s.clock += 1;
            let now = s.clock;
            if let Some(run) = s.runs.get_mut(self.index) {
                run.end = Some(now);
                run.ended = Some(ended);
            }
            if let Some(n) = s.running.get_mut(&self.key) {
                *n = n.saturating_sub(1);
            }
        });
    }
}

/// What a worker's handler is given.
struct HandlerContext {
    log: Arc<Log>,
    worker: String,
}

/// The test handler: records the run and does what the job's plan says.
async fn handle(job: ApplyJob, ctx: Data<Arc<HandlerContext>>) -> Result<(), BoxDynError> {
    let (index, plan, earlier_runs) = ctx.log.start(&job, &ctx.worker);
    let mut guard = RunGuard {
        log: ctx.log.clone(),
        index,
        key: job.key.clone(),
        ended: Ended::Dropped,
    };
    if !plan.sleep.is_zero() {
        tokio::time::sleep(plan.sleep).await;
    }
    if earlier_runs == 0
        && let Some(fence) = plan.fence
    {
        guard.ended = Ended::Fenced;
        return Err(Box::new(Fenced { fence }));
    }
    if earlier_runs < plan.defer {
        guard.ended = Ended::Deferred;
        return Err(DeferredError::new(std::io::Error::other("planned deferral")).into());
    }
    if plan.fail_always || earlier_runs < plan.defer + plan.fail {
        guard.ended = Ended::Failed;
        return Err(Box::new(std::io::Error::other("planned failure")));
    }
    if let Some(mut gate) = plan.gate {
        let opened = tokio::time::timeout(DEADLINE, gate.wait_for(|open| *open)).await;
        if !matches!(opened, Ok(Ok(_))) {
            ctx.log.with(|s| s.gate_timeouts.push(job.id.clone()));
        }
    }
    guard.ended = Ended::Ok;
    Ok(())
}

/// A job as accepted.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub(crate) id: String,
    pub(crate) key: String,
    pub(crate) seq: u64,
    pub(crate) partition: u16,
}

/// A queue Redis, the producer on it, and the log the workers' handlers
/// write.
pub(crate) struct Queue {
    pub(crate) redis: TestRedis,
    pub(crate) partitions: u16,
    pub(crate) queue: JobQueue,
    connector: Connector,
    pub(crate) log: Arc<Log>,
}

impl Queue {
    /// A fresh queue Redis with `partitions` partitions.
    pub(crate) fn start(partitions: u16) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let redis = TestRedis::start();
        let url = redis.url();
        let parts = partitions.to_string();
        let config = Config::from_lookup(|name| match name {
            "KVQ_NAMESPACE" => Some(NS.to_owned()),
            "KVQ_QUEUE_PARTITIONS" => Some(parts.clone()),
            "KVQ_QUEUE_REDIS_URL" => Some(url.clone()),
            _ => None,
        })
        .unwrap();
        let connector = Connector::new(&config.queue_redis, Duration::from_secs(2)).unwrap();
        Self {
            redis,
            partitions,
            queue: JobQueue::new(connector.connect().unwrap(), &config, None),
            connector,
            log: Arc::default(),
        }
    }

    /// Backend settings for these tests: short rounds, the given lease.
    pub(crate) fn config(&self, lease: Duration) -> StreamsConfig {
        let mut config = StreamsConfig::new(NS, self.partitions);
        config.lease = lease;
        config.tick = Duration::from_millis(200);
        config.block = Duration::from_millis(500);
        config.buffer = 4;
        config.release_grace = Duration::from_secs(10);
        config.retry_delay = Duration::from_millis(20);
        config.defer_delay = Duration::from_millis(20);
        config.max_retry_delay = Duration::from_millis(200);
        config.timeout = Duration::from_secs(2);
        config
    }

    /// Starts a worker named `name` running `concurrency` jobs at once.
    pub(crate) fn worker(
        &self,
        name: &str,
        config: StreamsConfig,
        concurrency: usize,
    ) -> RunningWorker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("{name}-rt"))
            .enable_all()
            .build()
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let client = self.connector.clone();
        let ctx = Arc::new(HandlerContext {
            log: self.log.clone(),
            worker: name.to_owned(),
        });
        let name = name.to_owned();
        let task = runtime.spawn(async move {
            // Made here so that its connections live in this runtime.
            let backend = StreamsBackend::<ApplyJob>::new(client, config).unwrap();
            WorkerBuilder::new(name)
                .backend(backend)
                .data(ctx)
                .concurrency(concurrency)
                .build(handle)
                .run_until(async move {
                    let _ = stopped.await;
                    Ok::<(), std::io::Error>(())
                })
                .await
                .map_err(|e| e.to_string())
        });
        RunningWorker {
            runtime: Some(runtime),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Accepts a job for `key` through the real producer, planned as
    /// `plan`.
    pub(crate) async fn enqueue(&self, key: &str, plan: Plan) -> Queued {
        let job = ApplyJob {
            id: self.queue.new_job_id(key),
            op: Op::Upsert,
            key: key.to_owned(),
            seq: 0,
            generation: 0,
            redelivered: false,
            value: Some(RawValue::from_string("1".to_owned()).unwrap()),
            ttl_seconds: None,
            if_match: None,
            request_id: "test".to_owned(),
            enqueued_at: now_ms(),
            traceparent: None,
        };
        self.log.with(|s| s.plans.insert(job.id.clone(), plan));
        // The queue Redis may be restarting: accept is idempotent by job id.
        let seq = kvq_testkit::eventually(DEADLINE, "an accept", || async {
            match self.queue.accept(&job, Queueing::New, false).await.1 {
                Ok(Accepted::Queued(seq)) | Ok(Accepted::Exists { seq, .. }) => Some(seq),
                Ok(Accepted::Cancelled) => panic!("nothing cancels in these tests"),
                Err(_) => None,
            }
        })
        .await;
        Queued {
            id: job.id,
            key: key.to_owned(),
            seq,
            partition: keys::partition(key, self.partitions),
        }
    }

    /// Accepts `rounds` jobs for each of `keys`, round by round, each
    /// planned by `plan(round, key index)`.
    pub(crate) async fn enqueue_rounds(
        &self,
        keys: &[String],
        rounds: usize,
        mut plan: impl FnMut(usize, usize) -> Plan,
    ) -> Vec<Queued> {
        let mut jobs = Vec::new();
        for round in 0..rounds {
            for (i, key) in keys.iter().enumerate() {
                jobs.push(self.enqueue(key, plan(round, i)).await);
            }
        }
        jobs
    }

    /// `n` keys, as many in each partition as can be (at least one in
    /// each), taken partition by partition in turn.
    pub(crate) fn keys(&self, prefix: &str, n: usize) -> Vec<String> {
        let parts = usize::from(self.partitions);
        assert!(n >= parts, "{n} keys cannot cover {parts} partitions");
        let each: Vec<Vec<String>> = (0..self.partitions)
            .map(|p| self.keys_in(&format!("{prefix}-p{p}"), p, n.div_ceil(parts)))
            .collect();
        (0..n).map(|i| each[i % parts][i / parts].clone()).collect()
    }

    /// `n` keys of partition `p`.
    pub(crate) fn keys_in(&self, prefix: &str, p: u16, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .filter(|k| keys::partition(k, self.partitions) == p)
            .take(n)
            .collect()
    }

    /// A Redis string, or `None` if the key is missing (or Redis is away).
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.redis.try_cmd(&["GET", key]).ok().flatten()
    }

    /// Partition `p`'s lease value, `<worker>:<generation>:<nonce>`.
    pub(crate) fn lease(&self, p: u16) -> Option<String> {
        self.get(&keys::lease_key(NS, p))
    }

    /// Who holds partition `p`'s lease, and under which generation.
    pub(crate) fn owner(&self, p: u16) -> Option<(String, u64)> {
        let lease = self.lease(p)?;
        let mut parts = lease.rsplitn(3, ':');
        let (_nonce, generation, worker) = (parts.next()?, parts.next()?, parts.next()?);
        Some((worker.to_owned(), generation.parse().ok()?))
    }

    /// Every partition's lease holder (`None`: not held).
    pub(crate) fn owners(&self) -> Vec<Option<String>> {
        (0..self.partitions)
            .map(|p| self.owner(p).map(|(w, _)| w))
            .collect()
    }

    /// Partition `p`'s generation counter.
    pub(crate) fn generation(&self, p: u16) -> u64 {
        self.get(&keys::generation_key(NS, p))
            .map_or(0, |g| g.parse().unwrap())
    }

    /// Partition `p`'s committed position.
    pub(crate) fn done(&self, p: u16) -> Option<String> {
        self.get(&keys::done_key(NS, p))
    }

    /// How many entries partition `p`'s stream holds.
    pub(crate) fn xlen(&self, p: u16) -> i64 {
        self.redis.cmd(&["XLEN", &keys::stream_key(NS, p)])
    }

    /// Waits until `check` answers `Some`, failing after [`DEADLINE`].
    pub(crate) async fn wait<T>(&self, what: &str, check: impl FnMut() -> Option<T>) -> T {
        wait_for(DEADLINE, what, check).await
    }

    /// Waits until every job of `jobs` has a run that succeeded.
    pub(crate) async fn wait_succeeded(&self, jobs: &[Queued]) {
        let log = self.log.clone();
        self.wait("every job to succeed", || {
            log.all_succeeded(jobs).then_some(())
        })
        .await;
    }

    /// Waits until every stream is empty: every job final and committed.
    pub(crate) async fn wait_committed(&self) {
        self.wait("every stream trimmed empty", || {
            (0..self.partitions)
                .all(|p| self.xlen(p) == 0)
                .then_some(())
        })
        .await;
    }
}

/// Polls `check` every 20 ms until it answers `Some`, failing after
/// `deadline`.
pub(crate) async fn wait_for<T>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    kvq_testkit::eventually(deadline, what, || std::future::ready(check())).await
}

/// A worker running in its own runtime.
pub(crate) struct RunningWorker {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl RunningWorker {
    /// Tells the worker to stop, as SIGTERM does (`run_until`): it takes
    /// no more jobs and lets the running ones finish.
    pub(crate) fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the worker ([`RunningWorker::signal_stop`]) and waits until
    /// it has returned.
    pub(crate) async fn stop(mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            let ended = tokio::time::timeout(DEADLINE, task)
                .await
                .expect("the worker stops within the deadline");
            ended.unwrap().unwrap();
        }
    }

    /// Kills the worker: its runtime is dropped at once, so nothing of it
    /// runs again (no commit, no release, no heartbeat), as if its process
    /// died.
    pub(crate) fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The accepted jobs of each key, in accept order.
pub(crate) fn by_key(jobs: &[Queued]) -> HashMap<String, Vec<Queued>> {
    let mut keys: HashMap<String, Vec<Queued>> = HashMap::new();
    for job in jobs {
        keys.entry(job.key.clone()).or_default().push(job.clone());
    }
    keys
}

/// Every job of `jobs` ran exactly once and succeeded, each key's jobs in
/// accept order (seq order), never two of one key at once.
pub(crate) fn assert_exactly_once_in_order(log: &Log, jobs: &[Queued]) {
    let runs = log.runs();
    let overlaps: Vec<(String, String)> = log
        .overlaps()
        .into_iter()
        .filter(|(_, id)| jobs.iter().any(|j| j.id == *id))
        .collect();
    assert_eq!(overlaps, vec![], "a key ran two jobs at once");
    for job in jobs {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.job == job.id).collect();
        assert_eq!(
            mine.len(),
            1,
            "job {} of key {} ran {} times",
            job.id,
            job.key,
            mine.len()
        );
        assert_eq!(mine[0].ended, Some(Ended::Ok));
        assert_eq!(mine[0].seq, job.seq, "the handler saw the accepted seq");
    }
    for (key, queued) in by_key(jobs) {
        let accepted: Vec<&str> = queued.iter().map(|j| j.id.as_str()).collect();
        let ran: Vec<&str> = runs
            .iter()
            .filter(|r| r.key == key && accepted.contains(&r.job.as_str()))
            .map(|r| r.job.as_str())
            .collect();
        assert_eq!(ran, accepted, "key {key} ran out of accept order");
        assert!(
            queued.windows(2).all(|w| w[0].seq < w[1].seq),
            "key {key}'s seqs increase in accept order"
        );
    }
}

/// With redelivery allowed: every job of `jobs` succeeded at least once,
/// and no run of a job started before every earlier job of its key had
/// ended a run (a key never runs ahead of its order); each key's last
/// runs are in accept order.
pub(crate) fn assert_at_least_once_in_order(log: &Log, jobs: &[Queued]) {
    let runs = log.runs();
    for (key, queued) in by_key(jobs) {
        let position: HashMap<&str, usize> = queued
            .iter()
            .enumerate()
            .map(|(i, j)| (j.id.as_str(), i))
            .collect();
        let mine: Vec<&Run> = runs
            .iter()
            .filter(|r| position.contains_key(r.job.as_str()))
            .collect();
        for job in &queued {
            assert!(
                mine.iter()
                    .any(|r| r.job == job.id && r.ended == Some(Ended::Ok)),
                "job {} of key {key} never succeeded",
                job.id
            );
        }
        for run in &mine {
            let i = position[run.job.as_str()];
            for earlier in &queued[..i] {
                assert!(
                    mine.iter().any(|r| r.job == earlier.id
                        && r.ended == Some(Ended::Ok)
                        && r.end.is_some_and(|end| end < run.start)),
                    "key {key}: job #{i} started before job {} had run",
                    earlier.id
                );
            }
        }
        let mut last_runs: Vec<&Run> = queued
            .iter()
            .filter_map(|j| mine.iter().rev().find(|r| r.job == j.id).copied())
            .collect();
        last_runs.sort_by_key(|r| r.start);
        let order: Vec<usize> = last_runs.iter().map(|r| position[r.job.as_str()]).collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key {key}: last runs out of order: {order:?}"
        );
    }
}

/// A pseudo-random number below `below`, from `i` (SplitMix64): variety
/// that is the same on every run.
pub(crate) fn jitter(i: usize, below: u64) -> u64 {
    let mut x = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) % below.max(1)
}
