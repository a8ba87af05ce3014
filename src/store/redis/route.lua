-- Records one activator replica's load of one route, forgets the route
-- entries past their TTL, and tells every replica when a count changed.
-- KEYS: 1 {p:ns}:rt   ARGV: 1 field (route .. '\n' .. replica), 2 load,
-- 3 pod_ttl ms, 4 history kept ms (max_window), 5 key ttl ms, 6 channel, 7 namespace
-- An entry is "<last seen ms> <ms> <value> <ms> <value> ...": the change
-- points for `window` triggers, the last one being the current load.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(x) return string.format('%.17g', x) end
local load, ttl, keep = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if not load then return redis.error_reply('ERR route load is not a number') end
local function parse(entry)
  local n = {}
  for x in string.gmatch(entry, '%S+') do n[#n + 1] = tonumber(x) end
  return n
end
local changed = false
local points = {}
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local n = parse(old)
  if n[1] and n[1] > now - ttl then
    for i = 2, #n - 1, 2 do points[#points + 1] = {n[i], n[i + 1]} end
  end
end
-- The same rule as window::push: a point only when the value changes, and
-- only the last point before the horizon is kept of the older ones.
if #points == 0 or points[#points][2] ~= load then
  points[#points + 1] = {now, load}
  changed = true
end
local horizon = now - keep
local first_after = #points + 1
for i, p in ipairs(points) do
  if p[1] > horizon then first_after = i; break end
end
local from = math.max(1, first_after - 1)
local out = {fmt(now)}
for i = from, #points do
  out[#out + 1] = fmt(points[i][1])
  out[#out + 1] = fmt(points[i][2])
end
redis.call('HSET', KEYS[1], ARGV[1], table.concat(out, ' '))
-- Dead replicas' entries: few (routes times replicas), removed here so the
-- hash does not grow with every replica that ever ran.
local all = redis.call('HGETALL', KEYS[1])
local dead = {}
for i = 1, #all, 2 do
  local n = parse(all[i + 1])
  if not n[1] or n[1] <= now - ttl then
    dead[#dead + 1] = all[i]
    if n[#n] and n[#n] ~= 0 then changed = true end
  end
end
if #dead > 0 then redis.call('HDEL', KEYS[1], unpack(dead)) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if changed then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
return changed and 1 or 0
