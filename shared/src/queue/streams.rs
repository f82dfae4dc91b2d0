//! The consumer side of the queue: [`StreamsBackend`], the apalis backend
//! on the partitioned queue (see the parent module's doc).
//!
//! One task per worker process, the coordinator, keeps the worker's
//! heartbeat, takes and renews partition leases and hands partitions over
//! when workers come and go. Each owned partition has its own task, which
//! reads its stream in order and hands jobs to apalis, one at a time per
//! key, and commits the prefix of the stream whose jobs are final.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::error::{AbortError, BoxDynError, DeferredError, RetryAfterError};
use apalis_core::layers::{Layer, Service};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::context::WorkerContext;
use futures::FutureExt;
use futures::future::BoxFuture;
use redis::streams::{StreamId, StreamReadReply};
use redis::{RedisResult, Script};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::StreamsConfig;
use crate::connection::{Conn, Connector, query_loading};
use crate::error::StoreError;
use crate::keys;

/// A job the partitioned queue can run: it names the key whose jobs run one
/// at a time in stream order, and learns its place when fetched.
pub trait QueuedJob: DeserializeOwned + Clone + Send + 'static {
    /// The key whose jobs run one at a time, in stream order.
    fn order_key(&self) -> &str;
    /// Fills in the job's `seq` (its stream position), the owner
    /// generation of the worker that fetched it, and whether an earlier
    /// owner may have run it (it was in the stream when this owner took
    /// the partition).
    fn set_position(&mut self, seq: u64, generation: u64, redelivered: bool);
}

impl QueuedJob for crate::jobs::ApplyJob {
    fn order_key(&self) -> &str {
        &self.key
    }

    fn set_position(&mut self, seq: u64, generation: u64, redelivered: bool) {
        self.seq = seq;
        self.generation = generation;
        self.redelivered = redelivered;
    }
}

/// A handler's answer meaning that the job's partition has a newer owner:
/// the job was not run and this worker must let the partition go. `fence`
/// is the generation that applied there.
#[derive(Debug)]
pub struct Fenced {
    /// The newer owner's generation.
    pub fence: u64,
}

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the partition has a newer owner (generation {})",
            self.fence
        )
    }
}

impl std::error::Error for Fenced {}

/// How a handed-out job came back to its partition.
#[derive(Debug)]
enum Done {
    /// Final: succeeded, failed, dead, or dropped.
    Final(u64),
    /// Run it again after `delay`, as run number `runs`, deferred `defers`
    /// times so far.
    Retry {
        seq: u64,
        runs: usize,
        defers: u32,
        delay: Duration,
    },
    /// It was never started (the worker is stopping).
    Returned(u64),
    /// A newer owner applied in the partition.
    Fenced(u64),
}

/// Where a handed-out job came from; carried in the task's extensions.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    /// The job's size, counted in [`Shared::in_flight_bytes`] while apalis
    /// has it.
    bytes: usize,
    task_id: String,
    runs: usize,
    defers: u32,
    done: mpsc::UnboundedSender<Done>,
}

/// Answers the live workers after recording this one's heartbeat, by the
/// queue Redis' clock; forgets workers silent for a minute. KEYS: the
/// workers set. ARGV: worker, how long a silent worker counts as live (ms).
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
",
    )
});

/// Takes a partition's lease for worker ARGV[1] for ARGV[2] ms, unless
/// another worker holds it; the generation goes up by one (to at least
/// ARGV[3]). The lease's value is `<worker>:<generation>:<ARGV[4]>`, a nonce
/// making every acquisition's value unique, even when a queue Redis that
/// lost its data hands out a generation again. KEYS: lease, generation,
/// done, stream. Answers {generation, done, the stream's last entry id (or
/// done, if it is empty)} or nil.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then return false end
local gen = redis.call('INCR', KEYS[2])
if gen < tonumber(ARGV[3]) then
  gen = tonumber(ARGV[3])
  redis.call('SET', KEYS[2], gen)
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. gen .. ':' .. ARGV[4], 'PX', ARGV[2])
local done = redis.call('GET', KEYS[3]) or '0-0'
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]
return {gen, done, last and last[1] or done}
",
    )
});

/// Renews lease KEYS[1] if it is still ARGV[1], for ARGV[2] ms; answers 1,
/// or 0 if it was lost.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// Commits a partition up to stream id ARGV[2], trims the stream below
/// ARGV[3] and counts the ARGV[4] jobs the commit passed, if lease KEYS[1]
/// is still ARGV[1]. KEYS: lease, done, stream, counters. Answers 1, or 0
/// if the lease was lost.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', KEYS[4], 'done', ARGV[4]) end
return 1
",
    )
});

/// Gives lease KEYS[1] up if it is still ARGV[1].
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
",
    )
});

/// What the coordinator and the partitions share.
struct Shared {
    conn: Conn,
    connector: Connector,
    config: StreamsConfig,
    /// Bytes of jobs the worker's partitions hold, fetched and not yet
    /// committed: reading stops at [`StreamsConfig::max_window_bytes`].
    window_bytes: AtomicUsize,
    /// Bytes of jobs handed to apalis and not yet finished: beyond
    /// [`StreamsConfig::max_in_flight_bytes`], partitions hold further jobs
    /// back (one job always goes), so large values cannot fill every
    /// handler slot at once.
    in_flight_bytes: AtomicUsize,
    /// Signalled when a job finishes and its bytes leave `in_flight_bytes`.
    freed: tokio::sync::Notify,
}

impl Shared {
    /// Whether a job of `bytes` may be handed to apalis now.
    fn has_room_for(&self, bytes: usize) -> bool {
        let now = self.in_flight_bytes.load(Ordering::Relaxed);
        now == 0 || now.saturating_add(bytes) <= self.config.max_in_flight_bytes
    }

    /// A handed-out job of `bytes` finished (or was given back).
    fn finished(&self, bytes: usize) {
        self.in_flight_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.freed.notify_waiters();
    }
}

impl Shared {
    fn ns(&self) -> &str {
        &self.config.namespace
    }

    /// A connection for one partition's blocking reads, which would stall
    /// other commands on a shared connection.
    fn blocking_conn(&self) -> Result<Conn, StoreError> {
        self.connector
            .connect_with_timeout(self.config.block + self.config.timeout)
    }
}

/// The apalis backend.
pub struct StreamsBackend<T> {
    shared: Arc<Shared>,
    running: Option<Running<T>>,
    closing: Option<BoxFuture<'static, ()>>,
}

struct Running<T> {
    rx: mpsc::Receiver<Task<T>>,
    stop: watch::Sender<bool>,
    coordinator: JoinHandle<()>,
}

impl<T> StreamsBackend<T> {
    /// A backend on the queue Redis reached through `connector` (connects
    /// lazily), whose commands time out after `config.timeout`.
    pub fn new(connector: Connector, config: StreamsConfig) -> Result<Self, StoreError> {
        let conn = connector.connect_with_timeout(config.timeout)?;
        Ok(Self {
            shared: Arc::new(Shared {
                conn,
                connector,
                config,
                window_bytes: AtomicUsize::new(0),
                in_flight_bytes: AtomicUsize::new(0),
                freed: tokio::sync::Notify::new(),
            }),
            running: None,
            closing: None,
        })
    }
}

impl<T: QueuedJob> Backend for StreamsBackend<T> {
    type Task = Task<T>;
    type Error = redis::RedisError;

    fn poll_ready(&mut self, _: &mut Context<'_>, worker: &WorkerContext) -> Poll<RedisResult<()>> {
        if self.running.is_none() && self.closing.is_none() {
            let (tx, rx) = mpsc::channel(self.shared.config.buffer.max(1));
            let (stop, stopped) = watch::channel(false);
            let coordinator = Coordinator {
                shared: self.shared.clone(),
                worker: worker.name().to_owned(),
                tx,
                owned: HashMap::new(),
                min_generation: HashMap::new(),
            };
            self.running = Some(Running {
                rx,
                stop,
                coordinator: tokio::spawn(coordinator.run(stopped)),
            });
        }
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<RedisResult<Task<T>>>> {
        match &mut self.running {
            Some(running) => running.rx.poll_recv(cx).map(|task| task.map(Ok)),
            None => Poll::Pending,
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, _: &WorkerContext) -> Poll<RedisResult<()>> {
        if let Some(running) = self.running.take() {
            self.closing = Some(close(self.shared.clone(), running).boxed());
        }
        match &mut self.closing {
            Some(closing) => closing.poll_unpin(cx).map(Ok),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Stops handing out jobs, gives the never-started ones back to their
/// partitions, and waits for the coordinator to commit and release every
/// partition.
async fn close<T: Send + 'static>(shared: Arc<Shared>, mut running: Running<T>) {
    let _ = running.stop.send(true);
    running.rx.close();
    let mut returned = 0;
    while let Some(task) = running.rx.recv().await {
        if let Some(e) = task.data().get::<Entry>() {
            shared.finished(e.bytes);
            let _ = e.done.send(Done::Returned(e.seq));
            returned += 1;
        }
    }
    let _ = running.coordinator.await;
    tracing::info!(returned, "queue backend closed");
}

impl<T> BackendConfig for StreamsBackend<T> {
    type Args = T;
    type Id = String;
    type Kind = Ephemeral;
    type Config = StreamsConfig;
    type Layer = FinishLayer;

    fn config(&self) -> &StreamsConfig {
        &self.shared.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> FinishLayer {
        FinishLayer(self.shared.clone())
    }
}

/// The backend's layer: reports each job's end to its partition once its
/// handler returns.
#[derive(Clone)]
pub struct FinishLayer(Arc<Shared>);

impl<S> Layer<S> for FinishLayer {
    type Service = Finish<S>;
    fn layer(&self, inner: S) -> Finish<S> {
        Finish {
            inner,
            shared: self.0.clone(),
        }
    }
}

/// See [`FinishLayer`].
#[derive(Clone)]
pub struct Finish<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, T> Service<Task<T>> for Finish<S>
where
    S: Service<Task<T>>,
    S::Future: Send + 'static,
    S::Response: Send,
    S::Error: Into<BoxDynError>,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<S::Response, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<T>) -> Self::Future {
        let entry = task.data().get::<Entry>().cloned();
        let shared = self.shared.clone();
        let run = self.inner.call(task);
        async move {
            let result = run.await.map_err(Into::into);
            if let Some(e) = entry {
                shared.finished(e.bytes);
                let done = settle(&shared.config, &e, result.as_ref().map(drop));
                // A closed channel: the partition moved on; its next owner
                // runs the job again if it is not final.
                let _ = e.done.send(done);
            }
            result
        }
        .boxed()
    }
}

/// What a run's result means for its partition.
fn settle(config: &StreamsConfig, e: &Entry, result: Result<(), &BoxDynError>) -> Done {
    let runs = e.runs + 1;
    let backoff =
        |base: Duration, n: u32, max: Duration| base.saturating_mul(1 << n.min(20)).min(max);
    match result {
        Ok(()) => Done::Final(e.seq),
        Err(err) if err.downcast_ref::<AbortError>().is_some() => Done::Final(e.seq),
        Err(err) if err.downcast_ref::<Fenced>().is_some() => {
            Done::Fenced(err.downcast_ref::<Fenced>().map_or(0, |f| f.fence))
        }
        // Not a failure (Redis unreachable, say): run it again, without
        // counting a run, for as long as it takes.
        Err(err) if err.downcast_ref::<DeferredError>().is_some() => Done::Retry {
            seq: e.seq,
            runs: e.runs,
            defers: e.defers + 1,
            delay: backoff(config.defer_delay, e.defers, config.max_defer_delay),
        },
        Err(err) if runs >= config.max_attempts as usize => {
            tracing::error!(task_id = %e.task_id, runs, error = %err, "job dropped: retries exhausted");
            Done::Final(e.seq)
        }
        Err(err) => Done::Retry {
            seq: e.seq,
            runs,
            defers: e.defers,
            delay: match err.downcast_ref::<RetryAfterError>() {
                Some(r) => r.get_duration().min(config.max_retry_delay),
                None => backoff(
                    config.retry_delay,
                    u32::try_from(runs - 1).unwrap_or(20),
                    config.max_retry_delay,
                ),
            },
        },
    }
}

/// An owned partition, as the coordinator sees it.
struct Owned {
    lease: String,
    control: watch::Sender<Control>,
    task: JoinHandle<Exit>,
    releasing: bool,
}

/// What the coordinator tells a partition task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    /// Hand the partition over: finish what is in flight, commit, give the
    /// lease up.
    Release,
    /// The lease is gone: stop at once.
    Lost,
}

/// How a partition task ended.
enum Exit {
    Done,
    /// Fenced by generation `fence`: take the partition again above it.
    Fenced(u64),
}

/// Keeps the worker's heartbeat and its share of the partitions.
struct Coordinator<T> {
    shared: Arc<Shared>,
    worker: String,
    tx: mpsc::Sender<Task<T>>,
    owned: HashMap<u16, Owned>,
    min_generation: HashMap<u16, u64>,
}

impl<T: QueuedJob> Coordinator<T> {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let tick = self.shared.config.tick;
        loop {
            if let Err(err) = self.step().await {
                tracing::warn!(error = %err, "queue coordination failed; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                _ = stopped.changed() => break,
            }
        }
        for owned in self.owned.values() {
            let _ = owned.control.send(Control::Release);
        }
        let deadline = Instant::now() + self.shared.config.release_grace;
        for (p, owned) in self.owned.drain() {
            let mut task = owned.task;
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(partition = p, "a partition did not release in time");
                task.abort();
            }
        }
        let gone = redis::cmd("ZREM")
            .arg(keys::workers_key(self.shared.ns()))
            .arg(&self.worker)
            .exec_async(&mut self.shared.conn.clone())
            .await;
        if let Err(err) = gone {
            tracing::warn!(error = %err, "could not leave the workers set");
        }
    }

    /// One round: heartbeat, renew, take what is ours, hand over what is not.
    async fn step(&mut self) -> RedisResult<()> {
        let config = &self.shared.config;
        let mut conn = self.shared.conn.clone();
        let lease_ms = u64::try_from(config.lease.as_millis()).unwrap_or(u64::MAX);
        // Partitions that ended by themselves.
        let ended: Vec<u16> = self
            .owned
            .iter()
            .filter(|(_, o)| o.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            if let Some(owned) = self.owned.remove(&p)
                && let Ok(Exit::Fenced(fence)) = owned.task.await
            {
                self.min_generation.insert(p, fence + 1);
            }
        }
        // The workers set may live on another server than some partitions
        // (a cluster): leases are renewed even when the heartbeat fails.
        let heartbeat: RedisResult<Vec<String>> = HEARTBEAT
            .key(keys::workers_key(self.shared.ns()))
            .arg(&self.worker)
            .arg(lease_ms)
            .invoke_async(&mut conn)
            .await;
        if !self.owned.is_empty() {
            let order: Vec<u16> = self.owned.keys().copied().collect();
            let renewed = self.renew(&order, lease_ms).await?;
            for (p, ok) in order.into_iter().zip(renewed) {
                // Unknown (its server did not answer): the lease runs on
                // until it is renewed or runs out.
                if ok == Some(0)
                    && let Some(owned) = self.owned.remove(&p)
                {
                    tracing::warn!(partition = p, "partition lease lost");
                    let _ = owned.control.send(Control::Lost);
                }
            }
        }
        let mut live = heartbeat?;
        if !live.contains(&self.worker) {
            live.push(self.worker.clone());
        }
        let mine = preferred(&live, &self.worker, config.partitions);
        for p in 0..config.partitions {
            let wanted = mine.contains(&p);
            match self.owned.get_mut(&p) {
                Some(owned) if !wanted && !owned.releasing => {
                    tracing::info!(partition = p, "handing the partition over");
                    owned.releasing = true;
                    let _ = owned.control.send(Control::Release);
                }
                Some(_) => {}
                // One partition's server failing (a cluster master) does
                // not keep the others from being taken.
                None if wanted => {
                    if let Err(e) = self.acquire(p, lease_ms).await {
                        tracing::warn!(partition = p, error = %e, "cannot take the partition yet");
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Renews the leases of partitions `order`: 1 for each still ours, 0
    /// for each lost. One pipeline, or on a cluster one call per partition,
    /// all at once (partitions are slots spread over the masters).
    async fn renew(&self, order: &[u16], lease_ms: u64) -> RedisResult<Vec<Option<i64>>> {
        let conn = self.shared.conn.clone();
        let invocations: Vec<_> = order
            .iter()
            .map(|p| {
                let mut invocation = RENEW.prepare_invoke();
                invocation
                    .key(keys::lease_key(self.shared.ns(), *p))
                    .arg(&self.owned[p].lease)
                    .arg(lease_ms);
                invocation
            })
            .collect();
        if conn.is_cluster() {
            let calls = invocations.iter().map(|invocation| {
                let mut conn = conn.clone();
                async move { invocation.invoke_async::<i64>(&mut conn).await.ok() }
            });
            return Ok(futures::future::join_all(calls).await);
        }
        let mut pipe = redis::pipe();
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let renewed: Vec<i64> = query_loading(&conn, &pipe, &RENEW).await?;
        Ok(renewed.into_iter().map(Some).collect())
    }

    async fn acquire(&mut self, p: u16, lease_ms: u64) -> RedisResult<()> {
        let ns = self.shared.ns().to_owned();
        let min = self.min_generation.get(&p).copied().unwrap_or(0);
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let got: Option<(u64, String, String)> = ACQUIRE
            .key(keys::lease_key(&ns, p))
            .key(keys::generation_key(&ns, p))
            .key(keys::done_key(&ns, p))
            .key(keys::stream_key(&ns, p))
            .arg(&self.worker)
            .arg(lease_ms)
            .arg(min)
            .arg(&nonce)
            .invoke_async(&mut self.shared.conn.clone())
            .await?;
        let Some((generation, done, last)) = got else {
            return Ok(());
        };
        // Entries up to the stream's last one may have been run by an
        // earlier owner; those after it are new to every owner.
        let redelivery_to = stream_seq(&last).unwrap_or(u64::MAX);
        self.min_generation.remove(&p);
        let lease = format!("{}:{generation}:{nonce}", self.worker);
        tracing::info!(partition = p, generation, from = %done, "partition taken");
        let (control, controlled) = watch::channel(Control::Run);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let partition = Partition {
            p,
            generation,
            lease: lease.clone(),
            shared: self.shared.clone(),
            tx: self.tx.clone(),
            done_tx,
            window: BTreeMap::new(),
            keys: HashMap::new(),
            slots: HashMap::new(),
            ready: VecDeque::new(),
            retries: BinaryHeap::new(),
            in_flight: 0,
            final_to: None,
            committed: None,
            redelivery_to,
        };
        self.owned.insert(
            p,
            Owned {
                lease,
                control,
                task: tokio::spawn(partition.run(done, done_rx, controlled)),
                releasing: false,
            },
        );
        Ok(())
    }
}

/// The partitions `worker` should own among `live` workers: rendezvous
/// hashing with bounded loads. Every (partition, worker) pair is ranked by
/// its hash, and, highest first, a pair is taken if its partition has no
/// owner yet and its worker owns fewer than ⌊partitions / workers⌋; then
/// the same again for the partitions left, up to one more each. Every
/// worker computes the same assignment from the same live set; each
/// partition gets one owner, the shares differ by at most one (plain
/// rendezvous hashing gave 6, 5, 4 and 1 of 16 partitions to 4 workers),
/// and a worker joining or leaving moves little more than its share.
fn preferred(live: &[String], worker: &str, partitions: u16) -> HashSet<u16> {
    assignment(live, partitions)
        .into_iter()
        .filter(|(_, owner)| *owner == worker)
        .map(|(p, _)| p)
        .collect()
}

/// Each partition's owner among `live` (see [`preferred`]).
fn assignment(live: &[String], partitions: u16) -> HashMap<u16, &str> {
    let mut workers: Vec<&str> = live.iter().map(String::as_str).collect();
    workers.sort_unstable();
    workers.dedup();
    if workers.is_empty() {
        return HashMap::new();
    }
    let mut pairs: Vec<(u64, &str, u16)> = (0..partitions)
        .flat_map(|p| workers.iter().map(move |w| (rendezvous(w, p), *w, p)))
        .collect();
    pairs.sort_unstable_by(|a, b| b.cmp(a));
    let mut owners = HashMap::new();
    let mut load: HashMap<&str, usize> = HashMap::new();
    // Everyone up to the floor of a fair share first, then the partitions
    // left over, one more each at most: shares differ by one at most.
    let floor = usize::from(partitions) / workers.len();
    for capacity in [floor, floor + 1] {
        for (_, w, p) in &pairs {
            let owned = load.entry(w).or_default();
            if *owned < capacity && !owners.contains_key(p) {
                owners.insert(*p, *w);
                *owned += 1;
            }
        }
    }
    owners
}

/// FNV-1a of the worker name and the partition: stable across processes.
fn rendezvous(worker: &str, partition: u16) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in worker.bytes().chain(partition.to_be_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly; finish with a multiply-xorshift.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// A fetched job, until it is committed.
struct Slot<T> {
    key: String,
    task_id: String,
    /// The job, parsed once when read (`None`: undecodable); each run gets
    /// a copy.
    job: Option<T>,
    /// The size of its stream entry.
    bytes: usize,
    runs: usize,
    defers: u32,
    state: SlotState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Waiting for its key's earlier job.
    Waiting,
    /// Handed out, or waiting to be retried.
    Busy,
    Final,
}

/// A key's jobs in the partition's window.
#[derive(Default)]
struct KeyState {
    /// Later jobs, in order, waiting for the one running.
    waiting: VecDeque<u64>,
    /// A job of the key is handed out or waiting for a retry.
    busy: bool,
    /// Jobs final but not yet committed: at most
    /// [`StreamsConfig::max_uncommitted_per_key`], so a redelivery after a
    /// crash is always within what the apply script remembers.
    uncommitted: usize,
}

/// One owned partition: reads, hands out in per-key order, commits.
struct Partition<T> {
    p: u16,
    generation: u64,
    lease: String,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Task<T>>,
    done_tx: mpsc::UnboundedSender<Done>,
    /// Fetched, uncommitted jobs by seq.
    window: BTreeMap<u64, ()>,
    slots: HashMap<u64, Slot<T>>,
    keys: HashMap<String, KeyState>,
    ready: VecDeque<Task<T>>,
    retries: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: usize,
    /// The last seq of the window's final prefix.
    final_to: Option<u64>,
    committed: Option<u64>,
    /// The seq of the stream's last entry when this owner took the
    /// partition: entries up to it may have been run by an earlier owner.
    redelivery_to: u64,
}

impl<T: QueuedJob> Partition<T> {
    async fn run(
        mut self,
        from: String,
        mut done_rx: mpsc::UnboundedReceiver<Done>,
        mut control: watch::Receiver<Control>,
    ) -> Exit {
        let config = self.shared.config.clone();
        // One batch read ahead: with the window's byte budget, what a
        // partition holds stays within a read's worth of the budget.
        let (entries_tx, mut entries_rx) = mpsc::channel::<Vec<StreamId>>(1);
        let (stop_reading, reading_stopped) = watch::channel(false);
        let reader = match self.shared.blocking_conn() {
            Ok(conn) => tokio::spawn(read(
                conn,
                keys::stream_key(self.shared.ns(), self.p),
                from,
                Reads {
                    max_count: config.fetch,
                    bytes: config.read_bytes,
                    largest: config.largest_entry_bytes,
                },
                config.block,
                entries_tx,
                reading_stopped,
            )),
            Err(err) => {
                tracing::error!(partition = self.p, error = %err, "cannot connect to read the partition");
                return Exit::Done;
            }
        };
        let mut commit_tick = tokio::time::interval(config.commit_every);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tx = self.tx.clone();
        let mut releasing = false;
        let release_by = |now: Instant| now + config.release_grace;
        let mut release_deadline = Instant::now();
        let exit = loop {
            let next_retry = self.retries.peek().map(|Reverse((at, _))| *at);
            let next_bytes = self
                .ready
                .front()
                .and_then(|task| task.data().get::<Entry>())
                .map(|e| e.bytes);
            let has_room =
                !releasing && next_bytes.is_some_and(|bytes| self.shared.has_room_for(bytes));
            let waits_for_room = !releasing && next_bytes.is_some() && !has_room;
            let room = self.window.len() < config.window
                && self.shared.window_bytes.load(Ordering::Relaxed) < config.max_window_bytes
                && !releasing;
            tokio::select! {
                biased;
                changed = control.changed() => {
                    let now = *control.borrow();
                    match (changed, now) {
                        (Err(_), _) | (_, Control::Lost) => break Exit::Done,
                        (_, Control::Release) if !releasing => {
                            releasing = true;
                            release_deadline = release_by(Instant::now());
                            let _ = stop_reading.send(true);
                            self.drop_ready();
                            self.retries.clear();
                        }
                        _ => {}
                    }
                }
                Some(done) = done_rx.recv() => {
                    if let Some(fence) = self.on_done(done, releasing) {
                        tracing::warn!(partition = self.p, generation = self.generation, fence, "fenced: a newer owner applied in the partition");
                        break Exit::Fenced(fence);
                    }
                }
                permit = tx.reserve(), if has_room => {
                    match permit {
                        Ok(permit) => {
                            if let Some(task) = self.ready.pop_front() {
                                let bytes = task.data().get::<Entry>().map_or(0, |e| e.bytes);
                                self.shared.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed);
                                permit.send(task);
                            }
                        }
                        // apalis stopped: the worker is closing. The task
                        // stays in `ready` until then, so that
                        // `drop_ready` counts it out of `in_flight`.
                        Err(_) => self.drop_ready(),
                    }
                }
                entries = entries_rx.recv(), if room => {
                    let Some(entries) = entries else {
                        // The reader failed (see `read`).
                        break Exit::Done;
                    };
                    for entry in entries {
                        self.on_entry(entry);
                    }
                }
                // Other jobs finished: the next one may fit now (the commit
                // tick below looks again too, should this wake-up be missed).
                () = self.shared.freed.notified(), if waits_for_room => {}
                () = sleep_until(next_retry), if next_retry.is_some() && !releasing => {
                    self.on_retry_due();
                }
                _ = commit_tick.tick() => {
                    if !self.commit().await {
                        break Exit::Done;
                    }
                    if releasing && (self.in_flight == 0 || Instant::now() >= release_deadline) {
                        self.release().await;
                        break Exit::Done;
                    }
                }
            }
        };
        let _ = stop_reading.send(true);
        reader.abort();
        exit
    }

    fn ns(&self) -> &str {
        self.shared.ns()
    }

    /// A fetched entry: into the window, handed out if its key is free.
    fn on_entry(&mut self, entry: StreamId) {
        let Some(seq) = stream_seq(&entry.id) else {
            tracing::error!(partition = self.p, stream_id = %entry.id, "skipping an entry with an id kvq did not write");
            return;
        };
        let field = |name: &str| entry.get::<String>(name);
        let decoded = field("id").zip(field("job")).and_then(|(task_id, job)| {
            let parsed: T = serde_json::from_str(&job).ok()?;
            let key = parsed.order_key().to_owned();
            Some((task_id, parsed, job.len(), key))
        });
        self.window.insert(seq, ());
        let Some((task_id, job, bytes, key)) = decoded else {
            tracing::error!(partition = self.p, stream_id = %entry.id, "dropping an undecodable job");
            self.slots.insert(
                seq,
                Slot {
                    key: String::new(),
                    task_id: String::new(),
                    job: None,
                    bytes: 0,
                    runs: 0,
                    defers: 0,
                    state: SlotState::Final,
                },
            );
            self.advance();
            return;
        };
        self.shared.window_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.slots.insert(
            seq,
            Slot {
                key: key.clone(),
                task_id,
                job: Some(job),
                bytes,
                runs: 0,
                defers: 0,
                state: SlotState::Waiting,
            },
        );
        self.keys
            .entry(key.clone())
            .or_default()
            .waiting
            .push_back(seq);
        self.next_of(&key);
    }

    /// Hands out the key's next job if nothing of the key is in flight and
    /// it has room for another uncommitted job.
    fn next_of(&mut self, key: &str) {
        let cap = self.shared.config.max_uncommitted_per_key;
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        if state.busy || state.uncommitted >= cap {
            return;
        }
        let Some(seq) = state.waiting.pop_front() else {
            if state.uncommitted == 0 {
                self.keys.remove(key);
            }
            return;
        };
        state.busy = true;
        self.dispatch(seq);
    }

    /// Builds the task for `seq` and queues it for apalis.
    fn dispatch(&mut self, seq: u64) {
        let generation = self.generation;
        let Some(slot) = self.slots.get_mut(&seq) else {
            return;
        };
        slot.state = SlotState::Busy;
        let Some(mut args) = slot.job.clone() else {
            // Undecodable entries are final when read; never here.
            let _ = self.done_tx.send(Done::Final(seq));
            self.in_flight += 1;
            return;
        };
        args.set_position(seq, generation, seq <= self.redelivery_to);
        let task = TaskBuilder::new(args)
            .task_id(TaskId::from_string(slot.task_id.clone()))
            .attempt(slot.runs)
            .data(Entry {
                seq,
                bytes: slot.bytes,
                task_id: slot.task_id.clone(),
                runs: slot.runs,
                defers: slot.defers,
                done: self.done_tx.clone(),
            })
            .build();
        self.in_flight += 1;
        self.ready.push_back(task);
    }

    /// A job came back. Answers the fence if a newer owner applied.
    fn on_done(&mut self, done: Done, releasing: bool) -> Option<u64> {
        let seq = match done {
            Done::Fenced(fence) => return Some(fence),
            Done::Final(seq) | Done::Returned(seq) | Done::Retry { seq, .. } => seq,
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        let slot = self.slots.get_mut(&seq)?;
        let key = slot.key.clone();
        match done {
            Done::Final(_) => {
                slot.state = SlotState::Final;
                if let Some(state) = self.keys.get_mut(&key) {
                    state.busy = false;
                    state.uncommitted += 1;
                }
                self.advance();
                if !releasing {
                    self.next_of(&key);
                }
            }
            Done::Retry {
                runs,
                defers,
                delay,
                ..
            } => {
                slot.runs = runs;
                slot.defers = defers;
                if !releasing {
                    self.retries.push(Reverse((Instant::now() + delay, seq)));
                }
            }
            // Never started: the worker is closing; the next owner runs it.
            Done::Returned(_) | Done::Fenced(_) => {}
        }
        None
    }

    /// Forgets the tasks not yet handed to apalis (their jobs stay
    /// uncommitted, for the next owner).
    fn drop_ready(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(self.ready.len());
        self.ready.clear();
    }

    fn on_retry_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, seq))) = self.retries.peek().copied() {
            if at > now {
                break;
            }
            self.retries.pop();
            self.dispatch(seq);
        }
    }

    /// Moves `final_to` over the window's final prefix, forgetting it.
    fn advance(&mut self) {
        while let Some((&seq, ())) = self.window.first_key_value() {
            if self
                .slots
                .get(&seq)
                .is_some_and(|s| s.state != SlotState::Final)
            {
                break;
            }
            self.window.pop_first();
            self.final_to = Some(seq);
        }
    }

    /// Commits the final prefix, if it moved. `false` if the lease is lost.
    async fn commit(&mut self) -> bool {
        let Some(to) = self.final_to else {
            return true;
        };
        if self.committed == Some(to) {
            return true;
        }
        let ns = self.ns().to_owned();
        // The jobs this commit passes: the window's final prefix, up to `to`.
        let passed = self.slots.keys().filter(|s| **s <= to).count();
        let committed: RedisResult<i64> = COMMIT
            .key(keys::lease_key(&ns, self.p))
            .key(keys::done_key(&ns, self.p))
            .key(keys::stream_key(&ns, self.p))
            .key(keys::counts_key(&ns, self.p))
            .arg(&self.lease)
            .arg(format!("{to}-0"))
            .arg(format!("{to}-1"))
            .arg(passed)
            .invoke_async(&mut self.shared.conn.clone())
            .await;
        match committed {
            Ok(0) => {
                tracing::warn!(partition = self.p, "partition lease lost at commit");
                false
            }
            Ok(_) => {
                // Everything up to `to` is committed: forget it, and let
                // keys held back by their uncommitted count go on.
                let gone: Vec<u64> = self.slots.keys().copied().filter(|s| *s <= to).collect();
                let mut freed = HashSet::new();
                for seq in gone {
                    let Some(slot) = self.slots.remove(&seq) else {
                        continue;
                    };
                    self.shared
                        .window_bytes
                        .fetch_sub(slot.bytes, Ordering::Relaxed);
                    if let Some(state) = self.keys.get_mut(&slot.key) {
                        state.uncommitted = state.uncommitted.saturating_sub(1);
                        freed.insert(slot.key);
                    }
                }
                for key in freed {
                    self.next_of(&key);
                }
                self.committed = Some(to);
                true
            }
            Err(err) => {
                tracing::warn!(partition = self.p, error = %err, "could not commit; retrying");
                true
            }
        }
    }

    async fn release(&mut self) {
        let released: RedisResult<i64> = RELEASE
            .key(keys::lease_key(self.ns(), self.p))
            .arg(&self.lease)
            .invoke_async(&mut self.shared.conn.clone())
            .await;
        match released {
            Ok(_) => tracing::info!(partition = self.p, "partition handed over"),
            Err(err) => {
                tracing::warn!(partition = self.p, error = %err, "could not give the lease up; it expires")
            }
        }
    }
}

/// The seq of stream entry id `<seq>-<n>`.
fn stream_seq(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(seq, _)| seq.parse().ok())
}

impl<T> Drop for Partition<T> {
    /// Gives the bytes of the jobs still held back to the worker's budget.
    fn drop(&mut self) {
        let held: usize = self.slots.values().map(|slot| slot.bytes).sum();
        self.shared.window_bytes.fetch_sub(held, Ordering::Relaxed);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads a partition's stream after `from`, in batches of up to `count`,
/// into `tx`, until stopped.
/// How much one read of a stream fetches: about `bytes`, judged by the
/// largest entry read lately (at first `largest`, the largest a job can
/// be), and at most `max_count` entries. Redis cannot cap a read by bytes,
/// so a read of small entries followed by large ones can exceed `bytes`;
/// a large entry keeps the next reads small.
struct Reads {
    max_count: usize,
    bytes: usize,
    largest: usize,
}

impl Reads {
    fn count(&self) -> usize {
        (self.bytes / self.largest.max(1)).clamp(1, self.max_count.max(1))
    }
}

/// The bytes of a stream entry's fields.
fn entry_bytes(entry: &StreamId) -> usize {
    entry
        .map
        .values()
        .map(|v| match v {
            redis::Value::BulkString(b) => b.len(),
            _ => 0,
        })
        .sum()
}

async fn read(
    mut conn: Conn,
    stream: String,
    mut from: String,
    mut reads: Reads,
    block: Duration,
    tx: mpsc::Sender<Vec<StreamId>>,
    stopped: watch::Receiver<bool>,
) {
    while !*stopped.borrow() {
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        let reply: RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(reads.count())
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS")
            .arg(&stream)
            .arg(&from)
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(reply) => {
                let entries: Vec<StreamId> = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
                if let Some(last) = entries.last() {
                    from.clone_from(&last.id);
                    // The largest entry lately: a big one keeps reads small
                    // for a while, and they grow back by halves.
                    let largest = entries.iter().map(entry_bytes).max().unwrap_or(1);
                    reads.largest = largest.max(reads.largest / 2);
                    permit.send(entries);
                }
            }
            // The partition starts again from its committed position (its
            // owner ends it and takes it again): the Redis server that failed
            // may have been replaced by a replica that lacks the last writes
            // (a failover), among them the final records of jobs this owner
            // holds as done. Read again, such jobs run again, are recognised
            // as applied by their ids, and are recorded again.
            Err(err) => {
                tracing::warn!(stream = %stream, error = %err, "reading jobs failed; the partition starts again from its last commit");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_exactly_one_preferred_owner() {
        let live: Vec<String> = (0..3).map(|i| format!("kvq-worker-{i}")).collect();
        let mut owners = vec![0; 16];
        let mut shares = Vec::new();
        for w in &live {
            let mine = preferred(&live, w, 16);
            shares.push(mine.len());
            for p in mine {
                owners[usize::from(p)] += 1;
            }
        }
        assert!(owners.iter().all(|&n| n == 1), "{owners:?}");
        assert!(shares.iter().all(|&n| n >= 2), "{shares:?}");
    }

    #[test]
    fn shares_differ_by_at_most_one() {
        for n in 1..=8 {
            for partitions in [16, 32, 64] {
                let live: Vec<String> = (0..n).map(|i| format!("kvq-worker-{i}")).collect();
                let shares: Vec<usize> = live
                    .iter()
                    .map(|w| preferred(&live, w, partitions).len())
                    .collect();
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(
                    max.zip(min).is_some_and(|(max, min)| max - min <= 1),
                    "{n} workers, {partitions} partitions: {shares:?}"
                );
                assert_eq!(shares.iter().sum::<usize>(), usize::from(partitions));
            }
        }
    }

    #[test]
    fn a_worker_joining_or_leaving_moves_little_more_than_its_share() {
        for n in 2..=6 {
            let all: Vec<String> = (0..n).map(|i| format!("kvq-worker-{i}-x")).collect();
            let fewer = &all[..n - 1];
            let before = assignment(&all, 32);
            let after = assignment(fewer, 32);
            let leaver = all[n - 1].as_str();
            let share = before.values().filter(|w| **w == leaver).count();
            let moved = (0..32).filter(|p| before[p] != after[p]).count();
            // Its share must move; balancing moves a few more at most.
            assert!(
                moved >= share && moved <= share + 32 / n,
                "{n}: {moved} moved, share {share}"
            );
        }
    }
}
