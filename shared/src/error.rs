//! Errors of the Redis-backed stores.

use std::time::Duration;

use thiserror::Error;

/// A store operation that did not complete.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// Redis refused, dropped or failed the command.
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The queue library failed for a reason other than Redis.
    #[error("queue error: {0}")]
    Queue(String),
    /// Not sent: it waited longer than the Redis timeout for its group to
    /// be sent (the server is slow or stalls). Nothing ran; try again.
    #[error("not sent: {0}")]
    Unsent(String),
    /// Redis answered with data kvq did not write.
    #[error("unexpected data in redis: {0}")]
    Corrupt(String),
    /// The write is on the master, but fewer replicas than
    /// `KVQ_*_REDIS_WAIT_REPLICAS` confirmed it in time: it is lost if the
    /// master fails before one does.
    #[error("{confirmed} of {wanted} replicas confirmed the write within {within:?}")]
    NotReplicated {
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that confirmed.
        confirmed: u32,
        /// How long `WAIT` waited.
        within: Duration,
    },
}

impl StoreError {
    /// Whether trying again later may succeed (connection and timeout
    /// errors), as opposed to a bug or corrupt data.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Timeout(_) | StoreError::NotReplicated { .. } | StoreError::Unsent(_) => {
                true
            }
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.kind(),
                        redis::ErrorKind::Server(
                            redis::ServerErrorKind::BusyLoading
                                // A cluster moving a slot, or failing over.
                                | redis::ServerErrorKind::Moved
                                | redis::ServerErrorKind::Ask
                                | redis::ServerErrorKind::TryAgain
                                | redis::ServerErrorKind::ClusterDown
                                | redis::ServerErrorKind::MasterDown
                                | redis::ServerErrorKind::ReadOnly
                        )
                    )
            }
            StoreError::Corrupt(_) | StoreError::Queue(_) => false,
        }
    }
}

impl StoreError {
    /// Whether Redis may have run the command although the caller got this
    /// error: a timeout or a connection lost after the command was sent.
    /// An error Redis answered, a refused connection or corrupt data means it
    /// did not.
    pub fn may_have_run(&self) -> bool {
        match self {
            StoreError::Timeout(_) | StoreError::NotReplicated { .. } => true,
            StoreError::Redis(e) => {
                !e.is_connection_refusal() && !matches!(e.kind(), redis::ErrorKind::Server(_))
            }
            StoreError::Corrupt(_) | StoreError::Queue(_) | StoreError::Unsent(_) => false,
        }
    }
}

/// `error: cause: cause's cause ...`, for logs.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
