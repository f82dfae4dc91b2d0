//! `kvq-worker`: consumes kvq's job queue and applies each write to the KV
//! Redis, atomically and in per-key order, recording each job's outcome.
//!
//! # Layout
//! - [`startup`]: [`startup::Worker`] builds the process (health listener
//!   bound first, so tests use port 0) and runs the apalis worker under a
//!   supervisor that restarts it after queue errors and drains it on stop.
//! - [`apply`]: the job handler.
//! - [`metrics`]: counters, gauges and histograms (the `metrics` crate),
//!   served at `/metrics` beside `/healthz`.

pub mod apply;
pub mod metrics;
pub mod startup;
