//! A stack on Redis Cluster or Sentinel, as `StackBuilder` starts it: the
//! API and a worker get the topology's `KVQ_*_REDIS_*` settings and carry a
//! write from the queue to the data. The failover and storm tests of
//! issue 12 build on these stacks.

use std::time::Duration;

use kvq_shared::keys;
use kvq_testkit::{Stack, eventually};
use serde_json::json;

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
