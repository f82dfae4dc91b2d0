-- Lists one bucket's live keys in a range, in byte order; see
-- kvq_shared::store::KvStore::list, which runs this once per bucket.
-- KEYS[1] the bucket's index, KEYS[2] its expiry set (one hash slot; the
--         bucket's value keys, read by name below, are in it too)
-- ARGV[1] the bucket's value-key prefix (value key = prefix .. user key)
-- ARGV[2] range start, as ZRANGEBYLEX takes it: '-', '[<prefix>' or '(<cursor>'
-- ARGV[3] range end: '+' or '(<end>'
-- ARGV[4] how many live keys to return at most
-- ARGV[5] how many index entries to examine at most (ARGV[4] + slack)
-- Returns {more, last, key...}: the live keys found, in order; more is '1'
-- when the bucket may hold more keys in the range after last, the last entry
-- examined ('0' and '' when the range is exhausted).
-- Entries whose value key is gone (expired, by Redis' own rules) are never
-- returned; they are removed from both sets as they are met.
local ix, ex, vprefix = KEYS[1], KEYS[2], ARGV[1]
local start, stop = ARGV[2], ARGV[3]
local want, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {'0', ''}
local live, examined, last = 0, 0, nil
while live < want and examined < budget do
  local ask = math.min(want - live, budget - examined)
  local batch = redis.call('ZRANGEBYLEX', ix, start, stop, 'LIMIT', 0, ask)
  for _, member in ipairs(batch) do
    examined = examined + 1
    last = member
    if redis.call('EXISTS', vprefix .. member) == 1 then
      live = live + 1
      out[#out + 1] = member
    else
      redis.call('ZREM', ix, member)
      redis.call('ZREM', ex, member)
    end
  end
  if #batch < ask then
    return out
  end
  start = '(' .. last
end
out[1] = '1'
out[2] = last
return out
