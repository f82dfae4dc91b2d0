//! Memory per request is bounded: the worst write bodies, many at once, are
//! all answered (202, 413, or 503 with `Retry-After`), never with a reset
//! connection, and the API's peak resident memory stays far below its pod
//! limit (256 Mi).

use std::time::Duration;

use kvq_testkit::flood::{self, Framing};
use kvq_testkit::{Stack, eventually};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The API's peak resident set (`VmHWM`) must stay under this, KiB.
const PEAK_RSS_LIMIT_KIB: u64 = 128 * 1024;

/// Bodies of each shape sent at once.
const CONCURRENT: usize = 50;

/// The default value limit.
const VALUE_LIMIT: usize = 1_048_576;

fn addr(stack: &Stack) -> String {
    stack.base().trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn the_worst_bodies_at_once_are_answered_within_bounded_memory() {
    let mut stack = Stack::builder().workers(0).start().await;
    let addr = addr(&stack);
    let pid = stack.api().pid();
    let mut report = Vec::new();
    for shape in flood::worst_shapes() {
        let answers = flood::flood(&addr, &shape, CONCURRENT, VALUE_LIMIT).await;
        let mut counts = std::collections::BTreeMap::new();
        for answer in &answers {
            let answer = answer
                .as_ref()
                .unwrap_or_else(|e| panic!("{}: a transport error: {e}", shape.name));
            let allowed: &[u16] = if shape.acceptable {
                &[202, 503]
            } else {
                &[413, 503]
            };
            assert!(
                allowed.contains(&answer.status),
                "{}: {} {}",
                shape.name,
                answer.status,
                answer.body
            );
            if answer.status == 503 {
                assert!(answer.header("retry-after").is_some(), "{}", answer.head);
            }
            *counts.entry(answer.status).or_insert(0) += 1;
        }
        let peak = flood::vm_kib(pid, "VmHWM").unwrap_or_default();
        report.push(format!(
            "{}: {counts:?}, peak RSS so far {} MiB",
            shape.name,
            peak / 1024
        ));
    }
    let peak = flood::vm_kib(pid, "VmHWM").unwrap_or_default();
    eprintln!("{}", report.join("\n"));
    assert!(
        peak < PEAK_RSS_LIMIT_KIB,
        "kvq-api peaked at {} MiB:\n{}",
        peak / 1024,
        report.join("\n")
    );
}

/// How many job records the queue Redis holds: one per queued write.
fn job_records(stack: &Stack) -> usize {
    let all = stack.queue.keys();
    all.iter().filter(|k| k.contains(":job:")).count()
}

/// `kvq_api_body_bytes_in_flight` from `/metrics`.
async fn in_flight(stack: &Stack) -> u64 {
    let text = stack.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix("kvq_api_body_bytes_in_flight "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// A create of `key` whose body is `length` bytes long.
fn create_body(key: &str, length: usize) -> Vec<u8> {
    let head = format!("{{\"key\":\"{key}\",\"value\":\"");
    let filler = length - head.len() - 2;
    format!("{head}{}\"}}", "x".repeat(filler)).into_bytes()
}

#[tokio::test]
async fn bodies_beyond_the_budget_get_503_and_queue_nothing() {
    // Body limit 128 KiB + 64 KiB; a budget of two bodies of 100,000 bytes.
    let stack = Stack::builder()
        .env("KVQ_MAX_VALUE_BYTES", "131072")
        .env("KVQ_MAX_BODY_BYTES_IN_FLIGHT", "200000")
        .start()
        .await;
    let addr = addr(&stack);
    // Two bodies on their way: their heads and half of each are sent.
    let mut held = Vec::new();
    for key in ["held/1", "held/2"] {
        let body = create_body(key, 100_000);
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/kv HTTP/1.1\r\nhost: kvq\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body[..50_000]).await.unwrap();
        held.push((stream, body));
    }
    eventually(
        Duration::from_secs(10),
        "both bodies to be reserved",
        || async { (in_flight(&stack).await == 200_000).then_some(()) },
    )
    .await;

    // A third does not fit: 503 overloaded, with Retry-After, and the
    // connection is answered cleanly.
    for framing in [Framing::Length, Framing::Chunked] {
        let refused = flood::raw_request(
            &addr,
            "POST",
            "/v1/kv",
            &create_body("refused", 100_000),
            framing,
        )
        .await
        .unwrap();
        assert_eq!(refused.status, 503, "{framing:?}: {}", refused.body);
        assert_eq!(refused.header("retry-after"), Some("1"));
        assert_eq!(
            refused.header("content-type"),
            Some("application/problem+json")
        );
        let problem: Value = serde_json::from_str(&refused.body).unwrap();
        assert_eq!(problem["code"], "overloaded");
    }

    // The two held bodies finish and are queued; then there is room again.
    for (mut stream, body) in held {
        stream.write_all(&body[50_000..]).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    assert_eq!(in_flight(&stack).await, 0);
    let accepted = stack.create("after", json!("fits again")).await;
    assert_eq!(stack.finished(accepted).await["status"], "succeeded");

    eventually(
        Duration::from_secs(15),
        "the held writes to apply",
        || async {
            let mut ok = true;
            for key in ["held/1", "held/2"] {
                ok &= stack.get(key).await.status() == 200;
            }
            ok.then_some(())
        },
    )
    .await;
    assert_eq!(stack.get("refused").await.status(), 404);
    assert_eq!(job_records(&stack), 3, "{:?}", stack.queue.keys());
}

/// The raw text of the value a read of `key` answers.
async fn stored_text(stack: &Stack, key: &str) -> String {
    let response = stack.get(key).await;
    assert_eq!(response.status(), 200, "GET {key}");
    let text = response.text().await.unwrap();
    let start = text.find("\"value\":").unwrap() + "\"value\":".len();
    let end = text.rfind(",\"version\":").unwrap();
    text[start..end].to_owned()
}

#[tokio::test]
async fn values_are_stored_as_sent_without_whitespace_and_checked() {
    // Body limit 256 KiB + 64 KiB.
    let stack = Stack::builder()
        .env("KVQ_MAX_VALUE_BYTES", "262144")
        .start()
        .await;
    let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let kept = [
        (
            "spaced",
            "{ \"a\" : 1 ,\n\t\"b\" : [ 1 , 2 ] }",
            "{\"a\":1,\"b\":[1,2]}",
        ),
        (
            "digits",
            "123456789012345678901234567890",
            "123456789012345678901234567890",
        ),
        ("exponent", "1.0e2", "1.0e2"),
        ("duplicates", "{\"a\":1,\"a\":2}", "{\"a\":1,\"a\":2}"),
        ("escapes", "\" \\u00e9\\/ \"", "\" \\u00e9\\/ \""),
        ("deep", &nested(128), &nested(128)),
    ];
    for (key, sent, _) in kept {
        let accepted = stack
            .request(reqwest::Method::POST, "/v1/kv")
            .header("content-type", "application/json")
            .body(format!("{{\"key\":\"{key}\",\"value\":{sent}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            stack.finished(accepted).await["status"],
            "succeeded",
            "{key}"
        );
    }
    for (key, _, stored) in kept {
        assert_eq!(stored_text(&stack, key).await, stored, "{key}");
    }

    // Refused, and nothing of them queued: too deep, beyond f64, and a
    // body over the limit, refused by its Content-Length before it is
    // parsed (it is not even JSON).
    let over_limit = format!("not json {}", "x".repeat(400_000));
    for (body, status, code) in [
        (
            format!("{{\"key\":\"r\",\"value\":{}}}", nested(129)),
            400,
            "malformed_json",
        ),
        (
            format!("{{\"key\":\"r\",\"value\":{}}}", nested(100_000)),
            400,
            "malformed_json",
        ),
        (
            "{\"key\":\"r\",\"value\":[1e400]}".to_owned(),
            400,
            "malformed_json",
        ),
        (
            "{\"key\":\"r\",\"value\":{\"a\":-1e400}}".to_owned(),
            400,
            "malformed_json",
        ),
        (over_limit.clone(), 413, "value_too_large"),
    ] {
        let what = body[..body.len().min(40)].to_owned();
        for framing in [Framing::Length, Framing::Chunked] {
            let answer =
                flood::raw_request(&addr(&stack), "POST", "/v1/kv", body.as_bytes(), framing)
                    .await
                    .unwrap();
            assert_eq!(answer.status, status, "{what} {framing:?}: {}", answer.body);
            let problem: Value = serde_json::from_str(&answer.body).unwrap();
            assert_eq!(problem["code"], code, "{what}");
        }
    }
    assert_eq!(stack.get("r").await.status(), 404);
    assert_eq!(job_records(&stack), kept.len());
}

/// The worker's memory is bounded too: a backlog of large values is worked
/// off within the same peak as the API's. A worker's partitions hold at
/// most 16 MiB of fetched, uncommitted jobs, hand apalis at most 8 MiB at
/// once, and a read fetches about 1 MiB (by the size of the entries read
/// lately), so a backlog of 1 MiB values is never held whole (it was: 506
/// MiB for this test when the bounds counted jobs, not bytes; about 70 MiB
/// now).
#[tokio::test]
async fn a_backlog_of_large_values_is_worked_off_within_bounded_worker_memory() {
    let mut stack = Stack::builder()
        .workers(0)
        .env("KVQ_QUEUE_PARTITIONS", "1")
        .start()
        .await;
    let value = "x".repeat(VALUE_LIMIT - 1024);
    let mut ids = Vec::new();
    for i in 0..200 {
        let accepted = stack.create(&format!("big-{i}"), json!(value)).await;
        ids.push(Stack::job_id(accepted).await);
    }
    stack.start_worker().await;
    let pid = stack.workers[0].pid();
    for id in &ids {
        let job = stack.wait_job(id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let peak = flood::vm_kib(pid, "VmHWM").unwrap_or_default();
    eprintln!("worker peak resident set after 200 MiB of backlog: {peak} KiB");
    assert!(
        peak < PEAK_RSS_LIMIT_KIB,
        "the worker's peak resident set reached {peak} KiB"
    );
}
