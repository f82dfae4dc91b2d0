//! DESIGN.md's guarantees under load and faults: per-key order with many
//! workers, exactly-once effect across worker crashes, compare-and-set,
//! and a backlog drained by workers started late.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvq_testkit::{Stack, eventually};
use reqwest::Method;
use serde_json::{Value, json};

/// A small deterministic generator, so a failing storm can be replayed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One write of the storm (and of `writepath`'s tests).
#[derive(Clone, Debug)]
pub(crate) struct Write {
    pub(crate) key: String,
    pub(crate) op: &'static str,
    pub(crate) value: i64,
    pub(crate) if_match: Option<u64>,
}

/// The request that sends `write`.
pub(crate) fn request(stack: &Stack, write: &Write) -> reqwest::RequestBuilder {
    request_with(|method, path| stack.request(method, path), write)
}

/// The request that sends `write`, built by `to` from a method and a path
/// (for clients that talk to the API without a [`Stack`] at hand).
pub(crate) fn request_with(
    to: impl Fn(Method, &str) -> reqwest::RequestBuilder,
    write: &Write,
) -> reqwest::RequestBuilder {
    let request = match write.op {
        "create" => {
            to(Method::POST, "/v1/kv").json(&json!({"key": write.key, "value": write.value}))
        }
        "update" => {
            to(Method::PUT, &format!("/v1/kv/{}", write.key)).json(&json!({"value": write.value}))
        }
        "upsert" => to(Method::PUT, &format!("/v1/kv/{}?upsert=true", write.key))
            .json(&json!({"value": write.value})),
        _ => to(Method::DELETE, &format!("/v1/kv/{}", write.key)),
    };
    match write.if_match {
        Some(v) => request.header("if-match", format!("\"{v}\"")),
        None => request,
    }
}

/// Sends `write`; returns (seq, job id).
async fn send(stack: &Stack, write: &Write) -> (u64, String) {
    let response = request(stack, write).send().await.unwrap();
    assert_eq!(response.status(), 202, "{write:?}");
    let body: Value = response.json().await.unwrap();
    let seq = body["seq"].as_u64();
    (
        seq.unwrap_or_else(|| panic!("no integer seq: {body}")),
        body["job_id"].as_str().unwrap().to_owned(),
    )
}

/// A key as a one-by-one replay sees it.
#[derive(Default, Debug, PartialEq)]
pub(crate) struct Model {
    pub(crate) live: Option<i64>,
    pub(crate) version: u64,
}

impl Model {
    /// Applies `write` and returns the outcome a job should report:
    /// `created:3`, `not_found`, ...
    pub(crate) fn apply(&mut self, write: &Write) -> String {
        if let Some(expected) = write.if_match
            && (self.live.is_none() || self.version != expected)
        {
            return "version_mismatch".into();
        }
        match (write.op, self.live) {
            ("create", Some(_)) => return "already_exists".into(),
            ("update" | "delete", None) => return "not_found".into(),
            _ => {}
        }
        self.version += 1;
        let outcome = match (write.op, self.live) {
            ("delete", _) => "deleted",
            (_, Some(_)) => "updated",
            (_, None) => "created",
        };
        self.live = (write.op != "delete").then_some(write.value);
        format!("{outcome}:{}", self.version)
    }
}

/// What a finished job reports, in [`Model::apply`]'s terms.
pub(crate) fn reported(job: &Value) -> String {
    match job["status"].as_str() {
        Some("succeeded") => format!(
            "{}:{}",
            job["result"]["outcome"].as_str().unwrap(),
            job["result"]["version"]
        ),
        Some("failed") => job["error"]["code"].as_str().unwrap().to_owned(),
        _ => format!("unexpected {job}"),
    }
}

#[tokio::test]
async fn a_storm_of_mixed_writes_equals_a_one_by_one_replay_in_seq_order() {
    let stack = Stack::builder()
        .workers(3)
        .env("KVQ_WORKER_CONCURRENCY", "16")
        .start()
        .await;
    storm_equals_replay(Arc::new(stack)).await;
}

/// The storm: 1,800 creates, updates, upserts and deletes (a quarter with
/// If-Match) to 150 keys `storm/<n>`, shuffled and sent from 16 concurrent
/// clients; every job must report what a one-by-one replay of its key's
/// writes in seq order gives, and every key must read as the replay ends.
pub(crate) async fn storm_equals_replay(stack: Arc<Stack>) {
    let mut rng = Rng(0x5EED_1234_ABCD_0042);
    let mut writes = Vec::new();
    for k in 0..150 {
        for _ in 0..12 {
            let op = ["create", "update", "upsert", "delete"][rng.below(4) as usize];
            let if_match = (op != "create" && rng.below(4) == 0).then(|| 1 + rng.below(6));
            writes.push(Write {
                key: format!("storm/{k}"),
                op,
                value: rng.below(1_000_000) as i64,
                if_match,
            });
        }
    }
    // Shuffle (Fisher-Yates), then send from 16 concurrent clients.
    for i in (1..writes.len()).rev() {
        writes.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let sent: Vec<(Write, u64, String)> = futures::stream::iter(writes)
        .map(|write| {
            let stack = stack.clone();
            async move {
                let (seq, id) = send(&stack, &write).await;
                (write, seq, id)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    // Replay each key's writes one by one in seq order.
    let mut by_key: HashMap<String, Vec<(u64, Write, String)>> = HashMap::new();
    for (write, seq, id) in sent {
        by_key
            .entry(write.key.clone())
            .or_default()
            .push((seq, write, id));
    }
    let mut checked = 0;
    for (key, mut writes) in by_key {
        writes.sort_by_key(|(seq, _, _)| *seq);
        // Concurrent writes to one key: their order is the seqs' order,
        // which leaves gaps but never gives two writes one seq.
        let seqs: Vec<u64> = writes.iter().map(|(seq, _, _)| *seq).collect();
        assert!(
            seqs.len() == 12 && seqs.windows(2).all(|w| w[0] < w[1]),
            "{key}: 12 distinct seqs: {seqs:?}"
        );
        let mut model = Model::default();
        for (seq, write, id) in &writes {
            let expected = model.apply(write);
            let job = stack.wait_job(id).await;
            assert_eq!(reported(&job), expected, "{key} seq {seq}: {write:?}");
            checked += 1;
        }
        let read = stack.get(&key).await;
        match model.live {
            Some(value) => {
                assert_eq!(read.status(), 200, "{key}");
                let body: Value = read.json().await.unwrap();
                assert_eq!(body["value"], value, "{key}");
                assert_eq!(body["version"], model.version, "{key}");
            }
            None => assert_eq!(read.status(), 404, "{key}"),
        }
    }
    assert_eq!(checked, 1800);
}

#[tokio::test]
async fn if_match_applies_only_on_the_expected_version() {
    let stack = Stack::start().await;
    stack.finished(stack.create("cas", json!("v1")).await).await;
    let put = |version: &'static str, value: &'static str| {
        stack
            .request(Method::PUT, "/v1/kv/cas")
            .header("if-match", version)
            .json(&json!({"value": value}))
            .send()
    };
    let ok = stack.finished(put("\"1\"", "v2").await.unwrap()).await;
    assert_eq!(ok["result"], json!({"outcome": "updated", "version": 2}));
    let stale = stack.finished(put("\"1\"", "lost").await.unwrap()).await;
    assert_eq!(stale["status"], "failed");
    assert_eq!(stale["error"]["code"], "version_mismatch");
    let read: Value = stack.get("cas").await.json().await.unwrap();
    assert_eq!(
        (read["value"].clone(), read["version"].clone()),
        (json!("v2"), json!(2))
    );

    let delete = |version: &'static str| {
        stack
            .request(Method::DELETE, "/v1/kv/cas")
            .header("if-match", version)
            .send()
    };
    let stale = stack.finished(delete("\"1\"").await.unwrap()).await;
    assert_eq!(stale["error"]["code"], "version_mismatch");
    let deleted = stack.finished(delete("\"2\"").await.unwrap()).await;
    assert_eq!(
        deleted["result"],
        json!({"outcome": "deleted", "version": 3})
    );
    // If-Match on an absent key fails too (RFC 9110: 412), even for upsert.
    let absent = stack
        .finished(
            stack
                .request(Method::PUT, "/v1/kv/cas?upsert=true")
                .header("if-match", "\"3\"")
                .json(&json!({"value": "x"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
    assert_eq!(absent["error"]["code"], "version_mismatch");
    assert_eq!(stack.get("cas").await.status(), 404);
}

#[tokio::test]
async fn workers_killed_mid_stream_lose_nothing_and_apply_nothing_twice() {
    let mut stack = Stack::builder()
        .workers(2)
        .env("KVQ_WORKER_CONCURRENCY", "8")
        .start()
        .await;
    let keys = 100;
    let writes_per_key = 30;
    let total = keys * writes_per_key;
    let (sender, mut killer) = tokio::sync::mpsc::channel::<usize>(1);
    let sending = {
        let base = stack.base().to_owned();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ids = Vec::new();
            let results: Vec<(usize, String)> = futures::stream::iter(0..total)
                .map(|i| {
                    let http = http.clone();
                    let base = base.clone();
                    let sender = sender.clone();
                    async move {
                        if i == total / 3 || i == 2 * total / 3 {
                            let _ = sender.send(i).await;
                        }
                        let key = format!("crash/{}", i % keys);
                        let response = http
                            .put(format!("{base}/v1/kv/{key}?upsert=true"))
                            .json(&json!({"value": i}))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(response.status(), 202);
                        let body: Value = response.json().await.unwrap();
                        (i, body["job_id"].as_str().unwrap().to_owned())
                    }
                })
                .buffer_unordered(8)
                .collect()
                .await;
            ids.extend(results);
            ids
        })
    };
    // Kill a worker with SIGKILL twice mid-stream, each time starting a new one.
    for _ in 0..2 {
        killer.recv().await.unwrap();
        let victim = stack.workers.remove(0);
        victim.signal("KILL");
        drop(victim);
        stack.start_worker().await;
    }
    let ids = sending.await.unwrap();
    assert_eq!(ids.len(), total);
    for (_, id) in &ids {
        let job = stack.wait_job_within(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // Each key holds its last write, and its version counts its writes:
    // nothing was lost and nothing applied twice.
    for k in 0..keys {
        let body: Value = stack.get(&format!("crash/{k}")).await.json().await.unwrap();
        let last = (0..total).filter(|i| i % keys == k).max().unwrap();
        assert_eq!(body["value"], last, "crash/{k}");
        assert_eq!(body["version"], writes_per_key, "crash/{k}");
    }
}

#[tokio::test]
async fn a_backlog_of_20000_writes_drains_with_every_worker_alive() {
    let mut stack = Stack::builder().workers(0).start().await;
    let total = 20_000;
    let base = stack.base().to_owned();
    let http = reqwest::Client::new();
    let last_ids: Vec<String> = futures::stream::iter(0..total)
        .map(|i| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let response = http
                    .post(format!("{base}/v1/kv"))
                    .json(&json!({"key": format!("backlog/{i}"), "value": i}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                let body: Value = response.json().await.unwrap();
                body["job_id"].as_str().unwrap().to_owned()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let queued: u64 = stack.queue.pending_jobs() as u64;
    assert_eq!(queued, total);

    stack.start_worker().await;
    stack.start_worker().await;
    eventually(Duration::from_secs(120), "the backlog to drain", || async {
        let left: u64 = stack.queue.pending_jobs() as u64;
        (left == 0).then_some(())
    })
    .await;
    for worker in &mut stack.workers {
        assert!(worker.is_running(), "a worker exited during the drain");
    }
    // Applied: one value key and one metadata key per write, and the index
    // and the fence of each bucket (20,000 keys fill all 64).
    let keys: u64 = stack.kv.cmd(&["DBSIZE"]);
    assert_eq!(keys, 2 * total + 2 * u64::from(kvq_shared::keys::BUCKETS));
    for id in last_ids.iter().step_by(997) {
        assert_eq!(stack.job(id).await["status"], "succeeded");
    }
}

#[tokio::test]
async fn an_idempotency_key_repeat_returns_the_first_job_and_applies_nothing() {
    let stack = Stack::start().await;
    let upsert = |token: &'static str, value: i64| {
        stack
            .request(Method::PUT, "/v1/kv/idem?upsert=true")
            .header("idempotency-key", token)
            .json(&json!({"value": value}))
            .send()
    };
    let first = upsert("tok-1", 1).await.unwrap();
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"].clone();
    let first: Value = first.json().await.unwrap();
    for _ in 0..3 {
        let again = upsert("tok-1", 1).await.unwrap();
        assert_eq!(again.status(), 202);
        assert_eq!(again.headers()["location"], location);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let again: Value = again.json().await.unwrap();
        assert_eq!(again, first);
    }
    // The same token for a different request: refused, not dropped.
    let changed = upsert("tok-1", 2).await.unwrap();
    assert_eq!(changed.status(), 422);
    let changed: Value = changed.json().await.unwrap();
    assert_eq!(changed["code"], "idempotency_key_reused");
    let job = stack.wait_job(first["job_id"].as_str().unwrap()).await;
    assert_eq!(job["result"], json!({"outcome": "created", "version": 1}));
    let read: Value = stack.get("idem").await.json().await.unwrap();
    assert_eq!(
        (read["value"].clone(), read["version"].clone()),
        (json!(1), json!(1))
    );

    // Another token is another write.
    let other: Value = upsert("tok-2", 3).await.unwrap().json().await.unwrap();
    assert_ne!(other["job_id"], first["job_id"]);
    assert!(
        other["seq"].as_u64() > first["seq"].as_u64() && first["seq"].as_u64().is_some(),
        "the later write's seq is not greater: {first} then {other}"
    );
    let job = stack.wait_job(other["job_id"].as_str().unwrap()).await;
    assert_eq!(job["result"], json!({"outcome": "updated", "version": 2}));

    let bad = stack
        .request(Method::DELETE, "/v1/kv/idem")
        .header("idempotency-key", "has space")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        stack.get("idem").await.status(),
        200,
        "the rejected delete changed nothing"
    );
}

/// A write with `Prefer: wait=5`.
async fn waited(
    stack: &Stack,
    method: Method,
    path: &str,
    body: Option<Value>,
    if_match: Option<&str>,
) -> reqwest::Response {
    let mut request = stack.request(method, path).header("prefer", "wait=5");
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(version) = if_match {
        request = request.header("if-match", version);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn prefer_wait_answers_as_a_synchronous_api_would() {
    let stack = Stack::start().await;
    let created = waited(
        &stack,
        Method::POST,
        "/v1/kv",
        Some(json!({"key": "sync/a", "value": 1})),
        None,
    )
    .await;
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["location"], "/v1/kv/sync/a");
    assert_eq!(created.headers()["etag"], "\"1\"");
    assert_eq!(created.headers()["preference-applied"], "wait=5");
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["result"], json!({"outcome": "created", "version": 1}));

    let updated = waited(
        &stack,
        Method::PUT,
        "/v1/kv/sync/a",
        Some(json!({"value": 2})),
        None,
    )
    .await;
    assert_eq!(updated.status(), 200);
    assert_eq!(updated.headers()["etag"], "\"2\"");

    let conflict = waited(
        &stack,
        Method::POST,
        "/v1/kv",
        Some(json!({"key": "sync/a", "value": 3})),
        None,
    )
    .await;
    assert_eq!(conflict.status(), 409);
    assert_eq!(
        conflict.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(
        conflict.json::<Value>().await.unwrap()["code"],
        "already_exists"
    );

    let stale = waited(
        &stack,
        Method::PUT,
        "/v1/kv/sync/a",
        Some(json!({"value": 4})),
        Some("\"1\""),
    )
    .await;
    assert_eq!(stale.status(), 412);
    assert_eq!(
        stale.json::<Value>().await.unwrap()["code"],
        "version_mismatch"
    );

    let deleted = waited(&stack, Method::DELETE, "/v1/kv/sync/a", None, None).await;
    assert_eq!(deleted.status(), 204);
    assert_eq!(deleted.headers()["etag"], "\"3\"");

    let missing = waited(&stack, Method::DELETE, "/v1/kv/sync/a", None, None).await;
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["code"], "not_found");
}

#[tokio::test]
async fn prefer_wait_gives_202_when_the_time_runs_out_without_polling_redis() {
    let stack = Stack::builder().workers(0).start().await;
    let _: () = stack.queue.cmd(&["CONFIG", "RESETSTAT"]);
    let started = std::time::Instant::now();
    let response = stack
        .request(Method::POST, "/v1/kv")
        .header("prefer", "wait=2")
        .json(&json!({"key": "slow", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "answered before the wait ran out"
    );
    let stats: String = stack.queue.cmd(&["INFO", "commandstats"]);
    let reads: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_hgetall:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        reads <= 4,
        "the waiting request read its job {reads} times in 2 s"
    );
    // The job itself is still queued, and applies once a worker runs.
    let body: Value = response.json().await.unwrap();
    let mut stack = stack;
    stack.start_worker().await;
    let job = stack.wait_job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded");
}

/// Upserts `writes` values to `keys` keys from 4 clients while `fault` runs;
/// returns each key's accepted values in acceptance order per key.
async fn writes_during(
    stack: &Stack,
    writes: usize,
    keys: usize,
    fault: impl std::future::Future<Output = ()>,
) -> Vec<(usize, String)> {
    let base = stack.base().to_owned();
    let sending = tokio::spawn(async move {
        let http = reqwest::Client::new();
        // Paced over about 1.5 s, so the fault lands mid-stream.
        let start = tokio::time::Instant::now();
        futures::stream::iter(0..writes)
            .map(|i| {
                let (http, base) = (http.clone(), base.clone());
                async move {
                    tokio::time::sleep_until(start + Duration::from_micros(2_500 * i as u64)).await;
                    let response = http
                        .put(format!("{base}/v1/kv/stall/{}?upsert=true", i % keys))
                        .json(&json!({"value": i}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 202, "write {i} was refused");
                    let body: Value = response.json().await.unwrap();
                    (i, body["job_id"].as_str().unwrap().to_owned())
                }
            })
            .buffer_unordered(4)
            .collect::<Vec<_>>()
            .await
    });
    fault.await;
    sending.await.unwrap()
}

#[tokio::test]
async fn a_2_5_s_pause_of_either_redis_stops_no_process_and_loses_no_write() {
    let mut stack = Stack::builder().workers(2).start().await;
    for redis in ["queue", "kv"] {
        let target = if redis == "queue" {
            &stack.queue
        } else {
            &stack.kv
        };
        let port = target.port();
        let ids = writes_during(&stack, 600, 20, async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let _: () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(2500)
                .query_async(&mut conn)
                .await
                .unwrap();
        })
        .await;
        for (_, id) in &ids {
            let job = stack.wait_job_within(id, Duration::from_secs(30)).await;
            assert_eq!(job["status"], "succeeded", "{redis} pause: {job}");
        }
        assert!(stack.api().is_running(), "{redis} pause stopped the API");
        for worker in &mut stack.workers {
            assert!(worker.is_running(), "{redis} pause stopped a worker");
        }
    }
    // Every accepted write applied once, in order: each key holds its last
    // write and counts all of them.
    for k in 0..20 {
        let body: Value = stack.get(&format!("stall/{k}")).await.json().await.unwrap();
        let last = (0..600).filter(|i| i % 20 == k).max().unwrap();
        assert_eq!(body["value"], last, "stall/{k}");
        assert_eq!(body["version"], 2 * 30, "stall/{k}");
    }
}

#[tokio::test]
async fn a_killed_workers_job_runs_elsewhere_within_10_s() {
    let mut stack = Stack::builder().workers(0).start().await;
    let accepted = stack.create("orphan", json!("saved")).await;
    let id = Stack::job_id(accepted).await;
    // The first worker takes the job, whose apply then blocks on a paused
    // KV Redis; it is killed while holding it.
    let _: () = stack.kv.cmd(&["CLIENT", "PAUSE", "1500", "WRITE"]);
    stack.start_worker().await;
    stack.wait_pending(1).await;
    let killed_at = std::time::Instant::now();
    stack.workers[0].signal("KILL");
    stack.start_worker().await;
    let job = stack.wait_job_within(&id, Duration::from_secs(15)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "re-run {took:?} after the kill"
    );
    let read: Value = stack.get("orphan").await.json().await.unwrap();
    assert_eq!(read["version"], 1, "applied exactly once");
}

#[tokio::test]
async fn finished_jobs_leave_the_queue_redis_as_it_was_after_retention() {
    let stack = Stack::builder()
        .env("KVQ_JOB_RETENTION_SECONDS", "2")
        .start()
        .await;
    // Warm every partition (its stream and position keys stay; 64 keys
    // of distinct buckets reach all of them).
    let mut warm = Vec::new();
    for i in 0..1_000 {
        let key = format!("warm/{i}");
        if warm
            .iter()
            .all(|(b, _)| *b != kvq_shared::keys::bucket(&key))
        {
            warm.push((kvq_shared::keys::bucket(&key), key));
        }
    }
    assert_eq!(warm.len(), usize::from(kvq_shared::keys::BUCKETS));
    for (_, key) in &warm {
        stack.finished(stack.create(key, json!(0)).await).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = |stack: &Stack| -> u64 {
        let info: String = stack.queue.cmd(&["INFO", "memory"]);
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let keys_before = stack.queue.keys();
    let memory_before = used(&stack);
    let ids: Vec<String> = futures::stream::iter(0..2_000)
        .map(|i| {
            let stack = &stack;
            async move {
                let response = stack.create(&format!("r/{i}"), json!(i)).await;
                Stack::job_id(response).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    stack.wait_job(ids.last().unwrap()).await;
    eventually(
        Duration::from_secs(20),
        "the job records to expire",
        || async { (stack.queue.keys() == keys_before).then_some(()) },
    )
    .await;
    let grown = used(&stack).saturating_sub(memory_before);
    assert!(
        grown < 512 * 1024,
        "the queue Redis kept {grown} bytes after 2,000 jobs"
    );
}
