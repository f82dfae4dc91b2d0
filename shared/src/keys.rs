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
/// repeat: a hash with `ver` (last version), `next` (last `seq` handed out),
/// `seq` (last `seq` applied), `r:<seq>` (outcomes of recent applies) and
/// `x:<seq>` (handed out but never queued):
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

/// One job's record (status, attempts, timestamps, outcome), a hash in the
/// queue Redis: `{ns}:job:<job id>`.
pub fn job_key(ns: &str, job_id: &str) -> String {
    format!("{ns}:job:{job_id}")
}

/// One `Idempotency-Key` use, in the queue Redis, expiring 24 h after the
/// first request: a hash with `fp` (the first request's fingerprint), `job`
/// (the job id it chose) and, once a request with it was answered, `answer`
/// (its 202 body). `scope` is the
/// hex SHA-256 of the caller, the method, the route and the token, so one
/// caller's token never meets another's: `{ns}:idk:<scope>`.
pub fn idempotency_key(ns: &str, scope: &str) -> String {
    format!("{ns}:idk:{scope}")
}

/// A cancelled accept attempt: set by the API when an accept's answer did
/// not arrive in time, so that the accept, should it reach Redis later,
/// queues nothing. A string in the queue Redis kept 24 h:
/// `{ns}:cancelled:<attempt id>`.
pub fn cancelled_key(ns: &str, attempt: &str) -> String {
    format!("{ns}:cancelled:{attempt}")
}

/// That a job with an `Idempotency-Key` was queued: a hash with its `op`,
/// `key` and `seq`, in the queue Redis, kept as long as the key (24 h)
/// even when job records are kept for less, so that a repeat of the key
/// never queues the job twice: `{ns}:queued:<job id>`.
pub fn queued_key(ns: &str, job_id: &str) -> String {
    format!("{ns}:queued:{job_id}")
}

/// The dead letters: ids of jobs that ended `dead`, in a sorted set scored by
/// the time they died (Unix ms), in the queue Redis: `{ns}:dead`.
pub fn dead_set(ns: &str) -> String {
    format!("{ns}:dead")
}

/// The channel on which workers announce finished jobs (message: the job
/// id), for requests waiting with `Prefer: wait`: `{ns}:done`.
pub fn done_channel(ns: &str) -> String {
    format!("{ns}:done")
}

/// The apalis queue the API pushes to and workers consume: `{ns}:apply`.
/// Named explicitly, never after the Rust type, so renaming the job type
/// cannot orphan queued jobs.
pub fn queue_name(ns: &str) -> String {
    format!("{ns}:{}", crate::jobs::QUEUE)
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
}
