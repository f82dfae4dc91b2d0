//! Issue 12 from outside: kvq on Redis Cluster and Sentinel keeps the
//! promises it makes on one server, and those README's "Redis Cluster and
//! Sentinel" adds for failovers.
//!
//! - A stack on two clusters, and one on two sentinel sets, carry a write
//!   end to end, with a password.
//! - The storm of the guarantees equals its one-by-one replay with data and
//!   queue each on a 3-master cluster.
//! - A data master, then a queue master, is killed mid-stream with
//!   `KVQ_*_REDIS_WAIT_REPLICAS=1`: no write acknowledged (200/201 with
//!   `Prefer: wait`, or 202) is lost or applied twice, and writes are
//!   acknowledged again within 15 s.
//! - A Sentinel-watched queue master is killed mid-stream: API and workers
//!   follow the new master by themselves, every 202 after the kill applies
//!   and none before it applies twice.
//! - Listing by prefix spans the masters, every key once, also while a
//!   master fails over mid-listing.
//!
//! A master that is killed on loopback has usually replicated everything,
//! so a failover loses nothing whatever kvq does. The failover tests kill a
//! master while its replica lags, as asynchronous replication allows: the
//! replica is frozen and cut off first, so the writes of the last 1.2 s are
//! on the master alone and die with it. Only `WAIT` keeps such a write from
//! being acknowledged; without it, these tests fail.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvq_shared::keys;
use kvq_testkit::{Stack, TestCluster, eventually};
use serde_json::{Value, json};

use crate::guarantees::storm_equals_replay;
use crate::list::{add_page, list_all, try_page};
use crate::writepath::keys_in_every_bucket;

#[tokio::test]
async fn a_stack_on_two_clusters_applies_a_write_end_to_end() {
    let stack = Stack::builder()
        .kv_cluster()
        .queue_cluster()
        .redis_password("pw")
        .start()
        .await;
    assert!(
        stack
            .env()
            .contains(&("KVQ_KV_REDIS_MODE".into(), "cluster".into()))
    );
    let job = stack
        .finished(stack.create("some-key", json!(7)).await)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let body: serde_json::Value = stack.get("some-key").await.json().await.unwrap();
    assert_eq!(body["value"], 7);

    // The value lives on the data master of its slot, not elsewhere.
    let cluster = stack.kv.cluster();
    let value_key = keys::value_key("kvq", "some-key");
    let home = cluster.master_of_key(&value_key);
    for (port, count) in cluster.keys_per_master(&value_key) {
        assert_eq!(count, usize::from(port == home), "{value_key} on {port}");
    }
    // The owner commits the job within tens of milliseconds of its end.
    eventually(
        Duration::from_secs(10),
        "the job to be committed",
        || async { (stack.queue.try_pending_jobs() == Some(0)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_stack_on_two_sentinel_sets_applies_a_write_end_to_end() {
    let stack = Stack::builder()
        .kv_sentinel()
        .queue_sentinel()
        .redis_password("pw")
        .start()
        .await;
    let job = stack
        .finished(stack.create("some-key", json!(7)).await)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let body: serde_json::Value = stack.get("some-key").await.json().await.unwrap();
    assert_eq!(body["value"], 7);
    let value: Option<String> = stack
        .kv
        .cmd(&["HGET", &keys::value_key("kvq", "some-key"), "v"]);
    assert_eq!(
        value.as_deref(),
        Some("7"),
        "on the master the sentinels name"
    );
}

// ---------------------------------------------------------------------------
// The storm on two clusters.

#[tokio::test]
async fn the_storm_on_a_data_and_a_queue_cluster_equals_a_one_by_one_replay() {
    let stack = Arc::new(
        Stack::builder()
            .kv_cluster()
            .queue_cluster()
            .workers(2)
            .env("KVQ_WORKER_CONCURRENCY", "16")
            .start()
            .await,
    );
    storm_equals_replay(stack.clone()).await;

    // The 150 keys' values are on every data master, and the queue's
    // partition streams on more than one queue master.
    let values = stack.kv.cluster().keys_per_master("kvq:v:*");
    let streams = stack.queue.cluster().keys_per_master("kvq:p:*:stream");
    eprintln!(
        "values per data master: {values:?}; partition streams per queue master: {streams:?}"
    );
    assert_eq!(values.len(), 3, "{values:?}");
    assert!(values.iter().all(|&(_, n)| n > 0), "{values:?}");
    let with_streams = streams.iter().filter(|&&(_, n)| n > 0).count();
    assert!(with_streams > 1, "{streams:?}");
    assert_eq!(streams.iter().map(|&(_, n)| n).sum::<usize>(), 16);
}

// ---------------------------------------------------------------------------
// Failing masters.

/// How far a killed master's replica lags behind it: longer than a `WAIT`
/// may block (1 s with the default 5 s Redis timeout), so that some `WAIT`s
/// come back short while the master lives, and shorter than the node
/// timeout (2 s), so that the cluster never deems the frozen replica failed.
const BEHIND: Duration = Duration::from_millis(1_200);

/// Kills master `port` of `cluster` (SIGKILL) while its replica lags by
/// `behind`: the replica is frozen (SIGSTOP) and the master drops its link,
/// so the writes of that time reach the master alone (its `WAIT`s get no
/// replica); then the master is killed and the replica woken, and the
/// cluster promotes it without those writes. Returns when the master died.
///
/// In a freshly formed cluster the first nodes started are the masters, so
/// `TestCluster::kill` asks one of them, not the frozen replica, which slot
/// the master served.
async fn kill_master_ahead_of_its_replica(
    cluster: &mut TestCluster,
    port: u16,
    behind: Duration,
) -> Instant {
    let replica = cluster
        .replica_of(port)
        .unwrap_or_else(|| panic!("master {port} has no replica"));
    let replica_pid = cluster.node(replica).pid().unwrap();
    kvq_testkit::signal(replica_pid, "STOP");
    let _: i64 = cluster
        .node(port)
        .cmd(&["CLIENT", "KILL", "TYPE", "replica"]);
    tokio::time::sleep(behind).await;
    cluster.kill(port);
    let killed = Instant::now();
    kvq_testkit::signal(replica_pid, "CONT");
    killed
}

/// What one write request got.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// 200 / 201 with `Prefer: wait`: applied, at this version.
    Applied { id: String, version: u64 },
    /// 202: queued (with `Prefer: wait`, not final in time).
    Queued { id: String, replayed: bool },
    /// 503 with this problem code.
    Refused(String),
    /// No answer (connection refused or cut, timeout).
    None,
}

impl Answer {
    fn label(&self) -> String {
        match self {
            Answer::Applied { .. } => "200/201 applied".into(),
            Answer::Queued { .. } => "202".into(),
            Answer::Refused(code) => format!("503 {code}"),
            Answer::None => "no answer".into(),
        }
    }

    fn job_id(&self) -> Option<&str> {
        match self {
            Answer::Applied { id, .. } | Answer::Queued { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// One request: when it was sent and answered, and what it got.
#[derive(Debug, Clone)]
struct Try {
    sent: Instant,
    answered: Instant,
    answer: Answer,
}

/// Sends an upsert of `value` to `key`, with `Prefer: wait=<wait>` and an
/// `Idempotency-Key` if given. Fails on any answer but 200, 201, 202 and
/// 503.
async fn upsert(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    value: i64,
    wait: Option<u64>,
    token: Option<&str>,
) -> Try {
    let sent = Instant::now();
    let mut request = http
        .put(format!("{base}/v1/kv/{key}?upsert=true"))
        .json(&json!({"value": value}));
    if let Some(seconds) = wait {
        request = request.header("prefer", format!("wait={seconds}"));
    }
    if let Some(token) = token {
        request = request.header("idempotency-key", token);
    }
    let answer = match request.send().await {
        Err(_) => Answer::None,
        Ok(response) => {
            let status = response.status().as_u16();
            let replayed = response
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true");
            match response.json::<Value>().await {
                Err(_) => Answer::None,
                Ok(body) => match status {
                    200 | 201 => Answer::Applied {
                        id: body["id"].as_str().unwrap().to_owned(),
                        version: body["result"]["version"].as_u64().unwrap(),
                    },
                    202 => Answer::Queued {
                        id: body["job_id"].as_str().unwrap().to_owned(),
                        replayed,
                    },
                    503 => Answer::Refused(body["code"].as_str().unwrap_or("").to_owned()),
                    _ => panic!("{key} = {value}: {status} {body}"),
                },
            }
        }
    };
    Try {
        sent,
        answered: Instant::now(),
        answer,
    }
}

/// One logical write: an upsert of a value no other write uses, and every
/// request it took.
#[derive(Debug, Clone)]
struct Logical {
    key: String,
    value: i64,
    token: Option<String>,
    tries: Vec<Try>,
}

impl Logical {
    /// The answer that settled it: the last try's.
    fn last(&self) -> &Try {
        self.tries.last().unwrap()
    }
}

/// A client owning `keys` (no other client writes them): upserts to them
/// round robin, one request at a time, until `stop`. Each write is a new
/// value; with `wait`, it carries `Prefer: wait=<wait>` and is sent once;
/// with `retry`, it carries an `Idempotency-Key` and is sent again, 20 ms
/// after a 503 or no answer, until a 202 (for at most 30 s).
async fn client(
    number: i64,
    base: String,
    keys: Vec<String>,
    wait: Option<u64>,
    retry: bool,
    stop: Arc<AtomicBool>,
) -> Vec<Logical> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap();
    let mut writes = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let key = keys[i % keys.len()].clone();
        let value = number * 1_000_000 + i as i64;
        let token = retry.then(|| format!("w-{number}-{i}"));
        let started = Instant::now();
        let mut tries = Vec::new();
        loop {
            let attempt = upsert(&http, &base, &key, value, wait, token.as_deref()).await;
            let settled = !retry || matches!(attempt.answer, Answer::Queued { .. });
            tries.push(attempt);
            if settled {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{key} = {value}: no 202 in 30 s: {tries:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        writes.push(Logical {
            key,
            value,
            token,
            tries,
        });
        i += 1;
    }
    writes
}

/// Starts a [`client`] per group of `keys` against the stack's API.
fn clients(
    stack: &Stack,
    groups: Vec<Vec<String>>,
    wait: Option<u64>,
    retry: bool,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Logical>>> {
    groups
        .into_iter()
        .enumerate()
        .map(|(n, keys)| {
            tokio::spawn(client(
                n as i64 + 1,
                stack.base().to_owned(),
                keys,
                wait,
                retry,
                stop.clone(),
            ))
        })
        .collect()
}

/// Stops the clients and gathers their writes, by key, in the order sent.
async fn gather(
    stop: &AtomicBool,
    running: Vec<tokio::task::JoinHandle<Vec<Logical>>>,
) -> HashMap<String, Vec<Logical>> {
    stop.store(true, Ordering::SeqCst);
    let mut by_key: HashMap<String, Vec<Logical>> = HashMap::new();
    for client in running {
        for write in client.await.unwrap() {
            by_key.entry(write.key.clone()).or_default().push(write);
        }
    }
    by_key
}

/// What became of a job's record.
enum Record {
    /// Final (`succeeded`, `failed` or `dead`).
    Final(Value),
    /// Unknown to the queue Redis (lost in a failover).
    Lost,
    /// Still not final when the deadline passed: its last reading.
    Stuck(Value),
}

/// Waits until job `id`'s record is final or unknown, for at most `within`.
async fn record_of(stack: &Stack, id: &str, within: Duration) -> Record {
    let deadline = Instant::now() + within;
    let mut last = Value::Null;
    loop {
        let response = stack
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}"))
            .send()
            .await;
        if let Ok(response) = response {
            match response.status().as_u16() {
                404 => return Record::Lost,
                200 => {
                    last = response.json().await.unwrap_or(Value::Null);
                    if matches!(
                        last["status"].as_str(),
                        Some("succeeded" | "failed" | "dead")
                    ) {
                        return Record::Final(last);
                    }
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Record::Stuck(last);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Job `id`'s record once final (waiting up to 30 s), or `None` if the
/// queue Redis does not know it.
async fn final_record(stack: &Stack, id: &str) -> Option<Value> {
    match record_of(stack, id, Duration::from_secs(30)).await {
        Record::Final(job) => Some(job),
        Record::Lost => None,
        Record::Stuck(job) => panic!("job {id} not final after 30 s: {job}"),
    }
}

/// Fails unless every key applied each of its writes exactly once, in the
/// order sent (a replay of them one by one): its writes make versions 1, 2,
/// 3...; each one's job succeeded and reports its version (and a 200/201
/// said the same); the key reads as its last write. Returns how many writes
/// were checked.
async fn assert_applied_once_in_order(
    stack: &Stack,
    by_key: &HashMap<String, Vec<Logical>>,
) -> usize {
    let mut checked = 0;
    for (key, writes) in by_key {
        for (position, write) in writes.iter().enumerate() {
            let version = position as u64 + 1;
            let answer = &write.last().answer;
            let id = answer.job_id().unwrap();
            let job = final_record(stack, id)
                .await
                .unwrap_or_else(|| panic!("{key} = {}: job {id} was lost", write.value));
            assert_eq!(job["status"], "succeeded", "{key} = {}: {job}", write.value);
            assert_eq!(
                job["result"]["version"], version,
                "{key} = {}: write number {version} of the key applied as another version: {job}",
                write.value
            );
            if let Answer::Applied { version: said, .. } = answer {
                assert_eq!(*said, version, "{key} = {}: answered", write.value);
            }
            checked += 1;
        }
        let read: Value = stack.get(key).await.json().await.unwrap();
        let last = writes.last().map(|w| w.value);
        assert_eq!(
            (read["value"].as_i64(), read["version"].as_u64()),
            (last, Some(writes.len() as u64)),
            "{key}: {read}"
        );
    }
    checked
}

/// How many tries got each kind of answer.
fn tally<'a>(tries: impl IntoIterator<Item = &'a Try>) -> Vec<(String, usize)> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in tries {
        *counts.entry(t.answer.label()).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort();
    counts
}

#[tokio::test]
async fn a_data_master_killed_mid_stream_with_wait_replicas_loses_no_acknowledged_write() {
    let mut stack = Stack::builder()
        .kv_cluster()
        .workers(2)
        .env("KVQ_KV_REDIS_WAIT_REPLICAS", "1")
        .start()
        .await;
    // 8 keys on each data master; one client each, `Prefer: wait=3`.
    let cluster = stack.kv.cluster();
    let victim = cluster.masters()[0];
    let mut groups: HashMap<u16, Vec<String>> = HashMap::new();
    for n in 0.. {
        let key = format!("acked/{n}");
        let home = groups
            .entry(cluster.master_of_key(&keys::value_key("kvq", &key)))
            .or_default();
        if home.len() < 8 {
            home.push(key);
        }
        if groups.len() == 3 && groups.values().all(|g| g.len() == 8) {
            break;
        }
    }
    let on_victim = groups[&victim].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let groups: Vec<Vec<String>> = groups.into_values().flatten().map(|k| vec![k]).collect();
    let running = clients(&stack, groups, Some(3), false, &stop);

    // One second of writes, then the master dies 1.2 s ahead of its
    // replica; it comes back (as a restarted pod would) once its replica
    // took over, as a replica: with WAIT 1, its shard acknowledges no
    // write until then.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cluster = stack.kv.cluster_mut();
    let killed = kill_master_ahead_of_its_replica(cluster, victim, BEHIND).await;
    let promoted = cluster.wait_failover(victim).await;
    let failed_over = killed.elapsed();
    cluster.restart(victim).await;
    let restarted = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let by_key = gather(&stop, running).await;

    // Every write was queued, and applied once, in order: none answered
    // 200/201 is missing, none applied twice.
    let tries: Vec<(bool, &Try)> = by_key
        .iter()
        .flat_map(|(key, writes)| {
            let victims = on_victim.contains(key);
            writes
                .iter()
                .flat_map(|w| &w.tries)
                .map(move |t| (victims, t))
        })
        .collect();
    for (_, t) in &tries {
        assert!(
            matches!(t.answer, Answer::Applied { .. } | Answer::Queued { .. }),
            "the queue was fine, yet: {t:?}"
        );
    }
    let checked = assert_applied_once_in_order(&stack, &by_key).await;

    // Acknowledged again: the first 200/201 to a write sent after the kill,
    // on the killed master's keys and on the others'.
    let first_ack = |victims: bool| {
        tries
            .iter()
            .filter(|(v, t)| *v == victims && t.sent > killed)
            .filter(|(_, t)| matches!(t.answer, Answer::Applied { .. }))
            .map(|(_, t)| t.answered.duration_since(killed))
            .min()
    };
    let (victim_ack, other_ack) = (first_ack(true), first_ack(false));
    let until = killed + victim_ack.unwrap_or(Duration::from_secs(60));
    let meanwhile = tally(
        tries
            .iter()
            .filter(|(v, t)| *v && t.answered > killed && t.answered <= until)
            .map(|(_, t)| *t),
    );
    eprintln!(
        "data master {victim} killed 1.2 s ahead of its replica {promoted}: failed over after \
         {failed_over:?}, restarted as a replica after {restarted:?}; first 200/201 again on its \
         keys after {victim_ack:?}, on the other masters' keys after {other_ack:?}; answers on its \
         keys meanwhile: {meanwhile:?}; {checked} writes checked"
    );
    let victim_ack = victim_ack.expect("no write to the killed master's keys was acknowledged");
    assert!(
        victim_ack < Duration::from_secs(15),
        "writes acknowledged again {victim_ack:?} after the kill"
    );
}

#[tokio::test]
async fn a_queue_master_killed_mid_stream_with_wait_replicas_loses_no_202_and_applies_none_twice() {
    let mut stack = Stack::builder()
        .queue_cluster()
        .workers(2)
        .env("KVQ_QUEUE_REDIS_WAIT_REPLICAS", "1")
        .start()
        .await;
    // 4 keys in each of the 16 partitions, whose slots the 3 queue masters
    // share; 16 clients of 4 keys each, every write with its own
    // Idempotency-Key, retried until a 202.
    let keys = keys_in_every_bucket("queued", 1);
    let groups: Vec<Vec<String>> = keys.chunks(4).map(<[String]>::to_vec).collect();
    let victim = stack
        .queue
        .cluster()
        .master_of_key(&keys::stream_key("kvq", 0));
    let stop = Arc::new(AtomicBool::new(false));
    let running = clients(&stack, groups, None, true, &stop);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let lagging = Instant::now();
    let cluster = stack.queue.cluster_mut();
    let killed = kill_master_ahead_of_its_replica(cluster, victim, BEHIND).await;
    let promoted = cluster.wait_failover(victim).await;
    let failed_over = killed.elapsed();
    cluster.restart(victim).await;
    let restarted = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let by_key = gather(&stop, running).await;

    // Every write was accepted once (its 202 ends its retries) and applied
    // once, in order.
    let checked = assert_applied_once_in_order(&stack, &by_key).await;

    // Every write sent again, with its Idempotency-Key: the first 202's job
    // again, nothing queued.
    let http = reqwest::Client::new();
    let writes: Vec<&Logical> = by_key.values().flatten().collect();
    futures::stream::iter(&writes)
        .for_each_concurrent(16, |w| {
            let http = &http;
            let base = stack.base();
            async move {
                let again = upsert(http, base, &w.key, w.value, None, w.token.as_deref()).await;
                let Answer::Queued { id, .. } = &w.last().answer else {
                    unreachable!("a client's write ends with a 202");
                };
                assert_eq!(
                    again.answer,
                    Answer::Queued {
                        id: id.clone(),
                        replayed: true
                    },
                    "{} = {} sent again with {:?}",
                    w.key,
                    w.value,
                    w.token
                );
            }
        })
        .await;

    // What writes in flight met: every try answered from when the replica
    // fell behind until the last one that was not a 202.
    let tries: Vec<&Try> = writes.iter().flat_map(|w| &w.tries).collect();
    let troubled_until = tries
        .iter()
        .filter(|t| !matches!(t.answer, Answer::Queued { .. }))
        .map(|t| t.answered)
        .max()
        .unwrap_or(lagging);
    let during = tally(
        tries
            .iter()
            .filter(|t| t.answered >= lagging && t.answered <= troubled_until)
            .copied(),
    );
    let longest = writes
        .iter()
        .map(|w| w.last().answered.duration_since(w.tries[0].sent))
        .max()
        .unwrap_or_default();
    let retried = writes.iter().filter(|w| w.tries.len() > 1).count();
    let accepted_again = tries
        .iter()
        .filter(|t| t.sent > killed && matches!(t.answer, Answer::Queued { .. }))
        .map(|t| t.answered.duration_since(killed))
        .min();
    eprintln!(
        "queue master {victim} killed 1.2 s ahead of its replica {promoted}: failed over after \
         {failed_over:?}, restarted as a replica after {restarted:?}; first 202 to a write sent \
         after the kill {accepted_again:?} after it; answers from the replica falling behind \
         until the last non-202 ({:?} later): {during:?}; {retried} writes needed more than one \
         request, the longest took {longest:?}; {checked} writes checked, each sent again",
        troubled_until.duration_since(lagging)
    );
    let accepted_again = accepted_again.expect("no write was accepted after the kill");
    assert!(
        accepted_again < Duration::from_secs(15),
        "writes accepted again {accepted_again:?} after the kill"
    );
}

#[tokio::test]
async fn a_sentinel_queue_master_killed_mid_stream_is_followed_and_every_later_202_applies_once() {
    let mut stack = Stack::builder().queue_sentinel().workers(2).start().await;
    let keys = keys_in_every_bucket("sentinel", 1);
    let groups: Vec<Vec<String>> = keys.chunks(4).map(<[String]>::to_vec).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let running = clients(&stack, groups, None, true, &stop);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = stack.queue.sentinel_mut().kill_master();
    let killed = Instant::now();
    let new = stack.queue.sentinel().wait_failover(old).await;
    let failed_over = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let by_key = gather(&stop, running).await;

    // Nobody restarted them: the same API and workers carried on.
    assert!(stack.api().is_running());
    for worker in &mut stack.workers {
        assert!(worker.is_running());
    }

    // Per key, in the order sent: a 202 to a request sent after the kill
    // was given by the new master, and its job must succeed; one before it
    // may have been lost with the old master (replication is asynchronous,
    // `KVQ_QUEUE_REDIS_WAIT_REPLICAS` is 0), its record then unknown. None
    // applies twice: the n-th write of a key makes at most version n, and
    // versions only grow.
    // A job accepted before the kill and not lost reaches a final record
    // too, even one whose end the old master alone recorded (see
    // `a_job_that_ended_on_a_queue_master_just_before_it_died_…`).
    let (mut after, mut lost): (usize, usize) = (0, 0);
    for (key, writes) in &by_key {
        let mut version = 0;
        for (position, write) in writes.iter().enumerate() {
            let last = write.last();
            let id = last.answer.job_id().unwrap();
            let before = last.sent < killed;
            let job = match record_of(&stack, id, Duration::from_secs(30)).await {
                Record::Final(job) => job,
                Record::Lost if before => {
                    lost += 1;
                    continue;
                }
                Record::Lost => panic!(
                    "{key} = {}: job {id}, accepted by the new master, was lost",
                    write.value
                ),
                Record::Stuck(job) => panic!(
                    "{key} = {}: job {id} (accepted {} the kill) not final after 30 s: {job}",
                    write.value,
                    if before { "before" } else { "after" }
                ),
            };
            assert_eq!(job["status"], "succeeded", "{key} = {}: {job}", write.value);
            let applied = job["result"]["version"].as_u64().unwrap();
            assert!(
                applied > version && applied <= position as u64 + 1,
                "{key} = {}: write number {} applied as version {applied} after version {version}",
                write.value,
                position + 1
            );
            version = applied;
            after += usize::from(last.sent > killed);
        }
        let last = writes.last().unwrap();
        assert!(
            last.tries[0].sent > killed,
            "{key}: no write after the kill"
        );
        let read: Value = stack.get(key).await.json().await.unwrap();
        assert_eq!(
            (read["value"].as_i64(), read["version"].as_u64()),
            (Some(last.value), Some(version)),
            "{key}: {read}"
        );
    }
    let tries: Vec<&Try> = by_key.values().flatten().flat_map(|w| &w.tries).collect();
    let troubled: Vec<&Try> = tries
        .iter()
        .filter(|t| !matches!(t.answer, Answer::Queued { .. }))
        .copied()
        .collect();
    eprintln!(
        "sentinel queue master {old} killed, {new} named after {failed_over:?}; answers that \
         were not 202: {:?}; {after} writes accepted after the kill applied, {lost} accepted \
         before it were lost",
        tally(troubled.iter().copied())
    );
}

/// The record a worker writes at a job's end, and its commit, can reach the
/// old master only: the job's entry and `queued` record were replicated,
/// then the replica stopped hearing, the job ran and was committed, and the
/// master died. The new master holds the worker's lease (it was renewed
/// before), so the worker carries on there; its reader's failure makes the
/// partition start again from the new master's last commit, which is
/// before the job: the job runs again, is recognised as applied, and its
/// end is recorded again. Before that, its record read `queued` for good.
#[tokio::test]
async fn a_job_that_ended_on_a_queue_master_just_before_it_died_reads_final_on_the_new_one() {
    let mut stack = Stack::builder().queue_sentinel().start().await;
    // The worker owns the partitions, and the replica has its leases.
    let warm = stack
        .finished(stack.create("warm-up", json!(0)).await)
        .await;
    assert_eq!(warm["status"], "succeeded", "{warm}");
    let kv_pid = stack.kv.pid().expect("the data Redis runs");

    // The job's apply waits on the paused data Redis while its entry and
    // record reach the replica.
    kvq_testkit::signal(kv_pid, "STOP");
    let id = Stack::job_id(stack.create("just-before", json!(1)).await).await;
    let record = keys::job_key("kvq", &id).expect("a job id of kvq's");
    let (master, replica_port, replica_pid) = {
        let sentinel = stack.queue.sentinel();
        let master = sentinel.master();
        let replica = sentinel
            .nodes()
            .iter()
            .find(|n| n.port() != master)
            .expect("a replica");
        (
            master,
            replica.port(),
            replica.pid().expect("the replica runs"),
        )
    };
    eventually(
        Duration::from_secs(10),
        "the replica to have the job's record",
        || async {
            let status: Option<String> = stack
                .queue
                .sentinel()
                .node(replica_port)
                .try_cmd(&["HGET", &record, "status"])
                .ok()?;
            status.is_some().then_some(())
        },
    )
    .await;

    // The replica stops hearing; the job ends and is committed on the
    // master alone; the master dies and the replica, woken, takes over.
    kvq_testkit::signal(replica_pid, "STOP");
    let _: i64 = stack
        .queue
        .sentinel()
        .node(master)
        .cmd(&["CLIENT", "KILL", "TYPE", "replica"]);
    kvq_testkit::signal(kv_pid, "CONT");
    eventually(
        Duration::from_secs(10),
        "the job to end and be committed on the master",
        || async {
            let node = stack.queue.sentinel().node(master);
            let status: Option<String> = node.try_cmd(&["HGET", &record, "status"]).ok()?;
            (status.as_deref() == Some("succeeded") && node.try_pending_jobs() == Some(0))
                .then_some(())
        },
    )
    .await;
    let old = stack.queue.sentinel_mut().kill_master();
    kvq_testkit::signal(replica_pid, "CONT");
    let new = stack.queue.sentinel().wait_failover(old).await;
    assert_eq!(new, replica_port);

    let job = stack.wait_job_within(&id, Duration::from_secs(20)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        stack.version_of("just-before").await,
        Some(1),
        "applied once"
    );
}

// ---------------------------------------------------------------------------
// Listing across the masters.

#[tokio::test]
async fn listing_by_prefix_returns_every_key_of_the_cluster_once_even_across_a_failover() {
    let mut stack = Stack::builder()
        .kv_cluster()
        .workers(2)
        .env("KVQ_KV_REDIS_WAIT_REPLICAS", "1")
        .start()
        .await;
    // 2,000 keys under prefixes that share their beginnings.
    let mut created: Vec<String> = Vec::new();
    for (prefix, count) in [
        ("users/", 800),
        ("users-old/", 300),
        ("orders/", 600),
        ("u/", 300),
    ] {
        created.extend((0..count).map(|i| format!("{prefix}{i:04}")));
    }
    let http = reqwest::Client::new();
    let ids: Vec<String> = futures::stream::iter(&created)
        .map(|key| {
            let request = http
                .post(format!("{}/v1/kv", stack.base()))
                .json(&json!({"key": key, "value": 1}));
            async move { Stack::job_id(request.send().await.unwrap()).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for id in &ids {
        assert_eq!(stack.wait_job(id).await["status"], "succeeded");
    }
    created.sort();
    let expected = |prefix: &str| -> Vec<String> {
        created
            .iter()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    };
    let cluster = stack.kv.cluster();
    let values = cluster.keys_per_master("kvq:v:*");
    assert!(values.iter().all(|&(_, n)| n > 0), "{values:?}");

    // Every key of the prefix once, sorted, none of another; 7 at a time.
    for prefix in ["users/", "users", "u", "u/", "orders/", "users-old/", "x"] {
        assert_eq!(
            list_all(&stack, prefix, 7).await,
            expected(prefix),
            "prefix {prefix:?}"
        );
    }
    assert_eq!(list_all(&stack, "", 100).await, created);

    // Again, 10 at a time, with a data master killed a quarter of the way:
    // the pages after it may get 503 until its replica took over, and are
    // asked again with the same cursor. No key was written meanwhile, and
    // each was confirmed by a replica (WAIT 1): every one is present
    // throughout, so the listing must hold every key once, in order.
    let victim = cluster.masters()[1];
    let (mut listed, mut cursor, mut pages) = (Vec::new(), String::new(), 0);
    let refused = std::cell::Cell::new(0);
    let mut killed = None;
    loop {
        if pages == 50 && killed.is_none() {
            stack.kv.cluster_mut().kill(victim);
            killed = Some(Instant::now());
        }
        let (keys, next) = eventually(
            Duration::from_secs(30),
            "a page after the failover",
            || async {
                match try_page(&stack, "", 10, &cursor).await {
                    Ok(page) => Some(page),
                    Err((503, problem)) if problem["code"] == "backend_unavailable" => {
                        refused.set(refused.get() + 1);
                        None
                    }
                    Err(other) => panic!("a page after {:?}: {other:?}", listed.last()),
                }
            },
        )
        .await;
        pages += 1;
        add_page(&mut listed, keys, next.is_some(), "", 10);
        match next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    let took = killed.map(|k| k.elapsed());
    eprintln!(
        "listed {} keys in {pages} pages across the failover of data master {victim} ({took:?} \
         from the kill to the end); {} page requests answered 503 meanwhile",
        listed.len(),
        refused.get()
    );
    assert_eq!(listed, created);
}
