//! Resharding under load: slots of the data cluster and of the queue
//! cluster move to another master, key by key (`MIGRATING` / `IMPORTING` /
//! `MIGRATE`, as `redis-cli --cluster reshard` does), while clients write.
//! Commands meet `ASK` while a slot moves, `TRYAGAIN` when a script's keys
//! are split between the two nodes, and `MOVED` once it has moved; kvq
//! follows them without a restart, and no write is lost, doubled or
//! reordered.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvq_shared::keys;
use kvq_testkit::{Stack, TestCluster, eventually};
use reqwest::Method;
use serde_json::{Value, json};

use crate::list::list_all;

/// Keys written, and writes per key.
const KEYS: usize = 48;
const WRITES_PER_KEY: u64 = 40;

/// A node's cluster id.
fn id_of(cluster: &TestCluster, port: u16) -> String {
    cluster.node(port).cmd(&["CLUSTER", "MYID"])
}

/// Moves `slot` from its master to `to`, key by key, as a resharding does:
/// the slot is marked importing on `to` and migrating on its master, its
/// keys are `MIGRATE`d in small batches (with pauses, so that commands meet
/// the slot half moved), then every master is told its new owner.
async fn move_slot(cluster: &TestCluster, slot: u16, to: u16) {
    let from = cluster.master_of_slot(slot);
    if from == to {
        return;
    }
    let (from_id, to_id) = (id_of(cluster, from), id_of(cluster, to));
    let slot_text = slot.to_string();
    let _: () = cluster
        .node(to)
        .cmd(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id]);
    let _: () = cluster
        .node(from)
        .cmd(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id]);
    let to_port = to.to_string();
    loop {
        let batch: Vec<String> =
            cluster
                .node(from)
                .cmd(&["CLUSTER", "GETKEYSINSLOT", &slot_text, "10"]);
        if batch.is_empty() {
            break;
        }
        let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
        args.extend(batch.iter().map(String::as_str));
        let _: () = cluster.node(from).cmd(&args);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for port in [to, from] {
        let _: () = cluster
            .node(port)
            .cmd(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
    }
    for port in cluster.masters() {
        if port != to && port != from {
            let _: () = cluster
                .node(port)
                .cmd(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
        }
    }
}

/// The slots of `keys` that live on `master`, and another master to move
/// them to.
fn slots_on(cluster: &TestCluster, master: u16, keys: &[String]) -> (Vec<u16>, u16) {
    let mut slots: Vec<u16> = keys
        .iter()
        .map(|k| cluster.slot_of_key(k))
        .filter(|slot| cluster.master_of_slot(*slot) == master)
        .collect();
    slots.sort_unstable();
    slots.dedup();
    let to = cluster
        .masters()
        .into_iter()
        .find(|port| *port != master)
        .expect("three masters");
    (slots, to)
}

#[tokio::test]
async fn writes_during_a_resharding_of_both_clusters_apply_once_in_order() {
    let stack = Stack::builder()
        .kv_cluster()
        .queue_cluster()
        .workers(2)
        .start()
        .await;
    let names: Vec<String> = (0..KEYS).map(|i| format!("reshard/{i:02}")).collect();
    // When each write was accepted, to check that writes overlapped the moves.
    let accepted_at: Mutex<Vec<Instant>> = Mutex::default();

    // One writer per key, each write after the previous one's 202: a key's
    // writes are accepted in the order they are sent, so its final value is
    // its last write and its version its number of writes.
    let writers = names.iter().cloned().map(|key| {
        let (stack, accepted_at) = (&stack, &accepted_at);
        async move {
            for n in 1..=WRITES_PER_KEY {
                loop {
                    let answer = stack
                        .request(Method::PUT, &format!("/v1/kv/{key}?upsert=true"))
                        .header("Idempotency-Key", format!("{key}/{n}"))
                        .json(&json!({"value": n}))
                        .send()
                        .await;
                    match answer.map(|r| r.status().as_u16()) {
                        Ok(202) => {
                            accepted_at.lock().unwrap().push(Instant::now());
                            break;
                        }
                        // 503 while a slot moves: the same Idempotency-Key
                        // makes the retry exactly once.
                        Ok(503) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        Ok(other) => panic!("{key} write {n}: {other}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    });
    let writing = futures::future::join_all(writers);

    // Meanwhile: the data slots of the first data master's keys, and the
    // queue slots of the first queue master's partitions, move away, both
    // at once.
    let reshard_data = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let kv = stack.kv.cluster();
        let data_keys: Vec<String> = names.iter().map(|k| keys::value_key("kvq", k)).collect();
        let (slots, to) = slots_on(kv, kv.masters()[0], &data_keys);
        assert!(!slots.is_empty(), "some keys live on the first data master");
        let started = Instant::now();
        for slot in &slots {
            move_slot(kv, *slot, to).await;
        }
        (started, Instant::now())
    };
    let reshard_queue = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queue = stack.queue.cluster();
        let streams: Vec<String> = (0..16).map(|p| keys::stream_key("kvq", p)).collect();
        let (slots, to) = slots_on(queue, queue.masters()[0], &streams);
        assert!(
            !slots.is_empty(),
            "some partitions live on the first queue master"
        );
        let started = Instant::now();
        for slot in &slots {
            move_slot(queue, *slot, to).await;
        }
        (started, Instant::now())
    };
    let (_, data_moves, queue_moves) = tokio::join!(writing, reshard_data, reshard_queue);
    let accepted_at = accepted_at.into_inner().unwrap();
    for (role, (from, to)) in [("data", data_moves), ("queue", queue_moves)] {
        let during = accepted_at
            .iter()
            .filter(|at| (from..=to).contains(*at))
            .count();
        println!(
            "{role} slots moved in {:?}; {during} writes accepted meanwhile",
            to - from
        );
        assert!(
            during > 0,
            "no write was accepted while the {role} slots moved"
        );
    }

    // Every write applies, once, in order.
    eventually(
        Duration::from_secs(60),
        "every key to reach its last write",
        || async {
            for key in &names {
                let response = stack.get(key).await;
                if response.status() != 200 {
                    return None;
                }
                let body: Value = response.json().await.ok()?;
                if body["value"] != json!(WRITES_PER_KEY) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let mut versions = BTreeMap::new();
    for key in &names {
        versions.insert(key.clone(), stack.version_of(key).await);
    }
    let expected: BTreeMap<String, Option<u64>> = names
        .iter()
        .map(|k| (k.clone(), Some(WRITES_PER_KEY)))
        .collect();
    assert_eq!(
        versions, expected,
        "one version per write: none lost or applied twice"
    );

    // Listing across the resharded cluster: every key once, in order.
    let listed = list_all(&stack, "reshard/", 7).await;
    assert_eq!(listed, names, "every key once, sorted");
}
