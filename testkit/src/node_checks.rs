//! What the cluster and sentinel harnesses ask of their nodes while they
//! wait: `INFO`, `ROLE`, replica sync, and polling with a deadline.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::TestRedis;

/// How long the harnesses wait for a topology to form, heal or fail over.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// How often the harnesses poll the nodes while they wait.
const POLL: Duration = Duration::from_millis(100);

/// The `field:value` lines of an `INFO`-like answer of `node`.
pub(crate) fn info(node: &TestRedis, args: &[&str]) -> Result<HashMap<String, String>, String> {
    let cmd = crate::redis_server::command(args);
    let text: String = cmd
        .query(&mut node.quick_conn().map_err(|e| e.to_string())?)
        .map_err(|e| format!("node {}: {e}", node.port()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// The first word of `ROLE`: `master`, `slave` or `sentinel`.
pub(crate) fn role(node: &TestRedis) -> Result<String, String> {
    let answer: Vec<redis::Value> = redis::cmd("ROLE")
        .query(&mut node.quick_conn().map_err(|e| e.to_string())?)
        .map_err(|e| format!("node {}: {e}", node.port()))?;
    answer
        .first()
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        .ok_or_else(|| format!("node {}: ROLE answered {answer:?}", node.port()))
}

/// `node` is a replica of `master`, its link up and no sync running, and
/// `master` counts it as online.
pub(crate) fn check_replica(node: &TestRedis, master: &TestRedis) -> Result<(), String> {
    let master_port = master.port();
    let port = node.port();
    let replication = info(node, &["INFO", "replication"])?;
    let field = |name: &str| replication.get(name).map(String::as_str);
    if field("role") != Some("slave") || field("master_port") != Some(&master_port.to_string()) {
        return Err(format!(
            "node {port} is {:?} of {:?}, not a replica of {master_port}",
            field("role"),
            field("master_port")
        ));
    }
    if field("master_link_status") != Some("up") || field("master_sync_in_progress") != Some("0") {
        return Err(format!("replica {port} is not in sync yet"));
    }
    let online = format!("port={port},state=online");
    let listed = info(master, &["INFO", "replication"])?
        .iter()
        .any(|(name, value)| name.starts_with("slave") && value.contains(&online));
    if !listed {
        return Err(format!(
            "master {master_port} does not list replica {port} online"
        ));
    }
    Ok(())
}

/// Polls `check` every [`POLL`] until it succeeds; panics with its last
/// reason after [`DEADLINE`].
pub(crate) fn poll_sync<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(reason) if started.elapsed() > DEADLINE => {
                panic!("timed out after {DEADLINE:?} waiting for {what}: {reason}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// [`poll_sync`] that sleeps without blocking the test's runtime.
pub(crate) async fn poll_async<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(reason) if started.elapsed() > DEADLINE => {
                panic!("timed out after {DEADLINE:?} waiting for {what}: {reason}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}
