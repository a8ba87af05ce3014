-- Removes expired pods of one namespace and tells every replica when it did.
-- Runs after groups.lua.
-- KEYS: 1 seen, 2 id, 3 st, 4 h, 5-8 groups.lua's, 9 addr, 10 rep   ARGV: 1 pod_ttl ms, 2 channel, 3 namespace
-- Returns {removed, ms until the next pod expires or -1}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now - ttl), 'LIMIT', 0, 1000)
if #dead > 0 then
  for _, d in ipairs(dead) do uncount(d) end
  redis.call('ZREM', KEYS[1], unpack(dead))
  for _, k in ipairs({2, 3, 4, 9, 10}) do redis.call('HDEL', KEYS[k], unpack(dead)) end
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
-- Replica fields of pods that are gone: a writer without them (a replica of
-- the previous version, during a rolling upgrade) removed the pod and left
-- its field. Every write of this version sets both, every removal deletes
-- both, so a hash larger than the index says so; two O(1) reads otherwise.
if redis.call('HLEN', KEYS[10]) > redis.call('ZCARD', KEYS[1]) then
  local gone = {}
  for _, p in ipairs(redis.call('HKEYS', KEYS[10])) do
    if not redis.call('ZSCORE', KEYS[1], p) then gone[#gone + 1] = p end
  end
  for i = 1, #gone, 1000 do
    redis.call('HDEL', KEYS[10], unpack(gone, i, math.min(i + 999, #gone)))
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_in = -1
if first[2] then next_in = math.max(0, tonumber(first[2]) + ttl - now) end
return {#dead, next_in}
