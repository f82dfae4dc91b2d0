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

/// The last readiness probe of one process: each Redis' answer (KV, queue).
pub struct Readiness(Refreshed<(Result<(), StoreError>, Result<(), StoreError>)>);

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

/// `/readyz`'s query.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadyQuery {
    /// `writes`: ready when writes can be accepted, i.e. the queue Redis
    /// answers, whatever the KV Redis does (writes are accepted while it is
    /// down; reads then answer 503). Kubernetes' readiness probe uses it, so
    /// that a KV Redis outage does not take every API pod out of the
    /// Service. Absent: both Redis servers answer.
    pub scope: Option<ReadyScope>,
}

/// What `/readyz` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadyScope {
    /// Only what accepting a write needs: the queue Redis.
    Writes,
}

/// `GET /readyz`: readiness, both Redis servers answer (or, with
/// `?scope=writes`, the queue Redis). No token needed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    params(ReadyQuery),
    description = "Readiness. Open to anyone; the answer comes from one PING to each Redis taken at most every 500 ms per API process and shared by all requests.",
    responses(
        (status = 200, description = "Ready", body = HealthBody),
        (status = 400, description = "`invalid_request`: an unknown scope", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`: a Redis server did not answer", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn readyz(
    state: web::Data<AppState>,
    readiness: web::Data<Readiness>,
    query: web::Query<ReadyQuery>,
) -> Result<HttpResponse, ApiError> {
    let probe = readiness
        .0
        .get(|| async {
            tokio::join!(
                ping("kv", state.kv.ping()),
                ping("queue", state.queue.ping())
            )
        })
        .await;
    let (kv, queue) = probe.value;
    match query.scope {
        Some(ReadyScope::Writes) => queue,
        None => kv.and(queue),
    }
    .map_err(ApiError::BackendUnavailable)?;
    Ok(HttpResponse::Ok().json(HealthBody { status: "ready" }))
}
