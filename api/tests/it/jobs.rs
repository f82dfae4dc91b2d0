//! `/v1/jobs/{id}` and the business failures a job can end in.

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
    assert_eq!(job["seq"], 1);
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
