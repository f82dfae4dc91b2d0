//! Bad input gets a clear 4xx problem+json and changes nothing.

use kvq_testkit::Stack;
use reqwest::Method;
use serde_json::{Value, json};

/// Sends a request and checks it is rejected with `status` and `code`.
async fn rejected(
    stack: &Stack,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Option<String>,
    status: u16,
    code: &str,
) {
    let mut what = format!("{method} {path}");
    if let Some(body) = &body {
        what.push_str(&format!(" {}", &body[..body.len().min(80)]));
    }
    let mut request = stack.request(method, path);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), status, "{what}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{what}"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], code, "{what}: {problem}");
    assert_eq!(problem["status"], status, "{what}");
    assert!(
        problem["title"].is_string() && problem["type"].is_string(),
        "{what}"
    );
    let detail = problem["detail"].as_str().unwrap();
    assert!(!detail.is_empty(), "{what}");
    assert!(!detail.to_lowercase().contains("redis"), "{what}: {detail}");
}

const JSON: Option<&str> = Some("application/json");

/// One request that must be rejected.
struct Case {
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Option<String>,
    status: u16,
    code: &'static str,
}

fn post(body: impl ToString, status: u16, code: &'static str) -> Case {
    Case {
        method: Method::POST,
        path: "/v1/kv".into(),
        content_type: JSON,
        body: Some(body.to_string()),
        status,
        code,
    }
}

fn put(path: &str, body: impl ToString, status: u16, code: &'static str) -> Case {
    Case {
        method: Method::PUT,
        path: path.into(),
        content_type: JSON,
        body: Some(body.to_string()),
        status,
        code,
    }
}

fn bodiless(method: Method, path: &str, status: u16, code: &'static str) -> Case {
    Case {
        method,
        path: path.into(),
        content_type: None,
        body: None,
        status,
        code,
    }
}

#[tokio::test]
async fn bad_writes_are_rejected_and_store_nothing() {
    let stack = Stack::builder()
        .env("KVQ_MAX_VALUE_BYTES", "1024")
        .start()
        .await;
    let long_key = "k".repeat(513);
    let big_value = format!("\"{}\"", "x".repeat(1100));
    let value_1 = json!({"value": 1});
    let cases = [
        // keys
        post(json!({"key": "", "value": 1}), 400, "invalid_key"),
        post(json!({"key": long_key, "value": 1}), 400, "invalid_key"),
        post(json!({"key": "a\u{0}b", "value": 1}), 400, "invalid_key"),
        post(json!({"key": "a\nb", "value": 1}), 400, "invalid_key"),
        put(&format!("/v1/kv/{long_key}"), &value_1, 400, "invalid_key"),
        put("/v1/kv/a%00b", &value_1, 400, "invalid_key"),
        put("/v1/kv/a%FFb", &value_1, 400, "invalid_key"),
        bodiless(Method::DELETE, "/v1/kv/a%1Fb", 400, "invalid_key"),
        bodiless(Method::DELETE, "/v1/kv/", 400, "invalid_key"),
        bodiless(Method::GET, "/v1/kv/%C3%28", 400, "invalid_key"),
        bodiless(
            Method::GET,
            &format!("/v1/kv/{}", "k".repeat(5000)),
            400,
            "invalid_key",
        ),
        // bodies
        post("{\"key\": \"a\"", 400, "malformed_json"),
        post("not json", 400, "malformed_json"),
        post(
            format!("{}1{}", "[".repeat(200), "]".repeat(200)),
            422,
            "invalid_body",
        ),
        post(
            format!(
                "{{\"key\":\"a\",\"value\":{}1{}}}",
                "[".repeat(200),
                "]".repeat(200)
            ),
            400,
            "malformed_json",
        ),
        post("{\"key\":\"a\",\"value\":1e999}", 400, "malformed_json"),
        post(json!({"key": "a"}), 422, "invalid_body"),
        post(json!({"value": 1}), 422, "invalid_body"),
        post(json!({"key": 5, "value": 1}), 422, "invalid_body"),
        post(
            json!({"key": "a", "value": 1, "extra": 1}),
            422,
            "invalid_body",
        ),
        post(
            json!({"key": "a", "value": 1, "ttl_seconds": 0}),
            422,
            "invalid_body",
        ),
        post(
            json!({"key": "a", "value": 1, "ttl_seconds": -5}),
            422,
            "invalid_body",
        ),
        post(
            json!({"key": "a", "value": 1, "ttl_seconds": 31_536_001}),
            422,
            "invalid_body",
        ),
        post(
            json!({"key": "a", "value": 1, "ttl_seconds": "10"}),
            422,
            "invalid_body",
        ),
        put(
            "/v1/kv/a",
            json!({"value": 1, "ttl_seconds": 0}),
            422,
            "invalid_body",
        ),
        put("/v1/kv/a", "{}", 422, "invalid_body"),
        put("/v1/kv/a?upsert=maybe", &value_1, 400, "invalid_request"),
        // sizes and media types
        post(
            format!("{{\"key\":\"a\",\"value\":{big_value}}}"),
            413,
            "value_too_large",
        ),
        put(
            "/v1/kv/a",
            format!("{{\"value\":{big_value}}}"),
            413,
            "value_too_large",
        ),
        post(
            format!("{{\"key\":\"a\",\"value\":\"{}\"}}", "y".repeat(70 * 1024)),
            413,
            "value_too_large",
        ),
        Case {
            content_type: Some("text/plain"),
            ..post(
                json!({"key": "a", "value": 1}),
                415,
                "unsupported_media_type",
            )
        },
    ];
    for case in cases {
        rejected(
            &stack,
            case.method,
            &case.path,
            case.content_type,
            case.body,
            case.status,
            case.code,
        )
        .await;
    }
    for if_match in ["3", "\"abc\"", "W/\"3\"", "\"-1\""] {
        let response = stack
            .request(Method::PUT, "/v1/kv/a")
            .header("if-match", if_match)
            .json(&json!({"value": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "If-Match: {if_match}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_request");
    }

    // Nothing was stored and nothing was queued.
    assert_eq!(stack.kv.keys(), Vec::<String>::new());
    assert_eq!(
        stack
            .queue
            .keys()
            .iter()
            .filter(|k| k.contains(":job:"))
            .count(),
        0
    );
}

#[tokio::test]
async fn the_default_value_limit_is_one_mebibyte() {
    let stack = Stack::start().await;
    let just_under = format!("\"{}\"", "v".repeat(1_048_576 - 2));
    let accepted = stack
        .request(Method::POST, "/v1/kv")
        .header("content-type", "application/json")
        .body(format!("{{\"key\":\"big\",\"value\":{just_under}}}"))
        .send()
        .await
        .unwrap();
    let job = stack.finished(accepted).await;
    assert_eq!(job["status"], "succeeded");
    let over = format!("\"{}\"", "v".repeat(1_048_576 - 1));
    rejected(
        &stack,
        Method::POST,
        "/v1/kv",
        JSON,
        Some(format!("{{\"key\":\"big2\",\"value\":{over}}}")),
        413,
        "value_too_large",
    )
    .await;
    assert_eq!(stack.get("big2").await.status(), 404);
    let read: Value = stack.get("big").await.json().await.unwrap();
    assert_eq!(read["value"].as_str().unwrap().len(), 1_048_576 - 2);
}

#[tokio::test]
async fn unknown_routes_methods_and_keys_are_problems() {
    let stack = Stack::start().await;
    rejected(&stack, Method::GET, "/nope", None, None, 404, "not_found").await;
    rejected(
        &stack,
        Method::PATCH,
        "/v1/kv/a",
        None,
        None,
        405,
        "method_not_allowed",
    )
    .await;
    rejected(
        &stack,
        Method::DELETE,
        "/v1/kv",
        None,
        None,
        405,
        "method_not_allowed",
    )
    .await;
    rejected(
        &stack,
        Method::GET,
        "/v1/kv/missing",
        None,
        None,
        404,
        "not_found",
    )
    .await;
    rejected(
        &stack,
        Method::GET,
        "/v1/kv?limit=0",
        None,
        None,
        400,
        "invalid_request",
    )
    .await;
    rejected(
        &stack,
        Method::GET,
        "/v1/kv?cursor=zzzzz",
        None,
        None,
        400,
        "invalid_request",
    )
    .await;
}

/// Method, path, headers, body.
type Hostile = (Method, String, Vec<(&'static str, String)>, Option<String>);

#[tokio::test]
async fn hostile_requests_get_a_4xx_and_store_nothing() {
    let stack = Stack::start().await;
    let key_5000 = "k".repeat(5000);
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let paths_and_bodies: Vec<Hostile> = vec![
        // Invalid UTF-8 and control characters wherever text goes.
        (Method::GET, "/v1/kv/%FF%FE".into(), vec![], None),
        (Method::GET, "/v1/jobs/%FF".into(), vec![], None),
        (Method::POST, "/v1/jobs/%00/retry".into(), vec![], None),
        (Method::GET, "/read/%FF".into(), vec![], None),
        (Method::POST, "/create/a%00b?value=1".into(), vec![], None),
        (Method::DELETE, "/v1/kv/%00".into(), vec![], None),
        // 5,000-byte keys, in paths and in bodies.
        (
            Method::PUT,
            format!("/v1/kv/{key_5000}"),
            vec![],
            Some("{\"value\":1}".into()),
        ),
        (Method::DELETE, format!("/delete/{key_5000}"), vec![], None),
        (
            Method::POST,
            "/v1/kv".into(),
            vec![],
            Some(format!("{{\"key\":\"{key_5000}\",\"value\":1}}")),
        ),
        // Bodies: 100,000 levels of nesting, numbers beyond f64, NUL bytes,
        // invalid UTF-8, negative and absurd TTLs.
        (
            Method::POST,
            "/v1/kv".into(),
            vec![],
            Some(format!("{{\"key\":\"d\",\"value\":{deep}}}")),
        ),
        (
            Method::PUT,
            "/v1/kv/d".into(),
            vec![],
            Some(format!("{{\"value\":{deep}}}")),
        ),
        (
            Method::POST,
            "/v1/kv".into(),
            vec![],
            Some("{\"key\":\"n\",\"value\":-1e400}".into()),
        ),
        (
            Method::POST,
            "/v1/kv".into(),
            vec![],
            Some("{\"key\":\"n\",\"value\":1,\"ttl_seconds\":1e400}".into()),
        ),
        (
            Method::POST,
            "/v1/kv".into(),
            vec![],
            Some("{\"key\":\"n\",\"value\":1,\"ttl_seconds\":99999999999999999999999}".into()),
        ),
        (
            Method::POST,
            "/v1/kv".into(),
            vec![],
            Some("{\"key\":\"n\",\"value\":1,\"ttl_seconds\":-1}".into()),
        ),
        (
            Method::POST,
            "/v1/kv".into(),
            vec![],
            Some("{\"key\":\"\\u0000\",\"value\":1}".into()),
        ),
        (
            Method::POST,
            "/v1/kv".into(),
            vec![],
            Some("{\"key\":\"n\",\"value\":\"\u{0}\"}".into()),
        ),
        // Headers: garbage If-Match, Prefer, Idempotency-Key; query garbage.
        (
            Method::PUT,
            "/v1/kv/h".into(),
            vec![("if-match", "\"18446744073709551616\"".into())],
            Some("{\"value\":1}".into()),
        ),
        (
            Method::DELETE,
            "/v1/kv/h".into(),
            vec![("if-match", "\"1\", \"2\"".into())],
            None,
        ),
        (
            Method::DELETE,
            "/v1/kv/h".into(),
            vec![("if-match", "*".repeat(3000))],
            None,
        ),
        (
            Method::POST,
            "/v1/kv".into(),
            vec![("idempotency-key", "x".repeat(300))],
            Some("{\"key\":\"i\",\"value\":1}".into()),
        ),
        (Method::GET, "/v1/kv?limit=-1".into(), vec![], None),
        (
            Method::GET,
            "/v1/kv?limit=99999999999999999999999".into(),
            vec![],
            None,
        ),
        (
            Method::GET,
            "/v1/jobs?status=dead&cursor=-1".into(),
            vec![],
            None,
        ),
        (
            Method::GET,
            "/v1/jobs?status=dead&cursor=99999999999999999999999".into(),
            vec![],
            None,
        ),
        (
            Method::PUT,
            "/v1/kv/q?upsert=true&upsert=false".into(),
            vec![],
            Some("{\"value\":1}".into()),
        ),
    ];
    for (method, path, headers, body) in paths_and_bodies {
        let what = format!("{method} {:.60} {headers:?}", path);
        let mut request = stack.request(method, &path);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        assert!((400..500).contains(&status), "{what}: {status}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.text().await.unwrap();
        assert!(!body.to_lowercase().contains("redis"), "{what}: {body}");
        if path.starts_with("/v1") {
            assert_eq!(content_type, "application/problem+json", "{what}");
        }
    }
    // Query strings are decoded leniently (invalid UTF-8 becomes U+FFFD), so a
    // prefix that is not UTF-8 is a prefix no key has.
    let listed: Value = stack
        .request(Method::GET, "/v1/kv?prefix=%FF")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["keys"], json!([]));
    // A body that is not UTF-8 at all.
    let response = stack
        .request(Method::POST, "/v1/kv")
        .header("content-type", "application/json")
        .body(b"{\"key\":\"u\",\"value\":\"\xff\xfe\"}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(stack.kv.keys(), Vec::<String>::new());
    assert!(
        !stack.queue.keys().iter().any(|k| k.contains(":job:")),
        "{:?}",
        stack.queue.keys()
    );
}
