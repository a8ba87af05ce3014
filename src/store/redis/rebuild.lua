-- Recounts every pod of one namespace into groups from scratch (see
-- groups.lua): once after an upgrade from a version without groups, or if a
-- writer of that version still ran. Runs after groups.lua.
-- KEYS: 1 seen, 2 id, 3 st, 4 h, 5 g, 6 gl, 7 gs, 8 gc   ARGV: 1 key ttl ms
-- A pod whose identity or state is missing or unreadable is left uncounted:
-- summary.lua then keeps answering 'stale' and the per-pod read reports it.
-- Values were not checked before this version: a state written then may hold
-- NaN, inf or fractions (and its group sum with them). Such families are
-- dropped and the pod's value is summed again; returns it, or nil when the
-- state is no state.
local function clean(s)
  local kept, v = {s[1]}, 0
  for i = 2, #s - 1, 2 do
    local x = tonumber(s[i + 1])
    if x and x >= 0 and x <= 1e9 and x == math.floor(x) then
      kept[#kept + 1] = s[i]
      kept[#kept + 1] = s[i + 1]
      v = v + x
    end
  end
  if #kept ~= #s then
    for i = #s, 1, -1 do s[i] = nil end
    for i = 1, #kept do s[i] = kept[i] end
  end
  return v
end
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
      if ok and type(s) == 'table' and s[1] then
        local v = clean(s)
        if v then
          if fmt(v) ~= s[1] then
            s[1] = fmt(v)
            redis.call('HSET', KEYS[3], chunk[j], cjson.encode(s))
          end
          count(chunk[j], ids[j], v)
        end
      end
    end
  end
end
for k = 5, 8 do redis.call('PEXPIRE', KEYS[k], ARGV[1]) end
return #pods
