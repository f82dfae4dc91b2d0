//! The routes and their methods: a method a known path does not serve gets
//! 405 + `Allow`.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kvq_testkit::Stack;
use reqwest::Method;
use serde_json::{Value, json};

const SECRET: &str = "openapi-test-secret-0123456789";

async fn secured() -> Stack {
    Stack::builder()
        .env("KVQ_AUTH_DISABLED", "false")
        .env("KVQ_AUTH_JWT_SECRET", SECRET)
        .start()
        .await
}

fn admin_token() -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"exp": exp, "roles": ["admin"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn unsupported_methods_are_405_problems_with_allow() {
    let stack = secured().await;
    let token = admin_token();
    for (method, path, allow) in [
        ("TRACE", "/v1/kv/x", "GET, PUT, DELETE"),
        ("PATCH", "/v1/kv/a/b", "GET, PUT, DELETE"),
        ("DELETE", "/v1/kv", "POST, GET"),
        ("POST", "/v1/jobs/x", "GET"),
        ("PATCH", "/healthz", "GET"),
        ("PUT", "/readyz", "GET"),
    ] {
        let response = stack
            .request(Method::from_bytes(method.as_bytes()).unwrap(), path)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let what = format!("{method} {path}");
        assert_eq!(response.status(), 405, "{what}");
        assert_eq!(response.headers()["allow"], allow, "{what}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "method_not_allowed", "{what}");
        assert_eq!(problem["status"], 405, "{what}");
    }
    // An unknown path is still a 404, whatever the method.
    let response = stack.request(Method::TRACE, "/nope").send().await.unwrap();
    assert_eq!(response.status(), 404);
}
