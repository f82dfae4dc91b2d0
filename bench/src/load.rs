//! Load that needs to know about kvq: bursts timed until applied, a
//! steady write rate with write-to-visible latency, and what a list page
//! costs the data Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvq_shared::Config;
use kvq_shared::config::RedisTarget;
use kvq_shared::connection::{Conn, Connector, query_all};
use kvq_shared::keys;
use kvq_testkit::{KvqProcess, TestRedis};
use reqwest::Client;
use serde_json::json;
use tokio::sync::Mutex;

/// A 100-byte value, as redis-benchmark's `-d 100`.
pub const VALUE_100_BYTES: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz";

/// A client for load: keep-alive pool, short timeouts.
pub fn client() -> Client {
    Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// Starts `kvq-api` with `env`, listening on `port`, and waits until its
/// `/readyz` answers 200; returns the process and its base URL.
pub async fn start_api(env: &[(String, String)], port: u16) -> (KvqProcess, String) {
    let mut env = env.to_vec();
    env.retain(|(k, _)| k != "KVQ_BIND");
    env.push(("KVQ_BIND".to_owned(), format!("127.0.0.1:{port}")));
    let api = KvqProcess::spawn("kvq-api", &env);
    let base = format!("http://127.0.0.1:{port}");
    let probe = client();
    kvq_testkit::eventually(Duration::from_secs(20), "kvq-api to be ready", || async {
        let r = probe.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    (api, base)
}

/// Starts `kvq-worker` with `env` (and a free health port) and waits until
/// its `/healthz` answers 200.
pub async fn start_worker(env: &[(String, String)]) -> KvqProcess {
    let (worker, health) = spawn_worker(env);
    kvq_testkit::eventually(Duration::from_secs(20), "kvq-worker to be up", || async {
        let r = client()
            .get(format!("http://127.0.0.1:{health}/healthz"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    worker
}

/// Starts `kvq-worker` with `env` and a free health port, without waiting
/// for it; answers the process and its health port.
pub fn spawn_worker(env: &[(String, String)]) -> (KvqProcess, u16) {
    let health = kvq_testkit::free_port();
    let mut env = env.to_vec();
    env.push((
        "KVQ_WORKER_HEALTH_BIND".to_owned(),
        format!("127.0.0.1:{health}"),
    ));
    (KvqProcess::spawn("kvq-worker", &env), health)
}

/// wrk script: POST creates of fresh keys under `tag`, unique across wrk's
/// threads.
pub fn post_script(tag: &str) -> String {
    format!(
        r#"local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  return wrk.format(nil, "/v1/kv", nil,
    '{{"key":"{tag}/' .. id .. '/' .. counter .. '","value":"{VALUE_100_BYTES}"}}')
end
"#
    )
}

/// A connection to the data Redis that kvq's processes started with `env`
/// write to, in its mode (one server, a cluster, a sentinel set), made from
/// the same settings as theirs.
pub fn kv_conn(env: &[(String, String)]) -> anyhow::Result<Conn> {
    let config = Config::from_lookup(|name| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    })?;
    let target = RedisTarget {
        wait_replicas: 0,
        ..config.kv_redis
    };
    Ok(Connector::new(&target, Duration::from_secs(10))?.connect()?)
}

/// Number of keys the data Redis' bucket indexes hold: one per live key (no
/// key of the bench has a TTL), so it grows by one per applied create. Each
/// index is asked on the server that holds it: one pipeline on one server,
/// each index on its slot's master on a cluster.
pub async fn indexed(kv: &Conn) -> anyhow::Result<u64> {
    let cmds = (0..keys::BUCKETS)
        .map(|bucket| {
            let mut cmd = redis::cmd("ZCARD");
            cmd.arg(keys::index_key("kvq", bucket));
            cmd
        })
        .collect();
    let counts = query_all(kv, cmds).await?;
    counts
        .iter()
        .map(|count| Ok(redis::from_redis_value_ref::<u64>(count)?))
        .sum()
}

/// The result of a burst.
#[derive(Debug, Clone)]
pub struct Burst {
    /// Writes sent.
    pub writes: u64,
    /// Writes per second accepted (first send to last 202).
    pub accepted_per_s: f64,
    /// Writes per second applied (first send to last applied).
    pub applied_per_s: f64,
    /// Whether every write was applied before the deadline.
    pub complete: bool,
}

/// Sends creates of fresh keys with `wrk` (50 connections) for `duration`,
/// then waits (at most `deadline`) until every accepted one is applied. An
/// applied create adds its key to its bucket's index, so "applied" is read
/// off the indexes' sizes. wrk is the load generator because it
/// costs the shared cores far less per request than an HTTP client library.
pub async fn burst(
    base: &str,
    kv: &Conn,
    script: &str,
    duration: Duration,
    deadline: Duration,
) -> anyhow::Result<Burst> {
    let before = indexed(kv).await?;
    let started = Instant::now();
    let url = format!("{base}/v1/kv");
    let script = script.to_owned();
    let load =
        tokio::task::spawn_blocking(move || crate::tools::wrk(&url, 50, duration, Some(&script)))
            .await??;
    let accepted_in = started.elapsed();
    if load.errors > 0 {
        bail!(
            "{} of {} writes were not accepted",
            load.errors,
            load.requests
        );
    }
    let writes = load.requests;
    let applied = applied(kv, before + writes, started, deadline).await?;
    Ok(Burst {
        writes,
        accepted_per_s: writes as f64 / accepted_in.as_secs_f64(),
        applied_per_s: writes as f64 / applied.all.as_secs_f64(),
        complete: applied.complete,
    })
}

/// When the writes of a measurement were applied, counted from its start.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    /// When the bucket indexes first grew (the first write applied).
    pub first: Option<Duration>,
    /// When they reached the target (every write applied), or gave up.
    pub all: Duration,
    /// Whether they reached it before the deadline.
    pub complete: bool,
}

/// Polls the bucket indexes every 10 ms until they hold `target` keys, at
/// most until `deadline` after `started`. An applied create (or upsert of a
/// fresh key) adds its key to its bucket's index.
pub async fn applied(
    kv: &Conn,
    target: u64,
    started: Instant,
    deadline: Duration,
) -> anyhow::Result<Applied> {
    let mut first = None;
    let mut last_count = None;
    while started.elapsed() < deadline {
        let count = indexed(kv).await?;
        if last_count.is_some_and(|last| count > last) && first.is_none() {
            first = Some(started.elapsed());
        }
        if count >= target {
            return Ok(Applied {
                first: first.or(Some(started.elapsed())),
                all: started.elapsed(),
                complete: true,
            });
        }
        last_count = Some(count);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Applied {
        first,
        all: started.elapsed(),
        complete: false,
    })
}

/// Writes sent through `POST /v1/batch`.
#[derive(Debug, Clone)]
pub struct Batched {
    /// Concurrent clients, each sending one batch at a time.
    pub clients: usize,
    /// Writes per batch.
    pub size: usize,
    /// Writes accepted (202).
    pub writes: u64,
    /// Batches that were not answered 202.
    pub errors: u64,
    /// Writes per second accepted (first send to last 202).
    pub accepted_per_s: f64,
    /// Writes per second applied (first send to last applied).
    pub applied_per_s: f64,
    /// Whether every accepted write was applied before the deadline.
    pub complete: bool,
}

/// A batch of `size` upserts of fresh keys under `prefix`, 100-byte values.
fn batch_body(prefix: &str, size: usize) -> String {
    let mut body = String::with_capacity(size * (VALUE_100_BYTES.len() + 64) + 16);
    body.push_str(r#"{"writes":["#);
    for i in 0..size {
        if i > 0 {
            body.push(',');
        }
        body.push_str(r#"{"op":"upsert","key":""#);
        body.push_str(prefix);
        body.push('/');
        body.push_str(&i.to_string());
        body.push_str(r#"","value":""#);
        body.push_str(VALUE_100_BYTES);
        body.push_str(r#""}"#);
    }
    body.push_str("]}");
    body
}

/// Sends one batch; answers its status, and whether a 202's body lists one
/// job per write (checked when `check` is set).
async fn post_batch(
    http: &Client,
    url: &str,
    body: String,
    size: usize,
    check: bool,
) -> anyhow::Result<u16> {
    let response = http
        .post(url)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await?;
    if status == 202 && check {
        let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
        let jobs = answer["jobs"].as_array().map_or(0, Vec::len);
        if jobs != size {
            bail!("a batch of {size} writes was answered 202 with {jobs} jobs");
        }
    }
    Ok(status)
}

/// `clients` clients each send batches of `size` upserts of fresh keys
/// (100-byte values) through `POST /v1/batch`, one batch at a time, for
/// `duration`; then waits (at most `deadline`) until every accepted write
/// is applied. Answers `None` if the API has no `/v1/batch` (an older
/// build).
pub async fn batches(
    base: &str,
    kv: &Conn,
    clients: usize,
    size: usize,
    duration: Duration,
    deadline: Duration,
) -> anyhow::Result<Option<Batched>> {
    let http = Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{base}/v1/batch");
    let before = indexed(kv).await?;
    // One write first: an API without the route answers 404 (or 405).
    match post_batch(&http, &url, batch_body("batch/probe", 1), 1, true).await? {
        202 => {}
        404 | 405 => return Ok(None),
        status => bail!("a batch of one write was answered {status}"),
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let (mut writes, mut errors) = (0_u64, 0_u64);
            let mut round = 0_u64;
            while started.elapsed() < duration {
                let body = batch_body(&format!("batch/{client}/{round}"), size);
                match post_batch(&http, &url, body, size, round == 0).await? {
                    202 => writes += size as u64,
                    _ => errors += 1,
                }
                round += 1;
            }
            anyhow::Ok((writes, errors))
        }));
    }
    let (mut writes, mut errors) = (0, 0);
    for task in tasks {
        let (w, e) = task.await??;
        writes += w;
        errors += e;
    }
    let accepted_in = started.elapsed();
    let applied = applied(kv, before + 1 + writes, started, deadline).await?;
    Ok(Some(Batched {
        clients,
        size,
        writes,
        errors,
        accepted_per_s: writes as f64 / accepted_in.as_secs_f64(),
        applied_per_s: writes as f64 / applied.all.as_secs_f64(),
        complete: applied.complete,
    }))
}

/// Write-to-visible latency at a steady rate.
#[derive(Debug, Clone)]
pub struct Visibility {
    /// Writes sent per second (target).
    pub rate: u32,
    /// Writes whose visibility was timed.
    pub sampled: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Sampled writes not visible within 10 s.
    pub lost: usize,
}

/// Sends `rate` upserts per second for `duration`; every 10th write is then
/// read back every millisecond until its value shows, timing send → visible.
pub async fn visibility(base: &str, rate: u32, duration: Duration) -> anyhow::Result<Visibility> {
    let http = client();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let lost: Arc<Mutex<usize>> = Arc::default();
    let mut tasks = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut i: u64 = 0;
    while started.elapsed() < duration {
        ticker.tick().await;
        i += 1;
        let (http, base) = (http.clone(), base.to_owned());
        let (latencies, lost) = (latencies.clone(), lost.clone());
        let sampled = i.is_multiple_of(10);
        tasks.push(tokio::spawn(async move {
            let key = format!("visible/{i}");
            let sent = Instant::now();
            let response = http
                .put(format!("{base}/v1/kv/{key}?upsert=true"))
                .json(&json!({"value": i}))
                .send()
                .await;
            if !matches!(&response, Ok(r) if r.status() == 202) || !sampled {
                return;
            }
            while sent.elapsed() < Duration::from_secs(10) {
                if let Ok(r) = http.get(format!("{base}/v1/kv/{key}")).send().await
                    && r.status() == 200
                {
                    latencies
                        .lock()
                        .await
                        .push(sent.elapsed().as_secs_f64() * 1000.0);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            *lost.lock().await += 1;
        }));
    }
    for task in tasks {
        task.await.context("visibility task")?;
    }
    let mut latencies = latencies.lock().await.clone();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let lost = *lost.lock().await;
    Ok(Visibility {
        rate,
        sampled: latencies.len(),
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        lost,
    })
}

/// Sends `writes` creates paced at `rate` per second (so the queue never
/// builds a backlog), then waits until all are applied.
pub async fn paced(
    base: &str,
    kv: &Conn,
    tag: &str,
    writes: u64,
    rate: u32,
    deadline: Duration,
) -> anyhow::Result<bool> {
    let http = client();
    let before = indexed(kv).await?;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut tasks = Vec::new();
    for i in 0..writes {
        ticker.tick().await;
        let http = http.clone();
        let url = format!("{base}/v1/kv");
        let body = json!({"key": format!("paced/{tag}/{i}"), "value": i});
        tasks.push(tokio::spawn(async move {
            matches!(http.post(&url).json(&body).send().await, Ok(r) if r.status() == 202)
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        if task.await? {
            accepted += 1;
        }
    }
    let target = before + accepted;
    while started.elapsed() < deadline {
        if indexed(kv).await? >= target {
            return Ok(accepted == writes);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

/// What a list page costs the data Redis.
#[derive(Debug, Clone)]
pub struct ListCost {
    /// Keys in the keyspace listed.
    pub keys: usize,
    /// Pages of a prefix that matches none of them, requested one by one.
    pub pages: u32,
    /// The data Redis' CPU (user + system) per such page, ms.
    pub nomatch_ms: f64,
    /// Its CPU for one full page (1,000 keys), ms.
    pub full_page_ms: f64,
    /// The bucket indexes' memory per key, bytes (`MEMORY USAGE`).
    pub index_bytes_per_key: f64,
}

/// Empties the data Redis and seeds `keys` keys straight into it (as the
/// apply script writes them: value, metadata, index entry), then reads the data Redis'
/// CPU time (`INFO cpu`) around `pages` requests of
/// `GET /v1/kv?prefix=nomatch/&limit=1000`, and around one full page.
pub async fn list_cost(
    base: &str,
    kv: &TestRedis,
    keys: usize,
    pages: u32,
) -> anyhow::Result<ListCost> {
    let _: () = kv.cmd(&["FLUSHALL"]);
    kv.seed_keys((0..keys).map(|i| format!("listing/{i:07}")));
    let http = client();
    let get = |query: &'static str| {
        let request = http.get(format!("{base}/v1/kv?{query}"));
        async move {
            let response = request.send().await?;
            if response.status() != 200 {
                bail!("GET /v1/kv?{query} answered {}", response.status());
            }
            let body: serde_json::Value = response.json().await?;
            Ok(body["keys"].as_array().map_or(0, Vec::len))
        }
    };
    get("prefix=nomatch/&limit=1000").await?; // loads the script
    let before = kv.cpu_seconds();
    for _ in 0..pages {
        get("prefix=nomatch/&limit=1000").await?;
    }
    let nomatch_ms = (kv.cpu_seconds() - before) * 1000.0 / f64::from(pages);
    let before = kv.cpu_seconds();
    let listed = get("prefix=listing/&limit=1000").await?;
    let full_page_ms = (kv.cpu_seconds() - before) * 1000.0;
    if listed != 1000.min(keys) {
        bail!("a full page held {listed} keys");
    }
    let mut index_bytes = 0;
    for bucket in 0..keys::BUCKETS {
        let index = keys::index_key("kvq", bucket);
        let usage: Option<u64> = kv.cmd(&["MEMORY", "USAGE", &index, "SAMPLES", "0"]);
        index_bytes += usage.unwrap_or(0);
    }
    Ok(ListCost {
        keys,
        pages,
        nomatch_ms,
        full_page_ms,
        index_bytes_per_key: index_bytes as f64 / keys as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_body_is_the_batch_apis_json_with_one_upsert_per_write() {
        let body: serde_json::Value =
            serde_json::from_str(&batch_body("batch/3/7", 1_000)).expect("valid JSON");
        let writes = body["writes"].as_array().expect("a writes array");
        assert_eq!(writes.len(), 1_000);
        assert_eq!(
            writes[999],
            json!({"op": "upsert", "key": "batch/3/7/999", "value": VALUE_100_BYTES})
        );
        // Stored as serialized JSON, quotes included: 100 bytes.
        assert_eq!(json!(VALUE_100_BYTES).to_string().len(), 100);
    }
}
