//! A whole kvq stack for one test: the data and queue Redis (each a single
//! server, a cluster or a sentinel set), an API, workers.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use reqwest::{Client, Method, Response};
use serde_json::Value;

use crate::{KvqProcess, TestCa, TestCluster, TestRedis, TestSentinel, eventually};

/// How long a test waits for a job to end before failing.
pub const JOB_DEADLINE: Duration = Duration::from_secs(15);

/// How long a test waits for a process to start.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// Which Redis topology a role (data or queue) runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Topology {
    Single,
    Cluster,
    Sentinel,
}

/// Options for [`Stack`].
pub struct StackBuilder {
    workers: usize,
    env: Vec<(String, String)>,
    redis_args: Vec<String>,
    kv_persistent: bool,
    tls: bool,
    kv_topology: Topology,
    queue_topology: Topology,
}

impl StackBuilder {
    /// Starts this many workers (default 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// The data Redis is a [`TestCluster`] (3 masters, a replica each): the
    /// processes get `KVQ_KV_REDIS_MODE=cluster` and every node's URL in
    /// `KVQ_KV_REDIS_URL`.
    pub fn kv_cluster(mut self) -> Self {
        self.kv_topology = Topology::Cluster;
        self
    }

    /// The queue Redis is a [`TestCluster`], as [`StackBuilder::kv_cluster`]
    /// (`KVQ_QUEUE_REDIS_*`).
    pub fn queue_cluster(mut self) -> Self {
        self.queue_topology = Topology::Cluster;
        self
    }

    /// The data Redis is a [`TestSentinel`] set (master, replica, 3
    /// sentinels): the processes get `KVQ_KV_REDIS_MODE=sentinel`, the
    /// sentinels' URLs in `KVQ_KV_REDIS_URL` and the master's name in
    /// `KVQ_KV_REDIS_MASTER`. Not with [`StackBuilder::redis_tls`].
    pub fn kv_sentinel(mut self) -> Self {
        self.kv_topology = Topology::Sentinel;
        self
    }

    /// The queue Redis is a [`TestSentinel`] set, as
    /// [`StackBuilder::kv_sentinel`] (`KVQ_QUEUE_REDIS_*`).
    pub fn queue_sentinel(mut self) -> Self {
        self.queue_topology = Topology::Sentinel;
        self
    }

    /// Starts every Redis server with `--requirepass PASSWORD` (cluster and
    /// sentinel nodes with `--masterauth` too, sentinels with the same
    /// password); their URLs carry it.
    pub fn redis_password(mut self, password: &str) -> Self {
        self.redis_args = vec!["--requirepass".into(), password.into()];
        self
    }

    /// Starts the KV Redis (every node of it, in a cluster or sentinel set)
    /// with an append-only file synced on every write, so that
    /// [`TestRedis::restart`] (after [`TestRedis::stop`]'s SIGKILL) brings it
    /// back with its data, as a production data Redis would come back. The
    /// queue Redis keeps persistence off.
    pub fn kv_persistent(mut self) -> Self {
        self.kv_persistent = true;
        self
    }

    /// Starts both Redis servers TLS only, with certificates from one test
    /// CA; their URLs are `rediss://` and the kvq processes trust the CA
    /// through `SSL_CERT_FILE`. A cluster speaks TLS on its bus and
    /// replication too; sentinel sets are not built with TLS.
    pub fn redis_tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Sets an environment variable for the API and the workers.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Workers give a job up (`dead`) after two attempts with 0.5 s Redis
    /// timeouts, so that tests of dead jobs are quick.
    pub fn quick_to_give_up(self) -> Self {
        self.env("KVQ_WORKER_MAX_ATTEMPTS", "2")
            .env("KVQ_REDIS_TIMEOUT_MS", "500")
    }

    /// Turns auth on (stacks are open by default), with
    /// [`crate::TEST_JWT_SECRET`]; [`crate::token`] mints tokens for it.
    pub fn secured(self) -> Self {
        self.env("KVQ_AUTH_DISABLED", "false")
            .env("KVQ_AUTH_JWT_SECRET", crate::TEST_JWT_SECRET)
    }

    /// Starts everything and waits until it is up. The data and queue
    /// Redis start side by side (a cluster takes a few seconds to form).
    pub async fn start(self) -> Stack {
        let args: Vec<&str> = self.redis_args.iter().map(String::as_str).collect();
        let ca = self.tls.then(TestCa::new);
        let (kv, queue) = std::thread::scope(|scope| {
            let kv = scope
                .spawn(|| start_role(self.kv_topology, &args, self.kv_persistent, ca.as_ref()));
            let queue = start_role(self.queue_topology, &args, false, ca.as_ref());
            (kv.join().unwrap(), queue)
        });
        let mut stack = Stack {
            api: None,
            workers: Vec::new(),
            base: String::new(),
            http: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            extra_env: self.env,
            kv,
            queue,
            ca,
        };
        stack.start_api().await;
        for _ in 0..self.workers {
            stack.start_worker().await;
        }
        stack
    }
}

/// Starts one role's Redis in `topology`.
fn start_role(
    topology: Topology,
    args: &[&str],
    persistent: bool,
    ca: Option<&TestCa>,
) -> RedisRole {
    match topology {
        Topology::Single => {
            let mut args = args.to_vec();
            if persistent {
                // Later arguments win over TestRedis' `--appendonly no`.
                args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
            }
            RedisRole::Single(match ca {
                Some(ca) => TestRedis::start_tls(ca, &args),
                None => TestRedis::start_with(&args),
            })
        }
        Topology::Cluster => {
            let mut builder = TestCluster::builder().args(args);
            if persistent {
                builder = builder.persistent();
            }
            if let Some(ca) = ca {
                builder = builder.tls(ca);
            }
            RedisRole::Cluster(builder.start())
        }
        Topology::Sentinel => {
            assert!(ca.is_none(), "the harness builds no sentinel set with TLS");
            let mut builder = TestSentinel::builder().args(args);
            if persistent {
                builder = builder.persistent();
            }
            RedisRole::Sentinel(builder.start())
        }
    }
}

/// The data or the queue Redis of a [`Stack`], in the topology the test
/// chose.
///
/// A single server is reached through `Deref` as a [`TestRedis`] (so
/// `stack.kv.stop()`, `stack.queue.port()` work as they always did); that
/// panics for a cluster or sentinel set, which [`RedisRole::cluster`] and
/// [`RedisRole::sentinel`] give. The inherent methods here work in every
/// mode.
pub enum RedisRole {
    /// One `redis-server`.
    Single(TestRedis),
    /// A Redis Cluster.
    Cluster(TestCluster),
    /// A master and replica watched by sentinels.
    Sentinel(TestSentinel),
}

impl RedisRole {
    /// `KVQ_*_REDIS_MODE`: `single`, `cluster` or `sentinel`.
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Single(_) => "single",
            Self::Cluster(_) => "cluster",
            Self::Sentinel(_) => "sentinel",
        }
    }

    /// `KVQ_*_REDIS_URL`: the server's URL, the cluster's seed list (every
    /// node), or the sentinels' URLs.
    pub fn url(&self) -> String {
        match self {
            Self::Single(redis) => redis.url(),
            Self::Cluster(cluster) => cluster.urls(),
            Self::Sentinel(set) => set.urls(),
        }
    }

    /// `KVQ_*_REDIS_MASTER`, in sentinel mode.
    pub fn master_name(&self) -> Option<&'static str> {
        match self {
            Self::Sentinel(set) => Some(set.master_name()),
            _ => None,
        }
    }

    /// The cluster; panics in another mode.
    pub fn cluster(&self) -> &TestCluster {
        match self {
            Self::Cluster(cluster) => cluster,
            other => panic!("this Redis is {}, not a cluster", other.mode()),
        }
    }

    /// The cluster, to kill and restart nodes; panics in another mode.
    pub fn cluster_mut(&mut self) -> &mut TestCluster {
        match self {
            Self::Cluster(cluster) => cluster,
            other => panic!("this Redis is {}, not a cluster", other.mode()),
        }
    }

    /// The sentinel set; panics in another mode.
    pub fn sentinel(&self) -> &TestSentinel {
        match self {
            Self::Sentinel(set) => set,
            other => panic!("this Redis is {}, not a sentinel set", other.mode()),
        }
    }

    /// The sentinel set, to kill and restart nodes; panics in another mode.
    pub fn sentinel_mut(&mut self) -> &mut TestSentinel {
        match self {
            Self::Sentinel(set) => set,
            other => panic!("this Redis is {}, not a sentinel set", other.mode()),
        }
    }

    /// Runs a command and returns its answer: on the server, on the master
    /// of the command's key (cluster), or on the current master (sentinel).
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args).unwrap()
    }

    /// [`RedisRole::cmd`] that may fail.
    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        match self {
            Self::Single(redis) => redis.try_cmd(args),
            Self::Cluster(cluster) => cluster.try_cmd(args),
            Self::Sentinel(set) => match set.try_master() {
                Some(port) => set.node(port).try_cmd(args),
                None => Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no sentinel answers",
                ))),
            },
        }
    }

    /// How many jobs the queue's partition streams hold (namespace `kvq`),
    /// summed over a cluster's masters.
    pub fn pending_jobs(&self) -> i64 {
        self.try_pending_jobs().unwrap_or(0)
    }

    /// [`RedisRole::pending_jobs`], or `None` while the Redis does not
    /// answer.
    pub fn try_pending_jobs(&self) -> Option<i64> {
        match self {
            Self::Single(redis) => redis.try_pending_jobs(),
            Self::Cluster(cluster) => cluster.try_pending_jobs(),
            Self::Sentinel(set) => set.try_pending_jobs(),
        }
    }

    /// CPU time used so far, in seconds, summed over the live data nodes.
    pub fn cpu_seconds(&self) -> f64 {
        match self {
            Self::Single(redis) => redis.cpu_seconds(),
            Self::Cluster(cluster) => cluster.cpu_seconds(),
            Self::Sentinel(set) => set.cpu_seconds(),
        }
    }

    /// Every key (on every master of a cluster), sorted.
    pub fn keys(&self) -> Vec<String> {
        match self {
            Self::Single(redis) => redis.keys(),
            Self::Cluster(cluster) => cluster.keys(),
            Self::Sentinel(set) => set.master_node().keys(),
        }
    }

    /// Every running data server: the one server, every live cluster node,
    /// or the live master and replica (sentinels left out).
    pub fn live_nodes(&self) -> Vec<&TestRedis> {
        let nodes: &[TestRedis] = match self {
            Self::Single(redis) => std::slice::from_ref(redis),
            Self::Cluster(cluster) => cluster.nodes(),
            Self::Sentinel(set) => set.nodes(),
        };
        nodes.iter().filter(|n| n.is_running()).collect()
    }
}

impl Deref for RedisRole {
    type Target = TestRedis;

    /// The single server; panics for a cluster or a sentinel set.
    fn deref(&self) -> &TestRedis {
        match self {
            Self::Single(redis) => redis,
            other => panic!(
                "this Redis is {}: use .cluster() / .sentinel() for its nodes",
                other.mode()
            ),
        }
    }
}

impl DerefMut for RedisRole {
    fn deref_mut(&mut self) -> &mut TestRedis {
        match self {
            Self::Single(redis) => redis,
            other => panic!(
                "this Redis is {}: use .cluster_mut() / .sentinel_mut() for its nodes",
                other.mode()
            ),
        }
    }
}

/// A running stack. Everything is stopped on drop.
pub struct Stack {
    // kvq processes first: fields drop in order, so they stop before Redis.
    api: Option<KvqProcess>,
    /// The running workers.
    pub workers: Vec<KvqProcess>,
    /// The KV Redis.
    pub kv: RedisRole,
    /// The queue Redis.
    pub queue: RedisRole,
    /// The CA of the Redis servers' certificates, with TLS.
    pub ca: Option<TestCa>,
    base: String,
    http: Client,
    extra_env: Vec<(String, String)>,
}

impl Stack {
    /// A stack with one worker and default settings.
    pub async fn start() -> Self {
        Self::builder().workers(1).start().await
    }

    /// Options.
    pub fn builder() -> StackBuilder {
        StackBuilder {
            workers: 1,
            env: Vec::new(),
            redis_args: Vec::new(),
            kv_persistent: false,
            tls: false,
            kv_topology: Topology::Single,
            queue_topology: Topology::Single,
        }
    }

    /// The environment every kvq process of this stack gets. The
    /// `KVQ_*_REDIS_MODE` variables (and `_MASTER`) are set for a cluster or
    /// sentinel set only, so a single server's environment is as before.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("KVQ_KV_REDIS_URL".to_owned(), self.kv.url()),
            ("KVQ_QUEUE_REDIS_URL".to_owned(), self.queue.url()),
        ];
        for (role, prefix) in [(&self.kv, "KVQ_KV_REDIS"), (&self.queue, "KVQ_QUEUE_REDIS")] {
            if role.mode() != "single" {
                env.push((format!("{prefix}_MODE"), role.mode().to_owned()));
            }
            if let Some(name) = role.master_name() {
                env.push((format!("{prefix}_MASTER"), name.to_owned()));
            }
        }
        env.extend([
            ("KVQ_BIND".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "KVQ_WORKER_HEALTH_BIND".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            ("KVQ_AUTH_DISABLED".to_owned(), "true".to_owned()),
        ]);
        if let Some(ca) = &self.ca {
            env.push((
                "SSL_CERT_FILE".to_owned(),
                ca.pem_file().display().to_string(),
            ));
        }
        env.extend(self.extra_env.iter().cloned());
        env
    }

    async fn start_api(&mut self) {
        let api = KvqProcess::spawn("kvq-api", &self.env());
        let line = api.wait_for_log("kvq-api listening", START_DEADLINE).await;
        let port = line["port"].as_u64().unwrap();
        self.base = format!("http://127.0.0.1:{port}");
        self.api = Some(api);
    }

    /// Kills the API with SIGKILL, as a crash would, and starts a new one
    /// (on a new port: [`Stack::base`] and [`Stack::request`] follow it);
    /// returns once it listens. Everything the old one was doing is cut
    /// off wherever it was.
    pub async fn restart_api(&mut self) {
        if let Some(api) = self.api.take() {
            api.signal("KILL");
            drop(api);
        }
        self.start_api().await;
    }

    /// Starts one more worker and waits until it runs.
    pub async fn start_worker(&mut self) -> &mut KvqProcess {
        self.start_worker_with_env(&[]).await
    }

    /// Starts one more worker with `extra` environment variables on top of
    /// the stack's (later entries win; the API does not get them), and
    /// waits until it runs.
    pub async fn start_worker_with_env(&mut self, extra: &[(&str, &str)]) -> &mut KvqProcess {
        self.start_workers_with_env(1, extra).await;
        self.workers.last_mut().unwrap()
    }

    /// Starts `n` more workers at once (all spawned before any is waited
    /// for, so that they start together), with `extra` environment
    /// variables as [`Stack::start_worker_with_env`], and waits until all
    /// run.
    pub async fn start_workers_with_env(&mut self, n: usize, extra: &[(&str, &str)]) {
        let mut env = self.env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let started: Vec<KvqProcess> = (0..n)
            .map(|_| KvqProcess::spawn("kvq-worker", &env))
            .collect();
        for worker in &started {
            worker.wait_for_log("worker running", START_DEADLINE).await;
        }
        self.workers.extend(started);
    }

    /// Fails if any log line of the API or a worker so far contains
    /// `secret`.
    pub fn assert_no_log_line_shows(&mut self, secret: &str) {
        let mut lines = self.api().logs();
        for worker in &self.workers {
            lines.extend(worker.logs());
        }
        for line in lines {
            assert!(!line.contains(secret), "a log line shows a secret: {line}");
        }
    }

    /// The API process.
    pub fn api(&mut self) -> &mut KvqProcess {
        self.api.as_mut().unwrap()
    }

    /// `http://127.0.0.1:PORT` of the API.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to the API; `path` is sent as given (already encoded).
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// `POST /v1/kv` with `{key, value}`.
    pub async fn create(&self, key: &str, value: Value) -> Response {
        self.request(Method::POST, "/v1/kv")
            .json(&serde_json::json!({"key": key, "value": value}))
            .send()
            .await
            .unwrap()
    }

    /// `PUT /v1/kv/{path}` with `body`.
    pub async fn put(&self, path: &str, body: Value) -> Response {
        self.request(Method::PUT, &format!("/v1/kv/{path}"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `DELETE /v1/kv/{path}`.
    pub async fn delete(&self, path: &str) -> Response {
        self.request(Method::DELETE, &format!("/v1/kv/{path}"))
            .send()
            .await
            .unwrap()
    }

    /// `GET /v1/kv/{path}`.
    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, &format!("/v1/kv/{path}"))
            .send()
            .await
            .unwrap()
    }

    /// `GET /v1/jobs/{id}`'s body.
    pub async fn job(&self, id: &str) -> Value {
        let response = self
            .request(Method::GET, &format!("/v1/jobs/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET /v1/jobs/{id}");
        response.json().await.unwrap()
    }

    /// A job that died: `key` created with no worker running, then run by
    /// a new worker while the KV Redis refuses every write (out of memory,
    /// an error Redis answers, which counts as an attempt; an unreachable
    /// Redis does not), until its retries ran out (use with
    /// [`StackBuilder::quick_to_give_up`] and no workers). The KV Redis
    /// takes writes again when this returns; returns the job's id.
    pub async fn dead_job(&mut self, key: &str, value: Value) -> String {
        let id = Self::job_id(self.create(key, value).await).await;
        self.refuse_kv_writes(true);
        self.start_worker().await;
        let job = self.wait_job(&id).await;
        self.refuse_kv_writes(false);
        assert_eq!(job["status"], "dead", "{job}");
        id
    }

    /// Makes the KV Redis (every live node of it) answer every write with
    /// an out-of-memory error (`maxmemory` 1 byte, no eviction), or take
    /// writes again. Reads still work.
    pub fn refuse_kv_writes(&self, refuse: bool) {
        let limit = if refuse { "1" } else { "0" };
        for node in self.kv.live_nodes() {
            let _: () = node.cmd(&[
                "CONFIG",
                "SET",
                "maxmemory-policy",
                "noeviction",
                "maxmemory",
                limit,
            ]);
        }
    }

    /// The version of `key`, or `None` while it does not exist.
    pub async fn version_of(&self, key: &str) -> Option<u64> {
        let response = self.get(key).await;
        if response.status() == 404 {
            return None;
        }
        let body: Value = response.json().await.unwrap();
        body["version"].as_u64()
    }

    /// `GET /metrics`' text.
    pub async fn metrics(&self) -> String {
        let response = self.request(Method::GET, "/metrics").send().await.unwrap();
        assert_eq!(response.status(), 200, "GET /metrics");
        response.text().await.unwrap()
    }

    /// The job id of a 202 response.
    pub async fn job_id(accepted: Response) -> String {
        assert_eq!(accepted.status(), 202, "the write was not accepted");
        let body: Value = accepted.json().await.unwrap();
        body["job_id"].as_str().unwrap().to_owned()
    }

    /// Waits until the workers are running `count` jobs between them (their
    /// `kvq_worker_jobs_in_flight` gauges).
    pub async fn wait_pending(&self, count: i64) {
        eventually(
            Duration::from_secs(10),
            "the workers to run the jobs",
            || async { (self.jobs_in_flight().await == Some(count)).then_some(()) },
        )
        .await;
    }

    /// The jobs the running workers are running, from their `/metrics`;
    /// `None` if a worker does not answer.
    pub async fn jobs_in_flight(&self) -> Option<i64> {
        let mut total = 0;
        for index in 0..self.workers.len() {
            total += self
                .worker_metric(index, "kvq_worker_jobs_in_flight")
                .await?;
        }
        Some(total)
    }

    /// The value of sample `name` (one without labels, such as
    /// `kvq_worker_jobs_fenced_total`) on `/metrics` of worker `index` of
    /// [`Stack::workers`]; `None` if it does not answer (a frozen worker
    /// does not) or has no such sample.
    pub async fn worker_metric(&self, index: usize, name: &str) -> Option<i64> {
        let text = self.worker_metrics(index).await?;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))?
            .trim()
            .parse::<i64>()
            .ok()
    }

    /// The `/metrics` text of worker `index` of [`Stack::workers`]; `None`
    /// if it does not answer.
    pub async fn worker_metrics(&self, index: usize) -> Option<String> {
        let port = self.workers[index]
            .logs()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find_map(|line| line["health_port"].as_u64())?;
        self.http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// Waits until the job of a 202 response is final and returns its record.
    pub async fn finished(&self, accepted: Response) -> Value {
        let id = Self::job_id(accepted).await;
        self.wait_job(&id).await
    }

    /// Waits until job `id` is `succeeded`, `failed` or `dead`.
    pub async fn wait_job(&self, id: &str) -> Value {
        self.wait_job_within(id, JOB_DEADLINE).await
    }

    /// [`Stack::wait_job`] with its own deadline.
    pub async fn wait_job_within(&self, id: &str, deadline: Duration) -> Value {
        eventually(deadline, &format!("job {id} to finish"), || async {
            let job = self.job(id).await;
            matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "dead")
            )
            .then_some(job)
        })
        .await
    }
}
