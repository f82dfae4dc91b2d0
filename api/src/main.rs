//! `kvq-api`: loads the configuration, sets up logging, serves.

use std::process::ExitCode;

use kvq_api::startup::Application;
use kvq_shared::{Config, telemetry};

#[actix_web::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kvq-api: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.log_format);
    if config.auth_disabled {
        tracing::warn!("KVQ_AUTH_DISABLED=true: every route is open to anyone who can reach it");
    } else {
        tracing::warn!("authentication is not built yet: every route is open");
    }
    let app = match Application::build(config.clone()).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, bind = %config.bind, "could not start");
            eprintln!("kvq-api: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        bind = %config.bind,
        port = app.port(),
        kv_redis = %config.kv_redis_url,
        queue_redis = %config.queue_redis_url,
        namespace = %config.namespace,
        "kvq-api listening"
    );
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}
