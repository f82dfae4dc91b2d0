//! The consumer side of the queue: [`StreamsBackend`], the apalis backend
//! on a Redis stream with a consumer group (see the parent module's doc).

use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
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
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisResult, Script};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::StreamsConfig;

/// Where a fetched job came from; carried in the task's extensions.
#[derive(Debug, Clone)]
struct Entry {
    stream_id: String,
    task_id: String,
    runs: usize,
    job: Arc<str>,
}

/// What the fetcher and the finishing layer share.
struct Shared {
    conn: ConnectionManager,
    config: StreamsConfig,
    retry_key: String,
    /// Stream ids of the jobs this worker holds (buffered or running); only
    /// these are refreshed, so a job whose ack failed is re-run elsewhere.
    held: Mutex<HashSet<String>>,
}

/// Acknowledges and deletes `stream_id`.
fn ack_cmd(config: &StreamsConfig, stream_id: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("XACK")
        .arg(&config.stream)
        .arg(&config.group)
        .arg(stream_id)
        .ignore();
    pipe.cmd("XDEL").arg(&config.stream).arg(stream_id).ignore();
    pipe
}

/// Replaces a held entry by a copy with `runs`, on the stream now or in the
/// retry set for `delay` ms. Does nothing if the entry is no longer pending
/// (another worker took it over and finished it).
const RELEASE: &str = r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
local delay = tonumber(ARGV[6])
if delay <= 0 then
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[3], 'runs', ARGV[4], 'job', ARGV[5])
else
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('ZADD', KEYS[2], now + delay, cjson.encode({ARGV[3], ARGV[4], ARGV[5]}))
end
return 1
";

/// Moves due retries back to the stream.
const PROMOTE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, m in ipairs(due) do
  local j = cjson.decode(m)
  redis.call('XADD', KEYS[1], '*', 'id', j[1], 'runs', j[2], 'job', j[3])
  redis.call('ZREM', KEYS[2], m)
end
return #due
";

/// Resets the idle time of the entries in `ARGV[3..]` that `ARGV[2]` still
/// holds (not those another worker took over meanwhile).
const REFRESH: &str = r"
local held = {}
for i = 3, #ARGV do held[ARGV[i]] = true end
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
for _, e in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])) do
  if held[e[1]] then args[#args + 1] = e[1] end
end
if #args == 4 then return 0 end
args[#args + 1] = 'JUSTID'
redis.call('XCLAIM', unpack(args))
return #args - 5
";

/// Forgets consumers that hold nothing and were not seen for `ARGV[2]` ms.
const PRUNE: &str = r"
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
";

impl Shared {
    /// The held set; a panic elsewhere while holding the lock cannot leave
    /// it inconsistent (each use is one insert, remove or copy).
    fn held(&self) -> MutexGuard<'_, HashSet<String>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn ack(&self, stream_id: &str) -> RedisResult<()> {
        ack_cmd(&self.config, stream_id)
            .exec_async(&mut self.conn.clone())
            .await
    }

    async fn release(&self, e: &Entry, runs: usize, delay: Duration) -> RedisResult<()> {
        static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));
        SCRIPT
            .key(&self.config.stream)
            .key(&self.retry_key)
            .arg(&self.config.group)
            .arg(&e.stream_id)
            .arg(&e.task_id)
            .arg(runs)
            .arg(&*e.job)
            .arg(delay.as_millis() as u64)
            .invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map(drop)
    }

    /// Settles a finished run of `e`.
    async fn finish(&self, e: &Entry, result: &Result<(), &BoxDynError>) {
        let runs = e.runs + 1;
        let outcome = match result {
            Ok(()) => self.ack(&e.stream_id).await,
            Err(err) if err.downcast_ref::<AbortError>().is_some() => self.ack(&e.stream_id).await,
            // Not a failure: the job is not ready yet. Re-queue it without
            // counting a run.
            Err(err) if err.downcast_ref::<DeferredError>().is_some() => {
                self.release(e, e.runs, self.config.defer_delay).await
            }
            Err(err) if runs >= self.config.max_attempts as usize => {
                tracing::error!(task_id = %e.task_id, runs, error = %err, "job dropped: retries exhausted");
                self.ack(&e.stream_id).await
            }
            Err(err) => {
                let delay = match err.downcast_ref::<RetryAfterError>() {
                    Some(r) => r.get_duration(),
                    None => self
                        .config
                        .retry_delay
                        .saturating_mul(1 << (runs - 1).min(20)),
                };
                self.release(e, runs, delay.min(self.config.max_retry_delay))
                    .await
            }
        };
        if let Err(err) = outcome {
            // The entry stays pending and is re-run after `claim_after`.
            tracing::warn!(task_id = %e.task_id, error = %err, "could not settle a finished job");
        }
        self.held().remove(&e.stream_id);
    }
}

/// The apalis backend.
pub struct StreamsBackend<T> {
    shared: Arc<Shared>,
    /// Dedicated to `XREADGROUP BLOCK`, which would stall other commands.
    block_conn: ConnectionManager,
    running: Option<Running<T>>,
    closing: Option<BoxFuture<'static, ()>>,
}

struct Running<T> {
    rx: mpsc::Receiver<Task<T>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl<T> StreamsBackend<T> {
    /// A backend on the Redis at `client` (connects lazily).
    pub fn new(client: redis::Client, config: StreamsConfig) -> RedisResult<Self> {
        let conn_config = |timeout| {
            ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(config.timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(Duration::from_millis(500))
        };
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), conn_config(config.timeout))?;
        let block_conn = ConnectionManager::new_lazy_with_config(
            client,
            conn_config(config.block + config.timeout),
        )?;
        let retry_key = config.retry_key();
        Ok(Self {
            shared: Arc::new(Shared {
                conn,
                config,
                retry_key,
                held: Mutex::default(),
            }),
            block_conn,
            running: None,
            closing: None,
        })
    }
}

impl<T: DeserializeOwned + Send + 'static> Backend for StreamsBackend<T> {
    type Task = Task<T>;
    type Error = redis::RedisError;

    fn poll_ready(&mut self, _: &mut Context<'_>, worker: &WorkerContext) -> Poll<RedisResult<()>> {
        if self.running.is_none() && self.closing.is_none() {
            let (tx, rx) = mpsc::channel(self.shared.config.buffer.max(1));
            let (stop, stopped) = watch::channel(false);
            let consumer = worker.name().to_owned();
            let fetcher = Fetcher {
                shared: self.shared.clone(),
                conn: self.block_conn.clone(),
                consumer: consumer.clone(),
                tx,
                stopped: stopped.clone(),
                _job: PhantomData,
            };
            let tasks = vec![
                tokio::spawn(fetcher.run()),
                tokio::spawn(maintain(self.shared.clone(), consumer, stopped)),
            ];
            self.running = Some(Running { rx, stop, tasks });
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

/// Stops the fetcher, then puts the jobs fetched but never started back on
/// the stream for other workers.
async fn close<T: Send + 'static>(shared: Arc<Shared>, mut running: Running<T>) {
    let _ = running.stop.send(true);
    for task in running.tasks {
        let _ = task.await;
    }
    running.rx.close();
    let mut released = 0;
    while let Some(task) = running.rx.recv().await {
        if let Some(e) = task.data().get::<Entry>() {
            if let Err(err) = shared.release(e, e.runs, Duration::ZERO).await {
                tracing::warn!(task_id = %e.task_id, error = %err, "could not release a job; it is re-run after claim_after");
            }
            shared.held().remove(&e.stream_id);
            released += 1;
        }
    }
    tracing::info!(released, "queue backend closed");
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

/// The backend's layer: settles each job once its handler returns.
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
                shared.finish(&e, &result.as_ref().map(drop)).await;
            }
            result
        }
        .boxed()
    }
}

/// Reads jobs into the worker's buffer.
struct Fetcher<T> {
    shared: Arc<Shared>,
    conn: ConnectionManager,
    consumer: String,
    tx: mpsc::Sender<Task<T>>,
    stopped: watch::Receiver<bool>,
    _job: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned + Send + 'static> Fetcher<T> {
    async fn run(mut self) {
        let config = self.shared.config.clone();
        let cap = config.buffer.max(1);
        // After a restart under the same name, first re-run what we held.
        let mut own_first = Some("0".to_owned());
        let mut next_claim = Instant::now();
        let mut delay = Duration::from_millis(50);
        while !*self.stopped.borrow() {
            // Wait for room for half a buffer, so reads come in batches.
            tokio::select! {
                permits = self.tx.reserve_many(cap.div_ceil(2)) => if permits.is_err() { return },
                _ = self.stopped.changed() => return,
            }
            let count = self.tx.capacity();
            let fetched = self.fetch(count, &mut own_first, &mut next_claim).await;
            match fetched {
                Ok(entries) => {
                    delay = Duration::from_millis(50);
                    for (entry, reclaimed) in entries {
                        self.forward(entry, reclaimed).await;
                    }
                }
                Err(err) => {
                    if err.code() == Some("NOGROUP") {
                        let created = redis::cmd("XGROUP")
                            .arg("CREATE")
                            .arg(&config.stream)
                            .arg(&config.group)
                            .arg("0")
                            .arg("MKSTREAM")
                            .exec_async(&mut self.shared.conn.clone())
                            .await;
                        match created {
                            Err(e) if e.code() != Some("BUSYGROUP") => {
                                tracing::warn!(error = %e, "could not create the consumer group")
                            }
                            _ => continue,
                        }
                    } else {
                        tracing::warn!(error = %err, "fetching jobs failed; retrying");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = self.stopped.changed() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Up to `count` entries: our own pending ones after a restart, then
    /// abandoned ones (when due), then new ones.
    async fn fetch(
        &mut self,
        count: usize,
        own_first: &mut Option<String>,
        next_claim: &mut Instant,
    ) -> RedisResult<Vec<(StreamId, bool)>> {
        let config = self.shared.clone();
        let config = &config.config;
        if let Some(cursor) = own_first.take() {
            let own = self.read(&cursor, count, None).await?;
            if let Some(last) = own.last() {
                *own_first = Some(last.id.clone());
                return Ok(own.into_iter().map(|e| (e, true)).collect());
            }
        }
        if Instant::now() >= *next_claim {
            *next_claim = Instant::now() + config.claim_every;
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&config.stream)
                .arg(&config.group)
                .arg(&self.consumer)
                .arg(config.claim_after.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.shared.conn.clone())
                .await?;
            if !claimed.claimed.is_empty() {
                tracing::info!(
                    count = claimed.claimed.len(),
                    "took over jobs of a stopped worker"
                );
                // Look again soon: there may be more.
                *next_claim = Instant::now();
                return Ok(claimed.claimed.into_iter().map(|e| (e, true)).collect());
            }
        }
        let new = self.read(">", count, Some(config.block)).await?;
        Ok(new.into_iter().map(|e| (e, false)).collect())
    }

    async fn read(
        &mut self,
        from: &str,
        count: usize,
        block: Option<Duration>,
    ) -> RedisResult<Vec<StreamId>> {
        let config = &self.shared.config;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&config.stream).arg(from);
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.conn).await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect())
    }

    /// Turns an entry into a task for the worker; drops undecodable ones.
    async fn forward(&mut self, entry: StreamId, reclaimed: bool) {
        let field = |name: &str| entry.get::<String>(name);
        let decoded = (|| {
            let task_id = field("id").ok_or("no id")?;
            let runs: usize = field("runs").ok_or("no runs")?.parse()?;
            let job = field("job").ok_or("no job")?;
            let args: T = serde_json::from_str(&job)?;
            Ok::<_, BoxDynError>((task_id, runs, job, args))
        })();
        let (task_id, runs, job, args) = match decoded {
            Ok(d) => d,
            Err(err) => {
                // A deleted entry claimed back has no fields: nothing to run.
                if !entry.map.is_empty() {
                    tracing::error!(stream_id = %entry.id, error = %err, "dropping an undecodable job");
                }
                if let Err(err) = self.shared.ack(&entry.id).await {
                    tracing::warn!(error = %err, "could not drop an undecodable job");
                }
                return;
            }
        };
        // A job taken over from a stopped worker may have run (in part).
        let runs = runs + usize::from(reclaimed);
        let task = TaskBuilder::new(args)
            .task_id(TaskId::from_string(task_id.clone()))
            .attempt(runs)
            .data(Entry {
                stream_id: entry.id.clone(),
                task_id,
                runs,
                job: job.into(),
            })
            .build();
        self.shared.held().insert(entry.id.clone());
        // Cannot fail while `poll_close` waits for this task to end.
        let _ = self.tx.send(task).await;
    }
}

/// Periodic upkeep: due retries back to the stream, our entries refreshed,
/// long-gone consumers forgotten.
async fn maintain(shared: Arc<Shared>, consumer: String, mut stopped: watch::Receiver<bool>) {
    let config = &shared.config;
    let mut conn = shared.conn.clone();
    let (promote, refresh, prune) = (
        Script::new(PROMOTE),
        Script::new(REFRESH),
        Script::new(PRUNE),
    );
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_refresh = Instant::now();
    let mut next_prune = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let now = Instant::now();
        let promoted = promote
            .key(&config.stream)
            .key(&shared.retry_key)
            .invoke_async::<i64>(&mut conn)
            .await;
        if let Err(err) = promoted {
            tracing::warn!(error = %err, "could not move due retries to the queue");
        }
        if now >= next_refresh {
            next_refresh = now + config.refresh_every;
            let held: Vec<String> = shared.held().iter().cloned().collect();
            if !held.is_empty() {
                let refreshed = refresh
                    .key(&config.stream)
                    .arg(&config.group)
                    .arg(&consumer)
                    .arg(held)
                    .invoke_async::<i64>(&mut conn)
                    .await;
                if let Err(err) = refreshed {
                    tracing::warn!(error = %err, "could not refresh held jobs");
                }
            }
        }
        if now >= next_prune {
            next_prune = now + Duration::from_secs(60);
            let gone_ms = 10 * 60 * 1000;
            let pruned = prune
                .key(&config.stream)
                .arg(&config.group)
                .arg(gone_ms)
                .invoke_async::<i64>(&mut conn)
                .await;
            if let Err(err) = pruned {
                tracing::warn!(error = %err, "could not prune consumers");
            }
        }
    }
}
