//! Slow and oversized clients: a request head or body that does not arrive
//! in time, an idle keep-alive connection, and oversized headers all end
//! with the connection closed, never with a connection held for ever.

use std::time::{Duration, Instant};

use kvq_testkit::Stack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: the server is told to give up after 0.5 s or 1 s.
const CLOSED_WITHIN: Duration = Duration::from_secs(15);

/// Under actix-web's own defaults (5 s for the head, 5 s keep-alive), so a
/// connection closed sooner than this was closed by kvq's settings.
const SETTINGS_APPLIED_WITHIN: Duration = Duration::from_secs(4);

async fn impatient() -> Stack {
    Stack::builder()
        .workers(0)
        .env("KVQ_HTTP_CLIENT_TIMEOUT_MS", "500")
        .env("KVQ_HTTP_KEEP_ALIVE_SECONDS", "1")
        .start()
        .await
}

async fn connect(stack: &Stack) -> TcpStream {
    let addr = stack.base().trim_start_matches("http://").to_owned();
    TcpStream::connect(addr).await.unwrap()
}

/// Everything the server sends until it closes the connection.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(CLOSED_WITHIN, stream.read_to_end(&mut answer))
        .await
        .expect("the server kept the connection open")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    let stack = impatient().await;
    let mut stream = connect(&stack).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kvq\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < SETTINGS_APPLIED_WITHIN,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_body_that_never_ends_is_cut_off_and_stores_nothing() {
    let stack = impatient().await;
    let mut stream = connect(&stack).await;
    stream
        .write_all(
            b"POST /v1/kv HTTP/1.1\r\nHost: kvq\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"key\": \"slow\", ",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(stack.queue.keys().is_empty(), "{:?}", stack.queue.keys());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let stack = impatient().await;
    let mut stream = connect(&stack).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kvq\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() < SETTINGS_APPLIED_WITHIN,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let stack = Stack::builder().workers(0).start().await;
    // Over kvq's 32 KiB: a problem+json 431.
    let response = stack
        .request(reqwest::Method::GET, "/v1/kv/k")
        .header("x-huge", "x".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "headers_too_large");
    // Over actix-web's own limits (a 128 KiB head, 96 headers): 431 and the
    // connection closed.
    let huge = "x".repeat(200 * 1024);
    let many: String = (0..200).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    for headers in [format!("X-Huge: {huge}\r\n"), many] {
        let mut stream = connect(&stack).await;
        let request = format!("GET /v1/kv/k HTTP/1.1\r\nHost: kvq\r\n{headers}\r\n");
        // The server may close before it has read it all.
        stream.write_all(request.as_bytes()).await.ok();
        let answer = read_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    }
}

#[tokio::test]
async fn an_oversized_forged_token_is_refused_before_any_verification() {
    let mut stack = Stack::builder()
        .workers(0)
        .secured()
        // Refused tokens are logged at debug level: show them.
        .env("RUST_LOG", "info,kvq_api::auth=debug")
        .start()
        .await;
    let b64 = |json: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
    };
    let forged = format!(
        "{}.{}.{}",
        b64(serde_json::json!({"alg": "HS256", "typ": "JWT"})),
        b64(
            serde_json::json!({"exp": kvq_testkit::auth::exp_in(600), "roles": ["admin"], "pad": "x".repeat(73_000)})
        ),
        "A".repeat(43)
    );
    assert!(
        (95_000..100_000).contains(&forged.len()),
        "{}",
        forged.len()
    );
    let response = stack
        .request(reqwest::Method::GET, "/v1/kv/k")
        .bearer_auth(&forged)
        .header("x-request-id", "forged-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    assert_eq!(response.headers()["x-request-id"], "forged-1");
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "headers_too_large");

    // A small bad token, sent after it, is verified, refused and logged:
    // had the forged one been verified, its line would be there first.
    let small = kvq_testkit::auth::sign(
        &serde_json::json!({"exp": kvq_testkit::auth::exp_in(600), "roles": ["admin"]}),
        jsonwebtoken::Algorithm::HS256,
        "another-secret",
    );
    let response = stack
        .request(reqwest::Method::GET, "/v1/kv/k")
        .bearer_auth(&small)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let refusals = |stack: &mut Stack| {
        stack
            .api()
            .logs()
            .iter()
            .filter(|line| line.contains("token refused"))
            .count()
    };
    kvq_testkit::eventually(Duration::from_secs(5), "the refusal's log line", || {
        let seen = refusals(&mut stack);
        async move { (seen > 0).then_some(()) }
    })
    .await;
    assert_eq!(refusals(&mut stack), 1, "only the small token was verified");

    // The 431 is counted like any answer.
    let metrics = stack.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kvq_api_http_requests_total{")
                && l.contains(r#"status="431""#)
                && l.ends_with(" 1")),
        "{metrics}"
    );
}
