//! A real Sentinel set for one test: a master, one replica and 3 sentinels
//! on loopback.
//!
//! The data nodes and the sentinels are [`TestRedis`] servers (a sentinel
//! is `redis-server <its config> --sentinel`, with a config file it may
//! rewrite), so every process is killed on drop.

use crate::TestRedis;
use crate::node_checks::{check_replica, poll_async, poll_sync, role};

/// The master's name as the sentinels know it.
pub const MASTER_NAME: &str = "kvq";

/// How long a sentinel waits for the master to answer before it deems it
/// down (`down-after-milliseconds`). A failover takes about 2.5 s after a
/// master dies.
pub const DOWN_AFTER_MS: u64 = 1_000;

/// `failover-timeout`: also how long after a failed attempt (a split vote
/// among the sentinels) they wait, doubled, before they try again.
pub const FAILOVER_TIMEOUT_MS: u64 = 2_000;

/// Options for [`TestSentinel`].
#[derive(Default)]
pub struct TestSentinelBuilder {
    extra: Vec<String>,
    persistent: bool,
}

impl TestSentinelBuilder {
    /// Extra `redis-server` arguments for the master and the replica. With
    /// `["--requirepass", PW]` they also get `--masterauth PW`, the sentinels
    /// take the same password (`requirepass`, and `auth-pass` /
    /// `sentinel-pass` among themselves), and every URL carries `:PW@`.
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|s| s.to_string()));
        self
    }

    /// The master and the replica keep an append-only file synced on every
    /// write (`--appendonly yes --appendfsync always`).
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// Starts the master, the replica and the sentinels; returns once the
    /// replica is in sync and every sentinel knows the master, the replica
    /// and the two other sentinels (so that a failover can happen at once).
    pub fn start(self) -> TestSentinel {
        let mut data_args: Vec<String> = vec![
            // A full sync starts at once rather than after 5 s.
            "--repl-diskless-sync-delay".into(),
            "0".into(),
        ];
        if self.persistent {
            data_args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        }
        let password = flag_value(&self.extra, "--requirepass");
        data_args.extend(self.extra.iter().cloned());
        if let Some(password) = &password
            && flag_value(&self.extra, "--masterauth").is_none()
        {
            data_args.extend(["--masterauth".into(), password.clone()]);
        }
        let master = TestRedis::start_custom(data_args.clone(), None, None, crate::free_port);
        let mut replica_args = data_args.clone();
        replica_args.extend(replica_of(master.port()));
        let replica = TestRedis::start_custom(replica_args, None, None, crate::free_port);

        let mut config = format!(
            "sentinel monitor {MASTER_NAME} 127.0.0.1 {port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            port = master.port()
        );
        let mut sentinel_args = vec!["--sentinel".to_owned()];
        if let Some(password) = &password {
            config.push_str(&format!(
                "sentinel auth-pass {MASTER_NAME} {password}\nsentinel sentinel-pass {password}\n"
            ));
            sentinel_args.extend(["--requirepass".into(), password.clone()]);
        }
        let sentinels = (0..3)
            .map(|_| {
                TestRedis::start_custom(
                    sentinel_args.clone(),
                    None,
                    Some(&config),
                    crate::free_port,
                )
            })
            .collect();
        let set = TestSentinel {
            nodes: vec![master, replica],
            sentinels,
            data_args,
        };
        poll_sync(
            "the sentinels to know the master, replica and each other",
            || set.check_ready(),
        );
        set
    }
}

/// A master, one replica and 3 sentinels (quorum 2) on loopback; every
/// process is killed on drop. Data nodes are named by their port; which
/// one is the master changes with failovers: [`TestSentinel::master`] asks
/// the sentinels.
pub struct TestSentinel {
    /// The data nodes: the first master and its replica, in that order.
    nodes: Vec<TestRedis>,
    sentinels: Vec<TestRedis>,
    /// The data nodes' arguments, without `--replicaof`.
    data_args: Vec<String>,
}

impl TestSentinel {
    /// A sentinel set with default options.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// Options.
    pub fn builder() -> TestSentinelBuilder {
        TestSentinelBuilder::default()
    }

    /// The sentinels' URLs, comma-separated, as `KVQ_*_REDIS_URL` takes
    /// them in sentinel mode.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.sentinels.iter().map(TestRedis::url).collect();
        urls.join(",")
    }

    /// The master's name as the sentinels know it (`KVQ_*_REDIS_MASTER`).
    pub fn master_name(&self) -> &'static str {
        MASTER_NAME
    }

    /// The data nodes, live or killed: the first master, then its replica.
    pub fn nodes(&self) -> &[TestRedis] {
        &self.nodes
    }

    /// The sentinels.
    pub fn sentinels(&self) -> &[TestRedis] {
        &self.sentinels
    }

    /// The data node on `port`.
    pub fn node(&self, port: u16) -> &TestRedis {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"))
    }

    fn node_mut(&mut self, port: u16) -> &mut TestRedis {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"))
    }

    /// The port of the master, as the first sentinel that answers names it
    /// (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    pub fn master(&self) -> u16 {
        self.try_master().expect("no sentinel answers")
    }

    /// [`TestSentinel::master`], or `None` while no sentinel answers.
    pub fn try_master(&self) -> Option<u16> {
        self.sentinels
            .iter()
            .filter(|s| s.is_running())
            .find_map(|s| master_named_by(s).ok())
    }

    /// The master's node.
    pub fn master_node(&self) -> &TestRedis {
        self.node(self.master())
    }

    /// Kills the master (SIGKILL); returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master();
        self.node_mut(port).stop();
        port
    }

    /// Waits until every live sentinel names a master other than `old`
    /// and that node says it is a master (`ROLE`); returns its port.
    pub async fn wait_failover(&self, old: u16) -> u16 {
        poll_async(&format!("the sentinels to replace master {old}"), || {
            let mut named = None;
            for sentinel in self.sentinels.iter().filter(|s| s.is_running()) {
                let port = master_named_by(sentinel)?;
                if port == old {
                    return Err(format!("sentinel {} still names {old}", sentinel.port()));
                }
                if named.is_some_and(|p| p != port) {
                    return Err("the sentinels name different masters".into());
                }
                named = Some(port);
            }
            let port = named.ok_or("no sentinel runs")?;
            let role = role(self.node(port))?;
            if role != "master" {
                return Err(format!("node {port} is a {role}"));
            }
            Ok(port)
        })
        .await
    }

    /// Starts data node `port` again on its port, as a replica of the
    /// master the sentinels name if that is another node (as an operator or
    /// an orchestrator brings a failed master back; without persistence it
    /// would otherwise come back an empty master), and returns once it is in
    /// sync and the sentinels count it among the master's replicas.
    pub async fn restart(&mut self, port: u16) {
        let master = self.master();
        let mut args = self.data_args.clone();
        if master != port {
            args.extend(replica_of(master));
        }
        let node = self.node_mut(port);
        node.set_extra(args);
        node.restart();
        poll_async(&format!("node {port} to rejoin"), || {
            if master != port {
                check_replica(self.node(port), self.node(master))?;
            }
            self.check_sentinels(master)
        })
        .await;
    }

    /// Sentinel `index` of [`TestSentinel::sentinels`], to stop or restart
    /// it (it keeps its config file, which it rewrites as it learns).
    pub fn sentinel_mut(&mut self, index: usize) -> &mut TestRedis {
        &mut self.sentinels[index]
    }

    /// How many jobs the queue's partition streams on the master hold, as
    /// [`TestRedis::pending_jobs`].
    pub fn pending_jobs(&self) -> i64 {
        self.try_pending_jobs().unwrap_or(0)
    }

    /// [`TestSentinel::pending_jobs`], or `None` while no master answers.
    pub fn try_pending_jobs(&self) -> Option<i64> {
        self.node(self.try_master()?).try_pending_jobs()
    }

    /// CPU time the live data nodes have used so far (the sentinels left
    /// out), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(TestRedis::cpu_seconds)
            .sum()
    }

    fn check_ready(&self) -> Result<(), String> {
        let [master, replica] = &self.nodes[..] else {
            unreachable!()
        };
        check_replica(replica, master)?;
        self.check_sentinels(master.port())
    }

    /// Every live sentinel names `master`, deems it up, and knows the live
    /// replicas (up) and the other live sentinels.
    fn check_sentinels(&self, master: u16) -> Result<(), String> {
        let live_sentinels = self.sentinels.iter().filter(|s| s.is_running()).count();
        let live_replicas = self
            .nodes
            .iter()
            .filter(|n| n.is_running() && n.port() != master)
            .count();
        for sentinel in self.sentinels.iter().filter(|s| s.is_running()) {
            let port = sentinel.port();
            let named = master_named_by(sentinel)?;
            if named != master {
                return Err(format!("sentinel {port} names {named}, not {master}"));
            }
            let state = sentinel_state(sentinel, &["SENTINEL", "MASTER", MASTER_NAME])?;
            let state = state.first().ok_or("no SENTINEL MASTER answer")?;
            let field = |name: &str| state.get(name).map(String::as_str).unwrap_or("");
            if field("flags") != "master" {
                return Err(format!(
                    "sentinel {port} flags the master {}",
                    field("flags")
                ));
            }
            if field("num-other-sentinels") != (live_sentinels - 1).to_string() {
                return Err(format!(
                    "sentinel {port} knows {} other sentinels",
                    field("num-other-sentinels")
                ));
            }
            let replicas = sentinel_state(sentinel, &["SENTINEL", "REPLICAS", MASTER_NAME])?;
            let up = replicas
                .iter()
                .filter(|r| {
                    r.get("flags").map(String::as_str) == Some("slave")
                        && r.get("master-link-status").map(String::as_str) == Some("ok")
                        && r.get("master-port") == Some(&master.to_string())
                })
                .count();
            if up < live_replicas {
                return Err(format!("sentinel {port} sees {up} replicas up"));
            }
        }
        Ok(())
    }
}

/// The arguments that make a node a replica of the server on `port`.
fn replica_of(port: u16) -> [String; 3] {
    ["--replicaof".into(), "127.0.0.1".into(), port.to_string()]
}

/// The value after `flag` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

/// The master's port as `sentinel` names it.
fn master_named_by(sentinel: &TestRedis) -> Result<u16, String> {
    let address: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(MASTER_NAME)
        .query(&mut sentinel.quick_conn().map_err(|e| e.to_string())?)
        .map_err(|e| format!("sentinel {}: {e}", sentinel.port()))?;
    let (_, port) = address.ok_or("the sentinel knows no such master")?;
    port.parse().map_err(|_| format!("bad port {port}"))
}

/// A `SENTINEL MASTER` / `SENTINEL REPLICAS` answer: one field map per
/// instance.
fn sentinel_state(
    sentinel: &TestRedis,
    args: &[&str],
) -> Result<Vec<std::collections::HashMap<String, String>>, String> {
    let cmd = crate::redis_server::command(args);
    let mut conn = sentinel.quick_conn().map_err(|e| e.to_string())?;
    let value: redis::Value = cmd
        .query(&mut conn)
        .map_err(|e| format!("sentinel {}: {e}", sentinel.port()))?;
    let as_map = |v: &redis::Value| -> Option<std::collections::HashMap<String, String>> {
        let flat: Vec<String> = redis::from_redis_value_ref(v).ok()?;
        Some(
            flat.chunks(2)
                .filter_map(|pair| Some((pair.first()?.clone(), pair.get(1)?.clone())))
                .collect(),
        )
    };
    // SENTINEL MASTER answers one flat list; SENTINEL REPLICAS a list of them.
    if let Some(map) = as_map(&value) {
        return Ok(vec![map]);
    }
    let list: Vec<redis::Value> = redis::from_redis_value_ref(&value)
        .map_err(|e| format!("sentinel {}: {e}", sentinel.port()))?;
    Ok(list.iter().filter_map(as_map).collect())
}
