//! A real `redis-server` for one test, plain or TLS only.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::TestCa;

/// A `redis-server` on a free loopback port, persistence off, killed on drop.
pub struct TestRedis {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    extra: Vec<String>,
    /// Whether `redis.conf` in [`TestRedis::dir`] is passed as the config
    /// file (a sentinel needs one it can rewrite).
    config_file: bool,
    /// With TLS: the PEM of the CA that signed the server's certificate.
    tls_ca: Option<String>,
}

impl TestRedis {
    /// Starts a server and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line arguments (e.g.
    /// `["--requirepass", "pw"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_server(extra, None)
    }

    /// Starts a server that speaks TLS only (no plain port), with a
    /// certificate for `127.0.0.1` signed by `ca`, and extra arguments.
    /// Clients are not asked for certificates. [`TestRedis::url`] is then
    /// `rediss://`.
    pub fn start_tls(ca: &TestCa, extra: &[&str]) -> Self {
        Self::start_server(extra, Some(ca))
    }

    fn start_server(extra: &[&str], ca: Option<&TestCa>) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_custom(extra, ca, None, free_port)
    }

    /// Starts a server with `extra` arguments, TLS only if `ca` is given,
    /// `config` (if any) written to `redis.conf` in its directory and passed
    /// as the config file, on a port from `pick_port` (asked again if the
    /// server cannot start there). For the cluster and sentinel harnesses.
    pub(crate) fn start_custom(
        extra: Vec<String>,
        ca: Option<&TestCa>,
        config: Option<&str>,
        pick_port: fn() -> u16,
    ) -> Self {
        let mut server = Self {
            child: None,
            port: 0,
            dir: tempfile::tempdir().unwrap(),
            extra,
            config_file: config.is_some(),
            tls_ca: None,
        };
        if let Some(config) = config {
            std::fs::write(server.dir.path().join("redis.conf"), config).unwrap();
        }
        if let Some(ca) = ca {
            let (cert, key) = ca.server_cert();
            let dir = server.dir.path();
            std::fs::write(dir.join("server.pem"), cert).unwrap();
            std::fs::write(dir.join("server.key"), key).unwrap();
            std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
            server.tls_ca = Some(ca.pem().to_owned());
        }
        for _ in 0..20 {
            server.port = pick_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server on a free port (is redis-server installed?)");
    }

    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        if self.config_file {
            cmd.arg(self.dir.path().join("redis.conf"));
        }
        if self.tls_ca.is_some() {
            let file = |name: &str| self.dir.path().join(name);
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(file("server.pem"))
                .arg("--tls-key-file")
                .arg(file("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(file("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the test script installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && child.try_wait().ok().flatten().is_some()
            {
                self.child = None;
                return false; // port taken, most likely
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The `redis-cli` arguments that reach this server other than its
    /// port: `--tls --cacert CA` with TLS, `-a PASSWORD` with a password.
    pub(crate) fn cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.tls_ca.is_some() {
            let ca = self.dir.path().join("ca.pem");
            args.extend(["--tls".into(), "--cacert".into(), ca.display().to_string()]);
        }
        if let Some(password) = self.password() {
            args.extend(["-a".into(), password.into(), "--no-auth-warning".into()]);
        }
        args
    }

    fn ping(&self) -> bool {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(self.cli_args())
            .arg("PING")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
            .unwrap_or(false)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` with TLS), with `:PASSWORD@`
    /// when started with `--requirepass`.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match self.password() {
            Some(password) => format!("{scheme}://:{password}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// Whether the server speaks TLS only.
    pub fn is_tls(&self) -> bool {
        self.tls_ca.is_some()
    }

    /// The password of `--requirepass`, if any.
    pub(crate) fn password(&self) -> Option<&str> {
        let i = self.extra.iter().position(|a| a == "--requirepass")?;
        self.extra.get(i + 1).map(String::as_str)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL): clients see connections drop and refused.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server runs (not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's directory (`--dir`): its data files, and `nodes.conf`
    /// for a cluster node.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Replaces the extra arguments the next [`TestRedis::restart`] uses
    /// (e.g. a sentinel-managed node restarted as a replica of the current
    /// master).
    pub(crate) fn set_extra(&mut self, extra: Vec<String>) {
        self.extra = extra;
    }

    /// Starts the server again on the same port (empty: persistence is off).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart redis-server on port {}", self.port);
    }

    /// A synchronous connection for checks made by the test itself (over
    /// TLS, trusting the test's CA, when the server speaks TLS).
    pub fn conn(&self) -> redis::Connection {
        self.try_conn().unwrap()
    }

    /// [`TestRedis::conn`], or the error while the server is away.
    pub fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        self.client()?.get_connection()
    }

    /// A connection for the harness' own polls: connecting, reading and
    /// writing each give up after 2 s, so that a frozen (SIGSTOP) or dead
    /// node makes a poll fail, not hang.
    pub(crate) fn quick_conn(&self) -> redis::RedisResult<redis::Connection> {
        let timeout = Duration::from_secs(2);
        let conn = self.client()?.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(conn)
    }

    /// The TLS test CA's PEM, with TLS.
    pub(crate) fn tls_ca(&self) -> Option<&str> {
        self.tls_ca.as_deref()
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.tls_ca {
            Some(ca) => {
                // The test process needs a rustls provider as the binaries do.
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone().into_bytes()),
                };
                redis::Client::build_with_tls(self.url(), certificates)
            }
            None => redis::Client::open(self.url()),
        }
    }

    /// Runs a command and returns its answer.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args).unwrap()
    }

    /// Runs a command that may fail (e.g. on a key not made yet).
    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let cmd = crate::redis_server::command(args);
        cmd.query(&mut self.try_conn()?)
    }

    /// How many jobs the queue's partition streams hold (namespace `kvq`):
    /// waiting, in flight, or final but not yet committed (an owner commits
    /// within a few tens of milliseconds).
    pub fn pending_jobs(&self) -> i64 {
        self.try_pending_jobs().unwrap_or(0)
    }

    /// [`TestRedis::pending_jobs`], or `None` while the server does not
    /// answer.
    pub fn try_pending_jobs(&self) -> Option<i64> {
        let mut conn = self.try_conn().ok()?;
        let mut pipe = redis::pipe();
        for p in 0..kvq_shared::keys::BUCKETS {
            pipe.cmd("XLEN").arg(kvq_shared::keys::stream_key("kvq", p));
        }
        let lengths: Vec<i64> = pipe.query(&mut conn).ok()?;
        Some(lengths.iter().sum())
    }

    /// Writes `keys` (namespace `kvq`) straight into this data Redis as the
    /// apply script would have created them (value `1`, version 1, no TTL:
    /// value, metadata and index entry), pipelined in chunks: a large
    /// keyspace in a second, where the API and a worker would take minutes.
    pub fn seed_keys<I: IntoIterator<Item = String>>(&self, keys: I) {
        use kvq_shared::keys;
        let mut conn = self.conn();
        let mut pipe = redis::pipe();
        let mut queued = 0;
        for key in keys {
            let bucket = keys::bucket(&key);
            pipe.cmd("HSET")
                .arg(keys::value_key("kvq", &key))
                .arg(&["v", "1", "ver", "1", "ts", "0"][..])
                .ignore()
                .cmd("HSET")
                .arg(keys::meta_key("kvq", &key))
                .arg(&["ver", "1", "t", "0"][..])
                .ignore()
                .cmd("ZADD")
                .arg(keys::index_key("kvq", bucket))
                .arg(0)
                .arg(&key)
                .ignore();
            queued += 1;
            if queued == 5_000 {
                pipe.query::<()>(&mut conn).unwrap();
                pipe.clear();
                queued = 0;
            }
        }
        if queued > 0 {
            pipe.query::<()>(&mut conn).unwrap();
        }
    }

    /// CPU time the server has used so far, user plus system, in seconds
    /// (`INFO cpu`).
    pub fn cpu_seconds(&self) -> f64 {
        let info: String = self.cmd(&["INFO", "cpu"]);
        info.lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(':')?;
                matches!(name, "used_cpu_sys" | "used_cpu_user")
                    .then(|| value.trim().parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }

    /// Every key in the server.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.cmd(&["KEYS", "*"]);
        keys.sort();
        keys
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The command `args` (name first), for the test's own checks.
pub(crate) fn command(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}
