//! One module per resource.

pub mod batch;
pub mod health;
pub mod jobs;
pub mod kv;
pub mod legacy;
pub mod stats;
pub mod ui;

use actix_web::http::Method;
use actix_web::{Resource, Route, web};

use crate::error::ApiError;

/// A resource at `path` that answers each `(method, route)` pair, and any
/// other method with 405 `method_not_allowed` and an `Allow` header listing
/// exactly these methods, so the header cannot drift from what is served:
///
/// ```ignore
/// cfg.service(routes::resource("/v1/kv", [
///     (Method::POST, web::to(create)),
///     (Method::GET, web::to(list)),
/// ]));
/// ```
pub fn resource<const N: usize>(path: &str, routes: [(Method, Route); N]) -> Resource {
    let allow = routes
        .iter()
        .map(|(method, _)| method.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let resource = routes.into_iter().fold(
        web::resource(path).app_data(crate::metrics::route_label(path)),
        |resource, (method, route)| resource.route(route.method(method)),
    );
    resource.default_service(web::to(move || {
        let allow = allow.clone();
        async move { Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed { allow }) }
    }))
}

/// The answer for an unknown path.
pub async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}
