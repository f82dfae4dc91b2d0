//! Every Redis key kvq uses is built here, one function per key, each showing
//! its shape. `ns` is `KVQ_NAMESPACE`.
//!
//! Every user key belongs to one of [`BUCKETS`] buckets ([`bucket`]). The
//! data Redis' keys carry the bucket as their Redis Cluster hash tag
//! (`{<bucket>}`), so a key's value, its metadata, and its bucket's index and
//! expiry set share one hash slot: the apply script and the list script each
//! touch one slot. The user key follows the tag as it is, with no escaping:
//! Redis takes the first `{...}` as the tag, and that one is always ours
//! (`KVQ_NAMESPACE` cannot hold braces).

/// How many buckets user keys are spread over. Never change it: every key
/// in a data Redis would then be looked for in the wrong bucket.
pub const BUCKETS: u16 = 64;

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The bucket of a user key: CRC16 of its bytes modulo [`BUCKETS`]. Fixed
/// for good (the tests pin its values): data is stored under it.
pub fn bucket(key: &str) -> u16 {
    crc16(key.as_bytes()) % BUCKETS
}

/// The live value of a user key, a hash with fields `v` (the value as JSON),
/// `ver` (its version), `ts` (updated at, Unix ms) and, with a TTL, `exp`
/// (expires at, Unix ms, also set as Redis' own expiry on the key):
/// `{ns}:v:{<bucket>}:<key>`.
pub fn value_key(ns: &str, key: &str) -> String {
    format!("{}{key}", value_key_prefix(ns, bucket(key)))
}

/// What every value key of `bucket` starts with, the user key following:
/// `{ns}:v:{<bucket>}:`. The list script and the apply script's clean-up
/// build value keys from it and an index member.
pub fn value_key_prefix(ns: &str, bucket: u16) -> String {
    format!("{ns}:v:{{{bucket}}}:")
}

/// A user key's metadata, kept after delete and expiry so versions never
/// repeat: a hash with `ver` (last version), `seq` (last `seq` applied),
/// `t` (last applied at, Unix ms), `n` (applies so far), `r:<job id>` (the
/// outcomes of the last 64 jobs applied) and `o:<n mod 64>` (which job id
/// each of those slots holds):
/// `{ns}:m:{<bucket>}:<key>`.
pub fn meta_key(ns: &str, key: &str) -> String {
    format!("{ns}:m:{{{}}}:{key}", bucket(key))
}

/// A bucket's index: a sorted set of the user keys of the bucket's live
/// keys (and of keys expired but not yet cleaned up), all scored 0, so
/// `ZRANGEBYLEX` reads them in byte order: `{ns}:ix:{<bucket>}`.
pub fn index_key(ns: &str, bucket: u16) -> String {
    format!("{ns}:ix:{{{bucket}}}")
}

/// A bucket's expiries: a sorted set of the user keys of the bucket's keys
/// that have a TTL, scored by when they expire (Unix ms), for cleaning
/// expired keys out of the index: `{ns}:ex:{<bucket>}`.
pub fn expiry_key(ns: &str, bucket: u16) -> String {
    format!("{ns}:ex:{{{bucket}}}")
}

/// The queue partition of a user key, with `partitions` partitions (a
/// divisor of [`BUCKETS`]): its bucket modulo `partitions`, so every key of a
/// data bucket is in one partition.
pub fn partition(key: &str, partitions: u16) -> u16 {
    bucket(key) % partitions.max(1)
}

/// A new job id for partition `partition`: a UUID v7 whose last byte is the
/// partition, so that the id alone finds the job's record
/// ([`job_partition`]). 54 random bits and the millisecond stay.
pub fn new_job_id(partition: u16) -> String {
    let mut bytes = *uuid::Uuid::now_v7().as_bytes();
    bytes[15] = u8::try_from(partition).unwrap_or(u8::MAX);
    uuid::Uuid::from_bytes(bytes).to_string()
}

/// The job id of write `index` of a batch (`POST /v1/batch`) whose base
/// id is `base` (a [`new_job_id`], which the batch's `Idempotency-Key`
/// keeps), for a key of partition `partition`: `base` with bytes 13 and 14
/// replaced by the index and its last byte by the partition. A repeat of
/// the batch derives the same ids from the same base; the writes of one
/// batch get distinct ids; the base's millisecond and its other 50 random
/// bits tell batches apart. `None` if `base` is not a UUID.
pub fn batch_job_id(base: &str, index: u16, partition: u16) -> Option<String> {
    let mut bytes = *uuid::Uuid::try_parse(base).ok()?.as_bytes();
    bytes[13..15].copy_from_slice(&index.to_be_bytes());
    bytes[15] = u8::try_from(partition).ok()?;
    Some(uuid::Uuid::from_bytes(bytes).to_string())
}

/// The partition a job id names (see [`new_job_id`]), or `None` if `id` is
/// no job id of kvq's.
pub fn job_partition(id: &str) -> Option<u16> {
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    let partition = u16::from(uuid.as_bytes()[15]);
    (partition < BUCKETS).then_some(partition)
}

/// What every key of queue partition `p` starts with; `{<p>}` is its Redis
/// Cluster hash tag, so each partition's scripts touch one slot:
/// `{ns}:p:{<p>}:`.
fn partition_prefix(ns: &str, p: u16) -> String {
    format!("{ns}:p:{{{p}}}:")
}

/// A partition's stream: its jobs in accept order, each entry
/// `<seq>-0 id <job id> job <json>`, trimmed below the committed position:
/// `{ns}:p:{<p>}:stream`.
pub fn stream_key(ns: &str, p: u16) -> String {
    format!("{}stream", partition_prefix(ns, p))
}

/// A partition's last handed-out `seq` (a string): `{ns}:p:{<p>}:last`.
pub fn last_seq_key(ns: &str, p: u16) -> String {
    format!("{}last", partition_prefix(ns, p))
}

/// A partition's owner lease, `<worker>:<generation>:<nonce>`, expiring unless
/// renewed: `{ns}:p:{<p>}:lease`.
pub fn lease_key(ns: &str, p: u16) -> String {
    format!("{}lease", partition_prefix(ns, p))
}

/// A partition's owner generation counter, raised by every acquisition:
/// `{ns}:p:{<p>}:gen`.
pub fn generation_key(ns: &str, p: u16) -> String {
    format!("{}gen", partition_prefix(ns, p))
}

/// A partition's committed position: the stream id up to which every job is
/// final: `{ns}:p:{<p>}:done`.
pub fn done_key(ns: &str, p: u16) -> String {
    format!("{}done", partition_prefix(ns, p))
}

/// A partition's counters, a hash: `accepted` (jobs queued, counted by the
/// accept script), `done` (jobs passed by the committed position, counted
/// by the commit script), `succeeded` and `failed` (jobs that ended so,
/// counted with the worker's record writes): `{ns}:p:{<p>}:counts`. They
/// count from when the queue Redis first held them, for
/// `GET /v1/stats`.
pub fn counts_key(ns: &str, p: u16) -> String {
    format!("{}counts", partition_prefix(ns, p))
}

/// One job's record (status, attempts, timestamps, outcome), a hash in the
/// queue Redis, in its partition's slot: `{ns}:p:{<p>}:job:<job id>`, `p`
/// being the partition the id names. `None` for an id that is not kvq's.
pub fn job_key(ns: &str, job_id: &str) -> Option<String> {
    let p = job_partition(job_id)?;
    Some(format!("{}job:{job_id}", partition_prefix(ns, p)))
}

/// One `Idempotency-Key` use, in the queue Redis, expiring 24 h after the
/// first request: a hash with `fp` (the first request's fingerprint) and
/// `job` (the job id it chose; a repeat queues that id again, which the
/// queue answers with the job's first 202). `scope` is the hex SHA-256 of the caller, the method, the route and the token, so one
/// caller's token never meets another's: `{ns}:idk:<scope>`.
pub fn idempotency_key(ns: &str, scope: &str) -> String {
    format!("{ns}:idk:{scope}")
}

/// A cancelled accept attempt of a job of partition `p`: set by the API
/// when an accept's answer did not arrive in time, so that the accept,
/// should it reach Redis later, queues nothing. A string kept 24 h:
/// `{ns}:p:{<p>}:cancelled:<attempt id>`.
pub fn cancelled_key(ns: &str, p: u16, attempt: &str) -> String {
    format!("{}cancelled:{attempt}", partition_prefix(ns, p))
}

/// That a job with an `Idempotency-Key` was queued: a hash with its `op`,
/// `key` and `seq`, kept as long as the key (24 h) even when job records
/// are kept for less, so that a repeat of the key never queues the job
/// twice: `{ns}:p:{<p>}:queued:<job id>`.
pub fn queued_key(ns: &str, p: u16, job_id: &str) -> String {
    format!("{}queued:{job_id}", partition_prefix(ns, p))
}

/// A partition's dead letters: ids of its jobs that ended `dead`, in a
/// sorted set scored by the time they died (Unix ms): `{ns}:p:{<p>}:dead`.
pub fn dead_set(ns: &str, p: u16) -> String {
    format!("{}dead", partition_prefix(ns, p))
}

/// The live workers: a sorted set of worker names scored by their last
/// heartbeat (Unix ms), in the queue Redis: `{ns}:workers`.
pub fn workers_key(ns: &str) -> String {
    format!("{ns}:workers")
}

/// A data bucket's fence, in the data Redis, in the bucket's slot: the
/// highest owner generation of the bucket's partition that applied a job
/// there; the apply script refuses jobs of older generations:
/// `{ns}:fence:{<bucket>}`.
pub fn fence_key(ns: &str, bucket: u16) -> String {
    format!("{ns}:fence:{{{bucket}}}")
}

/// The channel on which workers announce finished jobs (message: the job
/// id), for requests waiting with `Prefer: wait`: `{ns}:done`.
pub fn done_channel(ns: &str) -> String {
    format!("{ns}:done")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Redis Cluster hash tag of a Redis key: the first `{...}` with
    /// something inside.
    fn hash_tag(redis_key: &str) -> &str {
        let open = redis_key.find('{').expect("a tag");
        let close = open + 1 + redis_key[open + 1..].find('}').expect("a closed tag");
        &redis_key[open + 1..close]
    }

    #[test]
    fn the_bucket_function_never_changes() {
        // The CRC16 check value, as Redis Cluster's specification gives it.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // Data is stored under these: a change here orphans every key.
        let pinned = [
            ("123456789", 3),
            ("", 0),
            ("a", 7),
            ("users/42/name", 30),
            ("é", 4),
            ("😀/x", 14),
            ("list/00", 42),
        ];
        for (key, expected) in pinned {
            assert_eq!(bucket(key), expected, "bucket of {key:?}");
        }
    }

    #[test]
    fn buckets_spread_similar_keys() {
        let mut counts = [0u32; BUCKETS as usize];
        for i in 0..6_400 {
            counts[usize::from(bucket(&format!("users/{i}")))] += 1;
        }
        // 100 per bucket on average.
        assert!(
            counts.iter().all(|&n| (50..=150).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_key_and_its_bucket_share_one_hash_tag() {
        for key in ["plain", "}a{b", "{x}", "users/42/name", "é"] {
            let b = bucket(key);
            let tag = b.to_string();
            assert_eq!(value_key("kvq", key), format!("kvq:v:{{{b}}}:{key}"));
            assert_eq!(meta_key("kvq", key), format!("kvq:m:{{{b}}}:{key}"));
            for redis_key in [
                value_key("kvq", key),
                meta_key("kvq", key),
                index_key("kvq", b),
                expiry_key("kvq", b),
            ] {
                assert_eq!(hash_tag(&redis_key), tag, "{redis_key}");
            }
            assert!(value_key("kvq", key).starts_with(&value_key_prefix("kvq", b)));
        }
    }

    #[test]
    fn a_job_id_names_its_partition_and_its_keys_share_the_partitions_slot() {
        for p in [0, 1, 15, 63] {
            let id = new_job_id(p);
            assert!(uuid::Uuid::try_parse(&id).is_ok(), "{id}");
            assert_eq!(job_partition(&id), Some(p));
            let tag = p.to_string();
            for redis_key in [
                job_key("kvq", &id).expect("a job id of kvq's"),
                stream_key("kvq", p),
                last_seq_key("kvq", p),
                lease_key("kvq", p),
                generation_key("kvq", p),
                done_key("kvq", p),
                counts_key("kvq", p),
                cancelled_key("kvq", p, "a"),
                queued_key("kvq", p, &id),
                dead_set("kvq", p),
            ] {
                assert_eq!(hash_tag(&redis_key), tag, "{redis_key}");
            }
        }
        // A UUID whose last byte names no partition is no job of kvq's.
        assert_eq!(job_partition("01234567-89ab-7def-8123-4567890123ff"), None);
        assert_eq!(job_partition("not-a-uuid"), None);
        assert_eq!(job_key("kvq", "not-a-uuid"), None);
    }

    #[test]
    fn a_batchs_job_ids_are_distinct_repeatable_and_name_their_partitions() {
        let base = new_job_id(3);
        let ids: Vec<String> = (0..1_000u16)
            .map(|i| batch_job_id(&base, i, i % 64).expect("a UUID"))
            .collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for (i, id) in ids.iter().enumerate() {
            let index = u16::try_from(i).expect("small");
            assert_eq!(batch_job_id(&base, index, index % 64).as_ref(), Some(id));
            assert_eq!(job_partition(id), Some(index % 64));
            let uuid = uuid::Uuid::try_parse(id).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            assert_eq!(
                &uuid.as_bytes()[..13],
                &uuid::Uuid::try_parse(&base).expect("a UUID").as_bytes()[..13]
            );
        }
        assert_ne!(
            batch_job_id(&new_job_id(3), 0, 3),
            batch_job_id(&base, 0, 3)
        );
        assert_eq!(batch_job_id("not-a-uuid", 0, 0), None);
    }

    #[test]
    fn a_keys_partition_is_its_buckets() {
        for key in ["a", "users/42/name", "list/00"] {
            assert_eq!(partition(key, 16), bucket(key) % 16);
            assert_eq!(partition(key, 64), bucket(key));
            assert_eq!(partition(key, 1), 0);
            assert_eq!(
                hash_tag(&fence_key("kvq", bucket(key))),
                bucket(key).to_string()
            );
        }
    }
}
