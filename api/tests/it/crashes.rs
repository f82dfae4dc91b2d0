//! Issue 11's crash promise, from outside: kill an API process between any
//! two of its steps, or a worker anywhere, and no acknowledged write is
//! lost, nothing applies twice and no key stalls; a retry with the same
//! `Idempotency-Key` after a crash completes the write exactly once.
//!
//! The processes are killed with SIGKILL (or frozen with SIGSTOP) at
//! random moments of a stream of writes, from a seeded generator, so that
//! a failing run can be replayed. Every test judges what a client sees:
//! the answers, the job records, the reads, and a worker's `/metrics` to
//! show that the fault really hit jobs in flight.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvq_testkit::{Stack, eventually};
use serde_json::{Value, json};

use crate::guarantees::{Model, Rng, Write, reported, request_with};
use crate::writepath::{
    assert_reads_as, assert_stream_replayed, keys_in_every_bucket, steady_stream,
};

// ---------------------------------------------------------------------------
// Clients of an API that crashes.

/// The API's current address (a restart moves it to a new port); clients
/// read it before every request.
type Base = Arc<RwLock<String>>;

/// How long a client keeps retrying one write whose requests got no answer.
const RETRY_DEADLINE: Duration = Duration::from_secs(20);

/// How long every job may take to finish once the last crash is over: a
/// stalled key would take longer.
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);

/// How many times the API is killed at least, and at most (while waiting
/// for the case a test needs to have happened).
const MIN_KILLS: usize = 6;
const MAX_KILLS: usize = 30;

/// What one request got.
enum Answer {
    /// A 202: the job's seq and id, and whether it was an
    /// `Idempotency-Key` replay (`Idempotent-Replayed: true`).
    Accepted {
        seq: u64,
        id: String,
        replayed: bool,
    },
    /// No answer (connection refused or reset, an answer cut off) or a
    /// 5xx: the write may or may not be queued.
    Unknown(String),
}

/// Sends one upsert of `value` to `key` (with `token` as its
/// `Idempotency-Key`, if given) to the API at `base`. Fails on any answer
/// but 202, a 5xx or none.
async fn upsert_once(
    http: &reqwest::Client,
    base: &Base,
    key: &str,
    value: i64,
    token: Option<&str>,
) -> Answer {
    let url = format!("{}/v1/kv/{key}?upsert=true", base.read().unwrap());
    let mut request = http.put(url).json(&json!({"value": value}));
    if let Some(token) = token {
        request = request.header("idempotency-key", token);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => return Answer::Unknown(e.to_string()),
    };
    let status = response.status();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = match response.text().await {
        Ok(body) => body,
        Err(e) => return Answer::Unknown(format!("{status}, body cut off: {e}")),
    };
    if status.is_server_error() {
        return Answer::Unknown(format!("{status} {body}"));
    }
    assert_eq!(status, 202, "{key} = {value} ({token:?}): {body}");
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    Answer::Accepted {
        seq: body["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("no integer seq: {body}")),
        id: body["job_id"].as_str().unwrap_or_default().to_owned(),
        replayed,
    }
}

/// One logical write of a client: an upsert of a value no other write
/// uses.
#[derive(Debug, Clone)]
struct Logical {
    key: String,
    value: i64,
    /// Its `Idempotency-Key`, if it has one.
    token: Option<String>,
    /// Its 202's seq and job id.
    seq: u64,
    id: String,
}

/// What the clients saw, counted as they go (the killer reads them to
/// know whether the case under test has happened yet).
#[derive(Default)]
struct Seen {
    /// Writes accepted only after a request that got no answer.
    retried: AtomicUsize,
    /// Of those, writes whose 202 was a replay: an earlier request had
    /// queued the job when the API died under it.
    replayed_after_a_crash: AtomicUsize,
    /// Requests that got no answer (or a 5xx).
    unanswered: AtomicUsize,
    /// Requests answered 202.
    accepted: AtomicUsize,
    /// Without `Idempotency-Key`s: jobs queued by requests that got no
    /// answer (queued by a killed API before it could answer), as counted
    /// after the latest kill.
    landed_unanswered: AtomicUsize,
}

/// A client: upserts to `keys` (chosen at random) until `stop`, one write
/// right after the other (so that a kill finds requests at every step),
/// waiting 20 ms after a request that got no answer. With `idempotent`,
/// each write carries its own `Idempotency-Key` and is retried, the same
/// request again, until a 202; without, a request that got no answer is
/// given up and listed in the second vector as (key, value).
async fn client(
    number: u64,
    base: Base,
    keys: Arc<Vec<String>>,
    idempotent: bool,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
) -> (Vec<Logical>, Vec<(String, i64)>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut rng = Rng(0xC0FF_EE00 + number);
    let (mut accepted, mut unknown) = (Vec::new(), Vec::new());
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let key = keys[rng.below(keys.len() as u64) as usize].clone();
        let value = (number * 1_000_000 + i) as i64;
        let token = idempotent.then(|| format!("crash-{number}-{i}"));
        let started = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            match upsert_once(&http, &base, &key, value, token.as_deref()).await {
                Answer::Accepted { seq, id, replayed } => {
                    seen.accepted.fetch_add(1, Ordering::SeqCst);
                    if tries > 1 {
                        seen.retried.fetch_add(1, Ordering::SeqCst);
                        if replayed {
                            seen.replayed_after_a_crash.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    accepted.push(Logical {
                        key: key.clone(),
                        value,
                        token: token.clone(),
                        seq,
                        id,
                    });
                    break;
                }
                Answer::Unknown(why) => {
                    seen.unanswered.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if !idempotent {
                        unknown.push((key.clone(), value));
                        break;
                    }
                    assert!(
                        started.elapsed() < RETRY_DEADLINE,
                        "{key} = {value} ({token:?}) not accepted after {tries} requests: {why}"
                    );
                }
            }
        }
        i += 1;
        tokio::task::yield_now().await;
    }
    (accepted, unknown)
}

/// Runs `clients` clients against the stack's API and kills the API with
/// SIGKILL at random moments (every 0.1 to 0.5 s, each time starting a new
/// one on a new port), at least [`MIN_KILLS`] times and until `enough`
/// says the case under test happened (at most [`MAX_KILLS`]). Returns what
/// the clients accepted and gave up (in the order of the clients), the
/// number of kills, and when the last new API was up.
async fn writes_while_the_api_crashes(
    stack: &mut Stack,
    keys: &[String],
    clients: u64,
    idempotent: bool,
    seed: u64,
    enough: impl Fn(&Seen) -> bool,
) -> (Vec<Logical>, Vec<(String, i64)>, usize, Instant) {
    let base: Base = Arc::new(RwLock::new(stack.base().to_owned()));
    let keys = Arc::new(keys.to_vec());
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let running: Vec<_> = (0..clients)
        .map(|n| {
            tokio::spawn(client(
                n,
                base.clone(),
                keys.clone(),
                idempotent,
                stop.clone(),
                seen.clone(),
            ))
        })
        .collect();
    let mut rng = Rng(seed);
    let mut kills = 0;
    while kills < MIN_KILLS || (!enough(&seen) && kills < MAX_KILLS) {
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        stack.restart_api().await;
        if !idempotent {
            // Before the clients learn the new address: once every request
            // cut off by the kill has ended, the job records that no 202
            // accounts for are the unanswered requests that landed.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let jobs = job_ids(stack).len();
            let answered = seen.accepted.load(Ordering::SeqCst);
            seen.landed_unanswered
                .store(jobs.saturating_sub(answered), Ordering::SeqCst);
        }
        *base.write().unwrap() = stack.base().to_owned();
        kills += 1;
    }
    let restarted = Instant::now();
    // Writes go on a little on the last API, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut accepted, mut unknown) = (Vec::new(), Vec::new());
    for client in running {
        let (a, u) = client.await.unwrap();
        accepted.extend(a);
        unknown.extend(u);
    }
    eprintln!(
        "{kills} API kills; {} writes accepted, {} of them after a request with no answer, \
         {} of those replayed (queued by a killed API); {} requests with no answer, \
         {} of them queued (without Idempotency-Keys, at the last kill)",
        accepted.len(),
        seen.retried.load(Ordering::SeqCst),
        seen.replayed_after_a_crash.load(Ordering::SeqCst),
        seen.unanswered.load(Ordering::SeqCst),
        seen.landed_unanswered.load(Ordering::SeqCst),
    );
    (accepted, unknown, kills, restarted)
}

/// Waits for job `id` until `deadline` (at least one look) and returns its
/// record.
async fn job_by(stack: &Stack, id: &str, deadline: Instant) -> Value {
    let left = deadline.saturating_duration_since(Instant::now());
    stack.wait_job_within(id, left).await
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

/// [`job_by`] for many jobs, 16 at a time; their records by id.
async fn jobs_by(
    stack: &Stack,
    ids: impl IntoIterator<Item = String>,
    deadline: Instant,
) -> HashMap<String, Value> {
    futures::stream::iter(ids)
        .map(|id| async move {
            let job = job_by(stack, &id, deadline).await;
            (id, job)
        })
        .buffer_unordered(16)
        .collect()
        .await
}

// ---------------------------------------------------------------------------
// 1. The API killed mid-stream, clients retrying with an Idempotency-Key.

#[tokio::test]
async fn an_api_killed_mid_stream_loses_no_write_retried_with_its_idempotency_key_and_applies_none_twice()
 {
    let mut stack = Stack::builder().workers(2).start().await;
    let keys: Vec<String> = (0..6).map(|k| format!("idem-crash/{k}")).collect();
    // Kill until at least three writes were queued by a killed API and
    // their retries found them (crashes between the accept and the
    // answer).
    let (writes, _, _, restarted) =
        writes_while_the_api_crashes(&mut stack, &keys, 8, true, 0x1DE0_0001, |seen| {
            seen.replayed_after_a_crash.load(Ordering::SeqCst) >= 3
        })
        .await;

    // Every logical write has one job of its own.
    let ids: HashSet<&str> = writes.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids.len(), writes.len(), "two writes answered one job id");
    // No key stalls: every job finishes soon after the last crash.
    let deadline = restarted + SETTLE_DEADLINE;
    let records = jobs_by(&stack, writes.iter().map(|w| w.id.clone()), deadline).await;
    // Every request with a write's Idempotency-Key answers its job: the
    // same id and seq again, as a replay.
    let again: Vec<(Logical, Answer)> = futures::stream::iter(writes.clone())
        .map(|w| {
            let base: Base = Arc::new(RwLock::new(stack.base().to_owned()));
            async move {
                let http = reqwest::Client::new();
                let answer = upsert_once(&http, &base, &w.key, w.value, w.token.as_deref()).await;
                (w, answer)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (w, answer) in again {
        match answer {
            Answer::Accepted { seq, id, replayed } => assert_eq!(
                (seq, id.as_str(), replayed),
                (w.seq, w.id.as_str(), true),
                "{w:?}: a repeat of its Idempotency-Key answered another job"
            ),
            Answer::Unknown(why) => panic!("{w:?}: a repeat got no answer: {why}"),
        }
    }
    // Per key, a one-by-one replay in seq order: each job succeeded with
    // the next version (nothing lost, nothing applied twice), and the key
    // holds the write with the highest seq at the version counting all.
    let mut by_key: HashMap<&str, Vec<&Logical>> = HashMap::new();
    for w in &writes {
        by_key.entry(&w.key).or_default().push(w);
    }
    assert_eq!(by_key.len(), keys.len(), "a key got no write");
    for (key, mut writes) in by_key {
        writes.sort_by_key(|w| w.seq);
        let mut model = Model::default();
        for w in &writes {
            let expected = model.apply(&upsert(key, w.value));
            let job = &records[&w.id];
            assert_eq!(reported(job), expected, "{key} seq {}: {job}", w.seq);
        }
        assert_eq!(model.version, writes.len() as u64);
        assert_reads_as(&stack, key, &model).await;
    }
}

/// An upsert of `value` to `key`.
fn upsert(key: &str, value: i64) -> Write {
    Write {
        key: key.to_owned(),
        op: "upsert",
        value,
        if_match: None,
    }
}

// ---------------------------------------------------------------------------
// 2. The API killed mid-stream, clients without an Idempotency-Key.

#[tokio::test]
async fn an_api_killed_mid_stream_applies_each_answered_write_once_and_unanswered_ones_at_most_once()
 {
    let mut stack = Stack::builder().workers(2).start().await;
    let keys: Vec<String> = (0..6).map(|k| format!("plain-crash/{k}")).collect();
    // Kill until a request that got no answer had queued its job (a crash
    // between the accept and the answer).
    let (answered, unanswered, _, restarted) =
        writes_while_the_api_crashes(&mut stack, &keys, 8, false, 0x1DE0_0002, |seen| {
            seen.landed_unanswered.load(Ordering::SeqCst) > 0
        })
        .await;
    assert!(
        !unanswered.is_empty(),
        "no request was cut off by a crash: the test proves nothing"
    );
    let deadline = restarted + SETTLE_DEADLINE;

    // Every job in the queue Redis, answered or not: each one finishes,
    // soon after the last crash, and succeeds (a job queued by a request
    // that got no answer is a whole write too, never half of one).
    let ids = job_ids(&stack);
    let records = jobs_by(&stack, ids, deadline).await;
    for job in records.values() {
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // Every answered write is one of them.
    for w in &answered {
        assert!(
            records.contains_key(&w.id),
            "{w:?} was answered 202 and its job is gone"
        );
    }

    eprintln!(
        "{} jobs queued by {} requests answered 202 and {} with no answer",
        records.len(),
        answered.len(),
        unanswered.len()
    );
    let value_of: HashMap<&str, i64> = answered.iter().map(|w| (w.id.as_str(), w.value)).collect();
    for key in &keys {
        // The key's jobs in seq order report versions 1, 2, 3, ... : none
        // applied twice, none skipped.
        let mut jobs: Vec<&Value> = records.values().filter(|j| j["key"] == *key).collect();
        jobs.sort_by_key(|j| j["seq"].as_u64());
        let versions: Vec<u64> = jobs
            .iter()
            .map(|j| j["result"]["version"].as_u64().unwrap_or(0))
            .collect();
        let expected: Vec<u64> = (1..=jobs.len() as u64).collect();
        assert_eq!(versions, expected, "{key}: versions in seq order");
        // Between every answered write and every write that may have
        // landed.
        let answered_here = answered.iter().filter(|w| w.key == *key).count();
        let unknown_here: Vec<i64> = unanswered
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .collect();
        assert!(
            jobs.len() >= answered_here && jobs.len() <= answered_here + unknown_here.len(),
            "{key}: {} jobs applied, {answered_here} answered, {} unanswered",
            jobs.len(),
            unknown_here.len()
        );
        // It reads as its last job left it: that job's value if it was
        // answered, else one of the unanswered writes' values.
        let read = stack.get(key).await;
        assert_eq!(read.status(), 200, "{key}");
        let read: Value = read.json().await.unwrap();
        assert_eq!(read["version"], jobs.len(), "{key}: {read}");
        let last = jobs
            .last()
            .and_then(|j| j["id"].as_str())
            .unwrap_or_default();
        match value_of.get(last) {
            Some(value) => assert_eq!(read["value"], *value, "{key}"),
            None => assert!(
                read["value"]
                    .as_i64()
                    .is_some_and(|v| unknown_here.contains(&v)),
                "{key} holds {}, no write that was sent to it",
                read["value"]
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Workers killed at random moments, again and again, under a storm.

#[tokio::test]
async fn workers_killed_every_second_or_two_change_no_outcome_of_a_storm() {
    let mut stack = Stack::builder()
        .workers(3)
        .env("KVQ_WORKER_CONCURRENCY", "16")
        .start()
        .await;
    // The storm's writes (guarantees.rs): creates, updates, upserts,
    // deletes and If-Match, 12 to each of 100 keys, shuffled.
    let mut rng = Rng(0x5EED_C4A5_0003);
    let mut writes = Vec::new();
    for k in 0..100 {
        for _ in 0..12 {
            let op = ["create", "update", "upsert", "delete"][rng.below(4) as usize];
            let if_match = (op != "create" && rng.below(4) == 0).then(|| 1 + rng.below(6));
            writes.push(Write {
                key: format!("kill-storm/{k}"),
                op,
                value: rng.below(1_000_000) as i64,
                if_match,
            });
        }
    }
    for i in (1..writes.len()).rev() {
        writes.swap(i, rng.below(i as u64 + 1) as usize);
    }
    // Sent from 16 clients, one write every 10 ms (about 12 s), while the
    // workers are killed.
    let base = stack.base().to_owned();
    let sending = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let start = tokio::time::Instant::now();
        futures::stream::iter(writes.into_iter().enumerate())
            .map(|(i, write)| {
                let (http, base) = (http.clone(), base.clone());
                async move {
                    tokio::time::sleep_until(start + Duration::from_millis(10 * i as u64)).await;
                    let to = |method, path: &str| http.request(method, format!("{base}{path}"));
                    let response = request_with(to, &write).send().await.unwrap();
                    assert_eq!(response.status(), 202, "{write:?}");
                    let body: Value = response.json().await.unwrap();
                    let seq = body["seq"].as_u64().unwrap_or_else(|| panic!("{body}"));
                    let id = body["job_id"].as_str().unwrap_or_default().to_owned();
                    (write, seq, id)
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
    });
    // Every 1 to 2 s, a worker chosen at random is killed with SIGKILL
    // and a new one started. Its redelivery count is read just before, so
    // the run's total is known.
    let (mut kills, mut redelivered) = (0, 0);
    while !sending.is_finished() {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1000))).await;
        let victim = rng.below(stack.workers.len() as u64) as usize;
        redelivered += stack
            .worker_metric(victim, "kvq_worker_redeliveries_total")
            .await
            .unwrap_or(0);
        let worker = stack.workers.remove(victim);
        worker.signal("KILL");
        drop(worker);
        stack.start_worker().await;
        kills += 1;
    }
    let sent = sending.await.unwrap();
    assert!(kills >= 5, "only {kills} kills during the storm");

    // Replay each key's writes one by one in seq order: every job's
    // outcome and version, and the final state, are the replay's. The
    // partitions of the last killed worker move within its lease, so
    // every job ends well within the deadline.
    let mut by_key: HashMap<String, Vec<(u64, Write, String)>> = HashMap::new();
    for (write, seq, id) in sent {
        by_key
            .entry(write.key.clone())
            .or_default()
            .push((seq, write, id));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut checked = 0;
    for (key, mut writes) in by_key {
        writes.sort_by_key(|(seq, _, _)| *seq);
        let seqs: Vec<u64> = writes.iter().map(|(seq, _, _)| *seq).collect();
        assert!(
            seqs.len() == 12 && seqs.windows(2).all(|w| w[0] < w[1]),
            "{key}: 12 distinct seqs: {seqs:?}"
        );
        let mut model = Model::default();
        for (seq, write, id) in &writes {
            let expected = model.apply(write);
            let job = job_by(&stack, id, deadline).await;
            assert_eq!(
                reported(&job),
                expected,
                "{key} seq {seq}: {write:?}: {job}"
            );
            checked += 1;
        }
        assert_reads_as(&stack, &key, &model).await;
    }
    assert_eq!(checked, 1200);
    for index in 0..stack.workers.len() {
        redelivered += stack
            .worker_metric(index, "kvq_worker_redeliveries_total")
            .await
            .unwrap_or(0);
    }
    eprintln!("{kills} worker kills; {redelivered} jobs redelivered after being applied");
}

// ---------------------------------------------------------------------------
// 4. A worker frozen for longer than its lease with applies in flight.

#[tokio::test]
async fn a_worker_frozen_past_its_lease_with_applies_in_flight_never_applies_a_job_twice() {
    let partitions = 8;
    let stack = Stack::builder()
        .workers(2)
        .env("KVQ_WORKER_CONCURRENCY", "8")
        .env("KVQ_QUEUE_PARTITIONS", &partitions.to_string())
        .start()
        .await;
    let stack = Arc::new(stack);
    let keys = Arc::new(keys_in_every_bucket("frozen", 2));

    // 12 s of writes (one every 20 ms); 1 s in, the data Redis holds its
    // writes for 4 s, so that the applies of both workers wait in flight,
    // and a worker is frozen (SIGSTOP) once it has at least 4.
    let (tx, mut fault) = tokio::sync::mpsc::channel(1);
    let stream = tokio::spawn(steady_stream(stack.clone(), keys.clone(), 0, 600, 50, tx));
    fault.recv().await.unwrap();
    let _: () = stack.kv.cmd(&["CLIENT", "PAUSE", "4000", "WRITE"]);
    // The worker to freeze: one with at least 4 (whichever gets there
    // first; the partitions may well be shared unevenly).
    let (frozen, in_flight) = eventually(
        Duration::from_secs(3),
        "a worker to hold jobs in flight",
        || async {
            for index in 0..stack.workers.len() {
                let n = stack
                    .worker_metric(index, "kvq_worker_jobs_in_flight")
                    .await?;
                if n >= 4 {
                    return Some((index, n));
                }
            }
            None
        },
    )
    .await;
    let frozen_pid = stack.workers[frozen].pid();
    kvq_testkit::signal(frozen_pid, "STOP");
    let name = stack.workers[frozen]
        .wait_for_log("worker running", Duration::from_secs(1))
        .await["worker"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!name.is_empty(), "the worker logged no name");

    // It stays frozen past its lease, until the other worker holds every
    // partition (leases `<worker>:<generation>:<nonce>`).
    eventually(
        Duration::from_secs(20),
        "the other worker to take every partition",
        || async {
            let leases: Vec<String> = stack
                .queue
                .keys()
                .into_iter()
                .filter(|k| k.ends_with(":lease"))
                .collect();
            let holders: Vec<String> = leases
                .iter()
                .filter_map(|k| stack.queue.try_cmd::<String>(&["GET", k]).ok())
                .collect();
            (holders.len() == partitions
                && holders.iter().all(|h| !h.starts_with(&format!("{name}:"))))
            .then_some(())
        },
    )
    .await;
    kvq_testkit::signal(frozen_pid, "CONT");
    let streamed = stream.await.unwrap();

    // Every job succeeded, once: per key the jobs report versions 1, 2,
    // 3, ... in the order they were sent, and the key holds the last.
    let mut records = HashMap::new();
    for s in &streamed {
        let job = stack.wait_job_within(&s.id, Duration::from_secs(30)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        records.insert(s.id.clone(), job);
    }
    assert_stream_replayed(&stack, &streamed, &records).await;

    // Not vacuously: the frozen worker's in-flight applies met the
    // redelivery check (the other worker ran them again and found them
    // applied) or the fence (the frozen one ran jobs after waking that the
    // other had taken over).
    let count = |index: usize, name: &'static str| {
        let stack = stack.clone();
        async move { stack.worker_metric(index, name).await.unwrap_or(0) }
    };
    let fenced = count(frozen, "kvq_worker_jobs_fenced_total").await;
    let redelivered = count(0, "kvq_worker_redeliveries_total").await
        + count(1, "kvq_worker_redeliveries_total").await;
    eprintln!(
        "frozen with {in_flight} jobs in flight; afterwards {fenced} fenced, {redelivered} redelivered"
    );
    assert!(
        fenced + redelivered > 0,
        "neither fencing nor the redelivery check met a job: the freeze hit nothing"
    );
}
