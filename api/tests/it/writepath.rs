//! Issue 11's write path, from outside: a write is accepted by the queue
//! Redis alone and applies completely, in order and exactly once, with no
//! clock deciding the order; a partitioned queue whose workers hand their
//! partitions on; and a queue Redis that keeps no per-key state, whose loss
//! never makes a later write look like a duplicate.
//!
//! Every test talks HTTP to the real binaries against real Redis servers
//! and judges only what a client sees (answers, job records, reads), plus
//! the queue Redis' own `DBSIZE` and `INFO memory` for its footprint.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::join_all;
use kvq_shared::keys;
use kvq_testkit::{Stack, eventually};
use reqwest::Method;
use serde_json::{Value, json};

use crate::guarantees::{Model, Write, reported, request};

// ---------------------------------------------------------------------------
// Helpers.

/// One accepted write: the write, its `seq` and its job id.
#[derive(Debug, Clone)]
struct Sent {
    write: Write,
    seq: u64,
    id: String,
}

/// Sends `write` (with `Prefer: wait=N` when `wait` is given) and checks it
/// is accepted (202) with an integer `seq` and a UUID job id.
async fn accept(stack: &Stack, write: &Write, wait: Option<u64>) -> Sent {
    let mut request = request(stack, write);
    if let Some(seconds) = wait {
        request = request.header("prefer", format!("wait={seconds}"));
    }
    let started = Instant::now();
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 202, "{write:?} was answered {status}: {body}");
    if let Some(seconds) = wait {
        // Answered once the wait ran out, not before (the job cannot have
        // finished: the tests using this have no way to apply it).
        assert!(
            started.elapsed() >= Duration::from_millis(seconds * 1000 - 100),
            "{write:?} with Prefer: wait={seconds} was answered 202 after {:?}",
            started.elapsed()
        );
    }
    let seq = body["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer seq: {body}"));
    let id = body["job_id"].as_str().unwrap_or_default().to_owned();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "the job id is not a UUID: {body}"
    );
    Sent {
        write: write.clone(),
        seq,
        id,
    }
}

/// Fails unless the seqs of one key's writes, in the order they were
/// accepted, strictly increase.
fn assert_seqs_increase(key: &str, sent: &[Sent]) {
    let seqs: Vec<u64> = sent.iter().map(|s| s.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{key}: seqs do not strictly increase in acceptance order: {seqs:?}"
    );
}

/// Waits (up to `deadline` each) for every job of one key's writes and
/// checks each reported what a one-by-one replay in seq order from `model`
/// gives, then that the key reads as the replay ends (value, version and
/// ETag). Returns the replay's end.
async fn assert_replayed(
    stack: &Stack,
    key: &str,
    sent: &[Sent],
    mut model: Model,
    deadline: Duration,
) -> Model {
    let mut sent = sent.to_vec();
    sent.sort_by_key(|s| s.seq);
    for s in &sent {
        let expected = model.apply(&s.write);
        let job = stack.wait_job_within(&s.id, deadline).await;
        assert_eq!(
            reported(&job),
            expected,
            "{key} seq {}: {:?}: {job}",
            s.seq,
            s.write
        );
    }
    assert_reads_as(stack, key, &model).await;
    model
}

/// Fails unless `key` reads as `model` says: value, version and ETag, or
/// 404.
pub(crate) async fn assert_reads_as(stack: &Stack, key: &str, model: &Model) {
    let read = stack.get(key).await;
    match model.live {
        Some(value) => {
            assert_eq!(read.status(), 200, "{key}");
            let etag = read.headers()["etag"].to_str().unwrap().to_owned();
            let body: Value = read.json().await.unwrap();
            assert_eq!(
                (body["value"].clone(), body["version"].clone()),
                (json!(value), json!(model.version)),
                "{key}: {body}"
            );
            assert_eq!(etag, format!("\"{}\"", model.version), "{key}");
        }
        None => assert_eq!(read.status(), 404, "{key}"),
    }
}

/// `write` with no If-Match.
fn write(key: &str, op: &'static str, value: i64) -> Write {
    Write {
        key: key.to_owned(),
        op,
        value,
        if_match: None,
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time
/// (`2026-01-02T03:04:05.678Z`), as job records and log lines give them.
pub(crate) fn unix_ms(time: &str) -> i64 {
    fn bad<T>(time: &str) -> T {
        panic!("not an RFC 3339 UTC time: {time:?}")
    }
    let number = |s: &str| s.parse::<i64>().unwrap_or_else(|_| bad(time));
    let (date, clock) = time.split_once('T').unwrap_or_else(|| bad(time));
    let clock = clock.strip_suffix('Z').unwrap_or_else(|| bad(time));
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, "0"));
    let d: Vec<i64> = date.split('-').map(number).collect();
    let t: Vec<i64> = hms.split(':').map(number).collect();
    if d.len() != 3 || t.len() != 3 {
        bad::<()>(time);
    }
    let ms = number(&format!("{fraction:0<3}")[..3]);
    // Days from the civil date (H. Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1])
    } else {
        (d[0], d[1])
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    (days * 86_400 + t[0] * 3_600 + t[1] * 60 + t[2]) * 1_000 + ms
}

/// The wall clock, in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// A queue Redis `INFO memory` field, in bytes.
fn queue_memory(stack: &Stack, field: &str) -> u64 {
    let info: String = stack.queue.cmd(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO memory"))
}

// ---------------------------------------------------------------------------
// 1, 2. A backlog of one key's writes, however old, applies completely and
// in order.

/// The ten writes to one key, in order: operation and value (a
/// delete's value is the step it stands at). A one-by-one replay ends at
/// value 10, version 10.
const TEN_WRITES: [(&str, i64); 10] = [
    ("create", 1),
    ("update", 2),
    ("delete", 3),
    ("create", 4),
    ("update", 5),
    ("upsert", 6),
    ("delete", 7),
    ("upsert", 8),
    ("update", 9),
    ("update", 10),
];

/// Sends [`TEN_WRITES`] to each of six keys `<prefix>/<k>`, one after the
/// other as the issue did (a key's writes side by side in the queue, so
/// that one fetch takes several of them). Checks each key's seqs strictly
/// increase.
async fn send_ten_writes_to_six_keys(stack: &Stack, prefix: &str) -> Vec<(String, Vec<Sent>)> {
    let mut all = Vec::new();
    for k in 0..6 {
        let key = format!("{prefix}/{k}");
        let mut sent = Vec::new();
        for (op, value) in TEN_WRITES {
            sent.push(accept(stack, &write(&key, op, value), None).await);
        }
        assert_seqs_increase(&key, &sent);
        all.push((key, sent));
    }
    all
}

/// All 60 jobs `succeeded`, each with the outcome and version of a
/// one-by-one replay, and every key at value 10, version 10 (ETag "10").
/// Collects every departure before failing, so that a failure shows how
/// much broke.
async fn assert_backlog_applied(stack: &Stack, sent: &[(String, Vec<Sent>)]) {
    let mut wrong = Vec::new();
    let mut jobs = 0;
    for (key, writes) in sent {
        let mut writes = writes.clone();
        writes.sort_by_key(|s| s.seq);
        let mut model = Model::default();
        for s in &writes {
            let expected = model.apply(&s.write);
            let job = stack.wait_job_within(&s.id, JOB_DEADLINE).await;
            jobs += 1;
            if job["status"] != "succeeded" || reported(&job) != expected {
                wrong.push(format!(
                    "{key} {} {}: {} {}{}, a replay gives {expected}",
                    s.write.op, s.write.value, job["status"], job["result"], job["error"]["code"]
                ));
            }
        }
        let read = stack.get(key).await;
        let status = read.status();
        let etag = read.headers().get("etag").cloned();
        let body: Value = read.json().await.unwrap_or(Value::Null);
        if status != 200
            || body["value"] != 10
            || body["version"] != 10
            || etag.as_ref().is_none_or(|e| e != "\"10\"")
        {
            wrong.push(format!(
                "{key} reads {status} {etag:?} {body}, not value 10, version 10"
            ));
        }
    }
    assert_eq!(jobs, 60);
    assert!(
        wrong.is_empty(),
        "{} departures from a one-by-one replay:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// How long each job of the backlogs may take once workers run.
const JOB_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_35_s_backlog_of_one_keys_writes_applies_completely_and_in_order() {
    let mut stack = Stack::builder().workers(0).start().await;
    let sent = send_ten_writes_to_six_keys(&stack, "backlog").await;
    // The point of the test: the backlog is older than any timeout a
    // clock-driven order would use (the old gap timeout was 30 s) when the
    // workers start.
    tokio::time::sleep(Duration::from_secs(35)).await;
    // Two workers starting together share the backlog's first fetches.
    stack.start_workers_with_env(2, &[]).await;
    assert_backlog_applied(&stack, &sent).await;
}

/// libfaketime's preload library (Debian's `faketime` package installs it;
/// scripts/test.sh does).
fn libfaketime() -> String {
    let mut dirs: Vec<PathBuf> = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path()));
    }
    dirs.extend(["/usr/lib", "/usr/lib64", "/usr/local/lib"].map(PathBuf::from));
    dirs.iter()
        .map(|dir| dir.join("faketime/libfaketime.so.1"))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "libfaketime.so.1 is not installed (looked in <dir>/faketime/ for {dirs:?}): \
                 run `apt-get install -y faketime` (scripts/test.sh installs it)"
            )
        })
        .display()
        .to_string()
}

#[tokio::test]
async fn a_backlog_ten_minutes_old_applies_completely_and_in_order() {
    let library = libfaketime();
    let mut stack = Stack::builder().workers(0).start().await;
    let sent = send_ten_writes_to_six_keys(&stack, "lagged").await;
    // The workers run 10 minutes in the future (their wall clock only:
    // timers and timeouts run on the real monotonic clock), so every job
    // they take looks 10 minutes old.
    let faked = [
        ("LD_PRELOAD", library.as_str()),
        ("FAKETIME", "+10m"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    stack.start_workers_with_env(2, &faked).await;
    // The faked clock really took effect, so that the test cannot pass
    // vacuously: the workers log 10 minutes ahead...
    let ten_minutes = 10 * 60 * 1000;
    for worker in &stack.workers {
        let line: Value = worker
            .wait_for_log("worker running", Duration::from_secs(1))
            .await;
        let logged = unix_ms(line["timestamp"].as_str().unwrap_or_default());
        assert!(
            logged - now_ms() > ten_minutes - 60_000,
            "a worker's clock is not 10 minutes ahead: {line}"
        );
    }
    assert_backlog_applied(&stack, &sent).await;
    // ... and record jobs finished 10 minutes after they were accepted.
    for (_, writes) in &sent {
        let job = stack.job(&writes[9].id).await;
        let enqueued = unix_ms(job["enqueued_at"].as_str().unwrap_or_default());
        let finished = unix_ms(job["finished_at"].as_str().unwrap_or_default());
        assert!(
            finished - enqueued > ten_minutes - 60_000,
            "the job did not finish 10 minutes after it was accepted: {job}"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Writes accepted while the data Redis is down apply, in order, once it
// is back.

#[tokio::test]
async fn writes_accepted_while_the_data_redis_is_down_apply_in_order_once_it_is_back() {
    // Two attempts and 0.5 s Redis timeouts: a worker that counted tries
    // against an unreachable data Redis would kill these jobs within
    // seconds.
    let mut stack = Stack::builder()
        .workers(2)
        .kv_persistent()
        .quick_to_give_up()
        .start()
        .await;
    let keys: Vec<String> = (0..4).map(|k| format!("outage/{k}")).collect();
    for key in keys.iter().chain([&"outage/untouched".to_owned()]) {
        let job = stack.finished(stack.create(key, json!(0)).await).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }

    stack.kv.stop();
    let read = stack.get(&keys[0]).await;
    assert_eq!(read.status(), 503, "a read while the data Redis is down");
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["code"], "backend_unavailable", "{read}");

    // Per key, in order: successes, business failures and If-Match, every
    // key's fifth write with `Prefer: wait=1` (202 once the wait runs out).
    let plan = |key: &str| -> Vec<Write> {
        let at = |op, value, version| Write {
            if_match: Some(version),
            ..write(key, op, value)
        };
        vec![
            write(key, "update", 1),  // updated:2
            write(key, "upsert", 2),  // updated:3
            write(key, "delete", 3),  // deleted:4
            write(key, "update", 4),  // not_found
            write(key, "upsert", 5),  // created:5
            write(key, "create", 6),  // already_exists
            at("update", 7, 5),       // updated:6
            at("update", 8, 1),       // version_mismatch
            at("delete", 9, 6),       // deleted:7
            write(key, "upsert", 10), // created:8
            write(key, "update", 11), // updated:9
        ]
    };
    let sent: Vec<(String, Vec<Sent>)> = join_all(keys.iter().map(|key| {
        let stack = &stack;
        async move {
            let mut sent = Vec::new();
            for (i, write) in plan(key).iter().enumerate() {
                let wait = (i == 4).then_some(1);
                sent.push(accept(stack, write, wait).await);
            }
            assert_seqs_increase(key, &sent);
            (key.clone(), sent)
        }
    }))
    .await;
    // The outage lasts on (the workers keep trying meanwhile): its length
    // must not matter.
    tokio::time::sleep(Duration::from_secs(3)).await;

    stack.kv.restart();
    // The data Redis came back with its data (the write nobody touched is
    // there), so the replay below starts from the state before the outage.
    let untouched = eventually(Duration::from_secs(15), "reads to work again", || async {
        let read = stack.get("outage/untouched").await;
        (read.status() == 200).then_some(read)
    })
    .await;
    let untouched: Value = untouched.json().await.unwrap();
    assert_eq!(
        (untouched["value"].clone(), untouched["version"].clone()),
        (json!(0), json!(1))
    );

    for (key, writes) in &sent {
        let before = Model {
            live: Some(0),
            version: 1,
        };
        let model = assert_replayed(&stack, key, writes, before, JOB_DEADLINE).await;
        assert_eq!((model.live, model.version), (Some(11), 9), "{key}");
    }
}

// ---------------------------------------------------------------------------
// 4. The queue Redis restarted empty: the next write to an existing key
// applies.

/// Sends upserts with `Idempotency-Key`s, retried after any 5xx until
/// accepted (a retry with the same key completes the write exactly once):
/// for when the API's connections to the queue Redis may still be broken.
async fn accept_retried(stack: &Stack, key: &str, value: i64, token: &str) -> Sent {
    let write = write(key, "upsert", value);
    eventually(
        Duration::from_secs(15),
        "a write to be accepted",
        || async {
            let response = request(stack, &write)
                .header("idempotency-key", token)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            if status >= 500 {
                return None;
            }
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 202, "{write:?}: {body}");
            Some(Sent {
                write: write.clone(),
                seq: body["seq"].as_u64().unwrap_or_default(),
                id: body["job_id"].as_str().unwrap_or_default().to_owned(),
            })
        },
    )
    .await
}

#[tokio::test]
async fn after_the_queue_redis_restarts_empty_the_next_write_to_an_existing_key_applies() {
    let mut stack = Stack::builder().workers(2).start().await;
    // Keys in every bucket (every partition), at version 3; partitions
    // handed on once (a worker killed and replaced) between the writes, so
    // whatever a partition's owner counts is past its start.
    let names = keys_in_every_bucket("reborn", 1);
    let mut models: HashMap<String, Model> = HashMap::new();
    let mut last = String::new();
    for round in 1..=3 {
        if round == 3 {
            let victim = stack.workers.remove(0);
            victim.signal("KILL");
            drop(victim);
            stack.start_worker().await;
        }
        let sent = join_all(names.iter().map(|key| {
            let stack = &stack;
            async move { accept(stack, &write(key, "upsert", round), None).await }
        }))
        .await;
        for s in sent {
            let model = models.remove(&s.write.key).unwrap_or_default();
            let key = s.write.key.clone();
            let model =
                assert_replayed(&stack, &key, std::slice::from_ref(&s), model, JOB_DEADLINE).await;
            models.insert(key, model);
            last = s.id;
        }
    }

    stack.queue.restart();
    // The queue Redis really lost everything: the last job is unknown now.
    eventually(
        Duration::from_secs(15),
        "the old job to be gone",
        || async {
            let response = stack
                .request(Method::GET, &format!("/v1/jobs/{last}"))
                .send()
                .await
                .unwrap();
            (response.status() == 404).then_some(())
        },
    )
    .await;

    // The next write to each key applies, at version 4; then writes keep
    // applying in order.
    for round in 4..=8 {
        let sent = join_all(names.iter().map(|key| {
            let stack = &stack;
            async move { accept_retried(stack, key, round, &format!("{key}/{round}")).await }
        }))
        .await;
        for s in sent {
            let key = s.write.key.clone();
            let model = models.remove(&key).unwrap_or_default();
            let model = assert_replayed(&stack, &key, &[s], model, JOB_DEADLINE).await;
            assert_eq!(model.version, round as u64, "{key}");
            models.insert(key, model);
        }
    }
}

/// `per_bucket` keys `<prefix>/<n>` in each of the data layout's buckets, so
/// that they cover every queue partition whatever `KVQ_QUEUE_PARTITIONS`
/// is (a key's partition is its bucket modulo the partitions).
pub(crate) fn keys_in_every_bucket(prefix: &str, per_bucket: usize) -> Vec<String> {
    let mut count: HashMap<u16, usize> = HashMap::new();
    let mut chosen = Vec::new();
    let mut n = 0;
    while chosen.len() < per_bucket * usize::from(keys::BUCKETS) {
        let key = format!("{prefix}/{n}");
        let taken = count.entry(keys::bucket(&key)).or_default();
        if *taken < per_bucket {
            *taken += 1;
            chosen.push(key);
        }
        n += 1;
    }
    chosen
}

// ---------------------------------------------------------------------------
// 5. A worker frozen, then one killed, while holding partitions: their jobs
// finish elsewhere within 10 s, and nothing applies twice.

/// One write of a steady stream: an upsert of `value` to key `key`.
#[derive(Debug, Clone)]
pub(crate) struct Streamed {
    pub(crate) key: String,
    pub(crate) value: i64,
    pub(crate) seq: u64,
    pub(crate) id: String,
    /// When its 202 arrived, Unix ms.
    pub(crate) accepted_ms: i64,
}

/// Upserts `count` writes, values from `first`, to `keys` round robin, one
/// every 20 ms from 4 clients; sends `()` on `fault` once `fault_at` writes
/// are on their way.
pub(crate) async fn steady_stream(
    stack: Arc<Stack>,
    keys: Arc<Vec<String>>,
    first: i64,
    count: usize,
    fault_at: usize,
    fault: tokio::sync::mpsc::Sender<()>,
) -> Vec<Streamed> {
    let start = tokio::time::Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let (stack, keys, fault) = (stack.clone(), keys.clone(), fault.clone());
            async move {
                tokio::time::sleep_until(start + Duration::from_millis(20 * i as u64)).await;
                if i == fault_at {
                    let _ = fault.send(()).await;
                }
                let value = first + i as i64;
                let key = &keys[(value as usize) % keys.len()];
                let sent = accept(&stack, &write(key, "upsert", value), None).await;
                Streamed {
                    key: key.clone(),
                    value,
                    seq: sent.seq,
                    id: sent.id,
                    accepted_ms: now_ms(),
                }
            }
        })
        .buffer_unordered(4)
        .collect()
        .await
}

/// Waits for every streamed job and checks each succeeded within 10 s of
/// its 202, or of the fault (at `fault_ms`) if it was accepted before it
/// (by its record's `finished_at`). Returns each job's record and the
/// smallest margin left, ms.
async fn assert_finished_within_10_s(
    stack: &Stack,
    streamed: &[Streamed],
    fault_ms: i64,
    what: &str,
) -> (HashMap<String, Value>, i64) {
    let mut records = HashMap::new();
    let mut margin = i64::MAX;
    for s in streamed {
        let job = stack.wait_job_within(&s.id, Duration::from_secs(30)).await;
        assert_eq!(job["status"], "succeeded", "{what}: {job}");
        let finished = unix_ms(job["finished_at"].as_str().unwrap_or_default());
        let deadline = s.accepted_ms.max(fault_ms) + 10_000;
        assert!(
            finished <= deadline,
            "{what}: {} finished {} ms after its 202 ({} ms after the fault): {job}",
            s.key,
            finished - s.accepted_ms,
            finished - fault_ms
        );
        margin = margin.min(deadline - finished);
        records.insert(s.id.clone(), job);
    }
    (records, margin)
}

/// Checks the whole stream against a one-by-one replay: per key, seqs
/// strictly increase in the order the writes were sent, the jobs report
/// versions 1, 2, 3... in that order (none twice), and the key holds its
/// last write at the version counting all of them.
pub(crate) async fn assert_stream_replayed(
    stack: &Stack,
    streamed: &[Streamed],
    records: &HashMap<String, Value>,
) {
    let mut by_key: HashMap<&str, Vec<&Streamed>> = HashMap::new();
    for s in streamed {
        by_key.entry(&s.key).or_default().push(s);
    }
    for (key, mut writes) in by_key {
        writes.sort_by_key(|s| s.value);
        let seqs: Vec<u64> = writes.iter().map(|s| s.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key}: seqs do not increase: {seqs:?}"
        );
        let versions: Vec<u64> = writes
            .iter()
            .map(|s| records[&s.id]["result"]["version"].as_u64().unwrap_or(0))
            .collect();
        let expected: Vec<u64> = (1..=writes.len() as u64).collect();
        assert_eq!(versions, expected, "{key}: versions in send order");
        let last = writes.last().map(|s| s.value);
        let model = Model {
            live: last,
            version: writes.len() as u64,
        };
        assert_reads_as(stack, key, &model).await;
    }
}

/// Runs `fault` while the workers hold jobs: 0.7 s into a 1.5 s pause of
/// the data Redis' writes, during which applies wait and the stream's jobs
/// pile up in flight. Returns when the fault happened, Unix ms.
async fn with_jobs_in_flight(stack: &Stack, fault: impl FnOnce()) -> i64 {
    let _: () = stack.kv.cmd(&["CLIENT", "PAUSE", "1500", "WRITE"]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    fault();
    now_ms()
}

#[tokio::test]
async fn a_frozen_or_killed_workers_partitions_and_jobs_move_on_within_10_s_and_apply_once() {
    let mut stack = Stack::builder().workers(2).start().await;
    let frozen_pid = stack.workers[0].pid();
    let killed = stack.workers.remove(1);
    let stack = Arc::new(stack);
    let keys = Arc::new(keys_in_every_bucket("moved", 2));

    // Freeze a worker (SIGSTOP) with jobs in flight, 1 s into an 8 s
    // stream of writes.
    let (tx, mut fault) = tokio::sync::mpsc::channel(1);
    let stream = tokio::spawn(steady_stream(stack.clone(), keys.clone(), 0, 400, 50, tx));
    fault.recv().await.unwrap();
    let frozen_ms = with_jobs_in_flight(&stack, || kvq_testkit::signal(frozen_pid, "STOP")).await;
    let first = stream.await.unwrap();
    let (records, margin) =
        assert_finished_within_10_s(&stack, &first, frozen_ms, "a worker frozen").await;
    eprintln!("frozen worker: smallest margin left of the 10 s: {margin} ms");
    assert_stream_replayed(&stack, &first, &records).await;

    // It wakes after its partitions moved: it applies nothing more.
    kvq_testkit::signal(frozen_pid, "CONT");

    // Kill the other worker (SIGKILL) with jobs in flight, 1 s into a
    // second stream.
    let (tx, mut fault) = tokio::sync::mpsc::channel(1);
    let stream = tokio::spawn(steady_stream(stack.clone(), keys.clone(), 400, 400, 50, tx));
    fault.recv().await.unwrap();
    let killed_ms = with_jobs_in_flight(&stack, || killed.signal("KILL")).await;
    drop(killed);
    let second = stream.await.unwrap();
    let (more, margin) =
        assert_finished_within_10_s(&stack, &second, killed_ms, "a worker killed").await;
    eprintln!("killed worker: smallest margin left of the 10 s: {margin} ms");

    // The whole run equals a one-by-one replay, and the records of the
    // first stream are as they were before the frozen worker woke.
    let all: Vec<Streamed> = first.iter().chain(&second).cloned().collect();
    let mut records_now = more;
    for s in &first {
        let job = stack.job(&s.id).await;
        assert_eq!(
            (&job["status"], &job["result"]),
            (&records[&s.id]["status"], &records[&s.id]["result"]),
            "{}: the record changed after the frozen worker woke",
            s.key
        );
        records_now.insert(s.id.clone(), job);
    }
    assert_stream_replayed(&stack, &all, &records_now).await;
}

// ---------------------------------------------------------------------------
// 6. The queue Redis keeps no per-key state.

#[tokio::test]
async fn the_queue_redis_returns_to_its_baseline_after_50000_distinct_keys() {
    let mut stack = Stack::builder()
        .workers(2)
        .env("KVQ_JOB_RETENTION_SECONDS", "2")
        .start()
        .await;
    let http = reqwest::Client::new();
    let base = stack.base().to_owned();
    let create_all = |prefix: &'static str, count: usize| {
        let (http, base) = (http.clone(), base.clone());
        futures::stream::iter(0..count)
            .map(move |i| {
                let (http, base) = (http.clone(), base.clone());
                async move {
                    let response = http
                        .post(format!("{base}/v1/kv"))
                        .json(&json!({"key": format!("{prefix}/{i}"), "value": i}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 202, "{prefix}/{i}");
                    let body: Value = response.json().await.unwrap();
                    body["job_id"].as_str().unwrap().to_owned()
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<String>>()
    };
    let expired = |ids: Vec<String>| {
        let stack = &stack;
        async move {
            for id in &ids {
                eventually(
                    Duration::from_secs(60),
                    "a job record to expire",
                    || async {
                        let response = stack
                            .request(Method::GET, &format!("/v1/jobs/{id}"))
                            .send()
                            .await
                            .unwrap();
                        (response.status() == 404).then_some(())
                    },
                )
                .await;
            }
        }
    };

    // Warm up (connections, scripts, partitions, consumer state), then the
    // baseline once the warm-up's records expired.
    let warm = create_all("warm", 500).await;
    eventually(Duration::from_secs(60), "the warm-up to apply", || async {
        (count_keys(&stack, "warm/").await == 500).then_some(())
    })
    .await;
    expired(warm).await;
    let keys_before: u64 = stack.queue.cmd(&["DBSIZE"]);
    let memory_before = queue_memory(&stack, "used_memory");

    let total = 50_000;
    let started = Instant::now();
    let ids = create_all("distinct", total).await;
    let accepted_in = started.elapsed();
    // Applied: the data Redis holds every key (counted by listing them).
    eventually(
        Duration::from_secs(180),
        "all 50,000 keys to apply",
        || async { (count_keys(&stack, "distinct/").await == total).then_some(()) },
    )
    .await;
    let applied_in = started.elapsed();
    let peak_keys: u64 = stack.queue.cmd(&["DBSIZE"]);
    let peak_memory = queue_memory(&stack, "used_memory");
    expired(ids.iter().step_by(97).cloned().collect()).await;

    let (keys_after, memory_after) = eventually(
        Duration::from_secs(60),
        "the queue Redis back near its baseline",
        || async {
            let keys: u64 = stack.queue.cmd(&["DBSIZE"]);
            let memory = queue_memory(&stack, "used_memory");
            (keys <= keys_before + 40 && memory <= memory_before + 2 * 1024 * 1024)
                .then_some((keys, memory))
        },
    )
    .await;
    eprintln!(
        "queue Redis: baseline {keys_before} keys, {memory_before} B; \
         after 50,000 keys (accepted in {accepted_in:?}, applied in {applied_in:?}): \
         peak {peak_keys} keys, {peak_memory} B; after retention {keys_after} keys, \
         {memory_after} B"
    );
    for worker in &mut stack.workers {
        assert!(worker.is_running(), "a worker exited");
    }
}

/// How many keys `GET /v1/kv?prefix=` lists, in pages of 1,000.
async fn count_keys(stack: &Stack, prefix: &str) -> usize {
    let (mut count, mut cursor) = (0, String::new());
    loop {
        let path = format!("/v1/kv?prefix={prefix}&limit=1000&cursor={cursor}");
        let response = stack.request(Method::GET, &path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let page: Value = response.json().await.unwrap();
        count += page["keys"].as_array().map_or(0, Vec::len);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => return count,
        }
    }
}

// ---------------------------------------------------------------------------
// 7. A dead job redelivered after its key's later write applied.

/// A job that ended `dead` lets its key's later writes pass it, and stays
/// dead: it is not applied behind them when its partition is taken over
/// before its place in the stream was committed.
///
/// One partition, so that another key's failing jobs earlier in the stream
/// hold the commit back. Key `a`'s jobs fail (its metadata is a string, so
/// the apply script gets WRONGTYPE: an error Redis answered) and retry for
/// a long time; key `b`'s first write dies the same way, its metadata is
/// then repaired, and its second write succeeds. The worker is killed (the
/// dead job's place still uncommitted) and another one takes the partition
/// over and runs it again from the last commit.
#[tokio::test]
async fn a_dead_job_stays_dead_when_its_partition_is_run_again_after_a_later_write() {
    let mut stack = Stack::builder()
        .workers(1)
        .env("KVQ_QUEUE_PARTITIONS", "1")
        .env("KVQ_WORKER_MAX_ATTEMPTS", "5")
        .start()
        .await;
    let broken = |key: &str| keys::meta_key("kvq", key);
    let _: () = stack.kv.cmd(&["SET", &broken("a"), "not a hash"]);
    let _: () = stack.kv.cmd(&["SET", &broken("b"), "not a hash"]);
    // Twenty of `a`'s writes, each retried for about 1.5 s before it dies:
    // the partition's final prefix, and its commit, stay behind them.
    for i in 0..20 {
        let accepted = stack.put("a?upsert=true", json!({"value": i})).await;
        assert_eq!(accepted.status(), 202);
    }
    let first = stack.put("b?upsert=true", json!({"value": "first"})).await;
    let first = Stack::job_id(first).await;
    let died = stack.wait_job(&first).await;
    assert_eq!(died["status"], "dead", "{died}");
    let _: () = stack.kv.cmd(&["DEL", &broken("b")]);
    let second = stack.put("b?upsert=true", json!({"value": "second"})).await;
    let second = stack.finished(second).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    // The dead job's place is not committed yet: `a`'s jobs before it are
    // still being retried.
    let first_seq = died["seq"].as_u64().unwrap();
    let done: Option<String> = stack.queue.cmd(&["GET", &keys::done_key("kvq", 0)]);
    let done_seq = done.map_or(0, |d| d.split('-').next().unwrap().parse::<u64>().unwrap());
    assert!(done_seq < first_seq, "committed past the dead job already");
    let killed = stack.workers.remove(0);
    killed.signal("KILL");
    drop(killed);
    let _: () = stack.kv.cmd(&["DEL", &broken("a")]);
    stack.start_worker().await;
    eventually(
        Duration::from_secs(30),
        "the partition to be run again and committed",
        || async {
            let left: i64 = stack.queue.cmd(&["XLEN", &keys::stream_key("kvq", 0)]);
            (left == 0).then_some(())
        },
    )
    .await;
    let read = stack.get("b").await;
    assert_eq!(read.status(), 200);
    let read: Value = read.json().await.unwrap();
    assert_eq!(
        read["value"], "second",
        "the dead write applied over the later one: {read}"
    );
    let first = stack.job(&first).await;
    assert_eq!(first["status"], "dead", "{first}");
}
