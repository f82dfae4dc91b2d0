//! The Kubernetes manifests and the binaries agree.
//!
//! The docker-desktop overlay is rendered the way `./deploy.sh --dry-run`
//! renders it (in a copy of the repository's `kubernetes/`, with a secret
//! file deploy.sh generates there), and `kvq-api` and `kvq-worker` are started
//! with exactly the command and environment their pods get: the ConfigMap,
//! the Secret's values, and Kubernetes' `$(VAR)` expansion. The Redis
//! StatefulSets' own command runs too (it writes the password into a config
//! file), and two local `redis-server`s get what it hands `redis-server`,
//! password included. Only what cannot exist outside a cluster is replaced:
//! the Redis host names (by those local servers), the listen addresses (by
//! loopback ports) and emptyDir mounts (by scratch directories), each after
//! checking that it points where the manifests say it should. Then a write
//! must be applied, end to end.
//!
//! The production-cluster overlay (data and queue each on a six-node Redis
//! Cluster) gets the same treatment: its StatefulSets' command runs for each
//! of the 6 + 6 nodes, each cluster is formed by its Job's own script (the
//! node names it lists replaced by the local servers), and kvq is given the
//! seed URLs the Deployments list.
//!
//! A variable renamed on one side, a secret key missing from deploy.sh's file,
//! a port the probes do not listen on, a Redis password the servers and the
//! clients disagree on, or one on a command line (where `ps` shows it) fails
//! here, not in a cluster. So does a cluster node announcing a name kvq's
//! URLs do not use, a Job listing other nodes than the StatefulSet runs, or a
//! NetworkPolicy that shuts out the cluster bus.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use kvq_testkit::{KvqProcess, TestRedis, eventually};
use serde::Deserialize as _;
use serde_json::{Value, json};

#[tokio::test]
async fn the_binaries_started_as_the_manifests_start_them_apply_a_write() {
    let manifests = Manifests::render("docker-desktop");

    // Redis, as its StatefulSets run it (their ports and data directory
    // aside), and checked against the URLs kvq is given.
    let kv = manifests.start_redis("kvq-redis-kv", 0);
    let queue = manifests.start_redis("kvq-redis-queue", 0);
    manifests.apply_a_write(&[&kv, &queue]).await;
}

/// The two Redis Clusters of the production-cluster overlay, each formed by
/// its Job: three masters with a replica each, the queue's partitions and the
/// data's buckets spread over all three masters, and the Job a no-op the
/// second time.
#[tokio::test]
async fn the_cluster_overlay_s_jobs_form_its_redis_clusters() {
    let (manifests, nodes) = start_clusters().await;
    let config = manifests.pod("kvq-api");
    for (name, value) in [
        ("KVQ_KV_REDIS_MODE", "cluster"),
        ("KVQ_QUEUE_REDIS_MODE", "cluster"),
    ] {
        for pod in [&config, &manifests.pod("kvq-worker")] {
            assert_eq!(
                pod.env_value(name).as_deref(),
                Some(value),
                "{}: {name}",
                pod.name
            );
        }
    }
    let ns = config.env_value("KVQ_NAMESPACE").expect("KVQ_NAMESPACE");
    let partitions: u16 = config
        .env_value("KVQ_QUEUE_PARTITIONS")
        .expect("KVQ_QUEUE_PARTITIONS")
        .parse()
        .expect("a number");
    let (kv, queue) = nodes.split_at(CLUSTER_NODES);
    let spread = |cluster: &[LocalRedis], keys: Vec<String>, what: &str| {
        let masters = masters_of(cluster, &keys);
        assert_eq!(
            masters.len(),
            3,
            "{what} must spread over the 3 masters: {masters:?}"
        );
        println!(
            "{what} per master: {:?}",
            masters.values().collect::<Vec<_>>()
        );
    };
    spread(
        queue,
        (0..partitions)
            .map(|p| kvq_shared::keys::stream_key(&ns, p))
            .collect(),
        "queue partitions",
    );
    spread(
        kv,
        (0..kvq_shared::keys::BUCKETS)
            .map(|b| kvq_shared::keys::index_key(&ns, b))
            .collect(),
        "data buckets",
    );
}

/// kvq-api and kvq-worker started with exactly the production-cluster
/// overlay's environment (cluster mode, seed URLs listing the nodes) apply a
/// write through the two Redis Clusters.
#[tokio::test]
async fn the_binaries_started_as_the_cluster_overlay_starts_them_apply_a_write() {
    let (manifests, nodes) = start_clusters().await;
    let servers: Vec<&LocalRedis> = nodes.iter().collect();
    manifests.apply_a_write(&servers).await;
}

/// Nodes per Redis Cluster: three masters and one replica each.
const CLUSTER_NODES: usize = 6;

/// Renders the production-cluster overlay, starts the 6 + 6 nodes of its two
/// Redis Clusters as their StatefulSets run them, and forms each with its
/// Job's script, twice (the second run must change nothing). Returns the
/// data cluster's nodes, then the queue's.
async fn start_clusters() -> (Manifests, Vec<LocalRedis>) {
    let manifests = Manifests::render("production-cluster");
    let mut nodes = Vec::new();
    for role in ["kv", "queue"] {
        let statefulset = format!("kvq-redis-cluster-{role}");
        let replicas = &manifests.object("StatefulSet", &statefulset)["spec"]["replicas"];
        assert_eq!(*replicas, CLUSTER_NODES, "{statefulset}: replicas");
        let cluster: Vec<LocalRedis> = (0..CLUSTER_NODES)
            .map(|ordinal| manifests.start_redis(&statefulset, ordinal))
            .collect();
        let job = format!("kvq-redis-cluster-create-{role}");
        let formed = manifests.run_cluster_job(&job, &cluster).await;
        assert!(formed.contains("the cluster is formed"), "{job}: {formed}");

        for node in &cluster {
            eventually(
                Duration::from_secs(20),
                "every node to see the cluster ok",
                || {
                    let ok = node
                        .server
                        .try_cmd::<String>(&["CLUSTER", "INFO"])
                        .is_ok_and(|info| info.contains("cluster_state:ok"));
                    async move { ok.then_some(()) }
                },
            )
            .await;
        }
        // Three masters serving every slot, each with one replica, once the
        // news of the replicas has gone round.
        let settled = |topology: &[ClusterNode]| {
            let masters: Vec<&ClusterNode> =
                topology.iter().filter(|n| n.master.is_none()).collect();
            let slots: u32 = masters
                .iter()
                .flat_map(|m| &m.slots)
                .map(|(from, to)| u32::from(to - from) + 1)
                .sum();
            masters.len() == 3
                && slots == 16384
                && masters.iter().all(|m| {
                    topology
                        .iter()
                        .filter(|n| n.master.as_deref() == Some(m.id.as_str()))
                        .count()
                        == 1
                })
        };
        let topology = eventually(
            Duration::from_secs(20),
            "three masters with a replica each",
            || {
                let topology = cluster_nodes(&cluster[0]);
                async move { settled(&topology).then_some(topology) }
            },
        )
        .await;

        // Run again (every deploy does): nothing changes.
        let again = manifests.run_cluster_job(&job, &cluster).await;
        assert!(
            again.contains("nothing to do"),
            "{job}, second run: {again}"
        );
        let mut before: Vec<String> = topology.iter().map(|n| n.id.clone()).collect();
        let mut after: Vec<String> = cluster_nodes(&cluster[0])
            .into_iter()
            .map(|n| n.id)
            .collect();
        before.sort();
        after.sort();
        assert_eq!(before, after, "{job}: the second run changed the cluster");
        nodes.extend(cluster);
    }
    (manifests, nodes)
}

/// A node as `CLUSTER NODES` lists it.
#[derive(Debug)]
struct ClusterNode {
    id: String,
    port: u16,
    /// A replica's master.
    master: Option<String>,
    /// A master's slot ranges.
    slots: Vec<(u16, u16)>,
}

fn cluster_nodes(node: &LocalRedis) -> Vec<ClusterNode> {
    let listing: String = node.server.cmd(&["CLUSTER", "NODES"]);
    listing
        .lines()
        .map(|line| {
            // <id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <state> <slot>...
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("a node's port");
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|range| {
                    let (from, to) = range.split_once('-').unwrap_or((range, range));
                    (from.parse().unwrap(), to.parse().unwrap())
                })
                .collect();
            ClusterNode {
                id: fields[0].to_owned(),
                port,
                master: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            }
        })
        .collect()
}

/// How many of `keys` each master of `cluster` holds, by port.
fn masters_of(cluster: &[LocalRedis], keys: &[String]) -> std::collections::BTreeMap<u16, usize> {
    let topology = cluster_nodes(&cluster[0]);
    let mut counts = std::collections::BTreeMap::new();
    for key in keys {
        let slot: i64 = cluster[0].server.cmd(&["CLUSTER", "KEYSLOT", key]);
        let owner = topology
            .iter()
            .find(|n| {
                n.slots
                    .iter()
                    .any(|&(from, to)| (i64::from(from)..=i64::from(to)).contains(&slot))
            })
            .unwrap_or_else(|| panic!("no master serves slot {slot}"));
        *counts.entry(owner.port).or_insert(0) += 1;
    }
    counts
}

impl Manifests {
    /// Starts kvq-api and kvq-worker with exactly their pods' environment,
    /// with `servers` standing in for the Redis pods their URLs name, and
    /// checks probes, ports and token minting against the manifests; then a
    /// write must be applied, end to end.
    async fn apply_a_write(&self, servers: &[&LocalRedis]) {
        let api = self.pod("kvq-api");
        let worker = self.pod("kvq-worker");
        for pod in [&api, &worker] {
            assert_eq!(
                pod.spec["enableServiceLinks"], false,
                "{}: Service links would add KVQ_*_PORT variables to the environment",
                pod.name
            );
        }

        // The API listens where its Service and probes point.
        let api_port = self.check_bind(&api, "KVQ_BIND", "readinessProbe");
        assert_eq!(api.probe_port("livenessProbe"), api_port);
        let service = self.object("Service", "kvq-api");
        assert_eq!(
            api.port(&service["spec"]["ports"][0]["targetPort"]),
            api_port,
            "the kvq-api Service does not reach KVQ_BIND"
        );
        assert_eq!(
            service["spec"]["ports"][0]["port"], 8080,
            "README and deploy.sh promise the API on port 8080"
        );
        self.check_bind(&worker, "KVQ_WORKER_HEALTH_BIND", "livenessProbe");

        // Draining must end before Kubernetes sends SIGKILL.
        let drain = worker
            .env_value("KVQ_WORKER_SHUTDOWN_TIMEOUT_SECONDS")
            .map_or(25, |s| s.parse::<u64>().expect("a number of seconds"));
        let grace = worker.spec["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        assert!(
            grace > drain,
            "the worker's terminationGracePeriodSeconds ({grace}) must exceed KVQ_WORKER_SHUTDOWN_TIMEOUT_SECONDS ({drain})"
        );

        // Both reach every Redis server (the NetworkPolicies).
        for pod in [&api, &worker] {
            for server in servers {
                assert!(
                    self.allows(&pod.labels, &server.labels, server.port),
                    "{}: no NetworkPolicy lets it reach {}",
                    pod.name,
                    server.host
                );
            }
        }

        let api_env = api.local_env(servers);
        let worker_env = worker.local_env(servers);
        let api_process = api.spawn(&[], &api_env);
        let listening = api_process
            .wait_for_log("kvq-api listening", Duration::from_secs(20))
            .await;
        let base = format!("http://127.0.0.1:{}", listening["port"]);
        let worker_process = worker.spawn(&[], &worker_env);
        let started = worker_process
            .wait_for_log("kvq-worker starting", Duration::from_secs(20))
            .await;
        let health = format!("http://127.0.0.1:{}", started["health_port"]);

        let http = reqwest::Client::new();
        let answers = |url: String| {
            let http = http.clone();
            async move {
                let response = http.get(&url).send().await.ok()?;
                (response.status() == 200).then_some(())
            }
        };
        for (url, what) in [
            (
                format!("{base}{}", api.probe_path("readinessProbe")),
                "the API's readiness probe",
            ),
            (
                format!("{base}{}", api.probe_path("livenessProbe")),
                "the API's liveness probe",
            ),
            (
                format!("{health}{}", worker.probe_path("livenessProbe")),
                "the worker's liveness probe",
            ),
        ] {
            eventually(Duration::from_secs(20), what, || answers(url.clone())).await;
        }

        // A token minted the way deploy.sh mints one: `kvq-api token` in the
        // API's container.
        let mut minted = api.spawn(&["token", "--role", "writer"], &api_env);
        let status = minted.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "kvq-api token failed: {:?}",
            minted.stderr()
        );
        let token = minted.logs().last().cloned().expect("a token line");

        let accepted = http
            .post(format!("{base}/v1/kv"))
            .bearer_auth(&token)
            .json(&json!({"key": "deployed/greeting", "value": {"hello": "kubernetes"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(accepted.status(), 202, "{:?}", accepted.text().await);
        let read: Value = eventually(Duration::from_secs(15), "the write to be applied", || {
            let request = http
                .get(format!("{base}/v1/kv/deployed/greeting"))
                .bearer_auth(&token);
            async move {
                let response = request.send().await.ok()?;
                if response.status() != 200 {
                    return None;
                }
                response.json().await.ok()
            }
        })
        .await;
        assert_eq!(read["value"], json!({"hello": "kubernetes"}));
        assert_eq!(read["version"], 1);
    }
}

/// One rendered overlay.
struct Manifests {
    overlay: String,
    objects: Vec<Value>,
    // Holds the rendered copy until the test ends.
    _dir: tempfile::TempDir,
}

/// A Deployment's pod: its spec and its one container, with the objects it
/// refers to.
struct Pod<'a> {
    /// The pod's name (`metadata.name`): the Deployment's name, or the
    /// StatefulSet's with the pod's ordinal.
    name: String,
    labels: Value,
    spec: Value,
    container: Value,
    manifests: &'a Manifests,
}

impl Manifests {
    /// Renders `overlay` with `./deploy.sh --dry-run` in a scratch copy of
    /// the delivery files, so the secret file is the one deploy.sh writes,
    /// with values of its own (a developer's real secret file is never read).
    fn render(overlay: &str) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace root");
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&root.join("kubernetes"), &dir.path().join("kubernetes"));
        std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
        for file in ["deploy.sh", "scripts/lib.sh"] {
            std::fs::copy(root.join(file), dir.path().join(file)).unwrap();
        }
        let output = Command::new("bash")
            .arg(dir.path().join("deploy.sh"))
            .args(["--dry-run", "--overlay", overlay])
            .output()
            .expect("run deploy.sh --dry-run (needs bash and kubectl)");
        assert!(
            output.status.success(),
            "deploy.sh --dry-run --overlay {overlay} failed (is kubectl installed?):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let yaml = String::from_utf8(output.stdout).unwrap();
        let objects = serde_norway::Deserializer::from_str(&yaml)
            .map(|document| Value::deserialize(document).expect("rendered YAML"))
            .filter(|object| !object.is_null())
            .collect();
        Self {
            overlay: overlay.to_owned(),
            objects,
            _dir: dir,
        }
    }

    fn object(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("the {} overlay has no {kind} {name}", self.overlay))
    }

    fn pod_of(&self, kind: &str, name: &str) -> Pod<'_> {
        let template = &self.object(kind, name)["spec"]["template"];
        let spec = template["spec"].clone();
        let containers = spec["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "{kind} {name}: one container");
        Pod {
            name: name.to_owned(),
            labels: template["metadata"]["labels"].clone(),
            container: containers[0].clone(),
            spec,
            manifests: self,
        }
    }

    fn pod(&self, deployment: &str) -> Pod<'_> {
        self.pod_of("Deployment", deployment)
    }

    /// A local `redis-server` with what the StatefulSet's command hands
    /// `redis-server` in the pod with `ordinal`, after checking that it is
    /// reachable where kvq's URLs will say (checked by `local_env`). A
    /// cluster node must announce that same name to clients, and be let
    /// through on the cluster bus by the other nodes.
    fn start_redis(&self, statefulset: &str, ordinal: usize) -> LocalRedis {
        let mut pod = self.pod_of("StatefulSet", statefulset);
        pod.name = format!("{statefulset}-{ordinal}");
        let launch = pod.run_redis_command();
        let mut args = launch.options;
        let password = flag(&args, "--requirepass").expect("Redis runs with a password");
        assert!(
            !launch
                .command_lines
                .iter()
                .flatten()
                .any(|word| word.contains(&password)),
            "{statefulset}: the Redis password is on a command line: {:?}",
            launch.command_lines
        );
        let port: u16 = flag(&args, "--port")
            .map_or(Ok(6379), |p| p.parse())
            .expect("a port");
        let sts = self.object("StatefulSet", statefulset);
        let service_name = sts["spec"]["serviceName"].as_str().expect("serviceName");
        let host_name = format!("{}.{service_name}", pod.name);
        if flag(&args, "--cluster-enabled").as_deref() == Some("yes") {
            assert_eq!(
                flag(&args, "--cluster-announce-hostname").as_deref(),
                Some(host_name.as_str()),
                "{}: the node must announce its stable DNS name, which kvq's URLs use",
                pod.name
            );
            assert_eq!(
                flag(&args, "--cluster-preferred-endpoint-type").as_deref(),
                Some("hostname"),
                "{}: clients must be sent to host names, not to IPs a reschedule changes",
                pod.name
            );
            let config = flag(&args, "--cluster-config-file").unwrap_or("nodes.conf".into());
            let dir = flag(&args, "--dir").expect("--dir");
            assert!(
                !config.starts_with('/') || config.starts_with(&format!("{dir}/")),
                "{}: {config} is not on the data volume ({dir}): a restart would forget the cluster",
                pod.name
            );
            let bus = flag(&args, "--cluster-port").map_or(port + 10000, |p| p.parse().unwrap());
            for to in [port, bus] {
                assert!(
                    self.allows(&pod.labels, &pod.labels, to),
                    "{statefulset}: no NetworkPolicy lets the nodes reach each other on {to}"
                );
            }
            // The name exists only in a cluster: the local nodes are on
            // loopback, and announce that.
            let i = args
                .iter()
                .position(|a| a == "--cluster-announce-hostname")
                .unwrap();
            args[i + 1] = "127.0.0.1".to_owned();
        }
        // The port is the test's; the data directory is TestRedis' own.
        for local in ["--port", "--dir"] {
            if let Some(i) = args.iter().position(|a| a == local) {
                args.drain(i..i + 2);
            }
        }
        let service = self.object("Service", service_name);
        assert_eq!(
            service["spec"]["clusterIP"], "None",
            "{service_name} must be headless for per-pod DNS names"
        );
        assert!(
            service["spec"]["ports"]
                .as_array()
                .is_some_and(|ports| ports.iter().any(|p| p["port"] == port)),
            "Service {service_name} does not expose {port}"
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        LocalRedis {
            host: format!("{host_name}:{port}"),
            password,
            labels: pod.labels.clone(),
            port,
            server: TestRedis::start_with(&args),
        }
    }

    /// Runs a Redis Cluster formation Job's script, as its pod would, against
    /// the local `cluster`: its node list (checked to name the StatefulSet's
    /// pods, in order) replaced by their loopback addresses. Returns its
    /// output once it succeeded.
    async fn run_cluster_job(&self, job: &str, cluster: &[LocalRedis]) -> String {
        let pod = self.pod_of("Job", job);
        assert!(
            cluster
                .iter()
                .all(|node| self.allows(&pod.labels, &node.labels, node.port)),
            "{job}: no NetworkPolicy lets it reach the nodes"
        );
        let mut env = pod.env();
        let mut listed = false;
        for (name, value) in &mut env {
            if name == "REDIS_NODES" {
                let names: Vec<&str> = value.split_whitespace().collect();
                let expected: Vec<&str> = cluster.iter().map(|n| n.host.as_str()).collect();
                assert_eq!(
                    names, expected,
                    "{job}: REDIS_NODES must list the StatefulSet's pods"
                );
                *value = cluster
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.server.port()))
                    .collect::<Vec<_>>()
                    .join(" ");
                listed = true;
            } else if name == "REDISCLI_AUTH" {
                assert_eq!(
                    *value, cluster[0].password,
                    "{job}: the password its redis-cli uses"
                );
            }
        }
        assert!(listed, "{job}: no REDIS_NODES");
        let scratch = tempfile::tempdir().unwrap();
        let (words, _) = pod.command_words(&env, scratch.path());
        let run = tokio::process::Command::new(&words[0])
            .args(&words[1..])
            .env_clear()
            .envs(env.iter().map(|(n, v)| (n, v)))
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("{job}: still running after 2 minutes"))
            .unwrap_or_else(|e| panic!("{job}: cannot run {:?}: {e}", words[0]));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{job} failed:\n{text}");
        text
    }

    /// Whether the NetworkPolicies let pods labelled `from` connect to pods
    /// labelled `to` on `port` (a pod no policy selects takes anything).
    fn allows(&self, from: &Value, to: &Value, port: u16) -> bool {
        let policies: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == "NetworkPolicy" && selects(&o["spec"]["podSelector"], to))
            .collect();
        policies.is_empty()
            || policies.iter().any(|policy| {
                policy["spec"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|rule| {
                        let peer = rule["from"].as_array().is_none_or(|peers| {
                            peers.iter().any(|p| {
                                p["podSelector"].is_object()
                                    && p["namespaceSelector"].is_null()
                                    && selects(&p["podSelector"], from)
                            })
                        });
                        let port = rule["ports"]
                            .as_array()
                            .is_none_or(|ports| ports.iter().any(|p| p["port"] == port));
                        peer && port
                    })
            })
    }

    /// Checks that `var`, a listen address, is on every interface and on the
    /// port of the pod's `probe`; returns that port.
    fn check_bind(&self, pod: &Pod<'_>, var: &str, probe: &str) -> u16 {
        let raw = pod
            .env_value(var)
            .unwrap_or_else(|| panic!("{}: {var} is not set", pod.name));
        let addr: SocketAddr = raw.parse().expect("a socket address");
        assert!(
            addr.ip().is_unspecified(),
            "{}: {var}={raw} must listen on all interfaces, or the kubelet's probes cannot reach it",
            pod.name
        );
        assert_eq!(
            addr.port(),
            pod.probe_port(probe),
            "{}: {var} and the {probe} disagree",
            pod.name
        );
        addr.port()
    }

    fn data(&self, kind: &str, name: &str, key: &str) -> String {
        let value = self.object(kind, name)["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{kind} {name} has no key {key}"))
            .to_owned();
        if kind == "Secret" {
            // kustomize wraps long values; like Go's decoder, skip the breaks.
            let packed: String = value.split_whitespace().collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(packed)
                .expect("base64");
            String::from_utf8(bytes).expect("UTF-8")
        } else {
            value
        }
    }

    fn data_all(&self, kind: &str, name: &str) -> Vec<(String, String)> {
        let object = self.object(kind, name);
        let keys: Vec<String> = object["data"]
            .as_object()
            .map(|data| data.keys().cloned().collect())
            .unwrap_or_default();
        keys.into_iter()
            .map(|key| {
                let value = self.data(kind, name, &key);
                (key, value)
            })
            .collect()
    }
}

impl Pod<'_> {
    /// The container's environment as the kubelet builds it: `envFrom` in
    /// order, then `env` in order, each `value` with `$(VAR)` expanded from
    /// the variables before it.
    fn env(&self) -> Vec<(String, String)> {
        // A later definition of a name replaces the earlier one.
        fn set(env: &mut Vec<(String, String)>, name: String, value: String) {
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        }
        let mut env: Vec<(String, String)> = Vec::new();
        for source in self.container["envFrom"].as_array().into_iter().flatten() {
            let prefix = source["prefix"].as_str().unwrap_or("");
            let (kind, reference) = if source["configMapRef"].is_object() {
                ("ConfigMap", &source["configMapRef"])
            } else {
                ("Secret", &source["secretRef"])
            };
            let name = reference["name"].as_str().expect("envFrom name");
            for (key, value) in self.manifests.data_all(kind, name) {
                set(&mut env, format!("{prefix}{key}"), value);
            }
        }
        for var in self.container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name").to_owned();
            let value = if let Some(value) = var["value"].as_str() {
                expand(value, &env)
            } else if let Some(from) = var["valueFrom"].as_object() {
                if let Some(field) = from.get("fieldRef") {
                    // The pod's own metadata: its name, or a stand-in value
                    // of the test's.
                    match field["fieldPath"].as_str().unwrap_or("") {
                        "metadata.name" => self.name.clone(),
                        path => format!("{}-test-{path}", self.name),
                    }
                } else {
                    let (kind, reference) =
                        match (from.get("secretKeyRef"), from.get("configMapKeyRef")) {
                            (Some(r), _) => ("Secret", r),
                            (None, Some(r)) => ("ConfigMap", r),
                            _ => panic!(
                                "{}: {name} has a source this test cannot resolve: {from:?}",
                                self.name
                            ),
                        };
                    self.manifests.data(
                        kind,
                        reference["name"].as_str().expect("name"),
                        reference["key"].as_str().expect("key"),
                    )
                }
            } else {
                String::new()
            };
            set(&mut env, name, value);
        }
        env
    }

    fn env_value(&self, name: &str) -> Option<String> {
        self.env()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The pod's environment with what only a cluster has replaced: Redis
    /// hosts by the local servers (the manifests' host and password checked
    /// first; a Redis Cluster's URL is a comma-separated list of its nodes')
    /// and listen addresses by loopback port 0.
    fn local_env(&self, servers: &[&LocalRedis]) -> Vec<(String, String)> {
        let mut env = self.env();
        for (name, value) in &mut env {
            if name.ends_with("_REDIS_URL") {
                let local: Vec<String> = value
                    .split(',')
                    .map(|url| {
                        let server = servers
                            .iter()
                            .find(|s| url.ends_with(&format!("@{}", s.host)))
                            .unwrap_or_else(|| {
                                panic!(
                                    "{}: {name} points at no Redis StatefulSet pod: {url}",
                                    self.name
                                )
                            });
                        assert_eq!(
                            url,
                            format!("redis://:{}@{}", server.password, server.host),
                            "{}: {name} does not carry the password its Redis runs with",
                            self.name
                        );
                        server.server.url()
                    })
                    .collect();
                *value = local.join(",");
            } else if name == "KVQ_BIND" || name == "KVQ_WORKER_HEALTH_BIND" {
                *value = "127.0.0.1:0".to_owned();
            }
        }
        env
    }

    /// Runs the container's command and args as the kubelet would (`$(VAR)`
    /// expanded, only the container's environment), with each emptyDir mount
    /// moved to a scratch directory and `redis-server` replaced by a stand-in
    /// that records its arguments. Returns what Redis would run with: the
    /// directives of a config file it is given as `--name value` options
    /// (the same thing to Redis), then its other arguments.
    fn run_redis_command(&self) -> RedisLaunch {
        use std::os::unix::fs::PermissionsExt as _;

        let env = self.env();
        let scratch = tempfile::tempdir().unwrap();
        let (words, mounts) = self.command_words(&env, scratch.path());

        let bin = scratch.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let stand_in = bin.join("redis-server");
        std::fs::write(
            &stand_in,
            "#!/bin/sh\nprintf '%s\\0' \"$@\" >\"$KVQ_TEST_REDIS_ARGS\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).unwrap();
        let record = scratch.path().join("redis-server.args");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = Command::new(&words[0])
            .args(&words[1..])
            .env_clear()
            .envs(env.iter().map(|(n, v)| (n, v)))
            .env("PATH", path)
            .env("KVQ_TEST_REDIS_ARGS", &record)
            .output()
            .unwrap_or_else(|e| panic!("{}: cannot run {:?}: {e}", self.name, words[0]));
        assert!(
            output.status.success(),
            "{}: the Redis command failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        let recorded: Vec<String> = std::fs::read_to_string(&record)
            .unwrap_or_else(|_| panic!("{}: the command did not start redis-server", self.name))
            .split_terminator('\0')
            .map(str::to_owned)
            .collect();

        // redis-server [config-file] [options]
        let mut options = Vec::new();
        let mut rest = recorded.as_slice();
        if let Some(file) = rest.first().filter(|a| !a.starts_with('-')) {
            let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{}: {file} holds the password and is readable by others (mode {mode:o})",
                self.name
            );
            assert!(
                mounts
                    .iter()
                    .any(|(_, local)| file.starts_with(local.as_str())),
                "{}: the config file {file} is not on an emptyDir (the root filesystem is read-only)",
                self.name
            );
            let config = std::fs::read_to_string(file).unwrap();
            for line in config.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut directive = line.split_whitespace();
                options.push(format!("--{}", directive.next().unwrap()));
                options.extend(directive.map(str::to_owned));
            }
            rest = &rest[1..];
        }
        options.extend(rest.iter().cloned());
        RedisLaunch {
            options,
            command_lines: vec![words, recorded],
        }
    }

    /// The container's command and args as the kubelet runs them (`$(VAR)`
    /// expanded from `env`), with each emptyDir mount moved to a directory
    /// under `scratch`; returns them and the mounts, `(mountPath, local)`.
    fn command_words(
        &self,
        env: &[(String, String)],
        scratch: &Path,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let empty_dirs: Vec<&str> = self.spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["emptyDir"].is_object())
            .map(|v| v["name"].as_str().expect("a volume name"))
            .collect();
        let mounts: Vec<(String, String)> = self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| empty_dirs.contains(&m["name"].as_str().expect("a mount name")))
            .map(|m| {
                let local = scratch.join(m["name"].as_str().unwrap());
                std::fs::create_dir(&local).unwrap();
                let path = m["mountPath"].as_str().expect("a mountPath").to_owned();
                (path, local.to_str().expect("a UTF-8 path").to_owned())
            })
            .collect();
        let words: Vec<String> = ["command", "args"]
            .into_iter()
            .flat_map(|key| self.container[key].as_array().into_iter().flatten())
            .map(|word| {
                let word = expand(word.as_str().expect("a string"), env);
                mounts
                    .iter()
                    .fold(word, |word, (path, local)| word.replace(path, local))
            })
            .collect();
        (words, mounts)
    }

    /// Starts the container's command (a kvq binary) with `args` appended.
    fn spawn(&self, args: &[&str], env: &[(String, String)]) -> KvqProcess {
        let command: Vec<&str> = self.container["command"]
            .as_array()
            .expect("command")
            .iter()
            .map(|c| c.as_str().expect("a string"))
            .collect();
        let binary = PathBuf::from(command[0]);
        let binary = binary.file_name().and_then(|n| n.to_str()).expect("a name");
        let mut all: Vec<&str> = command[1..].to_vec();
        all.extend(args);
        KvqProcess::spawn_with_args(binary, &all, env)
    }

    /// A port by number, or by the name of one of the container's ports.
    fn port(&self, port: &Value) -> u16 {
        if let Some(number) = port.as_u64() {
            return u16::try_from(number).expect("a port");
        }
        let name = port.as_str().expect("a port number or name");
        self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("{}: no container port named {name}", self.name))
    }

    fn probe_port(&self, probe: &str) -> u16 {
        self.port(&self.container[probe]["httpGet"]["port"])
    }

    fn probe_path(&self, probe: &str) -> String {
        self.container[probe]["httpGet"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no HTTP {probe}", self.name))
            .to_owned()
    }
}

/// What a Redis container's command hands `redis-server`.
struct RedisLaunch {
    /// Its config file's directives as options, then its arguments.
    options: Vec<String>,
    /// The container's command line, then `redis-server`'s: what `ps` shows.
    command_lines: Vec<Vec<String>>,
}

/// A local stand-in for a Redis StatefulSet's pod.
struct LocalRedis {
    /// `pod-N.service:port`, as kvq's URLs name it.
    host: String,
    password: String,
    /// The pod's labels, and its port in the pod (for the NetworkPolicies).
    labels: Value,
    port: u16,
    server: TestRedis,
}

/// Kubernetes' expansion of `$(VAR)` in an env value, command or arg:
/// defined variables are replaced, `$$` is a literal `$`, anything else is
/// left as written.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(tail) = rest.strip_prefix("$$") {
            out.push('$');
            rest = tail;
        } else if let Some(close) = rest.strip_prefix("$(").and_then(|r| r.find(')')) {
            let name = &rest[2..2 + close];
            match env.iter().find(|(n, _)| n == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[..close + 3]),
            }
            rest = &rest[close + 3..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Whether a label selector (`matchLabels`, `matchExpressions`) selects
/// pods with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let by_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(key, value)| labels[key] == *value);
    let by_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|expression| {
            let label = &labels[expression["key"].as_str().expect("a key")];
            let values = expression["values"].as_array();
            match expression["operator"].as_str() {
                Some("In") => values.is_some_and(|v| v.contains(label)),
                Some("NotIn") => !values.is_some_and(|v| v.contains(label)),
                Some("Exists") => !label.is_null(),
                Some("DoesNotExist") => label.is_null(),
                other => panic!("an unknown selector operator {other:?}"),
            }
        });
    by_labels && by_expressions
}

/// The value after `name` in an argument list.
fn flag(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// Copies a directory tree, leaving out `secrets/` folders.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "secrets" {
                copy_tree(&entry.path(), &target);
            }
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn expansion_follows_kubernetes_rules() {
    let env = vec![("A".to_owned(), "x".to_owned())];
    assert_eq!(expand("redis://:$(A)@h", &env), "redis://:x@h");
    assert_eq!(expand("$(B)-$$(A)-$", &env), "$(B)-$(A)-$");
}
