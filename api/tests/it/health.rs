//! `/healthz`, `/readyz` and start-up configuration errors.

use std::time::Duration;

use kvq_testkit::{KvqProcess, Stack};
use reqwest::Method;
use serde_json::Value;

#[tokio::test]
async fn ready_only_while_both_redis_servers_answer() {
    let mut stack = Stack::builder().workers(0).start().await;
    let status = |stack: &Stack, path: &'static str| {
        let request = stack.request(Method::GET, path);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(&stack, "/healthz").await, 200);
    assert_eq!(status(&stack, "/readyz").await, 200);

    stack.queue.stop();
    let response = stack.request(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "backend_unavailable");
    assert_eq!(
        status(&stack, "/healthz").await,
        200,
        "liveness ignores Redis"
    );

    stack.queue.restart();
    kvq_testkit::eventually(Duration::from_secs(10), "ready again", || async {
        (status(&stack, "/readyz").await == 200).then_some(())
    })
    .await;

    stack.kv.stop();
    assert_eq!(status(&stack, "/readyz").await, 503);
}

#[tokio::test]
async fn a_bad_setting_stops_the_api_naming_the_variable() {
    for (var, value) in [
        ("KVQ_WORKER_CONCURRENCY", "zero"),
        ("KVQ_KV_REDIS_URL", "http://127.0.0.1:1"),
        ("KVQ_AUTH_DISABLED", "perhaps"),
        ("KVQ_BIND", "not-an-address"),
        ("KVQ_AUTH_MAX_TOKEN_LIFETIME", "forever"),
    ] {
        for bin in ["kvq-api", "kvq-worker"] {
            let mut process = KvqProcess::spawn(bin, &[(var.to_owned(), value.to_owned())]);
            let status = process.wait_exit(Duration::from_secs(10)).await;
            assert_eq!(status.code(), Some(2), "{bin} with {var}={value}");
            let stderr = process.stderr().join("\n");
            assert!(stderr.contains(var), "{bin}: {stderr}");
        }
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_show_the_queue() {
    let stack = Stack::builder().workers(0).start().await;
    for key in ["users/1", "users/2"] {
        assert_eq!(stack.get(key).await.status(), 404);
    }
    assert_eq!(stack.create("m", serde_json::json!(1)).await.status(), 202);
    // Made-up methods share one label.
    for method in ["BREW", "WHEN"] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let response = stack.request(method, "/healthz").send().await.unwrap();
        assert_eq!(response.status(), 405);
    }
    let response = stack.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for line in [
        // Both reads count under one route pattern, not two paths.
        r#"kvq_api_http_requests_total{method="GET",route="/v1/kv/{key}",status="404"} 2"#,
        r#"kvq_api_http_requests_total{method="POST",route="/v1/kv",status="202"} 1"#,
        r#"kvq_api_http_request_duration_seconds_count{method="GET",route="/v1/kv/{key}"} 2"#,
        r#"kvq_api_writes_accepted_total{op="create"} 1"#,
        // No worker runs: the write waits in the queue.
        "kvq_queue_jobs 1",
        "kvq_dead_jobs 0",
        r#"kvq_api_http_requests_total{method="other",route="/healthz",status="405"} 2"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
}
