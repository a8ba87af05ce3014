-- Count and sum of the live pods of one namespace per group, read-only: what
-- sum and avg triggers need, in O(groups) (see groups.lua).
-- KEYS: 1 seen, 2 id, 3 st, 4 h, 5 g, 6 gl, 7 gs, 8 gc   ARGV: 1 pod_ttl ms
-- Returns a flat array: now ms, the server's uptime in seconds, then either
-- 'stale' (some pod is not counted in a group, or a group's sum is not a
-- whole number: data of a previous version; the caller rebuilds the groups) or 'ok' followed per group with live pods by
-- id, identity JSON, sum, count.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(x) return string.format('%.17g', x) end
local uptime = string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)') or '0'
local out = {fmt(now), uptime}
-- Every member of seen is counted once, so equal sizes mean nothing is
-- missing (a pod written without groups) and nothing is left over (a pod
-- removed without them).
if redis.call('ZCARD', KEYS[1]) ~= redis.call('HLEN', KEYS[5]) then
  out[3] = 'stale'
  return out
end
out[3] = 'ok'
local sums, counts = {}, {}
local flat = redis.call('HGETALL', KEYS[8])
for i = 1, #flat, 2 do counts[flat[i]] = tonumber(flat[i + 1]) end
flat = redis.call('HGETALL', KEYS[7])
for i = 1, #flat, 2 do
  local s = tonumber(flat[i + 1])
  -- Sums of whole values are whole: anything else (NaN, inf, a residue) was
  -- summed before values were checked, and a recount clears it.
  if not (s and s >= 0 and s == math.floor(s) and s < 2^53) then
    out[3] = 'stale'
    return out
  end
  sums[flat[i]] = s
end
-- Pods past their TTL that nothing removed yet: normally none. Live means
-- score > now - ttl, as in read.lua.
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now - tonumber(ARGV[1])))
for i = 1, #dead, 1000 do
  local chunk = {}
  for j = i, math.min(i + 999, #dead) do chunk[#chunk + 1] = dead[j] end
  local got = redis.call('HMGET', KEYS[5], unpack(chunk))
  for j = 1, #chunk do
    local gid, v = string.match(got[j] or '', '^(%x+) (.+)$')
    v = tonumber(v)
    if gid and v and counts[gid] then
      counts[gid] = counts[gid] - 1
      sums[gid] = (sums[gid] or 0) - v
    end
  end
end
for gid, c in pairs(counts) do
  if c > 0 then
    out[#out + 1] = gid
    out[#out + 1] = redis.call('HGET', KEYS[6], gid)
    out[#out + 1] = sums[gid] and fmt(sums[gid]) or false
    out[#out + 1] = tostring(c)
  end
end
return out
