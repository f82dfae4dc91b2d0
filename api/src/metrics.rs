//! The API's Prometheus metrics, served at `GET /metrics`:
//!
//! - `kvq_api_http_requests_total{method, route, status}` and
//!   `kvq_api_http_request_duration_seconds{method, route}` (a histogram), for
//!   every request; `route` is the route's pattern (`/v1/kv/{key}`), never
//!   the raw path, so a client cannot blow up the number of series;
//! - `kvq_api_writes_accepted_total{op}`;
//! - `kvq_queue_jobs` (entries in the queue stream, waiting or in flight) and
//!   `kvq_dead_jobs` (dead letters), read from the queue Redis at scrape time,
//!   for alerts and for scaling workers on the backlog.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::startup::AppState;

/// Request duration buckets, in seconds: loopback reads take well under a
/// millisecond, `Prefer: wait` can hold a request for 30 s.
const BUCKETS: [f64; 15] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histograms are compacted.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was installed already; /metrics may be empty");
        }
        describe();
        handle
    })
}

/// The HELP lines.
fn describe() {
    metrics::describe_counter!(
        "kvq_api_http_requests_total",
        "HTTP requests answered, by method, route pattern and status."
    );
    metrics::describe_histogram!(
        "kvq_api_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from a request's arrival to its answer, by method and route pattern."
    );
    metrics::describe_counter!(
        "kvq_api_writes_accepted_total",
        "Writes queued (answered 202), by operation."
    );
    metrics::describe_gauge!(
        "kvq_queue_jobs",
        "Jobs in the queue stream, waiting or in flight, at the last scrape."
    );
    metrics::describe_gauge!(
        "kvq_dead_jobs",
        "Dead letters (jobs whose retries ran out) at the last scrape."
    );
}

/// Compacts histograms now and then, for as long as the process runs.
pub async fn upkeep() {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    loop {
        every.tick().await;
        handle().run_upkeep();
    }
}

/// Counts and times every request.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let response = next.call(req).await?;
    let route = response
        .request()
        .match_pattern()
        .map_or_else(|| "unmatched".to_owned(), |p| readable(&p));
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route)];
    metrics::histogram!("kvq_api_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    let [method, route] = labels;
    metrics::counter!(
        "kvq_api_http_requests_total",
        &[method, route, ("status", status)]
    )
    .increment(1);
    Ok(response)
}

/// `/v1/kv/{key:.*}` → `/v1/kv/{key}`.
fn readable(pattern: &str) -> String {
    pattern.replace(":.*}", "}")
}

/// Counts an accepted write.
pub fn write_accepted(op: kvq_shared::jobs::Op) {
    metrics::counter!("kvq_api_writes_accepted_total", "op" => op.as_str()).increment(1);
}

/// `GET /metrics`: Prometheus text. The queue gauges are left out when the
/// queue Redis does not answer; the rest is always there.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses((status = 200, description = "Prometheus text exposition (version 0.0.4)", body = String, content_type = "text/plain")),
)]
pub async fn render(state: web::Data<AppState>) -> HttpResponse {
    match tokio::time::timeout(state.read_attempt_timeout(), state.queue.depths()).await {
        Ok(Ok((queued, dead))) => {
            metrics::gauge!("kvq_queue_jobs").set(queued as f64);
            metrics::gauge!("kvq_dead_jobs").set(dead as f64);
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "could not read the queue depth for /metrics"),
        Err(_) => tracing::warn!("the queue Redis did not answer in time for /metrics"),
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle().render())
}

#[cfg(test)]
mod tests {
    #[test]
    fn patterns_read_as_documented() {
        assert_eq!(super::readable("/v1/kv/{key:.*}"), "/v1/kv/{key}");
        assert_eq!(super::readable("/v1/jobs/{id}"), "/v1/jobs/{id}");
    }
}
