//! kvq-worker's integration tests: real redis-server processes, the real
//! `kvq-api` and `kvq-worker` binaries, signals sent to real processes.

#![allow(clippy::unwrap_used)]

mod lifecycle;
mod manifests;
mod pickup;
mod retries;
