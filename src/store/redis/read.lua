-- The live pods of one namespace, read-only.
-- KEYS: 1 seen, 2 id, 3 st, 4 h, 10 rep   ARGV: 1 pod_ttl ms, 2 '1' to include
-- history, 3 '1' to include replicas
-- Returns a flat array: now ms, the server's uptime in seconds, then per live
-- pod: name, last seen ms, identity, state, history (false when not asked),
-- and only when replicas are asked the replica (false when none is recorded).
-- Replicas are for the pods listing: the scaling reads do not pay for them.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(x) return string.format('%.17g', x) end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. fmt(now - tonumber(ARGV[1])), '+inf', 'WITHSCORES')
-- A server up for less than a flush or two may have lost what the sidecars
-- reported before it started (a restart without persistence).
local uptime = string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)') or '0'
local out = {fmt(now), uptime}
-- HMGET in chunks: unpack() is limited by the Lua C stack.
local function hmget(key, names)
  local all = {}
  for i = 1, #names, 1000 do
    local chunk = {}
    for j = i, math.min(i + 999, #names) do chunk[#chunk + 1] = names[j] end
    local got = redis.call('HMGET', key, unpack(chunk))
    for j = 1, #chunk do all[#all + 1] = got[j] end
  end
  return all
end
local names = {}
for i = 1, #live, 2 do names[#names + 1] = live[i] end
if #names == 0 then return out end
local ids = hmget(KEYS[2], names)
local sts = hmget(KEYS[3], names)
local hs = {}
if ARGV[2] == '1' then hs = hmget(KEYS[4], names) end
local reps = ARGV[3] == '1' and hmget(KEYS[10], names)
for i = 1, #names do
  out[#out + 1] = names[i]
  out[#out + 1] = live[2 * i]
  out[#out + 1] = ids[i]
  out[#out + 1] = sts[i]
  out[#out + 1] = hs[i] or false
  if reps then out[#out + 1] = reps[i] end
end
return out
