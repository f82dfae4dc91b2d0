//! `/healthz` (the process answers) and `/readyz` (both Redis answer).

use std::time::Duration;

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use kvq_shared::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, Problem};
use crate::state::AppState;

/// How long readiness waits for each Redis.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The 200 body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use crate::routes::resource;
    cfg.service(resource("/healthz", [(Method::GET, web::to(healthz))]))
        .service(resource("/readyz", [(Method::GET, web::to(readyz))]));
}

/// `GET /healthz`: liveness, the process answers. No token needed.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "Alive", body = HealthBody)),
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(HealthBody { status: "ok" })
}

async fn ping(
    name: &'static str,
    fut: impl Future<Output = Result<(), StoreError>>,
) -> Result<(), ApiError> {
    match tokio::time::timeout(PING_TIMEOUT, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(redis = name, error = %kvq_shared::error::chain(&e), "readiness ping failed");
            Err(ApiError::BackendUnavailable(e))
        }
        Err(_) => Err(ApiError::BackendUnavailable(StoreError::Timeout(
            PING_TIMEOUT,
        ))),
    }
}

/// `GET /readyz`: readiness, both Redis servers answer. No token needed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = HealthBody),
        (status = 503, description = "`backend_unavailable`: a Redis server did not answer", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (kv, queue) = tokio::join!(
        ping("kv", state.kv.ping()),
        ping("queue", state.queue.ping())
    );
    kv.and(queue)?;
    Ok(HttpResponse::Ok().json(HealthBody { status: "ready" }))
}
