//! Exit codes and error messages: conflicts exit 1, usage 2, an
//! unavailable API or Redis 3, a missing or weak token 4, each with the
//! problem's title and code on stderr.

use kvq_testkit::{Stack, free_port, token};

use crate::{kvq, kvq_with};

#[tokio::test]
async fn an_if_match_conflict_exits_1_and_changes_nothing() {
    let stack = Stack::start().await;
    kvq(&stack, &["put", "counter", "1", "--create", "--wait"])
        .await
        .ok();

    // Waited: the API answers 412 version_mismatch.
    let stale = kvq(
        &stack,
        &["put", "counter", "2", "--if-match", "7", "--wait"],
    )
    .await;
    assert_eq!(stale.code, 1, "{stale:?}");
    assert_eq!(stale.stdout, "");
    assert!(
        stale.stderr.contains("(version_mismatch)"),
        "the problem's code: {stale:?}"
    );
    assert_eq!(kvq(&stack, &["get", "counter"]).await.stdout, "1\n");

    // Not waited: queued (exit 0), and `wait` exits 1 on the failed job.
    let queued = kvq(&stack, &["put", "counter", "2", "--if-match", "7"]).await;
    queued.ok();
    let id = queued.stdout.trim();
    let wait = kvq(&stack, &["wait", id]).await;
    assert_eq!(wait.code, 1, "{wait:?}");
    assert!(wait.stderr.contains("version_mismatch"), "{wait:?}");
    // `job` only shows it.
    let job = kvq(&stack, &["job", id]).await;
    job.ok();
    assert!(job.stdout.contains("status    failed"), "{job:?}");

    // The right version applies.
    let fresh = kvq(
        &stack,
        &["put", "counter", "2", "--if-match", "1", "--wait"],
    )
    .await;
    fresh.ok();
    assert_eq!(fresh.stdout, "updated counter, version 2\n");
    let delete = kvq(&stack, &["delete", "counter", "--if-match", "1", "--wait"]).await;
    assert_eq!(delete.code, 1, "{delete:?}");
    assert!(delete.stderr.contains("(version_mismatch)"), "{delete:?}");

    // --create on a live key: 409 already_exists.
    let exists = kvq(&stack, &["put", "counter", "9", "--create", "--wait"]).await;
    assert_eq!(exists.code, 1, "{exists:?}");
    assert!(exists.stderr.contains("(already_exists)"), "{exists:?}");
    // --update of an absent key: not_found.
    let absent = kvq(&stack, &["put", "nobody", "9", "--update", "--wait"]).await;
    assert_eq!(absent.code, 1, "{absent:?}");
    assert!(absent.stderr.contains("(not_found)"), "{absent:?}");
    assert_eq!(kvq(&stack, &["get", "counter"]).await.stdout, "2\n");
}

#[tokio::test]
async fn no_api_listening_exits_3() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [
        &["get", "k"][..],
        &["put", "k", "1"],
        &["list"],
        &["job", "0199c1d2-0000-7000-8000-000000000000"],
    ] {
        let run = kvq_with(&[("KVQ_URL", &url)], args, None).await;
        assert_eq!(run.code, 3, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains(&format!("cannot reach kvq at {url}")),
            "{run:?}"
        );
    }
}

#[tokio::test]
async fn a_redis_down_exits_3_with_the_problem() {
    let mut stack = Stack::builder()
        .env("KVQ_READ_RETRY_MAX_MS", "300")
        .env("KVQ_REDIS_TIMEOUT_MS", "500")
        .start()
        .await;
    kvq(&stack, &["put", "k", "1", "--wait"]).await.ok();

    // The data Redis down: reads answer 503 backend_unavailable.
    stack.kv.stop();
    let read = kvq(&stack, &["get", "k"]).await;
    assert_eq!(read.code, 3, "{read:?}");
    assert!(read.stderr.contains("(backend_unavailable)"), "{read:?}");

    // The queue Redis down: writes answer 503 too (backend_unavailable,
    // or outcome_unknown when the connection broke under the accept).
    stack.queue.stop();
    let write = kvq(&stack, &["put", "k", "2"]).await;
    assert_eq!(write.code, 3, "{write:?}");
    assert!(
        write.stderr.contains("(backend_unavailable)")
            || write.stderr.contains("(outcome_unknown)"),
        "{write:?}"
    );
}

#[tokio::test]
async fn tokens_come_from_kvq_token_or_the_flag_and_a_refusal_exits_4() {
    let stack = Stack::builder().secured().start().await;
    let base = stack.base();
    let writer = token(&["writer"]);
    let reader = token(&["reader"]);

    let anonymous = kvq(&stack, &["get", "k"]).await;
    assert_eq!(anonymous.code, 4, "{anonymous:?}");
    assert!(anonymous.stderr.contains("(unauthorized)"), "{anonymous:?}");
    assert!(
        anonymous.stderr.contains("KVQ_TOKEN"),
        "a hint: {anonymous:?}"
    );

    let put = kvq_with(
        &[("KVQ_URL", base), ("KVQ_TOKEN", &writer)],
        &["put", "k", "1", "--wait"],
        None,
    )
    .await;
    put.ok();

    // A reader may read, not write.
    let read = kvq_with(
        &[("KVQ_URL", base)],
        &["get", "k", "--token", &reader],
        None,
    )
    .await;
    read.ok();
    assert_eq!(read.stdout, "1\n");
    let refused = kvq_with(
        &[("KVQ_URL", base), ("KVQ_TOKEN", &reader)],
        &["put", "k", "2"],
        None,
    )
    .await;
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(refused.stderr.contains("(forbidden)"), "{refused:?}");

    // --token wins over KVQ_TOKEN.
    let flag = kvq_with(
        &[("KVQ_URL", base), ("KVQ_TOKEN", "not-a-token")],
        &["get", "k", "--token", &reader],
        None,
    )
    .await;
    flag.ok();
}

#[tokio::test]
async fn usage_errors_exit_2() {
    for args in [
        &["put"][..],
        &["get"],
        &["frobnicate"],
        &["get", "k", "--no-such-flag"],
        &["put", "k", "1", "--ttl", "2y"],
        &["list", "--page-size", "5000"],
    ] {
        let run = kvq_with(&[("KVQ_URL", "http://127.0.0.1:9")], args, None).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stderr.starts_with("error: "), "{args:?}: {run:?}");
        assert_eq!(run.stdout, "", "{args:?}");
    }
    let bad_url = kvq_with(&[("KVQ_URL", "ftp://x")], &["get", "k"], None).await;
    assert_eq!(bad_url.code, 2, "{bad_url:?}");
    assert!(bad_url.stderr.contains("KVQ_URL"), "{bad_url:?}");
}
