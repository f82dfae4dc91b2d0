//! `kvq-shared`: what the kvq API and workers agree on.
//!
//! kvq is a key-value store whose writes go through a durable queue: the API
//! validates a write and queues it, with its job record, in one script on the
//! *queue* Redis (a partitioned queue run by apalis workers); each
//! partition's owner applies its jobs to the *KV* Redis in order, each with
//! one atomic Lua script; reads go straight to the KV Redis.
//!
//! # Layout
//! - [`config`]: the typed `KVQ_*` configuration.
//! - [`connection`]: connections to a Redis role: one server, a cluster, or
//!   a master behind Sentinel.
//! - [`keys`]: every Redis key's shape, one function each.
//! - [`jobs`]: the job type, outcomes, and the job records clients poll.
//! - [`store`]: the KV Redis: reads, the apply script, listing.
//! - [`queue`]: the partitioned queue: accepting jobs, and the apalis backend.
//! - [`retry`]: the one retry policy for Redis calls.
//! - [`error`]: store errors.
//! - [`telemetry`]: logs, and OpenTelemetry traces carried from request to
//!   job.

pub mod config;
pub mod connection;
pub mod error;
pub mod group;
pub mod jobs;
pub mod keys;
pub mod queue;
pub mod retry;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use error::StoreError;
