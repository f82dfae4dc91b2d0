//! `put`, `get`, `list` and `delete`, as a user runs them.

use kvq_testkit::Stack;
use serde_json::Value;

use crate::{kvq, kvq_with, seed};

#[tokio::test]
async fn put_get_and_delete_a_key() {
    let stack = Stack::start().await;

    let put = kvq(
        &stack,
        &["put", "users/42/name", r#"{"first": "Ada"}"#, "--wait"],
    )
    .await;
    put.ok();
    assert_eq!(put.stdout, "created users/42/name, version 1\n");

    let get = kvq(&stack, &["get", "users/42/name"]).await;
    get.ok();
    assert_eq!(get.stdout, "{\"first\":\"Ada\"}\n");

    let entry = kvq(&stack, &["get", "users/42/name", "--json"]).await;
    entry.ok();
    let entry: Value = serde_json::from_str(&entry.stdout).unwrap();
    assert_eq!(entry["key"], "users/42/name");
    assert_eq!(entry["value"]["first"], "Ada");
    assert_eq!(entry["version"], 1);
    assert_eq!(entry["expires_at"], Value::Null);

    let update = kvq(&stack, &["put", "users/42/name", "\"Ada L.\"", "--wait=10"]).await;
    update.ok();
    assert_eq!(update.stdout, "updated users/42/name, version 2\n");
    assert_eq!(
        kvq(&stack, &["get", "users/42/name"]).await.stdout,
        "\"Ada L.\"\n"
    );
    assert_eq!(
        kvq(&stack, &["get", "users/42/name", "--raw"]).await.stdout,
        "Ada L.\n"
    );

    let delete = kvq(&stack, &["delete", "users/42/name", "--wait"]).await;
    delete.ok();
    assert_eq!(delete.stdout, "deleted users/42/name, version 3\n");

    let gone = kvq(&stack, &["get", "users/42/name"]).await;
    assert_eq!(gone.code, 1, "{gone:?}");
    assert_eq!(gone.stdout, "");
    assert!(gone.stderr.contains("(not_found)"), "{gone:?}");

    // Deleting what is not there: the waited answer is 404.
    let again = kvq(&stack, &["delete", "users/42/name", "--wait"]).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("(not_found)"), "{again:?}");
}

#[tokio::test]
async fn a_write_without_wait_prints_its_job_which_wait_follows() {
    let stack = Stack::start().await;

    let put = kvq(&stack, &["put", "greeting", "hello", "--string"]).await;
    put.ok();
    let id = put.stdout.trim();
    assert_eq!(put.lines().len(), 1, "{put:?}");

    let wait = kvq(&stack, &["wait", id]).await;
    wait.ok();
    assert_eq!(wait.stdout, "created greeting, version 1\n");
    assert_eq!(
        kvq(&stack, &["get", "greeting"]).await.stdout,
        "\"hello\"\n"
    );

    let job = kvq(&stack, &["job", id, "--json"]).await;
    job.ok();
    let job: Value = serde_json::from_str(&job.stdout).unwrap();
    assert_eq!(job["id"], id);
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["result"]["version"], 1);

    let shown = kvq(&stack, &["job", id]).await;
    shown.ok();
    assert!(shown.stdout.contains("status    succeeded\n"), "{shown:?}");
    assert!(shown.stdout.contains("key       greeting\n"), "{shown:?}");

    // The value from stdin, with a TTL.
    let piped = kvq_with(
        &[("KVQ_URL", stack.base())],
        &["put", "doc", "-", "--ttl", "1h", "--wait"],
        Some(b"{\"pages\": [1, 2]}\n"),
    )
    .await;
    piped.ok();
    let entry = kvq(&stack, &["get", "doc", "--json"]).await;
    let entry: Value = serde_json::from_str(&entry.stdout).unwrap();
    assert_eq!(entry["value"], serde_json::json!({"pages": [1, 2]}));
    assert!(entry["expires_at"].is_string(), "{entry}");
}

#[tokio::test]
async fn keys_with_slashes_dots_and_any_utf8_round_trip() {
    let stack = Stack::start().await;
    for key in ["a/../b", "./x", "café ?#%&=+", "sp ace/€/%2F"] {
        kvq(&stack, &["put", key, "1", "--wait"]).await.ok();
        let get = kvq(&stack, &["get", key, "--json"]).await;
        get.ok();
        let entry: Value = serde_json::from_str(&get.stdout).unwrap();
        assert_eq!(entry["key"], key);
    }
    let listed = kvq(&stack, &["list"]).await;
    listed.ok();
    let mut expected = vec!["./x", "a/../b", "café ?#%&=+", "sp ace/€/%2F"];
    expected.sort();
    assert_eq!(listed.lines(), expected);
}

#[tokio::test]
async fn a_value_that_is_not_json_is_refused_before_any_request() {
    let stack = Stack::start().await;
    let run = kvq(&stack, &["put", "k", "hello"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--string"), "{run:?}");
    let get = kvq(&stack, &["get", "k"]).await;
    assert_eq!(get.code, 1, "nothing was written: {get:?}");
}

#[tokio::test]
async fn list_follows_the_cursor_across_pages() {
    let stack = Stack::start().await;
    let mut keys: Vec<String> = (0..2_345).map(|i| format!("page/{i}")).collect();
    keys.extend(["pagf".to_owned(), "pag".to_owned(), "other/1".to_owned()]);
    seed(&stack, &keys).await;
    let mut expected: Vec<String> = (0..2_345).map(|i| format!("page/{i}")).collect();
    expected.sort();

    // The default page of 1,000 keys: three pages.
    let all = kvq(&stack, &["list", "page/"]).await;
    all.ok();
    assert_eq!(all.lines(), expected);

    // Small pages.
    let small = kvq(&stack, &["list", "page/", "--page-size", "7"]).await;
    small.ok();
    assert_eq!(small.lines(), expected);

    let first = kvq(
        &stack,
        &["list", "page/", "--page-size", "10", "--limit", "25"],
    )
    .await;
    first.ok();
    assert_eq!(first.lines(), expected[..25].to_vec());

    let everything = kvq(&stack, &["list"]).await;
    everything.ok();
    assert_eq!(everything.lines().len(), 2_348);

    let none = kvq(&stack, &["list", "nothing/"]).await;
    none.ok();
    assert_eq!(none.stdout, "");
}
