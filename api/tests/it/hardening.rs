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
