//! The OpenAPI 3.1 document of every route, generated from the handlers'
//! `#[utoipa::path]` attributes and their types, served at
//! `GET /openapi.json` (no token needed).
//!
//! Adding a route: annotate its handler with `#[utoipa::path]` (its method,
//! path, parameters, body and every status the handler itself can answer),
//! list it in [`ApiDoc`]'s `paths(...)`, and register it with
//! [`crate::routes::resource`] (that gives the 405 + `Allow` answer for
//! other methods). What the auth middleware adds is not repeated per route:
//! [`Security`] gives every route the middleware guards its bearer
//! requirement and the 401 and 403 answers. The integration test
//! `openapi::the_document_lists_every_route_with_its_methods` fails for a
//! route missing here.

use std::sync::LazyLock;

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::schema::{AdditionalProperties, SchemaType};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, ObjectBuilder, Ref, RefOr, Response, ResponseBuilder, Schema,
    Type,
};
use utoipa::{Modify, OpenApi};

use crate::routes::{batch, health, jobs, kv, legacy, stats, ui};

/// The document: every path, its schemas, the bearer scheme.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "kvq",
        description = "A key-value store whose writes go through a durable queue. \
            Writes answer 202 with a job to poll (or wait for it with `Prefer: wait=N`); \
            reads go straight to the data Redis. Every error is `application/problem+json` \
            (RFC 9457) with a stable `code`."
    ),
    paths(
        kv::create,
        kv::list,
        kv::read,
        kv::update,
        kv::delete,
        batch::batch,
        jobs::get_job,
        jobs::list_jobs,
        jobs::retry_job,
        stats::stats,
        legacy::create,
        legacy::read,
        legacy::update,
        legacy::delete,
        health::healthz,
        health::readyz,
        crate::metrics::render,
        openapi_json,
        ui::page,
        ui::script,
        ui::style,
        ui::icon,
    ),
    // Schemas a parameter refers to by name (`$ref`) but no body carries.
    components(schemas(health::ReadyScope)),
    modifiers(&Security, &HeaderParams, &ClosedBatchWrites),
    tags(
        (name = "kv", description = "Keys: queued writes (one by one, or up to 1,000 in a batch), direct reads"),
        (name = "jobs", description = "The status of queued writes; dead letters and their retry; the queue's figures"),
        (name = "legacy", description = "The original service's routes, answering as it did (`KVQ_LEGACY_ROUTES=false` turns them off)"),
        (name = "health", description = "Liveness and readiness; no token needed"),
        (name = "meta", description = "This document and the metrics; no token needed"),
        (name = "ui", description = "The web dashboard; the page needs no token, its data an admin token"),
    ),
)]
pub struct ApiDoc;

/// The name of the bearer scheme in the document.
const BEARER: &str = "bearer";

/// Adds what the middlewares do to every route they guard: the bearer
/// requirement (with the role needed, as OpenAPI 3.1 allows for non-OAuth
/// schemes), 401, 403 and 429; and the 503 of a Redis that does not answer,
/// unless the route documents its own. Which routes and roles comes from
/// [`crate::auth::required_role`], the function the middleware itself uses.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                BEARER,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(
                            "HS256 or RS256 JWT with `exp` and roles in `roles` or \
                             `realm_access.roles`: `reader`, `writer` (also writes), \
                             `admin` (also dead jobs). `nbf`, when present, must have \
                             passed; a `crit` header is refused; with \
                             `KVQ_AUTH_MAX_TOKEN_LIFETIME` set, `iat` is required and \
                             `exp - iat` may not exceed it",
                        ))
                        .build(),
                ),
            );
        for (path, item) in doc.paths.paths.iter_mut() {
            for (method, operation) in operations(item) {
                let Some(role) = crate::auth::required_role(&method, path) else {
                    continue;
                };
                operation.security = Some(vec![SecurityRequirement::new(BEARER, [role.as_str()])]);
                let responses = &mut operation.responses.responses;
                responses.entry("401".into()).or_insert_with(|| {
                    problem(
                        "`unauthorized`: no token, or an invalid, expired or not yet valid one",
                        Some("WWW-Authenticate"),
                    )
                    .into()
                });
                // Every guarded route needs Redis; handlers that say more
                // about their 503 document it themselves.
                responses.entry("503".into()).or_insert_with(|| {
                    problem(
                        "`backend_unavailable`: a Redis server did not answer (a write: nothing was queued); `outcome_unknown` (writes): the queue did not answer in time, the write may have been queued",
                        Some("Retry-After"),
                    )
                    .into()
                });
                responses.entry("429".into()).or_insert_with(|| {
                    problem(
                        "`rate_limited`: over the client's rate limit (`KVQ_RATE_LIMIT_PER_SECOND`)",
                        Some("Retry-After"),
                    )
                    .into()
                });
                responses.entry("403".into()).or_insert_with(|| {
                    problem(
                        &format!("`forbidden`: the token lacks the `{}` role", role.as_str()),
                        None,
                    )
                    .into()
                });
            }
        }
    }
}

/// Header parameters declared `Option<String>` (absent or not) come out of
/// the macro as `string | null`; a header is never JSON `null`, so they are
/// made plain optional strings.
struct HeaderParams;

impl Modify for HeaderParams {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let nullable_string = SchemaType::Array(vec![Type::String, Type::Null]);
        for item in doc.paths.paths.values_mut() {
            for (_, operation) in operations(item) {
                for parameter in operation.parameters.iter_mut().flatten() {
                    if let RefOr::T(parameter) = parameter
                        && parameter.parameter_in == ParameterIn::Header
                        && let Some(RefOr::T(Schema::Object(schema))) = parameter.schema.as_mut()
                        && schema.schema_type == nullable_string
                    {
                        schema.schema_type = SchemaType::Type(Type::String);
                    }
                }
            }
        }
    }
}

/// A batch write ([`crate::routes::batch::BatchWrite`]) is one of four
/// objects, by `op`; the macro leaves each open to other properties
/// (`deny_unknown_fields` on an enum does not reach its variants), which
/// the API refuses, so they are closed here.
struct ClosedBatchWrites;

impl Modify for ClosedBatchWrites {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let Some(RefOr::T(Schema::OneOf(one_of))) = doc
            .components
            .as_mut()
            .and_then(|components| components.schemas.get_mut("BatchWrite"))
        else {
            return;
        };
        for item in &mut one_of.items {
            if let RefOr::T(Schema::Object(object)) = item {
                object.additional_properties =
                    Some(Box::new(AdditionalProperties::FreeForm(false)));
            }
        }
    }
}

/// The operations of a path item, with their methods.
fn operations(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    [
        (Method::GET, &mut item.get),
        (Method::PUT, &mut item.put),
        (Method::POST, &mut item.post),
        (Method::DELETE, &mut item.delete),
        (Method::OPTIONS, &mut item.options),
        (Method::HEAD, &mut item.head),
        (Method::PATCH, &mut item.patch),
        (Method::TRACE, &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(method, operation)| Some((method, operation.as_mut()?)))
}

/// A problem+json response, with one string header if given.
fn problem(description: &str, header: Option<&str>) -> Response {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/problem+json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    );
    if let Some(name) = header {
        response = response.header(
            name,
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build(),
        );
    }
    response.build()
}

/// The document, built once.
static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(ApiDoc::openapi);

/// Registers `GET /openapi.json`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::routes::resource(
        "/openapi.json",
        [(Method::GET, web::to(openapi_json))],
    ));
}

/// `GET /openapi.json`: this document. No token needed.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
)]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(&*DOCUMENT)
}
