//! `/v1/stats` (admin): per partition its depth, lag, owner and counters;
//! jobs by status; the live workers; accepted and applied writes per second.

use actix_web::http::Method;
use actix_web::{HttpResponse, web};
use kvq_shared::queue::streams_config;
use kvq_shared::retry;

use crate::error::{ApiError, Problem};
use crate::state::AppState;
use crate::stats::{Rates, StatsBody, body};

/// Registers the route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::routes::resource(
        "/v1/stats",
        [(Method::GET, web::to(stats))],
    ));
}

/// `GET /v1/stats`: what the queue holds now (admin). One script call per
/// partition and one read of the workers, in one pipeline on one queue
/// Redis.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "jobs",
    description = "The queue now: per partition its depth (jobs not yet final), lag (the age of its oldest job not yet final), owner and counters; jobs by status; the live workers with their partitions; accepted and applied writes per second (from the previous read of this API process at least a second old; 0 on the first read). Counters count from when the queue Redis first kept them. Needs the admin role.",
    responses(
        (status = 200, description = "The queue's figures", body = StatsBody),
        (status = 503, description = "`backend_unavailable`: the queue Redis did not answer", body = Problem, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds"),
        )),
    ),
)]
pub async fn stats(
    state: web::Data<AppState>,
    rates: web::Data<Rates>,
) -> Result<HttpResponse, ApiError> {
    let live_for = streams_config(&state.config).lease;
    let stats = retry::with_backoff(
        state.config.read_retry_max,
        state.read_attempt_timeout(),
        || state.queue.stats(live_for),
    )
    .await
    .map_err(ApiError::BackendUnavailable)?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(body(&stats, &rates)))
}
