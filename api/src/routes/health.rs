//! `/healthz` (the process answers) and `/readyz` (both Redis answer).
//!
//! `/readyz` is open to anyone, so its answer comes from a probe (a `PING` to
//! each Redis) taken at most once per [`READINESS_EVERY`] per process:
//! concurrent requests share one probe, the first request after start
//! probes, and a probe is reused for [`READINESS_EVERY`] after it finished
//! (see [`crate::refresh`]). A Redis that stops answering turns `/readyz`
//! 503 within that interval plus the ping timeout.

use std::time::Duration;

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use kvq_shared::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, Problem};
use crate::refresh::Refreshed;
use crate::state::AppState;

/// How long readiness waits for each Redis.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// How often, at most, one API process probes both Redis servers.
pub const READINESS_EVERY: Duration = Duration::from_millis(500);

/// The last readiness probe of one process: the first failure, if any.
pub struct Readiness(Refreshed<Result<(), StoreError>>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Refreshed::new(READINESS_EVERY))
    }
}

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
) -> Result<(), StoreError> {
    let result = match tokio::time::timeout(PING_TIMEOUT, fut).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Timeout(PING_TIMEOUT)),
    };
    if let Err(e) = &result {
        tracing::warn!(redis = name, error = %kvq_shared::error::chain(e), "readiness ping failed");
    }
    result
}

/// `GET /readyz`: readiness, both Redis servers answer. No token needed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    description = "Readiness. Open to anyone; the answer comes from one PING to each Redis taken at most every 500 ms per API process and shared by all requests.",
    responses(
        (status = 200, description = "Ready", body = HealthBody),
        (status = 503, description = "`backend_unavailable`: a Redis server did not answer", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn readyz(
    state: web::Data<AppState>,
    readiness: web::Data<Readiness>,
) -> Result<HttpResponse, ApiError> {
    let probe = readiness
        .0
        .get(|| async {
            let (kv, queue) = tokio::join!(
                ping("kv", state.kv.ping()),
                ping("queue", state.queue.ping())
            );
            kv.and(queue)
        })
        .await;
    probe.value.map_err(ApiError::BackendUnavailable)?;
    Ok(HttpResponse::Ok().json(HealthBody { status: "ready" }))
}
