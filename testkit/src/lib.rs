//! `kvq-testkit`: the harness kvq's integration tests share. Everything is
//! real: `redis-server` processes, the `kvq-api` and `kvq-worker` binaries,
//! and HTTP over loopback. Every process is killed when its guard drops.
//!
//! # Layout
//! - [`TestRedis`]: a `redis-server` on a free port, `--save ""`, plain or
//!   TLS only.
//! - [`TestCluster`]: a Redis Cluster of 3 masters with one replica each
//!   (6 [`TestRedis`] nodes with `--cluster-enabled yes`, formed by
//!   `redis-cli --cluster create`), with a password or TLS if asked.
//!   Ports come from 20000–22767 so the cluster bus (port + 10000) is free
//!   too; `cluster-node-timeout` is 2 s, so a failover takes about 4 s. It
//!   answers which node is master of what (`CLUSTER NODES`, asked of a
//!   live node), kills and restarts nodes, waits for a failover, and runs
//!   commands through a redis-rs `ClusterClient`.
//! - [`TestSentinel`]: a master, its replica and 3 sentinels (quorum 2,
//!   `down-after-milliseconds` 1 s, `failover-timeout` 2 s): a failover
//!   takes about 2.5 s. It names the master as the sentinels do, kills it,
//!   waits for the failover and restarts a node as the new master's
//!   replica.
//! - [`TestCa`]: a CA made for one test, signing TLS servers' certificates.
//! - [`KvqProcess`]: a running `kvq-api` or `kvq-worker`, its log lines
//!   captured, with SIGTERM / SIGKILL / SIGSTOP helpers.
//! - [`Stack`]: the data and queue Redis (each a single server, a
//!   [`TestCluster`] or a [`TestSentinel`], see [`RedisRole`]), one API and N
//!   workers, with typed request helpers.
//! - [`flood`]: the worst write bodies, sent many at once over raw HTTP/1.1,
//!   and a process's memory from `/proc`.
//! - [`eventually`]: polling with a deadline, instead of sleeps.

#![allow(clippy::unwrap_used)] // a test harness panics loudly by design

pub mod auth;
pub mod flood;
mod node_checks;
mod process;
pub mod redis_cluster;
pub mod redis_sentinel;
mod redis_server;
mod stack;
mod tls;

pub use auth::{TEST_JWT_SECRET, token};
pub use process::{KvqProcess, bin_path};
pub use redis_cluster::TestCluster;
pub use redis_sentinel::TestSentinel;
pub use redis_server::{TestRedis, free_port};
pub use stack::{RedisRole, Stack, StackBuilder};
pub use tls::TestCa;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what`
/// once `deadline` has passed.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` (e.g. `"TERM"`, `"KILL"`, `"STOP"`, `"CONT"`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}
