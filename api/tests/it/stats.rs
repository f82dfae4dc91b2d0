//! `GET /v1/stats` and the queue gauges of `/metrics`: depth and lag per
//! partition, owners, workers, counters, rates; admin only; 503 when the
//! queue Redis is down.

use std::time::Duration;

use kvq_testkit::{Stack, eventually, token};
use reqwest::Method;
use serde_json::{Value, json};

/// `GET /v1/stats`' body, with `token` (none on an open stack).
async fn stats(stack: &Stack, token: Option<&str>) -> Value {
    let mut request = stack.request(Method::GET, "/v1/stats");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "GET /v1/stats");
    response.json().await.unwrap()
}

/// The value of the sample whose line starts with `series` (name and
/// labels, as printed) in a Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn sum(stats: &Value, field: &str) -> f64 {
    stats["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_f64().unwrap())
        .sum()
}

fn max_lag(stats: &Value) -> f64 {
    stats["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag_seconds"].as_f64().unwrap())
        .fold(0.0, f64::max)
}

#[tokio::test]
async fn stats_need_the_admin_role() {
    let stack = Stack::builder().workers(0).secured().start().await;
    let anonymous = stack
        .request(Method::GET, "/v1/stats")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        anonymous.headers()["content-type"],
        "application/problem+json"
    );
    for role in ["reader", "writer"] {
        let refused = stack
            .request(Method::GET, "/v1/stats")
            .bearer_auth(token(&[role]))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{role}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "forbidden", "{role}");
    }
    let body = stats(&stack, Some(&token(&["admin"]))).await;
    assert_eq!(body["partitions"].as_array().unwrap().len(), 16);
}

#[tokio::test]
async fn stats_show_every_partition_its_owner_the_workers_and_the_counts() {
    let stack = Stack::builder().workers(1).start().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(Stack::job_id(stack.create(&format!("stats/{i}"), json!(i)).await).await);
    }
    // A business failure counts as failed.
    ids.push(Stack::job_id(stack.create("stats/0", json!("again")).await).await);
    for id in &ids {
        stack.wait_job(id).await;
    }
    // Committed within a commit interval or so.
    let body = eventually(
        Duration::from_secs(15),
        "the stats to count every job as done",
        || async {
            let body = stats(&stack, None).await;
            (sum(&body, "done_total") >= 41.0 && sum(&body, "depth") == 0.0).then_some(body)
        },
    )
    .await;
    // The answer's shape.
    assert!(body["at"].as_str().unwrap().ends_with('Z'), "{body}");
    let partitions = body["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 16);
    let workers = body["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{body}");
    let worker = workers[0]["id"].as_str().unwrap();
    assert!(
        workers[0]["last_heartbeat"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let owned: Vec<u64> = workers[0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(owned, (0..16).collect::<Vec<u64>>(), "{body}");
    for (i, p) in partitions.iter().enumerate() {
        assert_eq!(p["partition"], i);
        assert_eq!(p["owner"], worker, "{p}");
        assert_eq!(p["depth"], 0, "{p}");
        assert_eq!(p["lag_seconds"], 0.0, "{p}");
        assert!(p["oldest_enqueued_at"].is_null(), "{p}");
        assert_eq!(p["accepted_total"], p["done_total"], "{p}");
    }
    assert_eq!(sum(&body, "accepted_total"), 41.0);
    assert_eq!(sum(&body, "done_total"), 41.0);
    let jobs = &body["jobs"];
    assert_eq!(jobs["waiting"], 0, "{body}");
    assert_eq!(jobs["dead"], 0, "{body}");
    assert_eq!(jobs["succeeded_total"], 40, "{body}");
    assert_eq!(jobs["failed_total"], 1, "{body}");
    assert!(jobs.get("running").is_some(), "{body}");
    for field in ["accepted_per_second", "applied_per_second"] {
        assert!(body["rates"][field].as_f64().is_some(), "{body}");
    }
}

#[tokio::test]
async fn rates_follow_the_writes() {
    let stack = Stack::builder().workers(1).start().await;
    // The first read is the first sample: rates 0.
    let first = stats(&stack, None).await;
    assert_eq!(first["rates"]["accepted_per_second"], 0.0, "{first}");
    // Writes go on until the rates show them (the machine may be slow).
    let writes = async {
        for i in 0.. {
            stack.create(&format!("rate/{i}"), json!(i)).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let watch = eventually(
        Duration::from_secs(60),
        "the rates to show the writes",
        || async {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let body = stats(&stack, None).await;
            let rates = &body["rates"];
            (rates["accepted_per_second"].as_f64().unwrap() > 5.0
                && rates["applied_per_second"].as_f64().unwrap() > 5.0)
                .then_some(body)
        },
    );
    tokio::select! {
        () = writes => {}
        _ = watch => {}
    }
}

#[tokio::test]
async fn the_lag_rises_while_the_workers_are_stopped_and_falls_once_they_drain() {
    let mut stack = Stack::builder().workers(0).start().await;
    for i in 0..20 {
        Stack::job_id(stack.create(&format!("lag/{i}"), json!(i)).await).await;
    }
    let queued_at = std::time::Instant::now();
    // Nothing runs the jobs: the lag grows with the time they wait.
    let body = eventually(Duration::from_secs(20), "the lag to pass 2 s", || async {
        let body = stats(&stack, None).await;
        (max_lag(&body) >= 2.0).then_some(body)
    })
    .await;
    assert_eq!(sum(&body, "depth"), 20.0, "{body}");
    assert_eq!(body["jobs"]["waiting"], 20, "{body}");
    assert!(
        max_lag(&body) <= queued_at.elapsed().as_secs_f64() + 1.0,
        "{body}"
    );
    for p in body["partitions"].as_array().unwrap() {
        assert!(p["owner"].is_null(), "{p}");
        assert_eq!(
            p["oldest_enqueued_at"].is_null(),
            p["depth"] == 0,
            "a partition has an oldest job when it has jobs: {p}"
        );
    }
    assert!(body["workers"].as_array().unwrap().is_empty(), "{body}");
    // The gauges show it too: per partition, and the depth over them all.
    let text = eventually(Duration::from_secs(10), "the lag gauge", || async {
        let text = stack.metrics().await;
        let lags: Vec<f64> = (0..16)
            .filter_map(|p| {
                sample(
                    &text,
                    &format!("kvq_queue_lag_seconds{{partition=\"{p}\"}}"),
                )
            })
            .collect();
        (lags.len() == 16 && lags.iter().any(|lag| *lag >= 2.0)).then_some(text)
    })
    .await;
    let depths: f64 = (0..16)
        .filter_map(|p| {
            sample(
                &text,
                &format!("kvq_queue_partition_jobs{{partition=\"{p}\"}}"),
            )
        })
        .sum();
    assert_eq!(depths, 20.0, "{text}");
    assert_eq!(sample(&text, "kvq_queue_jobs"), Some(20.0), "{text}");

    // A worker drains the queue: lag and depth go back to 0.
    stack.start_worker().await;
    eventually(Duration::from_secs(30), "the lag to fall to 0", || async {
        let body = stats(&stack, None).await;
        (max_lag(&body) == 0.0 && sum(&body, "depth") == 0.0).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the lag gauges to fall to 0",
        || async {
            let text = stack.metrics().await;
            let lags: Vec<f64> = (0..16)
                .filter_map(|p| {
                    sample(
                        &text,
                        &format!("kvq_queue_lag_seconds{{partition=\"{p}\"}}"),
                    )
                })
                .collect();
            (lags.len() == 16 && lags.iter().all(|lag| *lag == 0.0)).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn stats_answer_503_when_the_queue_redis_is_down() {
    let mut stack = Stack::builder().workers(0).start().await;
    let text = eventually(Duration::from_secs(10), "both Redis up", || async {
        let text = stack.metrics().await;
        (sample(&text, "kvq_redis_up{role=\"queue\"}") == Some(1.0)
            && sample(&text, "kvq_redis_up{role=\"kv\"}") == Some(1.0))
        .then_some(text)
    })
    .await;
    assert!(text.contains("# TYPE kvq_redis_up gauge"), "{text}");
    stack.queue.stop();
    let response = stack
        .request(Method::GET, "/v1/stats")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "backend_unavailable", "{body}");
    // The gauges say which one is down; the queue's figures are left out.
    let text = eventually(Duration::from_secs(15), "kvq_redis_up to fall", || async {
        let text = stack.metrics().await;
        (sample(&text, "kvq_redis_up{role=\"queue\"}") == Some(0.0)).then_some(text)
    })
    .await;
    assert_eq!(
        sample(&text, "kvq_redis_up{role=\"kv\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("kvq_queue_lag_seconds{"), "{text}");
}

#[tokio::test]
async fn the_api_reports_its_build() {
    let stack = Stack::builder().workers(0).start().await;
    let text = stack.metrics().await;
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &text,
            &format!("kvq_build_info{{component=\"api\",version=\"{version}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn worker_histograms_count_each_applied_job_and_the_worker_reports_its_build() {
    let stack = Stack::builder().workers(1).start().await;
    let text = stack.worker_metrics(0).await.unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &text,
            &format!("kvq_build_info{{component=\"worker\",version=\"{version}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    for name in [
        "kvq_worker_job_duration_seconds",
        "kvq_worker_enqueue_to_applied_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name}:\n{text}"
        );
    }
    let count = |text: &str, name: &str, op: &str| {
        sample(text, &format!("{name}_count{{op=\"{op}\"}}")).unwrap_or(0.0)
    };
    // 5 creates, 3 updates, 2 deletes, each applied once.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(Stack::job_id(stack.create(&format!("h/{i}"), json!(i)).await).await);
    }
    for i in 0..3 {
        ids.push(Stack::job_id(stack.put(&format!("h/{i}"), json!({"value": 0})).await).await);
    }
    for i in 3..5 {
        ids.push(Stack::job_id(stack.delete(&format!("h/{i}")).await).await);
    }
    for id in &ids {
        assert_eq!(stack.wait_job(id).await["status"], "succeeded");
    }
    let text = stack.worker_metrics(0).await.unwrap();
    for name in [
        "kvq_worker_job_duration_seconds",
        "kvq_worker_enqueue_to_applied_seconds",
    ] {
        assert_eq!(count(&text, name, "create"), 5.0, "{name}:\n{text}");
        assert_eq!(count(&text, name, "update"), 3.0, "{name}:\n{text}");
        assert_eq!(count(&text, name, "delete"), 2.0, "{name}:\n{text}");
        // Every observation is in the +Inf bucket, and took some time.
        assert_eq!(
            sample(
                &text,
                &format!("{name}_bucket{{op=\"create\",le=\"+Inf\"}}")
            ),
            Some(5.0),
            "{name}:\n{text}"
        );
        assert!(
            sample(&text, &format!("{name}_sum{{op=\"create\"}}")).unwrap() > 0.0,
            "{name}:\n{text}"
        );
    }
    // The counters kept their names.
    assert_eq!(
        sample(&text, "kvq_worker_jobs_total{status=\"succeeded\"}"),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kvq_worker_jobs_in_flight"),
        Some(0.0),
        "{text}"
    );
}
