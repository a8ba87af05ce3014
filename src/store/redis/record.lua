-- One Envoy message for one pod, in one round trip. Runs after groups.lua.
-- KEYS: 1 seen (ZSET pod -> last-seen ms), 2 id (HASH pod -> identity JSON),
--       3 st (HASH pod -> state), 4 h (HASH pod -> history), 5-8 groups.lua's,
--       9 addr (HASH pod -> the address it is bound to), 10 rep (HASH pod ->
--       the replica holding its stream)
-- ARGV: 1 pod, 2 identity JSON, 3 pod_ttl ms, 4 max_window ms, 5 key ttl ms,
--       6 channel, 7 namespace, 8 peer address ('' when unknown),
--       9 max families, 10 replica, 11.. family name, value (pairs, sorted by
--       name, no repeats; values whole numbers in [0, 1e9])
-- Returns {status, refused, bound}: status 1 when the namespace changed (a
-- watcher must re-read), 0 when not, 2 when nothing was written because the
-- live pod is bound to another address (then `bound`, else ''); refused is
-- the number of new families past the cap.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pod, ttl, keep = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local peer, cap = ARGV[8], tonumber(ARGV[9])
local changed = false

-- Lazy expiry: a pod not seen for ttl is gone (live means now - seen < ttl).
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now - ttl), 'LIMIT', 0, 256)
if #dead > 0 then
  for _, d in ipairs(dead) do uncount(d) end
  redis.call('ZREM', KEYS[1], unpack(dead))
  for _, k in ipairs({2, 3, 4, 9, 10}) do redis.call('HDEL', KEYS[k], unpack(dead)) end
  changed = true
end

local seen = tonumber(redis.call('ZSCORE', KEYS[1], pod))
local live = seen ~= nil and seen > now - ttl

-- A live pod stays bound to the address it was first seen from: compared
-- here, in the same step as the write, so replicas cannot race on it.
local bound = false
if live and peer ~= '' then
  bound = redis.call('HGET', KEYS[9], pod)
  if bound and bound ~= peer then
    if changed then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
    return {2, 0, bound}
  end
end

-- State: a flat array {value, name1, value1, name2, value2, ...}, numbers as
-- strings so that cjson's 14-digit number format cannot round them.
local state
if live and redis.call('HGET', KEYS[2], pod) == ARGV[2] then
  local raw = redis.call('HGET', KEYS[3], pod)
  if raw then
    local ok, s = pcall(cjson.decode, raw)
    if ok and type(s) == 'table' and s[1] then state = s end
  end
end

-- What a gauge can be. Values were not checked before this version; a state
-- written then may hold NaN, inf or fractions, which are dropped here.
local function gauge(s)
  local v = tonumber(s)
  return v ~= nil and v >= 0 and v <= 1e9 and v == math.floor(v)
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

-- The merge, linear: one pass indexes the pod's families by name, one pass
-- applies the message's. New names enter while the pod holds fewer than cap.
local fresh = state == nil
local merged, at, dirty, refused = {fresh and '0' or state[1]}, {}, false, 0
if not fresh then
  for j = 2, #state - 1, 2 do
    if gauge(state[j + 1]) then
      merged[#merged + 1] = state[j]
      merged[#merged + 1] = state[j + 1]
      at[state[j]] = #merged
    else
      dirty = true
    end
  end
end
local held = (#merged - 1) / 2
for i = 11, #ARGV - 1, 2 do
  local name, v = ARGV[i], ARGV[i + 1]
  local j = at[name]
  if j then
    if tonumber(merged[j]) ~= tonumber(v) then
      merged[j] = v
      dirty = true
    end
  elseif held < cap then
    merged[#merged + 1] = name
    merged[#merged + 1] = v
    at[name] = #merged
    held = held + 1
    dirty = true
  else
    refused = refused + 1
  end
end
state = merged
local value = sum(state)
local before = tonumber(state[1])

if fresh then
  -- New pod, a pod back after expiry, or new labels: start afresh.
  state[1] = fmt(value)
  redis.call('HSET', KEYS[2], pod, ARGV[2])
  redis.call('HSET', KEYS[3], pod, cjson.encode(state))
  redis.call('HSET', KEYS[4], pod, cjson.encode({fmt(now), fmt(value)}))
  changed = true
elseif dirty or value ~= before then
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

-- The binding: set when the pod (re)starts, or when it was written without
-- an address so far; a live pod that has one keeps it (checked above).
if not live then
  if peer ~= '' then redis.call('HSET', KEYS[9], pod, peer) else redis.call('HDEL', KEYS[9], pod) end
elseif peer ~= '' and not bound then
  redis.call('HSET', KEYS[9], pod, peer)
end

-- The stream's replica, for the pods listing: a read, and a write only when
-- the stream moved (a reconnect to another replica), so a steady pod costs
-- one HGET. Not a change for watchers: no scaling answer depends on it.
if redis.call('HGET', KEYS[10], pod) ~= ARGV[10] then
  redis.call('HSET', KEYS[10], pod, ARGV[10])
end

-- Also on an unchanged message: heals a count that a writer without groups
-- (a replica of the previous version, during a rolling upgrade) left behind.
count(pod, ARGV[2], value)
redis.call('ZADD', KEYS[1], fmt(now), pod)
for k = 1, 10 do redis.call('PEXPIRE', KEYS[k], ARGV[5]) end
if changed then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
  return {1, refused, ''}
end
return {0, refused, ''}
