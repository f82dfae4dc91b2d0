//! The multi-node harnesses themselves: a Redis Cluster of 3 masters with
//! a replica each, and a master + replica + 3 sentinels, on loopback. Other
//! tests rely on what these check: that the topology forms, that a key lands
//! where the cluster says, and that killing a master promotes its replica.

use kvq_testkit::{TestCa, TestCluster, TestRedis, TestSentinel};

/// Writes `key` = `value` on `master` and waits until one replica has it
/// (`WAIT` on the same connection): a failover cannot lose it.
fn write_replicated(master: &TestRedis, key: &str, value: &str) {
    let (_, replicas): ((), i64) = redis::pipe()
        .cmd("SET")
        .arg(key)
        .arg(value)
        .cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query(&mut master.conn())
        .unwrap();
    assert_eq!(replicas, 1, "the replica did not acknowledge the write");
}

/// `INFO replication`'s `field` of `node`.
fn replication(node: &TestRedis, field: &str) -> String {
    let info: String = node.cmd(&["INFO", "replication"]);
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn a_cluster_forms_with_three_masters_each_with_a_replica_in_sync() {
    let cluster = TestCluster::start();
    assert_eq!(cluster.urls().split(',').count(), 6);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let mut replicas = Vec::new();
    for &master in &masters {
        let replica = cluster
            .replica_of(master)
            .expect("every master has a replica");
        let node = cluster.node(replica);
        assert_eq!(replication(node, "role"), "slave");
        assert_eq!(replication(node, "master_port"), master.to_string());
        assert_eq!(replication(node, "master_link_status"), "up");
        replicas.push(replica);
    }
    replicas.sort();
    replicas.dedup();
    assert_eq!(replicas.len(), 3, "one replica per master");
    // Every slot has a master.
    for slot in [0, 5_000, 10_000, 16_383] {
        assert!(masters.contains(&cluster.master_of_slot(slot)));
    }
}

#[test]
fn a_key_written_through_a_cluster_client_lands_on_master_of_key() {
    let cluster = TestCluster::start();
    for i in 0..60 {
        let key = format!("k{i}");
        let _: () = cluster.cmd(&["SET", &key, &i.to_string()]);
        let master = cluster.node(cluster.master_of_key(&key));
        let value: Option<String> = master.cmd(&["GET", &key]);
        assert_eq!(value, Some(i.to_string()), "{key} on its master");
        let _: () = cluster.cmd(&["XADD", &format!("{{kvq}}:s{i}"), "*", "f", "v"]);
    }
    let per_master = cluster.keys_per_master("k*");
    assert_eq!(per_master.len(), 3);
    assert!(
        per_master.iter().all(|&(_, n)| n > 0),
        "60 keys spread over every master: {per_master:?}"
    );
    assert_eq!(per_master.iter().map(|&(_, n)| n).sum::<usize>(), 60);
    assert_eq!(cluster.keys().len(), 120);
    assert!(cluster.cpu_seconds() > 0.0);
}

#[tokio::test]
async fn killing_a_cluster_master_promotes_its_replica_and_keeps_the_key() {
    let mut cluster = TestCluster::start();
    let key = "some-key";
    let master = cluster.master_of_key(key);
    let replica = cluster.replica_of(master).unwrap();
    write_replicated(cluster.node(master), key, "v1");

    cluster.kill(master);
    let promoted = cluster.wait_failover(master).await;
    assert_eq!(promoted, replica, "the killed master's replica took over");
    assert_eq!(cluster.master_of_key(key), replica);
    let value: Option<String> = cluster.cmd(&["GET", key]);
    assert_eq!(
        value.as_deref(),
        Some("v1"),
        "the key survived the failover"
    );

    // The old master comes back as the new master's replica.
    cluster.restart(master).await;
    assert_eq!(cluster.replica_of(replica), Some(master));
    assert_eq!(cluster.masters().len(), 3);
    let _: () = cluster.cmd(&["SET", key, "v2"]);
    let value: Option<String> = cluster.cmd(&["GET", key]);
    assert_eq!(value.as_deref(), Some("v2"));
}

#[test]
fn a_cluster_with_a_password_and_tls_forms_and_answers() {
    let ca = TestCa::new();
    let cluster = TestCluster::builder()
        .args(&["--requirepass", "pw"])
        .tls(&ca)
        .start();
    for url in cluster.urls().split(',') {
        assert!(url.starts_with("rediss://:pw@127.0.0.1:"), "{url}");
    }
    assert_eq!(cluster.masters().len(), 3);
    let _: () = cluster.cmd(&["SET", "a", "1"]);
    let value: Option<String> = cluster.cmd(&["GET", "a"]);
    assert_eq!(value.as_deref(), Some("1"));
    assert_eq!(cluster.pending_jobs(), 0);
}

#[tokio::test]
async fn the_sentinels_fail_over_to_the_replica_when_the_master_is_killed() {
    let mut set = TestSentinel::builder()
        .args(&["--requirepass", "pw"])
        .start();
    assert_eq!(set.urls().split(',').count(), 3);
    assert!(set.urls().starts_with("redis://:pw@127.0.0.1:"));
    let old = set.master();
    let replica = set.nodes()[1].port();
    assert_eq!(old, set.nodes()[0].port());
    write_replicated(set.master_node(), "some-key", "v1");

    assert_eq!(set.kill_master(), old);
    let new = set.wait_failover(old).await;
    assert_eq!(new, replica);
    assert_eq!(set.master(), replica);
    let value: Option<String> = set.master_node().cmd(&["GET", "some-key"]);
    assert_eq!(
        value.as_deref(),
        Some("v1"),
        "the key survived the failover"
    );

    // The old master comes back as the new one's replica.
    set.restart(old).await;
    let node = set.node(old);
    assert_eq!(replication(node, "role"), "slave");
    assert_eq!(replication(node, "master_port"), replica.to_string());
    let value: Option<String> = node.cmd(&["GET", "some-key"]);
    assert_eq!(value.as_deref(), Some("v1"), "the restarted node synced");
}
