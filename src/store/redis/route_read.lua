-- The live replicas' entries of one activator route, read-only.
-- KEYS: 1 {p:ns}:rt   ARGV: 1 route .. '\n', 2 pod_ttl ms
-- Returns a flat array: now ms, the server's uptime in seconds, then the
-- entry (see route.lua) of each live replica.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local uptime = string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)') or '0'
local out = {string.format('%.17g', now), uptime}
local ttl = tonumber(ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #ARGV[1]) == ARGV[1] then
    local seen = tonumber(string.match(all[i + 1], '^%S+'))
    if seen and seen > now - ttl then out[#out + 1] = all[i + 1] end
  end
end
return out
