//! The queue's figures as `GET /v1/stats` shows them, and the rates the API
//! works out from them.
//!
//! The figures are read from the queue Redis
//! ([`kvq_shared::queue::JobQueue::stats`]). Accepted and applied writes per
//! second come from two samples of the partitions' counters: the last
//! sample, kept per process, and a new one, taken when the last is at least
//! [`RATE_EVERY`] old (reads in between answer the rates of the last
//! sample, so several dashboards polling at once do not make the rates
//! jump). The first read answers 0.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvq_shared::jobs::rfc3339;
use kvq_shared::queue::QueueStats;
use serde::Serialize;
use utoipa::ToSchema;

/// How old the last sample must be for a new one to give the rates.
pub const RATE_EVERY: Duration = Duration::from_secs(1);

/// The 200 body of `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsBody {
    /// When the queue Redis was read (its clock), RFC 3339.
    #[schema(example = "2026-12-02T15:00:00.000Z")]
    pub at: String,
    /// Every partition, in order.
    pub partitions: Vec<PartitionBody>,
    /// Jobs by status.
    pub jobs: JobsBody,
    /// The live workers (a heartbeat within one partition lease), by id.
    pub workers: Vec<WorkerBody>,
    /// Writes per second.
    pub rates: RatesBody,
}

/// One partition of `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionBody {
    /// The partition.
    pub partition: u16,
    /// Jobs not yet final (after the committed position).
    pub depth: u64,
    /// The age of the oldest job not yet final; 0 when there is none.
    pub lag_seconds: f64,
    /// When that job was queued; `null` when there is none.
    pub oldest_enqueued_at: Option<String>,
    /// The worker that holds the partition's lease; `null` when none does.
    pub owner: Option<String>,
    /// Jobs queued in the partition.
    pub accepted_total: u64,
    /// Jobs of the partition that are final and committed.
    pub done_total: u64,
}

/// Jobs by status in `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobsBody {
    /// Jobs not yet final, over every partition (waiting, running, or
    /// waiting to be retried).
    pub waiting: u64,
    /// Jobs running now: not known to the queue Redis; always `null` (the
    /// workers' `kvq_worker_jobs_in_flight` gauges have it).
    pub running: Option<u64>,
    /// Dead letters.
    pub dead: u64,
    /// Jobs that ended `succeeded`.
    pub succeeded_total: Option<u64>,
    /// Jobs that ended `failed` (a business outcome).
    pub failed_total: Option<u64>,
}

/// A live worker in `GET /v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerBody {
    /// Its name.
    pub id: String,
    /// Its last heartbeat, RFC 3339.
    pub last_heartbeat: String,
    /// The partitions whose lease it holds.
    pub partitions: Vec<u16>,
}

/// Writes per second in `GET /v1/stats`.
#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema)]
pub struct RatesBody {
    /// Jobs queued per second, over every partition.
    pub accepted_per_second: f64,
    /// Jobs that became final (and committed) per second.
    pub applied_per_second: f64,
}

/// One sample of the counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    accepted: u64,
    done: u64,
}

/// The rates of one API process (see the module's doc).
#[derive(Debug, Default)]
pub struct Rates {
    last: Mutex<Option<(Sample, RatesBody)>>,
}

impl Rates {
    /// The rates given the counters read now.
    fn update(&self, accepted: u64, done: u64) -> RatesBody {
        let now = Sample {
            at: Instant::now(),
            accepted,
            done,
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some((before, rates)) if now.at.duration_since(before.at) < RATE_EVERY => rates,
            Some((before, _)) => {
                let secs = now.at.duration_since(before.at).as_secs_f64();
                // A counter that went down (the queue Redis lost its data)
                // counts from zero again.
                #[allow(clippy::cast_precision_loss)]
                let per_second = |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
                let rates = RatesBody {
                    accepted_per_second: per_second(accepted, before.accepted),
                    applied_per_second: per_second(done, before.done),
                };
                *last = Some((now, rates));
                rates
            }
            None => {
                *last = Some((now, RatesBody::default()));
                RatesBody::default()
            }
        }
    }
}

/// The body of `GET /v1/stats` for `stats`, updating `rates`.
pub fn body(stats: &QueueStats, rates: &Rates) -> StatsBody {
    let sum = |f: fn(&kvq_shared::queue::PartitionStats) -> u64| -> u64 {
        stats.partitions.iter().map(f).sum()
    };
    StatsBody {
        at: rfc3339(stats.at_ms),
        partitions: stats
            .partitions
            .iter()
            .map(|p| PartitionBody {
                partition: p.partition,
                depth: p.depth,
                lag_seconds: (p.lag.as_secs_f64() * 1000.0).round() / 1000.0,
                oldest_enqueued_at: p
                    .oldest_queued_us
                    .map(|us| rfc3339(i64::try_from(us / 1000).unwrap_or(i64::MAX))),
                owner: p.owner.clone(),
                accepted_total: p.accepted_total,
                done_total: p.done_total,
            })
            .collect(),
        jobs: JobsBody {
            waiting: sum(|p| p.depth),
            running: None,
            dead: sum(|p| p.dead),
            succeeded_total: Some(sum(|p| p.succeeded_total)),
            failed_total: Some(sum(|p| p.failed_total)),
        },
        workers: stats
            .workers
            .iter()
            .map(|w| WorkerBody {
                id: w.id.clone(),
                last_heartbeat: rfc3339(w.last_heartbeat_ms),
                partitions: stats.partitions_of(&w.id),
            })
            .collect(),
        rates: rates.update(sum(|p| p.accepted_total), sum(|p| p.done_total)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_answers_zero_and_later_ones_a_rate() {
        let rates = Rates::default();
        let first = rates.update(100, 50);
        assert!(first.accepted_per_second == 0.0 && first.applied_per_second == 0.0);
        // Within the interval: the last rates again.
        let soon = rates.update(200, 100);
        assert!(soon.accepted_per_second == 0.0);
        if let Some((sample, _)) = rates.last.lock().expect("not poisoned").as_mut() {
            sample.at -= Duration::from_secs(2);
        }
        let later = rates.update(300, 150);
        assert!((later.accepted_per_second - 100.0).abs() < 1.0, "{later:?}");
        assert!((later.applied_per_second - 50.0).abs() < 1.0, "{later:?}");
    }
}
