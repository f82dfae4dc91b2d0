//! Bearer tokens and roles: the 401/403 matrix, bad tokens, Keycloak's
//! claim layout, token minting, and the refusal to start without a key.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use kvq_testkit::auth::{exp_in, sign};
use kvq_testkit::{KvqProcess, Stack, TEST_JWT_SECRET, token};
use reqwest::Method;
use serde_json::{Value, json};

const SECRET: &str = TEST_JWT_SECRET;

async fn secured() -> Stack {
    Stack::builder().secured().start().await
}

/// Status and problem code of a request with `token`.
async fn call(
    stack: &Stack,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> (u16, Option<String>) {
    let mut request = stack.request(method.clone(), path);
    if method == Method::POST {
        request = request.json(&json!({"key": "k", "value": 1}));
    } else if method == Method::PUT {
        request = request.json(&json!({"value": 1}));
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let code = if response
        .headers()
        .get("content-type")
        .is_some_and(|c| c == "application/problem+json")
    {
        response.json::<Value>().await.unwrap()["code"]
            .as_str()
            .map(str::to_owned)
    } else {
        None
    };
    (status, code)
}

#[tokio::test]
async fn each_role_reaches_exactly_its_routes() {
    let stack = secured().await;
    let (reader, writer, admin) = (token(&["reader"]), token(&["writer"]), token(&["admin"]));
    let routes = [
        (Method::GET, "/v1/kv/k", "reader"),
        (Method::GET, "/v1/kv?prefix=", "reader"),
        (
            Method::GET,
            "/v1/jobs/0198c3d2-0000-7000-8000-000000000000",
            "reader",
        ),
        (Method::POST, "/v1/kv", "writer"),
        (Method::PUT, "/v1/kv/k?upsert=true", "writer"),
        (Method::DELETE, "/v1/kv/k", "writer"),
        (Method::GET, "/v1/jobs?status=dead", "admin"),
        (
            Method::POST,
            "/v1/jobs/0198c3d2-0000-7000-8000-000000000000/retry",
            "admin",
        ),
    ];
    for (method, path, needs) in routes {
        let (status, code) = call(&stack, method.clone(), path, None).await;
        assert_eq!(
            (status, code.as_deref()),
            (401, Some("unauthorized")),
            "{method} {path} without a token"
        );
        for (role, token) in [("reader", &reader), ("writer", &writer), ("admin", &admin)] {
            let allowed = match needs {
                "reader" => true,
                "writer" => role != "reader",
                _ => role == "admin",
            };
            let (status, code) = call(&stack, method.clone(), path, Some(token)).await;
            if allowed {
                assert!(
                    matches!(status, 200 | 202 | 404),
                    "{method} {path} as {role}: {status}"
                );
            } else {
                assert_eq!(
                    (status, code.as_deref()),
                    (403, Some("forbidden")),
                    "{method} {path} as {role}"
                );
            }
        }
    }
    // Percent-encoding a path changes nothing: the router decodes it, and so
    // does the check.
    for (method, path) in [
        (Method::GET, "/%76%31/jobs?status=dead"),
        (Method::GET, "/v1/%6Aobs?status=dead"),
        (
            Method::POST,
            "/%76%31/jobs/0198c3d2-0000-7000-8000-000000000000/retry",
        ),
        (Method::GET, "/%76%31/kv?prefix="),
        (Method::POST, "/%76%31/kv"),
        (Method::GET, "/%72ead/k"),
    ] {
        assert_eq!(
            call(&stack, method.clone(), path, None).await,
            (401, Some("unauthorized".to_owned())),
            "{method} {path} without a token"
        );
    }
    assert_eq!(
        call(
            &stack,
            Method::GET,
            "/%76%31/jobs?status=dead",
            Some(&writer)
        )
        .await,
        (403, Some("forbidden".to_owned())),
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            call(&stack, Method::GET, path, None).await.0,
            200,
            "{path} is open"
        );
    }
}

#[tokio::test]
async fn bad_tokens_are_401_and_change_nothing() {
    let stack = secured().await;
    let none_alg = {
        let b64 = |v: &Value| encode_b64(&serde_json::to_vec(v).unwrap());
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&json!({"exp": exp_in(600), "roles": ["admin"]}))
        )
    };
    let bad = [
        (
            "wrong signature",
            sign(
                &json!({"exp": exp_in(600), "roles": ["admin"]}),
                Algorithm::HS256,
                "another-secret",
            ),
        ),
        (
            "wrong algorithm",
            sign(
                &json!({"exp": exp_in(600), "roles": ["admin"]}),
                Algorithm::HS384,
                SECRET,
            ),
        ),
        (
            "expired",
            sign(
                &json!({"exp": exp_in(-600), "roles": ["admin"]}),
                Algorithm::HS256,
                SECRET,
            ),
        ),
        (
            "no exp",
            sign(&json!({"roles": ["admin"]}), Algorithm::HS256, SECRET),
        ),
        ("alg none", none_alg),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (what, token) in bad {
        let response = stack
            .request(Method::PUT, "/v1/kv/guarded?upsert=true")
            .bearer_auth(&token)
            .json(&json!({"value": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{what}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "unauthorized", "{what}");
    }
    // A valid token without any kvq role is 403.
    let roleless = sign(
        &json!({"exp": exp_in(600), "roles": ["other"]}),
        Algorithm::HS256,
        SECRET,
    );
    assert_eq!(
        call(&stack, Method::GET, "/v1/kv/guarded", Some(&roleless))
            .await
            .0,
        403
    );
    assert_eq!(stack.kv.keys(), Vec::<String>::new(), "nothing was stored");
}

/// base64url without padding.
fn encode_b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn keycloak_realm_roles_work_and_minted_tokens_work() {
    let stack = secured().await;
    let keycloak = sign(
        &json!({"exp": exp_in(600), "aud": "account", "realm_access": {"roles": ["offline_access", "writer"]}}),
        Algorithm::HS256,
        SECRET,
    );
    let (status, _) = call(
        &stack,
        Method::PUT,
        "/v1/kv/kc?upsert=true",
        Some(&keycloak),
    )
    .await;
    assert_eq!(status, 202, "realm_access.roles grants writer");

    let env = vec![("KVQ_AUTH_JWT_SECRET".to_owned(), SECRET.to_owned())];
    let mut minted = KvqProcess::spawn_with_args(
        "kvq-api",
        &["token", "--role", "reader", "--ttl", "10m"],
        &env,
    );
    let status = minted.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success());
    let reader = minted.logs().last().unwrap().trim().to_owned();
    assert_eq!(
        call(&stack, Method::GET, "/v1/kv/kc", Some(&reader))
            .await
            .0
            / 100,
        2
    );
    assert_eq!(
        call(&stack, Method::DELETE, "/v1/kv/kc", Some(&reader))
            .await
            .0,
        403
    );
}

#[tokio::test]
async fn the_api_refuses_to_start_without_a_key_and_says_what_to_set() {
    let mut api = KvqProcess::spawn(
        "kvq-api",
        &[("KVQ_BIND".to_owned(), "127.0.0.1:0".to_owned())],
    );
    let status = api.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(2));
    let stderr = api.stderr().join("\n");
    assert!(stderr.contains("KVQ_AUTH_JWT_SECRET"), "{stderr}");
    assert!(stderr.contains("KVQ_AUTH_DISABLED"), "{stderr}");

    let mut mint = KvqProcess::spawn_with_args("kvq-api", &["token", "--role", "writer"], &[]);
    assert_eq!(
        mint.wait_exit(Duration::from_secs(10)).await.code(),
        Some(2)
    );
    assert!(mint.stderr().join("\n").contains("KVQ_AUTH_JWT_SECRET"));
}

/// A stack with auth and a rate limit of 1/s with a burst of 3.
async fn rate_limited() -> Stack {
    Stack::builder()
        .secured()
        .env("KVQ_RATE_LIMIT_PER_SECOND", "1")
        .env("KVQ_RATE_LIMIT_BURST", "3")
        .start()
        .await
}

/// Sends `GET /v1/kv/k` ten times at once-after-another and returns the
/// statuses, checking the first 429's headers and body.
async fn burst(stack: &Stack, token: Option<&str>) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let mut request = stack.request(Method::GET, "/v1/kv/k");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        if status == 429 && !statuses.contains(&429) {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            let problem: Value = response.json().await.unwrap();
            assert_eq!(problem["code"], "rate_limited");
        }
        statuses.push(status);
    }
    statuses
}

#[tokio::test]
async fn each_token_has_its_own_rate_limit() {
    let stack = rate_limited().await;
    let (first, second) = (token(&["reader"]), token(&["writer"]));
    let statuses = burst(&stack, Some(&first)).await;
    // The burst goes through; then the bucket is empty (it refills at 1/s,
    // and ten requests take far less than the seven seconds needed).
    assert_eq!(statuses[..3], [404, 404, 404], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    // Another token has its own bucket.
    assert_eq!(
        call(&stack, Method::GET, "/v1/kv/k", Some(&second)).await.0,
        404
    );
    // The open routes are not limited.
    for _ in 0..10 {
        assert_eq!(call(&stack, Method::GET, "/healthz", None).await.0, 200);
    }
}

#[tokio::test]
async fn requests_without_a_valid_token_share_their_address_limit() {
    let stack = rate_limited().await;
    let statuses = burst(&stack, None).await;
    assert_eq!(statuses[..3], [401, 401, 401], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    // Made-up tokens count against the address too, so inventing new ones
    // gives no fresh bucket: each is refused for the rate, never judged.
    // (The bucket refills one request a second, so one may still get a 401:
    // but ten in a row cannot all be.)
    let mut made_up = Vec::new();
    for i in 0..10 {
        made_up.push(
            call(
                &stack,
                Method::GET,
                "/v1/kv/k",
                Some(&format!("made.up.{i}")),
            )
            .await
            .0,
        );
    }
    assert!(made_up.contains(&429), "{made_up:?}");
    assert!(
        made_up.iter().all(|s| [401, 429].contains(s)),
        "{made_up:?}"
    );
    // ... while a valid token has a bucket of its own.
    assert_eq!(
        call(&stack, Method::GET, "/v1/kv/k", Some(&token(&["reader"])))
            .await
            .0,
        404
    );
}

/// `header` and `claims` signed with [`SECRET`] (HS256), the token built by
/// hand so that the header can carry anything, `crit` included.
fn hand_signed(header: &Value, claims: &Value) -> String {
    let message = format!(
        "{}.{}",
        encode_b64(&serde_json::to_vec(header).unwrap()),
        encode_b64(&serde_json::to_vec(claims).unwrap())
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{message}.{signature}")
}

/// The status of `GET /v1/kv/absent` with `token` (404: the token passed).
async fn read_status(stack: &Stack, token: &str) -> u16 {
    call(stack, Method::GET, "/v1/kv/absent", Some(token))
        .await
        .0
}

#[tokio::test]
async fn nbf_is_checked_and_long_tokens_pass_without_a_maximum() {
    let stack = secured().await;
    let with = |claims: Value| sign(&claims, Algorithm::HS256, SECRET);
    let not_yet = with(json!({"exp": exp_in(7_200), "nbf": exp_in(3_600), "roles": ["reader"]}));
    assert_eq!(
        call(&stack, Method::GET, "/v1/kv/absent", Some(&not_yet)).await,
        (401, Some("unauthorized".to_owned())),
        "nbf an hour ahead"
    );
    for (what, nbf) in [("past", -60), ("within the 5 s leeway", 2)] {
        let token = with(json!({"exp": exp_in(600), "nbf": exp_in(nbf), "roles": ["reader"]}));
        assert_eq!(read_status(&stack, &token).await, 404, "nbf {what}");
    }
    // Without KVQ_AUTH_MAX_TOKEN_LIFETIME, neither iat nor a long life matters.
    for claims in [
        json!({"exp": exp_in(7_200), "iat": exp_in(0), "roles": ["reader"]}),
        json!({"exp": exp_in(7_200), "roles": ["reader"]}),
    ] {
        assert_eq!(
            read_status(&stack, &with(claims.clone())).await,
            404,
            "{claims}"
        );
    }
}

#[tokio::test]
async fn a_crit_header_is_refused_even_with_a_valid_signature() {
    let stack = secured().await;
    let claims = json!({"exp": exp_in(600), "roles": ["admin"]});
    // The hand-made token is valid as such...
    let plain = hand_signed(&json!({"alg": "HS256", "typ": "JWT"}), &claims);
    assert_eq!(read_status(&stack, &plain).await, 404);
    // ... and refused with any crit, known names, unknown ones or none.
    for crit in [
        json!(["exp"]),
        json!(["kvq-unknown"]),
        json!([]),
        Value::Null,
    ] {
        let header = json!({"alg": "HS256", "typ": "JWT", "crit": crit, "kvq-unknown": true});
        let token = hand_signed(&header, &claims);
        let response = stack
            .request(Method::PUT, "/v1/kv/critical?upsert=true")
            .bearer_auth(&token)
            .json(&json!({"value": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "crit {crit}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "unauthorized", "crit {crit}");
    }
    assert_eq!(stack.kv.keys(), Vec::<String>::new(), "nothing was stored");
}

#[tokio::test]
async fn a_maximum_lifetime_refuses_long_lived_tokens_and_minting_follows_it() {
    let stack = Stack::builder()
        .secured()
        .env("KVQ_AUTH_MAX_TOKEN_LIFETIME", "1h")
        .start()
        .await;
    let now = exp_in(0);
    let with = |claims: Value| sign(&claims, Algorithm::HS256, SECRET);
    let half_hour = with(json!({"exp": now + 1_800, "iat": now, "roles": ["reader"]}));
    assert_eq!(read_status(&stack, &half_hour).await, 404, "30 min");
    let refused = [
        (
            "2 h",
            json!({"exp": now + 7_200, "iat": now, "roles": ["reader"]}),
        ),
        ("no iat", json!({"exp": now + 600, "roles": ["reader"]})),
        (
            "iat not a number",
            json!({"exp": now + 600, "iat": "now", "roles": ["reader"]}),
        ),
        (
            "issued a day ahead, 30 min long",
            json!({"exp": now + 86_400 + 1_800, "iat": now + 86_400, "roles": ["reader"]}),
        ),
    ];
    for (what, claims) in refused {
        assert_eq!(
            call(&stack, Method::GET, "/v1/kv/absent", Some(&with(claims))).await,
            (401, Some("unauthorized".to_owned())),
            "{what}"
        );
    }

    // `kvq-api token` mints what the API accepts, and refuses what it would not.
    let env = vec![
        ("KVQ_AUTH_JWT_SECRET".to_owned(), SECRET.to_owned()),
        ("KVQ_AUTH_MAX_TOKEN_LIFETIME".to_owned(), "1h".to_owned()),
    ];
    let mut too_long = KvqProcess::spawn_with_args(
        "kvq-api",
        &["token", "--role", "reader", "--ttl", "2h"],
        &env,
    );
    assert_eq!(
        too_long.wait_exit(Duration::from_secs(10)).await.code(),
        Some(2)
    );
    let stderr = too_long.stderr().join("\n");
    assert!(stderr.contains("KVQ_AUTH_MAX_TOKEN_LIFETIME"), "{stderr}");
    assert!(too_long.logs().is_empty(), "no token printed");
    for args in [
        &["token", "--role", "reader", "--ttl", "30m"][..],
        &["token", "--role", "reader"][..],
    ] {
        let mut minted = KvqProcess::spawn_with_args("kvq-api", args, &env);
        assert!(minted.wait_exit(Duration::from_secs(10)).await.success());
        let token = minted.logs().last().unwrap().trim().to_owned();
        assert_eq!(read_status(&stack, &token).await, 404, "{args:?}");
    }
}
