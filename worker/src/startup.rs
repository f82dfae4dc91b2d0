//! Building and running a worker process: the apalis worker (restarted if
//! its queue connection fails) and the health server.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use apalis::prelude::{WorkerBuilder, WorkerBuilderExt};
use kvq_shared::Config;
use kvq_shared::connection::Connector;
use kvq_shared::jobs::JobRecords;
use kvq_shared::queue::{self, StreamsBackend};
use kvq_shared::store::KvStore;
use tokio::sync::watch;

use crate::apply::{Applier, handle};

/// A worker process, bound but not yet running.
pub struct Worker {
    config: Arc<Config>,
    name: String,
    applier: Arc<Applier>,
    queue_client: Connector,
    health: TcpListener,
    health_port: u16,
}

impl Worker {
    /// Connects (lazily) to both Redis servers and binds the health address.
    pub fn build(config: Config) -> Result<Self, anyhow::Error> {
        let health = TcpListener::bind(config.worker_health_bind)?;
        let health_port = health.local_addr()?.port();
        let kv = Connector::new(&config.kv_redis, config.redis_timeout)?;
        let queue_client = Connector::new(&config.queue_redis, config.redis_timeout)?;
        let queue_conn = queue_client.connect()?;
        let applier = Arc::new(Applier {
            kv: KvStore::new(
                kv.connect()?,
                &config.namespace,
                kv.wait(),
                config.redis_timeout,
            ),
            records: JobRecords::new(queue_conn.clone(), &config),
            max_attempts: config.worker_max_attempts,
            metrics: Arc::default(),
        });
        // Unique per process: apalis refuses a name still heartbeating.
        let name = format!("kvq-worker-{}", uuid::Uuid::new_v4());
        Ok(Self {
            config: Arc::new(config),
            name,
            applier,
            queue_client,
            health,
            health_port,
        })
    }

    /// The port of `/healthz`.
    pub fn health_port(&self) -> u16 {
        self.health_port
    }

    /// This worker's name in the queue.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs until `shutdown` resolves, then stops fetching, lets in-flight
    /// jobs finish for at most `KVQ_WORKER_SHUTDOWN_TIMEOUT_SECONDS`, and
    /// returns. Jobs cut off by that timeout are re-run by another worker.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), anyhow::Error> {
        let upkeep = tokio::spawn(crate::metrics::upkeep());
        let health = HttpServer::new(move || {
            App::new()
                .route(
                    "/healthz",
                    web::get().to(|| async {
                        HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
                    }),
                )
                .route(
                    "/metrics",
                    web::get().to(|| async {
                        HttpResponse::Ok()
                            .content_type("text/plain; version=0.0.4")
                            .body(crate::metrics::render())
                    }),
                )
        })
        .workers(1)
        .disable_signals()
        .listen(self.health)?
        .run();
        let health_handle = health.handle();
        let health_task = tokio::spawn(health);

        let (stop_tx, stop_rx) = watch::channel(false);
        let supervisor = supervise(
            self.name.clone(),
            self.config.clone(),
            self.applier.clone(),
            self.queue_client.clone(),
            stop_rx,
        );
        tokio::pin!(supervisor);
        tokio::select! {
            () = &mut supervisor => {}
            () = shutdown => {
                tracing::info!(timeout_s = self.config.worker_shutdown_timeout.as_secs(), "stopping: finishing in-flight jobs");
                let _ = stop_tx.send(true);
                match tokio::time::timeout(self.config.worker_shutdown_timeout, &mut supervisor).await {
                    Ok(()) => tracing::info!("in-flight jobs finished"),
                    Err(_) => tracing::warn!("shutdown timeout: unfinished jobs will be re-run by another worker"),
                }
            }
        }
        health_handle.stop(true).await;
        let _ = health_task.await;
        upkeep.abort();
        Ok(())
    }
}

/// Runs the apalis worker until `stop` turns true. The queue backend absorbs
/// Redis errors itself, so the worker does not stop on them; should it stop
/// anyway, it is started again (same name: its unfinished jobs are picked up
/// at once), with backoff.
async fn supervise(
    name: String,
    config: Arc<Config>,
    applier: Arc<Applier>,
    queue_client: Connector,
    stop: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut stop_signal = stop.clone();
        let backend =
            match StreamsBackend::new(queue_client.clone(), queue::streams_config(&config)) {
                Ok(backend) => backend,
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up the queue backend");
                    return;
                }
            };
        let worker = WorkerBuilder::new(name.clone())
            .backend(backend)
            .data(applier.clone())
            .concurrency(config.worker_concurrency)
            .build(handle);
        tracing::info!(worker = %name, concurrency = config.worker_concurrency, "worker running");
        let started = tokio::time::Instant::now();
        let result = worker
            .run_until(async move {
                let _ = stop_signal.wait_for(|stopped| *stopped).await;
                Ok::<(), std::io::Error>(())
            })
            .await;
        if *stop.borrow() {
            return;
        }
        match result {
            Ok(()) => tracing::warn!("worker stopped by itself; starting it again"),
            Err(e) => tracing::warn!(error = %e, "worker stopped on an error; starting it again"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            delay = Duration::from_millis(100);
        }
        let mut stop_signal = stop.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop_signal.wait_for(|stopped| *stopped) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
