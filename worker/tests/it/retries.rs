//! Errors a Redis server answers are retried a bounded number of times,
//! then the job is `dead`; a Redis server that cannot be reached is waited
//! for, however long; business failures are not retried.

use std::time::Duration;

use kvq_testkit::Stack;
use serde_json::json;

#[tokio::test]
async fn a_job_is_dead_after_its_attempts_run_out_on_a_kv_redis_refusing_writes() {
    let mut stack = Stack::builder().workers(0).quick_to_give_up().start().await;
    let accepted = stack.create("doomed", json!(1)).await;
    assert_eq!(accepted.status(), 202);
    let id = Stack::job_id(accepted).await;
    stack.refuse_kv_writes(true);
    stack.start_worker().await;
    let job = stack.wait_job(&id).await;
    assert_eq!(job["status"], "dead", "{job}");
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["error"]["code"], "backend_unavailable");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("OOM") && !message.contains("maxmemory"),
        "Redis error text leaked: {message}"
    );
    assert!(stack.workers[0].is_running());
}

#[tokio::test]
async fn a_job_succeeds_when_the_kv_redis_takes_writes_again_within_its_attempts() {
    let mut stack = Stack::builder().workers(0).start().await;
    let accepted = stack.create("patient", json!("ok")).await;
    let id = Stack::job_id(accepted).await;
    stack.refuse_kv_writes(true);
    stack.start_worker().await;
    // The first attempt fails on the refusing KV Redis ...
    kvq_testkit::eventually(Duration::from_secs(10), "a failed attempt", || async {
        stack.workers[0]
            .logs()
            .iter()
            .any(|l| l.contains("job failed, will retry"))
            .then_some(())
    })
    .await;
    // ... and a later one applies it.
    stack.refuse_kv_writes(false);
    let job = stack.wait_job(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["attempts"].as_u64().unwrap() >= 2, "{job}");
}

#[tokio::test]
async fn a_kv_redis_outage_longer_than_every_retry_loses_no_write_and_kills_no_job() {
    // Two attempts with 0.5 s timeouts would end the job in about a second
    // if an unreachable Redis counted.
    let mut stack = Stack::builder().workers(0).quick_to_give_up().start().await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        let accepted = stack
            .put("outlasted?upsert=true", json!({"value": i}))
            .await;
        ids.push(Stack::job_id(accepted).await);
    }
    stack.kv.stop();
    stack.start_worker().await;
    kvq_testkit::eventually(Duration::from_secs(10), "a few deferrals", || async {
        let waits = stack.workers[0]
            .logs()
            .iter()
            .filter(|l| l.contains("the job waits for it"))
            .count();
        (waits >= 5).then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(stack.job(id).await["status"], "queued", "{id}");
    }
    stack.kv.restart();
    for id in &ids {
        assert_eq!(stack.wait_job(id).await["status"], "succeeded", "{id}");
    }
    let read: serde_json::Value = stack.get("outlasted").await.json().await.unwrap();
    assert_eq!(read["value"], 5);
    assert_eq!(read["version"], 5);
}
