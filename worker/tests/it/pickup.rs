//! An idle worker applies a new job within a second, and logs the request
//! id of the write it applies.

use std::time::Duration;

use kvq_testkit::Stack;
use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn at(job: &Value, field: &str) -> OffsetDateTime {
    OffsetDateTime::parse(job[field].as_str().unwrap(), &Rfc3339).unwrap()
}

#[tokio::test]
async fn an_idle_worker_applies_a_new_job_within_a_second() {
    let stack = Stack::start().await;
    stack
        .finished(stack.create("warm-up", json!(0)).await)
        .await;
    for i in 0..3 {
        // Let the worker go idle: it has found the queue empty and parked.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let job = stack
            .finished(stack.create(&format!("idle-{i}"), json!(i)).await)
            .await;
        assert_eq!(job["status"], "succeeded");
        let pickup = at(&job, "started_at") - at(&job, "enqueued_at");
        let applied = at(&job, "finished_at") - at(&job, "enqueued_at");
        assert!(
            pickup < time::Duration::seconds(1),
            "picked up after {pickup}"
        );
        assert!(
            applied < time::Duration::seconds(1),
            "applied after {applied}"
        );
    }
}

#[tokio::test]
async fn the_worker_logs_the_request_id_of_each_job() {
    let stack = Stack::start().await;
    let accepted = stack
        .request(Method::POST, "/v1/kv")
        .header("x-request-id", "trace-7f3a")
        .json(&json!({"key": "traced", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.headers()["x-request-id"], "trace-7f3a");
    let job = stack.finished(accepted).await;
    let line = stack.workers[0]
        .wait_for_log("job finished", Duration::from_secs(5))
        .await;
    assert_eq!(line["span"]["request_id"], "trace-7f3a", "{line}");
    assert_eq!(line["span"]["job_id"], job["id"], "{line}");
}
