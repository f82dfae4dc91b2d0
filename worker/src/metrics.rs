//! The worker's counters, served as Prometheus text on
//! `KVQ_WORKER_HEALTH_BIND` at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since the process started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs that ended `succeeded`.
    pub succeeded: AtomicU64,
    /// Jobs that ended `failed` (business outcome).
    pub failed: AtomicU64,
    /// Jobs that ended `dead`.
    pub dead: AtomicU64,
    /// Runs that hit a Redis error and will be retried.
    pub retried: AtomicU64,
    /// Runs re-queued to wait for an earlier write to their key.
    pub deferred: AtomicU64,
    /// Redelivered jobs that had been applied already.
    pub redelivered: AtomicU64,
    /// Sequence numbers given up on after the gap timeout.
    pub gap_seqs_skipped: AtomicU64,
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
                "Runs that hit a Redis error and were retried.",
                &self.retried,
            ),
            (
                "kvq_worker_order_deferrals_total",
                "Runs re-queued to wait for an earlier write to their key.",
                &self.deferred,
            ),
            (
                "kvq_worker_redeliveries_total",
                "Redelivered jobs found applied already (reported, not re-applied).",
                &self.redelivered,
            ),
            (
                "kvq_worker_order_gap_seqs_skipped_total",
                "Sequence numbers given up on after KVQ_ORDER_GAP_TIMEOUT_SECONDS.",
                &self.gap_seqs_skipped,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", get(counter));
        }
        out
    }
}
