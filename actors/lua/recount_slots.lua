-- recount_slots: set every domain's in-flight count to the number of running
-- tasks that hold one of its slots. A count is kept exact by the scripts
-- that start and end tasks; one that drifted anyway (a script of an earlier
-- version that failed half-way, a field written from outside) would hold
-- its domain back for good, so the reaper recounts now and then.
--
-- KEYS[1] running  zset id -> lease deadline (every task holding a slot is here)
-- KEYS[2] domains  zset: politeness index; per-domain hashes beside it (_lib.lua)
-- KEYS[3] gates    zset rate key -> next start (ms): a domain whose count went
--                  down may start its waiting tasks at once
-- KEYS[4] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV: only the shared context (ARGV[1..4]; the task key prefix finds each slot)
--
-- A domain's `n` is 1 + its tasks running, + SETTLED once its window reached
-- the cap (_lib.lua, take_slot); the mark is kept. A domain with
-- tasks running is put in the index if it is not there (its first start's
-- entry is written with pcall, so it could be missing).
-- Returns the number of domains whose count was wrong.

local counts = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local slot = redis.call('HGET', PREFIX .. id, 'slot')
  if slot and slot ~= '' then
    local key = string.match(slot, '^%+?(.*)$')
    counts[key] = (counts[key] or 0) + 1
  end
end
local now = now_ms()
for key in pairs(counts) do
  redis.pcall('ZADD', KEYS[2], 'NX', now, key)  -- the index only times pruning: never abort
end
local known = redis.pcall('ZRANGE', KEYS[2], 0, -1)
if known.err then
  known = {}
end
-- Every indexed domain, and every domain with tasks waiting at its gate
-- (those a wrong count holds back, indexed or not).
for _, key in ipairs(known) do
  counts[key] = counts[key] or 0
end
for _, key in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if string.sub(key, 1, 7) == 'domain:' then
    counts[key] = counts[key] or 0
  end
end
local fixed, freed = 0, 0
for key, running in pairs(counts) do
  local hash = KEYS[2] .. ':' .. key
  local stored = num(redis.pcall('HGET', hash, 'n'), -1)  -- damaged: reads as wrong
  local count = running + 1 + (stored > SETTLED and SETTLED or 0)
  if stored ~= count then
    redis.pcall('HSET', hash, 'n', count)
    fixed = fixed + 1
    if stored > count and num(redis.call('ZSCORE', KEYS[3], key), 0) > now then
      redis.call('ZADD', KEYS[3], 'XX', now, key)
      freed = freed + 1
    end
  end
end
if freed > 0 then
  publish(WAKE, freed)
end
return fixed
