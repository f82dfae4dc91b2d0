-- Applies a group of jobs, one after another, each to one user key,
-- atomically; see kvq_shared::store. A group never holds two jobs of one
-- key (the queue hands a key's jobs out one at a time); on a Redis Cluster
-- all its keys are in one hash slot (one bucket).
-- ARGV[1] how many recent job outcomes to remember for redelivered jobs
-- ARGV[2] '1' when the caller WAITs for replicas after the script: a
--         redelivered job then rewrites its remembered outcome, so that
--         the WAIT covers the first apply too (replication is in order)
-- ARGV[3] the number of jobs, n
-- Per job i (0-based), KEYS from k = 5i + 1 and ARGV from a = 10i + 4:
-- KEYS[k] value key, KEYS[k+1] meta key, KEYS[k+2] the key's bucket's index,
--         KEYS[k+3] its expiry set, KEYS[k+4] the bucket's fence (one hash
--         slot: all carry the bucket's tag)
-- ARGV[a] op: create | update | upsert | delete
-- ARGV[a+1] the job id
-- ARGV[a+2] value: JSON text (ignored by delete)
-- ARGV[a+3] ttl in ms, 0 for none
-- ARGV[a+4] If-Match version, '' for none
-- ARGV[a+5] now, Unix ms
-- ARGV[a+6] the generation of the partition owner applying the job
-- ARGV[a+7] the job's seq (kept as the key's last applied seq)
-- ARGV[a+8] the user key (its member in the index and the expiry set)
-- ARGV[a+9] the bucket's value-key prefix (value key = prefix .. user key)
-- Returns per job {'done', outcome} | {'dup', outcome} | {'fenced', fence}
-- where outcome is '<created|updated|deleted>:<version>' or '<code>:0'.
local remembered, rewrite = tonumber(ARGV[1]), ARGV[2] == '1'

-- The fences read in this group, and the buckets to sweep.
local fences, sweeps = {}, {}

local function apply(k, a)
  local vkey, mkey = KEYS[k], KEYS[k + 1]
  local ixkey, exkey, member = KEYS[k + 2], KEYS[k + 3], ARGV[a + 8]
  local op, id = ARGV[a], ARGV[a + 1]
  -- Fencing: a job of an older owner than one that applied in this bucket
  -- changes nothing (its partition moved on without it).
  local fkey = KEYS[k + 4]
  local fence = fences[fkey]
  if not fence then
    fence = tonumber(redis.call('GET', fkey) or '0')
  end
  local gen = tonumber(ARGV[a + 6])
  if gen < fence then
    fences[fkey] = fence
    return {'fenced', tostring(fence)}
  end
  if gen > fence then redis.call('SET', fkey, ARGV[a + 6]) end
  fences[fkey] = math.max(gen, fence)
  -- Exactly once: a job applied before (redelivered after its owner died
  -- before committing) answers its first outcome and changes nothing.
  local meta = redis.call('HMGET', mkey, 'ver', 'n', 'r:' .. id)
  if meta[3] then
    if rewrite then redis.call('HSET', mkey, 'r:' .. id, meta[3]) end
    return {'dup', meta[3]}
  end
  -- A live key's version is the key's last version: every successful write
  -- bumps 'ver' and leaves the value key live, except delete, which removes it.
  local live = redis.call('EXISTS', vkey) == 1
  local version = tonumber(meta[1] or '0')
  local outcome
  if ARGV[a + 4] ~= '' and (not live or tostring(version) ~= ARGV[a + 4]) then
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
      local ttl = tonumber(ARGV[a + 3])
      if ttl > 0 then
        -- 'exp' repeats Redis' own expiry so that a read is one HMGET.
        local at = tonumber(ARGV[a + 5]) + ttl
        redis.call('HSET', vkey, 'v', ARGV[a + 2], 'ver', version, 'ts', ARGV[a + 5], 'exp', tostring(at))
        redis.call('PEXPIREAT', vkey, at)
      elseif live then
        redis.call('HSET', vkey, 'v', ARGV[a + 2], 'ver', version, 'ts', ARGV[a + 5])
        redis.call('HDEL', vkey, 'exp')
        redis.call('PERSIST', vkey)
      else
        redis.call('HSET', vkey, 'v', ARGV[a + 2], 'ver', version, 'ts', ARGV[a + 5])
      end
      -- Index upkeep (listing): a written key is in the index, and in the
      -- expiry set exactly when it has a TTL.
      redis.call('ZADD', ixkey, 0, member)
      if ttl > 0 then
        redis.call('ZADD', exkey, tonumber(ARGV[a + 5]) + ttl, member)
      else
        redis.call('ZREM', exkey, member)
      end
      if live then outcome = 'updated:' .. version else outcome = 'created:' .. version end
    end
  end
  -- Remember this job's outcome in slot n mod ARGV[1], forgetting the job
  -- that slot held.
  local n = tonumber(meta[2] or '0') + 1
  local slot = 'o:' .. tostring(n % remembered)
  local old = redis.call('HGET', mkey, slot)
  if old then redis.call('HDEL', mkey, 'r:' .. old) end
  redis.call('HSET', mkey, 'seq', ARGV[a + 7], 'ver', version, 't', ARGV[a + 5], 'n', n, slot, id,
    'r:' .. id, outcome)
  -- Index upkeep, once per bucket and group, below: 8 more for this apply.
  local sweep = sweeps[exkey]
  if not sweep then
    sweep = {ixkey = ixkey, prefix = ARGV[a + 9], now = ARGV[a + 5], count = 0}
    sweeps[exkey] = sweep
  end
  sweep.count = sweep.count + 8
  return {'done', outcome}
end

local out = {}
for i = 0, tonumber(ARGV[3]) - 1 do
  out[i + 1] = apply(5 * i + 1, 10 * i + 4)
end
-- Index upkeep (listing): drop a few keys of each bucket written that
-- expired (by Redis' own expiry: EXISTS, not the clocks) from both sets,
-- so the index does not keep keys that expired long ago. Bounded work per
-- apply: 8 keys.
for exkey, sweep in pairs(sweeps) do
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', exkey, '-inf', sweep.now, 'LIMIT', 0, sweep.count)) do
    if redis.call('EXISTS', sweep.prefix .. gone) == 0 then
      redis.call('ZREM', sweep.ixkey, gone)
      redis.call('ZREM', exkey, gone)
    end
  end
end
return out
