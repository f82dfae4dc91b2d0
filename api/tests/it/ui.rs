//! `GET /ui`: the dashboard page and its files are served, open, with their
//! content types and strict headers, and need nothing from the network.

use std::collections::BTreeSet;
use std::path::PathBuf;

use kvq_testkit::Stack;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

/// The folder the dashboard's files are embedded from.
fn ui_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ui")
}

/// Every file in `api/ui/`, by name.
fn ui_files() -> BTreeSet<String> {
    std::fs::read_dir(ui_dir())
        .expect("api/ui is readable")
        .map(|entry| {
            entry
                .expect("a directory entry")
                .file_name()
                .into_string()
                .expect("a UTF-8 file name")
        })
        .collect()
}

/// Checks the headers every dashboard answer carries.
fn assert_strict(headers: &HeaderMap, what: &str) {
    let csp = headers
        .get("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy"))
        .to_str()
        .unwrap();
    let directives: BTreeSet<&str> = csp.split(';').map(str::trim).collect();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(
            directives.contains(directive),
            "{what}: {directive} in {csp}"
        );
    }
    // Only this origin, in every directive.
    for source in csp.split([';', ' ']).filter(|s| !s.is_empty()) {
        assert!(
            source.ends_with("-src")
                || source.ends_with("-ancestors")
                || source.ends_with("-uri")
                || source.ends_with("-action")
                || source == "'self'"
                || source == "'none'",
            "{what}: the policy allows {source}: {csp}"
        );
    }
    assert_eq!(headers["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(headers["x-frame-options"], "DENY", "{what}");
    assert_eq!(headers["cache-control"], "no-cache", "{what}");
    assert!(headers.get("etag").is_some(), "{what}: no ETag");
}

/// The `src` and `href` values of the page.
fn references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(at) = rest.find(attribute) {
            rest = &rest[at + attribute.len()..];
            let end = rest.find('"').expect("a closed attribute");
            found.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    found
}

#[tokio::test]
async fn the_page_and_its_files_are_served_open_with_strict_headers() {
    let stack = Stack::builder().workers(0).secured().start().await;

    let page = stack.request(Method::GET, "/ui").send().await.unwrap();
    assert_eq!(page.status(), 200, "/ui needs no token");
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_strict(page.headers(), "/ui");
    let html = page.text().await.unwrap();
    assert_eq!(
        html,
        std::fs::read_to_string(ui_dir().join("index.html")).unwrap(),
        "the page served is api/ui/index.html"
    );
    assert!(html.contains("id=\"login-form\""), "no login form");

    // No inline script or style, which the policy would block anyway.
    let lower = html.to_lowercase();
    assert_eq!(
        lower.matches("<script").count(),
        lower.matches("<script src=\"/ui/").count(),
        "every script is a file of /ui"
    );
    assert!(!lower.contains("<style"), "an inline style element");
    assert!(!lower.contains(" style=\""), "an inline style attribute");
    assert!(!lower.contains(" onclick=") && !lower.contains(" onload="));

    // Every file the page loads is served with its type and the headers,
    // and every file in api/ui is the page or one it loads.
    let mut served = BTreeSet::from(["index.html".to_owned()]);
    for reference in references(&html) {
        let name = reference
            .strip_prefix("/ui/")
            .unwrap_or_else(|| panic!("the page loads {reference}, not a file of /ui"));
        let response = stack.request(Method::GET, &reference).send().await.unwrap();
        assert_eq!(response.status(), 200, "{reference}");
        let expected = match name.rsplit('.').next() {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("png") => "image/png",
            other => panic!("{reference}: an unexpected kind of file {other:?}"),
        };
        assert_eq!(response.headers()["content-type"], expected, "{reference}");
        assert_strict(response.headers(), &reference);
        let body = response.bytes().await.unwrap();
        assert_eq!(
            body.as_ref(),
            std::fs::read(ui_dir().join(name)).unwrap(),
            "{reference} is api/ui/{name}"
        );
        served.insert(name.to_owned());
    }
    assert_eq!(served, ui_files(), "files in api/ui the page does not load");

    // The data stays behind the admin token.
    let data = stack
        .request(Method::GET, "/v1/jobs?status=dead")
        .send()
        .await
        .unwrap();
    assert_eq!(data.status(), 401);
    let reader = stack
        .request(Method::GET, "/v1/jobs?status=dead")
        .bearer_auth(kvq_testkit::token(&["reader"]))
        .send()
        .await
        .unwrap();
    assert_eq!(reader.status(), 403);
}

#[test]
fn the_files_name_no_network_address() {
    for name in ui_files() {
        let bytes = std::fs::read(ui_dir().join(&name)).unwrap();
        let text = String::from_utf8_lossy(&bytes).to_lowercase();
        for scheme in ["http://", "https://", "ws://", "wss://", "url(//", "\"//"] {
            assert!(
                !text.contains(scheme),
                "api/ui/{name} names a network address ({scheme}): the dashboard must load nothing from outside"
            );
        }
        for call in ["eval(", "new function(", "import("] {
            assert!(!text.contains(call), "api/ui/{name} uses {call}");
        }
    }
}

#[tokio::test]
async fn the_files_revalidate_with_their_etag() {
    let stack = Stack::builder().workers(0).start().await;
    for path in ["/ui", "/ui/app.js", "/ui/style.css", "/ui/favicon.png"] {
        let first = stack.request(Method::GET, path).send().await.unwrap();
        assert_eq!(first.status(), 200, "{path}");
        let etag = first.headers()["etag"].to_str().unwrap().to_owned();
        assert!(
            etag.starts_with('"') && etag.ends_with('"'),
            "{path}: {etag}"
        );

        let again = stack
            .request(Method::GET, path)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
        assert_strict(again.headers(), path);
        assert_eq!(again.headers()["etag"], etag.as_str(), "{path}");
        assert!(
            again.bytes().await.unwrap().is_empty(),
            "{path}: a 304 body"
        );

        let other = stack
            .request(Method::GET, path)
            .header("if-none-match", "\"something-else\"")
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 200, "{path}");
    }

    // Anything else under /ui is an unknown path.
    let missing = stack
        .request(Method::GET, "/ui/secrets.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = missing.json().await.unwrap();
    assert_eq!(problem["code"], "not_found");
}
