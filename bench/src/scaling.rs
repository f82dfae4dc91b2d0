//! Scaling out: applied writes end to end with 1, 2 and 4 worker processes,
//! the data on one server and on a 3-master Redis Cluster, and what `WAIT 1`
//! costs on either role.
//!
//! Each setup is a fresh set of Redis servers with its own `kvq-api`; every
//! run is a [`load::burst`] (wrk POSTs of fresh keys, timed until applied)
//! with the CPU every process used per write. The queue is one server in the
//! worker and cluster runs, so only the data side varies. `WAIT` is measured
//! against the same topology without it: a replica costs its master CPU
//! (the replication stream) whether or not anyone waits for it.
//!
//! - **data: one server** (queue: one server): 1, 2, 4 workers.
//! - **data: 3-master cluster**, a replica each (queue: one server): 1, 2, 4
//!   workers, then `KVQ_KV_REDIS_WAIT_REPLICAS=1`.
//! - **data and queue each one server + a replica** (`--replicaof`): no
//!   `WAIT`, then `KVQ_KV_REDIS_WAIT_REPLICAS=1`, then
//!   `KVQ_QUEUE_REDIS_WAIT_REPLICAS=1`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvq_shared::keys;
use kvq_testkit::{KvqProcess, TestCluster, TestRedis};

use crate::load::{self, Burst};
use crate::report::{Bar, Row};
use crate::step;
use crate::tools::{self, Load};

/// How big the scaling runs are.
pub struct Plan {
    /// Length of each burst.
    pub burst: Duration,
    /// Worker processes of the worker-count runs, increasing.
    pub workers: Vec<usize>,
    /// Worker processes of the `WAIT` runs (one of `workers`, so the cluster
    /// has a run without `WAIT` to compare with).
    pub wait_workers: usize,
}

/// How long a burst's writes may take to be applied.
const APPLY_DEADLINE: Duration = Duration::from_secs(120);

/// Job records expire soon, so the queue Redis does not fill up.
const RETENTION_SECONDS: &str = "5";

/// Where the data and the queue live in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// Data on one server, queue on one server.
    Single,
    /// Data on a 3-master cluster with a replica each, queue on one server.
    Cluster,
    /// Data and queue each on one server with a replica.
    Replicated,
}

impl Setup {
    fn describe(self) -> &'static str {
        match self {
            Setup::Single => "data on one server",
            Setup::Cluster => "data on a 3-master cluster (+3 replicas)",
            Setup::Replicated => "data and queue each on one server + a replica",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Setup::Single => "single",
            Setup::Cluster => "cluster",
            Setup::Replicated => "replicated",
        }
    }
}

/// What a run waits for (`WAIT 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Nothing: replication runs, nobody waits for it.
    No,
    /// `KVQ_KV_REDIS_WAIT_REPLICAS=1`: each applied write.
    Data,
    /// `KVQ_QUEUE_REDIS_WAIT_REPLICAS=1`: each accepted job.
    Queue,
}

impl Wait {
    fn env(self) -> Option<(String, String)> {
        let var = match self {
            Wait::No => return None,
            Wait::Data => "KVQ_KV_REDIS_WAIT_REPLICAS",
            Wait::Queue => "KVQ_QUEUE_REDIS_WAIT_REPLICAS",
        };
        Some((var.to_owned(), "1".to_owned()))
    }

    fn describe(self) -> &'static str {
        match self {
            Wait::No => "no WAIT",
            Wait::Data => "WAIT 1 on the data",
            Wait::Queue => "WAIT 1 on the queue",
        }
    }
}

/// One burst and where its CPU went.
pub struct Run {
    /// The topology.
    pub setup: Setup,
    /// Worker processes.
    pub workers: usize,
    /// What it waited for.
    pub wait: Wait,
    /// The burst.
    pub burst: Burst,
    /// CPU per write by group of processes (API, workers, data, …), µs.
    pub cpu: Vec<(&'static str, f64)>,
}

impl Run {
    fn cpu_total(&self) -> f64 {
        self.cpu.iter().map(|(_, us)| us).sum()
    }

    fn cpu_split(&self) -> String {
        let parts: Vec<String> = self
            .cpu
            .iter()
            .map(|(group, us)| format!("{group} {us:.0}"))
            .collect();
        format!("{:.0} µs ({})", self.cpu_total(), parts.join(", "))
    }
}

/// Runs every setup and returns its runs, in order.
pub async fn run(plan: &Plan) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    let counts = |wait| plan.workers.iter().map(move |&n| (n, wait));

    let setup = Servers::single("data", TestRedis::start());
    let queue = Servers::single("queue", TestRedis::start());
    let list: Vec<_> = counts(Wait::No).collect();
    runs.extend(setup_runs(Setup::Single, &setup, &queue, &list, plan).await?);
    drop((setup, queue));

    step("starting a 3-master Redis Cluster (a replica each) for the data");
    let setup = Servers::Cluster(TestCluster::start());
    let queue = Servers::single("queue", TestRedis::start());
    let mut list: Vec<_> = counts(Wait::No).collect();
    list.push((plan.wait_workers, Wait::Data));
    runs.extend(setup_runs(Setup::Cluster, &setup, &queue, &list, plan).await?);
    drop((setup, queue));

    let setup = Servers::replicated("data").await;
    let queue = Servers::replicated("queue").await;
    let list = [Wait::No, Wait::Data, Wait::Queue].map(|w| (plan.wait_workers, w));
    runs.extend(setup_runs(Setup::Replicated, &setup, &queue, &list, plan).await?);
    Ok(runs)
}

/// The Redis servers of one role.
enum Servers {
    /// One server.
    Single(&'static str, TestRedis),
    /// A master and a replica of it.
    Replicated(&'static str, TestRedis, TestRedis),
    /// A Redis Cluster (always the data role here).
    Cluster(TestCluster),
}

impl Servers {
    fn single(role: &'static str, server: TestRedis) -> Self {
        Self::Single(role, server)
    }

    /// A master and a replica started with `--replicaof`, once the master
    /// lists the replica online.
    async fn replicated(role: &'static str) -> Self {
        let master = TestRedis::start();
        let port = master.port().to_string();
        let replica = TestRedis::start_with(&[
            "--replicaof",
            "127.0.0.1",
            &port,
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let online = format!("port={},state=online", replica.port());
        kvq_testkit::eventually(
            Duration::from_secs(20),
            "the replica to be online",
            || async {
                let info: String = master.try_cmd(&["INFO", "replication"]).ok()?;
                info.contains(&online).then_some(())
            },
        )
        .await;
        Self::Replicated(role, master, replica)
    }

    /// `KVQ_<ROLE>_REDIS_MODE` and `_URL` for `prefix` (`KV` or `QUEUE`).
    fn env(&self, prefix: &str) -> Vec<(String, String)> {
        let (mode, url) = match self {
            Self::Single(_, server) | Self::Replicated(_, server, _) => ("single", server.url()),
            Self::Cluster(cluster) => ("cluster", cluster.urls()),
        };
        vec![
            (format!("KVQ_{prefix}_REDIS_MODE"), mode.to_owned()),
            (format!("KVQ_{prefix}_REDIS_URL"), url),
        ]
    }

    /// Every server: (group, name, server).
    fn servers(&self) -> Vec<(&'static str, String, &TestRedis)> {
        fn node<'a>(
            group: &'static str,
            what: &str,
            server: &'a TestRedis,
        ) -> (&'static str, String, &'a TestRedis) {
            (group, format!("{what} :{}", server.port()), server)
        }
        match self {
            Self::Single(role, server) => vec![node(role, role, server)],
            Self::Replicated(role, master, replica) => {
                let replicas = replica_group(role);
                vec![
                    node(role, &format!("{role} master"), master),
                    node(replicas, &format!("{role} replica"), replica),
                ]
            }
            Self::Cluster(cluster) => {
                let masters = cluster.masters();
                cluster
                    .nodes()
                    .iter()
                    .map(|server| {
                        if masters.contains(&server.port()) {
                            node("data", "data master", server)
                        } else {
                            node("data replicas", "data replica", server)
                        }
                    })
                    .collect()
            }
        }
    }
}

fn replica_group(role: &str) -> &'static str {
    if role == "data" {
        "data replicas"
    } else {
        "queue replica"
    }
}

/// The API and workers of one setup, restarted when what they wait for
/// changes.
struct Processes {
    api: KvqProcess,
    base: String,
    wait: Wait,
    workers: Vec<KvqProcess>,
}

impl Processes {
    /// Stops the workers with SIGTERM, so they hand their partitions back
    /// at once rather than after their leases run out, and kills the API.
    async fn stop(mut self) {
        for worker in &self.workers {
            worker.signal("TERM");
        }
        for worker in &mut self.workers {
            worker.wait_exit(Duration::from_secs(30)).await;
        }
        // The API holds nothing to hand over: dropping it kills it.
    }
}

/// Runs `list` (workers, wait) in order on one setup.
async fn setup_runs(
    setup: Setup,
    kv: &Servers,
    queue: &Servers,
    list: &[(usize, Wait)],
    plan: &Plan,
) -> anyhow::Result<Vec<Run>> {
    let mut env = kv.env("KV");
    env.extend(queue.env("QUEUE"));
    env.extend([
        ("KVQ_AUTH_DISABLED".to_owned(), "true".to_owned()),
        (
            "KVQ_JOB_RETENTION_SECONDS".to_owned(),
            RETENTION_SECONDS.to_owned(),
        ),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ]);
    let kv_conn = load::kv_conn(&env)?;
    let (Servers::Single(_, queue_server) | Servers::Replicated(_, queue_server, _)) = queue else {
        anyhow::bail!("the scaling runs keep the queue on one server");
    };
    let mut running: Option<Processes> = None;
    let mut runs = Vec::new();
    for &(workers, wait) in list {
        step(&format!(
            "scaling: {}, {workers} worker(s), {}: {} s of writes (wrk), timed until all applied",
            setup.describe(),
            wait.describe(),
            plan.burst.as_secs()
        ));
        let mut env = env.clone();
        env.extend(wait.env());
        let mut procs = match running.take() {
            Some(procs) if procs.wait == wait => procs,
            other => {
                if let Some(procs) = other {
                    procs.stop().await;
                }
                let (api, base) = load::start_api(&env, kvq_testkit::free_port()).await;
                Processes {
                    api,
                    base,
                    wait,
                    workers: Vec::new(),
                }
            }
        };
        while procs.workers.len() < workers {
            procs.workers.push(load::start_worker(&env).await);
        }
        while procs.workers.len() > workers {
            if let Some(mut worker) = procs.workers.pop() {
                worker.signal("TERM");
                worker.wait_exit(Duration::from_secs(30)).await;
            }
        }
        let owned = partitions_settled(queue_server, workers).await;
        let owned: Vec<String> = owned.iter().map(usize::to_string).collect();
        println!("   queue partitions per worker: {}", owned.join(", "));

        let mut meters: Vec<(&'static str, String, Meter)> =
            vec![("API", "kvq-api".to_owned(), Meter::Pid(procs.api.pid()))];
        for (i, worker) in procs.workers.iter().enumerate() {
            meters.push((
                "workers",
                format!("kvq-worker {}", i + 1),
                Meter::Pid(worker.pid()),
            ));
        }
        let servers: Vec<_> = kv.servers().into_iter().chain(queue.servers()).collect();
        for (group, name, server) in &servers {
            meters.push((group, name.clone(), Meter::Pid(server.pid().unwrap_or(0))));
        }
        meters.push(("wrk", "wrk".to_owned(), Meter::Children));
        let before: Vec<f64> = meters.iter().map(|(_, _, m)| m.seconds()).collect();
        let commands_before: Vec<u64> = servers.iter().map(|(_, _, s)| commands(s)).collect();
        let tag = format!("scale-{}-{workers}-{wait:?}", setup.tag());
        let burst = load::burst(
            &procs.base,
            &kv_conn,
            &load::post_script(&tag),
            plan.burst,
            APPLY_DEADLINE,
        )
        .await?;
        let per_write: Vec<(&'static str, String, f64)> = meters
            .iter()
            .zip(before)
            .map(|((group, name, meter), before)| {
                let us = (meter.seconds() - before) * 1e6 / burst.writes.max(1) as f64;
                (*group, name.clone(), us)
            })
            .collect();
        let printed: Vec<String> = per_write
            .iter()
            .map(|(_, name, us)| format!("{name} {us:.0}"))
            .collect();
        println!(
            "   {} writes, applied {:.0}/s, accepted {:.0}/s{}",
            burst.writes,
            burst.applied_per_s,
            burst.accepted_per_s,
            if burst.complete {
                ""
            } else {
                ", NOT all applied"
            }
        );
        println!("   CPU per write, us: {}", printed.join(", "));
        let commands: Vec<String> = servers
            .iter()
            .zip(commands_before)
            .map(|((_, name, server), before)| {
                let per_write =
                    commands(server).saturating_sub(before) as f64 / burst.writes.max(1) as f64;
                format!("{name} {per_write:.1}")
            })
            .collect();
        println!(
            "   Redis commands per write (a replica counts the ones it replays): {}",
            commands.join(", ")
        );
        let mut cpu: Vec<(&'static str, f64)> = Vec::new();
        for (group, _, us) in per_write {
            match cpu.iter_mut().find(|(g, _)| *g == group) {
                Some((_, sum)) => *sum += us,
                None => cpu.push((group, us)),
            }
        }
        runs.push(Run {
            setup,
            workers,
            wait,
            burst,
            cpu,
        });
        running = Some(procs);
    }
    if let Some(procs) = running {
        procs.stop().await;
    }
    Ok(runs)
}

/// Commands `server` has processed so far (`INFO stats`).
fn commands(server: &TestRedis) -> u64 {
    let info: String = server.try_cmd(&["INFO", "stats"]).unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Where a process' CPU time is read.
enum Meter {
    /// `/proc/<pid>/stat`.
    Pid(u32),
    /// This process' reaped children: the `wrk` runs (the kvq processes and
    /// Redis servers are reaped only once they are stopped).
    Children,
}

impl Meter {
    fn seconds(&self) -> f64 {
        match self {
            Meter::Pid(pid) => tools::cpu_seconds(*pid),
            Meter::Children => tools::children_cpu_seconds(),
        }
    }
}

/// How long the partition leases must stay as they are before a burst: a
/// worker rebalances once a second (heartbeat, then hand-overs), so a
/// hand-over still to come shows within this time.
const SETTLED_FOR: Duration = Duration::from_millis(1_300);

/// Waits until `workers` workers heartbeat, every queue partition is leased
/// to one of them, and the leases have not changed for [`SETTLED_FOR`]: the
/// hand-overs after a worker joins are over before the burst starts.
/// Answers how many partitions each worker owns, most first.
pub async fn partitions_settled(queue: &TestRedis, workers: usize) -> Vec<usize> {
    let started = Instant::now();
    let mut seen: Option<(Vec<String>, Instant)> = None;
    loop {
        match (leases(queue, workers), &seen) {
            (Some(now), Some((before, since))) if now == *before => {
                if since.elapsed() >= SETTLED_FOR {
                    let mut owned: Vec<usize> = now
                        .iter()
                        .fold(HashMap::<&str, usize>::new(), |mut owned, lease| {
                            *owned.entry(owner(lease).unwrap_or_default()).or_default() += 1;
                            owned
                        })
                        .into_values()
                        .collect();
                    owned.resize(workers, 0);
                    owned.sort_by(|a, b| b.cmp(a));
                    return owned;
                }
            }
            (now, _) => seen = now.map(|leases| (leases, Instant::now())),
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the queue partitions did not settle on {workers} worker(s) within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every partition's lease, if `workers` workers are live and each
/// partition is leased to one of them.
fn leases(queue: &TestRedis, workers: usize) -> Option<Vec<String>> {
    let partitions = 16; // KVQ_QUEUE_PARTITIONS' default, which the runs keep
    let live: Vec<String> = queue
        .try_cmd(&["ZRANGE", &keys::workers_key("kvq"), "0", "-1"])
        .ok()?;
    if live.len() != workers {
        return None;
    }
    let mut leases = Vec::new();
    for p in 0..partitions {
        let lease: Option<String> = queue.try_cmd(&["GET", &keys::lease_key("kvq", p)]).ok()?;
        let lease = lease?;
        let owner = owner(&lease)?;
        if !live.iter().any(|w| w == owner) {
            return None;
        }
        leases.push(lease);
    }
    Some(leases)
}

/// The worker a lease (`<worker>:<generation>:<nonce>`) names.
fn owner(lease: &str) -> Option<&str> {
    lease.rsplitn(3, ':').nth(2)
}

/// The results table's rows: each run, applied writes as a ratio to
/// redis-benchmark SET of the same run, and each `WAIT` run against the run
/// of the same setup and workers without it.
/// The first row is the yardstick of the CPU per write: what a
/// redis-benchmark GET or SET cost Redis.
pub fn rows(runs: &[Run], redis_set: &Load) -> Vec<Row> {
    let mut rows = vec![Row {
        what: "scaling: the yardstick, Redis' CPU per redis-benchmark GET or SET".into(),
        value: redis_set
            .server_cpu_us
            .map_or("not measured".into(), |us| format!("{us:.1} µs")),
        target: None,
    }];
    let redis_set = redis_set.rps;
    for run in runs {
        let b = &run.burst;
        let incomplete = if b.complete {
            ""
        } else {
            ", NOT all applied within 120 s"
        };
        let baseline = runs
            .iter()
            .find(|r| r.setup == run.setup && r.workers == run.workers && r.wait == Wait::No);
        let (what, value) = match (run.wait, baseline) {
            (Wait::No, _) | (_, None) => (
                format!(
                    "scaling: applied writes, {}, {} worker(s), {}, burst of {}",
                    run.setup.describe(),
                    run.workers,
                    run.wait.describe(),
                    b.writes
                ),
                format!(
                    "{:.0}/s, {:.2} x redis SET (accepted {:.0}/s){incomplete}; CPU per write {}",
                    b.applied_per_s,
                    b.applied_per_s / redis_set,
                    b.accepted_per_s,
                    run.cpu_split()
                ),
            ),
            (wait, Some(base)) => (
                format!(
                    "scaling: {}, {}, {} worker(s), burst of {}",
                    wait.describe(),
                    run.setup.describe(),
                    run.workers,
                    b.writes
                ),
                format!(
                    "applied {:.0}/s vs {:.0}/s without ({:.2} x), accepted {:.0}/s vs {:.0}/s ({:.2} x){incomplete}; CPU per write {} vs {:.0} µs",
                    b.applied_per_s,
                    base.burst.applied_per_s,
                    b.applied_per_s / base.burst.applied_per_s,
                    b.accepted_per_s,
                    base.burst.accepted_per_s,
                    b.accepted_per_s / base.burst.accepted_per_s,
                    run.cpu_split(),
                    base.cpu_total()
                ),
            ),
        };
        rows.push(Row {
            what,
            value,
            target: None,
        });
    }
    rows
}

/// The chart's bars: applied writes per run.
pub fn bars(runs: &[Run]) -> Vec<Bar> {
    runs.iter()
        .map(|run| {
            let setup = match run.setup {
                Setup::Single => "1 server",
                Setup::Cluster => "cluster",
                Setup::Replicated => "+replica",
            };
            let wait = match run.wait {
                Wait::No => "",
                Wait::Data => ", WAIT data",
                Wait::Queue => ", WAIT queue",
            };
            Bar {
                label: format!("{setup}, {}w{wait}", run.workers),
                value: run.burst.applied_per_s,
                text: format!("{:.0}/s", run.burst.applied_per_s),
                reference: false,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(setup: Setup, workers: usize, wait: Wait, applied: f64, accepted: f64) -> Run {
        Run {
            setup,
            workers,
            wait,
            burst: Burst {
                writes: 1000,
                accepted_per_s: accepted,
                applied_per_s: applied,
                complete: true,
            },
            cpu: vec![("API", 20.0), ("workers", 40.0)],
        }
    }

    #[test]
    fn a_wait_run_is_compared_with_its_own_setup_and_workers() {
        let runs = [
            run(Setup::Cluster, 2, Wait::No, 9_000.0, 12_000.0),
            run(Setup::Replicated, 1, Wait::No, 8_000.0, 10_000.0),
            run(Setup::Replicated, 2, Wait::No, 6_000.0, 9_000.0),
            run(Setup::Replicated, 2, Wait::Queue, 3_000.0, 4_500.0),
        ];
        let set = Load {
            rps: 100_000.0,
            server_cpu_us: Some(8.04),
            ..Load::default()
        };
        let rows = rows(&runs, &set);
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0].value, "8.0 µs");
        let rows = &rows[1..];
        assert!(rows[0].value.starts_with("9000/s, 0.09 x redis SET"));
        assert!(
            rows[0]
                .value
                .contains("CPU per write 60 µs (API 20, workers 40)")
        );
        assert!(rows[3].what.starts_with("scaling: WAIT 1 on the queue"));
        assert!(
            rows[3].value.starts_with(
                "applied 3000/s vs 6000/s without (0.50 x), accepted 4500/s vs 9000/s (0.50 x)"
            ),
            "{}",
            rows[3].value
        );
    }
}
