//! Issue 13's group commit, attacked from outside: concurrent accepts of a
//! partition go in one accept script call, a worker's concurrent applies
//! in one apply script call, its record writes in one pipeline with one
//! notice naming every job that ended. None of that may weaken a
//! guarantee: per-key order, exactly-once effect, no acknowledged write
//! lost, truthful 5xx answers, and `Prefer: wait` answering as a
//! synchronous API would.
//!
//! The oracle is the storm's: each key's jobs replayed one by one in seq
//! order ([`Model`]) must give every job's recorded outcome and the key's
//! final state. Every write carries its own `X-Request-Id`, which its job
//! record keeps, so that a job can be traced back to the request that
//! queued it, whatever that request was answered.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvq_testkit::{RedisRole, Stack};
use reqwest::Client;
use serde_json::Value;

use crate::guarantees::{Model, Rng, Write, reported, request_with};
use crate::writepath::{assert_reads_as, now_ms, unix_ms};

/// `count` mixed writes (creates, updates, upserts and deletes, a quarter
/// of the others with If-Match) spread evenly over `keys` keys
/// `<prefix>/<k>`, shuffled; each has its own value, `first`, `first + 1`,
/// ..., which names it.
fn mixed_writes(rng: &mut Rng, prefix: &str, keys: usize, count: usize, first: i64) -> Vec<Write> {
    let mut writes: Vec<Write> = (0..count)
        .map(|i| {
            let op = ["create", "update", "upsert", "delete"][rng.below(4) as usize];
            let if_match = (op != "create" && rng.below(4) == 0).then(|| 1 + rng.below(6));
            Write {
                key: format!("{prefix}/{}", i % keys),
                op,
                value: first + i as i64,
                if_match,
            }
        })
        .collect();
    for i in (1..writes.len()).rev() {
        writes.swap(i, rng.below(i as u64 + 1) as usize);
    }
    writes
}

/// The `X-Request-Id` a write is sent with: its value names it.
fn request_id(write: &Write) -> String {
    format!("w-{}", write.value)
}

/// An HTTP client whose requests give up after 60 s, far longer than any
/// answer of these tests may take.
fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client")
}

/// What a write was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// 202: its job and seq.
    Accepted { id: String, seq: u64 },
    /// 503 `backend_unavailable`: certainly nothing was queued.
    Unavailable,
    /// 503 `outcome_unknown`: kvq cannot tell.
    Unknown,
}

/// Sends `write` to the API at `base` with its own request id and tells
/// its answer; any other answer fails the test.
async fn send(http: &Client, base: &str, write: &Write) -> Answer {
    let to = |method, path: &str| http.request(method, format!("{base}{path}"));
    let response = request_with(to, write)
        .header("x-request-id", request_id(write))
        .send()
        .await
        .expect("the API answers");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match (status, body["code"].as_str()) {
        (202, _) => Answer::Accepted {
            id: body["job_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no job id: {body}"))
                .to_owned(),
            seq: body["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("no integer seq: {body}")),
        },
        (503, Some("backend_unavailable")) => Answer::Unavailable,
        (503, Some("outcome_unknown")) => Answer::Unknown,
        other => panic!("{write:?} was answered {other:?}: {body}"),
    }
}

/// A write whose job was queued: the write, its seq, its job id.
type Queued = (Write, u64, String);

/// Job `id`'s record once final, waiting until `deadline` at the latest.
async fn final_record(stack: &Stack, id: &str, deadline: Instant) -> Value {
    let left = deadline.saturating_duration_since(Instant::now());
    stack
        .wait_job_within(id, left.max(Duration::from_millis(100)))
        .await
}

/// The records of jobs `ids` once final (by `deadline`), 16 at a time.
async fn final_records(
    stack: &Stack,
    ids: impl IntoIterator<Item = String>,
    deadline: Instant,
) -> HashMap<String, Value> {
    futures::stream::iter(ids)
        .map(|id| async move {
            let job = final_record(stack, &id, deadline).await;
            (id, job)
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Replays each key's queued writes one by one in seq order: every job
/// must report what the replay gives (nothing applied twice, nothing lost,
/// nothing out of order), and every key must read as the replay leaves it.
/// Returns how many jobs were checked.
async fn assert_equals_replay(
    stack: &Stack,
    queued: &[Queued],
    records: &HashMap<String, Value>,
) -> usize {
    let mut by_key: HashMap<&str, Vec<&Queued>> = HashMap::new();
    for q in queued {
        by_key.entry(&q.0.key).or_default().push(q);
    }
    let mut checked = 0;
    for (key, mut jobs) in by_key {
        jobs.sort_by_key(|(_, seq, _)| *seq);
        let seqs: Vec<u64> = jobs.iter().map(|(_, seq, _)| *seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key}: two writes share a seq: {seqs:?}"
        );
        let mut model = Model::default();
        for (write, seq, id) in jobs {
            let expected = model.apply(write);
            let job = &records[id];
            assert_eq!(reported(job), expected, "{key} seq {seq}: {write:?}: {job}");
            checked += 1;
        }
        assert_reads_as(stack, key, &model).await;
    }
    checked
}

/// The ids of every job record in the queue Redis.
fn job_ids(stack: &Stack) -> Vec<String> {
    stack
        .queue
        .keys()
        .iter()
        .filter_map(|k| k.split_once(":job:").map(|(_, id)| id.to_owned()))
        .collect()
}

/// How many times the Redis server ran `command` (`INFO commandstats`).
fn calls(redis: &RedisRole, command: &str) -> u64 {
    let stats: String = redis.cmd(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A counter of every running worker's `/metrics`, summed.
async fn workers_metric(stack: &Stack, name: &str) -> i64 {
    let mut total = 0;
    for index in 0..stack.workers.len() {
        total += stack.worker_metric(index, name).await.unwrap_or(0);
    }
    total
}

// ---------------------------------------------------------------------------
// 1. A worker killed in the middle of group applies, again and again.

#[tokio::test]
async fn a_worker_killed_again_and_again_in_the_middle_of_group_applies_changes_no_outcome() {
    let mut stack = Stack::builder()
        .workers(2)
        .env("KVQ_WORKER_CONCURRENCY", "32")
        .start()
        .await;
    // 6,000 mixed writes to 200 keys (30 each), sent from 64 clients as
    // fast as the API takes them, so that the workers run 32 jobs at once
    // and their applies go in large groups.
    let mut rng = Rng(0xBA7C_0000_0001);
    let writes = mixed_writes(&mut rng, "gkill", 200, 6_000, 1);
    let total = writes.len();
    let base = stack.base().to_owned();
    let sending = tokio::spawn(async move {
        let http = client();
        futures::stream::iter(writes)
            .map(|write| {
                let (http, base) = (http.clone(), base.clone());
                async move {
                    match send(&http, &base, &write).await {
                        Answer::Accepted { id, seq } => (write, seq, id),
                        other => panic!("{write:?} was answered {other:?}"),
                    }
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<Queued>>()
            .await
    });
    let evalsha_before = calls(&stack.kv, "evalsha");

    // At a random moment every 0.15 to 0.75 s, the worker with the most
    // jobs in flight (8 at least: groups are being applied) is killed with
    // SIGKILL, and a new one started; until the writes are all sent and
    // 6 workers were killed, or the queue is empty.
    let started = Instant::now();
    let mut kills: Vec<i64> = Vec::new();
    let mut redelivered = 0;
    loop {
        if sending.is_finished() && (kills.len() >= 6 || stack.queue.pending_jobs() == 0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the writes were not sent, or the queue not drained, within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(150 + rng.below(600))).await;
        let mut busiest: Option<(usize, i64)> = None;
        for index in 0..stack.workers.len() {
            let in_flight = stack
                .worker_metric(index, "kvq_worker_jobs_in_flight")
                .await
                .unwrap_or(0);
            if in_flight >= 8 && busiest.is_none_or(|(_, n)| in_flight > n) {
                busiest = Some((index, in_flight));
            }
        }
        let Some((victim, in_flight)) = busiest else {
            continue;
        };
        redelivered += stack
            .worker_metric(victim, "kvq_worker_redeliveries_total")
            .await
            .unwrap_or(0);
        let worker = stack.workers.remove(victim);
        worker.signal("KILL");
        drop(worker);
        stack.start_worker().await;
        kills.push(in_flight);
    }
    let queued = sending.await.expect("the sending task");
    assert_eq!(queued.len(), total);
    assert!(
        kills.len() >= 2,
        "only {} kills hit a worker with 8 or more jobs in flight: {kills:?}",
        kills.len()
    );

    // Every job ends well within a minute after the last kill (a killed
    // worker's partitions move once its lease runs out), with the
    // replay's outcome.
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = final_records(&stack, queued.iter().map(|q| q.2.clone()), deadline).await;
    assert_eq!(assert_equals_replay(&stack, &queued, &records).await, total);

    redelivered += workers_metric(&stack, "kvq_worker_redeliveries_total").await;
    let groups = calls(&stack.kv, "evalsha") - evalsha_before;
    eprintln!(
        "{} kills, jobs in flight at each: {kills:?}; {redelivered} jobs redelivered after being applied; {total} jobs in {groups} apply calls ({:.1} a call)",
        kills.len(),
        total as f64 / groups.max(1) as f64
    );
    assert!(
        groups * 2 <= total as u64,
        "{total} jobs took {groups} apply calls: the applies were not grouped"
    );
}

// ---------------------------------------------------------------------------
// 2. The queue Redis stalled in the middle of group accepts.

#[tokio::test]
async fn a_queue_redis_stalled_mid_group_accept_answers_every_write_truthfully() {
    let stack = Stack::builder()
        .workers(2)
        .env("KVQ_REDIS_TIMEOUT_MS", "1000")
        .start()
        .await;
    let http = client();
    // Every server thread of the API has used the queue Redis before the
    // stalls, so that a stall catches commands already sent.
    let warm: Vec<Answer> = futures::future::join_all((0..16).map(|i| {
        let write = Write {
            key: format!("warm/{i}"),
            op: "create",
            value: -1 - i,
            if_match: None,
        };
        let (http, base) = (&http, stack.base());
        async move { send(http, base, &write).await }
    }))
    .await;
    assert!(
        warm.iter().all(|a| matches!(a, Answer::Accepted { .. })),
        "{warm:?}"
    );

    let mut rng = Rng(0xBA7C_0000_0002);
    let mut known: HashSet<String> = job_ids(&stack).into_iter().collect();
    let mut seen = Vec::new();
    // One stall the API outlasts (it has 2 timeouts to find out what
    // became of an accept), one it cannot, and one of writes only.
    for (round, (mode, pause_ms)) in [("ALL", 1600u64), ("ALL", 4000), ("WRITE", 4000)]
        .into_iter()
        .enumerate()
    {
        // 1,200 mixed writes to 8 keys, one every 4 ms from 32 clients;
        // the stall starts 0.8 s in, with every client's write in flight.
        let prefix = format!("qstall{round}");
        let writes = mixed_writes(&mut rng, &prefix, 8, 1_200, 1_000_000 * (round as i64 + 1));
        let base = stack.base().to_owned();
        let sending = tokio::spawn(async move {
            let http = client();
            let start = tokio::time::Instant::now();
            futures::stream::iter(writes.into_iter().enumerate())
                .map(|(i, write)| {
                    let (http, base) = (http.clone(), base.clone());
                    async move {
                        tokio::time::sleep_until(start + Duration::from_millis(4 * i as u64)).await;
                        let sent = Instant::now();
                        let answer = send(&http, &base, &write).await;
                        (write, answer, sent.elapsed())
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<(Write, Answer, Duration)>>()
                .await
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        let _: () = stack
            .queue
            .cmd(&["CLIENT", "PAUSE", &pause_ms.to_string(), mode]);
        let answers = sending.await.expect("the sending task");

        // Every job the round queued, whatever its request was answered:
        // each ends (the last ones within a minute), and is traced to its
        // request by the request id its record keeps. A write queued twice
        // would show as two jobs of one request.
        let ids: Vec<String> = job_ids(&stack)
            .into_iter()
            .filter(|id| known.insert(id.clone()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let records = final_records(&stack, ids, deadline).await;
        let mut job_of: HashMap<String, &Value> = HashMap::new();
        for job in records.values() {
            let request = job["request_id"].as_str().unwrap_or_default().to_owned();
            if let Some(other) = job_of.insert(request.clone(), job) {
                panic!("request {request} queued two jobs: {other} and {job}");
            }
        }
        let by_request: HashMap<String, &Write> =
            answers.iter().map(|(w, _, _)| (request_id(w), w)).collect();
        for job in records.values() {
            assert!(
                by_request.contains_key(job["request_id"].as_str().unwrap_or_default()),
                "a job no request of this round queued: {job}"
            );
        }
        // A 202's job is there, as answered; a `backend_unavailable`
        // write's job never is; an `outcome_unknown` may be either.
        let mut counts = (0, 0, 0, 0);
        for (write, answer, _) in &answers {
            let job = job_of.get(&request_id(write));
            match answer {
                Answer::Accepted { id, seq } => {
                    let job =
                        job.unwrap_or_else(|| panic!("{write:?} was answered 202 ({id}): no job"));
                    assert_eq!(
                        (job["id"].as_str(), job["seq"].as_u64()),
                        (Some(id.as_str()), Some(*seq)),
                        "{write:?}: its job is not the one answered"
                    );
                    counts.0 += 1;
                }
                Answer::Unavailable => {
                    assert!(
                        job.is_none(),
                        "{write:?} was answered 503 backend_unavailable, and queued: {}",
                        job.map(|j| j.to_string()).unwrap_or_default()
                    );
                    counts.1 += 1;
                }
                Answer::Unknown if job.is_some() => counts.2 += 1,
                Answer::Unknown => counts.3 += 1,
            }
        }
        // Each key's jobs, replayed one by one in seq order, give every
        // job's outcome and the key's final state: nothing applied twice,
        // nothing lost, no reorder.
        let queued: Vec<Queued> = records
            .values()
            .map(|job| {
                let write = by_request[job["request_id"].as_str().unwrap_or_default()];
                (
                    write.clone(),
                    job["seq"].as_u64().unwrap_or_default(),
                    job["id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_equals_replay(&stack, &queued, &records).await;
        // Not vacuously: the stall held accepts past the Redis timeout.
        let cut_off = answers
            .iter()
            .filter(|(_, _, took)| *took > Duration::from_millis(1_000))
            .count();
        eprintln!(
            "CLIENT PAUSE {pause_ms} {mode}: {} answered 202, {} backend_unavailable, {} outcome_unknown (of which {} queued); {cut_off} answered after more than the 1 s Redis timeout",
            counts.0,
            counts.1,
            counts.2 + counts.3,
            counts.2
        );
        assert!(
            cut_off >= 8,
            "CLIENT PAUSE {pause_ms} {mode}: only {cut_off} writes waited past the Redis timeout"
        );
        seen.push((pause_ms, mode, counts, cut_off));
    }
    eprintln!(
        "answers (202, backend_unavailable, outcome_unknown queued, not queued), slow: {seen:?}"
    );
    let retried = workers_metric(&stack, "kvq_worker_job_retries_total").await;
    let deferred = workers_metric(&stack, "kvq_worker_job_deferrals_total").await;
    eprintln!("worker runs deferred: {deferred}, retried (counted as attempts): {retried}");
}

// ---------------------------------------------------------------------------
// 3. The data Redis stalled longer than the Redis timeout during group
// applies.

#[tokio::test]
async fn a_data_redis_stalled_past_the_timeout_during_group_applies_applies_every_write_once_in_order()
 {
    // A stalled Redis is waited for without counting attempts (README:
    // "A Redis server that cannot be reached is waited for, however long,
    // without counting attempts"), so 2 attempts are as good as 25 here.
    let stack = Stack::builder()
        .workers(2)
        .env("KVQ_REDIS_TIMEOUT_MS", "500")
        .env("KVQ_WORKER_MAX_ATTEMPTS", "2")
        .start()
        .await;
    // 2,400 mixed writes to 100 keys, one every 4 ms from 32 clients
    // (about 10 s); the data Redis stalls for 3 s twice, 1 s and 5 s in.
    let mut rng = Rng(0xBA7C_0000_0003);
    let writes = mixed_writes(&mut rng, "kvstall", 100, 2_400, 1);
    let total = writes.len();
    let base = stack.base().to_owned();
    let sending = tokio::spawn(async move {
        let http = client();
        let start = tokio::time::Instant::now();
        futures::stream::iter(writes.into_iter().enumerate())
            .map(|(i, write)| {
                let (http, base) = (http.clone(), base.clone());
                async move {
                    tokio::time::sleep_until(start + Duration::from_millis(4 * i as u64)).await;
                    match send(&http, &base, &write).await {
                        Answer::Accepted { id, seq } => (write, seq, id),
                        other => panic!("{write:?} was answered {other:?}"),
                    }
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<Queued>>()
            .await
    });
    let mut stalled_with = Vec::new();
    for at in [1_000, 4_000] {
        tokio::time::sleep(Duration::from_millis(at)).await;
        let _: () = stack.kv.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]);
        // Applies pile up behind the stalled call.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        stalled_with.push(stack.jobs_in_flight().await.unwrap_or(-1));
    }
    let queued = sending.await.expect("the sending task");
    assert_eq!(queued.len(), total);

    let deadline = Instant::now() + Duration::from_secs(60);
    let records = final_records(&stack, queued.iter().map(|q| q.2.clone()), deadline).await;
    let retried = workers_metric(&stack, "kvq_worker_job_retries_total").await;
    let deferred = workers_metric(&stack, "kvq_worker_job_deferrals_total").await;
    let most_attempts = records
        .values()
        .filter_map(|job| job["attempts"].as_u64())
        .max()
        .unwrap_or(0);
    eprintln!(
        "jobs in flight 2 s into each stall: {stalled_with:?}; {deferred} runs deferred, {retried} retried (counted); at most {most_attempts} attempts a job"
    );
    assert!(
        stalled_with.iter().all(|n| *n >= 8),
        "the stalls did not catch applies in flight: {stalled_with:?}"
    );
    // A stall is no error a Redis server answered: no run counts as an
    // attempt (`kvq_worker_job_retries_total` counts those), and no job
    // gives up.
    let dead: Vec<&Value> = records
        .values()
        .filter(|job| job["status"] == "dead")
        .collect();
    assert!(
        dead.is_empty() && retried == 0,
        "after two 3 s stalls of the data Redis, which answered no error, {retried} runs were counted as attempts and {} of {total} jobs ended dead; the first: {}",
        dead.len(),
        dead.first().map(|j| j.to_string()).unwrap_or_default()
    );
    assert_eq!(assert_equals_replay(&stack, &queued, &records).await, total);
}

// ---------------------------------------------------------------------------
// 3b. The queue Redis stalled while the workers record jobs they applied.

#[tokio::test]
async fn a_queue_redis_stalled_while_applied_jobs_are_recorded_counts_no_attempt_and_kills_no_job()
{
    // As in 3: a stall counts no attempt, so 2 are as good as 25.
    let mut stack = Stack::builder()
        .workers(0)
        .env("KVQ_REDIS_TIMEOUT_MS", "500")
        .env("KVQ_WORKER_MAX_ATTEMPTS", "2")
        .start()
        .await;
    // A backlog of 3,000 mixed writes to 200 keys, queued with no worker
    // running.
    let mut rng = Rng(0xBA7C_0000_0005);
    let writes = mixed_writes(&mut rng, "recstall", 200, 3_000, 1);
    let total = writes.len();
    let http = client();
    let queued: Vec<Queued> = futures::stream::iter(writes)
        .map(|write| {
            let (http, base) = (&http, stack.base());
            async move {
                match send(http, base, &write).await {
                    Answer::Accepted { id, seq } => (write, seq, id),
                    other => panic!("{write:?} was answered {other:?}"),
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    // Two workers work it off; twice, with 32 jobs or more in flight
    // between them (applied or being applied, to be recorded in the queue
    // Redis), the queue Redis stalls for 3 s, longer than the 0.5 s Redis
    // timeout.
    stack.start_workers_with_env(2, &[]).await;
    let mut stalled_with = Vec::new();
    for _ in 0..2 {
        let in_flight =
            kvq_testkit::eventually(Duration::from_secs(30), "32 jobs in flight", || async {
                stack.jobs_in_flight().await.filter(|n| *n >= 32)
            })
            .await;
        let _: () = stack.queue.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]);
        stalled_with.push(in_flight);
        // The stall is over once the queue Redis answers the test.
        let _: String = stack.queue.cmd(&["PING"]);
    }

    let deadline = Instant::now() + Duration::from_secs(90);
    let records = final_records(&stack, queued.iter().map(|q| q.2.clone()), deadline).await;
    let retried = workers_metric(&stack, "kvq_worker_job_retries_total").await;
    let deferred = workers_metric(&stack, "kvq_worker_job_deferrals_total").await;
    eprintln!(
        "jobs in flight as each stall began: {stalled_with:?}; {deferred} runs deferred, {retried} retried (counted)"
    );
    let dead: Vec<&Value> = records
        .values()
        .filter(|job| job["status"] == "dead")
        .collect();
    assert!(
        dead.is_empty() && retried == 0,
        "after two 3 s stalls of the queue Redis, which answered no error, {retried} runs were counted as attempts and {} of {total} jobs ended dead; the first: {}",
        dead.len(),
        dead.first().map(|j| j.to_string()).unwrap_or_default()
    );
    assert_eq!(assert_equals_replay(&stack, &queued, &records).await, total);
}

// ---------------------------------------------------------------------------
// 3c. The queue Redis refusing writes partway through an accept pipeline.

/// The queue Redis' `used_memory`, bytes.
fn used_memory(redis: &RedisRole) -> u64 {
    let info: String = redis.cmd(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

#[tokio::test]
async fn a_queue_redis_refusing_writes_partway_through_a_group_answers_backend_unavailable_only_for_writes_not_queued()
 {
    let mut stack = Stack::builder()
        .workers(0)
        .env("KVQ_REDIS_TIMEOUT_MS", "500")
        .start()
        .await;
    let http = client();
    // Eight times: the queue Redis' memory is capped 256 KiB above what it
    // uses (`noeviction`: room for a few hundred more jobs), and 64
    // clients send 600 creates to keys of every partition at once, so that
    // a group of accepts spanning many partitions meets the cap partway:
    // the accept calls before it queue their jobs, those after it are
    // refused (out of memory, an error Redis answers: nothing queued).
    let mut answers: Vec<(Write, Answer)> = Vec::new();
    for round in 0..8 {
        let cap = used_memory(&stack.queue) + 256 * 1024;
        let _: () = stack.queue.cmd(&[
            "CONFIG",
            "SET",
            "maxmemory-policy",
            "noeviction",
            "maxmemory",
            &cap.to_string(),
        ]);
        let writes: Vec<Write> = (0..600)
            .map(|i| Write {
                key: format!("oom{round}/{i}"),
                op: "create",
                value: round * 1_000 + i,
                if_match: None,
            })
            .collect();
        let round_answers: Vec<(Write, Answer)> = futures::stream::iter(writes)
            .map(|write| {
                let (http, base) = (&http, stack.base());
                async move {
                    let answer = send(http, base, &write).await;
                    (write, answer)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        answers.extend(round_answers);
    }
    let _: () = stack.queue.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    let refused = answers
        .iter()
        .filter(|(_, a)| *a == Answer::Unavailable)
        .count();
    assert!(refused > 0, "the cap refused no write");

    // A worker applies what was queued; each job is traced to its request.
    stack.start_worker().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = final_records(&stack, job_ids(&stack), deadline).await;
    let job_of: HashMap<&str, &Value> = records
        .values()
        .map(|job| (job["request_id"].as_str().unwrap_or_default(), job))
        .collect();
    let lies: Vec<String> = answers
        .iter()
        .filter(|(_, a)| *a == Answer::Unavailable)
        .filter_map(|(w, _)| {
            job_of
                .get(request_id(w).as_str())
                .map(|job| format!("{}: {job}", w.key))
        })
        .collect();
    let unknown: Vec<&Write> = answers
        .iter()
        .filter(|(_, a)| *a == Answer::Unknown)
        .map(|(w, _)| w)
        .collect();
    let unknown_queued = unknown
        .iter()
        .filter(|w| job_of.contains_key(request_id(w).as_str()))
        .count();
    eprintln!(
        "{} writes: {} answered 202, {refused} backend_unavailable ({} of them queued), {} outcome_unknown ({unknown_queued} of them queued)",
        answers.len(),
        answers
            .iter()
            .filter(|(_, a)| matches!(a, Answer::Accepted { .. }))
            .count(),
        lies.len(),
        unknown.len()
    );
    assert!(
        lies.is_empty(),
        "{} of {refused} writes answered 503 backend_unavailable (certainly not queued) were queued and applied; the first: {}",
        lies.len(),
        lies[0]
    );
    for (write, answer) in &answers {
        if let Answer::Accepted { id, .. } = answer {
            assert_eq!(records[id]["status"], "succeeded", "{write:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// 4. `Prefer: wait` answered by group notices.

/// What a `Prefer: wait` write was answered, and when.
struct Waited {
    write: Write,
    status: u16,
    etag: Option<String>,
    /// When the answer arrived, Unix ms.
    at_ms: i64,
}

/// Sends `writes` with `Prefer: wait=10` to the API at `base` from
/// `clients` clients at once.
async fn send_waited(base: String, writes: Vec<Write>, clients: usize) -> Vec<Waited> {
    let http = client();
    futures::stream::iter(writes)
        .map(|write| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let to = |method, path: &str| http.request(method, format!("{base}{path}"));
                let response = request_with(to, &write)
                    .header("x-request-id", request_id(&write))
                    .header("prefer", "wait=10")
                    .send()
                    .await
                    .expect("the API answers");
                let at_ms = now_ms();
                let status = response.status().as_u16();
                let etag = response
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                Waited {
                    write,
                    status,
                    etag,
                    at_ms,
                }
            }
        })
        .buffer_unordered(clients)
        .collect()
        .await
}

/// What a synchronous API answers for a job's record: status and ETag.
fn synchronous_answer(job: &Value) -> (u16, Option<String>) {
    let etag = Some(format!("\"{}\"", job["result"]["version"]));
    match (
        job["status"].as_str(),
        job["result"]["outcome"].as_str(),
        job["error"]["code"].as_str(),
    ) {
        (Some("succeeded"), Some("created"), _) => (201, etag),
        (Some("succeeded"), Some("updated"), _) => (200, etag),
        (Some("succeeded"), Some("deleted"), _) => (204, etag),
        (Some("failed"), _, Some("not_found")) => (404, None),
        (Some("failed"), _, Some("already_exists")) => (409, None),
        (Some("failed"), _, Some("version_mismatch")) => (412, None),
        _ => (503, None),
    }
}

/// Checks every waited write against its job's record: it was answered
/// as a synchronous API would answer that record (never 202: the job
/// ended well within the wait). Returns the time from each job's end to
/// its answer, ms, sorted.
fn assert_answered_as_recorded(
    what: &str,
    waited: &[Waited],
    job_of: &HashMap<String, Value>,
) -> Vec<i64> {
    let mut lags = Vec::new();
    for w in waited {
        let job = job_of
            .get(&request_id(&w.write))
            .unwrap_or_else(|| panic!("{what}: {:?} queued no job", w.write));
        assert_eq!(
            (w.status, w.etag.clone()),
            synchronous_answer(job),
            "{what}: {:?} was answered {} {:?} for its job {job}",
            w.write,
            w.status,
            w.etag
        );
        lags.push(w.at_ms - unix_ms(job["finished_at"].as_str().unwrap_or_default()));
    }
    lags.sort_unstable();
    lags
}

/// The job notices published on the queue Redis at `url` (namespace
/// `kvq`), each as the ids it names, until `jobs` ids were named (or 60 s
/// passed).
async fn notices(url: String, jobs: usize) -> Vec<Vec<String>> {
    let mut pubsub = redis::Client::open(url)
        .expect("the queue Redis URL")
        .get_async_pubsub()
        .await
        .expect("a subscription to the queue Redis");
    pubsub
        .subscribe(kvq_shared::keys::done_channel("kvq"))
        .await
        .expect("subscribed");
    let mut messages = pubsub.into_on_message();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut named = 0;
    while named < jobs {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, messages.next()).await else {
            break;
        };
        let payload: String = message.get_payload().expect("a text notice");
        let ids: Vec<String> = payload
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect();
        named += ids.len();
        seen.push(ids);
    }
    seen
}

#[tokio::test]
async fn prefer_wait_requests_are_each_answered_their_own_outcome_soon_after_their_group_ends() {
    let mut stack = Stack::builder().workers(0).start().await;
    let mut rng = Rng(0xBA7C_0000_0004);

    // 1. 240 waited writes to 6 keys, queued while no worker runs; 2 s
    // later two workers start and end them in groups, each group's jobs
    // named by one notice. Every request must wake on its notice: one that
    // missed it would only find out on its once-a-second read.
    let notices = tokio::spawn(notices(stack.queue.url(), 480));
    let backlog = mixed_writes(&mut rng, "notice", 6, 240, 1);
    let sending = tokio::spawn(send_waited(stack.base().to_owned(), backlog.clone(), 240));
    kvq_testkit::eventually(
        Duration::from_secs(30),
        "the waited writes to be queued",
        || async { (stack.queue.pending_jobs() == 240).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.start_workers_with_env(2, &[]).await;
    let from_backlog = sending.await.expect("the sending task");

    // 2. 240 more to the same keys, 60 at a time, with the workers running.
    let running = mixed_writes(&mut rng, "notice", 6, 240, 1_001);
    let started = Instant::now();
    let while_running = send_waited(stack.base().to_owned(), running, 60).await;
    let took = started.elapsed();

    // Each request's job, by the request id its record keeps.
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = final_records(&stack, job_ids(&stack), deadline).await;
    let mut job_of: HashMap<String, Value> = HashMap::new();
    for job in records.values() {
        let request = job["request_id"].as_str().unwrap_or_default().to_owned();
        assert!(
            job_of.insert(request.clone(), job.clone()).is_none(),
            "request {request} queued two jobs"
        );
    }
    // The notices named every job, many in one.
    let notices = notices.await.expect("the notice task");
    let announced: HashSet<&str> = notices.iter().flatten().map(String::as_str).collect();
    for id in records.keys() {
        assert!(
            announced.contains(id.as_str()),
            "job {id} was never announced"
        );
    }
    let largest = notices.iter().map(Vec::len).max().unwrap_or(0);
    eprintln!(
        "{} notices named {} jobs, {largest} at most in one",
        notices.len(),
        announced.len()
    );
    assert!(largest >= 2, "no notice named more than one job");
    let backlog_lags = assert_answered_as_recorded("backlog", &from_backlog, &job_of);
    let running_lags = assert_answered_as_recorded("running", &while_running, &job_of);
    let pct = |lags: &[i64], p: usize| lags[(lags.len() - 1) * p / 100];
    eprintln!(
        "ms from a job's end to its answer: backlog median {} p90 {} max {}; running median {} p90 {} max {} (240 writes in {took:?})",
        pct(&backlog_lags, 50),
        pct(&backlog_lags, 90),
        pct(&backlog_lags, 100),
        pct(&running_lags, 50),
        pct(&running_lags, 90),
        pct(&running_lags, 100),
    );
    // Woken by notices: not spread over the once-a-second reads (which
    // would put the median near 500 ms and the 90th percentile near
    // 900 ms).
    for (what, lags) in [("backlog", &backlog_lags), ("running", &running_lags)] {
        assert!(
            pct(lags, 50) < 250 && pct(lags, 90) < 600,
            "{what}: the answers came {lags:?} ms after their jobs ended: notices were missed"
        );
    }

    // And the outcomes are the replay's.
    let write_of: HashMap<String, &Write> = from_backlog
        .iter()
        .chain(&while_running)
        .map(|w| (request_id(&w.write), &w.write))
        .collect();
    let queued: Vec<Queued> = records
        .values()
        .map(|job| {
            let request = job["request_id"].as_str().unwrap_or_default();
            (
                write_of[request].clone(),
                job["seq"].as_u64().unwrap_or_default(),
                job["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(assert_equals_replay(&stack, &queued, &records).await, 480);
}
