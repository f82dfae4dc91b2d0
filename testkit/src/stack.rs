//! A whole kvq stack for one test: two Redis servers, an API, workers.

use std::time::Duration;

use reqwest::{Client, Method, Response};
use serde_json::Value;

use crate::{KvqProcess, TestCa, TestRedis, eventually};

/// How long a test waits for a job to end before failing.
pub const JOB_DEADLINE: Duration = Duration::from_secs(15);

/// How long a test waits for a process to start.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// Options for [`Stack`].
pub struct StackBuilder {
    workers: usize,
    env: Vec<(String, String)>,
    redis_args: Vec<String>,
    kv_persistent: bool,
    tls: bool,
}

impl StackBuilder {
    /// Starts this many workers (default 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Starts both Redis servers with `--requirepass PASSWORD`; their URLs
    /// carry it.
    pub fn redis_password(mut self, password: &str) -> Self {
        self.redis_args = vec!["--requirepass".into(), password.into()];
        self
    }

    /// Starts the KV Redis with an append-only file synced on every write,
    /// so that [`TestRedis::restart`] (after [`TestRedis::stop`]'s SIGKILL)
    /// brings it back with its data, as a production data Redis would come
    /// back. The queue Redis keeps persistence off.
    pub fn kv_persistent(mut self) -> Self {
        self.kv_persistent = true;
        self
    }

    /// Starts both Redis servers TLS only, with certificates from one test
    /// CA; their URLs are `rediss://` and the kvq processes trust the CA
    /// through `SSL_CERT_FILE`.
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

    /// Starts everything and waits until it is up.
    pub async fn start(self) -> Stack {
        let args: Vec<&str> = self.redis_args.iter().map(String::as_str).collect();
        let mut kv_args = args.clone();
        if self.kv_persistent {
            // Later arguments win over TestRedis' `--appendonly no`.
            kv_args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
        }
        let ca = self.tls.then(TestCa::new);
        let (kv, queue) = match &ca {
            Some(ca) => (
                TestRedis::start_tls(ca, &kv_args),
                TestRedis::start_tls(ca, &args),
            ),
            None => (
                TestRedis::start_with(&kv_args),
                TestRedis::start_with(&args),
            ),
        };
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

/// A running stack. Everything is stopped on drop.
pub struct Stack {
    // kvq processes first: fields drop in order, so they stop before Redis.
    api: Option<KvqProcess>,
    /// The running workers.
    pub workers: Vec<KvqProcess>,
    /// The KV Redis.
    pub kv: TestRedis,
    /// The queue Redis.
    pub queue: TestRedis,
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
        }
    }

    /// The environment every kvq process of this stack gets.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("KVQ_KV_REDIS_URL".to_owned(), self.kv.url()),
            ("KVQ_QUEUE_REDIS_URL".to_owned(), self.queue.url()),
            ("KVQ_BIND".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "KVQ_WORKER_HEALTH_BIND".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            ("KVQ_AUTH_DISABLED".to_owned(), "true".to_owned()),
        ];
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

    /// Makes the KV Redis answer every write with an out-of-memory error
    /// (`maxmemory` 1 byte, no eviction), or take writes again. Reads still
    /// work.
    pub fn refuse_kv_writes(&self, refuse: bool) {
        let limit = if refuse { "1" } else { "0" };
        let _: () = self.kv.cmd(&[
            "CONFIG",
            "SET",
            "maxmemory-policy",
            "noeviction",
            "maxmemory",
            limit,
        ]);
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
        let port = self.workers[index]
            .logs()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find_map(|line| line["health_port"].as_u64())?;
        let text = self
            .http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))?
            .trim()
            .parse::<i64>()
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
