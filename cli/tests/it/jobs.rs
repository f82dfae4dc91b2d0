//! `dead` and `retry`: the dead letters, listed and queued again.

use kvq_testkit::Stack;
use serde_json::{Value, json};

use crate::kvq;

#[tokio::test]
async fn dead_lists_a_dead_job_and_retry_applies_it() {
    let mut stack = Stack::builder().workers(0).quick_to_give_up().start().await;
    let id = stack.dead_job("lazarus", json!("back")).await;

    let dead = kvq(&stack, &["dead"]).await;
    dead.ok();
    let fields: Vec<&str> = dead.stdout.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 5, "{dead:?}");
    assert_eq!(
        (fields[0], fields[1], fields[2], fields[4]),
        (id.as_str(), "create", "backend_unavailable", "lazarus"),
        "{dead:?}"
    );
    let as_json = kvq(&stack, &["dead", "--json"]).await;
    as_json.ok();
    let record: Value = serde_json::from_str(as_json.stdout.trim()).unwrap();
    assert_eq!(record["id"], id.as_str());
    assert_eq!(record["status"], "dead");

    // `wait` on a dead job exits 3 and says how to retry it.
    let wait = kvq(&stack, &["wait", &id]).await;
    assert_eq!(wait.code, 3, "{wait:?}");
    assert!(wait.stderr.contains(&format!("kvq retry {id}")), "{wait:?}");

    let retry = kvq(&stack, &["retry", &id, "--wait"]).await;
    retry.ok();
    assert_eq!(retry.stdout, "created lazarus, version 1\n");
    assert_eq!(kvq(&stack, &["get", "lazarus"]).await.stdout, "\"back\"\n");
    let none = kvq(&stack, &["dead"]).await;
    none.ok();
    assert_eq!(none.stdout, "");

    // A job that is not dead: 409 job_not_dead, exit 1.
    let again = kvq(&stack, &["retry", &id]).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("(job_not_dead)"), "{again:?}");
    let unknown = kvq(&stack, &["retry", "0199c1d2-0000-7000-8000-000000000000"]).await;
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("(not_found)"), "{unknown:?}");
}
