//! The success paths of `/v1/kv`.

use kvq_shared::keys::value_key;
use kvq_testkit::Stack;
use reqwest::Method;
use reqwest::header::{ETAG, IF_NONE_MATCH, LOCATION};
use serde_json::{Value, json};

#[tokio::test]
async fn create_answers_202_with_the_job_and_then_reads_back() {
    let stack = Stack::start().await;
    let response = stack
        .create("greeting", json!({"text": "hello", "n": [1, 2]}))
        .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()[LOCATION].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "queued");
    assert_eq!(body["op"], "create");
    assert_eq!(body["key"], "greeting");
    assert!(body["seq"].as_u64().is_some_and(|seq| seq > 0), "{body}");
    let job_id = body["job_id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/jobs/{job_id}"));

    let job = stack.wait_job(job_id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({"outcome": "created", "version": 1}));

    let read = stack.get("greeting").await;
    assert_eq!(read.status(), 200);
    assert_eq!(read.headers()[ETAG], "\"1\"");
    let body: Value = read.json().await.unwrap();
    assert_eq!(body["key"], "greeting");
    assert_eq!(body["value"], json!({"text": "hello", "n": [1, 2]}));
    assert_eq!(body["version"], 1);
    assert_eq!(body["expires_at"], Value::Null);
    assert!(
        body["updated_at"].as_str().unwrap().ends_with('Z'),
        "{body}"
    );
}

#[tokio::test]
async fn versions_grow_on_every_write_and_never_repeat() {
    let stack = Stack::start().await;
    let version = |job: Value| job["result"]["version"].as_u64().unwrap();

    let created = stack.finished(stack.create("k", json!(1)).await).await;
    assert_eq!(version(created), 1);
    let updated = stack
        .finished(stack.put("k", json!({"value": 2})).await)
        .await;
    assert_eq!(
        updated["result"],
        json!({"outcome": "updated", "version": 2})
    );
    let read: Value = stack.get("k").await.json().await.unwrap();
    assert_eq!(
        (read["value"].clone(), read["version"].clone()),
        (json!(2), json!(2))
    );

    let deleted = stack.finished(stack.delete("k").await).await;
    assert_eq!(
        deleted["result"],
        json!({"outcome": "deleted", "version": 3})
    );
    assert_eq!(stack.get("k").await.status(), 404);

    let recreated = stack
        .finished(stack.create("k", json!("again")).await)
        .await;
    assert_eq!(version(recreated), 4);
    let read = stack.get("k").await;
    assert_eq!(read.headers()[ETAG], "\"4\"");
}

#[tokio::test]
async fn upsert_creates_an_absent_key_and_plain_update_does_not() {
    let stack = Stack::start().await;
    let plain = stack
        .finished(stack.put("fresh", json!({"value": 1})).await)
        .await;
    assert_eq!(plain["status"], "failed");
    assert_eq!(plain["error"]["code"], "not_found");

    let upsert = stack
        .finished(stack.put("fresh?upsert=true", json!({"value": 1})).await)
        .await;
    assert_eq!(upsert["status"], "succeeded", "{upsert}");
    assert_eq!(upsert["op"], "upsert");
    assert_eq!(upsert["result"]["outcome"], "created");
    let again = stack
        .finished(stack.put("fresh?upsert=true", json!({"value": 2})).await)
        .await;
    assert_eq!(again["result"], json!({"outcome": "updated", "version": 2}));
    let read: Value = stack.get("fresh").await.json().await.unwrap();
    assert_eq!(read["value"], 2);
}

#[tokio::test]
async fn keys_may_hold_slashes_braces_and_any_utf8() {
    let stack = Stack::start().await;
    for (key, path) in [
        ("users/42/name", "users/42/name"),
        ("café", "caf%C3%A9"),
        ("a/b%2Fc", "a%2Fb%252Fc"),
        ("}{tag}", "%7D%7Btag%7D"),
        ("with space", "with%20space"),
    ] {
        let job = stack.finished(stack.create(key, json!(key)).await).await;
        assert_eq!(job["status"], "succeeded", "{key}: {job}");
        let read = stack.get(path).await;
        assert_eq!(read.status(), 200, "GET {path}");
        let body: Value = read.json().await.unwrap();
        assert_eq!(body["key"], key);
        assert_eq!(body["value"], key);
        let deleted = stack.finished(stack.delete(path).await).await;
        assert_eq!(deleted["result"]["outcome"], "deleted", "{key}");
    }
    // The query string is not part of the key.
    stack.finished(stack.create("q", json!(1)).await).await;
    assert_eq!(stack.get("q?x=1").await.status(), 200);
}

#[tokio::test]
async fn etag_and_if_none_match_give_304() {
    let stack = Stack::start().await;
    stack.finished(stack.create("e", json!("v1")).await).await;
    let first = stack.get("e").await;
    let etag = first.headers()[ETAG].clone();
    let again = stack
        .request(Method::GET, "/v1/kv/e")
        .header(IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()[ETAG], etag);
    assert!(again.bytes().await.unwrap().is_empty());

    stack
        .finished(stack.put("e", json!({"value": "v2"})).await)
        .await;
    let changed = stack
        .request(Method::GET, "/v1/kv/e")
        .header(IF_NONE_MATCH, etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    assert_eq!(changed.headers()[ETAG], "\"2\"");
    let star = stack
        .request(Method::GET, "/v1/kv/e")
        .header(IF_NONE_MATCH, "*")
        .send()
        .await
        .unwrap();
    assert_eq!(star.status(), 304);
}

#[tokio::test]
async fn list_by_prefix_pages_through_every_key() {
    let stack = Stack::start().await;
    let mut expected = Vec::new();
    for i in 0..25 {
        let key = format!("list/{i:02}");
        stack.finished(stack.create(&key, json!(i)).await).await;
        expected.push(key);
    }
    stack.finished(stack.create("other", json!(0)).await).await;

    let mut seen = Vec::new();
    let mut cursor = String::new();
    for _ in 0..50 {
        let page: Value = stack
            .request(
                Method::GET,
                &format!("/v1/kv?prefix=list/&limit=10&cursor={cursor}"),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for key in page["keys"].as_array().unwrap() {
            seen.push(key.as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn writes_to_one_key_apply_in_the_order_they_were_accepted() {
    let stack = Stack::builder()
        .env("KVQ_WORKER_CONCURRENCY", "16")
        .workers(2)
        .start()
        .await;
    let (mut last, mut last_seq) = (None, 0);
    for i in 0..60 {
        let response = stack.put("ordered?upsert=true", json!({"value": i})).await;
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        // Each accepted write's seq is greater than the one before (gaps
        // are allowed).
        let seq = body["seq"].as_u64().unwrap_or(0);
        assert!(seq > last_seq, "write {i}: seq {seq} after {last_seq}");
        last_seq = seq;
        last = Some(body["job_id"].as_str().unwrap().to_owned());
    }
    let job = stack.wait_job(&last.unwrap()).await;
    assert_eq!(job["result"], json!({"outcome": "updated", "version": 60}));
    let read: Value = stack.get("ordered").await.json().await.unwrap();
    assert_eq!(read["value"], 59);
    assert_eq!(read["version"], 60);
}

#[tokio::test]
async fn ttl_sets_expires_at_an_update_without_it_clears_it_and_keys_expire() {
    let stack = Stack::start().await;
    let job = stack
        .finished(
            stack
                .request(Method::POST, "/v1/kv")
                .json(&json!({"key": "t", "value": 1, "ttl_seconds": 3600}))
                .send()
                .await
                .unwrap(),
        )
        .await;
    assert_eq!(job["status"], "succeeded");
    let read: Value = stack.get("t").await.json().await.unwrap();
    let expires = read["expires_at"].as_str().unwrap().to_owned();
    assert!(
        expires.as_str() > read["updated_at"].as_str().unwrap(),
        "{read}"
    );
    let ttl: i64 = stack.kv.cmd(&["TTL", &value_key("kvq", "t")]);
    assert!((3590..=3600).contains(&ttl), "Redis TTL {ttl}");

    stack
        .finished(stack.put("t", json!({"value": 2})).await)
        .await;
    let read: Value = stack.get("t").await.json().await.unwrap();
    assert_eq!(read["expires_at"], Value::Null);
    let ttl: i64 = stack.kv.cmd(&["TTL", &value_key("kvq", "t")]);
    assert_eq!(ttl, -1, "an update without ttl_seconds clears the TTL");

    stack
        .finished(stack.put("t", json!({"value": 3, "ttl_seconds": 1})).await)
        .await;
    kvq_testkit::eventually(
        std::time::Duration::from_secs(5),
        "the key to expire",
        || async { (stack.get("t").await.status() == 404).then_some(()) },
    )
    .await;
    // Expiry keeps the version counter: a re-create continues from it.
    let job = stack.finished(stack.create("t", json!(4)).await).await;
    assert_eq!(job["result"], json!({"outcome": "created", "version": 4}));
}

#[tokio::test]
async fn ttl_seconds_takes_any_whole_number_as_json_schema_integers_do() {
    // The OpenAPI document says `integer`; JSON Schema counts 60.0 and 6e1
    // as integers (schemathesis sent 609261.0 and got a 422).
    let stack = Stack::start().await;
    for (key, ttl) in [("w1", "60.0"), ("w2", "6e1")] {
        let accepted = stack
            .request(Method::POST, "/v1/kv")
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"key":"{key}","value":1,"ttl_seconds":{ttl}}}"#
            ))
            .send()
            .await
            .unwrap();
        let job = stack.finished(accepted).await;
        assert_eq!(job["status"], "succeeded", "ttl_seconds {ttl}");
        let ttl: i64 = stack.kv.cmd(&["TTL", &value_key("kvq", key)]);
        assert!((55..=60).contains(&ttl), "Redis TTL {ttl}");
    }
    for ttl in ["1.5", "-60.0", "0.0", "1e300", "null"] {
        let response = stack
            .request(Method::PUT, "/v1/kv/w1")
            .header("content-type", "application/json")
            .body(format!(r#"{{"value":2,"ttl_seconds":{ttl}}}"#))
            .send()
            .await
            .unwrap();
        let expected = if ttl == "null" { 202 } else { 422 };
        assert_eq!(response.status(), expected, "ttl_seconds {ttl}");
    }
}
