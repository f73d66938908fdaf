-- set_limits: replace the rate limits, circuit-breaker and politeness
-- settings at once (supervisor start and SIGHUP). Every host should run the
-- same [rate_limits] and [politeness]; the last one to start or reload wins.
--
-- KEYS[1] limits            hash rate key -> tasks/s (absent when none are
--                           configured: claim and enqueue then skip rate checks)
-- KEYS[2] breaker_settings  hash: failures, cooldown_ms
-- KEYS[3] politeness        hash: active, cap, cap:<rate key>, adaptive,
--                           start_rate, min_rate, max_retry_after_ms (see _lib.lua)
-- KEYS[4] guard             never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] breaker failures threshold (0 = off)
-- ARGV[6] breaker cooldown in ms
-- ARGV[7] number of limits n, then n pairs: rate key, tasks/s
-- then    number of politeness fields m, then m pairs: field, value
--
-- Returns the number of limits written.

local n = tonumber(ARGV[7])
redis.call('DEL', KEYS[1])
for i = 1, n do
  redis.call('HSET', KEYS[1], ARGV[7 + 2 * i - 1], ARGV[7 + 2 * i])
end
redis.call('HSET', KEYS[2], 'failures', ARGV[5], 'cooldown_ms', ARGV[6])
local at = 8 + 2 * n
redis.call('DEL', KEYS[3])
for i = 1, tonumber(ARGV[at]) do
  redis.call('HSET', KEYS[3], ARGV[at + 2 * i - 1], ARGV[at + 2 * i])
end
return n
