//! `/healthz`, `/readyz` and start-up configuration errors.

use std::time::{Duration, Instant};

use kvq_testkit::{KvqProcess, Stack, TestRedis};
use reqwest::Method;
use serde_json::{Value, json};

/// How soon `/readyz` and `/metrics` must notice a Redis that died: they
/// reuse a reading for at most 1 s and a reading gives up after 1 s.
const NOTICED_WITHIN: Duration = Duration::from_secs(5);

async fn status(stack: &Stack, path: &str) -> u16 {
    let response = stack.request(Method::GET, path).send().await.unwrap();
    response.status().as_u16()
}

/// `/metrics`' text.
async fn metrics(stack: &Stack) -> String {
    let response = stack.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

fn has_queue_gauges(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("kvq_queue_jobs "))
        && text.lines().any(|l| l.starts_with("kvq_dead_jobs "))
}

#[tokio::test]
async fn ready_only_while_both_redis_servers_answer_and_ready_for_writes_while_the_queue_redis_does()
 {
    let mut stack = Stack::builder().workers(0).start().await;
    assert_eq!(status(&stack, "/healthz").await, 200);
    assert_eq!(status(&stack, "/readyz").await, 200);
    assert!(has_queue_gauges(&metrics(&stack).await));

    stack.queue.stop();
    kvq_testkit::eventually(NOTICED_WITHIN, "/readyz to turn 503", || async {
        (status(&stack, "/readyz").await == 503).then_some(())
    })
    .await;
    let response = stack.request(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "backend_unavailable");
    kvq_testkit::eventually(NOTICED_WITHIN, "the queue gauges to go", || async {
        (!has_queue_gauges(&metrics(&stack).await)).then_some(())
    })
    .await;
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
    kvq_testkit::eventually(Duration::from_secs(10), "the queue gauges back", || async {
        has_queue_gauges(&metrics(&stack).await).then_some(())
    })
    .await;

    stack.kv.stop();
    kvq_testkit::eventually(NOTICED_WITHIN, "/readyz to turn 503", || async {
        (status(&stack, "/readyz").await == 503).then_some(())
    })
    .await;
    // Writes are still accepted: ready for writes, which Kubernetes'
    // probe asks, so a KV Redis outage leaves the API pods in the Service.
    assert_eq!(status(&stack, "/readyz?scope=writes").await, 200);
    assert_eq!(stack.create("while-kv-down", json!(1)).await.status(), 202);
    stack.queue.stop();
    kvq_testkit::eventually(NOTICED_WITHIN, "writes to turn unready", || async {
        (status(&stack, "/readyz?scope=writes").await == 503).then_some(())
    })
    .await;
    assert_eq!(status(&stack, "/readyz?scope=everything").await, 400);
}

/// Commands `redis` has processed since it started.
fn commands_processed(redis: &TestRedis) -> u64 {
    let info: String = redis.cmd(&["INFO", "stats"]);
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

/// The queue partitions of a default stack.
const PARTITIONS: f64 = 16.0;

#[tokio::test]
async fn a_flood_of_open_route_requests_costs_redis_a_bounded_number_of_commands() {
    let stack = Stack::builder().workers(0).start().await;
    // Connections made, first readings taken.
    assert_eq!(status(&stack, "/readyz").await, 200);
    assert!(has_queue_gauges(&metrics(&stack).await));
    let (kv_before, queue_before) = (
        commands_processed(&stack.kv),
        commands_processed(&stack.queue),
    );
    let started = Instant::now();
    // 400 scrapes and 400 readiness checks, 40 at a time, in waves 100 ms
    // apart, so that readings expire during the flood and concurrent
    // requests meet a reading under way.
    let mut waves = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..20 {
        waves.tick().await;
        let mut burst = tokio::task::JoinSet::new();
        for path in ["/metrics", "/readyz"] {
            for _ in 0..20 {
                let request = stack.request(Method::GET, path);
                burst.spawn(async move {
                    let response = request.send().await.unwrap();
                    let status = response.status().as_u16();
                    (status, response.text().await.unwrap())
                });
            }
        }
        while let Some(answer) = burst.join_next().await {
            let (status, body) = answer.unwrap();
            assert_eq!(status, 200, "{body}");
            assert!(
                body.starts_with('{') || has_queue_gauges(&body),
                "a scrape without the queue gauges:\n{body}"
            );
        }
    }
    let elapsed = started.elapsed();
    let (kv_used, queue_used) = (
        commands_processed(&stack.kv) - kv_before,
        commands_processed(&stack.queue) - queue_before,
    );
    // Each second at most one gauge reading (a script call per partition,
    // whose 8 commands Redis counts too, and a read of the workers set, in
    // one pipeline, to the queue Redis, and a PING to the KV Redis) and two
    // readiness probes (a PING to each Redis), plus one of each at the
    // window's edges, whatever the number of requests (answered one by one,
    // they would cost the queue Redis 1,600 commands). Slack: this test's
    // own INFO connections, and a worker thread's first connection.
    let seconds = elapsed.as_secs_f64().ceil() + 1.0;
    let slack = 10.0;
    eprintln!("{elapsed:?}: queue Redis {queue_used} commands, KV Redis {kv_used}");
    assert!(
        queue_used as f64 <= (9.0 * PARTITIONS + 3.0) * seconds + slack,
        "the queue Redis ran {queue_used} commands in {elapsed:?}"
    );
    assert!(
        kv_used as f64 <= 3.0 * seconds + slack,
        "the KV Redis ran {kv_used} commands in {elapsed:?}"
    );
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
