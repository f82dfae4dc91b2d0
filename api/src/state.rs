//! [`AppState`]: what every handler shares, one per server thread.

use std::sync::Arc;
use std::time::Duration;

use kvq_shared::connection::Connector;
use kvq_shared::jobs::JobRecords;
use kvq_shared::queue::JobQueue;
use kvq_shared::store::KvStore;
use kvq_shared::{Config, StoreError};

use crate::wait::Waiters;

/// What every handler shares.
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// The KV Redis.
    pub kv: KvStore,
    /// Job records in the queue Redis.
    pub records: JobRecords,
    /// The queue.
    pub queue: JobQueue,
    /// Requests waiting for jobs (`Prefer: wait`), shared by all threads.
    pub waiters: Waiters,
}

impl AppState {
    /// Lazily connected stores for one worker thread.
    pub(crate) fn new(
        config: &Arc<Config>,
        kv: &Connector,
        queue: &Connector,
        waiters: &Waiters,
    ) -> Result<Self, StoreError> {
        let queue_conn = queue.connect()?;
        Ok(Self {
            kv: KvStore::new(
                kv.connect()?,
                &config.namespace,
                kv.wait(),
                config.redis_timeout,
            ),
            records: JobRecords::new(queue_conn.clone(), config),
            queue: JobQueue::new(queue_conn, config, queue.wait()),
            config: config.clone(),
            waiters: waiters.clone(),
        })
    }

    /// How long one read attempt may take before it is retried.
    pub fn read_attempt_timeout(&self) -> Duration {
        self.config
            .redis_timeout
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(50))
    }
}
