//! `kvq-api`: loads the configuration, sets up logging, serves.

use std::process::ExitCode;

use kvq_api::auth::{self, Auth, Role};
use kvq_api::startup::Application;
use kvq_shared::config::parse_duration;
use kvq_shared::{Config, telemetry};

/// `kvq-api token --role ROLE [--ttl DURATION]`: prints a token signed with
/// `KVQ_AUTH_JWT_SECRET` (the last line of output). `--ttl` defaults to an
/// hour, or `KVQ_AUTH_MAX_TOKEN_LIFETIME` when that is shorter.
fn token(config: &Config, args: &[String]) -> ExitCode {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let Some(role) = value("--role").and_then(Role::parse) else {
        eprintln!("usage: kvq-api token --role reader|writer|admin [--ttl 1h]");
        return ExitCode::from(2);
    };
    let ttl = match value("--ttl") {
        None => auth::default_ttl(config),
        Some(text) => match parse_duration(text) {
            Some(ttl) => ttl,
            None => {
                eprintln!("kvq-api token: --ttl takes a duration such as 90s, 15m, 1h or 7d");
                return ExitCode::from(2);
            }
        },
    };
    match auth::mint(config, role, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvq-api token: {e}");
            ExitCode::from(2)
        }
    }
}

#[actix_web::main]
async fn main() -> ExitCode {
    kvq_shared::store::install_tls_provider();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kvq-api: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("token") {
        return token(&config, &args[1..]);
    }
    let telemetry = telemetry::init(config.log_format, "kvq-api");
    let code = serve(config).await;
    telemetry.shutdown();
    code
}

/// Checks the auth set-up, then serves until stopped.
async fn serve(config: Config) -> ExitCode {
    match Auth::from_config(&config) {
        Ok(auth) if !auth.enabled() => {
            tracing::warn!("KVQ_AUTH_DISABLED=true: every route is open to anyone who can reach it")
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("kvq-api: configuration error: {e}");
            return ExitCode::from(2);
        }
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
        kv_redis = %config.kv_redis,
        queue_redis = %config.queue_redis,
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
