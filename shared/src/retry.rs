//! The one place that decides how kvq retries a failing Redis call, so the
//! policy (and the crate behind it, `backoff`) can change in one file.

use std::future::Future;
use std::time::Duration;

use backoff::ExponentialBackoffBuilder;

use crate::error::StoreError;

/// Runs `op` until it succeeds, fails permanently, or `budget` has passed,
/// waiting 25 ms, 50 ms, 100 ms, ... (capped at 500 ms, with jitter) between
/// tries. Each try is cut off after `attempt_timeout`, so a stalled Redis
/// cannot hold the caller past about `budget + attempt_timeout`. Only
/// [`StoreError::is_transient`] errors are retried.
pub async fn with_backoff<T, F, Fut>(
    budget: Duration,
    attempt_timeout: Duration,
    mut op: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let policy = ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(25))
        .with_multiplier(2.0)
        .with_randomization_factor(0.3)
        .with_max_interval(Duration::from_millis(500))
        .with_max_elapsed_time(Some(budget))
        .build();
    backoff::future::retry(policy, || {
        let attempt = op();
        async move {
            match tokio::time::timeout(attempt_timeout, attempt).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) if e.is_transient() => {
                    tracing::debug!(error = %e, "transient redis error, retrying");
                    Err(backoff::Error::transient(e))
                }
                Ok(Err(e)) => Err(backoff::Error::permanent(e)),
                Err(_) => Err(backoff::Error::transient(StoreError::Timeout(
                    attempt_timeout,
                ))),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn gives_up_within_the_budget() {
        let tries = AtomicU32::new(0);
        let started = std::time::Instant::now();
        let result: Result<(), _> = with_backoff(
            Duration::from_millis(300),
            Duration::from_millis(100),
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::Timeout(Duration::ZERO))
            },
        )
        .await;
        assert!(matches!(result, Err(StoreError::Timeout(_))));
        assert!(tries.load(Ordering::SeqCst) >= 3);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let tries = AtomicU32::new(0);
        let result: Result<(), _> =
            with_backoff(Duration::from_secs(5), Duration::from_secs(1), || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::Corrupt("x".into()))
            })
            .await;
        assert!(result.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }
}
