-- set_limits: replace the rate limits and circuit-breaker settings at once
-- (supervisor start and SIGHUP). Every host should run the same [rate_limits];
-- the last one to start or reload wins.
--
-- KEYS[1] limits  hash rate key -> tasks/s, plus breaker_failures and breaker_cooldown_ms
-- ARGV[5] number of entries n, then n pairs: field, value
--
-- Returns the number of entries written.

local n = tonumber(ARGV[5])
redis.call('DEL', KEYS[1])
for i = 1, n do
  redis.call('HSET', KEYS[1], ARGV[5 + 2 * i - 1], ARGV[5 + 2 * i])
end
return n
