//! The job queue: apalis' Redis storage on the queue Redis, with kvq's
//! settings. The API pushes with [`JobQueue::push`]; workers build their
//! backend with [`storage`].
//!
//! Settings that guard apalis-redis 1.0's sharp edges:
//! - the queue is named by [`keys::queue_name`], never after the Rust type;
//! - the heartbeat is short (`KVQ_WORKER_HEARTBEAT_MS`, 250 ms): an idle
//!   worker only fetches at its heartbeat, so this bounds pickup latency;
//! - a worker counts as dead after [`ORPHAN_AFTER`] without a heartbeat (whole
//!   seconds, kept well above the heartbeat, since apalis stores heartbeats
//!   in whole seconds and a window under a few seconds makes workers reap
//!   themselves); its in-flight jobs are then re-queued.

use std::time::Duration;

use apalis::prelude::{TaskBuilder, TaskId, TaskSink, TaskSinkError};
use apalis_redis::RedisStorage;
use redis::aio::ConnectionManager;

use crate::config::Config;
use crate::error::StoreError;
use crate::jobs::ApplyJob;
use crate::keys;

/// How long a worker may miss heartbeats before its jobs go to others.
pub const ORPHAN_AFTER: Duration = Duration::from_secs(6);

/// apalis' storage config for kvq's queue.
pub fn storage_config(config: &Config) -> apalis_redis::Config {
    let heartbeat = config.worker_heartbeat;
    let missed = (ORPHAN_AFTER.as_millis() / heartbeat.as_millis().max(1)).max(2);
    apalis_redis::Config::default()
        .queue(keys::queue_name(&config.namespace))
        .heartbeat_interval(heartbeat)
        .missed_heartbeats(usize::try_from(missed).unwrap_or(usize::MAX))
}

/// The apalis storage for kvq's queue on `conn`.
pub fn storage(conn: ConnectionManager, config: &Config) -> RedisStorage<ApplyJob> {
    RedisStorage::new(conn).with_config(storage_config(config))
}

/// The producer side of the queue.
#[derive(Clone)]
pub struct JobQueue {
    storage: RedisStorage<ApplyJob>,
    conn: ConnectionManager,
}

impl JobQueue {
    /// The queue on the queue Redis reached through `conn`.
    pub fn new(conn: ConnectionManager, config: &Config) -> Self {
        Self {
            storage: storage(conn.clone(), config),
            conn,
        }
    }

    /// Pushes `job` under its own id; once this returns `Ok`, the job is in
    /// the queue Redis.
    #[tracing::instrument(skip_all, fields(job_id = %job.id))]
    pub async fn push(&self, job: &ApplyJob) -> Result<(), StoreError> {
        let task = TaskBuilder::new(job.clone())
            .task_id(TaskId::from_string(job.id.clone()))
            .build();
        match self.storage.clone().push_task(task).await {
            Ok(()) => Ok(()),
            Err(TaskSinkError::PushError(apalis_redis::Error::Database(e))) => {
                Err(StoreError::Redis(e))
            }
            Err(e) => Err(StoreError::Queue(e.to_string())),
        }
    }

    /// Answers `PING` on the queue Redis.
    pub async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
