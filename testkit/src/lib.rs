//! `kvq-testkit`: the harness kvq's integration tests share. Everything is
//! real: `redis-server` processes, the `kvq-api` and `kvq-worker` binaries,
//! and HTTP over loopback. Every process is killed when its guard drops.
//!
//! # Layout
//! - [`TestRedis`]: a `redis-server` on a free port, `--save ""`, plain or
//!   TLS only.
//! - [`TestCa`]: a CA made for one test, signing TLS servers' certificates.
//! - [`KvqProcess`]: a running `kvq-api` or `kvq-worker`, its log lines
//!   captured, with SIGTERM / SIGKILL / SIGSTOP helpers.
//! - [`Stack`]: two Redis servers, one API and N workers, with typed request
//!   helpers.
//! - [`flood`]: the worst write bodies, sent many at once over raw HTTP/1.1,
//!   and a process's memory from `/proc`.
//! - [`eventually`]: polling with a deadline, instead of sleeps.

#![allow(clippy::unwrap_used)] // a test harness panics loudly by design

pub mod auth;
pub mod flood;
mod process;
mod redis_server;
mod stack;
mod tls;

pub use auth::{TEST_JWT_SECRET, token};
pub use process::{KvqProcess, bin_path};
pub use redis_server::{TestRedis, free_port};
pub use stack::{Stack, StackBuilder};
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
