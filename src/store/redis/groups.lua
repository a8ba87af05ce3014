-- Prepended to record.lua, sweep.lua and rebuild.lua: the per-group
-- aggregates that let summary.lua answer in O(groups) instead of O(pods).
-- A group is a pod identity without the pod's name (workload + labels; the
-- namespace is the key scope), so its JSON is the identity JSON (canonical:
-- labels sorted) and its id that JSON's SHA-1.
-- KEYS: 5 g (HASH pod -> "group id value": the group and value the pod is
--       counted with), 6 gl (HASH group id -> identity JSON),
--       7 gs (HASH group id -> sum of its pods' values), 8 gc (HASH group id
--       -> number of its pods)
-- Invariant: every member of seen (live or not yet removed) is counted in
-- exactly one group, with the value of its state; nothing else is counted.
-- Sums move by deltas: values are whole numbers in [0, 1e9] (the sink checks
-- them) and a pod holds at most max_families_per_pod of them, so every sum is
-- an integer far below 2^53, which f64 adds exactly and %.17g writes as
-- digits; a group's sum restarts from nothing when its last pod leaves.
local function fmt(x) return string.format('%.17g', x) end

local function group_add(gid, json, dv, dc)
  local c = (tonumber(redis.call('HGET', KEYS[8], gid)) or 0) + dc
  if c <= 0 then
    redis.call('HDEL', KEYS[6], gid)
    redis.call('HDEL', KEYS[7], gid)
    redis.call('HDEL', KEYS[8], gid)
    return
  end
  local s = (tonumber(redis.call('HGET', KEYS[7], gid)) or 0) + dv
  redis.call('HSET', KEYS[7], gid, fmt(s))
  if dc ~= 0 then redis.call('HSET', KEYS[8], gid, c) end
  if json and dc > 0 then redis.call('HSET', KEYS[6], gid, json) end
end

-- The group id and value a pod is counted with, or nil.
local function counted(pod)
  local a = redis.call('HGET', KEYS[5], pod)
  if not a then return nil end
  local gid, v = string.match(a, '^(%x+) (.+)$')
  return gid, tonumber(v)
end

-- Takes a pod out of its group (it expired).
local function uncount(pod)
  local gid, v = counted(pod)
  redis.call('HDEL', KEYS[5], pod)
  if gid and v then group_add(gid, nil, -v, -1) end
end

-- Counts a pod with `value` in the group of identity `json`, moving it out of
-- the group it was counted in before, if another one.
local function count(pod, json, value)
  local gid = redis.sha1hex(json)
  local ogid, ov = counted(pod)
  if ogid == gid and ov then
    if ov == value then return end
    group_add(gid, json, value - ov, 0)
  else
    if ogid and ov then group_add(ogid, nil, -ov, -1) end
    group_add(gid, json, value, 1)
  end
  redis.call('HSET', KEYS[5], pod, gid .. ' ' .. fmt(value))
end
