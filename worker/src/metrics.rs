//! The worker's counters, served as Prometheus text on
//! `KVQ_WORKER_HEALTH_BIND` at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters since the process started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs that ended `succeeded`.
    pub succeeded: AtomicU64,
    /// Jobs that ended `failed` (business outcome).
    pub failed: AtomicU64,
    /// Jobs that ended `dead`.
    pub dead: AtomicU64,
    /// Runs that hit an error Redis answered and will be retried.
    pub retried: AtomicU64,
    /// Runs put off because a Redis server was unreachable (not counted as
    /// attempts).
    pub deferred: AtomicU64,
    /// Redelivered jobs that had been applied already.
    pub redelivered: AtomicU64,
    /// Jobs refused because a newer owner of their partition took over.
    pub fenced: AtomicU64,
    /// Jobs the handler is running now.
    pub in_flight: AtomicI64,
}

impl Metrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kvq_worker_jobs_total Jobs this worker ended, by final status."
        );
        let _ = writeln!(out, "# TYPE kvq_worker_jobs_total counter");
        for (status, counter) in [
            ("succeeded", &self.succeeded),
            ("failed", &self.failed),
            ("dead", &self.dead),
        ] {
            let _ = writeln!(
                out,
                "kvq_worker_jobs_total{{status=\"{status}\"}} {}",
                get(counter)
            );
        }
        for (name, help, counter) in [
            (
                "kvq_worker_job_retries_total",
                "Runs that hit an error a Redis server answered, retried.",
                &self.retried,
            ),
            (
                "kvq_worker_job_deferrals_total",
                "Runs put off while a Redis server was unreachable (not counted as attempts).",
                &self.deferred,
            ),
            (
                "kvq_worker_redeliveries_total",
                "Redelivered jobs found applied already (reported, not re-applied).",
                &self.redelivered,
            ),
            (
                "kvq_worker_jobs_fenced_total",
                "Jobs refused because a newer owner of their partition had taken over.",
                &self.fenced,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", get(counter));
        }
        let _ = writeln!(
            out,
            "# HELP kvq_worker_jobs_in_flight Jobs this worker is running now."
        );
        let _ = writeln!(out, "# TYPE kvq_worker_jobs_in_flight gauge");
        let _ = writeln!(
            out,
            "kvq_worker_jobs_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        out
    }
}

/// Counts a job in flight for as long as it lives.
pub struct InFlight<'a>(&'a AtomicI64);

impl<'a> InFlight<'a> {
    /// Counts one more job in `gauge`.
    pub fn new(gauge: &'a AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
