//! Building and running the HTTP server. The listener is bound in
//! [`Application::build`], so tests can ask for port 0 and read the port.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::error::QueryPayloadError;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpRequest, HttpServer, web};
use kvq_shared::connection::Connector;
use kvq_shared::{Config, keys};

use crate::auth::Auth;
use crate::body::BodyBudget;
use crate::limits::BodyTimeout;
use crate::rate_limit::RateLimit;
use crate::state::AppState;
use crate::wait::Waiters;

use crate::error::ApiError;
use crate::routes;

/// A bound, not yet running, API server.
pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    /// Connects to both Redis servers (lazily: the API starts, and reports
    /// not ready, while they are down) and binds `config.bind`.
    pub async fn build(config: Config) -> Result<Self, anyhow::Error> {
        let auth = web::Data::new(Auth::from_config(&config)?);
        crate::metrics::handle();
        tokio::spawn(crate::metrics::upkeep());
        let rate_limit = RateLimit::from_config(&config).map(|limit| {
            let limit = Arc::new(limit);
            tokio::spawn(limit.clone().sweep());
            web::Data::from(limit)
        });
        let body_timeout = web::Data::new(BodyTimeout(config.http_client_timeout));
        // One per process, shared by every worker thread.
        let queue_gauges = web::Data::new(crate::metrics::QueueGauges::default());
        let readiness = web::Data::new(routes::health::Readiness::default());
        let rates = web::Data::new(crate::stats::Rates::default());
        let body_budget = web::Data::from(BodyBudget::new(
            config.max_body_bytes_in_flight,
            config.max_body_bytes(),
            config.max_batch_body_bytes(),
        ));
        let (client_timeout, keep_alive) = (config.http_client_timeout, config.http_keep_alive);
        let listener = TcpListener::bind(config.bind)?;
        let port = listener.local_addr()?.port();
        let kv_client = Connector::new(&config.kv_redis, config.redis_timeout)?;
        let queue_client = Connector::new(&config.queue_redis, config.redis_timeout)?;
        let config = Arc::new(config);
        let waiters = Waiters::default();
        // Fail now, not in a worker thread, if the connections cannot be made.
        AppState::new(&config, &kv_client, &queue_client, &waiters)?;
        tokio::spawn(
            waiters
                .clone()
                .follow(queue_client.clone(), keys::done_channel(&config.namespace)),
        );
        let server = HttpServer::new(move || {
            // One set of connections per worker thread: each thread's requests
            // then never wait on another thread's connection task.
            let state = AppState::new(&config, &kv_client, &queue_client, &waiters)
                .expect("connections were checked before the server started");
            let legacy_routes = config.legacy_routes;
            let mut app = App::new()
                .app_data(web::Data::new(state))
                .app_data(auth.clone())
                .app_data(body_timeout.clone())
                .app_data(queue_gauges.clone())
                .app_data(readiness.clone())
                .app_data(rates.clone())
                .app_data(body_budget.clone());
            if let Some(limit) = &rate_limit {
                app = app.app_data(limit.clone());
            }
            app.app_data(web::QueryConfig::default().error_handler(query_error))
                .app_data(
                    web::PathConfig::default()
                        .error_handler(|e, _| ApiError::InvalidRequest(e.to_string()).into()),
                )
                // The last `.wrap` runs first: metrics count every answer,
                // the request id is on every answer, then the header cap
                // (431) and body deadline apply before any token is
                // verified (a huge forged token costs no signature check),
                // then auth and the rate limit.
                .wrap(from_fn(crate::auth::middleware))
                .wrap(from_fn(crate::limits::middleware))
                .wrap(from_fn(crate::request_id::middleware))
                .wrap(from_fn(crate::metrics::middleware))
                .configure(routes::health::configure)
                .configure(crate::metrics::configure)
                .configure(routes::kv::configure)
                .configure(routes::batch::configure)
                .configure(routes::jobs::configure)
                .configure(routes::stats::configure)
                .configure(crate::openapi::configure)
                .configure(routes::ui::configure)
                .configure(|cfg| {
                    if legacy_routes {
                        routes::legacy::configure(cfg);
                    }
                })
                .default_service(web::to(routes::not_found))
        })
        // Slow clients cannot hold connections: the head must arrive within
        // the client timeout (the body too, see `limits`), idle
        // keep-alive connections close, and a closing client gets 1 s.
        .client_request_timeout(client_timeout)
        .client_disconnect_timeout(Duration::from_secs(1))
        .keep_alive(keep_alive)
        .listen(listener)?
        .shutdown_timeout(10)
        .run();
        Ok(Self { port, server })
    }

    /// The port the API listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until the process is told to stop (SIGTERM / ctrl-c), then
    /// finishes in-flight requests.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::InvalidRequest(format!("bad query string: {err}")).into()
}
