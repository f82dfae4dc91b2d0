//! `kvq-worker`: loads the configuration, sets up logging, consumes jobs
//! until SIGTERM or ctrl-c, then drains.

use std::process::ExitCode;

use clap::Parser;
use kvq_shared::{Config, telemetry};
use kvq_worker::startup::Worker;

/// mimalloc: with glibc's malloc, allocation was about a third of the
/// worker's CPU (BENCHMARKS.md, "Batching through the write path"). The
/// API keeps glibc's, whose `mmap_threshold` tunable (the Dockerfile sets
/// it) hands large freed bodies back to the system at once, which its
/// memory bounds rely on.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// kvq's queue worker: owns a share of the queue's partitions and applies
/// their jobs to the data Redis, in order per key, exactly once; stops
/// taking jobs on SIGTERM or ctrl-c and finishes the ones it runs.
#[derive(Parser)]
#[command(
    name = "kvq-worker",
    version,
    after_help = "\
Configuration comes from the environment, never from flags (README, \"Configuration\"):
  KVQ_KV_REDIS_URL          the data Redis (default redis://127.0.0.1:6379)
  KVQ_QUEUE_REDIS_URL       the queue Redis (default redis://127.0.0.1:6380)
  KVQ_WORKER_HEALTH_BIND    health and /metrics address (default 127.0.0.1:9091)
  KVQ_WORKER_CONCURRENCY    jobs run at once (default 32)
  KVQ_WORKER_MAX_ATTEMPTS   runs before a failing job is dead
  KVQ_LOG_FORMAT            json or text
  OTEL_EXPORTER_OTLP_ENDPOINT  export traces over OTLP when set

Exit status: 0 after a clean stop, 1 when the worker could not start or
failed, 2 for a usage or configuration error."
)]
struct Cli {}

#[tokio::main]
async fn main() -> ExitCode {
    // Flags first: --help and --version need no configuration; anything
    // else given is an error.
    Cli::parse();
    kvq_shared::store::install_tls_provider();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kvq-worker: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = telemetry::init(config.log_format, "kvq-worker");
    let code = work(config).await;
    telemetry.shutdown();
    code
}

/// Builds the worker and runs it until SIGTERM or ctrl-c.
async fn work(config: Config) -> ExitCode {
    let worker = match Worker::build(config.clone()) {
        Ok(worker) => worker,
        Err(e) => {
            tracing::error!(error = %e, "could not start");
            eprintln!("kvq-worker: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        worker = worker.name(),
        health_port = worker.health_port(),
        kv_redis = %config.kv_redis,
        queue_redis = %config.queue_redis,
        namespace = %config.namespace,
        "kvq-worker starting"
    );
    match worker.run_until(shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("kvq-worker stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "kvq-worker failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops the worker");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
