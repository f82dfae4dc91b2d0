//! `/healthz` (the process answers) and `/readyz` (both Redis answer).

use std::time::Duration;

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use kvq_shared::StoreError;
use serde_json::json;

use crate::error::ApiError;
use crate::startup::AppState;

/// How long readiness waits for each Redis.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use crate::routes::resource;
    cfg.service(resource("/healthz", [(Method::GET, web::to(healthz))]))
        .service(resource("/readyz", [(Method::GET, web::to(readyz))]));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
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

async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (kv, queue) = tokio::join!(
        ping("kv", state.kv.ping()),
        ping("queue", state.queue.ping())
    );
    kv.and(queue)?;
    Ok(HttpResponse::Ok().json(json!({"status": "ready"})))
}
