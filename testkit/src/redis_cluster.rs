//! A real Redis Cluster for one test: 3 masters with one replica each on
//! loopback, formed by `redis-cli --cluster create`.
//!
//! Each node is a [`TestRedis`] started with `--cluster-enabled yes`, so it
//! is killed on drop like any other test server. Its `nodes.conf` lives in
//! its own directory, so [`TestCluster::restart`] brings a node back with
//! its identity and it rejoins the cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use redis::cluster::{ClusterClient, ClusterConnection};

use crate::node_checks::{check_replica, info, poll_async, poll_sync, role};
use crate::{TestCa, TestRedis};

/// How long a node may go unanswered before the others flag it failed
/// (`cluster-node-timeout`). A failover takes about 1.5 times this (the
/// failure is agreed on, then the replica waits 0.5–1 s before its
/// election), then the survivors agree on it: about 4 s here.
pub const NODE_TIMEOUT_MS: u64 = 2_000;

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// Options for [`TestCluster`].
#[derive(Default)]
pub struct TestClusterBuilder<'a> {
    extra: Vec<String>,
    persistent: bool,
    ca: Option<&'a TestCa>,
    node_timeout_ms: Option<u64>,
}

impl<'a> TestClusterBuilder<'a> {
    /// Extra `redis-server` arguments for every node. With
    /// `["--requirepass", PW]` the nodes also get `--masterauth PW` (unless
    /// given), the URLs carry `:PW@` and the harness' `redis-cli` gets `-a`.
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|s| s.to_string()));
        self
    }

    /// Every node keeps an append-only file synced on every write
    /// (`--appendonly yes --appendfsync always`), so that a restarted node
    /// comes back with its data. Off by default, as for [`TestRedis`].
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// TLS only, with certificates signed by `ca`, on the client port, the
    /// cluster bus and replication (`--tls-cluster yes --tls-replication
    /// yes`); the URLs are `rediss://`.
    pub fn tls(mut self, ca: &'a TestCa) -> Self {
        self.ca = Some(ca);
        self
    }

    /// `cluster-node-timeout` in milliseconds (default [`NODE_TIMEOUT_MS`]).
    pub fn node_timeout_ms(mut self, ms: u64) -> Self {
        self.node_timeout_ms = Some(ms);
        self
    }

    /// Starts 6 nodes, forms the cluster and returns once every node says
    /// `cluster_state:ok`, all 16384 slots are served by 3 masters, and each
    /// master has a replica attached and in sync.
    pub fn start(self) -> TestCluster {
        let mut extra = self.extra;
        let password = flag_value(&extra, "--requirepass");
        if let Some(password) = &password
            && flag_value(&extra, "--masterauth").is_none()
        {
            extra.extend(["--masterauth".into(), password.clone()]);
        }
        let timeout = self.node_timeout_ms.unwrap_or(NODE_TIMEOUT_MS).to_string();
        let mut args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &timeout,
            // A replica takes over however long it was cut off from its
            // master: the tests kill masters on purpose.
            "--cluster-replica-validity-factor",
            "0",
            // A full sync starts at once rather than after 5 s.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.ca.is_some() {
            args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
        }
        if self.persistent {
            // Later arguments win over TestRedis' `--appendonly no`.
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        }
        args.extend(extra);
        let nodes: Vec<TestRedis> = (0..6)
            .map(|_| TestRedis::start_custom(args.clone(), self.ca, None, cluster_port))
            .collect();
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .args(nodes[0].cli_args())
            .output()
            .expect("redis-cli must be installed (the test script installs redis-tools)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = TestCluster {
            nodes,
            killed_slots: HashMap::new(),
        };
        poll_sync("the cluster to form", || cluster.check_formed());
        cluster
    }
}

/// A Redis Cluster of 3 masters with one replica each on loopback; every
/// node is killed on drop.
///
/// Nodes are named by their port. Which node is a master changes with
/// failovers: [`TestCluster::masters`] asks the cluster.
pub struct TestCluster {
    nodes: Vec<TestRedis>,
    /// A slot each killed master served when it was killed, by its port.
    killed_slots: HashMap<u16, u16>,
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The id of its master, for a replica.
    master: Option<String>,
    /// The slot ranges it serves, inclusive.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return None;
        }
        let address = fields[1].split(['@', ',']).next()?;
        let port = address.rsplit(':').next()?.parse().ok()?;
        let slots = fields[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => {
                    let slot = s.parse().ok()?;
                    Some((slot, slot))
                }
            })
            .collect();
        Some(Self {
            id: fields[0].to_owned(),
            port,
            flags: fields[2].split(',').map(str::to_owned).collect(),
            master: (fields[3] != "-").then(|| fields[3].to_owned()),
            slots,
        })
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// A master not flagged failing (`fail` or `fail?`).
    fn is_live_master(&self) -> bool {
        self.has("master") && !self.has("fail") && !self.has("fail?")
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

impl TestCluster {
    /// A cluster with default options.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// Options.
    pub fn builder<'a>() -> TestClusterBuilder<'a> {
        TestClusterBuilder::default()
    }

    /// Every node, live or killed, in the order they were started.
    pub fn nodes(&self) -> &[TestRedis] {
        &self.nodes
    }

    /// The node on `port`.
    pub fn node(&self, port: u16) -> &TestRedis {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn node_mut(&mut self, port: u16) -> &mut TestRedis {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn live_nodes(&self) -> impl Iterator<Item = &TestRedis> {
        self.nodes.iter().filter(|n| n.is_running())
    }

    /// The seed list as `KVQ_*_REDIS_URL` takes it in cluster mode: every
    /// node's URL, comma-separated.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(TestRedis::url).collect();
        urls.join(",")
    }

    /// The ports of the nodes that are masters now, as the first live node
    /// that answers sees it (masters flagged failing left out), sorted.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view()
            .iter()
            .filter(|n| n.is_live_master() && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        ports.sort();
        ports
    }

    /// The port of the replica of master `port`, if it has one that is not
    /// flagged failing.
    pub fn replica_of(&self, port: u16) -> Option<u16> {
        let view = self.view();
        let id = &view.iter().find(|n| n.port == port)?.id;
        view.iter()
            .find(|n| {
                n.master.as_ref() == Some(id) && n.has("slave") && !n.has("fail") && !n.has("fail?")
            })
            .map(|n| n.port)
    }

    /// The port of the master serving `slot` now.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.view()
            .iter()
            .find(|n| n.is_live_master() && n.serves(slot))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no live master serves slot {slot}"))
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, asked of a live node).
    pub fn slot_of_key(&self, key: &str) -> u16 {
        self.live_nodes()
            .find_map(|node| {
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query(&mut node.quick_conn().ok()?)
                    .ok()
            })
            .expect("no live cluster node answers")
    }

    /// The port of the master serving `key` now.
    pub fn master_of_key(&self, key: &str) -> u16 {
        self.master_of_slot(self.slot_of_key(key))
    }

    /// Kills node `port` (SIGKILL). If it was a master, the slot it served
    /// is remembered for [`TestCluster::wait_failover`].
    pub fn kill(&mut self, port: u16) {
        let slot = self
            .view_from_others(port)
            .into_iter()
            .find(|n| n.port == port && n.has("master"))
            .and_then(|n| n.slots.first().map(|&(first, _)| first));
        if let Some(slot) = slot {
            self.killed_slots.insert(port, slot);
        }
        self.node_mut(port).stop();
    }

    /// Starts node `port` again on its port with its `nodes.conf`, and
    /// returns once it has rejoined: every live node says `cluster_state:ok`
    /// and sees it, and every live replica (it is one now if a replica was
    /// promoted in its place) is in sync with its master. Without
    /// persistence a node comes back empty: restart a killed master only
    /// after [`TestCluster::wait_failover`], or it comes back as an empty
    /// master of its slots.
    pub async fn restart(&mut self, port: u16) {
        self.node_mut(port).restart();
        self.killed_slots.remove(&port);
        poll_async(&format!("node {port} to rejoin the cluster"), || {
            self.check_healed()
        })
        .await;
    }

    /// Waits until every live node says `cluster_state:ok` with all slots
    /// served, no live node is flagged failing, the nodes agree on the
    /// masters, and every live replica is in sync (e.g. after a node was
    /// frozen with SIGSTOP and woken).
    pub async fn wait_healthy(&self) {
        poll_async("the cluster to be healthy", || self.check_healed()).await;
    }

    /// Waits until a replica of master `killed` (see [`TestCluster::kill`])
    /// is master of its slots and says so (`ROLE`), and every surviving node
    /// says `cluster_state:ok` and agrees; returns the new master's port.
    pub async fn wait_failover(&self, killed: u16) -> u16 {
        let slot = *self
            .killed_slots
            .get(&killed)
            .unwrap_or_else(|| panic!("node {killed} was not a master killed by kill()"));
        poll_async(&format!("a replica to replace master {killed}"), || {
            self.check_failed_over(killed, slot)
        })
        .await
    }

    /// How many keys matching `pattern` each master holds now: `(port,
    /// count)` sorted by port.
    pub fn keys_per_master(&self, pattern: &str) -> Vec<(u16, usize)> {
        self.masters()
            .into_iter()
            .map(|port| {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(pattern)
                    .query(&mut self.node(port).quick_conn().unwrap())
                    .unwrap();
                (port, keys.len())
            })
            .collect()
    }

    /// Every key on every master, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .masters()
            .into_iter()
            .flat_map(|port| self.node(port).keys())
            .collect();
        keys.sort();
        keys
    }

    /// A cluster connection (redis-rs' `ClusterClient`, seeded with the
    /// live nodes), which routes each command to the master of its key and
    /// follows `MOVED` / `ASK`.
    pub fn conn(&self) -> ClusterConnection {
        self.try_conn().unwrap()
    }

    /// [`TestCluster::conn`], or the error while no node answers.
    pub fn try_conn(&self) -> redis::RedisResult<ClusterConnection> {
        let seeds: Vec<String> = self.live_nodes().map(TestRedis::url).collect();
        let mut builder = ClusterClient::builder(seeds)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5));
        if let Some(ca) = self.nodes[0].tls_ca() {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.as_bytes().to_vec()),
            });
        }
        builder.build()?.get_connection()
    }

    /// Runs a command on the master of its key (redis-rs finds the key as
    /// Redis' command table places it) and returns its answer.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args).unwrap()
    }

    /// [`TestCluster::cmd`] that may fail.
    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let cmd = crate::redis_server::command(args);
        cmd.query(&mut self.try_conn()?)
    }

    /// How many jobs the queue's partition streams hold across the cluster
    /// (namespace `kvq`), as [`TestRedis::pending_jobs`].
    pub fn pending_jobs(&self) -> i64 {
        self.try_pending_jobs().unwrap_or(0)
    }

    /// [`TestCluster::pending_jobs`], or `None` while a stream's master does
    /// not answer.
    pub fn try_pending_jobs(&self) -> Option<i64> {
        let mut conn = self.try_conn().ok()?;
        let mut total = 0;
        for p in 0..kvq_shared::keys::BUCKETS {
            let length: i64 = redis::cmd("XLEN")
                .arg(kvq_shared::keys::stream_key("kvq", p))
                .query(&mut conn)
                .ok()?;
            total += length;
        }
        Some(total)
    }

    /// CPU time the live nodes have used so far, masters and replicas, user
    /// plus system, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.live_nodes().map(TestRedis::cpu_seconds).sum()
    }

    /// `CLUSTER NODES` as the first live node that answers sees it.
    fn view(&self) -> Vec<NodeLine> {
        self.live_nodes()
            .find_map(|node| cluster_nodes(node).ok())
            .expect("no live cluster node answers")
    }

    /// [`TestCluster::view`] from a node other than `port`.
    fn view_from_others(&self, port: u16) -> Vec<NodeLine> {
        self.live_nodes()
            .filter(|n| n.port() != port)
            .find_map(|node| cluster_nodes(node).ok())
            .unwrap_or_default()
    }

    /// Every live node's view, after checking that it says
    /// `cluster_state:ok` with every slot served.
    fn healthy_views(&self) -> Result<Vec<(u16, Vec<NodeLine>)>, String> {
        let mut views = Vec::new();
        for node in self.live_nodes() {
            let port = node.port();
            let info = info(node, &["CLUSTER", "INFO"])?;
            for (field, want) in [
                ("cluster_state", "ok"),
                ("cluster_slots_assigned", "16384"),
                ("cluster_slots_ok", "16384"),
            ] {
                let got = info.get(field).map(String::as_str);
                if got != Some(want) {
                    return Err(format!("node {port}: {field} is {got:?}"));
                }
            }
            views.push((port, cluster_nodes(node)?));
        }
        // Every node sees the same masters serving the same slots.
        let masters = |view: &[NodeLine]| -> BTreeMap<u16, Vec<(u16, u16)>> {
            view.iter()
                .filter(|n| n.is_live_master() && !n.slots.is_empty())
                .map(|n| (n.port, n.slots.clone()))
                .collect()
        };
        let first = masters(&views[0].1);
        for (port, view) in &views[1..] {
            if masters(view) != first {
                return Err(format!(
                    "node {port} sees masters {:?}, node {} sees {:?}",
                    masters(view),
                    views[0].0,
                    first
                ));
            }
        }
        let served: u32 = first
            .values()
            .flatten()
            .map(|&(a, b)| u32::from(b - a) + 1)
            .sum();
        if served != u32::from(SLOTS) {
            return Err(format!("the masters serve {served} slots"));
        }
        Ok(views)
    }

    /// Every live replica (in `view`) is attached to its master and in sync.
    fn check_replicas_in_sync(&self, view: &[NodeLine]) -> Result<(), String> {
        for replica in view.iter().filter(|n| n.has("slave")) {
            let node = self.node(replica.port);
            if !node.is_running() {
                continue;
            }
            let master = view
                .iter()
                .find(|n| Some(&n.id) == replica.master.as_ref())
                .ok_or_else(|| format!("replica {} has no known master", replica.port))?;
            check_replica(node, self.node(master.port))?;
        }
        Ok(())
    }

    fn check_formed(&self) -> Result<(), String> {
        let views = self.healthy_views()?;
        for (port, view) in &views {
            let masters = view.iter().filter(|n| n.is_live_master()).count();
            let replicas = view.iter().filter(|n| n.has("slave")).count();
            if masters != 3 || replicas != 3 {
                return Err(format!(
                    "node {port} sees {masters} masters and {replicas} replicas"
                ));
            }
        }
        let view = &views[0].1;
        let with_replica: BTreeSet<&String> =
            view.iter().filter_map(|n| n.master.as_ref()).collect();
        if with_replica.len() != 3 {
            return Err("not every master has a replica".into());
        }
        self.check_replicas_in_sync(view)
    }

    fn check_healed(&self) -> Result<(), String> {
        let views = self.healthy_views()?;
        for (port, view) in &views {
            for node in self.live_nodes() {
                let line = view
                    .iter()
                    .find(|n| n.port == node.port())
                    .ok_or_else(|| format!("node {port} does not know {}", node.port()))?;
                if line.has("fail") || line.has("fail?") {
                    return Err(format!("node {port} flags {} failing", node.port()));
                }
            }
        }
        self.check_replicas_in_sync(&views[0].1)
    }

    fn check_failed_over(&self, killed: u16, slot: u16) -> Result<u16, String> {
        let views = self.healthy_views()?;
        let view = &views[0].1;
        let owner = view
            .iter()
            .find(|n| n.is_live_master() && n.serves(slot))
            .ok_or_else(|| format!("no live master serves slot {slot}"))?;
        if owner.port == killed {
            return Err(format!("node {killed} still serves slot {slot}"));
        }
        let role = role(self.node(owner.port))?;
        if role != "master" {
            return Err(format!("node {} says it is a {role}", owner.port));
        }
        Ok(owner.port)
    }
}

/// The value after `flag` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

/// A port for a cluster node: below 55535, with port + 10000 (the cluster
/// bus) free as well. Taken from 20000–22767, so that both ports lie below
/// Linux' ephemeral range (32768–60999) and no client connection or
/// [`crate::free_port`] takes the bus port between the check and the start.
fn cluster_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    use std::net::TcpListener;
    for attempt in 0u32.. {
        let random = RandomState::new().hash_one((attempt, std::process::id(), Instant::now()));
        let port = 20_000 + (random % 2_768) as u16;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    unreachable!()
}

/// `CLUSTER NODES` of `node`, parsed.
fn cluster_nodes(node: &TestRedis) -> Result<Vec<NodeLine>, String> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut node.quick_conn().map_err(|e| e.to_string())?)
        .map_err(|e| format!("node {}: {e}", node.port()))?;
    Ok(text.lines().filter_map(NodeLine::parse).collect())
}
