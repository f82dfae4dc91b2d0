-- Applies one job to one user key, atomically; see kvq_shared::store.
-- KEYS[1] value key, KEYS[2] meta key, KEYS[3] the key's bucket's index,
--         KEYS[4] its expiry set, KEYS[5] the bucket's fence (one hash
--         slot: all carry the bucket's tag)
-- ARGV[1] op: create | update | upsert | delete
-- ARGV[2] the job id
-- ARGV[3] value: JSON text (ignored by delete)
-- ARGV[4] ttl in ms, 0 for none
-- ARGV[5] If-Match version, '' for none
-- ARGV[6] now, Unix ms
-- ARGV[7] the generation of the partition owner applying the job
-- ARGV[8] how many recent job outcomes to remember for redelivered jobs
-- ARGV[9] the job's seq (kept as the key's last applied seq)
-- ARGV[10] the user key (its member in the index and the expiry set)
-- ARGV[11] the bucket's value-key prefix (value key = prefix .. user key)
-- ARGV[12] '1' when the caller WAITs for replicas after the script: a
--          redelivered job then rewrites its remembered outcome, so that
--          the WAIT covers the first apply too (replication is in order)
-- Returns {'done', outcome} | {'dup', outcome} | {'fenced', fence}
-- where outcome is '<created|updated|deleted>:<version>' or '<code>:0'.
local vkey, mkey = KEYS[1], KEYS[2]
local ixkey, exkey, member = KEYS[3], KEYS[4], ARGV[10]
local op, id = ARGV[1], ARGV[2]
-- Fencing: a job of an older owner than one that applied in this bucket
-- changes nothing (its partition moved on without it).
local fence = tonumber(redis.call('GET', KEYS[5]) or '0')
local gen = tonumber(ARGV[7])
if gen < fence then return {'fenced', tostring(fence)} end
if gen > fence then redis.call('SET', KEYS[5], ARGV[7]) end
-- Exactly once: a job applied before (redelivered after its owner died
-- before committing) answers its first outcome and changes nothing.
local meta = redis.call('HMGET', mkey, 'ver', 'n', 'r:' .. id)
if meta[3] then
  if ARGV[12] == '1' then redis.call('HSET', mkey, 'r:' .. id, meta[3]) end
  return {'dup', meta[3]}
end
-- A live key's version is the key's last version: every successful write
-- bumps 'ver' and leaves the value key live, except delete, which removes it.
local live = redis.call('EXISTS', vkey) == 1
local version = tonumber(meta[1] or '0')
local outcome
if ARGV[5] ~= '' and (not live or tostring(version) ~= ARGV[5]) then
  outcome = 'version_mismatch:0'
elseif op == 'create' and live then
  outcome = 'already_exists:0'
elseif (op == 'update' or op == 'delete') and not live then
  outcome = 'not_found:0'
else
  version = version + 1
  if op == 'delete' then
    redis.call('DEL', vkey)
    -- Index upkeep (listing): a deleted key leaves both sets.
    redis.call('ZREM', ixkey, member)
    redis.call('ZREM', exkey, member)
    outcome = 'deleted:' .. version
  else
    local ttl = tonumber(ARGV[4])
    if ttl > 0 then
      -- 'exp' repeats Redis' own expiry so that a read is one HMGET.
      local at = tonumber(ARGV[6]) + ttl
      redis.call('HSET', vkey, 'v', ARGV[3], 'ver', version, 'ts', ARGV[6], 'exp', tostring(at))
      redis.call('PEXPIREAT', vkey, at)
    elseif live then
      redis.call('HSET', vkey, 'v', ARGV[3], 'ver', version, 'ts', ARGV[6])
      redis.call('HDEL', vkey, 'exp')
      redis.call('PERSIST', vkey)
    else
      redis.call('HSET', vkey, 'v', ARGV[3], 'ver', version, 'ts', ARGV[6])
    end
    -- Index upkeep (listing): a written key is in the index, and in the
    -- expiry set exactly when it has a TTL.
    redis.call('ZADD', ixkey, 0, member)
    if ttl > 0 then
      redis.call('ZADD', exkey, tonumber(ARGV[6]) + ttl, member)
    else
      redis.call('ZREM', exkey, member)
    end
    if live then outcome = 'updated:' .. version else outcome = 'created:' .. version end
  end
end
-- Remember this job's outcome in slot n mod ARGV[8], forgetting the job
-- that slot held.
local n = tonumber(meta[2] or '0') + 1
local slot = 'o:' .. tostring(n % tonumber(ARGV[8]))
local old = redis.call('HGET', mkey, slot)
if old then redis.call('HDEL', mkey, 'r:' .. old) end
redis.call('HSET', mkey, 'seq', ARGV[9], 'ver', version, 't', ARGV[6], 'n', n, slot, id,
  'r:' .. id, outcome)
-- Index upkeep (listing): drop a few keys of this bucket that expired (by
-- Redis' own expiry: EXISTS, not the clocks) from both sets, so the index
-- does not keep keys that expired long ago. Bounded work per apply.
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', exkey, '-inf', ARGV[6], 'LIMIT', 0, 8)) do
  if redis.call('EXISTS', ARGV[11] .. gone) == 0 then
    redis.call('ZREM', ixkey, gone)
    redis.call('ZREM', exkey, gone)
  end
end
return {'done', outcome}
