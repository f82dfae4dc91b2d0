//! `/v1/jobs/{id}` and the business failures a job can end in.

use std::time::Duration;

use kvq_testkit::Stack;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn a_job_record_shows_its_whole_life() {
    let stack = Stack::start().await;
    let accepted = stack
        .request(Method::POST, "/v1/kv")
        .header("x-request-id", "req-life-1")
        .json(&json!({"key": "life", "value": true}))
        .send()
        .await
        .unwrap();
    let job = stack.finished(accepted).await;
    assert_eq!(job["op"], "create");
    assert_eq!(job["key"], "life");
    assert!(job["seq"].as_u64().is_some_and(|seq| seq > 0), "{job}");
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["request_id"], "req-life-1");
    assert!(job.get("error").is_none(), "{job}");
    let enqueued = job["enqueued_at"].as_str().unwrap();
    let started = job["started_at"].as_str().unwrap();
    let finished = job["finished_at"].as_str().unwrap();
    // RFC 3339 UTC with ms: lexical order is time order.
    assert!(enqueued <= started && started <= finished, "{job}");
}

#[tokio::test]
async fn business_failures_end_failed_with_a_code_and_change_nothing() {
    let stack = Stack::start().await;
    stack
        .finished(stack.create("taken", json!("first")).await)
        .await;

    let dup = stack
        .finished(stack.create("taken", json!("second")).await)
        .await;
    assert_eq!(dup["status"], "failed");
    assert_eq!(dup["error"]["code"], "already_exists");
    assert!(dup["error"]["message"].as_str().unwrap().len() > 5);

    let update = stack
        .finished(stack.put("absent", json!({"value": 1})).await)
        .await;
    assert_eq!(update["error"]["code"], "not_found");
    let delete = stack.finished(stack.delete("absent").await).await;
    assert_eq!(delete["error"]["code"], "not_found");

    let read: Value = stack.get("taken").await.json().await.unwrap();
    assert_eq!(read["value"], "first");
    assert_eq!(read["version"], 1);
    assert_eq!(stack.get("absent").await.status(), 404);
}

#[tokio::test]
async fn unknown_jobs_are_404_problems() {
    let stack = Stack::start().await;
    for id in ["0198c3d2-0000-7000-8000-000000000000", "not-a-uuid"] {
        let response = stack
            .request(Method::GET, &format!("/v1/jobs/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "not_found");
    }
}

#[tokio::test]
async fn finished_job_records_expire_after_the_retention_period() {
    let stack = Stack::builder()
        .env("KVQ_JOB_RETENTION_SECONDS", "2")
        .start()
        .await;
    let accepted = stack.create("short", json!(1)).await;
    let body: Value = accepted.json().await.unwrap();
    let id = body["job_id"].as_str().unwrap().to_owned();
    stack.wait_job(&id).await;
    kvq_testkit::eventually(
        std::time::Duration::from_secs(8),
        "the record to expire",
        || async {
            let status = stack
                .request(Method::GET, &format!("/v1/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .status();
            (status == 404).then_some(())
        },
    )
    .await;
    // The write itself stays.
    assert_eq!(stack.get("short").await.status(), 200);
}

#[tokio::test]
async fn dead_jobs_are_listed_and_retried_under_their_own_ids() {
    let mut stack = Stack::builder().workers(0).quick_to_give_up().start().await;
    let mut ids = Vec::new();
    for key in ["phoenix/1", "phoenix/2", "phoenix/3"] {
        ids.push(Stack::job_id(stack.create(key, json!({"from": key})).await).await);
    }
    // Redis answers each attempt with an error (out of memory): attempts
    // count, and run out.
    stack.refuse_kv_writes(true);
    stack.start_worker().await;
    for id in &ids {
        assert_eq!(stack.wait_job(id).await["status"], "dead");
    }
    stack.refuse_kv_writes(false);

    // Two pages, oldest first.
    let first = dead_letters(&stack, "limit=2").await;
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let second = dead_letters(&stack, &format!("limit=2&cursor={cursor}")).await;
    assert_eq!(second["next_cursor"], Value::Null, "{second}");
    let listed: Vec<&Value> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["jobs"].as_array().unwrap())
        .collect();
    let mut listed_ids: Vec<&str> = listed.iter().map(|j| j["id"].as_str().unwrap()).collect();
    listed_ids.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(listed_ids, expected);
    for job in &listed {
        assert_eq!(job["status"], "dead", "{job}");
        assert_eq!(job["error"]["code"], "backend_unavailable", "{job}");
    }
    let died: Vec<&str> = listed
        .iter()
        .map(|j| j["finished_at"].as_str().unwrap())
        .collect();
    assert!(died.is_sorted(), "not oldest first: {died:?}");

    // A retry queues the same job again, and it applies (a 503 is retried,
    // as Retry-After says).
    let retried = kvq_testkit::eventually(Duration::from_secs(10), "a 202", || async {
        let response = stack
            .request(Method::POST, &format!("/v1/jobs/{}/retry", ids[0]))
            .send()
            .await
            .unwrap();
        (response.status() != 503).then_some(response)
    })
    .await;
    assert_eq!(retried.status(), 202);
    assert_eq!(
        retried.headers()["location"],
        format!("/v1/jobs/{}", ids[0]).as_str()
    );
    let body: Value = retried.json().await.unwrap();
    assert_eq!(body["job_id"], ids[0].as_str());
    assert_eq!(body["status"], "queued");
    let job = stack.wait_job(&ids[0]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(job.get("error").is_none(), "{job}");
    let read: Value = stack.get("phoenix/1").await.json().await.unwrap();
    assert_eq!(read["value"], json!({"from": "phoenix/1"}));

    // It is no longer a dead letter, and cannot be retried twice.
    let rest = dead_letters(&stack, "").await;
    assert_eq!(rest["jobs"].as_array().unwrap().len(), 2, "{rest}");
    let again = stack
        .request(Method::POST, &format!("/v1/jobs/{}/retry", ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let problem: Value = again.json().await.unwrap();
    assert_eq!(problem["code"], "job_not_dead");
    let unknown = stack
        .request(
            Method::POST,
            "/v1/jobs/0190a5f0-0000-7000-8000-000000000000/retry",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // A dead job whose write had landed (its answer lost) is not applied
    // again: the retry finds its outcome and corrects the record.
    let _: () = stack.kv.cmd(&[
        "HSET",
        &kvq_shared::keys::meta_key("kvq", "phoenix/2"),
        &format!("r:{}", ids[1]),
        "created:1",
    ]);
    let landed = retry(&stack, &ids[1]).await;
    assert_eq!(landed.status(), 409);
    let job = stack.job(&ids[1]).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({"outcome": "created", "version": 1}));

    // Of two retries at once, one queues the job and the other is refused.
    let (first, second) = tokio::join!(retry(&stack, &ids[2]), retry(&stack, &ids[2]));
    let mut statuses = [first.status().as_u16(), second.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409]);
    assert_eq!(stack.wait_job(&ids[2]).await["status"], "succeeded");
    assert_eq!(dead_letters(&stack, "").await["jobs"], json!([]));
}

async fn retry(stack: &Stack, id: &str) -> reqwest::Response {
    stack
        .request(Method::POST, &format!("/v1/jobs/{id}/retry"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn only_dead_jobs_are_listed() {
    let stack = Stack::start().await;
    for path in [
        "/v1/jobs",
        "/v1/jobs?status=queued",
        "/v1/jobs?status=dead&limit=0",
    ] {
        let response = stack.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_request", "{path}");
    }
    let empty = dead_letters(&stack, "").await;
    assert_eq!(empty, json!({"jobs": [], "next_cursor": null}));
}

/// `GET /v1/jobs?status=dead&{query}`'s body.
async fn dead_letters(stack: &Stack, query: &str) -> Value {
    let response = stack
        .request(Method::GET, &format!("/v1/jobs?status=dead&{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "dead letters {query}");
    response.json().await.unwrap()
}
