//! Readings shared by a whole API process and taken at most once per
//! interval, so that the open routes (`/metrics`' queue gauges, `/readyz`'s
//! probe) cost Redis a bounded number of commands per second whatever the
//! request rate: anyone can call them, without a token or a rate limit.
//!
//! One reading is taken at a time: requests that arrive while it is under
//! way wait for it and share it (the reading itself must be bounded by a
//! timeout, which bounds their wait). A reading is reused until `every` has
//! passed since it *finished*; then the next request takes a new one.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// A value read at most once per interval per process.
pub struct Refreshed<T> {
    every: Duration,
    last: Mutex<Option<Reading<T>>>,
}

/// One reading and when it was taken.
#[derive(Debug, Clone)]
pub struct Reading<T> {
    /// What was read.
    pub value: T,
    /// When the reading started: the value is at least this old.
    pub started: Instant,
    finished: Instant,
}

impl<T: Clone> Refreshed<T> {
    /// Nothing read yet: the first [`Refreshed::get`] reads.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
        }
    }

    /// The last reading if it finished less than the interval ago, else a
    /// new one taken with `read` (which must be bounded in time).
    pub async fn get<F, Fut>(&self, read: F) -> Reading<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut last = self.last.lock().await;
        if let Some(reading) = last.as_ref()
            && reading.finished.elapsed() < self.every
        {
            return reading.clone();
        }
        let started = Instant::now();
        let value = read().await;
        let reading = Reading {
            value,
            started,
            finished: Instant::now(),
        };
        *last = Some(reading.clone());
        reading
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_reading_per_interval() {
        let refreshed = Arc::new(Refreshed::new(Duration::from_secs(3_600)));
        let reads = Arc::new(AtomicU32::new(0));
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let (refreshed, reads) = (refreshed.clone(), reads.clone());
                tokio::spawn(async move {
                    refreshed
                        .get(|| async {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            reads.fetch_add(1, Ordering::SeqCst) + 1
                        })
                        .await
                        .value
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.ok(), Some(1), "everyone got the one reading");
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_reading_older_than_the_interval_is_taken_again() {
        let refreshed = Refreshed::new(Duration::ZERO);
        assert_eq!(refreshed.get(|| async { 1 }).await.value, 1);
        assert_eq!(refreshed.get(|| async { 2 }).await.value, 2);
    }
}
