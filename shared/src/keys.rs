//! Every Redis key kvq uses is built here, one function per key, each showing
//! its shape. `ns` is `KVQ_NAMESPACE`.
//!
//! A user key appears inside a Redis Cluster hash tag (`{...}`), so a key's
//! value and metadata always share one slot. The key is escaped first (`%` →
//! `%25`, `{` → `%7B`, `}` → `%7D`), so a user key containing braces cannot
//! move the tag; the escaping maps prefixes to prefixes, which keeps prefix
//! listing a plain `SCAN MATCH`.

/// Escapes a user key for use inside a hash tag.
pub fn escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape`]. Returns `None` for text that [`escape`] never makes.
pub fn unescape(escaped: &str) -> Option<String> {
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "25" => '%',
            "7B" => '{',
            "7D" => '}',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// The live value of a user key, a hash with fields `v` (the value as JSON),
/// `ver` (its version), `ts` (updated at, Unix ms) and, with a TTL, `exp`
/// (expires at, Unix ms, also set as Redis' own expiry on the key):
/// `{ns}:kv:{<escaped key>}`.
pub fn value_key(ns: &str, key: &str) -> String {
    format!("{ns}:kv:{{{}}}", escape(key))
}

/// The `SCAN MATCH` pattern for value keys whose user key starts with
/// `prefix`: `{ns}:kv:{<escaped, glob-quoted prefix>*`.
pub fn value_key_pattern(ns: &str, prefix: &str) -> String {
    let mut pattern = format!("{ns}:kv:{{");
    for c in escape(prefix).chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// Extracts the user key from a value key made by [`value_key`].
pub fn user_key_of(ns: &str, value_key: &str) -> Option<String> {
    let inner = value_key
        .strip_prefix(ns)?
        .strip_prefix(":kv:{")?
        .strip_suffix('}')?;
    unescape(inner)
}

/// A user key's metadata, kept after delete and expiry so versions never
/// repeat: a hash with `ver` (last version), `next` (last `seq` handed out),
/// `seq` (last `seq` applied), `r:<seq>` (outcomes of recent applies) and
/// `x:<seq>` (handed out but never queued):
/// `{ns}:meta:{<escaped key>}`.
pub fn meta_key(ns: &str, key: &str) -> String {
    format!("{ns}:meta:{{{}}}", escape(key))
}

/// One job's record (status, attempts, timestamps, outcome), a hash in the
/// queue Redis: `{ns}:job:<job id>`.
pub fn job_key(ns: &str, job_id: &str) -> String {
    format!("{ns}:job:{job_id}")
}

/// One `Idempotency-Key` use, in the queue Redis, expiring 24 h after the
/// first request: a hash with `fp` (the first request's fingerprint) and,
/// once that request was answered, `answer` (its 202 body). `scope` is the
/// hex SHA-256 of the caller, the method, the route and the token, so one
/// caller's token never meets another's: `{ns}:idk:<scope>`.
pub fn idempotency_key(ns: &str, scope: &str) -> String {
    format!("{ns}:idk:{scope}")
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

    #[test]
    fn braces_cannot_move_the_hash_tag() {
        let k = "}a{b%7D";
        assert_eq!(value_key("kvq", k), "kvq:kv:{%7Da%7Bb%257D}");
        assert_eq!(meta_key("kvq", k), "kvq:meta:{%7Da%7Bb%257D}");
        assert_eq!(user_key_of("kvq", &value_key("kvq", k)).as_deref(), Some(k));
    }

    #[test]
    fn escaping_round_trips_and_keeps_prefixes() {
        for k in ["plain", "users/42/name", "é%{}", "%", "%%7B", "a*b?[c]\\"] {
            assert_eq!(unescape(&escape(k)).as_deref(), Some(k));
            for cut in (0..=k.len()).filter(|i| k.is_char_boundary(*i)) {
                assert!(escape(k).starts_with(&escape(&k[..cut])));
            }
        }
        assert_eq!(unescape("%41"), None);
    }

    #[test]
    fn glob_characters_are_quoted() {
        assert_eq!(value_key_pattern("kvq", "a*["), "kvq:kv:{a\\*\\[*");
    }
}
