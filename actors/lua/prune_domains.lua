-- prune_domains: one step of the reaper's walk over per-domain state. The
-- learned rate of an idle domain decays toward its configured rate (doubling
-- once per idle period, dropped at the ceiling), and every trace of a domain
-- not seen for a long time is dropped, so no key or hash field stays for
-- every host ever scraped.
--
-- KEYS[1] domains     zset domain rate key -> last seen (ms); each domain's hash
--                     is domains .. ':' .. key (see _lib.lua)
-- KEYS[2] rate_state  hash rate key -> GCRA state (ms; one in the past limits nothing)
-- KEYS[3] paused      hash rate key -> paused until (ms; one in the past pauses nothing)
-- KEYS[4] breaker     hash rate key -> consecutive failures
-- KEYS[5] limits      hash rate key -> tasks/s (the ceiling of a learned rate)
-- KEYS[6] guard       never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] three cursors, space separated: the offset of the decay walk in the
--         idle part of the index, then HSCAN cursors of rate_state and paused
-- ARGV[6] domains or fields each step looks at
-- ARGV[7] idle period (ms): a learned rate doubles after each one without a start
-- ARGV[8] a domain idle this long (ms) is forgotten
--
-- Returns {cursors (space separated), domains forgotten}.

local cursors = split_keys(ARGV[5])
local count, decay_ms, forget_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local INDEX, STATE, PAUSED, BREAKER, LIMITS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = now_ms()

local function hash_of(key)
  return INDEX .. ':' .. key
end
local PACED = INDEX .. ':paced'  -- the domains with a learned rate (_lib.lua)

-- An index damaged from outside (not a zset) reads as empty: the rest of the
-- step, and the reaper's pass around it, go on.
local function idle_since(cutoff, offset)
  local found = redis.pcall('ZRANGEBYSCORE', INDEX, '-inf', cutoff, 'LIMIT', offset, count)
  return found.err and {} or found
end

-- 1. Forget domains idle for forget_ms (none of their tasks running).
local forgotten = 0
for _, key in ipairs(idle_since(now - forget_ms, 0)) do
  if running_of(redis.pcall('HGET', hash_of(key), 'n')) > 0 then
    redis.pcall('ZADD', INDEX, now, key)  -- running now: not idle
  else
    redis.call('DEL', hash_of(key))
    redis.call('ZREM', INDEX, key)
    redis.pcall('SREM', PACED, key)
    redis.call('HDEL', STATE, key)
    redis.call('HDEL', BREAKER, key)
    forgotten = forgotten + 1
  end
end

-- 2. Decay the learned rates of domains idle for decay_ms, a slice at a time.
local offset = num(cursors[1], 0)
local idle = idle_since(now - decay_ms, offset)
for _, key in ipairs(idle) do
  local hash = hash_of(key)
  local d = redis.pcall('HMGET', hash, 'r', 'd', 'n')  -- damaged: reads as empty
  local learned = tonumber(d[1])
  if learned and running_of(d[3]) == 0 and now - num(d[2], 0) > decay_ms then
    local ceiling = tonumber(redis.call('HGET', LIMITS, key))
      or tonumber(redis.call('HGET', LIMITS, 'default_domain'))
    local rate = learned * 2
    if rate >= (ceiling or 1000) then
      redis.pcall('HDEL', hash, 'r', 's', 'd')
      redis.pcall('SREM', PACED, key)
      emit('rate.adjusted', now, {key = key, rate = ceiling, reason = 'restored'})
    else
      redis.pcall('HSET', hash, 'r', rate, 'd', now)
      emit('rate.adjusted', now, {key = key, rate = rate, reason = 'decayed'})
    end
  end
end
offset = #idle < count and 0 or offset + #idle

-- 3. Old GCRA states and expired pauses, of any key.
local function step(hash, cursor, stale)
  local reply = redis.call('HSCAN', hash, cursor, 'COUNT', count)
  local fields = reply[2]
  for i = 1, #fields, 2 do
    if stale(num(fields[i + 1], 0)) then
      redis.call('HDEL', hash, fields[i])
    end
  end
  return reply[1]
end
local tat = step(STATE, cursors[2] or '0', function(value) return value < now - forget_ms end)
local pauses = step(PAUSED, cursors[3] or '0', function(value) return value < now end)
return {table.concat({offset, tat, pauses}, ' '), forgotten}
