//! `Idempotency-Key` is scoped to the caller, the method and the route, and
//! remembers what the first request asked for: another caller's key never
//! replays anything, and a repeat with a different request is a 422, never a
//! silently dropped write.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use kvq_testkit::auth::{exp_in, sign};
use kvq_testkit::{Stack, TEST_JWT_SECRET, eventually, token};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};

/// A writer token for `sub`.
fn writer(sub: &str) -> String {
    sign(
        &json!({"exp": exp_in(600), "roles": ["writer"], "sub": sub}),
        Algorithm::HS256,
        TEST_JWT_SECRET,
    )
}

/// Waits, as an admin, until job `id` is final; returns its record.
async fn wait_job(stack: &Stack, id: &Value) -> Value {
    let admin = token(&["admin"]);
    let path = format!("/v1/jobs/{}", id.as_str().unwrap());
    eventually(Duration::from_secs(10), "the job to finish", || async {
        let response = stack.request(Method::GET, &path).bearer_auth(&admin);
        let job: Value = response.send().await.unwrap().json().await.unwrap();
        (job["status"] != "queued" && job["status"] != "running").then_some(job)
    })
    .await
}

fn create(stack: &Stack, token: &str, idem: &str, key: &str, value: i64) -> RequestBuilder {
    stack
        .request(Method::POST, "/v1/kv")
        .bearer_auth(token)
        .header("idempotency-key", idem)
        .json(&json!({"key": key, "value": value}))
}

async fn accepted(response: Response) -> (bool, Value) {
    assert_eq!(response.status(), 202);
    let replayed = response.headers().contains_key("idempotent-replayed");
    (replayed, response.json().await.unwrap())
}

/// The problem code of a refused request.
async fn problem(response: Response, status: u16) -> String {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    body["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn another_callers_key_never_replays_and_a_changed_request_is_refused() {
    let stack = Stack::builder().secured().start().await;
    let (writer1, writer2) = (writer("writer1"), writer("writer2"));

    let (replayed, first) = accepted(
        create(&stack, &writer1, "order-1001", "tenantA/secret", 1)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(!replayed);

    // writer2, same header value, its own key: a write of its own.
    let (replayed, second) = accepted(
        create(&stack, &writer2, "order-1001", "tenantB/mine", 2)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(!replayed, "another caller's key replayed: {second}");
    assert_ne!(second["job_id"], first["job_id"]);
    assert_eq!(second["key"], "tenantB/mine");

    // The legacy route, same header value, again another caller's scope.
    let legacy = stack
        .request(Method::POST, "/create/other?value=x")
        .bearer_auth(&writer2)
        .header("idempotency-key", "order-1001")
        .send()
        .await
        .unwrap();
    assert_eq!(legacy.status(), 200);
    assert!(!legacy.headers().contains_key("idempotent-replayed"));
    let legacy: Value = legacy.json().await.unwrap();
    assert_ne!(legacy["task_id"], first["job_id"]);
    assert_ne!(legacy["task_id"], second["job_id"]);

    // The first caller's exact repeat replays its first answer.
    let (replayed, again) = accepted(
        create(&stack, &writer1, "order-1001", "tenantA/secret", 1)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(replayed);
    assert_eq!(again, first);

    // Its repeat with another body is refused, and queues nothing.
    for (key, value) in [("tenantA/secret", 9), ("tenantA/elsewhere", 1)] {
        let changed = create(&stack, &writer1, "order-1001", key, value)
            .send()
            .await
            .unwrap();
        assert_eq!(problem(changed, 422).await, "idempotency_key_reused");
    }

    for id in [&first["job_id"], &second["job_id"], &legacy["task_id"]] {
        let job = wait_job(&stack, id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let read = |key: &'static str| {
        stack
            .request(Method::GET, &format!("/v1/kv/{key}"))
            .bearer_auth(&writer1)
            .send()
    };
    let a: Value = read("tenantA/secret").await.unwrap().json().await.unwrap();
    assert_eq!(
        (a["value"].clone(), a["version"].clone()),
        (json!(1), json!(1))
    );
    let b: Value = read("tenantB/mine").await.unwrap().json().await.unwrap();
    assert_eq!(b["value"], json!(2));
    let other: Value = read("other").await.unwrap().json().await.unwrap();
    assert_eq!(other["value"], json!("x"));
    assert_eq!(read("tenantA/elsewhere").await.unwrap().status(), 404);
}

#[tokio::test]
async fn a_key_is_scoped_to_its_route_and_legacy_routes_check_the_request_too() {
    let stack = Stack::builder().secured().start().await;
    let token = writer("writer1");
    let legacy = |path: &str| {
        stack
            .request(Method::PUT, path)
            .bearer_auth(&token)
            .header("idempotency-key", "k-1")
    };
    // Create it, then the same header on two other routes: each its own write.
    let created = create(&stack, &token, "k-1", "scoped", 1)
        .send()
        .await
        .unwrap();
    let created = accepted(created).await.1;
    wait_job(&stack, &created["job_id"]).await;
    let updated = legacy("/update/scoped?value=two").send().await.unwrap();
    assert_eq!(updated.status(), 200);
    assert!(!updated.headers().contains_key("idempotent-replayed"));
    let updated: Value = updated.json().await.unwrap();
    let job = wait_job(&stack, &updated["task_id"]).await;
    assert_eq!(
        job["result"],
        json!({"outcome": "updated", "version": 2}),
        "{job}"
    );

    // The legacy repeat with another value: refused, nothing queued.
    let changed = legacy("/update/scoped?value=three").send().await.unwrap();
    assert_eq!(problem(changed, 422).await, "idempotency_key_reused");
    let same = legacy("/update/scoped?value=two").send().await.unwrap();
    assert_eq!(same.headers()["idempotent-replayed"], "true");
    let same: Value = same.json().await.unwrap();
    assert_eq!(same["task_id"], updated["task_id"]);

    // If-Match is part of the request: a repeat with another is refused.
    let cas = |version: &str| {
        stack
            .request(Method::DELETE, "/v1/kv/scoped")
            .bearer_auth(&token)
            .header("idempotency-key", "k-2")
            .header("if-match", version)
            .send()
    };
    assert_eq!(cas("\"1\"").await.unwrap().status(), 202);
    assert_eq!(
        problem(cas("\"2\"").await.unwrap(), 422).await,
        "idempotency_key_reused"
    );
}

#[tokio::test]
async fn without_auth_the_caller_is_the_peer_address() {
    let stack = Stack::start().await;
    let from = |last: u8| {
        reqwest::Client::builder()
            .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
            .build()
            .unwrap()
    };
    let send = |client: reqwest::Client, value: i64| {
        client
            .put(format!("{}/v1/kv/anon?upsert=true", stack.base()))
            .header("idempotency-key", "same")
            .json(&json!({"value": value}))
            .send()
    };
    let (replayed, first) = accepted(send(from(1), 1).await.unwrap()).await;
    assert!(!replayed);
    let (replayed, second) = accepted(send(from(2), 2).await.unwrap()).await;
    assert!(!replayed, "another address replayed {first}");
    assert_ne!(second["job_id"], first["job_id"]);
    let (replayed, again) = accepted(send(from(1), 1).await.unwrap()).await;
    assert!(replayed);
    assert_eq!(again, first);
}
