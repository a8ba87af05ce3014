-- One Envoy message for one pod, in one round trip. Runs after groups.lua.
-- KEYS: 1 seen (ZSET pod -> last-seen ms), 2 id (HASH pod -> identity JSON),
--       3 st (HASH pod -> state), 4 h (HASH pod -> history), 5-8 groups.lua's
-- ARGV: 1 pod, 2 identity JSON, 3 pod_ttl ms, 4 max_window ms, 5 key ttl ms,
--       6 channel, 7 namespace, 8.. family name, value (pairs)
-- Returns 1 when the namespace changed (a watcher must re-read), else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pod, ttl, keep = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local changed = false

-- Lazy expiry: a pod not seen for ttl is gone (live means now - seen < ttl).
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now - ttl), 'LIMIT', 0, 256)
if #dead > 0 then
  for _, d in ipairs(dead) do uncount(d) end
  redis.call('ZREM', KEYS[1], unpack(dead))
  for k = 2, 4 do redis.call('HDEL', KEYS[k], unpack(dead)) end
  changed = true
end

-- State: a flat array {value, name1, value1, name2, value2, ...}, numbers as
-- strings so that cjson's 14-digit number format cannot round them.
local state
if redis.call('ZSCORE', KEYS[1], pod) and redis.call('HGET', KEYS[2], pod) == ARGV[2] then
  local raw = redis.call('HGET', KEYS[3], pod)
  if raw then
    local ok, s = pcall(cjson.decode, raw)
    if ok and type(s) == 'table' and s[1] then state = s end
  end
end

local function sum(s)
  local v = 0
  for i = 3, #s, 2 do v = v + tonumber(s[i]) end
  return v
end

-- Appends a change point and forgets those no window can still see; the
-- same rule as window::push.
local function push(h, at, v)
  local n = #h
  if n == 0 or tonumber(h[n]) ~= v then
    h[n + 1] = fmt(at)
    h[n + 2] = fmt(v)
  end
  local horizon = at - keep
  local before = 0
  for i = 1, #h, 2 do
    if tonumber(h[i]) <= horizon then before = before + 1 else break end
  end
  if before > 1 then
    local kept = {}
    for i = 2 * (before - 1) + 1, #h do kept[#kept + 1] = h[i] end
    h = kept
  end
  return h
end

if state then
  local dirty = false
  for i = 8, #ARGV, 2 do
    local name, v = ARGV[i], ARGV[i + 1]
    local found = false
    for j = 2, #state, 2 do
      if state[j] == name then
        found = true
        if tonumber(state[j + 1]) ~= tonumber(v) then
          state[j + 1] = v
          dirty = true
        end
        break
      end
    end
    if not found then
      state[#state + 1] = name
      state[#state + 1] = v
      dirty = true
    end
  end
  if dirty then
    local before = tonumber(state[1])
    local value = sum(state)
    state[1] = fmt(value)
    redis.call('HSET', KEYS[3], pod, cjson.encode(state))
    if value ~= before then
      local h = {}
      local raw = redis.call('HGET', KEYS[4], pod)
      if raw then
        local ok, decoded = pcall(cjson.decode, raw)
        if ok and type(decoded) == 'table' then h = decoded end
      end
      redis.call('HSET', KEYS[4], pod, cjson.encode(push(h, now, value)))
      changed = true
    end
  end
else
  -- New pod, a pod back after expiry, or new labels: start afresh.
  state = {'0'}
  for i = 8, #ARGV, 2 do
    local found = false
    for j = 2, #state, 2 do
      if state[j] == ARGV[i] then state[j + 1] = ARGV[i + 1]; found = true; break end
    end
    if not found then
      state[#state + 1] = ARGV[i]
      state[#state + 1] = ARGV[i + 1]
    end
  end
  local value = sum(state)
  state[1] = fmt(value)
  redis.call('HSET', KEYS[2], pod, ARGV[2])
  redis.call('HSET', KEYS[3], pod, cjson.encode(state))
  redis.call('HSET', KEYS[4], pod, cjson.encode({fmt(now), fmt(value)}))
  changed = true
end

-- Also on an unchanged message: heals a count that a writer without groups
-- (a replica of the previous version, during a rolling upgrade) left behind.
count(pod, ARGV[2], tonumber(state[1]))
redis.call('ZADD', KEYS[1], fmt(now), pod)
for k = 1, 8 do redis.call('PEXPIRE', KEYS[k], ARGV[5]) end
if changed then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
  return 1
end
return 0
