-- Applies one write to one user key, atomically; see kvq_shared::store.
-- KEYS[1] value key, KEYS[2] meta key, KEYS[3] the key's bucket's index,
--         KEYS[4] its expiry set (one hash slot: all carry the bucket's tag)
-- ARGV[1] op: create | update | upsert | delete
-- ARGV[2] seq: the job's per-key sequence number
-- ARGV[3] value: JSON text (ignored by delete)
-- ARGV[4] ttl in ms, 0 for none
-- ARGV[5] If-Match version, '' for none
-- ARGV[6] now, Unix ms
-- ARGV[7] gap timeout, ms: a job whose earlier seqs are missing is applied
--         anyway once the key has made no progress for this long since the
--         later of its last apply and this job's enqueue
-- ARGV[8] how many recent outcomes to remember for redelivered jobs
-- ARGV[9] when the job was enqueued, Unix ms
-- ARGV[10] the user key (its member in the index and the expiry set)
-- ARGV[11] the bucket's value-key prefix (value key = prefix .. user key)
-- Returns {'done', outcome, skipped} | {'dup', outcome or ''} | {'wait', last applied seq}
-- where outcome is '<created|updated|deleted>:<version>' or '<code>:0', and
-- skipped is how many missing seqs were given up on.
local vkey, mkey = KEYS[1], KEYS[2]
local ixkey, exkey, member = KEYS[3], KEYS[4], ARGV[10]
local op, seq = ARGV[1], tonumber(ARGV[2])
local meta = redis.call('HMGET', mkey, 'seq', 'ver', 't')
local applied = tonumber(meta[1] or '0')
if seq <= applied then
  return {'dup', redis.call('HGET', mkey, 'r:' .. ARGV[2]) or ''}
end
-- Sequence numbers the API handed out but could not queue are marked
-- abandoned ('x:<seq>'); step over them.
while seq > applied + 1 and redis.call('HDEL', mkey, 'x:' .. tostring(applied + 1)) == 1 do
  applied = applied + 1
  redis.call('HSET', mkey, 'seq', tostring(applied))
end
local skipped = 0
if seq > applied + 1 then
  local since = math.max(tonumber(meta[3] or '0'), tonumber(ARGV[9]))
  if tonumber(ARGV[6]) - since < tonumber(ARGV[7]) then
    return {'wait', tostring(applied)}
  end
  skipped = seq - applied - 1
end
-- A live key's version is the key's last version: every successful write
-- bumps 'ver' and leaves the value key live, except delete, which removes it.
local live = redis.call('EXISTS', vkey) == 1
local version = tonumber(meta[2] or '0')
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
redis.call('HSET', mkey, 'seq', ARGV[2], 'ver', version, 't', ARGV[6], 'r:' .. ARGV[2], outcome)
redis.call('HDEL', mkey, 'r:' .. tostring(seq - tonumber(ARGV[8])))
-- Index upkeep (listing): drop a few keys of this bucket that expired (by
-- Redis' own expiry: EXISTS, not the clocks) from both sets, so the index
-- does not keep keys that expired long ago. Bounded work per apply.
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', exkey, '-inf', ARGV[6], 'LIMIT', 0, 8)) do
  if redis.call('EXISTS', ARGV[11] .. gone) == 0 then
    redis.call('ZREM', ixkey, gone)
    redis.call('ZREM', exkey, gone)
  end
end
return {'done', outcome, tostring(skipped)}
