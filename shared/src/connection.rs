//! Connections to a Redis role in any of its modes: one server, a Redis
//! Cluster, or a master watched by Sentinel ([`crate::config::RedisMode`]).
//!
//! [`Connector`] is made once from a role's settings; [`Connector::connect`]
//! gives a [`Conn`], which every store uses as it would a plain connection
//! (it implements [`redis::aio::ConnectionLike`]):
//! - `single`: redis' `ConnectionManager`, multiplexed and self-reconnecting.
//! - `cluster`: redis' cluster connection, which follows `MOVED` / `ASK`
//!   redirections and refreshes its slot map when a master fails over.
//!   Commands of one pipeline must share a hash slot (every kvq script and
//!   pipeline does, except the fan-outs over partitions or buckets, which
//!   use [`query_all`]).
//! - `sentinel`: a `ConnectionManager` to the master the sentinels name.
//!   An error that says the master is gone or demoted (connection refused
//!   or lost, a timeout, `READONLY`, `MASTERDOWN`) makes it ask the
//!   sentinels again (at most every [`SENTINEL_RECHECK`]), and it moves to
//!   the new master once they name one. Sentinel's own clients do this too.
//!
//! Every connection is lazy: it connects on its first command, on the
//! runtime that sends it, so a server down at start is an error per
//! command (a 503), not a failed start.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult,
    Script, Value,
};
use tokio::sync::OnceCell;

use crate::config::{RedisMode, RedisTarget, RedisUrl};
use crate::error::StoreError;

/// How often a sentinel connection asks the sentinels for the master at
/// most, while its commands fail.
pub const SENTINEL_RECHECK: Duration = Duration::from_millis(250);

/// Connections a [`Connector::connect`] with `WAIT` spreads its commands
/// over: writes waiting for replicas at once.
pub const WAIT_CONNECTIONS: usize = 16;

/// How long a `WAIT` for replicas may take at most: it holds its
/// connection (and the commands behind it) for that long when the replicas
/// are away.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Makes connections to one Redis role.
#[derive(Clone)]
pub struct Connector {
    kind: Kind,
    timeout: Duration,
    wait_replicas: u32,
}

#[derive(Clone)]
enum Kind {
    Single(Box<redis::Client>),
    Cluster(Arc<ClusterSettings>),
    Sentinel(Arc<SentinelSettings>),
}

/// A cluster's seed nodes.
struct ClusterSettings {
    seeds: Vec<RedisUrl>,
}

/// A client of the cluster at `seeds` whose commands time out after
/// `response` (retries and redirections included), and whose connections
/// after `timeout` or 2 s, whichever is shorter.
fn cluster_client(
    seeds: &[RedisUrl],
    timeout: Duration,
    response: Duration,
) -> RedisResult<ClusterClient> {
    ClusterClientBuilder::new(seeds.iter().map(RedisUrl::expose))
        .connection_timeout(timeout.min(Duration::from_secs(2)))
        .response_timeout(response)
        .retries(6)
        .min_retry_wait(20)
        .max_retry_wait(500)
        .build()
}

/// What a sentinel connection needs to find its master.
struct SentinelSettings {
    sentinels: Vec<RedisUrl>,
    master: String,
    node: SentinelNodeConnectionInfo,
}

impl SentinelSettings {
    fn client(&self) -> RedisResult<SentinelClient> {
        SentinelClient::build(
            self.sentinels.iter().map(RedisUrl::expose).collect(),
            self.master.clone(),
            Some(self.node.clone()),
            SentinelServerType::Master,
        )
    }
}

impl Connector {
    /// Checks `target`'s URLs and makes a connector for them (no connection
    /// yet). `timeout` bounds each command; connecting is bounded by the
    /// same time or 2 s, whichever is shorter.
    ///
    /// A `rediss://` URL connects over TLS and verifies the server's
    /// certificate against the system's roots, or those of `SSL_CERT_FILE`
    /// / `SSL_CERT_DIR` when set (rustls-native-certs).
    /// `rediss://host/#insecure` skips the verification: for tests only,
    /// and warned about here.
    pub fn new(target: &RedisTarget, timeout: Duration) -> Result<Self, StoreError> {
        for url in &target.urls {
            let info = url.expose().into_connection_info()?;
            if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
                tracing::warn!(
                    redis = %url,
                    "#insecure: this Redis' TLS certificate is not verified; use it only in tests"
                );
            }
        }
        let kind = match target.mode {
            RedisMode::Single => {
                let url = target
                    .urls
                    .first()
                    .ok_or_else(|| StoreError::Queue("no Redis URL".into()))?;
                Kind::Single(Box::new(redis::Client::open(url.expose())?))
            }
            RedisMode::Cluster => {
                let seeds = target.urls.clone();
                // Checks the seeds (no connection yet).
                cluster_client(&seeds, timeout, timeout)?;
                Kind::Cluster(Arc::new(ClusterSettings { seeds }))
            }
            RedisMode::Sentinel => {
                let first = target
                    .urls
                    .first()
                    .ok_or_else(|| StoreError::Queue("no sentinel URL".into()))?
                    .expose()
                    .into_connection_info()?;
                // The sentinels' credentials and TLS are the master's too.
                let mut node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(first.redis_settings().clone());
                if let redis::ConnectionAddr::TcpTls { insecure, .. } = first.addr() {
                    node = node.set_tls_mode(if *insecure {
                        redis::TlsMode::Insecure
                    } else {
                        redis::TlsMode::Secure
                    });
                }
                let settings = SentinelSettings {
                    sentinels: target.urls.clone(),
                    master: target.master.clone().unwrap_or_default(),
                    node,
                };
                settings.client()?;
                Kind::Sentinel(Arc::new(settings))
            }
        };
        Ok(Self {
            kind,
            timeout,
            wait_replicas: target.wait_replicas,
        })
    }

    /// A lazily connected, multiplexed connection whose commands time out
    /// after the connector's timeout. Its I/O runs on the runtime that first
    /// uses it, so give each thread-per-core runtime its own.
    ///
    /// With `KVQ_*_REDIS_WAIT_REPLICAS` set, it is [`WAIT_CONNECTIONS`]
    /// connections used in turn: `WAIT` holds the connection it is sent on
    /// (and every command queued behind it) for a replication round trip,
    /// so one connection would carry one write per round trip.
    pub fn connect(&self) -> Result<Conn, StoreError> {
        if self.wait_replicas == 0 {
            return self.connect_with_timeout(self.timeout);
        }
        let conns = (0..WAIT_CONNECTIONS)
            .map(|_| self.connect_with_timeout(self.timeout))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Conn::Pool(Arc::new(Pool {
            conns,
            next: AtomicUsize::new(0),
        })))
    }

    /// [`Connector::connect`] with another response timeout: a connection of
    /// its own, e.g. for blocking reads, which would stall the other
    /// commands of a shared one.
    pub fn connect_with_timeout(&self, timeout: Duration) -> Result<Conn, StoreError> {
        let connect_timeout = self.timeout.min(Duration::from_secs(2));
        Ok(match &self.kind {
            Kind::Single(client) => Conn::Single(ConnectionManager::new_lazy_with_config(
                (**client).clone(),
                manager_config(timeout, connect_timeout),
            )?),
            Kind::Cluster(cluster) => Conn::Cluster(Arc::new(ClusterConn {
                client: cluster_client(&cluster.seeds, self.timeout, timeout)?,
                conn: OnceCell::new(),
            })),
            Kind::Sentinel(settings) => Conn::Sentinel(Arc::new(SentinelConn {
                settings: settings.clone(),
                config: manager_config(timeout, connect_timeout),
                current: Mutex::new(None),
                resolving: tokio::sync::Mutex::new(None),
            })),
        })
    }

    /// A Pub/Sub connection: to the server, to the current master, or to
    /// the first cluster node that answers (a cluster delivers `PUBLISH`
    /// to every node).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match &self.kind {
            Kind::Single(client) => client.get_async_pubsub().await,
            Kind::Sentinel(settings) => {
                let mut sentinel = settings.client()?;
                sentinel.async_get_client().await?.get_async_pubsub().await
            }
            Kind::Cluster(cluster) => {
                let mut last = None;
                for seed in &cluster.seeds {
                    match redis::Client::open(seed.expose())?.get_async_pubsub().await {
                        Ok(pubsub) => return Ok(pubsub),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RedisError::from((redis::ErrorKind::InvalidClientConfig, "no seed node"))
                }))
            }
        }
    }

    /// Replicas each write must reach before it counts
    /// (`KVQ_*_REDIS_WAIT_REPLICAS`), and how long to wait for them.
    pub fn wait(&self) -> Option<WaitReplicas> {
        (self.wait_replicas > 0).then(|| WaitReplicas {
            replicas: self.wait_replicas,
            timeout: (self.timeout / 2).min(MAX_WAIT),
        })
    }
}

fn manager_config(timeout: Duration, connect_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(connect_timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500))
}

/// `WAIT replicas timeout`: a write counts once this many replicas have it.
#[derive(Debug, Clone, Copy)]
pub struct WaitReplicas {
    /// How many replicas must confirm.
    pub replicas: u32,
    /// How long `WAIT` blocks at most.
    pub timeout: Duration,
}

impl WaitReplicas {
    /// Runs `pipe`, whose commands call `script`, then `WAIT`, in one round
    /// trip to the node the pipeline goes to ([`query_loading`]): answers
    /// the pipeline's answer and the number of replicas that confirmed it.
    pub async fn query<T: FromRedisValue>(
        &self,
        conn: &Conn,
        mut pipe: Pipeline,
        script: &Script,
    ) -> RedisResult<(T, i64)> {
        self.append(&mut pipe);
        query_loading(conn, &pipe, script).await
    }

    /// Appends this `WAIT` to `pipe`.
    pub fn append(&self, pipe: &mut Pipeline) {
        pipe.cmd("WAIT")
            .arg(self.replicas)
            .arg(u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX));
    }

    /// The error for a write that fewer replicas than asked confirmed in
    /// time: it is on the master, and lost if the master fails before a
    /// replica gets it.
    pub fn short(&self, confirmed: i64) -> StoreError {
        StoreError::NotReplicated {
            wanted: self.replicas,
            confirmed: u32::try_from(confirmed).unwrap_or(0),
            within: self.timeout,
        }
    }
}

/// A connection to a Redis role, in whatever mode it runs. Cheap to clone;
/// clones share the connection.
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(Arc<ClusterConn>),
    /// The master Sentinel names.
    Sentinel(Arc<SentinelConn>),
    /// Connections of one of the kinds above, used in turn.
    Pool(Arc<Pool>),
}

/// Connections used in turn, one command or pipeline each.
pub struct Pool {
    conns: Vec<Conn>,
    next: AtomicUsize,
}

impl Pool {
    fn pick(&self) -> Conn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len().max(1);
        self.conns[i].clone()
    }
}

impl Conn {
    /// Whether commands of one pipeline must share a hash slot.
    pub fn is_cluster(&self) -> bool {
        match self {
            Conn::Cluster(_) => true,
            Conn::Pool(pool) => pool.conns.first().is_some_and(Conn::is_cluster),
            Conn::Single(_) | Conn::Sentinel(_) => false,
        }
    }

    /// `PING`: the server, the master, or any cluster master that answers
    /// (a cluster client wants a plain `PING` answered by every master, so
    /// one master failing over would make the whole role look down, and
    /// every API pod unready at once, while the other masters serve).
    pub async fn ping(&self) -> RedisResult<()> {
        match self {
            Conn::Cluster(cluster) => {
                use redis::cluster_routing::{
                    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                };
                let mut conn = cluster.conn().await?;
                conn.route_command(
                    redis::cmd("PING"),
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::OneSucceeded),
                    )),
                )
                .await
                .map(drop)
            }
            Conn::Pool(pool) => Box::pin(pool.pick().ping()).await,
            other => redis::cmd("PING").query_async(&mut other.clone()).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(cluster) => Box::pin(async move {
                let mut conn = cluster.conn().await?;
                conn.req_packed_command(cmd).await
            }),
            Conn::Sentinel(sentinel) => Box::pin(async move {
                let (addr, mut conn) = sentinel.conn().await?;
                let answer = conn.req_packed_command(cmd).await;
                if let Err(e) = &answer {
                    sentinel.check(&addr, e);
                }
                answer
            }),
            Conn::Pool(pool) => Box::pin(async move {
                let mut conn = pool.pick();
                conn.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(cluster) => Box::pin(async move {
                let mut conn = cluster.conn().await?;
                conn.req_packed_commands(pipeline, offset, count).await
            }),
            Conn::Sentinel(sentinel) => Box::pin(async move {
                let (addr, mut conn) = sentinel.conn().await?;
                let answer = conn.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &answer {
                    sentinel.check(&addr, e);
                }
                answer
            }),
            Conn::Pool(pool) => Box::pin(async move {
                let mut conn = pool.pick();
                conn.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(_) => 0,
            Conn::Sentinel(sentinel) => sentinel.current().map_or(0, |(_, conn)| conn.get_db()),
            Conn::Pool(pool) => pool.conns.first().map_or(0, Conn::get_db),
        }
    }
}

/// A cluster connection, made on first use.
pub struct ClusterConn {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

impl ClusterConn {
    async fn conn(&self) -> RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// A connection to the master the sentinels name, following failovers.
pub struct SentinelConn {
    settings: Arc<SentinelSettings>,
    config: ConnectionManagerConfig,
    /// The master's address and the connection to it.
    current: Mutex<Option<(String, ConnectionManager)>>,
    /// Held while asking the sentinels; when they were last asked.
    resolving: tokio::sync::Mutex<Option<Instant>>,
}

impl SentinelConn {
    fn current(&self) -> Option<(String, ConnectionManager)> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The connection to the master, asking the sentinels first if there is
    /// none yet.
    async fn conn(self: &Arc<Self>) -> RedisResult<(String, ConnectionManager)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        self.resolve(None).await?;
        self.current().ok_or_else(|| {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "no master known to the sentinels",
            ))
        })
    }

    /// After a failed command sent to `addr`: if the error may mean a
    /// failover, asks the sentinels again, in the background.
    fn check(self: &Arc<Self>, addr: &str, error: &RedisError) {
        let failover = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || matches!(
                error.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
                )
            );
        if failover {
            let this = self.clone();
            let addr = addr.to_owned();
            tokio::spawn(async move {
                if let Err(e) = this.resolve(Some(&addr)).await {
                    tracing::warn!(error = %e, "the sentinels do not name a master");
                }
            });
        }
    }

    /// Asks the sentinels for the master and connects to it if it moved.
    /// `failed`: the address a command failed on; nothing is done if the
    /// connection moved away from it already, or the sentinels were asked
    /// less than [`SENTINEL_RECHECK`] ago.
    async fn resolve(&self, failed: Option<&str>) -> RedisResult<()> {
        let mut last = self.resolving.lock().await;
        let current = self.current();
        match (&current, failed) {
            (Some((addr, _)), Some(failed)) if addr != failed => return Ok(()),
            (Some(_), None) => return Ok(()),
            _ => {}
        }
        if current.is_some() && last.is_some_and(|at| at.elapsed() < SENTINEL_RECHECK) {
            return Ok(());
        }
        *last = Some(Instant::now());
        let client = self.settings.client()?.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        if current.as_ref().is_some_and(|(now, _)| *now == addr) {
            return Ok(());
        }
        let conn = ConnectionManager::new_lazy_with_config(client, self.config.clone())?;
        if let Some((old, _)) = &current {
            tracing::warn!(from = %old, to = %addr, master = %self.settings.master, "the sentinels name a new master; following it");
        }
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((addr, conn));
        Ok(())
    }
}

/// Runs every command of `cmds` and answers their replies in order: in one
/// pipeline, or, on a cluster (where a pipeline's commands must share a
/// slot), each on its own, all at once (the cluster connection still
/// pipelines those going to one node).
pub async fn query_all(conn: &Conn, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    if conn.is_cluster() {
        let runs = cmds.iter().map(|cmd| {
            let mut conn = conn.clone();
            async move { cmd.query_async::<Value>(&mut conn).await }
        });
        return futures::future::try_join_all(runs).await;
    }
    let mut pipe = redis::pipe();
    for cmd in cmds {
        pipe.add_command(cmd);
    }
    pipe.query_async(&mut conn.clone()).await
}

/// Runs `pipe`, whose commands call `script`: a server that has forgotten
/// the script (restarted, or a replica promoted: scripts are not
/// replicated) gets it loaded, once, and the pipeline again.
pub async fn query_loading<T: FromRedisValue>(
    conn: &Conn,
    pipe: &Pipeline,
    script: &Script,
) -> RedisResult<T> {
    let mut conn = conn.clone();
    match pipe.query_async(&mut conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(&mut conn).await?;
            pipe.query_async(&mut conn).await
        }
        answer => answer,
    }
}
