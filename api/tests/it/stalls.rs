//! A queue Redis that stalls longer than the Redis timeout: a write's answer
//! tells the truth. 202 means applied, 503 `backend_unavailable` means never
//! applied, and where kvq cannot tell it says `outcome_unknown`; a retry with
//! the same `Idempotency-Key` then completes the write exactly once.

use std::time::Duration;

use futures::future::join_all;
use kvq_testkit::{Stack, eventually};
use reqwest::Method;
use serde_json::{Value, json};

/// The Redis timeout of these stacks: 1 s.
const TIMEOUT_MS: &str = "1000";

/// A stack whose API has connected to the queue Redis from every server
/// thread, so that a stall catches commands already sent, as it does in
/// production, not connections still being made.
async fn stack() -> Stack {
    let stack = Stack::builder()
        .env("KVQ_REDIS_TIMEOUT_MS", TIMEOUT_MS)
        .start()
        .await;
    let warm = join_all((0..8).map(|i| {
        let stack = &stack;
        async move { create(stack, &format!("warm/{i}"), None).await }
    }))
    .await;
    assert!(
        warm.iter().all(|a| matches!(a, Answer::Accepted(_))),
        "{warm:?}"
    );
    stack
}

/// What a write was answered: `202`, or the 503's code.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Accepted(String),
    Unavailable,
    Unknown,
}

/// Sends a write, with `idempotency_key` if given, and tells its answer.
async fn answer(mut request: reqwest::RequestBuilder, idempotency_key: Option<&str>) -> Answer {
    if let Some(token) = idempotency_key {
        request = request.header("idempotency-key", token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    match (status, body["code"].as_str()) {
        (202, _) => Answer::Accepted(body["job_id"].as_str().unwrap().to_owned()),
        (503, Some("backend_unavailable")) => Answer::Unavailable,
        (503, Some("outcome_unknown")) => Answer::Unknown,
        other => panic!("unexpected answer {other:?}: {body}"),
    }
}

async fn create(stack: &Stack, key: &str, idempotency_key: Option<&str>) -> Answer {
    let request = stack
        .request(Method::POST, "/v1/kv")
        .timeout(Duration::from_secs(30))
        .json(&json!({"key": key, "value": key}));
    answer(request, idempotency_key).await
}

/// Pauses every command of the queue Redis for `ms`.
fn pause_queue(stack: &Stack, ms: u64) {
    let _: () = stack
        .queue
        .cmd(&["CLIENT", "PAUSE", &ms.to_string(), "ALL"]);
}

/// Waits until the queue Redis answers again and every queued job is
/// applied and gone from the stream.
async fn drained(stack: &Stack) {
    eventually(Duration::from_secs(20), "the queue to drain", || async {
        (stack.queue.try_pending_jobs() == Some(0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stall_longer_than_the_redis_timeout_answers_the_truth() {
    let stack = stack().await;
    // Longer than the 1 s timeout, shorter than the time the API then
    // spends finding out what happened (2 timeouts).
    pause_queue(&stack, 1600);
    let keys: Vec<String> = (0..6).map(|i| format!("stall/{i}")).collect();
    let answers = join_all(keys.iter().map(|key| create(&stack, key, None))).await;
    drained(&stack).await;

    for (key, answer) in keys.iter().zip(&answers) {
        let version = stack.version_of(key).await;
        match answer {
            Answer::Accepted(id) => {
                let job = stack.wait_job(id).await;
                assert_eq!(job["status"], "succeeded", "{key}: {job}");
                assert_eq!(version, Some(1), "{key} was answered 202");
            }
            Answer::Unavailable => assert_eq!(version, None, "{key} was answered 503 but applied"),
            Answer::Unknown => {}
        }
    }
    assert!(
        answers.iter().all(|a| *a != Answer::Unknown),
        "the API had time to find out: {answers:?}"
    );
}

#[tokio::test]
async fn after_any_5xx_the_same_idempotency_key_completes_the_write_exactly_once() {
    let stack = stack().await;
    // Longer than the timeout and the time spent finding out: the API
    // cannot know, and must say so.
    pause_queue(&stack, 4000);
    let (with_key, without_key) = tokio::join!(
        create(&stack, "unknown/with-key", Some("stall-1")),
        create(&stack, "unknown/without-key", None),
    );
    for answer in [&with_key, &without_key] {
        assert!(
            matches!(answer, Answer::Unknown | Answer::Unavailable),
            "{answer:?} although the queue never answered"
        );
    }
    drained(&stack).await;
    // The retry completes the write, whatever became of the first try...
    let retried = create(&stack, "unknown/with-key", Some("stall-1")).await;
    let Answer::Accepted(id) = retried else {
        panic!("the retry got {retried:?}");
    };
    let job = stack.wait_job(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // ... exactly once, and a further repeat changes nothing.
    assert_eq!(
        create(&stack, "unknown/with-key", Some("stall-1")).await,
        Answer::Accepted(id.clone())
    );
    drained(&stack).await;
    assert_eq!(stack.version_of("unknown/with-key").await, Some(1));
    if without_key == Answer::Unavailable {
        assert_eq!(stack.version_of("unknown/without-key").await, None);
    }
}

#[tokio::test]
async fn a_dead_job_retried_during_a_stall_applies_once_or_stays_a_dead_letter() {
    let mut stack = Stack::builder().workers(0).quick_to_give_up().start().await;
    let id = stack.dead_job("lazarus", json!("back")).await;
    // Every server thread has used both Redis servers before the stall.
    eventually(
        Duration::from_secs(10),
        "the API to reach the KV Redis",
        || async {
            let reads = join_all((0..8).map(|_| stack.get("lazarus"))).await;
            reads.iter().all(|r| r.status() == 404).then_some(())
        },
    )
    .await;
    join_all((0..8).map(|_| stack.job(&id))).await;

    // Longer than the 0.5 s Redis timeout and the 1 s spent finding out.
    pause_queue(&stack, 3000);
    let retry = |stack: &Stack| {
        stack
            .request(Method::POST, &format!("/v1/jobs/{id}/retry"))
            .timeout(Duration::from_secs(30))
            .send()
    };
    let first = retry(&stack).await.unwrap();
    let status = first.status().as_u16();
    let body: Value = first.json().await.unwrap();
    assert!(
        status == 202
            || (status == 503
                && ["backend_unavailable", "outcome_unknown"]
                    .contains(&body["code"].as_str().unwrap())),
        "{status} {body}"
    );
    drained(&stack).await;
    // Either it was queued (and applies), or it is a dead letter again,
    // never both: then one more retry applies it.
    let job = eventually(Duration::from_secs(20), "the retry to settle", || async {
        let job = stack.job(&id).await;
        match (job["status"].as_str(), dead_letters(&stack).await) {
            (Some("succeeded"), 0) => Some(job),
            (Some("dead"), 1) => Some(job),
            _ => None,
        }
    })
    .await;
    if status == 202 {
        assert_eq!(job["status"], "succeeded", "answered 202: {job}");
    }
    if body["code"] == "backend_unavailable" {
        assert_eq!(job["status"], "dead", "answered backend_unavailable: {job}");
    }
    if job["status"] == "dead" {
        assert_eq!(retry(&stack).await.unwrap().status(), 202);
        assert_eq!(stack.wait_job(&id).await["status"], "succeeded");
    }
    drained(&stack).await;
    assert_eq!(stack.version_of("lazarus").await, Some(1), "applied once");
}

/// How many dead letters there are.
async fn dead_letters(stack: &Stack) -> usize {
    let page: Value = stack
        .request(Method::GET, "/v1/jobs?status=dead")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["jobs"].as_array().unwrap().len()
}

/// `PUT /v1/kv/{key}?upsert=true` with `value`, and an `Idempotency-Key`
/// when given: what it was answered.
async fn upsert(stack: &Stack, key: &str, value: i64, idempotency_key: Option<&str>) -> Answer {
    let request = stack
        .request(Method::PUT, &format!("/v1/kv/{key}?upsert=true"))
        .timeout(Duration::from_secs(30))
        .json(&json!({ "value": value }));
    answer(request, idempotency_key).await
}

/// Waits for job `id` and returns the version it reports (it must succeed).
async fn applied_version(stack: &Stack, id: &str) -> u64 {
    let job = stack.wait_job(id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job["result"]["version"].as_u64().unwrap()
}

/// Every answer given during a stall of the queue Redis longer than the
/// Redis timeout holds in the final state, for writes with and without an
/// `Idempotency-Key`: a 202 applied exactly once, a `backend_unavailable`
/// never, and whatever the first answer, a retry with the write's
/// `Idempotency-Key` completes it exactly once. The writes are updates
/// (upserts) of keys at version 1, so that a write applied twice shows (as
/// version 3; a create applied twice would look applied once). A marker
/// write to each key after everything settled counts what applied before
/// it. Two stalls: one the API outlasts (it finds out), one it cannot.
#[tokio::test]
async fn after_a_long_queue_stall_every_answer_holds_in_the_final_state() {
    let stack = stack().await;
    let mut answers_seen = Vec::new();
    for pause_ms in [1600, 4000] {
        let plain: Vec<String> = (0..6)
            .map(|i| format!("held/{pause_ms}/plain/{i}"))
            .collect();
        let keyed: Vec<String> = (0..6)
            .map(|i| format!("held/{pause_ms}/keyed/{i}"))
            .collect();
        let all: Vec<&String> = plain.iter().chain(&keyed).collect();
        for key in &all {
            assert!(matches!(
                create(&stack, key, None).await,
                Answer::Accepted(_)
            ));
        }
        // The keys are at version 1 before the stall.
        eventually(Duration::from_secs(15), "the keys to exist", || async {
            for key in &all {
                if stack.version_of(key).await != Some(1) {
                    return None;
                }
            }
            Some(())
        })
        .await;

        pause_queue(&stack, pause_ms);
        let token = |key: &str| format!("stall-{key}");
        let (plain_answers, keyed_answers) = tokio::join!(
            join_all(plain.iter().map(|key| upsert(&stack, key, 2, None))),
            join_all(
                keyed
                    .iter()
                    .map(|key| async { upsert(&stack, key, 2, Some(&token(key))).await })
            ),
        );
        // The stall is over once the queue Redis answers the test.
        let _: String = stack.queue.cmd(&["PING"]);

        // Each keyed write, whatever its first answer, is completed by a
        // retry with its Idempotency-Key, which gets the first job if there
        // was one; a further repeat changes nothing.
        let mut keyed_jobs = Vec::new();
        for (key, first) in keyed.iter().zip(&keyed_answers) {
            let retried = upsert(&stack, key, 2, Some(&token(key))).await;
            let Answer::Accepted(id) = retried else {
                panic!("{key}: the retry after {first:?} got {retried:?}");
            };
            if let Answer::Accepted(first_id) = first {
                assert_eq!(&id, first_id, "{key}: the retry got another job");
            }
            assert_eq!(applied_version(&stack, &id).await, 2, "{key}");
            assert_eq!(
                upsert(&stack, key, 2, Some(&token(key))).await,
                Answer::Accepted(id.clone()),
                "{key}"
            );
            keyed_jobs.push(id);
        }
        for (key, answer) in plain.iter().zip(&plain_answers) {
            if let Answer::Accepted(id) = answer {
                assert_eq!(applied_version(&stack, id).await, 2, "{key}");
            }
        }

        // A marker write to each key applies after everything accepted
        // before it: its version counts what applied.
        let firsts = plain
            .iter()
            .zip(&plain_answers)
            .map(|(key, answer)| (key, answer, false))
            .chain(keyed.iter().zip(&keyed_answers).map(|(k, a)| (k, a, true)));
        for (key, answer, keyed) in firsts {
            let Answer::Accepted(id) = upsert(&stack, key, 3, None).await else {
                panic!("{key}: the marker write was not accepted");
            };
            let version = applied_version(&stack, &id).await;
            let allowed: &[u64] = match (keyed, answer) {
                // Keyed: applied exactly once (by the first try or the retry).
                (true, _) | (false, Answer::Accepted(_)) => &[3],
                (false, Answer::Unavailable) => &[2],
                (false, Answer::Unknown) => &[2, 3],
            };
            assert!(
                allowed.contains(&version),
                "{key} (Idempotency-Key: {keyed}), answered {answer:?}: the marker applied at version {version}, not {allowed:?}"
            );
            assert_eq!(stack.version_of(key).await, Some(version), "{key}");
        }
        answers_seen.push((pause_ms, plain_answers, keyed_answers));
    }
    eprintln!("answers during the stalls: {answers_seen:?}");
}
