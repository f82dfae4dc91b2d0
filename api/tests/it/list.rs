//! `GET /v1/kv?prefix=&limit=&cursor=`: complete, sorted listings whose
//! cost does not grow with the keyspace.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvq_shared::keys;
use kvq_testkit::{Stack, eventually};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Method;
use serde_json::{Value, json};

/// `text` percent-encoded for a path segment or a query value.
fn encoded(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

/// One page: its keys and its `next_cursor`.
async fn page(
    stack: &Stack,
    prefix: &str,
    limit: usize,
    cursor: &str,
) -> (Vec<String>, Option<String>) {
    try_page(stack, prefix, limit, cursor)
        .await
        .unwrap_or_else(|(status, body)| {
            panic!("prefix {prefix:?} cursor {cursor}: {status} {body}")
        })
}

/// One page, or the status and body of a refusal.
pub(crate) async fn try_page(
    stack: &Stack,
    prefix: &str,
    limit: usize,
    cursor: &str,
) -> Result<(Vec<String>, Option<String>), (u16, Value)> {
    let response = stack
        .request(
            Method::GET,
            &format!(
                "/v1/kv?prefix={}&limit={limit}&cursor={cursor}",
                encoded(prefix)
            ),
        )
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status != 200 {
        return Err((status, body));
    }
    let keys = body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    Ok((keys, body["next_cursor"].as_str().map(str::to_owned)))
}

/// Every page of a listing, checking each (see [`add_page`]).
pub(crate) async fn list_all(stack: &Stack, prefix: &str, limit: usize) -> Vec<String> {
    let mut listed: Vec<String> = Vec::new();
    let mut cursor = String::new();
    loop {
        let (keys, next) = page(stack, prefix, limit, &cursor).await;
        add_page(&mut listed, keys, next.is_some(), prefix, limit);
        match next {
            Some(next) => cursor = next,
            None => return listed,
        }
    }
}

/// Adds a page to the keys `listed` so far, checking it: at most `limit`
/// keys, sorted, after the previous page's, and empty only as the last
/// page (`more`: it has a `next_cursor`).
pub(crate) fn add_page(
    listed: &mut Vec<String>,
    keys: Vec<String>,
    more: bool,
    prefix: &str,
    limit: usize,
) {
    let what = format!("prefix {prefix:?} limit {limit} after {:?}", listed.last());
    assert!(keys.len() <= limit, "{what}: {} keys", keys.len());
    assert!(
        !keys.is_empty() || !more,
        "{what}: an empty page before the end"
    );
    let mut in_order = listed.last().into_iter().chain(&keys);
    let mut previous = in_order.next();
    for key in in_order {
        assert!(
            previous.is_none_or(|p| p < key),
            "{what}: {previous:?} then {key:?}"
        );
        previous = Some(key);
    }
    listed.extend(keys);
}

/// Sends a write and waits (`Prefer: wait`) until it is applied.
async fn write(stack: &Stack, method: Method, key: &str, body: Option<Value>) {
    let (path, expected) = match method {
        Method::POST => ("/v1/kv".to_owned(), 201),
        _ => (format!("/v1/kv/{}", encoded(key)), 204),
    };
    let mut request = stack.request(method, &path).header("prefer", "wait=30");
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), expected, "{key}");
}

/// Sends writes from 48 concurrent clients, each waiting until applied.
async fn write_all(stack: &Arc<Stack>, writes: Vec<(Method, String, Option<Value>)>) {
    futures::stream::iter(writes)
        .map(|(method, key, body)| {
            let stack = stack.clone();
            async move { write(&stack, method, &key, body).await }
        })
        .buffer_unordered(48)
        .collect::<Vec<()>>()
        .await;
}

#[tokio::test]
async fn listings_hold_every_live_key_once_sorted_and_never_expired_ones() {
    let stack = Arc::new(Stack::builder().workers(2).start().await);
    // Prefixes that nest (`a`, `a/`, `a/b`, `ab`), multibyte UTF-8, keys
    // whose bytes are near 0xff (U+FFFF is EF BF BF, U+10FFFF F4 8F BF BF),
    // braces (which used to be a hash tag), `%` and spaces.
    let mut created: Vec<String> = ["a", "a/", "a0", "ab", "b", "é", "}{", "{a}", "\u{10FFFF}"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    for i in 0..1_500 {
        created.push(format!("a/{i:04}"));
    }
    for i in 0..300 {
        created.push(format!("a/b{i}"));
        created.push(format!("ab{i}"));
    }
    for i in 0..100 {
        created.push(format!("a/é/{i}"));
        created.push(format!("a/\u{FFFF}{i}"));
        created.push(format!("a/\u{10FFFF}{i}"));
        created.push(format!("\u{10FFFF}/{i}"));
        created.push(format!("a/{{x}} %{i}"));
    }
    let deleted: Vec<String> = (0..20)
        .map(|i| format!("a/{:04}", i * 7))
        .chain((0..10).map(|i| format!("a/b{}", i * 11)))
        .chain(["a/".to_owned(), "\u{10FFFF}/0".to_owned(), "ab".to_owned()])
        .collect();
    let expiring: Vec<String> = (0..20)
        .map(|i| format!("a/ttl/{i}"))
        .chain((0..10).map(|i| format!("ab-ttl{i}")))
        .collect();

    let creates = created
        .iter()
        .map(|k| (Method::POST, k.clone(), Some(json!({"key": k, "value": 1}))))
        .collect();
    write_all(&stack, creates).await;
    let deletes = deleted
        .iter()
        .map(|k| (Method::DELETE, k.clone(), None))
        .collect();
    write_all(&stack, deletes).await;
    // Last, so no later write to their buckets cleans them up before the
    // listing meets them.
    let ttls = expiring
        .iter()
        .map(|k| {
            let body = json!({"key": k, "value": 1, "ttl_seconds": 1});
            (Method::POST, k.clone(), Some(body))
        })
        .collect();
    write_all(&stack, ttls).await;
    eventually(
        Duration::from_secs(10),
        "the 1 s keys to expire",
        || async {
            for key in &expiring {
                if stack.get(&encoded(key)).await.status() != 404 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let indexed = |key: &str| -> bool {
        let index = keys::index_key("kvq", keys::bucket(key));
        stack
            .kv
            .cmd::<Option<String>>(&["ZSCORE", &index, key])
            .is_some()
    };
    // No write to their buckets came after them: the index still holds them,
    // and only the listing's EXISTS check can keep them out.
    let stale = expiring.iter().filter(|k| indexed(k)).count();
    assert!(stale > 0, "every expired key was cleaned up before listing");

    let mut live: Vec<String> = created
        .iter()
        .filter(|k| !deleted.contains(k))
        .cloned()
        .collect();
    live.sort();
    let expected = |prefix: &str| -> Vec<String> {
        live.iter()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    };
    let prefixes = [
        "",
        "a",
        "a/",
        "a/b",
        "ab",
        "a/é/",
        "a/\u{FFFF}",
        "a/\u{10FFFF}",
        "\u{10FFFF}",
        "a/{x} %",
        "a/ttl/",
        "nomatch/",
    ];
    for prefix in prefixes {
        for limit in [7, 64, 1_000] {
            assert_eq!(
                list_all(&stack, prefix, limit).await,
                expected(prefix),
                "prefix {prefix:?}, limit {limit}"
            );
        }
    }
    assert_eq!(list_all(&stack, "a/b", 1).await, expected("a/b"));
    // Listing removed the expired keys it met from the index.
    assert!(
        expiring.iter().all(|k| !indexed(k)),
        "expired keys stay indexed"
    );

    // A data Redis that forgot the list script (a restart, SCRIPT FLUSH)
    // still lists.
    let _: () = stack.kv.cmd(&["SCRIPT", "FLUSH"]);
    assert_eq!(list_all(&stack, "ab", 1_000).await, expected("ab"));

    // A cursor is opaque; any base64url text is a position, anything else
    // is refused.
    for cursor in ["a", "a%2Fb", "YQ%3D%3D", "AAAAA"] {
        let response = stack
            .request(Method::GET, &format!("/v1/kv?cursor={cursor}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "cursor {cursor}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_request");
    }
}

#[tokio::test]
async fn a_page_costs_the_data_redis_little_whatever_the_keyspace_holds() {
    const KEYS: usize = 100_000;
    const REQUESTS: u32 = 50;
    let stack = Stack::start().await;
    // Straight into the data Redis, as the apply script writes them.
    stack
        .kv
        .seed_keys((0..KEYS).map(|i| format!("users/{i:06}/name")));
    let nomatch = |stack: &Stack| {
        let request = stack.request(Method::GET, "/v1/kv?prefix=nomatch/&limit=1000");
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body, json!({"keys": [], "next_cursor": null}));
        }
    };
    nomatch(&stack).await; // loads the script

    let before = stack.kv.cpu_seconds();
    for _ in 0..REQUESTS {
        nomatch(&stack).await;
    }
    let per_request_ms = (stack.kv.cpu_seconds() - before) * 1_000.0 / f64::from(REQUESTS);
    println!("data Redis CPU per non-matching page over {KEYS} keys: {per_request_ms:.3} ms");
    assert!(
        per_request_ms < 2.0,
        "a non-matching page cost the data Redis {per_request_ms:.3} ms of CPU"
    );

    // A full page of the same keyspace, for the record.
    let before = stack.kv.cpu_seconds();
    let (keys, next) = page(&stack, "users/", 1_000, "").await;
    let full_ms = (stack.kv.cpu_seconds() - before) * 1_000.0;
    println!("data Redis CPU for a page of 1000 keys: {full_ms:.3} ms");
    let first: Vec<String> = (0..1_000).map(|i| format!("users/{i:06}/name")).collect();
    assert_eq!(keys, first);
    assert!(next.is_some());
    let index_bytes: u64 = (0..keys::BUCKETS)
        .map(|b| {
            stack
                .kv
                .cmd::<Option<u64>>(&[
                    "MEMORY",
                    "USAGE",
                    &keys::index_key("kvq", b),
                    "SAMPLES",
                    "0",
                ])
                .unwrap_or(0)
        })
        .sum();
    println!(
        "index memory: {:.1} bytes per key",
        index_bytes as f64 / KEYS as f64
    );
}

#[tokio::test]
async fn thousands_of_expired_keys_in_a_row_never_make_an_empty_page() {
    let stack = Stack::start().await;
    // Index entries whose value Redis has expired and no apply has cleaned
    // up yet: about 300 per bucket, far more than a bucket examines for one
    // page; then three live keys after them.
    let mut conn = stack.kv.conn();
    let mut pipe = redis::pipe();
    for i in 0..20_000 {
        let key = format!("gone/{i:05}");
        let index = keys::index_key("kvq", keys::bucket(&key));
        pipe.cmd("ZADD").arg(index).arg(0).arg(key).ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    let live: Vec<String> = (0..3).map(|i| format!("gone/z{i}")).collect();
    stack.kv.seed_keys(live.clone());

    let (first, next) = page(&stack, "gone/", 7, "").await;
    assert_eq!((first, next), (live.clone(), None));
    assert_eq!(list_all(&stack, "gone/", 7).await, live);
    let indexed: u64 = (0..keys::BUCKETS)
        .map(|b| stack.kv.cmd::<u64>(&["ZCARD", &keys::index_key("kvq", b)]))
        .sum();
    assert_eq!(indexed, 3, "the expired entries met were removed");
}

#[tokio::test]
async fn a_listing_answers_503_while_the_data_redis_is_down() {
    let mut stack = Stack::start().await;
    stack.kv.stop();
    let response = stack
        .request(Method::GET, "/v1/kv?prefix=a/")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "backend_unavailable");
}
