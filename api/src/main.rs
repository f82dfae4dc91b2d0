//! `kvq-api`: loads the configuration, sets up logging, serves.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kvq_api::auth::{self, Auth, Role};
use kvq_api::startup::Application;
use kvq_shared::config::parse_duration;
use kvq_shared::{Config, telemetry};

/// kvq's HTTP API: validates writes and queues them for the workers, serves
/// reads from the data Redis, job status, dead letters and the dashboard.
#[derive(Parser)]
#[command(
    name = "kvq-api",
    version,
    after_help = "\
Configuration comes from the environment, never from flags (README, \"Configuration\"):
  KVQ_BIND              address to listen on (default 127.0.0.1:8080)
  KVQ_KV_REDIS_URL      the data Redis (default redis://127.0.0.1:6379)
  KVQ_QUEUE_REDIS_URL   the queue Redis (default redis://127.0.0.1:6380)
  KVQ_AUTH_JWT_SECRET   HS256 secret of the bearer tokens (or KVQ_AUTH_JWT_PUBLIC_KEY_FILE)
  KVQ_LOG_FORMAT        json or text
  OTEL_EXPORTER_OTLP_ENDPOINT  export traces over OTLP when set

Exit status: 0 after a clean stop, 1 when the server could not start or
failed, 2 for a usage or configuration error.

Examples:
  KVQ_AUTH_JWT_SECRET=... kvq-api
  KVQ_AUTH_JWT_SECRET=... kvq-api token --role writer --ttl 15m"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API until SIGTERM or ctrl-c (what runs without a
    /// command).
    Serve,
    /// Print a bearer token signed with KVQ_AUTH_JWT_SECRET, on one line.
    Token {
        /// What the token may do: reader, writer or admin (each includes
        /// the ones before it).
        #[arg(long, value_parser = role)]
        role: Role,
        /// How long the token is valid, such as 90s, 15m, 1h or 7d.
        /// [default: an hour, or KVQ_AUTH_MAX_TOKEN_LIFETIME when shorter]
        #[arg(long, value_parser = ttl)]
        ttl: Option<Duration>,
    },
}

fn role(text: &str) -> Result<Role, String> {
    Role::parse(text).ok_or_else(|| "takes reader, writer or admin".to_owned())
}

fn ttl(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| "takes a duration such as 90s, 15m, 1h or 7d".to_owned())
}

/// `kvq-api token`: prints a token signed with `KVQ_AUTH_JWT_SECRET`.
fn token(config: &Config, role: Role, ttl: Option<Duration>) -> ExitCode {
    let ttl = ttl.unwrap_or_else(|| auth::default_ttl(config));
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
    // Flags first: --help and --version need no configuration.
    let cli = Cli::parse();
    kvq_shared::store::install_tls_provider();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kvq-api: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Token { role, ttl }) = cli.command {
        return token(&config, role, ttl);
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
