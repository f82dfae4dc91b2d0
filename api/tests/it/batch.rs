//! `POST /v1/batch`: up to 1,000 writes in one request, each queued as its
//! own job, in its key's order, applied exactly once; one bad write refuses
//! the whole batch and queues nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kvq_testkit::{Stack, eventually, token};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};

/// A batch request of `writes`.
fn batch(stack: &Stack, writes: &[Value]) -> RequestBuilder {
    stack
        .request(Method::POST, "/v1/batch")
        .timeout(Duration::from_secs(60))
        .json(&json!({ "writes": writes }))
}

/// The jobs of a 202 answer, and whether it was marked replayed.
async fn accepted(response: Response) -> (Vec<Value>, bool) {
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    (body["jobs"].as_array().unwrap().clone(), replayed)
}

/// Waits until every job is final; their records, in order.
async fn finished(stack: &Stack, jobs: &[Value]) -> Vec<Value> {
    let mut records = Vec::new();
    for job in jobs {
        let id = job["job_id"].as_str().unwrap();
        records.push(stack.wait_job_within(id, Duration::from_secs(60)).await);
    }
    records
}

/// The job records the queue Redis holds: one per queued write.
fn job_records(stack: &Stack) -> usize {
    stack
        .queue
        .keys()
        .iter()
        .filter(|key| key.contains(":job:"))
        .count()
}

/// A key's value and version, or `None` while it does not exist.
async fn read(stack: &Stack, key: &str) -> Option<(Value, u64)> {
    let response = stack.get(key).await;
    if response.status() == 404 {
        return None;
    }
    let body: Value = response.json().await.unwrap();
    Some((body["value"].clone(), body["version"].as_u64().unwrap()))
}

/// Waits until the queue's streams are empty: every job applied.
async fn drained(stack: &Stack) {
    eventually(Duration::from_secs(30), "the queue to drain", || async {
        (stack.queue.try_pending_jobs() == Some(0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_batch_answers_one_job_per_write_in_order_and_each_key_applies_in_batch_order() {
    let stack = Stack::start().await;
    // 300 writes to one key: more than one accept script takes (128 jobs),
    // so its partition is queued in several chunks, in order.
    let mut writes = vec![json!({"op": "create", "key": "b/counter", "value": 0})];
    writes.extend((1..300).map(|n| json!({"op": "update", "key": "b/counter", "value": n})));
    // 100 keys over every partition, their writes interleaved: create,
    // upsert with a TTL, delete, create again.
    for round in 0..4 {
        for i in 0..100 {
            let key = format!("b/k{i}");
            writes.push(match round {
                0 => json!({"op": "create", "key": key, "value": {"i": i}}),
                1 => json!({"op": "upsert", "key": key, "value": i, "ttl_seconds": 3600}),
                2 => json!({"op": "delete", "key": key}),
                _ => json!({"op": "create", "key": key, "value": "again"}),
            });
        }
    }
    let (jobs, replayed) = accepted(batch(&stack, &writes).send().await.unwrap()).await;
    assert!(!replayed);

    // One job per write, in order, each with its own id.
    assert_eq!(jobs.len(), writes.len());
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut ids = HashSet::new();
    for (write, job) in writes.iter().zip(&jobs) {
        assert_eq!(
            job.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["job_id", "key", "op", "seq", "status"],
            "{job}"
        );
        assert_eq!(job["status"], "queued", "{job}");
        assert_eq!(job["op"], write["op"], "{job}");
        assert_eq!(job["key"], write["key"], "{job}");
        assert!(ids.insert(job["job_id"].as_str().unwrap()), "{job}");
        // A key's writes get increasing seqs in the batch's order.
        let seq = job["seq"].as_u64().unwrap();
        let key = write["key"].as_str().unwrap();
        if let Some(&before) = last_seq.get(key) {
            assert!(seq > before, "{key}: seq {seq} after {before}");
        }
        last_seq.insert(key, seq);
    }
    let metrics = stack.metrics().await;
    for (op, count) in [
        ("create", 201),
        ("update", 299),
        ("upsert", 100),
        ("delete", 100),
    ] {
        let line = format!(r#"kvq_api_writes_accepted_total{{op="{op}"}} {count}"#);
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }

    // Each key's writes applied one by one, in the batch's order.
    let records = finished(&stack, &jobs).await;
    for (job, record) in jobs.iter().zip(&records) {
        assert_eq!(record["status"], "succeeded", "{record}");
        assert_eq!(record["seq"], job["seq"], "{record}");
    }
    let counter_versions: Vec<u64> = records[..300]
        .iter()
        .map(|r| r["result"]["version"].as_u64().unwrap())
        .collect();
    assert_eq!(counter_versions, (1..=300).collect::<Vec<u64>>());
    assert_eq!(read(&stack, "b/counter").await, Some((json!(299), 300)));
    for i in 0..100 {
        let key = format!("b/k{i}");
        assert_eq!(read(&stack, &key).await, Some((json!("again"), 4)), "{key}");
        let body: Value = stack.get(&key).await.json().await.unwrap();
        assert_eq!(
            body["expires_at"],
            Value::Null,
            "{key}: the last create has no TTL"
        );
    }
}

#[tokio::test]
async fn a_bad_write_refuses_the_whole_batch_names_it_and_queues_nothing() {
    let stack = Stack::builder().workers(0).start().await;
    let good: Vec<Value> = (0..20)
        .map(|i| json!({"op": "create", "key": format!("v/{i}"), "value": i}))
        .collect();
    let deep = (0..200).fold(json!(1), |inner, _| json!([inner]));
    let large = "x".repeat(1_048_577);
    let cases = [
        (
            json!({"op": "create", "key": "", "value": 1}),
            400,
            "invalid_key",
            "/key",
        ),
        (
            json!({"op": "upsert", "key": "a\u{1}b", "value": 1}),
            400,
            "invalid_key",
            "/key",
        ),
        (
            json!({"op": "delete", "key": "v/17", "value": 1}),
            422,
            "invalid_body",
            "/value",
        ),
        (
            json!({"op": "create", "key": "v/17"}),
            422,
            "invalid_body",
            "/value",
        ),
        (
            json!({"op": "update", "key": "v/17"}),
            422,
            "invalid_body",
            "/value",
        ),
        (
            json!({"op": "create", "key": "v/17", "value": deep}),
            400,
            "malformed_json",
            "/value",
        ),
        (
            json!({"op": "create", "key": "v/17", "value": large}),
            413,
            "value_too_large",
            "/value",
        ),
        (
            json!({"op": "update", "key": "v/17", "value": 1, "ttl_seconds": 0}),
            422,
            "invalid_body",
            "/ttl_seconds",
        ),
        (
            json!({"op": "upsert", "key": "v/17", "value": 1, "ttl_seconds": 31_536_001}),
            422,
            "invalid_body",
            "/ttl_seconds",
        ),
        (
            json!({"op": "delete", "key": "v/17", "ttl_seconds": 60}),
            422,
            "invalid_body",
            "/ttl_seconds",
        ),
        (
            json!({"op": "create", "key": "v/17", "value": 1, "if_match": 1}),
            422,
            "invalid_body",
            "/if_match",
        ),
        (
            json!({"op": "update", "key": "v/17", "value": 1, "if_match": -1}),
            422,
            "invalid_body",
            "",
        ),
        (
            json!({"op": "create", "key": "v/17", "value": 1, "extra": true}),
            422,
            "invalid_body",
            "",
        ),
        (
            json!({"op": "rename", "key": "v/17", "value": 1}),
            422,
            "invalid_body",
            "",
        ),
        (json!({"key": "v/17", "value": 1}), 422, "invalid_body", ""),
        (json!("create v/17"), 422, "invalid_body", ""),
    ];
    for (bad, status, code, member) in cases {
        let mut writes = good.clone();
        writes[17] = bad.clone();
        let response = batch(&stack, &writes).send().await.unwrap();
        let pointer = format!("/writes/17{member}");
        assert_problem(response, status, code, Some(&pointer), &bad.to_string()).await;
    }

    // The number of writes: 1 to 1,000.
    let many: Vec<Value> = (0..1_001)
        .map(|i| json!({"op": "upsert", "key": format!("m/{i}"), "value": i}))
        .collect();
    let response = batch(&stack, &many).send().await.unwrap();
    let problem = assert_problem(response, 422, "invalid_body", Some("/writes"), "1001").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("1001"),
        "{problem}"
    );
    let response = batch(&stack, &[]).send().await.unwrap();
    assert_problem(response, 422, "invalid_body", Some("/writes"), "no writes").await;
    // The body itself.
    for (body, status, code) in [
        (json!({"writes": good, "atomic": true}), 422, "invalid_body"),
        (json!({"write": good}), 422, "invalid_body"),
        (json!(good), 422, "invalid_body"),
    ] {
        let response = stack
            .request(Method::POST, "/v1/batch")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(response, status, code, None, "a bad body").await;
    }
    let response = stack
        .request(Method::POST, "/v1/batch")
        .header("content-type", "application/json")
        .body(r#"{"writes": [{"op": "create""#)
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "malformed_json", None, "cut-off JSON").await;

    // Nothing was queued: no job record, nothing in the streams.
    assert_eq!(job_records(&stack), 0);
    assert_eq!(stack.queue.pending_jobs(), 0);

    // The same batch made good is queued whole; with no worker running,
    // `Prefer: wait` runs out and answers the plain 202.
    let started = std::time::Instant::now();
    let response = batch(&stack, &good)
        .header("prefer", "wait=1")
        .send()
        .await
        .unwrap();
    assert!(!response.headers().contains_key("preference-applied"));
    let (jobs, _) = accepted(response).await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(jobs.len(), 20);
    assert!(jobs.iter().all(|job| job["status"] == "queued"), "{jobs:?}");
    assert_eq!(job_records(&stack), 20);
    assert_eq!(stack.queue.pending_jobs(), 20);
}

/// Checks a refusal: its status, problem+json, its code, and the JSON
/// Pointer naming the bad part (in `pointer` and in `detail`); answers the
/// problem.
async fn assert_problem(
    response: Response,
    status: u16,
    code: &str,
    pointer: Option<&str>,
    what: &str,
) -> Value {
    let got = response.status().as_u16();
    let content_type = response.headers()["content-type"].clone();
    let problem: Value = response.json().await.unwrap();
    assert_eq!(got, status, "{what}: {problem}");
    assert_eq!(content_type, "application/problem+json", "{what}");
    assert_eq!(problem["code"], code, "{what}: {problem}");
    match pointer {
        Some(pointer) => {
            assert_eq!(problem["pointer"], pointer, "{what}: {problem}");
            let detail = problem["detail"].as_str().unwrap();
            assert!(detail.starts_with(pointer), "{what}: {problem}");
        }
        None => assert!(problem.get("pointer").is_none(), "{what}: {problem}"),
    }
    problem
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_same_jobs_and_applies_nothing_twice() {
    let stack = Stack::start().await;
    let writes = [
        json!({"op": "create", "key": "i/a", "value": 1}),
        json!({"op": "update", "key": "i/a", "value": 2}),
        json!({"op": "create", "key": "i/b", "value": "b"}),
        json!({"op": "delete", "key": "i/b"}),
        json!({"op": "upsert", "key": "i/c", "value": [3]}),
    ];
    let send = |writes: &[Value]| batch(&stack, writes).header("idempotency-key", "batch-1");
    let (first, replayed) = accepted(send(&writes).send().await.unwrap()).await;
    assert!(!replayed);
    let records = finished(&stack, &first).await;
    assert!(
        records.iter().all(|r| r["status"] == "succeeded"),
        "{records:?}"
    );
    let queued = job_records(&stack);

    // The repeat answers the first jobs, ids and seqs, and queues nothing.
    let (again, replayed) = accepted(send(&writes).send().await.unwrap()).await;
    assert!(replayed, "a repeat is marked Idempotent-Replayed");
    assert_eq!(again, first);
    // A different batch under the same key is refused, and queues nothing.
    let mut changed = writes.to_vec();
    changed[1] = json!({"op": "update", "key": "i/a", "value": 3});
    let response = send(&changed).send().await.unwrap();
    assert_problem(
        response,
        422,
        "idempotency_key_reused",
        None,
        "a changed batch",
    )
    .await;
    let response = send(&writes[..4]).send().await.unwrap();
    assert_problem(
        response,
        422,
        "idempotency_key_reused",
        None,
        "a shorter batch",
    )
    .await;

    drained(&stack).await;
    assert_eq!(job_records(&stack), queued, "nothing more was queued");
    assert_eq!(read(&stack, "i/a").await, Some((json!(2), 2)));
    assert_eq!(read(&stack, "i/b").await, None);
    assert_eq!(read(&stack, "i/c").await, Some((json!([3]), 1)));
}

/// Lets the queue Redis' default user (the API's and the workers') reach
/// only the keys matching `patterns`: commands on other keys are refused
/// (`NOPERM`, an error Redis answers: certainly not run).
fn queue_keys_allowed(stack: &Stack, patterns: &[&str]) {
    let mut command = vec!["ACL", "SETUSER", "default", "resetkeys"];
    command.extend(patterns);
    let _: () = stack.queue.cmd(&command);
}

#[tokio::test]
async fn a_batch_queued_in_part_answers_outcome_unknown_and_its_retry_completes_it_once() {
    let mut stack = Stack::builder().workers(0).start().await;
    // 64 keys over all 16 partitions, two writes each.
    let writes: Vec<Value> = (0..2)
        .flat_map(|n| {
            (0..64).map(move |i| json!({"op": "upsert", "key": format!("p/{i}"), "value": n}))
        })
        .collect();
    let in_first_half = writes
        .iter()
        .filter(|w| kvq_shared::keys::partition(w["key"].as_str().unwrap(), 16) < 8)
        .count();
    assert!(0 < in_first_half && in_first_half < writes.len());
    let send = |stack: &Stack, key: &str| batch(stack, &writes).header("idempotency-key", key);

    // No partition takes jobs: certainly nothing was queued.
    queue_keys_allowed(&stack, &["~kvq:idk:*"]);
    let response = send(&stack, "refused").send().await.unwrap();
    assert_problem(response, 503, "backend_unavailable", None, "no partition").await;
    // Partitions 0 to 7 take their jobs, 8 to 15 refuse theirs: part of
    // the batch is queued, and the answer must not say otherwise.
    queue_keys_allowed(&stack, &["~kvq:idk:*", "~kvq:p:{[0-7]}:*"]);
    let response = send(&stack, "partial").send().await.unwrap();
    assert_problem(
        response,
        503,
        "outcome_unknown",
        None,
        "half the partitions",
    )
    .await;
    let _: () = stack.queue.cmd(&["ACL", "SETUSER", "default", "allkeys"]);
    assert_eq!(job_records(&stack), in_first_half);

    // The retry queues the rest, after what was queued, and the jobs
    // queued before keep their place.
    let (jobs, replayed) = accepted(send(&stack, "partial").send().await.unwrap()).await;
    assert!(!replayed, "part of the batch was queued now");
    assert_eq!(job_records(&stack), writes.len());
    stack.start_worker().await;
    let records = finished(&stack, &jobs).await;
    assert!(
        records.iter().all(|r| r["status"] == "succeeded"),
        "{records:?}"
    );
    // Exactly once, in order: every key took its two writes.
    for i in 0..64 {
        let key = format!("p/{i}");
        assert_eq!(read(&stack, &key).await, Some((json!(1), 2)), "{key}");
    }
    let (again, replayed) = accepted(send(&stack, "partial").send().await.unwrap()).await;
    assert!(replayed);
    assert_eq!(again, jobs);
}

#[tokio::test]
async fn prefer_wait_answers_every_jobs_final_outcome() {
    let stack = Stack::start().await;
    let wait = |writes: &[Value]| batch(&stack, writes).header("prefer", "wait=20");
    let response = wait(&[json!({"op": "create", "key": "w/taken", "value": 0})])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let writes = [
        json!({"op": "create", "key": "w/taken", "value": "again"}),
        json!({"op": "create", "key": "w/new", "value": 1}),
        json!({"op": "update", "key": "w/new", "value": 2, "if_match": 1}),
        json!({"op": "update", "key": "w/new", "value": 3, "if_match": 1}),
        json!({"op": "delete", "key": "w/absent"}),
        json!({"op": "upsert", "key": "w/up", "value": 5, "ttl_seconds": 60}),
        json!({"op": "delete", "key": "w/new"}),
    ];
    let response = wait(&writes).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["preference-applied"], "wait=20");
    let body: Value = response.json().await.unwrap();
    let jobs = body["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), writes.len(), "{body}");
    for (write, job) in writes.iter().zip(jobs) {
        assert_eq!(job["op"], write["op"], "{job}");
        assert_eq!(job["key"], write["key"], "{job}");
        assert!(
            job["id"].is_string() && job["finished_at"].is_string(),
            "{job}"
        );
    }
    let outcome = |job: &Value| {
        let status = job["status"].as_str().unwrap().to_owned();
        match status.as_str() {
            "succeeded" => format!(
                "{} {}",
                job["result"]["outcome"].as_str().unwrap(),
                job["result"]["version"]
            ),
            _ => format!("{status} {}", job["error"]["code"].as_str().unwrap()),
        }
    };
    assert_eq!(
        jobs.iter().map(outcome).collect::<Vec<_>>(),
        [
            "failed already_exists",
            "created 1",
            "updated 2",
            "failed version_mismatch",
            "failed not_found",
            "created 1",
            "deleted 3",
        ],
        "{body}"
    );
    assert_eq!(read(&stack, "w/taken").await, Some((json!(0), 1)));
    assert_eq!(read(&stack, "w/new").await, None);
    assert_eq!(read(&stack, "w/up").await, Some((json!(5), 1)));
}

#[tokio::test]
async fn writing_a_batch_needs_the_writer_role() {
    let stack = Stack::builder().secured().workers(0).start().await;
    let writes = [json!({"op": "create", "key": "auth/a", "value": 1})];
    let response = batch(&stack, &writes).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = batch(&stack, &writes)
        .bearer_auth(token(&["reader"]))
        .send()
        .await
        .unwrap();
    assert_problem(response, 403, "forbidden", None, "a reader's batch").await;
    assert_eq!(job_records(&stack), 0);

    let response = batch(&stack, &writes)
        .bearer_auth(token(&["writer"]))
        .send()
        .await
        .unwrap();
    let (jobs, _) = accepted(response).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(job_records(&stack), 1);
}
