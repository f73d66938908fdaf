-- cleanup: retention. Drop dead-letter entries older than the result ttl
-- (their records expire by the same ttl) and workers gone for a long time.
--
-- KEYS[1] dead     zset id -> time it was dead-lettered
-- KEYS[2] workers  zset worker id -> last heartbeat (ms)
-- KEYS[3] guard    never exists: refuses the call while the slot migrates (keys.py)
-- ARGV[5] result ttl in ms
-- ARGV[6] a worker silent this long (ms) is forgotten
-- ARGV[7] worker key prefix: a worker's hash is ARGV[7] .. worker id
--
-- Returns {dead_letters_removed, workers_removed}.

local now = now_ms()
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[5]))
for _, id in ipairs(old) do
  redis.call('DEL', PREFIX .. id)
  redis.call('ZREM', KEYS[1], id)
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[6]))
for _, worker in ipairs(gone) do
  redis.call('DEL', ARGV[7] .. worker)
  redis.call('ZREM', KEYS[2], worker)
end
return {#old, #gone}
