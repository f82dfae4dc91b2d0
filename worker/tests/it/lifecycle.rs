//! Stopping, restarting and reconnecting workers.

use std::time::Duration;

use kvq_testkit::{Stack, eventually};
use serde_json::{Value, json};

#[tokio::test]
async fn sigterm_lets_the_in_flight_job_finish_then_exits_0() {
    let mut stack = Stack::builder().workers(0).start().await;
    let accepted = stack.create("in-flight", json!("kept")).await;
    assert_eq!(accepted.status(), 202);
    let id = Stack::job_id(accepted).await;
    // Hold the KV Redis' writes for 3 s: the job's apply blocks in flight.
    let _: () = stack.kv.cmd(&["CLIENT", "PAUSE", "3000", "WRITE"]);
    stack.start_worker().await;
    stack.wait_pending(1).await;

    let worker = &mut stack.workers[0];
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "exit status");
    assert!(
        worker
            .logs()
            .iter()
            .any(|l| l.contains("in-flight jobs finished")),
        "the worker did not report draining"
    );
    // No other worker exists: this one applied the job before exiting.
    let job = stack.job(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let read: Value = stack.get("in-flight").await.json().await.unwrap();
    assert_eq!(read["value"], "kept");
    assert_eq!(stack.queue.pending_jobs(), 0, "the job was acknowledged");
}

#[tokio::test]
async fn jobs_queued_while_no_worker_runs_are_applied_by_the_next_one() {
    let mut stack = Stack::builder().workers(0).start().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let accepted = stack
            .put(&format!("later-{i}?upsert=true"), json!({"value": i}))
            .await;
        assert_eq!(accepted.status(), 202);
        ids.push(Stack::job_id(accepted).await);
    }
    assert_eq!(stack.job(&ids[0]).await["status"], "queued");
    stack.start_worker().await;
    for id in &ids {
        assert_eq!(stack.wait_job(id).await["status"], "succeeded");
    }
}

#[tokio::test]
async fn a_worker_survives_a_queue_redis_restart() {
    let mut stack = Stack::start().await;
    let first = stack.finished(stack.create("before", json!(1)).await).await;
    assert_eq!(first["status"], "succeeded");

    stack.queue.stop();
    // Long enough for the worker to notice (its fetch fails at once).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        stack.workers[0].is_running(),
        "the worker exited with the queue Redis down"
    );
    stack.queue.restart();

    // A fresh write is applied by the same worker process.
    let job = eventually(
        Duration::from_secs(15),
        "a write to be accepted",
        || async {
            let response = stack.create("after", json!(2)).await;
            (response.status() == 202).then_some(response)
        },
    )
    .await;
    let job = stack.finished(job).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(stack.workers[0].is_running());
    assert_eq!(stack.workers.len(), 1);
}
