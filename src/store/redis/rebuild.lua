-- Recounts every pod of one namespace into groups from scratch (see
-- groups.lua): once after an upgrade from a version without groups, or if a
-- writer of that version still ran. Runs after groups.lua.
-- KEYS: 1 seen, 2 id, 3 st, 4 h, 5 g, 6 gl, 7 gs, 8 gc   ARGV: 1 key ttl ms
-- A pod whose identity or state is missing or unreadable is left uncounted:
-- summary.lua then keeps answering 'stale' and the per-pod read reports it.
for k = 5, 8 do redis.call('DEL', KEYS[k]) end
local pods = redis.call('ZRANGE', KEYS[1], 0, -1)
for i = 1, #pods, 1000 do
  local chunk = {}
  for j = i, math.min(i + 999, #pods) do chunk[#chunk + 1] = pods[j] end
  local ids = redis.call('HMGET', KEYS[2], unpack(chunk))
  local sts = redis.call('HMGET', KEYS[3], unpack(chunk))
  for j = 1, #chunk do
    if ids[j] and sts[j] then
      local ok, s = pcall(cjson.decode, sts[j])
      local v = ok and type(s) == 'table' and tonumber(s[1])
      if v then count(chunk[j], ids[j], v) end
    end
  end
end
for k = 5, 8 do redis.call('PEXPIRE', KEYS[k], ARGV[1]) end
return #pods
