//! `/ui`: the web dashboard, a small page with no dependency and no build
//! step. Its HTML, CSS and JavaScript live in `api/ui/` and are embedded in
//! the binary, so the page needs nothing but this API: no CDN, no network.
//!
//! The page itself is open to anyone, like `/openapi.json`; it holds no
//! data. It shows nothing until an admin token is given in its login form;
//! the page keeps that token in the tab's `sessionStorage` (gone when the
//! tab closes) and sends it as `Authorization: Bearer` to the `/v1` routes,
//! which check it as they check any client's.
//!
//! Every answer carries a strict `Content-Security-Policy` (scripts, styles,
//! images and requests from this origin only; no inline script, no
//! framing), `X-Content-Type-Options: nosniff`, and `Cache-Control:
//! no-cache` with an `ETag`, so a browser revalidates (`304`) and a new
//! build is seen at once.

use std::sync::LazyLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder, web};
use sha2::{Digest, Sha256};

/// The policy every dashboard answer carries: everything from this origin
/// only, no inline script or style, no plugins, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file of the dashboard.
struct Asset {
    content_type: &'static str,
    body: &'static [u8],
    /// A strong validator: the first 16 bytes of the body's SHA-256.
    etag: String,
}

impl Asset {
    fn new(content_type: &'static str, body: &'static [u8]) -> Self {
        let digest = Sha256::digest(body);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            content_type,
            body,
            etag: format!("\"{hex}\""),
        }
    }
}

/// The page.
static INDEX: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    )
});

/// The page's script.
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    )
});

/// The page's style sheet.
static STYLE: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/css; charset=utf-8",
        include_bytes!("../../ui/style.css"),
    )
});

/// The page's icon.
static ICON: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("image/png", include_bytes!("../../ui/favicon.png")));

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use crate::routes::resource;
    cfg.service(resource("/ui", [(Method::GET, web::to(page))]))
        .service(resource("/ui/app.js", [(Method::GET, web::to(script))]))
        .service(resource("/ui/style.css", [(Method::GET, web::to(style))]))
        .service(resource("/ui/favicon.png", [(Method::GET, web::to(icon))]));
}

/// `GET /ui`: the dashboard. No token needed for the page; its data needs
/// an admin token.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "ui",
    description = "The web dashboard: a page with no outside dependency. Open to anyone; it shows data only once an admin token is given in its login form (kept in the tab's sessionStorage).",
    responses(
        (status = 200, description = "The page", body = String, content_type = "text/html", headers(
            ("Content-Security-Policy" = String, description = "This origin only, no inline script"),
            ("ETag" = String, description = "The file's validator"),
            ("Cache-Control" = String, description = "`no-cache`: revalidate with `If-None-Match`"),
        )),
        (status = 304, description = "Not modified: `If-None-Match` names the `ETag`"),
    ),
)]
pub async fn page(req: HttpRequest) -> HttpResponse {
    serve(&req, &INDEX)
}

/// `GET /ui/app.js`: the dashboard's script. No token needed.
#[utoipa::path(
    get,
    path = "/ui/app.js",
    tag = "ui",
    responses(
        (status = 200, description = "The dashboard's script", body = String, content_type = "text/javascript", headers(
            ("ETag" = String, description = "The file's validator"),
            ("Cache-Control" = String, description = "`no-cache`: revalidate with `If-None-Match`"),
        )),
        (status = 304, description = "Not modified: `If-None-Match` names the `ETag`"),
    ),
)]
pub async fn script(req: HttpRequest) -> HttpResponse {
    serve(&req, &SCRIPT)
}

/// `GET /ui/style.css`: the dashboard's style sheet. No token needed.
#[utoipa::path(
    get,
    path = "/ui/style.css",
    tag = "ui",
    responses(
        (status = 200, description = "The dashboard's style sheet", body = String, content_type = "text/css", headers(
            ("ETag" = String, description = "The file's validator"),
            ("Cache-Control" = String, description = "`no-cache`: revalidate with `If-None-Match`"),
        )),
        (status = 304, description = "Not modified: `If-None-Match` names the `ETag`"),
    ),
)]
pub async fn style(req: HttpRequest) -> HttpResponse {
    serve(&req, &STYLE)
}

/// `GET /ui/favicon.png`: the dashboard's icon. No token needed.
#[utoipa::path(
    get,
    path = "/ui/favicon.png",
    tag = "ui",
    responses(
        (status = 200, description = "The dashboard's icon", body = Vec<u8>, content_type = "image/png", headers(
            ("ETag" = String, description = "The file's validator"),
            ("Cache-Control" = String, description = "`no-cache`: revalidate with `If-None-Match`"),
        )),
        (status = 304, description = "Not modified: `If-None-Match` names the `ETag`"),
    ),
)]
pub async fn icon(req: HttpRequest) -> HttpResponse {
    serve(&req, &ICON)
}

/// The asset, or `304` when the request's `If-None-Match` names its tag.
fn serve(req: &HttpRequest, asset: &Asset) -> HttpResponse {
    let fresh = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == asset.etag || tag == "*");
    let mut response = if fresh {
        HttpResponse::build(StatusCode::NOT_MODIFIED)
    } else {
        HttpResponse::Ok()
    };
    secure(&mut response);
    response.insert_header((header::ETAG, asset.etag.as_str()));
    if fresh {
        return response.finish();
    }
    response
        .insert_header((header::CONTENT_TYPE, asset.content_type))
        .body(asset.body)
}

/// The headers every dashboard answer carries.
fn secure(response: &mut HttpResponseBuilder) {
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
        ("cache-control", "no-cache"),
    ] {
        response.insert_header((name, HeaderValue::from_static(value)));
    }
}
