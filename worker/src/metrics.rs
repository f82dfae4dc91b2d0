//! The worker's metrics, kept with the `metrics` crate and served as
//! Prometheus text on `KVQ_WORKER_HEALTH_BIND` at `/metrics`:
//!
//! - `kvq_worker_jobs_total{status}`: jobs this worker ended, by final
//!   status (`succeeded`, `failed`, `dead`);
//! - `kvq_worker_job_retries_total`, `kvq_worker_job_deferrals_total`,
//!   `kvq_worker_redeliveries_total`, `kvq_worker_jobs_fenced_total`;
//! - `kvq_worker_jobs_in_flight`: jobs the handler is running now;
//! - `kvq_worker_job_duration_seconds{op}` (a histogram): one run of the
//!   handler, whatever its end;
//! - `kvq_worker_enqueue_to_applied_seconds{op}` (a histogram): from the
//!   job's `enqueued_at` (the API's clock) to its outcome recorded (the
//!   worker's clock), for jobs that ended;
//! - `kvq_build_info{component="worker",version}`: always 1.
//!
//! `op` is `create`, `update`, `upsert` or `delete`: every label has a fixed, small
//! set of values.

use std::sync::OnceLock;
use std::time::Duration;

use kvq_shared::jobs::Op;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of one handler run, in seconds: an apply on loopback takes well
/// under a millisecond; a run waiting on a stalled Redis, seconds.
const RUN_BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Buckets of enqueue → applied, in seconds: milliseconds when workers keep
/// up, minutes when a backlog drains.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
];

/// How often histograms are compacted.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("kvq_worker_job_duration_seconds".into()),
                &RUN_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("kvq_worker_enqueue_to_applied_seconds".into()),
                    &LATENCY_BUCKETS,
                )
            })
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was installed already; /metrics may be empty");
        }
        describe();
        metrics::gauge!(
            "kvq_build_info",
            "component" => "worker",
            "version" => env!("CARGO_PKG_VERSION")
        )
        .set(1.0);
        handle
    })
}

/// The HELP lines.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "kvq_worker_jobs_total",
        "Jobs this worker ended, by final status."
    );
    describe_counter!(
        "kvq_worker_job_retries_total",
        "Runs that hit an error a Redis server answered, retried."
    );
    describe_counter!(
        "kvq_worker_job_deferrals_total",
        "Runs put off while a Redis server was unreachable (not counted as attempts)."
    );
    describe_counter!(
        "kvq_worker_redeliveries_total",
        "Redelivered jobs found applied already (reported, not re-applied)."
    );
    describe_counter!(
        "kvq_worker_jobs_fenced_total",
        "Jobs refused because a newer owner of their partition had taken over."
    );
    describe_gauge!(
        "kvq_worker_jobs_in_flight",
        "Jobs this worker is running now."
    );
    describe_histogram!(
        "kvq_worker_job_duration_seconds",
        Unit::Seconds,
        "One run of the job handler, by operation."
    );
    describe_histogram!(
        "kvq_worker_enqueue_to_applied_seconds",
        Unit::Seconds,
        "From a job's enqueued_at to its outcome recorded, by operation."
    );
    describe_gauge!(
        "kvq_build_info",
        "The running build: always 1, labelled with the component and its version."
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

/// The Prometheus text exposition.
pub fn render() -> String {
    handle().render()
}

/// The handles of the worker's metrics, registered (at 0) when made.
pub struct Metrics {
    /// Jobs that ended `succeeded`.
    pub succeeded: Counter,
    /// Jobs that ended `failed` (business outcome).
    pub failed: Counter,
    /// Jobs that ended `dead`.
    pub dead: Counter,
    /// Runs that hit an error Redis answered and will be retried.
    pub retried: Counter,
    /// Runs put off because a Redis server was unreachable (not counted as
    /// attempts).
    pub deferred: Counter,
    /// Redelivered jobs that had been applied already.
    pub redelivered: Counter,
    /// Jobs refused because a newer owner of their partition took over.
    pub fenced: Counter,
    /// Jobs the handler is running now.
    pub in_flight: Gauge,
    /// Run durations, by operation.
    runs: [Histogram; 4],
    /// Enqueue → applied, by operation.
    latencies: [Histogram; 4],
}

impl Default for Metrics {
    fn default() -> Self {
        handle();
        let ops = [Op::Create, Op::Update, Op::Upsert, Op::Delete];
        let status = |s: &'static str| metrics::counter!("kvq_worker_jobs_total", "status" => s);
        Self {
            succeeded: status("succeeded"),
            failed: status("failed"),
            dead: status("dead"),
            retried: metrics::counter!("kvq_worker_job_retries_total"),
            deferred: metrics::counter!("kvq_worker_job_deferrals_total"),
            redelivered: metrics::counter!("kvq_worker_redeliveries_total"),
            fenced: metrics::counter!("kvq_worker_jobs_fenced_total"),
            in_flight: metrics::gauge!("kvq_worker_jobs_in_flight"),
            runs: ops.map(|op| {
                metrics::histogram!("kvq_worker_job_duration_seconds", "op" => op.as_str())
            }),
            latencies: ops.map(|op| {
                metrics::histogram!("kvq_worker_enqueue_to_applied_seconds", "op" => op.as_str())
            }),
        }
    }
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Create => 0,
        Op::Update => 1,
        Op::Upsert => 2,
        Op::Delete => 3,
    }
}

impl Metrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &Counter) {
        counter.increment(1);
    }

    /// Records one run of a job of `op` that took `took`.
    pub fn run(&self, op: Op, took: Duration) {
        self.runs[op_index(op)].record(took.as_secs_f64());
    }

    /// Records that a job of `op` queued at `enqueued_ms` had its outcome
    /// recorded at `now_ms` (Unix ms; clocks of two machines, so a
    /// negative difference counts as 0).
    pub fn applied(&self, op: Op, enqueued_ms: i64, now_ms: i64) {
        #[allow(clippy::cast_precision_loss)]
        let seconds = now_ms.saturating_sub(enqueued_ms).max(0) as f64 / 1000.0;
        self.latencies[op_index(op)].record(seconds);
    }
}

/// Counts a job in flight for as long as it lives.
pub struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    /// Counts one more job in `gauge`.
    pub fn new(gauge: &'a Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
