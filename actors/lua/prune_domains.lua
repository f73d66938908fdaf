-- prune_domains: one step of the reaper's walk over per-domain state. The
-- learned rate of an idle domain decays toward its configured rate (doubling
-- once per idle period, dropped at the ceiling), and every trace of a domain
-- not seen for a long time is dropped, so no hash keyed by rate key grows
-- with every host ever scraped.
--
-- KEYS[1] domains     hash: per-domain politeness state (see _lib.lua)
-- KEYS[2] rate_state  hash rate key -> GCRA state (ms; one in the past limits nothing)
-- KEYS[3] paused      hash rate key -> paused until (ms; one in the past pauses nothing)
-- KEYS[4] breaker     hash rate key -> consecutive failures
-- KEYS[5] limits      hash rate key -> tasks/s (the ceiling of a learned rate)
-- ARGV[5] four HSCAN cursors, space separated: domains, rate_state, paused, breaker
-- ARGV[6] fields each HSCAN step looks at
-- ARGV[7] idle period (ms): a learned rate doubles after each one without a start
-- ARGV[8] a domain idle this long (ms) is forgotten
--
-- Returns {cursors (space separated), domains forgotten}.

local cursors = split_keys(ARGV[5])
local count, decay_ms, forget_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local DOMAINS_KEY, STATE, PAUSED, BREAKER, LIMITS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = now_ms()
local forgotten = 0

-- When domain key K was last seen (0: never, or long forgotten).
local function seen(key)
  return num(redis.call('HGET', DOMAINS_KEY, 'a:' .. key), 0)
end

local function step(hash, cursor, visit)
  local reply = redis.call('HSCAN', hash, cursor, 'COUNT', count)
  local fields = reply[2]
  for i = 1, #fields, 2 do
    visit(fields[i], fields[i + 1])
  end
  return reply[1]
end

local out = {}
out[1] = step(DOMAINS_KEY, cursors[1] or '0', function(field, value)
  local kind, key = string.match(field, '^(%a):(.+)$')
  if not key or redis.call('HEXISTS', DOMAINS_KEY, 'n:' .. key) == 1 then
    return  -- running now: neither idle nor gone
  end
  if kind == 'a' and now - num(value, 0) > forget_ms then
    redis.call('HDEL', DOMAINS_KEY, 'a:' .. key, 'w:' .. key, 'r:' .. key, 's:' .. key,
      'd:' .. key, 'x:' .. key)
    redis.call('HDEL', STATE, key)
    redis.call('HDEL', BREAKER, key)
    forgotten = forgotten + 1
  elseif kind == 'r' and now - seen(key) > decay_ms
      and now - num(redis.call('HGET', DOMAINS_KEY, 'd:' .. key), 0) > decay_ms then
    local ceiling = tonumber(redis.call('HGET', LIMITS, key))
      or tonumber(redis.call('HGET', LIMITS, 'default_domain'))
    local rate = num(value, 0) * 2
    if rate >= (ceiling or 1000) then
      redis.call('HDEL', DOMAINS_KEY, 'r:' .. key, 's:' .. key, 'd:' .. key)
      emit('rate.adjusted', now, {key = key, rate = ceiling, reason = 'restored'})
    else
      redis.call('HSET', DOMAINS_KEY, 'r:' .. key, rate, 'd:' .. key, now)
      emit('rate.adjusted', now, {key = key, rate = rate, reason = 'decayed'})
    end
  elseif kind ~= 'a' and seen(key) == 0 then
    redis.call('HDEL', DOMAINS_KEY, field)  -- a stray field of a forgotten domain
  end
end)
out[2] = step(STATE, cursors[2] or '0', function(key, value)
  if num(value, 0) < now - forget_ms then
    redis.call('HDEL', STATE, key)
  end
end)
out[3] = step(PAUSED, cursors[3] or '0', function(key, value)
  if num(value, 0) < now then
    redis.call('HDEL', PAUSED, key)
  end
end)
out[4] = step(BREAKER, cursors[4] or '0', function(key)
  if is_domain(key) and now - seen(key) > forget_ms then
    redis.call('HDEL', BREAKER, key)
  end
end)
return {table.concat(out, ' '), forgotten}
