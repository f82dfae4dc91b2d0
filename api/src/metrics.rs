//! The API's Prometheus metrics, served at `GET /metrics`:
//!
//! - `kvq_api_http_requests_total{method, route, status}` and
//!   `kvq_api_http_request_duration_seconds{method, route}` (a histogram), for
//!   every request; `route` is the route's pattern (`/v1/kv/{key}`), never
//!   the raw path, so a client cannot blow up the number of series;
//! - `kvq_api_writes_accepted_total{op}`;
//! - `kvq_queue_jobs` (jobs waiting, in flight or waiting to be retried),
//!   `kvq_dead_jobs` (dead letters), and per partition
//!   `kvq_queue_partition_jobs{partition}` (its depth) and
//!   `kvq_queue_lag_seconds{partition}` (the age of its oldest job not yet
//!   final, 0 when none), read from the queue Redis for alerts and for
//!   scaling workers on the backlog. `/metrics` is open to anyone, so they
//!   are read at most once per [`QUEUE_GAUGES_EVERY`] per process (one
//!   pipeline of one script call per partition; concurrent scrapes share one
//!   read, see [`crate::refresh`]). They are left out of a scrape when the
//!   last read failed, and never shown stale: a figure older than
//!   [`QUEUE_GAUGES_EVERY`] plus the read timeout (counted from when the read
//!   started) is left out too. The partition label has at most
//!   `KVQ_QUEUE_PARTITIONS` (≤ 64) values;
//! - `kvq_redis_up{role="kv"|"queue"}`: 1 if that Redis answered the last
//!   such reading (a `PING` to the KV Redis, the figures' read for the
//!   queue Redis), else 0;
//! - `kvq_build_info{component="api",version}`: always 1;
//! - `kvq_api_body_bytes_in_flight` and `kvq_api_body_bytes_budget`: bytes
//!   of write bodies held now, and `KVQ_MAX_BODY_BYTES_IN_FLIGHT` (see
//!   [`crate::body`]).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use kvq_shared::queue::{QueueStats, streams_config};

use crate::body::BodyBudget;
use crate::refresh::Refreshed;
use crate::state::AppState;

/// Request duration buckets, in seconds: loopback reads take well under a
/// millisecond, `Prefer: wait` can hold a request for 30 s.
const BUCKETS: [f64; 15] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often, at most, one API process reads the queue gauges.
pub const QUEUE_GAUGES_EVERY: Duration = Duration::from_secs(1);

/// One reading of the gauges that come from the Redis servers: the queue's
/// figures (`None` when the read failed) and whether the KV Redis answered.
#[derive(Clone)]
pub struct RedisReading {
    queue: Option<QueueStats>,
    kv_up: bool,
}

/// The Redis gauges of one process (see [`RedisReading`]).
pub struct QueueGauges(Refreshed<RedisReading>);

impl Default for QueueGauges {
    fn default() -> Self {
        Self(Refreshed::new(QUEUE_GAUGES_EVERY))
    }
}

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
        metrics::gauge!(
            "kvq_build_info",
            "component" => "api",
            "version" => env!("CARGO_PKG_VERSION")
        )
        .set(1.0);
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
        "kvq_build_info",
        "The running build: always 1, labelled with the component and its version."
    );
    metrics::describe_counter!(
        "kvq_api_dead_jobs_retried_total",
        "Dead jobs queued again by POST /v1/jobs/{id}/retry."
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

/// A route's pattern as a metrics label, attached to its resource by
/// [`crate::routes::resource`], so that a request's route is known without
/// matching its path again.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

/// The label for a route `pattern`: `/v1/kv/{key:.*}` → `/v1/kv/{key}`.
/// Labels are interned: one allocation per route for the life of the
/// process, whatever the number of worker threads.
pub fn route_label(pattern: &str) -> RouteLabel {
    static LABELS: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let label = pattern.replace(":.*}", "}");
    let mut labels = LABELS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = labels.get(label.as_str()) {
        return RouteLabel(known);
    }
    let label: &'static str = Box::leak(label.into_boxed_str());
    labels.insert(label);
    RouteLabel(label)
}

/// One request's series: method, route, status.
type SeriesKey = (&'static str, &'static str, u16);

thread_local! {
    /// Each thread's handles of the series it has seen, so that a request
    /// costs a small map lookup, not a registry lookup with fresh labels.
    static SERIES: RefCell<HashMap<SeriesKey, (Counter, Histogram)>> =
        RefCell::new(HashMap::new());
}

/// Counts and times every request.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = method_label(req.method());
    let response = next.call(req).await?;
    let route = response
        .request()
        .app_data::<RouteLabel>()
        .map_or("unmatched", |label| label.0);
    let status = response.status().as_u16();
    SERIES.with_borrow_mut(|series| {
        let (counter, histogram) = series.entry((method, route, status)).or_insert_with(|| {
            (
                metrics::counter!(
                    "kvq_api_http_requests_total",
                    "method" => method,
                    "route" => route,
                    "status" => status.to_string()
                ),
                metrics::histogram!(
                    "kvq_api_http_request_duration_seconds",
                    "method" => method,
                    "route" => route
                ),
            )
        });
        counter.increment(1);
        histogram.record(started.elapsed().as_secs_f64());
    });
    Ok(response)
}

/// The method as a label: any method is a valid token to actix, so unknown
/// ones share one label rather than each making new series.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Registers `GET /metrics`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::routes::resource(
        "/metrics",
        [(actix_web::http::Method::GET, web::to(render))],
    ));
}

/// Counts a dead job queued again.
pub fn dead_job_retried() {
    metrics::counter!("kvq_api_dead_jobs_retried_total").increment(1);
}

/// Counts an accepted write.
pub fn write_accepted(op: kvq_shared::jobs::Op) {
    metrics::counter!("kvq_api_writes_accepted_total", "op" => op.as_str()).increment(1);
}

/// `GET /metrics`: Prometheus text. The queue gauges come from a read at
/// most [`QUEUE_GAUGES_EVERY`] old, and are left out when that read failed;
/// the rest is always there.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    description = "Prometheus text. Open to anyone; the queue gauges (`kvq_queue_jobs`, `kvq_dead_jobs`, `kvq_queue_partition_jobs{partition}`, `kvq_queue_lag_seconds{partition}`) are read from the queue Redis at most once a second per API process and shared by all scrapes, and are left out while the queue Redis does not answer; `kvq_redis_up{role}` says which Redis answered that reading.",
    responses((status = 200, description = "Prometheus text exposition (version 0.0.4)", body = String, content_type = "text/plain")),
)]
pub async fn render(
    state: web::Data<AppState>,
    gauges: web::Data<QueueGauges>,
    budget: web::Data<BodyBudget>,
) -> HttpResponse {
    let mut text = handle().render();
    for (name, help, value) in [
        (
            "kvq_api_body_bytes_in_flight",
            "Bytes of write bodies held now, from before they are read until their jobs are queued.",
            budget.in_use(),
        ),
        (
            "kvq_api_body_bytes_budget",
            "The most bytes of write bodies held at once (KVQ_MAX_BODY_BYTES_IN_FLIGHT).",
            budget.capacity(),
        ),
    ] {
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n\n"
        );
    }
    // Gauges of the Redis servers are written here, not kept in the
    // recorder, so that a failed read leaves them out instead of repeating
    // an old value.
    let timeout = state.read_attempt_timeout();
    let live_for = streams_config(&state.config).lease;
    let reading = gauges
        .0
        .get(|| async {
            let (queue, kv) = tokio::join!(
                tokio::time::timeout(timeout, state.queue.stats(live_for)),
                tokio::time::timeout(timeout, state.kv.ping()),
            );
            let queue = match queue {
                Ok(Ok(stats)) => Some(stats),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not read the queue's figures for /metrics");
                    None
                }
                Err(_) => {
                    tracing::warn!("the queue Redis did not answer in time for /metrics");
                    None
                }
            };
            RedisReading {
                queue,
                kv_up: matches!(kv, Ok(Ok(()))),
            }
        })
        .await;
    let _ = write!(
        text,
        "# HELP kvq_redis_up Whether the Redis server of this role answered the API's last reading (1) or not (0).\n# TYPE kvq_redis_up gauge\nkvq_redis_up{{role=\"kv\"}} {}\nkvq_redis_up{{role=\"queue\"}} {}\n\n",
        u8::from(reading.value.kv_up),
        u8::from(reading.value.queue.is_some()),
    );
    // Reused readings are younger than this by construction; the check keeps
    // "never stale" true whatever the reuse rule becomes.
    let fresh = reading.started.elapsed() <= QUEUE_GAUGES_EVERY + timeout;
    if let Some(stats) = reading.value.queue.as_ref().filter(|_| fresh) {
        write_queue_gauges(&mut text, stats);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text)
}

/// The queue's gauges for `stats`.
fn write_queue_gauges(text: &mut String, stats: &QueueStats) {
    let queued: u64 = stats.partitions.iter().map(|p| p.depth).sum();
    let dead: u64 = stats.partitions.iter().map(|p| p.dead).sum();
    for (name, help, value) in [
        (
            "kvq_queue_jobs",
            "Jobs waiting, in flight or waiting to be retried.",
            queued,
        ),
        (
            "kvq_dead_jobs",
            "Dead letters: jobs whose retries ran out.",
            dead,
        ),
    ] {
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n\n"
        );
    }
    let _ = writeln!(
        text,
        "# HELP kvq_queue_partition_jobs Jobs of the partition not yet final.\n# TYPE kvq_queue_partition_jobs gauge"
    );
    for p in &stats.partitions {
        let _ = writeln!(
            text,
            "kvq_queue_partition_jobs{{partition=\"{}\"}} {}",
            p.partition, p.depth
        );
    }
    let _ = writeln!(
        text,
        "\n# HELP kvq_queue_lag_seconds Age of the partition's oldest job not yet final; 0 when none.\n# TYPE kvq_queue_lag_seconds gauge"
    );
    for p in &stats.partitions {
        let _ = writeln!(
            text,
            "kvq_queue_lag_seconds{{partition=\"{}\"}} {}",
            p.partition,
            p.lag.as_secs_f64()
        );
    }
    text.push('\n');
}

#[cfg(test)]
mod tests {
    #[test]
    fn patterns_read_as_documented() {
        assert_eq!(super::route_label("/v1/kv/{key:.*}").0, "/v1/kv/{key}");
        assert_eq!(super::route_label("/v1/jobs/{id}").0, "/v1/jobs/{id}");
        // Interned: the same label, not a second copy.
        assert!(std::ptr::eq(
            super::route_label("/v1/kv/{key:.*}").0,
            super::route_label("/v1/kv/{key:.*}").0
        ));
    }
}
