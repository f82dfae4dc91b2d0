//! The original FastAPI service's routes: `/create`, `/read`, `/update`,
//! `/delete`, answering as it did, interoperating with `/v1`, switched off
//! by `KVQ_LEGACY_ROUTES=false`, and guarded by the same roles.

use std::time::Duration;

use kvq_testkit::{Stack, eventually};
use reqwest::{Method, Response};
use serde_json::{Value, json};

/// Sends a legacy request; `path` is sent as given (already encoded).
async fn call(stack: &Stack, method: Method, path: &str) -> Response {
    stack.request(method, path).send().await.unwrap()
}

/// Checks a legacy write's 200 `{"message":"Task submitted","task_id"}` and
/// returns the task id.
async fn task_id(response: Response) -> String {
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let id = body["task_id"].as_str().unwrap().to_owned();
    assert_eq!(
        body,
        json!({"message": "Task submitted", "task_id": id}),
        "exactly the old body"
    );
    assert!(uuid_like(&id), "{id}");
    id
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| {
            matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
        })
}

/// The body of a 200 `/read`.
async fn read_ok(stack: &Stack, path: &str) -> Value {
    let response = call(stack, Method::GET, path).await;
    assert_eq!(response.status(), 200, "GET {path}");
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

async fn read_not_found(stack: &Stack, path: &str) {
    let response = call(stack, Method::GET, path).await;
    assert_eq!(response.status(), 404, "GET {path}");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"detail": "Key not found"}));
}

#[tokio::test]
async fn create_read_update_delete_answer_as_the_old_service_did() {
    let stack = Stack::start().await;
    read_not_found(&stack, "/read/greeting").await;

    let id = task_id(call(&stack, Method::POST, "/create/greeting?value=hello").await).await;
    let job = stack.wait_job(&id).await;
    assert_eq!(job["op"], "create");
    assert_eq!(
        job["result"],
        json!({"outcome": "created", "version": 1}),
        "{job}"
    );
    assert_eq!(
        read_ok(&stack, "/read/greeting").await,
        json!({"key": "greeting", "value": "hello"})
    );

    let id = task_id(call(&stack, Method::PUT, "/update/greeting?value=hello%20again").await).await;
    assert_eq!(stack.wait_job(&id).await["result"]["outcome"], "updated");
    assert_eq!(
        read_ok(&stack, "/read/greeting").await,
        json!({"key": "greeting", "value": "hello again"})
    );

    let id = task_id(call(&stack, Method::DELETE, "/delete/greeting").await).await;
    assert_eq!(stack.wait_job(&id).await["result"]["outcome"], "deleted");
    read_not_found(&stack, "/read/greeting").await;

    // Keys are the rest of the path, percent-decoded, as on /v1; an empty
    // value is a value.
    let id = task_id(call(&stack, Method::POST, "/create/users/42/caf%C3%A9?value=").await).await;
    assert_eq!(stack.wait_job(&id).await["status"], "succeeded");
    assert_eq!(
        read_ok(&stack, "/read/users/42/caf%C3%A9").await,
        json!({"key": "users/42/café", "value": ""})
    );
}

#[tokio::test]
async fn legacy_and_v1_see_the_same_keys_and_jobs() {
    let stack = Stack::start().await;
    // Legacy write → /v1 read: the value is a JSON string.
    let id = task_id(call(&stack, Method::POST, "/create/n?value=42").await).await;
    stack.wait_job(&id).await;
    let read: Value = stack.get("n").await.json().await.unwrap();
    assert_eq!(
        (read["value"].clone(), read["version"].clone()),
        (json!("42"), json!(1))
    );

    // /v1 write → legacy read: a string as itself, other JSON as its text.
    stack
        .finished(stack.create("obj", json!({"a": [1, 2]})).await)
        .await;
    assert_eq!(
        read_ok(&stack, "/read/obj").await,
        json!({"key": "obj", "value": "{\"a\":[1,2]}"})
    );
    stack
        .finished(stack.put("n", json!({"value": "forty-two"})).await)
        .await;
    assert_eq!(read_ok(&stack, "/read/n").await["value"], "forty-two");

    // Writes that cannot apply are still accepted with 200 (the old service
    // queued blindly too); the outcome is on the job.
    for (method, path, code) in [
        (Method::POST, "/create/n?value=again", "already_exists"),
        (Method::PUT, "/update/absent?value=x", "not_found"),
        (Method::DELETE, "/delete/absent", "not_found"),
    ] {
        let id = task_id(call(&stack, method.clone(), path).await).await;
        let job = stack.wait_job(&id).await;
        assert_eq!(
            (job["status"].as_str(), job["error"]["code"].as_str()),
            (Some("failed"), Some(code)),
            "{method} {path}: {job}"
        );
    }
    assert_eq!(read_ok(&stack, "/read/n").await["value"], "forty-two");
    read_not_found(&stack, "/read/absent").await;

    // If-Match works as on /v1: a stale version fails the job.
    let stale = stack
        .request(Method::PUT, "/update/n?value=stale")
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    let job = stack.wait_job(&task_id(stale).await).await;
    assert_eq!(job["error"]["code"], "version_mismatch", "{job}");
    assert_eq!(read_ok(&stack, "/read/n").await["value"], "forty-two");

    // Idempotency-Key works as on /v1: the repeat gets the same task.
    let send = || {
        stack
            .request(Method::PUT, "/update/n?value=once")
            .header("idempotency-key", "legacy-once")
            .send()
    };
    let first = task_id(send().await.unwrap()).await;
    let repeat = send().await.unwrap();
    assert_eq!(repeat.headers()["idempotent-replayed"], "true");
    assert_eq!(task_id(repeat).await, first);
    let job = stack.wait_job(&first).await;
    assert_eq!(job["result"], json!({"outcome": "updated", "version": 3}));
}

#[tokio::test]
async fn a_missing_value_is_fastapis_422_and_bad_keys_are_problems() {
    let stack = Stack::start().await;
    for (method, path) in [
        (Method::POST, "/create/k"),
        (Method::PUT, "/update/k"),
        (Method::POST, "/create/k?other=1"),
    ] {
        let response = call(&stack, method.clone(), path).await;
        assert_eq!(response.status(), 422, "{method} {path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"detail": [{"type": "missing", "loc": ["query", "value"], "msg": "Field required", "input": null}]}),
            "{method} {path}"
        );
    }
    let long = "k".repeat(513);
    for (method, path, status, code) in [
        (
            Method::POST,
            format!("/create/{long}?value=x"),
            400,
            "invalid_key",
        ),
        (
            Method::POST,
            "/create/a%0Ab?value=x".to_owned(),
            400,
            "invalid_key",
        ),
        (Method::GET, "/read/".to_owned(), 400, "invalid_key"),
        (
            Method::GET,
            "/create/k".to_owned(),
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/read/k".to_owned(),
            405,
            "method_not_allowed",
        ),
    ] {
        let response = call(&stack, method.clone(), &path).await;
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code, "{method} {path}");
    }
    assert_eq!(stack.kv.keys(), Vec::<String>::new(), "nothing was stored");
}

#[tokio::test]
async fn kvq_legacy_routes_false_turns_them_off() {
    let stack = Stack::builder()
        .env("KVQ_LEGACY_ROUTES", "false")
        .secured()
        .start()
        .await;
    // Unknown paths, so 404 even without a token.
    for (method, path) in [
        (Method::POST, "/create/k?value=1"),
        (Method::GET, "/read/k"),
        (Method::PUT, "/update/k?value=1"),
        (Method::DELETE, "/delete/k"),
    ] {
        let response = call(&stack, method.clone(), path).await;
        assert_eq!(response.status(), 404, "{method} {path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "not_found", "{method} {path}");
    }
    let created = stack
        .request(Method::POST, "/v1/kv")
        .bearer_auth(token("writer"))
        .json(&json!({"key": "k", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 202, "/v1 still works");
}

fn token(role: &str) -> String {
    kvq_testkit::token(&[role])
}

#[tokio::test]
async fn legacy_routes_need_the_same_roles_as_v1() {
    let stack = Stack::builder().secured().start().await;
    let (reader, writer) = (token("reader"), token("writer"));
    let routes = [
        (Method::GET, "/read/k", false),
        (Method::POST, "/create/k?value=1", true),
        (Method::PUT, "/update/k?value=2", true),
        (Method::DELETE, "/delete/k", true),
    ];
    for (method, path, writes) in routes {
        let response = call(&stack, method.clone(), path).await;
        assert_eq!(response.status(), 401, "{method} {path} without a token");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "unauthorized");

        let as_reader = stack
            .request(method.clone(), path)
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        if writes {
            assert_eq!(as_reader.status(), 403, "{method} {path} as reader");
            let problem: Value = as_reader.json().await.unwrap();
            assert_eq!(problem["code"], "forbidden");
        } else {
            assert_eq!(as_reader.status(), 404, "{method} {path} as reader");
        }
    }
    assert_eq!(stack.kv.keys(), Vec::<String>::new(), "nothing was stored");

    let created = stack
        .request(Method::POST, "/create/k?value=1")
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    let id = task_id(created).await;
    let job = stack
        .request(Method::GET, &format!("/v1/jobs/{id}"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(job.status(), 200);
    let read = eventually(Duration::from_secs(15), "the create to apply", || async {
        let read = stack
            .request(Method::GET, "/read/k")
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        if read.status() == 200 {
            Some(read.json::<Value>().await.unwrap())
        } else {
            None
        }
    })
    .await;
    assert_eq!(read, json!({"key": "k", "value": "1"}));
}
