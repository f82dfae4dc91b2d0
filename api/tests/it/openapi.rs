//! `GET /openapi.json`: open, and listing every route the API serves with
//! exactly the methods it serves; other methods get 405 + `Allow`.

use std::collections::{BTreeMap, BTreeSet};

use kvq_testkit::Stack;
use reqwest::Method;
use serde_json::Value;

/// Every path the API serves, as a client calls it, and the template the
/// document lists it under. A new route needs a line here (else the
/// document may list a path this test does not know, and fails); the
/// methods of each path come from the server's own `Allow` header, which
/// `routes::resource` builds from the routes it registers.
const SERVED: &[(&str, &str)] = &[
    ("/v1/kv", "/v1/kv"),
    ("/v1/kv/users/42/name", "/v1/kv/{key}"),
    ("/v1/batch", "/v1/batch"),
    (
        "/v1/jobs/0198c3d2-0000-7000-8000-000000000000",
        "/v1/jobs/{id}",
    ),
    ("/v1/jobs", "/v1/jobs"),
    ("/v1/stats", "/v1/stats"),
    (
        "/v1/jobs/0198c3d2-0000-7000-8000-000000000000/retry",
        "/v1/jobs/{id}/retry",
    ),
    ("/create/k", "/create/{key}"),
    ("/read/k", "/read/{key}"),
    ("/update/k", "/update/{key}"),
    ("/delete/k", "/delete/{key}"),
    ("/v1/stats", "/v1/stats"),
    ("/metrics", "/metrics"),
    ("/healthz", "/healthz"),
    ("/readyz", "/readyz"),
    ("/openapi.json", "/openapi.json"),
    ("/ui", "/ui"),
    ("/ui/app.js", "/ui/app.js"),
    ("/ui/style.css", "/ui/style.css"),
    ("/ui/favicon.png", "/ui/favicon.png"),
];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "options", "head", "trace",
];

async fn secured() -> Stack {
    Stack::builder().secured().start().await
}

fn admin_token() -> String {
    kvq_testkit::token(&["admin"])
}

/// The document, fetched without a token.
async fn document(stack: &Stack) -> Value {
    let response = stack
        .request(Method::GET, "/openapi.json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "/openapi.json needs no token");
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

/// The methods the document lists for each path, upper case.
fn documented(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            let methods = METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(|m| m.to_uppercase())
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// A request with a method no route has: 405 problem+json; returns `Allow`.
async fn allowed(stack: &Stack, path: &str, token: &str) -> BTreeSet<String> {
    let response = stack
        .request(Method::TRACE, path)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405, "TRACE {path}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "TRACE {path}"
    );
    let allow = response
        .headers()
        .get("allow")
        .unwrap_or_else(|| panic!("TRACE {path}: no Allow header"))
        .to_str()
        .unwrap()
        .split(',')
        .map(|m| m.trim().to_owned())
        .collect();
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "method_not_allowed", "TRACE {path}");
    allow
}

#[tokio::test]
async fn the_document_lists_every_route_with_its_methods() {
    let stack = secured().await;
    let doc = document(&stack).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let documented = documented(&doc);

    let templates: BTreeSet<&str> = SERVED.iter().map(|(_, t)| *t).collect();
    let listed: BTreeSet<&str> = documented.keys().map(String::as_str).collect();
    assert_eq!(
        listed, templates,
        "the document's paths differ from the served ones (a new route: document it, and add it to SERVED)"
    );

    let token = admin_token();
    for (path, template) in SERVED {
        let served = allowed(&stack, path, &token).await;
        assert_eq!(
            &served, &documented[*template],
            "{path}: the methods served (Allow) differ from the documented ones"
        );
    }
}

#[tokio::test]
async fn every_operation_documents_its_errors_and_security() {
    let stack = secured().await;
    let doc = document(&stack).await;
    assert!(
        doc["components"]["schemas"]["Problem"].is_object(),
        "no Problem schema"
    );
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");

    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            let Some(operation) = item.get(*method) else {
                continue;
            };
            let what = format!("{method} {path}");
            // The original service's routes answer their 404 and 422 as it
            // did, not as problems.
            let legacy = ["/create/", "/read/", "/update/", "/delete/"]
                .iter()
                .any(|prefix| path.starts_with(prefix));
            let responses = operation["responses"].as_object().unwrap();
            for (status, response) in responses {
                let content = &response["content"];
                let fastapi = legacy && ["404", "422"].contains(&status.as_str());
                if status.as_str() >= "400" && !fastapi {
                    assert_eq!(
                        content["application/problem+json"]["schema"]["$ref"],
                        "#/components/schemas/Problem",
                        "{what} {status}"
                    );
                }
            }
            if path.starts_with("/v1/") || legacy {
                let security = operation["security"].as_array().unwrap();
                assert!(
                    security.iter().any(|s| s.get("bearer").is_some()),
                    "{what}: no bearer requirement"
                );
                for status in ["401", "403", "429", "503"] {
                    assert!(responses.contains_key(status), "{what}: no {status}");
                }
                assert!(
                    responses["401"]["headers"]
                        .get("WWW-Authenticate")
                        .is_some(),
                    "{what}"
                );
            } else {
                assert!(operation.get("security").is_none(), "{what} is open");
                let response = stack
                    .request(
                        Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                        path,
                    )
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{what} without a token");
            }
        }
    }
    // Writes document their headers and bodies.
    let put = &doc["paths"]["/v1/kv/{key}"]["put"];
    let headers: BTreeSet<&str> = put["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "header")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        headers,
        BTreeSet::from(["If-Match", "Prefer", "Idempotency-Key"])
    );
    assert!(put["requestBody"]["content"]["application/json"].is_object());
    assert!(put["responses"]["202"]["headers"].get("Location").is_some());
    let read = &doc["paths"]["/v1/kv/{key}"]["get"];
    assert!(read["responses"]["200"]["headers"].get("ETag").is_some());
    assert!(read["responses"].get("304").is_some());
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
        ("POST", "/openapi.json", "GET"),
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
