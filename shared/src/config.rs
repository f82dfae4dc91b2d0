//! The one typed configuration of kvq, read once from `KVQ_*` environment
//! variables at start.
//!
//! Every variable has a default (see the README's table), and a value that does
//! not parse stops the process with a [`ConfigError`] naming the variable. No
//! config file is needed.

use std::fmt;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// A configuration value that was missing, malformed or out of range.
#[derive(Debug, Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The environment variable at fault, e.g. `KVQ_BIND`.
    pub var: &'static str,
    /// What is wrong with it, in words a user can act on.
    pub message: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, coloured lines (the default on a terminal).
    Pretty,
    /// One JSON object per line (the default elsewhere).
    Json,
}

/// A string that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A Redis URL (`redis://` or `rediss://`, possibly with a password), shown
/// with its password masked.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The full URL, password included, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `scheme://user:password@host` → `scheme://user:***@host`
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                let userinfo = &self.0[scheme_end + 3..at];
                let user = userinfo.split(':').next().unwrap_or("");
                write!(
                    f,
                    "{}{}:***{}",
                    &self.0[..scheme_end + 3],
                    user,
                    &self.0[at..]
                )
            }
            _ => f.write_str(&self.0),
        }
    }
}

/// How kvq reaches one of its Redis roles (`KVQ_KV_REDIS_MODE`,
/// `KVQ_QUEUE_REDIS_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// One server (`single`, the default): its URL.
    Single,
    /// A Redis Cluster (`cluster`): seed node URLs; the rest of the cluster
    /// is discovered, and redirections and failovers are followed.
    Cluster,
    /// A master watched by Redis Sentinel (`sentinel`): the sentinels' URLs
    /// and the master's name; failovers are followed.
    Sentinel,
}

impl RedisMode {
    /// The mode's name in `KVQ_*_REDIS_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Single => "single",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        }
    }
}

/// One Redis role's settings: `KVQ_<ROLE>_REDIS_MODE`, `_URL` (one URL, or a
/// comma-separated list for a cluster's seed nodes or the sentinels),
/// `_MASTER` and `_WAIT_REPLICAS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// How the URLs are used.
    pub mode: RedisMode,
    /// One URL in `single` mode; the seed nodes or the sentinels otherwise.
    pub urls: Vec<RedisUrl>,
    /// In `sentinel` mode, the master's name as the sentinels know it.
    pub master: Option<String>,
    /// Replicas that must confirm each write (Redis `WAIT`) before kvq counts
    /// it: an applied write (data role) or an accepted job (queue role).
    pub wait_replicas: u32,
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.mode.as_str())?;
        for (i, url) in self.urls.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            fmt::Display::fmt(url, f)?;
        }
        if let Some(master) = &self.master {
            write!(f, " master {master}")?;
        }
        Ok(())
    }
}

impl RedisTarget {
    /// One server at `url`, no replicas awaited.
    pub fn single(url: &str) -> Self {
        Self {
            mode: RedisMode::Single,
            urls: vec![RedisUrl(url.to_owned())],
            master: None,
            wait_replicas: 0,
        }
    }
}

/// Room in a write's body beyond the value itself (key, `ttl_seconds`,
/// punctuation): a body may be `KVQ_MAX_VALUE_BYTES` + this.
pub const BODY_OVERHEAD_BYTES: usize = 64 * 1024;

/// The largest batch body (`POST /v1/batch`), unless one write's body
/// limit is larger; never more than `KVQ_MAX_BODY_BYTES_IN_FLIGHT`. See
/// [`Config::max_batch_body_bytes`].
pub const BATCH_BODY_BYTES: usize = 16 * 1_048_576;

/// `KVQ_MAX_BODY_BYTES_IN_FLIGHT` when unset (or one body limit, if that is
/// larger). A 1 MiB write costs the API about 4 MiB while it is read,
/// checked and queued (the body, the value's compact copy, the job's JSON
/// and the Redis command built from it), so 16 MiB of bodies keep its peak
/// near 80 MiB, far under the 256 Mi pod limit.
pub const DEFAULT_BODY_BYTES_IN_FLIGHT: usize = 16 * 1_048_576;

/// kvq's configuration, shared by `kvq-api` and `kvq-worker`.
#[derive(Debug, Clone)]
pub struct Config {
    /// `KVQ_BIND`: the API's listen address.
    pub bind: SocketAddr,
    /// `KVQ_KV_REDIS_*`: the Redis that holds the data.
    pub kv_redis: RedisTarget,
    /// `KVQ_QUEUE_REDIS_*`: the Redis that holds the job queue and job records.
    pub queue_redis: RedisTarget,
    /// `KVQ_NAMESPACE`: prefix of every Redis key kvq writes.
    pub namespace: String,
    /// `KVQ_WORKER_CONCURRENCY`: jobs one worker process runs at once.
    pub worker_concurrency: usize,
    /// `KVQ_WORKER_HEALTH_BIND`: the worker's `/healthz` listen address.
    pub worker_health_bind: SocketAddr,
    /// `KVQ_WORKER_MAX_ATTEMPTS`: runs of a job that hit infrastructure errors
    /// before it is `dead`.
    pub worker_max_attempts: u32,
    /// `KVQ_WORKER_SHUTDOWN_TIMEOUT_SECONDS`: how long a stopping worker waits
    /// for in-flight jobs.
    pub worker_shutdown_timeout: Duration,
    /// `KVQ_QUEUE_PARTITIONS`: how many partitions (streams) the queue has,
    /// a divisor of 64; a key always maps to the same one. Fixed for a
    /// deployment: changing it strands queued jobs.
    pub queue_partitions: u16,
    /// `KVQ_AUTH_JWT_SECRET`: HS256 secret for bearer tokens.
    pub auth_jwt_secret: Option<Secret>,
    /// `KVQ_AUTH_JWT_PUBLIC_KEY_FILE`: RS256 public key (PEM) for bearer tokens.
    pub auth_jwt_public_key_file: Option<PathBuf>,
    /// `KVQ_AUTH_DISABLED`: `true` serves every route without a token.
    pub auth_disabled: bool,
    /// `KVQ_AUTH_MAX_TOKEN_LIFETIME`: when set, a token must carry `iat` and
    /// live (`exp - iat`) at most this long; `None` sets no maximum.
    pub auth_max_token_lifetime: Option<Duration>,
    /// `KVQ_LEGACY_ROUTES`: serve the original service's routes
    /// (`/create/{key}`, `/read/{key}`, `/update/{key}`, `/delete/{key}`).
    pub legacy_routes: bool,
    /// `KVQ_MAX_KEY_BYTES`: the longest key, in bytes of UTF-8.
    pub max_key_bytes: usize,
    /// `KVQ_MAX_VALUE_BYTES`: the largest value, as serialized JSON.
    pub max_value_bytes: usize,
    /// `KVQ_MAX_BODY_BYTES_IN_FLIGHT`: bytes of write bodies one API process
    /// holds at once, from before a body is read until its job is queued;
    /// at least one body limit ([`Config::max_body_bytes`]).
    pub max_body_bytes_in_flight: usize,
    /// `KVQ_JOB_RETENTION_SECONDS`: how long finished job records are kept.
    pub job_retention: Duration,
    /// `KVQ_REDIS_TIMEOUT_MS`: how long one Redis command may take.
    pub redis_timeout: Duration,
    /// `KVQ_READ_RETRY_MAX_MS`: total time a read retries a failing Redis
    /// before answering 503.
    pub read_retry_max: Duration,
    /// `KVQ_RATE_LIMIT_PER_SECOND`: requests per second one client (token,
    /// or IP when anonymous) may make to the `/v1` routes; 0 means no limit.
    pub rate_limit_per_second: u32,
    /// `KVQ_RATE_LIMIT_BURST`: how many requests a client may make at once
    /// beyond the rate; 0 means as many as the rate.
    pub rate_limit_burst: u32,
    /// `KVQ_HTTP_CLIENT_TIMEOUT_MS`: how long a client may take to send a
    /// request's head, and again its body, before the API gives up on it.
    pub http_client_timeout: Duration,
    /// `KVQ_HTTP_KEEP_ALIVE_SECONDS`: how long an idle keep-alive connection
    /// stays open.
    pub http_keep_alive: Duration,
    /// `KVQ_LOG_FORMAT`: `pretty` or `json`.
    pub log_format: LogFormat,
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (name → value), so tests can
    /// supply variables without touching the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let namespace = env.string("KVQ_NAMESPACE", "kvq");
        if namespace.is_empty()
            || !namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(ConfigError {
                var: "KVQ_NAMESPACE",
                message: format!(
                    "{namespace:?} must be non-empty ASCII letters, digits, '-', '_', '.' or ':'"
                ),
            });
        }
        let max_value_bytes = env.ranged("KVQ_MAX_VALUE_BYTES", 1_048_576, 1, 512 * 1_048_576)?;
        let body_limit = max_value_bytes + BODY_OVERHEAD_BYTES;
        let max_body_bytes_in_flight = env.ranged(
            "KVQ_MAX_BODY_BYTES_IN_FLIGHT",
            DEFAULT_BODY_BYTES_IN_FLIGHT.max(body_limit),
            1,
            1 << 40,
        )?;
        if max_body_bytes_in_flight < body_limit {
            return Err(ConfigError {
                var: "KVQ_MAX_BODY_BYTES_IN_FLIGHT",
                message: format!(
                    "{max_body_bytes_in_flight} is less than one body ({body_limit} bytes: \
                     KVQ_MAX_VALUE_BYTES + {BODY_OVERHEAD_BYTES}), so no write could pass"
                ),
            });
        }
        let partitions: u16 = env.ranged("KVQ_QUEUE_PARTITIONS", 16, 1, 64)?;
        if !crate::keys::BUCKETS.is_multiple_of(partitions) {
            return Err(ConfigError {
                var: "KVQ_QUEUE_PARTITIONS",
                message: format!(
                    "{partitions} must divide {} (1, 2, 4, 8, 16, 32 or 64)",
                    crate::keys::BUCKETS
                ),
            });
        }
        let config = Self {
            bind: env.parse("KVQ_BIND", "127.0.0.1:8080")?,
            kv_redis: env.redis_target(Role::Kv)?,
            queue_redis: env.redis_target(Role::Queue)?,
            namespace,
            worker_concurrency: env.ranged("KVQ_WORKER_CONCURRENCY", 32, 1, 10_000)?,
            worker_health_bind: env.parse("KVQ_WORKER_HEALTH_BIND", "127.0.0.1:9091")?,
            worker_max_attempts: env.ranged("KVQ_WORKER_MAX_ATTEMPTS", 10, 1, 25)?,
            worker_shutdown_timeout: Duration::from_secs(env.ranged(
                "KVQ_WORKER_SHUTDOWN_TIMEOUT_SECONDS",
                25,
                1,
                3_600,
            )?),
            queue_partitions: partitions,
            auth_jwt_secret: env.optional("KVQ_AUTH_JWT_SECRET").map(Secret::new),
            auth_jwt_public_key_file: env
                .optional("KVQ_AUTH_JWT_PUBLIC_KEY_FILE")
                .map(PathBuf::from),
            auth_disabled: env.bool("KVQ_AUTH_DISABLED", false)?,
            auth_max_token_lifetime: env.duration("KVQ_AUTH_MAX_TOKEN_LIFETIME")?,
            legacy_routes: env.bool("KVQ_LEGACY_ROUTES", true)?,
            max_key_bytes: env.ranged("KVQ_MAX_KEY_BYTES", 512, 1, 65_536)?,
            max_value_bytes,
            max_body_bytes_in_flight,
            job_retention: Duration::from_secs(env.ranged(
                "KVQ_JOB_RETENTION_SECONDS",
                86_400,
                1,
                365 * 86_400,
            )?),
            redis_timeout: Duration::from_millis(env.ranged(
                "KVQ_REDIS_TIMEOUT_MS",
                5_000,
                50,
                600_000,
            )?),
            read_retry_max: Duration::from_millis(env.ranged(
                "KVQ_READ_RETRY_MAX_MS",
                3_000,
                0,
                600_000,
            )?),
            rate_limit_per_second: env.ranged("KVQ_RATE_LIMIT_PER_SECOND", 0, 0, 1_000_000)?,
            rate_limit_burst: env.ranged("KVQ_RATE_LIMIT_BURST", 0, 0, 1_000_000)?,
            http_client_timeout: Duration::from_millis(env.ranged(
                "KVQ_HTTP_CLIENT_TIMEOUT_MS",
                10_000,
                100,
                600_000,
            )?),
            http_keep_alive: Duration::from_secs(env.ranged(
                "KVQ_HTTP_KEEP_ALIVE_SECONDS",
                30,
                1,
                3_600,
            )?),
            log_format: match env.optional("KVQ_LOG_FORMAT").as_deref() {
                None => {
                    if std::io::stdout().is_terminal() {
                        LogFormat::Pretty
                    } else {
                        LogFormat::Json
                    }
                }
                Some("pretty") => LogFormat::Pretty,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(ConfigError {
                        var: "KVQ_LOG_FORMAT",
                        message: format!("{other:?} is neither \"pretty\" nor \"json\""),
                    });
                }
            },
        };
        let urls: Vec<&RedisUrl> = (config.kv_redis.urls.iter())
            .chain(&config.queue_redis.urls)
            .collect();
        env.tls_roots(&urls)?;
        Ok(config)
    }
}

/// Parses a duration written as `90s`, `15m`, `1h`, `7d` or plain seconds
/// (`90`); zero and anything else is `None`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3_600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

impl Config {
    /// The largest write body: the value limit + [`BODY_OVERHEAD_BYTES`].
    pub fn max_body_bytes(&self) -> usize {
        self.max_value_bytes + BODY_OVERHEAD_BYTES
    }

    /// The largest batch body: [`BATCH_BODY_BYTES`] (16 MiB), or one
    /// write's body limit if that is larger (so a batch may carry any one
    /// write a single route takes), but at most
    /// `KVQ_MAX_BODY_BYTES_IN_FLIGHT`, which must be able to hold it.
    pub fn max_batch_body_bytes(&self) -> usize {
        BATCH_BODY_BYTES
            .max(self.max_body_bytes())
            .min(self.max_body_bytes_in_flight)
    }
}

/// Typed access to the variables, each error naming its variable.
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn optional(&self, var: &str) -> Option<String> {
        (self.0)(var).filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.optional(var).unwrap_or_else(|| default.to_owned())
    }

    fn parse<T>(&self, var: &'static str, default: &str) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        let raw = self.string(var, default);
        raw.parse().map_err(|e| ConfigError {
            var,
            message: format!("{raw:?} is not valid: {e}"),
        })
    }

    fn ranged<T>(&self, var: &'static str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
        T::Err: fmt::Display,
    {
        let value = match self.optional(var) {
            None => default,
            Some(raw) => raw.trim().parse().map_err(|e| ConfigError {
                var,
                message: format!("{raw:?} is not a number: {e}"),
            })?,
        };
        if value < min || value > max {
            return Err(ConfigError {
                var,
                message: format!("{value} is outside {min}..={max}"),
            });
        }
        Ok(value)
    }

    fn bool(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self
            .optional(var)
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(other) => Err(ConfigError {
                var,
                message: format!("{other:?} is not a boolean (true or false)"),
            }),
        }
    }

    /// An optional duration such as `90s`, `15m`, `1h` or `7d`.
    fn duration(&self, var: &'static str) -> Result<Option<Duration>, ConfigError> {
        self.optional(var)
            .map(|raw| {
                parse_duration(&raw).ok_or_else(|| ConfigError {
                    var,
                    message: format!(
                        "{raw:?} is not a duration such as 90s, 15m, 1h or 7d (more than 0)"
                    ),
                })
            })
            .transpose()
    }

    fn redis_url(&self, var: &'static str, raw: &str) -> Result<RedisUrl, ConfigError> {
        let url = RedisUrl(raw.trim().to_owned());
        if !(url.0.starts_with("redis://") || url.0.starts_with("rediss://")) {
            return Err(ConfigError {
                var,
                message: format!("{url} must start with redis:// or rediss://"),
            });
        }
        redis::Client::open(url.expose()).map_err(|e| ConfigError {
            var,
            message: format!("{url} is not a usable Redis URL ({:?})", e.kind()),
        })?;
        Ok(url)
    }

    /// `KVQ_<ROLE>_REDIS_MODE`, `_URL`, `_MASTER` and `_WAIT_REPLICAS`.
    fn redis_target(&self, role: Role) -> Result<RedisTarget, ConfigError> {
        let [mode_var, url_var, master_var, wait_var] = role.vars();
        let mode = match self.optional(mode_var).as_deref() {
            None | Some("single") => RedisMode::Single,
            Some("cluster") => RedisMode::Cluster,
            Some("sentinel") => RedisMode::Sentinel,
            Some(other) => {
                return Err(ConfigError {
                    var: mode_var,
                    message: format!("{other:?} is not single, cluster or sentinel"),
                });
            }
        };
        let raw = self.string(url_var, role.default_url());
        let urls = raw
            .split(',')
            .filter(|u| !u.trim().is_empty())
            .map(|u| self.redis_url(url_var, u))
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err(ConfigError {
                var: url_var,
                message: "no URL given".into(),
            });
        }
        if mode == RedisMode::Single && urls.len() > 1 {
            return Err(ConfigError {
                var: url_var,
                message: format!(
                    "{} URLs given: a list is for {mode_var}=cluster (seed nodes) or sentinel (the sentinels)",
                    urls.len()
                ),
            });
        }
        let master = self.optional(master_var);
        if mode == RedisMode::Sentinel && master.is_none() {
            return Err(ConfigError {
                var: master_var,
                message: format!("{mode_var}=sentinel needs the master's name"),
            });
        }
        Ok(RedisTarget {
            mode,
            urls,
            master: master.filter(|_| mode == RedisMode::Sentinel),
            wait_replicas: self.ranged(wait_var, 0, 0, 64)?,
        })
    }
}

/// A Redis role, for its variables' names.
#[derive(Clone, Copy)]
enum Role {
    Kv,
    Queue,
}

impl Role {
    fn vars(self) -> [&'static str; 4] {
        match self {
            Role::Kv => [
                "KVQ_KV_REDIS_MODE",
                "KVQ_KV_REDIS_URL",
                "KVQ_KV_REDIS_MASTER",
                "KVQ_KV_REDIS_WAIT_REPLICAS",
            ],
            Role::Queue => [
                "KVQ_QUEUE_REDIS_MODE",
                "KVQ_QUEUE_REDIS_URL",
                "KVQ_QUEUE_REDIS_MASTER",
                "KVQ_QUEUE_REDIS_WAIT_REPLICAS",
            ],
        }
    }

    fn default_url(self) -> &'static str {
        match self {
            Role::Kv => "redis://127.0.0.1:6379",
            Role::Queue => "redis://127.0.0.1:6380",
        }
    }
}

impl Env<'_> {
    /// With a `rediss://` URL, `SSL_CERT_FILE` (when set) replaces the
    /// system's roots, so it must hold at least one PEM certificate: fail at
    /// start rather than on every connection.
    fn tls_roots(&self, urls: &[&RedisUrl]) -> Result<(), ConfigError> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        const VAR: &str = "SSL_CERT_FILE";
        if !urls.iter().any(|url| url.0.starts_with("rediss://")) {
            return Ok(());
        }
        let Some(path) = (self.0)(VAR) else {
            return Ok(());
        };
        let certs = CertificateDer::pem_file_iter(&path)
            .map_err(|e| format!("cannot be read ({e})"))
            .and_then(|certs| {
                certs
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("is not PEM ({e})"))
            });
        match certs {
            Ok(certs) if !certs.is_empty() => Ok(()),
            Ok(_) => Err(ConfigError {
                var: VAR,
                message: format!(
                    "{path:?} holds no certificate; it replaces the system's roots for rediss:// URLs"
                ),
            }),
            Err(why) => Err(ConfigError {
                var: VAR,
                message: format!("{path:?} {why}; it holds the CAs trusted for rediss:// URLs"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_match_the_design() {
        let c = config(&[]).expect("defaults are valid");
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.kv_redis, RedisTarget::single("redis://127.0.0.1:6379"));
        assert_eq!(c.queue_redis, RedisTarget::single("redis://127.0.0.1:6380"));
        assert_eq!(c.namespace, "kvq");
        assert_eq!(c.worker_concurrency, 32);
        assert_eq!(c.worker_health_bind.to_string(), "127.0.0.1:9091");
        assert!(!c.auth_disabled);
        assert!(c.legacy_routes);
        assert_eq!((c.max_key_bytes, c.max_value_bytes), (512, 1_048_576));
        assert_eq!(c.job_retention, Duration::from_secs(86_400));
        assert_eq!(c.max_body_bytes(), 1_048_576 + 65_536);
        assert_eq!(c.max_body_bytes_in_flight, 16 * 1_048_576);
        assert_eq!(c.auth_max_token_lifetime, None, "no maximum unless set");
        assert_eq!(c.queue_partitions, 16);
    }

    #[test]
    fn partitions_divide_the_buckets() {
        for ok in ["1", "2", "4", "8", "16", "32", "64"] {
            let c = config(&[("KVQ_QUEUE_PARTITIONS", ok)]).expect(ok);
            assert_eq!(c.queue_partitions.to_string(), ok);
        }
        for bad in ["0", "3", "12", "65", "128"] {
            let err = config(&[("KVQ_QUEUE_PARTITIONS", bad)]).expect_err(bad);
            assert_eq!(err.var, "KVQ_QUEUE_PARTITIONS");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("86400s"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        for bad in [
            "0",
            "0h",
            "1w",
            "h",
            "-1h",
            "1.5h",
            "",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        let c = config(&[("KVQ_AUTH_MAX_TOKEN_LIFETIME", "30m")]).expect("ok");
        assert_eq!(c.auth_max_token_lifetime, Some(Duration::from_secs(1800)));
    }

    #[test]
    fn a_batch_body_is_16_mib_within_the_budget() {
        let c = config(&[]).expect("defaults");
        assert_eq!(c.max_batch_body_bytes(), 16 * 1_048_576);
        let c = config(&[("KVQ_MAX_BODY_BYTES_IN_FLIGHT", "4194304")]).expect("4 MiB");
        assert_eq!(c.max_batch_body_bytes(), 4_194_304);
        let c = config(&[("KVQ_MAX_VALUE_BYTES", "67108864")]).expect("64 MiB values");
        assert_eq!(c.max_batch_body_bytes(), c.max_body_bytes());
    }

    #[test]
    fn the_body_budget_holds_at_least_one_body() {
        let c = config(&[("KVQ_MAX_BODY_BYTES_IN_FLIGHT", "1114112")]).expect("one body");
        assert_eq!(c.max_body_bytes_in_flight, c.max_body_bytes());
        let err = config(&[("KVQ_MAX_BODY_BYTES_IN_FLIGHT", "1114111")]).expect_err("too small");
        assert_eq!(err.var, "KVQ_MAX_BODY_BYTES_IN_FLIGHT");
        // Unset, it grows with the value limit.
        let c = config(&[("KVQ_MAX_VALUE_BYTES", "67108864")]).expect("big values");
        assert_eq!(c.max_body_bytes_in_flight, 67_108_864 + 65_536);
        let err = config(&[
            ("KVQ_MAX_VALUE_BYTES", "67108864"),
            ("KVQ_MAX_BODY_BYTES_IN_FLIGHT", "16777216"),
        ])
        .expect_err("smaller than one body");
        assert_eq!(err.var, "KVQ_MAX_BODY_BYTES_IN_FLIGHT");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("KVQ_BIND", "nowhere"),
            ("KVQ_KV_REDIS_URL", "http://x"),
            ("KVQ_QUEUE_REDIS_URL", "redis://"),
            ("KVQ_WORKER_CONCURRENCY", "0"),
            ("KVQ_AUTH_DISABLED", "maybe"),
            ("KVQ_LEGACY_ROUTES", "sometimes"),
            ("KVQ_MAX_VALUE_BYTES", "-1"),
            ("KVQ_MAX_BODY_BYTES_IN_FLIGHT", "lots"),
            ("KVQ_MAX_BODY_BYTES_IN_FLIGHT", "0"),
            ("KVQ_NAMESPACE", "a{b}"),
            ("KVQ_LOG_FORMAT", "xml"),
            ("KVQ_AUTH_MAX_TOKEN_LIFETIME", "forever"),
            ("KVQ_AUTH_MAX_TOKEN_LIFETIME", "0s"),
            ("KVQ_KV_REDIS_MODE", "replicated"),
            ("KVQ_KV_REDIS_URL", "redis://a:1,redis://b:1"),
            ("KVQ_QUEUE_REDIS_URL", ","),
            ("KVQ_QUEUE_REDIS_MASTER", ""),
            ("KVQ_QUEUE_REDIS_WAIT_REPLICAS", "-1"),
            ("KVQ_KV_REDIS_WAIT_REPLICAS", "65"),
        ] {
            let mut vars = vec![(var, value)];
            if var == "KVQ_QUEUE_REDIS_MASTER" {
                vars.push(("KVQ_QUEUE_REDIS_MODE", "sentinel"));
            }
            let err = config(&vars).expect_err(var);
            assert_eq!(err.var, var);
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }

    /// ISRG Root X2, a public CA certificate.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIICGzCCAaGgAwIBAgIQQdKd0XLq7qeAwSxs6S+HUjAKBggqhkjOPQQDAzBPMQsw
CQYDVQQGEwJVUzEpMCcGA1UEChMgSW50ZXJuZXQgU2VjdXJpdHkgUmVzZWFyY2gg
R3JvdXAxFTATBgNVBAMTDElTUkcgUm9vdCBYMjAeFw0yMDA5MDQwMDAwMDBaFw00
MDA5MTcxNjAwMDBaME8xCzAJBgNVBAYTAlVTMSkwJwYDVQQKEyBJbnRlcm5ldCBT
ZWN1cml0eSBSZXNlYXJjaCBHcm91cDEVMBMGA1UEAxMMSVNSRyBSb290IFgyMHYw
EAYHKoZIzj0CAQYFK4EEACIDYgAEzZvVn4CDCuwJSvMWSj5cz3es3mcFDR0HttwW
+1qLFNvicWDEukWVEYmO6gbf9yoWHKS5xcUy4APgHoIYOIvXRdgKam7mAHf7AlF9
ItgKbppbd9/w+kHsOdx1ymgHDB/qo0IwQDAOBgNVHQ8BAf8EBAMCAQYwDwYDVR0T
AQH/BAUwAwEB/zAdBgNVHQ4EFgQUfEKWrt5LSDv6kviejM9ti6lyN5UwCgYIKoZI
zj0EAwMDaAAwZQIwe3lORlCEwkSHRhtFcP9Ymd70/aTSVaYgLXTWNLxBo1BfASdW
tL4ndQavEi51mI38AjEAi/V3bNTIZargCyzuFJ0nN6T5U6VR5CmD1/iQMVtCnwr1
/q4AaOeMSQ+2b1tbFfLn
-----END CERTIFICATE-----
";

    #[test]
    fn rediss_urls_check_the_ssl_cert_file_they_will_trust() {
        let dir = std::env::temp_dir().join(format!("kvq-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (good, empty) = (dir.join("ca.pem"), dir.join("empty.pem"));
        std::fs::write(&good, CA_PEM).expect("write");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        let (good, empty) = (good.display().to_string(), empty.display().to_string());
        let tls = ("KVQ_QUEUE_REDIS_URL", "rediss://127.0.0.1:6380");
        for bad in [empty.as_str(), "/no/such/ca.pem", ""] {
            let err = config(&[tls, ("SSL_CERT_FILE", bad)]).expect_err(bad);
            assert_eq!(err.var, "SSL_CERT_FILE", "{err}");
        }
        config(&[tls, ("SSL_CERT_FILE", &good)]).expect("a PEM CA is fine");
        config(&[tls]).expect("without SSL_CERT_FILE the system's roots are used");
        config(&[("SSL_CERT_FILE", "/no/such/ca.pem")]).expect("unused without rediss://");
        config(&[("KVQ_KV_REDIS_URL", "rediss://:pw@127.0.0.1:1/#insecure")])
            .expect("#insecure parses");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cluster_and_sentinel_take_url_lists() {
        let c = config(&[
            ("KVQ_KV_REDIS_MODE", "cluster"),
            (
                "KVQ_KV_REDIS_URL",
                "redis://:pw@10.0.0.1:7000, rediss://:pw@10.0.0.2:7000/#insecure",
            ),
            ("KVQ_KV_REDIS_WAIT_REPLICAS", "1"),
            ("KVQ_QUEUE_REDIS_MODE", "sentinel"),
            (
                "KVQ_QUEUE_REDIS_URL",
                "redis://10.0.0.3:26379,redis://10.0.0.4:26379",
            ),
            ("KVQ_QUEUE_REDIS_MASTER", "kvq-queue"),
        ])
        .expect("valid");
        assert_eq!(c.kv_redis.mode, RedisMode::Cluster);
        assert_eq!(c.kv_redis.urls.len(), 2);
        assert_eq!(
            c.kv_redis.urls[1].expose(),
            "rediss://:pw@10.0.0.2:7000/#insecure"
        );
        assert_eq!(c.kv_redis.wait_replicas, 1);
        assert_eq!(c.kv_redis.master, None);
        assert_eq!(c.queue_redis.mode, RedisMode::Sentinel);
        assert_eq!(c.queue_redis.master.as_deref(), Some("kvq-queue"));
        assert_eq!(c.queue_redis.wait_replicas, 0);
        let shown = c.kv_redis.to_string();
        assert!(!shown.contains("pw"), "{shown}");
        assert!(
            shown.starts_with("cluster redis://:***@10.0.0.1:7000,"),
            "{shown}"
        );
        let err = config(&[("KVQ_KV_REDIS_MODE", "sentinel")]).expect_err("no master");
        assert_eq!(err.var, "KVQ_KV_REDIS_MASTER");
    }

    #[test]
    fn passwords_are_masked() {
        let c = config(&[("KVQ_KV_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")]).expect("ok");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://:***@127.0.0.1:1/0"), "{shown}");
        let c = config(&[("KVQ_AUTH_JWT_SECRET", "topsecret")]).expect("ok");
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
