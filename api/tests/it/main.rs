//! kvq-api's integration tests: real redis-server processes, the real
//! `kvq-api` and `kvq-worker` binaries, HTTP over loopback.

#![allow(clippy::unwrap_used)]

mod attacks;
mod auth;
mod batch;
mod batching;
mod cluster;
mod crashes;
mod errors;
mod flags;
mod guarantees;
mod hardening;
mod health;
mod idempotency;
mod jobs;
mod kv;
mod legacy;
mod list;
mod memory;
mod openapi;
mod reshard;
mod resilience;
mod stalls;
mod stats;
mod traces;
mod ui;
mod writepath;
