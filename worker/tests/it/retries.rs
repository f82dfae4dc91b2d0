//! Infrastructure errors are retried a bounded number of times, then the job
//! is `dead`; business failures are not retried.

use std::time::Duration;

use kvq_testkit::Stack;
use serde_json::json;

#[tokio::test]
async fn a_job_is_dead_after_its_attempts_run_out_on_a_dead_kv_redis() {
    let mut stack = Stack::builder().workers(0).quick_to_give_up().start().await;
    let accepted = stack.create("doomed", json!(1)).await;
    assert_eq!(accepted.status(), 202);
    let id = Stack::job_id(accepted).await;
    stack.kv.stop();
    stack.start_worker().await;
    let job = stack.wait_job(&id).await;
    assert_eq!(job["status"], "dead", "{job}");
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["error"]["code"], "backend_unavailable");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("os error"),
        "Redis error text leaked: {message}"
    );
    assert!(stack.workers[0].is_running());
}

#[tokio::test]
async fn a_job_succeeds_when_the_kv_redis_returns_within_its_attempts() {
    let mut stack = Stack::builder().workers(0).start().await;
    let accepted = stack.create("patient", json!("ok")).await;
    let id = Stack::job_id(accepted).await;
    stack.kv.stop();
    stack.start_worker().await;
    // The first attempt fails on the dead KV Redis ...
    kvq_testkit::eventually(Duration::from_secs(10), "a failed attempt", || async {
        stack.workers[0]
            .logs()
            .iter()
            .any(|l| l.contains("job failed, will retry"))
            .then_some(())
    })
    .await;
    // ... and a later one applies it (the restarted Redis is empty, so
    // the create succeeds with version 1).
    stack.kv.restart();
    let job = stack.wait_job(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["attempts"].as_u64().unwrap() >= 2, "{job}");
}
